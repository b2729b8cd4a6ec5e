"""Real inductor compiles on CPU (Debian's gcc; ~15-40 s for a first tiny compile): kept to two,
each in its own process (AOT autograd leaves tensors alive for the rest of a process, which tests
counting live tensors would see)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import json, warnings
warnings.filterwarnings("ignore")
import torch
torch.manual_seed(0)

def mlp_step(x, w):
    return torch.nn.functional.gelu(x @ w).sum(dim=-1) * 2.0
"""


def _run(body: str) -> dict:
    code = textwrap.dedent(PRELUDE) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


def test_inductor_compile_time_split_bench_and_check():
    out = _run("""
        from torchmagic.core.compile import explain_compile
        x, w = torch.randn(64, 32), torch.randn(32, 32)
        r = explain_compile(mlp_step, x, w, bench=True, check=True, min_time=0.05)
        d = r.to_dict()
        d["graph_codegen"] = r.graphs[0].codegen_seconds
        print("RESULT " + json.dumps(d))
    """)
    assert out["backend"] == "inductor" and out["graph_count"] == 1 and out["graph_breaks"] == []
    # code generation happened in the backend and is part of dynamo's compile time
    assert 0 < out["codegen_seconds"] <= out["compile_seconds"]
    assert out["tracing_seconds"] == pytest.approx(out["compile_seconds"]
                                                   - out["codegen_seconds"])
    assert out["graph_codegen"] == pytest.approx(out["codegen_seconds"])
    (diff,) = out["check"]
    assert diff["close"] and diff["shape"] == [64] and diff["max_abs"] < 1e-4
    t = out["timing"]
    assert t["first_call_seconds"] > t["compiled_median"] and t["eager_median"] > 0
    assert t["speedup"] == pytest.approx(t["eager_median"] / t["compiled_median"])


def test_inductor_cell_keeps_the_users_inductor_cache():
    out = _run("""
        import torch._dynamo.utils as dutils
        from IPython.terminal.interactiveshell import TerminalInteractiveShell
        from IPython.utils.capture import capture_output
        ip = TerminalInteractiveShell.instance()
        ip.run_line_magic("load_ext", "torchmagic")
        ip.user_ns.update(torch=torch, mlp_step=mlp_step, x=torch.randn(16, 8),
                          w=torch.randn(8, 8))
        ip.run_cell("fast = torch.compile(mlp_step)\\nfirst = fast(x, w)")
        with capture_output() as cap:
            ip.run_cell_magic("compile", "-o rep", "out = mlp_step(x, w)\\n"
                                                   "print(out.sum().item())")
        rep = ip.user_ns["rep"]
        frames = dict(dutils.counters["frames"])
        ip.run_cell("again = fast(x, w)")  # the user's compiled function: its own cache
        print("RESULT " + json.dumps({
            "kinds": [b.kind for b in rep.graph_breaks],
            "cell_lines": [b.cell_line for b in rep.graph_breaks],
            "shown": cap.stdout + "".join(o.data["text/plain"] for o in cap.outputs),
            "recompiled": dict(dutils.counters["frames"]) != frames,
            "same": bool(torch.equal(ip.user_ns["first"], ip.user_ns["again"])),
        }))
    """)
    assert out["kinds"] == ["item"] and out["cell_lines"] == [2]
    assert "inductor code generation" in out["shown"]
    assert not out["recompiled"] and out["same"]
