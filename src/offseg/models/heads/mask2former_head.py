"""Mask2Former head (MMDetection 3.x / MMSegmentation 1.x layout), optionally with Offset Learning.

Pipeline, for backbone features at strides 4, 8, 16, 32:

1. Pixel decoder (`MSDeformAttnPixelDecoder`): the three coarsest levels are projected to
   `feat_channels` (1x1 conv + GN) and refined together by a deformable-attention encoder; the
   stride-4 level joins through one FPN step (lateral 1x1 conv + GN, plus the upsampled stride-8
   encoder output, then 3x3 conv + GN + ReLU), and a 1x1 conv gives the per-pixel mask features.
   The three encoder outputs (strides 32, 16, 8) are the memories the decoder reads.
2. Transformer decoder: `num_queries` learned queries go through `num_layers` layers of masked
   cross-attention (to memory level i % 3), self-attention and an FFN.
3. Before the first layer and after each layer, a prediction: post-norm, then class logits
   (K + 1 outputs, the last is "no object") and mask logits, the einsum of the query mask
   embeddings with the mask features at 1/4 resolution. Each prediction's mask logits also give
   the next layer's attention mask: resized to that layer's memory level, a position is hidden
   where sigmoid(logit) < 0.5, and a query row hidden everywhere is opened up again.

With Offset Learning (the OffSeg variant), every prediction first aligns the mask embeddings and
the (original) mask features with `OffsetLearningMask`; the aligned pair only feeds that
prediction's einsum. So all 10 predictions, and hence all attention masks, see Offset Learning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.ms_deform_attn import MultiScaleDeformableAttention
from ..layers.offset_learning import OffsetLearningMask


def sine_positional_encoding(
    batch: int,
    h: int,
    w: int,
    num_feats: int,
    device: torch.device | None = None,
    temperature: float = 10000.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """DETR's normalised sine encoding of an unpadded h x w map: (B, 2 * num_feats, h, w), the y half
    first. Positions are (i + 1) / (n + eps) * 2 pi; channel pairs (2j, 2j + 1) are sin and cos at
    frequency temperature^(-2j / num_feats). Always float32, as in the official code."""
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + eps) * (2 * math.pi)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + eps) * (2 * math.pi)
    dims = torch.arange(num_feats, dtype=torch.float32, device=device)
    freqs = temperature ** (2 * torch.div(dims, 2, rounding_mode="floor") / num_feats)

    def encode(positions: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, num_feats), sin/cos interleaved
        angles = positions[:, None] / freqs
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, num_feats)
    pos_x = encode(x)[None, :, :].expand(h, w, num_feats)
    pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)
    return pos.unsqueeze(0).expand(batch, -1, -1, -1)


def _conv2d_layers(*modules: nn.Module) -> list[nn.Conv2d]:
    """The Conv2d layers inside `modules`, in order."""
    return [m for module in modules for m in module.modules() if isinstance(m, nn.Conv2d)]


class ConvGN(nn.Module):
    """Conv2d -> GroupNorm [-> ReLU], named `conv` and `gn` as in the official checkpoints."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool,
        num_groups: int = 32,
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.gn = nn.GroupNorm(num_groups, out_channels)
        self.activate = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gn(self.conv(x))
        return self.activate(x) if self.activate is not None else x


class FeedForward(nn.Module):
    """Linear -> ReLU -> Linear with the residual inside, in mmcv's FFN layout (`layers.0.0`, `layers.1`)."""

    def __init__(self, embed_dims: int, hidden_dims: int, drop: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, hidden_dims), nn.ReLU(inplace=True), nn.Dropout(drop)),
            nn.Linear(hidden_dims, embed_dims),
            nn.Dropout(drop),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


# --------------------------------------------------------------------------------------------
# Pixel decoder
# --------------------------------------------------------------------------------------------


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels (+ residual), LN, FFN (+ residual), LN."""

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, ffn_channels: int) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dims, num_heads, num_levels, num_points)
        self.ffn = FeedForward(embed_dims, ffn_channels)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(2))

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        # Offsets and weights come from the features plus position; the values from the features alone.
        x = self.norms[0](x + self.self_attn(x + pos, x, reference_points, spatial_shapes))
        return self.norms[1](self.ffn(x))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_options) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_options) for _ in range(num_layers))

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos, reference_points, spatial_shapes)
        return x


def pixel_centres(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(h * w, 2) normalised (x, y) pixel centres ((j + 0.5) / w, (i + 0.5) / h), row-major."""
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
    return torch.stack((xs[None, :].expand(h, w), ys[:, None].expand(h, w)), dim=-1).reshape(-1, 2)


class MSDeformAttnPixelDecoder(nn.Module):
    """Returns (mask features at stride 4, [memories at strides 32, 16, 8])."""

    def __init__(
        self,
        in_channels: Sequence[int],
        feat_channels: int = 256,
        out_channels: int = 256,
        num_encoder_levels: int = 3,
        encoder_layers: int = 6,
        encoder_heads: int = 8,
        encoder_points: int = 4,
        encoder_ffn_channels: int = 1024,
        pos_num_feats: int = 128,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        self.num_encoder_levels = num_encoder_levels
        self.pos_num_feats = pos_num_feats
        # input_convs[0] takes the coarsest level: encoder levels run from low to high resolution.
        self.input_convs = nn.ModuleList(
            ConvGN(in_channels[self.num_inputs - 1 - i], feat_channels, 1, bias=True, num_groups=num_groups)
            for i in range(num_encoder_levels)
        )
        self.encoder = DeformableEncoder(
            encoder_layers,
            embed_dims=feat_channels,
            num_heads=encoder_heads,
            num_levels=num_encoder_levels,
            num_points=encoder_points,
            ffn_channels=encoder_ffn_channels,
        )
        self.level_encoding = nn.Embedding(num_encoder_levels, feat_channels)
        # FPN steps for the finer levels the encoder does not see, from coarse to fine.
        fpn_levels = range(self.num_inputs - num_encoder_levels - 1, -1, -1)
        self.lateral_convs = nn.ModuleList(
            ConvGN(in_channels[i], feat_channels, 1, bias=False, num_groups=num_groups) for i in fpn_levels
        )
        self.output_convs = nn.ModuleList(
            ConvGN(feat_channels, feat_channels, 3, bias=False, num_groups=num_groups, relu=True) for _ in fpn_levels
        )
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MMDetection's init: Xavier-uniform input convs, Caffe2-Xavier FPN convs and mask_feature,
        N(0, 1) level encodings, Xavier-normal encoder matrices, then the deformable-attention init."""
        for conv in _conv2d_layers(self.input_convs):
            nn.init.xavier_uniform_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        for conv in _conv2d_layers(self.lateral_convs, self.output_convs, self.mask_feature):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # Caffe2's "XavierFill"
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.level_encoding.weight)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for module in self.encoder.modules():
            if isinstance(module, MultiScaleDeformableAttention):  # each encoder layer's self_attn
                module.reset_parameters()

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        batch = feats[0].shape[0]
        tokens, positions, centres, shapes = [], [], [], []
        for i in range(self.num_encoder_levels):
            feat = feats[self.num_inputs - 1 - i]
            h, w = feat.shape[-2:]
            projected = self.input_convs[i](feat)
            pos = sine_positional_encoding(batch, h, w, self.pos_num_feats, feat.device).to(projected.dtype)
            pos = pos + self.level_encoding.weight[i].view(1, -1, 1, 1)
            tokens.append(projected.flatten(2).transpose(1, 2))
            positions.append(pos.flatten(2).transpose(1, 2))
            centres.append(pixel_centres(h, w, feat.device))
            shapes.append((h, w))
        # Every token samples all levels around its own pixel centre (the same normalised point).
        reference_points = torch.cat(centres).to(tokens[0].dtype)
        reference_points = reference_points[None, :, None, :].expand(batch, -1, self.num_encoder_levels, -1)
        memory = self.encoder(torch.cat(tokens, 1), torch.cat(positions, 1), reference_points, shapes)
        memory = memory.transpose(1, 2)
        outs = [
            level.reshape(batch, -1, h, w)
            for level, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=-1), shapes, strict=True)
        ]
        for step, i in enumerate(range(self.num_inputs - self.num_encoder_levels - 1, -1, -1)):
            lateral = self.lateral_convs[step](feats[i])
            upsampled = F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output_convs[step](lateral + upsampled))
        return self.mask_feature(outs[-1]), outs[: self.num_encoder_levels]


# --------------------------------------------------------------------------------------------
# Transformer decoder
# --------------------------------------------------------------------------------------------


class AttentionWithPos(nn.Module):
    """`nn.MultiheadAttention` (as `attn`) with positional terms added to queries and keys, and the
    residual: returns query + attn(query + query_pos, key + key_pos, value)."""

    def __init__(self, embed_dims: int, num_heads: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=attn_drop, batch_first=True)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # need_weights stays on, as in the official wrapper: it keeps PyTorch on the explicit
        # (baddbmm + softmax) path rather than the fused kernel.
        out = self.attn(query + query_pos, key + key_pos, value, attn_mask=attn_mask)[0]
        return query + out


class MaskedAttentionDecoderLayer(nn.Module):
    """Masked cross-attention, LN, self-attention, LN, FFN, LN."""

    def __init__(self, embed_dims: int, num_heads: int, ffn_channels: int) -> None:
        super().__init__()
        self.self_attn = AttentionWithPos(embed_dims, num_heads)
        self.cross_attn = AttentionWithPos(embed_dims, num_heads)
        self.ffn = FeedForward(embed_dims, ffn_channels)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(3))

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        query = self.norms[0](self.cross_attn(query, memory, memory, query_pos, memory_pos, attn_mask))
        query = self.norms[1](self.self_attn(query, query, query, query_pos, query_pos))
        return self.norms[2](self.ffn(query))


class MaskedAttentionDecoder(nn.Module):
    """The decoder layers and the post-norm that every prediction applies first."""

    def __init__(self, num_layers: int, embed_dims: int, num_heads: int, ffn_channels: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MaskedAttentionDecoderLayer(embed_dims, num_heads, ffn_channels) for _ in range(num_layers)
        )
        self.post_norm = nn.LayerNorm(embed_dims)


# --------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------


def semantic_scores(
    cls_scores: torch.Tensor, mask_preds: torch.Tensor, size: Sequence[int] | None = None
) -> torch.Tensor:
    """Per-pixel class scores (B, K, H, W) from one prediction: sum over queries of
    softmax(class logits) without "no object" times sigmoid(mask logits), the masks first resized
    bilinearly to `size` (align_corners False) when given. Values are probability products in
    [0, num_queries], not logits; their argmax is the semantic segmentation."""
    if size is not None and tuple(mask_preds.shape[-2:]) != tuple(size):
        mask_preds = F.interpolate(mask_preds, size=tuple(size), mode="bilinear", align_corners=False)
    class_probs = cls_scores.softmax(dim=-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", class_probs, mask_preds.sigmoid())


class Mask2FormerHead(nn.Module):
    """Pixel decoder + masked-attention decoder + per-layer class / mask predictions.

    `forward(feats)` returns (all_cls_scores, all_mask_preds): num_layers + 1 entries each,
    (B, Q, K + 1) class logits and (B, Q, H/4, W/4) mask logits; entry 0 comes from the learned
    query features alone, entry i > 0 from decoder layer i - 1.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        feat_channels: int = 256,
        out_channels: int = 256,
        num_queries: int = 100,
        num_transformer_feat_level: int = 3,
        encoder_layers: int = 6,
        encoder_heads: int = 8,
        encoder_points: int = 4,
        encoder_ffn_channels: int = 1024,
        decoder_layers: int = 9,
        decoder_heads: int = 8,
        decoder_ffn_channels: int = 2048,
        pos_num_feats: int | None = None,
        num_groups: int = 32,
        offset_learning: bool = False,
    ) -> None:
        super().__init__()
        pos_num_feats = feat_channels // 2 if pos_num_feats is None else pos_num_feats
        if 2 * pos_num_feats != feat_channels:
            raise ValueError(f"pos_num_feats must be feat_channels / 2 = {feat_channels / 2}, got {pos_num_feats}")
        if offset_learning and out_channels != feat_channels:
            raise ValueError("Offset Learning needs out_channels == feat_channels (mask embeddings meet mask features)")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_levels = num_transformer_feat_level
        self.num_heads = decoder_heads
        self.pos_num_feats = pos_num_feats
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels,
            feat_channels,
            out_channels,
            num_transformer_feat_level,
            encoder_layers,
            encoder_heads,
            encoder_points,
            encoder_ffn_channels,
            pos_num_feats,
            num_groups,
        )
        self.transformer_decoder = MaskedAttentionDecoder(
            decoder_layers, feat_channels, decoder_heads, decoder_ffn_channels
        )
        self.query_embed = nn.Embedding(num_queries, feat_channels)  # positional part of the queries
        self.query_feat = nn.Embedding(num_queries, feat_channels)  # initial query content
        self.level_embed = nn.Embedding(num_transformer_feat_level, feat_channels)
        self.cls_embed = nn.Linear(feat_channels, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(feat_channels, feat_channels),
            nn.ReLU(inplace=True),
            nn.Linear(feat_channels, feat_channels),
            nn.ReLU(inplace=True),
            nn.Linear(feat_channels, out_channels),
        )
        self.offset_learning = OffsetLearningMask(feat_channels) if offset_learning else None
        # MMDetection re-initialises every decoder matrix (attention projections included).
        for p in self.transformer_decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)

    def predict_layer(
        self, queries: torch.Tensor, mask_features: torch.Tensor, attn_mask_size: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One prediction from decoder output (B, Q, C): class logits, mask logits, and the boolean
        attention mask (B * heads, Q, h * w) for the next layer (True = not attended)."""
        queries = self.transformer_decoder.post_norm(queries)
        cls_pred = self.cls_embed(queries)
        mask_embed = self.mask_embed(queries)
        if self.offset_learning is not None:
            mask_embed, mask_features = self.offset_learning(mask_embed, mask_features)
        mask_pred = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = F.interpolate(mask_pred, size=tuple(attn_mask_size), mode="bilinear", align_corners=False)
        attn_mask = attn_mask.flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)
        attn_mask = (attn_mask.sigmoid() < 0.5).detach()
        return cls_pred, mask_pred, attn_mask

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        batch = feats[0].shape[0]
        mask_features, memories = self.pixel_decoder(feats)  # memories from low to high resolution
        keys, key_pos = [], []
        for i, memory in enumerate(memories):
            h, w = memory.shape[-2:]
            keys.append(memory.flatten(2).transpose(1, 2) + self.level_embed.weight[i].view(1, 1, -1))
            pos = sine_positional_encoding(batch, h, w, self.pos_num_feats, memory.device).to(memory.dtype)
            key_pos.append(pos.flatten(2).transpose(1, 2))
        queries = self.query_feat.weight.unsqueeze(0).repeat(batch, 1, 1)
        query_pos = self.query_embed.weight.unsqueeze(0).repeat(batch, 1, 1)

        cls_pred, mask_pred, attn_mask = self.predict_layer(queries, mask_features, memories[0].shape[-2:])
        all_cls_scores, all_mask_preds = [cls_pred], [mask_pred]
        for i, layer in enumerate(self.transformer_decoder.layers):
            level = i % self.num_levels
            # A query that would see nothing attends everywhere instead.
            attn_mask = attn_mask & (attn_mask.sum(-1) != attn_mask.shape[-1]).unsqueeze(-1)
            queries = layer(queries, query_pos, keys[level], key_pos[level], attn_mask)
            next_size = memories[(i + 1) % self.num_levels].shape[-2:]
            cls_pred, mask_pred, attn_mask = self.predict_layer(queries, mask_features, next_size)
            all_cls_scores.append(cls_pred)
            all_mask_preds.append(mask_pred)
        return all_cls_scores, all_mask_preds

    def predict(self, feats: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Semantic scores (B, K, *size) from the last prediction, as the official `predict()`."""
        all_cls_scores, all_mask_preds = self(feats)
        return semantic_scores(all_cls_scores[-1], all_mask_preds[-1], size)
