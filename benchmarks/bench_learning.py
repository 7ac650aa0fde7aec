"""What makes a small DeepSeek-style model learn fast on a CPU: controlled pretraining experiments.

    python benchmarks/bench_learning.py --list                       # the variants and what each changes
    python benchmarks/bench_learning.py baseline recipe --steps 300  # two variants, 300 steps each
    python benchmarks/bench_learning.py recipe --seeds 0 1 2 --json out.json

Every variant trains from the same seed on the same kind of data with nanoseek's own trainer
(`nanoseek.train.loop.Trainer`: AdamW, schedule, precision, aux-loss-free balancing, MTP loss) and
differs from the `base` settings in the fields it names, nothing else. Every `--eval-every` steps it
records, on held-out problems (`nanoseek.probe`):
- the loss on the response's *copied* tokens (digits of numbers the document already wrote: what a
  model that cannot look back at its prompt never learns), on the other digits, on the template text
  and on the final answer;
- greedy accuracy on held-out prompts of each task family, scored by the task's verifier;
- the training wall time so far (evaluation excluded) and the tokens seen.
The summary gives tokens-to-copy and seconds-to-copy: the first evaluation at which the copied-token
loss is at or below `--copy-threshold` (0.1 nats, the `cpu` preset's goal).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

FAMILIES = (
    "arithmetic?ops=add",
    "arithmetic?ops=sub",
    "arithmetic?ops=mul&digits=3",
    "comparison",
    "sorting",
    "counting",
    "linear_equation",
)


@dataclass
class Variant:
    """One experiment's settings; each named variant changes a few of these from `base`."""

    name: str = "base"
    about: str = ""
    # data
    tasks: tuple[str, ...] = FAMILIES
    languages: tuple[str, ...] = ("en", "ja", "zh")
    shapes: dict[str, float] | None = None  # None: nanoseek.data.synthetic.SHAPES
    harder_fraction: float = 0.15
    vocab_size: int = 4096
    # model
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides
    init_std: float | None = None  # None: the preset's initializer_range
    fan_in_init: bool = False  # every matrix N(0, 1/fan_in) (output projections / sqrt(2 layers))
    # training
    document_mask: bool = False
    whole_documents: bool = False
    response_loss_only: bool = False  # no loss on chat prompts (random numbers nothing can predict)
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    optimizer: str = "adamw"
    warmup_steps: int = 20
    weight_decay: float = 0.1
    mtp_weight: float = 0.3
    bias_update_speed: float = 0.01
    precision: str = "auto"


def _v(name: str, about: str, **changes: Any) -> Variant:
    return replace(Variant(), name=name, about=about, **changes)


# The settings each family of variants starts from. OLD is the former `cpu` preset's pretraining
# (transformers' init, mixed document shapes with 15% harder problems, contiguous packing, rows
# attending across documents); RECIPE adds the two leads; LEAN2 is what the `cpu` preset now uses
# apart from its longer window (320, so a long multiplication fits whole) and the MTP loss.
MIXED = {"chat": 0.35, "series": 0.15, "explained": 0.10, "textbook": 0.10, "plain": 0.30}
OLD: dict[str, Any] = dict(init_std=0.02, shapes=MIXED, harder_fraction=0.15, vocab_size=4096)
RECIPE: dict[str, Any] = {**OLD, "init_std": 0.0625, "document_mask": True}
LEAN: dict[str, Any] = {
    **RECIPE,
    "whole_documents": True,
    "shapes": {"chat": 1.0},
    "vocab_size": 1024,
    "mtp_weight": 0.0,
}
LEAN2: dict[str, Any] = {**LEAN, "harder_fraction": 0.0, "response_loss_only": True}
DENSE = {  # a dense SwiGLU in every layer of the MoE layers' active width (shared + 4 x 128)
    "n_routed_experts": 0,
    "n_shared_experts": 0,
    "num_experts_per_tok": 0,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 4,
    "intermediate_size": 640,
}
H192 = {
    "hidden_size": 192,
    "intermediate_size": 576,
    "moe_intermediate_size": 96,
    "q_lora_rank": 96,
    "kv_lora_rank": 48,
    "n_routed_experts": 12,
    "num_experts_per_tok": 3,
    "n_group": 3,
    "topk_group": 2,
}
H128 = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "moe_intermediate_size": 64,
    "q_lora_rank": 64,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 24,
    "qk_rope_head_dim": 8,
    "v_head_dim": 24,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
}
COPY_MIX = {**MIXED, "copy": 0.15}

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        _v("baseline", "the former cpu preset: init N(0, 0.02), rows attend across packed documents", **OLD),
        _v("docmask", "attention and positions confined to each packed document", **OLD, document_mask=True),
        _v(
            "init0625", "weights N(0, 0.0625 = 1/sqrt(hidden)) instead of 0.02", **{**OLD, "init_std": 0.0625}
        ),
        _v("recipe", "init 1/sqrt(hidden) + document mask", **RECIPE),
        _v("recipe-fanin", "document mask + every matrix N(0, 1/fan_in)", **RECIPE, fan_in_init=True),
        _v("recipe-init04", "recipe with init 0.04", **{**RECIPE, "init_std": 0.04}),
        _v("recipe-init09", "recipe with init 0.09", **{**RECIPE, "init_std": 0.09}),
        _v(
            "recipe-chat",
            "recipe, chat documents only (what is evaluated)",
            **{**RECIPE, "shapes": {"chat": 1.0}},
        ),
        _v("recipe-copy", "recipe + 15% copy drills", **{**RECIPE, "shapes": COPY_MIX}),
        _v(
            "recipe-chatcopy",
            "recipe, chat documents + 15% copy drills",
            **{**RECIPE, "shapes": {"chat": 0.85, "copy": 0.15}},
        ),
        _v(
            "recipe-comparison",
            "recipe on comparison problems only (the former preset's corpus)",
            **RECIPE,
            tasks=("comparison",),
        ),
        _v("recipe-en", "recipe, English only", **RECIPE, languages=("en",)),
        _v("recipe-v1024", "recipe, vocabulary 1024", **{**RECIPE, "vocab_size": 1024}),
        _v("recipe-v2048", "recipe, vocabulary 2048", **{**RECIPE, "vocab_size": 2048}),
        _v("recipe-nomtp", "recipe without the MTP loss", **RECIPE, mtp_weight=0.0),
        _v("recipe-lr1e3", "recipe at lr 1e-3", **RECIPE, lr=1e-3),
        _v("recipe-lr6e3", "recipe at lr 6e-3", **RECIPE, lr=6e-3),
        _v("recipe-fp32", "recipe in fp32", **RECIPE, precision="fp32"),
        _v("recipe-bf16", "recipe in bf16 autocast", **RECIPE, precision="bf16"),
        _v("recipe-dense", "recipe on a dense model of the same active width", **RECIPE, model=DENSE),
        _v(
            "lean",
            "recipe + whole documents, chat only, vocabulary 1024, no MTP loss (cheaper steps)",
            **LEAN,
        ),
        _v("lean-mtp", "lean with the MTP loss", **{**LEAN, "mtp_weight": 0.3}),
        _v("lean-lr6e3", "lean at lr 6e-3", **LEAN, lr=6e-3),
        _v("lean-respond", "lean with no loss on the prompts", **{**LEAN, "response_loss_only": True}),
        _v("lean-easy", "lean without the one-level-harder problems", **{**LEAN, "harder_fraction": 0.0}),
        _v(
            "lean-h192", "lean on hidden 192, 12 experts of 96", **{**LEAN, "init_std": 192**-0.5}, model=H192
        ),
        _v("lean-h128", "lean on hidden 128, 8 experts of 64", **{**LEAN, "init_std": 128**-0.5}, model=H128),
        _v("lean2", "lean + no harder problems + no loss on prompts (the cpu preset's corpus)", **LEAN2),
        _v("lean2-mtp", "lean2 with the MTP loss", **{**LEAN2, "mtp_weight": 0.3}),
        _v(
            "lean2-seq320", "lean2 in windows of 320 (a long multiplication fits whole)", **LEAN2, seq_len=320
        ),
        _v("lean2-theta200", "lean2 with RoPE base 200", **LEAN2, model={"rope_theta": 200.0}),
        _v(
            "lean2-rope32",
            "lean2 with 32 RoPE dims instead of 16",
            **LEAN2,
            model={"qk_rope_head_dim": 32, "qk_nope_head_dim": 16},
        ),
        _v(
            "lean2-heads8",
            "lean2 with 8 heads of 16+16 dims instead of 4 of 32+16",
            **LEAN2,
            model={"num_attention_heads": 8, "qk_nope_head_dim": 16, "v_head_dim": 16},
        ),
        _v("lean2-dense", "lean2 on a dense model of the MoE layers' active width", **LEAN2, model=DENSE),
        _v(
            "lean2-muon",
            "lean2 with Muon on the hidden matrices (AdamW on the rest)",
            **LEAN2,
            optimizer="muon",
        ),
        _v(
            "lean2-mtp-muon",
            "the cpu preset's pretraining: lean2 with the MTP loss, windows of 320, Muon",
            **{**LEAN2, "mtp_weight": 0.3},
            seq_len=320,
            optimizer="muon",
        ),
        _v(
            "lean2-mtp-adamw",
            "the cpu preset's pretraining before Muon: lean2 with the MTP loss, windows of 320",
            **{**LEAN2, "mtp_weight": 0.3},
            seq_len=320,
        ),
    ]
}


# ------------------------------------------------------------------------------------------- runs
def _documents(v: Variant, seed: int, for_tokenizer: bool = False) -> Any:
    """The variant's corpus; `for_tokenizer`: without the strings its problems spell letter by letter,
    as every nanoseek tokenizer trained on the embedded corpus (`corpus.tokenizer_documents`)."""
    from nanoseek.data.synthetic import iter_documents

    return iter_documents(
        seed=seed,
        split="train",
        languages=v.languages,
        tasks=v.tasks,
        shapes=v.shapes,
        harder_fraction=v.harder_fraction,
        blank_spelled=for_tokenizer,
    )


def _corpus(v: Variant, seed: int, cache: Path) -> tuple[Path, Path]:
    """(jsonl of training documents, tokenizer dir) for the variant's data settings, cached by them."""
    import nanoseek.data.synthetic
    import nanoseek.data.tasks
    from nanoseek.atomic import atomic_file
    from nanoseek.tokenizer import load_tokenizer, train_tokenizer

    # the generators' source is part of the key: a changed worked-solution format is a new corpus
    sources = [
        Path(nanoseek.data.synthetic.__file__),
        *sorted(Path(nanoseek.data.tasks.__file__).parent.glob("*.py")),
    ]
    code = "".join(p.read_text() for p in sources)
    key = json.dumps([v.tasks, v.languages, v.shapes, v.harder_fraction, seed, code], sort_keys=True)
    tag = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
    data = cache / f"docs-{tag}.jsonl"
    if not data.exists():
        # enough documents for the longest run; PackedDataset repeats the file if a run outgrows it
        docs = islice(_documents(v, seed), 120_000)
        with atomic_file(data) as tmp, open(tmp, "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    tok_dir = cache / f"tok-{tag}-{v.vocab_size}"
    if not (tok_dir / "tokenizer.json").exists():
        tok = train_tokenizer(list(islice(_documents(v, seed, True), 20_000)), vocab_size=v.vocab_size)
        tok.save(tok_dir)
    load_tokenizer(tok_dir)
    return data, tok_dir


def run_variant(
    v: Variant,
    seed: int,
    eval_every: int,
    probe_n: int,
    acc_n: int,
    cache: Path,
    max_new_tokens: int,
    acc_every: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    import torch

    from nanoseek.checkpoint import build_model
    from nanoseek.config import resolve_config
    from nanoseek.data.corpus import PackedDataset, window_tokens
    from nanoseek.probe import greedy_accuracy, probe_documents, probe_losses
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.loop import OptimConfig, Trainer, language_model_loss
    from nanoseek.train.pretrain import resolve_precision
    from nanoseek.train.study import sized_to, train_evaluating

    data, tok_dir = _corpus(v, seed, cache)
    tok = load_tokenizer(tok_dir)
    config = sized_to(resolve_config(v.preset), tok).replace(**v.model)
    if v.init_std is not None:
        config.extra["initializer_range"] = v.init_std
    precision = resolve_precision(v.precision, torch.device("cpu"))
    torch.manual_seed(seed)
    model = build_model(config).init_weights(seed)
    if v.fan_in_init:
        _fan_in_init(model, seed)
    model.set_balance_alpha(1e-4)  # α of `nanoseek pretrain`'s default (V3 §4.2)
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(
            model,
            run,
            "pretrain",
            OptimConfig(
                lr=v.lr,
                weight_decay=v.weight_decay,
                warmup_steps=min(v.warmup_steps, v.steps // 2),
                optimizer=v.optimizer,
            ),
            total_steps=v.steps,
            precision=precision,
            bias_update_speed=v.bias_update_speed,
        )
        batches = iter(
            PackedDataset(
                str(data),
                tok,
                v.seq_len,
                v.batch_size,
                split="train",
                val_fraction=0.0,
                seed=seed,
                whole_documents=v.whole_documents,
                mask_prompts=v.response_loss_only,
            )
        )
        probe = probe_documents(tok, v.tasks, probe_n, seed=seed)
        curve: list[dict[str, Any]] = []
        last: dict[str, Any] = {}

        def evaluate(train_s: float, final: bool) -> None:
            step = trainer.global_step
            with trainer.autocast():
                losses = probe_losses(model, probe)
            acc = {}
            if acc_n and (step == v.steps or (acc_every and step % acc_every == 0)):
                acc = greedy_accuracy(model, tok, v.tasks, acc_n, max_new_tokens=max_new_tokens)
            row = {
                "step": step,
                "tokens": step * v.batch_size * v.seq_len,
                "train_s": round(train_s, 1),
                **{k: round(losses[k], 4) for k in ("copy", "digit", "text", "answer") if k in losses},
                "per_task_loss": {k: round(x, 3) for k, x in losses.items() if "/" in k},
                "accuracy": {k: round(a, 3) for k, a in acc.items()},
                "mean_accuracy": round(sum(acc.values()) / len(acc), 3) if acc else None,
            }
            curve.append(row)
            if progress:
                accs = " ".join(
                    f"{k}:{a:.2f}" for k, a in acc.items()
                )  # whole specs: addition and subtraction share a family
                print(
                    f"  {v.name} step {step:5d} {train_s:6.0f}s copy {row['copy']:.3f} digit "
                    f"{row['digit']:.3f} text {row['text']:.3f} answer {row['answer']:.3f} | {accs}",
                    flush=True,
                )

        def loss_fn() -> Any:
            x, y = next(batches)
            return language_model_loss(
                trainer.model,
                x,
                y,
                mtp_weight=v.mtp_weight,
                document_mask=v.document_mask,
                # whole documents: the padding balances nothing, as in `nanoseek pretrain`
                token_mask=window_tokens(x, tok.pad_token_id) if v.whole_documents else None,
            )

        train_evaluating(
            trainer,
            loss_fn,
            evaluate,
            every=eval_every,
            on_step=last.update,
        )

    return {
        "variant": asdict(v),
        "seed": seed,
        "precision": precision,
        "params": model.num_parameters(include_mtp=True),
        "final_train_loss": last.get("lm_loss", last.get("loss")),
        "curve": curve,
    }


def _fan_in_init(model: Any, seed: int) -> None:
    import torch

    from nanoseek.model.moe import RoutedExperts

    gen = torch.Generator().manual_seed(seed + 1)
    depth = (2 * model.config.num_hidden_layers) ** -0.5
    with torch.no_grad():
        for name, m in model.named_modules():
            ws = []
            if isinstance(m, torch.nn.Linear):
                ws = [(m.weight, m.weight.shape[1], name.endswith(("o_proj", "down_proj")))]
            elif isinstance(m, RoutedExperts):
                ws = [
                    (m.gate_up_proj, m.gate_up_proj.shape[2], False),
                    (m.down_proj, m.down_proj.shape[2], True),
                ]
            for w, fan_in, out in ws:
                std = fan_in**-0.5 * (depth if out else 1.0)
                w.copy_(torch.randn(w.shape, generator=gen) * std)


def summarize(result: dict[str, Any], threshold: float) -> dict[str, Any]:
    curve = result["curve"]
    hit = next((r for r in curve if r.get("copy", 9e9) <= threshold), None)
    end = curve[-1]
    return {
        "variant": result["variant"]["name"],
        "seed": result["seed"],
        "precision": result["precision"],
        "copy": end.get("copy"),
        "digit": end.get("digit"),
        "text": end.get("text"),
        "answer": end.get("answer"),
        "tokens_to_copy": hit["tokens"] if hit else None,
        "seconds_to_copy": hit["train_s"] if hit else None,
        "train_s": end["train_s"],
        "mean_accuracy": end.get("mean_accuracy"),
        "accuracy": end.get("accuracy"),
    }


def main(argv: list[str] | None = None) -> int:
    from nanoseek.options import thread_count, torch_seed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", default=["baseline", "recipe"])
    ap.add_argument("--list", action="store_true", help="list the variants and exit")
    ap.add_argument("--steps", type=int, default=None, help="override every variant's step count")
    ap.add_argument("--seeds", type=torch_seed, nargs="+", default=[0])
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--probe-n", type=int, default=24, help="held-out documents per task for the loss probe")
    ap.add_argument("--acc-n", type=int, default=24, help="held-out prompts per task for greedy accuracy")
    ap.add_argument("--acc-every", type=int, default=0, help="greedy accuracy every N steps (0: at the end)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--copy-threshold", type=float, default=0.1)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "nanoseek-bench-learning"))
    ap.add_argument("--json", default=None, help="write every curve and the summary here")
    ap.add_argument("--threads", type=thread_count, default=None)
    args = ap.parse_args(argv)
    if args.list:
        for v in VARIANTS.values():
            print(f"{v.name:16s} {v.about}")
        return 0
    unknown = [n for n in args.variants if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; see --list")
    import torch

    from nanoseek.perf import cpu_description

    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print(f"cpu: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    results, rows = [], []
    for name in args.variants:
        v = VARIANTS[name]
        if args.steps:
            v = replace(v, steps=args.steps)
        for seed in args.seeds:
            print(f"{name} (seed {seed}): {v.about}", flush=True)
            r = run_variant(
                v, seed, args.eval_every, args.probe_n, args.acc_n, cache, args.max_new_tokens, args.acc_every
            )
            results.append(r)
            rows.append(summarize(r, args.copy_threshold))
            if args.json:
                Path(args.json).write_text(
                    json.dumps({"cpu": cpu_description(), "results": results, "summary": rows}, indent=1)
                )
    print()
    print(
        f"{'variant':16s} {'seed':>4s} {'prec':>4s} {'copy':>6s} {'digit':>6s} {'text':>6s} {'answer':>6s} "
        f"{'tok→copy':>9s} {'s→copy':>7s} {'train s':>7s} {'greedy acc':>10s}"
    )
    for r in rows:
        ttc = f"{r['tokens_to_copy'] / 1e6:.2f}M" if r["tokens_to_copy"] else "-"
        stc = f"{r['seconds_to_copy']:.0f}" if r["seconds_to_copy"] else "-"
        acc = f"{r['mean_accuracy']:.1%}" if r["mean_accuracy"] is not None else "-"
        print(
            f"{r['variant']:16s} {r['seed']:4d} {r['precision']:>4s} {r['copy']:6.3f} {r['digit']:6.3f} {r['text']:6.3f} "
            f"{r['answer']:6.3f} {ttc:>9s} {stc:>7s} {r['train_s']:7.0f} {acc:>10s}"
        )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    raise SystemExit(main())
