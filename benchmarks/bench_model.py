"""Training-step benchmark: nanoseek vs transformers' DeepseekV3ForCausalLM, same weights, same batch.

    python benchmarks/bench_model.py                 # fp32 and bf16 autocast, then the 8-vs-64 figure
    python benchmarks/bench_model.py --precision fp32 --steps 8

A step is forward + cross-entropy + backward + AdamW, timed for both models alternately in one process
(so a noisy machine slows both alike). Each side computes its loss the way its library trains:
nanoseek's `model(inputs, labels=targets)` (cross-entropy fused with the head), transformers' logits
upcast to fp32 and `F.cross_entropy` (what its `ForCausalLMLoss` does); both use fused AdamW (the
`Trainer` default of transformers on torch >= 2.8, and nanoseek's Trainer's). Reported per precision: tokens/s of each, the ratio, and MFU =
model FLOP/s / the machine's measured matmul peak for that dtype (`nanoseek.perf.matmul_peak_flops`).

Model FLOPs per token for training = 6 x active matmul parameters (attention projections, the dense MLP,
router, shared expert, the top-k routed experts, lm_head; not the embedding lookup) + 3 x the attention
score/value FLOPs of a causal forward (2 x heads x (qk_head_dim + v_head_dim) x (S+1)/2 per layer), as
`nanoseek.accounting.flops_per_token` counts them for every training command.

The default shape is DeepSeek's fine-grained MoE at small scale: hidden 256, 4 layers (first dense),
4 heads, q_lora 128, kv_lora 64, nope 32, rope 16, v 32, 64 routed experts top-6 (8 groups, 4 kept),
moe_intermediate 64, 1 shared expert, dense intermediate 768, vocab 4096, seq 256, batch 8, no MTP
(transformers has none).

The scaling figure: the same tokens and top-k through 8 and through 64 experts (forward + backward,
nanoseek): with grouped compute the time follows the active parameters, so both should be about equal.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanoseek.accounting import flops_per_token
from nanoseek.checkpoint import build_model, save_model
from nanoseek.config import ModelConfig
from nanoseek.options import thread_count, torch_seed
from nanoseek.perf import cpu_description, matmul_peak_flops, tune_malloc


def bench_config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=64,
        n_shared_experts=1,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=0,
        max_position_embeddings=4096,
        torch_dtype="float32",
    )
    base.update(changes)
    return ModelConfig(**base)


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class Runner:
    """One model + its AdamW; `step()` runs and times one training step."""

    def __init__(self, name: str, model: torch.nn.Module, hf: bool, precision: str) -> None:
        self.name, self.model, self.hf = name, model.train(), hf
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        self.precision = precision
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, record: bool = True) -> None:
        ctx = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        t0 = time.perf_counter()
        with ctx:
            if self.hf:
                loss = loss_of(self.model(inputs).logits, targets)
            else:
                loss = self.model(inputs, labels=targets)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
            self.losses.append(loss.item())


def require_transformers(script: str) -> None:
    """Exits with what to install where transformers, the reference these benchmarks measure against
    and an optional dependency, is missing: before any work (a traceback came after minutes of it)."""
    if importlib.util.find_spec("transformers") is None:
        raise SystemExit(
            f"{script}: transformers is not installed (the reference it measures against): "
            "pip install 'transformers>=5.14' (or pip install 'nanoseek[test]')"
        )


def load_transformers(directory: str, experts_impl: str | None):
    import transformers

    kwargs = {"experts_implementation": experts_impl} if experts_impl else {}
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)


def compare(args: argparse.Namespace, precision: str) -> dict:
    cfg = bench_config()
    ours = build_model(cfg).init_weights(args.seed)
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        ref = load_transformers(d, args.hf_experts)
    gen = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():  # same function before any step
        diff = (ours(inputs[:1, :32]) - ref(inputs[:1, :32]).logits).abs().max().item()
    runners = [
        Runner("nanoseek", ours, hf=False, precision=precision),
        Runner("transformers", ref, hf=True, precision=precision),
    ]
    for _ in range(args.warmup):
        for r in runners:
            r.step(inputs, targets, record=False)
    for _ in tqdm(range(args.steps), desc=f"train steps {precision}", file=sys.stderr, leave=False):
        for r in runners:
            r.step(inputs, targets)
    tokens = args.batch * args.seq
    flops_tok = flops_per_token(cfg, args.seq, training=True)
    peak = matmul_peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32)
    result = {
        "precision": precision,
        "logits_max_diff_at_start": diff,
        "flops_per_token": flops_tok,
        "peak_flops": peak,
    }
    for r in runners:
        t = statistics.median(r.times)
        result[r.name] = {
            "step_s": t,
            "step_s_best": min(r.times),
            "tok_s": tokens / t,
            "tok_s_best": tokens / min(r.times),
            "mfu": tokens * flops_tok / t / peak,
            "first_loss": r.losses[0],
            "last_loss": r.losses[-1],
        }
    result["ratio"] = result["nanoseek"]["tok_s"] / result["transformers"]["tok_s"]
    # On a shared machine the fastest step is the least disturbed one: report that ratio too.
    result["ratio_best"] = result["nanoseek"]["tok_s_best"] / result["transformers"]["tok_s_best"]
    return result


def scaling(args: argparse.Namespace) -> dict:
    """Forward + backward time of nanoseek with 8 vs 64 routed experts, same tokens and top-k."""
    times = {}
    gen = torch.Generator().manual_seed(args.seed)
    inputs = torch.randint(0, 4096, (args.batch, args.seq), generator=gen)
    models = {
        e: build_model(bench_config(n_routed_experts=e, n_group=1, topk_group=1)).init_weights(0)
        for e in (8, 64)
    }
    samples: dict[int, list[float]] = {8: [], 64: []}
    for i in tqdm(range(args.warmup + args.steps), desc="8 vs 64 experts", file=sys.stderr, leave=False):
        for e, m in models.items():
            t0 = time.perf_counter()
            m(inputs).float().logsumexp(-1).mean().backward()
            dt = time.perf_counter() - t0
            m.zero_grad(set_to_none=True)
            if i >= args.warmup:
                samples[e].append(dt)
    for e in models:
        times[e] = statistics.median(samples[e])
    return {
        "fwd_bwd_s_8_experts": times[8],
        "fwd_bwd_s_64_experts": times[64],
        "ratio_64_over_8": times[64] / times[8],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--seed", type=torch_seed, default=0)
    p.add_argument("--threads", type=thread_count, default=2)
    p.add_argument(
        "--hf-experts", default=None, help="transformers experts_implementation (default: its own default)"
    )
    p.add_argument("--no-scaling", action="store_true", help="skip the 8-vs-64-experts figure")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0 (the figures are medians over the timed steps)")
    require_transformers("bench_model")
    # nanoseek's commands run with freed memory kept for reuse (nanoseek.perf.tune_malloc); it is a
    # process-wide setting, so both sides of the comparison run with it.
    tune_malloc()
    torch.set_num_threads(args.threads)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    results: dict = {
        "cpu": cpu_description(),
        "config": bench_config().to_dict(),
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
    }
    if not args.json:
        print(f"cpu: {results['cpu']}; {args.threads} threads; precisions {', '.join(precisions)}")
    for prec in precisions:
        r = compare(args, prec)
        results[prec] = r
        if not args.json:
            n, h = r["nanoseek"], r["transformers"]
            print(
                f"{prec:>5}: nanoseek {n['tok_s']:8.0f} tok/s (MFU {n['mfu']:5.1%})  "
                f"transformers {h['tok_s']:8.0f} tok/s (MFU {h['mfu']:5.1%})  "
                f"ratio {r['ratio']:.2f}x (median step), {r['ratio_best']:.2f}x (best step: "
                f"{n['tok_s_best']:.0f} vs {h['tok_s_best']:.0f} tok/s)  [peak {r['peak_flops'] / 1e9:.0f} GFLOP/s, "
                f"{r['flops_per_token'] / 1e6:.2f} MFLOP/token, start diff {r['logits_max_diff_at_start']:.1e}]",
                flush=True,
            )
    if not args.no_scaling:
        s = scaling(args)
        results["scaling"] = s
        if not args.json:
            print(
                f"experts: fwd+bwd {s['fwd_bwd_s_8_experts'] * 1e3:.0f} ms with 8, "
                f"{s['fwd_bwd_s_64_experts'] * 1e3:.0f} ms with 64 (x{s['ratio_64_over_8']:.2f}), same top-6"
            )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        best = max((results[p]["ratio"] for p in precisions), default=0)
        print(f"done: best nanoseek/transformers ratio {best:.2f}x over {', '.join(precisions)}")


if __name__ == "__main__":
    main()
