"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

Parameter names follow Hugging Face checkpoints, except that q/k/v and
gate/up projections are fused into one matrix each at load time (fewer, larger
matmuls). The forward pass takes a flattened batch: every sequence's new tokens
one after another, with ``StepBatch`` saying where each sequence's tokens and
KV are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.attention import Segment, paged_attention
from services.engine.kv_cache import KVCache
from services.engine.model_config import ModelConfig
from services.engine.rope import RotaryTable, apply_rotary


@dataclass(frozen=True)
class StepBatch:
    """One forward pass over the new tokens of several sequences."""

    input_ids: torch.Tensor
    """[T] token ids, sequences one after another."""
    positions: torch.Tensor
    """[T] each token's position in its sequence."""
    slot_mapping: torch.Tensor
    """[T] the KV-pool slot each token's keys and values are written to."""
    attention: list[Segment]
    """How each layer attends the sequences (planned once per step)."""
    logits_indices: torch.Tensor
    """[S] rows of the batch whose next-token logits are wanted."""


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel (float32 statistics inside); on CPU the unfused
        # pow/mean/rsqrt/mul chain cost a tenth of a prefill step.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, cfg.o_bias)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],  # this layer's [slots, kv_heads, head_dim] K, V
        batch: StepBatch,
    ) -> torch.Tensor:
        t = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k are adjacent in the fused projection: rotate both in one pass.
        qk = apply_rotary(qk.view(t, self.num_heads + self.num_kv_heads, self.head_dim), *cos_sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        k_cache, v_cache = kv
        k_cache.index_copy_(0, batch.slot_mapping, k)
        v_cache.index_copy_(0, batch.slot_mapping, v.view(t, self.num_kv_heads, self.head_dim))
        out = paged_attention(q, k_cache, v_cache, batch.attention)  # [T, heads, head_dim]
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        # silu's fresh output takes the product in place: one [T, intermediate] buffer
        # fewer per layer, the same values as ``silu(gate) * up``.
        return self.down_proj(F.silu(gate).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        batch: StepBatch,
    ) -> torch.Tensor:
        # Residual adds land in the sublayer's fresh output (a + b == b + a exactly): no
        # new [T, hidden] tensor per add.
        x = self.self_attn(self.input_layernorm(x), cos_sin, kv, batch).add_(x)
        return self.mlp(self.post_attention_layernorm(x)).add_(x)


class Embedding(nn.Embedding):
    """``nn.Embedding`` without its random initialisation: the weights come from the
    checkpoint. On the meta device that ``normal_`` imports ``torch._dynamo``, 3.3 s of every
    worker's start on a slow CPU, for numbers nobody reads."""

    def reset_parameters(self) -> None:
        pass


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder plus output head; ``forward`` returns float32 logits for chosen rows."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryTable) -> None:
        """``rotary`` comes built on the real device: the module itself is built on ``meta``
        and its parameters replaced by the checkpoint's (``load_weights``)."""
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = rotary

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv_cache: KVCache) -> torch.Tensor:  # [S, vocab]
        x = self.model.embed_tokens(batch.input_ids)
        cos_sin = self.rotary.lookup(batch.positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos_sin, kv_cache.layer(i), batch)
        # Rows are increasing and distinct: as many as tokens means every row, in order (a
        # pure decode step), so the gather would copy x unchanged.
        if batch.logits_indices.shape[0] != x.shape[0]:
            x = x[batch.logits_indices]
        x = self.model.norm(x)
        return self.lm_head(x).float()
