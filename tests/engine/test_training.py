"""Training: exact resumption after SIGKILL, and two-process DDP on CPU (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offseg.data import generate_synthetic_dataset

TRAIN_ARGS = [
    "--model",
    "offseg-t",
    "--data",
    "folder",
    "--iters",
    "8",
    "--batch-size",
    "2",
    "--crop",
    "64",
    "64",
    "--save-interval",
    "2",
    "--val-interval",
    "0",
    "--workers",
    "0",
    "--no-progress",
    "--seed",
    "3",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_train=6, num_val=2, size=(64, 96))


def _cmd(data: Path, work_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "offseg.cli.main",
        "train",
        *TRAIN_ARGS,
        "--data-root",
        str(data),
        "--work-dir",
        str(work_dir),
        *extra,
    ]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_data):
    straight = tmp_path / "straight"
    subprocess.run(_cmd(tiny_data, straight), check=True, env=_env(), capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny_data, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        last = killed / "last.pth"
        if last.is_file() and torch.load(last, weights_only=True)["iteration"] >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = torch.load(killed / "last.pth", weights_only=True)["iteration"]
    assert stopped_at < 8

    subprocess.run(_cmd(tiny_data, killed, "--resume"), check=True, env=_env(), capture_output=True)
    final = torch.load(killed / "last.pth", weights_only=True)
    assert final["iteration"] == 8
    expected = _weights(straight / "last.pth")
    for key, value in final["model"].items():
        assert torch.equal(value, expected[key]), f"{key} differs after resuming from iteration {stopped_at}"
    # The log reads as one run: what the killed process logged after its checkpoint is dropped
    # (those iterations ran again), each iteration appears once, and the resumption is noted.
    logs = {
        run: [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (straight, killed)
    }
    assert [r["iter"] for r in logs[killed] if "loss" in r] == [r["iter"] for r in logs[straight] if "loss" in r]
    assert {"event": "resume", "iter": stopped_at} in logs[killed]


def test_checkpoint_is_plain_data_and_loads_for_eval(tmp_path, tiny_data):
    import offseg

    work = tmp_path / "run"
    subprocess.run(_cmd(tiny_data, work, "--iters", "2"), check=True, env=_env(), capture_output=True)
    state = torch.load(work / "last.pth", weights_only=True)  # no pickled classes inside
    assert state["iteration"] == 2 and state["model_name"] == "offseg-t" and state["num_classes"] == 8
    model = offseg.create_model("offseg-t", checkpoint=work / "last.pth")
    assert model.num_classes == 8
    assert (work / "recipe.yaml").is_file() and (work / "log.jsonl").is_file()


DDP_SCRIPT = """
import hashlib, sys, torch
from offseg.engine.recipes import load_recipe
from offseg.engine.trainer import train
import torch.distributed as dist
data, work = sys.argv[1], sys.argv[2]
recipe = load_recipe("folder", model="offseg-t", overrides=[
    f"data.root={data}", "data.options.crop_size=[64, 64]", "data.num_workers=0", "train.iters=3",
    "train.batch_size=4", "train.val_interval=0", "train.save_interval=3"])
out = train(recipe, work, progress=False)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in out["model"].parameters())).hexdigest()
import os
open(f"{work}/rank{os.environ['RANK']}.sha", "w").write(digest)
"""


def test_two_process_ddp_keeps_ranks_identical(tmp_path, tiny_data):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    work = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(script),
        str(tiny_data),
        str(work),
    ]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = {(work / f"rank{r}.sha").read_text() for r in range(2)}
    assert len(digests) == 1, "parameters differ between ranks"
    state = torch.load(work / "last.pth", weights_only=True)
    assert state["iteration"] == 3 and len(state["rng"]) == 2  # every rank's RNG state is kept
