"""Training stages (pretrain, sft, grpo, distill) over one shared loop (`nanoseek.train.loop`).

Torch-free here: the CLI catches `TrainingDiverged` without importing torch.
"""


class TrainingDiverged(RuntimeError):
    """Training cannot go on: steps kept failing the guard, or an update left non-finite weights."""
