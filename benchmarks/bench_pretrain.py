"""Pretraining benchmark: `tiny` on the embedded corpus for a fixed token budget, with and without
DeepSeek-V3's auxiliary-loss-free balancing bias.

    python benchmarks/bench_pretrain.py                       # 400k tokens per run, γ = 0 and γ = 0.001
    python benchmarks/bench_pretrain.py --tokens 100k --gammas 0 0.001 0.01 --json

Each run is a full `nanoseek pretrain` (same tokenizer, seed, data order and schedule; only γ differs),
and the figures come from its metrics.jsonl:
- tokens/s and MFU: medians over the steps after the first 5 (MFU = model FLOP/s over the machine's
  measured matmul peak for the precision, `nanoseek.perf.matmul_peak_flops`);
- final train loss (mean of the last 10 steps' main next-token loss) and validation loss;
- expert-load imbalance max/mean: the ratio of the busiest expert's tokens to the mean, per MoE layer
  per step; reported as the mean over the last 25% of steps of the worst layer, and of all layers.
  1.0 is perfectly balanced; with top-k of E experts the ceiling is E/k.

Measured (fp32, 1 thread, on a 2-core machine shared with ~6 other jobs, so absolute speed is ~1/4 of
one core; `--tokens 96k --batch-size 8 --seq-len 128`, 93 steps, 16 experts top-4):

      γ    tok/s   train    val   imbalance worst / mean layer
      0      195   2.158  2.130   3.79 / 3.01
  0.001      215   2.179  2.158   3.67 / 2.56
   0.01      198   2.184  2.147   1.62 / 1.42

γ = 0.001 (V3's value, tuned for ~15T tokens) moves each bias by at most 0.093 in 93 steps: a start;
γ = 0.01 balances within this short run at no cost in loss. MFU figures are against a matmul peak
measured on the same loaded machine, so they are only comparable within one run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path


def parse_tokens(text: str) -> int:
    from nanoseek.accounting import parse_count

    return int(parse_count(text, "tokens"))


def run_one(args: argparse.Namespace, gamma: float, tok_dir: Path, out: Path) -> dict:
    from nanoseek.metrics import read_metrics
    from nanoseek.train.pretrain import PretrainConfig, pretrain

    per_step = args.batch_size * args.seq_len
    steps = max(1, args.tokens // per_step)
    t0 = time.perf_counter()
    pretrain(
        PretrainConfig(
            out=str(out),
            tokenizer=str(tok_dir),
            preset=args.preset,
            steps=steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            warmup_steps=max(1, steps // 20),
            precision=args.precision,
            bias_update_speed=gamma,
            val_every=steps,
            val_batches=args.val_batches,
            checkpoint_every=0,
            seed=args.seed,
            threads=args.threads,
            progress=not args.no_progress,
        )
    )
    wall = time.perf_counter() - t0
    recs = [r for r in read_metrics(out, stage="pretrain") if "loss" in r and "event" not in r]
    timed = recs[5:] or recs
    tail = recs[-max(1, len(recs) // 4) :]
    val = [r["val_loss"] for r in read_metrics(out, stage="pretrain") if "val_loss" in r]
    per_layer = [statistics.mean(r["expert_imbalance"].values()) for r in tail]
    return {
        "gamma": gamma,
        "steps": steps,
        "tokens": steps * per_step,
        "wall_s": round(wall, 1),
        "tok_per_s": statistics.median(r["tok_per_s"] for r in timed),
        "mfu": statistics.median(r.get("mfu", 0.0) for r in timed),
        "train_loss": statistics.mean(r.get("lm_loss", r["loss"]) for r in recs[-10:]),
        "val_loss": val[-1] if val else None,
        "imbalance_worst_layer": statistics.mean(r["expert_imbalance_max"] for r in tail),
        "imbalance_mean_layer": statistics.mean(per_layer),
        "imbalance_by_layer": {
            layer: round(statistics.mean(r["expert_imbalance"][layer] for r in tail), 3)
            for layer in tail[-1]["expert_imbalance"]
        },
    }


def main() -> None:
    from nanoseek.options import thread_count, torch_seed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=parse_tokens, default=parse_tokens("400k"), help="token budget per run")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.001], help="bias update speeds γ")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--precision", default="auto")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer-docs", type=int, default=20000)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--seed", type=torch_seed, default=0)
    p.add_argument("--threads", type=thread_count, default=None)
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()

    from nanoseek.data.corpus import iter_documents
    from nanoseek.tokenizer import train_tokenizer

    root = Path(args.out or tempfile.mkdtemp(prefix="bench_pretrain_"))
    if not args.out:  # the runs' checkpoints are hundreds of MB: a temporary directory goes at exit
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        docs = list(islice(iter_documents("embedded", seed=args.seed), args.tokenizer_docs))
        train_tokenizer(docs, vocab_size=args.vocab_size).save(tok_dir)
    results = [run_one(args, g, tok_dir, root / f"gamma_{g:g}") for g in args.gammas]

    from nanoseek.perf import cpu_description, default_device
    from nanoseek.train.pretrain import resolve_precision

    for r in results:  # what the printed figures say beside them, in the JSON too
        r.update(cpu=cpu_description(), precision=resolve_precision(args.precision, default_device()))
    print()
    print(f"cpu: {cpu_description()}")
    print(f"{args.preset} on the embedded corpus, {results[0]['tokens']:,} tokens per run ({results[0]['steps']} steps "
          f"of {args.batch_size}x{args.seq_len}, {results[0]['precision']}):")  # fmt: skip
    print(
        f"{'γ':>7} {'tok/s':>8} {'MFU':>7} {'train':>7} {'val':>7} {'imb worst':>10} {'imb mean':>9}  per layer"
    )
    for r in results:
        val = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-"
        layers = " ".join(f"{k}:{v:.2f}" for k, v in r["imbalance_by_layer"].items())
        print(
            f"{r['gamma']:>7g} {r['tok_per_s']:>8.0f} {100 * r['mfu']:>6.1f}% {r['train_loss']:>7.3f} {val:>7} "
            f"{r['imbalance_worst_layer']:>10.2f} {r['imbalance_mean_layer']:>9.2f}  {layers}"
        )
    if args.json:
        print(json.dumps(results, indent=2))
    # a temporary directory goes at exit: naming it sent the user to look for runs no longer there
    kept = f"runs in {root}" if args.out else "the runs are deleted at exit (--out DIR keeps them)"
    print(f"bench_pretrain: {len(results)} runs in {sum(r['wall_s'] for r in results):.0f}s; {kept}")


if __name__ == "__main__":
    main()
