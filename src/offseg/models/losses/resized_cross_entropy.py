"""Cross-entropy of low-resolution logits resized bilinearly to the labels, computed band by band.

`resized_cross_entropy(logits, labels)` is the same function as

    F.cross_entropy(F.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=False),
                    labels, ignore_index=..., reduction="none").mean()   # or / non-ignored count

(MMSegmentation's loss on a decode head's output), with the same gradient, but it never holds the
resized logits of every class at full resolution, nor their gradient: the forward produces them a
band of rows at a time (`offseg.models.layers.resample`), reduces each band to its pixels'
losses and, when the logits need a gradient, forms the band's (softmax - one-hot) and maps it
back through the transposed resize into the low-resolution gradient, which the backward scales.
For 150 classes at 512x512 and batch 2 that is some 1.2 GB of tensors (logits, log-softmax, their
gradients) not allocated.
"""

from __future__ import annotations

import torch

from ..layers.resample import AxisResample

# Full-resolution elements (batch x classes x rows x width) per band.
BAND_ELEMENTS = 1 << 21


def _band_rows(batch: int, classes: int, width: int, band_elements: int) -> int:
    return max(1, band_elements // max(1, batch * classes * width))


class _ResizedCrossEntropy(torch.autograd.Function):
    # The logits are handled classes-innermost, (B, h, w, K): the resampling moves whole class
    # vectors and the log-sum-exp reduces a contiguous axis.
    #
    # The loss is a scalar at the end of the graph, so its gradient is (d loss / d logits) times
    # the incoming scalar: when the logits need a gradient, the forward computes it right away from
    # each band's softmax, which it has in hand, and the backward only scales it. Recomputing the
    # bands in the backward (resize and exp again) was a third of the loss's time.

    @staticmethod
    def forward(ctx, logits, labels, rows: AxisResample, cols: AxisResample, ignore_index, avg_non_ignore, band):
        b, k = logits.shape[:2]
        height, width = labels.shape[-2:]
        low = logits.permute(0, 2, 3, 1).contiguous()
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, 0)
        grad_low = torch.zeros_like(low) if ctx.needs_input_grad[0] else None
        total = logits.new_zeros((), dtype=torch.float64)
        step = _band_rows(b, k, width, band)
        for top in range(0, height, step):
            bottom = min(top + step, height)
            first, last = rows.band(top, bottom)
            full = rows.apply_rows_last(cols.apply_columns_last(low[:, first : last + 1]), top, bottom, first)
            band_labels = safe_labels[:, top:bottom, :, None]
            band_valid = valid[:, top:bottom]
            picked = full.gather(-1, band_labels).squeeze(-1)
            # log-sum-exp as torch.logsumexp computes it, keeping exp(full - max) for the softmax
            peak = full.amax(dim=-1, keepdim=True)
            exps = full.sub_(peak).exp_()
            sums = exps.sum(dim=-1, keepdim=True)
            lse = sums.log().add_(peak).squeeze(-1)
            total += ((lse - picked) * band_valid).sum(dtype=torch.float64)
            if grad_low is not None:
                # d loss / d full logits, up to the 1 / count of the mean: (softmax - one-hot) at
                # counted pixels, 0 elsewhere; mapped back through the transposed resize
                grad_full = exps.div_(sums)
                grad_full.scatter_add_(-1, band_labels, grad_full.new_full((b, bottom - top, width, 1), -1.0))
                grad_full.mul_(band_valid[..., None].to(grad_full.dtype))
                grad_band = rows.apply_rows_last_transposed(grad_full, top, bottom, first, last + 1 - first)
                grad_low[:, first : last + 1] += cols.apply_columns_last_transposed(grad_band)
        count = valid.sum() if avg_non_ignore else torch.tensor(valid.numel())
        count = count.clamp(min=1)
        ctx.save_for_backward(grad_low, count)
        return (total / count).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_low, count = ctx.saved_tensors
        grad = grad_low * (grad_loss / count).to(grad_low.dtype)
        return grad.permute(0, 3, 1, 2), None, None, None, None, None, None


def resized_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    resize_to: tuple[int, int] | None = None,
    ignore_index: int = 255,
    avg_non_ignore: bool = False,
    band_elements: int = BAND_ELEMENTS,
) -> torch.Tensor:
    """Mean cross-entropy of `logits` (B, K, h, w) resized bilinearly (align_corners=False) to the
    labels (B, H, W); `ignore_index` pixels count as 0 in the mean over all pixels, or are left
    out of it with `avg_non_ignore`.

    `resize_to` = (H', W'): the logits are first resized to that size and then to the labels' (as
    a model that returns input-size logits followed by a resize to the labels computes it).
    Computed in float32 (or the logits' dtype if wider), band by band (module docs).
    """
    if logits.dim() != 4 or labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"resized_cross_entropy: expected logits (B, K, h, w) and labels (B, H, W), "
            f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if not logits.is_floating_point() or logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    h, w = logits.shape[-2:]
    height, width = labels.shape[-2:]
    mid_h, mid_w = resize_to if resize_to is not None else (height, width)
    rows = AxisResample.chain(h, mid_h, mid_h, height, logits.dtype, logits.device)
    cols = AxisResample.chain(w, mid_w, mid_w, width, logits.dtype, logits.device)
    return _ResizedCrossEntropy.apply(
        logits.contiguous(), labels, rows, cols, ignore_index, avg_non_ignore, band_elements
    )
