"""The inference worker alone: which queued images share a forward pass, and that batching does
not change the labels (a float64 stand-in network, so the comparison is exact)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import offseg
from offseg.serve import InferenceWorker, QueueFullError


class StandIn(nn.Module):
    """Two zero-padded convolutions in float64: every output pixel depends on its neighbourhood, so
    wrong padding or cropping shows; refuses inputs that are not multiples of the size divisor."""

    size_divisor = 32

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 5, 3, padding=1)).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        self.batches: list[int] = []
        self.num_classes = 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0
        self.batches.append(x.shape[0])
        return self.body(x.double())


def _images(*sizes):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_images_padding_to_the_same_size_share_a_batch_with_unchanged_labels(mode):
    from offseg.data.transforms import resize_image
    from offseg.predict import fit_scale

    model = StandIn()
    options = {"mode": "whole"} if mode == "whole" else {"mode": "slide", "crop_size": (32, 32), "stride": (24, 24)}
    seen: list[int] = []
    worker = InferenceWorker(model, max_batch=8, batch_wait=0.5, on_batch=seen.append, **options)
    # Resized to fit 96 x 64 as the server prepares pictures: A -> 64x77, B -> 64x64, C and D -> 61x96.
    # Padded to multiples of 32, A, C and D share 64 x 96; only C and D have the same exact size.
    scale = (96, 64)
    originals = _images((100, 120), (128, 128), (96, 150), (96, 150))
    resized = [resize_image(image, fit_scale(*image.shape[:2], scale)) for image in originals]
    futures = [worker.submit(small, image.shape[:2]) for small, image in zip(resized, originals, strict=True)]
    worker.start()
    results = [f.result(timeout=60) for f in futures]
    worker.stop()
    if mode == "whole":  # the oldest job's size first (A with C and D: forwards of 2 and 1), then B
        assert seen == [2, 1, 1] and [r.batch_size for r in results] == [2, 1, 2, 1]
    else:  # sliding windows depend on the exact size: only C and D share a batch
        assert seen == [1, 1, 2] and [r.batch_size for r in results] == [1, 1, 2, 2]
    for image, result in zip(originals, results, strict=True):
        # float64 network: batching leaves even the rounding alone here
        assert np.array_equal(result.labels, offseg.predict(model, image, scale=scale, fast=False, **options))


def test_a_model_without_num_classes_gets_the_same_labels_in_whole_mode():
    # The labels route needs the class count only to pick the array type: unknown, it is int32.
    model = StandIn()
    images = _images((64, 80), (64, 70))
    with_classes = InferenceWorker(model).run_batch(images, [i.shape[:2] for i in images])
    del model.num_classes
    without = InferenceWorker(model).run_batch(images, [i.shape[:2] for i in images])
    assert [m.dtype for m in with_classes] == [np.uint8] * 2 and [m.dtype for m in without] == [np.int32] * 2
    assert all(np.array_equal(a, b) for a, b in zip(with_classes, without, strict=True))


def test_forward_sizes():
    from offseg.serve import forward_sizes

    assert [forward_sizes(n, 8) for n in (1, 3, 7, 8)] == [[1], [2, 1], [4, 2, 1], [8]]
    assert forward_sizes(11, 6) == [6, 4, 1] and forward_sizes(0, 8) == []
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        forward_sizes(3, 0)


def test_the_queue_is_bounded():
    worker = InferenceWorker(StandIn(), max_batch=1, queue_size=2)  # not started: nothing leaves the queue
    for x in _images((32, 32), (32, 32)):
        worker.submit(x, (32, 32))
    with pytest.raises(QueueFullError, match="2 requests are waiting"):
        worker.submit(_images((32, 32))[0], (32, 32))
    assert worker.depth == 2
    with pytest.raises(ValueError, match="uint8 RGB"):
        worker.submit(np.zeros((32, 32), dtype=np.uint8), (32, 32))
    worker.stop()  # never started: only flags it


def test_a_batch_waits_only_for_requests_on_their_way():
    seen: list[int] = []
    worker = InferenceWorker(StandIn(), max_batch=8, batch_wait=5.0, on_batch=seen.append)
    worker.start()
    a, b = _images((32, 32), (32, 32))
    started = time.perf_counter()
    worker.submit(a, (32, 32)).result(timeout=60)
    assert time.perf_counter() - started < 2.5, "a lone request waited for company that was not coming"
    worker.expect()  # another request is being read: the batch waits for it
    first = worker.submit(a, (32, 32))
    time.sleep(0.2)
    second = worker.submit(b, (32, 32), expected=True)
    assert first.result(timeout=60).batch_size == second.result(timeout=60).batch_size == 2
    worker.expect()
    third = worker.submit(a, (32, 32))
    time.sleep(0.2)
    started = time.perf_counter()
    worker.forget()  # refused after all: the waiting batch goes at once
    assert third.result(timeout=60).batch_size == 1 and time.perf_counter() - started < 2.5
    worker.stop()
    assert seen == [1, 2, 1]


def test_the_free_heap_is_handed_back_when_the_batch_shape_changes(monkeypatch):
    import offseg.serve.worker as worker_module

    trims: list[int] = []
    monkeypatch.setattr(worker_module, "release_free_heap", lambda: trims.append(len(seen)) or True)
    seen: list[int] = []
    worker = InferenceWorker(StandIn(), max_batch=2, batch_wait=0.5, on_batch=seen.append)
    # batches, in order: 2 images of 32x32, 2 of 32x32 (same shape), 1 of 64x64 (new), 1 of 32x32 (new)
    jobs = [*_images((32, 32), (32, 32), (32, 32), (32, 32)), *_images((64, 64)), *_images((32, 32))]
    futures = [worker.submit(x, x.shape[:2]) for x in jobs]
    worker.start()
    for f in futures:
        f.result(timeout=60)
    worker.stop()
    assert seen == [2, 2, 1, 1]
    assert trims == [0, 2, 3]  # before the first batch, and before each batch of a new shape


def test_the_free_heap_is_handed_back_between_forwards_of_new_shapes(monkeypatch):
    import offseg.serve.worker as worker_module

    trims: list[int] = []
    monkeypatch.setattr(worker_module, "release_free_heap", lambda: trims.append(len(seen)) or True)
    seen: list[int] = []
    worker = InferenceWorker(StandIn(), max_batch=4, batch_wait=0.5, on_batch=seen.append)
    # 11 queued images: batches of 4, 4 and 3, the last as forwards of 2 and 1
    futures = [worker.submit(x, x.shape[:2]) for x in _images(*[(32, 32)] * 11)]
    worker.start()
    for f in futures:
        f.result(timeout=60)
    worker.stop()
    assert seen == [4, 4, 2, 1]
    assert trims == [0, 2, 3]  # before each forward of another shape than the previous one, within a batch too


def test_release_free_heap_runs_here():
    import platform

    from offseg._heap import release_free_heap

    assert release_free_heap() is (platform.libc_ver()[0] == "glibc")


def test_one_arena_leaves_a_set_environment_alone(monkeypatch):
    import platform

    from offseg._heap import one_arena

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert one_arena() is False  # the environment decides
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert one_arena() is (platform.libc_ver()[0] == "glibc")
