"""What a tensor is: metadata, storage sharing with other tensors, and value statistics.

``tensor_info(t, name, namespace)`` answers the everyday questions about one tensor: shape, dtype,
device, autograd state (requires_grad, grad_fn, is_leaf, .grad), layout (stride, contiguity,
storage offset and size) and which other tensors in ``namespace`` share its memory ("view of `x`":
the view vs reshape vs clone question). For values it gives min / max / mean / std over the finite
values and counts of NaN, Inf and zeros, computed on the tensor's own device in chunks (temporaries
stay small), stacked into one small buffer and copied to the host once: one synchronisation, never a
copy of the whole tensor. Meta and fake tensors get shape information and "values unknown".

``tensors(namespace)`` lists every tensor bound to a name (like ``%whos`` for tensors) with the
bytes it holds, view-of relationships and a NaN/Inf flag, sorted by bytes.

Nothing here changes a tensor: statistics run under ``torch.no_grad()`` on ``detach()``-ed tensors,
``.grad`` is only read, and global torch state is restored however the computation exits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core._result import Result
from torchmagic.core.errors import TorchMagicError, a_type
from torchmagic.core.state import preserved_global_state

#: Elements reduced per step; bounds the device temporaries of the statistics (8 bytes each).
CHUNK_ELEMENTS = 1 << 22


# -- classification ------------------------------------------------------------------------------
def is_fake(t: torch.Tensor) -> bool:
    """True for a ``FakeTensor`` (``torch._subclasses``): metadata only, no values."""
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(t, FakeTensor)


def values_unknown(t: torch.Tensor) -> str | None:
    """Why the values of ``t`` cannot be read (``"meta tensor"``...), or ``None`` when they can."""
    if is_fake(t):
        return "fake tensor"
    if t.is_meta:
        return "meta tensor"
    if t.is_nested:
        return "nested tensor: statistics not computed"
    return None


def shape_of(t: torch.Tensor) -> tuple[int | str, ...]:
    """``tuple(t.shape)``, also for nested tensors, whose ragged dimensions are ``"ragged"`` (a
    strided nested tensor has no ``.shape``; a jagged one has symbolic sizes like ``j1``)."""
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


def nbytes_of(t: torch.Tensor) -> int:
    """Bytes of element data ``t`` holds: for sparse layouts its indices and values, not the
    dense size."""
    try:
        if t.layout == torch.sparse_coo:
            return nbytes_of(t._indices()) + nbytes_of(t._values())
        if t.layout in (torch.sparse_csr, torch.sparse_bsr):
            return sum(nbytes_of(x) for x in (t.crow_indices(), t.col_indices(), t.values()))
        if t.layout in (torch.sparse_csc, torch.sparse_bsc):
            return sum(nbytes_of(x) for x in (t.ccol_indices(), t.row_indices(), t.values()))
    except (RuntimeError, NotImplementedError):
        pass
    return t.numel() * t.element_size()


def _stats_view(c: torch.Tensor) -> torch.Tensor:
    """Float8 and other 1-byte floats have no isnan/isinf/comparison kernels: widen one chunk."""
    return c.float() if c.is_floating_point() and c.element_size() == 1 else c


def value_kind(t: torch.Tensor) -> str:
    """``"float"``, ``"complex"``, ``"int"`` or ``"bool"``."""
    if t.dtype == torch.bool:
        return "bool"
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "float"
    return "int"


# -- memory footprint ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Footprint:
    """Where a tensor's elements live: its storage's byte range and its own elements' byte range."""

    device: str
    kind: str  # "ptr": real addresses; "impl": storage identity only (meta, fake)
    storage_lo: int
    storage_hi: int
    lo: int
    hi: int


def _footprint(t: torch.Tensor) -> _Footprint | None:
    if t.layout != torch.strided:
        return None
    try:
        storage = t.untyped_storage()
        es = t.element_size()
        span = 0
        if t.numel():
            span = (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * es
        offset = t.storage_offset() * es
        if values_unknown(t) is not None:
            base = storage._cdata  # identity of the StorageImpl (no addresses on meta/fake)
            return _Footprint(str(t.device), "impl", base, base, offset, offset + span)
        sptr = storage.data_ptr()
        if sptr == 0 or storage.nbytes() == 0:
            return None  # empty storage: shares nothing
        lo = sptr + offset
        return _Footprint(str(t.device), "ptr", sptr, sptr + storage.nbytes(), lo, lo + span)
    except (RuntimeError, NotImplementedError, TypeError):  # exotic subclasses
        return None


def _same_memory(a: _Footprint, b: _Footprint) -> bool:
    if a.device != b.device or a.kind != b.kind:
        return False
    if a.kind == "impl":
        return a.storage_lo == b.storage_lo
    return a.storage_lo < b.storage_hi and b.storage_lo < a.storage_hi


def _root(t: torch.Tensor) -> torch.Tensor:
    base = t._base
    return t if base is None else base


def relation(t: torch.Tensor, other: torch.Tensor) -> str | None:
    """How ``t`` relates to ``other`` in memory, or ``None`` when they share nothing.

    One of ``"same object as"``, ``"view of"`` (``t`` reads ``other``'s memory: ``other.view``,
    a contiguous ``other.reshape``, slicing, ``.t()``...), ``"viewed by"`` (the converse),
    ``"alias of"`` (same memory and layout, e.g. ``.detach()`` / ``.data``) and
    ``"shares storage with"`` (same storage, neither contains the other; the text says whether
    the element byte ranges overlap).
    """
    if t is other:
        return "same object as"
    ft, fo = _footprint(t), _footprint(other)
    if ft is None or fo is None or not _same_memory(ft, fo):
        return None
    if t._base is other:
        return "view of"
    if other._base is t:
        return "viewed by"
    t_in_o = fo.lo <= ft.lo and ft.hi <= fo.hi
    o_in_t = ft.lo <= fo.lo and fo.hi <= ft.hi
    if (t_in_o and o_in_t and t.dtype == other.dtype and t.shape == other.shape
            and t.stride() == other.stride()):
        return "alias of"
    if t._base is not None and other._base is None and t_in_o:
        return "view of"
    if other._base is not None and t._base is None and o_in_t:
        return "viewed by"
    overlap = ft.lo < fo.hi and fo.lo < ft.hi
    return "shares storage with" if overlap else "shares storage (disjoint bytes) with"


# -- statistics ----------------------------------------------------------------------------------
@dataclass
class TensorStats:
    """Value statistics of one tensor (all counts are element counts).

    ``min``/``max``/``mean``/``std`` are over the finite values only (NaN and ±Inf excluded);
    ``std`` uses Bessel's correction like ``torch.std``. For complex tensors they describe the
    magnitude ``|z|``; for bool tensors ``true`` counts the True values.
    """

    kind: str
    numel: int
    finite: int
    nan: int = 0
    inf: int = 0
    neg_inf: int = 0
    zeros: int = 0
    true: int | None = None
    min: float | int | None = None
    max: float | int | None = None
    mean: float | None = None
    std: float | None = None


def _chunks(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Pieces of ``x`` of at most ``CHUNK_ELEMENTS`` elements each, as views (no copies)."""
    n = x.numel()
    if n <= CHUNK_ELEMENTS or x.dim() == 0:
        yield x
        return
    if x.is_contiguous():
        yield from x.view(-1).split(CHUNK_ELEMENTS)
        return
    per_row = n // x.shape[0]
    if per_row > CHUNK_ELEMENTS:
        for i in range(x.shape[0]):
            yield from _chunks(x[i])
    else:
        yield from x.split(max(1, CHUNK_ELEMENTS // max(per_row, 1)), dim=0)


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def tensor_stats(t: torch.Tensor) -> TensorStats | None:
    """Statistics of ``t``'s values, or ``None`` when they are unknown (meta, fake, sparse...).

    Every reduction runs on ``t``'s device; partial results (chunk by chunk, combined with Chan's
    parallel variance formula) stay there, are packed into one byte buffer and copied to the host
    once: a single synchronisation, whatever the number of statistics or chunks.
    """
    if values_unknown(t) is not None or t.layout != torch.strided or t.is_quantized:
        return None
    kind = value_kind(t)
    numel = t.numel()
    if numel == 0:
        return TensorStats(kind=kind, numel=0, finite=0, true=0 if kind == "bool" else None)
    with preserved_global_state(), torch.no_grad():
        x = t.detach()
        dev = x.device
        acc = _acc_dtype(dev)
        i64 = torch.int64
        zero_i = torch.zeros((), dtype=i64, device=dev)
        nan, inf, neg_inf, zeros, true = zero_i, zero_i, zero_i, zero_i, zero_i
        count = torch.zeros((), dtype=acc, device=dev)
        mean = torch.zeros((), dtype=acc, device=dev)
        m2 = torch.zeros((), dtype=acc, device=dev)
        ext_dtype = acc if kind in ("float", "complex") else i64
        lo: torch.Tensor | None = None
        hi: torch.Tensor | None = None
        for c in map(_stats_view, _chunks(x)):
            if kind == "bool":
                true = true + c.sum(dtype=i64)
                continue
            zeros = zeros + (c == 0).sum(dtype=i64)
            if kind in ("float", "complex"):
                nan = nan + torch.isnan(c).sum(dtype=i64)
                inf = inf + torch.isinf(c).sum(dtype=i64)
                if kind == "float":
                    neg_inf = neg_inf + torch.isneginf(c).sum(dtype=i64)
                v = c.abs() if kind == "complex" else c
                fin = torch.isfinite(v)
                vf = v.to(acc)
                c_lo = torch.where(fin, vf, math.inf).amin()
                c_hi = torch.where(fin, vf, -math.inf).amax()
                n_c = fin.sum(dtype=i64).to(acc)
                vz = torch.where(fin, vf, 0.0)
            else:
                c_lo, c_hi = c.amin().to(i64), c.amax().to(i64)
                vf = c.to(acc)
                n_c = torch.full((), c.numel(), dtype=acc, device=dev)  # a fill, no copy
                vz = vf
                fin = None
            mean_c = vz.sum() / n_c.clamp(min=1)
            dev_c = vz - mean_c
            if fin is not None:
                dev_c = torch.where(fin, dev_c, 0.0)
            m2_c = (dev_c * dev_c).sum()
            # Chan et al.: combine (count, mean, M2) of two parts, on the device.
            total = count + n_c
            delta = mean_c - mean
            frac = n_c / total.clamp(min=1)
            mean = mean + delta * frac
            m2 = m2 + m2_c + delta * delta * count * frac
            count = total
            lo = c_lo if lo is None else torch.minimum(lo, c_lo)
            hi = c_hi if hi is None else torch.maximum(hi, c_hi)
        counts = torch.stack([nan, inf, neg_inf, zeros, true, count.to(i64)])
        if lo is None or hi is None:
            lo = hi = torch.zeros((), dtype=ext_dtype, device=dev)
        extremes = torch.stack([lo, hi]).to(ext_dtype)
        moments = torch.stack([mean, m2]).to(acc)
        packed = torch.cat([p.reshape(-1).view(torch.uint8) for p in (counts, extremes, moments)])
        host = packed.cpu()  # the one device -> host copy (the one sync)
        n_counts = counts.numel() * 8
        n_ext = extremes.numel() * extremes.element_size()
        h_counts = host[:n_counts].view(i64).tolist()
        h_ext = host[n_counts:n_counts + n_ext].view(ext_dtype).tolist()
        h_mom = host[n_counts + n_ext:].view(acc).tolist()
    c_nan, c_inf, c_neg, c_zero, c_true, c_fin = (int(v) for v in h_counts)
    if kind == "bool":
        return TensorStats(kind=kind, numel=numel, finite=numel, zeros=numel - c_true,
                           true=c_true, min=0 if c_true < numel else 1, max=1 if c_true else 0)
    stats = TensorStats(kind=kind, numel=numel, finite=c_fin, nan=c_nan, inf=c_inf,
                        neg_inf=c_neg, zeros=c_zero)
    if c_fin:
        stats.min, stats.max = h_ext
        if kind != "int":
            stats.min, stats.max = float(stats.min), float(stats.max)
        stats.mean = float(h_mom[0])
        stats.std = math.sqrt(max(h_mom[1], 0.0) / (c_fin - 1)) if c_fin > 1 else None
    return stats


# -- one tensor ----------------------------------------------------------------------------------
@dataclass
class Link:
    """A memory relationship between the described tensor and a named one."""

    relation: str
    name: str


@dataclass
class TensorInfo(Result):
    """Everything ``%tensor`` shows about one tensor."""

    _display_module = "torchmagic.display.tensor"

    name: str
    type_name: str
    shape: tuple[int | str, ...]
    dtype: str
    device: str
    layout: str
    numel: int
    nbytes: int
    requires_grad: bool
    grad_fn: str | None
    is_leaf: bool
    grad: str | None  # "float32[3, 4] on cpu" or None
    stride: tuple[int, ...] | None
    contiguous: bool | None
    memory_format: str | None  # "channels_last" when that holds and it is not contiguous
    storage_offset: int | None
    storage_bytes: int | None
    is_view: bool
    unknown: str | None  # "meta tensor" / "fake tensor" / "sparse layout": values unknown
    stats: TensorStats | None
    links: list[Link] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _shape_str(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}[{', '.join(str(s) for s in shape_of(t))}]"


def named_tensors(namespace: Mapping[str, Any], *, members: bool = True
                  ) -> list[tuple[str, torch.Tensor, bool]]:
    """``(name, tensor, is_member)`` for the tensors bound to names in ``namespace``.

    Names starting with ``_`` (IPython's output cache) are skipped. With ``members``, the
    parameters and buffers of modules bound to names are included as ``"model.fc.weight"`` with
    ``is_member=True`` (used as targets of "view of", never listed as rows by ``%tensors``).
    """
    out: list[tuple[str, torch.Tensor, bool]] = []
    for name, value in list(namespace.items()):
        if name.startswith("_"):
            continue
        if isinstance(value, torch.Tensor):
            out.append((name, value, False))
        elif members and isinstance(value, nn.Module):
            try:
                for pname, p in value.named_parameters():
                    out.append((f"{name}.{pname}", p, True))
                for bname, b in value.named_buffers():
                    out.append((f"{name}.{bname}", b, True))
            except Exception:  # noqa: BLE001 - a broken user module: skip it
                continue
    return out


def footprints(named: list[tuple[str, torch.Tensor, bool]]) -> dict[int, _Footprint | None]:
    """Memory footprints of named tensors, computed once (for :func:`links_of`)."""
    return {id(t): _footprint(t) for _, t, _ in named}


def links_of(t: torch.Tensor, name: str, named: list[tuple[str, torch.Tensor, bool]],
             fps: dict[int, _Footprint | None] | None = None) -> list[Link]:
    """Memory links of ``t`` to the other named tensors (``fps``: from :func:`footprints`).

    Two views of the same named tensor (``a = x[0]``, ``b = x.view(-1)``) obviously share storage;
    that sibling link is left out when both are already linked to that tensor.
    """
    links: list[Link] = []
    by_name = {}
    fps = footprints(named) if fps is None else fps
    mine = fps[id(t)] if id(t) in fps else _footprint(t)
    for other_name, other, _member in named:
        if other_name == name:
            continue
        theirs = fps.get(id(other))
        if other is not t and (mine is None or theirs is None or not _same_memory(mine, theirs)):
            continue  # cheap pre-check: different memory
        rel = relation(t, other)
        if rel is not None:
            links.append(Link(rel, other_name))
            by_name[other_name] = other
    parents = [by_name[lk.name] for lk in links if lk.relation in ("view of", "alias of")]
    if not parents:
        return links
    kept = []
    for lk in links:
        if lk.relation.startswith("shares storage") and any(
                relation(by_name[lk.name], p) in ("view of", "alias of") for p in parents):
            continue
        kept.append(lk)
    return kept


def tensor_info(t: torch.Tensor, name: str = "tensor",
                namespace: Mapping[str, Any] | None = None, *, stats: bool = True) -> TensorInfo:
    """Describe ``t``; ``namespace`` (e.g. ``globals()``) is searched for tensors sharing memory.

    Raises :class:`TorchMagicError` when ``t`` is not a tensor.
    """
    if not isinstance(t, torch.Tensor):
        raise TorchMagicError(f"{name} is {a_type(t)}, not a tensor")
    unknown = values_unknown(t)
    strided = t.layout == torch.strided and not t.is_nested
    if unknown is None and not strided:
        unknown = f"{str(t.layout).replace('torch.', '')} layout"
    notes: list[str] = []
    grad = None
    if t.is_leaf or t.retains_grad:  # reading .grad of a non-leaf warns
        g = t.grad
        grad = None if g is None else f"{_shape_str(g)} on {g.device}"
    stride = contiguous = offset = sbytes = None
    fmt = None
    if strided:
        stride = tuple(t.stride())
        contiguous = t.is_contiguous()
        offset = t.storage_offset()
        try:
            sbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            sbytes = None
        if not contiguous:
            for mf, label in ((torch.channels_last, "channels_last"),
                              (torch.channels_last_3d, "channels_last_3d")):
                try:
                    if t.is_contiguous(memory_format=mf):
                        fmt = label
                except RuntimeError:
                    pass
    if t.is_quantized:
        unknown = unknown or "quantized tensor"
    info = TensorInfo(
        name=name, type_name=type(t).__name__, shape=shape_of(t),
        dtype=str(t.dtype).replace("torch.", ""), device=str(t.device),
        layout="nested" if t.is_nested and t.layout == torch.strided
        else str(t.layout).replace("torch.", ""), numel=t.numel(),
        nbytes=nbytes_of(t), requires_grad=t.requires_grad,
        grad_fn=None if t.grad_fn is None else type(t.grad_fn).__name__, is_leaf=t.is_leaf,
        grad=grad, stride=stride, contiguous=contiguous, memory_format=fmt,
        storage_offset=offset, storage_bytes=sbytes, is_view=t._is_view(), unknown=unknown,
        stats=None, notes=notes,
    )
    if namespace is not None:
        info.links = links_of(t, name, named_tensors(namespace))
    if stats and unknown is None:
        try:
            info.stats = tensor_stats(t)
        except (RuntimeError, NotImplementedError) as exc:  # a dtype without reduction kernels
            why = " ".join(str(exc).split())[:80]
            notes.append(f"{name}: statistics not available for {info.dtype} on {info.device} "
                         f"({why})")
    if info.stats is not None and (info.stats.nan or info.stats.inf):
        excluded = " and ".join(f"{n:,} {label}" for n, label in
                                ((info.stats.nan, "NaN"), (info.stats.inf, "Inf")) if n)
        notes.append(f"{name}: min/max/mean/std over the {info.stats.finite:,} finite values "
                     f"({excluded} excluded)")
    if info.stats is not None and info.stats.kind == "complex":
        notes.append(f"{name}: min/max/mean/std describe |z|")
    if unknown is not None:
        notes.append(f"{name}: values unknown ({unknown}); shape information only")
    return info


@dataclass
class TensorReport(Result):
    """``%tensor a b c``: one or more :class:`TensorInfo`, shown side by side."""

    _display_module = "torchmagic.display.tensor"

    items: list[TensorInfo]


def tensor_report(exprs: Mapping[str, torch.Tensor], namespace: Mapping[str, Any] | None = None,
                  *, stats: bool = True) -> TensorReport:
    """Describe several tensors (name -> tensor), each against ``namespace``."""
    return TensorReport([tensor_info(t, name, namespace, stats=stats) for name, t in exprs.items()])


# -- every tensor in a namespace -----------------------------------------------------------------
@dataclass
class TensorRow:
    """One row of ``%tensors``."""

    name: str
    type_name: str
    shape: tuple[int | str, ...]
    dtype: str
    device: str
    nbytes: int
    requires_grad: bool
    links: list[Link]
    flag: str | None  # "NaN", "Inf", "NaN+Inf", "?" (values unknown) or None


@dataclass
class TensorTable(Result):
    """``%tensors``: the tensors bound to names, largest first.

    ``total_bytes`` is the memory allocated, each byte counted once (a view adds nothing);
    ``by_device`` splits bytes per device, including ``meta`` and ``"<device> (fake)"`` entries,
    which hold no memory (their bytes are what the tensors would need) and are not in the total.
    """

    _display_module = "torchmagic.display.tensor"

    rows: list[TensorRow]
    total_bytes: int
    by_device: dict[str, int]


def _nonfinite_flags(items: list[torch.Tensor]) -> list[str | None]:
    """NaN/Inf flag per tensor: two reductions each, one host copy per device."""
    flags: list[str | None] = [None] * len(items)
    per_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, t in enumerate(items):
        if values_unknown(t) is not None or t.layout != torch.strided or t.is_quantized:
            flags[i] = "?"
        elif (t.is_floating_point() or t.is_complex()) and t.numel():
            per_device.setdefault(t.device, []).append((i, t))
    if not per_device:
        return flags
    with preserved_global_state(), torch.no_grad():
        for dev, pairs in per_device.items():
            out = []
            for _, t in pairs:
                x = t.detach()
                has_nan = torch.zeros((), dtype=torch.bool, device=dev)
                has_inf = has_nan
                for c in map(_stats_view, _chunks(x)):
                    has_nan = has_nan | torch.isnan(c).any()
                    has_inf = has_inf | torch.isinf(c).any()
                out.append(torch.stack([has_nan, has_inf]))
            host = torch.stack(out).cpu().tolist()  # one copy per device
            for (i, _), (n, f) in zip(pairs, host):
                flags[i] = "NaN+Inf" if n and f else "NaN" if n else "Inf" if f else None
    return flags


def _unallocated(device: str) -> bool:
    return device.startswith("meta") or device.endswith("(fake)")


def tensors(namespace: Mapping[str, Any], *, check_values: bool = True) -> TensorTable:
    """Every tensor bound to a name in ``namespace`` (``%whos`` for tensors), largest first.

    Parameters inside modules are not rows unless bound to a name, but "view of" links name them
    (``model.fc.weight``). ``check_values`` adds the NaN/Inf flag (one pass over each tensor).
    """
    named = named_tensors(namespace)
    top = [(n, t) for n, t, member in named if not member]
    flags = _nonfinite_flags([t for _, t in top]) if check_values else [None] * len(top)
    fps = footprints(named)
    rows: list[TensorRow] = []
    for (name, t), flag in zip(top, flags):
        links = links_of(t, name, named, fps)
        rows.append(TensorRow(
            name=name, type_name=type(t).__name__, shape=shape_of(t),
            dtype=str(t.dtype).replace("torch.", ""), device=str(t.device),
            nbytes=nbytes_of(t), requires_grad=t.requires_grad, links=links,
            flag=flag))
    rows.sort(key=lambda r: (-r.nbytes, r.name))
    # Memory counted once: merge overlapping byte ranges per storage.
    spans: dict[tuple[str, str, int], list[tuple[int, int]]] = {}
    loose_dev: dict[str, int] = {}
    for _name, t in top:
        fp = _footprint(t)
        nb = nbytes_of(t)
        if fp is None or fp.kind == "impl":
            key_dev = str(t.device) + (" (fake)" if is_fake(t) else "")
            if fp is None:
                loose_dev[key_dev] = loose_dev.get(key_dev, 0) + nb
                continue
            spans.setdefault((key_dev, "impl", fp.storage_lo), []).append((fp.lo, fp.hi))
        else:
            spans.setdefault((fp.device, "ptr", 0), []).append((fp.lo, fp.hi))
    by_device = dict(loose_dev)
    for (dev, _kind, _sid), ranges in spans.items():
        ranges.sort()
        covered = 0
        cur_lo, cur_hi = ranges[0]
        for lo, hi in ranges[1:]:
            if lo >= cur_hi:
                covered += cur_hi - cur_lo
                cur_lo, cur_hi = lo, hi
            else:
                cur_hi = max(cur_hi, hi)
        covered += cur_hi - cur_lo
        by_device[dev] = by_device.get(dev, 0) + covered
    total = sum(b for d, b in by_device.items() if not _unallocated(d))
    return TensorTable(rows=rows, total_bytes=total, by_device=by_device)
