"""CARAFE in OffSeg's CPU fast path, call by call: the tap loop against the matrix products.

    python benchmarks/bench_carafe.py                       # OffSeg-T at 512x512, 2 threads
    python benchmarks/bench_carafe.py --band-elements 262144 524288 1048576   # band sizes
    python benchmarks/bench_carafe.py --compile             # and the tap loop under torch.compile
    python benchmarks/bench_carafe.py --compile --dynamic   # one compiled graph per (k, g, s)
    TORCHINDUCTOR_CACHE_DIR=/tmp/cold python benchmarks/bench_carafe.py --compile   # a cold cache

The script records the arguments of every CARAFE call of one fast-path forward (random but
realistic weights, 150 classes), then times each call `--rounds` times under every variant in turn
and prints each call's median:

- `tap loop`: k*k broadcast multiply-adds into the output, in cache-sized bands
  (`carafe._tap_loop`; what `carafe` ran for every call until 2026-12-07, and what it still runs
  when s = 1; here in `carafe`'s current bands, which were as fast or faster for it than the
  earlier 1 MB ones);
- `carafe`: what the fast path runs now (an upsampling CARAFE as small matrix products,
  `carafe._upsample_by_products`), at each `--band-elements` (the first is `carafe`'s default);
- `compiled` (with `--compile`): the tap loop over the whole map under `torch.compile` (inductor,
  static shapes unless `--dynamic`); its first call, the compile or the load from inductor's
  on-disk cache, is reported apart. Inductor needs a C++ compiler.

Beside each time, its multiple of the FLOP limit: the call's k*k multiply-adds per output element
at this machine's `torch.mm` 2048x2048 rate, measured in the same run. The error column is each
variant's max relative error against the tap loop.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import torch

import offseg
from offseg import optimize
from offseg.benchmark import matmul_rate, realistic_weights
from offseg.models.layers import carafe as carafe_module
from offseg.models.layers import freqfusion

Call = tuple[torch.Tensor, torch.Tensor, int, int, int]


def record_carafe_calls(model: torch.nn.Module, size: int) -> list[Call]:
    """The (features, masks, kernel size, groups, scale) of every CARAFE call of one forward: those
    of `carafe` and those of `carafe_upsample_into` (the fast path's upsampling of the fused
    feature, written into its side of the head's interleaved map; timed here as `carafe`)."""
    calls: list[Call] = []
    eager, eager_into = carafe_module.carafe, carafe_module.carafe_upsample_into

    def recording(
        features, masks, kernel_size, group_size=1, scale_factor=1, band_elements=carafe_module.BAND_ELEMENTS
    ):
        calls.append((features.clone(), masks.clone(), kernel_size, group_size, scale_factor))
        return eager(features, masks, kernel_size, group_size, scale_factor, band_elements)

    def recording_into(features, masks, kernel_size, scale_factor, out):
        calls.append((features.clone(), masks.clone(), kernel_size, 1, scale_factor))
        return eager_into(features, masks, kernel_size, scale_factor, out)

    freqfusion.carafe, optimize.carafe_upsample_into = recording, recording_into  # where the fast path calls them
    try:
        with torch.inference_mode():
            model(torch.randn(1, 3, size, size))
    finally:
        freqfusion.carafe, optimize.carafe_upsample_into = eager, eager_into
    return calls


def tap_loop(features: torch.Tensor, masks: torch.Tensor, k: int, g: int, s: int, band_elements: int | None):
    padded = carafe_module._padded_channels_last(features, k, g)
    return carafe_module._as_nchw(carafe_module._tap_loop(padded, masks.contiguous(), k, s, band_elements))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offseg-t")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--band-elements", type=int, nargs="+", default=[carafe_module.BAND_ELEMENTS], help="bands of `carafe`"
    )
    parser.add_argument("--compile", action="store_true", help="also the tap loop under torch.compile")
    parser.add_argument("--dynamic", action="store_true", help="with --compile: one graph per (k, g, s)")
    args = parser.parse_args()

    rate = matmul_rate(args.threads)  # sets the thread count too
    torch.manual_seed(0)
    model = realistic_weights(offseg.create_model(args.model, num_classes=150).eval())
    fast = offseg.optimize_for_inference(model, args.size)
    calls = record_carafe_calls(fast, args.size)

    # Each variant runs call number i.
    variants: dict[str, Callable[[int], torch.Tensor]] = {
        "tap loop": lambda i: tap_loop(*calls[i], band_elements=carafe_module.BAND_ELEMENTS),
    }
    for band in args.band_elements:
        variants[f"carafe, bands of {band}"] = lambda i, b=band: carafe_module.carafe(*calls[i], band_elements=b)
    first_compiled_s = 0.0
    if args.compile:
        torch._dynamo.config.cache_size_limit = 64
        compiled_by_config: dict[tuple[int, int, int], Callable] = {}

        def compiled_for(call: Call) -> Callable:
            config = call[2:]
            if args.dynamic and config in compiled_by_config:
                return compiled_by_config[config]
            fn = torch.compile(functools.partial(tap_loop, k=call[2], g=call[3], s=call[4], band_elements=None))
            compiled_by_config[config] = fn
            return fn

        compiled = [compiled_for(call) for call in calls]
        with torch.inference_mode():
            for call, fn in zip(calls, compiled, strict=True):
                started = time.perf_counter()
                fn(call[0], call[1])
                first_compiled_s += time.perf_counter() - started
        variants["compiled tap loop"] = lambda i: compiled[i](calls[i][0], calls[i][1])

    times: dict[str, list[list[float]]] = {name: [[] for _ in calls] for name in variants}
    errors: dict[str, float] = dict.fromkeys(variants, 0.0)
    started_all = time.perf_counter()
    load = os.getloadavg()
    with torch.inference_mode():
        for index in range(len(calls)):
            expected = variants["tap loop"](index)
            for name, run in variants.items():
                error = (run(index) - expected).abs().max() / expected.abs().max().clamp(min=1)
                errors[name] = max(errors[name], float(error))
        # Call by call, the variants in turn: in a forward, a call's inputs are fresh in cache too.
        for index in range(len(calls)):
            for _ in range(args.rounds):
                for name, run in variants.items():
                    started = time.perf_counter()
                    run(index)
                    times[name][index].append(time.perf_counter() - started)

    limits = [1000 * c[2] * c[2] * c[0].shape[0] * c[0].shape[1] * c[1].shape[2] * c[1].shape[3] / rate for c in calls]
    shapes = "dynamic" if args.dynamic else "static"
    print(f"{args.model} at {args.size}x{args.size}, {args.threads} threads, {args.rounds} alternated runs per call")
    print(f"load average at the start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    print(f"matrix-product rate {rate / 1e9:.1f} G multiply-adds/s")
    if args.compile:
        print(f"compiled ({shapes} shapes): first calls {first_compiled_s:.1f} s in all")
    print()
    print("median ms per call (x FLOP limit)")
    print()
    print("| features | k | scale | " + " | ".join(variants) + " |")
    print("|---|---:|---:|" + "---:|" * len(variants))
    totals = dict.fromkeys(variants, 0.0)
    for index, (features, _, k, _, s) in enumerate(calls):
        cells = []
        for name in variants:
            ms = 1000 * statistics.median(times[name][index])
            totals[name] += ms
            cells.append(f"{ms:.2f} ({ms / limits[index]:.0f})")
        print(f"| {tuple(features.shape)} | {k} | {s} | " + " | ".join(cells) + " |")
    limit = sum(limits)
    cells = [f"{ms:.1f} ({ms / limit:.0f})" for ms in totals.values()]
    print(f"| all {len(calls)} calls of a forward | | | " + " | ".join(cells) + " |")
    print("| max rel. error vs the tap loop | | | " + " | ".join(f"{errors[n]:.1e}" for n in variants) + " |")
    print()
    print(f"Timed part {time.perf_counter() - started_all:.0f} s.")


if __name__ == "__main__":
    main()
