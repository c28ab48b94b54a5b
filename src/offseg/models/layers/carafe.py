"""CARAFE (content-aware reassembly of features) in pure PyTorch, with the semantics of mmcv's op:

    out[n, c, y, x] = sum_{i,j < k} masks[n, g*k*k + i*k + j, y, x]
                      * features[n, c, y//s + i - (k-1)//2, x//s + j - (k-1)//2]

with zero outside the map and g the channel group of c. The masks live at the output resolution
(s times the input). Rather than upsampling a k*k unfold of the features, the s*s sub-pixel
outputs of one low-resolution position are computed together from its single unfold: the same
sum, s*s times less memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def carafe(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int = 1, scale_factor: int = 1) -> torch.Tensor:
    n, c, h, w = features.shape
    k, g, s = kernel_size, group_size, scale_factor
    if masks.shape != (n, g * k * k, h * s, w * s):
        raise ValueError(
            f"carafe: masks must have shape {(n, g * k * k, h * s, w * s)} for features {tuple(features.shape)}, "
            f"kernel {k}, groups {g}, scale {s}; got {tuple(masks.shape)}"
        )
    if c % g:
        raise ValueError(f"carafe: {c} channels do not split into {g} groups")
    patches = F.unfold(features, k, padding=(k - 1) // 2).view(n, g, c // g, k * k, h, w)
    # masks (n, g*k*k, h*s, w*s) -> (n, g, k*k, h, s, w, s)
    masks = masks.view(n, g, k * k, h, s, w, s)
    out = torch.einsum("ngtyaxb,ngctyx->ngcyaxb", masks, patches)
    return out.reshape(n, c, h * s, w * s)
