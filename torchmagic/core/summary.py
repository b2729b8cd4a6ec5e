"""``summary(model, *inputs)``: one row per module with shapes, parameters and FLOPs, never touching
the user's model.

The pieces: :mod:`torchmagic.core.summary_rows` (rows and parameter counts),
:mod:`torchmagic.core.summary_run` (the twin the forward runs on, and failure hints),
:mod:`torchmagic.core.summary_torchinfo` (torchinfo's table for comparison). Inputs are taken by
:func:`torchmagic.core.inputs.prepare_inputs` (tensors, argument tuples, any ``Mapping`` as keyword
arguments, ``args=``/``kwargs=``, shapes with ``batch_dim`` and dtypes).

What is measured: module calls with torch's global module hooks (:mod:`torchmagic.core.tracing`;
the user's hook dictionaries are untouched), keyword arguments of submodules with ``with_kwargs``
pre-hooks on the twin, and FLOPs per call with :class:`torchmagic.core.flops.FlopCounter` (torch's
formulas + SDPA on CPU, fused multi-head attention, grouped matmuls of mixture-of-experts layers,
quantized kernels and analytic recurrent modules; ops it cannot count are listed, never silently
0). Parameters follow :mod:`torchmagic.core.params` (tied weights counted once, at their first
name; packed quantized weights counted; lazy parameters named until a forward materializes them on
the twin).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core._result import Result
from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.inputs import has_inputs, normalize_shapes, parse_dtype, prepare_inputs
from torchmagic.core.params import ParamIndex, require_module, unwrap_model, weight_notes
from torchmagic.core.summary_rows import (
    ParamTotals,
    SummaryRow,
    UncountedOp,
    fill_rows,
    param_rows,
    shared_notes,
)

MODES = ("same", "eval", "train")
COLUMNS = ("input", "output", "params", "trainable", "percent", "flops", "macs", "bytes",
           "kernel", "calls")
DEFAULT_COLUMNS = ("input", "output", "params", "trainable", "percent", "flops", "bytes",
                   "kernel", "calls")
COLUMN_HELP = {
    "input": "input shapes of the first call", "output": "output shapes of the first call",
    "params": "parameters (recursive; tied ones at their first name)",
    "trainable": "yes / no / partly trainable", "percent": "% of all parameters",
    "flops": "forward FLOPs, all calls", "macs": "multiply-adds = FLOPs / 2",
    "bytes": "output bytes, all calls", "kernel": "kernel size (conv, pool)",
    "calls": "number of calls",
}


# -- result --------------------------------------------------------------------------------------
@dataclass
class ModelSummary(Result):
    """What ``%summary`` shows (and ``torchmagic.summary`` returns).

    Totals: ``total_params`` = ``sum(p.numel() for p in model.parameters())`` (each tensor once)
    plus the elements of packed quantized weights (``packed_params``; lazy parameters, listed in
    ``uninitialized``, have no size until a forward), ``trainable_params``/``frozen_params``,
    ``param_bytes`` (true bytes: tensor subclasses and quantized weights by what they store; and
    ``param_bytes_by_dtype``), ``buffer_bytes``; with a forward: ``total_flops`` (forward FLOPs, 2
    per multiply-add; ``uncounted`` lists ops that multiply-add but have no formula),
    ``total_macs`` and ``activation_bytes`` = the bytes of the outputs of every *leaf* module call
    (a call that makes no module call itself), an estimate of what a training step keeps for backward
    (functional ops between modules and in-place outputs are not told apart). After a failing
    forward (``error`` set) the numbers cover what ran before the failure.
    """

    _display_module = "torchmagic.display.summary"

    model_class: str
    rows: list[SummaryRow]
    total_params: int
    trainable_params: int
    frozen_params: int
    param_bytes: int
    param_bytes_by_dtype: dict[str, int]
    buffer_bytes: int
    depth: int
    mode: str = "same"
    device: str | None = None       # where the forward ran
    meta: bool = False
    ran_forward: bool = False
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    input_dtypes: list[str] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] | None = None
    total_flops: int | None = None
    activation_bytes: int | None = None
    columns: list[str] = field(default_factory=lambda: list(DEFAULT_COLUMNS))
    explicit_columns: bool = False
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    torchinfo: str | None = None
    output_type: str | None = None          # a non-tensor result's type (Categorical, ModelOutput)
    input_kwargs: list[str] = field(default_factory=list)  # keyword inputs (shapes listed last)
    uninitialized: list[str] = field(default_factory=list)  # lazy parameters, not counted
    packed_params: int = 0                  # elements of packed quantized weights (in the total)
    quantized: dict[str, int] = field(default_factory=dict)  # quantization kind -> elements
    unknown_params: list[str] = field(default_factory=list)  # modules with unreadable weights
    lazy_materialized: bool = False         # counts are those the input gives lazy modules
    uncounted: list[UncountedOp] = field(default_factory=list)  # multiply-add ops not counted
    # summary(..., memory=True): peaks from torchmagic.estimate_memory (bytes; None if not asked)
    inference_peak_bytes: int | None = None
    training_peak_bytes: int | None = None

    @property
    def total_macs(self) -> int | None:
        return None if self.total_flops is None else self.total_flops // 2

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-friendly data, plus ``total_macs`` and each row's ``macs``."""
        d = super().to_dict()
        d["total_macs"] = self.total_macs
        for row, r in zip(d["rows"], self.rows):
            row["macs"] = r.macs
        return d

    def visible_columns(self) -> list[str]:
        """Columns to render: as asked; defaults drop those with nothing to show."""
        cols = list(self.columns)
        if self.explicit_columns:
            return cols
        if not self.ran_forward:
            cols = [c for c in cols if c not in ("input", "output", "flops", "macs", "bytes",
                                                 "calls")]
        if not any(r.kernel for r in self.rows):
            cols = [c for c in cols if c != "kernel"]
        if not any(r.calls > 1 for r in self.rows):
            cols = [c for c in cols if c != "calls"]
        if not self.frozen_params:
            cols = [c for c in cols if c != "trainable"]  # all trainable: the totals say so
        return cols


# -- argument checks -----------------------------------------------------------------------------
def parse_columns(columns: Sequence[str] | str | None) -> list[str] | None:
    """Validate column names (``"params,flops"`` or a list); ``None`` keeps the defaults."""
    if columns is None:
        return None
    if isinstance(columns, str):
        columns = [c for c in re.split(r"[,\s]+", columns) if c]
    out = []
    for c in columns:
        key = c.strip().lower()
        key = {"input_size": "input", "output_size": "output", "num_params": "params",
               "params_percent": "percent", "%": "percent", "mult_adds": "macs",
               "kernel_size": "kernel", "output_bytes": "bytes"}.get(key, key)
        if key not in COLUMNS:
            raise TorchMagicError(f"unknown column {c!r} (valid: {', '.join(COLUMNS)})")
        if key not in out:
            out.append(key)
    if not out:
        raise TorchMagicError(f"columns needs at least one of: {', '.join(COLUMNS)}")
    return out


def summary(
    model: nn.Module,
    *inputs: Any,
    args: Any = None,
    kwargs: Any = None,
    input_size: Any = None,
    dtypes: Sequence[Any] | Any = None,
    batch_dim: int | None = None,
    depth: int = 3,
    mode: str = "same",
    device: Any = None,
    meta: bool = False,
    columns: Sequence[str] | str | None = None,
    torchinfo: bool = False,
    raise_on_error: bool = True,
    width: int | None = None,
    memory: bool = False,
) -> ModelSummary:
    """Summarize ``model``: one :class:`SummaryRow` per module down to ``depth`` and the totals.

    Inputs (see :func:`torchmagic.core.inputs.prepare_inputs`): ``inputs`` are tensors or values
    (positional arguments), one tuple/list written out (the argument list: every element
    positional), and/or a ``Mapping`` of keyword arguments (a dict, a tokenizer's
    ``BatchEncoding``: as ``model(**batch)``); ``args``/``kwargs`` are the explicit form (a tuple
    taken as it is, a mapping); ``input_size`` is a shape or a list of shapes (with ``dtypes``,
    one per shape or one for all: ``"long"``, ``torch.float``, ``torch.LongTensor``...;
    ``batch_dim``: the shapes lack their batch dimension, a batch of 1 goes there), and can come
    with ``kwargs``. With none of them, no forward runs (parameters only).

    ``mode``: ``"same"`` (each module keeps its flag), ``"eval"`` or ``"train"``. ``device``: run
    on a copy on that device. ``meta``: run on a meta twin (shapes and FLOPs without weights or
    memory). ``columns``: subset of :data:`COLUMNS` to show. ``torchinfo``: also keep torchinfo's
    own table (run on a twin of the model) in ``.torchinfo``, fitted to ``width`` columns
    (default: ``torchmagic.display.format.text_width()``). ``memory``: also estimate the peak
    memory of an inference and of a training step (AdamW) with :func:`torchmagic.estimate_memory`
    (fake tensors; ``inference_peak_bytes``, ``training_peak_bytes`` and one note line).

    The forward runs on a twin (:mod:`torchmagic.core.summary_run`): the user's model, its flags,
    buffers, attributes, hooks and torch's global state are never changed; lazy modules stay lazy
    (the counts are those the input makes, on the twin). Raises :class:`TorchMagicError` for bad
    arguments, inputs too big for the device's free memory (``InputMemoryError``), and
    :class:`ForwardError` for a failing forward, naming the failing module, its class, its input
    shapes and torch's message, plus what to do about common causes; ``err.partial`` is the
    summary up to the failure (``raise_on_error=False`` returns that summary instead, with
    ``.error`` set).
    """
    model = require_module(model)
    model, wrapper_note = unwrap_model(model)
    forward = has_inputs(inputs, input_size, args, kwargs)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise TorchMagicError(f"depth must be a whole number >= 0; got {depth!r}")
    if isinstance(model, torch.jit.ScriptModule) and forward:
        raise TorchMagicError(
            f"{type(model).__name__} is a TorchScript module: its forward runs inside TorchScript, "
            "where per-module shapes and FLOPs cannot be followed; summarize the Python nn.Module "
            "it was made from (before torch.jit.script/trace), or give no inputs to list its "
            "parameters")
    if forward and getattr(type(model).forward, "__name__", "") == "_forward_unimplemented":
        raise TorchMagicError(
            f"{type(model).__name__} has no forward (a container): give no inputs to list its "
            "parameters, or summarize the model that calls its modules")
    if mode not in MODES:
        raise TorchMagicError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    cols = parse_columns(columns)

    # -- parameters (metadata only) --
    index = ParamIndex.of(model)
    rows, tot = param_rows(model, depth, index)
    result = _result(model, rows, tot, depth, mode, cols)
    if wrapper_note:
        result.notes.append(wrapper_note)
    for row in result.rows:
        if row.tied:
            result.notes.append(f"{row.name}: {'; '.join(row.tied)} (counted once)")
    result.notes.extend(shared_notes(result.rows))
    lazy_notes = weight_notes(index.weights(), index.unknown_packed)

    if not forward:
        if memory:
            raise TorchMagicError("memory=True estimates the peak of a step and needs the "
                                  "model's inputs")
        result.notes.extend(lazy_notes)
        if torchinfo:
            from torchmagic.core.summary_torchinfo import torchinfo_table

            result.torchinfo = torchinfo_table(model, None, {}, depth, mode, None, False, cols,
                                               width)
        return result

    # -- where to run, the inputs, the forward --
    from torchmagic.core.summary_run import (
        can_fake,
        failure_hint,
        fake_retry,
        plan_run,
        reads_values,
        run_forward,
    )
    from torchmagic.core.tracing import describe_failure, tensor_shapes

    plan = plan_run(model, meta, device)
    prepared = prepare_inputs(model, *inputs, args=args, kwargs=kwargs, input_size=input_size,
                              dtypes=dtypes, batch_dim=batch_dim, target=plan.target,
                              move=plan.meta or device is not None)
    pos, kw = prepared.args, prepared.kwargs
    result.meta = plan.meta
    result.device = str(plan.target)
    result.notes.extend(plan.notes)
    result.input_shapes = prepared.shapes
    result.input_dtypes = prepared.dtypes
    result.input_kwargs = [k for k, v in kw.items() if tensor_shapes(v)]

    run = run_forward(plan, model, mode, pos, kw)
    fake_failed = False
    if reads_values(plan, run.error) and can_fake(model):  # fake tensors have symbolic values
        retried = fake_retry(model, mode, pos, kw)
        fake_failed = retried is None
        if retried is not None:
            result.notes = [n for n in result.notes if n not in plan.notes]
            plan, run = retried
            result.notes.extend(plan.notes)
            result.device = "fake tensors (cpu)"
    calls = run.tracer.calls
    if calls and calls[0].parent is None and not calls[0].kwargs and kw:
        calls[0].input_shapes = tensor_shapes((pos, kw))  # ran without kwargs hooks
        calls[0].kwargs = list(result.input_kwargs)
    fill_rows(result, rows, run.tracer, run.counter, run.error, _uses_children(model))
    if tot.uninitialized:
        _lazy_counts(result, rows, plan.run_model, depth, run.error is None, lazy_notes)
    else:
        result.notes.extend(lazy_notes)
    if run.error is not None:
        failing = run.tracer.failing_call
        msg = describe_failure(failing, run.error,
                               run.tracer.module_of(failing) if failing is not None else None)
        msg += failure_hint(run, plan, input_size is not None and dtypes is None,
                            args is None and len(inputs) == 1 and type(inputs[0]) in (tuple, list),
                            kw, fake_failed)
        result.error = msg
        if raise_on_error:
            err = ForwardError(msg, original=run.error,
                               module_path=(failing.path or "<root>") if failing else None,
                               module_class=failing.cls if failing else None,
                               input_shapes=str(failing.input_shapes) if failing else None,
                               partial=result)
            raise err from run.error
        return result
    if torchinfo:
        from torchmagic.core.summary_torchinfo import torchinfo_table

        result.torchinfo = torchinfo_table(model, pos, kw, depth, mode, plan.target, plan.meta,
                                           cols, width)
    if memory:
        _estimate_peaks(result, model, inputs, dict(args=args, kwargs=kwargs,
                                                    input_size=input_size, dtypes=dtypes,
                                                    batch_dim=batch_dim))
    return result


def _estimate_peaks(result: ModelSummary, model: nn.Module, inputs: tuple[Any, ...],
                    given: dict[str, Any]) -> None:
    """``memory=True``: the inference and training-step peaks from ``estimate_memory``."""
    from torchmagic.core.estimate import estimate_memory
    from torchmagic.display.format import human_bytes

    parts = []
    for train in (False, True):
        try:
            est = estimate_memory(model, *inputs, **given, train=train, what_if=False)
        except (TorchMagicError, ForwardError) as exc:
            parts.append(f"{'training step' if train else 'inference'}: not estimated ({exc})")
            continue
        if train:
            result.training_peak_bytes = est.peak_bytes
            parts.append(f"training step (AdamW) {human_bytes(est.peak_bytes)}")
        else:
            result.inference_peak_bytes = est.peak_bytes
            parts.append(f"inference {human_bytes(est.peak_bytes)}")
    result.notes.append("peak memory (estimated on fake tensors; %estimate for the breakdown): "
                        + "; ".join(parts))


def _uses_children(model: nn.Module) -> set[str]:
    """Modules whose forward uses their children's weights without calling them:
    ``nn.MultiheadAttention`` (``out_proj``) and quantized modules (their packed params)."""
    out = set()
    mods = dict(model.named_modules())
    for path, mod in mods.items():
        if isinstance(mod, nn.MultiheadAttention):
            out.add(path)
        elif any(isinstance(v, torch.ScriptObject) for v in vars(mod).values()) and path:
            # the quantized module that owns these packed params (a dynamic LSTM keeps them in a
            # ModuleList of PackedParameter), else the direct parent
            parent = path.rpartition(".")[0]
            owner = parent
            while owner:
                if type(mods[owner]).__module__.startswith("torch.ao.nn.quantized"):
                    break
                owner = owner.rpartition(".")[0]
            out.add(owner if owner else parent)
    return out


def _result(model: nn.Module, rows: dict[str, SummaryRow], tot: ParamTotals, depth: int,
            mode: str, cols: list[str] | None) -> ModelSummary:
    from torchmagic.core.params import module_class

    return ModelSummary(
        model_class=module_class(model), rows=list(rows.values()), total_params=tot.total,
        trainable_params=tot.trainable, frozen_params=tot.total - tot.trainable,
        param_bytes=tot.nbytes, param_bytes_by_dtype=dict(tot.bytes_by_dtype),
        buffer_bytes=tot.buffer_bytes, depth=depth, mode=mode,
        columns=cols or list(DEFAULT_COLUMNS), explicit_columns=cols is not None,
        uninitialized=list(tot.uninitialized), packed_params=tot.packed,
        quantized=dict(tot.quantized), unknown_params=list(tot.unknown),
    )


def _lazy_counts(result: ModelSummary, rows: dict[str, SummaryRow], twin: nn.Module, depth: int,
                 ok: bool, notes: list[str]) -> None:
    """Lazy modules: the parameter counts the input made, read from the twin the forward
    materialized (the user's model stays lazy)."""
    from torchmagic.core.weights import is_uninitialized

    if not ok or any(is_uninitialized(p) for p in twin.parameters()):
        result.notes.extend(notes)
        return
    counted, tot = param_rows(twin, depth)
    for path, row in rows.items():
        other = counted.get(path)
        if other is not None:
            row.params, row.trainable_params = other.params, other.trainable_params
            row.percent, row.uninitialized = other.percent, 0
    result.total_params, result.trainable_params = tot.total, tot.trainable
    result.frozen_params = tot.total - tot.trainable
    result.param_bytes, result.param_bytes_by_dtype = tot.nbytes, dict(tot.bytes_by_dtype)
    result.buffer_bytes = tot.buffer_bytes
    n = len(result.uninitialized)
    result.uninitialized = []
    result.lazy_materialized = True
    result.notes.append(f"lazy modules: the {n} uninitialized parameters were materialized by this "
                        "input on a twin; the counts are those it makes (your model is still "
                        "lazy)")


__all__ = ["COLUMNS", "DEFAULT_COLUMNS", "MODES", "ModelSummary", "SummaryRow", "UncountedOp",
           "summary", "parse_dtype", "parse_columns", "normalize_shapes"]
