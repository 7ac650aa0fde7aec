"""`nanoseek report RUN`: rebuild RUN/report.md and its plots from RUN/metrics.jsonl."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import path

    p = sub.add_parser("report", help="build RUN/report.md and plots from RUN/metrics.jsonl")
    p.add_argument("run", type=path, help="run directory holding metrics.jsonl")
    p.add_argument(
        "--usd-per-hour",
        type=float,
        default=0.10,
        help="price of one machine for an hour, for the cost column (a pretraining over several nodes: "
        "each; default 0.10)",
    )
    p.add_argument(
        "--out",
        type=path,
        metavar="DIR",
        help="directory for report.md and plots/ (default: RUN; another for a run on a read-only disk)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.report import build_report

    path = build_report(args.run, usd_per_hour=args.usd_per_hour, out=args.out)
    print(f"report written to {path}")
    return 0
