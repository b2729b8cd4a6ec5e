"""The rows of ``%summary``: parameters per module (before any forward) and what the forward's trace
adds to them (shapes, FLOPs, output bytes, calls, status).

Parameters follow :mod:`torchmagic.core.params` (tied weights counted once, at their first name;
packed quantized weights counted; uninitialized lazy parameters named, not counted). A module
registered under several names (one instance, two parents) has one row, at its first name, that
says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from torchmagic.core.params import (
    ParamIndex,
    mark_unsized,
    module_class,
    module_depth,
    prefixes,
    tensor_nbytes,
    tied_notes,
)


@dataclass
class SummaryRow:
    """One module (down to ``depth``), aggregating all its calls.

    ``params`` counts the module's subtree (tied parameters at their first name only; packed
    quantized weights included; ``uninitialized`` lazy parameters and ``unknown`` packed weights
    are not counted but numbered); ``input_shapes``/``output_shapes`` are those of the first call,
    keyword arguments' tensors last (``None``: not called, or no forward ran); ``output_type`` names
    a result that is not a tensor or a plain tuple/list/dict (``"Categorical"``, a ``ModelOutput``);
    ``flops`` and ``output_bytes`` sum every call (``None`` without a forward); ``uncounted`` is the
    number of op calls in the subtree that multiply-add but have no FLOP formula (their FLOPs are
    missing from ``flops``); ``shared`` the other names of this very module.
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
    uninitialized: int = 0
    unknown: int = 0
    shared: list[str] = field(default_factory=list)
    output_type: str | None = None
    input_kwargs: list[str] = field(default_factory=list)
    uncounted: int = 0

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
class ParamTotals:
    """Whole-model parameter totals (see :class:`torchmagic.core.summary.ModelSummary`)."""

    total: int = 0
    trainable: int = 0
    nbytes: int = 0
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    buffer_bytes: int = 0
    uninitialized: list[str] = field(default_factory=list)
    packed: int = 0
    unknown: list[str] = field(default_factory=list)
    quantized: dict[str, int] = field(default_factory=dict)


def kernel_of(module: nn.Module) -> str | None:
    """``"3x3"`` for a module with a ``kernel_size`` (conv, pool), else None."""
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


def shared_modules(model: nn.Module) -> dict[str, list[str]]:
    """First name -> the other names of every module registered under several names."""
    paths: dict[int, list[str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        names = paths.setdefault(id(mod), [])
        if path not in names:
            names.append(path)
    return {names[0]: names[1:] for names in paths.values() if len(names) > 1}


def param_rows(model: nn.Module, depth: int,
               index: ParamIndex | None = None) -> tuple[dict[str, SummaryRow], ParamTotals]:
    """Rows (``named_modules()`` order, down to ``depth``) with their parameter counts, and the
    totals. Reads metadata only (packed quantized weights are unpacked)."""
    index = ParamIndex.of(model) if index is None else index
    modules = [(p, m) for p, m in model.named_modules() if module_depth(p) <= depth]
    rows = {p: SummaryRow(path=p, cls=module_class(m), depth=module_depth(p), kernel=kernel_of(m),
                          tied=tied_notes(p, m, index)) for p, m in modules}
    tot = ParamTotals()
    for w in index.weights():
        if w.numel is None:
            if w.kind == "uninitialized":
                tot.uninitialized.append(w.name)
            mark_unsized(rows, w)
            continue
        n, b = w.numel, w.nbytes or 0
        tot.total += n
        tot.nbytes += b
        tot.bytes_by_dtype[w.dtype] = tot.bytes_by_dtype.get(w.dtype, 0) + b
        if w.kind == "packed":
            tot.packed += n
        if w.quant:
            tot.quantized[w.quant] = tot.quantized.get(w.quant, 0) + n
        if w.requires_grad:
            tot.trainable += n
        for prefix in prefixes(w.name):
            row = rows.get(prefix)
            if row is not None:
                row.params += n
                if w.requires_grad:
                    row.trainable_params += n
    tot.unknown = list(index.unknown_packed)
    for row in rows.values():
        row.percent = 100.0 * row.params / tot.total if tot.total else 0.0
    for first, others in shared_modules(model).items():
        row = rows.get(first)
        if row is not None:
            row.shared = others
    tot.buffer_bytes = sum(tensor_nbytes(b) for b in model.buffers())
    return rows, tot


def shared_notes(rows: list[SummaryRow]) -> list[str]:
    """``"blocks.0 is also registered as blocks.2 ..."`` for rows of modules with several names."""
    out = []
    for row in rows:
        if row.shared:
            others = ", ".join(row.shared[:3]) + (" ..." if len(row.shared) > 3 else "")
            out.append(f"{row.name} is also registered as {others} (one module under "
                       f"{len(row.shared) + 1} names: its parameters are counted once and its "
                       "calls under every name are in this row)")
    return out


def fill_rows(result: Any, rows: dict[str, SummaryRow], tracer: Any, counter: Any,
              error: BaseException | None, used_inside: set[str]) -> None:
    """Fill ``rows`` (and ``result``'s forward totals) from a traced forward: shapes of the first
    call, FLOPs and output bytes summed over calls, container rows aggregating their subtree, the
    status of each row (not called, failed, running, weights used by the parent) and the ops that
    could not be counted."""
    calls = tracer.calls
    result.ran_forward = True
    if calls and calls[0].parent is None:
        result.output_shapes = calls[0].output_shapes
        result.output_type = calls[0].output_type
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
            row.input_kwargs = list(call.kwargs)
            row.output_shapes = call.output_shapes
            row.output_type = call.output_type
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
    _uncounted(result, rows, calls, counter.uncounted)
    if error is not None:
        result.rows = [r for r in result.rows if r.calls or r.path in containers]
    else:
        inside = []
        for r in result.rows:
            if not r.calls and r.path not in containers:
                parent = rows.get(r.path.rpartition(".")[0]) if r.path else None
                while parent is not None and not parent.calls and parent.path:
                    parent = rows.get(parent.path.rpartition(".")[0])  # up to the called one
                if parent is not None and parent.calls and parent.path in used_inside:
                    r.status = "in parent"
                    inside.append(r.name)
                else:
                    r.status = "not called"
        if inside:
            result.notes.append(
                f"{', '.join(inside[:3])}{' ...' if len(inside) > 3 else ''}: weights used "
                "directly by the parent's forward (nn.MultiheadAttention, quantized modules), not "
                "called as a module; their FLOPs are in the parent's row")
    if any(r.analytic_flops for r in result.rows):
        result.notes.append("recurrent modules (LSTM/GRU/RNN): FLOPs are the analytic matmul count")


@dataclass
class UncountedOp:
    """An op that multiplies and adds but has no FLOP formula: ``calls`` calls of ``op`` made by
    module ``module`` (its qualified name; ``""`` the root, ``None`` outside any module)."""

    op: str
    module: str | None
    calls: int


def _uncounted(result: Any, rows: dict[str, SummaryRow], calls: list[Any],
               uncounted: dict[tuple[str, int | None], int]) -> None:
    merged: dict[tuple[str, str | None], int] = {}
    for (op, idx), n in uncounted.items():
        path = calls[idx].path if idx is not None else None
        merged[(op, path)] = merged.get((op, path), 0) + n
        seen: set[str] = set()
        while idx is not None:  # every enclosing row misses these FLOPs too
            call = calls[idx]
            for prefix in prefixes(call.path + ".x") if call.path else [""]:
                if prefix not in seen and prefix in rows:
                    seen.add(prefix)
                    rows[prefix].uncounted += n
            idx = call.parent
    result.uncounted = [UncountedOp(op, path, n) for (op, path), n in merged.items()]
    if result.uncounted:
        parts = [f"{u.op} in {u.module or '(root)' if u.module is not None else 'no module'} "
                 f"({u.calls} call{'s' if u.calls != 1 else ''})" for u in result.uncounted[:4]]
        more = f" and {len(result.uncounted) - 4} more" if len(result.uncounted) > 4 else ""
        result.notes.append(
            "NOT COUNTED: ops that multiply-add but have no FLOP formula (or, marked \"size "
            "from data\", a size known only from the values): "
            f"{'; '.join(parts)}{more}. FLOPs of rows marked +? (and the total) leave them out")


__all__ = ["ParamTotals", "SummaryRow", "UncountedOp", "fill_rows", "kernel_of", "param_rows",
           "shared_modules", "shared_notes"]
