"""Profile a cell with ``torch.profiler``: a top-ops table, CUDA activity, an optional Chrome trace.

:func:`profile` runs code once (after ``warmup`` unprofiled runs) in the given namespace (like a
normal cell: its assignments stay) under ``torch.profiler.profile`` with CPU activity, plus CUDA
activity when CUDA is available, and returns a :class:`ProfileResult`: the top operators by the
chosen key with self/total CPU (and device) time, calls, input shapes (``shapes=True``) and memory
(``memory=True``). ``trace=FILE`` writes a Chrome trace (open it at https://ui.perfetto.dev or
chrome://tracing).

The profiler's native library (Kineto) writes log lines straight to file descriptor 2, past
``sys.stderr``; while profiling, fd 2 goes to a temporary file, and afterwards the lines that are
not native log lines (the user's own stderr output) are written back to ``sys.stderr``. fd 2 is
restored on every path, KeyboardInterrupt included, and the profiler is always stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from torchmagic.core._result import Result
from torchmagic.core.bench import cell_error, cell_functions, compile_code
from torchmagic.core.errors import TorchMagicError

# User-facing sort keys -> OpRow attribute; torch's own names are accepted as aliases.
SORT_KEYS = {
    "self_cpu": "self_cpu", "cpu_total": "cpu_total", "self_device": "self_device",
    "device_total": "device_total", "calls": "calls", "self_memory": "self_cpu_memory",
    "memory": "cpu_memory", "self_device_memory": "self_device_memory",
    "device_memory": "device_memory", "name": "name",
}
SORT_ALIASES = {
    "self_cuda": "self_device", "cuda_total": "device_total", "count": "calls",
    "self_cpu_time_total": "self_cpu", "cpu_time_total": "cpu_total",
    "self_cuda_time_total": "self_device", "cuda_time_total": "device_total",
    "self_device_time_total": "self_device", "device_time_total": "device_total",
    "self_cpu_memory_usage": "self_memory", "cpu_memory_usage": "memory",
    "self_cuda_memory_usage": "self_device_memory", "cuda_memory_usage": "device_memory",
    "self_device_memory_usage": "self_device_memory", "device_memory_usage": "device_memory",
}
# A line logged by native code: "USDT:2026-01-01 ... Handler.cpp:52] ..." or glog "W0101 12:00..."
_NATIVE_LOG = re.compile(r"\S+\.(?:cpp|cc|cxx|h|hpp|cu)(?::\d+)?\]|^[IWEF]\d{4} \d\d:\d\d:\d\d|"
                         r"^(?:STAGE|USDT|INFO|WARNING|ERROR):\d{4}-\d\d-\d\d")


@dataclass
class OpRow:
    """One operator (or operator + input shapes) of the profile; times in seconds, memory in
    bytes (allocations minus frees)."""

    name: str
    calls: int
    self_cpu: float
    cpu_total: float
    self_device: float = 0.0
    device_total: float = 0.0
    self_cpu_memory: int = 0
    cpu_memory: int = 0
    self_device_memory: int = 0
    device_memory: int = 0
    shapes: str | None = None


@dataclass
class ProfileResult(Result):
    """The top operators of one profiled run of a cell."""

    _display_module = "torchmagic.display.profile"

    rows: list[OpRow]
    sort: str
    total_ops: int              # distinct rows before cutting to the top N
    wall: float                 # seconds the cell took under the profiler
    self_cpu_total: float       # sum of self CPU time over every operator
    self_device_total: float
    cuda: bool                  # CUDA activity was recorded
    memory: bool
    shapes: bool
    warmup: int = 0
    trace: str | None = None
    trace_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    _profiler: Any = None

    @property
    def profiler(self) -> Any:
        """The ``torch.profiler.profile`` object (``key_averages()``, ``export_stacks`` ...)."""
        return self._profiler


def sort_key(key: str | None, *, cuda: bool, memory: bool) -> str:
    """Resolve a ``--sort`` key; a bad one is a one-line :class:`TorchMagicError` listing the valid
    ones."""
    if key is None:
        return "self_device" if cuda else "self_cpu"
    k = SORT_ALIASES.get(key, key)
    if k not in SORT_KEYS:
        raise TorchMagicError(f"--sort {key!r} is not a sort key; use one of "
                              f"{', '.join(SORT_KEYS)} (torch's names such as "
                              "self_cpu_time_total work too)")
    if "memory" in k and not memory:
        raise TorchMagicError(f"--sort {key} needs --memory (memory is recorded only with it)")
    if "device" in k and not cuda:
        raise TorchMagicError(f"--sort {key} sorts by CUDA time, but CUDA is not available here; "
                              "use self_cpu or cpu_total")
    return k


def _check_trace(path: str | None) -> str | None:
    if path is None:
        return None
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        raise TorchMagicError(f"--trace {path} is a directory; give a file name such as "
                              f"{os.path.join(path, 'trace.json')}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise TorchMagicError(f"--trace: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise TorchMagicError(f"--trace: directory {directory} is not writable")
    return path


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send fd 2 to a temporary file for the block; afterwards write back to ``sys.stderr`` the
    lines that are not native (C++) log lines. fd 2 is restored however the block exits."""
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed/odd stderr: nothing buffered to lose
        pass
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 in this process: nothing to redirect
        yield
        return
    capture = tempfile.TemporaryFile()
    try:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except Exception:  # noqa: BLE001
                pass
            os.dup2(saved, 2)
    finally:
        os.close(saved)
        try:
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
        finally:
            capture.close()
        kept = [ln for ln in text.splitlines(True) if ln.strip() and not _NATIVE_LOG.search(ln)]
        if kept:
            with contextlib.suppress(Exception):
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _shapes(shapes: Any) -> str:
    if not shapes:
        return "-"
    parts = []
    for s in shapes:
        if isinstance(s, (list, tuple)):
            parts.append("(" + ", ".join(str(d) for d in s) + ")" if s else "()")
        else:
            parts.append(str(s))
    return ", ".join(parts)


def _rows(prof: Any, shapes: bool) -> list[OpRow]:
    rows = []
    for e in prof.key_averages(group_by_input_shape=shapes):
        if e.key == "[memory]" or e.key.startswith("ProfilerStep"):
            continue
        rows.append(OpRow(
            name=e.key, calls=int(e.count), self_cpu=e.self_cpu_time_total * 1e-6,
            cpu_total=e.cpu_time_total * 1e-6,
            self_device=getattr(e, "self_device_time_total", 0.0) * 1e-6,
            device_total=getattr(e, "device_time_total", 0.0) * 1e-6,
            self_cpu_memory=int(e.self_cpu_memory_usage), cpu_memory=int(e.cpu_memory_usage),
            self_device_memory=int(getattr(e, "self_device_memory_usage", 0)),
            device_memory=int(getattr(e, "device_memory_usage", 0)),
            shapes=_shapes(e.input_shapes) if shapes else None,
        ))
    return rows


def profile(code: str | Callable[[], Any], namespace: dict[str, Any] | None = None, *,
            sort: str | None = None, rows: int = 15, memory: bool = False, shapes: bool = False,
            trace: str | None = None, warmup: int = 0,
            result_holder: dict[str, Any] | None = None) -> ProfileResult:
    """Profile one run of ``code`` (cell source, IPython syntax already transformed, or a callable)
    in ``namespace`` (used as is: the code's assignments stay there, as in a cell).

    ``result_holder`` (a dict) receives the code's trailing-expression value under ``"value"``.
    A failing cell raises :class:`ForwardError` (profiler stopped, fd 2 restored).
    """
    __tracebackhide__ = True  # IPython shows the user's frames, not ours
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if rows < 1:
        raise TorchMagicError(f"--rows must be at least 1; got {rows}")
    if warmup < 0:
        raise TorchMagicError(f"--warmup must be 0 or more; got {warmup}")
    cuda = torch.cuda.is_available()
    key = sort_key(sort, cuda=cuda, memory=memory)  # validated before the cell runs
    trace = _check_trace(trace)
    if torch._C._autograd._profiler_enabled():
        raise TorchMagicError("a torch profiler is already running in this process (nested "
                              "%%profile or an open torch.profiler.profile); stop it first")
    ns = namespace if namespace is not None else {}
    cell = None
    if callable(code):
        body: Callable[[], Any] = code
        last = None
    else:
        cell = compile_code(code, "profile")
        body, last = cell_functions(cell, ns)

    def run() -> Any:
        __tracebackhide__ = True
        value = body()
        return last() if last is not None else value

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        for _ in range(warmup):
            run()
        with quiet_native_stderr():
            with torch_profile(activities=activities, record_shapes=shapes,
                               profile_memory=memory) as prof:
                start = time.perf_counter()
                value = run()
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - start
            all_rows = _rows(prof, shapes)
            if trace:
                prof.export_chrome_trace(trace)
    except TorchMagicError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code failed; KeyboardInterrupt passes
        raise cell_error(exc, cell, ns) from None
    if result_holder is not None:
        result_holder["value"] = value
    if sort is None and cuda and not any(r.self_device for r in all_rows):
        key = "self_cpu"  # no kernel ran: sorting by zeros would say nothing
    attr = SORT_KEYS[key]
    reverse = attr != "name"
    all_rows.sort(key=lambda r: getattr(r, attr), reverse=reverse)
    notes = []
    if not cuda:
        notes.append("CUDA is not available: CPU activity only")
    elif not any(r.self_device for r in all_rows):
        notes.append("no CUDA kernel ran in the cell (its tensors are on the CPU?)")
    if not all_rows:
        if isinstance(code, str) and "profile" in code:
            notes.append("no torch operator was recorded: a torch.profiler started inside the cell "
                         "takes the events over (profilers do not nest); remove it or profile "
                         "without %%profile")
        else:
            notes.append("no torch operator ran in the cell")
    if warmup == 0:
        notes.append("one profiled run, one-time costs (lazy init, caches) included; --warmup 1 "
                     "profiles a steady-state run")
    result = ProfileResult(
        rows=all_rows[:rows], sort=key, total_ops=len(all_rows), wall=wall,
        self_cpu_total=sum(r.self_cpu for r in all_rows),
        self_device_total=sum(r.self_device for r in all_rows), cuda=cuda, memory=memory,
        shapes=shapes, warmup=warmup, trace=trace,
        trace_bytes=os.path.getsize(trace) if trace and os.path.exists(trace) else 0,
        notes=notes, _profiler=prof,
    )
    return result


__all__ = ["OpRow", "ProfileResult", "SORT_KEYS", "profile", "quiet_native_stderr", "sort_key"]
