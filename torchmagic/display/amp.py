"""Rendering of :class:`torchmagic.core.amp.AmpReport`: the dtype table as text (fits
:func:`~torchmagic.display.format.text_width`), HTML and a widget.

The table lists the floating-point forward ops (what the headline's share counts); integer and
bool ops (``arange`` positions, index arithmetic) are named on their own line, never counted as
floating-point ops."""

from __future__ import annotations

from typing import Any

from torchmagic.display.format import esc, percent, text_width, wrap_text
from torchmagic.display.table import Table, html_block, page

_FLOAT_KINDS = ("float", "bfloat", "complex")


def _is_float(dtype: str) -> bool:
    return dtype.startswith(_FLOAT_KINDS)


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
    ops = [r for r in rep.ops if _is_float(r.dtype) and dtype in (None, r.dtype)]
    rows = [[r.op, r.dtype, str(r.count)] for r in ops]
    css = [("tm-bad" if r.op in rep.unexpected and r.dtype == "float32" else None) for r in ops]
    by = ", ".join(f"{k} {v}" for k, v in rep.by_dtype.items() if _is_float(k))
    footer: list[tuple[str, object]] = [("by dtype", by or "-"),
                                        ("casts inserted", str(rep.casts))]
    other = _non_float(rep)
    if other:
        footer.append(("not floating point (not counted)", other))
    return Table(["floating-point op (forward)", "output dtype", "calls"], rows,
                 align=["l", "l", "r"], footer=footer, row_css=css)


def _non_float(rep: Any) -> str:
    """``"arange (1, int64)"``: forward ops whose output is not floating point."""
    return ", ".join(f"{r.op} ({r.count}, {r.dtype})" for r in rep.ops if not _is_float(r.dtype))


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


def _wrap(prefix: str, items: list[str], width: int) -> list[str]:
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
    """Plain text within :func:`~torchmagic.display.format.text_width` columns."""
    width = text_width()
    out = [*wrap_text(headline(rep), width, "  "), _table(rep).text(width)]
    bl = _backward_line(rep)
    if bl:
        out.extend(wrap_text(bl, width))
    groups = _float32_groups(rep)
    if groups:
        out.append("Stayed in float32:")
        for reason, ops in groups:
            out.extend(wrap_text(f"  - {reason}", width, "  "))
            out.extend(_wrap("      ", ops, width))
    for i, line in enumerate(rep.advice):
        out.extend(wrap_text(line, width, "  ") if i < 2 else ["    " + line])
    if rep.error:
        out.extend(wrap_text(f"The cell raised {rep.error}", width))
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
        body.value = _table(rep, dtype).html()

    pick.observe(render, names="value")
    render()
    head = w.HTML(html_block(headline(rep), ""))
    extras = w.HTML(page(_extras_html(rep)))
    return w.VBox([head, pick, body, extras])
