"""What several commands share: the test-resize option and its default from the checkpoint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch.nn as nn


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
