"""`offseg serve`: a segmentation service (Starlette + uvicorn) with a web page.

Needs the optional extra `serve` (pip install 'offseg[serve]'). See docs/serve.md.

    from offseg.serve import ServeSettings, create_app, load_served_model
    app = create_app(load_served_model("offseg-t", checkpoint="runs/camvid/best.pth"), ServeSettings(max_batch=8))
"""

from __future__ import annotations

from .app import ServeSettings, create_app
from .model import ServedModel, load_served_model
from .worker import InferenceWorker, QueueFullError, forward_sizes

__all__ = [
    "InferenceWorker",
    "QueueFullError",
    "ServeSettings",
    "ServedModel",
    "create_app",
    "forward_sizes",
    "load_served_model",
]
