"""Reading weights without executing pickled code, and loading them strictly.

Formats read by `read_state_dict`:
- safetensors files;
- torch pickles (official MMSegmentation checkpoints with 'state_dict', ImageNet releases with
  'model', training checkpoints of this project, bare state dicts). These are opened with
  `torch.load(weights_only=True)`; when that refuses a file because it also carries harmless
  non-tensor objects (MMEngine's message_hub, HistoryBuffer, numpy scalars), it is read again
  with a restricted unpickler that rebuilds tensors and plain containers and turns the data
  objects of known training frameworks (mmengine, mmcv, mmseg, mmdet, numpy) into inert
  placeholders. Any other global (os.system, eval, ...) makes the file refused. No code named by
  the file is ever imported or called.

`read_checkpoint` also returns what a file says about itself (`CheckpointInfo.metadata`): the
project's own format (`offseg.hub.save_pretrained`: NAME.safetensors + NAME.json) and training
checkpoints name the model, the class count and the class names; official MMSegmentation
checkpoints carry the class names and palette in 'meta'.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model."""


class InertObject:
    """Stands in for any object a checkpoint names that is not a tensor or plain container."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> InertObject:
        return InertObject()


def _placeholder(module: str, name: str) -> type:
    return type(name, (InertObject,), {"__module__": f"inert.{module}"})


# Callables a tensor pickle legitimately needs. Everything else becomes an InertObject.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch.nn.parameter", "Parameter"): nn.Parameter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
_SAFE_GLOBALS.update(
    {
        ("torch", str(dt).split(".")[1]): dt
        for dt in (
            torch.float32,
            torch.float16,
            torch.bfloat16,
            torch.float64,
            torch.int64,
            torch.int32,
            torch.int16,
            torch.int8,
            torch.uint8,
            torch.bool,
        )
    }
)


# Packages whose pickled objects are bookkeeping data (message hubs, history buffers, numpy
# scalars and arrays): read as placeholders. `_codecs.encode` rebuilds numpy's byte payloads.
_INERT_PACKAGES = ("mmengine", "mmcv", "mmseg", "mmdet", "numpy", "_codecs")


class UnsafePickleError(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _SAFE_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module.split(".")[0] in _INERT_PACKAGES:
            return _placeholder(module, name)
        raise UnsafePickleError(f"it references {module}.{name}, which could run code when loaded")


class _RestrictedPickleModule:
    """A `pickle_module` for torch.load whose Unpickler only resolves the allowlist above."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    __name__ = "offseg_restricted_pickle"


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # carries non-tensor objects; read them as placeholders instead
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key], source)
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            # DistributedDataParallel wraps the model as `module.*`
            if all(k.startswith("module.") for k in tensors):
                tensors = {k[len("module.") :]: v for k, v in tensors.items()}
            return tensors
    raise CheckpointError(f"{source}: no tensors found (expected a state dict, or a dict with 'state_dict' or 'model')")


# Key of the safetensors header entry that holds a copy of the own format's JSON config, so that a
# .safetensors file separated from its .json still says what it is.
SAFETENSORS_CONFIG_KEY = "offseg_config"


@dataclass
class CheckpointInfo:
    """A checkpoint's tensors and what the file says about itself.

    metadata may hold: model_name, num_classes, class_names, palette, mean, std, dataset, test_scale
    (whatever the file records; nothing is guessed). kind: 'offseg' (own format), 'training' (written by
    `offseg train`), 'mmseg' (official, with 'meta' and 'state_dict'), 'release' (an ImageNet
    release, {'model': ...}), 'safetensors' or 'state_dict' (bare tensors).
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = "state_dict"


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """The file to read for `path`: the file itself, or for the own format also NAME.json or the bare
    NAME given for NAME.safetensors."""
    path = Path(path)
    if path.suffix == ".json" and path.with_suffix(".safetensors").is_file():
        return path.with_suffix(".safetensors")
    if not path.exists():
        with_suffix = path.parent / (path.name + ".safetensors")
        if with_suffix.is_file():
            return with_suffix
    return path


def _string_list(value: Any) -> list[str] | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _palette_list(value: Any) -> list[list[int]] | None:
    try:
        rows = [[int(c) for c in row] for row in value]
    except (TypeError, ValueError):
        return None
    return rows if rows and all(len(r) == 3 and all(0 <= c <= 255 for c in r) for r in rows) else None


def _clean_metadata(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only well-formed entries; checkpoints from elsewhere may hold anything under these names."""
    meta: dict[str, Any] = {}
    if isinstance(raw.get("model_name"), str) and raw["model_name"]:
        meta["model_name"] = raw["model_name"]
    if isinstance(raw.get("num_classes"), int) and not isinstance(raw["num_classes"], bool) and raw["num_classes"] > 0:
        meta["num_classes"] = raw["num_classes"]
    names = _string_list(raw.get("class_names"))
    if names:
        meta["class_names"] = names
    palette = _palette_list(raw.get("palette")) if raw.get("palette") is not None else None
    if palette:
        meta["palette"] = palette
    for key in ("mean", "std"):
        value = raw.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
            meta[key] = [float(v) for v in value]
    recipe = raw["recipe"] if isinstance(raw.get("recipe"), Mapping) else {}
    recipe_data = recipe["data"] if isinstance(recipe.get("data"), Mapping) else {}
    dataset = raw.get("dataset", recipe_data.get("name"))
    if isinstance(dataset, str):
        meta["dataset"] = dataset
    # The test resize (w, h) of a training run's validation (e.g. a CPU-scale run at half
    # resolution), so that eval and predict see images as the run did.
    test_scale = raw.get("test_scale")
    test_options = recipe_data.get("test_options")
    if test_scale is None and isinstance(test_options, Mapping):
        test_scale = test_options.get("test_scale", test_options.get("scale"))
    if (
        isinstance(test_scale, (list, tuple))
        and len(test_scale) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in test_scale)
    ):
        meta["test_scale"] = [int(v) for v in test_scale]
    # Architecture options the weights were built with (a training run's recipe records them).
    options = raw.get("model_options", recipe.get("model_options"))
    if isinstance(options, Mapping) and options and all(isinstance(k, str) for k in options):
        meta["model_options"] = dict(options)
    return meta


def _pickle_metadata(obj: Any) -> tuple[dict[str, Any], str]:
    """Metadata and kind of a torch pickle's top-level object."""
    if not isinstance(obj, Mapping):
        return {}, "state_dict"
    if "model" in obj and ("model_name" in obj or "optimizer" in obj):  # `offseg train`
        return _clean_metadata(obj), "training"
    if "state_dict" in obj:
        raw: dict[str, Any] = {}
        meta = obj.get("meta")
        if isinstance(meta, Mapping):
            # MMSegmentation 1.x keeps dataset_meta {'classes', 'palette'}; 0.x kept CLASSES / PALETTE
            dataset_meta = meta.get("dataset_meta")
            if isinstance(dataset_meta, Mapping):
                raw = {"class_names": dataset_meta.get("classes"), "palette": dataset_meta.get("palette")}
            else:
                raw = {"class_names": meta.get("CLASSES"), "palette": meta.get("PALETTE")}
        return _clean_metadata(raw), "mmseg"
    if "model" in obj:
        return {}, "release"
    return {}, "state_dict"


def _read_safetensors(path: Path) -> CheckpointInfo:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has keys(), not __iter__)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    raw: dict[str, Any] = {}
    if SAFETENSORS_CONFIG_KEY in header:
        try:
            raw = json.loads(header[SAFETENSORS_CONFIG_KEY])
        except json.JSONDecodeError:
            raw = {}
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():  # the JSON beside the weights wins: it is the copy a user may edit
        try:
            raw = json.loads(sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{sidecar}: not a readable JSON config ({err})") from None
    metadata = _clean_metadata(raw) if isinstance(raw, Mapping) else {}
    kind = "offseg" if isinstance(raw, Mapping) and raw.get("format") == "offseg" else "safetensors"
    return CheckpointInfo(path, state_dict, metadata, kind)


def read_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Tensors and self-description of a checkpoint file. Never executes pickled code."""
    path = resolve_checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = _torch_load(path)
    except UnsafePickleError as err:
        raise CheckpointError(
            f"{path}: refused: {err}; only tensors and plain data are read from checkpoints"
        ) from None
    except Exception as err:  # truncated zips, garbage, and pickles torch cannot rebuild
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    state_dict = _unwrap(obj, str(path))
    metadata, kind = _pickle_metadata(obj)
    return CheckpointInfo(path, state_dict, metadata, kind)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, by state-dict key. Never executes pickled code."""
    return read_checkpoint(path).state_dict


def infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Number of classes a segmentation state dict was trained for, when it shows."""
    if "decode_head.offset_learning.cls_repr" in state_dict:
        return int(state_dict["decode_head.offset_learning.cls_repr"].shape[1])
    if "decode_head.cls_embed.weight" in state_dict:  # mask classification: + "no object"
        return int(state_dict["decode_head.cls_embed.weight"].shape[0]) - 1
    if "decode_head.conv_seg.weight" in state_dict:
        return int(state_dict["decode_head.conv_seg.weight"].shape[0])
    return None


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        name = getattr(model, "name", "") or type(model).__name__
        parts = [f"{source} does not fit model {name}:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
        raise CheckpointError("\n".join(parts))


def load_checkpoint(
    model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], source: str | None = None
) -> nn.Module:
    """Load weights strictly into `model` (a path, or a state dict already read). Returns the model.

    Float tensors are cast to the model's dtype (the reference files store float16). A file that
    names the model it was saved from (own format, training checkpoint) must name this model.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        info = read_checkpoint(checkpoint)
        source = source or str(info.path)
        state_dict = info.state_dict
        saved_from = info.metadata.get("model_name")
        name = getattr(model, "name", "")
        if saved_from and name and saved_from != name:
            raise CheckpointError(f"{source} holds weights of model {saved_from}, not {name}")
    else:
        state_dict = dict(checkpoint)
    source = source or "state dict"
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)
    return model
