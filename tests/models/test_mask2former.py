"""Mask2Former Swin-T, with and without Offset Learning: official state-dict layout and parameter
counts at full size, numerical equivalence with the official code on the reduced configuration
(backbone features, pixel-decoder outputs, every per-layer prediction, predict()), the
Offset_Learning_Mask module vector, and a training step."""

from __future__ import annotations

import pytest
import torch

import offseg
from offseg.flops import count_parameters
from offseg.models.backbones.swin import SwinTransformer
from offseg.models.heads.mask2former_head import semantic_scores, sine_positional_encoding
from offseg.models.layers.ms_deform_attn import multi_scale_deformable_attention
from offseg.models.layers.offset_learning import OffsetLearningMask
from offseg.models.mask2former import MASK2FORMER_REDUCED
from reference import TOLERANCE, assert_close, assert_manifest, load_vector

NAMES = {False: "mask2former-swin-t", True: "mask2former-swin-t-ol"}
NUM_LAYERS_REDUCED = MASK2FORMER_REDUCED["decoder_layers"]


@pytest.mark.parametrize(
    "offset_learning, manifest, count",
    [(False, "mask2former_swin_t", 47_439_633), (True, "mask2former_swin_t_offset_learning", 47_570_705)],
    ids=["baseline", "ol"],
)
def test_full_size_matches_official_manifest(offset_learning: bool, manifest: str, count: int) -> None:
    model = offseg.create_model(NAMES[offset_learning], num_classes=150)
    assert_manifest(model, manifest)
    assert count_parameters(model) == count
    assert model.num_classes == 150 and model.size_divisor == 32


def _reduced(offset_learning: bool) -> tuple[torch.nn.Module, object]:
    """Reduced model loaded with the reference weights (the baseline uses the OL file minus
    decode_head.offset_learning.*), in eval mode, and the OL vector (input, intermediates)."""
    vec = load_vector("mask2former_swin_reduced_offset_learning")
    weights = {
        k: v for k, v in vec.weights.items() if offset_learning or not k.startswith("decode_head.offset_learning.")
    }
    model = offseg.create_model(NAMES[offset_learning], num_classes=150, **MASK2FORMER_REDUCED)
    model.load_state_dict(weights, strict=True)
    return model.eval(), vec


def test_relative_position_index_matches_official_buffers() -> None:
    vec = load_vector("mask2former_swin_reduced_offset_learning")
    ours = SwinTransformer(**{k: MASK2FORMER_REDUCED[k] for k in ("embed_dims", "depths", "num_heads")}).state_dict()
    keys = [k for k in ours if k.endswith("relative_position_index")]
    assert len(keys) == sum(MASK2FORMER_REDUCED["depths"])
    for key in keys:
        assert torch.equal(ours[key], vec.weights[f"backbone.{key}"]), key


@pytest.mark.parametrize("offset_learning", [True, False], ids=["ol", "baseline"])
def test_reduced_model_reproduces_official_outputs(offset_learning: bool) -> None:
    model, vec = _reduced(offset_learning)
    ref = vec if offset_learning else load_vector("mask2former_swin_reduced")
    image = vec["input.image"]
    bar = TOLERANCE["mask2former"]
    with torch.no_grad():
        feats = model.backbone(image)
        for i, feat in enumerate(feats):
            assert_close(feat, vec[f"intermediate.backbone.{i}"], bar, f"backbone feature {i}")
        mask_features, memories = model.decode_head.pixel_decoder(feats)
        # The pixel decoder is shared by both heads (same weights), so the stored intermediates apply to both.
        assert_close(mask_features, vec["intermediate.pixel_decoder.mask_features"], bar, "mask features")
        assert len(memories) == 3
        for i, memory in enumerate(memories):
            assert_close(memory, vec[f"intermediate.pixel_decoder.multi_scale_memorys.{i}"], bar, f"memory {i}")
        all_cls_scores, all_mask_preds = model.forward_logits(image)
    assert len(all_cls_scores) == len(all_mask_preds) == NUM_LAYERS_REDUCED + 1
    for i, (cls_scores, mask_preds) in enumerate(zip(all_cls_scores, all_mask_preds, strict=True)):
        assert_close(cls_scores, ref[f"output.all_cls_scores.{i}"], bar, f"all_cls_scores.{i}")
        assert_close(mask_preds, ref[f"output.all_mask_preds.{i}"], bar, f"all_mask_preds.{i}")


def test_reduced_ol_semantic_scores_match_official_predict() -> None:
    model, vec = _reduced(True)
    image = vec["input.image"]
    bar = TOLERANCE["mask2former_seg_logits"]
    with torch.no_grad():
        seg = model(image)
        assert_close(seg, vec["output.seg_logits"], bar, "model(x)")
        assert_close(
            model.decode_head.predict(model.backbone(image), image.shape[-2:]),
            vec["output.seg_logits"],
            bar,
            "decode_head.predict",
        )
        # From the stored last prediction alone: the predict() formula itself.
        from_ref = semantic_scores(vec["output.all_cls_scores.3"], vec["output.all_mask_preds.3"], image.shape[-2:])
    assert_close(from_ref, vec["output.seg_logits"], bar, "semantic_scores of the reference outputs")


def test_baseline_and_ol_differ_only_in_the_head() -> None:
    baseline, _ = _reduced(False)
    ol, _ = _reduced(True)
    assert {k for k in ol.state_dict() if k not in baseline.state_dict()} == {
        "decode_head.offset_learning.cls_offset_proj.weight",
        "decode_head.offset_learning.feat_offset_proj.weight",
    }


def test_offset_learning_mask_module_vector() -> None:
    vec = load_vector("offset_learning_mask_module")
    module = OffsetLearningMask(256)
    module.load_state_dict(vec.weights, strict=True)
    with torch.no_grad():
        mask_embed, mask_features = module(vec["input.mask_embed"], vec["input.mask_features"])
        mask_pred = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
    bar = TOLERANCE["module"]
    assert_close(mask_embed, vec["output.mask_embed"], bar, "aligned mask embeddings")
    assert_close(mask_features, vec["output.mask_features"], bar, "aligned mask features")
    assert_close(mask_pred, vec["output.mask_pred"], bar, "mask_pred")


def test_sine_encoding_matches_detr_formula() -> None:
    h, w, f = 3, 5, 8
    pos = sine_positional_encoding(2, h, w, f)
    assert pos.shape == (2, 2 * f, h, w) and pos.dtype == torch.float32
    # y half first; channel 2j is sin, 2j + 1 cos, both at frequency 10000^(-2j/f).
    i, j, ch = 1, 3, 2
    y = (i + 1) / (h + 1e-6) * 2 * torch.pi
    x = (j + 1) / (w + 1e-6) * 2 * torch.pi
    assert pos[0, ch, i, j].item() == pytest.approx(torch.sin(torch.tensor(y / 10000 ** (ch / f))).item(), abs=1e-6)
    assert pos[0, f + ch + 1, i, j].item() == pytest.approx(
        torch.cos(torch.tensor(x / 10000 ** (ch / f))).item(), abs=1e-6
    )


def test_deformable_sampling_is_bilinear_with_zero_padding() -> None:
    torch.manual_seed(0)
    h, w, d = 4, 6, 3
    value = torch.randn(1, h * w, 1, d)
    grid = value[0, :, 0].T.reshape(d, h, w)
    # Pixel centre (2, 1) exactly, halfway between two centres, and fully outside the map.
    points = torch.tensor([[(2 + 0.5) / w, (1 + 0.5) / h], [(2 + 1.0) / w, (1 + 0.5) / h], [1.5, 1.5]])
    locations = points.view(1, 3, 1, 1, 1, 2)
    out = multi_scale_deformable_attention(value, [(h, w)], locations, torch.ones(1, 3, 1, 1, 1))
    assert torch.allclose(out[0, 0], grid[:, 1, 2], atol=1e-6)
    assert torch.allclose(out[0, 1], 0.5 * (grid[:, 1, 2] + grid[:, 1, 3]), atol=1e-6)
    assert torch.allclose(out[0, 2], torch.zeros(d))


def test_non_square_input_and_batch_consistency() -> None:
    model, vec = _reduced(True)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 160)  # every Swin stage pads (24x40, 12x20, 6x10, 3x5)
    with torch.no_grad():
        seg = model(x)
        all_cls_scores, all_mask_preds = model.forward_logits(x)
        single = model(x[1:])
    assert seg.shape == (2, 150, 96, 160)
    assert all_cls_scores[-1].shape == (2, 10, 151) and all_mask_preds[-1].shape == (2, 10, 24, 40)
    assert torch.allclose(seg[1:], single, atol=1e-5)
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 100, 128))


@pytest.mark.parametrize("offset_learning", [True, False], ids=["ol", "baseline"])
def test_training_step_reaches_every_parameter(offset_learning: bool) -> None:
    torch.manual_seed(0)
    model = offseg.create_model(NAMES[offset_learning], num_classes=5, **MASK2FORMER_REDUCED).train()
    x = torch.randn(2, 3, 64, 64)
    all_cls_scores, all_mask_preds = model.forward_train_outputs(x)
    assert all_cls_scores[0].shape == (2, 10, 6) and all_mask_preds[0].shape == (2, 10, 16, 16)
    loss = sum(c.logsumexp(-1).mean() for c in all_cls_scores) + sum(m.sigmoid().mean() for m in all_mask_preds)
    loss = loss + model(x).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:10]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("offset_learning", [False, True], ids=["baseline", "ol"])
def test_full_size_forward_512(offset_learning: bool) -> None:
    model = offseg.create_model(NAMES[offset_learning], num_classes=150).eval()
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        all_cls_scores, all_mask_preds = model.forward_logits(x)
        seg = model(x)
    assert len(all_cls_scores) == 10
    assert all_cls_scores[-1].shape == (1, 100, 151) and all_mask_preds[-1].shape == (1, 100, 128, 128)
    assert seg.shape == (1, 150, 512, 512) and torch.isfinite(seg).all()
