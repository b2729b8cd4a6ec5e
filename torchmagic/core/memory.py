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
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

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
# measuring a block, the largest tensors, memory history: their own modules, exported here
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



from torchmagic.core.memory_meter import (  # noqa: E402 - they use the functions above
    CellMemory,
    MemoryDelta,
    MemoryMeter,
    measure_memory,
    memory_meter,
)
from torchmagic.core.memory_top import DeviceTotal, TensorEntry, TopTensors, top_tensors  # noqa: E402

__all__ = ["CellMemory", "CpuMemory", "DeviceMemory", "DeviceTotal", "MemoryDelta", "MemoryMeter",
           "MemoryReport", "TensorEntry", "TopTensors", "gpumem", "measure_memory", "memory_meter",
           "parse_device", "record_memory_history", "top_tensors"]
