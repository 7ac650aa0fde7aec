"""The DeepSeek-V3 transformer: MLA + DeepSeekMoE blocks, dense-first layers, multi-token prediction.

What is notable here:
- Pre-norm blocks (RMSNorm) with Multi-head Latent Attention and, past `first_k_dense_replace`,
  DeepSeekMoE instead of a dense SwiGLU MLP (V3 §4.2: the first three layers stay dense).
- Multi-token prediction (V3 §2.2): module k combines the depth-(k-1) hidden state h_i with the
  embedding of token i+k (`enorm`, `hnorm`, `eh_proj` over their concatenation), runs one block, and
  predicts token i+k+1 through the *shared* embedding and output head. Sequential, so the causal chain
  is kept at every depth. At inference the modules can be dropped or used as speculative drafters.
- Parameter names follow DeepSeek's / transformers' checkpoint keys, so HF import/export is a rename
  of the routed experts only (see `nanoseek.checkpoint`).
- The dense families R1 distils into (Qwen2, Llama) are configurations of the same blocks: the
  attention variant is grouped-query attention (`nanoseek.model.gqa`) and every MLP is dense SwiGLU;
  their checkpoint keys are these same names.
"""

from __future__ import annotations

from collections.abc import Iterator
from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import LatentCache, MultiHeadLatentAttention, RMSNorm, RotaryEmbedding
from nanoseek.model.gqa import GroupedQueryAttention
from nanoseek.model.loss import linear_cross_entropy
from nanoseek.model.moe import MLP, MoE, RoutedExperts, Router
from nanoseek.model.registered import Linear, Registered


class DecoderBlock(nn.Module):
    # what every forward reads: see nanoseek.model.registered
    self_attn = Registered()
    mlp = Registered()
    input_layernorm = Registered()
    post_attention_layernorm = Registered()

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = (
            GroupedQueryAttention(config, layer_idx)
            if config.attention_variant == "gqa"
            else MultiHeadLatentAttention(config, layer_idx)
        )
        self.mlp = (
            MoE(config)
            if config.is_moe_layer(layer_idx)
            else MLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
        absorb: bool | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """token_mask [B,S]: the tokens an MoE router's balancing counts (False at padding)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask, absorb)
        h = self.post_attention_layernorm(x)
        return x + (
            self.mlp(h, token_mask) if token_mask is not None and isinstance(self.mlp, MoE) else self.mlp(h)
        )


class SharedHead(nn.Module):
    """The MTP module's output norm; the projection is the main model's lm_head (shared, V3 §2.2)."""

    norm = Registered()  # read per draft: see nanoseek.model.registered

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MultiTokenPredictionLayer(DecoderBlock):
    """One MTP depth: stored at checkpoint index num_hidden_layers + depth, like DeepSeek's files."""

    # what every draft reads: see nanoseek.model.registered
    enorm = Registered()
    hnorm = Registered()
    eh_proj = Registered()
    shared_head = Registered()

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def combine(self, hidden: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        """M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i)] (V3 eq. 21). The embedding half comes first, as in
        DeepSeek's released weights and inference code: the paper writes the two the other way round."""
        return self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))


class DeepSeekBackbone(nn.Module):
    """`model.*` in checkpoint keys: embeddings, blocks, final norm, MTP layers after the main ones."""

    # what every forward reads: see nanoseek.model.registered
    embed_tokens = Registered()
    layers = Registered()
    mtp_layers = Registered()
    norm = Registered()
    rotary_emb = Registered()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Left uninitialized like every other weight (init_weights or a checkpoint fills it): nn.Embedding's
        # own normal_ init, run on the meta device by build_model, imports torch._dynamo (the bulk of a short command's start-up).
        embed = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=embed)
        n = config.num_hidden_layers
        self.layers = nn.ModuleList([DecoderBlock(config, i) for i in range(n)])
        self.mtp_layers = nn.ModuleList(
            [MultiTokenPredictionLayer(config, n + d) for d in range(config.num_nextn_predict_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class DeepSeekV3(nn.Module):
    """DeepSeek-V3 for causal LM. `model(input_ids)` returns logits [batch, seq, vocab]."""

    model = Registered()  # read per forward: see nanoseek.model.registered
    lm_head = Registered()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DeepSeekBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With `tie_word_embeddings`, the head *is* the embedding: one Parameter, trained, saved
        (as the embedding only, like transformers) and loaded once."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> DeepSeekV3:
        """Normal(0, initializer_range) weights, unit norms, zero balancing bias; output projections
        scaled by 1/sqrt(2·layers) so the residual stream's variance does not grow with depth."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = float(self.config.extra.get("initializer_range", 0.02))
        out_std = std / (2 * self.config.num_hidden_layers) ** 0.5

        def normal_(t: torch.Tensor, s: float) -> None:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(s).to(t.dtype))

        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Linear):
                normal_(module.weight, out_std if name.endswith(("o_proj", "down_proj")) else std)
                if module.bias is not None:  # GQA's q/k/v (Qwen2) and o (Llama's attention_bias)
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                normal_(module.weight, std)
            elif isinstance(module, Router):
                normal_(module.weight, std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, RoutedExperts):
                normal_(module.gate_up_proj, std)
                normal_(module.down_proj, out_std)
        return self

    # --------------------------------------------------------------- forward
    def positions_for(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        b, s = input_ids.shape
        return torch.arange(start, start + s, device=input_ids.device).unsqueeze(0).expand(b, s)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
        absorb: bool | None = None,
        return_hidden: bool = False,
        labels: torch.Tensor | None = None,
        ignore_index: int = -100,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B,S,V]; with `return_hidden`, (logits, final-normed hidden [B,S,H]).

        positions [B,S] default to 0..S-1. With a `cache`, attention uses the absorbed latent path.
        With `labels` [B,S] (the token that follows each position; `ignore_index` where nothing counts)
        the result is the mean next-token cross-entropy instead of logits, computed with the head
        chunk by chunk so the [B,S,V] logits never exist at once (`nanoseek.model.loss`). token_mask
        [B,S] (bool): the tokens the routers' balancing counts, False at padding (None: all).
        """
        hidden = self.hidden_states(input_ids, positions, cache, mask, absorb, token_mask)
        if labels is not None:
            out = linear_cross_entropy(hidden, self.lm_head.weight, labels, ignore_index)
        else:
            out = self.lm_head(hidden)
        return (out, hidden) if return_hidden else out

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
        absorb: bool | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if positions is None:
            positions = self.positions_for(input_ids)
        for layer in self.model.mtp_layers:
            # a new forward: an MTP router's balance loss is this one's only if its depth runs after it
            # (`balance_loss`); an earlier forward's would be added again, its graph already freed
            if isinstance(layer.mlp, MoE) and layer.mlp.gate.aux_loss is not None:
                layer.mlp.gate.aux_loss = None
        cos, sin = self.model.rotary_emb(positions)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, mask, absorb, token_mask)
        return self.model.norm(x)

    def mtp_block(
        self,
        depth: int,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One MTP depth (V3 eq. 21-22): the depth-1 hidden h_i [B,S,H] combined with the embedding of
        token t_{i+depth+1} [B,S] at positions i, through this depth's block. Training and the engine's
        drafts both run it; `mtp_head` turns its output into logits for t_{i+depth+2}."""
        layer = self.model.mtp_layers[depth]
        cos, sin = self.model.rotary_emb(positions)
        h = layer.combine(hidden, self.model.embed_tokens(next_ids))
        return layer(h, cos, sin, cache, mask, token_mask=token_mask)

    def mtp_head(self, depth: int, h: torch.Tensor) -> torch.Tensor:
        """Logits of MTP depth `depth` from its block output: its own norm, the shared head (V3 eq. 23)."""
        return self.lm_head(self.model.mtp_layers[depth].shared_head.norm(h))

    def _mtp_depths(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Training-time MTP: (k, depth k's block output [B, S-k-1, H]) at positions 0..S-k-2.

        `positions` [B,S], `mask` [B,S,S] and `token_mask` [B,S] are the main forward's (packed
        documents, padding); each depth uses their leading n x n part, and counts in its routers'
        balancing the positions whose own token and fed token t_{i+k+1} both count."""
        h = hidden
        s = input_ids.shape[1]
        for k in range(len(self.model.mtp_layers)):
            n = s - k - 1
            if n <= 0:
                break
            pos = self.positions_for(input_ids[:, :n]) if positions is None else positions[:, :n]
            m = None if mask is None else mask[:, :n, :n]
            counted = None if token_mask is None else token_mask[:, :n] & token_mask[:, k + 1 : k + 1 + n]
            h = self.mtp_block(k, h[:, :n], input_ids[:, k + 1 : k + 1 + n], pos, mask=m, token_mask=counted)
            yield k, h

    def mtp_logits(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Training-time MTP: depth k (0-based) gives logits [B, S-k-1, V] at positions 0..S-k-2,
        predicting input_ids[:, i+k+2]; i.e. target the labels shifted k+1 further than the main head."""
        return [self.mtp_head(k, h) for k, h in self._mtp_depths(hidden, input_ids, positions, mask)]

    def mtp_losses(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int = -100,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The cross-entropy of each MTP depth, fused with the head like `forward(labels=...)`.

        labels [B,S] are the main head's (the token after each position); depth k's targets are
        `mtp_targets(labels, k, doc_ids)`. doc_ids [B,S]: the packed documents `mask` separates;
        token_mask [B,S]: the tokens the routers' balancing counts (`forward`)."""
        return [
            linear_cross_entropy(
                self.model.mtp_layers[k].shared_head.norm(h),
                self.lm_head.weight,
                mtp_targets(labels, k, doc_ids, ignore_index)[:, : h.shape[1]],
                ignore_index,
            )
            for k, h in self._mtp_depths(hidden, input_ids, positions, mask, token_mask)
        ]

    # ------------------------------------------------------------- balancing
    def routers(self) -> Iterator[tuple[str, Router]]:
        """Every MoE router, main and MTP layers alike, named '3' (layer 3) or 'mtp0' (MTP depth 0):
        the one list the balance loss, the bias update and the load metrics all walk."""
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                yield str(layer.layer_idx), layer.mlp.gate
        for depth, layer in enumerate(self.model.mtp_layers):
            if isinstance(layer.mlp, MoE):
                yield f"mtp{depth}", layer.mlp.gate

    def balance_loss(self) -> torch.Tensor | None:
        """Sum of the balance losses (per sequence; batch-wise where `seq_aux` is False) from the last
        forward (None when α = 0)."""
        losses = [r.aux_loss for _, r in self.routers() if r.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def set_balance_alpha(self, alpha: float) -> None:
        for _, r in self.routers():
            r.aux_loss_alpha = alpha

    @torch.no_grad()
    def take_expert_load(self) -> dict[str, torch.Tensor]:
        """Tokens per expert per MoE router (training forwards) since the last call; resets the counters."""
        out = {}
        for idx, r in self.routers():
            out[idx] = r.expert_load.clone()
            r.expert_load.zero_()
        return out

    # -------------------------------------------------------------- counting
    def num_parameters(self, include_mtp: bool = False) -> int:
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters():
            if not include_mtp and name.startswith("model.mtp_layers."):
                continue
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    # ---------------------------------------------------------- construction
    @classmethod
    def build(
        cls, config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> DeepSeekV3:
        """An uninitialized model: constructed on the meta device (no memory, no init kernels), then
        materialized on `device` in `dtype` with valid buffers; device='meta' stops before that."""
        with torch.device("meta"):
            model = cls(config)
        if str(device) == "meta":
            return model
        model = model.to_empty(device=device).to(dtype)
        model.tie_weights()  # to_empty gives the head and the embedding separate storage again
        model.reset_buffers()
        return model

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute what `to_empty` leaves as garbage and no checkpoint holds (RoPE tables); the
        balancing state restarts at zero in fp32 whatever the weights' dtype, as bias steps are tiny."""
        self.model.rotary_emb.reset_tables(self.config)
        for r in self.modules():
            if isinstance(r, Router):  # MTP layers' too
                r.expert_load = torch.zeros_like(r.expert_load, dtype=torch.float32)
                r.e_score_correction_bias = torch.zeros_like(r.e_score_correction_bias, dtype=torch.float32)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device  # never quantized or packed (engine/)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype


def mtp_targets(
    labels: torch.Tensor, depth: int, doc_ids: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """MTP depth `depth`'s targets [B, S-depth-1] from the main head's labels [B,S]: the token
    depth+1 further on (V3 eq. 24-25). With doc_ids [B,S] of packed documents, position i predicts
    nothing where the token it is fed (i+depth+1) opens or belongs to a later document: its block
    sees only i's document, so such a target would be a guess across the boundary. Each document's
    last depth+1 positions are dropped, as Megatron-LM's per-document roll of MTP labels does."""
    shift = depth + 1
    targets = labels[:, shift:]
    if doc_ids is None:
        return targets
    return targets.masked_fill(doc_ids[:, shift:] != doc_ids[:, :-shift], ignore_index)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy in fp32 over non-ignored targets."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index)


def check_model(model: object, user: str) -> None:
    """Refuse, with an error that says what to pass, what `user` (the Engine, save_model) cannot use
    as a model: a path or a preset name (an AttributeError on `.config` said nothing of loading it),
    or a model still on the meta device (no weights to run or save: failed deep inside a forward)."""
    if not isinstance(getattr(model, "config", None), ModelConfig):  # DeepSeekV3, or a wrapper of one
        hint = (
            " (load it first: nanoseek.load_model(path_or_preset))"
            if isinstance(model, str | PathLike)
            else ""
        )
        raise TypeError(f"{user} takes a model (nanoseek.DeepSeekV3), got {type(model).__name__}{hint}")
    if any(p.is_meta for p in model.parameters()):  # type: ignore[attr-defined]
        raise ValueError(
            f"{user}: the model has weights on the meta device (built with device='meta', no values yet): "
            "materialize and fill them first (nanoseek.load_model(path) loads a checkpoint's)"
        )
