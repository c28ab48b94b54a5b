"""Bilinear resizes (and chains of them) as banded per-axis linear maps, applied band by band.

Prediction and the training loss both need "the head's low-resolution logits, resized bilinearly
to the image" only to reduce them right away (an argmax; a cross-entropy). Holding the resized
logits of every class at full resolution is what dominates their memory: 150 classes at 512x512
are 157 MB per image, their gradient as much again. A bilinear resize (align_corners=False) is a
separable linear map whose per-axis matrices have two non-zeros per row, and so is any chain of
resizes and crops (the product of the matrices). `AxisResample` holds one axis of such a map as
taps (indices and weights per output position) and applies it, or its transpose, to a band of
rows, so the full-resolution values can be produced (and reduced) a band at a time. The values
equal PyTorch's resize up to float32 rounding (the products are summed in another order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def bilinear_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) float64 matrix of a 1-D bilinear resize with align_corners=False, as
    F.interpolate computes it (source position (i + 0.5) * in / out - 0.5, clamped at 0)."""
    scale = size_in / size_out
    src = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=size_in - 1)
    hi = (lo + 1).clamp(max=size_in - 1)
    frac = src - lo
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    matrix.index_put_((rows, lo), 1 - frac, accumulate=True)
    matrix.index_put_((rows, hi), frac, accumulate=True)
    return matrix


@dataclass
class AxisResample:
    """One axis of a banded linear map: out[i] = sum_t weight[i, t] * in[index[i, t]].

    Along the last axis (columns) it is applied as a matrix product with the dense (out, in)
    matrix: a gather along the innermost axis is several times slower than that small GEMM. Along
    any other axis (rows) it is applied row by row: with two taps, one `lerp` of two input rows.
    """

    index: torch.Tensor  # (out, T) int64
    weight: torch.Tensor  # (out, T)
    size_in: int
    matrix: torch.Tensor  # (out, in), the same map dense
    # > 1 when the map is a plain bilinear upsampling by this integer factor: the columns are then
    # resampled by phases (`_upsample_axis_into`), a `lerp` per phase instead of gathers per tap
    scale: int = 0

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, dtype: torch.dtype, device: torch.device) -> AxisResample:
        nonzero = matrix != 0
        cols = torch.arange(matrix.shape[1])
        first = torch.where(nonzero, cols, matrix.shape[1]).min(dim=1).values.clamp(max=matrix.shape[1] - 1)
        last = torch.where(nonzero, cols, -1).max(dim=1).values.clamp(min=0)
        taps = int((last - first).max()) + 1
        index = first[:, None] + torch.arange(taps)
        valid = index <= last[:, None]
        index = torch.where(valid, index, first[:, None])
        weight = torch.where(valid, matrix.gather(1, index), torch.zeros((), dtype=matrix.dtype))
        return cls(index.to(device), weight.to(device=device, dtype=dtype), matrix.shape[1], matrix.to(device, dtype))

    @classmethod
    def chain(
        cls, size_low: int, size_mid: int, crop: int, size_out: int, dtype: torch.dtype, device: torch.device
    ) -> AxisResample:
        """Resize size_low -> size_mid, keep the first `crop`, resize crop -> size_out (each resize
        skipped when the sizes are equal, as the inference code skips it)."""
        matrix = bilinear_matrix(size_low, size_mid) if size_mid != size_low else torch.eye(size_low).double()
        matrix = matrix[:crop]
        if size_out != crop:
            matrix = bilinear_matrix(crop, size_out) @ matrix
        resample = cls.from_matrix(matrix, dtype, device)
        if crop == size_mid == size_out and size_mid > size_low and size_mid % size_low == 0:
            resample.scale = size_mid // size_low
        return resample

    @property
    def size_out(self) -> int:
        return self.index.shape[0]

    def band(self, start: int, stop: int) -> tuple[int, int]:
        """(first, last): outputs start..stop-1 read inputs first..last."""
        index = self.index[start:stop]
        return int(index.min()), int(index.max())

    def apply_columns(self, x: torch.Tensor) -> torch.Tensor:
        """The map along the last axis of x."""
        return torch.matmul(x, self.matrix.T)

    def apply_columns_transposed(self, grad: torch.Tensor) -> torch.Tensor:
        """The transpose of `apply_columns` (its gradient)."""
        return torch.matmul(grad, self.matrix)

    def apply_columns_last(self, x: torch.Tensor) -> torch.Tensor:
        """The map along axis 2 of x (B, rows, columns, C), C innermost: each tap gathers whole
        C-vectors, the fast direction when C (classes) is the axis reduced next."""
        if self.scale > 1:
            out = x.new_empty(x.shape[0], x.shape[1], self.size_out, x.shape[3])
            _upsample_axis_into(x, out, 2, self.scale)
            return out
        out = x.index_select(2, self.index[:, 0]) * self.weight[:, 0].view(-1, 1)
        for t in range(1, self.index.shape[1]):
            out.add_(x.index_select(2, self.index[:, t]) * self.weight[:, t].view(-1, 1))
        return out

    def apply_columns_last_transposed(self, grad: torch.Tensor) -> torch.Tensor:
        """The transpose of `apply_columns_last` (its gradient): (B, rows, out, C) -> (B, rows, in, C)."""
        out = grad.new_zeros(grad.shape[0], grad.shape[1], self.size_in, grad.shape[3])
        if self.scale > 1:
            _upsample_axis_transposed_add(grad, out, 2, self.scale)
            return out
        for t in range(self.index.shape[1]):
            out.index_add_(2, self.index[:, t], grad * self.weight[:, t].view(-1, 1))
        return out

    def apply_rows_last_transposed(self, grad: torch.Tensor, start: int, stop: int, first: int, size: int):
        """The transpose of `apply_rows_last` (its gradient), into `size` input rows from `first`."""
        return self.apply_rows_transposed(grad.transpose(1, 2), start, stop, first, size).transpose(1, 2)

    def apply_rows_last(self, x: torch.Tensor, start: int, stop: int, first: int) -> torch.Tensor:
        """Outputs start..stop-1 along axis 1 of x (B, rows, W, C) whose row 0 is input row `first`."""
        return self.apply_rows(x.transpose(1, 2), start, stop, first).transpose(1, 2)

    def apply_rows(self, x: torch.Tensor, start: int, stop: int, first: int) -> torch.Tensor:
        """Outputs start..stop-1 along axis 2 of x (B, C, rows, W), whose row 0 is input row `first`."""
        index = (self.index[start:stop] - first).tolist()
        weight = self.weight[start:stop].tolist()
        # The output keeps x's memory layout (x may be a transposed view).
        shape = (x.shape[0], x.shape[1], stop - start, x.shape[3])
        order = sorted(range(4), key=lambda d: -x.stride()[d])
        out = x.new_empty([shape[d] for d in order]).permute(*[order.index(d) for d in range(4)])
        for r, (taps, weights) in enumerate(zip(index, weight, strict=True)):
            if len(taps) == 1:
                out[:, :, r] = x[:, :, taps[0]] * weights[0]
            elif len(taps) == 2 and abs(weights[0] + weights[1] - 1) < 1e-6:
                # w0 a + w1 b with w0 + w1 = 1, in one pass
                torch.lerp(x[:, :, taps[0]], x[:, :, taps[1]], weights[1], out=out[:, :, r])
            else:
                torch.mul(x[:, :, taps[0]], weights[0], out=out[:, :, r])
                for tap, w in zip(taps[1:], weights[1:], strict=True):
                    out[:, :, r].add_(x[:, :, tap], alpha=w)
        return out

    def apply_rows_transposed(self, grad: torch.Tensor, start: int, stop: int, first: int, size: int) -> torch.Tensor:
        """The transpose of `apply_rows` (its gradient): `size` input rows from input row `first`."""
        index = (self.index[start:stop] - first).tolist()
        weight = self.weight[start:stop].tolist()
        shape = (grad.shape[0], grad.shape[1], size, grad.shape[3])
        order = sorted(range(4), key=lambda d: -grad.stride()[d])  # keep grad's memory layout
        out = grad.new_zeros([shape[d] for d in order]).permute(*[order.index(d) for d in range(4)])
        for r, (taps, weights) in enumerate(zip(index, weight, strict=True)):
            for tap, w in zip(taps, weights, strict=True):
                if w != 0:
                    out[:, :, tap].add_(grad[:, :, r], alpha=w)
        return out


# Bytes of one band of `upsample_bilinear_into`'s intermediate (the input resized along its columns
# only): small enough to stay in cache while the rows are resized from it.
_UPSAMPLE_BAND_BYTES = 4 << 20


def _upsample_axis_into(src: torch.Tensor, dst: torch.Tensor, dim: int, scale: int) -> None:
    """dst = src resized bilinearly (align_corners=False) by the integer `scale` along `dim`.

    Output i = scale * j + p sits at source position j + f_p, f_p = (p + 0.5) / scale - 0.5, so each
    phase p is one `lerp` of two shifted views of src (one element at the border is a copy, where
    the position is clamped): `scale` passes over contiguous runs instead of four gathered taps per
    output.
    """
    n = src.shape[dim]
    phases = dst.unflatten(dim, (n, scale))
    for p in range(scale):
        f = (p + 0.5) / scale - 0.5
        out = phases.select(dim + 1, p)
        if f == 0 or n == 1:
            out.copy_(src)
        elif f < 0:  # between inputs j - 1 and j; output 0 is clamped to input 0
            torch.lerp(src.narrow(dim, 0, n - 1), src.narrow(dim, 1, n - 1), 1 + f, out=out.narrow(dim, 1, n - 1))
            out.narrow(dim, 0, 1).copy_(src.narrow(dim, 0, 1))
        else:  # between inputs j and j + 1; the last output is input n - 1
            torch.lerp(src.narrow(dim, 0, n - 1), src.narrow(dim, 1, n - 1), f, out=out.narrow(dim, 0, n - 1))
            out.narrow(dim, n - 1, 1).copy_(src.narrow(dim, n - 1, 1))


def _upsample_axis_transposed_add(grad: torch.Tensor, out: torch.Tensor, dim: int, scale: int) -> None:
    """out += the transpose of `_upsample_axis_into` applied to grad (its gradient): each phase's
    outputs hand (1 - t) and t of their gradient back to the two inputs they interpolate."""
    n = out.shape[dim]
    phases = grad.unflatten(dim, (n, scale))
    for p in range(scale):
        f = (p + 0.5) / scale - 0.5
        g = phases.select(dim + 1, p)
        if f == 0 or n == 1:
            out.add_(g)
        elif f < 0:  # outputs 1.. between inputs j - 1 and j with weight t = 1 + f on j; output 0 is input 0
            inner = g.narrow(dim, 1, n - 1)
            out.narrow(dim, 0, n - 1).add_(inner, alpha=-f)
            out.narrow(dim, 1, n - 1).add_(inner, alpha=1 + f)
            out.narrow(dim, 0, 1).add_(g.narrow(dim, 0, 1))
        else:  # outputs ..n-2 between inputs j and j + 1 with weight t = f on j + 1; the last is input n - 1
            inner = g.narrow(dim, 0, n - 1)
            out.narrow(dim, 0, n - 1).add_(inner, alpha=1 - f)
            out.narrow(dim, 1, n - 1).add_(inner, alpha=f)
            out.narrow(dim, n - 1, 1).add_(g.narrow(dim, n - 1, 1))


def upsample_bilinear_into(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Write `F.interpolate(x, out.shape[-2:], mode="bilinear", align_corners=False)` into `out`
    when both are NCHW-contiguous and the output is an integer multiple of the input along both
    axes (a head at stride 4 and its padded input always are); return False, writing nothing,
    otherwise.

    Same values up to float32 rounding (each output is the same two-step interpolation, columns
    then rows, as `lerp`s), some 2.3x faster on CPU than PyTorch's kernel (150 x 128 x 128 to
    512 x 512 with 2 threads: 9.8 against 22.9 ms; filling the output alone takes 4.8): the resize
    runs by phases of the scale over contiguous rows, a band of channels at a time so that the
    column-resized band stays in cache.
    """
    if x.dim() != 4 or out.dim() != 4 or x.shape[:2] != out.shape[:2] or x.dtype != out.dtype:
        return False
    if not (x.is_contiguous() and out.is_contiguous()) or x.numel() == 0:
        return False
    (h, w), (height, width) = x.shape[-2:], out.shape[-2:]
    if height % h or width % w:
        return False
    row_scale, col_scale = height // h, width // w
    batch, channels = x.shape[:2]
    band = max(1, _UPSAMPLE_BAND_BYTES // (h * width * x.element_size()))
    columns = x.new_empty(1, min(band, channels), h, width) if col_scale > 1 else None
    for i in range(batch):
        for start in range(0, channels, band):
            src = x[i : i + 1, start : start + band]
            dst = out[i : i + 1, start : start + band]
            if columns is not None:
                resized = columns[:, : src.shape[1]]
                _upsample_axis_into(src, resized, 3, col_scale)
                src = resized
            if row_scale > 1:
                _upsample_axis_into(src, dst, 2, row_scale)
            else:
                dst.copy_(src)
    return True
