"""Small built-in example models (no downloads) for the tour, the examples and the tests.

- :class:`SmallCNN`: conv/BatchNorm/pool/linear classifier for ``(N, 3, 32, 32)`` images.
- :class:`GPT`: a GPT-style decoder (token + position embeddings, pre-norm blocks with
  ``F.scaled_dot_product_attention``, GELU MLP, tied ``lm_head``); ``GPT.small()`` has GPT-2-small's
  shapes (124,439,808 parameters).
- :class:`Llama`: a Llama-style decoder (RMSNorm, rotary-free GQA attention, SwiGLU MLP, untied head);
  ``Llama.config_7b()`` / ``config_70b()`` give the published sizes; build them on the meta device.
- :class:`MoE`: a mixture-of-experts MLP (router + top-k experts run with ``torch._grouped_mm``
  over tokens sorted by expert, as Hugging Face transformers 5 runs them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """A CIFAR-sized classifier: 3x32x32 -> ``num_classes`` logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class GPTConfig:
    vocab_size: int = 1000
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    tie_weights: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-style decoder; input ``(batch, seq)`` token ids, output ``(batch, seq, vocab)`` logits."""

    def __init__(self, cfg: GPTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or GPTConfig()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight

    @classmethod
    def small(cls) -> GPT:
        """GPT-2-small shapes: 12 layers, d=768, 12 heads, vocab 50257, context 1024."""
        return cls(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    d_model: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32
    d_ff: int = 11008


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv = cfg.n_head, cfg.n_kv_head
        self.hd = cfg.d_model // cfg.n_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * self.hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.hd, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        if self.n_kv != self.n_head:
            rep = self.n_head // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama-style decoder; build big ones under ``with torch.device("meta"):``."""

    def __init__(self, cfg: LlamaConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or LlamaConfig(vocab_size=1000, d_model=64, n_layer=2, n_head=4,
                                            n_kv_head=2, d_ff=172)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    @staticmethod
    def config_7b() -> LlamaConfig:
        return LlamaConfig(32000, 4096, 32, 32, 32, 11008)

    @staticmethod
    def config_70b() -> LlamaConfig:
        return LlamaConfig(32000, 8192, 80, 64, 8, 28672)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class MoE(nn.Module):
    """Router + ``n_experts`` SiLU MLP experts (``d_model -> d_ff -> d_model``), each token sent to
    its ``top_k`` experts: tokens are sorted by expert and every expert's rows run in one
    ``torch._grouped_mm(x, W[E, in, out], offs=cumulative counts)``. Input ``(tokens, d_model)``.
    Forward FLOPs: router ``2*T*d*E`` + experts ``2 * 2*T*k*d*ff`` (only routed rows)."""

    def __init__(self, d_model: int = 16, n_experts: int = 4, top_k: int = 2, d_ff: int = 32
                 ) -> None:
        super().__init__()
        self.top_k, self.n_experts = top_k, n_experts
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_up = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * d_model ** -0.5)
        self.w_down = nn.Parameter(torch.randn(n_experts, d_ff, d_model) * d_ff ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        token = order // self.top_k
        counts = (flat[:, None] == torch.arange(self.n_experts, device=x.device)).sum(0)
        offs = counts.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(x[token], self.w_up, offs=offs))
        y = torch._grouped_mm(h, self.w_down, offs=offs)
        return torch.zeros_like(x).index_add(0, token, y * weights.flatten()[order][:, None])


def gpt_forward_flops(cfg: GPTConfig, batch: int, seq: int) -> int:
    """Analytic forward FLOPs (2 per multiply-add; matmuls only, as torch's FLOP counter counts)
    of :class:`GPT`: per layer qkv 3d², proj d², MLP 8d² per token, attention 2·seq²·d per sequence
    (QKᵀ and AV), plus the lm_head."""
    d, L, V = cfg.d_model, cfg.n_layer, cfg.vocab_size
    per_token_layer = 2 * (3 * d * d + d * d + 8 * d * d)
    attn = 2 * 2 * seq * seq * d  # QK^T and AV, per sequence per layer
    return batch * (L * (seq * per_token_layer + attn) + seq * 2 * d * V)


__all__ = ["SmallCNN", "GPT", "GPTConfig", "Llama", "LlamaConfig", "MoE", "gpt_forward_flops"]
