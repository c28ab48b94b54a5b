"""The speed benchmark behind docs/benchmarks.md: CPU latency, throughput and peak memory of the
reference computation, the eager model, the inference fast path and the other backends.

    python benchmarks/bench_speed.py                      # the full suite -> docs/benchmarks.md
    python benchmarks/bench_speed.py --quick --output /tmp/bench.md   # small sizes, a smoke run

Each table is one `offseg.cli.bench.run_suite` call: its rows are timed in this process,
round-robin after a warm-up (median and min-max of the runs), and each row's peak RSS is measured
in a child process of its own. See `offseg bench --help` / the module docs of offseg.cli.bench.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from offseg import create_model, list_models
from offseg.cli.bench import Result, Row, format_table, matmul_rate, results_to_json, run_suite
from offseg.flops import count_flops

ZOO = [
    "offseg-t",
    "offseg-t-pixel",
    "offseg-b",
    "offseg-b-pixel",
    "offseg-l",
    "offseg-l-pixel",
    "segformer-b0",
    "segformer-b0-ol",
    "segnext-t",
    "segnext-t-ol",
]
TARGETS = {"latency": 0.5, "memory": 0.6, "error": 1e-4, "onnxruntime": 0.35, "train_latency": 0.5, "train_memory": 0.6}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, load average {load} (1/5/15 min); Python {platform.python_version()}, "
        f"torch {torch.__version__}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}"
    )


def by_label(results: list[Result]) -> dict[tuple[str, str, bool, tuple[int, int]], Result]:
    return {(r.row.model, r.row.variant, r.row.train, r.row.size): r for r in results}


def verdict(value: float | None, bar: float) -> str:
    if value is None:
        return "not measured"
    return f"{value:.2f}x (target <= {bar}x: {'met' if value <= bar else 'NOT met'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs (checks the script works)")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile row (compiling takes minutes)"
    )
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime row")
    parser.add_argument("--workdir", help="cache for ONNX exports (default: a temporary directory)")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)

    quick = args.quick
    size = (128, 128) if quick else (512, 512)
    runs, train_runs = (3, 2) if quick else (10, 5)
    scaling_sizes = [(64, 64), (128, 128), (256, 256)] if quick else [(256, 256), (512, 512), (1024, 1024)]
    threads = args.threads
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="offseg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    spin = os.environ.get("OMP_WAIT_POLICY", "").lower() != "passive"
    torch.set_num_threads(threads)
    known = set(list_models())
    zoo = [m for m in ZOO if m in known]
    started = time.time()
    start_machine = machine()

    def suite(rows: list[Row], n: int, warmup: int = 2) -> list[Result]:
        return run_suite(rows, threads, warmup, n, memory=True, memory_runs=2, workdir=workdir, onnx_spin=spin, log=log)

    out: list[str] = []
    command = "python benchmarks/bench_speed.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ)
    out += [
        "# CPU speed and memory benchmarks",
        "",
        f"Produced by `{(env + ' ') if env else ''}{command.strip()}` on {datetime.date.today().isoformat()}.",
        "",
        f"Machine at the start: {start_machine}.",
        "",
        f"All rows: {threads} intra-op threads, float32, random but realistic weights (every weight, norm statistic, "
        "layer scale and attention bias moved off its initial value), a fixed random input. Timing: all rows of a "
        "table are built in one process, warmed up, then timed round-robin, so that load on a shared machine hits "
        "them alike; `median` and `spread` (fastest-slowest) are over the runs of each row. Peak RSS: each row "
        "again in a child process of its own, the whole process's peak resident memory (PyTorch import, model, "
        "buffers) during two runs, counted from after the model is built; glibc with a fixed "
        "mmap threshold so freed tensors leave the process (`offseg bench --malloc default` for glibc's adaptive "
        "default, which retains more). `max rel. error` is max|out - ref| / max(1, max|ref|) against the first row "
        "of the same model: logits for forwards; the loss and every parameter gradient of a first step from the "
        "same weights for training steps. Random weights give no subnormal floats; trained OffSeg models do "
        "(FreqFusion's sampler), which on CPU makes a forward a further 1.5-1.9x slower unless they are flushed "
        "to zero, as the `offseg` commands do: `benchmarks/bench_denormals.py` measures that on trained "
        "checkpoints ([training.md](training.md#subnormal-floats-cpu)).",
        "",
        "Rows: **reference** = the model computing as the official implementation does "
        "(`offseg.optimize.reference_computation()`: CARAFE by unfold + nearest upsampling of the unfold + multiply "
        "+ sum, FreqFusion's similarity by a dilated unfold and F.cosine_similarity, its kernel normaliser with "
        "permutes and copies and its two identity resizes, EfficientFormerV2 attention biases gathered and "
        "bicubically resized on every call, talking heads as 1x1 convs, BN -> GELU -> conv storing every "
        "intermediate, no folding); **eager** = the library's default modules (exact reformulations, used for "
        "training too); **fast** = `offseg.optimize_for_inference(model, size)`; **onnxruntime** = the fast "
        "network exported by `offseg.export` and run by ONNX Runtime (CPU provider, same threads); **compile** "
        "= the fast network under `torch.compile` (inductor).",
        "",
    ]

    # 1. OffSeg-T against the reference, every backend.
    log("OffSeg-T forward, all backends")
    variants = (
        ["reference", "eager", "fast"]
        + ([] if args.no_onnx else ["onnxruntime"])
        + ([] if args.no_compile else ["compile"])
    )
    main_rows = [Row("offseg-t", v, False, size, 1) for v in variants]
    main_results = suite(main_rows, runs)
    rate = matmul_rate(threads)
    ref = main_results[0]
    res = by_label(main_results)
    fast = res[("offseg-t", "fast", False, size)]
    out += [
        f"## OffSeg-T forward at {size[0]}x{size[1]}, batch 1, {threads} threads",
        "",
        format_table(main_results),
        "",
    ]
    lines = [
        f"- fast path latency vs reference: {verdict(fast.median_ms / ref.median_ms, TARGETS['latency'])}",
        f"- fast path peak memory vs reference: {verdict(fast.peak_rss_mb / ref.peak_rss_mb, TARGETS['memory'])}",
        f"- fast path logits vs reference: max rel. error {fast.rel_error:.1e} (target <= {TARGETS['error']:.0e}: "
        f"{'met' if fast.rel_error <= TARGETS['error'] else 'NOT met'})",
    ]
    ort = res.get(("offseg-t", "onnxruntime", False, size))
    if ort is not None:
        lines.append(
            f"- ONNX Runtime latency vs reference: {verdict(ort.median_ms / ref.median_ms, TARGETS['onnxruntime'])}"
        )
    out += ["Targets (from the issue):", ""] + lines + [""]

    # 2. FLOP-bound limit.
    log("FLOP counts")
    out += [
        "## FLOP-bound limit",
        "",
        f"This machine's float32 matrix-product rate, measured in this run (torch.mm 2048x2048, {threads} threads, "
        f"median of 5): **{rate / 1e9:.1f} G multiply-adds/s**. The limit is the model's multiply-adds (the "
        "`full` convention of `offseg.flops`: convolutions, matrix products, CARAFE, norms, resizes; one "
        "multiply-add = 1 FLOP) divided by that rate: the time the model would take if all of its arithmetic "
        "ran at matrix-product speed and nothing else cost anything.",
        "",
    ]

    # 3. Model zoo, forward.
    log("model zoo forward")
    zoo_rows = [Row(m, v, False, size, 1) for m in zoo for v in ("reference", "eager", "fast")]
    zoo_results = suite(zoo_rows, runs)
    zres = by_label(zoo_results)
    flop_lines = [
        "| model | GFLOPs (full) | limit ms | fast ms | fast / limit | eager ms | eager / limit |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in zoo:
        flops = count_flops(create_model(m), size, convention="full").total
        limit = 1e3 * flops / rate
        f_ms, e_ms = zres[(m, "fast", False, size)].median_ms, zres[(m, "eager", False, size)].median_ms
        flop_lines.append(
            f"| {m} | {flops / 1e9:.2f} | {limit:.0f} | {f_ms:.0f} | {f_ms / limit:.1f}x | {e_ms:.0f} | "
            f"{e_ms / limit:.1f}x |"
        )
    out += flop_lines + [""]
    out += [
        f"## Model zoo forward at {size[0]}x{size[1]}, batch 1, {threads} threads",
        "",
        "Ratios are against the first row (OffSeg-T reference); compare a model's rows with each other.",
        "",
        format_table(zoo_results),
        "",
    ]

    # 4. Training step.
    log("training steps")
    train_size, train_batch = size, 2
    train_models = ["offseg-t"] + ([] if quick else [m for m in zoo if m != "offseg-t"])
    train_rows = [Row(m, v, True, train_size, train_batch) for m in train_models for v in ("reference", "eager")]
    train_results = suite(train_rows, train_runs, warmup=1)
    tres = by_label(train_results)
    t_ref, t_ours = tres[("offseg-t", "reference", True, train_size)], tres[("offseg-t", "eager", True, train_size)]
    out += [
        f"## Training step at {train_size[0]}x{train_size[1]}, batch {train_batch}, {threads} threads",
        "",
        "Forward, MMSegmentation's cross-entropy on logits resized to the labels, backward, AdamW step. The "
        "reference rows run the official computation (which stores every intermediate); the eager rows are the "
        "library's training path (same function; fused BN -> GELU -> conv that keeps only its input, CARAFE "
        "with a hand-written backward, similarity from once-normalised features).",
        "",
        format_table(train_results),
        "",
        "Targets for OffSeg-T:",
        "",
        f"- training step time vs reference: {verdict(t_ours.median_ms / t_ref.median_ms, TARGETS['train_latency'])}",
        "- training step peak memory vs reference: "
        f"{verdict(t_ours.peak_rss_mb / t_ref.peak_rss_mb, TARGETS['train_memory'])}",
        f"- loss and gradients vs reference: max rel. error {t_ours.rel_error:.1e} (tests/test_optimize.py checks "
        "1e-5 at a small size in float64 and float32)",
        "",
    ]

    # 5. Scaling with input size.
    log("scaling with input size")
    scale_rows = [
        Row(m, v, False, s, 1)
        for m in ("offseg-t", "segformer-b0-ol")
        for s in scaling_sizes
        for v in ("reference", "fast")
    ]
    scale_results = suite(scale_rows, max(3, runs // 2), warmup=1)
    sres = by_label(scale_results)
    lines = [
        "| model | size | reference ms | fast ms | fast / ref | reference peak MB | fast peak MB | fast / ref memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in ("offseg-t", "segformer-b0-ol"):
        for s in scaling_sizes:
            r, f = sres[(m, "reference", False, s)], sres[(m, "fast", False, s)]
            lines.append(
                f"| {m} | {s[0]}x{s[1]} | {r.median_ms:.0f} | {f.median_ms:.0f} | {f.median_ms / r.median_ms:.2f} "
                f"| {r.peak_rss_mb:.0f} | {f.peak_rss_mb:.0f} | {f.peak_rss_mb / r.peak_rss_mb:.2f} |"
            )
    out += [
        "## Cost against input size (batch 1)",
        "",
        "\n".join(lines),
        "",
        "All rows of this section:",
        "",
        format_table(scale_results),
        "",
    ]

    out += [f"Machine at the end: {machine()}. Total time {(time.time() - started) / 60:.0f} min.", ""]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(out))
    log(f"wrote {args.output}")
    if args.json:
        import json

        Path(args.json).write_text(
            json.dumps(
                {
                    "main": results_to_json(main_results),
                    "zoo": results_to_json(zoo_results),
                    "train": results_to_json(train_results),
                    "scaling": results_to_json(scale_results),
                    "matmul_macs_per_s": rate,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
