"""CARAFE (content-aware reassembly of features) in pure PyTorch, with the semantics of mmcv's op:

    out[n, c, y, x] = sum_{i,j < k} masks[n, g*k*k + i*k + j, y, x]
                      * features[n, c, y//s + i - (k-1)//2, x//s + j - (k-1)//2]

with zero outside the map and g the channel group of c. The masks live at the output resolution
(s times the input).

`carafe` never builds a k*k unfold of a whole map. It works channels-last, on an output buffer
(N, h, s, w, s, C). An upsampling CARAFE of one group (s > 1, FreqFusion's) is a small matrix
product per input position, its s*s sub-pixel kernels times its k*k neighbourhood, taken a band of
rows at a time with the neighbourhoods as strided windows of the padded map (or gathered, for few
channels). Otherwise each of the k*k taps adds "shifted feature row times mask scalar" into the
output with one broadcast multiply-add, channels innermost so that every step is a contiguous,
vectorised loop. Its backward (a custom autograd function) keeps only the padded features and the
masks, so training stores no k*k-times-larger tensor: the feature gradient is the tap loop run
backwards; the mask gradient of an upsampling CARAFE is a batched (s*s x C) @ (C x k*k) product
per input position over bands of rows. Two other forms compute the same sum: an einsum on the
meta device (so that `offseg.flops` reads k*k multiply-adds per output) and, while exporting to
ONNX, operators that ONNX Runtime runs well.

`carafe_taps` is the tap loop alone, without banding: the CARAFE of the benchmarks' reference
computation. `carafe_reference` is the textbook formulation (unfold, nearest-upsample the unfold
to the output size, multiply by the masks, sum over the taps); slow and memory-hungry, it exists
for the tests only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .tracing import is_exporting


def _check_shapes(features: torch.Tensor, masks: torch.Tensor, k: int, g: int, s: int) -> None:
    n, c, h, w = features.shape
    if masks.shape != (n, g * k * k, h * s, w * s):
        raise ValueError(
            f"carafe: masks must have shape {(n, g * k * k, h * s, w * s)} for features {tuple(features.shape)}, "
            f"kernel {k}, groups {g}, scale {s}; got {tuple(masks.shape)}"
        )
    if c % g:
        raise ValueError(f"carafe: {c} channels do not split into {g} groups")


def _padded_channels_last(features: torch.Tensor, k: int, g: int) -> torch.Tensor:
    """Zero-padded features as a contiguous (N, h + 2r, w + 2r, G, C/G) tensor, r = (k-1)//2."""
    n, c, h, w = features.shape
    r = (k - 1) // 2
    padded = features.new_zeros(n, h + 2 * r, w + 2 * r, g, c // g)
    padded[:, r : r + h, r : r + w] = features.permute(0, 2, 3, 1).view(n, h, w, g, c // g)
    return padded


def _mask_tap(masks: torch.Tensor, tap: int, g: int, taps: int, h: int, s: int, w: int) -> torch.Tensor:
    """Mask of one tap as an (N, h, s, w, s, G, 1) view broadcasting over the group's channels."""
    n = masks.shape[0]
    return masks.view(n, g, taps, h, s, w, s)[:, :, tap].permute(0, 2, 3, 4, 5, 1).unsqueeze(-1)


# Output elements per band of rows: about 2 MB of float32, so that a band stays in cache through
# all k*k taps of the tap loop (about 2x faster than whole-map passes on large maps) and through
# the k accumulating products of the upsampling. Measured on OffSeg-T's calls at 512x512, 2 threads:
# 1 MB and 4 MB bands were as fast or slower (benchmarks/bench_carafe.py).
BAND_ELEMENTS = 1 << 19


def _tap_loop(
    padded: torch.Tensor, masks: torch.Tensor, k: int, s: int, band_elements: int | None = BAND_ELEMENTS
) -> torch.Tensor:
    """The tap loop; returns the output as (N, h, s, w, s, G, C/G).

    The taps are accumulated a band of input rows at a time (`band_elements` output elements per
    band; None: the whole map in one band). Every output element gets the same products added in
    the same order either way, so the result does not depend on the banding, bit for bit.
    """
    n, hp, wp, g, cg = padded.shape
    h, w = hp - (k - 1), wp - (k - 1)
    out = padded.new_empty(n, h, s, w, s, g, cg)
    row_elements = n * s * w * s * g * cg
    rows = h if band_elements is None else max(1, min(h, band_elements // max(1, row_elements)))
    for top in range(0, h, rows):
        r = min(rows, h - top)
        band = out[:, top : top + r]
        for i in range(k):
            for j in range(k):
                shifted = padded[:, top + i : top + i + r, j : j + w].unsqueeze(2).unsqueeze(4)  # N, r, 1, w, 1, G, C/G
                mask = _mask_tap(masks, i * k + j, g, k * k, h, s, w)[:, top : top + r]
                if i == 0 and j == 0:
                    torch.mul(shifted, mask, out=band)  # the first tap initialises the sum
                else:
                    band.addcmul_(shifted, mask)
    return out


# Channels below which an upsampling CARAFE gathers each band's k*k neighbourhoods for one product
# per position; from this many on, it multiplies k overlapping windows of the padded rows instead
# (no gather). Measured on OffSeg-T's CARAFE calls at 512x512 (benchmarks/bench_carafe.py): the
# gather wins for its 9- and 25-channel kernel maps, the windows for its 128-224-channel features.
GATHER_BELOW_CHANNELS = 48


def _upsample_by_products(
    padded: torch.Tensor,
    masks: torch.Tensor,
    k: int,
    s: int,
    band_elements: int | None = BAND_ELEMENTS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """An upsampling CARAFE (s > 1, one group) as small matrix products; returns (N, h, s, w, s, 1, C),
    or writes `out`, any (N, h, s, w, s, P, C/P) view (the channels in P parts), and returns it.

    Per input position, the s*s sub-pixel outputs (s*s x C) are its kernels (s*s x k*k) times its
    k*k neighbourhood (k*k x C): the same multiply-adds as the tap loop, but each output element is
    written once per product instead of once per tap (the tap loop is memory-bound at about 15x
    the FLOP limit on OffSeg-T's widest CARAFE; this runs at about 4x). Wide maps avoid gathering
    the neighbourhoods: row i of a neighbourhood, k consecutive channel vectors of the padded map,
    is a (k x C) window at a fixed stride from its position's, so for each i the windows of a band
    are one overlapping strided view, and the sum over i is k accumulating products. Positions are
    then counted along the padded width; the extra ones wrap into the next row and are dropped.
    The sum is the tap loop's in another order (float round-off apart, the same values).
    """
    n, hp, wp, _, c = padded.shape
    h, w = hp - (k - 1), wp - (k - 1)
    taps, phases = k * k, s * s
    gather = c < GATHER_BELOW_CHANNELS
    width = w if gather else wp
    target = padded.new_empty(n, h, s, w, s, 1, c) if out is None else out
    parts = target.shape[-2]
    row_elements = s * w * s * c
    rows = h if band_elements is None else max(1, min(h, band_elements // row_elements))
    # One band's buffers, reused by every band (the last one may use fewer rows).
    kernel_buffer = padded.new_empty(rows, width, s, s, taps)  # the band's kernels, taps innermost
    product_buffer = padded.new_empty(rows, width, s, s, c)
    neighbourhood_buffer = padded.new_empty(rows, w, taps, c) if gather else None
    for image in range(n):
        features = padded[image, :, :, 0]  # hp, wp, C
        kernels_by_tap = masks[image].view(taps, h, s, w, s)
        for top in range(0, h, rows):
            r = min(rows, h - top)
            kernels, products = kernel_buffer[:r], product_buffer[:r]
            kernels[:, :w].copy_(kernels_by_tap[:, top : top + r].permute(1, 3, 2, 4, 0))
            if neighbourhood_buffer is not None:
                neighbourhoods = neighbourhood_buffer[:r]
                for i in range(k):
                    for j in range(k):
                        neighbourhoods[:, :, i * k + j] = features[top + i : top + i + r, j : j + w]
                torch.bmm(
                    kernels.view(r * w, phases, taps),
                    neighbourhoods.view(r * w, taps, c),
                    out=products.view(r * w, phases, c),
                )
            else:
                positions = (r - 1) * wp + w  # the last one's windows end at the padded map's end
                kernel_rows = kernels.view(r * wp, phases, taps)[:positions]
                sums = products.view(r * wp, phases, c)[:positions]
                for i in range(k):
                    start = features.storage_offset() + (top + i) * wp * c
                    windows = features.as_strided((positions, k, c), (c, c, 1), start)
                    if i == 0:
                        torch.bmm(kernel_rows[:, :, :k], windows, out=sums)
                    else:
                        sums.baddbmm_(kernel_rows[:, :, i * k : (i + 1) * k], windows)
            target[image, top : top + r].copy_(products[:, :w].permute(0, 2, 1, 3, 4).unflatten(-1, (parts, -1)))
    return target


def _carafe_forward(
    padded: torch.Tensor, masks: torch.Tensor, k: int, s: int, band_elements: int | None = BAND_ELEMENTS
) -> torch.Tensor:
    """CARAFE's forward on the padded features; returns (N, h, s, w, s, G, C/G). An upsampling
    CARAFE of one group runs as matrix products, anything else as the tap loop."""
    if s > 1 and padded.shape[3] == 1:
        return _upsample_by_products(padded, masks, k, s, band_elements)
    return _tap_loop(padded, masks, k, s, band_elements)


def _as_nchw(out: torch.Tensor) -> torch.Tensor:
    """(N, h, s, w, s, G, C/G) -> (N, C, h*s, w*s), a channels-last view (no copy)."""
    n, h, s, w, _, g, cg = out.shape
    return out.view(n, h * s, w * s, g * cg).permute(0, 3, 1, 2)


def _mask_grad_by_rows(
    grad: torch.Tensor, padded: torch.Tensor, grad_masks: torch.Tensor, k: int, target_elements: int = 1 << 22
) -> None:
    """The mask gradient of an upsampling CARAFE (s > 1), written into `grad_masks`.

    For each input position, the s*s sub-pixel output gradients (s*s x C) times its k*k
    neighbourhood (C x k*k) is one small matrix product; the neighbourhoods are gathered for a band
    of rows at a time (bounded memory, `target_elements` floats) and multiplied in one batched
    product. Several times faster than k*k product-and-reduce passes over the output.
    """
    n, h, s, w, _, g, cg = grad.shape
    taps = k * k
    rows = max(1, min(h, target_elements // max(1, n * w * taps * g * cg)))
    # (N, h, w, G, s, s, k*k) view of the mask-gradient buffer
    target = grad_masks.view(n, g, taps, h, s, w, s).permute(0, 3, 5, 1, 4, 6, 2)
    for top in range(0, h, rows):
        r = min(rows, h - top)
        neighbourhoods = padded.new_empty(n, r, w, g, taps, cg)
        for i in range(k):
            for j in range(k):
                neighbourhoods[:, :, :, :, i * k + j] = padded[:, top + i : top + i + r, j : j + w]
        band = grad[:, top : top + r].permute(0, 1, 3, 5, 2, 4, 6).reshape(n * r * w * g, s * s, cg)
        products = torch.bmm(band, neighbourhoods.view(n * r * w * g, taps, cg).transpose(1, 2))
        target[:, top : top + r] = products.view(n, r, w, g, s, s, taps)


_Forward = Callable[[torch.Tensor, torch.Tensor, int, int, "int | None"], torch.Tensor]


class _Carafe(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        features: torch.Tensor,
        masks: torch.Tensor,
        k: int,
        g: int,
        s: int,
        band_elements: int | None,
        forward: _Forward,
    ) -> torch.Tensor:
        padded = _padded_channels_last(features, k, g)
        masks = masks.contiguous()
        ctx.save_for_backward(padded, masks)
        ctx.params = (k, s)
        return _as_nchw(forward(padded, masks, k, s, band_elements))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        padded, masks = ctx.saved_tensors
        k, s = ctx.params
        n, hp, wp, g, cg = padded.shape
        h, w = hp - (k - 1), wp - (k - 1)
        r = (k - 1) // 2
        # The output gradient in the forward's channels-last layout: (N, h, s, w, s, G, C/G).
        grad = grad_out.permute(0, 2, 3, 1).contiguous().view(n, h, s, w, s, g, cg)
        need_features, need_masks = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_padded = torch.zeros_like(padded) if need_features else None
        grad_masks = torch.empty_like(masks) if need_masks else None
        products = grad.new_empty(grad.shape) if need_masks and s == 1 else None
        for i in range(k):
            for j in range(k):
                tap = i * k + j
                mask = _mask_tap(masks, tap, g, k * k, h, s, w)
                if grad_padded is not None:
                    # d out / d feature = the mask; each feature feeds the s*s sub-pixels of its
                    # cell. Accumulated sub-pixel by sub-pixel: a multiply-add per element, where
                    # a product-then-reduce over the strided sub-pixel axes is ~10x slower.
                    target = grad_padded[:, i : i + h, j : j + w]
                    for a in range(s):
                        for b in range(s):
                            target.addcmul_(grad[:, :, a, :, b], mask[:, :, a, :, b])
                if grad_masks is not None and products is not None:  # needs masks' gradient, s == 1
                    # d out / d mask = the shifted feature, summed over the group's channels.
                    shifted = padded[:, i : i + h, j : j + w].unsqueeze(2).unsqueeze(4)
                    torch.mul(grad, shifted, out=products)
                    torch.sum(products, dim=-1, out=_mask_tap(grad_masks, tap, g, k * k, h, s, w).squeeze(-1))
        if grad_masks is not None and s > 1:
            _mask_grad_by_rows(grad, padded, grad_masks, k)
        grad_features = None
        if grad_padded is not None:
            grad_features = grad_padded[:, r : r + h, r : r + w].reshape(n, h, w, g * cg).permute(0, 3, 1, 2)
        return grad_features, grad_masks, None, None, None, None, None


def carafe(
    features: torch.Tensor,
    masks: torch.Tensor,
    kernel_size: int,
    group_size: int = 1,
    scale_factor: int = 1,
    band_elements: int | None = BAND_ELEMENTS,
) -> torch.Tensor:
    """CARAFE of `features` (N, C, h, w) with `masks` (N, G*k*k, h*s, w*s) -> (N, C, h*s, w*s).

    The result is channels-last in memory (call `.contiguous()` if you need NCHW strides).
    `band_elements` sets the banding of the computation (speed only; None: no banding).
    """
    return _carafe(features, masks, kernel_size, group_size, scale_factor, band_elements, _carafe_forward)


def carafe_upsample_into(
    features: torch.Tensor, masks: torch.Tensor, kernel_size: int, scale_factor: int, out: torch.Tensor
) -> torch.Tensor:
    """`carafe(features, masks, kernel_size, 1, scale_factor)` written into `out`, a channels-last
    (N, H, W, P, C/P) view (H, W the output size; the channels in P parts, which may lie apart, as
    in one side of an interleaved concatenation). Inference only, scale > 1, one group."""
    k, s = kernel_size, scale_factor
    _check_shapes(features, masks, k, 1, s)
    if torch.is_grad_enabled() and (features.requires_grad or masks.requires_grad):
        raise RuntimeError("carafe_upsample_into computes no gradient: call carafe, or run under torch.no_grad()")
    n, c, h, w = features.shape
    parts = out.shape[-2]
    if s < 2 or out.shape != (n, h * s, w * s, parts, c // parts):
        raise ValueError(
            f"carafe_upsample_into: out {tuple(out.shape)} does not fit features {tuple(features.shape)}, scale {s}"
        )
    padded = _padded_channels_last(features, k, 1)
    _upsample_by_products(padded, masks.contiguous(), k, s, out=out.view(n, h, s, w, s, parts, c // parts))
    return out


def carafe_taps(
    features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int = 1, scale_factor: int = 1
) -> torch.Tensor:
    """`carafe` as the tap loop over the whole map (no banding, no matrix products): the CARAFE of
    the benchmarks' reference computation (`offseg.optimize.reference_computation`), frozen there
    as it was defined. The same values as `carafe`; bit for bit where `carafe` runs the tap loop."""
    return _carafe(features, masks, kernel_size, group_size, scale_factor, None, _tap_loop)


def _carafe(
    features: torch.Tensor,
    masks: torch.Tensor,
    k: int,
    g: int,
    s: int,
    band_elements: int | None,
    forward: _Forward,
) -> torch.Tensor:
    _check_shapes(features, masks, k, g, s)
    if features.device.type == "meta":
        return _carafe_as_einsum(features, masks, k, g, s)
    if is_exporting():
        return _carafe_for_export(features, masks, k, g, s)
    if torch.is_grad_enabled() and (features.requires_grad or masks.requires_grad):
        return _Carafe.apply(features, masks, k, g, s, band_elements, forward)
    padded = _padded_channels_last(features, k, g)
    return _as_nchw(forward(padded, masks.contiguous(), k, s, band_elements))


def _carafe_as_einsum(features: torch.Tensor, masks: torch.Tensor, k: int, g: int, s: int) -> torch.Tensor:
    """The same sum as one einsum over a low-resolution unfold. Used on the meta device only
    (shape and FLOP tracing: `offseg.flops` reads its k*k multiply-adds per output element from
    the einsum), being much slower than the tap loop on real tensors."""
    n, c, h, w = features.shape
    patches = F.unfold(features, k, padding=(k - 1) // 2).view(n, g, c // g, k * k, h, w)
    out = torch.einsum("ngtyaxb,ngctyx->ngcyaxb", masks.view(n, g, k * k, h, s, w, s), patches)
    return out.reshape(n, c, h * s, w * s)


def _carafe_for_export(
    features: torch.Tensor, masks: torch.Tensor, k: int, g: int, s: int, softmax: bool = False
) -> torch.Tensor:
    """The same sum with operators that export to ONNX and run well in ONNX Runtime (no in-place
    or `out=` ops). Upsampling (s > 1): one batched matrix product per position, (s*s x k*k) masks
    times the (k*k x C) neighbourhood (ONNX Runtime's broadcasting multiply-adds are several times
    slower than that). s = 1: the tap loop.

    `softmax`: `masks` are logits, normalised here by a softmax over each position's k*k taps,
    taken once the taps are innermost for the matrix product (ONNX Runtime transposes twice for a
    softmax over a middle axis: 4.0 -> 1.3 ms for OffSeg-T's largest masks, 2 threads)."""
    n, c, h, w = features.shape
    r, taps, cg = (k - 1) // 2, k * k, c // g
    if softmax and s == 1:
        masks, softmax = masks.view(n, g, taps, h, w).softmax(dim=2).view(masks.shape), False
    padded = F.pad(features, (r, r, r, r)).permute(0, 2, 3, 1).reshape(n, h + 2 * r, w + 2 * r, g, cg)
    if s == 1:

        def tap_term(tap: int) -> torch.Tensor:
            i, j = divmod(tap, k)
            mask = masks.view(n, g, taps, h, w)[:, :, tap].permute(0, 2, 3, 1).unsqueeze(-1)
            return padded[:, i : i + h, j : j + w] * mask

        out = tap_term(0)
        for tap in range(1, taps):
            out = out + tap_term(tap)
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2)
    # The k*k neighbourhoods by one Gather of channel vectors from the flattened padded map (the
    # k*k slices and their concatenation wrote the neighbourhoods twice: 28 -> 19 ms in ONNX
    # Runtime for OffSeg-T's largest CARAFE, 2 threads). The indices come from the shapes, so a
    # graph exported with dynamic sizes stays valid.
    device = features.device
    rows = torch.arange(h, device=device).view(h, 1, 1, 1) + torch.arange(k, device=device).view(1, 1, k, 1)
    cols = torch.arange(w, device=device).view(1, w, 1, 1) + torch.arange(k, device=device).view(1, 1, 1, k)
    index = (rows * (w + 2 * r) + cols).reshape(-1)  # (h, w, k, k) flattened: position, tap
    neighbourhoods = padded.reshape(n, (h + 2 * r) * (w + 2 * r), g, cg).index_select(1, index)
    neighbourhoods = neighbourhoods.view(n, h, w, taps, g, cg)
    neighbourhoods = neighbourhoods.squeeze(4).unsqueeze(3) if g == 1 else neighbourhoods.permute(0, 1, 2, 4, 3, 5)
    weights = masks.view(n, g, taps, h, s, w, s).permute(0, 3, 5, 1, 4, 6, 2).reshape(n, h, w, g, s * s, taps)
    weights = weights.softmax(dim=-1) if softmax else weights
    out = torch.matmul(weights, neighbourhoods)  # (N, h, w, G, s*s, C/G)
    # To NCHW in two transposes that move whole runs (channels, then rows): a single one moving
    # single elements was ONNX Runtime's slowest op here (21 ms of OffSeg-T's 235 at 2 threads).
    out = out.view(n, h, w, g, s, s, cg).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, h * s * w * s, c)
    return out.transpose(1, 2).reshape(n, c, h * s, w * s)


def carafe_reference(
    features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int = 1, scale_factor: int = 1
) -> torch.Tensor:
    """The reference formulation: unfold the k*k neighbourhoods, upsample the unfold (nearest) to
    the output size, multiply by the masks and sum over the taps. Materialises k*k*s*s times the
    features; for benchmarks and tests."""
    k, g, s = kernel_size, group_size, scale_factor
    _check_shapes(features, masks, k, g, s)
    n, c, h, w = features.shape
    patches = F.unfold(features, k, padding=(k - 1) // 2).view(n, c * k * k, h, w)
    patches = F.interpolate(patches, scale_factor=s, mode="nearest") if s > 1 else patches
    patches = patches.view(n, g, c // g, k * k, h * s, w * s)
    out = (patches * masks.view(n, g, 1, k * k, h * s, w * s)).sum(dim=3)
    return out.view(n, c, h * s, w * s)
