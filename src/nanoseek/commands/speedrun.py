"""`nanoseek speedrun`: tokenizer → pretrain → SFT → GRPO → distill → eval → report, in one command."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import Extend, path, torch_seed

    p = sub.add_parser(
        "speedrun",
        help="the whole DeepSeek recipe on the embedded data (the main job)",
        description="Run every stage of the recipe into RUN/. Rerunning with the same --out resumes: finished "
        "stages are skipped, an interrupted one continues from its last checkpoint (Ctrl-C or SIGTERM saves "
        "the running stage at its next step first).",
    )
    p.add_argument(
        "--preset", default="cpu", choices=["smoke", "cpu", "gpu"], help="size of the run (default cpu)"
    )
    p.add_argument("--out", default="runs/speedrun", type=path, help="run directory (default runs/speedrun)")
    p.add_argument(
        "--tasks",
        "--task",  # the other commands' spelling, taken as a prefix before abbreviations were refused
        dest="tasks",
        action=Extend,  # `--tasks a --tasks b`: both
        default=None,
        metavar="NAMES",
        help="comma-separated built-in families to run instead of the preset's, e.g. addition,sorting: "
        "only these are in the corpus, trained, evaluated and reported (largest, when named, is still "
        "learned from its verifier alone). Default: the preset's (smoke: addition, comparison and "
        "largest; cpu and gpu: seven with worked solutions and largest)",
    )
    p.add_argument("--seed", type=torch_seed, default=0)
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        # on a GPU it was "auto" bf16 too, and fp32 keeps SFT, GRPO and distillation in fp32 there
        # (`Speedrun._tuning_precision`): the help said a CPU's rule alone, for pretraining alone
        help="pretraining precision; auto: bf16 where the hardware (GPU or CPU) multiplies bf16 natively, else fp32 "
        "(default auto; on a GPU, fp32 keeps SFT, GRPO and distillation in fp32 too, else bf16)",
    )
    p.add_argument(
        "--multi-turn",
        type=float,
        default=None,
        metavar="F",
        help="share of the pretraining corpus's chats that ask 2-3 questions in a row (default: the "
        "preset's; 0: one question a chat, a model that reads only a chat's first question)",
    )
    p.add_argument(
        "--grpo-second-turn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GRPO draws each family asked second in a chat too: a chat's later questions answered "
        "better, the first a little worse (default: the preset's; off in cpu and gpu)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads, shared out among the stages it runs side by side (default: torch's choice)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard events of every training stage to RUN/tensorboard/<stage>/, as "
        "pretrain, sft, grpo and distill do",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.perf import torch_threads
    from nanoseek.speedrun import run_speedrun

    overrides = {"seed": args.seed, "precision": args.precision}
    if args.multi_turn is not None:
        if not 0 <= args.multi_turn <= 1:  # (NaN too) else refused as the preset's `pretrain_multi_turn`
            raise ValueError(f"--multi-turn must be in [0, 1], got {args.multi_turn}")
        overrides["pretrain_multi_turn"] = args.multi_turn
    if args.grpo_second_turn is not None:
        overrides["grpo_second_turn"] = args.grpo_second_turn
    if args.tasks is not None:  # `--tasks ""` is refused as naming no family, not taken as the preset's
        overrides["families"] = args.tasks
    # the stages beside one another (and the evaluation workers) split the count they find set
    with torch_threads(args.threads):
        run_speedrun(
            args.out, args.preset, progress=not args.no_progress, tensorboard=args.tensorboard, **overrides
        )
    return 0
