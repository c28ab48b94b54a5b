"""The fast path's 1x1 convolutions by oneDNN (`_OneDNNConv2d`) against PyTorch's own dispatch.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_onednn_conv.py [MODEL ...] [--reps 10]
    python benchmarks/bench_onednn_conv.py --matmul 2        # MKL against oneDNN matrix products
                                       [--size 512] [--exact] [--profile]

For each model (default: offseg-t, segformer-b0-ol, segnext-t-ol; the bench's realistic random
weights, 150 classes, one image, one thread) three variants of `optimize_for_inference(model,
size)`: "PyTorch", its 1x1 convolutions plain `nn.Conv2d` again (on one thread and fewer than 16
images PyTorch sends them to its reference kernel, `aten::_slow_conv2d_forward`, a BLAS product);
"oneDNN, 1 block", each by one oneDNN call; "oneDNN, blocked", the fast path as it is (oneDNN
over blocks of input channels, see `offseg.optimize._OneDNNConv2d`). They are timed alternately
in one process, `--reps` times each; the medians, their ratios to "PyTorch" and the max relative
difference from it are printed. `--exact`: also each variant's and the eager model's distance
from the float64 model (RMS and max, relative), summed over three inputs. `--profile`: the top
operators' time per forward and share of it, per variant.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from offseg import optimize as opt
from offseg.benchmark import Row, build_model, example_inputs, flop_limit_ms, matmul_rate, relative_error


def with_pytorch_convs(fast: nn.Module) -> nn.Module:
    """A copy of the fast model whose oneDNN-routed 1x1 convolutions dispatch as PyTorch decides."""
    copied = copy.deepcopy(fast)
    for module in copied.modules():
        if type(module) is opt._OneDNNConv2d:
            module.__class__ = nn.Conv2d
    return copied


def with_one_block(fast: nn.Module) -> nn.Module:
    """A copy of the fast model whose oneDNN-routed 1x1 convolutions sum all channels in one call."""
    copied = copy.deepcopy(fast)
    for module in copied.modules():
        if isinstance(module, opt._OneDNNConv2d):
            module.channel_blocks = [(0, module.in_channels)]
    return copied


def rms_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).square().mean().sqrt() / ref.square().mean().sqrt())


def profile_shares(model: nn.Module, x: torch.Tensor, top: int = 6, forwards: int = 3) -> str:
    """The operators taking most self CPU time: milliseconds per forward and share of the total."""
    from torch.profiler import ProfilerActivity, profile

    model(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(forwards):
            model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    per_forward = [(e.key, e.self_cpu_time_total / forwards / 1e3, 100 * e.self_cpu_time_total / total) for e in ranked]
    return ", ".join(f"{key} {ms:.0f} ms {share:.0f}%" for key, ms, share in per_forward)


def matrix_products(threads: int, reps: int) -> None:
    """`--matmul`: torch.matmul (MKL) against `offseg.optimize._onednn_matmul` (oneDNN, K in blocks)
    on the fast path's Offset Learning shapes and 2048^3, alternated; medians, multiply-add rates,
    and each one's RMS distance from the float64 product."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    print(f"{threads} thread(s), matrix products (M x K) @ (K x N), medians of {reps} alternated calls")
    for m, k, n in [(16384, 256, 150), (1024, 256, 150), (1024, 150, 150), (2048, 2048, 2048)]:
        a, w = torch.randn(1, m, k, generator=gen), torch.randn(n, k, generator=gen)
        calls = {
            "MKL (torch.matmul)": lambda a=a, w=w: torch.matmul(a, w.T),
            "oneDNN (_onednn_matmul)": lambda a=a, w=w: opt._onednn_matmul(a, w),
        }
        times: dict[str, list[float]] = {label: [] for label in calls}
        with torch.inference_mode():
            for call in calls.values():
                call()
            for _ in range(reps):
                for label, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[label].append(time.perf_counter() - start)
            truth = a.double() @ w.double().T
            outs = {label: call() for label, call in calls.items()}
        for label, t in times.items():
            ms = statistics.median(t) * 1e3
            print(
                f"  {m}x{k}x{n} {label:>24}: {ms:8.2f} ms, {m * k * n / ms / 1e6:6.1f} G multiply-adds/s, "
                f"RMS from float64 {rms_error(outs[label], truth):.2e}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["offseg-t", "segformer-b0-ol", "segnext-t-ol"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--exact", action="store_true", help="distances from the float64 model")
    parser.add_argument("--profile", action="store_true", help="top operators per variant (torch.profiler)")
    parser.add_argument(
        "--matmul", type=int, metavar="THREADS", help="only the matrix products, MKL against oneDNN, on THREADS threads"
    )
    args = parser.parse_args()
    if args.matmul:
        matrix_products(args.matmul, args.reps)
        return
    torch.set_num_threads(1)  # the case the rewrite is for: PyTorch picks oneDNN itself on more threads
    rate = matmul_rate(1)  # the FLOP limit's yardstick, measured in this run
    print(
        f"1 thread, 1x3x{args.size}x{args.size}, medians of {args.reps} alternated forwards; "
        f"torch.mm 2048² at {rate / 1e9:.1f} G multiply-adds/s"
    )
    for name in args.models:
        row = Row(name, size=(args.size, args.size))
        model = build_model(row).eval()
        x, _ = example_inputs(row)
        fast_path = opt.optimize_for_inference(model, row.size)
        routed = [m for m in fast_path.modules() if isinstance(m, opt._OneDNNConv2d)]
        blocked = sum(len(m.channel_blocks) > 1 for m in routed)
        variants = {
            "PyTorch": with_pytorch_convs(fast_path),
            "oneDNN, 1 block": with_one_block(fast_path),
            "oneDNN, blocked": fast_path,
        }
        outputs = {label: fast(x) for label, fast in variants.items()}  # also the warm-up
        times: dict[str, list[float]] = {label: [] for label in variants}
        for _ in range(args.reps):
            for label, fast in variants.items():
                start = time.perf_counter()
                fast(x)
                times[label].append(time.perf_counter() - start)
        medians = {label: statistics.median(t) * 1e3 for label, t in times.items()}
        limit = flop_limit_ms(row, rate) or float("nan")  # forwards always have one
        print(
            f"{name}: {len(routed)} 1x1 convolutions routed to oneDNN, {blocked} of them in channel blocks; "
            f"FLOP limit {limit:.0f} ms"
        )
        for label, ms in medians.items():
            difference = relative_error(outputs[label], outputs["PyTorch"])
            print(
                f"  {label:>15}: {ms:7.1f} ms, {ms / medians['PyTorch']:.3f}x PyTorch, "
                f"{ms / limit:.1f}x FLOP limit, max rel. diff. {difference:.1e}"
            )
        if args.exact:
            exact_model = copy.deepcopy(model).double()
            distances: dict[str, list[float]] = {label: [0.0, 0.0] for label in ["eager", *variants]}
            for seed in range(3):  # the distance from float64 of one input is noisy: summed over three
                xs, _ = example_inputs(row, seed)
                with torch.inference_mode():
                    truth = exact_model(xs.double())
                    found = {"eager": model(xs), **{label: fast(xs) for label, fast in variants.items()}}
                for label, out in found.items():
                    distances[label][0] += rms_error(out, truth)
                    distances[label][1] += relative_error(out, truth)
            before = distances["PyTorch"]
            for label, (rms, worst) in distances.items():
                print(
                    f"  {label:>15} from float64 (3 inputs summed): RMS {rms:.3e} ({rms / before[0]:.3f}x PyTorch), "
                    f"max {worst:.3e} ({worst / before[1]:.3f}x)"
                )
        if args.profile:
            for label, fast in variants.items():
                print(f"  {label:>15} profile: {profile_shares(fast, x)}")


if __name__ == "__main__":
    main()
