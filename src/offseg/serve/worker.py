"""The inference worker of `offseg serve`: one thread that owns torch, a bounded queue, and
dynamic batching.

Requests put a picture already resized to the test scale (uint8 RGB (h, w, 3), as
`offseg.predict` resizes it) into the queue and get a `concurrent.futures.Future`; the worker
normalises it straight into the batch (a waiting request holds 1 byte per value, not 4).
The worker takes the oldest job, then, while other requests are still being read and prepared
(`expect`), waits up to `batch_wait` seconds for them; it gathers the queued jobs that pad to the
same model input size (whole mode: (h, w) rounded up to the size divisor; slide mode: the
same (h, w)), at most `max_batch` in all, and runs them as forwards of `max_batch` or a power of
two images (`forward_sizes`: 7 images as 4, 2 and 1), so that few shapes recur. Each job's scores are
cropped to its own size and resized to its picture's size before the argmax, exactly the steps of
`offseg.predict`, so a batched label map differs from the single one only where float rounding of
the batched kernels flips a near-tie. In whole mode that is `offseg.predict`'s own labels-only
route (`offseg.inference.whole_labels_each`): the full-resolution scores of all classes are never
held.

Memory: before a forward whose shape (input size, number of images) differs from the previous
forward's, also within a batch (7 images as 4, 2 and 1), the worker hands the heap's free pages
back to the system (`offseg._heap`). Forward passes of one shape reuse each other's freed blocks;
a mix of shapes scatters them, and the server's resident size grows past what its largest forward
needs (docs/serve.md has the measurements).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._heap import release_free_heap
from ..inference import infer, whole_labels_each

__all__ = ["InferenceWorker", "QueueFullError", "SegmentResult", "forward_sizes"]


class QueueFullError(RuntimeError):
    """The queue holds `queue_size` waiting jobs already; try again later."""


@dataclass
class SegmentResult:
    """What the worker hands back for one image."""

    labels: np.ndarray  # (H, W) class ids at the picture's size; uint8 up to 256 classes, else int32
    batch_size: int  # how many images ran in the same forward
    queued_s: float  # from submit to the start of its batch
    inference_s: float  # the batch's forward + resize + argmax


@dataclass
class _Job:
    image: np.ndarray
    out_size: tuple[int, int]
    key: tuple[int, int]
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


def forward_sizes(count: int, max_batch: int) -> list[int]:
    """The forward passes a batch of `count` images runs as: `max_batch` and powers of two below it,
    largest first (7 of at most 8: 4, 2, 1). A few shapes recur, so glibc's heap reuses their
    memory; every size from 1 to 8 in turn made it grow (docs/serve.md)."""
    if max_batch < 1 or count < 0:
        raise ValueError(
            f"forward_sizes: max_batch must be at least 1 and count not negative, got {max_batch}, {count}"
        )
    sizes = sorted({max_batch, *(1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch)}, reverse=True)
    out = []
    for size in sizes:
        while count >= size:
            out.append(size)
            count -= size
    return out


class InferenceWorker:
    """One thread running `model` on batches of queued images (see the module docstring).

    model: the network to run (an `offseg.optimize_for_inference` copy for the CPU fast path).
    mode, crop_size, stride: the test mode, as `offseg.predict` takes it.
    threads: torch's intra-op threads, set by the worker when it starts (None: torch's default).
    on_batch: called with the size of every batch run (metrics).
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "whole",
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        max_batch: int = 8,
        queue_size: int = 64,
        batch_wait: float = 0.005,
        threads: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or batch_wait < 0:
            raise ValueError("max_batch and queue_size must be at least 1 and batch_wait not negative")
        if mode not in ("whole", "slide"):
            raise ValueError(f"unknown test mode {mode!r}: expected 'whole' or 'slide'")
        self.model = model
        self.mode, self.crop_size, self.stride = mode, crop_size, stride
        self.max_batch, self.queue_size, self.batch_wait = max_batch, queue_size, batch_wait
        self.threads = threads
        self.on_batch = on_batch
        self.divisor = int(getattr(model, "size_divisor", 1) or 1)
        self._pending: collections.deque[_Job] = collections.deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._incoming = 0  # requests announced by `expect` and not yet submitted
        self._thread: threading.Thread | None = None
        self.batch_seconds = 0.0  # exponential average of one batch's run time (for Retry-After)

    # -- the request side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="offseg-inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the jobs already queued, then end the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        return len(self._pending)

    def _key(self, image: np.ndarray) -> tuple[int, int]:
        h, w = int(image.shape[0]), int(image.shape[1])
        if self.mode == "slide":  # windows depend on the exact size
            return h, w
        return -(-h // self.divisor) * self.divisor, -(-w // self.divisor) * self.divisor

    def expect(self) -> None:
        """A request has arrived and will be submitted (or `forget`-ten) soon: batches wait for it."""
        with self._lock:
            self._incoming += 1

    def forget(self) -> None:
        """An expected request will not come (it was refused)."""
        with self._lock:
            self._incoming -= 1
            self._lock.notify()

    def submit(self, image: np.ndarray, out_size: Sequence[int], expected: bool = False) -> Future:
        """Queue a resized uint8 RGB picture (h, w, 3) whose label map is wanted at `out_size` (H, W),
        the picture's own size. Raises QueueFullError when `queue_size` jobs are waiting already."""
        with self._lock:
            if expected:  # arrived, whatever happens next
                self._incoming -= 1
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected a uint8 RGB picture (h, w, 3), got {image.dtype} {image.shape}")
            job = _Job(image, (int(out_size[0]), int(out_size[1])), self._key(image))
            if self._stopping:
                raise RuntimeError("the inference worker is stopping")
            if len(self._pending) >= self.queue_size:
                raise QueueFullError(f"{len(self._pending)} requests are waiting (the --queue limit)")
            self._pending.append(job)
            self._lock.notify()
        return job.future

    # -- the worker thread -----------------------------------------------------------------------

    def _take_compatible(self, batch: list[_Job]) -> None:
        key = batch[0].key
        kept: collections.deque[_Job] = collections.deque()
        while self._pending:
            job = self._pending.popleft()
            if job.key == key and len(batch) < self.max_batch:
                batch.append(job)
            else:
                kept.append(job)
        self._pending.extend(kept)

    def _next_batch(self) -> list[_Job] | None:
        with self._lock:
            while not self._pending:
                if self._stopping:
                    return None
                self._lock.wait()
            batch = [self._pending.popleft()]
            deadline = time.perf_counter() + self.batch_wait
            while True:
                self._take_compatible(batch)
                remaining = deadline - time.perf_counter()
                # nothing on its way: waiting would only add latency
                if len(batch) >= self.max_batch or remaining <= 0 or self._incoming <= 0:
                    return batch
                self._lock.wait(remaining)

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        # per thread: subnormal floats slow trained models several-fold (benchmarks/bench_denormals.py)
        torch.set_flush_denormal(True)
        last_shape: tuple[tuple[int, int], int] | None = None
        while (batch := self._next_batch()) is not None:
            started = time.perf_counter()
            done = 0
            for size in forward_sizes(len(batch), self.max_batch):
                shape = (batch[0].key, size)
                if shape != last_shape:
                    release_free_heap()
                    last_shape = shape
                self._forward([*batch[done : done + size]])
                done += size
            spent = time.perf_counter() - started
            self.batch_seconds = spent if self.batch_seconds == 0 else 0.8 * self.batch_seconds + 0.2 * spent

    def _forward(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            labels = self.run_batch([job.image for job in jobs], [job.out_size for job in jobs])
        except Exception as err:  # a failing batch fails its requests, not the server
            for job in jobs:
                job.future.set_exception(err)
            return
        spent = time.perf_counter() - started
        if self.on_batch is not None:
            self.on_batch(len(jobs))
        for job, label in zip(jobs, labels, strict=True):
            job.future.set_result(SegmentResult(label, len(jobs), started - job.submitted, spent))

    @torch.inference_mode()
    def run_batch(self, images: Sequence[np.ndarray], out_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Label maps of resized pictures that share a key, in one forward (also used by the
        benchmark's plain loop). Each is normalised by `offseg.predict`'s own `preprocess`; whole
        mode pads them at the bottom and right with 0, as `offseg.inference.pad_to_divisor` does, to
        the batch's common size."""
        from ..predict import preprocess

        height, width = self._key(images[0])
        x = torch.zeros((len(images), 3, height, width))
        for i, image in enumerate(images):
            x[i, :, : image.shape[0], : image.shape[1]] = preprocess(image)[0]
        if self.mode == "whole":  # offseg.predict's labels-only route
            classes = getattr(self.model, "num_classes", None)  # unknown: the wider type
            dtype = np.uint8 if isinstance(classes, int) and classes <= 256 else np.int32
            maps = whole_labels_each(self.model, x, [image.shape[:2] for image in images], out_sizes)
            return [m.numpy().astype(dtype) for m in maps]
        scores = infer(self.model, x, mode=self.mode, crop_size=self.crop_size, stride=self.stride)
        dtype = np.uint8 if scores.shape[1] <= 256 else np.int32
        labels = []
        for i, (image, out_size) in enumerate(zip(images, out_sizes, strict=True)):
            own = scores[i : i + 1, :, : image.shape[0], : image.shape[1]]
            if tuple(own.shape[-2:]) != tuple(out_size):
                own = F.interpolate(own, size=out_size, mode="bilinear", align_corners=False)
            labels.append(own.argmax(dim=1)[0].numpy().astype(dtype))
        return labels
