"""What `torch.compile` would give CARAFE in OffSeg's CPU fast path: a measurement, not a feature.

    python benchmarks/bench_compiled_carafe.py                       # OffSeg-T at 512x512, 2 threads
    python benchmarks/bench_compiled_carafe.py --dynamic             # one graph per (k, g, s), any size
    TORCHINDUCTOR_CACHE_DIR=/tmp/cold python benchmarks/bench_compiled_carafe.py   # a cold compile cache

The script records the arguments of every CARAFE call of one fast-path forward (random but
realistic weights, 150 classes), then, call by call: the first call of the tap loop under
`torch.compile` (inductor, static shapes unless `--dynamic`; that first call is the compile, or
the load from inductor's on-disk cache), the median of `--runs` alternated calls of the eager tap
loop (what the fast path runs) and of the compiled one, and the compiled output's max relative
error against the eager one; both times also as multiples of the FLOP limit: the call's k*k
multiply-adds per output element at this machine's `torch.mm` 2048x2048 rate, measured in the
same run. Inductor needs a C++ compiler.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

import offseg
from offseg import optimize
from offseg.benchmark import matmul_rate, realistic_weights
from offseg.models.layers import carafe as carafe_module
from offseg.models.layers import freqfusion


def record_carafe_calls(model: torch.nn.Module, size: int) -> list[tuple[torch.Tensor, torch.Tensor, int, int, int]]:
    """The (features, masks, kernel size, groups, scale) of every CARAFE call of one forward."""
    calls = []
    eager = carafe_module.carafe

    def recording(
        features, masks, kernel_size, group_size=1, scale_factor=1, band_elements=carafe_module.BAND_ELEMENTS
    ):
        calls.append((features.clone(), masks.clone(), kernel_size, group_size, scale_factor))
        return eager(features, masks, kernel_size, group_size, scale_factor, band_elements)

    optimize.carafe = freqfusion.carafe = recording  # the two modules that call it in the fast path
    try:
        model(torch.randn(1, 3, size, size))
    finally:
        optimize.carafe = freqfusion.carafe = eager
    return calls


def tap_loop(features: torch.Tensor, masks: torch.Tensor, k: int, g: int, s: int) -> torch.Tensor:
    """`carafe`'s inference path over the whole map in one band (a compiler fuses the taps)."""
    padded = carafe_module._padded_channels_last(features, k, g)
    return carafe_module._as_nchw(carafe_module._carafe_forward(padded, masks.contiguous(), k, s, None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offseg-t")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--dynamic", action="store_true", help="dynamic shapes: one graph per (k, g, s)")
    args = parser.parse_args()

    rate = matmul_rate(args.threads)  # sets the thread count too
    torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(0)
    model = realistic_weights(offseg.create_model(args.model, num_classes=150).eval())
    fast = offseg.optimize_for_inference(model, args.size)
    calls = record_carafe_calls(fast, args.size)
    shapes = "dynamic" if args.dynamic else "static"
    print(f"{args.model} at {args.size}x{args.size}, {args.threads} threads, {shapes} shapes")
    print(f"matrix-product rate {rate / 1e9:.1f} G multiply-adds/s")
    print()
    print(
        "| features | k | scale | first compiled call s | eager ms (x FLOP limit) | compiled ms (x FLOP limit) "
        "| max rel. error |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    compiled_by_config: dict[tuple[int, int, int], object] = {}
    totals = {"first": 0.0, "eager": 0.0, "compiled": 0.0, "limit": 0.0}
    with torch.inference_mode():
        for features, masks, k, g, s in calls:
            config = (k, g, s)
            if not args.dynamic or config not in compiled_by_config:
                compiled_by_config[config] = torch.compile(
                    functools.partial(tap_loop, k=k, g=g, s=s), dynamic=args.dynamic
                )
            compiled = compiled_by_config[config]
            eager_out = carafe_module.carafe(features, masks, k, g, s)
            started = time.perf_counter()
            compiled_out = compiled(features, masks)  # type: ignore[operator]
            first = time.perf_counter() - started
            error = float((compiled_out - eager_out).abs().max() / eager_out.abs().max().clamp(min=1))
            eager_times, compiled_times = [], []
            for _ in range(args.runs):
                started = time.perf_counter()
                carafe_module.carafe(features, masks, k, g, s)
                eager_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                compiled(features, masks)  # type: ignore[operator]
                compiled_times.append(time.perf_counter() - started)
            eager_ms, compiled_ms = 1000 * statistics.median(eager_times), 1000 * statistics.median(compiled_times)
            totals["first"] += first
            totals["eager"] += eager_ms
            totals["compiled"] += compiled_ms
            limit_ms = 1000 * k * k * compiled_out.numel() / rate
            totals["limit"] += limit_ms
            times = f"{eager_ms:.2f} ({eager_ms / limit_ms:.0f}) | {compiled_ms:.2f} ({compiled_ms / limit_ms:.0f})"
            print(f"| {tuple(features.shape)} | {k} | {s} | {first:.1f} | {times} | {error:.1e} |", flush=True)
    print(
        f"| all {len(calls)} calls of a forward | | | {totals['first']:.1f} | {totals['eager']:.1f} "
        f"({totals['eager'] / totals['limit']:.0f}) | {totals['compiled']:.1f} "
        f"({totals['compiled'] / totals['limit']:.0f}) | |"
    )


if __name__ == "__main__":
    main()
