"""`nanoseek pretrain`: train a DeepSeek-V3-style model on packed text (torchrun-ready, FSDP2)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import config_command

    config_command(
        sub,
        "pretrain",
        "nanoseek.train.pretrain:PretrainConfig",
        run,
        help="pretrain a model (default: `tiny` on the embedded corpus)",
        description="Pretrain with DeepSeek-V3's recipe: AdamW, warmup + cosine/WSD, MTP loss, "
        "aux-loss-free expert balancing, NaN/spike guard, atomic checkpoints, exact --resume (Ctrl-C or "
        "SIGTERM saves at the next step first). "
        "Writes RUN/pretrain/ (HF layout, with tokenizer) and RUN/metrics.jsonl. Data-parallel with "
        "`torchrun --nproc-per-node N -m nanoseek pretrain ...`.",
    )


def run(args: argparse.Namespace) -> int:
    from nanoseek.options import from_options
    from nanoseek.train.pretrain import PretrainConfig, pretrain

    data = args.data[0] if len(args.data) == 1 else list(args.data)
    pretrain(from_options(PretrainConfig, args, data=data))
    return 0
