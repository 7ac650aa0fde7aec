"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

What is notable here:
- Low-rank joint KV compression: each token keeps one latent c_kv (kv_lora_rank) plus one RoPE key
  shared by all heads (qk_rope_head_dim). That pair is all a cache has to store.
- Optional low-rank query (q_lora_rank); None means a full-rank `q_proj` as in V2-Lite.
- Decoupled RoPE: only the qk_rope_head_dim part of q/k carries position; checkpoints lay those dims
  out in interleaved pairs (`rope_interleave`).
- YaRN context extension with DeepSeek's mscale folded into the softmax scale.
- Two paths side by side: `naive` decompresses K/V with kv_b_proj (training, prefill); `absorbed`
  folds kv_b_proj's key half into the query projection and its value half into o_proj
  (`absorbed_weights`, derived once per weight change) so attention runs against the cached latent
  rows directly, all heads in one batched matmul (`attend_latent`). The engine decodes through it.
  Tests hold the two paths equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig, yarn_get_mscale
from nanoseek.model.derived import DerivedWeights
from nanoseek.model.registered import Linear, Registered, apply_keeping_fp32, is_plain_linear
from nanoseek.perf import cast


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as DeepSeek and transformers do."""

    weight = Registered()  # read per call: see nanoseek.model.registered

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # eps as a tensor operand for the CPU path below, so eps + Σx²/d is one op (a Python float
        # operand is made into a tensor on every call)
        self._eps = torch.tensor(eps, dtype=torch.float32, device="cpu")
        self._inv_dim = 1.0 / dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        fp32 = x.dtype == torch.float32 and w.dtype == torch.float32
        if not x.is_cpu:  # torch.rms_norm is one fused kernel there
            if fp32:
                return torch.rms_norm(x, w.shape, w, self.eps)
            return w * torch.rms_norm(x.float(), w.shape, eps=self.eps).to(x.dtype)
        # On the CPU torch.rms_norm has no kernel of its own and runs as seven ops; the same math in
        # four (each op's dispatch is most of a decode step's cost: benchmarks/README.md).
        xf = x if fp32 else x.float()
        y = xf * torch.rsqrt(torch.add(self._eps, xf.square().sum(-1, keepdim=True), alpha=self._inv_dim))
        return y * w if fp32 else w * y.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the RoPE dims (MLA's decoupled key part, or a GQA head), with YaRN or
    Llama 3 frequency scaling when configured."""

    inv_freq: torch.Tensor  # a buffer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dim = config.rope_head_dim
        self.interleave = config.rope_interleave
        # Computed on the CPU even while build_model constructs on the meta device, where these small
        # ops would run through Python reference kernels that import torch._dynamo (the bulk of a short command's start-up).
        inv_freq, self.attention_factor = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)
        self._cache_len = 0
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        # fp32 through `.to(torch.bfloat16)`: rounded, a frequency is off by up to 0.4%, and the angle
        # it turns a position by with it (the `tiny` preset's: 0.36 rad at position 2000)
        return apply_keeping_fp32(self, ("inv_freq",), fn, recurse)

    def reset_tables(self, config: ModelConfig) -> None:
        """Recompute the frequencies and drop the cached tables (after `to_empty` left them garbage)."""
        inv_freq, self.attention_factor = rope_inverse_frequencies(config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        self._cos = self._sin = None
        self._cache_len = 0

    def tables(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cache_len < n or self._cos.device != device:
            size = max(n, 2 * self._cache_len, 256)
            t = torch.arange(size, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device=device, dtype=torch.float32))
            cos, sin = freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
            # Full width, in the dims' own layout, the sine signed for the pair's first member: RoPE is
            # then x·cos + swap(x)·sin, four ops (`apply_rope`), with the pairwise form's exact values.
            if self.interleave:
                self._cos = torch.stack((cos, cos), dim=-1).flatten(-2)
                self._sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
            else:
                self._cos, self._sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
            self._cache_len = size
        assert self._sin is not None
        return self._cos, self._sin

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin of shape [*positions.shape, 1, dim] (fp32), for `apply_rope`: the unit axis
        broadcasts over heads, made once per forward instead of in every layer."""
        # one position (batch-1 decode): read it, without a reduction op before the host sync
        k = positions.numel()
        n = int((positions if k == 1 else positions.max()).item()) + 1 if k else 1
        cos, sin = self.tables(n, positions.device)
        at = positions.unsqueeze(-1)
        return cos[at], sin[at]


def rope_inverse_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies (on the CPU: a few dozen numbers); YaRN blends interpolated and
    extrapolated ones by a ramp over dims, Llama 3 by a ramp over wavelengths."""
    dim, base = config.rope_head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    inv_freq = 1.0 / pos_freqs
    rs = config.rope_scaling
    if not rs:
        return inv_freq, 1.0
    if rs.get("type", rs.get("rope_type")) == "llama3":
        return llama3_inverse_frequencies(inv_freq, rs), 1.0
    factor, original = rs["factor"], rs["original_max_position_embeddings"]  # (ModelConfig fills both)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where wavelengths are short: keep the original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, float(attention_factor)


def llama3_inverse_frequencies(inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    """Llama 3's context extension: wavelengths shorter than original/high_freq_factor keep their
    frequency, those longer than original/low_freq_factor are slowed by `factor`, and the band
    between interpolates linearly in original/wavelength (no attention scaling)."""
    factor, original = rs["factor"], rs["original_max_position_embeddings"]
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    ratio = original * inv_freq / (2 * math.pi)  # original context / wavelength
    # 0 where the wavelength is long (scale fully), 1 where short (keep), linear in between.
    keep = ((ratio - low) / (high - low)).clamp(0, 1)
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [..., S, H, D] by `RotaryEmbedding`'s cos / signed sin [..., S, 1, D]; pairs are
    (2i, 2i+1) when interleaved, (i, i + D/2) otherwise (the tables' layout must match).

    Each pair (a, b) becomes (a·cos − b·sin, b·cos + a·sin): x·cos + swap(x)·sin with the sine's sign
    in the table. The output keeps the input's layout, so q·k is the same as in DeepSeek's
    complex-number form.
    """
    xf = x.float()
    if interleave:
        swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        swapped = xf.roll(xf.shape[-1] // 2, dims=-1)
    return cast(xf * cos + swapped * sin, x.dtype)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S, S] bool for packed rows: causal within one document, nothing across documents.

    doc_ids [B, S] says which packed document each token belongs to. Without it a packed row lets
    every token attend to the unrelated documents before it, which drowns the one lookup a copy
    needs (the current prompt) in look-alike text from other documents.
    """
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)) & causal


def documents_from_bos(input_ids: torch.Tensor, bos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_ids, positions) [B, S] of a packed row whose documents each start with BOS; positions
    restart at 0 on every BOS (a window that starts inside a document counts from its first token)."""
    is_bos = input_ids == bos_token_id
    doc_ids = is_bos.long().cumsum(dim=1)
    idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    start = torch.where(is_bos, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return doc_ids, idx - start


class LatentCache(Protocol):
    """What the attention needs from a KV cache: store this step's latents, return all visible ones.

    `update` receives the rows [B, S, kv_lora_rank + qk_rope_head_dim] of this step for `layer_idx`
    (the normalized latent c_kv, then the RoPE'd key k_pe: what a cache stores per token) and returns
    the rows every query may see ([B, T, ...], T >= S) with a boolean mask [B, S, T] (True = may
    attend), or None for plain causal.
    """

    def update(self, layer_idx: int, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass
class AbsorbedWeights:
    """MLA's weights folded for attention over the latent (V2 §2.1.3), derived from the module's own.

    wa: [q_a_proj ; kv_a_proj_with_mqa] stacked (both read the same input: one matmul), or kv_a alone
    without a query LoRA. wq: the query projection with W_UK folded in and the softmax scale applied,
    giving per-head [latent ; rope] queries; None when that product would be much larger than its
    factors (then w_uk, stored [H, C, nope] so both W_UK and W_UV reduce over their contiguous last
    dim, as one-row GEMV kernels want, is applied per head). wo: W_UV folded into o_proj, or o_proj
    alone (w_uv apart).
    A projection used unchanged (kv_a alone, o_proj alone) is its own weight, not a copy; where it is
    stored quantized (int8, w8a8, FP8), wa or wo is None and decode calls the module itself, so the
    quantized storage stays the only copy and its kernel runs (a dequantized copy was 2-4x its bytes,
    read every step).
    """

    wa: torch.Tensor | None
    wq: torch.Tensor | None
    w_uk: torch.Tensor
    wo: torch.Tensor | None
    w_uv: torch.Tensor | None


FOLD_LIMIT = 1 << 22  # elements per folded matrix; beyond this keep the factors (per-head einsum)


class MultiHeadLatentAttention(nn.Module):
    # what the decode step reads: see nanoseek.model.registered
    q_proj = Registered()
    q_a_proj = Registered()
    q_a_layernorm = Registered()
    q_b_proj = Registered()
    kv_a_proj_with_mqa = Registered()
    kv_a_layernorm = Registered()
    kv_b_proj = Registered()
    o_proj = Registered()

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = config.softmax_scale
        self.interleave = config.rope_interleave
        h = config.hidden_size
        if self.q_lora_rank is None:
            self.q_proj = Linear(h, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(h, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = Linear(self.num_heads * self.v_head_dim, h, bias=False)
        self._absorbed: DerivedWeights[AbsorbedWeights] = DerivedWeights()  # see absorbed_weights()

    # ------------------------------------------------------------ projections
    def project_query(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B,S,H,nope], q_pe [B,S,H,rope] with RoPE applied."""
        b, s, _ = x.shape
        q = (
            self.q_proj(x)
            if self.q_lora_rank is None
            else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        )
        q = q.view(b, s, self.num_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, self.interleave)

    def project_latent(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores per token: normalized c_kv [B,S,kv_lora_rank] and k_pe [B,S,rope]."""
        kv = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(-2), cos, sin, self.interleave).squeeze(-2)  # one head
        return self.kv_a_layernorm(c_kv), k_pe

    # -------------------------------------------------------------- two paths
    def attend_naive(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Decompress K/V from the latent and run standard attention. Returns [B,S,H*v]."""
        b, s, h, _ = q_nope.shape
        t = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(b, t, h, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(b, t, h, self.qk_rope_head_dim)), dim=-1).transpose(
            1, 2
        )
        v = v.transpose(1, 2)
        # PyTorch's fused (flash) CPU kernel wants one head size for q, k and v; otherwise SDPA falls
        # back to the unfused math path (materialized scores, slower backward). Zero-padding v to the
        # q/k size keeps the result exact (the extra output columns are 0 and dropped).
        pad = self.qk_head_dim - self.v_head_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        if mask is None and t != s:
            mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s).expand(b, s, t)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.unsqueeze(1), scale=self.softmax_scale
            )
        if pad > 0:
            out = out[..., : self.v_head_dim]
        return out.transpose(1, 2).reshape(b, s, h * self.v_head_dim)

    def attend_latent(self, q: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The absorbed attention core: queries q [B,S,H,C+R] already in latent space (W_UK folded in,
        softmax scale applied) against cache rows [B,T,C+R] = [c_kv ; k_pe]. Scores for all heads are
        one batched matmul, because q·row = q_nope·W_UK·c_kv + q_pe·k_pe. Returns Σ p·c_kv [B,S,H,C]."""
        b, s, h, _ = q.shape
        t = rows.shape[1]
        scores = torch.bmm(q.reshape(b, s * h, -1), rows.transpose(1, 2)).view(b, s, h, t).float()
        if mask is None and s > 1:
            mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s).expand(b, s, t)
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
        probs = cast(scores.softmax(dim=-1), rows.dtype).view(b, s * h, t)
        return torch.bmm(probs, rows[..., : self.kv_lora_rank]).view(b, s, h, self.kv_lora_rank)

    # ------------------------------------------------------- absorbed weights
    def _fold_sources(self) -> list[nn.Module]:
        q = [self.q_proj] if self.q_lora_rank is None else [self.q_a_proj, self.q_b_proj]
        return [*q, self.kv_a_proj_with_mqa, self.kv_b_proj, self.o_proj]

    def absorbed_weights(self) -> AbsorbedWeights:
        """This layer's `AbsorbedWeights`: derived once and reused until a source weight changes
        (`nanoseek.model.derived`), or freshly with autograd when it is on."""
        if torch.is_grad_enabled() and any(
            p.requires_grad for m in self._fold_sources() for p in m.parameters()
        ):
            return self._fold()
        return self._absorbed.get(self._fold_storages, self._fold)

    def _fold_storages(self) -> list[torch.Tensor]:
        return [_storage(m) for m in self._fold_sources()]

    def _fold(self) -> AbsorbedWeights:
        h, nope, rope, c, v = (
            self.num_heads,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.kv_lora_rank,
            self.v_head_dim,
        )
        dtype = self.kv_a_layernorm.weight.dtype  # the model's dtype, whatever the linears' storage
        wkv = _dense(self.kv_b_proj).float().view(h, nope + v, c)
        w_uk, w_uv = wkv[:, :nope], wkv[:, nope:]  # [H,nope,C], [H,v,C]
        q_w = _dense(self.q_proj if self.q_lora_rank is None else self.q_b_proj).float()
        q_in = q_w.shape[1]
        q_w = q_w.view(h, nope + rope, q_in)
        wq = None
        if h * (c + rope) * q_in <= FOLD_LIMIT:
            q_lat = torch.einsum("hdc,hdi->hci", w_uk, q_w[:, :nope])  # [H,C,in]
            wq = (torch.cat((q_lat, q_w[:, nope:]), dim=1) * self.softmax_scale).reshape(-1, q_in).to(dtype)
        hidden = self.o_proj.out_features
        wo: torch.Tensor | None
        w_uv_apart: torch.Tensor | None
        if hidden * h * c <= FOLD_LIMIT:
            wo_v = _dense(self.o_proj).float().view(hidden, h, v)
            wo = torch.einsum("ohv,hvc->ohc", wo_v, w_uv).reshape(hidden, h * c).to(dtype)
            w_uv_apart = None
        else:
            wo, w_uv_apart = _as_is(self.o_proj, dtype), w_uv.to(dtype)
        if self.q_lora_rank is None:
            wa = _as_is(self.kv_a_proj_with_mqa, dtype)
        else:
            both = (self.q_a_proj, self.kv_a_proj_with_mqa)
            plain = all(_as_is(m, dtype) is not None for m in both)
            wa = torch.cat([_dense(m) for m in both], dim=0).to(dtype) if plain else None
        w_uk_t = w_uk.transpose(1, 2).to(dtype).contiguous()  # [H,C,nope]
        return AbsorbedWeights(wa, wq, w_uk_t, wo, w_uv_apart)

    def _forward_absorbed(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The decode path: the projections with the folded weights, then `attend_latent` over the
        cache rows. The query heads and the shared RoPE key rotate together as one [B,S,H+1,R].
        Like the folded projections, the two norms run without their modules' hook dispatch (a
        module call costs as much as an op, twice per layer per decode step)."""
        b, s, _ = x.shape
        h, c = self.num_heads, self.kv_lora_rank
        w = self.absorbed_weights()
        if w.wa is None:  # quantized projections: each module with its own kernel
            kv = self.kv_a_proj_with_mqa(x)
            q_in = x if self.q_lora_rank is None else self.q_a_layernorm.forward(self.q_a_proj(x))
        elif self.q_lora_rank is None:
            q_in, kv = x, F.linear(x, w.wa)
        else:
            down = F.linear(x, w.wa)
            q_in, kv = (
                self.q_a_layernorm.forward(down[..., : self.q_lora_rank]),
                down[..., self.q_lora_rank :],
            )
        if w.wq is not None:
            q = F.linear(q_in, w.wq).view(b, s, h, c + self.qk_rope_head_dim)
            q_lat, q_pe = q[..., :c], q[..., c:]
        else:
            q_proj = self.q_proj if self.q_lora_rank is None else self.q_b_proj
            q = q_proj(q_in).view(b, s, h, self.qk_head_dim) * self.softmax_scale
            q_lat = torch.einsum("bshd,hcd->bshc", q[..., : self.qk_nope_head_dim], w.w_uk)
            q_pe = q[..., self.qk_nope_head_dim :]
        pe = apply_rope(torch.cat((q_pe, kv[..., c:].unsqueeze(2)), dim=2), cos, sin, self.interleave)
        latent = torch.cat((self.kv_a_layernorm.forward(kv[..., :c]), pe[:, :, h]), dim=-1)
        rows, mask = cache.update(self.layer_idx, latent) if cache is not None else (latent, mask)
        out = self.attend_latent(torch.cat((q_lat, pe[:, :, :h]), dim=-1), rows, mask)
        if w.w_uv is not None:
            out = torch.einsum("bshc,hvc->bshv", out, w.w_uv)
        out = out.reshape(b, s, -1)
        return self.o_proj(out) if w.wo is None else F.linear(out, w.wo)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """x [B,S,hidden]; cos/sin for these positions. With a cache the absorbed path is the default."""
        if absorb if absorb is not None else cache is not None:
            return self._forward_absorbed(x, cos, sin, cache, mask)
        q_nope, q_pe = self.project_query(x, cos, sin)
        c_kv, k_pe = self.project_latent(x, cos, sin)
        if cache is not None:
            rows, mask = cache.update(self.layer_idx, torch.cat((c_kv, k_pe), dim=-1))
            c_kv, k_pe = rows.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.o_proj(self.attend_naive(q_nope, q_pe, c_kv, k_pe, mask))


def _storage(linear: nn.Module) -> torch.Tensor:
    """The tensor that holds a linear layer's weight (int8 layers of engine/quantize.py: `qweight`)."""
    q = linear._buffers.get("qweight")  # dict lookups: this runs per layer per decode step
    if q is not None:
        return q
    weight = linear._parameters["weight"]
    assert weight is not None  # a linear layer's weight (torch types the slot as Optional)
    return weight


def _as_is(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """A projection the absorbed path uses unchanged: its own weight where it is a plain linear layer
    in the model's dtype (no copy), else None (quantized storage: call the module)."""
    weight = linear.weight if is_plain_linear(linear) else None
    return weight if isinstance(weight, torch.Tensor) and weight.dtype == dtype else None


def _dense(linear: nn.Module) -> torch.Tensor:
    """A linear layer's weight as a dense tensor, whatever its storage (fp8 blocks, int8 rows)."""
    dequantize = getattr(linear, "dequantize", None)
    if dequantize is not None:
        return dequantize()
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)  # a dense layer's: nn.Linear's parameter
    return weight
