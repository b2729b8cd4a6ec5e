"""Rendering of :class:`~torchmagic.core.compile.CompileReport`: plain text and self-contained HTML.

Text fits :func:`torchmagic.display.format.text_width`. HTML uses no JavaScript: graph breaks link to
their line in a numbered listing of the cell (anchors), captured logs and each break's full text
are folded ``<details>``. No widget: the report is final when shown.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from torchmagic.core.compile_graphs import short_file
from torchmagic.display.bench import human_time
from torchmagic.display.format import esc, text_width, wrap_text
from torchmagic.display.table import Cell, Table, html_block

LOG_LINES_TEXT = 12     # lines of each captured log shown in text (all are in report.logs)
LOG_LINES_HTML = 2000   # lines of each captured log put in the HTML
_ids = itertools.count(1)


def _seconds(s: float | None) -> str:
    return "-" if s is None else human_time(s)


def _n(count: int, word: str) -> str:
    """``1 graph``, ``3 graphs``, ``2 more graph breaks``."""
    return f"{count} {word}{'s' if count != 1 else ''}"


def _later_calls(r: Any) -> str:
    """``call 2`` or ``calls 2-4``: the calls after the first."""
    return "call 2" if r.runs == 2 else f"calls 2-{r.runs}"


def _header(r: Any) -> tuple[str, list[str]]:
    what = {"cell": "the cell", "module": f"{r.target}'s forward",
            "function": f"{r.target}()"}.get(r.kind, r.target)
    opts = [f"backend {r.backend}"]
    if r.mode:
        opts.append(f"mode {r.mode}")
    if r.dynamic is not None:
        opts.append(f"dynamic={r.dynamic}")
    if r.fullgraph:
        opts.append("fullgraph")
    if r.explain_only:
        opts.append("--explain: tracing only")
    opts.append(f"{r.runs} call{'s' if r.runs != 1 else ''}")
    title = f"torch.compile of {what} ({', '.join(opts)})"
    lines = []
    if r.fullgraph_error is not None:
        lines.append(f"fullgraph=True FAILS at {r.fullgraph_error.where()}: "
                     f"{r.fullgraph_error.explanation}")
    else:
        # the first call as torch._dynamo.explain counts it; later calls apart, so that the
        # graphs of both add up to the table's rows and the recompiles to the list's
        verdict = "compiles cleanly: one graph" if r.clean else _n(r.graph_count, "graph")
        first = (f"{verdict}, {_n(r.graph_break_count, 'graph break')}, "
                 f"{_n(r.first_call_recompile_count, 'recompile')}, {r.op_count} ops")
        if r.runs > 1:
            lines.append(f"call 1: {first}")
            lines.append(f"{_later_calls(r)}: {_n(r.later_recompile_count, 'recompile')}, "
                         f"{_n(r.later_graph_count, 'more graph')}, "
                         f"{_n(r.later_graph_break_count, 'more graph break')} "
                         f"({_n(len(r.graphs), 'graph')} in all)")
        else:
            lines.append(first)
        if r.graph_count > r.graph_break_count + 1:
            lines.append(f"(dynamo also compiled frames separately: explain's graph_break_count "
                         f"= graphs - 1 = {r.explain_graph_break_count})")
    if r.explain_only:
        lines.append(f"tracing (dynamo): {_seconds(r.compile_seconds)}; first call "
                     f"{_seconds(r.first_call_seconds)}")
    else:
        lines.append(f"compile (all calls): {_seconds(r.compile_seconds)} = dynamo tracing "
                     f"{_seconds(r.tracing_seconds)} + {r.backend} code generation "
                     f"{_seconds(r.codegen_seconds)}; first call {_seconds(r.first_call_seconds)}")
    return title, lines


def _break_body(b: Any) -> list[tuple[str, str]]:
    """(css class, text) of the lines under a break's heading: its code, reason, hints."""
    out = [("tm-mono", b.place.code)] if b.place is not None and b.place.code else []
    out.append(("", b.explanation))
    out += [("tm-muted", f"hint: {h}") for h in b.hints]
    return out


def _break_lines(b: Any) -> list[str]:
    out = [f"{b.index}. {b.where()}  [{b.kind}]"]
    out += [f"   {text}" for _, text in _break_body(b)]
    if b.url:
        out.append(f"   {b.gb_id}: {b.url}")
    return out


def _short_place(p: Any) -> str:
    if p is None:
        return "?"
    return f"cell line {p.line}" if p.in_cell else f"{short_file(p.filename)}:{p.line}"


def _graphs_title(r: Any) -> str:
    """``Graphs (5: 2 in call 1, 3 in call 2)``: the table's rows, counted as the header does."""
    if r.runs <= 1:
        return f"Graphs ({len(r.graphs)})"
    return (f"Graphs ({len(r.graphs)}: {r.graph_count} in call 1, {r.later_graph_count} in "
            f"{_later_calls(r)})")


def _graph_table(r: Any) -> Table:
    rows: list[list[object]] = []
    for g in r.graphs:
        ops = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in g.op_names[:4])
        if len(g.op_names) > 4:
            ops += ", ..."
        end = g.ends
        if g.break_index is not None:
            end = f"break{f' #{g.break_index}' if g.run == 1 else ''}: {g.break_kind or g.ends}" \
                  f" at {_short_place(g.place)}"
        rows.append([str(g.index), str(g.run), (g.compile_id or "?") + ("*" if g.recompile else ""),
                     g.function, str(g.ops), ops, end])
    notes = ["compile: dynamo's compile id (frame/n, as its logs write it); * a recompile: the "
             "frame compiled again (Recompiles says why)"] \
        if any(g.recompile for g in r.graphs) else []
    return Table(["graph", "call", "compile", "frame", "ops", "top ops", "ends with"], rows,
                 align=["r", "r", "l", "l", "r", "l", "l"], notes=notes)


def _recompiles_title(r: Any) -> str:
    """``Recompiles (3)``; ``Recompiles (2, 1 listed: ...)`` when one failed guard recompiled
    several frames."""
    if r.recompile_count == len(r.recompiles):
        return f"Recompiles ({r.recompile_count})"
    return (f"Recompiles ({r.recompile_count}, {len(r.recompiles)} listed: the same guard failed "
            "in several frames)")


def _recompile_label(r: Any, rc: Any) -> str:
    """``call 2 (graph 3, compile 0/1)``: the call, and the table's rows this recompile made."""
    graphs = [str(g.index) for g in r.graphs if g.compile_id and g.compile_id in rc.compile_ids]
    ids = ", ".join(rc.compile_ids)
    if not ids:
        return f"call {rc.run}"
    many = len(rc.compile_ids) > 1
    compiles = f"compile{'s' if many else ''} {ids}"
    if not graphs:
        return f"call {rc.run} ({compiles}, no graph)"
    sep = "; " if many else ", "
    return f"call {rc.run} (graph{'s' if len(graphs) > 1 else ''} {', '.join(graphs)}{sep}{compiles})"


def _recompile_lines(r: Any, rc: Any) -> list[str]:
    out = [f"{rc.index}. {_recompile_label(r, rc)}: {rc.where()}  [{rc.kind}]",
           f"   guard failed: {rc.guard}"]
    if len(rc.frames) > 1:
        out.append(f"   frames recompiled: {', '.join(rc.frames)}")
    if rc.source_line:
        out.append(f"   guard from: {rc.source_line}")
    if rc.suggestion:
        out.append(f"   suggestion: {rc.suggestion}")
    if rc.code:
        out.append(f"   code: {rc.code}")
    return out


def _timing_table(r: Any) -> Table:
    t = r.timing
    from torchmagic.core.compile import speedup_text

    rows = [["eager", Cell(human_time(t.eager_median), f"{t.eager_median:.6g} s"),
             f"{human_time(t.eager_iqr)}", str(t.eager_runs), ""],
            ["compiled", Cell(human_time(t.compiled_median), f"{t.compiled_median:.6g} s"),
             f"{human_time(t.compiled_iqr)}", str(t.compiled_runs), speedup_text(t)]]
    be = t.break_even_calls
    pays = ("never at this speed (compiled is not faster)" if be is None
            else f"after {math.ceil(be):,} calls")
    return Table(["", "median per call", "IQR", "runs", "speed-up"], rows,
                 align=["l", "r", "r", "r", "l"],
                 title=f"Eager vs compiled (torch.utils.benchmark, {t.threads} threads, after "
                       "warm-up)",
                 footer=[("first compiled call (compile + run)", human_time(t.first_call_seconds)),
                         ("compiling pays off", pays)],
                 notes=[f"warning: {w}" for w in t.warnings])


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _check_table(r: Any) -> Table:
    rows = []
    css = []
    for d in r.check:
        verdict = "equal" if d.equal else ("close" if d.close else "DIFFERENT")
        rows.append([d.name, "" if d.shape is None else str(tuple(d.shape)), d.dtype or "",
                     _num(d.max_abs), _num(d.max_rel), verdict + (f" ({d.note})" if d.note else "")])
        css.append(None if d.close else "tm-bad")
    return Table(["output", "shape", "dtype", "max abs diff", "max rel diff", "verdict"], rows,
                 align=["l", "l", "l", "r", "r", "l"], row_css=css,
                 title="Check: eager vs compiled outputs (close = torch.testing.assert_close "
                       "default tolerances)")


class _Block(str):
    """Pre-formatted lines (a table): never re-wrapped."""


def _warning_text(message: str) -> str:
    """A torch warning as one line: its message, without the user stack it may carry (the
    breaks above say where)."""
    keep = []
    for ln in message.splitlines():
        if ln.strip().startswith(("Graph break: from user code", "File ", "Traceback")):
            break
        keep.append(ln.strip())
    return " ".join(x for x in keep if x)


def _wrap(line: str, width: int) -> list[str]:
    if isinstance(line, _Block) or len(line) <= width:
        return line.split("\n") if isinstance(line, _Block) else [line]
    return wrap_text(line, width, "    ")


def text(r: Any) -> str:
    width = text_width()
    title, head = _header(r)
    out: list[str] = [title, *head]
    if r.fullgraph_error is not None:
        out += ["", "Where fullgraph=True fails"] + _break_lines(r.fullgraph_error)
    if r.graph_breaks:
        out += ["", f"Graph breaks ({len(r.graph_breaks)}, as torch._dynamo.explain lists "
                    "them)"]
        for b in r.graph_breaks:
            out += _break_lines(b)
    if r.graphs:
        out += ["", _graphs_title(r), _Block(_graph_table(r).text(width))]
    if r.recompiles:
        out += ["", _recompiles_title(r)]
        for rc in r.recompiles:
            out += _recompile_lines(r, rc)
    if r.timing is not None:
        out += ["", _Block(_timing_table(r).text(width))]
    if r.check is not None:
        out += ["", _Block(_check_table(r).text(width))]
    if r.skipped:
        out += ["", r.skipped]
    for name, lines in r.logs.items():
        more = len(lines) - LOG_LINES_TEXT
        out += ["", f"log {name} ({len(lines)} records)"]
        out += [f"  {ln}" for rec in lines[:LOG_LINES_TEXT] for ln in rec.splitlines()[:6]]
        if more > 0:
            out.append(f"  ... {more} more (report.logs[{name!r}] holds them all)")
    if r.warnings:
        out += ["", "torch warned during the compile:"]
        out += [f"  {_warning_text(w)}" for w in r.warnings[:5]]
    out += [f"note: {n}" for n in r.notes]
    return "\n".join(x for line in out for x in (_wrap(line, width) if line else [""]))


# -- html ---------------------------------------------------------------------------------------
_STYLE = """<style>
.tm-compile ol{margin:4px 0 4px 18px;padding:0}
.tm-compile li{margin:4px 0}
.tm-compile .tm-src{border-left:2px solid rgba(127,127,127,.35);padding-left:6px;margin:4px 0}
.tm-compile .tm-src div{white-space:pre}
.tm-compile .tm-src .tm-hit{background:rgba(220,38,38,.14)}
.tm-compile .tm-ln{display:inline-block;min-width:2.5em;opacity:.55;text-align:right;
 margin-right:8px}
.tm-compile details{margin:4px 0}
.tm-compile summary{cursor:pointer}
.tm-compile h4{margin:10px 0 4px 0;font-size:13px}
</style>"""


def _place_html(p: Any, anchor: str) -> str:
    if p is None:
        return "unknown place"
    if p.in_cell:
        return f'<a href="#{anchor}-L{p.line}">cell line {p.line}</a>'
    fn = p.function if not p.module_class else f"{p.module_class}.{p.function}"
    where = (f'<code title="{esc(p.filename)}:{p.line}">{esc(short_file(p.filename))}:'
             f"{p.line}</code> in {esc(fn)}")
    if p.modules:
        more = f" and {len(p.modules) - 1} more" if len(p.modules) > 1 else ""
        where += (f' (<code title="{esc(", ".join(p.modules))}">{esc(p.modules[0])}</code>'
                  f"{esc(more)})")
    return where


def _where_html(place: Any, cell_line: int | None, anchor: str) -> str:
    where = _place_html(place, anchor)
    if cell_line is not None and not (place and place.in_cell):
        where = f'<a href="#{anchor}-L{cell_line}">cell line {cell_line}</a> → ' + where
    return where


def _break_html(b: Any, anchor: str) -> str:
    where = _where_html(b.place, b.cell_line, anchor)
    parts = [f"<li><b>{where}</b> <span class=\"tm-warn\">[{esc(b.kind)}]</span>"]
    parts += [f'<div class="{css}">{esc(text)}</div>' for css, text in _break_body(b)]
    link = f' <a href="{esc(b.url)}">{esc(b.gb_id)}</a>' if b.url else ""
    parts.append(f"<details><summary>dynamo's full reason{link}</summary>"
                 f"<pre>{esc(b.reason)}</pre></details></li>")
    return "".join(parts)


def _source_html(r: Any, anchor: str) -> str:
    if r.kind != "cell" or not r.source:
        return ""
    hits = {b.cell_line for b in r.graph_breaks if b.cell_line}
    if r.fullgraph_error is not None and r.fullgraph_error.cell_line:
        hits.add(r.fullgraph_error.cell_line)
    rows = []
    for i, line in enumerate(r.source.splitlines(), start=1):
        css = ' class="tm-hit"' if i in hits else ""
        rows.append(f'<div id="{anchor}-L{i}"{css}><span class="tm-ln">{i}</span>'
                    f"{esc(line)}</div>")
    return (f'<details open><summary>the cell ({len(rows)} lines; graph-break lines '
            f'highlighted)</summary><div class="tm-src tm-mono">{"".join(rows)}</div></details>')


def html(r: Any) -> str:
    anchor = f"tm-compile-{next(_ids)}"
    title, head = _header(r)
    body = [_STYLE, '<div class="tm-compile">']
    body += [f'<div class="{"tm-bad" if r.fullgraph_error else ""}">{esc(line)}</div>'
             for line in head]
    if r.fullgraph_error is not None:
        body.append("<h4>Where fullgraph=True fails</h4><ol>"
                    + _break_html(r.fullgraph_error, anchor) + "</ol>")
    if r.graph_breaks:
        body.append(f"<h4>Graph breaks ({len(r.graph_breaks)}, as torch._dynamo.explain lists "
                    "them)</h4><ol>")
        body += [_break_html(b, anchor) for b in r.graph_breaks]
        body.append("</ol>")
    body.append(_source_html(r, anchor))
    if r.graphs:
        body.append(f"<h4>{esc(_graphs_title(r))}</h4>" + _graph_table(r).html())
    if r.recompiles:
        body.append(f"<h4>{esc(_recompiles_title(r))}</h4><ol>")
        for rc in r.recompiles:
            where = _where_html(rc.place, rc.cell_line, anchor)
            item = [f"<li><b>{esc(_recompile_label(r, rc))}: {where}</b> <span class=\"tm-warn\">"
                    f"[{esc(rc.kind)}]</span>",
                    f'<div>guard failed: <code>{esc(rc.guard)}</code></div>']
            if len(rc.frames) > 1:
                item.append(f"<div>frames recompiled: {esc(', '.join(rc.frames))}</div>")
            if rc.source_line:
                item.append(f'<div class="tm-muted">guard from: <code>{esc(rc.source_line)}'
                            "</code></div>")
            if rc.suggestion:
                item.append(f"<div>suggestion: {esc(rc.suggestion)}</div>")
            if rc.code:
                item.append(f'<div class="tm-mono">{esc(rc.code)}</div>')
            if len(rc.reasons) > 1:
                item.append("<details><summary>every cached entry's failure</summary><pre>"
                            + esc("\n".join(rc.reasons)) + "</pre></details>")
            body.append("".join(item) + "</li>")
        body.append("</ol>")
    if r.timing is not None:
        body.append(_timing_table(r).html())
    if r.check is not None:
        body.append(_check_table(r).html())
    if r.skipped:
        body.append(f'<div class="tm-note tm-warn">{esc(r.skipped)}</div>')
    for name, lines in r.logs.items():
        shown = lines[:LOG_LINES_HTML]
        more = (f"\n... {len(lines) - LOG_LINES_HTML} more (report.logs[{name!r}])"
                if len(lines) > LOG_LINES_HTML else "")
        body.append(f"<details><summary>log <b>{esc(name)}</b> ({len(lines)} records)</summary>"
                    f"<pre>{esc(chr(10).join(shown) + more)}</pre></details>")
    if r.warnings:
        body.append(f"<details><summary>torch warned during the compile ({len(r.warnings)})"
                    f"</summary><pre>{esc(chr(10).join(r.warnings))}</pre></details>")
    body += [f'<div class="tm-note">note: {esc(n)}</div>' for n in r.notes]
    body.append("</div>")
    return html_block(title, "".join(body))
