"""`nanoseek sft --init DIR --data chat.jsonl`: supervised fine-tuning on assistant tokens (R1 cold start)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import defer

    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on chat data (loss on assistant tokens only, packed)",
        description="SFT through the R1 chat template: loss on assistant tokens only, examples packed "
        "with block-diagonal attention. Data: a chat JSONL ({'messages': [...]}) and/or a built-in "
        "task's worked solutions (R1's cold start). Writes RUN/sft/.",
    )
    defer(p, _flags)
    p.set_defaults(func=run)


def _flags(p: argparse.ArgumentParser) -> None:
    from nanoseek.options import add_options
    from nanoseek.train.sft import SFTConfig

    add_options(p, SFTConfig)


def run(args: argparse.Namespace) -> int:
    from nanoseek.options import from_options
    from nanoseek.train.sft import SFTConfig, sft

    sft(from_options(SFTConfig, args))
    return 0
