"""Llama-family decoder (Llama incl. llama3 RoPE, Mistral, Qwen2 qkv bias, Qwen3 q/k norm).

Module paths mirror HF's so checkpoint names map 1:1, except the fused projections the class
declares in ``packed_modules`` (HF's q/k/v and gate/up tensors load into one fused
shard-aware layer each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.layers.attention import PagedAttention
from engine_core.layers.elementwise import TORCH, Elementwise, split_qkv
from engine_core.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine_core.layers.linear import (
    LinearFn,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from engine_core.layers.norm import RMSNorm
from engine_core.layers.rotary import RopeTables, RotaryEmbedding, apply_rope
from engine_core.model_config import ModelConfig
from engine_core.parallel import TPContext

# HF leaf module -> (our fused module, shard id)
PACKED: dict[str, tuple[str, object]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


@dataclass(frozen=True)
class ModelOps:
    """Ops chosen once per engine: the matmul (deterministic mode swaps in a batch-invariant
    one), the attention backend (``layers.attention.choose_backend``), the elementwise ops
    (``layers.elementwise.choose_elementwise``) and, where all of those are C kernels, the
    one-call decoder layers (``layers.fused_layer.choose_fused_layers``; None otherwise)."""

    attention: Any
    linear: LinearFn = F.linear
    elementwise: Elementwise = TORCH
    fused_layers: Any = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, be: ModelOps):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.qkv_bias,
            tp,
            be.linear,
        )
        self.heads, self.kv_heads = self.qkv_proj.local_heads, self.qkv_proj.local_kv_heads
        self.head_dim = cfg.head_dim
        self.elementwise = be.elementwise
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, False, tp, be.linear)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attn = PagedAttention(
            self.heads, self.kv_heads, cfg.head_dim, cfg.head_dim**-0.5, be.attention
        )

    def forward(self, rope: RopeTables, x: torch.Tensor, meta):
        qkv = self.qkv_proj(x)
        if self.qk_norm:  # the norms come between the projection and RoPE
            q, k, v = split_qkv(qkv, self.heads, self.kv_heads, self.head_dim)
            q, k = apply_rope(rope, self.q_norm(q), self.k_norm(k))
        else:
            q, k, v = self.elementwise.rope_qkv(rope, qkv, self.heads, self.kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, meta))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, be: ModelOps):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [inter, inter], False, tp, be.linear
        )
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, False, tp, be.linear)
        self.elementwise = be.elementwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.elementwise.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, be: ModelOps):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, be.elementwise)
        self.self_attn = Attention(cfg, tp, be)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, be.elementwise)
        self.mlp = MLP(cfg, tp, be)

    def forward(self, rope: RopeTables, x, meta):
        attended = self.self_attn(rope, self.input_layernorm(x), meta)
        x, h = self.post_attention_layernorm.add_norm(x, attended)
        return x + self.mlp(h)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, max_positions: int, be: ModelOps):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, be) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, be.elementwise)
        # q/k norms (Qwen3) sit between kernels the one-call layers run back to back.
        self.fused = None if cfg.qk_norm else be.fused_layers

    def forward(self, ids, positions, meta):
        # The residual stream is in the norms' dtype (matrices may be stored narrower).
        x = self.embed_tokens(ids).to(self.norm.weight.dtype)
        rope = self.rotary_emb.tables(positions, x.dtype)  # once per step, not per layer
        if self.fused is not None and self.fused.takes(x, meta):
            x = self.fused(self.layers, rope, x, meta)  # bitwise the layers' modules
        else:
            for layer in self.layers:
                x = layer(rope, x, meta)
        return self.norm(x)


class LlamaFamilyForCausalLM(nn.Module):
    """``forward`` returns final hidden states; ``logits`` projects only the rows asked for."""

    packed_modules = PACKED

    def __init__(self, cfg: ModelConfig, tp: TPContext, max_positions: int, be: ModelOps):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, tp, max_positions, be)
        self.lm_head = ParallelLMHead(self.model.embed_tokens, cfg.tie_word_embeddings, be.linear)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta):
        return self.model(ids, positions, meta)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]
