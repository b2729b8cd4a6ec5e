"""Errors that carry a one-line message meant for the user.

The magics turn :class:`TorchMagicError` into IPython's ``UsageError`` (one line, no traceback);
plain-Python callers get an ordinary exception with the same message.
"""

from __future__ import annotations


def a_type(obj: object) -> str:
    """``"an int"`` / ``"a list"``: the article and the type's name, for messages."""
    name = type(obj).__name__
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


class TorchMagicError(ValueError):
    """Bad input or a failure the user can act on; ``str(err)`` is the whole message."""


class ForwardError(RuntimeError):
    """The user's forward (or cell) failed.

    ``module_path``/``module_class``/``input_shapes`` name the innermost module that was running,
    ``original`` is the exception torch raised, and ``partial`` holds whatever result was gathered up
    to the failure (e.g. a partial summary table), or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        original: BaseException | None = None,
        module_path: str | None = None,
        module_class: str | None = None,
        input_shapes: str | None = None,
        partial: object = None,
    ) -> None:
        super().__init__(message)
        self.original = original
        self.module_path = module_path
        self.module_class = module_class
        self.input_shapes = input_shapes
        self.partial = partial
