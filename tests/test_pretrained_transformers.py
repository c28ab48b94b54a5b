"""MiT weights from Hugging Face transformers, checked against transformers itself.

transformers 5 renamed the SegFormer encoder (`stages.N.blocks.M.layernorm_before`,
`attention.q_proj` / `k_proj` / `v_proj` / `o_proj`, ...). A random SegFormer encoder of MiT-B0's
shape is built with the installed transformers; our MiT loads its state dict and must give the
same four hidden states. The 4.x names are checked through transformers 5's own rename table: a
4.x-named file is loaded by `from_pretrained`, which converts the names itself, and must give the
same encoder as the one it was made from. transformers is a dev requirement only.
"""

import re

import pytest
import torch

import offseg
from offseg.pretrained import load_backbone_weights, mit_release_format

transformers = pytest.importorskip("transformers", reason="transformers (requirements-dev.txt) is not installed")


def _b0_encoder(seed: int):
    """transformers' SegformerModel with MiT-B0's widths and depths, every float tensor moved off
    its initial value (norms included), in eval mode."""
    config = transformers.SegformerConfig(
        hidden_sizes=[32, 64, 160, 256],
        depths=[2, 2, 2, 2],
        num_attention_heads=[1, 2, 5, 8],
        sr_ratios=[8, 4, 2, 1],
        patch_sizes=[7, 3, 3, 3],
        strides=[4, 2, 2, 2],
        mlp_ratios=[4, 4, 4, 4],
        drop_path_rate=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.SegformerModel(config).eval()
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.05 * torch.randn_like(value))
    return model


def _hidden_states(model, image: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model(pixel_values=image, output_hidden_states=True).hidden_states)


def _our_features(state: dict[str, torch.Tensor], image: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(1)
    model = offseg.create_model("segformer-b0", num_classes=4)
    report = load_backbone_weights(model, state)
    assert not report.new, report.new  # every tensor of our encoder came from the file
    with torch.no_grad():
        return model.backbone.eval()(image)


def _assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs) == 4
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.shape == b.shape, i
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), i


def test_mit_reads_transformers5_names_and_matches_its_encoder():
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"transformers {transformers.__version__} uses the 4.x names")
    encoder = _b0_encoder(0)
    image = torch.randn(1, 3, 64, 96)
    expected = _hidden_states(encoder, image)
    state = encoder.state_dict()
    assert any(".layernorm_before." in k for k in state) and any(".attention.q_proj." in k for k in state)
    assert mit_release_format(state) == "transformers5"
    _assert_same(_our_features(state, image), expected)
    # as SegformerForImageClassification / ForSemanticSegmentation save it: 'segformer.' + a head
    prefixed = {f"segformer.{k}": v for k, v in state.items()}
    prefixed["classifier.weight"] = torch.zeros(1000, 256)
    _assert_same(_our_features(prefixed, image), expected)


# transformers 4.x names from 5.x ones (the reverse of transformers 5's SegformerModel rename table).
_TO_4X = [
    (r"^stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
    (r"^stages\.(\d+)\.blocks\.", r"encoder.block.\1."),
    (r"^stages\.(\d+)\.layer_norm\.", r"encoder.layer_norm.\1."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
]


def test_mit_reads_transformers4_names_as_transformers_itself_converts_them(tmp_path):
    from safetensors.torch import save_file

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"transformers {transformers.__version__} has no rename table to check against")
    encoder = _b0_encoder(2)
    image = torch.randn(1, 3, 64, 64)
    expected = _hidden_states(encoder, image)
    legacy = {}
    for key, value in encoder.state_dict().items():
        for pattern, template in _TO_4X:
            key = re.sub(pattern, template, key)
        legacy[key] = value.contiguous()
    assert mit_release_format(legacy) == "huggingface"
    # transformers reads the 4.x file with its own rename table: the names above are what it expects.
    encoder.config.save_pretrained(tmp_path)
    save_file(legacy, str(tmp_path / "model.safetensors"))
    reloaded, info = transformers.SegformerModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _assert_same(_hidden_states(reloaded.eval(), image), expected)
    _assert_same(_our_features(legacy, image), expected)
