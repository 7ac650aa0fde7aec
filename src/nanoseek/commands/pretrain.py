"""`nanoseek pretrain`: train a DeepSeek-V3-style model on packed text (torchrun-ready, FSDP2)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.train.pretrain import PretrainConfig

    d = PretrainConfig()
    p = sub.add_parser(
        "pretrain",
        help="pretrain a model (default: `tiny` on the embedded corpus)",
        description="Pretrain with DeepSeek-V3's recipe: AdamW, warmup + cosine/WSD, MTP loss, "
        "aux-loss-free expert balancing, NaN/spike guard, atomic checkpoints, exact --resume. "
        "Writes RUN/pretrain/ (HF layout, with tokenizer) and RUN/metrics.jsonl. Data-parallel with "
        "`torchrun --nproc-per-node N -m nanoseek pretrain ...`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--data",
        nargs="+",
        default=["embedded"],
        help="txt/jsonl/parquet files, globs, dirs, 'embedded', or 'embedded:TASKS' (the embedded corpus of those task families only)",
    )
    g.add_argument("--text-field", default=d.text_field, help="JSON/parquet field holding the text")
    g.add_argument(
        "--tokenizer", default=None, help="tokenizer dir/file (default: train one into RUN/tokenizer/)"
    )
    g.add_argument(
        "--vocab-size", type=int, default=None, help="vocabulary of a trained tokenizer (default: preset's)"
    )
    g.add_argument(
        "--tokenizer-docs", type=int, default=d.tokenizer_docs, help="documents to train the tokenizer on"
    )
    g.add_argument("--preset", default=d.preset, help="model preset or directory with config.json")
    g.add_argument("--out", default=d.out, help="run directory")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch, global")
    g.add_argument("--seq-len", type=int, default=d.seq_len)
    g.add_argument("--accumulation", type=int, default=d.accumulation, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--schedule", choices=("cosine", "wsd", "constant"), default=d.schedule)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32", "fp8"),
        default=d.precision,
        help="auto: bf16 where the hardware multiplies bf16 natively, else fp32",
    )
    g = p.add_argument_group("DeepSeek-V3 losses and balancing")
    g.add_argument(
        "--bias-update-speed", type=float, default=d.bias_update_speed, help="γ of aux-loss-free balancing"
    )
    g.add_argument(
        "--balance-alpha", type=float, default=d.balance_alpha, help="α of the sequence-wise balance loss"
    )
    g.add_argument("--mtp-weight", type=float, default=d.mtp_weight, help="λ of the MTP loss (0 = off)")
    g.add_argument(
        "--no-document-mask",
        action="store_true",
        help="let packed documents attend to the documents before them (default: each only to itself)",
    )
    g.add_argument(
        "--prompt-loss",
        action="store_true",
        help="train on the user turns of chat documents too (default: loss on the responses only)",
    )
    g.add_argument(
        "--cut-documents",
        action="store_true",
        help="fill every window to the brim, cutting documents at window edges (default: whole documents, padded)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--val-every", type=int, default=d.val_every, help="steps between validation (0 = off)")
    g.add_argument("--val-batches", type=int, default=d.val_batches)
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="0 = only at the end")
    g.add_argument(
        "--expert-load-every",
        type=int,
        default=d.expert_load_every,
        help="log per-expert loads every K steps",
    )
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--resume", action="store_true", help="continue from RUN/pretrain/ if it exists")
    g.add_argument(
        "--tensorboard", action="store_true", help="also write TensorBoard events to RUN/tensorboard/"
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument(
        "--ep",
        action="store_true",
        help="expert parallelism under torchrun: routed experts sharded over all ranks (docs/multinode.md)",
    )
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.pretrain import PretrainConfig, pretrain

    data = args.data[0] if len(args.data) == 1 else list(args.data)
    pretrain(
        PretrainConfig(
            out=args.out,
            data=data,
            text_field=args.text_field,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            tokenizer_docs=args.tokenizer_docs,
            preset=args.preset,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            accumulation=args.accumulation,
            lr=args.lr,
            min_lr_ratio=args.min_lr_ratio,
            warmup_steps=args.warmup_steps,
            schedule=args.schedule,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
            precision=args.precision,
            bias_update_speed=args.bias_update_speed,
            balance_alpha=args.balance_alpha,
            mtp_weight=args.mtp_weight,
            document_mask=not args.no_document_mask,
            whole_documents=not args.cut_documents,
            mask_prompts=not args.prompt_loss,
            val_every=args.val_every,
            val_batches=args.val_batches,
            checkpoint_every=args.checkpoint_every,
            expert_load_every=args.expert_load_every,
            seed=args.seed,
            resume=args.resume,
            tensorboard=args.tensorboard,
            threads=args.threads,
            progress=not args.no_progress,
            expert_parallel=args.ep,
        )
    )
    return 0
