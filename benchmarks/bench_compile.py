"""``%compile``: the cost of ``--explain`` against ``torch._dynamo.explain`` alone, and the eager vs
compiled table of a GPT-style decoder on CPU (what ``--bench`` measures).

1. ``--explain`` on the GPT decoder (``torchmagic.models.GPT``; default d=256, 4 layers, 4 heads,
   batch 4 x 128 tokens) against ``torch._dynamo.explain(model)(ids)`` on the same model and input,
   round-robin, median of ``--repeat``. Goal (issue 14): <= 1.2x.
2. ``explain_compile(model, ids, bench=True)`` with inductor, under ``torch.no_grad()`` (inference),
   for each ``--sizes`` entry: eager and compiled medians (``torch.utils.benchmark``, same thread
   count, after warm-up), speed-up, the first compiled call (compile + run) and the calls needed
   to repay it. Printed as the markdown table the README shows. Inductor compiles into a fresh,
   empty cache directory (``TORCHINDUCTOR_CACHE_DIR``), so the first call is what a user's first
   compile costs; ``--warm-cache`` keeps the machine's cache (what a rerun in a new kernel costs). ``--no-inductor`` skips it (each
   size compiles for 20-60 s on a small CPU machine).

    .venv/bin/python benchmarks/bench_compile.py [--repeat 5] [--threads 1] [--no-inductor]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
import warnings

import torch

from torchmagic.core.compile import explain_compile, speedup_text
from torchmagic.display.bench import human_time
from torchmagic.models import GPT, GPTConfig

SIZES = {  # name: (d_model, layers, heads, batch, seq)
    "tiny": (64, 2, 4, 2, 64),
    "small": (256, 4, 4, 4, 128),
    "medium": (512, 6, 8, 8, 256),
}


def describe(name: str) -> str:
    d, layers, _, batch, seq = SIZES[name]
    return f"d={d}, {layers} layers, {batch}x{seq} tokens"


def gpt(d: int, layers: int, heads: int, seq: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=1000, block_size=max(seq, 128), n_layer=layers, n_head=heads,
                         d_model=d))


def explain_overhead(repeat: int) -> None:
    d, layers, heads, batch, seq = SIZES["small"]
    model = gpt(d, layers, heads, seq)
    ids = torch.randint(0, 1000, (batch, seq))

    def ours() -> object:
        return explain_compile(model, ids, explain=True)

    def theirs() -> object:
        return torch._dynamo.explain(model)(ids)

    ours()
    theirs()  # warm-up: imports, first fake-tensor use
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(repeat):
        for name, fn in (("ours", ours), ("theirs", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    a, b = statistics.median(times["ours"]), statistics.median(times["theirs"])
    print(f"GPT d={d}, {layers} layers, input {batch}x{seq}; median of {repeat}, round-robin")
    print("| measurement | result | goal |")
    print("|---|---|---|")
    print(f"| `%compile --explain` / `torch._dynamo.explain` on the GPT decoder | {a / b:.2f}x "
          f"({human_time(a)} / {human_time(b)}) | <= 1.2x |")


def eager_vs_compiled(sizes: list[str], min_time: float) -> None:
    print()
    print(f"Eager vs inductor on CPU, inference (torch.no_grad()), {torch.get_num_threads()} "
          "threads, torch.utils.benchmark medians after warm-up:")
    print()
    print("| GPT decoder | eager | compiled | speed-up | first compiled call | pays off after |")
    print("|---|---|---|---|---|---|")
    for name in sizes:
        d, layers, heads, batch, seq = SIZES[name]
        model = gpt(d, layers, heads, seq)
        ids = torch.randint(0, 1000, (batch, seq))
        with torch.no_grad():
            report = explain_compile(model, ids, bench=True, min_time=min_time)
        t = report.timing
        be = t.break_even_calls
        pays = "never" if be is None else f"{math.ceil(be):,} calls"
        print(f"| {describe(name)} | {human_time(t.eager_median)} | {human_time(t.compiled_median)} | "
              f"{speedup_text(t)} | {human_time(t.first_call_seconds)} | {pays} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, loaded machine more threads "
                         "time OpenMP's waiting, not the model)")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--sizes", default=",".join(SIZES),
                    help=f"comma-separated, among {', '.join(SIZES)}")
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--warm-cache", action="store_true",
                    help="keep inductor's on-disk cache (default: a fresh empty one)")
    a = ap.parse_args()
    if not a.warm_cache:
        cold = tempfile.TemporaryDirectory(prefix="inductor-cold-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold.name  # read when inductor first compiles
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    explain_overhead(a.repeat)
    if not a.no_inductor:
        names = [s.strip() for s in a.sizes.split(",") if s.strip() in SIZES]
        eager_vs_compiled(names, a.min_time)


if __name__ == "__main__":
    main()
