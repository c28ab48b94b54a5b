"""FreqFusion (Chen et al., TPAMI 2024) as OffSeg uses it: fuse a low-resolution feature into a
high-resolution one with content-adaptive low-pass upsampling, a high-pass boost of the
high-resolution feature, and a similarity-guided offset resampler.

Only the configuration of the official OffSeg head is built (semi-conv, compressed-feature
kernel initialisation, high pass, residual, 4-group resampler, no Hamming window). Submodule
and buffer names follow the official checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .carafe import _carafe_for_export, carafe
from .tracing import is_exporting


def normalize_kernels(raw: torch.Tensor, kernel_size: int, window: torch.Tensor) -> torch.Tensor:
    """Softmax over the k*k taps of each position, times a window, renormalised to sum 1.

    raw: (N, G*k*k, H, W) -> same shape. A one-element window (the official modules' [1.0]) is a
    constant factor that the renormalisation cancels, and a softmax already sums to 1: then both
    steps are skipped, the same function without a multiply, a sum and a division per tap (values
    differ from the reference module by softmax round-off only).
    """
    n, c, h, w = raw.shape
    taps = kernel_size * kernel_size
    kernels = raw.view(n, c // taps, taps, h, w).softmax(dim=2)
    if window.numel() > 1:
        kernels = kernels * window.reshape(1, 1, taps, 1, 1)
        kernels = kernels / kernels.sum(dim=2, keepdim=True)
    return kernels.reshape(n, c, h, w)


def normalize_kernels_reference(raw: torch.Tensor, kernel_size: int, window: torch.Tensor) -> torch.Tensor:
    """`normalize_kernels` computed as the reference implementation does, with its memory traffic:
    softmax, then the taps moved innermost, windowed and divided by their sum in place, and moved
    back with a copy. For benchmarks and tests."""
    n, c, h, w = raw.shape
    k = kernel_size
    groups = c // (k * k)
    kernels = raw.view(n, groups, k * k, h, w).softmax(dim=2)
    kernels = kernels.view(n, groups, k, k, h, w).permute(0, 1, 4, 5, 2, 3).reshape(n, -1, k, k)
    kernels = kernels * (window if window.numel() == 1 else window.view(k, k))
    kernels /= kernels.sum(dim=(-1, -2), keepdim=True)
    kernels = kernels.view(n, groups, h, w, k * k).permute(0, 1, 4, 2, 3)
    return kernels.reshape(n, c, h, w).contiguous()


def carafe_with_kernels(
    features: torch.Tensor, raw: torch.Tensor, kernel_size: int, scale_factor: int, window: torch.Tensor
) -> torch.Tensor:
    """`carafe(features, normalize_kernels(raw, kernel_size, window), kernel_size, 1, scale_factor)`.
    While exporting with the official one-element window, the export's CARAFE takes the softmax
    itself, after it has moved the taps innermost (see `_carafe_for_export`)."""
    if is_exporting() and window.numel() == 1:
        return _carafe_for_export(features, raw, kernel_size, 1, scale_factor, softmax=True)
    return carafe(features, normalize_kernels(raw, kernel_size, window), kernel_size, 1, scale_factor)


# F.cosine_similarity divides each operand by max(||v||, eps) before the dot product.
_COSINE_EPS = 1e-8


def unit_channel_vectors(x: torch.Tensor, eps: float = _COSINE_EPS) -> torch.Tensor:
    """x / max(||x||_2 over channels, eps), exactly as F.cosine_similarity scales each operand
    (including its gradient: the clamp is outside the autograd graph there too)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clone()
    with torch.no_grad():
        norm.clamp_min_(eps)
    return x / norm


def local_cosine_similarity(x: torch.Tensor, dilation: int = 2) -> torch.Tensor:
    """Cosine similarity of each position to its 8 neighbours on a dilated 3x3 grid.

    Returns (B, 8, H, W), neighbours in row-major order without the centre; positions outside
    the map are zero vectors (similarity 0).

    The features are scaled to unit length once (not once per neighbour pair), and only the four
    "forward" neighbours are computed: the similarity to the opposite neighbour is the same dot
    product seen from the other end, i.e. the forward map shifted, with identical rounding.
    """
    h, w = x.shape[-2:]
    d = dilation
    unit = unit_channel_vectors(x)
    padded = F.pad(unit, (d, d, d, d))
    forward_sims = {}
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        neighbour = padded[:, :, d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w]
        sim = (unit * neighbour).sum(dim=1, keepdim=True)
        forward_sims[(dy, dx)] = sim
        # sim(p, p - o) = sim(p - o, p): the forward map read at p - o, zero where p - o is outside.
        padded_sim = F.pad(sim, (d, d, d, d))
        forward_sims[(-dy, -dx)] = padded_sim[:, :, d - dy * d : d - dy * d + h, d - dx * d : d - dx * d + w]
    order = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return torch.cat([forward_sims[o] for o in order], dim=1)


def local_cosine_similarity_reference(x: torch.Tensor, dilation: int = 2) -> torch.Tensor:
    """`local_cosine_similarity` as the reference implementation computes it: a dilated 3x3
    unfold (9 copies of the map) and F.cosine_similarity of the centre against all 9 taps, the
    centre column dropped afterwards. For benchmarks and tests."""
    b, c, h, w = x.shape
    k = 3
    patches = F.unfold(x, k, padding=dilation, dilation=dilation).reshape(b, c, k * k, h, w)
    centre = k * k // 2
    sims = F.cosine_similarity(patches[:, :, centre : centre + 1], patches, dim=1)
    return torch.cat([sims[:, :centre], sims[:, centre + 1 :]], dim=1).view(b, k * k - 1, h, w)


class LocalSimGuidedSampler(nn.Module):
    """Resamples an upsampled feature at positions offset by amounts predicted from the local
    similarity structure of the high- and low-resolution guidance features (scale 2)."""

    scale = 2

    def __init__(self, in_channels: int, groups: int = 4, kernel_size: int = 3) -> None:
        super().__init__()
        if in_channels % groups or in_channels % 8:
            raise ValueError(f"in_channels {in_channels} must be divisible by groups {groups} and by 8")
        self.groups = groups
        sub = self.scale**2
        pad = kernel_size // 2
        self.offset = nn.Conv2d(8, 2 * groups * sub, kernel_size, padding=pad)
        self.direct_scale = nn.Conv2d(in_channels, 2 * groups * sub, kernel_size, padding=pad)
        self.hr_offset = nn.Conv2d(8, 2 * groups, kernel_size, padding=pad)
        self.hr_direct_scale = nn.Conv2d(in_channels, 2 * groups, kernel_size, padding=pad)
        self.gather_sampler = GatherSampler()  # the resampling while exporting to ONNX (no weights)
        self.norm_hr = nn.GroupNorm(in_channels // 8, in_channels)
        self.norm_lr = nn.GroupNorm(in_channels // 8, in_channels)
        # Sub-pixel centres of the 2x2 output cells, +-0.25 low-resolution pixels, laid out as
        # (x/y, group, sub-pixel row, sub-pixel col) to match the offset channels.
        half = torch.tensor([-0.25, 0.25])
        grid = torch.stack([half.view(1, 2).expand(2, 2), half.view(2, 1).expand(2, 2)])  # (2, 2, 2)
        self.register_buffer("init_pos", grid.reshape(2, 1, 4).repeat(1, groups, 1).reshape(1, -1, 1, 1))
        for conv in (self.offset, self.hr_offset):
            nn.init.normal_(conv.weight, std=0.001)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        for conv in (self.direct_scale, self.hr_direct_scale):
            nn.init.zeros_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, hr_x: torch.Tensor, lr_x: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        return self.sample(feat, self.offsets(hr_x, lr_x))

    def offsets(self, hr_x: torch.Tensor, lr_x: torch.Tensor) -> torch.Tensor:
        """The resampling offsets (B, 2*G*4, H, W) from the guidance features: they do not depend on
        the feature being resampled, so `FreqFusion.forward` computes them before that exists."""
        hr_x = self.norm_hr(hr_x)
        lr_x = self.norm_lr(lr_x)
        hr_sim = local_cosine_similarity(hr_x)
        lr_sim = local_cosine_similarity(lr_x)
        return (self.offset(lr_sim) + F.pixel_unshuffle(self.hr_offset(hr_sim), self.scale)) * (
            self.direct_scale(lr_x) + F.pixel_unshuffle(self.hr_direct_scale(hr_x), self.scale)
        ).sigmoid() + self.init_pos

    def sample(self, feat: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Bilinear samples of `feat` (B, C, 2H, 2W) at the low-resolution pixel centres plus
        `offset` (B, 2*G*4, H, W, in low-resolution pixels), one offset field per channel group."""
        b, _, hs, ws = feat.shape
        coords = self.coordinates(offset, feat)  # B, G, 2H, 2W, (x, y)
        if is_exporting():
            return self.gather_sampler(feat, coords)
        return self.resample(feat.reshape(b * self.groups, -1, hs, ws), coords.flatten(0, 1)).view(b, -1, hs, ws)

    def coordinates(self, offset: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """The sampling grid of each channel group, (B, G, 2H, 2W, (x, y)) in grid_sample's [-1, 1]
        convention, for `offset` (B, 2*G*4, H, W) and a feature of `feat`'s dtype and device."""
        b, _, h, w = offset.shape
        s = self.scale
        offset = offset.view(b, 2, -1, h, w)
        ys = torch.arange(h, dtype=feat.dtype, device=feat.device) + 0.5
        xs = torch.arange(w, dtype=feat.dtype, device=feat.device) + 0.5
        centres = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)]).view(1, 2, 1, h, w)
        normalizer = torch.tensor([w, h], dtype=feat.dtype, device=feat.device).view(1, 2, 1, 1, 1)
        coords = 2 * (centres + offset) / normalizer - 1
        coords = F.pixel_shuffle(coords.reshape(b, -1, h, w), s).view(b, 2, -1, s * h, s * w)
        return coords.permute(0, 2, 3, 4, 1)

    @staticmethod
    def resample(feat: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """`feat` (N, C, H', W') sampled bilinearly at `coords` (N, H'', W'', 2), border-clamped."""
        return F.grid_sample(feat, coords, mode="bilinear", padding_mode="border", align_corners=False)


class GatherSampler(nn.Module):
    """The sampler's resampling while exporting to ONNX: `feat` (B, C, H', W') sampled at `coords`
    (B, G, H'', W'', 2), channel group g at coords[:, g], by `_grid_sample_for_export`.

    A module, so that its nodes in an exported graph carry a path of their own: int8 quantisation
    keeps them float (`offseg.quantize`), as it keeps GridSample; sampling coordinates and weights
    in 8 bits would move every sample. A group at a time: ONNX Runtime holds each call's gathered
    neighbours, and all groups at once doubled the int8 model's peak memory."""

    def forward(self, feat: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feat.shape
        groups = coords.shape[1]
        feat = feat.view(b, groups, c // groups, h, w)
        return torch.cat([_grid_sample_for_export(feat[:, g], coords[:, g]) for g in range(groups)], dim=1)


def bilinear_border_neighbours(coords: torch.Tensor, h: int, w: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The four neighbours of each sample of `F.grid_sample(feat, coords, "bilinear", "border",
    align_corners=False)` on N maps of h x w: (index, weight) pairs, each of coords' shape but the
    last axis ((N, H'', W''), or (N, ..., H'', W'') for several grids per map), the index counting
    the N*h*w pixels row-major, in grid_sample's order (top-left, top-right, bottom-left,
    bottom-right). Same arithmetic per sample: coordinates unnormalised and clamped, weights
    (1 - dx)(1 - dy) ..."""
    n = coords.shape[0]
    x = (((coords[..., 0] + 1) * w - 1) / 2).clamp(0, w - 1)
    y = (((coords[..., 1] + 1) * h - 1) / 2).clamp(0, h - 1)
    x0, y0 = x.floor(), y.floor()
    dx, dy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    base = (torch.arange(n, device=coords.device) * (h * w)).view(n, *[1] * (coords.dim() - 2))
    return [
        (base + y0 * w + x0, (1 - dx) * (1 - dy)),
        (base + y0 * w + x1, dx * (1 - dy)),
        (base + y1 * w + x0, (1 - dx) * dy),
        (base + y1 * w + x1, dx * dy),
    ]


def _grid_sample_for_export(feat: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """`F.grid_sample(feat, coords, "bilinear", "border", align_corners=False)` as ONNX Runtime runs
    it fast: the four neighbours of every sample (`bilinear_border_neighbours`) gathered as whole
    channel vectors from the channels-last map, then weighted and summed. ONNX Runtime's
    GridSample took 2.5x longer on OffSeg-T's resamplers."""
    n, c, h, w = feat.shape
    rows = feat.permute(0, 2, 3, 1).reshape(n * h * w, c)
    out = None
    # one neighbour at a time: gathering all four at once made a 4x larger transient (ONNX Runtime
    # keeps it and its weighted copy: the int8 model's peak memory doubled)
    for index, weight in bilinear_border_neighbours(coords, h, w):
        term = rows.index_select(0, index.reshape(-1)).view(*index.shape, c) * weight.unsqueeze(-1)
        out = term if out is None else out + term
    assert out is not None
    return out.permute(0, 3, 1, 2).contiguous()


class FreqFusion(nn.Module):
    """Fuse `lr_feat` (B, C_lr, H, W) into `hr_feat` (B, C_hr, 2H, 2W).

    Returns (mask_lr, hr_feat, lr_feat): the normalised low-pass kernels (B, k_l^2, 2H, 2W), the
    high-pass-boosted high-resolution feature and the upsampled, resampled low-resolution feature.
    """

    hamming_lowpass: torch.Tensor  # buffers, registered in __init__
    hamming_highpass: torch.Tensor

    def __init__(
        self,
        hr_channels: int,
        lr_channels: int,
        compressed_channels: int,
        lowpass_kernel: int = 5,
        highpass_kernel: int = 3,
        encoder_kernel: int = 3,
        resample_groups: int = 4,
    ) -> None:
        super().__init__()
        self.lowpass_kernel = lowpass_kernel
        self.highpass_kernel = highpass_kernel
        # Window buffers of the official module; [1.0] means no window.
        self.register_buffer("hamming_lowpass", torch.ones(1))
        self.register_buffer("hamming_highpass", torch.ones(1))
        self.hr_channel_compressor = nn.Conv2d(hr_channels, compressed_channels, 1)
        self.lr_channel_compressor = nn.Conv2d(lr_channels, compressed_channels, 1)
        pad = (encoder_kernel - 1) // 2
        self.content_encoder = nn.Conv2d(compressed_channels, lowpass_kernel**2, encoder_kernel, padding=pad)
        self.dysampler = LocalSimGuidedSampler(compressed_channels, resample_groups, encoder_kernel)
        self.content_encoder2 = nn.Conv2d(compressed_channels, highpass_kernel**2, encoder_kernel, padding=pad)
        for conv in (self.hr_channel_compressor, self.lr_channel_compressor):
            nn.init.xavier_uniform_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        for conv in (self.content_encoder, self.content_encoder2):
            nn.init.normal_(conv.weight, std=0.001)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, hr_feat: torch.Tensor, lr_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kl, kh = self.lowpass_kernel, self.highpass_kernel
        lowpass_window, highpass_window = self.hamming_lowpass, self.hamming_highpass
        hr_c = self.hr_channel_compressor(hr_feat)
        lr_c = self.lr_channel_compressor(lr_feat)

        # High-pass boost of the compressed high-resolution feature guides the kernels below.
        mask_hr_hr = self.content_encoder2(hr_c)
        hr_c = hr_c + hr_c - carafe(hr_c, normalize_kernels(mask_hr_hr, kh, highpass_window), kh, 1, 1)

        # Low-pass kernels from both resolutions; the low-resolution part is upsampled by CARAFE
        # with kernels predicted at high resolution.
        mask_lr_hr = self.content_encoder(hr_c)
        mask_lr = mask_lr_hr + carafe_with_kernels(self.content_encoder(lr_c), mask_lr_hr, kl, 2, lowpass_window)
        mask_hr = mask_hr_hr + carafe_with_kernels(self.content_encoder2(lr_c), mask_lr, kl, 2, lowpass_window)
        del mask_lr_hr, mask_hr_hr

        # The same steps as the reference order, rearranged for memory: each map is dropped once
        # used, and the resampling offsets come before the upsampled low-resolution feature, the
        # widest map here (at 1/4 resolution in OffSeg), so that the two never coexist.
        offset = self.dysampler.offsets(hr_c, lr_c)
        del hr_c, lr_c
        mask_hr = normalize_kernels(mask_hr, kh, highpass_window)
        hr_out = (hr_feat - carafe(hr_feat, mask_hr, kh, 1, 1)) + hr_feat
        del mask_hr
        if is_exporting():  # the kernels' softmax inside the export's CARAFE (carafe_with_kernels)
            upsampled = carafe_with_kernels(lr_feat, mask_lr, kl, 2, lowpass_window)
            return normalize_kernels(mask_lr, kl, lowpass_window), hr_out, self.dysampler.sample(upsampled, offset)
        mask_lr = normalize_kernels(mask_lr, kl, lowpass_window)
        return mask_lr, hr_out, self.upsample_lr(lr_feat, mask_lr, offset)

    def upsample_lr(self, lr_feat: torch.Tensor, mask_lr: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """`lr_feat` upsampled by CARAFE with the kernels `mask_lr`, then resampled at `offset`."""
        return self.dysampler.sample(carafe(lr_feat, mask_lr, self.lowpass_kernel, 1, 2), offset)

    def forward_reference(
        self, hr_feat: torch.Tensor, lr_feat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` as the reference implementation runs it: the same steps plus its two
        nearest-neighbour resizes of the CARAFE-upsampled kernel maps to the size they already
        have. Call it under `offseg.optimize.reference_computation()` to also get the reference
        similarity and normaliser. For benchmarks and tests."""
        kl, kh = self.lowpass_kernel, self.highpass_kernel
        lowpass_window, highpass_window = self.hamming_lowpass, self.hamming_highpass
        hr_c = self.hr_channel_compressor(hr_feat)
        lr_c = self.lr_channel_compressor(lr_feat)
        size = hr_c.shape[-2:]
        mask_hr_hr = self.content_encoder2(hr_c)
        hr_c = hr_c + hr_c - carafe(hr_c, normalize_kernels(mask_hr_hr, kh, highpass_window), kh, 1, 1)
        mask_lr_hr = self.content_encoder(hr_c)
        init_kernels = normalize_kernels(mask_lr_hr, kl, lowpass_window)
        upsampled = carafe(self.content_encoder(lr_c), init_kernels, kl, 1, 2)
        mask_lr = mask_lr_hr + F.interpolate(upsampled, size=size, mode="nearest")
        init_kernels = normalize_kernels(mask_lr, kl, lowpass_window)
        upsampled = carafe(self.content_encoder2(lr_c), init_kernels, kl, 1, 2)
        mask_hr = mask_hr_hr + F.interpolate(upsampled, size=size, mode="nearest")
        mask_lr = normalize_kernels(mask_lr, kl, lowpass_window)
        lr_up = carafe(lr_feat, mask_lr, kl, 1, 2)
        mask_hr = normalize_kernels(mask_hr, kh, highpass_window)
        hr_out = (hr_feat - carafe(hr_feat, mask_hr, kh, 1, 1)) + hr_feat
        lr_up = self.dysampler(hr_c, lr_c, lr_up)
        return mask_lr, hr_out, lr_up
