"""Backbone weights in timm's names: EfficientFormerV2 (S0/S1/S2/L) and Swin.

The two reference vectors `timm_efficientformerv2_s1` and `timm_swin_reduced` were made with timm
itself (weights in timm's state-dict names, timm's own stage outputs); loading them must reproduce
those features. The other EfficientFormerV2 sizes have no vector: their state dicts are renamed
to timm's names by the inverse mapping (written here from timm's module layout, independently of
the converter) and must load back bit for bit.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from offseg.models.backbones.efficientformer_v2 import EfficientFormerV2
from offseg.models.backbones.swin import SwinTransformer
from offseg.pretrained import efficientformer_v2_release_format, load_backbone_weights, swin_release_format
from reference import require_reference


def _timm_vector(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights in timm's names as float32, the input and outputs) of a timm reference vector."""
    path = require_reference() / "vectors" / f"{name}.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not found (timm reference vectors are newer than this copy of the reference data)")
    tensors = load_file(str(path))
    weights = {
        k[len("weights.") :]: v.float() if v.is_floating_point() else v
        for k, v in tensors.items()
        if k.startswith("weights.")
    }
    return weights, {k: v for k, v in tensors.items() if not k.startswith("weights.")}


def _assert_features(outputs: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for i, (out, ref) in enumerate(zip(outputs, expected, strict=True)):
        assert out.shape == ref.shape, i
        bar = 1e-4 * max(1.0, ref.abs().max().item())  # the README's bar (float32 round-off)
        assert (out - ref).abs().max().item() <= bar, f"stage {i}: {(out - ref).abs().max().item():.2e} > {bar:.1e}"


def test_timm_efficientformerv2_s1_gives_timm_features(tmp_path):
    weights, data = _timm_vector("timm_efficientformerv2_s1")
    assert efficientformer_v2_release_format(weights) == "timm"
    path = tmp_path / "efficientformerv2_s1.safetensors"  # as timm / the Hugging Face hub store it
    save_file(weights, str(path))
    torch.manual_seed(0)
    backbone = EfficientFormerV2("s1")
    report = load_backbone_weights(backbone, path)
    assert set(report.unused) == {k for k in weights if k.split(".")[0] in ("norm", "head", "head_dist")}
    # Only the segmentation bias tables (zero) and index buffers are not in a timm file.
    assert report.new and all(re.search(r"attention_bias(es_seg|_idxs|_idxs_seg)$", k) for k in report.new)
    with torch.no_grad():
        features = backbone.eval()(data["input.image"])
    _assert_features(features, [data[f"output.features.{i}"] for i in range(4)])


def test_timm_swin_gives_timm_features_before_the_output_norms():
    weights, data = _timm_vector("timm_swin_reduced")
    assert swin_release_format(weights) == "timm"
    torch.manual_seed(0)
    backbone = SwinTransformer(embed_dims=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7)
    report = load_backbone_weights(backbone, weights)
    assert set(report.unused) == {"norm.weight", "norm.bias"}  # timm's final norm; head.fc is dropped
    assert {k for k in report.new if not k.endswith("relative_position_index")} == {
        f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")
    }
    with torch.no_grad():
        features = backbone.eval()(data["input.image"])
    # Our per-stage output norms are fresh (unit) LayerNorms; apply the same to timm's features.
    expected = []
    for i in range(4):
        ref = data[f"output.features.{i}"]
        expected.append(F.layer_norm(ref.permute(0, 2, 3, 1), (ref.shape[1],)).permute(0, 3, 1, 2))
    _assert_features(features, expected)


# Our EfficientFormerV2 names -> timm's, in order (the first matching rule applies).
_TO_TIMM = [
    (r"patch_embed\.0\.", "stem.conv1.conv."),
    (r"patch_embed\.1\.", "stem.conv1.bn."),
    (r"patch_embed\.3\.", "stem.conv2.conv."),
    (r"patch_embed\.4\.", "stem.conv2.bn."),
]
_BLOCK_TO_TIMM = [
    (r"layer_scale_([12])$", r"ls\1.gamma"),
    (r"mlp\.(fc1|fc2|mid)\.", r"mlp.\1.conv."),
    (r"mlp\.norm1\.", "mlp.fc1.bn."),
    (r"mlp\.mid_norm\.", "mlp.mid.bn."),
    (r"mlp\.norm2\.", "mlp.fc2.bn."),
    (r"(q\.proj|q|k|v|v_local|stride_conv)\.0\.", r"\1.conv."),
    (r"(q\.proj|q|k|v|v_local|stride_conv)\.1\.", r"\1.bn."),
    (r"q\.local\.0\.", "q.local."),
    (r"proj\.1\.", "proj.conv."),
    (r"proj\.2\.", "proj.bn."),
    (r"^(proj|conv)\.", "conv.conv."),  # the downsampling conv (ConvDownsample.proj, AttnDownsample.conv)
    (r"^(norm|bn)\.", "conv.bn."),
]


def _to_timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith(("_seg", "attention_bias_idxs")):
            continue  # not in timm's state dict (the index tables are non-persistent there)
        for pattern, template in _TO_TIMM:
            if re.match(pattern, key):
                key = re.sub(pattern, template, key)
                break
        else:
            index, rest = re.fullmatch(r"network\.(\d+)\.(.+)", key).groups()
            index = int(index)
            if index % 2 == 0:
                block, rest = rest.split(".", 1)
                prefix = f"stages.{index // 2}.blocks.{block}."
            else:
                prefix = f"stages.{(index + 1) // 2}.downsample."
            for pattern, template in _BLOCK_TO_TIMM:
                if re.search(pattern, rest):
                    rest = re.sub(pattern, template, rest, count=1)
                    break
            key = prefix + rest
            if key.endswith(".gamma"):
                value = value.flatten()
        out[key] = value
    out["head.weight"] = torch.zeros(1000, state["network.6.0.mlp.fc2.weight"].shape[0])
    return out


@pytest.mark.parametrize("arch", ["s0", "s2", "l"])
def test_timm_efficientformerv2_names_of_every_size(arch):
    torch.manual_seed(0)
    source = EfficientFormerV2(arch).state_dict()
    source = {k: v + 0.01 * torch.randn_like(v) + 0.5 if v.is_floating_point() else v for k, v in source.items()}
    timm_state = _to_timm_names(source)
    assert efficientformer_v2_release_format(timm_state) == "timm"
    torch.manual_seed(1)
    backbone = EfficientFormerV2(arch)
    report = load_backbone_weights(backbone, timm_state)
    assert report.unused == ["head.weight"]
    own = backbone.state_dict()
    assert set(report.loaded) == {k for k in source if not k.endswith(("_seg", "attention_bias_idxs"))}
    for key in report.loaded:
        assert torch.equal(own[key], source[key]), key
