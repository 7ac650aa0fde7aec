"""`nanoseek cost PRESET_DIR_OR_HUB_NAME --tokens 14.8T`: training cost in GPU-hours, days and dollars.

Either assume a model FLOPs utilization (`--mfu`) to estimate the GPU-hours, or give a known bill
(`--gpu-hours`) to get the MFU it implies. DeepSeek-V3 is the worked example in docs/cost.md.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import path

    p = sub.add_parser(
        "cost",
        help="training cost (GPU-hours, days, dollars) of a model for a token budget, or the implied MFU",
        description=(
            "Training FLOPs = tokens x 3 x forward FLOPs per token (incl. MTP modules unless --no-mtp). "
            "Give --mfu to estimate GPU-hours, or --gpu-hours to get the MFU they imply."
        ),
    )
    p.add_argument(
        "model",
        type=path,
        help="preset name, directory with config.json, or Hub name (its config.json alone)",
    )
    p.add_argument("--tokens", required=True, help="training tokens: 14.8T, 300B, 1e9, ...")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="dense peak TFLOP/s per GPU (default 989: H800 BF16; H800 FP8 is 1979)",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--mfu", type=float, default=None, help="assumed model FLOPs utilization, 0-1 (default 0.4)"
    )
    how.add_argument(
        "--gpu-hours",
        "--gpu-hours-known",
        dest="gpu_hours",
        default=None,
        help="known GPU-hours (e.g. 2.788M): report the MFU they imply",
    )
    p.add_argument(
        "--gpus", type=int, default=2048, help="GPUs in the cluster, for wall-clock days (default 2048)"
    )
    p.add_argument(
        "--usd-per-gpu-hour", type=float, default=2.0, help="rental price (default $2, as in V3's report)"
    )
    p.add_argument("--seq-len", type=int, default=4096, help="training sequence length (attention FLOPs)")
    p.add_argument("--no-mtp", action="store_true", help="leave the multi-token-prediction modules out")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import math

    from nanoseek.accounting import check_cost_inputs, human, parse_count, si, training_cost
    from nanoseek.checkpoint import accounting_config

    tokens = parse_count(args.tokens, "--tokens")
    gpu_hours = parse_count(args.gpu_hours, "--gpu-hours") if args.gpu_hours is not None else None
    mfu = None if gpu_hours is not None else args.mfu if args.mfu is not None else 0.4
    if not 0 < args.peak_tflops < math.inf:  # NaN fails too
        raise ValueError(f"--peak-tflops must be a positive finite number, got {args.peak_tflops}")
    priced = dict(
        peak_flops=args.peak_tflops * 1e12,
        mfu=mfu,
        gpu_hours=gpu_hours,
        gpus=args.gpus,
        usd_per_gpu_hour=args.usd_per_gpu_hour,
        seq_len=args.seq_len,
    )
    check_cost_inputs(tokens, **priced)  # every flag, before a Hub name's config.json is fetched
    config = accounting_config(args.model)  # as `inspect` counts it
    cost = training_cost(config, tokens, **priced, include_mtp=not args.no_mtp)
    if cost.mfu_implied and cost.mfu > 1:
        print(
            f"nanoseek cost: warning: the implied MFU is above the GPU's peak ({args.peak_tflops:g} TFLOP/s): "
            "these tokens cannot be trained in these GPU-hours (check --tokens, --gpu-hours and --peak-tflops)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"model": str(args.model), **cost.to_dict()}, indent=2))
        return 0
    mtp = " incl. MTP" if cost.includes_mtp else ""
    print(f"model             {args.model}")
    print(f"tokens            {human(cost.tokens)}")
    print(
        f"FLOPs / token     {si(cost.flops_per_token, 'FLOP')} (training = 3 x forward{mtp}, seq {cost.seq_len})"
    )
    print(f"total FLOPs       {cost.total_flops:.3e}")
    print(f"peak / GPU        {args.peak_tflops:g} TFLOP/s")
    label = "implied MFU" if cost.mfu_implied else "assumed MFU"
    print(f"{label:<17} {cost.mfu:.1%}  ({si(cost.mfu * cost.peak_flops, 'FLOP/s')} sustained per GPU)")
    print(f"GPU-hours         {human(cost.gpu_hours)}")
    print(f"wall clock        {_duration(cost.days)} on {cost.gpus} GPUs")
    print(
        f"cost: {human(cost.gpu_hours)} GPU-hours x ${cost.usd_per_gpu_hour:g} = ${human(cost.usd)}, "
        f"{_duration(cost.days)} on {cost.gpus} GPUs at {cost.mfu:.1%} MFU"
    )
    return 0


def _duration(days: float) -> str:
    # each unit as printed, rounded, picks the next: 23.99 hours is "1.0 days", not "24.0 hours"
    hours = days * 24
    if round(hours, 1) >= 24:
        return f"{days:.1f} days"
    minutes = hours * 60
    if round(minutes, 1) >= 60:
        return f"{hours:.1f} hours"
    seconds = minutes * 60
    return f"{minutes:.1f} minutes" if float(f"{seconds:.3g}") >= 60 else f"{seconds:.3g} seconds"
