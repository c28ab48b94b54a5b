"""The HTTP side of `offseg serve` (Starlette): routes, request checks, responses, metrics.

    POST /v1/segment[?format=json|labels|overlay]   one image, as the raw body or a multipart file
    GET  /v1/model                                   the model card
    GET  /healthz                                    liveness
    GET  /metrics                                    Prometheus text format
    GET  /                                           the web page (offline: no CDN, no external fonts)

Decoding, resizing and encoding run in a pool of one thread per CPU; the network runs only in the
`InferenceWorker` thread. Every refused request gets a JSON body {"error": message, "status": code}.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import numpy as np
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .images import BadInput, open_image
from .model import ServedModel
from .worker import InferenceWorker, QueueFullError

__all__ = ["ServeSettings", "create_app"]

PAGE_DIR = Path(__file__).parent / "page"
FORMATS = ("json", "labels", "overlay")
_KNOWN_PATHS = ("/", "/v1/segment", "/v1/model", "/healthz", "/metrics")


@dataclass
class ServeSettings:
    """The service's limits (the `offseg serve` options)."""

    max_batch: int = 8
    queue: int = 64
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 16_000_000
    threads: int | None = None
    batch_wait: float = 0.005  # seconds a batch waits for requests still being read and decoded


class Metrics:
    """The Prometheus series of one app (own registry, so several apps can live in one process)."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "offseg_requests", "HTTP requests answered, by path and status", ["path", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "offseg_segment_latency_seconds",
            "Time from a /v1/segment request's arrival to its answer (successful ones)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "offseg_batch_size",
            "Images per forward pass of the inference worker",
            buckets=sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch} | {max_batch}),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "offseg_queue_depth", "Requests waiting for the inference worker", registry=self.registry
        )


class MetricsMiddleware:
    """ASGI middleware counting every HTTP response by path (known ones, else "other") and status."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"

        async def send_counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, send_counted)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes: from
    Content-Length before reading anything, else while it streams in."""
    declared = request.headers.get("content-length")
    too_large = f"body too large: over the limit of {limit} bytes (--max-body-mb)"
    if declared is not None:
        if not declared.isdigit():
            raise BadInput(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limit:
            raise BadInput(413, f"body too large: {declared} bytes, over the limit of {limit} bytes (--max-body-mb)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BadInput(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_bytes(request: Request, body: bytes, limit: int) -> bytes:
    """The uploaded file of a multipart body, else the body itself."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def replay():
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_part_size=limit).parse()
    except MultiPartException as err:
        raise BadInput(400, f"bad multipart body: {err.message}") from None
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        raise BadInput(400, "multipart body without a file field: send the image as one (curl -F image=@photo.jpg)")
    return await files[0].read()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # label maps compress well even at level 1, and fast
    return buffer.getvalue()


def create_app(served: ServedModel, settings: ServeSettings | None = None) -> Starlette:
    """The ASGI app serving `served` (its worker starts and stops with the app's lifespan)."""
    from ..data.transforms import resize_image
    from ..predict import fit_scale, label_image
    from ..visualize import overlay

    settings = settings or ServeSettings()
    metrics = Metrics(settings.max_batch)
    worker = InferenceWorker(
        served.runner,
        mode=served.mode["mode"],
        crop_size=served.mode.get("crop_size"),
        stride=served.mode.get("stride"),
        max_batch=settings.max_batch,
        queue_size=settings.queue,
        batch_wait=settings.batch_wait,
        threads=settings.threads,
        on_batch=metrics.batch_size.observe,
    )
    metrics.queue_depth.set_function(lambda: worker.depth)
    # Decoding and encoding run in at most one thread per CPU: more would only compete with the
    # worker for the cores and hold more pictures in memory at once.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpu_threads = anyio.CapacityLimiter(cpus)

    async def in_thread(function, *args):
        return await anyio.to_thread.run_sync(function, *args, limiter=cpu_threads)

    def prepare(data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """The picture (H, W, 3) and its copy resized to the test scale as `offseg.predict` resizes it."""
        picture = np.asarray(open_image(data, settings.max_pixels))
        if served.scale is None:
            return picture, picture
        return picture, resize_image(picture, fit_scale(picture.shape[0], picture.shape[1], served.scale))

    def answer(fmt: str, picture: np.ndarray, resized: np.ndarray, result, timing: dict) -> Response:
        labels = result.labels
        if fmt == "overlay":
            return Response(_png(overlay(picture, labels, served.palette)), media_type="image/png")
        png = _png(label_image(labels, served.palette))
        if fmt == "labels":
            return Response(png, media_type="image/png")
        counts = np.bincount(labels.ravel(), minlength=served.num_classes)
        total = int(labels.size)
        classes = [
            {"id": int(k), "name": served.class_names[k], "pixels": int(counts[k]), "fraction": counts[k] / total}
            for k in np.flatnonzero(counts)
        ]
        return JSONResponse(
            {
                "model": served.name,
                "input_size": [int(picture.shape[0]), int(picture.shape[1])],
                "inference_size": [int(resized.shape[0]), int(resized.shape[1])],
                "classes": classes,
                "batch_size": result.batch_size,
                "timing_ms": timing,
                "labels_png": base64.b64encode(png).decode("ascii"),
            }
        )

    async def segment(request: Request) -> Response:
        arrived = time.perf_counter()
        fmt = request.query_params.get("format", "json")
        if fmt not in FORMATS:
            return _error(400, f"unsupported format {fmt!r}: use json (default), labels or overlay")
        worker.expect()  # a batch starting now waits a few ms for this request
        try:
            body = await _read_body(request, settings.max_body_bytes)
            data = await _image_bytes(request, body, settings.max_body_bytes)
            picture, resized = await in_thread(prepare, data)
            del data, body  # only the decoded picture is kept while the request waits
        except BadInput as err:
            worker.forget()
            return _error(err.status, err.message)
        except BaseException:
            worker.forget()
            raise
        decoded = time.perf_counter()
        try:
            future = worker.submit(resized, picture.shape[:2], expected=True)
        except QueueFullError as err:
            retry = max(1, math.ceil((worker.depth / settings.max_batch + 1) * worker.batch_seconds))
            return _error(503, f"server busy: {err}; retry later", headers={"Retry-After": str(retry)})
        result = await asyncio.wrap_future(future)
        timing = {
            "decode": round((decoded - arrived) * 1e3, 2),
            "queue": round(result.queued_s * 1e3, 2),
            "inference": round(result.inference_s * 1e3, 2),
        }
        response = await in_thread(answer, fmt, picture, resized, result, timing)
        metrics.latency.observe(time.perf_counter() - arrived)
        return response

    async def model_card(request: Request) -> Response:
        return JSONResponse(served.card())

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": served.name, "queue_depth": worker.depth})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def page(request: Request) -> Response:
        return FileResponse(PAGE_DIR / "index.html", media_type="text/html")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)  # registered for HTTPException only
        message = {404: f"no such path: {request.url.path}", 405: f"method {request.method} not allowed here"}
        return _error(exc.status_code, message.get(exc.status_code, str(exc.detail)), headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/v1/segment", segment, methods=["POST"]),
            Route("/v1/model", model_card, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=PAGE_DIR), name="static"),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
