"""Shared plumbing of the magics: configuration, argument parsing, evaluation, errors, display.

Every magic is: parse the line -> call a core function -> display the result object. Errors the user
can act on become ``UsageError`` (IPython prints one line, no traceback).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import keyword
import re
import shlex
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics
from traitlets import Enum, Int, observe
from traitlets.config import Configurable

from torchmagic.core.errors import ForwardError, TorchMagicError


class TorchMagic(Configurable):
    """Settings of the torchmagic extension: ``%config TorchMagic.display = "html"``."""

    display = Enum(
        ["auto", "widget", "html", "text"],
        default_value="auto",
        help="How results are shown: auto (widget in a notebook with widgets, text in a terminal), "
        "widget, html or text.",
    ).tag(config=True)
    depth = Int(3, help="Default --depth of %summary, %params and %%meta_shape.").tag(config=True)

    @observe("display")
    def _display_changed(self, change: dict[str, Any]) -> None:
        from torchmagic import display

        display.set_mode(change["new"])


# -- argument splitting ------------------------------------------------------------------------
_OPEN = "([{"
_CLOSE = ")]}"


def split_args(line: str) -> list[str]:
    """Split a magic's line on whitespace outside brackets and quotes.

    ``"model (1, 3, 32, 32) --depth 2"`` -> ``["model", "(1, 3, 32, 32)", "--depth", "2"]``.
    Quotes are kept inside bracketed tokens (they are Python) and removed around plain tokens.
    Raises ``UsageError`` for unbalanced brackets or quotes.
    """
    tokens: list[str] = []
    buf: list[str] = []
    depth = 0
    quote: str | None = None
    for ch in line:
        if quote:
            buf.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
            buf.append(ch)
        elif ch in _OPEN:
            depth += 1
            buf.append(ch)
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                raise UsageError(f"unbalanced {ch!r} in: {line.strip()}")
            buf.append(ch)
        elif ch.isspace() and depth == 0:
            if buf:
                tokens.append("".join(buf))
                buf = []
        else:
            buf.append(ch)
    if quote:
        raise UsageError(f"unclosed quote {quote} in: {line.strip()}")
    if depth:
        raise UsageError(f"unclosed bracket in: {line.strip()} (e.g. write (1,3,32,32))")
    if buf:
        tokens.append("".join(buf))
    out = []
    for tok in tokens:
        if tok[0] in "'\"" and tok[-1] == tok[0] and len(tok) >= 2:
            out.append(shlex.split(tok)[0])
        else:
            out.append(tok)
    return out


def parse(magic_func: Any, line: str) -> Any:
    """Parse ``line`` with the ``magic_arguments`` parser of ``magic_func`` (bracket-aware split).

    Errors are one ``UsageError`` line naming the magic: an unknown option with the closest valid
    one (``--dpeth``: did you mean ``--depth``?), a value starting with ``-`` with the
    ``--opt=VALUE`` spelling, then the usage."""
    parser = magic_func.parser
    owner = getattr(magic_func, "__self__", None)
    table = getattr(owner, "magics", {})
    cell_only = parser.prog in table.get("cell", {}) and parser.prog not in table.get("line", {})
    name = ("%%" if cell_only else "%") + parser.prog
    try:
        tokens = split_args(line)
    except UsageError as exc:
        raise UsageError(f"{name}: {exc}") from None
    try:
        return _parse_intermixed(parser, tokens)
    except SystemExit as exc:  # -h/--help printed the usage; nothing more to do
        raise UsageError(f"{name}: see the usage above") from exc
    except UsageError as exc:  # argparse's own message: name the magic and show the usage
        # IPython's formatter renders "usage: :: %name [options] ARGS"
        usage = one_line(parser.format_usage()).removeprefix("usage:").strip().removeprefix("::")
        usage = usage.strip().replace("%" + parser.prog, name, 1)
        raise UsageError(f"{name}: {_explain(parser, str(exc), tokens)} (usage: {usage})") \
            from None


def _explain(parser: Any, message: str, tokens: list[str]) -> str:
    """argparse's message, with what it leaves unsaid: the valid option closest to an unknown
    one, and how to give a value that starts with ``-``."""
    import difflib
    import re

    msg = one_line(message)
    options = sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--"))
    m = re.match(r"unrecognized arguments: (.*)", msg)
    if m:
        unknown = [t for t in m.group(1).split() if t.startswith("-")]
        hints = []
        for tok in unknown:
            close = difflib.get_close_matches(tok.split("=")[0], options, n=1, cutoff=0.6)
            hints.append(f"{tok} (did you mean {close[0]}?)" if close else tok)
        if hints:
            return f"unknown option{'s' if len(hints) > 1 else ''} {', '.join(hints)}"
    m = re.match(r"argument (\S+?)(?:/\S+)?: expected (?:one|at least one) argument", msg)
    if m:
        opt = m.group(1)
        at = next((i for i, t in enumerate(tokens) if t == opt), None)
        nxt = tokens[at + 1] if at is not None and at + 1 < len(tokens) else None
        if nxt is not None and nxt.startswith("-"):
            return (f"{opt} needs a value; {nxt!r} reads as an option: write {opt}={nxt} to give "
                    "a value that starts with '-'")
        return f"{opt} needs a value"
    return msg


def _parse_intermixed(parser: Any, tokens: list[str]) -> Any:
    """Options before, between or after the positionals (``%summary m --meta (2,4)`` and
    ``%summary m (2,4) --meta`` alike): argparse's ``parse_intermixed_args``; parsers it cannot
    take (a ``REMAINDER`` positional) parse as before."""
    try:
        return parser.parse_intermixed_args(tokens)
    except TypeError:
        return parser.parse_args(tokens)


# -- errors ------------------------------------------------------------------------------------
def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


@contextlib.contextmanager
def user_errors(prefix: str) -> Iterator[None]:
    """Turn torchmagic's user-facing errors into one-line ``UsageError``s: ``%summary: ...``.

    The ``UsageError`` raised here still chains the internal error; every registered magic is
    wrapped by :func:`clean_errors`, which replaces it with a bare one before IPython sees it."""
    try:
        yield
    except TorchMagicError as exc:
        raise UsageError(f"{prefix}: {one_line(str(exc))}") from None
    except ForwardError as exc:
        raise UsageError(f"{prefix}: {one_line(str(exc))}") from None


_OWN_FILES = ("/torchmagic/",)


def _own_frame(tb: TracebackType) -> bool:
    return any(p in tb.tb_frame.f_code.co_filename.replace("\\", "/") for p in _OWN_FILES)


def _last(exc: BaseException) -> TracebackType:
    tb = exc.__traceback__
    assert tb is not None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def strip_own_frames(exc: BaseException) -> BaseException:
    """Drop torchmagic's own frames from the traceback of the user's exception ``exc`` (in
    place; returns ``exc``) and forget their local variables: the exception a magic re-raises for
    the user's cell keeps the user's frames only, like a plain cell's, so it keeps nothing of
    torchmagic's alive (a copy of the namespace, twins, the model). An exception that did not come
    through the user's own code (no frame of a cell or a user file: a bug in torchmagic, or in
    what it called) keeps its whole traceback."""
    from torchmagic.core.isolation import is_user_file

    tb = exc.__traceback__
    kept: list[TracebackType] = []
    dropped: list[TracebackType] = []
    while tb is not None:
        (dropped if _own_frame(tb) else kept).append(tb)
        tb = tb.tb_next
    if not dropped or _own_frame(_last(exc)) or not any(
            is_user_file(t.tb_frame.f_code.co_filename) for t in kept):
        return exc
    for a, b in zip(kept, kept[1:]):
        a.tb_next = b
    if kept:
        kept[-1].tb_next = None
    for t in dropped:
        try:
            t.tb_frame.clear()  # a finished frame: its locals go now
        except RuntimeError:  # still executing (the magic re-raising it): it ends right after
            pass
    exc.__traceback__ = kept[0] if kept else None
    return exc


def clean_errors(fn: Callable[..., Any], owner: Any, name: str) -> Callable[..., Any]:
    """Wrap a registered magic so that the one-line error the user sees keeps nothing alive.

    A ``UsageError`` (or a :class:`TorchMagicError` / :class:`ForwardError` that escaped
    :func:`user_errors`) becomes a new ``UsageError`` with the same one-line message, raised
    outside any ``except`` block: no ``__context__``/``__cause__`` chain to the internal error
    and no traceback frames of torchmagic's code, whose local variables hold the user's model.
    IPython keeps the error shown in ``sys.last_value``; after ``del model; gc.collect()`` the
    model is freed, as it is after a plain cell's error. Other exceptions (the user's own, from
    their cell) pass through unchanged, less torchmagic's frames (:func:`strip_own_frames`)."""

    @functools.wraps(fn)
    def magic(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # IPython shows the user's frames, not ours
        message = None
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            message = str(exc)
        except (TorchMagicError, ForwardError) as exc:
            message = f"{name}: {one_line(str(exc))}"
        except BaseException as exc:  # the user's own error (or Ctrl-C): unchanged but ours
            strip_own_frames(exc)
            raise
        # Here, outside the except blocks, the internal exception and its frames are gone.
        raise UsageError(message)

    magic.__self__ = owner  # type: ignore[attr-defined]  # unload finds its magics by owner
    return magic


def _literal_shapes(token: str) -> list[tuple[int, ...]] | None:
    """``(1,3,32,32)`` -> [shape]; ``[(2,16),(2,16)]`` -> shapes; anything else -> None."""
    try:
        value = ast.literal_eval(token)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return _as_shapes(value)


def _as_shapes(value: Any) -> list[tuple[int, ...]] | None:
    def is_shape(v: Any) -> bool:
        return isinstance(v, (tuple, list)) and len(v) > 0 and all(
            isinstance(s, int) and not isinstance(s, bool) for s in v)

    if type(value).__name__ == "Size":  # torch.Size, without importing torch here
        value = tuple(value)
    if is_shape(value):
        return [tuple(value)]
    if isinstance(value, (tuple, list)) and value and all(is_shape(v) for v in value):
        return [tuple(v) for v in value]
    return None


def _numbers(value: Any) -> bool:
    """A plain tuple/list of numbers (``1e9,3,32,32``): meant as a shape, not as tensors."""
    return type(value) in (tuple, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


# -- model inputs: the same options for every magic that runs a forward ------------------------
def input_arguments(func: Any) -> Any:
    r"""Decorator adding the INPUTS options every magic that runs a model's forward takes
    (``%summary``, ``%estimate``, ``%compile``): ``--dtypes``, ``--batch-dim``, ``--args`` and
    ``--kwargs``. Put it between ``@magic_arguments()`` and the magic's own ``@argument``\ s; read
    them back with :meth:`TorchMagics.model_inputs`."""
    from IPython.core.magic_arguments import argument

    for deco in (
        argument("--kwargs", metavar="EXPR",
                 help="keyword arguments of the forward: a dict (or any mapping) expression"),
        argument("--args", metavar="EXPR",
                 help="positional arguments of the forward, taken as they are: a tuple "
                      "expression, e.g. (feats,) for a forward(self, features) that takes one dict"),
        argument("--batch-dim", type=int, default=None, metavar="N",
                 help="shapes are given without their batch dimension: a batch of 1 is inserted "
                      "at position N (torchinfo's batch_dim)"),
        argument("--dtypes", metavar="DTYPES",
                 help="dtypes of shape inputs, comma-separated (e.g. long,float or "
                      "torch.LongTensor); integer inputs are zeros, floating ones random"),
    ):
        func = deco(func)
    return func


INPUT_FLAGS = (("--dtypes", "dtypes"), ("--batch-dim", "batch_dim"), ("--args", "args"),
               ("--kwargs", "kwargs"))

# The plain-Python functions name their own arguments in messages; the magics say their flags.
_FLAGS = [
    (re.compile(r"dtypes='(\w+)'"), r"--dtypes \1"),
    (re.compile(r"without meta=True"), "without --meta"),
    (re.compile(r"\bmeta=True\b"), "--meta"),
    (re.compile(r"\bargs=\((\w+),\)"), r"--args (\1,)"),
    (re.compile(r"torchmagic\.meta_shape\(code, fake=True\)"), "%%meta_shape --fake"),
    (re.compile(r"\bsmaller input_size\b"), "smaller shapes"),
    (re.compile(r"\binput_size shapes\b"), "shapes"),
    (re.compile(r"\bbatch_dim\b"), "--batch-dim"),
    (re.compile(r"\bkwargs=\b"), "name=EXPR INPUTS or --kwargs"),
    (re.compile(r"\bkwargs must be\b"), "--kwargs must be"),
    (re.compile(r"^columns needs\b"), "--columns needs"),
    (re.compile(r"^memory=True\b"), "--memory"),
    (re.compile(r"\b(reserve|memory)=(?=[\w.])"), r"--\1 "),
    (re.compile(r"^(memory|reserve|depth) must be\b"), r"--\1 must be"),
]


def as_flags(message: str) -> str:
    """A core message with its Python argument names replaced by the magics' flags."""
    for pattern, repl in _FLAGS:
        message = pattern.sub(repl, message)
    return message


@contextlib.contextmanager
def flag_names() -> Iterator[None]:
    """Re-raise core errors with the magics' flags in place of Python argument names (use
    inside :func:`user_errors`)."""
    try:
        yield
    except ForwardError as exc:
        exc.args = (as_flags(str(exc)),)
        if exc.partial is not None and getattr(exc.partial, "error", None):
            exc.partial.error = as_flags(exc.partial.error)
        raise
    except TorchMagicError as exc:
        raise TorchMagicError(as_flags(str(exc))) from None


# -- base class --------------------------------------------------------------------------------
class TorchMagics(Magics):
    """Base of torchmagic's ``Magics`` classes.

    ``cfg`` is the shared :class:`TorchMagic` configurable. ``close()`` is called when the extension
    is unloaded: subclasses that register callbacks remove them there.
    """

    def __init__(self, shell: Any, cfg: TorchMagic) -> None:
        super().__init__(shell)
        self.cfg = cfg
        for kind, table in self.magics.items():
            for name, fn in table.items():
                if callable(fn):
                    table[name] = clean_errors(fn, self, ("%%" if kind == "cell" else "%") + name)

    def suspend(self) -> Any:
        """``%reload_ext``: stop and hand over what must survive the reload (``None``: nothing).
        The default closes the instance (:meth:`close`)."""
        self.close()
        return None

    def resume(self, state: Any) -> str | None:
        """Take over what :meth:`suspend` of the previous instance handed over; returns a line
        saying what was kept (``None``: nothing to say)."""
        return None

    def parse_inputs(self, tokens: list[str]) -> tuple[list[tuple[int, ...]] | None, list[Any]]:
        """INPUTS tokens as ``%summary`` takes them -> ``(shapes, values)`` for
        ``prepare_inputs(model, *values, input_size=shapes)``.

        A token that is a literal shape (``(1,3,32,32)``, ``[(2,16),(2,16)]``) or evaluates to one
        (``x.shape``) is a shape; ``name=EXPR`` is a keyword argument; anything else is evaluated
        in the namespace (tensors, an argument tuple ``(feats,)`` whose every element is
        positional, a dict or a tokenizer's ``BatchEncoding`` of keyword arguments). Keyword
        arguments collect into one dict, last in ``values``. Shapes can come with keyword
        arguments (a ``name=EXPR`` or a mapping), not with other values."""
        import re
        from collections.abc import Mapping

        shapes: list[tuple[int, ...]] = []
        values: list[Any] = []
        keywords: dict[str, Any] = {}
        for tok in tokens:
            kw = re.match(r"^([A-Za-z_]\w*)=(?!=)(.+)$", tok, re.S)
            if kw and not keyword.iskeyword(kw.group(1)):
                name = kw.group(1)
                if name in keywords:
                    raise TorchMagicError(f"keyword input {name!r} given twice")
                keywords[name] = self.evaluate(kw.group(2), f"keyword input {name}")
                continue
            lit = _literal_shapes(tok)
            if lit is None:
                if tok.lstrip().startswith(("(", "[")) and not any(c.isalpha() or c == "_"
                                                                  for c in tok):
                    raise TorchMagicError(f"malformed input shape {tok!r}: write whole numbers "
                                          "like (1,3,32,32), or several: (1,10) (1,5)")
                value = self.evaluate(tok, "input")
                lit = _as_shapes(value)
                if lit is None and _numbers(value):
                    raise TorchMagicError(f"input shape {tok!r} gives {value!r}: sizes must be "
                                          "whole numbers, like (1,3,32,32)")
            if lit is not None:
                shapes.extend(lit)
            else:
                values.append(value)
        if shapes and not all(isinstance(v, Mapping) for v in values):
            raise TorchMagicError("give INPUTS either as shapes, e.g. (1,3,32,32), or as tensors / "
                                  "expressions, not a mix (keyword arguments can come with "
                                  "shapes: name=EXPR or a dict)")
        def merge(maps: list[Any]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for m in maps:
                for k, v in m.items():
                    if k in out:
                        raise TorchMagicError(f"keyword input {k!r} given twice")
                    out[k] = v
            return out

        if shapes and len(values) > 1:  # several mappings beside shapes: one set of keywords
            values = [merge(values)]
        if keywords:
            if len(values) == 1 and type(values[0]) in (tuple, list):
                values = [*values[0], keywords]  # the argument list written out, then keywords
            elif values and isinstance(values[-1], Mapping):
                values[-1] = merge([values[-1], keywords])
            else:
                values.append(keywords)
        return (shapes or None), values

    def model_inputs(self, args: Any) -> tuple[list[Any], dict[str, Any]]:
        """The parsed ``INPUTS`` and :func:`input_arguments` options of a magic ->
        ``(values, options)`` for ``core_function(model, *values, **options)``, the way
        :func:`torchmagic.core.inputs.prepare_inputs` takes them (``args``, ``kwargs``,
        ``input_size``, ``dtypes``, ``batch_dim``). One-line errors for options that do not
        apply."""
        shapes, values = self.parse_inputs(args.inputs)
        dtypes = [d for d in args.dtypes.split(",") if d.strip()] if args.dtypes else None
        if dtypes and not shapes:
            raise TorchMagicError("--dtypes applies to shape inputs like (2,16); tensors keep "
                                  "their own dtype")
        if args.batch_dim is not None and not shapes:
            raise TorchMagicError("--batch-dim applies to shape inputs given without their "
                                  "batch dimension, like (3,224,224)")
        pos = kw = None
        if args.args is not None:
            if shapes or [v for v in values if not isinstance(v, dict)]:
                raise TorchMagicError("give positional inputs either as INPUTS or with "
                                      "--args, not both")
            pos = self.evaluate(args.args, "--args")
        if args.kwargs is not None:
            kw = self.evaluate(args.kwargs, "--kwargs")
        if pos is not None and values:  # name=EXPR keywords beside --args
            kw = {**(kw or {}), **values.pop()}
        return values, {"args": pos, "kwargs": kw, "input_size": shapes, "dtypes": dtypes,
                        "batch_dim": args.batch_dim}

    # evaluation in the user's namespace
    def evaluate(self, expr: str, what: str = "expression") -> Any:
        """Evaluate ``expr`` in the user namespace; a failure is one line naming the expression."""
        try:
            return eval(expr, self.shell.user_global_ns, self.shell.user_ns)  # noqa: S307
        except NameError as exc:
            raise TorchMagicError(f"{exc} (the {what} must be a name or expression defined "
                                  "in the notebook)") from None
        except SyntaxError as exc:
            raise TorchMagicError(f"{what} {expr!r} is not valid Python ({exc.msg})") from None
        except Exception as exc:  # the user's expression raised
            raise TorchMagicError(f"evaluating {what} {expr!r} raised "
                                  f"{type(exc).__name__}: {one_line(str(exc))}") from None

    def transform(self, cell: str) -> str:
        """IPython's own cell transformation (``%magics``, ``!shell``, ``?``) of a cell body."""
        return self.shell.transform_cell(cell)

    @staticmethod
    def check_output_name(name: str | None) -> None:
        """Refuse a bad ``-o NAME`` before the magic does anything (one-line error)."""
        if name is not None and (not name.isidentifier() or keyword.iskeyword(name)):
            raise TorchMagicError(f"-o needs a variable name; got {name!r}")

    def store(self, name: str | None, value: Any) -> None:
        """``-o NAME``: put a result in the user namespace (like ``%timeit -o``)."""
        if name:
            self.check_output_name(name)
            self.shell.user_ns[name] = value

    def run_and_report(self, context: Any, run: Callable[[], Any],
                       report: Callable[[], Any]) -> Any:
        """Run ``run()`` inside ``context`` (e.g. an anomaly detector or autocast run), show
        ``report()`` if it is not None, also when the user's code raised, and then re-raise the
        user's exception unchanged. On KeyboardInterrupt nothing is shown (the context still
        restores its state on the way out)."""
        __tracebackhide__ = True  # IPython shows the user's frames, not ours
        value = None
        error: BaseException | None = None
        try:
            with context:
                value = run()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the user's own error: report first, then re-raise it
            error = exc
        shown = report()
        if shown is not None:
            self.show(shown)
        if error is not None:
            raise error
        return value

    def show(self, result: Any) -> None:
        from torchmagic.display import show

        show(result)

    def close(self) -> None:
        """Remove callbacks and state; called by ``unload_ipython_extension``."""
