"""The speed benchmark behind docs/benchmarks.md: CPU latency, throughput and peak memory of the
reference computation, the eager model, the inference fast path, the labels-only prediction path
and ONNX Runtime, each beside its FLOP limit; the training step; the cost against input size.

    python benchmarks/bench_speed.py                      # the full suite -> docs/benchmarks.md
    python benchmarks/bench_speed.py --quick --output /tmp/bench.md   # small sizes, a smoke run
    python benchmarks/bench_speed.py --memory-only        # OffSeg-T's peak-memory rows only, printed

Each table is one `offseg.benchmark.run_suite` call: its rows are timed in this process,
round-robin after a warm-up (median and min-max of the runs), and each row's peak memory is
measured in a child process of its own. See the module docs of `offseg.benchmark`. The co-load
section of docs/benchmarks.md comes from benchmarks/bench_coload.py and is kept as it is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from offseg import list_models
from offseg.benchmark import (
    Result,
    Row,
    export_for_bench,
    format_table,
    forward_macs,
    matmul_rate,
    measure_memory,
    results_to_json,
    run_suite,
)

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
# Issue #17's targets, as fractions of the reference row (OffSeg-T unless named).
TARGETS = {
    "latency": 0.35,
    "latency_other": 0.6,  # SegFormer-B0-OL and SegNeXt-T-OL
    "memory": 0.7,
    "labels_memory": 0.4,
    "onnxruntime": 0.35,
    "train_latency": 0.5,
    "train_memory": 0.6,
    "error": 1e-5,  # fast path against the eager model
    "error_segnext": 5e-5,
    "train_error": 1e-5,
}
COLOAD_BEGIN, COLOAD_END = "<!-- bench_coload: begin -->", "<!-- bench_coload: end -->"


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


def by_key(results: list[Result]) -> dict[tuple[str, str, bool, tuple[int, int]], Result]:
    return {(r.row.model, r.row.variant, r.row.train, r.row.size): r for r in results}


def verdict(value: float | None, bar: float) -> str:
    if value is None:
        return "not measured"
    return f"{value:.2f}x (target <= {bar}x: {'met' if value <= bar else 'NOT met'})"


def error_verdict(value: float | None, bar: float) -> str:
    if value is None:
        return "not measured"
    return f"{value:.1e} (target <= {bar:.0e}: {'met' if value <= bar else 'NOT met'})"


def ratio(a: Result | None, b: Result | None, memory: bool = False) -> float | None:
    if a is None or b is None:
        return None
    if memory:
        return None if a.peak_rss_mb is None or not b.peak_rss_mb else a.peak_rss_mb / b.peak_rss_mb
    return a.median_ms / b.median_ms


def kept_coload_section(path: Path) -> list[str]:
    """The co-load section of an existing docs/benchmarks.md (written by bench_coload.py)."""
    if not path.is_file():
        return []
    text = path.read_text()
    if COLOAD_BEGIN not in text or COLOAD_END not in text:
        return []
    start, end = text.index(COLOAD_BEGIN), text.index(COLOAD_END) + len(COLOAD_END)
    return [text[start:end], ""]


def memory_only(size: tuple[int, int], threads: int, variants: list[str], workdir: Path) -> str:
    """The OffSeg-T forward rows' peak memory (the child processes of the full run, nothing timed),
    as a Markdown table with the memory targets. Memory does not depend on machine load."""
    results = []
    for variant in variants:
        row = Row("offseg-t", variant, False, size, 1)
        if variant == "onnxruntime":
            export_for_bench(row, workdir)  # as the full run does: the child then only loads the file
        log(f"  peak memory of {row.label} (child process) ...")
        info = measure_memory(row, threads, 2, workdir)
        results.append(Result(row, peak_rss_mb=info["peak_rss_mb"], build_rss_mb=info["build_rss_mb"]))
    res = by_key(results)
    ref, fast, labels = (res[("offseg-t", v, False, size)] for v in ("reference", "fast", "labels"))
    lines = [
        f"OffSeg-T forward at {size[0]}x{size[1]}, batch 1, {threads} threads: peak RSS of a child process running "
        "only the row, minus its RSS right after `import torch` (MiB)",
        "",
        "| row | peak | once built | x reference |",
        "|---|---|---|---|",
    ]
    for r in results:
        assert r.peak_rss_mb is not None and r.build_rss_mb is not None and ref.peak_rss_mb
        lines.append(
            f"| {r.row.label} | {r.peak_rss_mb:.1f} | {r.build_rss_mb:.1f} | {r.peak_rss_mb / ref.peak_rss_mb:.2f} |"
        )
    return "\n".join(
        lines
        + [
            "",
            f"- fast path memory vs reference: {verdict(ratio(fast, ref, True), TARGETS['memory'])}",
            f"- labels-only memory vs reference: {verdict(ratio(labels, ref, True), TARGETS['labels_memory'])}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs (checks the script works)")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile row (compiling takes many minutes)"
    )
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime row")
    parser.add_argument("--workdir", help="cache for ONNX exports (default: a temporary directory)")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only OffSeg-T's peak-memory rows (reference, eager, fast, labels, ONNX Runtime), printed; "
        "nothing timed, no file written",
    )
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
    if args.memory_only:
        variants = ["reference", "eager", "fast", "labels"] + ([] if args.no_onnx else ["onnxruntime"])
        print(memory_only(size, threads, variants, workdir))
        return 0
    known = set(list_models())
    zoo = [m for m in ZOO if m in known]
    started = time.time()
    start_machine = machine()
    output = Path(args.output)
    coload = kept_coload_section(output)

    log("matrix-product rate")
    rate = matmul_rate(threads)

    def suite(rows: list[Row], n: int, warmup: int = 2) -> list[Result]:
        return run_suite(
            rows,
            threads,
            warmup,
            n,
            memory=True,
            memory_runs=2,
            workdir=workdir,
            onnx_spin=spin,
            log=log,
            macs_per_s=rate,
        )

    out: list[str] = []
    command = "python benchmarks/bench_speed.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ)
    offseg_t_macs = forward_macs(Row("offseg-t", size=size))
    out += [
        "# CPU speed and memory benchmarks",
        "",
        f"Produced by `{(env + ' ') if env else ''}{command.strip()}` on {datetime.date.today().isoformat()}.",
        "",
        f"Machine at the start: {start_machine}.",
        "",
        "## What is measured",
        "",
        f"All rows: {threads} intra-op threads, float32, batch 1 unless said, random but realistic weights (every "
        "weight, norm statistic, layer scale and attention bias moved off its initial value), a fixed random input. "
        "A forward row computes what the official whole-image predict returns: the head's logits resized "
        "bilinearly to the input size (150 classes); the labels row returns their argmax.",
        "",
        "- **Timing**: all rows of a table are built in one process, warmed up, then timed round-robin, so that "
        "load on a shared machine hits them alike; `median` and `spread` (fastest-slowest) are over the runs of "
        "each row. Compare rows within a table; absolute times differ between machines.",
        "- **Memory** (`peak MB above torch`): each row again in a child process of its own that runs only that "
        "row: its peak RSS minus its RSS right after `import torch` (model, buffers, the computation). glibc "
        "runs with a fixed mmap threshold in these children, so freed tensors leave the process "
        "(`offseg bench --malloc default` for glibc's adaptive default, which retains more). "
        "`--memory-only` measures only these rows of OffSeg-T (minutes, and insensitive to machine load).",
        "- **FLOP limit** (`x FLOP limit`): the row's multiply-adds (the `full` convention of `offseg.flops`; "
        f"OffSeg-T at {size[0]}x{size[1]}: {offseg_t_macs / 1e9:.2f} G) divided by this machine's "
        f"`torch.mm` 2048x2048 float32 rate measured in this run: **{rate / 1e9:.1f} G multiply-adds/s**. "
        "The limit is how long the model would take if all of its arithmetic ran at matrix-product speed and "
        "nothing else cost anything.",
        "- **Kernel share** (`kernel share of CPU time`): the process's system CPU time over its whole CPU time "
        "during the row's timed runs. It is mostly page faults: glibc, from which PyTorch's eager allocator "
        "takes memory, hands blocks of 32 MB and more, and the top of its heap once enough of it is free, back "
        "to the system, and the next call faults them in again. On this machine, "
        "a virtual machine that reports freed memory to its host, a fault can cost several times what it costs "
        "on bare metal, and the cost varies with what ran before: the same row's median can differ between "
        "the tables below. Rows with a large kernel share are faster, and ratios against them larger, where "
        "faults are cheap. All rows run with glibc's default heap settings, as a program that imports offseg "
        "does; the `offseg predict`, `offseg eval` and `offseg train` commands keep freed heap memory for the "
        "next forward or step, which removes most of these faults (`benchmarks/bench_heap.py`: fast-path "
        "forwards 0.89-0.93x the time, training steps 0.85-0.91x).",
        "- **Error**: `max rel. error` is max|out - ref| / max(1, max|ref|) against the first row of the same "
        "model (the reference): logits for forwards; the loss and every parameter gradient of a first step "
        "from the same weights for training steps. For the labels row: the share of pixels whose label differs "
        "from the argmax of the reference logits among those whose top-two margin exceeds 1e-3.",
        "",
        "Random weights give no subnormal floats; trained OffSeg models do (FreqFusion's sampler), which on CPU "
        "makes a forward a further 1.5-1.9x slower unless they are flushed to zero, as the `offseg` commands do: "
        "`benchmarks/bench_denormals.py` measures that on trained checkpoints "
        "([training.md](training.md#subnormal-floats-cpu)).",
        "",
        "## The rows",
        "",
        "- **reference** = what the official implementation computes, op for op "
        "(`offseg.optimize.reference_computation()`): FreqFusion's local similarity by a dilated unfold and "
        "F.cosine_similarity, its kernel normaliser with permutes and copies and its two identity resizes, "
        "EfficientFormerV2 attention biases gathered and bicubically resized on every call, talking heads as "
        "1x1 convs, BN -> GELU -> conv storing every intermediate for the backward, Offset Learning's feature "
        "offsets formed for every pixel, no folding, the loss on logits resized in one piece. One exception: "
        "CARAFE, a fused compiled kernel (mmcv) in the official code, is the library's plain tap loop "
        "(`carafe_taps`: for each of the k*k taps one multiply-add of the "
        "shifted low-resolution features into the output, no unfold at full resolution). Its outputs reproduce "
        "the official reference vectors (`tests/test_benchmark.py`). This row is frozen.",
        "- **eager** = the library's default modules (exact reformulations, used for training too; Offset "
        "Learning's score product regrouped as in the fast path, so the per-pixel feature offsets are never "
        "formed).",
        "- **fast** = `offseg.optimize_for_inference(model, size)`: BatchNorm and layer scales folded, merged "
        "projections, attention biases mixed once, Offset Learning regrouped, channels-last throughout, CARAFE's "
        "upsampling as small matrix products in cache-sized bands, FreqFusion's resampler as a gather of channel "
        "vectors, the head's maps dropped as soon as used, the final resize by phases of its integer "
        "scale (`upsample_bilinear_into`), the full-resolution output in transparent huge pages, its buffer reused "
        "by the next call once the caller has dropped it (so one output's worth stays resident between calls).",
        "- **labels** = the labels-only prediction path of `offseg.predict` (`offseg.inference.whole_labels` on "
        "the fast model): the resize and the argmax band by band, never the full-resolution logits of all "
        "classes.",
        "- **onnxruntime** = the fast network exported by `offseg.export` and run by ONNX Runtime (CPU provider, "
        "same threads), plus the same final resize inside the graph. In the graph, FreqFusion's sampler is a "
        "gather of channel vectors (`GatherSampler`; ONNX Runtime's GridSample is slower); CARAFE gathers its "
        "neighbourhoods in one Gather, takes the kernels' softmax once their taps are innermost, and reaches NCHW "
        "through two transposes that move whole runs; Offset Learning is regrouped as in the fast path, but as "
        "whole-map operators (no bands).",
        "- **compile** = the fast network under `torch.compile` (inductor; not part of the fast path: compiling "
        "takes many minutes on CPU).",
        "",
    ]

    # 1. OffSeg-T against the reference, every path.
    log("OffSeg-T forward, every path")
    variants = (
        ["reference", "eager", "fast", "labels"]
        + ([] if args.no_onnx else ["onnxruntime"])
        + ([] if args.no_compile else ["compile"])
    )
    main_results = suite([Row("offseg-t", v, False, size, 1) for v in variants], runs)
    res = by_key(main_results)
    ref = res[("offseg-t", "reference", False, size)]
    fast = res[("offseg-t", "fast", False, size)]
    labels = res[("offseg-t", "labels", False, size)]
    ort = res.get(("offseg-t", "onnxruntime", False, size))
    out += [
        f"## OffSeg-T forward at {size[0]}x{size[1]}, batch 1, {threads} threads",
        "",
        format_table(main_results),
        "",
        "Targets (issue #17):",
        "",
        f"- fast path latency vs reference: {verdict(ratio(fast, ref), TARGETS['latency'])}; "
        f"{fast.median_ms / fast.flop_limit_ms:.1f}x its FLOP limit ({fast.flop_limit_ms:.0f} ms)",
        f"- fast path memory vs reference: {verdict(ratio(fast, ref, True), TARGETS['memory'])}",
        f"- labels-only memory vs reference: {verdict(ratio(labels, ref, True), TARGETS['labels_memory'])}; "
        f"labels differing from the argmax where the margin exceeds 1e-3: {labels.rel_error:.1e} of the pixels",
        f"- fast path logits vs eager: max rel. error {error_verdict(fast.rel_error_eager, TARGETS['error'])}",
    ]
    if ort is not None:
        out.append(f"- ONNX Runtime latency vs reference: {verdict(ratio(ort, ref), TARGETS['onnxruntime'])}")
    out += [""]

    # 2. Model zoo, forward, with the FLOP limits.
    log("model zoo forward")
    zoo_results = suite([Row(m, v, False, size, 1) for m in zoo for v in ("reference", "eager", "fast")], runs)
    zres = by_key(zoo_results)
    lines = [
        "| model | G multiply-adds (full) | FLOP limit ms | reference ms | fast ms | fast / reference "
        "| fast / limit | fast vs eager max rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in zoo:
        r, f = zres[(m, "reference", False, size)], zres[(m, "fast", False, size)]
        lines.append(
            f"| {m} | {forward_macs(f.row) / 1e9:.2f} | {f.flop_limit_ms:.0f} | {r.median_ms:.0f} | {f.median_ms:.0f} "
            f"| {f.median_ms / r.median_ms:.2f} | {f.median_ms / f.flop_limit_ms:.1f}x | {f.rel_error_eager:.1e} |"
        )
    out += [
        f"## Model zoo forward at {size[0]}x{size[1]}, batch 1, {threads} threads",
        "",
        "\n".join(lines),
        "",
        "Targets (issue #17):",
        "",
    ]
    for m in ("segformer-b0-ol", "segnext-t-ol"):
        if m in zoo:
            fast_m, ref_m = zres[(m, "fast", False, size)], zres[(m, "reference", False, size)]
            out.append(
                f"- {m} fast path latency vs reference: {verdict(ratio(fast_m, ref_m), TARGETS['latency_other'])}"
            )
    for m in zoo:
        bar = TARGETS["error_segnext"] if m.startswith("segnext") else TARGETS["error"]
        error = zres[(m, "fast", False, size)].rel_error_eager
        out.append(f"- {m} fast path vs eager: max rel. error {error_verdict(error, bar)}")
    out += [
        "",
        "All rows (ratios against the first row, OffSeg-T reference; compare a model's rows with each other):",
        "",
        format_table(zoo_results),
        "",
    ]

    # 3. Training step.
    log("training steps")
    train_batch = 2
    train_models = ["offseg-t"] + ([] if quick else [m for m in zoo if m != "offseg-t"])
    train_rows = [Row(m, v, True, size, train_batch) for m in train_models for v in ("reference", "eager")]
    train_results = suite(train_rows, train_runs, warmup=1)
    tres = by_key(train_results)
    t_ref, t_ours = tres[("offseg-t", "reference", True, size)], tres[("offseg-t", "eager", True, size)]
    out += [
        f"## Training step at {size[0]}x{size[1]}, batch {train_batch}, {threads} threads",
        "",
        "Forward, MMSegmentation's cross-entropy on logits resized to the labels, backward, AdamW step. The "
        "reference rows run the official computation (which stores every intermediate, and resizes the logits "
        "of all classes to full resolution for the loss); the eager rows are the library's training path (same "
        "function: fused BN -> GELU -> conv that keeps only its input, CARAFE with a hand-written backward, "
        "similarity from once-normalised features, Offset Learning regrouped, the resize and cross-entropy band "
        "by band with the gradient of each band formed in the same pass "
        "(`offseg.models.losses.resized_cross_entropy`)).",
        "",
        format_table(train_results),
        "",
        "Targets for OffSeg-T (issue #17):",
        "",
        f"- training step time vs reference: {verdict(ratio(t_ours, t_ref), TARGETS['train_latency'])}",
        f"- training step memory vs reference: {verdict(ratio(t_ours, t_ref, True), TARGETS['train_memory'])}",
        f"- loss and gradients vs reference: max rel. error {error_verdict(t_ours.rel_error, TARGETS['train_error'])}",
        "",
    ]

    # 4. Scaling with input size.
    log("scaling with input size")
    scale_models = ("offseg-t", "segformer-b0-ol")
    scale_rows = [Row(m, v, False, s, 1) for m in scale_models for s in scaling_sizes for v in ("reference", "fast")]
    scale_results = suite(scale_rows, max(3, runs // 2), warmup=1)
    sres = by_key(scale_results)
    lines = [
        "| model | size | reference ms | fast ms | fast / ref | fast / FLOP limit | reference MB | fast MB "
        "| fast / ref memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in scale_models:
        for s in scaling_sizes:
            r, f = sres[(m, "reference", False, s)], sres[(m, "fast", False, s)]
            lines.append(
                f"| {m} | {s[0]}x{s[1]} | {r.median_ms:.0f} | {f.median_ms:.0f} | {f.median_ms / r.median_ms:.2f} "
                f"| {f.median_ms / f.flop_limit_ms:.1f}x | {r.peak_rss_mb:.0f} | {f.peak_rss_mb:.0f} "
                f"| {f.peak_rss_mb / r.peak_rss_mb:.2f} |"
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
    # The same pair in every table of this run: how far the ratio moves with what ran before.
    pairs = [
        (name, table[("offseg-t", "reference", False, size)], table[("offseg-t", "fast", False, size)])
        for name, table in (("first table", res), ("model zoo", zres), ("input sizes", sres))
        if ("offseg-t", "reference", False, size) in table and ("offseg-t", "fast", False, size) in table
    ]
    out += [
        f"## The same comparison in each table (OffSeg-T, {size[0]}x{size[1]})",
        "",
        "| table | reference ms | fast ms | fast / reference | fast / FLOP limit | reference kernel share |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {r.median_ms:.0f} | {f.median_ms:.0f} | {f.median_ms / r.median_ms:.2f} "
            f"| {f.median_ms / f.flop_limit_ms:.1f}x | {100 * r.cpu_kernel_s / r.cpu_total_s:.0f} % |"
            for name, r, f in pairs
            if r.cpu_total_s > 0 and f.flop_limit_ms
        ),
        "",
    ]
    out += coload
    out += [f"Machine at the end: {machine()}. Total time {(time.time() - started) / 60:.0f} min.", ""]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(out))
    log(f"wrote {output}")
    if args.json:
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
