"""Lint, format and type checks, part of the default suite so that the README's test command
enforces them: `ruff check`, `ruff format --check` (whole repository) and mypy (`src/offseg`),
all configured in pyproject.toml. Each runs as a subprocess of this Python's installation of the
tool (pinned in requirements-dev.txt) and is skipped, saying so, when the tool is not installed.
mypy keeps its cache in .mypy_cache: about 30 s cold, about 1 s after that."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: pip install -r requirements-dev.txt")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def assert_clean(result: subprocess.CompletedProcess, what: str, fix: str) -> None:
    assert result.returncode == 0, f"{what} failed ({fix}):\n{result.stdout}{result.stderr}"


def test_ruff_check():
    result = run_tool("ruff", "check", "--no-cache", "--output-format", "concise", ".")
    assert_clean(result, "ruff check", "`ruff check --fix .` fixes some; see pyproject [tool.ruff]")


def test_ruff_format():
    result = run_tool("ruff", "format", "--no-cache", "--check", ".")
    assert_clean(result, "ruff format --check", "run `ruff format .`")


def test_mypy():
    result = run_tool("mypy")  # files and settings: pyproject [tool.mypy]
    assert_clean(result, "mypy", "fix the types; `# type: ignore[code]` only where a library's stubs are wrong")
