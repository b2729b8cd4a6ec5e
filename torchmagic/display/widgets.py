"""Reusable ipywidgets pieces for result displays (ipywidgets is imported inside each function).

- :func:`totals_header`: a row of "cards" (label, human value, exact value on hover).
- :func:`bars`: horizontal bars, one per item, proportional to its value, exact values on hover.
- :func:`module_tree`: a collapsible tree of rows (a module tree: expand/collapse per module, plus
  depth buttons "1 2 3 … all"); children are built the first time they are shown, so a tree of a
  thousand modules costs nothing until it is opened. Rows carry CSS classes ``tm-tree-row``,
  ``tm-tree-toggle`` (the expand button) and ``tm-tree-children`` for tests and styling.
- :func:`html_widget`: an ``HTML`` widget holding a self-contained HTML rendering.

Everything uses translucent greys and inherited colours, so it reads in light and dark themes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torchmagic.display.format import esc
from torchmagic.display.table import CSS, Cell, as_cell

_CARD = ("display:inline-block;margin:0 8px 6px 0;padding:4px 10px;border-radius:6px;"
         "border:1px solid rgba(127,127,127,.35);min-width:90px")
# Compact rows: ipywidgets gives every HTML widget a 28 px line and 2 px margins.
_TREE_CSS = (
    "<style>.tm-tree .widget-html,.tm-tree .widget-button{margin:0!important}"
    ".tm-tree .tm-tree-row .widget-html>.widget-html-content{height:auto!important;"
    "line-height:22px!important}"
    ".tm-tree .tm-tree-toggle{height:20px!important;line-height:18px!important;"
    "padding:0!important;background:transparent}"
    ".tm-tree .tm-tree-row:hover{background:rgba(127,127,127,.08)}</style>"
)
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
    w_ = w.HTML(f'<div class="tm-result{cls}">{CSS}{head}<div>{"".join(cards)}</div></div>')
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
            f'<span style="width:{width}px"><span class="tm-bar" style="width:{px:.1f}px;'
            f'background:{color}"></span></span>'
            f'<span style="white-space:nowrap">{esc(shown)}</span>'
            f'<span class="tm-muted" style="white-space:nowrap">{100.0 * value / whole:.1f}%'
            f'</span></div>')
    if not lines:
        lines.append('<div class="tm-muted">nothing to show</div>')
    return (f'<div class="tm-result">{CSS}<div class="tm-title">{esc(title)}</div>'
            f'{"".join(lines)}</div>')


def bars(title: str, items: Sequence[tuple[str, float, str, str | None]], width: int = 240,
         label_width: int = 150) -> Any:
    """A widget of horizontal bars (see :func:`bars_html`)."""
    import ipywidgets as w

    out = w.HTML(bars_html(title, items, width, label_width))
    out.add_class("tm-bars")
    return out


@dataclass
class TreeNode:
    """A row of :func:`module_tree`: ``depth`` 0 is the root; rows come in depth-first order."""

    key: str                   # e.g. the module's qualified name (shown on hover)
    depth: int
    cells: list[Any]           # one per column (str or Cell)
    css: str | None = None     # e.g. "tm-bad" for a failing module
    children: list[TreeNode] = field(default_factory=list)


def build_tree(nodes: Sequence[TreeNode]) -> list[TreeNode]:
    """Link depth-first rows into a forest (returns the top-level nodes)."""
    roots: list[TreeNode] = []
    stack: list[TreeNode] = []
    for node in nodes:
        node.children = []
        while stack and stack[-1].depth >= node.depth:
            stack.pop()
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)
    return roots


def _col_widths(headers: Sequence[str], nodes: Sequence[TreeNode]) -> list[int]:
    widths = [len(h) for h in headers]
    for n in nodes:
        for i, c in enumerate(n.cells[:len(widths)]):
            extra = 2 * n.depth + 2 if i == 0 else 0
            widths[i] = max(widths[i], len(as_cell(c).text) + extra)
    return [min(60, w) * 8 + 14 for w in widths]


def _row_html(cells: Sequence[Any], widths: Sequence[int], align: Sequence[str], indent: int = 0,
              header: bool = False, css: str | None = None, key: str | None = None) -> str:
    parts = []
    for i, c in enumerate(cells):
        cell = as_cell(c)
        a = "right" if (align[i] if i < len(align) else "l") == "r" else "left"
        w = widths[i] - (indent if i == 0 else 0)
        title = cell.title or (key if i == 0 and key else None)
        t = f' title="{esc(title)}"' if title else ""
        weight = "font-weight:600;" if header else ""
        cls = f' class="{cell.css}"' if cell.css else ""
        parts.append(f'<span{cls}{t} style="display:inline-block;width:{max(w, 20)}px;'
                     f'text-align:{a};{weight}overflow:hidden;text-overflow:ellipsis;'
                     f'white-space:nowrap;padding:0 4px;box-sizing:border-box">'
                     f'{esc(cell.text)}</span>')
    row_cls = f" {css}" if css else ""
    border = "rgba(127,127,127,.6)" if header else "rgba(127,127,127,.2)"
    return (f'<div class="tm-result{row_cls}" style="margin:0;white-space:nowrap;'
            f'border-bottom:1px solid {border};font-variant-numeric:tabular-nums">'
            f'{CSS if header else ""}{"".join(parts)}</div>')


def module_tree(nodes: Sequence[TreeNode], headers: Sequence[str],
                align: Sequence[str] | None = None, expand_depth: int = 1,
                on_build: Callable[[Any], None] | None = None) -> Any:
    """A collapsible tree widget of ``nodes`` (depth-first rows) under ``headers``.

    Each row with children has a ▸/▾ button (class ``tm-tree-toggle``); the buttons above the tree
    expand everything down to a depth or collapse all. Rows shallower than ``expand_depth`` start
    expanded. Children widgets are created the first time they are shown.
    """
    import ipywidgets as w

    nodes = list(nodes)
    align = list(align or ["l"] * len(headers))
    roots = build_tree(nodes)
    widths = _col_widths(headers, nodes)
    max_depth = max((n.depth for n in nodes), default=0)
    toggle_w = 26
    state: dict[int, dict[str, Any]] = {}

    def make(node: TreeNode) -> Any:
        indent = 14 * node.depth
        html = w.HTML(_row_html(node.cells, widths, align, indent=indent, css=node.css,
                                key=node.key))
        pad = w.HTML(f'<span style="display:inline-block;width:{indent}px"></span>')
        pad.layout = w.Layout(width=f"{indent}px", min_width=f"{indent}px", margin="0")
        if node.children:
            btn = w.Button(description="▸", tooltip=f"expand/collapse {node.key}",
                           layout=w.Layout(width=f"{toggle_w}px", height="22px", padding="0",
                                           margin="0"))
            btn.add_class("tm-tree-toggle")
            lead: Any = btn
        else:
            btn = None
            lead = w.HTML("", layout=w.Layout(width=f"{toggle_w}px", min_width=f"{toggle_w}px",
                                              margin="0"))
        row = w.HBox([pad, lead, html], layout=w.Layout(align_items="center", margin="0"))
        row.add_class("tm-tree-row")
        kids = w.VBox([], layout=w.Layout(display="none", margin="0"))
        kids.add_class("tm-tree-children")
        box = w.VBox([row, kids], layout=w.Layout(margin="0"))
        st = {"node": node, "kids": kids, "built": False, "open": False, "btn": btn}
        state[id(node)] = st
        if btn is not None:
            btn.on_click(lambda _b, n=node: set_open(n, not state[id(n)]["open"]))
        return box

    def set_open(node: TreeNode, is_open: bool) -> None:
        st = state[id(node)]
        if is_open and not st["built"]:
            st["kids"].children = [make(c) for c in node.children]
            st["built"] = True
        st["open"] = is_open
        st["kids"].layout.display = "" if is_open else "none"
        if st["btn"] is not None:
            st["btn"].description = "▾" if is_open else "▸"

    def expand_to(depth: int) -> None:
        def walk(node: TreeNode) -> None:
            if not node.children:
                return
            want = node.depth < depth
            if want or state[id(node)]["built"]:
                set_open(node, want)
            if want:
                for c in node.children:
                    walk(c)
        for r in roots:
            walk(r)

    top = w.VBox([make(r) for r in roots], layout=w.Layout(margin="0"))
    expand_to(expand_depth)

    depth_buttons = []
    for d in range(1, max_depth + 1):
        b = w.Button(description=str(d), tooltip=f"expand to depth {d}",
                     layout=w.Layout(width="34px", height="24px"))
        b.on_click(lambda _b, d=d: expand_to(d))
        b.add_class("tm-tree-depth")
        depth_buttons.append(b)
    collapse = w.Button(description="collapse", tooltip="collapse all",
                        layout=w.Layout(width="80px", height="24px"))
    collapse.on_click(lambda _b: expand_to(0))
    expand_all = w.Button(description="all", tooltip="expand everything",
                          layout=w.Layout(width="44px", height="24px"))
    expand_all.on_click(lambda _b: expand_to(max_depth + 1))
    controls = w.HBox([w.HTML(f'{_TREE_CSS}<span class="tm-muted">depth&nbsp;</span>'),
                       *depth_buttons,
                       expand_all, collapse], layout=w.Layout(align_items="center"))
    header = w.HBox([w.HTML("", layout=w.Layout(width=f"{toggle_w}px", min_width=f"{toggle_w}px")),
                     w.HTML(_row_html(headers, widths, align, header=True))])
    tree = w.VBox([controls, header, top], layout=w.Layout(overflow="auto"))
    tree.add_class("tm-tree")
    tree._tm_expand_to = expand_to  # for tests: drive the tree like the buttons do
    tree._tm_set_open = set_open
    tree._tm_roots = roots
    if on_build is not None:
        on_build(tree)
    return tree


__all__ = ["Cell", "TreeNode", "bars", "bars_html", "build_tree", "html_widget", "module_tree",
           "totals_header"]
