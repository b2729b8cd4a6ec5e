"""Rendering of :class:`torchmagic.core.params.ParamReport` (``%params``).

Text and HTML: a per-module table (recursive counts, tied parameters at their first name), then
totals, bytes by dtype, devices (a loud WARNING when split), buffers and the tied parameters with
all their names. Widget: totals header, bars by top-level module and by dtype, and the HTML table.
"""

from __future__ import annotations

import textwrap
from typing import Any

from torchmagic.display.format import count_with_human, esc, exact, human_bytes, human_count
from torchmagic.display.table import Cell, Table, html_block


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


def table(r: Any, compact: bool = False) -> Table:
    show_devices = len(set(r.devices) | set(r.buffer_devices)) > 1
    show_buffers = r.buffer_count > 0
    show_split = r.only is None and r.frozen_params > 0
    headers = ["module", "type", "params", "%"]
    align = ["l", "l", "r", "r"]
    if show_split:
        headers += ["trainable", "frozen"]
        align += ["r", "r"]
    headers += ["bytes", "dtype"]
    align += ["r", "l"]
    if show_devices:
        headers.append("device")
        align.append("l")
    if show_buffers:
        headers.append("buffers")
        align.append("r")
    notes_col = any(row.tied for row in r.rows)
    if notes_col:
        headers.append("tied")
        align.append("l")
    rows = []
    for row in r.rows:
        cells: list[object] = [Cell(row.name, title=row.path or r.model_class), row.cls,
                               _params_cell(row),
                               Cell(f"{row.percent:.1f}%" if row.params else "-",
                                    title=f"{row.percent:.4f}%")]
        if show_split:
            cells += [_count(row.trainable, "trainable"), _count(row.frozen, "frozen")]
        cells += [Cell(human_bytes(row.bytes), title=f"{exact(row.bytes)} bytes"),
                  ",".join(row.dtypes) or "-"]
        if show_devices:
            cells.append(",".join(row.devices) or "-")
        if show_buffers:
            cells.append(Cell(human_count(row.buffers) if row.buffers else "-",
                              title=f"{exact(row.buffers)} buffer elements, "
                                    f"{exact(row.buffer_bytes)} bytes"))
        if notes_col:
            cells.append("; ".join(row.tied))
        rows.append(cells)
    return Table(headers=headers, rows=rows, align=align, title=title(r), clip_middle=[0])


def summary_lines(r: Any) -> list[tuple[str, str, str | None]]:
    """(label, text, css) lines under the table."""
    out: list[tuple[str, str, str | None]] = []
    tp = f"{r.trainable_percent:.1f}%"
    fp = f"{100.0 - r.trainable_percent:.1f}%" if r.total_params else "0.0%"
    out.append(("Total", f"{count_with_human(r.total_params)} in "
                         f"{r.param_tensors:,} tensors", None))
    out.append(("Trainable", f"{r.trainable_params:,} ({tp}); frozen {r.frozen_params:,} ({fp})",
                None))
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
        out.append(("WARNING", w, "tm-bad"))
    for n in r.notes:
        out.append(("Note", n, None))
    return out


def text(r: Any) -> str:
    lines = [table(r, compact=True).text(width=100)]
    for label, value, _ in summary_lines(r):
        lines.extend(textwrap.wrap(f"{label}: {value}", width=100, subsequent_indent="    ",
                                   break_on_hyphens=False) or [""])
    return "\n".join(lines)


def html(r: Any) -> str:
    t = table(r)
    extra = "".join(
        f'<div class="tm-note{" " + css if css else ""}"><b>{esc(label)}:</b> {esc(value)}</div>'
        for label, value, css in summary_lines(r))
    return t.html(extra_html=extra)


def widget(r: Any) -> Any:
    import ipywidgets as w

    from torchmagic.display.widgets import bars, html_widget, totals_header

    cards = [("parameters", human_count(r.total_params), exact(r.total_params)),
             ("trainable", f"{human_count(r.trainable_params)} ({r.trainable_percent:.1f}%)",
              exact(r.trainable_params)),
             ("frozen", human_count(r.frozen_params), exact(r.frozen_params)),
             ("bytes", human_bytes(r.param_bytes), f"{exact(r.param_bytes)} bytes"),
             ("buffers", human_bytes(r.buffer_bytes), f"{exact(r.buffer_bytes)} bytes"),
             ("devices", ", ".join(sorted(r.devices)) or "-", None)]
    parts: list[Any] = [totals_header(cards, title=title(r))]
    if r.warnings:
        parts.append(html_widget(html_block(None, "".join(
            f'<div class="tm-note tm-bad">WARNING: {esc(x)}</div>' for x in r.warnings))))
    top = [row for row in r.rows if row.depth == 1 and row.params]
    root = next((row for row in r.rows if row.depth == 0), None)
    items = [(row.path, float(row.params), human_count(row.params), f"{exact(row.params)} parameters")
             for row in top]
    if root is not None:
        rest = root.params - sum(row.params for row in top)
        if rest > 0:
            items.append(("(root itself)", float(rest), human_count(rest), f"{exact(rest)} parameters"))
    by_dtype = [(k, float(v), f"{human_count(r.params_by_dtype[k])} params, {human_bytes(v)}",
                 f"{exact(v)} bytes") for k, v in sorted(r.bytes_by_dtype.items())]
    parts.append(w.HBox([bars("parameters by top-level module", items),
                         bars("bytes by dtype", by_dtype)],
                        layout=w.Layout(flex_flow="row wrap", align_items="flex-start")))
    parts.append(html_widget(html(r)))
    box = w.VBox(parts)
    box.add_class("tm-params")
    return box
