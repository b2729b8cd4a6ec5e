"""Where the memory went: per accelerator device, for the CPU process, per cell and per tensor.

What ships:

- :func:`gpumem` -> :class:`MemoryReport`: per CUDA device its name, compute capability, total
  memory, allocated, reserved, peak allocated and peak reserved since the last reset, free memory as
  the driver reports it (``mem_get_info``) and reserved-but-unallocated (a fragmentation hint); MPS
  figures where MPS is available; always the process's CPU memory (RSS and peak RSS). Without CUDA
  the report says plainly that no CUDA device is visible; no torch.cuda call that raises without
  CUDA is made.
- :func:`measure_memory` (a context manager, used by ``%%gpumem`` and ``%gpumem --watch``) ->
  :class:`CellMemory`: before, after, delta and the peak reached inside the block, per CUDA device
  (torch's own allocator counters), for MPS (before/after) and for CPU RSS (the kernel's high-water
  mark on Linux, ``VmHWM`` reset through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss`` when it
  rose, plus a light sampler thread).
- :func:`top_tensors` -> :class:`TopTensors`: the largest live tensors found by a ``gc`` scan
  (tensors, parameters, their ``.grad``), named from a namespace where possible, each storage
  counted once however many views share it.
- :func:`record_memory_history`: a context manager that records CUDA memory history and writes a
  snapshot for https://pytorch.org/memory_viz.

Peak counters. An exact per-block peak needs the counters reset at the start of the block
(``torch.cuda.reset_peak_memory_stats`` and Linux ``clear_refs``), which loses the value the user's
own ``torch.cuda.max_memory_allocated()`` would have returned. torchmagic reads that value first and
reports "peak since your last reset" as ``max(your peak before, the block's peak)``; it also keeps
it for later :func:`gpumem` calls (dropped when a counter is seen to go down, i.e. the user reset it
again, and by ``gpumem(reset=True)``). After a measured block, ``torch.cuda.max_memory_allocated()``
itself counts from the start of that block. ``measure_memory(reset_peaks=False)`` avoids resets:
the block's peak is then exact only when it exceeds the earlier peak, and is otherwise reported as
an upper bound. Nested measurements (``%%gpumem`` inside ``--watch``) fold the counters into every
open measurement before any reset, so each sees its own true peak. ``empty_cache()`` is never
called.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchmagic.core._result import Result
from torchmagic.core.errors import TorchMagicError

# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------


def cuda_available() -> bool:
    """True when torch sees at least one CUDA (or ROCm) device."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # broken driver: treat as no CUDA
        return False


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    try:
        return bool(mps is not None and mps.is_available())
    except Exception:
        return False


def cuda_status() -> str:
    """One line on CUDA: devices and versions, or why no CUDA device is visible."""
    if cuda_available():
        n = torch.cuda.device_count()
        ver = torch.version.cuda or getattr(torch.version, "hip", None) or "?"
        runtime = "ROCm" if getattr(torch.version, "hip", None) else "CUDA"
        return f"{runtime} {ver}, {n} device{'s' if n != 1 else ''} visible"
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        why = "this torch build has no CUDA"
    else:
        why = "torch is built with CUDA but no device is visible (driver, CUDA_VISIBLE_DEVICES?)"
    return f"no CUDA device is visible ({why})"


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if cuda_available() else []


# --------------------------------------------------------------------------------------------
# CPU memory
# --------------------------------------------------------------------------------------------
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_can_clear_refs: bool | None = None  # learnt on first use


def _proc_status() -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in bytes from /proc/self/status, or None off Linux."""
    try:
        with open(_STATUS, "rb") as f:
            data = f.read()
    except OSError:
        return None
    rss = hwm = None
    for line in data.split(b"\n"):
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith(b"VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    if rss is None or hwm is None:
        return None
    return rss, hwm


def _maxrss() -> int | None:
    """``ru_maxrss`` in bytes (KiB on Linux and BSD, bytes on macOS), or None (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value) if sys.platform == "darwin" else int(value) * 1024


def _rss() -> int:
    st = _proc_status()
    if st is not None:
        return st[0]
    import psutil

    return int(psutil.Process().memory_info().rss)


def _clear_refs() -> bool:
    """Reset the kernel's RSS high-water mark (Linux); False where that is not possible."""
    global _can_clear_refs
    if _can_clear_refs is False:
        return False
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        _can_clear_refs = False
        return False
    _can_clear_refs = _proc_status() is not None
    return _can_clear_refs


def cpu_peak_source() -> str:
    """How CPU peak RSS is measured here: ``VmHWM``, ``ru_maxrss`` or ``sampler``."""
    if _proc_status() is not None and _can_clear_refs is not False:
        return "VmHWM"
    return "ru_maxrss" if _maxrss() is not None else "sampler"


class _Sampler:
    """A light thread sampling RSS every ``interval`` seconds (where the OS keeps no resettable peak)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = int(self._proc.memory_info().rss)
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._loop, name="torchmagic-rss-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.peak = max(self.peak, int(self._proc.memory_info().rss))
            except Exception:  # pragma: no cover - process info unavailable
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=1.0)
        with contextlib.suppress(Exception):
            self.peak = max(self.peak, int(self._proc.memory_info().rss))
        return self.peak


# --------------------------------------------------------------------------------------------
# Peak ledger: every reset torchmagic does goes through here
# --------------------------------------------------------------------------------------------
class _Ledger:
    """Keeps peaks correct across torchmagic's own counter resets.

    ``carried[key]`` is the highest peak seen before torchmagic last reset that counter (the user's
    own peak, preserved); ``last[key]`` is the counter value torchmagic saw last: a counter below it
    means someone else reset it, and the carried value is dropped. ``open`` measurements get the
    counters folded in before each reset.
    """

    def __init__(self) -> None:
        self.carried: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.open: list[MemoryMeter] = []
        self.lock = threading.Lock()

    def observe(self, key: str, counter: int) -> int:
        """The peak since the user's last reset: ``max(counter, carried)``."""
        if counter < self.last.get(key, 0):  # reset by someone else: carried value is stale
            self.carried.pop(key, None)
        self.last[key] = counter
        return max(counter, self.carried.get(key, 0))

    def before_reset(self, key: str, counter: int) -> None:
        user_peak = self.observe(key, counter)
        self.carried[key] = user_peak
        for meter in self.open:
            meter._fold(key, counter)

    def after_reset(self, key: str, counter: int) -> None:
        self.last[key] = counter

    def forget(self, key: str) -> None:
        self.carried.pop(key, None)
        self.last.pop(key, None)


_ledger = _Ledger()


def _cuda_peaks(dev: int) -> tuple[int, int]:
    return int(torch.cuda.max_memory_allocated(dev)), int(torch.cuda.max_memory_reserved(dev))


def _reset_cuda_peaks(dev: int) -> None:
    pa, pr = _cuda_peaks(dev)
    _ledger.before_reset(f"cuda:{dev}/allocated", pa)
    _ledger.before_reset(f"cuda:{dev}/reserved", pr)
    torch.cuda.reset_peak_memory_stats(dev)
    pa, pr = _cuda_peaks(dev)
    _ledger.after_reset(f"cuda:{dev}/allocated", pa)
    _ledger.after_reset(f"cuda:{dev}/reserved", pr)


def _reset_cpu_peak() -> bool:
    st = _proc_status()
    if st is None:
        return False
    _ledger.before_reset("cpu/rss", st[1])
    ok = _clear_refs()
    if ok:
        st2 = _proc_status()
        _ledger.after_reset("cpu/rss", st2[1] if st2 else 0)
    return ok


# --------------------------------------------------------------------------------------------
# %gpumem: the report
# --------------------------------------------------------------------------------------------
@dataclass
class DeviceMemory:
    """Memory of one accelerator device (bytes; ``None`` where the backend does not say)."""

    device: str
    name: str
    capability: str | None = None
    total: int | None = None
    allocated: int = 0
    reserved: int | None = None
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    free: int | None = None
    reserved_unallocated: int | None = None
    initialized_by_report: bool = False


@dataclass
class CpuMemory:
    """The process's CPU memory: RSS, peak RSS since the last reset, and the machine's RAM."""

    rss: int
    peak_rss: int | None
    peak_source: str
    total: int | None = None
    available: int | None = None


@dataclass
class MemoryReport(Result):
    """What ``%gpumem`` shows."""

    _display_module = "torchmagic.display.memory"

    cuda: str
    devices: list[DeviceMemory]
    cpu: CpuMemory
    reset: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _cpu_memory() -> CpuMemory:
    st = _proc_status()
    total = available = None
    try:
        import psutil

        vm = psutil.virtual_memory()
        total, available = int(vm.total), int(vm.available)
    except Exception:  # pragma: no cover - psutil is a dependency
        pass
    if st is not None:
        rss, hwm = st
        return CpuMemory(rss, _ledger.observe("cpu/rss", hwm), "VmHWM", total, available)
    rss = _rss()
    peak = _maxrss()
    return CpuMemory(rss, peak, "ru_maxrss" if peak is not None else "unavailable", total,
                     available)


def _cuda_device_memory(dev: int) -> DeviceMemory:
    was_init = torch.cuda.is_initialized()
    props = torch.cuda.get_device_properties(dev)
    allocated = int(torch.cuda.memory_allocated(dev))
    reserved = int(torch.cuda.memory_reserved(dev))
    pa, pr = _cuda_peaks(dev)
    free = total = None
    with contextlib.suppress(Exception):  # mem_get_info fails on some virtualised devices
        free, total = (int(v) for v in torch.cuda.mem_get_info(dev))
    return DeviceMemory(
        device=f"cuda:{dev}",
        name=str(props.name),
        capability=f"{props.major}.{props.minor}",
        total=int(total if total is not None else props.total_memory),
        allocated=allocated,
        reserved=reserved,
        peak_allocated=_ledger.observe(f"cuda:{dev}/allocated", pa),
        peak_reserved=_ledger.observe(f"cuda:{dev}/reserved", pr),
        free=free,
        reserved_unallocated=reserved - allocated,
        initialized_by_report=not was_init,
    )


def _mps_device_memory() -> DeviceMemory:
    mps = torch.mps
    allocated = int(mps.current_allocated_memory())
    driver = int(mps.driver_allocated_memory())
    total = None
    with contextlib.suppress(Exception):
        total = int(mps.recommended_max_memory())
    return DeviceMemory(device="mps", name="Apple MPS", total=total, allocated=allocated,
                        reserved=driver, reserved_unallocated=max(driver - allocated, 0))


def parse_device(device: int | str | None) -> str | None:
    """Normalise a ``--device`` value to ``"cuda:N"``, ``"mps"``, ``"cpu"`` or ``None`` (all).

    Raises :class:`TorchMagicError` for a device that does not exist here, naming the valid ones.
    """
    if device is None:
        return None
    text = str(device).strip().lower()
    if text.isdigit():
        text = f"cuda:{text}"
    elif text == "cuda":
        text = f"cuda:{torch.cuda.current_device()}" if cuda_available() else "cuda:0"
    valid = [f"cuda:{i}" for i in _cuda_devices()] + (["mps"] if mps_available() else []) + ["cpu"]
    if text in valid:
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        if not cuda_available():
            raise TorchMagicError(f"--device {device}: {cuda_status()}; valid here: "
                                  f"{', '.join(valid)}")
        raise TorchMagicError(f"--device {device}: there are {torch.cuda.device_count()} CUDA "
                              f"devices; valid: {', '.join(valid)}")
    raise TorchMagicError(f"--device {device!r} is not a device here; valid: {', '.join(valid)} "
                          "(a CUDA index like 0 also works)")


def gpumem(device: int | str | None = None, reset: bool = False) -> MemoryReport:
    """Memory per accelerator device and for the CPU process (see the module docstring).

    ``device``: a CUDA index, ``"cuda:N"``, ``"mps"`` or ``"cpu"`` (``None``: every device).
    ``reset=True`` resets the peak counters (CUDA peak allocated/reserved, Linux peak RSS) after
    reading them; the report shows the values before the reset and says what was reset.
    """
    chosen = parse_device(device)
    devices: list[DeviceMemory] = []
    notes: list[str] = []
    for dev in _cuda_devices():
        if chosen in (None, f"cuda:{dev}"):
            devices.append(_cuda_device_memory(dev))
    if mps_available() and chosen in (None, "mps"):
        devices.append(_mps_device_memory())
        notes.append("MPS keeps no peak counters; 'reserved' is the Metal driver's allocation")
    if any(d.initialized_by_report for d in devices):
        notes.append("CUDA was not initialised before this report; reading device properties "
                     "initialised it (its context takes some device memory outside torch's "
                     "counters)")
    cpu = _cpu_memory()
    reset_done: list[str] = []
    if reset:
        for d in devices:
            if d.device.startswith("cuda:"):
                _reset_cuda_peaks(int(d.device[5:]))
                _ledger.forget(f"{d.device}/allocated")
                _ledger.forget(f"{d.device}/reserved")
                reset_done.append(f"{d.device} peak allocated and peak reserved "
                                  "(torch.cuda.reset_peak_memory_stats)")
        if chosen in (None, "cpu"):
            if _reset_cpu_peak():
                _ledger.forget("cpu/rss")
                reset_done.append("CPU peak RSS (kernel high-water mark VmHWM, via "
                                  "/proc/self/clear_refs)")
            else:
                notes.append("CPU peak RSS cannot be reset on this OS (ru_maxrss is "
                             "process-lifetime)")
        if not reset_done:
            notes.append("nothing to reset: no peak counter here can be reset")
    if chosen == "cpu":
        devices = []
    return MemoryReport(cuda=cuda_status(), devices=devices, cpu=cpu, reset=reset_done,
                        notes=notes)


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
        self.sampler: _Sampler | None = None
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
                pa, pr = _cuda_peaks(dev)
                ka, kr = f"cuda:{dev}/allocated", f"cuda:{dev}/reserved"
                self.before[ka], self.before[kr] = a, r
                self.user_before[ka] = _ledger.observe(ka, pa)
                self.user_before[kr] = _ledger.observe(kr, pr)
                if self.reset_peaks:
                    _reset_cuda_peaks(dev)
                    self.exact[ka] = self.exact[kr] = True
                else:
                    # the block's peak is exact only if it beats the earlier peak
                    self.folded[ka], self.folded[kr] = pa, pr
                    self.exact[ka], self.exact[kr] = pa <= a, pr <= r
        if self.mps:
            self.before["mps/allocated"] = int(torch.mps.current_allocated_memory())
            self.before["mps/driver"] = int(torch.mps.driver_allocated_memory())
        if self.cpu:
            st = _proc_status()
            if st is not None and _can_clear_refs is not False:
                self.before["cpu/rss"] = st[0]
                self.user_before["cpu/rss"] = _ledger.observe("cpu/rss", st[1])
                if self.reset_peaks and _reset_cpu_peak():
                    self.cpu_mode = "VmHWM"
                    self.exact["cpu/rss"] = True
                elif not self.reset_peaks:
                    self.cpu_mode = "VmHWM"
                    self.folded["cpu/rss"] = st[1]
                    self.exact["cpu/rss"] = st[1] <= st[0]
            if self.cpu_mode == "none":
                self.before["cpu/rss"] = _rss()
                self.maxrss_before = _maxrss()
                self.sampler = _Sampler()
                self.cpu_mode = "sampler"
                self.exact["cpu/rss"] = True
        with _ledger.lock:
            _ledger.open.append(self)
        self.t0 = time.perf_counter()

    # -- stop -----------------------------------------------------------------------------
    def stop(self, error: BaseException | None = None) -> CellMemory:
        if self.result is not None:  # already stopped
            return self.result
        seconds = time.perf_counter() - self.t0
        with _ledger.lock:
            if self in _ledger.open:
                _ledger.open.remove(self)
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
                pa, pr = _cuda_peaks(dev)
                for what, now, counter in (("allocated", a, pa), ("reserved", r, pr)):
                    key = f"cuda:{dev}/{what}"
                    before = self.before.get(key, 0)
                    peak = max(counter, self.folded.get(key, 0), before, now)
                    exact = self.exact.get(key, True) or counter > self.folded.get(key, 0)
                    user = None
                    if key in self.user_before:
                        user = max(self.user_before[key], peak)
                    _ledger.observe(key, counter)
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
        self.result = CellMemory(rows, seconds, cuda_status(), self.label, err, notes)
        return self.result

    def _cpu_row(self, notes: list[str]) -> MemoryDelta:
        key = "cpu/rss"
        before = self.before[key]
        if self.cpu_mode == "VmHWM":
            st = _proc_status()
            assert st is not None
            after, hwm = st
            peak = max(hwm, self.folded.get(key, 0), before, after)
            exact = self.exact.get(key, True) or hwm > self.folded.get(key, 0)
            _ledger.observe(key, hwm)
            user = max(self.user_before.get(key, 0), peak)
            return MemoryDelta("CPU RSS", "cpu", before, after, peak, exact, user)
        assert self.sampler is not None
        peak = self.sampler.stop()
        after = _rss()
        mr = _maxrss()
        if mr is not None and self.maxrss_before is not None and mr > self.maxrss_before:
            peak = max(peak, mr)  # the lifetime peak rose inside the block: it is the block's
        notes.append("CPU peak from a 2 ms RSS sampler (this OS has no resettable high-water "
                     "mark): short spikes can be missed")
        return MemoryDelta("CPU RSS", "cpu", before, after, max(peak, after, before), True,
                           mr)


def memory_meter(device: int | str | None = None, reset_peaks: bool = True, label: str = "cell",
                 cpu: bool = True) -> MemoryMeter:
    """A :class:`MemoryMeter` (not started) for the devices ``device`` selects (all by default)."""
    chosen = parse_device(device)
    devs = [d for d in _cuda_devices() if chosen in (None, f"cuda:{d}")]
    return MemoryMeter(devs, mps_available() and chosen in (None, "mps"), cpu, reset_peaks, label)


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


# --------------------------------------------------------------------------------------------
# %gpumem --top
# --------------------------------------------------------------------------------------------
@dataclass
class TensorEntry:
    """One storage held by live tensors: the best name, its tensor's shape/dtype, bytes."""

    name: str
    device: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    kind: str  # "tensor", "parameter", "grad", "buffer", "optimizer state"
    views: int = 0  # other tensors sharing this storage
    other_names: list[str] = field(default_factory=list)


@dataclass
class DeviceTotal:
    device: str
    tensors: int
    storages: int
    bytes: int
    allocated: int | None = None  # torch's allocator counter, where there is one


@dataclass
class TopTensors(Result):
    """What ``%gpumem --top`` shows: the largest storages per device and the per-device totals."""

    _display_module = "torchmagic.display.memory"

    entries: list[TensorEntry]
    totals: list[DeviceTotal]
    n: int
    skipped_meta: int = 0
    notes: list[str] = field(default_factory=list)


def _names_from(namespace: Mapping[str, Any]) -> dict[int, list[tuple[str, str]]]:
    """id(tensor) -> [(name, kind)] from a namespace: variables, module parameters/buffers and
    their grads, optimizer state, items of lists/tuples/dicts, IPython's ``Out`` history."""
    import torch.nn as nn

    names: dict[int, list[tuple[str, str]]] = {}
    param_names: dict[int, str] = {}

    def add(t: Any, name: str, kind: str) -> None:
        if isinstance(t, torch.Tensor):
            names.setdefault(id(t), []).append((name, kind))

    items = [(k, v) for k, v in namespace.items() if not k.startswith("_")]
    modules = [(k, v) for k, v in items if isinstance(v, nn.Module)]
    for k, v in items:
        if isinstance(v, torch.Tensor):
            add(v, k, "parameter" if isinstance(v, nn.Parameter) else "tensor")
    for k, m in modules:
        with contextlib.suppress(Exception):
            for pname, p in m.named_parameters(remove_duplicate=False):
                full = f"{k}.{pname}"
                add(p, full, "parameter")
                param_names.setdefault(id(p), full)
                if p.grad is not None:
                    add(p.grad, f".grad of {full}", "grad")
            for bname, b in m.named_buffers(remove_duplicate=False):
                add(b, f"{k}.{bname}", "buffer")
    for k, v in items:
        if isinstance(v, torch.optim.Optimizer):
            with contextlib.suppress(Exception):
                for p, st in v.state.items():
                    pname = param_names.get(id(p), "a parameter")
                    for sk, sv in st.items():
                        add(sv, f"{k}.state[{pname}][{sk!r}]", "optimizer state")
        elif isinstance(v, (list, tuple)) and len(v) <= 10_000:
            for i, item in enumerate(v):
                add(item, f"{k}[{i}]", "tensor")
        elif isinstance(v, dict) and len(v) <= 10_000:
            for dk, item in v.items():
                add(item, f"{k}[{dk!r}]", "tensor")
    out = namespace.get("Out")
    if isinstance(out, dict):
        for n, v in out.items():
            add(v, f"Out[{n}]", "tensor")
    return names


def _storage_key(t: torch.Tensor) -> tuple[Any, int, int]:
    """(key shared by all views of one storage, storage bytes, size of this tensor's data)."""
    own = t.numel() * t.element_size()
    try:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        nbytes = int(st.nbytes())
        if ptr:
            return (str(t.device), ptr), nbytes, own
        return ("id", id(t)), nbytes, own
    except Exception:  # sparse, nested, some subclasses: no single storage
        return ("id", id(t)), own, own


def top_tensors(namespace: Mapping[str, Any] | None = None, n: int = 10,
                device: int | str | None = None) -> TopTensors:
    """The ``n`` largest live storages (gc scan of tensors, parameters and their ``.grad``),
    grouped by device, named from ``namespace`` (e.g. ``globals()`` or IPython's ``user_ns``)
    where a name can be found. Views of one storage are counted once (keyed on the storage's data
    pointer); meta tensors hold no memory and are skipped.
    """
    if not isinstance(n, int) or n < 1:
        raise TorchMagicError(f"--top needs a positive number of tensors; got {n!r}")
    chosen = parse_device(device)
    names = _names_from(namespace or {})
    found: dict[int, torch.Tensor] = {}
    tensor_type = torch.Tensor
    for obj in gc.get_objects():
        if issubclass(type(obj), tensor_type):  # type(), not isinstance: no __class__ lookups
            found[id(obj)] = obj
    for t in list(found.values()):  # grads may have no Python object tracked by gc yet
        with contextlib.suppress(Exception):
            if t.is_leaf and t.requires_grad and t.grad is not None:
                found.setdefault(id(t.grad), t.grad)
    groups: dict[Any, dict[str, Any]] = {}
    skipped_meta = 0
    from torch._subclasses.fake_tensor import FakeTensor

    for t in found.values():
        try:
            if t.is_meta or isinstance(t, FakeTensor):
                skipped_meta += 1
                continue
            dev = str(t.device)
        except Exception:
            continue
        if chosen is not None and dev != chosen and not (chosen == "mps" and dev.startswith("mps")):
            continue
        key, nbytes, own = _storage_key(t)
        g = groups.setdefault(key, {"device": dev, "bytes": nbytes, "tensors": []})
        g["tensors"].append((t, own))
    del found
    entries: list[TensorEntry] = []
    totals: dict[str, DeviceTotal] = {}
    for g in groups.values():
        dev = g["device"]
        tot = totals.setdefault(dev, DeviceTotal(dev, 0, 0, 0))
        tot.tensors += len(g["tensors"])
        tot.storages += 1
        tot.bytes += g["bytes"]

        def rank(item: tuple[torch.Tensor, int], nbytes: int = g["bytes"]) -> tuple[int, int, int]:
            t, own = item
            named = 1 if id(t) in names else 0
            return (named, 1 if own == nbytes else 0, own)

        ordered = sorted(g["tensors"], key=rank, reverse=True)
        best = ordered[0][0]
        labels = [names[id(t)] for t, _ in ordered if id(t) in names]
        all_names = [nm for lst in labels for nm in lst]
        if all_names:
            name, kind = all_names[0]
        else:
            kind = "parameter" if isinstance(best, torch.nn.Parameter) else "tensor"
            name = f"(unnamed {kind})"
        entries.append(TensorEntry(
            name=name, device=dev, shape=tuple(best.shape),
            dtype=str(best.dtype).replace("torch.", ""), bytes=g["bytes"], kind=kind,
            views=len(g["tensors"]) - 1,
            other_names=[nm for nm, _ in all_names[1:6]]))
    groups.clear()
    entries.sort(key=lambda e: e.bytes, reverse=True)
    top = entries[:n]
    top.sort(key=lambda e: (_device_order(e.device), -e.bytes))
    notes: list[str] = []
    for dev, tot in totals.items():
        if dev.startswith("cuda") and torch.cuda.is_initialized():
            idx = torch.device(dev).index
            tot.allocated = int(torch.cuda.memory_allocated(idx if idx is not None else 0))
    if any(t.allocated and t.allocated > t.bytes * 1.1 + 2**20 for t in totals.values()):
        notes.append("torch's allocator holds more than the live Python tensors: the rest is held "
                     "by autograd graphs (saved activations), C++ objects or caches")
    if len(entries) > n:
        rest = entries[n:]
        notes.append(f"{len(rest)} smaller storages not listed "
                     f"({sum(e.bytes for e in rest):,} bytes)")
    return TopTensors(top, sorted(totals.values(), key=lambda t: _device_order(t.device)), n,
                      skipped_meta, notes)


def _device_order(dev: str) -> tuple[int, str]:
    order = 0 if dev.startswith("cuda") else 1 if dev.startswith("mps") else 2
    return (order, dev)


# --------------------------------------------------------------------------------------------
# --snapshot
# --------------------------------------------------------------------------------------------
MEMORY_VIZ = "https://pytorch.org/memory_viz"


def check_snapshot_path(path: str) -> str:
    """Validate a ``--snapshot`` target: CUDA present, its folder exists; returns the full path."""
    if not cuda_available():
        raise TorchMagicError(f"--snapshot needs CUDA: {cuda_status()} (memory history is "
                              "recorded by CUDA's caching allocator)")
    if not path:
        raise TorchMagicError("--snapshot needs a file name, e.g. --snapshot mem.pickle")
    full = os.path.abspath(os.path.expanduser(path))
    folder = os.path.dirname(full)
    if not os.path.isdir(folder):
        raise TorchMagicError(f"--snapshot {path}: folder {folder} does not exist")
    if os.path.isdir(full):
        raise TorchMagicError(f"--snapshot {path} is a folder; give a file name (mem.pickle)")
    return full


def start_memory_history(max_entries: int = 100_000) -> None:
    torch.cuda.memory._record_memory_history(max_entries=max_entries)


def stop_memory_history(path: str) -> str:
    """Write the snapshot to ``path``, stop recording; return a line saying how to open it."""
    try:
        torch.cuda.memory._dump_snapshot(path)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    size = os.path.getsize(path) if os.path.exists(path) else 0
    return (f"memory snapshot written to {path} ({size:,} bytes): open {MEMORY_VIZ} and drag "
            "the file onto the page (it stays in your browser)")


@contextlib.contextmanager
def record_memory_history(path: str, max_entries: int = 100_000) -> Iterator[list[str]]:
    """Record CUDA memory history inside the block and write a snapshot to ``path`` at the end
    (also when the block raises). The yielded list receives the line saying how to open it.
    Recording stops at the end (a recording of your own started before is stopped too).
    """
    full = check_snapshot_path(path)
    start_memory_history(max_entries)
    message: list[str] = []
    try:
        yield message
    finally:
        message.append(stop_memory_history(full))
