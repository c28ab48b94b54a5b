"""What several commands share: the test-mode and test-resize options, and the resize's default from the checkpoint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch.nn as nn

if TYPE_CHECKING:
    from ..onnx_model import OnnxSegmentor


def add_test_mode_arguments(p: argparse.ArgumentParser, mode_default: str) -> None:
    """`--mode whole|slide`, `--crop H W`, `--stride H W`; `mode_default` says what applies without --mode."""
    p.add_argument("--mode", choices=("whole", "slide"), help=f"test mode (default: {mode_default})")
    p.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"), help="sliding-window size")
    p.add_argument(
        "--stride", nargs=2, type=int, metavar=("H", "W"), help="sliding-window stride (default: the crop size)"
    )


def add_scale_argument(p: argparse.ArgumentParser, otherwise: str) -> None:
    """`--scale W H`: the keep-ratio test resize; `otherwise` says what applies without it."""
    p.add_argument(
        "--scale",
        nargs=2,
        type=int,
        metavar=("W", "H"),
        help="resize images to fit W x H, keeping the aspect ratio (default: the training run's test "
        f"scale when the checkpoint records one, else {otherwise})",
    )


def choose_test_scale(model: nn.Module, requested: Sequence[int] | None, command: str) -> tuple[int, int] | None:
    """`--scale` when given, else the test resize the checkpoint's training run recorded (a run trained
    at its own scale, e.g. CamVid at half resolution, is tested as its validation was), else None."""
    if requested:
        if len(requested) != 2 or min(requested) < 1:
            raise ValueError(f"--scale must be two positive sizes, got {tuple(requested)}")
        return int(requested[0]), int(requested[1])
    recorded = getattr(model, "test_scale", None)
    if not recorded:
        return None
    print(
        f"offseg {command}: test scale {recorded[0]}x{recorded[1]} (the training run's, recorded in the "
        "checkpoint; --scale to change)",
        file=sys.stderr,
    )
    return int(recorded[0]), int(recorded[1])


def add_onnx_argument(p: argparse.ArgumentParser) -> None:
    """`--onnx FILE`: run an exported (fp32) or quantised (int8) ONNX file with its sidecar instead of PyTorch."""
    p.add_argument(
        "--onnx",
        metavar="FILE.onnx",
        help="run this ONNX file (from `offseg export` or `offseg quantize`, with its FILE.json sidecar) in ONNX "
        "Runtime instead of a PyTorch model; the model name, classes and test scale / mode come from the sidecar",
    )


def load_onnx_model(args: argparse.Namespace, command: str) -> OnnxSegmentor:
    """The `--onnx` file as an `OnnxSegmentor`; `args.model` becomes the sidecar's model name."""
    from ..onnx_model import OnnxSegmentor

    if getattr(args, "checkpoint", None):
        raise ValueError("give either --onnx or --checkpoint: the ONNX file holds the weights")
    model = OnnxSegmentor(args.onnx)
    if args.model and args.model != model.name:
        raise ValueError(f"{args.onnx}: holds model {model.name}, not --model {args.model}")
    args.model = model.name
    print(f"offseg {command}: running {model!r} in ONNX Runtime", file=sys.stderr)
    return model
