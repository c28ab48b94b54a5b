"""FreqFusion's resampler in OffSeg's CPU fast path, call by call: grid_sample against the gather.

    python benchmarks/bench_resampler.py                  # OffSeg-T at 512x512, 2 threads

The script records the arguments of every resampling of one fast-path forward (the channels-last
output of CARAFE and the sampler's offsets; random but realistic weights, 150 classes), then
times each call `--runs` times under every variant in turn and prints each call's median:

- `grid_sample, copied back`: what the fast path ran until 2026-12-07: for each channel group,
  `F.grid_sample` of the group (its CPU kernel writes NCHW) copied back over the channels-last
  group;
- `gather`: what the fast path runs now (`_FastFreqFusion.resample_in_place`): each sample's four
  neighbours gathered as channel vectors (half a group's channels at a time) and weighted, then
  written over those channels. (In the fast path the feature is one side of the head's
  interleaved map; here it is a map of its own.)

Both write over their input, so each run starts from a fresh copy of it (the copy is not timed).
The error column is the gather's max relative error against grid_sample.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import offseg
from offseg import optimize
from offseg.benchmark import matmul_rate, realistic_weights


def record_resamplings(model: torch.nn.Module, size: int) -> list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """(module, feature, offset) of every resampling of one forward, the feature as a channels-last
    (N, C, H, W) map of its own."""
    calls = []
    resample = optimize._FastFreqFusion.resample_in_place

    def recording(self, groups, offset):
        n, h, w, count, width = groups.shape
        calls.append((self, groups.clone().view(n, h, w, count * width).permute(0, 3, 1, 2), offset.clone()))
        return resample(self, groups, offset)

    optimize._FastFreqFusion.resample_in_place = recording  # type: ignore[method-assign]
    try:
        with torch.inference_mode():
            model(torch.randn(1, 3, size, size))
    finally:
        optimize._FastFreqFusion.resample_in_place = resample  # type: ignore[method-assign]
    return calls


def grid_sample_copied_back(module, upsampled: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    coords = module.dysampler.coordinates(offset, upsampled)
    groups = module.dysampler.groups
    width = upsampled.shape[1] // groups
    for g in range(groups):
        group = upsampled[:, g * width : (g + 1) * width]
        group.copy_(module.dysampler.resample(group, coords[:, g]))
    return upsampled


def gather(module, upsampled: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    n, c, h, w = upsampled.shape
    groups = module.dysampler.groups
    module.resample_in_place(upsampled.permute(0, 2, 3, 1).view(n, h, w, groups, c // groups), offset)
    return upsampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offseg-t")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    rate = matmul_rate(args.threads)  # sets the thread count too
    torch.manual_seed(0)
    model = realistic_weights(offseg.create_model(args.model, num_classes=150).eval())
    fast = offseg.optimize_for_inference(model, args.size)
    calls = record_resamplings(fast, args.size)
    variants = {
        "grid_sample, copied back": grid_sample_copied_back,
        "gather": gather,
    }
    load = os.getloadavg()
    print(f"{args.model} at {args.size}x{args.size}, {args.threads} threads, {args.runs} alternated runs per call")
    print(f"load average at the start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    print(f"matrix-product rate {rate / 1e9:.1f} G multiply-adds/s")
    print()
    print("median ms per call (x FLOP limit: 4 multiply-adds per sampled value at the torch.mm rate)")
    print()
    print("| feature | groups | " + " | ".join(variants) + " | max rel. error |")
    print("|---|---:|" + "---:|" * (len(variants) + 1))
    totals = dict.fromkeys(variants, 0.0)
    total_limit = 0.0
    with torch.inference_mode():
        for module, upsampled, offset in calls:
            outputs = {name: run(module, upsampled.clone(), offset) for name, run in variants.items()}
            expected, got = outputs["grid_sample, copied back"], outputs["gather"]
            error = float((got - expected).abs().max() / expected.abs().max().clamp(min=1))
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.runs):
                for name, run in variants.items():
                    target = upsampled.clone()
                    started = time.perf_counter()
                    run(module, target, offset)
                    times[name].append(time.perf_counter() - started)
            limit = 1000 * 4 * upsampled.numel() / rate
            total_limit += limit
            cells = []
            for name in variants:
                ms = 1000 * statistics.median(times[name])
                totals[name] += ms
                cells.append(f"{ms:.2f} ({ms / limit:.0f})")
            groups = module.dysampler.groups
            print(f"| {tuple(upsampled.shape)} | {groups} | " + " | ".join(cells) + f" | {error:.1e} |", flush=True)
    cells = [f"{ms:.1f} ({ms / total_limit:.0f})" for ms in totals.values()]
    print(f"| all {len(calls)} of a forward | | " + " | ".join(cells) + " | |")


if __name__ == "__main__":
    main()
