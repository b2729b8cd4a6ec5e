"""``params(model)``: where a model's parameters are, how many, of which dtype, on which device.

Counting rules (shared with :mod:`torchmagic.core.summary`):

- every parameter tensor is counted once, so totals equal ``sum(p.numel() for p in
  model.parameters())``; a tensor reachable under several names (tied weights such as a decoder's
  ``lm_head.weight`` that *is* ``wte.weight``) belongs to its *canonical* name, the first one in
  ``named_parameters()`` order, and is listed once with all its names;
- a module's count is recursive: the parameters whose canonical name lies in its subtree;
- buffers (BatchNorm running statistics, masks, ...) are counted separately, never as parameters.

Only metadata is read (shape, dtype, device, ``requires_grad``): works on meta models of any size
and never touches values.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core._result import Result
from torchmagic.core.errors import TorchMagicError
from torchmagic.core.weights import (
    PackedWeight,
    Weight,
    iter_weights,
    nbytes_of,
    numel_of,
    packed_weights,
)


# -- shared helpers ------------------------------------------------------------------------------
@dataclass
class ParamIndex:
    """Each distinct parameter tensor of a model with its canonical name and all its names, plus
    the weights ``parameters()`` does not size: uninitialized (lazy) parameters and packed
    quantized weights (:mod:`torchmagic.core.weights`)."""

    canonical: dict[int, str]          # id(tensor) -> first name
    names: dict[int, list[str]]        # id(tensor) -> every name, in named_parameters order
    tensors: dict[int, torch.Tensor]   # id(tensor) -> tensor, in first-seen order (lazy included)
    packed: list[PackedWeight] = field(default_factory=list)
    unknown_packed: list[str] = field(default_factory=list)  # modules whose packed weights are unreadable

    @classmethod
    def of(cls, model: nn.Module) -> ParamIndex:
        canonical: dict[int, str] = {}
        names: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            key = id(p)
            if key not in canonical:
                canonical[key] = name
                tensors[key] = p
                names[key] = []
            names[key].append(name)
        packed, unknown = packed_weights(model)
        return cls(canonical, names, tensors, packed, unknown)

    def tied(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        for key, t in self.tensors.items():
            if len(self.names[key]) > 1:
                yield t, self.names[key]

    def weights(self) -> list[Weight]:
        """Every weight once: parameters (uninitialized ones without a size), then packed
        quantized weights."""
        return list(iter_weights(((self.canonical[k], self.names[k], t)
                                  for k, t in self.tensors.items()), self.packed))


def prefixes(name: str) -> Iterator[str]:
    """Module paths owning ``name`` (a parameter/buffer name): ``""``, ``"a"``, ``"a.b"`` for
    ``"a.b.weight"``."""
    yield ""
    parts = name.split(".")[:-1]
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def tensor_nbytes(t: torch.Tensor) -> int:
    """True bytes of a parameter or buffer (tensor subclasses: their inner tensors; quantized
    tensors: data, scales and zero points); 0 for an uninitialized (lazy) one."""
    return nbytes_of(t)


def module_depth(path: str) -> int:
    return 0 if not path else path.count(".") + 1


def tied_notes(path: str, module: nn.Module, index: ParamIndex) -> list[str]:
    """``["weight tied to wte.weight"]`` for the parameters of ``module`` owned elsewhere."""
    notes = []
    for pname, p in module._parameters.items():
        if p is None:
            continue
        full = f"{path}.{pname}" if path else pname
        owner = index.canonical.get(id(p))
        if owner is not None and owner != full:
            notes.append(f"{pname} tied to {owner}")
    return notes


def require_module(model: Any, what: str = "MODEL") -> nn.Module:
    """``model`` if it is an ``nn.Module``, else a one-line :class:`TorchMagicError`."""
    if isinstance(model, nn.Module):
        return model
    kind = type(model).__name__
    hint = ""
    if isinstance(model, torch.Tensor):
        hint = " (a tensor; for tensors use %tensor)"
    elif isinstance(model, dict):
        hint = " (a dict, e.g. a state_dict: load it into a model first)"
    elif isinstance(model, type) and issubclass(model, nn.Module):
        hint = f" (the class {model.__name__} itself: create an instance, e.g. {model.__name__}())"
    raise TorchMagicError(f"{what} must be a torch.nn.Module; got {kind}{hint}")


def unwrap_model(model: nn.Module) -> tuple[nn.Module, str | None]:
    """``nn.DataParallel``/``DistributedDataParallel`` and ``torch.compile``'s ``OptimizedModule``
    -> the module they wrap (what the user wants summarized), with a note saying so."""
    notes = []
    for _ in range(4):  # wrappers may nest: DataParallel(torch.compile(m))
        cls = type(model).__name__
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            notes.append(f"{cls} wrapper: showing the module it wraps (.module)")
        elif cls == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
            notes.append("torch.compile wrapper: showing the original module (._orig_mod) in "
                         "eager mode")
        else:
            break
    return model, ("; ".join(notes) or None)


# -- result --------------------------------------------------------------------------------------
@dataclass
class ParamRow:
    """One module of the breakdown (counts are recursive over its subtree)."""

    path: str
    cls: str
    depth: int
    params: int = 0
    trainable: int = 0
    frozen: int = 0
    bytes: int = 0
    buffers: int = 0          # buffer elements
    buffer_bytes: int = 0
    dtypes: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    percent: float = 0.0      # of the model's total parameters
    uninitialized: int = 0    # lazy parameters in the subtree (no size yet, not in params)
    unknown: int = 0          # packed quantized weights whose size could not be read

    @property
    def name(self) -> str:
        return self.path or "(root)"


@dataclass
class TiedParam:
    """A parameter tensor reachable under several names (counted once)."""

    names: list[str]
    numel: int
    shape: tuple[int, ...]
    dtype: str


@dataclass
class ParamReport(Result):
    """What ``%params`` shows. ``rows`` are modules in ``named_modules()`` order down to ``depth``;
    with ``only="trainable"``/``"frozen"`` their counts cover only that kind and modules without any
    are left out (the totals stay the whole model's)."""

    _display_module = "torchmagic.display.params"

    model_class: str
    name: str
    total_params: int
    trainable_params: int
    frozen_params: int
    param_bytes: int
    param_tensors: int
    params_by_dtype: dict[str, int]
    bytes_by_dtype: dict[str, int]
    devices: dict[str, int]            # device -> parameter elements on it
    buffer_count: int
    total_buffers: int                 # buffer elements
    buffer_bytes: int
    buffer_devices: dict[str, int]
    rows: list[ParamRow]
    tied: list[TiedParam]
    depth: int
    only: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    uninitialized: list[str] = field(default_factory=list)  # lazy parameters: not counted
    packed_params: int = 0            # elements in packed quantized weights (in total_params)
    quantized: dict[str, int] = field(default_factory=dict)  # quantization kind -> elements
    unknown: list[str] = field(default_factory=list)  # modules whose weights could not be read

    @property
    def split_devices(self) -> bool:
        """True when parameters/buffers live on more than one device."""
        return len(set(self.devices) | set(self.buffer_devices)) > 1

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-friendly data, plus ``split_devices`` and ``trainable_percent``."""
        d = super().to_dict()
        d["split_devices"] = self.split_devices
        d["trainable_percent"] = self.trainable_percent
        return d


def module_class(module: nn.Module) -> str:
    """The class name shown for a module: its ``_get_name()`` (``DynamicQuantizedLinear`` where
    the class itself is called ``Linear``)."""
    try:
        name = module._get_name()
    except Exception:  # noqa: BLE001 - a user override that fails: the class name
        name = ""
    return name if isinstance(name, str) and name else type(module).__name__


def mark_unsized(rows: dict[str, Any], w: Weight) -> None:
    """Count a weight without a size (uninitialized lazy parameter, unreadable packed weight) in
    the ``uninitialized`` / ``unknown`` field of every row owning it."""
    for prefix in prefixes(w.name):
        row = rows.get(prefix)
        if row is not None:
            if w.kind == "uninitialized":
                row.uninitialized += 1
            else:
                row.unknown += 1


def weight_notes(weights: list[Weight], unknown: list[str]) -> list[str]:
    """Notes on weights ``parameters()`` does not size: lazy, packed quantized, unreadable."""
    notes = []
    lazy = [w.name for w in weights if w.kind == "uninitialized"]
    if lazy:
        shown = ", ".join(lazy[:4]) + (f" ... ({len(lazy)} in all)" if len(lazy) > 4 else "")
        notes.append(f"{len(lazy)} uninitialized parameters of lazy modules ({shown}): no size "
                     "until the first forward, not counted; give inputs to see the counts they "
                     "make")
    packed = [w for w in weights if w.kind == "packed" and w.numel is not None]
    if packed:
        n = sum(w.numel or 0 for w in packed)
        notes.append(f"{n:,} elements in {len(packed)} packed quantized weights (torch.ao "
                     "quantized modules: not in parameters(), not trainable) are counted")
    kinds: dict[str, int] = {}
    for w in weights:
        if w.quant and w.numel is not None:
            kinds[w.quant] = kinds.get(w.quant, 0) + w.numel
    if kinds:
        shown = ", ".join(f"{k} {n:,}" for k, n in sorted(kinds.items()))
        notes.append(f"quantized / low-precision weights (elements): {shown}; bytes are what they "
                     "store (integer data, scales and zero points)")
    if unknown:
        notes.append(f"packed weights of {', '.join(unknown[:4])} could not be read: their size "
                     "is unknown (not counted)")
    return notes


def params(model: nn.Module, depth: int = 3, only: str | None = None,
           name: str = "model") -> ParamReport:
    """Count ``model``'s parameters: totals, trainable/frozen, bytes and counts by dtype, devices
    (a warning when they are split over several devices), a per-module breakdown down to ``depth``
    (``only="trainable"``/``"frozen"`` restricts it), tied parameters with all their names, and
    buffers counted separately. Reads metadata only (works on meta models).

    Beyond ``parameters()``: packed quantized weights (``torch.ao.nn.quantized``) are counted (not
    trainable), with their true bytes by storage dtype; tensor-subclass weights count their
    logical elements and the bytes they really store; uninitialized (lazy) parameters are listed
    in ``uninitialized`` and not counted."""
    model, wrapper_note = unwrap_model(require_module(model))
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise TorchMagicError(f"depth must be a whole number >= 0; got {depth!r}")
    if only not in (None, "trainable", "frozen"):
        raise TorchMagicError(f"only must be 'trainable', 'frozen' or None; got {only!r}")

    index = ParamIndex.of(model)
    modules = [(p, m) for p, m in model.named_modules() if module_depth(p) <= depth]
    rows = {p: ParamRow(path=p, cls=module_class(m), depth=module_depth(p)) for p, m in modules}
    dtypes: dict[str, set[str]] = {p: set() for p in rows}
    devs: dict[str, set[str]] = {p: set() for p in rows}

    total = trainable = nbytes = packed_elems = 0
    by_dtype: dict[str, int] = {}
    bytes_by_dtype: dict[str, int] = {}
    devices: dict[str, int] = {}
    quantized: dict[str, int] = {}
    weights = index.weights()
    for w in weights:
        if w.numel is None:  # uninitialized (lazy) or unreadable: named, not counted
            mark_unsized(rows, w)
            continue
        n, b, dt = w.numel, w.nbytes or 0, w.dtype
        total += n
        nbytes += b
        if w.requires_grad:
            trainable += n
        if w.kind == "packed":
            packed_elems += n
        if w.quant:
            quantized[w.quant] = quantized.get(w.quant, 0) + n
        by_dtype[dt] = by_dtype.get(dt, 0) + n
        bytes_by_dtype[dt] = bytes_by_dtype.get(dt, 0) + b
        devices[w.device] = devices.get(w.device, 0) + n
        kind_ok = (only is None or (only == "trainable") == w.requires_grad)
        if not kind_ok:
            continue
        for prefix in prefixes(w.name):
            row = rows.get(prefix)
            if row is None:
                continue
            row.params += n
            row.bytes += b
            if w.requires_grad:
                row.trainable += n
            else:
                row.frozen += n
            dtypes[prefix].add(dt)
            devs[prefix].add(w.device)

    buffer_count = buffer_elems = buffer_bytes = 0
    buffer_devices: dict[str, int] = {}
    for bname, buf in model.named_buffers():
        buffer_count += 1
        buffer_elems += numel_of(buf)
        buffer_bytes += tensor_nbytes(buf)
        buffer_devices[str(buf.device)] = buffer_devices.get(str(buf.device), 0) + numel_of(buf)
        for prefix in prefixes(bname):
            row = rows.get(prefix)
            if row is not None:
                row.buffers += numel_of(buf)
                row.buffer_bytes += tensor_nbytes(buf)

    for path, module in modules:
        row = rows[path]
        row.dtypes = sorted(dtypes[path])
        row.devices = sorted(devs[path])
        row.tied = tied_notes(path, module, index)
        row.percent = 100.0 * row.params / total if total else 0.0

    out_rows = list(rows.values())
    if only is not None:
        out_rows = [r for r in out_rows if r.params or r.depth == 0]

    tied = [TiedParam(names=list(w.names), numel=w.numel or 0, shape=w.shape or (),
                      dtype=w.dtype) for w in weights if len(w.names) > 1]
    warnings = []
    all_devices = sorted(set(devices) | set(buffer_devices))
    if len(all_devices) > 1:
        where = ", ".join(f"{d}: {devices.get(d, 0):,} params" for d in all_devices)
        warnings.append(f"model is split across {len(all_devices)} devices ({where}); "
                        "inputs and every module must agree, or forward fails with a device error")
    notes = [wrapper_note] if wrapper_note else []
    if "meta" in devices and len(all_devices) == 1:
        notes.append("parameters are on the meta device: shapes only, no values")
    notes.extend(weight_notes(weights, index.unknown_packed))

    return ParamReport(
        model_class=module_class(model), name=name, total_params=total,
        trainable_params=trainable, frozen_params=total - trainable, param_bytes=nbytes,
        param_tensors=len(weights), params_by_dtype=by_dtype, bytes_by_dtype=bytes_by_dtype,
        devices=devices, buffer_count=buffer_count, total_buffers=buffer_elems,
        buffer_bytes=buffer_bytes, buffer_devices=buffer_devices, rows=out_rows, tied=tied,
        depth=depth, only=only, warnings=warnings, notes=notes,
        uninitialized=[w.name for w in weights if w.kind == "uninitialized"],
        packed_params=packed_elems, quantized=quantized, unknown=list(index.unknown_packed),
    )


__all__ = ["ParamIndex", "ParamReport", "ParamRow", "TiedParam", "mark_unsized", "module_class",
           "params", "require_module", "weight_notes"]
