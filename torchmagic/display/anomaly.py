"""Rendering of :class:`torchmagic.core.anomaly.AnomalyReport`: text, HTML and a widget.

The origin (first op that turned finite values into NaN/Inf) is the highlighted block; the spread
(modules whose outputs became non-finite after it), further births (``--first N``) and the backward
finding follow. A clean run is one line.
"""

from __future__ import annotations

from typing import Any

from torchmagic.core.tracing import format_shapes
from torchmagic.display.format import esc, exact, human_count, text_width, wrap_text
from torchmagic.display.table import Cell, Table, html_block, page


def _fit(s: str, width: int, indent: int = 4) -> list[str]:
    """One logical line within ``width``: wrapped at spaces, continuation lines indented by
    ``indent`` (so a key-value row's value stays in its column)."""
    return wrap_text(s.replace("\n", " "), width, " " * indent)


def _line(frame: Any) -> str:
    if frame is None:
        return "-"
    return f"{frame.label()}: {frame.source}" if frame.source else frame.label()


def _counts(nan: int, inf: int) -> str:
    return f"{human_count(nan)} NaN, {human_count(inf)} Inf"


def _origin_rows(rep: Any) -> list[tuple[str, str]]:
    o = rep.origin
    rows = [("op", o.op)]
    if o.module_path:
        rows.append(("module", f"{o.module_path} ({o.module_class})"))
    else:
        rows.append(("module", "none (functional code outside any module)"))
    rows.append(("line", _line(o.cell_line) if o.cell_line else _line(o.where)))
    if o.where is not None and o.cell_line is not None and o.where is not o.cell_line:
        rows.append(("inside", _line(o.where)))
    rows.append(("inputs", format_shapes(o.input_shapes)))
    rows.append(("output", f"{format_shapes(o.output_shapes)}: {_counts(o.nan, o.inf)}"))
    if rep.origin_kind == "born":
        rows.append(("why", f"first op to produce {'NaN' if o.nan else 'Inf'} from "
                            f"{o.inputs_held}"))
    else:
        rows.append(("why", "no op produced it: a tensor given to the code already held "
                     + ("NaN" if o.nan else "Inf")))
    return rows


def _spread_table(rep: Any) -> Table:
    rows = [[s.module_path, s.module_class, str(s.calls), Cell(human_count(s.nan), exact(s.nan)),
             Cell(human_count(s.inf), exact(s.inf)), format_shapes(s.output_shapes)]
            for s in rep.spread]
    css = [("tm-bad" if rep.origin and s.module_path == rep.origin.module_path else None)
           for s in rep.spread]
    return Table(["module", "class", "calls", "NaN", "Inf", "output"], rows,
                 align=["l", "l", "r", "r", "r", "l"],
                 title=f"Spread: {len(rep.spread)} module(s) whose outputs became non-finite after it",
                 row_css=css)


def _births_table(rep: Any) -> Table:
    rows = []
    for e in rep.births:
        mod = f"{e.module_path} ({e.module_class})" if e.module_path else "-"
        line = e.cell_line.label() if e.cell_line else (e.where.label() if e.where else "-")
        rows.append([str(e.index), e.op, mod, line, Cell(human_count(e.nan), exact(e.nan)),
                     Cell(human_count(e.inf), exact(e.inf))])
    more = rep.births_total - len(rep.births)
    return Table(["#op", "op", "module", "line", "NaN", "Inf"], rows,
                 align=["r", "l", "l", "l", "r", "r"],
                 title=f"Births: first {len(rep.births)} of {rep.births_total} ops that produced "
                 "NaN/Inf their inputs did not hold",
                 notes=[f"... {more} more (raise --first)"] if more > 0 else [])


def _backward_rows(rep: Any) -> list[tuple[str, str]]:
    b = rep.backward
    rows = [("node", b.node), ("found", b.message)]
    if b.op:
        rows.append(("op", b.op))
    if b.cell_line is not None:
        rows.append(("forward line", _line(b.cell_line)))
    user = [f for f in b.forward_trace if not f.cell]
    if user:
        rows.append(("created in", _line(user[-1])))
    if not b.forward_trace:
        rows.append(("forward line", "unknown (torch recorded no forward traceback for it)"))
    if rep.origin is not None:
        rows.append(("note", "the forward origin above is the likely cause"))
    if b.raised:
        rows.append(("stopped", "anomaly mode raised in backward: the cell stopped there"))
    return rows


def _footer(rep: Any) -> str:
    def ops(n: int, phase: str) -> str:
        return f"{n:,} {phase} op{'s' * (n != 1)}"

    parts = [f"checked {ops(rep.forward_ops, 'forward')}" if rep.forward_checked else
             "forward not checked"]
    if rep.backward_checked:
        parts.append(ops(rep.backward_ops, "backward") if rep.backward_ops else "no backward ran")
    else:
        parts.append("backward not checked")
    if rep.masks:
        parts.append(f"{rep.masks} ±inf mask{'s' * (rep.masks != 1)} ignored")
    return "; ".join(parts)


def _error_text(rep: Any) -> str:
    where = f" at {rep.error_line.label()}" if rep.error_line else ""
    return f"The cell raised {rep.error}{where} (re-raised after this report)"


def text(rep: Any) -> str:
    """Plain text within :func:`~torchmagic.display.format.text_width` columns (long lines
    wrap at spaces; a quoted source line keeps its own spacing)."""
    width = text_width()
    if rep.clean:
        out = _fit(rep.summary, width, 2)
        if rep.error:
            out += _fit(_error_text(rep), width, 2)
        return "\n".join(out)
    out = _fit("NaN/Inf found: " + rep.summary, width, 2)
    if rep.origin is not None:
        out.append("Origin (forward)" if rep.origin_kind == "born"
                   else "Origin (forward): entered through an input")
        for k, v in _origin_rows(rep):
            out += _fit(f"  {k:<8} {v}", width, 9)
        if rep.first > 1 and rep.births:
            out.append(_births_table(rep).text(width))
        if rep.spread:
            out.append(_spread_table(rep).text(width))
    if rep.backward is not None:
        out += _fit(f"Backward: {rep.backward.kind} in {rep.backward.node}", width, 2)
        for k, v in _backward_rows(rep):
            out += _fit(f"  {k:<12} {v}", width, 13)
    if rep.error:
        out += _fit(_error_text(rep), width, 2)
    out += _fit(_footer(rep), width, 2)
    return "\n".join(out)


def _kv_html(rows: list[tuple[str, str]], highlight: bool) -> str:
    """Key-value rows in a box (the error box when ``highlight``); values keep their spacing
    (``white-space: pre-wrap``), so a quoted cell line reads as written."""
    cls = "tm-error" if highlight else "tm-error tm-plain"
    body = "".join(f'<tr><th style="padding:2px 10px 2px 0;text-align:left;vertical-align:top;'
                   f'white-space:nowrap">{esc(k)}</th><td class="tm-mono" style="padding:2px 0;text-align:left;'
                   f'white-space:pre-wrap">{esc(v)}</td></tr>' for k, v in rows)
    return (f'<div class="{cls}" style="padding:6px 10px;white-space:normal">'
            f'<table style="border-collapse:collapse;border:none">{body}</table></div>')


def _parts_html(rep: Any) -> dict[str, str]:
    """HTML pieces: header, origin, births, spread, backward, error, footer."""
    parts: dict[str, str] = {}
    if rep.clean:
        parts["header"] = f'<div class="tm-good">{esc(rep.summary)}</div>'
    else:
        parts["header"] = f'<div class="tm-bad">NaN/Inf found: {esc(rep.summary)}</div>'
    if rep.origin is not None:
        title = (f"Origin (forward): first op to produce {'NaN' if rep.origin.nan else 'Inf'} "
                 f"from {rep.origin.inputs_held}"
                 if rep.origin_kind == "born" else "Origin (forward): entered through an input")
        parts["origin"] = (f'<div class="tm-title" style="margin-top:6px">{esc(title)}</div>'
                           + _kv_html(_origin_rows(rep), True))
        if rep.first > 1 and rep.births:
            parts["births"] = _births_table(rep).html(wrap=False)
        if rep.spread:
            parts["spread"] = _spread_table(rep).html(wrap=False)
    if rep.backward is not None:
        parts["backward"] = (f'<div class="tm-title" style="margin-top:6px">Backward: '
                             f'{esc(rep.backward.kind)} in {esc(rep.backward.node)}</div>'
                             + _kv_html(_backward_rows(rep), rep.origin is None))
    if rep.error:
        parts["error"] = f'<div class="tm-warn">{esc(_error_text(rep))}</div>'
    parts["footer"] = f'<div class="tm-muted tm-note">{esc(_footer(rep))}</div>'
    return parts


def html(rep: Any) -> str:
    """Self-contained HTML (no JavaScript, no external assets)."""
    parts = _parts_html(rep)
    if rep.clean:
        return html_block(None, parts["header"] + parts.get("error", ""))
    return html_block(None, "".join(parts.values()))


def widget(rep: Any) -> Any:
    """ipywidgets view: verdict, the origin highlighted, details in collapsible sections."""
    import ipywidgets as w

    parts = _parts_html(rep)
    def box(key: str) -> Any:
        return w.HTML(page(parts[key]))

    children = [box("header")]
    if "origin" in parts:
        children.append(box("origin"))
    sections = [(k, t) for k, t in (("spread", "Spread"), ("births", "Births"),
                                    ("backward", "Backward")) if k in parts]
    if sections:
        acc = w.Accordion(children=[box(k) for k, _ in sections])
        for i, (_, title) in enumerate(sections):
            acc.set_title(i, title)
        if "origin" not in parts:
            acc.selected_index = 0
        children.append(acc)
    for k in ("error", "footer"):
        if k in parts:
            children.append(box(k))
    return w.VBox(children)
