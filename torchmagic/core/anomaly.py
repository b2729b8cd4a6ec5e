"""Find where a NaN or Inf was born: forward op, module, cell line; and the backward node that failed.

torch's ``detect_anomaly(check_nan=True)`` only sees non-finite values produced in backward, and a
forward NaN whose gradient is finite (``torch.log(-x).sum().backward()``) passes silently. This module
checks both halves:

- Forward: a ``TorchDispatchMode`` checks every floating output of every op (module code, functional
  code between modules and plain code in the cell alike). The *origin* is the first op that produced a
  non-finite value from finite inputs; it is attributed to the innermost running module (global module
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

Entry points: :func:`find_anomaly` (``find_anomaly(fn)`` returns an :class:`AnomalyReport`; with no
function it is a context manager, :class:`AnomalyDetector`, whose ``.report`` is set on exit).
Only what this module touches is restored on exit (anomaly mode, warnings filters, the dispatch mode
and the global module hooks): the user's code runs for real and may change anything else.
"""

from __future__ import annotations

import math
import re
import sys
import sysconfig
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, overload

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from torchmagic.core._result import Result
from torchmagic.core.errors import TorchMagicError
from torchmagic.core.tracing import ModuleCall, ModuleTracer, tensor_shapes, trace_modules

# Ops whose output memory is uninitialised (may hold NaN garbage) or that only reshape metadata.
_SKIP_OPS = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_",
    "resize_as_", "set_", "_local_scalar_dense", "detach", "alias", "lift_fresh",
    "isnan", "isinf", "isfinite", "_is_any_true", "_is_all_true",
}
# In-place ops whose previous content does not matter (it is overwritten).
_OVERWRITE_OPS = {
    "copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "set_",
}
_ANOMALY_NAN_RE = re.compile(r"Function '(\w+)' returned nan values in its (\d+)th output")
_ANOMALY_WARN_RE = re.compile(r"Error detected in (\w+)\. Traceback of forward call that caused "
                              r"the error:\n(.*)", re.S)
_FRAME_RE = re.compile(r'^\s*File "(.+)", line (\d+), in (.+)$')
_ANOMALY_ENABLED_MSG = "Anomaly Detection has been enabled"
_LIBRARY_PARTS = ("/torch/", "/torchmagic/", "/IPython/", "/ipykernel/", "/traitlets/",
                  "/tornado/", "/zmq/", "/jupyter_client/", "/_pytest/", "/pluggy/")
_STDLIB = tuple(p.replace("\\", "/") for p in {sysconfig.get_paths().get("stdlib", "@"),
                                               sysconfig.get_paths().get("platstdlib", "@")})


# -- results --------------------------------------------------------------------------------------
@dataclass
class Frame:
    """One line of user code: a cell line (``cell=True``) or a line in a user file."""

    filename: str
    line: int
    function: str
    source: str
    cell: bool = False

    def label(self) -> str:
        if self.cell:
            return f"cell line {self.line}"
        name = self.filename.replace("\\", "/").rsplit("/", 1)[-1]
        return f"{name}:{self.line} in {self.function}"


@dataclass
class OpEvent:
    """An op whose floating output held NaN or Inf."""

    index: int                           # op number in the run (0-based, forward and backward)
    op: str                              # "aten.log"
    phase: str                           # "forward" or "backward"
    nan: int                             # NaN count in the outputs
    inf: int                             # Inf count in the outputs
    input_nan: bool                      # some floating input already held NaN
    input_inf: bool                      # some floating input already held Inf
    explicit_inf: bool                   # the op was given a ±inf scalar (a mask)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    module_path: str | None = None       # innermost running module ("mlp.2"), None outside modules
    module_class: str | None = None
    node: str | None = None              # autograd node running it (backward)
    cell_line: Frame | None = None       # the cell line running when it happened
    where: Frame | None = None           # innermost user frame (e.g. a forward in a user file)
    forward_trace: list[Frame] = field(default_factory=list)  # backward: forward line(s) of node
    _call: int | None = None             # index of the module call (resolved to a name at the end)

    @property
    def born(self) -> bool:
        """True when this op turned finite inputs into NaN/Inf (an Inf from a mask does not count)."""
        if self.nan and not self.input_nan:
            return True
        return bool(self.inf and not self.input_nan and not self.input_inf
                    and not self.explicit_inf)


@dataclass
class SpreadEntry:
    """A module whose output became non-finite after the origin."""

    module_path: str
    module_class: str
    calls: int
    nan: int
    inf: int
    output_shapes: list[tuple[int, ...]]


@dataclass
class BackwardFinding:
    """The autograd node that produced NaN/Inf gradients, and the forward line that created it."""

    node: str                            # "SqrtBackward0"
    kind: str                            # "NaN" or "Inf"
    message: str                         # torch's message, or ours for Inf gradients
    output_index: int | None = None
    op: str | None = None                # the aten op inside the node (from the dispatch check)
    forward_trace: list[Frame] = field(default_factory=list)  # user frames, outermost first
    raised: bool = False                 # anomaly mode raised (the cell stopped at backward)

    @property
    def forward_line(self) -> Frame | None:
        """The innermost user frame of the forward call that created the node."""
        return self.forward_trace[-1] if self.forward_trace else None

    @property
    def cell_line(self) -> Frame | None:
        cells = [f for f in self.forward_trace if f.cell]
        return cells[-1] if cells else None


@dataclass
class AnomalyReport(Result):
    """What ``find_anomaly`` / ``%%detect_anomaly`` found."""

    _display_module: ClassVar[str] = "torchmagic.display.anomaly"

    forward_checked: bool
    backward_checked: bool
    device: str = "cpu"
    forward_ops: int = 0                 # forward ops whose outputs were checked
    backward_ops: int = 0                # backward ops checked
    origin: OpEvent | None = None
    origin_kind: str | None = None       # "born" (from finite inputs) or "input" (already there)
    births: list[OpEvent] = field(default_factory=list)  # first N ops where NaN/Inf was born
    births_total: int = 0
    nonfinite_ops: int = 0               # forward ops with a NaN/Inf output
    spread: list[SpreadEntry] = field(default_factory=list)
    masks: int = 0                       # ops that wrote an explicit ±inf (masks, not anomalies)
    backward: BackwardFinding | None = None
    error: str | None = None             # the user's own exception (re-raised by callers)
    error_line: Frame | None = None
    first: int = 1

    @property
    def clean(self) -> bool:
        return self.origin is None and self.backward is None

    @property
    def summary(self) -> str:
        """One line: the verdict."""
        if self.clean:
            halves = [h for h, on in (("forward", self.forward_checked),
                                      ("backward", self.backward_checked)) if on]
            counts = f"checked {_ops(self.forward_ops, 'forward')}" if self.forward_checked \
                else "forward not checked"
            if self.backward_checked:
                counts += f", {_ops(self.backward_ops, 'backward')}" if self.backward_ops else \
                    "; no backward ran"
            else:
                counts += "; backward not checked"
            if self.masks:
                counts += f"; {self.masks} ±inf mask{'s' * (self.masks != 1)} ignored"
            return f"no NaN/Inf in {' or '.join(halves)} ({counts})"
        parts = []
        if self.origin is not None:
            o = self.origin
            what = "NaN" if o.nan else "Inf"
            where = f" in {o.module_path}" if o.module_path else ""
            line = f" at {o.cell_line.label()}" if o.cell_line else ""
            verb = "born in" if self.origin_kind == "born" else "entered through"
            parts.append(f"forward {what} {verb} {o.op}{where}{line}")
        if self.backward is not None:
            b = self.backward
            fl = b.cell_line or b.forward_line
            parts.append(f"backward {b.kind} in {b.node}" + (f" (from {fl.label()})" if fl else ""))
        return "; ".join(parts)


def _ops(n: int, phase: str) -> str:
    return f"{n:,} {phase} op{'s' * (n != 1)}"


# -- locating user code -----------------------------------------------------------------------------
_lib_cache: dict[str, bool] = {}


def _is_library(filename: str) -> bool:
    hit = _lib_cache.get(filename)
    if hit is None:
        f = filename.replace("\\", "/")
        hit = (any(p in f for p in _LIBRARY_PARTS) or f.startswith("<frozen")
               or f.startswith("<string>") or any(f.startswith(s) for s in _STDLIB if s != "@"))
        _lib_cache[filename] = hit
    return hit


def _source(filename: str, line: int) -> str:
    import linecache

    return linecache.getline(filename, line).strip()


def _locate(cell_filename: str | None) -> tuple[Frame | None, Frame | None]:
    """(cell line, innermost user frame) of the code running now."""
    frame = sys._getframe(2)
    cell = where = None
    while frame is not None:
        fn = frame.f_code.co_filename
        if cell_filename is not None and fn == cell_filename:
            cell = Frame(fn, frame.f_lineno, frame.f_code.co_name, _source(fn, frame.f_lineno), True)
            if where is None:
                where = cell
            break
        if where is None and not _is_library(fn):
            where = Frame(fn, frame.f_lineno, frame.f_code.co_name, _source(fn, frame.f_lineno))
            if cell_filename is None:
                break
        frame = frame.f_back
    return cell, where


def parse_forward_trace(text: str | list[str], cell_filename: str | None) -> list[Frame]:
    """User frames (outermost first) of a forward traceback torch recorded in anomaly mode."""
    lines = "".join(text).splitlines() if isinstance(text, list) else text.splitlines()
    out: list[Frame] = []
    for i, ln in enumerate(lines):
        m = _FRAME_RE.match(ln)
        if not m:
            continue
        fn, lineno, func = m.group(1), int(m.group(2)), m.group(3).strip()
        is_cell = cell_filename is not None and fn == cell_filename
        if not is_cell and _is_library(fn):
            continue
        src = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME_RE.match(lines[i + 1]) \
            else _source(fn, lineno)
        if src.startswith("(Triggered internally"):
            src = _source(fn, lineno)
        out.append(Frame(fn, lineno, func, src, is_cell))
    # Frames outside (callers of) the cell are the notebook machinery that ran the cell.
    first_cell = next((i for i, f in enumerate(out) if f.cell), None)
    return out[first_cell:] if first_cell is not None else out


def module_names(namespace: Mapping[str, Any] | None) -> dict[str, nn.Module]:
    """The modules bound to public names in a namespace (``{"mlp": mlp}``), shortest names first."""
    if not namespace:
        return {}
    roots = {}
    for name in sorted(namespace, key=lambda n: (len(n), n)):
        if name.startswith("_") or name in ("In", "Out"):
            continue
        try:
            value = namespace[name]
        except Exception:  # noqa: BLE001 - exotic mappings
            continue
        if isinstance(value, nn.Module):
            roots[name] = value
    return roots


def _names_of(roots: Mapping[str, nn.Module]) -> dict[int, str]:
    names: dict[int, str] = {}
    for prefix, root in roots.items():
        try:
            for name, mod in root.named_modules(remove_duplicate=False):
                names.setdefault(id(mod), ".".join(p for p in (prefix, name) if p))
        except Exception:  # noqa: BLE001 - a broken user module must not break the report
            continue
    return names


# -- per-op checks ----------------------------------------------------------------------------------
@dataclass
class _OpInfo:
    name: str
    skip: bool
    view: bool
    written: list[int]   # positional indices of mutated args whose old content matters


_op_cache: dict[Any, _OpInfo] = {}


def _op_info(func: Any) -> _OpInfo:
    info = _op_cache.get(func)
    if info is not None:
        return info
    packet = func.overloadpacket.__name__
    ns = getattr(func, "namespace", "aten")
    schema = func._schema
    view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    written = []
    if packet not in _OVERWRITE_OPS:
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write and not a.kwarg_only \
                    and a.name != "out":
                written.append(i)
    info = _OpInfo(f"{ns}.{packet}", packet in _SKIP_OPS, view, written)
    _op_cache[func] = info
    return info


def _checkable(t: Any) -> bool:
    return (isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
            and t.layout == torch.strided and type(t) in (torch.Tensor, nn.Parameter)
            and t.device.type != "meta")


def _host_bad(t: torch.Tensor) -> bool:
    """True if ``t`` holds NaN or Inf (one reduction; an exact check only when the sum overflows)."""
    s = t.sum().item()
    if isinstance(s, complex):
        if math.isfinite(s.real) and math.isfinite(s.imag):
            return False
    elif math.isfinite(s):
        return False
    return not bool(torch.isfinite(t).all())


def _counts(ts: list[torch.Tensor]) -> tuple[int, int]:
    nan = inf = 0
    for t in ts:
        nan += int(torch.isnan(t).sum())
        inf += int(torch.isinf(t).sum())
    return nan, inf


def _explicit_inf(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    for a in (*args, *kwargs.values()):
        if isinstance(a, float) and math.isinf(a):
            return True
    return False


def _floating(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if _checkable(obj) else []
    if isinstance(obj, (tuple, list)) and all(isinstance(o, torch.Tensor) or o is None for o in obj):
        return [o for o in obj if o is not None and _checkable(o)]
    leaves, _ = tree_flatten(obj)
    return [t for t in leaves if _checkable(t)]


class _Tracer(ModuleTracer):
    """ModuleTracer that hands each module's output to a callback (for the spread)."""

    def __init__(self, roots: Mapping[str, nn.Module], on_output: Callable[..., None]) -> None:
        super().__init__(dict(roots))
        self._on_output = on_output

    def _post(self, module: nn.Module, args: Any, *rest: Any):  # type: ignore[override]
        stack_before = list(self.stack)
        super()._post(module, args, *rest)
        for idx in reversed(stack_before):
            if idx not in self.stack:
                ref = self._modules.get(idx)
                if ref is not None and ref() is module:
                    self._on_output(self.calls[idx], rest[-1])
                    break
        return None


class _Checker(TorchDispatchMode):
    """Checks each op's floating outputs for NaN/Inf (see the module docstring)."""

    def __init__(self, detector: AnomalyDetector) -> None:
        super().__init__()
        self.d = detector
        self.count_fwd = 0
        self.count_bwd = 0
        self.seen = False               # a non-finite (non-mask) output was seen: check modules
        self.devices: set[str] = set()
        self.events: list[OpEvent] = []
        self.module_events: list[tuple[int, int, int, int, list[tuple[int, ...]]]] = []
        # CUDA: per-op device stats, read once at the end
        self.pending: list[tuple[torch.Tensor, dict[str, Any]]] = []
        self.pending_modules: list[tuple[torch.Tensor, int, int, list[tuple[int, ...]]]] = []

    # -- the hook --------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        info = _op_info(func)
        if info.skip or info.view:
            return func(*args, **kwargs)
        node = torch._C._current_autograd_node()
        backward = node is not None
        if (backward and not self.d.check_backward) or (not backward and not self.d.check_forward):
            return func(*args, **kwargs)
        pre_bad: bool | torch.Tensor | None = None
        if info.written:
            written = [t for i in info.written if i < len(args) for t in _floating(args[i])]
            if written and not any(self._deferred(t) for t in written):
                pre_bad = any(_host_bad(t) for t in written)
            elif written:
                # In place on the device: whether the old content already held NaN/Inf is
                # computed before the op overwrites it, and stays on the device (no sync).
                pre_bad = torch.stack([(~torch.isfinite(t)).any() for t in written]).any()
        out = func(*args, **kwargs)
        outs = _floating(out)
        if not outs:
            return out
        index = self.count_fwd + self.count_bwd
        if backward:
            self.count_bwd += 1
        else:
            self.count_fwd += 1
        dev = outs[0].device.type
        if dev not in self.devices:
            self.devices.add(dev)
        if self._deferred(outs[0]):
            self._device_check(info, index, outs, args, kwargs, node, pre_bad)
            return out
        if not any(_host_bad(t) for t in outs):
            return out
        ins = [t for t in _floating((args, kwargs)) if all(t is not o for o in outs)]
        in_nan = any(bool(torch.isnan(t).any()) for t in ins)
        in_inf = any(bool(torch.isinf(t).any()) for t in ins)
        if pre_bad:
            in_nan = in_nan or pre_bad
            in_inf = in_inf or pre_bad
        nan, inf = _counts(outs)
        self._record(info, index, nan, inf, in_nan, in_inf, _explicit_inf(args, kwargs),
                     tensor_shapes((args, kwargs)), tensor_shapes(out), node)
        return out

    def _record(self, info: _OpInfo, index: int, nan: int, inf: int, in_nan: bool, in_inf: bool,
                explicit: bool, in_shapes: list[tuple[int, ...]], out_shapes: list[tuple[int, ...]],
                node: Any, located: tuple[Frame | None, Frame | None] | None = None,
                call: int | None = None, trace: Any = None) -> OpEvent:
        if located is None:
            located = _locate(self.d.cell_filename)
        cell, where = located
        if node is not None:
            call = None
            if trace is None:
                trace = _node_trace(node)
        elif call is None:
            stack = self.d.tracer.stack if self.d.tracer is not None else []
            call = stack[-1] if stack else None
        ev = OpEvent(index=index, op=info.name, phase="backward" if node is not None else "forward",
                     nan=nan, inf=inf, input_nan=in_nan, input_inf=in_inf, explicit_inf=explicit,
                     input_shapes=in_shapes, output_shapes=out_shapes,
                     node=type(node).__name__ if node is not None else None,
                     cell_line=cell, where=where, _call=call)
        if trace:
            ev.forward_trace = parse_forward_trace(trace, self.d.cell_filename)
        self.events.append(ev)
        if not (explicit and not nan) and node is None:
            self.seen = True
        return ev

    # -- CUDA: keep the counts on the device ----------------------------------------------------------
    @staticmethod
    def _deferred(t: torch.Tensor) -> bool:
        """Whether ``t``'s checks stay on its device and are read once at the end (CUDA)."""
        return t.is_cuda

    def _device_check(self, info: _OpInfo, index: int, outs: list[torch.Tensor], args: Any,
                      kwargs: Mapping[str, Any], node: Any,
                      pre_bad: bool | torch.Tensor | None) -> None:
        zero = torch.zeros((), dtype=torch.int64, device=outs[0].device)
        nan, inf = zero, zero
        for t in outs:
            nan = nan + torch.isnan(t).sum()
            inf = inf + torch.isinf(t).sum()
        in_nan, in_inf = zero, zero
        for t in _floating((args, kwargs)):
            if t.device == outs[0].device and all(t is not o for o in outs):
                in_nan = in_nan + torch.isnan(t).any()
                in_inf = in_inf + torch.isinf(t).any()
        if isinstance(pre_bad, torch.Tensor):  # an in-place op's old content (see the hook)
            pre = pre_bad.to(device=outs[0].device, dtype=torch.int64)
            in_nan, in_inf = in_nan + pre, in_inf + pre
        elif pre_bad:
            in_nan, in_inf = in_nan + 1, in_inf + 1
        stats = torch.stack([nan, inf, in_nan, in_inf])
        stack = self.d.tracer.stack if self.d.tracer is not None else []
        meta = {
            "info": info, "index": index, "node": node,
            "explicit": _explicit_inf(args, kwargs),
            "in_shapes": tensor_shapes((args, kwargs)), "out_shapes": [tuple(t.shape) for t in outs],
            "located": _locate(self.d.cell_filename),
            "call": stack[-1] if stack and node is None else None,
            "trace": _node_trace(node) if node is not None else None,
        }
        self.pending.append((stats, meta))

    def module_output(self, call: ModuleCall, output: Any) -> None:
        outs = _floating(output)
        if not outs:
            return
        seq = self.count_fwd + self.count_bwd
        if self._deferred(outs[0]):
            zero = torch.zeros((), dtype=torch.int64, device=outs[0].device)
            nan, inf = zero, zero
            for t in outs:
                nan = nan + torch.isnan(t).sum()
                inf = inf + torch.isinf(t).sum()
            self.pending_modules.append((torch.stack([nan, inf]), call.index, seq,
                                         call.output_shapes or []))
            return
        if not self.seen or not any(_host_bad(t) for t in outs):
            return
        nan, inf = _counts(outs)
        self.module_events.append((call.index, seq, nan, inf, call.output_shapes or []))

    def resolve_device(self) -> None:
        """Read the CUDA counts (one transfer per kind) and turn flagged ops into events."""
        if self.pending:
            table = torch.stack([s.to(self.pending[0][0].device) for s, _ in self.pending]).cpu()
            for row, (_, m) in zip(table.tolist(), self.pending):
                nan, inf, in_nan, in_inf = row
                if nan or inf:
                    self._record(m["info"], m["index"], int(nan), int(inf), bool(in_nan),
                                 bool(in_inf), m["explicit"], m["in_shapes"], m["out_shapes"],
                                 m["node"], located=m["located"], call=m["call"], trace=m["trace"])
            self.pending.clear()
        if self.pending_modules:
            dev = self.pending_modules[0][0].device
            table = torch.stack([s.to(dev) for s, *_ in self.pending_modules]).cpu()
            for (nan, inf), (_, idx, seq, shapes) in zip(table.tolist(), self.pending_modules):
                if nan or inf:
                    self.module_events.append((idx, seq, int(nan), int(inf), shapes))
            self.pending_modules.clear()
        self.events.sort(key=lambda e: e.index)


def _node_trace(node: Any) -> Any:
    try:
        return node.metadata.get("traceback_")
    except Exception:  # noqa: BLE001 - metadata is best effort
        return None


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
            anomaly = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())
            stack.callback(torch.autograd.set_detect_anomaly, *anomaly)
            self._warnings = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            if self.check_backward:
                torch.autograd.set_detect_anomaly(True, check_nan=True)
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
        names = _names_of(self._roots)
        for k, v in _names_of(module_names(self.namespace)).items():
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
                found = Frame(fn, lineno, frame.f_code.co_name, _source(fn, lineno), True)
            elif found is None and not _is_library(fn):
                found = Frame(fn, lineno, frame.f_code.co_name, _source(fn, lineno))
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
               f"{'s' * ((ev.nan or ev.inf) != 1)} from finite inputs ({ev.op})")
        return BackwardFinding(node=ev.node or "?", kind=kind, message=msg, op=ev.op,
                               forward_trace=ev.forward_trace)


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
