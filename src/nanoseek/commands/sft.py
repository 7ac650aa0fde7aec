"""`nanoseek sft --init DIR --data chat.jsonl`: supervised fine-tuning on assistant tokens (R1 cold start)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import config_command

    config_command(
        sub,
        "sft",
        "nanoseek.train.sft:SFTConfig",
        "nanoseek.train.sft:sft",
        help="supervised fine-tuning on chat data (loss on assistant tokens only, packed)",
        description="SFT through the R1 chat template: loss on assistant tokens only, examples packed "
        "with block-diagonal attention. Data: a chat JSONL ({'messages': [...]}) and/or a built-in "
        "task's worked solutions (R1's cold start). Writes RUN/sft/.",
    )
