"""Freeze and unfreeze parts of a model: ``requires_grad`` only, and an exact account of it.

``freeze(model, ["encoder", "embed"], exclude=["encoder.norm"])`` sets ``requires_grad=False`` on
every parameter of the named submodules (or named parameters) except the excluded ones, and
returns what changed: N parameters in M modules, trainable elements before and after. Nothing else
is touched: no ``.train()``/``.eval()``, no ``.grad`` change, no hook. The change is all or nothing:
if anything interrupts it (even KeyboardInterrupt), the flags already set are put back.

The report warns about BatchNorm layers in the frozen part (their running statistics still update
in train mode) and, given a namespace, about optimizers there that still hold frozen parameters (or
miss unfrozen ones), showing the ``filter(lambda p: p.requires_grad, ...)`` pattern.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core._result import Result
from torchmagic.core.errors import TorchMagicError, a_type
from torchmagic.core.weights import is_uninitialized, numel_of

_MAX_NAMES = 12


@dataclass
class OptimizerNote:
    """An optimizer in the namespace affected by the change."""

    name: str
    type_name: str
    count: int  # frozen params it still holds (freeze) / unfrozen params it lacks (unfreeze)


@dataclass
class FreezeReport(Result):
    """What ``%freeze`` / ``%unfreeze`` changed (elements are parameter element counts)."""

    _display_module = "torchmagic.display.freeze"

    action: str  # "freeze" or "unfreeze"
    model: str
    targets: list[str]
    excepted: list[str]
    changed_params: int
    changed_elements: int
    changed_modules: list[str]
    already: int  # parameters in scope that were already frozen / trainable
    skipped_non_float: int  # unfreeze: integer parameters cannot require grad
    total_params: int
    total_elements: int
    trainable_params_before: int
    trainable_params_after: int
    trainable_before: int
    trainable_after: int
    batchnorm: list[str] = field(default_factory=list)
    batchnorm_training: int = 0
    optimizers: list[OptimizerNote] = field(default_factory=list)
    stale_grads: int = 0
    # Tied weights (one tensor under several names, e.g. lm_head.weight = wte.weight): the names of
    # each changed one, and of each one left alone because one of its names is under --except.
    tied_changed: list[list[str]] = field(default_factory=list)
    tied_kept: list[list[str]] = field(default_factory=list)
    # Changed parameters of lazy modules (no size yet: counted as 0 elements above); the flag
    # is kept when their first forward materializes them.
    uninitialized: int = 0


def _path_segments(path: str) -> list[str]:
    """``"blocks[0].attn"`` -> ``["blocks", "0", "attn"]``."""
    path = re.sub(r"\[\s*['\"]?([^\]'\"]+?)['\"]?\s*\]", r".\1", path.strip())
    return [s for s in path.split(".") if s]


def _valid_names(m: nn.Module) -> str:
    children = [n for n, _ in m.named_children()]
    params = [n for n, _ in m.named_parameters(recurse=False)]
    digits = [int(c) for c in children if c.isdigit()]
    names = [c for c in children if not c.isdigit()]
    if len(digits) > 3 and sorted(digits) == list(range(len(digits))):
        names.insert(0, f"0..{len(digits) - 1}")
    else:
        names = children
    names += [f"{p} (parameter)" for p in params]
    if not names:
        return f"it has no submodules or parameters of its own ({type(m).__name__})"
    shown = ", ".join(names[:_MAX_NAMES])
    more = f", ... ({len(names) - _MAX_NAMES} more)" if len(names) > _MAX_NAMES else ""
    return f"valid: {shown}{more}"


def resolve(model: nn.Module, path: str, name: str = "model") -> nn.Module | nn.Parameter:
    """The submodule or parameter at ``path`` (``""`` is the model itself); a bad path raises
    :class:`TorchMagicError` naming the valid children at the point where it went wrong."""
    obj: Any = model
    walked = name
    for seg in _path_segments(path):
        if not isinstance(obj, nn.Module):
            raise TorchMagicError(f"{walked} is a parameter; it has no {seg!r}")
        child = obj._modules.get(seg)
        if child is None:
            child = obj._parameters.get(seg)
        if child is None:
            raise TorchMagicError(f"{walked} ({type(obj).__name__}) has no submodule or "
                                  f"parameter {seg!r}; {_valid_names(obj)}")
        obj = child
        walked = f"{walked}.{seg}"
    return obj


def resolve_root(namespace: Mapping[str, Any], token: str) -> tuple[str, nn.Module, str]:
    """Split ``"model.encoder.layer[0]"`` into (root expression, root module, relative path).

    The root is the shortest prefix that is an ``nn.Module`` (``model``, or ``trainer.model``).
    """
    segs = _path_segments(token)
    if not segs or not segs[0].isidentifier():
        raise TorchMagicError(f"{token!r} is not a model path (write e.g. model.encoder)")
    if segs[0] not in namespace:
        raise TorchMagicError(f"name {segs[0]!r} is not defined (expected a model, e.g. "
                              "model or model.encoder)")
    obj = namespace[segs[0]]
    i = 1
    while not isinstance(obj, nn.Module) and i < len(segs):
        try:
            obj = getattr(obj, segs[i])
        except AttributeError:
            break
        i += 1
    if not isinstance(obj, nn.Module):
        raise TorchMagicError(f"{'.'.join(segs[:i])} is {a_type(obj)}, not an "
                              "nn.Module")
    return ".".join(segs[:i]), obj, ".".join(segs[i:])


def _scope(model: nn.Module, path: str, name: str) -> tuple[list[nn.Parameter], list[nn.Module]]:
    obj = resolve(model, path, name)
    if isinstance(obj, nn.Module):
        return list(obj.parameters()), list(obj.modules())
    return [obj], []


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """Every module holding each parameter (several for tied weights), in model order."""
    out: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owner = pname.rpartition(".")[0] or "(root)"
        names = out.setdefault(id(p), [])
        if owner not in names:
            names.append(owner)
    return out


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(pname)
    return out


def set_requires_grad(model: nn.Module, paths: str | Sequence[str] = ("",),
                      requires_grad: bool = False, *, exclude: str | Sequence[str] = (),
                      name: str = "model",
                      namespace: Mapping[str, Any] | None = None) -> FreezeReport:
    """Set ``requires_grad`` on the parameters under ``paths`` (relative to ``model``; ``""`` is
    all of it) except those under ``exclude``; return the exact account. See :func:`freeze`."""
    if not isinstance(model, nn.Module):
        raise TorchMagicError(f"{name} is {a_type(model)}, not an nn.Module")
    paths = [paths] if isinstance(paths, str) else list(paths) or [""]  # "encoder" is one path
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    in_scope: dict[int, nn.Parameter] = {}
    scope_modules: dict[int, nn.Module] = {}
    for path in paths:
        params, mods = _scope(model, path, name)
        for p in params:
            in_scope.setdefault(id(p), p)
        for m in mods:
            scope_modules.setdefault(id(m), m)
    requested = dict(in_scope)
    for path in exclude:
        params, mods = _scope(model, path, name)
        for p in params:
            in_scope.pop(id(p), None)
        for m in mods:
            scope_modules.pop(id(m), None)
    all_params = list(model.parameters())
    owners = _owners(model)
    skipped = 0
    targets: list[nn.Parameter] = []
    already = 0
    for p in all_params:  # model order, duplicates (tied weights) once
        if id(p) not in in_scope:
            continue
        if p.requires_grad == requires_grad:
            already += 1
        elif requires_grad and not (p.dtype.is_floating_point or p.dtype.is_complex):
            skipped += 1
        else:
            targets.append(p)
    # scope params that live outside model.parameters() cannot exist (all come from model)
    before_t = sum(1 for p in all_params if p.requires_grad)
    before = sum(numel_of(p) for p in all_params if p.requires_grad)
    done: list[nn.Parameter] = []
    def set_flag(p: nn.Parameter, flag: bool) -> None:
        if is_uninitialized(p):  # a lazy parameter refuses requires_grad_(); the attribute works
            p.requires_grad = flag
        else:
            p.requires_grad_(flag)

    try:
        for p in targets:
            set_flag(p, requires_grad)
            done.append(p)
    except BaseException:
        for p in done:  # all or nothing, even on KeyboardInterrupt
            set_flag(p, not requires_grad)
        raise
    mods: list[str] = []
    for p in targets:
        for owner in owners.get(id(p), ["?"]):
            if owner not in mods:
                mods.append(owner)
    aliases = _aliases(model)
    tied_changed = [aliases[id(p)] for p in targets if len(aliases.get(id(p), ())) > 1]
    tied_kept = [aliases[i] for i in requested if i not in in_scope and len(aliases.get(i, ())) > 1]
    label = [f"{name}.{p}" if p else name for p in paths]
    report = FreezeReport(
        action="unfreeze" if requires_grad else "freeze", model=name, targets=label,
        excepted=[f"{name}.{p}" if p else name for p in exclude],
        changed_params=len(targets), changed_elements=sum(numel_of(p) for p in targets),
        changed_modules=mods, already=already, skipped_non_float=skipped,
        total_params=len(all_params), total_elements=sum(numel_of(p) for p in all_params),
        trainable_params_before=before_t,
        trainable_params_after=sum(1 for p in all_params if p.requires_grad),
        trainable_before=before,
        trainable_after=sum(numel_of(p) for p in all_params if p.requires_grad),
        tied_changed=tied_changed, tied_kept=tied_kept,
        uninitialized=sum(1 for p in targets if is_uninitialized(p)),
    )
    if not requires_grad:
        names = {id(m): n for n, m in model.named_modules()}
        bn = [m for m in scope_modules.values()
              if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
              and m.running_mean is not None]
        report.batchnorm = [names.get(id(m)) or "(root)" for m in bn]
        report.batchnorm_training = sum(1 for m in bn if m.training)
        frozen = [p for p in in_scope.values() if not p.requires_grad]
        report.stale_grads = sum(1 for p in frozen if p.grad is not None)
    if namespace is not None:
        report.optimizers = _optimizer_notes(namespace, model, targets, requires_grad)
    return report


def _optimizer_notes(namespace: Mapping[str, Any], model: nn.Module,
                     changed: list[nn.Parameter], requires_grad: bool) -> list[OptimizerNote]:
    model_ids = {id(p) for p in model.parameters()}
    changed_ids = {id(p) for p in changed}
    notes = []
    for oname, obj in list(namespace.items()):
        if oname.startswith("_") or not isinstance(obj, torch.optim.Optimizer):
            continue
        held = {id(p) for g in obj.param_groups for p in g["params"]}
        if not requires_grad:
            n = len(held & changed_ids)
        else:  # only optimizers of this model: they should now hold the unfrozen params
            n = len(changed_ids - held) if held & model_ids else 0
        if n:
            notes.append(OptimizerNote(oname, type(obj).__name__, n))
    return notes


def freeze(model: nn.Module, paths: str | Sequence[str] = ("",), *,
           exclude: str | Sequence[str] = (),
           name: str = "model", namespace: Mapping[str, Any] | None = None) -> FreezeReport:
    """``requires_grad=False`` on the parameters under ``paths`` (submodule or parameter paths
    relative to ``model``, e.g. ``"encoder"``, ``"blocks.0"``, ``"blocks[0].attn"``; one path or a
    list; default: the whole model) except those under ``exclude``. Raises
    :class:`TorchMagicError` for a path that names nothing in the model. Pass ``namespace=globals()`` to be warned about
    optimizers that still hold the frozen parameters."""
    return set_requires_grad(model, paths, False, exclude=exclude, name=name, namespace=namespace)


def unfreeze(model: nn.Module, paths: str | Sequence[str] = ("",), *,
             exclude: str | Sequence[str] = (),
             name: str = "model", namespace: Mapping[str, Any] | None = None) -> FreezeReport:
    """``requires_grad=True`` on the (floating point) parameters under ``paths`` except those under
    ``exclude``; the counterpart of :func:`freeze`."""
    return set_requires_grad(model, paths, True, exclude=exclude, name=name, namespace=namespace)
