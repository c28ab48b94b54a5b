"""Writers of tiny datasets in each on-disk layout, for the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CAMVID_ROOT = Path("/work/shared/data/camvid")
CITYSCAPES_SAMPLE = Path("/work/shared/data/cityscapes-sample")
ADE20K_SAMPLE = Path("/work/shared/data/ade20k-sample")


def write_image(path: Path, size=(24, 32), seed: int = 0, fmt: str | None = None) -> Path:
    """A random RGB image of `size` = (H, W)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_label(path: Path, values, size=(24, 32)) -> Path:
    """A single-channel PNG label of `size` = (H, W) whose pixels cycle through `values`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.asarray(values, dtype=np.uint8)
    label = values[np.arange(size[0] * size[1]) % len(values)].reshape(size)
    Image.fromarray(label).save(path)
    return path


def make_ade20k(root: Path, train=("a", "b", "c"), val=("d", "e"), values=(0, 1, 2, 150, 255)) -> Path:
    base = root / "ADEChallengeData2016"
    for split, names in (("training", train), ("validation", val)):
        for i, name in enumerate(names):
            write_image(base / "images" / split / f"ADE_{split}_{name}.jpg", seed=i)
            write_label(base / "annotations" / split / f"ADE_{split}_{name}.png", values)
    return base


def make_cityscapes(root: Path, values=(0, 1, 13, 18, 255), cities=("aachen", "bochum")) -> Path:
    for split in ("train", "val"):
        for c, city in enumerate(cities):
            for i in range(2):
                stem = f"{city}_{i:06d}_000019"
                write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=c * 10 + i)
                write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", values)
                write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", (7, 8, 26, 33, 0))
    return root


def make_coco_stuff(root: Path, values=(0, 1, 170, 255), train=3, val=2) -> Path:
    for split, count in (("train2017", train), ("val2017", val)):
        for i in range(count):
            stem = f"{i:012d}"
            write_image(root / "images" / split / f"{stem}.jpg", seed=i)
            write_label(root / "annotations" / split / f"{stem}_labelTrainIds.png", values)
            write_label(root / "annotations" / split / f"{stem}.png", (0, 12, 181, 255))  # raw map, ignored
    return root


def make_pascal_context(
    root: Path, train=("2008_000001", "2008_000002"), val=("2008_000003",), values=(0, 1, 59, 255)
) -> Path:
    base = root / "VOCdevkit" / "VOC2010"
    lists = base / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True)
    for split, names in (("train", train), ("val", val)):
        (lists / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        for i, name in enumerate(names):
            write_image(base / "JPEGImages" / f"{name}.jpg", seed=i)
            write_label(base / "SegmentationClassContext" / f"{name}.png", values)
    return base


def make_split_folders(root: Path, splits=None, values=(0, 1, 2, 11), size=(24, 32), ext=".jpg") -> Path:
    """CamVid / folder layout: ROOT/SPLIT/images/*.ext with ROOT/SPLIT/labels/*.png."""
    splits = splits or {"train": 3, "val": 2, "test": 1}
    for split, count in splits.items():
        for i in range(count):
            write_image(root / split / "images" / f"f{i:03d}{ext}", size=size, seed=i)
            write_label(root / split / "labels" / f"f{i:03d}.png", values, size=size)
    return root
