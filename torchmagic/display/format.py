"""Numbers formatted for people: 124.4 M, 16.1 GFLOPs, 1.2 GiB (exact values go in titles)."""

from __future__ import annotations

import html as _html
import re


def human_count(n: float | int | None, digits: int = 1) -> str:
    """``124439808 -> '124.4 M'``; small numbers are shown whole (``'9,536'``)."""
    if n is None:
        return "-"
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 10_000:
        return f"{sign}{int(n):,}" if n == int(n) else f"{sign}{n:.{digits}f}"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{sign}{n / scale:.{digits}f} {unit}"
    return f"{sign}{n:.0f}"


def count_with_human(n: int) -> str:
    """``"124,439,808 (124.4 M)"``; small counts once: ``"8"``."""
    short = human_count(n)
    return f"{n:,}" if short == f"{n:,}" else f"{n:,} ({short})"


def human_flops(n: float | int | None, unit: str = "FLOPs") -> str:
    """``16.1 GFLOPs``, ``3.2 MFLOPs``, ``0 FLOPs``."""
    if n is None:
        return "-"
    n = float(n)
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {prefix}{unit}"
    return f"{int(n)} {unit}"


def human_bytes(n: float | int | None) -> str:
    """Binary units: ``1.2 GiB``, ``512.0 KiB``, ``12 B``."""
    if n is None:
        return "-"
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.1f} {unit}"
    return f"{sign}{int(n)} B"


def exact(n: float | int | None) -> str:
    """Exact value with thousands separators, for titles/hover."""
    if n is None:
        return ""
    return f"{int(n):,}" if float(n) == int(n) else f"{n:,}"


def esc(s: object) -> str:
    """HTML-escape any value."""
    return _html.escape(str(s), quote=True)


def percent(part: float, whole: float) -> str:
    if not whole:
        return "-"
    return f"{100.0 * part / whole:.1f}%"


_NUMBER = re.compile(r"^[-+(~]?\d[\d.,]*$")
_UNIT = re.compile(r"^(ns|us|µs|ms|s|B|KiB|MiB|GiB|TiB|PiB|KB|MB|GB|TB|[KMGTP]?FLOPs|[KMGTP]|"
                   r"ops|calls|params|tensors)[),.;:]*$")


def _keep_units(words: list[str]) -> list[str]:
    """Words with each number joined to the unit after it (one unbreakable word)."""
    out: list[str] = []
    for word in words:
        if out and _UNIT.match(word) and _NUMBER.match(out[-1]):
            out[-1] = f"{out[-1]} {word}"
        else:
            out.append(word)
    return out


def wrap_text(line: str, width: int | None = None, indent: str = "    ") -> list[str]:
    """One line as lines of at most ``width`` columns (default :func:`text_width`), broken at
    spaces only: a word, a number or a path is never split, nor a number from its unit
    (``113 ms``, ``1.2 GiB``, ``3.5 MFLOPs``); a single word longer than the width stays whole on
    its own line. Continuation lines start with the line's own leading spaces
    plus ``indent``. A line that fits is returned unchanged."""
    width = width or text_width()
    if len(line) <= width:
        return [line]
    lead = line[: len(line) - len(line.lstrip(" "))]
    words = _keep_units(line[len(lead):].split(" "))
    out: list[str] = []
    cur = lead
    fresh = True  # nothing but indentation on the current line yet
    for word in words:
        if not fresh and len(cur) + 1 + len(word) > width:
            out.append(cur.rstrip(" "))
            cur, fresh = lead + indent, True
        if fresh:
            cur += word
            fresh = not word  # runs of spaces: keep going without a separator
        else:
            cur += " " + word
    out.append(cur.rstrip(" "))
    return out


def wrap_line(line: str, width: int | None = None, indent: str = "    ") -> list[str]:
    """Alias of :func:`wrap_text` (kept for renderers written against it)."""
    return wrap_text(line, width, indent)


def wrap_lines(text: str, width: int | None = None, indent: str = "    ") -> str:
    """Every line of ``text`` wrapped with :func:`wrap_text`; returns the joined text."""
    width = width or text_width()
    return "\n".join(x for line in text.split("\n") for x in wrap_text(line, width, indent))


def percent_of(part: float, whole: float, digits: int = 3) -> str:
    """``part`` as a percentage of ``whole`` with ``digits`` significant digits, never rounded to
    ``0%`` or ``100%`` unless it is exactly that: 49,151 of 49,152 -> ``"99.998%"``, not
    ``"100%"``; 1 of 10**9 -> ``"1e-07%"``. ``"-"`` when ``whole`` is 0."""
    if not whole:
        return "-"
    p = 100.0 * part / whole
    if part == whole or part == 0:
        return f"{p:.{max(digits - 3, 0) or 0}f}%" if part else "0%"
    import math

    lead = math.floor(math.log10(abs(p))) if p else 0
    decimals = max(0, digits - 1 - lead)
    for d in range(decimals, decimals + 12):
        s = f"{p:.{d}f}"
        if 0 < abs(float(s)) < 100:
            return s + "%"
    return f"{p:.{digits}g}%"


def clip_end(s: str, width: int) -> str:
    """``s`` cut to ``width`` characters, ending in "…" when cut."""
    return s if len(s) <= width else s[: max(width - 1, 0)] + "…"


def clip_items(s: str, width: int) -> str:
    """A list of shapes ``(2, 16, 64), (2, 1, 16, 16), (1, 16)`` within ``width`` characters,
    cut between whole items with the count left out: ``(2, 16, 64), +2``; an item is never cut
    in its middle unless even the first one does not fit (then :func:`clip_end`)."""
    if len(s) <= width:
        return s
    items: list[str] = []
    depth = start = 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(s[start:i].strip())
            start = i + 1
    items.append(s[start:].strip())
    for keep in range(len(items) - 1, 0, -1):
        text = ", ".join(items[:keep]) + f", +{len(items) - keep}"
        if len(text) <= width:
            return text
    return clip_end(s, width)


def shorten_path(path: str, width: int) -> str:
    """A dotted module path within ``width`` characters that still tells rows apart: numbered
    parts (``17`` in ``layers.17.mlp``), the last name and, while possible, the first name
    (``encoder`` or ``decoder``) are kept; the names between go first
    (``model.….17.post_attention_layernorm``), then the last name is cut at its end, then the
    first name goes too. Only when even that does not fit is the path cut in its middle."""
    if len(path) <= width:
        return path
    parts = path.split(".")
    if len(parts) == 1:
        return clip_end(path, width)
    shown: list[str | None] = list(parts)

    def joined() -> str:
        out: list[str] = []
        for p in shown:
            if p is None:
                if not out or out[-1] != "…":
                    out.append("…")
            else:
                out.append(p)
        return ".".join(out)

    def give_back() -> str:
        # put back what still fits, the parts nearest the leaf first
        for j in range(len(parts) - 2, -1, -1):
            if shown[j] is None:
                shown[j] = parts[j]
                if len(joined()) > width:
                    shown[j] = None
        return joined()

    def cut_last(min_keep: int) -> str | None:
        s, last = joined(), parts[-1]
        keep = len(last) - (len(s) - width) - 1
        if keep >= min(min_keep, len(last) - 1) and keep >= 1:
            return s[: len(s) - len(last)] + last[:keep] + "…"
        return None

    for i in range(1, len(parts) - 1):  # the names between the first and the last
        if not parts[i].isdigit():
            shown[i] = None
            if len(joined()) <= width:
                return give_back()
    out = cut_last(8)
    if out is not None:
        return out
    if not parts[0].isdigit():
        shown[0] = None
        if len(joined()) <= width:
            return give_back()
    out = cut_last(3)
    if out is not None:
        return out
    if width >= 8:  # both ends of the full path
        head = (width - 1) // 3
        return path[:head] + "…" + path[len(path) - (width - 1 - head):]
    return clip_end(path, width)


DEFAULT_WIDTH = 100  # columns of text output when no terminal width is known (notebooks, files)


def text_width(default: int = DEFAULT_WIDTH) -> int:
    """Columns available to plain-text output: the terminal's width in terminal IPython or a
    script on a TTY (``shutil.get_terminal_size``, which honours ``$COLUMNS``), else ``default``
    (a notebook's ``text/plain`` is shown in a scrolling box, where 100 columns read well).
    Never less than 60."""
    import os
    import shutil
    import sys

    cols = os.environ.get("COLUMNS")
    if cols and cols.isdigit():
        return max(60, int(cols))
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    in_kernel = shell is not None and getattr(shell, "kernel", None) is not None
    if not in_kernel and sys.stdout is not None and sys.stdout.isatty():
        return max(60, shutil.get_terminal_size((default, 24)).columns)
    return default
