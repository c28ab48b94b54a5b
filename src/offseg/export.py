"""ONNX export of a segmentation model, checked against PyTorch in ONNX Runtime.

The exported graph has one input and one output:

- input 'image' (B, 3, H, W): by default float32, already normalised ((x - mean) / std of the
  RGB 0-255 image, see `offseg.hub.normalisation`); with `raw_input=True` uint8 RGB 0-255, the
  normalisation being part of the graph.
- output 'logits' float32 (B, K, H, W) at the input size, or with `labels=True` 'labels' int64
  (B, H, W), the argmax class index of every pixel.

H and W must be multiples of the model's size divisor (32). A fixed-size export (the default)
works at exactly that size and batch 1; `dynamic=True` makes batch, height and width free.

Exporters (torch 2.13): 'torchscript' is torch's legacy tracing exporter. It is fast and writes the
requested opset exactly, but a trace freezes sizes that the model computes in Python: the
EfficientFormerV2 attention-bias resize branch (identity at 512x512), FreqFusion's sampling-grid
normaliser and nn.MultiheadAttention's reshapes (MiT). So it is used for fixed sizes only.
'dynamo' (torch.export + onnxscript) keeps shapes symbolic and is used for dynamic exports;
it writes opset 18 or newer, and it is slow with dynamic shapes (minutes for OffSeg).
'auto' picks torchscript for fixed sizes and dynamo for dynamic ones, and falls back to dynamo
(with a warning) when the torchscript exporter fails. Both run without autograd and with
nn.MultiheadAttention's fused fast path switched off (that single op has no ONNX export).

Every export is checked: onnx.checker, then one ONNX Runtime run against PyTorch at the export
size (and for dynamic exports also at a second size with batch 2), reporting the max relative
error max|ort - torch| / max(1, max|torch|). Both sides compute in float32, so the error is at
least the model's own float32 round-off, and trained weights amplify round-off: on a CamVid-trained
OffSeg-T, PyTorch float32 is itself 2.5e-4 and 4e-4 (absolute, 192x256 and 512x512) from the
float64 result on the check's random input, as far as ONNX Runtime is, so a fixed 1e-4 bar can
fail a faithful graph. When the error exceeds the tolerance, the check therefore also computes the model in
float64 and accepts the graph if ONNX Runtime is no farther from that exact result than
`ROUNDOFF_FACTOR` times PyTorch float32's own distance from it (a wrong graph is off by far more).

SegNeXt: its NMF starts from random bases at every forward; the exported graph holds fixed ones,
those of `decode_head.set_generator(seed)` (see `fixed_nmf_bases`), so it is deterministic.

Needs the optional packages onnx and onnxruntime (and onnxscript for dynamo):
`pip install 'offseg[export]'`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

EXPORTERS = ("auto", "torchscript", "dynamo")
MIN_OPSET = 17
# ONNX Runtime may be this many times farther from the float64 result than PyTorch float32 is (its
# kernels sum in other orders; e.g. its InstanceNormalization, which GroupNorm exports to, sums a
# whole group in float32) before an export counts as departing from the model
ROUNDOFF_FACTOR = 4.0
DYNAMO_MIN_OPSET = 18  # the dynamo exporter has no implementations below 18
INSTALL_HINT = "pip install 'offseg[export]' (or: pip install onnx onnxruntime onnxscript)"


class ExportCheckError(ValueError):
    """ONNX Runtime does not reproduce the PyTorch output of the exported model."""


def _import(module: str, purpose: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{purpose} needs the optional package {module}: {INSTALL_HINT}") from None


class ExportWrapper(nn.Module):
    """What the ONNX graph computes: optional uint8 -> normalised float, model, optional argmax."""

    mean: torch.Tensor  # buffers, registered in __init__
    inv_std: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        raw_input: bool = False,
        labels: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        from .hub import normalisation

        default_mean, default_std = normalisation()
        self.model = model
        self.raw_input = raw_input
        self.labels = labels
        self.register_buffer("mean", torch.tensor(mean or default_mean, dtype=torch.float32).view(1, 3, 1, 1))
        # multiply by 1/std, as the data pipeline does, so both give the same float32 values
        self.register_buffer("inv_std", 1.0 / torch.tensor(std or default_std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.to(torch.float32) - self.mean) * self.inv_std if self.raw_input else image
        logits = self.model(x)
        return logits.argmax(dim=1) if self.labels else logits


@dataclass
class ExportCheck:
    """One ONNX Runtime run compared to PyTorch."""

    input_shape: tuple[int, ...]
    max_rel_error: float | None = None  # logits
    label_agreement: float | None = None  # labels: fraction of pixels with the same class
    # computed when max_rel_error exceeds the tolerance: both float32 results against the float64 one
    float64_error: float | None = None  # ONNX Runtime
    float32_roundoff: float | None = None  # PyTorch float32

    def passes(self, tolerance: float) -> bool:
        """Within `tolerance` of PyTorch, or no farther from the float64 result than round-off allows."""
        if self.label_agreement is not None:
            return self.label_agreement >= 0.999
        if self.max_rel_error is None or self.max_rel_error <= tolerance:
            return True
        if self.float64_error is None or self.float32_roundoff is None:
            return False
        return self.float64_error <= max(tolerance, ROUNDOFF_FACTOR * self.float32_roundoff)

    def __str__(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        if self.max_rel_error is not None:
            text = f"input {shape}: max relative error vs PyTorch {self.max_rel_error:.2e}"
            if self.float64_error is not None and self.float32_roundoff is not None:
                text += (
                    f" (from the float64 result: ONNX Runtime {self.float64_error:.2e}, PyTorch float32 "
                    f"{self.float32_roundoff:.2e})"
                )
            return text
        if self.label_agreement is not None:
            return f"input {shape}: labels agree with PyTorch on {100 * self.label_agreement:.4f}% of pixels"
        return f"input {shape}: not compared"


@dataclass
class ExportResult:
    path: Path
    exporter: str
    opset: int
    input_dtype: str
    output_name: str
    output_dtype: str
    size: tuple[int, int]
    dynamic: bool
    seconds: float
    num_classes: int = 0
    checks: list[ExportCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # export-time choices the user should know about

    def describe(self) -> str:
        shape = "(B, 3, H, W)" if self.dynamic else f"(1, 3, {self.size[0]}, {self.size[1]})"
        classes = str(self.num_classes) if self.num_classes else "K"
        out_shape = f"(B, {classes}, H, W)" if self.output_name == "logits" else "(B, H, W)"
        if not self.dynamic:
            out_shape = out_shape.replace("B", "1").replace("H", str(self.size[0])).replace("W", str(self.size[1]))
        return (
            f"wrote {self.path} ({self.path.stat().st_size / 2**20:.1f} MiB, opset {self.opset}, "
            f"{self.exporter} exporter, {self.seconds:.1f} s): input 'image' {self.input_dtype} {shape}, "
            f"output '{self.output_name}' {self.output_dtype} {out_shape}"
        )


def _second_size(size: tuple[int, int], divisor: int) -> tuple[int, int]:
    """Another size for checking a dynamic export: about half the height, a different aspect."""
    h = max(2 * divisor, (size[0] // 2) // divisor * divisor)
    w = max(3 * divisor, (size[1] * 5 // 8) // divisor * divisor)
    if (h, w) == tuple(size):
        w += divisor
    return h, w


def _export_torchscript(
    wrapper: nn.Module, example: torch.Tensor, path: Path, output_name: str, opset: int, dynamic: bool
) -> None:
    axes = None
    if dynamic:
        out_axes = (
            {0: "batch", 1: "height", 2: "width"} if output_name == "labels" else {0: "batch", 2: "height", 3: "width"}
        )
        axes = {"image": {0: "batch", 2: "height", 3: "width"}, output_name: out_axes}
    with warnings.catch_warnings():
        # tracer and deprecation chatter; the result is checked in ONNX Runtime instead
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=[output_name],
            opset_version=opset,
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def _export_dynamo(
    wrapper: nn.Module,
    example: torch.Tensor,
    path: Path,
    output_name: str,
    opset: int,
    dynamic: bool,
    divisor: int,
    verbose: bool,
) -> None:
    _import("onnxscript", "the dynamo ONNX exporter")
    dynamic_shapes = None
    if dynamic:
        from torch.export import Dim

        # height and width as multiples of the divisor, so the model's divisibility check is no guard
        dynamic_shapes = {
            "image": {
                0: Dim("batch", min=1),
                2: divisor * Dim("height_blocks", min=1),
                3: divisor * Dim("width_blocks", min=1),
            }
        }
    quiet = contextlib.nullcontext() if verbose else _quiet_exporter()
    with quiet, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=True,
            input_names=["image"],
            output_names=[output_name],
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            optimize=True,
            verbose=False,
        )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the dynamo exporter's progress prints and its libraries' info / warning logs
    ("torchvision is not installed", "Skipping constant folding ...")."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# Largest batch a dynamic export of a model with NMF (SegNeXt) accepts: see fixed_nmf_bases.
NMF_MAX_BATCH = 64


@contextlib.contextmanager
def fixed_nmf_bases(wrapper: nn.Module, max_batch: int, divisor: int = 32) -> Iterator[list[str]]:
    """Make SegNeXt's NMF deterministic for export: its random initial bases become a constant.

    In PyTorch the NMF draws fresh bases at every forward. The exported graph instead holds the
    bases of one seeded draw `torch.rand((max_batch * S, D, R))` (normalised, as the head does) and
    uses the first batch * S of them. That equals what the head computes after
    `decode_head.set_generator(seed)`, since a seeded draw of fewer rows is a prefix of the longer
    one. The seed is the one the head was given, else 0. Inside this context the PyTorch model
    computes the same, so the ONNX Runtime check compares like with like. Yields notes to show.
    """
    try:
        from .models.heads.ham_head import NMF2D
    except ImportError:  # no SegNeXt in this installation
        yield []
        return
    nmfs = [m for m in wrapper.modules() if isinstance(m, NMF2D)]
    if not nmfs:
        yield []
        return
    widths: dict[int, int] = {}  # id(nmf) -> per-group feature width D, found by one eager pass
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args: widths.__setitem__(id(mod), args[0].shape[1] // mod.spatial_groups)
        )
        for m in nmfs
    ]
    probe = torch.zeros(
        1, 3, 2 * divisor, 2 * divisor, dtype=torch.uint8 if getattr(wrapper, "raw_input", False) else torch.float32
    )
    try:
        with torch.no_grad():
            wrapper(probe)
    finally:
        for hook in hooks:
            hook.remove()
    saved = [(m.seed, m.generator) for m in nmfs]
    notes = []
    try:
        for m in nmfs:
            seed = m.seed if m.seed is not None else 0
            m.set_generator(seed)
            m.register_buffer("export_bases", m.random_bases(max_batch, widths[id(m)]), persistent=False)
            # An instance attribute shadows the method (removed from __dict__ again below). It reads
            # the buffer through the module, so the exporters take the table for a module constant.
            m.__dict__["random_bases"] = (
                lambda nmf: lambda batch, dim, device=None, dtype=None: nmf.export_bases[: batch * nmf.spatial_groups]
            )(m)
            notes.append(
                f"the NMF's random initial bases are fixed to those of seed {seed} "
                f"(as decode_head.set_generator({seed})); batch at most {max_batch}"
            )
        yield sorted(set(notes))
    finally:
        for m, (old_seed, old_generator) in zip(nmfs, saved, strict=True):
            m.__dict__.pop("random_bases", None)
            if "export_bases" in m._buffers:
                del m._buffers["export_bases"]
            m.set_generator(old_generator if old_seed is None else old_seed)


def _example(shape: tuple[int, ...], raw_input: bool, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if raw_input:
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return torch.randn(shape, generator=generator)


def _relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max() / max(1.0, float(np.abs(ref).max())))


def _float64_output(wrapper: nn.Module, x: torch.Tensor) -> np.ndarray | None:
    """What a float64 copy of the wrapped model gives for `x`, or None when the model does not run in
    float64 (e.g. SegNeXt inside `fixed_nmf_bases`, whose fixed bases stay float32)."""
    try:
        exact = copy.deepcopy(wrapper).double()
        with torch.no_grad():
            return exact(x.double() if x.is_floating_point() else x).numpy()
    except (RuntimeError, TypeError):
        return None


def check_onnx(
    path: str | os.PathLike,
    wrapper: nn.Module,
    shapes: Sequence[tuple[int, ...]],
    raw_input: bool,
    labels: bool,
    tolerance: float | None = None,
) -> list[ExportCheck]:
    """Run the exported file in ONNX Runtime on random inputs of each shape and compare to PyTorch.

    Logits that differ by more than `tolerance` are also compared with the model computed in
    float64 (`ExportCheck.float64_error`, `float32_roundoff`; see the module doc).
    """
    ort = _import("onnxruntime", "checking the export in ONNX Runtime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    checks = []
    for i, shape in enumerate(shapes):
        x = _example(tuple(shape), raw_input, seed=1 + i)
        with torch.no_grad():
            expected = wrapper(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportCheckError(
                f"{path}: ONNX Runtime gives shape {got.shape} for input {tuple(shape)}, PyTorch {expected.shape}"
            )
        if labels:
            checks.append(ExportCheck(tuple(shape), label_agreement=float(np.mean(got == expected))))
        else:
            check = ExportCheck(tuple(shape), max_rel_error=_relative_error(got, expected))
            if tolerance is not None and check.max_rel_error is not None and check.max_rel_error > tolerance:
                exact = _float64_output(wrapper, x)
                if exact is not None:
                    check.float64_error = _relative_error(got, exact)
                    check.float32_roundoff = _relative_error(expected, exact)
            checks.append(check)
    return checks


def _finish_file(path: Path, metadata: dict[str, str], output_shape: tuple[int, ...] | None) -> int:
    """Record `metadata` in the file's metadata_props and, for a fixed-size export, the output's
    shape (the tracer leaves it unnamed); validate with onnx.checker. Returns the default-domain opset."""
    onnx = _import("onnx", "ONNX export")
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if output_shape is not None:
        shape = proto.graph.output[0].type.tensor_type.shape
        del shape.dim[:]
        for size in output_shape:
            shape.dim.add().dim_value = size
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    return next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def _inference_mode_for_export() -> Iterator[None]:
    """No autograd (the modules take their inference code paths), but without nn.MultiheadAttention's
    fused fast path, which is a single op that has no ONNX export; Offset Learning in its official
    form (the graph the int8 presets and docs/inference.md's figures were made for)."""
    from .models.layers.offset_learning import official_offset_learning

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), official_offset_learning():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _run_exporter(
    exporter: str,
    wrapper: ExportWrapper,
    path: Path,
    size: tuple[int, int],
    opset: int,
    dynamic: bool,
    divisor: int,
    verbose: bool,
) -> float:
    """Export with one exporter; returns the seconds taken. Failures become ValueError."""
    opset = max(opset, DYNAMO_MIN_OPSET) if exporter == "dynamo" else opset
    # dynamo specialises a dimension whose example size is 1, so a dynamic export traces batch 2
    example = _example((2 if dynamic and exporter == "dynamo" else 1, 3, *size), wrapper.raw_input, seed=0)
    output_name = "labels" if wrapper.labels else "logits"
    start = time.perf_counter()
    try:
        with _inference_mode_for_export():
            if exporter == "torchscript":
                _export_torchscript(wrapper, example, path, output_name, opset, dynamic)
            else:
                _export_dynamo(wrapper, example, path, output_name, opset, dynamic, divisor, verbose)
    except ImportError:
        raise
    except Exception as err:
        text = str(err).strip()
        name = getattr(wrapper.model, "name", "") or "the model"
        raise ValueError(
            f"the {exporter} exporter failed on {name}: {type(err).__name__}: "
            f"{text.splitlines()[0].strip() if text else ''}"
        ) from err
    return time.perf_counter() - start


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    size: Sequence[int] = (512, 512),
    *,
    dynamic: bool = False,
    labels: bool = False,
    raw_input: bool = False,
    opset: int = MIN_OPSET,
    exporter: str = "auto",
    check: bool = True,
    tolerance: float = 1e-4,
    metadata: dict[str, Any] | None = None,
    verbose: bool = False,
) -> ExportResult:
    """Export `model` (a Segmentor) to ONNX at `path` and check it in ONNX Runtime (see the module doc).

    metadata: extra entries (class_names, palette, ...) stored as JSON strings in the file's
    metadata_props beside the model name, class count, normalisation and input / output layout.
    Raises ExportCheckError (after writing the file) when ONNX Runtime departs from PyTorch by more
    than `tolerance` (max relative error of the logits) and from the float64 result by more than
    float32 round-off explains (module doc), or, for labels, on more than 0.1% of pixels.
    """
    _import("onnx", "ONNX export")
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}: choose from {', '.join(EXPORTERS)}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: {MIN_OPSET} or newer is needed (LayerNormalization, GridSample)")
    divisor = int(getattr(model, "size_divisor", 32))
    size = (int(size[0]), int(size[1]))
    if size[0] <= 0 or size[1] <= 0 or size[0] % divisor or size[1] % divisor:
        raise ValueError(f"export size {size[0]}x{size[1]} must be positive multiples of {divisor}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    wrapper = ExportWrapper(model, raw_input=raw_input, labels=labels).eval()
    num_classes = int(getattr(model, "num_classes", 0))
    chosen = exporter if exporter != "auto" else ("dynamo" if dynamic else "torchscript")

    with fixed_nmf_bases(wrapper, NMF_MAX_BATCH if dynamic else 1, divisor) as notes:
        try:
            seconds = _run_exporter(chosen, wrapper, path, size, opset, dynamic, divisor, verbose)
        except ValueError as err:
            if exporter != "auto" or chosen == "dynamo":
                other = "dynamo" if chosen == "torchscript" else "torchscript"
                raise ValueError(f"{err} (try --exporter {other})") from err.__cause__
            # e.g. a torch without the legacy exporter: the dynamo one handles fixed sizes as well
            warnings.warn(f"{err}; exporting with the dynamo exporter instead", stacklevel=2)
            chosen = "dynamo"
            seconds = _run_exporter(chosen, wrapper, path, size, opset, dynamic, divisor, verbose)

        from . import __version__
        from .hub import normalisation

        mean, std = normalisation()
        info = {
            "offseg_version": __version__,
            "model_name": getattr(model, "name", ""),
            "num_classes": num_classes,
            "mean": mean,
            "std": std,
            "input": (
                "uint8 RGB 0-255 (B, 3, H, W), normalised inside the graph"
                if raw_input
                else "float32 (B, 3, H, W), RGB normalised as (x - mean) / std"
            ),
            "output": "labels int64 (B, H, W)" if labels else "logits float32 (B, K, H, W)",
            "size_divisor": divisor,
            **({"notes": notes} if notes else {}),
            **(metadata or {}),
        }
        fixed_output_shape = None if dynamic or not num_classes else (1, *size) if labels else (1, num_classes, *size)
        actual_opset = _finish_file(
            path, {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}, fixed_output_shape
        )
        result = ExportResult(
            path,
            chosen,
            actual_opset,
            "uint8" if raw_input else "float32",
            "labels" if labels else "logits",
            "int64" if labels else "float32",
            size,
            dynamic,
            seconds,
            num_classes,
            notes=list(notes),
        )
        if check:
            shapes = [(1, 3, *size)] + ([(2, 3, *_second_size(size, divisor))] if dynamic else [])
            result.checks = check_onnx(path, wrapper, shapes, raw_input, labels, tolerance)
    bad = [c for c in result.checks if not c.passes(tolerance)]
    if bad:
        hint = (
            " (a traced graph that does not generalise: try --exporter dynamo)"
            if chosen == "torchscript" and dynamic
            else ""
        )
        raise ExportCheckError(f"{path}: ONNX Runtime departs from PyTorch: {'; '.join(map(str, bad))}{hint}")
    return result
