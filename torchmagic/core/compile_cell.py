"""A notebook cell as one Python function, so ``torch.compile`` can trace it.

A cell's top-level code cannot be compiled as it stands (module code reads and writes names with
``LOAD_NAME``/``STORE_NAME``), and declaring its names ``global`` trips a dynamo bug (a global the
frame creates and then reads is "not found in builtins", and the whole frame is skipped). So
:func:`cell_function` rewrites the cell into::

    def <cell>(x, model, ...):          # names the cell assigns that exist in the namespace
        ...the cell's statements...     # (same lines: tracebacks and graph breaks point at them)
        return (<last expression>, (x, model, y, ...))

Names the cell only reads stay globals of the function (the namespace); names it assigns are
locals, passed in when they already exist (so ``x = x * 2`` works) and otherwise start unbound
(a sentinel). After the call :meth:`CellFunction.write_back` puts the assigned names into the
namespace, as running the cell would (``del name`` removes it). Differences from a plain cell, all
documented in ``%%compile?``: assignments land when the cell ends (not at all when it raises);
functions defined in the cell see the cell's names as closures; ``from m import *`` and ``global``
of a name the cell also assigns are refused.
"""

from __future__ import annotations

import ast
import symtable
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from torchmagic.core.errors import TorchMagicError
from torchmagic.core.execution import CompiledCell, compile_user_cell


class _Unbound:
    """The value of a name the cell assigns before it is assigned (not in the namespace yet)."""

    def __repr__(self) -> str:
        return "<unbound: assigned later in the cell>"


UNBOUND = _Unbound()
_UNBOUND_NAME = "__torchmagic_unbound__"
FUNCTION_NAME = "<cell>"


@dataclass
class CellFunction:
    """The cell compiled into a function: ``call(namespace)`` runs it, ``write_back`` applies its
    assignments. ``code`` is the function's code object (what dynamo caches on)."""

    cell: CompiledCell
    code: types.CodeType
    names: list[str]       # names the cell binds, in order of first binding
    reads: list[str]       # names the cell reads from the namespace (its globals)

    @property
    def filename(self) -> str:
        return self.cell.filename

    def function(self, namespace: dict[str, Any]) -> types.FunctionType:
        """The cell as a function whose globals are ``namespace``."""
        namespace.setdefault("__builtins__", __builtins__)
        fn = types.FunctionType(self.code, namespace, FUNCTION_NAME, (UNBOUND,))
        fn.__qualname__ = FUNCTION_NAME
        return fn

    def arguments(self, namespace: Mapping[str, Any]) -> tuple[Any, ...]:
        """Current values of the assigned names (``UNBOUND`` for those not defined yet)."""
        return tuple(namespace.get(n, UNBOUND) for n in self.names)

    def write_back(self, namespace: dict[str, Any], values: Iterable[Any]) -> None:
        """Bind the cell's final values in ``namespace`` (an unbound name is removed)."""
        for name, value in zip(self.names, values):
            if value is UNBOUND:
                namespace.pop(name, None)
            else:
                namespace[name] = value


class _Deletes(ast.NodeTransformer):
    """``del x`` of a cell-level name -> ``del x; x = <unbound>`` (the name stays readable at the
    end of the function, where its final value is collected)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:  # nested scopes are left alone
        return node

    visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = visit_FunctionDef
    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = visit_FunctionDef

    def visit_Delete(self, node: ast.Delete) -> Any:
        gone = [t.id for t in node.targets if isinstance(t, ast.Name) and t.id in self.names]
        if not gone:
            return node
        out: list[ast.stmt] = [node]
        for name in gone:
            assign = ast.Assign(targets=[ast.Name(name, ast.Store())],
                                value=ast.Name(_UNBOUND_NAME, ast.Load()))
            out.append(ast.copy_location(assign, node))
        return out


def _bound_names(source: str, filename: str) -> tuple[list[str], list[str]]:
    table = symtable.symtable(source, filename, "exec")
    assigned: list[str] = []
    reads: list[str] = []
    for sym in table.get_symbols():
        name = sym.get_name()
        if sym.is_assigned() or sym.is_imported() or sym.is_namespace():
            if sym.is_declared_global():
                raise TorchMagicError(f"the cell declares `global {name}` and assigns it: remove "
                                      "the global statement (the cell's names land in the "
                                      "namespace anyway)")
            assigned.append(name)
        elif sym.is_referenced():
            reads.append(name)
    order = {}
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in assigned:
            order.setdefault(node.id, (node.lineno, node.col_offset))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            order.setdefault(node.name, (node.lineno, node.col_offset))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                order.setdefault(alias.asname or alias.name.split(".")[0],
                                 (node.lineno, node.col_offset))
    assigned.sort(key=lambda n: order.get(n, (10**9, 0)))
    return assigned, reads


def cell_function(source: str, label: str = "compile") -> CellFunction:
    """Compile a (transformed) cell into a :class:`CellFunction`.

    Raises :class:`TorchMagicError` for an empty or invalid cell, ``from m import *`` and names
    declared ``global`` that the cell also assigns.
    """
    cell = compile_user_cell(source, label, "compile")
    tree = ast.parse(source, filename=cell.filename, mode="exec")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            raise TorchMagicError(f"line {node.lineno}: `from {node.module} import *` cannot run "
                                  "inside the compiled cell function; import in another cell")
    names, reads = _bound_names(source, cell.filename)
    if _UNBOUND_NAME in names or _UNBOUND_NAME in reads:
        raise TorchMagicError(f"the name {_UNBOUND_NAME} is reserved by %%compile")
    body: list[ast.stmt] = list(tree.body)
    last_value: ast.expr = ast.Constant(None)
    if body and isinstance(body[-1], ast.Expr):
        last_value = body.pop().value  # type: ignore[attr-defined]
    if not body:
        body = [ast.Pass()]
    body = _Deletes(set(names)).visit(ast.Module(body=body, type_ignores=[])).body
    end = ast.Tuple([last_value, ast.Tuple([ast.Name(n, ast.Load()) for n in names], ast.Load())],
                    ast.Load())
    ret = ast.Return(end)
    anchor = last_value if hasattr(last_value, "lineno") else body[-1]
    ast.copy_location(ret, anchor)
    # the sentinel comes in as a last argument with a default (never the user's namespace)
    args = ast.arguments(posonlyargs=[], args=[ast.arg(n) for n in [*names, _UNBOUND_NAME]],
                         vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None,
                         defaults=[ast.Constant(None)])
    fn = ast.FunctionDef(name="__torchmagic_cell__", args=args, body=[*body, ret],
                         decorator_list=[], returns=None, type_comment=None, type_params=[])
    ast.copy_location(fn, tree.body[0] if tree.body else ret)
    module = ast.Module(body=[fn], type_ignores=[])
    ast.fix_missing_locations(module)
    try:
        code = compile(module, cell.filename, "exec")
    except SyntaxError as exc:
        raise TorchMagicError(f"the cell cannot become a function (line {exc.lineno}: "
                              f"{exc.msg})") from None
    fcode = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    fcode = fcode.replace(co_name=FUNCTION_NAME, co_qualname=FUNCTION_NAME)
    return CellFunction(cell, fcode, names, reads)


def modules_named(namespace: Mapping[str, Any], names: Iterable[str]) -> dict[str, nn.Module]:
    """The ``nn.Module`` objects bound to ``names`` in ``namespace``."""
    return {n: namespace[n] for n in names if isinstance(namespace.get(n), nn.Module)}


def shared_twins(modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Structural twins of ``modules`` made together (one isolation run,
    :mod:`torchmagic.core.isolation`): own Python attributes, training flags, hooks' side effects
    and buffers (copied), the same Parameter objects (a forward only reads them). Modules nested
    in one another stay nested in their twins.

    Raises :class:`TorchMagicError` (one line, naming the object) when a module holds something
    that can be neither copied nor shared.
    """
    import torch

    from torchmagic.core.twin import Isolation, twin

    def convert(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter):
            return t
        with torch.no_grad():
            return t.detach().clone()

    iso = Isolation(convert, "private copy")
    return {name: twin(mod, isolation=iso, name=name) for name, mod in modules.items()}


__all__ = ["UNBOUND", "CellFunction", "cell_function", "modules_named", "shared_twins"]
