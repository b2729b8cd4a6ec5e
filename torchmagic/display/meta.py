"""Rendering of :class:`~torchmagic.core.meta.MetaShapeReport` (``%%meta_shape``).

- Text (100 columns, no colour): a values table (line, name, type, shape, dtype, device, detail),
  the module-call tree to the report's depth (indented, input -> output shapes, folded repeats as
  ``layers.0-31 ×32``), what was taken from the namespace, notes, and the error if the run stopped.
- HTML (self-contained, no JavaScript): the same values table, and the call tree as nested
  ``<details>`` elements, so modules expand and collapse in any viewer.
- Widget: the header and values table, a depth slider and expand/collapse-all buttons that
  re-render the call tree (down to every depth recorded, beyond the report's default).
"""

from __future__ import annotations

import textwrap
from typing import Any

from torchmagic.core.tracing import format_shapes
from torchmagic.display.format import esc, exact, human_count
from torchmagic.display.table import CSS, Cell, Table

_WIDTH = 100

_TREE_CSS = """
<style>
.tm-result .tm-tree{font-family:var(--jp-code-font-family,ui-monospace,SFMono-Regular,Menlo,monospace);
 font-size:12px;line-height:1.55}
.tm-result .tm-tree details>summary{cursor:pointer;list-style:none}
.tm-result .tm-tree details>summary::-webkit-details-marker{display:none}
.tm-result .tm-tree details>summary::before{content:'▸';display:inline-block;width:1em;opacity:.6}
.tm-result .tm-tree details[open]>summary::before{content:'▾'}
.tm-result .tm-tree .tm-leaf{padding-left:1em}
.tm-result .tm-tree .tm-kids{margin-left:1.1em;border-left:1px solid rgba(127,127,127,.3);
 padding-left:.4em}
.tm-result .tm-tree .tm-cls{opacity:.7}
.tm-result .tm-tree .tm-arrow{opacity:.55}
.tm-result .tm-errbox{border-left:3px solid #dc2626;padding:4px 8px;margin:6px 0;
 background:rgba(220,38,38,.08)}
</style>
""".strip()


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


def _label(row: Any, parent_path: str | None) -> str:
    path = row.path
    if parent_path and path.startswith(parent_path + "."):
        path = path[len(parent_path) + 1:]
    if row.repeat > 1 and row.last_path == row.path:
        return f"{path or '<root>'} ×{row.repeat}"
    if row.repeat > 1:
        last = row.last_path.rsplit(".", 1)[-1].rsplit("[", 1)[-1].rstrip("]")
        return f"{path}-{last} ×{row.repeat}"
    return path or "<root>"


def _visible(r: Any, depth: int) -> list[tuple[Any, str, str | None]]:
    """(row, label, parent path) of the calls to show, in order."""
    out: list[tuple[Any, str, str | None]] = []
    parents: list[Any] = []
    for row in r.calls:
        del parents[row.depth:]
        parent = parents[-1].path if parents and row.depth else None
        parents.append(row)
        if row.depth <= depth:
            out.append((row, _label(row, parent), parent))
    return out


def _out(row: Any) -> str:
    return "FAILED" if row.failed else format_shapes(row.outputs)


def _calls_table(r: Any) -> Table:
    shown = _visible(r, r.depth)
    rows, indent, css = [], [], []
    for row, label, _ in shown:
        rows.append([label, row.cls, format_shapes(row.inputs),
                     Cell(_out(row), css="tm-bad" if row.failed else None),
                     "" if row.line is None else str(row.line)])
        indent.append(row.depth)
        css.append("tm-bad" if row.failed else None)
    folded = sum(1 for row in r.calls if row.repeat > 1)
    plural = "" if r.total_calls == 1 else "s"
    title = (f"module calls (depth {r.depth}; {r.total_calls:,} call{plural}"
             + (", repeated blocks folded" if folded else "") + ")")
    return Table(headers=["module", "class", "input", "output", "line"], rows=rows,
                 align=["l", "l", "l", "l", "r"], title=title, indent=indent, row_css=css,
                 clip_middle=[0])


def _wrap(text: str, prefix: str = "") -> list[str]:
    return textwrap.wrap(text, width=_WIDTH, initial_indent=prefix,
                         subsequent_indent=" " * (len(prefix) + 2), break_on_hyphens=False,
                         break_long_words=True) or [prefix]


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
    parts = [_header(r)]
    if r.values:
        parts.append(_values_table(r).text(_WIDTH))
    else:
        parts.append("values: none assigned" + ("" if r.ok else " before the error"))
    if r.calls:
        parts.append(_calls_table(r).text(_WIDTH))
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
    """The call tree as nested ``<details>`` (rows to ``depth``; open to ``open_depth``)."""
    shown = _visible(r, depth)
    if not shown:
        return '<div class="tm-muted">no module calls</div>'
    open_depth = depth if open_depth is None else open_depth
    parts = ['<div class="tm-tree">']
    stack: list[int] = []
    for i, (row, label, _) in enumerate(shown):
        while stack and stack[-1] >= row.depth:
            stack.pop()
            parts.append("</div></details>")
        has_kids = i + 1 < len(shown) and shown[i + 1][0].depth > row.depth
        title = row.path + (f" … {row.last_path}" if row.repeat > 1 else "")
        line = f' <span class="tm-muted">line {row.line}</span>' if row.line else ""
        out = ('<span class="tm-bad">FAILED</span>' if row.failed
               else esc(format_shapes(row.outputs)))
        body = (f'<span title="{esc(title)}">{esc(label)}</span> '
                f'<span class="tm-cls">{esc(row.cls)}</span> '
                f'{esc(format_shapes(row.inputs))} <span class="tm-arrow">→</span> {out}{line}')
        if has_kids:
            is_open = " open" if row.depth < open_depth or row.failed else ""
            parts.append(f"<details{is_open}><summary>{body}</summary><div class=\"tm-kids\">")
            stack.append(row.depth)
        else:
            parts.append(f'<div class="tm-leaf">{body}</div>')
    parts.extend("</div></details>" for _ in stack)
    parts.append("</div>")
    return "".join(parts)


def _notes_html(r: Any) -> str:
    parts = []
    for label, body in _notes(r):
        parts.append(f'<div class="tm-note"><b>{esc(label)}:</b> {esc(body)}</div>')
    if r.error:
        msg = r.error if r.error_kind != "interrupt" else \
            f"interrupted (KeyboardInterrupt) at line {r.error_line}"
        parts.append(f'<div class="tm-errbox"><span class="tm-bad">error:</span> {esc(msg)}</div>')
    return "".join(parts)


def _values_html(r: Any) -> str:
    if not r.values:
        return '<div class="tm-muted">no values assigned</div>'
    return _values_table(r).html()


def html(r: Any) -> str:
    folded = sum(1 for row in r.calls if row.repeat > 1)
    plural = "" if r.total_calls == 1 else "s"
    calls_title = (f"module calls (depth {r.depth}; {r.total_calls:,} call{plural}"
                   + (", repeated blocks folded" if folded else "") + ")")
    return (f'<div class="tm-result">{CSS}{_TREE_CSS}'
            f'<div class="tm-title">{esc(_header(r))}</div>'
            f"{_values_html(r)}"
            f'<div class="tm-title" style="margin-top:8px">{esc(calls_title)}</div>'
            f"{tree_html(r, r.depth)}{_notes_html(r)}</div>")


# -- widget -------------------------------------------------------------------------------------
def widget(r: Any) -> Any:
    import ipywidgets as w

    max_depth = max((row.depth for row in r.calls), default=0)
    head = w.HTML(f'<div class="tm-result">{CSS}{_TREE_CSS}'
                  f'<div class="tm-title">{esc(_header(r))}</div>{_values_html(r)}</div>')
    tree = w.HTML()
    depth = w.IntSlider(value=min(r.depth, max_depth), min=0, max=max_depth, step=1,
                        description="depth", continuous_update=False,
                        layout=w.Layout(width="260px"))
    expand = w.Button(description="expand all", layout=w.Layout(width="auto"))
    collapse = w.Button(description="collapse all", layout=w.Layout(width="auto"))
    state = {"open": None}

    def render(*_: Any) -> None:
        body = tree_html(r, depth.value, state["open"])
        tree.value = f'<div class="tm-result">{CSS}{_TREE_CSS}{body}</div>'

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
        children.append(w.HTML(f'<div class="tm-result">{CSS}<div class="tm-title">module calls '
                               f'({r.total_calls:,})</div></div>'))
        children.append(w.HBox([depth, expand, collapse]))
        children.append(tree)
    children.append(w.HTML(f'<div class="tm-result">{CSS}{_TREE_CSS}{_notes_html(r)}</div>'))
    box = w.VBox(children)
    box.add_class("tm-meta-shape")
    return box
