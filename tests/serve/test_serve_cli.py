"""`offseg serve` itself: the command starts a server (a real process) that answers, and bad
options are refused in one line before anything is built."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from servehelpers import TEST_SCALE, free_socket

from offseg.cli.main import main


def test_offseg_serve_starts_answers_and_stops(serve_checkpoint):
    with free_socket() as sock:
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "offseg.cli.main", "serve", "--model", "offseg-t"]
    command += [
        "--checkpoint",
        str(serve_checkpoint),
        "--port",
        str(port),
        "--max-batch",
        "2",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "offseg serve did not come up within 120 s"
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/model").json()["test_scale"] == list(TEST_SCALE)
        page = httpx.get(url + "/")
        assert page.status_code == 200 and '<script src="/static/app.js">' in page.text
        # offline: nothing on the page is fetched from another host (no CDN, no external fonts)
        for text in (page.text, *(httpx.get(url + asset).text for asset in ("/static/app.js", "/static/style.css"))):
            assert text and "http://" not in text and "https://" not in text
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "test scale 240x180" in stderr


@pytest.mark.parametrize(
    "options, message",
    [(["--max-batch", "0"], "--max-batch must be at least 1"), (["--mode", "slide"], "--mode slide needs --crop")],
)
def test_bad_options_are_one_line_errors(options, message, capsys):
    assert main(["serve", "--model", "offseg-t", "--num-classes", "4", *options]) == 1
    assert message in capsys.readouterr().err
