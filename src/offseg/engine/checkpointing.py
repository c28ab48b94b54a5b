"""Training checkpoints: written atomically, read back with `weights_only=True`.

A checkpoint holds only tensors and plain containers (no numpy objects, no classes), so the
safe loader reads it: the model and optimiser state, the iteration, and every RNG state.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over `path`:
    a reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_states() -> dict[str, Any]:
    """Every RNG the training loop touches, as tensors and plain numbers."""
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # legacy=True gives the tuple form for the MT19937 generator
        raise RuntimeError("numpy's global generator is not MT19937; its state cannot be saved")
    py_version, py_internal, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np_state = states["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = states["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by the trainer, read with the safe loader."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot resume from this file ({type(err).__name__}: {err})") from None
