"""The README's runnable examples: the plain-Python script and the terminal tour both run cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(*args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_plain_python_example_runs_without_ipython() -> None:
    proc = _run(str(ROOT / "examples/plain_python.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "weight tied to wte.weight" in out
    assert "forward NaN born in aten.log" in out
    assert "Traceback" not in out + proc.stderr


def test_terminal_tour_runs_every_cell_as_expected() -> None:
    proc = _run(str(ROOT / "examples/tour.py"), columns=120)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "[tour] every cell ran as expected" in proc.stdout
    from test_display import tour_fits

    tour_fits(proc.stdout, 120)  # a 120-column terminal (test_display runs it at 80)
    # Expected failures are one-line UsageErrors, never tracebacks from torchmagic's internals.
    shown = proc.stdout + proc.stderr  # IPython prints UsageErrors on stderr
    assert "Traceback" not in shown
    assert shown.count("UsageError: ") >= 3
