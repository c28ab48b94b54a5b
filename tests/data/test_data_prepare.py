"""Label converters: Cityscapes labelIds -> trainIds, COCO-Stuff stuffthingmaps -> trainIds."""

import numpy as np
import pytest
from datahelpers import CITYSCAPES_SAMPLE, write_image, write_label

from offseg.cli.main import main
from offseg.data import CITYSCAPES_LABEL_IDS, DatasetError, build_dataset, read_label
from offseg.data.prepare import (
    cityscapes_to_train_ids,
    coco_stuff_to_train_ids,
    prepare_cityscapes,
    prepare_coco_stuff164k,
)


def test_cityscapes_table_spot_checks():
    ids = np.array([[7, 8, 26, 0, 1, 33, 24, 23, 255, 9]], np.uint8)
    np.testing.assert_array_equal(cityscapes_to_train_ids(ids), [[0, 1, 13, 255, 255, 18, 11, 10, 255, 255]])
    train_ids = sorted(t for _, _, t in CITYSCAPES_LABEL_IDS if t != 255)
    assert train_ids == list(range(19))  # every train id exactly once
    with pytest.raises(DatasetError, match="not Cityscapes labelIds"):
        cityscapes_to_train_ids(np.array([[40]], np.uint8))


def test_cityscapes_converter_on_the_real_sample():
    if not CITYSCAPES_SAMPLE.is_dir():
        pytest.skip("Cityscapes sample not available")
    base = CITYSCAPES_SAMPLE / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_"
    converted = cityscapes_to_train_ids(read_label(f"{base}labelIds.png"))
    shipped = read_label(f"{base}labelTrainIds.png")
    # The fixture's two maps were downscaled separately: they disagree on a few edge pixels only.
    assert (converted == shipped).mean() > 0.995
    assert set(np.unique(converted).tolist()) == set(np.unique(shipped).tolist())


def test_coco_stuff_mapping_spot_checks():
    raw = np.array([[0, 10, 11, 12, 24, 25, 26, 90, 91, 181, 182, 255]], np.uint8)
    np.testing.assert_array_equal(coco_stuff_to_train_ids(raw), [[0, 10, 255, 11, 23, 255, 24, 255, 80, 170, 255, 255]])
    table = coco_stuff_to_train_ids(np.arange(256, dtype=np.uint8)[None])[0]
    assert sorted(set(table.tolist()) - {255}) == list(range(171))


def test_prepare_cityscapes_writes_train_ids_then_the_dataset_reads_them(tmp_path):
    for split in ("train", "val"):
        stem = tmp_path / "gtFine" / split / "ulm" / "ulm_000000_000019"
        write_label(stem.with_name(stem.name + "_gtFine_labelIds.png"), (7, 26, 0, 33))
        write_image(tmp_path / "leftImg8bit" / split / "ulm" / "ulm_000000_000019_leftImg8bit.png")
    assert prepare_cityscapes(tmp_path, progress=False) == 2
    ds = build_dataset("cityscapes", tmp_path, "val", pipeline="test")
    assert set(ds[0]["label"].unique().tolist()) == {0, 13, 255, 18}


def test_prepare_coco_stuff_and_cli(tmp_path, capsys):
    for split in ("train2017", "val2017"):
        write_label(tmp_path / "annotations" / split / "000000000139.png", (0, 12, 181, 255))
        write_image(tmp_path / "images" / split / "000000000139.jpg")
    assert main(["data", "prepare", "coco-stuff164k", str(tmp_path), "--no-progress"]) == 0
    assert "wrote 2 train-id label files" in capsys.readouterr().out
    out = read_label(tmp_path / "annotations" / "val2017" / "000000000139_labelTrainIds.png")
    assert set(np.unique(out).tolist()) == {0, 11, 170, 255}
    # running again converts the raw maps only, not its own outputs
    assert prepare_coco_stuff164k(tmp_path, progress=False) == 2
    assert len(build_dataset("coco-stuff164k", tmp_path, "train")) == 1


def test_prepare_with_worker_processes(tmp_path):
    for i in range(3):
        write_label(tmp_path / "gtFine" / "train" / "c" / f"c_{i:06d}_000019_gtFine_labelIds.png", (7, 8))
    assert prepare_cityscapes(tmp_path, workers=2, progress=False) == 3
    assert len(list(tmp_path.rglob("*_gtFine_labelTrainIds.png"))) == 3


def test_prepare_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="gtFine"):
        prepare_cityscapes(tmp_path, progress=False)
    assert main(["data", "prepare", "coco-stuff164k", str(tmp_path), "--no-progress"]) == 1
    assert "annotations folder not found" in capsys.readouterr().err
