"""Rendering of ``%tensor`` (:class:`TensorInfo`, :class:`TensorReport`) and ``%tensors``
(:class:`TensorTable`): plain text within :func:`~torchmagic.display.format.text_width` columns
(as many tensors side by side as fit), self-contained HTML (NaN and Inf counts highlighted, a bar
per tensor with the share of finite, zero, NaN and Inf values), and a widget (the same HTML).
Percentages never round to 0% or 100% unless exact: one NaN in 49,152 values leaves "99.998%"
finite."""

from __future__ import annotations

from typing import Any

from torchmagic.display.format import esc, exact, human_bytes, percent_of, text_width
from torchmagic.display.table import Cell, Table, html_block

_PER_TEXT_TABLE = 3  # tensors side by side in one text table, at most


def _num(v: float | int | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.6g}"


def _count(n: int, numel: int, bad: bool = False) -> Cell:
    """``"49,151 (99.998%)"``; ``bad`` (NaN, Inf) highlights a non-zero count in HTML."""
    if not n:
        return Cell("0")
    return Cell(f"{n:,} ({percent_of(n, numel)})", title=exact(n),
                css="tm-bad" if bad else None)


def _links(links: list[Any]) -> str:
    """``"view of x; viewed by v, r"`` (names grouped by relation)."""
    if not links:
        return "own memory"
    groups: dict[str, list[str]] = {}
    for lk in links:
        groups.setdefault(lk.relation, []).append(lk.name)
    return "; ".join(f"{rel} {', '.join(names)}" for rel, names in groups.items())


def _shape(shape: tuple[int | str, ...]) -> str:
    if not shape:
        return "() scalar"
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _items(obj: Any) -> list[Any]:
    return obj.items if hasattr(obj, "items") and isinstance(obj.items, list) else [obj]


def _report_table(items: list[Any], title: str | None) -> Table:
    rows: list[list[object]] = []

    def row(label: str, values: list[object]) -> None:
        rows.append([label, *values])

    row("shape", [_shape(i.shape) for i in items])
    row("dtype", [i.dtype for i in items])
    row("device", [i.device for i in items])
    if any(i.type_name != "Tensor" for i in items):
        row("type", [i.type_name for i in items])
    if any(i.layout != "strided" for i in items):
        row("layout", [i.layout for i in items])
    row("elements", [Cell(f"{i.numel:,}", title=exact(i.numel)) for i in items])
    row("bytes", [Cell(human_bytes(i.nbytes), title=f"{exact(i.nbytes)} bytes") for i in items])
    row("requires_grad", [str(i.requires_grad) for i in items])
    row("grad_fn", [i.grad_fn or "None" for i in items])
    row("is_leaf", [str(i.is_leaf) for i in items])
    row(".grad", [i.grad or "None" for i in items])
    row("stride", [str(i.stride) if i.stride is not None else "-" for i in items])
    row("contiguous", [
        "-" if i.contiguous is None else "yes" if i.contiguous
        else f"no ({i.memory_format})" if i.memory_format else "no" for i in items])
    row("storage", [
        "-" if i.storage_offset is None else
        f"offset {i.storage_offset:,}, {human_bytes(i.storage_bytes)}" for i in items])
    row("is_view", ["yes" if i.is_view else "no" for i in items])
    row("memory", [_links(i.links) for i in items])
    stats = [i.stats for i in items]
    if any(s is not None for s in stats):
        def srow(label: str, fn: Any) -> None:
            row(label, ["-" if s is None else fn(s) for s in stats])

        kinds = {s.kind for s in stats if s is not None}
        if kinds - {"bool"}:
            srow("min", lambda s: _num(s.min) if s.kind != "bool" else "-")
            srow("max", lambda s: _num(s.max) if s.kind != "bool" else "-")
            srow("mean", lambda s: _num(s.mean))
            srow("std", lambda s: _num(s.std))
        if kinds & {"float", "complex"}:
            srow("finite", lambda s: _count(s.finite, s.numel) if s.kind in ("float", "complex")
                 else "all")
            srow("NaN", lambda s: _count(s.nan, s.numel, bad=True))
            srow("Inf", lambda s: "0" if not s.inf else Cell(
                _count(s.inf, s.numel).text + (f", {s.neg_inf:,} of them -Inf" if s.neg_inf
                                               else ""), css="tm-bad"))
        srow("zeros", lambda s: _count(s.zeros, s.numel))
        if "bool" in kinds:
            srow("True", lambda s: "-" if s.true is None else _count(s.true, s.numel))
    if any(i.unknown for i in items):
        row("values", [f"unknown ({i.unknown})" if i.unknown else "known" for i in items])
    notes = [n for i in items for n in i.notes]
    css = [("tm-bad" if any(isinstance(c, Cell) and c.css == "tm-bad" for c in r[1:]) else None)
           for r in rows]
    return Table(headers=["", *[i.name for i in items]], rows=rows,
                 align=["l", *["r"] * len(items)], title=title, notes=notes, row_css=css)


def _title(items: list[Any]) -> str:
    if len(items) == 1:
        return f"tensor {items[0].name}"
    return "tensors " + ", ".join(i.name for i in items)


def _table_text(obj: Any) -> str:
    rows = []
    for r in obj.rows:
        rows.append([r.name, _shape(r.shape), r.dtype, r.device,
                     Cell(human_bytes(r.nbytes)), "yes" if r.requires_grad else "",
                     r.flag or "", _links(r.links) if r.links else ""])
    footer: list[tuple[str, object]] = [
        ("total", Cell(f"{human_bytes(obj.total_bytes)} allocated by {len(obj.rows)} tensors "
                       "(shared memory counted once)", title=f"{exact(obj.total_bytes)} bytes"))]
    if len(obj.by_device) > 1 or any(d.startswith("meta") or "fake" in d for d in obj.by_device):
        footer.append(("by device", ", ".join(
            f"{d}: {human_bytes(b)}" + (" (not allocated)" if d.startswith("meta") or "fake" in d
                                        else "") for d, b in sorted(obj.by_device.items()))))
    notes = list(getattr(obj, "notes", []))
    if any(r.flag == "?" for r in obj.rows):
        notes.append("flag ? = values unknown (meta/fake/quantized/sparse/opaque tensor)")
    return Table(headers=["name", "shape", "dtype", "device", "bytes", "requires_grad", "flag",
                          "memory"],
                 rows=rows, align=["l", "l", "l", "l", "r", "l", "l", "l"],
                 title="tensors in the namespace, largest first", footer=footer, notes=notes,
                 drop=[7, 5, 3], fixed=[1, 6])


def _is_table(obj: Any) -> bool:
    return hasattr(obj, "by_device")


def _fits(table: Table, width: int) -> bool:
    notes, table.notes, title, table.title = table.notes, [], table.title, None
    try:
        return max(len(line) for line in table.text(10**6).splitlines()) <= width
    finally:
        table.notes, table.title = notes, title


def text(obj: Any) -> str:
    width = text_width()
    if _is_table(obj):
        if not obj.rows:
            return "no tensors bound to names in the namespace"
        return _table_text(obj).text(width)
    items = _items(obj)
    parts = []
    k = 0
    while k < len(items):  # as many tensors side by side as fit (at least one)
        n = 1
        while n < _PER_TEXT_TABLE and k + n < len(items) and \
                _fits(_report_table(items[k:k + n + 1], None), width):
            n += 1
        chunk = items[k:k + n]
        parts.append(_report_table(chunk, _title(chunk)).text(width))
        k += n
    return "\n\n".join(parts)


def html(obj: Any) -> str:
    if _is_table(obj):
        if not obj.rows:
            return html_block(None, "no tensors bound to names in the namespace")
        return _table_text(obj).html()
    items = _items(obj)
    return _report_table(items, _title(items)).html(_bars_html(items))


def _bars_html(items: list[Any]) -> str:
    bars = [f'<div class="tm-kv"><b>{esc(i.name)}</b> {_bar(i.stats)}</div>'
            for i in items if i.stats is not None and i.stats.numel]
    return f'<div class="tm-note">{"".join(bars)}</div>' if bars else ""


def _bar(stats: Any) -> str:
    """A stacked bar: finite non-zero (blue), zeros (grey), NaN (red), Inf (orange)."""
    n = stats.numel or 1
    if stats.kind == "bool":
        parts = [(stats.true or 0, "#1976d2", "True"), (stats.zeros, "#9e9e9e", "False")]
    else:
        finite_nz = max(stats.finite - stats.zeros, 0) if stats.kind != "int" else \
            stats.numel - stats.zeros
        parts = [(finite_nz, "#1976d2", "finite, non-zero"), (stats.zeros, "#9e9e9e", "zero"),
                 (stats.nan, "#d32f2f", "NaN"), (stats.inf, "#f57c00", "Inf")]
    segs = "".join(
        f'<span title="{esc(label)}: {c:,}" style="display:inline-block;height:8px;'
        f'vertical-align:middle;width:{300 * c / n:.1f}px;background:{color}"></span>'
        for c, color, label in parts if c)
    legend = " · ".join(f"{label} {c:,}" for c, _, label in parts if c)
    return f'{segs} <span class="tm-muted">{esc(legend)}</span>'


def widget(obj: Any) -> Any:
    import ipywidgets as w

    if _is_table(obj):
        return w.VBox([w.HTML(html(obj))])
    items = _items(obj)
    children = [w.HTML(_report_table(items, _title(items)).html())]
    bars = _bars_html(items)
    if bars:
        children.append(w.HTML(html_block("values", bars)))
    return w.VBox(children)
