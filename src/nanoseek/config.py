"""`ModelConfig`: DeepSeek's own config.json fields and meanings, plus named presets.

Field names follow DeepSeek's published `config.json` (and transformers' `DeepseekV3Config`), so a
reader can hold this file next to the papers and the checkpoints:

- MLA (DeepSeek-V2 §2.1): `q_lora_rank` (None = full-rank query), `kv_lora_rank`, `qk_nope_head_dim`,
  `qk_rope_head_dim` (decoupled RoPE key, shared by all heads), `v_head_dim`.
- DeepSeekMoE (V2 §2.2, V3 §2.1.2): `n_routed_experts`, `n_shared_experts`, `num_experts_per_tok`,
  `n_group`/`topk_group` (group-limited routing), `routed_scaling_factor`, `scoring_func`
  ("sigmoid" in V3, "softmax" in V2), `topk_method` ("noaux_tc" in V3, "greedy" or
  "group_limited_greedy" in V2), `norm_topk_prob`, `first_k_dense_replace`.
- MTP (V3 §2.2): `num_nextn_predict_layers`.
- RoPE: `rope_theta`, `rope_scaling` (YaRN, DeepSeek's files) which transformers 5 calls
  `rope_parameters`; `rope_interleave` says the checkpoint's RoPE dims are pairwise interleaved.
- The dense families R1 distils into (R1 §2.4) read from their own config.json: `model_type` "qwen2"
  or "llama" selects grouped-query attention (`attention_variant` "gqa": `num_key_value_heads`,
  `head_dim`, QKV bias for Qwen2, `attention_bias` for Llama, Llama 3 `rope_scaling`) and a dense
  SwiGLU MLP in every layer (no experts, no MTP). The MLA and MoE fields are then unused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.atomic import atomic_write

# Fields that config.json carries and round trips keep; those that would change the computation
# (hidden_act, attention_bias) are checked to hold the one value implemented (`validate`).
_PASSTHROUGH_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "moe_layer_freq": 1,
    "ep_size": 1,
    "use_cache": True,
}
# Dense families (grouped-query attention, dense SwiGLU MLP) and their transformers classes.
DENSE_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
# The model_type of each transformers class nanoseek reads (for a config.json that names no model_type).
_ARCHITECTURE_TYPES = {
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    **{arch: model_type for model_type, arch in DENSE_ARCHITECTURES.items()},
}
# What the dense families' config.json carries besides the computation's fields, with defaults.
_DENSE_PASSTHROUGH = {
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "use_cache": True,
}
# ModelConfig fields a dense family's config.json holds (the MLA / MoE / MTP ones are not its own).
_DENSE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "model_type",
    "torch_dtype",
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_JSON_KINDS = {list: "an array", str: "a string", type(None): "null", bool: "a boolean", int: "a number"}


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object file `path` holds (config.json, tokenizer_config.json, ...), with one error naming
    the file where it is not UTF-8, not JSON (empty, truncated) or JSON of another kind (a list, a
    string): a hand edit or a broken copy, which met the readers as a bare codec error or a `.get`
    on a list deep inside them."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), "a number")
        raise ValueError(f"{path} is not a JSON object: it holds {kind}")
    return value


# What a config.json value of each field type must be (JSON's true is no integer, "64" no number).
_TYPE_CHECKS: dict[str, tuple[str, Any]] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", _is_number),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
}


@dataclass
class ModelConfig:
    """A model's shape, with config.json's field names (DeepSeek-V3's defaults; Qwen2 / Llama by
    `model_type`). Checked when built (`validate`); `load(dir)` / `save(dir)` read and write config.json,
    `replace(**changes)` gives a changed copy, `get_preset(name)` the named shapes."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # MLA has no KV-head grouping; kept for transformers
    head_dim: int | None = None  # GQA's per-head width (default hidden/heads); unused by MLA
    # Multi-head Latent Attention
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    # Multi-token prediction
    num_nextn_predict_layers: int = 0
    # Positions and norms
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # Token ids
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # Balancing knobs from the V2/V3 papers, used by training only
    aux_loss_alpha: float = 0.0001
    seq_aux: bool = True  # the balance loss per sequence (V3 eq. 17-20); False: over the batch (V2's gate)
    model_type: str = "deepseek_v3"
    torch_dtype: str = "bfloat16"
    # Anything else found in a config.json, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None or self.attention_variant == "mla":
            # MLA has no KV-head grouping, but transformers' DeepseekV2/V3 group its query heads by this
            # field: it follows the head count (kept through a replace() of the heads, it broke them)
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_variant == "gqa":
            # A dense family: no experts, no MTP, half-split RoPE over the whole head (Qwen2 / Llama).
            self.head_dim = self.head_dim or self.hidden_size // max(self.num_attention_heads, 1)
            self.n_routed_experts = self.n_shared_experts = self.num_experts_per_tok = None
            self.num_nextn_predict_layers = 0
            self.rope_interleave = False
        rs = self.rope_scaling
        rtype = rs.get("type", rs.get("rope_type")) if isinstance(rs, dict) else None
        if rs == {} or rtype == "default":
            # plain RoPE (saved, {} became a YaRN without a factor that transformers refused to load)
            rs = self.rope_scaling = None
        if rs and rtype in ("yarn", "llama3"):
            # transformers' default where a file leaves it out: the context the model was trained at
            rs = self.rope_scaling = {"original_max_position_embeddings": self.max_position_embeddings, **rs}
            if rtype == "yarn" and not rs.get("factor"):
                # and YaRN's factor left null: the extended context over the original one
                rs["factor"] = self.max_position_embeddings / rs["original_max_position_embeddings"]
        self.validate()

    # ----------------------------------------------------------------- derived
    @property
    def attention_variant(self) -> str:
        """ "mla" (DeepSeek) or "gqa" (grouped-query attention: the Qwen2 / Llama families)."""
        return "gqa" if self.model_type in DENSE_ARCHITECTURES else "mla"

    @property
    def qkv_bias(self) -> bool:
        """GQA's q/k/v projections carry a bias: always in Qwen2, with `attention_bias` in Llama."""
        return self.model_type == "qwen2" or bool(_get(self, "attention_bias", False))

    @property
    def o_bias(self) -> bool:
        """Llama's `attention_bias` also covers o_proj; Qwen2's o_proj never has one."""
        return self.model_type == "llama" and bool(_get(self, "attention_bias", False))

    @property
    def rope_head_dim(self) -> int:
        """The dims RoPE rotates: MLA's decoupled key part, or GQA's whole head."""
        return self.qk_rope_head_dim if self.attention_variant == "mla" else int(self.head_dim or 0)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers before `first_k_dense_replace` use a dense MLP (V3 §4.2: the first three layers)."""
        return (
            self.is_moe
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % max(1, int(_get(self, "moe_layer_freq", 1))) == 0
        )

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d) times YaRN's mscale² (DeepSeek-V2 appendix on YaRN; `mscale_all_dim`)."""
        if self.attention_variant == "gqa":
            return float(self.head_dim or 0) ** -0.5
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn":
            mscale_all_dim = rs.get("mscale_all_dim", 0) or 0
            factor = rs["factor"]
            if mscale_all_dim:
                m = yarn_get_mscale(factor, mscale_all_dim)
                scale = scale * m * m
        return scale

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid ModelConfig: {msg}")

        for f in dataclasses.fields(self):  # a hand-edited config.json: 64.0 or "64" where 64 belongs
            value = getattr(self, f.name)
            kind = str(f.type).removesuffix(" | None")
            if value is None and kind != f.type:
                continue
            if kind in _TYPE_CHECKS:
                want, ok = _TYPE_CHECKS[kind]
                need(ok(value), f"{f.name} must be {want}, got {value!r}")
        # every moe_layer_freq-th layer is MoE (DeepSeek's `layer_idx % moe_layer_freq == 0`): 0 divides by
        # zero there, and was taken as 1 here
        freq = _get(self, "moe_layer_freq", 1)
        need(
            not self.is_moe or (_TYPE_CHECKS["int"][1](freq) and freq >= 1),
            f"moe_layer_freq must be an integer >= 1, got {freq!r}",
        )
        # Sizes the model is built from: zero or negative ones give empty or crashing layers.
        sizes = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ]
        if any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            sizes.append("intermediate_size")
        if self.attention_variant == "mla":
            sizes += ["kv_lora_rank", "v_head_dim"] + ["q_lora_rank"] * (self.q_lora_rank is not None)
        if self.is_moe:
            sizes += ["moe_intermediate_size", "n_group"]
        for name in sizes:
            value = getattr(self, name)
            hint = " (null: a full-rank query)" if name == "q_lora_rank" else ""
            need(value > 0, f"{name} must be > 0{hint}, got {value}")
        need(
            self.qk_nope_head_dim >= 0 and self.qk_rope_head_dim >= 0,
            "qk_nope_head_dim and qk_rope_head_dim must be >= 0",
        )
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.attention_variant == "mla":  # the head size sets the softmax scale, 1/sqrt(d)
            need(
                self.qk_head_dim > 0,
                "qk_nope_head_dim + qk_rope_head_dim (the query/key head size) must be > 0",
            )
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        rs = self.rope_scaling
        need(rs is None or isinstance(rs, dict), f"rope_scaling must be an object or null, got {rs!r}")
        rtype = rs.get("type", rs.get("rope_type")) if rs else None
        # Checked here, not only in from_dict: a replace(rope_scaling=...) of another type (or none)
        # built a YaRN model without a word, and saved a config.json that nanoseek refused to load.
        need(
            not rs or rtype in ("yarn", "llama3"),
            f"unsupported rope scaling type {rtype!r} (nanoseek supports yarn and llama3)"
            if rtype
            else f"rope_scaling names no type (type or rope_type: yarn or llama3), got {rs!r}",
        )
        if rs:
            # numbers, as the frequencies need them (a "32" or a null was an unnamed TypeError at build)
            for key in ("factor", "original_max_position_embeddings"):
                value = rs.get(key)
                need(
                    _is_number(value) and value > 0,
                    f"rope_scaling's {key} must be a number > 0, got {value!r}",
                )
            for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
                value = rs.get(key)  # (null: the default)
                need(
                    value is None or _is_number(value),
                    f"rope_scaling's {key} must be a number, got {value!r}",
                )
            for key in ("low_freq_factor", "high_freq_factor"):
                value = rs.get(key, 1.0)
                need(_is_number(value), f"rope_scaling's {key} must be a number, got {value!r}")
        need(
            self.scoring_func in ("sigmoid", "softmax"),
            f"scoring_func {self.scoring_func!r} not in sigmoid/softmax",
        )
        need(
            self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
            f"topk_method {self.topk_method!r} not in noaux_tc/greedy/group_limited_greedy",
        )
        if self.is_moe:
            e, k = self.n_routed_experts or 0, self.num_experts_per_tok or 0
            shared = self.n_shared_experts or 0
            need(shared >= 0, f"n_shared_experts must be >= 0, got {shared}")
            need(0 < k <= e, f"num_experts_per_tok ({k}) must be in 1..n_routed_experts ({e})")
            need(
                e % self.n_group == 0, f"n_routed_experts ({e}) must be divisible by n_group ({self.n_group})"
            )
            need(
                1 <= self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) must be in 1..n_group"
            )
            need(
                self.topk_group * (e // self.n_group) >= k,
                "topk_group groups must hold at least num_experts_per_tok experts",
            )
            need(
                self.topk_method != "noaux_tc" or self.n_group == 1 or e // self.n_group >= 2,
                f"noaux_tc ranks a group by the sum of its top-2 scores: each of the n_group "
                f"({self.n_group}) groups needs at least 2 of the {e} routed experts",
            )
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        act = _get(self, "hidden_act", "silu")
        need(
            act in ("silu", "swish"), f"hidden_act {act!r} is not supported: every MLP here is SwiGLU (silu)"
        )
        if self.attention_variant == "mla":  # DeepSeek's attention has no biases (Llama's flag is GQA's)
            need(not _get(self, "attention_bias", False), "attention_bias is not supported by MLA")
        # Llama's and transformers' DeepseekV2 flag (biases in the dense MLPs and shared experts): a V2 file
        # with it was refused only by its weights, as "written for another config.json"
        need(not _get(self, "mlp_bias", False), "mlp_bias is not supported: every MLP here has no biases")
        if self.attention_variant == "gqa":
            kv = int(self.num_key_value_heads or 0)
            need(
                kv > 0 and self.num_attention_heads % kv == 0,
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({kv})",
            )
            head_dim = int(self.head_dim or 0)
            need(head_dim > 0 and head_dim % 2 == 0, f"head_dim must be even and > 0, got {self.head_dim}")
            need(
                not _get(self, "use_sliding_window", False),
                "use_sliding_window (Qwen2) is not supported: every layer attends to the full context",
            )

    # ------------------------------------------------------------- config.json
    def to_dict(self) -> dict[str, Any]:
        """A config.json dict in DeepSeek's / transformers' layout (Qwen2's / Llama's for those)."""
        d: dict[str, Any] = {}
        dense = self.attention_variant == "gqa"
        for f in dataclasses.fields(self):
            if f.name == "extra" or (dense and f.name not in _DENSE_FIELDS):
                continue
            # MLA's head_dim is transformers' copy of qk_rope_head_dim (its RoPE width), which it derives
            # where the file leaves it out: one read from a file and kept went stale as the dims changed
            if f.name == "head_dim" and (self.head_dim is None or not dense):
                continue
            d[f.name] = getattr(self, f.name)
        if not dense and not self.is_moe:
            # No routed experts: every layer is dense here, but transformers' DeepseekV2/V3 (as vLLM and
            # DeepSeek's own code) make each layer past first_k_dense_replace an MoE layer, of 0 experts
            # whose forward fails; the file says what the model is: all its layers, MTP's too, dense.
            every = self.num_hidden_layers + self.num_nextn_predict_layers
            d["first_k_dense_replace"] = max(self.first_k_dense_replace, every)
        for k, v in (_DENSE_PASSTHROUGH if dense else _PASSTHROUGH_DEFAULTS).items():
            d.setdefault(k, v)
        d.update(self.extra)
        if dense:
            arch = DENSE_ARCHITECTURES[self.model_type]
        elif self.model_type == "deepseek_v3":
            arch = "DeepseekV3ForCausalLM"
        else:
            arch = "DeepseekV2ForCausalLM"
        d.setdefault("architectures", [arch])
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rs.setdefault("type", rs.get("rope_type", "yarn"))
            rs.setdefault("rope_type", rs["type"])
            d["rope_scaling"] = rs
        # transformers 5 reads rope settings from `rope_parameters`; DeepSeek's files use `rope_scaling`.
        rp = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rp.update({k: v for k, v in self.rope_scaling.items() if k != "type"})
            rp["rope_type"] = self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "yarn"))
        d["rope_parameters"] = rp
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # rope_parameters (transformers 5) -> rope_theta + rope_scaling
        rp = d.pop("rope_parameters", None)
        if rp is not None and not isinstance(rp, dict):  # (a hand edit: an AttributeError on .get below)
            raise ValueError(f"rope_parameters must be an object or null, got {rp!r}")
        if rp:
            if "rope_theta" in rp and "rope_theta" not in d:
                d["rope_theta"] = rp["rope_theta"]
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rtype not in (None, "default") and not d.get("rope_scaling"):
                d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        rs = d.get("rope_scaling")
        if isinstance(rs, dict) and rs:  # (anything else is refused by `validate`, naming it)
            rs = dict(rs)
            rtype = rs.get("type", rs.get("rope_type"))
            if rtype is None:  # transformers reads an untyped one as plain RoPE ("default")
                d["rope_scaling"] = None
            elif rtype != "default":  # (`__post_init__` makes that one None)
                rs["type"] = rtype
                rs.pop("rope_type", None)
                d["rope_scaling"] = rs
        mt = d.get("model_type")
        if mt is None:
            # No model_type (a config.json written by hand): the class `architectures` names is the family.
            # DeepSeek-V3's default alone built an MLA model for a Llama or Qwen2 file, whose weights were
            # then refused as "written for another config.json".
            archs = d.get("architectures") or []
            if isinstance(archs, str):  # one class written without its list (read as DeepSeek-V3 before)
                archs = [archs]
            if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
                raise ValueError(f"architectures must be a list of class names, got {d['architectures']!r}")
            if archs and archs[0] not in _ARCHITECTURE_TYPES:
                raise ValueError(
                    f"no model_type, and architectures names {archs[0]!r}: nanoseek reads "
                    f"{', '.join(_ARCHITECTURE_TYPES)}"
                )
            mt = d["model_type"] = _ARCHITECTURE_TYPES[archs[0]] if archs else "deepseek_v3"
        if mt not in ("deepseek_v3", "deepseek_v2", *DENSE_ARCHITECTURES):
            raise ValueError(
                f"unsupported model_type {mt!r}: nanoseek reads deepseek_v3, deepseek_v2, qwen2 and llama"
            )
        if mt in DENSE_ARCHITECTURES:
            # Only the dense family's own fields; the MLA / MoE defaults stay out of the way.
            known = {*_DENSE_FIELDS, "rope_scaling"}
            passthrough = _DENSE_PASSTHROUGH
            # transformers 5 writes layer_types for Qwen2 (all full attention unless sliding windows).
            if set(d.get("layer_types") or ()) <= {"full_attention"}:
                d.pop("layer_types", None)
            # Qwen2/Llama configs may omit token ids; DeepSeek's defaults (0, 1) would be wrong ones.
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                d.setdefault(k, None)
        else:
            passthrough = _PASSTHROUGH_DEFAULTS
        if mt == "deepseek_v2":
            # V2 files: softmax scores, greedy or group-limited-greedy, no MTP, every layer MoE.
            d.setdefault("scoring_func", "softmax")
            d.setdefault("topk_method", "greedy")
            d.setdefault("norm_topk_prob", False)
            d.setdefault("routed_scaling_factor", 1.0)
            d.setdefault("rope_interleave", True)
            d.setdefault("first_k_dense_replace", 0)
            d.setdefault("n_group", d.get("n_group") or 1)
            d.setdefault("topk_group", d.get("topk_group") or 1)
            if d.get("n_group") is None:
                d["n_group"] = 1
            if d.get("topk_group") is None:
                d["topk_group"] = 1
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        for k in ("architectures", "transformers_version", "auto_map", "dtype"):
            extra.pop(k, None)
        if mt not in DENSE_ARCHITECTURES:  # transformers' qk_nope_head_dim + qk_rope_head_dim: derived again
            extra.pop("qk_head_dim", None)
        if "dtype" in d and "torch_dtype" not in d:
            kwargs["torch_dtype"] = d["dtype"]
        for k, v in passthrough.items():
            if extra.get(k) == v:
                extra.pop(k)
        return cls(**kwargs, extra=extra)

    def save(self, directory: str | os.PathLike) -> Path:
        return atomic_write(Path(directory) / "config.json", self.to_json())

    def to_json(self) -> str:
        """config.json's text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise FileNotFoundError(f"no config.json at {p}")
        d = read_json_object(p)
        if not d.keys() & {"model_type", "vocab_size", "hidden_size", "num_hidden_layers"}:
            # a generation_config.json, a tokenizer_config.json or `{}` read as DeepSeek-V3's defaults:
            # `inspect` and `cost` counted 671B for it without a word
            raise ValueError(
                f"{p} is not a model's config.json: it names none of model_type, vocab_size, hidden_size "
                "or num_hidden_layers"
            )
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:  # an unknown model_type, rope scaling, or field: name the file
            raise ValueError(f"{p}: {e}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _get(cfg: ModelConfig, key: str, default: Any) -> Any:
    return cfg.extra.get(key, default)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    import math

    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ------------------------------------------------------------------ presets
_YARN_V3 = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
_YARN_V2 = {**_YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707}


def _presets() -> dict[str, ModelConfig]:
    return {
        # A few million parameters: trains in minutes on 2 CPU cores, yet has every DeepSeek part
        # (low-rank query, latent KV, decoupled RoPE, shared + fine-grained routed experts with group
        # limits, a dense first layer, and an MTP module).
        "tiny": ModelConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=768,
            moe_intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            q_lora_rank=128,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            num_nextn_predict_layers=1,
            max_position_embeddings=1024,
            torch_dtype="float32",
            # N(0, 1/hidden): with transformers' 0.02 the attention logits of a narrow model start near
            # 0 and it learns to look back at its prompt much later (benchmarks/bench_learning.py)
            extra={"initializer_range": 256**-0.5},
        ),
        # A small dense student for distillation (R1 §2.4 distils into dense models): no routed
        # experts, no MTP, narrower than `tiny` and as deep: at 3 layers, pretrained on the speedrun's
        # corpus, it reached 45% mean pass@1 against 62% at 4 (long multiplication 8% against 54%)
        "tiny-dense": ModelConfig(
            vocab_size=4096,
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            q_lora_rank=None,
            kv_lora_rank=48,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=0,
            n_shared_experts=0,
            num_experts_per_tok=0,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=4,  # all layers dense, also for transformers' DeepseekV3 loader
            num_nextn_predict_layers=0,
            max_position_embeddings=1024,
            torch_dtype="float32",
            extra={"initializer_range": 192**-0.5},
        ),
        # R1's distillation recipe (R1 §2.4) in miniature: a Qwen2-layout dense student (grouped-query
        # attention with QKV bias, tied embeddings as Qwen2.5's small models) that transformers loads
        # as Qwen2ForCausalLM; nanoseek's tokenizer ids, so it pairs with `tiny` as its teacher.
        "tiny-qwen2": ModelConfig(
            model_type="qwen2",
            vocab_size=4096,
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=1,
            torch_dtype="float32",
            extra={"initializer_range": 192**-0.5},
        ),
        # ~500M total, ~100M active a token at this vocabulary (64 routed experts a layer): one GPU.
        "small": ModelConfig(
            vocab_size=32768,
            hidden_size=768,
            intermediate_size=2048,
            moe_intermediate_size=256,
            num_hidden_layers=12,
            num_attention_heads=12,
            q_lora_rank=384,
            kv_lora_rank=256,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            n_routed_experts=64,
            n_shared_experts=1,
            num_experts_per_tok=6,
            n_group=8,
            topk_group=4,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            num_nextn_predict_layers=1,
            max_position_embeddings=4096,
            extra={"initializer_range": 768**-0.5},
        ),
        "deepseek-v2-lite": ModelConfig(
            model_type="deepseek_v2",
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_hidden_layers=27,
            num_attention_heads=16,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            scoring_func="softmax",
            topk_method="greedy",
            norm_topk_prob=False,
            first_k_dense_replace=1,
            max_position_embeddings=163840,
            rope_scaling=dict(_YARN_V2),
            bos_token_id=100000,
            eos_token_id=100001,
            aux_loss_alpha=0.001,
        ),
        "deepseek-v2": ModelConfig(
            model_type="deepseek_v2",
            vocab_size=102400,
            hidden_size=5120,
            intermediate_size=12288,
            moe_intermediate_size=1536,
            num_hidden_layers=60,
            num_attention_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=160,
            n_shared_experts=2,
            num_experts_per_tok=6,
            n_group=8,
            topk_group=3,
            routed_scaling_factor=16.0,
            scoring_func="softmax",
            topk_method="group_limited_greedy",
            norm_topk_prob=False,
            first_k_dense_replace=1,
            max_position_embeddings=163840,
            rope_scaling=dict(_YARN_V2),
            bos_token_id=100000,
            eos_token_id=100001,
            aux_loss_alpha=0.003,
        ),
        # DeepSeek-V3 and DeepSeek-R1 share this shape.
        "deepseek-v3": ModelConfig(
            num_nextn_predict_layers=1,
            max_position_embeddings=163840,
            rope_scaling=dict(_YARN_V3),
        ),
    }


PRESETS: tuple[str, ...] = (
    "tiny",
    "tiny-dense",
    "tiny-qwen2",
    "small",
    "deepseek-v2-lite",
    "deepseek-v2",
    "deepseek-v3",
)


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset's config (`PRESETS`; case and `_` vs `-` ignored;
    `deepseek-r1` is `deepseek-v3`). Unknown names raise KeyError listing the presets."""
    presets = _presets()
    key = name.lower().replace("_", "-")
    if key in ("deepseek-r1",):
        key = "deepseek-v3"
    if key not in presets:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return presets[key]


def resolve_config(preset_or_dir: str | os.PathLike) -> ModelConfig:
    """A preset name or a directory / config.json path."""
    p = Path(preset_or_dir)
    # A directory without config.json is no config, and its name may be a preset's: `pretrain --out tiny`
    # (the default --preset tiny) makes ./tiny before reading the preset, and read it as "no config.json
    # at tiny/config.json"; a run named after its preset, or a working directory that has one, as well.
    if p.is_file() or (p / "config.json").exists():
        return ModelConfig.load(p)
    try:
        return get_preset(str(preset_or_dir))
    except KeyError:
        if p.exists():
            return ModelConfig.load(p)  # (says that it has no config.json)
        raise ValueError(
            f"{str(preset_or_dir)!r} is neither a directory with config.json nor a preset "
            f"({', '.join(PRESETS)})"
        ) from None
