"""The state-snapshot helper every magic's invariant test uses.

``snap = Snapshot.take(model, ...)`` records, for every object given: parameters and buffers
(bitwise), each module's ``training`` flag, every hook dictionary, ``requires_grad``, ``.grad``,
devices; plus torch's global state (default device/dtype, grad/anomaly mode, autocast, RNG) and the
global module hooks. ``snap.assert_unchanged()`` compares against the present and names every
difference. ``assert_released(factory, fn)`` checks that ``fn(model)`` keeps no reference alive.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

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
        "id": id(t), "device": t.device, "dtype": t.dtype, "shape": tuple(t.shape),
        "requires_grad": t.requires_grad, "version": t._version,
    }
    if not t.is_meta:
        rec["data"] = t.detach().clone()
    g = t.grad if t.is_leaf else None
    rec["grad"] = None if g is None else (g.detach().clone(), id(g))
    return rec


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (bitwise comparison: NaN equals the same NaN)."""
    t = t.contiguous().view(-1)
    return t.view(torch.uint8) if t.numel() else t


def _same_tensor(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for k in ("id", "device", "dtype", "shape", "requires_grad"):
        if a[k] != b[k]:
            out.append(f"{k} {a[k]} -> {b[k]}")
    if "data" in a and "data" in b and not torch.equal(_bits(a["data"]), _bits(b["data"])):
        out.append("values changed")
    if (a["grad"] is None) != (b["grad"] is None):
        out.append(f".grad {'None' if a['grad'] is None else 'set'} -> "
                   f"{'None' if b['grad'] is None else 'set'}")
    elif a["grad"] is not None and (a["grad"][1] != b["grad"][1]
                                    or not torch.equal(a["grad"][0], b["grad"][0])):
        out.append(".grad changed")
    return out


@dataclass
class Snapshot:
    modules: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)
    global_state: GlobalState | None = None
    default_device: torch.device | None = None
    global_hooks: dict[str, list[int]] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)

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
                    rec = {"training": mod.training, "id": id(mod),
                           "hooks": {h: list(getattr(mod, h, {}).items()) for h in _HOOK_ATTRS}}
                    snap.modules[f"{key}:{name}"] = rec
                for name, t in obj.named_parameters(remove_duplicate=False):
                    snap.tensors[f"{key}:param:{name}"] = _tensor_record(t)
                for name, t in obj.named_buffers(remove_duplicate=False):
                    snap.tensors[f"{key}:buffer:{name}"] = _tensor_record(t)
            elif isinstance(obj, torch.Tensor):
                snap.tensors[f"{key}:tensor"] = _tensor_record(obj)
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
