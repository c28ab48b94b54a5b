"""SegFormer-B0..B5 (MiT encoder + all-MLP head), per-pixel and with Offset Learning.

  segformer-bN      SegformerHead: per-pixel 1x1 classifier, logits at 1/4
  segformer-bN-ol   SegformerHeadOffsetLearning: 2x2 max-pool then Offset Learning, logits at 1/8

Settings follow MMSegmentation's SegFormer configs and OffSeg's segformer_offset_learning
configs: head width 256 for every size (the original SegFormer used 768 for B2..B5), BN in the
head, stochastic depth 0.1 in the encoder.
"""

from __future__ import annotations

from .backbones.mit import MIT_ARCHS, MixVisionTransformer
from .heads.segformer_head import SegformerHead, SegformerHeadOffsetLearning
from .registry import register_variant
from .segmentor import Segmentor


def build_segformer(
    size: str,
    num_classes: int = 150,
    offset_learning: bool = False,
    drop_path_rate: float = 0.1,
    channels: int = 256,
    dropout_ratio: float = 0.1,
) -> Segmentor:
    """SegFormer of `size` ("b0".."b5"); `offset_learning` picks the Offset-Learning head."""
    name = f"segformer-{size}{'-ol' if offset_learning else ''}"
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be a positive integer, got {num_classes!r}")
    backbone = MixVisionTransformer(size, drop_path_rate=drop_path_rate)
    head_cls = SegformerHeadOffsetLearning if offset_learning else SegformerHead
    head = head_cls(backbone.out_channels, num_classes, channels=channels, dropout_ratio=dropout_ratio)
    return Segmentor(backbone, head, size_divisor=32, name=name)


for _size in MIT_ARCHS:
    for _ol, _head in ((False, "per-pixel classifier, logits at 1/4"), (True, "Offset Learning, logits at 1/8")):
        register_variant(
            f"segformer-{_size}{'-ol' if _ol else ''}",
            build_segformer,
            f"SegFormer-{_size.upper()} (MiT-{_size.upper()} + all-MLP head, {_head}).",
            size=_size,
            offset_learning=_ol,
        )
