"""``%checkpoint`` on a real GPU: save from CUDA (read back by ``torch.load`` itself), load with
``--map-location cpu`` without touching the GPU, a CPU file into a CUDA model (in place: same
storages, so optimizers stay valid), ``--mmap --assign`` onto a meta model then ``.to("cuda")``
(tied weights kept, same outputs), optimizer state landing on its parameters' device."""

from __future__ import annotations

import gc
import re

import pytest
import torch
from conftest import run
from cuda_helpers import cuda_only, figure, warm_up

from torchmagic.models import GPT, GPTConfig

pytestmark = cuda_only

CFG = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, d_model=64)


def _model(seed: int, device: str = "cpu") -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).to(device)


def _trained(device: str) -> tuple[GPT, torch.optim.Optimizer]:
    model = _model(0, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, CFG.vocab_size, (2, 16), device=device)
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    return model, opt


def _same_values(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


@pytest.fixture(autouse=True)
def _warm():
    warm_up()
    yield
    gc.collect()


def test_save_from_cuda_then_load_on_cpu_without_touching_the_gpu(ip, tmp_path, request):
    model, opt = _trained("cuda")
    path = tmp_path / "c.pt"
    ip.user_ns.update(model=model, opt=opt)
    _, shown = run(ip, f"checkpoint save model {path} --optimizer opt")
    assert "cuda:0" in shown and "--map-location cpu" in shown
    raw = torch.load(path, map_location="cpu", weights_only=True)  # torch's own reader
    assert all(torch.equal(raw["model"][k], v.cpu()) for k, v in model.state_dict().items())
    assert torch.load(path, weights_only=True)["model"]["wte.weight"].is_cuda  # saved as CUDA
    ip.user_ns["cpu_model"] = cpu_model = _model(1)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _, shown = run(ip, f"checkpoint load cpu_model {path} --map-location cpu")
    peak = torch.cuda.max_memory_allocated() - before
    figure(request, "gpu_bytes_touched_by_map_location_cpu", peak)
    assert peak == 0 and torch.cuda.memory_allocated() == before
    assert all(p.device.type == "cpu" for p in cpu_model.parameters())
    assert _same_values(cpu_model, model)
    assert cpu_model.lm_head.weight is cpu_model.wte.weight
    assert re.search(r"model is on\s+cpu", shown), shown


def test_cpu_file_into_a_cuda_model_in_place(ip, tmp_path):
    src = _model(0)
    path = tmp_path / "cpu.pt"
    torch.save(src.state_dict(), path)
    ip.user_ns["dst"] = dst = _model(1, "cuda")
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    ptrs = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    _, shown = run(ip, f"checkpoint load dst {path}")
    assert all(p.is_cuda for p in dst.parameters())
    assert {k: v.data_ptr() for k, v in dst.state_dict().items()} == ptrs  # copied in place
    assert opt.param_groups[0]["params"][0] is next(dst.parameters())
    assert _same_values(dst, src) and dst.lm_head.weight is dst.wte.weight
    assert "cuda:0" in shown


def test_mmap_assign_onto_meta_then_to_cuda(ip, tmp_path, request):
    src = _model(0)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    with torch.device("meta"):
        ip.user_ns["m"] = GPT(CFG)
    _, shown = run(ip, f"checkpoint load m {path} --mmap --assign")
    m = ip.user_ns["m"]
    assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
    assert m.lm_head.weight is m.wte.weight
    before = torch.cuda.memory_allocated()
    m = m.to("cuda")
    moved = torch.cuda.memory_allocated() - before
    param_bytes = sum(p.numel() * p.element_size() for p in m.parameters())  # tied: once
    figure(request, "to_cuda_bytes", {"allocated": moved, "parameter_bytes": param_bytes})
    assert all(p.is_cuda for p in m.parameters()) and m.lm_head.weight is m.wte.weight
    assert param_bytes <= moved < param_bytes + 2 * 2**20 * len(list(m.parameters()))
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(m(ids.cuda()).cpu(), src(ids), atol=1e-4, rtol=1e-4)
    assert _same_values(m, src)
    assert "mmap" in shown and "assign" in shown


def test_optimizer_state_lands_on_the_parameters_device(ip, tmp_path):
    model, opt = _trained("cuda")
    path = tmp_path / "o.pt"
    ip.user_ns.update(model=model, opt=opt)
    run(ip, f"checkpoint save model {path} --optimizer opt")
    m2 = _model(1, "cuda")
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    ip.user_ns.update(m2=m2, o2=o2)
    run(ip, f"checkpoint load m2 {path} --optimizer o2")
    for p in m2.parameters():
        st = o2.state[p]
        assert st["exp_avg"].device == p.device and st["exp_avg_sq"].device == p.device
    ref = opt.state_dict()["state"]
    got = o2.state_dict()["state"]
    assert all(torch.equal(ref[i]["exp_avg"], got[i]["exp_avg"]) for i in ref)
    run(ip, "device o2 -o rep")
    assert ip.user_ns["rep"].mismatched_state == []
    # the same file into a CPU model and optimizer
    m3 = _model(2)
    o3 = torch.optim.AdamW(m3.parameters(), lr=1e-3)
    ip.user_ns.update(m3=m3, o3=o3)
    run(ip, f"checkpoint load m3 {path} --optimizer o3 --map-location cpu")
    assert all(o3.state[p]["exp_avg"].device.type == "cpu" for p in m3.parameters())
    assert _same_values(m3, model)
