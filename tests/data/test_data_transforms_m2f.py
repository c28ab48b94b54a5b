"""Mask2Former's training resize: RandomChoiceResize(scales=short edges, resize_type=
ResizeShortestEdge, max_size) as MMSegmentation / MMCV compute it, in the pipeline and as a
dataset option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offseg.data import TrainPipeline, build_dataset, generate_synthetic_dataset
from offseg.data.transforms import random_short_edge_size, shortest_edge_size

# The official config's scales: [int(512 * x * 0.1) for x in range(5, 21)].
M2F_SHORT_EDGES = [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024]


def test_official_short_edge_list() -> None:
    assert [int(512 * x * 0.1) for x in range(5, 21)] == M2F_SHORT_EDGES


@pytest.mark.parametrize(
    "height, width, short_edge, expected",
    [
        (512, 683, 256, (256, 342)),  # landscape: short side = height; 341.5 rounds half up
        (683, 512, 256, (342, 256)),  # portrait: short side = width
        (300, 300, 614, (614, 614)),  # square
        (480, 640, 1024, (1024, 1365)),  # upscaling, long side 1365.3 < 2048
        (100, 1000, 1024, (205, 2048)),  # long side capped: 1024 x 10240 -> 204.8 x 2048
        (1000, 100, 256, (2048, 205)),  # capped, portrait
        (512, 512, 512, (512, 512)),  # already at size
    ],
)
def test_shortest_edge_sizes(height: int, width: int, short_edge: int, expected: tuple[int, int]) -> None:
    assert shortest_edge_size(height, width, short_edge, max_size=2048) == expected


def test_second_keep_ratio_rounding_is_reproduced() -> None:
    # ResizeShortestEdge asks for 916 x 2048 (h x w), but MMCV's keep-ratio Resize then rescales
    # the 200 x 447 original by min(2048 / 447, 916 / 200) = 4.58, giving a 2047-wide image.
    assert shortest_edge_size(200, 447, 921, max_size=2048) == (916, 2047)


def test_sizes_respect_short_edge_and_max_size() -> None:
    for height, width in [(375, 500), (512, 2100), (1600, 256), (233, 999), (64, 64)]:
        for short_edge in M2F_SHORT_EDGES:
            h, w = shortest_edge_size(height, width, short_edge, max_size=2048)
            assert max(h, w) <= 2048
            if max(h, w) < 2047:  # not capped: the short side is the requested one
                assert min(h, w) == short_edge
            assert abs(h * width - w * height) <= 0.5 * (width + height)  # aspect ratio kept, to rounding


def test_random_choice_is_uniform_over_the_list_and_seeded() -> None:
    rng = np.random.default_rng(0)
    shorts = [min(random_short_edge_size(400, 600, rng, M2F_SHORT_EDGES, 2048)) for _ in range(3200)]
    counts = np.bincount([M2F_SHORT_EDGES.index(s) for s in shorts], minlength=len(M2F_SHORT_EDGES))
    assert counts.min() > 120 and counts.max() < 280  # 200 expected each
    a = [random_short_edge_size(400, 600, np.random.default_rng(7), M2F_SHORT_EDGES, 2048) for _ in range(2)]
    assert a[0] == a[1]


def test_pipeline_uses_short_edge_resize() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (40, 60), dtype=np.uint8)
    # one short edge of 32 -> 32 x 48, smaller than the crop: the labelled area shows the size
    pipeline = TrainPipeline(crop_size=(64, 96), scale=(999, 999), short_edges=[32], max_size=2048, photometric=False)
    for seed in range(3):
        out, lab = pipeline(image, label, np.random.default_rng(seed))
        assert out.shape == (3, 64, 96) and lab.shape == (64, 96)
        assert (lab[:32, :48] < 5).all() and (lab[32:] == 255).all() and (lab[:, 48:] == 255).all()
    # max_size caps the long side: 32 x 48 would exceed 40, so 27 x 40 (26.67 rounds up)
    capped = TrainPipeline(crop_size=(64, 96), scale=None, short_edges=[32], max_size=40, photometric=False)
    _, lab = capped(image, label, np.random.default_rng(0))
    assert (lab[:27, :40] < 5).all() and (lab[27:] == 255).all() and (lab[:, 40:] == 255).all()
    assert "short_edges=[32]" in repr(pipeline) and "max_size=2048" in repr(pipeline)


def test_pipeline_is_a_function_of_the_generator() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (50, 70), dtype=np.uint8)
    pipeline = TrainPipeline(crop_size=(32, 32), scale=None, short_edges=[40, 48, 64, 80])
    first = pipeline(image, label, np.random.default_rng(3))
    again = pipeline(image, label, np.random.default_rng(3))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_pipeline_rejects_bad_short_edges() -> None:
    with pytest.raises(ValueError, match="short_edges"):
        TrainPipeline(crop_size=(32, 32), scale=None, short_edges=[])
    with pytest.raises(ValueError, match="max_size"):
        TrainPipeline(crop_size=(32, 32), scale=None, short_edges=[32], max_size=0)


def test_dataset_option(tmp_path) -> None:
    root = generate_synthetic_dataset(tmp_path / "synthetic", num_train=2, num_val=1, size=(48, 64))
    dataset = build_dataset(
        "folder", root, "train", crop_size=(96, 128), short_edges=[24], max_size=2048, photometric=False
    )
    assert dataset.transform.short_edges == (24,) and dataset.transform.max_size == 2048
    label = dataset[(0, 0)]["label"]
    assert label.shape == (96, 128)
    assert (label[:24, :32] != 255).any() and (label[24:] == 255).all() and (label[:, 32:] == 255).all()
    # without the option the ratio-based resize is unchanged
    plain = build_dataset("folder", root, "train", crop_size=(32, 32))
    assert plain.transform.short_edges is None
    with pytest.raises(ValueError, match="short_edges"):
        build_dataset("folder", root, "train", crop_size=(32, 32), short_edges=512)
    with pytest.raises(ValueError, match="unknown dataset option"):
        build_dataset("folder", root, "train", crop_size=(32, 32), short_edge=[512])
