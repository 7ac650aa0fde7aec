"""`nanoseek eval DIR_OR_URL --task NAME -k K`: pass@1 over k samples, cons@k, format, language, length."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import config_command

    config_command(
        sub,
        "eval",
        "nanoseek.evaluate:EvalConfig",
        run,
        help="score a checkpoint or an OpenAI-compatible endpoint on a task's held-out split",
        description="R1-style evaluation: pass@1 averaged over k samples (temperature 0.6) ± its standard "
        "error over the problems, cons@k "
        "(majority vote over extracted answers), format rate, language consistency, mean response "
        "length. Writes a JSON report and appends to metrics.jsonl (stage eval).",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanoseek.data.tasks import split_task_list
    from nanoseek.evaluate import EvalConfig, evaluate_many, slug
    from nanoseek.options import from_options
    from nanoseek.perf import torch_threads
    from nanoseek.report import plus_minus

    tasks = split_task_list(args.task)
    cfgs = []
    for task in tasks:
        out = args.out
        if out and len(tasks) > 1:  # one report per task beside the one named, as the default names them
            out = str(Path(out).with_name(f"{Path(out).stem}_{slug(task)}{Path(out).suffix or '.json'}"))
        cfgs.append(from_options(EvalConfig, args, task=task, out=out))
    # one model load, and every task's samples in one engine queue (each the samples it alone would draw)
    with torch_threads(args.threads):
        results = evaluate_many(cfgs)
    for task, m in zip(tasks, results, strict=True):
        k, length = m["k"], m["mean_response_tokens"]
        print(
            # no "± 0.000" where the scores do not vary over the problems, as the report shows them
            f"eval {task} ({m['evaluated']}): pass@1 {m['pass@1']:.3f}{plus_minus(m['pass@1_stderr'], points=False)}, "
            f"cons@{k} {m[f'cons@{k}']:.3f}, "
            f"format {m['format_rate']:.3f}, language {m['language_consistency']:.3f}, "
            # the passes whose reasoning concludes their answer, where the task reads conclusions
            + (f"concluded {m['pass@1_concluded']:.3f}, " if "pass@1_concluded" in m else "")
            + f"length {'unknown (no usage sent)' if length is None else f'{length:.1f} tokens'} over "
            f"{m['problems']} problems; {m['json']}"
        )
        if m.get("truncated_rate"):  # scored wrong for want of room, not of skill
            print(
                f"eval {task}: warning: {m['truncated_rate']:.0%} of the samples stopped at --max-new-tokens "
                f"{args.max_new_tokens} before their answer; raise it to score what the model would answer",
                file=sys.stderr,  # stdout holds the scores alone, for `| tee` and the scripts that read them
            )
    return 0
