"""`nanoseek distill --teacher DIR --student DIR_OR_PRESET --task NAME -k K`: R1-style distillation."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.commands.sft import add_sft_arguments

    p = sub.add_parser(
        "distill",
        help="sample k traces per prompt from a teacher, keep the correct ones, SFT a student on them",
        description="Rejection-sampling distillation (R1 §2.4): the teacher's correct traces become the "
        "student's SFT data (also written to RUN/distill_data.jsonl). A preset student takes the "
        "teacher's tokenizer. Writes RUN/distill/.",
    )
    p.add_argument("--teacher", required=True, help="teacher checkpoint directory")
    p.add_argument(
        "--student", required=True, help="student checkpoint directory or preset (tiny, small, ...)"
    )
    p.add_argument("--task", required=True, help="task name(s), comma-separated")
    p.add_argument("-k", type=int, default=4, help="samples per prompt (default %(default)s)")
    p.add_argument("--prompts", type=int, default=256, help="training prompts per task (default %(default)s)")
    p.add_argument("--keep-per-prompt", type=int, default=2, help="distinct correct traces kept per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    add_sft_arguments(p, "runs/distill")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.commands.sft import sft_config
    from nanoseek.evaluate import split_task_list
    from nanoseek.train.distill import DistillConfig, distill

    cfg = DistillConfig(
        teacher=args.teacher,
        student=args.student,
        tasks=split_task_list(args.task),
        k=args.k,
        prompts=args.prompts,
        keep_per_prompt=args.keep_per_prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        out=args.out,
        seed=args.seed,
        language=args.language,
        sft=sft_config(args, args.student),
    )
    distill(cfg)
    return 0
