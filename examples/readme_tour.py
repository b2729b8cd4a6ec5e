"""Keep the README's pasted tour output equal to what the code prints now.

The README shows some cells of ``examples/tour.ipy`` with their output, each as a fenced block that
starts with ``In [n]: <first line of the cell>``. This script runs the tour in terminal IPython at
100 columns (``COLUMNS=100 examples/tour.py --markdown``, errors interleaved as a terminal shows
them) and:

- ``python examples/readme_tour.py --update``: rewrites every such README block with the fresh
  output of the tour cell that has the same source (cell numbers follow the tour);
- ``python examples/readme_tour.py --check``: exits 1 and lists the blocks that differ (used by
  ``tests/test_readme.py``).

Volatile figures are compared loosely: durations, memory sizes, temporary paths, benchmark and
profiler tables of cells marked ``# %% volatile`` in the tour (timings of the machine that ran it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
WIDTH = 100
BLOCK = re.compile(r"```\n(In \[(\d+)\]: .*?)```", re.S)


@dataclass
class Block:
    number: int
    source: tuple[str, ...]   # the cell's lines as echoed ("In [n]: ..." / "   ...: ...")
    output: str               # what the cell printed
    volatile: bool = False


def _split(text: str) -> Block:
    lines = text.rstrip("\n").split("\n")
    n = int(re.match(r"In \[(\d+)\]: ", lines[0]).group(1))
    src = [lines[0].split(": ", 1)[1]]
    i = 1
    while i < len(lines) and lines[i].startswith("   ...: "):
        src.append(lines[i][len("   ...: "):])
        i += 1
    return Block(n, tuple(src), "\n".join(lines[i:]))


def readme_blocks(text: str) -> list[tuple[re.Match[str], Block]]:
    return [(m, _split(m.group(1))) for m in BLOCK.finditer(text)]


def tour_blocks(columns: int = WIDTH) -> list[Block]:
    """Run the tour (a subprocess) and return its cells with their output."""
    from tour import cells  # examples/tour.py

    env = {**os.environ, "COLUMNS": str(columns), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "tour.py"), "--markdown"], cwd=HERE.parent,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the tour failed:\n{proc.stdout[-3000:]}")
    blocks = [_split(m.group(1)) for m in BLOCK.finditer(proc.stdout)]
    volatile = [v for _, _, v in cells((HERE / "tour.ipy").read_text(), with_volatile=True)]
    for b in blocks:
        b.volatile = volatile[b.number - 1]
    return blocks


_LOOSE = [
    (re.compile(r"/tmp/[^/\s]+/"), "/tmp/…/"),
    (re.compile(r"\b\d+(\.\d+)? ?(s|ms|us|µs|ns)\b"), "<time>"),
    (re.compile(r"\b\d+(\.\d+)? ?(B|KiB|MiB|GiB|TiB|KB|MB|GB)\b"), "<bytes>"),
    (re.compile(r"[+-]?\d+(\.\d+)?%"), "<pct>"),
]


def loose(text: str, volatile: bool) -> str:
    """``text`` with its machine-dependent figures masked; of a volatile cell (timings, memory
    of this machine: which rows a profile lists varies too) only the first line counts, its
    numbers masked."""
    if volatile:
        text = text.strip().split("\n")[0]
    for pattern, repl in _LOOSE:
        text = pattern.sub(repl, text)
    if volatile:
        text = re.sub(r"\d+(\.\d+)?", "<n>", text)
    text = re.sub(r"[ =-]{2,}", " ", text)   # widths change with the masked figures
    return text.strip()


def _matches(readme: str, tour: list[Block]) -> list[tuple[re.Match[str], Block, Block | None]]:
    """Each README block with the tour cell of the same source (the next one in tour order
    after the previous match: a source can appear twice), or None."""
    out = []
    after = 0
    for m, b in readme_blocks(readme):
        fresh = next((t for t in tour if t.source == b.source and t.number > after), None)
        if fresh is None:
            fresh = next((t for t in tour if t.source == b.source), None)
        if fresh is not None:
            after = fresh.number
        out.append((m, b, fresh))
    return out


def compare(readme: str, tour: list[Block]) -> list[str]:
    """Problems: README blocks with no tour cell of the same source, or different output."""
    problems = []
    for _, b, fresh in _matches(readme, tour):
        if fresh is None:
            problems.append(f"README block In [{b.number}] ({b.source[0]!r}): no tour cell has "
                            "this source")
        elif loose(b.output, fresh.volatile) != loose(fresh.output, fresh.volatile):
            problems.append(f"README block In [{b.number}] ({b.source[0]!r}) differs from the "
                            f"tour's In [{fresh.number}]")
        elif b.number != fresh.number:
            problems.append(f"README block In [{b.number}] ({b.source[0]!r}) is the tour's "
                            f"In [{fresh.number}]")
    return problems


def update(readme: str, tour: list[Block]) -> str:
    out, last = [], 0
    for m, _, fresh in _matches(readme, tour):
        if fresh is None:
            continue
        lines = [f"In [{fresh.number}]: {fresh.source[0]}"]
        lines += [f"   ...: {s}" for s in fresh.source[1:]]
        body = "\n".join(lines) + ("\n" + fresh.output if fresh.output else "") + "\n"
        out.append(readme[last:m.start(1)] + body)
        last = m.end(1)
    out.append(readme[last:])
    return "".join(out)


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE))
    tour = tour_blocks()
    text = README.read_text()
    if "--update" in argv:
        README.write_text(update(text, tour))
        text = README.read_text()
    problems = compare(text, tour)
    for p in problems:
        print(p)
    if not problems:
        print(f"README tour blocks match the tour ({len(readme_blocks(text))} blocks)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
