"""Short pretraining runs that evaluate as they go: the one loop `nanoseek ablate` and
benchmarks/bench_learning.py share. Their evaluations differ (validation loss and balance against
copy probes and greedy accuracy); the training, the budget and the cadence do not.

Training seconds count only the optimizer steps, never the evaluations, so per-second comparisons
between variants are not skewed by how long each one's evaluation took.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nanoseek.config import ModelConfig
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.loop import LossFn, Trainer


def sized_to(config: ModelConfig, tok: Tokenizer) -> ModelConfig:
    """The model config with the tokenizer's vocabulary size and special ids."""
    return config.replace(
        vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def train_evaluating(
    trainer: Trainer,
    loss_fn: LossFn,
    evaluate: Callable[[float, bool], Any],
    *,
    every: int | None = None,
    seconds: float | None = None,
    evaluations: int = 4,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> float:
    """Step `trainer` until it is done; returns the seconds spent in its steps.

    `evaluate(train_seconds, final)` runs every `every` steps (a step budget: the trainer's own
    total_steps) or, with `seconds`, after each 1/`evaluations` of that much training (the schedule is
    refitted to the deadline, which moves on by the time each evaluation takes), and once with
    final=True after the last step (never twice at the last step). `on_step` sees each step's metrics.
    A signal inside the trainer's `stop_on_signals` ends it at the next step boundary, without the final
    evaluation: the caller finds `trainer.stop_signal` set.
    """
    if (every is None) == (seconds is None):
        raise ValueError("give either every (steps between evaluations) or seconds (a time budget)")
    if every is not None and every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    train_s = 0.0
    next_eval_s = (seconds or 0.0) / evaluations
    if seconds is not None:
        trainer.deadline = time.perf_counter() + seconds
    while not trainer.done:
        t0 = time.perf_counter()
        metrics = trainer.step(loss_fn)
        train_s += time.perf_counter() - t0
        if on_step is not None:
            on_step(metrics)
        if trainer.stop_requested():
            return train_s
        if trainer.done:
            break
        due = trainer.global_step % every == 0 if every is not None else train_s >= next_eval_s
        if due:
            e0 = time.perf_counter()
            evaluate(train_s, False)
            next_eval_s += (seconds or 0.0) / evaluations
            trainer.pause(time.perf_counter() - e0)  # evaluation time is not training time
    evaluate(train_s, True)
    return train_s
