"""Model registry: small builder functions registered by name, one `create_model` to call them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch.nn as nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder `fn(num_classes=..., **overrides) -> nn.Module` under `name`."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"model name {name!r} is registered twice")
        _BUILDERS[name] = fn
        return fn

    return decorator


def register_variant(name: str, build: Callable[..., nn.Module], doc: str, **fixed: Any) -> None:
    """Register `build(num_classes, **fixed, **overrides)` under `name`, for one member of a family.

    `fixed` are the arguments that make this variant (size, head type); the other keyword
    arguments of `build` are the overrides it accepts, and anything else is a TypeError that
    names the model and lists them.
    """
    accepted = [p for p in inspect.signature(build).parameters if p != "num_classes" and p not in fixed]

    def builder(num_classes: int = 150, **overrides: Any) -> nn.Module:
        unknown = sorted(set(overrides) - set(accepted))
        if unknown:
            raise TypeError(f"{name}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
        return build(num_classes=num_classes, **fixed, **overrides)

    builder.__name__ = name.replace("-", "_")
    builder.__doc__ = doc
    register_model(name)(builder)


def list_models(pattern: str | None = None) -> list[str]:
    """Names of all registered models, sorted; `pattern` is a substring filter or fnmatch pattern."""
    import fnmatch

    names = sorted(_BUILDERS)
    if pattern is None:
        return names
    if any(ch in pattern for ch in "*?["):
        return [n for n in names if fnmatch.fnmatch(n, pattern)]
    return [n for n in names if pattern in n]


def get_builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _BUILDERS[name]
    except KeyError:
        close = [n for n in _BUILDERS if name.split("-")[0] in n]
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} See offseg.list_models().") from None
