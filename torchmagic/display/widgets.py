"""Reusable ipywidgets pieces for the explicit widget display mode (``%config TorchMagic.display =
"widget"``); ipywidgets is imported inside each function.

- :func:`totals_header`: a row of "cards" (label, human value, exact value on hover).
- :func:`bars`: horizontal bars, one per item, proportional to its value, exact values on hover.
- :func:`html_widget`: an ``HTML`` widget holding a self-contained HTML rendering.

Each is one widget: a result never gets a widget per row (module trees are HTML ``<details>``, see
:mod:`torchmagic.display.tree`). Everything uses translucent greys and inherited colours, so it
reads in light and dark themes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchmagic.display.format import esc
from torchmagic.display.table import Cell, page

_CARD = ("display:inline-block;margin:0 8px 6px 0;padding:4px 10px;border-radius:6px;"
         "border:1px solid rgba(127,127,127,.35);min-width:90px")
_PALETTE = ("#3b82f6", "#10b981", "#f59e0b", "#8b5cf6", "#ef4444", "#14b8a6", "#ec4899",
            "#64748b")


def html_widget(html: str) -> Any:
    """An ``ipywidgets.HTML`` showing ``html`` (already self-contained)."""
    import ipywidgets as w

    return w.HTML(html)


def totals_header(items: Sequence[tuple[str, str, str | None]], title: str | None = None,
                  css: str | None = None) -> Any:
    """Cards of ``(label, shown value, exact value for the hover title)``."""
    import ipywidgets as w

    cards = []
    for label, value, exact in items:
        t = f' title="{esc(exact)}"' if exact else ""
        cards.append(f'<div style="{_CARD}"{t}><div class="tm-muted" style="font-size:11px">'
                     f'{esc(label)}</div><div style="font-size:15px;font-weight:600">'
                     f'{esc(value)}</div></div>')
    head = f'<div class="tm-title">{esc(title)}</div>' if title else ""
    cls = f" {css}" if css else ""
    w_ = w.HTML(page(f'<div class="{cls.strip()}">{head}<div>{"".join(cards)}</div></div>'))
    w_.add_class("tm-totals")
    return w_


def bars_html(title: str, items: Sequence[tuple[str, float, str, str | None]],
              width: int = 240, label_width: int = 150) -> str:
    """HTML of horizontal bars for ``(label, value, shown value, exact title)`` items."""
    top = max((v for _, v, _, _ in items), default=0) or 1
    whole = sum(v for _, v, _, _ in items) or 1
    lines = []
    for i, (label, value, shown, exact) in enumerate(items):
        px = max(1.0, width * value / top) if value else 0.0
        color = _PALETTE[i % len(_PALETTE)]
        tip = esc(f"{label}: {exact or shown} ({100.0 * value / whole:.1f}%)")
        lines.append(
            f'<div style="display:flex;align-items:center;gap:8px;margin:2px 0" title="{tip}">'
            f'<span class="tm-mono" style="width:{label_width}px;overflow:hidden;'
            f'text-overflow:ellipsis;white-space:nowrap">{esc(label)}</span>'
            f'<span style="width:{width}px"><span style="display:inline-block;height:8px;'
            f'border-radius:2px;vertical-align:middle;width:{px:.1f}px;background:{color}">'
            '</span></span>'
            f'<span style="white-space:nowrap">{esc(shown)}</span>'
            f'<span class="tm-muted" style="white-space:nowrap">{100.0 * value / whole:.1f}%'
            f'</span></div>')
    if not lines:
        lines.append('<div class="tm-muted">nothing to show</div>')
    return page(f'<div class="tm-title">{esc(title)}</div>{"".join(lines)}')


def bars(title: str, items: Sequence[tuple[str, float, str, str | None]], width: int = 240,
         label_width: int = 150) -> Any:
    """A widget of horizontal bars (see :func:`bars_html`)."""
    import ipywidgets as w

    out = w.HTML(bars_html(title, items, width, label_width))
    out.add_class("tm-bars")
    return out


__all__ = ["Cell", "bars", "bars_html", "html_widget", "totals_header"]
