"""Test-time inference: whole image, sliding window, multi-scale + flip, as MMSegmentation does it.

Inputs are normalised images (B, 3, H, W). The models need H and W to be multiples of
`model.size_divisor`, so every forward pass here pads (bottom and right, with 0 after
normalisation) and crops the logits back. Scores come back at `out_size` (the original image
size) after a bilinear resize with align_corners=False; the prediction is their argmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.layers.resample import AxisResample

__all__ = [
    "DEFAULT_TTA_SCALES",
    "default_test_mode",
    "infer",
    "model_device",
    "pad_to_divisor",
    "slide_inference",
    "slide_windows",
    "whole_inference",
    "whole_labels",
    "whole_labels_each",
]

# Scale ratios of the official test-time-augmentation pipelines.
DEFAULT_TTA_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _pair(value: Sequence[int] | int, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    h, w = (int(v) for v in value)
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be positive, got {h}x{w}")
    return h, w


def pad_to_divisor(x: torch.Tensor, divisor: int, value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom and right so H and W become multiples of `divisor`."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % divisor, -w % divisor
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), value=value)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def whole_inference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, K, H, W) for the whole image: pad to the model's size divisor, run, crop back."""
    h, w = x.shape[-2:]
    padded = pad_to_divisor(x, int(getattr(model, "size_divisor", 1) or 1))
    logits = model(padded)
    # Segmentor already returns input-size logits; a bare head output would be coarser.
    logits = _resize(logits, padded.shape[-2:])
    return logits[..., :h, :w]


def _head_logits(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`model.forward_logits` when `model(x)` is exactly "head logits resized bilinearly to the
    input size" (a Segmentor, or its `optimize_for_inference` copy), else None."""
    from .models.segmentor import Segmentor
    from .optimize import InferenceModel

    if isinstance(model, InferenceModel):
        inner = model.model
        if isinstance(inner, Segmentor) and type(inner).forward is Segmentor.forward:
            return model.forward_logits
    elif isinstance(model, Segmentor) and type(model).forward is Segmentor.forward:
        return model.forward_logits
    return None


def whole_labels(
    model: nn.Module, x: torch.Tensor, out_size: Sequence[int] | None = None, tile_rows: int = 32
) -> torch.Tensor:
    """Labels (B, H_out, W_out), int64: `infer(model, x, out_size=out_size).argmax(1)` without
    ever holding the full-resolution (B, K, H_out, W_out) logits.

    The head's low-resolution logits go through the same chain of linear maps as in
    `whole_inference` + `infer` (bilinear resize to the padded input, crop, bilinear resize to
    `out_size`), composed per axis into one banded resampling, applied a band of `tile_rows`
    output rows at a time, followed by the argmax. The logits computed this way equal the
    full-resolution ones up to float32 rounding (the sums run in another order), so labels can
    differ only where the top two classes are within rounding of each other. Models whose
    forward is not "head logits, resized" (Mask2Former) take the full-resolution route.
    """
    x = x.unsqueeze(0) if x.dim() == 3 else x
    h, w = x.shape[-2:]
    out_size = (h, w) if out_size is None else tuple(int(v) for v in out_size)
    head = _head_logits(model)
    if head is None:
        return _resize(whole_inference(model, x), out_size).argmax(dim=1)
    padded = pad_to_divisor(x, int(getattr(model, "size_divisor", 1) or 1))
    low = head(padded)
    if not isinstance(low, torch.Tensor) or low.dim() != 4:
        return _resize(whole_inference(model, x), out_size).argmax(dim=1)
    # Classes innermost (B, h, w, K): the resampling moves whole class vectors and the argmax
    # reduces a contiguous axis.
    return _labels_from_head(low.permute(0, 2, 3, 1).contiguous(), padded.shape[-2:], (h, w), out_size, tile_rows)


def whole_labels_each(
    model: nn.Module,
    x: torch.Tensor,
    sizes: Sequence[Sequence[int]],
    out_sizes: Sequence[Sequence[int]],
    tile_rows: int = 32,
) -> list[torch.Tensor]:
    """`whole_labels` of a batch of images of different sizes in one forward: x (B, 3, H, W) holds
    image i in its top-left sizes[i] = (h_i, w_i), zero-padded (as `pad_to_divisor` pads); its
    labels (out_sizes[i]), int64, are those of `whole_labels` on that image alone, up to the
    float32 rounding of the batched kernels."""
    if not (len(sizes) == len(out_sizes) == x.shape[0]):
        raise ValueError(f"{x.shape[0]} images, {len(sizes)} sizes and {len(out_sizes)} output sizes")
    head = _head_logits(model)
    padded = pad_to_divisor(x, int(getattr(model, "size_divisor", 1) or 1))
    low = None if head is None else head(padded)
    if not isinstance(low, torch.Tensor) or low.dim() != 4:
        scores = whole_inference(model, padded)
        return [
            _resize(scores[i : i + 1, :, : int(h), : int(w)], out).argmax(dim=1)[0]
            for i, ((h, w), out) in enumerate(zip(sizes, out_sizes, strict=True))
        ]
    low = low.permute(0, 2, 3, 1).contiguous()
    return [
        _labels_from_head(low[i : i + 1], padded.shape[-2:], (int(h), int(w)), tuple(int(v) for v in out), tile_rows)[0]
        for i, ((h, w), out) in enumerate(zip(sizes, out_sizes, strict=True))
    ]


def _labels_from_head(
    low: torch.Tensor, padded: Sequence[int], size: Sequence[int], out_size: Sequence[int], tile_rows: int
) -> torch.Tensor:
    """Labels (B, *out_size) of head logits `low` (B, h', w', K), classes innermost: resized
    bilinearly to the padded input, cropped to the image's `size`, resized to `out_size`, as one
    banded resampling per axis, a band of `tile_rows` output rows at a time."""
    rows = AxisResample.chain(low.shape[1], padded[0], size[0], out_size[0], low.dtype, low.device)
    cols = AxisResample.chain(low.shape[2], padded[1], size[1], out_size[1], low.dtype, low.device)
    labels = torch.empty(low.shape[0], *out_size, dtype=torch.long, device=low.device)
    for top in range(0, out_size[0], tile_rows):
        bottom = min(top + tile_rows, out_size[0])
        first, last = rows.band(top, bottom)
        # Columns first, on the few input rows this band reads; then rows.
        band = cols.apply_columns_last(low[:, first : last + 1])
        labels[:, top:bottom] = rows.apply_rows_last(band, top, bottom, first).argmax(dim=-1)
    return labels


def slide_windows(
    height: int, width: int, crop_size: Sequence[int] | int, stride: Sequence[int] | int
) -> list[tuple[int, int, int, int]]:
    """Windows (y1, y2, x1, x2) of the sliding-window scan, in MMSegmentation's order.

    The grid has ceil((H - crop) / stride) + 1 rows (at least one), likewise for columns. A window
    that would run past the image is shifted back inside it, so the last row and column end
    exactly at the border; on an image smaller than the crop the window is the whole side.
    """
    crop_h, crop_w = _pair(crop_size, "crop_size")
    stride_h, stride_w = _pair(stride, "stride")
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            y2 = min(row * stride_h + crop_h, height)
            x2 = min(col * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def slide_inference(
    model: nn.Module, x: torch.Tensor, crop_size: Sequence[int] | int, stride: Sequence[int] | int
) -> torch.Tensor:
    """Logits (B, K, H, W) averaged over overlapping crop_size windows taken every stride pixels.

    Each window goes through `whole_inference`, so a window smaller than the crop (image
    smaller than the crop) is padded to the size divisor where MMSegmentation would feed it as is.
    """
    height, width = x.shape[-2:]
    total: torch.Tensor | None = None
    hits = x.new_zeros((1, 1, height, width))
    for y1, y2, x1, x2 in slide_windows(height, width, crop_size, stride):
        logits = whole_inference(model, x[..., y1:y2, x1:x2])
        if total is None:
            total = logits.new_zeros((x.shape[0], logits.shape[1], height, width))
        total[..., y1:y2, x1:x2] += logits
        hits[..., y1:y2, x1:x2] += 1
    if total is None:
        raise ValueError(f"slide_inference: no window fits a {height}x{width} input")
    return total / hits


def _single_pass(
    model: nn.Module,
    x: torch.Tensor,
    mode: str,
    crop_size: Sequence[int] | int | None,
    stride: Sequence[int] | int | None,
) -> torch.Tensor:
    if mode == "whole":
        return whole_inference(model, x)
    if mode == "slide":
        if crop_size is None or stride is None:
            raise ValueError("slide inference needs crop_size and stride")
        return slide_inference(model, x, crop_size, stride)
    raise ValueError(f"unknown test mode {mode!r}: expected 'whole' or 'slide'")


def infer(
    model: nn.Module,
    image: torch.Tensor,
    mode: str = "whole",
    crop_size: Sequence[int] | int | None = None,
    stride: Sequence[int] | int | None = None,
    tta: bool = False,
    scales: Sequence[float] = DEFAULT_TTA_SCALES,
    flip: bool = True,
    out_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Scores (B, K, H_out, W_out) for a normalised image (B, 3, H, W) or (3, H, W).

    Without TTA the scores are logits. With `tta=True` they are the mean of softmax
    probabilities, as MMSegmentation's SegTTAModel merges them: for every scale ratio r (and,
    if `flip`, its horizontal mirror) the image is resized bilinearly to round(r * out_size)
    (r times the original image size, as the official TTA pipeline resizes the loaded image),
    inferred with `mode`, un-flipped, resized to out_size and passed through a softmax.
    Either way the predicted labels are `scores.argmax(1)`.
    `out_size` defaults to the input size. The model is used as it is (call .eval() first) and
    gradients are not disabled here.
    """
    x = image.unsqueeze(0) if image.dim() == 3 else image
    if x.dim() != 4:
        raise ValueError(f"infer: expected an image (3, H, W) or a batch (B, 3, H, W), got shape {tuple(image.shape)}")
    out_size = tuple(int(v) for v in (out_size if out_size is not None else x.shape[-2:]))
    if not tta:
        return _resize(_single_pass(model, x, mode, crop_size, stride), out_size)

    probs = None
    passes = 0
    for ratio in scales:
        size = (int(out_size[0] * ratio + 0.5), int(out_size[1] * ratio + 0.5))
        scaled = _resize(x, size)
        for mirrored in (False, True) if flip else (False,):
            view = scaled.flip(-1) if mirrored else scaled
            logits = _single_pass(model, view, mode, crop_size, stride)
            if mirrored:
                logits = logits.flip(-1)
            p = _resize(logits, out_size).softmax(dim=1)
            probs = p if probs is None else probs + p
            passes += 1
    if probs is None:
        raise ValueError("infer: TTA needs at least one scale")
    return probs / passes


# ----------------------------------------------------------------------------------------------
# Test modes of the official configs, per model family and dataset (SPEC section 3).

_DATASET_ALIASES = {
    "ade20k": "ade20k",
    "ade": "ade20k",
    "cityscapes": "cityscapes",
    "city": "cityscapes",
    "coco-stuff164k": "coco-stuff164k",
    "coco-stuff": "coco-stuff164k",
    "cocostuff": "coco-stuff164k",
    "coco-stuff-164k": "coco-stuff164k",
    "stuff164k": "coco-stuff164k",
    "pascal-context-59": "pascal-context-59",
    "pascal-context": "pascal-context-59",
    "pascal_context_59": "pascal-context-59",
    "camvid": "camvid",
    "folder": "folder",
}

# The dataset's usual protocol; model families below may override it.
_DATASET_DEFAULTS = {
    "ade20k": ("slide", 512, 480),
    "coco-stuff164k": ("slide", 512, 480),
    "cityscapes": ("slide", 1024, 768),
    "pascal-context-59": ("slide", 480, 320),
}


def _mode(mode: str, crop: int | None = None, stride: int | None = None) -> dict:
    if mode == "whole":
        return {"mode": "whole", "crop_size": None, "stride": None}
    return {"mode": "slide", "crop_size": (crop, crop), "stride": (stride, stride)}


def default_test_mode(model_name: str, dataset_name: str) -> dict:
    """`dict(mode, crop_size, stride)` that the official config of this model x dataset uses.

    OffSeg and SegFormer-OL: slide 512/480 on ADE20K and COCO-Stuff (the SegFormer-B0-OL
    COCO-Stuff config also says slide; its `mode='whole'` line is commented out), slide
    1024/768 on Cityscapes. SegNeXt-OL: whole on ADE20K / COCO-Stuff, slide 1024/768 on
    Cityscapes, 480/320 on Pascal Context. Mask2Former-OL: whole. CamVid, image folders and
    anything unknown: whole. (Whole inference is always padded to the size divisor.)
    """
    model = model_name.lower()
    dataset = _DATASET_ALIASES.get(dataset_name.lower(), dataset_name.lower())
    if model.startswith("mask2former"):
        return _mode("whole")
    if model.startswith("segnext") and dataset in ("ade20k", "coco-stuff164k"):
        return _mode("whole")
    if dataset in _DATASET_DEFAULTS:
        return _mode(*_DATASET_DEFAULTS[dataset])
    return _mode("whole")
