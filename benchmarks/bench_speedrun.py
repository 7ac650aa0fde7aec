"""The main job's goals: run `nanoseek speedrun` and hold its wall time and figures against them.

The goals (issue "A model that learns") are measured here, not in a test, because these machines are
noisy. For `cpu`: at most 20 minutes on 2 cores; held-out pass@1 (k = 4, T = 0.6) of the final model
on comparison >= 95%, addition >= 90%, multiplication (3-digit x 2-digit) >= 70%, mean over all
families >= 75%; GRPO's gain over its starting checkpoint >= +10 points averaged over the families
that start between 20% and 80%, and >= +20 on the verifier-only family; held-out copied-token loss
at the end of pretraining <= 0.1 nats; the distilled student >= 70% of its teacher's mean pass@1.
`smoke` under 3 minutes. Prints each figure with its goal and whether it is met (the exit status is 1
when one is missed), and the wall time per stage (from RUN/metrics.jsonl, the records the report uses). GRPO's gains come with the half-width
of their 95% interval, paired over the held-out problems: with 48 problems a family's gain moves by
several points with the draw of problems, so a goal met or missed inside that margin is not settled.
`--rescore N` settles it: GRPO's starting checkpoint and its final one are scored again on N held-out
problems of each family the two gain goals are about (in RUN/rescore/, apart from the run's own
records), and those goals are judged on them (480 problems: about a third of the margin of 48).
`--against RUN2` holds the run beside another finished one (the same seed in the other precision) and
judges the issue's agreement: every stage's mean pass@1 within 5 points of the other's.

    python benchmarks/bench_speedrun.py [--preset cpu|smoke|gpu] [--precision auto|bf16|fp32] [--seed N] [--out RUN] [--json F] [--rescore N] [--against RUN2]

Without --out the run goes to a temporary directory; with it, a finished run is only re-read (the
speedrun skips finished stages), so the figures of an earlier run can be printed again. The preset
defaults to the one the run recorded in RUN/speedrun.json, else `cpu`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from nanoseek.evaluate import problems_digest, slug
from nanoseek.options import torch_seed
from nanoseek.report import STAGES, RunMetrics, paired_margin
from nanoseek.speedrun import PRESETS, SETTINGS, SpeedrunPreset, run_speedrun

BUDGET_S = {"smoke": 3 * 60, "cpu": 20 * 60, "gpu": 15 * 60}
PASS_GOALS = {"comparison": 0.95, "addition": 0.90, "multiplication": 0.70}
MEAN_GOAL = 0.75
GRPO_GAIN_GOAL = 10.0  # points, mean over families starting in [20%, 80%]
ZERO_GAIN_GOAL = 20.0  # points, the verifier-only family
COPY_GOAL = 0.1  # nats
STUDENT_GOAL = 0.70  # of the teacher's mean pass@1
AGREEMENT_GOAL = 5.0  # points between two runs' stage means (--against: the other precision)


def figures(run: Path, preset: str, wall: float) -> dict:
    m = RunMetrics(run)
    stages = {s: m.last_event(s, "end").get("wall_time_s") for s in STAGES}
    beside = {s: m.last_event(s, "end")["beside"] for s in STAGES if m.last_event(s, "end").get("beside")}
    stages = {s: t for s, t in stages.items() if t is not None}
    out: dict = {"preset": preset, "wall_time_s": wall, "stages_s": stages, "beside": beside}
    if preset in BUDGET_S:
        out["budget_s"] = BUDGET_S[preset]
        out["within_budget"] = wall < BUDGET_S[preset]
    sm = m.pass_at_1_summary()
    pass1: dict[str, dict[str, float]] = {}
    for (stage, task), v in sm["pass@1"].items():
        if task in sm["tasks"]:
            pass1.setdefault(task, {})[stage] = v
    out["unseen_wordings"] = sm["unseen_wordings"]  # the final model, phrasings no stage trained on
    out["second_turn"] = sm["second_turn"]  # the final model, each problem asked second in a chat
    evals = m.evals()
    for (stage, task), r in evals.items():
        if r.get("pass@1_by_language"):
            out.setdefault("pass@1_by_language", {}).setdefault(task, {})[stage] = r["pass@1_by_language"]
    out["pass@1"] = pass1
    out["final_mean"] = sm["means"].get("grpo")
    out["grpo_gain_points"] = {t: 100 * g for t, g in sm["gains"].items()}
    out["grpo_gain_mid_families"] = sm["mid"]
    if sm["mid_gain"] is not None:
        out["grpo_gain_mid"] = 100 * sm["mid_gain"]
    # half-widths of 95% intervals, paired over the held-out problems (None for runs that predate them)
    out["grpo_gain_margin_points"] = {t: 100 * m for t, m in sm["gain_margins"].items()}
    if sm["mid_margin"] is not None:
        out["grpo_gain_mid_margin"] = 100 * sm["mid_margin"]
    out["verifier_only"] = {t: out["grpo_gain_points"].get(t) for t in sm["verifier_only"]}
    # the passes whose reasoning concludes their answer, before and after GRPO (where the family reads
    # conclusions): a verifier-only gain under traces that say otherwise is not reasoning learned
    out["verifier_only_concluded"] = {
        t: [evals.get((stage, t), {}).get("pass@1_concluded") for stage in (sm["start"], "grpo")]
        for t in sm["verifier_only"]
        if all(
            evals.get((stage, t), {}).get("pass@1_concluded") is not None for stage in (sm["start"], "grpo")
        )
    }
    # asked second in a chat, where GRPO drew those prompts too: its start and its gain there (no goal)
    out["second_turn_start"] = sm["second_turn_start"]
    out["grpo_gain_second_turn_mid_families"] = sm["second_turn_mid"]
    if sm["second_turn_mid_gain"] is not None:
        out["grpo_gain_second_turn_mid"] = 100 * sm["second_turn_mid_gain"]
    if sm["second_turn_mid_margin"] is not None:
        out["grpo_gain_second_turn_mid_margin"] = 100 * sm["second_turn_mid_margin"]
    out["copy_loss"] = m.last_value("pretrain", "probe_copy_loss")
    out["pretraining_arithmetic"] = pretraining_arithmetic(run)
    if sm["means"].get("distill") is not None and out.get("final_mean"):
        out["student_mean"] = sm["means"]["distill"]
        out["student_ratio"] = out["student_mean"] / out["final_mean"]
        out["student_before_distillation_mean"] = sm["means"].get("student")
    return out


def stage_means(run: Path) -> tuple[dict[str, float], str | None]:
    """A finished run's mean pass@1 over its families at every stage it scored, and the precision its
    pretraining ran in (what sets two runs of one seed apart on one CPU)."""
    m = RunMetrics(run)
    means = {s: v for s, v in m.pass_at_1_summary()["means"].items() if v is not None}
    return means, m.last_event("pretrain", "start").get("precision")


def agreement(mine: dict[str, float], other: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """(stage, this run's mean, the other's, points apart) for the stages both runs scored, in order."""
    return [(s, mine[s], other[s], 100 * abs(mine[s] - other[s])) for s in STAGES if s in mine and s in other]


def rescore(run: Path, preset: SpeedrunPreset, tasks: list[str], n: int) -> dict[str, dict[str, Any]]:
    """GRPO's gain on `tasks` again, with its starting checkpoint (SFT) and the final one each scored on
    `n` held-out problems per family, sampled as the run's evaluation samples (k, temperature, length,
    seed). Per task: pass@1 before and after, the gain and its paired 95% half-width, in points, and
    where the family's reasoning has a conclusion to read, the passes that conclude their answer
    before and after (fractions). The files and records go to RUN/rescore/: the run's own figures and
    report stay as they were."""
    from nanoseek.evaluate import EvalConfig, evaluate_many

    scored: dict[str, list[dict[str, Any]]] = {}
    for stage in ("sft", "grpo"):
        scored[stage] = evaluate_many(
            [
                EvalConfig(
                    model=str(run / stage),
                    task=task,
                    k=preset.eval_k,
                    n=n,
                    max_new_tokens=preset.max_new_tokens,
                    seed=preset.seed,
                    out=str(run / "rescore" / f"{stage}_{slug(task)}_{n}.json"),
                    run_dir=str(run / "rescore" / ".logs" / f"{stage}_{slug(task)}_{n}"),
                    max_batch_size=preset.engine_batch or None,
                    progress=False,
                )
                for task in tasks
            ]
        )
    out = {}
    for task, before, after in zip(tasks, scored["sft"], scored["grpo"], strict=True):
        margin = paired_margin(_per_problem(before), _per_problem(after))
        out[task] = {
            "problems": n,
            "before": 100 * before["pass@1"],
            "after": 100 * after["pass@1"],
            "gain": 100 * (after["pass@1"] - before["pass@1"]),
            "margin": None if margin is None else 100 * margin,
        }
        if "pass@1_concluded" in before and "pass@1_concluded" in after:
            # the concluded figure said beside a rescored gain is the rescore's, not the run's 48
            out[task]["concluded"] = [before["pass@1_concluded"], after["pass@1_concluded"]]
    return out


def _per_problem(metrics: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's per-problem pass@1 (from the JSON file it wrote), as `paired_margin` reads it."""
    scored = [r for r in json.loads(Path(metrics["json"]).read_text())["problems"] if "pass@1" in r]
    return {
        "pass@1_per_problem": [r["pass@1"] for r in scored],
        "problems_digest": problems_digest([r["id"] for r in scored]),
    }


def pretraining_arithmetic(run: Path) -> dict | None:
    """The pretraining stage's arithmetic against this machine's matmul peak: the teacher's and the
    student's model FLOPs (forward and backward, MTP included) and Muon's Newton-Schulz matmuls, over
    the best rate of a square matmul in the precision they trained in, on the device they trained on
    (the GPU where there is one, as `nanoseek.perf.default_device` put them). The quotient is the least
    time the stage could take on this machine whatever the code around the matmuls, so it says whether a
    budget missed here can be met by making the code faster at all."""
    import torch

    from nanoseek import perf
    from nanoseek.accounting import flops_per_token
    from nanoseek.checkpoint import build_model
    from nanoseek.config import ModelConfig
    from nanoseek.train.loop import param_groups
    from nanoseek.train.muon import muon_param_groups, orthogonalization_flops

    settings = json.loads((run / SETTINGS).read_text())
    seq, batch = settings["seq_len"], settings["pretrain_batch"]
    out: dict[str, Any] = {"model_flops": 0.0, "muon_flops": 0.0}
    precision = None
    for stage, steps in (("pretrain", settings["pretrain_steps"]), ("student", settings["student_steps"])):
        if not (run / stage / "config.json").exists():
            return None
        config = ModelConfig.load(run / stage)
        meta_path = run / stage / "train_state" / "trainer.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        precision = precision or meta.get("precision")
        mtp = settings["mtp_weight"] > 0 and config.num_nextn_predict_layers > 0
        out["model_flops"] += (
            steps * batch * seq * flops_per_token(config, seq, training=True, include_mtp=mtp)
        )
        if settings["pretrain_optimizer"] == "muon":
            # in the precision the trainer picks for Newton-Schulz (Trainer._optimizer)
            ns_dtype = torch.bfloat16 if precision in ("bf16", "fp8") else torch.float32
            model = build_model(config, device="meta")
            groups = muon_param_groups(model, param_groups(model, weight_decay=0.0))
            out["muon_flops"] += steps * orthogonalization_flops(groups, dtype=ns_dtype)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out["precision"] = "bf16" if dtype == torch.bfloat16 else "fp32"
    device = perf.default_device().type  # where the stages trained
    out["device"] = device
    # the machine's peak, every core: what the run had, whatever this process's thread setting. The
    # cores this process may use (`usable_cpus`), not the host's: a thread per host core on a container's
    # or a taskset's few took turns on them, a lower peak and the run put nearer to it than it was
    threads = torch.get_num_threads()
    torch.set_num_threads(perf.usable_cpus())
    out["threads"] = torch.get_num_threads()
    out["peak_flops"] = perf.matmul_peak_flops(dtype, device, seconds=2.0)
    torch.set_num_threads(threads)
    out["floor_s"] = (out["model_flops"] + out["muon_flops"]) / out["peak_flops"]
    return out


def print_verdict(figure: str, goal: str, met: bool | None) -> None:
    mark = "–" if met is None else "meets" if met else "BELOW"
    print(f"  {mark:5s} {figure} (goal {goal})")


def verdicts(f: dict) -> list[tuple[str, str, bool | None]]:
    """(figure, goal, met) for the cpu preset's goals; met is None when the run has no such figure."""
    rows: list[tuple[str, str, bool | None]] = []

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}%"

    final = {t: v.get("grpo") for t, v in f["pass@1"].items()}
    for task, goal in PASS_GOALS.items():
        v = final.get(task)
        rows.append((f"{task} pass@1 {pct(v)}", f">= {goal:.0%}", None if v is None else v >= goal))
    mean = f.get("final_mean")
    rows.append(
        (f"mean pass@1 {pct(mean)}", f">= {MEAN_GOAL:.0%}", None if mean is None else mean >= MEAN_GOAL)
    )

    def pm(margin: float | None) -> str:
        return "" if margin is None else f" ± {margin:.1f} (95%)"

    # GRPO's gains: on the run's own problems, or on the --rescore ones where there are
    again = f.get("rescore") or {}

    def on(task: str) -> str:
        r = again[task]
        return f"{task} {r['before']:.1f} -> {r['after']:.1f}% on {r['problems']} problems"

    mid = f["grpo_gain_mid_families"]
    if mid and all(t in again for t in mid):
        gain = sum(again[t]["gain"] for t in mid) / len(mid)
        margins = [again[t]["margin"] for t in mid]
        margin = None if None in margins else math.sqrt(sum(m * m for m in margins)) / len(mid)
        fams = "; ".join(on(t) for t in mid)
    else:
        gain, margin = f.get("grpo_gain_mid"), f.get("grpo_gain_mid_margin")
        fams = ", ".join(mid) or "none in range"
    rows.append(
        (
            f"GRPO gain on families starting in 20-80% ({fams}): "
            + ("–" if gain is None else f"{gain:+.1f}{pm(margin)} points"),
            f">= +{GRPO_GAIN_GOAL:.0f}",
            None if gain is None else gain >= GRPO_GAIN_GOAL,
        )
    )
    for task, g in f["verifier_only"].items():
        margin, where = f.get("grpo_gain_margin_points", {}).get(task), ""
        concluded = f.get("verifier_only_concluded", {}).get(task)
        if task in again:  # the gain, and the concluded figure said beside it, from the rescore
            g, margin, where = again[task]["gain"], again[task]["margin"], f" ({on(task)})"
            concluded = again[task].get("concluded")
        rows.append(
            (
                f"{task} (verifier only) gain{where} "
                + ("–" if g is None else f"{g:+.1f}{pm(margin)} points")
                + (
                    ""
                    if not concluded
                    else f" (passes concluding their answer {pct(concluded[0])} -> {pct(concluded[1])})"
                ),
                f">= +{ZERO_GAIN_GOAL:.0f}",
                None if g is None else g >= ZERO_GAIN_GOAL,
            )
        )
    c = f.get("copy_loss")
    rows.append(
        (
            "copied-token loss after pretraining " + ("–" if c is None else f"{c:.3f}"),
            f"<= {COPY_GOAL}",
            None if c is None else c <= COPY_GOAL,
        )
    )
    r, before = f.get("student_ratio"), f.get("student_before_distillation_mean")
    rows.append(
        (
            "student / teacher mean pass@1 "
            + ("–" if r is None else f"{r:.0%}")
            + ("" if before is None else f" (the student's mean {before:.1%} before distillation)"),
            f">= {STUDENT_GOAL:.0%}",
            None if r is None else r >= STUDENT_GOAL,
        )
    )
    return rows


def recorded_settings(recorded: dict[str, Any]) -> dict[str, Any]:
    """A run's stored settings (RUN/speedrun.json) as overrides of its preset, JSON's lists back to
    the preset's tuples."""
    preset = PRESETS[recorded["name"]]
    names = {f.name for f in dataclasses.fields(preset)} - {"name"}
    return {
        k: tuple(v) if isinstance(getattr(preset, k), tuple) else v for k, v in recorded.items() if k in names
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--preset", default=None, choices=sorted(BUDGET_S), help="default: the run's own, else cpu"
    )
    ap.add_argument(
        "--precision",
        default=None,
        choices=("auto", "bf16", "fp32"),
        help="default: the run's own, else auto",
    )
    ap.add_argument("--seed", type=torch_seed, default=None, help="default: the run's own, else the preset's")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument(
        "--rescore",
        type=int,
        default=0,
        metavar="N",
        help="score GRPO's start and end again on N held-out problems of each family the gain goals are "
        "about, and judge those goals on them (0: the run's own problems)",
    )
    ap.add_argument(
        "--against",
        default=None,
        metavar="RUN2",
        help="a finished run to hold this one against (the same seed in the other precision): each stage's "
        f"mean pass@1 beside this run's, judged within {AGREEMENT_GOAL:g} points",
    )
    args = ap.parse_args()
    if args.rescore < 0:  # said now, not when the run it would rescore has finished
        ap.error(f"--rescore must be >= 0 (problems per family; 0: the run's own), got {args.rescore}")
    if args.against:  # said now, not after a run of 15 minutes or more
        other, other_precision = stage_means(Path(args.against))
        if not other:
            ap.error(
                f"--against {args.against}: no finished speedrun there (no stage scored in its metrics.jsonl)"
            )
    # A run re-read keeps every setting it was started with (the speedrun refuses to resume with others);
    # --precision and --seed given here still win, and a mismatch is then the speedrun's clear error.
    path = Path(args.out) / SETTINGS if args.out else None
    recorded = json.loads(path.read_text()) if path and path.exists() else {}
    args.preset = args.preset or recorded.get("name", "cpu")
    settings = recorded_settings(recorded) if recorded.get("name") == args.preset in PRESETS else {}
    if args.precision:
        settings["precision"] = args.precision
    if args.seed is not None:
        settings["seed"] = args.seed
    args.precision = settings.get("precision", "auto")
    from nanoseek.perf import cpu_description, default_device
    from nanoseek.train.pretrain import resolve_precision

    resolved = resolve_precision(args.precision, default_device())
    shown = f"auto (pretraining in {resolved} here)" if args.precision == "auto" else args.precision
    print(f"cpu: {cpu_description()}; precision {shown}")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.out or Path(tmp) / "run")
        finished_before = (run / "report.md").exists()
        t0 = time.perf_counter()
        try:
            run_speedrun(run, args.preset, **settings)
        except ValueError as e:  # a run started with other settings, or in use: one line, as the CLI
            raise SystemExit(f"bench_speedrun: error: {e}") from None
        wall = time.perf_counter() - t0
        if finished_before:  # a finished run re-read: its own stage times are the measurement
            ends = [RunMetrics(run).last_event(s, "end") for s in STAGES]
            wall = sum(e.get("wall_time_s") or 0.0 for e in ends if not e.get("beside"))  # not twice
        f = figures(run, args.preset, wall)
        if args.rescore:
            again = [*f["grpo_gain_mid_families"], *f["verifier_only"]]
            print(f"scoring SFT and GRPO again on {args.rescore} problems of: {', '.join(again)}")
            preset = dataclasses.replace(PRESETS[args.preset], **settings)
            f["rescore"] = rescore(run, preset, again, args.rescore)
    print()
    for stage, t in f["stages_s"].items():
        if t is not None:
            note = f" (beside {f['beside'][stage]})" if stage in f["beside"] else ""
            print(f"  {stage:10s} {t:8.1f} s{note}")
    a = f["pretraining_arithmetic"]
    took = f["stages_s"].get("pretrain")
    if took and f["stages_s"].get("student") and "student" not in f["beside"]:
        # the student's pretraining ran on its own: its time is this arithmetic's too
        took += f["stages_s"]["student"]
    if a and took:
        gpu = a.get("device") == "cuda"
        where = f"this {'GPU' if gpu else 'CPU'}'s {a['precision']}"
        on = "" if gpu else f" on {a['threads']} threads"
        print(
            f"  pretraining's arithmetic: {a['model_flops'] / 1e12:.0f} TFLOP of model matmuls + "
            f"{a['muon_flops'] / 1e12:.0f} of Muon's Newton-Schulz (teacher and student) = at least "
            f"{a['floor_s']:.0f} s at {where} matmul peak ({a['peak_flops'] / 1e9:.0f} GFLOP/s{on}); it ran at "
            f"{a['floor_s'] / took:.0%} of that peak"
        )
        if f.get("budget_s"):
            room = f["budget_s"] - (wall - took)  # what the other stages leave pretraining
            need = f"{a['floor_s'] / room:.0%} of the peak" if room > 0 else "more than all of it"
            print(
                f"  the other stages took {wall - took:.0f} s: the budget leaves pretraining {max(room, 0):.0f} s, "
                f"{need}"
            )
    budget = f.get("budget_s")
    verdict = ("within" if f.get("within_budget") else "OVER") if budget else "no"
    print(f"speedrun {args.preset}: {wall / 60:.1f} min, {verdict} budget ({budget / 60:.0f} min)")
    print()
    for task, by_stage in f["pass@1"].items():
        cells = " ".join(f"{s} {100 * v:5.1f}%" for s, v in by_stage.items() if v is not None)
        if task in f["unseen_wordings"]:
            cells += f" | unseen wordings {100 * f['unseen_wordings'][task]:5.1f}%"
        if task in f.get("second_turn_start", {}):
            cells += f" | asked second: sft {100 * f['second_turn_start'][task]:5.1f}%"
            cells += f" grpo {100 * f['second_turn'][task]:5.1f}%"
        elif task in f.get("second_turn", {}):
            cells += f" | asked second {100 * f['second_turn'][task]:5.1f}%"
        print(f"  {task:18s} {cells}")
    if args.preset == "cpu":  # smoke's few steps only prove the stages run
        print()
        for figure, goal, met in verdicts(f):
            print_verdict(figure, goal, met)
        if f.get("grpo_gain_second_turn_mid") is not None:  # no goal: what GRPO adds where it has room
            fams = ", ".join(f["grpo_gain_second_turn_mid_families"])
            margin = f.get("grpo_gain_second_turn_mid_margin")
            print(
                f"  (also) GRPO gain asked second in a chat, on those starting in 20-80% ({fams}): "
                f"{f['grpo_gain_second_turn_mid']:+.1f}{'' if margin is None else f' ± {margin:.1f} (95%)'} points"
            )
    apart = None
    if args.against:
        mine, my_precision = stage_means(run)
        rows = agreement(mine, other)
        print()
        print(f"  stage mean pass@1: this run ({my_precision}) against {args.against} ({other_precision})")
        for stage, a, b, d in rows:
            print(f"    {stage:10s} {100 * a:5.1f}%  {100 * b:5.1f}%  {d:4.1f} apart")
        if rows:
            worst = max(rows, key=lambda r: r[3])
            apart = worst[3]
            f["against"] = {
                "run": args.against,
                "precision": other_precision,
                "apart": {r[0]: r[3] for r in rows},
            }
            print_verdict(
                f"every stage's mean within {AGREEMENT_GOAL:g} points of the other run's: widest "
                f"{worst[0]}, {apart:.1f} apart",
                f"<= {AGREEMENT_GOAL:g}",
                apart <= AGREEMENT_GOAL,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(f, indent=2))
    # a script or CI job that runs this benchmark learns from its status whether the goals hold
    missed = [] if not budget or f.get("within_budget") else ["the time budget"]
    if args.preset == "cpu":
        missed += [figure for figure, _, met in verdicts(f) if met is False]
    if apart is not None and apart > AGREEMENT_GOAL:
        missed.append(f"stage means {apart:.1f} points from {args.against}'s")
    if missed:
        raise SystemExit(f"bench_speedrun: {len(missed)} goal(s) missed: {'; '.join(missed)}")


if __name__ == "__main__":
    main()
