"""Rendering of result objects: plain text, self-contained HTML, and ipywidgets.

``show(result)`` picks one of them. The choice follows ``settings.mode``
(``%config TorchMagic.display``): ``"auto"`` builds a widget only in a kernel whose front end can show
widgets (a ZMQ kernel with ipywidgets importable), and always publishes ``text/html`` and
``text/plain`` in the same bundle so static viewers (nbviewer, GitHub, an exported notebook) show the
HTML; terminal IPython gets plain text and no widget is ever created there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODES = ("auto", "widget", "html", "text")


@dataclass
class Settings:
    """Display settings shared by all results (set through ``%config TorchMagic.display``)."""

    mode: str = "auto"


settings = Settings()


def set_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"display mode must be one of {', '.join(MODES)}; got {mode!r}")
    settings.mode = mode


def _shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def widget_frontend() -> bool:
    """True in a Jupyter kernel (Lab, Notebook, VS Code, Colab) with ipywidgets importable."""
    shell = _shell()
    if shell is None or not getattr(shell, "kernel", None):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def choose_mode(mode: str | None = None) -> str:
    """The rendering ``show`` will use: ``widget``, ``html`` or ``text``."""
    mode = mode or settings.mode
    if mode == "auto":
        shell = _shell()
        if widget_frontend():
            return "widget"
        if shell is not None and getattr(shell, "kernel", None):
            return "html"
        return "text"
    if mode == "widget" and not widget_frontend():
        return "html" if (_shell() is not None and getattr(_shell(), "kernel", None)) else "text"
    return mode


def mimebundle(result: Any, mode: str | None = None) -> dict[str, Any]:
    """The output bundle ``show`` publishes: text always; HTML and a widget view as the mode allows."""
    chosen = choose_mode(mode)
    bundle: dict[str, Any] = {"text/plain": str(result)}
    if chosen == "text":
        return bundle
    bundle["text/html"] = result._repr_html_()
    if chosen == "widget":
        renderer = result._renderer()
        build = getattr(renderer, "widget", None)
        if build is not None:
            w = build(result)
            if w is not None:
                view = w._repr_mimebundle_()
                bundle.update({k: v for k, v in view.items() if k != "text/plain"})
    return bundle


def show(result: Any, mode: str | None = None) -> None:
    """Display a result object in IPython (or print it in a plain script)."""
    shell = _shell()
    if shell is None:
        print(str(result))
        return
    from IPython.display import display

    display(mimebundle(result, mode), raw=True)
