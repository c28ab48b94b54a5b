"""Multi-scale deformable attention (Deformable DETR), in plain PyTorch.

Every query looks at a few learned points around its reference point on each feature level:

    out_q = W_out sum_{head, level, point} a_{q,h,l,p} * V_{h,l}(ref_q + offset_{q,h,l,p} / (W_l, H_l))

with the offsets and the weights a (softmax over the levels x points of a head) predicted from the
query. V_{h,l}(.) is bilinear sampling of the projected values of level l at a normalised
location; outside the map the value is 0. This is `grid_sample` with zero padding and
align_corners=False, which is what mmcv's CPU path computes and what its CUDA kernel does too.

Parameter names (`sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`) follow
mmcv's MultiScaleDeformableAttention, so official checkpoints load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinearly sampled values.

    value: (B, sum(H_l W_l), heads, head_dims), the levels concatenated in `spatial_shapes` order.
    sampling_locations: (B, Q, heads, levels, points, 2), (x, y) in [0, 1] (outside gives 0).
    attention_weights: (B, Q, heads, levels, points).
    Returns (B, Q, heads * head_dims).
    """
    batch, _, num_heads, head_dims = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2.0 * sampling_locations - 1.0  # grid_sample wants [-1, 1]
    sampled_levels = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (B, HW, heads, d) -> (B * heads, d, H, W): one "image" per (batch, head)
        level_value = per_level[level].flatten(2).transpose(1, 2).reshape(batch * num_heads, head_dims, h, w)
        # (B, Q, heads, points, 2) -> (B * heads, Q, points, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled_levels.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (B * heads, d, Q, levels * points) weighted by (B * heads, 1, Q, levels * points)
    sampled = torch.stack(sampled_levels, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels * num_points)
    out = (sampled * weights).sum(-1).view(batch, num_heads * head_dims, num_queries)
    return out.transpose(1, 2).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention of `num_queries` queries over `num_levels` feature maps.

    `forward` returns the attention output only; the caller adds the residual.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: zero offset weights with a bias that starts head h's points on a
        ray at angle 2*pi*h/heads, at distances 1..num_points (in pixels of each level); uniform
        attention weights; Xavier-uniform value and output projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]  # onto the unit square
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        value: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        value_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query (B, Q, C) (positional encoding already added); value (B, sum(H_l W_l), C);
        reference_points (B, Q, levels, 2) as normalised (x, y); spatial_shapes [(H_l, W_l)];
        value_padding_mask (B, sum(H_l W_l)), True where a value is padding. Returns (B, Q, C)."""
        batch, num_queries, _ = query.shape
        num_values = value.shape[1]
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, self.num_heads, -1)
        shape = (batch, num_queries, self.num_heads, self.num_levels, self.num_points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        weights = self.attention_weights(query).view(batch, num_queries, self.num_heads, -1).softmax(-1).view(shape)
        # Offsets are in pixels of each level: normalise by that level's (W, H).
        level_wh = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / level_wh[None, None, None, :, None, :]
        out = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
