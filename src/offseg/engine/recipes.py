"""Training recipes: YAML data, never code.

A recipe is a nested mapping (see `src/offseg/recipes/*.yaml`). Resolution order, later wins:
the built-in defaults below, the recipe file, the file's `models: {NAME: {...}}` entry for the
chosen model (per-model exceptions of the official configs), then command-line overrides
(`section.key=value`, values parsed as YAML). Sections merge key by key, except
`optimizer.custom_keys`, which a later source replaces whole.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"

DEFAULTS: dict[str, Any] = {
    "model": None,
    "model_options": {},
    "data": {
        "name": None,
        "root": None,
        "train_split": "train",
        "val_split": "val",
        "options": {},
        "test_options": {},
        "num_workers": 2,
    },
    "train": {
        "iters": 160000,
        "batch_size": 16,
        "accumulate": 1,
        "amp": None,
        "seed": 0,
        "log_interval": 50,
        "save_interval": 16000,
        "val_interval": 16000,
        "val_limit": None,
        "avg_non_ignore": False,
        "sync_bn": True,
    },
    "optimizer": {
        "type": "AdamW",
        "lr": 6e-5,
        "betas": [0.9, 0.999],
        "weight_decay": 0.01,
        "custom_keys": {"pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}, "head": {"lr_mult": 10.0}},
        "clip_grad": None,
    },
    "schedule": {"warmup_iters": 1500, "warmup_start_factor": 1e-6, "power": 1.0, "eta_min": 0.0, "end": None},
    "test": {"mode": "whole"},
}


# Mappings that are one rule set each: a recipe that gives one replaces the default whole (merging
# would leak, e.g., the default `head: lr x10` key into a recipe with its own keys).
REPLACED_KEYS = frozenset({"custom_keys"})


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if key not in REPLACED_KEYS and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    packaged = RECIPE_DIR / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(
        f"recipe {name_or_path!r} not found: neither a YAML file nor one of {', '.join(available_recipes())}"
    )


def default_recipe_name(model: str, dataset: str) -> str:
    """The packaged recipe for a model x dataset pair: `<family>_<dataset>` (families being the
    model name without its size: offseg-t-pixel -> offseg, segformer-b0-ol -> segformer), else
    the dataset's own recipe (`camvid`, `folder`: CPU-scale, for any model)."""
    family = model.split("-")[0]
    for name in (f"{family}_{dataset}", dataset):
        if (RECIPE_DIR / f"{name}.yaml").is_file():
            return name
    raise FileNotFoundError(
        f"no packaged recipe for {model} on {dataset}; pass --recipe FILE (packaged: {', '.join(available_recipes())})"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def load_recipe(
    name_or_path: str | os.PathLike, model: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of sections")
    per_model = raw.pop("models", {}) or {}
    recipe = deep_merge(DEFAULTS, raw)
    recipe["recipe_source"] = str(path)
    model = model or recipe.get("model")
    if model and model in per_model:
        recipe = deep_merge(recipe, per_model[model])
    if model:
        recipe["model"] = model
    for item in overrides or []:
        keys, value = parse_override(item)
        target = recipe
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value
    return recipe


def set_iterations(recipe: dict[str, Any], iters: int) -> dict[str, Any]:
    """Change the training length. The schedule follows when it ended with training (it does not
    for the COCO-Stuff recipes whose schedule ends early on purpose), and a warm-up longer than a
    tenth of the run is shortened to that."""
    schedule = recipe["schedule"]
    if schedule.get("end") in (None, recipe["train"]["iters"]):
        schedule["end"] = iters
    schedule["warmup_iters"] = min(int(schedule.get("warmup_iters", 0)), iters // 10)
    recipe["train"]["iters"] = iters
    return recipe


def save_recipe(recipe: Mapping[str, Any], path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(dict(recipe), sort_keys=False))
