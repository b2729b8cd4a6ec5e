"""Twins of user objects, so torchmagic never mutates what the user owns.

``meta_twin(model)`` is a structural copy whose parameters and buffers live on the meta device: no
weight is read or copied (about 1 ms), tied parameters stay tied (the deepcopy memo maps each tensor
once), hooks and training flags are copied with the module. ``model.to("meta")`` would instead
destroy the user's weights in place.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn


def uninitialized_like(t: torch.Tensor, device: Any = None) -> torch.Tensor:
    """A fresh ``UninitializedParameter``/``UninitializedBuffer`` like ``t`` (a lazy module's
    parameter) on ``device`` (default: ``t``'s): the twin's lazy module materializes its own on
    its first forward, the user's stays lazy."""
    from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

    dev = t.device if device is None else torch.device(device)
    if isinstance(t, UninitializedParameter):
        return UninitializedParameter(requires_grad=t.requires_grad, device=dev, dtype=t.dtype)
    return UninitializedBuffer(requires_grad=t.requires_grad, device=dev, dtype=t.dtype)


def _lazy(t: torch.Tensor) -> bool:
    from torch.nn.parameter import is_lazy

    return is_lazy(t)


def meta_tensor(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised meta tensor with ``t``'s shape, dtype, strides and ``requires_grad``."""
    if _lazy(t):
        return uninitialized_like(t, "meta")
    if t.is_nested:  # a nested tensor has no strides to copy: its own .to keeps the layout
        out = t.detach().to("meta")
        return nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
            else out
    if isinstance(t, nn.Parameter):
        return nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="meta")
    if t.requires_grad and t.is_floating_point():
        out.requires_grad_(True)
    return out


def tensor_memo(model: nn.Module, convert: Any = meta_tensor) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo that maps each parameter/buffer of ``model`` to ``convert(t)``.

    Gradients are not copied: the twin's parameters have ``.grad is None``.
    """
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            memo[id(t)] = convert(t)
    # Packed quantized weights (torch.ScriptObject in quantized modules) are read-only in a
    # forward: the twin shares them rather than copying every int8 weight.
    for mod in model.modules():
        for value in vars(mod).values():
            if isinstance(value, torch.ScriptObject):
                memo.setdefault(id(value), value)
    return memo


def twin(model: nn.Module, convert: Any = meta_tensor) -> nn.Module:
    """Deep copy of ``model`` whose tensors are ``convert(t)`` (tying preserved)."""
    memo = tensor_memo(model, convert)
    return copy.deepcopy(model, memo)


def meta_twin(model: nn.Module) -> nn.Module:
    """A meta-device copy of ``model``: same structure, flags and hooks; no memory; user untouched."""
    return twin(model, meta_tensor)


def device_twin(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A copy of ``model`` on ``device`` (real weights copied; the user's model is not moved)."""
    device = torch.device(device)

    def convert(t: torch.Tensor) -> torch.Tensor:
        if _lazy(t):
            return uninitialized_like(t, device)
        with torch.no_grad():
            moved = t.detach().to(device, copy=True)
        if isinstance(t, nn.Parameter):
            return nn.Parameter(moved, requires_grad=t.requires_grad)
        return moved

    return twin(model, convert)


def shared_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter that shares ``t``'s storage (no weight copied; a new ``nn.Parameter`` object,
    so nothing set on it reaches the user's), or a clone of a buffer (in-place updates such as
    BatchNorm's running statistics land in the clone); a lazy one becomes a fresh uninitialized
    parameter."""
    if _lazy(t):
        return uninitialized_like(t)
    if isinstance(t, nn.Parameter):
        try:
            return nn.Parameter(t.detach(), requires_grad=t.requires_grad)
        except Exception:  # noqa: BLE001 - a tensor subclass that cannot be re-wrapped: shared
            return t
    with torch.no_grad():
        return t.detach().clone()


def shared_twin(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` that runs on the same weights: parameters share the user's
    storage, buffers are clones, Python attributes, flags and submodules are the twin's own.
    What a forward writes (``self.steps += 1``, running statistics, caches) stays in the twin."""
    return twin(model, shared_tensor)


def model_devices(model: nn.Module) -> set[torch.device]:
    """Devices holding the parameters and buffers of ``model``."""
    return {t.device for t in [*model.parameters(), *model.buffers()]}


def is_meta_model(model: nn.Module) -> bool:
    """True when any parameter or buffer of ``model`` is on the meta device."""
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def fake_tensor(t: torch.Tensor, mode: Any) -> torch.Tensor:
    """A FakeTensor of ``t`` made by ``mode.from_tensor`` (a ``FakeTensorMode``): same shape, dtype,
    device and ``requires_grad``, no data; Parameters stay Parameters. ``t`` is not touched."""
    fake = mode.from_tensor(t)
    if isinstance(t, nn.Parameter):
        return nn.Parameter(fake, requires_grad=t.requires_grad)
    return fake


def fake_twin(model: nn.Module, mode: Any) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake tensors of ``mode`` (tying kept):
    run it inside ``with mode:`` without ``allow_non_fake_inputs``."""
    return twin(model, lambda t: fake_tensor(t, mode))


_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
               "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


def twin_optimizer(optimizer: torch.optim.Optimizer, param_map: dict[int, torch.Tensor],
                   convert: Any) -> torch.optim.Optimizer:
    """A copy of ``optimizer`` over twin parameters, with its state twinned too.

    ``param_map``: ``id(real parameter) -> twin parameter`` (the tensors of a model twin, so the
    optimizer twin updates that twin's parameters); a parameter not in it is made by
    ``convert(p)`` and added. Every other tensor (state such as ``exp_avg``/``step``, tensor
    hyperparameters such as a tensor ``lr``) becomes ``convert(t)``; plain values are deep-copied.
    The twin has the optimizer's own class, hyperparameters, ``param_groups`` structure and hooks
    (hook dictionaries copied, so hooks added to the twin never reach the user's optimizer). The
    per-instance ``step`` wrapper an LR scheduler installs (bound to the original optimizer) is not
    copied: the twin's ``step`` is its class's. ``optimizer`` is not touched.
    """
    import collections

    def twin_param(p: torch.Tensor) -> torch.Tensor:
        if id(p) not in param_map:
            param_map[id(p)] = convert(p)
        return param_map[id(p)]

    def value(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return convert(v)
        return copy.deepcopy(v)

    new = object.__new__(type(optimizer))
    attrs = dict(vars(optimizer))
    attrs.pop("step", None)  # an LR scheduler's wrapper that calls the *original* optimizer
    new.__dict__.update(attrs)
    for name in _HOOK_DICTS:
        hooks = attrs.get(name)
        if isinstance(hooks, dict):
            setattr(new, name, type(hooks)(hooks))
    new.defaults = {k: value(v) for k, v in optimizer.defaults.items()}
    new.param_groups = [
        {k: ([twin_param(p) for p in v] if k == "params" else value(v)) for k, v in g.items()}
        for g in optimizer.param_groups
    ]
    state: collections.defaultdict[torch.Tensor, dict[str, Any]] = collections.defaultdict(dict)
    for p, s in optimizer.state.items():
        state[twin_param(p)] = {k: value(v) for k, v in s.items()}
    new.state = state
    return new
