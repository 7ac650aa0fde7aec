"""`nanoseek sft --init DIR --data chat.jsonl`: supervised fine-tuning on assistant tokens (R1 cold start)."""

from __future__ import annotations

import argparse


def add_sft_arguments(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help="run directory (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs passes)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per step (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="packed row length (default %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--language", default=None, help="only prompts in this language (en, ja, zh)")
    p.add_argument("--no-progress", action="store_true")


def sft_config(args: argparse.Namespace, init: str):  # -> SFTConfig
    from nanoseek.train.sft import SFTConfig

    return SFTConfig(
        init=init,
        data=getattr(args, "data", None),
        task=getattr(args, "sft_task", None),
        task_examples=getattr(args, "task_examples", 2000),
        out=args.out,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        precision=args.precision,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        seed=args.seed,
        language=args.language,
        progress=not args.no_progress,
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on chat data (loss on assistant tokens only, packed)",
        description="SFT through the R1 chat template: loss on assistant tokens only, examples packed "
        "with block-diagonal attention. Data: a chat JSONL ({'messages': [...]}) and/or a built-in "
        "task's worked solutions (R1's cold start). Writes RUN/sft/.",
    )
    p.add_argument("--init", required=True, help="checkpoint directory (with tokenizer files)")
    p.add_argument("--data", default=None, help="chat JSONL: one {'messages': [...]} per line")
    p.add_argument(
        "--task", dest="sft_task", default=None, help="build cold-start data from task(s)' worked solutions"
    )
    p.add_argument(
        "--task-examples", type=int, default=2000, help="examples drawn from --task (default %(default)s)"
    )
    add_sft_arguments(p, "runs/sft")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.sft import sft

    sft(sft_config(args, args.init))
    return 0
