"""Real inductor compiles on CPU (Debian's gcc; ~15-25 s for the first tiny compile): kept to two."""

from __future__ import annotations

import pytest
import torch
from conftest import run

from torchmagic.core.compile import explain_compile

pytestmark = pytest.mark.slow


def mlp_step(x, w):
    return torch.nn.functional.gelu(x @ w).sum(dim=-1) * 2.0


def test_inductor_compile_time_split_bench_and_check():
    torch.manual_seed(0)
    x, w = torch.randn(64, 32), torch.randn(32, 32)
    report = explain_compile(mlp_step, x, w, bench=True, check=True, min_time=0.05)
    assert report.backend == "inductor" and report.graph_count == 1 and report.clean
    # code generation happened in the backend and is part of dynamo's compile time
    assert 0 < report.codegen_seconds <= report.compile_seconds
    assert report.tracing_seconds == pytest.approx(report.compile_seconds
                                                   - report.codegen_seconds)
    assert report.graphs[0].codegen_seconds == pytest.approx(report.codegen_seconds)
    (diff,) = report.check
    assert diff.close and diff.shape == (64,) and diff.max_abs < 1e-4
    t = report.timing
    assert t.first_call_seconds > t.compiled_median and t.eager_median > 0


def test_inductor_cell_keeps_the_users_inductor_cache(ip):
    import torch._dynamo.utils as dutils

    torch.manual_seed(0)
    ip.user_ns.update(mlp_step=mlp_step, x=torch.randn(16, 8), w=torch.randn(8, 8))
    ip.run_cell("fast = torch.compile(mlp_step)\nfast(x, w)")
    _, shown = run(ip, "compile -o rep", "out = mlp_step(x, w)\nprint(out.sum().item())")
    rep = ip.user_ns["rep"]
    assert [b.kind for b in rep.graph_breaks] == ["item"] and rep.graph_breaks[0].cell_line == 2
    assert "inductor code generation" in shown
    frames = dict(dutils.counters["frames"])
    ip.run_cell("fast(x, w)")  # the user's compiled function: served from its own cache
    assert dict(dutils.counters["frames"]) == frames
