"""Checkpoint files: atomic writes (through symlinks), what a file is, reading it, finding the state
dict in it and the key prefix that would make it match a model.

``atomic_torch_save`` writes to a temporary file beside the target, ``fsync``s it and renames it over
the target (``os.replace``); a target that is a symlink keeps its link and has the file it points to
replaced, atomically; a FIFO or a device node is refused (``torch.save`` would write into it, or a
rename would replace it by a regular file). Ctrl-C during the write, which torch's zip writer turns
into a ``RuntimeError``, is recognised and re-raised as ``KeyboardInterrupt`` after the clean-up.

``check_source`` says what a file is before anything reads it: a FIFO or ``/dev/zero`` is refused
without being opened (reading them would block or never end), a zip archive without ``data.pkl``, a
truncated zip, a text file are named as such; ``read_checkpoint`` turns ``torch.load``'s errors into
one line that says what the file is, and calls a pickle dangerous only when ``weights_only``
refused a global it would have imported.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import stat
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core.errors import TorchMagicError, a_type

# Keys under which checkpoints in the wild keep the model's state dict (first match wins).
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "model_state", "module", "net",
                   "network", "weights", "params")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "optimizer_state")
# Prefixes added by wrappers: DataParallel / DistributedDataParallel, torch.compile.
KNOWN_PREFIXES = ("module.", "_orig_mod.")

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_UNPICKLER_RE = re.compile(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)")
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe): reading it would wait for a writer"),
          (stat.S_ISCHR, "a character device (like /dev/zero): reading it may never end"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


# -- what a file is --------------------------------------------------------------------------------
def _not_regular(path: str, mode: int) -> str | None:
    for test, what in _KINDS:
        if test(mode):
            return f"{path} is not a regular file: it is {what}"
    return None if stat.S_ISREG(mode) else f"{path} is not a regular file"


def _head(path: str, n: int = 16) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def check_source(path: str) -> tuple[int, str]:
    """``(size, kind)`` of a checkpoint file to load, ``kind`` one of ``"zip"``, ``"pickle"``;
    raises :class:`TorchMagicError` saying what the file is when it cannot be a checkpoint
    (missing, a directory, not a regular file, empty, text, a zip without ``data.pkl``...)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TorchMagicError(f"{path} does not exist (working directory: {os.getcwd()})"
                              ) from None
    except OSError as exc:
        raise TorchMagicError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise TorchMagicError(f"{path} is a directory, not a checkpoint file")
    why = _not_regular(path, st.st_mode)
    if why is not None:
        raise TorchMagicError(f"{why}; nothing was read and the model is unchanged")
    if st.st_size == 0:
        raise TorchMagicError(f"{path} is empty (0 bytes): an interrupted save? nothing was "
                              "loaded")
    try:
        head = _head(path)
    except OSError as exc:
        raise TorchMagicError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            raise TorchMagicError(
                f"{path} is truncated or corrupt: it starts like the zip archive torch.save "
                "writes, but the archive is incomplete (an interrupted save or copy?); nothing "
                "was loaded and the model is unchanged")
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            names = []
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
            raise TorchMagicError(f"{path} is a zip archive but not a torch.save checkpoint (no "
                                  f"data.pkl inside; it holds {shown or 'nothing'}); nothing was "
                                  "loaded and the model is unchanged")
        return st.st_size, "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return st.st_size, "pickle"
    what = "a text file" if _looks_like_text(head) else "not a zip archive or a pickle"
    raise TorchMagicError(f"{path} is not a torch.save checkpoint ({what}: it starts with "
                          f"{head[:8]!r}); nothing was loaded and the model is unchanged")


def _read_error(path: str, kind: str, exc: BaseException) -> TorchMagicError:
    """Turn what ``torch.load`` raised into one line the user can act on."""
    msg = " ".join(str(exc).split())
    m = _GLOBAL_RE.search(msg)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in msg:
        if m or "Unsupported global" in msg:
            what = f"needs {m.group(1)}" if m else "contains an object"
            return TorchMagicError(
                f"refused to load {path}: its pickle {what}, which weights_only=True blocks "
                "because unpickling it could run arbitrary code; nothing was loaded and the model "
                "is unchanged. If you trust the file, allow a harmless class with "
                "torch.serialization.add_safe_globals([...]) or load with --unsafe")
        detail = _UNPICKLER_RE.search(msg)
        stopped = f" (the unpickler stopped at: {detail.group(1)[:80]})" if detail else ""
        return TorchMagicError(f"{path} is corrupt or truncated: its pickle is not valid data"
                               f"{stopped}; nothing was loaded and the model is unchanged")
    if kind == "zip" and ("central directory" in msg or "PytorchStreamReader" in msg
                          or "inline_container" in msg
                          or isinstance(exc, (EOFError, zipfile.BadZipFile))):
        return TorchMagicError(
            f"{path} is truncated or corrupt: the zip archive torch.save writes is incomplete "
            "(an interrupted save or copy?); nothing was loaded and the model is unchanged")
    if isinstance(exc, EOFError):
        return TorchMagicError(f"{path} ends too early (a truncated legacy torch.save file); "
                               "nothing was loaded and the model is unchanged")
    if isinstance(exc, (pickle.UnpicklingError, KeyError, IndexError, UnicodeDecodeError,
                        ValueError, TypeError)) or "invalid load key" in msg:
        return TorchMagicError(f"{path} is corrupt or not a torch.save checkpoint "
                               f"({type(exc).__name__}: {msg[:80]}); nothing was loaded and the "
                               "model is unchanged")
    if "deserialize object on a CUDA device" in msg or "torch.cuda.is_available() is False" in msg:
        return TorchMagicError(f"{path} holds CUDA tensors and CUDA is not available here: "
                               "load with --map-location cpu")
    if "mmap can only be used" in msg:
        return TorchMagicError(f"--mmap needs a file written by torch.save's zip format; {path} is "
                               "in the legacy format (load without --mmap, then save it again)")
    return TorchMagicError(f"torch.load({path!r}) failed: {type(exc).__name__}: {msg[:300]}")


def read_checkpoint(path: str, kind: str, *, map_location: Any, weights_only: bool,
                    mmap: bool) -> Any:
    """``torch.load`` with its errors as one line (see :func:`_read_error`)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only,
                          mmap=mmap if mmap else None)
    except Exception as exc:  # KeyboardInterrupt propagates: nothing was touched yet
        raise _read_error(path, kind, exc) from None


# -- writing ---------------------------------------------------------------------------------------
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


def write_target(path: str) -> str:
    """The file a save to ``path`` replaces: ``path`` itself, or the file a symlink points to
    (the link is kept). Refuses a FIFO, a device node or a socket there."""
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except OSError:
        return target
    why = _not_regular(path if target == os.path.abspath(path) else f"{path} (-> {target})",
                       st.st_mode)
    if why is not None and not stat.S_ISDIR(st.st_mode):
        raise TorchMagicError(f"{why}; a checkpoint is written as a regular file, so nothing was "
                              "written")
    return target


@contextlib.contextmanager
def _noticing_sigint() -> Iterator[list[bool]]:
    """Notice Ctrl-C (it still interrupts): torch's writer turns the KeyboardInterrupt raised
    inside it into a RuntimeError, so the caller needs to know it was Ctrl-C."""
    fired = [False]

    def handler(signum: int, frame: Any) -> None:
        fired[0] = True
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except (ValueError, OSError, TypeError):  # not the main thread
        yield fired
        return
    try:
        yield fired
    finally:
        signal.signal(signal.SIGINT, previous)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` written to a temporary file in the target's directory, flushed to
    disk (``fsync``) and renamed over the target (``os.replace``); a symlink keeps pointing to the
    new file. On any failure, Ctrl-C included, the temporary file is removed and the target keeps
    its previous content (Ctrl-C is re-raised as ``KeyboardInterrupt`` even when torch's writer
    turned it into a ``RuntimeError``)."""
    target = write_target(path)
    directory = os.path.dirname(target)
    mode = _new_file_mode(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                               dir=directory)
    with _noticing_sigint() as interrupted:
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if interrupted[0]:
                raise KeyboardInterrupt("checkpoint save interrupted; the previous file is "
                                        "unchanged") from None
            raise
    with contextlib.suppress(OSError, AttributeError):  # make the rename durable (POSIX)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def check_save_target(path: str) -> str:
    """Validate where a save goes (before anything is written); returns the expanded path."""
    path = os.path.expanduser(str(path))
    if not path:
        raise TorchMagicError("PATH is empty; give a file name such as ckpt.pt")
    if os.path.isdir(path):
        raise TorchMagicError(f"{path} is a directory; give a file name such as "
                              f"{os.path.join(path, 'ckpt.pt')}")
    target = write_target(path)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise TorchMagicError(f"directory {directory} does not exist (create it first: "
                              f"os.makedirs({directory!r}))")
    if not os.access(directory, os.W_OK):
        raise TorchMagicError(f"directory {directory} is not writable")
    return path


# -- the state dict in a checkpoint ------------------------------------------------------------------
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


__all__ = ["KNOWN_PREFIXES", "OPTIMIZER_KEYS", "STATE_DICT_KEYS", "atomic_torch_save",
           "check_save_target", "check_source", "read_checkpoint", "split_checkpoint",
           "prefix_fix", "write_target"]
split_checkpoint, prefix_fix = _split, _prefix_fix
