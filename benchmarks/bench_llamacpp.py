"""Decode speed against llama.cpp: the same checkpoint in nanoseek's Engine and in llama.cpp, same threads.

Two sizes: `tiny` (the speedrun's shape, vocab 1024) and `lite` (DeepSeek-V2-Lite's width: hidden 2048,
16 heads, kv_lora_rank 512, full-rank query, 64 routed experts of 1408 + 2 shared, top-6, a dense first
layer of 10944, vocab 102400; few layers). Random weights, a tokenizer trained on a few documents (as
check_gguf_llamacpp.py builds them). At equal bits per weight: nanoseek bf16 vs GGUF bf16, nanoseek's
weight-only int8 (bf16 activations) vs GGUF Q8_0, and w8a8 (int8 weights and 8-bit activations, as Q8_0's
dot products) vs Q8_0. Figures, greedy with fixed lengths (EOS ignored):
- pp: prompt processing tok/s (one 256-token prompt, first token included);
- b1: batch-1 decode tok/s (after the prompt's first token);
- b16: aggregate decode tok/s of 16 concurrent sequences (nanoseek: 16 prompts in one `generate`;
  llama.cpp: one `llama_decode` per step over all 16 sequences, through its C batch API, n_seq_max 16).
Each engine runs in its own process (the `lite` weights are GBs), alternating nanoseek, llama.cpp,
nanoseek, ...; the table holds the median of the repeats and the ratio nanoseek / llama.cpp.

    python benchmarks/bench_llamacpp.py [--sizes tiny,lite] [--precisions bf16,int8] [--figures pp,b1,b16]
        [--threads 2] [--repeats 3] [--lite-layers 4] [--new-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nanoseek.options import thread_count, torch_seed

SIZES = ("tiny", "lite")
GGUF_TYPE = {"bf16": "bf16", "int8": "q8_0", "w8a8": "q8_0", "f32": "f32"}
FIGURES = ("pp", "b1", "b16")
BATCH = 16
PROMPT_LEN = 16  # the decode runs' prompts
PP_LEN = 256


def lite_config(layers: int, tok_bos: int):  # noqa: ANN201
    from nanoseek.config import get_preset

    # DeepSeek-V2-Lite's widths (the preset is its config.json) with V3's router (sigmoid, noaux_tc)
    # on one group, plain RoPE at a 4K context, and the benchmark tokenizer's special ids.
    return get_preset("deepseek-v2-lite").replace(
        model_type="deepseek_v3",
        num_hidden_layers=layers,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        norm_topk_prob=True,
        rope_scaling=None,
        max_position_embeddings=4096,
        aux_loss_alpha=0.0001,
        bos_token_id=tok_bos,
        eos_token_id=1,
    )


def make_checkpoint(size: str, root: Path, layers: int) -> Path:
    """The size's checkpoint directory under root (built once, then reused)."""
    ckpt = root / (size if size == "tiny" else f"lite-{layers}")
    if (ckpt / "config.json").exists():
        return ckpt
    from check_gguf_llamacpp import DOCUMENTS
    from check_gguf_llamacpp import make_checkpoint as make_tiny
    from nanoseek.checkpoint import build_model, save_model
    from nanoseek.tokenizer import train_tokenizer

    if size == "tiny":
        make_tiny(ckpt, vocab_size=1024)
        return ckpt
    corpus = [f"{d} ({i})" for i in range(40) for d in DOCUMENTS]
    tok = train_tokenizer(corpus, vocab_size=600, min_frequency=1)
    model = build_model(lite_config(layers, tok.bos_token_id), dtype=torch.bfloat16).init_weights(0)
    save_model(model, ckpt)
    tok.save(ckpt)
    return ckpt


def gguf_file(ckpt: Path, precision: str) -> Path:
    from nanoseek.export import export_gguf

    out = ckpt.parent / f"{ckpt.name}-{GGUF_TYPE[precision]}.gguf"
    if not out.exists():
        export_gguf(ckpt, out, type=GGUF_TYPE[precision])
    return out


def prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, min(vocab, 600), (n, length), generator=g).tolist()


# ------------------------------------------------------------------ nanoseek
def run_nanoseek(ckpt: Path, precision: str, figures: list[str], new: int, seed: int) -> dict[str, float]:
    from nanoseek.checkpoint import load_model
    from nanoseek.engine import Engine, SamplingParams

    # bf16 and f32 are the GGUF file's own bits; int8/w8a8 compute the rest of the model in what a user gets
    # without --dtype ("auto": bf16 where the CPU multiplies it natively, fp32 on an AVX2-only one)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}.get(precision, "auto")
    model = load_model(
        ckpt, dtype=dtype, quantize=precision if precision in ("int8", "w8a8") else None
    ).eval()
    vocab = model.config.vocab_size
    engine = Engine(model, max_batch_size=BATCH, max_seq_len=PP_LEN + new + 8, pack_weights=True)
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    engine.generate(prompts(vocab, 1, 8, seed + 99), SamplingParams(max_new_tokens=4, ignore_eos=True))

    def decode(batch: int) -> float:
        started: set[str] = set()
        t0, n = 0.0, 0
        params = SamplingParams(max_new_tokens=new, ignore_eos=True)
        for ev in engine.stream(prompts(vocab, batch, PROMPT_LEN, seed + batch), params):
            if len(started) < batch:
                if ev.new_token_ids:
                    started.add(ev.request_id)
                    if len(started) == batch:  # every sequence has its first token: decode from here
                        t0 = time.perf_counter()
            else:
                n += len(ev.new_token_ids)
        return n / (time.perf_counter() - t0)

    out = {}
    with torch.no_grad():
        for f in figures:
            engine.reset_prefix_cache()
            if f == "pp":
                t = time.perf_counter()
                engine.generate(prompts(vocab, 1, PP_LEN, seed), one)
                out[f] = PP_LEN / (time.perf_counter() - t)
            else:
                out[f] = decode(1 if f == "b1" else BATCH)
    return out


# ----------------------------------------------------------------- llama.cpp
def run_llamacpp(
    gguf: Path, threads: int, figures: list[str], new: int, seed: int, extra_bufts: bool = True
) -> dict[str, float]:
    import llama_cpp as L

    L.llama_backend_init()
    quiet = L.llama_log_callback(lambda *_: None)  # held: llama.cpp calls it until the process ends
    L.llama_log_set(quiet, None)
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = extra_bufts  # off: llama-cli's --no-repack (no repacked or AMX weight buffers)
    model = L.llama_model_load_from_file(str(gguf).encode(), mp)
    cp = L.llama_context_default_params()
    n_tokens_max = max(PP_LEN, BATCH * PROMPT_LEN)
    cp.n_ctx = PP_LEN + new + 64
    cp.n_batch = cp.n_ubatch = n_tokens_max
    cp.n_seq_max = BATCH
    cp.kv_unified = True  # one cache of n_ctx shared by the sequences (else n_ctx is split 16 ways)
    cp.n_ctx = max(cp.n_ctx, BATCH * (PROMPT_LEN + new + 8))
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(n_tokens_max, 0, BATCH)
    memory = L.llama_get_memory(ctx)

    def submit(tokens: list[tuple[int, int, int, bool]]) -> list[int]:
        """(token, pos, seq, wants logits) into one llama_decode; the argmax for each that wants logits."""
        for i, (t, p, s, lg) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, lg
            batch.seq_id[i][0] = s
        batch.n_tokens = len(tokens)
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return [
            int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,)).argmax())
            for i, (*_, lg) in enumerate(tokens)
            if lg
        ]

    def prefill(rows: list[list[int]]) -> list[int]:
        return submit([(t, p, s, p == len(r) - 1) for s, r in enumerate(rows) for p, t in enumerate(r)])

    def decode(n_seq: int) -> float:
        L.llama_memory_clear(memory, True)
        last = prefill(prompts(vocab, n_seq, PROMPT_LEN, seed + n_seq))
        t0 = time.perf_counter()
        for step in range(new - 1):
            last = submit([(t, PROMPT_LEN + step, s, True) for s, t in enumerate(last)])
        return n_seq * (new - 1) / (time.perf_counter() - t0)

    prefill(prompts(vocab, 1, 8, seed + 99))  # warm up
    out = {}
    for f in figures:
        L.llama_memory_clear(memory, True)
        if f == "pp":
            t = time.perf_counter()
            prefill(prompts(vocab, 1, PP_LEN, seed))
            out[f] = PP_LEN / (time.perf_counter() - t)
        else:
            out[f] = decode(1 if f == "b1" else BATCH)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return out


# ------------------------------------------------------------------- driver
def worker(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    figures = args.figures.split(",")
    if args.worker == "nanoseek":
        return run_nanoseek(Path(args.ckpt), args.precision, figures, args.new_tokens, args.seed)
    return run_llamacpp(
        Path(args.ckpt), args.threads, figures, args.new_tokens, args.seed, not args.no_extra_bufts
    )


def spawn(
    engine: str,
    path: Path,
    precision: str,
    figures: list[str],
    args: argparse.Namespace,
    extra_bufts: bool = True,
) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--ckpt", str(path), "--precision", precision]
    cmd += [
        "--figures",
        ",".join(figures),
        "--threads",
        str(args.threads),
        "--new-tokens",
        str(args.new_tokens),
    ]
    cmd += ["--seed", str(args.seed)] + ([] if extra_bufts else ["--no-extra-bufts"])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        # an abort ends with gdb's backtrace: the line that says why comes before it
        why = [ln for ln in lines if "GGML_ASSERT" in ln or "Error" in ln or "error:" in ln]
        return {"error": (why or lines or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict], threads: int) -> str:
    """Markdown table of {size, precision, figure, nanoseek, llamacpp} rows (None: not measured)."""

    def num(v: float | None) -> str:
        return "—" if v is None else f"{v:,.1f}" if v < 100 else f"{v:,.0f}"

    names = {
        "pp": f"prompt processing ({PP_LEN} tokens)",
        "b1": "decode, batch 1",
        "b16": f"decode, {BATCH} concurrent",
    }
    lines = [
        "| model | precision | figure | threads | nanoseek tok/s | llama.cpp tok/s | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ns, ll = r.get("nanoseek"), r.get("llamacpp")
        ratio = f"{ns / ll:.2f}x" if ns and ll else "—"
        prec = f"{r['precision']} vs Q8_0" if r["precision"] in ("int8", "w8a8") else r["precision"]
        if not r.get("llamacpp_extra_bufts", True):
            prec += " (llama.cpp --no-repack)"
        lines.append(
            f"| {r['size']} | {prec} | {names[r['figure']]} | {threads} | {num(ns)} | {num(ll)} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,lite")
    ap.add_argument("--precisions", default="bf16,int8", help="bf16, int8 and w8a8 (vs Q8_0), f32")
    ap.add_argument("--figures", default="pp,b1,b16", help="pp, b1, b16")
    ap.add_argument("--threads", type=thread_count, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each engine, alternating; median")
    ap.add_argument("--lite-layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=torch_seed, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nanoseek-bench-llamacpp"))
    ap.add_argument("--json", type=Path, default=None, help="save the figures and every run here")
    ap.add_argument(
        "--no-extra-bufts",
        action="store_true",
        help="llama.cpp without its repacked and AMX weight buffers (llama-cli's --no-repack); a run that "
        "aborts with them is retried without them anyway",
    )
    ap.add_argument("--worker", choices=("nanoseek", "llamacpp"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    for flag, given, known in (
        ("--sizes", args.sizes, SIZES),
        ("--precisions", args.precisions, tuple(GGUF_TYPE)),
        ("--figures", args.figures, FIGURES),
    ):
        unknown = [v for v in given.split(",") if v not in known]
        if unknown:
            ap.error(f"{flag}: unknown {', '.join(unknown)} (one or more of {', '.join(known)})")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print(
            "llama_cpp is not installed: pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36 (the version measured)"
        )
        return 1
    from nanoseek.perf import cpu_has_bf16, cpu_info

    info = cpu_info()
    print(f"CPU: {info['cpu']}; flags: {info['flags']}; threads {args.threads}; torch {torch.__version__}")
    rest = "bf16" if cpu_has_bf16() else "fp32 (no native bf16)"
    print(
        f"nanoseek's int8 and w8a8 compute the unquantized rest of the model in {rest}, as --dtype auto does"
    )
    figures = args.figures.split(",")
    rows: list[dict] = []
    runs: list[dict] = []
    args.workdir.mkdir(parents=True, exist_ok=True)
    for size in args.sizes.split(","):
        t = time.perf_counter()
        ckpt = make_checkpoint(size, args.workdir, args.lite_layers)
        print(f"{size}: checkpoint {ckpt} ({time.perf_counter() - t:.0f} s)", flush=True)
        for precision in args.precisions.split(","):
            gguf = gguf_file(ckpt, precision)
            got: dict[str, dict[str, list[float]]] = {"nanoseek": {}, "llamacpp": {}}
            errors: dict[str, str] = {}
            extra_bufts = not args.no_extra_bufts
            for rep in range(args.repeats):
                for engine, path in (("nanoseek", ckpt), ("llamacpp", gguf)):
                    if engine in errors:
                        continue
                    r = spawn(engine, path, precision, figures, args, extra_bufts)
                    if engine == "llamacpp" and "error" in r and extra_bufts:
                        # llama.cpp 0.3.36's AMX buffer type for Q8_0 aborts on DeepSeek2's graph
                        # (GGML_ASSERT(*cur_backend_id != -1) in its scheduler) on CPUs with AMX
                        print(f"  {size} {precision} llamacpp: {r['error']}; again without extra buffers")
                        extra_bufts = False
                        r = spawn(engine, path, precision, figures, args, extra_bufts)
                    run = {"size": size, "precision": precision, "engine": engine, "repeat": rep}
                    if engine == "llamacpp":
                        run["extra_bufts"] = extra_bufts
                    runs.append({**run, **r})
                    if "error" in r:
                        errors[engine] = r["error"]
                        print(f"  {size} {precision} {engine}: FAILED: {r['error']}", flush=True)
                        continue
                    for f, v in r.items():
                        got[engine].setdefault(f, []).append(v)
                    shown = "  ".join(f"{f} {v:,.1f}" for f, v in r.items())
                    print(
                        f"  {size} {precision} {engine} run {rep + 1}/{args.repeats}: {shown} tok/s",
                        flush=True,
                    )
            for f in figures:
                row = {"size": size, "precision": precision, "figure": f}
                for engine, by in got.items():
                    row[engine] = statistics.median(by[f]) if by.get(f) else None
                row["errors"] = errors
                row["llamacpp_extra_bufts"] = extra_bufts
                rows.append(row)
    table = format_table(rows, args.threads)
    print(table)
    if args.json:
        args.json.write_text(
            json.dumps({**info, "threads": args.threads, "rows": rows, "runs": runs}, indent=1)
        )
    print(
        f"{len(rows)} figures over {args.repeats} alternating runs each"
        + (f"; saved to {args.json}" if args.json else "")
    )
    failed = {(r["size"], r["precision"], e) for r in rows for e in r["errors"]}
    if failed:
        print(
            "bench_llamacpp: runs failed: " + ", ".join(" ".join(f) for f in sorted(failed)), file=sys.stderr
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
