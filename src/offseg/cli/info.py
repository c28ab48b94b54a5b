"""`offseg info`: a model card (parameters, FLOPs in each convention, CPU latency, paper figures)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="model card: parameters, FLOPs, CPU latency, the paper's figures",
        description="Print a model card: exact parameter count (and without parameters the forward never "
        "uses), GFLOPs in the paper's convention (Conv2d only), fvcore's and the full count, CPU latency "
        "at the given size, and the paper's figures for the model.",
    )
    p.add_argument("model", help="model name (see `offseg.list_models()`)")
    p.add_argument(
        "--size", nargs=2, type=int, default=(512, 512), metavar=("H", "W"), help="input size (default: 512 512)"
    )
    p.add_argument("--num-classes", type=int, default=150, help="number of classes (default: 150)")
    p.add_argument("--threads", type=int, help="intra-op CPU threads for the latency (default: PyTorch's)")
    p.add_argument("--runs", type=int, default=5, help="timed runs for the latency (default: 5)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..flops import format_model_card, model_card

    h, w = args.size
    if h < 1 or w < 1:
        raise ValueError(f"--size must be positive, got {h} {w}")
    if args.num_classes < 1:
        raise ValueError(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.runs < 1:
        raise ValueError(f"--runs must be at least 1, got {args.runs}")
    card = model_card(
        args.model,
        size=(h, w),
        num_classes=args.num_classes,
        latency=not args.no_latency,
        threads=args.threads,
        runs=args.runs,
    )
    print(json.dumps(card, indent=2) if args.json else format_model_card(card))
    return 0
