"""Clear errors naming the file, at build time and read time, and `check` finding every
problem in one pass."""

import numpy as np
import pytest
from datahelpers import make_ade20k, make_cityscapes, make_coco_stuff, make_split_folders, write_image, write_label
from PIL import Image

from offseg.cli.main import main
from offseg.data import DatasetError, build_dataset, check_dataset


def test_missing_root_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        build_dataset("camvid", tmp_path / "nowhere", "train")
    make_split_folders(tmp_path, {"train": 1})
    with pytest.raises(FileNotFoundError, match=r"split folder 'val'.*found there: train"):
        build_dataset("camvid", tmp_path, "val")
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="images folder"):
        build_dataset("camvid", tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="ADE20K train images folder"):
        build_dataset("ade20k", tmp_path, "train")


def test_unpaired_files_name_both_sides(tmp_path):
    make_split_folders(tmp_path, {"train": 2})
    write_image(tmp_path / "train" / "images" / "lonely.jpg")
    write_label(tmp_path / "train" / "labels" / "orphan.png", (0,))
    with pytest.raises(DatasetError) as err:
        build_dataset("camvid", tmp_path, "train")
    message = str(err.value)
    assert "2 file problem(s)" in message
    assert "lonely.jpg: image without label" in message and "labels/lonely.png" in message
    assert "orphan.png: label without image" in message


def test_two_images_with_one_stem(tmp_path):
    make_split_folders(tmp_path, {"train": 1})
    write_image(tmp_path / "train" / "images" / "f000.png")
    with pytest.raises(DatasetError, match="same name stem"):
        build_dataset("camvid", tmp_path, "train")


def test_corrupt_image_is_named_when_read(tmp_path):
    make_split_folders(tmp_path, {"train": 2})
    bad = tmp_path / "train" / "images" / "f001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    ds = build_dataset("camvid", tmp_path, "train")
    ds[0]
    with pytest.raises(DatasetError, match=r"f001\.jpg: cannot read image"):
        ds[1]
    (tmp_path / "train" / "images" / "f000.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"f000\.jpg: cannot read image"):
        ds[0]


def test_size_mismatch_is_named(tmp_path):
    make_split_folders(tmp_path, {"train": 1})
    write_label(tmp_path / "train" / "labels" / "f000.png", (0,), size=(20, 32))
    with pytest.raises(DatasetError, match=r"f000\.png: label is 32x20 but its image .*f000\.jpg is 32x24"):
        build_dataset("camvid", tmp_path, "train")[0]


@pytest.mark.parametrize(
    "name, maker, label_rel, values, bad",
    [
        ("camvid", make_split_folders, "train/labels/f000.png", (0, 12), "12"),
        ("ade20k", make_ade20k, "ADEChallengeData2016/annotations/training/ADE_training_a.png", (0, 151), "151"),
        (
            "cityscapes",
            make_cityscapes,
            "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png",
            (0, 19, 200),
            "19, 200",
        ),
        ("coco-stuff164k", make_coco_stuff, "annotations/train2017/000000000000_labelTrainIds.png", (171,), "171"),
    ],
)
def test_bad_label_values_are_named(tmp_path, name, maker, label_rel, values, bad):
    maker(tmp_path)
    write_label(tmp_path / label_rel, values)
    ds = build_dataset(name, tmp_path, "train")
    index = [str(label) for _, label in ds.samples].index(str(tmp_path / label_rel))
    with pytest.raises(DatasetError, match=f"{label_rel.split('/')[-1]}: label values {bad} are not valid"):
        ds[index]


def test_colour_label_is_refused(tmp_path):
    make_split_folders(tmp_path, {"train": 1})
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "train" / "labels" / "f000.png")
    with pytest.raises(DatasetError, match="single-channel"):
        build_dataset("camvid", tmp_path, "train")[0]


def test_cityscapes_without_train_ids_points_to_prepare(tmp_path):
    make_cityscapes(tmp_path)
    for path in tmp_path.rglob("*_labelTrainIds.png"):
        path.unlink()
    with pytest.raises(DatasetError, match="offseg data prepare cityscapes"):
        build_dataset("cityscapes", tmp_path, "train")


def test_coco_stuff_without_train_ids_points_to_prepare(tmp_path):
    make_coco_stuff(tmp_path)
    for path in tmp_path.rglob("*_labelTrainIds.png"):
        path.unlink()
    with pytest.raises(DatasetError, match="offseg data prepare coco-stuff164k"):
        build_dataset("coco-stuff164k", tmp_path, "val")


def _broken_camvid(root):
    make_split_folders(root, {"train": 5, "val": 1})
    labels, images = root / "train" / "labels", root / "train" / "images"
    write_image(images / "lonely.jpg")  # 1 image without label
    write_label(labels / "orphan.png", (0,))  # 2 label without image
    (images / "f001.jpg").write_bytes(b"garbage")  # 3 corrupt image
    write_label(labels / "f002.png", (0,), size=(10, 10))  # 4 size mismatch
    write_label(labels / "f003.png", (0, 1, 42, 99))  # 5 bad values
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(labels / "f004.png")  # 6 colour label
    return root


def test_check_reports_every_problem_in_one_pass(tmp_path):
    report = check_dataset("camvid", _broken_camvid(tmp_path))
    text = "\n".join(report.problems)
    assert not report.ok and len(report.problems) == 6, text
    for expected in (
        "lonely.jpg: image without label",
        "orphan.png: label without image",
        "f001.jpg: cannot read image",
        "f002.png: label is 10x10 but its image",
        "f003.png: label values 42, 99",
        "f004.png: label must be a single-channel",
    ):
        assert expected in text
    assert report.checked == {"train": 5, "val": 1}
    assert any("'test'" in note for note in report.skipped)  # an absent usual split is only noted


def test_check_explicit_missing_split_and_root(tmp_path):
    make_split_folders(tmp_path, {"train": 1})
    assert not check_dataset("camvid", tmp_path, split="val").ok
    assert check_dataset("camvid", tmp_path, split="train").ok
    assert "dataset root not found" in check_dataset("camvid", tmp_path / "missing").problems[0]


def test_check_cli_exit_codes(tmp_path, capsys):
    _broken_camvid(tmp_path / "bad")
    assert main(["data", "check", "camvid", str(tmp_path / "bad"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("problem: ") == 6 and "6 problem(s)" in captured.err
    make_split_folders(tmp_path / "good", {"train": 2, "val": 1, "test": 1})
    assert main(["data", "check", "camvid", str(tmp_path / "good"), "--no-progress"]) == 0
    assert "OK (train 2, val 1, test 1" in capsys.readouterr().out
    make_split_folders(tmp_path / "folder", {"train": 1}, values=(0, 1))
    assert main(["data", "check", "folder", str(tmp_path / "folder"), "--num-classes", "2", "--no-progress"]) == 0
    assert main(["data", "check", "folder", str(tmp_path / "folder"), "--num-classes", "1", "--no-progress"]) == 1


def test_build_errors_are_one_line_cli_errors(tmp_path, capsys):
    assert main(["data", "check", "camvid", str(tmp_path / "nope"), "--no-progress"]) == 1
    assert "dataset root not found" in capsys.readouterr().out


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "labels").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no image/label pairs"):
        build_dataset("camvid", tmp_path, "train")
    assert "no image/label pairs" in check_dataset("camvid", tmp_path, split="train").problems[0]
