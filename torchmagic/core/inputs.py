"""Model inputs as every magic takes them: tensors, argument tuples, keyword dicts, or shapes.

``prepare_inputs(model, *inputs, input_size=..., dtypes=...)`` is what ``torchmagic.summary`` (and
every function that runs a model's forward: the memory estimate, the compile report) does with its
inputs:

- ``inputs``: tensors (positional arguments), one plain tuple/list of them (the argument list), and/or
  a dict of keyword arguments (alone or last);
- ``input_size``: a shape ``(1, 3, 32, 32)`` or a list of shapes; tensors are made here, floating ones
  random from a private ``torch.Generator`` (the global RNG is not consumed) in the model's floating
  dtype unless ``dtypes`` says otherwise, integer and bool ones zeros (valid token ids).

Errors are one-line :class:`~torchmagic.core.errors.TorchMagicError` s.
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


def parse_dtype(value: Any) -> torch.dtype:
    """``torch.long`` or a name (``long``, ``float``, ``bf16`` ...) -> ``torch.dtype``."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[key]
        dt = getattr(torch, key, None)
        if isinstance(dt, torch.dtype):
            return dt
    raise TorchMagicError(f"unknown dtype {value!r} (valid: long, int, float, half, bf16, double, "
                          "bool, or any torch dtype name)")


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
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
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
    """Positional inputs -> (args, kwargs): one tuple/list is the argument list, a dict holds
    keyword arguments (alone or last)."""
    if len(inputs) == 1 and type(inputs[0]) in (tuple, list) and not is_shape(inputs[0]):
        # a plain tuple/list is the argument list; a namedtuple (PackedSequence) is one argument
        inputs = tuple(inputs[0])
    kwargs: dict[str, Any] = {}
    if inputs and isinstance(inputs[-1], dict):
        kwargs = dict(inputs[-1])
        inputs = inputs[:-1]
        bad = [k for k in kwargs if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise TorchMagicError(f"keyword inputs need string names; got {bad[0]!r}")
    return tuple(inputs), kwargs


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


def has_inputs(inputs: tuple[Any, ...], input_size: Any = None) -> bool:
    """True when a forward should run: tensors/values or shapes were given."""
    return bool(inputs) or input_size is not None


def prepare_inputs(model: nn.Module, *inputs: Any, input_size: Any = None,
                   dtypes: Sequence[Any] | Any = None, target: torch.device | None = None,
                   move: bool = False) -> PreparedInputs:
    """Turn ``inputs`` / ``input_size`` (see the module docstring) into ``(args, kwargs)``.

    ``target``: the device tensors made from shapes go to (default: the model's device); ``move``:
    also move given tensors there (``meta`` makes shape-only copies, the user's tensors are never
    changed). Raises :class:`TorchMagicError` for both inputs and shapes, bad shapes or dtypes.
    """
    from torch.utils._pytree import tree_flatten

    from torchmagic.core.tracing import tensor_shapes

    if inputs and input_size is not None:
        raise TorchMagicError("give inputs either as tensors or as input_size shapes, not both")
    target = model_device(model) if target is None else torch.device(target)
    if input_size is not None:
        shapes = normalize_shapes(input_size)
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
        gen = torch.Generator().manual_seed(0)
        args: tuple[Any, ...] = tuple(make_tensor(s, d, target, gen) for s, d in zip(shapes, dts))
        kwargs: dict[str, Any] = {}
    else:
        if dtypes is not None:
            raise TorchMagicError("dtypes applies to input shapes only; tensors keep their dtype")
        args, kwargs = split_inputs(inputs)
        if move:
            args, kwargs = to_device((args, kwargs), target)
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    return PreparedInputs(args, kwargs, tensor_shapes((args, kwargs)),
                          [str(t.dtype).replace("torch.", "") for t in leaves],
                          from_shapes=input_size is not None)


__all__ = ["PreparedInputs", "float_dtype", "has_inputs", "is_shape", "make_tensor",
           "model_device", "normal_device", "normalize_shapes", "parse_dtype", "prepare_inputs",
           "split_inputs", "to_device"]
