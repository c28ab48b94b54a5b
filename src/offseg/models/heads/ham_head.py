"""SegNeXt's LightHam decode head (a Hamburger with NMF), per-pixel and with Offset Learning.

LightHamHead: backbone levels `in_index` (1..3: strides 8, 16, 32) are resized bilinearly to the
first of them (1/8) and concatenated; `squeeze` (1x1 conv + GN + ReLU) maps them to
`ham_channels`; the Hamburger refines that; `align` (1x1 conv + GN + ReLU) maps to `channels`;
dropout and the 1x1 classifier give logits at 1/8 of the input.

The Hamburger ("Is Attention Better Than Matrix Decomposition?", Geng et al., ICLR 2021):

    z   = ReLU(ham_in(x))                      1x1 conv with bias
    z~  = NMF(z)                               low-rank non-negative reconstruction of z
    out = ReLU(x + GN(ham_out(z~)))            1x1 conv without bias

LightHamHeadOffsetLearning (OffSeg, ICCV 2025): the same, with Offset Learning in place of dropout
and the classifier; `conv_seg` and `dropout` are built but unused, as in the official head.

Randomness. The NMF starts every forward from fresh random bases, so outputs depend on the RNG
even in eval mode. By default the bases come from PyTorch's global CPU generator exactly as in
the official code (one `torch.rand((B * S, D, R))` per forward, made on the CPU and then moved to
the model's device), so `torch.manual_seed(s)` right before a forward reproduces the official
outputs for that seed. For RNG-independent evaluation call `head.set_generator(...)`:

    model.decode_head.set_generator(torch.Generator().manual_seed(0))  # draw from this generator
    model.decode_head.set_generator(0)     # same bases on every forward (fresh generator seeded 0)
    model.decode_head.set_generator(None)  # back to the global RNG

With an integer seed every forward uses the bases that `torch.manual_seed(seed)` would give, so
each batch's prediction depends only on the batch (not on what ran before) and matches the
official code run under that seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.conv_module import ConvModule
from ..layers.offset_learning import OffsetLearning
from .decode_head import DecodeHead

# Added to every multiplicative-update denominator, as in the official NMF.
NMF_EPS = 1e-6


class NMF2D(nn.Module):
    """Non-negative matrix factorisation of a feature map, by multiplicative updates.

    The map (B, C, H, W) is split into `spatial_groups` (S) channel groups, each a D x N matrix X
    (D = C / S, N = H W), factorised as X ~ bases @ coef^T with bases D x R and coef N x R:

        bases0 = L2-normalise over D of U(0, 1) draws
        coef0  = softmax over R of X^T bases0
        repeat `train_steps` (training) or `eval_steps` (eval) times:
            coef  <- coef  * (X^T bases) / (coef bases^T bases + eps)
            bases <- bases * (X coef)    / (bases coef^T coef  + eps)
        coef <- coef * (X^T bases) / (coef bases^T bases + eps)      one more coefficient update
        output = bases coef^T, back to (B, C, H, W)

    Gradients flow through every step. The input must be non-negative (the Hamburger feeds it a
    ReLU output). The official module has a softmax temperature whose config value (100) it
    overrides with 1; there is none here.
    """

    export_bases: torch.Tensor  # buffer, present only while offseg.export fixes the bases

    def __init__(self, rank: int = 16, spatial_groups: int = 1, train_steps: int = 6, eval_steps: int = 7) -> None:
        super().__init__()
        for label, value, low in (
            ("rank", rank, 1),
            ("spatial_groups", spatial_groups, 1),
            ("train_steps", train_steps, 0),
            ("eval_steps", eval_steps, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"NMF2D: {label} must be an integer >= {low}, got {value!r}")
        self.rank = rank
        self.spatial_groups = spatial_groups
        self.train_steps = train_steps
        self.eval_steps = eval_steps
        self.generator: torch.Generator | None = None
        self.seed: int | None = None

    def set_generator(self, generator: torch.Generator | int | None) -> None:
        """Where the initial bases come from: None = the global RNG (official behaviour), a
        `torch.Generator` = that generator (on any device; the draw is moved to the input's
        device), an int = a fresh CPU generator with that seed at every forward."""
        if generator is None or isinstance(generator, torch.Generator):
            self.generator, self.seed = generator, None
        elif isinstance(generator, int) and not isinstance(generator, bool):
            self.generator, self.seed = None, generator
        else:
            raise TypeError(
                f"NMF2D.set_generator: expected a torch.Generator, an int seed or None, got {type(generator).__name__}"
            )

    def random_bases(
        self, batch: int, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Initial bases (batch * S, dim, R): one uniform draw, L2-normalised over `dim`.

        With the default (global) RNG this makes the same single call as the official code, with
        the default dtype and on the CPU, so a seed gives the same bases on any device.
        """
        shape = (batch * self.spatial_groups, dim, self.rank)
        if self.seed is not None:
            draw = torch.rand(shape, generator=torch.Generator().manual_seed(self.seed))
        elif self.generator is not None:
            draw = torch.rand(shape, generator=self.generator, device=self.generator.device)
        else:
            draw = torch.rand(shape)
        draw = draw.to(device=device, dtype=dtype if dtype is not None else draw.dtype)
        return F.normalize(draw, dim=1)

    @staticmethod
    def update_coef(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        numerator = torch.bmm(x.transpose(1, 2), bases)  # (BS, N, R)
        denominator = coef.bmm(bases.transpose(1, 2).bmm(bases))
        return coef * numerator / (denominator + NMF_EPS)

    @staticmethod
    def update_bases(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        numerator = torch.bmm(x, coef)  # (BS, D, R)
        denominator = bases.bmm(coef.transpose(1, 2).bmm(coef))
        return bases * numerator / (denominator + NMF_EPS)

    def forward(self, x: torch.Tensor, bases: torch.Tensor | None = None) -> torch.Tensor:
        """Low-rank reconstruction of x (B, C, H, W). `bases` (B * S, C / S, R) replaces the
        random initial bases (no RNG is used then)."""
        if x.ndim != 4:
            raise ValueError(f"NMF2D: expected a feature map (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c % self.spatial_groups:
            raise ValueError(f"NMF2D: {c} channels cannot be split into {self.spatial_groups} groups")
        dim = c // self.spatial_groups
        x = x.reshape(b * self.spatial_groups, dim, h * w)
        if bases is None:
            bases = self.random_bases(b, dim, x.device, x.dtype)
        elif tuple(bases.shape) != (b * self.spatial_groups, dim, self.rank):
            raise ValueError(
                f"NMF2D: initial bases must have shape {(b * self.spatial_groups, dim, self.rank)}, got "
                f"{tuple(bases.shape)}"
            )

        coef = F.softmax(torch.bmm(x.transpose(1, 2), bases), dim=-1)
        for _ in range(self.train_steps if self.training else self.eval_steps):
            coef = self.update_coef(x, bases, coef)
            bases = self.update_bases(x, bases, coef)
        coef = self.update_coef(x, bases, coef)
        return torch.bmm(bases, coef.transpose(1, 2)).reshape(b, c, h, w)

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, spatial_groups={self.spatial_groups}, "
            f"train_steps={self.train_steps}, eval_steps={self.eval_steps}"
        )


class Hamburger(nn.Module):
    """1x1 conv in, NMF, 1x1 conv + norm out, residual, ReLU."""

    def __init__(self, channels: int, nmf: NMF2D, norm: str | None = "GN", norm_groups: int = 32) -> None:
        super().__init__()
        self.ham_in = ConvModule(channels, channels, 1, norm=None, act=None)
        self.ham = nmf
        self.ham_out = ConvModule(channels, channels, 1, norm=norm, norm_groups=norm_groups, act=None)

    def forward(self, x: torch.Tensor, bases: torch.Tensor | None = None) -> torch.Tensor:
        """`bases`: the NMF's initial bases (see `NMF2D.forward`); None draws them."""
        reconstructed = self.ham(F.relu(self.ham_in(x)), bases)
        return F.relu(x + self.ham_out(reconstructed))


class LightHamHead(DecodeHead):
    """Levels `in_index` of the backbone output -> logits (B, num_classes, H/8, W/8)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        ham_channels: int = 256,
        in_index: Sequence[int] = (1, 2, 3),
        dropout_ratio: float = 0.1,
        norm: str = "GN",
        norm_groups: int = 32,
        align_corners: bool = False,
        nmf_rank: int = 16,
        nmf_spatial_groups: int = 1,
        nmf_train_steps: int = 6,
        nmf_eval_steps: int = 7,
    ) -> None:
        super().__init__(channels, num_classes, dropout_ratio)
        self.in_channels = list(in_channels)
        self.in_index = list(in_index)
        if len(self.in_channels) != len(self.in_index):
            raise ValueError(
                f"{type(self).__name__}: in_channels {self.in_channels} and in_index {self.in_index} differ in length"
            )
        self.ham_channels = ham_channels
        self.align_corners = align_corners
        self.squeeze = ConvModule(sum(self.in_channels), ham_channels, 1, norm=norm, norm_groups=norm_groups)
        nmf = NMF2D(nmf_rank, nmf_spatial_groups, nmf_train_steps, nmf_eval_steps)
        self.hamburger = Hamburger(ham_channels, nmf, norm=norm, norm_groups=norm_groups)
        self.align = ConvModule(ham_channels, channels, 1, norm=norm, norm_groups=norm_groups)

    @property
    def nmf(self) -> NMF2D:
        return self.hamburger.ham

    def set_generator(self, generator: torch.Generator | int | None) -> None:
        """Source of the NMF's random initial bases; see the module docstring and NMF2D.set_generator."""
        self.nmf.set_generator(generator)

    def select_inputs(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        name = type(self).__name__
        if not isinstance(inputs, (list, tuple)):
            raise TypeError(f"{name}: expected the list of backbone feature maps, got {type(inputs).__name__}")
        if max(self.in_index) >= len(inputs):
            raise ValueError(f"{name}: uses feature maps {self.in_index} but got only {len(inputs)}")
        selected = [inputs[i] for i in self.in_index]
        for i, x, c in zip(self.in_index, selected, self.in_channels, strict=True):
            if x.ndim != 4 or x.shape[1] != c:
                raise ValueError(f"{name}: feature map {i} should be (B, {c}, H, W), got {tuple(x.shape)}")
        return selected

    def fuse(self, inputs: Sequence[torch.Tensor], bases: torch.Tensor | None = None) -> torch.Tensor:
        """The aligned feature (B, channels, H/8, W/8) that the classifier reads. `bases`: the NMF's
        initial bases (B * S, ham_channels / S, R); None draws them."""
        selected = self.select_inputs(inputs)
        size = selected[0].shape[-2:]
        resized = [
            x
            if x.shape[-2:] == size
            else F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)
            for x in selected
        ]
        return self.align(self.hamburger(self.squeeze(torch.cat(resized, dim=1)), bases))

    def forward(self, inputs: Sequence[torch.Tensor], bases: torch.Tensor | None = None) -> torch.Tensor:
        return self.cls_seg(self.fuse(inputs, bases))


class LightHamHeadOffsetLearning(LightHamHead):
    """LightHamHead with Offset Learning on the aligned feature instead of dropout + conv_seg."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256, **kwargs) -> None:
        super().__init__(in_channels, num_classes, channels, **kwargs)
        self.offset_learning = OffsetLearning(num_classes, channels)

    def forward(self, inputs: Sequence[torch.Tensor], bases: torch.Tensor | None = None) -> torch.Tensor:
        return self.offset_learning(self.fuse(inputs, bases))
