"""Rendering of :class:`SaveReport` and :class:`LoadReport`: text, HTML and a widget.

A save is a header line (file, bytes, tensors) and what the file contains; a load is a header
(loaded or refused, keys), the options in effect, where the model lives afterwards, and the key diff
(missing / unexpected / shape mismatch) as a table when keys differ.
"""

from __future__ import annotations

from typing import Any

from torchmagic.display.format import esc, exact, human_bytes, wrap_line
from torchmagic.display.table import Cell, Table, html_block

MAX_TEXT_ROWS = 40
MAX_HTML_ROWS = 500


def _shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "(" + ", ".join(str(s) for s in shape) + ")"


def _devices(devs: dict[str, int]) -> str:
    if not devs:
        return "no tensors"
    return ", ".join(f"{d} ({n} tensor{'s' if n != 1 else ''})" for d, n in devs.items())


def _extras(extras: dict[str, Any]) -> str:
    from torchmagic.core.checkpoint import _short

    return ", ".join(f"{k}={_short(v)}" for k, v in extras.items())


def _is_load(rep: Any) -> bool:
    return hasattr(rep, "status")


# -- save ----------------------------------------------------------------------------------------
def _save_lines(rep: Any) -> tuple[str, list[tuple[str, str]], list[str]]:
    head = (f"Saved {rep.model} ({rep.model_class}) to {rep.path}: {human_bytes(rep.file_bytes)}, "
            f"{rep.tensors} tensors in {rep.seconds:.2f} s")
    rows = []
    if rep.keys:
        rows.append(("contents", "dict: " + ", ".join(rep.keys)))
    else:
        rows.append(("contents", "state dict (model.load_state_dict(torch.load(path)) reads it)"))
    data = f"{human_bytes(rep.tensor_bytes)} in {rep.storages} storages"
    if rep.storages < rep.tensors:
        data += " (shared storages, e.g. tied weights, are written once)"
    rows.append(("tensor data", data))
    if rep.devices:
        rows.append(("devices", _devices(rep.devices)))
    if rep.optimizer:
        rows.append(("optimizer", f"{rep.optimizer} state"))
    if rep.extras:
        rows.append(("extras", _extras(rep.extras)))
    rows.append(("write", ("replaced the previous file " if rep.replaced else "new file, ")
                 + "atomically (temp file + fsync + rename)"))
    return head, rows, list(rep.notes)


# -- load ----------------------------------------------------------------------------------------
def _options(rep: Any) -> str:
    opts = [f"weights_only={rep.weights_only}", "strict" if rep.strict else "non-strict"]
    if rep.map_location:
        opts.append(f"map_location={rep.map_location}")
    if rep.mmap:
        opts.append("mmap")
    if rep.assign:
        opts.append("assign")
    return ", ".join(opts)


def _load_lines(rep: Any) -> tuple[str, list[tuple[str, str]], list[str]]:
    if rep.status == "loaded":
        head = (f"Loaded {rep.path} ({human_bytes(rep.file_bytes)}) into {rep.model} "
                f"({rep.model_class}): {rep.loaded} of {rep.model_keys} keys in {rep.seconds:.2f} s")
    else:
        head = (f"Refused: {rep.path} does not match {rep.model} ({rep.model_class}): "
                f"{rep.summary()}; the model is unchanged")
    rows = []
    where = f" (state dict under {rep.state_dict_key!r})" if rep.state_dict_key else ""
    rows.append(("file", rep.file_format + where))
    rows.append(("options", _options(rep)))
    if rep.prefix_fix:
        rows.append(("fix", f"{rep.prefix_fix} {rep.prefix_fix_effect}"))
    if rep.status == "loaded":
        rows.append(("model is on", _devices(rep.model_devices)))
        if rep.optimizer:
            rows.append(("optimizer", f"state loaded into {rep.optimizer}"))
    if rep.extras:
        rows.append(("extras", _extras(rep.extras)))
    return head, rows, list(rep.notes)


def _diff_table(rep: Any, limit: int) -> Table | None:
    groups: list[list[list[object]]] = [
        [["missing", k, "-", "in model"] for k in rep.missing],
        [["unexpected", k, "in file", "-"] for k in rep.unexpected],
        [[Cell("shape", css="tm-bad"), m.key, _shape(m.checkpoint_shape), _shape(m.model_shape)]
         for m in rep.mismatched],
    ]
    total = sum(len(g) for g in groups)
    if not total:
        return None
    notes = []
    if total > limit:  # a few of each kind rather than the first kind only
        share = max(1, limit // sum(1 for g in groups if g))
        groups = [g[:share] for g in groups]
        shown = sum(len(g) for g in groups)
        notes.append(f"... and {total - shown} more (the report's missing / unexpected / "
                     "mismatched lists hold them all)")
    rows = [row for g in groups for row in g]
    status = "skipped" if rep.status == "loaded" else "refused"
    return Table(["problem", "key", "checkpoint", "model"], rows, align=["l", "l", "l", "l"],
                 title=f"Key diff ({rep.summary()}; {status})", notes=notes)


def _parts(rep: Any) -> tuple[str, list[tuple[str, str]], list[str]]:
    return _load_lines(rep) if _is_load(rep) else _save_lines(rep)


def text(rep: Any) -> str:
    head, rows, notes = _parts(rep)
    out = [head]
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        out.append(f"  {k.ljust(width)}  {v}")
    if _is_load(rep):
        # With a prefix fix on offer the diff is the same story key after key: show a few.
        table = _diff_table(rep, 6 if rep.prefix_fix else MAX_TEXT_ROWS)
        if table is not None:
            out.append(table.text())
    out.extend(f"note: {n}" for n in notes)
    return "\n".join(x for block in out for line in block.split("\n") for x in wrap_line(line))


def html(rep: Any) -> str:
    head, rows, notes = _parts(rep)
    cls = "tm-bad" if _is_load(rep) and rep.status != "loaded" else "tm-good"
    body = [f'<div class="{cls}">{esc(head)}</div>', '<table class="tm-table">']
    for k, v in rows:
        body.append(f'<tr><th class="l">{esc(k)}</th><td class="l">{esc(v)}</td></tr>')
    body.append("</table>")
    if _is_load(rep):
        table = _diff_table(rep, MAX_HTML_ROWS)
        if table is not None:
            body.append(table.html(wrap=False))
    for n in notes:
        body.append(f'<div class="tm-note tm-warn">{esc(n)}</div>')
    title = f"{exact(rep.file_bytes)} bytes"
    return html_block(None, f'<div title="{esc(title)}">' + "".join(body) + "</div>")


def widget(rep: Any) -> Any:
    """ipywidgets view: the HTML rendering in an HTML widget."""
    import ipywidgets as w

    return w.HTML(html(rep))
