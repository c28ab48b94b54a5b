"""ImageNet initialisation of backbones from their usual release files.

Weights are handled here, apart from the model code. `load_backbone_weights(model, path)` reads the
file without executing pickled code, converts its key names to the backbone's when the release
uses other names, loads what fits and reports what was loaded, what stays at its initial value
(new) and what the file had that the backbone does not use (classification heads).

Release formats per backbone class:
- EfficientFormerV2: the snap-research release, {'model': {'patch_embed.*', 'network.*', 'norm.*',
  'head.*', 'dist_head.*'}}. Names already match; the 224-pixel `attention_biases` tables land in
  the unused legacy buffers and the `attention_biases_seg` tables start at zero, as in the
  official fine-tuning.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, read_state_dict

# backbone class name -> function mapping a release state dict to the backbone's key names
KEY_CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {}


def register_key_converter(class_name: str):
    def decorator(fn):
        KEY_CONVERTERS[class_name] = fn
        return fn

    return decorator


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"backbone weights from {self.source}: {len(self.loaded)} tensors loaded, "
                 f"{len(self.new)} new (kept at initialisation), {len(self.unused)} in the file unused"]
        if self.new:
            lines.append(f"  new: {', '.join(self.new[:8])}{' ...' if len(self.new) > 8 else ''}")
        if self.unused:
            lines.append(f"  unused: {', '.join(self.unused[:8])}{' ...' if len(self.unused) > 8 else ''}")
        return "\n".join(lines)


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    if any(k.startswith(prefix) for k in state):  # a whole segmentor: keep its backbone part
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def load_backbone_weights(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> LoadReport:
    """Initialise `model.backbone` (or `model`, if it has no backbone) from an ImageNet release."""
    backbone = getattr(model, "backbone", model)
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "state dict"
    state = read_state_dict(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint)
    state = _strip_prefix(state, "backbone.")
    converter = KEY_CONVERTERS.get(type(backbone).__name__)
    if converter is not None:
        state = converter(state)
    own = backbone.state_dict()
    report = LoadReport(source)
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise CheckpointError(f"{source}: shapes do not fit {type(backbone).__name__}: {', '.join(mismatched[:8])}")
    fitting = {k: v for k, v in state.items() if k in own}
    if not fitting:
        raise CheckpointError(f"{source}: no tensor fits {type(backbone).__name__}; is this a checkpoint of that backbone?")
    backbone.load_state_dict(fitting, strict=False)
    report.loaded = sorted(fitting)
    report.new = sorted(set(own) - set(fitting))
    report.unused = sorted(set(state) - set(own))
    if hasattr(backbone, "train"):
        backbone.train(backbone.training)  # refresh anything cached from the weights
    return report
