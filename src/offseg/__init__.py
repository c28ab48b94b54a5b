"""offseg: Offset Learning for efficient semantic segmentation, in pure PyTorch."""

from __future__ import annotations

# Set before the submodule imports, which read it lazily (hub, export, cli).
__version__ = "0.1.0"

# Before anything imports torch: the `offseg` command's OpenMP setting (see offseg._openmp).
from ._openmp import set_cli_defaults  # noqa: E402

set_cli_defaults()

from .checkpoint import load_checkpoint, read_state_dict  # noqa: E402
from .factory import create_model  # noqa: E402
from .hub import load_pretrained, save_pretrained  # noqa: E402
from .models import list_models  # noqa: E402
from .optimize import optimize_for_inference  # noqa: E402
from .predict import predict  # noqa: E402

__all__ = [
    "__version__",
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_pretrained",
    "optimize_for_inference",
    "predict",
    "read_state_dict",
    "save_pretrained",
]
