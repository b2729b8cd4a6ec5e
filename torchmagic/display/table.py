"""Generic tables rendered as plain text (fits a width, no ANSI colour) or self-contained HTML,
and the HTML pieces every renderer shares (:func:`page`, cards, bars, note boxes).

Plain text fits :func:`~torchmagic.display.format.text_width` columns: when the table is too wide,
text columns are narrowed first (module paths keep their layer numbers, see
:func:`~torchmagic.display.format.shorten_path`), then the columns named in ``drop`` are left out
one by one (a note names them), then text columns are narrowed further. Numbers and columns listed
in ``fixed`` (shapes) are never cut. Titles, footers and notes wrap at spaces.

HTML uses no JavaScript and no external assets. It is written for two kinds of viewer:

- JupyterLab on a notebook that is *not trusted* (one someone else saved, a cloned repository)
  sanitizes HTML outputs: ``<style>`` elements are removed, and so is any inline declaration whose
  value it does not accept (``var()``, ``ch`` in paddings, custom properties). GitHub does the
  same. So everything needed to read a result is in inline styles with plain values
  (:func:`inline_styles` turns the ``tm-*`` classes into them): layout, alignment, boxes, bars,
  indentation. Text keeps the theme's own colour (readable in light and dark); warnings and
  failures are marked by a coloured border and bold type, never by coloured text alone.
- Everywhere the ``<style>`` block survives (the notebook you ran, a trusted one, nbconvert, VS
  Code), it adds theme colours from JupyterLab's variables: failure text in ``--jp-error-color1``
  (5.0:1 on the light theme's white, 5.1:1 on the dark theme's #111), success in
  ``--jp-success-color0``, muted text in ``--jp-content-font-color2``, hover rows, and the ▸/▾ of
  open and closed tree rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torchmagic.display.format import (
    clip_end,
    clip_items,
    esc,
    shorten_path,
    text_width,
    wrap_text,
)

MONO = "ui-monospace,SFMono-Regular,Menlo,Consolas,'Liberation Mono',monospace"

# class -> inline style (plain values JupyterLab's sanitizer keeps; checked in the browser test)
INLINE: dict[str, str] = {
    "tm-result": "font-size:13px;line-height:19px;max-width:100%;overflow-x:auto;margin:2px 0",
    "tm-title": "font-weight:600;margin:2px 0 6px 0",
    "tm-muted": "opacity:.75",
    "tm-bad": "font-weight:600",
    "tm-good": "font-weight:600",
    "tm-mono": f"font-family:{MONO}",
    "tm-note": "margin-top:4px",
    "tm-kv": "margin-top:2px",
    "tm-warn": "border-left:3px solid #f57c00;background-color:rgba(245,124,0,.1);"
               "padding:3px 8px;margin:4px 0;border-radius:2px;white-space:pre-wrap",
    "tm-error": "border-left:3px solid #d32f2f;background-color:rgba(211,47,47,.08);"
                "padding:3px 8px;margin:4px 0;border-radius:2px;white-space:pre-wrap",
    "tr": "text-align:right",
    "tm-plain": "border-left-color:rgba(127,127,127,.6);background-color:transparent",
    "tm-table": "border-collapse:collapse;margin:0;table-layout:auto;width:auto",
    "l": "text-align:left;white-space:nowrap;vertical-align:top",
    "r": "text-align:right;white-space:nowrap;vertical-align:top",
    "tm-row-bad": "box-shadow:inset 3px 0 0 #d32f2f",
    "tm-row-muted": "opacity:.75",
    "tm-row-good": "font-weight:600",
    "tm-cards": "margin:2px 0 8px 0",
    "tm-card": "display:inline-block;vertical-align:top;margin:0 8px 6px 0;padding:3px 10px;"
               "border:1px solid rgba(127,127,127,.35);border-radius:4px;min-width:80px",
    "tm-label": "font-size:11px;line-height:15px;opacity:.75",
    "tm-value": "font-size:15px;line-height:20px;font-weight:600;white-space:nowrap",
    "tm-exact": "font-size:11px;line-height:15px;opacity:.75;white-space:nowrap",
    "tm-bars": "display:flex;flex-wrap:wrap;gap:4px 32px;margin-top:8px",
    "tm-bargrid": "display:grid;grid-template-columns:max-content 200px max-content max-content;"
                  "gap:2px 8px;align-items:center;white-space:nowrap",
    "tm-bar": "display:inline-block;height:8px;border-radius:2px;background:#1976d2;"
              "vertical-align:middle",
    "tm-footer": "margin-top:6px;display:flex;flex-wrap:wrap;gap:4px 18px",
    "tm-pre": f"font-family:{MONO};font-size:12px;line-height:17px;white-space:pre-wrap;"
              "margin:4px 0;padding:0;background-color:transparent;border:none",
    # module trees (display/tree.py)
    "tm-scroll": "overflow-x:auto;max-width:100%;margin:2px 0 4px 0",
    "tm-tree": f"font-family:{MONO};font-size:12px;line-height:19px;white-space:nowrap;"
               "display:inline-block;min-width:100%",
    "tm-head": "font-weight:700",
    "tm-tog": "display:inline-block;width:14px;height:19px;vertical-align:top",
    "tm-fold": "font-weight:600",
    "tm-more": "opacity:.75;font-style:italic",
}

_OPEN_TAG = re.compile(r'<([a-zA-Z][\w-]*)([^<>]*?)\sclass="([^"]*)"([^<>]*)>')
_STYLE_ATTR = re.compile(r'\sstyle="([^"]*)"')


def inline_styles(html: str) -> str:
    """Add the inline style of each known ``tm-*`` class to the tags that carry it (an element's
    own ``style`` comes last, so it wins). Tags without a known class are left as they are."""
    def one(m: re.Match[str]) -> str:
        tag, before, classes, after = m.groups()
        styles = list(dict.fromkeys(INLINE[c] for c in classes.split() if c in INLINE))
        if not styles:
            return m.group(0)
        attrs = before + after
        own = _STYLE_ATTR.search(attrs)
        if own:
            styles.append(own.group(1))
            attrs = attrs[:own.start()] + attrs[own.end():]
        return f'<{tag} class="{classes}" style="{";".join(styles)}"{attrs}>'

    return _OPEN_TAG.sub(one, html)


# Theme colours where <style> survives (trusted notebooks, nbconvert, VS Code): JupyterLab's
# variables, with fallbacks; '!important' where an inline style sets the same property.
CSS = """
<style>
.tm-result{--tm-err:var(--jp-error-color1,#d32f2f);--tm-warn:var(--jp-warn-color1,#f57c00);
 --tm-ok:var(--jp-success-color0,#2e7d32);--tm-accent:var(--jp-brand-color1,#1976d2);
 --tm-line:var(--jp-border-color2,rgba(127,127,127,.3));
 --tm-hover:var(--jp-rendermime-table-row-hover-background,rgba(127,127,127,.12));
 font-family:var(--jp-content-font-family,system-ui,-apple-system,'Segoe UI',sans-serif);
 color:var(--jp-content-font-color1,inherit);font-variant-numeric:tabular-nums}
.tm-result .tm-muted,.tm-result .tm-label,.tm-result .tm-exact,.tm-result .tm-more,
.tm-result .tm-row-muted{opacity:1!important;color:var(--jp-content-font-color2,inherit)}
.tm-result .tm-bad{color:var(--tm-err)}
.tm-result .tm-good{color:var(--tm-ok)}
.tm-result .tm-warn{border-left-color:var(--tm-warn)!important;
 background-color:color-mix(in srgb,var(--tm-warn) 12%,transparent)!important}
.tm-result .tm-error{border-left-color:var(--tm-err)!important;
 background-color:color-mix(in srgb,var(--tm-err) 10%,transparent)!important}
.tm-result .tm-error.tm-plain{border-left-color:rgba(127,127,127,.6)!important;
 background-color:transparent!important}
.tm-result .tm-row-bad{box-shadow:inset 3px 0 0 var(--tm-err)!important}
.tm-result .tm-bar{background:var(--tm-accent)!important}
.tm-result .tm-mono,.tm-result .tm-tree,.tm-result .tm-pre{
 font-family:var(--jp-code-font-family,ui-monospace,SFMono-Regular,Menlo,monospace)!important}
.tm-result table.tm-table th,.tm-result table.tm-table td{padding:4px 10px;line-height:19px;
 border:none;border-bottom:1px solid var(--tm-line);background:transparent}
.tm-result table.tm-table th{border-bottom:1px solid var(--jp-border-color1,rgba(127,127,127,.6))}
.tm-result table.tm-table tbody tr{background:transparent}
.tm-result table.tm-table tbody tr:hover,.tm-result .tm-tree .tm-row:hover{
 background:var(--tm-hover)}
.tm-result .tm-card{border-color:var(--tm-line)!important}
.tm-result .tm-tree details>summary::-webkit-details-marker{display:none}
.tm-result .tm-tree details>summary .tm-tog{font-size:0}
.tm-result .tm-tree details>summary .tm-tog::before{content:'▸';font-size:12px}
.tm-result .tm-tree details[open]>summary .tm-tog::before{content:'▾'}
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
SOFT_SHAPES = 16  # shape columns (``fixed``), cut between whole shapes, only as a last resort


@dataclass
class Table:
    """Rows of cells under headers; ``align`` is ``"l"`` or ``"r"`` per column.

    Right-aligned columns (numbers) are never cut in text; the columns in ``fixed`` (shapes) only
    when nothing else makes the table fit, and then between whole shapes (``(2, 16), +3``); ``clip_middle`` names the module-path columns (shortened keeping layer numbers and the
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
            if i in fixed and hard and i < ncol:  # shape lists: cut between whole shapes
                return min(natural[i], max(len(self.headers[i]), SOFT_SHAPES))
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
        fixed_cols = set(self.fixed or ())

        def fit(s: str, i: int, lvl: int = 0) -> str:
            cw = w[i]
            pad = "  " * lvl if i == 0 else ""
            room = cw - len(pad)
            if len(s) > room:
                s = shorten_path(s, room) if i in paths else \
                    clip_items(s, room) if i in fixed_cols else clip_end(s, room)
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
            cls = " ".join(x for x in ("r" if self._align(i) == "r" else "l", cell.css or "")
                           if x)
            attrs = f' class="{cls}"'
            if cell.title:
                attrs += f' title="{esc(cell.title)}"'
            return f"<{tag}{attrs}>{esc(cell.text)}</{tag}>"

        parts = []
        if self.title:
            parts.append(f'<div class="tm-title">{esc(self.title)}</div>')
        parts.append('<table class="tm-table"><thead><tr>')
        parts.extend(td(h, i, "th") for i, h in enumerate(self.headers))
        parts.append("</tr></thead><tbody>")
        for r, row in enumerate(self.rows):
            css = self.row_css[r] if self.row_css and r < len(self.row_css) else None
            row_cls = {"tm-bad": "tm-row-bad", "tm-muted": "tm-row-muted",
                       "tm-good": "tm-row-good"}.get(css or "", css)
            parts.append(f'<tr class="{row_cls}">' if row_cls and row_cls != "tm-row-bad"
                         else "<tr>")
            for i, c in enumerate(row):
                cell_html = td(c, i)
                style = []
                if i == 0 and self.indent and self.indent[r]:
                    style.append(f"padding-left:{14 * self.indent[r] + 10}px")
                if i == 0 and row_cls == "tm-row-bad":
                    cell_html = cell_html.replace('class="', 'class="tm-row-bad ', 1)
                if style:
                    cell_html = cell_html.replace("<td", f'<td style="{";".join(style)}"', 1)
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
        body = "".join(parts)
        return page(body) if wrap else inline_styles(f"<div>{body}</div>")


def note_html(note: str, css: str = "") -> str:
    """A note line as HTML: ``WARNING``/``NOTE`` lines in the warning box, code (lines indented
    by four spaces) as preformatted text, anything else as a plain line."""
    if note.startswith("    "):
        return f'<pre class="tm-pre">{esc(note[4:])}</pre>'
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
            out.append(f'<pre class="tm-pre">{esc(chr(10).join(code))}</pre>')
            code = []
        if n is not None:
            out.append(note_html(n))
    return "".join(out)


def page(body_html: str, css: str = "") -> str:
    """A result's whole HTML: the ``tm-result`` box, the theme style (plus ``css``), the body,
    with every ``tm-*`` class also written as an inline style (see the module docstring)."""
    return inline_styles(f'<div class="tm-result">{CSS}{css}{body_html}</div>')


def html_block(title: str | None, body_html: str) -> str:
    """Wrap arbitrary HTML in the shared style (for results that are not a single table)."""
    head = f'<div class="tm-title">{esc(title)}</div>' if title else ""
    return page(head + body_html)


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
