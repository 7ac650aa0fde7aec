"""`nanoseek eval DIR_OR_URL --task NAME -k K`: pass@1 over k samples, cons@k, format, language, length."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a checkpoint or an OpenAI-compatible endpoint on a task's held-out split",
        description="R1-style evaluation: pass@1 averaged over k samples (temperature 0.6), cons@k "
        "(majority vote over extracted answers), format rate, language consistency, mean response "
        "length. Writes a JSON report and appends to metrics.jsonl (stage eval).",
    )
    p.add_argument("model", help="checkpoint directory, or http(s) URL of an OpenAI-compatible server")
    p.add_argument("--task", required=True, help="task name(s), comma-separated: each is scored separately")
    p.add_argument("-k", type=int, default=4, help="samples per problem (default %(default)s)")
    p.add_argument("--n", type=int, default=64, help="problems (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--language", default=None, help="only problems in this language (en, ja, zh)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON report path (default: next to the checkpoint)")
    p.add_argument(
        "--run-dir", default=None, help="run directory for metrics.jsonl (default: checkpoint's parent)"
    )
    p.add_argument("--model-name", default=None, help="endpoint model name (default: the first it lists)")
    p.add_argument("--api-key", default=None, help="endpoint API key (default $OPENAI_API_KEY)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.evaluate import EvalConfig, evaluate, split_task_list

    tasks = split_task_list(args.task)
    for task in tasks:
        out = args.out
        if out and len(tasks) > 1:
            out = out.replace(".json", "") + f"_{task.replace('/', '_')}.json"
        cfg = EvalConfig(
            model=args.model,
            task=task,
            k=args.k,
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            split=args.split,
            seed=args.seed,
            language=args.language,
            out=out,
            run_dir=args.run_dir,
            endpoint_model=args.model_name,
            api_key=args.api_key,
            progress=not args.no_progress,
        )
        m = evaluate(cfg)
        k = m["k"]
        print(
            f"eval {task} ({m['evaluated']}): pass@1 {m['pass@1']:.3f}, cons@{k} {m[f'cons@{k}']:.3f}, "
            f"format {m['format_rate']:.3f}, language {m['language_consistency']:.3f}, "
            f"length {m['mean_response_tokens']:.1f} tokens over {m['problems']} problems; {m['json']}"
        )
    return 0
