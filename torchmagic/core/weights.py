"""The weights of a model as torchmagic counts them, whatever kind of tensor holds them.

``model.parameters()`` misses or mis-sizes three kinds of weight that real models carry:

- **uninitialized parameters** of lazy modules (``nn.LazyLinear`` before its first forward):
  ``numel()`` raises; they are listed by name, with no element count (:func:`is_uninitialized`);
- **packed quantized weights** (``torch.ao.nn.quantized`` and ``.dynamic`` modules): held in a
  ``torch.ScriptObject`` (``LinearPackedParams._packed_params``, a quantized conv's
  ``_packed_params``, a dynamic LSTM's ``PackedParameter``), never in ``parameters()``; read with the
  object's own ``unpack()`` (or ``__getstate__``) by :func:`packed_weights`;
- **tensor subclasses** (torchao-style int8/int4 weight-only wrappers, float8 weights, nested
  tensors): ``numel() * element_size()`` is the size of the *logical* tensor, not of what is
  stored; :func:`storage_bytes` adds up the inner tensors (``__tensor_flatten__``), plus the scales
  and zero points of per-channel quantized tensors.

Only metadata is read, except for packed quantized weights, which are unpacked (a CPU copy of their
int8 data, the size of the weight itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


def is_uninitialized(t: Any) -> bool:
    """True for an ``UninitializedParameter``/``UninitializedBuffer`` (lazy modules)."""
    from torch.nn.parameter import is_lazy

    return isinstance(t, torch.Tensor) and is_lazy(t)


def dtype_name(dt: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dt).replace("torch.", "")


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def inner_tensors(t: torch.Tensor, depth: int = 0) -> list[torch.Tensor] | None:
    """The plain tensors a wrapper subclass stores (``__tensor_flatten__``, recursively), or None
    for a plain tensor."""
    if _plain(t) or depth > 4:
        return None
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return None
    try:
        names, _ = flatten()
    except Exception:  # noqa: BLE001 - a subclass whose flatten fails: counted as a plain tensor
        return None
    out: list[torch.Tensor] = []
    for name in names:
        inner = getattr(t, name, None)
        if not isinstance(inner, torch.Tensor):
            continue
        deeper = inner_tensors(inner, depth + 1)
        out.extend(deeper if deeper is not None else [inner])
    return out


def storage_pieces(t: torch.Tensor) -> list[tuple[torch.dtype, int]]:
    """``(dtype, bytes)`` of what ``t`` really stores: its own elements for a plain tensor; the
    inner tensors of a wrapper subclass or a nested tensor; the integer data plus per-channel
    scales and zero points of a quantized tensor. Raises for an uninitialized parameter."""
    inner = inner_tensors(t)
    if inner is not None:
        pieces: list[tuple[torch.dtype, int]] = []
        for x in inner:
            pieces.extend(storage_pieces(x))
        return pieces
    if t.is_nested:  # a strided nested tensor: one buffer of values (numel counts them)
        return [(t.dtype, t.numel() * t.element_size())]
    pieces = [(t.dtype, t.numel() * t.element_size())]
    if t.is_quantized and t.qscheme() in (torch.per_channel_affine,
                                          torch.per_channel_affine_float_qparams,
                                          torch.per_channel_symmetric):
        for q in (t.q_per_channel_scales(), t.q_per_channel_zero_points()):
            pieces.append((q.dtype, q.numel() * q.element_size()))
    return pieces


def storage_bytes(t: torch.Tensor) -> int:
    """True bytes stored by ``t`` (see :func:`storage_pieces`)."""
    return sum(b for _, b in storage_pieces(t))


def storage_dtype(t: torch.Tensor) -> str:
    """The dtype that holds most of ``t``'s bytes (``"int8"`` for an int8 weight-only wrapper whose
    logical dtype is bfloat16); ``t.dtype`` for a plain tensor."""
    pieces = storage_pieces(t)
    if len(pieces) <= 1 or _plain(t) or t.is_quantized:
        return dtype_name(t.dtype)
    by: dict[torch.dtype, int] = {}
    for dt, b in pieces:
        by[dt] = by.get(dt, 0) + b
    return dtype_name(max(by, key=lambda d: by[d]))


def quant_kind(t: torch.Tensor) -> str | None:
    """How a weight is quantized or wrapped, for the report: ``"qint8 per-tensor"``, the subclass
    name (``"Int8WeightOnlyTensor"``), ``"float8_e4m3fn"``; None for a plain float weight."""
    if not _plain(t) and not t.is_nested:
        return type(t).__name__
    if t.is_quantized:
        scheme = {torch.per_tensor_affine: "per-tensor", torch.per_tensor_symmetric: "per-tensor",
                  torch.per_channel_affine: "per-channel",
                  torch.per_channel_symmetric: "per-channel",
                  torch.per_channel_affine_float_qparams: "per-channel"}.get(t.qscheme(), "")
        return f"{dtype_name(t.dtype)} {scheme}".strip()
    if "float8" in str(t.dtype) or "float4" in str(t.dtype):
        return dtype_name(t.dtype)
    return None


# -- packed quantized weights --------------------------------------------------------------------
@dataclass
class PackedWeight:
    """A weight stored in a quantized module's packed ``ScriptObject``.

    ``name``: ``<module path>.weight`` / ``.bias`` (``.0``, ``.1``... when the object does not say);
    ``owner``: the module holding the object; ``tensor``: the unpacked tensor (``None`` when it
    could not be read); ``dtype``: its storage dtype (``float16`` for fp16 packed weights, which
    unpack to float32).
    """

    name: str
    owner: str
    module_class: str
    tensor: torch.Tensor | None
    dtype: str = ""
    nbytes: int = 0

    @property
    def numel(self) -> int | None:
        return None if self.tensor is None else self.tensor.numel()


def _script_tensors(obj: Any, depth: int = 0) -> list[torch.Tensor] | None:
    """Tensors packed in a ``ScriptObject``: ``unpack()`` when it has one (linear, conv, embedding
    packed params), else ``__getstate__`` walked recursively (a dynamic RNN's cell params hold
    nested packed objects). None when neither works."""
    if depth > 3:
        return None
    state = None
    for method in ("unpack", "__getstate__"):
        try:
            if obj._has_method(method):
                state = getattr(obj, method)()
                break
        except Exception:  # noqa: BLE001 - an object that cannot be unpacked: unknown count
            continue
    if state is None:
        return None
    own: list[torch.Tensor] = []
    nested: list[torch.Tensor] = []

    def walk(x: Any) -> bool:
        if isinstance(x, torch.Tensor):
            own.append(x)
        elif isinstance(x, torch.ScriptObject):
            inner = _script_tensors(x, depth + 1)
            if inner is None:
                return False
            nested.extend(inner)
        elif isinstance(x, (list, tuple)):
            return all(walk(y) for y in x)
        return True

    if not walk(state):
        return None
    # A dynamic RNN cell's state lists its biases and also its packed linear params, which
    # unpack to (weight, bias) again: a tensor equal to an unpacked one is the same weight.
    def duplicate(t: torch.Tensor) -> bool:
        return any(u.shape == t.shape and u.dtype == t.dtype and not u.is_quantized
                   and torch.equal(u, t) for u in nested)

    return nested + [t for t in own if t.is_quantized or not duplicate(t)]


def packed_weights(model: nn.Module) -> tuple[list[PackedWeight], list[str]]:
    """Weights held in ``torch.ScriptObject`` attributes of ``model``'s modules (quantized
    packed params), and the paths of modules whose packed object could not be read.

    A conv's ``unpack()`` state also holds an int16 tensor of its stride/padding: only
    ``unpack()`` results are read for objects that have it."""
    out: list[PackedWeight] = []
    unknown: list[str] = []
    for path, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if not isinstance(value, torch.ScriptObject):
                continue
            tensors = _script_tensors(value)
            if tensors is None:
                unknown.append(path or "(root)")
                out.append(PackedWeight(name=".".join(p for p in (path, attr) if p), owner=path,
                                        module_class=mod._get_name(), tensor=None))
                continue
            declared = getattr(mod, "dtype", None)
            named = value._has_method("unpack") and len(tensors) <= 2
            for i, t in enumerate(tensors):
                suffix = ("weight", "bias")[i] if named else str(i)
                base = path if attr in ("_packed_params", "_packed_weight", "param") else \
                    ".".join(p for p in (path, attr) if p)
                name = ".".join(p for p in (base, suffix) if p)
                dt, nbytes = storage_dtype(t), storage_bytes(t)
                if declared == torch.float16 and t.dtype == torch.float32 and i == 0:
                    dt, nbytes = "float16", t.numel() * 2  # fp16 packed weights unpack to float32
                out.append(PackedWeight(name=name, owner=path, module_class=mod._get_name(),
                                        tensor=t, dtype=dt, nbytes=nbytes))
    return out, unknown


# -- one list of every weight --------------------------------------------------------------------
@dataclass
class Weight:
    """One weight tensor, counted once (tied weights under their first name).

    ``kind``: ``"parameter"``, ``"packed"`` (quantized, not in ``parameters()``) or
    ``"uninitialized"`` (lazy; ``numel``/``nbytes`` are None). ``dtype`` is the storage dtype,
    ``quant`` how it is quantized or wrapped (None for plain float weights).
    """

    name: str
    names: list[str]
    kind: str
    numel: int | None
    nbytes: int | None
    dtype: str
    device: str
    requires_grad: bool
    shape: tuple[int, ...] | None
    quant: str | None = None


def parameter_weight(name: str, names: list[str], p: torch.Tensor) -> Weight:
    """The :class:`Weight` of a parameter (uninitialized ones have no size)."""
    if is_uninitialized(p):
        return Weight(name, names, "uninitialized", None, None, dtype_name(p.dtype),
                      str(p.device), bool(p.requires_grad), None)
    return Weight(name, names, "parameter", p.numel(), storage_bytes(p), storage_dtype(p),
                  str(p.device), bool(p.requires_grad), tuple(int(s) for s in p.shape),
                  quant_kind(p))


def packed_weight(w: PackedWeight) -> Weight:
    t = w.tensor
    if t is None:
        return Weight(w.name, [w.name], "packed", None, None, "?", "cpu", False, None)
    return Weight(w.name, [w.name], "packed", t.numel(), w.nbytes, w.dtype, str(t.device), False,
                  tuple(t.shape), quant_kind(t) or (w.dtype if w.dtype != "float32" else None))


def iter_weights(named: Iterator[tuple[str, list[str], torch.Tensor]],
                 packed: list[PackedWeight]) -> Iterator[Weight]:
    """:class:`Weight` s of ``(name, names, parameter)`` triples, then of packed weights."""
    for name, names, p in named:
        yield parameter_weight(name, names, p)
    for w in packed:
        yield packed_weight(w)


def nbytes_of(t: torch.Tensor) -> int:
    """Bytes of a parameter/buffer/output: true storage, 0 for an uninitialized one."""
    if is_uninitialized(t):
        return 0
    try:
        return storage_bytes(t)
    except Exception:  # noqa: BLE001 - an exotic tensor whose size cannot be read
        return 0


def numel_of(t: torch.Tensor) -> int:
    """``t.numel()``; 0 for an uninitialized parameter or buffer."""
    return 0 if is_uninitialized(t) else t.numel()


__all__ = ["PackedWeight", "Weight", "dtype_name", "inner_tensors", "is_uninitialized",
           "iter_weights", "nbytes_of", "numel_of", "packed_weights", "quant_kind",
           "storage_bytes", "storage_dtype", "storage_pieces"]
