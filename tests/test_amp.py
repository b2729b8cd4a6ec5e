"""``%%amp``, ``%amp on|off`` and ``torchmagic.amp``: dtypes, refusals, callbacks, state."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from conftest import HAS_CUDA, requires_cuda, run
from IPython.core.error import UsageError
from statecheck import Snapshot

from torchmagic.core.amp import amp, resolve_amp
from torchmagic.core.errors import TorchMagicError

CELL = "h = lin(x)\ns = x + x\n(h.dtype, s.dtype)"


def _setup(ip):
    torch.manual_seed(0)
    ip.user_ns.update(lin=nn.Linear(8, 8), x=torch.randn(4, 8))


def _ours(ip):
    return [fn for name in ("pre_run_cell", "post_run_cell")
            for fn in ip.events.callbacks[name] if "torchmagic" in type(getattr(fn, "__self__", None)).__module__]


@pytest.mark.parametrize("flag,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cpu_linear_runs_low_add_stays_float32(ip, flag, dtype):
    _setup(ip)
    value, shown = run(ip, f"amp --device cpu --dtype {flag} --report", CELL)
    assert value == (dtype, torch.float32)  # independent: the dtypes of the real tensors
    name = str(dtype).replace("torch.", "")
    assert shown.startswith(f"autocast cpu {name}: ")
    rows = {tuple(ln.split()[:2]) for ln in shown.splitlines()}
    assert ("addmm", name) in rows and ("add", "float32") in rows
    assert "not an autocast op" in shown
    assert torch.is_autocast_enabled("cpu") is False
    assert all(len(ln) <= 100 for ln in shown.splitlines())


def test_defaults_cpu_bf16_without_cuda(ip):
    _setup(ip)
    value, shown = run(ip, "amp", CELL)
    assert value == (torch.bfloat16, torch.float32)  # the model lives on cpu: cpu, bf16
    assert shown == ""  # without --report nothing but the value


def test_default_device_follows_the_models(ip):
    _setup(ip)
    assert resolve_amp(None, None, {"lin": ip.user_ns["lin"]}) == ("cpu", torch.bfloat16)
    with torch.device("meta"):
        meta = nn.Linear(2, 2)
    with pytest.raises(TorchMagicError, match="meta"):
        resolve_amp(None, None, {"big": meta})


def test_report_counts_match_a_reference_count(ip):
    _setup(ip)
    lin, x = ip.user_ns["lin"], ip.user_ns["x"]
    with amp("cpu", "bf16", models=[lin]) as run_:
        out = run_.set_result(torch.softmax(lin(lin(x)) + x, -1))
    rep = run_.report
    ops = {(r.op, r.dtype): r.count for r in rep.ops}
    assert ops[("addmm", "bfloat16")] == 2  # two Linear calls
    assert ops[("add", "float32")] == 1  # bf16 + float32 promotes to float32
    assert ops[("_softmax", "float32")] == 1 and out.dtype == torch.float32
    assert rep.result_dtype == "float32"
    reasons = {r.op: r.reason for r in rep.float32_ops}
    assert reasons["_softmax"].startswith("softmax") and "not an autocast op" in reasons["add"]
    assert rep.by_dtype == {"bfloat16": 2, "float32": 2}
    assert rep.casts >= 3 and not rep.advice and not rep.unexpected
    json.dumps(rep.to_dict())
    assert "<script" not in rep._repr_html_() and "addmm" in rep._repr_html_()
    w = rep._renderer().widget(rep)
    w.children[1].value = "bfloat16"
    assert "_softmax" not in w.children[2].value and "addmm" in w.children[2].value


def test_fp16_backward_without_scaler_gets_advice(ip):
    _setup(ip)
    _, shown = run(ip, "amp --dtype fp16 --report", "out = lin(x)\nout.float().sum().backward()")
    assert "float16 gradients may underflow" in shown
    assert 'scaler = torch.amp.GradScaler("cpu")' in shown
    assert "scaler.scale(loss).backward()" in shown and "scaler.update()" in shown
    _, shown = run(ip, "amp --dtype fp16 --report",
                   "scaler = torch.amp.GradScaler('cpu')\nout = lin(x)\n"
                   "scaler.scale(out.float().sum()).backward()")
    assert "underflow" not in shown
    _, shown = run(ip, "amp --dtype bf16 --report", "out = lin(x)\nout.float().sum().backward()")
    assert "underflow" not in shown and "backward:" in shown


def test_unexpected_float32_matmul_is_flagged():
    lin = nn.Linear(4, 4)
    with amp("cpu", "bf16", models=[lin]) as r:
        with torch.autocast("cpu", enabled=False):
            lin(torch.ones(2, 4))
    assert r.report.unexpected == ["addmm"]
    assert "UNEXPECTED" in str(r.report)


REFUSALS = [
    ("amp --dtype float32", "does nothing"),
    ("amp --dtype fp64", "does nothing"),
    ("amp --dtype int8", "not a low-precision float"),
    ("amp --device cuda:0", "device type, not an index"),
    ("amp --device gpu", "not a device type"),
    ("amp --device meta", "autocast does not run on meta"),
    ("amp --device tpu", "not supported by autocast"),
    ("amp on", "the cell magic takes only"),
]
if not HAS_CUDA:
    REFUSALS.append(("amp --device cuda", "no cuda device on this machine"))
if not torch.backends.mps.is_available():
    REFUSALS.append(("amp --device mps", "no mps device on this machine"))
if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
    REFUSALS.append(("amp --device xpu", "no xpu device on this machine"))


@pytest.mark.parametrize("line,msg", REFUSALS)
def test_each_refused_combination_is_one_line(ip, line, msg):
    _setup(ip)
    with pytest.raises(UsageError) as info:
        run(ip, line, "y = lin(x)")
    assert msg in str(info.value) and "\n" not in str(info.value)
    assert "y" not in ip.user_ns  # refused before running anything
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("line,msg", [
    ("amp on --report", "--report applies to one cell"),
    ("amp sideways", "expected on or off"),
    ("amp off --dtype bf16", "takes no options"),
    ("amp on --dtype float32", "does nothing"),
    ("amp --dtype bf16", "say on or off"),
])
def test_line_magic_bad_input(ip, line, msg):
    with pytest.raises(UsageError) as info:
        run(ip, line)
    assert msg in str(info.value) and "\n" not in str(info.value)
    assert not _ours(ip)


def test_amp_on_off_callbacks_and_state(ip):
    _setup(ip)
    before = [list(ip.events.callbacks[k]) for k in ("pre_run_cell", "post_run_cell")]
    torch.set_autocast_dtype("cpu", torch.float16)  # a user setting that must come back
    try:
        snap = Snapshot.take(lin=ip.user_ns["lin"], x=ip.user_ns["x"])
        _, shown = run(ip, "amp on --dtype bf16")
        assert "autocast on for every following cell: cpu bfloat16" in shown
        run(ip, "amp on --dtype bf16")  # twice: never doubled
        assert len(_ours(ip)) == 2
        ip.run_cell("res = (lin(x).dtype, torch.is_autocast_enabled('cpu'))")
        assert ip.user_ns["res"] == (torch.bfloat16, True)
        ip.run_cell("%amp off")
        assert not _ours(ip)
        assert [list(ip.events.callbacks[k]) for k in ("pre_run_cell", "post_run_cell")] == before
        ip.run_cell("res = (lin(x).dtype, torch.is_autocast_enabled('cpu'))")
        assert ip.user_ns["res"] == (torch.float32, False)
        snap.assert_unchanged()
        _, shown = run(ip, "amp off")
        assert "was not on" in shown
    finally:
        torch.set_autocast_dtype("cpu", torch.bfloat16)


def test_unload_and_reload_remove_callbacks(ip):
    ip.run_cell("%amp on")
    assert len(_ours(ip)) == 2
    _, shown = run(ip, "reload_ext torchmagic")
    assert "%reload_ext torchmagic: kept %amp on (cpu bfloat16)" in shown
    assert len(_ours(ip)) == 2  # kept, never doubled
    ip.run_cell("flag = torch.is_autocast_enabled('cpu')")
    assert ip.user_ns["flag"] is True
    ip.run_cell("%reload_ext torchmagic")  # from inside a cell that runs under autocast
    ip.run_cell("flag = torch.is_autocast_enabled('cpu')")
    assert ip.user_ns["flag"] is True and len(_ours(ip)) == 2
    ip.run_cell("%amp off")
    assert not _ours(ip) and not torch.is_autocast_enabled("cpu")
    ip.run_cell("%amp on")
    assert len(_ours(ip)) == 2
    ip.run_cell("flag = torch.is_autocast_enabled('cpu')")
    assert ip.user_ns["flag"] is True
    ip.run_line_magic("unload_ext", "torchmagic")
    try:
        assert not _ours(ip) and not torch.is_autocast_enabled("cpu")
    finally:
        ip.run_line_magic("load_ext", "torchmagic")


def test_amp_on_status_line(ip):
    _, shown = run(ip, "amp")
    assert shown.startswith("autocast is off")


# -- state invariants --------------------------------------------------------------------------------
def _snap(ip):
    _setup(ip)
    ip.user_ns["lin"].eval()
    return Snapshot.take(lin=ip.user_ns["lin"], x=ip.user_ns["x"])


def test_state_on_success(ip):
    snap = _snap(ip)
    run(ip, "amp --report", "with torch.no_grad():\n    y = lin(x)\ny")
    snap.assert_unchanged()


def test_state_on_exception_report_then_reraise(ip):
    snap = _snap(ip)
    from IPython.utils.capture import capture_output

    with capture_output() as cap, pytest.raises(RuntimeError, match="shapes"):
        ip.run_cell_magic("amp", "--report", "with torch.no_grad():\n    y = lin(x)\n    lin(y[:, :3])")
    assert "The cell raised RuntimeError" in "".join(o.data["text/plain"] for o in cap.outputs)
    snap.assert_unchanged()


def test_state_on_keyboard_interrupt(ip):
    snap = _snap(ip)
    with pytest.raises(KeyboardInterrupt):
        run(ip, "amp --report", "with torch.no_grad():\n    y = lin(x)\nraise KeyboardInterrupt")
    snap.assert_unchanged()


def test_cell_that_changes_autocast_itself_is_undone_only_for_what_amp_touched(ip):
    _setup(ip)
    run(ip, "amp", "torch.set_autocast_enabled('cpu', True)")
    assert not torch.is_autocast_enabled("cpu")


# -- CUDA ---------------------------------------------------------------------------------------------
@requires_cuda
def test_cuda_default_device_and_dtype(ip):
    ip.user_ns.update(lin=nn.Linear(8, 8).cuda(), x=torch.randn(4, 8, device="cuda"))
    value, shown = run(ip, "amp --report", CELL)
    low = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert value == (low, torch.float32)
    assert shown.startswith(f"autocast cuda {str(low).replace('torch.', '')}")
    assert not torch.is_autocast_enabled("cuda")


def test_report_counts_floating_ops_and_names_a_nested_dtype(ip):
    """BatchNorm's integer num_batches_tracked update is not an op autocast could lower: the
    share is over floating-point ops. A nested autocast with another dtype is named, and every
    line fits 100 columns."""
    from torchmagic.models import SmallCNN

    ip.user_ns.update(cnn=SmallCNN(), x=torch.randn(2, 3, 32, 32))
    _, shown = run(ip, "amp --report", "y = cnn(x)")
    rep_line = shown.splitlines()[0]
    # SmallCNN: 2 conv, 2 bn, 3 relu, 2 pool, 2 linear = 11 floating ops (+2 int64 add_)
    assert "11 of 11 floating-point forward ops in bfloat16 (100.0%)" in rep_line, shown
    _, shown = run(ip, "amp --report",
                   "with torch.autocast('cpu', dtype=torch.float16):\n    y = cnn(x)")
    assert "0 of 11 floating-point" in shown and "11 in float16 (a" in shown
    assert "nested autocast or explicit cast" in " ".join(shown.split())
    assert all(len(line) <= 100 for line in shown.splitlines()), shown


# -- issue 11: %amp on/off nest with autocast regions in any order ----------------------------------
NESTINGS = {
    # cell sources run one after the other; then autocast must be as the user expects
    "on inside %%amp": (["%%amp\nget_ipython().run_line_magic('amp', 'on')", "pass"], True),
    "on then off inside %%amp": (["%amp on", "%%amp\nget_ipython().run_line_magic('amp', 'off')",
                                  "pass"], False),
    "on inside with autocast": (["with torch.autocast('cpu'):\n    get_ipython().run_line_magic("
                                 "'amp', 'on')", "pass"], True),
    "off inside with autocast": (["%amp on", "with torch.autocast('cpu'):\n"
                                  "    get_ipython().run_line_magic('amp', 'off')", "pass"], False),
    "unload inside %%amp": (["%amp on", "%%amp\nget_ipython().run_line_magic('unload_ext', "
                             "'torchmagic')", "pass"], False),
    "on inside %%amp then off": (["%%amp\nget_ipython().run_line_magic('amp', 'on')",
                                  "%amp off", "pass"], False),
    "off then cell": (["%amp on", "%amp off", "with torch.autocast('cpu'):\n    pass"], False),
}


@pytest.mark.parametrize("name", list(NESTINGS))
def test_amp_on_off_nest_with_autocast_regions(ip, name):
    cells, expect_on = NESTINGS[name]
    _setup(ip)
    try:
        for cell in cells:
            r = ip.run_cell(cell)
            assert r.error_in_exec is None and r.error_before_exec is None, (cell, r)
        r = ip.run_cell("flag = torch.is_autocast_enabled('cpu')")
        assert ip.user_ns["flag"] is expect_on
        ip.run_cell("get_ipython().run_line_magic('load_ext', 'torchmagic')\n%amp off")
        assert not torch.is_autocast_enabled("cpu")  # and off when the user says so
        assert not _ours(ip)  # nothing left registered
    finally:
        ip.run_line_magic("load_ext", "torchmagic")
