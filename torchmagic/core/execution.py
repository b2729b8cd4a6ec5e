"""Run a block of Python code the way IPython runs a cell, without IPython.

The code is parsed to an AST; every statement but a final expression is executed, the final
expression is evaluated and its value returned (so a cell magic can hand it back to IPython for
display). Source lines are registered in ``linecache`` under a stable name so tracebacks and
``warnings`` show the user's lines, and :func:`cell_line_of` finds the cell line in a traceback.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import itertools
import linecache
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

_counter = itertools.count(1)


@dataclass
class CompiledCell:
    """A cell compiled for :func:`run_compiled`."""

    filename: str
    source: str
    body: Any          # code object of every statement except a trailing expression
    last_expr: Any     # code object of the trailing expression, or None
    assigned: list[str]  # names bound at the top level, in order (for reports)


def _top_level_targets(tree: ast.Module) -> list[str]:
    names: list[str] = []

    def add(target: ast.AST) -> None:
        if isinstance(target, ast.Name):
            if target.id not in names:
                names.append(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                add(elt)
        elif isinstance(target, ast.Starred):
            add(target.value)

    for node in tree.body:
        if isinstance(node, ast.Assign):
            for t in node.targets:
                add(t)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            add(node.target)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            add(node.target)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                if item.optional_vars is not None:
                    add(item.optional_vars)
    return names


def compile_cell(source: str, label: str = "cell") -> CompiledCell:
    """Compile ``source`` (already transformed by IPython when run from a magic).

    Raises ``SyntaxError`` for invalid code (the caller turns it into a one-line message).
    """
    filename = f"<torchmagic-{label}-{next(_counter)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tree = ast.parse(source, filename=filename, mode="exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last_node = tree.body.pop()
        last = compile(ast.Expression(last_node.value), filename, "eval")
    body = compile(tree, filename, "exec")
    return CompiledCell(filename, source, body, last, _top_level_targets(tree))


def run_compiled(cell: CompiledCell, namespace: dict[str, Any]) -> Any:
    """Execute a compiled cell in ``namespace``; return the value of its trailing expression."""
    __tracebackhide__ = True  # IPython shows the user's frames, not ours
    exec(cell.body, namespace)  # noqa: S102 - running the user's own cell is the point
    if cell.last_expr is not None:
        return eval(cell.last_expr, namespace)  # noqa: S307
    return None


def run_code(source: str | Callable[[], Any], namespace: dict[str, Any] | None = None,
             label: str = "cell") -> Any:
    """Run a code string (or call a function) and return the value of its trailing expression."""
    if callable(source):
        return source()
    ns = {} if namespace is None else namespace
    return run_compiled(compile_cell(source, label), ns)


def cell_line_of(tb: TracebackType | None, filename: str) -> int | None:
    """The innermost line number of ``filename`` in a traceback (the cell line that failed)."""
    line = None
    for frame, lineno in traceback.walk_tb(tb):
        if frame.f_code.co_filename == filename:
            line = lineno
    return line


def user_frames(tb: TracebackType | None) -> list[traceback.FrameSummary]:
    """Frames of a traceback outside torch and torchmagic (the user's own code)."""
    out = []
    for fs in traceback.extract_tb(tb):
        f = fs.filename.replace("\\", "/")
        if "/torch/" in f or "/torchmagic/" in f or f.startswith("<frozen"):
            continue
        out.append(fs)
    return out


def forget(cell: CompiledCell) -> None:
    """Drop a compiled cell's source from ``linecache`` (optional tidy-up)."""
    linecache.cache.pop(cell.filename, None)


def compile_user_cell(source: str, label: str, purpose: str = "run") -> CompiledCell:
    """:func:`compile_cell` for a magic's cell body: an empty cell, a cell of comments only, or
    invalid Python is a one-line :class:`~torchmagic.core.errors.TorchMagicError` saying what to
    write (``purpose`` completes "put the code to ... in the cell")."""
    from torchmagic.core.errors import TorchMagicError

    if not source.strip():
        raise TorchMagicError(f"the cell is empty: put the code to {purpose} in the cell, below "
                              "the magic line")
    try:
        cell = compile_cell(source, label)
    except SyntaxError as exc:
        where = f"line {exc.lineno}: " if exc.lineno else ""
        raise TorchMagicError(f"the cell is not valid Python ({where}{exc.msg})") from None
    if cell.last_expr is None and not ast.parse(source).body:
        raise TorchMagicError(f"the cell has only comments: put the code to {purpose} in the cell")
    return cell


# -- running a cell on a copy of the namespace ----------------------------------------------------
def rebind_function(fn: types.FunctionType, globals_: dict[str, Any],
                    closure: tuple[Any, ...] | None = None) -> types.FunctionType:
    """``fn`` re-created with ``globals_`` (and ``closure``): ``global x; x = ...`` inside it then
    writes into ``globals_``, not into the namespace it was defined in."""
    new = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__,
                             closure if closure is not None else fn.__closure__)
    new.__kwdefaults__ = copy.copy(fn.__kwdefaults__)
    new.__qualname__ = fn.__qualname__
    new.__dict__.update(fn.__dict__)
    new.__wrapped_original__ = fn  # type: ignore[attr-defined]
    return new


def namespace_copy(namespace: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``namespace`` in which the functions defined in it (notebook functions)
    are re-bound to the copy: code run in the copy, and the functions it calls, assign names in
    the copy only (``global counter; counter += 1`` included)."""
    ns = dict(namespace)
    for name, value in namespace.items():
        if isinstance(value, types.FunctionType) and value.__globals__ is namespace:
            ns[name] = rebind_function(value, ns)
    return ns


@contextlib.contextmanager
def namespace_guard(namespaces: list[dict[str, Any]],
                    on_undone: Callable[[list[str]], None] | None = None) -> Iterator[None]:
    """Undo any binding made in ``namespaces`` during the block (code that runs on a copy of the
    namespace may still reach the real one: ``get_ipython().user_ns[...] = ...``, a line magic
    such as ``%time x = ...``): new names are removed and rebound names restored, on every path.
    ``on_undone(names)`` is told what was undone."""
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
        if undone and on_undone is not None:
            on_undone(undone)
