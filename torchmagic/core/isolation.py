"""Isolated copies of user objects: what :func:`torchmagic.core.twin.twin` is built on.

An :class:`Isolation` turns user objects into twins that share nothing mutable with the originals:

- every tensor becomes ``convert(t)`` (a meta tensor, a fake tensor, a copy on another device), each
  tensor once, so tied weights stay tied and a buffer and its view stay one storage;
- Python attributes, containers and plain objects are deep-copied (``copy.deepcopy`` with the
  tensor memo): ``self.steps += 1`` or ``cfg["lr"] = 5`` on the twin leaves the original as it was;
- user functions (hooks, functions stored on modules, notebook functions, functions a hook calls)
  are re-created over copies of their closure cells and of the globals they read, in a copy of
  their globals dict: a forward hook that appends outputs to a list, or does ``global counter;
  counter += 1``, changes the twin's list and counter, never the user's. A bound method's owner is
  copied with it. Library functions (torch, the standard library, site-packages) are shared;
- objects that are safe to share stay shared: Python modules, classes, locks and other threading
  primitives (acquiring a lock changes nothing a user sees), loggers;
- objects that cannot be copied and must not be shared (generators, files, sockets, threads, ...)
  are refused before anything runs, with one line naming the object, where it was found and why.

Functions and objects met again keep their identity (one memo for the whole run), so a notebook
namespace twinned name by name stays consistent: ``head is model[1]`` holds for the twins.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import itertools
import logging
import os
import socket
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core.errors import TorchMagicError, a_type

ATOMS = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size,
         range, slice, type(Ellipsis), type(NotImplemented), torch.layout, torch.memory_format)
_LOCKS = (type(threading.Lock()), type(threading.RLock()), threading.Event, threading.Condition,
          threading.Semaphore, threading.BoundedSemaphore, threading.Barrier, logging.Logger,
          logging.Handler, weakref.ref)
_REFUSED: tuple[tuple[type, str], ...] = (
    (types.GeneratorType, "a generator: running the code would advance the real one"),
    (types.CoroutineType, "a coroutine"),
    (types.AsyncGeneratorType, "an async generator"),
    (io.IOBase, "an open file or stream: the code would read or write the real one"),
    (socket.socket, "a socket"),
    (threading.Thread, "a thread"),
    (types.FrameType, "a frame"),
    (types.TracebackType, "a traceback"),
)
_LIB_DIRS = tuple({os.path.realpath(p) for p in (
    sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("platstdlib"),
    sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib"),
    os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)),
) if p})
_lib_cache: dict[str, bool] = {}


class IsolationError(TorchMagicError):
    """An object cannot be isolated (copied without sharing state with the original)."""


def is_library_function(fn: types.FunctionType) -> bool:
    """True for functions of torch, torchmagic, the standard library and installed packages
    (shared by twins: they keep no user state); False for notebook cells and user files."""
    filename = fn.__code__.co_filename
    hit = _lib_cache.get(filename)
    if hit is None:
        if filename.startswith("<"):
            hit = filename.startswith("<frozen")  # frozen standard-library modules
        else:
            real = os.path.realpath(filename)
            hit = any(real.startswith(d + os.sep) for d in _LIB_DIRS)
        _lib_cache[filename] = hit
    return hit


def is_user_file(filename: str) -> bool:
    """True for code the user wrote: a notebook cell, a cell torchmagic compiled, a user file
    (not torch, torchmagic, the standard library or an installed package)."""
    if filename.startswith("<"):
        return not filename.startswith("<frozen")
    real = os.path.realpath(filename)
    return not any(real.startswith(d + os.sep) for d in _LIB_DIRS)


def code_names(code: types.CodeType) -> set[str]:
    """Global names a code object (and the functions nested in it) may read."""
    out = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= code_names(const)
    return out


def _describe(path: str, obj: Any) -> str:
    return f"{path} ({type(obj).__name__})" if path else type(obj).__name__


class Isolation:
    """One isolation run: a shared memo of twins (see the module docstring).

    ``convert(t)`` makes the twin of a tensor. ``label`` names the twins in messages ("meta",
    "fake", "cpu"). ``globals_copies`` maps ``id(globals dict)`` to the dict that replaces it for
    re-created functions (``%%meta_shape`` passes its copy of the notebook namespace, so that
    notebook functions and hooks defined in the notebook see the twins). ``budget`` bounds the
    objects visited (a copy bigger than that is refused, naming where it grew).
    """

    def __init__(self, convert: Callable[[torch.Tensor], torch.Tensor], label: str = "twin", *,
                 globals_copies: dict[int, dict[str, Any]] | None = None,
                 budget: int = 500_000) -> None:
        self.convert = convert
        self.label = label
        self.memo: dict[int, Any] = {}
        self.keep: list[Any] = []            # originals kept alive while their ids are memo keys
        self.globals_copies = dict(globals_copies or {})
        self._globals_done: dict[int, set[str]] = {}
        self._pending: list[Callable[[], None]] = []
        self._seen: set[int] = set()
        self.budget = budget
        self.converted = 0                   # tensors converted
        self.functions = 0                   # user functions re-created

    # -- entries of the memo ---------------------------------------------------------------------
    def share(self, obj: Any) -> None:
        """``obj`` is used as it is by the twins (never copied)."""
        self.memo[id(obj)] = obj
        self.keep.append(obj)

    def set_twin(self, obj: Any, twin: Any) -> None:
        self.memo[id(obj)] = twin
        self.keep.append(obj)

    def tensor(self, t: torch.Tensor, path: str = "") -> torch.Tensor:
        """The twin of tensor ``t`` (made once). Raises :class:`IsolationError` naming ``path``
        when ``convert`` cannot make one (a quantized tensor has no meta form)."""
        out = self.memo.get(id(t))
        if out is None:
            try:
                out = self.convert(t)
            except Exception as exc:  # noqa: BLE001 - named, one line
                from torchmagic.core import access

                why = " ".join(str(exc).split())[:100]
                raise IsolationError(
                    f"cannot make a {self.label} twin: {path or 'a tensor'} is "
                    f"{access.describe(t)}, which has no {self.label} form ({type(exc).__name__}: "
                    f"{why}); nothing was run") from None
            self.memo[id(t)] = out
            self.keep.append(t)
            self.converted += 1
        return out

    # -- copying ------------------------------------------------------------------------------------
    def copy(self, obj: Any, path: str = "") -> Any:
        """An isolated twin of ``obj`` (``path`` names it in messages, e.g. the variable name)."""
        self.scan(obj, path)
        self.flush()
        return self._deepcopy(obj, path)

    def scan(self, obj: Any, path: str = "") -> None:
        """Visit what ``obj`` holds: convert tensors, prepare user functions, refuse what cannot
        be isolated. Raises :class:`IsolationError`."""
        stack: list[tuple[Any, str, int]] = [(obj, path, 0)]
        while stack:
            item, where, depth = stack.pop()
            self._visit(item, where, depth, stack)

    def flush(self) -> None:
        """Fill the closures and globals of the re-created functions (after every scan)."""
        while self._pending:
            self._pending.pop(0)()

    def _deepcopy(self, obj: Any, path: str) -> Any:
        try:
            return copy.deepcopy(obj, self.memo)
        except IsolationError:
            raise
        except RecursionError:
            raise IsolationError(f"cannot make a {self.label} twin of {_describe(path, obj)}: it "
                                 "nests too deeply to copy") from None
        except Exception as exc:  # noqa: BLE001 - named with the object that failed
            where, bad = self._culprit(obj, path)
            why = " ".join(str(exc).split())[:120]
            raise IsolationError(
                f"cannot make a {self.label} twin of {_describe(path, obj)}: {where} is "
                f"{a_type(bad)}, which cannot be copied ({type(exc).__name__}: {why}); the code "
                "would run on the real object, so nothing was run (bind what the code needs to a "
                "name of its own first, e.g. model = trainer.model)") from None

    def _culprit(self, obj: Any, path: str, depth: int = 0) -> tuple[str, Any]:
        """The innermost part of ``obj`` that fails to copy (for the message)."""
        for child_path, child in _children(obj, path):
            if depth > 12:
                break
            try:
                copy.deepcopy(child, dict(self.memo))
            except Exception:  # noqa: BLE001
                return self._culprit(child, child_path, depth + 1)
        return path or type(obj).__name__, obj

    # -- the walk ---------------------------------------------------------------------------------
    def _visit(self, obj: Any, path: str, depth: int, stack: list[tuple[Any, str, int]]) -> None:
        if isinstance(obj, ATOMS) or id(obj) in self.memo:
            return
        if isinstance(obj, torch.Tensor):
            self.tensor(obj, path)
            return
        if id(obj) in self._seen:
            return
        self._seen.add(id(obj))
        self.keep.append(obj)
        self.budget -= 1
        if self.budget < 0:
            raise IsolationError(f"cannot make a {self.label} twin: too much to copy (the limit "
                                 f"of objects was reached at {_describe(path, obj)})")
        if isinstance(obj, (types.ModuleType, type, types.BuiltinFunctionType,
                            types.BuiltinMethodType, types.WrapperDescriptorType,
                            types.MethodDescriptorType, types.MethodWrapperType,
                            types.GetSetDescriptorType, types.MemberDescriptorType)) \
                or isinstance(obj, _LOCKS) or _library_callable(obj) or _environment(obj):
            self.share(obj)
            return
        for kind, why in _REFUSED:
            if isinstance(obj, kind):
                raise IsolationError(
                    f"cannot make a {self.label} twin: {_describe(path, obj)} is {why}; it cannot "
                    "be copied and the code must not use the real one, so nothing was run")
        if isinstance(obj, torch.Generator):
            twin = torch.Generator(device=obj.device)
            twin.set_state(obj.get_state())
            self.set_twin(obj, twin)
            return
        if _is_ndarray(obj):
            view = obj.view()  # numpy: a read-only view shares the data and cannot write it
            view.flags.writeable = False
            self.set_twin(obj, view)
            return
        if isinstance(obj, types.FunctionType):
            if not is_library_function(obj):
                self._function(obj, path, depth, stack)
            return
        if isinstance(obj, types.MethodType):
            stack.append((obj.__self__, f"{path}.__self__", depth + 1))
            return
        if isinstance(obj, functools.partial):
            stack.append((obj.func, f"{path}.func", depth + 1))
            stack.extend((a, f"{path}.args[{i}]", depth + 1) for i, a in enumerate(obj.args))
            stack.extend((v, f"{path}.keywords[{k!r}]", depth + 1)
                         for k, v in obj.keywords.items())
            return
        stack.extend((child, child_path, depth + 1) for child_path, child in _children(obj, path))

    def _function(self, fn: types.FunctionType, path: str, depth: int,
                  stack: list[tuple[Any, str, int]]) -> None:
        """Re-create a user function over isolated closure cells and globals."""
        g = fn.__globals__
        new_g = self.globals_copies.get(id(g))
        if new_g is None:
            new_g = _globals_copy(g)
            self.globals_copies[id(g)] = new_g
        self.keep.append(g)
        cells = tuple(types.CellType() for _ in fn.__closure__) if fn.__closure__ else None
        new = types.FunctionType(fn.__code__, new_g, fn.__name__, None, cells)
        new.__qualname__ = fn.__qualname__
        new.__module__ = fn.__module__
        new.__doc__ = fn.__doc__
        self.set_twin(fn, new)
        self.functions += 1
        where = path or fn.__qualname__
        if fn.__defaults__:
            stack.append((fn.__defaults__, f"{where} defaults", depth + 1))
            self._pending.append(lambda: setattr(new, "__defaults__",
                                                 copy.deepcopy(fn.__defaults__, self.memo)))
        if fn.__kwdefaults__:
            stack.append((fn.__kwdefaults__, f"{where} defaults", depth + 1))
            self._pending.append(lambda: setattr(new, "__kwdefaults__",
                                                 copy.deepcopy(fn.__kwdefaults__, self.memo)))
        if fn.__dict__:
            stack.append((fn.__dict__, f"{where}.__dict__", depth + 1))
            self._pending.append(lambda: new.__dict__.update(copy.deepcopy(fn.__dict__,
                                                                            self.memo)))
        if fn.__closure__:
            for var, old, cell in zip(fn.__code__.co_freevars, fn.__closure__, cells or ()):
                try:
                    value = old.cell_contents
                except ValueError:  # an empty cell (a variable not assigned yet)
                    continue
                stack.append((value, f"{where} (closure variable {var!r})", depth + 1))
                self._pending.append(functools.partial(_fill_cell, cell, value, self.memo))
        done = self._globals_done.setdefault(id(new_g), set())
        for name in sorted(code_names(fn.__code__)):
            if name in done or name not in g or name.startswith("__"):
                continue
            done.add(name)
            value = g[name]
            if isinstance(value, ATOMS):
                continue
            stack.append((value, f"global {name!r} of {where}", depth + 1))
            self._pending.append(functools.partial(_fill_global, new_g, name, value, self.memo))


_LIBRARY_ROOTS = ("torch", "torchmagic", "numpy", "functools", "operator", "math")

_IMPORTABLE: list[list[str]] = []  # open importable_globals() scopes: the module names made
_IMPORTABLE_IDS = itertools.count()


@contextlib.contextmanager
def importable_globals() -> Iterator[None]:
    """Inside it, user functions that twins re-create (hooks, forwards written in a notebook)
    get globals that are the ``__dict__`` of a module registered in ``sys.modules`` under a
    private name, instead of a plain dict copy. ``torch._dynamo`` finds the globals of a
    function it inlines by importing ``globals()["__name__"]``: with a plain copy, a compiled
    hook would read and append to the user's own objects. The modules leave ``sys.modules`` on
    exit (nothing of the run stays referenced)."""
    names: list[str] = []
    _IMPORTABLE.append(names)
    try:
        yield
    finally:
        _IMPORTABLE.remove(names)
        for name in names:
            sys.modules.pop(name, None)


def _globals_copy(g: dict[str, Any]) -> dict[str, Any]:
    if not _IMPORTABLE:
        return dict(g)
    name = f"_torchmagic_twin_globals_{next(_IMPORTABLE_IDS)}"
    module = types.ModuleType(name)
    module.__dict__.update(g)
    module.__dict__["__name__"] = name
    sys.modules[name] = module
    _IMPORTABLE[-1].append(name)
    return module.__dict__


_SHARED_CALLABLES = {"OpOverloadPacket", "OpOverload", "CustomOpDef", "HigherOrderOperator",
                     "_OpNamespace", "ufunc", "_ParamSpecVariable"}


def _library_callable(obj: Any) -> bool:
    """A library's operator object (a torch op, a custom op, a numpy ufunc): stateless, shared.
    Other library callables are copied like any object (a module hook wrapper holds a reference
    to its module, which the twin must not share)."""
    cls = type(obj)
    return cls.__name__ in _SHARED_CALLABLES and cls.__module__.split(".")[0] in _LIBRARY_ROOTS


_ENVIRONMENT_ROOTS = ("IPython", "ipykernel", "traitlets", "zmq", "tornado", "jupyter_client",
                      "ipywidgets", "comm", "_pytest", "pytest", "pluggy")


def _environment(obj: Any) -> bool:
    """The notebook machinery (the IPython shell, ``get_ipython``, ``exit``...): shared, the code
    uses it as a cell would."""
    return type(obj).__module__.split(".")[0] in _ENVIRONMENT_ROOTS


def _fill_cell(cell: Any, value: Any, memo: dict[int, Any]) -> None:
    cell.cell_contents = copy.deepcopy(value, memo)


def _fill_global(globals_: dict[str, Any], name: str, value: Any, memo: dict[int, Any]) -> None:
    globals_[name] = copy.deepcopy(value, memo)


def _is_ndarray(obj: Any) -> bool:
    return type(obj).__name__ == "ndarray" and type(obj).__module__ == "numpy"


_MODULE_SKIP = {"_parameters", "_buffers", "_modules"}


def _children(obj: Any, path: str) -> list[tuple[str, Any]]:
    """What a deep copy of ``obj`` copies: items of containers, a module's parameters, buffers,
    submodules and attributes, an object's ``__dict__`` and ``__slots__``."""
    out: list[tuple[str, Any]] = []
    try:
        if isinstance(obj, nn.Module):
            out += [(f"{path}.{k}", v) for k, v in obj._parameters.items() if v is not None]
            out += [(f"{path}.{k}", v) for k, v in obj._buffers.items() if v is not None]
            out += [(f"{path}.{k}", v) for k, v in obj._modules.items() if v is not None]
            out += [(f"{path}.{k}", v) for k, v in vars(obj).items() if k not in _MODULE_SKIP]
            return out
        if isinstance(obj, torch.optim.Optimizer):
            out += [(f"{path}.param_groups", obj.param_groups), (f"{path}.state", obj.state),
                    (f"{path}.defaults", obj.defaults)]
            return out
        if isinstance(obj, dict):
            for k, v in obj.items():
                out.append((f"{path}[{k!r}]" if isinstance(k, (str, int)) else f"{path} key",
                            k))
                out.append((f"{path}[{k!r}]" if isinstance(k, (str, int)) else f"{path}[...]",
                            v))
            return out
        if isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
            return [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        if dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            state = getattr(obj, "__dict__", None)
            if isinstance(state, dict):
                out += [(f"{path}.{k}", v) for k, v in state.items()]
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()) if isinstance(
                    getattr(cls, "__slots__", ()), (tuple, list)) else ():
                if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                    out.append((f"{path}.{slot}", getattr(obj, slot)))
    except Exception:  # noqa: BLE001 - an object whose attributes cannot be listed
        return out
    return out


__all__ = ["ATOMS", "Isolation", "IsolationError", "code_names", "is_library_function",
           "is_user_file"]
