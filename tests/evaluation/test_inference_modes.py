"""Whole, sliding-window and TTA inference against brute-force versions written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from offseg.inference import (
    DEFAULT_TTA_SCALES,
    default_test_mode,
    infer,
    pad_to_divisor,
    slide_inference,
    slide_windows,
    whole_inference,
)


def image(h, w, seed=0, batch=1):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_pad_to_divisor_pads_bottom_right_with_zero():
    x = torch.ones(1, 3, 17, 30)
    padded = pad_to_divisor(x, 8)
    assert padded.shape[-2:] == (24, 32)
    assert torch.equal(padded[..., :17, :30], x)
    assert padded[..., 17:, :].abs().sum() == 0 and padded[..., :, 30:].abs().sum() == 0
    assert pad_to_divisor(x[..., :16, :32], 8).shape[-2:] == (16, 32)


def test_whole_inference_pads_then_crops(standin):
    x = image(21, 30)
    out = whole_inference(standin, x)
    assert out.shape == (1, 4, 21, 30)
    padded = F.pad(x, (0, 2, 0, 3))  # to 24 x 32, the stand-in's divisor is 8
    torch.testing.assert_close(out, standin(padded)[..., :21, :30], rtol=0, atol=0)
    with pytest.raises(ValueError):
        standin(x)  # the stand-in really needs the padding


def brute_force_slide(model, x, crop, stride):
    """Every window run on its own (zero-padded to the divisor), summed and divided per pixel."""
    _, _, H, W = x.shape
    d = model.size_divisor

    def starts(size, c, s):
        if size <= c:
            return [0]
        return list(range(0, size - c, s)) + [size - c]

    total = np.zeros((x.shape[0], model.num_classes, H, W))
    count = np.zeros((H, W))
    for y in starts(H, crop[0], stride[0]):
        for x0 in starts(W, crop[1], stride[1]):
            win = x[:, :, y : y + crop[0], x0 : x0 + crop[1]]
            h, w = win.shape[-2:]
            padded = F.pad(win, (0, (d - w % d) % d, 0, (d - h % d) % d))
            total[:, :, y : y + h, x0 : x0 + w] += model(padded)[:, :, :h, :w].detach().numpy()
            count[y : y + h, x0 : x0 + w] += 1
    assert count.min() >= 1
    return torch.from_numpy(total / count)


@pytest.mark.parametrize(
    "size,crop,stride",
    [
        ((40, 56), (16, 24), (8, 16)),  # overlaps in both directions, last windows shifted inside
        ((40, 56), (16, 16), (16, 16)),  # no overlap, but the sides are not multiples of the stride
        ((35, 50), (16, 24), (12, 10)),  # odd image size
        ((12, 50), (16, 24), (12, 10)),  # image lower than the crop: windows padded
    ],
)
def test_slide_matches_brute_force(standin, size, crop, stride):
    x = image(*size, seed=1, batch=2)
    got = slide_inference(standin, x, crop, stride)
    torch.testing.assert_close(got, brute_force_slide(standin, x, crop, stride), rtol=0, atol=1e-12)


def test_slide_differs_from_whole_when_windows_overlap(standin):
    # Otherwise the brute-force comparison above would prove little.
    x = image(40, 56)
    assert not torch.allclose(slide_inference(standin, x, (16, 24), (8, 16)), whole_inference(standin, x))


@pytest.mark.parametrize("size,crop", [((32, 48), (32, 48)), ((32, 48), (64, 64)), ((27, 45), (64, 64))])
def test_one_window_slide_equals_whole(standin, size, crop):
    x = image(*size, seed=2)
    assert len(slide_windows(*size, crop, (8, 8))) == 1
    torch.testing.assert_close(slide_inference(standin, x, crop, (8, 8)), whole_inference(standin, x), rtol=0, atol=0)


def test_window_grid_follows_the_reference_formula():
    # 512 crop, 480 stride on a 512 x 683 image: 1 row, 2 columns, the second shifted back.
    assert slide_windows(512, 683, 512, 480) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert slide_windows(1024, 2048, 1024, 768) == [(0, 1024, 0, 1024), (0, 1024, 768, 1792), (0, 1024, 1024, 2048)]


def test_infer_resizes_logits_to_out_size(standin):
    x = image(24, 32)
    got = infer(standin, x, out_size=(30, 45))
    want = F.interpolate(whole_inference(standin, x), size=(30, 45), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want)
    assert infer(standin, x[0]).shape == (1, 4, 24, 32)  # a single (3, H, W) image works too
    with pytest.raises(ValueError, match="mode"):
        infer(standin, x, mode="sliding")
    with pytest.raises(ValueError, match="crop_size"):
        infer(standin, x, mode="slide")


def test_tta_flip_consistency(standin):
    x = image(29, 37, seed=4)
    scales = (0.5, 1.0, 1.5)
    for mode, kwargs in (("whole", {}), ("slide", {"crop_size": (16, 16), "stride": (8, 8)})):
        plain = infer(standin, x, mode=mode, tta=True, scales=scales, **kwargs)
        mirrored = infer(standin, x.flip(-1), mode=mode, tta=True, scales=scales, **kwargs)
        # The set of views of a mirrored image is the mirrored set of views.
        torch.testing.assert_close(mirrored.flip(-1), plain, rtol=0, atol=1e-10)
        torch.testing.assert_close(plain.sum(1), torch.ones_like(plain.sum(1)))


def test_tta_is_the_mean_of_softmaxes(standin):
    x = image(24, 32, seed=5)
    out = (30, 40)
    views = []
    for r in (0.5, 1.25):
        scaled = F.interpolate(x, size=(int(30 * r + 0.5), int(40 * r + 0.5)), mode="bilinear", align_corners=False)
        for flip in (False, True):
            v = scaled.flip(-1) if flip else scaled
            logits = whole_inference(standin, v)
            logits = logits.flip(-1) if flip else logits
            views.append(F.interpolate(logits, size=out, mode="bilinear", align_corners=False).softmax(1))
    want = torch.stack(views).mean(0)
    got = infer(standin, x, tta=True, scales=(0.5, 1.25), out_size=out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # One scale at the input size, no flip: plain softmax.
    torch.testing.assert_close(infer(standin, x, tta=True, scales=(1.0,), flip=False), infer(standin, x).softmax(1))
    assert DEFAULT_TTA_SCALES == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def test_real_offseg_t_slide_and_whole():
    import offseg

    model = offseg.create_model("offseg-t", num_classes=5).eval()
    x = torch.randn(1, 3, 50, 70, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = infer(model, x)
        one_window = infer(model, x, mode="slide", crop_size=(64, 96), stride=(32, 32))
        slid = infer(model, x, mode="slide", crop_size=(32, 64), stride=(16, 32))
    assert whole.shape == slid.shape == (1, 5, 50, 70)
    torch.testing.assert_close(one_window, whole)
    assert torch.isfinite(slid).all()


@pytest.mark.parametrize(
    "model,data,expected",
    [
        ("offseg-t", "ade20k", ("slide", (512, 512), (480, 480))),
        ("offseg-l", "coco-stuff164k", ("slide", (512, 512), (480, 480))),
        ("offseg-b-pixel", "cityscapes", ("slide", (1024, 1024), (768, 768))),
        ("segformer-b2-ol", "ADE20K", ("slide", (512, 512), (480, 480))),
        ("segformer-b0-ol", "coco-stuff164k", ("slide", (512, 512), (480, 480))),
        ("segnext-t-ol", "ade20k", ("whole", None, None)),
        ("segnext-s-ol", "coco-stuff164k", ("whole", None, None)),
        ("segnext-b-ol", "cityscapes", ("slide", (1024, 1024), (768, 768))),
        ("segnext-t-ol", "pascal-context-59", ("slide", (480, 480), (320, 320))),
        ("mask2former-swin-t-ol", "ade20k", ("whole", None, None)),
        ("offseg-t", "camvid", ("whole", None, None)),
        ("offseg-t", "folder", ("whole", None, None)),
    ],
)
def test_default_test_modes(model, data, expected):
    got = default_test_mode(model, data)
    assert (got["mode"], got["crop_size"], got["stride"]) == expected
