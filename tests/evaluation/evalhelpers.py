"""Shared pieces of the evaluation / inference / predict tests: a small deterministic stand-in
model (fast and exact, unlike a real network) and the location of the real CamVid data."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

CAMVID_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "camvid"
if not CAMVID_ROOT.is_dir():
    CAMVID_ROOT = Path("/work/shared/data/camvid")


class ConvStandIn(nn.Module):
    """Two convolutions with zero padding: every output pixel depends on its neighbourhood and on
    where the window borders are, so whole, sliding-window and padded inference really differ.
    Refuses inputs that are not multiples of `size_divisor`, like the real models."""

    def __init__(self, num_classes: int = 4, size_divisor: int = 8, seed: int = 0, dtype=torch.float64) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, num_classes, 3, padding=1))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.to(dtype)
        self.size_divisor = size_divisor
        self.num_classes = num_classes
        self.calls: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(f"stand-in got {h}x{w}, not a multiple of {self.size_divisor}")
        self.calls.append((h, w))
        return self.body(x.to(self.body[0].weight.dtype))


def camvid_skip_reason() -> str | None:
    """Why the real-data tests cannot run here, or None when they can."""
    if not (CAMVID_ROOT / "val" / "images").is_dir():
        return f"CamVid data not found at {CAMVID_ROOT}"
    try:
        from offseg.data import build_dataset  # noqa: F401
    except ImportError as err:
        return f"offseg.data (the data layer) is not available: {err}"
    return None
