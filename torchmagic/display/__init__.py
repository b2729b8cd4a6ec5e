"""Rendering of result objects: plain text, self-contained HTML, and (on request) ipywidgets.

``show(result)`` publishes one output bundle. What goes in it follows ``settings.mode``
(``%config TorchMagic.display``):

- ``"auto"`` (default): in a Jupyter kernel (JupyterLab, Notebook, VS Code, Colab) ``text/html`` and
  ``text/plain`` only. The HTML is self-contained (native ``<details>`` trees, CSS bars, JupyterLab
  colour variables, no JavaScript), so the output survives saving, reopening with a new kernel, a
  page reload, nbconvert, nbviewer and GitHub. Terminal IPython and scripts get plain text.
- ``"widget"``: a widget view where ipywidgets can show one (never a widget per row: one HTML
  widget or a small fixed set), always with the same ``text/html`` and ``text/plain`` beside it.
  Elsewhere it falls back like ``auto``.
- ``"html"`` / ``"text"``: that rendering (text is always included).

Live work (progress, the ``%gpumem --watch`` panel) goes through :mod:`torchmagic.display.live`,
which replaces its panel by the final HTML when the work ends.
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


def _in_kernel() -> bool:
    shell = _shell()
    return shell is not None and getattr(shell, "kernel", None) is not None


def choose_mode(mode: str | None = None) -> str:
    """The rendering ``show`` will use: ``widget``, ``html`` or ``text``."""
    mode = mode or settings.mode
    if mode == "auto":
        return "html" if _in_kernel() else "text"
    if mode == "widget" and not widget_frontend():
        return "html" if _in_kernel() else "text"
    return mode


def mimebundle(result: Any, mode: str | None = None) -> dict[str, Any]:
    """The output bundle ``show`` publishes: text always; HTML unless the mode is text; a widget
    view (the renderer's ``widget(result)``, else one HTML widget) in widget mode."""
    chosen = choose_mode(mode)
    bundle: dict[str, Any] = {"text/plain": str(result)}
    if chosen == "text":
        return bundle
    bundle["text/html"] = result._repr_html_()
    if chosen == "widget":
        build = getattr(result._renderer(), "widget", None)
        w = build(result) if build is not None else None
        if w is None:
            import ipywidgets

            w = ipywidgets.HTML(bundle["text/html"])
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
