"""Eager against compiled, measured the same way: timing (``--bench``) and outputs (``--check``).

:func:`time_pair` times two thunks with ``torch.utils.benchmark.Timer.blocked_autorange`` (same
statement shape, same thread count, ``torch.get_num_threads()`` rather than Timer's default of 1),
each after two warm-up calls, so the compiled side's first-call cost (compilation) stays out of its
median; blocks alternate between the sides. The first call is reported apart, with the number of
calls after which compiling pays off.

:func:`compare_outputs` compares eager and compiled outputs leaf by leaf (tensors in nested
tuples/lists/dicts/dataclasses, Python numbers): max absolute and max relative difference, exact
equality, and whether they are close by ``torch.testing.assert_close``'s default tolerances for the
dtype.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CompileTiming:
    """Per-call times in seconds (medians of ``blocked_autorange``), eager and compiled.

    ``speedup`` = eager / compiled (above 1: compiled is faster); ``first_call_seconds``: the
    first compiled call (compiling plus running); ``break_even_calls``: how many calls repay the
    compile time at this speed-up (None when compiled is not faster)."""

    eager_median: float
    eager_iqr: float
    eager_runs: int
    compiled_median: float
    compiled_iqr: float
    compiled_runs: int
    threads: int
    first_call_seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.eager_median / self.compiled_median if self.compiled_median else math.nan

    @property
    def break_even_calls(self) -> float | None:
        saved = self.eager_median - self.compiled_median
        if saved <= 0:
            return None
        extra = self.first_call_seconds - self.compiled_median
        return max(extra, 0.0) / saved


@dataclass
class OutputDiff:
    """One output leaf compared: ``name`` (``out``, ``out[0]``, ``y['logits']``), shape and dtype
    of the eager value, ``max_abs``/``max_rel`` differences (None for non-tensors), ``equal``
    (bitwise/`==`), ``close`` (within ``torch.testing.assert_close`` default tolerances)."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str | None
    max_abs: float | None
    max_rel: float | None
    equal: bool
    close: bool
    note: str = ""


class _Sink(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Discard what the code prints (reruns for timing and checking)."""
    with contextlib.redirect_stdout(_Sink()):
        yield


def time_pair(eager: Callable[[], Any], compiled: Callable[[], Any], *, min_time: float = 0.2,
              first_call_seconds: float, num_threads: int | None = None,
              rounds: int = 3) -> CompileTiming:
    """Time ``eager()`` and ``compiled()`` alike: 2 warm-up calls each, then ``rounds``
    alternating ``blocked_autorange(min_time / rounds)`` blocks per side (a load change on a
    shared machine hits both sides), merged with ``Measurement.merge``."""
    from torch.utils.benchmark import Timer
    from torch.utils.benchmark.utils.common import Measurement

    threads = num_threads or torch.get_num_threads()
    timers = []
    for label, fn in (("eager", eager), ("compiled", compiled)):
        fn()
        fn()
        timers.append(Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label))
    parts: list[list[Any]] = [[], []]
    runs = [0, 0]
    for _ in range(max(rounds, 1)):
        for i, timer in enumerate(timers):
            m = timer.blocked_autorange(min_run_time=min_time / max(rounds, 1))
            parts[i].append(m)
            runs[i] += m.number_per_run * len(m.raw_times)
    e, c = (Measurement.merge(p)[0] for p in parts)
    warnings = _load_warning(threads)
    for label, m in (("eager", e), ("compiled", c)):
        if m.median and m.iqr / m.median > 0.1:
            warnings.append(f"{label} time varies: IQR is {100 * m.iqr / m.median:.0f}% of the "
                            "median (a noisy machine; --min-time runs longer)")
    return CompileTiming(e.median, e.iqr, runs[0], c.median, c.iqr, runs[1], threads,
                         first_call_seconds, warnings)


def _load_warning(threads: int) -> list[str]:
    """A warning when the machine is busier than its cores: threaded timings then measure the
    waiting of OpenMP threads more than the code (seen here: 2 threads on a loaded 2-core
    machine made a 2 ms forward take 300 ms)."""
    import os

    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return []
    if threads > 1 and load > cores:
        return [f"the machine is busy (load average {load:.1f} on {cores} cores): timings with "
                f"{threads} threads are unreliable; torch.set_num_threads(1) gives steadier "
                "numbers"]
    return []


def _leaves(obj: Any, prefix: str, depth: int = 0) -> list[tuple[str, Any]]:
    import dataclasses
    from collections.abc import Mapping

    if depth > 8:
        return [(prefix, obj)]
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (int, float, complex,
                                                                        bool, str)):
        return [(prefix, obj)]
    if isinstance(obj, Mapping):
        out = []
        for k, v in obj.items():
            out.extend(_leaves(v, f"{prefix}[{k!r}]", depth + 1))
        return out
    if isinstance(obj, (list, tuple)):
        out = []
        for i, v in enumerate(obj):
            out.extend(_leaves(v, f"{prefix}[{i}]", depth + 1))
        return out
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = []
        for f in dataclasses.fields(obj):
            out.extend(_leaves(getattr(obj, f.name, None), f"{prefix}.{f.name}", depth + 1))
        return out
    return [(prefix, obj)]


def _compare_tensors(name: str, eager: torch.Tensor, compiled: Any) -> OutputDiff:
    shape = tuple(eager.shape)
    dtype = str(eager.dtype).replace("torch.", "")
    if not isinstance(compiled, torch.Tensor):
        return OutputDiff(name, shape, dtype, None, None, False, False,
                          f"compiled gave {type(compiled).__name__}, eager a tensor")
    if compiled.shape != eager.shape or compiled.dtype != eager.dtype:
        return OutputDiff(name, shape, dtype, None, None, False, False,
                          f"compiled gave {tuple(compiled.shape)} "
                          f"{str(compiled.dtype).replace('torch.', '')}")
    if eager.is_meta or compiled.is_meta:
        return OutputDiff(name, shape, dtype, None, None, True, True, "meta tensors: no values")
    a = eager.detach().cpu()
    b = compiled.detach().cpu()
    equal = bool(torch.equal(a, b)) or (a.is_floating_point() and bool(
        torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))
        and torch.equal(a.isnan(), b.isnan())))
    try:
        torch.testing.assert_close(b, a, equal_nan=True)
        close = True
    except AssertionError:
        close = False
    if a.numel() == 0:
        return OutputDiff(name, shape, dtype, 0.0, 0.0, equal, close)
    if a.is_floating_point() or a.is_complex():
        fa, fb = a.to(torch.float64) if not a.is_complex() else a, \
            b.to(torch.float64) if not b.is_complex() else b
        diff = (fa - fb).abs()
        both_nan = fa.isnan() & fb.isnan() if not a.is_complex() else torch.zeros_like(diff,
                                                                                   dtype=torch.bool)
        diff = diff.masked_fill(both_nan, 0.0)
        ref = fa.abs()
        rel = torch.where(ref > 0, diff / ref.clamp_min(1e-300), torch.zeros_like(diff))
        rel = rel.masked_fill(both_nan, 0.0)
        return OutputDiff(name, shape, dtype, float(diff.max()), float(rel.max()), equal, close)
    diff = (a.to(torch.int64) - b.to(torch.int64)).abs() if a.dtype != torch.bool else (a ^ b)
    max_abs = float(diff.max())
    return OutputDiff(name, shape, dtype, max_abs, None, equal, close)


def compare_outputs(eager: Any, compiled: Any, name: str = "out") -> list[OutputDiff]:
    """Leaf-by-leaf comparison of two outputs with the same structure."""
    le = _leaves(eager, name)
    lc = dict(_leaves(compiled, name))
    out: list[OutputDiff] = []
    for key, value in le:
        other = lc.get(key, None)
        if isinstance(value, torch.Tensor):
            out.append(_compare_tensors(key, value, other))
        elif isinstance(value, (int, float, complex, bool)) and not isinstance(value, str):
            same = value == other or (isinstance(value, float) and isinstance(other, float)
                                      and math.isnan(value) and math.isnan(other))
            diff = None
            if isinstance(other, (int, float)) and isinstance(value, (int, float)):
                diff = abs(float(value) - float(other))
            rel = diff / abs(value) if diff is not None and value else (0.0 if diff == 0 else None)
            close = same or (diff is not None and math.isclose(value, other, rel_tol=1.3e-6,
                                                              abs_tol=1e-5))
            out.append(OutputDiff(key, None, type(value).__name__, diff, rel, bool(same),
                                  bool(close)))
    if len(lc) != len(le):
        out.append(OutputDiff(name, None, None, None, None, False, False,
                              f"structure differs: eager has {len(le)} leaves, compiled "
                              f"{len(lc)}"))
    return out


__all__ = ["CompileTiming", "OutputDiff", "compare_outputs", "quiet", "time_pair"]
