"""The phase-wise bilinear upsampling of the fast path's final resize equals F.interpolate."""

import pytest
import torch
import torch.nn.functional as F

from offseg.models.layers import resample
from offseg.models.layers.resample import upsample_bilinear_into


@pytest.mark.parametrize(
    "shape, size",
    [
        ((1, 150, 16, 16), (64, 64)),  # the head at stride 4
        ((2, 3, 5, 7), (15, 28)),  # odd row scale (a phase at offset 0), batch
        ((1, 2, 6, 4), (12, 4)),  # rows only
        ((1, 2, 4, 4), (4, 8)),  # columns only
        ((2, 4, 1, 1), (4, 4)),  # one input pixel: all clamped
        ((1, 3, 8, 8), (8, 8)),  # no resize at all
    ],
)
def test_upsample_bilinear_into_equals_interpolate(shape, size, monkeypatch):
    monkeypatch.setattr(resample, "_UPSAMPLE_BAND_BYTES", 64)  # several bands of channels
    x = torch.randn(shape, dtype=torch.float64)
    out = torch.full((*shape[:2], *size), float("nan"), dtype=torch.float64)
    assert upsample_bilinear_into(x, out)
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_upsample_bilinear_into_float32_rounding():
    x = torch.randn(1, 19, 32, 64) * 30
    out = torch.empty(1, 19, 128, 256)
    assert upsample_bilinear_into(x, out)
    expected = F.interpolate(x, size=(128, 256), mode="bilinear", align_corners=False)
    assert float((out - expected).abs().max()) <= 4e-6 * float(expected.abs().max())


def test_upsample_bilinear_into_declines_what_it_does_not_do():
    x = torch.randn(1, 2, 6, 6)
    untouched = torch.zeros(1, 2, 15, 15)
    assert not upsample_bilinear_into(x, untouched)  # not an integer scale
    assert not upsample_bilinear_into(x.transpose(2, 3), torch.zeros(1, 2, 12, 12))  # not contiguous
    assert not upsample_bilinear_into(x, torch.zeros(1, 3, 12, 12))  # other channels
    assert not upsample_bilinear_into(x, torch.zeros(1, 2, 12, 12, dtype=torch.float64))  # other dtype
    assert bool((untouched == 0).all())


@pytest.mark.parametrize("size_in, scale", [(16, 4), (5, 3), (1, 4), (7, 8)])
def test_axis_resample_by_phases_equals_its_matrix(size_in, scale):
    from offseg.models.layers.resample import AxisResample

    axis = AxisResample.chain(
        size_in, size_in * scale, size_in * scale, size_in * scale, torch.float64, torch.device("cpu")
    )
    assert axis.scale == scale
    x = torch.randn(2, 3, size_in, 5, dtype=torch.float64)  # (B, rows, columns, C)
    expected = torch.einsum("oi,bric->broc", axis.matrix, x)
    torch.testing.assert_close(axis.apply_columns_last(x), expected, rtol=0, atol=1e-12)
    grad = torch.randn(2, 3, size_in * scale, 5, dtype=torch.float64)
    expected_grad = torch.einsum("oi,broc->bric", axis.matrix, grad)
    torch.testing.assert_close(axis.apply_columns_last_transposed(grad), expected_grad, rtol=0, atol=1e-12)


def test_axis_resample_chains_other_than_an_upsampling_have_no_phases():
    from offseg.models.layers.resample import AxisResample

    cpu = torch.device("cpu")
    assert AxisResample.chain(16, 64, 60, 60, torch.float32, cpu).scale == 0  # cropped
    assert AxisResample.chain(16, 64, 64, 100, torch.float32, cpu).scale == 0  # resized again
    assert AxisResample.chain(16, 16, 16, 16, torch.float32, cpu).scale == 0  # identity
