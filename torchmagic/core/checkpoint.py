"""Save and load checkpoints safely: atomic writes, ``weights_only`` loads, a readable key diff.

:func:`save_checkpoint` writes ``model.state_dict()`` (a bare state dict, loadable with
``model.load_state_dict(torch.load(path))``) or, with an optimizer or extras, a dict
``{"model": ..., "optimizer": ..., "epoch": ...}``. The file is written atomically: a temporary file
in the same directory, ``fsync``, then ``os.replace``; an interrupted save (exception or Ctrl-C) leaves
the previous file intact and no temporary file behind.

:func:`load_checkpoint` reads with ``weights_only=True`` unless asked otherwise (a pickle that would
call code is refused with a one-line message naming what it would call), finds the state dict in the
file (bare, or under ``model``/``state_dict``/... keys), compares it to the model (missing,
unexpected and shape-mismatched keys; a ``module.``/``_orig_mod.`` prefix is detected and the fix
offered), validates everything the copy will meet (:mod:`torchmagic.core.checkpoint_check`: tensor
layouts, a trial load on a meta twin of the model and on a twin of the optimizer, the optimizer
state's keys and shapes against the parameters it belongs to), and only then loads for real, with
Ctrl-C held back until the copy is complete. A load is all or nothing: a refused load touches
nothing, and a copy that still fails half-way is undone (model and optimizer put back bitwise). The
report says which device the model is on afterwards (``map_location`` moves the loaded tensors, not
the model). Files are described before they are read (:mod:`torchmagic.core.checkpoint_io`): a
FIFO or a device node is refused unopened, and a corrupt file is called corrupt, not dangerous.
"""

from __future__ import annotations

import io
import os
import pickle
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core import access
from torchmagic.core._result import Result
from torchmagic.core.checkpoint_check import (
    Backup,
    check_optimizer,
    check_tensors,
    hold_sigint,
    retie,
    tied_groups,
)
from torchmagic.core.checkpoint_io import (
    KNOWN_PREFIXES,  # noqa: F401 - re-exported
    OPTIMIZER_KEYS,  # noqa: F401 - re-exported
    STATE_DICT_KEYS,  # noqa: F401 - re-exported
    atomic_torch_save,
    check_save_target,
    check_source,
    prefix_fix,
    read_checkpoint,
    split_checkpoint,
)
from torchmagic.core.errors import TorchMagicError, a_type


# -- results -------------------------------------------------------------------------------------
@dataclass
class SaveReport(Result):
    """What :func:`save_checkpoint` wrote."""

    _display_module = "torchmagic.display.checkpoint"

    path: str
    model: str
    model_class: str
    file_bytes: int
    tensors: int              # tensor entries written (state dict, optimizer state, extras)
    storages: int             # distinct storages (tied weights are written once)
    tensor_bytes: int         # bytes of those storages
    keys: list[str]           # top-level keys of the file ([] for a bare state dict)
    optimizer: str | None     # optimizer class saved, if any
    extras: dict[str, Any]
    replaced: bool            # an existing file was replaced
    seconds: float
    devices: dict[str, int] = field(default_factory=dict)  # device -> tensor count in the file
    notes: list[str] = field(default_factory=list)


@dataclass
class KeyMismatch:
    """A key whose tensor shape differs between checkpoint and model."""

    key: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclass
class LoadReport(Result):
    """What :func:`load_checkpoint` did (``status`` is ``"loaded"`` or ``"refused"``)."""

    _display_module = "torchmagic.display.checkpoint"

    path: str
    model: str
    model_class: str
    status: str
    file_bytes: int
    file_format: str                     # "state dict" or "dict: model, optimizer, epoch"
    state_dict_key: str | None           # where the state dict was found (None: bare)
    loaded: int                          # keys loaded into the model
    checkpoint_keys: int
    model_keys: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[KeyMismatch] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # not loaded (non-strict: shape mismatch)
    prefix_fix: str | None = None        # "--strip-prefix module." when that would fix the keys
    prefix_fix_effect: str | None = None  # "makes every key match" / "leaves 2 keys unmatched"
    strict: bool = True
    weights_only: bool = True
    mmap: bool = False
    assign: bool = False
    map_location: str | None = None
    checkpoint_devices: dict[str, int] = field(default_factory=dict)
    model_devices: dict[str, int] = field(default_factory=dict)
    dtype_casts: dict[str, int] = field(default_factory=dict)
    optimizer: str | None = None         # optimizer class whose state was loaded
    optimizer_in_file: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)

    def summary(self) -> str:
        """``2 missing, 1 unexpected, 1 shape mismatch`` (or ``keys match``)."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected")
        if self.mismatched:
            n = len(self.mismatched)
            parts.append(f"{n} shape mismatch{'es' if n > 1 else ''}")
        return ", ".join(parts) or "keys match"


class CheckpointMismatch(TorchMagicError):
    """A strict load refused because the keys or shapes differ; ``report`` holds the diff."""

    def __init__(self, message: str, report: LoadReport) -> None:
        super().__init__(message)
        self.report = report


# -- helpers -------------------------------------------------------------------------------------
def _tensors_in(obj: Any, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _tensors_in(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors_in(v, out)
    return out


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    sp = access.span(t)
    return (sp.device, sp.storage_lo) if sp is not None and sp.kind == "ptr" else (id(t),)


def _storage_nbytes(t: torch.Tensor) -> int:
    return access.storage_nbytes(t)


def _device_counts(tensors: list[torch.Tensor]) -> dict[str, int]:
    return dict(Counter(str(t.device) for t in tensors))


def _weights_only_safe(value: Any) -> bool:
    """True if ``torch.load(weights_only=True)`` can read ``value`` back."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.Tensor,
                                           torch.dtype, torch.device, torch.Size)):
        return True
    if isinstance(value, (list, tuple, set)):
        return all(_weights_only_safe(v) for v in value)
    if isinstance(value, dict):
        return all(_weights_only_safe(k) and _weights_only_safe(v) for k, v in value.items())
    return False


def _short(value: Any, limit: int = 40) -> str:
    """A short text for an extra; a ``__repr__`` that raises gives ``<TypeName>``."""
    if isinstance(value, torch.Tensor):
        return f"tensor{access.shape(value)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, Mapping):
        try:
            return f"dict ({len(value)} keys)"
        except Exception:  # noqa: BLE001 - a user mapping with a broken __len__
            return "<dict>"
    try:
        text = " ".join(repr(value).split())
    except Exception:  # noqa: BLE001 - the user's __repr__ raised
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- save ----------------------------------------------------------------------------------------
def _optimizer_state(optimizer: Any) -> dict[str, Any]:
    """``optimizer.state_dict()``, or a one-line error when torch cannot write it (state kept
    for a parameter no longer in any group: ``KeyError`` from torch)."""
    try:
        return optimizer.state_dict()
    except KeyError:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        stray = sum(1 for p in optimizer.state if id(p) not in held)
        raise TorchMagicError(
            f"the optimizer's state_dict() fails: it keeps state for {stray} parameter(s) that "
            "are in none of its param_groups (removed from a group, their state left behind): "
            "delete those entries of its .state (as %freeze's advice does); nothing was "
            "written") from None


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str], *,
                    optimizer: torch.optim.Optimizer | None = None,
                    extras: Mapping[str, Any] | None = None, name: str = "model",
                    optimizer_name: str = "optimizer") -> SaveReport:
    """Write ``model``'s state dict (with ``optimizer`` state and ``extras`` when given) atomically.

    Without optimizer and extras the file is the bare state dict; otherwise a dict with keys
    ``model``, ``optimizer`` and each extra. Raises :class:`TorchMagicError` for a meta model (it has
    no values to save), a missing directory, or an extra named ``model``/``optimizer``.
    """
    if not isinstance(model, nn.Module):
        raise TorchMagicError(f"{name} is {a_type(model)}, not an nn.Module")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TorchMagicError(f"--optimizer {optimizer_name} is {a_type(optimizer)}, "
                              "not a torch.optim.Optimizer")
    extras = dict(extras or {})
    for key in extras:
        if key in ("model", "optimizer"):
            raise TorchMagicError(f"--extra {key}=... clashes with the checkpoint's own "
                                  f"{key!r} entry; pick another name")
    path = check_save_target(os.fspath(path))
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise TorchMagicError(f"{name} has {len(meta)} tensors on the meta device ({meta[0]}, ...):"
                              " they hold no values, so there is nothing to save (load or "
                              "materialize the weights first)")
    state = model.state_dict()
    for key, t in state.items():
        if isinstance(t, torch.Tensor) and access.kind(t) in ("mkldnn", "opaque", "fake",
                                                              "uninitialized"):
            raise TorchMagicError(f"{name}.{key} is {access.describe(t)}, which torch.save cannot "
                                  "write; convert it first (e.g. .to_dense()); nothing was "
                                  "written")
    for key, value in extras.items():
        if not _weights_only_safe(value):
            try:
                pickle.dumps(value)
            except Exception as exc:  # noqa: BLE001 - said in one line, before any write
                why = " ".join(str(exc).split())[:100]
                raise TorchMagicError(f"--extra {key} is {a_type(value)}, which pickle cannot "
                                      f"write ({type(exc).__name__}: {why}); store plain data "
                                      "instead; nothing was written") from None
    notes: list[str] = []
    if optimizer is None and not extras:
        obj: Any = state
        keys: list[str] = []
    else:
        obj = {"model": state}
        if optimizer is not None:
            obj["optimizer"] = _optimizer_state(optimizer)
        obj.update(extras)
        keys = list(obj)
    for key, value in extras.items():
        if not _weights_only_safe(value):
            notes.append(f"extra {key!r} is {a_type(value)}: torch.load(weights_only=True)"
                         " will refuse it, so loading this file will need --unsafe (store plain "
                         "numbers, strings, lists, dicts or tensors instead)")
    tensors = _tensors_in(obj)
    storages: dict[tuple[Any, ...], int] = {}
    views = []
    for t in tensors:
        storages.setdefault(_storage_key(t), _storage_nbytes(t))
    for k, t in state.items():
        if isinstance(t, torch.Tensor) and _storage_nbytes(t) > 2 * t.numel() * t.element_size() \
                and _storage_nbytes(t) > 1 << 16:
            views.append(k)
    if views:
        notes.append(f"{len(views)} tensors ({views[0]}, ...) are views of larger storages: "
                     "torch.save writes the whole storage; .clone() them to save less")
    devices = _device_counts(tensors)
    if any(d.startswith("cuda") for d in devices):
        notes.append("tensors are saved with their CUDA device: on a machine without CUDA load "
                     "with --map-location cpu")
    replaced = os.path.exists(path)
    start = time.perf_counter()
    try:
        atomic_torch_save(obj, path)
    except OSError as exc:
        raise TorchMagicError(f"could not write {path}: {exc.strerror or exc}; the previous file "
                              "is unchanged") from None
    except Exception as exc:  # noqa: BLE001 - torch's writer: disk full, an unpicklable object
        raise _save_error(obj, path, exc) from None
    seconds = time.perf_counter() - start
    return SaveReport(
        path=path, model=name, model_class=type(model).__name__,
        file_bytes=os.path.getsize(path), tensors=len(tensors), storages=len(storages),
        tensor_bytes=sum(storages.values()), keys=keys,
        optimizer=type(optimizer).__name__ if optimizer is not None else None,
        extras=extras, replaced=replaced, seconds=seconds, devices=devices, notes=notes,
    )


def _save_error(obj: Any, path: str, exc: BaseException) -> TorchMagicError:
    msg = " ".join(str(exc).split())
    before = "the previous file is unchanged" if os.path.exists(path) else "no file was left"
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):  # torch's writer chains it
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return TorchMagicError(f"could not write {path}: the write failed "
                               f"({cause.strerror or cause}); {before}")
    if "write failed" in msg or "file write" in msg:
        return TorchMagicError(f"could not write {path}: the write failed (is the disk full?); "
                               f"{before} ({msg[:120]})")
    culprit = None if isinstance(exc, RuntimeError) else _unsaveable(obj)
    where = f"{culprit}: " if culprit else ""
    return TorchMagicError(f"torch.save could not write {path}: {where}{type(exc).__name__}: "
                           f"{msg[:160]}; {before}")


def _unsaveable(obj: Any, path: str = "") -> str | None:
    """The entry of ``obj`` that torch.save fails on (searched only after a failure)."""
    items = obj.items() if isinstance(obj, Mapping) else []
    for key, value in items:
        try:
            torch.save(value, io.BytesIO())
        except Exception:  # noqa: BLE001
            return _unsaveable(value, f"{path}{key}.") or f"{path}{key}"
    return None


# -- load ----------------------------------------------------------------------------------------
def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], *,
                    optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device | None = None, weights_only: bool = True,
                    mmap: bool = False, assign: bool = False, strict: bool = True,
                    strip_prefix: str | None = None, add_prefix: str | None = None,
                    key: str | None = None, name: str = "model",
                    optimizer_name: str = "optimizer") -> LoadReport:
    """Load a checkpoint into ``model`` (and ``optimizer``) safely; return a :class:`LoadReport`.

    ``weights_only=True`` by default. ``mmap`` maps the file instead of reading it; with
    ``assign=True`` the model takes the loaded tensors themselves (no copy: the way to fill a model
    built on the meta device). ``strict`` refuses any missing, unexpected or shape-mismatched key
    (raising :class:`CheckpointMismatch`, whose ``report`` holds the diff); non-strict loads the keys
    that match and skips the rest. The model is changed only when the load succeeds.
    """
    if not isinstance(model, nn.Module):
        raise TorchMagicError(f"{name} is {a_type(model)}, not an nn.Module")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TorchMagicError(f"--optimizer {optimizer_name} is {a_type(optimizer)}, "
                              "not a torch.optim.Optimizer")
    path = os.path.expanduser(os.fspath(path))
    size, file_kind = check_source(path)
    loc: Any = None
    if map_location is not None:
        try:
            loc = torch.device(map_location)
        except (RuntimeError, TypeError):
            raise TorchMagicError(f"--map-location {map_location!r} is not a device; use a device "
                                  "such as cpu, cuda, cuda:1 or mps") from None
        if loc.type == "cuda" and not torch.cuda.is_available():
            raise TorchMagicError(f"--map-location {map_location}: CUDA is not available here")
        if loc.type == "meta":
            raise TorchMagicError("--map-location meta would load no values; build the model on "
                                  "meta and load real tensors with --assign instead")
    if strip_prefix and add_prefix:
        raise TorchMagicError("use either --strip-prefix or --add-prefix, not both")
    if assign and optimizer is not None:
        raise TorchMagicError("--assign replaces the model's parameter objects, so the optimizer "
                              f"{optimizer_name} would keep the old ones: load the model with "
                              "--assign, build the optimizer, then load it with --optimizer")
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    meta = [n for n, t in named if t.is_meta]
    if meta and not assign:
        raise TorchMagicError(f"{name} has {len(meta)} tensors on the meta device ({meta[0]}, ...): "
                              "copying into them does nothing; load with --assign so the model "
                              "takes the checkpoint's tensors")

    start = time.perf_counter()
    obj = read_checkpoint(path, file_kind, map_location=loc, weights_only=weights_only, mmap=mmap)
    try:
        state, found, opt_state, fmt, extras = split_checkpoint(obj, key, path)
    except TorchMagicError as exc:
        if weights_only:
            raise
        # The unpickling (and whatever code the file carried) has already run: say so.
        raise TorchMagicError(f"{exc} (note: --unsafe unpickled the file with "
                              "weights_only=False, which runs any code it contains)") from None

    notes: list[str] = []
    if strip_prefix:
        if not any(k.startswith(strip_prefix) for k in state):
            raise TorchMagicError(f"--strip-prefix {strip_prefix}: no key of the checkpoint starts "
                                  f"with it (first key: {next(iter(state))})")
        state = {(k[len(strip_prefix):] if k.startswith(strip_prefix) else k): v
                 for k, v in state.items()}
    if add_prefix:
        state = {add_prefix + k: v for k, v in state.items()}

    own = model.state_dict(keep_vars=True)
    model_keys = list(own)
    missing = [k for k in model_keys if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = []
    casts: Counter[str] = Counter()
    for k, v in state.items():
        mine = own.get(k)
        if isinstance(mine, torch.Tensor) and isinstance(v, torch.Tensor):
            if access.shape(mine) != access.shape(v):
                mismatched.append(KeyMismatch(k, access.shape(v), access.shape(mine)))
            elif mine.dtype != v.dtype:
                casts[f"{v.dtype} -> {mine.dtype}".replace("torch.", "")] += 1
    ckpt_tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    report = LoadReport(
        path=path, model=name, model_class=type(model).__name__, status="refused",
        file_bytes=size, file_format=fmt, state_dict_key=found, loaded=0,
        checkpoint_keys=len(state), model_keys=len(model_keys), missing=missing,
        unexpected=unexpected, mismatched=mismatched, strict=strict, weights_only=weights_only,
        mmap=mmap, assign=assign, map_location=None if loc is None else str(loc),
        checkpoint_devices=_device_counts(ckpt_tensors),
        model_devices=_device_counts([t for _, t in named]),
        dtype_casts={} if assign else dict(casts), optimizer_in_file=opt_state is not None,
        extras=extras, notes=notes,
    )
    if missing or unexpected or mismatched:
        report.prefix_fix = prefix_fix(list(state), model_keys)
        if report.prefix_fix:
            flag, prefix = report.prefix_fix.split(" ", 1)  # "--strip-prefix module."
            fixed = ({k[len(prefix):] if k.startswith(prefix) else k for k in state}
                     if flag == "--strip-prefix" else {prefix + k for k in state})
            left = len(set(model_keys) - fixed) + len(fixed - set(model_keys))
            report.prefix_fix_effect = ("makes every key match" if not left
                                        else f"leaves {left} keys unmatched")
            if left and flag == "--add-prefix" and fixed <= set(model_keys):
                part = name + "".join(f"[{seg}]" if seg.isdigit() else f".{seg}"
                                      for seg in prefix.rstrip(".").split("."))
                report.prefix_fix_effect = (f"would match every checkpoint key: the file holds "
                                            f"{part} only, so load it into {part}")
    if strict and report.problems:
        fix = (f"; {report.prefix_fix} {report.prefix_fix_effect}" if report.prefix_fix
               else "")
        report.seconds = time.perf_counter() - start
        raise CheckpointMismatch(
            f"{path} does not match {name} ({type(model).__name__}): {report.summary()}; nothing was "
            f"loaded and the model is unchanged{fix} (or load the matching keys with --no-strict)",
            report)
    if not strict:
        bad = {m.key for m in mismatched}
        report.skipped = [m.key for m in mismatched]
        state = {k: v for k, v in state.items() if k not in bad}
        if not set(state).intersection(own):
            fix = (f" ({report.prefix_fix} {report.prefix_fix_effect})" if report.prefix_fix
                   else "")
            raise CheckpointMismatch(f"no key of {path} matches {name}: nothing to load{fix}",
                                     report)
    if optimizer is not None and opt_state is None:
        raise TorchMagicError(f"--optimizer {optimizer_name}: {path} holds no optimizer state "
                              "(save it with %checkpoint save MODEL PATH --optimizer OPT)")
    check_tensors(own, state, assign, path, name)
    if optimizer is not None:
        check_optimizer(optimizer, opt_state, optimizer_name)

    # Validate on a meta twin first: torch's own checks (custom _load_from_state_dict, hooks)
    # run without touching the user's model.
    from torchmagic.core.twin import meta_twin

    try:
        twin = meta_twin(model)
        twin.load_state_dict(state, strict=strict, assign=True)
    except TorchMagicError:
        raise
    except Exception as exc:  # noqa: BLE001 - a validation failure is reported, model untouched
        raise TorchMagicError(f"load_state_dict refused the checkpoint: "
                              f"{' '.join(str(exc).split())[:300]}; the model is unchanged") from None
    finally:
        twin = None

    groups = tied_groups(model) if assign else []
    tied: list[str] = []
    split: list[str] = []
    backup = Backup(model, set(state), optimizer, copy_values=not assign)
    try:
        with hold_sigint():
            try:
                result = model.load_state_dict(state, strict=strict, assign=assign)
                if groups:
                    tied, split = retie(model, groups)
                if optimizer is not None:
                    optimizer.load_state_dict(opt_state)
            except Exception:
                backup.restore()
                raise
    except Exception as exc:  # noqa: BLE001 - passed validation, failed for real: undone
        undone = ("the model and optimizer were put back as they were" if backup.complete else
                  f"{name} may be partly loaded (too large to back up): load it again")
        raise TorchMagicError(f"load_state_dict failed after the checks passed: "
                              f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}; "
                              f"{undone}") from None
    del backup
    report.status = "loaded"
    report.loaded = len(state) - len(result.unexpected_keys)
    report.optimizer = type(optimizer).__name__ if optimizer is not None else None
    after = [*model.parameters(), *model.buffers()]
    report.model_devices = _device_counts(after)
    report.seconds = time.perf_counter() - start

    ck_devs, model_devs = set(report.checkpoint_devices), set(report.model_devices)
    if loc is not None and not assign and ck_devs != model_devs:
        notes.append(f"map_location={loc} put the loaded tensors on {', '.join(sorted(ck_devs))}, "
                     f"but load_state_dict copies values into the existing parameters: {name} "
                     f"stays on {', '.join(sorted(model_devs))}; move it with {name}.to('{loc}')")
    if len(model_devs) > 1:
        notes.append(f"{name} is split across devices: {', '.join(sorted(model_devs))}")
    if casts and not assign:
        notes.append("values were cast to the model's dtypes: " +
                     ", ".join(f"{n} {c}" for c, n in casts.items()))
    if assign:
        notes.append("--assign: the model now holds the loaded tensors (their dtype and device); "
                     "optimizers built before this load still hold the old parameters")
    if tied:
        notes.append(f"re-tied {len(tied)} shared parameters that assign=True had split: "
                     + ", ".join(tied[:3]))
    if split:
        notes.append(f"{len(split)} tied parameters ({split[0]}, ...) hold different values in the "
                     "file and are now separate parameters")
    if mmap and assign:
        notes.append("--mmap --assign: parameters are backed by the mapped file (copy-on-write); "
                     "pages are read from disk as they are used")
    if not weights_only:
        notes.append("--unsafe: loaded with weights_only=False; unpickling runs any code the file "
                     "contains, so use it only for files you created or trust")
    if opt_state is not None and optimizer is None:
        notes.append("the file also holds optimizer state: add --optimizer OPT to restore it")
    if not strict and (report.problems or report.skipped):
        notes.append(f"--no-strict: {report.summary()} left as they were")
    return report


__all__ = ["CheckpointMismatch", "KeyMismatch", "LoadReport", "SaveReport", "atomic_torch_save",
           "load_checkpoint", "save_checkpoint"]
