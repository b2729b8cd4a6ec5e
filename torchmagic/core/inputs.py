"""Model inputs as every magic takes them: tensors, argument tuples, keyword dicts, or shapes.

``prepare_inputs(model, *inputs, args=..., kwargs=..., input_size=..., dtypes=...)`` is what
``torchmagic.summary`` (and every function that runs a model's forward: the memory estimate, the
compile report) does with its inputs:

- ``inputs``: tensors or any values (positional arguments), or one plain tuple/list written out by
  the user (the argument list: *every* element positional, a dict included, for a
  ``forward(self, features)`` that reads ``features["input_ids"]``); a ``Mapping`` given as an
  input (a ``dict``, a tokenizer's ``BatchEncoding``, a processor's ``BatchFeature``) is keyword
  arguments, as ``model(**batch)``, alone or last;
- ``args`` / ``kwargs``: the explicit form (``torch.export``'s convention): ``args`` a tuple of
  positional arguments taken as they are, ``kwargs`` a mapping of keyword arguments;
- ``input_size``: a shape ``(1, 3, 32, 32)`` or a list of shapes; tensors are made here, floating
  ones random from a private ``torch.Generator`` (the global RNG is not consumed) in the model's
  floating dtype unless ``dtypes`` says otherwise (dtype names, ``torch.long``, or torch's legacy
  tensor types such as ``torch.FloatTensor``), integer and bool ones zeros (valid token ids).
  ``batch_dim``: the shapes are given without their batch dimension, a batch of 1 is inserted at
  that position (torchinfo's ``batch_dim``). Keyword arguments can come with shapes (``kwargs`` or
  a trailing mapping: ``return_dict=False`` beside ``(1, 3, 224, 224)``). Before tensors are made
  on a real device, the bytes they need are checked against the free memory there
  (:class:`InputMemoryError`).

Errors are one-line :class:`~torchmagic.core.errors.TorchMagicError` s naming this module's own
argument names (``input_size``, ``dtypes``, ``meta=True``); the magics translate them to flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core.errors import TorchMagicError

_DTYPE_ALIASES = {
    "float": torch.float32, "float32": torch.float32, "fp32": torch.float32,
    "double": torch.float64, "float64": torch.float64, "fp64": torch.float64,
    "half": torch.float16, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "long": torch.int64, "int64": torch.int64, "int": torch.int32, "int32": torch.int32,
    "int16": torch.int16, "short": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "complex64": torch.complex64, "cfloat": torch.complex64,
}


_LEGACY_TYPES = {"FloatTensor": torch.float32, "DoubleTensor": torch.float64,
                 "HalfTensor": torch.float16, "BFloat16Tensor": torch.bfloat16,
                 "LongTensor": torch.int64, "IntTensor": torch.int32, "ShortTensor": torch.int16,
                 "CharTensor": torch.int8, "ByteTensor": torch.uint8, "BoolTensor": torch.bool}


def parse_dtype(value: Any) -> torch.dtype:
    """``torch.long``, a name (``long``, ``float``, ``bf16`` ...) or one of torch's legacy tensor
    types (``torch.FloatTensor``, ``torch.cuda.LongTensor``, or their names, as torchinfo takes
    them) -> ``torch.dtype``."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, type) and isinstance(getattr(value, "dtype", None), torch.dtype):
        return value.dtype  # torch.FloatTensor, torch.cuda.HalfTensor ...
    if isinstance(value, str):
        raw = value.strip()
        legacy = _LEGACY_TYPES.get(raw.rpartition(".")[2])
        if legacy is not None:
            return legacy
        key = raw.lower().removeprefix("torch.")
        if key in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[key]
        dt = getattr(torch, key, None)
        if isinstance(dt, torch.dtype):
            return dt
    raise TorchMagicError(f"unknown dtype {value!r} (valid: long, int, float, half, bf16, double, "
                          "bool, any torch dtype name, or a legacy type such as torch.FloatTensor)")


def is_shape(obj: Any) -> bool:
    return isinstance(obj, (tuple, list, torch.Size)) and all(
        isinstance(s, int) and not isinstance(s, bool) for s in obj)


def normalize_shapes(input_size: Any) -> list[tuple[int, ...]]:
    """``(1, 3, 32, 32)`` or ``[(2, 16), (2, 16)]`` -> list of shapes (validated)."""
    if is_shape(input_size) and len(input_size) > 0:
        shapes = [tuple(input_size)]
    elif isinstance(input_size, (tuple, list)) and input_size and all(
            is_shape(s) for s in input_size):
        shapes = [tuple(s) for s in input_size]
    else:
        raise TorchMagicError(f"input shape must be a tuple of whole numbers like (1, 3, 32, 32) "
                              f"or a list of them; got {input_size!r}")
    for s in shapes:
        if any(d < 0 for d in s):
            raise TorchMagicError(f"input shape {s} has a negative size")
    return shapes


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of floating inputs made from shapes: the model's first float32/bf16/fp16/fp64
    parameter or buffer (quantized and float8 weights skipped), else torch's default dtype."""
    for t in [*model.parameters(), *model.buffers()]:
        # (an uninitialized lazy parameter has a dtype too; float8 weights are storage, not an
        # activation dtype)
        if t.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            return t.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def normal_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise TorchMagicError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1, mps, meta)") \
            from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TorchMagicError(f"device {device!r}: CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise TorchMagicError(f"device {device!r}: only {torch.cuda.device_count()} CUDA "
                                  "device(s) here")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None)
                                  and torch.backends.mps.is_available()):
        raise TorchMagicError(f"device {device!r}: MPS is not available here")
    return dev


def split_inputs(inputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional inputs -> (args, kwargs): one plain tuple/list is the argument list, every
    element of it positional; otherwise a ``Mapping`` (alone or last) holds keyword arguments."""
    from collections.abc import Mapping

    if len(inputs) == 1 and type(inputs[0]) in (tuple, list) and not is_shape(inputs[0]):
        # the argument tuple written out by the user: positional, all of it (a namedtuple such
        # as PackedSequence is one argument)
        return tuple(inputs[0]), {}
    kwargs: dict[str, Any] = {}
    if inputs and isinstance(inputs[-1], Mapping):
        kwargs = check_kwargs(inputs[-1])
        inputs = inputs[:-1]
    return tuple(inputs), kwargs


def check_kwargs(mapping: Any, what: str = "keyword inputs") -> dict[str, Any]:
    """A ``Mapping`` of keyword arguments as a plain dict (string names only)."""
    from collections.abc import Mapping

    if not isinstance(mapping, Mapping):
        raise TorchMagicError(f"kwargs must be a mapping of argument names to values (a dict, a "
                              f"tokenizer's BatchEncoding ...); got {type(mapping).__name__}")
    out = dict(mapping.items())
    bad = [k for k in out if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise TorchMagicError(f"{what} need string names; got {bad[0]!r}")
    return out


def insert_batch_dim(shapes: list[tuple[int, ...]], batch_dim: Any) -> list[tuple[int, ...]]:
    """Shapes given without their batch dimension -> with a batch of 1 inserted at ``batch_dim``
    (as ``unsqueeze(batch_dim)``; negative counts from the end)."""
    if not isinstance(batch_dim, int) or isinstance(batch_dim, bool):
        raise TorchMagicError(f"batch_dim must be a whole number (the position of the batch "
                              f"dimension); got {batch_dim!r}")
    out = []
    for s in shapes:
        pos = batch_dim if batch_dim >= 0 else len(s) + 1 + batch_dim
        if not 0 <= pos <= len(s):
            raise TorchMagicError(f"batch_dim {batch_dim} is out of range for shape {s} (valid: "
                                  f"{-len(s) - 1} to {len(s)})")
        out.append((*s[:pos], 1, *s[pos:]))
    return out


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 gen: torch.Generator) -> torch.Tensor:
    if device.type == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, generator=gen, dtype=torch.float32 if dtype.is_floating_point
                        else torch.complex64).to(dtype)
    else:
        t = torch.zeros(shape, dtype=dtype)
    return t.to(device)


def to_device(obj: Any, device: torch.device) -> Any:
    from torch.nn.utils.rnn import PackedSequence
    from torch.utils._pytree import tree_map

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if device.type == "meta":
            if t.is_nested or type(t) is not torch.Tensor:  # nested / subclass: its own .to
                return t.detach().to("meta")
            return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="meta")
        return t.detach().to(device) if t.device != device else t

    def packed(p: PackedSequence) -> PackedSequence:
        # batch_sizes are metadata the recurrent kernels read on the CPU (on meta too)
        return PackedSequence(move(p.data), p.batch_sizes,
                              None if p.sorted_indices is None else move(p.sorted_indices),
                              None if p.unsorted_indices is None else move(p.unsorted_indices))

    return tree_map(lambda t: packed(t) if isinstance(t, PackedSequence) else move(t), obj,
                    is_leaf=lambda t: isinstance(t, PackedSequence))


@dataclass
class PreparedInputs:
    """Arguments ready for ``model(*args, **kwargs)`` and what the report shows about them.

    ``shapes``: the shape of every tensor in ``(args, kwargs)`` in order; ``dtypes`` their dtype
    names (``"float32"``); ``from_shapes``: True when made from ``input_size``.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    from_shapes: bool = False


def has_inputs(inputs: tuple[Any, ...], input_size: Any = None, args: Any = None,
               kwargs: Any = None) -> bool:
    """True when a forward should run: values, shapes, ``args`` or ``kwargs`` were given."""
    return bool(inputs) or input_size is not None or args is not None or kwargs is not None


class InputMemoryError(TorchMagicError):
    """Tensors made from ``input_size`` would not fit in the free memory of their device.

    ``need`` and ``free`` are bytes, ``device`` where they were to be made."""

    def __init__(self, message: str, need: int, free: int, device: str) -> None:
        super().__init__(message)
        self.need, self.free, self.device = need, free, device


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: available RAM (psutil) for the CPU,
    ``torch.cuda.mem_get_info`` for CUDA; None where it cannot be known (MPS, others)."""
    try:
        if device.type == "cpu":
            import psutil

            return int(psutil.virtual_memory().available)
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
    except Exception:  # noqa: BLE001 - no answer: no check
        return None
    return None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_input_memory(shapes: list[tuple[int, ...]], dts: list[torch.dtype],
                       device: torch.device) -> None:
    """Refuse (:class:`InputMemoryError`) tensors of ``shapes`` that need more bytes than
    ``device`` has free; a meta device needs none."""
    if device.type == "meta":
        return
    import math

    need = sum(math.prod(s) * (torch.empty((), dtype=d).element_size()) for s, d in zip(shapes, dts))
    if need < (64 << 20):  # small inputs: not worth asking the system
        return
    free = free_memory(device)
    if free is None or need <= free:
        return
    shown = ", ".join(str(s) for s in shapes[:3]) + (" ..." if len(shapes) > 3 else "")
    raise InputMemoryError(
        f"inputs of shape {shown} need {_human_bytes(need)} but {device} has "
        f"{_human_bytes(free)} free: nothing was made; use meta=True for shapes and FLOPs on the "
        "meta device (no memory), or smaller input_size", need, free, str(device))


def prepare_inputs(model: nn.Module, *inputs: Any, args: Any = None, kwargs: Any = None,
                   input_size: Any = None, dtypes: Sequence[Any] | Any = None,
                   batch_dim: int | None = None, target: torch.device | None = None,
                   move: bool = False) -> PreparedInputs:
    """Turn ``inputs`` / ``args`` / ``kwargs`` / ``input_size`` (see the module docstring) into
    ``(args, kwargs)``.

    ``target``: the device tensors made from shapes go to (default: the model's device); ``move``:
    also move given tensors there (``meta`` makes shape-only copies, the user's tensors are never
    changed). Raises :class:`TorchMagicError` for positional inputs given twice (values and
    ``input_size``, or ``inputs`` and ``args``), bad shapes, dtypes or ``batch_dim``, and
    :class:`InputMemoryError` for shapes too big for the device's free memory.
    """
    from collections.abc import Mapping

    from torch.utils._pytree import tree_flatten

    from torchmagic.core.tracing import tensor_shapes

    if args is not None and inputs:
        raise TorchMagicError("give positional inputs either as values or as args=, not both")
    if args is not None and not isinstance(args, tuple):
        args = tuple(args) if type(args) is list else (args,)
    kw: dict[str, Any] = check_kwargs(kwargs, "kwargs") if kwargs is not None else {}
    if input_size is not None:
        if args is not None:
            raise TorchMagicError("give positional inputs either as input_size shapes or as args, "
                                  "not both (keyword arguments can come with shapes: kwargs=)")
        if inputs and not (len(inputs) == 1 and isinstance(inputs[0], Mapping)):
            raise TorchMagicError("give inputs either as tensors or as input_size shapes, not both "
                                  "(keyword arguments can come with shapes: kwargs=)")
    if batch_dim is not None and input_size is None:
        raise TorchMagicError("batch_dim applies to input_size shapes (given without their batch "
                              "dimension); tensors keep their shape")
    target = model_device(model) if target is None else torch.device(target)
    if input_size is not None:
        shapes = normalize_shapes(input_size)
        if batch_dim is not None:
            shapes = insert_batch_dim(shapes, batch_dim)
        if dtypes is None:
            dts = [float_dtype(model)] * len(shapes)
        else:
            raw = dtypes if isinstance(dtypes, (list, tuple)) else [dtypes]
            dts = [parse_dtype(d) for d in raw]
            if len(dts) == 1:
                dts = dts * len(shapes)
            if len(dts) != len(shapes):
                raise TorchMagicError(f"{len(dts)} dtypes for {len(shapes)} input shapes: give one "
                                      "dtype per shape, or one for all")
        if inputs:
            extra = check_kwargs(inputs[0])
            clash = sorted(set(extra) & set(kw))
            if clash:
                raise TorchMagicError(f"keyword input {clash[0]!r} given twice")
            kw = {**extra, **kw}
        if move and kw:
            kw = to_device(kw, target)
        check_input_memory(shapes, dts, target)
        gen = torch.Generator().manual_seed(0)
        pos: tuple[Any, ...] = tuple(make_tensor(s, d, target, gen) for s, d in zip(shapes, dts))
    else:
        if dtypes is not None:
            raise TorchMagicError("dtypes applies to input_size shapes only; tensors keep their "
                                  "dtype")
        if args is not None:
            pos = args
        else:
            pos, extra = split_inputs(inputs)
            clash = sorted(set(extra) & set(kw))
            if clash:
                raise TorchMagicError(f"keyword input {clash[0]!r} given twice")
            kw = {**extra, **kw}
        if move:
            pos, kw = to_device((pos, kw), target)
    leaves = [t for t in tree_flatten((pos, kw))[0] if isinstance(t, torch.Tensor)]
    return PreparedInputs(pos, kw, tensor_shapes((pos, kw)),
                          [str(t.dtype).replace("torch.", "") for t in leaves],
                          from_shapes=input_size is not None)


__all__ = ["InputMemoryError", "PreparedInputs", "check_input_memory", "check_kwargs",
           "float_dtype", "free_memory", "has_inputs", "insert_batch_dim", "is_shape",
           "make_tensor", "model_device", "normal_device", "normalize_shapes", "parse_dtype",
           "prepare_inputs", "split_inputs", "to_device"]
