"""The real CamVid (skipped when absent): counts, label values, both pipelines; and
reproducibility: seeds, epochs, and DataLoaders with 0 or 2 workers giving the same batches."""

import itertools

import numpy as np
import torch
from datahelpers import make_split_folders
from torch.utils.data import DataLoader, Subset

from offseg.data import InfiniteSampler, build_dataset, read_label, worker_init_fn


def test_camvid_counts(camvid_root):
    counts = {split: len(build_dataset("camvid", camvid_root, split)) for split in ("train", "val", "test")}
    assert counts == {"train": 367, "val": 101, "test": 233}


def test_camvid_label_values(camvid_root):
    ds = build_dataset("camvid", camvid_root, "train", pipeline="test")
    seen = set()
    for index in range(0, len(ds), 37):  # 10 files spread over the sequences
        raw = read_label(ds.samples[index][1])
        assert set(np.unique(raw).tolist()) <= set(range(12))
        _, label = ds.load(index)
        seen |= set(np.unique(label).tolist())
    assert seen <= set(range(11)) | {255} and 255 in seen and len(seen) >= 10


def test_camvid_train_pipeline_shapes(camvid_root):
    ds = build_dataset("camvid", camvid_root, "train", crop_size=(256, 320), seed=0)
    for index in (0, 200):
        item = ds[index]
        assert item["image"].shape == (3, 256, 320) and item["image"].dtype == torch.float32
        assert item["label"].shape == (256, 320) and item["label"].dtype == torch.int64
        values = set(item["label"].unique().tolist())
        assert values <= set(range(11)) | {255}
    default = build_dataset("camvid", camvid_root, "train")
    assert default[0]["image"].shape == (3, 352, 480)


def test_camvid_test_pipeline_keeps_sizes(camvid_root):
    ds = build_dataset("camvid", camvid_root, "val", pipeline="test")
    item = ds[0]
    assert item["image"].shape == (3, 360, 480) and item["label"].shape == (360, 480)
    assert item["ori_size"] == (360, 480)
    # the image is only normalised: undoing it gives the file's pixels back
    from offseg.data import MEAN, STD, read_image

    pixels = read_image(item["image_path"])
    restored = item["image"].permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)
    assert np.abs(restored - pixels).max() < 1e-3


def _tiny(tmp_path, count=8):
    make_split_folders(tmp_path, {"train": count}, values=(0, 1, 2, 3, 4, 5, 6), size=(48, 64), ext=".png")
    return build_dataset("folder", tmp_path, "train", num_classes=7, crop_size=(32, 48), scale=(64, 48), seed=7)


def test_same_seed_same_samples_and_different_seeds_differ(tmp_path):
    ds = _tiny(tmp_path)
    again = build_dataset("folder", tmp_path, "train", num_classes=7, crop_size=(32, 48), scale=(64, 48), seed=7)
    other = build_dataset("folder", tmp_path, "train", num_classes=7, crop_size=(32, 48), scale=(64, 48), seed=8)
    for index in range(4):
        torch.testing.assert_close(ds[index]["image"], again[index]["image"], rtol=0, atol=0)
        assert torch.equal(ds[index]["label"], again[index]["label"])
    assert any(not torch.equal(ds[i]["image"], other[i]["image"]) for i in range(4))


def test_epochs_change_the_augmentation(tmp_path):
    ds = _tiny(tmp_path)
    first = ds[(3, 0)]["image"]
    assert torch.equal(ds[3]["image"], first)  # plain index = epoch 0
    assert not torch.equal(ds[(3, 1)]["image"], first)
    ds.set_epoch(1)
    assert torch.equal(ds[3]["image"], ds[(3, 1)]["image"])


def _batches(dataset, workers, sampler=None, count=4):
    loader = DataLoader(
        dataset,
        batch_size=2,
        shuffle=False,
        sampler=sampler,
        num_workers=workers,
        worker_init_fn=worker_init_fn if workers else None,
    )
    out = []
    for batch in itertools.islice(loader, count):
        out.append((batch["image"], batch["label"], list(batch["image_path"])))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ia, la, pa), (ib, lb, pb) in zip(a, b, strict=True):
        assert pa == pb and torch.equal(ia, ib) and torch.equal(la, lb)


def test_two_workers_give_the_same_batches_as_none(tmp_path):
    ds = _tiny(tmp_path)
    _assert_same(_batches(ds, 0), _batches(ds, 2))
    # the endless sampler carries the epoch: 6 batches of 2 from 8 samples span two epochs
    single = _batches(ds, 0, InfiniteSampler(ds, seed=1), count=6)
    _assert_same(single, _batches(ds, 2, InfiniteSampler(ds, seed=1), count=6))


def test_two_workers_on_camvid(camvid_root):
    ds = Subset(build_dataset("camvid", camvid_root, "train", crop_size=(128, 160), seed=3), range(4))
    _assert_same(_batches(ds, 0, count=2), _batches(ds, 2, count=2))


def test_dataset_pickles_for_spawned_workers(tmp_path):
    import pickle

    ds = _tiny(tmp_path, count=2)
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[(1, 4)]["image"], ds[(1, 4)]["image"])
