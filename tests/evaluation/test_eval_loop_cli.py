"""evaluate() and `offseg eval`: on an injected toy dataset, and on real CamVid val."""

from __future__ import annotations

import argparse
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from evalhelpers import CAMVID_ROOT, ConvStandIn, camvid_skip_reason

from offseg.cli.eval import resolve_test_mode
from offseg.cli.main import main
from offseg.evaluation import evaluate
from offseg.inference import infer


class OracleDataset:
    """Labels are the stand-in's own predictions at the original size, with a few ignored rows:
    a perfect score is expected. Images come 'test-scaled' (smaller than the labels)."""

    num_classes = 4
    ignore_index = 255
    class_names = ["w", "x", "y", "z"]

    def __init__(self, model, n=4):
        gen = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(n):
            image = torch.randn(3, 20 + i, 30, generator=gen)
            ori = (30 + 2 * i, 45)
            with torch.no_grad():
                label = infer(model, image, out_size=ori).argmax(1)[0]
            label[0] = 255
            self.items.append({"image": image, "label": label, "ori_size": ori})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_evaluate_oracle_is_perfect_and_limit_counts(standin):
    data = OracleDataset(standin)
    res = evaluate(standin, data, progress=False)
    assert res["aAcc"] == pytest.approx(100) and res["num_images"] == 4
    present = [iou for iou in res["IoU"] if not math.isnan(iou)]
    assert present and all(iou == pytest.approx(100) for iou in present)
    assert res["class_names"] == data.class_names
    assert evaluate(standin, data, progress=False, limit=2)["num_images"] == 2
    assert standin.training is False


def test_evaluate_restores_training_mode_and_checks_classes(standin):
    data = OracleDataset(standin)
    standin.train()
    evaluate(standin, data, mode="slide", crop_size=16, stride=8, progress=False, limit=1)
    assert standin.training
    with pytest.raises(ValueError, match="classes"):
        evaluate(ConvStandIn(num_classes=5), data, progress=False)


def test_resolve_test_mode_from_flags():
    def ns(**kw):
        base = dict(model="offseg-t", data="ade20k", mode=None, crop=None, stride=None)
        return argparse.Namespace(**{**base, **kw})

    assert resolve_test_mode(ns()) == {"mode": "slide", "crop_size": (512, 512), "stride": (480, 480)}
    assert resolve_test_mode(ns(mode="whole"))["mode"] == "whole"
    assert resolve_test_mode(ns(data="camvid", crop=[64, 96])) == {
        "mode": "slide",
        "crop_size": (64, 96),
        "stride": (64, 96),
    }
    assert resolve_test_mode(ns(data="camvid", crop=[64, 96], stride=[32, 48]))["stride"] == (32, 48)
    assert resolve_test_mode(ns(stride=[256, 256]))["stride"] == (256, 256)
    with pytest.raises(ValueError, match="--crop"):
        resolve_test_mode(ns(data="camvid", mode="slide"))


def fake_data_module(dataset_factory):
    module = types.ModuleType("offseg.data")
    module.build_dataset = lambda name, root, split, pipeline="train", **options: dataset_factory()
    return module


def test_cli_eval_with_an_injected_dataset(tmp_path, monkeypatch, capsys):
    # Runs the command without the data layer: offseg.data is replaced by a toy module.
    class Toy:
        num_classes = 3
        ignore_index = 255
        class_names = ["road", "sky", "never-seen"]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            gen = torch.Generator().manual_seed(i)
            label = torch.randint(0, 2, (40, 50), generator=gen)
            label[:3] = 255
            return {"image": torch.randn(3, 40, 50, generator=gen), "label": label}

    monkeypatch.setitem(sys.modules, "offseg.data", fake_data_module(Toy))
    out_json = tmp_path / "r" / "res.json"
    code = main(
        [
            "eval",
            "--model",
            "offseg-t",
            "--data",
            "camvid",
            "--data-root",
            str(tmp_path),
            "--limit",
            "2",
            "--no-progress",
            "--json",
            str(out_json),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "randomly initialised" in out.err
    assert "| never-seen" in out.out and "mIoU:" in out.out and "2 images" in out.out
    report = json.loads(out_json.read_text())
    assert report["num_images"] == 2 and report["mode"] == "whole" and report["model"] == "offseg-t"
    assert report["per_class"][2]["class"] == "never-seen"
    assert report["IoU"][2] is None or report["IoU"][2] == 0.0  # NaN is written as null
    assert sum(report["area_label"]) == 2 * 37 * 50


def test_cli_eval_bad_limit_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "offseg.data", fake_data_module(lambda: []))
    assert main(["eval", "--model", "offseg-t", "--data", "camvid", "--data-root", str(tmp_path), "--limit", "0"]) == 1
    assert "--limit" in capsys.readouterr().err


skip_camvid = pytest.mark.skipif(camvid_skip_reason() is not None, reason=str(camvid_skip_reason()))


@skip_camvid
def test_cli_eval_camvid_val_two_images(tmp_path, capsys):
    out_json = tmp_path / "camvid.json"
    code = main(
        [
            "eval",
            "--model",
            "offseg-t",
            "--data",
            "camvid",
            "--data-root",
            str(CAMVID_ROOT),
            "--split",
            "val",
            "--limit",
            "2",
            "--json",
            str(out_json),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    from offseg.data import dataset_info

    for name in dataset_info("camvid").class_names:
        assert f"| {name}" in out.out
    assert out.out.strip().splitlines()[-2].startswith("aAcc:")  # table, summary, then the JSON note
    report = json.loads(out_json.read_text())
    assert report["num_images"] == 2 and len(report["IoU"]) == 11
    assert sum(report["area_label"]) > 0.9 * 2 * 360 * 480  # void pixels (label 11) are ignored
    assert 0 <= report["aAcc"] <= 100


@skip_camvid
@pytest.mark.slow
def test_cli_eval_camvid_val_full(tmp_path, capsys):
    out_json = tmp_path / "camvid.json"
    assert (
        main(
            [
                "eval",
                "--model",
                "offseg-t",
                "--data",
                "camvid",
                "--data-root",
                str(CAMVID_ROOT),
                "--json",
                str(out_json),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads(out_json.read_text())
    assert report["num_images"] == 101
    assert np.isfinite(report["aAcc"])


def test_evaluate_sees_through_a_subset(standin):
    data = OracleDataset(standin)
    data.ignore_index = 7  # must come through the Subset: nothing is labelled 7, 255 then counts as a class value
    res = evaluate(standin, torch.utils.data.Subset(data, [0, 1]), progress=False)
    assert res["num_images"] == 2 and res["class_names"] == data.class_names
    assert res["aAcc"] == pytest.approx(100)  # 255 is out of range, so it counts nowhere


def _half_resolution_run_checkpoint(path) -> None:
    """A checkpoint as `offseg train` writes it for a CamVid run validated at half resolution."""
    import offseg

    model = offseg.create_model("offseg-t", num_classes=11)
    recipe = {
        "model": "offseg-t",
        "data": {"name": "camvid", "options": {"scale": [240, 180]}, "test_options": {"scale": [240, 180]}},
    }
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {},
            "iteration": 1,
            "model_name": "offseg-t",
            "num_classes": 11,
            "recipe": recipe,
        },
        path,
    )


@skip_camvid
def test_eval_and_predict_default_to_the_training_runs_test_scale(tmp_path, capsys):
    import offseg

    ckpt = tmp_path / "best.pth"
    _half_resolution_run_checkpoint(ckpt)
    model = offseg.create_model("offseg-t", checkpoint=ckpt)
    assert model.test_scale == [240, 180]
    offseg.save_pretrained(model, tmp_path / "own", dataset="camvid")  # the own format keeps it
    assert offseg.create_model("offseg-t", checkpoint=tmp_path / "own").test_scale == [240, 180]

    common = [
        "eval",
        "--model",
        "offseg-t",
        "--checkpoint",
        str(ckpt),
        "--data",
        "camvid",
        "--data-root",
        str(CAMVID_ROOT),
        "--limit",
        "1",
        "--no-progress",
    ]
    assert main(common) == 0
    assert "test scale 240x180 (the training run's" in capsys.readouterr().err
    assert main(common + ["--scale", "480", "360"]) == 0
    assert "the training run's" not in capsys.readouterr().err
    assert main(common + ["--scale", "0", "0"]) == 1
    assert "two positive sizes" in capsys.readouterr().err

    image = sorted((CAMVID_ROOT / "val" / "images").iterdir())[0]
    assert (
        main(
            [
                "predict",
                "--model",
                "offseg-t",
                "--checkpoint",
                str(ckpt),
                str(image),
                "--out",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "offseg predict: test scale 240x180 (the training run's" in capsys.readouterr().err
    assert any((tmp_path / "out").rglob("*.png")) or any((tmp_path / "out").rglob("*.jpg"))
