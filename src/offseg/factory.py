"""`create_model(name, **overrides)`: build any registered model, optionally with weights."""

from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from .models.registry import get_builder


def create_model(
    name: str, num_classes: int | None = None, checkpoint: str | os.PathLike | None = None, **overrides: Any
) -> nn.Module:
    """Build model `name` (see `offseg.list_models()`).

    num_classes: number of output classes (150, ADE20K, by default; taken from the checkpoint when
    one is given and num_classes is not).
    checkpoint: weights to load strictly (official MMSegmentation checkpoint, training
    checkpoint, the project's own safetensors + JSON); read without executing pickled code. A
    file that records its model must record this one; architecture options it records (a
    training run's `model_options`) are applied unless overridden here. Class names, palette and
    test resize it records become `model.class_names` / `model.palette` / `model.test_scale`.
    overrides: architecture options of the builder (e.g. `freeze_bn=True`).
    """
    from .checkpoint import infer_num_classes, load_checkpoint, read_checkpoint

    builder = get_builder(name)
    state_dict, metadata = None, {}
    if checkpoint is not None:
        info = read_checkpoint(checkpoint)
        state_dict, metadata = info.state_dict, info.metadata
        recorded = metadata.get("model_name")
        if recorded and recorded != name:
            raise ValueError(f"{checkpoint}: holds weights of model {recorded}, not {name}")
        overrides = {**metadata.get("model_options", {}), **overrides}
        found = infer_num_classes(state_dict)
        if num_classes is None:
            num_classes = found
        elif found is not None and found != num_classes:
            raise ValueError(
                f"{checkpoint}: checkpoint has {found} classes but num_classes={num_classes} was asked for"
            )
    model = builder(num_classes=150 if num_classes is None else num_classes, **overrides)
    if state_dict is not None:
        load_checkpoint(model, state_dict, source=str(checkpoint))
        for key in ("class_names", "palette", "test_scale"):
            if key in metadata:
                setattr(model, key, metadata[key])
    return model
