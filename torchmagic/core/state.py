"""Save and restore global torch state around anything torchmagic runs.

Invariant 1 of the project: the user's global torch state (default device and dtype, grad mode,
inference mode is read-only here, anomaly mode, autocast, RNG) is the same after a magic as before,
on success, on an exception and on KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

_AUTOCAST_DEVICES = ("cpu", "cuda")


def _mode_stack() -> list[Any]:
    from torch.overrides import _get_current_function_mode_stack

    return list(_get_current_function_mode_stack())


def default_device() -> torch.device:
    """The device factory functions use now (honours ``with torch.device(...)``)."""
    return torch.empty(0).device


@dataclass
class GlobalState:
    """A snapshot of torch's process-wide settings."""

    default_dtype: torch.dtype
    grad_enabled: bool
    anomaly_enabled: bool
    anomaly_check_nan: bool
    autocast: dict[str, tuple[bool, torch.dtype]]
    autocast_cache: bool
    rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    function_modes: list[Any]
    # torch.set_default_device's bookkeeping (torch._GLOBAL_DEVICE_CONTEXT.device_context and
    # torch.utils._device.CURRENT_DEVICE): restoring the mode stack alone leaves a stale context
    # there, and the user's next set_default_device(None) would then leave meta as the default.
    device_context: Any = None
    current_device: Any = None

    @classmethod
    def capture(cls) -> GlobalState:
        autocast = {}
        for dev in _AUTOCAST_DEVICES:
            autocast[dev] = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        cuda_rng = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_rng = torch.cuda.get_rng_state_all()
        return cls(
            default_dtype=torch.get_default_dtype(),
            grad_enabled=torch.is_grad_enabled(),
            anomaly_enabled=torch.is_anomaly_enabled(),
            anomaly_check_nan=torch.is_anomaly_check_nan_enabled(),
            autocast=autocast,
            autocast_cache=torch.is_autocast_cache_enabled(),
            rng=torch.get_rng_state(),
            cuda_rng=cuda_rng,
            function_modes=_mode_stack(),
            device_context=getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", _UNSET),
            current_device=_current_device(),
        )

    def restore(self) -> None:
        """Put every captured setting back (idempotent)."""
        torch.set_default_dtype(self.default_dtype)
        torch.set_grad_enabled(self.grad_enabled)
        torch.autograd.set_detect_anomaly(self.anomaly_enabled, self.anomaly_check_nan)
        for dev, (enabled, dtype) in self.autocast.items():
            torch.set_autocast_enabled(dev, enabled)
            torch.set_autocast_dtype(dev, dtype)
        torch.set_autocast_cache_enabled(self.autocast_cache)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        _restore_mode_stack(self.function_modes)
        _restore_device_context(self.device_context, self.current_device)

    def diff(self, other: GlobalState) -> list[str]:
        """Names of the settings that differ between two snapshots (for tests and checks)."""
        out = []
        for name in ("default_dtype", "grad_enabled", "anomaly_enabled", "anomaly_check_nan",
                     "autocast", "autocast_cache"):
            if getattr(self, name) != getattr(other, name):
                out.append(name)
        if not torch.equal(self.rng, other.rng):
            out.append("rng")
        if (self.cuda_rng is None) != (other.cuda_rng is None) or (
            self.cuda_rng is not None
            and any(not torch.equal(a, b) for a, b in zip(self.cuda_rng, other.cuda_rng))
        ):
            out.append("cuda_rng")
        if [id(m) for m in self.function_modes] != [id(m) for m in other.function_modes]:
            out.append("function_modes (default device)")
        if self.device_context is not other.device_context or \
                self.current_device != other.current_device:
            out.append("set_default_device context")
        return out


_UNSET = object()


def _current_device() -> Any:
    import torch.utils._device as _device

    return getattr(_device, "CURRENT_DEVICE", None)


def _restore_device_context(context: Any, current: Any) -> None:
    """Put back ``set_default_device``'s global context object and ``CURRENT_DEVICE``."""
    import torch.utils._device as _device

    holder = torch._GLOBAL_DEVICE_CONTEXT
    if context is _UNSET:
        if hasattr(holder, "device_context"):
            del holder.device_context
    else:
        holder.device_context = context
    if hasattr(_device, "CURRENT_DEVICE"):
        _device.CURRENT_DEVICE = current


def _restore_mode_stack(saved: list[Any]) -> None:
    """Pop torch-function modes (e.g. a DeviceContext left by ``set_default_device``) pushed since."""
    from torch.overrides import _pop_mode, _push_mode

    current = _mode_stack()
    if [id(m) for m in current] == [id(m) for m in saved]:
        return
    # Find the common prefix, pop everything above it, push back what was saved.
    keep = 0
    while keep < min(len(current), len(saved)) and current[keep] is saved[keep]:
        keep += 1
    for _ in range(len(current) - keep):
        _pop_mode()
    for mode in saved[keep:]:
        _push_mode(mode)


@contextlib.contextmanager
def preserved_global_state() -> Iterator[GlobalState]:
    """Run a block and put every global torch setting back afterwards, however it exits."""
    saved = GlobalState.capture()
    try:
        yield saved
    finally:
        saved.restore()


@contextlib.contextmanager
def preserved_training_flags(model: nn.Module) -> Iterator[None]:
    """Save each module's ``training`` flag and restore it exactly (no ``.train()``/``.eval()``)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def set_mode(model: nn.Module, mode: str) -> None:
    """Set training flags for ``mode`` in {"same", "eval", "train"} (call inside
    :func:`preserved_training_flags`)."""
    if mode == "same":
        return
    flag = mode == "train"
    for m in model.modules():
        m.training = flag
