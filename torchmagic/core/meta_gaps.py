"""Ops whose meta kernel refuses what their real kernels run.

Meta and fake tensors run an op through its *meta kernel* (``torch._meta_registrations``): it
checks the arguments and computes the output's shape and dtype. A few meta kernels are
stricter than the device kernels. ``aten._grouped_mm`` (what transformers 5 runs for
mixture-of-experts layers: Mixtral, Qwen3-MoE, ...) has a meta kernel that accepts only
bfloat16 inputs, while the CPU kernel also multiplies float32. A Mixtral built in the default
float32 on meta then fails with "Expected inputs of BF16 type" before a single FLOP of its
experts is counted.

:class:`MetaKernelGaps` is a ``TorchDispatchMode`` that fills such gaps for meta and fake
arguments only (real tensors go to the real kernel unchanged): it asks the meta kernel for
the output shape with bfloat16 stand-ins on the meta device (no memory, outside every other
mode) and returns an empty tensor of that shape in the dtype the real kernel gives
(``out_dtype``, else the inputs' dtype), made under the modes that are active (a fake tensor
under ``FakeTensorMode``, tracked by a memory tracker like any other output). Counters and
trackers entered after it see the op itself; the FLOP formula of the op reads shapes only, so
counts are those of the real op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

_GROUPED_MM_ARGS = ("self", "mat2", "offs", "bias", "out_dtype")


def _without_data(t: Any) -> bool:
    """A meta tensor or a fake tensor (their ops run through the meta kernel)."""
    if not isinstance(t, torch.Tensor):
        return False
    if t.is_meta:
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _stand_in(t: Any, dtype: torch.dtype | None = None) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device="meta")


def _grouped_mm(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    bound = dict(zip(_GROUPED_MM_ARGS, args, strict=False))
    bound.update(kwargs)
    a, b = bound.get("self"), bound.get("mat2")
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return NotImplemented
    if not (_without_data(a) or _without_data(b)):
        return NotImplemented  # real tensors: the device kernel decides
    if a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16:
        return NotImplemented  # what the meta kernel accepts
    if not (a.is_floating_point() and b.is_floating_point()):
        return NotImplemented
    out_dtype = bound.get("out_dtype") or torch.promote_types(a.dtype, b.dtype)
    bf16 = torch.bfloat16
    with _disable_current_modes():
        shape = func(_stand_in(a, bf16), _stand_in(b, bf16), offs=_stand_in(bound.get("offs")),
                     bias=_stand_in(bound.get("bias"), bf16)).shape
    return torch.empty(shape, dtype=out_dtype, device=a.device)


class MetaKernelGaps(TorchDispatchMode):
    """Run ops whose meta kernel is stricter than the device kernels (see the module docstring);
    every other op passes through unchanged. Enter it inside ``FakeTensorMode`` (which would
    otherwise reach the meta kernel first) and outside FLOP counters and memory trackers (they
    see the op, then its output, as usual)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # no torch._dynamo import for an eager pass-through mode

    def __init__(self) -> None:
        super().__init__()
        self.gaps = {torch.ops.aten._grouped_mm.default: _grouped_mm} \
            if hasattr(torch.ops.aten, "_grouped_mm") else {}
        self.filled = 0  # ops this mode ran in place of their meta kernel

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        fill = self.gaps.get(func)
        if fill is not None:
            out = fill(func, args, kwargs)
            if out is not NotImplemented:
                self.filled += 1
                return out
        return func(*args, **kwargs)


__all__ = ["MetaKernelGaps"]
