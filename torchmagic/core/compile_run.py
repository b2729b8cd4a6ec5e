"""The two runs behind :func:`torchmagic.core.compile.explain_compile`: a cell, and a callable
(a model's forward on a private copy, or a function).

Both compile inside a :class:`~torchmagic.core.compile_sandbox.DynamoSandbox` with a
:class:`~torchmagic.core.compile_graphs.Recorder` backend and a
:class:`~torchmagic.core.compile_recompiles.GuardLog`, capture torch's logs, run the calls, then
(optionally) time and check eager against compiled on copies, and build the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core.compile import (
    CompileReport,
    _check_patch,
    _compile_failure,
    _fullgraph_break,
    _is_compile_error,
    _meta_refusal,
    _metric,
    _report,
    _Setup,
    check_compiler,
)
from torchmagic.core.compile_cell import UNBOUND, cell_function, modules_named, shared_twins
from torchmagic.core.compile_graphs import GraphBreak, Locator, Recorder, inner_backend
from torchmagic.core.compile_logs import captured_logs
from torchmagic.core.compile_recompiles import GuardLog
from torchmagic.core.compile_sandbox import DynamoSandbox, counters_copy
from torchmagic.core.compile_timing import OutputDiff, compare_outputs, quiet, time_pair
from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.state import GlobalState, preserved_global_state
from torchmagic.core.twin import is_meta_model


def _unsupported(exc: BaseException) -> bool:
    import torch._dynamo.exc as dexc

    return isinstance(exc, dexc.Unsupported)


def _gave_up(before: dict[str, Any]) -> list[str]:
    """First lines of what dynamo could not handle during the run (its ``unimplemented``
    counter), for a run that captured no graph."""
    import torch._dynamo.utils as dutils

    now = dutils.counters.get("unimplemented", {})
    old = before.get("unimplemented", {})
    return [str(k).splitlines()[0] for k in now if k not in old][:3]


def _no_graph_note(report: CompileReport, gave_up: list[str]) -> None:
    if report.graph_count or report.fullgraph_error is not None:
        return
    note = ("dynamo captured no graph, so everything ran eagerly: the code does no tensor work "
            "dynamo could capture, or dynamo skipped it")
    if gave_up:
        note += "; it gave up on: " + "; ".join(gave_up)
    report.notes.append(note)


def _scopes(modules: Any, extra: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Globals of the code dynamo will compile: ``extra`` (a cell's namespace, a function's
    globals) and those of every method of the modules' classes."""
    out: list[dict[str, Any]] = [] if extra is None else [extra]
    seen = {id(extra)}
    classes = {type(m) for mod in modules for m in mod.modules()}
    for cls in classes:
        for klass in cls.__mro__:
            if klass is nn.Module or klass is object:
                break
            for attr in vars(klass).values():
                scope = getattr(getattr(attr, "__func__", attr), "__globals__", None)
                if isinstance(scope, dict) and id(scope) not in seen:
                    seen.add(id(scope))
                    out.append(scope)
    return out


def _backend(setup: _Setup) -> Any:
    return None if setup.explain else inner_backend(setup.backend, setup.mode, setup.dynamic)


# -- a cell --------------------------------------------------------------------------------------
def _in_place_changes(watched: list[Any]) -> list[str]:
    from torchmagic.core.bench import changes

    # buffers and train/eval flags belong to modules, which reruns replace by private copies
    return changes([w for w in watched if w[1] not in ("buffer", "mode")])


def _cell_outputs(cf: Any, value: Any, values: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cf.cell.last_expr is not None:
        out["out"] = value
    for name, v in zip(cf.names, values):
        if v is not UNBOUND and not isinstance(v, (nn.Module, type)) and not callable(v):
            out[name] = v
    return out


def run_cell(setup: _Setup, source: str, ns: dict[str, Any]) -> CompileReport:
    """Compile and run a cell in ``ns`` (see ``explain_compile``)."""
    __tracebackhide__ = True

    cf = cell_function(source)
    refs = list(dict.fromkeys([*cf.reads, *cf.names]))
    mods = modules_named(ns, refs)
    _meta_refusal([n for n, m in mods.items() if is_meta_model(m)], setup.explain)
    check_compiler(setup.backend, setup.explain)
    locator = Locator(mods, cf.filename, source)
    recorder = Recorder(_backend(setup), locator)
    guards = GuardLog(locator)
    try:
        return _run_cell(setup, source, ns, cf, refs, mods, locator, recorder, guards)
    finally:
        recorder.release()  # also on failure: nothing of the run stays referenced


def _run_cell(setup: _Setup, source: str, ns: dict[str, Any], cf: Any, refs: list[str],
              mods: dict[str, nn.Module], locator: Locator, recorder: Recorder,
              guards: GuardLog) -> CompileReport:
    __tracebackhide__ = True
    from torchmagic.core.bench import cell_error, watch

    rerun = setup.bench or setup.check
    watched = watch({n: ns[n] for n in refs if n in ns}) if rerun else []
    ns_copy = dict(ns) if rerun else {}
    before_run = GlobalState.capture() if setup.check else None
    value: Any = None
    first: tuple[Any, Sequence[Any]] | None = None
    first_call = 0.0
    runs_done = 0
    fg_error: GraphBreak | None = None
    timing = None
    diffs: list[OutputDiff] | None = None
    skipped = None
    with DynamoSandbox() as sandbox, captured_logs(setup.logs) as capture, _check_patch(setup):
        sandbox.codes.append(cf.code)
        sandbox.keep.update(cf.names)
        for scope in _scopes(mods.values(), ns):
            sandbox.watch_scope(scope)
        counters = counters_copy()
        compiled = sandbox.compile(cf.function(ns), recorder, fullgraph=setup.fullgraph,
                                   dynamic=setup.dynamic, guard_fail_fn=guards)
        start = _metric()
        for run in range(1, setup.runs + 1):
            recorder.run = guards.run = run
            t0 = time.perf_counter()
            try:
                value, values = compiled(*cf.arguments(ns))
            except Exception as exc:  # noqa: BLE001 - sorted below; KeyboardInterrupt passes
                if setup.fullgraph and _unsupported(exc):
                    fg_error = _fullgraph_break(exc, locator, run)
                    break
                if _is_compile_error(exc):
                    raise _compile_failure(exc, locator, setup.backend) from None
                raise cell_error(exc, cf.cell, ns) from None
            if run == 1:
                first_call = time.perf_counter() - t0
                first = (value, values)
            cf.write_back(ns, values)
            runs_done = run
        compile_seconds = _metric() - start
        gave_up = _gave_up(counters)
        recorder.recording = guards.recording = False
        if rerun and fg_error is None and first is not None:
            changed = _in_place_changes(watched)
            if changed:
                skipped = ("--bench/--check skipped: the cell changed " + "; ".join(changed)
                           + " in place, and rerunning it would change them again (time or "
                           "check side-effect-free code, or use %compile MODEL INPUTS)")
            else:
                try:
                    ns_copy.update(shared_twins(modules_named(ns_copy, refs)))
                except TorchMagicError as exc:
                    skipped = f"--bench/--check skipped: {exc}"
            if skipped is None:
                fn_copy = cf.function(ns_copy)
                compiled_copy = sandbox.compile(fn_copy, recorder, dynamic=setup.dynamic)

                def eager() -> Any:
                    return fn_copy(*cf.arguments(ns_copy))

                def compiled_run() -> Any:
                    return compiled_copy(*cf.arguments(ns_copy))

                with preserved_global_state(), quiet():
                    try:
                        if setup.check and before_run is not None:
                            before_run.restore()
                            e_value, e_values = eager()
                            diffs = compare_outputs(_cell_outputs(cf, e_value, e_values),
                                                    _cell_outputs(cf, *first), name="")
                            diffs = [_strip_name(d) for d in diffs]
                        if setup.bench:
                            timing = time_pair(eager, compiled_run, min_time=setup.min_time,
                                               first_call_seconds=first_call)
                    except Exception as exc:  # noqa: BLE001 - a rerun failed: say so, keep the report
                        skipped = (f"--bench/--check stopped: rerunning the cell raised "
                                   f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
                if recorder.extra_graphs and timing is not None:
                    timing.warnings.append("the rerun on copies compiled its own graphs first "
                                           "(warm-up calls, not timed)")
    report = _report(setup, "cell", "cell", recorder, guards, locator, compile_seconds, first_call,
                     runs_done, capture, source)
    return _finish(report, value, timing, diffs, skipped, fg_error, "the cell did not run",
                   gave_up, sandbox)


def _finish(report: CompileReport, value: Any, timing: Any, diffs: Any, skipped: str | None,
            fg_error: GraphBreak | None, not_run: str, gave_up: list[str],
            sandbox: DynamoSandbox) -> CompileReport:
    report._value = value
    report.timing = timing
    report.check = diffs
    report.skipped = skipped
    report.fullgraph_error = fg_error
    if fg_error is not None:
        report.notes.append(f"torch.compile(fullgraph=True) fails before running anything: "
                            f"{not_run} (drop --fullgraph to see every graph break)")
    _no_graph_note(report, gave_up)
    if sandbox.kept or (sandbox.invalidated and not sandbox.regions):
        report.notes.append(f"torch {torch.__version__} has no isolated compile caches (2.12+): "
                            f"{sandbox.invalidated + sandbox.kept} compiled entries of this run "
                            "stay as dead slots in code you compiled yourself and count towards "
                            "its recompile_limit")
    return report


def _strip_name(diff: OutputDiff) -> OutputDiff:
    name = diff.name
    if name.startswith("['") and "']" in name:
        key, rest = name[2:].split("']", 1)
        diff.name = key + rest
    return diff


# -- a model or a function ------------------------------------------------------------------------
def _clone_inputs(obj: Any) -> Any:
    """Copies of the input tensors (a forward that changes its input in place must not change
    the user's), keeping ``torch._dynamo.mark_dynamic`` markings."""
    import torch._dynamo.utils as dutils
    from torch.utils._pytree import tree_map

    copy_marks = getattr(dutils, "copy_dynamo_tensor_attributes", None)

    def clone(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            with torch.no_grad():
                c = t.detach().clone()
            if t.is_leaf and t.requires_grad:
                c.requires_grad_(True)
            if copy_marks is not None:
                copy_marks(t, c)
            return c
        return t

    return tree_map(clone, obj)


def _describe_forward_failure(model: nn.Module, name: str, args: tuple[Any, ...],
                              kwargs: dict[str, Any]) -> ForwardError | None:
    """Rerun the forward eagerly on a fresh copy: if it fails too, the user's forward is broken
    (a :class:`ForwardError` naming the module and its inputs); None when eager works."""
    from torchmagic.core.tracing import ModuleTracer, describe_failure, trace_modules

    twin = shared_twins({name: model})[name]
    tracer = ModuleTracer({name: twin})
    try:
        with preserved_global_state(), trace_modules(tracer):
            twin(*_clone_inputs(args), **_clone_inputs(kwargs))
    except Exception as exc:  # noqa: BLE001 - the user's forward failed
        call = tracer.failing_call
        module = tracer.module_of(call) if call is not None else None
        return ForwardError(f"{name}'s forward raised {type(exc).__name__}: "
                            f"{describe_failure(call, exc, module)}", original=exc,
                            module_path=call.path if call else None,
                            module_class=call.cls if call else None)
    return None


def run_callable(setup: _Setup, target: nn.Module | Callable[..., Any],
                 inputs: tuple[Any, ...], given: dict[str, Any],
                 calls: Sequence[Any] | None, name: str | None) -> CompileReport:
    """Compile and call a model's forward (on a private copy) or a function; ``given``: the
    keyword arguments of :func:`~torchmagic.core.inputs.prepare_inputs` (``args``, ``kwargs``,
    ``input_size``, ``dtypes``, ``batch_dim``)."""
    from torchmagic.core.isolation import importable_globals

    with importable_globals():  # dynamo resolves an inlined hook's globals by module name
        return _compile_callable(setup, target, inputs, given, calls, name)


def _compile_callable(setup: _Setup, target: nn.Module | Callable[..., Any],
                      inputs: tuple[Any, ...], given: dict[str, Any],
                      calls: Sequence[Any] | None, name: str | None) -> CompileReport:
    from torchmagic.core.inputs import has_inputs, is_shape, prepare_inputs

    is_module = isinstance(target, nn.Module)
    label = name or (type(target).__name__.lower() if is_module else
                     getattr(target, "__name__", "fn"))
    if not has_inputs(inputs, given["input_size"], given["args"], given["kwargs"]):
        raise TorchMagicError(f"give the inputs to call {label} with: tensors, a tuple of "
                              "arguments, a dict of keyword arguments, or shapes like (1,3,32,32)")
    owner = target if is_module else nn.Module()
    if is_module and is_meta_model(target):
        _meta_refusal([label], setup.explain)
    prepared = [prepare_inputs(owner, *inputs, **given)]
    prepared = prepared * setup.runs
    for extra in calls or []:
        if is_shape(extra) or (isinstance(extra, list) and extra and all(map(is_shape, extra))):
            prepared.append(prepare_inputs(owner, input_size=extra, dtypes=given["dtypes"],
                                           batch_dim=given["batch_dim"]))
        else:
            prepared.append(prepare_inputs(owner, extra))
    check_compiler(setup.backend, setup.explain)
    with preserved_global_state() as entry_state:
        fn: Any = shared_twins({label: target})[label] if is_module else target
        locator = Locator({label: fn} if is_module else {})
        recorder = Recorder(_backend(setup), locator)
        guards = GuardLog(locator)
        try:
            return _run_callable(setup, target, fn, label, prepared, entry_state, locator,
                                 recorder, guards)
        finally:
            recorder.release()  # also on failure: nothing of the run stays referenced


def _run_callable(setup: _Setup, target: Any, fn: Any, label: str, prepared: list[Any],
                  entry_state: GlobalState, locator: Locator, recorder: Recorder,
                  guards: GuardLog) -> CompileReport:
    is_module = isinstance(target, nn.Module)
    output: Any = None
    first_output: Any = None
    first_call = 0.0
    runs_done = 0
    fg_error = None
    timing = None
    diffs = None
    with DynamoSandbox() as sandbox, captured_logs(setup.logs) as capture, _check_patch(setup):
        for scope in _scopes([fn] if is_module else [], getattr(fn, "__globals__", None)):
            sandbox.watch_scope(scope)
        counters = counters_copy()
        compiled = sandbox.compile(fn, recorder, fullgraph=setup.fullgraph,
                                   dynamic=setup.dynamic, guard_fail_fn=guards)
        start = _metric()
        for run, p in enumerate(prepared, start=1):
            recorder.run = guards.run = run
            args, kwargs = _clone_inputs((p.args, p.kwargs))
            t0 = time.perf_counter()
            try:
                output = compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - sorted below
                if setup.fullgraph and _unsupported(exc):
                    fg_error = _fullgraph_break(exc, locator, run)
                    break
                if is_module:
                    failure = _describe_forward_failure(target, label, p.args, p.kwargs)
                    if failure is not None:
                        raise failure from None
                if _is_compile_error(exc):
                    raise _compile_failure(exc, locator, setup.backend) from None
                raise ForwardError(f"{label} raised {type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:200]}", original=exc) from None
            if run == 1:
                first_call = time.perf_counter() - t0
                first_output = output
            runs_done = run
        compile_seconds = _metric() - start
        gave_up = _gave_up(counters)
        recorder.recording = guards.recording = False
        if (setup.bench or setup.check) and fg_error is None:
            p = prepared[0]
            eager_fn: Any = shared_twins({label: target})[label] if is_module else target
            e_args, e_kwargs = _clone_inputs((p.args, p.kwargs))
            c_args, c_kwargs = _clone_inputs((p.args, p.kwargs))
            with quiet():
                if setup.check:
                    entry_state.restore()  # the RNG and settings of the first compiled call
                    diffs = compare_outputs(eager_fn(*e_args, **e_kwargs), first_output)
                if setup.bench:
                    timing = time_pair(lambda: eager_fn(*e_args, **e_kwargs),
                                       lambda: compiled(*c_args, **c_kwargs),
                                       min_time=setup.min_time, first_call_seconds=first_call)
    report = _report(setup, label, "module" if is_module else "function", recorder, guards,
                     locator, compile_seconds, first_call, runs_done, capture)
    return _finish(report, output, timing, diffs, None, fg_error, f"{label} did not run",
                   gave_up, sandbox)


__all__ = ["run_callable", "run_cell"]
