"""Whether a module runs under an exporter: several layers then switch to formulations that
export to ONNX and run well in ONNX Runtime (no in-place ops, whole-map operators); or under an
exporter or `torch.compile`, where the CPU fast path's eager-only kernels (oneDNN calls, buffer
reuse, image-by-image batches) step aside."""

from __future__ import annotations

import torch


def is_exporting() -> bool:
    """True while `torch.jit` traces or `torch.onnx` exports."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def is_exporting_or_compiling() -> bool:
    """`is_exporting()`, or `torch.compile` traces."""
    return is_exporting() or torch.compiler.is_compiling()
