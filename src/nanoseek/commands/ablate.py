"""`nanoseek ablate STUDY|all`: one DeepSeek efficiency technique on and off, reproduced in miniature."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import config_command

    config_command(
        sub,
        "ablate",
        "nanoseek.ablate:AblateConfig",
        "nanoseek.ablate:ablate",
        help="DeepSeek's efficiency claims (MoE, MLA, balancing, MTP, FP8), each switched on and off",
        description="Short pretraining runs on the same data and schedule that differ in one technique, "
        "several seeds each; writes RUN/ablate/<study>/metrics.jsonl, report.md and plots (validation "
        "loss over tokens, FLOPs and wall seconds) with a table of the paper's claims, judged per FLOP "
        "and per wall second. Rerunning with the same --out skips finished runs; Ctrl-C or SIGTERM stops at "
        "the running run's next step, keeping the finished ones.",
    )
