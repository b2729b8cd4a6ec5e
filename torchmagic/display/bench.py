"""Rendering of :class:`BenchResult` and :class:`BenchComparison`: text, HTML and a widget."""

from __future__ import annotations

from typing import Any

from torchmagic.display.format import esc, wrap_line
from torchmagic.display.table import Cell, Table, html_block


def human_time(seconds: float | None, digits: int = 3) -> str:
    """``0.01003 -> '10.0 ms'``, ``2.5e-06 -> '2.50 us'``, ``0.0009999 -> '1.00 ms'`` (about
    ``digits`` significant digits; the unit is chosen after rounding, so never ``'1000 us'``)."""
    if seconds is None or seconds != seconds:
        return "-"
    s = float(f"{abs(seconds):.{digits}g}")
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if s >= scale or unit == "ns":
            v = seconds / scale
            decimals = max(0, digits - len(str(int(abs(v)))))
            return f"{v:.{decimals}f} {unit}"
    return f"{seconds} s"  # pragma: no cover


def _is_comparison(obj: Any) -> bool:
    return hasattr(obj, "results")


# -- one result ----------------------------------------------------------------------------------
def _result_rows(r: Any) -> list[tuple[str, str]]:
    return [
        ("median", f"{human_time(r.median)} per run"),
        ("IQR", f"{human_time(r.iqr)} ({r.iqr_percent:.1f}% of the median)"),
        ("mean", human_time(r.mean)),
        ("runs", f"{r.runs} in {r.measurements} measurements ({r.method})"),
        ("threads", f"{r.num_threads} ({r.threads_source})"),
        ("sync", r.sync),
    ]


def _result_notes(r: Any) -> list[str]:
    notes = [f"warning: {w}" for w in r.warnings]
    if r.changed_in_place:
        notes.append("the cell changed these objects in place on every run (only its assignments "
                     "are isolated): " + " | ".join(r.changed_in_place))
    return notes


def _result_text(r: Any) -> str:
    lines = [f"{r.label}: {r.statement}"]
    width = max(len(k) for k, _ in _result_rows(r))
    lines += [f"  {k.ljust(width)}  {v}" for k, v in _result_rows(r)]
    lines += _result_notes(r)
    return "\n".join(x for line in lines for x in wrap_line(line))


def _result_html(r: Any) -> str:
    body = [f'<div class="tm-mono">{esc(r.statement)}</div><table class="tm-table">']
    for k, v in _result_rows(r):
        body.append(f'<tr><th class="l">{esc(k)}</th><td class="l">{esc(v)}</td></tr>')
    body.append("</table>")
    body += [f'<div class="tm-note tm-warn">{esc(n)}</div>' for n in _result_notes(r)]
    return html_block(r.label, "".join(body))


# -- comparison ----------------------------------------------------------------------------------
def _table(c: Any) -> Table:
    rows: list[list[object]] = []
    css: list[str | None] = []
    for r in c.results:
        rel = c.relative(r)
        rel_text = "fastest" if rel == 1.0 else f"{rel:.2f}x slower"
        rows.append([r.label, Cell(human_time(r.median), f"{r.median:.6g} s"),
                     f"{human_time(r.iqr)} ({r.iqr_percent:.0f}%)", str(r.runs),
                     str(r.num_threads), rel_text, Cell(r.statement, r.statement)])
        css.append("tm-good" if r.label == c.current else None)
    n = len(c.results)
    return Table(["label", "median", "IQR", "runs", "threads", "relative", "code"], rows,
                 align=["l", "r", "r", "r", "r", "r", "l"],
                 title=f"Benchmark comparison ({n} result{'s' if n != 1 else ''})", row_css=css,
                 notes=["re-running a cell with the same --compare label replaces its row; "
                        "%benchmark --clear empties the table"])


def text(obj: Any) -> str:
    if not _is_comparison(obj):
        return _result_text(obj)
    out = _table(obj).text()
    current = next((r for r in obj.results if r.label == obj.current), None)
    if current is not None:
        notes = _result_notes(current)
        if notes:
            out += "\n" + "\n".join(x for n in notes for x in wrap_line(f"{current.label}: {n}"))
    return out


def html(obj: Any) -> str:
    if not _is_comparison(obj):
        return _result_html(obj)
    current = next((r for r in obj.results if r.label == obj.current), None)
    extra = ""
    if current is not None:
        extra = "".join(f'<div class="tm-note tm-warn">{esc(current.label)}: {esc(n)}</div>'
                        for n in _result_notes(current))
    return _table(obj).html(extra)


def widget(obj: Any) -> Any:
    """ipywidgets view: the HTML rendering in an HTML widget."""
    import ipywidgets as w

    return w.HTML(html(obj))
