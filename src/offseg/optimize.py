"""The CPU inference fast path: `optimize_for_inference(model, size=(H, W))`.

It returns a frozen, eval-mode copy of a segmentation model that computes the same logits as
`model(x)` (to float32 round-off: see `optimize_for_inference` for how close) with less
arithmetic and less memory traffic. The training model
is left untouched. What it does, where it applies:

- every model: BatchNorm folded into the neighbouring convolution (conv -> BN in any
  `nn.Sequential`, in `ConvModule`, and in the known backbone blocks; BN -> 1x1 conv where the BN
  output feeds only that conv), parameters frozen, forward under `torch.inference_mode`;
- EfficientFormerV2 (OffSeg): layer scales folded into the last conv of their branch; the q/k/v
  1x1 convs merged into one, the attention scale folded into q; the relative-position bias
  table pushed through the first talking-head mix once, the bias gathered from it on every call
  at the table's grid size (resized and cached per size at other sizes); the talking-head 1x1
  convs over 8 heads run as one small matrix product each;
- SegFormer: the head's fusion conv split per level, applied before the resizes (`_segformer_fuse`);
- Offset Learning (OffSeg, SegFormer-OL, SegNeXt-OL): the feature-offset projection moved onto
  the (K x C) class side, where it is weights-only, and the offset-aligned score product
  regrouped: E'(W')^T = E(W + dW)^T + softmax_K(A)^T [(W P_f^T)(W + dW)^T], about 40% fewer
  multiply-adds, same function; computed in bands of pixels and classes, in the memory of A;
- memory: the OffSeg head lets go of each map once used (its 1/4-resolution maps are the widest
  of the network, where a labels-only prediction peaks): each fusion writes its upsampled feature
  straight into its side of the interleaved map, the align conv writes over its input, the
  GroupNorm's squares and Offset Learning's products go by bands; no copy of the input is made;
- a batch of several images on CPU runs its widest parts (the backbone's stem and first stage,
  the decode head) image by image, its coarser stages batched (`_image_by_image`;
  `benchmarks/bench_batch.py`);
- 1x1 convolutions run by oneDNN also where PyTorch would use its reference kernel (one
  thread, fewer than 16 images), 1.4-1.9x faster, their sum over the input channels in blocks
  as exact as that kernel's (`_OneDNNConv2d`); Offset Learning's matrix products by oneDNN too,
  1.4-1.8x MKL's rate here, summed in the same blocks (`_onednn_matmul`);
- the whole network runs channels-last (depthwise and 1x1 convs, CARAFE and the similarity maps
  are faster that way on CPU), the OffSeg head's interleaved concatenations included; the logits
  are made NCHW-contiguous before the final resize, which runs by phases of its integer scale
  over contiguous rows (`upsample_bilinear_into`: 2.3x faster than PyTorch's kernel, several
  times faster than that kernel on channels-last input);
- FreqFusion's resampler writes its samples over CARAFE's channels-last output, half a group of
  channels at a time, each sample's four neighbours gathered as channel vectors (`_FastFreqFusion`);
- the full-resolution output is written into transparent huge pages, a buffer reused by the next
  call of the same size once nothing refers to the previous output (`_ReusedOutput`).

CARAFE (its upsampling as small matrix products), FreqFusion's local similarity and kernel
normaliser, the talking heads and the fused BN -> GELU -> conv need no rewrite here:
`offseg.models` computes them without unfolds of whole maps or redundant passes in training and
inference alike (exact reformulations of the official ops);
the eager Offset Learning uses the regrouped score product above too, with autograd.

`reference_computation()` is the opposite: a context manager under which the models compute as
the official implementation does (the similarity by a dilated unfold and F.cosine_similarity, the
kernel normaliser with its permutes and copies, FreqFusion's two identity resizes, attention
biases gathered and bicubically resized on every call, talking heads as 1x1 convs, BN -> GELU ->
conv storing every intermediate, Offset Learning's feature offsets formed for every pixel), with
one exception: CARAFE, a fused compiled kernel in the official code, is the library's own tap
loop (`offseg.models.layers.carafe.carafe_taps`), not an unfold at full resolution. Same
function; the benchmarks' reference row and the tests use it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import mmap
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeGuard, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.backbones import efficientformer_v2 as effv2
from .models.backbones.mit import MixVisionTransformer
from .models.backbones.mscan import MSCAN
from .models.heads.ham_head import LightHamHead, LightHamHeadOffsetLearning
from .models.heads.offseg_head import INTERLEAVE_GROUPS, OffSegHead, interleave_groups
from .models.heads.segformer_head import SegformerHead, SegformerHeadOffsetLearning
from .models.layers import freqfusion as freqfusion_module
from .models.layers.carafe import carafe_taps, carafe_upsample_into
from .models.layers.conv_module import ConvModule
from .models.layers.offset_learning import OffsetLearning
from .models.layers.resample import upsample_bilinear_into
from .models.layers.tracing import is_exporting, is_exporting_or_compiling
from .models.segmentor import num_classes_of

__all__ = ["optimize_for_inference", "fast_model_for", "fold_batch_norms", "InferenceModel", "reference_computation"]


# --------------------------------------------------------------------------------------------
# BatchNorm and layer-scale folding
# --------------------------------------------------------------------------------------------


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BN as y = scale * x + shift, per channel, in float64."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("a BatchNorm without running statistics cannot be folded")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _set_conv_params(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> None:
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(dtype), requires_grad=False)


def _conv_bias(conv: nn.Conv2d) -> torch.Tensor:
    return (
        conv.bias.double() if conv.bias is not None else conv.weight.new_zeros(conv.out_channels, dtype=torch.float64)
    )


def fold_bn_after_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """BN(conv(x)) -> conv'(x): scale the output channels, shift the bias."""
    scale, shift = _bn_affine(bn)
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    _set_conv_params(conv, weight, _conv_bias(conv) * scale + shift)


def fold_bn_before_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> None:
    """conv(BN(x)) -> conv'(x) for a 1x1, ungrouped, unpadded conv (exact only then)."""
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.padding not in ((0, 0), 0):
        raise ValueError("a BatchNorm folds into a following conv only if that conv is 1x1, ungrouped, unpadded")
    scale, shift = _bn_affine(bn)
    weight = conv.weight.double()
    bias = _conv_bias(conv) + (weight[:, :, 0, 0] * shift).sum(dim=1)
    _set_conv_params(conv, weight * scale.view(1, -1, 1, 1), bias)


def scale_conv_outputs(conv: nn.Conv2d, scale: torch.Tensor) -> None:
    """conv'(x) = scale * conv(x), scale per output channel (a layer scale)."""
    scale = scale.detach().double().reshape(-1)
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    _set_conv_params(conv, weight, _conv_bias(conv) * scale)


def _usable_bn(bn: object) -> TypeGuard[nn.BatchNorm2d]:
    return isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.running_var is not None


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    *parents, last = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, value)


def _bn_fold_rules() -> dict[type, tuple[list[tuple[str, str]], list[tuple[str, str]]]]:
    """Per block class: (conv -> BN pairs, BN -> 1x1-conv pairs) whose BN output feeds only
    that conv in the block's forward. `nn.Sequential` and `ConvModule` are handled generically."""
    rules: dict[type, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {
        effv2.Mlp: ([("fc1", "norm1"), ("mid", "mid_norm"), ("fc2", "norm2")], []),
        effv2.ConvDownsample: ([("proj", "norm")], []),
        effv2.AttnDownsample: ([("conv", "bn")], []),
    }
    try:
        from .models.backbones import mscan

        rules[mscan.DownsampleEmbed] = ([("proj", "norm")], [])
        # norm2 feeds only the MLP's first 1x1 conv (norm1 also feeds the attention shortcut).
        rules[mscan.MSCABlock] = ([], [("norm2", "mlp.fc1")])
    except ImportError:  # pragma: no cover - optional model family
        pass
    return rules


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that can be folded exactly into a convolution, replacing
    it by nn.Identity. Modifies `model` in place; returns how many were folded."""
    folded = 0
    rules = _bn_fold_rules()
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, bn = module[i], module[i + 1]
                if isinstance(conv, nn.Conv2d) and _usable_bn(bn):
                    fold_bn_after_conv(conv, bn)
                    module[i + 1] = nn.Identity()
                    folded += 1
        elif isinstance(module, ConvModule) and module.norm_name == "bn" and _usable_bn(module.bn):
            fold_bn_after_conv(module.conv, module.bn)
            module.bn = nn.Identity()
            folded += 1
        elif type(module) in rules:
            after, before = rules[type(module)]
            for conv_path, bn_path in after:
                conv, bn = _get(module, conv_path), _get(module, bn_path)
                if isinstance(conv, nn.Conv2d) and _usable_bn(bn):
                    fold_bn_after_conv(conv, bn)
                    _set(module, bn_path, nn.Identity())
                    folded += 1
            for bn_path, conv_path in before:
                bn, conv = _get(module, bn_path), _get(module, conv_path)
                if isinstance(conv, nn.Conv2d) and _usable_bn(bn):
                    fold_bn_before_conv(bn, conv)
                    _set(module, bn_path, nn.Identity())
                    folded += 1
    return folded


# --------------------------------------------------------------------------------------------
# Convolution + activation in one oneDNN call
# --------------------------------------------------------------------------------------------


_FUSION_WORKS = True


def _fusion_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _onednn_applies(x: torch.Tensor) -> bool:
    """Whether oneDNN's pointwise convolution op may run on `x` (CPU float32, eager mode)."""
    return _FUSION_WORKS and x.device.type == "cpu" and x.dtype == torch.float32 and not is_exporting_or_compiling()


def _onednn_conv(x: torch.Tensor, conv: nn.Conv2d, attr: str, algorithm: str | None) -> torch.Tensor | None:
    """attr(conv(x)) by oneDNN, or None if this PyTorch build's op differs (then never again)."""
    global _FUSION_WORKS
    try:
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, attr, [], algorithm
        )
    except RuntimeError:
        _FUSION_WORKS = False
        return None


class _ConvAct(nn.Module):
    """act(conv(x)) for act GELU (exact, erf) or ReLU, computed by oneDNN as one convolution with
    the activation applied to its output while it is still in cache (PyTorch's own fused CPU op,
    the one inductor emits): 1.5-2x faster than a convolution and a separate activation pass, the
    same values to float32 rounding. Falls back to the two modules where the op does not apply
    (other devices and dtypes, tracing and export)."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.act = act
        self.attr = "gelu" if isinstance(act, nn.GELU) else "relu"
        self.algorithm: str | None = "none" if isinstance(act, nn.GELU) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and _onednn_applies(x):
            out = _onednn_conv(x, self.conv, self.attr, self.algorithm)
            if out is not None:
                return out
        return self.act(self.conv(x))


# Input channels per oneDNN call of `_OneDNNConv2d` (see there).
_CHANNEL_BLOCK = 192


def _channel_blocks(channels: int, block: int = _CHANNEL_BLOCK) -> list[tuple[int, int]]:
    """[start, end) ranges splitting `channels` into the fewest blocks of at most `block`, of
    near-equal sizes, multiples of 16 but the last (oneDNN's AVX-512 kernels block channels by 16)."""
    count = -(-channels // block)
    even = -(-channels // count)
    size = min(block, (even + 15) // 16 * 16)
    return [(start, min(start + size, channels)) for start in range(0, channels, size)]


class _OneDNNConv2d(nn.Conv2d):
    """A 1x1 convolution computed by oneDNN where PyTorch would use its reference kernel.

    PyTorch (Convolution.cpp, `ConvParams::use_mkldnn`) sends a float32 1x1, stride-1 convolution
    of fewer than 16 images on one thread to `_slow_conv2d_forward` (a BLAS matrix product), as
    "faster when single-threaded"; with more threads or images it picks oneDNN. On this project's
    machine (AMD EPYC, AVX-512, MKL) oneDNN is about 2x faster on every 1x1 shape of OffSeg-T,
    SegFormer-B0 and SegNeXt-T at 512x512. But oneDNN sums all input channels in one running
    float32 sum, MKL in blocks of up to about 192: above 192 channels oneDNN's outputs are up to
    2.3x further from float64 (RMS), and the fast path's logits up to 1.2x (SegFormer-B0).
    Here the sum runs over `channel_blocks` (at most `_CHANNEL_BLOCK` channels each), the later
    blocks added in place by oneDNN's sum post-op: as exact as MKL's product, 1.4-1.9x faster
    than it (benchmarks/bench_onednn_conv.py). Elsewhere (more threads, 16 images or more, other
    devices, tracing and export) the convolution dispatches as PyTorch decides.
    """

    channel_blocks: list[tuple[int, int]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[0] < 16 and torch.get_num_threads() == 1 and _onednn_applies(x):
            out = self.blocked_forward(x)
            if out is not None:
                return out
        return super().forward(x)

    def blocked_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """oneDNN convolutions over the channel blocks (`_blocked_pointwise_conv`). The weight's
        columns are sliced on every call: contiguous copies kept would double the resident weights
        of the blocked convolutions (17 MB more for OffSeg-T), for 5-15% of their time."""
        return _blocked_pointwise_conv(x, self.weight, self.bias, self.channel_blocks)


def _blocked_pointwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    blocks: Sequence[tuple[int, int]],
    out: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor | None:
    """The 1x1 convolution of x (B, C, H, W) with weight (N, C, 1, 1) [+ bias] as oneDNN
    convolutions over `blocks` of input channels, each block after the first added to the output
    in place by oneDNN's sum post-op; with `out` given, every block is added into it. `relu`: the
    ReLU applied by the last call, after its sum. None if the ops differ in this PyTorch build
    (then never again; the first call fails if any does, so `out` is then untouched)."""
    global _FUSION_WORKS
    zeros, ones = [0, 0], [1, 1]
    try:
        rest = list(blocks)
        if out is None:
            (start, end), rest = rest[0], rest[1:]
            attr = "relu" if relu and not rest else "none"
            out = torch.ops.mkldnn._convolution_pointwise(
                x[:, start:end], weight[:, start:end], bias, zeros, ones, ones, 1, attr, [], None
            )
            bias = None
        for k, (start, end) in enumerate(rest):
            torch.ops.mkldnn._convolution_pointwise_.binary(
                out,
                x[:, start:end],
                weight[:, start:end],
                bias if k == 0 else None,
                zeros,
                ones,
                ones,
                1,
                "add",
                None,
                "relu" if relu and k == len(rest) - 1 else None,
                [],
                None,
            )
    except RuntimeError:
        _FUSION_WORKS = False
        return None
    return out


# Rows per step of _onednn_matmul's products over several channel blocks (256 channels: 1 MB copies).
_MATMUL_BAND_ROWS = 2048


def _onednn_matmul(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ weight^T for x (B, M, K) with contiguous rows and weight (N, K), or that product added
    into `out` (B, M, N, contiguous) in place; None where oneDNN does not apply (the caller then
    uses torch.matmul). PyTorch sends float32 matrix products to MKL, which on this project's
    machine (AMD EPYC, AVX-512) is slower than oneDNN: `benchmarks/bench_onednn_conv.py --matmul`
    gave 16384 x 256 x 150 in 9.1 ms here against 16.2 by MKL on one thread, 5.5 against 7.9 on
    two (2048^3: 168 against 103 G multiply-adds/s). The product is a 1x1 convolution of x seen as
    a channels-last (1, K, 1, B * M) map, summed over K in the blocks of `_OneDNNConv2d`, as exact
    as MKL's product (RMS from float64 2.05e-7 for both). OffSeg-T's fast path: 0.95x the time of
    torch.matmul's (1 thread), 0.95-0.98x (2 threads)."""
    if x.dim() != 3 or not _onednn_applies(x) or not _fusion_available():
        return None
    b, m, k = x.shape
    n = weight.shape[0]
    # all B x M rows one after another (B = 1, or a contiguous x): one map of B * M pixels
    if x.stride(2) != 1 or x.stride(1) != k or (b > 1 and x.stride(0) != m * k):
        return None
    if out is not None and not out.is_contiguous():
        return None
    rows = b * m
    if out is None and rows > _MATMUL_BAND_ROWS and len(_channel_blocks(k)) > 1:
        # oneDNN copies each block of channels of a map first (a strided slice): a band of rows at
        # a time, those copies are small (Offset Learning's scores at 512x512: 8 MB at once).
        out = x.new_zeros(b, m, n)
        pixels, sums = x.reshape(1, rows, k), out.view(1, rows, n)
        for start in range(0, rows, _MATMUL_BAND_ROWS):
            band = slice(start, start + _MATMUL_BAND_ROWS)
            if _onednn_matmul(pixels[:, band], weight, out=sums[:, band]) is None:
                return None
        return out
    # Dense channels-last views: oneDNN takes them as they are (other strides are copied first).
    as_map = x.as_strided((1, k, 1, rows), (rows * k, 1, rows * k, k))
    into = None if out is None else out.as_strided((1, n, 1, rows), (rows * n, 1, rows * n, n))
    result = _blocked_pointwise_conv(as_map, weight[:, :, None, None], None, _channel_blocks(k), into)
    if result is None:
        return None
    return result.permute(0, 2, 3, 1).reshape(b, m, n)  # a view of a channels-last result


def _is_pointwise_conv(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _route_pointwise_convs_to_onednn(model: nn.Module) -> int:
    """Every plain 1x1 convolution of `model` made an `_OneDNNConv2d` (same parameters and module
    path). Returns how many."""
    if not _fusion_available():
        return 0
    routed = 0
    for module in model.modules():
        if _is_pointwise_conv(module):
            conv = cast(_OneDNNConv2d, module)
            conv.__class__ = _OneDNNConv2d
            conv.channel_blocks = _channel_blocks(conv.in_channels)
            routed += 1
    return routed


def _fusable(conv: nn.Module, act: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and ((type(act) is nn.GELU and act.approximate == "none") or type(act) is nn.ReLU)
    )


class _FastConvModule(ConvModule):
    """ConvModule whose norm was folded away: conv + activation in one call."""

    conv_act: _ConvAct

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_act(x)


class _FusedConvMlp(nn.Module):
    """MSCAN's ConvMlp (eval): fc1, then the depthwise conv + GELU in one call, then fc2."""

    fc1: nn.Conv2d
    dwconv_act: _ConvAct
    fc2: nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dwconv_act(self.fc1(x)))


def _fuse_conv_activations(model: nn.Module) -> int:
    """Conv2d -> [Identity ...] -> GELU/ReLU in `nn.Sequential`s, BN-free ConvModules and the known
    blocks, each replaced by a `_ConvAct` (the activation module by nn.Identity). Returns how many."""
    if not _fusion_available():
        return 0
    fused = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                j = i + 1
                while j < len(module) - 1 and isinstance(module[j], nn.Identity):
                    j += 1
                if _fusable(module[i], module[j]):
                    module[i] = _ConvAct(cast(nn.Conv2d, module[i]), module[j])
                    module[j] = nn.Identity()
                    fused += 1
        elif type(module) is ConvModule and hasattr(module, "activate"):
            norm = getattr(module, module.norm_name) if module.norm_name is not None else None
            if (norm is None or isinstance(norm, nn.Identity)) and _fusable(module.conv, module.activate):
                module.conv_act = _ConvAct(module.conv, module.activate)
                module.__class__ = _FastConvModule
                fused += 1
        elif type(module) is _FastMlp:
            module.fc1_act = _ConvAct(module.fc1, module.act)
            module.mid_act = _ConvAct(module.mid, module.act)
            module.__class__ = _FusedMlp
            fused += 2
    try:
        from .models.backbones import mscan

        for module in list(model.modules()):
            if type(module) is mscan.ConvMlp and _fusable(module.dwconv, module.act):
                module.dwconv_act = _ConvAct(module.dwconv, module.act)
                cast(nn.Module, module).__class__ = _FusedConvMlp
                fused += 1
    except ImportError:  # pragma: no cover - optional model family
        pass
    return fused


# --------------------------------------------------------------------------------------------
# EfficientFormerV2 fast blocks (installed by swapping the class of a frozen copy's modules)
# --------------------------------------------------------------------------------------------


class _FastMlp(effv2.Mlp):
    """fc1 -> GELU -> depthwise 3x3 -> GELU -> fc2, BNs folded, dropout (eval) skipped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.mid(self.act(self.fc1(x)))))


class _FusedMlp(_FastMlp):
    """_FastMlp with fc1 + GELU and the depthwise conv + GELU each one oneDNN call."""

    fc1_act: _ConvAct
    mid_act: _ConvAct

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.mid_act(self.fc1_act(x)))


class _FastFFN(effv2.FFN):
    """x + mlp(x); the layer scale lives in mlp.fc2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class _FastAttnFFN(effv2.AttnFFN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mixer(x)
        return x + self.mlp(x)


class _FastConvDownsample(effv2.ConvDownsample):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _FastAttnDownsample(effv2.AttnDownsample):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x) + self.conv(x)


def _merge_convs(convs: Sequence[nn.Conv2d], scales: Sequence[float]) -> nn.Conv2d:
    """One 1x1 conv computing the given 1x1 convs (same input) stacked along channels, each
    multiplied by its scale."""
    weight = torch.cat([c.weight.double() * s for c, s in zip(convs, scales, strict=True)])
    bias = torch.cat([_conv_bias(c) * s for c, s in zip(convs, scales, strict=True)])
    merged = nn.Conv2d(weight.shape[1], weight.shape[0], 1).to(convs[0].weight.dtype)
    _set_conv_params(merged, weight, bias)
    return merged


def _head_mix(mix: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1x1 conv over the head axis as (weight (H, H), bias (H, 1))."""
    bias = mix.bias if mix.bias is not None else mix.weight.new_zeros(mix.out_channels)
    return mix.weight.detach()[:, :, 0, 0].clone(), bias.detach().view(-1, 1).clone()


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class _FastAttention4D(effv2.Attention4D):
    """Attention4D with merged q/k/v, the scale folded into q, the bias (already mixed by the
    first talking head) cached per token count, and the head mixes as matrix products."""

    mix1_weight: torch.Tensor
    mix1_bias: torch.Tensor
    mix2_weight: torch.Tensor
    mix2_bias: torch.Tensor
    mixed_table: torch.Tensor

    def prepare(self) -> None:
        q, k, v = (cast(nn.Conv2d, branch[0]) for branch in (self.q, self.k, self.v))  # conv_bn: conv, BN
        self.qkv = _merge_convs([q, k, v], [self.scale, 1.0, 1.0])
        self.split_sizes = [q.out_channels, k.out_channels, v.out_channels]
        del self.q, self.k, self.v
        # Buffers (not in the state dict), so that `.to()` / `.double()` convert them with the rest.
        for name, mix in (("mix1", self.talking_head1), ("mix2", self.talking_head2)):
            weight, bias = _head_mix(mix)
            self.register_buffer(f"{name}_weight", weight, persistent=False)
            self.register_buffer(f"{name}_bias", bias, persistent=False)
        # The mix commutes with the gather of the bias from its table: W1 T[:, idx] + b1 = (W1 T + b1)[:, idx].
        mixed = torch.addmm(self.mix1_bias, self.mix1_weight, self.attention_biases_seg.detach())
        self.register_buffer("mixed_table", mixed, persistent=False)
        self.bias_cache: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def mixed_bias(self, n: int) -> torch.Tensor:
        """talking_head1 applied to the position bias: W1 B + b1, (heads, n*n).

        At the grid size of the table, gathered from the mixed table on every call rather than
        cached: a cache stays resident through the whole forward (2 MB per layer at 512x512
        input; with the downsampling attention's 8 MB, 16 MB for OffSeg-T) and the gather costs
        about what reading the cache does. Other sizes need the bicubic resize: cached."""
        idxs = self.attention_bias_idxs_seg
        if idxs.shape == (n, n):
            return torch.index_select(self.mixed_table, 1, idxs.view(-1))
        key = (n, self.mixed_table.dtype, self.mixed_table.device)  # a converted model computes anew
        cached = self.bias_cache.get(key)
        if cached is None:
            bias = self.position_bias(n, n)[0].reshape(self.num_heads, n * n)
            cached = torch.addmm(self.mix1_bias, self.mix1_weight, bias).contiguous()
            self.bias_cache[key] = cached
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        h, w = x.shape[-2:]
        n, heads = h * w, self.num_heads
        q, k, v = self.qkv(x).split(self.split_sizes, dim=1)
        v_local = self.v_local(v)
        q = q.reshape(b, heads, -1, n)
        k = k.reshape(b, heads, -1, n)
        v = v.reshape(b, heads, -1, n)
        scores = torch.matmul(q.transpose(2, 3), k)  # (B, heads, n, n), already scaled
        # talking_head1(scores + bias) = W1 scores + (W1 bias + b1)
        attn = torch.baddbmm(
            self.mixed_bias(n).expand(b, -1, -1), self.mix1_weight.expand(b, -1, -1), scores.reshape(b, heads, n * n)
        )
        attn = attn.view(b, heads, n, n).softmax(dim=-1)
        attn = torch.baddbmm(
            self.mix2_bias.expand(b, -1, n * n), self.mix2_weight.expand(b, -1, -1), attn.reshape(b, heads, n * n)
        ).view(b, heads, n, n)
        out = torch.matmul(v, attn.transpose(2, 3)).reshape(b, self.dh, h, w)
        # Follow the input's layout: upsampling and the projection run on this map at 4x the size.
        out = out.contiguous(memory_format=_layout(x)) + v_local
        if self.upsample is not None:
            out = self.upsample(out)
        return self.proj(out)


class _FastAttention4DDownsample(effv2.Attention4DDownsample):
    """Attention4DDownsample with merged k/v, the scale folded into q and the bias cached."""

    def prepare(self) -> None:
        k, v = (cast(nn.Conv2d, branch[0]) for branch in (self.k, self.v))  # conv_bn: conv, BN
        self.kv = _merge_convs([k, v], [1.0, 1.0])
        self.split_sizes = [k.out_channels, v.out_channels]
        del self.k, self.v
        q_conv = cast(nn.Conv2d, self.q.proj[0])
        scale_conv_outputs(q_conv, torch.full((q_conv.out_channels,), self.scale))
        self.bias_cache: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}

    def cached_bias(self, nq: int, nk: int) -> torch.Tensor:
        if self.attention_bias_idxs_seg.shape == (nq, nk):
            # A gather on every call, not cached (see _FastAttention4D.mixed_bias).
            return torch.index_select(self.attention_biases_seg, 1, self.attention_bias_idxs_seg.view(-1)).view(
                -1, nq, nk
            )
        key = (nq, nk, self.attention_biases_seg.dtype, self.attention_biases_seg.device)
        cached = self.bias_cache.get(key)
        if cached is None:
            cached = self.position_bias(nq, nk)[0].contiguous()
            self.bias_cache[key] = cached
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        n, heads = h * w, self.num_heads
        q = self.q(x)
        hq, wq = q.shape[-2:]
        nq = hq * wq
        k, v = self.kv(x).split(self.split_sizes, dim=1)
        v_local = self.v_local(v)
        q = q.reshape(b, heads, -1, nq)
        k = k.reshape(b, heads, -1, n)
        v = v.reshape(b, heads, -1, n)
        attn = torch.matmul(q.transpose(2, 3), k).add_(self.cached_bias(nq, n)).softmax(dim=-1)
        out = torch.matmul(v, attn.transpose(2, 3)).reshape(b, self.dh, hq, wq)
        return self.proj(out.contiguous(memory_format=_layout(x)) + v_local)


def _optimise_efficientformer_v2(backbone: effv2.EfficientFormerV2) -> None:
    swaps = {
        effv2.Mlp: _FastMlp,
        effv2.ConvDownsample: _FastConvDownsample,
        effv2.AttnDownsample: _FastAttnDownsample,
        effv2.Attention4D: _FastAttention4D,
        effv2.Attention4DDownsample: _FastAttention4DDownsample,
    }
    for module in backbone.modules():
        if isinstance(module, effv2.FFN):
            scale_conv_outputs(module.mlp.fc2, module.layer_scale_2)
            module.__class__ = _FastFFN
        elif isinstance(module, effv2.AttnFFN):
            scale_conv_outputs(cast(nn.Conv2d, module.token_mixer.proj[1]), module.layer_scale_1)
            scale_conv_outputs(module.mlp.fc2, module.layer_scale_2)
            module.__class__ = _FastAttnFFN
        elif isinstance(module, effv2.AttentionBias):
            # The position-bias index tables in int32: half of 4 MB for OffSeg-T, resident.
            module.attention_bias_idxs_seg = module.attention_bias_idxs_seg.int()
    for module in list(backbone.modules()):
        fast = swaps.get(type(module))
        if fast is not None:
            module.__class__ = fast
            prepare = getattr(module, "prepare", None)
            if prepare is not None:
                prepare()


# --------------------------------------------------------------------------------------------
# A batch on CPU: the widest parts image by image
# --------------------------------------------------------------------------------------------


def _image_by_image(x: torch.Tensor) -> bool:
    """Whether a batch runs its widest parts one image at a time: several images, on CPU, outside
    tracing and compiling. Those parts (the backbone's stem and first stage, the decode head) hold
    the widest maps of the network and gain nothing from the batch: one image's maps stay in the
    caches and in glibc's heap, where a batch's were mapped afresh and faulted in on every call.
    The coarser stages, where one image leaves threads idle, still run batched. OffSeg-T, 8 images
    of 480x360, 1 thread: 1100-1189 instead of 1404-1427 ms, the forward's own peak RSS 217-222 MB
    instead of 480-514 (docs/serve.md)."""
    return x.shape[0] > 1 and x.device.type == "cpu" and not is_exporting_or_compiling()


class _ImageByImageHead(nn.Module):
    """Mixin for a decode head taking the list of backbone maps: several images on CPU one at a time.
    A list handed over is emptied, as the OffSeg head's `fuse` does with it."""

    def forward(self, inputs: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        if not _image_by_image(inputs[0]):
            return super().forward(inputs, *args, **kwargs)
        batch = list(inputs)
        if isinstance(inputs, list):
            inputs.clear()
        images = len(batch[0])
        shares = self.image_shares(images, *args, **kwargs)
        logits = []
        for i in range(images):  # a loop: super() without arguments fails inside a comprehension
            logits.append(super().forward([x[i : i + 1] for x in batch], **shares[i]))
        return torch.cat(logits)

    def image_shares(self, images: int, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """The head's further arguments for a batch, split into each image's (keyword arguments).
        A head without further arguments takes none."""
        if args or kwargs:
            raise TypeError(f"{type(self).__name__}.forward takes only the list of feature maps")
        return [{}] * images


class _ImageByImageHamHead(_ImageByImageHead):
    """For SegNeXt's LightHamHead (stride 8): each image from its share of one draw of the NMF's
    initial bases for the whole batch, the draw the batched head makes, so the logits are the
    batched head's."""

    def image_shares(self, images: int, bases: torch.Tensor | None = None) -> list[dict[str, Any]]:
        head = cast(LightHamHead, self)
        groups = head.nmf.spatial_groups
        if bases is None:
            param = next(head.parameters())
            bases = head.nmf.random_bases(images, head.ham_channels // groups, param.device, param.dtype)
        return [{"bases": bases[i * groups : (i + 1) * groups]} for i in range(images)]


class _FastLightHamHead(_ImageByImageHamHead, LightHamHead):
    pass


class _FastLightHamHeadOffsetLearning(_ImageByImageHamHead, LightHamHeadOffsetLearning):
    pass


class _FastEfficientFormerV2(effv2.EfficientFormerV2):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not _image_by_image(x):
            return super().forward(x)
        first_stage = self.network[0]
        x = torch.cat([first_stage(self.stem(image)) for image in x.split(1)])
        outs = [x] if 0 in self.out_indices else []
        for idx in range(1, len(self.network)):
            x = self.network[idx](x)
            if idx in self.out_indices:
                outs.append(x)
        return outs


def _first_stage_by_image(
    x: torch.Tensor, stages: Sequence[Callable[[torch.Tensor], torch.Tensor]]
) -> list[torch.Tensor]:
    """The output of each of `stages` applied in turn, the first one image by image."""
    first, *rest = stages
    x = torch.cat([first(image) for image in x.split(1)])
    features = [x]
    for stage in rest:
        x = stage(x)
        features.append(x)
    return features


class _FastMixVisionTransformer(MixVisionTransformer):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not _image_by_image(x):
            return super().forward(x)
        return _first_stage_by_image(x, list(self.layers))


class _FastMSCAN(MSCAN):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not _image_by_image(x):
            return super().forward(x)
        return _first_stage_by_image(x, [functools.partial(self.stage, i) for i in range(1, self.num_stages + 1)])


def _run_batches_image_by_image(model: nn.Module) -> None:
    """`_image_by_image` for the backbones and SegNeXt's head (the OffSeg and SegFormer heads have
    theirs from `_ImageByImageHead`)."""
    swaps: dict[type, type] = {
        effv2.EfficientFormerV2: _FastEfficientFormerV2,
        MixVisionTransformer: _FastMixVisionTransformer,
        MSCAN: _FastMSCAN,
        LightHamHead: _FastLightHamHead,
        LightHamHeadOffsetLearning: _FastLightHamHeadOffsetLearning,
    }
    for module in model.modules():
        fast = swaps.get(type(module))
        if fast is not None:
            module.__class__ = fast


# --------------------------------------------------------------------------------------------
# SegFormer's decode head: the fusion conv before the resizes
# --------------------------------------------------------------------------------------------


def _segformer_fusion_splits(head: SegformerHead) -> bool:
    """Split `head`'s BN-folded fusion conv (1x1 over the concatenated levels, then ReLU) into one
    1x1 conv per level, `fusion_projs` (the first one carries the bias), and drop it. False (and
    nothing changed) where the fusion conv is not a plain 1x1 conv + ReLU, e.g. its norm unfolded."""
    fusion = head.fusion_conv
    conv, levels, width = fusion.conv, len(head.convs), head.channels
    norm = getattr(fusion, fusion.norm_name) if fusion.norm_name is not None else None
    if (
        (norm is not None and not isinstance(norm, nn.Identity))
        or type(getattr(fusion, "activate", None)) is not nn.ReLU
        or not _is_pointwise_conv(conv)
        or conv.in_channels != levels * width
    ):
        return False
    weight, bias = conv.weight.detach(), _conv_bias(conv)
    projs = []
    for i in range(levels):
        proj = nn.Conv2d(width, conv.out_channels, 1, bias=i == 0, device=weight.device, dtype=weight.dtype)
        proj.weight = nn.Parameter(weight[:, i * width : (i + 1) * width].clone(), requires_grad=False)
        if i == 0:
            proj.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=False)
        projs.append(proj)
    head.fusion_projs = nn.ModuleList(projs)
    del head.fusion_conv
    return True


def _segformer_fuse(head: SegformerHead, projs: nn.ModuleList, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """`SegformerHead.fuse` with the fusion conv moved before the resizes.

    Bilinear resizing is linear per channel and the fusion conv (BN folded) linear per pixel, so
    fusion(cat_i resize(r_i)) = ReLU(sum_i resize(W_i r_i) + b), W_i the conv's columns of level
    i: each level's share is computed at its own resolution (1/8 to 1/32: 4-64x fewer pixels) and
    no concatenation is made. SegFormer-B0 at 512x512: 1.4 G multiply-adds for 4.3 G, no 64 MB map.
    The resized shares are summed in place; the finest level's share, its bias and the ReLU are
    added to that sum by oneDNN in one pass (`_blocked_pointwise_conv` with its sum and ReLU
    post-ops). Up to 256 input channels that is one call, not the 192-channel blocks of
    `_OneDNNConv2d`: on segformer-b0-ol at 512x512 the fused map is as close to float64 either way
    (RMS 7.5e-7; eager 6.2e-7), and two blocks cost 10% of the head (a copy of each channel slice,
    a second pass over the sum). The maps stay channels-last: the bilinear kernel is 7-11x faster
    there than on NCHW at 256 channels (one thread, 1/8-1/32 to 1/4)."""
    if len(inputs) != len(head.convs):
        raise ValueError(f"{type(head).__name__}: expected {len(head.convs)} feature maps, got {len(inputs)}")
    size = inputs[0].shape[-2:]
    coarse: torch.Tensor | None = None
    for conv, proj, x in zip(head.convs[1:], projs[1:], inputs[1:], strict=True):
        share = proj(conv(x))
        if share.shape[-2:] != size:  # resizing to the same size is the identity
            share = F.interpolate(share, size=size, mode="bilinear", align_corners=head.align_corners)
        coarse = share if coarse is None else coarse.add_(share)
        del share  # before the next level's share, and the finest level's map, are allocated
    finest, proj = head.convs[0](inputs[0]), cast(nn.Conv2d, projs[0])
    if coarse is not None and _onednn_applies(finest) and _layout(finest) is _layout(coarse):
        blocks = _channel_blocks(proj.in_channels, _SHARE_CHANNEL_BLOCK)
        fused = _blocked_pointwise_conv(finest, proj.weight, proj.bias, blocks, out=coarse, relu=True)
        if fused is not None:
            return fused
    share = proj(finest)
    return torch.relu(share if coarse is None else share + coarse)


# Input channels per oneDNN call of the SegFormer head's finest share (see `_segformer_fuse`).
_SHARE_CHANNEL_BLOCK = 256


class _FastSegformerHead(_ImageByImageHead, SegformerHead):
    """SegformerHead with the fusion conv split over the levels (`_segformer_fuse`)."""

    fusion_projs: nn.ModuleList

    def fuse(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return _segformer_fuse(self, self.fusion_projs, inputs)


class _FastSegformerHeadOffsetLearning(_ImageByImageHead, SegformerHeadOffsetLearning):
    """SegformerHeadOffsetLearning with the fusion conv split over the levels (`_segformer_fuse`)."""

    fusion_projs: nn.ModuleList

    def fuse(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return _segformer_fuse(self, self.fusion_projs, inputs)


def _optimise_segformer_heads(model: nn.Module) -> None:
    """After BN folding, before the convs are fused with their activations and routed to oneDNN
    (the per-level convs made here are routed too)."""
    swaps: dict[type, type] = {
        SegformerHead: _FastSegformerHead,
        SegformerHeadOffsetLearning: _FastSegformerHeadOffsetLearning,
    }
    for module in list(model.modules()):
        fast = swaps.get(type(module))
        if fast is not None and _segformer_fusion_splits(cast(SegformerHead, module)):
            module.__class__ = fast


# --------------------------------------------------------------------------------------------
# GroupNorm on channels-last maps
# --------------------------------------------------------------------------------------------


class _CenteredGroupNorm(nn.GroupNorm):
    """GroupNorm that stays exact on channels-last input (`_group_norm_channels_last`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _layout(x) is not torch.channels_last:
            return super().forward(x)
        return _group_norm_channels_last(x, self, in_place=False)


# Rows per step of the squares in _group_norm_channels_last (OffSeg-T's head at 512x512: 2 MB).
_NORM_BAND_ROWS = 16


def _group_norm_channels_last(x: torch.Tensor, norm: nn.GroupNorm, in_place: bool) -> torch.Tensor:
    """`norm(x)` for a channels-last float map, to float32 rounding of the float64 result.

    PyTorch's channels-last GroupNorm kernel accumulates the group moments sequentially in
    float32: on the OffSeg head's 128x128 maps its outputs are 10x further from float64 than the
    contiguous kernel's (up to 3e-6 relative), and on a CamVid-trained OffSeg-T the head amplifies
    that to 3e-5 in the logits. Here the moments come from `torch.sum` (cascade summation) of the
    data centred by its group means, the per-group arithmetic runs in float64, and one multiply-add
    pass applies them. `in_place`: `x` is a temporary that may be overwritten (one map less).
    """
    n, c, h, w = x.shape
    g = norm.num_groups
    count = h * w * (c // g)
    rows = x.permute(0, 2, 3, 1)  # (N, H, W, C), a view of the channels-last map

    def group_sums(t: torch.Tensor) -> torch.Tensor:  # (N, H, W, C) -> (N, G, 1) in float64
        return t.sum(dim=(1, 2)).double().view(n, g, c // g).sum(dim=2, keepdim=True)

    def group_square_sums(t: torch.Tensor) -> torch.Tensor:  # group_sums(t.square()), by bands of rows
        bands = [group_sums(t[:, top : top + _NORM_BAND_ROWS].square()) for top in range(0, h, _NORM_BAND_ROWS)]
        return torch.stack(bands).sum(dim=0)

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # (N, G, 1) -> (N, 1, 1, C)
        return t.expand(n, g, c // g).reshape(n, 1, 1, c)

    means = group_sums(rows) / count
    centred = rows.sub_(per_channel(means).to(x.dtype)) if in_place else rows - per_channel(means).to(x.dtype)
    # The centring is exact up to the rounding of the means: take the small remainder into account.
    residual = group_sums(centred) / count
    variance = group_square_sums(centred) / count - residual.square()  # no squared copy of the map
    scale = per_channel(torch.rsqrt(variance + norm.eps))
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -per_channel(residual) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    scale, shift = scale.to(x.dtype), shift.to(x.dtype)
    out = torch.addcmul(shift, centred, scale, out=centred) if in_place else torch.addcmul(shift, centred, scale)
    return out.permute(0, 3, 1, 2)


class _FastGNConvModule(ConvModule):
    """conv -> GroupNorm [-> ReLU], the GroupNorm computed in the conv output's memory (it is a
    temporary): one map-sized tensor less at the head's widest layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_act(self.conv(x))

    def norm_act(self, x: torch.Tensor) -> torch.Tensor:
        """The GroupNorm and activation of the conv output `x` (overwritten)."""
        norm = cast(nn.GroupNorm, self.gn)
        if _layout(x) is torch.channels_last:
            x = _group_norm_channels_last(x, norm, in_place=not torch.jit.is_tracing())  # out= has no ONNX export
        else:
            x = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        if hasattr(self, "activate"):
            x = self.activate(x)
        return x


def _optimise_group_norms(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is ConvModule and module.norm_name == "gn" and type(module.gn) is nn.GroupNorm:
            module.__class__ = _FastGNConvModule
        elif type(module) is nn.GroupNorm:
            module.__class__ = _CenteredGroupNorm


# --------------------------------------------------------------------------------------------
# Offset Learning, regrouped
# --------------------------------------------------------------------------------------------


# Pixels per step of _FastOffsetLearning's masks (150 classes: 0.6 MB per temporary), and classes
# per step of its pooling (128x128 maps: 3 MB; smaller bands cost time, each reads all features).
_PIXEL_BAND = 1024
_CLASS_BAND = 50


def _pool_by_bands(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weights (B, K, H*W) times the pixels of x (B, C, H, W): (B, K, C), summed over H*W.

    As one matrix product the sum runs along the whole map (16 384 pixels at 512x512), and for few
    classes MKL's two-thread kernel on a channels-last map accumulates it far less exactly: 9e-7
    RMS from float64 for 11 classes, against 1.3e-7 on one thread. Up to 16 bands of rows, each
    its own product, then their sum: 6e-8 on any thread count and layout, as fast.
    """
    b, c, h, w = x.shape
    k = weights.shape[1]
    bands = max(d for d in range(1, 17) if h % d == 0)
    rows = (h // bands) * w
    pixels = x.reshape(b, c, bands, rows).permute(0, 2, 3, 1)  # (B, bands, rows, C), a view
    return torch.matmul(weights.view(b, k, bands, rows).transpose(1, 2), pixels).sum(dim=1)


class _FastOffsetLearning(OffsetLearning):
    """Offset Learning (both branches) with the feature-offset projection on the class side.

    With A = W E^T (K x HW), dW = P_c(softmax_HW(A) E), S = softmax_K(A):
        (E + S^T W P_f^T)(W + dW)^T = E (W + dW)^T + S^T [(W P_f^T)(W + dW)^T]
    where W P_f^T is weights-only (precomputed) and the bracket is only K x K.
    """

    projected_cls_repr: torch.Tensor

    def prepare(self) -> None:
        cls_repr = self.cls_repr.detach()[0]
        projected = (cls_repr.double() @ self.feat_offset_proj.weight.detach().double().T).to(cls_repr.dtype)
        self.register_buffer("projected_cls_repr", projected, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_exporting():  # whole-map operators: the bands below would be traced as copies (ScatterND)
            return self.forward_regrouped(x, self.projected_cls_repr)
        b, c, h, w = x.shape
        feats = x.reshape(b, c, h * w)  # (B, C, HW); a view when x is contiguous
        cls_repr = self.cls_repr.expand(b, -1, -1)  # (B, K, C)
        # A^T, (B, HW, K): the (K, HW) product of the same numbers made MKL keep per-thread buffers
        # (6.4 MB with 2 threads) for the rest of the process; this orientation does not.
        coupled_attn = _onednn_matmul(feats.transpose(1, 2), self.cls_repr[0])
        if coupled_attn is None:
            coupled_attn = torch.matmul(feats.transpose(1, 2), cls_repr.transpose(1, 2))
        # softmax_HW(A) E with the softmax's division applied to the (K, C) product (PyTorch's
        # softmax over the non-contiguous pixel axis sums 16k terms one by one: 3e-5 relative in
        # the logits; torch.sum cascades), a band of classes at a time: the weights of all classes
        # would be one more (HW, K) map.
        pooled = cls_repr.new_empty(b, self.num_classes, c)
        peaks = coupled_attn.amax(dim=1, keepdim=True)  # one pass for all classes: (B, 1, K)
        for start in range(0, self.num_classes, _CLASS_BAND):
            band = slice(start, start + _CLASS_BAND)
            weights = (coupled_attn[:, :, band] - peaks[:, :, band]).exp_()
            pooled[:, band] = _pool_by_bands(weights.transpose(1, 2), x) / weights.sum(dim=1).unsqueeze(2)
            del weights  # before the next band's are made
        aligned_repr = cls_repr + self.cls_offset_proj(pooled)
        class_mix = torch.matmul(self.projected_cls_repr, aligned_repr.transpose(1, 2))  # (B, K, K)
        # The masks, (B, HW, K) like A^T (the LayerNorm runs over the contiguous last axis), a band
        # of pixels at a time, each band written over the band of A^T it was computed from: the
        # class probabilities and the masks of all pixels at once would be two more (HW, K) maps.
        masks = coupled_attn
        for start in range(0, h * w, _PIXEL_BAND):
            band = slice(start, start + _PIXEL_BAND)
            scores = self._band_scores(feats[:, :, band].transpose(1, 2), aligned_repr, masks[:, band], class_mix)
            masks[:, band] = self.mask_norm(scores)
        return masks.transpose(1, 2).reshape(b, self.num_classes, h, w)

    @staticmethod
    def _band_scores(
        pixels: torch.Tensor, aligned_repr: torch.Tensor, attn: torch.Tensor, class_mix: torch.Tensor
    ) -> torch.Tensor:
        """pixels (B, n, C) @ aligned_repr^T + softmax_K(attn) @ class_mix, (B, n, K): by oneDNN
        image by image (the right-hand factors differ per image), else by torch.matmul."""
        probs = attn.softmax(dim=2)
        parts = []
        for i in range(pixels.shape[0]):
            part = _onednn_matmul(pixels[i : i + 1], aligned_repr[i])
            if part is None or _onednn_matmul(probs[i : i + 1], class_mix[i].T, out=part) is None:
                break
            parts.append(part)
        else:
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        return torch.matmul(pixels, aligned_repr.transpose(1, 2)).baddbmm_(probs, class_mix)


# Samples per step of the fast resampler's gathers (OffSeg-T's widest group: 0.9 MB per neighbour).
_SAMPLE_BAND = 4096


class _FastFreqFusion(freqfusion_module.FreqFusion):
    """FreqFusion whose resampled low-resolution feature is written over CARAFE's output, half a
    channel group of the sampler at a time (their samples are all taken before they replace them):
    the two maps of all channels at once would be the widest pair here (14 MB each in OffSeg-T's
    last fusion at 512x512 input). CARAFE's output is channels-last, so each sample's four
    neighbours are runs of channels: they are gathered and weighted as grid_sample weights them,
    the same values (grid_sample's CPU kernel writes NCHW; with the copy back it took 11.8-13.5 ms
    against 7.2-10.7 for OffSeg-T's three resamplings at 512x512 over five runs; a whole group at
    a time, holding twice the samples, 7.0 against 13.2 in an earlier run:
    benchmarks/bench_resampler.py).

    `fuse_interleaved` goes one step further for the OffSeg head, which interleaves the fusion's
    two outputs by channel groups: CARAFE and the resampler write into the low-resolution side of
    that interleaved map directly, so the upsampled feature never exists apart from it (at OffSeg-T's
    last fusion, it and the interleaved copy were the peak of a labels-only prediction)."""

    _interleaved = False  # set by fuse_interleaved for the length of its call

    def fuse_interleaved(self, hr_feat: torch.Tensor, lr_feat: torch.Tensor) -> torch.Tensor:
        """`interleave_groups(hr_out, lr_out, G)` of `self(hr_feat, lr_feat)[1:]`, channels-last, G
        the sampler's channel groups (the low-resolution side is written group by group)."""
        self._interleaved = True
        try:
            _, hr_out, fused = self(hr_feat, lr_feat)
        finally:
            self._interleaved = False
        n, ca, h, w = hr_out.shape
        groups = self.dysampler.groups
        sides = fused.permute(0, 2, 3, 1).view(n, h, w, groups, -1)
        sides[..., : ca // groups].copy_(hr_out.permute(0, 2, 3, 1).view(n, h, w, groups, ca // groups))
        return fused

    def upsample_lr(self, lr_feat: torch.Tensor, mask_lr: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        if is_exporting():
            return super().upsample_lr(lr_feat, mask_lr, offset)
        n, c, h, w = lr_feat.shape
        s = self.dysampler.scale
        groups = self.dysampler.groups
        if not self._interleaved:
            out = lr_feat.new_empty(n, s * h, s * w, groups, c // groups)
            lr_side = out
        else:  # the high-resolution side is filled by fuse_interleaved
            ca = self.hr_channel_compressor.in_channels
            out = lr_feat.new_empty(n, s * h, s * w, groups, (ca + c) // groups)
            lr_side = out[..., ca // groups :]
        carafe_upsample_into(lr_feat, mask_lr, self.lowpass_kernel, s, lr_side)
        self.resample_in_place(lr_side, offset)
        return out.view(n, s * h, s * w, -1).permute(0, 3, 1, 2)

    def resample_in_place(self, groups: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """`self.dysampler.sample` of the feature `groups` (N, H, W, G, C/G), the sampler's channel
        groups (channels-last, the groups possibly apart), written over it."""
        n, hs, ws, count, width = groups.shape
        coords = self.dysampler.coordinates(offset, groups)  # B, G, H, W, (x, y)
        pixels = groups.view(n * hs * ws, count, width)
        # The channels of a group are sampled independently: half a group at a time, the samples
        # held until they replace their channels are half a group's (OffSeg-T: 1.8 MB, not 3.7).
        half = (width + 1) // 2
        samples = groups.new_empty(n * hs * ws, half)
        band = min(n * hs * ws, _SAMPLE_BAND)
        taken = groups.new_empty(band, half)  # one neighbour of a band of samples
        neighbours_of_all = freqfusion_module.bilinear_border_neighbours(coords, hs, ws)  # each (B, G, H, W)
        for g in range(count):
            neighbours = [(index[:, g].reshape(-1), weight[:, g].reshape(-1, 1)) for index, weight in neighbours_of_all]
            for first in range(0, width, half):
                channels = pixels[:, g, first : first + half]
                part = samples[:, : channels.shape[1]]
                for start in range(0, n * hs * ws, band):
                    rows = slice(start, start + band)
                    target = part[rows]
                    for i, (index, weight) in enumerate(neighbours):
                        gathered = torch.index_select(
                            channels, 0, index[rows], out=taken[: target.shape[0], : target.shape[1]]
                        )
                        if i == 0:
                            torch.mul(gathered, weight[rows], out=target)
                        else:
                            target.addcmul_(gathered, weight[rows])
                channels.copy_(part)  # all of their samples taken: now they replace these channels
        return groups


def _interleave_channels_last(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """`interleave_groups` producing a channels-last result with a single copy."""
    n, ca, h, w = a.shape
    cb = b.shape[1]
    a = a.permute(0, 2, 3, 1).reshape(n, h, w, groups, ca // groups)
    b = b.permute(0, 2, 3, 1).reshape(n, h, w, groups, cb // groups)
    return torch.cat([a, b], dim=-1).view(n, h, w, ca + cb).permute(0, 3, 1, 2)


class _FastOffSegHead(_ImageByImageHead, OffSegHead):
    """OffSegHead whose interleaved concatenations stay channels-last when the model is, and that
    drops each map once it is used: the last ones are the widest maps of the network (16 MB each
    at 512x512 input), and the peak memory of a forward is reached here. A list of backbone
    features (what `Segmentor.forward_logits` hands over) is emptied as they are projected."""

    def fuse(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        backbone_feats = inputs if isinstance(inputs, list) else list(inputs)
        backbone_feats.reverse()
        feats = [pre(backbone_feats.pop()) for pre in self.pre]  # popped finest last
        fused = feats.pop()
        for freqfusion in self.freqfusions:
            if (
                isinstance(freqfusion, _FastFreqFusion)
                and freqfusion.dysampler.groups == INTERLEAVE_GROUPS
                and not is_exporting()
            ):
                fused = freqfusion.fuse_interleaved(feats.pop(), fused)
                continue
            hr_feat, fused = freqfusion(feats.pop(), fused)[1:]
            if _layout(hr_feat) is torch.channels_last:
                fused = _interleave_channels_last(hr_feat, fused, INTERLEAVE_GROUPS)
            else:
                fused = interleave_groups(hr_feat, fused)
            del hr_feat
        align = self.align
        if not isinstance(align, _FastGNConvModule):
            return align(fused)
        if _pointwise_conv_fits_over_input(align.conv, fused):
            return align.norm_act(_pointwise_conv_over_input(align.conv, fused))
        x = align.conv(fused)
        del fused  # before the GroupNorm allocates its output
        return align.norm_act(x)


# Rows per step of _pointwise_conv_over_input (OffSeg's align conv at 512x512: a 2 MB temporary).
_CONV_BAND_ROWS = 16


def _pointwise_conv_fits_over_input(conv: nn.Module, x: torch.Tensor) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
        and conv.out_channels <= conv.in_channels
        and x.is_contiguous(memory_format=torch.channels_last)
        and not is_exporting_or_compiling()
    )


def _pointwise_conv_over_input(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a 1x1 convolution with no more output than input channels, written over the
    channels-last `x` a band of rows at a time, so that the two maps never coexist (OffSeg-T's
    align conv at 512x512: 16 MB each, the peak of a labels-only prediction). Pixel p's output goes
    to elements [p*C_out, (p+1)*C_out) of x's memory, where all pixels up to p have been read."""
    n, _, h, w = x.shape
    c_out = conv.out_channels
    out = x.permute(0, 2, 3, 1).reshape(-1)[: n * h * w * c_out].view(n, h, w, c_out)
    for image in range(n):
        for top in range(0, h, _CONV_BAND_ROWS):
            band = conv(x[image : image + 1, :, top : top + _CONV_BAND_ROWS])
            out[image, top : top + band.shape[2]].copy_(band[0].permute(1, 2, 0))
    return out.permute(0, 3, 1, 2)


def _optimise_offset_learning(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is OffSegHead:
            module.__class__ = _FastOffSegHead
        if type(module) is freqfusion_module.FreqFusion:
            module.__class__ = _FastFreqFusion
        if type(module) is OffsetLearning and module.branches == "both":
            module.__class__ = _FastOffsetLearning
            cast(_FastOffsetLearning, module).prepare()


# --------------------------------------------------------------------------------------------
# The optimised model
# --------------------------------------------------------------------------------------------


class InferenceModel(nn.Module):
    """A frozen, inference-only model returned by `optimize_for_inference`. `model(x)` gives the
    same logits as the original model's forward; `size_divisor`, `num_classes` and `name` are
    carried over so that `offseg.inference` and `offseg.predict` accept it as they would the
    original."""

    def __init__(self, model: nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.size_divisor = getattr(model, "size_divisor", 1)
        self.name = getattr(model, "name", "")
        self._output = _ReusedOutput()

    @property
    def num_classes(self) -> int:
        return num_classes_of(self.model)

    def train(self, mode: bool = True) -> InferenceModel:
        if mode:
            raise RuntimeError("an inference-optimised model cannot be trained; train the original model")
        return super().train(False)

    # The input is used as it comes: the first convolution's channels-last weights make its output
    # channels-last (oneDNN reorders the input inside the call), and a channels-last copy of the
    # input made here would stay alive through the whole forward.

    def forward_logits(self, x: torch.Tensor):
        forward_logits = getattr(self.model, "forward_logits", None)
        if forward_logits is None:
            raise AttributeError(f"{type(self.model).__name__} has no forward_logits")
        with torch.inference_mode():
            return forward_logits(x)

    def forward(self, x: torch.Tensor):
        with torch.inference_mode():
            forward_logits = getattr(self.model, "forward_logits", None)
            if type(self.model).forward is not _segmentor_forward() or forward_logits is None:
                return self.model(x)
            # Segmentor.forward, with NCHW logits before the (large) final resize: the bilinear
            # kernel is several times slower on channels-last input.
            logits = forward_logits(x).contiguous()
            if is_exporting_or_compiling():
                return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
            shape = (*logits.shape[:2], *x.shape[-2:])
            out = self._output.empty(shape, logits)
            if out is None:
                out = logits.new_empty(shape)
            if upsample_bilinear_into(logits, out):
                return out
            return torch.ops.aten.upsample_bilinear2d.out(logits, list(x.shape[-2:]), False, None, None, out=out)


# Outputs at least this large are allocated in transparent huge pages and reused (below).
_HUGE_PAGE_MIN_BYTES = 16 << 20


class _ReusedOutput:
    """The buffer of the final, full-resolution logits, reused by the next call of the same size
    once nothing refers to it any more.

    A fresh tensor of 150 x 512 x 512 logits (157 MB) costs some 40 000 page faults, each mapping
    and zeroing a 4 KB page, on every call: about as long as the resize that fills it. Memory
    advised for transparent huge pages faults once per 2 MB (12-15 ms per 157 MB on this project's
    machine), but where free memory is handed back to a hypervisor (virtio-balloon free page
    reporting, as on many cloud VMs) a fresh huge page may have to be faulted in by the host as
    well: the fast path then took 350 ms instead of 175 one call in three (OffSeg-T, 512x512, 2
    threads, alternated with other work). A buffer already faulted in costs nothing, so the last
    one is kept: one output's worth of memory stays resident between calls, and a call whose
    previous output is still referenced (any tensor or array on its storage, checked by the
    buffer's reference count) gets a fresh one. Where THP is off the advice is a no-op; off Linux,
    or on other devices, `empty` returns None and the caller allocates as usual.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: mmap.mmap | None = None

    def __deepcopy__(self, memo: dict) -> _ReusedOutput:
        return _ReusedOutput()  # a copy of the model starts without a buffer of its own

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()
        self._buffer = None

    def empty(self, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor | None:
        """An uninitialised CPU float tensor of `shape` (dtype of `like`) in the kept buffer, or None."""
        numel = math.prod(int(d) for d in shape)
        nbytes = numel * like.element_size()
        if like.device.type != "cpu" or nbytes < _HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
            return None
        with self._lock:  # two threads must not both find the buffer free
            # References: the attribute and getrefcount's argument; a tensor on it holds one more.
            reusable = self._buffer is not None and len(self._buffer) == nbytes and sys.getrefcount(self._buffer) == 2
            if not reusable:
                try:
                    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                    buffer.madvise(mmap.MADV_HUGEPAGE)
                except (OSError, ValueError, AttributeError):
                    return None
                self._buffer = buffer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # frombuffer warns about non-writable buffers; this one is writable
                return torch.frombuffer(self._buffer, dtype=like.dtype, count=numel).view(*shape)


def _segmentor_forward():
    from .models.segmentor import Segmentor

    return Segmentor.forward


def optimize_for_inference(
    model: nn.Module, size: Sequence[int] | int | None = None, *, channels_last: bool = True
) -> InferenceModel:
    """A frozen eval-mode copy of `model`, rewritten for fast CPU inference (see module docs).

    `size` (H, W) is the input size you will use most: the size-dependent caches (attention
    biases) are filled for it now, and for other sizes on their first call. `model` itself is not
    modified. At the attention tables' own grid (512x512 input for OffSeg) the biases are gathered
    on every call; at other sizes they are bicubic-resized once and kept, which for OffSeg-T costs
    12 MB at 480x480 and 256 MB at 1024x1024; resizing them on every call, as the official code
    does, would add 13-15 and 285-320 ms to each forward, 22-26x its FLOP limit
    (benchmarks/bench_attention_bias_cache.py). That
    cache is why the fast path's peak memory at 1024x1024 is 1.47x the reference's
    (docs/benchmarks.md).

    The returned model computes the same function as `model.eval()`, in float32 with other
    summation orders. With random weights its logits are within 1e-5 (max relative; SegNeXt 5e-5)
    of the eager model's. A trained model amplifies float32 round-off, so there no float32
    computation is that close: on a CamVid-trained OffSeg-T the eager model itself is 6e-5 to
    2.9e-4 from float64, the fast path up to 4e-4 from eager. What it is held to is the eager
    model's own exactness: over a few pictures, at most 1.5x its RMS and 2x its max distance from
    float64 (tests/test_optimize.py, test_fast_path_on_a_trained_offseg_t).
    """
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        fold_batch_norms(fast)
        for module in list(fast.modules()):
            if isinstance(module, effv2.EfficientFormerV2):
                _optimise_efficientformer_v2(module)
        _optimise_offset_learning(fast)
        _optimise_segformer_heads(fast)
        _run_batches_image_by_image(fast)
        _fuse_conv_activations(fast)
        _route_pointwise_convs_to_onednn(fast)
    if channels_last:
        _optimise_group_norms(fast)
        # torch's overloads of Module.to omit memory_format, which Module.to accepts and documents
        fast = fast.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    wrapped = InferenceModel(fast, channels_last).eval()
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        param = next(fast.parameters())
        # Fill the caches without moving the global RNG (SegNeXt draws its NMF bases from it).
        devices = [param.device.index or 0] if param.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            wrapped(torch.zeros(1, 3, h, w, dtype=param.dtype, device=param.device))
    return wrapped


_FAST_COPIES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, InferenceModel]] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    # Storage and in-place version of every tensor: changes with training steps, load_state_dict
    # and moves between devices.
    return tuple((t.data_ptr(), t._version, str(t.device)) for t in list(model.parameters()) + list(model.buffers()))


def fast_model_for(model: nn.Module) -> nn.Module:
    """The inference-optimised copy of `model` (`optimize_for_inference`), built on first use and
    reused while `model`'s weights stay the same; an `InferenceModel` is returned as is. Used by
    `offseg.predict`, which is called once per image."""
    if isinstance(model, InferenceModel):
        return model
    key = _fingerprint(model)
    cached = _FAST_COPIES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    fast = optimize_for_inference(model)
    _FAST_COPIES[model] = (key, fast)
    return fast


# --------------------------------------------------------------------------------------------
# The reference computation (for benchmarks and tests)
# --------------------------------------------------------------------------------------------


def _position_bias_reference(self: effv2.AttentionBias, num_queries: int, num_keys: int) -> torch.Tensor:
    # As the official attention: gather the table, then always resize it bicubically (also to
    # the size it already has).
    bias = self.attention_biases_seg[:, self.attention_bias_idxs_seg].unsqueeze(0)
    return F.interpolate(bias, size=(num_queries, num_keys), mode="bicubic", align_corners=False)


@contextlib.contextmanager
def reference_computation() -> Iterator[None]:
    """Within this block, models compute as the official implementation does: the local cosine
    similarity by a dilated unfold and F.cosine_similarity, FreqFusion's kernel normaliser with
    its permutes and copies and its two identity resizes, EfficientFormerV2 attention biases
    gathered and bicubically resized on every call, talking heads as 1x1 convs, BN -> GELU -> conv
    storing every intermediate for the backward, Offset Learning's feature offsets formed for every
    pixel.

    CARAFE is the one exception: the official op is a fused compiled kernel (mmcv), so here it is
    the library's plain tap loop (`carafe_taps`, no k*k unfold), not `carafe_reference`, whose full-resolution
    unfold would make the baseline about twice as slow as the official code. Same function as the
    default computation; the reference row of `offseg.benchmark` and the tests use it. Frozen: do
    not change what it computes. Not thread-safe (it swaps module attributes)."""
    saved = [
        (freqfusion_module, "carafe", carafe_taps),
        (freqfusion_module, "local_cosine_similarity", freqfusion_module.local_cosine_similarity_reference),
        (freqfusion_module, "normalize_kernels", freqfusion_module.normalize_kernels_reference),
        (freqfusion_module.FreqFusion, "forward", freqfusion_module.FreqFusion.forward_reference),
        (effv2, "batch_norm_gelu", effv2.batch_norm_gelu_reference),
        (effv2.AttentionBias, "position_bias", _position_bias_reference),
        (effv2.Attention4D, "forward", effv2.Attention4D.forward_reference),
        (effv2.Attention4DDownsample, "forward", effv2.Attention4DDownsample.forward_reference),
        (OffsetLearning, "forward", OffsetLearning.forward_reference),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in saved]
    try:
        for owner, name, replacement in saved:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
