"""What would change a memory verdict: alternatives, each with its own estimated peak, the largest
batch that fits (by bisection on fake tensors), and sharding of model states over N GPUs.

Each alternative traces again only what its change alters (``Alternative.how``):

- bf16 weights change every tensor: the whole step is traced again (``"traced"``);
- autocast, activation checkpointing and a smaller batch change the activations, not the optimizer
  step, whose state and temporaries depend only on the parameters, gradients and state: forward,
  loss and backward are traced without an optimizer, and the step's bytes (:class:`StepCost`) come
  from the first trace (``"step from base"``, :func:`peak_with_step`); the batch search does the
  same for each batch it tries;
- SGD without momentum keeps the first trace's forward and backward and replaces its optimizer
  state and step by SGD's, traced alone on fake parameters (``"optimizer swapped"``,
  :func:`peak_with_optimizer`).

Both derivations give exactly the peak of the whole step traced with the change (the tests compare
them on models whose peak is in backward and in the optimizer step). Sharding (FSDP / ZeRO-3,
``"arithmetic"``) is a model, computed on the traced timeline: at every moment the parameters,
gradients and optimizer state (and the optimizer step's temporaries, made from the sharded state)
are divided by N and one all-gathered block is added (its parameters, and in training its unsharded
gradients); activations and the other temporaries stay.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core.errors import TorchMagicError
from torchmagic.core.estimate_setup import optimizer_spec, repeated_blocks
from torchmagic.core.estimate_trace import KINDS, PHASES, StepSpec, Trace

Progress = Callable[[dict[str, Any]], None]


@dataclass
class Alternative:
    """One change and the peak it gives (bytes). ``traced``: from traces on fake tensors (else
    arithmetic); ``how``: which (a key of :data:`HOW`: ``"traced"`` whole, ``"step from base"``,
    ``"optimizer swapped"``, ``"arithmetic"``); ``fits``: against the capacity (None without
    one); ``option``: how to ask for it."""

    change: str
    option: str
    peak_bytes: int
    fits: bool | None = None
    traced: bool = True
    note: str = ""
    how: str = "traced"


# ---------------------------------------------------------------------------------------------
# batch size
# ---------------------------------------------------------------------------------------------
def batch_size(args: tuple[Any, ...], kwargs: dict[str, Any], dim: int = 0) -> int | None:
    """Size of dimension ``dim`` (the batch dimension) of the first input tensor that has it
    (None: no such tensor)."""
    from torch.utils._pytree import tree_flatten

    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, torch.Tensor) and t.dim() > dim:
            return int(t.shape[dim])
    return None


def with_batch(args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, dim: int = 0
               ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs with dimension ``dim`` set to ``batch`` on every tensor whose size there is
    the batch size (others unchanged; resized ones are meta tensors). Raises
    :class:`TorchMagicError` without a batch dimension."""
    from torch.utils._pytree import tree_map

    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise TorchMagicError(f"batch must be a whole number >= 1; got {batch!r}")
    old = batch_size(args, kwargs, dim)
    if old is None:
        raise TorchMagicError(f"the inputs have no batch dimension (no input has a dimension "
                              f"{dim}): give inputs of shape (batch, ...) to change or search "
                              "the batch")

    memo: dict[int, torch.Tensor] = {}

    def resize(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > dim and t.shape[dim] == old:
            if id(t) not in memo:   # a tensor given twice stays one
                shape = list(t.shape)
                shape[dim] = batch
                memo[id(t)] = torch.empty(shape, dtype=t.dtype, device="meta",
                                          requires_grad=t.requires_grad)
            return memo[id(t)]
        return t

    return tree_map(resize, (args, kwargs))


def search_max_batch(peak_at: Callable[[int], int], usable: int, start: int, start_peak: int,
                     progress: Progress | None = None, limit: int = 1 << 24,
                     max_trials: int = 24) -> tuple[int, list[tuple[int, int]]]:
    """The largest batch whose peak fits in ``usable`` bytes, and every (batch, peak) tried.

    ``peak_at(b)`` traces batch ``b``. The peak grows (nearly) linearly with the batch, so each
    guess interpolates between the nearest batch known to fit and the nearest known not to fit;
    every other guess is the plain midpoint, so the search stays logarithmic. 0: even batch 1
    does not fit."""
    known: dict[int, int] = {start: start_peak}
    trials: list[tuple[int, int]] = [(start, start_peak)]

    def measure(b: int) -> int:
        p = peak_at(b)
        known[b] = p
        trials.append((b, p))
        if progress is not None:
            progress({"stage": "max-batch", "batch": b, "peak": p, "fits": p <= usable,
                      "trial": len(trials) - 1})
        return p

    def predict(lo: int, hi: int | None) -> tuple[int, bool]:
        """(guess, True when interpolated between two traced batches)."""
        a, b = (lo, known[lo]), None
        if hi is not None:
            b = (hi, known[hi])
        else:
            others = [(x, p) for x, p in known.items() if x != lo]
            if others:
                b = min(others, key=lambda xp: abs(xp[0] - lo))
        if b is None or b[1] == a[1] or b[0] == a[0]:
            return lo * 2, False
        slope = (b[1] - a[1]) / (b[0] - a[0])
        if slope <= 0:
            return lo * 2, False
        return int(math.floor(a[0] + (usable - a[1]) / slope)), True

    lo: int | None = start if start_peak <= usable else None
    hi: int | None = None if start_peak <= usable else start
    if lo is None:
        if start == 1 or measure(1) > usable:
            return 0, trials
        lo = 1
    # grow until a batch does not fit
    while hi is None:
        if lo >= limit or len(trials) >= max_trials:
            return lo, trials
        guess, interpolated = predict(lo, None)
        guess = min(max(guess, lo + 1), lo * 64, limit)
        if measure(guess) <= usable:
            lo = guess
            # an interpolated guess that fits is usually the answer: the next batch settles it
            if interpolated and lo < limit:
                if measure(guess + 1) > usable:
                    hi = guess + 1
                else:
                    lo = guess + 1
        else:
            hi = guess
    # narrow the bracket: interpolate; after a good guess check its neighbour; every third
    # guess a midpoint, so a poor interpolation cannot stall the search
    step = 0
    neighbour: int | None = None
    while hi - lo > 1 and len(trials) < max_trials:
        if neighbour is not None:
            guess, neighbour = neighbour, None
        elif step % 3 == 2:
            guess = (lo + hi) // 2
        else:
            guess = predict(lo, hi)[0]
        guess = min(max(guess, lo + 1), hi - 1)
        step += 1
        if measure(guess) <= usable:
            lo = guess
            neighbour = guess + 1
        else:
            hi = guess
            neighbour = guess - 1
    return lo, trials


# ---------------------------------------------------------------------------------------------
# sharding arithmetic
# ---------------------------------------------------------------------------------------------
def gathered_block_bytes(model: nn.Module, dtype: torch.dtype | None) -> tuple[int, str]:
    """Bytes of the unit FSDP all-gathers at once: the largest repeated block (else the whole
    model), in ``dtype`` when the weights are cast."""
    found = repeated_blocks(model)
    mods = [found[1][0]] if found else [model]
    label = f"one block ({type(mods[0]).__name__})" if found else "the whole model (no repeated " \
        "blocks to wrap)"
    total = 0
    seen: set[int] = set()
    for m in mods:
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            size = torch.empty((), dtype=dtype).element_size() if (
                dtype is not None and p.is_floating_point()) else p.element_size()
            total += p.numel() * size
    return total, label


def sharded_peak(samples: list[tuple[int, ...]], shards: int, gathered: int,
                 train: bool) -> int:
    """The peak when parameters, gradients and optimizer state are split over ``shards`` GPUs:
    max over the timeline of (model states / N + everything else) + the gathered block. The
    optimizer step's temporaries are made from the sharded state (Adam's sqrt of ``exp_avg_sq``):
    / N too."""
    i_par, i_grad, i_opt, i_tmp = (2 + KINDS.index(k) for k in
                                   ("parameters", "gradients", "optimizer_state", "temporaries"))
    step = PHASES.index("optimizer step")
    best = 0
    for s in samples:
        states = s[i_par] + s[i_grad] + s[i_opt] + (s[i_tmp] if s[0] == step else 0)
        value = s[1] - states + math.ceil(states / shards)
        best = max(best, value)
    return best + gathered * (2 if train else 1)


def sharding_alternative(trace: Trace, model: nn.Module, dtype: torch.dtype | None, train: bool,
                         usable: int | None) -> Alternative | None:
    """FSDP/ZeRO-3 over the fewest GPUs (2, 4, 8 ... 1024) that make it fit (8 without a
    capacity); None when sharding cannot make it fit."""
    gathered, label = gathered_block_bytes(model, dtype)
    note = (f"arithmetic, not traced: parameters, gradients and optimizer state / N, plus "
            f"{label} all-gathered")
    if usable is None:
        n = 8
        return Alternative(f"FSDP / ZeRO-3 over {n} GPUs", "fully_shard / ZeRO-3",
                           sharded_peak(trace.samples, n, gathered, train), None, False, note,
                           how="arithmetic")
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        peak = sharded_peak(trace.samples, n, gathered, train)
        if peak <= usable:
            return Alternative(f"FSDP / ZeRO-3 over {n} GPUs", "fully_shard / ZeRO-3", peak, True,
                               False, note, how="arithmetic")
    return None


def unsharded_bytes(samples: list[tuple[int, ...]]) -> int:
    """The most bytes live at once that sharding does not divide: activations, temporaries (but
    the optimizer step's), buffers and inputs."""
    i_par, i_grad, i_opt, i_tmp = (2 + KINDS.index(k) for k in
                                   ("parameters", "gradients", "optimizer_state", "temporaries"))
    step = PHASES.index("optimizer step")
    return max((s[1] - s[i_par] - s[i_grad] - s[i_opt] - (s[i_tmp] if s[0] == step else 0)
                for s in samples), default=0)


def sharding_note(trace: Trace, model: nn.Module, dtype: torch.dtype | None, train: bool,
                  usable: int | None, fits: bool | None) -> str | None:
    """Why no number of GPUs (up to 1024) makes the step fit, from the figures (None when there
    is nothing to explain: no capacity, no usable memory, or the step fits as it is)."""
    if usable is None or usable <= 0 or fits is not False:
        return None
    from torchmagic.display.format import human_bytes

    gathered, label = gathered_block_bytes(model, dtype)
    rest = unsharded_bytes(trace.samples)
    block = gathered * (2 if train else 1)
    return (f"sharding over up to 1024 GPUs does not make it fit: what no sharding divides "
            f"(activations, temporaries, buffers and inputs: up to {human_bytes(rest)}) plus "
            f"{label} all-gathered{' with its gradients' if train else ''} "
            f"({human_bytes(block)}) already exceed the usable {human_bytes(usable)}"
            if rest + block > usable else
            f"sharding over up to 1024 GPUs does not make it fit in the usable "
            f"{human_bytes(usable)}: a 1024th of the model states on each GPU, with what no "
            f"sharding divides (up to {human_bytes(rest)}) and {label} all-gathered, is still more")


# ---------------------------------------------------------------------------------------------
# traced alternatives
# ---------------------------------------------------------------------------------------------
_ADAPTIVE = {"Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop", "Adadelta",
             "Adafactor", "SparseAdam", "ASGD", "Rprop"}


def candidate_changes(spec: StepSpec, weights_dtype: torch.dtype, batch: int | None,
                      has_blocks: bool) -> list[tuple[str, str, StepSpec, int | None]]:
    """(change, option, spec, batch) for each alternative worth tracing for ``spec``."""
    out: list[tuple[str, str, StepSpec, int | None]] = []
    effective = spec.dtype or weights_dtype
    if effective in (torch.float32, torch.float64):
        out.append(("bf16 weights" + (" and optimizer state" if spec.train else ""),
                    "--dtype bf16", dataclasses.replace(spec, dtype=torch.bfloat16, amp=None),
                    batch))
        if spec.amp is None:
            out.append(("autocast bf16 (weights stay float32)", "--amp bf16",
                        dataclasses.replace(spec, amp=torch.bfloat16), batch))
    if spec.train and not spec.checkpointing and has_blocks:
        out.append(("activation checkpointing of each block", "--checkpointing",
                    dataclasses.replace(spec, checkpointing=True), batch))
    if spec.train and spec.optimizer is not None and spec.optimizer.cls is not None and (
            spec.optimizer.cls.__name__ in _ADAPTIVE or spec.optimizer.kwargs.get("momentum")):
        out.append(("SGD without momentum: no optimizer state", "--optimizer sgd",
                    dataclasses.replace(spec, optimizer=optimizer_spec("sgd")), batch))
    if batch is not None and batch >= 2:
        out.append((f"batch {batch // 2} (half)", f"--batch {batch // 2}", spec, batch // 2))
    return out


# ---------------------------------------------------------------------------------------------
# what the optimizer step adds: measured once, reused where the step is the same
# ---------------------------------------------------------------------------------------------
@dataclass
class StepCost:
    """What one optimizer step adds to a training step (bytes): ``state``, present throughout (as
    in any step after the first), and ``excess``, the most the step itself holds above the level
    at which it starts (its temporaries: Adam's sqrt of ``exp_avg_sq``; 0 for an in-place step).
    Both depend only on the parameters, gradients and state (their shapes and dtypes), never on
    the activations: the step reads and writes nothing else."""

    state: int
    excess: int


def step_cost(trace: Trace) -> StepCost | None:
    """The :class:`StepCost` of a traced training step (None: no optimizer step in it), from the
    sample when backward ended (state included) and the step's own samples."""
    if trace.step_start is None or trace.backward_end is None:
        return None
    i_opt = 2 + KINDS.index("optimizer_state")
    start = trace.samples[trace.backward_end]
    top = max(s[1] for s in trace.samples[trace.step_start:])
    return StepCost(state=start[i_opt], excess=max(0, top - start[1]))


def optimizer_cost(trace: Trace) -> StepCost:
    """The :class:`StepCost` of an optimizer step traced alone
    (:func:`~torchmagic.core.estimate_trace.trace_optimizer_step`): its first sample is the level
    before the step, state included."""
    i_opt = 2 + KINDS.index("optimizer_state")
    first = trace.samples[0]
    return StepCost(state=trace.samples[-1][i_opt],
                    excess=max(0, max(s[1] for s in trace.samples) - first[1]))


def peak_with_step(trace: Trace, cost: StepCost) -> int:
    """The peak of a training step from a trace of its forward, loss and backward only
    (``optimizer_step=False``: no optimizer, no state) and the :class:`StepCost` of its
    optimizer: every moment up to the end of backward holds the state too, and the step holds the
    level at which backward ended, the state and the step's excess. Exact when the optimizer step
    is the one measured (same parameters, dtypes and optimizer): what the step allocates does not
    depend on the activations. Checked against full traces in the tests."""
    if trace.backward_end is None:
        raise ValueError("peak_with_step needs the trace of a training step")
    before = max(s[1] for s in trace.samples)
    end = trace.samples[trace.backward_end][1]
    return max(before + cost.state, end + cost.state + cost.excess)


def peak_with_optimizer(trace: Trace, cost: StepCost, other: StepCost) -> int:
    """The peak of the traced training step ``trace`` (cost ``cost``) with another optimizer
    (cost ``other``, traced alone): its forward, loss and backward without the first state, then
    the other optimizer's state and step. Exact for the same reason as :func:`peak_with_step`."""
    if trace.step_start is None or trace.backward_end is None:
        raise ValueError("peak_with_optimizer needs the trace of a training step")
    before = max(s[1] for s in trace.samples[:trace.step_start]) - cost.state
    end = trace.samples[trace.backward_end][1] - cost.state
    return max(before + other.state, end + other.state + other.excess)


# ---------------------------------------------------------------------------------------------
# the alternatives
# ---------------------------------------------------------------------------------------------
HOW = {
    "traced": "traced on fake tensors",
    "step from base": "forward and backward traced, the optimizer step from the first trace",
    "optimizer swapped": "the first trace with this optimizer's step, traced alone",
    "arithmetic": "arithmetic",
}
"""How an alternative's peak was found (``Alternative.how``); the last three are exact for what
they stand for (:func:`peak_with_step`, :func:`peak_with_optimizer`), sharding is a model."""


def traced_alternatives(run: Callable[..., Trace], spec: StepSpec,
                        weights_dtype: torch.dtype, batch: int | None, has_blocks: bool,
                        usable: int | None, progress: Progress | None = None,
                        base: Trace | None = None,
                        step_run: Callable[[StepSpec], Trace] | None = None,
                        ) -> tuple[list[Alternative], list[str]]:
    """Estimate each candidate change; a change that fails to trace becomes a note, not an error.

    ``run(spec, batch, optimizer_step)`` traces a step. With ``base`` (the first trace of a
    training step) and ``step_run(spec)`` (traces an optimizer step alone), only what a change
    alters is traced again: autocast, checkpointing and a smaller batch change the activations,
    not the optimizer step, so they trace forward, loss and backward and take the step from
    ``base`` (:func:`peak_with_step`); another optimizer keeps ``base``'s forward and backward
    and traces its own step alone (:func:`peak_with_optimizer`); bf16 weights change everything
    and are traced whole. ``Alternative.how`` says which."""
    alts: list[Alternative] = []
    notes: list[str] = []
    cost = step_cost(base) if base is not None and spec.train else None
    changes = candidate_changes(spec, weights_dtype, batch, has_blocks)
    for i, (change, option, alt_spec, alt_batch) in enumerate(changes):
        if progress is not None:
            progress({"stage": "what-if", "change": change, "index": i, "count": len(changes)})
        how = "traced"
        try:
            if cost is not None and base is not None and option.startswith("--optimizer") and \
                    step_run is not None:
                peak = peak_with_optimizer(base, cost, optimizer_cost(step_run(alt_spec)))
                how = "optimizer swapped"
            elif cost is not None and not option.startswith("--dtype"):
                peak = peak_with_step(run(alt_spec, alt_batch, False), cost)
                how = "step from base"
            else:
                peak = run(alt_spec, alt_batch, True).peak_bytes
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one alternative failing leaves the others
            notes.append(f"what-if {change!r} could not be traced: "
                         f"{' '.join(str(exc).split())[:160]}")
            continue
        alts.append(Alternative(change, option, peak,
                                None if usable is None else peak <= usable, how=how))
    return alts, notes


__all__ = ["HOW", "Alternative", "StepCost", "batch_size", "candidate_changes", "gathered_block_bytes",
           "search_max_batch", "sharded_peak", "sharding_alternative", "sharding_note",
           "optimizer_cost", "peak_with_optimizer", "peak_with_step", "step_cost",
           "traced_alternatives", "unsharded_bytes", "with_batch"]
