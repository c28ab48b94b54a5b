"""What every decode head shares: the per-pixel classifier `conv_seg` behind dropout.

Offset-Learning heads build `conv_seg` and `dropout` but never use them, as the official heads
do: they are in the official checkpoints and in the paper's parameter counts.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class DecodeHead(nn.Module):
    def __init__(self, channels: int, num_classes: int, dropout_ratio: float = 0.1) -> None:
        super().__init__()
        self.channels = channels
        self.num_classes = num_classes
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        if self.conv_seg.bias is not None:
            nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        """Per-pixel classification: dropout, then the 1x1 classifier."""
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)
