"""The report card: RUN/report.md and PNG plots, built only from RUN/metrics.jsonl.

Stages log what they measure (see `nanoseek.metrics`); this module reads that log and nothing else,
so a report can be rebuilt at any time with `nanoseek report RUN`.

Records it understands (all optional; missing figures show as "–"):
- any stage: `{"event": "end", "wall_time_s", "tokens", ...}` written when the stage finishes
  (`wall_s` in pretraining's before), `{"event": "start", "precision"}` when a training stage starts afresh,
  `{"event": "resume", "from_step"}` when one continues from a checkpoint
- pretrain / sft / distill steps: `loss`, `val_loss`, `expert_load` ({layer: [tokens per expert]}),
  `tok_per_s`, `mfu`
- grpo steps: `reward`, `accuracy`, `format`, `response_length`, `kl`, `entropy`, `tokens` (the running
  total of the rollouts' prompt and completion tokens)
- eval: `evaluated` (which checkpoint / stage), `pass@1`, `cons@k`, `format_rate`, `language_consistency`,
  `mean_length`, `k`, `task`
- speedrun: `{"event": "model", "total_params", "active_params", "kv_cache_bytes_per_token",
  "mha_kv_cache_bytes_per_token", "attention_variant", "decode_tokens_per_s"}`; each training stage logs
  the same at a new run's start without the decode speed, which a run built by hand shows when no
  speedrun measured it
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, TypeGuard

from nanoseek.accounting import counted
from nanoseek.atomic import atomic_file, atomic_write, check_writable
from nanoseek.data.tasks import as_second_turn, in_unseen_wordings, is_later_turn, is_unseen_wordings
from nanoseek.evaluate import Z_95, standard_error, t_95
from nanoseek.metrics import read_metrics

# every stage a speedrun may run, in order (the control only in presets that have it)
STAGES = ("tokenizer", "pretrain", "student", "sft", "grpo", "control", "distill", "eval")
# the checkpoints evaluated; "student" is the dense student before distillation, beside what it became
EVAL_STAGES = ("pretrain", "sft", "grpo", "control", "student", "distill")
# a process's first steps, left out of the stage table's throughput and MFU: they compile and warm the
# caches and the allocator (nanochat leaves its first 10 out of its timing)
WARMUP_STEPS = 5


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 10**digits:  # where `g` would switch to an exponent (1.23e+03 s)
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _human(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _concluded(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The clause on the passes whose reasoning concludes their answer, before and after, where the task
    reads conclusions ("" elsewhere). The verifier reads the answer alone: a gain of right answers after
    reasoning that concluded otherwise ("So 85 is smaller." and 85 as the largest) is not reasoning
    learned, and the report must not let the pass@1 say it is."""
    if "pass@1_concluded" not in before or "pass@1_concluded" not in after:
        return ""
    return (
        "; counting only the passes whose reasoning concludes their answer "
        f"{_pct(before['pass@1_concluded'])} → {_pct(after['pass@1_concluded'])}"
    )


def _pct(v: float | None) -> str:
    # a figure that is no number ("nan" as a MetricsLog writes a NaN, a hand-written string): no figure
    return f"{100 * v:.1f}%" if _number(v) else "–"


def _seconds(v: float | None) -> str:
    """'3,600 s', '4.1 s': every row of the stage table, its total too (which wrote "7200.0 s")."""
    return "–" if v is None else f"{_fmt(round(v, 1))} s"


def _finite(v: Any) -> TypeGuard[float]:
    return _number(v) and math.isfinite(v)


def _number(v: Any) -> TypeGuard[float]:  # (an int too, not a bool)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _training_step(r: dict[str, Any]) -> bool:
    """A trainer's record of one step (not a validation, probe or event record)."""
    return r.get("event") is None and "loss" in r and _number(r.get("step"))


def latest_run(records: list[dict[str, Any]]) -> list[tuple[float | None, list[dict[str, Any]]]]:
    """One stage's records of its latest run, split by the processes that wrote them: (the step it
    resumed from, None for the first; its records). A start record begins a new run (one trained
    afresh into the same RUN); a resume record, or in logs from before there were any a step logged
    again, begins the next process's part."""
    parts: list[tuple[float | None, list[dict[str, Any]]]] = [(None, [])]
    last: float | None = None  # the latest step logged
    before = None  # the parts a start record set aside, while its run has logged no step
    for r in records:
        if r.get("event") == "start":
            if before is None:  # (a second start that trained nothing keeps the run the first set aside)
                before = (parts, last)
            parts, last = [(None, [])], None
        elif r.get("event") == "resume" and _number(r.get("from_step")):
            if before is not None:  # the start trained nothing (stopped at once): the earlier run goes on
                parts, last = before
            parts.append((r["from_step"], []))
            last = r["from_step"]
        elif _training_step(r) and last is not None and r["step"] <= last:
            # no checkpoint comes before step 1: a step 1 again is a new run
            parts = [(None, [])] if r["step"] <= 1 else [*parts, (r["step"] - 1, [])]
        parts[-1][1].append(r)
        if _training_step(r):
            last, before = r["step"], None
    if before is not None and any(records for _, records in before[0]):
        # the latest start logged no step (killed or failed before its first, or still starting): it
        # saved nothing, so RUN holds the earlier run's checkpoint, which the report describes (it showed
        # an empty stage and dropped that checkpoint's evaluations)
        parts = before[0]
    return [p for p in parts if p[1]]


def trained_starts(records: list[dict[str, Any]]) -> list[float]:
    """The times of one stage's start records whose run logged a training step: a start stopped before
    its first step (told it would replace an earlier checkpoint) leaves that run to be resumed."""
    starts: list[float] = []
    pending: float | None = None
    for r in records:
        if r.get("event") == "start" and _number(r.get("time")):
            pending = r["time"]
        elif r.get("event") == "resume":
            pending = None  # the steps after it are the resumed run's, not the start's (it trained nothing)
        elif _training_step(r) and pending is not None:
            starts.append(pending)
            pending = None
    return starts


def current_records(parts: list[tuple[float | None, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The records of `latest_run`'s parts that still hold: a resumed process replays the steps after
    its checkpoint, so those an earlier process logged past it are dropped (their tokens, losses)."""
    out: list[dict[str, Any]] = []
    limit = math.inf
    for resumed_from, records in reversed(parts):
        out[:0] = [r for r in records if not (_number(r.get("step")) and r["step"] > limit)]
        if resumed_from is not None:
            limit = min(limit, resumed_from)
    return out


def stopped(records: list[dict[str, Any]]) -> bool:
    """Whether a process of a training stage wrote its beginning (a start or resume record) but no end
    record: killed, or still running."""
    began = any(r.get("event") in ("start", "resume") for r in records)
    return began and not any(r.get("event") == "end" for r in records)


def machines(records: list[dict[str, Any]]) -> int:
    """The machines a stage's process ran on: the `nodes` its records carry (a pretraining under
    torchrun over several nodes, and its tokenizer); 1 otherwise, however many processes ran on the
    one machine."""
    for r in records:
        if _number(r.get("nodes")) and r["nodes"] >= 1:
            return int(r["nodes"])
    return 1


def wall_time(
    parts: list[tuple[float | None, list[dict[str, Any]]]], per_machine: bool = False
) -> float | None:
    """Seconds of `latest_run`, summed over its processes: each one's last end record, else the
    running time its steps logged (GRPO's), else for a process killed and resumed after, or one
    `stopped`, the span of its records; None when no part tells. `per_machine`: machine-seconds, each
    part's time by the `machines` it ran on."""
    total: float | None = None
    for i, (_, records) in enumerate(parts):
        ends = [e.get("wall_time_s", e.get("wall_s")) for e in records if e.get("event") == "end"]
        running = [r["wall_time_s"] for r in records if _training_step(r) and _number(r.get("wall_time_s"))]
        times = [r["time"] for r in records if _number(r.get("time"))]
        scored = [r for r in records if "task" in r and _number(r.get("wall_time_s"))]
        if ends and _number(ends[-1]):
            wall = ends[-1]
        elif running:
            wall = max(running)
        elif scored:  # evaluations run by hand (`nanoseek eval`), which write no end record
            wall = evaluation_time(scored)
        elif (i + 1 < len(parts) or stopped(records)) and times:
            wall = max(times) - min(times)
        else:
            continue
        total = (total or 0.0) + wall * (machines(records) if per_machine else 1)
    return total


def evaluation_time(records: list[dict[str, Any]]) -> float:
    """Seconds eval records took, drawing and scoring (`wall_time_s`): samples drawn in one queue for
    several tasks (`evaluate_many`: `sampled_with`) are that queue's time, which each record carries,
    counted once."""
    total, queues = 0.0, set()
    for r in records:
        if r.get("sampled_with"):
            drawing = r.get("generation_time_s", 0.0)
            total += r["wall_time_s"] - drawing
            queue = (r.get("checkpoint"), tuple(r["sampled_with"]), drawing)
            if queue not in queues:
                queues.add(queue)
                total += drawing
        else:
            total += r["wall_time_s"]
    return total


class RunMetrics:
    """The run's metrics grouped by stage, with helpers for the figures the report needs. Each stage's
    records are those of its latest run (`latest_run`, `current_records`)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        if self.run_dir.is_file():
            raise ValueError(f"{run_dir} is a file: give its run directory, {self.run_dir.parent}")
        self.records = list(read_metrics(self.run_dir))
        grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in self.records:
            grouped[str(r.get("stage"))].append(r)
        self.runs = {stage: latest_run(records) for stage, records in grouped.items()}
        self.by_stage: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for stage, parts in self.runs.items():
            self.by_stage[stage] = current_records(parts)
        # the latest evaluations `evals` left out for want of a score, which the report names
        self.unscored: dict[tuple[str, str], str] = {}

    def wall_time(self, stage: str, per_machine: bool = False) -> float | None:
        return wall_time(self.runs.get(stage, []), per_machine)

    def run_wall_time(self, per_machine: bool = False) -> float:
        """The run's seconds over every process that ran it: each stage's, but those trained beside
        another (inside that one's time). `per_machine`: machine-seconds (`machines`)."""
        return sum(
            self.wall_time(s, per_machine) or 0.0
            for s in STAGES
            if not self.last_event(s, "end").get("beside")
        )

    def events(self, stage: str, event: str) -> list[dict[str, Any]]:
        return [r for r in self.by_stage.get(stage, []) if r.get("event") == event]

    def last_event(self, stage: str, event: str) -> dict[str, Any]:
        ev = self.events(stage, event)
        return ev[-1] if ev else {}

    def steps(self, stage: str, key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in self.by_stage.get(stage, []):
            ok = r.get("event") in (None, "step", "train", "val")
            # a non-finite value is left out, as the "nan" a MetricsLog writes for one is: in a
            # hand-written log's NaN, one value blanked a moving average for the rest of the run
            value = r.get(key)
            ok = ok and isinstance(value, (int, float)) and math.isfinite(value)
            if ok and isinstance(r.get("step"), (int, float)):
                xs.append(r["step"])
                ys.append(float(r[key]))
        return xs, ys

    def total(self, stage: str, key: str) -> float:
        """A stage's total of a per-step figure such as tokens: stages log either a per-step count
        (summed here) or a running total (strictly increasing: its last value is the total)."""
        _, values = self.steps(stage, key)
        if len(values) > 1 and all(b > a for a, b in zip(values, values[1:], strict=False)):
            return values[-1]
        return sum(values)

    def steady_median(self, stage: str, key: str) -> float | None:
        """The median of a per-step figure (`tok_per_s`, `mfu`) over the steps after each process's first
        `WARMUP_STEPS`, or over all of them where no process ran more; None where none logged it."""
        steady, every = [], []
        for resumed_from, records in self.runs.get(stage, []):
            for r in records:
                if _training_step(r) and _finite(r.get(key)):
                    every.append(r[key])
                    if r["step"] > (resumed_from or 0) + WARMUP_STEPS:
                        steady.append(r[key])
        return statistics.median(steady or every) if every else None

    def train_loss_key(self, stage: str) -> str:
        """The key of `stage`'s training loss to set beside its `val_loss`: the language-model term where
        the stage logs it apart (pretraining's `loss` adds λ x the MTP loss and the balance loss, which
        the held-out loss leaves out), else `loss`."""
        return "lm_loss" if self.steps(stage, "lm_loss")[0] else "loss"

    def last_value(self, stage: str, key: str) -> Any:
        for r in reversed(self.by_stage.get(stage, [])):
            if r.get(key) is not None:
                return r[key]
        return None

    def evals(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The latest eval record per (evaluated checkpoint/stage name, task), of the stage's latest
        run: one scored before the stage was trained afresh into RUN scored weights no longer there."""
        began = {id(parts[0][1][0]): stage for stage, parts in self.runs.items() if parts}
        seen: set[str] = set()
        out: dict[tuple[str, str], dict[str, Any]] = {}
        self.unscored = {}
        for r in self.records:
            if id(r) in began and began[id(r)] in seen:  # the latest run, after an earlier one
                out = {key: v for key, v in out.items() if key[0] != began[id(r)]}
                self.unscored = {key: v for key, v in self.unscored.items() if key[0] != began[id(r)]}
            seen.add(str(r.get("stage")))
            if str(r.get("stage")) != "eval":
                continue
            # `eval --split train` scored training problems: not held out, nor a gain on them
            if r.get("split", "test") != "test":
                continue
            name = r.get("evaluated") or r.get("checkpoint")
            if name and ("pass@1" in r or "accuracy" in r):
                key = (str(name), str(r.get("task")))
                score = r.get("pass@1", r.get("accuracy"))
                if not _finite(score):
                    # "nan" (a MetricsLog's NaN), null or a string in a hand-written record: its gains
                    # and means stopped the report with a TypeError; left out (an earlier score of the
                    # same checkpoint too: it is not the latest), and said so
                    out.pop(key, None)
                    self.unscored[key] = f"{name} on {key[1]} (pass@1 {json.dumps(score)})"
                    continue
                self.unscored.pop(key, None)
                cons = next((v for k, v in r.items() if k.startswith("cons@")), None)
                out[key] = {
                    **r,
                    "cons": cons,
                    "length": r.get("mean_length", r.get("mean_response_tokens", r.get("mean_tokens"))),
                }
        return out

    def pass_at_1_summary(self) -> dict[str, Any]:
        """What the main job's goals are judged on: pass@1 per (stage, task), each stage's mean over
        the tasks, GRPO's gain on the families whose start lies in [20%, 80%] and on the
        verifier-only families, measured from GRPO's starting checkpoint (SFT, else pretraining)."""
        evals = self.evals()
        stages = [s for s in EVAL_STAGES if any(name == s for name, _ in evals)]
        asked_otherwise = lambda t: is_unseen_wordings(t) or is_later_turn(t)  # noqa: E731
        tasks = list(dict.fromkeys(t for name, t in evals if name in stages and not asked_otherwise(t)))
        value = {(s, t): r.get("pass@1", r.get("accuracy")) for (s, t), r in evals.items() if s in stages}
        # the final model on the same held-out problems in phrasings no stage trained on, and each
        # asked second in a chat
        unseen = {
            t: value[("grpo", in_unseen_wordings(t))]
            for t in tasks
            if ("grpo", in_unseen_wordings(t)) in value
        }
        second_turn = {
            t: value[("grpo", as_second_turn(t))] for t in tasks if ("grpo", as_second_turn(t)) in value
        }
        means = {}
        for s in stages:
            vs = [v for t in tasks if (v := value.get((s, t))) is not None]
            means[s] = sum(vs) / len(vs) if vs and len(vs) == len(tasks) else None  # (every task scored)
        zero = [t for t in self.last_event("speedrun", "plan").get("verifier_only_tasks", []) if t in tasks]
        start = self.grpo_start() or ("sft" if "sft" in stages else "pretrain")
        gains: dict[str, float] = {}
        margins: dict[str, float] = {}
        for t in tasks:
            b, a = value.get((start, t)), value.get(("grpo", t))
            if b is not None and a is not None:
                gains[t] = a - b
                margin = paired_margin(evals[(start, t)], evals[("grpo", t)])
                if margin is not None:
                    margins[t] = margin
        mid = [t for t in gains if t not in zero and 0.2 <= value[(start, t)] <= 0.8]
        # asked second in a chat, where GRPO drew those prompts too (`grpo_second_turn`) and the run
        # scored its start on them: GRPO's gain there
        second_start: dict[str, float] = {}
        second_gains: dict[str, float] = {}
        second_margins: dict[str, float] = {}
        for t, after in second_turn.items():
            key = (start, as_second_turn(t))
            if key in value:
                second_start[t] = value[key]
                second_gains[t] = after - value[key]
                margin = paired_margin(evals[key], evals[("grpo", as_second_turn(t))])
                if margin is not None:
                    second_margins[t] = margin
        second_mid = [t for t in second_gains if t not in zero and 0.2 <= second_start[t] <= 0.8]
        return {
            "stages": stages,
            "tasks": tasks,
            "pass@1": value,
            "means": means,
            "start": start,
            "gains": gains,
            "gain_margins": margins,
            "mid": mid,
            **_mean_gain("mid", mid, gains, margins),
            "verifier_only": zero,
            "unseen_wordings": unseen,
            "second_turn": second_turn,
            "second_turn_start": second_start,
            "second_turn_gains": second_gains,
            "second_turn_margins": second_margins,
            "second_turn_mid": second_mid,
            **_mean_gain("second_turn_mid", second_mid, second_gains, second_margins),
        }

    def grpo_start(self) -> str | None:
        """The checkpoint GRPO trained from, as its start record names it (`--init`: RUN/sft, or
        RUN/pretrain for an R1-Zero run), by the name its evaluations have; None in logs from before
        it. Guessed from what was evaluated (SFT where scored, else pretraining), GRPO's gain counted
        SFT's as its own where SFT was trained but not scored, and an R1-Zero run's was read from SFT."""
        init = self.last_event("grpo", "start").get("init")
        if not isinstance(init, str) or not init:
            return None
        # named as `nanoseek eval` names what it scored (`evaluate._outputs`): a directory by its own
        # name ("RUN/sft": "sft"), a Hub model by its whole one (its last part alone matched no score)
        scored = {r.get("evaluated") for r in self.records if r.get("stage") == "eval"}
        return init if init in scored else Path(init).name or None

    def model_info(self) -> dict[str, Any]:
        # a speedrun's (with its decode speed), else the first stage's: a run fine-tuned by hand has
        # only sft's, distill's or grpo's
        for stage in ("speedrun", "pretrain", "sft", "distill", "grpo"):
            info = self.last_event(stage, "model")
            if info:
                return info
        return {}


def build_report(
    run_dir: str | os.PathLike, usd_per_hour: float = 0.10, out: str | os.PathLike | None = None
) -> Path:
    """Write RUN/report.md and RUN/plots/*.png (or into `out`: a run on a read-only disk, a shared or
    mounted one, has its report written elsewhere); returns the report path."""
    if not 0 <= usd_per_hour < math.inf:  # NaN fails too; a negative price wrote a negative cost
        raise ValueError(f"--usd-per-hour must be a price >= 0, got {usd_per_hour}")
    m = RunMetrics(run_dir)
    if not m.records:
        raise FileNotFoundError(
            f"no metrics.jsonl records in {run_dir}: run a stage (or `nanoseek speedrun`) first"
        )
    out_dir = m.run_dir if out is None else Path(out)
    try:
        check_writable(out_dir)
    except OSError as e:
        raise ValueError(
            f"cannot write the report in {e.filename}: {e.strerror}; name another place with --out DIR"
        ) from None
    plots = _plots(m, out_dir)
    # the absolute path's name: `nanoseek report .` (in the run) titled it "nanoseek report: " alone
    lines: list[str] = [f"# nanoseek report: {Path(os.path.abspath(m.run_dir)).name}", ""]
    info = m.model_info()
    lines += ["## Model", ""]
    lines += ["| figure | value |", "|---|---|"]
    lines.append(f"| parameters, total | {_human(info.get('total_params'))} |")
    lines.append(f"| parameters, active per token | {_human(info.get('active_params'))} |")
    kv, mha = info.get("kv_cache_bytes_per_token"), info.get("mha_kv_cache_bytes_per_token")
    ratio = ""
    if kv and mha:
        # a Llama without grouping caches what MHA does, and an MLA of few heads more: "1.0x smaller"
        # and "0.6x smaller" said otherwise (as `nanoseek inspect` words it)
        if kv < mha:
            ratio = f" ({mha / kv:.1f}x smaller than MHA's {_fmt(mha)} B)"
        else:
            ratio = f" ({kv / mha:.1f}x more than MHA's {_fmt(mha)} B)" if kv > mha else " (as much as MHA)"
    # a Qwen2/Llama-shaped run caches K and V heads (GQA), not MLA's latent; a log older than the
    # field is MLA's, all a run could train then
    variant = str(info.get("attention_variant") or "mla").upper()
    lines.append(f"| KV-cache bytes per token ({variant}, BF16) | {_fmt(kv)}{ratio} |")
    lines.append(f"| decode tokens/s (batch 1) | {_fmt(info.get('decode_tokens_per_s'))} |")
    lines.append("")

    lines += ["## Stages", ""]
    lines += [
        "| stage | wall time | tokens | est. cost | final loss | val loss | tokens/s | MFU | precision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        end = m.last_event(stage, "end")
        if not end and not m.by_stage.get(stage):
            continue
        wall = m.wall_time(stage)
        tokens = end.get("tokens") or m.total(stage, "tokens") or None
        # a price per machine-hour: a pretraining over N nodes costs N machines' time (not one's, nor
        # one per process: the processes of one machine share its price)
        cost = f"${(m.wall_time(stage, True) or 0) / 3600 * usd_per_hour:.4f}" if wall is not None else "–"
        nodes = sorted({machines(records) for _, records in m.runs.get(stage, [])} or {1})
        if nodes[-1] > 1:  # (a run resumed on another number of nodes: the fewest and the most)
            cost += f" ({'-'.join(map(str, dict.fromkeys([nodes[0], nodes[-1]])))} machines)"
        shown = _seconds(wall)
        if stopped(m.runs[stage][-1][1]):  # its latest process
            shown += " (no end record: stopped, or still running)"
        if end.get("beside"):  # ran in a second process during another stage: inside that one's time
            shown += f" (beside {end['beside']})"
            cost = f"in {end['beside']}'s"
        # GRPO's `loss` is its clipped surrogate, near 0 at every step by construction (advantages are
        # normalized within each group): a final "-3.35e-08" beside the cross-entropies read as a model
        # fit perfectly. Its reward and accuracy are plotted below.
        # The last finite one, as the loss plot draws them: a last step skipped for a NaN loss (no update
        # taken) showed "nan" for weights that are the step before's. The skipped steps are counted
        # beside it, which the report said nothing of.
        losses = [] if stage == "grpo" else m.steps(stage, m.train_loss_key(stage))[1]
        loss = _fmt(losses[-1] if losses else None)
        skipped = sum(1 for r in m.by_stage[stage] if _training_step(r) and r.get("skipped"))
        if skipped:
            loss += f" ({counted(skipped, 'step')} skipped)"  # as the trainer says it
        mfu = m.steady_median(stage, "mfu")
        # what the speed and MFU were measured in: bf16 and fp32 differ several-fold on one CPU, and
        # "auto" picks by the machine
        precision = m.last_event(stage, "start").get("precision")
        lines.append(
            f"| {stage} | {shown} | {_human(tokens)} | {cost} | {loss} | {_fmt(m.last_value(stage, 'val_loss'))} "
            f"| {_human(m.steady_median(stage, 'tok_per_s'))} | {'–' if mfu is None else _fmt(100 * mfu) + '%'} "
            f"| {_fmt(precision)} |"
        )
    total_s = m.run_wall_time()
    total_cost = m.run_wall_time(per_machine=True) / 3600 * usd_per_hour
    lines.append(f"| **total** | {_seconds(total_s)} | | ${total_cost:.4f} | | | | | |")
    lines += [
        "",
        f"Cost is estimated at ${usd_per_hour:.2f} per machine-hour: each stage's wall time x the machines "
        "it ran on.",
    ]
    if any(m.steady_median(s, "tok_per_s") is not None for s in STAGES):
        lines.append(
            "Tokens/s and MFU (the model's FLOPs over the machine's measured matmul peak in the stage's "
            "precision) are the median over "
            f"a stage's training steps after each process's first {WARMUP_STEPS} (compilation, warming caches), "
            "over all of them where none is left."
        )
    lines.append("")

    probe = {k: m.last_value("pretrain", f"probe_{k}_loss") for k in ("copy", "digit", "text", "answer")}
    if any(v is not None for v in probe.values()):
        lines += [
            "## What pretraining learned",
            "",
            "Held-out loss (nats per token) at the end of pretraining, on the responses of held-out "
            "problems, by kind of token: digits of a number the document already wrote (copied), the "
            "other digits (computed), the rest (template), and the final answer. ln 10 ≈ 2.3 is a guess "
            "among ten digits.",
            "",
            "| copied | computed | template | final answer |",
            "|---|---|---|---|",
            "| " + " | ".join(_fmt(probe[k]) for k in ("copy", "digit", "text", "answer")) + " |",
            "",
        ]

    evals = m.evals()
    if evals:
        lines += _pass_at_1_tables(m, evals)
        lines += ["## Held-out evaluation, every figure", ""]
        interval = (
            " (± 95%)"
            if any(_finite(r.get("pass@1_stderr")) and r["pass@1_stderr"] for r in evals.values())
            else ""
        )  # 0: none (`plus_minus`)
        lines += [
            f"| checkpoint | task | k | pass@1{interval} | cons@k | format rate | language consistency | mean length |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (name, task), r in evals.items():
            lines.append(
                f"| {name} | {task} | {_fmt(r.get('k'))} | {_pct(r.get('pass@1', r.get('accuracy')))}"
                f"{plus_minus(pass_at_1_margin(r))} | "
                f"{_pct(r.get('cons'))} | {_pct(r.get('format_rate'))} | {_pct(r.get('language_consistency'))} | "
                f"{_fmt(r.get('length'))} |"
            )
        lines.append("")
        start = m.grpo_start()
        for task in sorted({t for _, t in evals}):
            before = (
                evals.get((start, task))
                if start
                else evals.get(("sft", task)) or evals.get(("pretrain", task))
            )
            after = evals.get(("grpo", task))
            if before and after and before.get("pass@1") is not None and after.get("pass@1") is not None:
                b, a = before["pass@1"], after["pass@1"]
                # evaluations run by hand with another --n, --seed or --language: a difference that is
                # as much the problems' as GRPO's, which the reader must be told
                other = (
                    f" on different problems ({_fmt(before.get('problems'))} before, "
                    f"{_fmt(after.get('problems'))} after: evaluate both with the same --n, --seed and "
                    "--language to compare like with like)"
                    if not same_problems(before, after)
                    else ""
                )
                lines.append(
                    f"- {task}: GRPO changed held-out pass@1 by "
                    f"**{100 * (a - b):+.1f}{plus_minus(paired_margin(before, after))} points** "
                    f"({_pct(b)} → {_pct(a)}){other}; format rate {_pct(before.get('format_rate'))} → "
                    f"{_pct(after.get('format_rate'))}{_concluded(before, after)}."
                )
            control = evals.get(("control", task))
            if control and after:
                lines.append(
                    f"- {task}, control (the same wall time spent on more supervised training instead of GRPO): "
                    f"pass@1 {_pct(control.get('pass@1'))}, cons@k {_pct(control.get('cons'))}; GRPO: "
                    f"{_pct(after.get('pass@1'))}, cons@k {_pct(after.get('cons'))}."
                )
            student = evals.get(("distill", task))
            if student:
                lines.append(f"- {task}, distilled dense student: pass@1 {_pct(student.get('pass@1'))}.")
        lines.append("")
    if m.unscored:  # (`evals` left them out)
        lines += [f"Left out, with no pass@1 to show: {'; '.join(m.unscored.values())}.", ""]

    if plots:
        lines += ["## Plots", ""]
        for title, rel in plots:
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    return atomic_write(out_dir / "report.md", "\n".join(lines) + "\n")


def _mean_gain(
    name: str, tasks: list[str], gains: dict[str, float], margins: dict[str, float]
) -> dict[str, float | None]:
    """The mean gain over `tasks` (`NAME_gain`) and its 95% half-width (`NAME_margin`): the tasks'
    problems are drawn independently, so their variances add."""
    margin = None
    if tasks and all(t in margins for t in tasks):
        margin = math.sqrt(sum(margins[t] ** 2 for t in tasks)) / len(tasks)
    return {
        f"{name}_gain": sum(gains[t] for t in tasks) / len(tasks) if tasks else None,
        f"{name}_margin": margin,
    }


def same_problems(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether two evaluations scored the same problems (`problems_digest`; records from before it
    was logged are taken to)."""
    a, b = after.get("problems_digest"), before.get("problems_digest")
    return a is None or b is None or a == b


def paired_margin(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Half-width of the 95% interval on after - before, paired over the problems both evaluations
    scored (`t_95` standard errors of the per-problem differences). None unless both records carry
    per-problem scores of the same problems (`problems_digest`).

    A family's held-out problems are few (the speedrun's 48), and a model gets most of them all right
    or all wrong across its samples, so a stage's gain moves by several points with the draw of
    problems; the interval says how far. Pairing removes what the two checkpoints share."""
    a, b = after.get("pass@1_per_problem"), before.get("pass@1_per_problem")
    digest = after.get("problems_digest")
    if not a or not b or len(a) != len(b) or digest is None or digest != before.get("problems_digest"):
        return None
    return t_95(len(a)) * standard_error([x - y for x, y in zip(a, b, strict=True)])


def pass_at_1_margin(r: dict[str, Any]) -> float | None:
    """Half-width of the 95% interval on an evaluation's pass@1, from its record (`problems`,
    `pass@1_stderr`): `t_95` standard errors, the normal `Z_95` for a record that does not count its
    problems. None where it has no finite standard error or one problem (no spread to measure: its 0.0
    would read as certainty; lm-eval prints N/A)."""
    se, n = r.get("pass@1_stderr"), r.get("problems")
    if _finite(se) and not (_finite(n) and n < 2):  # ("nan", as a MetricsLog writes a NaN)
        return (t_95(int(n)) if _finite(n) else Z_95) * se
    return None


def plus_minus(margin: float | None, points: bool = True) -> str:
    """' ± 6.1' (points) for a 95% interval's half-width, or nothing when there is none. A half-width
    of 0 is none: scores with no spread (every problem solved, or none; one problem) have none to
    measure, and "0.0% ± 0.0" over 48 problems read as certainty. With `points` False, ' ± 0.031': a
    figure beside a fraction (`nanoseek eval`'s standard error), by the same rule."""
    if not margin:
        return ""
    return f" ± {100 * margin:.1f}" if points else f" ± {margin:.3f}"


def _pass_at_1_tables(m: RunMetrics, evals: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """pass@1 per family and per language before and after each stage, and the R1 summary lines."""
    sm = m.pass_at_1_summary()
    stages, tasks, value, means = sm["stages"], sm["tasks"], sm["pass@1"], sm["means"]
    if not stages or not tasks:
        return []
    ks = sorted({r["k"] for (s, t), r in evals.items() if s in stages and t in tasks and r.get("k")})
    # evaluations a user ran by hand may each draw their own k: the header names every one
    k = " or ".join(_fmt(v) for v in ks) + (" by evaluation" if len(ks) > 1 else "") if ks else "–"
    out = [f"## Held-out pass@1 (k = {k}, R1's sampling)", ""]
    out += ["| family | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for task in tasks:
        out.append(f"| {task} | " + " | ".join(_pct(value.get((s, task))) for s in stages) + " |")
    out.append("| **mean** | " + " | ".join(f"**{_pct(means[s])}**" for s in stages) + " |")
    languages = sorted(
        # the languages of the families above: one only an unseen-wording or second-turn evaluation
        # (or a stage outside the table) drew made a row of dashes
        {
            lang
            for (s, t), r in evals.items()
            if s in stages and t in tasks
            for lang in r.get("pass@1_by_language") or {}
        },
        key=lambda x: ("en", "ja", "zh").index(x) if x in ("en", "ja", "zh") else 9,
    )
    if languages:
        out += ["", "| language (mean over families) | " + " | ".join(stages) + " |"]
        out.append("|---|" + "---|" * len(stages))
        for lang in languages:
            cells = []
            for s in stages:
                vs = [(evals.get((s, t)) or {}).get("pass@1_by_language", {}).get(lang) for t in tasks]
                cells.append(sum(vs) / len(vs) if all(v is not None for v in vs) else None)
            out.append(f"| {lang} | " + " | ".join(_pct(c) for c in cells) + " |")
    unseen, second, second_start = sm["unseen_wordings"], sm["second_turn"], sm["second_turn_start"]
    if unseen or second:
        columns = [("final, unseen wordings", unseen)] if unseen else []
        columns += [(f"{sm['start']}, asked second", second_start)] if second_start else []
        columns += [("final, asked second in a chat", second)] if second else []
        t0 = next(iter(unseen or second))
        other = evals.get(("grpo", in_unseen_wordings(t0) if unseen else as_second_turn(t0)), {})
        n_other = len(other.get("pass@1_per_problem") or [])
        first = f"the first {n_other} of " if n_other else ""
        out += [
            "",
            f"The final model on {first}the same held-out problems per family asked otherwise: in phrasings that no stage "
            "trained on (`?wording=unseen`), where a model that reads the problem keeps its figure and one "
            "that memorized the sentences around the numbers loses it; and as the second question of a "
            "chat, after another problem of the family and its answer (`?turn=2`), as `nanoseek chat` "
            "and the server's chat page ask it.",
            "",
            "| family | final | " + " | ".join(name for name, _ in columns) + " |",
            "|---|---|" + "---|" * len(columns),
        ]
        families = list(dict.fromkeys([*unseen, *second]))
        for t in families:
            out.append(
                f"| {t} | {_pct(value.get(('grpo', t)))} | "
                + " | ".join(_pct(c.get(t)) for _, c in columns)
                + " |"
            )
        by_column = [
            [value.get(("grpo", t)) for t in families],
            *([c.get(t) for t in families] for _, c in columns),
        ]
        if all(v is not None for col in by_column for v in col):
            out.append(
                "| **mean** | " + " | ".join(f"**{_pct(sum(col) / len(col))}**" for col in by_column) + " |"
            )
    out.append("")
    start, gains, margins = sm["start"], sm["gains"], sm["gain_margins"]
    if any(margins.values()):  # (a zero half-width is shown as none: `plus_minus`)
        n = len(evals[("grpo", next(iter(margins)))]["pass@1_per_problem"])
        out.append(
            f"- GRPO's gains below carry ± the half-width of their 95% interval, paired over the {n} "
            "held-out problems per family: another draw of problems could move a gain by about that much."
        )
    probe = m.last_event("grpo", "probe")
    undrawn = set(probe.get("left_out") or [])
    if sm["mid"]:
        each = "; ".join(
            f"{t} {100 * gains[t]:+.1f}{plus_minus(margins.get(t))}"
            + (
                ", left out of GRPO's draw by its probe and held by the worked-solution mix only"
                if t in undrawn
                else ""
            )
            for t in sm["mid"]
        )
        apart = f" ({', '.join(sm['verifier_only'])}: below)" if sm["verifier_only"] else ""
        out.append(
            f"- GRPO's gain over its starting checkpoint ({start}) on the families with worked solutions that "
            f"start between 20% and 80%{apart}: **{100 * sm['mid_gain']:+.1f}{plus_minus(sm['mid_margin'])} points** "
            f"on average ({each})."
        )
    if sm["second_turn_mid"]:
        each = ", ".join(
            f"{t} {100 * sm['second_turn_gains'][t]:+.1f}{plus_minus(sm['second_turn_margins'].get(t))}"
            for t in sm["second_turn_mid"]
        )
        out.append(
            f"- Asked second in a chat (GRPO drew those prompts too): its gain over {start} on the families "
            f"that start there between 20% and 80%: **{100 * sm['second_turn_mid_gain']:+.1f}"
            f"{plus_minus(sm['second_turn_mid_margin'])} points** on average ({each})."
        )
    if probe.get("pass_rates"):
        rates = ", ".join(f"{t} {_pct(r)}" for t, r in probe["pass_rates"].items())
        left = ", ".join(probe.get("left_out") or []) or "none"
        kept = ", ".join(probe.get("kept") or [])
        out.append(
            f"- GRPO drew its prompts from the families its probe found unsolved (pass rate on training "
            f"problems before the first step: {rates}); left out as solved: {left}"
            + (f"; drawn however solved: {kept}." if kept else ".")
        )
    for t in sm["verifier_only"]:
        if t in gains:
            out.append(
                f"- Learned from its verifier alone (no worked solution of {t} in pretraining or SFT): "
                f"{t} {_pct(value[(start, t)])} → {_pct(value[('grpo', t)])}, "
                f"**{100 * gains[t]:+.1f}{plus_minus(margins.get(t))} points**"
                + _concluded(evals.get((start, t), {}), evals.get(("grpo", t), {}))
                + "."
            )
    if means.get("distill") is not None and means.get("grpo"):
        out.append(
            f"- Distilled dense student: mean pass@1 {_pct(means['distill'])}, "
            f"{means['distill'] / means['grpo']:.0%} of its teacher's {_pct(means['grpo'])}"
            + (
                f"; the same student before distillation {_pct(means['student'])} "
                f"(**{100 * (means['distill'] - means['student']):+.1f} points**)."
                if means.get("student") is not None
                else "."
            )
        )
    out.append("")
    return out


def moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points: per-step RL metrics are noisy (few prompts a step)."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def _plot_with_trend(ax: Any, xs: list[float], ys: list[float], label: str | None) -> None:
    """The raw per-step series faint, its moving average over ~1/15 of the run on top."""
    window = max(1, len(ys) // 15)
    if window < 3:
        # a one-step run's single point, which a line alone does not draw
        ax.plot(xs, ys, marker="o" if len(xs) == 1 else None, label=label)
        return
    (raw,) = ax.plot(xs, ys, alpha=0.3, lw=0.8)
    ax.plot(
        xs,
        moving_average(ys, window),
        color=raw.get_color(),
        lw=2,
        label=f"{label or ''} ({window}-step mean)".strip(),
    )


def _plots(m: RunMetrics, report_dir: Path) -> list[tuple[str, str]]:
    # Figures of their own, not pyplot's: `matplotlib.use("Agg")` switched a notebook's backend for
    # the rest of its session (its own plots stopped showing), and a figure here needs no backend.
    import matplotlib
    from matplotlib.figure import Figure

    def subplots(*args: Any, figsize: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*args, **kwargs)

    out_dir = report_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str]] = []

    def save(fig: Any, name: str, title: str) -> None:
        fig.tight_layout()
        with atomic_file(out_dir / name) as tmp:  # a full disk must not leave half a PNG over the last one
            fig.savefig(tmp, dpi=110, format="png")  # (the temporary name has no .png to go by)
        made.append((title, f"plots/{name}"))

    # Loss curves of the supervised stages: pretraining and the fine-tuning stages on panels of their
    # own, each stage counting its own steps (one axis would lay SFT over pretraining's first steps).
    panels = [("pretraining", ("pretrain", "student")), ("fine-tuning", ("sft", "control", "distill"))]
    curves = [
        [
            (f"{stage} {key.replace('_', ' ')}", style, *m.steps(stage, key))
            for stage in stages
            for key, style in ((m.train_loss_key(stage), "-"), ("val_loss", "--"))
        ]
        for _, stages in panels
    ]
    curves = [[c for c in panel if c[2]] for panel in curves]
    shown = [(name, panel) for (name, _), panel in zip(panels, curves, strict=True) if panel]
    if shown:
        fig, axes = subplots(1, len(shown), figsize=(6 * len(shown), 4), squeeze=False)
        for ax, (name, panel) in zip(axes[0], shown, strict=True):
            for label, style, xs, ys in panel:
                # a validation curve has few points: markers keep it visible over a noisy training one
                # (and a one-step stage's single point, which a line alone does not draw)
                ax.plot(xs, ys, style, marker="o" if style == "--" or len(xs) == 1 else None, label=label)
            ax.set_xlabel(f"step of each {name} stage")
            ax.set_ylabel("cross-entropy (nats/token, log scale)")
            ax.set_yscale("log")  # the first steps (~ln vocab) would otherwise flatten the rest of the curve
            ax.set_title(f"Loss, {name}")
            ax.legend()
        save(fig, "loss.png", "Loss curves")

    # What pretraining learned: held-out loss by kind of token.
    kinds = [
        ("copy", "copied digits"),
        ("digit", "computed digits"),
        ("text", "template"),
        ("answer", "answer"),
    ]
    probes = [(label, m.steps("pretrain", f"probe_{k}_loss")) for k, label in kinds]
    if any(xs for _, (xs, _) in probes):
        fig, ax = subplots(figsize=(7, 4))
        for label, (xs, ys) in probes:
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ax.axhline(2.303, color="gray", lw=0.8, ls=":", label="uniform guess of a digit")
        ax.set_xlabel("pretrain step")
        ax.set_ylabel("held-out loss (nats/token, log scale)")
        ax.set_yscale("log")
        ax.set_title("Held-out loss by kind of token")
        ax.legend()
        save(fig, "probe.png", "What pretraining learned: held-out loss by kind of token")

    # GRPO reward and accuracy; response length.
    xs_r, ys_r = m.steps("grpo", "reward")
    xs_a, ys_a = m.steps("grpo", "accuracy")
    if xs_r or xs_a:
        fig, ax = subplots(figsize=(7, 4))
        if xs_r:
            _plot_with_trend(ax, xs_r, ys_r, "reward (every term: accuracy, format bonus, ...)")
        if xs_a:
            _plot_with_trend(ax, xs_a, ys_a, "accuracy (of the families drawn)")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("mean over the step's rollouts")
        ax.set_title("GRPO reward and accuracy")
        ax.legend()
        save(fig, "grpo_reward.png", "Reward and accuracy over GRPO steps")
    xs_l, ys_l = m.steps("grpo", "response_length")
    if xs_l:
        fig, ax = subplots(figsize=(7, 4))
        _plot_with_trend(ax, xs_l, ys_l, "mean response length")
        ax.legend()
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("tokens")
        ax.set_title("Mean response length")
        save(fig, "grpo_length.png", "Response length over GRPO steps")

    # Expert load per layer over pretraining: max/mean imbalance, one line per layer. The trainer logs
    # the ratio each step (`expert_imbalance`) and the raw per-expert counts every few steps.
    series: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r in m.by_stage.get("pretrain", []):
        if not isinstance(r.get("step"), (int, float)):
            continue
        ratios = r.get("expert_imbalance")
        if not isinstance(ratios, dict):
            load = r.get("expert_load")
            ratios = {}
            if isinstance(load, dict):
                for layer, counts in load.items():
                    if counts and sum(counts) > 0:
                        ratios[layer] = max(counts) / (sum(counts) / len(counts))
        for layer, ratio in ratios.items():
            if isinstance(ratio, (int, float)):
                series[str(layer)][0].append(r["step"])
                series[str(layer)][1].append(float(ratio))
    if series:
        fig, ax = subplots(figsize=(7, 4))
        layers = sorted(series.items(), key=lambda kv: (not kv[0].isdigit(), kv[0].zfill(4)))
        # more layers than the color cycle's ten (the 12-, 27- and 60-layer presets): colors repeated in
        # a legend that outgrew the figure; a colormap over the layers and a color bar name them instead
        many = len(layers) > 10
        cmap = matplotlib.colormaps["viridis"]
        for i, (layer, (xs, ys)) in enumerate(layers):
            color = cmap(i / (len(layers) - 1)) if many else None
            ax.plot(xs, ys, color=color, marker="o" if len(xs) == 1 else None, label=f"layer {layer}")
        if many:
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            bar = fig.colorbar(ScalarMappable(Normalize(0, len(layers) - 1), cmap), ax=ax, label="MoE layer")
            ticks = sorted({round(k * (len(layers) - 1) / 7) for k in range(8)})
            bar.set_ticks(ticks, labels=[layers[t][0] for t in ticks])
        else:
            ax.legend()
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("pretrain step")
        ax.set_ylabel("max / mean tokens per expert")
        ax.set_title("Expert load imbalance per MoE layer")
        save(fig, "expert_load.png", "Expert load per layer over pretraining")
    return made
