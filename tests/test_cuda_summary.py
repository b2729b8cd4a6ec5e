"""``%summary`` on a real GPU: ``--device cuda`` and a model already on CUDA give the same FLOPs and
parameters as on the CPU, equal to torch's own ``FlopCounterMode`` on the CUDA forward and to the
analytic count; the fused attention kernels (flash, memory-efficient, cuDNN) are counted; the
model's device, values and the allocator's count are the same afterwards."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from conftest import run
from cuda_helpers import cuda_only, figure, warm_up
from statecheck import Snapshot
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from torchmagic import summary
from torchmagic.models import GPT, GPTConfig

pytestmark = cuda_only

CFG = GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, d_model=256)  # head dim 64
B, T = 2, 128


def analytic_flops(cfg: GPTConfig, b: int, t: int) -> int:
    """Matmul FLOPs of GPT's forward, 2 per multiply-add (written here, independent of torchmagic):
    per token and layer qkv 3d², proj d², MLP 8d²; attention QKᵀ and AV 2·t²·d per sequence and
    layer (causal masking does not change the kernel's work as torch counts it); the lm_head d·V."""
    d = cfg.d_model
    per_layer = b * t * 2 * (3 * d * d + d * d + 8 * d * d) + b * 2 * 2 * t * t * d
    return cfg.n_layer * per_layer + b * t * 2 * d * cfg.vocab_size


def torch_flops(model: torch.nn.Module, *args: torch.Tensor) -> int:
    """torch's own count of one forward (no gradients)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args)
    return int(counter.get_total_flops())


class OpNames(TorchDispatchMode):
    """The aten ops a forward runs (to see which attention kernel torch picked)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG)


@pytest.fixture(autouse=True)
def _warm():
    warm_up()
    yield
    gc.collect()


def test_device_cuda_counts_like_the_cpu_and_leaves_the_model(request):
    model, ids = _model(), torch.randint(0, CFG.vocab_size, (B, T))
    twin = copy.deepcopy(model).cuda()
    reference = torch_flops(twin, ids.cuda())
    del twin
    gc.collect()
    snap = Snapshot.take(model, ids=ids)
    before = torch.cuda.memory_allocated()
    on_cpu = summary(model, ids)
    on_gpu = summary(model, ids, device="cuda")
    gc.collect()
    after = torch.cuda.memory_allocated()
    figure(request, "flops", {"cuda": on_gpu.total_flops, "cpu": on_cpu.total_flops,
                              "torch_FlopCounterMode_cuda": reference,
                              "analytic": analytic_flops(CFG, B, T)})
    figure(request, "allocated_after_minus_before", after - before)
    snap.assert_unchanged()
    assert on_gpu.error is None and on_gpu.device == "cuda:0"
    assert on_gpu.total_flops == on_cpu.total_flops == reference == analytic_flops(CFG, B, T)
    assert on_gpu.total_params == on_cpu.total_params == sum(p.numel() for p in model.parameters())
    assert {r.path: r.flops for r in on_gpu.rows} == {r.path: r.flops for r in on_cpu.rows}
    assert after == before, "the CUDA copy made for --device cuda is still allocated"


def test_model_on_cuda_keeps_its_device_values_and_memory(ip, request):
    model = _model().cuda()
    ids = torch.randint(0, CFG.vocab_size, (B, T), device="cuda")
    reference = torch_flops(model, ids)
    ip.user_ns.update(model=model, ids=ids)
    snap = Snapshot.take(model, ids=ids)
    gc.collect()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _, shown = run(ip, "summary model ids --depth 1 -o s")
    peak = torch.cuda.max_memory_allocated() - before
    ip.user_ns.pop("s")
    gc.collect()
    after = torch.cuda.memory_allocated()
    figure(request, "summary_peak_extra_bytes", peak)
    snap.assert_unchanged()
    assert "on cuda:0" in shown.splitlines()[0]
    assert after == before
    s_cpu = summary(copy.deepcopy(model).cpu(), ids.cpu())
    s = summary(model, ids)
    assert s.total_flops == s_cpu.total_flops == reference
    assert s.total_params == s_cpu.total_params
    # shapes as INPUTS, made on the model's device
    run(ip, "summary model (2,64) --dtypes long --depth 1 -o s2")
    assert ip.user_ns["s2"].device == "cuda:0" and ip.user_ns["s2"].error is None
    assert ip.user_ns["s2"].total_flops == analytic_flops(CFG, 2, 64)


def test_magic_device_cuda_on_a_cpu_model(ip):
    ip.user_ns["m"] = model = _model()
    snap = Snapshot.take(model)
    _, shown = run(ip, "summary m (2,64) --dtypes long --depth 1 --device cuda -o s")
    snap.assert_unchanged()
    s = ip.user_ns["s"]
    assert s.device == "cuda:0" and s.total_flops == analytic_flops(CFG, 2, 64)
    assert "on cuda:0" in shown.splitlines()[0]
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("backend, op", [
    ("FLASH_ATTENTION", "_scaled_dot_product_flash_attention"),
    ("EFFICIENT_ATTENTION", "_scaled_dot_product_efficient_attention"),
    ("CUDNN_ATTENTION", "_scaled_dot_product_cudnn_attention"),
])
def test_fused_attention_kernels_are_counted(backend, op, request):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not hasattr(SDPBackend, backend):
        pytest.skip(f"this torch has no SDPBackend.{backend}")
    kernel = getattr(SDPBackend, backend)
    model = _model().to("cuda", torch.bfloat16)
    ids = torch.randint(0, CFG.vocab_size, (B, T), device="cuda")
    names = OpNames()
    try:
        with sdpa_kernel(kernel), names, torch.no_grad():
            model(ids)
    except RuntimeError as exc:  # this GPU / build has no such kernel for these inputs
        pytest.skip(f"{backend} cannot run here: {' '.join(str(exc).split())[:160]}")
    assert op in names.names, f"expected {op}, torch ran {sorted(n for n in names.names if 'dot' in n)}"
    with sdpa_kernel(kernel):
        s = summary(model, ids)
        reference = torch_flops(model, ids)
    cpu = summary(_model(), ids.cpu())  # float32 on the CPU: torch's CPU attention op
    figure(request, f"flops_{backend.lower()}", {"summary": s.total_flops, "torch": reference,
                                                 "cpu_float32": cpu.total_flops})
    assert s.error is None
    assert s.total_flops == reference == analytic_flops(CFG, B, T) == cpu.total_flops
    attn = [r for r in s.rows if r.path.endswith("attn")]
    d = CFG.d_model
    for r in attn:  # qkv + proj + the attention kernel itself
        assert r.flops == B * T * 2 * 4 * d * d + B * 4 * T * T * d
