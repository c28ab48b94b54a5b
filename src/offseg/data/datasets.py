"""Segmentation datasets in their standard on-disk layouts.

``build_dataset(name, root, split, pipeline)`` finds the image/label pairs of one split, checks
that every image has a label and every label an image, and returns a ``torch`` Dataset whose
items are dicts::

    image       float32 (3, H, W), RGB, normalised with MEAN / STD
    label       int64 (H, W), class ids, 255 = ignore
    image_path  str
    label_path  str
    ori_size    (H, W) of the original image (test pipeline only)

Train items are ``crop_size`` tensors (padded with 0 / 255), so the default collate batches
them. Test items keep the label at the original size and resize only the image (to the
dataset's test scale; CamVid and folder datasets: unchanged).

Randomness: the augmentation of a sample is drawn from a generator seeded with
``(seed, epoch, index)``, never from global state. A sample therefore looks the same whichever
DataLoader worker loads it, and a run is reproducible whatever ``num_workers`` is. The epoch
comes from ``set_epoch`` or, better, from the index itself: ``dataset[(index, epoch)]`` — which
is what `InfiniteSampler` yields, so persistent workers see the right epoch too.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .labels import (
    CLASSES_FILE,
    DATASET_NAMES,
    IGNORE_INDEX,
    DatasetInfo,
    canonical_name,
    dataset_info,
    label_lookup,
    read_classes_file,
    valid_raw_values,
)
from .transforms import TestPipeline, TrainPipeline

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset's files are missing, unpaired, unreadable or inconsistent; names the file."""


# --- reading files ---------------------------------------------------------------------------
def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB; corrupt or truncated files raise DatasetError."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated data fails here and not later
            return np.array(img if img.mode == "RGB" else img.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: cannot read image ({err})") from err


def read_label(path: str | Path) -> np.ndarray:
    """A label file as uint8 (H, W) raw class values.

    Accepts single-channel PNGs (8-bit grey, palette indices, or 16-bit with values < 256);
    colour label images are refused, since their colours are not class ids.
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            array = np.array(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: label file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: cannot read label image ({err})") from err
    if array.ndim != 2:
        raise DatasetError(
            f"{path}: label must be a single-channel image of class ids, got mode {mode} "
            f"with shape {array.shape} (a colour-coded label needs converting to ids first)"
        )
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DatasetError(
                f"{path}: label values range {array.min()}..{array.max()}, beyond the 0..255 of class ids"
            )
        array = array.astype(np.uint8)
    return array


def _describe_values(allowed: np.ndarray) -> str:
    """Ranges of the True entries of a (256,) table, e.g. '0-11, 255'."""
    values = np.flatnonzero(allowed)
    parts: list[str] = []
    start = prev = None
    for v in values.tolist() + [None]:
        if v is not None and prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = v
    return ", ".join(parts)


# --- finding files ---------------------------------------------------------------------------
@dataclass
class Scan:
    """The pairs of one split, and what could not be paired (as readable messages)."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        parent = path.parent
        hint = ""
        if parent.is_dir():
            found = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
            hint = f" (found there: {', '.join(found[:12]) or 'no folders'})"
        raise FileNotFoundError(f"{path}: {what} not found{hint}")
    return path


def _files_with_suffix(folder: Path, suffixes: Sequence[str], recursive: bool = False) -> list[Path]:
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    lowered = tuple(s.lower() for s in suffixes)
    return sorted(p for p in pattern if p.name.lower().endswith(lowered) and not p.name.startswith(".") and p.is_file())


def _keyed(files: list[Path], key_of, kind: str, problems: list[str]) -> dict[str, Path]:
    """Map key -> file; two files with one key are a problem (which label goes with which?)."""
    keyed: dict[str, Path] = {}
    for path in files:
        key = key_of(path)
        if key in keyed:
            problems.append(f"{path}: another {kind} has the same name stem: {keyed[key]}")
            continue
        keyed[key] = path
    return keyed


def _pair(images: dict[str, Path], labels: dict[str, Path], expected_label, problems: list[str]) -> Scan:
    scan = Scan(problems=problems)
    for key, image in images.items():
        if key in labels:
            scan.pairs.append((image, labels[key]))
        else:
            scan.problems.append(f"{image}: image without label (expected {expected_label(key)})")
    for key in sorted(set(labels) - set(images)):
        scan.problems.append(f"{labels[key]}: label without image")
    return scan


def _stem_pairs(
    image_dir: Path,
    label_dir: Path,
    image_suffixes: Sequence[str] = IMAGE_EXTENSIONS,
    label_suffixes: Sequence[str] = LABEL_EXTENSIONS,
) -> Scan:
    """Pair the files of two folders by name stem: image 'x.jpg' with label 'x.png'."""
    problems: list[str] = []
    images = _keyed(_files_with_suffix(image_dir, image_suffixes), lambda p: p.stem, "image", problems)
    labels = _keyed(_files_with_suffix(label_dir, label_suffixes), lambda p: p.stem, "label", problems)
    return _pair(images, labels, lambda key: label_dir / f"{key}{label_suffixes[0]}", problems)


def _resolve_split(split: str, names: dict[str, str]) -> str:
    return names.get(split, split)


def _scan_ade20k(root: Path, split: str) -> Scan:
    if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    folder = _resolve_split(split, {"train": "training", "val": "validation"})
    image_dir = _require_dir(root / "images" / folder, f"ADE20K {split} images folder")
    label_dir = _require_dir(root / "annotations" / folder, f"ADE20K {split} annotations folder")
    return _stem_pairs(image_dir, label_dir, image_suffixes=(".jpg",), label_suffixes=(".png",))


def _scan_cityscapes(root: Path, split: str) -> Scan:
    image_dir = _require_dir(root / "leftImg8bit" / split, f"Cityscapes {split} images folder")
    label_dir = _require_dir(root / "gtFine" / split, f"Cityscapes {split} gtFine folder")
    problems: list[str] = []
    images = _keyed(
        _files_with_suffix(image_dir, ("_leftImg8bit.png",), recursive=True),
        lambda p: str(p.relative_to(image_dir))[: -len("_leftImg8bit.png")],
        "image",
        problems,
    )
    label_files = _files_with_suffix(label_dir, ("_gtFine_labelTrainIds.png",), recursive=True)
    if not label_files and _files_with_suffix(label_dir, ("_gtFine_labelIds.png",), recursive=True):
        raise DatasetError(
            f"{label_dir}: has *_gtFine_labelIds.png but no *_gtFine_labelTrainIds.png; "
            f"create them with: offseg data prepare cityscapes {root}"
        )
    labels = _keyed(
        label_files, lambda p: str(p.relative_to(label_dir))[: -len("_gtFine_labelTrainIds.png")], "label", problems
    )
    return _pair(images, labels, lambda key: label_dir / f"{key}_gtFine_labelTrainIds.png", problems)


def _scan_coco_stuff(root: Path, split: str) -> Scan:
    folder = _resolve_split(split, {"train": "train2017", "val": "val2017"})
    image_dir = _require_dir(root / "images" / folder, f"COCO-Stuff {split} images folder")
    label_dir = _require_dir(root / "annotations" / folder, f"COCO-Stuff {split} annotations folder")
    problems: list[str] = []
    images = _keyed(_files_with_suffix(image_dir, (".jpg",)), lambda p: p.stem, "image", problems)
    label_files = _files_with_suffix(label_dir, ("_labelTrainIds.png",))
    if not label_files and _files_with_suffix(label_dir, (".png",)):
        raise DatasetError(
            f"{label_dir}: has raw stuffthingmaps PNGs but no *_labelTrainIds.png; "
            f"create them with: offseg data prepare coco-stuff164k {root}"
        )
    labels = _keyed(label_files, lambda p: p.name[: -len("_labelTrainIds.png")], "label", problems)
    return _pair(images, labels, lambda key: label_dir / f"{key}_labelTrainIds.png", problems)


def _scan_pascal_context(root: Path, split: str) -> Scan:
    if not (root / "JPEGImages").is_dir():  # also accept the VOCdevkit folder or its parent
        for candidate in (root / "VOC2010", root / "VOCdevkit" / "VOC2010"):
            if candidate.is_dir():
                root = candidate
                break
    list_file = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
    if not list_file.is_file():
        _require_dir(list_file.parent, "Pascal Context split lists folder (ImageSets/SegmentationContext)")
        raise FileNotFoundError(f"{list_file}: Pascal Context {split} list not found")
    image_dir = _require_dir(root / "JPEGImages", "Pascal VOC2010 JPEGImages folder")
    label_dir = _require_dir(
        root / "SegmentationClassContext", "Pascal Context label folder (SegmentationClassContext)"
    )
    scan = Scan()
    for name in dict.fromkeys(line.strip() for line in list_file.read_text().splitlines() if line.strip()):
        image, label = image_dir / f"{name}.jpg", label_dir / f"{name}.png"
        missing = [str(p) for p in (image, label) if not p.is_file()]
        if missing:
            scan.problems.append(f"{list_file}: entry {name!r} is missing {' and '.join(missing)}")
        else:
            scan.pairs.append((image, label))
    return scan


def _scan_split_folders(root: Path, split: str) -> Scan:
    """ROOT/SPLIT/images/* with ROOT/SPLIT/labels/* of the same stem (CamVid here, any folder)."""
    split_dir = _require_dir(root / split, f"split folder {split!r}")
    image_dir = _require_dir(split_dir / "images", "images folder")
    label_dir = _require_dir(split_dir / "labels", "labels folder")
    return _stem_pairs(image_dir, label_dir)


_SCANNERS = {
    "ade20k": _scan_ade20k,
    "cityscapes": _scan_cityscapes,
    "coco-stuff164k": _scan_coco_stuff,
    "pascal-context-59": _scan_pascal_context,
    "camvid": _scan_split_folders,
    "folder": _scan_split_folders,
}


def scan_split(name: str, root: str | Path, split: str) -> Scan:
    """The (image, label) pairs of a split plus unpairing problems, without opening any file."""
    key, root = _known_dataset_at(name, root)
    return _SCANNERS[key](root, split)


def _known_dataset_at(name: str, root: str | Path) -> tuple[str, Path]:
    """The canonical dataset name and its root, or a clear error for an unknown name or a missing root."""
    key = canonical_name(name)
    if key not in _SCANNERS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASET_NAMES)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root not found")
    return key, root


# --- the dataset -----------------------------------------------------------------------------
class SegmentationDataset(torch.utils.data.Dataset):
    """Image/label pairs plus the pipeline that turns them into tensors (see module docs).

    Usually made by `build_dataset`. `load(i)` gives the raw uint8 image and the mapped label
    (ids 0..K-1, 255) without any transform. `reduce_zero_label=None` and
    `void_value="dataset"` take the label convention of `info`.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str | Path, str | Path]],
        info: DatasetInfo,
        pipeline: str = "train",
        crop_size: tuple[int, int] | None = None,
        scale: tuple[int, int] | None = None,
        test_scale: tuple[int, int] | None = None,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        seed: int = 0,
        reduce_zero_label: bool | None = None,
        void_value: int | None | str = "dataset",
        root: str | Path | None = None,
        split: str | None = None,
        short_edges: Sequence[int] | None = None,
        max_size: int = 2048,
    ):
        if pipeline not in ("train", "test"):
            raise ValueError(f"pipeline must be 'train' or 'test', got {pipeline!r}")
        self.samples = [(Path(image), Path(label)) for image, label in pairs]
        self.scan_problems: list[str] = []  # what the folder scan skipped (set by build_dataset)
        self.info = info
        self.name = info.name
        self.root = None if root is None else Path(root)
        self.split = split
        self.class_names = list(info.class_names)
        self.palette = np.asarray(info.palette, dtype=np.uint8).reshape(-1, 3)
        self.num_classes = len(self.class_names)
        self.ignore_index = IGNORE_INDEX
        self.reduce_zero_label = info.reduce_zero_label if reduce_zero_label is None else bool(reduce_zero_label)
        # void_value: raw value mapped to 255; "dataset" takes the dataset's own (CamVid: 11)
        if isinstance(void_value, str) and void_value != "dataset":
            raise ValueError(f"void_value must be an integer, None or 'dataset', got {void_value!r}")
        self.void_value = info.void_value if isinstance(void_value, str) else void_value
        if self.num_classes > 255:
            raise ValueError(f"{self.num_classes} classes: at most 255 fit uint8 labels with 255 as ignore")
        self.lookup = label_lookup(self.num_classes, self.reduce_zero_label, self.void_value)
        self.valid_raw = valid_raw_values(self.lookup, self.num_classes)
        self.pipeline = pipeline
        self.seed = int(seed)
        self.epoch = 0
        if pipeline == "train":
            if crop_size is None:
                raise ValueError(f"{self.name}: the train pipeline needs crop_size=(h, w)")
            self.transform: TrainPipeline | TestPipeline = TrainPipeline(
                crop_size,
                scale,
                ratio_range,
                cat_max_ratio,
                flip_prob,
                photometric,
                IGNORE_INDEX,
                short_edges=short_edges,
                max_size=max_size,
            )
        else:
            self.transform = TestPipeline(test_scale)

    def set_test_scale(self, scale: tuple[int, int] | None) -> None:
        """Use another keep-ratio test resize (w, h), e.g. the one a checkpoint records; test pipeline only."""
        if not isinstance(self.transform, TestPipeline):
            raise ValueError(f"{self.name}: set_test_scale is for the test pipeline")
        self.transform = TestPipeline(_pair_of_ints(scale, "test_scale"))

    @property
    def crop_size(self) -> tuple[int, int] | None:
        return self.transform.crop_size if isinstance(self.transform, TrainPipeline) else None

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer indices (a sampler can also pass (index, epoch))."""
        self.epoch = int(epoch)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB image (H, W, 3) and mapped label (H, W) of sample `index`; checks sizes and
        label values and raises DatasetError naming the file."""
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        raw = read_label(label_path)
        if raw.shape != image.shape[:2]:
            raise DatasetError(
                f"{label_path}: label is {raw.shape[1]}x{raw.shape[0]} but its image {image_path} "
                f"is {image.shape[1]}x{image.shape[0]}"
            )
        self._check_values(raw, label_path)
        return image, self.lookup[raw]

    def _check_values(self, raw: np.ndarray, label_path: Path) -> None:
        if not self.valid_raw[raw].all():
            bad = np.unique(raw[~self.valid_raw[raw]])
            shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
            raise DatasetError(
                f"{label_path}: label values {shown} are not valid for {self.name} "
                f"({self.num_classes} classes; allowed raw values: {_describe_values(self.valid_raw)})"
            )

    def check_sample(self, index: int) -> list[str]:
        """Every problem of one sample (unreadable files, size mismatch, bad values), as messages."""
        image_path, label_path = self.samples[index]
        problems: list[str] = []
        image_size = label = None
        try:
            with Image.open(image_path) as img:
                img.load()
                image_size = (img.height, img.width)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            problems.append(f"{image_path}: cannot read image ({err})")
        try:
            label = read_label(label_path)
        except (DatasetError, FileNotFoundError) as err:
            problems.append(str(err))
        if label is not None:
            if image_size is not None and label.shape != image_size:
                problems.append(
                    f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its image "
                    f"{image_path} is {image_size[1]}x{image_size[0]}"
                )
            try:
                self._check_values(label, label_path)
            except DatasetError as err:
                problems.append(str(err))
        return problems

    def rng_for(self, index: int, epoch: int) -> np.random.Generator:
        """The generator of sample `index` in `epoch` — a pure function of (seed, epoch, index)."""
        return np.random.default_rng([self.seed, epoch, index])

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(item, (tuple, list)):
            index, epoch = operator.index(item[0]), operator.index(item[1])
        else:
            index, epoch = operator.index(item), self.epoch
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        image, label = self.load(index)
        image_path, label_path = self.samples[index]
        sample: dict[str, Any] = {"image_path": str(image_path), "label_path": str(label_path)}
        if isinstance(self.transform, TrainPipeline):
            sample["image"], sample["label"] = self.transform(image, label, self.rng_for(index, epoch))
        else:
            sample["image"], sample["label"] = self.transform(image, label)
            sample["ori_size"] = (int(image.shape[0]), int(image.shape[1]))
        return sample

    def __repr__(self) -> str:
        where = f", root={str(self.root)!r}" if self.root else ""
        split = f", split={self.split!r}" if self.split else ""
        return (
            f"{type(self).__name__}({self.name}{where}{split}, {len(self)} samples, {self.num_classes} classes, "
            f"{self.transform!r})"
        )


# --- building ----------------------------------------------------------------------------------
def _pair_of_ints(value: Any, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    try:
        a, b = value
        return (int(a), int(b))
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}") from None


def _folder_info(root: Path, options: dict[str, Any]) -> DatasetInfo:
    """Class names of a folder dataset: class_names=, classes_file=, ROOT/classes.txt or num_classes=."""
    from ..visualize import default_palette

    names = options.pop("class_names", None)
    classes_file = options.pop("classes_file", None)
    num_classes = options.pop("num_classes", None)
    palette = options.pop("palette", None)
    file_palette = None
    if names is None:
        if classes_file is None and (root / CLASSES_FILE).is_file():
            classes_file = root / CLASSES_FILE
        if classes_file is not None:
            names, file_palette = read_classes_file(classes_file)
        elif num_classes is not None:
            names = [f"class{i}" for i in range(int(num_classes))]
        else:
            raise ValueError(
                f"{root}: a folder dataset needs its class names: put them in {root / CLASSES_FILE} "
                f"(one per line), or pass classes_file= or num_classes="
            )
    names = [str(n) for n in names]
    if num_classes is not None and int(num_classes) != len(names):
        raise ValueError(f"num_classes={num_classes} but {len(names)} class names were given")
    if palette is None:
        palette = file_palette if file_palette is not None else default_palette(len(names))
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if len(palette) < len(names):
        raise ValueError(f"palette has {len(palette)} colours for {len(names)} classes")
    return DatasetInfo("folder", tuple(names), palette[: len(names)], splits=())


def _default_crop(pairs: list[tuple[Path, Path]]) -> tuple[int, int]:
    # Folder datasets: crop the largest multiple of 32 that fits the first image (the model
    # needs /32 inputs), so native-size training works without configuring anything.
    with Image.open(pairs[0][0]) as img:
        width, height = img.size
    return (max(32, height // 32 * 32), max(32, width // 32 * 32))


_OPTIONS = {
    "crop_size",
    "scale",
    "test_scale",
    "ratio_range",
    "short_edges",
    "max_size",
    "cat_max_ratio",
    "flip_prob",
    "photometric",
    "seed",
    "ignore_index",
    "reduce_zero_label",
    "class_names",
    "classes_file",
    "num_classes",
    "palette",
}
_AUTO = object()


def make_dataset(
    name: str, root: str | Path, split: str = "train", pipeline: str = "train", strict: bool = True, **options: Any
) -> SegmentationDataset:
    """`build_dataset`, with `strict=False` keeping the pairs it found despite unpaired files
    (the problems are then in ``dataset.scan_problems``)."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ValueError(
            f"unknown dataset option(s): {', '.join(sorted(unknown))} (known: {', '.join(sorted(_OPTIONS))})"
        )
    key, root = _known_dataset_at(name, root)
    options = dict(options)
    if key == "folder":
        info = _folder_info(root, options)
    else:
        info = dataset_info(key)
        num_classes = options.pop("num_classes", None)
        if num_classes is not None and int(num_classes) != info.num_classes:
            raise ValueError(f"{key} has {info.num_classes} classes, not num_classes={num_classes}")
        for fixed in ("class_names", "classes_file"):
            if options.pop(fixed, None) is not None:
                raise ValueError(f"{key} has fixed classes; {fixed}= is only for folder datasets")
        if options.get("palette") is not None:
            info = DatasetInfo(
                **{**info.__dict__, "palette": np.asarray(options.pop("palette"), dtype=np.uint8).reshape(-1, 3)}
            )
        options.pop("palette", None)

    scan = _SCANNERS[key](root, split)
    if strict and scan.problems:
        more = f"\n  ... and {len(scan.problems) - 10} more" if len(scan.problems) > 10 else ""
        shown = "\n  ".join(scan.problems[:10]) + more
        raise DatasetError(f"{root} ({key}, split {split!r}): {len(scan.problems)} file problem(s):\n  {shown}")
    if strict and not scan.pairs:
        raise DatasetError(f"{root} ({key}, split {split!r}): no image/label pairs found")

    ignore_index = options.pop("ignore_index", None)
    void_value: int | None | str = "dataset"
    if ignore_index is not None:
        ignore_index = int(ignore_index)
        if not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore_index must be a label value in 0..255, got {ignore_index}")
        void_value = None if ignore_index == IGNORE_INDEX else ignore_index
    scale_given = "scale" in options
    scale = _pair_of_ints(options.pop("scale", info.scale), "scale")
    test_scale = options.pop("test_scale", _AUTO)
    if test_scale is _AUTO:  # an explicit base scale is the test scale too, as in the official configs
        test_scale = scale if scale_given else info.test_scale
    crop_size = _pair_of_ints(options.pop("crop_size", info.crop_size), "crop_size")
    short_edges = options.pop("short_edges", None)
    if short_edges is not None:
        if isinstance(short_edges, (int, str)) or not all(
            isinstance(e, int) and not isinstance(e, bool) for e in short_edges
        ):
            raise ValueError(f"short_edges must be a list of ints, got {short_edges!r}")
        short_edges = list(short_edges)
    max_size = int(options.pop("max_size", 2048))
    if pipeline == "train" and crop_size is None and scan.pairs:
        crop_size = _default_crop(scan.pairs)
    dataset = SegmentationDataset(
        scan.pairs,
        info,
        pipeline=pipeline,
        crop_size=crop_size,
        scale=scale,
        test_scale=_pair_of_ints(test_scale, "test_scale"),
        ratio_range=tuple(options.pop("ratio_range", (0.5, 2.0))),
        cat_max_ratio=options.pop("cat_max_ratio", 0.75),
        flip_prob=options.pop("flip_prob", 0.5),
        photometric=options.pop("photometric", True),
        seed=options.pop("seed", 0),
        reduce_zero_label=options.pop("reduce_zero_label", None),
        void_value=void_value,
        root=root,
        split=split,
        short_edges=short_edges,
        max_size=max_size,
    )
    dataset.scan_problems = scan.problems
    return dataset


def build_dataset(
    name: str, root: str | Path, split: str = "train", pipeline: str = "train", **options: Any
) -> SegmentationDataset:
    """A dataset in its standard layout, with the paper's train or test pipeline.

    name: ``ade20k``, ``cityscapes``, ``coco-stuff164k``, ``pascal-context-59``, ``camvid`` or
    ``folder`` (ROOT/SPLIT/images/* paired by stem with ROOT/SPLIT/labels/*.png; classes from
    ROOT/classes.txt, ``classes_file=``, ``class_names=`` or ``num_classes=``).
    split: ``train``, ``val`` (and ``test`` for CamVid / Cityscapes), or the layout's own
    folder name (``training``, ``val2017`` ...).

    Options (defaults per dataset, as in the official configs — see `dataset_info`):
      crop_size=(h, w)     training crop and output size
      scale=(w, h)         base scale of the random resize (None: each image's own size); also
                           the test scale unless test_scale= is given
      test_scale=(w, h)    test-mode keep-ratio resize (None: unchanged)
      ratio_range=(0.5, 2.0), cat_max_ratio=0.75, flip_prob=0.5, photometric=True
      short_edges=[...]    Mask2Former's resize instead of the ratio-based one: a short edge drawn
      max_size=2048        uniformly from the list, the long edge at most max_size
                           (MMSegmentation's RandomChoiceResize + ResizeShortestEdge)
      seed=0               augmentation seed (see module docs)
      ignore_index=v       raw label value meaning "ignore" (mapped to 255; CamVid: 11)
      reduce_zero_label=b  0 -> ignore, i -> i-1 (ADE20K, Pascal Context: on)
      palette=             colours (K, 3)

    Raises FileNotFoundError for a missing root or split, DatasetError (a ValueError) for
    unpaired files; unreadable images, size mismatches and bad label values raise DatasetError
    when the sample is read (`offseg data check` finds them all at once).
    """
    return make_dataset(name, root, split, pipeline, strict=True, **options)
