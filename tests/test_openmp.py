"""The `offseg` command sets OpenMP's wait policy before torch loads; library imports do not."""

import os
import subprocess
import sys

from offseg import _openmp


def test_launched_as_cli(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/offseg", "train"])
    assert _openmp.launched_as_cli()
    monkeypatch.setattr(sys, "argv", ["-m"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "-u", "-m", "offseg.cli.main", "predict"], raising=False)
    assert _openmp.launched_as_cli()
    monkeypatch.setattr(sys, "argv", ["app.py"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "app.py"], raising=False)
    assert not _openmp.launched_as_cli()


def test_cli_sets_passive_before_torch_loads():
    probe = (
        "import sys; sys.argv = ['offseg']; import offseg, os, torch; "
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["PASSIVE", "True"]


def test_cli_keeps_a_policy_the_environment_sets(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(sys, "argv", ["/venv/bin/offseg"])
    monkeypatch.delitem(sys.modules, "torch")  # as if torch were not loaded yet
    _openmp.set_cli_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_library_import_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/offseg"])
    _openmp.set_cli_defaults()  # torch is already loaded here: too late to matter, so nothing is set
    assert "OMP_WAIT_POLICY" not in os.environ
