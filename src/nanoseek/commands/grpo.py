"""`nanoseek grpo --init DIR --task NAME --reward SPEC`: R1-style reinforcement learning with GRPO."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import defer

    p = sub.add_parser(
        "grpo",
        help="reinforcement learning with verifiable rewards (GRPO / Dr. GRPO / DAPO clip-higher)",
        description="GRPO from a checkpoint: G samples per prompt from the batched engine, group-relative "
        "advantages, clipped ratio objective, optional k3 KL to the starting policy. Writes RUN/grpo/ and "
        "RUN/metrics.jsonl (stage grpo). See docs/r1.md.",
    )
    defer(p, _flags)
    p.set_defaults(func=run)


def _flags(p: argparse.ArgumentParser) -> None:
    from nanoseek.options import add_options
    from nanoseek.train.grpo import GRPOConfig

    add_options(p, GRPOConfig)


def run(args: argparse.Namespace) -> int:
    from nanoseek.options import from_options
    from nanoseek.train.grpo import GRPOConfig, grpo

    grpo(from_options(GRPOConfig, args))
    return 0
