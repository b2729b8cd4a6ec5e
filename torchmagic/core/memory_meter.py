"""``%%gpumem`` and ``%gpumem --watch``: measuring memory over a block (before, after, peak).

See :mod:`torchmagic.core.memory` for how peaks and counter resets work. The OS and CUDA readings
are the functions of that module (looked up there at call time).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from torchmagic.core import memory as _m
from torchmagic.core._result import Result


# --------------------------------------------------------------------------------------------
# %%gpumem and --watch: measuring a block
# --------------------------------------------------------------------------------------------
@dataclass
class MemoryDelta:
    """One measured quantity over a block: bytes before, after and the peak inside it.

    ``peak_exact`` is False when the peak is only an upper bound (counters not reset);
    ``user_peak`` is the peak since the user's own last reset (``None`` where unknown).
    """

    what: str
    device: str
    before: int
    after: int
    peak: int | None = None
    peak_exact: bool = True
    user_peak: int | None = None

    @property
    def delta(self) -> int:
        return self.after - self.before

    @property
    def peak_delta(self) -> int | None:
        return None if self.peak is None else self.peak - self.before

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "device": self.device, "before": self.before,
                "after": self.after, "delta": self.delta, "peak": self.peak,
                "peak_delta": self.peak_delta, "peak_exact": self.peak_exact,
                "user_peak": self.user_peak}


@dataclass
class CellMemory(Result):
    """What ``%%gpumem`` (and each ``--watch`` line) reports for one cell."""

    _display_module = "torchmagic.display.memory"

    rows: list[MemoryDelta]
    seconds: float
    cuda: str
    label: str = "cell"
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def row(self, what: str) -> MemoryDelta:
        """The row named ``what`` (``"CPU RSS"``, ``"cuda:0 allocated"``...)."""
        for r in self.rows:
            if r.what == what:
                return r
        raise KeyError(what)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.to_dict() for r in self.rows], "seconds": self.seconds,
                "cuda": self.cuda, "label": self.label, "error": self.error, "notes": self.notes}


class MemoryMeter:
    """One measurement: ``start()``, run something, ``stop(error)`` -> :class:`CellMemory`.

    Build it with :func:`memory_meter`; :func:`measure_memory` wraps it in a ``with`` block. The
    ``--watch`` callbacks start one in ``pre_run_cell`` and stop it in ``post_run_cell``.
    """

    def __init__(self, devices: list[int], mps: bool, cpu: bool, reset_peaks: bool,
                 label: str) -> None:
        self.devices = devices
        self.mps = mps
        self.cpu = cpu
        self.reset_peaks = reset_peaks
        self.label = label
        self.folded: dict[str, int] = {}
        self.before: dict[str, int] = {}
        self.user_before: dict[str, int] = {}
        self.exact: dict[str, bool] = {}
        self.sampler: _m._Sampler | None = None
        self.cpu_mode = "none"
        self.maxrss_before: int | None = None
        self.cuda_was_init = False
        self.t0 = 0.0
        self.result: CellMemory | None = None

    def _fold(self, key: str, counter: int) -> None:
        self.folded[key] = max(self.folded.get(key, 0), counter)

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        self.cuda_was_init = bool(self.devices) and torch.cuda.is_initialized()
        if self.cuda_was_init:
            for dev in self.devices:
                a = int(torch.cuda.memory_allocated(dev))
                r = int(torch.cuda.memory_reserved(dev))
                pa, pr = _m._cuda_peaks(dev)
                ka, kr = f"cuda:{dev}/allocated", f"cuda:{dev}/reserved"
                self.before[ka], self.before[kr] = a, r
                self.user_before[ka] = _m._ledger.observe(ka, pa)
                self.user_before[kr] = _m._ledger.observe(kr, pr)
                if self.reset_peaks:
                    _m._reset_cuda_peaks(dev)
                    self.exact[ka] = self.exact[kr] = True
                else:
                    # the block's peak is exact only if it beats the earlier peak
                    self.folded[ka], self.folded[kr] = pa, pr
                    self.exact[ka], self.exact[kr] = pa <= a, pr <= r
        if self.mps:
            self.before["mps/allocated"] = int(torch.mps.current_allocated_memory())
            self.before["mps/driver"] = int(torch.mps.driver_allocated_memory())
        if self.cpu:
            st = _m._proc_status()
            if st is not None and _m._can_clear_refs is not False:
                self.before["cpu/rss"] = st[0]
                self.user_before["cpu/rss"] = _m._ledger.observe("cpu/rss", st[1])
                if self.reset_peaks and _m._reset_cpu_peak():
                    self.cpu_mode = "VmHWM"
                    self.exact["cpu/rss"] = True
                elif not self.reset_peaks:
                    self.cpu_mode = "VmHWM"
                    self.folded["cpu/rss"] = st[1]
                    self.exact["cpu/rss"] = st[1] <= st[0]
            if self.cpu_mode == "none":
                self.before["cpu/rss"] = _m._rss()
                self.maxrss_before = _m._maxrss()
                self.sampler = _m._Sampler()
                self.cpu_mode = "sampler"
                self.exact["cpu/rss"] = True
        with _m._ledger.lock:
            _m._ledger.open.append(self)
        self.t0 = time.perf_counter()

    # -- stop -----------------------------------------------------------------------------
    def stop(self, error: BaseException | None = None) -> CellMemory:
        if self.result is not None:  # already stopped
            return self.result
        seconds = time.perf_counter() - self.t0
        with _m._ledger.lock:
            if self in _m._ledger.open:
                _m._ledger.open.remove(self)
        rows: list[MemoryDelta] = []
        notes: list[str] = []
        if self.cpu:
            rows.append(self._cpu_row(notes))
        cuda_now = bool(self.devices) and torch.cuda.is_initialized()
        if cuda_now:
            if not self.cuda_was_init:
                notes.append("CUDA was initialised in this cell (peaks count from then; the "
                             "CUDA context itself is outside torch's counters)")
            for dev in self.devices:
                a = int(torch.cuda.memory_allocated(dev))
                r = int(torch.cuda.memory_reserved(dev))
                pa, pr = _m._cuda_peaks(dev)
                for what, now, counter in (("allocated", a, pa), ("reserved", r, pr)):
                    key = f"cuda:{dev}/{what}"
                    before = self.before.get(key, 0)
                    peak = max(counter, self.folded.get(key, 0), before, now)
                    exact = self.exact.get(key, True) or counter > self.folded.get(key, 0)
                    user = None
                    if key in self.user_before:
                        user = max(self.user_before[key], peak)
                    _m._ledger.observe(key, counter)
                    rows.append(MemoryDelta(f"cuda:{dev} {what}", f"cuda:{dev}", before, now,
                                            peak, exact, user))
        if self.mps:
            for what, key, fn in (("allocated", "mps/allocated", torch.mps.current_allocated_memory),
                                  ("driver", "mps/driver", torch.mps.driver_allocated_memory)):
                rows.append(MemoryDelta(f"mps {what}", "mps", self.before[key], int(fn()), None))
            notes.append("MPS keeps no peak counters: before/after only")
        if self.reset_peaks and self.cuda_was_init:
            notes.append("torch.cuda peak counters were reset at the start of this cell: "
                         "max_memory_allocated() now counts from there; 'your peak' keeps the "
                         "earlier value")
        err = None
        if error is not None:
            err = f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]
        self.result = CellMemory(rows, seconds, _m.cuda_status(), self.label, err, notes)
        return self.result

    def _cpu_row(self, notes: list[str]) -> MemoryDelta:
        key = "cpu/rss"
        before = self.before[key]
        if self.cpu_mode == "VmHWM":
            st = _m._proc_status()
            assert st is not None
            after, hwm = st
            peak = max(hwm, self.folded.get(key, 0), before, after)
            exact = self.exact.get(key, True) or hwm > self.folded.get(key, 0)
            _m._ledger.observe(key, hwm)
            user = max(self.user_before.get(key, 0), peak)
            return MemoryDelta("CPU RSS", "cpu", before, after, peak, exact, user)
        assert self.sampler is not None
        peak = self.sampler.stop()
        after = _m._rss()
        mr = _m._maxrss()
        if mr is not None and self.maxrss_before is not None and mr > self.maxrss_before:
            peak = max(peak, mr)  # the lifetime peak rose inside the block: it is the block's
        notes.append("CPU peak from a 2 ms RSS sampler (this OS has no resettable high-water "
                     "mark): short spikes can be missed")
        return MemoryDelta("CPU RSS", "cpu", before, after, max(peak, after, before), True,
                           mr)


def memory_meter(device: int | str | None = None, reset_peaks: bool = True, label: str = "cell",
                 cpu: bool = True) -> MemoryMeter:
    """A :class:`MemoryMeter` (not started) for the devices ``device`` selects (all by default)."""
    chosen = _m.parse_device(device)
    devs = [d for d in _m._cuda_devices() if chosen in (None, f"cuda:{d}")]
    return MemoryMeter(devs, _m.mps_available() and chosen in (None, "mps"), cpu, reset_peaks, label)


@contextlib.contextmanager
def measure_memory(device: int | str | None = None, reset_peaks: bool = True,
                   label: str = "cell", cpu: bool = True) -> Iterator[MemoryMeter]:
    """Measure memory over a ``with`` block; ``meter.result`` is a :class:`CellMemory` afterwards.

    ``device`` restricts the accelerator devices measured (CUDA index, ``"cuda:N"``, ``"mps"``,
    ``"cpu"`` for none); CPU RSS is measured unless ``cpu=False``. CUDA is measured only once it is initialised (this never initialises it). The
    result is built also when the block raises (``result.error`` names the exception, which
    propagates). See the module docstring for how peaks and resets work.
    """
    meter = memory_meter(device, reset_peaks, label, cpu)
    meter.start()
    try:
        yield meter
    except BaseException as exc:
        meter.stop(exc)
        raise
    meter.stop()


