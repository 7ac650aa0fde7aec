"""The short-run loop `nanoseek ablate` and the learning benchmark share: when it evaluates, and that
evaluation time is neither training time nor taken from a time budget."""

from __future__ import annotations

import pytest

import nanoseek.train.study as study
from nanoseek.train.study import train_evaluating


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTrainer:
    """Trainer's surface the loop uses: step, done, global_step, deadline, stop_requested; each step
    takes 1 s."""

    def __init__(self, clock: Clock, total_steps: int) -> None:
        self.clock, self.total_steps = clock, total_steps
        self.global_step, self.deadline = 0, None

    @property
    def done(self) -> bool:
        late = self.deadline is not None and self.clock.now >= self.deadline
        return self.global_step >= self.total_steps or late

    def step(self, loss_fn) -> dict:
        self.clock.now += 1.0
        self.global_step += 1
        return {"loss": 1.0 / self.global_step}

    def pause(self, seconds: float) -> None:
        if self.deadline is not None:
            self.deadline += seconds

    def stop_requested(self) -> bool:  # no signal here (Trainer.stop_on_signals)
        return False


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(study.time, "perf_counter", c)
    return c


@pytest.mark.parametrize(
    ("total", "at"), [(5, [(2, False), (4, False), (5, True)]), (4, [(2, False), (4, True)])]
)
def test_a_step_budget_evaluates_every_n_steps_and_once_at_the_end(clock, total, at) -> None:
    trainer = FakeTrainer(clock, total)
    calls, seen = [], []
    train_s = train_evaluating(
        trainer,
        lambda: None,
        lambda s, final: calls.append((trainer.global_step, final)),
        every=2,
        on_step=seen.append,
    )
    assert calls == at
    assert train_s == total
    assert len(seen) == total


def test_a_seconds_budget_does_not_count_evaluation_time(clock) -> None:
    trainer = FakeTrainer(clock, total_steps=10**6)
    calls = []

    def evaluate(train_s: float, final: bool) -> None:
        calls.append((trainer.global_step, train_s, final))
        clock.now += 0.5  # evaluating takes time; the deadline moves on by as much

    train_s = train_evaluating(trainer, lambda: None, evaluate, seconds=8.0, evaluations=4)
    assert train_s == 8.0 and trainer.global_step == 8
    assert calls == [(2, 2.0, False), (4, 4.0, False), (6, 6.0, False), (8, 8.0, True)]


def test_a_seconds_budget_is_filled_however_long_the_evaluations_take(clock, monkeypatch, tmp_path) -> None:
    """The Trainer refits its step count to the pace it measures: that pace must leave the evaluations
    out as the deadline does. Counted in, an evaluation as long as 2 steps a step planned the run too
    short: it ended ~30 of its 100 s early, and the learning rate fell and rose again at every one."""
    import torch

    import nanoseek.train.loop as loop
    from model_configs import small_config
    from nanoseek.checkpoint import build_model
    from nanoseek.train.loop import OptimConfig, Trainer

    monkeypatch.setattr(loop.time, "perf_counter", clock)
    model = build_model(small_config(num_hidden_layers=1, n_routed_experts=0)).init_weights(0)
    trainer = Trainer(model, tmp_path, "ablate", OptimConfig(lr=1e-2, warmup_steps=2), 10**6, "fp32")
    step, lrs = trainer.step, []

    def timed_step(loss_fn):  # 1 s a step
        clock.now += 1.0
        metrics = step(loss_fn)
        lrs.append(metrics["lr"])
        return metrics

    monkeypatch.setattr(trainer, "step", timed_step)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))

    def evaluate(train_s: float, final: bool) -> None:
        clock.now += 0.0 if final else 200.0  # each evaluation as long as 200 steps

    loss = lambda: (model(ids[:, :-1]).logsumexp(-1).mean(), {})  # noqa: E731
    train_s = train_evaluating(trainer, loss, evaluate, seconds=100.0, evaluations=4)
    assert train_s >= 98.0 and trainer.global_step >= 98
    decay = lrs[2:]
    assert all(b <= a for a, b in zip(decay, decay[1:], strict=False)), "the schedule fell and rose again"


def test_exactly_one_cadence_is_given(clock) -> None:
    trainer = FakeTrainer(clock, 3)
    with pytest.raises(ValueError, match="either every"):
        train_evaluating(trainer, lambda: None, lambda s, f: None)
    with pytest.raises(ValueError, match="either every"):
        train_evaluating(trainer, lambda: None, lambda s, f: None, every=2, seconds=3.0)
    with pytest.raises(ValueError, match="every must be >= 1"):
        train_evaluating(trainer, lambda: None, lambda s, f: None, every=0)


@pytest.mark.parametrize(
    ("seconds", "evaluations", "at"),
    [(8.0, 2, [4, 8]), (8.0, 1, [8]), (8.0, 8, [1, 2, 3, 4, 5, 6, 7, 8]), (10.0, 4, [3, 5, 8, 10])],
)
def test_a_seconds_budget_evaluates_after_each_equal_share_of_it(clock, seconds, evaluations, at) -> None:
    """1 s steps: an evaluation at the first step past each k·seconds/evaluations of training (k = 1,
    2, ...), the last one the final evaluation at the deadline. 10 s in 4: 2.5, 5, 7.5 -> steps 3, 5, 8
    (the shares do not drift by the step that overshot one), then 10."""
    trainer = FakeTrainer(clock, total_steps=10**6)
    calls = []
    train_evaluating(
        trainer,
        lambda: None,
        lambda s, final: calls.append((trainer.global_step, final)),
        seconds=seconds,
        evaluations=evaluations,
    )
    assert calls == [(step, step == seconds) for step in at]


def test_a_stop_signal_ends_the_run_at_the_step_without_the_final_evaluation(clock) -> None:
    """The trainer's stop_on_signals saw a signal during step 3 (every=2): the loop returns after it
    with the 3 s trained, having evaluated at step 2 only; the caller finds trainer.stop_signal set."""

    class StoppedTrainer(FakeTrainer):
        def stop_requested(self) -> bool:
            return self.global_step >= 3

    trainer = StoppedTrainer(clock, total_steps=10)
    calls = []
    train_s = train_evaluating(
        trainer, lambda: None, lambda s, final: calls.append((trainer.global_step, final)), every=2
    )
    assert train_s == 3.0 and trainer.global_step == 3
    assert calls == [(2, False)]


def test_sized_to_takes_the_tokenizers_vocabulary_and_special_ids() -> None:
    """A model config fitted to a tokenizer: its vocabulary size and its BOS, EOS and pad ids (the pad
    id is what config.json tells transformers' generate and batched padding)."""
    from types import SimpleNamespace

    from nanoseek.config import get_preset
    from nanoseek.train.study import sized_to

    tok = SimpleNamespace(vocab_size=321, bos_token_id=7, eos_token_id=8, pad_token_id=9)
    cfg = sized_to(get_preset("tiny"), tok)
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (321, 7, 8, 9)
    assert cfg.hidden_size == get_preset("tiny").hidden_size  # the rest as it was
