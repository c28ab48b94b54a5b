"""Offset Learning (OffSeg, ICCV 2025): per-image offsets for the class representation and the
pixel features, computed from their coupled attention.

Per-pixel variant (`OffsetLearning`), for features E (HW x C) and the learnable class
representation W (K x C):

    A     = W E^T                                  coupled attention, K x HW
    dW    = Linear(softmax_HW(A) E)                class offsets, K x C
    dE    = Linear(softmax_K(A)^T W)               feature offsets, HW x C
    masks = LayerNorm_K((E + dE)(W + dW)^T)        per-pixel class scores

Both offsets are computed from the original W and E. `OffsetLearning.forward` computes the masks
regrouped so that dE is never formed (same function, fewer multiply-adds; its docstring), and
`forward_reference` as written above (`offseg.optimize.reference_computation`, FLOP counts and the
ONNX export use it: `official_offset_learning`). Mask variant (`OffsetLearningMask`, used by
Mask2Former): W is the per-image query mask embeddings, there is no LayerNorm, and the aligned
pair is returned for the head's einsum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

# Which offsets a per-pixel OffsetLearning computes. The official module is "both"; the two
# single-branch forms are the paper's ablation rows and do not exist in the official code:
# "class" computes only dW (dE = 0), "feature" only dE (dW = 0); the unused projection is not built.
OFFSET_BRANCHES = ("both", "class", "feature")


def align_by_offsets(
    feats: torch.Tensor,
    cls_repr: torch.Tensor,
    cls_offset_proj: nn.Module | None,
    feat_offset_proj: nn.Module | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W + dW, E + dE) for feats E (B, HW, C) and class representation W (B, K, C).

    A projection given as None leaves its side without offset.
    """
    coupled_attn = (feats @ cls_repr.transpose(1, 2)).transpose(1, 2)  # B, K, HW
    aligned_repr, aligned_feats = cls_repr, feats
    if cls_offset_proj is not None:
        cls_attn = coupled_attn.softmax(dim=2)  # over pixels
        aligned_repr = cls_repr + cls_offset_proj(cls_attn @ feats)
    if feat_offset_proj is not None:
        pos_attn = coupled_attn.softmax(dim=1)  # over classes
        aligned_feats = feats + feat_offset_proj(pos_attn.transpose(1, 2) @ cls_repr)
    return aligned_repr, aligned_feats


class OffsetLearning(nn.Module):
    """Per-pixel Offset Learning head: features (B, C, H, W) -> class scores (B, K, H, W)."""

    def __init__(self, num_classes: int, embed_dims: int, branches: str = "both", init_std: float = 0.02) -> None:
        super().__init__()
        if branches not in OFFSET_BRANCHES:
            raise ValueError(f"branches must be one of {OFFSET_BRANCHES}, got {branches!r}")
        self.num_classes = num_classes
        self.branches = branches
        self.cls_repr = nn.Parameter(torch.empty(1, num_classes, embed_dims))
        self.mask_norm = nn.LayerNorm(num_classes)  # over the K scores of each pixel
        if branches in ("both", "class"):
            self.cls_offset_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        if branches in ("both", "feature"):
            self.feat_offset_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        nn.init.trunc_normal_(self.cls_repr, std=init_std)
        for proj in (getattr(self, "cls_offset_proj", None), getattr(self, "feat_offset_proj", None)):
            if proj is not None:
                nn.init.trunc_normal_(proj.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The official function (`forward_reference`) regrouped, same up to float32 round-off.

        With S = softmax_K(A) (HW x K) and W' = W + dW, the aligned score product is
            (E + S W P_f^T) W'^T = E W'^T + S [(W P_f^T) W'^T]
        where the bracket is only K x K: the feature offsets (HW x C) are never formed, which
        saves the (HW x C)(C x C) projection and one (HW x K)(K x C) product, forward and
        backward (about 37% of Offset Learning's multiply-adds). The single-branch ablations
        compute the official form.
        """
        if self.branches != "both":
            return self.forward_reference(x)
        return self.forward_regrouped(x, self.feat_offset_proj(self.cls_repr))

    def forward_regrouped(self, x: torch.Tensor, projected_cls_repr: torch.Tensor) -> torch.Tensor:
        """`forward` (both branches) given W P_f^T = `feat_offset_proj(cls_repr)`, which an
        inference copy computes once."""
        b, c, h, w = x.shape
        feats = x.flatten(2).transpose(1, 2)  # B, HW, C
        cls_repr = self.cls_repr.expand(b, -1, -1)  # B, K, C
        coupled_attn = feats @ cls_repr.transpose(1, 2)  # A^T: B, HW, K
        cls_attn = coupled_attn.transpose(1, 2).softmax(dim=2)  # over pixels: B, K, HW
        aligned_repr = cls_repr + self.cls_offset_proj(cls_attn @ feats)  # W + dW: B, K, C
        class_mix = projected_cls_repr @ aligned_repr.transpose(1, 2)  # B, K, K
        pos_attn = coupled_attn.softmax(dim=2)  # over classes: B, HW, K
        scores = feats @ aligned_repr.transpose(1, 2) + pos_attn @ class_mix  # B, HW, K
        masks = self.mask_norm(scores)
        # NCHW-contiguous, as `forward_reference` explains.
        return masks.transpose(1, 2).reshape(b, self.num_classes, h, w).contiguous()

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The official computation: both offsets formed, then the aligned score product."""
        b, c, h, w = x.shape
        feats = x.flatten(2).transpose(1, 2)  # B, HW, C
        cls_repr = self.cls_repr.expand(b, -1, -1)
        cls_repr, feats = align_by_offsets(
            feats, cls_repr, getattr(self, "cls_offset_proj", None), getattr(self, "feat_offset_proj", None)
        )
        masks = self.mask_norm(feats @ cls_repr.transpose(1, 2))  # B, HW, K
        # NCHW-contiguous like the official module: PyTorch's bilinear resize that follows (and
        # its backward) is several times slower on the transposed (channels-last) layout.
        return masks.transpose(1, 2).reshape(b, self.num_classes, h, w).contiguous()


class OffsetLearningMask(nn.Module):
    """Offset Learning for mask classification: aligns query mask embeddings (B, Q, C) and mask
    features (B, C, H, W) with each other; returns both, aligned, in the same layouts."""

    def __init__(self, embed_dims: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.cls_offset_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        self.feat_offset_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        nn.init.trunc_normal_(self.cls_offset_proj.weight, std=init_std)
        nn.init.trunc_normal_(self.feat_offset_proj.weight, std=init_std)

    def forward(self, mask_embed: torch.Tensor, mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = mask_features.shape
        feats = mask_features.flatten(2).transpose(1, 2)  # B, HW, C
        mask_embed, feats = align_by_offsets(feats, mask_embed, self.cls_offset_proj, self.feat_offset_proj)
        return mask_embed, feats.transpose(1, 2).reshape(b, c, h, w)


@contextlib.contextmanager
def official_offset_learning() -> Iterator[None]:
    """Within this block `OffsetLearning` computes the official form (`forward_reference`), for
    what must see the official operators: FLOP counts in the paper's conventions and the ONNX
    graph, whose int8 presets and measured figures (docs/inference.md) name its per-pixel
    feature-offset projection. Not thread-safe (it swaps a class attribute)."""
    regrouped = OffsetLearning.forward
    setattr(OffsetLearning, "forward", OffsetLearning.forward_reference)  # noqa: B010 (mypy: no method assignment)
    try:
        yield
    finally:
        setattr(OffsetLearning, "forward", regrouped)  # noqa: B010
