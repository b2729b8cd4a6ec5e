"""Forward FLOPs per module call, counted per aten op and corrected where torch's counter is blind.

Convention (torch's ``torch.utils.flop_counter``): 2 FLOPs per multiply-add of matrix products and
convolutions (``mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions, attention); bias additions, norms,
activations and other element-wise ops count 0. MACs are FLOPs / 2.

:class:`FlopCounter` is a ``TorchDispatchMode`` that looks every aten op up in torch's own formula
table (``flop_counter.flop_registry``) plus the formulas torch lacks:

- ``aten._scaled_dot_product_flash_attention_for_cpu`` (what ``F.scaled_dot_product_attention`` runs
  on CPU) and the XPU/"overrideable" fused attention: ``flop_counter.sdpa_flop_count``;
- ``aten._native_multi_head_attention`` (``nn.MultiheadAttention``'s fast path): input, key and value
  projections, QKᵀ, AV and the output projection.

and adds each count to every module call running at that moment (a :class:`ModuleTracer`'s stack),
so a row's FLOPs include its submodules'. Recurrent modules (``nn.LSTM``/``GRU``/``RNN`` with
``num_layers``, ``bidirectional``, ``proj_size``, packed sequences, and the ``*Cell`` modules) run
fused kernels torch counts as 0 (``mkldnn_rnn_layer``) or only partly; their count is replaced, when
the call ends, by the analytic matmul count :func:`rnn_flops` (the difference is propagated to the
enclosing calls and to the total).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from torchmagic.core.tracing import ModuleCall, ModuleTracer

_registry: dict[Any, Any] | None = None


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape)


def _sdpa_cpu_flop(query: Any, key: Any, value: Any, *args: Any, out_val: Any = None,
                   **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(_shape(query), _shape(key), _shape(value)))


def _native_mha_flop(query: Any, key: Any, value: Any, embed_dim: int, num_head: int,
                     *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """``_native_multi_head_attention``: (B, L, E) query, (B, S, E) key/value (or unbatched)."""
    q, k, v = _shape(query), _shape(key), _shape(value)
    if len(q) == 2:
        q, k, v = (1, *q), (1, *k), (1, *v)
    b, tq, e = q
    tk = k[1]
    proj = 2 * b * (tq * e * embed_dim + tk * k[2] * embed_dim + tk * v[2] * embed_dim)
    attn = 2 * 2 * b * tq * tk * embed_dim
    out = 2 * b * tq * embed_dim * embed_dim
    return int(proj + attn + out)


def flop_registry() -> dict[Any, Any]:
    """torch's formula table plus torchmagic's additions, keyed by ``OpOverloadPacket``."""
    global _registry
    if _registry is None:
        from torch.utils.flop_counter import flop_registry as torch_registry

        aten = torch.ops.aten
        reg = dict(torch_registry)
        for name in ("_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_fused_attention_overrideable"):
            packet = getattr(aten, name, None)
            if packet is not None and packet not in reg:
                reg[packet] = _sdpa_cpu_flop
        if hasattr(aten, "_native_multi_head_attention"):
            reg.setdefault(aten._native_multi_head_attention, _native_mha_flop)
        _registry = reg
    return _registry


# -- recurrent modules ---------------------------------------------------------------------------
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def rnn_token_flops(module: nn.Module) -> int | None:
    """Matmul FLOPs per token (per batch element per time step) of a recurrent module, or None.

    ``nn.LSTM``/``GRU``/``RNN``: for each layer and direction, input-to-hidden ``2·G·H·in`` plus
    hidden-to-hidden ``2·G·H·H_out`` (G gates: 4 LSTM, 3 GRU, 1 RNN; ``H_out = proj_size or H``),
    plus the LSTM projection ``2·H·proj_size``; layer 0 reads ``input_size``, later layers
    ``directions·H_out``. ``*Cell`` modules: ``2·G·H·(input_size + H)`` per batch element.
    """
    if isinstance(module, nn.RNNBase):
        g = _GATES.get(module.mode)
        if g is None:
            return None
        h = module.hidden_size
        p = getattr(module, "proj_size", 0) or 0
        h_out = p or h
        dirs = 2 if module.bidirectional else 1
        total = 0
        for layer in range(module.num_layers):
            inp = module.input_size if layer == 0 else dirs * h_out
            per_dir = 2 * g * h * (inp + h_out) + (2 * h * p if p else 0)
            total += dirs * per_dir
        return total
    if isinstance(module, nn.RNNCellBase):
        g = 4 if isinstance(module, nn.LSTMCell) else 3 if isinstance(module, nn.GRUCell) else 1
        return 2 * g * module.hidden_size * (module.input_size + module.hidden_size)
    return None


def rnn_tokens(module: nn.Module, output_shapes: list[tuple[int, ...]]) -> int | None:
    """Batch elements x time steps a recurrent call processed, read from its first output
    (a packed sequence's data is ``(tokens, features)``, so packing is handled)."""
    if not output_shapes:
        return None
    out = output_shapes[0]
    if isinstance(module, nn.RNNCellBase):
        return out[0] if len(out) == 2 else 1
    if len(out) == 3:
        return out[0] * out[1]
    if len(out) == 2:  # unbatched (L, D*H_out) or packed data (tokens, D*H_out)
        return out[0]
    return None


def rnn_flops(module: nn.Module, output_shapes: list[tuple[int, ...]]) -> int | None:
    """Analytic forward FLOPs of one recurrent call (see :func:`rnn_token_flops`)."""
    per = rnn_token_flops(module)
    tokens = rnn_tokens(module, output_shapes)
    if per is None or tokens is None:
        return None
    return int(per * tokens)


_SKIP = None


def _skip_ops() -> set[Any]:
    global _SKIP
    if _SKIP is None:
        aten = torch.ops.aten
        _SKIP = {aten.sym_is_contiguous.default, aten.is_contiguous.default,
                 aten.is_contiguous.memory_format, aten.is_strides_like_format.default,
                 aten.is_non_overlapping_and_dense.default, aten.size.default,
                 aten.sym_size.default, aten.stride.default, aten.sym_stride.default,
                 aten.storage_offset.default, aten.sym_storage_offset.default,
                 aten.numel.default, aten.sym_numel.default, aten.dim.default,
                 torch.ops.prim.layout.default}
    return _SKIP


class FlopCounter(TorchDispatchMode):
    """Count forward FLOPs per module call of ``tracer`` (use inside :func:`trace_modules`).

    ``by_call[i]`` holds the FLOPs of ``tracer.calls[i]`` (its submodules included); ``total`` all
    FLOPs counted. Install it as ``with FlopCounter(tracer):`` around the forward.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in torch._dynamo.disable, which imports dynamo
        # on the first op (~1.5 s). This mode only counts during eager forwards; the subclass
        # below keeps torch's wrapping for sessions that already use dynamo (torch.compile).
        return False

    def __init__(self, tracer: ModuleTracer) -> None:
        super().__init__()
        self.tracer = tracer
        self.registry = flop_registry()
        self.skip = _skip_ops()
        self.by_call: list[int] = []
        self.total = 0
        tracer.on_enter.append(self._enter)
        tracer.on_exit.append(self._exit)

    def _enter(self, call: ModuleCall) -> None:
        self.by_call.append(0)

    def _exit(self, call: ModuleCall) -> None:
        module = self.tracer.module_of(call)
        if module is None or not isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
            return
        exact = rnn_flops(module, call.output_shapes or [])
        if exact is None:
            return
        delta = exact - self.by_call[call.index]
        if delta:
            self.by_call[call.index] = exact
            for i in self.tracer.stack:
                self.by_call[i] += delta
            self.total += delta
        call.extra["flops_analytic"] = True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in self.skip:
            return NotImplemented
        packet = func._overloadpacket
        formula = self.registry.get(packet)
        if formula is None:
            # Run the op as eager would. (torch's FlopCounterMode first tries the op's Python
            # decomposition; eager never uses those, and every matmul-like op reaching this mode
            # has a formula, so counting is the same and BatchNorm & co. stay fast.)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        n = int(formula(*args, **kwargs, out_val=out))
        if n:
            self.total += n
            by_call = self.by_call
            for i in self.tracer.stack:
                by_call[i] += n
        return out


class _DynamoSafeFlopCounter(FlopCounter):
    """:class:`FlopCounter` with torch's default ``torch._dynamo.disable`` wrapping."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return True

    __torch_dispatch__ = FlopCounter.__torch_dispatch__


def flop_counter(tracer: ModuleTracer) -> FlopCounter:
    """A :class:`FlopCounter` for ``tracer``; avoids importing ``torch._dynamo`` unless the
    session already has it (then the mode is wrapped the way torch wraps every dispatch mode)."""
    import sys

    cls = _DynamoSafeFlopCounter if "torch._dynamo" in sys.modules else FlopCounter
    return cls(tracer)


__all__ = ["FlopCounter", "flop_counter", "flop_registry", "rnn_flops", "rnn_token_flops"]
