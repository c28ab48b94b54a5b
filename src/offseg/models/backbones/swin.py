"""Swin Transformer backbone, as MMSegmentation builds it (state-dict names included).

Four stages of (shifted-)window self-attention blocks at strides 4, 8, 16 and 32; each stage's
output goes through its own LayerNorm (`norm0`..`norm3`) and is returned as (B, C, H, W).

Behaviour that matters for equivalence with the official code:
- A feature map whose side is not a multiple of the window size is zero-padded at the bottom and
  right after `norm1`, in every block. The padded tokens take part in the window attention as
  ordinary (zero) tokens: no mask hides them in regular windows.
- Odd blocks shift the (padded) map by window_size // 2 and mask attention between the regions
  that the cyclic shift brings together (-100 added to those logits).
- The window never shrinks: a 4x4 map is padded to 7x7 and still shifted.
- Patch merging concatenates each 2x2 neighbourhood in `nn.Unfold` order (channel-major: c0 of
  the four pixels, then c1, ...), which is the order of the official `reduction` weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.drop_path import DropPath
from ..layers.weight_init import init_backbone_


# Swin-T, as in the Mask2Former Swin-T configs.
class SwinConfig(TypedDict):
    embed_dims: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]


SWIN_T = SwinConfig(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))


def relative_position_index(window_size: int) -> torch.Tensor:
    """(N, N) index into the (2w-1)^2 bias table for the N = w*w tokens of a window:
    (dy + w - 1) * (2w - 1) + (dx + w - 1) for token pair (p, q) with dy = y_p - y_q."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")).flatten(1)
    delta = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # 2, N, N
    return delta[0] * (2 * window_size - 1) + delta[1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows of w x w tokens, with a learned relative-position
    bias per head."""

    relative_position_index: torch.Tensor  # buffer, registered in __init__

    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (embed_dims // num_heads) ** -0.5
        # Zero at construction; the official Swin init leaves it so (pretrained weights fill it).
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """windows (num_windows * B, N, C); mask (num_windows, N, N) of 0 / -100, or None."""
        b, n, c = windows.shape
        q, k, v = self.qkv(windows).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # b, heads, N, N
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(b // num_windows, num_windows, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(b, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w * w, C), windows in row-major order per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_merge(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(
    h: int, w: int, window_size: int, shift: int, device: torch.device | None = None
) -> torch.Tensor:
    """(num_windows, N, N) additive mask for a map of (padded) size h x w rolled up-left by `shift`:
    tokens from different regions of the unrolled map must not attend to each other."""
    region = torch.zeros(1, h, w, 1, device=device)
    bands = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            region[:, rows, cols, :] = label
            label += 1
    region = window_partition(region, window_size).squeeze(-1)  # num_windows, N
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, -100.0)


class ShiftedWindowAttention(nn.Module):
    """Pads the map to whole windows, optionally rolls it by `shift`, attends within windows,
    and undoes both. The parameters live in `w_msa`."""

    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        window_size: int,
        shift: int = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= shift < window_size:
            raise ValueError(f"shift must be in [0, window_size), got {shift}")
        self.window_size = window_size
        self.shift = shift
        self.w_msa = WindowAttention(embed_dims, num_heads, window_size, qkv_bias, attn_drop, proj_drop)
        self.drop = DropPath(drop_path)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        h, w = hw
        ws = self.window_size
        x = x.view(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        mask = None
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = shifted_window_mask(hp, wp, ws, self.shift, device=x.device).to(x.dtype)
        x = window_merge(self.w_msa(window_partition(x, ws), mask), ws, hp, wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :h, :w, :].reshape(b, h * w, c)
        return self.drop(x)


class SwinFFN(nn.Module):
    """Linear -> GELU -> Linear, with mmcv's FFN layout (`layers.0.0`, `layers.1`)."""

    def __init__(self, embed_dims: int, hidden_dims: int, drop: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, hidden_dims), nn.GELU(), nn.Dropout(drop)),
            nn.Linear(hidden_dims, embed_dims),
            nn.Dropout(drop),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SwinBlock(nn.Module):
    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        window_size: int,
        shift: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dims)
        self.attn = ShiftedWindowAttention(
            embed_dims, num_heads, window_size, shift, qkv_bias, attn_drop, drop, drop_path
        )
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = SwinFFN(embed_dims, int(mlp_ratio * embed_dims), drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), hw)
        return x + self.drop_path(self.ffn(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch conv (zero-padding bottom/right to whole patches), then LN."""

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_channels, embed_dims, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        x = F.pad(x, (0, (p - x.shape[-1] % p) % p, 0, (p - x.shape[-2] % p) % p))
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class PatchMerging(nn.Module):
    """2x2 neighbourhoods -> LN(4C) -> Linear(4C, 2C, no bias); odd sides are zero-padded."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.norm = nn.LayerNorm(4 * in_channels)
        self.reduction = nn.Linear(4 * in_channels, out_channels, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        b, _, c = x.shape
        h, w = hw
        x = x.view(b, h, w, c).permute(0, 3, 1, 2)
        x = F.pad(x, (0, w % 2, 0, h % 2))
        out_hw = (x.shape[2] // 2, x.shape[3] // 2)
        x = F.unfold(x, kernel_size=2, stride=2).transpose(1, 2)  # B, L, 4C in unfold order
        return self.reduction(self.norm(x)), out_hw


class SwinStage(nn.Module):
    def __init__(
        self,
        embed_dims: int,
        depth: int,
        num_heads: int,
        window_size: int,
        drop_paths: Sequence[float],
        downsample: bool,
        **block_options,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(
                embed_dims,
                num_heads,
                window_size,
                shift=window_size // 2 if i % 2 else 0,
                drop_path=drop_paths[i],
                **block_options,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(embed_dims, 2 * embed_dims) if downsample else None

    def forward(self, x: torch.Tensor, hw: tuple[int, int]):
        """Returns (stage output, its hw, input of the next stage, its hw)."""
        for block in self.blocks:
            x = block(x, hw)
        if self.downsample is None:
            return x, hw, x, hw
        down, down_hw = self.downsample(x, hw)
        return x, hw, down, down_hw


class SwinTransformer(nn.Module):
    """Returns the four stage outputs (B, C_i, H/s_i, W/s_i), s_i = 4, 8, 16, 32, C_i = embed_dims * 2^i."""

    def __init__(
        self,
        embed_dims: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.3,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        num_stages = len(depths)
        self.out_channels = [embed_dims * 2**i for i in range(num_stages)]
        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size)
        self.drop_after_pos = nn.Dropout(drop_rate)
        # Stochastic depth grows linearly over all blocks of all stages.
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            self.stages.append(
                SwinStage(
                    self.out_channels[i],
                    depths[i],
                    num_heads[i],
                    window_size,
                    rates[start : start + depths[i]],
                    downsample=i < num_stages - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                )
            )
        for i, channels in enumerate(self.out_channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MMSegmentation's from-scratch init: truncated-normal (0.02) Linear weights with zero bias,
        unit LayerNorms. The patch conv keeps PyTorch's default; the bias tables stay zero."""
        init_backbone_(self, linear=True, conv=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, hw = self.patch_embed(x)
        x = self.drop_after_pos(x)
        outs = []
        for i, stage in enumerate(self.stages):
            out, out_hw, x, hw = stage(x, hw)
            out = getattr(self, f"norm{i}")(out)
            outs.append(out.view(-1, *out_hw, self.out_channels[i]).permute(0, 3, 1, 2).contiguous())
        return outs
