"""Colour label maps and overlays, for people who would rather look than read."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def default_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """A fixed, well-spread palette (K, 3) uint8 for datasets that bring none."""
    rng = np.random.default_rng(seed)
    return rng.integers(30, 256, size=(num_classes, 3), dtype=np.uint8)


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray, ignore_index: int = 255) -> Image.Image:
    """Label map (H, W) of class indices -> RGB image; ignored pixels are black."""
    palette = np.asarray(palette, dtype=np.uint8)
    label = np.asarray(label)
    rgb = np.zeros((*label.shape, 3), dtype=np.uint8)
    valid = (label >= 0) & (label < len(palette)) & (label != ignore_index)
    rgb[valid] = palette[label[valid]]
    return Image.fromarray(rgb)


def palette_image(label: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray) -> Image.Image:
    """Label map as a single-channel 'P' PNG: class indices stay readable, viewers show colours."""
    img = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    pal = np.asarray(palette, dtype=np.uint8)[:255]
    flat[: len(pal)] = pal
    img.putpalette(flat.reshape(-1).tolist())
    return img


def overlay(
    image: Image.Image | np.ndarray,
    label: np.ndarray,
    palette: Sequence[Sequence[int]] | np.ndarray,
    alpha: float = 0.5,
    ignore_index: int = 255,
) -> Image.Image:
    """Blend the colour label map over the RGB image (same size); ignored pixels keep the image."""
    base = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    colour = np.asarray(colorize(label, palette, ignore_index), dtype=np.float32)
    if base.shape != colour.shape:
        raise ValueError(f"overlay: image {base.shape[:2]} and label {colour.shape[:2]} differ in size")
    keep = (np.asarray(label) == ignore_index)[..., None]
    out = np.where(keep, base, (1 - alpha) * base + alpha * colour)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
