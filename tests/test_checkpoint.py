"""Checkpoints are read without executing pickled code and loaded strictly with clear errors."""

import os
import pickle
import sys
import types

import pytest
import torch

import offseg
from offseg.checkpoint import CheckpointError, read_state_dict


class HistoryBuffer:  # stands in for MMEngine's bookkeeping objects in a checkpoint's 'message_hub'
    def __init__(self):
        self.values = [1.0, 2.0]


# Pickled under MMEngine's module path, as a real MMEngine checkpoint names it.
HistoryBuffer.__module__ = "mmengine.logging.history_buffer"


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture(scope="module")
def small_state():
    return offseg.create_model("offseg-t", num_classes=3).state_dict()


def test_official_layout_loads(tmp_path, small_state):
    path = tmp_path / "official.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2", "iter": 160000}, "state_dict": small_state}, path)
    model = offseg.create_model("offseg-t", checkpoint=path)
    assert model.num_classes == 3
    assert torch.equal(
        model.state_dict()["decode_head.offset_learning.cls_repr"], small_state["decode_head.offset_learning.cls_repr"]
    )


def test_mmengine_extras_are_read_as_inert_data(tmp_path, small_state, monkeypatch):
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["mmengine.logging.history_buffer"].HistoryBuffer = HistoryBuffer
    path = tmp_path / "mmengine.pth"
    torch.save({"meta": {}, "state_dict": small_state, "message_hub": {"log": HistoryBuffer()}}, path)
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.delitem(sys.modules, name)  # as on a machine without mmengine
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what a plain weights_only load does with it
    assert set(read_state_dict(path)) == set(small_state)


def test_safetensors_and_ddp_prefix(tmp_path, small_state):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in small_state.items()}, str(path))
    assert set(read_state_dict(path)) == set(small_state)
    ddp = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in small_state.items()}}, ddp)
    offseg.create_model("offseg-t", checkpoint=ddp)


def test_pickle_that_would_run_code_is_refused(tmp_path, small_state):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": small_state, "payload": RunsCode()}, path)
    with pytest.raises(CheckpointError, match=r"refused: .*posix\.system|refused: .*os\.system"):
        read_state_dict(path)


def test_truncated_and_missing_files(tmp_path, small_state):
    path = tmp_path / "full.pth"
    torch.save({"state_dict": small_state}, path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pth: not a readable checkpoint"):
        read_state_dict(cut)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_state_dict(bad)


def test_wrong_model_lists_the_differences(tmp_path, small_state):
    path = tmp_path / "t.pth"
    torch.save({"state_dict": small_state}, path)
    with pytest.raises(CheckpointError) as err:
        offseg.create_model("offseg-b", checkpoint=path)
    text = str(err.value)
    assert "does not fit model offseg-b" in text and "shape mismatches" in text and "missing keys" in text


def test_num_classes_conflict_is_an_error(tmp_path, small_state):
    path = tmp_path / "t.pth"
    torch.save(small_state, path)
    with pytest.raises(ValueError, match="3 classes but num_classes=150"):
        offseg.create_model("offseg-t", num_classes=150, checkpoint=path)


def test_training_checkpoint_brings_its_architecture_options_and_model_name(tmp_path, small_state):
    path = tmp_path / "last.pth"
    torch.save(
        {
            "model": small_state,
            "model_name": "offseg-t",
            "optimizer": {},
            "num_classes": 3,
            "class_names": ["a", "b", "c"],
            "recipe": {"model_options": {"freeze_bn": True}},
        },
        path,
    )
    model = offseg.create_model("offseg-t", checkpoint=path)
    assert model.backbone.freeze_bn and model.class_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="holds weights of model offseg-t, not offseg-b"):
        offseg.create_model("offseg-b", checkpoint=path)
