"""Conformance data produced with the official implementation (../shared/reference).

One loader, driven by each vector's JSON sidecar, serves every test: it gathers the weights
(stored in the file, taken from another file with a prefix stripped, or split between two files
for a shared backbone), upcasts the float16 storage to float32, and hands back the inputs,
intermediates and expected outputs. Tests skip with a reason when the folder is absent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(os.environ.get("OFFSEG_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
_DATA_PREFIXES = ("input.", "output.", "intermediate.", "case")

# Acceptance bars from the reference README: |ours - ref| <= bar * max(1, max|ref|).
TOLERANCE = {
    "module": 1e-5,
    "model": 1e-4,
    "segnext": 5e-4,
    "mscan": 1e-3,
    "mask2former": 1e-4,
    "mask2former_seg_logits": 1e-5,
}


def require_reference() -> Path:
    if not (REFERENCE_DIR / "README.md").is_file():
        pytest.skip(f"reference data not found at {REFERENCE_DIR} (set OFFSEG_REFERENCE to ../shared/reference)")
    return REFERENCE_DIR


def manifest(name: str) -> dict:
    return json.loads((require_reference() / "manifests" / f"{name}.json").read_text())


def _read(relpath: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(require_reference() / relpath))


def _is_weight(key: str) -> bool:
    return not key.startswith(_DATA_PREFIXES)


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


@dataclass
class Vector:
    name: str
    sidecar: dict
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def load_vector(name: str) -> Vector:
    """Weights (float32, exact state-dict keys) and data tensors of vectors/<name>.safetensors."""
    ref = require_reference()
    sidecar = json.loads((ref / "vectors" / f"{name}.json").read_text())
    stored = _read(f"vectors/{name}.safetensors")
    tensors = {k: v for k, v in stored.items() if not _is_weight(k)}
    weights = {k: v for k, v in stored.items() if _is_weight(k)}
    info = sidecar.get("weights") or {}
    if info.get("weights_from"):
        other = {k: v for k, v in _read(info["weights_from"]).items() if _is_weight(k)}
        prefix = info.get("key_prefix_to_strip")
        if prefix:
            other = {k[len(prefix) :]: v for k, v in other.items() if k.startswith(prefix)}
        weights.update(other)
    if info.get("backbone_weights_from"):
        other = _read(info["backbone_weights_from"])
        weights.update({k: v for k, v in other.items() if k.startswith("backbone.")})
    return Vector(name, sidecar, {k: _as_float32(v) for k, v in weights.items()}, tensors)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, bar: float, what: str = "") -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    err = (ours.detach().float() - ref).abs().max().item()
    limit = bar * max(1.0, ref.abs().max().item())
    assert err <= limit, f"{what}: max |ours - ref| = {err:.3g} > {limit:.3g}"


def assert_manifest(model: torch.nn.Module, name: str) -> None:
    """Same state-dict keys, shapes and parameter count as the official model."""
    man = manifest(name)
    ours = model.state_dict()
    expected = man["state_dict"]
    assert set(ours) == set(expected), (
        f"missing {sorted(set(expected) - set(ours))[:10]}, unexpected {sorted(set(ours) - set(expected))[:10]}"
    )
    bad = [k for k in expected if list(ours[k].shape) != list(expected[k]["shape"])]
    assert not bad, f"shape mismatches: {bad[:10]}"
    assert sum(p.numel() for p in model.parameters()) == man["num_params"]
