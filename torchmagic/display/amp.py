"""Rendering of :class:`torchmagic.core.amp.AmpReport`: the dtype table as text, HTML and a widget."""

from __future__ import annotations

from typing import Any

from torchmagic.display.format import esc, percent
from torchmagic.display.table import CSS, Table, html_block

WIDTH = 100


def headline(rep: Any) -> str:
    total = rep.floating_ops
    low = rep.low_precision_ops
    if total:
        head = (f"autocast {rep.device} {rep.dtype}: {low} of {total} floating-point forward "
                f"op{'s' * (total != 1)} in {rep.dtype} ({percent(low, total)})")
    elif rep.forward_ops:
        head = f"autocast {rep.device} {rep.dtype}: no floating-point ops ran"
    else:
        head = f"autocast {rep.device} {rep.dtype}: no ops ran"
    parts = [head]
    other = ", ".join(f"{n} in {dt}" for dt, n in rep.other_low_precision.items())
    if other:
        parts.append(f"{other} (a nested autocast or explicit cast)")
    if rep.result_dtype:
        parts.append(f"result {rep.result_dtype}")
    return "; ".join(parts)


def _table(rep: Any, dtype: str | None = None) -> Table:
    rows = [[r.op, r.dtype, str(r.count)] for r in rep.ops if dtype in (None, r.dtype)]
    css = [("tm-bad" if r.op in rep.unexpected and r.dtype == "float32" else None)
           for r in rep.ops if dtype in (None, r.dtype)]
    by = ", ".join(f"{k} {v}" for k, v in rep.by_dtype.items())
    return Table(["op (forward)", "output dtype", "calls"], rows, align=["l", "l", "r"],
                 footer=[("by dtype", by or "-"), ("casts inserted", str(rep.casts))],
                 row_css=css)


def _float32_groups(rep: Any) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for r in rep.float32_ops:
        groups.setdefault(r.reason or "", []).append(f"{r.op} ({r.count})")
    return list(groups.items())


def _backward_line(rep: Any) -> str | None:
    if not rep.backward_ops:
        return None
    by = ", ".join(f"{k} {v}" for k, v in rep.backward_by_dtype.items())
    return f"backward: {rep.backward_ops} ops ({by})"


def _wrap(prefix: str, items: list[str], width: int = WIDTH) -> list[str]:
    lines, cur = [], prefix
    for it in items:
        piece = it if cur == prefix else ", " + it
        if len(cur) + len(piece) > width and cur != prefix:
            lines.append(cur + ",")
            cur = " " * len(prefix) + it
        else:
            cur += piece
    lines.append(cur)
    return lines


def text(rep: Any) -> str:
    """Plain text, at most 100 columns."""
    import textwrap

    out = [*textwrap.wrap(headline(rep), WIDTH, subsequent_indent="  ", break_on_hyphens=False),
           _table(rep).text(WIDTH)]
    bl = _backward_line(rep)
    if bl:
        out.append(bl)
    groups = _float32_groups(rep)
    if groups:
        out.append("Stayed in float32:")
        for reason, ops in groups:
            out.append(f"  - {reason}"[:WIDTH])
            out.extend(_wrap("      ", ops))
    for i, line in enumerate(rep.advice):
        out.append(line if i < 2 else "    " + line)
    if rep.error:
        out.append(f"The cell raised {rep.error}"[:WIDTH])
    return "\n".join(out)


def _extras_html(rep: Any) -> str:
    parts = []
    bl = _backward_line(rep)
    if bl:
        parts.append(f'<div class="tm-note">{esc(bl)}</div>')
    groups = _float32_groups(rep)
    if groups:
        items = "".join(
            f'<li><span class="{"tm-bad" if reason.startswith("UNEXPECTED") else ""}">'
            f"{esc(reason)}</span>: <span class=\"tm-mono\">{esc(', '.join(ops))}</span></li>"
            for reason, ops in groups)
        parts.append(f'<div class="tm-note"><b>Stayed in float32</b><ul style="margin:2px 0">'
                     f"{items}</ul></div>")
    if rep.advice:
        code = "\n".join(rep.advice[2:])
        parts.append(f'<div class="tm-note tm-warn">{esc(" ".join(rep.advice[:2]))}</div>'
                     f'<pre class="tm-mono">{esc(code)}</pre>')
    if rep.error:
        parts.append(f'<div class="tm-note tm-warn">The cell raised {esc(rep.error)}</div>')
    return "".join(parts)


def html(rep: Any) -> str:
    """Self-contained HTML (no JavaScript, no external assets)."""
    table = _table(rep)
    table.title = headline(rep)
    return table.html(_extras_html(rep))


def widget(rep: Any) -> Any:
    """ipywidgets view: the dtype table with a dtype filter, then the float32 notes and advice."""
    import ipywidgets as w

    options = ["all", *rep.by_dtype]
    pick = w.ToggleButtons(options=options, value="all", description="dtype")
    body = w.HTML()

    def render(*_: Any) -> None:
        dtype = None if pick.value == "all" else pick.value
        body.value = f"<div class='tm-result'>{CSS}{_table(rep, dtype).html()}</div>"

    pick.observe(render, names="value")
    render()
    head = w.HTML(html_block(headline(rep), ""))
    extras = w.HTML(f"<div class='tm-result'>{CSS}{_extras_html(rep)}</div>")
    return w.VBox([head, pick, body, extras])
