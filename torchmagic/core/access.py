"""Safe, generic access to the user's tensors, whatever their layout or subclass.

Every place that reads user tensors without knowing what they are (``%%benchmark``'s change watch,
the test snapshot helper, ``%tensor``, ``%tensors``, ``%gpumem --top``, ``%checkpoint``) goes
through this module. It knows the tensors that need care and never calls an op that can crash the
process on them: ``view(torch.uint8)`` on a quantized tensor returns a tensor whose first use
segfaults (no ``except`` can catch that), so raw bytes are only ever taken from plain strided
storage.

What it knows (:func:`kind`):

=================  ============================================================================
``dense``          strided tensor with readable memory (plain ``Tensor``, ``Parameter``, a
                   subclass that only overrides ``__torch_function__``)
``meta``           meta device: shape and dtype, no values
``fake``           ``FakeTensor``: no values
``uninitialized``  ``UninitializedParameter`` / ``UninitializedBuffer`` (lazy modules): no shape
``functional``     functionalization wrapper (``torch._to_functional_tensor``): values read from
                   the wrapped tensor
``quantized``      ``torch.quantize_per_tensor`` / ``per_channel``: integer representation plus
                   scale and zero point
``sparse``         COO, CSR, CSC, BSR, BSC: indices and values
``nested``         nested tensors (strided or jagged): their values buffer and sizes
``mkldnn``         opaque oneDNN tensors: values through ``to_dense()``
``wrapper``        tensor subclasses with ``__torch_dispatch__`` (torchao-style wrapper subclasses,
                   ``TwoTensor``): values through their ``__tensor_flatten__`` inner tensors
``opaque``         a dispatch subclass without ``__tensor_flatten__``: metadata only
=================  ============================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr,
                  torch.sparse_bsc)
_PLAIN_TYPES = (torch.Tensor, nn.Parameter, getattr(nn, "Buffer", nn.Parameter))
_NO_VALUES = ("meta", "fake", "uninitialized", "opaque")


_TYPES: dict[str, Any] = {}


def _fake_type() -> Any:
    fake = _TYPES.get("fake")
    if fake is None:
        try:
            from torch._subclasses.fake_tensor import FakeTensor as fake
        except ImportError:  # pragma: no cover - very old torch
            fake = ()
        _TYPES["fake"] = fake
    return fake


def _is_uninitialized(t: torch.Tensor) -> bool:
    from torch.nn.parameter import UninitializedTensorMixin

    return isinstance(t, UninitializedTensorMixin)


def _is_functional(t: torch.Tensor) -> bool:
    try:
        return bool(torch._is_functional_tensor(t))
    except Exception:  # noqa: BLE001 - exotic subclasses
        return False


def _dispatch_subclass(t: torch.Tensor) -> bool:
    """A subclass that handles dispatch itself (wrapper subclasses): its storage is not its data."""
    cls = type(t)
    if cls in _PLAIN_TYPES:
        return False
    disp = getattr(cls, "__torch_dispatch__", None)
    base = getattr(torch.Tensor, "__torch_dispatch__", None)
    return disp is not None and getattr(disp, "__func__", disp) is not getattr(base, "__func__", base)


def kind(t: torch.Tensor) -> str:
    """What ``t`` is, for reading it safely (see the module docstring)."""
    cls = type(t)
    if cls is torch.Tensor or cls is nn.Parameter:  # the common case, without subclass checks
        if t.layout == torch.strided and not t.is_quantized and not t.is_nested:
            if _is_functional(t):
                return "functional"
            return "meta" if t.is_meta else "dense"
    elif _is_uninitialized(t):
        return "uninitialized"
    elif isinstance(t, _fake_type()):
        return "fake"
    if _is_functional(t):
        return "functional"
    if getattr(t, "is_nested", False):
        return "nested"
    if _dispatch_subclass(t):
        return "wrapper" if hasattr(type(t), "__tensor_flatten__") else "opaque"
    if t.is_meta:
        return "meta"
    if t.is_quantized:
        return "quantized"
    if t.layout in SPARSE_LAYOUTS:
        return "sparse"
    if t.layout != torch.strided:
        return "mkldnn" if t.is_mkldnn else "opaque"
    return "dense"


def is_plain_dense(t: torch.Tensor) -> bool:
    """The fast check for the common case: a plain ``Tensor``/``Parameter`` with readable strided
    memory (what :func:`kind` calls ``"dense"``, without looking at subclasses). For per-op checks
    (``%%detect_anomaly`` looks at every op's outputs)."""
    cls = type(t)
    return ((cls is torch.Tensor or cls is nn.Parameter) and t.layout == torch.strided
            and not t.is_quantized and not t.is_nested and not t.is_meta and not _is_functional(t))


def describe(t: torch.Tensor) -> str:
    """A few words on what ``t`` is: ``"quantized tensor (quint8, per_tensor_affine)"``..."""
    k = kind(t)
    if k in ("sparse", "mkldnn"):
        return f"{str(t.layout).replace('torch.', '')} layout"
    if k == "quantized":
        return f"quantized tensor ({str(t.dtype).replace('torch.', '')}, {_qscheme(t)})"
    if k == "nested":
        return "nested (jagged)" if t.layout == torch.jagged else "nested (strided)"
    if k == "wrapper":
        return f"tensor subclass {type(t).__name__}"
    if k == "opaque":
        return f"opaque tensor {type(t).__name__}"
    return k


def _qscheme(t: torch.Tensor) -> str:
    try:
        return str(t.qscheme()).replace("torch.", "")
    except Exception:  # noqa: BLE001
        return "?"


def values_unknown(t: torch.Tensor) -> str | None:
    """Why ``t``'s values cannot be read at all (``"meta tensor"``...), else ``None``."""
    k = kind(t)
    if k in _NO_VALUES:
        return {"meta": "meta tensor", "fake": "fake tensor",
                "uninitialized": "uninitialized parameter (lazy module)",
                "opaque": f"tensor subclass {type(t).__name__} without __tensor_flatten__"}[k]
    return None


@contextlib.contextmanager
def plain_ops() -> Iterator[None]:
    """Run ops on tensor subclasses as on plain tensors (their ``__torch_function__`` is not
    called): reading a user's tensor never runs the user's override code."""
    with torch._C.DisableTorchFunctionSubclass():
        yield


def plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain ``torch.Tensor`` sharing its memory (``dense`` tensors only), detached."""
    with plain_ops():
        out = t.detach()
        if type(out) is not torch.Tensor:
            out = out.as_subclass(torch.Tensor)
    return out


def inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that hold ``t``'s data for the kinds that are containers of tensors
    (functional, quantized int representation, sparse components, nested values, wrapper
    subclass inner tensors, mkldnn as dense); ``[]`` for the others."""
    k = kind(t)
    with plain_ops():
        try:
            if k == "functional":
                return [torch._from_functional_tensor(t)]
            if k == "quantized":
                out = [t.int_repr()]
                if _qscheme(t).startswith("per_channel"):
                    out += [t.q_per_channel_scales(), t.q_per_channel_zero_points()]
                return out
            if k == "sparse":
                if t.layout == torch.sparse_coo:
                    return [t._indices(), t._values()]
                if t.layout in (torch.sparse_csr, torch.sparse_bsr):
                    return [t.crow_indices(), t.col_indices(), t.values()]
                return [t.ccol_indices(), t.row_indices(), t.values()]
            if k == "nested":
                out = [t.values()]
                if t.layout == torch.jagged:
                    out.append(t.offsets())
                else:
                    out.append(t._nested_tensor_size())
                return out
            if k == "mkldnn":
                return [t.to_dense()]
            if k == "wrapper":
                attrs, _ctx = t.__tensor_flatten__()
                return [getattr(t, a) for a in attrs if isinstance(getattr(t, a), torch.Tensor)]
        except Exception:  # noqa: BLE001 - an exotic variant: no inner tensors known
            return []
    return []


# -- sizes -----------------------------------------------------------------------------------------
def shape(t: torch.Tensor) -> tuple[int | str, ...]:
    """``tuple(t.shape)``; ragged dimensions of nested tensors are ``"ragged"`` (jagged ones keep
    torch's symbolic name such as ``"j1"``); an uninitialized parameter has the shape ``()``."""
    if kind(t) == "uninitialized":
        return ()
    try:
        return tuple(s if isinstance(s, int) else str(s) for s in t.shape)
    except RuntimeError:
        out: list[int | str] = []
        for d in range(t.dim()):
            try:
                out.append(int(t.size(d)))
            except RuntimeError:
                out.append("ragged")
        return tuple(out)


def numel(t: torch.Tensor) -> int:
    """Elements of ``t`` (0 for an uninitialized parameter; nested: all components)."""
    if kind(t) == "uninitialized":
        return 0
    try:
        return int(t.numel())
    except Exception:  # noqa: BLE001
        return 0


def nbytes(t: torch.Tensor) -> int:
    """Bytes of element data ``t`` holds: sparse and nested tensors count their components (not
    the dense size), wrapper subclasses their inner tensors, quantized tensors their integers, a
    broadcast or overlapping view the memory its elements really occupy."""
    k = kind(t)
    if k == "uninitialized":
        return 0
    if k == "dense":
        sp = span(t)
        size = int(t.numel()) * int(t.element_size())
        return size if sp is None else min(size, sp.hi - sp.lo)
    if k in ("sparse", "nested", "wrapper", "functional"):
        parts = inner_tensors(t)
        if k == "nested":
            parts = parts[:1]
        if parts:
            return sum(nbytes(p) for p in parts)
    try:
        return int(t.numel()) * int(t.element_size())
    except Exception:  # noqa: BLE001
        return 0


def version(t: torch.Tensor) -> int | None:
    """The version counter (bumped by in-place ops), or ``None`` (inference tensors, ...)."""
    try:
        return int(t._version)
    except Exception:  # noqa: BLE001
        return None


# -- memory ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """The bytes a dense tensor's elements occupy: ``[lo, hi)`` inside the storage
    ``[storage_lo, storage_hi)`` (addresses; for meta/fake storages, ``kind == "impl"`` and the
    storage is identified by its implementation object instead)."""

    device: str
    kind: str  # "ptr" or "impl"
    storage_lo: int
    storage_hi: int
    lo: int
    hi: int

    @property
    def storage_key(self) -> tuple[str, str, int]:
        return (self.device, self.kind, self.storage_lo)


def span(t: torch.Tensor) -> Span | None:
    """Where ``t``'s elements live (dense, meta and fake strided tensors); ``None`` for layouts
    without one plain storage (sparse, nested, quantized, wrappers, an empty storage)."""
    k = kind(t)
    if k not in ("dense", "meta", "fake"):
        return None
    plain_type = type(t) is torch.Tensor or type(t) is nn.Parameter
    try:
        with contextlib.nullcontext() if plain_type else plain_ops():
            storage = t.untyped_storage()
            es = t.element_size()
            extent = 0
            if t.numel():
                extent = (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * es
            offset = t.storage_offset() * es
            if k != "dense":
                base = storage._cdata  # identity of the StorageImpl (no addresses on meta/fake)
                return Span(str(t.device), "impl", base, base, offset, offset + extent)
            sptr = storage.data_ptr()
            if sptr == 0 or storage.nbytes() == 0:
                return None  # empty storage: shares nothing
            lo = sptr + offset
            return Span(str(t.device), "ptr", sptr, sptr + storage.nbytes(), lo, lo + extent)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None


def storage_nbytes(t: torch.Tensor) -> int:
    """Bytes of the storage(s) behind ``t`` (what ``torch.save`` writes for it)."""
    if kind(t) == "dense":
        try:
            with plain_ops():
                return int(t.untyped_storage().nbytes())
        except Exception:  # noqa: BLE001
            pass
    parts = inner_tensors(t)
    if parts and kind(t) != "mkldnn":
        return sum(storage_nbytes(p) for p in parts)
    return nbytes(t)


def memory_bytes(t: torch.Tensor) -> torch.Tensor | None:
    """The bytes a dense tensor's elements occupy, as a ``uint8`` view of its storage (no copy,
    also for broadcast views: ``zeros(1).expand(10**10)`` gives 4 bytes). ``None`` when ``t`` is
    not dense (never reinterprets a quantized or opaque tensor)."""
    sp = span(t)
    if sp is None or sp.kind != "ptr":
        return None
    with plain_ops():
        storage = t.untyped_storage()
        raw = torch.empty(0, dtype=torch.uint8, device=t.device)
        return raw.set_(storage, sp.lo - sp.storage_lo, (sp.hi - sp.lo,), (1,))


def dedup_broadcast(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(base, repeat)``: ``t`` with every broadcast dimension (stride 0, size > 1) cut to size
    1, and how many times each element of ``base`` appears in ``t``. Statistics of ``t`` are those
    of ``base`` with counts times ``repeat`` (``zeros(1).expand(10**10)`` reads 1 element)."""
    repeat = 1
    x = t
    for d in range(t.dim()):
        if t.stride(d) == 0 and t.size(d) > 1:
            repeat *= int(t.size(d))
            x = x.narrow(d, 0, 1)
    return x, repeat


# -- comparing values --------------------------------------------------------------------------------
def fingerprint(t: torch.Tensor, budget: int | None = None) -> Any:
    """A copy of everything ``t``'s values are made of, for a bitwise comparison later with
    :func:`same_fingerprint` (NaN equals the same NaN). ``None`` when ``t`` has no values (meta,
    fake, uninitialized, opaque) or they exceed ``budget`` bytes. Never reinterprets anything
    but plain strided storage."""
    k = kind(t)
    if k in _NO_VALUES:
        return None
    if budget is not None and storage_nbytes(t) > budget:
        return None
    if k == "dense":
        raw = memory_bytes(t)
        if raw is None:  # an empty storage: nothing to compare beyond the metadata
            return ("dense", shape(t), str(t.dtype), None)
        return ("dense", shape(t), str(t.dtype), raw.clone())
    parts = inner_tensors(t)
    extra: Any = None
    if k == "quantized":
        extra = (_qscheme(t),) + ((float(t.q_scale()), int(t.q_zero_point()))
                                  if not _qscheme(t).startswith("per_channel") else ())
    return (k, shape(t), str(t.dtype), extra, [fingerprint(p) for p in parts])


def same_fingerprint(a: Any, b: Any) -> bool:
    """True when two :func:`fingerprint` results are bitwise equal."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_fingerprint(x, y) for x, y in zip(a, b))
    return bool(a == b)


__all__ = ["SPARSE_LAYOUTS", "Span", "dedup_broadcast", "describe", "fingerprint", "inner_tensors",
           "is_plain_dense", "kind", "memory_bytes", "nbytes", "numel", "plain", "plain_ops", "same_fingerprint",
           "shape", "span", "storage_nbytes", "values_unknown", "version"]
