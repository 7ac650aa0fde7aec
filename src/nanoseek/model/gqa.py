"""Grouped-query attention: the attention of the dense models R1 distils into (Qwen2, Llama; R1 §2.4).

What is notable here:
- An attention variant of the same `DecoderBlock`, selected by `ModelConfig.attention_variant`
  ("gqa" for model_type qwen2 / llama): q/k/v/o projections named as in those checkpoints, so
  Qwen2ForCausalLM / LlamaForCausalLM files load with no key renaming.
- num_key_value_heads K/V heads, each shared by num_attention_heads / num_key_value_heads query heads
  (GQA; 1 = multi-query, equal = multi-head). SDPA's `enable_gqa` broadcasts them, so K/V are never
  repeated in memory.
- Optional biases: q/k/v always in Qwen2, q/k/v/o with Llama's `attention_bias`.
- RoPE over the whole head in half-split layout, from the shared `RotaryEmbedding` (with Llama 3
  frequency scaling when configured).
- The same cache protocol as MLA (`LatentCache`): a cache row is [K heads ; V heads] of one token, so
  the engine's paged storage serves both variants; per token it holds
  2 x num_key_value_heads x head_dim elements per layer, against MLA's kv_lora_rank + qk_rope_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import LatentCache, apply_rope
from nanoseek.model.registered import Linear, Registered


class GroupedQueryAttention(nn.Module):
    # what the decode step reads: see nanoseek.model.registered
    q_proj = Registered()
    k_proj = Registered()
    v_proj = Registered()
    o_proj = Registered()

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = int(config.num_key_value_heads or config.num_attention_heads)
        self.head_dim = int(config.head_dim or config.hidden_size // self.num_heads)
        self.softmax_scale = config.softmax_scale
        h, d, kv = config.hidden_size, self.head_dim, self.num_key_value_heads
        self.q_proj = Linear(h, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = Linear(h, kv * d, bias=config.qkv_bias)
        self.v_proj = Linear(h, kv * d, bias=config.qkv_bias)
        self.o_proj = Linear(self.num_heads * d, h, bias=config.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
        absorb: bool | None = None,  # MLA's choice of path; GQA has one path
    ) -> torch.Tensor:
        """x [B,S,hidden]; cos/sin [B,S,head_dim/2] for these positions; returns [B,S,hidden].

        With a cache, this step's K/V rows go in and every visible row comes back (mask [B,S,T],
        True = may attend, or None for plain causal)."""
        b, s, _ = x.shape
        d, kv = self.head_dim, self.num_key_value_heads
        q = apply_rope(self.q_proj(x).view(b, s, self.num_heads, d), cos, sin, interleave=False)
        k = apply_rope(self.k_proj(x).view(b, s, kv, d), cos, sin, interleave=False)
        v = self.v_proj(x).view(b, s, kv, d)
        if cache is not None:
            rows, mask = cache.update(self.layer_idx, torch.cat((k, v), dim=2).view(b, s, 2 * kv * d))
            k, v = rows.view(b, rows.shape[1], 2 * kv, d).split(kv, dim=2)
        t = k.shape[1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is None and t != s:  # queries are the last s of t positions
            mask = torch.ones(s, t, dtype=torch.bool, device=x.device).tril(t - s).expand(b, s, t)
        gqa = kv != self.num_heads
        if mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=s > 1, scale=self.softmax_scale, enable_gqa=gqa
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.unsqueeze(1), scale=self.softmax_scale, enable_gqa=gqa
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * d))
