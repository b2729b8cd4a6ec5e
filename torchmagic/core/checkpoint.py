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
offered), validates the load on a meta twin of the model, and only then loads for real, with Ctrl-C
held back until the copy is complete: a load that fails leaves the model unchanged. The report says
which device the model is on afterwards (``map_location`` moves the loaded tensors, not the model).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core._result import Result
from torchmagic.core.errors import TorchMagicError, a_type

# Keys under which checkpoints in the wild keep the model's state dict (first match wins).
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "model_state", "module", "net",
                   "network", "weights", "params")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "optimizer_state")
# Prefixes added by wrappers: DataParallel / DistributedDataParallel, torch.compile.
KNOWN_PREFIXES = ("module.", "_orig_mod.")

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


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
    try:
        st = t.untyped_storage()
        return (str(t.device), st.data_ptr(), st.nbytes())
    except Exception:  # noqa: BLE001 - exotic tensor subclasses: count them on their own
        return (id(t),)


def _storage_nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except Exception:  # noqa: BLE001
        return t.numel() * t.element_size()


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
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, Mapping):
        return f"dict ({len(value)} keys)"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _new_file_mode(path: str) -> int:
    """Permissions for the new file: the replaced file's, else 0o666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        pass
    umask = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except OSError:
        pass
    if umask is None:  # not Linux: read it the only portable way (set and restore)
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` written to a temporary file in the same directory, flushed to disk
    (``fsync``) and renamed over ``path`` (``os.replace``). On any failure, Ctrl-C included, the
    temporary file is removed and ``path`` keeps its previous content."""
    directory = os.path.dirname(os.path.abspath(path))
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # make the rename durable (POSIX)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _check_target(path: str) -> str:
    path = os.path.expanduser(str(path))
    if not path:
        raise TorchMagicError("PATH is empty; give a file name such as ckpt.pt")
    if os.path.isdir(path):
        raise TorchMagicError(f"{path} is a directory; give a file name such as "
                              f"{os.path.join(path, 'ckpt.pt')}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise TorchMagicError(f"directory {directory} does not exist (create it first: "
                              f"os.makedirs({directory!r}))")
    if not os.access(directory, os.W_OK):
        raise TorchMagicError(f"directory {directory} is not writable")
    return path


# -- save ----------------------------------------------------------------------------------------
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
    path = _check_target(os.fspath(path))
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise TorchMagicError(f"{name} has {len(meta)} tensors on the meta device ({meta[0]}, ...):"
                              " they hold no values, so there is nothing to save (load or "
                              "materialize the weights first)")
    state = model.state_dict()
    notes: list[str] = []
    if optimizer is None and not extras:
        obj: Any = state
        keys: list[str] = []
    else:
        obj = {"model": state}
        if optimizer is not None:
            obj["optimizer"] = optimizer.state_dict()
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
        raise TorchMagicError(f"could not write {path}: {exc.strerror or exc}") from None
    seconds = time.perf_counter() - start
    return SaveReport(
        path=path, model=name, model_class=type(model).__name__,
        file_bytes=os.path.getsize(path), tensors=len(tensors), storages=len(storages),
        tensor_bytes=sum(storages.values()), keys=keys,
        optimizer=type(optimizer).__name__ if optimizer is not None else None,
        extras=extras, replaced=replaced, seconds=seconds, devices=devices, notes=notes,
    )


# -- load ----------------------------------------------------------------------------------------
def _read_error(path: str, exc: BaseException) -> TorchMagicError:
    """Turn what ``torch.load`` raised into one line the user can act on."""
    msg = " ".join(str(exc).split())
    with open(path, "rb") as f:
        head = f.read(4)
    binary = head.startswith((b"PK", b"\x80"))  # torch.save's zip, or a protocol 2+ pickle
    m = _GLOBAL_RE.search(msg)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in msg and \
            (m or binary):
        what = f"needs {m.group(1)}" if m else "contains an object"
        return TorchMagicError(
            f"refused to load {path}: its pickle {what}, which weights_only=True blocks because "
            "unpickling it could run arbitrary code; nothing was loaded and the model is unchanged. "
            "If you trust the file, allow a harmless class with "
            "torch.serialization.add_safe_globals([...]) or load with --unsafe")
    if not binary and "Weights only load failed" in msg:  # not a pickle at all: garbage
        return TorchMagicError(f"{path} is not a torch.save checkpoint (it starts with {head!r}, "
                               "not a zip archive or a pickle); nothing was loaded and the model "
                               "is unchanged")
    if head.startswith(b"PK") and ("central directory" in msg or "PytorchStreamReader" in msg
                                   or isinstance(exc, (EOFError, zipfile.BadZipFile))):
        return TorchMagicError(
            f"{path} is truncated or corrupt: the zip archive torch.save writes is incomplete "
            "(an interrupted save or copy?); nothing was loaded and the model is unchanged")
    if isinstance(exc, EOFError):
        return TorchMagicError(f"{path} ends too early (truncated legacy torch.save file); "
                               "nothing was loaded")
    if isinstance(exc, (pickle.UnpicklingError, KeyError, UnicodeDecodeError)) or \
            "invalid load key" in msg:
        return TorchMagicError(f"{path} is not a torch.save checkpoint (it starts with {head!r}); "
                               "nothing was loaded")
    if "deserialize object on a CUDA device" in msg or "torch.cuda.is_available() is False" in msg:
        return TorchMagicError(f"{path} holds CUDA tensors and CUDA is not available here: "
                               "load with --map-location cpu")
    if "mmap can only be used" in msg:
        return TorchMagicError(f"--mmap needs a file written by torch.save's zip format; {path} is "
                               "in the legacy format (load without --mmap, then save it again)")
    return TorchMagicError(f"torch.load({path!r}) failed: {type(exc).__name__}: {msg[:300]}")


def _read(path: str, *, map_location: Any, weights_only: bool, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only,
                          mmap=mmap if mmap else None)
    except Exception as exc:  # KeyboardInterrupt propagates: nothing was touched yet
        raise _read_error(path, exc) from None


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    if not all(isinstance(k, str) for k in obj):
        return False
    tensors = 0
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            tensors += 1
        elif not k.endswith("_extra_state"):
            return False
    return tensors > 0


def _split(obj: Any, key: str | None, path: str) -> tuple[dict[str, Any], str | None, Any, str,
                                                           dict[str, Any]]:
    """-> (state dict, its key, optimizer state or None, format text, extras)."""
    if key is None and _is_state_dict(obj):
        return dict(obj), None, None, "state dict", {}
    if not isinstance(obj, Mapping):
        raise TorchMagicError(f"{path} holds a {type(obj).__name__}, not a state dict or a dict "
                              "containing one" + (" (a whole pickled model? load it with "
                              "--unsafe and use its state_dict())" if isinstance(obj, nn.Module)
                                                  else ""))
    keys = [str(k) for k in obj]
    if key is not None:
        if key not in obj:
            raise TorchMagicError(f"--key {key}: {path} has no such entry; its keys are "
                                  f"{_some(keys)}")
        if not _is_state_dict(obj[key]):
            raise TorchMagicError(f"--key {key}: that entry is {a_type(obj[key])}, "
                                  "not a state dict of tensors")
        found = key
    else:
        found = next((k for k in STATE_DICT_KEYS if k in obj and _is_state_dict(obj[k])), None)
        if found is None:
            found = next((k for k in obj if isinstance(k, str) and _is_state_dict(obj[k])), None)
        if found is None:
            raise TorchMagicError(f"no state dict found in {path}: its keys are "
                                  f"{_some(keys)} (name the entry with --key)")
    opt_key = next((k for k in OPTIMIZER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
    extras = {str(k): v for k, v in obj.items() if k not in (found, opt_key)}
    fmt = "dict: " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
    return dict(obj[found]), found, (obj[opt_key] if opt_key else None), fmt, extras


def _some(keys: list[str], n: int = 6) -> str:
    """``"a, b, c, ... (12 more)"``: the first few keys, keeping a message on one short line."""
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _first_component(keys: list[str]) -> str | None:
    """The dotted first component every key shares (``module.``), or None."""
    if not keys:
        return None
    first = keys[0].split(".", 1)[0] + "."
    if "." in keys[0] and all(k.startswith(first) for k in keys):
        return first
    return None


def _prefix_fix(ckpt_keys: list[str], model_keys: list[str]) -> str | None:
    """An option that would make the checkpoint's keys match the model's better."""
    model_set = set(model_keys)
    base = len(model_set.intersection(ckpt_keys))
    prefix = _first_component(ckpt_keys)
    if prefix is not None:
        stripped = {k[len(prefix):] for k in ckpt_keys}
        if len(model_set & stripped) > base:
            return f"--strip-prefix {prefix}"
    prefix = _first_component(model_keys)
    if prefix is not None:
        added = {prefix + k for k in ckpt_keys}
        if len(model_set & added) > base:
            return f"--add-prefix {prefix}"
    for prefix in KNOWN_PREFIXES:  # partial: some keys carry it
        stripped = {k[len(prefix):] if k.startswith(prefix) else k for k in ckpt_keys}
        if len(model_set & stripped) > base:
            return f"--strip-prefix {prefix}"
    sub = _submodule_prefix(ckpt_keys, model_keys)
    return f"--add-prefix {sub}" if sub is not None and base < len(ckpt_keys) else None


def _submodule_prefix(ckpt_keys: list[str], model_keys: list[str]) -> str | None:
    """The submodule (``"features."``) whose keys every checkpoint key matches: the checkpoint
    was saved from that part of the model (``model.features.state_dict()``). Shortest first."""
    model_set = set(model_keys)
    prefixes: set[str] = set()
    for k in model_keys:
        parts = k.split(".")[:-1]
        prefixes.update(".".join(parts[:i]) + "." for i in range(1, len(parts) + 1))
    for prefix in sorted(prefixes, key=lambda p: (p.count("."), p)):
        if all(prefix + k in model_set for k in ckpt_keys):
            return prefix
    return None


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


def _check_optimizer(optimizer: torch.optim.Optimizer, state: Any, name: str) -> None:
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, list) or "state" not in state:
        raise TorchMagicError(f"the checkpoint's optimizer entry is not an optimizer state dict "
                              f"(keys: {', '.join(map(str, state))[:80]})")
    mine = optimizer.param_groups
    if len(groups) != len(mine):
        raise TorchMagicError(f"{name} has {len(mine)} parameter groups, the checkpoint's optimizer "
                              f"has {len(groups)}; nothing was loaded")
    for i, (a, b) in enumerate(zip(groups, mine)):
        if len(a.get("params", [])) != len(b["params"]):
            raise TorchMagicError(f"{name} group {i} has {len(b['params'])} parameters, the "
                                  f"checkpoint's has {len(a.get('params', []))}; nothing was loaded")


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
    if not os.path.exists(path):
        raise TorchMagicError(f"{path} does not exist (working directory: {os.getcwd()})")
    if os.path.isdir(path):
        raise TorchMagicError(f"{path} is a directory, not a checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise TorchMagicError(f"{path} is empty (0 bytes): an interrupted save? nothing was loaded")
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
    obj = _read(path, map_location=loc, weights_only=weights_only, mmap=mmap)
    try:
        state, found, opt_state, fmt, extras = _split(obj, key, path)
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
            if tuple(mine.shape) != tuple(v.shape):
                mismatched.append(KeyMismatch(k, tuple(v.shape), tuple(mine.shape)))
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
        report.prefix_fix = _prefix_fix(list(state), model_keys)
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
    if optimizer is not None:
        if opt_state is None:
            raise TorchMagicError(f"--optimizer {optimizer_name}: {path} holds no optimizer state "
                                  "(save it with %checkpoint save MODEL PATH --optimizer OPT)")
        _check_optimizer(optimizer, opt_state, optimizer_name)

    # Validate on a meta twin first: torch's own checks (custom _load_from_state_dict, hooks)
    # run without touching the user's model.
    from torchmagic.core.twin import meta_twin

    try:
        twin = meta_twin(model)
        twin.load_state_dict(state, strict=strict, assign=True)
    except Exception as exc:  # noqa: BLE001 - a validation failure is reported, model untouched
        raise TorchMagicError(f"load_state_dict refused the checkpoint: "
                              f"{' '.join(str(exc).split())[:300]}; the model is unchanged") from None
    finally:
        twin = None

    groups = _tied_groups(model) if assign else []
    tied: list[str] = []
    split: list[str] = []
    try:
        with _hold_sigint():
            result = model.load_state_dict(state, strict=strict, assign=assign)
            if groups:
                tied, split = _retie(model, groups)
            if optimizer is not None:
                optimizer.load_state_dict(opt_state)
    except Exception as exc:  # noqa: BLE001 - passed validation on the twin, failed for real
        raise TorchMagicError(f"load_state_dict failed after the checks passed: "
                              f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}; "
                              f"{name} may be partly loaded: load it again or rebuild it"
                              ) from None
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
