"""Ceiling benchmark: how much of the model and engine speed goals this CPU leaves room for.

bench_model and bench_engine measure nanoseek against transformers. This one measures the floor
under both, in the same run: the matrix multiplications each workload cannot skip, timed alone.
Every other operation (softmax, norms, SwiGLU, routing, token gathers, cross-entropy, AdamW,
sampling, Python) has to fit in what a goal leaves above that floor.

Training (bench_model's shape and step, 2 threads):
  every GEMM of one training step, each timed alone (forward, input gradient and weight gradient of
  every linear; routed experts as perfectly balanced groups, their most efficient case; causal
  attention as half of its batched matmuls, as a flash kernel skips masked blocks). Printed against
  the 60%-MFU step budget and against transformers' measured step / 1.5.
Decode (bench_engine's shape, 1 thread, batch 1 and 16):
  the weight matmuls of one decode step as the engine issues them (its fused and folded linears,
  its routed-expert GEMMs with real routing, the LM head), without attention, cache, norms or
  sampling. Printed against transformers' measured step / goal and nanoseek's own step.

Shape changes (1 thread): an expert's GEMM (rows x 256 -> 256) with the same row count every call,
  with a new row count every call (the routed experts' case: rows per expert change every step), and
  with those row counts split as `moe._grouped_mm` splits them (a multiple of ROW_BUCKET plus the
  rest), in fp32 and, where the CPU multiplies bf16 natively, bf16 (oneDNN builds a kernel per shape).

    python benchmarks/bench_ceiling.py [--steps 5] [--json out.json] [--shapes-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench_engine import bench_config as engine_config
from bench_engine import best_of, decode_speed
from bench_model import Runner, load_transformers, require_transformers
from bench_model import bench_config as model_config
from nanoseek.accounting import flops_per_token
from nanoseek.checkpoint import build_model, save_model
from nanoseek.config import ModelConfig
from nanoseek.engine import Engine
from nanoseek.model.moe import _row_pieces
from nanoseek.perf import cpu_description, cpu_has_bf16, matmul_peak_flops, tune_malloc


def best_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up: allocation and BLAS packing buffers
    return best_of(fn, repeats)[0]


# ---------------------------------------------------------------- training
def training_gemms(cfg: ModelConfig, tokens: int, seq: int) -> list[tuple[str, int, tuple, tuple, float]]:
    """(name, count, A shape, B shape, time factor) for every GEMM of one training step."""
    h = cfg.hidden_size
    linears: list[tuple[str, int, int, int, int]] = []  # name, count, rows, in, out
    nh, qk, v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    layers = cfg.num_hidden_layers
    if cfg.q_lora_rank is None:
        linears.append(("q_proj", layers, tokens, h, nh * qk))
    else:
        linears += [
            ("q_a_proj", layers, tokens, h, cfg.q_lora_rank),
            ("q_b_proj", layers, tokens, cfg.q_lora_rank, nh * qk),
        ]
    linears += [
        ("kv_a_proj", layers, tokens, h, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        ("kv_b_proj", layers, tokens, cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + v)),
        ("o_proj", layers, tokens, nh * v, h),
    ]
    moe = sum(cfg.is_moe_layer(i) for i in range(layers))
    dense = layers - moe
    if dense:
        linears += [
            ("dense gate+up", dense, tokens, h, 2 * cfg.intermediate_size),
            ("dense down", dense, tokens, cfg.intermediate_size, h),
        ]
    if moe:
        e, k, inter = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        rows = tokens * k // e
        linears += [
            ("router", moe, tokens, h, e),
            (f"experts gate+up ({e} x {rows} rows)", moe * e, rows, h, 2 * inter),
            (f"experts down ({e} x {rows} rows)", moe * e, rows, inter, h),
        ]
        if cfg.n_shared_experts:
            shared = inter * cfg.n_shared_experts
            linears += [
                ("shared gate+up", moe, tokens, h, 2 * shared),
                ("shared down", moe, tokens, shared, h),
            ]
    linears.append(("lm_head", 1, tokens, h, cfg.vocab_size))
    gemms = []
    for name, count, m, k_in, n in linears:
        gemms.append((f"{name} fwd", count, (m, k_in), (k_in, n), 1.0))
        gemms.append((f"{name} grad input", count, (m, n), (n, k_in), 1.0))
        gemms.append((f"{name} grad weight", count, (k_in, m), (m, n), 1.0))
    # Causal attention: scores, then values; backward: dV, dP, dQ, dK. Half the work is masked.
    bh = tokens // seq * nh
    for name, a, b in (
        ("attention q.k", (bh, seq, qk), (bh, qk, seq)),
        ("attention p.v", (bh, seq, seq), (bh, seq, v)),
    ):
        gemms.append((f"{name} fwd + 2 grads", layers * 3, a, b, 0.5))
    return gemms


def gemm_floor(gemms, repeats: int) -> tuple[float, float, list[dict]]:
    rows, total_s, total_flops = [], 0.0, 0.0
    for name, count, a_shape, b_shape, factor in tqdm(
        gemms, desc="GEMMs alone", file=sys.stderr, leave=False
    ):
        a, b = torch.randn(*a_shape), torch.randn(*b_shape)
        s = best_seconds(lambda a=a, b=b: torch.matmul(a, b), repeats) * count * factor
        flops = 2 * a.numel() * b_shape[-1] * count * factor
        rows.append({"gemm": name, "ms": s * 1e3, "gflop_s": flops / s / 1e9})
        total_s += s
        total_flops += flops
    return total_s, total_flops, rows


def other_work_ms(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Profile nanoseek training steps: (ms in GEMM-class ops and attention kernels, ms in all other ops)."""
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for _ in range(2):
        model(inputs, labels=targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    best = (float("inf"), float("inf"))
    for _ in range(3):  # the least disturbed of three profiled steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(inputs, labels=targets).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        gemm = other = 0.0
        for e in prof.key_averages():
            if not e.key.startswith("aten::"):
                continue  # Python-level and autograd-node ranges: their ops are counted themselves
            ms = e.self_cpu_time_total / 1e3
            if e.key in GEMM_OPS or "scaled_dot_product" in e.key:
                gemm += ms
            else:
                other += ms
        if gemm + other < sum(best):
            best = (gemm, other)
    return best


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"}


def floor_and_peak(gemms, rounds: int, repeats: int) -> tuple[float, float, list[dict], float]:
    """(floor seconds, its GEMM FLOPs, its rows, fp32 matmul peak FLOP/s), each the best of `rounds`.

    This machine's matmul speed drifts by tens of percent within minutes: measure the floor and the
    peak in alternating rounds and keep the best of each (the least disturbed), which is the most
    favourable ceiling, not a pessimistic one."""
    floor_s, gemm_flops, peak, rows = float("inf"), 0.0, 0.0, []
    for _ in tqdm(range(rounds), desc="GEMM floor rounds", file=sys.stderr, leave=False):
        # a new measurement each round: `matmul_peak_flops` is cached, and every round read the first
        matmul_peak_flops.cache_clear()
        peak = max(peak, matmul_peak_flops(torch.float32))
        s, gemm_flops, r = gemm_floor(gemms, repeats)
        if s < floor_s:
            floor_s, rows = s, r
    return floor_s, gemm_flops, rows, peak


def training_ceiling(args: argparse.Namespace) -> dict:
    torch.set_num_threads(2)
    cfg = model_config()
    tokens = args.batch * args.seq
    gemms = training_gemms(cfg, tokens, args.seq)
    floor_s, gemm_flops, rows, peak = floor_and_peak(gemms, args.rounds, args.repeats)
    model_flops = flops_per_token(cfg, args.seq, training=True) * tokens

    ours = build_model(cfg).init_weights(0)
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        ref = load_transformers(d, None)
    batch = torch.randint(
        0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0)
    )
    inputs, targets = batch[:, :-1], batch[:, 1:]
    runners = [
        Runner("nanoseek", ours, hf=False, precision="fp32"),
        Runner("transformers", ref, hf=True, precision="fp32"),
    ]
    for i in tqdm(range(2 + args.steps), desc="training steps", file=sys.stderr, leave=False):
        for r in runners:
            r.step(inputs, targets, record=i >= 2)
    ours_s, hf_s = (min(r.times) for r in runners)
    gemm_ms, other_ms = other_work_ms(ours, inputs, targets)
    mfu_budget = model_flops / (0.6 * peak)
    return {
        "peak_gflop_s": peak / 1e9,
        "model_gflop_per_step": model_flops / 1e9,
        "gemm_gflop_per_step": gemm_flops / 1e9,
        "gemm_floor_ms": floor_s * 1e3,
        "gemm_floor_fraction_of_peak": gemm_flops / floor_s / peak,
        "mfu_if_only_gemms": model_flops / floor_s / peak,
        "mfu_60_budget_ms": mfu_budget * 1e3,
        "nanoseek_step_ms": ours_s * 1e3,
        "transformers_step_ms": hf_s * 1e3,
        "ratio_1_5_budget_ms": hf_s / 1.5 * 1e3,
        "nanoseek_profiled_gemm_and_attention_ms": gemm_ms,
        "nanoseek_profiled_other_ms": other_ms,
        "gemms": rows,
    }


# ------------------------------------------------------------------ decode
def decode_weight_ops(engine: Engine, batch: int):
    """One decode step's weight matmuls as the model's own decode path issues them (MLA's absorbed
    projections, each MoE layer's routing and experts or the dense MLP, the head), nothing else."""
    model = engine.model
    cfg = model.config
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 1, cfg.hidden_size, generator=g)
    head = model.lm_head.weight.detach()
    plans = []  # (attention, its folded weights, the output projection's input, the MLP)
    for layer in model.model.layers:
        attn = layer.self_attn
        w = attn.absorbed_weights()
        heads, width = attn.num_heads, attn.kv_lora_rank
        o_in = torch.randn(batch, 1, heads, width, generator=g)  # attention's output over the latent
        plans.append((attn, w, o_in, layer.mlp))

    def step() -> None:
        for attn, w, o_in, mlp in plans:
            if w.wa is None:  # quantized projections: each module with its own kernel
                attn.kv_a_proj_with_mqa(x)
                q_in = x if attn.q_lora_rank is None else attn.q_a_proj(x)
            else:
                down = F.linear(x, w.wa)
                q_in = x if attn.q_lora_rank is None else down[..., : attn.q_lora_rank]
            if w.wq is not None:
                F.linear(q_in, w.wq)
            else:  # the query's factors, W_UK per head
                (attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj)(q_in)
            out = o_in if w.w_uv is None else torch.einsum("bshc,hvc->bshv", o_in, w.w_uv)
            out = out.reshape(batch, 1, -1)
            attn.o_proj(out) if w.wo is None else F.linear(out, w.wo)
            mlp(x)  # routing + the routed and shared experts as decoding runs them, or the dense MLP
        F.linear(x[:, 0], head)

    return step


def decode_ceiling(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    cfg = engine_config(0)
    model = build_model(cfg).init_weights(0).eval()
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)
        hf = load_transformers(d, None).eval()
    out = {}
    for batch, goal in ((1, 3.0), (16, 5.0)):
        speed = decode_speed(model, hf, batch, 32, args.new_tokens, 3)
        ours_ms = batch / speed["nanoseek_tok_per_cpu_s"] * 1e3
        hf_ms = batch / speed["transformers_tok_per_cpu_s"] * 1e3
        engine = Engine(model, max_batch_size=batch)
        with torch.inference_mode():
            step = decode_weight_ops(engine, batch)
            step()  # warm-up
            floor = best_of(step, 20)[1]  # CPU seconds: the clock of both engines' steps beside it
        out[f"batch_{batch}"] = {
            "goal": goal,
            "nanoseek_step_ms": ours_ms,
            "transformers_step_ms": hf_ms,
            "speedup": hf_ms / ours_ms,
            "goal_step_budget_ms": hf_ms / goal,
            "weight_ops_floor_ms": floor * 1e3,
            "speedup_if_only_weight_ops": hf_ms / (floor * 1e3),
        }
    return out


def _gemm_rate(x: torch.Tensor, w: torch.Tensor, counts: list[int], split: bool) -> float:
    """GFLOP/s of x[:n] @ w.T for each n in counts (split: in `moe._grouped_mm`'s pieces)."""
    start = time.perf_counter()
    for n in counts:
        for r0, r1 in _row_pieces(0, n, split):
            torch.mm(x[r0:r1], w.t())
    return 2 * w.shape[0] * w.shape[1] * sum(counts) / (time.perf_counter() - start) / 1e9


def shape_change_cost(calls: int = 300, width: int = 256) -> dict[str, dict[str, float]]:
    """GFLOP/s of rows x [width, width] GEMMs on one thread: one row count repeated; a new row count
    (300-1500, as an expert's share of a training batch varies) each call; new counts split into a
    multiple of ROW_BUCKET and the rest, after one pass of other counts (the split's few shapes
    recur: a training run meets them all within its first steps)."""
    import random

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_bf16() else [])
    out: dict[str, dict[str, float]] = {}
    try:
        for dtype in dtypes:
            w, x = torch.randn(width, width, dtype=dtype), torch.randn(1600, width, dtype=dtype)
            rng = random.Random(0)
            counts = [[rng.randint(300, 1500) for _ in range(calls)] for _ in range(3)]
            _gemm_rate(x, w, [640] * 10, False)
            same = _gemm_rate(x, w, [640] * calls, False)
            new = _gemm_rate(x, w, counts[0], False)
            _gemm_rate(x, w, counts[1], True)
            out[str(dtype).removeprefix("torch.")] = {
                "same_rows_gflop_s": same,
                "new_rows_gflop_s": new,
                "new_rows_split_gflop_s": _gemm_rate(x, w, counts[2], True),
            }
    finally:
        torch.set_num_threads(threads)
    return out


def write_json(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="training steps per side (after 2 warm-up)")
    p.add_argument("--repeats", type=int, default=5, help="timings per GEMM (best is kept)")
    p.add_argument("--rounds", type=int, default=3, help="floor + peak measurements (best is kept)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per timing")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--shapes-only", action="store_true", help="only the shape-change figures")
    args = p.parse_args()
    if min(args.steps, args.repeats, args.rounds, args.new_tokens) < 1:
        p.error(
            "--steps, --repeats, --rounds and --new-tokens must be >= 1 (each figure is the best of them)"
        )
    if not args.shapes_only:
        require_transformers("bench_ceiling")
    tune_malloc()
    results: dict = {"cpu": cpu_description()}
    print(f"cpu: {results['cpu']}")
    shapes = results["shape_changes"] = shape_change_cost()
    print("== expert GEMM (rows x 256 -> 256), 1 thread: one row count / a new one each call / split")
    for name, r in shapes.items():
        print(
            f"   {name:9s} {r['same_rows_gflop_s']:5.0f} / {r['new_rows_gflop_s']:5.0f} / "
            f"{r['new_rows_split_gflop_s']:5.0f} GFLOP/s (new rows: "
            f"{r['new_rows_gflop_s'] / r['same_rows_gflop_s']:.2f}x, split: "
            f"{r['new_rows_split_gflop_s'] / r['same_rows_gflop_s']:.2f}x of one row count)"
        )
    if args.shapes_only:
        write_json(args.json, results)
        return
    t = results["training"] = training_ceiling(args)
    print(
        f"== training step, fp32, 2 threads (peak {t['peak_gflop_s']:.0f} GFLOP/s, "
        f"{t['model_gflop_per_step']:.1f} model GFLOP/step)"
    )
    for r in sorted(t["gemms"], key=lambda r: -r["ms"])[:8]:
        print(f"   {r['gemm']:42s} {r['ms']:6.1f} ms  {r['gflop_s']:5.0f} GFLOP/s")
    print(
        f"GEMMs alone: {t['gemm_floor_ms']:.0f} ms at {t['gemm_floor_fraction_of_peak']:.0%} of peak "
        f"-> MFU {t['mfu_if_only_gemms']:.0%} if everything else were free"
    )
    left_mfu = t["mfu_60_budget_ms"] - t["gemm_floor_ms"]
    left_ratio = t["ratio_1_5_budget_ms"] - t["gemm_floor_ms"]
    print(
        f"60% MFU: step <= {t['mfu_60_budget_ms']:.0f} ms, leaving {left_mfu:.0f} ms for all other work | "
        f"1.5x transformers (best step {t['transformers_step_ms']:.0f} ms): step <= "
        f"{t['ratio_1_5_budget_ms']:.0f} ms, leaving {left_ratio:.0f} ms"
    )
    print(
        f"nanoseek: best step {t['nanoseek_step_ms']:.0f} ms; profiled, "
        f"{t['nanoseek_profiled_gemm_and_attention_ms']:.0f} ms in GEMMs and the attention kernel, "
        f"{t['nanoseek_profiled_other_ms']:.0f} ms in all other ops"
    )
    d = results["decode"] = decode_ceiling(args)
    print("== decode step, fp32, 1 thread, CPU time")
    for key, r in d.items():
        print(
            f"{key.replace('_', ' ')}: transformers {r['transformers_step_ms']:.2f} ms, nanoseek "
            f"{r['nanoseek_step_ms']:.2f} ms ({r['speedup']:.2f}x) | goal {r['goal']:.0f}x: step <= "
            f"{r['goal_step_budget_ms']:.2f} ms | weight matmuls alone {r['weight_ops_floor_ms']:.2f} ms "
            f"-> {r['speedup_if_only_weight_ops']:.2f}x if everything else were free"
        )
    write_json(args.json, results)
    print(
        f"bench_ceiling: training floor {t['gemm_floor_ms']:.0f} ms vs 60%-MFU budget "
        f"{t['mfu_60_budget_ms']:.0f} ms; decode ceilings "
        + ", ".join(f"{k.split('_')[1]}: {r['speedup_if_only_weight_ops']:.2f}x" for k, r in d.items())
    )


if __name__ == "__main__":
    main()
