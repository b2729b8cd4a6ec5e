"""Rendering of :class:`ProfileResult`: the top-ops table as text, HTML and a widget."""

from __future__ import annotations

from typing import Any

from torchmagic.display.bench import human_time
from torchmagic.display.format import esc, exact, human_bytes, percent, wrap_line
from torchmagic.display.table import Cell, Table

_HEADERS = {
    "self_cpu": "self CPU", "cpu_total": "CPU total", "self_device": "self CUDA",
    "device_total": "CUDA total", "calls": "calls", "self_memory": "self mem",
    "memory": "mem", "self_device_memory": "self CUDA mem", "device_memory": "CUDA mem",
    "name": "op",
}


def _mem(n: int) -> Cell:
    return Cell(human_bytes(n), f"{exact(n)} bytes")


def table(res: Any, short_names: bool = False) -> Table:
    """The top-ops table; ``short_names`` drops the ``aten::`` prefix (text, to fit 100 columns)."""
    headers = ["op", "calls", "self CPU", "%", "CPU total"]
    align = ["l", "r", "r", "r", "r"]
    if res.cuda:
        headers += ["self CUDA", "%", "CUDA total"]
        align += ["r", "r", "r"]
    if res.memory:
        headers += ["self mem", "mem"]
        align += ["r", "r"]
        if res.cuda:
            headers += ["self CUDA mem", "CUDA mem"]
            align += ["r", "r"]
    if res.shapes:
        headers.append("input shapes")
        align.append("l")
    rows: list[list[object]] = []
    for r in res.rows:
        shown = r.name[6:] if short_names and r.name.startswith("aten::") else r.name
        row: list[object] = [Cell(shown, r.name), str(r.calls),
                             Cell(human_time(r.self_cpu), f"{r.self_cpu * 1e6:.1f} us"),
                             percent(r.self_cpu, res.self_cpu_total),
                             Cell(human_time(r.cpu_total), f"{r.cpu_total * 1e6:.1f} us")]
        if res.cuda:
            row += [Cell(human_time(r.self_device), f"{r.self_device * 1e6:.1f} us"),
                    percent(r.self_device, res.self_device_total),
                    Cell(human_time(r.device_total), f"{r.device_total * 1e6:.1f} us")]
        if res.memory:
            row += [_mem(r.self_cpu_memory), _mem(r.cpu_memory)]
            if res.cuda:
                row += [_mem(r.self_device_memory), _mem(r.device_memory)]
        if res.shapes:
            row.append(Cell(r.shapes or "-", r.shapes))
        rows.append(row)
    footer: list[tuple[str, object]] = [
        ("cell wall time", human_time(res.wall)),
        ("self CPU total", human_time(res.self_cpu_total)),
    ]
    if res.cuda:
        footer.append(("self CUDA total", human_time(res.self_device_total)))
    footer.append(("rows", f"top {len(res.rows)} of {res.total_ops}, sorted by "
                           f"{_HEADERS.get(res.sort, res.sort)}"))
    if res.warmup:
        footer.append(("warm-up", f"{res.warmup} unprofiled run{'s' if res.warmup > 1 else ''}"))
    notes = list(res.notes)
    if short_names and any(r.name.startswith("aten::") for r in res.rows):
        notes.insert(0, "op names without their aten:: prefix")
    if res.trace:
        notes.append(f"Chrome trace written to {res.trace} ({human_bytes(res.trace_bytes)}): open "
                     "it at https://ui.perfetto.dev (Open trace file) or chrome://tracing (Load)")
    return Table(headers, rows, align=align, title="Profile (torch.profiler)", footer=footer,
                 notes=notes)


def text(res: Any) -> str:
    return "\n".join(x for line in table(res, True).text().split("\n") for x in wrap_line(line))


def html(res: Any) -> str:
    extra = ""
    if res.trace:
        extra = (f'<div class="tm-note tm-muted">trace file: <span class="tm-mono">'
                 f"{esc(res.trace)}</span></div>")
    return table(res).html(extra)


def widget(res: Any) -> Any:
    """ipywidgets view: the HTML rendering in an HTML widget."""
    import ipywidgets as w

    return w.HTML(html(res))
