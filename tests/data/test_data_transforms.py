"""The pipeline steps: normalisation, MMCV's resize rules, OpenCV-exact colour maths, the
crop's class-ratio rule, padding, and the whole train/test pipelines."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offseg.data import MEAN, STD, TestPipeline, TrainPipeline, normalize_image
from offseg.data.transforms import (
    adjust_colours,
    fit_size,
    hsv_to_rgb,
    pad_to,
    photometric_distortion,
    random_crop,
    random_flip,
    random_resize,
    resize_image,
    resize_label,
    rgb_to_hsv,
)

REFERENCE = np.load(Path(__file__).with_name("opencv_reference.npz"))


def test_normalize_image_matches_mean_std_and_accepts_pil():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = normalize_image(pixels)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 7)
    expected = (pixels.astype(np.float64) - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    torch.testing.assert_close(normalize_image(Image.fromarray(pixels)), out)
    torch.testing.assert_close(normalize_image(Image.fromarray(pixels).convert("RGBA")), out)
    assert MEAN == (123.675, 116.28, 103.53) and STD == (58.395, 57.12, 57.375)


@pytest.mark.parametrize(
    "hw, scale, expected",
    [
        ((512, 683), (2048, 512), (512, 683)),  # ADE20K: short side 512
        ((300, 400), (2048, 512), (512, 683)),  # upscaled, rounded half up
        ((1024, 2048), (2048, 1024), (1024, 2048)),
        ((200, 2000), (2048, 512), (205, 2048)),  # the long side limits
        ((375, 500), (520, 520), (390, 520)),  # Pascal Context
    ],
)
def test_fit_size_follows_mmcv_rescale(hw, scale, expected):
    assert fit_size(*hw, scale) == expected


def test_rgb_to_hsv_is_opencv_exact():
    np.testing.assert_array_equal(rgb_to_hsv(REFERENCE["colours"]), REFERENCE["colours_hsv"])


def test_photometric_steps_match_mmsegmentation_with_opencv():
    # OpenCV outputs of MMSegmentation's steps with fixed parameters (make_opencv_reference.py)
    for case, expected in zip(REFERENCE["cases"], REFERENCE["photometric"], strict=True):
        b, c, s, h, first = [None if np.isnan(v) else float(v) for v in case]
        out = adjust_colours(REFERENCE["image"], b, c, s, None if h is None else int(h), bool(first))
        np.testing.assert_array_equal(out, expected, err_msg=f"case {case}")


def test_hsv_round_trip_of_greys_and_primaries_is_exact():
    colours = np.array([[[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    np.testing.assert_array_equal(hsv_to_rgb(rgb_to_hsv(colours)), colours)


def test_resize_is_opencv_exact():
    for h, w in REFERENCE["sizes"]:
        linear = resize_image(REFERENCE["image"], (int(h), int(w)))
        assert linear.shape == (h, w, 3) and linear.dtype == np.uint8
        np.testing.assert_array_equal(linear, REFERENCE[f"linear_{h}x{w}"])
        np.testing.assert_array_equal(resize_label(REFERENCE["label"], (int(h), int(w))), REFERENCE[f"nearest_{h}x{w}"])


def test_photometric_distortion_is_a_function_of_the_generator():
    image = REFERENCE["image"]
    a = photometric_distortion(image, np.random.default_rng(3))
    b = photometric_distortion(image, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    outputs = {photometric_distortion(image, np.random.default_rng(s)).tobytes() for s in range(12)}
    assert len(outputs) > 8  # each step has p = 0.5: most seeds change something different


def test_random_resize_ratio_range_and_aspect():
    image = np.zeros((360, 480, 3), np.uint8)
    label = np.zeros((360, 480), np.uint8)
    heights = []
    for seed in range(40):
        out, lab = random_resize(image, label, np.random.default_rng(seed), (480, 360))
        assert out.shape[:2] == lab.shape
        assert abs(out.shape[1] / out.shape[0] - 480 / 360) < 0.02
        heights.append(out.shape[0])
    assert 180 <= min(heights) < 260 and 560 < max(heights) <= 720


def test_random_crop_avoids_single_class_crops():
    # Left 70% of the label is class 0, the right 30% class 1: a quarter of the crop positions
    # hold both with neither above 75%; the rule retries (10 times) until it finds one.
    label = np.zeros((64, 200), np.uint8)
    label[:, 140:] = 1
    image = np.zeros((64, 200, 3), np.uint8)
    hits = 0
    for seed in range(20):
        _, crop = random_crop(image, label, np.random.default_rng(seed), (64, 64), cat_max_ratio=0.75)
        counts = np.bincount(crop.ravel(), minlength=2)
        hits += counts[1] > 0 and counts.max() / counts.sum() < 0.75
    assert hits >= 15
    plain = 0  # without the rule, about a quarter
    for seed in range(20):
        _, crop = random_crop(image, label, np.random.default_rng(seed), (64, 64), cat_max_ratio=1.0)
        counts = np.bincount(crop.ravel(), minlength=2)
        plain += counts.max() / counts.sum() < 0.75
    assert plain < 10


def test_random_crop_ignores_the_ignore_index_when_counting():
    label = np.full((32, 32), 255, np.uint8)
    label[:, :16] = 3
    label[:, 16:18] = 4  # labelled pixels: 512 of class 3, 64 of class 4 -> 89% class 3
    _, crop = random_crop(np.zeros((32, 32, 3), np.uint8), label, np.random.default_rng(0), (32, 32))
    assert crop.shape == (32, 32)  # no valid crop exists; after 10 retries one is kept anyway


def test_flip_moves_image_and_label_together():
    label = np.tile(np.arange(16, dtype=np.uint8), (4, 1))
    image = np.repeat(label[:, :, None], 3, axis=2)
    for seed in range(6):
        out, lab = random_flip(image, label, np.random.default_rng(seed))
        np.testing.assert_array_equal(out[..., 0], lab)


def test_pad_to_uses_zero_and_ignore():
    image, label = torch.ones(3, 5, 6), torch.zeros(5, 6, dtype=torch.int64)
    padded, padded_label = pad_to(image, label, (8, 10))
    assert padded.shape == (3, 8, 10) and padded_label.shape == (8, 10)
    assert padded[:, 5:].abs().sum() == 0 and padded[:, :, 6:].abs().sum() == 0
    assert (padded_label[5:] == 255).all() and (padded_label[:, 6:] == 255).all() and (padded_label[:5, :6] == 0).all()


def test_train_pipeline_output_and_padding():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (40, 60), dtype=np.uint8)
    pipeline = TrainPipeline(crop_size=(64, 96), scale=(60, 40), ratio_range=(0.5, 0.5))
    out, lab = pipeline(image, label, np.random.default_rng(1))
    assert out.shape == (3, 64, 96) and out.dtype == torch.float32
    assert lab.shape == (64, 96) and lab.dtype == torch.int64
    # resized to 20x30 then padded: outside is 0 / 255
    assert (lab[20:] == 255).all() and (lab[:, 30:] == 255).all() and (lab[:20, :30] < 5).all()
    assert out[:, 20:].abs().sum() == 0


def test_test_pipeline_resizes_image_only():
    image = np.zeros((30, 40, 3), np.uint8)
    label = np.ones((30, 40), np.uint8)
    out, lab = TestPipeline((80, 60))(image, label)
    assert out.shape == (3, 60, 80) and lab.shape == (30, 40)
    out, lab = TestPipeline(None)(image, label)
    assert out.shape == (3, 30, 40)


def test_train_pipeline_equals_the_step_by_step_composition():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (36, 52, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (36, 52), dtype=np.uint8)
    pipeline = TrainPipeline(crop_size=(32, 32), scale=(52, 36))
    for seed in range(6):
        out, lab = pipeline(image, label, np.random.default_rng(seed))
        steps = np.random.default_rng(seed)
        img, lbl = random_resize(image, label, steps, (52, 36))
        img, lbl = random_crop(img, lbl, steps, (32, 32))
        img, lbl = random_flip(img, lbl, steps)
        img = photometric_distortion(img, steps)
        expected, expected_label = pad_to(normalize_image(img), torch.from_numpy(lbl.astype(np.int64)), (32, 32))
        assert torch.equal(out, expected) and torch.equal(lab, expected_label)


def test_colour_and_resize_steps_are_opencv_on_any_width():
    # OpenCV converts the last pixels of a row on a scalar path that rounds differently from
    # its vector path; the pipeline is OpenCV's own, so it agrees on every width.
    import cv2

    rng = np.random.default_rng(1)
    for width in (1, 7, 48, 91):
        image = rng.integers(0, 256, (9, width, 3), dtype=np.uint8)
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        np.testing.assert_array_equal(rgb_to_hsv(image), hsv)
        np.testing.assert_array_equal(hsv_to_rgb(hsv), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
        np.testing.assert_array_equal(
            resize_image(image[:, ::-1], (13, 2 * width)),
            cv2.resize(np.ascontiguousarray(image[:, ::-1]), (2 * width, 13), interpolation=cv2.INTER_LINEAR),
        )
