"""Hugging Face models built from configs in code (no download): a few architectures of the
sweep in ``benchmarks/hf_sweep.py`` (parameters against ``parameters()``, FLOPs against the
analytic counts written there), the Llama-on-meta-with-a-mask message, ModelOutput results and
keyword inputs of submodules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import run
from statecheck import Snapshot

from torchmagic.core.summary import summary

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # importing transformers and its models: ~5 s

_SPEC = importlib.util.spec_from_file_location(
    "hf_sweep", Path(__file__).resolve().parents[1] / "benchmarks" / "hf_sweep.py")
hf_sweep = sys.modules.setdefault("hf_sweep", importlib.util.module_from_spec(_SPEC))
if not hasattr(hf_sweep, "ARCHS"):
    _SPEC.loader.exec_module(hf_sweep)  # type: ignore[union-attr]
ARCHS = {a.name: a for a in hf_sweep.ARCHS}


@pytest.mark.parametrize("name", ["Llama", "Mixtral", "Qwen3-MoE", "T5", "Whisper", "Mamba",
                                  "CLIP", "ResNet"])
def test_small_architectures_on_cpu(name: str) -> None:
    r = hf_sweep.run_arch(ARCHS[name], small=True)
    assert r.error is None, r.error
    assert r.params == r.reference_params
    assert r.flops == r.analytic, (r.flops, r.analytic)
    assert not r.uncounted


@pytest.mark.slow
def test_mixtral_8x7b_on_meta_counts_expert_flops() -> None:
    """Mixtral-8x7B at seq 128 on meta: 3.27 TFLOPs analytic (0.386 T when experts were 0)."""
    r = hf_sweep.run_arch(ARCHS["Mixtral"], small=False)
    assert r.error is None and r.params == r.reference_params == 46_702_792_704
    assert abs(r.flops - r.analytic) <= 0.01 * r.analytic and r.analytic > 3.2e12


def small_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(**hf_sweep._LLAMA_SMALL)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_model_output_and_submodule_keyword_inputs() -> None:
    m = small_llama()
    ids = torch.zeros(1, 8, dtype=torch.long)
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    snap = Snapshot.take(m)
    s = summary(m, batch, depth=10)
    snap.assert_unchanged()
    assert s.output_type == "CausalLMOutputWithPast" and s.output_shapes[0] == (1, 8, 128)
    assert "Output: CausalLMOutputWithPast: (1, 8, 128)" in str(s)
    called = [r for r in s.rows if r.calls]
    assert called and all(r.input_shapes for r in called)  # no "-" input on a called row
    attn = next(r for r in s.rows if r.path == "model.layers.0.self_attn")
    assert "hidden_states" in attn.input_kwargs and "position_embeddings" in attn.input_kwargs


def test_meta_llama_with_attention_mask_runs_on_fake_tensors(ip) -> None:
    """transformers reads the mask's values (is it all ones?): meta tensors have none, so the
    forward is run again on fake tensors, with the FLOPs of the analytic count."""
    cfg = transformers.LlamaConfig(**hf_sweep._LLAMA_SMALL)
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(cfg)
    ids = torch.zeros(2, 8, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    s = summary(m, batch)
    assert s.error is None and s.output_shapes[0] == (2, 8, cfg.vocab_size)
    assert s.total_flops == hf_sweep.llama_like(cfg, 8) * 2  # batch of 2
    assert any("fake twin" in n for n in s.notes) and s.device == "fake tensors (cpu)"
    real = small_llama()  # the same forward on real weights counts the same
    assert summary(real, batch).total_flops == s.total_flops
    ip.user_ns.update(llama=m, batch=batch)
    run(ip, "summary llama batch --meta -o r")
    assert ip.user_ns["r"].total_flops == s.total_flops
    from torch._subclasses.fake_tensor import FakeTensor

    assert all(p.is_meta and not isinstance(p, FakeTensor) for p in m.parameters())
