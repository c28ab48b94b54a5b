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

from .carafe import carafe


def normalize_kernels(raw: torch.Tensor, kernel_size: int, window: torch.Tensor) -> torch.Tensor:
    """Softmax over the k*k taps of each position, times a window, renormalised to sum 1.

    raw: (N, G*k*k, H, W) -> same shape. With the default window [1.0] the renormalisation only
    removes softmax round-off; it is kept so that the numbers match the official module.
    """
    n, c, h, w = raw.shape
    taps = kernel_size * kernel_size
    kernels = raw.view(n, c // taps, taps, h, w).softmax(dim=2)
    if window.numel() > 1:
        kernels = kernels * window.reshape(1, 1, taps, 1, 1)
    kernels = kernels / kernels.sum(dim=2, keepdim=True)
    return kernels.view(n, c, h, w)


def local_cosine_similarity(x: torch.Tensor, dilation: int = 2) -> torch.Tensor:
    """Cosine similarity of each position to its 8 neighbours on a dilated 3x3 grid.

    Returns (B, 8, H, W), neighbours in row-major order without the centre; positions outside
    the map are zero vectors (similarity 0).
    """
    h, w = x.shape[-2:]
    d = dilation
    padded = F.pad(x, (d, d, d, d))
    sims = []
    for i in range(3):
        for j in range(3):
            if i == 1 and j == 1:
                continue
            neighbour = padded[:, :, i * d : i * d + h, j * d : j * d + w]
            sims.append(F.cosine_similarity(x, neighbour, dim=1))
    return torch.stack(sims, dim=1)


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
        self.norm_hr = nn.GroupNorm(in_channels // 8, in_channels)
        self.norm_lr = nn.GroupNorm(in_channels // 8, in_channels)
        # Sub-pixel centres of the 2x2 output cells, +-0.25 low-resolution pixels, laid out as
        # (x/y, group, sub-pixel row, sub-pixel col) to match the offset channels.
        half = torch.tensor([-0.25, 0.25])
        grid = torch.stack([half.view(1, 2).expand(2, 2), half.view(2, 1).expand(2, 2)])  # (2, 2, 2)
        self.register_buffer("init_pos", grid.reshape(2, 1, 4).repeat(1, groups, 1).reshape(1, -1, 1, 1))
        for conv in (self.offset, self.hr_offset):
            nn.init.normal_(conv.weight, std=0.001)
            nn.init.zeros_(conv.bias)
        for conv in (self.direct_scale, self.hr_direct_scale):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, hr_x: torch.Tensor, lr_x: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        hr_x = self.norm_hr(hr_x)
        lr_x = self.norm_lr(lr_x)
        hr_sim = local_cosine_similarity(hr_x)
        lr_sim = local_cosine_similarity(lr_x)
        offset = (self.offset(lr_sim) + F.pixel_unshuffle(self.hr_offset(hr_sim), self.scale)) * (
            self.direct_scale(lr_x) + F.pixel_unshuffle(self.hr_direct_scale(hr_x), self.scale)
        ).sigmoid() + self.init_pos
        return self.sample(feat, offset)

    def sample(self, feat: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Bilinear samples of `feat` (B, C, 2H, 2W) at the low-resolution pixel centres plus
        `offset` (B, 2*G*4, H, W, in low-resolution pixels), one offset field per channel group."""
        b, _, h, w = offset.shape
        s, g = self.scale, self.groups
        offset = offset.view(b, 2, -1, h, w)
        ys = torch.arange(h, dtype=feat.dtype, device=feat.device) + 0.5
        xs = torch.arange(w, dtype=feat.dtype, device=feat.device) + 0.5
        centres = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)]).view(1, 2, 1, h, w)
        normalizer = torch.tensor([w, h], dtype=feat.dtype, device=feat.device).view(1, 2, 1, 1, 1)
        coords = 2 * (centres + offset) / normalizer - 1
        coords = F.pixel_shuffle(coords.view(b, -1, h, w), s).view(b, 2, -1, s * h, s * w)
        coords = coords.permute(0, 2, 3, 4, 1).flatten(0, 1)  # B*G, 2H, 2W, (x, y)
        sampled = F.grid_sample(
            feat.reshape(b * g, -1, feat.shape[-2], feat.shape[-1]),
            coords,
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )
        return sampled.view(b, -1, s * h, s * w)


class FreqFusion(nn.Module):
    """Fuse `lr_feat` (B, C_lr, H, W) into `hr_feat` (B, C_hr, 2H, 2W).

    Returns (mask_lr, hr_feat, lr_feat): the normalised low-pass kernels (B, k_l^2, 2H, 2W), the
    high-pass-boosted high-resolution feature and the upsampled, resampled low-resolution feature.
    """

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
            nn.init.zeros_(conv.bias)
        for conv in (self.content_encoder, self.content_encoder2):
            nn.init.normal_(conv.weight, std=0.001)
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
        init_kernels = normalize_kernels(mask_lr_hr, kl, lowpass_window)
        mask_lr = mask_lr_hr + carafe(self.content_encoder(lr_c), init_kernels, kl, 1, 2)
        init_kernels = normalize_kernels(mask_lr, kl, lowpass_window)
        mask_hr = mask_hr_hr + carafe(self.content_encoder2(lr_c), init_kernels, kl, 1, 2)

        mask_lr = normalize_kernels(mask_lr, kl, lowpass_window)
        lr_up = carafe(lr_feat, mask_lr, kl, 1, 2)
        mask_hr = normalize_kernels(mask_hr, kh, highpass_window)
        hr_out = (hr_feat - carafe(hr_feat, mask_hr, kh, 1, 1)) + hr_feat
        lr_up = self.dysampler(hr_c, lr_c, lr_up)
        return mask_lr, hr_out, lr_up
