"""Value statistics of a tensor and the NaN/Inf flags of many, bounded in time and memory.

:func:`tensor_stats` gives min / max / mean / std over the finite values and counts of NaN, Inf and
zeros, computed on the tensor's own device in chunks (temporaries stay small), stacked into one small
buffer and copied to the host once: one synchronisation, never a copy of the whole tensor.

Statistics come from the memory a tensor really has (:mod:`torchmagic.core.access`): a broadcast
view (``torch.zeros(1).expand(10**10)``) reads its one element and counts it ``10**10`` times; an
overlapping view that repeats its memory many times (``unfold``, ``as_strided``) is not read element
by element (its statistics are "not computed", with the reason); nested tensors are read through
their values buffer, functionalization wrappers through the tensor they wrap. Quantized, sparse and
wrapper-subclass tensors, meta and fake tensors get no statistics, never a crash.

:func:`nonfinite_flags` (``%tensors``) checks at most ``FLAG_BUDGET_BYTES`` of memory in all, so
the table comes back in well under a second on any namespace; tensors beyond the budget are flagged
as not checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from torchmagic.core import access
from torchmagic.core.state import preserved_global_state

#: Elements reduced per step; bounds the device temporaries of the statistics (8 bytes each).
CHUNK_ELEMENTS = 1 << 22
#: A view whose elements repeat its memory more than this many times is not read element-wise.
MAX_OVERLAP = 4
#: Bytes of tensor memory ``%tensors`` reads for its NaN/Inf flags, all tensors together.
FLAG_BUDGET_BYTES = 256 << 20
_SMALL = 1 << 12  # tensors up to this many elements are checked together, in one pass


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


def value_kind(t: torch.Tensor) -> str:
    """``"float"``, ``"complex"``, ``"int"`` or ``"bool"``."""
    if t.dtype == torch.bool:
        return "bool"
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "float"
    return "int"


def _stats_view(c: torch.Tensor) -> torch.Tensor:
    """Float8 and other 1-byte floats have no isnan/isinf/comparison kernels: widen one chunk."""
    return c.float() if c.is_floating_point() and c.element_size() == 1 else c


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


def readable(t: torch.Tensor) -> tuple[torch.Tensor | None, int, str | None]:
    """``(x, repeat, why_not)``: a plain strided tensor whose values, each counted ``repeat``
    times, are ``t``'s values; or ``(None, 0, reason)`` when they cannot (or should not) be read."""
    k = access.kind(t)
    why = access.values_unknown(t)
    if why is not None:
        return None, 0, why
    if k == "functional":
        inner = access.inner_tensors(t)
        if not inner:
            return None, 0, "functional tensor wrapper"
        return readable(inner[0])
    if k == "nested":
        values = access.inner_tensors(t)
        if not values:
            return None, 0, "nested tensor without a values buffer"
        return readable(values[0])
    if k != "dense":
        return None, 0, access.describe(t)
    x, repeat = access.dedup_broadcast(access.plain(t))
    sp = access.span(x)
    if sp is not None and x.numel() > CHUNK_ELEMENTS:
        in_memory = max((sp.hi - sp.lo) // max(x.element_size(), 1), 1)
        if x.numel() > MAX_OVERLAP * in_memory:
            return None, 0, (f"overlapping view: its {x.numel() * repeat:,} elements read "
                             f"{in_memory:,} elements of memory over and over (unfold / "
                             "as_strided); statistics not computed")
    return x, repeat, None


def stats_unavailable(t: torch.Tensor) -> str | None:
    """Why :func:`tensor_stats` gives nothing for ``t`` (``None``: it gives statistics)."""
    return readable(t)[2]


def tensor_stats(t: torch.Tensor) -> TensorStats | None:
    """Statistics of ``t``'s values, or ``None`` when they are unknown (meta, fake, sparse,
    quantized... :func:`stats_unavailable` says why).

    Every reduction runs on ``t``'s device; partial results (chunk by chunk, combined with Chan's
    parallel variance formula) stay there, are packed into one byte buffer and copied to the host
    once: a single synchronisation, whatever the number of statistics or chunks.
    """
    x, repeat, why = readable(t)
    if x is None:
        return None
    kind = value_kind(x)
    numel = access.numel(t)
    if x.numel() == 0:
        return TensorStats(kind=kind, numel=numel, finite=0, true=0 if kind == "bool" else None)
    with preserved_global_state(), torch.no_grad():
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
    # each element of x stands for ``repeat`` elements of t (broadcast dimensions)
    c_nan, c_inf, c_neg, c_zero, c_true, c_fin = (int(v) * repeat for v in h_counts)
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
        m2_total = max(h_mom[1], 0.0) * repeat
        stats.std = math.sqrt(m2_total / (c_fin - 1)) if c_fin > 1 else None
    return stats


def _sparse_values(t: torch.Tensor) -> torch.Tensor | None:
    """The stored values of a sparse tensor (COO, CSR, CSC, BSR, BSC) as a plain strided
    tensor, or None when they cannot be read (meta, fake)."""
    inner = access.inner_tensors(t)
    if not inner:
        return None
    x, _repeat, _why = readable(inner[-1])
    return x


def nonfinite_flags(items: list[torch.Tensor], budget: int | None = None) -> list[str | None]:
    """NaN/Inf flag per tensor: ``"NaN"``, ``"Inf"``, ``"NaN+Inf"``, ``None`` (finite; a sparse
    tensor is checked through its stored values),
    ``"?"`` (values unknown) or ``"not checked"`` (beyond ``budget`` bytes of memory read in all,
    default :data:`FLAG_BUDGET_BYTES`). Two reductions per tensor, one host copy per device."""
    budget = FLAG_BUDGET_BYTES if budget is None else budget
    flags: list[str | None] = [None] * len(items)
    per_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, t in enumerate(items):
        x, _repeat, why = readable(t)
        if x is None and access.kind(t) == "sparse":
            x = _sparse_values(t)  # the stored values: the implicit zeros are finite
        if x is None:
            flags[i] = "?"
            continue
        if not (x.is_floating_point() or x.is_complex()) or not x.numel():
            continue
        cost = x.numel() * x.element_size()
        if cost > budget:
            flags[i] = "not checked"
            continue
        budget -= cost
        per_device.setdefault(x.device, []).append((i, x))
    if not per_device:
        return flags
    with preserved_global_state(), torch.no_grad():
        for dev, pairs in per_device.items():
            small = [(i, x) for i, x in pairs if x.numel() <= _SMALL]
            large = [(i, x) for i, x in pairs if x.numel() > _SMALL]
            rows = []  # (index, has_nan, has_inf) as device tensors
            if small:  # many small tensors: one pass over their values concatenated
                flat = torch.cat([_stats_view(x).reshape(-1) for _, x in small])
                sizes = torch.tensor([x.numel() for _, x in small], device=dev)
                seg = torch.repeat_interleave(torch.arange(len(small), device=dev), sizes)
                nan = torch.zeros(len(small), dtype=torch.int64, device=dev).index_add_(
                    0, seg, torch.isnan(flat).to(torch.int64))
                inf = torch.zeros(len(small), dtype=torch.int64, device=dev).index_add_(
                    0, seg, torch.isinf(flat).to(torch.int64))
                rows.append(torch.stack([nan > 0, inf > 0], dim=1))
            for _, x in large:
                has_nan = torch.zeros((), dtype=torch.bool, device=dev)
                has_inf = has_nan
                for c in map(_stats_view, _chunks(x)):
                    has_nan = has_nan | torch.isnan(c).any()
                    has_inf = has_inf | torch.isinf(c).any()
                rows.append(torch.stack([has_nan, has_inf]).reshape(1, 2))
            host = torch.cat(rows).cpu().tolist()  # one copy per device
            for (i, _), (n, f) in zip(small + large, host):
                flags[i] = "NaN+Inf" if n and f else "NaN" if n else "Inf" if f else None
    return flags


__all__ = ["CHUNK_ELEMENTS", "FLAG_BUDGET_BYTES", "TensorStats", "nonfinite_flags", "readable",
           "stats_unavailable", "tensor_stats", "value_kind"]
