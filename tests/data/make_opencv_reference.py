"""Regenerate `opencv_reference.npz`, the OpenCV outputs the data tests compare against.

The pipeline calls OpenCV itself; the file pins what OpenCV 4.10 (x86, AVX2) computed, so that
whichever OpenCV version is installed is checked against it. It was made in a scratch environment,

    python -m venv /tmp/cv && /tmp/cv/bin/pip install numpy "opencv-python-headless==4.10.0.84"
    /tmp/cv/bin/python tests/data/make_opencv_reference.py

The colour steps follow MMSegmentation's PhotoMetricDistortion with fixed parameters instead
of random draws; images are 64 wide so OpenCV's vector path converts every pixel.
"""

from pathlib import Path

import cv2
import numpy as np


def scale_shift(values, alpha=1.0, beta=0.0):
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def colours_like_mmseg(rgb, brightness, contrast, saturation, hue, contrast_first):
    bgr = rgb[..., ::-1].copy()  # MMSegmentation works on BGR images
    if brightness is not None:
        bgr = scale_shift(bgr, beta=brightness)
    if contrast_first and contrast is not None:
        bgr = scale_shift(bgr, alpha=contrast)
    if saturation is not None:
        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        hsv[..., 1] = scale_shift(hsv[..., 1], alpha=saturation)
        bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if hue is not None:
        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(int) + hue) % 180
        bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not contrast_first and contrast is not None:
        bgr = scale_shift(bgr, alpha=contrast)
    return bgr[..., ::-1].copy()


def main():
    rng = np.random.default_rng(2025)
    smooth = cv2.resize(rng.integers(0, 256, (4, 8, 3), dtype=np.uint8), (64, 16), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(0, 256, (16, 64, 3), dtype=np.uint8)
    image = np.concatenate([smooth, noise], axis=0)  # (32, 64, 3)
    # (brightness, contrast, saturation, hue, contrast_first); NaN = step skipped
    cases = np.array(
        [
            [20.7, np.nan, np.nan, np.nan, 1],
            [np.nan, 1.37, np.nan, np.nan, 1],
            [np.nan, np.nan, 0.61, np.nan, 1],
            [np.nan, np.nan, 1.44, np.nan, 0],
            [np.nan, np.nan, np.nan, 17, 1],
            [np.nan, np.nan, np.nan, -18, 0],
            [-31.2, 0.55, 1.21, 5, 1],
            [12.5, 1.49, 0.52, -7, 0],
            [-3.3, 0.81, np.nan, 11, 0],
        ]
    )
    outputs = []
    for b, c, s, h, first in cases.tolist():
        # Python floats, as numpy.random.uniform returns: float32 maths (numpy scalars would promote)
        outputs.append(
            colours_like_mmseg(
                image,
                None if np.isnan(b) else b,
                None if np.isnan(c) else c,
                None if np.isnan(s) else s,
                None if np.isnan(h) else int(h),
                bool(first),
            )
        )
    grid = np.arange(0, 256, 17, dtype=np.uint8)  # 16 levels, 4096 colours
    all_colours = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(64, 64, 3)
    all_colours = np.ascontiguousarray(all_colours)
    label = rng.integers(0, 12, (32, 64), dtype=np.uint8)
    sizes = np.array([[24, 32], [48, 80], [37, 91], [100, 20]])
    np.savez_compressed(
        Path(__file__).with_name("opencv_reference.npz"),
        image=image,
        cases=cases,
        photometric=np.stack(outputs),
        colours=all_colours,
        colours_hsv=cv2.cvtColor(all_colours, cv2.COLOR_RGB2HSV),
        label=label,
        sizes=sizes,
        **{f"linear_{h}x{w}": cv2.resize(image, (int(w), int(h)), interpolation=cv2.INTER_LINEAR) for h, w in sizes},
        **{f"nearest_{h}x{w}": cv2.resize(label, (int(w), int(h)), interpolation=cv2.INTER_NEAREST) for h, w in sizes},
        opencv_version=np.array(cv2.__version__),
    )


if __name__ == "__main__":
    main()
