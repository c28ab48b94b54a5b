"""What `offseg predict` and `offseg eval` gain by keeping freed heap memory (`offseg._heap.keep_freed_heap`).

    python benchmarks/bench_heap.py [--model offseg-t] [--size 512 512] [--threads 2] [--pairs 3] [--calls 20]
    python benchmarks/bench_heap.py --train [--batch 2] [--calls 8]

Each variant runs in a fresh child process, as the setting is process-wide: glibc's default
(the top of the heap handed back once enough of it is free, and faulted in again by the next
forward) and `keep_freed_heap()`, the command line's setting. A child builds the model with the
benchmark's realistic random weights, takes its fast path (`offseg.optimize_for_inference`),
warms up, then times `--calls` full-resolution forwards and `--calls` labels-only predictions
(`offseg.inference.whole_labels`, what `offseg.predict` runs), alternating nothing else; with
`--train`, `--calls` training steps of the library's training path instead (batch `--batch`: forward,
loss, backward, AdamW, as the benchmark's training rows; `offseg train` sets it too). The two
variants alternate `--pairs` times. Printed per variant: median ms per call and its ratio to the
FLOP limit (forwards), minor page faults and kernel CPU time per call, peak RSS; and the ratio of
the medians (kept / default) within each pair.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def child(model_name: str, size: tuple[int, int], threads: int, calls: int, keep: bool, train_batch: int) -> dict:
    import resource
    import time

    import torch

    from offseg._heap import keep_freed_heap
    from offseg.benchmark import Row, build_model, build_runner, example_inputs
    from offseg.inference import whole_labels
    from offseg.optimize import optimize_for_inference

    kept = keep_freed_heap() if keep else False
    torch.set_num_threads(threads)
    result: dict = {"kept": kept}
    if train_batch:
        calls_by_name = {"train step": build_runner(Row(model_name, "eager", True, size, train_batch), Path()).run}
    else:
        row = Row(model_name, "fast", size=size)
        x = example_inputs(row)[0]
        fast = optimize_for_inference(build_model(row).eval(), size)
        calls_by_name = {"forward": lambda: fast(x), "labels": lambda: whole_labels(fast, x)}
    with torch.inference_mode() if not train_batch else contextlib.nullcontext():
        for name, call in calls_by_name.items():
            for _ in range(3):
                call()
            before = resource.getrusage(resource.RUSAGE_SELF)
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                call()
                times.append(time.perf_counter() - started)
            after = resource.getrusage(resource.RUSAGE_SELF)
            result[name] = {
                "median_ms": statistics.median(times) * 1e3,
                "faults_per_call": (after.ru_minflt - before.ru_minflt) / calls,
                "kernel_ms_per_call": (after.ru_stime - before.ru_stime) * 1e3 / calls,
            }
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="offseg-t")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=None, help="calls per row (default: 20; 8 with --train)")
    parser.add_argument("--train", action="store_true", help="time training steps instead of inference")
    parser.add_argument("--batch", type=int, default=2, help="training batch (with --train)")
    parser.add_argument("--child", choices=["default", "kept"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = (args.size[0], args.size[1])
    calls = args.calls or (8 if args.train else 20)
    train_batch = args.batch if args.train else 0
    if args.child:
        print(json.dumps(child(args.model, size, args.threads, calls, args.child == "kept", train_batch)))
        return 0

    from offseg.benchmark import Row, flop_limit_ms, matmul_rate

    # The FLOP limit beside every forward latency: the forward's multiply-adds at this machine's
    # torch.mm rate, measured here (none for training steps, as in bench_speed.py).
    rate = matmul_rate(args.threads)
    limit = flop_limit_ms(Row(args.model, "fast", train=args.train, size=size, batch=train_batch or 1), rate)
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}
    what = f"training steps, batch {train_batch}" if train_batch else "fast path, batch 1"
    print(f"{args.model} {what}, {size[0]}x{size[1]}, {args.threads} threads, {calls} calls per row")
    print(f"load average at the start: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")
    limit_text = f"{limit:.0f} ms" if limit is not None else "none for training steps"
    print(f"torch.mm 2048x2048: {rate / 1e9:.1f} G multiply-adds/s; FLOP limit of one forward: {limit_text}\n")
    runs: dict[str, list[dict]] = {"default": [], "kept": []}
    for pair in range(args.pairs):
        for variant in ("default", "kept"):
            command = [sys.executable, __file__, "--child", variant, "--model", args.model, "--size", *map(str, size)]
            command += ["--threads", str(args.threads), "--calls", str(calls)]
            command += ["--train", "--batch", str(args.batch)] if args.train else []
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
            print(f"pair {pair + 1}/{args.pairs}: {variant} done", file=sys.stderr)
    if not all(r["kept"] for r in runs["kept"]):
        print("keep_freed_heap() did nothing here (not glibc?): the two variants are the same")
    names = ["train step"] if args.train else ["forward", "labels"]
    columns = ["variant", "call", "median ms (each pair)", "x FLOP limit", "page faults per call", "kernel ms per call"]
    print("| " + " | ".join([*columns, "peak RSS MB"]) + " |")
    print("|---|---|---|---|---:|---:|---:|")
    for variant in ("default", "kept"):
        for call in names:
            rows = [r[call] for r in runs[variant]]
            medians = " / ".join(f"{r['median_ms']:.1f}" for r in rows)
            faults = statistics.median(r["faults_per_call"] for r in rows)
            kernel = statistics.median(r["kernel_ms_per_call"] for r in rows)
            peak = statistics.median(r["peak_rss_mb"] for r in runs[variant])
            x_limit = " / ".join(f"{r['median_ms'] / limit:.1f}" for r in rows) if limit else "-"
            print(f"| {variant} | {call} | {medians} | {x_limit} | {faults:.0f} | {kernel:.1f} | {peak:.0f} |")
    print()
    for call in names:
        pairs = zip(runs["default"], runs["kept"], strict=True)
        ratios = [kept[call]["median_ms"] / default[call]["median_ms"] for default, kept in pairs]
        print(f"- {call}: kept / default median time per pair: {', '.join(f'{r:.3f}' for r in ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
