"""Find where a NaN or Inf was born: forward op, module, cell line; and the backward node that failed.

torch's ``detect_anomaly(check_nan=True)`` only sees non-finite values produced in backward, and a
forward NaN whose gradient is finite (``torch.log(-x).sum().backward()``) passes silently. This module
checks both halves:

- Forward: a ``TorchDispatchMode`` checks every floating output of every op (module code, functional
  code between modules and plain code in the cell alike). The *origin* is the first op that produced a
  non-finite value its inputs did not hold (the report says what they held: finite values, or an Inf
  that became a NaN); the checker's own reductions are never taken for ops. It is attributed to the innermost running module (global module
  hooks, :mod:`torchmagic.core.tracing`), named after the variable that holds it (``mlp.2``), and to the
  cell line (the Python stack is read only when something non-finite shows up). After the origin, the
  modules whose outputs became non-finite are the *spread*. An op given an explicit ``±inf`` scalar
  (``masked_fill(mask, -inf)``, ``torch.full(.., -inf)``) writes an attention mask on purpose: its Inf is
  counted as a mask, not an anomaly (a NaN that follows from it still is one).
  On CPU a check is one reduction (``t.sum()`` is finite only if every element is) and a host read;
  on CUDA the per-op counts stay on the device and are read once when the block ends.
- Backward: anomaly mode with ``check_nan=True`` names the failing autograd node (``SqrtBackward0``);
  the forward traceback torch attaches to its warning is trimmed to the user's own frames (cell line
  or user file). Infinite gradients, which anomaly mode does not check, are found by the same dispatch
  mode (the node comes from ``torch._C._current_autograd_node()``).

Anomaly mode belongs to the user: a cell that calls ``torch.autograd.set_detect_anomaly(True)`` (or
enters and leaves ``detect_anomaly()``) ends with the setting it asked for, as a plain cell would;
while the check runs, the cell sees and sets its own setting (torch's anomaly getters and setter are
routed to it), the check keeps anomaly mode on underneath.

Entry points: :func:`find_anomaly` (``find_anomaly(fn)`` returns an :class:`AnomalyReport`; with no
function it is a context manager, :class:`AnomalyDetector`, whose ``.report`` is set on exit).
Only what this module touches is restored on exit (anomaly mode, warnings filters, the dispatch mode
and the global module hooks): the user's code runs for real and may change anything else.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from types import TracebackType
from typing import Any, overload

import torch
import torch.nn as nn

from torchmagic.core.anomaly_check import _Checker, _Tracer
from torchmagic.core.anomaly_report import (
    AnomalyReport,
    BackwardFinding,
    Frame,
    OpEvent,
    SpreadEntry,
    is_library,
    module_names,
    names_of,
    parse_forward_trace,
    source_line,
)
from torchmagic.core.errors import TorchMagicError
from torchmagic.core.tracing import trace_modules

_ANOMALY_NAN_RE = re.compile(r"Function '(\w+)' returned nan values in its (\d+)th output")
_ANOMALY_WARN_RE = re.compile(r"Error detected in (\w+)\. Traceback of forward call that caused "
                              r"the error:\n(.*)", re.S)
_ANOMALY_ENABLED_MSG = "Anomaly Detection has been enabled"


# -- the detector -----------------------------------------------------------------------------------
class AnomalyDetector:
    """Context manager: check the block for NaN/Inf; ``.report`` is an :class:`AnomalyReport` after it.

    ``namespace`` names modules (``{"mlp": mlp}`` -> ``mlp.2``); ``cell_filename`` is the filename of a
    compiled cell (:func:`torchmagic.core.execution.compile_cell`) whose lines the report cites.
    The RuntimeError that anomaly mode raises in backward is turned into the report (not propagated);
    any other exception propagates unchanged after the report is built. On KeyboardInterrupt
    everything is restored and no report is built.
    """

    def __init__(self, namespace: Mapping[str, Any] | None = None, *, cell_filename: str | None = None,
                 forward: bool = True, backward: bool = True, first: int = 1) -> None:
        if not forward and not backward:
            raise TorchMagicError("nothing to check: --no-forward and --no-backward together turn "
                                  "off both halves; drop one of them")
        if not isinstance(first, int) or first < 1:
            raise TorchMagicError(f"--first must be a positive whole number; got {first!r}")
        self.namespace = namespace
        self.cell_filename = cell_filename
        self.check_forward = forward
        self.check_backward = backward
        self.first = first
        self.report: AnomalyReport | None = None
        self.tracer: _Tracer | None = None
        self._stack: ExitStack | None = None
        self._warnings: list[warnings.WarningMessage] = []
        self._checker: _Checker | None = None
        self._roots: dict[str, nn.Module] = {}

    def __enter__(self) -> AnomalyDetector:
        if self._stack is not None:
            raise TorchMagicError("this detector is already running; use a new find_anomaly()")
        stack = ExitStack()
        try:
            self._warnings = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            if self.check_backward:
                stack.enter_context(_UserAnomalyMode())
            self._roots = module_names(self.namespace)
            self._checker = _Checker(self)
            self.tracer = _Tracer(self._roots, self._checker.module_output)
            stack.enter_context(trace_modules(self.tracer))
            stack.enter_context(self._checker)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        stack, self._stack = self._stack, None
        assert stack is not None
        try:
            stack.close()   # dispatch mode, module hooks, warnings filters, anomaly mode
        finally:
            recorded = list(self._warnings)
            self._warnings = []
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._reemit(recorded)
            return False
        anomaly_error = isinstance(exc, RuntimeError) and bool(_ANOMALY_NAN_RE.search(str(exc)))
        try:
            self.report = self._build(recorded, exc if not anomaly_error else None, tb,
                                      exc if anomaly_error else None)
        finally:
            self._reemit(recorded)
        return anomaly_error

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _is_anomaly_warning(w: warnings.WarningMessage) -> bool:
        msg = str(w.message)
        return msg.startswith(_ANOMALY_ENABLED_MSG) or bool(_ANOMALY_WARN_RE.match(msg))

    def _reemit(self, recorded: list[warnings.WarningMessage]) -> None:
        """Give the user's own warnings back to the user's filters."""
        for w in recorded:
            if self._is_anomaly_warning(w):
                continue
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)

    def _build(self, recorded: list[warnings.WarningMessage], user_exc: BaseException | None,
               tb: TracebackType | None, anomaly_exc: BaseException | None) -> AnomalyReport:
        checker = self._checker
        assert checker is not None and self.tracer is not None
        checker.resolve_device()
        device = ", ".join(sorted(checker.devices)) or "cpu"
        rep = AnomalyReport(forward_checked=self.check_forward,
                            backward_checked=self.check_backward, device=device,
                            forward_ops=checker.count_fwd, backward_ops=checker.count_bwd,
                            first=self.first)
        # Names: modules bound before the block, then those the block itself assigned.
        names = names_of(self._roots)
        for k, v in names_of(module_names(self.namespace)).items():
            names.setdefault(k, v)
        paths: dict[int, tuple[str, str]] = {}
        for call in self.tracer.calls:
            mod = self.tracer.module_of(call)
            path = names.get(id(mod), call.path) if mod is not None else call.path
            paths[call.index] = (path, call.cls)
        fwd = [e for e in checker.events if e.phase == "forward"]
        for e in checker.events:
            if e._call is not None and e._call in paths:
                e.module_path, e.module_class = paths[e._call]
        rep.masks = sum(1 for e in fwd if e.explicit_inf and not e.nan and not e.input_nan
                        and not e.input_inf)
        rep.nonfinite_ops = len(fwd)
        births = [e for e in fwd if e.born]
        rep.births_total = len(births)
        rep.births = births[: self.first]
        if births:
            rep.origin, rep.origin_kind = births[0], "born"
        else:
            with_nan = [e for e in fwd if e.nan]
            first_mask = next((e.index for e in fwd if e.explicit_inf), None)
            with_inf = [e for e in fwd if e.inf and not e.explicit_inf
                        and (first_mask is None or e.index < first_mask)]
            pick = with_nan[0] if with_nan else (with_inf[0] if with_inf else None)
            if pick is not None:
                rep.origin, rep.origin_kind = pick, "input"
        if rep.origin is not None:
            spread: dict[str, SpreadEntry] = {}
            for idx, seq, nan, inf, shapes in checker.module_events:
                if seq <= rep.origin.index:
                    continue
                path, cls = paths.get(idx, ("?", "?"))
                if path in spread:
                    spread[path].calls += 1
                else:
                    spread[path] = SpreadEntry(path, cls, 1, nan, inf, shapes)
            rep.spread = list(spread.values())
        rep.backward = self._backward(checker, recorded, anomaly_exc)
        if user_exc is not None:
            msg = " ".join(str(user_exc).split())
            rep.error = f"{type(user_exc).__name__}: {msg}" if msg else type(user_exc).__name__
            rep.error_line = self._error_line(tb)
        return rep

    def _error_line(self, tb: TracebackType | None) -> Frame | None:
        import traceback

        found = None
        for frame, lineno in traceback.walk_tb(tb):
            fn = frame.f_code.co_filename
            if fn == self.cell_filename:
                found = Frame(fn, lineno, frame.f_code.co_name, source_line(fn, lineno), True)
            elif found is None and not is_library(fn):
                found = Frame(fn, lineno, frame.f_code.co_name, source_line(fn, lineno))
        return found

    def _backward(self, checker: _Checker, recorded: list[warnings.WarningMessage],
                  anomaly_exc: BaseException | None) -> BackwardFinding | None:
        if not self.check_backward:
            return None
        bwd = [e for e in checker.events if e.phase == "backward"]
        if anomaly_exc is not None:
            m = _ANOMALY_NAN_RE.search(str(anomaly_exc))
            assert m is not None
            node, idx = m.group(1), int(m.group(2))
            trace: list[Frame] = []
            for w in reversed(recorded):
                wm = _ANOMALY_WARN_RE.match(str(w.message))
                if wm and wm.group(1) == node:
                    trace = parse_forward_trace(wm.group(2), self.cell_filename)
                    break
            ev = next((e for e in bwd if e.node == node and e.nan), None)
            if not trace and ev is not None:
                trace = ev.forward_trace
            return BackwardFinding(node=node, kind="NaN", message=" ".join(str(anomaly_exc).split()),
                                   output_index=idx, op=ev.op if ev else None,
                                   forward_trace=trace, raised=True)
        born = [e for e in bwd if e.born]
        if not born:
            return None
        ev = born[0]
        kind = "NaN" if ev.nan else "Inf"
        msg = (f"{ev.node} produced {ev.nan or ev.inf} {kind} gradient value"
               f"{'s' * ((ev.nan or ev.inf) != 1)} from {ev.inputs_held} ({ev.op})")
        return BackwardFinding(node=ev.node or "?", kind=kind, message=msg, op=ev.op,
                               forward_trace=ev.forward_trace)


class _UserAnomalyMode:
    """Anomaly mode on (with ``check_nan``) for the check, while the user's code sees and sets its
    own setting: ``torch.is_anomaly_enabled`` / ``is_anomaly_check_nan_enabled`` /
    ``set_anomaly_enabled`` (what ``set_detect_anomaly`` and ``detect_anomaly`` call) are routed to
    a record of the user's setting; on exit the real setting becomes that record (what a plain
    cell would have left)."""

    _NAMES = ("is_anomaly_enabled", "is_anomaly_check_nan_enabled", "set_anomaly_enabled")

    def __enter__(self) -> _UserAnomalyMode:
        import torch.overrides

        torch.overrides.get_ignored_functions()  # cached now, with torch's own functions
        self.user = [torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()]
        self.saved = {n: getattr(torch, n) for n in self._NAMES}
        real_set = self.saved["set_anomaly_enabled"]
        user = self.user

        def is_anomaly_enabled() -> bool:
            return user[0]

        def is_anomaly_check_nan_enabled() -> bool:
            return user[1]

        def set_anomaly_enabled(enabled: bool, check_nan: bool = True) -> None:
            user[0], user[1] = bool(enabled), bool(check_nan)

        self.routed = {"is_anomaly_enabled": is_anomaly_enabled,
                       "is_anomaly_check_nan_enabled": is_anomaly_check_nan_enabled,
                       "set_anomaly_enabled": set_anomaly_enabled}
        real_set(True, True)
        for name, fn in self.routed.items():
            setattr(torch, name, fn)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self._NAMES:
            if getattr(torch, name) is self.routed[name]:  # not replaced again meanwhile
                setattr(torch, name, self.saved[name])
        self.saved["set_anomaly_enabled"](self.user[0], self.user[1])


@overload
def find_anomaly(fn: None = None, *, namespace: Mapping[str, Any] | None = None,
                 forward: bool = True, backward: bool = True, first: int = 1,
                 cell_filename: str | None = None) -> AnomalyDetector: ...


@overload
def find_anomaly(fn: Callable[[], Any], *, namespace: Mapping[str, Any] | None = None,
                 forward: bool = True, backward: bool = True, first: int = 1,
                 cell_filename: str | None = None) -> AnomalyReport: ...


def find_anomaly(fn: Callable[[], Any] | None = None, *, namespace: Mapping[str, Any] | None = None,
                 forward: bool = True, backward: bool = True, first: int = 1,
                 cell_filename: str | None = None) -> AnomalyReport | AnomalyDetector:
    """Run ``fn()`` and report where NaN/Inf first appeared in forward and backward.

    ``find_anomaly(step)`` returns an :class:`AnomalyReport` (``str(report)`` for text,
    ``report.to_dict()`` for data). ``fn``'s own exception is re-raised unchanged after the checks
    are undone; the RuntimeError torch's anomaly mode raises in backward becomes part of the report
    instead. ``with find_anomaly() as found: ...`` checks a block; ``found.report`` is set after it,
    also when the block raised (the exception still propagates). Modules are named after the variables that hold them in
    ``namespace`` (default: ``fn``'s globals and closure, and the caller's locals).
    """
    if fn is None:
        if namespace is None:
            caller = sys._getframe(1)
            namespace = {**caller.f_globals, **caller.f_locals}
        return AnomalyDetector(namespace, cell_filename=cell_filename, forward=forward,
                               backward=backward, first=first)
    if not callable(fn):
        raise TorchMagicError(f"find_anomaly needs a function to call (e.g. lambda: step()); "
                              f"got {type(fn).__name__}")
    if namespace is None:
        caller = sys._getframe(1)
        namespace = {**getattr(fn, "__globals__", {}), **caller.f_globals, **caller.f_locals}
        closure = getattr(fn, "__closure__", None) or ()
        for name, cell in zip(getattr(getattr(fn, "__code__", None), "co_freevars", ()), closure):
            try:
                namespace[name] = cell.cell_contents
            except ValueError:
                pass
    det = AnomalyDetector(namespace, cell_filename=cell_filename, forward=forward,
                          backward=backward, first=first)
    with det:
        fn()
    assert det.report is not None
    return det.report


__all__ = ["AnomalyDetector", "AnomalyReport", "BackwardFinding", "Frame", "OpEvent",
           "SpreadEntry", "find_anomaly", "module_names", "parse_forward_trace"]

