"""Mask2Former's set-prediction loss (MMDetection 3.x semantics, as the official configs set it).

For every decoder prediction (all num_layers + 1 entries) and every image:

1. Ground truth: one binary mask per class present in the semantic label map (the ignore index
   excluded; ignored pixels are background for every mask).
2. Matching: the same `num_points` uniformly random points for predictions and ground truth;
   cost = 2.0 * (-softmax class probability of the gt class)
        + 5.0 * mean over points of binary cross-entropy(mask logit, gt)
        + 5.0 * dice(sigmoid(mask logit), gt) with eps 1 (1 - (2 p.t + 1) / (sum p + sum t + 1));
   the one-to-one assignment of minimum total cost (Hungarian; scipy when installed, else an
   exact NumPy implementation). Unmatched queries are "no object".
3. Losses, summed over the batch and normalised over it:
   - class: cross-entropy over K + 1 classes, class weights 1 and 0.1 for "no object",
     divided by the sum of the weights of the targets; x 2.0;
   - mask and dice, on the matched queries only, on `num_points` points per mask chosen by
     uncertainty (PointRend): 3x oversampled uniform points, the 75 % whose logits are closest to
     0, plus 25 % fresh uniform points; BCE averaged over points and masks, x 5.0; dice summed
     over masks and divided by their number, x 5.0. The number of masks is averaged over
     processes under torch.distributed and is at least 1.

`Mask2FormerLoss()(all_cls_scores, all_mask_preds, labels)` returns MMDetection's loss dict:
`loss_cls`, `loss_mask`, `loss_dice` for the last prediction and `d{i}.loss_*` for the others;
the training loss is the sum of its values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# MMDetection's weight_reduce_loss adds this to every averaging denominator.
_AVG_EPS = torch.finfo(torch.float32).eps


def semantic_to_instances(label: torch.Tensor, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes present (G,), their binary masks (G, H, W) bool) for a label map (H, W)."""
    classes = torch.unique(label)
    classes = classes[classes != ignore_index]
    return classes.long(), label[None] == classes[:, None, None]


def point_sample(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values (N, C, P) of maps x (N, C, H, W) at normalised (x, y) points (N, P, 2) in
    [0, 1] (align_corners False, 0 outside)."""
    out = F.grid_sample(x, 2.0 * points.unsqueeze(2) - 1.0, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(3)


def uncertain_point_coords(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PointRend's training points (N, num_points, 2) for mask logits (N, 1, H, W): of
    num_points * oversample_ratio uniform points, the importance_sample_ratio * num_points with
    the smallest |logit| (most uncertain), then uniform points for the rest."""
    n = mask_logits.shape[0]
    device = mask_logits.device
    num_sampled = int(num_points * oversample_ratio)
    candidates = torch.rand(n, num_sampled, 2, device=device, generator=generator).to(mask_logits.dtype)
    uncertainty = -point_sample(mask_logits, candidates)[:, 0].abs()
    num_uncertain = int(importance_sample_ratio * num_points)
    chosen = uncertainty.topk(num_uncertain, dim=1).indices
    points = torch.gather(candidates, 1, chosen[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        extra = torch.rand(n, num_random, 2, device=device, generator=generator).to(mask_logits.dtype)
        points = torch.cat([points, extra], dim=1)
    return points


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


def _assignment_numpy(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of every row of `cost` (n x m, n <= m) to a distinct column:
    the Hungarian method with potentials and shortest augmenting paths (O(n^2 m)), vectorised
    over columns. Returns (rows, cols) sorted by row."""
    n, m = cost.shape
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    row_of_col = np.zeros(m + 1, dtype=np.int64)  # 1-based row matched to column j; 0 = free; column 0 is virtual
    came_from = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of_col[0] = i
        j0 = 0
        min_slack = np.full(m + 1, np.inf)
        visited = np.zeros(m + 1, dtype=bool)
        while True:
            visited[j0] = True
            i0 = row_of_col[j0]
            slack = cost[i0 - 1] - u[i0] - v[1:]
            open_cols = ~visited[1:]
            better = open_cols & (slack < min_slack[1:])
            min_slack[1:][better] = slack[better]
            came_from[1:][better] = j0
            candidates = np.where(open_cols, min_slack[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            np.add.at(u, row_of_col[visited], delta)
            v[visited] -= delta
            min_slack[1:][open_cols] -= delta
            j0 = j1
            if row_of_col[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = came_from[j0]
            row_of_col[j0] = row_of_col[j1]
            j0 = j1
    cols = np.nonzero(row_of_col[1:])[0]
    rows = row_of_col[1:][cols] - 1
    order = np.argsort(rows)
    return rows[order], cols[order]


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rectangular minimum-cost assignment, (rows, cols) sorted by row; scipy's when available."""
    cost = np.asarray(cost, dtype=np.float64)
    try:
        from scipy.optimize import linear_sum_assignment as scipy_assignment
    except ImportError:
        scipy_assignment = None
    if scipy_assignment is not None:
        rows, cols = scipy_assignment(cost)
        return np.asarray(rows), np.asarray(cols)
    if cost.shape[0] <= cost.shape[1]:
        return _assignment_numpy(cost)
    cols, rows = _assignment_numpy(cost.T)
    order = np.argsort(rows)
    return rows[order], cols[order]


def match_cost(
    cls_logits: torch.Tensor,
    mask_points: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_points: torch.Tensor,
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
    eps: float = 1.0,
) -> torch.Tensor:
    """Matching cost (Q, G) for class logits (Q, K + 1), mask logits at points (Q, P), gt labels
    (G,) and gt mask values at the same points (G, P)."""
    cls_cost = -cls_logits.softmax(-1)[:, gt_labels]
    gt_points = gt_points.to(mask_points.dtype)
    num_points = mask_points.shape[1]
    # BCE against 1 where the gt is 1 and against 0 where it is 0, averaged over the points.
    pos = F.binary_cross_entropy_with_logits(mask_points, torch.ones_like(mask_points), reduction="none")
    neg = F.binary_cross_entropy_with_logits(mask_points, torch.zeros_like(mask_points), reduction="none")
    bce_cost = (pos @ gt_points.T + neg @ (1 - gt_points).T) / num_points
    probs = mask_points.sigmoid()
    dice_cost = 1 - (2 * probs @ gt_points.T + eps) / (probs.sum(-1)[:, None] + gt_points.sum(-1)[None, :] + eps)
    return class_weight * cls_cost + mask_weight * bce_cost + dice_weight * dice_cost


@torch.no_grad()
def hungarian_match(
    cls_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_masks: torch.Tensor,
    num_points: int = 12544,
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query indices, gt indices), sorted by query, of the minimum-cost one-to-one matching for
    one image: class logits (Q, K + 1), mask logits (Q, h, w), gt labels (G,), gt masks (G, H, W).
    The cost is computed on `num_points` uniform points shared by predictions and ground truth."""
    device = cls_logits.device
    if gt_labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    q, g = mask_logits.shape[0], gt_masks.shape[0]
    points = torch.rand(1, num_points, 2, device=device, generator=generator).to(mask_logits.dtype)
    mask_points = point_sample(mask_logits[:, None], points.expand(q, -1, -1))[:, 0]
    gt_points = point_sample(gt_masks[:, None].to(mask_logits.dtype), points.expand(g, -1, -1))[:, 0]
    cost = match_cost(cls_logits, mask_points, gt_labels, gt_points, class_weight, mask_weight, dice_weight)
    rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(
        cols, dtype=torch.long, device=device
    )


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def _mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class Mask2FormerLoss(nn.Module):
    """Class, mask (BCE) and dice losses on every decoder prediction, with Hungarian matching."""

    ce_class_weights: torch.Tensor  # buffer, registered in __init__

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        ce_weights = torch.ones(num_classes + 1)
        ce_weights[-1] = no_object_weight
        self.register_buffer("ce_class_weights", ce_weights, persistent=False)

    def targets(self, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image (gt labels (G,), gt masks (G, H, W)) from semantic labels (B, H, W)."""
        out = []
        for label in labels:
            classes, masks = semantic_to_instances(label, self.ignore_index)
            if classes.numel() and (classes.min() < 0 or classes.max() >= self.num_classes):
                raise ValueError(
                    f"labels must be in [0, {self.num_classes}) or {self.ignore_index}, got values {classes.tolist()}"
                )
            out.append((classes, masks))
        return out

    def layer_loss(
        self,
        cls_scores: torch.Tensor,
        mask_preds: torch.Tensor,
        targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class, mask, dice) losses, weighted, of one prediction: class logits (B, Q, K + 1) and
        mask logits (B, Q, h, w) against per-image (labels, masks)."""
        batch, num_queries = cls_scores.shape[:2]
        class_targets = torch.full((batch, num_queries), self.num_classes, dtype=torch.long, device=cls_scores.device)
        matched_preds, matched_masks = [], []
        for b, (gt_labels, gt_masks) in enumerate(targets):
            query_idx, gt_idx = hungarian_match(
                cls_scores[b].detach(),
                mask_preds[b].detach(),
                gt_labels,
                gt_masks,
                self.num_points,
                self.class_weight,
                self.mask_weight,
                self.dice_weight,
                generator,
            )
            class_targets[b, query_idx] = gt_labels[gt_idx]
            matched_preds.append(mask_preds[b, query_idx])
            matched_masks.append(gt_masks[gt_idx])

        weights = self.ce_class_weights.to(cls_scores.dtype)
        flat_targets = class_targets.flatten()
        ce = F.cross_entropy(cls_scores.flatten(0, 1), flat_targets, weight=weights, reduction="none")
        loss_cls = self.class_weight * ce.sum() / (weights[flat_targets].sum() + _AVG_EPS)

        preds = torch.cat(matched_preds)
        num_masks = _mean_over_processes(cls_scores.new_tensor(float(preds.shape[0]))).clamp(min=1)
        if preds.shape[0] == 0:
            zero = preds.sum()  # keeps the graph connected
            return loss_cls, zero, zero
        masks = torch.cat(matched_masks)
        with torch.no_grad():
            points = uncertain_point_coords(
                preds[:, None], self.num_points, self.oversample_ratio, self.importance_sample_ratio, generator
            )
            target_points = point_sample(masks[:, None].to(preds.dtype), points)[:, 0]
        pred_points = point_sample(preds[:, None], points)[:, 0]

        probs = pred_points.sigmoid()
        dice = 1 - (2 * (probs * target_points).sum(-1) + 1) / (probs.sum(-1) + target_points.sum(-1) + 1)
        loss_dice = self.dice_weight * dice.sum() / (num_masks + _AVG_EPS)
        bce = F.binary_cross_entropy_with_logits(pred_points, target_points, reduction="none")
        loss_mask = self.mask_weight * bce.sum() / (num_masks * self.num_points + _AVG_EPS)
        return loss_cls, loss_mask, loss_dice

    def forward(
        self,
        all_cls_scores: Sequence[torch.Tensor],
        all_mask_preds: Sequence[torch.Tensor],
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss dict for the per-layer outputs of `Mask2FormerHead` and semantic labels (B, H, W)
        (at the input resolution, padding = ignore_index)."""
        targets = self.targets(labels)
        losses: dict[str, torch.Tensor] = {}
        last = len(all_cls_scores) - 1
        for i, (cls_scores, mask_preds) in enumerate(zip(all_cls_scores, all_mask_preds, strict=True)):
            prefix = "" if i == last else f"d{i}."
            loss_cls, loss_mask, loss_dice = self.layer_loss(cls_scores, mask_preds, targets, generator)
            losses[f"{prefix}loss_cls"] = loss_cls
            losses[f"{prefix}loss_mask"] = loss_mask
            losses[f"{prefix}loss_dice"] = loss_dice
        return losses
