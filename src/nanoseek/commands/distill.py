"""`nanoseek distill --teacher DIR --student DIR_OR_PRESET --task NAME -k K`: R1-style distillation."""

from __future__ import annotations

import argparse

# The student's fine-tuning takes its data from the teacher and its run directory from distill.
_SFT_DATA = ("init", "data", "task", "task_examples", "multi_turn")


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import defer

    p = sub.add_parser(
        "distill",
        help="sample k traces per prompt from a teacher, keep the correct ones, SFT a student on them",
        description="Rejection-sampling distillation (R1 §2.4): the teacher's correct traces become the "
        "student's SFT data (also written to RUN/distill_data.jsonl). A preset student takes the "
        "teacher's tokenizer. Writes RUN/distill/.",
    )
    defer(p, _flags)
    p.set_defaults(func=run)


def _flags(p: argparse.ArgumentParser) -> None:
    from nanoseek.options import add_options
    from nanoseek.train.distill import DistillConfig
    from nanoseek.train.sft import SFTConfig

    add_options(p, DistillConfig)
    add_options(p.add_argument_group("the student's fine-tuning"), SFTConfig, skip=_SFT_DATA)


def run(args: argparse.Namespace) -> int:
    from nanoseek.options import from_options
    from nanoseek.train.distill import DistillConfig, distill
    from nanoseek.train.sft import SFTConfig

    sft = from_options(SFTConfig, args, init=args.student, data=None, task=None)
    distill(from_options(DistillConfig, args, sft=sft))
    return 0
