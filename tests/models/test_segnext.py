"""SegNeXt-T/S/B/L with the LightHam head, per-pixel and with Offset Learning: official state-dict
layout, numerical equivalence with the official T models under the official RNG protocol,
deterministic NMF bases on request, the paper's parameter counts, and a training step."""

from __future__ import annotations

import pytest
import torch
from modelhelpers import check_train_step

import offseg
from offseg.flops import count_parameters
from offseg.models.backbones.mscan import MSCAN
from offseg.models.heads.ham_head import NMF2D
from reference import TOLERANCE, assert_close, assert_manifest, load_vector

SIZES = ("t", "s", "b", "l")
SEED = 1234  # the seed of the reference vectors, set right before the forward

# SPEC §2 (paper, 150 classes), millions of parameters: (per-pixel, Offset Learning). L: the
# SegNeXt paper's 48.9 M; the OffSeg paper has no L row.
PAPER_PARAMS_M = {"t": (4.3, 4.4), "s": (13.9, 14.1), "b": (27.6, 28.2), "l": (48.9, None)}
# What these builders give (the T figures equal the official manifests).
EXACT_PARAMS = {
    "segnext-t": 4_263_414,
    "segnext-t-ol": 4_433_186,
    "segnext-s": 13_932_886,
    "segnext-s-ol": 14_102_658,
    "segnext-b": 27_636_310,
    "segnext-b-ol": 28_237_698,
    "segnext-l": 48_926_550,
    "segnext-l-ol": 51_177_602,
}


def loaded_model(vector_name: str, model_name: str) -> tuple[torch.nn.Module, object]:
    vec = load_vector(vector_name)
    model = offseg.create_model(model_name, num_classes=150)
    model.load_state_dict(vec.weights, strict=True)
    return model.eval(), vec


# --- (a) state-dict layout ----------------------------------------------------------------------


@pytest.mark.parametrize("name, manifest", [("segnext-t", "segnext_t"), ("segnext-t-ol", "segnext_t_offset_learning")])
def test_state_dict_matches_official_manifest(name: str, manifest: str) -> None:
    assert_manifest(offseg.create_model(name, num_classes=150), manifest)


# --- (b) official outputs -----------------------------------------------------------------------


def test_mscan_t_reproduces_official_features() -> None:
    vec = load_vector("mscan_t_backbone")
    backbone = MSCAN("t")
    backbone.load_state_dict(vec.weights, strict=True)
    backbone.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        features = backbone(vec["input.image"])
    assert torch.equal(torch.get_rng_state(), state), "the backbone must not use the RNG in eval mode"
    assert len(features) == 4
    for i, feat in enumerate(features):
        assert_close(feat, vec[f"output.feat{i}"], TOLERANCE["mscan"], f"feature {i}")


@pytest.mark.parametrize(
    "vector_name, model_name", [("segnext_t_offset_learning", "segnext-t-ol"), ("segnext_t", "segnext-t")]
)
def test_seeded_forward_reproduces_official_logits(vector_name: str, model_name: str) -> None:
    model, vec = loaded_model(vector_name, model_name)
    captured = {}
    nmf = model.decode_head.hamburger.ham
    handle = nmf.register_forward_hook(lambda module, args, out: captured.update(nmf_input=args[0], nmf_output=out))
    torch.manual_seed(SEED)
    with torch.no_grad():
        logits = model.forward_logits(vec["input.image"])
    handle.remove()
    after_forward = torch.get_rng_state()
    assert_close(logits, vec["output.logits"], TOLERANCE["segnext"], "logits")
    assert_close(captured["nmf_output"], vec["intermediate.ham.nmf_output"], TOLERANCE["segnext"], "NMF output")

    # Exactly one draw of shape (B, 256, 16) from the global generator, as in the official code.
    torch.manual_seed(SEED)
    bases_rand = torch.rand(1, 256, 16)
    assert torch.equal(after_forward, torch.get_rng_state())
    assert torch.equal(bases_rand, vec["intermediate.ham.bases_rand"])
    torch.manual_seed(SEED)
    assert torch.equal(nmf.random_bases(1, 256), vec["intermediate.ham.bases_init"])

    # Injecting the official initial bases gives the same NMF output, without the RNG.
    with torch.no_grad():
        injected = nmf(captured["nmf_input"], bases=vec["intermediate.ham.bases_init"])
    assert torch.equal(injected, captured["nmf_output"])


def test_integer_seed_reproduces_official_logits_without_global_rng() -> None:
    model, vec = loaded_model("segnext_t_offset_learning", "segnext-t-ol")
    model.decode_head.set_generator(SEED)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with torch.no_grad():
        first = model.forward_logits(vec["input.image"])
        second = model.decode_head(model.backbone(vec["input.image"]))
    assert torch.equal(torch.get_rng_state(), state), "a seeded head must leave the global RNG alone"
    assert torch.equal(first, second)
    assert_close(first, vec["output.logits"], TOLERANCE["segnext"], "logits (nmf seed)")


# --- (c) determinism ----------------------------------------------------------------------------


def _head_and_features(name: str, batch: int = 1, size: tuple[int, int] = (64, 64)):
    """A fresh model's decode head and one set of backbone features: the NMF is the only random
    part, so the determinism tests call the head alone (the backbone is the slow part on CPU)."""
    torch.manual_seed(0)
    model = offseg.create_model(name, num_classes=19).eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(batch, 3, *size))
    return model.decode_head, features


def test_two_seeded_evaluations_agree_bitwise() -> None:
    head, features = _head_and_features("segnext-t-ol", batch=2, size=(64, 96))
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(head(features))
    assert outputs[0].shape == (2, 19, 8, 12)
    assert torch.equal(outputs[0], outputs[1])
    torch.manual_seed(8)
    with torch.no_grad():
        assert not torch.equal(head(features), outputs[0]), "the NMF bases should depend on the seed"


def test_user_generator_gives_deterministic_output() -> None:
    head, features = _head_and_features("segnext-t")
    runs = []
    for _ in range(2):
        head.set_generator(torch.Generator().manual_seed(3))
        torch.manual_seed(int(torch.randint(0, 1000, ())))  # the global RNG must not matter
        with torch.no_grad():
            runs.append([head(features), head(features)])  # the generator advances between calls
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])
    # The generator draws what the global RNG gives for the same seed, and so does an int seed.
    head.set_generator(None)
    torch.manual_seed(3)
    with torch.no_grad():
        assert torch.equal(head(features), runs[0][0])
    built = offseg.create_model("segnext-t", num_classes=19, nmf_seed=3).decode_head
    built.load_state_dict(head.state_dict())
    with torch.no_grad():
        assert torch.equal(built.eval()(features), runs[0][0])


def test_one_draw_per_batch() -> None:
    head, features = _head_and_features("segnext-t", batch=3, size=(32, 32))
    torch.manual_seed(SEED)
    with torch.no_grad():
        head(features)
    after = torch.get_rng_state()
    torch.manual_seed(SEED)
    torch.rand(3, 256, 16)
    assert torch.equal(after, torch.get_rng_state())


def test_nmf_steps_and_bad_arguments() -> None:
    nmf = NMF2D(rank=4)
    x = torch.rand(2, 8, 5, 5)
    bases = torch.nn.functional.normalize(torch.rand(2, 8, 4), dim=1)
    nmf.train()
    trained = nmf(x, bases=bases)
    nmf.eval()
    evaluated = nmf(x, bases=bases)
    assert trained.shape == x.shape and not torch.equal(trained, evaluated)  # 6 vs 7 steps
    assert torch.equal(evaluated, NMF2D(rank=4, train_steps=7)(x, bases=bases))
    with pytest.raises(ValueError, match="initial bases"):
        nmf(x, bases=bases[:, :, :3])
    with pytest.raises(ValueError, match="groups"):
        NMF2D(spatial_groups=3)(x)
    with pytest.raises(TypeError, match="torch.Generator"):
        nmf.set_generator("seed")
    with pytest.raises(ValueError, match="rank"):
        NMF2D(rank=0)
    with pytest.raises(ValueError, match="stage 5 does not exist"):
        MSCAN("t").stage(5, torch.rand(1, 256, 4, 4))


# --- (d) parameter counts -----------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("offset_learning", [False, True], ids=["pixel", "ol"])
def test_parameter_counts(size: str, offset_learning: bool) -> None:
    name = f"segnext-{size}{'-ol' if offset_learning else ''}"
    count = count_parameters(offseg.create_model(name, num_classes=150))
    assert count == EXACT_PARAMS[name]
    paper = PAPER_PARAMS_M[size][int(offset_learning)]
    if paper is not None:
        assert abs(count / 1e6 - paper) <= 0.1, f"{name}: {count / 1e6:.3f} M vs paper {paper} M"
        assert round(count / 1e6, 1) == paper


# --- (e) training step --------------------------------------------------------------------------


@pytest.mark.parametrize("offset_learning", [False, True], ids=["pixel", "ol"])
def test_t_forward_backward(offset_learning: bool) -> None:
    check_train_step(f"segnext-t{'-ol' if offset_learning else ''}", (8, 8), offset_learning)  # 1/8 in both heads


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES[1:])
@pytest.mark.parametrize("offset_learning", [False, True], ids=["pixel", "ol"])
def test_forward_backward_all_sizes(size: str, offset_learning: bool) -> None:
    check_train_step(f"segnext-{size}{'-ol' if offset_learning else ''}", (8, 8), offset_learning)


# --- configuration and errors -------------------------------------------------------------------


def test_all_eight_registered() -> None:
    expected = {f"segnext-{s}{suffix}" for s in SIZES for suffix in ("", "-ol")}
    assert expected <= set(offseg.list_models("segnext"))


def test_stochastic_depth_schedule() -> None:
    model = offseg.create_model("segnext-t")
    blocks = [blk for i in range(1, 5) for blk in getattr(model.backbone, f"block{i}")]
    rates = [getattr(blk.drop_path, "drop_prob", 0.0) for blk in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 13).tolist())
    assert MSCAN("l", drop_path_rate=None).block4[-1].drop_path.drop_prob == pytest.approx(0.3)
    model = offseg.create_model("segnext-t", drop_path_rate=0.0)
    assert all(
        isinstance(blk.drop_path, torch.nn.Identity)
        for i in range(1, 5)
        for blk in getattr(model.backbone, f"block{i}")
    )


def test_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match="drop_path"):
        offseg.create_model("segnext-t", drop_path=0.2)
    with pytest.raises(ValueError, match="num_classes"):
        offseg.create_model("segnext-t-ol", num_classes=0)
    with pytest.raises(ValueError, match="arch"):
        MSCAN("xl")
    model = offseg.create_model("segnext-t")
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.backbone(torch.randn(1, 4, 64, 64))
    features = model.backbone(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="only 3"):
        model.decode_head(features[:3])
    with pytest.raises(ValueError, match="feature map 2"):
        model.decode_head([features[0], features[1], features[1], features[3]])
