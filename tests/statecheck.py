"""The state-snapshot helper every magic's invariant test uses.

``snap = Snapshot.take(model, ...)`` records, for every object given: parameters and buffers
(bitwise, whatever their layout: values are read through :mod:`torchmagic.core.access`), each
module's ``training`` flag and Python attributes, every hook dictionary, ``requires_grad``,
``.grad``, devices; for any other object (optimizers, plain objects, dicts, lists, a whole
namespace) a deep record of what it holds (tensors bitwise; a meta or fake tensor appearing in it is
named); plus torch's global state (default device/dtype, grad/anomaly mode, autocast, RNG, threads,
deterministic algorithms, float32 precision and backend flags) and the global module hooks.
``snap.assert_unchanged()`` compares against the present and names every difference.
``assert_released(factory, fn)`` checks that ``fn(model)`` keeps no reference alive.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core import access
from torchmagic.core.state import GlobalState, default_device

_HOOK_ATTRS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
)


def _global_hooks() -> dict[str, list[int]]:
    from torch.nn.modules import module as m

    names = [n for n in dir(m) if n.startswith("_global_") and n.endswith("hooks")]
    return {n: list(getattr(m, n).keys()) for n in names if isinstance(getattr(m, n), dict)}


def _tensor_record(t: torch.Tensor) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": id(t), "device": t.device, "dtype": t.dtype, "shape": access.shape(t),
        "requires_grad": t.requires_grad, "version": access.version(t), "kind": access.kind(t),
    }
    rec["data"] = access.fingerprint(t)
    g = t.grad if t.is_leaf else None
    rec["grad"] = None if g is None else (access.fingerprint(g), id(g), access.kind(g))
    return rec


def _same_tensor(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for k in ("id", "device", "dtype", "shape", "requires_grad", "kind"):
        if a[k] != b[k]:
            out.append(f"{k} {a[k]} -> {b[k]}")
    if not access.same_fingerprint(a["data"], b["data"]):
        out.append("values changed")
    if (a["grad"] is None) != (b["grad"] is None):
        out.append(f".grad {'None' if a['grad'] is None else 'set'} -> "
                   f"{'None' if b['grad'] is None else 'set'}")
    elif a["grad"] is not None and (a["grad"][1:] != b["grad"][1:]
                                    or not access.same_fingerprint(a["grad"][0], b["grad"][0])):
        out.append(".grad changed")
    return out


_MODULE_INTERNALS = set(vars(nn.Module())) | {"training"}
_ATOMS = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size,
          range, slice, type(Ellipsis))


def _deep(obj: Any, depth: int = 0, seen: set[int] | None = None, budget: list[int] | None = None
          ) -> Any:
    """A comparable record of what ``obj`` holds (tensors bitwise, containers and attributes
    recursively, other objects by identity), bounded in depth and size."""
    seen = set() if seen is None else seen
    budget = [20_000] if budget is None else budget
    budget[0] -= 1
    if isinstance(obj, _ATOMS):
        return ("atom", obj if not isinstance(obj, float) or obj == obj else "nan")
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(sorted((k, str(v)) for k, v in _tensor_record(obj).items()
                                       if k not in ("data", "grad"))),
                _Fp(_tensor_record(obj)))
    if depth > 6 or budget[0] < 0 or id(obj) in seen:
        return ("ref", type(obj).__name__, id(obj))
    seen = seen | {id(obj)}
    if isinstance(obj, nn.Module):
        attrs = {k: v for k, v in vars(obj).items() if k not in _MODULE_INTERNALS}
        return ("module", id(obj), obj.training,
                tuple((k, _deep(v, depth + 1, seen, budget)) for k, v in attrs.items()),
                tuple(_deep(t, depth + 1, seen, budget)
                      for t in [*obj.parameters(), *obj.buffers()]),
                tuple(_deep(m, depth + 1, seen, budget) for m in obj.children()))
    if isinstance(obj, torch.optim.Optimizer):
        state = tuple((i, tuple((k, _deep(v, depth + 1, seen, budget)) for k, v in st.items()))
                      for i, st in enumerate(obj.state.values()))
        groups = tuple(tuple((k, _deep(v, depth + 1, seen, budget)) for k, v in g.items()
                             if k != "params") for g in obj.param_groups)
        return ("optimizer", id(obj), state, groups,
                tuple(id(p) for g in obj.param_groups for p in g["params"]),
                tuple(id(p) for p in obj.state))
    if isinstance(obj, dict):
        return ("dict", id(obj), tuple((_deep(k, depth + 1, seen, budget),
                                        _deep(v, depth + 1, seen, budget))
                                       for k, v in list(obj.items())[:2000]))
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return (type(obj).__name__, id(obj),
                tuple(_deep(v, depth + 1, seen, budget) for v in list(items)[:2000]))
    if callable(obj) and not hasattr(obj, "__dict__"):
        return ("ref", type(obj).__name__, id(obj))
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict) and not isinstance(obj, type) and \
            type(obj).__module__ not in ("builtins",) and not callable(obj):
        return ("object", type(obj).__name__, id(obj),
                tuple((k, _deep(v, depth + 1, seen, budget)) for k, v in list(state.items())))
    return ("ref", type(obj).__name__, id(obj))


class _Fp:
    """A tensor record compared bitwise (``==``) inside :func:`_deep` records."""

    def __init__(self, rec: dict[str, Any]) -> None:
        self.rec = rec

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Fp) and not _same_tensor(self.rec, other.rec)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"tensor({self.rec['kind']}, {self.rec['shape']})"


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    if a == b:
        return None
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}/{i}")
            if found:
                return found
    return f"{path}: {str(a)[:120]} -> {str(b)[:120]}"


def fake_or_meta_tensors(obj: Any, path: str = "obj", depth: int = 0,
                         seen: set[int] | None = None) -> list[str]:
    """Paths of meta or fake tensors reachable from ``obj`` (attributes, containers, optimizer
    state): after a magic ran on twins, a real object must hold none that it did not hold."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 8 or isinstance(obj, _ATOMS):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [f"{path} ({access.kind(obj)})"] if access.kind(obj) in ("meta", "fake") else []
    out: list[str] = []
    if isinstance(obj, torch.optim.Optimizer):
        for i, (p, st) in enumerate(obj.state.items()):
            out += fake_or_meta_tensors(p, f"{path}.state key {i}", depth + 1, seen)
            out += fake_or_meta_tensors(st, f"{path}.state[{i}]", depth + 1, seen)
        out += fake_or_meta_tensors(obj.param_groups, f"{path}.param_groups", depth + 1, seen)
        return out
    if isinstance(obj, dict):
        for k, v in list(obj.items())[:2000]:
            out += fake_or_meta_tensors(v, f"{path}[{k!r}]", depth + 1, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(list(obj)[:2000]):
            out += fake_or_meta_tensors(v, f"{path}[{i}]", depth + 1, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and \
            type(obj).__module__ != "builtins":
        for k, v in list(vars(obj).items()):
            out += fake_or_meta_tensors(v, f"{path}.{k}", depth + 1, seen)
    return out


@dataclass
class Snapshot:
    modules: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)
    global_state: GlobalState | None = None
    default_device: torch.device | None = None
    global_hooks: dict[str, list[int]] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    deep: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def take(cls, *objs: Any, **named: Any) -> Snapshot:
        """Record modules and tensors (positional: named m0, m1, ...; or by keyword)."""
        snap = cls()
        items = {f"m{i}": o for i, o in enumerate(objs)}
        items.update(named)
        snap.objects = items
        for key, obj in items.items():
            if isinstance(obj, nn.Module):
                for name, mod in obj.named_modules(remove_duplicate=False):
                    attrs = {k: v for k, v in vars(mod).items() if k not in _MODULE_INTERNALS
                             and not isinstance(v, (nn.Module, torch.Tensor))}
                    rec = {"training": mod.training, "id": id(mod),
                           "hooks": {h: list(getattr(mod, h, {}).items()) for h in _HOOK_ATTRS},
                           "attrs": tuple((k, _deep(v)) for k, v in attrs.items())}
                    snap.modules[f"{key}:{name}"] = rec
                for name, t in obj.named_parameters(remove_duplicate=False):
                    snap.tensors[f"{key}:param:{name}"] = _tensor_record(t)
                for name, t in obj.named_buffers(remove_duplicate=False):
                    snap.tensors[f"{key}:buffer:{name}"] = _tensor_record(t)
            elif isinstance(obj, torch.Tensor):
                snap.tensors[f"{key}:tensor"] = _tensor_record(obj)
            else:
                snap.deep[key] = _deep(obj)
        snap.global_state = GlobalState.capture()
        snap.default_device = default_device()
        snap.global_hooks = _global_hooks()
        return snap

    def differences(self) -> list[str]:
        now = Snapshot.take(**self.objects)
        diffs: list[str] = []
        if now.modules.keys() != self.modules.keys():
            diffs.append("module tree changed")
        for name, rec in self.modules.items():
            other = now.modules.get(name)
            if other is None:
                continue
            if rec["training"] != other["training"]:
                diffs.append(f"{name}: training {rec['training']} -> {other['training']}")
            if rec["id"] != other["id"]:
                diffs.append(f"{name}: module replaced")
            if rec["attrs"] != other["attrs"]:
                diffs.append(f"{name}: Python attributes changed "
                             f"({_first_difference(rec['attrs'], other['attrs'], 'attrs')})")
            for h, items in rec["hooks"].items():
                if [k for k, _ in items] != [k for k, _ in other["hooks"][h]] or any(
                    a is not b for (_, a), (_, b) in zip(items, other["hooks"][h])
                ):
                    diffs.append(f"{name}: {h} changed")
        if now.tensors.keys() != self.tensors.keys():
            diffs.append("set of parameters/buffers changed")
        for name, rec in self.tensors.items():
            other = now.tensors.get(name)
            if other is not None:
                diffs.extend(f"{name}: {d}" for d in _same_tensor(rec, other))
        for key, rec in self.deep.items():
            if rec != now.deep.get(key):
                diffs.append(f"{key}: changed ({_first_difference(rec, now.deep.get(key), key)})")
        assert self.global_state is not None and now.global_state is not None
        diffs.extend(f"global {d}" for d in self.global_state.diff(now.global_state))
        if self.default_device != now.default_device:
            diffs.append(f"default device {self.default_device} -> {now.default_device}")
        if self.global_hooks != now.global_hooks:
            diffs.append("global module hooks changed")
        return diffs

    def assert_unchanged(self) -> None:
        diffs = self.differences()
        assert not diffs, "state changed:\n  " + "\n  ".join(diffs)


def assert_released(obj_factory: Any, use: Any) -> None:
    """``use(obj)`` must not keep ``obj`` alive (no cache holds the user's model)."""
    obj = obj_factory()
    ref = weakref.ref(obj)
    result = use(obj)
    del obj
    del result
    gc.collect()
    assert ref() is None, "torchmagic kept a reference to the user's object"
