"""Every bad input gets a 4xx JSON error naming the problem and the server keeps serving; a full
queue answers 503 with Retry-After."""

from __future__ import annotations

import dataclasses
import io
import socket
import struct
import threading
import time
import zlib
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch.nn as nn
from PIL import Image
from servehelpers import MAX_BODY_BYTES, MAX_PIXELS, running_server


def _png_header(width: int, height: int) -> bytes:
    """The start of a PNG that claims width x height pixels, then compressed zeros: a decompression
    bomb (a few hundred bytes that would decode to width x height x 3 bytes)."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 100_000)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr) - 4)
        + ihdr
        + struct.pack(">I", zlib.crc32(ihdr))
        + struct.pack(">I", len(data))
        + b"IDAT"
        + data
    )


def _small_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)  # a few kB of data
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _raw_request(url: str, head: str, body_parts: list[bytes]) -> tuple[int, bytes]:
    """Send a request by hand (to control what is sent, and how much); returns (status, body)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head.encode("latin-1"))
        try:
            for part in body_parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):  # the server answered and closed early
            pass
        received = b""
        while b"\r\n\r\n" not in received and (chunk := sock.recv(65536)):
            received += chunk
        head_part, body = received.split(b"\r\n\r\n", 1)
        length = int(
            next(line.split(b":")[1] for line in head_part.lower().split(b"\r\n") if line.startswith(b"content-length"))
        )
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
    return int(head_part.split(b" ", 2)[1]), body


def _segment_works(url: str) -> None:
    response = httpx.post(f"{url}/v1/segment", content=_small_jpeg(), timeout=60)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("not an image", 415, "not an image"),
        ("truncated image", 400, "truncated or corrupt JPEG"),
        ("empty body", 400, "empty body"),
        ("over --max-pixels (header only)", 413, f"over the limit of {MAX_PIXELS}"),
        ("decompression bomb past PIL's own limit", 413, "image too large"),
        ("unsupported format", 400, "unsupported format 'jpeg'"),
        ("wrong method", 405, "method GET not allowed"),
        ("wrong path", 404, "no such path: /v2/segment"),
    ],
)
def test_bad_input_is_a_4xx_json_error_and_the_server_keeps_serving(server_url, case, status, words):
    segment = f"{server_url}/v1/segment"
    jpeg = _small_jpeg()
    if case == "not an image":
        response = httpx.post(segment, content=b"%PDF-1.4 this is no picture" * 10)
    elif case == "truncated image":
        response = httpx.post(segment, content=jpeg[: len(jpeg) * 3 // 4])  # headers whole, scan data cut
    elif case == "empty body":
        response = httpx.post(segment, content=b"")
    elif case == "over --max-pixels (header only)":
        response = httpx.post(segment, content=_png_header(1000, 1000))
    elif case == "decompression bomb past PIL's own limit":
        response = httpx.post(segment, content=_png_header(60000, 60000))
    elif case == "unsupported format":
        response = httpx.post(f"{segment}?format=jpeg", content=jpeg)
    elif case == "wrong method":
        response = httpx.get(segment)
    else:
        response = httpx.post(f"{server_url}/v2/segment", content=jpeg)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"] and response.json()["status"] == status
    _segment_works(server_url)


def test_multipart_without_a_file_is_refused(server_url):
    body = b'--XYZ\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--XYZ--\r\n'
    response = httpx.post(
        f"{server_url}/v1/segment", content=body, headers={"content-type": "multipart/form-data; boundary=XYZ"}
    )
    assert response.status_code == 400 and "without a file field" in response.json()["error"]


def test_body_over_the_limit_is_refused_before_it_is_read(server_url):
    # Content-Length says 50 MB; only the headers and 10 bytes are sent, and the answer comes anyway.
    head = (
        "POST /v1/segment HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {50 * MAX_BODY_BYTES}\r\n\r\n"
    )
    started = time.perf_counter()
    status, body = _raw_request(server_url, head, [b"\xff\xd8\xff\xe0" + b"\0" * 6])
    assert status == 413 and b"body too large" in body and b"--max-body-mb" in body
    assert time.perf_counter() - started < 10
    # Without Content-Length (chunked): refused as soon as the bytes received pass the limit.
    head = "POST /v1/segment HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"\0" * 65536
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (2 * MAX_BODY_BYTES // len(chunk) + 1) + [b"0\r\n\r\n"]
    status, body = _raw_request(server_url, head, parts)
    assert status == 413 and b"body too large" in body
    _segment_works(server_url)


class _Slowed(nn.Module):
    """The served network, made slow on purpose so that requests pile up."""

    def __init__(self, runner: nn.Module, seconds: float) -> None:
        super().__init__()
        self.runner, self.seconds = runner, seconds
        self.size_divisor = runner.size_divisor

    def forward(self, x):
        time.sleep(self.seconds)
        return self.runner(x)


def test_full_queue_answers_503_with_retry_after(served):
    from offseg.serve import ServeSettings, create_app

    slow = dataclasses.replace(served, runner=_Slowed(served.runner, 0.5))
    app = create_app(slow, ServeSettings(max_batch=1, queue=1, batch_wait=0))
    jpeg = _small_jpeg()
    with running_server(app) as url:
        start = threading.Barrier(5)
        responses: list = [None] * 5

        def client(i: int) -> None:
            with httpx.Client(timeout=60) as http:
                start.wait()
                responses[i] = http.post(f"{url}/v1/segment", content=jpeg)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(r.status_code for r in responses)
        # one running, one waiting: at least three of five refused, the others answered
        assert set(statuses) == {200, 503} and statuses.count(503) >= 3, statuses
        for refused in (r for r in responses if r.status_code == 503):
            assert int(refused.headers["retry-after"]) >= 1
            assert "server busy" in refused.json()["error"] and "--queue" in refused.json()["error"]
        _segment_works(url)
        assert 'offseg_requests_total{path="/v1/segment",status="503"}' in httpx.get(f"{url}/metrics").text
