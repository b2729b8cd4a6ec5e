"""The per-op check of ``%%detect_anomaly``: a ``TorchDispatchMode`` that looks at each op's floating
outputs (and, when they hold NaN/Inf, at its inputs), plus the module tracer that hands it module
outputs. The checker's own reductions never run as checked ops (they would blame it: an Inf and a
-Inf summed give a NaN "born" in the checker's ``aten.sum``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from torchmagic.core import access
from torchmagic.core.anomaly_report import Frame, OpEvent, locate, parse_forward_trace
from torchmagic.core.tracing import ModuleCall, ModuleTracer, tensor_shapes

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
    """A plain floating tensor whose values can be read (never a nested, sparse, quantized,
    meta, fake or subclass tensor: reducing those would fail or mean something else)."""
    return (isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
            and access.is_plain_dense(t))


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

    def __init__(self, detector: Any) -> None:  # an AnomalyDetector
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
        self.busy = False               # True while the checker computes on its own

    # -- the hook --------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if self.busy:  # the checker's own reductions (module outputs): never checked or counted
            return func(*args, **kwargs)
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
            located = locate(self.d.cell_filename)
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
            "located": locate(self.d.cell_filename),
            "call": stack[-1] if stack and node is None else None,
            "trace": _node_trace(node) if node is not None else None,
        }
        self.pending.append((stats, meta))

    def module_output(self, call: ModuleCall, output: Any) -> None:
        """A module's output (from a global module hook, outside ``__torch_dispatch__``): its
        reductions run with :attr:`busy` set, so they are not taken for the user's ops."""
        busy, self.busy = self.busy, True
        try:
            self._module_output(call, output)
        finally:
            self.busy = busy

    def _module_output(self, call: ModuleCall, output: Any) -> None:
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
        busy, self.busy = self.busy, True
        try:
            self._resolve_device()
        finally:
            self.busy = busy

    def _resolve_device(self) -> None:
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
