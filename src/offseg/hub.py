"""The project's own weight format: NAME.safetensors beside NAME.json.

The safetensors file holds the state dict (no pickle, so reading it runs no code); the JSON says
what the weights are for:

    {"format": "offseg", "format_version": 1, "offseg_version": "0.1.0",
     "model_name": "offseg-t", "num_classes": 150, "dataset": "ade20k",
     "class_names": [...], "palette": [[r, g, b], ...],
     "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375],
     "input": "RGB, 0-255, normalised as (x - mean) / std, H and W multiples of 32",
     "test_scale": [w, h]}

class_names, palette, dataset and test_scale (the keep-ratio test resize a training run validated
at; `offseg eval` and `offseg predict` default to it) are null when unknown. A copy of the JSON also sits in the
safetensors header, so the weights file alone still says what it is.

    offseg.save_pretrained(model, "weights/offseg-t_ade20k", dataset="ade20k")
    model = offseg.load_pretrained("weights/offseg-t_ade20k")      # or create_model(name, checkpoint=...)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from .checkpoint import SAFETENSORS_CONFIG_KEY, CheckpointError, infer_num_classes, load_checkpoint, read_checkpoint
from .models.segmentor import num_classes_of

FORMAT_NAME = "offseg"
FORMAT_VERSION = 1


def normalisation() -> tuple[list[float], list[float]]:
    """Per-channel mean and std (RGB, 0-255 scale) every model of the project is trained with."""
    try:
        from .data.transforms import MEAN, STD
    except ImportError:  # data layer absent: the same ImageNet statistics
        MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    return [float(v) for v in MEAN], [float(v) for v in STD]


def _weights_and_config_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.parent / (path.name + ".safetensors"), path.parent / (path.name + ".json")


def pretrained_config(
    model: nn.Module,
    class_names: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | np.ndarray | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """The JSON config `save_pretrained` writes for `model` (see the module docstring)."""
    from . import __version__

    name = getattr(model, "name", "")
    if not name:
        raise ValueError("the model has no registered name (build it with offseg.create_model)")
    num_classes = num_classes_of(model)
    if dataset is not None:
        from .data import dataset_info

        info = dataset_info(dataset)
        dataset = info.name
        class_names = list(info.class_names) if class_names is None else class_names
        palette = info.palette if palette is None else palette
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for a model with {num_classes} classes")
    if palette is not None:
        palette = np.asarray(palette).reshape(-1, 3)
        if len(palette) < num_classes or palette.min() < 0 or palette.max() > 255:
            raise ValueError(f"palette must give {num_classes} RGB colours in 0-255, got shape {palette.shape}")
        palette = palette[:num_classes].astype(int).tolist()
    mean, std = normalisation()
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "offseg_version": __version__,
        "model_name": name,
        "num_classes": num_classes,
        "dataset": dataset,
        "class_names": class_names,
        "palette": palette,
        "mean": mean,
        "std": std,
        "input": "RGB, 0-255, normalised as (x - mean) / std, H and W multiples of "
        f"{getattr(model, 'size_divisor', 32)}",
        # the keep-ratio test resize (w, h) the weights were validated at, when a training run recorded one
        "test_scale": getattr(model, "test_scale", None),
    }


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | np.ndarray | None = None,
    dataset: str | None = None,
) -> Path:
    """Write `path`.safetensors (weights) and `path`.json (config); returns the .safetensors path.

    dataset: a dataset name (see `offseg.data.dataset_info`) supplying class names and palette
    unless they are given explicitly.
    """
    from safetensors.torch import save_file

    config = pretrained_config(model, class_names, palette, dataset)
    weights_path, config_path = _weights_and_config_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share memory, and views must not drag their base along
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(weights_path), metadata={SAFETENSORS_CONFIG_KEY: json.dumps(config)})
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return weights_path


def load_pretrained(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Build the model a checkpoint was saved from and load it (own format or training checkpoint).

    The model gets `class_names` and `palette` attributes (None when the file does not record them).
    overrides: architecture options of the builder (e.g. `freeze_bn=True`).
    """
    from .factory import create_model

    info = read_checkpoint(path)
    name = info.metadata.get("model_name")
    if not name:
        raise CheckpointError(f"{info.path}: does not name its model; use offseg.create_model(NAME, checkpoint=...)")
    num_classes = info.metadata.get("num_classes") or infer_num_classes(info.state_dict)
    model = create_model(name, num_classes=num_classes, **overrides)
    load_checkpoint(model, info.state_dict, source=str(info.path))
    for key in ("class_names", "palette", "test_scale"):
        setattr(model, key, info.metadata.get(key))
    return model
