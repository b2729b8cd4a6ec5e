"""Numbers formatted for people: 124.4 M, 16.1 GFLOPs, 1.2 GiB (exact values go in titles)."""

from __future__ import annotations

import html as _html


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


def wrap_line(line: str, width: int = 100, indent: str = "    ") -> list[str]:
    """Wrap one line at spaces so plain text stays within ``width`` columns; continuation lines
    start with ``indent``. Lines that fit (tables) are returned unchanged."""
    if len(line) <= width:
        return [line]
    out: list[str] = []
    cur = ""
    for word in line.split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            out.append(cur)
            cur = indent + word
        else:
            cur = f"{cur} {word}" if cur else word
    out.append(cur)
    return out


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
