"""The result of ``%%meta_shape``: values, module calls, notes; and how a value is described."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from torchmagic.core._result import Result
from torchmagic.core.isolation import ATOMS as _ATOMS
from torchmagic.core.tracing import format_shape, format_shapes

_MAX_SHOWN_TENSORS = 6       # tensors of a tuple/list listed one by one in a value row


# ---------------------------------------------------------------------------------------------
# result objects
# ---------------------------------------------------------------------------------------------
@dataclass
class ValueInfo:
    """One assignment (or the last expression) of the cell: what the name holds afterwards."""

    line: int | None          # cell line of the statement (None for a function's locals)
    name: str                 # variable name, or the source of the last expression
    type: str                 # "Tensor", "tuple", "SmallCNN", "int", ...
    shape: str = ""           # "(8, 10)"; several tensors: "(8, 10), (8,)"
    dtype: str = ""           # "float32"; several: "float32, int64"
    device: str = ""          # "meta", "cpu (fake)"
    params: int | None = None  # modules: parameter count (tied parameters once)
    value: str = ""           # short repr of plain values (ints, sizes, strings)
    shapes: list[tuple[Any, ...]] = field(default_factory=list)  # every tensor's shape
    last_expr: bool = False   # True for the trailing expression


@dataclass
class CallRow:
    """A module call of the tree (``repeat`` > 1: identical consecutive sibling calls folded)."""

    path: str                 # qualified name, rooted at the user's variable name
    cls: str
    depth: int                # 0 = called from the cell itself
    line: int | None          # cell line that made the call (top-level calls)
    inputs: list[tuple[Any, ...]]
    outputs: list[tuple[Any, ...]] | None  # None: the call failed
    repeat: int = 1
    last_path: str = ""       # path of the last folded call ("" when repeat == 1)

    @property
    def failed(self) -> bool:
        return self.outputs is None


@dataclass
class MetaShapeReport(Result):
    """What :func:`meta_shape` found: values, module calls, what was converted, and any error."""

    _display_module = "torchmagic.display.meta"

    mode: str                               # "meta" or "fake"
    depth: int
    values: list[ValueInfo] = field(default_factory=list)
    calls: list[CallRow] = field(default_factory=list)  # every depth, repeats folded
    # (text and HTML show the rows with ``depth <= self.depth``; the widget can go deeper)
    total_calls: int = 0                    # every module call made (unfolded, any depth)
    converted: list[str] = field(default_factory=list)  # "model: SmallCNN -> meta twin"
    passed: list[str] = field(default_factory=list)     # names used as they are, with why
    notes: list[str] = field(default_factory=list)
    error: str | None = None                # one line; None when the code ran to the end
    error_line: int | None = None
    error_kind: str | None = None           # shape | data-dependent | symbolic-branch | ...
    source: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def value(self, name: str) -> ValueInfo:
        """The last row for ``name`` (KeyError if the code did not assign it)."""
        for v in reversed(self.values):
            if v.name == name:
                return v
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# describing values
# ---------------------------------------------------------------------------------------------
def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _device(t: torch.Tensor) -> str:
    from torch._subclasses.fake_tensor import FakeTensor

    return f"{t.device} (fake)" if isinstance(t, FakeTensor) else str(t.device)


def _short(value: Any, limit: int = 40) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a user's __repr__ may fail
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_value(name: str, value: Any, line: int | None, last_expr: bool = False) -> ValueInfo:
    """One row of the values table for ``value`` bound to ``name``."""
    info = ValueInfo(line=line, name=name, type=type(value).__name__, last_expr=last_expr)
    if isinstance(value, torch.Tensor):
        info.type = "Parameter" if isinstance(value, nn.Parameter) else "Tensor"
        info.shapes = [tuple(value.shape)]
        info.shape = format_shape(tuple(value.shape))
        info.dtype = _dtype(value.dtype)
        info.device = _device(value)
        return info
    if isinstance(value, nn.Module):
        params = list(value.parameters())
        info.params = sum(int(p.numel()) for p in params)
        devices = sorted({_device(t) for t in [*params, *value.buffers()]})
        info.device = ", ".join(devices)
        return info
    if isinstance(value, (torch.Size, torch.SymInt, torch.SymFloat, torch.SymBool)) or \
            isinstance(value, _ATOMS):
        info.value = _short(value)
        return info
    if isinstance(value, (list, tuple, dict)):
        try:
            leaves, _ = tree_flatten(value)
        except Exception:  # noqa: BLE001
            leaves = []
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if tensors:
            info.shapes = [tuple(t.shape) for t in tensors]
            shown = info.shapes[:_MAX_SHOWN_TENSORS]
            info.shape = format_shapes(shown)
            if len(tensors) > _MAX_SHOWN_TENSORS:
                info.shape += f", … ({len(tensors)} tensors)"
            info.dtype = ", ".join(dict.fromkeys(_dtype(t.dtype) for t in tensors))
            info.device = ", ".join(dict.fromkeys(_device(t) for t in tensors))
            modules = [m for m in leaves if isinstance(m, nn.Module)]
            if modules:
                info.params = sum(int(p.numel()) for m in modules for p in m.parameters())
            return info
        modules = [m for m in leaves if isinstance(m, nn.Module)]
        if modules:
            info.params = sum(int(p.numel()) for m in modules for p in m.parameters())
            info.value = f"{len(modules)} modules"
            return info
        info.value = _short(value)
        return info
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type, types.ModuleType)):
        info.value = ""
        return info
    info.value = _short(value)
    return info


__all__ = ["CallRow", "MetaShapeReport", "ValueInfo", "describe_value"]
