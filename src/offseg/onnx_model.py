"""Running an exported ONNX file (fp32 or int8) in place of the PyTorch model, with its sidecar.

An ONNX file alone does not say what the model is for. `offseg export` and `offseg quantize` write
a JSON sidecar beside it, OUT.onnx -> OUT.json:

    {"format": "offseg-onnx", "format_version": 1, "offseg_version": "0.1.0",
     "onnx_file": "OUT.onnx", "onnx_sha256": "...", "onnx_bytes": 123,
     "precision": "fp32" | "int8", "model_name": "offseg-t", "num_classes": 11, "dataset": "camvid",
     "class_names": [...] | null, "palette": [[r, g, b], ...] | null,
     "test_scale": [w, h] | null, "test_mode": {"mode": "whole", "crop_size": null, "stride": null},
     "input": {"name": "image", "dtype": "float32", "normalised": true, "mean": [...], "std": [...],
               "size_policy": "fixed" | "dynamic", "size": [h, w] | null, "size_divisor": 32},
     "output": {"name": "logits", "kind": "logits"},
     "quantization": {...} | null}

The sha256 ties the sidecar to one file: a sidecar next to another (re-exported, re-quantised,
renamed) ONNX file is refused. `OnnxSegmentor` runs the file in ONNX Runtime and behaves like a
model returning logits (B, K, H, W), so `offseg.evaluate`, `offseg.inference.infer` and
`offseg.predict` take it as they take a PyTorch model. A fixed-size file accepts smaller inputs too:
they are padded (bottom and right, with 0 after normalisation, as whole inference pads to the size
divisor) to the export size and the logits cropped back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SIDECAR_FORMAT", "OnnxSegmentor", "SidecarError", "read_sidecar", "sidecar_path", "write_sidecar"]

SIDECAR_FORMAT = "offseg-onnx"
SIDECAR_VERSION = 1


class SidecarError(ValueError):
    """The sidecar is missing, unreadable, or does not describe the ONNX file beside it."""


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """OUT.onnx -> OUT.json."""
    return Path(onnx_path).with_suffix(".json")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sidecar(
    onnx_path: str | os.PathLike,
    *,
    model_name: str,
    num_classes: int,
    precision: str,
    size: Sequence[int] | None,
    size_divisor: int = 32,
    dataset: str | None = None,
    class_names: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    test_scale: Sequence[int] | None = None,
    test_mode: Mapping[str, Any] | None = None,
    raw_input: bool = False,
    labels: bool = False,
    quantization: Mapping[str, Any] | None = None,
) -> Path:
    """Write the sidecar of `onnx_path` (see the module doc); `size` None means dynamic H, W."""
    from . import __version__
    from .hub import normalisation

    onnx_path = Path(onnx_path)
    mean, std = normalisation()
    config = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "offseg_version": __version__,
        "onnx_file": onnx_path.name,
        "onnx_sha256": file_sha256(onnx_path),
        "onnx_bytes": onnx_path.stat().st_size,
        "precision": precision,
        "model_name": model_name,
        "num_classes": int(num_classes),
        "dataset": dataset,
        "class_names": list(class_names) if class_names is not None else None,
        "palette": [[int(c) for c in colour] for colour in palette] if palette is not None else None,
        "test_scale": [int(v) for v in test_scale] if test_scale else None,
        "test_mode": dict(test_mode) if test_mode else {"mode": "whole", "crop_size": None, "stride": None},
        "input": {
            "name": "image",
            "dtype": "uint8" if raw_input else "float32",
            "normalised": not raw_input,
            "mean": mean,
            "std": std,
            "size_policy": "dynamic" if size is None else "fixed",
            "size": [int(size[0]), int(size[1])] if size is not None else None,
            "size_divisor": int(size_divisor),
        },
        "output": {"name": "labels" if labels else "logits", "kind": "labels" if labels else "logits"},
        "quantization": dict(quantization) if quantization else None,
    }
    path = sidecar_path(onnx_path)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def read_sidecar(onnx_path: str | os.PathLike, sidecar: str | os.PathLike | None = None) -> dict[str, Any]:
    """The sidecar of `onnx_path`, checked to belong to that exact file (size and sha256)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: no such ONNX file")
    path = Path(sidecar) if sidecar is not None else sidecar_path(onnx_path)
    if not path.is_file():
        raise SidecarError(
            f"{onnx_path}: no sidecar {path} (what the model is: name, classes, test scale); write the file "
            "with `offseg export` or `offseg quantize`, which write both"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SidecarError(f"{path}: not a readable JSON sidecar ({err})") from err
    if not isinstance(config, dict) or config.get("format") != SIDECAR_FORMAT:
        raise SidecarError(f'{path}: not an offseg ONNX sidecar (no "format": "{SIDECAR_FORMAT}")')
    missing = [key for key in ("onnx_sha256", "model_name", "num_classes", "input", "output") if key not in config]
    if missing:
        raise SidecarError(f"{path}: sidecar lacks {', '.join(missing)}")
    size = onnx_path.stat().st_size
    if config.get("onnx_bytes") not in (None, size) or file_sha256(onnx_path) != config["onnx_sha256"]:
        raise SidecarError(
            f"{path} does not belong to {onnx_path}: it describes {config.get('onnx_file')!r} with sha256 "
            f"{str(config['onnx_sha256'])[:12]}..., a different file (re-exported or re-quantised since?); "
            "write both again with `offseg export` / `offseg quantize`"
        )
    return config


class OnnxSegmentor(nn.Module):
    """An ONNX file with its sidecar, run in ONNX Runtime, as a module returning logits (B, K, H, W).

    Takes normalised float32 input (B, 3, H, W) on the CPU, H and W multiples of `size_divisor`; a
    fixed-size file takes inputs up to its size (padded, logits cropped back). `threads` sets ONNX
    Runtime's intra-op threads (default: torch.get_num_threads(), so it follows OMP_NUM_THREADS as
    the PyTorch path does). Attributes from the sidecar: name, num_classes, size_divisor,
    class_names, palette, test_scale, test_mode, precision, fixed_size.
    """

    def __init__(
        self, path: str | os.PathLike, sidecar: str | os.PathLike | None = None, threads: int | None = None
    ) -> None:
        super().__init__()
        from .export import _import

        ort = _import("onnxruntime", "running an ONNX model")
        self.path = Path(path)
        self.config = read_sidecar(self.path, sidecar)
        if self.config["output"].get("kind") != "logits" or not self.config["input"].get("normalised", False):
            raise SidecarError(
                f"{self.path}: evaluation and prediction need an export with float input and logits output "
                f"(this one has {self.config['input'].get('dtype')} input and {self.config['output'].get('kind')} "
                "output: export without --labels / --raw-input)"
            )
        self.name = str(self.config["model_name"])
        self.num_classes = int(self.config["num_classes"])
        self.size_divisor = int(self.config["input"].get("size_divisor", 32))
        self.class_names = self.config.get("class_names")
        self.palette = self.config.get("palette")
        test_scale = self.config.get("test_scale")
        self.test_scale = tuple(test_scale) if test_scale else None
        self.test_mode = self.config.get("test_mode") or {"mode": "whole", "crop_size": None, "stride": None}
        self.precision = str(self.config.get("precision", "fp32"))
        size = self.config["input"].get("size")
        self.fixed_size = (int(size[0]), int(size[1])) if size else None
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __repr__(self) -> str:
        policy = "dynamic size" if self.fixed_size is None else f"fixed {self.fixed_size[0]}x{self.fixed_size[1]}"
        return f"OnnxSegmentor({self.path}, {self.name}, {self.precision}, {policy})"

    def __deepcopy__(self, memo: dict) -> OnnxSegmentor:
        return self  # an ONNX Runtime session cannot be copied; the module holds no trainable state

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": x})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.path}: expected a normalised image batch (B, 3, H, W), got {tuple(x.shape)}")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        device = x.device
        x = x.detach().to("cpu", torch.float32)
        if self.fixed_size is None:
            out = self._run(np.ascontiguousarray(x.numpy()))
            return torch.from_numpy(out).to(device)
        fixed_h, fixed_w = self.fixed_size
        if h > fixed_h or w > fixed_w:
            raise ValueError(
                f"{self.path}: input {h}x{w} is larger than the file's fixed size {fixed_h}x{fixed_w}; resize "
                "the images (--scale) or export with --dynamic"
            )
        x = F.pad(x, (0, fixed_w - w, 0, fixed_h - h))
        # a fixed-size export has batch 1
        outs = [self._run(np.ascontiguousarray(x[i : i + 1].numpy())) for i in range(x.shape[0])]
        return torch.from_numpy(np.concatenate(outs))[..., :h, :w].to(device)
