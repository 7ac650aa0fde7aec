"""`nanoseek grpo --init DIR --task NAME --reward SPEC`: R1-style reinforcement learning with GRPO."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "grpo",
        help="reinforcement learning with verifiable rewards (GRPO / Dr. GRPO / DAPO clip-higher)",
        description="GRPO from a checkpoint: G samples per prompt from the batched engine, group-relative "
        "advantages, clipped ratio objective, optional k3 KL to the starting policy. Writes RUN/grpo/ and "
        "RUN/metrics.jsonl (stage grpo). See docs/r1.md.",
    )
    p.add_argument("--init", required=True, help="checkpoint directory to start from (with tokenizer files)")
    p.add_argument("--task", required=True, help="task name(s), comma-separated (e.g. arithmetic,countdown)")
    p.add_argument(
        "--reward", default="accuracy:1,format:0.2", help="weighted reward parts (default %(default)s)"
    )
    p.add_argument("--out", default="runs/grpo", help="run directory (default %(default)s)")
    p.add_argument("--group-size", "-G", type=int, default=8, help="samples per prompt (default %(default)s)")
    p.add_argument(
        "--batch-prompts", "-P", type=int, default=8, help="prompts per step (default %(default)s)"
    )
    p.add_argument("--steps", type=int, default=50, help="GRPO steps (default %(default)s)")
    p.add_argument(
        "--mu", type=int, default=1, help="policy updates per batch of rollouts (default %(default)s)"
    )
    p.add_argument(
        "--beta", type=float, default=0.0, help="KL coefficient; 0 skips the reference (default 0)"
    )
    p.add_argument("--eps-low", type=float, default=0.2, help="lower clip ε (default %(default)s)")
    p.add_argument(
        "--eps-high", type=float, default=0.28, help="upper clip ε, DAPO clip-higher (default %(default)s)"
    )
    p.add_argument("--loss", choices=("grpo", "dr_grpo", "dapo"), default="grpo", help="loss normalization")
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="completion length cap (default %(default)s)"
    )
    p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (default %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    p.add_argument(
        "--mask-truncated", action="store_true", help="leave truncated completions out of the loss"
    )
    p.add_argument("--language", default=None, help="only prompts in this language (en, ja, zh)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--checkpoint-every", type=int, default=0, help="steps between checkpoints (0 = at the end)"
    )
    p.add_argument("--resume", action="store_true", help="continue from RUN/grpo/ if it holds a checkpoint")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument(
        "--stop-on-collapse", action="store_true", help="stop when entropy/length collapse persists"
    )
    p.add_argument("--min-entropy", type=float, default=0.05, help="entropy below this is a collapse warning")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.evaluate import split_task_list
    from nanoseek.train.grpo import GRPOConfig, grpo

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    cfg = GRPOConfig(
        init=args.init,
        tasks=split_task_list(args.task),
        reward=args.reward,
        out=args.out,
        group_size=args.group_size,
        batch_prompts=args.batch_prompts,
        steps=args.steps,
        mu=args.mu,
        beta=args.beta,
        eps_low=args.eps_low,
        eps_high=args.eps_high,
        loss=args.loss,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        micro_batch=args.micro_batch,
        mask_truncated=args.mask_truncated,
        language=args.language,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        precision=args.precision,
        stop_on_collapse=args.stop_on_collapse,
        min_entropy=args.min_entropy,
        progress=not args.no_progress,
    )
    grpo(cfg)
    return 0
