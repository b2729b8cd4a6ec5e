"""Sweep of Hugging Face architectures through ``torchmagic.summary`` (issue 12).

Every architecture is built from a config written here (no download): small on the CPU (real
weights, a real forward) and at its published size on the meta device (no memory). For each run
the table compares

- parameters: ``summary(...).total_params`` against ``sum(p.numel() for p in model.parameters())``;
- forward FLOPs: ``summary(...).total_flops`` against an analytic count written below from the
  config alone (2 FLOPs per multiply-add of every matrix product and convolution: projections,
  MLPs and experts over the tokens routed to them, QKᵀ and AV over full sequences, heads; norms,
  activations, biases and element-wise ops count 0).

Run: ``.venv/bin/python benchmarks/hf_sweep.py [--only NAME ...] [--small-only] [--markdown]``.
The tests import :data:`ARCHS` and :func:`run_arch` to run a few architectures
(``tests/test_hf_models.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


# -- analytic FLOPs (2 per multiply-add) ---------------------------------------------------------
def attn_flops(tq: int, tk: int, heads: int, head_dim: int, batch: int = 1) -> int:
    """QKᵀ and AV over all heads: 2 · 2 · B · H · Tq · Tk · hd."""
    return 4 * batch * heads * tq * tk * head_dim


def llama_like(cfg: Any, t: int, *, experts: tuple[int, int, int] | None = None) -> int:
    """Decoder with grouped-query attention (q, k, v, o projections), a gated MLP (gate, up,
    down), or a mixture of experts ``(n_experts, top_k, expert_ff)`` (router + top-k experts of 3
    matrices), and an lm_head."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h
    hd = getattr(cfg, "head_dim", None) or d // h
    proj = d * h * hd + 2 * d * kv * hd + h * hd * d
    if experts is None:
        mlp = 3 * d * cfg.intermediate_size
    else:
        e, k, ff = experts
        mlp = d * e + k * 3 * d * ff
    layer = 2 * t * (proj + mlp) + attn_flops(t, t, h, hd)
    return cfg.num_hidden_layers * layer + 2 * t * d * cfg.vocab_size


def gpt2_flops(cfg: Any, t: int) -> int:
    d = cfg.n_embd
    ff = cfg.n_inner or 4 * d
    layer = 2 * t * (4 * d * d + 2 * d * ff) + attn_flops(t, t, cfg.n_head, d // cfg.n_head)
    return cfg.n_layer * layer + 2 * t * d * cfg.vocab_size


def opt_flops(cfg: Any, t: int) -> int:
    d = cfg.hidden_size
    layer = 2 * t * (4 * d * d + 2 * d * cfg.ffn_dim) + attn_flops(
        t, t, cfg.num_attention_heads, d // cfg.num_attention_heads)
    return cfg.num_hidden_layers * layer + 2 * t * cfg.word_embed_proj_dim * cfg.vocab_size


def mamba_flops(cfg: Any, t: int) -> int:
    """Per layer: in_proj (d -> 2·d_inner), depthwise causal conv1d (kernel k, padded by k - 1 on
    both sides then trimmed: t + k - 1 outputs computed), x_proj (d_inner -> R + 2N), dt_proj
    (R -> d_inner), the scan's readout C·h (d_inner x N per step), out_proj; tied head."""
    d, n, k = cfg.hidden_size, cfg.state_size, cfg.conv_kernel
    di = cfg.intermediate_size
    r = cfg.time_step_rank
    conv = 2 * (t + k - 1) * di * k
    layer = 2 * t * (d * 2 * di + di * (r + 2 * n) + r * di + di * n + di * d) + conv
    return cfg.num_hidden_layers * layer + 2 * t * d * cfg.vocab_size


def encoder_layer(t: int, d: int, ff: int, heads: int) -> int:
    return 2 * t * (4 * d * d + 2 * d * ff) + attn_flops(t, t, heads, d // heads)


def bert_flops(cfg: Any, t: int) -> int:
    d = cfg.hidden_size
    return (cfg.num_hidden_layers * encoder_layer(t, d, cfg.intermediate_size,
                                                  cfg.num_attention_heads) + 2 * d * d)  # pooler


def distilbert_flops(cfg: Any, t: int) -> int:
    return cfg.n_layers * encoder_layer(t, cfg.dim, cfg.hidden_dim, cfg.n_heads)


def t5_flops(cfg: Any, te: int, td: int) -> int:
    """T5: attention inner size H·d_kv; FFN d -> d_ff -> d (3 matrices when gated); decoder
    self-attention, cross-attention (k, v over the encoder's tokens) and FFN; lm_head."""
    d, inner, ff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    ffn = (3 if cfg.is_gated_act else 2) * d * ff
    enc = 2 * te * (4 * d * inner + ffn) + 4 * te * te * inner
    dec = (2 * td * (4 * d * inner) + 4 * td * td * inner            # self-attention
           + 2 * td * 2 * d * inner + 2 * te * 2 * d * inner + 4 * td * te * inner  # cross
           + 2 * td * ffn)
    return cfg.num_layers * enc + cfg.num_decoder_layers * dec + 2 * td * d * cfg.vocab_size


def seq2seq_flops(d: int, ff_enc: int, ff_dec: int, heads: int, enc_layers: int,
                  dec_layers: int, te: int, td: int, vocab: int) -> int:
    """BART/Whisper-style encoder-decoder (d x d projections) with an lm_head over ``vocab``."""
    hd = d // heads
    enc = 2 * te * (4 * d * d + 2 * d * ff_enc) + attn_flops(te, te, heads, hd)
    dec = (2 * td * 4 * d * d + attn_flops(td, td, heads, hd)
           + 2 * td * 2 * d * d + 2 * te * 2 * d * d + attn_flops(td, te, heads, hd)
           + 2 * td * 2 * d * ff_dec)
    return enc_layers * enc + dec_layers * dec + 2 * td * d * vocab


def bart_flops(cfg: Any, te: int, td: int) -> int:
    return seq2seq_flops(cfg.d_model, cfg.encoder_ffn_dim, cfg.decoder_ffn_dim,
                         cfg.encoder_attention_heads, cfg.encoder_layers, cfg.decoder_layers,
                         te, td, cfg.vocab_size)


def whisper_flops(cfg: Any, frames: int, td: int) -> int:
    """conv1 (n_mels -> d, kernel 3) over the frames, conv2 (d -> d, kernel 3, stride 2), then an
    encoder-decoder over frames / 2 encoder positions; proj_out tied to the embedding."""
    d = cfg.d_model
    te = frames // 2
    convs = 2 * frames * cfg.num_mel_bins * d * 3 + 2 * te * d * d * 3
    return convs + seq2seq_flops(d, cfg.encoder_ffn_dim, cfg.decoder_ffn_dim,
                                 cfg.encoder_attention_heads, cfg.encoder_layers,
                                 cfg.decoder_layers, te, td, cfg.vocab_size)


def vit_tower(image: int, patch: int, channels: int, d: int, ff: int, heads: int,
              layers: int) -> tuple[int, int]:
    """(FLOPs, tokens) of a ViT tower: patch embedding convolution + encoder over patches + CLS."""
    p = (image // patch) ** 2
    s = p + 1
    return 2 * p * channels * patch * patch * d + layers * encoder_layer(s, d, ff, heads), s


def vit_flops(cfg: Any) -> int:
    f, _ = vit_tower(cfg.image_size, cfg.patch_size, cfg.num_channels, cfg.hidden_size,
                     cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers)
    return f + 2 * cfg.hidden_size * cfg.hidden_size  # pooler on the CLS token


def clip_flops(cfg: Any, t: int) -> int:
    """Text tower (t tokens) + text projection of the pooled token, vision tower + visual
    projection, and the image-text similarity matrix (1 x 1 here)."""
    tc, vc, proj = cfg.text_config, cfg.vision_config, cfg.projection_dim
    text = tc.num_hidden_layers * encoder_layer(t, tc.hidden_size, tc.intermediate_size,
                                                tc.num_attention_heads)
    vis, _ = vit_tower(vc.image_size, vc.patch_size, vc.num_channels, vc.hidden_size,
                       vc.intermediate_size, vc.num_attention_heads, vc.num_hidden_layers)
    return text + 2 * tc.hidden_size * proj + vis + 2 * vc.hidden_size * proj + 2 * proj


def wav2vec2_flops(cfg: Any, samples: int) -> int:
    """Feature encoder convolutions (1 input channel), the feature projection, the grouped
    positional convolution (output length T + 1 before its trim), and the encoder."""
    total, length, cin = 0, samples, 1
    for cout, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
        length = (length - k) // s + 1
        total += 2 * length * cin * cout * k
        cin = cout
    d = cfg.hidden_size
    total += 2 * length * cin * d
    k = cfg.num_conv_pos_embeddings
    out = length + 2 * (k // 2) - k + 1
    total += 2 * out * d * (d // cfg.num_conv_pos_embedding_groups) * k
    return total + cfg.num_hidden_layers * encoder_layer(length, d, cfg.intermediate_size,
                                                         cfg.num_attention_heads)


def resnet_flops(cfg: Any, image: int) -> int:
    """ResNet (bottleneck blocks, HF's layout: stride in the 3x3 convolution, a 1x1 projection
    shortcut on the first block of each stage): embedder 7x7/2 conv, 3x3/2 max pool, stages."""
    h = image // 2
    total = 2 * h * h * cfg.num_channels * cfg.embedding_size * 49
    h //= 2
    cin = cfg.embedding_size
    for i, (cout, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths)):
        stride = 2 if (i > 0 or cfg.downsample_in_first_stage) else 1
        red = cout // 4
        for j in range(depth):
            s = stride if j == 0 else 1
            ho = h // s
            if j == 0 and (cin != cout or s != 1):
                total += 2 * ho * ho * cin * cout  # shortcut projection
            total += 2 * h * h * cin * red + 2 * ho * ho * red * red * 9 + 2 * ho * ho * red * cout
            h, cin = ho, cout
    return total


# -- the architectures ---------------------------------------------------------------------------
@dataclass
class Arch:
    """One architecture: its config class and model class in transformers, the config keyword
    arguments of the small (CPU) and real-size (meta) builds, the forward's inputs and the
    analytic FLOPs of that forward."""

    name: str
    family: str
    config: str
    model: str
    small: dict[str, Any]
    real: dict[str, Any]
    inputs: Callable[[Any, bool], dict[str, Any]]
    flops: Callable[[Any, dict[str, Any]], int]
    real_name: str = ""
    meta_limit: str | None = None  # why the real-size build cannot run on meta (shown, not a miss)


def _ids(t: int, key: str = "input_ids") -> dict[str, Any]:
    return {key: torch.zeros(1, t, dtype=torch.long)}


def _dec(t_small: int = 16, t_real: int = 128) -> Callable[[Any, bool], dict[str, Any]]:
    return lambda cfg, small: _ids(t_small if small else t_real)


def _seq(inputs: dict[str, Any], key: str = "input_ids") -> int:
    return inputs[key].shape[-1]


_LLAMA_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

ARCHS: list[Arch] = [
    Arch("GPT-2", "decoder", "GPT2Config", "GPT2LMHeadModel",
         dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256),
         dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
         _dec(), lambda c, i: gpt2_flops(c, _seq(i)), real_name="gpt2 (124M)"),
    Arch("Llama", "decoder", "LlamaConfig", "LlamaForCausalLM", _LLAMA_SMALL,
         dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32),
         _dec(), lambda c, i: llama_like(c, _seq(i)), real_name="Llama-2-7B"),
    Arch("Mistral", "decoder", "MistralConfig", "MistralForCausalLM", _LLAMA_SMALL,
         dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8),
         _dec(), lambda c, i: llama_like(c, _seq(i)), real_name="Mistral-7B"),
    Arch("Qwen2", "decoder", "Qwen2Config", "Qwen2ForCausalLM", _LLAMA_SMALL,
         dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
         _dec(), lambda c, i: llama_like(c, _seq(i)), real_name="Qwen2-7B"),
    Arch("Gemma", "decoder", "GemmaConfig", "GemmaForCausalLM", {**_LLAMA_SMALL, "head_dim": 32},
         dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
              num_attention_heads=16, num_key_value_heads=16, head_dim=256),
         _dec(), lambda c, i: llama_like(c, _seq(i)), real_name="Gemma-7B"),
    Arch("Phi-3", "decoder", "Phi3Config", "Phi3ForCausalLM",
         {**_LLAMA_SMALL, "pad_token_id": 0},
         dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, pad_token_id=0),
         _dec(), lambda c, i: llama_like(c, _seq(i)), real_name="Phi-3-mini (3.8B)"),
    Arch("OPT", "decoder", "OPTConfig", "OPTForCausalLM",
         dict(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
              num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256),
         dict(vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
              num_attention_heads=32, word_embed_proj_dim=2048, max_position_embeddings=2048),
         _dec(), lambda c, i: opt_flops(c, _seq(i)), real_name="OPT-1.3B"),
    Arch("Mixtral", "MoE decoder", "MixtralConfig", "MixtralForCausalLM",
         {**_LLAMA_SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
         dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
              num_experts_per_tok=2),
         _dec(), lambda c, i: llama_like(c, _seq(i), experts=(
             c.num_local_experts, c.num_experts_per_tok, c.intermediate_size)),
         real_name="Mixtral-8x7B"),
    Arch("Qwen3-MoE", "MoE decoder", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
         {**_LLAMA_SMALL, "head_dim": 16, "moe_intermediate_size": 32, "num_experts": 8,
          "num_experts_per_tok": 2},
         dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
              num_attention_heads=32, num_key_value_heads=4, head_dim=128,
              moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
              tie_word_embeddings=False),
         _dec(), lambda c, i: llama_like(c, _seq(i), experts=(
             c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size)),
         real_name="Qwen3-30B-A3B"),
    Arch("Mamba", "state-space", "MambaConfig", "MambaForCausalLM",
         dict(vocab_size=128, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2),
         dict(vocab_size=50280, hidden_size=2560, state_size=16, num_hidden_layers=64, expand=2),
         _dec(16, 32), lambda c, i: mamba_flops(c, _seq(i)), real_name="mamba-2.8b (seq 32)"),
    Arch("BERT", "encoder", "BertConfig", "BertModel",
         dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256),
         dict(vocab_size=30522, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12),
         _dec(16, 128), lambda c, i: bert_flops(c, _seq(i)), real_name="bert-base"),
    Arch("DistilBERT", "encoder", "DistilBertConfig", "DistilBertModel",
         dict(vocab_size=128, dim=64, hidden_dim=128, n_layers=2, n_heads=4,
              max_position_embeddings=256),
         dict(vocab_size=30522, dim=768, hidden_dim=3072, n_layers=6, n_heads=12),
         _dec(16, 128), lambda c, i: distilbert_flops(c, _seq(i)), real_name="distilbert-base"),
    Arch("T5", "encoder-decoder", "T5Config", "T5ForConditionalGeneration",
         dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
              num_heads=4),
         dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
              num_decoder_layers=12, num_heads=12),
         lambda c, small: {**_ids(16 if small else 128),
                           **_ids(8 if small else 32, "decoder_input_ids")},
         lambda c, i: t5_flops(c, _seq(i), _seq(i, "decoder_input_ids")), real_name="t5-base"),
    Arch("BART", "encoder-decoder", "BartConfig", "BartForConditionalGeneration",
         dict(vocab_size=128, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128,
              encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, max_position_embeddings=256),
         dict(vocab_size=50265, d_model=1024, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
              encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
              decoder_attention_heads=16),
         lambda c, small: {**_ids(16 if small else 128),
                           **_ids(8 if small else 32, "decoder_input_ids")},
         lambda c, i: bart_flops(c, _seq(i), _seq(i, "decoder_input_ids")),
         real_name="bart-large",
         meta_limit="its decoder reads the values of the mask it builds (Tensor.item()): meta "
                    "tensors have none; %%meta_shape --fake runs it"),
    Arch("Whisper", "speech (encoder-decoder)", "WhisperConfig",
         "WhisperForConditionalGeneration",
         dict(vocab_size=128, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128,
              encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, num_mel_bins=16, max_source_positions=16,
              max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[]),
         dict(vocab_size=51865, d_model=768, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
              encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
              decoder_attention_heads=12, num_mel_bins=80),
         lambda c, small: {"input_features": torch.randn(1, c.num_mel_bins,
                                                         2 * c.max_source_positions),
                           **_ids(8 if small else 32, "decoder_input_ids")},
         lambda c, i: whisper_flops(c, i["input_features"].shape[-1],
                                    _seq(i, "decoder_input_ids")), real_name="whisper-small"),
    Arch("Wav2Vec2", "speech (encoder)", "Wav2Vec2Config", "Wav2Vec2Model",
         dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              conv_dim=(32, 32, 32), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2),
              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
         dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12),
         lambda c, small: {"input_values": torch.randn(1, 1600 if small else 16000)},
         lambda c, i: wav2vec2_flops(c, i["input_values"].shape[-1]),
         real_name="wav2vec2-base (1 s)"),
    Arch("ViT", "vision", "ViTConfig", "ViTModel",
         dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8),
         dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, image_size=224, patch_size=16),
         lambda c, small: {"pixel_values": torch.randn(1, 3, c.image_size, c.image_size)},
         lambda c, i: vit_flops(c), real_name="vit-base-patch16-224"),
    Arch("ResNet", "vision (CNN)", "ResNetConfig", "ResNetModel",
         dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 2], layer_type="bottleneck"),
         dict(), lambda c, small: {"pixel_values": torch.randn(1, 3, 64 if small else 224,
                                                               64 if small else 224)},
         lambda c, i: resnet_flops(c, i["pixel_values"].shape[-1]), real_name="resnet-50"),
    Arch("CLIP", "vision-language", "CLIPConfig", "CLIPModel",
         dict(text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=32),
              vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=32, patch_size=8),
              projection_dim=32),
         dict(text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                               num_hidden_layers=12, num_attention_heads=8,
                               max_position_embeddings=77),
              vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, image_size=224, patch_size=32),
              projection_dim=512),
         lambda c, small: {**_ids(16 if small else 77),
                           "pixel_values": torch.randn(1, 3, c.vision_config.image_size,
                                                       c.vision_config.image_size)},
         lambda c, i: clip_flops(c, _seq(i)), real_name="clip-vit-base-patch32"),
]


@dataclass
class Result:
    arch: str
    family: str
    size: str           # "small (cpu)" or the real model's name (meta)
    params: int
    reference_params: int
    flops: int
    analytic: int
    seconds: float
    uncounted: int = 0
    error: str | None = None
    limit: str | None = None  # a known reason it cannot run (the error is expected)

    @property
    def ok(self) -> bool:
        if self.limit is not None:
            return self.error is not None and self.params == 0
        return (self.error is None and self.params == self.reference_params
                and abs(self.flops - self.analytic) <= 0.01 * self.analytic and not self.uncounted)


def build(arch: Arch, small: bool) -> tuple[Any, Any]:
    """(config, model) of ``arch``: small on the CPU in eval mode, or real size on meta."""
    import transformers

    cfg = getattr(transformers, arch.config)(**(arch.small if small else arch.real))
    cls = getattr(transformers, arch.model)
    if small:
        torch.manual_seed(0)
        return cfg, cls(cfg).eval()
    with torch.device("meta"):
        model = cls(cfg)
    return cfg, model.eval()


def run_arch(arch: Arch, small: bool) -> Result:
    """Build ``arch`` and summarize one forward; compare with parameters() and the analytic count."""
    from torchmagic import summary

    cfg, model = build(arch, small)
    inputs = arch.inputs(cfg, small)
    t0 = time.perf_counter()
    error = None
    try:
        s = summary(model, kwargs=inputs, depth=1)
        params, flops, uncounted = s.total_params, s.total_flops or 0, len(s.uncounted)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        params = flops = uncounted = 0
    seconds = time.perf_counter() - t0
    reference = sum(p.numel() for p in model.parameters())
    return Result(arch.name, arch.family, "small (cpu)" if small else f"{arch.real_name} (meta)",
                  params, reference, flops, arch.flops(cfg, inputs), seconds, uncounted, error,
                  None if small else arch.meta_limit)


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def table(results: list[Result], markdown: bool) -> str:
    head = ["architecture", "kind", "size", "params (summary)", "= parameters()", "FLOPs (summary)",
            "analytic", "ratio", "time"]
    rows = []
    for r in results:
        if r.limit is not None and r.error is not None:
            rows.append([r.arch, r.family, r.size, "-", "-", "-", _human(r.analytic),
                         f"not on meta: {r.limit}", f"{r.seconds:.2f} s"])
            continue
        ratio = r.flops / r.analytic if r.analytic else float("nan")
        rows.append([r.arch, r.family, r.size, f"{r.params:,}",
                     "yes" if r.params == r.reference_params else f"NO ({r.reference_params:,})",
                     _human(r.flops), _human(r.analytic),
                     (f"{ratio:.4f}" if r.error is None else r.error[:40])
                     + (f" ({r.uncounted} ops not counted)" if r.uncounted else ""),
                     f"{r.seconds:.2f} s"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*["-" * w for w in widths])]
                     + [fmt.format(*row) for row in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="architecture names (default: all)")
    ap.add_argument("--small-only", action="store_true", help="skip the real-size meta builds")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("transformers is not installed (pip install -e '.[test]')")
        return 1
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    archs = [a for a in ARCHS if not args.only or a.name in args.only]
    results = []
    t0 = time.perf_counter()
    for arch in archs:
        for small in ((True,) if args.small_only else (True, False)):
            results.append(run_arch(arch, small))
            print(f"  {arch.name:<11} {'small' if small else 'real '}: "
                  f"{'ok' if results[-1].ok else 'MISMATCH'}", file=sys.stderr, flush=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: "
          f"{len(archs)} architectures, {len(results)} runs in {time.perf_counter() - t0:.1f} s")
    print(table(results, args.markdown))
    bad = [r for r in results if not r.ok]
    limited = [r for r in results if r.limit is not None]
    checked = len(results) - len(limited)
    print(f"{checked - len(bad)} of {checked} runs: parameters equal parameters() and FLOPs within "
          "1% of the analytic count" + (f" ({len(limited)} known not to run on meta)"
                                       if limited else "")
          + (f"; NOT: {', '.join(f'{r.arch} {r.size}' for r in bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ARCHS", "Arch", "Result", "build", "run_arch", "table"]
