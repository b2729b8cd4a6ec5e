"""Rendering of :class:`~torchmagic.core.meta.MetaShapeReport` (``%%meta_shape``).

- Text (fits :func:`~torchmagic.display.format.text_width`, no colour): a values table (line,
  name, type, shape, dtype, device, detail), the module-call tree to the report's depth (indented,
  input -> output shapes, repeated blocks folded as ``layers.0-31 ×32`` followed by the first
  block's calls), what was taken from the namespace, notes, and the error if the run stopped.
- HTML (self-contained, no JavaScript): the same values table, and the call tree of
  :mod:`torchmagic.display.tree` (native ``<details>``; a folded run opens to its first block and
  the list of the others; a failed call is shown open).
- Widget: the header and values table, a depth slider and expand/collapse-all buttons that
  re-render the call tree (down to every depth recorded, beyond the report's default).
"""

from __future__ import annotations

from typing import Any

from torchmagic.core.tracing import format_shapes
from torchmagic.display import tree as T
from torchmagic.display.format import esc, exact, human_count, text_width, wrap_text
from torchmagic.display.table import Cell, Table, page

HEADERS = ["module", "class", "input", "output", "line"]
ALIGN = ["l", "l", "l", "l", "r"]


# -- shared pieces ------------------------------------------------------------------------------
def _header(r: Any) -> str:
    where = ("meta device: shapes only, nothing allocated" if r.mode == "meta"
             else "fake tensors (FakeTensorMode + ShapeEnv): data-dependent sizes as symbols")
    status = "" if r.ok else (" - interrupted" if r.error_kind == "interrupt"
                              else " - stopped at an error")
    return f"%%meta_shape on {where} ({r.seconds:.2f} s){status}"


def _detail(v: Any) -> Cell:
    if v.params is not None:
        text = f"{human_count(v.params)} params"
        if v.value:
            text = f"{v.value}, {text}"
        return Cell(text, title=f"{exact(v.params)} parameters")
    return Cell(v.value, title=v.value or None)


def _values_table(r: Any) -> Table:
    rows = []
    for v in r.values:
        line = "" if v.line is None else str(v.line)
        name = ("→ " if v.last_expr else "") + v.name
        rows.append([line, name, v.type, Cell(v.shape, title=v.shape or None), v.dtype, v.device,
                     _detail(v)])
    headers = ["line", "name", "type", "shape", "dtype", "device", "detail"]
    if all(not row[-1].text for row in rows):  # no module or plain value: no detail column
        headers.pop()
        rows = [row[:-1] for row in rows]
    return Table(headers=headers, rows=rows, align=["r", "l", "l", "l", "l", "l", "l"],
                 title="values", clip_middle=[1])


def _label(path: str, parent_path: str | None) -> str:
    """A call's name under its parent call: relative to it (a number keeps the parent's last
    name: ``features.0``), the full path for calls made from the cell or elsewhere."""
    if parent_path and path.startswith(parent_path + "."):
        rel = path[len(parent_path) + 1:]
        if rel.isdigit():
            return parent_path.rsplit(".", 1)[-1] + "." + rel
        return rel
    return path or "<root>"


def _out(row: Any) -> str:
    return "FAILED" if row.failed else format_shapes(row.outputs)


def _rows(r: Any, depth: int) -> list[T.TreeRow]:
    """The calls to show (to ``depth``) as tree rows: class, input, output, line."""
    out: list[T.TreeRow] = []
    parents: list[Any] = []
    for row in r.calls:
        del parents[row.depth:]
        parent = parents[-1].path if parents and row.depth else None
        parents.append(row)
        if row.depth > depth:
            continue
        cells = [row.cls, format_shapes(row.inputs),
                 Cell(_out(row), css="tm-bad" if row.failed else None),
                 "" if row.line is None else str(row.line)]
        title = row.path + (f" … {row.last_path}" if row.repeat > 1 and row.last_path and
                            row.last_path != row.path else "")
        out.append(T.TreeRow(path=row.path, depth=row.depth, cells=cells,
                             css="tm-bad" if row.failed else None, failed=row.failed, data=row,
                             label=_label(row.path, parent), title=title, repeat=row.repeat,
                             last_path=row.last_path))
    return out


def _tree(r: Any, depth: int) -> list[T.Node]:
    return T.fold(T.link(_rows(r, depth)))


def _calls_title(r: Any) -> str:
    folded = sum(1 for row in r.calls if row.repeat > 1)
    plural = "" if r.total_calls == 1 else "s"
    return (f"module calls (depth {r.depth}; {r.total_calls:,} call{plural}"
            + (", repeated blocks folded" if folded else "") + ")")


def _calls_table(r: Any) -> Table:
    rows, indent, css, folded = T.text_rows(_tree(r, r.depth), label=lambda n: n.label,
                                            representative_row=False)
    notes = []
    if folded:
        notes.append("name.0-N ×K: K identical calls folded into one row; the calls under it "
                     "are the first one's")
    return Table(headers=HEADERS, rows=rows, align=ALIGN, title=_calls_title(r), indent=indent,
                 row_css=css, clip_middle=[0], fixed=[2, 3], keep_whole=[1], notes=notes)


def _wrap(text: str, prefix: str = "") -> list[str]:
    return wrap_text(prefix + text, text_width(), "  ")


def _notes(r: Any) -> list[tuple[str, str]]:
    out = []
    if r.converted:
        out.append(("from the namespace", "; ".join(r.converted)))
    for p in r.passed:
        out.append(("as is", p))
    for n in r.notes:
        out.append(("note", n))
    return out


# -- text ---------------------------------------------------------------------------------------
def text(r: Any) -> str:
    parts = [*wrap_text(_header(r), text_width(), "  ")]
    if r.values:
        parts.append(_values_table(r).text())
    else:
        parts.append("values: none assigned" + ("" if r.ok else " before the error"))
    if r.calls:
        parts.append(_calls_table(r).text())
    else:
        parts.append("module calls: none")
    lines: list[str] = []
    for label, body in _notes(r):
        lines.extend(_wrap(body, f"{label}: "))
    if r.error and r.error_kind != "interrupt":
        lines.extend(_wrap(r.error, "error: "))
    elif r.error_kind == "interrupt":
        lines.append(f"interrupted (KeyboardInterrupt) at line {r.error_line}")
    if lines:
        parts.append("\n".join(lines))
    return "\n".join(parts)


# -- html ---------------------------------------------------------------------------------------
def tree_html(r: Any, depth: int, open_depth: int | None = None) -> str:
    """The call tree as nested ``<details>`` (rows to ``depth``; levels open to ``open_depth``,
    by default all shown levels; failed calls always open)."""
    roots = _tree(r, depth)
    if not roots:
        return '<div class="tm-muted">no module calls</div>'
    return T.tree_html(roots, HEADERS, ALIGN,
                       open_depth=depth if open_depth is None else open_depth)


def _notes_html(r: Any) -> str:
    parts = []
    for label, body in _notes(r):
        parts.append(f'<div class="tm-note"><b>{esc(label)}:</b> {esc(body)}</div>')
    if r.error:
        msg = r.error if r.error_kind != "interrupt" else \
            f"interrupted (KeyboardInterrupt) at line {r.error_line}"
        parts.append(f'<div class="tm-error"><span class="tm-bad">error:</span> {esc(msg)}</div>')
    return "".join(parts)


def _values_html(r: Any) -> str:
    if not r.values:
        return '<div class="tm-muted">no values assigned</div>'
    return _values_table(r).html(wrap=False)


def html(r: Any) -> str:
    return page(f'<div class="tm-title">{esc(_header(r))}</div>'
                f"{_values_html(r)}"
                f'<div class="tm-title" style="margin-top:8px">{esc(_calls_title(r))}</div>'
                f"{tree_html(r, r.depth)}{_notes_html(r)}")


# -- widget -------------------------------------------------------------------------------------
def widget(r: Any) -> Any:
    import ipywidgets as w

    max_depth = max((row.depth for row in r.calls), default=0)
    head = w.HTML(page(f'<div class="tm-title">{esc(_header(r))}</div>{_values_html(r)}'))
    tree = w.HTML()
    depth = w.IntSlider(value=min(r.depth, max_depth), min=0, max=max_depth, step=1,
                        description="depth", continuous_update=False,
                        layout=w.Layout(width="260px"))
    expand = w.Button(description="expand all", layout=w.Layout(width="auto"))
    collapse = w.Button(description="collapse all", layout=w.Layout(width="auto"))
    state = {"open": None}

    def render(*_: Any) -> None:
        body = tree_html(r, depth.value, state["open"])
        tree.value = page(body)

    def on_expand(_: Any) -> None:
        state["open"] = max_depth + 1
        render()

    def on_collapse(_: Any) -> None:
        state["open"] = 0
        render()

    depth.observe(render, names="value")
    expand.on_click(on_expand)
    collapse.on_click(on_collapse)
    render()
    children = [head]
    if r.calls:
        children.append(w.HTML(page(f'<div class="tm-title">module calls '
                                    f'({r.total_calls:,})</div>')))
        children.append(w.HBox([depth, expand, collapse]))
        children.append(tree)
    children.append(w.HTML(page(_notes_html(r))))
    box = w.VBox(children)
    box.add_class("tm-meta-shape")
    return box
