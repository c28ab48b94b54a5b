"""Semantic-segmentation metrics (MMSegmentation IoUMetric semantics) and the evaluation loop.

The metric accumulates, per class, the intersection, union, predicted and labelled pixel areas
over the whole set, and only divides at the end; pixels labelled with the ignore index are left
out. A class whose union is empty has an undefined (NaN) IoU and does not enter the mean.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .data.sampling import worker_init_fn
from .inference import DEFAULT_TTA_SCALES, infer, model_device

__all__ = ["SegMetric", "evaluate", "format_table", "summary_line"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class SegMetric:
    """Per-class pixel-area accumulator: `update(pred, label)` per image, `compute()` at the end.

    Under torch.distributed, call `reduce()` once after the last update on every rank: it sums
    the accumulators of all ranks, so each rank may have seen its own shard of the set.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"SegMetric: num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        k = self.num_classes
        # Exact integer pixel counts; float only appears when dividing in compute().
        self.area_intersect = torch.zeros(k, dtype=torch.int64)
        self.area_union = torch.zeros(k, dtype=torch.int64)
        self.area_pred = torch.zeros(k, dtype=torch.int64)
        self.area_label = torch.zeros(k, dtype=torch.int64)
        self.num_images = 0
        self._reduced = False

    def _counts(self, values: torch.Tensor) -> torch.Tensor:
        # Values outside [0, K) are not counted, like the histogram of the reference metric.
        inside = values[(values >= 0) & (values < self.num_classes)]
        return torch.bincount(inside, minlength=self.num_classes).cpu()

    @torch.no_grad()
    def update(self, pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> None:
        """Add predictions and ground truth of equal shape: (H, W) for one image or (B, H, W)."""
        if self._reduced:
            raise RuntimeError("SegMetric: already reduced across ranks; call reset() before new updates")
        pred = torch.as_tensor(pred)
        label = torch.as_tensor(label)
        if (
            pred.is_floating_point()
            or label.is_floating_point()
            or pred.dtype == torch.bool
            or label.dtype == torch.bool
        ):
            raise ValueError(
                f"SegMetric.update: expected integer class maps, got {pred.dtype} and {label.dtype} "
                "(take the argmax of the logits first)"
            )
        if pred.shape != label.shape:
            raise ValueError(
                f"SegMetric.update: prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}"
            )
        images = pred.shape[0] if pred.dim() == 3 else 1
        pred = pred.reshape(-1).long()
        label = label.to(pred.device).reshape(-1).long()
        valid = label != self.ignore_index
        pred, label = pred[valid], label[valid]
        intersect = self._counts(label[pred == label])
        area_pred = self._counts(pred)
        area_label = self._counts(label)
        self.area_intersect += intersect
        self.area_pred += area_pred
        self.area_label += area_label
        self.area_union += area_pred + area_label - intersect
        self.num_images += images

    def reduce(self) -> SegMetric:
        """Sum the accumulators over all torch.distributed ranks (no-op when not initialised)."""
        if self._reduced or not _distributed():
            return self
        packed = torch.stack([self.area_intersect, self.area_union, self.area_pred, self.area_label])
        packed = torch.cat([packed.reshape(-1), torch.tensor([self.num_images], dtype=torch.int64)])
        if dist.get_backend() == "nccl":
            packed = packed.cuda()  # NCCL only reduces tensors on the GPU
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        packed = packed.cpu()
        k = self.num_classes
        self.area_intersect, self.area_union, self.area_pred, self.area_label = packed[: 4 * k].reshape(4, k).clone()
        self.num_images = int(packed[-1])
        self._reduced = True
        return self

    all_reduce = reduce

    def compute(self) -> dict[str, Any]:
        """Figures in percent: aAcc, mIoU, mAcc, per-class IoU and Acc (NaN where undefined),
        plus the raw per-class areas and the image count."""
        intersect = self.area_intersect.double()
        union = self.area_union.double()
        label = self.area_label.double()
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = (intersect / union).numpy() * 100  # 0/0 -> NaN: class absent from both
            acc = (intersect / label).numpy() * 100
            total_label = float(label.sum())
            a_acc = float(intersect.sum()) / total_label * 100 if total_label > 0 else math.nan
        return {
            "aAcc": a_acc,
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
            "area_intersect": self.area_intersect.tolist(),
            "area_union": self.area_union.tolist(),
            "area_pred": self.area_pred.tolist(),
            "area_label": self.area_label.tolist(),
            "num_images": self.num_images,
        }


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan


def _fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def summary_line(results: Mapping[str, Any]) -> str:
    """One line: aAcc, mIoU and mAcc in percent with two decimals."""
    return "  ".join(f"{key}: {_fmt(results[key])}" for key in ("aAcc", "mIoU", "mAcc"))


def format_table(results: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Per-class IoU / Acc table in plain text with aligned columns, then the summary line."""
    iou, acc = list(results["IoU"]), list(results["Acc"])
    if class_names is None:
        class_names = results.get("class_names") or [str(i) for i in range(len(iou))]
    if len(class_names) != len(iou):
        raise ValueError(f"format_table: {len(class_names)} class names for {len(iou)} classes")
    rows = [(str(name), _fmt(i), _fmt(a)) for name, i, a in zip(class_names, iou, acc, strict=True)]
    header = ("Class", "IoU", "Acc")
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(3)]

    def line(cells: Sequence[str]) -> str:
        return f"| {cells[0]:<{widths[0]}} | {cells[1]:>{widths[1]}} | {cells[2]:>{widths[2]}} |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    body = [rule, line(header), rule, *(line(row) for row in rows), rule]
    return "\n".join(body) + "\n" + summary_line(results)


def _dataset_attr(dataset: Any, name: str, default: Any = None) -> Any:
    """An attribute of the dataset, looking through torch Subset wrappers (which drop them)."""
    while dataset is not None:
        if hasattr(dataset, name):
            return getattr(dataset, name)
        dataset = getattr(dataset, "dataset", None)
    return default


def _item_label(item: Mapping[str, Any]) -> torch.Tensor:
    label = torch.as_tensor(item["label"])
    return label[0] if label.dim() == 3 else label


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    mode: str = "whole",
    crop_size: Sequence[int] | int | None = None,
    stride: Sequence[int] | int | None = None,
    tta: bool = False,
    scales: Sequence[float] = DEFAULT_TTA_SCALES,
    flip: bool = True,
    progress: bool = True,
    limit: int | None = None,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    num_classes: int | None = None,
    ignore_index: int | None = None,
) -> dict[str, Any]:
    """mIoU of `model` on a test-pipeline dataset, one image at a time.

    Each item gives a normalised `image` (already resized to the test scale) and its `label` at
    the original size; logits are resized to the label size before the argmax. Under
    torch.distributed each rank takes every world_size-th image (no padding, so no image counts
    twice) and the metric is summed over ranks; every rank gets the full results.
    Returns `SegMetric.compute()` plus `class_names` when the dataset has them.
    """
    # Run the bare network: a DistributedDataParallel wrapper would sync buffers at every forward,
    # which hangs when ranks hold different numbers of images.
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    num_classes = num_classes or _dataset_attr(dataset, "num_classes") or getattr(model, "num_classes", None)
    if num_classes is None:
        raise ValueError("evaluate: pass num_classes (the dataset and the model do not say)")
    model_classes = getattr(model, "num_classes", None)
    if model_classes is not None and model_classes != num_classes:
        raise ValueError(f"evaluate: the model predicts {model_classes} classes but the dataset has {num_classes}")
    if ignore_index is None:
        ignore_index = _dataset_attr(dataset, "ignore_index", 255)
    metric = SegMetric(num_classes, ignore_index)

    count = len(dataset) if limit is None else min(limit, len(dataset))
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    shard = list(range(rank, count, world))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard),
        batch_size=None,  # items keep their own sizes; no collation
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=worker_init_fn if num_workers else None,
    )
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    try:
        from tqdm import tqdm

        bar = tqdm(
            loader,
            total=len(shard),
            desc="eval",
            unit="img",
            disable=not progress or rank != 0,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for item in bar:
            label = _item_label(item)
            image = torch.as_tensor(item["image"]).to(device)
            scores = infer(
                model,
                image,
                mode=mode,
                crop_size=crop_size,
                stride=stride,
                tta=tta,
                scales=scales,
                flip=flip,
                out_size=tuple(label.shape[-2:]),
            )
            metric.update(scores.argmax(dim=1)[0], label.to(device))
    finally:
        model.train(was_training)
    results = metric.reduce().compute()
    names = _dataset_attr(dataset, "class_names")
    if names is not None:
        results["class_names"] = list(names)
    return results
