"""SegFormer's all-MLP decode head, and its Offset-Learning form (OffSeg, ICCV 2025).

SegformerHead: each of the four backbone levels goes through a 1x1 conv + BN + ReLU to
`channels`, is resized bilinearly to the finest level (1/4), and the four maps are concatenated
finest first and fused by another 1x1 conv + BN + ReLU (`fusion_conv`); dropout and the 1x1
classifier give logits at 1/4 of the input.

SegformerHeadOffsetLearning: the same fusion, then a 2x2 max-pool (stride 2) and Offset Learning
instead of the classifier, so logits come out at 1/8. `conv_seg` and `dropout` are built but
unused, as in the official head (they are in its checkpoints and parameter counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.conv_module import ConvModule
from ..layers.offset_learning import OffsetLearning
from .decode_head import DecodeHead


class SegformerHead(DecodeHead):
    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        dropout_ratio: float = 0.1,
        norm: str = "BN",
        align_corners: bool = False,
    ) -> None:
        super().__init__(channels, num_classes, dropout_ratio)
        self.in_channels = list(in_channels)
        self.align_corners = align_corners
        self.convs = nn.ModuleList(ConvModule(c, channels, 1, norm=norm) for c in self.in_channels)
        self.fusion_conv = ConvModule(channels * len(self.in_channels), channels, 1, norm=norm)

    def fuse(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused feature at the finest level's resolution (B, channels, H/4, W/4)."""
        if len(inputs) != len(self.convs):
            raise ValueError(f"{type(self).__name__}: expected {len(self.convs)} feature maps, got {len(inputs)}")
        for i, (x, c) in enumerate(zip(inputs, self.in_channels, strict=True)):
            if x.ndim != 4 or x.shape[1] != c:
                raise ValueError(f"{type(self).__name__}: input {i} should be (B, {c}, H, W), got {tuple(x.shape)}")
        size = inputs[0].shape[-2:]
        projected = []
        for conv, x in zip(self.convs, inputs, strict=True):
            x = conv(x)
            if x.shape[-2:] != size:  # resizing to the same size is the identity
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)
            projected.append(x)
        return self.fusion_conv(torch.cat(projected, dim=1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.fuse(inputs))


class SegformerHeadOffsetLearning(SegformerHead):
    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        dropout_ratio: float = 0.1,
        norm: str = "BN",
        align_corners: bool = False,
    ) -> None:
        super().__init__(in_channels, num_classes, channels, dropout_ratio, norm, align_corners)
        # Pooling to 1/8 keeps Offset Learning's K x HW attention affordable.
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.offset_learning = OffsetLearning(num_classes, channels)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.offset_learning(self.maxpool(self.fuse(inputs)))
