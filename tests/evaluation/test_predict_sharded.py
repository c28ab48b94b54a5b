"""`offseg predict` under torchrun: the inputs are split across the processes by rank."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import offseg
from offseg.cli.main import main
from offseg.predict import shard_inputs


def test_shard_inputs_partitions_the_list():
    items = list(range(11))
    for world in (1, 2, 3, 4, 16):
        shares = [shard_inputs(items, rank, world) for rank in range(world)]
        assert sorted(x for share in shares for x in share) == items  # each item exactly once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        shard_inputs(items, 2, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_predict_under_torchrun_writes_every_file_once(tmp_path, capsys):
    rng = np.random.default_rng(0)
    inputs = tmp_path / "photos"
    names = ["a", "b", "c", "sub/d", "sub/e"]
    for index, name in enumerate(names):
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        size = (40 + 8 * index, 56)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(inputs / f"{name}.png")
    torch.manual_seed(0)
    checkpoint = tmp_path / "segformer-b0.pth"
    torch.save({"state_dict": offseg.create_model("segformer-b0", num_classes=5).state_dict()}, checkpoint)
    common = ["--model", "segformer-b0", "--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"]

    sharded = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += ["-m", "offseg.cli.main", "predict", str(inputs), "--out", str(sharded), *common]
    result = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = dict(re.findall(r"rank (\d)/2: (\d+) file\(s\) written, 0 skipped", result.stdout))
    assert per_rank == {"0": "3", "1": "2"}, result.stdout  # files 0, 2, 4 and 1, 3
    assert "5 file(s) written" in result.stdout and result.stdout.count("file(s) written to") == 1

    # The shares add up to the inputs and every output exists: each file was written exactly once.
    written = sorted(str(p.relative_to(sharded)) for p in sharded.rglob("*.png"))
    assert written == sorted([f"{n}.png" for n in names] + [f"{n}_overlay.png" for n in names])

    # The same labels as one process.
    single = tmp_path / "single"
    assert main(["predict", str(inputs), "--out", str(single), *common]) == 0
    capsys.readouterr()
    for name in names:
        np.testing.assert_array_equal(
            np.asarray(Image.open(sharded / f"{name}.png")), np.asarray(Image.open(single / f"{name}.png"))
        )
