"""offseg.predict and `offseg predict`: label PNGs, overlays, folders with a bad file, videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evalhelpers import CAMVID_ROOT, camvid_skip_reason
from PIL import Image

import offseg
from offseg.cli.main import main
from offseg.predict import collect_inputs, fit_scale

CAMVID_IMAGE = CAMVID_ROOT / "val" / "images" / "0016E5_07959.jpg"
needs_camvid_image = pytest.mark.skipif(not CAMVID_IMAGE.is_file(), reason=f"CamVid image not found at {CAMVID_IMAGE}")


def small_rgb(seed=0, size=(40, 52)):
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def test_predict_accepts_array_pil_and_path(standin, tmp_path):
    array = small_rgb()
    path = tmp_path / "a.png"
    Image.fromarray(array).save(path)
    by_array = offseg.predict(standin, array)
    assert by_array.shape == (40, 52) and by_array.dtype == np.int64
    assert by_array.min() >= 0 and by_array.max() < standin.num_classes
    np.testing.assert_array_equal(offseg.predict(standin, Image.fromarray(array)), by_array)
    np.testing.assert_array_equal(offseg.predict(standin, str(path)), by_array)
    # The label map is the argmax of whole inference on the padded, normalised image.
    from offseg.data import normalize_image

    x = normalize_image(array)
    want = standin(torch.nn.functional.pad(x[None], (0, 4, 0, 0)))[0, :, :40, :52].argmax(0)
    np.testing.assert_array_equal(by_array, want.numpy())


def test_predict_sees_what_evaluation_sees(standin):
    # A resized picture: the uint8 image through the test pipeline's OpenCV-exact resize, then
    # normalised, as dataset items are; so predict and eval agree label for label.
    from offseg.data.transforms import TestPipeline
    from offseg.inference import infer
    from offseg.predict import preprocess

    array = small_rgb(2, size=(45, 61))
    x, size = preprocess(array, scale=(32, 24))
    want_x = TestPipeline((32, 24))(array, np.zeros((45, 61), np.uint8))[0]
    assert size == (45, 61) and torch.equal(x, want_x) and x.shape == (3, 24, 32)
    want = infer(standin, want_x[None], mode="whole", out_size=size).argmax(1)[0]
    np.testing.assert_array_equal(offseg.predict(standin, array, scale=(32, 24), fast=False), want.numpy())
    # a normalised tensor is resized as a tensor, to the same size
    assert preprocess(want_x, scale=(16, 12))[0].shape == (3, 12, 16)


def test_predict_options_and_errors(standin, tmp_path):
    array = small_rgb(1)
    assert offseg.predict(standin, array, mode="slide", crop_size=16, stride=8).shape == (40, 52)
    assert offseg.predict(standin, array, tta=True, scales=(0.5, 1.0)).shape == (40, 52)
    assert offseg.predict(standin, array, scale=(32, 16)).shape == (40, 52)
    assert fit_scale(360, 480, (2048, 512)) == (512, 683)
    with pytest.raises(ValueError, match="uint8"):
        offseg.predict(standin, array.astype(np.float32))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="bad.jpg"):
        offseg.predict(standin, bad)
    with pytest.raises(FileNotFoundError):
        offseg.predict(standin, tmp_path / "missing.png")


def test_collect_inputs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/x.jpg", "d/sub/y.PNG", "d/notes.txt", "z.png"):
        (tmp_path / name).write_bytes(b"")
    found = collect_inputs([tmp_path / "d", tmp_path / "z.png"])
    assert [(f.name, str(stem)) for f, stem in found] == [("y.PNG", "sub/y"), ("x.jpg", "x"), ("z.png", "z")]
    with pytest.raises(FileNotFoundError):
        collect_inputs([tmp_path / "nope"])


@needs_camvid_image
def test_cli_writes_label_and_overlay_for_a_camvid_image(tmp_path, capsys):
    # --scale halves the work; the outputs must still come back at the image size.
    code = main(
        [
            "predict",
            "--model",
            "offseg-t",
            "--num-classes",
            "11",
            "--scale",
            "240",
            "180",
            "--no-progress",
            "--out",
            str(tmp_path),
            str(CAMVID_IMAGE),
        ]
    )
    assert code == 0
    label = Image.open(tmp_path / "0016E5_07959.png")
    view = Image.open(tmp_path / "0016E5_07959_overlay.png")
    assert label.mode == "P" and label.size == (480, 360)
    assert view.mode == "RGB" and view.size == (480, 360)
    assert np.asarray(label).max() < 11
    out = capsys.readouterr()
    assert "1 file(s) written" in out.out and "randomly initialised" in out.err


@needs_camvid_image
def test_cli_folder_with_a_corrupt_image(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    source = Image.open(CAMVID_IMAGE)
    source.crop((0, 0, 64, 48)).save(folder / "left.jpg")
    source.crop((200, 100, 264, 164)).save(folder / "middle.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    (folder / "readme.txt").write_text("not an image, not an input")
    out_dir = tmp_path / "out"
    code = main(["predict", "--model", "offseg-t", "--num-classes", "11", "--out", str(out_dir), str(folder)])
    out = capsys.readouterr()
    assert code == 1  # something was skipped
    assert "broken.jpg" in out.err and "skipped" in out.err
    assert "2 file(s) written" in out.out and "1 skipped" in out.out
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "left.png",
        "left_overlay.png",
        "middle.png",
        "middle_overlay.png",
    ]
    assert Image.open(out_dir / "left_overlay.png").size == (64, 48)


def test_cli_refuses_to_overwrite_the_input(tmp_path, capsys):
    Image.fromarray(small_rgb()).save(tmp_path / "pic.png")
    code = main(
        [
            "predict",
            "--model",
            "offseg-t",
            "--num-classes",
            "3",
            "--no-progress",
            "--out",
            str(tmp_path),
            str(tmp_path / "pic.png"),
        ]
    )
    assert code == 1 and "overwrite" in capsys.readouterr().err


def test_cli_missing_input_is_a_one_line_error(tmp_path, capsys):
    code = main(["predict", "--model", "offseg-t", str(tmp_path / "nothing.jpg")])
    assert code == 1
    assert "nothing.jpg" in capsys.readouterr().err


@pytest.mark.skipif(camvid_skip_reason() is not None, reason=str(camvid_skip_reason()))
def test_cli_palette_from_dataset(tmp_path):
    Image.fromarray(small_rgb(size=(32, 32))).save(tmp_path / "p.png")
    assert (
        main(
            [
                "predict",
                "--model",
                "offseg-t",
                "--palette",
                "camvid",
                "--no-progress",
                "--out",
                str(tmp_path / "o"),
                str(tmp_path / "p.png"),
            ]
        )
        == 0
    )
    from offseg.data import dataset_info

    label = Image.open(tmp_path / "o" / "p.png")
    palette = np.asarray(label.getpalette()[: 3 * 11]).reshape(11, 3)
    np.testing.assert_array_equal(palette, np.asarray(dataset_info("camvid").palette)[:11])


def write_test_video(path, frames=3, size=(48, 64)):
    av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(small_rgb(i, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_cli_video_to_overlay_video_and_frames(tmp_path):
    av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    video = tmp_path / "clip.mp4"
    write_test_video(video)
    assert (
        main(
            [
                "predict",
                "--model",
                "offseg-t",
                "--num-classes",
                "4",
                "--no-progress",
                "--out",
                str(tmp_path / "o"),
                str(video),
            ]
        )
        == 0
    )
    with av.open(str(tmp_path / "o" / "clip_overlay.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (48, 64, 3)

    assert (
        main(
            [
                "predict",
                "--model",
                "offseg-t",
                "--num-classes",
                "4",
                "--no-progress",
                "--video-frames",
                "--max-frames",
                "2",
                "--out",
                str(tmp_path / "f"),
                str(video),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "f" / "clip").iterdir()) == [
        "frame_000000.png",
        "frame_000000_overlay.png",
        "frame_000001.png",
        "frame_000001_overlay.png",
    ]
