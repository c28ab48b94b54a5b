"""Weights in and out: `offseg convert`, the own format (safetensors + JSON) and training checkpoints."""

import json
import os

import pytest
import torch

import offseg
from offseg.checkpoint import CheckpointError, read_checkpoint
from offseg.cli.main import main

MODEL = "segformer-b0-ol"  # the quickest model to build
CLASSES = ["sky", "building", "road"]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture(scope="module")
def trained_state():
    torch.manual_seed(0)
    model = offseg.create_model(MODEL, num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.state_dict()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_official_checkpoint_converts_and_loads(tmp_path, trained_state, capsys):
    official = tmp_path / "segformer_ol.pth"
    meta = {
        "mmseg_version": "1.2.2",
        "iter": 160000,
        "dataset_meta": {"classes": tuple(CLASSES), "palette": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]},
    }
    torch.save({"meta": meta, "state_dict": trained_state}, official)

    assert main(["convert", str(official), str(tmp_path / "out"), "--model", MODEL]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((tmp_path / "out.json").read_text())
    assert config["model_name"] == MODEL and config["num_classes"] == 3
    assert config["class_names"] == CLASSES and config["palette"][2] == [7, 8, 9]
    assert config["mean"] == [123.675, 116.28, 103.53] and config["std"] == [58.395, 57.12, 57.375]

    model = offseg.create_model(MODEL, checkpoint=tmp_path / "out.safetensors")
    assert model.num_classes == 3
    assert _equal(model.state_dict(), trained_state)


def test_convert_records_a_named_dataset(tmp_path, trained_state):
    from offseg.data import dataset_info

    info = dataset_info("synthetic")
    torch.manual_seed(0)
    state = offseg.create_model(MODEL, num_classes=info.num_classes).state_dict()
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "in.pth")
    assert (
        main(["convert", str(tmp_path / "in.pth"), str(tmp_path / "out"), "--model", MODEL, "--dataset", "synthetic"])
        == 0
    )
    config = json.loads((tmp_path / "out.json").read_text())
    assert config["dataset"] == "synthetic" and config["class_names"] == list(info.class_names)
    # a dataset with another class count is refused
    torch.save({"meta": {}, "state_dict": trained_state}, tmp_path / "three.pth")
    assert (
        main(["convert", str(tmp_path / "three.pth"), str(tmp_path / "x"), "--model", MODEL, "--dataset", "synthetic"])
        == 1
    )


def test_truncated_file_is_refused(tmp_path, trained_state, capsys):
    path = tmp_path / "cut.pth"
    torch.save({"meta": {}, "state_dict": trained_state}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert main(["convert", str(path), str(tmp_path / "out"), "--model", MODEL]) == 1
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and str(path) in err
    assert not (tmp_path / "out.safetensors").exists()


def test_wrong_model_is_refused_with_the_differing_keys(tmp_path, trained_state, capsys):
    path = tmp_path / "segformer.pth"
    torch.save({"meta": {}, "state_dict": trained_state}, path)
    assert main(["convert", str(path), str(tmp_path / "out"), "--model", "segformer-b0"]) == 1
    err = capsys.readouterr().err
    assert "does not fit model segformer-b0" in err
    assert "unexpected keys" in err and "decode_head.offset_learning" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_code_executing_pickle_is_refused(tmp_path, trained_state, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"meta": {"hook": RunsCode()}, "state_dict": trained_state}, path)
    assert main(["convert", str(path), str(tmp_path / "out"), "--model", MODEL]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "system" in err  # names the callable it would have run


def test_own_format_round_trip(tmp_path, trained_state):
    model = offseg.create_model(MODEL, num_classes=3)
    model.load_state_dict(trained_state)
    weights = offseg.save_pretrained(
        model, tmp_path / "mine", class_names=CLASSES, palette=[[0, 0, 0], [9, 9, 9], [255, 0, 0]]
    )
    assert weights == tmp_path / "mine.safetensors" and (tmp_path / "mine.json").is_file()

    loaded = offseg.load_pretrained(tmp_path / "mine")
    assert loaded.name == MODEL and loaded.num_classes == 3
    assert loaded.class_names == CLASSES and loaded.palette[2] == [255, 0, 0]
    assert _equal(loaded.state_dict(), trained_state)
    # every way of naming the files reaches the same weights
    for path in ("mine", "mine.safetensors", "mine.json"):
        assert _equal(offseg.create_model(MODEL, checkpoint=tmp_path / path).state_dict(), trained_state)

    # the weights file alone still describes itself (a copy of the config sits in its header)
    (tmp_path / "mine.json").unlink()
    info = read_checkpoint(tmp_path / "mine.safetensors")
    assert info.kind == "offseg" and info.metadata["class_names"] == CLASSES

    with pytest.raises(CheckpointError, match="holds weights of model segformer-b0-ol, not segformer-b0"):
        offseg.load_checkpoint(offseg.create_model("segformer-b0", num_classes=3), tmp_path / "mine.safetensors")


def test_save_pretrained_checks_its_inputs(tmp_path):
    model = offseg.create_model(MODEL, num_classes=3)
    with pytest.raises(ValueError, match="2 class names given for a model with 3 classes"):
        offseg.save_pretrained(model, tmp_path / "x", class_names=["a", "b"])
    with pytest.raises(ValueError, match="palette"):
        offseg.save_pretrained(model, tmp_path / "x", palette=[[0, 0, 0]])


def test_training_checkpoint_loads_everywhere(tmp_path, trained_state):
    path = tmp_path / "last.pth"
    torch.save(
        {
            "model": trained_state,
            "optimizer": {"state": {}, "param_groups": []},
            "iteration": 10,
            "model_name": MODEL,
            "num_classes": 3,
            "class_names": CLASSES,
            "recipe": {"model": MODEL},
        },
        path,
    )
    info = read_checkpoint(path)
    assert info.kind == "training" and info.metadata["class_names"] == CLASSES
    assert _equal(offseg.create_model(MODEL, checkpoint=path).state_dict(), trained_state)
    assert offseg.load_pretrained(path).class_names == CLASSES

    assert main(["convert", str(path), str(tmp_path / "out"), "--model", MODEL]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["class_names"] == CLASSES
    assert main(["convert", str(path), str(tmp_path / "out2"), "--model", "segformer-b0"]) == 1


def test_truncated_safetensors_is_refused(tmp_path, trained_state):
    model = offseg.create_model(MODEL, num_classes=3)
    weights = offseg.save_pretrained(model, tmp_path / "w")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        offseg.create_model(MODEL, checkpoint=weights)
