"""SegFormer's head in the fast path: its fusion conv split per level (`offseg.optimize._segformer_fuse`)
against the fusion as before (resize, concatenate, one 1x1 conv), and the bench's reference row.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_segformer_fusion.py [MODEL ...] [--reps 10]
                                       [--size 512]

For each model (default: segformer-b0-ol, segformer-b0; the bench's realistic random weights, 150
classes, one image) three rows built by `offseg.benchmark.build_runner`: "concat", the fast path
with the head's fusion left as it was; "split", the fast path as it is; "reference". They are timed
alternately in one process, `--reps` times each (after two warm-up runs); printed: the medians,
each beside its FLOP limit (`offseg.benchmark.flop_limit_ms` at the torch.mm rate measured in the
run), the ratios, the minor page faults per forward (a fresh map of 16 MB or more costs one per 4 KB
page on every call) and each fast row's max relative distance from the eager model.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from offseg import optimize as opt
from offseg.benchmark import Row, build_model, build_runner, example_inputs, flop_limit_ms, matmul_rate, relative_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["segformer-b0-ol", "segformer-b0"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-segformer-fusion-"))
    rate = matmul_rate(torch.get_num_threads())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.size}x{args.size}, one image; "
        f"torch.mm rate {rate / 1e9:.1f} G multiply-adds/s (FLOP limit = the model's multiply-adds at that rate)"
    )
    for name in args.models:
        row = Row(name, "fast", size=(args.size, args.size))
        split = opt._optimise_segformer_heads
        opt._optimise_segformer_heads = lambda model: None  # the head's fusion as before
        try:
            runners = {"concat": build_runner(row, workdir)}
        finally:
            opt._optimise_segformer_heads = split
        runners["split"] = build_runner(row, workdir)
        runners["reference"] = build_runner(Row(name, "reference", size=row.size), workdir)
        x, _ = example_inputs(row)
        with torch.inference_mode():
            eager = build_model(row).eval()(x)
        errors = {k: relative_error(runners[k].check(), eager) for k in ("concat", "split")}
        times: dict[str, list[float]] = {k: [] for k in runners}
        faults: dict[str, list[int]] = {k: [] for k in runners}
        for runner in runners.values():
            for _ in range(2):
                runner.run()
        for _ in range(args.reps):
            for key, runner in runners.items():
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                out = runner.run()
                times[key].append((time.perf_counter() - start) * 1e3)
                faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
                del out
        med = {k: statistics.median(v) for k, v in times.items()}
        limit = flop_limit_ms(row, rate)  # the model's multiply-adds (`full` convention), one limit for all rows
        print(f"{name}: FLOP limit {limit:.0f} ms")
        for key in runners:
            error = f", {errors[key]:.1e} from eager" if key in errors else ""
            print(
                f"  {key:9s} {med[key]:7.1f} ms  {med[key] / limit:.1f}x FLOP limit  "
                f"{med[key] / med['reference']:.3f}x reference  "
                f"{statistics.median(faults[key]):6.0f} faults{error}"
            )
        print(f"  split / concat {med['split'] / med['concat']:.3f}")


if __name__ == "__main__":
    main()
