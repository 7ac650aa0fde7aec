"""Exact accounting of a DeepSeek model: parameters, FLOPs per token, KV-cache bytes, training cost.

What is notable here:
- Counts are exact: the model is built on the meta device (no memory) and every parameter is
  classified by the module that owns it. Closed-form formulas from `ModelConfig` (`analytic_*`) are
  kept beside it and tests hold the two equal for every preset.
- Conventions (the papers'): `total_params` is the main model without the multi-token-prediction
  (MTP) modules, counting a tied embedding once. `active_params` per token leaves out the input
  embedding (a lookup, not a matmul) and counts lm_head, attention, norms, routers, dense MLPs, the
  shared experts and top-k of the routed experts. `mtp_params` are the MTP modules' own weights; they
  share the embedding and head with the main model (V3 §2.2), while DeepSeek's checkpoint carries a
  copy of both in the MTP layer: `mtp_params_with_shared` is that checkpoint convention
  (V3: 671B + 14B = 685B).
- FLOPs per token (forward) = 2 x active matmul parameters + attention scores and weighted sum
  (2·heads·(qk_head_dim + v_head_dim) per visible key, the decompressed/naive form used in training),
  at a stated sequence length with a causal mask (a token sees (seq_len + 1) / 2 keys on average).
  Training = 3 x forward (backward costs two forwards). Norms, RoPE, softmax, routing top-k are
  left out, as in the Kaplan/Chinchilla/PaLM convention.
- KV cache per token in BF16: MLA stores num_layers x (kv_lora_rank + qk_rope_head_dim) elements;
  the MHA of the same shape would store num_layers x heads x (qk_head_dim + v_head_dim).
- The dense families (Qwen2, Llama: grouped-query attention) cache num_layers x 2 x kv_heads x
  head_dim; "MLA at the same width" is V2's own choice for their heads (V2 §2.1.4: d_c = 4 d_h,
  d_h^R = d_h / 2, i.e. 4.5 d_h per layer), what the same model would cache had it MLA.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from nanoseek.config import ModelConfig, resolve_config

# Published figures (H800 SXM, dense, i.e. without 2:4 sparsity), FLOP/s.
H800_BF16_PEAK_FLOPS = 989e12
H800_FP8_PEAK_FLOPS = 1979e12
DEFAULT_SEQ_LEN = 4096  # DeepSeek-V3's pretraining sequence length (V3 §4.2)
BF16_BYTES = 2

COMPONENTS = (
    "embedding",
    "lm_head",
    "attention",
    "dense_mlp",
    "shared_experts",
    "routed_experts",
    "router",
    "norms",
)


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by component. `*_active` fields count what one token touches."""

    by_component: dict[str, int]
    active_by_component: dict[str, int]
    mtp: int
    mtp_active: int  # MTP modules' own weights a token touches (shared embedding/head not included)

    @property
    def total(self) -> int:
        return sum(self.by_component.values())

    @property
    def described(self) -> str:
        """What `serve` and `chat` print: the model's count as `inspect` and the report give it, and
        the MTP module's weights (used by speculative decoding) apart. In `human`'s units, as those
        give it: in millions, DeepSeek-V3 read "671026.4M params" and a test model "0.0M params"."""
        mtp = f" + {human(self.mtp)} in the MTP module" if self.mtp else ""
        return f"{human(self.total)} params{mtp}"

    @property
    def active(self) -> int:
        return sum(self.active_by_component.values())

    @property
    def matmul_active(self) -> int:
        """Active parameters that take part in a matmul (norm weights are elementwise)."""
        return self.active - self.active_by_component["norms"]


# ------------------------------------------------------------ exact counts
def count_parameters(config: ModelConfig) -> ParamCounts:
    """Exact counts from the model built on the meta device (no memory is allocated)."""
    from torch import nn

    from nanoseek.checkpoint import build_model
    from nanoseek.model.attention import MultiHeadLatentAttention, RMSNorm
    from nanoseek.model.gqa import GroupedQueryAttention
    from nanoseek.model.moe import MLP, MoE, RoutedExperts, Router

    model = build_model(config, device="meta")
    k_over_e = (config.num_experts_per_tok or 0) / config.n_routed_experts if config.n_routed_experts else 0.0
    by = dict.fromkeys(COMPONENTS, 0)
    active = dict.fromkeys(COMPONENTS, 0)
    mtp = mtp_active = 0
    seen: set[int] = set()

    modules = dict(model.named_modules())

    def parent_of(path: str, up: int = 1) -> nn.Module | None:
        parts = path.split(".")
        return modules.get(".".join(parts[:-up])) if len(parts) > up else None

    def classify(path: str, module: nn.Module) -> str:
        if isinstance(module, RMSNorm):
            return "norms"
        if isinstance(module, nn.Embedding):
            return "embedding"
        if isinstance(module, RoutedExperts):
            return "routed_experts"
        if isinstance(module, Router):
            return "router"
        if path == "lm_head":
            return "lm_head"
        parent = parent_of(path)
        if isinstance(parent, MultiHeadLatentAttention | GroupedQueryAttention):
            return "attention"
        if isinstance(parent, MLP):
            return "shared_experts" if isinstance(parent_of(path, 2), MoE) else "dense_mlp"
        if path.startswith("model.mtp_layers."):
            return "mtp_only"  # eh_proj
        raise RuntimeError(f"accounting does not know how to classify module {path!r}: update it")

    # lm_head first: with tied embeddings the shared matrix is the head's matmul (active) and the
    # embedding's lookup (not active); counting it under lm_head keeps it active and counted once.
    for path in ["lm_head"] + [n for n in modules if n != "lm_head"]:
        module = modules[path]
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            comp = classify(path, module)
            frac = k_over_e if comp == "routed_experts" else (0.0 if comp == "embedding" else 1.0)
            if path.startswith("model.mtp_layers."):
                mtp += p.numel()
                mtp_active += round(p.numel() * frac)
            else:
                by[comp] += p.numel()
                active[comp] += round(p.numel() * frac)
    return ParamCounts(by, active, mtp, mtp_active)


# ------------------------------------------------------- closed-form counts
def _attention_params(c: ModelConfig) -> tuple[int, int]:
    """(linear weights and biases, norm weights) of one attention layer: MLA (V2 §2.1) or GQA."""
    h, heads = c.hidden_size, c.num_attention_heads
    if c.attention_variant == "gqa":
        d, kv = int(c.head_dim or 0), int(c.num_key_value_heads or heads)
        qkv = h * (heads + 2 * kv) * d + (heads + 2 * kv) * d * c.qkv_bias
        return qkv + heads * d * h + h * c.o_bias, 0
    if c.q_lora_rank is None:
        q = h * heads * c.qk_head_dim
        q_norm = 0
    else:
        q = h * c.q_lora_rank + c.q_lora_rank * heads * c.qk_head_dim
        q_norm = c.q_lora_rank
    kv_a = h * (c.kv_lora_rank + c.qk_rope_head_dim)
    kv_b = c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)
    o = heads * c.v_head_dim * h
    return q + kv_a + kv_b + o, q_norm + c.kv_lora_rank


def _mlp_layer_params(c: ModelConfig, layer_idx: int) -> dict[str, tuple[int, int]]:
    """(total, active) per component for the feed-forward part of one layer."""
    h = c.hidden_size
    if not c.is_moe_layer(layer_idx):
        d = 3 * h * c.intermediate_size
        return {"dense_mlp": (d, d)}
    e, k = c.n_routed_experts or 0, c.num_experts_per_tok or 0
    expert = 3 * h * c.moe_intermediate_size
    shared = expert * (c.n_shared_experts or 0)
    return {
        "routed_experts": (e * expert, k * expert),
        "shared_experts": (shared, shared),
        "router": (e * h, e * h),
    }


def analytic_parameters(c: ModelConfig) -> ParamCounts:
    """The same counts as `count_parameters`, from the config alone (for cross-checking and reading)."""
    h = c.hidden_size
    by = dict.fromkeys(COMPONENTS, 0)
    active = dict.fromkeys(COMPONENTS, 0)
    emb = c.vocab_size * h
    by["embedding"] = 0 if c.tie_word_embeddings else emb
    by["lm_head"] = active["lm_head"] = emb
    attn, attn_norm = _attention_params(c)

    def layer(idx: int) -> tuple[dict[str, int], dict[str, int]]:
        t = dict.fromkeys(COMPONENTS, 0)
        a = dict.fromkeys(COMPONENTS, 0)
        t["attention"] = a["attention"] = attn
        t["norms"] = a["norms"] = attn_norm + 2 * h  # + input / post-attention layernorms
        for comp, (tot, act) in _mlp_layer_params(c, idx).items():
            t[comp] += tot
            a[comp] += act
        return t, a

    for i in range(c.num_hidden_layers):
        t, a = layer(i)
        for comp in COMPONENTS:
            by[comp] += t[comp]
            active[comp] += a[comp]
    by["norms"] += h  # final norm
    active["norms"] += h
    mtp = mtp_active = 0
    for d in range(c.num_nextn_predict_layers):
        t, a = layer(c.num_hidden_layers + d)
        extra = 2 * h * h + 3 * h  # eh_proj + enorm, hnorm, shared_head.norm
        mtp += sum(t.values()) + extra
        mtp_active += sum(a.values()) + extra
    return ParamCounts(by, active, mtp, mtp_active)


# ------------------------------------------------------------------ FLOPs
def attention_flops_per_token(config: ModelConfig, keys: float) -> float:
    """Forward FLOPs of QK^T and AV for one query over `keys` visible keys, all layers (naive MLA)."""
    c = config
    if c.attention_variant == "gqa":
        return 2.0 * c.num_hidden_layers * c.num_attention_heads * 2 * int(c.head_dim or 0) * keys
    return 2.0 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * keys


def mean_causal_keys(seq_len: int) -> float:
    """Keys a token sees on average in a causal sequence of `seq_len` tokens."""
    return (seq_len + 1) / 2


def flops_per_token(
    config: ModelConfig,
    seq_len: int = DEFAULT_SEQ_LEN,
    training: bool = False,
    include_mtp: bool = False,
    counts: ParamCounts | None = None,
) -> float:
    """Model FLOPs per token (forward; x3 with `training`), causal over `seq_len`.

    With `include_mtp`, each MTP depth adds its block, eh_proj and another pass through the shared
    head (what V3's training computes; inference drops the modules).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    counts = counts or analytic_parameters(config)
    keys = mean_causal_keys(seq_len)
    fwd = 2.0 * counts.matmul_active + attention_flops_per_token(config, keys)
    if include_mtp and config.num_nextn_predict_layers:
        fwd += mtp_flops_per_token(config, seq_len, counts)
    return 3.0 * fwd if training else fwd


def mtp_flops_per_token(config: ModelConfig, seq_len: int, counts: ParamCounts | None = None) -> float:
    """Forward FLOPs of all MTP depths per token: own matmuls, the shared head again, attention."""
    c = config
    if not c.num_nextn_predict_layers:
        return 0.0
    counts = counts or analytic_parameters(c)
    h = c.hidden_size
    norms = 3 * h + _attention_params(c)[1] + 2 * h  # elementwise, per depth
    own_matmul = counts.mtp_active - c.num_nextn_predict_layers * norms
    head = c.num_nextn_predict_layers * c.vocab_size * h
    per_layer_attn = attention_flops_per_token(c, mean_causal_keys(seq_len)) / c.num_hidden_layers
    return 2.0 * (own_matmul + head) + c.num_nextn_predict_layers * per_layer_attn


# --------------------------------------------------------------- KV cache
def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_element: int = BF16_BYTES) -> int:
    """MLA: one latent c_kv plus one shared RoPE key per layer (V2 §2.1.2); GQA: K and V per KV head."""
    if config.attention_variant == "gqa":
        kv = int(config.num_key_value_heads or config.num_attention_heads)
        return config.num_hidden_layers * 2 * kv * int(config.head_dim or 0) * bytes_per_element
    return config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * bytes_per_element


def mha_kv_cache_bytes_per_token(config: ModelConfig, bytes_per_element: int = BF16_BYTES) -> int:
    """What standard multi-head attention of the same shape would cache: full K and V per head."""
    c = config
    if c.attention_variant == "gqa":
        return c.num_hidden_layers * c.num_attention_heads * 2 * int(c.head_dim or 0) * bytes_per_element
    return c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * bytes_per_element


def mla_kv_cache_bytes_per_token(config: ModelConfig, bytes_per_element: int = BF16_BYTES) -> int:
    """What MLA would cache at this width: the model's own for MLA; for GQA, V2's proportions for
    its head size (d_c = 4 d_h, d_h^R = d_h / 2: V2 §2.1.4), i.e. 4.5 head_dim per layer."""
    c = config
    if c.attention_variant == "mla":
        return kv_cache_bytes_per_token(c, bytes_per_element)
    d = int(c.head_dim or 0)
    return c.num_hidden_layers * (4 * d + d // 2) * bytes_per_element


# ------------------------------------------------------------ the account
@dataclass(frozen=True)
class ModelAccount:
    total_params: int
    active_params: int
    mtp_params: int
    mtp_params_with_shared: int
    embedding_params: int
    params_by_component: dict[str, int]
    active_params_by_component: dict[str, int]
    seq_len: int
    flops_per_token: float
    training_flops_per_token: float
    mtp_flops_per_token: float
    kv_cache_bytes_per_token: int
    mha_kv_cache_bytes_per_token: int
    mla_kv_cache_bytes_per_token: int
    attention_variant: str

    @property
    def kv_cache_ratio(self) -> float:
        return self.mha_kv_cache_bytes_per_token / self.kv_cache_bytes_per_token

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kv_cache_ratio"] = self.kv_cache_ratio
        d["active_fraction"] = self.active_params / self.total_params
        return d


def account(config_or_path: ModelConfig | str | os.PathLike, seq_len: int = DEFAULT_SEQ_LEN) -> ModelAccount:
    """Everything `nanoseek inspect` reports, parameters counted on the meta model."""
    c = config_or_path if isinstance(config_or_path, ModelConfig) else resolve_config(config_or_path)
    counts = count_parameters(c)
    emb = c.vocab_size * c.hidden_size
    shared_copies = c.num_nextn_predict_layers * 2 * emb  # embedding + head copy per MTP layer on disk
    return ModelAccount(
        total_params=counts.total,
        active_params=counts.active,
        mtp_params=counts.mtp,
        mtp_params_with_shared=counts.mtp + shared_copies,
        embedding_params=emb,
        params_by_component=dict(counts.by_component),
        active_params_by_component=dict(counts.active_by_component),
        seq_len=seq_len,
        flops_per_token=flops_per_token(c, seq_len, counts=counts),
        training_flops_per_token=flops_per_token(c, seq_len, training=True, counts=counts),
        mtp_flops_per_token=mtp_flops_per_token(c, seq_len, counts),
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(c),
        mha_kv_cache_bytes_per_token=mha_kv_cache_bytes_per_token(c),
        mla_kv_cache_bytes_per_token=mla_kv_cache_bytes_per_token(c),
        attention_variant=c.attention_variant,
    )


# ------------------------------------------------------------------ costs
_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}
# Commas only as thousands separators: "1,5T" (a decimal comma) is an error, not 15T.
_NUMBER = re.compile(
    r"^\s*((?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9][0-9_]*)\.?[0-9]*(?:[eE][+-]?[0-9]+)?)\s*([KMBGTP]?)\s*$",
    re.IGNORECASE,
)


def parse_count(text: str | float | int, what: str = "count") -> float:
    """'14.8T', '300B', '2.788M', '1e9', '1,000,000' -> float. Suffixes K M B/G T P (powers of 1000)."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = _NUMBER.match(str(text))
        if not m:
            raise ValueError(
                f"cannot parse {what} {text!r}: use a number with an optional K/M/B/T suffix, e.g. 14.8T, "
                f"300B, 2.788M or 1e9"
            )
        value = float(m.group(1).replace(",", "").replace("_", "")) * _SUFFIX[m.group(2).upper()]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number, got {text!r}")
    return value


@dataclass(frozen=True)
class TrainingCost:
    tokens: float
    flops_per_token: float  # training (forward + backward), incl. MTP when counted
    total_flops: float
    peak_flops: float  # per GPU
    mfu: float
    gpu_hours: float
    gpus: int
    days: float
    usd_per_gpu_hour: float
    usd: float
    mfu_implied: bool  # True when the GPU-hours were given and the MFU derived from them
    # what the FLOPs assume (the text says "incl. MTP, seq 4096"; without them `--json` could not tell)
    seq_len: int
    includes_mtp: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_cost_inputs(
    tokens: float,
    peak_flops: float,
    mfu: float | None,
    gpu_hours: float | None,
    gpus: int,
    usd_per_gpu_hour: float,
    seq_len: int,
) -> None:
    """Raise ValueError for inputs `training_cost` cannot price, without a config: `nanoseek cost` asks
    before it fetches a Hub model's config.json (a bad flag said after a download, or offline as one)."""
    if (mfu is None) == (gpu_hours is None):
        raise ValueError("give exactly one of mfu (to estimate GPU-hours) or gpu_hours (to imply the MFU)")
    # written so that NaN fails too
    if not (
        0 < tokens < math.inf and 0 < peak_flops < math.inf and gpus >= 1 and 0 <= usd_per_gpu_hour < math.inf
    ):
        raise ValueError(
            "tokens, peak FLOP/s and GPU count must be positive; price must be >= 0; all finite "
            f"(got tokens={tokens}, peak_flops={peak_flops}, gpus={gpus}, usd_per_gpu_hour={usd_per_gpu_hour})"
        )
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if gpu_hours is not None and not 0 < gpu_hours < math.inf:
        raise ValueError(f"gpu_hours must be positive and finite, got {gpu_hours}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")


def training_cost(
    config: ModelConfig,
    tokens: float,
    peak_flops: float = H800_BF16_PEAK_FLOPS,
    mfu: float | None = None,
    gpu_hours: float | None = None,
    gpus: int = 2048,
    usd_per_gpu_hour: float = 2.0,
    seq_len: int = DEFAULT_SEQ_LEN,
    include_mtp: bool = True,
) -> TrainingCost:
    """GPU-hours, wall-clock days and dollars to train on `tokens` tokens.

    Give `mfu` (model FLOPs utilization, 0-1] to estimate GPU-hours, or `gpu_hours` (a known bill) to
    get the MFU it implies; exactly one of the two.
    """
    check_cost_inputs(tokens, peak_flops, mfu, gpu_hours, gpus, usd_per_gpu_hour, seq_len)
    fpt = flops_per_token(config, seq_len, training=True, include_mtp=include_mtp)
    total = fpt * tokens
    implied = gpu_hours is not None
    if mfu is not None:
        gpu_hours = total / (peak_flops * mfu) / 3600
    else:
        assert gpu_hours is not None
        mfu = total / (gpu_hours * 3600 * peak_flops)
    return TrainingCost(
        tokens=tokens,
        flops_per_token=fpt,
        total_flops=total,
        peak_flops=peak_flops,
        mfu=mfu,
        gpu_hours=gpu_hours,
        gpus=gpus,
        days=gpu_hours / gpus / 24,
        usd_per_gpu_hour=usd_per_gpu_hour,
        usd=gpu_hours * usd_per_gpu_hour,
        mfu_implied=implied,
        seq_len=seq_len,
        includes_mtp=include_mtp and bool(config.num_nextn_predict_layers),
    )


def human(n: float) -> str:
    """36.63e9 -> '36.63B' (K/M/B/T, powers of 1000): parameter and token counts."""
    n = float(f"{n:.4g}")  # rounded first: 999.96M is '1B', not '1000M'
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{suffix}"
    return f"{n:.4g}"


def counted(n: int, noun: str) -> str:
    """1, 'step' -> '1 step'; 3, 'step' -> '3 steps' (a run of one step said "1 steps")."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def si(n: float, unit: str) -> str:
    """8.35e10, 'FLOP' -> '83.5 GFLOP' (SI prefixes)."""
    n = float(f"{n:.3g}")  # rounded first: 999.7e9 is '1 TFLOP', not '1e+03 GFLOP'
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}"
