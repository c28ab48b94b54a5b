"""OffSeg-T/B/L: EfficientFormerV2 + FreqFusion + Offset Learning, with per-pixel and
single-branch variants of the same networks for the paper's comparisons.

Variants of each size (X = t, b, l):
  offseg-X          the official model (Offset Learning, both branches)
  offseg-X-pixel    per-pixel baseline: the fused feature -> dropout -> 1x1 classifier
  offseg-X-co       class offsets only: masks = LN(E (W + dW)^T); no feature-offset projection
  offseg-X-fo       feature offsets only: masks = LN((E + dE) W^T); no class-offset projection
"""

from __future__ import annotations

from typing import TypedDict

from .backbones.efficientformer_v2 import EfficientFormerV2
from .heads.offseg_head import OffSegHead
from .registry import register_variant
from .segmentor import Segmentor


class OffSegSize(TypedDict):
    arch: str  # EfficientFormerV2 architecture
    in_channels: tuple[int, ...]  # backbone output channels, fine to coarse
    new_channels: tuple[int, ...]  # the head's per-level channels


OFFSEG_SIZES: dict[str, OffSegSize] = {
    "t": OffSegSize(arch="s1", in_channels=(32, 48, 120, 224), new_channels=(32, 32, 64, 128)),
    "b": OffSegSize(arch="s2", in_channels=(32, 64, 144, 288), new_channels=(32, 64, 128, 256)),
    "l": OffSegSize(arch="l", in_channels=(40, 80, 192, 384), new_channels=(32, 64, 128, 256)),
}
OFFSEG_VARIANTS = {"": "offset", "-pixel": "pixel", "-co": "offset-class", "-fo": "offset-feature"}


def build_offseg(
    size: str,
    num_classes: int = 150,
    classifier: str = "offset",
    freeze_bn: bool = False,
    drop_path_rate: float | None = None,
    channels: int = 256,
    dropout_ratio: float = 0.1,
) -> Segmentor:
    cfg = OFFSEG_SIZES[size]
    backbone = EfficientFormerV2(cfg["arch"], drop_path_rate=drop_path_rate, freeze_bn=freeze_bn)
    head = OffSegHead(
        cfg["in_channels"],
        cfg["new_channels"],
        num_classes,
        channels=channels,
        dropout_ratio=dropout_ratio,
        classifier=classifier,
    )
    suffix = next(s for s, c in OFFSEG_VARIANTS.items() if c == classifier)
    return Segmentor(backbone, head, size_divisor=32, name=f"offseg-{size}{suffix}")


for _size in OFFSEG_SIZES:
    for _suffix, _classifier in OFFSEG_VARIANTS.items():
        register_variant(
            f"offseg-{_size}{_suffix}",
            build_offseg,
            f"OffSeg-{_size.upper()} ({_classifier} classifier).",
            size=_size,
            classifier=_classifier,
        )
