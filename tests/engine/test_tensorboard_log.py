"""`offseg train --log tensorboard`: the JSONL figures also land in TensorBoard event files."""

import json
import math

import pytest

from offseg.cli.main import main
from offseg.data import generate_synthetic_dataset

pytest.importorskip("tensorboard", reason="the optional extra 'tensorboard' is not installed")


def test_train_writes_tensorboard_beside_the_jsonl_log(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = generate_synthetic_dataset(tmp_path / "syn", num_train=4, num_val=2, size=(64, 96))
    work = tmp_path / "run"
    args = ["train", "--model", "offseg-t", "--data", "folder", "--data-root", str(data), "--work-dir", str(work)]
    args += ["--iters", "2", "--batch-size", "2", "--crop", "64", "64", "--workers", "0", "--no-progress"]
    args += ["--val-interval", "1", "--save-interval", "2", "--set", "train.log_interval=1", "--log", "tensorboard"]
    assert main(args) == 0

    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val" in r]
    assert [r["iter"] for r in train_records] == [1, 2] and [r["iter"] for r in val_records] == [1, 2]

    events = list((work / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/mIoU", "val/mAcc", "val/aAcc"} <= tags

    def series(tag):
        return [e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)]

    # the same numbers as the JSONL log (float32 in the event file)
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr")):
        assert series(tag) == ([1, 2], pytest.approx([r[key] for r in train_records], rel=1e-6))
    assert series("val/mIoU") == ([1, 2], pytest.approx([r["val"]["mIoU"] for r in val_records], rel=1e-6))
    class_names = [line.split()[0] for line in (data / "classes.txt").read_text().splitlines() if line.strip()]
    per_class = {tag for tag in tags if tag.startswith("val/IoU/")}
    last_iou = val_records[-1]["val"]["IoU"]
    assert len(last_iou) == len(class_names)
    defined = {f"val/IoU/{name}": iou for name, iou in zip(class_names, last_iou, strict=True) if iou is not None}
    assert defined and set(defined) <= per_class
    for tag, iou in defined.items():
        steps, values = series(tag)
        assert steps[-1] == 2 and math.isclose(values[-1], iou, rel_tol=1e-6)
