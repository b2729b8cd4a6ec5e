"""All-or-nothing checkpoint loads: validate everything the copy will meet, then copy; if the copy
still fails, put the model and the optimizer back as they were.

Checked before anything is touched (:func:`check_tensors`, :func:`check_optimizer`): every tensor
of the state dict can be copied into the model's (no meta or fake tensors, which hold no values; no
sparse, quantized, nested or opaque tensor where the model holds a plain one); the optimizer state is
loaded into a twin of the optimizer (meta twins of its parameters, :mod:`torchmagic.core.twin`), so
torch's own checks run (an SGD state refused by Adam's, a ``state`` that is a list); then the twin's
groups must have every key the optimizer's have (``lr``, ``betas``...), and each parameter's state
the keys this optimizer class keeps (learnt from a one-element run of the same class) with the
shapes of the parameters it belongs to (state saved for another model is refused even when it has as
many tensors).

:class:`Backup` keeps what the load may change: each module's parameter and buffer objects, the
values of the tensors a copying load writes (CPU copies, within a memory budget) and the optimizer's
state and groups; ``restore()`` puts them back bitwise. The value copy is bounded
(``BACKUP_BYTES``, 2 GiB): a bigger model is loaded after the same checks without it.
"""

from __future__ import annotations

import contextlib
import signal
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core import access
from torchmagic.core.errors import TorchMagicError


# -- tensors ----------------------------------------------------------------------------------------
def check_tensors(own: Mapping[str, Any], state: Mapping[str, Any], assign: bool,
                  path: str, name: str) -> None:
    """Refuse checkpoint tensors the load could not copy (or should not assign)."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        mine = own.get(key)
        kind = access.kind(value)
        if kind in ("meta", "fake", "uninitialized", "opaque"):
            what = {"meta": "a meta tensor", "fake": "a fake tensor",
                    "uninitialized": "an uninitialized parameter",
                    "opaque": f"an opaque {type(value).__name__}"}[kind]
            raise TorchMagicError(f"{path}: {key} is {what}, which holds no values to load; "
                                  f"nothing was loaded and {name} is unchanged")
        if not isinstance(mine, torch.Tensor):
            continue
        mine_kind = access.kind(mine)
        plain = kind in ("dense", "functional")
        mine_plain = mine_kind in ("dense", "functional", "meta")
        if plain != mine_plain or (not plain and kind != mine_kind):
            raise TorchMagicError(
                f"{path}: {key} is {access.describe(value)} but {name}.{key} is "
                f"{access.describe(mine)}: load_state_dict cannot copy one into the other; "
                f"nothing was loaded and {name} is unchanged (convert it when saving: "
                ".to_dense(), .dequantize())")


# -- the optimizer ----------------------------------------------------------------------------------
_REFERENCE: dict[Any, tuple[set[str], set[str]] | None] = {}


def _reference_state(optimizer: torch.optim.Optimizer) -> tuple[set[str], set[str]] | None:
    """(state keys, keys shaped like the parameter) that this optimizer class keeps per parameter,
    from one step of the same class with the same defaults on a (2, 3) parameter; None when that
    cannot be run (a custom optimizer with required arguments)."""
    cls = type(optimizer)
    defaults = {k: v for k, v in optimizer.defaults.items()
                if k not in ("fused", "foreach", "capturable", "differentiable")}
    key = (cls, tuple(sorted((k, repr(v)) for k, v in defaults.items())))
    if key in _REFERENCE:
        return _REFERENCE[key]
    found: tuple[set[str], set[str]] | None = None
    try:
        p = nn.Parameter(torch.zeros(2, 3))
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            ref = cls([p], **defaults)
            p.grad = torch.ones(2, 3)
            ref.step() if not isinstance(ref, torch.optim.LBFGS) else None
        st = ref.state.get(p, {})
        if st:
            found = (set(st), {k for k, v in st.items()
                               if isinstance(v, torch.Tensor) and tuple(v.shape) == (2, 3)})
    except Exception:  # noqa: BLE001 - no reference: only torch's own checks apply
        found = None
    _REFERENCE[key] = found
    return found


def _structure(optimizer: torch.optim.Optimizer, state: Any, name: str) -> None:
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, list) or "state" not in state:
        keys = ", ".join(map(str, state))[:80] if isinstance(state, Mapping) else \
            type(state).__name__
        raise TorchMagicError(f"the checkpoint's optimizer entry is not an optimizer state dict "
                              f"({keys}); nothing was loaded")
    if not isinstance(state["state"], Mapping):
        raise TorchMagicError(f"the checkpoint's optimizer state is {type(state['state']).__name__}"
                              ", not a dict of per-parameter state; nothing was loaded")
    mine = optimizer.param_groups
    if len(groups) != len(mine):
        raise TorchMagicError(f"{name} has {len(mine)} parameter groups, the checkpoint's optimizer "
                              f"has {len(groups)}; nothing was loaded")
    for i, (a, b) in enumerate(zip(groups, mine)):
        if not isinstance(a, Mapping):
            raise TorchMagicError(f"the checkpoint's optimizer group {i} is "
                                  f"{type(a).__name__}, not a dict; nothing was loaded")
        if len(a.get("params", [])) != len(b["params"]):
            raise TorchMagicError(f"{name} group {i} has {len(b['params'])} parameters, the "
                                  f"checkpoint's has {len(a.get('params', []))}; nothing was loaded")


def check_optimizer(optimizer: torch.optim.Optimizer, state: Any, name: str) -> None:
    """Refuse optimizer state that ``optimizer.load_state_dict`` would reject half-way or that the
    next ``optimizer.step()`` would fail on (see the module docstring). Touches nothing."""
    from torchmagic.core.isolation import Isolation
    from torchmagic.core.twin import meta_tensor, twin_optimizer

    _structure(optimizer, state, name)
    twin = twin_optimizer(optimizer, isolation=Isolation(meta_tensor, "meta"), name=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - torch's own refusal, on the twin
        why = " ".join(str(exc).split())[:160]
        raise TorchMagicError(f"{name} ({type(optimizer).__name__}) cannot take the checkpoint's "
                              f"optimizer state ({type(exc).__name__}: {why}): saved by another "
                              "optimizer class? nothing was loaded") from None
    for i, (mine, loaded) in enumerate(zip(optimizer.param_groups, twin.param_groups)):
        missing = sorted(k for k in mine if k not in loaded)
        if missing:
            raise TorchMagicError(f"the checkpoint's optimizer group {i} lacks "
                                  f"{', '.join(missing)}, which {name} ({type(optimizer).__name__})"
                                  " needs to step; nothing was loaded")
    ref = _reference_state(optimizer)
    index = {id(p): i for i, p in enumerate(p for g in twin.param_groups for p in g["params"])}
    for p, st in twin.state.items():
        if not isinstance(st, Mapping) or not st:
            continue
        i = index.get(id(p), "?")
        if ref is not None:
            missing = sorted(ref[0] - set(st))
            if missing:
                raise TorchMagicError(
                    f"the checkpoint's optimizer state of parameter {i} lacks "
                    f"{', '.join(missing)} (it holds {', '.join(map(str, st))}): saved by another "
                    f"optimizer than {type(optimizer).__name__}? nothing was loaded")
        shaped = ref[1] if ref is not None else set()
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k in shaped and tuple(v.shape) != tuple(p.shape):
                raise TorchMagicError(
                    f"the checkpoint's optimizer state {k!r} of parameter {i} has shape "
                    f"{tuple(v.shape)}, but that parameter of {name} has shape {tuple(p.shape)}: "
                    "state saved for another model; nothing was loaded")


# -- backup -----------------------------------------------------------------------------------------
class Backup:
    """What a load may change, to put back if it fails half-way (see the module docstring)."""

    def __init__(self, model: nn.Module, keys: set[str], optimizer: torch.optim.Optimizer | None,
                 copy_values: bool, budget: int | None = None) -> None:
        self.slots = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
        self.values: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.complete = True
        if copy_values:
            own = model.state_dict(keep_vars=True)
            tensors = {id(t): t for k, t in own.items() if k in keys and isinstance(t, torch.Tensor)}
            total = sum(access.nbytes(t) for t in tensors.values())
            limit = _budget() if budget is None else budget
            if total <= limit:
                with torch.no_grad():
                    for t in tensors.values():
                        if access.kind(t) == "dense":
                            self.values.append((t, t.detach().to("cpu", copy=True)))
            else:
                self.complete = False
        self.opt = optimizer
        if optimizer is not None:
            self.opt_state = dict(optimizer.state)
            self.opt_groups = [dict(g) for g in optimizer.param_groups]

    def restore(self) -> None:
        for m, params, buffers in self.slots:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
        with torch.no_grad():
            for t, saved in self.values:
                t.copy_(saved)
        if self.opt is not None:
            self.opt.state.clear()
            self.opt.state.update(self.opt_state)
            for g, saved_group in zip(self.opt.param_groups, self.opt_groups):
                g.clear()
                g.update(saved_group)


#: The most bytes of tensor values a load backs up (on the CPU) to undo a half-way failure; a
#: bigger model is loaded without that copy (after the same checks), and a failure says so.
BACKUP_BYTES = 2 << 30


def _budget() -> int:
    """Bytes of CPU memory a backup may take: BACKUP_BYTES, at most half of what is available."""
    try:
        import psutil

        return min(BACKUP_BYTES, int(psutil.virtual_memory().available // 2))
    except Exception:  # noqa: BLE001
        return 1 << 30


# -- applying ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _hold_sigint() -> Iterator[list[bool]]:
    """Hold back Ctrl-C for the block (main thread only); raise it when the block has finished."""
    pending = [False]
    try:
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, lambda *_: pending.__setitem__(0, True))
    except (ValueError, OSError, TypeError):  # not the main thread: nothing to hold
        yield pending
        return
    try:
        yield pending
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending[0]:
        raise KeyboardInterrupt("checkpoint: the load completed before Ctrl-C was honoured")


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one object (tied weights), in groups."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return [names for names in by_id.values() if len(names) > 1]


def _retie(model: nn.Module, groups: list[list[str]]) -> tuple[list[str], list[str]]:
    """After ``assign=True`` split tied parameters, make them one object again where the loaded
    tensors hold the same values. Returns (re-tied names, names left split)."""
    tied, split = [], []
    for names in groups:
        first = model.get_parameter(names[0])
        for n in names[1:]:
            other = model.get_parameter(n)
            if other is first:
                continue
            same = (other.shape == first.shape and other.dtype == first.dtype
                    and other.device == first.device
                    and (other.data_ptr() == first.data_ptr() or bool(torch.equal(other, first))))
            if same:
                owner, _, leaf = n.rpartition(".")
                setattr(model.get_submodule(owner), leaf, first)
                tied.append(f"{n} = {names[0]}")
            else:
                split.append(n)
    return tied, split


hold_sigint, tied_groups, retie = _hold_sigint, _tied_groups, _retie

__all__ = ["Backup", "check_optimizer", "check_tensors", "hold_sigint", "retie", "tied_groups"]
