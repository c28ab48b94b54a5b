"""The model behind `offseg serve`: the network on the CPU fast path, its classes and colours,
its test mode and scale, and the model card the API shows."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.nn as nn

__all__ = ["ServedModel", "load_served_model"]


@dataclass
class ServedModel:
    """What the service needs to know about its network.

    runner: what the worker runs (the `optimize_for_inference` copy of the network). mode is
    `dict(mode, crop_size, stride)` as `offseg.predict` takes it; scale the keep-ratio test resize
    (w, h) or None; parameters and gflops are the network's as built (for the model card).
    """

    name: str
    runner: nn.Module
    class_names: list[str]
    palette: np.ndarray  # (K, 3) uint8
    mode: dict
    scale: tuple[int, int] | None
    parameters: int
    gflops: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def card(self) -> dict[str, Any]:
        """`GET /v1/model`."""
        return {
            "model": self.name,
            "num_classes": self.num_classes,
            "classes": [
                {"id": i, "name": name, "color": [int(c) for c in self.palette[i]]}
                for i, name in enumerate(self.class_names)
            ],
            "test_scale": list(self.scale) if self.scale else None,
            "test_mode": {
                "mode": self.mode["mode"],
                "crop_size": list(self.mode["crop_size"]) if self.mode.get("crop_size") else None,
                "stride": list(self.mode["stride"]) if self.mode.get("stride") else None,
            },
            "parameters": self.parameters,
            "flops": self.gflops,
        }


def _classes_and_colours(model: nn.Module) -> tuple[list[str], np.ndarray]:
    from ..visualize import default_palette

    k = int(getattr(model, "num_classes", 0))
    names = list(getattr(model, "class_names", None) or [])
    if len(names) != k:
        names = [f"class {i}" for i in range(k)]
    colours = np.asarray(getattr(model, "palette", None) or np.zeros((0, 3)), dtype=np.uint8).reshape(-1, 3)[:k]
    if len(colours) < k:  # classes the checkpoint gives no colour get the fixed default ones
        colours = np.concatenate([colours, default_palette(k)[len(colours) :]])
    return names, colours


def _gflops(model: nn.Module, size: tuple[int, int]) -> dict[str, Any]:
    from ..flops import trace_flops

    trace = trace_flops(model, size)
    return {
        "input_size": list(size),
        "gflops_paper": round(trace.report("paper").gflops, 3),
        "gflops_full": round(trace.report("full").gflops, 3),
    }


def load_served_model(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    mode: str | None = None,
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    scale: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> ServedModel:
    """Build the network on the CPU fast path and settle what it serves.

    Test mode: `mode` when given, else the official one for the dataset the checkpoint records
    (whole when it records none). Test scale: `scale` (w, h) when given, else the one the
    checkpoint records, else none (pictures are segmented at their own size).
    """
    import argparse

    from ..checkpoint import read_checkpoint
    from ..cli.eval import resolve_test_mode
    from ..factory import create_model
    from ..optimize import optimize_for_inference
    from ..predict import fit_scale

    model = create_model(name, num_classes=num_classes, checkpoint=checkpoint).eval()
    dataset = read_checkpoint(checkpoint).metadata.get("dataset") if checkpoint is not None else None
    test_mode = resolve_test_mode(
        argparse.Namespace(model=name, data=dataset or "folder", mode=mode, crop=crop_size, stride=stride)
    )
    if scale is None:
        scale = getattr(model, "test_scale", None)
    test_scale = (int(scale[0]), int(scale[1])) if scale else None
    if test_scale is not None and min(test_scale) < 1:
        raise ValueError(f"the test scale must be two positive sizes, got {test_scale}")
    # FLOPs at the input the served pictures mostly get: the test scale's fit of a 4:3 picture,
    # else 512 x 512 (the paper's size).
    fitted = fit_scale(3 * max(test_scale), 4 * max(test_scale), test_scale) if test_scale else (512, 512)
    divisor = int(getattr(model, "size_divisor", 1) or 1)
    flops_size = (-(-fitted[0] // divisor) * divisor, -(-fitted[1] // divisor) * divisor)
    names, colours = _classes_and_colours(model)
    # --- fast path (offseg.optimize); same logits within float32 rounding ---
    runner = optimize_for_inference(model, size=flops_size)
    return ServedModel(
        name=getattr(model, "name", name) or name,
        runner=runner,
        class_names=names,
        palette=colours,
        mode=test_mode,
        scale=test_scale,
        parameters=sum(p.numel() for p in model.parameters()),
        gflops=_gflops(model, flops_size),
    )
