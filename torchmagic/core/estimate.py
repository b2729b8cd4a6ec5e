"""``estimate_memory(model, *inputs, train=...)``: the peak memory of a training step or an inference,
for a model of any size, without allocating it; and whether it fits on a device.

How (see :mod:`torchmagic.core.estimate_trace`): the step runs on a fake twin of the model (shapes,
no data; the user's model is never run, moved or changed) under torch's ``MemTracker``, which
attributes every live byte to parameters, buffers, gradients, optimizer state, activations,
temporaries and inputs after each op. The peak is the largest total, with its phase (forward, loss,
backward, optimizer step), the module and the op running then. A 70B Llama training step (AdamW,
bf16, batch 1 x 4096) is estimated in seconds with no weight allocated.

The verdict (:mod:`torchmagic.core.estimate_devices`) compares the peak plus a reserve (the CUDA
context and workspaces PyTorch does not allocate itself; default 1 GiB, for a ``memory=`` the
smaller of 1 GiB and an eighth of it) with the device's memory:
the current CUDA device, a named accelerator (``"H100"``, ``"a100-40gb"``, ``"T4"``...) or
``memory=``. Without either (no CUDA here) every accelerator of the table gets its own verdict.
What would change it (:mod:`torchmagic.core.estimate_whatif`): bf16 weights, autocast, activation
checkpointing, an optimizer without state, a smaller batch (``max_batch=True``: the largest batch
that fits, by bisection), and sharding over N GPUs (arithmetic).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core._result import Result
from torchmagic.core.errors import TorchMagicError
from torchmagic.core.estimate_devices import (
    Capacity,
    Verdict,
    fits_table,
    resolve_capacity,
    verdict,
)
from torchmagic.core.estimate_setup import LOSSES, optimizer_spec, repeated_blocks
from torchmagic.core.estimate_trace import (
    KINDS,
    PHASES,
    StepSpec,
    Trace,
    trace_optimizer_step,
    trace_step,
)
from torchmagic.core.estimate_whatif import (
    Alternative,
    Progress,
    batch_size,
    peak_with_step,
    search_max_batch,
    sharding_alternative,
    sharding_note,
    step_cost,
    traced_alternatives,
    with_batch,
)

TIMELINE_POINTS = 240


@dataclass
class ActivationRow:
    """Activation bytes created by ``module`` (and its submodules when it is a block) live at
    the moment activations peak; ``count`` > 1: that many consecutive blocks, ``bytes`` each."""

    module: str
    bytes: int
    count: int = 1

    @property
    def total(self) -> int:
        return self.bytes * self.count


def fold_activations(by_module: dict[str, int], blocks: str | None, top: int
                     ) -> tuple[list[ActivationRow], list[ActivationRow], str, int]:
    """Rank activation bytes by module for the report.

    ``by_module``: innermost module at creation -> bytes. ``blocks``: the full name of the
    repeated-block container (``"llama.layers"``): its blocks are summed whole and consecutive
    blocks holding the same bytes folded (``llama.layers.0-79``, ×80). Returns (the top rows,
    the top submodules of the largest block, that block's name, its activation bytes)."""
    merged: dict[str, int] = {}
    inside: dict[str, dict[str, int]] = {}
    prefix = f"{blocks}." if blocks else None
    for name, v in by_module.items():
        key = name
        if prefix and name.startswith(prefix):
            idx, _, sub = name[len(prefix):].partition(".")
            if idx.isdigit():
                key = prefix + idx
                inner = inside.setdefault(key, {})
                inner[sub or "(the block itself)"] = inner.get(sub or "(the block itself)", 0) + v
        merged[key] = merged.get(key, 0) + v
    rows: list[ActivationRow] = []
    numbered = sorted(((int(k[len(prefix):]), v) for k, v in merged.items()
                       if prefix and k.startswith(prefix)), key=lambda iv: iv[0])
    i = 0
    while i < len(numbered):
        j = i
        while j + 1 < len(numbered) and numbered[j + 1][0] == numbered[j][0] + 1 and \
                numbered[j + 1][1] == numbered[i][1]:
            j += 1
        first, last = numbered[i][0], numbered[j][0]
        name = f"{prefix}{first}" + (f"-{last}" if j > i else "")
        rows.append(ActivationRow(name, numbered[i][1], j - i + 1))
        i = j + 1
    rows.extend(ActivationRow(k, v) for k, v in merged.items()
                if not (prefix and k.startswith(prefix)))
    rows.sort(key=lambda r: (-r.total, r.module))
    detail: list[ActivationRow] = []
    block = ""
    if inside:
        block = max(inside, key=lambda k: (sum(inside[k].values()), -int(k[len(prefix or ""):])))
        detail = sorted((ActivationRow(k, v) for k, v in inside[block].items()),
                        key=lambda r: (-r.total, r.module))[:top]
    return rows[:top], detail, block, (sum(inside[block].values()) if block else 0)


@dataclass
class MemoryEstimate(Result):
    """The estimated peak memory of one step (bytes throughout).

    ``peak_bytes`` and ``by_kind`` (kind -> bytes live at the peak; kinds in
    :data:`~torchmagic.core.estimate_trace.KINDS`, summing to ``peak_bytes``) come from torch's
    ``MemTracker`` on fake tensors. ``peak_phase``/``peak_module``/``peak_op``: where the peak
    happened. ``top_activations``: the modules holding the most activation bytes at the moment
    activations peak (``activation_peak``, in ``activation_peak_phase``): where checkpointing pays.
    ``block_activations``: the submodules of the largest repeated ``block`` by activation bytes
    (``block_bytes`` in all).
    ``timeline``: live bytes through the step (at most 240 points, each the largest of the ops it
    stands for) with the phase and the bytes by kind of each point. ``verdict``: against the device
    (None without one); ``fits_on``: against every accelerator of the table when no device was
    given; ``alternatives``: what would change the verdict; ``max_batch``: the largest batch that
    fits (``max_batch=True``; 0: not even 1).

    Time (wall seconds): ``ops`` and ``trace_seconds`` are the first trace's (the step reported);
    ``whatif_traces``/``whatif_seconds`` count the traces the alternatives made (a whole step, a
    step without its optimizer step, or an optimizer step alone: see
    :func:`~torchmagic.core.estimate_whatif.traced_alternatives`), ``batch_traces``/
    ``batch_seconds`` those of the largest-batch search; ``seconds``: the whole call.
    """

    _display_module = "torchmagic.display.estimate"

    what: str                                  # "training step", "inference", "cell"
    model: str
    model_class: str = ""
    params: int = 0
    settings: dict[str, str] = field(default_factory=dict)
    peak_bytes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    peak_phase: str = ""
    peak_module: str | None = None
    peak_op: str | None = None
    phase_peaks: dict[str, int] = field(default_factory=dict)
    top_activations: list[ActivationRow] = field(default_factory=list)
    block_activations: list[ActivationRow] = field(default_factory=list)
    block: str = ""
    block_bytes: int = 0
    activation_peak: int = 0
    activation_peak_phase: str = ""
    timeline: list[int] = field(default_factory=list)
    timeline_phase: list[str] = field(default_factory=list)
    timeline_kinds: dict[str, list[int]] = field(default_factory=dict)
    ops: int = 0
    verdict: Verdict | None = None
    fits_on: list[Verdict] = field(default_factory=list)
    alternatives: list[Alternative] = field(default_factory=list)
    batch: int | None = None
    max_batch: int | None = None
    batch_trials: list[tuple[int, int]] = field(default_factory=list)
    by_device: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    trace_seconds: float = 0.0
    whatif_traces: int = 0
    whatif_seconds: float = 0.0
    batch_traces: int = 0
    batch_seconds: float = 0.0

    @property
    def fits(self) -> bool | None:
        """True/False against the device, None when no device was given."""
        return None if self.verdict is None else self.verdict.fits


# ---------------------------------------------------------------------------------------------
# shared by estimate_memory and the cell estimate
# ---------------------------------------------------------------------------------------------
def downsample(samples: list[tuple[int, ...]], points: int = TIMELINE_POINTS
               ) -> tuple[list[int], list[str], dict[str, list[int]]]:
    """At most ``points`` samples: each bucket's largest total (the peak always survives)."""
    if not samples:
        return [], [], {k: [] for k in KINDS}
    n = len(samples)
    buckets = min(points, n)
    chosen = []
    for b in range(buckets):
        lo, hi = b * n // buckets, max(b * n // buckets + 1, (b + 1) * n // buckets)
        chosen.append(max(samples[lo:hi], key=lambda s: s[1]))
    totals = [int(s[1]) for s in chosen]
    phases = [PHASES[s[0]] for s in chosen]
    kinds = {k: [int(s[2 + i]) for s in chosen] for i, k in enumerate(KINDS)}
    return totals, phases, kinds


def fill_from_trace(result: MemoryEstimate, trace: Trace, top: int,
                    blocks: str | None = None) -> None:
    """Copy a trace's figures into ``result`` (peak, kinds, timeline, top activations;
    ``blocks``: the full name of the repeated-block container, see :func:`fold_activations`)."""
    result.peak_bytes = trace.peak_bytes
    result.by_kind = dict(trace.by_kind)
    result.peak_phase = "start" if trace.peak_phase == "setup" else trace.peak_phase
    result.peak_module, result.peak_op = trace.peak_module, trace.peak_op
    result.phase_peaks = {("start" if k == "setup" else k): v
                          for k, v in trace.phase_peaks.items()}
    result.top_activations, result.block_activations, result.block, result.block_bytes = \
        fold_activations(trace.act_by_module, blocks, max(0, top))
    result.activation_peak = trace.act_peak
    result.activation_peak_phase = trace.act_peak_phase
    result.timeline, result.timeline_phase, result.timeline_kinds = downsample(trace.samples)
    result.timeline_phase = ["start" if p == "setup" else p for p in result.timeline_phase]
    result.ops = len(trace.samples)
    result.by_device = dict(trace.by_device)
    if len(trace.by_device) > 1:
        result.notes.append("tensors on several devices: the peak is the sum over devices (" +
                            ", ".join(f"{d} {v:,} B" for d, v in trace.by_device.items()) + ")")
    result.notes.extend(trace.notes)


def judge(result: MemoryEstimate, capacity: Capacity | None, reserve: int) -> None:
    """Set ``verdict`` (or ``fits_on`` for every accelerator when there is no capacity)."""
    if capacity is not None:
        result.verdict = verdict(result.peak_bytes, capacity)
    else:
        result.fits_on = fits_table(result.peak_bytes, reserve)


# ---------------------------------------------------------------------------------------------
# the public function
# ---------------------------------------------------------------------------------------------
def _float_dtype(value: Any, what: str, allowed: Sequence[torch.dtype]) -> torch.dtype | None:
    from torchmagic.core.inputs import parse_dtype

    if value is None:
        return None
    dt = parse_dtype(value)
    if dt not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TorchMagicError(f"{what} must be one of {names}; got {str(dt).replace('torch.', '')}")
    return dt


def _weights_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _sim_device(trace_device: Any) -> torch.device:
    if trace_device is None:
        trace_device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(trace_device)
    except (RuntimeError, TypeError):
        raise TorchMagicError(f"trace_device must be cpu or cuda; got {trace_device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            # autograd on fake CUDA tensors needs torch's CUDA support (it aborts without it)
            raise TorchMagicError("trace_device cuda needs CUDA here: without it the step is "
                                  "traced as on the CPU (trace_device=None)")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else
                            dev.index)
    if dev.type != "cpu":
        raise TorchMagicError(f"trace_device must be cpu or cuda; got {trace_device!r}")
    return dev


def estimate_memory(
    model: nn.Module,
    *inputs: Any,
    args: Any = None,
    kwargs: Any = None,
    input_size: Any = None,
    dtypes: Sequence[Any] | Any = None,
    batch_dim: int | None = None,
    train: bool = False,
    optimizer: Any = "adamw",
    optimizer_kwargs: dict[str, Any] | None = None,
    dtype: Any = None,
    amp: Any = None,
    checkpointing: bool = False,
    loss: str | Callable[[Any], torch.Tensor] = "auto",
    batch: int | None = None,
    max_batch: bool = False,
    device: Any = None,
    memory: Any = None,
    reserve: Any = None,
    what_if: bool | None = None,
    top: int = 8,
    name: str = "model",
    progress: Progress | None = None,
    trace_device: Any = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one training step (``train=True``) or one inference of
    ``model`` on fake tensors, and check it against a device. Nothing real is allocated or run.

    Inputs exactly as :func:`torchmagic.summary` (:func:`torchmagic.core.inputs.prepare_inputs`):
    tensors (positional), one tuple/list written out (the argument list), and/or a ``Mapping`` of
    keyword arguments (a dict, a tokenizer's ``BatchEncoding``); ``args``/``kwargs`` explicitly;
    or ``input_size`` shapes with ``dtypes`` (``batch_dim``: the shapes lack their batch
    dimension, inserted there). Only shapes and dtypes are read. ``batch``: set the batch
    dimension (``batch_dim``, default 0) of the inputs to this size.

    ``train``: forward, loss, backward, optimizer step (``zero_grad(set_to_none=True)``), with
    the optimizer state present as in any step after the first; else a forward under
    ``torch.no_grad()`` in eval mode. ``optimizer``: a ``torch.optim`` class name in any case
    (``"adamw"``, ``"sgd"``, ``"sgd-momentum"``, ``"adagrad"``...), a class, or a function
    ``f(params) -> Optimizer``; ``optimizer_kwargs`` go to the class; it runs its multi-tensor
    (foreach) implementation, PyTorch's default on CUDA. ``loss``: ``"auto"`` (the output's own
    ``.loss`` when it has one, e.g. Hugging Face models given labels; else cross-entropy of
    ``(batch, ..., vocab)`` logits against integer inputs of shape ``(batch, ...)``; else the mean
    of the output), ``"mean"``, ``"cross_entropy"``, or a function ``f(output) -> scalar``.
    ``dtype``: cast the weights (and floating inputs) to ``bf16``/``fp16``/``fp32``; ``amp``:
    run forward and loss under ``torch.autocast`` in ``bf16``/``fp16``. ``checkpointing``: wrap
    each repeated block (the largest ``ModuleList``/``Sequential`` of one layer class) in
    ``torch.utils.checkpoint``.

    ``device``: ``"cuda"``/``"cuda:N"`` (this machine's device) or an accelerator name from
    :data:`~torchmagic.core.estimate_devices.ACCELERATORS`; ``memory``: a size (``"80GiB"``,
    ``"24GB"``, bytes) to check against instead; ``reserve``: left free for the CUDA context and
    workspaces (default 1 GiB; with ``memory``, the smaller of 1 GiB and an eighth of it, so a
    small budget is not eaten by a reserve meant for a big GPU; a reserve that leaves nothing of
    the memory is refused). ``max_batch``: also find the largest batch that fits (needs a
    capacity). ``what_if``: trace the alternatives (None: only when it does not fit). ``top``:
    modules listed by activation bytes. ``progress``: called with a dict at each stage
    (``"stage"``: ``"trace"`` the step, ``"what-if"`` each alternative, ``"max-batch"`` each
    batch tried, and ``"ops"`` every 512 ops of a running trace, with its ``"phase"`` and
    ``"ops"`` so far).
    ``trace_device``: the device whose kernels the fake step imitates (which tensors attention
    and the optimizer keep, CUDA's 512-byte allocation rounding): ``"cuda"`` (the default when
    CUDA is available) or ``"cpu"``.

    Returns a :class:`MemoryEstimate`. Raises :class:`TorchMagicError` for bad input and
    :class:`~torchmagic.core.errors.ForwardError` (naming the module and its input shapes) when
    the model's forward fails.
    """
    from torchmagic.core.estimate_devices import DEFAULT_RESERVE, parse_bytes
    from torchmagic.core.inputs import has_inputs, prepare_inputs
    from torchmagic.core.params import require_module, unwrap_model

    started = time.perf_counter()
    model = require_module(model)
    model, wrapper_note = unwrap_model(model)
    if not has_inputs(inputs, input_size, args, kwargs):
        what = "a training step" if train else "an inference"
        raise TorchMagicError(f"give the model's inputs (tensors, or shapes like (8, 3, 224, 224) "
                              f"with dtypes): the peak of {what} depends on them")
    if not isinstance(top, int) or isinstance(top, bool) or top < 0:
        raise TorchMagicError(f"top must be a whole number >= 0; got {top!r}")
    if isinstance(loss, str) and loss not in LOSSES:
        raise TorchMagicError(f"loss must be one of {', '.join(LOSSES)} or a function of the "
                              f"output; got {loss!r}")
    w_dtype = _float_dtype(dtype, "dtype", (torch.float32, torch.bfloat16, torch.float16,
                                             torch.float64))
    a_dtype = _float_dtype(amp, "amp", (torch.bfloat16, torch.float16))
    opt_spec = optimizer_spec(optimizer, optimizer_kwargs) if train else None
    if checkpointing and not train:
        raise TorchMagicError("checkpointing saves memory in training only (inference keeps no "
                              "activations for backward): add train=True (--train)")
    res = DEFAULT_RESERVE if reserve is None else parse_bytes(reserve, "reserve")
    capacity = resolve_capacity(device, memory, reserve)
    if max_batch and capacity is None:
        raise TorchMagicError("the largest batch that fits needs a memory to fit in: give a "
                              "device (cuda, an accelerator name such as H100) or memory=")
    # shapes become meta tensors; given tensors are only read (shape, strides, dtype)
    prepared = prepare_inputs(model, *inputs, args=args, kwargs=kwargs, input_size=input_size,
                              dtypes=dtypes, batch_dim=batch_dim, target=torch.device("meta"))
    args, kwargs = prepared.args, prepared.kwargs
    bdim = batch_dim or 0
    if batch is not None:
        args, kwargs = with_batch(args, kwargs, batch, bdim)
    current_batch = batch_size(args, kwargs, bdim)
    if max_batch and current_batch is None:
        raise TorchMagicError(f"the batch search needs inputs with a batch dimension (dimension "
                              f"{bdim}); these inputs have none")

    sim = _sim_device(trace_device)
    spec = StepSpec(train=bool(train), optimizer=opt_spec, foreach=True, dtype=w_dtype,
                    amp=a_dtype, checkpointing=bool(checkpointing), loss=loss, device=sim)

    counts = {"what-if": [0, 0.0], "max-batch": [0, 0.0]}   # stage -> [traces, seconds]
    stage = ["trace"]

    def heartbeat(ops: int, phase: str) -> None:
        if progress is not None:
            progress({"stage": "ops", "of": stage[0], "ops": ops, "phase": phase})

    def run(s: StepSpec, b: int | None, optimizer_step: bool = True) -> Trace:
        a, k = ((args, kwargs) if b is None or b == current_batch
                else with_batch(args, kwargs, b, bdim))
        tr = trace_step(model, a, k, s, name, optimizer_step=optimizer_step,
                        heartbeat=heartbeat)
        if stage[0] in counts:
            counts[stage[0]][0] += 1
            counts[stage[0]][1] += tr.seconds
        return tr

    def step_run(s: StepSpec) -> Trace:
        tr = trace_optimizer_step(model, s)
        counts[stage[0]][0] += 1
        counts[stage[0]][1] += tr.seconds
        return tr

    if progress is not None:
        progress({"stage": "trace", "what": "training step" if train else "inference"})
    trace = run(spec, None)
    cost = step_cost(trace) if train else None

    from torchmagic.core.tracing import format_shapes

    weights = _weights_dtype(model)
    shown_dtype = w_dtype or weights
    settings = {
        "weights": str(shown_dtype).replace("torch.", "") + (" (cast)" if w_dtype not in (
            None, weights) else ""),
        "inputs": format_shapes([tuple(a.shape) for a in _tensors((args, kwargs))]),
        "traced on": f"fake tensors ({sim})",
    }
    if train:
        assert opt_spec is not None
        settings["optimizer"] = f"{opt_spec.label} (multi-tensor)"
        settings["loss"] = trace.loss
    if a_dtype is not None:
        settings["autocast"] = str(a_dtype).replace("torch.", "")
    if checkpointing:
        settings["checkpointing"] = "each repeated block"
    result = MemoryEstimate(
        what="training step" if train else "inference", model=name,
        model_class=type(model).__name__,
        params=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        settings=settings, batch=current_batch)
    found = repeated_blocks(model)
    blocks = f"{name}.{found[0]}" if found and found[0] else (name if found else None)
    fill_from_trace(result, trace, top, blocks)
    if wrapper_note:
        result.notes.insert(0, wrapper_note)
    judge(result, capacity, res)
    usable = capacity.usable if capacity is not None else None

    if max_batch:
        assert capacity is not None and current_batch is not None
        stage[0] = "max-batch"

        def peak_at(b: int) -> int:
            # training: forward and backward traced, the optimizer step from the first trace
            if cost is not None:
                return peak_with_step(run(spec, b, False), cost)
            return run(spec, b).peak_bytes

        best, trials = search_max_batch(peak_at, capacity.usable, current_batch,
                                        trace.peak_bytes, progress)
        result.max_batch, result.batch_trials = best, trials
    want = what_if if what_if is not None else (result.verdict is not None
                                                and not result.verdict.fits)
    if want:
        stage[0] = "what-if"
        alts, notes = traced_alternatives(run, spec, weights, current_batch, found is not None,
                                          usable, progress, base=trace, step_run=step_run)
        shard = sharding_alternative(trace, model, w_dtype, bool(train), usable)
        if shard is not None:
            alts.append(shard)
        else:
            why = sharding_note(trace, model, w_dtype, bool(train), usable, result.fits)
            if why is not None:
                notes.append(why)
        result.alternatives = alts
        result.notes.extend(notes)
    result.trace_seconds = trace.seconds
    result.whatif_traces, result.whatif_seconds = counts["what-if"]
    result.batch_traces, result.batch_seconds = counts["max-batch"]
    result.seconds = time.perf_counter() - started
    return result


def _tensors(obj: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


__all__ = ["ActivationRow", "MemoryEstimate", "downsample", "estimate_memory", "fill_from_trace",
           "fold_activations", "judge"]
