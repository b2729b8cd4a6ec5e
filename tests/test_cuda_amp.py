"""``%%amp`` and ``%amp on|off`` on a real GPU: fp16 and bf16 autocast on CUDA, the op dtype report
against the dtypes of the tensors the cell produced (CUDA autocast's documented policy: matmuls in
low precision, softmax and layer_norm in float32), the GradScaler advice for fp16 run as printed
and its effect checked, and the autocast state restored exactly."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from conftest import run
from cuda_helpers import cuda_only, figure

import torchmagic

pytestmark = cuda_only

CELL = "h = lin(x)\np = h.softmax(-1)\nn = ln(h)\n(h.dtype, p.dtype, n.dtype)"
DTYPES = [("fp16", torch.float16), ("bf16", torch.bfloat16)]


def _autocast_state() -> tuple[bool, torch.dtype, bool]:
    return (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            torch.is_autocast_cache_enabled())


@pytest.fixture
def parts(ip):
    torch.manual_seed(0)
    ip.user_ns.update(lin=nn.Linear(64, 64).cuda(), ln=nn.LayerNorm(64).cuda(),
                      x=torch.randn(8, 64, device="cuda"))
    return ip.user_ns


@pytest.mark.parametrize("flag, dtype", DTYPES)
def test_cell_runs_in_that_dtype_and_the_report_says_so(ip, parts, flag, dtype, request):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    state = _autocast_state()
    value, shown = run(ip, f"amp --dtype {flag} --device cuda --report", CELL)
    assert _autocast_state() == state
    # what the tensors say: the matmul ran in the low dtype, softmax and layer_norm in float32
    assert value == (dtype, torch.float32, torch.float32)
    low = str(dtype).replace("torch.", "")
    assert shown.startswith(f"autocast cuda {low}: 1 of 3 floating-point forward ops in {low}")
    rows = dict(re.findall(r"^(\w+)\s+(\w+)\s+\d+\s*$", shown, re.M))
    assert rows.get("addmm") == low, shown
    assert rows.get("_softmax") == "float32" and rows.get("native_layer_norm") == "float32", shown
    # the same through the plain-Python API
    with torchmagic.amp("cuda", flag) as amp_run:
        h = parts["lin"](parts["x"])
        p = h.softmax(-1)
    rep = amp_run.report
    figure(request, f"report_{flag}", rep.by_dtype)
    assert {(o.op, o.dtype) for o in rep.ops} >= {("addmm", low), ("_softmax", "float32")}
    assert (h.dtype, p.dtype) == (dtype, torch.float32)
    assert rep.low_precision_ops == 1 and rep.casts >= 3  # input, weight and bias cast to low
    assert _autocast_state() == state


def _advice(shown: str) -> list[str]:
    return [ln.strip() for ln in shown.splitlines() if ln.strip().startswith("scaler")]


def test_fp16_gradscaler_advice_runs_and_fixes_the_underflow(ip, parts, request):
    """A loss scaled by 1e-9: its fp16 gradient underflows to zero (the smallest fp16 subnormal is
    6e-8), so the weights get no gradient. The printed GradScaler lines, run as printed, fix it."""
    lin = parts["lin"]
    lr = 1e6  # the unscaled gradients are ~1e-9: a visible step needs a large rate
    parts["optimizer"] = opt = torch.optim.SGD(lin.parameters(), lr=lr)
    _, shown = run(ip, "amp --dtype fp16 --device cuda --report",
                   "loss = (lin(x).float() * 1e-9).sum()\nloss.backward()")
    advice = _advice(shown)
    assert "GradScaler" in shown and advice == [
        'scaler = torch.amp.GradScaler("cuda")', "scaler.scale(loss).backward()",
        "scaler.step(optimizer)", "scaler.update()"], shown
    assert torch.count_nonzero(lin.weight.grad) == 0, "the fp16 gradient did not underflow"
    lin.zero_grad(set_to_none=True)
    before = lin.weight.detach().clone()
    ns = {"torch": torch, "optimizer": opt}
    with torch.autocast("cuda", torch.float16):
        ns["loss"] = (lin(parts["x"]).float() * 1e-9).sum()
    exec("\n".join(advice), ns)  # the advice, as printed
    grad = lin.weight.grad  # unscaled in place by scaler.step
    nonzero = int(torch.count_nonzero(grad))
    figure(request, "grads_nonzero_with_scaler", {"nonzero": nonzero, "of": grad.numel(),
                                                  "scale": ns["scaler"].get_scale()})
    assert nonzero > 0.9 * grad.numel()
    assert ns["scaler"].get_scale() == 65536.0  # no inf/NaN found: the step was taken
    assert torch.allclose(lin.weight.detach(), before - lr * grad, rtol=1e-4, atol=1e-6)
    assert not torch.equal(lin.weight.detach(), before)
    # bf16 has float32's range: no underflow, no advice
    if torch.cuda.is_bf16_supported():
        lin.zero_grad(set_to_none=True)
        _, shown = run(ip, "amp --dtype bf16 --device cuda --report",
                       "loss = (lin(x).float() * 1e-9).sum()\nloss.backward()")
        assert "GradScaler" not in shown and torch.count_nonzero(lin.weight.grad) > 0


def test_amp_on_off_keeps_autocast_for_following_cells_then_restores(ip, parts):
    state = _autocast_state()
    _, shown = run(ip, "amp on --dtype fp16 --device cuda")
    assert "cuda float16" in shown
    ip.run_cell("y = lin(x)")
    assert ip.user_ns["y"].dtype == torch.float16
    ip.run_cell("z = lin(x) @ lin(x).T")
    assert ip.user_ns["z"].dtype == torch.float16
    run(ip, "amp off")
    assert _autocast_state() == state
    ip.run_cell("y = lin(x)")
    assert ip.user_ns["y"].dtype == torch.float32

