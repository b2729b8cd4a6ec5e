"""%params and torchmagic.params: counts against parameters()/buffers(), tied weights listed once
with all names, dtypes, devices (split warning), filters, bad input, invariants, renderings."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from conftest import run
from IPython.core.error import UsageError
from statecheck import Snapshot, assert_released

import torchmagic
from torchmagic.core.errors import TorchMagicError
from torchmagic.core.params import ParamReport, params
from torchmagic.models import GPT, Llama, SmallCNN


def mixed_model() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2).to(torch.bfloat16))
    m[0].requires_grad_(False)
    return m


def test_totals_against_parameters() -> None:
    m = mixed_model()
    r = params(m)
    ps = list(m.parameters())
    assert r.total_params == sum(p.numel() for p in ps) == 40 + 16 + 18
    assert r.trainable_params == sum(p.numel() for p in ps if p.requires_grad) == 34
    assert r.frozen_params == 40
    assert r.param_bytes == sum(p.numel() * p.element_size() for p in ps)
    assert r.params_by_dtype == {"float32": 56, "bfloat16": 18}
    assert r.bytes_by_dtype == {"float32": 56 * 4, "bfloat16": 18 * 2}
    assert r.devices == {"cpu": 74} and not r.split_devices
    bufs = list(m.buffers())
    assert r.buffer_count == len(bufs) == 3
    assert r.total_buffers == sum(b.numel() for b in bufs)
    assert r.buffer_bytes == sum(b.numel() * b.element_size() for b in bufs)
    assert r.param_tensors == len(ps)


def test_rows_are_recursive_module_counts() -> None:
    m = SmallCNN()
    r = params(m, depth=2)
    rows = {row.path: row for row in r.rows}
    assert [row.path for row in r.rows] == [n for n, _ in m.named_modules()]
    for name, mod in m.named_modules():
        assert rows[name].params == sum(p.numel() for p in mod.parameters())
        assert rows[name].buffers == sum(b.numel() for b in mod.buffers())
    assert rows["features.1"].buffers == 16 + 16 + 1
    assert params(m, depth=1).rows[-1].path == "head"


def test_tied_listed_once_with_all_names() -> None:
    g = GPT()
    r = params(g)
    assert r.total_params == sum(p.numel() for p in g.parameters())
    assert len(r.tied) == 1
    assert r.tied[0].names == ["wte.weight", "lm_head.weight"]
    assert r.tied[0].numel == 1000 * 64
    rows = {row.path: row for row in r.rows}
    assert rows["lm_head"].params == 0 and rows["lm_head"].tied == ["weight tied to wte.weight"]
    text = str(r)
    assert "wte.weight = lm_head.weight" in text


def test_trainable_and_frozen_filters() -> None:
    m = mixed_model()
    t = params(m, only="trainable")
    assert [row.path for row in t.rows] == ["", "1", "2"]
    assert t.rows[0].params == 34 and t.total_params == 74
    f = params(m, only="frozen")
    assert [row.path for row in f.rows] == ["", "0"]
    assert f.rows[0].params == 40


def test_split_devices_warned_loudly() -> None:
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    r = params(m)
    assert r.split_devices
    assert r.devices == {"cpu": 6, "meta": 6}
    assert any("split across 2 devices" in w for w in r.warnings)
    assert "WARNING: model is split across 2 devices" in str(r)
    assert "tm-bad" in r._repr_html_()


def test_meta_7b_counts() -> None:
    with torch.device("meta"):
        model = Llama(Llama.config_7b())
    r = params(model, depth=1)
    assert r.total_params == sum(p.numel() for p in model.parameters())
    assert 6.5e9 < r.total_params < 7e9
    assert r.devices == {"meta": r.total_params}


def test_bad_input() -> None:
    with pytest.raises(TorchMagicError, match="got Tensor .a tensor; for tensors use %tensor"):
        params(torch.ones(2))
    with pytest.raises(TorchMagicError, match="the class SmallCNN itself"):
        params(SmallCNN)
    with pytest.raises(TorchMagicError, match="state_dict"):
        params({"w": torch.ones(1)})
    with pytest.raises(TorchMagicError, match="depth"):
        params(SmallCNN(), depth=-2)


def test_render_and_dict() -> None:
    r = params(GPT(), depth=2)
    d = r.to_dict()
    json.dumps(d)
    assert d["split_devices"] is False and d["trainable_percent"] == 100.0
    small = str(params(nn.Linear(3, 2)))  # a small count is written once, not "8 (8)"
    assert "Total: 8 in 2 tensors" in small
    assert "Total: 172,288 (172.3 K) in 28 tensors" in str(r)
    assert d["tied"][0]["names"] == ["wte.weight", "lm_head.weight"]
    assert all(len(line) <= 100 for line in str(r).splitlines())
    h = r._repr_html_()
    assert "<script" not in h and 'title="172,288 parameters"' in h
    from torchmagic.display import params as display

    w = display.widget(r)
    assert "tm-params" in w._dom_classes
    html = "".join(getattr(c, "value", "") for c in w.children)
    assert "172.3 K" in html and 'title="172,288"' in html
    bars = w.children[1]
    texts = "".join(getattr(c, "value", "") for c in bars.children)
    assert "blocks" in texts and "float32" in texts


def test_state_and_release() -> None:
    m = mixed_model()
    snap = Snapshot.take(m)
    params(m)
    snap.assert_unchanged()
    assert_released(mixed_model, lambda m: params(m))


def test_public_api() -> None:
    assert isinstance(torchmagic.params(SmallCNN()), torchmagic.ParamReport)


# -- magic ---------------------------------------------------------------------------------------
def test_magic(ip) -> None:
    m = mixed_model()
    ip.user_ns["m"] = m
    snap = Snapshot.take(m)
    _, shown = run(ip, "params m --depth 1 -o r")
    assert "trainable" in shown and "frozen" in shown and "bfloat16" in shown
    r = ip.user_ns["r"]
    assert isinstance(r, ParamReport) and r.depth == 1 and r.name == "m"
    run(ip, "params m --trainable")
    run(ip, "params m[0] --frozen")
    snap.assert_unchanged()


@pytest.mark.parametrize("line, expected", [
    ("", "%params: give a model"),
    ("nope", "name 'nope' is not defined"),
    ("x", "must be a torch.nn.Module; got Tensor"),
    ("m --trainable --frozen", "choose one of --trainable and --frozen"),
    ("m --depth x", "invalid int value"),
    ("m --wat", "unknown option"),
])
def test_magic_bad_input_one_line(ip, line: str, expected: str) -> None:
    ip.user_ns.update(m=SmallCNN(), x=torch.ones(2))
    with pytest.raises(UsageError) as info:
        run(ip, f"params {line}")
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_wrappers_are_unwrapped_with_a_note() -> None:
    """DataParallel: the rows are the wrapped module's (no ``module.`` prefix), counts unchanged."""
    inner = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    rep = params(nn.DataParallel(inner), depth=1)
    assert rep.total_params == sum(p.numel() for p in inner.parameters())
    assert [r.path for r in rep.rows] == ["", "0", "1", "2"]
    assert any("DataParallel wrapper" in n for n in rep.notes)


@pytest.mark.parametrize("first", ["lazy", "sized"])
def test_lazy_parameters_are_not_called_trainable_or_frozen(first: str) -> None:
    """Uninitialized (lazy) parameters have no size: the footer counts the sized ones and names
    how many are uninitialized, and never reports 0 trainable (0.0%) for a model not sized yet."""
    from torch.nn.parameter import UninitializedParameter

    m = nn.Sequential(nn.LazyLinear(32) if first == "lazy" else nn.Linear(3, 32), nn.ReLU(),
                      nn.LazyLinear(10))
    lazy = sum(isinstance(p, UninitializedParameter) for p in m.parameters())
    sized = [p for p in m.parameters() if not isinstance(p, UninitializedParameter)]
    text = str(params(m))
    total = sum(p.numel() for p in sized)
    assert f"Total: {total:,} in {len(sized)} sized tensors; {lazy} uninitialized" in text
    if sized:
        assert f"Trainable: {total:,} (100.0%); frozen 0 (0.0%); {lazy} uninitialized" in text
    else:
        assert f"Trainable: not known until the first forward ({lazy} uninitialized" in text
        assert "0.0%" not in text.split("Trainable:")[1].splitlines()[0]
