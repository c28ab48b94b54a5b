"""Each dataset's on-disk layout, written small in tmp_path: counts, pairing, label mapping."""

import numpy as np
import pytest
import torch
from datahelpers import (
    ADE20K_SAMPLE,
    make_ade20k,
    make_cityscapes,
    make_coco_stuff,
    make_pascal_context,
    make_split_folders,
    write_image,
    write_label,
)

from offseg.data import build_dataset, dataset_info, read_classes_file, write_classes_file


def labels_of(dataset) -> np.ndarray:
    return np.unique(np.concatenate([dataset.load(i)[1].ravel() for i in range(len(dataset))]))


def test_ade20k_layout_and_reduce_zero_label(tmp_path):
    make_ade20k(tmp_path)
    # the root may be ADEChallengeData2016 or its parent; split names as in the files or short
    train = build_dataset("ade20k", tmp_path, "train")
    val = build_dataset("ade20k", tmp_path / "ADEChallengeData2016", "validation", pipeline="test")
    assert (len(train), len(val)) == (3, 2)
    assert train.num_classes == 150 and len(train.class_names) == 150 and train.palette.shape == (150, 3)
    assert train.ignore_index == 255
    for image_path, label_path in train.samples:  # paired by stem
        assert image_path.stem == label_path.stem
    raw = np.array([0, 1, 2, 150, 255] * 154)[: 24 * 32].reshape(24, 32)
    _, mapped = val.load(0)
    np.testing.assert_array_equal(mapped[raw == 0], 255)
    np.testing.assert_array_equal(mapped[raw == 1], 0)
    np.testing.assert_array_equal(mapped[raw == 150], 149)
    np.testing.assert_array_equal(mapped[raw == 255], 255)


def test_ade20k_real_sample():
    if not ADE20K_SAMPLE.is_dir():
        pytest.skip("ADE20K sample not available")
    ds = build_dataset("ade20k", ADE20K_SAMPLE, "val", pipeline="test")
    assert len(ds) == 3
    sample = ds[0]
    assert sample["ori_size"] == (512, 683)
    assert sample["image"].shape == (3, 512, 683) and sample["label"].shape == (512, 683)
    # raw {0,1,2,3,5,7,10,18} -> {255,0,1,2,4,6,9,17}
    assert set(sample["label"].unique().tolist()) == {255, 0, 1, 2, 4, 6, 9, 17}
    sample = ds[2]  # 400x300, resized to fit (2048, 512): short side 512
    assert sample["ori_size"] == (300, 400) and sample["image"].shape == (3, 512, 683)
    assert sample["label"].shape == (300, 400)


def test_cityscapes_layout_reads_train_ids(tmp_path):
    make_cityscapes(tmp_path)
    ds = build_dataset("cityscapes", tmp_path, "val", pipeline="test")
    assert len(ds) == 4 and ds.num_classes == 19
    for image_path, label_path in ds.samples:
        assert label_path.name == image_path.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
        assert image_path.parent.name == label_path.parent.name  # same city
    assert set(labels_of(ds).tolist()) == {0, 1, 13, 18, 255}
    assert ds[0]["image"].shape == (3, 1024, 1365)  # fit (2048, 1024) keeping 24x32's ratio


def test_coco_stuff_layout_reads_label_train_ids(tmp_path):
    make_coco_stuff(tmp_path)
    train = build_dataset("coco-stuff164k", tmp_path, "train")
    val = build_dataset("coco-stuff164k", tmp_path, "val2017", pipeline="test")
    assert (len(train), len(val)) == (3, 2) and train.num_classes == 171
    assert all(label.name.endswith("_labelTrainIds.png") for _, label in train.samples)
    assert set(labels_of(val).tolist()) == {0, 1, 170, 255}


def test_pascal_context_layout_uses_split_lists(tmp_path):
    voc = make_pascal_context(tmp_path)
    train = build_dataset("pascal-context-59", tmp_path, "train")  # VOCdevkit parent accepted
    val = build_dataset("pascal-context-59", voc, "val", pipeline="test")
    assert (len(train), len(val)) == (2, 1) and train.num_classes == 59
    # 0 -> 255, 1 -> 0, 59 -> 58
    assert set(labels_of(val).tolist()) == {0, 58, 255}
    assert train.crop_size == (480, 480)


def test_camvid_layout_maps_void_to_ignore(tmp_path):
    make_split_folders(tmp_path, values=(0, 3, 10, 11))
    counts = {s: len(build_dataset("camvid", tmp_path, s)) for s in ("train", "val", "test")}
    assert counts == {"train": 3, "val": 2, "test": 1}
    ds = build_dataset("camvid", tmp_path, "val", pipeline="test")
    assert set(labels_of(ds).tolist()) == {0, 3, 10, 255}
    assert ds.class_names[0] == "Sky" and ds.num_classes == 11
    assert ds[0]["image"].shape == (3, 24, 32)  # CamVid test: unchanged size


def test_folder_dataset_classes_from_file_or_count(tmp_path):
    make_split_folders(tmp_path, {"train": 2, "val": 1}, values=(0, 1, 2, 255), ext=".png")
    with pytest.raises(ValueError, match="classes.txt"):
        build_dataset("folder", tmp_path, "train")
    ds = build_dataset("folder", tmp_path, "train", num_classes=3)
    assert ds.class_names == ["class0", "class1", "class2"] and ds.palette.shape == (3, 3)
    write_classes_file(tmp_path / "classes.txt", ["road", "traffic light", "sky"], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    ds = build_dataset("folder", tmp_path, "train")
    assert ds.class_names == ["road", "traffic light", "sky"]
    assert ds.palette.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert ds.crop_size == (32, 32)  # largest /32 crop of the 24x32 images (at least 32)
    sample = ds[0]
    assert sample["image"].shape == (3, 32, 32) and sample["label"].dtype == torch.int64
    # the classes file is also what dataset_info reads for a folder root
    assert dataset_info(tmp_path).class_names == ("road", "traffic light", "sky")


def test_folder_dataset_custom_ignore_value_and_reduce_zero(tmp_path):
    make_split_folders(tmp_path, {"train": 1}, values=(0, 1, 2, 3), ext=".png")
    ds = build_dataset("folder", tmp_path, "train", num_classes=4, ignore_index=0, reduce_zero_label=False)
    assert set(labels_of(ds).tolist()) == {255, 1, 2, 3}  # raw 0 is ignored, the other ids stay
    ds = build_dataset("folder", tmp_path, "train", num_classes=3, reduce_zero_label=True)
    assert set(labels_of(ds).tolist()) == {255, 0, 1, 2}


def test_classes_file_format(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("// comment\nroad #804080\n\nbig tree\nsky #4682B4\n")
    names, palette = read_classes_file(path)
    assert names == ["road", "big tree", "sky"] and palette is None  # not every class has a colour


def test_palette_label_pngs_are_read_as_indices(tmp_path):
    from PIL import Image

    make_split_folders(tmp_path, {"train": 1}, values=(0,), ext=".png")
    label = Image.frombytes("P", (32, 24), np.full((24, 32), 2, np.uint8).tobytes())
    label.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    label.save(tmp_path / "train" / "labels" / "f000.png")
    ds = build_dataset("folder", tmp_path, "train", num_classes=3)
    assert set(labels_of(ds).tolist()) == {2}


def test_16_bit_labels_with_small_values_are_accepted(tmp_path):
    from PIL import Image

    make_split_folders(tmp_path, {"train": 1}, values=(0,), ext=".png")
    Image.fromarray(np.full((24, 32), 4, np.uint16)).save(tmp_path / "train" / "labels" / "f000.png")
    ds = build_dataset("folder", tmp_path, "train", num_classes=5)
    assert set(labels_of(ds).tolist()) == {4}


def test_options_defaults_and_overrides(tmp_path):
    make_ade20k(tmp_path)
    ds = build_dataset("ade20k", tmp_path, "train")
    assert ds.transform.scale == (2048, 512) and ds.crop_size == (512, 512)
    ds = build_dataset("ade20k", tmp_path, "train", crop_size=64, scale=(128, 32), seed=5)
    assert ds.crop_size == (64, 64) and ds.transform.scale == (128, 32) and ds.seed == 5
    assert ds[0]["image"].shape == (3, 64, 64)
    ds = build_dataset("ade20k", tmp_path, "val", pipeline="test", scale=(64, 48))
    assert ds[0]["image"].shape == (3, 48, 64)  # an explicit scale is the test scale too
    ds = build_dataset("ade20k", tmp_path, "val", pipeline="test", test_scale=None)
    assert ds[0]["image"].shape == (3, 24, 32)
    ds.set_test_scale((16, 12))  # e.g. the test scale a checkpoint records, without listing the files again
    assert ds[0]["image"].shape == (3, 12, 16) and ds[0]["label"].shape == (24, 32)
    with pytest.raises(ValueError, match="test pipeline"):
        build_dataset("ade20k", tmp_path, "train").set_test_scale((16, 12))
    with pytest.raises(ValueError, match="unknown dataset option"):
        build_dataset("ade20k", tmp_path, "train", crop=(4, 4))
    with pytest.raises(ValueError, match="150 classes"):
        build_dataset("ade20k", tmp_path, "train", num_classes=151)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("mapillary", tmp_path, "train")
    with pytest.raises(ValueError, match="pipeline"):
        build_dataset("ade20k", tmp_path, "train", pipeline="eval")


def test_dataset_info_without_files():
    for name, count in [
        ("ade20k", 150),
        ("cityscapes", 19),
        ("coco-stuff164k", 171),
        ("pascal-context-59", 59),
        ("camvid", 11),
        ("synthetic", 8),
    ]:
        info = dataset_info(name)
        assert len(info.class_names) == count and np.asarray(info.palette).shape == (count, 3)
    assert dataset_info("cityscapes").palette[0].tolist() == [128, 64, 128]  # road
    assert dataset_info("ADE20K").class_names[:3] == ("wall", "building", "sky")
    assert dataset_info("coco-stuff164k").class_names[-1] == "wood"
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_info("nope")


def test_items_of_each_pipeline(tmp_path):
    make_split_folders(tmp_path, {"train": 1}, values=(0, 1), size=(40, 50), ext=".png")
    ds = build_dataset("folder", tmp_path, "train", num_classes=2, crop_size=(64, 64))
    item = ds[0]
    assert set(item) == {"image", "label", "image_path", "label_path"}
    assert isinstance(item["image_path"], str) and item["image_path"].endswith("f000.png")
    test_item = build_dataset("folder", tmp_path, "train", pipeline="test", num_classes=2)[0]
    assert set(test_item) == {"image", "label", "image_path", "label_path", "ori_size"}
    assert test_item["ori_size"] == (40, 50) and test_item["label"].shape == (40, 50)
    write_image(tmp_path / "train" / "images" / "g.png", size=(40, 50))
    write_label(tmp_path / "train" / "labels" / "g.png", (1,), size=(40, 50))
    assert len(build_dataset("folder", tmp_path, "train", num_classes=2)) == 2


def test_camvid_void_value_can_be_changed(tmp_path):
    make_split_folders(tmp_path, {"train": 1}, values=(0, 10, 11))
    assert set(labels_of(build_dataset("camvid", tmp_path, "train")).tolist()) == {0, 10, 255}
    with pytest.raises(ValueError, match="label values 11"):
        build_dataset("camvid", tmp_path, "train", ignore_index=255)[0]  # no void value: 11 is no class
