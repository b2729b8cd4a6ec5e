"""Run every benchmark, one after the other, each in its own process (``bash scripts/dev.sh bench``).

Each script prints its own table of ratios against the reference it names, measured in the same run
(torchinfo, a plain forward, a bare meta run, an empty cell). Timings are never asserted in tests.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_summary.py", "bench_meta.py", "bench_anomaly.py", "bench_gpumem.py",
           "hf_sweep.py", "bench_estimate.py", "bench_tensors.py", "bench_compile.py"]


def main(names: list[str]) -> int:
    failed = []
    for name in names or SCRIPTS:
        print(f"\n### {name}\n", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / name)])
        print(f"[{name}: exit {rc}, {time.perf_counter() - t0:.1f} s]", flush=True)
        if rc:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
