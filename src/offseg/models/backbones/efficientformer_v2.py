"""EfficientFormerV2 (Li et al., ICCV 2023) as the OffSeg feature backbone.

Four stages of conv FFN blocks at strides 4/8/16/32; the last blocks of stages 3 and 4 add 4-D
multi-head attention with learned relative-position biases, and the stage 3->4 downsampling is
itself an attention. State-dict keys follow the official segmentation variant (`*_feat`):
`patch_embed.*` and `network.{0..6}.*`, with per-attention `attention_biases_seg` tables sized
for a 512x512 input and resized bicubically to the run-time token counts (identity at 512x512).

BatchNorm in training: the official backbone means to freeze BN statistics while training, but
in the paper's runs that freeze never took effect (see SPEC §2), so BN statistics are trained by
default here; `freeze_bn=True` keeps every BN in eval mode instead.
"""

from __future__ import annotations

import itertools
import math
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.drop_path import DropPath

# name: (widths, depths, attention blocks per late stage, drop-path rate, MLP expansion ratios per stage)
EFFICIENTFORMER_V2_ARCHS: dict[str, dict] = {
    "s0": dict(
        widths=(32, 48, 96, 176),
        depths=(2, 2, 6, 4),
        vit_num=2,
        drop_path_rate=0.0,
        mlp_ratios=((4, 4), (4, 4), (4, 3, 3, 3, 4, 4), (4, 3, 3, 4)),
    ),
    "s1": dict(
        widths=(32, 48, 120, 224),
        depths=(3, 3, 9, 6),
        vit_num=2,
        drop_path_rate=0.0,
        mlp_ratios=((4, 4, 4), (4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)),
    ),
    "s2": dict(
        widths=(32, 64, 144, 288),
        depths=(4, 4, 12, 8),
        vit_num=4,
        drop_path_rate=0.02,
        mlp_ratios=((4,) * 4, (4,) * 4, (4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4)),
    ),
    "l": dict(
        widths=(40, 80, 192, 384),
        depths=(5, 5, 15, 10),
        vit_num=6,
        drop_path_rate=0.1,
        mlp_ratios=(
            (4,) * 5,
            (4,) * 5,
            (4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4),
            (4, 4, 4, 3, 3, 3, 3, 4, 4, 4),
        ),
    ),
}


def conv_bn(in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups), nn.BatchNorm2d(out_ch)
    )


def relative_offset_index(query_side: int, key_side: int) -> torch.Tensor:
    """Index table (Nq, Nk) of the distinct |dy|, |dx| offsets between query and key grid points.

    Query point p sits at key coordinate p * (key_side / query_side); offsets are numbered in
    order of first appearance, as the official tables are.
    """
    step = math.ceil(key_side / query_side)
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for qy, qx in itertools.product(range(query_side), repeat=2):
        for ky, kx in itertools.product(range(key_side), repeat=2):
            off = (abs(qy * step - ky), abs(qx * step - kx))
            idxs.append(offsets.setdefault(off, len(offsets)))
    return torch.tensor(idxs, dtype=torch.long).view(query_side**2, key_side**2)


class _BatchNormGELUConv(torch.autograd.Function):
    """conv(GELU(BatchNorm(x))), or GELU(BatchNorm(x)) without a conv, keeping only x for the
    backward: the BN output and the GELU output (the conv input) are recomputed there from x,
    an elementwise pass, instead of being stored. Two activation-sized tensors less per block
    while training; the same function and gradients as the three modules applied in turn."""

    @staticmethod
    def forward(
        ctx,
        x,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        training,
        momentum,
        eps,
        conv_weight,
        conv_bias,
        conv_args,
    ):
        normed, mean, invstd = torch.ops.aten.native_batch_norm(
            x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps
        )
        # Running statistics are needed by the backward only in eval mode (where they are not
        # updated in place); in training mode the batch statistics come from the forward.
        stats = (None, None) if training else (running_mean, running_var)
        ctx.save_for_backward(x, bn_weight, bn_bias, *stats, mean, invstd, conv_weight)
        ctx.training, ctx.eps, ctx.conv_args = training, eps, conv_args
        ctx.conv_has_bias = conv_bias is not None
        activated = F.gelu(normed)
        if conv_weight is None:
            return activated
        stride, padding, dilation, groups = conv_args
        return F.conv2d(activated, conv_weight, conv_bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, bn_weight, bn_bias, running_mean, running_var, mean, invstd, conv_weight = ctx.saved_tensors
        shape = (1, -1, 1, 1)
        if ctx.training:
            scale, centre = invstd, mean
        else:
            scale, centre = torch.rsqrt(running_var + ctx.eps), running_mean
        if bn_weight is not None:
            scale = scale * bn_weight
        shift = -centre * scale if bn_bias is None else bn_bias - centre * scale
        normed = torch.addcmul(shift.view(shape), x, scale.view(shape))  # one pass over x
        grad_conv_weight = grad_conv_bias = None
        if conv_weight is not None:
            stride, padding, dilation, groups = ctx.conv_args
            needs = ctx.needs_input_grad
            grad, grad_conv_weight, grad_conv_bias = torch.ops.aten.convolution_backward(
                grad,
                F.gelu(normed),
                conv_weight,
                [conv_weight.shape[0]] if ctx.conv_has_bias else None,
                stride,
                padding,
                dilation,
                False,
                [0, 0],
                groups,
                [True, needs[8], ctx.conv_has_bias and needs[9]],
            )
        grad_normed = torch.ops.aten.gelu_backward(grad, normed)
        needs = ctx.needs_input_grad
        wants = [needs[0], bn_weight is not None and needs[1], bn_bias is not None and needs[2]]
        grad_x, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad_normed, x, bn_weight, running_mean, running_var, mean, invstd, ctx.training, ctx.eps, wants
        )
        return (
            grad_x,
            grad_bn_weight,
            grad_bn_bias,
            None,
            None,
            None,
            None,
            None,
            grad_conv_weight,
            grad_conv_bias,
            None,
        )


def batch_norm_gelu(norm: nn.Module, act: nn.Module, x: torch.Tensor, conv: nn.Conv2d | None = None) -> torch.Tensor:
    """`conv(act(norm(x)))` (or `act(norm(x))` without conv). For BatchNorm2d -> exact GELU
    [-> zero-padded Conv2d] while gradients are recorded, the memory-saving fused form
    (`_BatchNormGELUConv`; the running statistics are updated as nn.BatchNorm2d does)."""
    fusable = (
        type(act) is nn.GELU
        and act.approximate == "none"
        and (
            conv is None
            or (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))
        )
        and torch.is_grad_enabled()
        and x.requires_grad
    )
    if type(norm) is not nn.BatchNorm2d or not fusable:
        out = act(norm(x))
        return out if conv is None else conv(out)
    norm._check_input_dim(x)
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(norm.num_batches_tracked)
    use_batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
    track = not norm.training or norm.track_running_stats
    conv_args = None if conv is None else (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    return _BatchNormGELUConv.apply(
        x,
        norm.weight,
        norm.bias,
        norm.running_mean if track else None,
        norm.running_var if track else None,
        use_batch_stats,
        momentum,
        norm.eps,
        None if conv is None else conv.weight,
        None if conv is None else conv.bias,
        conv_args,
    )


def batch_norm_gelu_reference(
    norm: nn.Module, act: nn.Module, x: torch.Tensor, conv: nn.Conv2d | None = None
) -> torch.Tensor:
    """`batch_norm_gelu` as three module calls, storing every intermediate for the backward as the
    reference implementation does. For benchmarks and tests (`offseg.optimize.reference_computation`)."""
    out = act(norm(x))
    return out if conv is None else conv(out)


def mix_heads(mix: nn.Conv2d, maps: torch.Tensor) -> torch.Tensor:
    """The talking-head 1x1 conv `mix` over the head axis of (B, heads, Nq, Nk) maps, computed as
    one batched matrix product: the same function as `mix(maps)`, but a 1x1 conv over 8 channels
    is an order of magnitude slower on CPU (forward and backward)."""
    if maps.device.type == "meta" or mix.bias is None:
        # Shape-only tracing (offseg.flops counts FLOPs on the meta device): the module call, so
        # that the count is that of the official 1x1 conv. (The talking heads always have a bias.)
        return mix(maps)
    b, heads, nq, nk = maps.shape
    weight = mix.weight.view(heads, heads).expand(b, heads, heads)
    bias = mix.bias.view(1, heads, 1).expand(b, heads, nq * nk)
    return torch.baddbmm(bias, weight, maps.reshape(b, heads, nq * nk)).view(b, heads, nq, nk)


class AttentionBias(nn.Module):
    """Shared machinery of the two attentions: the relative-position bias tables."""

    attention_bias_idxs_seg: torch.Tensor  # buffer, registered in _init_biases

    def _init_biases(self, num_heads: int, query_side: int, key_side: int, legacy_shape: tuple[int, int]) -> None:
        idxs = relative_offset_index(query_side, key_side)
        self.attention_biases_seg = nn.Parameter(torch.zeros(num_heads, int(idxs.max()) + 1))
        self.register_buffer("attention_bias_idxs_seg", idxs)
        # Unused by the forward; kept because official checkpoints (and ImageNet releases) carry them.
        self.register_buffer("attention_biases", torch.zeros(num_heads, legacy_shape[1]))
        self.register_buffer("attention_bias_idxs", torch.ones(legacy_shape, dtype=torch.long))

    def position_bias(self, num_queries: int, num_keys: int) -> torch.Tensor:
        """(1, heads, Nq, Nk) bias, the 512x512 table resized bicubically over the flattened token axes."""
        bias = self.attention_biases_seg[:, self.attention_bias_idxs_seg].unsqueeze(0)
        if bias.shape[-2:] == (num_queries, num_keys):
            return bias  # bicubic resize to the same size is the identity
        return F.interpolate(bias, size=(num_queries, num_keys), mode="bicubic", align_corners=False)


class Attention4D(AttentionBias):
    """Multi-head attention over a feature map, with talking heads and a depthwise local value
    branch. With `stride=2` it attends at half resolution and upsamples the result."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        stride: int | None = None,
        key_dim: int = 32,
        num_heads: int = 8,
        attn_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.d = attn_ratio * key_dim
        self.dh = self.d * num_heads
        self.stride_conv: nn.Sequential | None
        self.upsample: nn.Upsample | None
        if stride is not None:
            resolution = math.ceil(resolution / stride)
            self.stride_conv = conv_bn(dim, dim, 3, stride, groups=dim)
            self.upsample = nn.Upsample(scale_factor=stride, mode="bilinear")
        else:
            self.stride_conv = None
            self.upsample = None
        self.q = conv_bn(dim, num_heads * key_dim)
        self.k = conv_bn(dim, num_heads * key_dim)
        self.v = conv_bn(dim, self.dh)
        self.v_local = conv_bn(self.dh, self.dh, 3, groups=self.dh)
        self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1)
        self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1)
        self.proj = nn.Sequential(nn.GELU(), nn.Conv2d(self.dh, dim, 1), nn.BatchNorm2d(dim))
        self._init_biases(num_heads, resolution, resolution, (49, 49))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        h, w = x.shape[-2:]
        n = h * w
        q = self.q(x).reshape(b, self.num_heads, -1, n).transpose(2, 3)
        k = self.k(x).reshape(b, self.num_heads, -1, n)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(b, self.num_heads, -1, n)  # (B, heads, d, n)

        attn = (q @ k) * self.scale + self.position_bias(n, n)
        attn = mix_heads(self.talking_head1, attn).softmax(dim=-1)
        attn = mix_heads(self.talking_head2, attn)
        # (attn @ v^T)^T computed as v @ attn^T: already in (B, heads*d, h, w) order, no transpose copy.
        out = (v @ attn.transpose(2, 3)).reshape(b, self.dh, h, w) + v_local
        if self.upsample is not None:
            out = self.upsample(out)
        return self.proj(out)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` with the reference implementation's operations (talking heads as 1x1 convs,
        transposed products and copies); same function. For benchmarks and tests
        (`offseg.optimize.reference_computation`)."""
        b = x.shape[0]
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        h, w = x.shape[-2:]
        n = h * w
        q = self.q(x).flatten(2).reshape(b, self.num_heads, -1, n).permute(0, 1, 3, 2)
        k = self.k(x).flatten(2).reshape(b, self.num_heads, -1, n)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.flatten(2).reshape(b, self.num_heads, -1, n).permute(0, 1, 3, 2)
        attn = (q @ k) * self.scale + self.position_bias(n, n)
        attn = self.talking_head2(self.talking_head1(attn).softmax(dim=-1))
        out = (attn @ v).transpose(2, 3).reshape(b, self.dh, h, w) + v_local
        if self.upsample is not None:
            out = self.upsample(out)
        return self.proj(out)


class LGQuery(nn.Module):
    """Local-global query for the attention downsampling: strided depthwise conv plus 2x subsampling."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(1, 2, 0)
        self.local = nn.Sequential(nn.Conv2d(in_dim, in_dim, 3, 2, 1, groups=in_dim))
        self.proj = conv_bn(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.local(x) + self.pool(x))


class Attention4DDownsample(AttentionBias):
    """Attention whose queries live at half resolution: a learned stride-2 downsampling."""

    def __init__(
        self, dim: int, out_dim: int, resolution: int, key_dim: int = 16, num_heads: int = 8, attn_ratio: int = 4
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.d = attn_ratio * key_dim
        self.dh = self.d * num_heads
        self.q = LGQuery(dim, num_heads * key_dim)
        self.k = conv_bn(dim, num_heads * key_dim)
        self.v = conv_bn(dim, self.dh)
        self.v_local = conv_bn(self.dh, self.dh, 3, 2, groups=self.dh)
        self.proj = nn.Sequential(nn.GELU(), nn.Conv2d(self.dh, out_dim, 1), nn.BatchNorm2d(out_dim))
        self._init_biases(num_heads, math.ceil(resolution / 2), resolution, (49, 196))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        q = self.q(x)
        hq, wq = q.shape[-2:]
        q = q.reshape(b, self.num_heads, -1, hq * wq).transpose(2, 3)
        k = self.k(x).reshape(b, self.num_heads, -1, n)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(b, self.num_heads, -1, n)  # (B, heads, d, n)

        attn = (q @ k) * self.scale + self.position_bias(hq * wq, n)
        out = (v @ attn.softmax(dim=-1).transpose(2, 3)).reshape(b, self.dh, hq, wq) + v_local
        return self.proj(out)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` with the reference implementation's transposed products and copies."""
        b, _, h, w = x.shape
        n = h * w
        q = self.q(x)
        hq, wq = q.shape[-2:]
        q = q.flatten(2).reshape(b, self.num_heads, -1, hq * wq).permute(0, 1, 3, 2)
        k = self.k(x).flatten(2).reshape(b, self.num_heads, -1, n)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.flatten(2).reshape(b, self.num_heads, -1, n).permute(0, 1, 3, 2)
        attn = (q @ k) * self.scale + self.position_bias(hq * wq, n)
        out = (attn.softmax(dim=-1) @ v).transpose(2, 3).reshape(b, self.dh, hq, wq) + v_local
        return self.proj(out)


class Mlp(nn.Module):
    """1x1 conv MLP with a depthwise 3x3 conv in the middle; BN after every conv."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)
        for fc in (self.fc1, self.fc2):
            nn.init.trunc_normal_(fc.weight, std=0.02)
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.mid_norm = nn.BatchNorm2d(hidden)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop.p > 0:
            x = self.act(self.norm1(self.fc1(x)))
            x = self.drop(self.act(self.mid_norm(self.mid(x))))
            return self.drop(self.norm2(self.fc2(x)))
        # fc1 -> [BN -> GELU -> depthwise conv] -> [BN -> GELU -> fc2] -> BN; the bracketed parts
        # keep only their input for the backward.
        x = batch_norm_gelu(self.norm1, self.act, self.fc1(x), self.mid)
        x = batch_norm_gelu(self.mid_norm, self.act, x, self.fc2)
        return self.norm2(x)


class FFN(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.layer_scale_2 * self.mlp(x))


class AttnFFN(nn.Module):
    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        resolution: int,
        stride: int | None,
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-5,
    ) -> None:
        super().__init__()
        self.token_mixer = Attention4D(dim, resolution, stride)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale_1 = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1 * self.token_mixer(x))
        return x + self.drop_path(self.layer_scale_2 * self.mlp(x))


class ConvDownsample(nn.Module):
    """Stride-2 3x3 conv + BN between the early stages."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, out_ch, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class AttnDownsample(nn.Module):
    """Stride-2 conv + BN plus an attention downsampling, between stages 3 and 4."""

    def __init__(self, in_ch: int, out_ch: int, resolution: int) -> None:
        super().__init__()
        self.attn = Attention4DDownsample(in_ch, out_ch, resolution)
        self.conv = nn.Conv2d(in_ch, out_ch, 3, 2, 1)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x) + self.bn(self.conv(x))


class EfficientFormerV2(nn.Module):
    """EfficientFormerV2 feature backbone: image (B, 3, H, W) -> 4 maps at strides 4, 8, 16, 32.

    H and W must be multiples of 32 (the strided attention halves the token grid exactly).
    """

    out_indices = (0, 2, 4, 6)  # positions of the four stages in `network`

    def __init__(
        self, arch: str = "s1", resolution: int = 512, drop_path_rate: float | None = None, freeze_bn: bool = False
    ) -> None:
        super().__init__()
        if arch not in EFFICIENTFORMER_V2_ARCHS:
            raise ValueError(f"unknown EfficientFormerV2 arch {arch!r}; choose from {sorted(EFFICIENTFORMER_V2_ARCHS)}")
        cfg = EFFICIENTFORMER_V2_ARCHS[arch]
        widths, depths, vit_num = cfg["widths"], cfg["depths"], cfg["vit_num"]
        drop_path_rate = cfg["drop_path_rate"] if drop_path_rate is None else drop_path_rate
        self.arch = arch
        self.freeze_bn = freeze_bn
        self.out_channels = list(widths)

        self.patch_embed = nn.Sequential(
            nn.Conv2d(3, widths[0] // 2, 3, 2, 1),
            nn.BatchNorm2d(widths[0] // 2),
            nn.GELU(),
            nn.Conv2d(widths[0] // 2, widths[0], 3, 2, 1),
            nn.BatchNorm2d(widths[0]),
            nn.GELU(),
        )
        total = sum(depths)
        network: list[nn.Module] = []
        for i, (dim, depth) in enumerate(zip(widths, depths, strict=True)):
            stage_res = math.ceil(resolution / 2 ** (i + 2))
            blocks: list[nn.Module] = []
            for j in range(depth):
                dpr = drop_path_rate * (j + sum(depths[:i])) / (total - 1)
                ratio = cfg["mlp_ratios"][i][j]
                if i >= 2 and j > depth - 1 - vit_num:
                    blocks.append(AttnFFN(dim, ratio, stage_res, stride=2 if i == 2 else None, drop_path=dpr))
                else:
                    blocks.append(FFN(dim, ratio, drop_path=dpr))
            network.append(nn.Sequential(*blocks))
            if i < 3:
                nxt = widths[i + 1]
                network.append(AttnDownsample(dim, nxt, stage_res) if i >= 2 else ConvDownsample(dim, nxt))
        self.network = nn.ModuleList(network)

    def train(self, mode: bool = True) -> EfficientFormerV2:
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The patch embedding: image -> stride-4 map."""
        embed = self.patch_embed  # conv, BN, GELU, conv, BN, GELU
        x = batch_norm_gelu(embed[1], embed[2], embed[0](x), cast(nn.Conv2d, embed[3]))
        return batch_norm_gelu(embed[4], embed[5], x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for idx, block in enumerate(self.network):
            x = block(x)
            if idx in self.out_indices:
                outs.append(x)
        return outs
