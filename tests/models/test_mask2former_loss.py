"""Mask2Former matching and losses on hand-computed cases, the exact NumPy Hungarian fallback,
and a training step of the reduced model through the loss."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import offseg
from offseg.models.losses import mask2former_loss as m2f_loss
from offseg.models.losses.mask2former_loss import (
    Mask2FormerLoss,
    _assignment_numpy,
    hungarian_match,
    linear_sum_assignment,
    match_cost,
    semantic_to_instances,
    uncertain_point_coords,
)
from offseg.models.mask2former import MASK2FORMER_REDUCED


def _brute_force_min(cost: np.ndarray) -> float:
    n, m = cost.shape
    if n <= m:
        return min(sum(cost[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(m), n))
    return _brute_force_min(cost.T)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 3), (4, 6), (5, 2), (6, 6)])
def test_numpy_assignment_is_optimal(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        cost = rng.normal(size=shape)
        if shape[0] <= shape[1]:
            rows, cols = _assignment_numpy(cost)
        else:
            cols, rows = _assignment_numpy(cost.T)
        assert len(set(rows.tolist())) == len(rows) == min(shape) and len(set(cols.tolist())) == len(cols)
        assert cost[rows, cols].sum() == pytest.approx(_brute_force_min(cost), abs=1e-9)


def test_numpy_assignment_matches_scipy_on_mask2former_sizes() -> None:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    for queries, gts in [(100, 20), (100, 1), (10, 10), (100, 37)]:
        cost = rng.normal(size=(queries, gts))
        rows, cols = scipy_optimize.linear_sum_assignment(cost)
        ours_cols, ours_rows = _assignment_numpy(cost.T)
        assert cost[ours_rows, ours_cols].sum() == pytest.approx(cost[rows, cols].sum(), abs=1e-9)
    r, c = linear_sum_assignment(cost)
    assert cost[r, c].sum() == pytest.approx(cost[rows, cols].sum(), abs=1e-9)


def test_match_cost_by_hand() -> None:
    # One query: uniform class logits over K + 1 = 3, mask logits 0 (p = 0.5) at two points;
    # one gt of class 1, mask values (1, 0) at those points.
    cost = match_cost(torch.zeros(1, 3), torch.zeros(1, 2), torch.tensor([1]), torch.tensor([[1.0, 0.0]]))
    cls_cost = -1 / 3
    bce_cost = math.log(2)  # -log(0.5) at both points, averaged
    dice_cost = 1 - (2 * 0.5 + 1) / (1.0 + 1.0 + 1)
    assert cost.item() == pytest.approx(2 * cls_cost + 5 * bce_cost + 5 * dice_cost, abs=1e-6)


def _three_queries_two_targets(k: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4x4 labels: left half class 0, right half class 2. Query 0 predicts the right half as
    class 2, query 1 "no object", query 2 the left half as class 0."""
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[:, :, 2:] = 2
    left = torch.zeros(4, 4)
    left[:, :2] = 1
    masks = torch.stack([4 * (1 - 2 * left), torch.full((4, 4), -4.0), 4 * (2 * left - 1)])[None]  # logits +-4
    cls = torch.zeros(1, 3, k + 1)
    cls[0, 0, 2] = cls[0, 1, k] = cls[0, 2, 0] = 3.0
    return cls, masks, labels


def test_hungarian_match_finds_the_known_assignment() -> None:
    cls, masks, labels = _three_queries_two_targets()
    gt_labels, gt_masks = semantic_to_instances(labels[0])
    assert gt_labels.tolist() == [0, 2]
    queries, gts = hungarian_match(
        cls[0], masks[0], gt_labels, gt_masks, num_points=256, generator=torch.Generator().manual_seed(0)
    )
    assert queries.tolist() == [0, 2] and gt_labels[gts].tolist() == [2, 0]


def test_layer_loss_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    # Sample the loss at the 16 pixel centres, so point values are exactly the pixel values.
    ys, xs = torch.meshgrid((torch.arange(4) + 0.5) / 4, (torch.arange(4) + 0.5) / 4, indexing="ij")
    centres = torch.stack([xs.flatten(), ys.flatten()], -1)
    monkeypatch.setattr(
        m2f_loss, "uncertain_point_coords", lambda logits, n, *a, **k: centres.expand(len(logits), -1, -1)
    )
    cls, masks, labels = _three_queries_two_targets(k=3)
    criterion = Mask2FormerLoss(num_classes=3, num_points=16)
    loss_cls, loss_mask, loss_dice = criterion.layer_loss(cls, masks, criterion.targets(labels))

    ce = -math.log(math.exp(3) / (math.exp(3) + 3))  # every query's target has logit 3, the 3 others 0
    assert loss_cls.item() == pytest.approx(2.0 * (1 * ce + 0.1 * ce + 1 * ce) / 2.1, rel=1e-5)
    # Both matched masks: logit +4 on their 8 pixels, -4 on the other 8.
    assert loss_mask.item() == pytest.approx(5.0 * math.log1p(math.exp(-4)), rel=1e-5)
    s = 1 / (1 + math.exp(-4))
    assert loss_dice.item() == pytest.approx(5.0 * (1 - (2 * 8 * s + 1) / (8 * s + 8 * (1 - s) + 8 + 1)), rel=1e-5)


def test_no_targets_gives_zero_mask_losses_and_all_no_object() -> None:
    cls, masks, _ = _three_queries_two_targets(k=3)
    masks.requires_grad_(True)
    criterion = Mask2FormerLoss(num_classes=3, num_points=16)
    labels = torch.full((1, 4, 4), 255, dtype=torch.long)
    loss_cls, loss_mask, loss_dice = criterion.layer_loss(cls, masks, criterion.targets(labels))
    expected = F.cross_entropy(cls[0], torch.full((3,), 3))  # all three are "no object"
    assert loss_cls.item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    assert loss_mask.item() == 0 and loss_dice.item() == 0
    (loss_mask + loss_dice).backward()
    assert masks.grad is not None


def test_uncertain_points_prefer_small_logits() -> None:
    # Logits grow with |x - 0.5|: the uncertain points crowd around the middle column.
    ramp = 20 * (torch.linspace(0, 1, 32) - 0.5).abs()
    logits = ramp.view(1, 1, 1, 32).expand(2, 1, 32, 32)
    points = uncertain_point_coords(logits, 400, 3.0, 0.75, generator=torch.Generator().manual_seed(0))
    assert points.shape == (2, 400, 2) and points.min() >= 0 and points.max() <= 1
    important, uniform = points[:, :300, 0], points[:, 300:, 0]
    assert (important - 0.5).abs().mean() < 0.5 * (uniform - 0.5).abs().mean()


def test_loss_dict_and_training_step_on_reduced_model() -> None:
    torch.manual_seed(0)
    model = offseg.create_model("mask2former-swin-t-ol", num_classes=5, **MASK2FORMER_REDUCED).train()
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[:, :8] = 255
    criterion = Mask2FormerLoss(num_classes=5, num_points=256)
    losses = criterion(*model.forward_train_outputs(torch.randn(2, 3, 64, 64)), labels)
    layers = MASK2FORMER_REDUCED["decoder_layers"] + 1
    expected = {"loss_cls", "loss_mask", "loss_dice"} | {
        f"d{i}.loss_{k}" for i in range(layers - 1) for k in ("cls", "mask", "dice")
    }
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("decode_head.query_feat"))
    assert model.decode_head.offset_learning.cls_offset_proj.weight.grad.abs().sum() > 0
