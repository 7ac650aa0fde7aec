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
- Truncated completions (finish reason "length") can be masked out of the loss (DAPO §3.3 overlong
  filtering): the reward of a cut-off answer says little about its tokens.
- Rollouts go through the batched Engine (all P·G samples submitted at once) sharing the policy's
  nn.Module, so the engine always samples from the current weights.

`docs/r1.md` works through what each loss variant normalizes by and why the loss is ~0 at β = 0, μ = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["grpo", "dr_grpo", "dapo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo")


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
    # float rounding can leave ~1e-8 residues in a uniform group; those must be exactly 0 (and never
    # 0/0 = NaN with eps = 0)
    adv = torch.where(std > 1e-6, adv, torch.zeros_like(adv))
    return adv.reshape(rewards.shape)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ || π_ref) by Schulman's k3 estimator (DeepSeekMath eq. 4, used by R1):
    π_ref/π_θ - log(π_ref/π_θ) - 1, unbiased under samples from π_θ and never negative.

    The log-ratio is clamped to ±20 so one token where the two policies disagree wildly cannot
    overflow exp() into inf and poison the whole loss.
    """
    log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(log_ratio) - log_ratio - 1.0


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    completion_start: torch.Tensor | int,
    completion_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of completion tokens under `model`, and optionally the per-token entropy.

    `input_ids` [B, S] holds prompt + completion right-padded (causal attention, so real tokens never
    see the padding). Completion b starts at `completion_start[b]`; the result is aligned to the
    completion: [B, completion_len], entry t = log π(ids[b, start+t] | ids[b, :start+t]) (positions past
    the sequence's end are garbage and must be masked by the caller). The logits are divided by the
    sampling temperature so the ratio compares the same distributions the engine sampled from.
    """
    b, s = input_ids.shape
    starts = torch.as_tensor(completion_start, device=input_ids.device).expand(b)
    # position p predicts token p+1, so the logit rows for completion token t are start-1+t
    offs = torch.arange(completion_len, device=input_ids.device)
    rows = (starts.unsqueeze(1) - 1 + offs).clamp(max=s - 2)  # [B, L]
    batch_idx = torch.arange(b, device=input_ids.device).unsqueeze(1)
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        # project only the completion positions: the prompt's logits are never needed
        hidden = model.hidden_states(input_ids)
        sel = model.lm_head(hidden[batch_idx, rows]).float()
    else:
        logits = model(input_ids)
        if isinstance(logits, tuple):
            logits = logits[0]
        sel = logits[batch_idx, rows].float()
    if temperature != 1.0:
        sel = sel / temperature
    logp_all = F.log_softmax(sel, dim=-1)
    targets = input_ids.gather(1, rows + 1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
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
) -> LossOutput:
    """The clipped surrogate loss (negated objective) for one batch of completions.

    logp, old_logp, ref_logp, mask: [B, L] (mask = 1 for completion tokens that count); advantages [B].
    old_logp None means "the policy that sampled is the current one" (μ = 1): the ratio is exp(logp -
    logp.detach()) = 1 with the right gradient, and no second forward pass is needed.

    Normalization (see docs/r1.md):
      grpo    — mean over each sequence's own tokens, then mean over sequences (DeepSeekMath eq. 3).
      dapo    — sum over all tokens of the batch / number of those tokens (token-level, DAPO §3.4).
      dr_grpo — sum over all tokens / (num_sequences · max_completion_len), a constant (Dr. GRPO).
    `num_sequences` lets micro-batches share the full batch's constant; it defaults to B.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (log-probs under the frozen reference model)")
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
        loss = (per_token * mask).sum() / n_tok
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
    min_length_ratio: float = 0.2,
    max_entropy: float | None = None,
) -> list[str]:
    """What looks like policy collapse this step (empty list = healthy).

    RL on small models fails in a few recognizable ways: entropy falls to ~0 (one repeated token or one
    memorized answer), the thinking shrinks to nothing, or entropy explodes (the policy turns into noise).
    """
    out: list[str] = []
    if not math.isfinite(entropy):
        out.append(f"entropy is {entropy}")
        return out
    if entropy < min_entropy:
        out.append(f"entropy collapsed to {entropy:.3f} (< {min_entropy})")
    if max_entropy is not None and entropy > max_entropy:
        out.append(f"entropy exploded to {entropy:.2f} (> {max_entropy:.2f})")
    if initial_length and mean_length < min_length_ratio * initial_length:
        out.append(
            f"response length collapsed to {mean_length:.1f} tokens "
            f"(< {min_length_ratio:.0%} of the initial {initial_length:.1f})"
        )
    return out
