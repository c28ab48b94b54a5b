"""Model registry: small builder functions registered by name, one `create_model` to call them."""
from __future__ import annotations

from typing import Callable

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
