"""Optimiser and learning-rate schedule of the paper's recipes (SPEC §4).

Parameter groups follow MMEngine's `paramwise_cfg.custom_keys` rules exactly, because the paper's
results depend on them: each key is a substring matched against the full parameter name; keys are
tried longest first, then alphabetically; the first match sets that parameter's lr and weight-decay
multipliers; unmatched parameters get 1 and 1. With the official keys this gives:
`pos_block` -> no decay; else `head` -> lr x10 (every `decode_head.*` parameter, GroupNorm
included, and the backbone's `talking_head*` convs); else `norm` -> no decay (BatchNorms whose
names lack "norm", such as `patch_embed.1`, keep decay).

The schedule is MMEngine's LinearLR(begin=0, end=warmup_iters) followed by PolyLR(begin=warmup_iters,
end=end), stepped after every iteration, in closed form: iteration t < warmup_iters uses
start + (1 - start) * t / (warmup_iters - 1); iteration t >= warmup_iters uses
(1 - k / (end - warmup_iters - 1)) ** power with k = min(t, end - 1) - warmup_iters, which reaches
eta_min at iteration end - 1 and stays there. (MMEngine's schedulers count `end - begin - 1` steps.)
It is a pure function of the iteration, so resuming needs only the iteration number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn


def match_custom_key(name: str, custom_keys: Mapping[str, Mapping[str, float]]) -> str | None:
    """The custom key that governs parameter `name`, in MMEngine's order, or None."""
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in name:
            return key
    return None


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    custom_keys: Mapping[str, Mapping[str, float]] | None = None,
    norm_decay_mult: float | None = None,
) -> list[dict[str, Any]]:
    """One optimiser group per distinct (lr_mult, decay_mult), each listing its parameter names.

    `norm_decay_mult` (MMEngine's paramwise option) scales the decay of parameters of norm layers,
    found by module type, that no custom key matched.
    """
    custom_keys = custom_keys or {}
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            key = match_custom_key(name, custom_keys)
            rule = custom_keys.get(key, {}) if key else {}
            lr_mult = float(rule.get("lr_mult", 1.0))
            decay_mult = float(rule.get("decay_mult", 1.0))
            if key is None and norm_decay_mult is not None and isinstance(module, _NORM_TYPES):
                decay_mult = float(norm_decay_mult)
            group = groups.setdefault(
                (lr_mult, decay_mult),
                {
                    "params": [],
                    "names": [],
                    "lr": lr * lr_mult,
                    "initial_lr": lr * lr_mult,
                    "weight_decay": weight_decay * decay_mult,
                    "lr_mult": lr_mult,
                    "decay_mult": decay_mult,
                },
            )
            group["params"].append(param)
            group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW (or SGD) over the custom-key parameter groups. cfg: the recipe's `optimizer` block."""
    kind = cfg.get("type", "AdamW")
    groups = build_param_groups(
        model, cfg["lr"], cfg.get("weight_decay", 0.0), cfg.get("custom_keys"), cfg.get("norm_decay_mult")
    )
    if kind == "AdamW":
        return torch.optim.AdamW(
            groups,
            lr=cfg["lr"],
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            weight_decay=cfg.get("weight_decay", 0.0),
            eps=cfg.get("eps", 1e-8),
        )
    if kind == "SGD":
        return torch.optim.SGD(
            groups, lr=cfg["lr"], momentum=cfg.get("momentum", 0.9), weight_decay=cfg.get("weight_decay", 0.0)
        )
    raise ValueError(f"optimizer type {kind!r} is not supported (AdamW or SGD)")


class WarmupPolySchedule:
    """lr(iteration) = initial_lr * factor(iteration) for every optimiser group."""

    def __init__(
        self,
        end: int,
        warmup_iters: int = 1500,
        warmup_start_factor: float = 1e-6,
        power: float = 1.0,
        eta_min: float = 0.0,
    ) -> None:
        if warmup_iters >= end:
            raise ValueError(f"warm-up ({warmup_iters} iterations) must end before the schedule does ({end})")
        self.end = end
        self.warmup_iters = warmup_iters
        self.warmup_start_factor = warmup_start_factor
        self.power = power
        self.eta_min = eta_min

    def factor(self, iteration: int) -> float:
        """Multiplier of the initial lr (eta_min is applied in `lr`)."""
        if iteration < self.warmup_iters:
            ramp = iteration / max(self.warmup_iters - 1, 1)
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * ramp
        progress = min(iteration, self.end - 1) - self.warmup_iters
        return (1.0 - progress / max(self.end - self.warmup_iters - 1, 1)) ** self.power

    def lr(self, initial_lr: float, iteration: int) -> float:
        factor = self.factor(iteration)
        if iteration < self.warmup_iters:
            return initial_lr * factor
        return (initial_lr - self.eta_min) * factor + self.eta_min

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.lr(group["initial_lr"], iteration)

    @classmethod
    def from_recipe(cls, cfg: Mapping[str, Any], iters: int) -> WarmupPolySchedule:
        return cls(
            end=int(cfg.get("end", iters)),
            warmup_iters=int(cfg.get("warmup_iters", 1500)),
            warmup_start_factor=float(cfg.get("warmup_start_factor", 1e-6)),
            power=float(cfg.get("power", 1.0)),
            eta_min=float(cfg.get("eta_min", 0.0)),
        )
