"""What the fast path's attention-bias cache holds and saves, per input size.

    python benchmarks/bench_attention_bias_cache.py                  # OffSeg-T at 480 and 1024
    python benchmarks/bench_attention_bias_cache.py --sizes 480 768 1024 --model offseg-b

At the attention tables' own grid (512x512 input for OffSeg) the fast path gathers the biases on
every call; at any other size it bicubic-resizes them once (as the official code does on every
call) and keeps them. For each size, this prints the memory the kept biases take and the time
recomputing them would add to every forward (the median of `--runs` recomputations of each cached
bias, summed over the layers), beside its FLOP limit: 16 multiply-adds per resized value (the
bicubic taps), plus one per head for the talking-head mix of the plain attention layers, at this
machine's `torch.mm` 2048x2048 rate measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import offseg
from offseg import optimize
from offseg.benchmark import matmul_rate, realistic_weights


def recompute_macs(module: torch.nn.Module, bias: torch.Tensor) -> float:
    """The bicubic resize's 16 taps per value, and the plain attention's talking-head mix."""
    mix = module.num_heads if isinstance(module, optimize._FastAttention4D) else 0
    return bias.numel() * (16 + mix)


def recompute_ms(module: torch.nn.Module, key: tuple, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        if isinstance(module, optimize._FastAttention4D):
            n = key[0]
            bias = module.position_bias(n, n)[0].reshape(module.num_heads, n * n)
            torch.addmm(module.mix1_bias, module.mix1_weight, bias)
        else:
            module.position_bias(key[0], key[1])[0].contiguous()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offseg-t")
    parser.add_argument("--sizes", type=int, nargs="+", default=[480, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    rate = matmul_rate(args.threads)  # sets the thread count too
    torch.manual_seed(0)
    model = realistic_weights(offseg.create_model(args.model, num_classes=150).eval())
    print(f"{args.model}, {args.threads} threads, matrix-product rate {rate / 1e9:.1f} G multiply-adds/s")
    print()
    print("| input size | cached biases MB | recomputing them, ms per forward | x FLOP limit |")
    print("|---|---:|---:|---:|")
    with torch.inference_mode():
        for size in args.sizes:
            fast = offseg.optimize_for_inference(model, size)
            megabytes = milliseconds = macs = 0.0
            for module in fast.modules():
                for key, bias in getattr(module, "bias_cache", {}).items():
                    megabytes += bias.numel() * bias.element_size() / 2**20
                    milliseconds += recompute_ms(module, key, args.runs)
                    macs += recompute_macs(module, bias)
            limit_ms = 1000 * macs / rate
            print(f"| {size}x{size} | {megabytes:.0f} | {milliseconds:.1f} | {milliseconds / limit_ms:.0f} |")


if __name__ == "__main__":
    main()
