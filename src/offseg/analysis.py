"""Looking inside the classifier: the paper's ideal class representation (its Fig. 3) and the
offsets that Offset Learning computes.

Ideal class representation. For one image with pixel features E (N x C, one row per labelled
pixel) and one-hot ground-truth masks M (K x N), the class matrix that best reproduces the masks
as W E^T is, in the least-squares sense,

    W* = M (E^T)^+          (K x C, ^+ the Moore-Penrose pseudo-inverse)

Recomputing masks as argmax_k of W* E^T gives far better segmentations than the model's own
fixed W, yet the W*_k of one class barely agree from one image to the next: no single fixed W
fits every image, which is what Offset Learning's per-image offsets address.

Where E comes from. E is the input of the module that turns features into class scores: the
per-pixel classifier `conv_seg` (after dropout, an identity in eval mode) or the Offset Learning
module. It is captured with a forward hook, so no head needs a special method. E therefore lives
at the head's resolution: 1/4 of the input for OffSeg (and per-pixel SegFormer), 1/8 for
SegFormer + Offset Learning (after its 2x2 max-pool) and for SegNeXt. The image is padded to the
model's size divisor as in inference and the features are cropped back to the image's own
extent, ceil(H / stride) x ceil(W / stride) cells.

Ground truth at that resolution. Labels are brought to the feature grid by a majority vote: each
feature cell takes the label value (the ignore index included) that covers most of its area
(adaptive average pooling of each value's indicator map, then argmax). Unlike nearest-neighbour
sampling, which reads one pixel per cell, this reflects the whole cell. Cells whose majority is
the ignore index are left out of both M and E.

Pseudo-inverse. W*^T is computed as the minimum-norm least-squares solution of E X = M^T with
`torch.linalg.lstsq(..., driver="gelsd")` (SVD-based) in float64 on the CPU. Singular values
below `rcond` times the largest are treated as zero: features come out of float32 networks, whose
relative precision is about 1e-7, so directions weaker than about 1e-6 of the strongest are
rounding noise and would only inflate W*. `DEFAULT_RCOND` is therefore 1e-6.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .evaluation import SegMetric
from .inference import model_device
from .models.layers.offset_learning import OffsetLearning
from .models.segmentor import num_classes_of

__all__ = [
    "DEFAULT_RCOND",
    "IdealReprAnalysis",
    "analyze_ideal_representation",
    "classifier_kind",
    "cosine_similarity_matrix",
    "downsample_label",
    "extract_features",
    "ideal_class_representation",
    "mean_off_diagonal",
    "model_class_representation",
    "offset_learning_quantities",
    "offset_quantities",
    "one_hot_masks",
    "plot_ideal_repr",
    "plot_offsets",
    "resolve_classes",
]

DEFAULT_RCOND = 1e-6
IGNORE_INDEX = 255


# --- the classifier and its input ------------------------------------------------------------
def _classifier_module(model: nn.Module) -> tuple[str, OffsetLearning | nn.Conv2d]:
    """("offset", the OffsetLearning module) or ("pixel", conv_seg) of a per-pixel model."""
    head = getattr(model, "decode_head", None)
    if head is None:
        raise ValueError(f"{type(model).__name__}: not a segmentation model with a decode head")
    offset_learning = getattr(head, "offset_learning", None)
    if isinstance(offset_learning, OffsetLearning):
        return "offset", offset_learning
    if offset_learning is not None:
        raise ValueError(
            f"{getattr(model, 'name', '') or type(model).__name__}: a mask-classification model; "
            "this analysis needs a per-pixel classifier or per-pixel Offset Learning"
        )
    conv_seg = getattr(head, "conv_seg", None)
    if not isinstance(conv_seg, nn.Conv2d):
        raise ValueError(
            f"{type(head).__name__}: no per-pixel classifier (conv_seg) or Offset Learning module found "
            "(mask-classification models such as Mask2Former are not supported)"
        )
    return "pixel", conv_seg


def classifier_kind(model: nn.Module) -> str:
    """ "offset" for Offset-Learning heads (any branch variant), "pixel" for per-pixel heads."""
    return _classifier_module(model)[0]


def model_class_representation(model: nn.Module) -> torch.Tensor:
    """The model's fixed class matrix W (K, C): Offset Learning's `cls_repr`, or the weights of
    the 1x1 classifier `conv_seg` (its bias is left aside)."""
    _, module = _classifier_module(model)
    weight = module.cls_repr[0] if isinstance(module, OffsetLearning) else module.weight[:, :, 0, 0]
    return weight.detach().clone()


def _as_input(image: Any) -> torch.Tensor:
    """Normalised float (3, H, W) from a path, PIL image, uint8 RGB array or normalised tensor."""
    from .predict import preprocess  # the same accepted forms as offseg.predict

    return preprocess(image)[0]


@dataclass
class _HeadOutput:
    features: torch.Tensor  # (C, Hp, Wp): classifier input over the whole padded input
    logits: torch.Tensor  # (K, Hp, Wp)
    stride: int
    valid: tuple[int, int]  # (h, w): the cells that cover the image itself

    def crop(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[..., : self.valid[0], : self.valid[1]]


@torch.no_grad()
def _head_features(model: nn.Module, image: Any) -> _HeadOutput:
    """Classifier input and head output at the head's resolution for the padded image, with the
    extent of the image itself."""
    from .inference import pad_to_divisor

    _, classifier = _classifier_module(model)
    x = _as_input(image).to(model_device(model))
    height, width = x.shape[-2:]
    padded = pad_to_divisor(x[None], int(getattr(model, "size_divisor", 1) or 1))
    captured: list[torch.Tensor] = []
    hook = classifier.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    was_training = model.training
    model.eval()
    try:
        forward_logits = getattr(model, "forward_logits", None)
        if forward_logits is not None:
            logits = forward_logits(padded)
        else:
            head, backbone = model.decode_head, model.backbone
            if not (isinstance(head, nn.Module) and isinstance(backbone, nn.Module)):
                raise ValueError(f"{type(model).__name__}: not a model with a backbone and a decode head")
            logits = head(backbone(padded))
    finally:
        hook.remove()
        model.train(was_training)
    if len(captured) != 1:
        raise ValueError(f"the classifier ran {len(captured)} times in one forward pass; expected once")
    feats = captured[0]
    if feats.shape[-2:] != logits.shape[-2:]:
        raise ValueError(
            f"classifier input {tuple(feats.shape[-2:])} and head output {tuple(logits.shape[-2:])} differ in size"
        )
    stride = padded.shape[-2] // feats.shape[-2]
    return _HeadOutput(feats[0], logits[0], stride, (math.ceil(height / stride), math.ceil(width / stride)))


def extract_features(model: nn.Module, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, logits) of one image: E (C, h, w) is the input of the classifier / Offset Learning and
    logits (K, h, w) the raw head output, both at the head's resolution (1/4 or 1/8) and cropped
    to the image's extent (the image is padded to the model's size divisor for the forward).

    image: a path, PIL image, uint8 RGB array (H, W, 3) or normalised float tensor (3, H, W).
    The model runs in eval mode as built (not its inference-optimised copy).
    """
    out = _head_features(model, image)
    return out.crop(out.features), out.crop(out.logits)


# --- Offset Learning's quantities ------------------------------------------------------------
@torch.no_grad()
def offset_learning_quantities(
    module: OffsetLearning, features: torch.Tensor, valid: Sequence[int] | None = None
) -> dict[str, Any]:
    """Every intermediate of a per-pixel `OffsetLearning` for features E (C, h, w), computed from
    the formulas (SPEC section 1) with the module's own parameters. `valid` = (h', w') crops the
    returned maps to their top-left h' x w' cells after the computation, which runs on the whole
    map as the model does (so a padded input's padding takes part in the softmaxes, and the
    cropped class_attn rows sum to at most 1).

        coupled_attn      A = W E^T                                   (K, h, w)
        class_attn        softmax of A over the pixels (rows)         (K, h, w)
        position_attn     softmax of A over the classes (columns)     (K, h, w)
        class_repr        W                                           (K, C)
        class_offsets     dW = Linear(class_attn E)                   (K, C) or None
        aligned_class_repr  W + dW                                    (K, C)
        features          E                                           (C, h, w)
        feature_offsets   dE = Linear(position_attn^T W)              (C, h, w) or None
        aligned_features  E + dE                                      (C, h, w)
        class_offset_norm     ||dW_k|| per class                      (K,) or None
        feature_offset_norm   ||dE|| per pixel                        (h, w) or None
        masks             LayerNorm_K((E + dE)(W + dW)^T)             (K, h, w), the head's logits
        branches          "both", "class" or "feature"
        map_size          (h, w) of the map the softmaxes ran over

    A single-branch variant has None for the offsets it does not compute.
    """
    channels, rows, cols = features.shape
    feats = features.reshape(channels, -1).transpose(0, 1).to(module.cls_repr.dtype)  # HW, C
    cls_repr = module.cls_repr[0]
    num_classes = cls_repr.shape[0]
    coupled_attn = cls_repr @ feats.T  # K, HW
    class_attn = coupled_attn.softmax(dim=1)
    position_attn = coupled_attn.softmax(dim=0)
    cls_proj = getattr(module, "cls_offset_proj", None)
    feat_proj = getattr(module, "feat_offset_proj", None)
    class_offsets = cls_proj(class_attn @ feats) if cls_proj is not None else None
    feature_offsets = feat_proj(position_attn.T @ cls_repr) if feat_proj is not None else None  # HW, C
    aligned_repr = cls_repr + class_offsets if class_offsets is not None else cls_repr
    aligned_feats = feats + feature_offsets if feature_offsets is not None else feats
    masks = module.mask_norm(aligned_feats @ aligned_repr.T)  # HW, K

    keep_rows, keep_cols = (rows, cols) if valid is None else (int(valid[0]), int(valid[1]))

    def as_map(rows_by_pixel: torch.Tensor) -> torch.Tensor:  # (HW, D) -> (D, h', w')
        return rows_by_pixel.T.reshape(-1, rows, cols)[:, :keep_rows, :keep_cols]

    def by_class(values: torch.Tensor) -> torch.Tensor:  # (K, HW) -> (K, h', w')
        return values.reshape(num_classes, rows, cols)[:, :keep_rows, :keep_cols]

    return {
        "coupled_attn": by_class(coupled_attn),
        "class_attn": by_class(class_attn),
        "position_attn": by_class(position_attn),
        "class_repr": cls_repr.detach().clone(),
        "class_offsets": class_offsets,
        "aligned_class_repr": aligned_repr,
        "features": features[:, :keep_rows, :keep_cols],
        "feature_offsets": as_map(feature_offsets) if feature_offsets is not None else None,
        "aligned_features": as_map(aligned_feats),
        "class_offset_norm": class_offsets.norm(dim=1) if class_offsets is not None else None,
        "feature_offset_norm": as_map(feature_offsets.norm(dim=1, keepdim=True))[0]
        if feature_offsets is not None
        else None,
        "masks": as_map(masks),
        "branches": getattr(module, "branches", "both"),
        "map_size": (rows, cols),  # the cells the softmaxes ran over, before any crop
    }


def offset_quantities(model: nn.Module, image: Any) -> dict[str, Any]:
    """Offset Learning's quantities for one image (see `offset_learning_quantities` for the keys),
    plus `logits` (the head output, (K, h, w)) and `stride` (4 or 8). Per-pixel models have no
    offsets and raise ValueError.

    The image is padded to the model's size divisor, as in inference; the offsets are those the
    model computed on the padded input (its padding takes part in the softmax over space) and
    every map is cropped to the image's extent."""
    _, module = _classifier_module(model)
    if not isinstance(module, OffsetLearning):
        raise ValueError(
            f"{getattr(model, 'name', '') or type(model).__name__} has a per-pixel classifier: "
            "no offsets to show (use an Offset Learning model)"
        )
    out = _head_features(model, image)
    quantities = offset_learning_quantities(module, out.features, out.valid)
    quantities.update(logits=out.crop(out.logits), stride=out.stride)
    return quantities


# --- the ideal class representation ----------------------------------------------------------
def one_hot_masks(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Masks M (K, N) float64 from N class indices in [0, K)."""
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"one_hot_masks: labels must lie in [0, {num_classes}); drop ignored pixels first")
    return F.one_hot(labels, num_classes).T.to(torch.float64)


def ideal_class_representation(
    features: torch.Tensor, masks: torch.Tensor, rcond: float = DEFAULT_RCOND
) -> torch.Tensor:
    """W* = M (E^T)^+ (K, C) float64 for features E (N, C), one row per pixel, and masks M (K, N).

    Solved as the minimum-norm least-squares problem E X = M^T (X = W*^T) with LAPACK gelsd
    (SVD) in float64 on the CPU; singular values below `rcond` x the largest count as zero.
    """
    if features.ndim != 2 or masks.ndim != 2 or masks.shape[1] != features.shape[0]:
        raise ValueError(
            f"ideal_class_representation: expected E (N, C) and M (K, N), "
            f"got {tuple(features.shape)} and {tuple(masks.shape)}"
        )
    return _solve_ideal(features, masks, rcond)[0]


def _solve_ideal(features: torch.Tensor, masks: torch.Tensor, rcond: float) -> tuple[torch.Tensor, int]:
    """(W*, numerical rank of E as gelsd counted it)."""
    feats = features.detach().to("cpu", torch.float64)
    targets = masks.detach().to("cpu", torch.float64).T
    result = torch.linalg.lstsq(feats, targets, rcond=rcond, driver="gelsd")
    return result.solution.T.contiguous(), int(result.rank)


def downsample_label(label: torch.Tensor | np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """Label map (H, W) -> (h, w) by majority vote: each output cell takes the value covering most
    of its area (ties go to the smaller value, so a real class beats the ignore index 255)."""
    label = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label).long()
    size = (int(size[0]), int(size[1]))
    if tuple(label.shape) == size:
        return label.clone()
    values = torch.unique(label)
    # One indicator map at a time keeps memory at one float image, whatever the class count.
    votes = torch.stack([F.adaptive_avg_pool2d((label == v).float()[None, None], size)[0, 0] for v in values])
    return values[votes.argmax(dim=0)]


def cosine_similarity_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """(N, N) cosine similarities of N row vectors (N, C); zero vectors give 0."""
    unit = F.normalize(vectors.to(torch.float64), dim=1)
    return unit @ unit.T


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (NaN below 2 x 2)."""
    n = matrix.shape[0]
    if n < 2:
        return math.nan
    off = ~torch.eye(n, dtype=torch.bool, device=matrix.device)
    return float(matrix[off].mean())


def resolve_classes(spec: Sequence[str | int] | None, class_names: Sequence[str]) -> list[int] | None:
    """Class indices from indices or names (case-insensitive); None stays None."""
    if spec is None:
        return None
    lookup = {name.lower(): i for i, name in enumerate(class_names)}
    indices: list[int] = []
    for entry in spec:
        text = str(entry).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
            if not 0 <= index < len(class_names):
                raise ValueError(f"class index {index} out of range 0..{len(class_names) - 1}")
        elif text.lower() in lookup:
            index = lookup[text.lower()]
        else:
            raise ValueError(f"unknown class {text!r}; classes: {', '.join(class_names)}")
        if index not in indices:
            indices.append(index)
    return indices


@dataclass
class IdealReprAnalysis:
    """What `analyze_ideal_representation` found; see its docstring."""

    model_name: str
    kind: str  # "offset" or "pixel"
    class_names: list[str]
    image_ids: list[str]
    stride: int
    rcond: float
    min_pixels: int
    ideal_repr: torch.Tensor  # (I, K, C) float64: W* per image (zero rows for absent classes)
    model_repr: torch.Tensor  # (K, C): the fixed W
    aligned_repr: torch.Tensor | None  # (I, K, C): W + dW per image, Offset Learning only
    pixel_counts: torch.Tensor  # (I, K) labelled pixels per class at the head's resolution
    feature_rank: list[int]  # numerical rank of E per image
    ideal_metrics: dict[str, Any]  # SegMetric of argmax(W* E^T) vs the downsampled labels
    model_metrics: dict[str, Any]  # SegMetric of the head's own argmax, same labels
    ideal_image_miou: list[float]
    model_image_miou: list[float]
    classes: list[int]  # classes with similarity maps
    examples: list[dict[str, np.ndarray]] = field(default_factory=list)  # image, label, ideal, model

    @property
    def present(self) -> torch.Tensor:
        """(I, K) bool: class k labelled on at least `min_pixels` cells of image i."""
        return self.pixel_counts >= self.min_pixels

    def images_with(self, k: int) -> list[int]:
        return [i for i in range(len(self.image_ids)) if bool(self.present[i, k])]

    def similarity(self, k: int, which: str = "ideal") -> torch.Tensor:
        """(n, n) cosine similarities of class k's representation over the images where it appears;
        which = "ideal" (W*), "model" (the fixed W, all ones) or "aligned" (W + dW)."""
        images = self.images_with(k)
        if which == "ideal":
            rows = self.ideal_repr[images, k]
        elif which == "model":
            rows = self.model_repr[k].expand(len(images), -1)  # the same W_k for every image
        elif which == "aligned":
            if self.aligned_repr is None:
                raise ValueError("no W + dW: the model has a per-pixel classifier")
            rows = self.aligned_repr[images, k]
        else:
            raise ValueError(f"which must be 'ideal', 'model' or 'aligned', got {which!r}")
        return cosine_similarity_matrix(rows)

    def summary(self) -> dict[str, Any]:
        """Every figure as plain JSON-ready values (NaN -> None)."""
        per_class = []
        for k in self.classes:
            images = self.images_with(k)
            entry = {
                "index": k,
                "name": self.class_names[k],
                "images": [self.image_ids[i] for i in images],
                "ideal_mean_similarity": mean_off_diagonal(self.similarity(k, "ideal")),
                "model_mean_similarity": mean_off_diagonal(self.similarity(k, "model")),
                # how close the fixed W_k is to each image's ideal W*_k
                "ideal_vs_model_cosine": [
                    float(F.cosine_similarity(self.ideal_repr[i, k], self.model_repr[k].double(), dim=0))
                    for i in images
                ],
                "ideal_similarity": self.similarity(k, "ideal").tolist(),
            }
            if self.aligned_repr is not None:
                entry["aligned_mean_similarity"] = mean_off_diagonal(self.similarity(k, "aligned"))
                entry["aligned_similarity"] = self.similarity(k, "aligned").tolist()
            per_class.append(entry)
        report = {
            "model": self.model_name,
            "classifier": self.kind,
            "stride": self.stride,
            "rcond": self.rcond,
            "min_pixels": self.min_pixels,
            "label_downsampling": "majority vote per feature cell; cells voted ignore are excluded",
            "images": self.image_ids,
            "feature_rank": self.feature_rank,
            "feature_channels": int(self.ideal_repr.shape[-1]),
            "ideal_mIoU": self.ideal_metrics["mIoU"],
            "model_mIoU": self.model_metrics["mIoU"],
            "ideal_IoU": dict(zip(self.class_names, self.ideal_metrics["IoU"], strict=True)),
            "model_IoU": dict(zip(self.class_names, self.model_metrics["IoU"], strict=True)),
            "ideal_image_mIoU": self.ideal_image_miou,
            "model_image_mIoU": self.model_image_miou,
            "pixel_counts": self.pixel_counts.tolist(),
            "classes": per_class,
        }
        return _json_safe(report)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _image_miou(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> float:
    metric = SegMetric(num_classes, ignore_index)
    metric.update(pred, label)
    return metric.compute()["mIoU"]


def _display_image(normalised: torch.Tensor) -> np.ndarray:
    """uint8 (H, W, 3) RGB back from a normalised (3, H, W) tensor."""
    from .data import MEAN, STD

    mean = torch.tensor(MEAN).reshape(3, 1, 1)
    std = torch.tensor(STD).reshape(3, 1, 1)
    rgb = normalised.detach().cpu().float() * std + mean
    return rgb.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def evenly_spaced(count: int, total: int) -> list[int]:
    """`count` indices spread evenly over range(total), first and last included."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


@torch.no_grad()
def analyze_ideal_representation(
    model: nn.Module,
    dataset: Any,
    indices: Sequence[int],
    classes: Sequence[int] | None = None,
    rcond: float = DEFAULT_RCOND,
    min_pixels: int = 1,
    num_examples: int = 4,
    progress: bool = False,
) -> IdealReprAnalysis:
    """The paper's ideal-class-representation analysis on `dataset[i]` for i in `indices`.

    Items are test-pipeline dicts (normalised `image`, `label` at the original size). For each
    image: E from `extract_features`, labels voted down to E's grid, W* from the labelled cells,
    masks recomputed as argmax W* E^T and scored against those labels with SegMetric (as is the
    head's own argmax, for comparison); for Offset Learning models also W + dW, computed from the
    same E by the model's module. `classes` (default: every class present, on at least
    `min_pixels` cells, in two or more images) get similarity maps.
    """
    kind, module = _classifier_module(model)
    if hasattr(model, "num_classes"):
        num_classes = num_classes_of(model)
    else:
        num_classes = module.cls_repr.shape[1] if isinstance(module, OffsetLearning) else module.out_channels
    class_names = list(getattr(dataset, "class_names", None) or getattr(model, "class_names", None) or [])
    if len(class_names) != num_classes:
        class_names = [str(k) for k in range(num_classes)]
    ignore_index = int(getattr(dataset, "ignore_index", IGNORE_INDEX))
    if not indices:
        raise ValueError("analyze_ideal_representation: no images to analyse")
    iterator = indices
    if progress:
        from tqdm import tqdm

        iterator = tqdm(indices, desc="ideal class representation", unit="img")

    ideal_metric, model_metric = SegMetric(num_classes, ignore_index), SegMetric(num_classes, ignore_index)
    ideal, aligned, counts, ranks, image_ids, ideal_miou, model_miou = [], [], [], [], [], [], []
    examples: list[dict[str, Any]] = []
    stride = 0
    for index in iterator:
        item = dataset[index]
        out = _head_features(model, item["image"])
        feats, logits, stride = out.crop(out.features).cpu(), out.crop(out.logits).cpu(), out.stride
        label = downsample_label(item["label"], feats.shape[-2:])
        labelled = label != ignore_index
        pixels = feats.reshape(feats.shape[0], -1).T  # HW, C
        rows = pixels[labelled.reshape(-1)].double()
        masks = one_hot_masks(label[labelled], num_classes)
        w_star, rank = _solve_ideal(rows, masks, rcond)
        ranks.append(rank)
        recomputed = (w_star @ pixels.double().T).argmax(dim=0).reshape(label.shape)
        predicted = logits.argmax(dim=0)
        ideal_metric.update(recomputed, label)
        model_metric.update(predicted, label)
        ideal_miou.append(_image_miou(recomputed, label, num_classes, ignore_index))
        model_miou.append(_image_miou(predicted, label, num_classes, ignore_index))
        ideal.append(w_star)
        counts.append(torch.bincount(label[labelled], minlength=num_classes)[:num_classes])
        if isinstance(module, OffsetLearning):
            # W + dW as the model computed it, from the whole (padded) feature map
            aligned.append(offset_learning_quantities(module, out.features)["aligned_class_repr"].cpu())
        path = item.get("image_path")
        image_ids.append(Path(path).stem if path else str(index))
        if len(examples) < num_examples:
            examples.append(
                {
                    "image": _display_image(item["image"]),
                    "label": label.numpy(),
                    "ideal": recomputed.numpy(),
                    "model": predicted.numpy(),
                }
            )

    pixel_counts = torch.stack(counts)
    if classes is None:
        appears = (pixel_counts >= min_pixels).sum(dim=0)
        classes = [k for k in range(num_classes) if appears[k] >= 2]
    return IdealReprAnalysis(
        model_name=getattr(model, "name", "") or type(model).__name__,
        kind=kind,
        class_names=class_names,
        image_ids=image_ids,
        stride=stride,
        rcond=rcond,
        min_pixels=min_pixels,
        ideal_repr=torch.stack(ideal),
        model_repr=model_class_representation(model).cpu(),
        aligned_repr=torch.stack(aligned) if aligned else None,
        pixel_counts=pixel_counts,
        feature_rank=ranks,
        ideal_metrics=ideal_metric.compute(),
        model_metrics=model_metric.compute(),
        ideal_image_miou=ideal_miou,
        model_image_miou=model_miou,
        classes=list(classes),
        examples=examples,
    )


# --- figures -----------------------------------------------------------------------------------
def _figure(*args, **kwargs):
    """A matplotlib Figure without pyplot (no display backend, no global state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ValueError("figures need matplotlib: pip install 'offseg[plot]' (or pip install matplotlib)") from err
    return Figure(*args, **kwargs)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "class"


def _heatmap(ax, matrix: torch.Tensor, labels: Sequence[str], title: str):
    values = matrix.detach().cpu().numpy()
    image = ax.imshow(values, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(len(labels)))
    ax.set_yticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_yticklabels(labels, fontsize=6)
    if len(labels) <= 12:  # numbers stay legible only on small grids
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{values[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if abs(values[i, j]) > 0.6 else "black",
                )
    return image


def _palette_for(num_classes: int, palette: Any = None) -> np.ndarray:
    from .visualize import default_palette

    colours = (
        np.zeros((0, 3), dtype=np.uint8) if palette is None else np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    )
    if len(colours) < num_classes:
        colours = np.concatenate([colours, default_palette(num_classes)[len(colours) :]])
    return colours


def plot_ideal_repr(
    analysis: IdealReprAnalysis, out_dir: str | os.PathLike, palette: Any = None, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the figures and `summary.json` of an ideal-representation analysis to `out_dir`:

      similarity/NN_<class>.png   per class: cosine-similarity maps of W*_k, of the fixed W_k and
                                  (Offset Learning) of W_k + dW_k over the images showing class k
      similarity.png              mean off-diagonal similarity per class, side by side
      masks.png                   a few images: labels at head resolution, argmax W* E^T, the model's
      summary.json                every figure, with the list of files written

    `metadata` (checkpoint, data set, ...) is added to the summary, which is returned.
    """
    from .visualize import colorize

    out = Path(out_dir)
    (out / "similarity").mkdir(parents=True, exist_ok=True)
    summary = {**analysis.summary(), **(metadata or {})}
    files: list[str] = []
    short_ids = [image_id[-10:] for image_id in analysis.image_ids]
    for entry in summary["classes"]:
        k = entry["index"]
        images = analysis.images_with(k)
        labels = [short_ids[i] for i in images]
        panels = [
            ("ideal", "ideal W*", entry["ideal_mean_similarity"]),
            ("model", "model W (fixed)", entry["model_mean_similarity"]),
        ]
        if analysis.aligned_repr is not None:
            panels.append(("aligned", "model W + \u0394W (per image)", entry["aligned_mean_similarity"]))
        fig = _figure(figsize=(4.2 * len(panels) + 0.8, 4.4), layout="constrained")
        axes = fig.subplots(1, len(panels))
        for ax, (which, title, mean) in zip(np.atleast_1d(axes), panels, strict=True):
            mean_text = "n/a" if mean is None else f"{mean:.2f}"
            image = _heatmap(ax, analysis.similarity(k, which), labels, f"{title}\nmean off-diagonal {mean_text}")
        fig.colorbar(image, ax=list(np.atleast_1d(axes)), shrink=0.8, label="cosine similarity")
        fig.suptitle(f"{analysis.class_names[k]}: class representation across {len(images)} images", fontsize=10)
        path = out / "similarity" / f"{k:02d}_{_slug(analysis.class_names[k])}.png"
        fig.savefig(path, dpi=120)
        files.append(str(path.relative_to(out)))

    if summary["classes"]:
        names = [entry["name"] for entry in summary["classes"]]
        series = [("ideal W*", "ideal_mean_similarity"), ("model W (fixed)", "model_mean_similarity")]
        if analysis.aligned_repr is not None:
            series.append(("model W + \u0394W", "aligned_mean_similarity"))
        fig = _figure(figsize=(max(7.5, 0.6 * len(names) + 3), 4.2), layout="constrained")
        ax = fig.subplots()
        width = 0.8 / len(series)
        for s, (label, key) in enumerate(series):
            values = [np.nan if entry[key] is None else entry[key] for entry in summary["classes"]]
            ax.bar(np.arange(len(names)) + (s - (len(series) - 1) / 2) * width, values, width, label=label)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("mean off-diagonal cosine similarity")
        ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.05)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars reach 1
        ax.set_title(
            f"{analysis.model_name}, {len(analysis.image_ids)} images: mIoU of argmax W*E\u1d40 "
            f"{_fmt(summary['ideal_mIoU'])}"
            f"\nvs the model's own {_fmt(summary['model_mIoU'])} (at head resolution 1/{analysis.stride})",
            fontsize=9,
        )
        path = out / "similarity.png"
        fig.savefig(path, dpi=120)
        files.append(path.name)

    if analysis.examples:
        colours = _palette_for(len(analysis.class_names), palette)
        rows = len(analysis.examples)
        fig = _figure(figsize=(13, 2.6 * rows), layout="constrained")
        axes = np.atleast_2d(fig.subplots(rows, 4))
        titles = (
            "image",
            f"labels at 1/{analysis.stride} (majority vote)",
            "argmax W* E\u1d40 (ideal)",
            "model prediction",
        )
        for r, example in enumerate(analysis.examples):
            row_images = [example["image"]] + [
                np.asarray(colorize(example[key], colours)) for key in ("label", "ideal", "model")
            ]
            for c, (ax, panel) in enumerate(zip(axes[r], row_images, strict=True)):
                ax.imshow(panel, interpolation="nearest")
                ax.set_axis_off()
                if r == 0:
                    ax.set_title(titles[c], fontsize=9)
        path = out / "masks.png"
        fig.savefig(path, dpi=100)
        files.append(path.name)

    summary["files"] = files + ["summary.json"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def plot_offsets(
    image: np.ndarray,
    quantities: dict[str, Any],
    out_path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    palette: Any = None,
    classes: Sequence[int] | None = None,
    top: int = 4,
    title: str = "",
) -> dict[str, Any]:
    """One figure of Offset Learning on one image (uint8 RGB (H, W, 3)): the input, the prediction
    overlay, the feature-offset norm ||dE|| per pixel, the class-offset norm ||dW_k|| per class
    (with ||W_k|| for scale), and the coupled attention softmax_space(W E^T) of `classes` (default:
    the `top` classes covering most of the prediction). Returns the plotted figures as JSON values."""
    from .visualize import overlay

    height, width = image.shape[:2]
    masks = quantities["masks"].detach().cpu()
    num_classes = masks.shape[0]
    names = (
        list(class_names)
        if class_names is not None and len(class_names) == num_classes
        else [str(k) for k in range(num_classes)]
    )
    colours = _palette_for(num_classes, palette)
    logits = F.interpolate(
        quantities.get("logits", masks)[None].float().cpu(), size=(height, width), mode="bilinear", align_corners=False
    )
    prediction = logits[0].argmax(dim=0).numpy()
    areas = np.bincount(prediction.reshape(-1), minlength=num_classes)
    if classes is None:
        classes = [int(k) for k in np.argsort(-areas, kind="stable")[:top] if areas[k] > 0]
    stride = int(quantities.get("stride", 1))
    extent = (0, quantities["class_attn"].shape[-1] * stride, quantities["class_attn"].shape[-2] * stride, 0)
    grey = np.asarray(image, dtype=np.float32).mean(axis=2)

    columns = max(4, len(classes))
    fig = _figure(figsize=(3.4 * columns, 6.4), layout="constrained")
    grid = fig.add_gridspec(2, columns)
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(image)
    ax.set_title("input", fontsize=9)
    ax.set_axis_off()
    ax = fig.add_subplot(grid[0, 1])
    ax.imshow(overlay(image, prediction, colours))
    ax.set_title("prediction", fontsize=9)
    ax.set_axis_off()

    ax = fig.add_subplot(grid[0, 2])
    feature_norm = quantities["feature_offset_norm"]
    if feature_norm is None:
        ax.text(0.5, 0.5, "no feature offsets\n(class-offset variant)", ha="center", va="center", fontsize=9)
        ax.set_axis_off()
    else:
        shown = ax.imshow(feature_norm.detach().cpu().numpy(), cmap="magma", extent=extent, interpolation="nearest")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        fig.colorbar(shown, ax=ax, shrink=0.7)
        ax.set_title("feature-offset norm \u2016\u0394E\u2016 per pixel", fontsize=9)
        ax.set_axis_off()

    ax = fig.add_subplot(grid[0, 3:] if columns > 3 else grid[0, 3])
    class_norm = quantities["class_offset_norm"]
    repr_norm = quantities["class_repr"].detach().cpu().norm(dim=1).numpy()
    if class_norm is None:
        ax.text(0.5, 0.5, "no class offsets\n(feature-offset variant)", ha="center", va="center", fontsize=9)
        ax.set_axis_off()
    else:
        offsets = class_norm.detach().cpu().numpy()
        order = np.arange(num_classes)
        if num_classes > 40:  # a readable bar chart: the 40 largest offsets, largest first
            order = np.argsort(-offsets, kind="stable")[:40]
        positions = np.arange(len(order))
        ax.bar(
            positions,
            offsets[order],
            color=[tuple(colours[k] / 255) for k in order],
            edgecolor="black",
            linewidth=0.4,
            label="\u2016\u0394W_k\u2016",
        )
        ax.scatter(positions, repr_norm[order], marker="_", color="black", s=80, label="\u2016W_k\u2016", zorder=3)
        ax.set_xticks(positions)
        ax.set_xticklabels([names[k] for k in order], rotation=60, ha="right", fontsize=7)
        ax.set_title(
            "class-offset norm \u2016\u0394W_k\u2016 per class" + (" (40 largest)" if num_classes > 40 else ""),
            fontsize=9,
        )
        ax.set_ylim(0, 1.25 * max(float(offsets[order].max()), float(repr_norm[order].max()), 1e-12))
        ax.legend(fontsize=7, loc="upper center", ncol=2)  # in the headroom above the bars

    class_attn = quantities["class_attn"].detach().cpu()
    for c, k in enumerate(classes):
        ax = fig.add_subplot(grid[1, c])
        attention = class_attn[k].numpy()
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
        # Each map sums to 1 over the pixels; scaled to its own peak so the spread shows.
        ax.imshow(attention / max(attention.max(), 1e-12), cmap="jet", alpha=0.55, extent=extent, vmin=0, vmax=1)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        cells = math.prod(quantities.get("map_size", attention.shape))
        ax.set_title(f"A[{names[k]}], softmax over pixels\npeak {attention.max() * cells:.1f}x uniform", fontsize=8)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(out_path, dpi=100)
    return _json_safe(
        {
            "classes_shown": [names[k] for k in classes],
            "class_offset_norm": dict(zip(names, class_norm.tolist(), strict=True)) if class_norm is not None else None,
            "class_repr_norm": dict(zip(names, repr_norm.tolist(), strict=True)),
            "feature_offset_norm_mean": float(feature_norm.mean()) if feature_norm is not None else None,
            "feature_offset_norm_max": float(feature_norm.max()) if feature_norm is not None else None,
            "feature_norm_mean": float(quantities["features"].norm(dim=0).mean()),
            "predicted_area": dict(zip(names, (areas / areas.sum()).tolist(), strict=True)),
        }
    )
