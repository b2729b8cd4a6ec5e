"""``summary(model, *inputs)``: one row per module with shapes, parameters and FLOPs, never touching
the user's model.

How the forward runs (the user's model, its flags, buffers, hooks and torch's global state are the
same afterwards, on success, on an error and on KeyboardInterrupt):

- real weights: the user's own module runs through ``torch.func.functional_call`` with *clones* of
  its buffers, so in-place buffer updates (BatchNorm running statistics, ``num_batches_tracked``)
  land in the clones; parameters are not copied. Training flags follow ``mode`` (``same`` keeps each
  module's own flag, e.g. a frozen BatchNorm in eval inside a model in train) and are restored
  exactly; everything runs under ``torch.no_grad()`` inside ``preserved_global_state()``;
  ``nn.MultiheadAttention``/``TransformerEncoderLayer`` fast paths are switched off for the run so
  their submodules are visible (restored afterwards).
- ``meta=True`` (or a model already on meta): a meta twin (``torchmagic.core.twin.meta_twin``) runs
  on meta inputs: no weight is read, no memory used; the user's model is never moved.
- ``device=D``: a copy on ``D`` runs (``device_twin``) unless the model already lives there.
- inputs given as shapes are made here: floating ones random from a private ``torch.Generator``
  (the global RNG is not consumed) in the model's floating dtype, integer/bool ones zeros (valid
  token ids).

What is measured: module calls with torch's global module hooks (:mod:`torchmagic.core.tracing`;
the user's hook dictionaries are untouched) and FLOPs per call with
:class:`torchmagic.core.flops.FlopCounter` (torch's formulas + SDPA on CPU, fused multi-head
attention and analytic recurrent modules). Parameters follow :mod:`torchmagic.core.params` (tied
weights counted once, at their first name).
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
from torchmagic.core.inputs import (
    model_device,
    normal_device,
    normalize_shapes,
    parse_dtype,
    prepare_inputs,
)
from torchmagic.core.params import (
    ParamIndex,
    module_depth,
    prefixes,
    require_module,
    tensor_nbytes,
    tied_notes,
    unwrap_model,
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
class SummaryRow:
    """One module (down to ``depth``), aggregating all its calls.

    ``params`` counts the module's subtree (tied parameters at their first name only);
    ``input_shapes``/``output_shapes`` are those of the first call (``None``: not called, or no
    forward ran); ``flops`` and ``output_bytes`` sum every call (``None`` without a forward).
    """

    path: str
    cls: str
    depth: int
    params: int = 0
    trainable_params: int = 0
    percent: float = 0.0
    calls: int = 0
    input_shapes: list[tuple[int, ...]] | None = None
    output_shapes: list[tuple[int, ...]] | None = None
    flops: int | None = None
    output_bytes: int | None = None
    kernel: str | None = None
    tied: list[str] = field(default_factory=list)
    # "", "not called", "in parent" (weights used by the parent's forward, e.g. MHA's out_proj),
    # "failed" (innermost failing), "running" (its parent)
    status: str = ""
    analytic_flops: bool = False

    @property
    def name(self) -> str:
        return self.path or "(root)"

    @property
    def macs(self) -> int | None:
        return None if self.flops is None else self.flops // 2

    @property
    def trainable(self) -> str:
        if not self.params:
            return "-"
        if self.trainable_params == self.params:
            return "yes"
        return "no" if self.trainable_params == 0 else "partly"


@dataclass
class ModelSummary(Result):
    """What ``%summary`` shows (and ``torchmagic.summary`` returns).

    Totals: ``total_params`` = ``sum(p.numel() for p in model.parameters())`` (each tensor once),
    ``trainable_params``/``frozen_params``, ``param_bytes`` (and ``param_bytes_by_dtype``),
    ``buffer_bytes``; with a forward: ``total_flops`` (forward FLOPs, 2 per multiply-add),
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
        raise TorchMagicError(f"--columns needs at least one of: {', '.join(COLUMNS)}")
    return out


def _kernel(module: nn.Module) -> str | None:
    k = getattr(module, "kernel_size", None)
    if k is None:
        return None
    if isinstance(k, int):
        m = re.search(r"([123])d$", type(module).__name__)
        k = (k,) * (int(m.group(1)) if m else 1)
    try:
        return "x".join(str(int(d)) for d in k)
    except (TypeError, ValueError):
        return str(k)


# -- the run -------------------------------------------------------------------------------------
@dataclass
class _Run:
    tracer: Any
    counter: Any
    error: BaseException | None = None


def _forward(run_model: nn.Module, user_model: nn.Module, is_twin: bool, mode: str,
             args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Run:
    from torchmagic.core.flops import flop_counter
    from torchmagic.core.state import preserved_global_state, preserved_training_flags, set_mode
    from torchmagic.core.tracing import ModuleTracer, trace_modules

    tracer = ModuleTracer(run_model)
    counter = flop_counter(tracer)
    run = _Run(tracer, counter)
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    with preserved_global_state(), preserved_training_flags(user_model):
        try:
            torch.set_grad_enabled(False)
            if mha is not None:
                mha.set_fastpath_enabled(False)
            set_mode(run_model, mode)
            with trace_modules(tracer), counter:
                if is_twin:
                    run_model(*args, **kwargs)
                else:
                    from torch.func import functional_call

                    buffers = {n: b.clone() for n, b in run_model.named_buffers()}
                    functional_call(run_model, buffers, args, kwargs, tie_weights=True,
                                    strict=False)
        except Exception as exc:  # the user's forward failed: reported, not raised as is
            run.error = exc
        finally:
            if mha is not None:
                mha.set_fastpath_enabled(fast)
    return run


_META_HINTS = ("meta tensor", "cannot copy out of meta", "on the expected device meta",
               "is not on the expected device", "data-dependent")


def _failure_hint(run: _Run, low: str, default_dtypes: bool, split_list: bool) -> str:
    """What the user can do about common failures of the first call."""
    failing = run.tracer.failing_call
    if default_dtypes and ("'indices' to have one of the following scalar types" in low
                           or "expected scalar type long" in low
                           or "tensors used as indices must be" in low):
        return (" (inputs made from shapes are floating point unless told otherwise: give token "
                "ids an integer dtype with --dtypes long, or dtypes='long' in Python)")
    if split_list and isinstance(run.error, TypeError) and "positional argument" in low and \
            failing is not None and failing.parent is None:
        return (" (a list or tuple of tensors is passed as separate positional arguments; to "
                "pass it as one argument, wrap it: (xs,))")
    return ""


def summary(
    model: nn.Module,
    *inputs: Any,
    input_size: Any = None,
    dtypes: Sequence[Any] | Any = None,
    depth: int = 3,
    mode: str = "same",
    device: Any = None,
    meta: bool = False,
    columns: Sequence[str] | str | None = None,
    torchinfo: bool = False,
    raise_on_error: bool = True,
    memory: bool = False,
) -> ModelSummary:
    """Summarize ``model``: one :class:`SummaryRow` per module down to ``depth`` and the totals.

    ``inputs``: tensors (positional arguments), one tuple/list of them, and/or a dict of keyword
    arguments. ``input_size``: a shape or a list of shapes (with ``dtypes``, one per shape or one
    for all: ``"long"``, ``torch.float``...). With neither, no forward runs (parameters only).
    ``mode``: ``"same"`` (each module keeps its flag), ``"eval"`` or ``"train"``. ``device``: run on
    a copy on that device. ``meta``: run on a meta twin (shapes and FLOPs without weights or memory).
    ``columns``: subset of :data:`COLUMNS` to show. ``torchinfo``: also keep torchinfo's own table
    (run on a twin of the model) in ``.torchinfo``. ``memory``: also estimate the peak memory of an
    inference and of a training step (AdamW) with :func:`torchmagic.estimate_memory` (fake
    tensors; ``inference_peak_bytes``, ``training_peak_bytes`` and one note line).

    A failing forward raises :class:`ForwardError` naming the failing module, its class, its input
    shapes and torch's message; ``err.partial`` is the summary up to the failure
    (``raise_on_error=False`` returns that summary instead, with ``.error`` set). The user's model
    and torch's global state are never changed.
    """
    from torchmagic.core.twin import device_twin, is_meta_model, meta_twin

    model = require_module(model)
    model, wrapper_note = unwrap_model(model)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise TorchMagicError(f"depth must be a whole number >= 0; got {depth!r}")
    if isinstance(model, torch.jit.ScriptModule) and (inputs or input_size is not None):
        raise TorchMagicError(
            f"{type(model).__name__} is a TorchScript module: its forward runs inside TorchScript, "
            "where per-module shapes and FLOPs cannot be followed; summarize the Python nn.Module "
            "it was made from (before torch.jit.script/trace), or give no inputs to list its "
            "parameters")
    if (inputs or input_size is not None) and \
            getattr(type(model).forward, "__name__", "") == "_forward_unimplemented":
        raise TorchMagicError(
            f"{type(model).__name__} has no forward (a container): give no inputs to list its "
            "parameters, or summarize the model that calls its modules")
    if mode not in MODES:
        raise TorchMagicError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    cols = parse_columns(columns)
    if inputs and input_size is not None:
        raise TorchMagicError("give inputs either as tensors or as input_size shapes, not both")

    # -- parameters (metadata only) --
    index = ParamIndex.of(model)
    modules = [(p, m) for p, m in model.named_modules() if module_depth(p) <= depth]
    rows = {p: SummaryRow(path=p, cls=type(m).__name__, depth=module_depth(p), kernel=_kernel(m),
                          tied=tied_notes(p, m, index)) for p, m in modules}
    total = trainable = pbytes = 0
    by_dtype: dict[str, int] = {}
    for key, t in index.tensors.items():
        n, b = t.numel(), tensor_nbytes(t)
        total += n
        pbytes += b
        dt = str(t.dtype).replace("torch.", "")
        by_dtype[dt] = by_dtype.get(dt, 0) + b
        if t.requires_grad:
            trainable += n
        for prefix in prefixes(index.canonical[key]):
            row = rows.get(prefix)
            if row is not None:
                row.params += n
                if t.requires_grad:
                    row.trainable_params += n
    for row in rows.values():
        row.percent = 100.0 * row.params / total if total else 0.0
    buffer_bytes = sum(tensor_nbytes(b) for b in model.buffers())

    result = ModelSummary(
        model_class=type(model).__name__, rows=list(rows.values()), total_params=total,
        trainable_params=trainable, frozen_params=total - trainable, param_bytes=pbytes,
        param_bytes_by_dtype=by_dtype, buffer_bytes=buffer_bytes, depth=depth, mode=mode,
        columns=cols or list(DEFAULT_COLUMNS), explicit_columns=cols is not None,
    )
    if wrapper_note:
        result.notes.append(wrapper_note)
    for row in result.rows:
        if row.tied:
            result.notes.append(f"{row.name}: {'; '.join(row.tied)} (counted once)")

    if not inputs and input_size is None:
        if memory:
            raise TorchMagicError("memory=True (--memory) estimates the peak of a step and needs "
                                  "the model's inputs")
        if torchinfo:
            result.torchinfo = _torchinfo_table(model, None, {}, depth, mode, None, False, cols)
        return result

    # -- where to run --
    meta = bool(meta) or is_meta_model(model)
    if device is not None:
        dev = normal_device(device)
        if dev.type == "meta":
            meta = True
    if meta:
        target = torch.device("meta")
        run_model, is_twin = meta_twin(model), True
        result.meta = True
        result.notes.append("ran on a meta twin: no weights read, no memory used")
    elif device is not None:
        target = dev
        devices = {t.device for t in [*model.parameters(), *model.buffers()]}
        if devices and devices != {dev}:
            run_model, is_twin = device_twin(model, dev), True
            result.notes.append(f"ran on a copy of the model on {dev}")
        else:
            run_model, is_twin = model, False
    else:
        target = model_device(model)
        run_model, is_twin = model, False
    result.device = str(target)

    # -- inputs --
    prepared = prepare_inputs(model, *inputs, input_size=input_size, dtypes=dtypes,
                              target=target, move=meta or device is not None)
    args, kwargs = prepared.args, prepared.kwargs
    result.input_shapes = prepared.shapes
    result.input_dtypes = prepared.dtypes

    # -- forward --
    run = _forward(run_model, model, is_twin, mode, args, kwargs)
    _fill_rows(result, rows, run, args, kwargs,
               {p for p, m in modules if isinstance(m, nn.MultiheadAttention)})
    if run.error is not None:
        failing = run.tracer.failing_call
        from torchmagic.core.tracing import describe_failure

        msg = describe_failure(failing, run.error,
                               run.tracer.module_of(failing) if failing is not None else None)
        low = str(run.error).lower()
        msg += _failure_hint(run, low, input_size is not None and dtypes is None,
                             len(inputs) == 1 and type(inputs[0]) in (tuple, list))
        if meta and any(h in low for h in _META_HINTS):
            msg += (" (on the meta device tensors have shapes but no values: a forward that reads"
                    " values or mixes devices cannot run with --meta; run without it)")
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
        result.torchinfo = _torchinfo_table(model, args, kwargs, depth, mode,
                                            target, meta, cols)
    if memory:
        _estimate_peaks(result, model, inputs, input_size, dtypes)
    return result


def _estimate_peaks(result: ModelSummary, model: nn.Module, inputs: tuple[Any, ...],
                    input_size: Any, dtypes: Any) -> None:
    """``memory=True``: the inference and training-step peaks from ``estimate_memory`` (issue 13)."""
    from torchmagic.core.estimate import estimate_memory

    def human_bytes(n: int) -> str:
        return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    parts = []
    for train in (False, True):
        try:
            est = estimate_memory(model, *inputs, input_size=input_size, dtypes=dtypes,
                                  train=train, what_if=False)
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


def _fill_rows(result: ModelSummary, rows: dict[str, SummaryRow], run: _Run,
               args: tuple[Any, ...], kwargs: dict[str, Any],
               used_inside: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    from torchmagic.core.tracing import tensor_shapes

    tracer, counter = run.tracer, run.counter
    calls = tracer.calls
    result.ran_forward = True
    if calls and calls[0].parent is None:
        calls[0].input_shapes = tensor_shapes((args, kwargs))  # global pre-hooks miss kwargs
        result.output_shapes = calls[0].output_shapes
    failing = tracer.failing_call
    running = set(tracer.stack)
    act = 0
    callers = {c.parent for c in calls if c.parent is not None}
    for call in calls:
        if call.finished and call.index not in callers:
            # a call that makes no module call itself (a leaf module, or a module such as
            # nn.MultiheadAttention that uses its submodules' weights directly)
            act += call.output_bytes
        row = rows.get(call.path)
        if row is None:
            continue
        # A module nested inside a call of itself (recursion) is not counted twice.
        parent = call.parent
        nested = False
        while parent is not None:
            if calls[parent].path == call.path:
                nested = True
                break
            parent = calls[parent].parent
        if nested:
            continue
        if row.calls == 0:
            row.input_shapes = call.input_shapes
            row.output_shapes = call.output_shapes
            row.flops = 0
            row.output_bytes = 0
        row.calls += 1
        row.flops = (row.flops or 0) + counter.by_call[call.index]
        row.output_bytes = (row.output_bytes or 0) + (call.output_bytes if call.finished else 0)
        if call.extra.get("flops_analytic"):
            row.analytic_flops = True
        if failing is not None and call.index == failing.index:
            row.status = "failed"
        elif call.index in running and row.status != "failed":
            row.status = "running"
    # Containers that are never called themselves (ModuleList, ModuleDict, or a module whose
    # children are called directly by an ancestor) aggregate the calls made into their subtree.
    containers: dict[str, SummaryRow] = {}
    for call in calls:
        parent_path = calls[call.parent].path if call.parent is not None else None
        if parent_path is None or call.path == parent_path:
            continue
        base = parent_path + "." if parent_path else ""
        if not call.path.startswith(base):
            continue  # a module outside the tree, or a tree module called from elsewhere
        for prefix in prefixes(call.path + ".x"):
            if len(prefix) <= len(parent_path) or prefix == call.path:
                continue
            row = rows.get(prefix)
            if row is None or row.calls:
                continue
            containers[prefix] = row
            row.flops = (row.flops or 0) + counter.by_call[call.index]
            if call.index in running:
                row.status = "running"
    result.total_flops = counter.total
    result.activation_bytes = act
    if run.error is not None:
        result.rows = [r for r in result.rows if r.calls or r.path in containers]
    else:
        inside = []
        for r in result.rows:
            if not r.calls and r.path not in containers:
                parent = rows.get(r.path.rpartition(".")[0]) if r.path else None
                if parent is not None and parent.calls and parent.path in used_inside:
                    r.status = "in parent"
                    inside.append(r.name)
                else:
                    r.status = "not called"
        if inside:
            result.notes.append(
                f"{', '.join(inside[:3])}{' ...' if len(inside) > 3 else ''}: weights used "
                "directly by the parent's forward (nn.MultiheadAttention), not called as a module; "
                "their FLOPs are in the parent's row")
    if any(r.analytic_flops for r in result.rows):
        result.notes.append("recurrent modules (LSTM/GRU/RNN): FLOPs are the analytic matmul count")


# -- torchinfo, for comparison -------------------------------------------------------------------
_TORCHINFO_COLUMNS = {"input": "input_size", "output": "output_size", "params": "num_params",
                      "percent": "params_percent", "macs": "mult_adds", "flops": "mult_adds",
                      "kernel": "kernel_size", "trainable": "trainable"}


_TORCHINFO_ORDER = ("input_size", "output_size", "num_params", "params_percent", "kernel_size",
                    "mult_adds", "trainable")


def _shared_twin(model: nn.Module) -> nn.Module:
    """A structural copy whose parameters share the user's storage (no weight copy) and whose
    buffers are clones: whatever torchinfo does to it (``.to``, ``.train``) stays in the copy."""
    from torchmagic.core.twin import twin

    def convert(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter):
            return nn.Parameter(t.detach(), requires_grad=t.requires_grad)
        return t.detach().clone()

    return twin(model, convert)


def _torchinfo_table(model: nn.Module, args: tuple[Any, ...] | None, kwargs: dict[str, Any],
                     depth: int, mode: str, device: torch.device | None, meta: bool,
                     cols: list[str] | None) -> str:
    """torchinfo's own table for the same inputs and settings, run on a twin inside
    ``preserved_global_state`` (torchinfo moves models, resets flags, consumes the RNG and caches
    every model it saw: none of that reaches the user)."""
    try:
        import torchinfo
        from torchinfo import torchinfo as ti
    except Exception as exc:  # noqa: BLE001 - torchinfo missing or broken (e.g. numpy absent)
        return f"torchinfo is not available: {type(exc).__name__}: {exc}"
    from torchmagic.core.state import preserved_global_state
    from torchmagic.core.twin import meta_twin

    wanted = cols or list(DEFAULT_COLUMNS)
    col_names = []
    for c in wanted:
        name = _TORCHINFO_COLUMNS.get(c)
        if name and name not in col_names and (args is not None or c in ("params", "percent",
                                                                          "kernel", "trainable")):
            col_names.append(name)
    if not col_names:
        col_names = ["num_params"]
    # torchinfo's layer column is 40 wide and each column col_width + 1: keep the table within
    # 100 characters (the 4 columns most worth comparing when more were asked for)
    if len(col_names) > 4:
        prefer = ["input_size", "output_size", "num_params", "mult_adds", "params_percent",
                  "trainable", "kernel_size"]
        col_names = sorted(col_names, key=prefer.index)[:4]
        col_names = [c for c in _TORCHINFO_ORDER if c in col_names]
    col_width = max(10, min(25, (100 - 40) // len(col_names) - 1))
    ti_mode = mode if mode != "same" else ("train" if model.training else "eval")
    cache = ti._cached_forward_pass
    key = type(model).__name__
    had, prev = key in cache, cache.get(key)
    try:
        with preserved_global_state():
            copy = meta_twin(model) if meta else _shared_twin(model)
            call_kwargs: dict[str, Any] = {}
            if args is None:
                data = None
            elif kwargs and not args:
                data = kwargs
            else:
                data = list(args)
                clash = {"input_size", "input_data", "depth", "device", "mode", "dtypes",
                         "col_names", "verbose", "batch_dim", "row_settings", "col_width",
                         "cache_forward_pass"} & set(kwargs)
                if clash:
                    return (f"torchinfo cannot pass keyword input {sorted(clash)[0]!r} to the "
                            "model (it is one of its own options)")
                call_kwargs = kwargs
            stats = torchinfo.summary(copy, input_data=data, depth=depth, col_names=col_names,
                                      mode=ti_mode, device=device, verbose=0,
                                      row_settings=["var_names"], col_width=col_width,
                                      **call_kwargs)
            text = str(stats)
    except Exception as exc:  # noqa: BLE001 - torchinfo's own failure is reported, not raised
        text = f"torchinfo failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    finally:
        if had:
            cache[key] = prev
        else:
            cache.pop(key, None)
    note = "(torchinfo 'same' mode does not exist: ran in the root module's mode)" \
        if mode == "same" and args is not None else ""
    return text + ("\n" + note if note else "")


__all__ = ["COLUMNS", "DEFAULT_COLUMNS", "MODES", "ModelSummary", "SummaryRow", "summary",
           "parse_dtype", "parse_columns", "normalize_shapes"]
