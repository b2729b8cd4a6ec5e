"""%device: counts and bytes against parameters()/buffers(), mixed devices, optimizer state,
availability line, bad input and state invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import HAS_CUDA, requires_cuda, run
from IPython.core.error import UsageError
from statecheck import Snapshot

import torchmagic
from torchmagic.core.device import device_report
from torchmagic.models import SmallCNN


def usage(r, role: str) -> dict[str, tuple[int, int, int]]:
    return {u.device: (u.tensors, u.elements, u.bytes) for u in r.usage if u.role == role}


def test_module_counts_match_torch() -> None:
    m = SmallCNN()
    r = device_report(m, "m")
    params, buffers = list(m.parameters()), list(m.buffers())
    assert usage(r, "parameters") == {"cpu": (len(params), sum(p.numel() for p in params),
                                              sum(p.numel() * p.element_size() for p in params))}
    assert usage(r, "buffers") == {"cpu": (len(buffers), sum(b.numel() for b in buffers),
                                           sum(b.numel() * b.element_size() for b in buffers))}
    assert r.devices == ["cpu"] and not r.mixed and not r.modules_by_device
    assert "grads" not in {u.role for u in r.usage}


def test_tied_weights_counted_once() -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    m = nn.Sequential(emb, head)
    assert usage(device_report(m), "parameters")["cpu"] == (1, 40, 160)


def test_mixed_devices_listed_per_module() -> None:
    m = SmallCNN()
    m.head[3].to("meta")
    m.features[1].to("meta")
    r = device_report(m, "m")
    assert r.mixed and r.devices == ["cpu", "meta"]
    assert r.modules_by_device["meta"] == ["features.1", "head.3"]
    assert r.modules_by_device["cpu"] == ["features.0", "features.4", "features.5", "head.1"]
    meta_params = [p for p in m.parameters() if p.is_meta]
    assert usage(r, "parameters")["meta"][0] == len(meta_params)
    text = str(r)
    assert "MIXED" in text and "on meta: m.features.1, m.head.3" in text  # paths as typed
    assert "on cpu: m.features.0, m.features.4, m.features.5, m.head.1" in text
    assert all(len(line) <= 100 for line in text.splitlines())


def test_own_tensors_of_a_parent_module_are_listed() -> None:
    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1, device="meta"))
            self.body = nn.Linear(2, 2)

    r = device_report(Parent(), "p")
    assert r.modules_by_device == {"meta": ["(root) (own tensors)"], "cpu": ["body"]}
    text = str(r)
    assert "on meta: p (own tensors)" in text and "on cpu: p.body" in text


def test_optimizer_state_devices() -> None:
    m = nn.Linear(8, 4)
    opt = torch.optim.Adam(m.parameters())
    r = device_report(opt, "opt")
    assert usage(r, "parameters")["cpu"] == (2, 36, 144)
    assert any("no optimizer state yet" in n for n in r.notes)
    m(torch.randn(3, 8)).sum().backward()
    opt.step()
    r = device_report(opt, "opt")
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert usage(r, "optimizer state")["cpu"] == (
        len(state), sum(v.numel() for v in state), sum(v.numel() * v.element_size() for v in state))
    assert not r.mismatched_state
    # state on another device than its parameter (the "moved the model afterwards" bug)
    p = m.weight
    opt.state[p]["exp_avg"] = torch.empty_like(opt.state[p]["exp_avg"], device="meta")
    r = device_report(opt, "opt")
    assert len(r.mismatched_state) == 1 and "exp_avg" in r.mismatched_state[0]
    assert any("another device than their parameter" in w for w in r.warnings)


def test_tensor_and_state_dict() -> None:
    x = torch.randn(3, requires_grad=True)
    x.sum().backward()
    r = device_report(x, "x")
    assert usage(r, "tensor") == {"cpu": (1, 3, 12)} and usage(r, "grad") == {"cpu": (1, 3, 12)}
    sd = SmallCNN().state_dict()
    r = device_report(sd, "sd")
    assert usage(r, "tensors")["cpu"][0] == len(sd)


def test_availability_line_and_no_cuda_init() -> None:
    was = torch.cuda.is_initialized() if HAS_CUDA else False
    r = device_report(nn.Linear(2, 2))
    line = r.availability
    assert line.startswith("CUDA: yes" if torch.cuda.is_available() else "CUDA: no")
    assert "MPS: " in line and "default device: cpu" in line
    if HAS_CUDA:
        assert torch.cuda.is_initialized() == was


def test_availability_shows_default_device() -> None:
    with torch.device("meta"):
        assert "default device: meta" in device_report(torch.zeros(1, device="cpu")).availability


@requires_cuda
def test_cuda_mixed_model() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).cuda())
    r = device_report(m, "m")
    assert r.devices == ["cpu", "cuda:0"] and r.mixed
    assert r.modules_by_device == {"cpu": ["0"], "cuda:0": ["1"]}
    assert any("MIXED DEVICES" in w for w in r.warnings)


def test_magic_text_html_widget(ip) -> None:
    from torchmagic.display.device import widget

    ip.user_ns["cnn"] = SmallCNN()
    _, shown = run(ip, "device cnn")
    assert "parameters" in shown and "CUDA" in shown
    assert all(len(line) <= 100 for line in shown.splitlines())
    run(ip, "device cnn.head -o rep")
    rep = ip.user_ns["rep"]
    assert rep.name == "cnn.head" and "<table" in rep._repr_html_()
    assert len(widget(rep).children) == 2
    assert rep.to_dict()["usage"][0]["role"] == "parameters"


@pytest.mark.parametrize("line, message", [
    ("device nope", "%device: name 'nope' is not defined"),
    ("device 3", "%device: 3 is an int; expected an nn.Module, a tensor, an optimizer"),
    ("device [1, 2]", "%device: [1, 2] is a list; expected"),
])
def test_bad_input_one_line(ip, line: str, message: str) -> None:
    with pytest.raises(UsageError) as exc:
        run(ip, line)
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_invariants(ip) -> None:
    m = SmallCNN()
    m.head.eval()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    opt.step()

    def boom():
        raise KeyboardInterrupt

    ip.user_ns.update({"m": m, "opt": opt, "boom": boom})
    snap = Snapshot.take(m)
    run(ip, "device m")
    run(ip, "device opt")
    run(ip, "device m.features[0].weight")
    with pytest.raises(KeyboardInterrupt):
        ip.run_line_magic("device", "boom()")
    with pytest.raises(UsageError):
        run(ip, "device m.nope")
    snap.assert_unchanged()


def test_plain_python() -> None:
    r = torchmagic.device_report(nn.Linear(2, 3), "lin")
    assert r.to_dict()["devices"] == ["cpu"]
    assert "lin (Linear): cpu" in str(r)
