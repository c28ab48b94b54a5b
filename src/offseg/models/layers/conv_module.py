"""Conv -> norm -> activation, with the submodule names of the official checkpoints."""

from __future__ import annotations

import torch
import torch.nn as nn

# The official checkpoints name the norm after its kind.
_NORM_NAMES = {"BN": "bn", "SyncBN": "bn", "GN": "gn", "LN": "ln"}


def build_norm(kind: str, channels: int, num_groups: int = 32, eps: float = 1e-5) -> nn.Module:
    if kind in ("BN", "SyncBN"):
        return nn.BatchNorm2d(channels, eps=eps)
    if kind == "GN":
        return nn.GroupNorm(num_groups, channels, eps=eps)
    if kind == "LN":
        return nn.LayerNorm(channels, eps=eps)
    raise ValueError(f"unknown norm kind {kind!r} (expected BN, SyncBN, GN or LN)")


def build_act(kind: str | None) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "ReLU":
        return nn.ReLU(inplace=True)
    if kind == "GELU":
        return nn.GELU()
    raise ValueError(f"unknown activation {kind!r} (expected ReLU, GELU or None)")


class ConvModule(nn.Module):
    """Conv2d, optional norm, optional activation. The conv has no bias when a norm follows.

    Submodules are `conv`, then `bn` / `gn` / `ln` by norm kind, then `activate`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        norm: str | None = "BN",
        norm_groups: int = 32,
        act: str | None = "ReLU",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=norm is None
        )
        self.norm_name = _NORM_NAMES[norm] if norm is not None else None
        if norm is not None:
            self.add_module(_NORM_NAMES[norm], build_norm(norm, out_channels, norm_groups))
        act_module = build_act(act)
        if act_module is not None:
            self.activate = act_module
        # mmcv's default init: Kaiming-normal (fan_out, relu) conv, unit norm.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        if hasattr(self, "activate"):
            x = self.activate(x)
        return x
