"""A lean forward for serving: the model's math with fewer, larger ops and weights prepared once.

What is notable here (the model's own forward stays the reference; tests hold the two equal):
- Absorbed MLA with the up-projections folded ahead of time (V2 §2.1.3): W_UK is multiplied into the
  query projection (q_b_proj, or q_proj without a query LoRA) and the softmax scale with it, so one
  matmul yields per-head queries in latent space [H, kv_lora_rank + rope]. The cache row is exactly
  [c_kv ; k_pe], so scores for all heads are ONE batched matmul against the gathered cache rows. W_UV is
  folded into o_proj the same way. When a folded matrix would be much larger than the factors (big
  models), the per-head einsum is used instead.
- The query and latent down-projections share their input: one fused matmul.
- RoPE for the whole step is looked up once (complex multiply for interleaved pairs); per layer the
  query heads and the shared key are rotated together as one [B,S,H+1,R] tensor.
- Routed experts: at decode sizes (<= 4 tokens) the chosen experts' weights are gathered and run as
  two bmm's plus one weighted-combine bmm; larger batches use two grouped GEMMs (`torch._grouped_mm`)
  over tokens sorted by expert, instead of a Python loop over experts. A shared expert of the routed
  width is merged in as one more expert every token picks with weight 1. V3's routing (sigmoid,
  group limits, bias) is inlined; other routers go through the model's Router.
- RoPE for every reachable position is tabulated once; per-layer weights, norm weights and routing
  parameters are read into plain attributes once (nn.Module attribute lookups add up per step).
- Derived weights are rebuilt when any source parameter changes in place (tensor version counters),
  so GRPO can keep one engine across optimizer steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.engine.cache import StepView
from nanoseek.model.attention import MultiHeadLatentAttention, apply_rope
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import DecoderBlock, DeepSeekV3

FOLD_LIMIT = 1 << 22  # elements per folded matrix; beyond this keep the factors (per-head einsum)


def has_grouped_mm() -> bool:
    try:
        x = torch.zeros(2, 8)
        w = torch.zeros(2, 8, 8)
        torch._grouped_mm(x, w, offs=torch.tensor([1, 2], dtype=torch.int32))
        return True
    except Exception:
        return False


class _Attn:
    """Prepared weights of one MLA layer."""

    def __init__(self, attn: MultiHeadLatentAttention) -> None:
        self.m = attn
        h, nope, rope, c, v = (
            attn.num_heads,
            attn.qk_nope_head_dim,
            attn.qk_rope_head_dim,
            attn.kv_lora_rank,
            attn.v_head_dim,
        )
        self.h, self.c, self.r, self.v = h, c, rope, v
        dtype = attn.kv_a_proj_with_mqa.weight.dtype
        wkv = attn.kv_b_proj.weight.detach().float().view(h, nope + v, c)
        w_uk, w_uv = wkv[:, :nope], wkv[:, nope:]  # [H,nope,C], [H,v,C]
        q_w = (attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj).weight.detach().float()
        q_in = q_w.shape[1]
        q_w = q_w.view(h, nope + rope, q_in)
        scale = attn.softmax_scale
        self.fold_q = h * (c + rope) * q_in <= FOLD_LIMIT
        if self.fold_q:
            q_lat = torch.einsum("hdc,hdi->hci", w_uk, q_w[:, :nope])  # [H,C,in]
            self.wq = (
                (torch.cat((q_lat, q_w[:, nope:]), dim=1) * scale).reshape(h * (c + rope), q_in).to(dtype)
            )
        else:
            self.wq = (q_w * scale).reshape(h * (nope + rope), q_in).to(dtype)
            self.w_uk = w_uk.to(dtype)
        self.nope = nope
        wo = attn.o_proj.weight.detach().float()  # [hidden, H*v]
        hidden = wo.shape[0]
        self.fold_o = hidden * h * c <= FOLD_LIMIT
        if self.fold_o:
            self.wo = (
                torch.einsum("ohv,hvc->ohc", wo.view(hidden, h, v), w_uv).reshape(hidden, h * c).to(dtype)
            )
        else:
            self.wo = wo.to(dtype)
            self.w_uv = w_uv.to(dtype)
        # Fused down-projection: [q_a (or full q) ; c_kv ; k_pe] from the same normed input.
        if attn.q_lora_rank is None:
            self.wa = attn.kv_a_proj_with_mqa.weight.detach()
            self.q_from_x = True
        else:
            self.wa = torch.cat(
                (attn.q_a_proj.weight.detach(), attn.kv_a_proj_with_mqa.weight.detach()), dim=0
            )
            self.q_from_x = False
        self.q_lora = attn.q_lora_rank or 0
        # Plain attributes: nn.Module attribute lookups cost ~1 us each, dozens per layer per step.
        self.layer_idx = attn.layer_idx
        self.kv_norm = (attn.kv_a_layernorm.weight.detach(), attn.kv_a_layernorm.eps)
        qn = attn.q_a_layernorm if attn.q_lora_rank is not None else None
        self.q_norm = (qn.weight.detach(), qn.eps) if qn is not None else None


class _Route:
    """V3 sigmoid + noaux_tc routing parameters, read once (None: use the model's Router)."""

    def __init__(self, mlp: MoE) -> None:
        r = mlp.gate
        self.router = r
        self.fast = r.scoring_func == "sigmoid" and r.topk_method == "noaux_tc"
        if self.fast:
            self.weight = r.weight.detach().float()
            self.bias = r.e_score_correction_bias.detach().float()
        self.n_group, self.topk_group, self.top_k = r.n_group, r.topk_group, r.top_k
        self.group_size = r.n_experts // max(1, r.n_group)
        self.norm = r.norm_topk_prob and r.top_k > 1
        self.scale = r.routed_scaling_factor


class FastForward:
    """Runs DeepSeekV3's decoder stack (and MTP blocks) over a `StepView` of the paged cache."""

    def __init__(self, model: DeepSeekV3, max_positions: int | None = None) -> None:
        self.model = model
        # RoPE for every position the engine can reach, built once: a step just indexes it (the
        # module's own call costs a .item() sync and three ops per step).
        n = max_positions or model.config.max_position_embeddings
        with torch.no_grad():
            cos, sin = model.model.rotary_emb._tables(n, model.device)
            self._cos, self._sin = cos[:n].clone(), sin[:n].clone()
            self._freqs = torch.complex(self._cos, self._sin) if model.config.rope_interleave else None
        self.grouped_mm = has_grouped_mm()
        self._params = list(model.parameters())
        self._versions: list[int] = []
        self._mlp: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._attn: dict[int, _Attn] = {}
        self._experts: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        self._route: dict[int, _Route] = {}
        self._shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Per block, what its forward reads: (block, attn, norm1 (w, eps), norm2 (w, eps), moe or None).
        self._plan: dict[int, tuple] = {}
        self.refresh()

    def _source_versions(self) -> list[int]:
        return [p._version for p in self._params]

    def refresh(self) -> None:
        """(Re)build derived weights; cheap to call, a no-op unless a parameter changed."""
        versions = self._source_versions()
        if versions == self._versions:
            return
        blocks: list[DecoderBlock] = list(self.model.model.layers) + list(self.model.model.mtp_layers)
        with torch.no_grad():
            for b in blocks:
                self._attn[b.layer_idx] = _Attn(b.self_attn)
                n1, n2 = b.input_layernorm, b.post_attention_layernorm
                moe = b.mlp if isinstance(b.mlp, MoE) else None
                if moe is not None:
                    self._route[b.layer_idx] = _Route(moe)
                self._plan[b.layer_idx] = (
                    self._attn[b.layer_idx],
                    (n1.weight.detach(), n1.eps),
                    (n2.weight.detach(), n2.eps),
                    moe,
                )
                dense = b.mlp.shared_experts if isinstance(b.mlp, MoE) else b.mlp
                if dense is not None:  # SwiGLU with gate and up fused into one matmul
                    gu = torch.cat((dense.gate_proj.weight.detach(), dense.up_proj.weight.detach()), dim=0)
                    self._mlp[b.layer_idx] = (gu, dense.down_proj.weight.detach())
                if isinstance(b.mlp, MoE):
                    ex = b.mlp.experts
                    gate_up, down = ex.gate_up_proj.detach(), ex.down_proj.detach()
                    sh = b.mlp.shared_experts
                    merged = sh is not None and sh.gate_proj.weight.shape[0] == ex.intermediate_size
                    if merged:  # the shared expert is one more expert that every token uses, weight 1
                        gate_up = torch.cat((gate_up, self._mlp[b.layer_idx][0].unsqueeze(0)), dim=0)
                        down = torch.cat((down, sh.down_proj.weight.detach().unsqueeze(0)), dim=0)
                    # grouped_mm / bmm want [E, K, N] with the output dim contiguous.
                    self._experts[b.layer_idx] = (
                        gate_up.transpose(1, 2).contiguous(),
                        down.transpose(1, 2).contiguous(),
                        merged,
                    )
            m = self.model.model
            self._embed = m.embed_tokens.weight.detach()
            self._final_norm = (m.norm.weight.detach(), m.norm.eps)
            self._main = [b.layer_idx for b in m.layers]
        self._versions = versions

    @property
    def routes_own(self) -> bool:
        """True when every MoE layer is routed here, never through the model's Router (no bookkeeping)."""
        return all(r.fast for r in self._route.values())

    # ------------------------------------------------------------------ rope
    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self._freqs is not None:  # interleaved pairs rotate by a complex multiply: cos/sin unused
            return self._cos, self._sin, self._freqs[positions]
        return self._cos[positions], self._sin[positions], None

    def _rope(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
    ) -> torch.Tensor:
        cos, sin, freqs = rope
        if freqs is None:
            return apply_rope(x, cos, sin, False)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        f = freqs.unsqueeze(-2) if x.dim() == freqs.dim() + 1 else freqs
        return torch.view_as_real(xc * f).flatten(-2).to(x.dtype)

    # ------------------------------------------------------------- attention
    def attention(self, a: _Attn, x: torch.Tensor, rope, view: StepView) -> torch.Tensor:
        b, s, _ = x.shape
        h, c, r = a.h, a.c, a.r
        down = F.linear(x, a.wa)
        if a.q_from_x:
            q_in, kv = x, down
        else:
            q_in, kv = down[..., : a.q_lora], down[..., a.q_lora :]
            q_in = F.rms_norm(q_in, (a.q_lora,), a.q_norm[0], a.q_norm[1])  # type: ignore[index]
        c_kv = F.rms_norm(kv[..., :c], (c,), a.kv_norm[0], a.kv_norm[1])
        q = F.linear(q_in, a.wq)
        if a.fold_q:
            # RoPE the query heads and the shared key as one [B,S,H+1,R] tensor: one rotation per layer.
            q = q.view(b, s, h, c + r)
            pe = self._rope(torch.cat((q[..., c:], kv[..., c:].unsqueeze(2)), dim=2), rope)
            q = torch.cat((q[..., :c], pe[:, :, :h]), dim=-1)
            k_pe = pe[:, :, h]
        else:
            q = q.view(b, s, h, a.nope + r)
            q_lat = torch.einsum("bshd,hdc->bshc", q[..., : a.nope], a.w_uk)
            q = torch.cat((q_lat, self._rope(q[..., a.nope :], rope)), dim=-1)
            k_pe = self._rope(kv[..., c:], rope)
        store = view.cache.kv[a.layer_idx]
        store.index_copy_(
            0, view.write_slots, torch.cat((c_kv, k_pe), dim=-1).view(-1, c + r).to(store.dtype)
        )
        ctx = store.index_select(0, view.read_slots).view(b, view.ctx, c + r).to(x.dtype)
        scores = torch.bmm(q.view(b, s * h, c + r), ctx.transpose(1, 2)).view(b, s, h, -1).float()
        if view.needs_mask:
            scores = scores.masked_fill_(~view.mask.unsqueeze(2), float("-inf"))
        probs = scores.softmax(dim=-1).to(x.dtype).view(b, s * h, -1)
        lat = torch.bmm(probs, ctx[..., :c])  # [B, S*H, C]
        if a.fold_o:
            return F.linear(lat.view(b, s, h * c), a.wo)
        out = torch.einsum("bshc,hvc->bshv", lat.view(b, s, h, c), a.w_uv)
        return F.linear(out.reshape(b, s, h * a.v), a.wo)

    # ------------------------------------------------------------------- moe
    def route(self, layer_idx: int, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Router's choice without its training bookkeeping, for V3's sigmoid + noaux_tc routing."""
        r = self._route[layer_idx]
        if not r.fast:
            return r.router(flat)
        scores = F.linear(flat.float(), r.weight).sigmoid()
        choice = scores + r.bias
        if r.n_group > 1:
            grouped = choice.view(-1, r.n_group, r.group_size)
            keep = grouped.topk(2, dim=-1).values.sum(dim=-1).topk(r.topk_group, dim=-1).indices
            drop = torch.ones(grouped.shape[:2], dtype=torch.bool, device=flat.device).scatter_(
                1, keep, False
            )
            choice = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(r.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if r.norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * r.scale

    def moe(self, layer_idx: int, mlp: MoE, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        indices, weights = self.route(layer_idx, flat)
        gate_up, down, merged = self._experts[layer_idx]
        if merged:
            t = indices.shape[0]
            shared_idx, shared_w = self._shared_columns(t, gate_up.shape[0] - 1, weights.dtype)
            indices = torch.cat((indices, shared_idx[:t]), dim=1)
            weights = torch.cat((weights, shared_w[:t]), dim=1)
        t, k = indices.shape
        if t <= 4:
            # Decode at small batch: gather the chosen experts' weights and run two bmm's over the
            # t*k (token, expert) pairs, then combine with one weighted bmm. Copying ~k experts'
            # weights costs less than the ~5 small ops per pair a Python loop would issue, and a
            # grouped GEMM over mostly empty groups (measured: ~2x faster at t=1..2, on par at 4).
            sel = indices.flatten()
            hid = flat.shape[-1]
            xs = (flat.expand(k, hid) if t == 1 else flat.repeat_interleave(k, dim=0)).unsqueeze(1)
            g, u = torch.bmm(xs, gate_up.index_select(0, sel)).chunk(2, dim=-1)
            ys = torch.bmm(F.silu(g) * u, down.index_select(0, sel)).view(t, k, hid)
            y = torch.bmm(weights.view(t, 1, k).to(ys.dtype), ys).view(t, hid)
        elif self.grouped_mm:
            e = gate_up.shape[0]
            order = indices.flatten().argsort(stable=True)
            offs = torch.bincount(indices.flatten(), minlength=e).cumsum(0).to(torch.int32)
            token_of = order // k
            xs = flat[token_of]
            hg = torch._grouped_mm(xs, gate_up, offs=offs)
            g, u = hg.chunk(2, dim=-1)
            ys = torch._grouped_mm(F.silu(g) * u, down, offs=offs)
            ys = ys * weights.flatten()[order].unsqueeze(-1).to(ys.dtype)
            y = torch.zeros_like(flat).index_add_(0, token_of, ys)
        else:
            n = mlp.experts.n_experts
            routed = indices < n  # the merged shared expert is added below instead
            y = mlp.experts(flat, indices.clamp(max=n - 1), weights * routed).to(x.dtype)
            if merged:
                y = y + self.swiglu(layer_idx, flat)
        y = y.view(shape)
        if mlp.shared_experts is not None and not merged:
            y = y + self.swiglu(layer_idx, x)
        return y

    def _shared_columns(self, t: int, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[n,1] columns (shared expert id, weight 1) kept across steps: one cat per step, not two ops."""
        cols = self._shared.get(expert)
        if cols is None or cols[0].shape[0] < t or cols[1].dtype != dtype:
            n = max(t, 64)
            device = self._embed.device
            cols = (
                torch.full((n, 1), expert, dtype=torch.long, device=device),
                torch.ones(n, 1, dtype=dtype, device=device),
            )
            self._shared[expert] = cols
        return cols

    def swiglu(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self._mlp[layer_idx]
        g, u = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, down)

    # ----------------------------------------------------------------- block
    def block(self, layer: DecoderBlock, x: torch.Tensor, rope, view: StepView) -> torch.Tensor:
        return self._block(layer.layer_idx, x, rope, view)

    def _block(self, layer_idx: int, x: torch.Tensor, rope, view: StepView) -> torch.Tensor:
        attn, (w1, eps1), (w2, eps2), moe = self._plan[layer_idx]
        d = (x.shape[-1],)
        x = x + self.attention(attn, F.rms_norm(x, d, w1, eps1), rope, view)
        y = F.rms_norm(x, d, w2, eps2)
        if moe is not None:
            return x + self.moe(layer_idx, moe, y)
        return x + self.swiglu(layer_idx, y)

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, view: StepView) -> torch.Tensor:
        rope = self.rope_tables(positions)
        x = F.embedding(ids, self._embed)
        for idx in self._main:
            x = self._block(idx, x, rope, view)
        w, eps = self._final_norm
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    def mtp_hidden(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, view: StepView
    ) -> torch.Tensor:
        layer = self.model.model.mtp_layers[0]
        h = layer.combine(hidden, self.model.model.embed_tokens(next_ids))
        return self.block(layer, h, self.rope_tables(positions), view)
