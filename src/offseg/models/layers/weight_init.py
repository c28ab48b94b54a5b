"""MMSegmentation's from-scratch initialisation of transformer backbones, shared by MiT, MSCAN and Swin."""

from __future__ import annotations

import math

import torch.nn as nn


def init_backbone_(module: nn.Module, linear: bool, conv: bool) -> None:
    """Unit LayerNorms; with `linear`, truncated-normal (0.02) Linear weights; with `conv`, He-normal
    conv weights over fan-out per group. Biases of the layers it sets are zero; other modules
    (BatchNorms, layer scales, packed attention projections) keep their constructor values."""
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            continue
        if linear and isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif conv and isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
