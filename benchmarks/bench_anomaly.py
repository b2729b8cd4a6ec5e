"""Overhead of ``%%detect_anomaly``'s forward locator, with torch's ``detect_anomaly`` beside it.

Goal (issue 4): the forward locator costs <= 1.5x a plain forward on a GPT-2-small-like model on CPU.
Default model: GPT-2-small's width, heads and vocabulary (d=768, 12 heads, vocab 50257) with fewer
layers (4 instead of 12) and batch 1 x 128 tokens, so the whole run stays under a minute on a small
shared machine; ``--layers 12`` runs the full depth. The per-layer cost is the same, so the ratio
does not depend on depth much. Ratios are measured in the same run (median of ``--repeat``).

    .venv/bin/python benchmarks/bench_anomaly.py [--layers 4] [--seq 128] [--repeat 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from torchmagic.core.anomaly import find_anomaly
from torchmagic.models import GPT, GPTConfig


def timed(fns: list[Callable[[], object]], repeat: int) -> list[float]:
    """Median seconds of each function, measured round-robin (one run of each per round), so a
    load spike on the shared machine hits every variant alike instead of one block of runs."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=a.layers, n_head=12, d_model=768)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))
    params = sum(p.numel() for p in model.parameters())
    print(f"GPT d=768 heads=12 vocab=50257 layers={a.layers} ({params / 1e6:.1f} M params), "
          f"input {a.batch}x{a.seq}, {a.threads} threads, median of {a.repeat}")

    def fwd() -> object:
        return model(idx)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(idx).float().logsumexp(-1).mean().backward()

    def torch_anomaly(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.autograd.detect_anomaly(check_nan=True):
                    return fn()
        return run

    def ours(fn: Callable[[], object], backward: bool) -> Callable[[], object]:
        def run() -> object:
            rep = find_anomaly(fn, namespace={"model": model}, backward=backward)
            assert rep.clean, str(rep)
            return rep
        return run

    plain_f, ours_f, torch_f = timed([fwd, ours(fwd, backward=False), torch_anomaly(fwd)],
                                     a.repeat)
    plain_fb, ours_fb, torch_fb = timed(
        [fwd_bwd, ours(fwd_bwd, backward=True), torch_anomaly(fwd_bwd)], a.repeat)
    rep = find_anomaly(fwd, namespace={"model": model}, backward=False)

    print(f"{'':44}{'time':>10}{'ratio':>9}")
    rows = [
        ("plain forward", plain_f, plain_f),
        ("forward locator (find_anomaly, fwd only)", ours_f, plain_f),
        ("torch detect_anomaly(check_nan) forward", torch_f, plain_f),
        ("plain forward+backward", plain_fb, plain_fb),
        ("find_anomaly forward+backward", ours_fb, plain_fb),
        ("torch detect_anomaly(check_nan) fwd+bwd", torch_fb, plain_fb),
    ]
    for name, t, ref in rows:
        print(f"{name:44}{t * 1e3:8.1f}ms{t / ref:8.2f}x")
    print(f"forward ops checked per forward: {rep.forward_ops}")
    verdict = "meets" if ours_f / plain_f <= 1.5 else "MISSES"
    print(f"forward locator overhead {ours_f / plain_f:.2f}x: {verdict} the <= 1.5x goal")


if __name__ == "__main__":
    main()
