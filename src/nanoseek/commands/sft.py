"""`nanoseek sft --init DIR --data chat.jsonl`: supervised fine-tuning on assistant tokens (R1 cold start)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import config_command

    config_command(
        sub,
        "sft",
        "nanoseek.train.sft:SFTConfig",
        run,
        help="supervised fine-tuning on chat data (loss on assistant tokens only, packed)",
        description="SFT through the R1 chat template: loss on assistant tokens only, examples packed "
        "with block-diagonal attention. Data: chat JSONL ({'messages': [...]}) files, globs or folders "
        "(a data set in shards is one --data), and/or a built-in task's worked solutions (R1's cold "
        "start). Writes RUN/sft/.",
    )


def run(args: argparse.Namespace) -> int:
    from nanoseek.options import from_options
    from nanoseek.train.sft import SFTConfig, sft

    # one source as its text, as before several were taken (a --resume compares it with the saved one)
    data = args.data[0] if args.data and len(args.data) == 1 else args.data
    sft(from_options(SFTConfig, args, data=data))
    return 0
