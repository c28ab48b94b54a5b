"""Datasets, the paper's data pipelines, label tables and dataset tools.

from offseg.data import build_dataset
train = build_dataset("camvid", "data/camvid", "train", crop_size=(352, 480), seed=0)
val = build_dataset("camvid", "data/camvid", "val", pipeline="test")
"""

from __future__ import annotations

from typing import Any

from .datasets import DatasetError, SegmentationDataset, build_dataset, read_image, read_label, scan_split
from .labels import (
    CITYSCAPES_LABEL_IDS,
    DATASET_NAMES,
    IGNORE_INDEX,
    DatasetInfo,
    dataset_info,
    read_classes_file,
    write_classes_file,
)
from .sampling import InfiniteSampler, worker_init_fn
from .synthetic import SYNTHETIC_CLASSES, generate_synthetic_dataset
from .transforms import MEAN, STD, TestPipeline, TrainPipeline, normalize_image

__all__ = [
    "CITYSCAPES_LABEL_IDS",
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "MEAN",
    "STD",
    "DatasetError",
    "DatasetInfo",
    "InfiniteSampler",
    "SYNTHETIC_CLASSES",
    "SegmentationDataset",
    "TestPipeline",
    "TrainPipeline",
    "build_dataset",
    "check_dataset",
    "dataset_info",
    "generate_synthetic_dataset",
    "normalize_image",
    "prepare_cityscapes",
    "prepare_coco_stuff164k",
    "read_classes_file",
    "read_image",
    "read_label",
    "scan_split",
    "worker_init_fn",
    "write_classes_file",
]


def __getattr__(name: str) -> Any:
    # The tools import tqdm and multiprocessing; load them only when asked for.
    if name == "check_dataset":
        from .check import check_dataset

        return check_dataset
    if name in ("prepare_cityscapes", "prepare_coco_stuff164k"):
        from . import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
