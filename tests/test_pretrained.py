"""ImageNet backbone initialisation from the release namings of EfficientFormerV2, MiT, MSCAN and Swin.

Each test writes a checkpoint in a release's naming, produced from a model's own backbone state
dict with the inverse of the documented key mapping (written here independently of the
converters), loads it into a fresh model and checks that every backbone tensor arrives bit for bit
and that the classification head is reported unused.
"""

import re

import pytest
import torch

import offseg
from offseg.checkpoint import CheckpointError
from offseg.pretrained import (
    convert_mit,
    convert_mscan,
    convert_swin,
    load_backbone_weights,
    mit_release_format,
    swin_release_format,
)


def _perturbed_backbone_state(model_name: str) -> dict[str, torch.Tensor]:
    """A backbone state dict whose float tensors differ from any fresh initialisation."""
    torch.manual_seed(0)
    backbone = offseg.create_model(model_name, num_classes=4).backbone
    state = {}
    for key, value in backbone.state_dict().items():
        if value.is_floating_point():
            value = value + 0.01 * torch.randn_like(value) + 0.5
        state[key] = value.clone()
    return state


def _fresh_model(model_name: str):
    torch.manual_seed(123)
    return offseg.create_model(model_name, num_classes=4)


def _assert_loaded(model, reference: dict[str, torch.Tensor], keys) -> None:
    own = model.backbone.state_dict()
    for key in keys:
        assert torch.equal(own[key], reference[key]), key


# --- EfficientFormerV2 ---------------------------------------------------------------------------


def test_efficientformer_v2_release(tmp_path):
    source = _perturbed_backbone_state("offseg-t")
    # The ImageNet release has the legacy 224-pixel bias tables but not the segmentation ones, and a
    # classifier: final BN, head and distillation head.
    release = {k: v for k, v in source.items() if "_seg" not in k}
    release.update(
        {
            "norm.weight": torch.ones(224),
            "norm.bias": torch.zeros(224),
            "norm.running_mean": torch.zeros(224),
            "norm.running_var": torch.ones(224),
            "norm.num_batches_tracked": torch.tensor(0),
            "head.weight": torch.randn(1000, 224),
            "head.bias": torch.zeros(1000),
            "dist_head.weight": torch.randn(1000, 224),
            "dist_head.bias": torch.zeros(1000),
        }
    )
    path = tmp_path / "eformer_s1_450.pth"
    torch.save({"model": release}, path)

    model = _fresh_model("offseg-t")
    report = load_backbone_weights(model, path)
    _assert_loaded(model, source, [k for k in source if "_seg" not in k])
    assert set(report.loaded) == {k for k in source if "_seg" not in k}
    assert set(report.unused) == {k for k in release if k.split(".")[0] in ("norm", "head", "dist_head")}
    assert report.new and all("attention_bias" in k and k.endswith("_seg") for k in report.new)
    assert "unused" in str(report) and "dist_head" in str(report)


# --- MiT -----------------------------------------------------------------------------------------


def _mit_to_segformer_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> the NVlabs SegFormer release (stages from 1, separate q and kv Linears)."""
    out = {}
    for key, value in state.items():
        stage, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", key).groups()
        s = int(stage) + 1
        if rest.startswith("0.projection."):
            out[f"patch_embed{s}.proj.{rest[len('0.projection.') :]}"] = value
        elif rest.startswith("0.norm."):
            out[f"patch_embed{s}.norm.{rest[len('0.norm.') :]}"] = value
        elif rest.startswith("2."):
            out[f"norm{s}.{rest[2:]}"] = value
        else:
            block, inner = re.fullmatch(r"1\.(\d+)\.(.+)", rest).groups()
            prefix = f"block{s}.{block}."
            if inner.startswith("attn.attn.in_proj_"):
                kind = inner.rsplit("_", 1)[1]
                width = value.shape[0] // 3
                out[prefix + f"attn.q.{kind}"] = value[:width]
                out[prefix + f"attn.kv.{kind}"] = value[width:]
            elif inner.startswith("attn.attn.out_proj."):
                out[prefix + "attn.proj." + inner.rsplit(".", 1)[1]] = value
            elif inner.startswith("ffn.layers."):
                index, kind = inner[len("ffn.layers.") :].split(".")
                name = {"0": "mlp.fc1", "1": "mlp.dwconv.dwconv", "4": "mlp.fc2"}[index]
                if index in "04" and kind == "weight":
                    value = value.flatten(1)  # the release's fc1 / fc2 are nn.Linear
                out[prefix + f"{name}.{kind}"] = value
            else:  # norm1, norm2, attn.sr, attn.norm keep their names
                out[prefix + inner] = value
    out["head.weight"] = torch.randn(1000, 256)
    out["head.bias"] = torch.zeros(1000)
    return out


def _mit_to_huggingface(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> transformers' SegformerForImageClassification (stages from 0, q / k / v Linears)."""
    out = {}
    for key, value in state.items():
        stage, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", key).groups()
        enc = "segformer.encoder."
        if rest.startswith("0.projection."):
            out[f"{enc}patch_embeddings.{stage}.proj.{rest.split('.')[-1]}"] = value
        elif rest.startswith("0.norm."):
            out[f"{enc}patch_embeddings.{stage}.layer_norm.{rest.split('.')[-1]}"] = value
        elif rest.startswith("2."):
            out[f"{enc}layer_norm.{stage}.{rest[2:]}"] = value
        else:
            block, inner = re.fullmatch(r"1\.(\d+)\.(.+)", rest).groups()
            prefix = f"{enc}block.{stage}.{block}."
            kind = inner.rsplit(".", 1)[1]
            if inner.startswith("attn.attn.in_proj_"):
                kind = inner.rsplit("_", 1)[1]
                for name, part in zip(("query", "key", "value"), value.chunk(3), strict=True):
                    out[prefix + f"attention.self.{name}.{kind}"] = part
            elif inner.startswith("attn.attn.out_proj."):
                out[prefix + f"attention.output.dense.{kind}"] = value
            elif inner.startswith("attn.sr."):
                out[prefix + f"attention.self.sr.{kind}"] = value
            elif inner.startswith("attn.norm."):
                out[prefix + f"attention.self.layer_norm.{kind}"] = value
            elif inner.startswith(("norm1.", "norm2.")):
                out[prefix + f"layer_norm_{inner[4]}.{kind}"] = value
            elif inner.startswith("ffn.layers."):
                index = inner.split(".")[2]
                name = {"0": "mlp.dense1", "1": "mlp.dwconv.dwconv", "4": "mlp.dense2"}[index]
                if index in "04" and kind == "weight":
                    value = value.flatten(1)
                out[prefix + f"{name}.{kind}"] = value
            else:
                raise AssertionError(f"unmapped key {key}")
    out["classifier.weight"] = torch.randn(1000, 256)
    out["classifier.bias"] = torch.zeros(1000)
    return out


def test_mit_segformer_release(tmp_path):
    source = _perturbed_backbone_state("segformer-b0")
    release = _mit_to_segformer_release(source)
    assert mit_release_format(release) == "segformer"
    path = tmp_path / "mit_b0.pth"
    torch.save(release, path)

    model = _fresh_model("segformer-b0")
    report = load_backbone_weights(model, path)
    assert set(report.loaded) == set(source) and not report.new
    assert report.unused == ["head.bias", "head.weight"]
    _assert_loaded(model, source, source)


def test_mit_mmseg_names_load_as_they_are(tmp_path):
    source = _perturbed_backbone_state("segformer-b0")
    path = tmp_path / "mit_b0_mmseg.pth"
    torch.save({"state_dict": {**source, "head.weight": torch.randn(1000, 256)}}, path)
    model = _fresh_model("segformer-b0")
    report = load_backbone_weights(model, path)
    assert set(report.loaded) == set(source) and report.unused == ["head.weight"]
    _assert_loaded(model, source, source)


def test_mit_huggingface_names(tmp_path):
    from safetensors.torch import save_file

    source = _perturbed_backbone_state("segformer-b0-ol")
    hf = _mit_to_huggingface(source)
    assert mit_release_format(hf) == "huggingface"
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.items()}, str(path))

    model = _fresh_model("segformer-b0-ol")
    report = load_backbone_weights(model, path)
    assert set(report.loaded) == set(source) and not report.new
    assert report.unused == ["classifier.bias", "classifier.weight"]
    _assert_loaded(model, source, source)

    # the encoder saved without the 'segformer.' prefix (SegformerModel) converts the same way
    bare = {k.replace("segformer.", "", 1): v for k, v in hf.items()}
    assert set(convert_mit(bare)) == set(convert_mit(hf))


def test_mit_incomplete_attention_projection_is_reported_not_guessed():
    source = _perturbed_backbone_state("segformer-b0")
    release = _mit_to_segformer_release(source)
    del release["block1.0.attn.kv.weight"]
    converted = convert_mit(release)
    assert "block1.0.attn.q.weight" in converted  # left under its release name: reported unused
    assert "layers.0.1.0.attn.attn.in_proj_weight" not in converted
    assert "layers.0.1.0.attn.attn.in_proj_bias" in converted


def test_wrong_backbone_is_refused(tmp_path):
    path = tmp_path / "mit_b0.pth"
    torch.save(_mit_to_segformer_release(_perturbed_backbone_state("segformer-b0")), path)
    with pytest.raises(CheckpointError, match="no tensor fits EfficientFormerV2"):
        load_backbone_weights(_fresh_model("offseg-t"), path)
    torch.save(_perturbed_backbone_state("segformer-b1"), path)  # same names, wider
    with pytest.raises(CheckpointError, match="shapes do not fit"):
        load_backbone_weights(_fresh_model("segformer-b0"), path)


# --- MSCAN ---------------------------------------------------------------------------------------


def test_mscan_release_names_convert():
    release = {
        "patch_embed1.proj.0.weight": torch.zeros(1),
        "block1.0.mlp.dwconv.dwconv.weight": torch.ones(1),
        "block4.2.mlp.dwconv.dwconv.bias": torch.ones(2),
        "block1.0.mlp.fc1.weight": torch.zeros(2),
        "head.weight": torch.zeros(3),
    }
    assert set(convert_mscan(release)) == {
        "patch_embed1.proj.0.weight",
        "block1.0.mlp.dwconv.weight",
        "block4.2.mlp.dwconv.bias",
        "block1.0.mlp.fc1.weight",
        "head.weight",
    }
    mmseg = convert_mscan(release)
    assert convert_mscan(mmseg) == mmseg  # MMSegmentation's names pass unchanged


@pytest.mark.skipif("segnext-t" not in offseg.list_models(), reason="SegNeXt not registered yet")
def test_mscan_segnext_release(tmp_path):
    source = _perturbed_backbone_state("segnext-t")
    model = _fresh_model("segnext-t")
    assert type(model.backbone).__name__ == "MSCAN"
    release = {re.sub(r"\.mlp\.dwconv\.", ".mlp.dwconv.dwconv.", k): v for k, v in source.items()}
    assert release.keys() != source.keys()
    release.update({"head.weight": torch.randn(1000, 256), "head.bias": torch.zeros(1000)})
    path = tmp_path / "mscan_t.pth"
    torch.save({"state_dict": release}, path)
    report = load_backbone_weights(model, path)
    assert set(report.loaded) == set(source) and not report.new
    assert report.unused == ["head.bias", "head.weight"]
    _assert_loaded(model, source, source)


# --- Swin ----------------------------------------------------------------------------------------
# A small Mask2Former Swin (the reference vectors' reduced configuration). The Microsoft release is
# written from our key names with the inverse of the documented mapping; its patch-merging tensors
# are random and are checked through a re-implementation of the Microsoft PatchMerging forward.


def _swin_model():
    from offseg.models.mask2former import MASK2FORMER_REDUCED

    torch.manual_seed(123)
    return offseg.create_model("mask2former-swin-t", num_classes=4, **MASK2FORMER_REDUCED)


def _swin_to_microsoft_name(key: str) -> str | None:
    """Our backbone key -> the Microsoft release's, None for the per-stage output norms."""
    if re.fullmatch(r"norm\d\..+", key):
        return None
    key = key.replace("patch_embed.projection.", "patch_embed.proj.")
    for ours, theirs in (
        (".attn.w_msa.", ".attn."),
        (".ffn.layers.0.0.", ".mlp.fc1."),
        (".ffn.layers.1.", ".mlp.fc2."),
    ):
        key = key.replace(ours, theirs)
    return re.sub(r"^stages\.", "layers.", key)


def _microsoft_relative_position_index(window: int) -> torch.Tensor:
    """The release's index table: (dy + w - 1) * (2w - 1) + (dx + w - 1) over token pairs."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :] + window - 1) * (2 * window - 1) + (xs[:, None] - xs[None, :] + window - 1)


def _microsoft_patch_merging(x: torch.Tensor, hw, norm_weight, norm_bias, reduction) -> torch.Tensor:
    """microsoft/Swin-Transformer PatchMerging.forward (even sides): the four pixels of each 2x2
    neighbourhood concatenated as [x(0,0), x(1,0), x(0,1), x(1,1)], then LayerNorm and Linear."""
    b, _, c = x.shape
    x = x.view(b, *hw, c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
    x = torch.nn.functional.layer_norm(x, (4 * c,), norm_weight, norm_bias)
    return x @ reduction.t()


def _swin_microsoft_release() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(release state dict, our key -> the release tensor it should arrive as, outside patch merging)."""
    torch.manual_seed(1)
    own = _swin_model().backbone.state_dict()
    release, expected = {}, {}
    for key, value in own.items():
        name = _swin_to_microsoft_name(key)
        if name is None:
            continue
        if key.endswith("relative_position_index"):
            release[name] = _microsoft_relative_position_index(7)
            continue
        release[name] = torch.randn_like(value) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0)
        if ".downsample." not in key:
            expected[key] = release[name]
    # what else the release holds: shifted-window masks of the 224-pixel model, final norm, classifier
    release["layers.2.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
    release["norm.weight"], release["norm.bias"] = torch.ones(256), torch.zeros(256)
    release["head.weight"], release["head.bias"] = torch.randn(1000, 256), torch.zeros(1000)
    return release, expected


def test_swin_release_format():
    release, _ = _swin_microsoft_release()
    assert swin_release_format(release) == "microsoft"
    converted = convert_swin(release)
    assert swin_release_format(converted) == "mmseg"
    assert convert_swin(converted) == converted  # MMSegmentation's names pass unchanged
    assert not any("attn_mask" in k or k.startswith("head.") for k in converted)


def test_swin_microsoft_release(tmp_path):
    release, expected = _swin_microsoft_release()
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": release}, path)

    model = _swin_model()
    backbone = model.backbone
    own_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    report = load_backbone_weights(model, path)

    own = backbone.state_dict()
    merging = {k for k in own if ".downsample." in k}
    output_norms = {k for k in own if re.fullmatch(r"norm\d\..+", k)}
    index_tables = {k for k in own if k.endswith("relative_position_index")}
    assert set(report.loaded) == set(own) - output_norms
    assert set(report.new) == output_norms  # the per-stage output norms only
    assert report.unused == ["norm.bias", "norm.weight"]  # head and masks are dropped
    _assert_loaded(model, expected, expected)
    for key in output_norms:
        assert torch.equal(own[key], own_before[key]), key
    for key in index_tables:  # the release's index tables are the ones we build
        assert torch.equal(own_before[key], release[_swin_to_microsoft_name(key)]), key

    # the re-ordered patch merging computes what the release's does
    assert len(merging) == 3 * 3
    torch.manual_seed(2)
    for i, stage in enumerate(backbone.stages[:-1]):
        c = backbone.out_channels[i]
        x = torch.randn(2, 6 * 10, c)
        ours, hw = stage.downsample(x, (6, 10))
        theirs = _microsoft_patch_merging(
            x,
            (6, 10),
            release[f"layers.{i}.downsample.norm.weight"],
            release[f"layers.{i}.downsample.norm.bias"],
            release[f"layers.{i}.downsample.reduction.weight"],
        )
        assert hw == (3, 5)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        # without the re-ordering the outputs differ: the test does see the channel order
        assert not torch.allclose(
            stage.downsample.reduction(
                stage.downsample.norm(
                    torch.cat(
                        [x.view(2, 6, 10, c)[:, dy::2, dx::2] for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1))], -1
                    ).view(2, -1, 4 * c)
                )
            ),
            ours,
            atol=1e-3,
        )


def test_swin_mmseg_names_load_as_they_are(tmp_path):
    source = {
        k: v + 0.01 * torch.randn_like(v) + 0.5 if v.is_floating_point() else v.clone()
        for k, v in _swin_model().backbone.state_dict().items()
    }
    segmentor = {f"backbone.{k}": v for k, v in source.items()}
    segmentor["decode_head.cls_embed.weight"] = torch.randn(5, 64)
    path = tmp_path / "swin_tiny_mmseg.pth"
    torch.save({"meta": {}, "state_dict": segmentor}, path)

    fresh = _swin_model()
    report = load_backbone_weights(fresh, path)
    assert set(report.loaded) == set(source) and not report.new and not report.unused
    _assert_loaded(fresh, source, source)
