"""Rendering of :class:`torchmagic.core.params.ParamReport` (``%params``).

Text and HTML: the module tree (recursive counts, tied parameters at their first name, identical
blocks folded as ``layers.0-79 ×80`` with their totals), then totals, bytes by dtype, devices (a
warning when split), buffers and the tied parameters with all their names. The text fits
:func:`~torchmagic.display.format.text_width`; the HTML is cards, the tree (native ``<details>``),
bars by top-level module and by dtype. Widget (``%config TorchMagic.display = "widget"``): the
same pieces in three HTML widgets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torchmagic.display.format import (
    count_with_human,
    esc,
    exact,
    human_bytes,
    human_count,
    text_width,
    wrap_text,
)
from torchmagic.display.table import Cell, Table, bars_html, cards_html, page
from torchmagic.display.tree import Node, TreeRow, fold, link, text_rows, tree_html


def _count(n: int, what: str = "parameters") -> Cell:
    return Cell(human_count(n), title=f"{exact(n)} {what}")


def _params_cell(row: Any) -> Cell:
    """The count, plus ``lazy`` / ``?`` for weights whose size is not known (uninitialized lazy
    parameters, unreadable packed weights): never a bare 0 for them."""
    cell = _count(row.params)
    missing = [f"{n} {what}" for n, what in ((getattr(row, "uninitialized", 0), "uninitialized"),
                                             (getattr(row, "unknown", 0), "unknown size")) if n]
    if missing:
        mark = "lazy" if getattr(row, "uninitialized", 0) else "?"
        cell = Cell(mark if not row.params else f"{cell.text} +{mark}",
                    title=f"{exact(row.params)} parameters counted; {', '.join(missing)}")
    return cell


def title(r: Any) -> str:
    which = {"trainable": ", trainable only", "frozen": ", frozen only"}.get(r.only or "", "")
    return f"{r.name} ({r.model_class}) parameters (depth {r.depth}{which})"


def _columns(r: Any) -> tuple[list[str], list[str], dict[str, int]]:
    show_devices = len(set(r.devices) | set(r.buffer_devices)) > 1
    show_split = r.only is None and r.frozen_params > 0
    headers = ["module", "type", "params", "%"]
    if show_split:
        headers += ["trainable", "frozen"]
    headers += ["bytes", "dtype"]
    if show_devices:
        headers.append("device")
    if r.buffer_count > 0:
        headers.append("buffers")
    if any(row.tied for row in r.rows):
        headers.append("tied")
    align = ["r" if h in ("params", "%", "trainable", "frozen", "bytes", "buffers") else "l"
             for h in headers]
    return headers, align, {h: i for i, h in enumerate(headers)}


def _cells(r: Any, row: Any, index: dict[str, int]) -> list[Any]:
    cells: list[Any] = [row.cls, _params_cell(row),
                        Cell(f"{row.percent:.1f}%" if row.params else "-",
                             title=f"{row.percent:.4f}%")]
    if "trainable" in index:
        cells += [_count(row.trainable, "trainable"), _count(row.frozen, "frozen")]
    cells += [Cell(human_bytes(row.bytes), title=f"{exact(row.bytes)} bytes"),
              ",".join(row.dtypes) or "-"]
    if "device" in index:
        cells.append(",".join(row.devices) or "-")
    if "buffers" in index:
        cells.append(Cell(human_count(row.buffers) if row.buffers else "-",
                          title=f"{exact(row.buffers)} buffer elements, "
                                f"{exact(row.buffer_bytes)} bytes"))
    if "tied" in index:
        cells.append("; ".join(row.tied))
    return cells


def tree(r: Any) -> tuple[list[str], list[str], list[Node]]:
    """``(headers, align, roots)``: the module tree with identical blocks folded."""
    headers, align, index = _columns(r)
    rows = [TreeRow(path=row.path, depth=row.depth, cells=_cells(r, row, index), data=row,
                    title=row.path or r.model_class) for row in r.rows]

    def totals(members: list[TreeRow]) -> list[Cell]:
        rs = [m.data for m in members]
        total = dataclasses.replace(
            rs[0], params=sum(x.params for x in rs), trainable=sum(x.trainable for x in rs),
            frozen=sum(x.frozen for x in rs), bytes=sum(x.bytes for x in rs),
            buffers=sum(x.buffers for x in rs), buffer_bytes=sum(x.buffer_bytes for x in rs),
            uninitialized=sum(x.uninitialized for x in rs), unknown=sum(x.unknown for x in rs),
            percent=sum(x.percent for x in rs))
        return [c if isinstance(c, Cell) else Cell(c) for c in _cells(r, total, index)]

    return headers, align, fold(link(rows), totals)


def _fold_note(roots: list[Node]) -> str | None:
    stack = list(roots)
    while stack:
        n = stack.pop(0)
        if n.members:
            k = len(n.members)
            return (f"{n.run_label(full=True)}: {k} identical blocks folded into one row (their "
                    f"totals); the rows under it are the first block, {n.row.path}")
        stack[:0] = n.children
    return None


def table(r: Any, compact: bool = False) -> Table:
    """The module table (text), identical blocks folded."""
    headers, align, roots = tree(r)
    rows, _, css, _ = text_rows(roots, label=lambda n: n.row.path or "(root)", full=True)
    order = ["tied", "buffers", "%", "frozen", "trainable", "device", "dtype"]
    drop = [headers.index(h) for h in order if h in headers]
    notes = [x for x in [_fold_note(roots)] if x]
    return Table(headers=headers, rows=rows, align=align, title=title(r), row_css=css,
                 clip_middle=[0], drop=drop, keep_whole=[1], notes=notes)


def summary_lines(r: Any) -> list[tuple[str, str, str | None]]:
    """(label, text, css) lines under the table."""
    out: list[tuple[str, str, str | None]] = []
    tp = f"{r.trainable_percent:.1f}%"
    fp = f"{100.0 - r.trainable_percent:.1f}%" if r.total_params else "0.0%"
    lazy = len(r.uninitialized)
    if lazy:  # param_tensors counts them too
        total = (f"{count_with_human(r.total_params)} in {r.param_tensors - lazy:,} sized "
                 f"tensors; {lazy} uninitialized (sized at the first forward)")
    else:
        total = f"{count_with_human(r.total_params)} in {r.param_tensors:,} tensors"
    out.append(("Total", total, None))
    if lazy and not r.total_params:  # nothing sized yet: a percentage of 0 says nothing
        out.append(("Trainable", f"not known until the first forward ({lazy} uninitialized "
                                 "parameters)", None))
    else:
        out.append(("Trainable", f"{r.trainable_params:,} ({tp}); frozen {r.frozen_params:,} "
                                 f"({fp})" + (f"; {lazy} uninitialized not counted" if lazy
                                              else ""), None))
    dts = "; ".join(f"{k}: {human_count(r.params_by_dtype[k])} params, {human_bytes(v)}"
                    for k, v in sorted(r.bytes_by_dtype.items()))
    out.append(("Bytes", f"{human_bytes(r.param_bytes)} ({exact(r.param_bytes)})"
                         + (f"; {dts}" if dts else ""), None))
    devs = ", ".join(f"{d} ({human_count(n)})" for d, n in sorted(r.devices.items())) or "none"
    out.append(("Devices", devs, None))
    if r.buffer_count:
        bdev = ", ".join(sorted(r.buffer_devices))
        out.append(("Buffers", f"{r.buffer_count} tensors, {r.total_buffers:,} elements, "
                               f"{human_bytes(r.buffer_bytes)} on {bdev} (not parameters)", None))
    else:
        out.append(("Buffers", "none", None))
    for t in r.tied:
        out.append(("Tied", f"{' = '.join(t.names)}: {human_count(t.numel)} "
                            f"({'x'.join(map(str, t.shape))} {t.dtype}), counted once", None))
    for w in r.warnings:
        out.append(("WARNING", w, "tm-error"))
    for n in r.notes:
        out.append(("Note", n, None))
    return out


def text(r: Any) -> str:
    width = text_width()
    lines = [table(r).text(width)]
    for label, value, _ in summary_lines(r):
        lines.extend(wrap_text(f"{label}: {value}", width))
    return "\n".join(lines)


# -- html ----------------------------------------------------------------------------------------
def _cards(r: Any) -> str:
    items = [("parameters", human_count(r.total_params), exact(r.total_params))]
    if r.frozen_params:
        items += [("trainable", f"{human_count(r.trainable_params)} ({r.trainable_percent:.1f}%)",
                   exact(r.trainable_params)),
                  ("frozen", human_count(r.frozen_params), exact(r.frozen_params))]
    items += [("bytes", human_bytes(r.param_bytes), f"{exact(r.param_bytes)} bytes"),
              ("tensors", f"{r.param_tensors:,}", None)]
    if r.buffer_count:
        items.append(("buffers", human_bytes(r.buffer_bytes), f"{exact(r.buffer_bytes)} bytes"))
    items.append(("devices", ", ".join(sorted(r.devices)) or "-", None))
    return cards_html(items)


def _bars(r: Any) -> str:
    top = [row for row in r.rows if row.depth == 1 and row.params]
    root = next((row for row in r.rows if row.depth == 0), None)
    items = [(row.path, float(row.params), human_count(row.params),
              f"{exact(row.params)} parameters") for row in top]
    if root is not None:
        rest = root.params - sum(row.params for row in top)
        if rest > 0:
            items.append(("(root itself)", float(rest), human_count(rest),
                          f"{exact(rest)} parameters"))
    by_dtype = [(k, float(v), f"{human_count(r.params_by_dtype[k])} params, {human_bytes(v)}",
                 f"{exact(v)} bytes") for k, v in sorted(r.bytes_by_dtype.items())]
    parts = []
    if items:
        parts.append(bars_html("parameters by top-level module", items))
    if by_dtype:
        parts.append(bars_html("bytes by dtype", by_dtype))
    return f'<div class="tm-bars">{"".join(parts)}</div>' if parts else ""


def _lines_html(r: Any) -> str:
    out = []
    for label, value, css in summary_lines(r):
        if label in ("Total", "Trainable"):  # the cards say these
            continue
        cls = f" {css}" if css else ""
        lab = f'<b class="tm-bad">{esc(label)}:</b>' if css == "tm-error" else f"<b>{esc(label)}:</b>"
        out.append(f'<div class="tm-note{cls}">{lab} {esc(value)}</div>')
    return "".join(out)


def _head_html(r: Any) -> str:
    return f'<div class="tm-title">{esc(title(r))}</div>{_cards(r)}'


def _body_html(r: Any) -> str:
    headers, align, roots = tree(r)
    note = _fold_note(roots)
    fold_html = (f'<div class="tm-note tm-muted">{esc(note)}; open a folded row for the first '
                 "block and the list of the others</div>" if note else "")
    return (tree_html(roots, headers, align,
                      label=lambda n: n.label if n.row.path else r.model_class)
            + _bars(r) + fold_html + _lines_html(r))


def html(r: Any) -> str:
    return page(_head_html(r) + _body_html(r))


def widget(r: Any) -> Any:
    """Three HTML widgets: title and cards, the bars, the tree and the lines under it."""
    import ipywidgets as w

    def box(inner: str) -> Any:
        return w.HTML(page(inner))

    headers, align, roots = tree(r)
    bars = _bars(r)
    parts = [box(_head_html(r)), w.HBox([box(bars)] if bars else []),
             box(tree_html(roots, headers, align,
                           label=lambda n: n.label if n.row.path else r.model_class)
                 + _lines_html(r))]
    out = w.VBox(parts)
    out.add_class("tm-params")
    return out
