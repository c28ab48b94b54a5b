"""SegMetric against a plain per-class loop, NaN rules, errors, table, distributed reduction."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch

from offseg.evaluation import SegMetric, evaluate, format_table, summary_line

K = 7


def loop_reference(pairs, num_classes, ignore):
    """Independent figures: one pass per class over the concatenated set, all in numpy."""
    pred = np.concatenate([p.reshape(-1) for p, _ in pairs])
    label = np.concatenate([lab.reshape(-1) for _, lab in pairs])
    keep = label != ignore
    pred, label = pred[keep], label[keep]
    ious, accs, hits, labelled = [], [], 0, 0
    for c in range(num_classes):
        inter = np.sum((pred == c) & (label == c))
        union = np.sum((pred == c) | (label == c))
        in_label = np.sum(label == c)
        ious.append(inter / union * 100 if union else math.nan)
        accs.append(inter / in_label * 100 if in_label else math.nan)
        hits += inter
        labelled += in_label
    return {"IoU": ious, "Acc": accs, "aAcc": hits / labelled * 100, "mIoU": np.nanmean(ious), "mAcc": np.nanmean(accs)}


def random_pairs(seed, n=4, shape=(23, 31), num_classes=K, ignore=255):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        label = rng.integers(0, num_classes, size=shape)
        label[rng.random(shape) < 0.2] = ignore
        # Predictions agree with the label often enough to make IoUs interesting.
        pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, num_classes, size=shape))
        pred[pred == ignore] = 0
        pairs.append((pred, label))
    return pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_per_class_loop(seed):
    pairs = random_pairs(seed)
    metric = SegMetric(K, ignore_index=255)
    for pred, label in pairs:
        metric.update(torch.from_numpy(pred), torch.from_numpy(label))
    got = metric.compute()
    want = loop_reference(pairs, K, 255)
    np.testing.assert_allclose(got["IoU"], want["IoU"], atol=1e-6)
    np.testing.assert_allclose(got["Acc"], want["Acc"], atol=1e-6)
    for key in ("aAcc", "mIoU", "mAcc"):
        assert got[key] == pytest.approx(want[key], abs=1e-6)
    assert got["num_images"] == len(pairs)


def test_other_ignore_index_and_batched_update():
    pairs = random_pairs(5, ignore=11, num_classes=11)
    metric = SegMetric(11, ignore_index=11)
    metric.update(np.stack([p for p, _ in pairs]), np.stack([lab for _, lab in pairs]))
    want = loop_reference(pairs, 11, 11)
    np.testing.assert_allclose(metric.compute()["IoU"], want["IoU"], atol=1e-6)
    assert metric.compute()["num_images"] == len(pairs)


def test_nan_rules():
    # class 0: correct; class 1: predicted but never labelled; class 2: absent everywhere;
    # class 3: labelled but never predicted.
    label = torch.tensor([[0, 0, 3, 255]])
    pred = torch.tensor([[0, 1, 1, 2]])  # the 2 sits on an ignored pixel: not counted
    metric = SegMetric(4)
    metric.update(pred, label)
    res = metric.compute()
    assert res["IoU"][0] == pytest.approx(50.0)
    assert res["IoU"][1] == 0.0 and math.isnan(res["Acc"][1])
    assert math.isnan(res["IoU"][2]) and math.isnan(res["Acc"][2])
    assert res["IoU"][3] == 0.0 and res["Acc"][3] == 0.0
    assert res["mIoU"] == pytest.approx((50.0 + 0 + 0) / 3)  # NaN class left out of the mean
    assert res["mAcc"] == pytest.approx((50.0 + 0) / 2)
    assert res["aAcc"] == pytest.approx(100 / 3)


def test_empty_metric_is_nan_not_an_error():
    res = SegMetric(3).compute()
    assert math.isnan(res["aAcc"]) and math.isnan(res["mIoU"])


def test_out_of_range_values_are_not_counted():
    # Like the reference histogram: a label value >= K (not the ignore index) counts nowhere.
    metric = SegMetric(2)
    metric.update(torch.tensor([0, 1, 1]), torch.tensor([0, 5, 1]))
    assert metric.compute()["area_label"] == [1, 1]
    assert metric.compute()["area_pred"] == [1, 2]


def test_bad_inputs_are_refused():
    metric = SegMetric(3)
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(4, 5, dtype=torch.long), torch.zeros(5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.zeros(3, 4, 5), torch.zeros(4, 5, dtype=torch.long))


def test_table_is_aligned_and_ends_with_summary():
    metric = SegMetric(3)
    metric.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    res = metric.compute()
    table = format_table(res, ["sky", "a long class name", "absent"])
    lines = table.splitlines()
    body = lines[:-1]
    assert len({len(line) for line in body}) == 1  # every row as wide as the rule
    assert "a long class name" in table and "nan" in table
    assert lines[-1] == summary_line(res)
    assert lines[-1].startswith("aAcc: 66.67  mIoU: 50.00")
    with pytest.raises(ValueError):
        format_table(res, ["too", "few"])


# ---------------------------------------------------------------------------------------------
# torch.distributed: two gloo ranks each see half the set; the reduced figures are the whole set's.


class ToyDataset:
    """Normalised random images with labels; the 'labels' of odd items are partly ignored."""

    num_classes = 4
    ignore_index = 255
    class_names = ["a", "b", "c", "d"]

    def __init__(self, n=5):
        gen = torch.Generator().manual_seed(3)
        self.items = []
        for i in range(n):
            image = torch.randn(3, 12 + i, 17, generator=gen)
            label = torch.randint(0, 4, (12 + i, 17), generator=gen)
            label[:i] = 255
            self.items.append({"image": image, "label": label})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, queue):
    import torch.distributed as dist
    from evalhelpers import ConvStandIn

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = evaluate(ConvStandIn(), ToyDataset(), progress=False)
        queue.put((rank, res))
    finally:
        dist.destroy_process_group()


def test_distributed_shards_sum_to_the_whole_set():
    import torch.multiprocessing as mp
    from evalhelpers import ConvStandIn

    single = evaluate(ConvStandIn(), ToyDataset(), progress=False)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        assert results[rank]["num_images"] == 5
        assert results[rank]["area_intersect"] == single["area_intersect"]
        assert results[rank]["area_union"] == single["area_union"]
        assert results[rank]["mIoU"] == pytest.approx(single["mIoU"])
