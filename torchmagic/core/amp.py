"""Mixed precision you can see: ``torch.autocast`` with checked settings and a dtype report.

torch quietly disables or ignores autocast for bad combinations (``cuda`` without CUDA: a warning and
nothing happens; ``mps``/``xpu``/``cuda:0`` on a machine without them: enters and does nothing;
``float32``: disabled with a warning). :func:`resolve_amp` refuses each with a one-line
:class:`~torchmagic.core.errors.TorchMagicError` and fills in defaults: device = where the models in
play live, else ``cuda`` if available, else ``cpu``; dtype = bfloat16 where supported, else float16.

:func:`amp` is a context manager (``with torchmagic.amp() as run: ...``); with ``report=True`` a
``TorchDispatchMode`` counts ops by the dtype of their *first* output (multi-output ops also return
float32 statistics) and ``run.report`` is an :class:`AmpReport` after the block: ops by dtype, the ops
that stayed float32 and why that is normal (softmax, norms, losses, ops that follow their inputs),
the result's dtype (``run.set_result(value)``), and GradScaler advice when float16 gradients were
computed without a scaler. :class:`AutocastSession` keeps autocast on across IPython cells
(``%amp on``); every autocast setting it or :func:`amp` touches is restored exactly.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from torchmagic.core._result import Result
from torchmagic.core.errors import TorchMagicError

DEVICE_TYPES = ("cuda", "cpu", "mps", "xpu")
_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "torch.bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "torch.float16": torch.float16, "torch.half": torch.float16,
}
_FULL = {"fp32", "float32", "float", "torch.float32", "torch.float", "fp64", "float64", "double",
         "torch.float64", "torch.double", "tf32"}
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_FLOAT_NAMES = {"float16", "bfloat16", "float32", "float64", "complex32", "complex64",
                "complex128", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"}

# Ops autocast runs in lower precision (CPU and CUDA lists, after decomposition to aten).
LOW_PRECISION_OPS = {
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "conv1d", "conv2d", "conv3d",
    "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "cudnn_convolution", "mkldnn_convolution", "mkldnn_rnn_layer", "_scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "scaled_dot_product_attention", "prelu", "addmv", "addr", "chain_matmul", "_lstm_mps", "lstm",
    "gru", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell",
}
# Ops autocast keeps in float32, grouped by why.
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "softmin"}
_NORMS = {"layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "batch_norm",
          "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
          "_batch_norm_with_update", "_batch_norm_no_update", "instance_norm", "rms_norm",
          "_fused_rms_norm", "norm", "linalg_vector_norm", "frobenius_norm", "nuclear_norm",
          "renorm", "normalize"}
_LOSSES = {"nll_loss", "nll_loss_forward", "nll_loss2d", "nll_loss2d_forward", "nll_loss_nd",
           "cross_entropy_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
           "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div", "soft_margin_loss",
           "multilabel_margin_loss", "multilabel_margin_loss_forward", "multi_margin_loss",
           "margin_ranking_loss", "hinge_embedding_loss", "poisson_nll_loss", "cosine_embedding_loss",
           "triplet_margin_loss", "ctc_loss", "_ctc_loss"}
_FP32_MATH = {"exp", "log", "log10", "log2", "log1p", "expm1", "pow", "sum", "prod", "cumsum",
              "cumprod", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "reciprocal", "rsqrt",
              "softplus", "dist", "pdist", "cdist", "logsumexp", "topk", "sort", "polar",
              "grid_sampler", "fft_fft", "fft_ifft", "_fft_r2c", "_fft_c2r", "_fft_c2c",
              "stft", "istft", "cosine_similarity", "mean", "var", "std", "var_mean", "std_mean"}
_BOOKKEEPING = {"detach", "alias", "_local_scalar_dense", "lift_fresh", "empty", "empty_like",
                "empty_strided", "new_empty", "new_empty_strided", "_to_copy"}
_REASONS = {
    "softmax": "softmax: autocast keeps it in float32 (exp needs the range)",
    "norm": "normalization: autocast keeps its statistics in float32 for accuracy",
    "loss": "loss: autocast computes losses in float32",
    "math": "range-sensitive math or reduction: on autocast's float32 list",
    "follows": "not an autocast op: runs in its inputs' dtype (float32, or float32 + low -> float32)",
    "unexpected": "UNEXPECTED: a low-precision op stayed float32 (autocast off in the cell? "
                  "inputs elsewhere?)",
}

GRADSCALER_PATTERN = (
    'scaler = torch.amp.GradScaler("{device}")',
    "scaler.scale(loss).backward()",
    "scaler.step(optimizer)",
    "scaler.update()",
)


# -- settings ---------------------------------------------------------------------------------------
def device_available(device: str) -> bool:
    """Whether autocast on ``device`` (a device type) can do anything on this machine."""
    if device == "cpu":
        return True
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if device == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return False


def _bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return device in ("cpu", "xpu")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` or ``"fp16"``/``"float16"``/``"half"``."""
    if isinstance(dtype, torch.dtype):
        key = str(dtype)
    else:
        key = str(dtype).strip().lower()
    if key in _DTYPES:
        return _DTYPES[key]
    if key in _FULL:
        raise TorchMagicError(f"autocast with {key} does nothing (torch disables it with a "
                              "warning and runs in full precision); use --dtype bf16 or fp16")
    raise TorchMagicError(f"--dtype {dtype!s} is not a low-precision float; use bf16 or fp16")


def _where_modules_live(modules: Iterable[Any]) -> set[str]:
    kinds: set[str] = set()
    for m in modules:
        if isinstance(m, nn.Module):
            for t in (*m.parameters(), *m.buffers()):
                kinds.add(t.device.type)
                break
        elif isinstance(m, torch.Tensor):
            kinds.add(m.device.type)
    return kinds


def models_in(namespace: Mapping[str, Any], names: Iterable[str] | None = None) -> dict[str, Any]:
    """Modules (else tensors) bound in ``namespace``, restricted to ``names`` when given."""
    keys = [n for n in (names if names is not None else namespace)
            if not n.startswith("_") and n not in ("In", "Out") and n in namespace]
    mods = {n: namespace[n] for n in keys if isinstance(namespace[n], nn.Module)}
    if mods:
        return mods
    return {n: namespace[n] for n in keys if isinstance(namespace[n], torch.Tensor)}


def resolve_amp(device: str | None = None, dtype: str | torch.dtype | None = None,
                models: Mapping[str, Any] | None = None) -> tuple[str, torch.dtype]:
    """Check ``device``/``dtype`` and fill defaults; refuse every combination torch would ignore.

    ``models`` (name -> module or tensor) are the models in play: with no ``device``, autocast goes
    where they live. Raises :class:`TorchMagicError` with a one-line reason.
    """
    if device is None:
        kinds = _where_modules_live((models or {}).values())
        named = ", ".join(sorted(models or {})) or "the models"
        if "meta" in kinds and len(kinds) == 1:
            raise TorchMagicError(f"{named} live(s) on the meta device, where there are no values "
                                  "to compute in lower precision; pass --device to run elsewhere")
        kinds.discard("meta")
        if len(kinds) > 1:
            raise TorchMagicError(f"the models in play ({named}) live on {' and '.join(sorted(kinds))}"
                                  "; say which with --device")
        if kinds:
            device = kinds.pop()
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = str(device).strip().lower()
        if re.fullmatch(r"(cuda|xpu|mps|cpu):\d+", device):
            kind = device.split(":")[0]
            raise TorchMagicError(f"--device {device}: autocast takes a device type, not an index "
                                  f"(torch would enter and do nothing); use --device {kind}, which "
                                  f"covers every {kind} device")
        if device == "gpu":
            raise TorchMagicError("--device gpu is not a device type; use cuda (NVIDIA/AMD), "
                                  "mps (Apple) or xpu (Intel)")
        if device == "meta":
            raise TorchMagicError("--device meta: autocast does not run on meta tensors (no values "
                                  "to compute); use cuda, cpu, mps or xpu")
        if device not in DEVICE_TYPES:
            raise TorchMagicError(f"--device {device} is not supported by autocast here; "
                                  f"use one of {', '.join(DEVICE_TYPES)}")
    if not device_available(device):
        check = {"cuda": "torch.cuda.is_available()", "mps": "torch.backends.mps.is_available()",
                 "xpu": "torch.xpu.is_available()"}.get(device, device)
        raise TorchMagicError(f"--device {device}: no {device} device on this machine ({check} is "
                              "False), so torch would silently run without autocast; use "
                              "--device cpu")
    if dtype is None:
        low = torch.bfloat16 if _bf16_supported(device) else torch.float16
    else:
        low = parse_dtype(dtype)
        if low == torch.bfloat16 and device == "cuda" and not torch.cuda.is_bf16_supported():
            raise TorchMagicError("this GPU does not support bfloat16 "
                                  "(torch.cuda.is_bf16_supported() is False); use --dtype fp16")
    _probe(device, low)
    return device, low


def _probe(device: str, dtype: torch.dtype) -> None:
    """Enter autocast once: if torch disables it (with a warning), refuse with its reason."""
    saved = AutocastState.capture()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast(device, dtype=dtype):
                enabled = torch.is_autocast_enabled(device)
    except RuntimeError as exc:
        raise TorchMagicError(f"autocast {device} {SHORT.get(dtype, dtype)} is refused by torch: "
                              + " ".join(str(exc).split()[:30])) from None
    finally:
        saved.restore()
    if not enabled or caught:
        why = " ".join(str(caught[0].message).split()) if caught else "autocast stayed off"
        raise TorchMagicError(f"autocast {device} {SHORT.get(dtype, dtype)} would be disabled by "
                              f"torch ({why[:140]})")


@dataclass
class AutocastState:
    """Autocast settings of every device type torch knows here (restored exactly)."""

    enabled: dict[str, bool]
    dtypes: dict[str, torch.dtype]
    cache: bool

    @classmethod
    def capture(cls) -> AutocastState:
        enabled, dtypes = {}, {}
        for dev in DEVICE_TYPES:
            try:
                enabled[dev] = torch.is_autocast_enabled(dev)
                dtypes[dev] = torch.get_autocast_dtype(dev)
            except (RuntimeError, AttributeError):  # a device type this build does not know
                continue
        return cls(enabled, dtypes, torch.is_autocast_cache_enabled())

    def restore(self) -> None:
        for dev, on in self.enabled.items():
            torch.set_autocast_enabled(dev, on)
            torch.set_autocast_dtype(dev, self.dtypes[dev])
        torch.set_autocast_cache_enabled(self.cache)
        if not any(self.enabled.values()):
            torch.clear_autocast_cache()


# -- the dtype report -------------------------------------------------------------------------------
@dataclass
class OpCount:
    """How often one op produced a first output of one dtype."""

    op: str
    dtype: str
    count: int
    phase: str = "forward"
    reason: str | None = None     # why a forward float32 op is normal (or "UNEXPECTED ...")


@dataclass
class AmpReport(Result):
    """What ran in which dtype under autocast."""

    _display_module: ClassVar[str] = "torchmagic.display.amp"

    device: str
    dtype: str                     # "bfloat16" / "float16"
    ops: list[OpCount] = field(default_factory=list)          # forward ops, most frequent first
    by_dtype: dict[str, int] = field(default_factory=dict)    # forward op calls per output dtype
    float32_ops: list[OpCount] = field(default_factory=list)  # forward float32 ops with reasons
    unexpected: list[str] = field(default_factory=list)       # matmul-class ops left in float32
    casts: int = 0                 # dtype conversions (_to_copy) autocast inserted
    forward_ops: int = 0
    backward_ops: int = 0
    backward_by_dtype: dict[str, int] = field(default_factory=dict)
    result_dtype: str | None = None
    scaler_used: bool | None = None
    advice: list[str] = field(default_factory=list)
    error: str | None = None       # the block's own exception (re-raised by callers)

    @property
    def backward_ran(self) -> bool:
        return self.backward_ops > 0

    @property
    def low_precision_ops(self) -> int:
        return self.by_dtype.get(self.dtype, 0)

    @property
    def floating_ops(self) -> int:
        """Forward ops whose first output is floating point (integer bookkeeping left out, e.g.
        BatchNorm's ``num_batches_tracked += 1`` or ``arange`` positions)."""
        return sum(n for dt, n in self.by_dtype.items() if dt in _FLOAT_NAMES)

    @property
    def other_low_precision(self) -> dict[str, int]:
        """Ops in a low-precision dtype other than the requested one (a nested autocast with
        another dtype, or explicit casts such as ``.half()`` in the code)."""
        return {dt: n for dt, n in self.by_dtype.items()
                if dt in ("bfloat16", "float16") and dt != self.dtype}


def _category(name: str) -> str:
    if name in _SOFTMAX:
        return "softmax"
    if name in _NORMS:
        return "norm"
    if name in _LOSSES:
        return "loss"
    if name in _FP32_MATH:
        return "math"
    if name in LOW_PRECISION_OPS:
        return "unexpected"
    return "follows"


class _DtypeCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.forward: Counter[tuple[str, str]] = Counter()
        self.backward: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        first = out
        while isinstance(first, (tuple, list)) and first:
            first = first[0]
        if isinstance(first, torch.Tensor) and not _is_view(func):
            name = func.overloadpacket.__name__
            counter = self.backward if torch._C._current_autograd_node() is not None \
                else self.forward
            counter[(name, str(first.dtype).replace("torch.", ""))] += 1
        return out


_views: dict[Any, bool] = {}


def _is_view(func: Any) -> bool:
    """True for ops that only return a view of an input (same dtype, no computation)."""
    hit = _views.get(func)
    if hit is None:
        hit = any(r.alias_info is not None and not r.alias_info.is_write
                  for r in func._schema.returns)
        _views[func] = hit
    return hit


def _build_report(device: str, dtype: torch.dtype, counter: _DtypeCounter | None,
                  result: Any, scaler_used: bool | None, error: str | None) -> AmpReport:
    low = str(dtype).replace("torch.", "")
    rep = AmpReport(device=device, dtype=low, scaler_used=scaler_used, error=error)
    if counter is not None:
        rows = []
        for (name, dt), n in counter.forward.items():
            if name == "_to_copy":
                rep.casts += n
                continue
            if name in _BOOKKEEPING:
                continue
            rows.append(OpCount(name, dt, n))
        rows.sort(key=lambda r: (-r.count, r.op))
        rep.ops = rows
        rep.forward_ops = sum(r.count for r in rows)
        by: Counter[str] = Counter()
        for r in rows:
            by[r.dtype] += r.count
        rep.by_dtype = dict(by.most_common())
        for r in rows:
            if r.dtype == "float32":
                cat = _category(r.op)
                r.reason = _REASONS[cat]
                rep.float32_ops.append(r)
                if cat == "unexpected":
                    rep.unexpected.append(r.op)
        rep.float32_ops.sort(key=lambda r: (r.reason or "").startswith("UNEXPECTED"), reverse=True)
        bwd: Counter[str] = Counter()
        for (name, dt), n in counter.backward.items():
            if name not in _BOOKKEEPING:
                bwd[dt] += n
        rep.backward_ops = sum(bwd.values())
        rep.backward_by_dtype = dict(bwd.most_common())
    leaves = [result] if isinstance(result, torch.Tensor) else \
        [v for v in (result if isinstance(result, (tuple, list)) else ()) if isinstance(v, torch.Tensor)]
    if leaves:
        rep.result_dtype = str(leaves[0].dtype).replace("torch.", "")
    if dtype == torch.float16 and rep.backward_ran and not scaler_used:
        rep.advice = [
            "float16 gradients may underflow to zero: backward ran under fp16 autocast "
            "without a GradScaler.",
            "Scale the loss:",
            *(line.format(device=device) for line in GRADSCALER_PATTERN),
        ]
    return rep


# -- the context manager ----------------------------------------------------------------------------
class AmpRun:
    """Context manager returned by :func:`amp`: autocast on the block, ``.report`` after it."""

    def __init__(self, device: str, dtype: torch.dtype, report: bool = True,
                 scaler_used: bool | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self.want_report = report
        self.scaler_used = scaler_used
        self.report: AmpReport | None = None
        self._result: Any = None
        self._state: AutocastState | None = None
        self._ctx: Any = None
        self._counter: _DtypeCounter | None = None

    def set_result(self, value: Any) -> Any:
        """Record the block's result (its dtype goes into the report); returns ``value``."""
        self._result = value
        return value

    def __enter__(self) -> AmpRun:
        self._state = AutocastState.capture()
        try:
            self._ctx = torch.autocast(self.device, dtype=self.dtype)
            self._ctx.__enter__()
            if self.want_report:
                self._counter = _DtypeCounter()
                self._counter.__enter__()
        except BaseException:
            self._unwind()
            raise
        return self

    def _unwind(self) -> None:
        try:
            if self._counter is not None:
                self._counter.__exit__(None, None, None)
        finally:
            try:
                if self._ctx is not None:
                    self._ctx.__exit__(None, None, None)
            finally:
                self._ctx = None
                if self._state is not None:
                    self._state.restore()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        counter = self._counter
        self._unwind()
        self._counter = None
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            return False
        if self.want_report:
            err = None
            if exc is not None:
                msg = " ".join(str(exc).split())
                err = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
            self.report = _build_report(self.device, self.dtype, counter, self._result,
                                        self.scaler_used, err)
        return False


def amp(device: str | None = None, dtype: str | torch.dtype | None = None, *,
        report: bool = True, models: Mapping[str, Any] | Iterable[Any] | None = None,
        scaler_used: bool | None = None) -> AmpRun:
    """Autocast with checked settings: ``with torchmagic.amp(models={"m": m}) as run: out = m(x)``.

    ``device``/``dtype`` default as in :func:`resolve_amp` (``models``: the modules or tensors in
    play). Bad combinations raise :class:`TorchMagicError` instead of silently doing nothing. After
    the block ``run.report`` is an :class:`AmpReport` (``run.set_result(out)`` adds the result's
    dtype); ``scaler_used`` tells whether a GradScaler scaled the loss (for the fp16 advice).
    """
    if models is not None and not isinstance(models, Mapping):
        models = {f"model{i}": m for i, m in enumerate(models)}
    dev, low = resolve_amp(device, dtype, models)
    return AmpRun(dev, low, report=report, scaler_used=scaler_used)


# -- autocast across cells (%amp on) ----------------------------------------------------------------
class AutocastSession:
    """Autocast on for every following cell: ``pre``/``post`` are the pre/post_run_cell callbacks.

    ``pre`` enters a ``torch.autocast`` context for the cell and ``post`` exits it, so each cell
    ends with the autocast state it started with, whatever it did in between. ``start`` and
    ``stop`` only say whether the *next* cells get one: they never set or restore the autocast
    state themselves, so ``%amp on``/``%amp off`` nest in any order with ``%%amp`` cells and the
    user's own ``with torch.autocast(...)`` blocks (the rest of the cell that runs ``%amp off``
    keeps its context until the cell ends; ``%amp on`` starts with the next cell). Cells nest (a
    cell run from inside a cell fires ``pre`` again): contexts are a stack, and a ``post`` with no
    matching ``pre`` does nothing.
    """

    def __init__(self) -> None:
        self.device: str | None = None
        self.dtype: torch.dtype | None = None
        self._open: list[Any] = []
        self._on_drained: Any = None  # called once the last open context is closed

    @property
    def active(self) -> bool:
        return self.device is not None

    @property
    def open_cells(self) -> int:
        """Cells running now that entered autocast in ``pre`` (their ``post`` closes it)."""
        return len(self._open)

    def start(self, device: str, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self._on_drained = None

    def pre(self, *_: Any) -> None:
        if self.device is None:
            return
        ctx = torch.autocast(self.device, dtype=self.dtype)
        ctx.__enter__()
        self._open.append(ctx)

    def post(self, *_: Any) -> None:
        if self._open:
            self._open.pop().__exit__(None, None, None)
        if not self._open and self._on_drained is not None:
            done, self._on_drained = self._on_drained, None
            done()

    def stop(self, on_drained: Any = None) -> bool:
        """No autocast for the next cells; True if it was on. ``on_drained`` is called when no
        cell with an open context is left (at once when none is running)."""
        was = self.active
        self.device = self.dtype = None
        if self._open:
            self._on_drained = on_drained
        elif on_drained is not None:
            on_drained()
        return was


__all__ = ["AmpReport", "AmpRun", "AutocastSession", "AutocastState", "OpCount", "amp",
           "models_in", "parse_dtype", "resolve_amp"]
