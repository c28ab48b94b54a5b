"""The tiled loss is MMSegmentation's cross-entropy on resized logits: same value, same gradient."""

import pytest
import torch
import torch.nn.functional as F

from offseg.models.losses.resized_cross_entropy import resized_cross_entropy


def reference_loss(logits, labels, resize_to=None, avg_non_ignore=False):
    x = logits
    if resize_to is not None:
        x = F.interpolate(x, size=resize_to, mode="bilinear", align_corners=False)
    x = F.interpolate(x, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(x, labels, ignore_index=255, reduction="none")
    return loss.sum() / (labels != 255).sum().clamp(min=1) if avg_non_ignore else loss.mean()


@pytest.mark.parametrize("dtype,bar", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "shape,label_size,resize_to,avg",
    [
        ((2, 7, 16, 16), (64, 64), None, False),  # x4, like OffSeg
        ((2, 5, 8, 12), (64, 96), None, True),  # x8, like SegFormer-OL; mean over counted pixels
        ((1, 6, 8, 8), (40, 37), (32, 32), False),  # input-size logits, then resized to other labels
    ],
)
def test_equals_resize_then_cross_entropy(dtype, bar, shape, label_size, resize_to, avg):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, shape[1], (shape[0], *label_size), generator=gen)
    labels[:, :3, :5] = 255
    ref = reference_loss(logits, labels, resize_to, avg)
    ref_grad = torch.autograd.grad(ref, logits)[0]
    for band in (1000, 1 << 21):  # many bands (a ragged last one) and a single band
        loss = resized_cross_entropy(logits, labels, resize_to, avg_non_ignore=avg, band_elements=band)
        grad = torch.autograd.grad(loss, logits)[0]
        assert abs(float(loss.detach()) - float(ref.detach())) <= bar * abs(float(ref.detach()))
        assert float((grad - ref_grad).abs().max()) <= bar * float(ref_grad.abs().max())


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected logits"):
        resized_cross_entropy(torch.randn(2, 3, 4, 4), torch.zeros(2, 8, dtype=torch.long))
