"""Lazy and quantized models (issue 12, items 3 and 4): counts against independent references
(the same model materialized or before quantization, analytic FLOPs, element sizes by dtype),
never a traceback and never a silent 0, in %summary, %params, %device and %freeze."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import run
from statecheck import Snapshot

import torchmagic
from torchmagic.core.params import params
from torchmagic.core.summary import summary

# torch.ao quantization is deprecated (torchao is its successor) but still what users run
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*quantiz:UserWarning"),
              pytest.mark.filterwarnings("ignore:Please use quant_min:UserWarning")]


# -- lazy modules ----------------------------------------------------------------------------
def lazy_net() -> nn.Sequential:
    return nn.Sequential(nn.LazyLinear(10), nn.ReLU(), nn.LazyLinear(1))


def lazy_state(m: nn.Module) -> dict:
    """What must not change on a lazy model (statecheck cannot read uninitialized tensors)."""
    from torch.nn.parameter import is_lazy

    return {"classes": [type(x) for x in m.modules()],
            "lazy": [is_lazy(p) for p in m.parameters()],
            "ids": [id(p) for p in m.parameters()],
            "hooks": [list(x._forward_pre_hooks) for x in m.modules()],
            "rng": torch.get_rng_state(), "training": [x.training for x in m.modules()]}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        same = torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
        assert same, k


@pytest.mark.parametrize("meta", [False, True])
def test_lazy_with_inputs_counts_what_the_input_makes(meta: bool) -> None:
    net = lazy_net()
    before = lazy_state(net)
    s = summary(net, input_size=(4, 7), meta=meta)
    assert_same(before, lazy_state(net))  # still lazy, same objects, RNG untouched
    reference = copy.deepcopy(net)
    reference(torch.randn(4, 7))  # materialized independently
    assert s.total_params == sum(p.numel() for p in reference.parameters()) == 91
    rows = {r.path: r for r in s.rows}
    assert rows["0"].params == reference[0].weight.numel() + reference[0].bias.numel() == 80
    assert rows["2"].params == 11 and rows["0"].cls == "LazyLinear"
    assert s.total_flops == 2 * 4 * (7 * 10 + 10 * 1)
    assert s.param_bytes == 91 * 4 and s.lazy_materialized and not s.uninitialized
    assert "still lazy" in str(s)


def test_lazy_without_inputs_names_the_uninitialized_parameters() -> None:
    net = lazy_net()
    s = summary(net)
    assert s.uninitialized == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert s.total_params == 0
    rows = {r.path: r for r in s.rows}
    assert rows["0"].uninitialized == 2 and rows[""].uninitialized == 4
    line = next(li for li in str(s).splitlines() if li.startswith("0 "))
    assert "lazy" in line and " 0 " not in line.replace("0 ", "", 1)
    assert "4 uninitialized parameters" in str(s)
    p = params(net)
    assert p.uninitialized == s.uninitialized and p.total_params == 0
    assert "lazy" in next(li for li in str(p).splitlines() if li.startswith("(root)"))


def test_lazy_mixed_with_initialized_parameters() -> None:
    net = nn.Sequential(nn.Linear(3, 5), nn.LazyLinear(2))
    s = summary(net)
    assert s.total_params == 20 and s.uninitialized == ["1.weight", "1.bias"]
    root = next(li for li in str(s).splitlines() if li.startswith("(root)"))
    assert "20 +lazy" in root
    s = summary(net, input_size=(1, 3))
    assert s.total_params == 20 + 12


def test_lazy_magics_never_traceback(ip) -> None:
    net = lazy_net()
    ip.user_ns["net"] = net
    before = lazy_state(net)
    for line, words in [("summary net (4,7)", "still lazy"),
                        ("summary net", "uninitialized parameters"),
                        ("params net", "uninitialized parameters"),
                        ("device net", "uninitialized tensors of lazy modules")]:
        _, shown = run(ip, line)
        assert words in shown, line
    assert_same(before, lazy_state(net))
    _, shown = run(ip, "freeze net.0")
    assert "2 uninitialized parameters of lazy modules" in shown
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True]
    net(torch.randn(4, 7))  # the flag survives materialization
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True]


# -- dynamic and static quantization ---------------------------------------------------------
def float_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def dynamic_quantized() -> tuple[nn.Module, nn.Module]:
    f = float_mlp()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear}, dtype=torch.qint8)
    return f, q


def test_dynamic_quantized_counts_bytes_flops_and_class() -> None:
    f, q = dynamic_quantized()
    assert list(q.parameters()) == []  # what made torchmagic report an empty model
    s = summary(q, input_size=(4, 64))
    weights = sum(m.weight.numel() for m in f if isinstance(m, nn.Linear))
    biases = sum(m.bias.numel() for m in f if isinstance(m, nn.Linear))
    assert s.total_params == sum(p.numel() for p in f.parameters()) == weights + biases == 2410
    assert s.param_bytes_by_dtype == {"qint8": weights * 1, "float32": biases * 4}
    assert s.param_bytes == 2368 + 168 and s.packed_params == 2410
    assert s.total_flops == 2 * 4 * (64 * 32 + 32 * 10) == 18_944
    assert s.frozen_params == 2410 and s.trainable_params == 0
    rows = {r.path: r for r in s.rows}
    assert rows["0"].cls == "DynamicQuantizedLinear" and rows["0"].params == 64 * 32 + 32
    assert rows["0._packed_params"].status == "in parent"
    text = str(s)
    assert "DynamicQuantizedLinear" in text and "packed quantized weights" in text
    p = params(q)
    assert p.total_params == 2410 and p.bytes_by_dtype == s.param_bytes_by_dtype
    assert p.quantized == {"qint8 per-tensor": weights}


def static_quantized() -> tuple[nn.Module, nn.Module]:
    import torch.ao.quantization as tq

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant = tq.QuantStub()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.relu = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 4)
            self.dequant = tq.DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(self.conv(self.quant(x)))
            return self.dequant(self.fc(self.pool(x).flatten(1)))

    torch.manual_seed(0)
    f = Net().eval()
    m = copy.deepcopy(f)
    m.qconfig = tq.get_default_qconfig(torch.backends.quantized.engine)
    tq.prepare(m, inplace=True)
    m(torch.randn(2, 3, 8, 8))
    tq.convert(m, inplace=True)
    return f, m


def test_static_quantized_conv_and_linear() -> None:
    f, q = static_quantized()
    snap = Snapshot.take(q)
    s = summary(q, input_size=(2, 3, 8, 8))
    snap.assert_unchanged()
    assert s.total_params == sum(p.numel() for p in f.parameters()) == 8 * 3 * 9 + 8 + 8 * 4 + 4
    conv = 2 * 2 * 8 * 8 * 8 * (3 * 3 * 3)  # N, C_out, H, W, C_in x k x k
    assert s.total_flops == conv + 2 * 2 * 8 * 4
    rows = {r.path: r for r in s.rows}
    assert rows["conv"].cls == "QuantizedConv2d" and rows["conv"].flops == conv
    assert rows["fc"].cls == "QuantizedLinear"
    w = q.conv.weight()  # per-channel: int8 data plus a float64 scale and an int64 zero point each
    per_channel = w.qscheme() == torch.per_channel_affine
    conv_bytes = w.numel() + (8 * 8 + 8 * 8 if per_channel else 0)
    assert s.param_bytes_by_dtype["qint8"] >= conv_bytes
    assert s.param_bytes_by_dtype["float32"] == (8 + 4) * 4  # biases stay float


def test_quantized_on_meta_is_refused_in_one_line() -> None:
    _, q = dynamic_quantized()
    with pytest.raises(torchmagic.TorchMagicError, match="packed quantized weights") as info:
        summary(q, input_size=(4, 64), meta=True)
    assert "\n" not in str(info.value)


def test_unreadable_packed_weights_say_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchmagic.core import weights

    _, q = dynamic_quantized()
    monkeypatch.setattr(weights, "_script_tensors", lambda obj, depth=0: None)
    s = summary(q)
    assert s.total_params == 0 and s.unknown_params == ["0._packed_params", "2._packed_params"]
    line = next(li for li in str(s).splitlines() if li.startswith("0 "))
    assert "?" in line
    assert "could not be read" in str(s)


# -- tensor-subclass and float8 weights ------------------------------------------------------
class Int8WeightOnly(torch.Tensor):
    """A torchao-style int8 weight-only wrapper: int8 data and a scale per output row; ops see the
    dequantized weight."""

    @staticmethod
    def __new__(cls, int_data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, int_data.shape, dtype=dtype,
                                                   device=int_data.device, requires_grad=False)

    def __init__(self, int_data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.int_data, self.scale = int_data, scale

    def __repr__(self) -> str:
        return f"Int8WeightOnly({tuple(self.shape)})"

    def __tensor_flatten__(self):  # noqa: ANN204
        return ["int_data", "scale"], {"dtype": self.dtype}

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):  # noqa: ANN001, ANN206
        return cls(inner["int_data"], inner["scale"], meta["dtype"])

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int8WeightOnly:
        w = w.detach()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        return cls(q, scale.to(w.dtype), w.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.int_data.to(self.dtype) * self.scale[:, None]

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return cls(args[0].int_data, args[0].scale, args[0].dtype)
        args = [a.dequantize() if isinstance(a, cls) else a for a in args]
        return func(*args, **kwargs)


class Int8Packed(Int8WeightOnly):
    """torchao's CPU kernel path: ``F.linear`` runs ``aten._weight_int8pack_mm``."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w.int_data,
                                                   w.scale)
            y = y.reshape(*x.shape[:-1], w.shape[0])
            return y if b is None else y + b
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


@pytest.mark.parametrize("cls", [Int8WeightOnly, Int8Packed])
def test_int8_weight_only_subclass(cls: type) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    lin.weight = nn.Parameter(cls.from_float(lin.weight), requires_grad=False)
    snap = Snapshot.take(bias=lin.bias)
    for meta in (False, True):
        s = summary(lin, input_size=(2, 3, 16), meta=meta)
        assert s.total_params == 16 * 8 + 8
        assert s.total_flops == 2 * (2 * 3) * 16 * 8, meta
        assert not s.uncounted
    snap.assert_unchanged()
    # true bytes: int8 data + float32 scales under int8 (the weight's storage), the bias float32
    assert s.param_bytes_by_dtype == {"int8": 16 * 8 + 8 * 4, "float32": 8 * 4}
    p = params(lin)
    assert p.quantized == {cls.__name__: 16 * 8} and p.params_by_dtype["int8"] == 16 * 8
    assert cls.__name__ in str(p)


def test_float8_weights() -> None:
    class Fp8Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 16).to(torch.float8_e4m3fn),
                                       requires_grad=False)
            self.scale = nn.Parameter(torch.tensor(0.5), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight.to(x.dtype) * self.scale)

    m = Fp8Linear()
    s = summary(m, input_size=(4, 16))
    assert s.total_params == 8 * 16 + 1
    assert s.param_bytes_by_dtype == {"float8_e4m3fn": 8 * 16, "float32": 4}
    assert s.total_flops == 2 * 4 * 16 * 8
    assert "float8_e4m3fn 128" in str(params(m))


# -- %device, %freeze on quantized models --------------------------------------------------------
def test_quantized_magics(ip) -> None:
    _, q = dynamic_quantized()
    ip.user_ns["q"] = q
    _, shown = run(ip, "summary q (4,64)")
    assert "18,944" in shown and "DynamicQuantizedLinear" in shown
    _, shown = run(ip, "params q")
    assert "2,410" in shown and "qint8" in shown


def test_lazy_and_quantized_models_are_released() -> None:
    from statecheck import assert_released

    assert_released(lazy_net, lambda m: summary(m, input_size=(4, 7)))
    assert_released(lambda: dynamic_quantized()[1], lambda m: summary(m, input_size=(4, 64)))


def test_dynamic_quantized_lstm() -> None:
    """Packed LSTM cell params hold their biases twice (state and packed linear): counted once;
    FLOPs are the analytic recurrent count, as for the float model."""
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0])

    torch.manual_seed(0)
    f = Tagger()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.LSTM, nn.Linear},
                                               dtype=torch.qint8)
    s = summary(q, input_size=(2, 5, 8))
    assert s.total_params == sum(p.numel() for p in f.parameters())
    per_token = sum(2 * 4 * 16 * (i + 16) for i in (8, 16))  # 4 gates, layer inputs 8 then 16
    assert s.total_flops == 2 * 5 * per_token + 2 * 2 * 5 * 16 * 4
    rows = {r.path: r for r in s.rows}
    assert rows["lstm"].analytic_flops and not s.uncounted
    assert rows["lstm._all_weight_values"].status == "in parent"
