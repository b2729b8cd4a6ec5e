"""The tour of every magic, run in terminal IPython (``bash scripts/dev.sh tour``).

Reads ``examples/tour.ipy``: cells separated by lines starting with ``# %%``; a marker line
``# %% expect-error`` says the cell is meant to fail (it shows a one-line error). Each cell is run
by a real ``TerminalInteractiveShell`` and echoed as ``In [n]:`` with its output, as if typed.
Exits non-zero if an unexpected cell fails, so the tour doubles as a smoke test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def cells(text: str, with_volatile: bool = False) -> list[Any]:
    """``(source, expect_error)`` per cell (``(source, expect_error, volatile)`` with
    ``with_volatile``): a ``# %% volatile`` marker says the output holds this machine's timings
    or memory figures (examples/readme_tour.py compares such cells loosely)."""
    out: list[tuple[str, bool, bool]] = []
    cur: list[str] = []
    marker = ""
    for line in text.splitlines():
        if line.startswith("# %%"):
            if "".join(cur).strip():
                out.append(("\n".join(cur).strip("\n"), "expect-error" in marker,
                            "volatile" in marker))
            cur, marker = [], line
        else:
            cur.append(line)
    if "".join(cur).strip():
        out.append(("\n".join(cur).strip("\n"), "expect-error" in marker, "volatile" in marker))
    # A block of comments only (the file's header) is not a cell.
    kept = [c for c in out
            if any(line.strip() and not line.lstrip().startswith("#") for line in c[0].splitlines())]
    return kept if with_volatile else [(src, e) for src, e, _ in kept]


def main(path: Path = HERE / "tour.ipy", markdown: bool = False) -> int:
    """Run the tour; with ``markdown`` each cell and its output is one fenced block (for README)."""
    from IPython.terminal.interactiveshell import TerminalInteractiveShell

    shell = TerminalInteractiveShell.instance(colors="nocolor")
    failures = []
    for n, (src, expect_error) in enumerate(cells(path.read_text()), start=1):
        lines = src.splitlines()
        if markdown:
            print("\n```")
        print(f"{'' if markdown else chr(10)}In [{n}]: {lines[0]}")
        for line in lines[1:]:
            print(f"   ...: {line}")
        sys.stdout.flush()
        result = shell.run_cell(src, store_history=True)
        sys.stdout.flush()
        if markdown:
            print("```")
        if not result.success and not expect_error:
            failures.append(n)
        if result.success and expect_error:
            failures.append(n)
            print(f"[tour] cell {n} was expected to fail and did not")
    if failures:
        print(f"\n[tour] unexpected result in cells {failures}", file=sys.stderr)
        return 1
    print("\n[tour] every cell ran as expected")
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--markdown"]
    sys.exit(main(Path(args[0]) if args else HERE / "tour.ipy", markdown="--markdown" in sys.argv))
