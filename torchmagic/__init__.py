"""torchmagic: IPython magics that answer the questions people ask about PyTorch models.

In a notebook: ``%load_ext torchmagic``. In a script, the same answers come from plain functions
(``torchmagic.summary``, ``torchmagic.params``, ...), each returning a result object with text, HTML
and ``to_dict()``.

Importing this package is cheap and has no side effects: torch, IPython and ipywidgets are imported
only when a function or the extension is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from torchmagic._version import __version__

# Public name -> module that defines it (imported on first access).
_API: dict[str, str] = {
    "TorchMagicError": "torchmagic.core.errors",
    "ForwardError": "torchmagic.core.errors",
    "meta_twin": "torchmagic.core.twin",
}

if TYPE_CHECKING:  # pragma: no cover
    from torchmagic.core.errors import ForwardError, TorchMagicError  # noqa: F401
    from torchmagic.core.twin import meta_twin  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'torchmagic' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext torchmagic``: register every magic (loading twice never doubles them)."""
    from torchmagic.magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext torchmagic``: remove every magic and callback the extension added."""
    from torchmagic.magics import unload

    unload(ipython)


__all__ = ["__version__", "load_ipython_extension", "unload_ipython_extension", *_API]
