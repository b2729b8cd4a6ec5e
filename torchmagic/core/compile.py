"""Does this compile cleanly, and is it faster? ``torch.compile`` explained for a cell or a model.

:func:`explain_compile` compiles a cell (source text run in a namespace), a model's forward or a
function, runs it, and returns a :class:`CompileReport`:

- graphs and graph breaks as ``torch._dynamo.explain`` counts them (``graph_count``,
  ``graph_break_count``, ``graph_breaks`` = explain's ``break_reasons``), each break with dynamo's
  reason in plain words, torch's hints, and its place: the cell line, or ``file:line`` inside the
  module (path as ``%summary`` names it); the ops in each graph;
- recompilations across calls (``runs``, ``calls``): the failed guard, its kind (shape, dtype, a
  Python value, a global ...) and a suggestion where torch has one;
- compile time split into dynamo's tracing and the backend's code generation; the first call's time;
  with ``bench=True`` eager and compiled times from ``torch.utils.benchmark`` (after warm-up, same
  threads) and the calls needed to repay compilation; with ``check=True`` eager and compiled outputs
  compared (max abs / rel difference per output);
- ``logs``: ``TORCH_LOGS`` artifacts (``graph_breaks,recompiles,guards,output_code``) captured for
  this run only (never printed on stderr).

The user's compile state is untouched (:mod:`torchmagic.core.compile_sandbox`): no
``torch._dynamo.reset()``; functions compiled before keep their caches; nothing compiled here is
used afterwards; dynamo/inductor config and logging settings are restored. Models and the
namespace: see :func:`explain_compile`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core._result import Result
from torchmagic.core.compile_graphs import (
    GraphBreak,
    GraphInfo,
    Locator,
    Place,
    Recorder,
    parse_reason,
)
from torchmagic.core.compile_recompiles import GuardLog, Recompile, recompiles
from torchmagic.core.compile_timing import CompileTiming, OutputDiff
from torchmagic.core.errors import TorchMagicError
from torchmagic.core.state import quiet_fake_tensor_log

_NO_COMPILER = ("inductor needs a C++ compiler to generate CPU code and found none "
                "(torch._inductor.config.cpp.cxx = {cxx}); install g++ or clang, or use "
                "--backend aot_eager (the same captured graphs, without code generation)")


@dataclass
class CompileReport(Result):
    """What ``torch.compile`` did with a cell, model or function (times in seconds).

    ``graph_count`` and ``graph_breaks`` are those of the first call and equal
    ``torch._dynamo.explain`` on the same code (its ``graph_count`` and ``break_reasons``);
    ``graph_break_count`` is ``len(graph_breaks)`` (explain's own ``graph_break_count`` is
    ``graph_count - 1``, which also counts the boundaries between frames dynamo compiled
    separately: ``explain_graph_break_count``); ``graphs`` lists every graph of every call (its
    ``run`` is the call, its ``compile_id`` dynamo's ``frame/n``, ``recompile`` when n > 0);
    ``later_graph_breaks`` the breaks of calls after the first (``later_graph_count`` graphs);
    ``recompiles`` the recompilations, one entry per failed guard and call, each standing for
    ``count`` frame recompilations: ``recompile_count`` in all, the number of ``Recompiling
    function`` records of ``TORCH_LOGS=recompiles`` (so ``len(graphs)`` = ``graph_count`` +
    ``later_graph_count``; ``recompile_count`` = ``first_call_recompile_count`` +
    ``later_recompile_count``).
    ``compile_seconds``: dynamo's compile time over all calls; ``codegen_seconds``: the part spent
    in the backend (None with ``explain_only``); ``first_call_seconds``: the first call's wall
    time. ``timing`` (``bench``) and ``check`` are None unless asked for; ``skipped`` says why
    they were not run. ``fullgraph_error``: where ``fullgraph=True`` failed (nothing ran).
    """

    _display_module = "torchmagic.display.compile"

    target: str
    kind: str  # "cell", "module" or "function"
    backend: str
    mode: str | None
    fullgraph: bool
    dynamic: bool | None
    explain_only: bool
    runs: int
    graph_count: int
    graph_break_count: int
    graph_breaks: list[GraphBreak]
    graphs: list[GraphInfo]
    recompiles: list[Recompile]
    compile_seconds: float
    codegen_seconds: float | None
    first_call_seconds: float
    timing: CompileTiming | None = None
    check: list[OutputDiff] | None = None
    logs: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    fullgraph_error: GraphBreak | None = None
    later_graph_breaks: list[GraphBreak] = field(default_factory=list)
    source: str = ""
    _value: Any = None

    @property
    def value(self) -> Any:
        """The value of the cell's last expression (the forward's output for a model)."""
        return self._value

    @property
    def explain_graph_break_count(self) -> int:
        """``torch._dynamo.explain``'s ``graph_break_count``: graphs - 1 (0 without graphs)."""
        return max(self.graph_count - 1, 0)

    @property
    def tracing_seconds(self) -> float:
        """Compile time outside the backend: dynamo's bytecode tracing and guards."""
        return max(self.compile_seconds - (self.codegen_seconds or 0.0), 0.0)

    @property
    def recompile_count(self) -> int:
        """Frame recompilations over all calls (one ``Recompiling function`` log record each)."""
        return sum(rc.count for rc in self.recompiles)

    @property
    def first_call_recompile_count(self) -> int:
        """Recompilations during the first call (a frame called again with other inputs)."""
        return sum(rc.count for rc in self.recompiles if rc.run == 1)

    @property
    def later_recompile_count(self) -> int:
        """Recompilations during the calls after the first."""
        return self.recompile_count - self.first_call_recompile_count

    @property
    def later_graph_count(self) -> int:
        """Graphs compiled during the calls after the first (recompiles and new frames)."""
        return sum(1 for g in self.graphs if g.run > 1)

    @property
    def later_graph_break_count(self) -> int:
        return len(self.later_graph_breaks)

    @property
    def op_count(self) -> int:
        """Ops in the first call's graphs (call_function/method/module nodes)."""
        return sum(g.ops for g in self.graphs if g.run == 1)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data, with the derived numbers (tracing time, explain's break
        count, speed-up, calls to repay compiling) added."""
        out = super().to_dict()
        out["tracing_seconds"] = self.tracing_seconds
        out["explain_graph_break_count"] = self.explain_graph_break_count
        out["op_count"] = self.op_count
        for name in ("recompile_count", "first_call_recompile_count", "later_recompile_count",
                     "later_graph_count", "later_graph_break_count"):
            out[name] = getattr(self, name)
        if self.timing is not None:
            out["timing"]["speedup"] = self.timing.speedup
            out["timing"]["break_even_calls"] = self.timing.break_even_calls
        return out

    @property
    def clean(self) -> bool:
        """One graph, no break, no recompilation, no fullgraph failure."""
        return (self.graph_count == 1 and not self.graph_breaks and not self.recompiles
                and self.fullgraph_error is None)


# -- options -------------------------------------------------------------------------------------
def check_options(backend: str, mode: str | None, runs: int, explain: bool, bench: bool,
                  check: bool, fullgraph: bool, min_time: float) -> None:
    """Refuse bad option values and combinations with one line each."""
    import torch._dynamo

    names = sorted(torch._dynamo.list_backends(exclude_tags=()))
    if backend not in names:
        raise TorchMagicError(f"--backend {backend!r} is not a torch.compile backend here; use "
                              f"one of {', '.join(names)}")
    if mode is not None:
        if backend != "inductor":
            raise TorchMagicError(f"--mode applies to the inductor backend only (torch.compile "
                                  f"ignores or rejects it with {backend})")
        import torch._inductor

        modes = sorted(torch._inductor.list_mode_options())
        if mode not in modes:
            raise TorchMagicError(f"--mode {mode!r} is not an inductor mode; use one of "
                                  f"{', '.join(modes)}")
    if runs < 1:
        raise TorchMagicError(f"--runs must be at least 1; got {runs}")
    if explain and (bench or check):
        raise TorchMagicError("--explain traces only (no compiled code): --bench and --check "
                              "need compiled code; drop --explain (or use --backend aot_eager)")
    if fullgraph and (bench or check):
        raise TorchMagicError("--fullgraph reports where fullgraph=True fails; run --bench or "
                              "--check without it")
    if not min_time > 0:
        raise TorchMagicError(f"--min-time must be a positive number of seconds; got {min_time}")


def check_compiler(backend: str, explain: bool) -> None:
    """inductor on a CPU-only machine needs a C++ compiler: refuse in one line when none works."""
    if explain or backend != "inductor" or torch.cuda.is_available():
        return
    from torch._inductor import config as inductor_config

    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # torch before 2.5
        from torch._inductor.codecache import cpp_compiler as get_cpp_compiler
    try:
        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - InvalidCxxCompiler, or a broken compiler
        raise TorchMagicError(_NO_COMPILER.format(cxx=inductor_config.cpp.cxx)) from None


def _meta_refusal(names: Sequence[str], explain: bool) -> None:
    if names and not explain:
        joined = ", ".join(names)
        raise TorchMagicError(f"{joined} live(s) on the meta device: compiled code needs real "
                              "weights to run; --explain shows the graphs and breaks without "
                              "running compiled code (or load weights first)")


# -- errors --------------------------------------------------------------------------------------
def _one_line(text: str, limit: int = 240) -> str:
    first = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return first[:limit]


def _is_compile_error(exc: BaseException) -> bool:
    import torch._dynamo.exc as dexc

    return isinstance(exc, dexc.TorchDynamoException)


def _compiler_missing(exc: BaseException) -> bool:
    from torch._inductor import exc as iexc

    seen = exc
    for _ in range(6):
        if isinstance(seen, (iexc.InvalidCxxCompiler, iexc.CppCompileError)):
            return True
        inner = getattr(seen, "inner_exception", None) or seen.__cause__ or seen.__context__
        if inner is None:
            return False
        seen = inner
    return False


def _compile_failure(exc: BaseException, locator: Locator, backend: str) -> TorchMagicError:
    """A one-line error for an exception raised by dynamo or the backend."""
    import torch._dynamo.exc as dexc

    if isinstance(exc, dexc.BackendCompilerFailed):
        if backend == "inductor" and _compiler_missing(exc):
            from torch._inductor import config as inductor_config

            return TorchMagicError(_NO_COMPILER.format(cxx=inductor_config.cpp.cxx))
        inner = getattr(exc, "inner_exception", None) or exc
        return TorchMagicError(f"the {backend} backend failed: {type(inner).__name__}: "
                               f"{_one_line(str(inner))}; --backend aot_eager (or eager) "
                               "separates dynamo's capture from code generation")
    frames = list(getattr(exc, "real_stack", None) or [])
    where = ""
    if frames:
        place = locator.stack(frames, [])[-1:] if frames else []
        if place:
            where = f" at {place[0].where()}"
    return TorchMagicError(f"torch.compile failed{where}: {type(exc).__name__}: "
                           f"{_one_line(str(exc))}")


def _fullgraph_break(exc: BaseException, locator: Locator, run: int) -> GraphBreak:
    info = parse_reason(str(exc).split("\nfrom user code:")[0])
    frames = list(getattr(exc, "real_stack", None) or [])
    stack = locator.stack(frames, [])
    place = stack[-1] if stack else None
    cell_line = next((p.line for p in reversed(stack) if p.in_cell), None)
    return GraphBreak(1, info["kind"], info["title"], info["explanation"], info["hints"],
                      info["gb_id"], info["url"], place, cell_line, stack, str(exc), 0, run)


# -- the run -------------------------------------------------------------------------------------
@dataclass
class _Setup:
    backend: str
    mode: str | None
    fullgraph: bool
    dynamic: bool | None
    explain: bool
    logs: Any
    runs: int
    bench: bool
    check: bool
    min_time: float


def _metric(name: str = "_compile.compile_inner") -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get(name, [])))


@contextlib.contextmanager
def _check_patch(setup: _Setup) -> Any:
    """With ``check``, inductor draws random numbers like eager (``fallback_random``)."""
    if setup.check and setup.backend == "inductor":
        from torch._inductor import config as inductor_config

        with inductor_config.patch(fallback_random=True):
            yield
    else:
        yield


def _report(setup: _Setup, target: str, kind: str, recorder: Recorder, guards: GuardLog,
            locator: Locator, compile_seconds: float, first_call: float, runs_done: int,
            capture: Any, source: str = "") -> CompileReport:
    first = [g for g in recorder.graphs if g.run == 1]
    count = len(first)
    found = recompiles(guards.failures, locator)
    if all(f.compile_id for f in guards.failures):
        # a recompile of this run is a compile started by a recorded guard failure: compile ids
        # count on from compiles made before the run (the user's own of the same code: 0/2)
        ids = {cid for rc in found for cid in rc.compile_ids}
        for g in recorder.graphs:
            g.recompile = g.compile_id in ids
    report = CompileReport(
        target=target, kind=kind, backend=setup.backend, mode=setup.mode,
        fullgraph=setup.fullgraph, dynamic=setup.dynamic, explain_only=setup.explain,
        runs=runs_done, graph_count=count,
        graph_break_count=len([b for b in recorder.breaks if b.run == 1]),
        graph_breaks=[b for b in recorder.breaks if b.run == 1], graphs=list(recorder.graphs),
        later_graph_breaks=[b for b in recorder.breaks if b.run > 1],
        recompiles=found, compile_seconds=compile_seconds,
        codegen_seconds=None if setup.explain else recorder.codegen_seconds,
        first_call_seconds=first_call, source=source)
    report.logs = {k: v for k, v in capture.by_source().items()
                   if k in (capture.settings or {})}
    report.warnings = [w for w in capture.warnings() if w.strip()]
    if report.later_graph_breaks:
        ends = [str(b.graph) for b in report.later_graph_breaks]
        later = "call 2" if runs_done == 2 else f"calls 2-{runs_done}"
        report.notes.append(f"the Graph breaks list is call 1's, as torch._dynamo.explain counts "
                            f"them; the {len(ends)} graph break{'s' if len(ends) > 1 else ''} of "
                            f"{later} end{'s' if len(ends) == 1 else ''} graph"
                            f"{'s' if len(ends) > 1 else ''} {', '.join(ends)} in the table")
    if any("recompile_limit" in w or "cache_size_limit" in w for w in report.warnings):
        report.notes.append("dynamo hit its recompile limit: later calls of that code ran eagerly "
                            "(torch._dynamo.config.recompile_limit)")
    return report


def explain_compile(target: str | nn.Module | Callable[..., Any], *inputs: Any,
                    args: Any = None, kwargs: Any = None,
                    input_size: Any = None, dtypes: Any = None, batch_dim: int | None = None,
                    calls: Sequence[Any] | None = None,
                    namespace: dict[str, Any] | None = None, name: str | None = None,
                    backend: str = "inductor", mode: str | None = None, fullgraph: bool = False,
                    dynamic: bool | None = None, explain: bool = False, runs: int = 1,
                    bench: bool = False, check: bool = False,
                    logs: str | Sequence[str] | None = None,
                    min_time: float = 0.2) -> CompileReport:
    """Compile ``target`` with ``torch.compile``, run it, and report graphs, breaks, recompiles,
    compile time and (optionally) speed and accuracy. Times in seconds.

    ``target``:

    - a cell: Python source run in ``namespace`` as one compiled function (models it calls are
      traced through). Its assignments land in ``namespace`` when the cell ends, as running the
      cell would; ``report.value`` is its last expression. ``runs=N`` runs the cell N times.
      ``bench``/``check`` rerun it on a copy of the namespace taken before the run, with the
      modules it names replaced by private copies (own buffers, attributes and flags; parameters
      shared, read-only in a forward), printing discarded; they are skipped, with a note, when the
      cell changed parameters, gradients or tensors of the namespace in place (optimizer steps,
      ``backward()``, ``x.add_()``): reruns would repeat that.
    - an ``nn.Module``: its forward on ``inputs`` (as ``torchmagic.summary`` takes them, see
      :func:`torchmagic.core.inputs.prepare_inputs`: tensors, an argument tuple written out, a
      ``Mapping`` of keyword arguments such as a tokenizer's output, ``args``/``kwargs``
      explicitly; or ``input_size`` shapes with ``dtypes`` and ``batch_dim``),
      run on a private copy of the module (parameters shared, buffers and attributes copied), so
      the model is unchanged; ``runs=N`` calls it N times, ``calls`` adds calls with other inputs
      (a shape that changes -> a recompile).
    - a function: called as is with the inputs (its side effects happen on every call).

    ``backend``: a ``torch.compile`` backend (``inductor``; ``aot_eager``/``eager`` isolate
    dynamo from code generation); ``mode``: an inductor mode; ``fullgraph=True`` reports where
    ``torch.compile(fullgraph=True)`` fails instead of raising (nothing runs then);
    ``dynamic``: as ``torch.compile``; ``explain=True``: trace only, no code generation;
    ``logs``: ``TORCH_LOGS`` names (``"graph_breaks,recompiles,guards,output_code"``).

    Raises :class:`TorchMagicError` (one line) for bad options, a missing C++ compiler for
    inductor, a model on the meta device (unless ``explain``), and a failure of dynamo or the
    backend; :class:`ForwardError` when the user's own code raises (the original exception is
    ``.original``; for a model, the failing module and its input shapes are named).
    """
    if not isinstance(runs, int) or isinstance(runs, bool):
        raise TorchMagicError(f"runs must be a whole number; got {runs!r}")
    setup = _Setup(backend, mode, bool(fullgraph), dynamic, bool(explain), logs, runs,
                   bool(bench), bool(check), float(min_time))
    check_options(backend, mode, runs, setup.explain, setup.bench, setup.check, setup.fullgraph,
                  setup.min_time)
    from torchmagic.core.compile_logs import parse_log_settings

    parse_log_settings(logs)  # bad names: refused before anything runs
    if isinstance(target, str):
        if inputs or input_size is not None or calls or args is not None or kwargs is not None:
            raise TorchMagicError("a cell takes no inputs: it reads its names from the namespace")
        if namespace is None:
            raise TorchMagicError("a cell needs a namespace (the dict its names live in)")
        from torchmagic.core.compile_run import run_cell

        with quiet_fake_tensor_log():  # dynamo's failing meta kernels: reported in one line
            return run_cell(setup, target, namespace)
    if isinstance(target, nn.Module) or callable(target):
        from torchmagic.core.compile_run import run_callable

        given = dict(args=args, kwargs=kwargs, input_size=input_size, dtypes=dtypes,
                     batch_dim=batch_dim)
        with quiet_fake_tensor_log():
            return run_callable(setup, target, inputs, given, calls, name)
    raise TorchMagicError(f"explain_compile takes a cell (str), an nn.Module or a function; got "
                          f"{type(target).__name__}")


def speedup_text(timing: CompileTiming) -> str:
    """``"2.31x faster"`` / ``"1.20x slower"`` (eager / compiled)."""
    s = timing.speedup
    if not math.isfinite(s):
        return "-"
    return f"{s:.2f}x faster" if s >= 1 else f"{1 / s:.2f}x slower"


__all__ = ["CompileReport", "CompileTiming", "GraphBreak", "GraphInfo", "OutputDiff", "Place",
           "Recompile", "check_compiler", "check_options", "explain_compile", "speedup_text"]
