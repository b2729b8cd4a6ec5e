"""``%gpumem``: report, cell form, --watch/--unwatch, --top, --snapshot; CPU paths with real
allocations checked against the kernel's own counters; CUDA paths marked ``requires_cuda``."""

from __future__ import annotations

import gc
import os
import sys

import psutil
import pytest
import torch
import torch.nn as nn
from conftest import HAS_CUDA, outputs, requires_cuda, run
from IPython.core.error import UsageError
from statecheck import Snapshot

import torchmagic
from torchmagic.core import memory as core

MB400 = 400_000_000  # 100 M float32
LINUX = sys.platform.startswith("linux") and os.path.exists("/proc/self/status")
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA output")


def _vm(field: str) -> int:
    """VmRSS / VmHWM in bytes, read here independently of torchmagic."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``), so that a test's
    allocation touches new pages and shows in RSS: freed memory an earlier test left in the heap
    would otherwise be reused without RSS moving. A no-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _live_storages() -> int:
    """Non-empty storages of the live tensors (parameters' .grad included), counted here
    independently of torchmagic: the reference for %gpumem --top's title."""
    gc.collect()
    seen = set()
    for o in gc.get_objects():
        if issubclass(type(o), torch.Tensor):  # type(): no __class__ lookups (deprecated objects)
            for t in (o, o.grad if o.is_leaf and o.requires_grad else None):
                if t is None or type(t) not in (torch.Tensor, nn.Parameter) or t.is_meta:
                    continue  # meta, fake and other subclasses: no plain storage of their own
                try:
                    st = t.untyped_storage()
                    if st.nbytes():
                        seen.add((str(t.device), st.data_ptr()))
                except Exception:  # noqa: BLE001 - fake, sparse, nested: no plain storage
                    continue
    return len(seen)


def _watcher(ip):
    from torchmagic.magics.memory import GpumemMagics

    state = ip._torchmagic_state
    return next(i for i in state["instances"] if isinstance(i, GpumemMagics)).watcher


def _n_callbacks(ip) -> tuple[int, int]:
    return len(ip.events.callbacks["pre_run_cell"]), len(ip.events.callbacks["post_run_cell"])


@pytest.fixture(autouse=True)
def _no_open_meters():
    yield
    assert not core._ledger.open, "a measurement was left open"


# -- %gpumem -----------------------------------------------------------------------------------
@no_cuda
def test_report_without_cuda(ip):
    value, shown = run(ip, "gpumem -o rep")
    assert value is None
    rep = ip.user_ns["rep"]
    assert isinstance(rep, core.MemoryReport)
    assert shown.splitlines()[0] == "%gpumem | no CUDA device is visible (this torch build has " \
        "no CUDA)" or "no CUDA device is visible" in shown.splitlines()[0]
    assert "CPU (this process): RSS" in shown and "peak RSS" in shown
    rss = psutil.Process().memory_info().rss
    assert abs(rep.cpu.rss - rss) < 0.05 * rss
    assert rep.cpu.peak_rss is not None and rep.cpu.peak_rss >= rep.cpu.rss * 0.99
    assert rep.cpu.total == psutil.virtual_memory().total
    assert rep.devices == [] and rep.to_dict()["cpu"]["rss"] == rep.cpu.rss
    assert all(len(line) <= 100 for line in str(rep).splitlines())


@pytest.mark.skipif(not LINUX, reason="Linux VmHWM")
def test_reset_says_what_and_resets_cpu_peak(ip):
    _release_free_heap()
    spike = torch.ones(25_000_000)  # 100 MB written
    del spike
    before_hwm = _vm("VmHWM")
    assert before_hwm > _vm("VmRSS") + 50_000_000
    _, shown = run(ip, "gpumem --reset -o rep")
    rep = ip.user_ns["rep"]
    assert rep.cpu.peak_rss >= before_hwm  # the report shows the peak before the reset
    assert any("CPU peak RSS" in r for r in rep.reset)
    assert "reset: CPU peak RSS" in shown
    assert _vm("VmHWM") < before_hwm - 50_000_000  # the kernel's counter really was reset
    if not HAS_CUDA:
        assert not any("cuda" in r for r in rep.reset)


def test_device_cpu_only(ip):
    _, shown = run(ip, "gpumem --device cpu -o rep")
    assert ip.user_ns["rep"].devices == []
    assert "CPU (this process)" in shown


# -- %%gpumem ------------------------------------------------------------------------------------
@pytest.mark.skipif(not LINUX, reason="RSS from /proc")
def test_cell_400mb_delta_and_peak(ip):
    gc.collect()
    value, shown = run(ip, "gpumem -o m", "big = torch.empty(100_000_000)\nbig.fill_(1.0)\n"
                       "big.numel()")
    assert value == 100_000_000  # the last expression is returned, like a normal cell
    assert isinstance(ip.user_ns["big"], torch.Tensor)  # assignments land in the notebook
    row = ip.user_ns["m"].row("CPU RSS")
    assert abs(row.delta - MB400) < 0.1 * MB400, row
    assert abs(row.peak_delta - MB400) < 0.1 * MB400, row
    assert row.peak_exact and row.after == pytest.approx(_vm("VmRSS"), rel=0.05)
    assert "CPU RSS" in shown and "%%gpumem" in shown
    assert all(len(line) <= 100 for line in shown.splitlines())
    del ip.user_ns["big"]


@pytest.mark.skipif(not LINUX, reason="RSS from /proc")
def test_cell_peak_of_a_freed_tensor_and_user_peak_kept(ip):
    gc.collect()
    hwm_before = _vm("VmHWM")  # the user's own peak, read independently
    run(ip, "gpumem -o m", "t = torch.ones(100_000_000)\ns = float(t.sum())\ndel t")
    row = ip.user_ns["m"].row("CPU RSS")
    assert abs(row.delta) < 0.1 * MB400, row  # freed again
    assert abs(row.peak_delta - MB400) < 0.1 * MB400, row  # but the peak saw it
    assert row.user_peak >= max(hwm_before, row.peak)
    assert ip.user_ns["s"] == 100_000_000.0


def test_plain_python_core():
    _release_free_heap()
    with torchmagic.measure_memory() as meter:
        x = torch.ones(25_000_000)
    cell = meter.result
    assert isinstance(cell, core.CellMemory) and cell.error is None
    row = cell.row("CPU RSS")
    assert abs(row.delta - 100_000_000) < 10_000_000
    assert cell.to_dict()["rows"][0]["delta"] == row.delta
    rep = torchmagic.gpumem()
    assert rep.cpu.rss > 0 and "CPU" in str(rep)
    top = torchmagic.top_tensors({"x": x}, n=3)
    assert top.entries[0].name == "x" and top.entries[0].bytes == 100_000_000
    del x


def test_measure_records_error_and_propagates():
    with pytest.raises(ZeroDivisionError), core.measure_memory() as meter:
        1 / 0  # noqa: B018
    assert meter.result is not None and meter.result.error.startswith("ZeroDivisionError")


@pytest.mark.skipif(not LINUX, reason="RSS from /proc")
def test_nested_measurements_keep_the_outer_peak():
    with core.measure_memory() as outer:
        t = torch.ones(50_000_000)  # 200 MB written, then freed
        del t
        with core.measure_memory() as inner:  # resets the kernel's peak
            torch.ones(10)
    assert abs(inner.result.row("CPU RSS").peak_delta) < 20_000_000
    assert abs(outer.result.row("CPU RSS").peak_delta - 200_000_000) < 20_000_000


@pytest.mark.skipif(not LINUX, reason="RSS from /proc")
def test_keep_peaks_reports_an_upper_bound(ip):
    t = torch.ones(50_000_000)
    del t  # the high-water mark is now ~200 MB above RSS
    hwm = _vm("VmHWM")
    run(ip, "gpumem --keep-peaks -o m", "y = 1")
    row = ip.user_ns["m"].row("CPU RSS")
    assert not row.peak_exact and row.peak >= hwm
    assert _vm("VmHWM") >= hwm  # not reset
    _, shown = run(ip, "gpumem --keep-peaks", "z = 2")
    assert "<= " in shown


def test_cell_error_shows_report_then_raises(ip):
    from IPython.utils.capture import capture_output

    with capture_output() as cap, pytest.raises(ZeroDivisionError):
        ip.run_cell_magic("gpumem", "", "a = 1\n1/0")
    text = cap.stdout + "".join(o.data["text/plain"] for o in cap.outputs)
    assert "the cell raised ZeroDivisionError" in text
    assert ip.user_ns["a"] == 1


# -- --watch ---------------------------------------------------------------------------------------
def test_watch_unwatch_reload_counts(ip):
    base = _n_callbacks(ip)
    run(ip, "gpumem --watch")
    assert _n_callbacks(ip) == (base[0] + 1, base[1] + 1)
    run(ip, "gpumem --watch")  # twice: still one pair
    assert _n_callbacks(ip) == (base[0] + 1, base[1] + 1)
    w = _watcher(ip)
    assert w.pre_run_cell in ip.events.callbacks["pre_run_cell"]
    assert all(getattr(cb, "__self__", None) is w
               for cb in ip.events.callbacks["pre_run_cell"][base[0]:])
    _, shown = run(ip, "gpumem --unwatch")
    assert "off" in shown and _n_callbacks(ip) == base
    _, shown = run(ip, "gpumem --unwatch")
    assert "was not on" in shown
    run(ip, "gpumem --watch")
    _, shown = run(ip, "reload_ext torchmagic")
    assert "kept %gpumem --watch" in shown  # issue 11: a reload keeps --watch on, and says so
    assert _n_callbacks(ip) == (base[0] + 1, base[1] + 1)  # never doubled
    run(ip, "gpumem --watch")
    ip.run_line_magic("reload_ext", "torchmagic")
    ip.run_line_magic("reload_ext", "torchmagic")
    run(ip, "gpumem --watch")
    assert _n_callbacks(ip) == (base[0] + 1, base[1] + 1)
    r = ip.run_cell("%reload_ext torchmagic")  # inside a watched cell: that cell is reported
    assert r.success and _watcher(ip).stack == []
    ip.run_line_magic("unload_ext", "torchmagic")
    assert _n_callbacks(ip) == base
    ip.run_line_magic("load_ext", "torchmagic")


@pytest.mark.skipif(not LINUX, reason="RSS from /proc")
def test_watch_reports_each_cell(ip):
    from IPython.utils.capture import capture_output

    run(ip, "gpumem --watch")
    with capture_output() as cap:
        ip.run_cell("w = torch.ones(25_000_000)", store_history=True)
    line = cap.stdout.strip().splitlines()[-1]
    assert line.startswith("[gpumem In [") and "CPU RSS" in line and "\n" not in line
    row = _watcher(ip).last.row("CPU RSS")
    assert abs(row.delta - 100_000_000) < 10_000_000
    with capture_output() as cap:
        ip.run_cell("del w", store_history=True)
    assert abs(_watcher(ip).last.row("CPU RSS").delta + 100_000_000) < 10_000_000
    with capture_output() as cap:
        ip.run_cell("1/0", store_history=True)
    assert "raised ZeroDivisionError" in cap.stdout
    # a nested run_cell (from a magic) is part of the outer cell, not a second line
    with capture_output() as cap:
        ip.run_cell("get_ipython().run_cell('q = 1')", store_history=True)
    assert cap.stdout.count("[gpumem") == 1
    run(ip, "gpumem --unwatch")
    with capture_output() as cap:
        ip.run_cell("r = 1", store_history=True)
    assert "[gpumem" not in cap.stdout


# -- --top ---------------------------------------------------------------------------------------
def test_top_names_and_counts_views_once(ip):
    ip.run_cell("big = torch.zeros(10_000_000)\nview = big[::2]\nmodel = nn.Linear(300, 200)\n"
                "model(torch.randn(4, 300)).sum().backward()\nxs = [torch.zeros(1000)]")
    _, shown = run(ip, "gpumem --top 50 -o top")
    top = ip.user_ns["top"]
    names = [e.name for e in top.entries]
    assert names.count("big") == 1 and "view" not in names
    e = next(e for e in top.entries if e.name == "big")
    assert e.bytes == 40_000_000 and e.views >= 1 and "view" in e.other_names
    assert e.shape == (10_000_000,) and e.dtype == "float32"
    assert "model.weight" in names and ".grad of model.weight" in names
    w = next(e for e in top.entries if e.name == "model.weight")
    assert w.bytes == 300 * 200 * 4 and w.kind == "parameter"
    assert "xs[0]" in names
    cpu = next(t for t in top.totals if t.device == "cpu")
    assert cpu.bytes >= 40_000_000 + 240_000 * 2
    big_row = next(ln for ln in shown.splitlines() if ln.split()[1:2] == ["big"])
    assert "+1 view (view)" in big_row, big_row
    live = _live_storages()  # 6 made here, plus any an earlier test left alive
    _, shown = run(ip, "gpumem --top")
    assert live >= 6
    assert shown.splitlines()[0].startswith(
        f"%gpumem --top 10: the {min(10, live)} largest of {live} live"), (live, shown)
    assert all(len(line) <= 100 for line in shown.splitlines())


def test_top_skips_meta():
    m = torch.empty(10**9, device="meta")
    top = core.top_tensors({"m": m}, n=5)
    assert all(e.name != "m" for e in top.entries) and top.skipped_meta >= 1


def test_top_skips_empty_storages():
    """0-byte tensors (the user's, and those torch keeps alive after a compile) hold no memory:
    not listed, not counted among the live storages, counted in the footer."""
    empty = [torch.empty(0) for _ in range(12)]
    full = torch.ones(1000)
    top = core.top_tensors({"empty": empty, "full": full}, n=50)
    names = [e.name for e in top.entries]
    assert "full" in names and not any(n.startswith("empty") for n in names)
    assert all(e.bytes > 0 for e in top.entries) and top.skipped_empty >= 12
    assert f"{top.skipped_empty} empty tensors skipped (0 bytes)" in str(top)
    assert f"{top.skipped_empty} empty tensors skipped (0 bytes)" in top._repr_html_()


# -- no CUDA: every option, no traceback -----------------------------------------------------
@no_cuda
@pytest.mark.parametrize("line, expect", [
    ("gpumem", "no CUDA device is visible"),
    ("gpumem --reset", "reset:"),
    ("gpumem --device cpu", "CPU"),
    ("gpumem --top", "%gpumem --top"),
    ("gpumem --top 2", "%gpumem --top 2"),
    ("gpumem --watch", "--watch: on"),
    ("gpumem --unwatch", "--watch"),
    ("gpumem --snapshot mem.pickle", "--snapshot needs CUDA: no CUDA device is visible"),
    ("gpumem --device 0", "--device 0: no CUDA device is visible"),
    ("gpumem --device cuda:1", "no CUDA device is visible"),
])
def test_every_option_without_cuda(ip, line, expect):
    try:
        _, shown = run(ip, line)
    except UsageError as exc:
        shown = str(exc)
        assert "\n" not in shown
    assert expect in shown
    run(ip, "gpumem --unwatch")


@no_cuda
def test_cell_options_without_cuda(ip):
    with pytest.raises(UsageError, match="needs CUDA") as info:
        run(ip, "gpumem --snapshot mem.pickle", "never_run = 1")
    assert "\n" not in str(info.value) and "never_run" not in ip.user_ns
    _, shown = run(ip, "gpumem --device cpu --keep-peaks", "ok = 1")
    assert "CPU RSS" in shown and ip.user_ns["ok"] == 1


@pytest.mark.parametrize("line, cell, message", [
    ("gpumem --device gpu", None, "--device 'gpu' is not a device here; valid:"),
    ("gpumem --device 99", None, "--device 99:"),
    ("gpumem --top 0", None, "--top needs a positive number"),
    ("gpumem --top -3", None, "--top"),
    ("gpumem --top abc", None, "invalid int value: 'abc'"),
    ("gpumem --watch --unwatch", None, "cannot be combined"),
    ("gpumem --watch --top", None, "cannot be combined"),
    ("gpumem --top --reset", None, "cannot be combined"),
    ("gpumem --keep-peaks", None, "--keep-peaks applies to %%gpumem"),
    ("gpumem --watch -o x", None, "-o stores a report"),
    ("gpumem -o 1x", None, "-o needs a variable name"),
    ("gpumem --unwatch --device 0", None, "--unwatch takes no --device"),
    ("gpumem --bogus", None, "unknown option"),
    ("gpumem --top", "x = 1", "--top is a line option"),
    ("gpumem --watch", "x = 1", "--watch is a line option"),
    ("gpumem --reset", "x = 1", "--reset is a line option"),
    ("gpumem -o 1x", "x = 1", "-o needs a variable name"),
    ("gpumem", "x = (", "the cell is not valid Python (line 1: "),
])
def test_bad_input_one_line(ip, line, cell, message):
    with pytest.raises(UsageError) as info:
        run(ip, line, cell)
    msg = str(info.value)
    assert message in msg and "\n" not in msg
    assert "x" not in ip.user_ns


# -- invariants ------------------------------------------------------------------------------
@pytest.mark.parametrize("cell, exc", [
    ("y = model(x)", None),
    ("y = model(x)\nraise ValueError('boom')", ValueError),
    ("y = model(x)\nraise KeyboardInterrupt", KeyboardInterrupt),
])
def test_state_unchanged(ip, cell, exc):
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU())
    model[1].eval()
    model(torch.randn(4, 8)).sum().backward()
    x = torch.randn(4, 8)
    ip.user_ns.update(model=model, x=x)
    snap = Snapshot.take(model, x=x)
    base = _n_callbacks(ip)
    threads = {t.name for t in __import__("threading").enumerate()}
    if exc is None:
        run(ip, "gpumem", cell)
    else:
        with pytest.raises(exc):
            run(ip, "gpumem", cell)
    snap.assert_unchanged()
    run(ip, "gpumem --top 3")
    run(ip, "gpumem")
    snap.assert_unchanged()
    assert _n_callbacks(ip) == base
    assert {t.name for t in __import__("threading").enumerate()} <= threads | {"MainThread"}


def test_watch_state_unchanged_on_interrupt(ip):
    model = nn.Linear(4, 4)
    ip.user_ns.update(model=model)
    snap = Snapshot.take(model)
    run(ip, "gpumem --watch")
    ip.run_cell("y = model(torch.ones(1, 4))\nraise KeyboardInterrupt")
    assert _watcher(ip).last.error.startswith("KeyboardInterrupt")
    assert not _watcher(ip).stack
    snap.assert_unchanged()
    run(ip, "gpumem --unwatch")


# -- display ---------------------------------------------------------------------------------
def test_html_and_widget(ip):
    rep = core.gpumem()
    h = rep._repr_html_()
    assert "<script" not in h and "CPU" in h and "http" not in h
    with core.measure_memory() as m:
        pass
    assert "<table" in m.result._repr_html_()
    from torchmagic.display import memory as dm

    assert dm.one_line(m.result).startswith("[gpumem cell]")
    import ipywidgets

    assert isinstance(dm.widget(rep), ipywidgets.VBox)
    assert isinstance(dm.widget(m.result), ipywidgets.HTML)
    panel = dm.watch_html(rep, m.result)  # the --watch panel: HTML, no widget
    assert dm.one_line(m.result) in panel.replace("&#x27;", "'") and "CPU" in panel
    bundles = outputs(ip, "gpumem")
    assert "text/plain" in bundles[0]


# -- CUDA (skipped without a GPU) --------------------------------------------------------------
@requires_cuda
def test_cuda_report_matches_torch():
    x = torch.empty(MB400 // 4, device="cuda")
    rep = core.gpumem(0)
    d = rep.devices[0]
    assert d.device == "cuda:0" and d.name == torch.cuda.get_device_name(0)
    props = torch.cuda.get_device_properties(0)
    assert d.capability == f"{props.major}.{props.minor}"
    assert d.allocated == torch.cuda.memory_allocated(0)
    assert d.reserved == torch.cuda.memory_reserved(0)
    free, total = torch.cuda.mem_get_info(0)
    assert d.total == total and abs(d.free - free) < 256 * 2**20
    assert d.reserved_unallocated == d.reserved - d.allocated
    assert d.peak_allocated >= torch.cuda.max_memory_allocated(0) - 1
    assert "cuda:0" in str(rep)
    del x


@requires_cuda
def test_cuda_cell_delta_peak_and_user_peak(ip):
    torch.cuda.init()
    spike = torch.empty(2 * MB400 // 4, device="cuda")
    del spike
    user_peak = torch.cuda.max_memory_allocated(0)
    run(ip, "gpumem -o m", "g = torch.ones(100_000_000, device='cuda')\n"
        "tmp = torch.ones(100_000_000, device='cuda')\ndel tmp")
    row = ip.user_ns["m"].row("cuda:0 allocated")
    assert row.delta == MB400
    assert row.peak_delta == 2 * MB400 and row.peak_exact
    assert row.user_peak >= user_peak
    rep = core.gpumem(0)  # the user's peak is still reported after the reset
    assert rep.devices[0].peak_allocated >= user_peak
    top = core.top_tensors(ip.user_ns, 3, device=0)
    assert top.entries[0].name == "g" and top.entries[0].device == "cuda:0"
    del ip.user_ns["g"]


@requires_cuda
def test_cuda_reset_and_snapshot(ip, tmp_path):
    _, shown = run(ip, "gpumem --reset")
    assert "cuda:0 peak allocated" in shown
    path = tmp_path / "mem.pickle"
    _, shown = run(ip, f"gpumem --snapshot {path}", "s = torch.ones(1000, device='cuda')")
    assert path.exists() and path.stat().st_size > 0 and "pytorch.org/memory_viz" in shown
    path2 = tmp_path / "next.pickle"
    run(ip, f"gpumem --snapshot {path2}")
    ip.run_cell("s2 = torch.ones(1000, device='cuda')")
    assert path2.exists()
    assert _n_callbacks(ip) == (len(ip.events.callbacks["pre_run_cell"]),
                                len(ip.events.callbacks["post_run_cell"]))


# -- code paths without the OS counters / without a GPU ------------------------------------------
def test_sampler_path_when_no_high_water_mark(monkeypatch):
    """Where the OS keeps no resettable peak (macOS, Windows), a sampler thread measures it."""
    monkeypatch.setattr(core, "_proc_status", lambda: None)
    monkeypatch.setattr(core, "_maxrss", lambda: None)
    gc.collect()
    with core.measure_memory() as meter:
        t = torch.ones(100_000_000)
        del t
    row = meter.result.row("CPU RSS")
    assert abs(row.peak_delta - MB400) < 0.1 * MB400, row
    assert abs(row.delta) < 0.1 * MB400
    assert any("sampler" in n for n in meter.result.notes)
    assert core.gpumem().cpu.peak_source == "unavailable"


class _FakeCuda:
    """torch.cuda's allocator counters, as torch keeps them: peak since the last reset."""

    def __init__(self) -> None:
        self.alloc = self.reserved = self.peak = self.peak_res = 0
        self.history: list[str] = []

    def malloc(self, n: int) -> None:
        self.alloc += n
        self.reserved = max(self.reserved, self.alloc)
        self.peak, self.peak_res = max(self.peak, self.alloc), max(self.peak_res, self.reserved)

    def install(self, mp: pytest.MonkeyPatch) -> None:
        from types import SimpleNamespace

        c = torch.cuda
        mp.setattr(core, "cuda_available", lambda: True)
        mp.setattr(c, "device_count", lambda: 1)
        mp.setattr(c, "is_initialized", lambda: True)
        mp.setattr(c, "get_device_properties", lambda d: SimpleNamespace(
            name="Fake GPU", major=9, minor=0, total_memory=80 * 2**30))
        mp.setattr(c, "mem_get_info", lambda d: (80 * 2**30 - self.reserved, 80 * 2**30))
        mp.setattr(c, "memory_allocated", lambda d=None: self.alloc)
        mp.setattr(c, "memory_reserved", lambda d=None: self.reserved)
        mp.setattr(c, "max_memory_allocated", lambda d=None: self.peak)
        mp.setattr(c, "max_memory_reserved", lambda d=None: self.peak_res)
        mp.setattr(c, "current_device", lambda: 0)

        def reset(d=None):
            self.peak, self.peak_res = self.alloc, self.reserved
            self.history.append("reset")

        mp.setattr(c, "reset_peak_memory_stats", reset)
        mp.setattr(c.memory, "_record_memory_history",
                   lambda *a, **k: self.history.append(f"record {k}"))
        mp.setattr(c.memory, "_dump_snapshot",
                   lambda path: (open(path, "wb").write(b"x"), self.history.append("dump")))


def test_cuda_paths_against_fake_allocator(monkeypatch, ip, tmp_path):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    core._ledger.forget("cuda:0/allocated")
    core._ledger.forget("cuda:0/reserved")
    fake.malloc(3 * MB400)
    fake.malloc(-3 * MB400)  # the user's own peak: 1.2 GB
    rep = core.gpumem(0)
    d = rep.devices[0]
    assert (d.name, d.capability, d.total, d.peak_allocated) == ("Fake GPU", "9.0", 80 * 2**30,
                                                                  3 * MB400)
    assert d.reserved_unallocated == 3 * MB400 and d.free == 80 * 2**30 - 3 * MB400
    assert "cuda:0: Fake GPU, compute capability 9.0" in str(rep)
    with core.measure_memory(0) as outer:
        fake.malloc(MB400)
        with core.measure_memory(0) as inner:  # resets the counters again
            fake.malloc(MB400)
            fake.malloc(-MB400)
        fake.malloc(-MB400)
    a = outer.result.row("cuda:0 allocated")
    assert (a.before, a.after, a.peak_delta, a.peak_exact) == (0, 0, 2 * MB400, True)
    assert a.user_peak == 3 * MB400  # the user's peak before the resets is kept
    assert inner.result.row("cuda:0 allocated").peak_delta == MB400
    assert core.gpumem(0).devices[0].peak_allocated == 3 * MB400  # still the user's peak
    assert "empty_cache" not in fake.history
    fake.peak = 0  # the user resets the counter themselves: the carried peak is dropped
    assert core.gpumem(0).devices[0].peak_allocated == 0
    n_resets = fake.history.count("reset")
    with core.measure_memory(0, reset_peaks=False) as keep:
        fake.malloc(10)
    assert fake.history.count("reset") == n_resets
    assert keep.result.row("cuda:0 allocated").peak_exact
    _, shown = run(ip, "gpumem --reset --device 0")
    assert "reset: cuda:0 peak allocated and peak reserved" in shown
    path = tmp_path / "m.pickle"
    _, shown = run(ip, f"gpumem --snapshot {path}", "z = 1")
    assert path.exists() and "pytorch.org/memory_viz" in shown and fake.history[-1].startswith(
        "record {'enabled': None")
    base = _n_callbacks(ip)
    run(ip, f"gpumem --snapshot {tmp_path / 'n.pickle'}")
    assert _n_callbacks(ip) == (base[0] + 1, base[1] + 1)
    ip.run_cell("w = 2")
    assert (tmp_path / "n.pickle").exists() and _n_callbacks(ip) == base
    with pytest.raises(UsageError, match="folder .* does not exist"):
        run(ip, "gpumem --snapshot /no/such/dir/m.pickle")


# -- issue 11: --top with unusual tensors alive anywhere -------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")  # nested / quantized tensors are prototypes
def test_top_with_nested_sparse_quantized_and_subclass_tensors_alive(ip):
    from torch.testing._internal.two_tensor import TwoTensor

    nt = torch.nested.nested_tensor([torch.zeros(300, 100), torch.zeros(500, 100)])
    jagged = torch.nested.nested_tensor([torch.zeros(2, 4), torch.zeros(3, 4)],
                                        layout=torch.jagged)
    hidden = [nt, jagged, torch.eye(50).to_sparse(), torch.zeros(10, 10).to_mkldnn(),
              torch.quantize_per_tensor(torch.zeros(64), 0.1, 0, torch.quint8),
              TwoTensor(torch.zeros(8), torch.ones(8)), nn.UninitializedParameter()]
    ip.user_ns["nt"] = nt
    run(ip, "gpumem --top 50 -o top")
    entries = {e.name: e for e in ip.user_ns["top"].entries}
    # its values buffer plus its sizes (2 components x 2 dims, int64)
    assert entries["nt"].bytes == 800 * 100 * 4 + 2 * 2 * 8
    assert entries["nt"].shape == (2, "ragged", 100)
    del hidden


def test_top_tensors_refuses_a_count_given_as_the_namespace() -> None:
    from torchmagic.core.errors import TorchMagicError

    with pytest.raises(TorchMagicError, match="namespace must be a mapping"):
        core.top_tensors(3)  # type: ignore[arg-type]
