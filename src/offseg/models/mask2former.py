"""Mask2Former with a Swin-T backbone, with and without Offset Learning.

  mask2former-swin-t      MMSegmentation's Mask2Former Swin-T (ADE20K config): 47,439,633 params
  mask2former-swin-t-ol   OffSeg's Mask2FormerHeadOffsetLearning on the same network: 47,570,705

Both take `num_classes` and the named size overrides of `build_mask2former` (defaults are the
official Swin-T configuration); `MASK2FORMER_REDUCED` holds the small configuration of the
reference vectors, e.g. `create_model("mask2former-swin-t-ol", **MASK2FORMER_REDUCED)`.

What the model methods return (inputs are normalised images with sides multiple of 32):
- `model(x)`: semantic scores (B, K, H, W) at the input size, exactly the official `predict()`:
  the last mask logits resized bilinearly to the input, then sum over queries of
  softmax(class logits)[:K] x sigmoid(masks). These are probabilities summed over queries, not
  logits; take the argmax for a segmentation.
- `model.forward_logits(x)`: the decode head's raw output, `(all_cls_scores, all_mask_preds)`,
  lists of num_decoder_layers + 1 tensors (B, Q, K + 1) and (B, Q, H/4, W/4) (entry 0 from the
  learned queries, entry i from decoder layer i - 1). This is what training needs (the loss
  supervises every entry); `forward_train_outputs` is the same call under that name. FLOPs of
  `forward_logits` are the reference figures' "head forward" column, those of `model(x)` the
  "+ predict()" column.
- `model.semantic_scores(outputs, size=None)`: scores from raw outputs, at mask resolution by
  default.
- `model.loss(images, labels)`: the training loss, the sum of `Mask2FormerLoss` (class, mask and
  dice terms of every decoder prediction) for semantic labels (B, H, W) at the input size
  (255 = ignore). `offseg train` uses it instead of per-pixel cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .backbones.swin import SWIN_T, SwinTransformer
from .heads.mask2former_head import Mask2FormerHead, semantic_scores
from .losses.mask2former_loss import Mask2FormerLoss
from .registry import register_variant
from .segmentor import SegmentorBase

# The reduced configuration of the reference vectors (mask2former_swin_reduced*): same structure,
# smaller widths and depths.
MASK2FORMER_REDUCED = dict(
    embed_dims=32,
    depths=(1, 1, 2, 1),
    num_heads=(1, 2, 4, 8),
    feat_channels=64,
    encoder_layers=1,
    encoder_heads=4,
    decoder_layers=3,
    num_queries=10,
)

Mask2FormerOutputs = tuple[list[torch.Tensor], list[torch.Tensor]]


class Mask2FormerSegmentor(SegmentorBase):
    """Swin backbone + Mask2Former head; see the module docstring for what each method returns."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, size_divisor: int = 32, name: str = "") -> None:
        super().__init__(backbone, decode_head, size_divisor, name)
        # The criterion holds no parameters and only a non-persistent buffer (the class weights),
        # so the state dict keeps exactly the official keys; as a submodule it follows `.to()`.
        self.criterion = Mask2FormerLoss(self.num_classes)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss: the sum of the Mask2Former loss terms over all decoder predictions,
        for semantic labels (B, H, W) at the input size (255 = ignore)."""
        all_cls_scores, all_mask_preds = self.forward_train_outputs(images)
        return sum(self.criterion(all_cls_scores, all_mask_preds, labels).values())

    def forward_logits(self, x: torch.Tensor) -> Mask2FormerOutputs:
        """Raw per-layer (all_cls_scores, all_mask_preds) of the decode head."""
        self.check_input(x)
        return self.decode_head(self.backbone(x))

    def forward_train_outputs(self, x: torch.Tensor) -> Mask2FormerOutputs:
        """The per-layer outputs the Mask2Former loss needs (same as `forward_logits`)."""
        return self.forward_logits(x)

    @staticmethod
    def semantic_scores(outputs: Mask2FormerOutputs, size: Sequence[int] | None = None) -> torch.Tensor:
        """Semantic scores (B, K, h, w) from the last prediction, masks resized to `size` if given."""
        all_cls_scores, all_mask_preds = outputs
        return semantic_scores(all_cls_scores[-1], all_mask_preds[-1], size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.semantic_scores(self.forward_logits(x), size=x.shape[-2:])


def build_mask2former(
    num_classes: int = 150,
    offset_learning: bool = False,
    *,
    embed_dims: int = SWIN_T["embed_dims"],
    depths: Sequence[int] = SWIN_T["depths"],
    num_heads: Sequence[int] = SWIN_T["num_heads"],
    window_size: int = 7,
    drop_path_rate: float = 0.3,
    feat_channels: int = 256,
    out_channels: int | None = None,
    num_queries: int = 100,
    encoder_layers: int = 6,
    encoder_heads: int = 8,
    encoder_points: int = 4,
    encoder_ffn_channels: int = 1024,
    decoder_layers: int = 9,
    decoder_heads: int = 8,
    decoder_ffn_channels: int = 2048,
    pos_num_feats: int | None = None,
    num_groups: int = 32,
) -> Mask2FormerSegmentor:
    """Mask2Former with a Swin backbone; the defaults are the official Swin-T ADE20K configuration.

    Backbone: embed_dims (stage i has embed_dims * 2^i channels), depths and num_heads per stage,
      window_size, drop_path_rate (stochastic depth, linear over all blocks).
    Pixel decoder: feat_channels (width of the pixel decoder and of the transformer decoder),
      out_channels (mask-feature / mask-embedding width, default feat_channels), encoder_layers,
      encoder_heads / encoder_points (deformable attention heads and sampling points per level),
      encoder_ffn_channels, num_groups (GroupNorm groups), pos_num_feats (sine-encoding features per
      axis; must be feat_channels / 2, the default).
    Transformer decoder: num_queries, decoder_layers, decoder_heads, decoder_ffn_channels.
    """
    name = f"mask2former-swin-t{'-ol' if offset_learning else ''}"
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be a positive integer, got {num_classes!r}")
    backbone = SwinTransformer(embed_dims, depths, num_heads, window_size=window_size, drop_path_rate=drop_path_rate)
    head = Mask2FormerHead(
        backbone.out_channels,
        num_classes,
        feat_channels=feat_channels,
        out_channels=feat_channels if out_channels is None else out_channels,
        num_queries=num_queries,
        encoder_layers=encoder_layers,
        encoder_heads=encoder_heads,
        encoder_points=encoder_points,
        encoder_ffn_channels=encoder_ffn_channels,
        decoder_layers=decoder_layers,
        decoder_heads=decoder_heads,
        decoder_ffn_channels=decoder_ffn_channels,
        pos_num_feats=pos_num_feats,
        num_groups=num_groups,
        offset_learning=offset_learning,
    )
    return Mask2FormerSegmentor(backbone, head, size_divisor=32, name=name)


register_variant(
    "mask2former-swin-t",
    build_mask2former,
    "Mask2Former Swin-T (MMSegmentation); overrides: see `build_mask2former`.",
    offset_learning=False,
)
register_variant(
    "mask2former-swin-t-ol",
    build_mask2former,
    "Mask2Former Swin-T with Offset Learning (OffSeg); overrides: see `build_mask2former`.",
    offset_learning=True,
)
