"""Twins of user objects, so torchmagic never mutates what the user owns.

``meta_twin(model)`` is a structural copy whose parameters and buffers live on the meta device: no
weight is read or copied (about 1 ms), tied parameters stay tied (the deepcopy memo maps each tensor
once), hooks and training flags are copied with the module. ``model.to("meta")`` would instead
destroy the user's weights in place.

Every twin is isolated (:mod:`torchmagic.core.isolation`): its Python attributes, containers and
the side effects of its hooks (bound-method owners, closure variables, globals a hook writes to, such
as a list a forward hook appends outputs to) land on copies, never on the user's objects; an object
that cannot be isolated (a generator, an open file, ...) is refused with one line naming it and why
(:class:`~torchmagic.core.isolation.IsolationError`). Optimizers, LR schedulers and GradScalers have
twins too (:func:`twin_optimizer`, :func:`twin_lr_scheduler`, :func:`twin_grad_scaler`): pass the
:class:`~torchmagic.core.isolation.Isolation` the model was twinned with, and the twin optimizer holds
the twin parameters, its state (``exp_avg``...) converted the same way.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core.errors import TorchMagicError
from torchmagic.core.isolation import Isolation, IsolationError


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


def _label(convert: Any) -> str:
    return {meta_tensor: "meta"}.get(convert, "twin")


def twin(model: nn.Module, convert: Any = meta_tensor, *, isolation: Isolation | None = None,
         name: str = "") -> nn.Module:
    """Isolated deep copy of ``model`` whose tensors are ``convert(t)`` (tying preserved).

    ``isolation``: share one memo with other twins of the same run (an optimizer twinned after
    its model then holds the twin parameters); default: a new one using ``convert``. ``name``
    names the model in messages. Raises :class:`IsolationError` (a :class:`TorchMagicError`)
    when some part of the model cannot be copied and must not be shared.
    """
    iso = isolation if isolation is not None else Isolation(convert, _label(convert))
    name = name or type(model).__name__
    try:
        memo = tensor_memo(model, iso.convert)
    except Exception:  # noqa: BLE001 - find the tensor that cannot be converted, and name it
        for tname, t in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
            iso.tensor(t, f"{name}.{tname}")
        raise
    for key, value in memo.items():
        if key not in iso.memo:
            iso.memo[key] = value
            iso.converted += 1
    iso.keep.append(model)  # its tensors, whose ids are memo keys, stay alive as long as iso
    return iso.copy(model, name)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p for g in optimizer.param_groups for p in g["params"]]
    for p, st in optimizer.state.items():
        if isinstance(p, torch.Tensor):
            out.append(p)
        if isinstance(st, dict):
            out.extend(v for v in st.values() if isinstance(v, torch.Tensor))
    return out


def twin_optimizer(optimizer: torch.optim.Optimizer, convert: Any = meta_tensor, *,
                   isolation: Isolation | None = None, name: str = "optimizer"
                   ) -> torch.optim.Optimizer:
    """A copy of ``optimizer`` over twin parameters, its state included.

    Twin the model first with the same ``isolation`` (``twin(model, isolation=iso)``): the twin
    optimizer's parameter groups then hold the model twin's parameters (tying and order kept) and
    its state (``exp_avg``, ``step``...) is converted like every tensor of the run. Without one,
    the parameters are converted here. Stepping the twin never touches ``optimizer`` (hooks
    registered on ``optimizer`` are not copied: ``copy.deepcopy`` of an optimizer keeps its
    defaults, state and groups).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise IsolationError(f"{name} is {type(optimizer).__name__}, not a torch.optim.Optimizer")
    iso = isolation if isolation is not None else Isolation(convert, _label(convert))
    for t in _optimizer_tensors(optimizer):
        iso.tensor(t)
    new = iso.copy(optimizer, name)
    if hasattr(getattr(optimizer, "step", None), "_wrapped_by_lr_sched"):
        _track_step_called(new)  # as an LR scheduler patched the original
    if hasattr(optimizer, "_opt_called"):
        new._opt_called = optimizer._opt_called
    return new


def _track_step_called(opt: torch.optim.Optimizer) -> None:
    """What ``LRScheduler.__init__`` does to its optimizer's ``step`` (so the twin scheduler does
    not warn that ``optimizer.step()`` was overridden)."""
    import functools
    import weakref

    opt_ref = weakref.ref(opt)
    func = type(opt).step

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        owner = opt_ref()
        owner._opt_called = True  # type: ignore[union-attr]
        return func.__get__(owner, type(owner))(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    opt.step = wrapper  # type: ignore[method-assign]


def twin_lr_scheduler(scheduler: Any, convert: Any = meta_tensor, *,
                      isolation: Isolation | None = None, name: str = "scheduler") -> Any:
    """A copy of an LR scheduler whose ``optimizer`` is the twin of its optimizer (made with the
    same ``isolation`` if it was twinned already, else here): stepping it changes the twin's
    learning rates only."""
    opt = getattr(scheduler, "optimizer", None)
    if not isinstance(opt, torch.optim.Optimizer):
        raise IsolationError(f"{name} ({type(scheduler).__name__}) has no optimizer: not an LR "
                             "scheduler")
    iso = isolation if isolation is not None else Isolation(convert, _label(convert))
    if id(opt) not in iso.memo:
        twin_optimizer(opt, isolation=iso, name=f"{name}.optimizer")
    new = iso.copy(scheduler, name)
    if not hasattr(getattr(new.optimizer, "step", None), "_wrapped_by_lr_sched"):
        _track_step_called(new.optimizer)
    return new


def twin_grad_scaler(scaler: Any, convert: Any = meta_tensor, *,
                     isolation: Isolation | None = None, name: str = "scaler") -> Any:
    """A copy of a ``torch.amp.GradScaler`` (also mid-iteration, which pickling refuses): its
    scale and growth tracker converted, its per-optimizer states keyed by the twin optimizers
    (twin those first with the same ``isolation``)."""
    if not hasattr(scaler, "_per_optimizer_states") or not hasattr(scaler, "get_scale"):
        raise IsolationError(f"{name} is {type(scaler).__name__}, not a GradScaler")
    iso = isolation if isolation is not None else Isolation(convert, _label(convert))
    state = dict(vars(scaler))
    per_opt = state.pop("_per_optimizer_states", {})
    for value in state.values():
        if isinstance(value, torch.Tensor):
            iso.tensor(value)
    new = object.__new__(type(scaler))
    iso.set_twin(scaler, new)
    iso.scan(state, name)
    iso.flush()
    new.__dict__.update(copy.deepcopy(state, iso.memo))
    remapped = type(per_opt)(per_opt.default_factory) if hasattr(per_opt, "default_factory") \
        else {}
    for key, value in per_opt.items():
        twin_opt = next((iso.memo[k] for k in (key,) if k in iso.memo), None)
        new_key = id(twin_opt) if twin_opt is not None else key
        iso.scan(value, f"{name}._per_optimizer_states")
        iso.flush()
        remapped[new_key] = copy.deepcopy(value, iso.memo)
    new._per_optimizer_states = remapped
    return new


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

    return twin(model, isolation=Isolation(convert, f"{device} copy"))


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


def fake_like(t: torch.Tensor, mode: Any, device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fake tensor of ``mode`` with ``t``'s shape and strides on ``device`` (``dtype`` for
    floating tensors when given); Parameters stay Parameters. Works from real, meta and fake
    tensors; ``t`` is not touched."""
    dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
    with mode:
        out = torch.empty_strided(tuple(t.size()), tuple(t.stride()), dtype=dt, device=device)
    if isinstance(t, nn.Parameter):
        return nn.Parameter(out, requires_grad=t.requires_grad)
    if t.requires_grad and out.is_floating_point():
        out.requires_grad_(True)
    return out


def fake_model(model: nn.Module, mode: Any, device: torch.device,
               dtype: torch.dtype | None = None) -> nn.Module:
    """A twin of ``model`` whose parameters, buffers and plain tensor attributes are fake tensors
    (``fake_like``; tying kept), isolated like every twin (:mod:`torchmagic.core.isolation`): the
    user's hooks and forwards run with copies of what they write (a hook appending to a list of
    the notebook appends to a copy). Raises :class:`TorchMagicError` for modules that cannot be
    copied (uninitialized lazy modules, quantized tensors, a generator or an open file)."""
    from torch.nn.parameter import UninitializedParameter

    tensors = [*model.parameters(), *model.buffers()]
    for sub in model.modules():
        tensors.extend(v for v in vars(sub).values() if isinstance(v, torch.Tensor))
    for t in tensors:
        if isinstance(t, UninitializedParameter):
            raise TorchMagicError("the model has uninitialized lazy modules (nn.LazyLinear ...): "
                                  "their shapes are known only after one forward; run one "
                                  "forward on real inputs first")
        if t.is_quantized:
            raise TorchMagicError("the model holds quantized tensors (torch.quantize_per_tensor "
                                  "/ quantize_dynamic), which fake tensors do not support")
    iso = Isolation(lambda t: fake_like(t, mode, device, dtype), "fake")
    try:
        return twin(model, isolation=iso)
    except TorchMagicError:
        raise
    except Exception as exc:  # noqa: BLE001 - a __deepcopy__ of the user's that raises ...
        raise TorchMagicError(f"cannot copy the model to fake tensors ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:160]})") from None


def fake_inputs(obj: Any, mode: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Fake copies of every tensor in a nested structure (floating ones cast to ``dtype``); a
    tensor given twice (``input_ids`` and ``labels``) stays one tensor."""
    from torch.utils._pytree import tree_map

    memo: dict[int, torch.Tensor] = {}

    def convert(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in memo:
            memo[id(t)] = fake_like(t, mode, device, dtype)
        return memo[id(t)]

    return tree_map(convert, obj)


def fake_twin(model: nn.Module, mode: Any) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake tensors of ``mode`` (tying kept):
    run it inside ``with mode:`` without ``allow_non_fake_inputs``."""
    return twin(model, isolation=Isolation(lambda t: fake_tensor(t, mode), "fake"))


__all__ = ["Isolation", "IsolationError", "device_twin", "fake_inputs", "fake_like", "fake_model",
           "fake_tensor", "fake_twin",
           "is_meta_model", "meta_tensor", "meta_twin", "model_devices", "shared_tensor",
           "shared_twin", "tensor_memo", "twin", "twin_grad_scaler", "twin_lr_scheduler",
           "twin_optimizer", "uninitialized_like"]
