"""A segmentation model: a backbone and a decode head, nothing else (so state-dict keys are
`backbone.*` and `decode_head.*`, as in the official checkpoints)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def num_classes_of(model: nn.Module) -> int:
    """`model.num_classes`, checked to be an int (nn.Module types its attributes as Tensor | Module)."""
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int):
        raise TypeError(f"{type(model).__name__}: has no integer `num_classes`")
    return num_classes


class SegmentorBase(nn.Module):
    """What every segmentation model shares: `backbone`, `decode_head` (which names its
    `num_classes`), `size_divisor`, `name` and the input check. `Segmentor` adds the logits of
    per-pixel heads; `Mask2FormerSegmentor` the (class, mask) outputs of a query head."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, size_divisor: int = 32, name: str = "") -> None:
        super().__init__()
        num_classes_of(decode_head)  # checked here, read by the property
        self.backbone = backbone
        self.decode_head = decode_head
        self.size_divisor = size_divisor
        self.name = name

    @property
    def num_classes(self) -> int:
        return num_classes_of(self.decode_head)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"{self.name or 'model'}: expected a batch of RGB images (B, 3, H, W), got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        d = self.size_divisor
        if h % d or w % d:
            raise ValueError(
                f"{self.name or 'model'}: input height and width must be multiples of {d}, got {h}x{w}; "
                f"pad the image (offseg.inference pads and crops back for you)"
            )


class Segmentor(SegmentorBase):
    """`model(x)` gives logits at the input resolution (bilinear resize of the head output);
    `model.decode_head(model.backbone(x))` gives the raw head output.

    Inputs are normalised images (B, 3, H, W) with H and W multiples of `size_divisor`; padding
    to such a size belongs to the inference layer (`offseg.inference`).
    """

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw decode-head output (1/4 or 1/8 resolution, depending on the head)."""
        self.check_input(x)
        return self.decode_head(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_logits(x)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
