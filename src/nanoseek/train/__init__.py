"""Training stages (pretrain, sft, grpo, distill) over one shared loop (`nanoseek.train.loop`).

Torch-free here: the CLI catches `TrainingDiverged` without importing torch.
"""

import os

# The commands `torchrun` may start: the others run whole in every process it starts.
DATA_PARALLEL = frozenset({"pretrain"})


def one_process(what: str, instead: str = "") -> None:
    """Refuse to run `what` in each of torchrun's processes (WORLD_SIZE > 1): every one would do all
    of the work and write the same files (a checkpoint, metrics.jsonl's line, a report). `instead`:
    another way on, said after the usual one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise alike_on_every_rank(
            ValueError(
                f"{what} in one process, but torchrun started {world} (WORLD_SIZE={world}): run it without "
                f"torchrun (only `nanoseek pretrain` is data-parallel, docs/multinode.md){instead}; in a "
                "shell that kept a job's WORLD_SIZE (a Kubernetes pod's), `unset WORLD_SIZE` first"
            )
        )


def alike_on_every_rank(error: ValueError) -> ValueError:
    """Mark a refusal that every rank under torchrun makes alike (the same settings, the same world
    size): the CLI says it on rank 0 only, and the others exit with the same code quietly (each of
    them printed the same line)."""
    error.every_rank = True  # type: ignore[attr-defined]
    return error


class TrainingDiverged(RuntimeError):
    """Training cannot go on: steps kept failing the guard, or an update left non-finite weights.
    `metrics`: those of the step that ended the run (`Trainer.step`'s), for the stage's log to record."""

    def __init__(self, message: str, metrics: dict | None = None) -> None:
        super().__init__(message)
        self.metrics = metrics


class TrainingInterrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM stopped the run at a step boundary, after it saved its checkpoint there.

    A KeyboardInterrupt, as an uncaught Ctrl-C is (a notebook's `except KeyboardInterrupt` still sees
    it); `exit_code` is what a shell reports for the signal (130, 143), what job runners read."""

    def __init__(
        self,
        stage: str,
        signum: int,
        step: int,
        total_steps: int,
        checkpoint: object,
        kept: str | None = None,
    ) -> None:
        import signal

        self.stage, self.signum, self.step, self.checkpoint = stage, signum, step, checkpoint
        self.total_steps = total_steps
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        # `kept`: what a stage that saves no checkpoint kept instead (ablate: the runs that finished)
        kept = kept or f"checkpoint saved in {checkpoint}"
        super().__init__(f"{stage} stopped by {name} at step {step} of {total_steps}: {kept}")
