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
from .registry import register_model
from .segmentor import Segmentor

SEGFORMER_OPTIONS = ("drop_path_rate", "channels", "dropout_ratio")


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


def _register(size: str, offset_learning: bool) -> None:
    name = f"segformer-{size}{'-ol' if offset_learning else ''}"

    @register_model(name)
    def builder(num_classes: int = 150, **overrides) -> Segmentor:
        unknown = sorted(set(overrides) - set(SEGFORMER_OPTIONS))
        if unknown:
            raise TypeError(f"{name}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(SEGFORMER_OPTIONS)}")
        return build_segformer(size, num_classes, offset_learning=offset_learning, **overrides)

    builder.__name__ = name.replace("-", "_")
    head = "Offset Learning, logits at 1/8" if offset_learning else "per-pixel classifier, logits at 1/4"
    builder.__doc__ = f"SegFormer-{size.upper()} (MiT-{size.upper()} + all-MLP head, {head})."


for _size in MIT_ARCHS:
    _register(_size, offset_learning=False)
    _register(_size, offset_learning=True)
