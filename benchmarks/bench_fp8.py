"""FP8 vs BF16 training of a model preset (`tiny` by default): step time and loss curve on a synthetic
token stream, on the GPU where there is one (FP8 tensor cores: Hopper and later), else the CPU.

Both runs start from the same weights and see the same batches. BF16 = FP32 master weights with
bf16 autocast (`--rest fp32`: plain fp32, the fast precision of CPUs without bf16 units); FP8 = the
same plus `convert_to_fp8_training` (fine-grained FP8 for every linear layer's Fprop/Dgrad/Wgrad
GEMMs and the routed experts; head, router, norms, attention core stay higher precision, as in
DeepSeek-V3 §3.3). The stream is a random Markov chain (each token has a few
likely successors), so the loss has somewhere to go. Prints the relative difference of the final
loss (mean of the last 10 steps); the V3 report saw under 0.25% at scale.

    python benchmarks/bench_fp8.py [--steps 300] [--batch 8] [--seq 128] [--rest bf16|fp32]
                                   [--preset tiny] [--device cpu|cuda] [--backend auto] [--pow2]
                                   [--json out.json] [--plot curve.png]

On a CPU, FP8 is slower than BF16: the quantization passes and the per-128-chunk GEMMs (the FP32
promotion of the V3 recipe) cost more than they save without FP8 tensor cores.
"""

from __future__ import annotations

import os

# Spinning OpenMP threads starve each other on a shared, oversubscribed CPU; sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nanoseek.config import get_preset  # noqa: E402
from nanoseek.model.fp8 import FP8Recipe, convert_to_fp8_training, resolve_backend  # noqa: E402
from nanoseek.model.transformer import DeepSeekV3, cross_entropy  # noqa: E402
from nanoseek.options import thread_count, torch_seed  # noqa: E402


def markov_stream(vocab: int, batch: int, seq: int, steps: int, seed: int, branching: int = 4):
    """`steps` batches [batch, seq+1] from a fixed random chain with `branching` successors per token."""
    gen = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, branching), generator=gen)
    for _ in range(steps):
        x = torch.empty(batch, seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        choice = torch.randint(0, branching, (batch, seq), generator=gen)
        for t in range(seq):
            x[:, t + 1] = succ[x[:, t], choice[:, t]]
        yield x


def train(
    model: DeepSeekV3, batches: list[torch.Tensor], lr: float, label: str, autocast: bool
) -> tuple[list[float], list[float]]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, len(batches) // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    losses, times = [], []
    bar = tqdm(batches, desc=label, unit="step")
    device = next(model.parameters()).device
    for x in bar:
        x = x.to(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x[:, :-1])
        loss = cross_entropy(logits, x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())  # waits for the step on a GPU
        times.append(time.perf_counter() - t)
        bar.set_postfix(loss=f"{loss.item():.3f}", s_per_step=f"{times[-1]:.2f}")
    return losses, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=torch_seed, default=0)
    p.add_argument("--threads", type=thread_count, default=min(2, os.cpu_count() or 1))
    p.add_argument("--backend", default="auto", choices=["auto", "scaled_mm", "emulate"])
    p.add_argument("--pow2", action="store_true", help="power-of-two (UE8M0) scales")
    p.add_argument(
        "--rest",
        default="bf16",
        choices=["bf16", "fp32"],
        help="precision of everything that is not an FP8 GEMM, in both runs: the baseline's GEMMs, and "
        "the head/attention/norms of the FP8 run (bf16 = autocast, as V3; fp32 is much faster on CPUs "
        "without bf16 matmul units)",
    )
    p.add_argument("--preset", default="tiny", help="model preset (its MTP layers left out)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    p.add_argument("--json", default=None, help="write the curves and timings here")
    p.add_argument("--plot", default=None, help="save the two loss curves to this PNG")
    args = p.parse_args()
    if args.steps < 10:
        p.error("--steps must be >= 10 (the final loss is a mean over the last 10 steps)")
    torch.set_num_threads(args.threads)

    from nanoseek.checkpoint import resolve_device
    from nanoseek.perf import default_device

    try:  # `--device cuda` without a GPU: a usage error, not torch's AssertionError after the build
        device = resolve_device(args.device or default_device())
    except ValueError as e:
        p.error(str(e))
    cfg = get_preset(args.preset).replace(num_nextn_predict_layers=0)
    base = DeepSeekV3.build(cfg, device=device).init_weights(args.seed)
    batches = list(markov_stream(cfg.vocab_size, args.batch, args.seq, args.steps, args.seed + 1))
    recipe = FP8Recipe(pow2_scales=args.pow2, backend=args.backend)
    backend = resolve_backend(recipe, device)

    base_model = copy.deepcopy(base)
    fp8_model = copy.deepcopy(base)
    n_fp8 = convert_to_fp8_training(fp8_model, recipe)
    autocast = args.rest == "bf16"
    base_losses, base_times = train(base_model, batches, args.lr, args.rest, autocast)
    fp8_losses, fp8_times = train(fp8_model, batches, args.lr, "fp8", autocast)

    skip = min(3, args.steps // 10)  # first steps include allocator/first-call warmup
    t_base = statistics.median(base_times[skip:])
    t_fp8 = statistics.median(fp8_times[skip:])
    final_base = statistics.fmean(base_losses[-10:])
    final_fp8 = statistics.fmean(fp8_losses[-10:])
    rel = (final_fp8 - final_base) / final_base
    tokens = args.batch * args.seq

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        from nanoseek.perf import cpu_description

        where = f"{args.threads} CPU threads of {cpu_description()}"
    print(f"\n{args.preset} preset, {args.steps} steps of {args.batch}x{args.seq} tokens, {where}")
    scales = "UE8M0 (power-of-two)" if args.pow2 else "fp32"
    print(
        f"FP8 path: {n_fp8} modules, E4M3 with {scales} scales, GEMM backend {backend}; rest in {args.rest}"
    )
    print(f"{'step':>6} {args.rest + ' loss':>10} {'fp8 loss':>10}")
    for i in sorted({0, *range(args.steps // 10 - 1, args.steps, max(1, args.steps // 10))}):
        print(f"{i + 1:>6} {base_losses[i]:>10.4f} {fp8_losses[i]:>10.4f}")
    print(
        f"step time  {args.rest} {t_base * 1e3:.0f} ms ({tokens / t_base:.0f} tok/s)   "
        f"fp8 {t_fp8 * 1e3:.0f} ms ({tokens / t_fp8:.0f} tok/s)   fp8/{args.rest} = {t_fp8 / t_base:.2f}x"
    )
    print(
        f"final loss (mean of last 10 steps): {args.rest} {final_base:.4f}, fp8 {final_fp8:.4f}, "
        f"relative difference {rel:+.2%}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "steps": args.steps,
                    "batch": args.batch,
                    "seq": args.seq,
                    "device": where,
                    "rest": args.rest,  # the baseline's precision, and the FP8 run's outside its GEMMs
                    "backend": backend,
                    "pow2": args.pow2,
                    "base_losses": base_losses,
                    "fp8_losses": fp8_losses,
                    "baseline_step_s": t_base,
                    "fp8_step_s": t_fp8,
                    "final_loss_rel_diff": rel,
                },
                f,
            )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(base_losses, label=args.rest.upper(), lw=1)
        ax.plot(fp8_losses, label=f"FP8 (1x128 / 128x128, {backend})", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{args.preset}: FP8 vs {args.rest.upper()}, final loss {rel:+.2%}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
