"""The report of an ablation study: RUN/ablate/<study>/report.md and plots, from its files alone.

Reads `plan.json` (variants, their parameters and FLOPs, the claims) and `metrics.jsonl` (one row per
evaluation, a `done` row per finished run), so `nanoseek ablate` can rebuild it at any time.

How a claim is judged:
- "curve" claims compare validation loss at equal training FLOPs and, separately, at equal training
  wall seconds: each run's curve is interpolated linearly at the largest FLOP count (second) that every
  run of both variants reached, and the two variants' values are paired by seed.
- "final" claims compare the last evaluation's value, paired by seed; "fixed" ones are exact
  (accounting), "value" ones hold one variant's value against the paper's range.
- Verdict: "yes" when every seed agrees with the claim, "no" when every seed contradicts it,
  "inconclusive" when seeds disagree (or tie); with one seed, the verdict says so.
- Every run anneals its own schedule over its own budget, so at a point short of a run's end that run
  is mid-schedule: with a token budget the per-second comparison (and the per-FLOP one where FLOPs per
  token differ) sets the slower/costlier run's end against the other's middle; with a seconds budget the
  per-FLOP comparison does. The report says which axis its budget makes the fair one. The spread shown is the
  standard deviation of the per-seed differences (n >= 2).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from nanoseek.accounting import counted
from nanoseek.atomic import atomic_file, atomic_write
from nanoseek.metrics import read_metrics

AXES = (("tokens", "tokens"), ("flops", "training FLOPs"), ("train_s", "training wall seconds"))


class StudyMetrics:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.plan = json.loads((self.dir / "plan.json").read_text(encoding="utf-8"))
        self.curves: dict[str, dict[int, list[dict[str, Any]]]] = {}
        self.done: dict[str, dict[int, dict[str, Any]]] = {}
        rows = list(read_metrics(self.dir))
        finished = {(r["variant"], r["seed"]) for r in rows if r.get("event") == "done"}
        # runs that diverged (their `done` row says why): no curve to compare, named in the verdicts instead
        self.diverged = {
            (r["variant"], r["seed"]) for r in rows if r.get("event") == "done" and r.get("diverged")
        }
        for r in rows:
            if (r.get("variant"), r.get("seed")) not in finished:
                continue
            key = (r["variant"], r["seed"])  # a finished run's row names both
            if r.get("event") == "done":
                self.done.setdefault(key[0], {})[key[1]] = r
            elif key not in self.diverged:
                self.curves.setdefault(key[0], {}).setdefault(key[1], []).append(r)
        for seeds in self.curves.values():
            for curve in seeds.values():
                curve.sort(key=lambda r: r["step"])

    @property
    def variants(self) -> list[str]:
        return [v for v in self.plan["variants"] if v in self.curves]

    def final(self, variant: str, metric: str) -> dict[int, float]:
        out = {}
        for seed, curve in self.curves.get(variant, {}).items():
            v = curve[-1].get(metric)
            if isinstance(v, (int, float)):
                out[seed] = float(v)
        return out

    def common_point(self, variants: list[str], axis: str) -> float | None:
        """The largest x every run of these variants reached."""
        ends = [c[-1][axis] for v in variants for c in self.curves.get(v, {}).values()]
        return min(ends) if ends else None

    def at(self, variant: str, axis: str, x: float, metric: str = "val_loss") -> dict[int, float]:
        out = {}
        for seed, curve in self.curves.get(variant, {}).items():
            xs = [r[axis] for r in curve]
            ys = [r[metric] for r in curve]
            out[seed] = _interp(x, xs, ys)
        return out


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    for i in range(1, len(xs)):
        if xs[i] >= x:
            span = xs[i] - xs[i - 1]
            w = (x - xs[i - 1]) / span if span > 0 else 1.0
            # weighted, not `y0 + w (y1 - y0)`: at a point the run was evaluated at (the common point is
            # the shortest run's last) that rounded its own measurement off, and two variants that
            # measured the same loss there were judged apart instead of tied
            return ys[i - 1] * (1 - w) + ys[i] * w
    return ys[-1]


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _verdict(signs: list[int]) -> str:
    """signs per seed: +1 agrees with the claim, -1 contradicts it, 0 a tie."""
    if not signs:
        return "not run"
    one = " (1 seed)" if len(signs) == 1 else ""
    if all(s > 0 for s in signs):
        return "yes" + one
    if all(s < 0 for s in signs):
        return "no" + one
    return "inconclusive (tie)" if all(s == 0 for s in signs) else "inconclusive (seeds disagree)"


def _sign(ok: bool, tie: bool = False) -> int:
    return 0 if tie else (1 if ok else -1)


def judge(m: StudyMetrics, claim: dict[str, Any], axis: str | None) -> tuple[str, str]:
    """(what we measured, reproduced?) for one claim, at equal `axis` ("flops" / "train_s") or final;
    the verdict names the runs of its variants that diverged (left out of the comparison)."""
    measured, verdict = _judge(m, claim, axis)
    broken = [f"{v} seed {s}" for v, s in sorted(m.diverged) if v in (claim["a"], claim.get("b"))]
    if broken and claim["kind"] != "fixed":
        runs = ", ".join(broken)
        verdict = f"not run: {runs} diverged" if verdict == "not run" else f"{verdict}; {runs} diverged"
    return measured, verdict


def _judge(m: StudyMetrics, claim: dict[str, Any], axis: str | None) -> tuple[str, str]:
    a, b, metric, kind = claim["a"], claim.get("b"), claim["metric"], claim["kind"]
    if kind == "fixed":
        va = m.plan["variants"].get(a, {}).get(metric)
        vb = m.plan["variants"].get(b, {}).get(metric)
        if va is None or vb is None:
            return "–", "not run"
        return f"{a} {va:,} vs {b} {vb:,} ({va / vb:.0%})", "yes" if va < vb else "no"
    if a not in m.curves or (b is not None and b not in m.curves):
        return "–", "not run"
    where = ""
    if claim["at"] == "curve" and axis is not None:
        x_axis: str = claim.get("flops_axis", "flops") if axis == "flops" else axis
        x = m.common_point([a, b] if b is not None else [a], x_axis)
        if x is None:
            return "–", "not run"
        va = m.at(a, x_axis, x, metric)
        vb = m.at(b, x_axis, x, metric) if b is not None else {}
        unit = {"flops": "FLOPs", "main_flops": "main-model FLOPs", "train_s": "s"}[x_axis]
        where = f" at {x:.3g} {unit}"
    else:
        va = m.final(a, metric)
        vb = m.final(b, metric) if b is not None else {}
        where = " (final)"
    if kind == "value":
        vals = list(va.values())
        if not vals:
            return "–", "not run"
        mean, sd = _mean_std(vals)
        spread = f" ± {sd:.3f}" if sd is not None else ""
        signs = [_sign(claim["lo"] <= v) for v in vals]
        return f"{a}: {mean:.3f}{spread}{where}", _verdict(signs)
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return "–", "not run"
    mean_a = sum(va[s] for s in seeds) / len(seeds)
    mean_b = sum(vb[s] for s in seeds) / len(seeds)
    if kind in ("match", "not_worse"):
        rel = [(va[s] - vb[s]) / abs(vb[s]) for s in seeds]
        mean, sd = _mean_std(rel)
        spread = f" ± {100 * sd:.2f}%" if sd is not None else ""
        signs = [_sign(abs(r) <= claim["tol"] if kind == "match" else r <= claim["tol"]) for r in rel]
        return (
            f"{a} {mean_a:.4f} vs {b} {mean_b:.4f}: {100 * mean:+.2f}%{spread}{where}",
            _verdict(signs),
        )
    diffs = [va[s] - vb[s] for s in seeds]
    mean, sd = _mean_std(diffs)
    spread = f" ± {sd:.4f}" if sd is not None else ""
    signs = [_sign(d < 0 if kind == "lower" else d > 0, tie=d == 0) for d in diffs]
    return f"{a} {mean_a:.4f} vs {b} {mean_b:.4f}: Δ {mean:+.4f}{spread}{where}", _verdict(signs)


def summary_rows(m: StudyMetrics) -> list[dict[str, str]]:
    rows = []
    for c in m.plan["claims"]:
        per_flop, ok_flop = judge(m, c, "flops")
        per_s, ok_s = judge(m, c, "train_s")
        rows.append(
            {
                "claim": c["text"],
                "source": c["source"],
                "size": c["size"],
                "per_flop": per_flop,
                "ok_flop": ok_flop,
                "per_s": per_s,
                "ok_s": ok_s,
            }
        )
    return rows


def summary_table(m: StudyMetrics) -> list[str]:
    out = [
        "| paper's claim | source | direction and size (paper) | measured per FLOP (mean ± sd over seeds) "
        "| reproduced per FLOP | measured per wall second | reproduced per second |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary_rows(m):
        out.append(
            f"| {r['claim']} | {r['source']} | {r['size']} | {r['per_flop']} | {r['ok_flop']} | {r['per_s']} "
            f"| {r['ok_s']} |"
        )
    return out


def _plain_words(m: StudyMetrics) -> list[str]:
    lines = []
    for r, c in zip(summary_rows(m), m.plan["claims"], strict=True):
        f, s = r["ok_flop"].split(" ")[0], r["ok_s"].split(" ")[0]
        if c["at"] == "curve" and f == "yes" and s != "yes":
            lines.append(
                f"- **{c['a']} wins per FLOP but not per wall second on this machine** ({c['text']}): "
                f"per second the verdict is '{r['ok_s']}'."
            )
        elif c["at"] == "curve" and s == "yes" and f != "yes":
            lines.append(f"- {c['a']} wins per wall second but not per FLOP ({c['text']}).")
    return lines


def _fmt_n(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def variant_table(m: StudyMetrics) -> list[str]:
    moe = any(m.final(v, "max_violation") for v in m.variants)
    mtp = any(m.final(v, "accuracy") for v in m.variants)
    head = "| variant | what | params total | active | training FLOPs/token | KV cache B/token | runs | final val loss | s/step |"
    sep = "|---|---|---|---|---|---|---|---|---|"
    if moe:
        head += " max violation |"
        sep += "---|"
    if mtp:
        head += " greedy accuracy | draft acceptance |"
        sep += "---|---|"
    out = [head, sep]
    for v, info in m.plan["variants"].items():
        done = m.done.get(v, {})
        loss = m.final(v, "val_loss")
        # the model trained (its vocabulary is the tokenizer's), not the plan's nominal-vocabulary one
        trained = {**info, **next(iter(done.values()), {})}
        cells = [
            v,
            info["about"],
            _fmt_n(trained["total_params"]),
            _fmt_n(trained["active_params"]),
            _fmt_n(trained["flops_per_token"]),
            f"{trained['kv_cache_bytes_per_token']:,}",
            str(len(done)) + (f" ({n} diverged)" if (n := sum((v, s) in m.diverged for s in done)) else ""),
            _ms(list(loss.values()), 4),
            _ms([d["s_per_step"] for d in done.values()], 3),
        ]
        if moe:
            cells.append(_ms(list(m.final(v, "max_violation").values()), 3))
        if mtp:
            cells.append(_ms(list(m.final(v, "accuracy").values()), 3))
            cells.append(_ms(list(m.final(v, "acceptance_rate").values()), 3))
        out.append("| " + " | ".join(cells) + " |")
    return out


def _ms(xs: list[float], digits: int) -> str:
    if not xs:
        return "–"
    mean, sd = _mean_std(xs)
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def violation_table(m: StudyMetrics) -> list[str]:
    per: dict[str, dict[str, list[float]]] = {}
    for v in m.variants:
        for curve in m.curves[v].values():
            layers = curve[-1].get("max_violation_per_layer") or {}
            for layer, x in layers.items():
                per.setdefault(v, {}).setdefault(layer, []).append(x)
    if not per:
        return []
    layers = sorted(
        {k for d in per.values() for k in d}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else s)
    )
    out = [
        "Max violation per MoE layer (max load / mean load − 1, mean over the training steps before the "
        "last evaluation; 0 is perfect balance):",
        "",
        "| variant | " + " | ".join(f"layer {k}" for k in layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    for v, d in per.items():
        out.append(f"| {v} | " + " | ".join(_ms(d.get(k, []), 3) for k in layers) + " |")
    return out + [""]


def plots(m: StudyMetrics) -> list[tuple[str, str]]:
    import numpy as np
    from matplotlib.figure import Figure  # not pyplot: no backend switched under a notebook (report._plots)

    out_dir = m.dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    # the FLOPs plot on the axis the claims are judged on (the mtp study's: main-model FLOPs)
    flops_axis = next((c.get("flops_axis", "flops") for c in m.plan["claims"] if c["at"] == "curve"), "flops")
    for name, label in AXES:
        axis = flops_axis if name == "flops" else name
        if axis == "main_flops":
            label = "main-model training FLOPs"
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        drawn = False
        for v in m.variants:
            curves = list(m.curves[v].values())
            lo = max(c[0][axis] for c in curves)
            hi = min(c[-1][axis] for c in curves)
            if hi <= lo:
                continue
            drawn = True
            grid = np.linspace(lo, hi, 60)
            ys = np.array(
                [[_interp(x, [r[axis] for r in c], [r["val_loss"] for r in c]) for x in grid] for c in curves]
            )
            (line,) = ax.plot(grid, ys.mean(axis=0), label=f"{v} ({counted(len(curves), 'seed')})")
            if len(curves) > 1:
                ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2)
        if not drawn:  # every run diverged (no curve kept): an empty frame linked as a plot said nothing
            continue
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token, log scale)")
        ax.set_yscale("log")
        if name == "flops":
            ax.set_xscale("log")
        ax.set_title(f"{m.plan['study']}: validation loss over {label} (band: seed min–max)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        file = f"val_loss_{name}.png"
        with atomic_file(out_dir / file) as tmp:  # a full disk must not leave half a PNG over the last one
            fig.savefig(tmp, dpi=110, format="png")
        made.append((f"Validation loss over {label}", f"plots/{file}"))
    return made


def _precision_note(m: StudyMetrics) -> str:
    """What each variant trained in, from its runs' done rows (one figure where every run agrees)."""
    each = {
        v: sorted({d["precision"] for d in runs.values() if "precision" in d}) for v, runs in m.done.items()
    }
    per = {v: "/".join(p) for v, p in each.items() if p}
    if not per:
        return ""
    values = set(per.values())
    text = values.pop() if len(values) == 1 else ", ".join(f"{v} {p}" for v, p in per.items())
    device = m.plan.get("device")
    return f" Trained in {text}" + (f" on {device}" if device else "") + "."


def build_study_report(directory: str | os.PathLike) -> Path:
    m = StudyMetrics(directory)
    p = m.plan
    b = p["budget"]
    budget = (
        f"{b['value']:g} s of training"
        if b["kind"] == "seconds"
        else f"{b['value']:,.0f} tokens ({b.get('steps')} steps)"
    )
    seeds = sorted({s for v in m.done.values() for s in v})
    wall = sum(d["train_s"] for v in m.done.values() for d in v.values())
    lines = [
        f"# Ablation: {p['study']}",
        "",
        f"{p['about']}. Preset `{p['preset']}`, {budget} per run, seeds {', '.join(map(str, seeds)) or '–'}; "
        f"{sum(len(v) for v in m.done.values())} finished runs, {wall / 60:.1f} min of training in all."
        + _precision_note(m),
        "",
    ]
    if p.get("note"):
        lines += [f"**Note:** {p['note']}", ""]
    lines += ["## Summary", "", *summary_table(m), ""]
    plain = _plain_words(m)
    if plain:
        lines += plain + [""]
    fair = (
        "This study had a seconds budget: every run ends (its schedule annealed) at the same wall time, so "
        "the per-second column is the like-for-like one; per FLOP, a faster run is read mid-schedule, "
        "before its learning rate has decayed."
        if b["kind"] == "seconds"
        else "This study had a token budget: runs of equal FLOPs per token end together, so the per-FLOP "
        "column is the like-for-like one; per second (and per FLOP where FLOPs per token differ), the "
        "cheaper run is read mid-schedule, before its learning rate has decayed."
    )
    lines += [
        "Per FLOP: validation loss at the largest training FLOP count both variants reached (FLOPs from "
        "`nanoseek.accounting`, 3 x forward, MTP included where it trains). Per wall second: at the largest "
        "training time both reached, on this machine (evaluation excluded). A claim is reproduced when every "
        "seed agrees with it, not reproduced when every seed contradicts it. " + fair,
        "",
        "## Variants",
        "",
        *variant_table(m),
        "",
        *violation_table(m),
        "## Plots",
        "",
    ]
    made = plots(m)
    for title, path in made:
        lines += [f"### {title}", "", f"![{title}]({path})", ""]
    if not made:
        lines += ["No validation curve to plot: no run of this study finished without diverging.", ""]
    return atomic_write(m.dir / "report.md", "\n".join(lines))


def build_index(root: str | os.PathLike, studies: tuple[str, ...] | list[str]) -> Path:
    """RUN/ablate/report.md: every study's summary table, linking to its report."""
    root = Path(root)
    lines = ["# Ablations", ""]
    for s in studies:
        d = root / s
        if not (d / "plan.json").exists():
            continue
        m = StudyMetrics(d)
        lines += [
            f"## {s}: {m.plan['about']}",
            "",
            f"[full report]({s}/report.md)",
            "",
            *summary_table(m),
            "",
        ]
    return atomic_write(root / "report.md", "\n".join(lines))
