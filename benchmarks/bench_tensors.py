"""``%tensors`` on big namespaces (goal: under a second, whatever the namespace holds) and the cost of
the safe tensor access (:mod:`torchmagic.core.access`) that every generic read goes through.

Namespaces: (a) 2,000 slices of one tensor beside 20 models of 100 layers (the storage index keeps
the view-of search linear); (b) a 10**10-element broadcast view and an 8 GiB-shaped overlapping
view (read from the memory they have); (c) a tensor of FLAG_BUDGET_BYTES and (d) a 1 GiB float tensor (the NaN/Inf
flags read at most FLAG_BUDGET_BYTES in all). The reference measured in the same run is one ``torch.isnan(t).any()`` pass over
the budget's worth of memory: the flags' floor.

    .venv/bin/python benchmarks/bench_tensors.py
"""

from __future__ import annotations

import time


def _best(fn, n: int = 3) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main() -> None:
    import torch
    import torch.nn as nn

    from torchmagic.core import access
    from torchmagic.core.tensor import tensors
    from torchmagic.core.tensor_stats import FLAG_BUDGET_BYTES

    torch.manual_seed(0)
    models = {f"m{i}": nn.Sequential(*[nn.Linear(2, 2) for _ in range(100)]) for i in range(20)}
    base = torch.zeros(3000)
    many = {**models, **{f"t{i}": base[i:i + 1] for i in range(2000)}, "whole": base}
    views = {"big": torch.zeros(1).expand(10**10),
             "win": torch.zeros(10**6).unfold(0, 2 * 10**5, 1)}
    budget = {"w": torch.randn(FLAG_BUDGET_BYTES // 4 // 1024, 1024)}  # exactly the budget
    large = {"w": torch.randn(256, 1024, 1024)}  # 1 GiB: beyond the budget, "not checked"
    ref_tensor = torch.randn(FLAG_BUDGET_BYTES // 4)
    ref = _best(lambda: torch.isnan(ref_tensor).any())
    rows = []
    for label, ns in (("2,000 slices + 20x100-layer models", many),
                      ("broadcast 10**10 + overlapping unfold", views),
                      (f"one {FLAG_BUDGET_BYTES >> 20} MiB tensor (the flag budget)", budget),
                      ("one 1 GiB tensor (beyond it: not checked)", large)):
        tensors(ns)  # warm up
        rows.append((label, _best(lambda ns=ns: tensors(ns))))
    t = torch.randn(1000)
    per_kind = _best(lambda: [access.kind(t) for _ in range(10_000)]) / 10_000
    print(f"{'namespace':46} {'%tensors':>10} {'goal':>8}")
    for label, sec in rows:
        print(f"{label:46} {sec * 1000:8.1f} ms {'<= 1 s':>8} {'ok' if sec <= 1 else 'OVER'}")
    print(f"reference: isnan().any() over {FLAG_BUDGET_BYTES >> 20} MiB: {ref * 1000:.1f} ms; "
          f"the budget row / reference: {rows[2][1] / ref:.2f}x (isnan and isinf: about 2x)")
    print(f"access.kind() per tensor: {per_kind * 1e6:.2f} us")


if __name__ == "__main__":
    main()
