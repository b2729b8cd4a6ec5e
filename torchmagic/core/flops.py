"""Forward FLOPs per module call, counted per aten op and corrected where torch's counter is blind.

Convention (torch's ``torch.utils.flop_counter``): 2 FLOPs per multiply-add of matrix products and
convolutions (``mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions, attention); bias additions, norms,
activations and other element-wise ops count 0. MACs are FLOPs / 2.

:class:`FlopCounter` is a ``TorchDispatchMode`` that looks every op up in torch's own formula
table (``flop_counter.flop_registry``) plus the formulas torch lacks (:func:`flop_registry`):

- attention: ``aten._scaled_dot_product_flash_attention_for_cpu`` (what
  ``F.scaled_dot_product_attention`` runs on CPU) and the XPU/"overrideable" fused attention
  (``flop_counter.sdpa_flop_count``); ``aten._native_multi_head_attention``
  (``nn.MultiheadAttention``'s fast path): input, key and value projections, QKᵀ, AV and the
  output projection;
- mixture-of-experts: ``aten._grouped_mm`` and ``aten._scaled_grouped_mm`` (what transformers 5 runs
  its experts with): 2·M·K·N over the *routed* rows only (the ``offs`` argument's last offset when
  its values can be read; the rows given otherwise, on meta);
- every other matmul-like op: ``linear``/``matmul`` (reached directly inside nested tensors),
  in-place ``addmm_``/``baddbmm_``, ``addbmm``, ``addmv``, ``mv``, ``dot``, ``addr``, ``_int_mm``,
  weight-only quantized kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm*``,
  ``_dyn_quant_matmul_4bit``), ``_scaled_mm_v2`` and the semi-structured sparse ones;
- quantized modules (``torch.ao.nn.quantized`` and ``.dynamic``): ``quantized::linear*`` (static,
  dynamic, fp16) and ``quantized::conv*`` / ``conv_transpose*`` (kernel read from the packed
  weight).

Each count is added to every module call running at that moment (a :class:`ModuleTracer`'s
stack), so a row's FLOPs include its submodules'. Recurrent modules (``nn.LSTM``/``GRU``/``RNN``
with ``num_layers``, ``bidirectional``, ``proj_size``, packed sequences, the ``*Cell`` modules and
their dynamic quantized versions) run fused kernels torch counts as 0 (``mkldnn_rnn_layer``,
``quantized_lstm``) or only partly; their count is replaced, when the call ends, by the analytic
matmul count :func:`rnn_flops` (the difference is propagated to the enclosing calls and to the
total).

Never a silent zero: an op without a formula that multiplies and adds (its name says matmul,
conv, linear, attention, grouped mm, RNN ...) or a custom op (outside torch's own namespaces) is
recorded in :attr:`FlopCounter.uncounted` with the module call it ran in, so the report can say
which FLOPs are missing. Ops on tensor subclasses without a formula (nested tensors, weight-only
quantized wrappers) are handed to the subclass, whose own ops are then counted.
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


def _contract(a: Any, out: Any) -> int:
    """2 x output elements x contracted size (the last dimension of ``a``): mm, bmm, matmul,
    linear, mv, dot, int8/int4 weight-only kernels."""
    k = a.shape[-1] if a.dim() else 1
    return 2 * int(out.numel()) * int(k)


def _first_tensor_out(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


def _linear_flop(x: Any, w: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return _contract(x, _first_tensor_out(out_val))


def _mm_like_flop(a: Any, b: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return _contract(a, _first_tensor_out(out_val))


def _addmm_like_flop(bias: Any, a: Any, b: Any, *args: Any, out_val: Any = None,
                     **kwargs: Any) -> int:
    """``addmm_``, ``baddbmm_``, ``addbmm`` (batch summed: 2·B·M·K·N), ``addmv``, ``addr``."""
    if a.dim() == 3:  # (b)addbmm: batches of (M, K) @ (K, N)
        return 2 * int(a.shape[0]) * int(a.shape[1]) * int(a.shape[2]) * int(b.shape[-1])
    if a.dim() == 1 and b.dim() == 1:  # addr: outer product
        return 2 * int(a.shape[0]) * int(b.shape[0])
    return _contract(a, _first_tensor_out(out_val))


def _kdim_of_b_flop(a: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """Sparse semi-structured ``mm``/``addmm``/``_cslt_sparse_mm``: the dense ``mat2``'s rows are the
    contracted size (the compressed operand's shape is not the logical one)."""
    dense = [t for t in args if isinstance(t, torch.Tensor) and t.dim() == 2]
    out = _first_tensor_out(out_val)
    if not dense:
        return 0
    return 2 * int(out.numel()) * int(dense[-1].shape[0])


def _dyn_quant_4bit_flop(inp: Any, packed: Any, block_size: int, in_features: int,
                         out_features: int, *args: Any, out_val: Any = None, **kw: Any) -> int:
    return 2 * int(_first_tensor_out(out_val).numel()) * int(in_features)


def _routed(offs: Any) -> int | None:
    """The last offset of a grouped matmul's ``offs`` (the rows actually routed to an expert),
    when its value can be read (not on meta or fake tensors)."""
    if offs is None or not isinstance(offs, torch.Tensor) or offs.numel() == 0:
        return None
    if offs.is_meta or type(offs) is not torch.Tensor:
        return None
    try:
        return int(offs[-1].item())
    except Exception:  # noqa: BLE001 - unreadable: the full size is used
        return None


def grouped_mm_flops(a_shape: tuple[int, ...], b_shape: tuple[int, ...],
                     routed: int | None = None) -> int:
    """FLOPs of ``aten._grouped_mm(a, b, offs)`` (2 per multiply-add), ``routed`` = ``offs[-1]``:

    - 2-D x 3-D (the mixture-of-experts forward: tokens sorted by expert, ``(M, K) @ (G, K, N)``,
      ``offs`` along M): ``2 · routed · K · N``;
    - 3-D x 2-D (``(G, M, K) @ (K, N)``, ``offs`` along N): ``2 · M · K · routed``;
    - 2-D x 2-D (``(M, K) @ (K, N)``, ``offs`` along K, a weight gradient): ``2 · M · routed · N``;
    - 3-D x 3-D (batched, no ``offs``): ``2 · G · M · K · N``.

    Without ``routed`` the full size of the ragged dimension is used."""
    a, b = a_shape, b_shape
    if len(a) == 2 and len(b) == 3:
        return 2 * (a[0] if routed is None else routed) * a[1] * b[2]
    if len(a) == 3 and len(b) == 2:
        return 2 * a[1] * a[2] * (b[1] if routed is None else routed)
    if len(a) == 2 and len(b) == 2:
        return 2 * a[0] * (a[1] if routed is None else routed) * b[1]
    if len(a) == 3 and len(b) == 3:
        return 2 * a[0] * a[1] * a[2] * b[2]
    raise ValueError(f"unexpected grouped mm shapes {a} @ {b}")


def _grouped_mm_flop(a: Any, b: Any, offs: Any = None, *args: Any, out_val: Any = None,
                     **kwargs: Any) -> int:
    return grouped_mm_flops(_shape(a), _shape(b), _routed(kwargs.get("offs", offs)))


def _scaled_grouped_mm_flop(a: Any, b: Any, scale_a: Any = None, scale_b: Any = None,
                            offs: Any = None, *args: Any, out_val: Any = None,
                            **kwargs: Any) -> int:
    return grouped_mm_flops(_shape(a), _shape(b), _routed(kwargs.get("offs", offs)))


def _quantized_conv_flop(x: Any, packed: Any, *args: Any, out_val: Any = None,
                         **kwargs: Any) -> int:
    """``quantized::conv{1,2,3}d`` (+relu/add) and ``conv_transpose*``: the kernel comes from
    the packed weight (``unpack()``): ``(C_out, C_in/groups, *k)`` for a conv,
    ``(C_in, C_out/groups, *k)`` for a transposed one."""
    weight = packed.unpack()[0]
    per = 1
    for d in weight.shape[1:]:
        per *= int(d)
    transposed = False
    try:
        transposed = bool(packed.transpose())
    except Exception:  # noqa: BLE001 - older packed objects: not transposed
        transposed = False
    ref = x if transposed else _first_tensor_out(out_val)
    return 2 * int(ref.numel()) * per


_QUANTIZED_LINEAR = ("linear", "linear_relu", "linear_dynamic", "linear_relu_dynamic",
                     "linear_dynamic_fp16", "linear_relu_dynamic_fp16",
                     "linear_dynamic_fp16_unpacked_weight", "linear_leaky_relu", "linear_tanh")
_QUANTIZED_CONV = ("conv1d", "conv2d", "conv3d", "conv1d_relu", "conv2d_relu", "conv3d_relu",
                   "conv2d_add", "conv2d_add_relu", "conv_transpose1d", "conv_transpose2d",
                   "conv_transpose3d")


def _packet(namespace: str, name: str) -> Any:
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def flop_registry() -> dict[Any, Any]:
    """torch's formula table plus torchmagic's additions (see the module docstring), keyed by
    ``OpOverloadPacket``."""
    global _registry
    if _registry is None:
        from torch.utils.flop_counter import flop_registry as torch_registry

        reg = dict(torch_registry)
        extra: dict[tuple[str, str], Any] = {
            ("aten", "_scaled_dot_product_flash_attention_for_cpu"): _sdpa_cpu_flop,
            ("aten", "_scaled_dot_product_fused_attention_overrideable"): _sdpa_cpu_flop,
            ("aten", "_native_multi_head_attention"): _native_mha_flop,
            ("aten", "_grouped_mm"): _grouped_mm_flop,
            ("aten", "_scaled_grouped_mm"): _scaled_grouped_mm_flop,
            ("aten", "linear"): _linear_flop,
            ("aten", "matmul"): _mm_like_flop,
            ("aten", "mv"): _mm_like_flop,
            ("aten", "dot"): _mm_like_flop,
            ("aten", "vdot"): _mm_like_flop,
            ("aten", "_int_mm"): _mm_like_flop,
            ("aten", "_scaled_mm_v2"): _mm_like_flop,
            ("aten", "_weight_int8pack_mm"): _mm_like_flop,
            ("aten", "_weight_int4pack_mm"): _mm_like_flop,
            ("aten", "_weight_int4pack_mm_for_cpu"): _mm_like_flop,
            ("aten", "_weight_int4pack_mm_with_scales_and_zeros"): _mm_like_flop,
            ("aten", "_dyn_quant_matmul_4bit"): _dyn_quant_4bit_flop,
            ("aten", "_sparse_semi_structured_linear"): _linear_flop,
            ("aten", "_sparse_semi_structured_mm"): _kdim_of_b_flop,
            ("aten", "_sparse_semi_structured_addmm"): _kdim_of_b_flop,
            ("aten", "_cslt_sparse_mm"): _kdim_of_b_flop,
            ("aten", "addmm_"): _addmm_like_flop,
            ("aten", "_addmm_activation"): _addmm_like_flop,
            ("aten", "baddbmm_"): _addmm_like_flop,
            ("aten", "addbmm"): _addmm_like_flop,
            ("aten", "addbmm_"): _addmm_like_flop,
            ("aten", "addmv"): _addmm_like_flop,
            ("aten", "addmv_"): _addmm_like_flop,
            ("aten", "addr"): _addmm_like_flop,
            ("aten", "addr_"): _addmm_like_flop,
            ("quantized", "matmul"): _mm_like_flop,
            ("_quantized", "wrapped_fbgemm_linear_fp16_weight"): _linear_flop,
        }
        for name in _QUANTIZED_LINEAR:
            extra[("quantized", name)] = _linear_flop
        for name in _QUANTIZED_CONV:
            extra[("quantized", name)] = _quantized_conv_flop
        for (ns, name), formula in extra.items():
            packet = _packet(ns, name)
            if packet is not None and packet not in reg:
                reg[packet] = formula
        _registry = reg
    return _registry


# -- ops that should have been counted -----------------------------------------------------------
_MAC_WORDS = {"mm", "bmm", "matmul", "conv", "conv1d", "conv2d", "conv3d", "convolution",
              "linear", "einsum", "dot", "vdot", "mv", "addmv", "addr", "addmm", "addbmm",
              "baddbmm", "tensordot", "attention", "attn", "sdpa", "lstm", "gru", "rnn", "gemm",
              "gemv", "grouped", "matmul4bit", "mha"}
TORCH_NAMESPACES = frozenset({
    "aten", "prim", "prims", "quantized", "_quantized", "quantized_decomposed", "_c10d_functional",
    "c10d", "c10d_functional", "_c10d_functional_autograd", "_dtensor", "profiler", "debugprims",
    "rngprims", "higher_order", "inductor", "mkldnn", "mkl", "onednn", "_nested_tensor",
    "_test", "_inductor_test", "symm_mem", "fsdp", "streams", "_quantized_decomposed"})


def does_multiply_add(func: Any) -> bool:
    """True for an op whose name says it multiplies and adds (matmul, conv, linear, attention,
    grouped mm, RNN ...), and for any custom op (a namespace outside torch's own)."""
    ns = getattr(func, "namespace", "aten")
    if ns not in TORCH_NAMESPACES:
        return True
    name = func._overloadpacket.__name__.lower()
    return any(word in _MAC_WORDS for word in name.split("_"))


def op_name(func: Any) -> str:
    """``aten._grouped_mm`` (namespace and packet name)."""
    return f"{getattr(func, 'namespace', 'aten')}.{func._overloadpacket.__name__}"


# -- recurrent modules ---------------------------------------------------------------------------
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def rnn_token_flops(module: nn.Module) -> int | None:
    """Matmul FLOPs per token (per batch element per time step) of a recurrent module, or None.

    ``nn.LSTM``/``GRU``/``RNN``: for each layer and direction, input-to-hidden ``2·G·H·in`` plus
    hidden-to-hidden ``2·G·H·H_out`` (G gates: 4 LSTM, 3 GRU, 1 RNN; ``H_out = proj_size or H``),
    plus the LSTM projection ``2·H·proj_size``; layer 0 reads ``input_size``, later layers
    ``directions·H_out``. ``*Cell`` modules: ``2·G·H·(input_size + H)`` per batch element.
    """
    if isinstance(module, nn.RNNBase) or (
            type(module).__module__.startswith("torch.ao.nn.quantized")
            and isinstance(getattr(module, "mode", None), str)
            and hasattr(module, "hidden_size") and hasattr(module, "num_layers")):
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
    if _is_cell(module):
        name = type(module).__name__
        g = 4 if "LSTM" in name else 3 if "GRU" in name else 1
        return 2 * g * module.hidden_size * (module.input_size + module.hidden_size)
    return None


def _is_cell(module: nn.Module) -> bool:
    """``nn.RNNCell``/``LSTMCell``/``GRUCell`` and their dynamic quantized versions."""
    return isinstance(module, nn.RNNCellBase) or (
        type(module).__module__.startswith("torch.ao.nn.quantized")
        and type(module).__name__.endswith("Cell") and hasattr(module, "hidden_size"))


def is_recurrent(module: nn.Module) -> bool:
    """A module whose FLOPs :func:`rnn_flops` counts analytically."""
    return rnn_token_flops(module) is not None


def rnn_tokens(module: nn.Module, output_shapes: list[tuple[int, ...]]) -> int | None:
    """Batch elements x time steps a recurrent call processed, read from its first output
    (a packed sequence's data is ``(tokens, features)``, so packing is handled)."""
    if not output_shapes:
        return None
    out = output_shapes[0]
    if _is_cell(module):
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


_SUBCLASS_DESCEND = ("NestedTensor",)


def _symbolic(args: Any) -> bool:
    """True when a tensor argument has a size known only from data (fake tensors: ``u0``)."""
    for a in args:
        if isinstance(a, torch.Tensor) and any(not isinstance(d, int) for d in a.shape):
            return True
    return False


class FlopCounter(TorchDispatchMode):
    """Count forward FLOPs per module call of ``tracer`` (use inside :func:`trace_modules`).

    ``by_call[i]`` holds the FLOPs of ``tracer.calls[i]`` (its submodules included); ``total`` all
    FLOPs counted; ``uncounted[(op, i)]`` the number of calls of an op that does multiply-adds but
    has no formula (or whose formula failed), made while call ``i`` (``None``: outside any module)
    was the innermost one running. Install it as ``with FlopCounter(tracer):`` around the
    forward.
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
        self.uncounted: dict[tuple[str, int | None], int] = {}
        self._checked: dict[Any, bool] = {}
        tracer.on_enter.append(self._enter)
        tracer.on_exit.append(self._exit)

    def _enter(self, call: ModuleCall) -> None:
        self.by_call.append(0)

    def _exit(self, call: ModuleCall) -> None:
        module = self.tracer.module_of(call)
        if module is None or not is_recurrent(module):
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
        for key in [k for k in self.uncounted if k[1] == call.index]:
            del self.uncounted[key]  # the fused RNN kernel: counted analytically instead

    def _miss(self, func: Any, why: str = "") -> None:
        stack = self.tracer.stack
        key = (op_name(func) + why, stack[-1] if stack else None)
        self.uncounted[key] = self.uncounted.get(key, 0) + 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in self.skip:
            return NotImplemented
        packet = func._overloadpacket
        formula = self.registry.get(packet)
        if formula is None:
            if any(t.__name__ in _SUBCLASS_DESCEND for t in types):
                return NotImplemented  # the nested tensor runs ops on its values: counted there
            macs = self._checked.get(func)
            if macs is None:
                macs = self._checked[func] = does_multiply_add(func)
            if macs:
                if any(t is not torch.Tensor and t is not nn.Parameter for t in types):
                    return NotImplemented  # a subclass: count the ops it runs inside
                self._miss(func)
            # Run the op as eager would. (torch's FlopCounterMode first tries the op's Python
            # decomposition; eager never uses those, and every matmul-like op reaching this mode
            # has a formula, so counting is the same and BatchNorm & co. stay fast.)
            return func(*args, **kwargs)
        if any(t.__name__ in _SUBCLASS_DESCEND for t in types):
            return NotImplemented  # shapes hold ragged sizes: count the ops on the values
        out = func(*args, **kwargs)
        try:
            n = int(formula(*args, **kwargs, out_val=out))
        except Exception:  # noqa: BLE001 - a formula that cannot read these arguments
            self._miss(func, " (size from data)" if _symbolic(args) else "")
            return out
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


__all__ = ["FlopCounter", "TORCH_NAMESPACES", "does_multiply_add", "flop_counter", "flop_registry",
           "grouped_mm_flops", "is_recurrent", "op_name", "rnn_flops", "rnn_token_flops"]
