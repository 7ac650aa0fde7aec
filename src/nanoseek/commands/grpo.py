"""`nanoseek grpo --init DIR --task NAME --reward SPEC`: R1-style reinforcement learning with GRPO."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import config_command

    config_command(
        sub,
        "grpo",
        "nanoseek.train.grpo:GRPOConfig",
        "nanoseek.train.grpo:grpo",
        help="reinforcement learning with verifiable rewards (GRPO / Dr. GRPO / DAPO clip-higher)",
        description="GRPO from a checkpoint: G samples per prompt from the batched engine, group-relative "
        "advantages, clipped ratio objective, optional k3 KL to the starting policy. Writes RUN/grpo/ and "
        "RUN/metrics.jsonl (stage grpo). See docs/r1.md.",
    )
