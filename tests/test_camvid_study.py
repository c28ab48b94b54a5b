"""The CamVid study's run plan and report (benchmarks/camvid_study.py, camvid_report.py), on made-up results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import camvid_study  # noqa: E402
from camvid_report import write_report  # noqa: E402


def test_plan_puts_the_main_comparison_first_and_covers_every_variant_three_times():
    runs = camvid_study.planned_runs()
    main = ("offseg-t-pixel", "offseg-t")
    assert [(m, s) for _, m, s in runs[:6]] == [(m, s) for s in (0, 1, 2) for m in main]
    assert len(runs) == len(set(runs)) == 3 * len(camvid_study.VARIANTS) + 4
    assert [m for _, m, _ in runs[12:18]] == ["segformer-b0", "segformer-b0-ol"] * 3
    # added after the first 18, so the runs already made keep their places
    assert [(m, s) for _, m, s in runs[18:]] == [(m, s) for s in (3, 4) for m in main]


def _fake_result(model: str, seed: int, miou: float, **setting) -> dict:
    curve = [[100 * i, miou * i / 10] for i in range(1, 11)]
    return {
        "model": model,
        "seed": seed,
        "test": {"mIoU": miou, "mAcc": 50.0, "aAcc": 80.0},
        "test_iou": [miou, float("nan")],
        "class_names": ["Sky", "Pole"],
        "best_val_mIoU": miou + 1,
        "best_iter": 1000,
        "val_curve": curve,
        "params": 6_000_000,
        "gflops_at_crop": 0.6,
        "train_seconds_logged": 1800.0,
        "seconds_this_call": 1900.0,
        "command": "-m offseg.cli.main train --model " + model + " --seed " + str(seed),
        **setting,
    }


def test_report_states_spread_verdicts_and_each_runs_setting(tmp_path: Path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    values = {
        "offseg-t-pixel": [36.0, 36.5, 37.0],
        "offseg-t": [30.0, 30.5, 31.0],
        "offseg-t-co": [36.2, 36.9],
        "segformer-b0": [30.0, 31.0],
        "segformer-b0-ol": [32.0, 33.0],
    }
    for model, mious in values.items():
        for seed, miou in enumerate(mious):
            # seed 0 as written before --jobs and subnormal flushing existed
            setting = {} if seed == 0 else {"threads": 1, "jobs": 2, "subnormals_flushed": True}
            (results / f"{model}_s{seed}").mkdir(parents=True)
            (results / f"{model}_s{seed}" / "result.json").write_text(
                json.dumps(_fake_result(model, seed, miou, **setting))
            )
    docs = tmp_path / "docs"
    write_report(results, camvid_study.planned_runs(), camvid_study.VARIANTS, docs)
    page = (docs / "results-camvid.md").read_text()
    assert (docs / "results-camvid.png").stat().st_size > 0
    assert "Finished: 12 of the 22 planned runs (3 seeds per variant and 5 for per-pixel vs offset learning" in page
    assert "| per-pixel | `offseg-t-pixel` | 3 | 36.50 ± 0.50 |" in page
    assert (
        "In short, at this scale: in OffSeg-T Offset Learning does not beat the per-pixel classifier; it scores "
        "lower (test -6.00, best val -6.00 mIoU, means over 3 and 3 seeds); in SegFormer-B0 Offset Learning scores "
        "higher than the per-pixel classifier (test +2.00, best val +2.00 mIoU, means over 2 and 2 seeds). Whether"
    ) in page
    assert "offset learning vs per-pixel, test: -6.00 mIoU, more than twice the larger seed spread (0.50" in page
    assert "offset learning vs per-pixel, best val: -6.00 mIoU" in page
    assert "class offsets only vs per-pixel, test: +0.05 mIoU, within twice the larger seed spread" in page
    assert "SegFormer-B0 + OL vs SegFormer-B0, test: +2.00 mIoU, more than twice the larger seed spread" in page
    assert "feature offsets only vs per-pixel: not compared yet" in page
    assert "30 min (alone, 2 threads, subnormals not flushed); 30 min (2 at a time, 1 thread each)" in page
    assert "| `offseg-t` | 2 | 31.00 | 32.00 (1000) | 30 min | 2 at a time, 1 thread each |" in page
    assert "| Sky | Pole |" in page and "| — |" in page  # a class absent from test shows as a dash
