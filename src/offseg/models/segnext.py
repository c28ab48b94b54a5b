"""SegNeXt-T/S/B/L (MSCAN encoder + LightHam head), per-pixel and with Offset Learning.

  segnext-X       LightHamHead: dropout + 1x1 classifier, logits at 1/8
  segnext-X-ol    LightHamHeadOffsetLearning: Offset Learning instead, logits at 1/8

Settings follow MMSegmentation's SegNeXt configs (configs/segnext/*_ade20k-512x512.py) and
OffSeg's (local_configs/segnext_offset_learning/*/..._ade20k-512x512.py), which agree on
everything but the head type: GN(32) in the head, NMF rank 16 with one spatial group, 6 / 7 NMF
steps in training / eval, dropout 0.1, stochastic depth 0.1 (L: 0.3). The head width
(`channels` = `ham_channels`) is 256 for T and S, 512 for B, 1024 for L. OffSeg publishes no
SegNeXt-L + OL config: segnext-l-ol is the MMSegmentation L configuration with the
Offset-Learning head.

The NMF draws random bases at every forward; see `offseg.models.heads.ham_head` for seeding and
`model.decode_head.set_generator(...)` (or the `nmf_seed` option) for deterministic evaluation.
"""

from __future__ import annotations

from .backbones.mscan import MSCAN, MSCAN_ARCHS
from .heads.ham_head import LightHamHead, LightHamHeadOffsetLearning
from .registry import register_variant
from .segmentor import Segmentor

SEGNEXT_HEAD_WIDTHS = {"t": 256, "s": 256, "b": 512, "l": 1024}


def build_segnext(
    size: str,
    num_classes: int = 150,
    offset_learning: bool = False,
    drop_path_rate: float | None = None,
    dropout_ratio: float = 0.1,
    nmf_seed: int | None = None,
) -> Segmentor:
    """SegNeXt of `size` ("t", "s", "b", "l"); `offset_learning` picks the Offset-Learning head.

    drop_path_rate: stochastic depth of the encoder (None: the config's, 0.1 or 0.3 for L).
    nmf_seed: if set, every forward starts the NMF from the bases that this seed gives (see
    `LightHamHead.set_generator`); None keeps the official behaviour (global RNG).
    """
    name = f"segnext-{size}{'-ol' if offset_learning else ''}"
    if size not in MSCAN_ARCHS:
        raise ValueError(f"unknown SegNeXt size {size!r} (expected one of {', '.join(MSCAN_ARCHS)})")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be a positive integer, got {num_classes!r}")
    backbone = MSCAN(size, drop_path_rate=drop_path_rate)
    width = SEGNEXT_HEAD_WIDTHS[size]
    head_cls = LightHamHeadOffsetLearning if offset_learning else LightHamHead
    head = head_cls(
        backbone.out_channels[1:],
        num_classes,
        channels=width,
        ham_channels=width,
        in_index=(1, 2, 3),
        dropout_ratio=dropout_ratio,
    )
    if nmf_seed is not None:
        head.set_generator(nmf_seed)
    return Segmentor(backbone, head, size_divisor=32, name=name)


for _size in MSCAN_ARCHS:
    for _ol in (False, True):
        _note = (
            " No official OffSeg config exists for L: MMSegmentation's L settings with the OL head."
            if (_size == "l" and _ol)
            else ""
        )
        register_variant(
            f"segnext-{_size}{'-ol' if _ol else ''}",
            build_segnext,
            f"SegNeXt-{_size.upper()} (MSCAN-{_size.upper()} + LightHam head, "
            f"{'Offset Learning' if _ol else 'per-pixel classifier'}, logits at 1/8).{_note}",
            size=_size,
            offset_learning=_ol,
        )
