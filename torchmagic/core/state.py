"""Save and restore global torch state around anything torchmagic runs.

Invariant 1 of the project: the user's global torch state (default device and dtype, grad mode,
inference mode is read-only here, anomaly mode, autocast, RNG, thread counts, deterministic
algorithms, float32 matmul precision and the TF32 / reduced-precision / cuDNN / oneDNN / SDPA backend
flags) is the same after a magic as before, on success, on an exception and on KeyboardInterrupt.

The float32 precision settings are captured through torch's per-backend ``fp32_precision`` values
(``torch.backends.cuda.matmul.fp32_precision``...), which the legacy setters
(``torch.set_float32_matmul_precision``, ``torch.backends.cuda.matmul.allow_tf32``,
``torch.backends.cudnn.allow_tf32``) write through: restoring those values restores both APIs, and
reading them never raises (the legacy getters raise once both APIs were mixed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

_AUTOCAST_DEVICES = ("cpu", "cuda")

# (backend, op) pairs of torch's fp32_precision settings (generic only has "all").
_FP32_PAIRS = (("generic", "all"), ("cuda", "all"), ("cuda", "matmul"), ("cuda", "conv"),
               ("cuda", "rnn"), ("mkldnn", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"),
               ("mkldnn", "rnn"))
# Independent backend flags: name -> (torch._C getter, torch._C setter). A tuple value is passed
# to the setter spread out. Flags this torch build lacks are skipped.
_FLAGS = {
    "cuda.matmul.allow_fp16_reduced_precision_reduction": (
        "_get_cublas_allow_fp16_reduced_precision_reduction",
        "_set_cublas_allow_fp16_reduced_precision_reduction"),
    "cuda.matmul.allow_bf16_reduced_precision_reduction": (
        "_get_cublas_allow_bf16_reduced_precision_reduction",
        "_set_cublas_allow_bf16_reduced_precision_reduction"),
    "cuda.matmul.allow_fp16_accumulation": ("_get_cublas_allow_fp16_accumulation",
                                            "_set_cublas_allow_fp16_accumulation"),
    "cudnn.enabled": ("_get_cudnn_enabled", "_set_cudnn_enabled"),
    "cudnn.benchmark": ("_get_cudnn_benchmark", "_set_cudnn_benchmark"),
    "cudnn.deterministic": ("_get_cudnn_deterministic", "_set_cudnn_deterministic"),
    "mkldnn.enabled": ("_get_mkldnn_enabled", "_set_mkldnn_enabled"),
    "mkldnn.deterministic": ("_get_mkldnn_deterministic", "_set_mkldnn_deterministic"),
    "cuda.flash_sdp": ("_get_flash_sdp_enabled", "_set_sdp_use_flash"),
    "cuda.mem_efficient_sdp": ("_get_mem_efficient_sdp_enabled", "_set_sdp_use_mem_efficient"),
    "cuda.math_sdp": ("_get_math_sdp_enabled", "_set_sdp_use_math"),
    "cuda.cudnn_sdp": ("_get_cudnn_sdp_enabled", "_set_sdp_use_cudnn"),
    "cuda.math_sdp_allow_fp16_bf16_reduction": ("_get_math_sdp_allow_fp16_bf16_reduction",
                                                "_set_math_sdp_allow_fp16_bf16_reduction"),
    "deterministic_fill_uninitialized_memory": ("_get_deterministic_fill_uninitialized_memory",
                                                "_set_deterministic_fill_uninitialized_memory"),
}


def _legacy_matmul_precision() -> str | None:
    """torch's legacy float32 matmul precision (a variable of its own beside the fp32_precision
    values). Its getter raises when both APIs were mixed; the value is then read with the two
    matmul precisions it is checked against set to "ieee" for a moment (and put back)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        pass
    C = torch._C
    pairs = (("cuda", "matmul"), ("mkldnn", "matmul"))
    saved = [C._get_fp32_precision_getter(b, o) for b, o in pairs]
    try:
        for b, o in pairs:
            C._set_fp32_precision_setter(b, o, "ieee")
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None
    finally:
        for (b, o), v in zip(pairs, saved):
            C._set_fp32_precision_setter(b, o, v)


def _legacy_cudnn_tf32() -> bool | None:
    """torch's legacy cuDNN TF32 flag (``torch.backends.cudnn.allow_tf32``), read the same way:
    its getter raises unless the conv and rnn precisions agree with it."""
    C = torch._C
    try:
        return bool(C._get_cudnn_allow_tf32())
    except RuntimeError:
        pass
    pairs = (("cuda", "conv"), ("cuda", "rnn"))
    saved = [C._get_fp32_precision_getter(b, o) for b, o in pairs]
    try:
        for b, o in pairs:
            C._set_fp32_precision_setter(b, o, "tf32")
        try:
            C._get_cudnn_allow_tf32()
            return True
        except RuntimeError:
            return False
    finally:
        for (b, o), v in zip(pairs, saved):
            C._set_fp32_precision_setter(b, o, v)


def _backend_flags() -> dict[str, Any]:
    """The float32 precision settings and backend flags (see the module docstring)."""
    C = torch._C
    out: dict[str, Any] = {}
    getter = getattr(C, "_get_fp32_precision_getter", None)
    if getter is not None:
        out["float32_matmul_precision"] = _legacy_matmul_precision()
        out["cudnn.allow_tf32"] = _legacy_cudnn_tf32()
        for backend, op in _FP32_PAIRS:
            try:
                out[f"fp32_precision[{backend}.{op}]"] = getter(backend, op)
            except (RuntimeError, TypeError):
                continue
    else:  # older torch: the legacy settings are the whole state
        out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        out["cudnn.allow_tf32"] = bool(C._get_cudnn_allow_tf32())
        out["cuda.matmul.allow_tf32"] = bool(C._get_cublas_allow_tf32())
    for name, (get, set_) in _FLAGS.items():
        fn = getattr(C, get, None)
        if fn is not None and hasattr(C, set_):
            try:
                out[name] = fn()
            except RuntimeError:
                continue
    return out


def _restore_backend_flags(saved: dict[str, Any]) -> None:
    """Put the settings of :func:`_backend_flags` back: the legacy values first (their setters
    also write fp32_precision values), then every fp32_precision value, then the flags."""
    C = torch._C
    now = _backend_flags()
    if now == saved:
        return
    if saved.get("float32_matmul_precision") is not None:
        C._set_float32_matmul_precision(saved["float32_matmul_precision"])
    if saved.get("cudnn.allow_tf32") is not None:
        C._set_cudnn_allow_tf32(saved["cudnn.allow_tf32"])
    if "cuda.matmul.allow_tf32" in saved:
        C._set_cublas_allow_tf32(saved["cuda.matmul.allow_tf32"])
    for name, value in saved.items():
        if name.startswith("fp32_precision["):
            backend, op = name[len("fp32_precision["):-1].split(".")
            C._set_fp32_precision_setter(backend, op, value)
        elif name in _FLAGS and now.get(name) != value:
            setter = getattr(C, _FLAGS[name][1])
            if isinstance(value, tuple):
                setter(*value)
            else:
                setter(value)


def _set_interop_threads(n: int) -> None:
    """``torch.set_num_interop_threads`` works once, before any inter-op work; later it raises.
    Then the count cannot have changed either (except by that one call): nothing to undo."""
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass


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
    num_threads: int = 0
    interop_threads: int = 0
    deterministic: tuple[bool, bool] = (False, False)  # (use_deterministic_algorithms, warn_only)
    backend_flags: dict[str, Any] | None = None

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
            num_threads=torch.get_num_threads(),
            interop_threads=torch.get_num_interop_threads(),
            deterministic=(torch.are_deterministic_algorithms_enabled(),
                           torch.is_deterministic_algorithms_warn_only_enabled()),
            backend_flags=_backend_flags(),
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
        if self.num_threads and torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        if self.interop_threads and torch.get_num_interop_threads() != self.interop_threads:
            _set_interop_threads(self.interop_threads)
        if (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled()) != self.deterministic:
            torch.use_deterministic_algorithms(self.deterministic[0],
                                               warn_only=self.deterministic[1])
        if self.backend_flags is not None:
            _restore_backend_flags(self.backend_flags)

    def diff(self, other: GlobalState) -> list[str]:
        """Names of the settings that differ between two snapshots (for tests and checks)."""
        out = []
        for name in ("default_dtype", "grad_enabled", "anomaly_enabled", "anomaly_check_nan",
                     "autocast", "autocast_cache", "num_threads", "interop_threads"):
            if getattr(self, name) != getattr(other, name):
                out.append(name)
        if self.deterministic != other.deterministic:
            out.append("deterministic algorithms (use_deterministic_algorithms, warn_only)")
        mine, theirs = self.backend_flags or {}, other.backend_flags or {}
        for name in sorted(set(mine) | set(theirs)):
            if mine.get(name) != theirs.get(name):
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


@contextlib.contextmanager
def quiet_fake_tensor_log() -> Iterator[None]:
    """Silence torch's fake-tensor logger for a run: ``FakeTensorMode`` logs every failing meta
    kernel with its traceback at ERROR level (spilled on the notebook's stderr, and the log
    record's traceback keeps the frames, hence the user's model, alive) before the exception
    propagates; torchmagic reports the failure in one line instead. The level is restored."""
    import logging

    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
