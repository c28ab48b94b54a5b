"""The API of `offseg serve` on a real server (127.0.0.1, free port): model card, /v1/segment on
real CamVid pictures checked against offseg.predict, both PNG formats, 16 concurrent clients."""

from __future__ import annotations

import base64
import io
import re
import threading

import httpx
import numpy as np
from PIL import Image
from servehelpers import TEST_SCALE, assert_same_labels, camvid_images, reference_labels

from offseg.data import SYNTHETIC_CLASSES, dataset_info


def test_model_card(server_url, trained_model):
    card = httpx.get(f"{server_url}/v1/model").json()
    assert card["model"] == "offseg-t" and card["num_classes"] == len(SYNTHETIC_CLASSES)
    palette = dataset_info("synthetic").palette
    assert [c["name"] for c in card["classes"]] == list(SYNTHETIC_CLASSES)
    assert [c["color"] for c in card["classes"]] == [list(map(int, p)) for p in palette]
    assert card["test_scale"] == list(TEST_SCALE)  # recorded in the checkpoint
    assert card["test_mode"] == {"mode": "whole", "crop_size": None, "stride": None}
    assert card["parameters"] == sum(p.numel() for p in trained_model.parameters())
    assert card["flops"]["gflops_paper"] > 0 and card["flops"]["gflops_full"] >= card["flops"]["gflops_paper"]
    assert httpx.get(f"{server_url}/healthz").json()["status"] == "ok"


def test_segment_matches_predict_and_both_pngs_decode(server_url, trained_model, camvid):
    path = camvid_images(1)[0]
    image = Image.open(path).convert("RGB")
    # raw body, JSON answer
    answer = httpx.post(f"{server_url}/v1/segment", content=path.read_bytes()).json()
    assert answer["model"] == "offseg-t" and answer["input_size"] == [image.height, image.width]
    assert answer["inference_size"] == [180, 240]
    labels = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["labels_png"]))))
    covered = assert_same_labels(labels, reference_labels(trained_model, image, TEST_SCALE))
    assert covered > 0.9, f"only {covered:.1%} of the pixels are out of the near-tie regime"
    counts = np.bincount(labels.ravel(), minlength=len(SYNTHETIC_CLASSES))
    assert {c["id"]: c["pixels"] for c in answer["classes"]} == {k: int(counts[k]) for k in np.flatnonzero(counts)}
    assert abs(sum(c["fraction"] for c in answer["classes"]) - 1) < 1e-9
    assert set(answer["timing_ms"]) == {"decode", "queue", "inference"} and answer["batch_size"] >= 1
    # multipart upload, ?format=labels: the label PNG itself, same labels
    response = httpx.post(f"{server_url}/v1/segment?format=labels", files={"image": (path.name, path.read_bytes())})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(response.content))), labels)
    # ?format=overlay: an RGB picture of the input's size
    response = httpx.post(f"{server_url}/v1/segment?format=overlay", content=path.read_bytes())
    overlay = Image.open(io.BytesIO(response.content))
    assert response.headers["content-type"] == "image/png" and overlay.mode == "RGB" and overlay.size == image.size


def _batch_histogram(metrics: str) -> tuple[float, float]:
    single = float(re.search(r'^offseg_batch_size_bucket\{le="1.0"\} (\S+)$', metrics, re.M).group(1))
    count = float(re.search(r"^offseg_batch_size_count (\S+)$", metrics, re.M).group(1))
    return single, count


def test_sixteen_concurrent_clients_are_all_answered_correctly_in_batches(server_url, trained_model, camvid):
    distinct = camvid_images(4)
    paths = distinct * 4  # 16 requests; 4 pictures keep the reference computation short
    before = _batch_histogram(httpx.get(f"{server_url}/metrics").text)
    start = threading.Barrier(len(paths))
    answers: list = [None] * len(paths)

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as http:
            start.wait()
            answers[i] = http.post(f"{server_url}/v1/segment?format=labels", content=paths[i].read_bytes())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [200] * len(paths)
    for i, path in enumerate(distinct):
        reference = reference_labels(trained_model, Image.open(path).convert("RGB"), TEST_SCALE)
        for answer in answers[i :: len(distinct)]:
            assert_same_labels(np.asarray(Image.open(io.BytesIO(answer.content))), reference)
    metrics = httpx.get(f"{server_url}/metrics").text
    single, count = (now - then for now, then in zip(_batch_histogram(metrics), before, strict=True))
    assert count < len(paths) and single < count, f"{count} batches for 16 requests, {single} of them single"
    assert 'offseg_requests_total{path="/v1/segment",status="200"}' in metrics
    assert "offseg_queue_depth 0.0" in metrics and "offseg_segment_latency_seconds_bucket" in metrics
