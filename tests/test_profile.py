"""%%profile: torch.profiler over a cell, top ops, memory, shapes, trace, quiet stderr, invariants."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
from conftest import requires_cuda, run
from IPython.core.error import UsageError
from statecheck import Snapshot

from torchmagic.core.profile import ProfileResult, profile


def usage_error(ip, line: str, cell: str) -> str:
    with pytest.raises(UsageError) as info:
        run(ip, line, cell)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith("%%profile: "), msg
    return msg


def profiler_off() -> bool:
    return not torch._C._autograd._profiler_enabled()


def test_top_ops_counts_and_namespace(ip):
    ip.user_ns.update(a=torch.randn(16, 32), b=torch.randn(32, 8))
    value, shown = run(ip, "profile --rows 50 -o p",
                       "for _ in range(3):\n    c = torch.mm(a, b)\nd = c.relu()\nd.sum()")
    p = ip.user_ns["p"]
    assert isinstance(p, ProfileResult)
    rows = {r.name: r for r in p.rows}
    assert rows["aten::mm"].calls == 3 and rows["aten::relu"].calls == 1  # the cell's own counts
    assert rows["aten::mm"].cpu_total >= rows["aten::mm"].self_cpu > 0
    selfs = [r.self_cpu for r in p.rows]
    assert selfs == sorted(selfs, reverse=True)
    assert abs(p.self_cpu_total - sum(r.self_cpu for r in p.rows)) < 1e-9  # every row shown
    assert p.wall > 0
    # Ran like a normal cell: assignments stay, the value comes back.
    assert torch.equal(ip.user_ns["d"], (ip.user_ns["a"] @ ip.user_ns["b"]).relu())
    assert torch.equal(value, ip.user_ns["d"].sum())
    assert "Profile (torch.profiler)" in shown and "mm" in shown and "self CPU" in shown
    assert all(len(line) <= 100 for line in shown.splitlines())
    json.dumps(p.to_dict())


def test_shapes_memory_and_sort(ip):
    ip.user_ns.update(a=torch.randn(16, 32), b=torch.randn(32, 8))
    _, shown = run(ip, "profile --shapes --memory --sort memory -o p",
                   "big = torch.empty(1024, 1024)\nc = torch.mm(a, b)")
    p = ip.user_ns["p"]
    mm = next(r for r in p.rows if r.name == "aten::mm")
    assert mm.shapes == "(16, 32), (32, 8)"
    empty = max((r for r in p.rows if r.name == "aten::empty"), key=lambda r: r.self_cpu_memory)
    assert empty.self_cpu_memory == 1024 * 1024 * 4  # float32, the cell's allocation
    assert mm.self_cpu_memory == 16 * 8 * 4
    mems = [r.cpu_memory for r in p.rows]
    assert mems == sorted(mems, reverse=True) and p.sort == "memory"
    assert "4.0 MiB" in shown and "input shapes" in shown
    # torch's own key names are accepted.
    run(ip, "profile --sort count -o p2", "torch.mm(a, b)")
    assert ip.user_ns["p2"].sort == "calls"


def test_trace_file(ip, tmp_path):
    path = tmp_path / "trace.json"
    ip.user_ns["a"] = torch.randn(8, 8)
    _, shown = run(ip, f"profile --trace {path}", "a @ a")
    data = json.loads(path.read_text())
    names = {e.get("name") for e in data["traceEvents"]}
    assert "aten::mm" in names or "aten::matmul" in names
    assert "ui.perfetto.dev" in shown and "chrome://tracing" in shown and str(path) in shown


def test_profiler_stderr_noise_is_hidden_user_stderr_kept(ip, capfd):
    """Kineto logs to fd 2 directly; the user's own fd-2 output is written back to sys.stderr."""
    from IPython.utils.capture import capture_output

    ip.user_ns["os"] = os
    with capture_output() as cap:
        ip.run_cell_magic("profile", "", "os.write(2, b'user says hi\\n')\ntorch.ones(3).sum()")
    err = capfd.readouterr().err + cap.stderr
    assert "user says hi" in cap.stderr
    assert "profiler_start" not in err and ".cpp:" not in err


def test_bad_inputs(ip, tmp_path):
    msg = usage_error(ip, "profile --sort bogus", "1")
    assert "'bogus' is not a sort key" in msg and "self_cpu" in msg and "cpu_total" in msg
    assert "needs --memory" in usage_error(ip, "profile --sort memory", "1")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in usage_error(ip, "profile --sort self_cuda", "1")
    assert "--rows must be at least 1" in usage_error(ip, "profile --rows 0", "1")
    assert "does not exist" in usage_error(ip, f"profile --trace {tmp_path}/no/t.json", "1")
    assert "empty" in usage_error(ip, "profile", "  ")
    assert "not valid Python" in usage_error(ip, "profile", "x = (")
    ip.user_ns["flag"] = []
    usage_error(ip, "profile --sort bogus", "flag.append(1)")
    assert ip.user_ns["flag"] == []  # options are checked before the cell runs


def test_failing_cell_names_module_and_restores(ip):
    fd_before = os.fstat(2).st_ino
    model = nn.Sequential(nn.Linear(4, 3))
    ip.user_ns["model"] = model
    # The user's own exception comes back unchanged (type, message, traceback), like a plain
    # cell; a note names the module that was running and its input shapes.
    with pytest.raises(RuntimeError) as info:
        run(ip, "profile", "y = model(torch.ones(2, 5))")
    assert "mat1 and mat2 shapes cannot be multiplied" in str(info.value)
    assert any("model.0 (Linear) with input (2, 5)" in n for n in info.value.__notes__)
    assert profiler_off() and os.fstat(2).st_ino == fd_before
    run(ip, "profile", "model(torch.ones(2, 4))")  # a second profile works


def test_keyboard_interrupt_restores(ip):
    fd_before = os.fstat(2).st_ino
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.ones(2, 4)
    ip.user_ns.update(model=model, x=x)
    snap = Snapshot.take(model, x=x)
    with pytest.raises(KeyboardInterrupt):
        run(ip, "profile --memory --shapes", "y = model(x)\nraise KeyboardInterrupt")
    assert profiler_off() and os.fstat(2).st_ino == fd_before
    snap.assert_unchanged()
    run(ip, "profile", "model(x)")


def test_state_invariants_success_and_exception(ip):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    x = torch.randn(3, 4)
    ip.user_ns.update(model=model, x=x)
    snap = Snapshot.take(model, x=x)
    run(ip, "profile --memory", "y = model(x)")
    snap.assert_unchanged()
    with pytest.raises(ValueError, match="^boom$"):
        run(ip, "profile", "y = model(x)\nraise ValueError('boom')")
    snap.assert_unchanged()
    assert profiler_off()


def test_warmup_runs_first(ip):
    calls: list[int] = []
    ip.user_ns["calls"] = calls
    run(ip, "profile --warmup 2 -o p", "calls.append(1)\ntorch.ones(2) + 1")
    assert len(calls) == 3 and ip.user_ns["p"].warmup == 2


def test_plain_python_and_renderers():
    a = torch.randn(8, 8)
    holder: dict = {}
    p = profile(lambda: (a @ a).sum(), rows=3, result_holder=holder)
    assert len(p.rows) <= 3 and p.total_ops >= len(p.rows)
    assert torch.equal(holder["value"], (a @ a).sum())
    from torchmagic.display import profile as view

    assert "<table" in view.html(p) and view.widget(p).value == view.html(p)
    assert "CUDA is not available" in str(p) or p.cuda


@requires_cuda
def test_cuda_activity(ip):
    ip.user_ns["a"] = torch.randn(256, 256, device="cuda")
    _, shown = run(ip, "profile -o p", "b = a @ a")
    p = ip.user_ns["p"]
    assert p.cuda and p.sort == "self_device" and p.self_device_total > 0
    assert "self CUDA" in shown


def test_user_exception_and_bad_output_through_run_cell(ip):
    """A failing cell re-raises the user's exception unchanged; a bad -o is refused before the
    cell runs; the profiler and fd 2 are restored either way."""
    ip.user_ns["calls"] = []
    r = ip.run_cell("%%profile\nraise KeyError('mine')")
    assert type(r.error_in_exec) is KeyError and r.error_in_exec.args == ("mine",)
    assert profiler_off()
    r = ip.run_cell("%%profile -o 1bad\ncalls.append(1)")
    assert type(r.error_in_exec) is UsageError and "-o needs a variable name" in str(r.error_in_exec)
    assert ip.user_ns["calls"] == []


def test_profiler_inside_the_cell_is_explained(ip):
    """A torch.profiler opened in the cell steals the events: say so instead of 'no op ran'."""
    ip.user_ns.update(model=nn.Linear(4, 4), x=torch.ones(2, 4))
    _, shown = run(ip, "profile", "with torch.profiler.profile():\n    model(x)")
    assert "profilers do not nest" in shown and "no torch operator ran" not in shown
    assert profiler_off()


def test_comment_only_cell_is_refused(ip):
    assert "only comments" in usage_error(ip, "profile", "# nothing here\n")
