"""The namespace ``%%meta_shape`` runs a cell in: a copy of the user's, with isolated twins.

:func:`build_namespace` copies the namespace (a shallow ``dict`` copy) and replaces every name the
code reads by its twin, made by one :class:`~torchmagic.core.isolation.Isolation` for the whole run:
modules become meta (or fake) twins, tensors meta (or fake) tensors, optimizers, LR schedulers and
GradScalers twins over the twin parameters (state included), containers and plain objects isolated
deep copies (their tensors converted), notebook functions are re-created over the copy (the globals
they read are twinned the same way), numpy arrays become read-only views. Whatever the code does,
it writes into twins only; an object that cannot be isolated (a generator, an open file) is refused
before anything runs, naming it. A ``PackedSequence`` keeps its real ``batch_sizes`` (CPU metadata
its kernels read, also on meta), shared read-only.
"""

from __future__ import annotations

import ast
import re
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core.isolation import ATOMS, Isolation, is_library_function
from torchmagic.core.tracing import format_shape
from torchmagic.core.twin import twin_grad_scaler, twin_lr_scheduler, twin_optimizer


# -- which names the code uses ------------------------------------------------------------------
def used_names(tree: ast.AST) -> set[str]:
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
                out |= used_names(ast.parse(node.args[-1].value))
            except SyntaxError:
                out |= set(re.findall(r"[A-Za-z_]\w*", node.args[-1].value))
    return out


def assigned_names(stmt: ast.stmt) -> list[str]:
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


# -- building the namespace -----------------------------------------------------------------------
def is_packed(obj: Any) -> bool:
    from torch.nn.utils.rnn import PackedSequence

    return isinstance(obj, PackedSequence)


def _is_ndarray(obj: Any) -> bool:
    return type(obj).__name__ == "ndarray" and type(obj).__module__ == "numpy"


def _shared(obj: Any) -> bool:
    """Values used as they are: atoms, Python modules, classes, builtins, library functions."""
    if isinstance(obj, ATOMS) or isinstance(obj, (types.ModuleType, type,
                                                  types.BuiltinFunctionType)):
        return True
    return isinstance(obj, types.FunctionType) and is_library_function(obj)


class NamespaceTwins:
    """The twins of one run and what the report says about them."""

    def __init__(self, convert: Callable[[torch.Tensor], torch.Tensor], label: str,
                 namespace: dict[str, Any], new_ns: dict[str, Any]) -> None:
        self.label = label
        self.iso = Isolation(convert, label, globals_copies={id(namespace): new_ns})
        self.converted: list[str] = []
        self.passed: list[str] = []
        self.roots: dict[str, nn.Module] = {}
        self.keep_real: set[int] = set()    # ids of real tensors the twins share (read only)

    def _pre(self, obj: Any) -> None:
        """Shared real metadata: a PackedSequence's batch_sizes (meta only)."""
        if self.label == "meta" and is_packed(obj):
            bs = obj.batch_sizes
            self.iso.share(bs)
            self.keep_real.add(id(bs))

    def twin(self, name: str, obj: Any) -> Any:
        """The twin of ``obj`` bound to ``name`` (raises IsolationError, a TorchMagicError)."""
        iso = self.iso
        before = iso.converted
        if _is_ndarray(obj):
            self.passed.append(f"{name}: numpy array {format_shape(tuple(obj.shape))} passed "
                               "read-only (torch.as_tensor(arr) in the cell gives a "
                               f"{self.label} tensor)")
        self._scan_packed(obj)
        if isinstance(obj, torch.optim.Optimizer):
            new = twin_optimizer(obj, isolation=iso, name=name)
            what = f"{type(obj).__name__} -> {self.label} twin over the twin parameters"
        elif hasattr(obj, "optimizer") and hasattr(obj, "base_lrs") and hasattr(obj, "step"):
            new = twin_lr_scheduler(obj, isolation=iso, name=name)
            what = f"{type(obj).__name__} -> twin over the twin optimizer"
        elif isinstance(obj, torch.amp.GradScaler):
            new = twin_grad_scaler(obj, isolation=iso, name=name)
            what = f"GradScaler -> {self.label} twin"
        else:
            new = iso.copy(obj, name)
            what = ""
        if isinstance(obj, nn.Module):
            n = sum(p.numel() for p in obj.parameters())
            self.converted.append(f"{name}: {type(obj).__name__} -> {self.label} twin "
                                  f"({n:,} params)")
            self.roots[name] = new
        elif isinstance(obj, torch.Tensor):
            self.converted.append(f"{name}: tensor {format_shape(tuple(obj.shape))} "
                                  f"{str(obj.dtype).replace('torch.', '')} on {obj.device} -> "
                                  f"{self.label}")
        elif what:
            self.converted.append(f"{name}: {what}")
        elif iso.converted > before or self._holds_module(new):
            self.converted.append(f"{name}: {type(obj).__name__} of tensors/modules -> "
                                  f"{self.label} copies")
            self._root_modules(name, new)
        return new

    def _scan_packed(self, obj: Any, depth: int = 0) -> None:
        if depth > 3:
            return
        if is_packed(obj):
            self._pre(obj)
        elif isinstance(obj, (list, tuple)) and len(obj) <= 1000:
            for v in obj:
                self._scan_packed(v, depth + 1)
        elif isinstance(obj, dict) and len(obj) <= 1000:
            for v in obj.values():
                self._scan_packed(v, depth + 1)

    @staticmethod
    def _holds_module(obj: Any) -> bool:
        if isinstance(obj, (list, tuple)) and len(obj) <= 1000:
            return any(isinstance(v, nn.Module) for v in obj)
        if isinstance(obj, dict) and len(obj) <= 1000:
            return any(isinstance(v, nn.Module) for v in obj.values())
        return False

    def _root_modules(self, name: str, obj: Any) -> None:
        if isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                if isinstance(v, nn.Module):
                    self.roots[f"{name}[{i}]"] = v
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, nn.Module):
                    self.roots[f"{name}[{k!r}]"] = v


def build_namespace(namespace: dict[str, Any], names: set[str], twins: NamespaceTwins,
                    new_ns: dict[str, Any]) -> dict[str, Any]:
    """Fill ``new_ns`` (a shallow copy of ``namespace``) with the twins of the used ``names``
    (notebook functions are re-created over ``new_ns``; the names they read are twinned too).
    Raises :class:`~torchmagic.core.isolation.IsolationError` naming what cannot be isolated."""
    for name in sorted(names):
        if name not in namespace:
            continue
        obj = namespace[name]
        if _shared(obj):
            continue
        new_ns[name] = twins.twin(name.lstrip("\0"), obj)
    twins.iso.flush()
    return new_ns


__all__ = ["NamespaceTwins", "assigned_names", "build_namespace", "is_packed", "used_names"]
