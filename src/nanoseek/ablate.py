"""`nanoseek ablate STUDY`: DeepSeek's efficiency techniques, each switched on and off in miniature.

What is notable here:
- A study is a few variants of one base recipe that differ in one technique only (`Study.fields` names
  the settings that technique owns; tests check every variant's diff against it without training).
  The base recipe is the `cpu` speedrun preset's pretraining: the embedded chat corpus of its task
  families, vocabulary 1024, whole documents with a document mask, loss on responses only, Muon + AdamW at lr 3e-3,
  batch 8 x 320, γ = 0.01; the model is `--preset` (tiny) with what the study needs switched off
  (MTP outside the MTP study, experts where attention is compared against dense-only GQA).
- Each run (variant x seed) is nanoseek's own pretraining pieces (`Trainer`, `PackedDataset`,
  `language_model_loss`) for a budget of tokens or of seconds; at each evaluation it records the
  validation loss of the main head on held-out problems (the embedded corpus's test split, the same
  batches for every run), tokens, training FLOPs (`accounting.flops_per_token`, MTP included where it
  trains) and training wall seconds (evaluation excluded).
- Resumable: rows go to RUN/ablate/<study>/metrics.jsonl as they are measured and a `done` row closes
  a run; a rerun skips finished runs and drops the rows of a run that was interrupted. A first Ctrl-C
  or SIGTERM stops the running run at its next step (`Trainer.stop_on_signals`, as the training
  commands) and exits 130/143 with the command that continues; a run that diverges is a finished run
  whose `done` row says so, and the report's verdicts name it.
- The report (`nanoseek.ablate_report`) compares variants at equal FLOPs and at equal wall seconds
  separately, each seed paired with the same seed of the other variant.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.config import ModelConfig, resolve_config
from nanoseek.options import option, path
from nanoseek.train import TrainingDiverged, TrainingInterrupted

STUDIES: tuple[str, ...] = ("moe", "mla", "balance", "mtp", "fp8")
PLAN = "plan.json"
SEQ_LEN = 320
BATCH = 8
TOKENS_PER_STEP = SEQ_LEN * BATCH
EVALS_PER_RUN = 8  # evaluations per run besides the one at step 0


# ------------------------------------------------------------------ settings
@dataclass
class AblateConfig:
    """`nanoseek ablate STUDY`: one technique on and off, same data and schedule, several seeds."""

    study: str = option(
        positional=True,
        choices=(*STUDIES, "all"),
        help="moe | mla | balance | mtp | fp8, or all of them in turn",
    )
    budget: str | None = option(
        None,
        "per run: tokens (384k, 1M, 2e6) or seconds of training (90s, 5min, 1h); default: the study's own, "
        "sized so a study of 3 seeds fits in ~30 minutes on 2 CPU cores",
    )
    seeds: int = option(3, "seeds per variant (0, 1, ...)")
    out: str = option("runs", "run directory: writes RUN/ablate/<study>/", parse=path)
    preset: str = option("tiny", "model preset the study's variants start from", parse=path)
    val_batches: int = option(4, "held-out batches per evaluation (the same for every run)")
    acc_n: int = option(8, "mtp study: held-out problems per task family for greedy accuracy")
    max_new_tokens: int = option(320, "mtp study: longest greedy answer")
    tokenizer_docs: int = option(20000, "documents the shared tokenizer is trained on")
    threads: int | None = option(None, "torch CPU threads")
    progress: bool = option(True, "no progress bars (log lines only)")

    def validate(self) -> None:
        if self.study not in (*STUDIES, "all"):
            raise ValueError(unknown_study(self.study))
        if self.seeds < 1 or self.val_batches < 1 or self.tokenizer_docs < 1 or self.max_new_tokens < 1:
            raise ValueError("--seeds, --val-batches, --tokenizer-docs and --max-new-tokens must be >= 1")
        if self.acc_n < 0:
            raise ValueError(f"--acc-n must be >= 0 (0: no greedy accuracy), got {self.acc_n}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.budget is not None:
            parse_budget(self.budget)


def unknown_study(name: str) -> str:
    return f"unknown study {name!r}: choose one of {', '.join(STUDIES)} or all"


@dataclass(frozen=True)
class Budget:
    """How long each run trains: `tokens` (a step count follows) or `seconds` of training time."""

    kind: str  # "tokens" | "seconds"
    value: float

    def steps(self) -> int | None:
        return max(1, math.ceil(self.value / TOKENS_PER_STEP)) if self.kind == "tokens" else None

    def __str__(self) -> str:
        if self.kind == "seconds":
            return f"{self.value:g}s per run"
        return f"{self.value / 1e3:g}k tokens per run ({self.steps()} steps of {TOKENS_PER_STEP})"


_SECONDS = {
    "seconds": 1,
    "second": 1,
    "secs": 1,
    "sec": 1,
    "s": 1,
    "minutes": 60,
    "minute": 60,
    "mins": 60,
    "min": 60,
    "hours": 3600,
    "hour": 3600,
    "h": 3600,
}
_TOKENS = ("tokens", "token", "tok")
# Every form parse_budget reads, for the error that refuses another: a time is a budget too, so an
# error naming only the token counts would send the user away from one that would have worked.
BUDGET_FORMS = (
    "tokens (a positive number with an optional K/M/B/T suffix or 'tokens': 384k, 1M tokens, 2e6) or "
    "seconds of training (a positive number with s, min or h: 90s, 5min, 1h)"
)


def parse_budget(text: str | Budget) -> Budget:
    """'384k', '1M tokens', '2e6' -> tokens; '90s', '5min', '1h' -> seconds of training per run."""
    from nanoseek.accounting import parse_count

    if isinstance(text, Budget):
        return text
    raw = str(text).strip()
    number, scale = raw, None
    for unit in sorted([*_SECONDS, *_TOKENS], key=len, reverse=True):
        if raw.lower().endswith(unit):
            number, scale = raw[: -len(unit)].strip(), _SECONDS.get(unit)
            break
    try:
        value = parse_count(number, "--budget")
    except ValueError:
        raise ValueError(f"cannot parse --budget {text!r}: give {BUDGET_FORMS}") from None
    # a count's K/M suffix on a time ("1ks"); "100 steps" or "2 hrs" got the message above
    if scale is not None and number[-1:].isalpha():
        raise ValueError(f"--budget {text!r}: a time takes no K/M suffix (write 90s or 5min)")
    return Budget("tokens", value) if scale is None else Budget("seconds", value * scale)


@dataclass(frozen=True)
class TrainSettings:
    """What a run's training does besides the model; the `cpu` speedrun preset's pretraining."""

    lr: float = 3e-3
    optimizer: str = "muon"  # Muon on the hidden matrices, AdamW on the rest (train/muon.py)
    warmup_steps: int = 20
    weight_decay: float = 0.1
    batch_size: int = BATCH
    seq_len: int = SEQ_LEN
    mtp_weight: float = 0.3  # λ (V3 §2.2)
    bias_update_speed: float = 0.01  # γ of aux-loss-free balancing (V3 §2.1.2)
    balance_alpha: float = 0.0  # α of the sequence-wise balance loss (V3 eq. 17-20)
    precision: str = "auto"


# ------------------------------------------------------------------ studies
@dataclass(frozen=True)
class Variant:
    name: str
    about: str
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed from the base
    train: dict[str, Any] = field(default_factory=dict)  # TrainSettings fields changed from the base


@dataclass(frozen=True)
class Claim:
    """One claim of a paper, as a comparison of variant `a` with variant `b` on `metric`.

    kind: "lower" / "higher" (a below / above b), "match" (|a-b|/b <= tol), "not_worse"
    ((a-b)/b <= tol), "value" (a's value at least lo: the paper's range is [lo, hi], and a value above
    it supports the claim as well), "fixed" (a lower than b, exact: no seeds).
    at: "curve" (val loss interpolated at equal FLOPs and at equal seconds) or "final" (last evaluation).
    """

    text: str
    source: str
    size: str  # the paper's direction and size, in words
    a: str
    b: str | None
    metric: str = "val_loss"
    kind: str = "lower"
    tol: float = 0.0
    at: str = "curve"
    lo: float | None = None
    hi: float | None = None
    # "flops": training FLOPs (what the run paid); "main_flops": the main model's only, the MTP module's
    # left out (V3 compares MTP at equal main-model compute)
    flops_axis: str = "flops"


@dataclass(frozen=True)
class Study:
    name: str
    about: str
    base_model: dict[str, Any]  # changes from the preset every variant shares
    base_train: dict[str, Any]
    variants: tuple[Variant, ...]
    claims: tuple[Claim, ...]
    fields: frozenset[str]  # the settings this study's technique owns: the only ones variants change
    default_budget: Budget


# MLP layout: what the MoE study's variants may change.
MLP_FIELDS = frozenset(
    {
        "n_routed_experts",
        "n_shared_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
        "intermediate_size",
        "moe_intermediate_size",
    }
)
# Attention: MLA's fields, GQA's (a `llama` layout selects grouped-query attention), RoPE's layout.
ATTENTION_FIELDS = frozenset(
    {
        "model_type",
        "num_key_value_heads",
        "head_dim",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "rope_interleave",
        # GQA configs carry no experts (ModelConfig: a dense family); the MLA base is dense already,
        # so these only change from None to None
        "n_routed_experts",
        "n_shared_experts",
        "num_experts_per_tok",
    }
)
NO_MTP = {"num_nextn_predict_layers": 0}


def _dense(width: int) -> dict[str, Any]:
    """A dense SwiGLU MLP of `width` in every layer (None, as ModelConfig makes a dense family's)."""
    return {
        "n_routed_experts": None,
        "n_shared_experts": None,
        "num_experts_per_tok": None,
        "intermediate_size": width,
    }


def _active_width(c: ModelConfig) -> int:
    return ((c.n_shared_experts or 0) + (c.num_experts_per_tok or 0)) * c.moe_intermediate_size


def _need_moe(c: ModelConfig, study: str, preset: str) -> None:
    if not c.is_moe or c.attention_variant != "mla":
        raise ValueError(f"the {study} study needs a DeepSeek MoE preset; {preset!r} has no routed experts")


def _moe_study(c: ModelConfig, preset: str) -> Study:
    _need_moe(c, "moe", preset)
    e, k, s, w = (
        c.n_routed_experts or 0,
        c.num_experts_per_tok or 0,
        c.n_shared_experts or 0,
        c.moe_intermediate_size,
    )
    h, layers = c.hidden_size, c.num_hidden_layers
    active = _active_width(c)
    # the dense first layers at the MoE layers' active width, so "equal active" holds layer by layer
    base = c.replace(**NO_MTP, intermediate_size=active)
    moe_layers = sum(base.is_moe_layer(i) for i in range(layers))
    mlp_total = (layers - moe_layers) * 3 * h * active + moe_layers * (3 * h * w * (e + s) + e * h)
    total_width = 8 * round(mlp_total / (3 * h * layers) / 8)  # every layer dense, same total parameters
    if s < 1:
        raise ValueError(f"the moe study compares with and without the shared expert; {preset!r} has none")
    no_shared = {"n_shared_experts": 0, "num_experts_per_tok": k + s}
    if base.topk_group * (e // base.n_group) < k + s:
        no_shared["topk_group"] = base.n_group
    variants = (
        Variant("moe", f"DeepSeekMoE: {e} routed experts of {w} (top-{k}) + {s} shared"),
        Variant("dense-active", f"dense SwiGLU {active} wide: the MoE's active parameters", _dense(active)),
        Variant(
            "dense-total", f"dense SwiGLU {total_width} wide: the MoE's total parameters", _dense(total_width)
        ),
        Variant(
            "moe-finer",
            f"every expert cut in two: {2 * e} of {w // 2} (top-{2 * k}) + {2 * s} shared of {w // 2}",
            {
                "n_routed_experts": 2 * e,
                "moe_intermediate_size": w // 2,
                "num_experts_per_tok": 2 * k,
                "n_shared_experts": 2 * s,
            },
        ),
        Variant("no-shared", f"no shared expert; top-{k + s} routed instead (same active)", no_shared),
    )
    claims = (
        Claim(
            "MoE beats dense at equal active parameters",
            "DeepSeekMoE §4; V2 §2.2",
            "lower loss for MoE, by a wide margin (DeepSeekMoE 2B vs dense and GShard of its active size)",
            "moe",
            "dense-active",
        ),
        Claim(
            "MoE approaches dense at equal total parameters (its upper bound)",
            "DeepSeekMoE §4.2",
            "MoE loss close to the dense model of its total size; here 'close' = within 2%",
            "moe",
            "dense-total",
            kind="not_worse",
            tol=0.02,
        ),
        Claim(
            "finer experts beat coarser ones at equal active and total parameters",
            "DeepSeekMoE §3.1, §4.4 (expert segmentation)",
            "lower loss as experts are cut finer",
            "moe-finer",
            "moe",
        ),
        Claim(
            "the shared expert helps (one more routed expert instead is worse)",
            "DeepSeekMoE §4.5",
            "lower loss with the shared expert (DeepSeekMoE §4.5: Pile loss 1.808 with it, 2.414 with it disabled)",
            "moe",
            "no-shared",
        ),
    )
    return Study(
        "moe",
        "DeepSeekMoE: MoE vs dense (equal active, equal total), finer experts, shared expert",
        {**NO_MTP, "intermediate_size": active},
        {"mtp_weight": 0.0},
        variants,
        claims,
        MLP_FIELDS,
        Budget("tokens", 100 * TOKENS_PER_STEP),
    )


def _gqa_head_dim(c: ModelConfig, kv_heads: int) -> int:
    """The even head_dim at which GQA's q/k/v/o weights match the MLA layer's (per layer)."""
    from nanoseek.accounting import _attention_params

    mla = _attention_params(c)[0]
    d = mla / (c.hidden_size * 2 * (c.num_attention_heads + kv_heads))
    return max(2, 2 * round(d / 2))


def _mla_study(c: ModelConfig, preset: str) -> Study:
    if c.attention_variant != "mla":
        raise ValueError(f"the mla study starts from a DeepSeek (MLA) preset; {preset!r} is {c.model_type}")
    heads = c.num_attention_heads
    width = _active_width(c) if c.is_moe else c.intermediate_size
    base_model = {**NO_MTP, **_dense(width)}  # GQA models are dense: so is every variant here
    base = c.replace(**base_model)
    # GQA needs a K/V head count strictly between MQA's one and MHA's all: under 4 query heads the gqa
    # variant trained the mqa (or mha) model again and its claim compared a model with itself
    if heads < 4:
        raise ValueError(
            f"the mla study compares MHA, GQA and MQA: it needs at least 4 attention heads; {preset!r} has {heads}"
        )
    gqa_kv = max(2, heads // 4)

    def gqa(kv: int) -> dict[str, Any]:
        return {"model_type": "llama", "num_key_value_heads": kv, "head_dim": _gqa_head_dim(base, kv)}

    variants = (
        Variant("mla", f"MLA: latent {c.kv_lora_rank} + RoPE key {c.qk_rope_head_dim}, {heads} heads"),
        Variant("mha", f"MHA: {heads} K/V heads, head_dim matched to MLA's parameters", gqa(heads)),
        Variant("gqa", f"GQA: {gqa_kv} K/V heads for {heads} query heads, parameters matched", gqa(gqa_kv)),
        Variant("mqa", "MQA: one K/V head, parameters matched", gqa(1)),
    )
    claims = (
        Claim(
            "MLA matches or beats MHA",
            "V2 §2.1, appendix D.2",
            "MLA better than MHA on most benchmarks (small and large MoE); here: loss within 1% or lower",
            "mla",
            "mha",
            kind="not_worse",
            tol=0.01,
        ),
        Claim(
            "MLA caches a fraction of MHA's KV bytes per token",
            "V2 §2.1.2, Table 1",
            "(d_c + d_h^R)·l = 4.5·d_h·l elements vs 2·n_h·d_h·l for MHA",
            "mla",
            "mha",
            metric="kv_cache_bytes_per_token",
            kind="fixed",
            at="final",
        ),
        Claim(
            "MHA beats GQA",
            "V2 appendix D.1",
            "MHA better than GQA on hard benchmarks (7B dense)",
            "mha",
            "gqa",
        ),
        Claim(
            "MHA beats MQA",
            "V2 appendix D.1",
            "MHA better than MQA on hard benchmarks (7B dense)",
            "mha",
            "mqa",
        ),
    )
    return Study(
        "mla",
        "attention: MLA vs MHA vs GQA vs MQA at matched parameters (dense MLP in every variant)",
        base_model,
        {"mtp_weight": 0.0},
        variants,
        claims,
        ATTENTION_FIELDS,
        Budget("tokens", 140 * TOKENS_PER_STEP),
    )


def _balance_study(c: ModelConfig, preset: str) -> Study:
    _need_moe(c, "balance", preset)
    # V2's routers (greedy, group_limited_greedy) never read the bias: loss-free and none would train
    # the same model and the study would report on a technique it never ran
    if c.topk_method != "noaux_tc":
        raise ValueError(
            f"the balance study needs V3's aux-loss-free routing (topk_method noaux_tc); {preset!r} routes "
            f"with {c.topk_method}, which never reads the balancing bias"
        )
    alpha = 0.001
    variants = (
        Variant("loss-free", "aux-loss-free: per-expert bias moved by γ = 0.01 after each step, α = 0"),
        Variant(
            "aux-loss",
            f"sequence-wise auxiliary loss α = {alpha:g}, no bias",
            train={"bias_update_speed": 0.0, "balance_alpha": alpha},
        ),
        Variant("none", "no balancing at all", train={"bias_update_speed": 0.0}),
    )
    claims = (
        Claim(
            "aux-loss-free balancing gives a better model than an auxiliary loss",
            "V3 §2.1.2, §4.5.2 (Table 5); Wang et al. 2024",
            "lower loss / better on most benchmarks",
            "loss-free",
            "aux-loss",
        ),
        Claim(
            "aux-loss-free balancing balances at least as well as the auxiliary loss",
            "Wang et al. 2024 (MaxVio)",
            "lower max violation (max load / mean load − 1)",
            "loss-free",
            "aux-loss",
            metric="max_violation",
            at="final",
        ),
        Claim(
            "the bias balances the experts (vs no balancing)",
            "V3 §2.1.2",
            "lower max violation than with no balancing",
            "loss-free",
            "none",
            metric="max_violation",
            at="final",
        ),
    )
    return Study(
        "balance",
        "load balancing: aux-loss-free bias vs sequence-wise auxiliary loss vs none",
        dict(NO_MTP),
        {"mtp_weight": 0.0},
        variants,
        claims,
        frozenset({"bias_update_speed", "balance_alpha"}),
        Budget("tokens", 180 * TOKENS_PER_STEP),
    )


def _mtp_study(c: ModelConfig, preset: str) -> Study:
    if c.attention_variant != "mla":
        raise ValueError(f"the mtp study needs a DeepSeek preset with an MTP module; {preset!r} has none")
    variants = (
        Variant("mtp", "one MTP module (D = 1), λ = 0.3", {"num_nextn_predict_layers": 1}),
        Variant("no-mtp", "next-token loss only", dict(NO_MTP), {"mtp_weight": 0.0}),
    )
    claims = (
        Claim(
            "MTP improves the main model at equal main-model compute",
            "V3 §2.2, §4.5.1 (Table 4)",
            "better on most benchmarks; the MTP module is dropped at inference (per FLOP here: the main "
            "model's FLOPs; the module's own training cost shows per wall second)",
            "mtp",
            "no-mtp",
            flops_axis="main_flops",
        ),
        Claim(
            "MTP improves held-out task accuracy",
            "V3 §4.5.1 (Table 4)",
            "higher accuracy (greedy, held-out problems)",
            "mtp",
            "no-mtp",
            metric="accuracy",
            kind="higher",
            at="final",
        ),
        Claim(
            "the MTP module is a good draft for speculative decoding",
            "V3 §5.4.3",
            "85-90% of second-token drafts accepted",
            "mtp",
            None,
            metric="acceptance_rate",
            kind="value",
            at="final",
            lo=0.85,
            hi=0.90,
        ),
    )
    return Study(
        "mtp",
        "multi-token prediction on/off at equal main-model compute",
        {"num_nextn_predict_layers": 1},
        {"mtp_weight": 0.3},
        variants,
        claims,
        frozenset({"num_nextn_predict_layers", "mtp_weight"}),
        Budget("tokens", 160 * TOKENS_PER_STEP),
    )


def _fp8_study(c: ModelConfig, preset: str) -> Study:
    variants = (
        Variant("bf16", "BF16 autocast, FP32 master weights"),
        Variant("fp8", "fine-grained FP8 GEMMs (1x128 / 128x128 tiles, E4M3)", train={"precision": "fp8"}),
        Variant("fp32", "FP32 throughout", train={"precision": "fp32"}),
    )
    claims = (
        Claim(
            "fine-grained FP8 training loses almost nothing against BF16",
            "V3 §3.3, appendix B.1",
            "relative loss difference below 0.25%",
            "fp8",
            "bf16",
            kind="match",
            tol=0.0025,
        ),
        Claim(
            "BF16 mixed precision matches FP32 (the reference FP8 is held to)",
            "reference, not a V3 claim",
            "relative loss difference below 0.25%",
            "bf16",
            "fp32",
            kind="match",
            tol=0.0025,
        ),
    )
    return Study(
        "fp8",
        "precision: fine-grained FP8 vs BF16 vs FP32",
        dict(NO_MTP),
        {"mtp_weight": 0.0, "precision": "bf16"},
        variants,
        claims,
        frozenset({"precision"}),
        Budget("tokens", 75 * TOKENS_PER_STEP),
    )


_BUILDERS: dict[str, Callable[[ModelConfig, str], Study]] = {
    "moe": _moe_study,
    "mla": _mla_study,
    "balance": _balance_study,
    "mtp": _mtp_study,
    "fp8": _fp8_study,
}


def get_study(name: str, preset: str = "tiny") -> Study:
    if name not in _BUILDERS:
        raise ValueError(unknown_study(name))
    return _BUILDERS[name](resolve_config(preset), preset)


# ------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Run:
    study: str
    variant: str
    seed: int
    config: ModelConfig
    train: TrainSettings
    budget: Budget

    @property
    def key(self) -> tuple[str, int]:
        return (self.variant, self.seed)

    def settings(self) -> dict[str, Any]:
        """Everything that decides the run except its seed: model config and training settings."""
        model = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "extra"}
        return {**model, **self.config.extra, **dataclasses.asdict(self.train)}

    def flops_per_token(self, main_only: bool = False) -> float:
        """Training FLOPs per token; the MTP module's count where it trains, unless `main_only`."""
        from nanoseek.accounting import flops_per_token

        mtp = bool(self.config.num_nextn_predict_layers) and self.train.mtp_weight > 0 and not main_only
        return flops_per_token(self.config, self.train.seq_len, training=True, include_mtp=mtp)


def plan(study: str, budget: str | Budget | None = None, seeds: int = 3, preset: str = "tiny") -> list[Run]:
    """Every run of `study`: each variant x seeds 0..seeds-1, with its full config and settings."""
    s = get_study(study, preset)
    b = parse_budget(budget) if budget is not None else s.default_budget
    preset_config = resolve_config(preset)
    base = preset_config.replace(
        vocab_size=1024, max_position_embeddings=max(preset_config.max_position_embeddings, SEQ_LEN)
    )
    runs = []
    for v in s.variants:
        config = base.replace(**{**s.base_model, **v.model})
        train = TrainSettings(**{**s.base_train, **v.train})
        runs += [Run(s.name, v.name, seed, config, train, b) for seed in range(seeds)]
    return runs


def settings_diff(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def plan_record(study: Study, runs: list[Run], preset: str) -> dict[str, Any]:
    """What RUN/ablate/<study>/plan.json holds: enough to refuse a resume with other settings and for
    the report to draw its table without importing the study definitions."""
    from nanoseek.accounting import analytic_parameters, kv_cache_bytes_per_token

    variants = {}
    for r in runs:
        if r.variant in variants:
            continue
        counts = analytic_parameters(r.config)
        about = next(v.about for v in study.variants if v.name == r.variant)
        variants[r.variant] = {
            "about": about,
            "settings": r.settings(),
            "total_params": counts.total,
            "active_params": counts.active,
            "flops_per_token": r.flops_per_token(),
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(r.config),
        }
    return {
        "study": study.name,
        "about": study.about,
        "preset": preset,
        "budget": {**dataclasses.asdict(runs[0].budget), "steps": runs[0].budget.steps()},
        "variants": variants,
        "claims": [dataclasses.asdict(c) for c in study.claims],
    }


# ------------------------------------------------------------------ running
def study_dir(out: str | Path, study: str) -> Path:
    return Path(out) / "ablate" / study


def finished_runs(directory: Path) -> set[tuple[str, int]]:
    from nanoseek.metrics import read_metrics

    return {(r["variant"], r["seed"]) for r in read_metrics(directory) if r.get("event") == "done"}


def drop_unfinished(directory: Path) -> int:
    """Remove the rows of runs that never wrote their `done` row (an interrupted run starts over)."""
    from nanoseek.atomic import atomic_write
    from nanoseek.metrics import read_metrics

    path = directory / "metrics.jsonl"
    if not path.exists():
        return 0
    done = finished_runs(directory)
    rows = list(read_metrics(path))
    keep = [r for r in rows if (r.get("variant"), r.get("seed")) in done]
    text = path.read_text(encoding="utf-8")
    # a torn last line (killed mid-write) must go too, or the next row would be appended onto it
    if len(keep) < len(rows) or text.count("\n") != len(rows) or not text.endswith("\n"):
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
    return len(rows) - len(keep)


def _check_plan(directory: Path, record: dict[str, Any]) -> None:
    path = directory / PLAN
    if not path.exists():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    # JSON round trip: tuples become lists
    new = json.loads(json.dumps(record))
    for key in ("preset", "budget", "variants", "evaluation", "device", "precision"):
        if key in ("evaluation", "device", "precision") and key not in old:
            continue  # a plan.json written before these were recorded
        if old.get(key) != new.get(key):
            raise ValueError(
                f"{directory} holds runs of this study with other settings ({key} differs); resuming would "
                "mix two plans in one report: use another --out, or delete it to start over"
            )


def _tokenizer(out: Path, docs: int) -> Any:
    """One tokenizer for every study in RUN/ablate/tokenizer: the cpu preset's (vocabulary 1024)."""
    from itertools import islice

    from nanoseek.data.corpus import tokenizer_documents
    from nanoseek.speedrun import FAMILIES
    from nanoseek.tokenizer import load_tokenizer, train_tokenizer

    tok_dir = out / "ablate" / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").exists():  # written last by Tokenizer.save
        texts = list(islice(tokenizer_documents("embedded:" + ",".join(FAMILIES)), docs))
        train_tokenizer(texts, vocab_size=1024).save(tok_dir)
    return load_tokenizer(tok_dir)


def data_source() -> str:
    from nanoseek.speedrun import FAMILIES

    return "embedded:" + ",".join(FAMILIES)


def fp8_training_supported() -> str | None:
    """None when FP8 training runs here, else why not (one FP8 linear, forward and backward)."""
    try:
        import torch

        from nanoseek.model.fp8 import convert_to_fp8_training

        lin = torch.nn.Linear(128, 128, bias=False)
        convert_to_fp8_training(lin)
        lin(torch.randn(4, 128, requires_grad=True)).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means: not here
        return f"{type(e).__name__}: {e}"
    return None


def train_run(
    run: Run,
    tok: Any,
    val_set: list,
    log: Any,
    *,
    acc_n: int = 0,
    max_new_tokens: int = 320,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Pretrain one run and log its evaluations (step 0, EVALS_PER_RUN more, the last); returns the
    `done` row. The training loop is nanoseek's own `Trainer`; only the evaluation cadence is here."""
    import tempfile

    import torch

    from nanoseek.accounting import analytic_parameters, kv_cache_bytes_per_token
    from nanoseek.checkpoint import build_model
    from nanoseek.data.corpus import PackedDataset, window_tokens
    from nanoseek.perf import default_device
    from nanoseek.train.distributed import DistInfo
    from nanoseek.train.loop import OptimConfig, Trainer, language_model_loss
    from nanoseek.train.pretrain import resolve_precision
    from nanoseek.train.study import sized_to, train_evaluating

    t = run.train
    config = sized_to(run.config, tok)
    run = dataclasses.replace(run, config=config)
    device = default_device()  # the same command on a GPU
    precision = resolve_precision(t.precision, device)
    fpt, main_fpt = run.flops_per_token(), run.flops_per_token(main_only=True)
    torch.manual_seed(run.seed)
    model = build_model(config, device=device).init_weights(run.seed)
    model.set_balance_alpha(t.balance_alpha)
    steps = run.budget.steps()
    seconds = run.budget.value if run.budget.kind == "seconds" else None
    ident = {"study": run.study, "variant": run.variant, "seed": run.seed}
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(
            model,
            scratch,
            "ablate",
            OptimConfig(
                lr=t.lr,
                weight_decay=t.weight_decay,
                warmup_steps=min(t.warmup_steps, (steps or 40) // 2),
                optimizer=t.optimizer,
            ),
            total_steps=steps or 10**6,  # a seconds budget refits the schedule to its deadline
            precision=precision,
            bias_update_speed=t.bias_update_speed,
            dist=DistInfo(device=device),
        )
        batches = iter(
            PackedDataset(
                data_source(),
                tok,
                t.seq_len,
                t.batch_size,
                split="train",
                seed=run.seed,
                whole_documents=True,
                mask_prompts=True,
            )
        )

        def loss_fn() -> Any:
            x, y = (b.to(device) for b in next(batches))
            return language_model_loss(
                trainer.model,
                x,
                y,
                mtp_weight=t.mtp_weight,
                document_mask=True,
                token_mask=window_tokens(x, tok.pad_token_id),  # whole documents: padding balances nothing
            )

        violations: dict[str, list[float]] = {}
        train_losses: list[float] = []
        rows: list[dict[str, Any]] = []

        def evaluate(train_s: float, final: bool = False) -> None:
            it = iter(val_set)

            def val_loss() -> Any:
                x, y = (b.to(device) for b in next(it))
                return language_model_loss(trainer.model, x, y, document_mask=True)

            val = trainer.validate(val_loss, len(val_set))
            row: dict[str, Any] = {
                **ident,
                "tokens": trainer.tokens_seen,
                "flops": trainer.tokens_seen * fpt,
                "main_flops": trainer.tokens_seen * main_fpt,
                "train_s": round(train_s, 3),
                "val_loss": val,
            }
            if train_losses:
                row["train_loss"] = sum(train_losses) / len(train_losses)
            if violations:
                # MaxVio (Wang et al. 2024): max load / mean load − 1, per layer, mean over the steps since
                # the last evaluation
                per_layer = {k: sum(v) / len(v) - 1.0 for k, v in violations.items()}
                row["max_violation_per_layer"] = per_layer
                row["max_violation"] = max(per_layer.values())
            if final and acc_n:
                row.update(_accuracy(model, tok, trainer, acc_n, max_new_tokens))
            violations.clear()
            train_losses.clear()
            log.log(trainer.global_step, **row)
            if progress:
                progress(f"{run.variant} seed {run.seed} step {trainer.global_step}: val {val:.4f}")
            rows.append(row)

        def on_step(m: dict[str, Any]) -> None:
            train_losses.append(float(m.get("lm_loss", m["loss"])))
            for layer, ratio in (m.get("expert_imbalance") or {}).items():
                violations.setdefault(layer, []).append(ratio)

        # A signal stops the run at the next step boundary (Trainer.stop_on_signals, as the training
        # commands do) but saves nothing of it: a resumed run's seconds would mix two sessions' speeds
        # in the per-second comparison, so it starts over; the finished runs' rows are all a study keeps.
        with trainer.stop_on_signals(
            then="without saving it: the finished runs are kept, this one starts over"
        ):
            evaluate(0.0)
            diverged = None
            try:
                train_s = train_evaluating(
                    trainer,
                    loss_fn,
                    evaluate,
                    every=None if seconds is not None else max(1, (steps or 0) // EVALS_PER_RUN),
                    seconds=seconds,
                    evaluations=EVALS_PER_RUN,
                    on_step=on_step,
                )
            except TrainingDiverged as e:
                # The same seed diverges again on a rerun: recorded as finished, with why, so the study goes
                # on and its report says so (the error's advice names a scratch checkpoint and an --lr
                # ablate has not)
                diverged = f"diverged at step {trainer.global_step}: {str(e).split(';')[0]}"
                train_s = rows[-1]["train_s"]
                (progress or print)(f"{run.variant} seed {run.seed} {diverged}")
            if trainer.stop_signal:
                raise trainer.interrupted(log.path.parent, kept="the run was not finished, so it starts over")
            counts = analytic_parameters(config)
            done = log.log(
                trainer.global_step,
                **ident,
                event="done",
                steps=trainer.global_step,
                tokens=trainer.tokens_seen,
                flops=trainer.tokens_seen * fpt,
                train_s=round(train_s, 3),
                val_loss=rows[-1]["val_loss"],
                precision=precision,
                flops_per_token=fpt,
                total_params=counts.total,
                active_params=counts.active,
                kv_cache_bytes_per_token=kv_cache_bytes_per_token(config),
                s_per_step=train_s / max(1, trainer.global_step),
                **({"diverged": diverged} if diverged else {}),
            )
            # one that came during the final evaluation (the mtp study's greedy decoding): this run is
            # finished and kept, the study stops before the next
            if trainer.stop_requested():
                raise trainer.interrupted(log.path.parent, kept="the run finished")
    return done


def _accuracy(model: Any, tok: Any, trainer: Any, n: int, max_new_tokens: int) -> dict[str, Any]:
    """Greedy accuracy on held-out problems; with an MTP module the engine drafts with it (V3 §5.4.3):
    greedy verification keeps the output equal to plain greedy decoding and counts accepted drafts."""
    from nanoseek.engine import Engine
    from nanoseek.probe import greedy_accuracy
    from nanoseek.speedrun import FAMILIES

    engine = Engine(model, max_batch_size=64, speculative=bool(model.config.num_nextn_predict_layers))
    with trainer.autocast():
        acc = greedy_accuracy(model, tok, FAMILIES, n, max_new_tokens=max_new_tokens, engine=engine)
    out: dict[str, Any] = {"accuracy": sum(acc.values()) / len(acc), "accuracy_per_task": acc}
    rate = engine.stats().get("spec_acceptance_rate")
    if rate is not None:
        out["acceptance_rate"] = rate
    return out


def _prepare(cfg: AblateConfig, study: str) -> tuple[Study, list[Run], Path, dict[str, Any]]:
    """One study's plan and the record plan.json holds, checked against the runs already in its directory
    (a resume with other settings is refused here, before any training)."""
    from nanoseek.perf import default_device
    from nanoseek.train.pretrain import resolve_precision

    s = get_study(study, cfg.preset)
    runs = plan(study, cfg.budget, cfg.seeds, cfg.preset)
    directory = study_dir(cfg.out, study)
    skipped_note = None
    if study == "fp8":
        why = fp8_training_supported()
        if why is not None:
            skipped_note = (
                f"FP8 training is GPU only here ({why}): ran BF16 vs FP32; the FP8 rows say 'not run'"
            )
            runs = [r for r in runs if r.train.precision != "fp8"]
    record = plan_record(s, runs, cfg.preset)
    # what every run is evaluated on: a resume with other held-out batches would mix two measures
    record["evaluation"] = {"val_batches": cfg.val_batches}
    if study == "mtp":
        record["evaluation"].update(acc_n=cfg.acc_n, max_new_tokens=cfg.max_new_tokens)
    # what this machine trains each variant in ("auto": bf16 where the CPU or GPU multiplies it natively,
    # else fp32): a resume on another machine would pair runs of two precisions in one report
    device = default_device()
    record["device"] = device.type
    record["precision"] = {r.variant: resolve_precision(r.train.precision, device) for r in runs}
    if skipped_note:
        record["note"] = skipped_note
    _check_plan(directory, record)
    return s, runs, directory, record


def run_study(cfg: AblateConfig, study: str) -> Path:
    """Run (or resume) one study into RUN/ablate/<study>/ and write its report; returns the report."""
    from nanoseek.ablate_report import build_study_report
    from nanoseek.atomic import atomic_write
    from nanoseek.metrics import MetricsLog, progress_bar
    from nanoseek.perf import torch_threads

    s, runs, directory, record = _prepare(cfg, study)
    if record.get("note"):
        print(f"ablate {study}: {record['note']}", flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / PLAN, json.dumps(record, indent=1) + "\n")
    dropped = drop_unfinished(directory)
    done = finished_runs(directory)
    todo = [r for r in runs if r.key not in done]
    print(
        f"ablate {study}: {len(runs)} runs ({len(s.variants)} variants x {cfg.seeds} seeds), {runs[0].budget}; "
        f"{len(runs) - len(todo)} already finished{f', {dropped} rows of an interrupted run dropped' if dropped else ''}",
        flush=True,
    )
    if todo:
        with torch_threads(cfg.threads):  # the caller's count back after: a notebook's session goes on
            tok = _tokenizer(Path(cfg.out), cfg.tokenizer_docs)
            val_set = validation_batches(tok, cfg.val_batches)
            log = MetricsLog(directory, "ablate")
            # out of every run, from the finished ones: a resumed study's bar read 0/1 under "8 runs, 7
            # already finished"
            bar = progress_bar(
                todo,
                desc=f"ablate {study}",
                unit="run",
                total=len(runs),
                initial=len(runs) - len(todo),
                disable=not cfg.progress,
            )
            try:
                for r in bar:
                    bar.set_postfix_str(f"{r.variant} seed {r.seed}")
                    train_run(
                        r,
                        tok,
                        val_set,
                        log,
                        acc_n=cfg.acc_n if study == "mtp" else 0,
                        max_new_tokens=cfg.max_new_tokens,
                        progress=bar.write if cfg.progress else None,
                    )
            except TrainingInterrupted as e:
                bar.close()
                # the stopped run's rows go now: metrics.jsonl holds finished runs only, as a rerun reads it
                restarts = drop_unfinished(directory) > 0
                finished = len(finished_runs(directory) & {x.key for x in runs})
                kept = f"{finished} of {len(runs)} runs finished" + (
                    f", kept in {directory}" if finished else ""
                )
                raise TrainingInterrupted(
                    f"ablate {study} ({r.variant} seed {r.seed})",
                    e.signum,
                    e.step,
                    e.total_steps,
                    directory,
                    kept + ("; this run starts over" if restarts else ""),
                ) from None
            bar.close()
    return build_study_report(directory)


def validation_batches(tok: Any, n: int) -> list:
    """The held-out batches every run is evaluated on: the embedded corpus's test split, seed 0."""
    from itertools import islice

    from nanoseek.data.corpus import PackedDataset

    val = PackedDataset(
        data_source(),
        tok,
        SEQ_LEN,
        BATCH,
        split="val",
        repeat=False,
        seed=0,
        whole_documents=True,
        mask_prompts=True,
    )
    return list(islice(iter(val), n))


def ablate(cfg: AblateConfig) -> list[Path]:
    """`nanoseek ablate STUDY|all`: the reports written."""
    cfg.validate()
    studies = STUDIES if cfg.study == "all" else (cfg.study,)
    # every study's plan before the first trains: `all` refused a later study's preset, or a resume with
    # other settings, only after every study before it had trained
    for study in studies:
        _prepare(cfg, study)
    t0 = time.perf_counter()
    reports = [run_study(cfg, s) for s in studies]
    from nanoseek.ablate_report import build_index

    root = Path(cfg.out) / "ablate"
    if len(studies) > 1:
        reports.append(build_index(root, studies))
    elif (root / "report.md").exists():
        # one study rerun after `all` (more seeds): the index went on showing that study's old verdicts
        build_index(root, STUDIES)
    print(f"ablate: {', '.join(studies)} in {time.perf_counter() - t0:.0f}s -> {reports[-1]}", flush=True)
    return reports
