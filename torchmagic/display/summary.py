"""Rendering of :class:`torchmagic.core.summary.ModelSummary` (``%summary``).

- text: a table (qualified module name, class, the selected columns) that fits
  :func:`~torchmagic.display.format.text_width` (columns are narrowed or left out, module paths keep
  their layer numbers), repeated blocks folded (``layers.0-79 ×80`` with the totals, then the first
  block's rows), the totals below it, notes, the failure line, torchinfo's own table when asked for;
- HTML: totals as cards, the module tree (native ``<details>``, folded blocks, failed rows open,
  exact values on hover), bars of parameters and FLOPs by top-level module, notes, the failure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torchmagic.core.tracing import format_shapes
from torchmagic.display.format import (
    count_with_human,
    esc,
    exact,
    human_bytes,
    human_count,
    human_flops,
    text_width,
    wrap_text,
)
from torchmagic.display.table import Cell, Table, bars_html, cards_html, page
from torchmagic.display.tree import Node, TreeRow, fold, link, text_rows, tree_html

HEADERS = {"input": "input", "output": "output", "params": "params", "trainable": "train",
           "percent": "%", "flops": "FLOPs", "macs": "MACs", "bytes": "bytes",
           "kernel": "kernel", "calls": "calls"}
ALIGN = {"input": "l", "output": "l", "params": "r", "trainable": "l", "percent": "r",
         "flops": "r", "macs": "r", "bytes": "r", "kernel": "l", "calls": "r"}
# Left out of the text first when it does not fit the terminal (module, type, output, params
# and FLOPs stay).
DROP_ORDER = ["kernel", "bytes", "percent", "calls", "trainable", "input", "macs"]


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
            if row.status == "running":
                return Cell("failed inside", css="tm-bad",
                            title="did not finish: a module inside it failed")
            return Cell("-")
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


def title(s: Any, width: int | None = None) -> str:
    """``GPT summary (input (2, 128) int64, mode same, on cpu, depth 3)``: shapes compacted when
    that makes it fit ``width``; a long input list is cut with "…" between shapes only (the text
    wraps the title at spaces, never inside a shape)."""
    width = width or text_width()

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
    limit = 2 * width  # a title of more than two lines: leave shapes out, a whole one at a time
    if len(out) > limit and len(s.input_shapes) > 1:
        shapes = list(s.input_shapes)
        while len(shapes) > 1 and len(out) > limit:
            shapes.pop()
            more = len(s.input_shapes) - len(shapes)
            dts = "/".join(sorted(set(s.input_dtypes)))
            out = build(f"input {_shapes(shapes, True)}, … (+{more}) {dts}".rstrip())
    return out


def _row_css(r: Any) -> str | None:
    """Failed rows and the rows around the failing call are marked (a red edge)."""
    return ("tm-bad" if r.status in ("failed", "running") else
            "tm-muted" if r.status in ("not called", "in parent") else None)


def _sum(values: list[Any]) -> Any:
    return None if any(v is None for v in values) else sum(values)


def _run_total(rows: list[Any]) -> Any:
    """A folded run's row: the first block with the counts of all of them summed."""
    first = rows[0]
    return dataclasses.replace(
        first, params=sum(r.params for r in rows),
        trainable_params=sum(r.trainable_params for r in rows),
        percent=sum(r.percent for r in rows), calls=sum(r.calls for r in rows),
        flops=_sum([r.flops for r in rows]), output_bytes=_sum([r.output_bytes for r in rows]))


def tree(s: Any, compact: bool = False, long_tied: bool = False,
         notes_col: bool = False) -> tuple[list[str], list[str], list[Node]]:
    """``(headers, align, roots)``: the module tree with identical blocks folded."""
    cols = s.visible_columns()
    headers = ["module", "type", *[HEADERS[c] for c in cols]] + (["note"] if notes_col else [])
    align = ["l", "l", *[ALIGN[c] for c in cols]] + (["l"] if notes_col else [])

    def cells(r: Any) -> list[Any]:
        out: list[Any] = [r.cls, *[_cell(r, c, s.ran_forward, compact, long_tied) for c in cols]]
        if notes_col:
            out.append(_note(r))
        return out

    # "running": the module was inside the failing call (the failure may lie deeper than shown)
    rows = [TreeRow(path=r.path, depth=r.depth, cells=cells(r), css=_row_css(r),
                    failed=r.status in ("failed", "running"), data=r,
                    title=r.path or s.model_class) for r in s.rows]

    def totals(members: list[TreeRow]) -> list[Cell]:
        return [Cell(c) if isinstance(c, str) else c
                for c in cells(_run_total([m.data for m in members]))]

    return headers, align, fold(link(rows), totals)


def _fold_note(roots: list[Node]) -> str | None:
    def first(nodes: list[Node]) -> Node | None:
        for n in nodes:
            if n.members:
                return n
            hit = first(n.children)
            if hit is not None:
                return hit
        return None

    g = first(roots)
    if g is None:
        return None
    n = len(g.members)
    return (f"{g.run_label(full=True)}: {n} identical blocks folded into one row (their "
            f"totals); the rows under it are the first block, {g.row.path}")


def table(s: Any, compact: bool = False, long_tied: bool = False) -> Table:
    """The module table (text): identical blocks folded; ``compact`` writes shapes without spaces
    and folds the note column into the cells (``tied to wte`` params with ``long_tied``, else
    ``tied``; ``not called`` inputs, ``*`` analytic FLOPs); the notes below say the rest."""
    cols = s.visible_columns()
    notes_col = not compact and any(_note(r) for r in s.rows)
    headers, align, roots = tree(s, compact, long_tied, notes_col)
    rows, _, css, _ = text_rows(roots, label=lambda n: n.row.path or "(root)", full=True)
    drop = [2 + cols.index(c) for c in DROP_ORDER if c in cols]
    fixed = [2 + cols.index(c) for c in ("input", "output") if c in cols]
    notes = [x for x in [_fold_note(roots)] if x]
    return Table(headers=headers, rows=rows, align=align, title=title(s), row_css=css,
                 clip_middle=[0], drop=drop, fixed=fixed, keep_whole=[1], notes=notes)


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


def _fits(t: Table, width: int) -> bool:
    """True when the table's own lines fit ``width`` without cutting or leaving out anything."""
    saved, t.title, t.notes = (t.title, t.notes), None, []
    try:
        return max(len(line) for line in t.text(width=10**6).splitlines()) <= width
    finally:
        t.title, t.notes = saved


def _table_text(s: Any, width: int) -> str:
    """The compact table within ``width`` columns: tied rows say ``tied to <module>`` when that
    fits without cutting any cell, else ``tied`` (the note below the table names the owner)."""
    if any(r.tied for r in s.rows):
        t = table(s, compact=True, long_tied=True)
        if _fits(t, width):
            return t.text(width=width)
    return table(s, compact=True).text(width=width)


def text(s: Any) -> str:
    width = text_width()
    lines = [_table_text(s, width)]
    for label, value in totals(s):
        lines.extend(wrap_text(f"{label}: {value.text}", width))
    for note in s.notes:
        lines.extend(wrap_text(f"Note: {note}", width))
    if s.error:
        lines.extend(wrap_text(f"FORWARD FAILED: {s.error}", width))
    if s.torchinfo:
        lines.append("")
        lines.append("torchinfo's own table (same inputs and depth, run on a twin):")
        lines.append(s.torchinfo)
    return "\n".join(lines)


# -- html ----------------------------------------------------------------------------------------
def _cards(s: Any) -> str:
    items = [("parameters", human_count(s.total_params), exact(s.total_params))]
    if s.frozen_params:
        items += [("trainable", human_count(s.trainable_params), exact(s.trainable_params)),
                  ("frozen", human_count(s.frozen_params), exact(s.frozen_params))]
    items.append(("parameter bytes", human_bytes(s.param_bytes), f"{exact(s.param_bytes)} bytes"))
    if s.ran_forward:
        up_to = " (up to the failure)" if s.error else ""
        items += [(f"forward FLOPs{up_to}", human_flops(s.total_flops), exact(s.total_flops)),
                  ("MACs", human_flops(s.total_macs, unit="").strip(), exact(s.total_macs)),
                  ("activations", human_bytes(s.activation_bytes),
                   f"{exact(s.activation_bytes)} bytes")]
    if s.buffer_bytes:
        items.append(("buffers", human_bytes(s.buffer_bytes), f"{exact(s.buffer_bytes)} bytes"))
    if s.output_shapes:
        items.append(("output", format_shapes(s.output_shapes), None))
    return cards_html(items)


def _top_level(s: Any, attr: str) -> list[tuple[str, float, int]]:
    rows = [r for r in s.rows if r.depth == 1]
    items = [(r.path, float(getattr(r, attr) or 0), int(getattr(r, attr) or 0)) for r in rows]
    root = next((r for r in s.rows if r.depth == 0), None)
    if root is not None:
        rest = int(getattr(root, attr) or 0) - sum(v for _, _, v in items)
        if rest > 0:
            # after a failure the modules the forward never reached have no row: their
            # parameters are in the root's count, not "outside submodules"
            label = ("(root's own ops, before the failure)" if attr == "flops" else
                     "(modules after the failure, and the root's own)") if s.error else \
                "(root, outside submodules)"
            items.append((label, float(rest), rest))
    return [i for i in items if i[2] > 0]


def _failed_at(s: Any) -> str | None:
    """The deepest row on the failing call's path (the failure may lie deeper than shown)."""
    hits = [r for r in s.rows if r.status in ("failed", "running") and r.path]
    return max(hits, key=lambda r: r.depth).path if hits else None


def _bars(s: Any) -> str:
    failed_at = _failed_at(s)
    out = [bars_html("parameters by top-level module",
                     [(n, v, human_count(e), f"{exact(e)} parameters")
                      for n, v, e in _top_level(s, "params")])]
    if s.ran_forward:
        head = "forward FLOPs by top-level module"
        note = None
        if s.error:
            head += " (up to the failure)"
            note = (f"the forward stopped inside {failed_at or 'the model'}: modules after it "
                    "did not run")
        out.append(bars_html(head, [(n, v, human_flops(e), f"{exact(e)} FLOPs")
                                    for n, v, e in _top_level(s, "flops")], note))
    return f'<div class="tm-bars">{"".join(out)}</div>'


def html(s: Any) -> str:
    notes_col = any(_note(r) for r in s.rows)
    headers, align, roots = tree(s, compact=True, notes_col=notes_col)
    body = [f'<div class="tm-title">{esc(title(s))}</div>',
            _cards(s), tree_html(roots, headers, align,
                                 label=lambda n: n.label if n.row.path else s.model_class)]
    if any(r.depth == 1 for r in s.rows):
        body.append(_bars(s))
    dt = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(s.param_bytes_by_dtype.items()))
    if len(s.param_bytes_by_dtype) > 1:
        body.append(f'<div class="tm-note">parameter bytes by dtype: {esc(dt)}</div>')
    fold_note = _fold_note(roots)
    if fold_note:
        body.append(f'<div class="tm-note tm-muted">{esc(fold_note)}; open a folded row for the '
                    "first block and the list of the others</div>")
    if s.ran_forward:
        body.append('<div class="tm-note tm-muted">activations: bytes of the outputs of '
                    "leaf-module calls; FLOPs count 2 per multiply-add</div>")
    for n in s.notes:
        body.append(f'<div class="tm-note">Note: {esc(n)}</div>')
    if s.error:
        body.append(f'<div class="tm-error"><span class="tm-bad">FORWARD FAILED</span> '
                    f"{esc(s.error)}</div>")
    if s.torchinfo:
        body.append(f'<details style="margin-top:6px"><summary>torchinfo\'s own table (same '
                    f'inputs and depth, run on a twin)</summary><pre class="tm-mono">'
                    f"{esc(s.torchinfo)}</pre></details>")
    return page("".join(body))
