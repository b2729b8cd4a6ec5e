"""What a tensor is: metadata, storage sharing with other tensors, and value statistics.

``tensor_info(t, name, namespace)`` answers the everyday questions about one tensor: shape, dtype,
device, autograd state (requires_grad, grad_fn, is_leaf, .grad), layout (stride, contiguity,
storage offset and size) and which other tensors in ``namespace`` share its memory ("view of `x`":
the view vs reshape vs clone question). Value statistics (:mod:`torchmagic.core.tensor_stats`):
min / max / mean / std over the finite values and counts of NaN, Inf and zeros, from the memory the
tensor really has (a broadcast view reads its few real elements). Meta, fake, quantized, sparse,
mkldnn and wrapper-subclass tensors get what can be known about them, never a crash: every
generic read goes through :mod:`torchmagic.core.access`.

``tensors(namespace)`` lists every tensor bound to a name (like ``%whos`` for tensors) with the
bytes it holds, view-of relationships and a NaN/Inf flag, sorted by bytes; it reads at most a
fixed budget of memory for the flags and finds shared memory through an index by storage, so it
answers in well under a second on any namespace.

Nothing here changes a tensor: statistics run under ``torch.no_grad()`` on ``detach()``-ed tensors,
``.grad`` is only read, and global torch state is restored however the computation exits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core import access
from torchmagic.core._result import Result
from torchmagic.core.errors import TorchMagicError, a_type
from torchmagic.core.tensor_stats import (
    CHUNK_ELEMENTS,  # noqa: F401 - re-exported
    FLAG_BUDGET_BYTES,
    TensorStats,
    nonfinite_flags,
    stats_unavailable,
    tensor_stats,
    value_kind,  # noqa: F401 - re-exported
)


# -- classification ------------------------------------------------------------------------------
def is_fake(t: torch.Tensor) -> bool:
    """True for a ``FakeTensor`` (``torch._subclasses``): metadata only, no values."""
    return access.kind(t) == "fake"


def values_unknown(t: torch.Tensor) -> str | None:
    """Why the values of ``t`` cannot be read (``"meta tensor"``...), or ``None`` when they can."""
    why = access.values_unknown(t)
    if why is None and access.kind(t) == "nested":
        return None
    return why


shape_of = access.shape
nbytes_of = access.nbytes


# -- memory footprint ----------------------------------------------------------------------------
_Footprint = access.Span


def _footprint(t: torch.Tensor) -> access.Span | None:
    return access.span(t)


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


class MemoryIndex:
    """Named tensors grouped by the storage they use, so that finding the tensors that share
    memory with one tensor looks at that storage's group only (not at every named tensor)."""

    def __init__(self, named: list[tuple[str, torch.Tensor, bool]]) -> None:
        self.named = named
        self.spans: dict[int, access.Span | None] = {}
        self.groups: dict[tuple[str, str, int], list[tuple[str, torch.Tensor]]] = {}
        self.by_id: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._maps: dict[Any, Any] = {}
        for name, t, _member in named:
            sp = self.spans[id(t)] if id(t) in self.spans else _footprint(t)
            self.spans[id(t)] = sp
            self.by_id.setdefault(id(t), []).append((name, t))
            if sp is not None:
                self.groups.setdefault(sp.storage_key, []).append((name, t))

    def span(self, t: torch.Tensor) -> access.Span | None:
        return self.spans[id(t)] if id(t) in self.spans else _footprint(t)

    def group(self, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        sp = self.span(t)
        return self.groups.get(sp.storage_key, []) if sp is not None else []

    def _group_maps(self, key: Any) -> tuple[dict[int, list[str]], dict[Any, list[str]]]:
        """For one storage group: names of the tensors viewing each tensor (by ``_base``) and
        names by exact layout (aliases), built once."""
        maps = self._maps.get(key)
        if maps is None:
            children: dict[int, list[str]] = {}
            aliases: dict[Any, list[str]] = {"names": {n for n, _ in self.groups.get(key, [])}}
            for n, o in self.groups.get(key, []):
                if o._base is not None:
                    children.setdefault(id(o._base), []).append(n)
                aliases.setdefault(_layout_key(o, self.span(o)), []).append(n)
            maps = self._maps[key] = (children, aliases)
        return maps

    def candidates(self, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Named tensors that may share memory with ``t`` (same object or same storage)."""
        sp = self.span(t)
        out = list(self.by_id.get(id(t), []))
        if sp is not None:
            out += [(n, o) for n, o in self.groups.get(sp.storage_key, []) if o is not t]
        return out


#: Above this many named tensors on one storage, links are found through indexes (view of,
#: viewed by, alias of) and the rest is summarised, instead of comparing every pair.
PAIRWISE_LINKS = 64


def _layout_key(t: torch.Tensor, sp: access.Span | None) -> Any:
    return (sp.lo if sp else None, sp.hi if sp else None, t.dtype, tuple(t.shape),
            tuple(t.stride()))


def _links_in_large_group(t: torch.Tensor, name: str, index: MemoryIndex) -> list[Link]:
    sp = index.span(t)
    assert sp is not None
    children, aliases = index._group_maps(sp.storage_key)
    links: list[Link] = []
    linked = {name}
    for other_name, _ in index.by_id.get(id(t), []):
        if other_name not in linked:
            links.append(Link("same object as", other_name))
            linked.add(other_name)
    if t._base is not None:
        for other_name, _ in index.by_id.get(id(t._base), []):
            if other_name not in linked:
                links.append(Link("view of", other_name))
                linked.add(other_name)
    for other_name in children.get(id(t), []):
        if other_name not in linked:
            links.append(Link("viewed by", other_name))
            linked.add(other_name)
    for other_name in aliases.get(_layout_key(t, sp), []):
        if other_name not in linked:
            links.append(Link("alias of", other_name))
            linked.add(other_name)
    rest = len(aliases["names"]) - len(linked & aliases["names"])
    if rest:
        links.append(Link("shares storage with", f"{rest:,} other named tensors"))
    return links


def footprints(named: list[tuple[str, torch.Tensor, bool]]) -> MemoryIndex:
    """The memory index of named tensors, computed once (for :func:`links_of`)."""
    return MemoryIndex(named)


def links_of(t: torch.Tensor, name: str, named: list[tuple[str, torch.Tensor, bool]],
             fps: MemoryIndex | None = None) -> list[Link]:
    """Memory links of ``t`` to the other named tensors (``fps``: from :func:`footprints`).

    Two views of the same named tensor (``a = x[0]``, ``b = x.view(-1)``) obviously share storage;
    that sibling link is left out when both are already linked to that tensor.
    """
    index = footprints(named) if fps is None else fps
    if len(index.group(t)) > PAIRWISE_LINKS:
        return _links_in_large_group(t, name, index)
    links: list[Link] = []
    by_name = {}
    for other_name, other in index.candidates(t):
        if other_name == name:
            continue
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
    k = access.kind(t)
    unknown = access.values_unknown(t)
    why_no_stats = stats_unavailable(t) if unknown is None else unknown
    if unknown is None and k not in ("dense", "nested", "functional"):
        unknown = why_no_stats or access.describe(t)  # quantized, sparse, mkldnn, subclasses
    strided = k in ("dense", "meta", "fake")
    notes: list[str] = []
    grad = None
    if t.is_leaf or t.retains_grad:  # reading .grad of a non-leaf warns
        g = t.grad
        grad = None if g is None else f"{_shape_str(g)} on {g.device}"
    stride = contiguous = offset = sbytes = None
    fmt = None
    if strided:
        with access.plain_ops():
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
    if k == "nested":
        layout = "nested" if t.layout == torch.strided else "nested (jagged)"
    else:
        layout = str(t.layout).replace("torch.", "")
    info = TensorInfo(
        name=name, type_name=type(t).__name__, shape=shape_of(t),
        dtype=str(t.dtype).replace("torch.", ""), device=str(t.device), layout=layout,
        numel=access.numel(t), nbytes=nbytes_of(t), requires_grad=t.requires_grad,
        grad_fn=None if t.grad_fn is None else type(t.grad_fn).__name__, is_leaf=t.is_leaf,
        grad=grad, stride=stride, contiguous=contiguous, memory_format=fmt,
        storage_offset=offset, storage_bytes=sbytes,
        is_view=k != "uninitialized" and t._is_view(), unknown=unknown,
        stats=None, notes=notes,
    )
    if namespace is not None:
        info.links = links_of(t, name, named_tensors(namespace))
    if stats and unknown is None:
        if why_no_stats is not None:
            notes.append(f"{name}: {why_no_stats}")
        else:
            try:
                info.stats = tensor_stats(t)
            except (RuntimeError, NotImplementedError) as exc:  # a dtype without kernels
                why = " ".join(str(exc).split())[:80]
                notes.append(f"{name}: statistics not available for {info.dtype} on "
                             f"{info.device} ({why})")
            if k == "dense" and info.stats is not None:
                with access.plain_ops():
                    base, repeat = access.dedup_broadcast(t)
                if repeat > 1:
                    notes.append(f"{name}: a broadcast view (stride 0): statistics from its "
                                 f"{base.numel():,} distinct elements, each repeated "
                                 f"{repeat:,} times")
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
    flag: str | None  # "NaN", "Inf", "NaN+Inf", "?" (values unknown), "not checked" or None


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
    notes: list[str] = field(default_factory=list)


def _unallocated(device: str) -> bool:
    return device.startswith("meta") or device.endswith("(fake)")


def tensors(namespace: Mapping[str, Any], *, check_values: bool = True) -> TensorTable:
    """Every tensor bound to a name in ``namespace`` (``%whos`` for tensors), largest first.

    Parameters inside modules are not rows unless bound to a name, but "view of" links name them
    (``model.fc.weight``). ``check_values`` adds the NaN/Inf flag (one pass over each tensor, up
    to :data:`~torchmagic.core.tensor_stats.FLAG_BUDGET_BYTES` of memory in all; the tensors
    beyond it are flagged "not checked").
    """
    named = named_tensors(namespace)
    top = [(n, t) for n, t, member in named if not member]
    flags = nonfinite_flags([t for _, t in top]) if check_values else [None] * len(top)
    index = footprints(named)
    rows: list[TensorRow] = []
    for (name, t), flag in zip(top, flags):
        links = links_of(t, name, named, index)
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
        fp = index.span(t)
        if fp is None or fp.kind == "impl":
            key_dev = str(t.device) + (" (fake)" if is_fake(t) else "")
            if fp is None:
                loose_dev[key_dev] = loose_dev.get(key_dev, 0) + nbytes_of(t)
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
    notes = []
    unchecked = [r.name for r in rows if r.flag == "not checked"]
    if unchecked:
        notes.append(f"NaN/Inf not checked for {len(unchecked)} tensor"
                     f"{'s' * (len(unchecked) != 1)} ({', '.join(unchecked[:3])}"
                     f"{', ...' if len(unchecked) > 3 else ''}): beyond the "
                     f"{FLAG_BUDGET_BYTES >> 20} MiB read per %tensors; %tensor NAME checks one")
    return TensorTable(rows=rows, total_bytes=total, by_device=by_device, notes=notes)
