"""Rendering of ``%device`` (:class:`DeviceReport`): a table of roles x devices, the mixed-device
warning with the modules on each device, and the availability line. Widget: the HTML plus a bar per
device showing its share of the bytes."""

from __future__ import annotations

from typing import Any

from torchmagic.core.device import MAX_MODULES_LISTED
from torchmagic.display.format import esc, exact, human_bytes, human_count, text_width, wrap_text
from torchmagic.display.table import Cell, Table, html_block


def _full(root: str, path: str) -> str:
    """A module path as the user writes it (``model.head.3``); ``(root)`` is the model itself."""
    if path == "(root)" or path.startswith("(root) "):
        return root + path[len("(root)"):]
    return f"{root}.{path}"


def _table(r: Any) -> Table:
    rows = [[u.role, u.device, f"{u.tensors:,}", Cell(human_count(u.elements), title=exact(u.elements)),
             Cell(human_bytes(u.bytes), title=f"{exact(u.bytes)} bytes"), ", ".join(u.dtypes)]
            for u in r.usage]
    where = ", ".join(r.devices) if r.devices else "no tensors"
    title = f"{r.name} ({r.type_name}): {'MIXED: ' if r.mixed else ''}{where}"
    notes: list[str] = []
    for w in r.warnings:
        notes.append(f"WARNING: {w}")
    if r.modules_by_device:
        notes.append(f"modules of {r.name} by device:")
    for dev, mods in sorted(r.modules_by_device.items()):
        shown = ", ".join(_full(r.name, m) for m in mods[:MAX_MODULES_LISTED])
        more = f" ... and {len(mods) - MAX_MODULES_LISTED} more" if len(mods) > MAX_MODULES_LISTED else ""
        notes.append(f"  on {dev}: {shown}{more}")
    for m in r.mismatched_state[:MAX_MODULES_LISTED]:
        notes.append(f"  {m}")
    notes.extend(r.notes)
    notes.append(r.availability)
    return Table(headers=["", "device", "tensors", "elements", "bytes", "dtypes"], rows=rows,
                 align=["l", "l", "r", "r", "r", "l"], title=title, notes=notes)


def wrap(note: str, width: int | None = None) -> list[str]:
    """A note as lines of at most ``width`` columns (continuations indented; words whole)."""
    return wrap_text(note, width or text_width(), "  ")


def text(r: Any) -> str:
    t = _table(r)
    t.notes = [line for n in t.notes for line in wrap(n)]
    return t.text()


def html(r: Any) -> str:
    t = _table(r)
    warn = "".join(f'<div class="tm-error"><b class="tm-bad">WARNING:</b> '
                   f'{esc(n.removeprefix("WARNING:").strip())}</div>' for n in t.notes
                   if n.startswith("WARNING"))
    t.notes = [n for n in t.notes if not n.startswith("WARNING")]
    return t.html(extra_html=warn)


def widget(r: Any) -> Any:
    import ipywidgets as w

    total: dict[str, int] = {}
    for u in r.usage:
        total[u.device] = total.get(u.device, 0) + u.bytes
    whole = sum(total.values()) or 1
    bars = "".join(
        f'<div class="tm-kv"><b>{esc(d)}</b> <span class="tm-bar" style="width:{300 * b / whole:.1f}px">'
        f'</span> {esc(human_bytes(b))}</div>' for d, b in sorted(total.items()))
    return w.VBox([w.HTML(html(r)), w.HTML(html_block("bytes per device", bars))])
