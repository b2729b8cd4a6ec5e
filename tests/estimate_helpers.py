"""Test helpers shared by the estimate tests (not a test module)."""

from __future__ import annotations

import copy
import gc
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def free_reference_cycles() -> None:
    """Collect what the tests leave in reference cycles: fake twins and exception tracebacks,
    and the graphs a *plain* ``MemTracker`` (the tests' reference) keeps alive for good: its
    ``ModTracker`` registers ``register_multi_grad_hook`` closures that hold the ``grad_fn``
    nodes which hold them (a cycle through C++ the collector cannot see). Emptying those closures'
    ``grad_fns`` lists breaks it (torchmagic's own tracker does this itself)."""
    for obj in gc.get_objects():
        if type(obj) is types.FunctionType and obj.__name__ == "inner_hook" and \
                obj.__module__ == "torch.autograd.graph":
            for var, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
                if var == "grad_fns" and isinstance(cell.cell_contents, list):
                    cell.cell_contents.clear()
    gc.collect()


# ---------------------------------------------------------------------------------------------
# models of the test list (also measured by benchmarks/bench_estimate.py)
# ---------------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 256),
                         nn.GELU(), nn.Linear(256, 10))


class CheckpointNet(nn.Module):
    """A model that calls torch.utils.checkpoint itself."""

    def __init__(self, d: int = 64, hidden: int = 256, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(),
                                                  nn.Linear(hidden, d)) for _ in range(n))
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + checkpoint(b, x, use_reentrant=False)
        return self.head(x)


def ce_against_ids(out: object, ids: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.flatten(0, -2).float(), ids.flatten())


def mean_loss(out: torch.Tensor, _: object) -> torch.Tensor:
    return out.float().mean()



# ---------------------------------------------------------------------------------------------
# references: the same step measured for real, by torch's own counters
# ---------------------------------------------------------------------------------------------
REFS = {"parameters": "Parameter", "buffers": "Buffer", "gradients": "Gradient",
        "optimizer_state": "Optstate", "activations": "Activation", "temporaries": "Temp",
        "inputs": "Other"}


def warm_up(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> None:
    """One real optimizer step on zero gradients: the state exists as in any later step."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        p.grad = None


def real_peak(model: nn.Module, args: tuple, kwargs: dict, train: bool, loss_fn=None,
              optimizer=None, amp: torch.dtype | None = None, prepare=None) -> dict[str, int]:
    """MemTracker on real tensors: the same step, a real warm-up step first (training).
    ``prepare(copy)`` changes the copy first (e.g. wraps its blocks in checkpoint)."""
    m = copy.deepcopy(model)
    if prepare is not None:
        prepare(m)
    m.train(train)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = None
    if train:
        opt = (optimizer or (lambda ps: torch.optim.AdamW(ps, foreach=True)))(params)
        warm_up(params, opt)
    first = args[0] if args else next(iter(kwargs.values()))
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    mt = MemTracker()
    mt.track_external(*args, *kwargs.values())
    mt.track_external(m)
    if opt is not None:
        mt.track_external(opt)
    auto = torch.autocast("cpu", dtype=amp) if amp is not None else torch.autocast("cpu",
                                                                                  enabled=False)
    with mt, torch.set_grad_enabled(train):
        with auto:
            out = m(*args, **kwargs)
            if train:
                loss = loss_fn(out, first)
        if train:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
        del out
    snap = mt.get_tracker_snapshot("peak")[torch.device("cpu")]
    ref = {k: int(snap[_MemRefType(v)]) for k, v in REFS.items()}
    ref["total"] = int(snap["Total"])
    if opt is not None:
        # MemTracker files everything optimizer.step() allocates as optimizer state, its
        # temporaries too (Adam's sqrt of exp_avg_sq); the state is what optimizer.state holds
        # (all of it live at the peak: made by the warm-up step), the rest of it temporaries
        state = optimizer_state_bytes(opt)
        ref["temporaries"] += ref["optimizer_state"] - state
        ref["optimizer_state"] = state
    return ref


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``opt.state`` (each storage once)."""
    seen: dict[int, int] = {}
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                st = v.untyped_storage()
                seen[st.data_ptr() or id(st)] = st.nbytes()
    return sum(seen.values())


def real_cuda_peak(model: nn.Module, args: tuple, kwargs: dict, loss_fn) -> int:
    """``torch.cuda.max_memory_allocated()`` of the same real training step (AdamW, foreach,
    after a warm-up step), on the current CUDA device; what it allocated is freed after."""
    dev = torch.device("cuda")
    m = copy.deepcopy(model).to(dev).train()
    a = tuple(t.to(dev) for t in args)
    k = {n: t.to(dev) for n, t in kwargs.items()}
    opt = torch.optim.AdamW(m.parameters(), foreach=True)
    warm_up(list(m.parameters()), opt)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = m(*a, **k)
    loss = loss_fn(out, a[0] if a else next(iter(k.values())))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del loss, out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del m, opt, a, k
    gc.collect()
    torch.cuda.empty_cache()
    return peak
