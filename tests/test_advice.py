"""Advice printed for the user to run is code under test: each snippet is taken from the printed
text exactly as shown (lines indented by four spaces), run in the notebook namespace, and its
effect checked against the state of the objects, not against our own report."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
from conftest import run


def _code(shown: str, after: str) -> str:
    """The code block printed after the line that contains ``after``."""
    lines = shown.splitlines()
    start = next(i for i, ln in enumerate(lines) if after in ln)
    code = []
    for ln in lines[start + 1:]:
        if ln.startswith("    "):
            code.append(ln[4:])
        elif code:
            break
    assert code, f"no code after {after!r} in:\n{shown}"
    return "\n".join(code)


def three_blocks() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential()
    m.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    m.block1 = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    m.block2 = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    return m


def _eval_bn(m: nn.Module) -> list[str]:
    return [n for n, x in m.named_modules() if isinstance(x, nn.BatchNorm2d) and not x.training]


@pytest.mark.parametrize("line, frozen", [
    ("freeze cnn.stem cnn.block1", ["stem.1", "block1.1"]),
    ("freeze cnn --except cnn.block2", ["stem.1", "block1.1"]),
    ("freeze cnn.block1.1", ["block1.1"]),
])
def test_batchnorm_advice_fixes_exactly_the_frozen_layers(ip: Any, line: str,
                                                          frozen: list[str]) -> None:
    """Issue 10 item 4: the fix loops over the frozen BatchNorm layers only; cnn.block2.1, not
    frozen, keeps training (a loop over cnn.modules() would have fixed it too)."""
    m = three_blocks()
    ip.user_ns["cnn"] = m
    _, shown = run(ip, line)
    code = _code(shown, "eval mode after every model.train()")
    assert "modules()" not in code
    ip.run_cell("cnn.train()\npass")  # no value shown: nothing kept in Out or _
    before = {k: v.clone() for k, v in m.state_dict().items()}
    result = ip.run_cell(code)
    assert result.success, code
    assert ip.user_ns["cnn"] is m
    assert _eval_bn(m) == frozen
    m(torch.randn(4, 3, 12, 12))  # a training-mode forward
    state = m.state_dict()
    for name in ("stem.1", "block1.1", "block2.1"):
        same = torch.equal(state[f"{name}.running_mean"], before[f"{name}.running_mean"])
        assert same == (name in frozen), name  # only the frozen statistics stay fixed


def test_batchnorm_advice_runs_for_many_layers_and_fits_the_width(ip: Any,
                                                                  monkeypatch: Any) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    m = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(12)])
    ip.user_ns["net"] = m
    _, shown = run(ip, "freeze net --except net.11")
    assert max(len(x) for x in shown.splitlines()) <= 60
    code = _code(shown, "eval mode after every model.train()")
    assert ip.run_cell(code).success
    assert [n for n, x in m.named_modules() if isinstance(x, nn.BatchNorm1d) and not x.training] \
        == [f"{i}.1" for i in range(11)]


def test_optimizer_and_stale_grad_advice(ip: Any) -> None:
    m = three_blocks()
    m(torch.randn(2, 3, 12, 12)).sum().backward()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.5)
    opt.step()  # state for every parameter
    ip.user_ns.update(cnn=m, opt=opt)
    _, shown = run(ip, "freeze cnn.stem")
    stem = list(m.stem.parameters())
    assert ip.run_cell(_code(shown, "Clear the frozen ones")).success
    assert all(p.grad is None for p in stem)
    assert all(p.grad is not None for p in m.block2.parameters())  # trainable ones untouched
    assert ip.run_cell(_code(shown, "state_dict() stays valid")).success
    assert ip.user_ns["opt"] is opt
    held = [p for g in opt.param_groups for p in g["params"]]
    assert not any(p is q for p in stem for q in held)
    assert len(held) == len([p for p in m.parameters() if p.requires_grad])
    assert opt.param_groups[0]["weight_decay"] == 0.5  # its settings kept
    assert not any(p is q for p in stem for q in opt.state)  # their Adam moments dropped too
    assert len(opt.state) == len(held)
    saved = opt.state_dict()  # valid: every state entry belongs to a held parameter
    again = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1)
    again.load_state_dict(saved)
    assert again.param_groups[0]["weight_decay"] == 0.5
    frozen_before = [p.detach().clone() for p in stem]
    m(torch.randn(2, 3, 12, 12)).sum().backward()
    opt.step()  # weight decay would move frozen weights if the optimizer still held them
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, stem))

    # unfreeze: the optimizer does not hold them; the printed fix adds them as a new group
    _, shown = run(ip, "unfreeze cnn.stem")
    assert ip.run_cell(_code(shown, "Add them")).success
    held = [p for g in opt.param_groups for p in g["params"]]
    assert all(any(p is q for q in held) for p in stem) and len(held) == len(set(map(id, held)))
    m(torch.randn(2, 3, 12, 12)).sum().backward()
    opt.step()
    assert opt.state[stem[0]]["step"].item() == 1  # fresh moments, not the ones from before
    opt.state_dict()
    assert not all(torch.equal(a, b) for a, b in zip(frozen_before, stem))  # now trained


def test_gradscaler_advice_runs_in_a_training_step(ip: Any) -> None:
    """%%amp's fp16 advice (a GradScaler pattern) runs as printed inside a training step, with
    the loss and optimizer it names, and scales the loss."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    ip.user_ns.update(lin=lin, x=torch.randn(4, 8), torch=torch)
    _, shown = run(ip, "amp --dtype fp16 --report", "out = lin(x)\nout.float().sum().backward()")
    code = _code(shown, "Scale the loss")
    assert "scaler.scale(loss).backward()" in code
    ip.user_ns["optimizer"] = torch.optim.SGD(lin.parameters(), lr=0.1)
    before = lin.weight.detach().clone()
    step = ("optimizer.zero_grad()\nwith torch.autocast('cpu', torch.float16):\n"
            "    loss = lin(x).float().pow(2).mean()\n")
    assert ip.run_cell(step + code).success, code
    scaler = ip.user_ns["scaler"]
    assert scaler.is_enabled() and scaler.get_scale() > 1.0
    assert not torch.equal(before, lin.weight)
