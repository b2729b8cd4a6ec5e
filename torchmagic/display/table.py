"""Generic tables rendered as plain text (fits a width, no ANSI colour) or self-contained HTML.

Every renderer builds a :class:`Table` and calls ``.text()`` / ``.html()``, so all results share one
look. HTML uses no JavaScript and no external assets, inherits the page's colours (JupyterLab
variables with fallbacks) and draws borders in translucent grey, so it reads in light and dark themes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchmagic.display.format import esc

CSS = """
<style>
.tm-result{font-family:var(--jp-content-font-family,system-ui,-apple-system,'Segoe UI',sans-serif);
 font-size:13px;color:var(--jp-content-font-color1,inherit);max-width:100%;overflow-x:auto;margin:2px 0}
.tm-result .tm-title{font-weight:600;margin:2px 0 6px 0}
.tm-result table.tm-table{border-collapse:collapse;margin:0;font-variant-numeric:tabular-nums}
.tm-result table.tm-table th,.tm-result table.tm-table td{padding:3px 10px;
 border-bottom:1px solid rgba(127,127,127,.25);text-align:left;white-space:nowrap;
 background:transparent;color:inherit}
.tm-result table.tm-table th{font-weight:600;border-bottom:1px solid rgba(127,127,127,.6)}
.tm-result table.tm-table td.r,.tm-result table.tm-table th.r{text-align:right}
.tm-result table.tm-table tr:hover td{background:rgba(127,127,127,.08)}
.tm-result .tm-mono{font-family:var(--jp-code-font-family,ui-monospace,SFMono-Regular,Menlo,monospace)}
.tm-result .tm-muted{opacity:.65}
.tm-result .tm-warn{color:#d97706;font-weight:600}
.tm-result .tm-bad{color:#dc2626;font-weight:600}
.tm-result .tm-good{color:#16a34a;font-weight:600}
.tm-result .tm-footer{margin-top:6px;display:flex;flex-wrap:wrap;gap:4px 18px}
.tm-result .tm-kv b{font-weight:600}
.tm-result .tm-note{margin-top:4px}
.tm-result .tm-bar{display:inline-block;height:8px;border-radius:2px;background:#3b82f6;
 vertical-align:middle;opacity:.85}
.tm-result pre{margin:4px 0;white-space:pre-wrap}
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


@dataclass
class Table:
    """Rows of cells under headers; ``align`` is ``"l"`` or ``"r"`` per column."""

    headers: list[str]
    rows: list[list[object]] = field(default_factory=list)
    align: list[str] | None = None
    title: str | None = None
    footer: list[tuple[str, object]] = field(default_factory=list)  # (label, value) pairs
    notes: list[str] = field(default_factory=list)
    indent: list[int] | None = None  # per row: indentation level of the first column
    row_css: list[str | None] | None = None
    # columns cut in the middle when too wide (module paths: both ends tell rows apart)
    clip_middle: list[int] | None = None

    def _align(self, i: int) -> str:
        return (self.align or [])[i] if self.align and i < len(self.align) else "l"

    # -- text ---------------------------------------------------------------------------------
    def text(self, width: int = 100) -> str:
        cells = [[as_cell(c).text for c in row] for row in self.rows]
        if self.indent:
            for row, lvl in zip(cells, self.indent):
                if row:
                    row[0] = "  " * lvl + row[0]
        ncol = len(self.headers)
        widths = [len(h) for h in self.headers]
        for row in cells:
            for i, c in enumerate(row[:ncol]):
                widths[i] = max(widths[i], len(c))
        sep = 2
        # Shrink the widest left-aligned columns until the table fits.
        while sum(widths) + sep * (ncol - 1) > width:
            cand = [i for i in range(ncol) if self._align(i) == "l" and widths[i] > 12]
            if not cand:
                break
            j = max(cand, key=lambda i: widths[i])
            widths[j] -= 1

        middle = set(self.clip_middle or ())

        def fit(s: str, w: int, a: str, mid: bool = False) -> str:
            if len(s) > w:
                if mid and w >= 8:
                    head = (w - 1) // 3
                    s = s[:head] + "…" + s[len(s) - (w - 1 - head):]
                else:
                    s = s[: max(w - 1, 0)] + "…"
            return s.rjust(w) if a == "r" else s.ljust(w)

        def line(row: list[str], mid: bool = True) -> str:
            parts = [fit(row[i] if i < len(row) else "", widths[i], self._align(i),
                         mid and i in middle) for i in range(ncol)]
            return (" " * sep).join(parts).rstrip()

        total = min(width, sum(widths) + sep * (ncol - 1))
        out = []
        if self.title:
            out.append(self.title)
        out.append("=" * total)
        out.append(line(self.headers, mid=False))
        out.append("-" * total)
        out.extend(line(r) for r in cells)
        out.append("=" * total)
        for label, value in self.footer:
            out.append(f"{label}: {as_cell(value).text}")
        out.extend(self.notes)
        return "\n".join(out)

    # -- html ---------------------------------------------------------------------------------
    def html(self, extra_html: str = "") -> str:
        def td(c: object, i: int, tag: str = "td") -> str:
            cell = as_cell(c)
            cls = " ".join(x for x in ("r" if self._align(i) == "r" else "", cell.css or "") if x)
            attrs = f' class="{cls}"' if cls else ""
            if cell.title:
                attrs += f' title="{esc(cell.title)}"'
            return f"<{tag}{attrs}>{esc(cell.text)}</{tag}>"

        parts = ['<div class="tm-result">', CSS]
        if self.title:
            parts.append(f'<div class="tm-title">{esc(self.title)}</div>')
        parts.append('<table class="tm-table"><thead><tr>')
        parts.extend(td(h, i, "th") for i, h in enumerate(self.headers))
        parts.append("</tr></thead><tbody>")
        for r, row in enumerate(self.rows):
            css = (self.row_css or [None] * len(self.rows))[r] if self.row_css else None
            parts.append(f'<tr class="{css}">' if css else "<tr>")
            for i, c in enumerate(row):
                cell_html = td(c, i)
                if i == 0 and self.indent and self.indent[r]:
                    pad = 12 * self.indent[r]
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
        for note in self.notes:
            parts.append(f'<div class="tm-note">{esc(note)}</div>')
        parts.append(extra_html)
        parts.append("</div>")
        return "".join(parts)


def html_block(title: str | None, body_html: str) -> str:
    """Wrap arbitrary HTML in the shared style (for results that are not a single table)."""
    head = f'<div class="tm-title">{esc(title)}</div>' if title else ""
    return f'<div class="tm-result">{CSS}{head}{body_html}</div>'
