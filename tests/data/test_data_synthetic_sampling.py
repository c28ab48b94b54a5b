"""The generated street-scene dataset, and the endless sampler."""

import hashlib
import time

import numpy as np
import pytest

from offseg.cli.main import main
from offseg.data import SYNTHETIC_CLASSES, InfiniteSampler, build_dataset, dataset_info, generate_synthetic_dataset


def digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_synthetic_layout_and_folder_reading(tmp_path):
    start = time.perf_counter()
    generate_synthetic_dataset(tmp_path, num_train=30, num_val=10, size=(64, 96), seed=0)
    assert time.perf_counter() - start < 5
    assert len(list((tmp_path / "train" / "images").glob("*.png"))) == 30
    train = build_dataset("folder", tmp_path, "train")
    val = build_dataset("folder", tmp_path, "val", pipeline="test")
    assert (len(train), len(val)) == (30, 10)
    assert train.class_names == list(SYNTHETIC_CLASSES) and train.num_classes == 8
    np.testing.assert_array_equal(train.palette, dataset_info("synthetic").palette)
    assert train.crop_size == (64, 96)  # folder default: the native size (multiples of 32)
    item = train[0]
    assert item["image"].shape == (3, 64, 96) and item["label"].shape == (64, 96)
    assert val[0]["ori_size"] == (64, 96)
    # every class shows up, none dominates the set
    counts = np.zeros(8, np.int64)
    for index in range(len(train)):
        counts += np.bincount(train.load(index)[1].ravel(), minlength=8)[:8]
    assert (counts > 0).all(), counts
    assert counts.max() / counts.sum() < 0.4


def test_synthetic_is_deterministic_and_prefix_stable(tmp_path):
    generate_synthetic_dataset(tmp_path / "a", num_train=4, num_val=2, size=(48, 64), seed=3)
    generate_synthetic_dataset(tmp_path / "b", num_train=4, num_val=2, size=(48, 64), seed=3)
    generate_synthetic_dataset(tmp_path / "c", num_train=4, num_val=2, size=(48, 64), seed=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    generate_synthetic_dataset(tmp_path / "d", num_train=6, num_val=2, size=(48, 64), seed=3)
    for i in range(4):  # more images extend the set without changing the first ones
        name = f"train/images/{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "d" / name).read_bytes()


def test_synthetic_cli(tmp_path, capsys):
    assert main(["data", "synthetic", str(tmp_path), "--num-train", "2", "--num-val", "1", "--size", "32", "64"]) == 0
    assert "wrote 2 train and 1 val" in capsys.readouterr().out
    assert main(["data", "check", "folder", str(tmp_path), "--no-progress"]) == 0
    assert main(["data", "info", str(tmp_path)]) == 0
    assert "pole" in capsys.readouterr().out


def test_synthetic_rejects_tiny_sizes(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        generate_synthetic_dataset(tmp_path, 1, 1, size=(8, 8))


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_infinite_sampler_epochs_and_resume():
    sampler = InfiniteSampler(5, seed=2)
    stream = take(iter(sampler), 12)
    assert [e for _, e in stream] == [0] * 5 + [1] * 5 + [2] * 2
    assert sorted(i for i, e in stream if e == 0) == list(range(5))
    assert [i for i, e in stream if e == 0] != [i for i, e in stream if e == 1]  # reshuffled per epoch
    assert take(iter(InfiniteSampler(5, seed=2, start=7)), 5) == stream[7:12]
    assert take(iter(InfiniteSampler(5, shuffle=False)), 6) == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (0, 1)]


def test_infinite_sampler_ranks_split_the_stream():
    common = take(iter(InfiniteSampler(7, seed=1)), 12)
    rank0 = take(iter(InfiniteSampler(7, seed=1, rank=0, world_size=2)), 6)
    rank1 = take(iter(InfiniteSampler(7, seed=1, rank=1, world_size=2)), 6)
    assert rank0 == common[0::2] and rank1 == common[1::2]
    assert take(iter(InfiniteSampler(7, seed=1, rank=1, world_size=2, start=2)), 3) == common[5:11:2]


def test_worker_init_fn_puts_opencv_on_one_thread():
    # A DataLoader worker must not take the training step's cores: one OpenCV thread each.
    import cv2

    from offseg.data import worker_init_fn

    before = cv2.getNumThreads()
    try:
        worker_init_fn(0)
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)
