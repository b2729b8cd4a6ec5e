"""Issue 11: a seeded fuzz run of every magic (tests/fuzz_magics.py), in a child process.

Malformed lines and cells, unusual tensors (every layout) and models (quantized buffers, hooks,
locks, generators, lazy, meta, failing forwards): no traceback from torchmagic's files, no call
running past its limit, no crash (a segfault kills the child, not the test run), and the snapshot
helper finds no change in the models, the namespace or the global torch state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SEED = 11
SECONDS = 40


@pytest.mark.slow
def test_every_magic_survives_malformed_input(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, os.path.join(here, "fuzz_magics.py"), str(SEED),
                           str(SECONDS)], capture_output=True, text=True, timeout=SECONDS + 240,
                          cwd=tmp_path)  # the child also moves to its own temporary folder
    assert proc.returncode == 0, f"the fuzz child died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["failures"], "\n".join(result["failures"])
    assert result["calls"] >= 200, result  # the run covered enough ground
    assert {"summary", "meta_shape", "checkpoint", "benchmark", "tensors", "gpumem"} <= set(
        result["magics"])
    assert result["outcomes"]["ok"] and result["outcomes"]["usage"]
