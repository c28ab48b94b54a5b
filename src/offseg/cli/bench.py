"""`offseg bench`: latency, throughput and peak memory of models and execution paths, side by side.

The rows, runners and measurements are `offseg.benchmark` (see its module docs for what each
variant computes and how time and memory are measured); this module only parses arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="latency, images/s and peak memory of models and execution paths, side by side",
        description="Time models side by side in one process (warm-up, then round-robin runs; median, "
        "spread and ratio to the FLOP limit), measure each row's peak RSS in a child process, and check every "
        "row's output against the reference computation. Rows per model: reference (the official "
        "computation), eager, fast (offseg.optimize_for_inference) and the extra --backend rows; with --train, "
        "a full training step (forward, cross-entropy, backward, AdamW) for reference and eager. --onnx adds one "
        "row per ONNX file (fp32 export or int8 model), compared with the first ONNX row of its model.",
    )
    p.add_argument(
        "--model", nargs="+", help="model name(s) (see offseg.list_models(); default: offseg-t unless --onnx is given)"
    )
    p.add_argument(
        "--onnx",
        nargs="+",
        default=[],
        metavar="FILE.onnx",
        help="also time these ONNX files (from `offseg export` or `offseg quantize`, each with its FILE.json sidecar) "
        "as `offseg eval --onnx` runs them, with their trained weights; a fixed-size file runs at its own size",
    )
    p.add_argument(
        "--size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="input size (default: 512 512; fixed-size ONNX files: theirs)",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--threads", type=int, default=2, help="intra-op CPU threads (default: 2)")
    p.add_argument(
        "--backend",
        nargs="+",
        default=["eager"],
        choices=["eager", "labels", "onnxruntime", "compile"],
        help="extra rows: labels (the labels-only prediction path), onnxruntime, compile (default: none)",
    )
    p.add_argument("--train", action="store_true", help="time a full training step instead of a forward")
    p.add_argument("--num-classes", type=int, default=150, help="number of classes (default: 150)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per row (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per row first (default: 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-row peak-memory child processes")
    p.add_argument("--memory-runs", type=int, default=2, help="runs per memory child process (default: 2)")
    p.add_argument(
        "--malloc",
        choices=["fixed", "default"],
        default="fixed",
        help="glibc allocator setting of the memory children (default: fixed mmap threshold)",
    )
    p.add_argument("--workdir", help="where ONNX exports are cached (default: a temporary directory)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(run=run)


def _validate(args: argparse.Namespace) -> None:
    from ..models import list_models

    if args.model is None:
        args.model = [] if args.onnx else ["offseg-t"]
    if args.onnx and args.train:
        raise ValueError("--onnx files are timed as forwards; --train applies to --model rows")
    known = set(list_models())
    for name in args.model:
        if name not in known:
            raise ValueError(f"unknown model {name!r}; see offseg.list_models()")
    h, w = args.size or (512, 512)
    if h < 32 or w < 32 or h % 32 or w % 32:
        raise ValueError(f"--size must be positive multiples of 32, got {h} {w}")
    for flag in ("batch", "threads", "runs", "memory_runs"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be 0 or more")
    if args.train and set(args.backend) - {"eager"}:
        raise ValueError("--train times reference and eager training steps; --backend applies to forwards only")


def run(args: argparse.Namespace) -> int:
    from ..benchmark import default_rows, format_table, onnx_rows, results_to_json, run_suite

    _validate(args)
    size = tuple(args.size) if args.size else (512, 512)
    rows = default_rows(args.model, args.backend, args.train, size, args.batch, args.num_classes)
    rows += onnx_rows(args.onnx, tuple(args.size) if args.size else None, args.batch)
    spin = os.environ.get("OMP_WAIT_POLICY", "").lower() != "passive"
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        results = run_suite(
            rows,
            args.threads,
            args.warmup,
            args.runs,
            not args.no_memory,
            args.memory_runs,
            workdir,
            args.malloc,
            spin,
            log=lambda m: print(m, file=sys.stderr),
        )
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results_to_json(results), indent=1))
    return 0
