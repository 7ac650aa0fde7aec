"""Speedrun time budgets: run `nanoseek speedrun` and hold its wall time against the preset's budget.

The budgets (issue: the main job) are measured here, not in a test, because these machines are noisy:
`smoke` under 3 minutes, `cpu` under 20 minutes with a held-out pass@1 gain from GRPO of at least
10 points. Prints the wall time per stage (from RUN/metrics.jsonl, the same records the report uses),
the total against the budget, and for `cpu` the GRPO gain and the control.

    python benchmarks/bench_speedrun.py [--preset cpu|smoke] [--out RUN] [--json out.json]

Without --out the run goes to a temporary directory; with it, a finished run is only re-read (the
speedrun skips finished stages), so the figures of an earlier run can be printed again. The preset
defaults to the one the run recorded in RUN/speedrun.json, else `cpu`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from nanoseek.report import RunMetrics
from nanoseek.speedrun import SETTINGS, STAGES, run_speedrun

BUDGET_S = {"smoke": 3 * 60, "cpu": 20 * 60}
MIN_GRPO_GAIN = 10.0  # points of held-out pass@1, cpu preset


def figures(run: Path, preset: str, wall: float) -> dict:
    m = RunMetrics(run)
    stages = {s: m.last_event(s, "end").get("wall_time_s") for s in STAGES}
    stages = {s: t for s, t in stages.items() if t is not None}
    out: dict = {"preset": preset, "wall_time_s": wall, "stages_s": stages}
    if preset in BUDGET_S:
        out["budget_s"] = BUDGET_S[preset]
        out["within_budget"] = wall < BUDGET_S[preset]
    evals = m.evals()
    for (stage, task), r in sorted(evals.items()):
        out.setdefault("pass@1", {}).setdefault(task, {})[stage] = r.get("pass@1")
    for task, by_stage in out.get("pass@1", {}).items():
        before, after = by_stage.get("sft"), by_stage.get("grpo")
        if before is not None and after is not None:
            out.setdefault("grpo_gain_points", {})[task] = 100 * (after - before)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--preset", default=None, choices=sorted(BUDGET_S), help="default: the run's own, else cpu"
    )
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.preset is None:  # a run re-read keeps the preset it was started with
        recorded = Path(args.out) / SETTINGS if args.out else None
        args.preset = json.loads(recorded.read_text())["name"] if recorded and recorded.exists() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.out or Path(tmp) / "run")
        finished_before = (run / "report.md").exists()
        t0 = time.perf_counter()
        run_speedrun(run, args.preset)
        wall = time.perf_counter() - t0
        if finished_before:  # a finished run re-read: its own stage times are the measurement
            wall = sum(RunMetrics(run).last_event(s, "end").get("wall_time_s") or 0.0 for s in STAGES)
        f = figures(run, args.preset, wall)
    print()
    for stage, t in f["stages_s"].items():
        print(f"  {stage:10s} {t:8.1f} s")
    budget = f.get("budget_s")
    verdict = ("within" if f.get("within_budget") else "OVER") if budget else "no"
    print(f"speedrun {args.preset}: {wall / 60:.1f} min, {verdict} budget ({budget / 60:.0f} min)")
    for task, gain in f.get("grpo_gain_points", {}).items():
        p = f["pass@1"][task]
        ctrl = f" (control {100 * p['control']:.1f}%)" if p.get("control") is not None else ""
        # The gain goal is the cpu preset's; smoke's few GRPO steps only prove the stage runs.
        goal = ""
        if args.preset == "cpu":
            goal = f", {'meets' if gain >= MIN_GRPO_GAIN else 'BELOW'} the {MIN_GRPO_GAIN:.0f}-point goal"
        print(
            f"  {task}: held-out pass@1 {100 * p['sft']:.1f}% -> {100 * p['grpo']:.1f}% after GRPO "
            f"({gain:+.1f} points{goal}){ctrl}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(f, indent=2))


if __name__ == "__main__":
    main()
