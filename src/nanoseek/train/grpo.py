"""GRPO, the RL algorithm of DeepSeekMath and DeepSeek-R1, plus the fixes later papers made to it.

What is notable here:
- Group-relative advantages (DeepSeekMath §4.1.2, R1 §2.2.1): G completions per prompt, advantage
  A_i = (r_i - mean(r)) / std(r) within the group; no value network.
  Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training") drops the std division
  (a difficulty bias: near-solved or near-hopeless groups get huge weights) and the per-sequence length
  normalization (a length bias: long wrong answers are penalized less per token).
- The PPO clipped ratio objective with a lower ε and a separate upper ε ("clip-higher", DAPO §3.1) so
  low-probability tokens with positive advantage can still grow.
- The KL penalty to a frozen reference with the unbiased, always-positive k3 estimator used by R1
  (DeepSeekMath eq. 4): KL ≈ π_ref/π_θ - log(π_ref/π_θ) - 1. β = 0 skips the reference entirely.
- Truncated completions (finish reason "length") can be masked out of the loss (DAPO §3.4 overlong
  filtering): the reward of a cut-off answer says little about its tokens.
- Rollouts go through the batched Engine (all P·G samples submitted at once) sharing the policy's
  nn.Module, so the engine always samples from the current weights.

`docs/r1.md` works through what each loss variant normalizes by and why the loss is ~0 at β = 0, μ = 1.
"""

from __future__ import annotations

import collections
import contextlib
import math
import random
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nanoseek.accounting import counted
from nanoseek.data.rewards import CUSTOM_HELP, REWARDS
from nanoseek.data.tasks import check_training_tasks, split_task_list
from nanoseek.engine.sampling import GREEDY_BELOW
from nanoseek.model.loss import target_logprobs
from nanoseek.options import check_choices, option, path, torch_seed
from nanoseek.perf import usable_cpus
from nanoseek.train import TrainingDiverged
from nanoseek.train.sft import PackedBatch, packed_batch_at, sft_loss

if TYPE_CHECKING:
    from nanoseek.train.loop import OptimConfig

LOSS_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo")
TASK_SAMPLING: tuple[str, ...] = ("uniform", "signal", "unsolved")


# ---------------------------------------------------------------------------------------------- math
def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages for rewards laid out prompt-major ([P*G] or [P, G]).

    A_i = r_i - mean_group(r), divided by (std_group(r) + eps) when `scale_by_std` (GRPO); Dr. GRPO
    keeps only the centering. The std is the sample std (unbiased), as in DeepSeekMath's code and TRL.
    A group whose members all got the same reward gets zero advantage: it carries no signal.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    flat = rewards.reshape(-1).float()
    if flat.numel() % group_size:
        raise ValueError(f"{flat.numel()} rewards do not split into groups of {group_size}")
    grouped = flat.view(-1, group_size)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (std + eps)
    # a uniform group is told by its rewards, not its std: float rounding leaves residues in its mean
    # and std that grow with the rewards' size (std ~1e-6 for eight rewards of 10.4, ±0.009 advantages
    # after the division); those must be exactly 0 (and never 0/0 = NaN with eps = 0)
    uniform = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    uniform |= ~grouped.isfinite().all(dim=1, keepdim=True)  # a NaN reward (a custom function's) carries none
    adv = torch.where(uniform, torch.zeros_like(adv), adv)
    return adv.reshape(rewards.shape)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ || π_ref) by Schulman's k3 estimator (DeepSeekMath eq. 4, used by R1):
    π_ref/π_θ - log(π_ref/π_θ) - 1, unbiased under samples from π_θ and never negative.

    The log-ratio is clamped to ±20 so one token where the two policies disagree wildly cannot
    overflow exp() into inf and poison the whole loss.
    """
    log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)
    # expm1(x) - x, not exp(x) - x - 1: for the small log-ratios of policies that barely moved, exp(x)
    # rounded to 1 ± ulp left a float32 KL of -6e-8 (a negative `kl` logged); expm1(x) rounds to >= x
    return torch.expm1(log_ratio) - log_ratio


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    completion_start: torch.Tensor | int,
    completion_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of completion tokens under `model`, and optionally the per-token entropy.

    `input_ids` [B, S] holds prompt + completion right-padded (causal attention, so real tokens never
    see the padding). Completion b starts at `completion_start[b]`; the result is aligned to the
    completion: [B, completion_len], entry t = log π(ids[b, start+t] | ids[b, :start+t]) (positions past
    the sequence's end are garbage and must be masked by the caller). The logits are divided by the
    sampling temperature so the ratio compares the same distributions the engine sampled from.
    `token_mask` [B, S]: the sequences' tokens, False at padding (the routers' balancing skips it).
    """
    b, s = input_ids.shape
    starts = torch.as_tensor(completion_start, device=input_ids.device).expand(b)
    if b and int(starts.min()) < 1:  # a completion's first token needs a position before it to predict it
        raise ValueError(
            f"completion_start must be >= 1 (a prompt of one token at least), got {int(starts.min())}"
        )
    # position p predicts token p+1, so the logit rows for completion token t are start-1+t
    offs = torch.arange(completion_len, device=input_ids.device)
    rows = (starts.unsqueeze(1) - 1 + offs).clamp(max=s - 2)  # [B, L]
    batch_idx = torch.arange(b, device=input_ids.device).unsqueeze(1)
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        # project only the completion positions: the prompt's logits are never needed. Duck-typed: a
        # DeepSeekV3, or a wrapper that forwards its methods (torch.compile's OptimizedModule)
        duck: Any = model
        hidden = duck.hidden_states(input_ids, token_mask=token_mask)
        sel = duck.lm_head(hidden[batch_idx, rows]).float()
    else:
        sel = model(input_ids)[batch_idx, rows].float()
    if temperature != 1.0:
        sel = sel / temperature
    logp, logp_all = target_logprobs(sel, input_ids.gather(1, rows + 1))
    entropy = None
    if with_entropy:
        with torch.no_grad():
            # a token of probability 0 (a logit of -inf) adds 0, not 0 · -inf = NaN to every position
            entropy = -(logp_all.exp() * logp_all.clamp_min(torch.finfo(logp_all.dtype).min)).sum(-1)
    return logp, entropy


@dataclass
class LossOutput:
    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    loss_type: str = "grpo",
    max_completion_len: int | None = None,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
) -> LossOutput:
    """The clipped surrogate loss (negated objective) for one batch of completions.

    logp, old_logp, ref_logp, mask: [B, L] (mask = 1 for completion tokens that count); advantages [B].
    old_logp None means "the policy that sampled is the current one" (μ = 1): the ratio is exp(logp -
    logp.detach()) = 1 with the right gradient, and no second forward pass is needed.

    Normalization (see docs/r1.md):
      grpo    — mean over each sequence's own tokens, then mean over sequences (DeepSeekMath eq. 3).
      dapo    — sum over all tokens of the batch / number of those tokens (token-level, DAPO §3.3).
      dr_grpo — sum over all tokens / (num_sequences · max_completion_len), a constant (Dr. GRPO).
    `num_sequences` / `num_tokens` let micro-batches share the full batch's denominators (so the
    micro-batch losses add up to the batch loss); they default to this batch's own counts.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (log-probs under the frozen reference model)")
    # Positions outside the mask (past a completion's end) hold garbage: a -inf there (a token the model
    # rules out) reached the masked sums as 0 · NaN, and made the whole batch's loss NaN (a skipped step)
    keep = mask > 0
    logp = torch.where(keep, logp, 0.0)
    old_logp = None if old_logp is None else torch.where(keep, old_logp, 0.0)
    ref_logp = None if ref_logp is None else torch.where(keep, ref_logp, 0.0)
    mask = mask.to(logp.dtype)
    if old_logp is None:
        old_logp = logp.detach()
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = None
    if beta > 0:
        kl = kl_k3(logp, ref_logp)  # type: ignore[arg-type]
        per_token = per_token + beta * kl

    n_tok = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        seq_len = mask.sum(1).clamp(min=1.0)
        has_tokens = (mask.sum(1) > 0).to(logp.dtype)
        per_seq = (per_token * mask).sum(1) / seq_len
        denom = has_tokens.sum().clamp(min=1.0) if num_sequences is None else float(num_sequences)
        loss = (per_seq * has_tokens).sum() / denom
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (n_tok if num_tokens is None else max(num_tokens, 1))
    else:  # dr_grpo
        if max_completion_len is None:
            raise ValueError("dr_grpo needs max_completion_len (the constant it normalizes by)")
        n_seq = num_sequences if num_sequences is not None else logp.shape[0]
        loss = (per_token * mask).sum() / (n_seq * max_completion_len)

    with torch.no_grad():
        # "clipped" = the min chose the clipped branch, i.e. the gradient through this token is zero
        is_low = (ratio < 1.0 - eps_low) & (adv < 0)
        is_high = (ratio > 1.0 + eps_high) & (adv > 0)
        stats = {
            "clip_frac": float(((is_low | is_high).to(mask.dtype) * mask).sum() / n_tok),
            "clip_frac_low": float((is_low.to(mask.dtype) * mask).sum() / n_tok),
            "clip_frac_high": float((is_high.to(mask.dtype) * mask).sum() / n_tok),
            "ratio_mean": float((ratio * mask).sum() / n_tok),
            "tokens": float(mask.sum()),
        }
        if kl is not None:
            stats["kl"] = float((kl * mask).sum() / n_tok)
    return LossOutput(loss=loss, stats=stats)


def collapse_warnings(
    entropy: float,
    mean_length: float,
    *,
    initial_entropy: float | None,
    initial_length: float | None,
    min_entropy: float = 0.05,
    min_entropy_ratio: float = 0.2,
    min_length_ratio: float = 0.2,
    max_entropy: float | None = None,
) -> list[str]:
    """What looks like policy collapse this step (empty list = healthy).

    RL on small models fails in a few recognizable ways: entropy falls to ~0 (one repeated token or one
    memorized answer), the thinking shrinks to nothing, or entropy explodes (the policy turns into noise).
    Entropy counts as collapsed when it is below `min_entropy` *and* below `min_entropy_ratio` of where
    the run started: a model cold-started on worked solutions writes most tokens with near certainty
    (the speedrun's starts at ~0.02 nats a token), which is a low entropy, not a falling one.
    No verdict on entropy before `initial_entropy` is known.
    """
    out: list[str] = []
    if not math.isfinite(entropy):
        out.append(f"entropy is {entropy}")
        return out
    if initial_entropy is not None and entropy < min(min_entropy, min_entropy_ratio * initial_entropy):
        out.append(
            f"entropy collapsed to {entropy:.3f} (< {min_entropy} and < {min_entropy_ratio:.0%} of the "
            f"first steps' {initial_entropy:.3f})"
        )
    if max_entropy is not None and entropy > max_entropy:
        out.append(f"entropy exploded to {entropy:.2f} (> {max_entropy:.2f})")
    if initial_length and mean_length < min_length_ratio * initial_length:
        out.append(
            f"response length collapsed to {mean_length:.1f} tokens "
            f"(< {min_length_ratio:.0%} of the initial {initial_length:.1f})"
        )
    return out


class EntropyTrend:
    """The collapse check's view of entropy: the mean of the last `window` steps (a step's entropy is
    over its mixed groups only where β = 0, every kept completion's otherwise, and swings ~10x with the families they came from) and, once known, the
    mean of the first `window` as the baseline. `state()` / `EntropyTrend(state)` carry it across a
    resume."""

    def __init__(self, state: dict[str, Any] | None = None, window: int = 5) -> None:
        state = state or {}
        self.recent: collections.deque[float] = collections.deque(state.get("recent", []), maxlen=window)
        self.initial: float | None = state.get("initial")

    def add(self, entropy: float) -> float:
        """Record a step's entropy (NaN: a step without an update, skipped); the current mean."""
        if math.isfinite(entropy):
            self.recent.append(entropy)
            if self.initial is None and len(self.recent) == self.recent.maxlen:
                self.initial = self.mean
        return self.mean

    @property
    def mean(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def state(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "initial": self.initial}


# -------------------------------------------------------------------------------------- driver
# What a --resume must find unchanged beside the optimizer's (the Trainer checks those): every setting
# that decides the prompts, the rollouts, the rewards or the objective. A longer --steps may change.
RESUME_SETTINGS = (
    "tasks",
    "reward",
    "group_size",
    "batch_prompts",
    "mu",
    "beta",
    "eps_low",
    "eps_high",
    "loss",
    "max_new_tokens",
    "temperature",
    "top_p",
    "mask_truncated",
    "language",
    "train_pool",
    "task_sampling",
    "probe_prompts",
    "solved_above",
    "keep_tasks",
    "sft_mix",
    "sft_mix_rows",
    "sft_mix_tasks",
    "seed",
    "precision",
    "warmup_steps",  # (the Trainer leaves it to the stages: theirs cut it to fit a short run)
)


@dataclass
class GRPOConfig:
    init: str = option(
        help="checkpoint directory to start from (with tokenizer files) or Hub name", parse=path
    )
    tasks: list[str] = option(
        help="task name(s), comma-separated (e.g. arithmetic,countdown)", flag="--task", parse=split_task_list
    )
    reward: str = option(
        "accuracy:1,format:0.2",
        f"weighted reward parts, NAME:WEIGHT,...: {', '.join(REWARDS)}, {CUSTOM_HELP} "
        "(mypkg.rewards:brevity:0.1; docs/r1.md)",
        listed=True,
    )
    out: str = option("runs/grpo", "run directory: writes RUN/grpo/ and RUN/metrics.jsonl", parse=path)
    group_size: int = option(8, "G: samples per prompt", short="-G")
    batch_prompts: int = option(8, "P: prompts per step", short="-P")
    steps: int = option(50, "GRPO steps")
    mu: int = option(1, "policy updates per batch of rollouts")
    beta: float = option(0.0, "KL coefficient; 0 skips the reference model")
    eps_low: float = option(0.2, "lower clip ε")
    eps_high: float = option(0.28, "upper clip ε, DAPO clip-higher")
    loss: str = option("grpo", "loss normalization (docs/r1.md)", choices=LOSS_TYPES)
    max_new_tokens: int = option(128, "completion length cap")
    temperature: float = option(1.0, "rollout temperature")
    top_p: float = option(1.0)
    lr: float = option(1e-5, "learning rate")
    weight_decay: float = option(0.0)
    warmup_steps: int = option(0, "optimizer updates of linear warmup (μ per step), at most half of them")
    grad_clip: float = option(1.0)
    bias_update_speed: float = option(
        0.0,
        "γ of aux-loss-free balancing during RL (0: the routing bias stays where pretraining left it, as V3 "
        "froze it for its last 500B tokens, §4.2; a few dozen RL steps move too few tokens to rebalance)",
    )
    micro_batch: int = option(16, "sequences per forward/backward")
    mask_truncated: bool = option(
        False, "leave truncated completions out of the loss (DAPO overlong filtering)"
    )
    language: str | None = option(None, "only prompts in this language (en, ja, zh)")
    train_pool: int = option(2048, "training problems drawn per task (apart from SFT's at the same --seed)")
    task_sampling: str = option(
        "uniform",
        "how each step's prompts are drawn: uniformly from all tasks' problems, or per task in proportion "
        "to how often its groups carried a learning signal lately (signal), or uniformly from the tasks "
        "a probe before the first step did not find solved (unsolved)",
        choices=TASK_SAMPLING,
    )
    probe_prompts: int = option(
        4, "--task-sampling unsolved: training problems per task in the probe (x G samples)"
    )
    solved_above: float = option(
        0.8, "--task-sampling unsolved: a task whose probe pass rate is above this is left out as solved"
    )
    keep_tasks: list[str] | None = option(
        None,
        "--task-sampling unsolved: tasks drawn however solved the probe finds them, comma-separated: a "
        "family whose own groups hold it against another's shortcut (comparison against `largest`'s)",
        parse=split_task_list,
    )
    sft_mix: float = option(
        0.0,
        "weight of a supervised loss on worked solutions added to every update (InstructGPT's PPO-ptx, "
        "§3.5): of the tasks --task-sampling unsolved left out, else of every task that has them; it "
        "holds on to what RL no longer draws from (0: off)",
    )
    sft_mix_rows: int = option(2, "--sft-mix: packed rows of worked solutions per update")
    sft_mix_tasks: list[str] | None = option(
        None,
        "--sft-mix: the tasks whose worked solutions it may use, comma-separated (default: every --task "
        "that has them); leave out a family GRPO must learn from its verifier alone",
        parse=split_task_list,
    )
    seed: int = option(0, parse=torch_seed)
    checkpoint_every: int = option(0, "GRPO steps between checkpoints (0 = only at the end)")
    resume: bool = option(False, "continue from RUN/grpo/ if it holds a checkpoint")
    precision: str = option(
        "auto",
        "auto: bf16 on a GPU that multiplies it natively, fp32 on a CPU (where the recipe was tuned)",
        choices=("auto", "fp32", "bf16"),
    )
    max_batch_size: int = option(64, "engine: sequences decoded together")
    stop_on_collapse: bool = option(False, "stop when entropy/length collapse persists")
    collapse_patience: int = option(3, "consecutive collapsed steps before --stop-on-collapse stops")
    min_entropy: float = option(
        0.05,
        "mean entropy of the last 5 steps below this and below 20%% of the first 5 steps' warns of collapse",
    )
    progress: bool = option(True)
    tensorboard: bool = option(False, "also write TensorBoard events to RUN/tensorboard/")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    reward_workers: int | None = option(
        None,
        "threads scoring a step's completions, so their sandboxed code runs overlap (default: the CPUs "
        "this process may use; 1: one after another). The rewards are the same whatever the number",
    )
    # as sft's and distill's: the Trainer's deadline, its step count refitted to the pace measured
    max_seconds: float | None = option(
        None,
        "wall-clock budget, loading included: a run planned for 5 steps or more is refitted to fill it at "
        "the measured pace (more or fewer steps than --steps); stops and saves after the step that spends "
        "it. --resume goes on with what its checkpoint had left of it",
    )

    def validate(self) -> None:
        check_choices(self)
        if self.group_size < 2:
            raise ValueError(
                f"--group-size must be >= 2 (advantages are relative to the group), got {self.group_size}"
            )
        for name in (
            "batch_prompts",
            "steps",
            "mu",
            "max_new_tokens",
            "micro_batch",
            "probe_prompts",
            "sft_mix_rows",
            "max_batch_size",  # said now, as serve says it, not by the engine after the weights load
            "train_pool",  # was "n must be >= 0" (negative) or "only 0 training problems" (0)
            "collapse_patience",  # 0: --stop-on-collapse stopped at the first step, collapsed or not
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.solved_above <= 1:
            raise ValueError(f"--solved-above is a pass rate in [0, 1], got {self.solved_above}")
        # written so that NaN fails too: a NaN --beta trained with no KL term and no reference model (its
        # `beta > 0` is false) without a word, an infinite one made the loss NaN (inf x a KL of 0)
        for name in ("bias_update_speed", "beta", "sft_mix"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 0 and finite, got {getattr(self, name)}"
                )
        if self.checkpoint_every < 0:  # -1 saved at every step
            raise ValueError(
                f"--checkpoint-every must be >= 0 (0 = only at the end), got {self.checkpoint_every}"
            )
        if self.max_seconds is not None and not 0 < self.max_seconds < math.inf:  # NaN fails too
            raise ValueError(
                f"--max-seconds must be a finite number > 0 (or left out for no budget), got {self.max_seconds}"
            )
        for name in ("reward_workers", "threads"):  # --threads 0 was ignored, -1 torch's traceback
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for flag, named in (("--sft-mix-tasks", self.sft_mix_tasks), ("--keep-tasks", self.keep_tasks)):
            unknown = set(named or ()) - set(self.tasks or ())
            if unknown:
                raise ValueError(f"{flag} names tasks not in --task: {', '.join(sorted(unknown))}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if not GREEDY_BELOW <= self.temperature < math.inf:  # below it the engine decodes greedily
            raise ValueError(
                f"--temperature must be >= {GREEDY_BELOW:g} and finite (got {self.temperature:g}): GRPO needs "
                "diverse samples within a group, and the engine decodes greedily below it"
            )
        if not self.tasks:
            raise ValueError("--task needs at least one task name")
        check_training_tasks(self.tasks)
        from nanoseek.data.rewards import parse_reward_spec

        # said now, not after the model loads (a Hub download): an unknown part, a custom one's import
        parse_reward_spec(self.reward)
        if self.tensorboard:  # its package said now, not once the policy has loaded
            from nanoseek.train.loop import require_tensorboard

            require_tensorboard()
        self.optim_config()  # --lr, --weight-decay, --grad-clip, --warmup-steps too

    def optim_config(self) -> OptimConfig:
        """The Trainer's optimizer settings (its checks refuse a bad --lr, --grad-clip, ...), over the
        run's optimizer updates (μ per step); the warmup at most half of them, as the other stages cut
        theirs: one longer than the run trained every update below --lr."""
        from nanoseek.train.loop import OptimConfig

        return OptimConfig(
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=(0.9, 0.99),
            warmup_steps=min(self.warmup_steps, self.steps * self.mu // 2),
            schedule="constant",
            grad_clip=self.grad_clip,
        )


@dataclass
class Rollout:
    """One batch of P·G sampled completions with everything the update needs."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    rewards: torch.Tensor  # [B]
    advantages: torch.Tensor  # [B]
    loss_mask_keep: torch.Tensor  # [B] bool: sequence counts in the loss
    metrics: dict[str, float]


def _micro_batches(
    ro: Rollout, size: int, pad_id: int, skip_zero_adv: bool, device: torch.device | None = None
) -> list[dict[str, torch.Tensor]]:
    """Pack sequences (prompt + completion, right-padded) into micro-batches, on `device` (the policy's).

    With β = 0 a zero-advantage sequence contributes exactly nothing to the gradient, so it is left out
    of the forward/backward (the denominators still count it, so the loss is unchanged).
    """
    idx = [
        i
        for i in range(len(ro.prompt_ids))
        if ro.loss_mask_keep[i] and ro.completion_ids[i] and not (skip_zero_adv and ro.advantages[i] == 0)
    ]
    # similar lengths together -> less padding
    idx.sort(key=lambda i: len(ro.prompt_ids[i]) + len(ro.completion_ids[i]))
    out = []
    for j in range(0, len(idx), size):
        chunk = idx[j : j + size]
        lmax = max(len(ro.completion_ids[i]) for i in chunk)
        smax = max(len(ro.prompt_ids[i]) + len(ro.completion_ids[i]) for i in chunk)
        ids = torch.full((len(chunk), smax), pad_id, dtype=torch.long)
        real = torch.zeros(len(chunk), smax, dtype=torch.bool)
        mask = torch.zeros(len(chunk), lmax)
        starts = torch.zeros(len(chunk), dtype=torch.long)
        for r, i in enumerate(chunk):
            p, c = ro.prompt_ids[i], ro.completion_ids[i]
            ids[r, : len(p) + len(c)] = torch.tensor(p + c)
            real[r, : len(p) + len(c)] = True
            mask[r, : len(c)] = 1.0
            starts[r] = len(p)
        out.append(
            {
                "ids": ids.to(device),
                "real": real.to(device),  # False at padding
                "starts": starts.to(device),
                "mask": mask.to(device),
                "adv": ro.advantages[chunk].to(device),
                "tokens": torch.tensor(
                    int(sum(len(ro.prompt_ids[i]) + len(ro.completion_ids[i]) for i in chunk))
                ),
            }
        )
    return out


class PromptSampler:
    """Draws each step's prompts from the tasks' training problems.

    "uniform": P distinct problems from the pooled problems of all tasks. "signal": each prompt's task
    is drawn in proportion to a floor plus the running share of that task's groups whose rewards were
    not all equal. A group of equal rewards has zero advantage and teaches nothing; DAPO's dynamic
    sampling (§3.2) discards such groups after generating them, but on a CPU generating them is the
    cost, so here a task that yields none (too hard, or already solved) is simply drawn less. The floor
    keeps every task in play, so one that starts yielding signal is noticed. "unsolved": uniformly, from
    the tasks that `probe_pass_rates` did not find solved (`leave_out`), decided once before the first step.
    """

    FLOOR = 0.1
    DECAY = 0.8  # per observed group

    def __init__(self, pools: dict[str, list], mode: str, state: dict[str, float] | None = None) -> None:
        self.pools = {name: problems for name, problems in pools.items() if problems}
        self.mode = mode
        self.signal = {name: 1.0 for name in self.pools} | (state or {})
        self._pooled = [item for problems in self.pools.values() for item in problems]

    def leave_out(self, names: set[str], keep_at_least: int) -> list[str]:
        """Draw no more prompts of these tasks, unless that would leave fewer than `keep_at_least`
        problems to draw from (then every task stays). Returns the tasks left out."""
        rest = {name: problems for name, problems in self.pools.items() if name not in names}
        if len(rest) == len(self.pools) or sum(map(len, rest.values())) < keep_at_least:
            return []
        left = sorted(set(self.pools) - set(rest))
        self.pools = rest
        self._pooled = [item for problems in rest.values() for item in problems]
        return left

    def draw(self, rng: random.Random, n: int) -> list:
        if self.mode != "signal":
            return [self._pooled[i] for i in rng.sample(range(len(self._pooled)), n)]
        names = list(self.pools)
        counts = dict.fromkeys(names, 0)
        for _ in range(n):
            # a task whose problems are all drawn already takes no more: the others fill the batch
            # (one choice at a time draws what one rng.choices(k=n) would while none runs out)
            open_ = [name for name in names if counts[name] < len(self.pools[name])]
            counts[rng.choices(open_, weights=[self.FLOOR + self.signal[name] for name in open_])[0]] += 1
        batch: list = []
        for name, k in counts.items():
            problems = self.pools[name]
            batch.extend(problems[i] for i in rng.sample(range(len(problems)), k))
        return batch

    def observe(self, task_names: list[str], advantages: torch.Tensor, group_size: int) -> None:
        """Update each task's signal share from this step's groups (prompt-major advantages)."""
        groups = advantages.view(-1, group_size)
        for name, adv in zip(task_names, groups, strict=True):
            informative = float(bool((adv != 0).any()))
            self.signal[name] = self.DECAY * self.signal[name] + (1 - self.DECAY) * informative


def grpo(cfg: GRPOConfig, on_step: Callable[[int, int], None] | None = None) -> Path:
    """Run GRPO from `cfg.init`; returns the checkpoint directory RUN/grpo/. `on_step(done, total)` is
    called after every step (the speedrun paces the control run beside it by it)."""
    import time

    from nanoseek.atomic import check_out
    from nanoseek.perf import torch_threads
    from nanoseek.train.loop import hold_stage

    started = time.perf_counter()  # --max-seconds covers loading too, as sft's covers its data building
    cfg.validate()
    check_out(cfg.out, resume=cfg.resume)  # said now, not once the policy and its reference have loaded
    with torch_threads(cfg.threads), hold_stage(cfg.out, "grpo"):
        return _grpo(cfg, on_step, started)


def _grpo(cfg: GRPOConfig, on_step: Callable[[int, int], None] | None, started: float) -> Path:
    import time

    from nanoseek.checkpoint import load_model, resolve_checkpoint
    from nanoseek.data.rewards import build_reward
    from nanoseek.data.tasks import get_task
    from nanoseek.engine import Engine
    from nanoseek.evaluate import chat_prompt_ids, check_prompts_fit, prompt_opens_think
    from nanoseek.metrics import progress_bar
    from nanoseek.perf import default_device
    from nanoseek.tokenizer import checkpoint_tokenizer
    from nanoseek.train.loop import StepLog, Trainer, warn_unused_bias_speed
    from nanoseek.train.pretrain import resolve_precision

    # the problems before the checkpoint: a bad line of a jsonl: task was named only once the model (and
    # a Hub --init's download) had loaded
    tasks = [get_task(name) for name in cfg.tasks]
    pools = draw_pools(cfg, tasks)
    n_problems = sum(len(v) for v in pools.values())
    if n_problems < cfg.batch_prompts:
        raise ValueError(f"only {n_problems} training problems for --batch-prompts {cfg.batch_prompts}")
    files = [f for t in tasks for f in getattr(t, "files", ())]  # (jsonl: tasks')
    init = resolve_checkpoint(cfg.init, flag="--init")
    if cfg.beta > 0 and Path(init).resolve() == (Path(cfg.out) / "grpo").resolve():
        # the run's saves overwrite it, and a --resume re-reads π_ref from it: a later policy, not the start
        raise ValueError(
            f"--init {cfg.init} is this run's own checkpoint directory (--out {cfg.out}), which its saves "
            "overwrite: with --beta > 0 the KL reference is read from --init, so a --resume would measure "
            "the KL to a later policy. Copy the starting checkpoint elsewhere, or choose another --out"
        )
    torch.manual_seed(cfg.seed)
    tok = checkpoint_tokenizer(init)  # one from another model: said before the weights load
    model = load_model(init, device=default_device())
    warn_unused_bias_speed(model.config, cfg)
    # R1's template opens the think block; another family's (ChatML, Llama 3) leaves it to the model
    opened = prompt_opens_think(tok)
    reward_fn = build_reward(cfg.reward, prompt_opened_think=opened)

    run = Path(cfg.out)
    total_updates = cfg.steps * cfg.mu
    precision = resolve_precision(cfg.precision, default_device(), bf16_on_cpu=False)
    trainer = Trainer(
        model,
        run,
        "grpo",
        cfg.optim_config(),
        total_steps=total_updates,
        precision=precision,
        tokenizer=tok,
        spike_factor=0.0,  # a policy-gradient loss is ~0 and changes sign: a loss-spike guard is meaningless
        bias_update_speed=cfg.bias_update_speed,
        deadline=started + cfg.max_seconds if cfg.max_seconds else None,
        config_extra={"grpo": {k: v for k, v in vars(cfg).items()}},
        resume_settings={
            **{name: getattr(cfg, name) for name in RESUME_SETTINGS},
            "precision": precision,  # as resolved: an auto run resumes one that named it, and the other way round
            # β > 0: the KL reference, re-read from --init on a resume; another --init (a later
            # checkpoint, to go on from the latest weights) would silently make π_ref a later policy
            "--init, the KL reference": str(Path(init).resolve()) if cfg.beta > 0 else None,
            # a jsonl: task's files and their sizes, as sft's --data: problems added or edited since made
            # other pools, and the resumed run drew other prompts than the run it went on, without a word
            **({"data_files": [f"{f} ({f.stat().st_size} bytes)" for f in files]} if files else {}),
        },
        flags_from=type(cfg),
    )
    # the RL objective alone: routing stays balanced by the bias (V3 §2.1.2), not a balance loss
    model.set_balance_alpha(0.0)
    policy = trainer.model
    start = 0
    history: dict = {}
    extra = None
    spent = 0.0  # seconds of --max-seconds spent before this process (`sft`'s `budget_state`)
    if cfg.resume:
        extra = trainer.resume(logged_step="grpo_step")  # records count GRPO steps, not updates
        if extra is not None:
            start = int(extra.get("grpo_step", trainer.global_step // cfg.mu))
            history = extra.get("history", {})
            spent = float(extra.get("seconds_spent", 0.0))
    if trainer.deadline is not None:
        trainer.deadline -= spent
    # a resumed run whose budget was spent (it stopped there): finished, its checkpoint stays as written
    budget_spent = cfg.max_seconds is not None and spent >= cfg.max_seconds  # (validated: > 0)

    def out_of_time() -> bool:
        return trainer.deadline is not None and time.perf_counter() >= trainer.deadline

    def planned(done: int) -> int:
        """The GRPO steps of the run, `done` of them done: --steps, or under --max-seconds the
        Trainer's step count refitted to its deadline (in optimizer updates: μ a step, none in a step
        whose groups carried no signal)."""
        if trainer.deadline is None:
            return cfg.steps
        return done + max(0, math.ceil((trainer.total_steps - trainer.global_step) / cfg.mu))

    ref_model = None
    if cfg.beta > 0:
        # the reference is the starting policy, frozen (re-read from --init, so resuming gets the same one)
        ref_model = load_model(init, device=model.device).eval().requires_grad_(False)
    # The engine shares the policy's nn.Module: every rollout samples from the current weights.
    engine = Engine(model, max_batch_size=cfg.max_batch_size)
    # a problem the context cannot hold ended the run at the step that drew it, hours in and unsaved, with
    # the engine's error naming no problem: every one in the pools is checked before the first step
    check_prompts_fit(
        ((p, chat_prompt_ids(tok, p.messages)) for pool in pools.values() for _, p in pool),
        engine.max_seq_len,
    )
    stop = list(tok.stop_token_ids)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # RUN/metrics.jsonl, and TensorBoard as pretrain and sft write it (the bar is the loop's own)
    metrics_log = StepLog(
        run, "grpo", cfg.steps, tensorboard=cfg.tensorboard, progress=False, resumed_from=start
    )
    if extra is None:  # a new run: the report reads it apart from any before it in RUN
        trainer.note_replacing()
        # the checkpoint the report reads GRPO's gain from, and the precision it trained in
        metrics_log.log(0, event="start", init=str(cfg.init), precision=trainer.precision)
        metrics_log.log_model(model.config)
    sampler = PromptSampler(pools, cfg.task_sampling, history.get("task_signal"))
    left_out: list[str] = []
    if cfg.task_sampling == "unsolved":
        fresh = "pass_rates" not in history  # measured once; a resumed run keeps the first decision
        if fresh:
            with trainer.autocast():
                history["pass_rates"] = probe_pass_rates(cfg, engine, tok, pools, stop)
        kept = sorted(set(cfg.keep_tasks or ()) & set(pools))
        solved = {n for n, r in history["pass_rates"].items() if r > cfg.solved_above and n not in kept}
        left_out = sampler.leave_out(solved, keep_at_least=cfg.batch_prompts)
        if fresh:
            metrics_log.log(
                None,
                event="probe",
                pass_rates=history["pass_rates"],
                left_out=left_out,
                kept=kept,
            )
            rates = ", ".join(f"{n} {r:.0%}" for n, r in history["pass_rates"].items())
            print(f"grpo probe ({cfg.probe_prompts} problems x G = {cfg.group_size} per task): {rates}")
            everything = (
                "" if len(left_out) == len(solved) else " (every task kept: too few problems would be left)"
            )
            drawn_anyway = f"; drawn however solved: {', '.join(kept)}" if kept else ""
            print(
                f"grpo: left out as solved (> {cfg.solved_above:.0%}): {', '.join(left_out) or 'none'}"
                f"{everything}{drawn_anyway}"
            )
    mix_rows = None
    if cfg.sft_mix > 0:
        mixed = set(left_out if cfg.task_sampling == "unsolved" else pools) & set(cfg.sft_mix_tasks or pools)
        names = sorted(t.name for t in tasks if t.name in mixed and hasattr(t, "worked_solution"))
        mix_rows = supervised_mix_rows(tok, names, cfg.seed)
        print(f"grpo: --sft-mix {cfg.sft_mix:g} on the worked solutions of: {', '.join(names) or 'no task'}")
    entropy_trend = EntropyTrend(history.get("entropy_trend"))
    init_length = history.get("init_length")
    bad_steps = int(history.get("bad_steps", 0))  # consecutive collapsed steps, across a resume too
    # the rollouts' prompt and completion tokens so far, logged as the trainers log theirs (a running
    # total, across a resume too): the report's GRPO row showed no tokens
    tokens = int(history.get("tokens", 0))
    budget = f" ({cfg.max_seconds:.0f}s budget)" if cfg.max_seconds else ""
    bar = progress_bar(
        total=planned(start),
        initial=start,
        desc=f"grpo{budget}",
        dynamic_ncols=True,
        disable=not cfg.progress,
    )
    t_run = time.perf_counter()
    last: dict = {}
    # the bar closed however the loop ends: one an interrupted notebook cell left open (its traceback
    # keeps it) pushed every later bar of the session down a line, which a notebook draws as a new line
    # per redraw
    step = start
    with trainer.stop_on_signals(), bar, contextlib.closing(metrics_log):
        while step < planned(step) and not budget_spent:
            # ------------------------------------------------------------------ rollouts
            rng = random.Random(cfg.seed * 1_000_003 + step)
            batch = sampler.draw(rng, cfg.batch_prompts)
            prompts = [chat_prompt_ids(tok, p.messages) for _, p in batch]
            flat_prompts = [ids for ids in prompts for _ in range(cfg.group_size)]
            # the weights changed since the last rollout: prefix-cache entries computed with old weights are stale
            engine.reset_prefix_cache()
            t0 = time.perf_counter()
            with trainer.autocast():  # the rollouts sample in the precision the policy trains in
                outs = _sample(
                    cfg, engine, flat_prompts, stop, rollout_seeds(cfg.seed, step, len(flat_prompts))
                )
            rollout_time = time.perf_counter() - t0
            ro = _score_rollout(cfg, batch, flat_prompts, outs, tok, reward_fn, stop, opened)
            sampler.observe([t.name for t, _ in batch], ro.advantages, cfg.group_size)
            ro.metrics["rollout_tok_s"] = sum(len(o.token_ids) for o in outs) / max(rollout_time, 1e-9)
            ro.metrics["rollout_time_s"] = rollout_time
            tokens += sum(len(p) for p in flat_prompts) + sum(len(o.token_ids) for o in outs)

            # ------------------------------------------------------------------- update
            n_seq, n_tok = loss_denominators(ro, cfg.loss)
            micro = _micro_batches(
                ro, cfg.micro_batch, pad_id, skip_zero_adv=cfg.beta == 0, device=model.device
            )
            t1 = time.perf_counter()
            upd: dict[str, float] = {}
            if micro:
                with torch.no_grad(), trainer.autocast():
                    for mb in micro:
                        if cfg.mu > 1:  # π_old, once per batch: the policy that sampled
                            mb["old"] = token_logprobs(
                                policy, mb["ids"], mb["starts"], mb["mask"].shape[1], cfg.temperature
                            )[0]
                        if ref_model is not None:
                            mb["ref"] = token_logprobs(
                                ref_model, mb["ids"], mb["starts"], mb["mask"].shape[1], cfg.temperature
                            )[0]
                entropies: list[float] = []
                mix_losses: list[float] = []
                for u in range(cfg.mu):
                    mix = None
                    if mix_rows is not None:
                        mix = packed_batch_at(mix_rows, cfg.sft_mix_rows, cfg.seed, step * cfg.mu + u)
                    loss_fn = _loss_fn(
                        cfg, policy, micro, n_seq, n_tok, entropies if u == 0 else None, mix, mix_losses
                    )
                    try:
                        m = trainer.step(loss_fn, accumulation=len(micro))
                    except TrainingDiverged as e:
                        # the step the error names, in the log as the skipped ones before it are
                        failed = {k: e.metrics[k] for k in ("loss", "grad_norm", "lr")} if e.metrics else {}
                        metrics_log.log(
                            step + 1, **{**ro.metrics, **failed, "skipped": True, "tokens": tokens}
                        )
                        raise
                    upd.update(grad_norm=float(m["grad_norm"]), lr=float(m["lr"]))  # the last update's
                    # the rest are means over the μ updates (as TRL logs them, and sft_mix_loss below): the
                    # first update's ratio is 1, so the last one's clipping alone would overstate it
                    for k in ("loss", "clip_frac", "clip_frac_low", "clip_frac_high", "kl", "ratio_mean"):
                        if k in m:
                            upd[k] = upd.get(k, 0.0) + float(m[k]) / cfg.mu
                    upd["skipped"] = bool(upd.get("skipped", False) or "skipped" in m)
                upd["entropy"] = sum(entropies) / len(entropies)
                if mix_losses:
                    upd["sft_mix_loss"] = sum(mix_losses) / len(mix_losses)
            elif cfg.mask_truncated and _masked_out_by_truncation(ro, cfg.beta):
                # every completion that would have trained was cut at --max-new-tokens and left out of
                # the loss: said so, not logged as "no signal" beside a groups_with_signal of 1
                upd.update(loss=0.0, all_truncated=True)
                bar.write(
                    f"grpo step {step + 1}: no update: every completion that would train was cut at "
                    f"--max-new-tokens {cfg.max_new_tokens}, and --mask-truncated leaves those out of the loss"
                )
            else:
                # no group carried signal (all rewards equal): nothing to learn from this batch, no update
                upd.update(loss=0.0, no_signal=True)  # and no entropy: no update computed one
            update_time = time.perf_counter() - t1
            upd_tokens = sum(int(mb["tokens"]) for mb in micro) * cfg.mu
            upd["update_tok_s"] = upd_tokens / max(update_time, 1e-9)
            upd["update_time_s"] = update_time

            # ----------------------------------------------------------------- logging
            rec: dict[str, Any] = {
                **ro.metrics,
                **upd,
                "tokens": tokens,
                "wall_time_s": time.perf_counter() - t_run,
            }
            ent = rec.get("entropy", float("nan"))
            if init_length is None and math.isfinite(ent):
                init_length = rec["response_length"]
            warnings = (
                collapse_warnings(
                    entropy_trend.add(ent),
                    rec["response_length"],
                    initial_entropy=entropy_trend.initial,
                    initial_length=init_length,
                    min_entropy=cfg.min_entropy,
                )
                if math.isfinite(ent)
                else []
            )
            if warnings:
                rec["collapse_warning"] = "; ".join(warnings)
                bar.write(f"grpo step {step + 1}: WARNING possible collapse: {rec['collapse_warning']}")
                bad_steps += 1
            else:
                bad_steps = 0
            metrics_log.log(step + 1, **rec)
            last = rec
            bar.set_postfix(
                {
                    "reward": f"{rec['reward']:.3f}",
                    "acc": f"{rec['accuracy']:.3f}",
                    "len": f"{rec['response_length']:.0f}",
                    # a step whose groups all got equal rewards made no update, so measured no entropy
                    "ent": f"{ent:.2f}"
                    if math.isfinite(ent)
                    else ("all truncated" if "all_truncated" in rec else "no signal"),
                },
                refresh=False,
            )
            finished = step + 1 >= planned(step + 1) or out_of_time()
            total = step + 1 if finished else planned(step + 1)  # a budget's plan, refitted as it goes
            bar.total = total
            bar.update(1)
            extra = {
                "seconds_spent": spent + time.perf_counter() - started,
                "grpo_step": step + 1,
                "history": {
                    "entropy_trend": entropy_trend.state(),
                    "init_length": init_length,
                    "bad_steps": bad_steps,
                    "tokens": tokens,
                    "task_signal": dict(sampler.signal),
                    **({"pass_rates": history["pass_rates"]} if "pass_rates" in history else {}),
                },
            }
            stop_now = cfg.stop_on_collapse and bad_steps >= cfg.collapse_patience
            signalled = trainer.stop_requested()  # a signal: save this step and stop
            if (
                (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
                or finished
                or stop_now
                or signalled
            ):
                trainer.save(extra)
            if on_step is not None:
                on_step(step + 1, total)
            if signalled:
                break
            if stop_now:
                bar.write(
                    f"grpo: stopping at step {step + 1}: collapse for {counted(bad_steps, 'step')} ({rec['collapse_warning']})"
                )
                break
            if finished:
                if out_of_time():
                    bar.write(f"grpo: time budget of {cfg.max_seconds:.0f}s spent at step {step + 1}")
                break
            step += 1
        else:  # no step to run: every one ran before (or the budget was spent)
            if start >= cfg.steps and not (trainer.checkpoint_dir / "config.json").exists():
                trainer.save({"grpo_step": start, "history": {}})
            if budget_spent:  # as sft says it, in GRPO's steps (the optimizer's are μ a step)
                print(
                    f"grpo: --max-seconds {cfg.max_seconds:g} spent at step {start}; nothing to train; "
                    f"checkpoint {trainer.checkpoint_dir}"
                )
            else:
                print(f"grpo: checkpoint already at step {start} of {planned(start)}; nothing to train")
        trainer.stop_requested()  # one that came during the last step's save: stop all the same
    if trainer.stop_signal:  # no end record: the run goes on at its --resume, as after a kill
        done = step + 1 if last else start  # in GRPO's steps, not the optimizer's (μ per step)
        raise trainer.interrupted(trainer.checkpoint_dir, done, cfg.steps)
    metrics_log.log(None, event="end", wall_time_s=time.perf_counter() - t_run)
    if last:  # the steps this process ran: fewer than planned where --stop-on-collapse ended it
        print(
            f"grpo: {counted(step + 1 - start, 'step')} in {time.perf_counter() - t_run:.0f}s; last reward "
            f"{last['reward']:.3f}, accuracy {last['accuracy']:.3f}, length {last['response_length']:.0f}; "
            f"checkpoint {trainer.checkpoint_dir}"
        )
    return trainer.checkpoint_dir


def loss_denominators(ro: Rollout, loss_type: str) -> tuple[int, int]:
    """The step's (sequences, tokens) its micro-batches' losses share: the sequences and tokens kept in
    the loss, except Dr. GRPO's G · L_max, which counts every sequence sampled (a constant, as in its
    paper and TRL: truncated completions left out by --mask-truncated must not rescale the rest). An
    empty completion has no token to average over: the mean per sequence leaves it out, as `grpo_loss`
    does when it counts for itself."""
    keep = ro.loss_mask_keep.tolist()
    n_tok = sum(len(c) for c, k in zip(ro.completion_ids, keep, strict=True) if k)
    n_seq = sum(1 for c, k in zip(ro.completion_ids, keep, strict=True) if k and c)
    return (len(keep) if loss_type == "dr_grpo" else n_seq), n_tok


def _masked_out_by_truncation(ro: Rollout, beta: float) -> bool:
    """Whether a batch that trained nothing would have trained but for --mask-truncated: a sample it
    left out carried an advantage (a skipped one has none), or with β > 0 (the KL term trains every
    sample) any sample was scored at all."""
    if beta > 0:
        return ro.metrics["skipped_samples"] < len(ro.prompt_ids)
    return bool((~ro.loss_mask_keep & (ro.advantages != 0)).any())


def rollout_seeds(seed: int, step: int, n: int) -> list[int]:
    """The engine seeds of one rollout's `n` requests at GRPO step `step` (-1: the probe), a pure function
    of the run's seed: every (step, request) samples its own random stream. (A seed per step with the
    engine's seed + i rule would give request i at step s+1 request i+1's stream at step s, the same
    completion whenever that problem came back.)"""
    rng = random.Random(f"grpo rollouts {seed} {step}")
    return [rng.getrandbits(63) for _ in range(n)]


def _sample(
    cfg: GRPOConfig,
    engine,
    prompts: list[list[int]],
    stop: list[int],
    seeds: list[int],
    progress: bool | str = False,
) -> list:
    """Completions of every prompt (already repeated G times) at the rollout settings, prompt i
    sampled with `seeds[i]` (`progress`: a bar's label, as `engine_generate` takes it)."""
    from nanoseek.evaluate import engine_generate

    return engine_generate(
        engine,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop_token_ids=stop,
        seeds=seeds,
        progress=progress,
    )


def pool_seed(seed: int) -> int:
    """The stream GRPO's training problems come from at run seed `seed`: apart from the one SFT's and
    distillation's worked solutions take at that seed (`problems("train", n, seed)`), as R1's RL prompts
    are apart from its cold-start data (§2.3). On one stream a pool of 2,048 held the ~375 problems a
    family that SFT had just taught, and the probe and the rollouts met them again."""
    return zlib.crc32(f"grpo pool {seed}".encode())


def draw_pools(cfg: GRPOConfig, tasks: list) -> dict[str, list]:
    """Each task's training problems for the run, (task, problem) pairs by task name: up to
    `cfg.train_pool` each (a family with fewer distinct problems contributes all it has)."""
    pools: dict[str, list] = {}
    seed = pool_seed(cfg.seed)
    for t in tasks:
        problems = t.problems("train", cfg.train_pool, seed=seed, language=cfg.language, strict=False)
        pools.setdefault(t.name, []).extend((t, p) for p in problems)
        if hasattr(t, "files") and len(problems) == cfg.train_pool:
            # a user's file of more problems than the pool: the rest were never drawn, without a word
            held = len(t.problems("train", sys.maxsize, seed=seed, language=cfg.language, strict=False))
            if held > cfg.train_pool:
                print(
                    f"grpo: {t.name}: drawing from {cfg.train_pool} of its {held} training problems (--train-pool)"
                )
    return pools


def probe_pass_rates(
    cfg: GRPOConfig, engine, tok, pools: dict[str, list], stop: list[int]
) -> dict[str, float]:
    """Each task's pass rate on `cfg.probe_prompts` of its training problems x G samples at the rollout
    temperature, before any update (`--task-sampling unsolved`). A task the model already solves gives
    groups that are all right: zero advantage, no gradient (DAPO §3.2 filters them after generating
    them), and its rollouts, on a CPU the cost of a step, buy nothing. Measured on training problems,
    never the held-out ones."""
    from nanoseek.data.rewards import score_pairs
    from nanoseek.evaluate import chat_prompt_ids, prompt_opens_think, strip_stop

    opened = prompt_opens_think(tok)
    rng = random.Random(cfg.seed * 1_000_003 - 1)  # apart from every step's draw
    batch = [
        item
        for problems in pools.values()
        for item in rng.sample(problems, min(cfg.probe_prompts, len(problems)))
    ]
    prompts = [chat_prompt_ids(tok, p.messages) for _, p in batch for _ in range(cfg.group_size)]
    # probe_prompts x G of every task before the first step's bar: several steps' rollouts, shown
    label = "grpo probe" if cfg.progress else False
    outs = _sample(cfg, engine, prompts, stop, rollout_seeds(cfg.seed, -1, len(prompts)), label)
    texts = [tok.decode(strip_stop(o.token_ids, stop), skip_special_tokens=True) for o in outs]
    task_of = {id(prob): task for task, prob in batch}
    problems = [prob for _, prob in batch for _ in range(cfg.group_size)]
    scored = score_pairs(  # as a step's rollouts are: code answers' programs overlap
        lambda prob, text: task_of[id(prob)].verify(prob, text, require_think=opened),
        problems,
        texts,
        cfg.reward_workers or usable_cpus(),
    )
    verdicts: dict[str, list[float]] = {name: [] for name in pools}
    for j, verdict in enumerate(scored):
        if verdict is not None:
            verdicts[batch[j // cfg.group_size][0].name].append(float(verdict))
    return {name: sum(v) / len(v) for name, v in verdicts.items() if v}


def supervised_mix_rows(
    tok, names: list[str], seed: int, per_task: int = 64, seq_len: int = 512
) -> list | None:
    """Packed rows of worked solutions of the tasks `names` (each must have them) for `--sft-mix`, from
    their training split; None for no task. Which families are verifier-only is
    the run's choice, not the task's (the speedrun's `largest` has worked solutions it never shows):
    the caller leaves them out (`--sft-mix-tasks`), or the mix would show GRPO the answers."""
    from nanoseek.train.sft import pack_examples, task_conversations, tokenize_conversation

    if not names:
        return None
    examples = [
        ex
        for conv in task_conversations(names, per_task * len(names), seed=seed)
        for ex in tokenize_conversation(tok, conv)
    ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return pack_examples(examples, seq_len, pad)


def _loss_fn(
    cfg: GRPOConfig,
    policy: torch.nn.Module,
    micro: list[dict[str, torch.Tensor]],
    n_seq: int,
    n_tok: int,
    entropies: list[float] | None,
    mix: PackedBatch | None = None,
    mix_losses: list[float] | None = None,
) -> Callable[[], tuple[torch.Tensor, dict]]:
    """The Trainer's objective: each call takes the next micro-batch; their losses sum to the batch loss.
    The first call also adds `cfg.sft_mix` x the supervised loss on `mix` (its value goes to `mix_losses`).

    The Trainer and the caller average the per-token statistics (clip fractions, ratio, KL, entropy) over
    the micro-batches, so each is weighted by its micro-batch's share of the tokens: their mean is the
    mean over all tokens, whatever --micro-batch splits them into."""
    first = [True]
    batches = iter(micro)
    total_tokens = max(sum(float(mb["mask"].sum()) for mb in micro), 1.0)

    def loss_fn() -> tuple[torch.Tensor, dict]:
        mb = next(batches)
        share = len(micro) * float(mb["mask"].sum()) / total_tokens
        mix_loss, mix_tokens = None, 0
        if mix is not None and first[0]:
            mix_loss, mix_tokens = sft_loss(policy, mix), mix.input_ids.numel()
            if mix_losses is not None:
                mix_losses.append(float(mix_loss.detach()))
        first[0] = False
        logp, ent = token_logprobs(
            policy,
            mb["ids"],
            mb["starts"],
            mb["mask"].shape[1],
            cfg.temperature,
            with_entropy=entropies is not None,
            token_mask=mb["real"],
        )
        out = grpo_loss(
            logp,
            mb.get("old"),
            mb["adv"],
            mb["mask"],
            eps_low=cfg.eps_low,
            eps_high=cfg.eps_high,
            beta=cfg.beta,
            ref_logp=mb.get("ref"),
            loss_type=cfg.loss,
            max_completion_len=cfg.max_new_tokens,
            num_sequences=n_seq,
            num_tokens=n_tok,
        )
        if ent is not None and entropies is not None:
            entropies.append(share * float((ent * mb["mask"]).sum() / mb["mask"].sum().clamp(min=1)))
        # the micro-batch losses share the batch's denominators, so they sum to the batch loss
        loss = out.loss if mix_loss is None else out.loss + cfg.sft_mix * mix_loss
        tokens = mb["tokens"] + mix_tokens
        return loss, {**{k: share * v for k, v in out.stats.items()}, "tokens": tokens}

    return loss_fn


def _score_rollout(
    cfg: GRPOConfig,
    batch: list,
    flat_prompts: list[list[int]],
    outs: list,
    tok,
    reward_fn,
    stop: list[int],
    opened: bool = True,
) -> Rollout:
    """Rewards, accuracy, format and length statistics, and group advantages for one batch.

    Accuracy and format are measured whatever the reward spec weighs (the task's strict verifier and
    R1's format rule). A group whose gold answer cannot be parsed is dropped: never rewarded, no advantage.
    `opened`: the prompts opened the think block (R1's template); else an answer needs none before it.
    """
    from nanoseek.data.rewards import format_reward, score_pairs
    from nanoseek.evaluate import strip_stop

    g = cfg.group_size
    rewards, acc, fmt, lengths, truncated, skipped = [], [], [], [], [], []
    parts_sum: dict[str, float] = {}
    parts_n: dict[str, int] = {}  # a part is averaged over the samples that have it (code: those with tests)
    completions = []
    per_task: dict[str, list[float]] = {}  # a mixture's accuracy, task by task
    texts = [tok.decode(strip_stop(o.token_ids, stop), skip_special_tokens=True) for o in outs]
    task_of = {id(prob): task for task, prob in batch}

    def score(prob, text):  # the reward and the task's verdict: a code answer's program runs once for both
        return reward_fn(prob, text), task_of[id(prob)].verify(prob, text, require_think=opened)

    problems = [prob for _, prob in batch for _ in range(g)]
    results = score_pairs(score, problems, texts, cfg.reward_workers or usable_cpus())
    for j, (o, text, (res, verdict)) in enumerate(zip(outs, texts, results, strict=True)):
        task, prob = batch[j // g]
        total, parts = res
        skip = bool(getattr(res, "skipped", False)) or verdict is None
        skipped.append(skip)
        rewards.append(0.0 if skip else float(total))
        lengths.append(len(o.token_ids))
        truncated.append(o.finish_reason == "length")
        completions.append(list(o.token_ids))
        if skip:
            continue
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
            parts_n[k] = parts_n.get(k, 0) + 1
        acc.append(float(verdict))
        per_task.setdefault(getattr(task, "name", "?"), []).append(float(verdict))
        fmt.append(format_reward(text, prompt_opened_think=opened))
    r = torch.tensor(rewards)
    adv = group_advantages(r, g, scale_by_std=cfg.loss != "dr_grpo")
    keep = ~torch.tensor(skipped)
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    if cfg.mask_truncated:
        keep &= ~torch.tensor(truncated)
    n = len(outs)
    scored = max(len(acc), 1)
    metrics = {
        "reward": r[~torch.tensor(skipped)].mean().item() if len(acc) else float("nan"),
        **{f"reward_{k}": v / parts_n[k] for k, v in parts_sum.items()},
        "accuracy": sum(acc) / scored,
        "format_rate": sum(fmt) / scored,
        "response_length": sum(lengths) / n,
        "response_length_max": max(lengths),
        "truncated_rate": sum(truncated) / n,
        "groups_with_signal": float((adv.view(-1, g) != 0).any(dim=1).float().mean()),
        "skipped_samples": float(sum(skipped)),
    }
    if len(per_task) > 1:
        metrics.update({f"accuracy/{name}": sum(v) / len(v) for name, v in sorted(per_task.items())})
    return Rollout(flat_prompts, completions, r, adv, keep, metrics)
