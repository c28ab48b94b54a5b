"""A batch of several images on the CPU fast path: batched, widest parts image by image (what
`offseg.optimize_for_inference` does), or every image through the whole network in turn.

    python benchmarks/bench_batch.py                      # offseg-t, segformer-b0, segnext-t; 1 and 2 threads
    python benchmarks/bench_batch.py --models offseg-t --threads 1 --rounds 2

For each model and thread count, one fast model (random but realistic weights, 11 classes) runs
`forward_logits` on a batch of `--batch` random images of `--size` in three ways, alternated
`--rounds` times in one process so that machine load hits them alike:

- **batched**: the whole batch through every layer (the image-by-image rule switched off);
- **widest parts image by image** (the fast path): the backbone's stem and first stage and the decode
  head one image at a time (SegNeXt's head from one draw of NMF bases for the batch), the coarser
  stages batched;
- **each image whole**: the images one after another through the whole network.

Printed: the median time of each, its ratio to batched, and its ratio to the FLOP limit: the
batch's multiply-adds (`full` convention of `offseg.flops`, the whole forward's, final resize
included) at this machine's `torch.mm` 2048x2048 rate, measured in the same run. SegNeXt's head draws random NMF bases;
in "each image whole" every image draws its own, so those logits differ from the batched ones by
more than round-off (same distribution, other draws).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import offseg
from offseg import optimize
from offseg.benchmark import Row, forward_macs, matmul_rate, realistic_weights


def variants(fast: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    rule = optimize._image_by_image

    def batched() -> torch.Tensor:
        optimize._image_by_image = lambda _: False  # type: ignore[assignment]
        try:
            return fast.forward_logits(x)
        finally:
            optimize._image_by_image = rule

    return {
        "batched": batched,
        "widest parts image by image (fast path)": lambda: fast.forward_logits(x),
        "each image whole": lambda: torch.cat([fast.forward_logits(image) for image in x.split(1)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["offseg-t", "segformer-b0", "segnext-t"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", nargs=2, type=int, default=[384, 480], metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"batch {args.batch} of {args.size[0]}x{args.size[1]}, {args.rounds} alternated rounds; load average {load}")
    print()
    rates = {threads: matmul_rate(threads) for threads in args.threads}
    print(
        "matrix-product rate: " + ", ".join(f"{t} thread(s) {r / 1e9:.1f} G multiply-adds/s" for t, r in rates.items())
    )
    print()
    print("| model | threads | way | median ms | x batched | x FLOP limit |")
    print("|---|---:|---|---:|---:|---:|")
    for name in args.models:
        torch.manual_seed(0)
        model = realistic_weights(offseg.create_model(name, num_classes=11).eval())
        fast = offseg.optimize_for_inference(model, tuple(args.size))
        x = torch.randn(args.batch, 3, *args.size)
        macs = forward_macs(Row(name, size=(args.size[0], args.size[1]), batch=args.batch, num_classes=11))
        for threads in args.threads:
            torch.set_num_threads(threads)
            ways = variants(fast, x)
            for run in ways.values():  # warm-up: caches of this size, allocator
                run()
            times: dict[str, list[float]] = {way: [] for way in ways}
            for _ in range(args.rounds):
                for way, run in ways.items():
                    started = time.perf_counter()
                    out = run()
                    times[way].append(time.perf_counter() - started)
                    del out
            base = statistics.median(times["batched"])
            limit = macs / rates[threads]
            for way, spent in times.items():
                median = statistics.median(spent)
                row = f"| {name} | {threads} | {way} | {1000 * median:.0f} | {median / base:.2f} |"
                print(f"{row} {median / limit:.1f} |", flush=True)


if __name__ == "__main__":
    main()
