"""FLOPs of ``summary``/``FlopCounter`` against analytic counts written here independently
(2 FLOPs per multiply-add of matrix products/convolutions/attention; bias and element-wise ops 0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchmagic.core.summary import summary
from torchmagic.models import GPT, GPTConfig, gpt_forward_flops


def close(got: int | None, want: int, tol: float = 0.01) -> bool:
    assert got is not None
    return abs(got - want) <= tol * want


def test_linear_on_3d_input() -> None:
    m = nn.Linear(32, 48)
    s = summary(m, input_size=(4, 10, 32))
    want = 2 * 4 * 10 * 32 * 48
    assert close(s.total_flops, want)
    assert s.total_macs == s.total_flops // 2


def test_conv2d() -> None:
    m = nn.Conv2d(3, 8, 3, padding=1, stride=2)
    s = summary(m, input_size=(2, 3, 16, 16))
    h_out = w_out = (16 + 2 - 3) // 2 + 1  # 8
    want = 2 * 2 * 8 * h_out * w_out * 3 * 3 * 3
    assert close(s.total_flops, want)
    assert s.rows[0].kernel == "3x3"


def test_conv_transpose2d_stride2() -> None:
    m = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
    s = summary(m, input_size=(2, 8, 8, 8))
    # every input pixel is multiplied into k*k*C_out outputs
    want = 2 * 2 * 8 * 8 * 8 * 4 * 3 * 3
    assert close(s.total_flops, want)
    assert s.output_shapes == [(2, 4, 16, 16)]


def mha_flops(b: int, lq: int, lk: int, e: int) -> int:
    proj = 2 * b * lq * e * e + 2 * 2 * b * lk * e * e  # q; k and v
    attn = 2 * b * lq * lk * e * 2  # QK^T and AV over all heads
    out = 2 * b * lq * e * e
    return proj + attn + out


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_multihead_attention_self(mode: str) -> None:
    m = nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(2, 10, 64)
    s = summary(m, x, x, x, mode=mode)
    assert close(s.total_flops, mha_flops(2, 10, 10, 64))


def test_multihead_attention_cross_no_weights() -> None:
    m = nn.MultiheadAttention(32, 2)  # (L, N, E)
    q, kv = torch.randn(6, 3, 32), torch.randn(9, 3, 32)
    s = summary(m, q, kv, kv, {"need_weights": False}, mode="eval")
    assert close(s.total_flops, mha_flops(3, 6, 9, 32))


def test_native_mha_fast_path_formula() -> None:
    """With torch's fast path on (eval + no_grad), the fused op is counted by our formula."""
    from torchmagic.core.flops import FlopCounter
    from torchmagic.core.tracing import ModuleTracer, trace_modules

    m = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(2, 10, 64)
    tracer = ModuleTracer(m)
    counter = FlopCounter(tracer)
    with torch.no_grad(), trace_modules(tracer), counter:
        m(x, x, x)
    assert close(counter.total, mha_flops(2, 10, 10, 64))


def test_transformer_encoder_layer_counts_and_shows_submodules() -> None:
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True).eval()
    s = summary(layer, input_size=(2, 5, 32), mode="eval")
    want = mha_flops(2, 5, 5, 32) + 2 * 2 * 5 * (32 * 64 + 64 * 32)
    assert close(s.total_flops, want)
    called = {r.path for r in s.rows if r.calls}
    assert {"self_attn", "linear1", "linear2"} <= called  # fast path off: submodules visible


class SDPA(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_sdpa_on_cpu() -> None:
    b, h, lq, d = 2, 4, 16, 8
    s = summary(SDPA(), input_size=[(b, h, lq, d)] * 3)
    want = 2 * 2 * b * h * lq * lq * d
    assert close(s.total_flops, want)


def test_sdpa_on_meta_matches() -> None:
    s = summary(SDPA(), input_size=[(2, 4, 16, 8)] * 3, meta=True)
    assert close(s.total_flops, 2 * 2 * 2 * 4 * 16 * 16 * 8)


def lstm_flops(tokens: int, inp: int, h: int, layers: int, dirs: int, proj: int = 0,
               gates: int = 4) -> int:
    h_out = proj or h
    total = 0
    for layer in range(layers):
        x = inp if layer == 0 else dirs * h_out
        per_dir = 2 * gates * h * x + 2 * gates * h * h_out + (2 * h * proj if proj else 0)
        total += dirs * per_dir
    return tokens * total


def test_lstm_layers_bidirectional() -> None:
    m = nn.LSTM(16, 32, num_layers=2, bidirectional=True)
    s = summary(m, input_size=(5, 3, 16))
    assert close(s.total_flops, lstm_flops(15, 16, 32, 2, 2))
    assert s.rows[0].analytic_flops


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_lstm_proj_size_batch_first() -> None:
    m = nn.LSTM(16, 32, num_layers=2, proj_size=8, batch_first=True)
    s = summary(m, input_size=(3, 7, 16))
    assert close(s.total_flops, lstm_flops(21, 16, 32, 2, 1, proj=8))


def test_gru_and_rnn() -> None:
    s = summary(nn.GRU(8, 12), input_size=(4, 2, 8))
    assert close(s.total_flops, lstm_flops(8, 8, 12, 1, 1, gates=3))
    s = summary(nn.RNN(8, 12, num_layers=3), input_size=(4, 2, 8))
    assert close(s.total_flops, lstm_flops(8, 8, 12, 3, 1, gates=1))


def test_lstm_packed_sequence() -> None:
    from torch.nn.utils.rnn import pack_padded_sequence

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(8, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            packed = pack_padded_sequence(x, [5, 3, 2], enforce_sorted=True)
            return self.rnn(packed)[1][0]

    s = summary(Packed(), input_size=(5, 3, 8))
    assert close(s.total_flops, lstm_flops(5 + 3 + 2, 8, 16, 1, 1))


def test_lstm_inside_a_model_replaces_not_adds() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(8, 16, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0])

    s = summary(M(), input_size=(2, 6, 8))
    rnn = lstm_flops(12, 8, 16, 1, 1, gates=3)
    head = 2 * 12 * 16 * 4
    assert close(s.total_flops, rnn + head)
    rows = {r.path: r for r in s.rows}
    assert close(rows["rnn"].flops, rnn)
    assert rows[""].flops == s.total_flops


def test_gpt_decoder_real_and_meta() -> None:
    cfg = GPTConfig(vocab_size=500, block_size=64, n_layer=2, n_head=4, d_model=64)
    model = GPT(cfg)
    want = gpt_forward_flops(cfg, 2, 32)
    for meta in (False, True):
        s = summary(model, input_size=(2, 32), dtypes="long", meta=meta)
        assert close(s.total_flops, want), (meta, s.total_flops, want)


def test_gpt2_small_meta_16g_macs() -> None:
    with torch.device("meta"):
        model = GPT.small()
    s = summary(model, input_size=(1, 128), dtypes="long")
    want = gpt_forward_flops(model.cfg, 1, 128)
    assert close(s.total_flops, want)
    assert 15.5e9 < s.total_macs < 16.5e9  # torchinfo 1.8.0 says 0.23 G
    assert s.total_params == sum(p.numel() for p in model.parameters()) == 124_439_808


def test_per_module_flops_sum_to_parent() -> None:
    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, d_model=32)
    s = summary(GPT(cfg), input_size=(1, 8), dtypes="long", depth=1)
    rows = {r.path: r for r in s.rows}
    children = sum(r.flops or 0 for p, r in rows.items() if p)
    assert children == rows[""].flops == s.total_flops
    d = 32
    assert rows["lm_head"].flops == 2 * 8 * d * 100


# -- reviewer's additions: more layer kinds, each against a formula written here ---------------
def _conv_flops(n: int, c_in: int, c_out: int, groups: int, kernel: tuple[int, ...],
                out_spatial: tuple[int, ...]) -> int:
    """2 x every output element x the (C_in / groups) * prod(kernel) weights it sums over."""
    k = 1
    for d in kernel:
        k *= d
    o = 1
    for d in out_spatial:
        o *= d
    return 2 * n * c_out * o * (c_in // groups) * k


def _convT_flops(n: int, c_in: int, c_out: int, groups: int, kernel: tuple[int, ...],
                 in_spatial: tuple[int, ...]) -> int:
    """Transposed conv: every input element is multiplied into prod(kernel) * C_out/groups
    outputs."""
    k = 1
    for d in kernel:
        k *= d
    i = 1
    for d in in_spatial:
        i *= d
    return 2 * n * c_in * i * (c_out // groups) * k


@pytest.mark.parametrize("case", ["conv1d", "conv3d", "grouped", "depthwise", "convT1d",
                                  "convT3d", "convT_grouped"])
def test_more_convolutions(case: str) -> None:
    if case == "conv1d":
        m, shape = nn.Conv1d(4, 6, 5, stride=2, padding=1), (2, 4, 21)
        want = _conv_flops(2, 4, 6, 1, (5,), ((21 + 2 - 5) // 2 + 1,))
    elif case == "conv3d":
        m, shape = nn.Conv3d(3, 5, (3, 2, 2)), (1, 3, 6, 7, 8)
        want = _conv_flops(1, 3, 5, 1, (3, 2, 2), (4, 6, 7))
    elif case == "grouped":
        m, shape = nn.Conv2d(8, 12, 3, groups=4), (2, 8, 9, 9)
        want = _conv_flops(2, 8, 12, 4, (3, 3), (7, 7))
    elif case == "depthwise":
        m, shape = nn.Conv2d(8, 8, 3, groups=8, padding=1), (1, 8, 10, 10)
        want = _conv_flops(1, 8, 8, 8, (3, 3), (10, 10))
    elif case == "convT1d":
        m, shape = nn.ConvTranspose1d(4, 6, 3, stride=2), (2, 4, 10)
        want = _convT_flops(2, 4, 6, 1, (3,), (10,))
    elif case == "convT3d":
        m, shape = nn.ConvTranspose3d(4, 2, 3, stride=2), (1, 4, 3, 4, 5)
        want = _convT_flops(1, 4, 2, 1, (3, 3, 3), (3, 4, 5))
    else:
        m, shape = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2), (1, 8, 5, 5)
        want = _convT_flops(1, 8, 4, 2, (2, 2), (5, 5))
    s = summary(m, input_size=shape)
    assert close(s.total_flops, want), (s.total_flops, want)
    s_meta = summary(m, input_size=shape, meta=True)
    assert close(s_meta.total_flops, want)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_kdim_vdim(batch_first: bool) -> None:
    e, kd, vd, heads, b, lq, lk = 32, 16, 24, 4, 3, 5, 7
    m = nn.MultiheadAttention(e, heads, kdim=kd, vdim=vd, batch_first=batch_first)
    if batch_first:
        q, k, v = torch.randn(b, lq, e), torch.randn(b, lk, kd), torch.randn(b, lk, vd)
    else:
        q, k, v = torch.randn(lq, b, e), torch.randn(lk, b, kd), torch.randn(lk, b, vd)
    want = (2 * b * (lq * e * e + lk * kd * e + lk * vd * e)   # q, k, v projections
            + 2 * 2 * b * lq * lk * e                            # QK^T and AV
            + 2 * b * lq * e * e)                                # output projection
    for mode in ("train", "eval"):
        s = summary(m, q, k, v, mode=mode)
        assert close(s.total_flops, want), (mode, s.total_flops, want)


def test_gru_bidirectional_two_layers_batch_first() -> None:
    h, i, b, t = 16, 8, 3, 5
    m = nn.GRU(i, h, num_layers=2, bidirectional=True, batch_first=True)
    per_token = 2 * (2 * 3 * h * (i + h)) + 2 * (2 * 3 * h * (2 * h + h))
    s = summary(m, input_size=(b, t, i))
    assert close(s.total_flops, per_token * b * t)
    assert s.output_shapes == [(b, t, 2 * h), (4, b, h)]


def test_gru_packed_sequence_input_real_and_meta() -> None:
    """A PackedSequence given as the input is one argument (not split as a tuple), and on meta its
    batch_sizes stay on the CPU (PackedSequence refuses anything else)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    h, i = 16, 8
    m = nn.GRU(i, h, num_layers=2, bidirectional=True, batch_first=True)
    packed = pack_padded_sequence(torch.randn(3, 5, i), [5, 3, 2], batch_first=True)
    per_token = 2 * (2 * 3 * h * (i + h)) + 2 * (2 * 3 * h * (2 * h + h))
    for meta in (False, True):
        s = summary(m, packed, meta=meta)
        assert close(s.total_flops, per_token * (5 + 3 + 2)), meta
        assert s.rows[0].input_shapes[0] == (10, i)
    assert packed.batch_sizes.device.type == "cpu" and packed.data.device.type == "cpu"
