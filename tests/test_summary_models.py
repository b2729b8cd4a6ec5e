"""%summary on the models people bring (issues 11 and 12): the forward runs on a twin (attributes
written in forward stay there), non-tensor results named with their tensors, modules shared
between parents, nested (jagged) tensors, torchinfo's table within the text width."""

from __future__ import annotations

import threading
from collections import namedtuple

import pytest
import torch
import torch.nn as nn
from conftest import run
from statecheck import Snapshot

from torchmagic.core.errors import TorchMagicError
from torchmagic.core.summary import summary


class Counting(nn.Module):
    """Writes Python attributes in forward: a counter, a list, a cached tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.steps = 0
        self.seen: list[tuple[int, ...]] = []
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        self.seen.append(tuple(x.shape))
        self.cache = self.lin(x)
        self.lin.calls = getattr(self.lin, "calls", 0) + 1
        return self.bn(self.cache)


@pytest.mark.parametrize("options", [{}, {"device": "cpu"}, {"torchinfo": True}, {"meta": True},
                                     {"mode": "train"}])
def test_attributes_written_in_forward_stay_on_the_twin(options: dict) -> None:
    m = Counting().train()
    snap = Snapshot.take(m)
    s = summary(m, input_size=(3, 4), **options)
    assert s.error is None and s.output_shapes == [(3, 4)]
    snap.assert_unchanged()
    assert m.steps == 0 and m.seen == [] and m.cache is None and not hasattr(m.lin, "calls")


def test_attributes_stay_through_the_magic(ip) -> None:
    m = Counting()
    ip.user_ns["m"] = m
    for line in ("summary m (3,4)", "summary m (3,4) --device cpu", "summary m (3,4) --torchinfo",
                 "summary m (3,4) --meta"):
        run(ip, line)
    assert m.steps == 0 and m.seen == [] and m.cache is None


def test_a_model_holding_a_lock_runs_on_an_isolated_twin() -> None:
    m = Counting()
    m.lock = threading.Lock()  # deepcopy cannot copy a lock: the isolation shares it
    snap = Snapshot.take(m)
    s = summary(m, input_size=(3, 4))
    snap.assert_unchanged()
    assert s.output_shapes == [(3, 4)]
    assert m.steps == 0 and m.seen == [] and m.cache is None


def test_a_model_that_cannot_be_isolated_is_refused_in_one_line() -> None:
    m = Counting()
    m.source = (i for i in range(3))  # a generator: neither copied nor shared
    snap = Snapshot.take(m)
    with pytest.raises(TorchMagicError, match="source") as err:
        summary(m, input_size=(3, 4))
    assert "\n" not in str(err.value)
    snap.assert_unchanged()
    assert m.steps == 0 and next(m.source) == 0  # never ran, the generator not consumed


# -- results that are not tensors --------------------------------------------------------------
class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.lin(x))


Pair = namedtuple("Pair", "mean std")


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> Pair:
        return Pair(self.a(x), self.b(x).exp())


def test_non_tensor_results_name_their_type_and_tensors() -> None:
    s = summary(Policy(), input_size=(5, 4))
    assert s.output_type == "Categorical" and s.output_shapes == [(5, 3)]  # logits, once
    assert s.rows[0].output_bytes == 5 * 3 * 4
    assert "Output: Categorical: (5, 3)" in str(s)
    assert "Categorical" in s._repr_html_()
    s = summary(TwoHeads(), input_size=(5, 4))
    assert s.output_type == "Pair" and s.output_shapes == [(5, 2), (5, 2)]
    assert "Output: Pair: (5, 2), (5, 2)" in str(s)


# -- a module shared by two parents ------------------------------------------------------------
def test_shared_module_gets_a_note() -> None:
    shared = nn.Linear(4, 4)

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(shared, nn.ReLU())
            self.dec = nn.Sequential(nn.ReLU(), shared)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(self.enc(x))

    m = Two()
    s = summary(m, input_size=(2, 4))
    assert s.total_params == sum(p.numel() for p in m.parameters()) == 20
    rows = {r.path: r for r in s.rows}
    assert rows["enc.0"].shared == ["dec.1"] and rows["enc.0"].calls == 2
    assert rows["enc.0"].flops == 2 * (2 * 2 * 4 * 4)
    text = " ".join(str(s).split())
    assert "enc.0 is also registered as dec.1" in text
    assert "also registered as dec.1" in s._repr_html_()
    assert "enc.0 is also registered as dec.1" in " ".join(str(summary(m)).split())


# -- nested (jagged) tensors ----------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("meta", [False, True])
def test_nested_jagged_inputs(meta: bool) -> None:
    lengths = [3, 5, 2]
    nt = torch.nested.nested_tensor([torch.randn(n, 8) for n in lengths], layout=torch.jagged)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    snap = Snapshot.take(m)
    s = summary(m, nt, meta=meta)
    snap.assert_unchanged()
    tokens = sum(lengths)
    assert s.total_flops == 2 * tokens * (8 * 16 + 16 * 4)  # only the real tokens
    assert s.output_type == "nested tensor"
    assert str(s.output_shapes[0][1]).startswith("j") and s.output_shapes[0][::2] == (3, 4)
    if not meta:
        out = s.rows[0].output_bytes
        assert out == tokens * 4 * 4 + (len(lengths) + 1) * 8  # values + int64 offsets


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_strided_nested_tensor_shapes() -> None:
    from torchmagic.core.tracing import shape_of

    nt = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)])
    assert shape_of(nt) == (2, "*", 8)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensor_through_the_magic(ip) -> None:
    nt = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], layout=torch.jagged)
    ip.user_ns.update(lin=nn.Linear(8, 4), nt=nt)
    _, shown = run(ip, "summary lin nt")
    import re

    assert re.search(r"\(2,j\d+,8\)", shown.replace(" ", "")) and "512 FLOPs" in shown


# -- torchinfo's table within the width ------------------------------------------------------
class LongNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a_rather_long_encoder_block_name = nn.Sequential(
            nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_rather_long_encoder_block_name(x)


@pytest.mark.parametrize("width", [80, 100])
def test_torchinfo_table_fits_the_width(width: int) -> None:
    s = summary(LongNames(), input_size=(2, 8), depth=4, torchinfo=True, width=width,
                columns="input,output,params,percent,kernel,macs,trainable")
    assert "Total params" in s.torchinfo
    wide = [li for li in s.torchinfo.splitlines() if len(li) > width]
    assert not wide, wide


def test_torchinfo_follows_the_text_width(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchmagic.display import format as fmt

    monkeypatch.setattr(fmt, "text_width", lambda default=100: 72)
    s = summary(LongNames(), input_size=(2, 8), depth=4, torchinfo=True)
    assert max(len(li) for li in s.torchinfo.splitlines()) <= 72


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("meta", [False, True])
def test_nested_tensor_buffer(meta: bool) -> None:
    class WithNested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 4)
            self.register_buffer("memory", torch.nested.nested_tensor(
                [torch.randn(3, 8), torch.randn(5, 8)], layout=torch.jagged))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + self.lin(self.memory).values().sum()

    m = WithNested()
    s = summary(m, input_size=(2, 8), meta=meta)
    assert s.buffer_bytes == 8 * 8 * 4 + 3 * 8  # values + int64 offsets
    assert s.total_flops == 2 * 2 * 8 * 4 + 2 * (3 + 5) * 8 * 4
