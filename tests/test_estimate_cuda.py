"""The estimate against CUDA's own counter: ``torch.cuda.max_memory_allocated()`` of the same real
training step (a real warm-up step first, so the optimizer state exists as in any later step).

Run where a GPU is available (``pytest -m cuda -s``): it prints the error per model. The estimate
is traced on fake CUDA tensors (the same kernels' saved tensors, the 512-byte allocation rounding,
the optimizer's foreach path); what it cannot see is what PyTorch allocates outside tensors (the
cuBLAS workspace is a few MiB), hence the small absolute slack.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import requires_cuda
from estimate_helpers import CheckpointNet, mean_loss, mlp, real_cuda_peak

import torchmagic
from torchmagic.models import GPT, GPTConfig, SmallCNN

pytestmark = [pytest.mark.cuda, requires_cuda]

MiB = 2**20


def bigger_cases() -> dict:
    """The models of the CPU test list, sized so a step takes tens to hundreds of MiB."""
    def gpt() -> nn.Module:
        return GPT(GPTConfig(vocab_size=8000, block_size=256, n_layer=4, n_head=8, d_model=512))

    def ce(out: object, ids: torch.Tensor) -> torch.Tensor:
        logits = out.logits if hasattr(out, "logits") else out
        return F.cross_entropy(logits.flatten(0, -2).float(), ids.flatten())

    def llama() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376,
                                       num_hidden_layers=4, num_attention_heads=8,
                                       num_key_value_heads=4, vocab_size=8000,
                                       max_position_embeddings=512)
        return transformers.LlamaForCausalLM(cfg)

    wide = lambda: nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096),  # noqa: E731
                                 nn.GELU(), nn.Linear(4096, 1024))
    return {
        "mlp": (wide, lambda: ((torch.randn(256, 1024),), {}), mean_loss),
        "cnn_batchnorm": (SmallCNN, lambda: ((torch.randn(512, 3, 32, 32),), {}), mean_loss),
        "gpt_tied": (gpt, lambda: ((torch.randint(0, 8000, (8, 256)),), {}), ce),
        "hf_llama": (llama, lambda: ((), {"input_ids": torch.randint(0, 8000, (4, 256))}), ce),
        "torch_checkpoint": (CheckpointNet, lambda: ((torch.randn(4096, 64),), {}), mean_loss),
    }


@pytest.mark.parametrize("case", ["mlp", "cnn_batchnorm", "gpt_tied", "hf_llama",
                                  "torch_checkpoint"])
def test_estimate_against_max_memory_allocated(case: str) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    assert base == 0, "tensors of earlier tests still live on the GPU"
    make, inputs, loss_fn = bigger_cases()[case]
    torch.manual_seed(0)
    model = make()
    args, kwargs = inputs()
    est = torchmagic.estimate_memory(model, *args, *([kwargs] if kwargs else []), train=True,
                                     what_if=False)
    assert est.settings["traced on"].startswith("fake tensors (cuda")
    real = real_cuda_peak(model, args, kwargs, loss_fn)
    err = (est.peak_bytes - real) / real
    print(f"\n[estimate vs cuda] {case}: estimate {est.peak_bytes / MiB:.1f} MiB, "
          f"max_memory_allocated {real / MiB:.1f} MiB, error {100 * err:+.2f}%")
    assert abs(est.peak_bytes - real) <= 0.05 * real + 16 * MiB


def test_inference_against_max_memory_allocated() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8000, block_size=256, n_layer=4, n_head=8, d_model=512))
    ids = torch.randint(0, 8000, (8, 256))
    est = torchmagic.estimate_memory(model, ids)
    m = copy.deepcopy(model).cuda().eval()
    x = ids.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = m(x)
    torch.cuda.synchronize()
    real = torch.cuda.max_memory_allocated()
    del out
    print(f"\n[estimate vs cuda] gpt inference: estimate {est.peak_bytes / MiB:.1f} MiB, "
          f"max_memory_allocated {real / MiB:.1f} MiB, "
          f"error {100 * (est.peak_bytes - real) / real:+.2f}%")
    assert abs(est.peak_bytes - real) <= 0.05 * real + 16 * MiB


def test_verdict_uses_this_device() -> None:
    est = torchmagic.estimate_memory(mlp(), torch.randn(4, 32))
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    assert est.verdict is not None and est.verdict.capacity.total == props.total_memory
    print(f"\n[estimate vs cuda] {props.name}: total_memory {props.total_memory:,} bytes "
          f"({props.total_memory / 2**30:.2f} GiB)")


# device names as torch.cuda.get_device_name() gives them -> the table entry that stands for them
TABLE_ENTRY = {
    "NVIDIA H200": "h200", "NVIDIA H100 80GB HBM3": "h100", "NVIDIA A100-SXM4-80GB": "a100-80gb",
    "NVIDIA A100 80GB PCIe": "a100-80gb", "NVIDIA A100-SXM4-40GB": "a100", "Tesla T4": "t4",
    "NVIDIA L4": "l4", "NVIDIA A10G": "a10g", "NVIDIA L40S": "l40s",
    "NVIDIA GeForce RTX 4090": "rtx4090", "NVIDIA GeForce RTX 3090": "rtx3090",
    "Tesla V100-SXM2-16GB": "v100", "Tesla V100-SXM2-32GB": "v100-32gb",
}


def test_table_entry_is_what_this_device_reports() -> None:
    """The accelerator table holds what torch.cuda.get_device_properties reports for one device
    (within 1%: drivers differ by tens of MiB)."""
    from torchmagic.core.estimate_devices import find_accelerator

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    name = TABLE_ENTRY.get(props.name)
    if name is None:
        pytest.skip(f"{props.name} has no entry in the table")
    acc = find_accelerator(name)
    print(f"\n[estimate vs cuda] {props.name}: total_memory {props.total_memory / MiB:,.0f} MiB, "
          f"table ({acc.name}) {acc.memory / MiB:,.0f} MiB")
    assert abs(acc.memory - props.total_memory) <= 0.01 * props.total_memory
