"""``%%detect_anomaly`` on a real GPU: the forward origin (op, module, cell line) and the backward node
are the ones found on the CPU and by an independent layer-by-layer search; the forward checks stay on
the device (CUDA synchronisations counted with torch's sync debug mode: the design reads the counts
once at the end); the overhead against a plain step and against torch's ``detect_anomaly`` is
measured and recorded."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import run
from cuda_helpers import count_syncs, cuda_only, cuda_seconds, figure, warm_up

import torchmagic
from torchmagic.models import GPT, GPTConfig

pytestmark = cuda_only


def overflow_mlp(device: str) -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        mlp[0].weight.mul_(1e10)
        mlp[2].weight.mul_(1e30)
    return mlp.to(device), torch.randn(4, 8).to(device)


def first_bad_layer(mlp: nn.Sequential, x: torch.Tensor) -> str:
    """The reference: run layer by layer; the first whose output is non-finite from finite input."""
    h = x
    with torch.no_grad():
        for i, layer in enumerate(mlp):
            out = layer(h)
            if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(h).all()):
                return f"mlp.{i}"
            h = out
    return "none"


@pytest.fixture(autouse=True)
def _warm():
    warm_up()


def test_forward_origin_and_backward_node_as_on_cpu(ip, request):
    found = {}
    for dev in ("cpu", "cuda"):
        mlp, x = overflow_mlp(dev)
        ip.user_ns.update(mlp=mlp, x=x)
        _, shown = run(ip, "detect_anomaly", "h = mlp(x)\nh.sum().backward()")
        rep = torchmagic.find_anomaly(lambda: mlp(x).sum().backward(), namespace={"mlp": mlp})  # noqa: B023
        o = rep.origin
        found[dev] = {"line": shown.splitlines()[0], "op": o.op, "module": o.module_path,
                      "reference": first_bad_layer(mlp, x), "device": rep.device,
                      "nan": o.nan, "inf": o.inf}
        w = torch.zeros(3, device=dev, requires_grad=True)
        ip.user_ns["w"] = w
        _, shown = run(ip, "detect_anomaly", "r = torch.where(w > 0, torch.sqrt(w), 0.0)\n"
                       "r.sum().backward()")
        found[dev]["backward"] = shown.splitlines()[0]
    figure(request, "origin", found)
    cpu, cuda = found["cpu"], found["cuda"]
    assert cuda["device"] == "cuda" and cpu["device"] == "cpu"
    assert cuda["reference"] == cpu["reference"] == cuda["module"] == cpu["module"] == "mlp.2"
    assert cuda["op"] == cpu["op"] == "aten.addmm"
    # the forward part of the verdict; NaN or Inf may differ (cuBLAS accumulates with FMA, the
    # CPU kernel differently), and so may what the non-finite values do later in backward
    same = [re.sub(r"\b(NaN|Inf)\b", "NaN/Inf", found[d]["line"].split(";")[0])
            for d in ("cpu", "cuda")]
    assert same[0] == same[1] and same[1].endswith("born in aten.addmm in mlp.2 at cell line 1")
    assert cuda["backward"] == cpu["backward"] == \
        "NaN/Inf found: backward NaN in SqrtBackward0 (from cell line 1)"


def _gpt(n_layer: int = 2, d: int = 256) -> tuple[GPT, torch.Tensor]:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=4096, block_size=256, n_layer=n_layer, n_head=max(1, d // 64),
                    d_model=d)
    return GPT(cfg).cuda(), torch.randint(0, 4096, (4, 256), device="cuda")


def test_forward_checks_add_at_most_two_synchronisations(request):
    """Per-op counts stay on the device and are read once when the block ends (one read for the
    ops, one for the module outputs), whatever the number of ops."""
    model, ids = _gpt()

    def forward():
        return model(ids)

    forward()
    with count_syncs() as plain:
        forward()
    with count_syncs() as checked:
        rep = torchmagic.find_anomaly(forward, namespace={"model": model}, backward=False)
    loss_fn = lambda: model(ids).float().logsumexp(-1).mean().backward()  # noqa: E731
    with count_syncs() as with_backward:
        rep_b = torchmagic.find_anomaly(loss_fn, namespace={"model": model})
    model.zero_grad(set_to_none=True)
    figure(request, "syncs", {"plain_forward": len(plain), "checked_forward": len(checked),
                              "forward_ops": rep.forward_ops,
                              "forward_and_backward_checked": len(with_backward),
                              "backward_ops": rep_b.backward_ops})
    assert rep.clean and rep_b.clean and rep.forward_ops >= 20
    assert len(checked) - len(plain) <= 2, checked
    assert rep.device == "cuda"


def test_overhead_is_measured(request):
    model, ids = _gpt(n_layer=4, d=768)

    def step():
        model.zero_grad(set_to_none=True)
        model(ids).float().logsumexp(-1).mean().backward()

    def forward():
        with torch.no_grad():
            model(ids)

    def torch_anomaly():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.detect_anomaly(check_nan=True):
                step()

    ns = {"model": model}
    times = {
        "step": cuda_seconds(step, runs=5),
        "step_torchmagic": cuda_seconds(lambda: torchmagic.find_anomaly(step, namespace=ns),
                                        runs=5),
        "step_torch_detect_anomaly": cuda_seconds(torch_anomaly, runs=5),
        "forward": cuda_seconds(forward, runs=5),
        "forward_torchmagic": cuda_seconds(
            lambda: torchmagic.find_anomaly(forward, namespace=ns, backward=False), runs=5),
    }
    ratios = {
        "step_torchmagic_vs_plain": times["step_torchmagic"] / times["step"],
        "step_torch_detect_anomaly_vs_plain": times["step_torch_detect_anomaly"] / times["step"],
        "forward_torchmagic_vs_plain": times["forward_torchmagic"] / times["forward"],
    }
    figure(request, "seconds", {k: round(v, 6) for k, v in times.items()})
    figure(request, "overhead_ratio", {k: round(v, 2) for k, v in ratios.items()})
    print("detect_anomaly overhead on CUDA (GPT d=768, 4 layers, 4x256):",
          ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    assert all(v > 0 for v in times.values())
    model.zero_grad(set_to_none=True)
