"""The OffSeg decode head: per-level 1x1 projections, three FreqFusion steps from the coarsest
level up, a 1x1 fusion conv, then Offset Learning (or, for the per-pixel baseline, the 1x1
classifier). Logits come out at 1/4 of the input resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..layers.conv_module import ConvModule
from ..layers.freqfusion import FreqFusion
from ..layers.offset_learning import OffsetLearning
from .decode_head import DecodeHead

# The groups in which the official head interleaves the two outputs of each fusion.
INTERLEAVE_GROUPS = 4


def interleave_groups(a: torch.Tensor, b: torch.Tensor, groups: int = INTERLEAVE_GROUPS) -> torch.Tensor:
    """Concatenate two maps channel-wise in `groups` interleaved chunks: [a0, b0, a1, b1, ...].

    This is the official head's concatenation order; it fixes the input-channel layout of the
    `align` conv weights.
    """
    n, _, h, w = a.shape
    return torch.cat([a.reshape(n * groups, -1, h, w), b.reshape(n * groups, -1, h, w)], dim=1).reshape(n, -1, h, w)


class OffSegHead(DecodeHead):
    """`classifier`: "offset" (Offset Learning, both branches), "offset-class" / "offset-feature"
    (single-branch ablations) or "pixel" (the 1x1 per-pixel classifier behind dropout)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        new_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        dropout_ratio: float = 0.1,
        norm_groups: int = 32,
        classifier: str = "offset",
    ) -> None:
        super().__init__(channels, num_classes, dropout_ratio)
        self.classifier = classifier
        self.pre = nn.ModuleList(
            ConvModule(c_in, c_new, 1, norm="GN", norm_groups=norm_groups)
            for c_in, c_new in zip(in_channels, new_channels, strict=True)
        )
        self.freqfusions = nn.ModuleList()
        coarse_first = list(new_channels)[::-1]
        lr_channels = coarse_first[0]
        for hr_channels in coarse_first[1:]:
            self.freqfusions.append(FreqFusion(hr_channels, lr_channels, (lr_channels + hr_channels) // 4))
            lr_channels += hr_channels
        self.align = ConvModule(sum(new_channels), channels, 1, norm="GN", norm_groups=norm_groups)
        branches = {"offset": "both", "offset-class": "class", "offset-feature": "feature"}
        if classifier in branches:
            self.offset_learning = OffsetLearning(num_classes, channels, branches=branches[classifier])
        elif classifier != "pixel":
            raise ValueError(
                f"classifier must be 'offset', 'offset-class', 'offset-feature' or 'pixel', got {classifier!r}"
            )

    def fuse(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused 1/4-resolution feature that feeds the classifier (B, channels, H/4, W/4)."""
        feats = [pre(x) for pre, x in zip(self.pre, inputs, strict=True)][::-1]
        fused = feats[0]
        for hr_feat, freqfusion in zip(feats[1:], self.freqfusions, strict=True):
            _, hr_feat, fused = freqfusion(hr_feat, fused)
            fused = interleave_groups(hr_feat, fused)
        return self.align(fused)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        feat = self.fuse(inputs)
        if self.classifier == "pixel":
            return self.cls_seg(feat)
        return self.offset_learning(feat)
