"""``%device`` and ``%tensor`` on a real GPU: a model split across the CPU and CUDA, bytes per device
against sums computed here; the optimizer whose state stayed on the CPU after the model moved; CUDA
tensor statistics in one device-to-host transfer with bounded temporaries, equal to a float64
reference computed on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import run
from cuda_helpers import count_syncs, cuda_only, figure, warm_up

from torchmagic import tensor_stats
from torchmagic.core.tensor import CHUNK_ELEMENTS

pytestmark = cuda_only


@pytest.fixture(autouse=True)
def _warm():
    warm_up()


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_model_split_across_cpu_and_cuda(ip):
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.BatchNorm1d(64).cuda(),
                      nn.Linear(64, 10).cuda())
    ip.user_ns["m"] = m
    _, shown = run(ip, "device m -o rep")
    rep = ip.user_ns["rep"]
    assert rep.devices == ["cpu", "cuda:0"] and rep.mixed
    assert rep.modules_by_device == {"cpu": ["0"], "cuda:0": ["2", "3"]}
    usage = {(u.role, u.device): u for u in rep.usage}
    assert usage["parameters", "cuda:0"].bytes == _bytes(p for p in m.parameters() if p.is_cuda)
    assert usage["parameters", "cpu"].bytes == _bytes(p for p in m.parameters() if not p.is_cuda)
    assert usage["buffers", "cuda:0"].bytes == _bytes(m.buffers())
    assert "MIXED DEVICES" in shown and torch.cuda.get_device_name(0) in shown
    with pytest.raises(RuntimeError, match="device"):  # what the warning says would happen
        m(torch.randn(4, 64))


def test_optimizer_state_left_on_the_cpu_is_flagged(ip):
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 32)).sum().backward()
    opt.step()
    model.cuda()  # moves the parameters in place; Adam's state stays on the CPU
    on_cpu = sum(1 for p in model.parameters() for k, v in opt.state[p].items()
                 if isinstance(v, torch.Tensor) and v.dim() > 0 and v.device != p.device)
    ip.user_ns["opt"] = opt
    run(ip, "device opt -o rep")
    rep = ip.user_ns["rep"]
    assert len(rep.mismatched_state) == on_cpu == 8
    assert rep.devices == ["cuda:0"]


def _reference(t: torch.Tensor) -> dict[str, float]:
    x = t.detach().cpu().double()
    fin = torch.isfinite(x)
    v = x[fin]
    return {"nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum()),
            "finite": int(fin.sum()), "zeros": int((x == 0).sum()), "min": float(v.min()),
            "max": float(v.max()), "mean": float(v.mean()), "std": float(v.std())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_statistics_in_one_transfer_with_bounded_temporaries(dtype, request):
    torch.manual_seed(0)
    t = torch.randn(50_000_000, device="cuda").to(dtype)  # 12 chunks of 4 Mi elements
    t[::1000] = float("nan")
    t[5], t[7], t[9] = float("inf"), float("-inf"), 0.0
    ref = _reference(t)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with count_syncs() as syncs:
        s = tensor_stats(t)
    extra = torch.cuda.max_memory_allocated() - base
    name = str(dtype).replace("torch.", "")
    figure(request, f"stats_{name}", {"syncs": len(syncs), "extra_peak_bytes": extra,
                                      "tensor_bytes": t.numel() * t.element_size()})
    assert len(syncs) <= 1, syncs
    assert (s.nan, s.inf, s.finite, s.zeros) == (ref["nan"], ref["inf"], ref["finite"],
                                                 ref["zeros"])
    assert (s.min, s.max) == (ref["min"], ref["max"])
    assert math.isclose(s.mean, ref["mean"], rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(s.std, ref["std"], rel_tol=1e-6)
    # a chunk's float64 temporaries (a few live at once), not a float64 copy of the tensor (400 MB)
    assert extra <= 6 * 8 * CHUNK_ELEMENTS + 16 * 2**20
    assert extra < t.numel() * 8 / 2


def test_tensor_and_tensors_magics_on_cuda(ip):
    x = torch.randn(64, 32, device="cuda")
    x[0, 0] = float("nan")
    ip.user_ns.update(x=x, v=x[1:], c=x.cpu())
    _, shown = run(ip, "tensor x v -o info")
    assert "cuda:0" in shown and "view of x" in shown
    _, shown = run(ip, "tensors -o all")
    rows = {line.split()[0]: line for line in shown.splitlines() if line.split()}
    assert "cuda:0" in rows["x"] and "NaN" in rows["x"] and "cpu" in rows["c"]
