"""``%gpumem`` on a real GPU: every number against torch's own counters read at that moment.

Allocated / reserved / peaks equal ``torch.cuda.memory_allocated()`` & co.; the device's name,
capability, total and free memory equal ``get_device_properties`` and ``mem_get_info``; ``%%gpumem``
on a cell that allocates 1 GiB reports +1 GiB; peaks are per cell and the user's own peak is kept;
``--top`` names the tensor; ``--snapshot`` writes what torch's memory_viz tooling reads; ``--watch``
reports CUDA per cell, and its cost per cell is measured.
"""

from __future__ import annotations

import gc
import pickle
import time

import pytest
import torch
from conftest import run
from cuda_helpers import GiB, MiB, cuda_only, figure, warm_up
from IPython.utils.capture import capture_output

import torchmagic
from torchmagic.core import memory as core

pytestmark = cuda_only


@pytest.fixture(autouse=True)
def _clean():
    warm_up()
    torchmagic.gpumem(0, reset=True)  # counters from here; the ledger forgets earlier peaks
    yield
    gc.collect()
    assert not core._ledger.open, "a measurement was left open"


def test_report_equals_torch_counters_and_device_properties(ip, request):
    x = torch.empty(300 * MiB, dtype=torch.uint8, device="cuda")
    y = torch.empty(5 * MiB + 123, dtype=torch.uint8, device="cuda")
    del y  # a freed block: reserved > allocated
    torch.cuda.synchronize()
    rep = torchmagic.gpumem(0)
    # read right after: the report allocates nothing on the device
    allocated, reserved = torch.cuda.memory_allocated(0), torch.cuda.memory_reserved(0)
    peak_a, peak_r = torch.cuda.max_memory_allocated(0), torch.cuda.max_memory_reserved(0)
    free, total = torch.cuda.mem_get_info(0)
    props = torch.cuda.get_device_properties(0)
    d = rep.devices[0]
    figure(request, "device", {"name": d.name, "capability": d.capability, "total": d.total,
                               "free_difference_bytes": (d.free or 0) - free})
    assert d.device == "cuda:0" and d.name == props.name
    assert d.capability == f"{props.major}.{props.minor}"
    assert (d.allocated, d.reserved) == (allocated, reserved)
    assert (d.peak_allocated, d.peak_reserved) == (peak_a, peak_r)
    assert d.reserved_unallocated == reserved - allocated > 0
    assert d.total == total and abs(d.free - free) <= 2 * MiB
    assert not d.initialized_by_report
    _, shown = run(ip, "gpumem --device 0")
    assert props.name in shown and "cuda:0" in shown
    assert all(len(line) <= 100 for line in shown.splitlines()), shown
    del x


def test_cell_of_one_gib_and_peaks(ip, request):
    """+1 GiB exactly (a multiple of the allocator's 2 MiB rounding); the cell's own peak (a freed
    512 MiB temporary on top) equals torch's counter, which torchmagic reset when the cell began;
    the user's own higher peak from before is kept and still shown afterwards."""
    spike = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")
    del spike
    user_peak = torch.cuda.max_memory_allocated(0)
    before = torch.cuda.memory_allocated(0)
    run(ip, "gpumem -o m", "g = torch.empty(2**30, dtype=torch.uint8, device='cuda')\n"
        "t = torch.empty(2**29, dtype=torch.uint8, device='cuda')\ndel t")
    cell_peak = torch.cuda.max_memory_allocated(0)  # counts from the start of the cell
    after = torch.cuda.memory_allocated(0)
    row = ip.user_ns["m"].row("cuda:0 allocated")
    res = ip.user_ns["m"].row("cuda:0 reserved")
    figure(request, "cell_1GiB", {"delta": row.delta, "peak_delta": row.peak_delta,
                                  "reserved_delta": res.delta, "user_peak": row.user_peak})
    assert (row.before, row.after) == (before, after)
    assert after - before == GiB and row.delta == GiB
    assert row.peak == cell_peak and row.peak_exact
    assert row.peak_delta == GiB + GiB // 2
    assert row.user_peak == user_peak > row.peak
    assert res.after == torch.cuda.memory_reserved(0) and res.peak >= row.peak
    assert torchmagic.gpumem(0).devices[0].peak_allocated == user_peak  # kept after the cell
    # an odd size: within the allocator's rounding
    run(ip, "gpumem -o m2", "h = torch.empty(10**9, dtype=torch.uint8, device='cuda')")
    odd = ip.user_ns["m2"].row("cuda:0 allocated").delta
    figure(request, "cell_1e9_bytes_delta", odd)
    assert 10**9 <= odd < 10**9 + 2 * MiB
    del ip.user_ns["g"], ip.user_ns["h"]


def test_peaks_are_per_cell(ip, request):
    run(ip, "gpumem -o a", "a = torch.empty(2**30, dtype=torch.uint8, device='cuda')\ndel a")
    run(ip, "gpumem -o b", "b = torch.empty(2**28, dtype=torch.uint8, device='cuda')\ndel b")
    pa = ip.user_ns["a"].row("cuda:0 allocated")
    pb = ip.user_ns["b"].row("cuda:0 allocated")
    assert pb.peak == torch.cuda.max_memory_allocated(0)
    assert (pa.peak_delta, pb.peak_delta) == (GiB, GiB // 4)
    assert pa.peak_exact and pb.peak_exact and pa.delta == pb.delta == 0
    # --keep-peaks: no reset, so a smaller peak than the earlier one is only an upper bound
    run(ip, "gpumem --keep-peaks -o c", "c = torch.empty(2**27, dtype=torch.uint8, "
        "device='cuda')\ndel c")
    pc = ip.user_ns["c"].row("cuda:0 allocated")
    figure(request, "keep_peaks_bound", {"peak_delta": pc.peak_delta, "exact": pc.peak_exact})
    assert not pc.peak_exact and pc.peak_delta >= GiB // 8


def test_top_names_the_cuda_tensor(ip, request):
    big = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda")
    ip.user_ns.update(big_cuda=big, view=big[:1000], small=torch.ones(10, device="cuda"))
    del big
    _, shown = run(ip, "gpumem --top 3 --device 0 -o top")
    allocated = torch.cuda.memory_allocated(0)
    top = ip.user_ns["top"]
    e = top.entries[0]
    assert (e.name, e.device, e.kind) == ("big_cuda", "cuda:0", "tensor")
    assert e.bytes == ip.user_ns["big_cuda"].untyped_storage().nbytes() == 512 * MiB
    assert "view" in e.other_names and e.views >= 1
    tot = next(t for t in top.totals if t.device == "cuda:0")
    figure(request, "top_cuda_total", {"python_tensors_bytes": tot.bytes,
                                       "allocated": tot.allocated})
    assert tot.allocated == allocated and tot.bytes <= allocated
    assert "big_cuda" in shown


def test_snapshot_is_read_by_torch_memory_viz(ip, tmp_path, request):
    from torch.cuda import _memory_viz

    path = tmp_path / "mem.pickle"
    _, shown = run(ip, f"gpumem --snapshot {path}",
                   "s = torch.empty(3 * 2**20 + 512, dtype=torch.uint8, device='cuda')")
    assert "pytorch.org/memory_viz" in shown
    with open(path, "rb") as f:
        snap = pickle.load(f)
    assert {"segments", "device_traces"} <= set(snap)
    allocs = [e for e in snap["device_traces"][0] if e["action"] == "alloc"]
    figure(request, "snapshot", {"bytes": path.stat().st_size, "trace_entries":
                                 len(snap["device_traces"][0]), "allocs": len(allocs)})
    assert any(e["addr"] == ip.user_ns["s"].data_ptr() for e in allocs), "the cell's allocation"
    # the allocator's state at the end of the cell: every segment and every live block
    segments = snap["segments"]
    assert sum(seg["total_size"] for seg in segments) == torch.cuda.memory_reserved(0)
    assert sum(b["size"] for seg in segments for b in seg["blocks"]
               if b["state"] == "active_allocated") == torch.cuda.memory_allocated(0)
    # torch's own tooling reads it: the text summary (it checks its own accounting) and the
    # HTML page of pytorch.org/memory_viz with the snapshot embedded
    text = _memory_viz.segsum(snap)
    assert f"segments: {len(segments)}" in text and "total_reserved" in text
    assert "<script" in _memory_viz.trace_plot(snap)
    # recording stopped with the cell: later allocations are not traced
    def traced() -> int:
        traces = torch.cuda.memory._snapshot()["device_traces"]
        return len(traces[0]) if traces else 0

    n = traced()
    later = torch.empty(MiB, device="cuda")
    assert traced() == n
    del later


def _per_cell(ip, n: int) -> float:
    with capture_output():
        t0 = time.perf_counter()
        for _ in range(n):
            ip.run_cell("pass", store_history=True)
        return (time.perf_counter() - t0) / n


def test_watch_reports_cuda_per_cell_and_its_cost(ip, request):
    from torchmagic.magics.memory import GpumemMagics

    watcher = next(i for i in ip._torchmagic_state["instances"]
                   if isinstance(i, GpumemMagics)).watcher
    _per_cell(ip, 50)
    base = min(_per_cell(ip, 200) for _ in range(3))
    run(ip, "gpumem --watch")
    try:
        with capture_output() as cap:
            ip.run_cell("w = torch.empty(2**28, dtype=torch.uint8, device='cuda')",
                        store_history=True)
        row = watcher.last.row("cuda:0 allocated")
        assert row.delta == 2**28 and row.peak_delta == 2**28
        assert "cuda:0" in cap.stdout
        _per_cell(ip, 50)
        watched = min(_per_cell(ip, 200) for _ in range(3))
    finally:
        run(ip, "gpumem --unwatch")
    cost_ms = (watched - base) * 1e3
    figure(request, "watch_cost_ms_per_cell", round(cost_ms, 4))
    figure(request, "empty_cell_ms", round(base * 1e3, 4))
    print(f"--watch with CUDA: {cost_ms:.3f} ms per cell (goal <= 1 ms)")
    del ip.user_ns["w"]
