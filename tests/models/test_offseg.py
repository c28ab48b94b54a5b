"""OffSeg-T/B/L: state dicts identical to the official checkpoints, outputs identical to the
official model, and usable at any size that is a multiple of 32."""

import pytest
import torch

import offseg
from offseg.models.backbones.efficientformer_v2 import EfficientFormerV2
from reference import TOLERANCE, assert_close, assert_manifest, load_vector


@pytest.mark.parametrize("size", ["t", "b", "l"])
def test_state_dict_matches_official_manifest(size):
    assert_manifest(offseg.create_model(f"offseg-{size}"), f"offseg_{size}")


def test_efficientformerv2_s1_backbone_vector():
    vec = load_vector("efficientformerv2_s1_backbone")
    backbone = EfficientFormerV2("s1")
    backbone.load_state_dict(vec.weights, strict=True)
    backbone.eval()
    with torch.no_grad():
        feats = backbone(vec["input.image"])
    for i, feat in enumerate(feats):
        assert_close(feat, vec[f"output.feat{i}"], TOLERANCE["model"], f"feat{i}")


def test_offseg_t_vector():
    vec = load_vector("offseg_t")
    model = offseg.create_model("offseg-t")
    offseg.load_checkpoint(model, vec.weights)
    model.eval()
    with torch.no_grad():
        feats = model.backbone(vec["input.image"])
        logits = model.decode_head(feats)
        resized = model(vec["input.image"])
    for i, feat in enumerate(feats):
        assert_close(feat, vec[f"intermediate.backbone.{i}"], TOLERANCE["model"], f"backbone.{i}")
    assert_close(logits, vec["output.logits"], TOLERANCE["model"], "logits")
    assert_close(resized, vec["output.logits_resized"], TOLERANCE["model"], "logits_resized")


def test_attention_bias_is_identity_at_512_and_resized_elsewhere():
    backbone = EfficientFormerV2("s1")
    attn = backbone.network[4][-1].token_mixer
    with torch.no_grad():
        attn.attention_biases_seg.normal_()
    table = attn.attention_biases_seg[:, attn.attention_bias_idxs_seg]
    assert torch.equal(attn.position_bias(256, 256)[0], table)
    assert attn.position_bias(16, 16).shape == (1, 8, 16, 16)


@pytest.mark.parametrize("name", ["offseg-t", "offseg-t-pixel", "offseg-t-co", "offseg-t-fo"])
def test_variants_train_and_eval_any_multiple_of_32(name):
    torch.manual_seed(0)
    model = offseg.create_model(name, num_classes=7)
    x = torch.randn(2, 3, 96, 160)
    model.train()
    out = model(x)
    assert out.shape == (2, 7, 96, 160)
    out.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "conv_seg" not in n or name.endswith("pixel")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7, 64, 64)
        assert model.forward_logits(x).shape == (2, 7, 24, 40)


def test_batch_equals_single_images():
    torch.manual_seed(0)
    model = offseg.create_model("offseg-t").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[:1]), model(x[1:])])
    assert_close(batched, single, 1e-4, "batch vs single")


@pytest.mark.parametrize("shape", [(1, 3, 100, 64), (1, 3, 64, 48), (3, 64, 64), (1, 1, 64, 64)])
def test_bad_input_sizes_raise_clear_errors(shape):
    model = offseg.create_model("offseg-t")
    with pytest.raises(ValueError, match="multiples of 32|RGB"):
        model(torch.randn(*shape))


def test_backbone_batchnorm_trains_by_default_and_freezes_on_request():
    model = offseg.create_model("offseg-t").train()
    bn = model.backbone.patch_embed[1]
    assert bn.training
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, bn.running_mean)  # statistics updated, as in the paper's runs
    frozen = offseg.create_model("offseg-t", freeze_bn=True).train()
    assert not frozen.backbone.patch_embed[1].training
    assert frozen.decode_head.training


def test_registry_lists_and_rejects():
    names = offseg.list_models("offseg")
    assert {"offseg-t", "offseg-b", "offseg-l", "offseg-t-pixel", "offseg-t-co", "offseg-t-fo"} <= set(names)
    with pytest.raises(KeyError, match="unknown model"):
        offseg.create_model("offseg-xl")


def test_unused_conv_seg_in_offset_learning_heads():
    # conv_seg exists (official checkpoints and parameter counts include it) but takes no part.
    model = offseg.create_model("offseg-t", num_classes=5)
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert model.decode_head.conv_seg.weight.grad is None
    assert model.decode_head.offset_learning.cls_repr.grad is not None
