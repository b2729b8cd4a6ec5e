"""Rendering of :class:`torchmagic.core.summary.ModelSummary` (``%summary``).

- text: a table (qualified module name, class, the selected columns) that fits 100 columns, the
  totals below it, notes, the failure line, and torchinfo's own table when asked for;
- HTML: the same table, self-contained, exact values on hover;
- widget: totals header, collapsible module tree (expand/collapse per module, depth buttons) and
  bars of parameters and FLOPs by top-level module.
"""

from __future__ import annotations

import textwrap
from typing import Any

from torchmagic.core.tracing import format_shapes
from torchmagic.display.format import (
    count_with_human,
    esc,
    exact,
    human_bytes,
    human_count,
    human_flops,
)
from torchmagic.display.table import Cell, Table, html_block

HEADERS = {"input": "input", "output": "output", "params": "params", "trainable": "train",
           "percent": "%", "flops": "FLOPs", "macs": "MACs", "bytes": "bytes",
           "kernel": "kernel", "calls": "calls"}
ALIGN = {"input": "l", "output": "l", "params": "r", "trainable": "l", "percent": "r",
         "flops": "r", "macs": "r", "bytes": "r", "kernel": "l", "calls": "r"}


def _flops(n: int | None) -> Cell:
    if n is None:
        return Cell("-")
    return Cell(human_flops(n, unit="").strip(), title=f"{exact(n)}")


def _shapes(shapes: Any, compact: bool) -> str:
    out = format_shapes(shapes)
    return out.replace(", ", ",").replace("),(", "), (") if compact else out


def _tied_owner(row: Any) -> str:
    """Where a row's tied parameters live, short: ``"wte"`` for ``"weight tied to wte.weight"``
    (same parameter name: the owning module), else the full name; several joined with ", "."""
    out = []
    for note in row.tied:
        pname, _, owner = note.partition(" tied to ")
        if owner.endswith("." + pname):
            owner = owner[: -len(pname) - 1]
        if owner not in out:
            out.append(owner)
    return ", ".join(out)


def _cell(row: Any, col: str, ran: bool, compact: bool = False, long_tied: bool = False) -> Cell:
    not_run = ran and row.status == "not called"
    if col == "input":
        if row.input_shapes is None:
            return Cell("not called" if not_run and compact else "-")
        return Cell(_shapes(row.input_shapes, compact), title=format_shapes(row.input_shapes))
    if col == "output":
        if row.status == "failed":
            return Cell("FAILED", css="tm-bad")
        if row.output_shapes is None:
            return Cell("…" if row.status == "running" else "-")
        kind = getattr(row, "output_type", None)
        shapes = _shapes(row.output_shapes, compact) if row.output_shapes or not kind else ""
        if kind and compact and row.output_shapes:
            kind = None  # plain text: the shapes (the type is in the Output line)
        return Cell(f"{kind} {shapes}".strip() if kind else shapes,
                    title=f"{getattr(row, 'output_type', None) or ''} "
                          f"{format_shapes(row.output_shapes)}".strip())
    if col == "params":
        missing = getattr(row, "uninitialized", 0) or getattr(row, "unknown", 0)
        if missing:  # lazy / unreadable weights: never a bare 0
            mark = "lazy" if getattr(row, "uninitialized", 0) else "?"
            return Cell(mark if not row.params else f"{human_count(row.params)} +{mark}",
                        title=f"{exact(row.params)} parameters counted; {missing} tensors of "
                              "unknown size")
        shown = human_count(row.params)
        if compact and row.tied:
            if long_tied:
                tied = f"tied to {_tied_owner(row)}"
                shown = tied if not row.params else f"{shown} +{tied}"
            else:
                shown = "tied" if not row.params else f"{shown} +tied"
        return Cell(shown, title=f"{exact(row.params)} parameters")
    if col == "trainable":
        return Cell(row.trainable, title=f"{exact(row.trainable_params)} trainable")
    if col == "percent":
        return Cell(f"{row.percent:.1f}%" if row.params else "-",
                    title=f"{row.percent:.4f}% of all parameters")
    if col == "flops":
        if not_run:
            return Cell("-")
        c = _flops(row.flops)
        if compact and row.analytic_flops:
            c.text += "*"
        if getattr(row, "uncounted", 0):
            c.text += "+?"  # ops without a FLOP formula ran here: see the NOT COUNTED note
        return c
    if col == "macs":
        if not_run:
            return Cell("-")
        c = _flops(row.macs)
        if getattr(row, "uncounted", 0):
            c.text += "+?"
        return c
    if col == "bytes":
        if row.output_bytes is None:
            return Cell("-")
        return Cell(human_bytes(row.output_bytes), title=f"{exact(row.output_bytes)} bytes")
    if col == "kernel":
        return Cell(row.kernel or "")
    if col == "calls":
        return Cell(str(row.calls) if row.calls else "-")
    raise KeyError(col)


def _note(row: Any) -> str:
    parts = list(row.tied)
    if row.status == "failed":
        parts.append("forward failed here")
    elif row.status == "not called":
        parts.append("not called")
    elif row.status == "in parent":
        parts.append("weights used by the parent's forward (FLOPs there)")
    if row.analytic_flops:
        parts.append("analytic FLOPs")
    if getattr(row, "shared", None):
        parts.append(f"also registered as {', '.join(row.shared)}")
    if getattr(row, "uncounted", 0):
        parts.append(f"{row.uncounted} op calls not counted")
    return "; ".join(parts)


def _inputs_desc(s: Any, compact: bool = False) -> str:
    if not s.ran_forward and not s.input_shapes:
        return "no inputs: parameters only"
    shapes = _shapes(s.input_shapes, compact)
    dts = sorted(set(s.input_dtypes))
    return f"input {shapes} {'/'.join(dts)}".rstrip()


def title(s: Any, width: int = 100) -> str:
    """``GPT summary (input (2, 128) int64, mode same, on cpu, depth 3)``, within ``width``
    characters (shapes compacted, then the input list cut with "…")."""
    def build(inputs: str) -> str:
        bits = [inputs]
        if s.ran_forward:
            bits.append(f"mode {s.mode}")
            if s.device:
                bits.append(f"on {s.device}")
        bits.append(f"depth {s.depth}")
        return f"{s.model_class} summary ({', '.join(bits)})"

    out = build(_inputs_desc(s))
    if len(out) > width:
        out = build(_inputs_desc(s, compact=True))
    if len(out) > width:
        inputs = _inputs_desc(s, compact=True)
        cut = max(10, len(inputs) - (len(out) - width) - 1)
        out = build(inputs[:cut].rstrip(", ") + "…")
    return out


def table(s: Any, compact: bool = False, long_tied: bool = False) -> Table:
    """The module table; ``compact`` (plain text) writes shapes without spaces and folds the note
    column into the cells (``tied to wte`` params with ``long_tied``, else ``tied``;
    ``not called`` inputs, ``*`` analytic FLOPs) so that the table fits 100 columns; the notes
    below the table say the rest."""
    cols = s.visible_columns()
    notes_col = not compact and any(_note(r) for r in s.rows)
    headers = ["module", "type", *[HEADERS[c] for c in cols]] + (["note"] if notes_col else [])
    align = ["l", "l", *[ALIGN[c] for c in cols]] + (["l"] if notes_col else [])
    rows, css = [], []
    for r in s.rows:
        name = Cell(r.path or "(root)", title=r.path or s.model_class)
        cells: list[object] = [name, r.cls, *[_cell(r, c, s.ran_forward, compact, long_tied)
                                              for c in cols]]
        if notes_col:
            cells.append(_note(r))
        rows.append(cells)
        css.append("tm-bad" if r.status == "failed" else
                   "tm-muted" if r.status in ("not called", "in parent") else None)
    return Table(headers=headers, rows=rows, align=align, title=title(s), row_css=css,
                 clip_middle=[0])


def totals(s: Any) -> list[tuple[str, Cell]]:
    """Footer (label, value) pairs."""
    out: list[tuple[str, Cell]] = []
    pct = 100.0 * s.trainable_params / s.total_params if s.total_params else 0.0
    out.append(("Parameters", Cell(
        f"{count_with_human(s.total_params)}; trainable {s.trainable_params:,} "
        f"({pct:.1f}%); frozen {s.frozen_params:,}")))
    dt = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(s.param_bytes_by_dtype.items()))
    out.append(("Parameter bytes", Cell(f"{human_bytes(s.param_bytes)}" + (f" ({dt})" if dt else ""),
                                        title=f"{exact(s.param_bytes)} bytes")))
    out.append(("Buffer bytes", Cell(human_bytes(s.buffer_bytes),
                                     title=f"{exact(s.buffer_bytes)} bytes")))
    if s.ran_forward:
        label = "Forward FLOPs" + (" (up to the failure)" if s.error else "")
        missing = " + ops not counted (see NOT COUNTED)" if getattr(s, "uncounted", None) else ""
        out.append((label, Cell(
            f"{human_flops(s.total_flops)} ({exact(s.total_flops)}); MACs "
            f"{human_flops(s.total_macs, unit='')}".rstrip() + missing,
            title=f"{exact(s.total_flops)} FLOPs = 2 x {exact(s.total_macs)} multiply-adds")))
        out.append(("Activation bytes", Cell(
            f"{human_bytes(s.activation_bytes)} (outputs of leaf-module calls)",
            title=f"{exact(s.activation_bytes)} bytes")))
        kind = getattr(s, "output_type", None)
        if s.output_shapes or kind:
            shapes = format_shapes(s.output_shapes or []) if s.output_shapes else "no tensors"
            out.append(("Output", Cell(f"{kind}: {shapes}" if kind else shapes)))
    return out


def _wrap(line: str, width: int = 100) -> list[str]:
    return textwrap.wrap(line, width=width, subsequent_indent="    ", break_on_hyphens=False) or [""]


def _table_text(s: Any) -> str:
    """The compact table within 100 columns: tied rows say ``tied to <module>`` when that fits
    without cutting any cell, else ``tied`` (the note below the table names the owner)."""
    if any(r.tied for r in s.rows):
        t = table(s, compact=True, long_tied=True)
        t.title = None
        if max(len(line) for line in t.text(width=10**6).splitlines()) <= 100:
            t.title = title(s)
            return t.text(width=100)
    return table(s, compact=True).text(width=100)


def text(s: Any) -> str:
    lines = [_table_text(s)]
    for label, value in totals(s):
        lines.extend(_wrap(f"{label}: {value.text}"))
    for note in s.notes:
        lines.extend(_wrap(f"Note: {note}"))
    if s.error:
        lines.extend(_wrap(f"FORWARD FAILED: {s.error}"))
    if s.torchinfo:
        lines.append("")
        lines.append("torchinfo's own table (same inputs and depth, run on a twin):")
        lines.append(s.torchinfo)
    return "\n".join(lines)


def html(s: Any) -> str:
    t = table(s)
    t.footer = [(k, v) for k, v in totals(s)]
    t.notes = [f"Note: {n}" for n in s.notes]
    extra = ""
    if s.error:
        extra += f'<div class="tm-note tm-bad">FORWARD FAILED: {esc(s.error)}</div>'
    if s.torchinfo:
        extra += (f'<details style="margin-top:6px"><summary>torchinfo\'s own table (same inputs '
                  f'and depth, run on a twin)</summary><pre class="tm-mono">{esc(s.torchinfo)}'
                  f'</pre></details>')
    return t.html(extra_html=extra)


def _top_level(s: Any, attr: str) -> list[tuple[str, float, int]]:
    rows = [r for r in s.rows if r.depth == 1]
    items = [(r.path, float(getattr(r, attr) or 0), int(getattr(r, attr) or 0)) for r in rows]
    root = next((r for r in s.rows if r.depth == 0), None)
    if root is not None:
        rest = int(getattr(root, attr) or 0) - sum(v for _, _, v in items)
        if rest > 0:
            items.append(("(root, outside submodules)", float(rest), rest))
    return [i for i in items if i[2] > 0]


def widget(s: Any) -> Any:
    import ipywidgets as w

    from torchmagic.display.widgets import TreeNode, bars, html_widget, module_tree, totals_header

    cards = [("parameters", human_count(s.total_params), f"{exact(s.total_params)}"),
             ("trainable", human_count(s.trainable_params), f"{exact(s.trainable_params)}"),
             ("frozen", human_count(s.frozen_params), f"{exact(s.frozen_params)}"),
             ("param bytes", human_bytes(s.param_bytes), f"{exact(s.param_bytes)} bytes")]
    if s.ran_forward:
        cards.append(("forward FLOPs", human_flops(s.total_flops), f"{exact(s.total_flops)}"))
        cards.append(("MACs", human_flops(s.total_macs, unit="").strip(), f"{exact(s.total_macs)}"))
        cards.append(("activations", human_bytes(s.activation_bytes),
                      f"{exact(s.activation_bytes)} bytes (outputs of leaf-module calls)"))
    cards.append(("buffers", human_bytes(s.buffer_bytes), f"{exact(s.buffer_bytes)} bytes"))
    parts: list[Any] = [totals_header(cards, title=title(s))]

    t = table(s)
    nodes = [TreeNode(key=r.path or s.model_class, depth=r.depth,
                      cells=[Cell(r.path.rsplit(".", 1)[-1] if r.path else s.model_class,
                                  title=r.path or s.model_class), *row[1:]],
                      css=t.row_css[i] if t.row_css else None)
             for i, (r, row) in enumerate(zip(s.rows, t.rows))]
    tree = module_tree(nodes, headers=t.headers, align=t.align, expand_depth=1)

    side = [bars("parameters by top-level module",
                 [(n, v, human_count(e), f"{exact(e)} parameters")
                  for n, v, e in _top_level(s, "params")])]
    if s.ran_forward:
        side.append(bars("forward FLOPs by top-level module",
                         [(n, v, human_flops(e), f"{exact(e)} FLOPs")
                          for n, v, e in _top_level(s, "flops")]))
    parts.append(w.HBox([tree, w.VBox(side)], layout=w.Layout(flex_flow="row wrap",
                                                              align_items="flex-start")))
    notes = [f"Note: {n}" for n in s.notes]
    footer = "".join(f'<div class="tm-note">{esc(n)}</div>' for n in notes)
    if s.error:
        footer += f'<div class="tm-note tm-bad">FORWARD FAILED: {esc(s.error)}</div>'
    if footer:
        parts.append(html_widget(html_block(None, footer)))
    if s.torchinfo:
        acc = w.Accordion([html_widget(html_block(None, f'<pre class="tm-mono">'
                                                        f'{esc(s.torchinfo)}</pre>'))])
        acc.set_title(0, "torchinfo's own table")
        acc.selected_index = None
        parts.append(acc)
    box = w.VBox(parts)
    box.add_class("tm-summary")
    return box
