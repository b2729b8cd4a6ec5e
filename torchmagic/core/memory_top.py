"""``%gpumem --top``: the largest live storages, found by a ``gc`` scan and named from a namespace.

Every tensor is read through :mod:`torchmagic.core.access`: nested, sparse, quantized, mkldnn, meta,
fake and subclass tensors are counted by the memory their components hold (or skipped when they
hold none), never by an op that fails or crashes on them.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchmagic.core import access
from torchmagic.core import memory as _m
from torchmagic.core._result import Result
from torchmagic.core.errors import TorchMagicError


# --------------------------------------------------------------------------------------------
# %gpumem --top
# --------------------------------------------------------------------------------------------
@dataclass
class TensorEntry:
    """One storage held by live tensors: the best name, its tensor's shape/dtype, bytes."""

    name: str
    device: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    kind: str  # "tensor", "parameter", "grad", "buffer", "optimizer state"
    views: int = 0  # other tensors sharing this storage
    other_names: list[str] = field(default_factory=list)


@dataclass
class DeviceTotal:
    device: str
    tensors: int
    storages: int
    bytes: int
    allocated: int | None = None  # torch's allocator counter, where there is one


@dataclass
class TopTensors(Result):
    """What ``%gpumem --top`` shows: the largest storages per device and the per-device totals."""

    _display_module = "torchmagic.display.memory"

    entries: list[TensorEntry]
    totals: list[DeviceTotal]
    n: int
    skipped_meta: int = 0
    notes: list[str] = field(default_factory=list)
    skipped_empty: int = 0  # tensors whose storage holds 0 bytes (torch keeps some of its own)


def _names_from(namespace: Mapping[str, Any]) -> dict[int, list[tuple[str, str]]]:
    """id(tensor) -> [(name, kind)] from a namespace: variables, module parameters/buffers and
    their grads, optimizer state, items of lists/tuples/dicts, IPython's ``Out`` history."""
    import torch.nn as nn

    names: dict[int, list[tuple[str, str]]] = {}
    param_names: dict[int, str] = {}

    def add(t: Any, name: str, kind: str) -> None:
        if isinstance(t, torch.Tensor):
            names.setdefault(id(t), []).append((name, kind))

    items = [(k, v) for k, v in namespace.items() if not k.startswith("_")]
    modules = [(k, v) for k, v in items if isinstance(v, nn.Module)]
    for k, v in items:
        if isinstance(v, torch.Tensor):
            add(v, k, "parameter" if isinstance(v, nn.Parameter) else "tensor")
    for k, m in modules:
        with contextlib.suppress(Exception):
            for pname, p in m.named_parameters(remove_duplicate=False):
                full = f"{k}.{pname}"
                add(p, full, "parameter")
                param_names.setdefault(id(p), full)
                if p.grad is not None:
                    add(p.grad, f".grad of {full}", "grad")
            for bname, b in m.named_buffers(remove_duplicate=False):
                add(b, f"{k}.{bname}", "buffer")
    for k, v in items:
        if isinstance(v, torch.optim.Optimizer):
            with contextlib.suppress(Exception):
                for p, st in v.state.items():
                    pname = param_names.get(id(p), "a parameter")
                    for sk, sv in st.items():
                        add(sv, f"{k}.state[{pname}][{sk!r}]", "optimizer state")
        elif isinstance(v, (list, tuple)) and len(v) <= 10_000:
            for i, item in enumerate(v):
                add(item, f"{k}[{i}]", "tensor")
        elif isinstance(v, dict) and len(v) <= 10_000:
            for dk, item in v.items():
                add(item, f"{k}[{dk!r}]", "tensor")
    out = namespace.get("Out")
    if isinstance(out, dict):
        for n, v in out.items():
            add(v, f"Out[{n}]", "tensor")
    return names


def _storage_key(t: torch.Tensor) -> tuple[Any, int, int]:
    """(key shared by all views of one storage, storage bytes, size of this tensor's data).
    Tensors without one plain storage (sparse, nested, quantized, wrappers) count the storages
    of their components, keyed by the tensor itself."""
    own = access.nbytes(t)
    sp = access.span(t)
    if sp is not None and sp.kind == "ptr":
        return (sp.device, sp.storage_lo), sp.storage_hi - sp.storage_lo, own
    return ("id", id(t)), access.storage_nbytes(t), own


def top_tensors(namespace: Mapping[str, Any] | None = None, n: int = 10,
                device: int | str | None = None) -> TopTensors:
    """The ``n`` largest live storages (gc scan of tensors, parameters and their ``.grad``),
    grouped by device, named from ``namespace`` (e.g. ``globals()`` or IPython's ``user_ns``)
    where a name can be found. Views of one storage are counted once (keyed on the storage's data
    pointer); meta/fake tensors and storages of 0 bytes hold no memory and are skipped (counted in
    ``skipped_meta`` / ``skipped_empty``).
    """
    if namespace is not None and not isinstance(namespace, Mapping):
        raise TorchMagicError(f"namespace must be a mapping of names to objects (globals()); got "
                              f"{type(namespace).__name__} (the count is n=...)")
    if not isinstance(n, int) or n < 1:
        raise TorchMagicError(f"--top needs a positive number of tensors; got {n!r}")
    chosen = _m.parse_device(device)
    names = _names_from(namespace or {})
    found: dict[int, torch.Tensor] = {}
    tensor_type = torch.Tensor
    for obj in gc.get_objects():
        if issubclass(type(obj), tensor_type):  # type(), not isinstance: no __class__ lookups
            found[id(obj)] = obj
    for t in list(found.values()):  # grads may have no Python object tracked by gc yet
        with contextlib.suppress(Exception):
            if t.is_leaf and t.requires_grad and t.grad is not None:
                found.setdefault(id(t.grad), t.grad)
    groups: dict[Any, dict[str, Any]] = {}
    skipped_meta = skipped_empty = 0
    for t in found.values():
        try:
            what = access.kind(t)
            if what in ("meta", "fake", "uninitialized"):
                skipped_meta += 1
                continue
            dev = str(t.device)
        except Exception:  # noqa: BLE001 - a tensor in an unusable state: not counted
            continue
        if chosen is not None and dev != chosen and not (chosen == "mps" and dev.startswith("mps")):
            continue
        key, nbytes, own = _storage_key(t)
        if nbytes == 0:  # holds no memory (also the empty tensors torch itself keeps alive)
            skipped_empty += 1
            continue
        g = groups.setdefault(key, {"device": dev, "bytes": nbytes, "tensors": []})
        g["tensors"].append((t, own))
    del found
    entries: list[TensorEntry] = []
    totals: dict[str, DeviceTotal] = {}
    for g in groups.values():
        dev = g["device"]
        tot = totals.setdefault(dev, DeviceTotal(dev, 0, 0, 0))
        tot.tensors += len(g["tensors"])
        tot.storages += 1
        tot.bytes += g["bytes"]

        def rank(item: tuple[torch.Tensor, int], nbytes: int = g["bytes"]) -> tuple[int, int, int]:
            t, own = item
            named = 1 if id(t) in names else 0
            return (named, 1 if own == nbytes else 0, own)

        ordered = sorted(g["tensors"], key=rank, reverse=True)
        best = ordered[0][0]
        labels = [names[id(t)] for t, _ in ordered if id(t) in names]
        all_names = [nm for lst in labels for nm in lst]
        if all_names:
            name, kind = all_names[0]
        else:
            kind = "parameter" if isinstance(best, torch.nn.Parameter) else "tensor"
            name = f"(unnamed {kind})"
        entries.append(TensorEntry(
            name=name, device=dev, shape=access.shape(best),
            dtype=str(best.dtype).replace("torch.", ""), bytes=g["bytes"], kind=kind,
            views=len(g["tensors"]) - 1,
            other_names=[nm for nm, _ in all_names[1:6]]))
    groups.clear()
    entries.sort(key=lambda e: e.bytes, reverse=True)
    top = entries[:n]
    top.sort(key=lambda e: (_device_order(e.device), -e.bytes))
    notes: list[str] = []
    for dev, tot in totals.items():
        if dev.startswith("cuda") and torch.cuda.is_initialized():
            idx = torch.device(dev).index
            tot.allocated = int(torch.cuda.memory_allocated(idx if idx is not None else 0))
    if any(t.allocated and t.allocated > t.bytes * 1.1 + 2**20 for t in totals.values()):
        notes.append("torch's allocator holds more than the live Python tensors: the rest is held "
                     "by autograd graphs (saved activations), C++ objects or caches")
    if len(entries) > n:
        rest = entries[n:]
        notes.append(f"{len(rest)} smaller storages not listed "
                     f"({sum(e.bytes for e in rest):,} bytes)")
    return TopTensors(top, sorted(totals.values(), key=lambda t: _device_order(t.device)), n,
                      skipped_meta, notes, skipped_empty)


def _device_order(dev: str) -> tuple[int, str]:
    order = 0 if dev.startswith("cuda") else 1 if dev.startswith("mps") else 2
    return (order, dev)


