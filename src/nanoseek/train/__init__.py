"""Training stages (pretrain, sft, grpo, distill) over one shared loop (`nanoseek.train.loop`).

Torch-free here: the CLI catches `TrainingDiverged` without importing torch.
"""


class TrainingDiverged(RuntimeError):
    """Training cannot go on: steps kept failing the guard, or an update left non-finite weights."""


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
