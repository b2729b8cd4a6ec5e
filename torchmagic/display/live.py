"""Live progress and status panels that leave HTML behind.

Long work (a benchmark, a search over batch sizes) and panels that change after every cell
(``%gpumem --watch``) show their state live, and when the work ends the panel is replaced *in
place* by the result's final rendering, so what a saved notebook keeps is HTML and plain text, never
a widget that needs the kernel that made it::

    from torchmagic.display.live import live

    with live("%%benchmark", delay=1.0) as panel:     # nothing shows during the first second
        for i, step in enumerate(steps):
            run(step)
            panel.update((i + 1) / len(steps), f"step {i + 1} of {len(steps)}")
        panel.finish(result)                           # the result's HTML + text replace the panel

Where the panel lives:

- a Jupyter kernel with ipywidgets (display mode ``auto`` or ``widget``): a progress bar and a
  status line (one ``HBox``: a fixed set of three widgets), published with an updatable
  ``display_id`` together with ``text/html`` and ``text/plain`` of the same state;
- a kernel in ``html`` or ``text`` display mode (or without ipywidgets): the state as HTML / text,
  replaced through the same ``display_id``;
- terminal IPython on a TTY: one status line rewritten in place (``\\r``), erased at the end;
  not on a TTY (a log, a pipe): nothing until the end;
- a plain script: nothing until the end; ``finish`` prints the result's text.

``update(fraction, message)`` sets the progress (``fraction`` in [0, 1], or ``None`` for a status
without a bar) at most every ``interval`` seconds. ``show(result)`` replaces the panel with a result
and keeps it updatable (the ``--watch`` panel after each cell); ``finish(result)`` does the same and
ends the panel (``finish()`` without a result keeps what ``show`` put there; a progress bar becomes
its last state as HTML); ``stop(reason)`` ends it with a static line. Leaving the ``with`` block by
an exception or Ctrl-C before ``finish`` replaces the panel by a static "interrupted" / "stopped"
line (HTML and text), and the exception propagates. Widgets are closed when the panel ends, so no widget model
stays in the kernel.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

from torchmagic.display.format import esc, text_width
from torchmagic.display.table import html_block

WIDGET = "application/vnd.jupyter.widget-view+json"


def _where() -> str:
    """``widget``, ``html``, ``text`` (a kernel), ``terminal`` (IPython on a TTY), ``quiet``."""
    from torchmagic import display

    shell = display._shell()
    if shell is None:
        return "quiet"
    if getattr(shell, "kernel", None) is None:
        out = sys.stdout
        return "terminal" if out is not None and out.isatty() else "quiet"
    mode = display.settings.mode
    if mode in ("auto", "widget") and display.widget_frontend():
        return "widget"
    return "text" if mode == "text" else "html"


def _bar_text(fraction: float | None, width: int = 20) -> str:
    if fraction is None:
        return ""
    n = round(width * fraction)
    return "[" + "#" * n + "." * (width - n) + f"] {100 * fraction:3.0f}%"


class LivePanel:
    """A live panel; see the module docstring. Use :func:`live` to make one."""

    def __init__(self, title: str, delay: float = 0.0, interval: float = 0.1) -> None:
        self.title = title
        self.delay = delay
        self.interval = interval
        self.where = _where()
        self.fraction: float | None = None
        self.message = ""
        self.handle: Any = None          # IPython DisplayHandle once something is shown
        self.widgets: list[Any] = []     # the live widgets (closed at the end)
        self.finished = False
        self.started = time.monotonic()
        self._last = 0.0
        self._line = 0                   # length of the terminal status line on screen
        self._widget_shown = False       # the progress widget is what the display shows

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> LivePanel:
        self.started = time.monotonic()
        if self.delay <= 0:
            self._render(force=True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.finished:
            return
        if exc_type is None:
            self.finish()
            return
        self.stop("interrupted" if issubclass(exc_type, KeyboardInterrupt) else
                  f"stopped: {exc_type.__name__}")

    # -- API -------------------------------------------------------------------------------
    def update(self, fraction: float | None = None, message: str = "") -> None:
        """Progress ``fraction`` (0..1, or None for none) and a short status ``message``."""
        if self.finished:
            return
        self.fraction = None if fraction is None else min(max(float(fraction), 0.0), 1.0)
        self.message = message
        self._render()

    def show(self, result: Any) -> None:
        """Replace the panel with ``result`` (a result object, shown as its HTML and text, or a
        ready ``{mime: data}`` bundle) and keep it for more updates."""
        from torchmagic.display import mimebundle

        if self.where in ("terminal", "quiet"):
            self._erase()
            if isinstance(result, dict):
                print(result.get("text/plain", ""))
            else:
                from torchmagic.display import show

                show(result)
            return
        self._replace(result if isinstance(result, dict) else mimebundle(result))
        self._close_widgets()

    def finish(self, result: Any = None) -> None:
        """End the panel: replaced by ``result`` (HTML + text). Without a result, what
        :meth:`show` put there stays; a progress widget becomes its last state as HTML."""
        if self.finished:
            return
        self.finished = True
        if result is not None:
            self.show(result)
        elif self.where in ("terminal", "quiet"):
            self._erase()
        elif self._widget_shown:
            self._replace({"text/plain": self._state_text(), "text/html": self._state_html()})
        self._close_widgets()

    def stop(self, what: str = "stopped") -> None:
        """End the panel without a result: a static line says ``what`` (and how far it got)."""
        if self.finished:
            return
        done = "" if self.fraction is None else f" at {100 * self.fraction:.0f}%"
        line = f"{self.title}: {what}{done}"
        self._replace({"text/plain": line,
                       "text/html": html_block(None, f'<div class="tm-muted">{esc(line)}</div>')},
                      only_if_shown=True)
        self._close_widgets()
        self.finished = True

    # -- internals -------------------------------------------------------------------------
    def _state_text(self) -> str:
        bits = [self.title + ":", _bar_text(self.fraction), self.message]
        return " ".join(b for b in bits if b)

    def _state_html(self) -> str:
        bar = ""
        if self.fraction is not None:
            bar = (f'<span style="display:inline-block;width:200px;height:8px;border-radius:2px;'
                   f'background:var(--tm-line);vertical-align:middle;margin:0 8px">'
                   f'<span class="tm-bar" style="width:{100 * self.fraction:.1f}%;display:block">'
                   f"</span></span>{100 * self.fraction:.0f}%")
        return html_block(None, f"<div><b>{esc(self.title)}</b>{bar} "
                                f'<span class="tm-muted">{esc(self.message)}</span></div>')

    def _render(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force:
            if now - self.started < self.delay:
                return
            if now - self._last < self.interval and self.handle is not None:
                return
        self._last = now
        if self.where == "quiet":
            return
        if self.where == "terminal":
            line = self._state_text()[: max(text_width() - 1, 10)]
            sys.stdout.write("\r" + line.ljust(self._line))
            sys.stdout.flush()
            self._line = len(line)
            return
        bundle = {"text/plain": self._state_text(), "text/html": self._state_html()}
        if self.where == "widget":
            if not self.widgets:
                import ipywidgets as w

                bar = w.FloatProgress(value=0.0, min=0.0, max=1.0,
                                      layout=w.Layout(width="240px"))
                label = w.HTML()
                box = w.HBox([w.HTML(f"<b>{esc(self.title)}</b>"), bar, label])
                box.add_class("tm-live")
                self.widgets = [box, box.children[0], bar, label]
            box, _, bar, label = self.widgets
            bar.layout.visibility = "hidden" if self.fraction is None else "visible"
            bar.value = self.fraction or 0.0
            pct = "" if self.fraction is None else f"{100 * self.fraction:.0f}% "
            label.value = f"{pct}<span style='opacity:.75'>{esc(self.message)}</span>"
            if self._widget_shown:
                return  # the widget redraws itself
            self._widget_shown = True
            bundle[WIDGET] = {"version_major": 2, "version_minor": 0, "model_id": box.model_id}
        elif self.where == "text":
            bundle.pop("text/html")
        self._replace(bundle)

    def _replace(self, bundle: dict[str, Any], only_if_shown: bool = False) -> None:
        """Put ``bundle`` where the panel is (a new display if nothing is shown yet, unless
        ``only_if_shown``)."""
        if self.where in ("terminal", "quiet"):
            shown = self._line > 0
            self._erase()
            if bundle.get("text/plain") and (shown or not only_if_shown):
                print(bundle["text/plain"])
            return
        from IPython.display import display

        if self.handle is None:
            if only_if_shown:
                return
            self.handle = display(bundle, raw=True, display_id=True)
        else:
            self.handle.update(bundle, raw=True)

    def _erase(self) -> None:
        if self._line:
            sys.stdout.write("\r" + " " * self._line + "\r")
            sys.stdout.flush()
            self._line = 0

    def _close_widgets(self) -> None:
        self._widget_shown = False
        for widget in self.widgets:
            for model in (getattr(widget, "layout", None), getattr(widget, "style", None),
                          widget):
                try:
                    if model is not None:
                        model.close()
                except Exception:  # noqa: BLE001 - a closed comm: nothing left to free
                    pass
        self.widgets = []


def live(title: str, delay: float = 0.0, interval: float = 0.1) -> LivePanel:
    """A :class:`LivePanel` titled ``title`` (use it as a context manager). With ``delay``, the
    panel appears only once the work has run that many seconds (quick work shows only its
    result); ``interval`` is the least time between two redraws."""
    return LivePanel(title, delay=delay, interval=interval)


__all__ = ["LivePanel", "live"]
