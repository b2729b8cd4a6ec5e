"""Generic tables rendered as plain text (fits a width, no ANSI colour) or self-contained HTML.

Every renderer builds a :class:`Table` and calls ``.text()`` / ``.html()``, so all results share one
look. HTML uses no JavaScript and no external assets, takes its colours from JupyterLab's CSS
variables (with fallbacks elsewhere), so it reads in light and dark themes, and scrolls sideways
instead of cutting columns.

Plain text fits :func:`~torchmagic.display.format.text_width` columns: when the table is too wide,
text columns are narrowed first (module paths keep their layer numbers, see
:func:`~torchmagic.display.format.shorten_path`), then the columns named in ``drop`` are left out
one by one (a note names them), then text columns are narrowed further. Numbers and columns listed
in ``fixed`` (shapes) are never cut. Titles, footers and notes wrap at spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchmagic.display.format import clip_end, esc, shorten_path, text_width, wrap_text

# Colours: JupyterLab's variables (light and dark themes define them; VS Code and nbconvert
# exports too), with fallbacks. Text colours are chosen for >= 4.5:1 contrast on the theme's
# background: error-color1 (light #d32f2f 5.0:1, dark #f44336 5.1:1), success-color0; warnings
# keep the normal text colour inside a box marked with the warning colour.
CSS = """
<style>
.tm-result{--tm-fg:var(--jp-content-font-color1,inherit);
 --tm-muted:var(--jp-content-font-color2,inherit);
 --tm-line:var(--jp-border-color2,rgba(127,127,127,.3));
 --tm-line-strong:var(--jp-border-color1,rgba(127,127,127,.6));
 --tm-hover:var(--jp-rendermime-table-row-hover-background,rgba(127,127,127,.12));
 --tm-warn:var(--jp-warn-color1,#f57c00);--tm-err:var(--jp-error-color1,#d32f2f);
 --tm-ok:var(--jp-success-color0,#2e7d32);--tm-accent:var(--jp-brand-color1,#1976d2);
 font-family:var(--jp-content-font-family,system-ui,-apple-system,'Segoe UI',sans-serif);
 font-size:13px;line-height:19px;color:var(--tm-fg);max-width:100%;overflow-x:auto;margin:2px 0}
.tm-result .tm-title{font-weight:600;margin:2px 0 6px 0;white-space:normal}
.tm-result table.tm-table{border-collapse:collapse;margin:0;font-variant-numeric:tabular-nums;
 table-layout:auto;width:auto;font-size:13px;border:none}
.tm-result table.tm-table th,.tm-result table.tm-table td{padding:4px 10px;line-height:19px;
 border:none;border-bottom:1px solid var(--tm-line);text-align:left;white-space:nowrap;
 vertical-align:top;background:transparent;color:inherit;max-width:none}
.tm-result table.tm-table th{font-weight:600;border-bottom:1px solid var(--tm-line-strong)}
.tm-result table.tm-table td.r,.tm-result table.tm-table th.r{text-align:right}
.tm-result table.tm-table tbody tr{background:transparent}
.tm-result table.tm-table tbody tr:hover{background:var(--tm-hover)}
.tm-result .tm-mono{font-family:var(--jp-code-font-family,ui-monospace,SFMono-Regular,Menlo,monospace)}
.tm-result .tm-muted{color:var(--tm-muted)}
.tm-result .tm-bad{color:var(--tm-err);font-weight:600}
.tm-result .tm-good{color:var(--tm-ok);font-weight:600}
.tm-result .tm-warn,.tm-result .tm-error{border-left:3px solid var(--tm-warn);
 background:rgba(245,124,0,.1);background:color-mix(in srgb,var(--tm-warn) 12%,transparent);
 padding:3px 8px;margin:4px 0;border-radius:2px;white-space:pre-wrap}
.tm-result .tm-error{border-left-color:var(--tm-err);background:rgba(211,47,47,.08);
 background:color-mix(in srgb,var(--tm-err) 10%,transparent)}
.tm-result .tm-error.tm-plain{border-left-color:var(--tm-line-strong);background:transparent}
.tm-result .tm-error table th,.tm-result .tm-error table td{background:transparent;border:none;
 color:inherit;font-size:13px}
.tm-result tr.tm-bad td{font-weight:400;color:inherit}
.tm-result tr.tm-bad td:first-child{box-shadow:inset 3px 0 0 var(--tm-err)}
.tm-result tr.tm-bad td.tm-bad{font-weight:600;color:var(--tm-err)}
.tm-result tr.tm-good td{font-weight:600;color:inherit}
.tm-result tr.tm-muted td{color:var(--tm-muted)}
.tm-result .tm-footer{margin-top:6px;display:flex;flex-wrap:wrap;gap:4px 18px}
.tm-result .tm-kv b{font-weight:600}
.tm-result .tm-note{margin-top:4px}
.tm-result .tm-bar{display:inline-block;height:8px;border-radius:2px;background:var(--tm-accent);
 vertical-align:middle}
.tm-result .tm-cards{display:flex;flex-wrap:wrap;gap:6px 8px;margin:2px 0 8px 0}
.tm-result .tm-card{padding:3px 10px;border:1px solid var(--tm-line);border-radius:4px;
 min-width:80px}
.tm-result .tm-card .tm-label{font-size:11px;line-height:15px;color:var(--tm-muted)}
.tm-result .tm-card .tm-value{font-size:15px;line-height:20px;font-weight:600;white-space:nowrap}
.tm-result .tm-card .tm-exact{font-size:11px;line-height:15px;color:var(--tm-muted);
 font-variant-numeric:tabular-nums;white-space:nowrap}
.tm-result .tm-bars{display:flex;flex-wrap:wrap;gap:4px 32px;margin-top:8px}
.tm-result .tm-bargrid{display:grid;grid-template-columns:max-content 200px max-content max-content;
 gap:2px 8px;align-items:center;white-space:nowrap}
.tm-result pre{margin:4px 0;white-space:pre-wrap;background:transparent;color:inherit;
 font-size:12px;line-height:17px;padding:0;border:none}
.tm-result details>summary{cursor:pointer}
</style>
""".strip()


@dataclass
class Cell:
    """A table cell: shown text, optional hover title (exact value) and CSS class."""

    text: str
    title: str | None = None
    css: str | None = None

    def __str__(self) -> str:
        return self.text


def as_cell(value: object) -> Cell:
    return value if isinstance(value, Cell) else Cell("" if value is None else str(value))


SOFT_PATH = 24   # a path column is narrowed to this before any column is left out
SOFT_TEXT = 12   # other text columns
HARD_MIN = 6     # then to this (headers are never cut)


@dataclass
class Table:
    """Rows of cells under headers; ``align`` is ``"l"`` or ``"r"`` per column.

    Right-aligned columns (numbers) and the columns in ``fixed`` (e.g. shapes) are never cut in
    text; ``clip_middle`` names the module-path columns (shortened keeping layer numbers and the
    last name); ``drop`` lists the columns that may be left out of the text, first one first.
    """

    headers: list[str]
    rows: list[list[object]] = field(default_factory=list)
    align: list[str] | None = None
    title: str | None = None
    footer: list[tuple[str, object]] = field(default_factory=list)  # (label, value) pairs
    notes: list[str] = field(default_factory=list)
    indent: list[int] | None = None  # per row: indentation level of the first column
    row_css: list[str | None] | None = None
    # module-path columns: shortened keeping what tells rows apart (layer numbers, last name)
    clip_middle: list[int] | None = None
    drop: list[int] | None = None     # columns the text may leave out, in this order
    fixed: list[int] | None = None    # left-aligned columns never cut (shapes)
    keep_whole: list[int] | None = None  # cut only after every droppable column is out (types)

    def _align(self, i: int) -> str:
        return (self.align or [])[i] if self.align and i < len(self.align) else "l"

    # -- text ---------------------------------------------------------------------------------
    def _widths(self, cells: list[list[str]], cols: list[int], width: int,
                hard: bool) -> tuple[dict[int, int], bool]:
        """Column widths for the visible ``cols``; True when the table fits ``width``."""
        ncol = len(self.headers)
        natural = {i: len(self.headers[i]) for i in cols}
        levels = self.indent or []
        for r, row in enumerate(cells):
            for i in cols:
                if i < len(row):
                    pad = 2 * levels[r] if i == 0 and r < len(levels) else 0
                    natural[i] = max(natural[i], pad + len(row[i]))
        fixed = set(self.fixed or ())
        paths = set(self.clip_middle or ())
        whole = set(self.keep_whole or ())
        lead = {i: 0 for i in cols}
        if self.indent and 0 in cols:  # indentation is not shrinkable
            lead[0] = max((2 * lvl for lvl in self.indent), default=0)

        def floor(i: int) -> int:
            if self._align(i) == "r" or i in fixed or i >= ncol:
                return natural[i]
            soft = natural[i] if i in whole else SOFT_PATH if i in paths else SOFT_TEXT
            low = HARD_MIN if hard else soft
            return min(natural[i], max(len(self.headers[i]), low + lead[i]))

        w = dict(natural)
        sep = 2

        def total() -> int:
            return sum(w.values()) + sep * (len(cols) - 1)

        while total() > width:
            cand = [i for i in cols if w[i] > floor(i)]
            if not cand:
                break
            j = max(cand, key=lambda i: (w[i] - floor(i), w[i]))
            w[j] -= 1
        return w, total() <= width

    def text(self, width: int | None = None) -> str:
        width = width or text_width()
        cells = [[as_cell(c).text for c in row] for row in self.rows]
        levels = self.indent or []
        ncol = len(self.headers)
        all_cols = list(range(ncol))
        drop = [i for i in (self.drop or []) if i < ncol]
        # narrow to the soft floors; else leave out columns one by one; else narrow further
        cols, (w, fits) = all_cols, self._widths(cells, all_cols, width, hard=False)
        dropped: list[int] = []
        for k in range(1, len(drop) + 1):
            if fits:
                break
            cols = [i for i in all_cols if i not in drop[:k]]
            w, fits = self._widths(cells, cols, width, hard=False)
            dropped = drop[:k]
        if not fits:
            w, fits = self._widths(cells, cols, width, hard=True)
        paths = set(self.clip_middle or ())

        def fit(s: str, i: int, lvl: int = 0) -> str:
            cw = w[i]
            pad = "  " * lvl if i == 0 else ""
            room = cw - len(pad)
            if len(s) > room:
                s = shorten_path(s, room) if i in paths else clip_end(s, room)
            s = pad + s
            return s.rjust(cw) if self._align(i) == "r" else s.ljust(cw)

        def line(row: list[str], lvl: int = 0) -> str:
            parts = [fit(row[i] if i < len(row) else "", i, lvl) for i in cols]
            return "  ".join(parts).rstrip()

        total = sum(w[i] for i in cols) + 2 * (len(cols) - 1)
        rule = min(width, total)
        out: list[str] = []
        if self.title:
            out.extend(wrap_text(self.title, width, "  "))
        out.append("=" * rule)
        out.append(line(list(self.headers)))
        out.append("-" * rule)
        for r, row in enumerate(cells):
            out.append(line(row, levels[r] if r < len(levels) else 0))
        out.append("=" * rule)
        for label, value in self.footer:
            out.extend(wrap_text(f"{label}: {as_cell(value).text}", width))
        for note in self.notes:
            out.extend(note.split("\n") if note.startswith("    ") else
                       [x for part in note.split("\n") for x in wrap_text(part, width, "  ")])
        if dropped:
            names = ", ".join(self.headers[i] for i in dropped)
            out.extend(wrap_text(f"(not shown at {width} columns: {names})", width, "  "))
        return "\n".join(out)

    # -- html ---------------------------------------------------------------------------------
    def html(self, extra_html: str = "", wrap: bool = True) -> str:
        """The table as HTML; ``wrap=False`` leaves out the ``tm-result`` box and the style (for
        a table inside another result's box)."""
        def td(c: object, i: int, tag: str = "td") -> str:
            cell = as_cell(c)
            cls = " ".join(x for x in ("r" if self._align(i) == "r" else "", cell.css or "") if x)
            attrs = f' class="{cls}"' if cls else ""
            if cell.title:
                attrs += f' title="{esc(cell.title)}"'
            return f"<{tag}{attrs}>{esc(cell.text)}</{tag}>"

        parts = ['<div class="tm-result">', CSS] if wrap else ["<div>"]
        if self.title:
            parts.append(f'<div class="tm-title">{esc(self.title)}</div>')
        parts.append('<table class="tm-table"><thead><tr>')
        parts.extend(td(h, i, "th") for i, h in enumerate(self.headers))
        parts.append("</tr></thead><tbody>")
        for r, row in enumerate(self.rows):
            css = self.row_css[r] if self.row_css and r < len(self.row_css) else None
            parts.append(f'<tr class="{css}">' if css else "<tr>")
            for i, c in enumerate(row):
                cell_html = td(c, i)
                if i == 0 and self.indent and self.indent[r]:
                    pad = 14 * self.indent[r]
                    cell_html = cell_html.replace("<td", f'<td style="padding-left:{pad + 10}px"', 1)
                parts.append(cell_html)
            parts.append("</tr>")
        parts.append("</tbody></table>")
        if self.footer:
            parts.append('<div class="tm-footer">')
            for label, value in self.footer:
                cell = as_cell(value)
                t = f' title="{esc(cell.title)}"' if cell.title else ""
                parts.append(f'<span class="tm-kv"{t}><b>{esc(label)}:</b> {esc(cell.text)}</span>')
            parts.append("</div>")
        parts.append(notes_html(self.notes))
        parts.append(extra_html)
        parts.append("</div>")
        return "".join(parts)


def note_html(note: str, css: str = "") -> str:
    """A note line as HTML: ``WARNING``/``NOTE`` lines in the warning box, code (lines indented
    by four spaces) as preformatted text, anything else as a plain line."""
    if note.startswith("    "):
        return f'<pre class="tm-mono">{esc(note[4:])}</pre>'
    if not css and note.startswith(("WARNING", "warning", "NOTE")):
        css = "tm-warn"
    return f'<div class="tm-note{" " + css if css else ""}">{esc(note)}</div>'


def notes_html(notes: list[str]) -> str:
    """Notes as HTML (:func:`note_html`); consecutive code lines make one ``<pre>`` block."""
    out: list[str] = []
    code: list[str] = []
    for n in [*notes, None]:
        if n is not None and n.startswith("    "):
            code.append(n[4:])
            continue
        if code:
            out.append(f'<pre class="tm-mono">{esc(chr(10).join(code))}</pre>')
            code = []
        if n is not None:
            out.append(note_html(n))
    return "".join(out)


def html_block(title: str | None, body_html: str) -> str:
    """Wrap arbitrary HTML in the shared style (for results that are not a single table)."""
    head = f'<div class="tm-title">{esc(title)}</div>' if title else ""
    return f'<div class="tm-result">{CSS}{head}{body_html}</div>'


def cards_html(items: list[tuple[str, str, str | None]]) -> str:
    """Cards of ``(label, shown value, exact value)``: the exact value in small type under the
    shown one (and on hover), e.g. ``parameters / 69.0 B / 68,976,648,192``."""
    out = []
    for label, value, exact in items:
        t = f' title="{esc(exact)}"' if exact else ""
        ex = (f'<div class="tm-exact">{esc(exact)}</div>'
              if exact and exact != value else "")
        out.append(f'<div class="tm-card"{t}><div class="tm-label">{esc(label)}</div>'
                   f'<div class="tm-value">{esc(value)}</div>{ex}</div>')
    return f'<div class="tm-cards">{"".join(out)}</div>'


def bars_html(title: str, items: list[tuple[str, float, str, str | None]],
              note: str | None = None) -> str:
    """Horizontal CSS bars for ``(label, value, shown value, exact title)``: each bar's length is
    its share of the largest; the percentage is of the sum."""
    top = max((v for _, v, _, _ in items), default=0) or 1
    whole = sum(v for _, v, _, _ in items) or 1
    cells = []
    for label, value, shown, exact in items:
        pct = 100.0 * value / top
        share = f"{100.0 * value / whole:.1f}%"
        tip = f' title="{esc(f"{label}: {exact or shown} ({share})")}"'
        cells.append(f'<span class="tm-mono"{tip}>{esc(label)}</span><span{tip}>'
                     f'<span class="tm-bar" style="width:{max(pct, 0.5):.1f}%"></span></span>'
                     f'<span{tip}>{esc(shown)}</span><span class="tm-muted">{share}</span>')
    rows = (f'<div class="tm-bargrid">{"".join(cells)}</div>' if cells else
            '<div class="tm-muted">nothing to show</div>')
    extra = f'<div class="tm-muted">{esc(note)}</div>' if note else ""
    return f'<div><div class="tm-title">{esc(title)}</div>{rows}{extra}</div>'
