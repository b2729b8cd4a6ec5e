"""``meta_shape``: run a cell (or a function) on the meta device and report every shape it produces.

What ships:

- :func:`meta_shape` runs code in a *new* namespace: a shallow copy of the user's namespace in which
  the names the code uses are replaced by twins. Modules become meta twins (``copy.deepcopy`` with a
  memo of meta tensors: no weight is read, tied weights stay tied), tensors become uninitialised meta
  tensors, lists/tuples/dicts holding them are copied with the same memo, numpy arrays are passed as
  read-only views, plain mutable containers are deep-copied and notebook functions are re-bound to the
  new namespace. The user's namespace and objects are never written to.
- Each top-level statement runs the way IPython runs it (last expression evaluated), under
  ``preserved_global_state()`` (default device, ``set_default_device`` bookkeeping, grad mode, RNG
  ...) with factory functions sent to meta (``torch.randn(100000, 100000)`` or a 70B model cost no
  memory). A torch-function mode sends explicit ``device=`` arguments and ``.to("cuda")`` to meta, and
  turns any real tensor that reaches an op (``torch.from_numpy``, an object reached through an
  attribute) into a meta one, so nothing real is computed or modified.
- With ``fake=True`` the code runs under ``FakeTensorMode`` with a ``ShapeEnv``: twins hold fake
  tensors made by ``from_tensor`` (never ``allow_non_fake_inputs``), data-dependent sizes continue as
  symbols (``(u0, 4)``), ``.item()`` gives a symbol, and branching on one is reported clearly.
- The report (:class:`MetaShapeReport`) lists each assignment and the last expression (name, type,
  shape, dtype; modules with parameter counts) and the tree of module calls (qualified names rooted
  at the user's variable names, input -> output shapes, identical repeated blocks folded).
- A failure raises :class:`ForwardError` whose message names the cell line, the module path and class
  and the op; ``err.partial`` is the report gathered up to that point. Data-dependent code (``.item()``,
  ``.tolist()``, ``if t.sum() > 0``, ``nonzero``, boolean masks, ``unique``) says why meta cannot know
  the values and suggests ``--fake``. ``KeyboardInterrupt`` propagates after everything is restored.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import inspect
import re
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from torchmagic.core._result import Result
from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.execution import cell_line_of, compile_user_cell, forget
from torchmagic.core.state import preserved_global_state
from torchmagic.core.tracing import (
    ModuleCall,
    ModuleTracer,
    describe_failure,
    format_shape,
    format_shapes,
    tensor_shapes,
    trace_modules,
)
from torchmagic.core.twin import fake_tensor, meta_tensor

__all__ = ["MetaShapeReport", "ValueInfo", "CallRow", "meta_shape"]

_MAX_SCAN = 10_000          # elements scanned inside a container before giving up on copying it
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
# which names the code uses
# ---------------------------------------------------------------------------------------------
def _used_names(tree: ast.AST) -> set[str]:
    """Names read anywhere in the code (``x += 1`` reads ``x``)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("run_line_magic", "run_cell_magic") and node.args
              and isinstance(node.args[-1], ast.Constant) and isinstance(node.args[-1].value, str)):
            # a line magic in the cell (%time y = model(x)): the names of its code count too
            try:
                out |= _used_names(ast.parse(node.args[-1].value))
            except SyntaxError:
                out |= set(re.findall(r"[A-Za-z_]\w*", node.args[-1].value))
    return out


def _code_names(code: types.CodeType) -> set[str]:
    """Global names a code object (and the functions nested in it) may read."""
    out = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= _code_names(const)
    return out


def _assigned_names(stmt: ast.stmt) -> list[str]:
    """Names a top-level statement binds (in loops and ifs too, not inside defs/classes)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
                             ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            if node.id not in names:
                names.append(node.id)
        elif isinstance(node, ast.NamedExpr) and isinstance(node.target, ast.Name):
            if node.target.id not in names:
                names.append(node.target.id)
        for child in ast.iter_child_nodes(node):
            visit(child)

    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                         ast.Import, ast.ImportFrom)):
        return []
    visit(stmt)
    return names


# ---------------------------------------------------------------------------------------------
# building the namespace the code runs in
# ---------------------------------------------------------------------------------------------
_ATOMS = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device,
          torch.Size, range, slice, type(Ellipsis))


class _Converter:
    """Twins of the user's objects: modules and tensors (also inside containers) on meta/fake."""

    def __init__(self, convert: Callable[[torch.Tensor], torch.Tensor], label: str) -> None:
        self.convert = convert
        self.label = label                  # "meta" or "fake"
        self.memo: dict[int, Any] = {}
        self.keep: list[Any] = []           # originals kept alive while ids are memo keys
        self.converted: list[str] = []
        self.passed: list[str] = []
        self.roots: dict[str, nn.Module] = {}
        self.keep_real: set[int] = set()    # ids of real tensors the twins share (read only)

    # -- collecting ------------------------------------------------------------------------
    def _add_tensor(self, t: torch.Tensor) -> None:
        if id(t) not in self.memo:
            self.memo[id(t)] = self.convert(t)
            self.keep.append(t)

    def _add_module(self, m: nn.Module) -> None:
        for t in [*m.parameters(), *m.buffers()]:
            self._add_tensor(t)
        for sub in m.modules():  # tensors kept as plain attributes (not registered)
            for v in vars(sub).values():
                if isinstance(v, torch.Tensor):
                    self._add_tensor(v)

    def _scan(self, obj: Any, budget: list[int], found: list[bool], depth: int = 0) -> bool:
        """Collect tensors/modules inside ``obj``; False if it holds something not safely
        copyable (unknown objects), too much, or too deep."""
        budget[0] -= 1
        if budget[0] < 0 or depth > 8:
            return False
        if isinstance(obj, torch.Tensor):
            self._add_tensor(obj)
            found[0] = True
            return True
        if _is_packed(obj) and self.label == "meta":
            # PackedSequence: its batch_sizes are CPU metadata recurrent kernels read (also on
            # meta) and PackedSequence refuses elsewhere; they stay real, shared, never written
            bs = obj.batch_sizes
            if id(bs) not in self.memo:
                self.memo[id(bs)] = bs
                self.keep.append(bs)
                self.keep_real.add(id(bs))
            for t in (obj.data, obj.sorted_indices, obj.unsorted_indices):
                if t is not None:
                    self._add_tensor(t)
            found[0] = True
            return True
        if isinstance(obj, nn.Module):
            self._add_module(obj)
            found[0] = True
            return True
        if isinstance(obj, _ATOMS) or isinstance(obj, (types.FunctionType, type)):
            return True
        if isinstance(obj, (list, tuple, set, frozenset)):
            return all(self._scan(v, budget, found, depth + 1) for v in obj)
        if isinstance(obj, dict):
            return all(self._scan(k, budget, found, depth + 1)
                       and self._scan(v, budget, found, depth + 1) for k, v in obj.items())
        if dataclasses.is_dataclass(obj) or isinstance(obj, types.SimpleNamespace):
            return all(self._scan(v, budget, found, depth + 1) for v in vars(obj).values())
        return False

    # -- converting one value --------------------------------------------------------------
    def value(self, name: str, obj: Any) -> tuple[bool, Any]:
        """(changed, new value) for the object bound to ``name``."""
        if name.startswith("\0"):  # a closure variable of a function given to meta_shape
            name = name[1:]
        if isinstance(obj, nn.Module):
            self._add_module(obj)
            new = copy.deepcopy(obj, self.memo)
            n = sum(p.numel() for p in obj.parameters())
            self.converted.append(f"{name}: {type(obj).__name__} -> {self.label} twin "
                                  f"({n:,} params)")
            self.roots[name] = new
            return True, new
        if isinstance(obj, torch.Tensor):
            self._add_tensor(obj)
            self.converted.append(f"{name}: tensor {format_shape(tuple(obj.shape))} "
                                  f"{_dtype(obj.dtype)} on {obj.device} -> {self.label}")
            return True, self.memo[id(obj)]
        if _is_ndarray(obj):
            view = obj.view()
            view.flags.writeable = False
            self.passed.append(f"{name}: numpy array {format_shape(tuple(obj.shape))} passed "
                               "read-only (torch.as_tensor(arr) in the cell gives a "
                               f"{self.label} tensor)")
            return True, view
        if isinstance(obj, (list, tuple, set, frozenset, dict)) or dataclasses.is_dataclass(obj) \
                or isinstance(obj, types.SimpleNamespace):
            if isinstance(obj, type):
                return False, obj
            found = [False]
            if self._scan(obj, [_MAX_SCAN], found):
                if found[0] or not isinstance(obj, (tuple, frozenset)):
                    new = copy.deepcopy(obj, self.memo)
                    if found[0]:
                        self.converted.append(f"{name}: {type(obj).__name__} of tensors/modules "
                                              f"-> {self.label} copies")
                        self._root_modules(name, new)
                    return True, new
                return False, obj
            if found[0]:
                self.passed.append(f"{name}: {type(obj).__name__} holding objects that cannot be "
                                   "copied safely: passed as is (its real tensors are read as "
                                   f"{self.label} when an op uses them)")
            return False, obj
        return False, obj

    def _root_modules(self, name: str, obj: Any) -> None:
        if isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                if isinstance(v, nn.Module):
                    self.roots[f"{name}[{i}]"] = v
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, nn.Module):
                    self.roots[f"{name}[{k!r}]"] = v


def _is_packed(obj: Any) -> bool:
    from torch.nn.utils.rnn import PackedSequence

    return isinstance(obj, PackedSequence)


def _is_ndarray(obj: Any) -> bool:
    mod = type(obj).__module__
    return mod == "numpy" and type(obj).__name__ == "ndarray"


def _rebind(fn: types.FunctionType, globals_: dict[str, Any],
            closure: tuple[Any, ...] | None = None) -> types.FunctionType:
    new = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__,
                             closure if closure is not None else fn.__closure__)
    new.__kwdefaults__ = copy.copy(fn.__kwdefaults__)
    new.__qualname__ = fn.__qualname__
    new.__dict__.update(fn.__dict__)
    new.__wrapped_original__ = fn  # type: ignore[attr-defined]
    return new


def _build_namespace(namespace: dict[str, Any], names: set[str], conv: _Converter
                     ) -> dict[str, Any]:
    """A shallow copy of ``namespace`` with the used names converted (functions defined in the
    namespace are re-bound to the copy, and the names they use converted too)."""
    new_ns = dict(namespace)
    todo = sorted(names, reverse=True)  # popped from the end: alphabetical order
    done: set[str] = set()
    functions: list[str] = []
    while todo:
        name = todo.pop()
        if name in done or name not in namespace:
            continue
        done.add(name)
        obj = namespace[name]
        if isinstance(obj, types.FunctionType) and obj.__globals__ is namespace:
            functions.append(name)
            todo.extend(sorted(_code_names(obj.__code__) - done))
            continue
        try:
            changed, new = conv.value(name, obj)
        except (KeyboardInterrupt, TorchMagicError):
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a module holding a lock or a file
            kind = "meta" if conv.label == "meta" else "fake"
            raise TorchMagicError(
                f"cannot make a {kind} twin of {name!r} ({type(obj).__name__}): "
                f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}") from None
        if changed:
            new_ns[name] = new
    for name in functions:
        new_ns[name] = _rebind(namespace[name], new_ns)
    return new_ns


# ---------------------------------------------------------------------------------------------
# the torch-function mode: devices to meta, real tensors read as meta/fake
# ---------------------------------------------------------------------------------------------
_FAKE_KEY = getattr(torch._C, "_TorchDispatchModeKey", None)


def _usable(device: Any) -> bool:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return True
    if dev.type in ("cpu", "meta"):
        return True
    if dev.type == "cuda":
        return torch.cuda.is_available()
    if dev.type == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return True


class _Redirect(TorchFunctionMode):
    """Inside the run: factory calls and device moves land on meta (fake: on a usable device),
    and real tensors given to an op are replaced by meta/fake copies (so an op never computes on,
    or writes into, a real tensor). Records the op that raised."""

    def __init__(self, fake_mode: Any, convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        from torch.utils._device import _device_constructors

        self.fake_mode = fake_mode
        self.convert = convert
        self.constructors = _device_constructors()
        self.memo: dict[int, torch.Tensor] = {}
        self.keep: list[torch.Tensor] = []
        self.real_reads = 0
        self.device_moves: set[str] = set()
        self.keep_real: set[int] = set()   # real tensors passed on as they are (batch_sizes)
        self.failed: tuple[BaseException, str, list[tuple[Any, ...]]] | None = None
        self._moves = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
        for name in ("mps", "xpu", "pin_memory"):
            fn = getattr(torch.Tensor, name, None)
            if fn is not None:
                self._moves.add(fn)
        if fake_mode is not None:
            from torch._subclasses.fake_tensor import FakeTensor

            self._is_real = lambda t: not isinstance(t, FakeTensor)
        else:
            self._is_real = lambda t: not t.is_meta

    # -- helpers -----------------------------------------------------------------------------
    def _target(self, device: Any) -> Any:
        if self.fake_mode is None:
            if device is not None and str(device) != "meta":
                self.device_moves.add(str(device))
            return torch.device("meta")
        if device is None or _usable(device):
            return device
        self.device_moves.add(str(device))
        return torch.device("cpu")

    def _fix(self, a: Any, writes: bool = False) -> Any:
        if isinstance(a, torch.Tensor):
            if self._is_real(a) and (writes or id(a) not in self.keep_real):
                out = self.memo.get(id(a))
                if out is None:
                    out = self.convert(a)
                    self.memo[id(a)] = out
                    self.keep.append(a)
                self.real_reads += 1
                return out
            return a
        if type(a) in (list, tuple) and a and any(isinstance(x, torch.Tensor) for x in a):
            return type(a)(self._fix(x, writes) for x in a)
        return a

    @staticmethod
    def _writes(func: Any, kwargs: dict[str, Any]) -> bool:
        """In-place ops, ``x[i] = v`` and ``out=``: kept real tensors must not reach them."""
        name = getattr(func, "__name__", "")
        return (name.endswith("_") and not name.endswith("__")) or \
            name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__") or \
            "out" in kwargs

    def _on_kept(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """True when every tensor the op gets is kept real metadata and the op cannot write."""
        if self._writes(func, kwargs):
            return False
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        return bool(tensors) and all(id(t) in self.keep_real for t in tensors)

    def _move(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self_t = self._fix(args[0])
        if func is torch.Tensor.to:
            kw = dict(kwargs)
            copy_ = kw.pop("copy", False)
            device, dtype, non_blocking, fmt = torch._C._nn._parse_to(*args[1:], **kw)
            target = self._target(device) if device is not None else None
            out_kw: dict[str, Any] = {"copy": copy_, "non_blocking": non_blocking}
            if target is not None:
                out_kw["device"] = target
            if dtype is not None:
                out_kw["dtype"] = dtype
            if fmt is not None:
                out_kw["memory_format"] = fmt
            return torch.Tensor.to(self_t, **out_kw)
        name = getattr(func, "__name__", "")
        if self.fake_mode is None or (name in ("cuda", "mps", "xpu") and not _usable(name)):
            if name not in ("cpu", "pin_memory"):
                self.device_moves.add(name)
            return self_t
        return func(self_t, *args[1:], **kwargs)

    # -- the hook --------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types_: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__":
            return func(*args, **kwargs)           # attribute reads: nothing to redirect
        if self.fake_mode is not None and torch._C._get_dispatch_mode(_FAKE_KEY.FAKE) is None:
            return func(*args, **kwargs)           # fake tensor internals at work
        try:
            if func in self._moves and args:
                return self._move(func, args, kwargs)
            if self.keep_real and self._on_kept(func, args, kwargs):
                # reads of kept metadata (packed.batch_sizes[0], int(...)): run for real, and
                # what they give is metadata too
                out = func(*args, **kwargs)
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and self._is_real(t):
                        self.keep_real.add(id(t))
                        self.keep.append(t)
                return out
            if func in self.constructors or kwargs.get("device") is not None:
                kwargs = dict(kwargs)
                kwargs["device"] = self._target(kwargs.get("device"))
            writes = bool(self.keep_real) and self._writes(func, kwargs)
            args = tuple(self._fix(a, writes) for a in args)
            if kwargs:
                kwargs = {k: self._fix(v, writes) for k, v in kwargs.items()}
            return func(*args, **kwargs)
        except Exception as exc:
            if self.failed is None or self.failed[0] is not exc:
                name = getattr(func, "__name__", None) or str(func)
                self.failed = (exc, name, tensor_shapes((args, kwargs)))
            raise


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


# ---------------------------------------------------------------------------------------------
# explaining failures
# ---------------------------------------------------------------------------------------------
_DATA_DEP_OPS = {
    "nonzero": "nonzero / boolean-mask indexing (x[mask])",
    "argwhere": "argwhere",
    "masked_select": "masked_select / boolean-mask indexing (x[mask])",
    "_unique": "unique", "_unique2": "unique", "unique_dim": "unique",
    "unique_consecutive": "unique_consecutive", "bincount": "bincount",
    "repeat_interleave": "repeat_interleave with tensor repeats", "histc": "histc",
    "_local_scalar_dense": ".item()",
}
_NO_KERNEL = re.compile(r"(?:aten|[\w.]+)::(\w+)[\w.]*: attempted to run this operator with Meta")
_NO_KERNEL2 = re.compile(r"Could not run '([\w:.]+)' with arguments from the '(?:Meta|Fake)\w*'")
_NO_FAKE_IMPL = re.compile(r"no fake impl registered for <CustomOpDef\(([\w:.]+)\)>")
_MATMUL = re.compile(r"a and b must have same reduction dim, but got \[(\d+), (\d+)\] X "
                     r"\[(\d+), (\d+)\]")


def _torch_message(exc: BaseException) -> str:
    msg = " ".join(str(exc).strip().split("\n")[0].split()) or type(exc).__name__
    m = _MATMUL.search(msg)
    if m:  # the meta kernel's wording -> the one users know from CPU/CUDA runs
        a, b, c, d = m.groups()
        msg = f"mat1 and mat2 shapes cannot be multiplied ({a}x{b} and {c}x{d})"
    return msg


def _classify(exc: BaseException, fake: bool, flag: str) -> tuple[str, str | None]:
    """(kind, explanation) for an exception; explanation None = use torch's message."""
    text = str(exc)
    name = type(exc).__name__
    values = "meta tensors have shapes and dtypes but no values"
    if name == "GuardOnDataDependentSymNode" or "Could not guard on data-dependent" in text:
        m = re.search(r"data-dependent expression (.+?) \(unhinted", text)
        expr = m.group(1) if m else "a symbolic value"
        return "symbolic-branch", (
            f"branches on {expr}, a value only known when the code runs on real data (it comes "
            "from .item(), nonzero, a boolean mask or unique); fake tensors carry such values as "
            "symbols (u0, u1, ...) but Python control flow needs the real value; branch on shapes "
            "instead, or state the assumption with torch._check(...)")
    if "cannot be called on meta tensors" in text:
        return "data-dependent", (
            "needs the value of a tensor (.item(), bool(), int()/float(), or an if/while on a "
            f"tensor), and {values}; {flag} continues with a symbolic value (u0)")
    if "'lengths' argument should be a 1D CPU int64 tensor" in text:
        return "data-dependent", (
            "packs sequences by the values of their lengths (pack_padded_sequence / "
            f"pack_sequence), and {values}; pack real tensors first and use the PackedSequence "
            "in the code (its batch sizes are kept as they are)")
    if "Cannot copy out of meta tensor" in text:
        return "data-dependent", (
            "needs a tensor's values (.tolist(), .cpu(), .numpy() or printing values), and "
            f"{values}; {flag} continues with symbolic values")
    if "can't convert meta device type tensor to numpy" in text:
        return "data-dependent", (
            "needs a numpy array made from a tensor (x.numpy(), np.asarray(x), or arithmetic "
            f"mixing a numpy array with a tensor), and {values}; keep it in torch, or bring numpy "
            "data in with torch.as_tensor(arr)")
    if "register_meta function for torch.nonzero()" in text:
        return "data-dependent", (
            "uses nonzero / boolean-mask indexing (x[mask]): the output size depends on the "
            f"values, and {values}; {flag} continues with a symbolic size (u0, ...)")
    m = _NO_FAKE_IMPL.search(text)
    if m:
        return "no-meta-kernel", (
            f"custom op {m.group(1)} has no fake/meta implementation, so its output shape cannot "
            f"be computed without running it; add one with @{m.group(1).split('::')[-1]}"
            ".register_fake")
    m = _NO_KERNEL.search(text) or _NO_KERNEL2.search(text)
    if m:
        op = m.group(1).split("::")[-1]
        if op in _DATA_DEP_OPS:
            return "data-dependent", (
                f"uses {_DATA_DEP_OPS[op]}: the output size depends on the values, and {values}; "
                f"{flag} continues with a symbolic size (u0, ...)")
        return "no-meta-kernel", (
            f"op {m.group(1) if '::' in m.group(1) else 'aten::' + op} has no meta/fake "
            "implementation (a CUDA-only or custom op), so its output shape cannot be computed "
            "without running it; register one with torch.library.register_fake")
    if "Torch not compiled with CUDA" in text or "No CUDA GPUs are available" in text or \
            "not linked with support for cuda" in text:
        return "cuda", (
            "calls CUDA itself (a torch.cuda.* function or a CUDA-only op), which needs a CUDA "
            "device; tensor code runs on meta anyway, so drop the call or guard it with "
            "torch.cuda.is_available()")
    if "assignment destination is read-only" in text:
        return "numpy-write", (
            "writes into a numpy array from the namespace, which meta_shape passes read-only "
            "(it never changes your objects); copy it in the cell first (arr = arr.copy())")
    if "DataDependentOutputException" in name or "DynamicOutputShapeException" in name:
        return "data-dependent", (
            f"uses an op whose output size depends on values ({text.split(chr(10))[0][:60]}), "
            f"and {values}; {flag} continues with symbolic sizes")
    if isinstance(exc, RuntimeError) and ("shape" in text or "size" in text or "dimension" in text
                                          or "mat1" in text or "reduction dim" in text):
        return "shape", None
    return "error", None


def _line_text(filename: str, line: int | None) -> str:
    import linecache

    if line is None:
        return ""
    text = linecache.getline(filename, line).strip()
    return text if len(text) <= 60 else text[:59] + "…"


# ---------------------------------------------------------------------------------------------
# folding the call tree
# ---------------------------------------------------------------------------------------------
_INDEXED = re.compile(r"^(.*?)(\d+)$")


def _next_index(prev: str, path: str) -> bool:
    """True when ``path`` is the entry after ``prev`` in a ModuleList/Sequential (``x.3`` after
    ``x.2``): only such calls are folded, so no differently named module is hidden."""
    if prev == path:  # the same module called again (a loop)
        return True
    a, b = _INDEXED.match(prev), _INDEXED.match(path)
    return bool(a and b and a.group(1) == b.group(1) and a.group(1).endswith((".", "["))
                and int(b.group(2)) == int(a.group(2)) + 1)


def _fold_calls(calls: list[ModuleCall], fold: bool,
                lines: dict[int, int | None]) -> list[CallRow]:
    """Every call as a row, in call order, identical consecutive ModuleList/Sequential entries
    folded into one row (``repeat``) with the children of the first."""
    children: dict[int | None, list[ModuleCall]] = {}
    for c in calls:
        children.setdefault(c.parent, []).append(c)
    sig_cache: dict[int, Any] = {}

    def sig(c: ModuleCall) -> Any:
        if c.index not in sig_cache:
            sig_cache[c.index] = (c.cls, repr(c.input_shapes), repr(c.output_shapes),
                                  tuple(sig(k) for k in children.get(c.index, [])))
        return sig_cache[c.index]

    rows: list[CallRow] = []

    def emit(group: list[ModuleCall]) -> None:
        i = 0
        while i < len(group):
            c = group[i]
            j = i + 1
            if fold and c.output_shapes is not None:
                while j < len(group) and group[j].output_shapes is not None and \
                        _next_index(group[j - 1].path, group[j].path) and sig(group[j]) == sig(c):
                    j += 1
            n = j - i
            rows.append(CallRow(path=c.path, cls=c.cls, depth=c.depth, line=lines.get(c.index),
                                inputs=list(c.input_shapes),
                                outputs=None if c.output_shapes is None else list(c.output_shapes),
                                repeat=n, last_path=group[j - 1].path if n > 1 else ""))
            emit(children.get(c.index, []))
            i = j

    emit(children.get(None, []))
    return rows


# ---------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------
class _Run:
    def __init__(self, depth: int, fake: bool, fold: bool, flag: str) -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise TorchMagicError(f"depth must be a whole number >= 0; got {depth!r}")
        self.depth, self.fake, self.fold, self.flag = depth, fake, fold, flag
        self.report = MetaShapeReport(mode="fake" if fake else "meta", depth=depth)
        self.fake_mode: Any = None
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode
            from torch.fx.experimental.symbolic_shapes import ShapeEnv

            self.fake_mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)
            fm = self.fake_mode
            self.convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: fake_tensor(t, fm)
        else:
            self.convert = meta_tensor
        self.tracer: ModuleTracer | None = None
        self.call_lines: dict[int, int | None] = {}
        self.filename = ""
        self.named: list[nn.Module] = []
        # hooks for %%estimate (set by ``meta_shape(_setup=...)``): names bound to ready-made
        # twins (optimizers), and a context entered around the code, given the converter
        self.extra: dict[str, Any] = {}
        self.around: Callable[[_Converter], Any] | None = None

    # names of modules made by the code itself
    def register(self, name: str, obj: Any) -> None:
        assert self.tracer is not None
        mods: list[tuple[str, nn.Module]] = []
        if isinstance(obj, nn.Module):
            mods.append((name, obj))
        elif isinstance(obj, (list, tuple)) and len(obj) <= 1000:
            mods.extend((f"{name}[{i}]", v) for i, v in enumerate(obj) if isinstance(v, nn.Module))
        elif isinstance(obj, dict) and len(obj) <= 1000:
            mods.extend((f"{name}[{k!r}]", v) for k, v in obj.items() if isinstance(v, nn.Module))
        for prefix, mod in mods:
            if id(mod) in self.tracer.names and self.tracer.names[id(mod)] == prefix:
                continue
            self.named.append(mod)
            for sub_name, sub in mod.named_modules(remove_duplicate=False):
                full = ".".join(p for p in (prefix, sub_name) if p)
                self.tracer.names.setdefault(id(sub), full)

    def _on_enter(self, call: ModuleCall) -> None:
        if call.depth or not self.filename:
            return
        frame = sys._getframe(1)
        for _ in range(64):
            if frame is None:
                break
            if frame.f_code.co_filename == self.filename:
                self.call_lines[call.index] = frame.f_lineno
                break
            frame = frame.f_back

    # failures
    def failure(self, exc: BaseException, redirect: _Redirect, line: int | None,
                where: str) -> ForwardError:
        kind, why = _classify(exc, self.fake, self.flag)
        assert self.tracer is not None
        call = self.tracer.failing_call
        module = self.tracer.module_of(call) if call is not None else None
        op_part = ""
        if redirect.failed is not None and redirect.failed[0] is exc:
            _, op, shapes = redirect.failed
            op_part = f"{op}: " if call is not None or not shapes else \
                f"{op} on {format_shapes(shapes)}: "
        if why is not None:
            detail = describe_failure(call, RuntimeError(why), module) if call is not None else why
        else:
            detail = describe_failure(call, RuntimeError(op_part + _torch_message(exc)), module)
            if kind == "error":
                detail = f"{type(exc).__name__}: {detail}"
        text = _line_text(self.filename, line) if self.filename else ""
        prefix = f"line {line}" if line is not None else where
        if text and (kind != "shape" or call is None):
            prefix += f" ({text})"
        message = f"{prefix}: {detail}"
        rep = self.report
        rep.error, rep.error_line, rep.error_kind = message, line, kind
        err = ForwardError(message, original=exc, partial=rep,
                           module_path=call.path if call else None,
                           module_class=call.cls if call else None,
                           input_shapes=format_shapes(call.input_shapes) if call else None)
        return err

    def finish(self, redirect: _Redirect | None, started: float) -> None:
        rep = self.report
        if self.tracer is not None:
            rep.total_calls = len(self.tracer.calls)
            rep.calls = _fold_calls(self.tracer.calls, self.fold, self.call_lines)
        if redirect is not None:
            if redirect.device_moves:
                where = "meta" if not self.fake else "cpu"
                rep.notes.append("device arguments and moves ("
                                 + ", ".join(sorted(redirect.device_moves))
                                 + f") ran on {where}: shapes do not depend on the device")
            if redirect.real_reads:
                rep.notes.append(f"real tensors not bound to a used name (e.g. torch.from_numpy, "
                                 f"an attribute of an object) were read as {rep.mode} tensors in "
                                 f"{redirect.real_reads} op(s); they were not changed")
        rep.seconds = time.perf_counter() - started

    # the run itself
    def run(self, namespace: dict[str, Any], statements: list[tuple[ast.stmt, Any, bool]],
            used: set[str], where: str, call: Callable[[dict[str, Any]], Any] | None = None
            ) -> MetaShapeReport:
        started = time.perf_counter()
        rep = self.report
        redirect: _Redirect | None = None
        with preserved_global_state(), warnings.catch_warnings():
            # torch.from_numpy on the read-only view of a user's array: harmless here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            conv = _Converter(self.convert, rep.mode)
            new_ns = _build_namespace(namespace, used, conv)
            new_ns.update(self.extra)
            rep.converted, rep.passed = conv.converted, conv.passed
            self.tracer = ModuleTracer(conv.roots)
            self.tracer.on_enter.append(self._on_enter)
            redirect = _Redirect(self.fake_mode, self.convert)
            redirect.keep_real = conv.keep_real
            line: int | None = None
            try:
                around = self.around(conv) if self.around else contextlib.nullcontext()
                with self._modes(redirect), trace_modules(self.tracer), around:
                    if call is not None:
                        call(new_ns)
                    for stmt, code, is_expr in statements:
                        line = stmt.lineno
                        self.tracer.stack.clear()
                        redirect.failed = None
                        if is_expr:
                            value = eval(code, new_ns)  # noqa: S307 - the user's own code
                            if value is not None:
                                src = ast.get_source_segment(rep.source, stmt) or "<last expression>"
                                src = " ".join(src.split())
                                rep.values.append(describe_value(
                                    src if len(src) <= 40 else src[:39] + "…", value,
                                    stmt.lineno, last_expr=True))
                                self.register(src, value)
                            continue
                        exec(code, new_ns)  # noqa: S102
                        for name in _assigned_names(stmt):
                            if name in new_ns:
                                rep.values.append(describe_value(name, new_ns[name], stmt.lineno))
                                self.register(name, new_ns[name])
            except KeyboardInterrupt:
                self.finish(redirect, started)
                rep.error, rep.error_line, rep.error_kind = "interrupted", line, "interrupt"
                raise
            except Exception as exc:
                tb = exc.__traceback__
                exact = cell_line_of(tb, self.filename) if self.filename else None
                err = self.failure(exc, redirect, exact or line, where)
                self.finish(redirect, started)
                raise err from exc
            self.finish(redirect, started)
        return rep

    def _modes(self, redirect: _Redirect) -> Any:
        import contextlib

        stack = contextlib.ExitStack()
        if self.fake_mode is not None:
            stack.enter_context(self.fake_mode)
        # No ``with torch.device("meta")`` here: the redirect mode already sends every factory
        # call to meta, and torch's DeviceContext nests badly with a user's set_default_device
        # (its exit asserts "Found nested DeviceContext" when the cell calls set_default_device).
        stack.enter_context(redirect)
        return _SafeExit(stack)


class _SafeExit:
    """Exit the modes; if the code rearranged the mode stack (``torch.set_default_device``), a
    mode's own exit may object: ``preserved_global_state`` puts the stack back in any case."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        try:
            self.stack.__exit__(*exc)
        except Exception:  # noqa: BLE001 - restored by preserved_global_state right after
            if exc[0] is None:
                return False
        return False


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _caller_namespace() -> dict[str, Any]:
    frame = inspect.currentframe()
    assert frame is not None
    caller = frame.f_back.f_back if frame.f_back is not None else None
    if caller is None:
        return {}
    ns = dict(caller.f_globals)
    ns.update(caller.f_locals)
    return ns


def meta_shape(code_or_fn: str | Callable[[], Any], namespace: dict[str, Any] | None = None, *,
               depth: int = 3, fake: bool = False, fold: bool = True,
               _flag: str = "fake=True", _setup: Callable[[Any], None] | None = None
               ) -> MetaShapeReport:
    """Run ``code_or_fn`` on the meta device (``fake=True``: under ``FakeTensorMode``) and report
    the shapes it produces, without allocating memory or changing any user object.

    ``code_or_fn``: Python source (a cell, already transformed by IPython when it contains magics)
    or a function taking no arguments (its globals and closure are re-bound to twins; its return
    value and its locals at return are reported). ``namespace``: the names the code sees (a
    notebook's ``user_ns``); default: the caller's globals and locals. It is never written to.
    ``depth``: module calls shown down to this nesting below the calls the code makes itself.
    ``fold``: fold identical consecutive sibling calls (``layers.0-31 x32``).

    Returns a :class:`MetaShapeReport`. Raises :class:`TorchMagicError` for invalid input and
    :class:`ForwardError` when the code fails (``err.partial`` is the report up to the failure).
    """
    if namespace is None:
        namespace = _caller_namespace()
    if not isinstance(namespace, dict):
        raise TorchMagicError(f"namespace must be a dict (e.g. globals()); got "
                              f"{type(namespace).__name__}")
    runner = _Run(depth, fake, fold, _flag)
    if _setup is not None:  # %%estimate: its converter, twins and memory tracker
        _setup(runner)
    guarded = [namespace]
    if isinstance(code_or_fn, types.FunctionType) and code_or_fn.__globals__ is not namespace:
        guarded.append(code_or_fn.__globals__)
    with _namespace_guard(guarded, runner.report):
        return _meta_shape(runner, code_or_fn, namespace)


@contextlib.contextmanager
def _namespace_guard(namespaces: list[dict[str, Any]], report: MetaShapeReport
                     ) -> Iterator[None]:
    """Undo any binding the run made in the user's namespaces (the code itself runs in a copy,
    but IPython line magics in a cell, e.g. ``%timeit``, ``%time x = ...``, write into the shell's
    real ``user_ns``): new names are removed and rebound names restored, on every path."""
    before = [(ns, dict(ns)) for ns in namespaces]
    try:
        yield
    finally:
        undone: list[str] = []
        for ns, old in before:
            for name in [k for k in ns if k not in old]:
                del ns[name]
                undone.append(name)
            for name, value in old.items():
                if name not in ns or ns[name] is not value:
                    ns[name] = value
                    undone.append(name)
        if undone:
            shown = ", ".join(str(n) for n in undone[:5]) + (" ..." if len(undone) > 5 else "")
            report.notes.append(f"names written into the namespace during the run (by a line "
                                f"magic such as %timeit) were undone: {shown}")


def _meta_shape(runner: _Run, code_or_fn: str | Callable[[], Any], namespace: dict[str, Any]
                ) -> MetaShapeReport:
    if callable(code_or_fn) and not isinstance(code_or_fn, str):
        return _run_function(runner, code_or_fn, namespace)
    if not isinstance(code_or_fn, str):
        raise TorchMagicError(f"meta_shape needs Python source or a function; got "
                              f"{type(code_or_fn).__name__}")
    source = code_or_fn
    cell = compile_user_cell(source, "meta_shape", "run on meta")
    tree = ast.parse(source, filename=cell.filename)
    runner.filename = cell.filename
    runner.report.source = source
    statements: list[tuple[ast.stmt, Any, bool]] = []
    last = len(tree.body) - 1
    for i, stmt in enumerate(tree.body):
        if i == last and isinstance(stmt, ast.Expr):
            statements.append((stmt, compile(ast.Expression(stmt.value), cell.filename, "eval"),
                               True))
        else:
            mod = ast.Module(body=[stmt], type_ignores=[])
            statements.append((stmt, compile(mod, cell.filename, "exec"), False))
    try:
        return runner.run(namespace, statements, _used_names(tree), "cell")
    finally:
        if runner.report.error is None:
            forget(cell)


def _run_function(runner: _Run, fn: Callable[[], Any], namespace: dict[str, Any]
                  ) -> MetaShapeReport:
    if not isinstance(fn, types.FunctionType):
        raise TorchMagicError(f"meta_shape runs plain Python functions; got "
                              f"{type(fn).__name__} (wrap it: lambda: obj(...))")
    try:
        inspect.signature(fn).bind()
    except TypeError:
        raise TorchMagicError(f"{fn.__name__}() must take no arguments (make inputs inside it, "
                              "or close over them: lambda: f(model, x))") from None
    namespace = {**fn.__globals__, **namespace} if namespace is not fn.__globals__ else namespace
    used = _code_names(fn.__code__) | set(fn.__code__.co_freevars)
    runner.filename = fn.__code__.co_filename
    rep = runner.report
    name = fn.__name__

    def call(new_ns: dict[str, Any]) -> None:
        closure = None
        if fn.__closure__:
            cells = []
            for var, cell in zip(fn.__code__.co_freevars, fn.__closure__):
                try:
                    content = cell.cell_contents
                except ValueError:
                    cells.append(cell)
                    continue
                cells.append(types.CellType(new_ns.get(f"\0{var}", content)))
            closure = tuple(cells)
        bound = _rebind(fn, new_ns, closure)
        frames: dict[str, Any] = {}

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "return" and frame.f_code is fn.__code__ and "locals" not in frames:
                frames["locals"] = dict(frame.f_locals)

        prev = sys.getprofile()
        sys.setprofile(profile)
        try:
            result = bound()
        finally:
            sys.setprofile(prev)
            for var, value in frames.get("locals", {}).items():
                rep.values.append(describe_value(var, value, None))
        if result is not None:
            rep.values.append(describe_value(f"{name}()", result, None, last_expr=True))

    # closure variables are converted like globals (under private keys of the new namespace)
    if fn.__closure__:
        extra = {}
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__):
            try:
                extra[f"\0{var}"] = cell.cell_contents
            except ValueError:
                continue
        namespace = {**namespace, **extra}
        used |= set(extra)
    return runner.run(namespace, [], used, f"in {name}()", call=call)
