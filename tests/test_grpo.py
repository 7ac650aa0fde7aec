"""GRPO math against hand-worked numbers (docs/r1.md works the same example), then the trainer end to end."""

from __future__ import annotations

import functools
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.train.grpo import (
    EntropyTrend,
    collapse_warnings,
    group_advantages,
    grpo_loss,
    kl_k3,
    token_logprobs,
)


# ------------------------------------------------------------------------------------- advantages
def test_group_advantages_hand_worked() -> None:
    # group of 4 with rewards 1,0,0,1: mean 0.5, sample std sqrt(1/3) -> A = ±0.5·sqrt(3) = ±0.866
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3])
    a = group_advantages(r, 4, eps=0.0)
    s3 = math.sqrt(3) / 2
    assert torch.allclose(a[:4], torch.tensor([s3, -s3, -s3, s3]), atol=1e-6)
    assert torch.equal(a[4:], torch.zeros(4))  # identical rewards carry no signal
    dr = group_advantages(r, 4, scale_by_std=False)
    assert torch.allclose(dr[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert group_advantages(r.view(2, 4), 4).shape == (2, 4)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 1)


def test_a_uniform_group_has_zero_advantage_whatever_the_rewards_size() -> None:
    # one group (--batch-prompts 1) of eight rewards of 10.4 (accuracy:10,format:0.4, all right): float32
    # rounding leaves a std of ~1e-6, which an absolute threshold took for signal (A = ±0.009; ±0.07 at
    # 100.1, ±0.37 at 1000.1)
    for value, g in ((10.4, 8), (9.9, 6), (100.1, 7), (100.1, 16), (1000.1, 8)):
        for scale in (True, False):
            adv = group_advantages(torch.full((g,), value), g, scale_by_std=scale)
            assert torch.equal(adv, torch.zeros(g)), (value, g, scale)
    # a group whose rewards do differ keeps its signal however small the difference
    assert (group_advantages(torch.tensor([0.5, 0.5 + 2e-7]), 2) != 0).all()


def test_a_group_holding_a_non_finite_reward_gets_no_advantage() -> None:
    """A custom reward that returns NaN or inf: its group carries no signal (zeros, never NaN advantages
    that would write NaN into every weight), the other groups theirs."""
    rewards = torch.tensor([1.0, float("nan"), 0.0, 1.0, 0.0, 1.0, float("inf"), 0.0, 1.0])
    adv = group_advantages(rewards, 3)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0] and adv[6:].tolist() == [0.0, 0.0, 0.0]
    assert adv[3:6].isfinite().all() and adv[3:6].abs().sum() > 0


def test_groups_with_signal_counts_the_groups_with_nonzero_advantages(micro_checkpoint) -> None:
    from types import SimpleNamespace

    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.grpo import GRPOConfig, _score_rollout

    task = get_task("arithmetic")
    problem = task.problems("train", 1, seed=0, language="en")[0]
    tok = load_tokenizer(micro_checkpoint)
    outs = [SimpleNamespace(token_ids=tok.encode(f"ok</think>\n{i}"), finish_reason="stop") for i in range(8)]
    cfg = GRPOConfig(init="x", tasks=["a"], group_size=8, batch_prompts=1, reward_workers=1)
    # the reward spec accuracy:10,format:0.4 with every sample right: no signal
    ro = _score_rollout(
        cfg, [(task, problem)], [[1]] * 8, outs, tok, lambda p, t: (10.4, {}), [tok.eos_token_id]
    )
    assert torch.equal(ro.advantages, torch.zeros(8))
    assert ro.metrics["groups_with_signal"] == 0.0
    # rewards 0, 1, 2: the middle sample's advantage is 0, its group's signal is not
    cfg = GRPOConfig(init="x", tasks=["a"], group_size=3, batch_prompts=1, reward_workers=1)
    reward = lambda p, t: (float(t[-1]), {})  # noqa: E731
    ro = _score_rollout(cfg, [(task, problem)], [[1]] * 3, outs[:3], tok, reward, [tok.eos_token_id])
    assert ro.advantages[1] == 0 and ro.metrics["groups_with_signal"] == 1.0


def test_a_skipped_group_is_left_out_of_the_reward_and_accuracy_but_counted(micro_checkpoint) -> None:
    """A group whose gold answer cannot be parsed (the reward says `skipped`): no reward, no accuracy, no
    advantage, counted in skipped_samples; its completions' lengths still count (TRL's mean length)."""
    from types import SimpleNamespace

    from nanoseek.data.rewards import RewardResult
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.grpo import GRPOConfig, _score_rollout

    task = get_task("arithmetic")
    good, bad = task.problems("train", 2, seed=0, language="en")
    tok = load_tokenizer(micro_checkpoint)
    texts = [f"ok</think>\n{good.answer}", "ok</think>\nx", f"ok</think>\n{bad.answer}", "no"]
    outs = [SimpleNamespace(token_ids=tok.encode(t), finish_reason="stop") for t in texts]

    def reward(p, t):
        if p is bad:
            return RewardResult(0.0, {}, skipped=True)
        right = float(t.endswith(good.answer))
        return RewardResult(2.0 * right, {"accuracy": right})

    cfg = GRPOConfig(init="x", tasks=["a"], group_size=2, batch_prompts=2, reward_workers=1)
    ro = _score_rollout(cfg, [(task, good), (task, bad)], [[1]] * 4, outs, tok, reward, [tok.eos_token_id])
    m = ro.metrics
    assert m["reward"] == 1.0 and m["reward_accuracy"] == 0.5  # the good group's (2 + 0) / 2
    assert m["accuracy"] == 0.5 and m["format_rate"] == 1.0  # the verifier's, over the 2 scored
    assert m["skipped_samples"] == 2.0 and m["groups_with_signal"] == 0.5
    assert m["response_length"] == sum(len(o.token_ids) for o in outs) / 4
    assert ro.advantages[2:].tolist() == [0.0, 0.0] and ro.advantages[0] > 0 > ro.advantages[1]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("mask_truncated", [False, True])
def test_rollout_advantages_follow_the_loss_and_truncated_samples_leave_the_loss(
    micro_checkpoint, loss_type, mask_truncated
) -> None:
    """Dr. GRPO only centers the rewards (no std division); --mask-truncated takes the completions cut
    by --max-new-tokens out of the loss, while their rewards still count in the group's baseline (TRL)."""
    from types import SimpleNamespace

    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.grpo import GRPOConfig, _score_rollout

    task = get_task("arithmetic")
    problem = task.problems("train", 1, seed=0, language="en")[0]
    tok = load_tokenizer(micro_checkpoint)
    finish = ["stop", "length", "stop", "length"]
    outs = [
        SimpleNamespace(token_ids=tok.encode(f"ok</think>\n{i}"), finish_reason=f)
        for i, f in enumerate(finish)
    ]
    cfg = GRPOConfig(
        init="x",
        tasks=["a"],
        group_size=4,
        batch_prompts=1,
        reward_workers=1,
        loss=loss_type,
        mask_truncated=mask_truncated,
    )
    reward = lambda p, t: (float(t.strip()[-1] in "03"), {})  # noqa: E731  rewards 1, 0, 0, 1
    ro = _score_rollout(cfg, [(task, problem)], [[1]] * 4, outs, tok, reward, [tok.eos_token_id])
    a = 0.5 if loss_type == "dr_grpo" else math.sqrt(3) / 2
    assert ro.advantages.tolist() == pytest.approx([a, -a, -a, a], rel=1e-3)
    assert ro.loss_mask_keep.tolist() == ([True, False, True, False] if mask_truncated else [True] * 4)


# ------------------------------------------------------------------------------------------- loss
def _example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # two completions of length 2 (third slot padding) and 3; ratios chosen to hit both clip sides
    ratios = torch.tensor([[1.5, 0.9, 1.0], [1.1, 0.7, 1.0]])
    old = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.4, 0.6, 0.1]]))
    logp = (old + ratios.log()).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    return logp, old, mask, adv


def test_clipped_loss_hand_worked_all_normalizations() -> None:
    logp, old, mask, adv = _example()
    kw = dict(eps_low=0.2, eps_high=0.3)
    # per token (negated objective): seq0 (A=+1): -min(1.5, 1.3) = -1.3, -min(0.9, 0.9) = -0.9
    #                                seq1 (A=-1): -min(-1.1,-1.1) = 1.1, -min(-0.7,-0.8) = 0.8, 1.0
    out = grpo_loss(logp, old, adv, mask, loss_type="grpo", **kw)
    assert out.loss.item() == pytest.approx(((-2.2 / 2) + (2.9 / 3)) / 2, abs=1e-6)
    assert out.stats["clip_frac"] == pytest.approx(2 / 5)  # 1.5 clipped high, 0.7 clipped low
    assert out.stats["clip_frac_high"] == pytest.approx(1 / 5)
    assert out.stats["clip_frac_low"] == pytest.approx(1 / 5)
    out.loss.backward()
    # clipped tokens get no gradient; seq0 token1: d(-r·A)/dlogp = -0.9, / 2 tokens / 2 sequences
    expected = torch.tensor([[0.0, -0.9 / 4, 0.0], [1.1 / 6, 0.0, 1.0 / 6]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)

    logp, old, mask, adv = _example()
    dapo = grpo_loss(logp, old, adv, mask, loss_type="dapo", **kw)
    assert dapo.loss.item() == pytest.approx(0.7 / 5, abs=1e-6)
    dr = grpo_loss(logp, old, adv, mask, loss_type="dr_grpo", max_completion_len=3, **kw)
    assert dr.loss.item() == pytest.approx(0.7 / 6, abs=1e-6)
    # the constant is --max-new-tokens, not the longest completion of this batch
    dr8 = grpo_loss(logp, old, adv, mask, loss_type="dr_grpo", max_completion_len=8, **kw)
    assert dr8.loss.item() == pytest.approx(0.7 / 16, abs=1e-6)
    with pytest.raises(ValueError, match="max_completion_len"):
        grpo_loss(logp, old, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="unknown loss_type"):
        grpo_loss(logp, old, adv, mask, loss_type="ppo")


def test_shared_denominators_replace_the_batchs_own_counts() -> None:
    """A micro-batch's loss is its share of the step's: each normalization divides by the counts the
    caller passes (the step's tokens, sequences), not this micro-batch's. The per-token terms are
    _example's: seq0 -1.3, -0.9 (sum -2.2 over 2 tokens), seq1 1.1, 0.8, 1.0 (sum 2.9 over 3)."""
    kw = dict(eps_low=0.2, eps_high=0.3, num_sequences=4, num_tokens=10)
    logp, old, mask, adv = _example()
    assert grpo_loss(logp, old, adv, mask, loss_type="dapo", **kw).loss.item() == pytest.approx(0.7 / 10)
    grpo = grpo_loss(logp, old, adv, mask, loss_type="grpo", **kw).loss.item()
    assert grpo == pytest.approx((-2.2 / 2 + 2.9 / 3) / 4)
    dr = grpo_loss(logp, old, adv, mask, loss_type="dr_grpo", max_completion_len=3, **kw).loss.item()
    assert dr == pytest.approx(0.7 / (4 * 3))


def test_grpo_averages_over_the_sequences_that_have_tokens() -> None:
    """Without a shared count, GRPO's mean over sequences counts those with a token in the loss: a row
    whose mask is empty (a completion left out) leaves the mean of the other two as it was."""
    logp, old, mask, adv = _example()
    pad = lambda t, v: torch.cat([t, torch.full_like(t[:1], v)])  # noqa: E731
    out = grpo_loss(
        pad(logp.detach(), -1.0),
        pad(old, -1.0),
        torch.tensor([1.0, -1.0, 1.0]),
        pad(mask, 0),
        eps_low=0.2,
        eps_high=0.3,
    )
    assert out.loss.item() == pytest.approx((-2.2 / 2 + 2.9 / 3) / 2)


def test_clip_fractions_count_each_side_against_its_own_epsilon() -> None:
    # clip-higher (ε_low 0.2, ε_high 0.3): ratio 1.25 with A > 0 and ratio 0.75 with A < 0 lie between
    # the two bounds; only the second is clipped (its gradient zeroed), and it counts on the low side
    logp = torch.log(torch.tensor([[1.25], [0.75]])).requires_grad_(True)
    out = grpo_loss(
        logp, torch.zeros(2, 1), torch.tensor([1.0, -1.0]), torch.ones(2, 1), eps_low=0.2, eps_high=0.3
    )
    out.loss.backward()
    assert logp.grad[0, 0] != 0 and logp.grad[1, 0] == 0
    assert out.stats["clip_frac_high"] == 0.0
    assert out.stats["clip_frac_low"] == out.stats["clip_frac"] == pytest.approx(1 / 2)


def test_loss_is_zero_at_mu1_beta0_but_gradient_is_not() -> None:
    # μ = 1: the sampling policy is the current one, ratio = 1, loss = -mean(A) = 0 for normalized A
    torch.manual_seed(0)
    logp = torch.randn(4, 5).log_softmax(-1).requires_grad_(True)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    mask = torch.ones(4, 5)
    out = grpo_loss(logp, None, adv, mask, loss_type="grpo")
    assert abs(out.loss.item()) < 1e-6
    out.loss.backward()
    # d/dlogp = -A_i / (tokens · sequences): policy gradient flows although the value is 0
    assert torch.allclose(logp.grad, (-adv / 20).unsqueeze(1).expand(4, 5), atol=1e-6)


def test_kl_k3_hand_worked_and_beta() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    kl = kl_k3(logp, ref)
    assert kl[0, 0].item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert kl[0, 1].item() == 0.0
    assert torch.isfinite(kl_k3(torch.tensor([0.0]), torch.tensor([-1e4]))).all()  # no overflow
    # π_ref far above π_θ: exp(log π_ref - log π_θ) = exp(1e4) overflowed to inf; clamped at 20
    assert kl_k3(torch.tensor([-1e4]), torch.tensor([0.0])).item() == pytest.approx(math.exp(20) - 20 - 1)
    # β adds β·KL per token: here mean over the 2 tokens of the single sequence
    out0 = grpo_loss(logp, None, torch.zeros(1), torch.ones(1, 2), beta=0.0)
    out1 = grpo_loss(logp, None, torch.zeros(1), torch.ones(1, 2), beta=0.1, ref_logp=ref)
    assert out1.loss.item() - out0.loss.item() == pytest.approx(0.1 * kl.mean().item(), abs=1e-6)
    assert out1.stats["kl"] == pytest.approx(kl.mean().item())
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, None, torch.zeros(1), torch.ones(1, 2), beta=0.1)


# ---------------------------------------------------------------------------------- log-probs
class _Toy(torch.nn.Module):
    """A small causal model (embedding + GRU + head) to check log-prob alignment on ragged batches."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.rnn = torch.nn.GRU(8, 8, batch_first=True)
        self.head = torch.nn.Linear(8, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(ids))[0])


def test_token_logprobs_align_with_per_sequence_reference() -> None:
    torch.manual_seed(0)
    model = _Toy()
    seqs = [([3, 4, 5], [6, 7]), ([2, 9], [1, 5, 8, 10])]  # (prompt, completion) of different lengths
    s = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros(2, s, dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
    starts = torch.tensor([len(p) for p, _ in seqs])
    logp, ent = token_logprobs(model, ids, starts, 4, temperature=0.7, with_entropy=True)
    assert logp.shape == ent.shape == (2, 4)
    for i, (p, c) in enumerate(seqs):
        full = torch.tensor([p + c])
        ref = (model(full)[0, :-1].float() / 0.7).log_softmax(-1)
        for t, tok in enumerate(c):
            assert logp[i, t].item() == pytest.approx(ref[len(p) - 1 + t, tok].item(), abs=1e-5)
            probs = ref[len(p) - 1 + t].exp()
            assert ent[i, t].item() == pytest.approx(-(probs * ref[len(p) - 1 + t]).sum().item(), abs=1e-5)
    # a completion at position 0 has no position to be predicted from: refused, not read from row -1
    # (the last position's logits, another sequence's end)
    with pytest.raises(ValueError, match="completion_start must be >= 1"):
        token_logprobs(model, ids, torch.tensor([0, 2]), 4)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_a_non_finite_log_prob_outside_the_mask_changes_nothing(loss_type) -> None:
    """Positions past a completion's end are garbage the mask leaves out: a -inf there (a token the
    model rules out) made the batch's loss NaN through 0 · NaN, and the step was skipped."""
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    logp, old, ref = (torch.rand(2, 4).log() for _ in range(3))
    adv = torch.tensor([1.0, -0.5])

    def run(garbage: float):
        lp = torch.where(mask > 0, logp, garbage).requires_grad_()
        o, r = (torch.where(mask > 0, t, garbage) for t in (old, ref))
        out = grpo_loss(lp, o, adv, mask, beta=0.04, ref_logp=r, loss_type=loss_type, max_completion_len=4)
        out.loss.backward()
        return out.loss.item(), lp.grad, out.stats

    loss, grad, stats = run(-math.inf)
    assert (loss, stats) == run(-1.0)[::2] and torch.equal(grad, run(-1.0)[1])


def test_a_token_of_probability_zero_leaves_the_entropy_finite() -> None:
    """A logit of -inf (a token the model rules out) made every position's entropy NaN (0 · -inf): the
    step's logged entropy, and the collapse check on it, read every step as one without an update."""
    torch.manual_seed(0)
    model = _Toy()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        model.head.bias[0] = -math.inf
        others = model(ids)[0, 1:4, 1:].log_softmax(-1)  # the other ten tokens' distributions
    logp, ent = token_logprobs(model, ids, 2, 3, with_entropy=True)
    assert logp.isfinite().all()
    assert torch.allclose(ent[0], -(others.exp() * others).sum(-1), atol=1e-5)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batches_give_the_batch_gradient_and_token_mean_metrics(loss_type) -> None:
    # 2 groups of 3 with ragged completions; --micro-batch is a memory knob: the summed loss, the
    # gradient and the logged per-token means (KL, clip fraction, entropy) must not depend on it
    import types

    from nanoseek.train.grpo import Rollout, _loss_fn, _micro_batches

    torch.manual_seed(0)
    policy, ref = _Toy(), _Toy()
    prompts = [[1, 2, 3]] * 3 + [[4, 5]] * 3
    comps = [[6], [8, 9, 10, 2, 3, 4, 5, 6], [5, 2], [3, 3, 7], [2], [7, 7, 7, 1, 9]]
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.2, 0.7, 0.3])
    ro = Rollout(prompts, comps, rewards, group_advantages(rewards, 3), torch.ones(6, dtype=torch.bool), {})
    cfg = types.SimpleNamespace(
        temperature=0.7, eps_low=0.2, eps_high=0.28, beta=0.1, loss=loss_type, max_new_tokens=8, sft_mix=0
    )
    n_tok = sum(map(len, comps))
    runs = []
    for size in (6, 1):
        policy.zero_grad()
        micro = _micro_batches(ro, size, 0, skip_zero_adv=False)
        held, pairs = [], list(zip(prompts, comps, strict=True))
        for mb in micro:
            # the sequences' own tokens, which the routers' balancing counts; not the padding
            assert mb["real"].sum(1).tolist() == [int(n) for n in (mb["ids"] != 0).sum(1)]
            for row, start, m in zip(mb["ids"].tolist(), mb["starts"].tolist(), mb["mask"], strict=True):
                n = int(m.sum())  # the mask covers the completion, from where it starts
                assert m[:n].all() and (row[:start], row[start : start + n]) in pairs
                held.append(row[start : start + n])
        assert sorted(held) == sorted(comps)
        for mb in micro:
            args = (mb["ids"], mb["starts"], mb["mask"].shape[1], 0.7)
            with torch.no_grad():
                # a sampling policy that differs by position only (so alike in every split): some clipped
                shift = 0.3 * torch.cos(1.7 * torch.arange(mb["mask"].shape[1]))
                mb["old"] = token_logprobs(policy, *args)[0] + shift
                mb["ref"] = token_logprobs(ref, *args)[0]
        entropies: list[float] = []
        loss_fn = _loss_fn(cfg, policy, micro, 6, n_tok, entropies)
        loss, stats = 0.0, []
        for _ in micro:  # as Trainer.step: losses summed, other metrics averaged over the micro-batches
            part, m = loss_fn()
            part.backward()
            loss += part.item()
            stats.append(m)
        mean = {k: sum(m[k] for m in stats) / len(stats) for k in ("kl", "clip_frac", "ratio_mean")}
        grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
        runs.append((loss, grad, mean, sum(entropies) / len(entropies)))
    (loss6, grad6, mean6, ent6), (loss1, grad1, mean1, ent1) = runs
    assert loss1 == pytest.approx(loss6, abs=1e-6)
    assert torch.allclose(grad1, grad6, atol=1e-6)
    assert mean6["clip_frac"] > 0
    for k in mean6:
        assert mean1[k] == pytest.approx(mean6[k], rel=1e-5), k
    assert ent1 == pytest.approx(ent6, rel=1e-5)


def test_dr_grpo_divides_by_every_sequence_sampled_whatever_is_masked() -> None:
    """Dr. GRPO's normalizer is the constant G · L_max (its paper, TRL): completions --mask-truncated
    leaves out must not make the others' gradients larger; the per-sequence and per-token means count
    what the loss holds."""
    from nanoseek.train.grpo import Rollout, loss_denominators

    comps = [[1, 2], [3], [4, 5, 6], [7]]
    keep = torch.tensor([True, False, True, False])
    ro = Rollout([[9]] * 4, comps, torch.zeros(4), torch.zeros(4), keep, {})
    assert loss_denominators(ro, "dr_grpo") == (4, 5)
    assert loss_denominators(ro, "grpo") == (2, 5)
    assert loss_denominators(ro, "dapo") == (2, 5)
    # an empty completion: no tokens to average, so no sequence in the mean per sequence (grpo_loss's own
    # count leaves it out too: the driver's denominators must not dilute the others' by it)
    ro = Rollout(
        [[9]] * 3, [[1, 2], [], [3]], torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool), {}
    )
    assert loss_denominators(ro, "grpo") == (2, 3) and loss_denominators(ro, "dr_grpo") == (3, 3)
    logp = torch.zeros(3, 2, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    own = grpo_loss(logp, None, torch.tensor([1.0, 1.0, 2.0]), mask).loss
    shared = grpo_loss(logp, None, torch.tensor([1.0, 1.0, 2.0]), mask, num_sequences=2, num_tokens=3).loss
    assert torch.equal(own, shared) and own.item() == -1.5


def test_collapse_warnings() -> None:
    assert collapse_warnings(1.2, 40, initial_entropy=1.5, initial_length=50) == []
    assert "entropy collapsed" in collapse_warnings(0.01, 40, initial_entropy=1.5, initial_length=50)[0]
    assert "length collapsed" in collapse_warnings(1.0, 5, initial_entropy=1.5, initial_length=50)[0]
    assert collapse_warnings(float("nan"), 5, initial_entropy=None, initial_length=None)
    # a policy cold-started on worked solutions is nearly certain from the start (the speedrun's: ~0.02
    # nats a token over its first steps): low, not falling, so no warning until it falls far below that
    assert collapse_warnings(0.011, 60, initial_entropy=0.024, initial_length=75) == []
    assert "entropy collapsed" in collapse_warnings(0.003, 60, initial_entropy=0.024, initial_length=75)[0]
    assert collapse_warnings(0.001, 60, initial_entropy=None, initial_length=75) == []  # no baseline yet


# The per-step entropies of a speedrun's GRPO (seed 2, 56 steps with an update), which warned of
# collapse on 45 of them when each step was held against 0.05 alone.
SPEEDRUN_ENTROPIES = [
    0.043, 0.013, 0.008, 0.004, 0.055, 0.054, 0.069, 0.02, 0.009, 0.016, 0.02, 0.047, 0.003, 0.022,
    0.006, 0.017, 0.019, 0.013, 0.011, 0.007, 0.017, 0.01, 0.013, 0.009, 0.008, 0.022, 0.007, 0.028,
    0.037, 0.018, 0.013, 0.003, 0.002, 0.036, 0.003, 0.011, 0.053, 0.037, 0.028, 0.039, 0.006, 0.023,
    0.018, 0.013, 0.008, 0.042, 0.011, 0.018, 0.001, 0.018, 0.01, 0.029, 0.036, 0.015, 0.012, 0.107,
]  # fmt: skip


def test_entropy_trend_warns_on_a_fall_not_on_a_confident_start() -> None:
    def warned(entropies: list[float]) -> list[int]:
        trend, out = EntropyTrend(), []
        for i, e in enumerate(entropies):
            mean = trend.add(e)
            if collapse_warnings(mean, 60, initial_entropy=trend.initial, initial_length=75):
                out.append(i)
        return out

    assert warned(SPEEDRUN_ENTROPIES) == []
    # the same start, then a policy that has stopped exploring: warned within a window of the fall
    fallen = warned([*SPEEDRUN_ENTROPIES[:20], float("nan"), *[0.001] * 10])
    assert fallen and fallen[0] <= 21 + 5
    # carried across a resume: the same verdicts from a state saved halfway
    trend = EntropyTrend()
    for e in SPEEDRUN_ENTROPIES[:20]:
        trend.add(e)
    resumed = EntropyTrend(trend.state())
    assert resumed.initial == trend.initial and resumed.add(0.001) == trend.add(0.001)


# ------------------------------------------------------------------------------ end to end (tiny)
def _cfg(init: str, out, **kw):
    from nanoseek.train.grpo import GRPOConfig

    base = dict(
        init=init,
        tasks=["arithmetic"],
        out=str(out),
        group_size=4,
        batch_prompts=2,
        steps=2,
        max_new_tokens=8,
        lr=1e-3,
        micro_batch=4,
        progress=False,
        train_pool=64,
        # a random model never answers right; the language reward (share of Latin letters in the thinking
        # of an English prompt) varies across its samples, so every group carries signal
        reward="language:1",
        language="en",
    )
    base.update(kw)
    return GRPOConfig(**base)


def _weights(ckpt) -> dict[str, torch.Tensor]:
    from nanoseek.checkpoint import read_safetensors

    return read_safetensors(ckpt)


def test_a_bias_update_speed_v2_routers_never_read_is_said(micro_checkpoint, tmp_path) -> None:
    """--bias-update-speed on a V2-style model (deepseek-v2-lite: greedy routers, which never add the
    bias) did nothing without a word; the default (0) stays quiet."""
    import warnings

    from nanoseek.config import get_preset
    from nanoseek.train.loop import warn_unused_bias_speed

    v2 = get_preset("deepseek-v2-lite")
    with pytest.warns(
        UserWarning,
        match=r"--bias-update-speed 0.01 does nothing for this model: .*topk_method (group_limited_)?greedy",
    ):
        warn_unused_bias_speed(v2, _cfg(micro_checkpoint, tmp_path, bias_update_speed=0.01))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unused_bias_speed(v2, _cfg(micro_checkpoint, tmp_path))
        warn_unused_bias_speed(
            get_preset("deepseek-v3"), _cfg(micro_checkpoint, tmp_path, bias_update_speed=0.01)
        )


def test_grpo_resume_is_exact(micro_checkpoint, tmp_path, capsys) -> None:
    from nanoseek.metrics import read_metrics
    from nanoseek.train.grpo import grpo

    straight = grpo(_cfg(micro_checkpoint, tmp_path / "a", steps=2, mu=2))
    grpo(_cfg(micro_checkpoint, tmp_path / "b", steps=1, mu=2))
    resumed = grpo(_cfg(micro_checkpoint, tmp_path / "b", steps=2, mu=2, resume=True))
    # the optimizer's schedule is --steps x μ updates: halfway is not "already at step 2 of 2"
    assert "already at step" not in capsys.readouterr().out
    wa, wb = _weights(straight), _weights(resumed)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # finished: said in GRPO's steps, not the optimizer's "already at step 4 of 4" (μ = 2 a step)
    grpo(_cfg(micro_checkpoint, tmp_path / "a", steps=2, mu=2, resume=True))
    assert "grpo: checkpoint already at step 2 of 2; nothing to train" in capsys.readouterr().out
    init = _weights(micro_checkpoint)
    assert any(not torch.equal(init[k], wa[k]) for k in wa)  # training did move the weights
    ra = [r for r in read_metrics(tmp_path / "a", "grpo") if "reward" in r]
    rb = [r for r in read_metrics(tmp_path / "b", "grpo") if "reward" in r]
    assert [r["step"] for r in rb] == [1, 2]
    # what the report reads as one run of 2 steps, its wall time the two processes' together
    events = [(r["event"], r["step"]) for r in read_metrics(tmp_path / "b", "grpo") if r.get("event")]
    assert events == [("start", 0), ("model", 0), ("end", None), ("resume", None), ("end", None)]
    # the checkpoint it started from, which the report reads GRPO's gain from
    start = next(r for r in read_metrics(tmp_path / "b", "grpo") if r.get("event") == "start")
    assert start["init"] == micro_checkpoint
    assert start["precision"] == "fp32"  # the report's stage table names it, as pretraining's
    # the resume point in GRPO's steps (its records' count), not the optimizer's updates (μ = 2 per step)
    resume = next(r for r in read_metrics(tmp_path / "b", "grpo") if r.get("event") == "resume")
    assert resume["from_step"] == 1
    # a resume with other rollouts or objective would go on as another run: refused, nothing written
    before = (tmp_path / "b" / "grpo" / "model.safetensors").read_bytes()
    for change, flag in (
        ({"group_size": 8}, "--group-size: 4"),
        ({"loss": "dapo"}, "--loss: "),
        ({"tasks": ["comparison"]}, "--task: "),  # the flag, not the field's name
        ({"warmup_steps": 2}, "--warmup-steps: "),
    ):
        with pytest.raises(ValueError, match=flag):
            grpo(_cfg(micro_checkpoint, tmp_path / "b", steps=3, mu=2, resume=True, **change))
    assert (tmp_path / "b" / "grpo" / "model.safetensors").read_bytes() == before
    from nanoseek.report import RunMetrics

    m = RunMetrics(tmp_path / "b")
    assert m.steps("grpo", "reward")[0] == [1, 2] and m.wall_time("grpo") > 0
    # the rollouts' prompt and completion tokens, a running total across the resume too: the report's
    # GRPO row showed "–" tokens
    assert [r["tokens"] for r in rb] == [r["tokens"] for r in ra] and 0 < ra[0]["tokens"] < ra[1]["tokens"]
    assert m.total("grpo", "tokens") == ra[1]["tokens"]
    for key in ("reward", "response_length", "accuracy", "format_rate"):
        assert ra[1][key] == rb[1][key]
    # the collapse guard's baseline (the first step's length) goes on from the first process
    from nanoseek.checkpoint import load_train_state

    history = load_train_state(resumed)[1]["extra"]["history"]
    assert history["init_length"] == ra[0]["response_length"] == rb[0]["response_length"]
    # μ = 2: the second update's ratio is to π_old, the policy that sampled, no longer 1
    assert all(r["ratio_mean"] != pytest.approx(1.0, abs=1e-5) for r in ra)
    for key in ("entropy", "clip_frac", "rollout_tok_s", "update_tok_s", "loss", "groups_with_signal"):
        assert key in ra[1]


def test_a_jsonl_task_larger_than_the_train_pool_says_how_much_is_drawn(micro_checkpoint, tmp_path, capsys):
    """A user's file of more training problems than --train-pool (2048) was cut to a fixed draw of them,
    the rest never trained on, and nothing said so; a file within the pool says nothing."""
    import json

    from nanoseek.train.grpo import grpo

    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{i}+1?", "answer": i + 1, "split": "train"}) + "\n" for i in range(6))
    )
    grpo(
        _cfg(micro_checkpoint, tmp_path / "a", tasks=[f"jsonl:{path}"], language=None, steps=1, train_pool=4)
    )
    assert (
        f"grpo: jsonl:{path}: drawing from 4 of its 6 training problems (--train-pool)"
        in capsys.readouterr().out
    )
    grpo(
        _cfg(micro_checkpoint, tmp_path / "b", tasks=[f"jsonl:{path}"], language=None, steps=1, train_pool=6)
    )
    assert "--train-pool" not in capsys.readouterr().out


def test_a_resume_refuses_a_jsonl_task_whose_file_changed(micro_checkpoint, tmp_path) -> None:
    """Problems added to (or edited in) a jsonl: task's file since the run started made other pools, and
    a --resume drew other prompts than the run it continued, without a word (sft --data refuses it)."""
    import dataclasses
    import json

    from nanoseek.train.grpo import grpo

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(8)))
    cfg = _cfg(micro_checkpoint, tmp_path / "out", tasks=[f"jsonl:{path}"], language=None, steps=1)
    grpo(cfg)
    grpo(dataclasses.replace(cfg, steps=2, resume=True))  # the same file: goes on
    with path.open("a") as f:
        f.write(json.dumps({"prompt": "9+1?", "answer": 10}) + "\n")
    with pytest.raises(
        ValueError, match=r"the training settings changed \(data_files: .*qa.jsonl \(\d+ bytes\)'\] -> "
    ):
        grpo(dataclasses.replace(cfg, steps=3, resume=True))


def test_a_time_budget_fills_its_seconds_and_a_resume_goes_on_with_what_was_left(
    micro_checkpoint, tmp_path, monkeypatch, capsys
) -> None:
    """`grpo --max-seconds`, as sft and distill take it (the Trainer's deadline): --steps is the first
    plan, refitted to the pace measured, and the run stops and saves once the budget is spent; a
    --resume of a run that spent it trains nothing more. GRPO had no wall-time budget at all."""
    import time

    from nanoseek.checkpoint import load_train_state
    from nanoseek.metrics import read_metrics
    from nanoseek.train import loop
    from nanoseek.train.grpo import grpo

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    step = loop.Trainer.step

    def timed_step(self, *args, **kwargs):  # 0.1 s an update, nothing else takes time
        now[0] += 0.1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "step", timed_step)
    ckpt = grpo(_cfg(micro_checkpoint, tmp_path, steps=5, max_seconds=1.0))
    rewards = [r for r in read_metrics(tmp_path, "grpo") if "reward" in r]
    assert 9 <= len(rewards) <= 11, len(rewards)  # 1 s at 0.1 s a step, not the 5 steps first planned
    assert "grpo: time budget of 1s spent at step" in capsys.readouterr().out
    saved = load_train_state(ckpt)[1]
    assert saved["extra"]["grpo_step"] == len(rewards) and saved["extra"]["seconds_spent"] >= 1.0
    grpo(_cfg(micro_checkpoint, tmp_path, steps=5, max_seconds=1.0, resume=True))
    assert len([r for r in read_metrics(tmp_path, "grpo") if "reward" in r]) == len(rewards)
    # in GRPO's steps: the Trainer's "checkpoint already at step 268 of 267" counted optimizer updates
    out = capsys.readouterr().out
    assert f"grpo: --max-seconds 1 spent at step {len(rewards)}; nothing to train" in out
    assert "already at step" not in out
    with pytest.raises(ValueError, match="--max-seconds must be a finite number > 0"):
        _cfg(micro_checkpoint, tmp_path, max_seconds=float("nan")).validate()


def test_an_interrupted_run_leaves_no_progress_bar_open(micro_checkpoint, tmp_path) -> None:
    """A notebook keeps an interrupted cell's traceback, and with it the bar: left open, it pushed every
    later bar of the session down a line, which a notebook draws as a new line per redraw."""
    from tqdm.auto import tqdm

    from nanoseek.train.grpo import grpo

    def interrupt(step: int, steps: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as kept:  # holds the traceback, as IPython's sys.last_traceback
        grpo(_cfg(micro_checkpoint, tmp_path, progress=True), on_step=interrupt)
    assert kept.traceback and not [bar for bar in tqdm._instances if bar.desc.startswith("grpo")]


def test_threads_asked_of_grpo_are_given_back_after_it(micro_checkpoint, tmp_path) -> None:
    """torch's thread count is the process's: a notebook went on at GRPO's --threads after it."""
    from nanoseek.train.grpo import grpo

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grpo(_cfg(micro_checkpoint, tmp_path, steps=1, threads=1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_grpo_writes_tensorboard_and_a_fresh_run_replaces_the_earlier_ones(
    micro_checkpoint, tmp_path
) -> None:
    """--tensorboard was pretrain's alone; GRPO logs through `StepLog` as the other stages, its events
    in RUN/tensorboard/grpo/, an earlier run's gone at a fresh run's first step (not drawn under it)."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from nanoseek.train.grpo import grpo

    def steps() -> list[int]:
        events = accumulator.EventAccumulator(str(tmp_path / "tensorboard" / "grpo"))
        events.Reload()
        return [e.step for e in events.Scalars("grpo/reward")]

    grpo(_cfg(micro_checkpoint, tmp_path, steps=2, tensorboard=True))
    assert steps() == [1, 2]
    grpo(_cfg(micro_checkpoint, tmp_path, steps=1, tensorboard=True))
    assert steps() == [1]


def test_every_rollout_request_samples_its_own_stream(micro_checkpoint, tmp_path, monkeypatch) -> None:
    """No two requests of a run, the probe's included, share a random stream: with the engine's seed + i
    rule and a seed per step, request i at step s+1 replayed request i+1 at step s (the same completion
    when the same problem came back), and the probe's seed -1 is Python's seed 1 (two of a group alike)."""
    import nanoseek.evaluate as evaluate
    from nanoseek.train.grpo import grpo

    real = evaluate.engine_generate
    streams: list[int] = []
    steps_prompts: list[set] = []

    def spy(engine, prompts, *, seed=None, seeds=None, **kw):
        assert seeds is not None or seed is not None  # reproducible from --seed
        steps_prompts.append({tuple(p) for p in prompts})
        # the engine's rule; random.Random(n) seeds with abs(n)
        streams.extend(
            abs(s) for s in (seeds if seeds is not None else [seed + i for i in range(len(prompts))])
        )
        return real(engine, prompts, seed=seed, seeds=seeds, **kw)

    monkeypatch.setattr(evaluate, "engine_generate", spy)
    grpo(_cfg(micro_checkpoint, tmp_path, steps=3, task_sampling="unsolved", probe_prompts=2))
    assert len(streams) == 2 * 4 + 3 * 2 * 4  # the probe's 2 problems x G, then 3 steps of P x G
    assert len(set(streams)) == len(streams)
    # and every step draws its own problems (of 64): not the first step's again and again
    assert len({frozenset(p) for p in steps_prompts[1:]}) == 3


def test_grpo_keeps_the_routing_bias_unless_asked(micro_checkpoint, tmp_path) -> None:
    from nanoseek.train.grpo import grpo

    def biases(ckpt) -> dict[str, torch.Tensor]:
        return {k: v for k, v in _weights(ckpt).items() if k.endswith("e_score_correction_bias")}

    init = biases(micro_checkpoint)
    assert init
    frozen = biases(grpo(_cfg(micro_checkpoint, tmp_path / "frozen", steps=2)))
    assert all(torch.equal(init[k], frozen[k]) for k in init)
    # one step: over two, a sign update can land back where it started (loads above the mean, then below)
    moved = biases(grpo(_cfg(micro_checkpoint, tmp_path / "moved", steps=1, bias_update_speed=0.01)))
    assert any(not torch.equal(init[k], moved[k]) for k in init)


def test_the_step_that_ends_a_diverged_grpo_run_is_in_metrics_jsonl(
    micro_checkpoint, tmp_path, nan_losses
) -> None:
    """As pretrain's and SFT's: the GRPO step whose update the divergence error names is logged, skipped,
    with its rollouts' figures; metrics.jsonl ended at the step before."""
    from nanoseek.metrics import read_metrics
    from nanoseek.train import TrainingDiverged
    from nanoseek.train.grpo import grpo

    with pytest.raises(TrainingDiverged, match="optimizer steps 1-2"):
        grpo(_cfg(micro_checkpoint, tmp_path, steps=4))
    recs = [r for r in read_metrics(tmp_path, "grpo") if "reward" in r]
    assert [(r["step"], r["skipped"]) for r in recs] == [(1, True), (2, True)]
    assert recs[-1]["loss"] == "nan" and "reward" in recs[-1]  # (JSON has no NaN)


def test_a_bad_reward_spec_is_refused_before_the_model_loads() -> None:
    """Said by the config's check, not after a Hub download (offline: hidden by the download's error)."""
    from nanoseek.train.grpo import GRPOConfig, grpo

    for spec, msg in (
        ("accuracy:1,speed:2", "unknown reward 'speed'"),
        ("no_such_module:f", "cannot import"),
    ):
        with pytest.raises(ValueError, match=msg):
            grpo(GRPOConfig(init="nobody/no-such-model", tasks=["arithmetic"], reward=spec))


def test_grpo_with_a_custom_reward_part_and_its_resume_check(micro_checkpoint, tmp_path, monkeypatch) -> None:
    """A user's function by file path trains on worker threads, is logged as its own part, and is
    recorded by its reference: a resume that names another function is refused."""
    from nanoseek.metrics import read_metrics
    from nanoseek.train.grpo import grpo

    (tmp_path / "mine.py").write_text(
        "def length(completion, answer, problem):\n    return len(completion) / 10\n\n"
        "def other(completion, answer, problem):\n    return 0.0\n"
    )
    monkeypatch.chdir(tmp_path)
    grpo(
        _cfg(
            micro_checkpoint,
            tmp_path / "run",
            steps=1,
            reward="language:1,./mine.py:length:0.1",
            reward_workers=2,
        )
    )
    rec = next(r for r in read_metrics(tmp_path / "run", "grpo") if "reward" in r)
    assert rec["reward_./mine.py:length"] > 0
    assert rec["reward"] == pytest.approx(rec["reward_language"] + 0.1 * rec["reward_./mine.py:length"])
    with pytest.raises(ValueError, match="--reward: 'language:1,./mine.py:length:0.1' -> "):
        grpo(
            _cfg(
                micro_checkpoint,
                tmp_path / "run",
                steps=2,
                reward="language:1,./mine.py:other:0.1",
                resume=True,
            )
        )
    grpo(
        _cfg(
            micro_checkpoint, tmp_path / "run", steps=2, reward="language:1,./mine.py:length:0.1", resume=True
        )
    )


def test_grpo_with_kl_penalty_stays_finite(micro_checkpoint, tmp_path) -> None:
    from nanoseek.metrics import read_metrics
    from nanoseek.train.grpo import grpo

    grpo(_cfg(micro_checkpoint, tmp_path, steps=3, beta=0.1, mu=2, lr=3e-3))
    recs = [r for r in read_metrics(tmp_path, "grpo") if "reward" in r]
    assert len(recs) == 3
    kls = [r["kl"] for r in recs if "kl" in r]
    assert kls and all(isinstance(k, float) and math.isfinite(k) and k >= 0 for k in kls)


def test_a_resume_keeps_the_kl_reference_the_run_started_from(micro_checkpoint, tmp_path) -> None:
    """With β > 0 a resume re-reads π_ref from --init: another --init (a later checkpoint, to go on from
    the latest weights) would measure the KL to a later policy, silently. Refused, as another objective
    is; and --init may not be the run's own checkpoint, which its saves overwrite."""
    import shutil

    from nanoseek.train.grpo import grpo

    ckpt = grpo(_cfg(micro_checkpoint, tmp_path / "kl", steps=1, beta=0.1))
    later = shutil.copytree(ckpt, tmp_path / "later")
    with pytest.raises(ValueError, match="--init, the KL reference: "):
        grpo(_cfg(str(later), tmp_path / "kl", steps=2, beta=0.1, resume=True))
    with pytest.raises(ValueError, match="own checkpoint directory"):  # said before the model loads
        grpo(_cfg(str(ckpt), tmp_path / "kl", steps=2, beta=0.1, resume=True))
    grpo(_cfg(micro_checkpoint, tmp_path / "kl", steps=2, beta=0.1, resume=True))


def test_update_statistics_are_means_over_the_mu_updates(micro_checkpoint, tmp_path, monkeypatch) -> None:
    """With μ > 1 a step's loss, KL, clip fractions and ratio are the means over its μ updates (TRL's
    and PPO's convention, and sft_mix_loss's), not the last update's: the first update's ratio is 1, so
    the last alone overstates the clipping; grad_norm and lr are the last update's."""
    from nanoseek.metrics import read_metrics
    from nanoseek.train.grpo import grpo
    from nanoseek.train.loop import Trainer

    real = Trainer.step
    updates: list[dict] = []

    def step(self, loss_fn, accumulation=1):
        updates.append(real(self, loss_fn, accumulation))
        return updates[-1]

    monkeypatch.setattr(Trainer, "step", step)
    grpo(_cfg(micro_checkpoint, tmp_path, steps=2, mu=3, beta=0.1, lr=3e-3))
    recs = [r for r in read_metrics(tmp_path, "grpo") if "reward" in r]
    assert len(updates) == 2 * 3
    for rec, ups in zip(recs, (updates[:3], updates[3:]), strict=True):
        for key in ("loss", "kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean"):
            assert rec[key] == pytest.approx(sum(u[key] for u in ups) / 3), key
        assert rec["grad_norm"] == ups[-1]["grad_norm"] and rec["lr"] == ups[-1]["lr"]
    assert any(r["clip_frac"] > 0 for r in recs)


def test_old_and_reference_logprobs_are_at_the_rollout_temperature(micro_checkpoint, tmp_path) -> None:
    """π_old (μ > 1) and π_ref score the completions at the temperature they were sampled at, as the
    policy's log-probs are: with lr ~0 the policy, π_old and π_ref are one model, so every update's
    ratio is 1 (nothing clipped) and the KL is 0."""
    from nanoseek.metrics import read_metrics
    from nanoseek.train.grpo import grpo

    grpo(_cfg(micro_checkpoint, tmp_path, steps=1, mu=2, beta=0.1, lr=1e-12, temperature=0.7))
    (rec,) = [r for r in read_metrics(tmp_path, "grpo") if "reward" in r]
    assert rec["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert rec["clip_frac"] == 0.0
    assert rec["kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_step_without_signal_makes_no_update_and_draws_its_task_less(micro_checkpoint, tmp_path) -> None:
    """A random model never answers right: every group's rewards are equal (zero advantage). With β = 0
    the step makes no update (logged as no_signal) and --task-sampling signal lowers the task's share by
    DECAY per group (P = 2 groups: 0.8², kept for a resume); with β > 0 the KL term still updates."""
    from nanoseek.checkpoint import load_train_state
    from nanoseek.metrics import read_metrics
    from nanoseek.train.grpo import grpo

    kw = dict(steps=1, reward="accuracy:1", task_sampling="signal")
    ckpt = grpo(_cfg(micro_checkpoint, tmp_path / "a", **kw))
    (rec,) = [r for r in read_metrics(tmp_path / "a", "grpo") if "reward" in r]
    assert rec["no_signal"] and rec["groups_with_signal"] == 0.0 and "entropy" not in rec
    init, after = _weights(micro_checkpoint), _weights(ckpt)
    assert all(torch.equal(init[k], after[k]) for k in init)
    history = load_train_state(ckpt)[1]["extra"]["history"]
    assert history["task_signal"] == {"arithmetic": pytest.approx(0.8**2)}
    grpo(_cfg(micro_checkpoint, tmp_path / "kl", beta=0.1, **kw))
    (rec,) = [r for r in read_metrics(tmp_path / "kl", "grpo") if "reward" in r]
    assert "no_signal" not in rec and rec["kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_step_whose_every_completion_was_cut_says_so_not_no_signal(micro_checkpoint, tmp_path, capsys):
    """--mask-truncated with a --max-new-tokens no completion ends within: the groups carry signal, but
    every sample is left out of the loss. The step makes no update and says why; it was logged as
    no_signal (the bar's "no signal") beside a groups_with_signal of 1, though the cap was the cause."""
    from nanoseek.metrics import read_metrics
    from nanoseek.train.grpo import grpo

    for beta in (0.0, 0.1):  # with β > 0 the KL term alone would have trained every sample
        run = tmp_path / f"b{beta}"
        ckpt = grpo(_cfg(micro_checkpoint, run, steps=1, mask_truncated=True, beta=beta))
        (rec,) = [r for r in read_metrics(run, "grpo") if "reward" in r]
        assert rec["truncated_rate"] == 1.0 and rec["groups_with_signal"] > 0
        assert rec["all_truncated"] and "no_signal" not in rec and "entropy" not in rec
        assert "--mask-truncated leaves those out of the loss" in capsys.readouterr().out
        init, after = _weights(micro_checkpoint), _weights(ckpt)
        assert all(torch.equal(init[k], after[k]) for k in init)


def test_checkpoint_cadence_and_stop_on_collapse_after_consecutive_bad_steps(
    micro_checkpoint, tmp_path, monkeypatch, capsys
) -> None:
    """--checkpoint-every counts GRPO steps; --stop-on-collapse stops after --collapse-patience
    *consecutive* collapsed steps (a healthy step resets the count) and saves where it stopped; its
    summary counts the steps it ran (it said 6 steps in the seconds of 4)."""
    import nanoseek.train.grpo as grpo_mod
    from nanoseek.metrics import read_metrics
    from nanoseek.train.loop import Trainer

    bad = iter([True, False, True, True, False, False])  # steps 1..6: collapsed at 1, 3 and 4
    monkeypatch.setattr(
        grpo_mod, "collapse_warnings", lambda *a, **k: ["entropy collapsed"] if next(bad) else []
    )
    real_save, saved = Trainer.save, []

    def save(self, extra_state=None):
        saved.append(extra_state["grpo_step"])
        return real_save(self, extra_state)

    monkeypatch.setattr(Trainer, "save", save)
    grpo_mod.grpo(
        _cfg(
            micro_checkpoint,
            tmp_path,
            steps=6,
            checkpoint_every=3,
            stop_on_collapse=True,
            collapse_patience=2,
        )
    )
    recs = [r for r in read_metrics(tmp_path, "grpo") if "reward" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]  # stopped at the second bad step in a row
    assert [bool(r.get("collapse_warning")) for r in recs] == [True, False, True, True]
    assert saved == [3, 4]  # the cadence's, then where it stopped
    assert "grpo: 4 steps in " in capsys.readouterr().out
    # the count goes on across a resume: stopped at the same step as the run in one go
    bad = iter([True, False, True, True])
    kw = dict(stop_on_collapse=True, collapse_patience=2)
    grpo_mod.grpo(_cfg(micro_checkpoint, tmp_path / "r", steps=3, **kw))
    grpo_mod.grpo(_cfg(micro_checkpoint, tmp_path / "r", steps=6, resume=True, **kw))
    assert [r["step"] for r in read_metrics(tmp_path / "r", "grpo") if "reward" in r] == [1, 2, 3, 4]


def test_config_errors(micro_checkpoint, tmp_path) -> None:
    from nanoseek.train.grpo import grpo

    with pytest.raises(ValueError, match="group-size"):
        grpo(_cfg(micro_checkpoint, tmp_path, group_size=1))
    with pytest.raises(ValueError, match="loss"):
        grpo(_cfg(micro_checkpoint, tmp_path, loss="ppo"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        grpo(_cfg(str(tmp_path / "nowhere"), tmp_path))
    for temperature in (0.0, 1e-6):  # the engine decodes greedily below GREEDY_BELOW: G copies, no signal
        with pytest.raises(ValueError, match="temperature must be >= 1e-05"):
            grpo(_cfg(micro_checkpoint, tmp_path, temperature=temperature))
    # fewer training problems than a step draws distinct prompts: named, not random.sample's traceback
    with pytest.raises(ValueError, match="only 1 training problems for --batch-prompts 2"):
        grpo(_cfg(micro_checkpoint, tmp_path / "small", train_pool=1))


def test_a_problem_the_context_cannot_hold_is_named_before_the_first_step(micro_checkpoint, tmp_path) -> None:
    """A JSONL problem longer than the model's context ended the run at the step that drew it (hours in,
    nothing saved since the last checkpoint) with the engine's "prompt has N tokens", naming no problem."""
    import json

    from nanoseek.train.grpo import grpo

    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"{i}+1?", "answer": i + 1} for i in range(4)]
    rows.append({"prompt": "long question: " + "1+1 " * 800, "answer": 2})
    path.write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"1 problem leaves no room to answer in the model's context of 1024 "
                       r"tokens: \S+ 'long question: 1\+1 1\+1 1\+1 1\+1' \(\d{4} tokens\)"):  # fmt: skip
        grpo(_cfg(micro_checkpoint, tmp_path / "out", tasks=[f"jsonl:{path}"], language=None, steps=50))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # said before the run's first record


def test_a_bad_line_of_a_jsonl_task_is_named_before_the_model_loads(micro_checkpoint, tmp_path, monkeypatch):
    """A jsonl: task's bad line was found once the policy had loaded (minutes for a large --init, and a
    Hub name's whole download first)."""
    import json

    import nanoseek.checkpoint
    from nanoseek.train.grpo import grpo

    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps({"prompt": "1+1?", "answer": 2}) + "\n" + json.dumps({"question": "2+2?"}) + "\n"
    )
    monkeypatch.setattr(nanoseek.checkpoint, "resolve_checkpoint", lambda *a, **k: pytest.fail("read --init"))
    monkeypatch.setattr(nanoseek.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=r"qa.jsonl:2: each line needs a non-empty string \"prompt\""):
        grpo(_cfg(micro_checkpoint, tmp_path / "out", tasks=[f"jsonl:{path}"], language=None))


def test_grpo_refuses_a_tokenizer_larger_than_the_models_vocabulary(narrow_checkpoint, tmp_path) -> None:
    """Rollouts from a model that has no rows for some of its tokenizer's ids: refused at the start."""
    from nanoseek.train.grpo import grpo

    with pytest.raises(ValueError, match="tokens but the model's vocab_size .* use the tokenizer"):
        grpo(_cfg(narrow_checkpoint, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_prompt_sampler_uniform_draws_distinct_problems_from_the_pool() -> None:
    import random

    from nanoseek.train.grpo import PromptSampler

    pools = {"a": [("a", i) for i in range(5)], "b": [("b", i) for i in range(3)]}
    flat = pools["a"] + pools["b"]
    got = PromptSampler(pools, "uniform").draw(random.Random(7), 6)
    assert got == [flat[i] for i in random.Random(7).sample(range(8), 6)]  # the pooled draw, unchanged
    assert len(set(got)) == 6


def test_prompt_sampler_draws_tasks_without_signal_less_and_keeps_its_state() -> None:
    """A task whose groups all had equal rewards (zero advantage) fades to the floor, not to zero."""
    import random

    from nanoseek.train.grpo import PromptSampler

    pools = {"easy": [("easy", i) for i in range(100)], "hard": [("hard", i) for i in range(100)]}
    sampler = PromptSampler(pools, "signal")
    rng = random.Random(0)
    for _ in range(20):
        batch = sampler.draw(rng, 8)
        adv = torch.zeros(len(batch), 4)
        for row, (name, _) in zip(adv, batch, strict=True):
            if name == "easy":
                row[:2], row[2:] = 1.0, -1.0  # mixed rewards: signal
        sampler.observe([name for name, _ in batch], adv.flatten(), group_size=4)
    assert sampler.signal["hard"] < 0.05 < 0.95 < sampler.signal["easy"]
    drawn = [name for name, _ in sampler.draw(random.Random(1), 400 // 4)]
    share_hard = drawn.count("hard") / len(drawn)
    assert 0.02 < share_hard < 0.2  # ≈ floor / (floor + 1 + floor), never zero
    resumed = PromptSampler(pools, "signal", dict(sampler.signal))
    assert resumed.draw(random.Random(2), 8) == sampler.draw(random.Random(2), 8)


def test_a_group_with_signal_counts_though_a_member_sits_at_its_mean() -> None:
    """A group of rewards 1.2, 0, 0.6, 0.6 (accuracy + format) has mean 0.6: two members get advantage 0,
    the group still carries signal. The running share moves by (1 - DECAY) toward 1 for it, toward 0
    for a group of equal rewards: 0.8 · 0.5 + 0.2 = 0.6, then 0.8 · 0.6 = 0.48."""
    from nanoseek.train.grpo import PromptSampler

    sampler = PromptSampler({"t": [("t", 0)]}, "signal", {"t": 0.5})
    sampler.observe(["t"], group_advantages(torch.tensor([1.2, 0.0, 0.6, 0.6]), 4), group_size=4)
    assert sampler.signal["t"] == pytest.approx(0.6)
    sampler.observe(["t"], group_advantages(torch.tensor([0.6, 0.6, 0.6, 0.6]), 4), group_size=4)
    assert sampler.signal["t"] == pytest.approx(0.48)


def test_prompt_sampler_draws_a_task_without_signal_at_the_floors_share() -> None:
    """Each prompt's task is drawn with weight FLOOR + signal: a task at signal 0 beside one at 1 gets
    0.1 / (0.1 + 1.1) = 1/12 of the prompts, not none."""
    import random

    from nanoseek.train.grpo import PromptSampler

    pools = {"none": [("none", i) for i in range(10)], "all": [("all", i) for i in range(10)]}
    sampler = PromptSampler(pools, "signal", {"none": 0.0, "all": 1.0})
    rng = random.Random(0)
    drawn = [sampler.draw(rng, 1)[0][0] for _ in range(3000)]
    assert drawn.count("none") / len(drawn) == pytest.approx(1 / 12, abs=0.02)


def test_masked_truncation_is_blamed_only_for_samples_that_carried_signal() -> None:
    """A step that trained nothing says "all truncated" only if --mask-truncated left out a sample with
    an advantage (β = 0); a left-out sample of a group of equal rewards would have trained nothing
    either, so that step had no signal."""
    from nanoseek.train.grpo import Rollout, _masked_out_by_truncation

    keep = torch.tensor([False, True, True, True])

    def rollout(adv: list[float]) -> Rollout:
        return Rollout(
            [[1]] * 4, [[2]] * 4, torch.zeros(4), torch.tensor(adv), keep, {"skipped_samples": 0.0}
        )

    assert _masked_out_by_truncation(rollout([0.5, -0.5, 0.5, -0.5]), beta=0.0)
    assert not _masked_out_by_truncation(rollout([0.0, 0.0, 0.0, 0.0]), beta=0.0)
    assert _masked_out_by_truncation(rollout([0.0, 0.0, 0.0, 0.0]), beta=0.04)  # the KL term trains it


def test_prompt_sampler_signal_always_draws_batch_prompts() -> None:
    """A task with fewer problems than the draw gives it hands the rest to the others: --batch-prompts
    prompts every step (a 3-problem family drawn 5 times once made a step of 6), the same draw as before
    whenever no task runs out."""
    import random

    from nanoseek.train.grpo import PromptSampler

    pools = {"small": [("small", i) for i in range(3)], "big": [("big", i) for i in range(100)]}
    sampler = PromptSampler(pools, "signal")
    for seed in range(50):
        batch = sampler.draw(random.Random(seed), 8)
        assert len(batch) == 8 and len(set(batch)) == 8
    roomy = {"a": [("a", i) for i in range(100)], "b": [("b", i) for i in range(100)]}
    rng = random.Random(3)
    names = rng.choices(["a", "b"], weights=[1.1, 1.1], k=8)
    expect = [("a", i) for i in rng.sample(range(100), names.count("a"))]
    expect += [("b", i) for i in rng.sample(range(100), names.count("b"))]
    assert PromptSampler(roomy, "signal").draw(random.Random(3), 8) == expect


def test_prompt_sampler_leaves_out_solved_tasks_but_never_all() -> None:
    import random

    from nanoseek.train.grpo import PromptSampler

    pools = {"solved": [("solved", i) for i in range(50)], "open": [("open", i) for i in range(50)]}
    sampler = PromptSampler(pools, "unsolved")
    assert sampler.leave_out({"solved", "unknown"}, keep_at_least=8) == ["solved"]
    assert {name for name, _ in sampler.draw(random.Random(0), 40)} == {"open"}
    for names, keep in (({"solved", "open"}, 8), ({"solved"}, 51)):  # none, or too few, left to draw
        everything = PromptSampler(pools, "unsolved")
        assert everything.leave_out(names, keep_at_least=keep) == []
        assert {name for name, _ in everything.draw(random.Random(0), 40)} == {"solved", "open"}


def test_probe_pass_rates_scores_each_task_on_its_training_problems(micro_checkpoint, monkeypatch) -> None:
    """The probe's verdicts per task: here an engine stand-in that answers every comparison right and
    every arithmetic problem wrong, G times each."""
    from types import SimpleNamespace

    import nanoseek.evaluate as evaluate
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.grpo import probe_pass_rates

    tok = load_tokenizer(micro_checkpoint)
    pools = {
        name: [(get_task(name), p) for p in get_task(name).problems("train", 10, seed=0, language="en")]
        for name in ("comparison", "arithmetic")
    }
    by_prompt = {tuple(evaluate.chat_prompt_ids(tok, p.prompt)): (t, p) for v in pools.values() for t, p in v}
    seen: list[str] = []

    def fake_generate(engine, prompt_ids, **kw):
        outs = []
        for ids in prompt_ids:
            task, prob = by_prompt[tuple(ids)]
            seen.append(task.name)
            answer = prob.answer if task.name == "comparison" else str(int(prob.answer) + 1)
            outs.append(SimpleNamespace(token_ids=tok.encode(f"ok</think>\n{answer}"), finish_reason="stop"))
        return outs

    monkeypatch.setattr(evaluate, "engine_generate", fake_generate)
    cfg = _cfg(micro_checkpoint, "unused", group_size=3, probe_prompts=4, reward="accuracy:1")
    rates = probe_pass_rates(cfg, None, tok, pools, stop=[tok.eos_token_id])
    assert rates == {"comparison": 1.0, "arithmetic": 0.0}
    assert seen.count("comparison") == seen.count("arithmetic") == 4 * 3


def test_the_probe_before_the_first_step_shows_its_progress(micro_checkpoint, capsys) -> None:
    """The probe samples probe_prompts x G of every task (the cpu preset's: 4 x 8 of eight, four steps'
    rollouts) before GRPO's bar appears: it showed nothing, and a --no-progress run still shows nothing."""
    import dataclasses
    from types import SimpleNamespace

    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.grpo import probe_pass_rates

    tok = load_tokenizer(micro_checkpoint)
    task = get_task("comparison")
    pools = {"comparison": [(task, p) for p in task.problems("train", 10, seed=0, language="en")]}

    class Engine:
        def generate_detailed(self, prompts, params, on_finish=None):
            for i in range(len(prompts) if on_finish else 0):
                on_finish(i)
            return [SimpleNamespace(token_ids=[tok.eos_token_id], finish_reason="stop") for _ in prompts]

    cfg = _cfg(micro_checkpoint, "unused", group_size=3, probe_prompts=4, reward="accuracy:1", progress=True)
    probe_pass_rates(cfg, Engine(), tok, pools, stop=[tok.eos_token_id])
    assert "grpo probe" in capsys.readouterr().err
    probe_pass_rates(dataclasses.replace(cfg, progress=False), Engine(), tok, pools, stop=[tok.eos_token_id])
    assert "grpo probe" not in capsys.readouterr().err


def _record_draws(monkeypatch) -> list[str]:
    """The task of every prompt GRPO draws, in order."""
    import nanoseek.train.grpo as grpo_mod

    drawn: list[str] = []
    real_draw = grpo_mod.PromptSampler.draw

    def draw(self, rng, n):
        batch = real_draw(self, rng, n)
        drawn.extend(t.name for t, _ in batch)
        return batch

    monkeypatch.setattr(grpo_mod.PromptSampler, "draw", draw)
    return drawn


def test_grpo_unsolved_draws_only_what_the_probe_left_and_resumes_with_it(
    micro_checkpoint, tmp_path, monkeypatch
) -> None:
    import nanoseek.train.grpo as grpo_mod
    from nanoseek.metrics import read_metrics

    probes: list[int] = []

    def probe(cfg, engine, tok, pools, stop):
        probes.append(1)
        return {"arithmetic": 0.9, "comparison": 0.25, "countdown": 0.8}  # at --solved-above: not above

    monkeypatch.setattr(grpo_mod, "probe_pass_rates", probe)
    drawn = _record_draws(monkeypatch)
    kw = dict(tasks=["arithmetic", "comparison", "countdown"], task_sampling="unsolved")
    grpo_mod.grpo(_cfg(micro_checkpoint, tmp_path, steps=1, **kw))
    grpo_mod.grpo(_cfg(micro_checkpoint, tmp_path, steps=2, resume=True, **kw))
    assert probes == [1]  # measured once; the resumed run keeps the decision
    assert drawn and set(drawn) <= {"comparison", "countdown"}
    (rec,) = [r for r in read_metrics(tmp_path, "grpo") if r.get("event") == "probe"]
    assert rec["left_out"] == ["arithmetic"] and rec["pass_rates"]["comparison"] == 0.25
    with pytest.raises(ValueError, match="solved-above"):
        grpo_mod.grpo(_cfg(micro_checkpoint, tmp_path / "bad", solved_above=1.5, **kw))


def test_keep_tasks_are_drawn_however_solved_the_probe_finds_them(
    micro_checkpoint, tmp_path, monkeypatch
) -> None:
    """--keep-tasks: a family the probe finds solved stays in the unsolved draw (the speedrun keeps
    comparison, whose own groups hold it against `largest`'s shortcut); the others solved are left out."""
    import nanoseek.train.grpo as grpo_mod
    from nanoseek.metrics import read_metrics

    monkeypatch.setattr(grpo_mod, "probe_pass_rates", lambda *a: {"arithmetic": 0.9, "comparison": 0.95})
    drawn = _record_draws(monkeypatch)
    kw = dict(tasks=["arithmetic", "comparison"], task_sampling="unsolved", steps=1)
    grpo_mod.grpo(_cfg(micro_checkpoint, tmp_path, keep_tasks=["comparison"], **kw))
    assert drawn and set(drawn) == {"comparison"}
    (rec,) = [r for r in read_metrics(tmp_path, "grpo") if r.get("event") == "probe"]
    assert rec["left_out"] == ["arithmetic"] and rec["kept"] == ["comparison"]
    # without it both are solved: leaving both out would leave nothing to draw, so every task stays
    grpo_mod.grpo(_cfg(micro_checkpoint, tmp_path / "all", **kw))
    (rec,) = [r for r in read_metrics(tmp_path / "all", "grpo") if r.get("event") == "probe"]
    assert rec["left_out"] == [] and len(drawn) == 2 * 2
    with pytest.raises(ValueError, match="keep-tasks"):
        grpo_mod.grpo(_cfg(micro_checkpoint, tmp_path / "bad", keep_tasks=["sorting"], **kw))


def test_sft_mix_adds_the_supervised_loss_of_the_left_out_tasks(
    micro_checkpoint, tmp_path, monkeypatch
) -> None:
    """--sft-mix (PPO-ptx): every update adds w x the SFT loss on worked solutions of the tasks the probe
    left out, never of a task --sft-mix-tasks does not name (a verifier-only family)."""
    import nanoseek.train.grpo as grpo_mod
    from nanoseek.metrics import read_metrics

    monkeypatch.setattr(
        grpo_mod, "probe_pass_rates", lambda *a: {"arithmetic": 1.0, "comparison": 1.0, "countdown": 0.0}
    )
    mixed: list[list[str]] = []
    real_rows = grpo_mod.supervised_mix_rows

    def rows(tok, names, seed):
        mixed.append(list(names))
        return real_rows(tok, names, seed)

    monkeypatch.setattr(grpo_mod, "supervised_mix_rows", rows)
    real_at, at = grpo_mod.packed_batch_at, []

    def batch_at(rows, n, seed, index):
        at.append(index)
        return real_at(rows, n, seed, index)

    monkeypatch.setattr(grpo_mod, "packed_batch_at", batch_at)
    kw = dict(
        tasks=["arithmetic", "comparison", "countdown"], task_sampling="unsolved", steps=2, lr=1e-12, mu=2
    )
    grpo_mod.grpo(
        _cfg(micro_checkpoint, tmp_path / "mix", sft_mix=0.5, sft_mix_tasks=["arithmetic", "countdown"], **kw)
    )
    # left out and allowed; comparison left out but not allowed; countdown allowed but still drawn
    assert mixed == [["arithmetic"]]
    recs = [r for r in read_metrics(tmp_path / "mix", "grpo") if r.get("step") and not r.get("no_signal")]
    assert recs and all(r["sft_mix_loss"] > 0.1 for r in recs)  # a random model: far from the solutions
    # each of a step's μ = 2 updates takes the next rows of solutions, as SFT's steps do
    assert at == [2 * (r["step"] - 1) + u for r in recs for u in (0, 1)]
    # the logged loss is the policy-gradient loss plus the mix (lr ~0: one policy in both runs)
    grpo_mod.grpo(_cfg(micro_checkpoint, tmp_path / "plain", **kw))
    plain = [r for r in read_metrics(tmp_path / "plain", "grpo") if r.get("step") and not r.get("no_signal")]
    assert "sft_mix_loss" not in plain[0]
    expected = plain[0]["loss"] + 0.5 * recs[0]["sft_mix_loss"]  # weighted by --sft-mix
    assert recs[0]["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="sft-mix-tasks"):
        grpo_mod.grpo(_cfg(micro_checkpoint, tmp_path / "bad", sft_mix=1.0, sft_mix_tasks=["sorting"], **kw))


def test_reward_parts_are_averaged_over_the_samples_that_have_them(tmp_path, micro_checkpoint):
    # the code part exists only for problems with tests: a mixture with another task must not dilute it
    import json
    from types import SimpleNamespace

    from nanoseek.data.rewards import build_reward
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.grpo import GRPOConfig, _score_rollout

    path = tmp_path / "code.jsonl"
    path.write_text(
        json.dumps({"prompt": "Print 2n.", "tests": [{"input": "3", "output": "6"}], "split": "train"}) + "\n"
    )
    code, arith = get_task(f"jsonl:{path}"), get_task("arithmetic")
    ap = arith.problems("train", 1, seed=0, language="en")[0]
    tok = load_tokenizer(micro_checkpoint)
    texts = ["ok</think>\n```python\nprint(int(input())*2)\n```"] * 2 + [f"ok</think>\n{ap.answer}"] * 2
    outs = [SimpleNamespace(token_ids=tok.encode(t), finish_reason="stop") for t in texts]
    cfg = GRPOConfig(init="x", tasks=["a"], group_size=2)
    ro = _score_rollout(
        cfg,
        [(code, code.items[0]), (arith, ap)],
        [[1]] * 4,
        outs,
        tok,
        build_reward("accuracy:1,code:1"),
        [tok.eos_token_id],
    )
    assert ro.metrics["reward_code"] == pytest.approx(1.0)  # was 0.5
    assert ro.metrics["accuracy"] == pytest.approx(1.0)
    # a mixture's accuracy task by task (only the pooled figure was logged)
    assert ro.metrics[f"accuracy/{code.name}"] == 1.0 and ro.metrics[f"accuracy/{arith.name}"] == 1.0


def test_grpo_on_another_familys_checkpoint_rewards_its_answers(tmp_path, monkeypatch) -> None:
    """From a Qwen2.5-style checkpoint (ChatML: the prompt opens no think block) a right plain answer is
    rewarded and a wrong one is not (both got 0 for lacking a `</think>` the template never asked for:
    no signal, nothing learned); R1's format reward asks the model to open its think block itself."""
    import dataclasses

    import nanoseek.evaluate as ev
    from model_configs import chatml_checkpoint
    from nanoseek.data.tasks import get_task
    from nanoseek.metrics import read_metrics
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.grpo import grpo, pool_seed

    ck = chatml_checkpoint(tmp_path / "qwen")
    tok = load_tokenizer(ck)
    problems = get_task("arithmetic").problems("train", 64, seed=pool_seed(0), language="en", strict=False)
    answers = {tuple(ev.chat_prompt_ids(tok, p.messages)): p.answer for p in problems}
    completion = dataclasses.make_dataclass("C", ["token_ids", "finish_reason"])

    def fake_generate(engine, prompts, **kw):
        assert kw["stop_token_ids"] == list(tok.stop_token_ids)
        texts = [
            f"{answers[tuple(p)]}"
            if i % 4 == 0
            else f"<think>\nadd\n</think>\n{answers[tuple(p)]}"
            if i % 4 == 1
            else "7"
            for i, p in enumerate(prompts)
        ]
        return [completion(tok.encode(t) + [tok.eos_token_id], "stop") for t in texts]

    monkeypatch.setattr(ev, "engine_generate", fake_generate)
    grpo(_cfg(str(ck), tmp_path / "run", steps=1, reward="accuracy:1,format:0.2"))
    (rec,) = [r for r in read_metrics(tmp_path / "run", "grpo") if "reward" in r]
    assert rec["accuracy"] == pytest.approx(0.5) and rec["format_rate"] == pytest.approx(0.25)
    assert rec["reward"] == pytest.approx((1 + 1.2) / 4)


def test_a_task_named_twice_is_refused():
    """`--task arithmetic,arithmetic` put its pool in twice: one problem drawn twice in a step, where
    the docs promise distinct problems."""
    from nanoseek.train.grpo import GRPOConfig

    with pytest.raises(ValueError, match="--task names arithmetic more than once"):
        GRPOConfig(init="x", tasks=["arithmetic", "sorting", "arithmetic"]).validate()
    GRPOConfig(init="x", tasks=["arithmetic", "sorting"]).validate()


def test_a_max_batch_size_below_one_is_refused_before_loading():
    """`--max-batch-size 0` was refused by the engine only once the policy and reference had loaded;
    serve, eval (and distill) say it before."""
    from nanoseek.train.grpo import GRPOConfig

    with pytest.raises(ValueError, match="--max-batch-size must be >= 1, got 0"):
        GRPOConfig(init="x", tasks=["arithmetic"], max_batch_size=0).validate()
    GRPOConfig(init="x", tasks=["arithmetic"], max_batch_size=1).validate()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"beta": float("nan")}, "--beta must be >= 0 and finite"),  # trained with no KL, without a word
        ({"beta": float("inf")}, "--beta must be >= 0 and finite"),  # a NaN loss
        ({"bias_update_speed": float("nan")}, "--bias-update-speed must be >= 0 and finite"),
        ({"sft_mix": float("nan")}, "--sft-mix must be >= 0 and finite"),
        ({"checkpoint_every": -1}, "--checkpoint-every must be >= 0"),  # saved at every step
        ({"collapse_patience": 0}, "--collapse-patience must be >= 1"),  # stopped at step 1, no collapse
        ({"train_pool": -3}, "--train-pool must be >= 1"),  # "n must be >= 0" once the model had loaded
        ({"temperature": float("inf")}, "--temperature must be >= 1e-05 and finite"),  # after loading
        # the optimizer's: refused once the model had loaded (a Hub download, for --init Qwen/...)
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"weight_decay": -0.1}, "weight_decay and grad_clip must be >= 0"),
        ({"grad_clip": float("nan")}, "weight_decay and grad_clip must be >= 0"),
    ],
)
def test_settings_out_of_range_are_refused_by_flag(setting, message):
    from nanoseek.train.grpo import GRPOConfig

    with pytest.raises(ValueError, match=message):
        GRPOConfig(init="x", tasks=["arithmetic"], **setting).validate()


def test_the_warmup_is_cut_to_half_of_a_short_run():
    """As pretrain and SFT cut theirs: 20 warmup updates of a 4-step run trained every update at 5-20%
    of --lr. The warmup counts optimizer updates, μ per step."""
    from nanoseek.train.grpo import GRPOConfig

    def warmup(**kw):
        return GRPOConfig(init="x", tasks=["arithmetic"], warmup_steps=20, **kw).optim_config().warmup_steps

    assert warmup(steps=4) == 2
    assert warmup(steps=4, mu=3) == 6
    assert warmup(steps=100) == 20


@pytest.mark.parametrize("threads", [0, -1])
def test_threads_below_one_are_refused(threads):
    """`--threads 0` was ignored (torch's default) and `-1` ended in torch's traceback, where
    generate, chat and ablate refuse both."""
    from nanoseek.train.grpo import GRPOConfig

    with pytest.raises(ValueError, match="--threads must be >= 1"):
        GRPOConfig(init="x", tasks=["arithmetic"], threads=threads).validate()
    GRPOConfig(init="x", tasks=["arithmetic"], threads=1).validate()


def test_a_rollouts_code_runs_overlap_and_score_as_one_after_another(tmp_path, monkeypatch):
    """`_score_rollout` ran every completion's sandboxed program one after another (128 runs in series
    for 16 prompts x G = 8); it now scores through `score_pairs` on --reward-workers threads, with the
    rewards, verdicts and advantages of the serial run, each distinct program run once."""
    import json
    import threading
    from types import SimpleNamespace

    import nanoseek.data.tasks.answers as answers
    from nanoseek.data.rewards import build_reward
    from nanoseek.data.tasks import get_task
    from nanoseek.train.grpo import GRPOConfig, _score_rollout

    path = tmp_path / "code.jsonl"
    rows = [
        {"prompt": f"Print {k}n.", "tests": [{"input": "3", "output": str(3 * k)}] * 2} for k in (2, 3, 4)
    ]
    path.write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    task = get_task(f"jsonl:{path}")
    texts = [
        f"t</think>\n```python\nprint(int(input())*{k}{end})\n```"
        for k in (2, 3, 4)
        for end in ("+1", "", "+2", "")
    ]  # per group: two distinct wrong programs, and the right one twice
    outs = [SimpleNamespace(token_ids=[i], finish_reason="stop") for i in range(len(texts))]
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: texts[ids[0]])
    runs, running, overlapped = [], [0], threading.Event()
    lock = threading.Lock()

    def fake_run(code, tests, wait):
        with lock:
            runs.append(code)
            running[0] += 1
            if running[0] > 1:
                overlapped.set()
        if wait:
            overlapped.wait(10)  # serial scoring never starts a second program while this one runs
        with lock:
            running[0] -= 1
        ok = "+" not in code
        return (len(tests) if ok else 0), len(tests)

    def score(workers, wait):
        answers._cached_code_run.cache_clear()
        runs.clear()
        monkeypatch.setattr(answers, "run_code_tests", lambda code, tests: fake_run(code, tests, wait))
        cfg = GRPOConfig(init="x", tasks=["a"], group_size=4, reward_workers=workers)
        batch = [(task, p) for p in task.items]
        return _score_rollout(cfg, batch, [[1]] * 12, outs, tok, build_reward("accuracy:1,code:0.5"), [-1])

    parallel = score(4, wait=True)
    assert overlapped.is_set()
    parallel_runs = sorted(runs)
    serial = score(1, wait=False)
    assert sorted(runs) == parallel_runs and len(runs) == len(set(texts)) == 9  # each program once
    assert torch.equal(parallel.rewards, serial.rewards) and torch.equal(
        parallel.advantages, serial.advantages
    )
    assert parallel.metrics == serial.metrics and parallel.metrics["accuracy"] == 0.5
    assert parallel.rewards.tolist() == [0.0, 1.5, 0.0, 1.5] * 3  # in the completions' order
    answers._cached_code_run.cache_clear()


def test_reward_workers_default_to_the_cpus_the_cgroup_quota_allows(tmp_path, monkeypatch):
    """`docker --cpus 2` on a 64-core host: a step's sandboxed programs ran 64 at a time (the affinity
    mask's count), each throttled; the default is now the CPUs the quota allows."""
    import json
    import os
    from types import SimpleNamespace

    import nanoseek.data.rewards as rewards
    import nanoseek.data.tasks.answers as answers
    import nanoseek.perf as perf
    import nanoseek.train.grpo as grpo_module
    from nanoseek.data.rewards import build_reward
    from nanoseek.data.tasks import get_task

    (tmp_path / "cgroup").mkdir()
    (tmp_path / "cgroup" / "cpu.max").write_text("200000 100000\n")
    (tmp_path / "membership").write_text("0::/\n")
    monkeypatch.setattr(perf, "_PROC_CGROUP", tmp_path / "membership", raising=False)
    monkeypatch.setattr(perf, "_CGROUP_ROOT", tmp_path / "cgroup", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    workers = []
    score_pairs = rewards.score_pairs
    monkeypatch.setattr(
        rewards, "score_pairs", lambda f, ps, ts, n: workers.append(n) or score_pairs(f, ps, ts, 1)
    )
    path = tmp_path / "code.jsonl"
    path.write_text(
        json.dumps({"prompt": "Print 2n.", "tests": [{"input": "3", "output": "6"}], "split": "train"})
    )
    task = get_task(f"jsonl:{path}")
    texts = ["t</think>\n```python\nprint(int(input())*2)\n```"] * 2
    outs = [SimpleNamespace(token_ids=[i], finish_reason="stop") for i in range(2)]
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: texts[ids[0]])
    monkeypatch.setattr(answers, "run_code_tests", lambda code, tests: (len(tests), len(tests)))
    answers._cached_code_run.cache_clear()
    cfg = grpo_module.GRPOConfig(init="x", tasks=["a"], group_size=2)
    batch = [(task, p) for p in task.items]
    grpo_module._score_rollout(cfg, batch, [[1]] * 2, outs, tok, build_reward("accuracy:1"), [-1])
    answers._cached_code_run.cache_clear()
    assert workers == [2]


def test_a_sigint_saves_the_grpo_step_and_the_resume_ends_as_one_run(micro_checkpoint, tmp_path) -> None:
    """Ctrl-C during GRPO lost every step since the last checkpoint: its own loop now saves the step it
    stops at (the next one after the signal) and a --resume reaches the weights of a run never stopped."""
    import os
    import signal

    from nanoseek.train import TrainingInterrupted
    from nanoseek.train.grpo import grpo

    def ctrl_c_after_1(done: int, total: int) -> None:
        if done == 1:
            os.kill(os.getpid(), signal.SIGINT)

    straight = grpo(_cfg(micro_checkpoint, tmp_path / "a", steps=3, mu=2))
    with pytest.raises(TrainingInterrupted) as e:
        grpo(_cfg(micro_checkpoint, tmp_path / "b", steps=3, mu=2), on_step=ctrl_c_after_1)
    assert (e.value.step, e.value.exit_code) == (2, 130)  # GRPO's steps, not its μ = 2 updates each
    assert "at step 2 of 3" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = grpo(_cfg(micro_checkpoint, tmp_path / "b", steps=3, mu=2, resume=True))
    wa, wb = _weights(straight), _weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_out_it_cannot_write_is_refused_before_the_model_loads(tmp_path, monkeypatch) -> None:
    """`grpo --out` on a read-only disk (or under a file) was found at the first metrics record, once the
    policy (and its reference) had loaded."""
    import nanoseek.checkpoint
    from nanoseek.train.grpo import GRPOConfig, grpo

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(nanoseek.checkpoint, "resolve_checkpoint", lambda *a, **k: pytest.fail("read --init"))
    cfg = GRPOConfig(init="ck", tasks=["arithmetic"], out=str(tmp_path / "file" / "run"), reward_workers=1)
    with pytest.raises(
        ValueError, match=r"cannot write --out .*run \(.*file: Not a directory\); choose another"
    ):
        grpo(cfg)


# ------------------------------------------------------------------------------- property tests
# Each states what docs/r1.md says of the math and holds it against a brute-force loop written here.
_REWARD = st.one_of(
    st.integers(-8, 8).map(lambda k: k / 4),  # the usual rewards: accuracy, format, their sums
    st.floats(-100, 100, width=32),
)


def _reference_advantages(group: list[float], scale_by_std: bool, eps: float) -> list[float]:
    """DeepSeekMath §4.1.2: A_i = (r_i - mean(r)) / (std(r) + eps), the sample std; Dr. GRPO: the
    centering alone; a group of equal rewards (or holding a NaN or inf) carries no signal."""
    if len(set(group)) == 1 or not all(map(math.isfinite, group)):
        return [0.0] * len(group)
    mean, std = statistics.fmean(group), statistics.stdev(group)
    return [(r - mean) / (std + eps) if scale_by_std else r - mean for r in group]


@settings(max_examples=150)
@given(
    g=st.integers(2, 9),
    data=st.data(),
    scale_by_std=st.booleans(),
    eps=st.sampled_from([1e-4, 0.0]),
)
def test_group_advantages_are_the_formula_group_by_group(g, data, scale_by_std, eps) -> None:
    """Any rewards, any group size: each group's advantages are the formula's over that group alone,
    laid out prompt-major, [P * G] or [P, G] alike."""
    groups = data.draw(
        st.lists(st.lists(_REWARD | st.just(math.nan), min_size=g, max_size=g), min_size=1, max_size=4)
    )
    flat = torch.tensor([r for group in groups for r in group])
    adv = group_advantages(flat, g, scale_by_std=scale_by_std, eps=eps)
    assert adv.shape == flat.shape and adv.isfinite().all()
    assert torch.equal(group_advantages(flat.view(-1, g), g, scale_by_std, eps).flatten(), adv)
    for group, got in zip(groups, adv.view(-1, g).tolist(), strict=True):
        g32 = torch.tensor(group).tolist()  # as float32 holds them
        want = _reference_advantages(g32, scale_by_std, eps)
        finite = [r for r in g32 if math.isfinite(r)]
        # float32 rounding of the mean and std: a few ulps of the rewards' size, over the divisor
        spread = (
            statistics.stdev(g32) + eps if scale_by_std and len(set(g32)) > 1 and len(finite) == g else 1.0
        )
        tol = 1e-5 + 8 * 1.2e-7 * max(map(abs, finite), default=0.0) / spread
        assert got == pytest.approx(want, abs=tol)


@settings(max_examples=150)
@given(
    group=st.lists(st.integers(-8, 8).map(lambda k: k / 4), min_size=2, max_size=8),
    shift=st.integers(-40, 40).map(lambda k: k / 4),
    scale=st.sampled_from([0.25, 0.5, 2.0, 4.0, -1.0, -2.0]),
)
def test_advantages_ignore_a_shift_of_the_group_and_scale_as_documented(group, shift, scale) -> None:
    """Adding a constant to every reward of a group changes no advantage; multiplying them by k
    multiplies Dr. GRPO's by k and leaves GRPO's (eps = 0) as they are but for the sign of k."""
    g = len(group)
    r = torch.tensor(group)
    for scale_by_std in (True, False):
        base = group_advantages(r, g, scale_by_std=scale_by_std, eps=0.0)
        shifted = group_advantages(r + shift, g, scale_by_std=scale_by_std, eps=0.0)
        assert torch.allclose(shifted, base, atol=1e-5)
        scaled = group_advantages(r * scale, g, scale_by_std=scale_by_std, eps=0.0)
        expect = base * (math.copysign(1.0, scale) if scale_by_std else scale)
        assert torch.allclose(scaled, expect, atol=1e-5)
        # centered: every group's advantages sum to zero
        assert abs(base.sum().item()) < 1e-4


_LOSS_CASE = st.fixed_dictionaries(
    {
        "b": st.integers(1, 5),
        "length": st.integers(1, 6),
        "loss_type": st.sampled_from(["grpo", "dapo", "dr_grpo"]),
        "eps_low": st.sampled_from([0.0, 0.1, 0.2]),
        "eps_high": st.sampled_from([0.0, 0.2, 0.28, 1.0]),
        "beta": st.sampled_from([0.0, 0.04, 1.0]),
        "mu1": st.booleans(),  # old_logp None: the policy that sampled is the current one
        "shared": st.booleans(),  # the step's denominators passed in, as micro-batches pass them
        "seed": st.integers(0, 2**31 - 1),
    }
)


def _reference_grpo_loss(logp, old, ref, adv, mask, c, max_len, n_seq, n_tok):
    """The documented objective token by token in float64: (loss, d loss / d logp, clip counts)."""
    terms, grads, lens = {}, {}, []
    low = high = 0
    for i in range(len(logp)):
        lens.append(sum(mask[i]))
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            a = adv[i]
            clipped = min(max(rho, 1 - c["eps_low"]), 1 + c["eps_high"])
            value = -min(rho * a, clipped * a)
            is_low, is_high = rho < 1 - c["eps_low"] and a < 0, rho > 1 + c["eps_high"] and a > 0
            low, high = low + is_low, high + is_high
            grad = 0.0 if is_low or is_high else -rho * a
            if c["beta"]:
                x = max(-20.0, min(20.0, ref[i][t] - logp[i][t]))
                value += c["beta"] * (math.exp(x) - x - 1)
                grad += c["beta"] * (1 - math.exp(x))
            terms[i, t], grads[i, t] = value, grad
    with_tokens = sum(n > 0 for n in lens)
    if c["loss_type"] == "grpo":
        denom = {i: (n_seq or max(with_tokens, 1)) * lens[i] for i in range(len(lens))}
        scale = {k: 1 / denom[k[0]] for k in terms}
    elif c["loss_type"] == "dapo":
        scale = dict.fromkeys(terms, 1 / max(n_tok or sum(lens), 1))
    else:
        scale = dict.fromkeys(terms, 1 / ((n_seq or len(lens)) * max_len))
    loss = sum(v * scale[k] for k, v in terms.items())
    grad = [
        [grads.get((i, t), 0.0) * scale.get((i, t), 0.0) for t in range(len(logp[i]))]
        for i in range(len(logp))
    ]
    return loss, grad, low, high


@settings(max_examples=250)
@given(c=_LOSS_CASE)
def test_the_loss_and_its_gradient_are_the_documented_formula(c) -> None:
    """For any log-probs, advantages and masks (rows with no token, all tokens masked), every
    normalization's loss and gradient are docs/r1.md's per-token formula, summed by its denominator;
    the clip fractions count the tokens whose gradient the clip zeroed, and the KL is the k3 mean."""
    gen = torch.Generator().manual_seed(c["seed"])
    b, length = c["b"], c["length"]
    logp = -torch.rand(b, length, generator=gen) * 4 - 0.01
    old = logp + (torch.rand(b, length, generator=gen) - 0.5) if not c["mu1"] else logp
    ref = -torch.rand(b, length, generator=gen) * 4 - 0.01
    adv = torch.randn(b, generator=gen) * (torch.rand(b, generator=gen) < 0.8)
    mask = (torch.rand(b, length, generator=gen) < 0.7).float()
    max_len = length + int(torch.randint(0, 3, (1,), generator=gen))
    n_seq = n_tok = None
    if c["shared"]:  # a micro-batch of a larger step
        n_seq, n_tok = b + 2, int(mask.sum()) + 5
    lp = logp.clone().requires_grad_(True)
    out = grpo_loss(
        lp,
        None if c["mu1"] else old,
        adv,
        mask,
        eps_low=c["eps_low"],
        eps_high=c["eps_high"],
        beta=c["beta"],
        ref_logp=ref if c["beta"] else None,
        loss_type=c["loss_type"],
        max_completion_len=max_len,
        num_sequences=n_seq,
        num_tokens=n_tok,
    )
    out.loss.backward()
    t = lambda x: x.double().tolist()  # noqa: E731
    mask_l = [[bool(v) for v in row] for row in mask.tolist()]
    want, want_grad, low, high = _reference_grpo_loss(
        t(logp), t(old), t(ref), t(adv), mask_l, c, max_len, n_seq, n_tok
    )
    assert out.loss.item() == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert torch.allclose(
        lp.grad.double(), torch.tensor(want_grad, dtype=torch.float64), rtol=1e-4, atol=1e-6
    )
    n = max(int(mask.sum()), 1)
    assert out.stats["clip_frac_low"] == pytest.approx(low / n)
    assert out.stats["clip_frac_high"] == pytest.approx(high / n)
    assert out.stats["clip_frac"] == pytest.approx((low + high) / n)
    if c["mu1"]:  # the ratio is exactly 1: nothing is clipped
        assert out.stats["ratio_mean"] == pytest.approx(float(mask.sum() > 0)) and low + high == 0
    if c["beta"]:
        assert out.stats["kl"] >= 0


@settings(max_examples=300)
@given(
    logp=st.floats(-30, 0, width=32),
    delta=st.one_of(st.floats(-1 / 1024, 1 / 1024, width=32), st.floats(-40, 40, width=32)),
)
def test_the_k3_kl_is_never_negative_and_zero_where_the_policies_agree(logp, delta) -> None:
    """k3 = π_ref/π_θ - log(π_ref/π_θ) - 1 >= 0 for any pair of log-probs, 0 where they are equal, and
    within rounding of the formula (in float64) elsewhere."""
    lp = torch.tensor([logp, logp])
    ref = torch.tensor([logp + delta, logp])
    kl = kl_k3(lp, ref)
    assert (kl >= 0).all(), kl
    assert kl[1] == 0
    x = max(-20.0, min(20.0, ref[0].item() - lp[0].item()))
    # (a float32 k3 is the difference of two numbers of x's size: within a few of x's ulps of the formula)
    assert kl[0].item() == pytest.approx(math.expm1(x) - x, rel=1e-5, abs=3e-7 * abs(x))


def test_the_kl_of_policies_that_barely_differ_is_not_negative() -> None:
    """Found by the property above: exp(x) - x - 1 in float32 rounds exp(1e-6) to 1 + ulp, a KL of
    -6e-8 for a log-ratio of 1e-6 (the `kl` logged for a policy that barely moved from its reference)."""
    kl = kl_k3(torch.zeros(3), torch.tensor([1e-6, -1e-6, 1e-4]))
    assert (kl >= 0).all() and kl.tolist() == pytest.approx([5e-13, 5e-13, 5e-9], rel=0.05)


@settings(max_examples=100)
@given(
    g=st.integers(2, 6),
    rewards=st.lists(st.integers(0, 3).map(float), min_size=1, max_size=4),
    lengths=st.lists(st.integers(0, 5), min_size=24, max_size=24),
    loss_type=st.sampled_from(["grpo", "dapo", "dr_grpo"]),
    seed=st.integers(0, 1000),
)
def test_groups_of_equal_rewards_give_no_policy_gradient(g, rewards, lengths, loss_type, seed) -> None:
    """Groups whose members all got the same reward (whatever it is): zero advantage, and at β = 0 no
    gradient at all and a loss of exactly 0, whatever the ratios."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.tensor([v for v in rewards for _ in range(g)])
    adv = group_advantages(r, g)
    assert torch.equal(adv, torch.zeros_like(adv))
    b = len(r)
    mask = torch.tensor([[float(t < n) for t in range(5)] for n in lengths[:b]])
    logp = (-torch.rand(b, 5, generator=gen) * 3).requires_grad_(True)
    old = logp.detach() + torch.randn(b, 5, generator=gen)
    out = grpo_loss(logp, old, adv, mask, loss_type=loss_type, max_completion_len=5)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros_like(logp))


@settings(max_examples=40)
@given(
    groups=st.integers(1, 3),
    g=st.integers(2, 4),
    data=st.data(),
    loss_type=st.sampled_from(["grpo", "dapo", "dr_grpo"]),
    beta=st.sampled_from([0.0, 0.1]),
    mu1=st.booleans(),
    micro=st.integers(1, 12),
)
def test_the_micro_batched_update_is_the_batch_formula_sequence_by_sequence(
    groups, g, data, loss_type, beta, mu1, micro
) -> None:
    """Whatever the rollout (ragged prompts and completions, samples left out of the loss, groups
    without signal) and --micro-batch, the micro-batch losses the Trainer sums, and their gradient, are
    docs/r1.md's batch loss computed sequence by sequence, each on its own unpadded tokens: grpo over
    the kept sequences, dapo over their tokens, dr_grpo over G · L_max of every sequence sampled."""
    import types

    from nanoseek.train.grpo import Rollout, _loss_fn, _micro_batches, loss_denominators

    b = groups * g
    ids = st.integers(2, 10)
    prompts = data.draw(st.lists(st.lists(ids, min_size=1, max_size=3), min_size=b, max_size=b))
    comps = data.draw(st.lists(st.lists(ids, min_size=1, max_size=5), min_size=b, max_size=b))
    rewards = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.2, 1.0]), min_size=b, max_size=b)))
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    adv = group_advantages(rewards, g, scale_by_std=loss_type != "dr_grpo")
    ro = Rollout(prompts, comps, rewards, adv, keep, {})
    max_new = 5
    cfg = types.SimpleNamespace(
        temperature=0.7,
        eps_low=0.2,
        eps_high=0.28,
        beta=beta,
        loss=loss_type,
        max_new_tokens=max_new,
        sft_mix=0,
    )
    torch.manual_seed(0)
    policy, ref_model = _Toy(), _Toy()
    shift = lambda n: 0.3 * torch.cos(1.7 * torch.arange(n))  # noqa: E731  π_old: the policy, moved a little

    n_seq, n_tok = loss_denominators(ro, loss_type)
    batches = _micro_batches(ro, micro, 0, skip_zero_adv=beta == 0)
    for mb in batches:
        args = (mb["ids"], mb["starts"], mb["mask"].shape[1], 0.7)
        with torch.no_grad():
            if not mu1:
                mb["old"] = token_logprobs(policy, *args)[0] + shift(mb["mask"].shape[1])
            if beta:
                mb["ref"] = token_logprobs(ref_model, *args)[0]
    loss_fn = _loss_fn(cfg, policy, batches, n_seq, n_tok, None)
    got, stats = 0.0, []
    for _ in batches:
        part, m = loss_fn()
        part.backward()
        got += part.item()
        stats.append(m)
    grad = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in policy.parameters()]

    policy.zero_grad()
    terms, total = [], torch.zeros(())
    ratios, kls = [], []  # the per-token statistics of the tokens forwarded
    for i in range(b):
        if not keep[i]:
            continue
        p, c = prompts[i], comps[i]
        full = torch.tensor([p + c])
        logp = (policy(full)[0, len(p) - 1 : -1].float() / 0.7).log_softmax(-1)[torch.arange(len(c)), c]
        old = logp.detach() if mu1 else logp.detach() + shift(len(c))
        rho = torch.exp(logp - old)
        a = float(adv[i])
        per_token = -torch.minimum(rho * a, rho.clamp(0.8, 1.28) * a)
        if beta:
            with torch.no_grad():
                ref = (ref_model(full)[0, len(p) - 1 : -1] / 0.7).log_softmax(-1)[torch.arange(len(c)), c]
            per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
            kls += (torch.exp(ref - logp) - (ref - logp) - 1).tolist()
        terms.append((per_token.sum(), len(c)))
        if beta or adv[i] != 0:
            ratios += rho.tolist()
    kept = terms
    if loss_type == "grpo":
        total = sum((s / n for s, n in kept), torch.zeros(())) / max(len(kept), 1)
    elif loss_type == "dapo":
        total = sum((s for s, _ in kept), torch.zeros(())) / max(sum(n for _, n in kept), 1)
    else:
        total = sum((s for s, _ in kept), torch.zeros(())) / (b * max_new)
    if total.requires_grad:
        total.backward()
    want = [p.grad if p.grad is not None else torch.zeros_like(p) for p in policy.parameters()]
    assert got == pytest.approx(total.item(), abs=1e-5)
    for a_, b_ in zip(grad, want, strict=True):
        assert torch.allclose(a_, b_, atol=1e-5)
    if batches:  # as the Trainer logs them (a mean over the micro-batches): means over the tokens
        mean = lambda k: sum(m[k] for m in stats) / len(stats)  # noqa: E731
        assert mean("ratio_mean") == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
        if beta:
            assert mean("kl") == pytest.approx(sum(kls) / len(kls), rel=1e-4, abs=1e-7)


@settings(max_examples=30)
@given(
    seqs=st.lists(
        st.tuples(
            st.lists(st.integers(3, 399), min_size=1, max_size=6),
            st.lists(st.integers(3, 399), min_size=1, max_size=6),
        ),
        min_size=1,
        max_size=4,
    ),
    temperature=st.sampled_from([1.0, 0.7]),
)
def test_a_completions_log_probs_are_its_own_whatever_its_micro_batch(
    micro_checkpoint, seqs, temperature
) -> None:
    """--micro-batch is a memory knob: under the DeepSeek-V3 model (MLA, MoE routing) a completion's
    log-probs, right-padded beside any other sequences, are those of it run alone."""
    model = _micro_model(micro_checkpoint)
    s, length = max(len(p) + len(c) for p, c in seqs), max(len(c) for _, c in seqs)
    ids = torch.zeros(len(seqs), s, dtype=torch.long)
    real = torch.zeros(len(seqs), s, dtype=torch.bool)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        real[i, : len(p) + len(c)] = True
    starts = torch.tensor([len(p) for p, _ in seqs])
    with torch.no_grad():
        together, _ = token_logprobs(model, ids, starts, length, temperature, token_mask=real)
        for i, (p, c) in enumerate(seqs):
            alone, _ = token_logprobs(model, torch.tensor([p + c]), len(p), len(c), temperature)
            assert torch.allclose(together[i, : len(c)], alone[0], atol=1e-5)


@functools.cache
def _micro_model(path: str) -> torch.nn.Module:
    """The checkpoint's model, loaded once for every example of a property (its weights never change)."""
    from nanoseek.checkpoint import load_model

    return load_model(path).eval()


_POOLS = st.dictionaries(
    st.sampled_from(["addition", "sorting", "largest", "counting"]), st.integers(0, 6), min_size=1
).map(lambda sizes: {name: [(name, i) for i in range(n)] for name, n in sizes.items()})


@settings(max_examples=200)
@given(
    pools=_POOLS,
    mode=st.sampled_from(["uniform", "signal", "unsolved"]),
    signal=st.dictionaries(
        st.sampled_from(["addition", "sorting", "largest", "counting"]), st.floats(0, 1), max_size=4
    ),
    left=st.sets(st.sampled_from(["addition", "sorting", "largest", "counting", "other"])),
    data=st.data(),
)
def test_each_draw_is_distinct_problems_of_the_drawn_families_and_a_pure_function_of_its_seed(
    pools, mode, signal, left, data
) -> None:
    """Every way of drawing a step's prompts gives n distinct problems, each of a family still in the
    draw (not one the probe left out), and the same ones again for the same seed and state."""
    import random

    from nanoseek.train.grpo import PromptSampler

    sampler = PromptSampler(pools, mode, dict(signal))
    total = sum(map(len, pools.values()))
    keep_at_least = data.draw(st.integers(1, max(total, 1)))
    left_out = sampler.leave_out(left, keep_at_least) if mode == "unsolved" else []
    drawn_from = {name for name, problems in pools.items() if problems} - set(left_out)
    assert set(left_out) <= left & set(pools)
    if left_out:  # never all, never below what a step draws
        assert sum(len(pools[name]) for name in drawn_from) >= keep_at_least and drawn_from
    available = sum(len(pools[name]) for name in drawn_from)
    if not available:
        return
    n = data.draw(st.integers(1, available))
    seed = data.draw(st.integers(0, 2**32))
    batch = sampler.draw(random.Random(seed), n)
    assert len(batch) == n and len(set(batch)) == n
    assert {name for name, _ in batch} <= drawn_from
    again = PromptSampler(pools, mode, dict(signal))
    if mode == "unsolved":
        again.leave_out(left, keep_at_least)
    assert again.draw(random.Random(seed), n) == batch


@settings(max_examples=100)
@given(
    entropies=st.lists(st.floats(0, 3) | st.just(math.nan), max_size=12),
    cut=st.integers(0, 12),
)
def test_the_entropy_trend_resumes_from_its_state_as_if_never_stopped(entropies, cut) -> None:
    """A run stopped after any step and resumed from the saved state sees the same trend, baseline and
    all, as one that ran through."""
    straight = EntropyTrend()
    means = [straight.add(e) for e in entropies]
    first = EntropyTrend()
    resumed_means = [first.add(e) for e in entropies[:cut]]
    second = EntropyTrend(first.state())
    resumed_means += [second.add(e) for e in entropies[cut:]]
    assert resumed_means == pytest.approx(means, nan_ok=True)
    assert (second if cut < len(entropies) else first).initial == straight.initial


def test_the_training_pool_is_apart_from_the_cold_starts_problems():
    # R1's RL prompts are not its cold-start data (§2.3): at one seed, SFT's worked solutions and GRPO's
    # pool came from one problem stream, so the pool began with every problem SFT had just taught
    from nanoseek.data.tasks import get_task
    from nanoseek.train.grpo import GRPOConfig, draw_pools
    from nanoseek.train.sft import task_conversations

    for seed in (0, 1):
        cfg = GRPOConfig(init="unused", tasks=["sorting"], train_pool=512, seed=seed)
        pool = {p.prompt for _, p in draw_pools(cfg, [get_task("sorting")])["sorting"]}
        taught = {conv[0]["content"] for conv in task_conversations(["sorting"], 512, seed=seed)}
        assert len(pool) == 512 and len(taught) == 512
        assert not pool & taught  # sorting's problem space is large: apart, not merely mostly apart
