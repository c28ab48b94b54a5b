"""Model families register themselves on import."""

from . import (
    mask2former,  # noqa: F401
    offseg,  # noqa: F401
    segformer,  # noqa: F401
    segnext,  # noqa: F401
)
from .registry import list_models, register_model  # noqa: F401
from .segmentor import Segmentor  # noqa: F401
