"""One module tree for ``%summary``, ``%params`` and ``%%meta_shape``: repeated blocks folded, as
plain-text table rows or as self-contained HTML (native ``<details>``, no JavaScript).

Rows come in depth-first order (:class:`TreeRow`). :func:`fold` links them into a forest and folds
runs of consecutive siblings numbered ``p.0, p.1, ...`` whose whole subtrees show the same values
(same class, shapes, counts; only the path differs) into one group node: ``layers.0-79 ×80``.
A group keeps every block (``members``; the first is the representative), so any single block can
still be opened, and its row shows totals computed by the renderer (or the representative's own
values). Rows that failed never fold, and are shown without expanding anything.

HTML (:func:`tree_html`): every row is a CSS grid with the same column widths (in ``ch`` of a
monospace font), so columns line up across depths; indentation lives inside the first column; the
tree scrolls sideways instead of cutting columns; rows are 28 px, like JupyterLab's own tables.
Opening a folded group shows the representative and a "N more" row that lists the other blocks.
The layout is all inline styles with plain values, so it survives JupyterLab's sanitizer on
untrusted notebooks (see :mod:`torchmagic.display.table`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torchmagic.display.format import esc
from torchmagic.display.table import Cell, as_cell

MEMBER_ROWS = 3000    # rows of folded blocks' subtrees written into the HTML, at most
OPEN_ROWS = 40        # the HTML opens whole levels while no more than this many rows show

# The tree's layout is inline (see torchmagic.display.table: it must survive sanitizing).
ROW_STYLE = ("display:grid;grid-template-columns:{cols};gap:0 14px;padding:4px 8px;"
             "border-bottom:1px solid #7f7f7f40")
INDENT_PX = 14   # per level (at most 2ch of the 12 px monospace font the widths are counted in)

_NUMBERED = re.compile(r"^(.*?)(\d+)(\]?)$")


@dataclass
class TreeRow:
    """One row of a module tree (rows come depth-first; ``depth`` 0 is a root)."""

    path: str                       # qualified name ("" for a model's root)
    depth: int
    cells: list[Any]                # the columns after the module column (str or Cell)
    css: str | None = None          # "tm-bad" (failed), "tm-muted" (not called), ...
    failed: bool = False
    data: Any = None                # the renderer's own row (totals of folded runs use it)
    label: str | None = None        # first-column text (default: the path's last part)
    title: str | None = None        # hover text of the first column (default: the path)
    repeat: int = 1                 # folded upstream (%%meta_shape): number of calls
    last_path: str = ""             # ... and the last one's path


@dataclass
class Node:
    """A tree node: a row, or a folded run of identical blocks (``members``)."""

    row: TreeRow
    children: list[Node] = field(default_factory=list)
    members: list[Node] = field(default_factory=list)   # a folded run: every block, in order
    cells: list[Cell] | None = None                     # a folded run's row (totals)
    label: str = ""

    @property
    def folded(self) -> bool:
        return bool(self.members) or self.row.repeat > 1

    def run_label(self, full: bool = False) -> str:
        """A folded run's first-column text: ``layers.0-79 ×80`` (``full``: the whole path of
        the first block, ``model.layers.0-79 ×80``)."""
        if self.members:
            first, last, n = self.members[0].row.path, self.members[-1].row.path, len(self.members)
        else:
            first, last, n = self.row.path, self.row.last_path or self.row.path, self.row.repeat
        return run_label(first, last, n, full)

    @property
    def failed(self) -> bool:
        return self.row.failed or any(c.failed for c in self.children)

    def shown_cells(self) -> list[Cell]:
        return self.cells if self.cells is not None else [as_cell(c) for c in self.row.cells]


def _last_part(path: str) -> str:
    return path.rsplit(".", 1)[-1] if path else ""


def default_label(path: str, root_label: str = "(root)") -> str:
    """First-column text: the last part of the path; a number keeps its parent's name
    (``layers.17``), so a block reads the same on its own and folded (``layers.0-79 ×80``)."""
    if not path:
        return root_label
    parts = path.split(".")
    if len(parts) > 1 and parts[-1].isdigit():
        return ".".join(parts[-2:])
    return parts[-1]


def link(rows: Sequence[TreeRow]) -> list[Node]:
    """Depth-first rows -> a forest of nodes (no folding)."""
    roots: list[Node] = []
    stack: list[Node] = []
    for row in rows:
        node = Node(row, label=row.label if row.label is not None else default_label(row.path))
        while stack and stack[-1].row.depth >= row.depth:
            stack.pop()
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)
    return roots


def _rel(parent: str, path: str) -> str:
    return path[len(parent) + 1:] if parent and path.startswith(parent + ".") else path


def _signature(node: Node, cache: dict[int, Any]) -> Any:
    key = id(node)
    if key not in cache:
        r = node.row
        cache[key] = (tuple(as_cell(c).text for c in r.cells), r.css, r.failed, r.repeat,
                      tuple((_rel(r.path, c.row.path), _signature(c, cache))
                            for c in node.children))
    return cache[key]


def _consecutive(a: str, b: str) -> bool:
    ma, mb = _NUMBERED.match(a), _NUMBERED.match(b)
    return bool(ma and mb and ma.group(1) == mb.group(1) and ma.group(1).endswith((".", "["))
                and ma.group(3) == mb.group(3) and int(mb.group(2)) == int(ma.group(2)) + 1)


def run_label(first: str, last: str, n: int, full: bool = False) -> str:
    """``layers.0-79 ×80`` for blocks ``layers.0`` ... ``layers.79`` (``x ×3`` for one module
    called three times); ``full`` keeps the whole path of the first."""
    name = first if full else default_label(first)
    if first == last:
        return f"{name} ×{n}"
    m = _NUMBERED.match(last)
    end = m.group(2) if m else _last_part(last)
    return f"{name}-{end} ×{n}"


def fold(roots: list[Node], totals: Callable[[list[TreeRow]], list[Cell]] | None = None,
         min_run: int = 2) -> list[Node]:
    """Fold runs of identical numbered siblings (in place; returns ``roots``).

    ``totals(rows)`` gives a folded run's cells from its blocks' rows (sums of counts); without it
    the run shows its representative's cells. Runs already folded upstream (``repeat`` > 1) get
    their members rebuilt from the representative, whose subtree every block shares."""
    cache: dict[int, Any] = {}

    def walk(nodes: list[Node]) -> list[Node]:
        for n in nodes:
            n.children = walk(n.children)
        out: list[Node] = []
        i = 0
        while i < len(nodes):
            n = nodes[i]
            if n.row.repeat > 1:
                out.append(_upstream_group(n))
                i += 1
                continue
            j = i + 1
            if not n.failed:
                sig = _signature(n, cache)
                while j < len(nodes) and _consecutive(nodes[j - 1].row.path, nodes[j].row.path) \
                        and not nodes[j].failed and _signature(nodes[j], cache) == sig:
                    j += 1
            run = nodes[i:j]
            # two leaves would fold into as many rows as they take: fold blocks with children,
            # or three or more
            if len(run) >= max(min_run, 2 if run[0].children else 3):
                group = Node(run[0].row, members=run,
                             label=run_label(run[0].row.path, run[-1].row.path, len(run)))
                group.cells = totals([m.row for m in run]) if totals else None
                out.append(group)
            else:
                out.extend(run)
            i = j
        return out

    roots[:] = walk(roots)
    return roots


def _clone(node: Node, old: str, new: str) -> Node:
    def swap(path: str) -> str:
        if path == old:
            return new
        return new + path[len(old):] if path.startswith(old + ".") else path

    r = node.row
    row = TreeRow(swap(r.path), r.depth, r.cells, r.css, r.failed, r.data, None,
                  None if r.title is None else swap(r.title))
    return Node(row, [_clone(c, old, new) for c in node.children],
                label=default_label(row.path) if r.label is None or r.path != row.path
                else r.label)


def _upstream_group(node: Node) -> Node:
    """A run folded by the core (``repeat``/``last_path``): the blocks share the first one's
    subtree, so each member is the representative with its path renumbered."""
    r = node.row
    label = run_label(r.path, r.last_path or r.path, r.repeat)
    rep = Node(TreeRow(r.path, r.depth, r.cells, r.css, r.failed, r.data, None, r.title),
               node.children, label=default_label(r.path))
    members = [rep]
    m_first, m_last = _NUMBERED.match(r.path), _NUMBERED.match(r.last_path or "")
    if r.last_path and r.last_path != r.path and m_first and m_last:
        prefix, close = m_first.group(1), m_first.group(3)
        start = int(m_first.group(2))
        for k in range(start + 1, start + r.repeat):
            members.append(_clone(rep, r.path, f"{prefix}{k}{close}"))
        return Node(r, [], members=members, label=label)
    return Node(r, node.children, label=label)  # one module called again and again


def _count(nodes: list[Node]) -> int:
    return sum(1 + _count(n.children) + _count(n.members) for n in nodes)


# -- text ----------------------------------------------------------------------------------------
def text_rows(roots: list[Node], label: Callable[[Node], str], representative_row: bool = True,
              full: bool = False) -> tuple[list[list[Any]], list[int], list[str | None], bool]:
    """Table rows for plain text: ``(rows, indent levels, row classes, folded?)`` (folded: a
    folded run has rows under it). A folded run
    is its row (named with full paths when ``full``) followed by its first block
    (``representative_row``) or that block's children."""
    rows: list[list[Any]] = []
    levels: list[int] = []
    css: list[str | None] = []
    folded = False

    def emit(node: Node, level: int) -> None:
        nonlocal folded
        rows.append([Cell(node.run_label(full) if node.folded else label(node),
                          title=node.row.title or node.row.path), *node.shown_cells()])
        levels.append(level)
        css.append(node.row.css)
        if node.folded:
            rep = node.members[0] if node.members else None
            if rep is not None and representative_row and rep.children:
                folded = True
                emit(rep, level + 1)
                return
            under = rep.children if rep is not None else node.children
            folded = folded or bool(under)
            for c in under:
                emit(c, level + 1)
            return
        for c in node.children:
            emit(c, level + 1)

    for r in roots:
        emit(r, 0)
    return rows, levels, css, folded


# -- html ----------------------------------------------------------------------------------------
def _auto_open_depth(roots: list[Node], limit: int = OPEN_ROWS) -> int:
    """The deepest level to open so that at most ``limit`` rows show (folded runs closed)."""
    depth = 0
    level = list(roots)
    shown = len(level)
    while level:
        nxt = [c for n in level if not n.folded for c in n.children]
        if not nxt or shown + len(nxt) > limit:
            break
        shown += len(nxt)
        depth += 1
        level = nxt
    return depth


def tree_html(roots: list[Node], headers: Sequence[str], align: Sequence[str],
              open_depth: int | None = None, label: Callable[[Node], str] | None = None) -> str:
    """The tree as nested ``<details>`` rows under a header row, inside a sideways scroller.

    Levels down to ``open_depth`` start open (default: as many as keep about 40 rows in view);
    ancestors of a failed row are always open. Column widths are shared by every row."""
    own = label or (lambda n: n.label)

    def label(n: Node) -> str:
        return n.label if n.folded else own(n)

    if open_depth is None:
        open_depth = _auto_open_depth(roots)
    budget = [MEMBER_ROWS]

    # column widths in ch: the first holds indentation (2ch a level) + toggle (2ch) + label
    widths = [len(h) for h in headers]

    def measure(nodes: list[Node], level: int) -> None:
        for n in nodes:
            widths[0] = max(widths[0], 2 * level + 2 + len(label(n)))
            for i, c in enumerate(n.shown_cells(), start=1):
                if i < len(widths):
                    widths[i] = max(widths[i], len(c.text))
            measure(n.children, level + 1)
            if n.members:
                measure(n.members[:1], level + 1)
                widths[0] = max(widths[0], 2 * (level + 1) + 2 + len(_more_label(n)))
                # other blocks differ from the first only in their numbers
                widths[0] = max(widths[0], 2 * (level + 2) + 2 + max(
                    len(label(m)) for m in n.members))

    measure(roots, 0)
    row_style = ROW_STYLE.format(cols=" ".join(f"{w}ch" for w in widths))
    right = [i < len(align) and align[i] == "r" for i in range(len(headers))]
    parts = ['<div class="tm-scroll"><div class="tm-tree">',
             f'<div class="tm-row tm-head" style="{row_style};'
             'border-bottom:1px solid rgba(127,127,127,.6)">']
    parts.append(" ".join(f'<span style="text-align:right">{esc(h)}</span>' if right[i] else
                          f"<span>{esc(h)}</span>" for i, h in enumerate(headers)))
    parts.append("</div>")

    def cells_html(node: Node, level: int, first: str, css: str = "",
                   titles: bool = True, toggle: str = "▸") -> str:
        """A row's cells; ``titles=False`` (the other blocks of a folded run, whose values are
        the first block's) leaves out the exact values on hover, keeping only the path."""
        r = node.row
        title = r.title or r.path or first
        # toggle: the state a row starts in (a <style>, where kept, follows every click);
        # a leaf has none, its indentation makes up for it
        indent = INDENT_PX * (level if toggle else level + 1)
        pad = f' style="padding-left:{indent}px"' if indent else ""
        tog = f'<span class="tm-tog">{toggle}</span>' if toggle else ""
        out = [f'<span class="tm-c0{css}"{pad} title="{esc(title)}">{tog}{esc(first)}</span>']
        for i, c in enumerate(node.shown_cells(), start=1):
            a = f' class="{c.css}"' if c.css else ""
            if i < len(right) and right[i]:
                a += ' style="text-align:right"'
            t = f' title="{esc(c.title)}"' if c.title and titles else ""
            out.append(f"<span{a}{t}>{esc(c.text)}</span>")
        return " ".join(out)  # spaces: readable even where every style is stripped

    def row_open(node: Node, tag: str = "div") -> str:
        extra = {"tm-bad": " tm-row-bad", "tm-muted": " tm-row-muted"}.get(node.row.css or "", "")
        style = row_style + (";cursor:pointer;list-style:none" if tag == "summary" else "")
        return f'<{tag} class="tm-row{extra}" style="{style}">'

    def emit(node: Node, level: int, titles: bool = True) -> None:
        kids = node.children
        if node.members:
            emit_group(node, level)
            return
        if not kids:
            parts.append(f"{row_open(node)}"
                         f"{cells_html(node, level, label(node), titles=titles, toggle='')}"
                         "</div>")
            return
        is_open = level < open_depth or node.failed
        cells = cells_html(node, level, label(node), titles=titles,
                           toggle="▾" if is_open else "▸")
        parts.append(f'<details{" open" if is_open else ""}>{row_open(node, "summary")}'
                     f"{cells}</summary>")
        for c in kids:
            emit(c, level + 1, titles)
        parts.append("</details>")

    def emit_group(node: Node, level: int) -> None:
        rep, rest = node.members[0], node.members[1:]
        parts.append(f'<details>{row_open(node, "summary")}'
                     f'{cells_html(node, level, label(node), " tm-fold")}</summary>')
        emit(rep, level + 1)
        if rest:
            pad = INDENT_PX * (level + 1)
            parts.append(f'<details><summary class="tm-row" style="{row_style};cursor:pointer;'
                         f'list-style:none"><span class="tm-c0 tm-more" '
                         f'style="padding-left:{pad}px"><span class="tm-tog">▸</span>'
                         f"{esc(_more_label(node))}</span></summary>")
            for m in rest:
                if budget[0] > 0:
                    budget[0] -= 1 + _count(m.children)
                    emit(m, level + 2, titles=False)
                else:  # past the budget: the block's own row only (its subtree is the first's)
                    parts.append(f"{row_open(m)}"
                                 f"{cells_html(m, level + 2, label(m), titles=False, toggle='')}"
                                 "</div>")
            parts.append("</details>")
        parts.append("</details>")

    for r in roots:
        emit(r, 0)
    parts.append("</div></div>")
    return "".join(parts)


def _more_label(node: Node) -> str:
    rest = node.members[1:]
    if not rest:
        return ""
    first, last = rest[0].row.path, rest[-1].row.path
    span = (f"{default_label(first)}" if len(rest) == 1 else
            f"{default_label(first)} … {default_label(last)}")
    return f"{len(rest)} more: {span}"


__all__ = ["MEMBER_ROWS", "Node", "TreeRow", "default_label", "fold", "link",
           "run_label", "text_rows", "tree_html"]
