"""The paper's data pipelines (MMSegmentation semantics), on uint8 RGB arrays.

Training: random keep-ratio resize (ratio 0.5-2.0 of a base scale, or — Mask2Former — a short
edge drawn from a list, capped by a maximum long edge) -> random crop with ``cat_max_ratio`` ->
horizontal flip -> photometric distortion -> normalise -> pad to the crop size (0 for the image,
255 for the label). Testing: keep-ratio resize of the image only.

Images stay uint8 (H, W, 3) RGB until normalisation, as in MMSegmentation, so the rounding and
clipping of each step match; resizing and the HSV conversions are OpenCV's own, as there. Every
random choice is drawn from a ``numpy.random.Generator`` the caller passes in, which makes a
sample's augmentation a pure function of that generator's seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .labels import IGNORE_INDEX

# OpenCV runs on the calling thread only, in every process: a thread pool started in the parent
# (on a machine with more than one core) deadlocks DataLoader workers forked after it, and the
# pipeline should not take cores from the training step anyway (MMEngine sets the same).
cv2.setNumThreads(0)

#: Per-channel normalisation of RGB images in [0, 255] (ImageNet statistics).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

# float32 copies shaped for (3, H, W) arithmetic; numpy rather than torch so the per-sample
# work never competes with the training step for torch's intra-op threads.
_MEAN = np.array(MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.array(STD, dtype=np.float32).reshape(3, 1, 1)


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image or uint8 array (H, W), (H, W, 3) or (H, W, 4) -> uint8 (H, W, 3) RGB."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {array.dtype}")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return array[:, :, :3]
    raise ValueError(f"expected an image array (H, W, 3), got shape {array.shape}")


def normalize_array(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W), (x - MEAN) / STD."""
    chw = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32)
    chw -= _MEAN
    chw /= _STD
    return chw


def normalize_image(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image (PIL or uint8 H x W x 3 array) -> float32 tensor (3, H, W), (x - MEAN) / STD."""
    return torch.from_numpy(normalize_array(to_rgb_array(image)))


def fit_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """(H, W) of a keep-ratio resize that fits the image inside `scale`.

    `scale` is read as (long edge, short edge) limits whatever its order, and sizes are rounded
    half up — MMCV's ``rescale_size``, so (2048, 512) gives a 512 short side unless the long
    side would pass 2048.
    """
    long_edge, short_edge = max(scale), min(scale)
    if short_edge <= 0:
        raise ValueError(f"a resize scale must be two positive sizes, got {tuple(scale)}")
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of uint8 (H, W, C) to `size` = (H, W): ``cv2.resize(..., INTER_LINEAR)``,
    as MMSegmentation. OpenCV's 8-bit bilinear is fixed-point, so the result does not depend on
    its thread count."""
    height, width = int(size[0]), int(size[1])
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (H, W) to `size` = (H, W): ``cv2.INTER_NEAREST``
    (source index floor(i * src / dst), no half-pixel shift)."""
    if label.shape[:2] == tuple(size):
        return label
    return cv2.resize(np.ascontiguousarray(label), (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST)


# --- photometric distortion ------------------------------------------------------------------
# OpenCV's 8-bit HSV (H in [0, 180), S and V in [0, 255]): the distortion rounds through that
# representation, so the exact values depend on it.


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 HSV with H in [0, 180): ``cv2.COLOR_RGB2HSV``."""
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)


def hsv_to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HSV (H in [0, 180)) -> uint8 RGB: ``cv2.COLOR_HSV2RGB``."""
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_HSV2RGB)


_LEVELS = np.arange(256, dtype=np.float32)
_IDENTITY = np.arange(256, dtype=np.uint8)


def _scale_and_shift_table(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # MMSegmentation's `convert`: float32 x * alpha + beta, clipped to [0, 255], truncated to
    # uint8. The result depends only on the uint8 input value, so it is computed once per value
    # and applied with cv2.LUT (the same numbers, without the float image).
    return np.clip(_LEVELS * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def _apply_per_channel(image: np.ndarray, tables: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    return cv2.LUT(np.ascontiguousarray(image), np.stack(tables, axis=-1).reshape(256, 1, 3))


def adjust_colours(
    image: np.ndarray,
    brightness: float | None = None,
    contrast: float | None = None,
    saturation: float | None = None,
    hue: int | None = None,
    contrast_first: bool = True,
) -> np.ndarray:
    """Deterministic core of the photometric distortion; None skips a step.

    brightness adds a value, contrast scales all channels, saturation scales S in 8-bit HSV,
    hue adds to H modulo 180. Each step clips to [0, 255] and truncates to uint8 (as
    MMSegmentation), and saturation and hue each round-trip through 8-bit HSV separately.
    """
    image = np.ascontiguousarray(image)
    if brightness is not None:
        image = cv2.LUT(image, _scale_and_shift_table(beta=brightness))
    if contrast_first and contrast is not None:
        image = cv2.LUT(image, _scale_and_shift_table(alpha=contrast))
    if saturation is not None:
        hsv = _apply_per_channel(rgb_to_hsv(image), (_IDENTITY, _scale_and_shift_table(alpha=saturation), _IDENTITY))
        image = hsv_to_rgb(hsv)
    if hue is not None:
        shifted = ((_IDENTITY.astype(np.int64) + hue) % 180).astype(np.uint8)
        image = hsv_to_rgb(_apply_per_channel(rgb_to_hsv(image), (shifted, _IDENTITY, _IDENTITY)))
    if not contrast_first and contrast is not None:
        image = cv2.LUT(image, _scale_and_shift_table(alpha=contrast))
    return image


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: float = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """MMSegmentation's PhotoMetricDistortion on uint8 RGB; each step happens with p = 0.5.

    Draws, in the original's order: brightness (add U(-delta, delta)); whether contrast
    (scale by U(range)) comes first or last; saturation (scale S by U(range)); hue (add an
    integer in [-delta, delta) — numpy's exclusive upper bound, as in the original).
    """
    brightness = rng.uniform(-brightness_delta, brightness_delta) if rng.integers(2) else None
    contrast_first = bool(rng.integers(2))
    contrast = None
    if contrast_first and rng.integers(2):
        contrast = rng.uniform(*contrast_range)
    saturation = rng.uniform(*saturation_range) if rng.integers(2) else None
    hue = int(rng.integers(-hue_delta, hue_delta)) if rng.integers(2) else None
    if not contrast_first and rng.integers(2):
        contrast = rng.uniform(*contrast_range)
    return adjust_colours(image, brightness, contrast, saturation, hue, contrast_first)


# --- geometric steps --------------------------------------------------------------------------
def random_resize_size(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: Sequence[int],
    ratio_range: tuple[float, float] = (0.5, 2.0),
) -> tuple[int, int]:
    """The (H, W) of MMSegmentation's RandomResize(keep_ratio=True): `scale` = (w, h) times a
    ratio drawn uniformly from `ratio_range` (truncated to ints), then fitted keeping the ratio."""
    low, high = ratio_range
    ratio = rng.random() * (high - low) + low
    return fit_size(height, width, (int(scale[0] * ratio), int(scale[1] * ratio)))


def shortest_edge_size(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """The (H, W) of MMSegmentation's ResizeShortestEdge(scale=short_edge, max_size=max_size).

    The short side becomes `short_edge` unless the long side would then pass `max_size`, in which
    case both shrink so that the long side is `max_size`; the sides are rounded half up. The
    original then resizes with MMCV's keep-ratio Resize to that (w, h) as a scale, which rounds a
    second time from the original size — `fit_size` reproduces that step, so the result is the
    original's even where the two roundings disagree by a pixel.
    """
    size = float(short_edge)
    factor = size / min(height, width)
    new_h, new_w = (size, factor * width) if height < width else (factor * height, size)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return fit_size(height, width, (int(new_w + 0.5), int(new_h + 0.5)))


def random_short_edge_size(
    height: int, width: int, rng: np.random.Generator, short_edges: Sequence[int], max_size: int
) -> tuple[int, int]:
    """The (H, W) of MMCV's RandomChoiceResize(scales=short_edges, resize_type='ResizeShortestEdge',
    max_size=max_size): one short edge drawn uniformly from the list, then `shortest_edge_size`."""
    short_edge = short_edges[int(rng.integers(len(short_edges)))]
    return shortest_edge_size(height, width, int(short_edge), max_size)


def random_resize(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    scale: Sequence[int],
    ratio_range: tuple[float, float] = (0.5, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (bilinear) and label (nearest) to `random_resize_size`."""
    size = random_resize_size(image.shape[0], image.shape[1], rng, scale, ratio_range)
    return resize_image(image, size), resize_label(label, size)


def random_crop_window(
    label: np.ndarray,
    rng: np.random.Generator,
    crop_size: tuple[int, int],
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of MMSegmentation's RandomCrop on a map of `label`'s size.

    The crop is `crop_size` (h, w), or the whole map where it is smaller (padding comes
    later). With ``cat_max_ratio < 1`` it is redrawn, up to 10 times, while a single class
    covers at least that fraction of the labelled pixels or fewer than two classes are present;
    the 11th draw is kept unchecked.
    """
    margin_h = max(label.shape[0] - crop_size[0], 0)
    margin_w = max(label.shape[1] - crop_size[1], 0)

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            window = label[top : top + crop_size[0], left : left + crop_size[1]]
            counts = np.bincount(window.ravel(), minlength=256)
            counts[ignore_index] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left, min(crop_size[0], label.shape[0]), min(crop_size[1], label.shape[1])


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop_size: tuple[int, int],
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop image and label at `random_crop_window`."""
    top, left, height, width = random_crop_window(label, rng, crop_size, cat_max_ratio, ignore_index)
    rows, cols = slice(top, top + height), slice(left, left + width)
    return image[rows, cols], label[rows, cols]


def random_flip(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Mirror both left-right with probability `prob`."""
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def pad_to(
    image: torch.Tensor, label: torch.Tensor, size: tuple[int, int], ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a normalised image (3, h, w) with 0 and its label (h, w) with `ignore_index` at the
    bottom and right up to `size` = (H, W)."""
    pad_h, pad_w = size[0] - image.shape[1], size[1] - image.shape[2]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"cannot pad {tuple(image.shape[1:])} to the smaller size {tuple(size)}")
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)
    return image, label


def _padded_tensors(
    image: np.ndarray, label: np.ndarray, size: tuple[int, int], ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # `pad_to` in numpy: normalise straight into a zero canvas of the crop size (no canvas when
    # the crop already has that size, the usual case).
    height, width = label.shape
    if (height, width) == tuple(size):
        return torch.from_numpy(normalize_array(image)), torch.from_numpy(label.astype(np.int64))
    canvas = np.zeros((3, *size), dtype=np.float32)
    canvas[:, :height, :width] = normalize_array(image)
    label_canvas = np.full(size, ignore_index, dtype=np.int64)
    label_canvas[:height, :width] = label
    return torch.from_numpy(canvas), torch.from_numpy(label_canvas)


class TrainPipeline:
    """The paper's training augmentation, from a loaded (image, label) to fixed-size tensors.

    `scale` = (w, h) is the base of the random resize, or None to use each image's own size;
    `crop_size` = (h, w) is also the output size. `photometric=False` turns the colour
    distortion off (the geometry stays).

    `short_edges` (a list of ints) replaces the ratio-based resize by Mask2Former's: a short edge
    drawn uniformly from the list, the long edge capped at `max_size` (see
    `random_short_edge_size`); `scale` and `ratio_range` are then unused.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale: tuple[int, int] | None,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        ignore_index: int = IGNORE_INDEX,
        short_edges: Sequence[int] | None = None,
        max_size: int = 2048,
    ):
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale = None if scale is None else (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        if short_edges is not None:
            short_edges = tuple(int(edge) for edge in short_edges)
            if not short_edges or min(short_edges) < 1:
                raise ValueError(f"short_edges must be a non-empty list of positive ints, got {list(short_edges)}")
        if int(max_size) < 1:
            raise ValueError(f"max_size must be a positive int, got {max_size}")
        self.short_edges = short_edges
        self.max_size = int(max_size)
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = bool(photometric)
        self.ignore_index = int(ignore_index)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.short_edges is not None:
            size = random_short_edge_size(image.shape[0], image.shape[1], rng, self.short_edges, self.max_size)
        else:
            scale = self.scale or (image.shape[1], image.shape[0])
            size = random_resize_size(image.shape[0], image.shape[1], rng, scale, self.ratio_range)
        label = resize_label(label, size)
        top, left, height, width = random_crop_window(label, rng, self.crop_size, self.cat_max_ratio, self.ignore_index)
        image = resize_image(image, size)[top : top + height, left : left + width]
        label = label[top : top + height, left : left + width]
        image, label = random_flip(image, label, rng, self.flip_prob)
        if self.photometric:
            image = photometric_distortion(image, rng)
        return _padded_tensors(image, label, self.crop_size, self.ignore_index)

    def __repr__(self) -> str:
        if self.short_edges is not None:
            resize = f"short_edges={list(self.short_edges)}, max_size={self.max_size}"
        else:
            resize = f"scale={self.scale}, ratio_range={self.ratio_range}"
        return (
            f"{type(self).__name__}(crop_size={self.crop_size}, {resize}, "
            f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, photometric={self.photometric})"
        )


class TestPipeline:
    """Keep-ratio resize of the image to fit `scale` = (w, h) (None: unchanged), normalised;
    the label is returned as loaded, at the original size."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, scale: tuple[int, int] | None):
        self.scale = None if scale is None else (int(scale[0]), int(scale[1]))

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare_image(image), torch.from_numpy(label.astype(np.int64))

    def prepare_image(self, image: np.ndarray) -> torch.Tensor:
        """The image alone (what `offseg.predict` needs): resized, normalised, (3, h, w)."""
        if self.scale is not None:
            image = resize_image(image, fit_size(image.shape[0], image.shape[1], self.scale))
        return torch.from_numpy(normalize_array(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"
