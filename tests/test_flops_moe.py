"""Mixture-of-experts FLOPs and ops that cannot be counted (issue 12, item 1): a hand-counted MoE
block through ``aten._grouped_mm`` (routed tokens only), through ``bmm``/``einsum``, and the
NOT COUNTED report for ops without a formula (never a silent 0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import requires_cuda

from torchmagic.core.flops import does_multiply_add, grouped_mm_flops
from torchmagic.core.summary import summary

D, FF, E, K, T = 16, 32, 4, 2, 10


class GroupedMoE(nn.Module):
    """Router + top-k experts as transformers 5 runs them: tokens sorted by expert, then
    ``torch._grouped_mm(x, W[E, in, out], offs=cumulative counts)``. ``pad`` extra rows (capacity
    padding) ride along after the routed ones: they are not routed and must not be counted."""

    def __init__(self, pad: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(D, E, bias=False)
        self.w_up = nn.Parameter(torch.randn(E, D, FF) * 0.1)
        self.w_down = nn.Parameter(torch.randn(E, FF, D) * 0.1)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.router(x).softmax(-1).topk(K, dim=-1)
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        token = order // K
        xs = x[token]
        counts = (flat[:, None] == torch.arange(E, device=x.device)).sum(0)  # (also on meta)
        offs = counts.cumsum(0).to(torch.int32)
        if self.pad:
            xs = torch.cat([xs, xs.new_zeros(self.pad, D)])
        h = F.silu(torch._grouped_mm(xs, self.w_up, offs=offs))
        y = torch._grouped_mm(h, self.w_down, offs=offs)[: T * K]
        out = torch.zeros_like(x)
        return out.index_add(0, token, y * weights.flatten()[order][:, None])


def hand_count(tokens: int = T) -> tuple[int, int]:
    """(router FLOPs, expert FLOPs): 2 per multiply-add; each token goes to K experts, each
    expert applies D x FF then FF x D."""
    router = 2 * tokens * D * E
    experts = 2 * (tokens * K) * D * FF + 2 * (tokens * K) * FF * D
    return router, experts


def test_grouped_mm_moe_counts_routed_tokens() -> None:
    router, experts = hand_count()
    for pad in (0, 6):
        s = summary(GroupedMoE(pad), input_size=(T, D))
        assert s.total_flops == router + experts, pad  # the padding rows are not counted
        assert not s.uncounted
        rows = {r.path: r for r in s.rows}
        assert rows["router"].flops == router and rows[""].flops == router + experts


def test_grouped_mm_moe_on_meta_counts_the_rows_given() -> None:
    """On meta the offsets have no values: every row given is counted (exact without padding)."""
    router, experts = hand_count()
    m = GroupedMoE().to(torch.bfloat16)  # what the meta kernel of _grouped_mm accepts
    s = summary(m, input_size=(T, D), meta=True)
    assert s.total_flops == router + experts


def test_grouped_mm_formula_cases() -> None:
    assert grouped_mm_flops((20, 16), (4, 16, 32), routed=12) == 2 * 12 * 16 * 32
    assert grouped_mm_flops((20, 16), (4, 16, 32)) == 2 * 20 * 16 * 32
    assert grouped_mm_flops((4, 8, 16), (16, 40), routed=30) == 2 * 8 * 16 * 30
    assert grouped_mm_flops((8, 40), (40, 16), routed=24) == 2 * 8 * 24 * 16
    assert grouped_mm_flops((4, 8, 16), (4, 16, 32)) == 2 * 4 * 8 * 16 * 32


class CapacityMoE(nn.Module):
    """Experts over a fixed capacity C per expert, batched: ``bmm`` or ``einsum``."""

    def __init__(self, use_einsum: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, D, FF))
        self.use_einsum = use_einsum

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (E, C, D)
        if self.use_einsum:
            return torch.einsum("ecd,edf->ecf", x, self.w)
        return torch.bmm(x, self.w) + torch.baddbmm(x.new_zeros(E, x.shape[1], FF), x, self.w)


@pytest.mark.parametrize("use_einsum", [False, True])
def test_bmm_and_einsum_experts(use_einsum: bool) -> None:
    c = 5
    s = summary(CapacityMoE(use_einsum), input_size=(E, c, D))
    one = 2 * E * c * D * FF
    assert s.total_flops == (one if use_einsum else 2 * one)


# -- ops that cannot be counted ----------------------------------------------------------------
@torch.library.custom_op("tmtest::fused_matmul", mutates_args=())
def fused_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b) * 2


@fused_matmul.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[1])


class CustomOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return fused_matmul(fused_matmul(x, self.w), self.w)


@pytest.mark.parametrize("meta", [False, True])
def test_ops_without_formula_are_reported_not_silent(meta: bool) -> None:
    s = summary(CustomOps(), input_size=(4, 8), meta=meta)
    assert s.total_flops == 2 * 4 * 8 * 8  # only the nn.Linear is known
    assert [(u.op, u.module, u.calls) for u in s.uncounted] == [("tmtest.fused_matmul", "", 2)]
    rows = {r.path: r for r in s.rows}
    assert rows[""].uncounted == 2 and rows["proj"].uncounted == 0
    text = str(s)
    flat = " ".join(text.split())
    assert "NOT COUNTED" in flat and "tmtest.fused_matmul in (root) (2 calls)" in flat
    root = next(li for li in text.splitlines() if li.startswith("(root)"))
    assert "+?" in root
    assert "ops not counted" in next(li for li in text.splitlines()
                                     if li.startswith("Forward FLOPs"))
    assert s.to_dict()["uncounted"] == [{"op": "tmtest.fused_matmul", "module": "", "calls": 2}]


def test_does_multiply_add_names() -> None:
    aten = torch.ops.aten
    for op in (aten._grouped_mm.default, aten.mm.default, aten.convolution.default,
               aten._weight_int8pack_mm.default, aten.mkldnn_rnn_layer.default,
               torch.ops.tmtest.fused_matmul.default):
        assert does_multiply_add(op), op
    for op in (aten.mvlgamma.default, aten.upsample_linear1d.default, aten.add.Tensor,
               aten.convert_element_type.default if hasattr(aten, "convert_element_type")
               else aten.relu.default, aten.embedding.default):
        assert not does_multiply_add(op), op


def test_recurrent_kernels_are_not_reported_when_counted_analytically() -> None:
    s = summary(nn.LSTM(8, 16, batch_first=True), input_size=(2, 5, 8))
    assert not s.uncounted and s.rows[0].analytic_flops


@pytest.mark.cuda
@requires_cuda
def test_grouped_mm_moe_on_cuda_bf16() -> None:
    """The CUDA grouped-GEMM kernel (bf16), padding rows after the routed ones not counted."""
    router, experts = hand_count()
    m = GroupedMoE(pad=6).to(torch.bfloat16)
    s = summary(m, input_size=(T, D), device="cuda")
    assert s.total_flops == router + experts and not s.uncounted


def test_grouped_mm_moe_in_float32_on_meta_and_fake() -> None:
    """The meta kernel of ``_grouped_mm`` accepts only bfloat16 while the CPU kernel multiplies
    float32: a float32 MoE (transformers' default dtype) still runs on meta and on fake tensors,
    with the same FLOPs and the dtype the real kernel gives."""
    from torchmagic.core.meta_gaps import MetaKernelGaps

    router, experts = hand_count()
    m = GroupedMoE()  # float32
    assert summary(m, input_size=(T, D), meta=True).total_flops == router + experts
    real = m(torch.randn(T, D))
    for device in ("meta", "fake"):
        x = torch.randn(T, D, device="meta") if device == "meta" else None
        if device == "fake":
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=False)
            with mode:
                x = torch.randn(T, D)
                twin = GroupedMoE()
            ctx = mode
        else:
            twin = GroupedMoE().to("meta")
            ctx = torch.device("meta")
        with ctx:
            with pytest.raises(RuntimeError, match="BF16"):  # torch's own meta kernel
                twin(x)
            with MetaKernelGaps() as gaps:
                out = twin(x)
        assert (out.shape, out.dtype) == (real.shape, real.dtype) and gaps.filled == 2, device


def test_float32_moe_estimate_equals_memtracker_on_real_tensors() -> None:
    """The estimate traces the float32 experts on fake tensors (the gap filled): its peak is the
    one torch's MemTracker measures for the same training step on real CPU tensors."""
    from estimate_helpers import mean_loss, real_peak

    import torchmagic

    m = GroupedMoE()
    x = torch.randn(T, D)
    est = torchmagic.estimate_memory(m, x, train=True, trace_device="cpu")
    ref = real_peak(m, (x,), {}, True, mean_loss)
    assert est.peak_bytes == ref["total"]
