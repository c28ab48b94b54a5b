"""Model families register themselves on import."""

from . import offseg  # noqa: F401
from .registry import list_models, register_model  # noqa: F401
from .segmentor import Segmentor  # noqa: F401
from . import segformer  # noqa: F401
from . import mask2former  # noqa: F401
from . import segnext  # noqa: F401
