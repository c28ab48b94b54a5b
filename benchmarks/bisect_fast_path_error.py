"""Which fast-path rewrite moves the logits of a (trained) model away from the eager model?

Builds `optimize_for_inference`'s model with one rewrite switched off at a time ("all but X") and
with one switched on at a time ("only X"), and prints for each the max relative error (the
tests' measure: max|a - b| / max(1, max|b|)) against the eager float32 model and against the
same model in float64, on CamVid test pictures at 512x512 (as tests/test_optimize.py does). Rows
"eager ..." are other float32 orderings of the same function with no fast-path rewrite at all;
rows "float64, ..." put float32-sized round-off into the float64 model on purpose (every module
output rounded to float32, or perturbed by up to 2^-24 relative; or only the input perturbed):
how far any float32 computation must be from float64 and from eager, whatever its order.
`--stages` adds the float32-vs-float64 error of the backbone levels and the head's stages;
`--rms` reports RMS relative errors instead of the max (far less noisy on trained weights).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bisect_fast_path_error.py CHECKPOINT [--images 3]

Without a checkpoint (`--random`), the bench's realistic random weights.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import offseg
from offseg import optimize as opt
from offseg.benchmark import Row, build_model, relative_error
from offseg.models.backbones import efficientformer_v2 as effv2

REWRITES = (
    "bn_fold",
    "effv2_attention",
    "effv2_ffn",
    "offset_learning",
    "conv_act",
    "onednn_1x1",
    "channels_last",
    "group_norm",
)


def _optimise_effv2(backbone: effv2.EfficientFormerV2, attention: bool, ffn: bool) -> None:
    """`opt._optimise_efficientformer_v2` split in two: the attention blocks (merged q/k/v, scale in
    q, cached mixed bias, head mixes as products) and the rest (layer scales folded into the last
    conv of their branch, MLP / downsample forwards without the folded BNs)."""
    swaps: dict[type, type] = {}
    if ffn:
        swaps.update(
            {
                effv2.Mlp: opt._FastMlp,
                effv2.ConvDownsample: opt._FastConvDownsample,
                effv2.AttnDownsample: opt._FastAttnDownsample,
            }
        )
        for module in backbone.modules():
            if isinstance(module, effv2.FFN):
                opt.scale_conv_outputs(module.mlp.fc2, module.layer_scale_2)
                module.__class__ = opt._FastFFN
            elif isinstance(module, effv2.AttnFFN):
                opt.scale_conv_outputs(module.token_mixer.proj[1], module.layer_scale_1)
                opt.scale_conv_outputs(module.mlp.fc2, module.layer_scale_2)
                module.__class__ = opt._FastAttnFFN
    if attention:
        swaps[effv2.Attention4D] = opt._FastAttention4D
        swaps[effv2.Attention4DDownsample] = opt._FastAttention4DDownsample
    for module in list(backbone.modules()):
        fast = swaps.get(type(module))
        if fast is not None:
            module.__class__ = fast
            prepare = getattr(module, "prepare", None)
            if prepare is not None:
                prepare()


def build_fast(model: nn.Module, on: set[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`optimize_for_inference(model)` with only the rewrites in `on` (the BN-free forwards of the
    EfficientFormerV2 blocks need the BN fold: without it they are off too)."""
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        if "bn_fold" in on:
            opt.fold_batch_norms(fast)
            for module in list(fast.modules()):
                if isinstance(module, effv2.EfficientFormerV2):
                    _optimise_effv2(module, "effv2_attention" in on, "effv2_ffn" in on)
        if "offset_learning" in on:
            opt._optimise_offset_learning(fast)
        if "conv_act" in on:
            opt._fuse_conv_activations(fast)
        if "onednn_1x1" in on:
            opt._route_pointwise_convs_to_onednn(fast)
    channels_last = "channels_last" in on
    if channels_last:
        if "group_norm" in on:
            opt._optimise_group_norms(fast)
        fast = fast.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return opt.InferenceModel(fast, channels_last).eval()


def rms_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS(out - ref) / RMS(ref): the typical error, where the tests' max picks the worst pixel."""
    out, ref = out.double(), ref.double()
    return float((out - ref).square().mean().sqrt() / ref.square().mean().sqrt())


def with_output_hooks(model: nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A copy of `model` whose every leaf module's tensor outputs pass through `change`."""
    model = copy.deepcopy(model)

    def hook(module: nn.Module, inputs: object, output: object) -> object:
        if isinstance(output, torch.Tensor):
            return change(output)
        if isinstance(output, tuple):
            return tuple(change(t) if isinstance(t, torch.Tensor) else t for t in output)
        return output

    for module in model.modules():
        if next(module.children(), None) is None:
            module.register_forward_hook(hook)
    return model


def camvid_inputs(count: int) -> list[tuple[str, torch.Tensor]]:
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid" / "test" / "images"
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    inputs = []
    for path in sorted(root.glob("*.jpg"))[:count]:
        picture = np.array(Image.open(path).convert("RGB").resize((512, 512), Image.Resampling.BILINEAR))
        x = ((torch.from_numpy(picture).float() - mean) / std).permute(2, 0, 1)[None].contiguous()
        inputs.append((path.name, x))
    return inputs


def stage_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Intermediate maps of an OffSeg model: backbone levels, the fused head feature, the Offset
    Learning scores before their LayerNorm, the head output."""
    found: dict[str, torch.Tensor] = {}
    inner = getattr(model, "model", model)
    hooks = [
        inner.backbone.register_forward_hook(
            lambda m, i, o: found.update({f"backbone[{j}]": t.detach().double() for j, t in enumerate(o)})
        ),
        inner.decode_head.align.register_forward_hook(lambda m, i, o: found.update(align=o.detach().double())),
        inner.decode_head.offset_learning.mask_norm.register_forward_hook(
            lambda m, i, o: found.update(scores=i[0].detach().double())
        ),
        inner.decode_head.register_forward_hook(lambda m, i, o: found.update(head=o.detach().double())),
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--model", default="offseg-t")
    parser.add_argument("--random", action="store_true", help="the bench's realistic random weights (150 classes)")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--stages", action="store_true", help="also the float32-vs-float64 error per stage")
    parser.add_argument("--rms", action="store_true", help="RMS relative error instead of the max (less noisy)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as OMP_NUM_THREADS)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    measure = rms_error if args.rms else relative_error
    if args.random:
        model = build_model(Row(args.model)).eval()
    else:
        model = offseg.create_model(args.model, checkpoint=args.checkpoint).eval()
    exact = copy.deepcopy(model).double()
    everything = set(REWRITES)
    variants: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
        ("fast path (optimize_for_inference)", opt.optimize_for_inference(model)),
        ("all rewrites (this script's build)", build_fast(model, everything)),
    ]
    variants += [(f"all but {r}", build_fast(model, everything - {r})) for r in REWRITES]
    variants += [("only bn_fold", build_fast(model, {"bn_fold"}))]
    variants += [(f"only bn_fold + {r}", build_fast(model, {"bn_fold", r})) for r in ("effv2_attention", "effv2_ffn")]
    variants += [(f"only {r}", build_fast(model, {r})) for r in ("offset_learning", "conv_act")]
    variants += [("only channels_last (PyTorch's GroupNorm)", build_fast(model, {"channels_last"}))]
    variants += [("only channels_last + group_norm", build_fast(model, {"channels_last", "group_norm"}))]

    def reference(x: torch.Tensor) -> torch.Tensor:
        with opt.reference_computation(), torch.inference_mode():
            return model(x)

    def one_thread(x: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if threads > 1 else 2)
        try:
            with torch.inference_mode():
                return model(x)
        finally:
            torch.set_num_threads(threads)

    variants += [("eager, official ops (reference_computation)", reference)]
    # Float64 runs with float32-sized round-off put in on purpose: how far any float32 computation
    # of this function must be from float64 and from the eager model, whatever its summation order.
    rounded = with_output_hooks(exact, lambda t: t.float().double())
    generator = torch.Generator().manual_seed(0)

    def jitter(t: torch.Tensor) -> torch.Tensor:  # a relative perturbation of up to 2^-24 per element
        return t * (1 + 2.0**-24 * (2 * torch.rand(t.shape, generator=generator, dtype=t.dtype) - 1))

    jittered = with_output_hooks(exact, jitter)
    variants += [("float64, every module output rounded to float32", lambda x: rounded(x.double()).float())]
    variants += [("float64, every module output perturbed by 2^-24", lambda x: jittered(x.double()).float())]
    variants += [("float64 of the input perturbed by 2^-24", lambda x: exact(jitter(x.double())).float())]
    variants += [(f"eager, {1 if torch.get_num_threads() > 1 else 2} thread(s)", one_thread)]
    inputs = camvid_inputs(args.images)
    names = [name for name, _ in inputs]
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    eager_rows: list[float] = []
    for _, x in inputs:
        with torch.inference_mode():
            eager = model(x)
            truth = exact(x.double()).float()
        eager_rows.append(measure(eager, truth))
        for name, fn in variants:
            with torch.inference_mode():
                out = fn(x)
            rows[name].append((measure(out, eager), measure(out, truth)))
    weights = "random weights" if args.random else args.checkpoint
    kind = "RMS" if args.rms else "max"
    print(f"model {args.model}, {weights}, threads {torch.get_num_threads()}, {kind} relative error")
    print("| variant | " + " | ".join(f"{n} vs eager / vs f64" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    print("| eager float32 | " + " | ".join(f"0 / {e:.1e}" for e in eager_rows) + " |")
    for name, errors in rows.items():
        print(f"| {name} | " + " | ".join(f"{a:.1e} / {b:.1e}" for a, b in errors) + " |")
    if args.stages:
        fast = variants[0][1]
        for label, x in inputs:
            truth = stage_outputs(exact, x.double())
            eager = stage_outputs(model, x)
            quick = stage_outputs(fast, x)  # type: ignore[arg-type]
            print(f"\n{label}: stage | eager vs f64 | fast vs f64 | fast vs eager | max|f64|")
            for key, ref in truth.items():
                print(
                    f"  {key} | {relative_error(eager[key], ref):.1e} | {relative_error(quick[key], ref):.1e} | "
                    f"{relative_error(quick[key], eager[key]):.1e} | {float(ref.abs().max()):.3g}"
                )
            scores = truth["scores"]  # (B, HW, K): how far the LayerNorm over K amplifies
            spread = scores.std(dim=-1, unbiased=False)
            ratio = scores.abs().amax(dim=-1) / spread
            print(f"  scores: max over pixels of max|s| / std_K(s) {float(ratio.max()):.3g}")


if __name__ == "__main__":
    main()
