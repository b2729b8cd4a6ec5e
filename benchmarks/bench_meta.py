"""Benchmark of ``meta_shape`` on a 7B-parameter decoder forward at sequence length 2048.

Goals (issue 3): wall time <= 2 s after the first meta op of the process, and <= 100 MB of added
peak RSS. Each case runs in a fresh subprocess: the child does one meta op first (kernel
registration, ~0.3 s, excluded as the goal says), resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), runs the case once, and reports wall time and peak RSS growth.

Cases:
- ``cell``: the cell builds ``Llama(Llama.config_7b())`` and runs the forward (nothing in the namespace);
- ``namespace``: the model is already in the namespace (built on meta), so it is twinned first;
- ``fake``: the ``cell`` case with ``fake=True`` (FakeTensorMode + ShapeEnv), for information;
- ``bare``: the same build + forward under a bare ``with torch.device("meta")`` (no torchmagic),
  the reference for the overhead of tracing, twins and state restoring.

Usage: ``python benchmarks/bench_meta.py`` (about 10 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

GOAL_SECONDS = 2.0
GOAL_MB = 100.0
CELL = ("model = Llama(Llama.config_7b())\n"
        "tokens = torch.randint(0, 32000, (1, 2048))\n"
        "logits = model(tokens)\n")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(case: str) -> None:
    import time

    import torch

    import torchmagic
    from torchmagic.models import Llama

    with torch.device("meta"):  # the first meta op of the process (excluded by the goal)
        torch.randn(4) + 1
    ns = {"torch": torch, "Llama": Llama}
    if case == "namespace":
        with torch.device("meta"):
            ns["model"] = Llama(Llama.config_7b())
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
            fh.write("5")
        peak_reset = True
    except OSError:
        peak_reset = False
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    if case == "bare":
        with torch.device("meta"):
            model = Llama(Llama.config_7b())
            logits = model(torch.randint(0, 32000, (1, 2048)))
        shape = tuple(logits.shape)
    elif case == "namespace":
        rep = torchmagic.meta_shape("logits = model(torch.randint(0, 32000, (1, 2048)))", ns)
        shape = rep.value("logits").shapes[0]
    else:
        rep = torchmagic.meta_shape(CELL, ns, fake=(case == "fake"))
        shape = rep.value("logits").shapes[0]
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    print(json.dumps({"case": case, "seconds": seconds, "added_mb": (peak - base) / 1024,
                      "peak_reset": peak_reset, "shape": [int(s) for s in shape]}))


def _run(case: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    results = [_run(case) for case in ("cell", "namespace", "fake", "bare")]
    bare = results[-1]
    print("7B decoder (Llama config_7b) forward, batch 1, seq 2048, each case in a fresh process")
    print(f"{'case':<10} {'wall s':>8} {'vs 2 s goal':>12} {'added peak MB':>14} "
          f"{'vs 100 MB goal':>15} {'vs bare meta':>13}  logits")
    for r in results:
        print(f"{r['case']:<10} {r['seconds']:8.3f} {r['seconds'] / GOAL_SECONDS:11.2f}x "
              f"{r['added_mb']:14.1f} {r['added_mb'] / GOAL_MB:14.2f}x "
              f"{r['seconds'] / bare['seconds']:12.2f}x  {tuple(r['shape'])}")
    if not all(r["peak_reset"] for r in results):
        print("note: /proc/self/clear_refs not writable: peak includes the process start")
    ok = all(r["seconds"] <= GOAL_SECONDS and r["added_mb"] <= GOAL_MB
             for r in results if r["case"] in ("cell", "namespace"))
    print("goals met" if ok else "GOALS MISSED")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        main()
