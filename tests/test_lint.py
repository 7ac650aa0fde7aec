"""The code is as STYLE.md asks: `ruff check` and `ruff format` find nothing to say about it (their settings
are pyproject.toml's), so CI, which runs the tests, catches what a commit forgot to lint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ["src", "tests", "benchmarks"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_finds_nothing(command: list[str]) -> None:
    pytest.importorskip("ruff")  # a test dependency (pyproject's `test` extra)
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *TREES], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, f"ruff {' '.join(command)}:\n{done.stdout}{done.stderr}"
