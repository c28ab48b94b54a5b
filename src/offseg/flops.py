"""FLOP counting for segmentation models, in the conventions of the OffSeg paper and of fvcore.

One multiply-add counts as one FLOP. What is counted is the decode-head output without the final
resize (`model.forward_logits(x)` for a `Segmentor`), batch 1 unless asked otherwise.

Conventions (`count_flops(..., convention=...)`):

- ``"paper"``: 2-D convolutions only, each k_h*k_w*(C_in/groups)*C_out multiply-adds per output
  element plus one add per output element when it has a bias. This is the mmcv-1.x Conv2d hook,
  and it reproduces the paper's OffSeg figures (5.33 / 10.29 / 17.13 G at 512x512).
- ``"fvcore"``: what fvcore's `FlopCountAnalysis` counts with its default handles: convolutions
  (without bias), matmul / mm / bmm / addmm / linear / einsum, batch / group / layer / instance
  norms, nearest and bilinear upsampling, grid sampling and adaptive average pooling, each with
  fvcore's formula. Everything else (activations, element-wise arithmetic, softmax, pooling,
  bicubic resizes, CARAFE, ...) is left out, as fvcore leaves it out.
- ``"full"``: fvcore plus what fvcore cannot see: CARAFE as k*k multiply-adds per output element,
  bicubic resizes (16 per output element; EfficientFormerV2's attention-bias resize, counted even
  where our code skips it because it is the identity), and the masked attention products that
  `nn.MultiheadAttention` computes with `baddbmm`. The plug-in "+OL" rows of the paper match this.

How: a `TorchFunctionMode` sees every call at the level of the PyTorch Python API (`F.conv2d`,
`F.linear`, `torch.matmul` / `@`, `torch.einsum`, `F.interpolate`, ...), which is the level at
which fvcore's jit trace names its operators; forward hooks keep the name of the running module
for the per-module totals. The forward runs on the meta device when it can (no arithmetic, so a
1024x2048 count takes well under a second), else for real on the CPU under `no_grad`.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

CONVENTIONS = ("paper", "fvcore", "full")

# Operators fvcore counts with its default handles (named as fvcore names them).
FVCORE_OPERATORS = frozenset(
    {
        "conv",
        "linear",
        "matmul",
        "mm",
        "bmm",
        "addmm",
        "einsum",
        "batch_norm",
        "group_norm",
        "layer_norm",
        "instance_norm",
        "upsample_nearest2d",
        "upsample_bilinear2d",
        "adaptive_avg_pool2d",
        "grid_sampler",
    }
)
# Counted on top of fvcore by the "full" convention.
EXTRA_FULL_OPERATORS = frozenset({"carafe", "upsample_bicubic2d", "baddbmm"})

# Calls that move, reshape, create or inspect tensors: not reported as "uncounted".
_NOT_COMPUTE = frozenset(
    {
        "__get__",
        "__getitem__",
        "__setitem__",
        "__len__",
        "__iter__",
        "__format__",
        "__repr__",
        "__hash__",
        "size",
        "dim",
        "ndim",
        "numel",
        "shape",
        "stride",
        "is_contiguous",
        "contiguous",
        "storage_offset",
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "permute",
        "transpose",
        "t",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "expand",
        "expand_as",
        "split",
        "chunk",
        "unbind",
        "narrow",
        "select",
        "movedim",
        "cat",
        "stack",
        "to",
        "type",
        "float",
        "double",
        "half",
        "detach",
        "clone",
        "copy_",
        "empty",
        "empty_like",
        "zeros",
        "zeros_like",
        "ones",
        "ones_like",
        "full",
        "tensor",
        "arange",
        "linspace",
        "new_empty",
        "new_zeros",
        "new_ones",
        "new_full",
        "new_tensor",
        "repeat",
        "_set_grad_enabled",
        "requires_grad_",
        "is_floating_point",
        "element_size",
        "get_device",
        "item",
        "tolist",
        "dtype",
        "device",
        "split_with_sizes",
        "as_strided",
        "data_ptr",
        "is_complex",
        "roll",
        "flip",
        "pad",
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",  # identities in eval mode
    }
)


# --------------------------------------------------------------------------------------------
# Per-operator formulas. Each returns (operator name, FLOPs) pairs; conv also its paper count.
# --------------------------------------------------------------------------------------------


def _prod(values: Iterable[int]) -> int:
    return math.prod(int(v) for v in values)


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _matmul_flops(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """Multiply-adds of torch.matmul with broadcasting (1-D operands promoted as matmul does).

    fvcore's handle takes prod(a.shape) * b.shape[-1], which is the same unless `a` is broadcast
    over a larger batch of `b`; this counts the broadcast batch.
    """
    a = (1, *a_shape) if len(a_shape) == 1 else tuple(a_shape)
    b = (*b_shape, 1) if len(b_shape) == 1 else tuple(b_shape)
    batch = torch.broadcast_shapes(a[:-2], b[:-2])
    return _prod(batch) * a[-2] * a[-1] * b[-1]


def _einsum_flops(equation: str, shapes: list[tuple[int, ...]]) -> int:
    """Multiply-adds of an einsum: the product of all index sizes for a two-operand contraction
    (half of it without a summed index), as fvcore's numpy-based count gives before it rounds to
    four significant digits; more operands go through numpy's optimal contraction path."""
    equation = equation.replace(" ", "")
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if "..." in equation:
        unused = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in equation)
        ell_ndim = max(len(s) - len(t.replace("...", "")) for t, s in zip(terms, shapes, strict=True) if "..." in t)
        ell = "".join(next(unused) for _ in range(ell_ndim))
        terms = [
            t.replace("...", ell[ell_ndim - (len(s) - len(t.replace("...", ""))) :])
            for t, s in zip(terms, shapes, strict=True)
        ]
        output = output.replace("...", ell)
    if "->" not in equation:  # implicit output: the indices that appear once, sorted
        letters = Counter("".join(terms))
        output = "".join(sorted(c for c, n in letters.items() if n == 1))
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        for letter, size in zip(term, shape, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    if len(terms) <= 2:
        summed = any(c not in output for c in sizes)
        total = _prod(sizes.values())
        return total if summed else total // 2
    import numpy as np  # only for einsums of three or more operands

    operands = [np.broadcast_to(np.zeros(1), s) for s in shapes]
    report = np.einsum_path(",".join(terms) + "->" + output, *operands, optimize="optimal")[1]
    for line in report.splitlines():
        if "optimized flop" in line.lower():
            return int(float(line.split(":")[-1]) // 2)
    raise NotImplementedError(f"cannot count einsum {equation!r}")


def _conv(args: tuple, kwargs: dict, out: torch.Tensor, transposed: bool) -> list[tuple[str, int, int]]:
    x, weight, bias = args[0], args[1], _arg(args, kwargs, 2, "bias")
    batch = x.shape[0] if x.dim() == weight.dim() else 1
    spatial = (x.shape if transposed else out.shape)[-(weight.dim() - 2) :]
    flops = batch * _prod(weight.shape) * _prod(spatial)  # fvcore: no bias
    paper = 0
    if weight.dim() == 4 and not transposed:  # the paper counts nn.Conv2d only
        c_out = out.shape[-3]
        paper = batch * _prod(out.shape[-2:]) * (_prod(weight.shape) + (c_out if bias is not None else 0))
    return [("conv", flops, paper)]


def _linear(args, kwargs, out):
    x, weight = args[0], _arg(args, kwargs, 1, "weight")
    return [("linear", x.numel() * weight.shape[0], 0)]


def _matmul(args, kwargs, out):
    return [("matmul", _matmul_flops(tuple(args[0].shape), tuple(args[1].shape)), 0)]


def _rmatmul(args, kwargs, out):  # Tensor.__rmatmul__(self, other) is other @ self
    return [("matmul", _matmul_flops(tuple(args[1].shape), tuple(args[0].shape)), 0)]


def _mm(args, kwargs, out):
    a, b = args[0], _arg(args, kwargs, 1, "mat2")
    return [("mm", a.shape[0] * a.shape[1] * b.shape[1], 0)]


def _bmm(args, kwargs, out):
    a, b = args[0], _arg(args, kwargs, 1, "mat2")
    return [("bmm", a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], 0)]


def _addmm(args, kwargs, out):
    a, b = _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2")
    return [("addmm", a.shape[0] * a.shape[1] * b.shape[1], 0)]


def _baddbmm(args, kwargs, out):
    a, b = _arg(args, kwargs, 1, "batch1"), _arg(args, kwargs, 2, "batch2")
    return [("baddbmm", a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], 0)]


def _einsum(args, kwargs, out):
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    return [("einsum", _einsum_flops(equation, [tuple(t.shape) for t in operands]), 0)]


def _norm(name: str, weight_index: int, weight_name: str) -> Callable:
    def count(args, kwargs, out):
        has_affine = _arg(args, kwargs, weight_index, weight_name) is not None
        return [(name, args[0].numel() * (5 if has_affine else 4), 0)]

    return count


def _batch_norm(args, kwargs, out):
    # F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)
    training = _arg(args, kwargs, 5, "training", False)
    has_affine = _arg(args, kwargs, 3, "weight") is not None
    if training:
        return [("batch_norm", args[0].numel() * (5 if has_affine else 4), 0)]
    return [("batch_norm", args[0].numel() * (2 if has_affine else 1), 0)]


# FLOPs per output element of each resize mode; modes fvcore counts are named as fvcore names them.
_RESIZE_COST = {"nearest": 1, "bilinear": 4, "bicubic": 16}


def _interpolate(args, kwargs, out):
    mode = _arg(args, kwargs, 3, "mode", "nearest")
    if mode in _RESIZE_COST and out.dim() == 4:
        return [(f"upsample_{mode}2d", _RESIZE_COST[mode] * out.numel(), 0)]
    return []


def _grid_sample(args, kwargs, out):
    return [("grid_sampler", 4 * out.numel(), 0)]  # fvcore assumes bilinear


def _adaptive_avg_pool2d(args, kwargs, out):
    return [("adaptive_avg_pool2d", args[0].numel(), 0)]


def _sdpa(args, kwargs, out):
    """scaled_dot_product_attention as the two batched products of the unfused attention (the
    first is a `baddbmm` when there is a mask, as in nn.MultiheadAttention's own path)."""
    q, k, v = args[0], args[1], args[2]
    attn_mask = _arg(args, kwargs, 3, "attn_mask")
    batch = _prod(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]))
    length, source = q.shape[-2], k.shape[-2]
    return [
        ("baddbmm" if attn_mask is not None else "bmm", batch * length * source * q.shape[-1], 0),
        ("bmm", batch * length * source * v.shape[-1], 0),
    ]


def _multi_head_attention(args, kwargs, out):
    """F.multi_head_attention_forward, which the mode sees as one call: its in/out projections
    (`linear`) and the two attention products, as its reference (non-fused) path computes them."""
    query, key, value = args[0], args[1], args[2]
    embed_dim = _arg(args, kwargs, 3, "embed_dim_to_check")
    bias_k = _arg(args, kwargs, 7, "bias_k")
    add_zero_attn = _arg(args, kwargs, 9, "add_zero_attn", False)
    key_padding_mask = _arg(args, kwargs, 14, "key_padding_mask")
    attn_mask = _arg(args, kwargs, 16, "attn_mask")
    batch = query.shape[1] if query.dim() == 3 else 1
    length, source = query.shape[0], key.shape[0]
    source += (bias_k is not None) + bool(add_zero_attn)
    masked = attn_mask is not None or key_padding_mask is not None
    return [
        ("linear", (query.numel() + key.numel() + value.numel()) * embed_dim, 0),
        ("baddbmm" if masked else "bmm", batch * length * source * embed_dim, 0),
        ("bmm", batch * length * source * embed_dim, 0),
        ("linear", batch * length * embed_dim * embed_dim, 0),
    ]


def _handlers() -> dict[Any, Callable]:
    table: dict[Any, Callable] = {}

    def add(funcs: Iterable[Any], handler: Callable) -> None:
        for f in funcs:
            if f is not None:
                table[f] = handler

    T = torch.Tensor
    add([F.conv1d, F.conv2d, F.conv3d], lambda a, k, o: _conv(a, k, o, transposed=False))
    add([F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d], lambda a, k, o: _conv(a, k, o, transposed=True))
    add([F.linear], _linear)
    add([torch.matmul, T.matmul, T.__matmul__], _matmul)
    add([T.__rmatmul__], _rmatmul)
    add([torch.mm, T.mm], _mm)
    add([torch.bmm, T.bmm], _bmm)
    add([torch.addmm, T.addmm], _addmm)
    add([torch.baddbmm, T.baddbmm], _baddbmm)
    add([torch.einsum, torch.functional.einsum], _einsum)
    add([F.batch_norm], _batch_norm)
    add([F.group_norm, torch.group_norm], _norm("group_norm", 2, "weight"))
    add([F.layer_norm, torch.layer_norm], _norm("layer_norm", 2, "weight"))
    add([F.instance_norm], _norm("instance_norm", 3, "weight"))
    add([F.interpolate], _interpolate)
    add([F.grid_sample], _grid_sample)
    add([F.adaptive_avg_pool2d], _adaptive_avg_pool2d)
    add([F.scaled_dot_product_attention], _sdpa)
    add([F.multi_head_attention_forward], _multi_head_attention)
    return table


_HANDLERS = _handlers()


def _function_scopes() -> dict[Any, str]:
    """Code objects of functions whose counted ops are reported as one operator of their own.

    Our CARAFE is an unfold plus an einsum; the official op is opaque to fvcore, so the "full"
    convention reports it as `carafe` (its einsum is exactly k*k multiply-adds per output element).
    """
    scopes: dict[Any, str] = {}
    try:
        from .models.layers.carafe import carafe

        scopes[carafe.__code__] = "carafe"
    except ImportError:
        pass
    return scopes


# The corrections below get an instance of the class their table entry names (imported lazily,
# hence `Any`).
def _bias_resize(module: Any, inputs: tuple, events: list[FlopEvent]) -> list[tuple[str, int]]:
    # The official EfficientFormerV2 attention always resizes its bias table bicubically to the
    # token counts; ours skips the resize when the table already has that size (512x512).
    if any(e.operator == "upsample_bicubic2d" for e in events):
        return []
    heads = module.attention_biases_seg.shape[0]
    return [("upsample_bicubic2d", 16 * heads * _prod(module.attention_bias_idxs_seg.shape))]


def _freqfusion_kernel_resize(module: Any, inputs: tuple, events: list[FlopEvent]) -> list[tuple[str, int]]:
    # The official FreqFusion resizes its two CARAFE-upsampled kernel maps (k_l^2 and k_h^2
    # channels) with a nearest F.interpolate to the size they already have.
    hr_feat = inputs[0]
    channels = module.content_encoder.out_channels + module.content_encoder2.out_channels
    return [("upsample_nearest2d", hr_feat.shape[0] * channels * _prod(hr_feat.shape[-2:]))]


def _same_size_level_resize(module: Any, inputs: tuple, events: list[FlopEvent]) -> list[tuple[str, int]]:
    # MMSegmentation's heads resize every projected level bilinearly to the common size, also
    # the level that already has it (an identity our heads skip).
    feats = inputs[0]
    size = feats[0].shape[-2:]
    skipped = sum(1 for x in feats if x.shape[-2:] == size)
    return [("upsample_bilinear2d", 4 * feats[0].shape[0] * module.channels * _prod(size) * skipped)]


def _ham_same_size_level_resize(module: Any, inputs: tuple, events: list[FlopEvent]) -> list[tuple[str, int]]:
    # MMSegmentation's LightHam head resizes each selected level bilinearly to the first selected
    # level's size, that level included (an identity our head skips); 4 FLOPs per output element.
    feats = [inputs[0][i] for i in module.in_index]
    size = feats[0].shape[-2:]
    skipped = sum(_prod(x.shape[:2]) for x in feats if x.shape[-2:] == size)
    return [("upsample_bilinear2d", 4 * skipped * _prod(size))]


# Operations the official code runs but ours skips because they are identities there. fvcore
# counted them in the reference figures, so they are counted as if they ran:
# (module, class) -> function(module, forward inputs, events recorded during its forward).
SKIPPED_IDENTITY_OPS: dict[tuple[str, str], Callable] = {
    ("offseg.models.backbones.efficientformer_v2", "AttentionBias"): _bias_resize,
    ("offseg.models.layers.freqfusion", "FreqFusion"): _freqfusion_kernel_resize,
    ("offseg.models.heads.segformer_head", "SegformerHead"): _same_size_level_resize,
    ("offseg.models.heads.ham_head", "LightHamHead"): _ham_same_size_level_resize,
}


def _skipped_identity_ops() -> list[tuple[type, Callable]]:
    table = []
    for (module_name, class_name), count in SKIPPED_IDENTITY_OPS.items():
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        table.append((cls, count))
    return table


# --------------------------------------------------------------------------------------------
# The counter
# --------------------------------------------------------------------------------------------


@dataclass
class FlopEvent:
    module: str  # dotted name of the innermost running module ("" = the model itself)
    operator: str
    flops: int  # fvcore-style count (conv without bias)
    paper_flops: int = 0  # conv2d with bias adds (paper convention); 0 for other operators


@dataclass
class FlopReport:
    """FLOP counts of one forward in one convention. All counts in FLOPs (1 multiply-add = 1)."""

    convention: str
    input_shape: tuple[int, ...]
    total: int
    by_operator: dict[str, int]
    by_module: dict[str, int]  # cumulative over submodules; "" is the whole model
    by_module_operator: dict[str, dict[str, int]]  # cumulative, per operator
    uncounted: dict[str, int] = field(default_factory=dict)  # calls seen but not counted

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    def by_operator_g(self) -> dict[str, float]:
        return {k: v / 1e9 for k, v in self.by_operator.items()}

    def format(self, depth: int = 1) -> str:
        """A short text table: total, per operator, per module down to `depth` dots."""
        lines = [f"{self.convention} convention, input {tuple(self.input_shape)}: {self.gflops:.4f} GFLOPs"]
        for op, v in sorted(self.by_operator.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {op:<22} {v / 1e9:10.4f} G")
        mods = [(m, v) for m, v in self.by_module.items() if m and m.count(".") < depth]
        if mods:
            lines.append("  by module:")
            lines += [f"    {m:<30} {v / 1e9:10.4f} G" for m, v in mods]
        return "\n".join(lines)


@dataclass
class FlopTrace:
    """Everything recorded during one counted forward; `report(convention)` sums it up."""

    input_shape: tuple[int, ...]
    events: list[FlopEvent]
    uncounted: dict[str, int]
    used_parameters: set[str]  # names of parameters that took part in the forward
    device: str  # where the forward ran: "meta", or the model's device ("cpu", ...)

    def report(self, convention: str = "paper") -> FlopReport:
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown FLOP convention {convention!r}; choose from {', '.join(CONVENTIONS)}")
        by_operator: Counter = Counter()
        by_module: Counter = Counter()
        by_module_operator: dict[str, Counter] = defaultdict(Counter)
        for ev in self.events:
            if convention == "paper":
                flops = ev.paper_flops
            elif convention == "fvcore":
                flops = ev.flops if ev.operator in FVCORE_OPERATORS else 0
            else:
                flops = ev.flops
            if not flops:
                continue
            by_operator[ev.operator] += flops
            parts = ev.module.split(".") if ev.module else []
            for i in range(len(parts) + 1):
                prefix = ".".join(parts[:i])
                by_module[prefix] += flops
                by_module_operator[prefix][ev.operator] += flops
        uncounted = dict(self.uncounted)
        if convention == "paper":
            uncounted = {}  # everything but conv2d is left out by definition
        elif convention == "fvcore":
            for ev in self.events:
                if ev.operator not in FVCORE_OPERATORS:
                    uncounted[ev.operator] = uncounted.get(ev.operator, 0) + 1
        return FlopReport(
            convention=convention,
            input_shape=self.input_shape,
            total=sum(by_operator.values()),
            by_operator=dict(by_operator),
            by_module={"": by_module.get("", 0), **{k: v for k, v in by_module.items() if k}},
            by_module_operator={k: dict(v) for k, v in by_module_operator.items()},
            uncounted=uncounted,
        )


class _CountingMode(TorchFunctionMode):
    """Records one FlopEvent per counted call, attributed to the running module."""

    def __init__(self, parameter_names: dict[int, str]) -> None:
        super().__init__()
        self.events: list[FlopEvent] = []
        self.uncounted: Counter = Counter()
        self.module_stack: list[str] = [""]
        self.parameter_names = parameter_names  # id(tensor) -> parameter name
        self.used_parameters: set[str] = set()
        self.scopes = _function_scopes()

    def _scope(self) -> str | None:
        frame: FrameType | None = sys._getframe(2)
        while frame is not None:
            name = self.scopes.get(frame.f_code)
            if name is not None:
                return name
            frame = frame.f_back
        return None

    def record(self, operator: str, flops: int, paper_flops: int = 0) -> None:
        self.events.append(FlopEvent(self.module_stack[-1], operator, int(flops), int(paper_flops)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.parameter_names:
            for leaf in tree_flatten((args, kwargs))[0]:
                name = self.parameter_names.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                if name is not None:
                    self.used_parameters.add(name)
        out = func(*args, **kwargs)
        handler = _HANDLERS.get(func)
        if handler is None:
            name = getattr(func, "__name__", None) or str(func)
            if name not in _NOT_COMPUTE:
                self.uncounted[name] += 1
            return out
        first_out = out[0] if isinstance(out, (tuple, list)) else out
        counts = handler(args, kwargs, first_out)
        scope = self._scope() if self.scopes and counts else None
        for operator, flops, paper in counts:
            self.record(scope or operator, flops, paper)
        if not counts:
            self.uncounted[getattr(func, "__name__", str(func))] += 1
        return out


def _forward_fn(model: nn.Module) -> Callable[[torch.Tensor], Any]:
    forward_logits = getattr(model, "forward_logits", None)
    return forward_logits if callable(forward_logits) else model


class _Forward(nn.Module):
    """Holds the model so that `torch.func.functional_call` can swap its tensors for one call
    of its `forward_logits` (or forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return _forward_fn(self.model)(x)


def _set_eval(model: nn.Module) -> Callable[[], None]:
    """Put `model` in eval mode; returns a function restoring the previous train/eval flags."""
    flags = {m: m.training for m in model.modules()}
    model.eval()

    def restore() -> None:
        if all(flags.values()):
            model.train()
        else:
            for m, flag in flags.items():
                m.training = flag

    return restore


def _run_counted(model: nn.Module, x: torch.Tensor, replacements: dict[str, torch.Tensor] | None) -> _CountingMode:
    names = {m: n for n, m in model.named_modules()}
    if replacements is None:
        param_names = {id(p): n for n, p in model.named_parameters()}
    else:
        param_names = {id(replacements[n]): n for n, _ in model.named_parameters()}
    mode = _CountingMode(param_names)
    identity_ops = _skipped_identity_ops()
    starts: list[int] = []  # index of the first event of each running module

    def pre_hook(module: nn.Module, inputs: Any) -> None:
        mode.module_stack.append(names[module])
        starts.append(len(mode.events))

    def post_hook(module: nn.Module, inputs: Any, output: Any) -> None:
        start = starts.pop()
        for cls, count in identity_ops:
            if isinstance(module, cls):
                for operator, flops in count(module, inputs, mode.events[start:]):
                    mode.record(operator, flops)
        mode.module_stack.pop()

    handles = []
    for module in names:
        if module is model:
            continue
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook, always_call=True))
    forward = _forward_fn(model)
    from .models.layers.offset_learning import official_offset_learning

    try:
        # Offset Learning counted as the official module computes it (the figures' convention),
        # not as the regrouped score product the library runs (same function, fewer multiply-adds).
        with torch.no_grad(), torch.random.fork_rng(devices=[]), official_offset_learning():
            if replacements is None:
                with mode:
                    forward(x)
            else:
                # Swap in meta parameters and buffers without touching the model's own tensors.
                wrapper = _Forward(model)
                swapped = {f"model.{n}": t for n, t in replacements.items()}
                with mode:
                    torch.func.functional_call(wrapper, swapped, (x,), strict=False, tie_weights=True)
    finally:
        for h in handles:
            h.remove()
    return mode


def trace_flops(
    model: nn.Module,
    input_size: int | tuple[int, int] = (512, 512),
    batch: int = 1,
    device: str = "auto",
    in_channels: int = 3,
) -> FlopTrace:
    """Run one counted forward of `model` (its `forward_logits` if it has one) in eval mode.

    device: "meta" (shapes only, fast), "cpu" (a real forward on random input under no_grad, on
    the model's own device), or "auto": meta, falling back to a real forward when the model
    cannot run on meta (data-dependent shapes, `.item()`, tensors cached outside parameters). The
    model is left as it was (weights, train/eval flags, global RNG state).
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    shape = (batch, in_channels, int(h), int(w))
    if device not in ("auto", "meta", "cpu"):
        raise ValueError(f"device must be 'auto', 'meta' or 'cpu', got {device!r}")
    restore = _set_eval(model)
    try:
        mode = None
        used = "meta"
        if device in ("auto", "meta"):
            try:
                tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
                tensors.update(model.named_buffers(remove_duplicate=False))
                meta = {n: torch.empty_like(t, device="meta") for n, t in tensors.items()}
                mode = _run_counted(model, torch.empty(shape, device="meta"), meta)
            except Exception:
                if device == "meta":
                    raise
                mode = None
        if mode is None:
            param = next(model.parameters(), None)
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            if param is not None:
                x = x.to(param.device, param.dtype)
            used = x.device.type
            mode = _run_counted(model, x, None)
    finally:
        restore()
    return FlopTrace(shape, mode.events, dict(mode.uncounted), mode.used_parameters, used)


def count_flops(
    model: nn.Module,
    input_size: int | tuple[int, int] = (512, 512),
    batch: int = 1,
    convention: str = "paper",
    device: str = "auto",
    in_channels: int = 3,
) -> FlopReport:
    """FLOPs of one forward of `model` on a (batch, in_channels, H, W) input, `input_size` = (H, W),
    in `convention` ("paper", "fvcore" or "full"; see the module docstring). `report.gflops` is
    the total in GFLOPs; `report.by_operator` / `report.by_module` break it down."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOP convention {convention!r}; choose from {', '.join(CONVENTIONS)}")
    return trace_flops(model, input_size, batch, device, in_channels).report(convention)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters())


def unused_parameters(model: nn.Module, input_size: int | tuple[int, int] = (64, 64)) -> list[str]:
    """Names of parameters that take no part in the forward (e.g. the `conv_seg` the
    Offset-Learning heads build but never call), found by tracing one forward."""
    used = trace_flops(model, input_size).used_parameters
    return [n for n, _ in model.named_parameters() if n not in used]


# --------------------------------------------------------------------------------------------
# Model card: parameters, FLOPs in every convention, CPU latency, the paper's figures
# --------------------------------------------------------------------------------------------


def _plug_in(params: tuple[float, float], gflops: tuple[float, float], miou: tuple[float, float]) -> tuple[dict, dict]:
    """Paper figures of a per-pixel model and its Offset-Learning form (SPEC §2 plug-in table)."""
    base = dict(
        params_M=params[0],
        gflops_ade20k=gflops[0],
        miou_ade20k=miou[0],
        flops_convention="full",
        note="per-pixel figures quoted from the original paper",
    )
    ol = dict(params_M=params[1], gflops_ade20k=gflops[1], miou_ade20k=miou[1], flops_convention="full")
    return base, ol


# The paper's figures (SPEC §2). FLOPs: ADE20K at 512x512 (150 classes), Cityscapes at 1024x2048
# (19 classes); "flops_convention" says which of our counts they correspond to.
PAPER_FIGURES: dict[str, dict] = {
    "offseg-t": dict(
        params_M=6.2,
        gflops_ade20k=5.3,
        gflops_cityscapes=44.8,
        miou_ade20k=44.2,
        miou_cityscapes=78.9,
        miou_coco_stuff=41.9,
        flops_convention="paper",
    ),
    "offseg-b": dict(
        params_M=13.0,
        gflops_ade20k=10.3,
        gflops_cityscapes=86.5,
        miou_ade20k=45.9,
        miou_cityscapes=80.5,
        miou_coco_stuff=44.3,
        flops_convention="paper",
    ),
    "offseg-l": dict(
        params_M=26.4,
        gflops_ade20k=17.1,
        gflops_cityscapes=143.4,
        miou_ade20k=48.5,
        miou_cityscapes=81.6,
        miou_coco_stuff=46.0,
        flops_convention="paper",
    ),
    # Ablation rows (OffSeg-T, ADE20K): mIoU only.
    "offseg-t-pixel": dict(miou_ade20k=42.0, note="ablation: per-pixel classifier with FreqFusion"),
    "offseg-t-co": dict(miou_ade20k=42.9, note="ablation: class offsets only"),
    "offseg-t-fo": dict(miou_ade20k=43.5, note="ablation: feature offsets only"),
}
for _name, _fig in {
    "segformer-b0": ((3.8, 3.9), (8.4, 8.8), (37.4, 40.1)),
    "segformer-b1": ((13.7, 13.9), (15.9, 16.3), (41.0, 43.7)),
    "segformer-b2": ((24.8, 24.9), (25.9, 26.1), (45.6, 47.3)),
    "segformer-b3": ((44.6, 44.8), (42.5, 42.8), (47.8, 49.5)),
    "segformer-b4": ((61.4, 61.6), (59.2, 59.5), (48.5, 50.1)),
    "segformer-b5": ((82.0, 82.2), (75.2, 75.5), (49.1, 50.6)),
    "segnext-t": ((4.3, 4.4), (6.6, 7.2), (41.1, 43.0)),
    "segnext-s": ((13.9, 14.1), (15.9, 16.5), (44.3, 45.6)),
    "segnext-b": ((27.6, 28.2), (34.9, 34.8), (48.5, 49.4)),
}.items():
    PAPER_FIGURES[_name], PAPER_FIGURES[f"{_name}-ol"] = _plug_in(*_fig)
PAPER_FIGURES["mask2former-swin-t"] = dict(params_M=47.4, miou_ade20k=47.7, note="the paper gives no FLOPs")
PAPER_FIGURES["mask2former-swin-t-ol"] = dict(params_M=47.6, miou_ade20k=50.3, note="the paper gives no FLOPs")


def measure_latency(
    model: nn.Module,
    input_size: int | tuple[int, int] = (512, 512),
    threads: int | None = None,
    warmup: int = 2,
    runs: int = 5,
) -> dict:
    """CPU latency of one forward to the head's logits (batch 1, eval, inference mode): the
    median of `runs` timed runs after `warmup` untimed ones, with `threads` intra-op threads."""
    import time

    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    x = torch.randn(1, 3, int(h), int(w), generator=torch.Generator().manual_seed(0))
    previous_threads = torch.get_num_threads()
    restore = _set_eval(model)
    forward = _forward_fn(model)
    times = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            for i in range(warmup + runs):
                start = time.perf_counter()
                forward(x)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
        restore()
    times_sorted = sorted(times)
    mid = len(times_sorted) // 2
    median = times_sorted[mid] if len(times_sorted) % 2 else (times_sorted[mid - 1] + times_sorted[mid]) / 2
    return {"median_ms": median, "runs_ms": times, "threads": used_threads, "warmup": warmup}


def model_card(
    name: str,
    size: int | tuple[int, int] = (512, 512),
    num_classes: int = 150,
    latency: bool = True,
    threads: int | None = None,
    runs: int = 5,
    warmup: int = 2,
) -> dict:
    """Facts about registered model `name` at input `size` (H, W) with `num_classes` classes:
    parameter counts (all, and only those the forward uses), GFLOPs in each convention, CPU
    latency (unless `latency=False`) and the paper's figures when known."""
    from .factory import create_model

    h, w = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    model = create_model(name, num_classes=num_classes)
    trace = trace_flops(model, (h, w))
    reports = {c: trace.report(c) for c in CONVENTIONS}
    all_params = dict(model.named_parameters())
    unused = [n for n in all_params if n not in trace.used_parameters]
    card = {
        "model": name,
        "input_size": [h, w],
        "num_classes": num_classes,
        "params": count_parameters(model),
        "params_used_in_forward": sum(p.numel() for n, p in all_params.items() if n not in unused),
        "unused_parameters": unused,
        "gflops": {c: r.gflops for c, r in reports.items()},
        "gflops_by_operator": {
            op: v / 1e9 for op, v in sorted(reports["full"].by_operator.items(), key=lambda kv: -kv[1])
        },
        "gflops_by_module": {m: v / 1e9 for m, v in reports["full"].by_module.items() if m and "." not in m},
        "latency": measure_latency(model, (h, w), threads=threads, warmup=warmup, runs=runs) if latency else None,
        "paper": PAPER_FIGURES.get(name),
    }
    return card


def format_model_card(card: dict) -> str:
    """The model card as readable text."""
    h, w = card["input_size"]
    lines = [f"{card['model']}  (input {h}x{w}, {card['num_classes']} classes)"]
    params = f"  parameters      {card['params']:,} ({card['params'] / 1e6:.2f} M)"
    if card["unused_parameters"]:
        used = card["params_used_in_forward"]
        params += f"; {used:,} ({used / 1e6:.2f} M) without the unused {', '.join(card['unused_parameters'])}"
    lines.append(params)
    g = card["gflops"]
    lines.append(f"  GFLOPs paper    {g['paper']:.2f}   (Conv2d only, MACs + bias adds: the paper's OffSeg convention)")
    lines.append(f"  GFLOPs fvcore   {g['fvcore']:.2f}   (fvcore's default operator set)")
    lines.append(f"  GFLOPs full     {g['full']:.2f}   (fvcore + CARAFE + bicubic + baddbmm)")
    ops = ", ".join(f"{op} {v:.3f}" for op, v in card["gflops_by_operator"].items())
    lines.append(f"    by operator (full): {ops}")
    mods = ", ".join(f"{m} {v:.3f}" for m, v in card["gflops_by_module"].items())
    if mods:
        lines.append(f"    by module (full):   {mods}")
    lat = card.get("latency")
    if lat:
        lines.append(
            f"  CPU latency     {lat['median_ms']:.1f} ms  (median of {len(lat['runs_ms'])} runs after "
            f"{lat['warmup']} warm-up, {lat['threads']} threads, batch 1, to the head's logits)"
        )
    paper = card.get("paper")
    if paper:
        figures = []
        if "params_M" in paper:
            figures.append(f"{paper['params_M']} M params")
        if "gflops_ade20k" in paper:
            figures.append(f"{paper['gflops_ade20k']} G @512x512")
        if "gflops_cityscapes" in paper:
            figures.append(f"{paper['gflops_cityscapes']} G @1024x2048")
        for key, label in (
            ("miou_ade20k", "ADE20K"),
            ("miou_cityscapes", "Cityscapes"),
            ("miou_coco_stuff", "COCO-Stuff"),
        ):
            if key in paper:
                figures.append(f"mIoU {label} {paper[key]}")
        line = "  paper           " + ", ".join(figures)
        extra = []
        if "flops_convention" in paper:
            extra.append(f"FLOPs compare with the {paper['flops_convention']} count")
        if "note" in paper:
            extra.append(paper["note"])
        if extra:
            line += f"  ({'; '.join(extra)})"
        lines.append(line)
    return "\n".join(lines)
