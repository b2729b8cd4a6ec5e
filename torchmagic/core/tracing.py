"""Follow module calls during a forward: which module runs, with which inputs and outputs.

Uses torch's *global* module hooks (``register_module_forward_pre_hook`` / ``..._forward_hook``), which
leave every module's own hook dictionaries untouched and are removed on every exit path. The stack
of running modules tells, when a forward fails, which module failed (the innermost one whose
forward had begun and not ended) and what it received.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten


def _tensor_leaves(obj: Any, depth: int = 0) -> list[Any]:
    """Leaves of ``tree_flatten``, with dataclass instances and dict/list/tuple subclasses that
    pytree does not know (a model returning ``@dataclass Output(logits=...)``) opened too; a
    top-level object of another kind (a ``torch.distributions.Categorical``) gives the tensors among
    its own attributes."""
    import dataclasses
    from collections.abc import Mapping

    out: list[Any] = []
    for leaf in tree_flatten(obj)[0]:
        if depth < 6 and not isinstance(leaf, torch.Tensor):
            if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
                out.extend(_tensor_leaves([getattr(leaf, f.name, None)
                                           for f in dataclasses.fields(leaf)], depth + 1))
                continue
            if isinstance(leaf, Mapping):
                out.extend(_tensor_leaves(list(leaf.values()), depth + 1))
                continue
            if isinstance(leaf, (list, tuple)):
                out.extend(_tensor_leaves(list(leaf), depth + 1))
                continue
            if depth == 0 and leaf is obj and not isinstance(leaf, (nn.Module, type)) and \
                    isinstance(getattr(leaf, "__dict__", None), dict):
                seen: set[int] = set()
                for v in vars(leaf).values():  # each tensor once (Categorical: _param is logits)
                    if isinstance(v, torch.Tensor) and id(v) not in seen:
                        seen.add(id(v))
                        out.append(v)
                continue
        out.append(leaf)
    return out


def output_type(obj: Any) -> str | None:
    """The type of a forward's result when it is not a tensor or a plain tuple/list/dict/None:
    ``"Categorical"``, a dataclass, a ``ModelOutput`` (``"CausalLMOutputWithPast"``), a
    namedtuple. None otherwise."""
    if obj is None or type(obj) in (tuple, list, dict) or isinstance(obj, torch.Tensor) and \
            type(obj) in (torch.Tensor, nn.Parameter):
        return None
    if isinstance(obj, torch.Tensor):
        return "nested tensor" if obj.is_nested else type(obj).__name__
    return type(obj).__name__


def shape_of(t: torch.Tensor) -> tuple[Any, ...]:
    """``t``'s shape; ragged dimensions of nested tensors as ``j1`` (jagged layout) or ``*``
    (strided layout: the sizes of the components differ there)."""
    try:
        return tuple(int(s) if not isinstance(s, torch.SymInt) else s for s in t.shape)
    except (RuntimeError, ValueError):
        pass
    if t.is_nested:
        try:
            sizes = t._nested_tensor_size()  # (components, dims) of a strided nested tensor
            dims = [int(sizes[:, i].max()) if bool((sizes[:, i] == sizes[0, i]).all()) else "*"
                    for i in range(sizes.shape[1])]
            return (int(sizes.shape[0]), *dims)
        except Exception:  # noqa: BLE001 - describe it as ragged
            return (t.size(0), "*")
    return ("?",)


def tensor_shapes(obj: Any) -> list[tuple[int, ...]]:
    """Shapes of every tensor found in a nested structure (tuple/list/dict/dataclass-like)."""
    leaves = _tensor_leaves(obj)
    return [shape_of(t) for t in leaves if isinstance(t, torch.Tensor)]


def format_shape(shape: tuple[Any, ...]) -> str:
    """``(8, 3, 32, 32)``; a scalar is ``()``."""
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def format_shapes(shapes: list[tuple[Any, ...]]) -> str:
    """One shape as ``(8, 10)``, several as ``(8, 10), (8,)``, none as ``-``."""
    if not shapes:
        return "-"
    return ", ".join(format_shape(s) for s in shapes)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested structure (each distinct tensor once)."""
    from torchmagic.core.weights import nbytes_of

    leaves = _tensor_leaves(obj)
    seen: set[int] = set()
    total = 0
    for t in leaves:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size() if type(t) is torch.Tensor and not t.is_nested \
                else nbytes_of(t)
    return total


@dataclass
class ModuleCall:
    """One call of one module."""

    path: str                      # qualified name in the traced root ("" for the root)
    cls: str                       # class name
    depth: int                     # nesting depth of the call (root = 0)
    index: int                     # order in which calls started
    parent: int | None             # index of the enclosing call
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] | None = None  # None while running / on failure
    output_bytes: int = 0
    output_type: str | None = None  # a non-tensor result's type ("Categorical", a ModelOutput)
    kwargs: list[str] = field(default_factory=list)  # keyword arguments (their shapes are last)
    extra: dict[str, Any] = field(default_factory=dict)  # per-tool data (e.g. flops)

    @property
    def finished(self) -> bool:
        return self.output_shapes is not None


class ModuleTracer:
    """Records module calls under ``root`` while active (see :func:`trace_modules`).

    ``names`` maps module ids to their qualified names in ``root`` (modules outside ``root`` are named
    by class). ``stack`` is the list of running call indices; ``calls`` every call in start order.
    ``on_enter``/``on_exit`` callbacks (``fn(call)``) let tools attach per-call data.
    """

    def __init__(self, roots: dict[str, nn.Module] | nn.Module | None = None) -> None:
        self.names: dict[int, str] = {}
        if isinstance(roots, nn.Module):
            roots = {"": roots}
        for prefix, root in (roots or {}).items():
            for name, mod in root.named_modules(remove_duplicate=False):
                full = ".".join(p for p in (prefix, name) if p)
                self.names.setdefault(id(mod), full)
        self.calls: list[ModuleCall] = []
        self.stack: list[int] = []
        self.on_enter: list[Any] = []
        self.on_exit: list[Any] = []
        self._modules: dict[int, weakref.ref[nn.Module]] = {}

    # -- hooks ---------------------------------------------------------------------------------
    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None):
        name = self.names.get(id(module))
        if name is None:
            name = type(module).__name__
        call = ModuleCall(
            path=name,
            cls=type(module).__name__,
            depth=len(self.stack),
            index=len(self.calls),
            parent=self.stack[-1] if self.stack else None,
            input_shapes=tensor_shapes((args, kwargs or {})),
        )
        self.calls.append(call)
        self.stack.append(call.index)
        self._modules[call.index] = weakref.ref(module)
        for fn in self.on_enter:
            fn(call)
        return None

    def _post(self, module: nn.Module, args: Any, *rest: Any):
        output = rest[-1]
        # Pop up to (and including) the call of this module: calls under it that raised and were
        # caught inside this module's forward never got their post hook.
        while self.stack:
            idx = self.stack.pop()
            ref = self._modules.get(idx)
            if ref is not None and ref() is module:
                call = self.calls[idx]
                call.output_shapes = tensor_shapes(output)
                call.output_bytes = tensor_bytes(output)
                call.output_type = output_type(output)
                for fn in self.on_exit:
                    fn(call)
                break
        return None

    def _pre_kwargs(self, module: nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> None:
        """A module's own ``with_kwargs`` pre-hook (see :meth:`watch_kwargs`): adds the keyword
        arguments the global hook cannot see to the call just started."""
        if not kwargs or not self.stack:
            return None
        call = self.calls[self.stack[-1]]
        ref = self._modules.get(call.index)
        if ref is None or ref() is not module or call.kwargs:
            return None
        names = [k for k, v in kwargs.items() if tensor_shapes(v)]
        if names:
            call.kwargs = names
            call.input_shapes = call.input_shapes + tensor_shapes([kwargs[k] for k in names])
        return None

    @contextlib.contextmanager
    def watch_kwargs(self, root: nn.Module) -> Iterator[None]:
        """Record the tensor keyword arguments of every call of ``root``'s modules (global module
        hooks never see them). Registers a ``with_kwargs`` forward pre-hook on each module of
        ``root``: use it on a twin torchmagic owns, never on the user's model. Always removed."""
        handles = []
        try:
            for mod in root.modules():
                handles.append(mod.register_forward_pre_hook(self._pre_kwargs, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    # -- failure -------------------------------------------------------------------------------
    @property
    def failing_call(self) -> ModuleCall | None:
        """The innermost module call still running (after an exception: the one that failed)."""
        return self.calls[self.stack[-1]] if self.stack else None

    def module_of(self, call: ModuleCall) -> nn.Module | None:
        ref = self._modules.get(call.index)
        return ref() if ref is not None else None


def describe_failure(call: ModuleCall | None, exc: BaseException, module: nn.Module | None = None) -> str:
    """``blocks.0.attn (Attention, ...): got input (8, 2048); <torch's message>`` in one line."""
    msg = " ".join(str(exc).strip().split("\n")[0].split()) or type(exc).__name__
    if call is None:
        return msg
    extra = ""
    if module is not None:
        try:
            er = module.extra_repr()
        except Exception:  # noqa: BLE001 - a user's extra_repr may fail; it is decoration only
            er = ""
        if er and len(er) <= 60:
            extra = ", " + er
    name = call.path or "<root>"
    return f"{name} ({call.cls}{extra}): got input {format_shapes(call.input_shapes)}; {msg}"


@contextlib.contextmanager
def trace_modules(tracer: ModuleTracer) -> Iterator[ModuleTracer]:
    """Install ``tracer``'s global hooks for the duration of the block; always removed."""
    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )

    h1 = register_module_forward_pre_hook(tracer._pre)
    try:
        h2 = register_module_forward_hook(tracer._post)
    except BaseException:
        h1.remove()
        raise
    try:
        yield tracer
    finally:
        h1.remove()
        h2.remove()
