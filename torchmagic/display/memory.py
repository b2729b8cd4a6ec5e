"""Rendering of ``%gpumem`` results: :class:`MemoryReport`, :class:`CellMemory` (``%%gpumem`` and the
one-line ``--watch`` report) and :class:`TopTensors` (``--top``), as text (fits
:func:`~torchmagic.display.format.text_width`), HTML with used/reserved/total bars per device, and
ipywidgets (progress bars per device). :func:`watch_html` is the ``--watch`` panel."""

from __future__ import annotations

from typing import Any

from torchmagic.display.format import esc, exact, human_bytes, text_width, wrap_text
from torchmagic.display.table import Cell, Table, html_block


def _b(n: int | None) -> Cell:
    return Cell(human_bytes(n), exact(n) + " bytes" if n is not None else None)


def _signed(n: int | None) -> Cell:
    if n is None:
        return Cell("-")
    s = human_bytes(n)
    return Cell(s if n < 0 else "+" + s, f"{n:+,} bytes")


def _kind(obj: Any) -> str:
    return type(obj).__name__


# -- MemoryReport --------------------------------------------------------------------------------
def _wrap(text: str, width: int | None = None) -> str:
    """Wrap a long note to ``width`` columns (continuation lines indented)."""
    return "\n".join(wrap_text(text, width or text_width(), "  "))


def _cpu_line(cpu: Any, sep: str = " | ") -> str:
    parts = [f"RSS {human_bytes(cpu.rss)}"]
    if cpu.peak_rss is not None:
        src = {"VmHWM": "since start or last reset", "ru_maxrss": "process lifetime"}.get(
            cpu.peak_source, cpu.peak_source)
        parts.append(f"peak RSS {human_bytes(cpu.peak_rss)} ({src})")
    line = "CPU (this process): " + " | ".join(parts)
    if cpu.total is not None:
        line += (f"{sep}machine: {human_bytes(cpu.total)} RAM, "
                 f"{human_bytes(cpu.available)} available")
    return line


def _device_table(rep: Any) -> Table:
    rows = []
    for d in rep.devices:
        rows.append([d.device, _b(d.total), _b(d.allocated), _b(d.reserved), _b(d.peak_allocated),
                     _b(d.peak_reserved), _b(d.free), _b(d.reserved_unallocated)])
    return Table(["device", "total", "allocated", "reserved", "peak alloc", "peak reserved",
                  "free (driver)", "reserved unused"], rows, align=["l"] + ["r"] * 7)


def _device_names(rep: Any) -> list[str]:
    out = []
    for d in rep.devices:
        cap = f", compute capability {d.capability}" if d.capability else ""
        out.append(f"{d.device}: {d.name}{cap}")
    return out


def _report_text(rep: Any) -> str:
    lines = [_wrap(f"%gpumem | {rep.cuda}")]
    if rep.devices:
        lines.extend(_device_names(rep))
        lines.append(_device_table(rep).text())
    lines.extend(_wrap(x) for x in _cpu_line(rep.cpu, sep="\n").split("\n"))
    lines.extend(_wrap(f"reset: {r}") for r in rep.reset)
    lines.extend(_wrap(f"note: {n}") for n in rep.notes)
    return "\n".join(lines)


def _bar_html(used: int | None, reserved: int | None, total: int | None, width: int = 320) -> str:
    """A bar of ``total``: allocated (solid), reserved but unused (light), the rest (outline)."""
    if not total:
        return ""
    used = used or 0
    reserved = max(reserved or 0, used)
    wu = width * min(used / total, 1.0)
    wr = width * min((reserved - used) / total, 1.0 - wu / width)
    title = (f"allocated {human_bytes(used)}, reserved {human_bytes(reserved)}, "
             f"total {human_bytes(total)}")
    return (f'<span title="{esc(title)}" style="display:inline-block;width:{width}px;height:10px;'
            'border:1px solid rgba(127,127,127,.5);border-radius:3px;vertical-align:middle;'
            'overflow:hidden;white-space:nowrap;line-height:0">'
            f'<span style="display:inline-block;height:10px;width:{wu:.1f}px;background:#1976d2">'
            '</span><span style="display:inline-block;height:10px;'
            f'width:{wr:.1f}px;background:#1976d2;opacity:.35"></span></span>')


def _report_html(rep: Any) -> str:
    return html_block(None, _report_body(rep))


def _report_body(rep: Any, title: bool = True) -> str:
    parts = [f'<div class="tm-title">%gpumem · {esc(rep.cuda)}</div>' if title else
             f'<div class="tm-muted">{esc(rep.cuda)}</div>']
    for d in rep.devices:
        cap = f" · compute {esc(d.capability)}" if d.capability else ""
        parts.append(f'<div class="tm-kv"><b>{esc(d.device)}</b> {esc(d.name)}{cap} '
                     f'{_bar_html(d.allocated, d.reserved, d.total)} '
                     f'<span class="tm-muted">{esc(human_bytes(d.allocated))} allocated · '
                     f'{esc(human_bytes(d.reserved))} reserved · '
                     f'{esc(human_bytes(d.total))} total</span></div>')
    if rep.devices:
        parts.append(_device_table(rep).html(wrap=False))
    cpu = rep.cpu
    parts.append(f'<div class="tm-kv" style="margin-top:6px"><b>CPU</b> '
                 f'{_bar_html(cpu.rss, cpu.peak_rss, cpu.total)} '
                 f'<span class="tm-muted">{esc(_cpu_line(cpu)[20:])}</span></div>')
    for r in rep.reset:
        parts.append(f'<div class="tm-note">reset: {esc(r)}</div>')
    for n in rep.notes:
        parts.append(f'<div class="tm-note tm-muted">{esc(n)}</div>')
    return "".join(parts)


def _progress(label: str, value: int | None, total: int | None, tip: str) -> Any:
    import ipywidgets as w

    total = total or 1
    bar = w.FloatProgress(value=min(float(value or 0), float(total)), min=0.0, max=float(total),
                          description=label, tooltip=tip,
                          layout=w.Layout(width="420px"),
                          style={"description_width": "110px"})
    return w.HBox([bar, w.Label(f"{human_bytes(value)} / {human_bytes(total)}")])


def _report_widget(rep: Any) -> Any:
    import ipywidgets as w

    rows: list[Any] = [w.HTML(f"<b>%gpumem</b> · {esc(rep.cuda)}")]
    for d in rep.devices:
        rows.append(w.HTML(f"<b>{esc(d.device)}</b> {esc(d.name)}"
                           + (f" · compute {esc(d.capability)}" if d.capability else "")))
        rows.append(_progress("allocated", d.allocated, d.total, f"{exact(d.allocated)} bytes"))
        rows.append(_progress("reserved", d.reserved, d.total, f"{exact(d.reserved)} bytes"))
        if d.peak_allocated is not None:
            rows.append(_progress("peak allocated", d.peak_allocated, d.total,
                                  f"{exact(d.peak_allocated)} bytes"))
    cpu = rep.cpu
    rows.append(w.HTML("<b>CPU</b> (this process)"))
    rows.append(_progress("RSS", cpu.rss, cpu.total, f"{exact(cpu.rss)} bytes"))
    if cpu.peak_rss is not None:
        rows.append(_progress("peak RSS", cpu.peak_rss, cpu.total, f"{exact(cpu.peak_rss)} bytes"))
    if not rep.devices:  # the bars above say everything the HTML would
        return w.VBox(rows)
    details = w.Accordion(children=[w.HTML(_report_html(rep))], titles=("details",))
    details.selected_index = None
    return w.VBox([*rows, details])


# -- CellMemory ----------------------------------------------------------------------------------
def _peak_cell(r: Any) -> Cell:
    if r.peak is None:
        return Cell("-", "no peak counter for this device")
    c = _b(r.peak)
    if not r.peak_exact:
        c = Cell("<= " + c.text, (c.title or "") + " (upper bound: counters were not reset)")
    return c


def _cell_table(cm: Any) -> Table:
    rows = []
    for r in cm.rows:
        rows.append([r.what, _b(r.before), _b(r.after), _signed(r.delta), _peak_cell(r),
                     _signed(r.peak_delta), _b(r.user_peak)])
    return Table(["memory", "before", "after", "delta", "peak", "peak - before", "your peak"],
                 rows, align=["l"] + ["r"] * 6)


def _cell_notes(cm: Any) -> list[str]:
    notes = []
    if cm.error:
        notes.append(f"the cell raised {cm.error}")
    if any(r.user_peak is not None for r in cm.rows):
        notes.append("your peak: since your last reset of that counter (for CPU: since the "
                     "process started or your last %gpumem --reset), this cell included")
    return notes + list(cm.notes)


def _cell_title(cm: Any) -> str:
    return f"%%gpumem {cm.label}: {cm.seconds:.3f} s | {cm.cuda}"


def one_line(cm: Any) -> str:
    """The compact ``--watch`` line for one cell."""
    parts = []
    for r in cm.rows:
        d = _signed(r.delta).text
        if r.peak_delta is not None:
            pk = _signed(r.peak_delta).text
            d += f", peak {'<=' if not r.peak_exact else ''}{pk}"
        parts.append(f"{r.what} {human_bytes(r.after)} ({d})")
    err = f" | raised {cm.error.split(':')[0]}" if cm.error else ""
    return f"[gpumem {cm.label}] {cm.seconds:.2f} s | " + " | ".join(parts) + err


def _cell_text(cm: Any) -> str:
    t = _cell_table(cm)
    t.title = _cell_title(cm)
    t.notes = [_wrap(f"note: {n}") for n in _cell_notes(cm)]
    return t.text()


def _cell_html(cm: Any) -> str:
    t = _cell_table(cm)
    t.title = _cell_title(cm)
    t.notes = _cell_notes(cm)
    return t.html()


# -- TopTensors ----------------------------------------------------------------------------------
def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _shared(e: Any) -> Cell:
    """Other tensors on the same storage (views) and other names of it (tied weights)."""
    names = ", ".join(e.other_names)
    if not e.views:
        return Cell(f"also {names}" if names else "", names or None)
    text = f"+{e.views} view{'s' if e.views != 1 else ''}" + (f" ({names})" if names else "")
    return Cell(text, names or None)


def _top_table(top: Any) -> Table:
    kinds = {"parameter": "param", "optimizer state": "optim state"}
    rows = [[e.device, e.name, _shape(e.shape), e.dtype, _b(e.bytes), kinds.get(e.kind, e.kind),
             _shared(e)] for e in top.entries]
    total = sum(t.storages for t in top.totals)
    return Table(["device", "name", "shape", "dtype", "bytes", "kind", "shared by"], rows,
                 align=["l", "l", "l", "l", "r", "l", "l"],
                 title=f"%gpumem --top {top.n}: the {len(top.entries)} largest of {total} live "
                 "storages (gc scan; a storage shared by views counted once)")


def _top_footer(top: Any) -> list[str]:
    out = []
    for t in top.totals:
        line = (f"{t.device}: {human_bytes(t.bytes)} in {t.storages} storages "
                f"({t.tensors} tensors)")
        if t.allocated is not None:
            line += f"; torch allocator: {human_bytes(t.allocated)} allocated"
        out.append(line)
    if top.skipped_meta:
        out.append(f"{top.skipped_meta} meta/fake tensors skipped (they hold no memory)")
    if getattr(top, "skipped_empty", 0):
        out.append(f"{top.skipped_empty} empty tensors skipped (0 bytes)")
    return out + list(top.notes)


def _top_text(top: Any) -> str:
    if not top.entries:
        return f"%gpumem --top {top.n}: no live tensors found" + "".join(
            "\n" + x for x in _top_footer(top))
    t = _top_table(top)
    for row in t.rows:  # names matter more than the list of other names: keep that column short
        shared = row[-1]
        if isinstance(shared, Cell) and len(shared.text) > 20:
            row[-1] = Cell(shared.text[:19] + "…", shared.title)
    t.notes = _top_footer(top)
    return t.text()  # (Table.text wraps the title and the notes to the width)


def _top_html(top: Any) -> str:
    if not top.entries:
        return html_block(f"%gpumem --top {top.n}: no live tensors found",
                          "".join(f"<div>{esc(x)}</div>" for x in _top_footer(top)))
    t = _top_table(top)
    t.notes = _top_footer(top)
    return t.html()


# -- entry points --------------------------------------------------------------------------------
def text(obj: Any) -> str:
    kind = _kind(obj)
    if kind == "CellMemory":
        return _cell_text(obj)
    if kind == "TopTensors":
        return _top_text(obj)
    return _report_text(obj)


def html(obj: Any) -> str:
    kind = _kind(obj)
    if kind == "CellMemory":
        return _cell_html(obj)
    if kind == "TopTensors":
        return _top_html(obj)
    return _report_html(obj)


def widget(obj: Any) -> Any:
    import ipywidgets as w

    if _kind(obj) == "MemoryReport":
        return _report_widget(obj)
    return w.HTML(html(obj))


def watch_html(report: Any, cell: Any) -> str:
    """The ``%gpumem --watch`` panel after a cell: the cell's one-line report over the memory
    report (HTML, so a saved notebook keeps it)."""
    return html_block("%gpumem --watch: memory after the last cell",
                      f'<div class="tm-mono" style="margin-bottom:4px">{esc(one_line(cell))}</div>'
                      + _report_body(report, title=False))


def watch_text(report: Any, cell: Any) -> str:
    """The ``--watch`` panel as text: the one-line cell report."""
    return "\n".join(wrap_text(one_line(cell), text_width(), "  "))
