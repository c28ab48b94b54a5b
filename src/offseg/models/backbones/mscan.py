"""MSCAN-T/S/B/L, the convolutional-attention encoder of SegNeXt (Guo et al., NeurIPS 2022).

Four stages. Stage 1 starts with a stem of two stride-2 3x3 convs (BN, GELU between them);
stages 2-4 start with a stride-2 3x3 conv + BN. Each stage then stacks MSCA blocks and ends with
a LayerNorm over channels. A block is

    x = x + s1 * SpatialAttention(BN(x))
    x = x + s2 * MLP(BN(x))                 1x1 conv -> 3x3 depthwise conv -> GELU -> 1x1 conv

with learnable per-channel scales s1, s2 (`layer_scale_*`). The spatial attention is
1x1 conv -> GELU -> MSCA -> 1x1 conv plus its own shortcut, and MSCA gates its input with a
sum of depthwise convs: a 5x5 one, then three strip-conv pairs (1xk then kx1, k = 7, 11, 21)
on its output, mixed by a 1x1 conv.

The output is the four stage maps at strides 4, 8, 16 and 32.

Module names follow MMSegmentation's `MSCAN` (`patch_embed{i}`, `block{i}.{j}`, `norm{i}`, the
stem as `patch_embed1.proj.{0,1,3,4}`, the strip convs as `conv{k}_{1,2}`), so its checkpoints and
the ImageNet releases it converts load as they are. MMSegmentation builds the norms from the
config (SyncBN in the released configs, BN here: the same state dict and the same eval-mode
behaviour). Unlike EfficientFormerV2, MSCAN never freezes its BatchNorms while training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..layers.drop_path import DropPath
from ..layers.weight_init import init_backbone_

# Every size uses MLP ratios (8, 8, 4, 4); the drop-path rates are those of the SegNeXt configs
# (MMSegmentation's and OffSeg's agree): 0.1 for T/S/B, 0.3 for L.
MSCAN_ARCHS: dict[str, dict] = {
    "t": dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), drop_path_rate=0.1),
    "s": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2), drop_path_rate=0.1),
    "b": dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), drop_path_rate=0.1),
    "l": dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3), drop_path_rate=0.3),
}
MLP_RATIOS = (8, 8, 4, 4)

# MSCA: one square depthwise conv, then strip-conv pairs of these lengths.
SQUARE_KERNEL = 5
STRIP_KERNELS = (7, 11, 21)


class StemConv(nn.Module):
    """Stage-1 embedding: two stride-2 3x3 convs (the first to half width), BN after each, GELU
    between them; 1/4 resolution. Indices 0..4 of `proj` are the checkpoint's."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half = out_channels // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, stride=2, padding=1),
            nn.BatchNorm2d(half),
            nn.GELU(),
            nn.Conv2d(half, out_channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class DownsampleEmbed(nn.Module):
    """Stages 2-4 embedding: stride-2 3x3 conv, then BN (MMSegmentation's OverlapPatchEmbed)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class MultiScaleConvAttention(nn.Module):
    """MSCA: the input times a 1x1 mix of [5x5 dw conv output + three strip-conv branches on it]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, SQUARE_KERNEL, padding=SQUARE_KERNEL // 2, groups=channels)
        for i, k in enumerate(STRIP_KERNELS):
            # Horizontal strip then vertical strip approximates a k x k depthwise conv.
            setattr(self, f"conv{i}_1", nn.Conv2d(channels, channels, (1, k), padding=(0, k // 2), groups=channels))
            setattr(self, f"conv{i}_2", nn.Conv2d(channels, channels, (k, 1), padding=(k // 2, 0), groups=channels))
        self.conv3 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.conv0(x)
        branches = [getattr(self, f"conv{i}_2")(getattr(self, f"conv{i}_1")(local)) for i in range(len(STRIP_KERNELS))]
        attn = local
        for branch in branches:  # left to right, as the reference sums them
            attn = attn + branch
        return self.conv3(attn) * x


class SpatialAttention(nn.Module):
    """1x1 conv -> GELU -> MSCA -> 1x1 conv, plus a shortcut around all of it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj_1 = nn.Conv2d(channels, channels, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = MultiScaleConvAttention(channels)
        self.proj_2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x


class ConvMlp(nn.Module):
    """1x1 conv expand -> 3x3 depthwise conv -> GELU -> 1x1 conv back (dropout after GELU and
    after the last conv when `drop` > 0)."""

    def __init__(self, channels: int, hidden_channels: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden_channels, 1)
        self.dwconv = nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1, groups=hidden_channels)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_channels, channels, 1)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


class MSCABlock(nn.Module):
    """BN -> spatial attention and BN -> MLP, each scaled per channel and added back."""

    def __init__(
        self, channels: int, mlp_ratio: float, drop: float = 0.0, drop_path: float = 0.0, layer_scale_init: float = 1e-2
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.attn = SpatialAttention(channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(channels)
        self.mlp = ConvMlp(channels, int(channels * mlp_ratio), drop)
        self.layer_scale_1 = nn.Parameter(torch.full((channels,), layer_scale_init))
        self.layer_scale_2 = nn.Parameter(torch.full((channels,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


class MSCAN(nn.Module):
    """MSCAN encoder: image (B, in_channels, H, W) -> four maps at strides 4, 8, 16, 32 with
    `out_channels` channels.

    `arch` ("t", "s", "b", "l") picks widths, depths and the default stochastic-depth rate, which
    grows linearly from 0 at the first block to `drop_path_rate` at the last.
    """

    def __init__(
        self,
        arch: str = "t",
        in_channels: int = 3,
        mlp_ratios: Sequence[float] = MLP_RATIOS,
        drop_rate: float = 0.0,
        drop_path_rate: float | None = None,
    ) -> None:
        super().__init__()
        if arch not in MSCAN_ARCHS:
            raise ValueError(f"unknown MSCAN arch {arch!r} (expected one of {', '.join(MSCAN_ARCHS)})")
        cfg = MSCAN_ARCHS[arch]
        embed_dims, depths = cfg["embed_dims"], cfg["depths"]
        if len(mlp_ratios) != len(depths):
            raise ValueError(f"MSCAN: mlp_ratios needs {len(depths)} entries, got {len(mlp_ratios)}")
        if drop_path_rate is None:
            drop_path_rate = cfg["drop_path_rate"]
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"MSCAN: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.arch = arch
        self.in_channels = in_channels
        self.out_channels = list(embed_dims)
        self.num_stages = len(depths)
        block_drop_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()

        first_block = 0
        for i, (width, depth) in enumerate(zip(embed_dims, depths, strict=True)):
            embed = StemConv(in_channels, width) if i == 0 else DownsampleEmbed(embed_dims[i - 1], width)
            blocks = nn.ModuleList(
                MSCABlock(width, mlp_ratios[i], drop_rate, block_drop_rates[first_block + j]) for j in range(depth)
            )
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(width))
            first_block += depth
        self.init_weights()

    def init_weights(self) -> None:
        """MMSegmentation's from-scratch init: He-normal convs over fan-out (per group) with zero
        bias, unit LayerNorms; BatchNorms and layer scales keep their constructor values."""
        init_backbone_(self, linear=False, conv=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MSCAN: expected images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        features = []
        for i in range(1, self.num_stages + 1):
            x = self.stage(i, x)
            features.append(x)
        return features

    def stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage i (1-based): patch embedding, blocks, LayerNorm."""
        if not 1 <= i <= self.num_stages:
            raise ValueError(f"MSCAN: stage {i} does not exist; stages are 1 to {self.num_stages}")
        x = getattr(self, f"patch_embed{i}")(x)
        for block in getattr(self, f"block{i}"):
            x = block(x)
        # The stage LayerNorm normalises each pixel over channels.
        return getattr(self, f"norm{i}")(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
