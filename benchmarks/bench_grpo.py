"""GRPO step throughput (rollout + update): nanoseek's `grpo` against TRL's `GRPOTrainer`.

Same model (a `tiny` DeepSeek-V3, loaded by TRL as transformers' DeepseekV3ForCausalLM from the same
HF-layout checkpoint), same group size, prompts per step, completion length and reward (language
consistency, so a random model's groups carry signal and both trainers really update). Both sample at
temperature 1 with no EOS in sight for a random model, so completions run to max_new_tokens on both sides.

    python benchmarks/bench_grpo.py [--init DIR] [--steps 4] [--prompts 4] [--group 8] [--max-new-tokens 32]

Prints a table and, with --json, writes the numbers. The first step of each trainer is warm-up and is not
counted. If TRL is not installed (or fails on this model), the TRL row says why.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path


def make_checkpoint(out: Path) -> str:
    from nanoseek.checkpoint import build_model, save_model
    from nanoseek.config import get_preset
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import train_tokenizer

    task = get_task("arithmetic")
    texts = [p.prompt + task.worked_solution(p) for p in task.problems("train", 2000, seed=1)]
    tok = train_tokenizer(texts, vocab_size=1024)
    cfg = get_preset("tiny").replace(
        vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    save_model(build_model(cfg).init_weights(0), out)
    tok.save(out)
    return str(out)


def bench_nanoseek(init: str, args: argparse.Namespace, run: Path) -> dict:
    from nanoseek.metrics import read_metrics
    from nanoseek.train.grpo import GRPOConfig, grpo

    cfg = GRPOConfig(
        init=init,
        tasks=["arithmetic"],
        reward="language:1",
        language="en",
        out=str(run),
        group_size=args.group,
        batch_prompts=args.prompts,
        steps=args.steps,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        lr=1e-5,
        micro_batch=args.prompts * args.group,
        progress=False,
    )
    t0 = time.perf_counter()
    grpo(cfg)
    total = time.perf_counter() - t0
    recs = [r for r in read_metrics(run, "grpo") if "rollout_time_s" in r]
    # A step is the time from one step's record to the next: TRL's timer below holds its whole step, and
    # rollout_time_s + update_time_s leave out scoring the rollouts (decoding, rewards, advantages) and
    # batching them, which made nanoseek's steps look shorter than they were
    walls = [r["wall_time_s"] for r in recs]
    step = [b - a for a, b in itertools.pairwise(walls)] or walls
    recs = recs[1:] or recs  # the first step is warm-up, unless it is the only one (as TRL's below)
    return {
        "step_s": statistics.median(step),
        "rollout_s": statistics.median(r["rollout_time_s"] for r in recs),
        "update_s": statistics.median(r["update_time_s"] for r in recs),
        "completion_tokens": statistics.median(r["response_length"] for r in recs)
        * args.prompts
        * args.group,
        "total_s": total,
    }


def bench_trl(init: str, args: argparse.Namespace, run: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.data.rewards import language_consistency, split_completion
    from nanoseek.data.tasks import get_task

    probs = get_task("arithmetic").problems("train", 256, seed=0, language="en")
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}]} for p in probs])

    def language_reward(completions, **kw):
        out = []
        for c in completions:
            text = c[0]["content"] if isinstance(c, list) else c
            out.append(language_consistency(split_completion(text, True)[0], "en"))
        return out

    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(init)
    cfg = GRPOConfig(
        output_dir=str(run),
        per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        max_steps=args.steps,
        learning_rate=1e-5,
        beta=0.0,
        num_iterations=1,
        temperature=1.0,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=language_reward,
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Timer()],
    )
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    return {"step_s": statistics.median(times[1:] or times), "total_s": total}


def main() -> None:
    from nanoseek.options import thread_count

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", default=None, help="checkpoint directory (default: a random tiny model)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=thread_count, default=1)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        init = args.init or make_checkpoint(tmp_p / "init")
        results: dict[str, dict] = {"nanoseek": bench_nanoseek(init, args, tmp_p / "ns")}
        if args.skip_trl:
            results["trl"] = {"error": "skipped (--skip-trl)"}
        else:
            try:
                results["trl"] = bench_trl(init, args, tmp_p / "trl")
            except ImportError as e:
                results["trl"] = {"error": f"TRL not available: {e}"}
            except Exception as e:  # report, do not hide, why the comparison could not run
                results["trl"] = {"error": f"TRL failed on this model: {type(e).__name__}: {e}"}
    samples = args.prompts * args.group
    from nanoseek.perf import cpu_description

    print(f"cpu: {cpu_description()}; fp32 (both trainers)")
    print(
        f"GRPO step, tiny DeepSeek-V3, {args.prompts} prompts x G={args.group}, {args.max_new_tokens} new tokens, "
        f"{args.threads} thread(s)"
    )
    for name, r in results.items():
        if "error" in r:
            print(f"  {name:9s} {r['error']}")
            continue
        extra = f" (rollout {r['rollout_s']:.2f}s + update {r['update_s']:.2f}s)" if "rollout_s" in r else ""
        print(f"  {name:9s} {r['step_s']:.2f} s/step, {samples / r['step_s']:.1f} samples/s{extra}")
    if "error" not in results.get("trl", {"error": 1}):
        print(f"  speed-up: {results['trl']['step_s'] / results['nanoseek']['step_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cpu": cpu_description(), "args": vars(args), "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
