"""%%benchmark: Timer with a copied namespace, the right thread count, comparisons, invariants."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn as nn
from conftest import run
from IPython.core.error import UsageError
from statecheck import Snapshot

from torchmagic.core.bench import BenchResult, benchmark
from torchmagic.magics.bench import split_options


def usage_error(ip, line: str, cell: str | None = None) -> str:
    with pytest.raises(UsageError) as info:
        run(ip, line, cell)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_sleep_reference_fixed_runs(ip):
    """An independent reference: time.sleep(0.01) takes 10 ms (plus a little scheduler slack)."""
    ip.user_ns["time"] = time
    _, shown = run(ip, "benchmark -n 5 -o r", "time.sleep(0.01)")
    r = ip.user_ns["r"]
    assert isinstance(r, BenchResult)
    assert abs(r.median - 0.01) < 0.01, r.median
    assert r.median >= 0.0099  # sleep never returns early
    assert r.runs == 5 and r.measurements == 5 and r.number_per_run == 1 and len(r.times) == 5
    assert "median" in shown and "ms per run" in shown and "5 in 5 measurements" in shown


def test_sleep_reference_blocked_autorange(ip):
    ip.user_ns["time"] = time
    _, shown = run(ip, "benchmark --min-time 0.05 -o r", "time.sleep(0.005)")
    r = ip.user_ns["r"]
    assert abs(r.median - 0.005) < 0.01 and r.median >= 0.0049
    # How many blocks fit in min_run_time depends on torch's noisy first block-size estimate,
    # so only the bookkeeping is asserted: every run belongs to exactly one measured block.
    assert r.runs == r.number_per_run * r.measurements >= 1
    assert len(r.times) == r.measurements
    assert "blocked_autorange(min_run_time=0.05 s)" in r.method
    # Two workloads in a known ratio: 4 sleeps vs 1 sleep of 2 ms.
    slow = benchmark("for _ in range(4): time.sleep(0.002)", {"time": time}, number=5)
    fast = benchmark("time.sleep(0.002)", {"time": time}, number=5)
    assert 2.5 < slow.median / fast.median < 5.5


def test_threads_default_is_torch_threads_not_one(ip):
    seen: list[int] = []
    ip.user_ns["seen"] = seen
    before = torch.get_num_threads()
    _, shown = run(ip, "benchmark -n 3 -o r", "seen.append(torch.get_num_threads())")
    assert set(seen) == {before} and ip.user_ns["r"].num_threads == before
    assert "torch.get_num_threads()" in shown and "Timer's own default would be 1" in shown
    seen.clear()
    _, shown = run(ip, "benchmark -n 3 --threads 1 -o r", "seen.append(torch.get_num_threads())")
    assert set(seen) == {1} and "1 (--threads)" in shown
    assert torch.get_num_threads() == before


def test_assignments_do_not_leak_and_module_semantics(ip):
    ip.user_ns.update(k=1, x=torch.ones(3))
    run(ip, "benchmark -n 4", "k = k + 1\nnew_name = k\nx = x * 2\nx")
    assert ip.user_ns["k"] == 1 and "new_name" not in ip.user_ns
    assert torch.equal(ip.user_ns["x"], torch.ones(3))
    # Inside the copy the cell ran like a notebook cell run again and again (no UnboundLocalError).
    r = benchmark("k = k + 1", ns := {"k": 0}, number=3)
    assert ns["k"] == 0 and r.runs == 3


def test_in_place_changes_are_reported(ip):
    bn = nn.BatchNorm1d(4)
    t = torch.zeros(3)
    ip.user_ns.update(bn=bn, t=t, x=torch.randn(8, 4))
    _, shown = run(ip, "benchmark -n 2 -o r", "t.add_(1)\nbn(x)")
    r = ip.user_ns["r"]
    assert torch.equal(t, torch.full((3,), 3.0))  # warm-up + 2 runs: real, not isolated
    text = " ".join(r.changed_in_place)
    assert "t: values" in text and "bn: " in text and "running_mean" in text
    assert "changed these objects in place" in shown
    bn.eval()
    _, shown = run(ip, "benchmark -n 2 -o r", "bn(x)")
    assert ip.user_ns["r"].changed_in_place == []


def test_compare_table_across_cells(ip):
    ip.user_ns.update(a=torch.randn(32, 32), time=time)
    run(ip, "benchmark -n 3 --compare slow", "time.sleep(0.004)")
    _, shown = run(ip, "benchmark -n 3 --compare fast", "time.sleep(0.001)")
    assert "Benchmark comparison (2 results)" in shown
    lines = {ln.split()[0]: ln for ln in shown.splitlines() if ln.startswith(("slow", "fast"))}
    assert "fastest" in lines["fast"] and "x slower" in lines["slow"]
    ratio = float(lines["slow"].split("x slower")[0].split()[-1])
    assert 1.5 < ratio < 6
    # Same label again: replaced, not duplicated.
    _, shown = run(ip, "benchmark -n 3 --compare fast", "time.sleep(0.001)")
    assert "(2 results)" in shown
    _, shown = run(ip, "benchmark")
    assert "(2 results)" in shown
    _, shown = run(ip, "benchmark --clear")
    assert "cleared" in shown
    assert "give a statement" in usage_error(ip, "benchmark")
    # Unloading the extension drops the table.
    run(ip, "benchmark -n 2 --compare x", "a @ a")
    ip.run_line_magic("reload_ext", "torchmagic")
    assert "give a statement" in usage_error(ip, "benchmark")


def test_line_form(ip):
    ip.user_ns["a"] = torch.randn(16, 16)
    _, shown = run(ip, "benchmark -n 3 -o r a @ a.T + 1")
    r = ip.user_ns["r"]
    assert r.statement == "a @ a.T + 1" and r.runs == 3
    assert split_options("-n 5 --threads 2 x @ y") == ("-n 5 --threads 2", "x @ y")
    assert split_options("--clear") == ("--clear", "")
    assert split_options("-n 2 -- -x") == ("-n 2", "-x")


def test_bad_inputs(ip):
    ip.user_ns["model"] = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    assert "-n must be at least 1" in usage_error(ip, "benchmark -n 0", "1 + 1")
    assert "--min-time" in usage_error(ip, "benchmark --min-time 0", "1 + 1")
    assert usage_error(ip, "benchmark --threads 0", "1 + 1").startswith("%%benchmark: --threads")
    assert usage_error(ip, "benchmark --threads 0 1 + 1").startswith("%benchmark: --threads")
    assert "empty" in usage_error(ip, "benchmark", "   \n")
    assert "not valid Python" in usage_error(ip, "benchmark", "x = (")
    assert "argument -n" in usage_error(ip, "benchmark -n lots", "1 + 1")
    # The user's own exception comes back unchanged, with a note naming the failing module.
    with pytest.raises(RuntimeError) as info:
        run(ip, "benchmark -n 2", "y = model(torch.ones(2, 5))")
    assert "mat1 and mat2 shapes cannot be multiplied" in str(info.value)
    assert any("model.0 (Linear) with input (2, 5)" in n for n in info.value.__notes__)


def _state_cell_setup(ip):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    x = torch.randn(3, 4)
    ip.user_ns.update(model=model, x=x)
    return model, x


def test_state_invariants_success(ip):
    model, x = _state_cell_setup(ip)
    snap = Snapshot.take(model, x=x)
    run(ip, "benchmark -n 3", "y = model(x + torch.randn(3, 4))\ntorch.set_grad_enabled(False)")
    snap.assert_unchanged()  # RNG consumed by the cell and grad mode: restored
    assert torch.is_grad_enabled()


def test_state_invariants_exception(ip):
    model, x = _state_cell_setup(ip)
    snap = Snapshot.take(model, x=x)
    threads = torch.get_num_threads()
    with pytest.raises(ZeroDivisionError, match="^division by zero$"):
        run(ip, "benchmark -n 3 --threads 1",
            "torch.randn(2)\ntorch.set_default_dtype(torch.float64)\n1 / 0")
    snap.assert_unchanged()
    assert torch.get_num_threads() == threads and torch.get_default_dtype() == torch.float32


def test_state_invariants_keyboard_interrupt(ip):
    model, x = _state_cell_setup(ip)
    snap = Snapshot.take(model, x=x)
    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        run(ip, "benchmark --threads 1", "y = model(x)\ntorch.randn(5)\nraise KeyboardInterrupt")
    snap.assert_unchanged()
    assert torch.get_num_threads() == threads


def test_plain_python_and_renderers():
    a = torch.randn(8, 8)
    r = benchmark(lambda: a @ a, number=3)
    assert r.runs == 3 and r.statement.endswith("<lambda>")
    json.dumps(r.to_dict())
    assert r.measurement.number_per_run == 1
    from torchmagic.core.bench import compare
    from torchmagic.display import bench as view

    c = compare([r, benchmark("a + a", {"a": a}, number=3, label="add")], current="add")
    assert "<table" in c._repr_html_() and "add" in str(c)
    assert view.widget(r).value == view.html(r)
    assert all(len(line) <= 100 for line in str(r).splitlines())
    assert view.human_time(0.01003) == "10.0 ms" and view.human_time(2.5e-6) == "2.50 us"
    assert view.human_time(0.0009999) == "1.00 ms" and view.human_time(9.996e-7) == "1.00 us"


def test_user_exception_and_bad_output_through_run_cell(ip):
    """What a notebook user sees: their own exception (not a UsageError), and a bad -o refused
    before the cell runs (its side effects do not happen)."""
    ip.user_ns["calls"] = []
    r = ip.run_cell("%%benchmark -n 2\nraise KeyError('mine')")
    assert type(r.error_in_exec) is KeyError and r.error_in_exec.args == ("mine",)
    r = ip.run_cell("%%benchmark -n 2 -o 1bad\ncalls.append(1)")
    assert type(r.error_in_exec) is UsageError and "-o needs a variable name" in str(r.error_in_exec)
    assert ip.user_ns["calls"] == []
    r = ip.run_cell("%benchmark -n 2 raise_it = 1 / 0")
    assert type(r.error_in_exec) is ZeroDivisionError


def test_comment_only_cell_is_refused(ip):
    assert "only comments" in usage_error(ip, "benchmark -n 2", "# nothing to time\n")


@pytest.mark.parametrize("magic", ["%%benchmark -n 2", "%benchmark -n 2", "%%profile",
                                   "%%detect_anomaly", "%%amp", "%%gpumem"])
def test_user_traceback_shows_user_frames_not_torchmagic_internals(ip, magic):
    """A cell that fails under a magic shows the traceback a plain cell would: the user's frames,
    none from torchmagic's own files (they are marked ``__tracebackhide__``)."""
    from IPython.utils.capture import capture_output

    ip.run_cell("def failing_helper():\n    return 1 / 0")
    src = f"{magic} failing_helper()" if magic.startswith("%b") else f"{magic}\nfailing_helper()"
    with capture_output() as cap:
        r = ip.run_cell(src)
    assert type(r.error_in_exec) is ZeroDivisionError
    tb = cap.stdout + cap.stderr
    assert "ZeroDivisionError" in tb and "failing_helper()" in tb and "return 1 / 0" in tb
    import torchmagic as tm

    pkg = tm.__file__.rsplit("/", 1)[0]
    assert pkg not in tb and "torchmagic/core" not in tb and "torchmagic/magics" not in tb, tb


# -- issue 11 ---------------------------------------------------------------------------------------
def test_min_time_is_bounded(ip):
    for value in ("inf", "1e300", "601"):
        msg = usage_error(ip, f"benchmark --min-time {value}", "1 + 1")
        assert "too long" in msg and "at most 600" in msg and "-n N" in msg
    assert "too long" in usage_error(ip, "benchmark --min-time inf 1 + 1")


def test_writes_through_notebook_functions_and_user_ns_do_not_leak(ip):
    r = ip.run_cell("counter = 0\ndef bump():\n    global counter\n    counter += 1\n"
                    "    return counter")
    assert r.success
    _, shown = run(ip, "benchmark -n 3", "bump()\nget_ipython().user_ns['leak'] = 1\n"
                   "get_ipython().user_ns['counter'] = -5")
    assert ip.user_ns["counter"] == 0 and "leak" not in ip.user_ns
    assert "undone" in shown and "leak" in shown


SETTINGS_CELL = """
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True, warn_only=True)
torch.set_float32_matmul_precision("medium")
torch.backends.cudnn.benchmark = True
torch.backends.cudnn.deterministic = True
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
"""


@pytest.mark.parametrize("magic", ["benchmark -n 2", "meta_shape"])
def test_global_settings_the_cell_changes_are_restored(ip, magic):
    from torchmagic.core.state import GlobalState

    before = GlobalState.capture()
    threads = torch.get_num_threads()
    run(ip, magic, SETTINGS_CELL)
    assert before.diff(GlobalState.capture()) == []
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.allow_tf32 and not torch.backends.cudnn.deterministic


def test_snapshot_helper_sees_each_global_setting():
    """The snapshot helper notices every setting the cells above change (else those tests could
    not fail), and nothing once it is put back."""
    from torchmagic.core.state import GlobalState

    before = GlobalState.capture()
    for line in SETTINGS_CELL.strip().splitlines():
        snap = Snapshot.take()
        exec(line, {"torch": torch})  # noqa: S102
        assert snap.differences(), line
        before.restore()
        snap.assert_unchanged()


QUANTIZED_CHILD = r"""
import warnings, torch, torch.nn as nn
warnings.simplefilter("ignore")
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
ip.run_line_magic("load_ext", "torchmagic")
m = nn.Linear(2, 2)
m.register_buffer("q", torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.quint8))
m.register_buffer("s", torch.eye(3).to_sparse())
m.register_buffer("k", torch.zeros(2, 3).to_mkldnn())
ip.user_ns.update(m=m, torch=torch)
ip.run_cell_magic("benchmark", "-n 2", "m.q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint8)")
print("SURVIVED")
"""


def test_quantized_buffer_in_the_namespace_does_not_kill_the_kernel():
    """The change watch read every buffer's bytes with view(torch.uint8): a segfault on a
    quantized tensor. Run in a child process: a crash is a failed test, not a dead test run."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", QUANTIZED_CHILD], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "SURVIVED" in proc.stdout, (proc.returncode, proc.stderr[-800:])
    assert "benchmark: m.q = " in proc.stdout
