"""What the service tests share: a briefly trained checkpoint, a real server on a free port of
127.0.0.1 in a background thread, the correctness rule of issue 18, and where CamVid lives."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CAMVID_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "camvid"
if not CAMVID_ROOT.is_dir():
    CAMVID_ROOT = Path("/work/shared/data/camvid")

# CamVid pictures are 480x360 here; the test checkpoint records half that as its test scale, which
# keeps the forwards of the suite short.
TEST_SCALE = (240, 180)

# The limits of the shared test server: CamVid's 480x360 pictures (172 800 pixels, under 100 kB)
# pass, the bad-input tests go over them.
MAX_BODY_BYTES = 1_000_000
MAX_PIXELS = 200_000


def camvid_images(count: int) -> list[Path]:
    return sorted((CAMVID_ROOT / "test" / "images").glob("*.jpg"))[:count]


def train_briefly(path: Path, iterations: int = 24, seed: int = 0) -> Path:
    """OffSeg-T trained for a few dozen iterations on generated street scenes and saved in the own
    format (class names, palette, test scale): enough to leave the near-tie regime of random weights."""
    import offseg
    from offseg.data import SYNTHETIC_CLASSES
    from offseg.data.synthetic import render_scene
    from offseg.data.transforms import normalize_array

    torch.manual_seed(seed)
    scenes = [render_scene(np.random.default_rng([seed, i]), 64, 96) for i in range(8)]
    images = torch.stack([torch.from_numpy(normalize_array(image)) for image, _ in scenes])
    labels = torch.stack([torch.from_numpy(label.astype(np.int64)) for _, label in scenes])
    model = offseg.create_model("offseg-t", num_classes=len(SYNTHETIC_CLASSES)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(iterations):
        batch = [(step * 4 + j) % len(scenes) for j in range(4)]
        loss = F.cross_entropy(model(images[batch]), labels[batch], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().test_scale = list(TEST_SCALE)
    return offseg.save_pretrained(model, path, dataset="synthetic")


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port of 127.0.0.1 in a thread; yields the base URL."""
    import uvicorn

    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def reference_labels(model, image, scale, margin: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """`offseg.predict(model, image)` at `scale`, and where the top-two class scores of that
    computation differ by more than `margin` (the pixels issue 18's correctness rule covers)."""
    import offseg
    from offseg.inference import infer
    from offseg.optimize import fast_model_for
    from offseg.predict import preprocess

    expected = offseg.predict(model, image, scale=scale)
    x, size = preprocess(image, scale)
    with torch.no_grad():
        scores = infer(fast_model_for(model), x[None], out_size=size)
    top2 = scores.topk(2, dim=1).values[0]
    return expected, (top2[0] - top2[1] > margin).numpy()


def assert_same_labels(served: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """Issue 18's correctness rule: wherever the top-two class scores differ by more than the margin,
    the served label equals offseg.predict's (`reference` from `reference_labels`). Returns the share
    of pixels the rule covers."""
    expected, decided = reference
    assert served.shape == expected.shape, f"label map {served.shape}, expected {expected.shape}"
    wrong = decided & (served != expected)
    assert not wrong.any(), f"{int(wrong.sum())} decided pixels differ from offseg.predict"
    return float(decided.mean())
