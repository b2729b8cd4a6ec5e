"""Per-cell cost of ``%gpumem --watch`` (goal: <= 1 ms per cell without CUDA work).

Runs an empty cell N times in an IPython shell without and with ``--watch`` (stdout captured, so
terminal speed is not measured) and also times the two callbacks alone. Prints the overhead in ms
and the ratio against the empty-cell baseline measured in the same run.

    .venv/bin/python benchmarks/bench_gpumem.py [N]
"""

from __future__ import annotations

import contextlib
import io
import statistics
import sys
import time


def _per_cell(ip, n: int) -> float:
    """Median over 5 rounds of the mean seconds per ``run_cell('pass')``."""
    rounds = []
    for _ in range(5):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            t0 = time.perf_counter()
            for _ in range(n):
                ip.run_cell("pass", store_history=True)
            rounds.append((time.perf_counter() - t0) / n)
    return statistics.median(rounds)


def main(n: int = 300) -> None:
    import torch  # noqa: F401  (imported before timing, like in a real session)
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython()
    ip.run_line_magic("load_ext", "torchmagic")
    _per_cell(ip, 20)  # warm up
    base = _per_cell(ip, n)
    with contextlib.redirect_stdout(io.StringIO()):
        ip.run_line_magic("gpumem", "--watch")
    _per_cell(ip, 20)
    watched = _per_cell(ip, n)
    from torchmagic.magics.memory import GpumemMagics

    w = next(i for i in ip._torchmagic_state["instances"] if isinstance(i, GpumemMagics)).watcher
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        for _ in range(n):
            w.pre_run_cell(None)
            w.post_run_cell(None)
        pair = (time.perf_counter() - t0) / n
        ip.run_line_magic("gpumem", "--unwatch")
    overhead = watched - base
    print(f"empty cell, no watch : {base * 1e3:8.3f} ms/cell")
    print(f"empty cell, --watch  : {watched * 1e3:8.3f} ms/cell  "
          f"(ratio {watched / base:.2f}x the baseline)")
    print(f"--watch overhead     : {overhead * 1e3:8.3f} ms/cell  (goal <= 1 ms: "
          f"{'met' if overhead <= 1e-3 else 'NOT met'})")
    print(f"callbacks alone      : {pair * 1e3:8.3f} ms/cell  (pre_run_cell + post_run_cell)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
