"""Mix Transformer (MiT-B0..B5), the SegFormer encoder (Xie et al., NeurIPS 2021).

Four stages, each: an overlapping patch embedding (strided conv + LayerNorm) that halves or
quarters the resolution, a stack of transformer blocks, and a closing LayerNorm. A block is

    x = x + Attention(LN(x))     keys/values spatially reduced by a strided conv (sr_ratio)
    x = x + MixFFN(LN(x))        1x1 conv -> 3x3 depthwise conv -> GELU -> 1x1 conv

The output is the four stage maps at strides 4, 8, 16 and 32.

Module names follow MMSegmentation's `MixVisionTransformer`, so its checkpoints load as they are:
stage i is `layers.i` = [patch embedding, blocks, norm] (keys `layers.i.0.*`, `layers.i.1.j.*`,
`layers.i.2.*`), attention is an `nn.MultiheadAttention` under `attn.attn` (packed
`in_proj_weight` / `in_proj_bias`), and the FFN convs sit at `ffn.layers.{0,1,4}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn as nn

from ..layers.drop_path import DropPath
from ..layers.weight_init import init_backbone_

# All MiT sizes share heads (1, 2, 5, 8), patch sizes (7, 3, 3, 3), strides (4, 2, 2, 2),
# spatial-reduction ratios (8, 4, 2, 1) and MLP ratio 4; they differ in width and depth.
# Stage i has width embed_dims * num_heads[i].
MIT_ARCHS: dict[str, dict] = {
    "b0": dict(embed_dims=32, depths=(2, 2, 2, 2)),
    "b1": dict(embed_dims=64, depths=(2, 2, 2, 2)),
    "b2": dict(embed_dims=64, depths=(3, 4, 6, 3)),
    "b3": dict(embed_dims=64, depths=(3, 4, 18, 3)),
    "b4": dict(embed_dims=64, depths=(3, 8, 27, 3)),
    "b5": dict(embed_dims=64, depths=(3, 6, 40, 3)),
}

LN_EPS = 1e-6


def tokens_to_map(tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, hw[0], hw[1])


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return feature_map.flatten(2).transpose(1, 2)


class OverlapPatchEmbed(nn.Module):
    """Strided conv whose kernel is larger than its stride (so patches overlap), then LayerNorm."""

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(in_channels, embed_dims, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dims, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(map_to_tokens(x)), hw


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a map shrunk `sr_ratio` times
    per side (a conv with kernel = stride = sr_ratio, then LayerNorm); this is what makes
    attention affordable at stride 4."""

    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        sr_ratio: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.sr_ratio = sr_ratio
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=attn_drop, bias=qkv_bias, batch_first=True)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(embed_dims, embed_dims, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(embed_dims, eps=LN_EPS)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        kv = x
        if self.sr_ratio > 1:
            kv = self.norm(map_to_tokens(self.sr(tokens_to_map(x, hw))))
        out, _ = self.attn(x, kv, kv, need_weights=False)
        return self.proj_drop(out)


class MixFFN(nn.Module):
    """Feed-forward with a 3x3 depthwise conv between the two 1x1 convs; the depthwise conv gives
    the positional information MiT has instead of position embeddings."""

    def __init__(self, embed_dims: int, hidden_dims: int, drop: float = 0.0) -> None:
        super().__init__()
        # The Sequential layout fixes the checkpoint keys (convs at 0, 1 and 4).
        self.layers = nn.Sequential(
            nn.Conv2d(embed_dims, hidden_dims, 1),
            nn.Conv2d(hidden_dims, hidden_dims, 3, padding=1, groups=hidden_dims),
            nn.GELU(),
            nn.Dropout(drop),
            nn.Conv2d(hidden_dims, embed_dims, 1),
            nn.Dropout(drop),
        )

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return map_to_tokens(self.layers(tokens_to_map(x, hw)))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: efficient attention, then Mix-FFN, each residual."""

    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: int = 4,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dims, eps=LN_EPS)
        self.attn = EfficientSelfAttention(embed_dims, num_heads, sr_ratio, qkv_bias, attn_drop_rate, drop_rate)
        self.norm2 = nn.LayerNorm(embed_dims, eps=LN_EPS)
        self.ffn = MixFFN(embed_dims, mlp_ratio * embed_dims, drop_rate)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.ffn(self.norm2(x), hw))


class MiTStage(nn.ModuleList):
    """[patch embedding, blocks, norm]: a list, not named attributes, because the checkpoint keys
    are `layers.i.0`, `layers.i.1.j` and `layers.i.2`."""

    def __init__(self, patch_embed: OverlapPatchEmbed, blocks: Sequence[MiTBlock], norm: nn.LayerNorm) -> None:
        super().__init__([patch_embed, nn.ModuleList(blocks), norm])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch_embed, blocks, norm = self
        x, hw = patch_embed(x)
        for block in cast(nn.ModuleList, blocks):
            x = block(x, hw)
        return tokens_to_map(norm(x), hw)


class MixVisionTransformer(nn.Module):
    """MiT encoder: image (B, in_channels, H, W) -> four maps at strides 4, 8, 16, 32 with
    `out_channels` channels.

    `arch` ("b0".."b5") picks width and depth; the other arguments are the shared defaults.
    Stochastic depth grows linearly from 0 at the first block to `drop_path_rate` at the last.
    """

    def __init__(
        self,
        arch: str = "b0",
        in_channels: int = 3,
        num_heads: Sequence[int] = (1, 2, 5, 8),
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: int = 4,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if arch not in MIT_ARCHS:
            raise ValueError(f"unknown MiT arch {arch!r} (expected one of {', '.join(MIT_ARCHS)})")
        embed_dims, depths = MIT_ARCHS[arch]["embed_dims"], MIT_ARCHS[arch]["depths"]
        if not len(depths) == len(num_heads) == len(patch_sizes) == len(strides) == len(sr_ratios):
            raise ValueError(
                f"MiT: num_heads, patch_sizes, strides and sr_ratios need {len(depths)} entries each, got "
                f"{len(num_heads)}, {len(patch_sizes)}, {len(strides)}, {len(sr_ratios)}"
            )
        self.arch = arch
        self.out_channels = [embed_dims * heads for heads in num_heads]
        block_drop_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()

        self.layers = nn.ModuleList()
        first_block = 0
        stage_in = in_channels
        for i, depth in enumerate(depths):
            width = self.out_channels[i]
            blocks = [
                MiTBlock(
                    width,
                    num_heads[i],
                    sr_ratios[i],
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    block_drop_rates[first_block + j],
                )
                for j in range(depth)
            ]
            patch_embed = OverlapPatchEmbed(stage_in, width, patch_sizes[i], strides[i])
            self.layers.append(MiTStage(patch_embed, blocks, nn.LayerNorm(width, eps=LN_EPS)))
            first_block += depth
            stage_in = width
        self.init_weights()

    def init_weights(self) -> None:
        """MMSegmentation's from-scratch init: truncated-normal linears, unit LayerNorms, and
        He-normal convs over fan-out (per group). The packed attention in-projection is not an
        nn.Linear and keeps PyTorch's Xavier init, as in MMSegmentation."""
        init_backbone_(self, linear=True, conv=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.layers:
            x = stage(x)
            features.append(x)
        return features
