"""SegFormer-B0..B5 with the per-pixel and the Offset-Learning heads: official state-dict layout,
numerical equivalence with the official B0-OL, the paper's parameter counts, and a training step
for every size."""

from __future__ import annotations

import pytest
import torch
from modelhelpers import check_train_step

import offseg
from offseg.flops import count_parameters
from reference import TOLERANCE, assert_close, assert_manifest, load_vector

SIZES = ("b0", "b1", "b2", "b3", "b4", "b5")

# SPEC §2 (paper, 150 classes), millions of parameters: (per-pixel, Offset Learning).
PAPER_PARAMS_M = {
    "b0": (3.8, 3.9),
    "b1": (13.7, 13.9),
    "b2": (24.8, 24.9),
    "b3": (44.6, 44.8),
    "b4": (61.4, 61.6),
    "b5": (82.0, 82.2),
}


@pytest.mark.parametrize(
    "name, manifest", [("segformer-b0", "segformer_b0"), ("segformer-b0-ol", "segformer_b0_offset_learning")]
)
def test_state_dict_matches_official_manifest(name: str, manifest: str) -> None:
    assert_manifest(offseg.create_model(name, num_classes=150), manifest)


def test_b0_offset_learning_reproduces_official_outputs() -> None:
    vec = load_vector("segformer_b0_offset_learning")
    model = offseg.create_model("segformer-b0-ol", num_classes=150)
    model.load_state_dict(vec.weights, strict=True)
    model.eval()
    image = vec["input.image"]
    with torch.no_grad():
        features = model.backbone(image)
        assert len(features) == 4
        for i, feat in enumerate(features):
            assert_close(feat, vec[f"intermediate.backbone.{i}"], TOLERANCE["model"], f"backbone feature {i}")
        assert_close(model.decode_head(features), vec["output.logits"], TOLERANCE["model"], "logits")
        assert_close(model.forward_logits(image), vec["output.logits"], TOLERANCE["model"], "forward_logits")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("offset_learning", [False, True], ids=["pixel", "ol"])
def test_parameter_count_matches_paper(size: str, offset_learning: bool) -> None:
    name = f"segformer-{size}{'-ol' if offset_learning else ''}"
    count = count_parameters(offseg.create_model(name, num_classes=150)) / 1e6
    paper = PAPER_PARAMS_M[size][int(offset_learning)]
    assert abs(count - paper) <= 0.1, f"{name}: {count:.3f} M vs paper {paper} M"
    assert round(count, 1) == paper, f"{name}: {count:.3f} M does not round to the paper's {paper} M"


def _logits_size(offset_learning: bool) -> tuple[int, int]:
    return (8, 8) if offset_learning else (16, 16)  # of a 64² input: 1/8 with OL, 1/4 without


@pytest.mark.parametrize("offset_learning", [False, True], ids=["pixel", "ol"])
def test_b0_forward_backward(offset_learning: bool) -> None:
    check_train_step(f"segformer-b0{'-ol' if offset_learning else ''}", _logits_size(offset_learning), offset_learning)


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES[1:])
@pytest.mark.parametrize("offset_learning", [False, True], ids=["pixel", "ol"])
def test_forward_backward_all_sizes(size: str, offset_learning: bool) -> None:
    check_train_step(
        f"segformer-{size}{'-ol' if offset_learning else ''}", _logits_size(offset_learning), offset_learning
    )


def test_all_twelve_registered() -> None:
    expected = {f"segformer-{s}{suffix}" for s in SIZES for suffix in ("", "-ol")}
    assert expected <= set(offseg.list_models("segformer"))


def test_stochastic_depth_schedule() -> None:
    model = offseg.create_model("segformer-b0")
    rates = [block.drop_path.drop_prob for stage in model.backbone.layers for block in stage[1]]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 8).tolist())
    model = offseg.create_model("segformer-b0", drop_path_rate=0.0)
    assert all(block.drop_path.drop_prob == 0.0 for stage in model.backbone.layers for block in stage[1])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match="drop_path"):
        offseg.create_model("segformer-b0", drop_path=0.2)
    with pytest.raises(ValueError, match="num_classes"):
        offseg.create_model("segformer-b0-ol", num_classes=0)
    model = offseg.create_model("segformer-b0")
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="expected 4 feature maps"):
        model.decode_head(model.backbone(torch.randn(1, 3, 64, 64))[:3])
