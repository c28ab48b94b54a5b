"""FLOP counting (`offseg.flops`) against the reference figures (fvcore and the paper's
Conv2d-only convention, shared/reference/figures.json), formula checks against fvcore itself
when it is installed, and the `offseg info` model card."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import offseg
from offseg.flops import (
    CONVENTIONS,
    FVCORE_OPERATORS,
    count_flops,
    format_model_card,
    model_card,
    trace_flops,
    unused_parameters,
)
from reference import require_reference

# figures.json prints GFLOPs to 4 decimals: agree to that precision.
PRINTED = 0.5e-4 + 1e-9

SIZES = {"flops_512x512_150cls": ((512, 512), 150), "flops_1024x2048_19cls": ((1024, 2048), 19)}

# figures.json model key -> registered model name(s) (the first registered one is used).
MODEL_NAMES = {
    "offseg_t": ["offseg-t"],
    "offseg_b": ["offseg-b"],
    "offseg_l": ["offseg-l"],
    "segformer_b0_offset_learning": ["segformer-b0-ol"],
    "segformer_b0": ["segformer-b0"],
    "segnext_t_offset_learning": ["segnext-t-ol"],
    "segnext_t": ["segnext-t"],
    "mask2former_swin_t_offset_learning": ["mask2former-swin-t-ol", "mask2former-ol"],
    "mask2former_swin_t": ["mask2former-swin-t", "mask2former"],
}


def figures(key: str) -> dict:
    data = json.loads((require_reference() / "figures.json").read_text())
    return data["models"][key]


def registered(key: str) -> str:
    for name in MODEL_NAMES[key]:
        if name in offseg.list_models():
            return name
    pytest.skip(f"{key}: model {MODEL_NAMES[key][0]} is not registered yet")


def assert_g(flops: float, ref_g: float, what: str, tol: float = PRINTED) -> None:
    assert abs(flops / 1e9 - ref_g) <= tol, f"{what}: ours {flops / 1e9:.6f} G, reference {ref_g} G"


def check_against_figures(model: nn.Module, ref: dict, size: tuple[int, int], label: str) -> None:
    trace = trace_flops(model, size)
    assert trace.device == "meta"
    paper, fvcore, full = (trace.report(c) for c in ("paper", "fvcore", "full"))
    assert_g(paper.total, ref["conv2d_only"], f"{label} paper convention")
    assert_g(fvcore.total, ref["fvcore_default"], f"{label} fvcore")
    assert_g(full.total, ref["fvcore_plus_carafe_bicubic"], f"{label} full")
    # Per operator, exactly the operators fvcore counted.
    assert set(fvcore.by_operator) == set(ref["fvcore_by_operator"]), label
    for op, ref_g in ref["fvcore_by_operator"].items():
        assert_g(fvcore.by_operator[op], ref_g, f"{label} {op}")
    assert_g(full.by_operator.get("carafe", 0), ref["carafe"], f"{label} carafe")
    assert_g(full.by_operator.get("upsample_bicubic2d", 0), ref["bicubic_bias_resize"], f"{label} bicubic")
    for module, ref_g in ref["fvcore_by_module"].items():
        assert_g(fvcore.by_module[module], ref_g, f"{label} module {module}")


# The paper's OffSeg FLOP figures (SPEC §2), to their printed precision.
PAPER_GFLOPS = {"offseg_t": (5.33, 44.76), "offseg_b": (10.29, 86.53), "offseg_l": (17.13, 143.38)}


@pytest.mark.parametrize("key", ["offseg_t", "offseg_b", "offseg_l"])
def test_offseg_figures_both_sizes(key):
    name = registered(key)
    fig = figures(key)
    for (field, (size, num_classes)), paper_g in zip(SIZES.items(), PAPER_GFLOPS[key], strict=True):
        model = offseg.create_model(name, num_classes=num_classes)
        check_against_figures(model, fig[field], size, f"{name} {size[0]}x{size[1]}")
        assert round(count_flops(model, size, convention="paper").gflops, 2) == paper_g


@pytest.mark.parametrize(
    "key", ["segformer_b0_offset_learning", "segformer_b0", "segnext_t_offset_learning", "segnext_t"]
)
def test_plug_in_figures(key):
    name = registered(key)
    torch.manual_seed(0)  # SegNeXt draws random NMF bases; FLOPs do not depend on them
    check_against_figures(offseg.create_model(name), figures(key)["flops_512x512_150cls"], (512, 512), name)


# fvcore's jit trace drops dead code: the attention mask computed after the last decoder layer
# (its bilinear resize of the 100 mask logits to the 16x16 level) is never used, so fvcore does
# not count that resize; an eager count does.
MASK2FORMER_DEAD_RESIZE = 4 * 100 * 16 * 16


@pytest.mark.parametrize("key", ["mask2former_swin_t_offset_learning", "mask2former_swin_t"])
def test_mask2former_figures(key):
    name = registered(key)
    ref = figures(key)["flops_512x512_150cls"]
    trace = trace_flops(offseg.create_model(name), (512, 512))
    fvcore, full = trace.report("fvcore"), trace.report("full")
    # The head forward (all 10 predictions at 1/4), or predict() if that is what the model returns.
    with_predict = abs(fvcore.gflops - ref["fvcore_default_with_predict"]) < abs(fvcore.gflops - ref["fvcore_default"])
    suffix = "_with_predict" if with_predict else ""
    by_op = ref["fvcore_by_operator_with_predict" if with_predict else "fvcore_by_operator"]
    # fvcore counts einsums through numpy's printed report, rounded to 4 significant digits.
    einsum_rounding = 5e-4 * by_op["einsum"]
    tol = einsum_rounding + PRINTED
    dead = 0 if with_predict else MASK2FORMER_DEAD_RESIZE
    assert_g(fvcore.total - dead, ref[f"fvcore_default{suffix}"], f"{name} fvcore", tol)
    assert_g(full.total - dead, ref[f"fvcore_plus_baddbmm{suffix}"], f"{name} full (+ baddbmm)", tol)
    assert_g(full.by_operator.get("baddbmm", 0), ref["baddbmm"], f"{name} baddbmm")
    assert set(fvcore.by_operator) == set(by_op)
    for op, ref_g in by_op.items():
        ours = fvcore.by_operator[op] - (dead if op == "upsample_bilinear2d" else 0)
        assert_g(ours, ref_g, f"{name} {op}", tol if op == "einsum" else PRINTED)
    for module, ref_g in ref["fvcore_by_module"].items():
        assert_g(fvcore.by_module[module], ref_g, f"{name} module {module}", tol)


# ------------------------------------------------------------------------------------------
# Formulas on small modules
# ------------------------------------------------------------------------------------------


class Toy(nn.Module):
    """One of each operator the counter knows, at sizes where fvcore's einsum rounding is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.conv_nobias = nn.Conv2d(8, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.gn = nn.GroupNorm(2, 6)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 5)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gn(self.bn(self.conv_nobias(self.conv(x))))  # (1, 6, 8, 8)
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        near = F.interpolate(x, scale_factor=2, mode="nearest")
        grid = torch.zeros(1, 4, 4, 2)
        sampled = F.grid_sample(up + near, grid, align_corners=False)
        pooled = F.adaptive_avg_pool2d(sampled, 2)
        tokens = self.ln(x.flatten(2).transpose(1, 2))  # (1, 64, 6)
        mask = torch.zeros(64, 64, dtype=torch.bool)
        attended = self.attn(tokens, tokens, tokens, need_weights=True, attn_mask=mask)[0]
        attended = attended + self.attn(tokens, tokens, tokens)[0]
        scores = tokens @ attended.transpose(1, 2)  # (1, 64, 64)
        prod = torch.bmm(scores, tokens)
        mixed = torch.einsum("bnc,bmc->bnm", prod[:, :2, :2], tokens[:, :3, :2])
        return self.fc(prod).sum() + pooled.sum() + mixed.sum()


def test_conv_paper_convention_counts_bias_adds_and_groups():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Conv2d(8, 6, 1, bias=False))
    report = count_flops(model, (10, 12), batch=2, convention="paper", in_channels=4)
    pixels = 2 * 10 * 12
    assert report.total == pixels * (3 * 3 * 2 * 8 + 8) + pixels * 8 * 6
    assert report.by_module == {"": report.total, "0": pixels * 152, "1": pixels * 48}
    fvcore = count_flops(model, (10, 12), batch=2, convention="fvcore", in_channels=4)
    assert fvcore.by_operator == {"conv": pixels * (3 * 3 * 2 * 8 + 8 * 6)}


def test_toy_formulas():
    model = Toy()
    full = count_flops(model, (8, 8), convention="full", in_channels=4).by_operator
    n = 64  # tokens
    assert full["linear"] == n * 6 * 5 + 2 * (3 * n * 6 * 6 + n * 6 * 6)  # fc + 2 x (in- and out-projection)
    assert full["baddbmm"] == n * n * 6  # masked attention scores
    assert full["bmm"] == 3 * n * n * 6 + n * n * 6  # 3 products in the two attentions, 1 explicit bmm
    assert full["matmul"] == n * 6 * n
    assert full["einsum"] == 2 * 3 * 2
    assert full["layer_norm"] == n * 6 * 5
    assert full["group_norm"] == 6 * 64 * 5
    assert full["batch_norm"] == 6 * 64 * 2  # eval mode
    assert full["upsample_bilinear2d"] == 4 * 6 * 16 * 16
    assert full["upsample_nearest2d"] == 6 * 16 * 16
    assert full["grid_sampler"] == 4 * 6 * 4 * 4
    assert full["adaptive_avg_pool2d"] == 6 * 4 * 4
    fvcore = count_flops(model, (8, 8), convention="fvcore", in_channels=4).by_operator
    assert "baddbmm" not in fvcore and set(fvcore) <= FVCORE_OPERATORS


def test_toy_matches_fvcore_itself():
    fvcore_nn = pytest.importorskip("fvcore.nn")
    model = Toy().eval()
    x = torch.randn(1, 4, 8, 8)
    analysis = fvcore_nn.FlopCountAnalysis(model, x)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    ours = count_flops(model, (8, 8), convention="fvcore", in_channels=4)
    # fvcore skips the masked attention's baddbmm, as the fvcore convention does.
    assert ours.by_operator == {k: v for k, v in analysis.by_operator().items() if v}
    for name in ("conv", "conv_nobias", "bn", "gn", "ln", "fc"):
        assert ours.by_module[name] == analysis.by_module()[name], name


def test_matmul_counts_broadcast_batch():
    class Broadcast(nn.Module):
        def forward(self, x):
            w = torch.ones(1, 3, 5)
            return w @ x.flatten(2)  # (1,3,5) @ (B,5,HW)

    assert count_flops(Broadcast(), (2, 2), batch=4, convention="full", in_channels=5).total == 4 * 3 * 5 * 4
    # (not 3 * 5 * 4: fvcore's prod(a.shape) * b[-1] ignores the broadcast batch)


# ------------------------------------------------------------------------------------------
# Behaviour of the counter
# ------------------------------------------------------------------------------------------


def test_meta_trace_leaves_model_untouched():
    model = offseg.create_model("offseg-t")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    trace = trace_flops(model, (128, 128))
    assert trace.device == "meta"
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items())


def test_falls_back_to_cpu_for_data_dependent_models():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            keep = int((y > -1e9).sum().item())  # .item() cannot run on meta
            return y.flatten()[:keep]

    trace = trace_flops(DataDependent(), (4, 4))
    assert trace.device == "cpu"
    assert trace.report("paper").total == 16 * (3 * 2 + 2)
    with pytest.raises(RuntimeError):
        trace_flops(DataDependent(), (4, 4), device="meta")


def test_unused_parameters_and_conventions():
    model = offseg.create_model("offseg-t")
    assert unused_parameters(model) == ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]
    assert unused_parameters(offseg.create_model("offseg-t-pixel")) == []
    with pytest.raises(ValueError, match="convention"):
        count_flops(model, 64, convention="mmcv")
    assert CONVENTIONS == ("paper", "fvcore", "full")


def test_model_card_and_cli(capsys):
    card = model_card("offseg-t", size=(64, 64), num_classes=19, latency=True, runs=1, warmup=0, threads=1)
    assert card["params_used_in_forward"] == card["params"] - (256 * 19 + 19)
    assert card["gflops"]["paper"] < card["gflops"]["fvcore"] < card["gflops"]["full"]
    assert card["latency"]["threads"] == 1 and card["latency"]["median_ms"] > 0
    assert card["paper"]["gflops_ade20k"] == 5.3
    text = format_model_card(card)
    assert "offseg-t" in text and "conv_seg" in text and "5.3 G @512x512" in text

    from offseg.cli.main import main

    assert main(["info", "offseg-t", "--size", "512", "512", "--no-latency"]) == 0
    out = capsys.readouterr().out
    assert "6,222,176" in out and "6,183,626" in out and "GFLOPs paper    5.33" in out and "9.75" in out
    assert main(["info", "offseg-t", "--size", "64", "64", "--no-latency", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["latency"] is None
