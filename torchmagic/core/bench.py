"""Benchmark a cell with ``torch.utils.benchmark.Timer``, avoiding the usual traps.

:func:`benchmark` runs code (a cell's source or a callable) many times and returns a
:class:`BenchResult` with median, IQR, mean, runs and measurements:

- the code runs with a *copy* of the namespace: its assignments do not leak, also not through
  the notebook functions it calls (they are re-bound to the copy, so ``global counter; counter +=
  1`` counts in the copy) nor through ``get_ipython().user_ns[...] = ...`` (undone afterwards,
  and reported); in-place changes to objects, ``x.add_(1)``, ``loss.backward()``, BatchNorm running
  statistics, are real: they are detected through tensor version counters and copies of buffers
  (read through :mod:`torchmagic.core.access`, safe on quantized, sparse and subclass tensors) and
  reported;
- the cell keeps module-level semantics (``x = x * 2`` works, as in a notebook, unlike ``timeit``
  where it raises ``UnboundLocalError``): the compiled cell is called as a function (~20 ns);
- ``num_threads`` defaults to ``torch.get_num_threads()`` (Timer's own default is 1, which silently
  benchmarks single-threaded code), and the thread count used is reported;
- accelerator work is synchronised: Timer's clock calls ``torch.accelerator.synchronize()`` before
  every reading, so asynchronous CUDA kernels are timed to completion;
- global torch state (RNG, grad mode, default dtype/device, thread counts, deterministic
  algorithms, float32 matmul precision, cuDNN flags...) is restored afterwards.

Without ``number`` it uses ``Timer.blocked_autorange(min_run_time)`` (``min_time`` at most
``MAX_MIN_TIME`` seconds); with ``number=N`` it times exactly N single runs after one warm-up run. :func:`compare` puts labelled results side by side.
A failing cell raises :class:`ForwardError` naming the cell line and the module that failed.
"""

from __future__ import annotations

import builtins
import time
import traceback
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core import access
from torchmagic.core._result import Result
from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.execution import (
    CompiledCell,
    cell_line_of,
    compile_user_cell,
    namespace_copy,
    namespace_guard,
)
from torchmagic.core.state import preserved_global_state
from torchmagic.core.tracing import format_shapes


# -- results -------------------------------------------------------------------------------------
@dataclass
class BenchResult(Result):
    """Timing of one piece of code (times in seconds per run)."""

    _display_module = "torchmagic.display.bench"

    label: str
    statement: str          # the code's first line (or the callable's name)
    median: float
    iqr: float
    mean: float
    runs: int               # timed runs in total
    measurements: int       # timed blocks
    number_per_run: int     # runs per block
    num_threads: int
    threads_source: str     # where num_threads came from
    method: str
    sync: str
    times: list[float]      # per-run time of each block
    total_seconds: float    # wall time of the whole benchmark, warm-up included
    warnings: list[str] = field(default_factory=list)
    changed_in_place: list[str] = field(default_factory=list)
    _measurement: Any = None

    @property
    def measurement(self) -> Any:
        """torch's ``Measurement`` (for ``torch.utils.benchmark.Compare``)."""
        return self._measurement

    @property
    def iqr_percent(self) -> float:
        return 100.0 * self.iqr / self.median if self.median else 0.0


@dataclass
class BenchComparison(Result):
    """Labelled results side by side (``%%benchmark --compare LABEL``)."""

    _display_module = "torchmagic.display.bench"

    results: list[BenchResult]
    current: str | None = None

    @property
    def fastest(self) -> float:
        return min((r.median for r in self.results), default=0.0)

    def relative(self, result: BenchResult) -> float:
        """``median / fastest median`` (1.0 for the fastest)."""
        return result.median / self.fastest if self.fastest else float("nan")


def compare(results: list[BenchResult], current: str | None = None) -> BenchComparison:
    """A comparison table of ``results`` (the ``current`` label is highlighted)."""
    return BenchComparison(list(results), current)


# -- the cell ------------------------------------------------------------------------------------
def _module_paths(namespace: Mapping[str, Any] | None, target: nn.Module) -> str | None:
    if not namespace:
        return None
    for name, value in list(namespace.items()):
        if name.startswith("_") or not isinstance(value, nn.Module):
            continue
        for sub, mod in value.named_modules():
            if mod is target:
                return f"{name}.{sub}" if sub else name
    return None


def cell_error(exc: BaseException, cell: CompiledCell | None,
               namespace: Mapping[str, Any] | None = None, what: str = "the cell") -> ForwardError:
    """A one-line :class:`ForwardError` for an exception raised by user code: the cell line, and
    the innermost module whose ``forward`` was running with its input shapes."""
    tb = exc.__traceback__
    msg = " ".join(str(exc).strip().split("\n")[0].split()) or type(exc).__name__
    where = ""
    if cell is not None:
        line = cell_line_of(tb, cell.filename)
        if line:
            lines = cell.source.splitlines()
            src = lines[line - 1].strip() if 0 < line <= len(lines) else ""
            where = f" at line {line}" + (f" ({src[:60]})" if src else "")
    module = None
    shapes = None
    for frame, _ in traceback.walk_tb(tb):
        if frame.f_code.co_name != "forward":  # (f_locals of other frames is never made)
            continue
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module):
            module = obj
            code = frame.f_code
            args = [frame.f_locals.get(n) for n in code.co_varnames[1:code.co_argcount]]
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
    path = cls = None
    inside = ""
    if module is not None:
        cls = type(module).__name__
        path = _module_paths(namespace, module)
        inside = f" in {path or cls} ({cls}): got input {format_shapes(shapes or [])};"
    return ForwardError(f"{what} raised {type(exc).__name__}{where}:{inside} {msg}",
                        original=exc, module_path=path, module_class=cls,
                        input_shapes=format_shapes(shapes) if shapes is not None else None)


def compile_code(code: str, label: str) -> CompiledCell:
    """Compile a (transformed) cell; a syntax error or an empty cell is a :class:`TorchMagicError`."""
    return compile_user_cell(code, label, "measure")


def cell_functions(cell: CompiledCell, namespace: dict[str, Any]) -> tuple[Callable[[], Any],
                                                                           Callable[[], Any] | None]:
    """The cell's statements and its trailing expression as functions with module semantics in
    ``namespace`` (a module code object called as a function runs like ``exec`` without its
    overhead)."""
    namespace.setdefault("__builtins__", builtins)
    body = types.FunctionType(cell.body, namespace)
    last = types.FunctionType(cell.last_expr, namespace) if cell.last_expr is not None else None
    return body, last


# -- in-place change detection --------------------------------------------------------------------
def _grad_key(t: torch.Tensor) -> Any:
    g = t.grad if t.is_leaf else None
    return None if g is None else (id(g), access.version(g))


BUFFER_COPY_BUDGET = 64 << 20  # bytes of buffers copied to detect in-place changes
MAX_MIN_TIME = 600.0  # seconds: the largest --min-time (blocked_autorange runs at least that long)


def watch(namespace: Mapping[str, Any] | None) -> list[tuple[str, str, str, Any, Any]]:
    """Version counters and ``.grad`` of every tensor reachable from the namespace's modules and
    tensors: ``(owner, kind, name, tensor, key)``. Buffers also get a copy of their values (up to
    ``BUFFER_COPY_BUDGET`` bytes in all; :func:`torchmagic.core.access.fingerprint`, which never
    reinterprets a quantized or opaque tensor): kernels such as batch norm update running
    statistics without bumping the version counter."""
    out: list[tuple[str, str, str, Any, Any]] = []
    if not namespace:
        return out
    budget = BUFFER_COPY_BUDGET
    for name, value in list(namespace.items()):
        if name.startswith("_"):
            continue
        if isinstance(value, nn.Module):
            for pn, p in value.named_parameters():
                out.append((name, "parameter", pn, p, (access.version(p), _grad_key(p))))
            for bn, b in value.named_buffers():
                copy = None
                size = access.storage_nbytes(b)
                if size <= budget:
                    copy = access.fingerprint(b)
                    if copy is not None:
                        budget -= size
                out.append((name, "buffer", bn, b, (access.version(b), copy)))
            out.append((name, "mode", "", value, tuple(m.training for m in value.modules())))
        elif isinstance(value, torch.Tensor):
            out.append((name, "tensor", "", value, (access.version(value), _grad_key(value))))
    return out


def changes(before: list[tuple[str, str, str, Any, Any]]) -> list[str]:
    """What changed in place since :func:`watch`, one line per namespace object."""
    by_owner: dict[str, dict[str, list[str]]] = {}
    for owner, kind, name, obj, key in before:
        if kind == "mode":
            now: Any = tuple(m.training for m in obj.modules())
            if now != key:
                by_owner.setdefault(owner, {}).setdefault("train/eval mode", []).append("")
            continue
        version = access.version(obj)
        grad = _grad_key(obj) if kind in ("parameter", "tensor") else None
        changed = version != key[0]
        if kind == "buffer" and key[1] is not None:
            changed = changed or not access.same_fingerprint(access.fingerprint(obj), key[1])
        if changed:
            what = {"parameter": "parameters", "buffer": "buffers", "tensor": "values"}[kind]
            by_owner.setdefault(owner, {}).setdefault(what, []).append(name)
        if kind != "buffer" and grad != key[1]:
            by_owner.setdefault(owner, {}).setdefault(".grad", []).append(name)
    lines = []
    for owner, kinds in by_owner.items():
        parts = []
        for what, names in kinds.items():
            named = [n for n in names if n]
            if what == "train/eval mode":
                parts.append("train/eval mode")
            elif what == "values" or (what == ".grad" and not named):
                parts.append(what)
            else:
                label = f".grad of {len(named)} parameters" if what == ".grad" else \
                    f"{len(named)} {what}"
                parts.append(f"{label} ({', '.join(named[:2])}{', ...' if len(named) > 2 else ''})")
        lines.append(f"{owner}: {'; '.join(parts)}")
    return lines


# -- benchmark -----------------------------------------------------------------------------------
def _autorange_progress(progress: Callable[[float, str], None] | None,
                        min_time: float) -> Callable[[int, float], None] | None:
    """``blocked_autorange``'s per-block callback -> ``progress(fraction, message)``."""
    if progress is None:
        return None
    done = {"blocks": 0, "runs": 0, "seconds": 0.0}

    def callback(number: int, seconds: float) -> None:
        done["blocks"] += 1
        done["runs"] += number
        done["seconds"] += seconds
        progress(min(done["seconds"] / min_time, 0.99),
                 f"{done['runs']:,} runs in {done['blocks']} blocks")

    return callback


def _sync_note() -> str:
    if torch.cuda.is_available():
        return ("CUDA: Timer synchronises the device before every clock reading, so queued "
                "kernels are timed to completion")
    return "CPU only (no accelerator to synchronise)"


def benchmark(code: str | Callable[[], Any], namespace: Mapping[str, Any] | None = None, *,
              number: int | None = None, min_time: float = 0.2, num_threads: int | None = None,
              label: str | None = None,
              progress: Callable[[float, str], None] | None = None) -> BenchResult:
    """Time ``code`` (cell source, IPython syntax already transformed, or a callable).

    ``namespace`` is copied (the code's assignments stay in the copy). ``number=None`` uses
    ``blocked_autorange(min_run_time=min_time)``; ``number=N`` times N single runs after a warm-up.
    ``num_threads`` defaults to ``torch.get_num_threads()``. Global torch state is restored.
    ``progress(fraction, message)``, if given, is called after the warm-up and after every timed
    block or run (fraction of ``min_time`` elapsed, or of the N runs done), outside the timing.
    """
    __tracebackhide__ = True  # IPython shows the user's frames, not ours
    from torch.utils.benchmark import Timer
    from torch.utils.benchmark.utils.common import Measurement, set_torch_threads

    if number is not None and number < 1:
        raise TorchMagicError(f"-n must be at least 1; got {number}")
    if not min_time > 0:
        raise TorchMagicError(f"--min-time must be a positive number of seconds; got {min_time}")
    if not min_time <= MAX_MIN_TIME:
        raise TorchMagicError(f"--min-time {min_time:g} is too long: blocked_autorange runs at "
                              f"least that many seconds; give at most {MAX_MIN_TIME:g} (10 "
                              "minutes), or time a fixed number of runs with -n N")
    if num_threads is not None and num_threads < 1:
        raise TorchMagicError(f"--threads must be at least 1; got {num_threads}")
    threads = num_threads or torch.get_num_threads()
    source = ("--threads" if num_threads else
              "torch.get_num_threads(); Timer's own default would be 1")

    real_ns = namespace if isinstance(namespace, dict) else None
    ns: dict[str, Any] = namespace_copy(real_ns) if real_ns is not None else dict(namespace or {})
    cell = None
    if callable(code):
        body: Callable[[], Any] = code
        last = None
        statement = getattr(code, "__qualname__", None) or repr(code)
    else:
        cell = compile_code(code, "benchmark")
        body, last = cell_functions(cell, ns)
        lines = [ln.strip() for ln in code.splitlines() if ln.strip()]
        statement = lines[0] + (f"  (+{len(lines) - 1} lines)" if len(lines) > 1 else "")
    stmt = "_tm_body()\n_tm_last()" if last is not None else "_tm_body()"
    name = label or "benchmark"
    timer = Timer(stmt=stmt, globals={"_tm_body": body, "_tm_last": last}, num_threads=threads,
                  label=name, description=statement[:60])
    watched = watch(namespace)
    undone: list[str] = []
    start = time.perf_counter()
    with namespace_guard([real_ns] if real_ns is not None else [], undone.extend), \
            preserved_global_state():
        prior = torch.get_num_threads()
        try:
            with set_torch_threads(threads):
                body()  # warm-up; errors surface with the user's own traceback
                if last is not None:
                    last()
                if progress is not None:
                    progress(0.0, "warm-up done")
                if number is not None:
                    raw = []
                    for i in range(number):
                        raw.append(timer._timeit(1))
                        if progress is not None:
                            progress((i + 1) / number, f"run {i + 1} of {number}")
                    m = Measurement(number_per_run=1, raw_times=raw, task_spec=timer._task_spec)
                    method = f"-n {number}: {number} single runs timed one by one, after 1 warm-up"
            if number is None:
                m = timer.blocked_autorange(callback=_autorange_progress(progress, min_time),
                                            min_run_time=min_time)
                method = (f"blocked_autorange(min_run_time={min_time:g} s): blocks of "
                          f"{m.number_per_run} run{'s' if m.number_per_run > 1 else ''}")
        except Exception as exc:  # noqa: BLE001 - the user's code failed; KeyboardInterrupt passes
            err = cell_error(exc, cell, namespace)
            # The cell's frames (kept by the traceback the user sees) have the copy as their
            # globals: empty it, so that the traceback keeps no object the notebook deleted.
            ns.clear()
            raise err from None
        finally:
            torch.set_num_threads(prior)
    total = time.perf_counter() - start
    warnings = []
    if m.has_warnings:
        warnings.append(f"IQR is {100 * m.iqr / m.median:.1f}% of the median: the machine is noisy "
                        "or the code's time varies (run longer with --min-time)")
    if len(m.times) < 4:
        warnings.append(f"only {len(m.times)} measurements: IQR is rough (use more runs)")
    if undone:
        shown = ", ".join(undone[:5]) + (" ..." if len(undone) > 5 else "")
        warnings.append(f"the code wrote into the notebook's namespace (get_ipython().user_ns, "
                        f"a line magic); undone, as its other assignments: {shown}")
    return BenchResult(
        label=name, statement=statement, median=m.median, iqr=m.iqr, mean=m.mean,
        runs=m.number_per_run * len(m.raw_times), measurements=len(m.raw_times),
        number_per_run=m.number_per_run, num_threads=threads, threads_source=source,
        method=method, sync=_sync_note(), times=list(m.times), total_seconds=total,
        warnings=warnings, changed_in_place=changes(watched), _measurement=m,
    )


compare_benchmarks = compare  # the public name in ``torchmagic``

__all__ = ["BenchComparison", "BenchResult", "benchmark", "cell_error", "compare",
           "compare_benchmarks"]
