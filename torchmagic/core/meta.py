"""``meta_shape``: run a cell (or a function) on the meta device and report every shape it produces.

What ships:

- :func:`meta_shape` runs code in a *new* namespace: a shallow copy of the user's namespace in which
  the names the code uses are replaced by isolated twins (:mod:`torchmagic.core.meta_namespace`).
  Modules become meta twins (``copy.deepcopy`` with a memo of meta tensors: no weight is read, tied
  weights stay tied), tensors become uninitialised meta tensors, optimizers, LR schedulers and
  GradScalers become twins over the twin parameters (state included), containers and plain objects
  are isolated copies, the side effects of hooks land on copies, numpy arrays are passed as read-only
  views and notebook functions are re-created over the new namespace. The user's namespace and
  objects are never written to; an object that cannot be isolated (a generator, an open file) is
  refused before anything runs, with one line naming it.
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
  and the op; ``err.partial`` is the report gathered up to that point. Code that reads values
  (``.item()``, ``.tolist()``, ``nonzero``, boolean masks, ``unique``) stops a meta run; the code
  then runs again with ``fake=True`` (a note in the report says so), and a Python branch on such a
  value (``if t.sum() > 0``) stops with the reason. ``%%estimate`` (``_setup``) never reruns.
  ``KeyboardInterrupt`` propagates after everything is restored.
"""

from __future__ import annotations

import ast
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.execution import (
    compile_user_cell,
    forget,
    namespace_guard,
    rebind_function,
)
from torchmagic.core.isolation import code_names
from torchmagic.core.meta_namespace import used_names
from torchmagic.core.meta_report import CallRow, MetaShapeReport, ValueInfo, describe_value
from torchmagic.core.meta_run import _Run

__all__ = ["MetaShapeReport", "ValueInfo", "CallRow", "meta_shape"]


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
    if _setup is not None:  # %%estimate: its tensor converter and memory tracker
        _setup(runner)
    guarded = [namespace]
    if isinstance(code_or_fn, types.FunctionType) and code_or_fn.__globals__ is not namespace:
        guarded.append(code_or_fn.__globals__)
    with namespace_guard(guarded, _undone_note(runner.report)):
        try:
            return _meta_shape(runner, code_or_fn, namespace)
        except ForwardError as err:
            if fake or _setup is not None or runner.report.error_kind != "data-dependent":
                raise
            first = err  # the code reads values meta tensors lack: fake tensors have symbols
        again = _Run(depth, True, fold, _flag)
        try:
            rep = _meta_shape(again, code_or_fn, namespace)
        except ForwardError as second:
            if again.report.error_kind == "symbolic-branch":  # Python branches on the value
                again.report.notes.insert(0, f"the meta run stopped at line "
                                             f"{first.partial.error_line}: it reads tensor "
                                             "values; it ran again on fake tensors (symbolic "
                                             "values) and stopped at the branch below")
                raise second from None
            raise first from None  # fake tensors fail elsewhere: the meta error stands
        rep.notes.insert(0, f"the meta run stopped at line {first.partial.error_line}: it "
                            "reads tensor values, which meta tensors lack; ran again on fake "
                            "tensors, which give them symbolic values (u0)")
        return rep


def _undone_note(report: MetaShapeReport) -> Callable[[list[str]], None]:
    def note(undone: list[str]) -> None:
        shown = ", ".join(str(n) for n in undone[:5]) + (" ..." if len(undone) > 5 else "")
        report.notes.append(f"names written into the namespace during the run (by a line "
                            f"magic such as %timeit) were undone: {shown}")
    return note


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
        return runner.run(namespace, statements, used_names(tree), "cell")
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
    used = code_names(fn.__code__) | set(fn.__code__.co_freevars)
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
        bound = rebind_function(fn, new_ns, closure)
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

