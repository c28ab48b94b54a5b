"""`offseg.predict(model, image)`: a label map for one picture, plus the file and video helpers
behind `offseg predict`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .data.transforms import TestPipeline
from .data.transforms import fit_size as fit_scale  # (H, W) of a keep-ratio resize to fit (long, short)
from .inference import DEFAULT_TTA_SCALES, infer, model_device, whole_labels
from .optimize import fast_model_for

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "collect_inputs",
    "fit_scale",
    "iter_video_frames",
    "label_image",
    "load_image",
    "predict",
    "preprocess",
    "shard_inputs",
    "VideoWriter",
    "is_video",
    "video_frame_rate",
]

ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor
T = TypeVar("T")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})


def load_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """An RGB PIL image from a path or a PIL image; unreadable files raise ValueError naming why."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the full decode, so truncation shows here
    except (OSError, SyntaxError) as err:  # PIL reports corrupt data as either
        raise ValueError(f"{path}: cannot read image ({err})") from err


def preprocess(image: ImageLike, scale: Sequence[int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """The model input of a picture, a normalised float tensor (3, h, w), and the picture's own (H, W).

    A path, PIL image or uint8 RGB array (H, W, 3) goes through evaluation's test pipeline: resized
    to fit `scale` = (long, short) keeping its aspect ratio by the same OpenCV-exact bilinear, then
    normalised, so predict and eval see identical inputs. A float tensor (3, H, W) is taken as
    already normalised (like dataset items) and resized by bilinear interpolation.
    """
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        tensor = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
        if tensor.dim() != 3 or tensor.shape[0] != 3:
            raise ValueError(f"predict: a float tensor must be a normalised image (3, H, W), got {tuple(image.shape)}")
        size = (int(tensor.shape[1]), int(tensor.shape[2]))
        if scale is not None:
            tensor = F.interpolate(tensor[None], size=fit_scale(*size, scale), mode="bilinear", align_corners=False)[0]
        return tensor, size
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"predict: an array must be uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
        array = image
    else:
        array = np.asarray(load_image(image))
    size = (int(array.shape[0]), int(array.shape[1]))
    return TestPipeline(None if scale is None else (scale[0], scale[1])).prepare_image(array), size


@torch.no_grad()
def predict(
    model: nn.Module,
    image: ImageLike,
    mode: str = "whole",
    crop_size: Sequence[int] | int | None = None,
    stride: Sequence[int] | int | None = None,
    tta: bool = False,
    scales: Sequence[float] = DEFAULT_TTA_SCALES,
    scale: Sequence[int] | None = None,
    fast: bool = True,
) -> np.ndarray:
    """Label map (H, W) int64 at the image's own size.

    image: a path, a PIL image, a uint8 RGB array (H, W, 3), or an already normalised float
    tensor (3, H, W). It is prepared by `preprocess` (evaluation's test pipeline: resized to fit
    `scale` = (long, short) keeping its aspect ratio, normalised), padded to the model's size
    divisor and inferred (`mode` 'whole' or 'slide', optional multi-scale + flip `tta`); the
    scores are resized back before the argmax. Whole-image inference without TTA goes through
    `offseg.inference.whole_labels`, which computes the same labels band by band without holding
    the full-resolution logits of every class.
    With `tta` the scale ratios apply to the image's own size, so `scale` then only changes the
    source of the resized views (as in the official TTA pipeline, which ignores the test scale).
    `fast` (default) runs the inference-optimised copy of the model (`offseg.optimize_for_inference`,
    built once and reused while the weights stay the same; same logits within float32 rounding);
    `fast=False` runs `model` itself.
    """
    x, out_size = preprocess(image, scale)
    x = x.unsqueeze(0).to(model_device(model))
    was_training = model.training
    model.eval()
    try:
        # --- fast path (offseg.optimize) ---
        runner = fast_model_for(model) if fast else model
        if mode == "whole" and not tta:
            # Labels only: the full-resolution K-class logits are never materialised.
            labels = whole_labels(runner, x, out_size=out_size)
        else:
            scores = infer(
                runner, x, mode=mode, crop_size=crop_size, stride=stride, tta=tta, scales=scales, out_size=out_size
            )
            labels = scores.argmax(dim=1)
    finally:
        model.train(was_training)
    return labels[0].cpu().numpy().astype(np.int64)


def label_image(label: np.ndarray, palette: np.ndarray | Sequence[Sequence[int]]) -> Image.Image:
    """PNG-ready label map: palette ('P') image with class indices, or 16-bit grey past 256 classes."""
    from .visualize import palette_image

    if label.size and int(label.max()) > 255:
        return Image.fromarray(label.astype(np.uint16))
    return palette_image(label, palette)


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """(file, relative output stem) for every image / video given directly or found in folders
    (recursively, sorted; files of other types in folders are left alone)."""
    found: list[tuple[Path, Path]] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if file.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
                    found.append((file, file.relative_to(path).with_suffix("")))
        elif path.is_file():
            found.append((path, Path(path.stem)))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def shard_inputs(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This process's share of `items` under torchrun: every `world_size`-th one from `rank`.
    The shares of ranks 0..world_size-1 partition the list (each item in exactly one), and the
    files of a folder, listed in sorted order, alternate between processes, which balances sizes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return list(items[rank::world_size])


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _import_av() -> Any:
    try:
        import av
    except ImportError as err:
        raise ValueError("video input needs PyAV: pip install 'offseg[video]' (or pip install av)") from err
    return av


def iter_video_frames(path: str | os.PathLike) -> Iterator[Image.Image]:
    """RGB frames of a video file, decoded with PyAV (the optional `video` extra)."""
    av = _import_av()
    try:
        container = av.open(str(path))
    except Exception as err:  # PyAV raises its own error types for unreadable files
        raise ValueError(f"{path}: cannot open video ({err})") from err
    with container:
        for frame in container.decode(video=0):
            yield frame.to_image()


def video_frame_rate(path: str | os.PathLike, default: float = 25.0) -> Any:
    """Average frame rate of the first video stream (`default` when the file does not say)."""
    av = _import_av()
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    return rate if rate else default


class VideoWriter:
    """Writes RGB PIL frames to an H.264 (or MPEG-4 part 2) file with PyAV.

    Frame sides are cut down to even numbers, which the 4:2:0 pixel format requires.
    """

    def __init__(self, path: str | os.PathLike, rate: Any = 25) -> None:
        av = _import_av()
        self._av = av
        self.container = av.open(str(path), mode="w")
        self.codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.rate = rate
        self.stream: Any = None  # PyAV's video stream, added at the first frame

    def write(self, frame: Image.Image) -> None:
        width, height = frame.width // 2 * 2, frame.height // 2 * 2
        if self.stream is None:
            self.stream = self.container.add_stream(self.codec, rate=self.rate)
            self.stream.width, self.stream.height = width, height
            self.stream.pix_fmt = "yuv420p"
        if (width, height) != (frame.width, frame.height):
            frame = frame.crop((0, 0, width, height))
        video_frame = self._av.VideoFrame.from_image(frame)
        for packet in self.stream.encode(video_frame):
            self.container.mux(packet)

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode():  # flush the encoder's delayed frames
                self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
