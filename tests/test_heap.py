"""offseg._heap: glibc heap settings of the commands. Each check of a process-wide setting runs in
a child process, so the test process keeps glibc's defaults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from offseg.cli.main import main

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heap settings")

# Rounds of: allocate ten 8 MB blocks, touch them, free them all. With glibc's defaults the freed
# top of the heap goes back to the system after each round and is faulted in again by the next.
_ROUNDS = """
import json, resource, sys
from offseg._heap import keep_freed_heap
kept = keep_freed_heap() if sys.argv[1] == "kept" else None
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [bytearray(8 << 20) for _ in range(10)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _rounds(variant: str, **env: str) -> dict:
    import json

    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run(
        [sys.executable, "-c", _ROUNDS, variant], env=environment, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


@glibc_only
def test_keep_freed_heap_stops_the_faults_of_repeated_work():
    default, kept = _rounds("default"), _rounds("kept")
    pages = 10 * (8 << 20) // 4096
    assert kept["kept"] is True
    assert min(default["faults"][1:]) > pages // 2  # every round faults its memory in again
    assert max(kept["faults"][1:]) < pages // 20  # the first round's pages are reused


@glibc_only
def test_keep_freed_heap_leaves_a_set_environment_alone():
    assert _rounds("kept", MALLOC_TRIM_THRESHOLD_="1048576")["kept"] is False
    assert _rounds("kept", MALLOC_MMAP_THRESHOLD_="1048576")["kept"] is False


class _Called(Exception):
    pass


@pytest.mark.parametrize("command", ["predict", "eval", "train"])
def test_repeating_commands_keep_the_freed_heap(monkeypatch, command):
    # Each sets it first thing, before any model or data is loaded.
    import offseg._heap

    def called() -> bool:
        raise _Called

    monkeypatch.setattr(offseg._heap, "keep_freed_heap", called)
    arguments = ["picture.jpg"] if command == "predict" else ["--data", "camvid", "--data-root", "nowhere"]
    arguments = ["--work-dir", "nowhere", *arguments] if command == "train" else arguments
    arguments = ["--model", "offseg-t", *arguments]
    with pytest.raises(_Called):
        main([command, *arguments])
