import json
import math
import os
import stat
import statistics
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek.cli import main
from nanoseek.metrics import MetricsLog, read_metrics
from nanoseek.report import build_report, moving_average


def _fake_run(run):
    pre = MetricsLog(run, "pretrain")
    pre.log(
        event="model",
        total_params=8_000_000,
        active_params=3_000_000,
        kv_cache_bytes_per_token=640,
        mha_kv_cache_bytes_per_token=7168,
        decode_tokens_per_s=55.0,
    )
    for s in range(1, 21):
        pre.log(step=s, loss=5.0 - 0.1 * s, expert_load={"1": [10 + s, 10, 10, 10], "2": [40 - s, 5, 5, 5]})
    pre.log(step=20, val_loss=3.2)
    pre.log(event="end", wall_time_s=120.0, tokens=1_000_000)
    grpo = MetricsLog(run, "grpo")
    for s in range(1, 11):
        grpo.log(step=s, reward=0.1 * s, accuracy=0.05 * s, response_length=40 + s)
    grpo.log(event="end", wall_time_s=300.0, tokens=200_000)
    ev = MetricsLog(run, "eval")
    ev.log(evaluated="sft", task="arithmetic", k=4, **{"pass@1": 0.20, "cons@4": 0.25}, format_rate=0.9)
    ev.log(evaluated="grpo", task="arithmetic", k=4, **{"pass@1": 0.35, "cons@4": 0.40}, format_rate=0.95)


def test_report_has_tables_and_plots(tmp_path):
    _fake_run(tmp_path)
    path = build_report(tmp_path)
    text = path.read_text()
    assert "| pretrain | 120 s | 1.00M |" in text
    assert "8.00M" in text and "3.00M" in text
    assert "+15.0 points" in text and "20.0% → 35.0%" in text and "format rate 90.0% → 95.0%" in text
    assert "| grpo | arithmetic | 4 | 35.0% | 40.0% |" in text
    assert "11.2x smaller than MHA" in text
    for png in ("loss.png", "grpo_reward.png", "grpo_length.png", "expert_load.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000
        assert f"plots/{png}" in text


def test_a_report_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """Built in a notebook, the report switched matplotlib to Agg for the rest of the session: the
    notebook's own plots (its inline backend) stopped showing."""
    import matplotlib

    was = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for a notebook's inline backend
    try:
        _fake_run(tmp_path)
        build_report(tmp_path)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(was)
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000


def test_a_full_disk_leaves_the_last_plots_whole(tmp_path, monkeypatch):
    """A report rebuilt on a full disk left a torn loss.png over the one before (matplotlib writes to
    the name it is given): each plot is replaced whole, or not at all."""
    import errno
    import os

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    _fake_run(tmp_path)
    build_report(tmp_path)
    before = (tmp_path / "plots" / "loss.png").read_bytes()

    write = FigureCanvasAgg._print_pil  # what print_png writes with

    def full(canvas, filename, *a, **kw):
        if not isinstance(filename, (str, os.PathLike)):  # matplotlib's own dry run, into memory
            return write(canvas, filename, *a, **kw)
        with open(filename, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(FigureCanvasAgg, "_print_pil", full)
    with pytest.raises(OSError, match="No space left") as e:
        build_report(tmp_path)
    assert e.value.filename == str(tmp_path / "plots" / "loss.png")
    assert (tmp_path / "plots" / "loss.png").read_bytes() == before
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]


def test_a_run_on_a_read_only_disk_has_its_report_written_elsewhere(tmp_path, monkeypatch, capsys):
    """A finished run on a read-only mount (a shared or `:ro` volume) could not be reported at all: the
    report and its plots go only into RUN, and the error named RUN/plots with no way around it."""
    import errno
    import tempfile

    run, out = tmp_path / "run", tmp_path / "elsewhere"
    _fake_run(run)
    before = sorted(p.name for p in run.iterdir())
    unnamed = tempfile.TemporaryFile

    def read_only_run(*args, **kwargs):  # what a read-only mount answers (root, too)
        if str(kwargs.get("dir")).startswith(str(run)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return unnamed(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_run)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert (
        f"cannot write the report in {run}: Read-only file system; name another place with --out DIR" in err
    )
    assert main(["report", str(run), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "# nanoseek report: run" in text and "](plots/loss.png)" in text
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_report_of_the_working_directory_is_titled_by_its_name(tmp_path, monkeypatch):
    """`nanoseek report .` in the run directory titled the report "nanoseek report: " alone."""
    run = tmp_path / "run"
    _fake_run(run)
    monkeypatch.chdir(run)
    assert main(["report", "."]) == 0
    assert (run / "report.md").read_text().startswith("# nanoseek report: run\n")


def test_report_command_and_missing_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    _fake_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").exists()
    for price in ("-1", "nan"):  # a negative price wrote a negative cost; `cost` refuses one
        assert main(["report", str(tmp_path), "--usd-per-hour", price]) == 2
        assert "--usd-per-hour must be a price >= 0" in capsys.readouterr().err


def test_torn_last_line_is_skipped(tmp_path):
    MetricsLog(tmp_path, "pretrain").log(step=1, loss=1.0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "pretrain", "step": 2, "lo')
    recs = list(read_metrics(tmp_path))
    assert len(recs) == 1 and recs[0]["loss"] == 1.0
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["stage"] == "pretrain"


def test_a_record_after_a_torn_last_line_is_kept(tmp_path):
    """A write cut short (a full disk, a power cut) leaves a line without its end; the next run's
    records (its resume record first) go on lines of their own, not onto the fragment."""
    log = MetricsLog(tmp_path, "pretrain")
    log.log(step=1, loss=1.0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "pretrain", "step": 2, "lo')
    log.log(event="resume", from_step=1)
    log.log(step=2, loss=0.5)
    assert [(r["step"], r.get("event")) for r in read_metrics(tmp_path)] == [
        (1, None),
        (None, "resume"),
        (2, None),
    ]


def test_a_line_torn_inside_a_character_is_skipped_and_the_records_after_it_kept(tmp_path):
    """A write cut short inside a multi-byte character (records keep non-ASCII text as it is) left bytes
    that are no UTF-8: the reader, and `nanoseek report` with it, failed on them."""
    log = MetricsLog(tmp_path, "eval")
    log.log(step=1, task="arithmétique")
    line = json.dumps({"stage": "eval", "step": 2, "task": "日本"}, ensure_ascii=False).encode()
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(line[: line.index("日".encode()) + 1])
    assert [r["task"] for r in read_metrics(tmp_path)] == ["arithmétique"]
    log.log(step=3, task="日本")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 3]
    assert main(["report", str(tmp_path)]) == 0


def test_report_of_a_metrics_file_rather_than_its_run_says_so(tmp_path, capsys):
    """`nanoseek report RUN/metrics.jsonl`: one clear line naming the directory to give, no traceback."""
    _fake_run(tmp_path)
    assert main(["report", str(tmp_path / "metrics.jsonl")]) == 2
    assert f"give its run directory, {tmp_path}" in capsys.readouterr().err


def test_a_line_that_is_no_record_is_skipped(tmp_path):
    """Valid JSON that is no object (a line mangled by two writers) is skipped like a torn line."""
    MetricsLog(tmp_path, "pretrain").log(step=1, loss=1.0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n3\nnull\n")
    MetricsLog(tmp_path, "pretrain").log(step=2, loss=0.5)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert "| pretrain |" in build_report(tmp_path).read_text()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_stay_valid_json(tmp_path, value):
    MetricsLog(tmp_path, "pretrain").log(step=1, loss=value)
    (rec,) = read_metrics(tmp_path)
    assert rec["loss"] in ("nan", "inf")


def test_read_metrics_of_one_stage_and_of_a_run_without_a_log(tmp_path):
    MetricsLog(tmp_path, "pretrain").log(step=1, loss=1.0)
    MetricsLog(tmp_path, "grpo").log(step=1, reward=0.5)
    assert [r["stage"] for r in read_metrics(tmp_path)] == ["pretrain", "grpo"]
    assert [r["stage"] for r in read_metrics(tmp_path / "metrics.jsonl", stage="grpo")] == ["grpo"]
    assert list(read_metrics(tmp_path / "elsewhere")) == []  # nothing logged yet: no records, no error


def test_a_log_makes_its_run_directory_and_a_disabled_one_writes_nothing(tmp_path):
    assert MetricsLog(tmp_path / "off", "sft", enabled=False).log(step=1, loss=1.0)["loss"] == 1.0
    assert not (tmp_path / "off").exists()  # e.g. ranks other than 0
    MetricsLog(tmp_path / "new" / "run", "sft").log(step=1, loss=1.0)
    assert [r["loss"] for r in read_metrics(tmp_path / "new" / "run")] == [1.0]


@pytest.mark.skipif(
    not os.path.exists("/dev/full") or not stat.S_ISCHR(os.stat("/dev/full").st_mode),
    reason="needs /dev/full (a device that is always full)",
)
def test_a_full_disk_at_an_append_names_the_metrics_file(tmp_path):
    """The write's ENOSPC names no file: `nanoseek pretrain` said only "No space left on device"."""
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(OSError, match="No space left") as e:
        MetricsLog(tmp_path, "pretrain").log(step=1, loss=2.0)
    assert e.value.filename == str(tmp_path / "metrics.jsonl")


def test_values_inside_lists_and_dicts_are_cleaned_too(tmp_path):
    """Tensors and non-finite floats in a list or dict field: plain JSON (no NaN token other readers
    refuse), as a field of their own would be."""
    import torch

    MetricsLog(tmp_path, "pretrain").log(
        step=1, losses=[float("nan"), torch.tensor(1.5)], by={"a": (1, float("inf"))}
    )
    line = (tmp_path / "metrics.jsonl").read_text()

    def refuse(token):
        raise ValueError(token)

    rec = json.loads(line, parse_constant=refuse)
    assert rec["losses"] == ["nan", 1.5] and rec["by"] == {"a": [1, "inf"]}


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 5) == [2.0, 3.0]


def test_pass_at_1_by_family_and_language(tmp_path):
    """The speedrun's tables: pass@1 per family and per language across stages, GRPO's gain on the
    families in range, the verifier-only family and the student against its teacher."""
    MetricsLog(tmp_path, "speedrun").log(event="plan", verifier_only_tasks=["countdown"])
    pre = MetricsLog(tmp_path, "pretrain")
    for step, copy in ((100, 2.0), (200, 0.5)):
        pre.log(
            step=step, probe_copy_loss=copy, probe_digit_loss=1.0, probe_text_loss=0.1, probe_answer_loss=0.2
        )
    ev = MetricsLog(tmp_path, "eval")
    figures = {
        "addition": {"sft": 0.5, "grpo": 0.7, "distill": 0.4},
        "comparison": {"sft": 0.9, "grpo": 0.95, "distill": 0.9},
        "countdown": {"sft": 0.1, "grpo": 0.4, "distill": 0.1},
    }
    for task, by_stage in figures.items():
        for stage, v in by_stage.items():
            ev.log(
                evaluated=stage, task=task, k=4, **{"pass@1": v, "pass@1_by_language": {"en": v, "ja": v / 2}}
            )
    text = build_report(tmp_path).read_text()
    assert "| family | sft | grpo | distill |" in text
    assert "| checkpoint | task | k | pass@1 | cons@k |" in text  # records without intervals
    assert "| addition | 50.0% | 70.0% | 40.0% |" in text
    assert "| **mean** | **50.0%** | **68.3%** | **46.7%** |" in text
    assert "| ja | 25.0% | 34.2% | 23.3% |" in text
    assert "+20.0 points** on average (addition +20.0)" in text  # comparison starts above 80%
    assert "countdown 10.0% → 40.0%, **+30.0 points**" in text
    assert "probe found unsolved" not in text  # a uniform draw logs no probe
    MetricsLog(tmp_path, "grpo").log(
        event="probe",
        pass_rates={"addition": 0.5, "comparison": 0.97, "countdown": 0.0},
        left_out=["comparison"],
    )
    text = build_report(tmp_path).read_text()
    assert "addition 50.0%, comparison 97.0%, countdown 0.0%); left out as solved: comparison." in text
    MetricsLog(tmp_path, "grpo").log(  # a family kept in the draw however solved (--keep-tasks)
        event="probe",
        pass_rates={"addition": 0.9, "comparison": 0.97},
        left_out=["addition"],
        kept=["comparison"],
    )
    assert (
        "left out as solved: addition; drawn however solved: comparison."
        in build_report(tmp_path).read_text()
    )
    assert "68% of its teacher's 68.3%." in text
    for task, v in (("addition", 0.3), ("comparison", 0.8), ("countdown", 0.0)):
        ev.log(evaluated="student", task=task, k=4, **{"pass@1": v})  # the student before distillation
    text = build_report(tmp_path).read_text()
    assert "| family | sft | grpo | student | distill |" in text
    assert (
        "68% of its teacher's 68.3%; the same student before distillation 36.7% (**+10.0 points**)." in text
    )
    assert "| 0.5 | 1 | 0.1 | 0.2 |" in text and "plots/probe.png" in text


def test_grpo_gains_carry_a_paired_interval_over_the_problems(tmp_path):
    """With per-problem scores of the same problems before and after GRPO, each gain is reported with
    the half-width of its 95% interval: t(7) = 2.36 standard errors of the per-problem differences (8
    problems; 1.96 is many problems' figure). Pairing matters: the same problems solved before and
    after do not widen it."""
    from nanoseek.report import RunMetrics

    MetricsLog(tmp_path, "speedrun").log(event="plan", verifier_only_tasks=["largest"])
    ev = MetricsLog(tmp_path, "eval")
    before = {"sorting": [1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.25, 0.75], "largest": [0.0] * 8}
    after = {"sorting": [1.0, 1.0, 0.25, 0.25, 0.75, 0.5, 0.5, 0.75], "largest": [1.0, 1.0, 0.0] + [0.0] * 5}
    for stage, scores in (("sft", before), ("grpo", after)):
        for task, per in scores.items():
            digest = "same-problems" if task == "sorting" or stage == "sft" else "other"
            ev.log(
                evaluated=stage,
                task=task,
                k=4,
                **{"pass@1": sum(per) / len(per), "pass@1_per_problem": per, "pass@1_stderr": 0.05},
                problems_digest=digest,
            )
    sm = RunMetrics(tmp_path).pass_at_1_summary()
    diffs = [a - b for a, b in zip(after["sorting"], before["sorting"], strict=True)]
    mean = sum(diffs) / 8
    se = (sum((d - mean) ** 2 for d in diffs) / 7 / 8) ** 0.5
    assert sm["mid"] == ["sorting"] and sm["gains"]["sorting"] == pytest.approx(0.125)
    t7 = 2.364624  # Student's t, 97.5th percentile, 7 degrees of freedom
    assert sm["gain_margins"]["sorting"] == pytest.approx(t7 * se)  # 0.112; unpaired: 0.42
    assert sm["mid_margin"] == pytest.approx(t7 * se)
    assert "largest" not in sm["gain_margins"]  # other problems after than before: no pairing
    text = build_report(tmp_path).read_text()
    assert "paired over the 8 held-out problems per family" in text
    assert f"**+12.5 ± {100 * t7 * se:.1f} points** on average (sorting +12.5 ± {100 * t7 * se:.1f})" in text
    assert "largest 0.0% → 25.0%, **+25.0 points**." in text
    assert "| grpo | sorting | 4 | 62.5% ± 9.8 |" in text  # no problem count logged: 1.96 x its s.e.
    assert "| checkpoint | task | k | pass@1 (± 95%) |" in text
    assert f"- sorting: GRPO changed held-out pass@1 by **+12.5 ± {100 * t7 * se:.1f} points**" in text


def test_a_gain_of_answers_after_reasoning_that_concluded_otherwise_is_shown_beside_it(tmp_path):
    """The verifier reads the answer alone: SR19's `largest` rose 12.5 -> 68.2% while 36 of its 48
    stored traces concluded "So 85 is smaller." and answered 85 as the largest. Where the evaluation
    counted the passes whose reasoning concludes their answer, the report shows that figure beside the
    gain, for the verifier-only family and in each family's line."""
    MetricsLog(tmp_path, "speedrun").log(event="plan", verifier_only_tasks=["largest"])
    ev = MetricsLog(tmp_path, "eval")
    for stage, v, concluded in (("sft", 0.125, 0.03), ("grpo", 0.682, 0.146)):
        ev.log(evaluated=stage, task="largest", k=4, **{"pass@1": v, "pass@1_concluded": concluded})
        ev.log(evaluated=stage, task="addition", k=4, **{"pass@1": v})  # no conclusions read: no figure
    text = build_report(tmp_path).read_text()
    assert (
        "largest 12.5% → 68.2%, **+55.7 points**; counting only the passes whose reasoning concludes their "
        "answer 3.0% → 14.6%." in text
    )
    assert "- largest: GRPO changed held-out pass@1 by **+55.7 points** (12.5% → 68.2%)" in text
    assert text.count("counting only the passes whose reasoning concludes") == 2  # addition's lines: none


def test_an_evaluation_of_one_problem_shows_no_interval(tmp_path):
    """`nanoseek eval -n 1` logs a standard error of 0.0 (no spread to measure): the report shows no
    "± 0.0", which would read as certainty."""
    MetricsLog(tmp_path, "speedrun").log(event="plan", verifier_only_tasks=[])
    ev = MetricsLog(tmp_path, "eval")
    ev.log(evaluated="grpo", task="sorting", k=4, problems=1, **{"pass@1": 0.5, "pass@1_stderr": 0.0})
    ev.log(evaluated="grpo", task="addition", k=4, problems=8, **{"pass@1": 0.5, "pass@1_stderr": 0.05})
    text = build_report(tmp_path).read_text()
    assert "| grpo | sorting | 4 | 50.0% |" in text
    assert "| grpo | addition | 4 | 50.0% ± 11.8 |" in text  # t(7) = 2.36 standard errors of 8 problems


def _paired_evals(run: Path, task: str, per_problem: dict[str, list[float]], stderr: float) -> None:
    """An eval record of `task` per stage (k = 2) over the same problems, with these per-problem scores."""
    ev = MetricsLog(run, "eval")
    for stage, per in per_problem.items():
        ev.log(
            evaluated=stage,
            task=task,
            k=2,
            problems=len(per),
            **{"pass@1": sum(per) / len(per), "pass@1_stderr": stderr, "pass@1_per_problem": per},
            problems_digest="same",
        )


def test_a_95_percent_interval_over_few_problems_is_students_t_not_the_normal_one(tmp_path):
    """`nanoseek eval -n 3` then the report: "pass@1 (± 95%)" was 1.96 standard errors, an interval
    that covers 81% over 3 problems; Student's t with 2 degrees of freedom is 4.30. The paired gain too."""
    _paired_evals(tmp_path, "sorting", {"sft": [0.0, 0.5, 1.0], "grpo": [0.5, 0.5, 1.0]}, stderr=0.1)
    text = build_report(tmp_path).read_text()
    assert "| grpo | sorting | 2 | 66.7% ± 43.0 |" in text, text  # 4.303 x 0.1; 1.96 x: ± 19.6
    se = (0.5**2 * 2 / 3 / 2 / 3) ** 0.5  # differences (0.5, 0, 0): sample sd / sqrt(3)
    assert f"by **+16.7 ± {100 * 4.302653 * se:.1f} points**" in text  # ± 71.7; 1.96 x: ± 32.7


def test_unseen_wordings_are_reported_beside_the_final_figures_not_in_the_goals(tmp_path):
    from nanoseek.report import RunMetrics

    MetricsLog(tmp_path, "speedrun").log(event="plan", verifier_only_tasks=[])
    ev = MetricsLog(tmp_path, "eval")
    for stage, task, v in (
        ("sft", "sorting", 0.5),
        ("grpo", "sorting", 0.75),
        ("sft", "comparison", 1.0),
        ("grpo", "comparison", 1.0),
        ("grpo", "sorting?wording=unseen", 0.25),
        ("grpo", "comparison?wording=unseen", 0.5),
        ("grpo", "sorting?turn=2", 0.0),
        ("grpo", "comparison?turn=2", 0.125),
    ):
        ev.log(evaluated=stage, task=task, k=4, **{"pass@1": v})
    sm = RunMetrics(tmp_path).pass_at_1_summary()
    assert sm["tasks"] == ["sorting", "comparison"]  # the asks in other forms are not families of their own
    assert sm["means"]["grpo"] == pytest.approx(0.875) and sm["mid"] == ["sorting"]
    assert sm["unseen_wordings"] == {"sorting": 0.25, "comparison": 0.5}
    assert sm["second_turn"] == {"sorting": 0.0, "comparison": 0.125}
    text = build_report(tmp_path).read_text()
    assert "| family | final | final, unseen wordings | final, asked second in a chat |" in text
    assert "| sorting | 75.0% | 25.0% | 0.0% |" in text and "| comparison | 100.0% | 50.0% | 12.5% |" in text
    assert "| **mean** | **87.5%** | **37.5%** | **6.2%** |\n\n" in text  # the table ends before the notes


def test_grpos_gain_asked_second_is_reported_where_the_run_scored_its_start_there(tmp_path):
    """With `grpo_second_turn` GRPO draws each family asked second in a chat, and the speedrun scores
    its start (SFT) there too: the report gives that column and GRPO's gain on those in range, apart
    from the families' gain goal."""
    from nanoseek.report import RunMetrics

    MetricsLog(tmp_path, "speedrun").log(event="plan", verifier_only_tasks=["largest"])
    ev = MetricsLog(tmp_path, "eval")
    for stage, task, v in (
        ("sft", "sorting", 0.9),
        ("grpo", "sorting", 0.9),
        ("sft", "largest", 0.1),
        ("grpo", "largest", 0.5),
        ("sft", "sorting?turn=2", 0.5),
        ("grpo", "sorting?turn=2", 0.75),
        ("sft", "largest?turn=2", 0.25),  # verifier-only: its own line, not in this mean
        ("grpo", "largest?turn=2", 0.5),
    ):
        ev.log(evaluated=stage, task=task, k=4, **{"pass@1": v})
    sm = RunMetrics(tmp_path).pass_at_1_summary()
    assert sm["mid"] == [] and sm["second_turn_start"] == {"sorting": 0.5, "largest": 0.25}
    assert sm["second_turn_mid"] == ["sorting"] and sm["second_turn_mid_gain"] == pytest.approx(0.25)
    text = build_report(tmp_path).read_text()
    assert "| family | final | sft, asked second | final, asked second in a chat |" in text
    assert "| sorting | 90.0% | 50.0% | 75.0% |" in text
    assert "Asked second in a chat (GRPO drew those prompts too): its gain over sft" in text
    assert "**+25.0 points** on average (sorting +25.0)." in text


def _pretrain_steps(log: MetricsLog, steps: range, t0: float, loss: float = 4.0) -> None:
    """Step records as the trainer logs them: a running token total, one second apart from t0."""
    for s in steps:
        log.log(step=s, loss=loss, tokens=128 * s, time=t0 + s)


@pytest.mark.parametrize("resume_record", [True, False])
def test_a_resumed_stage_reads_as_one_run(tmp_path, resume_record):
    """Killed at step 70 with a checkpoint at 50, then resumed to 120: the replayed steps 51-70 replace
    the first process's, the tokens are those of 120 steps, and the wall time adds both processes'.
    Logs from before resume records (`resume_record=False`) show the resume by the step going back."""
    from nanoseek.report import RunMetrics

    log = MetricsLog(tmp_path, "pretrain")
    log.log(step=0, event="start", time=1000.0)
    _pretrain_steps(log, range(1, 71), 1000.0, loss=5.0)  # killed after step 70: no end record
    if resume_record:
        log.log(event="resume", from_step=50, time=2000.0)
    _pretrain_steps(log, range(51, 121), 1950.0, loss=4.0)
    log.log(step=120, event="end", wall_s=75.0, time=2080.0)  # `wall_s`: pretraining's before

    m = RunMetrics(tmp_path)
    xs, ys = m.steps("pretrain", "loss")
    assert xs == list(range(1, 121))
    assert ys[49] == 5.0 and ys[50:] == [4.0] * 70  # the first process's steps past 50 are gone
    assert m.total("pretrain", "tokens") == 128 * 120
    assert m.wall_time("pretrain") == pytest.approx(70.0 + 75.0)  # killed: its records' span
    text = build_report(tmp_path).read_text()
    assert "| pretrain | 145 s | 15.36K |" in text and "| **total** | 145 s |" in text


def test_a_fresh_run_into_the_same_directory_replaces_the_earlier_in_the_report(tmp_path):
    from nanoseek.report import RunMetrics

    log = MetricsLog(tmp_path, "pretrain")
    log.log(step=0, event="start")
    _pretrain_steps(log, range(1, 101), 1000.0, loss=5.0)
    log.log(step=100, event="end", wall_time_s=100.0)
    log.log(step=0, event="start")  # trained again, without --resume
    _pretrain_steps(log, range(1, 11), 3000.0, loss=3.0)
    log.log(step=10, event="end", wall_time_s=10.0)
    m = RunMetrics(tmp_path)
    assert m.steps("pretrain", "loss") == (list(range(1, 11)), [3.0] * 10)
    assert m.total("pretrain", "tokens") == 1280 and m.wall_time("pretrain") == 10.0
    assert "| pretrain | 10 s | 1.28K |" in build_report(tmp_path).read_text()


def test_every_stage_run_alone_reports_its_wall_time(tmp_path):
    """Each stand-alone training stage's end record (GRPO's running time for logs from before it had one)."""
    pre, sft, grpo = (MetricsLog(tmp_path, s) for s in ("pretrain", "sft", "grpo"))
    pre.log(step=0, event="start")
    pre.log(step=1, loss=4.0, tokens=128)
    pre.log(step=1, event="end", wall_time_s=12.0)
    sft.log(step=0, event="start")
    sft.log(step=1, loss=2.0, tokens=64)
    sft.log(event="end", wall_time_s=3.0)
    for s in (1, 2):
        grpo.log(step=s, loss=0.0, reward=0.5, wall_time_s=10.0 * s)
    text = build_report(tmp_path).read_text()
    assert "| pretrain | 12 s |" in text and "| sft | 3 s |" in text and "| grpo | 20 s |" in text
    assert "| **total** | 35 s |" in text


def test_the_cost_of_a_pretraining_over_several_machines_counts_each_machine(tmp_path):
    """A pretraining under torchrun on 2 nodes (8 processes) for an hour, then resumed on 4 for half an
    hour, then SFT on one machine for an hour: the cost counted one machine's time, as if one had run it
    all. The price is per machine-hour: the processes of one machine share it."""
    tok, pre, sft = (MetricsLog(tmp_path, s) for s in ("tokenizer", "pretrain", "sft"))
    tok.log(event="end", wall_time_s=360.0, vocab_size=320, documents=100, nodes=2)  # rank 0's, both waiting
    pre.log(step=0, event="start", world_size=8, nodes=2, time=0.0)
    _pretrain_steps(pre, range(1, 11), 1.0, loss=5.0)
    pre.log(step=10, event="end", wall_time_s=3600.0)
    pre.log(event="resume", from_step=10, world_size=16, nodes=4)
    _pretrain_steps(pre, range(11, 21), 4000.0, loss=4.0)
    pre.log(step=20, event="end", wall_time_s=1800.0)
    sft.log(step=0, event="start")  # one process
    sft.log(step=1, loss=2.0, tokens=64)
    sft.log(event="end", wall_time_s=3600.0)
    text = build_report(tmp_path, usd_per_hour=1.0).read_text()
    assert "| pretrain | 5,400 s | 2.56K | $4.0000 (2-4 machines) |" in text  # 2 x 1 h + 4 x 0.5 h
    assert "| sft | 3,600 s | 64 | $1.0000 |" in text
    assert "| tokenizer | 360 s | – | $0.2000 (2 machines) |" in text
    assert "| **total** | 9,360 s | | $5.2000 | | | | |" in text
    assert "$1.00 per machine-hour: each stage's wall time x the machines it ran on" in text


def test_figures_of_four_digits_are_not_written_as_exponents(tmp_path):
    pre = MetricsLog(tmp_path, "pretrain")
    pre.log(step=1, loss=2.0)
    pre.log(event="end", wall_time_s=1234.4, tokens=1000)
    grpo = MetricsLog(tmp_path, "grpo")
    grpo.log(step=1, reward=0.1)
    grpo.log(event="end", wall_time_s=2999.94)
    text = build_report(tmp_path).read_text()
    assert "| pretrain | 1,234 s |" in text and "| grpo | 3,000 s |" in text
    assert "e+0" not in text


def test_a_stage_of_one_step_is_drawn_in_the_loss_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    sft = MetricsLog(tmp_path, "sft")
    for s in range(1, 6):
        sft.log(step=s, loss=1.5 - 0.1 * s)
    MetricsLog(tmp_path, "control").log(step=1, loss=1.3)  # the smoke preset's control: one step
    markers = {}
    savefig = Figure.savefig

    def record(fig, path, **kw):
        for ax in fig.axes:
            markers.update({line.get_label(): line.get_marker() for line in ax.get_lines()})
        return savefig(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", record)
    build_report(tmp_path)
    assert markers["control loss"] not in (None, "None", "", " ")  # a line through one point is invisible


def test_pretrainings_training_loss_is_set_beside_its_held_out_loss_without_the_mtp_term(
    tmp_path, monkeypatch
):
    """Pretraining logs `loss` = LM loss + λ·MTP loss + balance loss, and a held-out loss of the LM term
    alone: the stage table and the loss plot set that LM term beside it (as pretraining's own summary
    line does), not a total 0.3-0.4 nats higher that reads as a training loss above the held-out one."""
    import matplotlib.axes

    pre = MetricsLog(tmp_path, "pretrain")
    for s in range(1, 4):
        pre.log(step=s, loss=1.5 + s / 100, lm_loss=1.1 + s / 100, mtp_loss=1.3, tokens=1024 * s)
    pre.log(step=3, val_loss=1.12)
    pre.log(event="end", wall_time_s=10.0)
    sft = MetricsLog(tmp_path, "sft")  # a stage that logs no LM term apart keeps its `loss`
    sft.log(step=1, loss=0.9)
    sft.log(event="end", wall_time_s=5.0)
    plotted = {}
    plot = matplotlib.axes.Axes.plot

    def spy(self, xs, ys, *args, label=None, **kwargs):
        plotted[label] = list(ys)
        return plot(self, xs, ys, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    text = build_report(tmp_path).read_text()
    assert "| pretrain | 10 s | 3.07K | $0.0003 | 1.13 | 1.12 |" in text, text
    assert "| sft | 5 s | – | $0.0001 | 0.9 | – |" in text, text
    assert plotted["pretrain lm loss"] == pytest.approx([1.11, 1.12, 1.13])
    assert plotted["sft loss"] == [0.9]


def test_the_stage_table_names_the_precision_each_stage_trained_in(tmp_path):
    """Speed and MFU are measured in the stage's precision (bf16's peak on a bf16 run), and `auto`
    picks it by the machine: the table said neither, so a bf16 run and an fp32 one read alike."""
    pre, sft = MetricsLog(tmp_path, "pretrain"), MetricsLog(tmp_path, "sft")
    pre.log(step=0, event="start", precision="bf16")
    pre.log(step=1, loss=2.0, tok_per_s=100.0, mfu=0.25)
    pre.log(event="end", wall_time_s=10.0)
    sft.log(step=0, event="start", precision="fp32")
    sft.log(step=1, loss=1.0)
    sft.log(event="end", wall_time_s=5.0)
    MetricsLog(tmp_path, "grpo").log(event="end", wall_time_s=2.0)  # a log older than the record
    text = build_report(tmp_path).read_text()
    assert "| tokens/s | MFU | precision |" in text, text
    assert "| 100 | 25% | bf16 |" in text and "| sft | 5 s |" in text and "| – | fp32 |" in text, text
    assert "| grpo | 2 s |" in text and "| – | – | – |" in text, text


def test_a_stage_stopped_before_its_end_says_so_and_counts_its_time_so_far(tmp_path):
    """A run killed during SFT: SFT's row says it has no end yet, with the time its records span so
    far, and the total counts it (it read pretraining's alone, and "- s" for SFT)."""
    pre, sft = MetricsLog(tmp_path, "pretrain"), MetricsLog(tmp_path, "sft")
    pre.log(step=0, event="start", time=1000.0)
    _pretrain_steps(pre, range(1, 11), 1000.0)
    pre.log(step=10, event="end", wall_time_s=12.0, time=1012.0)
    sft.log(step=0, event="start", time=1020.0)
    _pretrain_steps(sft, range(1, 5), 1020.0, loss=2.0)  # killed after step 4: no end record
    text = build_report(tmp_path).read_text()
    assert "| sft | 4 s (no end record: stopped, or still running) | 512 |" in text, text
    assert "| **total** | 16 s |" in text
    sft.log(event="resume", from_step=2, time=1100.0)  # resumed from step 2, and killed again at step 3
    sft.log(step=3, loss=1.5, tokens=384, time=1105.0)
    assert (
        "| sft | 9 s (no end record: stopped, or still running) | 384 |" in build_report(tmp_path).read_text()
    )
    eval_log = MetricsLog(tmp_path, "eval")  # stand-alone evaluations log no end: no stage stopped there
    eval_log.log(evaluated="sft", task="addition", k=1, time=2000.0, **{"pass@1": 0.5})
    eval_log.log(evaluated="sft", task="comparison", k=1, time=9000.0, **{"pass@1": 0.5})
    assert "| eval | – |" in build_report(tmp_path).read_text()


def test_grpos_goal_is_judged_from_sft_on_the_families_from_20_to_80_percent_inclusive(tmp_path):
    """The goal's families: those GRPO's start (SFT, though pretraining was scored too) puts in
    [20%, 80%], both ends included, the verifier-only ones apart. The mean gain's 95% half-width adds
    the families' variances: sqrt(m1² + m2²) / 2. Per-problem scores pair only with the same problems
    (a digest on both records); a stage not scored on every family has no mean."""
    import statistics

    from nanoseek.report import RunMetrics

    MetricsLog(tmp_path, "speedrun").log(event="plan", verifier_only_tasks=["countdown"])
    ev = MetricsLog(tmp_path, "eval")
    per = {  # 5 problems each: (sft, grpo)
        "addition": ([0, 0, 0, 0, 1], [1, 0, 0, 0, 1]),  # 20% -> 40%, at the lower end
        "sorting": ([1, 1, 1, 1, 0], [1, 1, 1, 1, 1]),  # 80% -> 100%, at the upper end
        "comparison": ([1, 1, 1, 1, 0.25], [1, 1, 1, 1, 1]),  # 85%: above the range
        "countdown": ([1, 1, 0, 0, 0.5], [1, 1, 1, 0, 0.5]),  # 50%, but verifier-only
    }
    for task, (before, after) in per.items():
        ev.log(evaluated="pretrain", task=task, k=4, **{"pass@1": 0.0})  # out of range from pretraining
        for stage, scores in (("sft", before), ("grpo", after)):
            ev.log(
                evaluated=stage,
                task=task,
                k=4,
                **{"pass@1": round(sum(scores) / 5, 2), "pass@1_per_problem": scores},
                # comparison's records name no problems: nothing says they are the same ones
                **({} if task == "comparison" else {"problems_digest": "same"}),
            )
    ev.log(evaluated="distill", task="addition", k=4, **{"pass@1": 0.5})  # scored on one family only
    for stage, v in (("sft", 0.2), ("grpo", 0.3)):
        ev.log(evaluated=stage, task="addition?turn=2", k=4, **{"pass@1": v})
    sm = RunMetrics(tmp_path).pass_at_1_summary()
    assert sm["start"] == "sft"
    assert sm["mid"] == ["addition", "sorting"]
    assert sm["mid_gain"] == pytest.approx(0.2)
    # each family's differences: one problem gained a sample's worth, four unchanged
    margin = 2.776445 * statistics.stdev([1, 0, 0, 0, 0]) / 5**0.5  # Student's t with 4 degrees of freedom
    assert sm["gain_margins"]["addition"] == pytest.approx(margin)
    assert sm["gain_margins"]["sorting"] == pytest.approx(margin)
    assert sm["mid_margin"] == pytest.approx((2 * margin**2) ** 0.5 / 2)  # 39.3 points, not 55.5
    assert "comparison" not in sm["gain_margins"]
    assert sm["means"]["distill"] is None and sm["means"]["sft"] == pytest.approx(
        (0.2 + 0.8 + 0.85 + 0.5) / 4
    )
    assert sm["second_turn_mid"] == ["addition"]
    text = build_report(tmp_path).read_text()
    assert "**+20.0 ± 39.3 points** on average (addition +20.0 ± 55.5; sorting +20.0 ± 55.5)" in text
    assert "- addition: GRPO changed held-out pass@1 by **+20.0 ± 55.5 points** (20.0% → 40.0%)" in text


def test_a_speedruns_stage_time_is_its_last_end_record_and_a_stage_beside_another_adds_none(tmp_path):
    """In a speedrun a trainer writes its end record and the speedrun another, around the whole stage:
    the stage's time is the last one. The control trains beside GRPO (in its time): its row says so,
    and the total counts GRPO's time once."""
    pre, grpo, control = (MetricsLog(tmp_path, s) for s in ("pretrain", "grpo", "control"))
    pre.log(step=0, event="start")
    pre.log(step=1, loss=4.0, tokens=128)
    pre.log(step=1, event="end", wall_time_s=10.0)  # the trainer's
    pre.log(event="end", wall_time_s=12.0, tokens=128)  # the speedrun's, around it
    grpo.log(step=1, loss=0.0, reward=0.5)
    grpo.log(event="end", wall_time_s=100.0)
    control.log(step=1, loss=1.0)
    control.log(event="end", wall_time_s=90.0, beside="grpo")
    text = build_report(tmp_path).read_text()
    assert "| pretrain | 12 s |" in text
    assert "| control | 90 s (beside grpo) | – | in grpo's |" in text
    assert "| **total** | 112 s |" in text


def test_tokens_logged_per_step_are_summed_and_a_running_total_is_read_at_its_last(tmp_path):
    from nanoseek.report import RunMetrics

    sft, pre = MetricsLog(tmp_path, "sft"), MetricsLog(tmp_path, "pretrain")
    for s in (1, 2, 3):
        sft.log(step=s, loss=1.0, tokens=64)  # the same count each step: no running total
        pre.log(step=s, loss=1.0, tokens=64 * s)
    m = RunMetrics(tmp_path)
    assert m.total("sft", "tokens") == 192 and m.total("pretrain", "tokens") == 192


def test_an_evaluation_of_a_stage_trained_afresh_after_it_is_not_reported(tmp_path):
    """SFT trained, evaluated, then trained afresh into the same RUN: the evaluation scored weights no
    longer there, so the report shows none for SFT rather than the earlier model's figures."""
    sft, ev = MetricsLog(tmp_path, "sft"), MetricsLog(tmp_path, "eval")
    sft.log(0, event="start")
    sft.log(1, loss=3.0)
    sft.log(None, event="end", wall_time_s=5.0)
    ev.log(evaluated="sft", task="arithmetic", k=2, **{"pass@1": 0.61}, problems=8)
    ev.log(evaluated="pretrain", task="arithmetic", k=2, **{"pass@1": 0.12}, problems=8)
    sft.log(0, event="start")
    sft.log(1, loss=2.0)
    sft.log(None, event="end", wall_time_s=5.0)
    text = build_report(tmp_path).read_text()
    assert "61.0%" not in text and "| pretrain | arithmetic | 2 | 12.0%" in text
    ev.log(evaluated="sft", task="arithmetic", k=2, **{"pass@1": 0.33}, problems=8)  # the new SFT's
    assert "| sft | arithmetic | 2 | 33.0%" in build_report(tmp_path).read_text()


def test_the_pass_at_1_header_names_every_k_the_evaluations_drew(tmp_path):
    ev = MetricsLog(tmp_path, "eval")
    ev.log(evaluated="sft", task="arithmetic", k=2, **{"pass@1": 0.2})
    ev.log(evaluated="grpo", task="arithmetic", k=1, **{"pass@1": 0.3})
    text = build_report(tmp_path).read_text()
    assert "## Held-out pass@1 (k = 1 or 2 by evaluation, R1's sampling)" in text
    ev.log(evaluated="grpo", task="arithmetic", k=2, **{"pass@1": 0.3})  # evaluated again, as SFT was
    assert "## Held-out pass@1 (k = 2, R1's sampling)" in build_report(tmp_path).read_text()


def test_grpos_gain_between_evaluations_of_different_problems_says_so(tmp_path):
    """SFT evaluated with --n 8, GRPO with --n 4: a difference of their pass@1 is partly the problems'."""
    ev = MetricsLog(tmp_path, "eval")
    for stage, n, p in (("sft", 8, 0.5), ("grpo", 4, 0.25)):
        ev.log(evaluated=stage, task="arithmetic", k=1, problems=n, problems_digest=f"d{n}", **{"pass@1": p})
    text = build_report(tmp_path).read_text()
    assert "(50.0% → 25.0%) on different problems (8 before, 4 after: evaluate both with the same" in text
    ev.log(evaluated="grpo", task="arithmetic", k=1, problems=8, problems_digest="d8", **{"pass@1": 0.625})
    text = build_report(tmp_path).read_text()
    assert "**+12.5 points** (50.0% → 62.5%); format rate" in text and "different problems" not in text


def test_evaluations_run_by_hand_count_their_time_once_per_sampling_queue(tmp_path):
    """`nanoseek eval` writes no end record: its records' times make the eval row's (and the total's),
    a queue shared by several tasks (`sampled_with`) counted once, not once per task."""
    ev = MetricsLog(tmp_path, "eval")
    ev.log(evaluated="sft", task="addition", k=1, wall_time_s=4.0, **{"pass@1": 0.5})
    both = dict(sampled_with=["addition", "comparison"], checkpoint="run/grpo", generation_time_s=10.0)
    ev.log(evaluated="grpo", task="addition", k=1, wall_time_s=11.0, **both, **{"pass@1": 0.5})
    ev.log(evaluated="grpo", task="comparison", k=1, wall_time_s=10.5, **both, **{"pass@1": 0.5})
    text = build_report(tmp_path).read_text()
    assert "| eval | 15.5 s |" in text and "| **total** | 15.5 s |" in text  # 4 + 10 + 1 + 0.5


def test_a_language_only_an_unseen_wording_evaluation_drew_makes_no_empty_row(tmp_path):
    ev = MetricsLog(tmp_path, "eval")
    for stage in ("sft", "grpo"):
        ev.log(evaluated=stage, task="addition", k=1, **{"pass@1": 0.5, "pass@1_by_language": {"en": 0.5}})
    by_language = {"pass@1": 0.4, "pass@1_by_language": {"ja": 0.4}}
    ev.log(evaluated="grpo", task="addition?wording=unseen", k=1, **by_language)
    text = build_report(tmp_path).read_text()
    assert "| en | 50.0% | 50.0% |" in text and "| ja |" not in text


def _drawn(monkeypatch):
    """{file name: the figure's axes} of every plot the report saves."""
    from pathlib import Path

    from matplotlib.figure import Figure

    drawn = {}
    savefig = Figure.savefig

    def record(fig, path, **kw):
        drawn[Path(path).name.removeprefix(".").split(".png")[0] + ".png"] = fig.axes
        return savefig(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", record)
    return drawn


def test_a_grpo_run_of_one_step_is_drawn(tmp_path, monkeypatch):
    """A one-step GRPO run's reward, accuracy and length plots were empty frames: a line through one
    point draws nothing."""
    grpo = MetricsLog(tmp_path, "grpo")
    grpo.log(step=1, reward=0.4, accuracy=0.3, response_length=50)
    drawn = _drawn(monkeypatch)
    build_report(tmp_path)
    for name in ("grpo_reward.png", "grpo_length.png"):
        lines = drawn[name][0].get_lines()
        assert lines and all(line.get_marker() not in (None, "None", "", " ") for line in lines), name


def test_expert_load_of_many_layers_gives_each_its_own_color_and_no_legend_larger_than_the_plot(
    tmp_path, monkeypatch
):
    """A 27-layer model's plot had a legend of 27 entries spilling over the figure, in ten colors
    repeated (layer 1 and layer 11 drawn alike); a color bar names the layers instead."""
    pre = MetricsLog(tmp_path, "pretrain")
    for s in (1, 2):
        pre.log(step=s, loss=3.0, expert_imbalance={str(i): 1 + i / 10 for i in range(1, 28)})
    drawn = _drawn(monkeypatch)
    build_report(tmp_path)
    ax, *bars = drawn["expert_load.png"]
    lines = [line for line in ax.get_lines() if line.get_label().startswith("layer ")]
    assert len(lines) == 27 and len({line.get_color() for line in lines}) == 27
    assert list(lines[0].get_ydata()) == [1.1, 1.1] and list(lines[-1].get_ydata()) == [3.7, 3.7]
    assert ax.get_legend() is None
    assert [b.get_ylabel() for b in bars] == ["MoE layer"]
    labels = [t.get_text() for t in bars[0].get_yticklabels()]
    assert labels[0] == "1" and labels[-1] == "27"


def test_expert_load_logged_once_is_drawn(tmp_path, monkeypatch):
    pre = MetricsLog(tmp_path, "pretrain")
    pre.log(step=5, loss=3.0, expert_load={"1": [12, 10, 10, 8], "2": [20, 10, 5, 5]})
    drawn = _drawn(monkeypatch)
    build_report(tmp_path)
    (ax,) = drawn["expert_load.png"]
    lines = [line for line in ax.get_lines() if line.get_label().startswith("layer ")]
    assert [list(line.get_ydata()) for line in lines] == [[1.2], [2.0]]
    assert all(line.get_marker() not in (None, "None", "", " ") for line in lines)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["layer 1", "layer 2"]


def test_a_non_finite_value_in_a_hand_written_log_leaves_the_rest_of_a_trend_drawn(tmp_path, monkeypatch):
    """A log written by another tool (JSON's NaN, where a MetricsLog writes "nan"): one NaN reward
    blanked the reward's moving average for every step after it."""
    import math

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 61):
            reward = math.nan if s == 10 else s / 60
            f.write(json.dumps({"stage": "grpo", "step": s, "reward": reward}) + "\n")
    drawn = _drawn(monkeypatch)
    build_report(tmp_path)
    (trend,) = [
        line for line in drawn["grpo_reward.png"][0].get_lines() if line.get_label().startswith("reward")
    ]
    assert len(trend.get_xdata()) == 59 and 10 not in list(trend.get_xdata())
    assert all(math.isfinite(y) for y in trend.get_ydata())


def test_grpos_surrogate_loss_is_not_shown_as_its_final_loss(tmp_path):
    """GRPO's `loss` (its clipped surrogate over group-normalized advantages) is near 0 at every step:
    the stage table showed "-3.35e-08" in the final-loss column, beside pretraining's cross-entropy."""
    pre = MetricsLog(tmp_path, "pretrain")
    pre.log(step=1, loss=2.19)
    pre.log(event="end", wall_time_s=10.0)
    grpo = MetricsLog(tmp_path, "grpo")
    grpo.log(step=1, loss=-3.35e-08, reward=0.05, accuracy=0.0)
    grpo.log(event="end", wall_time_s=20.0)
    text = build_report(tmp_path).read_text()
    assert "| pretrain | 10 s | – | $0.0003 | 2.19 | – |" in text, text
    assert "| grpo | 20 s | – | $0.0006 | – | – |" in text, text


@pytest.mark.parametrize(
    ("kv", "mha", "shown"),
    [
        (640, 7168, "640 (11.2x smaller than MHA's 7,168 B)"),
        (2304, 2304, "2,304 (as much as MHA)"),  # a Llama-shaped model without grouping
        (1152, 640, "1,152 (1.8x more than MHA's 640 B)"),  # an MLA of one head
    ],
)
def test_the_kv_cache_line_says_smaller_only_where_it_is(tmp_path, kv, mha, shown):
    """A cache as large as MHA's read "1.0x smaller than MHA's", and a larger one "0.6x smaller"."""
    pre = MetricsLog(tmp_path, "pretrain")
    pre.log(
        event="model",
        total_params=1000,
        active_params=1000,
        kv_cache_bytes_per_token=kv,
        mha_kv_cache_bytes_per_token=mha,
    )
    pre.log(step=1, loss=2.0)
    assert f"BF16) | {shown} |" in build_report(tmp_path).read_text()


def test_scores_with_no_spread_over_the_problems_show_no_interval(tmp_path):
    """Every one of 6 problems failed before and after GRPO: the standard errors are 0, and the report
    showed "0.0% ± 0.0" and a gain of "+0.0 ± 0.0 points", which read as certainty from 6 problems."""
    _paired_evals(tmp_path, "arithmetic", {"sft": [0.0] * 6, "grpo": [0.0] * 6}, stderr=0.0)
    text = build_report(tmp_path).read_text()
    assert "± 0.0" not in text, text
    assert "| grpo | arithmetic | 2 | 0.0% |" in text
    assert "GRPO changed held-out pass@1 by **+0.0 points** (0.0% → 0.0%)" in text
    assert "carry ± the half-width" not in text and "(± 95%)" not in text  # no interval to explain


def test_a_last_step_skipped_for_a_nan_loss_shows_the_last_finite_loss_and_the_skipped_steps(tmp_path):
    """The trainer skips a step whose loss is NaN (no update) and logs it as "nan": the final-loss
    column showed "nan" for healthy weights (those of the step before), and no skipped step anywhere."""
    pre = MetricsLog(tmp_path, "pretrain")
    pre.log(step=0, event="start")
    pre.log(step=1, loss=5.0, lm_loss=4.5, tokens=128)
    pre.log(step=2, loss=float("nan"), lm_loss=float("nan"), tokens=256, skipped="non-finite loss")
    pre.log(step=3, loss=4.0, lm_loss=3.5, tokens=384)
    pre.log(step=4, loss=float("nan"), lm_loss=float("nan"), tokens=512, skipped="non-finite loss")
    pre.log(step=4, event="end", wall_time_s=4.0, skipped=2)
    text = build_report(tmp_path).read_text()
    assert "| pretrain | 4 s | 512 | $0.0001 | 3.5 (2 steps skipped) | – |" in text, text


def test_a_fresh_start_that_logged_no_step_leaves_the_earlier_run_reported(tmp_path):
    """SFT trained and evaluated, then started afresh into the same RUN and killed before its first step
    (or failed there): nothing was saved, RUN/sft is the earlier run's, yet the report showed an empty
    stopped stage and dropped the evaluation of the checkpoint still there."""
    sft, ev = MetricsLog(tmp_path, "sft"), MetricsLog(tmp_path, "eval")
    sft.log(0, event="start", time=1000.0)
    sft.log(1, loss=3.0, tokens=64, time=1001.0)
    sft.log(2, loss=2.5, tokens=128, time=1002.0)
    sft.log(None, event="end", wall_time_s=5.0, time=1003.0)
    ev.log(evaluated="sft", task="arithmetic", k=2, **{"pass@1": 0.61}, problems=8, time=1100.0)
    sft.log(0, event="start", time=2000.0)  # killed here
    text = build_report(tmp_path).read_text()
    assert "| sft | 5 s | 128 | $0.0001 | 2.5 | – |" in text, text
    assert "| sft | arithmetic | 2 | 61.0%" in text


@pytest.mark.parametrize(
    ("init", "gain"),
    [
        ("RUN/sft", None),  # SFT trained but not scored: no gain to give (SFT's counted as GRPO's)
        ("RUN/pretrain", "+30.0 points"),  # R1-Zero: GRPO from pretraining, SFT scored beside it
        # a Hub model, which `nanoseek eval` names whole (owner/name)
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "+30.0 points"),
    ],
)
def test_grpos_gain_is_read_from_the_checkpoint_it_started_from(tmp_path, init, gain):
    """GRPO's gain was read from SFT where SFT was scored, else from pretraining, whatever GRPO started
    from: "GRPO's gain over its starting checkpoint (pretrain)" for a GRPO that trained from SFT."""
    for stage in ("pretrain", "sft", "grpo"):
        log = MetricsLog(tmp_path, stage)
        log.log(0, event="start", **({"init": init} if stage == "grpo" else {}))
        log.log(1, loss=1.0, reward=0.5)
        log.log(None, event="end", wall_time_s=5.0)
    ev = MetricsLog(tmp_path, "eval")
    ev.log(evaluated="pretrain", task="arithmetic", k=4, problems=8, **{"pass@1": 0.30})
    if "/" in init and not init.startswith("RUN/"):
        ev.log(evaluated=init, task="arithmetic", k=4, problems=8, **{"pass@1": 0.30})
    if init == "RUN/pretrain":
        ev.log(evaluated="sft", task="arithmetic", k=4, problems=8, **{"pass@1": 0.50})
    ev.log(evaluated="grpo", task="arithmetic", k=4, problems=8, **{"pass@1": 0.60})
    text = build_report(tmp_path).read_text()
    if gain is None:
        assert "GRPO's gain" not in text and "GRPO changed" not in text, text
    else:
        if init.startswith("RUN/"):  # (the summary's columns are the run's own stages)
            assert "GRPO's gain over its starting checkpoint (pretrain) on the families" in text, text
            assert f"**{gain}** on average" in text
        assert f"- arithmetic: GRPO changed held-out pass@1 by **{gain}** (30.0% → 60.0%)" in text


def test_the_total_row_writes_seconds_as_the_stage_rows_do(tmp_path):
    """The stage rows wrote "3,600 s" and the total "7200.0 s"."""
    for stage in ("pretrain", "sft"):
        log = MetricsLog(tmp_path, stage)
        log.log(step=1, loss=2.0, tokens=64)
        log.log(event="end", wall_time_s=3600.0)
    text = build_report(tmp_path).read_text()
    assert "| pretrain | 3,600 s |" in text and "| **total** | 7,200 s |" in text, text


def test_throughput_and_mfu_are_the_median_of_the_steps_after_each_processs_warmup(tmp_path):
    """Pretraining and SFT log `tok_per_s` and `mfu` every step, and the report showed neither. Each
    process's first steps (compilation, caches) are left out, and a stage of no more steps keeps all."""
    pre, sft, grpo = (MetricsLog(tmp_path, s) for s in ("pretrain", "sft", "grpo"))
    pre.log(step=0, event="start")
    speeds = [5, 50, 60, 70, 80, 100, 300, 200, 500, 400]  # the first 5 warming up
    for s, v in enumerate(speeds, 1):
        pre.log(step=s, loss=2.0, tokens=64 * s, tok_per_s=float(v), mfu=v / 1000)
    pre.log(event="resume", from_step=10)
    for s, v in zip(range(11, 18), [1, 1, 1, 1, 1, 1000, 1000], strict=True):
        pre.log(step=s, loss=2.0, tokens=64 * s, tok_per_s=float(v), mfu=v / 1000)
    pre.log(event="end", wall_time_s=10.0)
    for s, v, mfu in ((1, 10.0, 0.1), (2, 2000.0, 0.2), (3, 3000.0, float("nan"))):
        sft.log(step=s, loss=1.0, tokens=64 * s, tok_per_s=v, mfu=mfu)
    grpo.log(step=1, loss=0.0, reward=0.5, wall_time_s=2.0)  # logs neither
    text = build_report(tmp_path).read_text()
    # steps 6-10 and 16-17: 100, 300, 200, 500, 400, 1000, 1000
    assert "| pretrain | 10 s | 1.09K | $0.0003 | 2 | – | 400 | 40% |" in text, text
    assert "| sft | – | 192 | – | 1 | – | 2.00K | 15% |" in text, text  # all 3 steps (the NaN left out)
    assert "| grpo | 2 s | – | $0.0001 | – | – | – | – |" in text, text
    assert "median over a stage's training steps after each process's first 5" in text


def test_an_evaluation_whose_pass_at_1_is_no_number_is_left_out_with_a_note(tmp_path):
    """A hand-written eval record with "pass@1": "nan" (as a MetricsLog writes a NaN) or null stopped
    the report with a TypeError in its summary of GRPO's gains."""
    ev = MetricsLog(tmp_path, "eval")
    ev.log(evaluated="sft", task="arithmetic", k=4, **{"pass@1": 0.2})
    ev.log(evaluated="sft", task="sorting", k=4, **{"pass@1": 0.5})
    ev.log(evaluated="grpo", task="arithmetic", k=4, **{"pass@1": float("nan"), "pass@1_stderr": "nan"})
    ev.log(evaluated="grpo", task="sorting", k=4, **{"pass@1": None})
    text = build_report(tmp_path).read_text()
    assert "| sft | arithmetic | 4 | 20.0% |" in text and "| grpo |" not in text, text
    assert 'grpo on arithmetic (pass@1 "nan"); grpo on sorting (pass@1 null)' in text, text
    ev.log(evaluated="grpo", task="sorting", k=4, **{"pass@1": 0.75})  # scored again: no longer left out
    text = build_report(tmp_path).read_text()
    assert "| grpo | sorting | 4 | 75.0% |" in text and "grpo on sorting" not in text, text


def test_an_evaluation_of_training_problems_is_not_reported_as_held_out(tmp_path):
    """`nanoseek eval RUN/grpo --split train` appends its record to RUN/metrics.jsonl as any evaluation
    does: the report showed its pass@1 on training problems in the held-out table, as GRPO's gain."""
    ev = MetricsLog(tmp_path, "eval")
    ev.log(evaluated="sft", task="arithmetic", k=4, split="test", **{"pass@1": 0.25})
    ev.log(evaluated="grpo", task="arithmetic", k=4, split="test", **{"pass@1": 0.5})
    ev.log(evaluated="grpo", task="arithmetic", k=4, split="train", **{"pass@1": 0.875})
    text = build_report(tmp_path).read_text()
    assert "| grpo | arithmetic | 4 | 50.0% |" in text and "87.5%" not in text, text


def test_grpos_gain_in_a_log_that_names_no_init_is_read_from_pretraining_where_sft_was_not_scored(tmp_path):
    """Logs from before GRPO's start record named its `--init`: the start is guessed from what was
    scored, SFT where it was, else pretraining (an R1-Zero run's GRPO, from pretraining)."""
    for stage in ("pretrain", "grpo"):
        log = MetricsLog(tmp_path, stage)
        log.log(0, event="start")
        log.log(1, loss=1.0, reward=0.5)
        log.log(None, event="end", wall_time_s=5.0)
    ev = MetricsLog(tmp_path, "eval")
    ev.log(evaluated="pretrain", task="arithmetic", k=4, problems=8, **{"pass@1": 0.30})
    ev.log(evaluated="grpo", task="arithmetic", k=4, problems=8, **{"pass@1": 0.60})
    text = build_report(tmp_path).read_text()
    assert "GRPO's gain over its starting checkpoint (pretrain) on the families" in text, text
    assert "**+30.0 points** on average (arithmetic +30.0)." in text


def test_grpos_gain_against_an_evaluation_that_logged_no_digest_is_not_said_to_differ(tmp_path):
    """An evaluation from before `problems_digest` was logged is taken to have scored the same problems
    as a later one: no "on different problems" beside GRPO's gain for want of a digest."""
    ev = MetricsLog(tmp_path, "eval")
    ev.log(evaluated="sft", task="arithmetic", k=1, problems=8, **{"pass@1": 0.5})
    ev.log(evaluated="grpo", task="arithmetic", k=1, problems=8, problems_digest="d8", **{"pass@1": 0.625})
    text = build_report(tmp_path).read_text()
    assert "**+12.5 points** (50.0% → 62.5%); format rate" in text and "different problems" not in text


def test_a_stage_trained_again_from_step_1_in_a_log_without_start_records_replaces_the_earlier(tmp_path):
    """Logs from before start records: a stage whose steps start again at 1 was trained afresh, not
    resumed, so its wall time and tokens are the second run's alone (100 s and 300 tokens before, 50 s
    and 200 tokens after)."""
    from nanoseek.report import RunMetrics

    log = MetricsLog(tmp_path, "sft")
    for s in (1, 2, 3):
        log.log(step=s, loss=2.0, tokens=100)
    log.log(event="end", wall_time_s=100.0)
    for s in (1, 2):
        log.log(step=s, loss=1.0, tokens=100)
    log.log(event="end", wall_time_s=50.0)
    m = RunMetrics(tmp_path)
    assert m.steps("sft", "loss") == ([1, 2], [1.0, 1.0])
    assert m.wall_time("sft") == 50.0 and m.total("sft", "tokens") == 200
    assert "| sft | 50 s | 200 |" in build_report(tmp_path).read_text()


def test_a_resume_from_an_earlier_checkpoint_than_the_last_resume_drops_every_replayed_step(tmp_path):
    """Killed at 30, resumed from 20 and killed at 40, then resumed from a checkpoint of step 10: the
    steps past 10 that both earlier processes logged are replayed, so dropped, from the first process
    as well as the second (its 11-20 were counted twice, and its running token total summed)."""
    from nanoseek.report import RunMetrics

    log = MetricsLog(tmp_path, "pretrain")
    log.log(step=0, event="start", time=0.0)
    _pretrain_steps(log, range(1, 31), 0.0, loss=5.0)
    log.log(event="resume", from_step=20, time=100.0)
    _pretrain_steps(log, range(21, 41), 100.0, loss=4.0)
    log.log(event="resume", from_step=10, time=200.0)
    _pretrain_steps(log, range(11, 51), 200.0, loss=3.0)
    log.log(step=50, event="end", wall_time_s=40.0, time=250.0)
    m = RunMetrics(tmp_path)
    xs, ys = m.steps("pretrain", "loss")
    assert xs == list(range(1, 51))
    assert ys == [5.0] * 10 + [3.0] * 40
    assert m.total("pretrain", "tokens") == 128 * 50


def test_a_figure_of_exactly_a_thousand_is_not_written_as_an_exponent(tmp_path):
    """1,000 s, not "1e+03 s": the first figure `g` writes with an exponent is 1000 itself."""
    sft = MetricsLog(tmp_path, "sft")
    sft.log(step=1, loss=2.0)
    sft.log(event="end", wall_time_s=1000.0)
    text = build_report(tmp_path).read_text()
    assert "| sft | 1,000 s |" in text and "e+0" not in text


def test_an_evaluation_scored_before_a_later_one_with_no_number_is_not_reported_as_the_latest(tmp_path):
    """grpo scored 75% on sorting, then scored again with a pass@1 that is no number: the 75% is not the
    figure of the checkpoint now (nor GRPO's gain from it); the evaluation is left out with a note."""
    ev = MetricsLog(tmp_path, "eval")
    ev.log(evaluated="sft", task="sorting", k=4, **{"pass@1": 0.5})
    ev.log(evaluated="grpo", task="sorting", k=4, **{"pass@1": 0.75})
    ev.log(evaluated="grpo", task="sorting", k=4, **{"pass@1": float("nan")})
    text = build_report(tmp_path).read_text()
    assert "| grpo |" not in text and "75.0%" not in text and "GRPO changed" not in text, text
    assert 'grpo on sorting (pass@1 "nan")' in text


def test_the_unseen_wordings_note_says_how_many_problems_were_asked_otherwise(tmp_path):
    """The final model asked in unseen wordings on 8 problems per family: the note says so ("the first
    8 of"), as the other wording's evaluation counts them."""
    ev = MetricsLog(tmp_path, "eval")
    ev.log(evaluated="sft", task="sorting", k=4, **{"pass@1": 0.5})
    ev.log(evaluated="grpo", task="sorting", k=4, **{"pass@1": 0.75})
    per_problem = [0.25] * 8
    ev.log(
        evaluated="grpo",
        task="sorting?wording=unseen",
        k=4,
        **{"pass@1": 0.25, "pass@1_per_problem": per_problem},
    )
    text = build_report(tmp_path).read_text()
    assert "The final model on the first 8 of the same held-out problems per family asked otherwise" in text


def test_a_final_model_scored_only_in_unseen_wordings_shows_a_dash_for_its_own_figure(tmp_path):
    """GRPO evaluated on `?wording=unseen` alone (not on the family as trained): its row in the unseen
    wordings table shows "–" for the final figure, and the report is written."""
    ev = MetricsLog(tmp_path, "eval")
    ev.log(evaluated="sft", task="sorting", k=4, **{"pass@1": 0.5})
    ev.log(evaluated="grpo", task="sorting?wording=unseen", k=4, **{"pass@1": 0.25})
    text = build_report(tmp_path).read_text()
    assert "| sorting | – | 25.0% |" in text


def test_a_price_of_zero_is_a_free_machine_not_an_error(tmp_path):
    """`--usd-per-hour 0` (one's own machine): every cost is $0, not a refusal; a negative price is."""
    _fake_run(tmp_path)
    text = build_report(tmp_path, usd_per_hour=0.0).read_text()
    assert "| pretrain | 120 s | 1.00M | $0.0000 |" in text and "$0.00 per machine-hour" in text
    with pytest.raises(ValueError, match="price >= 0"):
        build_report(tmp_path, usd_per_hour=-1.0)


# ------------------------------------------------------------------ properties (hypothesis)
# any character a str may hold, the lone surrogates Python decodes a non-UTF-8 byte of a path into too
# (`surrogateescape`); not the high surrogates, which JSON's escapes pair with a low one into one character
_CHAR = st.characters() | st.integers(0xDC80, 0xDCFF).map(chr)
_KEY = st.lists(_CHAR, max_size=6).map("".join)
_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.lists(_CHAR, max_size=12).map("".join),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEY, inner, max_size=3),
    max_leaves=8,
)
_FIELDS = st.dictionaries(_KEY.filter(lambda k: k not in ("stage", "step", "time")), _VALUE, max_size=4)


def _as_logged(value):
    """A value as the log writes it: JSON has no NaN or infinity (their names instead), keys are text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _as_logged(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_logged(v) for v in value]
    return value


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    before=st.lists(st.tuples(st.integers(0, 3), _FIELDS), max_size=4),
    torn=st.none() | st.tuples(_FIELDS, st.integers(1, 10**6)),
    after=st.lists(st.tuples(st.integers(0, 3), _FIELDS), max_size=4),
)
def test_the_metrics_log_reads_back_every_record_written_whatever_it_holds(
    tmp_path_factory, before, torn, after
):
    """Any record of any fields (NaN and infinities, any text, nested lists and dicts, a step logged
    again as a resume does), with a line torn anywhere between them (a kill mid-write, maybe inside a
    character), reads back as written: the torn line alone is lost."""
    run = tmp_path_factory.mktemp("run")
    log = MetricsLog(run, "s")
    written = [log.log(step, **fields) for step, fields in before]
    if torn is not None:
        fields, cut = torn
        line = json.dumps({"stage": "s", **_as_logged(fields)}, ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
        with open(run / "metrics.jsonl", "ab") as f:
            f.write(line[: cut % len(line)])
    written += [log.log(step, **fields) for step, fields in after]
    for r, (step, fields) in zip(written, before + after, strict=True):
        assert r == {"stage": "s", "step": step, "time": r["time"], **_as_logged(fields)}
    assert list(read_metrics(run)) == written


def test_a_path_that_is_no_utf_8_is_logged_and_read_back(tmp_path):
    """`nanoseek grpo --init` a directory whose name holds a Latin-1 byte (`caf\xe9`): Python gives the
    path the surrogate `\udce9`, and the start record failed with "'utf-8' codec can't encode character
    '\udce9'" once the model was loaded."""
    MetricsLog(tmp_path, "grpo").log(0, event="start", init="/runs/caf\udce9")
    assert [r["init"] for r in read_metrics(tmp_path)] == ["/runs/caf\udce9"]


# Student's t at 97.5%, df = 1..5 (any table): the 95% interval of a mean over 2..6 problems
_T_95 = {2: 12.7062, 3: 4.30265, 4: 3.18245, 5: 2.77645, 6: 2.57058}
_SCORE = st.integers(0, 8).map(lambda i: i / 8)


@st.composite
def _evaluations(draw):
    """`nanoseek eval` records of stages and families drawn at random, some with per-problem scores (of
    the same problems) and per-language figures, some a family scored again."""
    n = draw(st.integers(2, 6))
    records = []
    for _ in range(draw(st.integers(1, 10))):
        r = {"evaluated": draw(st.sampled_from(["pretrain", "sft", "grpo", "distill"])), "k": 4}
        r.update(
            task=draw(st.sampled_from(["addition", "sorting", "comparison"])), **{"pass@1": draw(_SCORE)}
        )
        if draw(st.booleans()):
            r.update(
                problems=n,
                problems_digest=f"d{n}",
                **{"pass@1_per_problem": draw(st.lists(_SCORE, min_size=n, max_size=n))},
            )
        if draw(st.booleans()):
            langs = draw(st.sets(st.sampled_from(["en", "ja", "zh"]), min_size=1))
            r["pass@1_by_language"] = {lang: draw(_SCORE) for lang in sorted(langs)}
        records.append(r)
    return records


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=_evaluations())
def test_the_pass_at_1_figures_are_the_latest_scores_means_and_paired_intervals(tmp_path_factory, records):
    """Whatever was scored, in any order: each (checkpoint, family) shows its latest score, a stage's
    mean is over the families when it scored them all, GRPO's gain on a family is its score less its
    start's (SFT where scored, else pretraining) with the paired t interval of the per-problem
    differences, and the goal's mean gain is over the families that start in [20%, 80%]."""
    from nanoseek.report import RunMetrics, _pct

    run = tmp_path_factory.mktemp("run")
    log = MetricsLog(run, "eval")
    for r in records:
        log.log(**r)
    latest = {(r["evaluated"], r["task"]): r for r in records}
    score = {key: r["pass@1"] for key, r in latest.items()}
    stages = [s for s in ("pretrain", "sft", "grpo", "distill") if any(k[0] == s for k in latest)]
    tasks = {t for _, t in latest}
    sm = RunMetrics(run).pass_at_1_summary()
    assert (sm["stages"], set(sm["tasks"]), sm["pass@1"]) == (stages, tasks, score)
    for s in stages:
        scores = [score.get((s, t)) for t in tasks]
        mean = None if None in scores else sm["means"][s]
        assert sm["means"][s] == mean and (mean is None or math.isclose(mean, statistics.fmean(scores)))
    start = "sft" if "sft" in stages else "pretrain"
    gains = {
        t: score[("grpo", t)] - score[(start, t)]
        for t in tasks
        if ("grpo", t) in score and (start, t) in score
    }
    assert sm["gains"].keys() == gains.keys()
    for t, gain in gains.items():
        assert math.isclose(sm["gains"][t], gain, abs_tol=1e-12)
        after, before = (
            latest[("grpo", t)].get("pass@1_per_problem"),
            latest[(start, t)].get("pass@1_per_problem"),
        )
        if after and before:
            diffs = [a - b for a, b in zip(after, before, strict=True)]
            margin = _T_95[len(diffs)] * statistics.stdev(diffs) / math.sqrt(len(diffs))
            assert math.isclose(sm["gain_margins"][t], margin, rel_tol=1e-4, abs_tol=1e-12)
        else:
            assert t not in sm["gain_margins"]
    mid = [t for t in gains if 0.2 <= score[(start, t)] <= 0.8]
    assert set(sm["mid"]) == set(mid)
    assert (
        sm["mid_gain"] is None
        if not mid
        else math.isclose(sm["mid_gain"], statistics.fmean(gains[t] for t in mid))
    )
    text = build_report(run).read_text()
    assert "| **mean** | " + " | ".join(f"**{_pct(sm['means'][s])}**" for s in stages) + " |" in text
    for (name, task), r in latest.items():
        assert f"| {name} | {task} | 4 | {_pct(r['pass@1'])}" in text


@st.composite
def _processes(draw):
    """The processes of one pretraining: the first from scratch, each later one resumed from a
    checkpoint at or before the last step the one before it logged: (resumed from, last step)."""
    replayed_only = draw(st.booleans())  # a log from before resume records: each process logs a step
    last = draw(st.integers(1, 20))
    out = [(None, last)]
    for _ in range(draw(st.integers(0, 4))):
        resumed = draw(st.integers(1, out[-1][1]))
        out.append((resumed, draw(st.integers(resumed + replayed_only, resumed + 20))))
    return replayed_only, out


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=_processes(), ended=st.booleans())
def test_a_run_resumed_any_number_of_times_reads_as_the_steps_its_weights_went_through(
    tmp_path_factory, run, ended
):
    """Each step shows the loss of the last process that trained it and whose work its weights keep:
    a step some later process resumed from a checkpoint before is dropped (replayed or not). Tokens
    logged per step sum over those steps; the wall time adds each process's span (the last's end record)."""
    from nanoseek.metrics import append_records
    from nanoseek.report import RunMetrics

    replayed_only, procs = run
    directory = tmp_path_factory.mktemp("run")
    records, now, wall = [], 1000.0, 0.0
    for k, (resumed, last) in enumerate(procs):
        began = now
        if not replayed_only:
            event = {"event": "start"} if resumed is None else {"event": "resume", "from_step": resumed}
            records.append({"stage": "pretrain", "step": 0, "time": now, **event})
        for step in range((resumed or 0) + 1, last + 1):
            now += 1.0
            records.append(
                {"stage": "pretrain", "step": step, "time": now, "loss": 10.0 * k + step / 100, "tokens": 7}
            )
        if k == len(procs) - 1 and ended:
            records.append(
                {"stage": "pretrain", "step": last, "time": now, "event": "end", "wall_time_s": 5.5}
            )
            wall += 5.5
        else:
            wall += now - began
        now += 100.0
    append_records(directory / "metrics.jsonl", records)
    m = RunMetrics(directory)
    kept = []
    for k, (resumed, last) in enumerate(procs):
        limit = min([r for r, _ in procs[k + 1 :]], default=math.inf)
        kept += [
            (step, 10.0 * k + step / 100) for step in range((resumed or 0) + 1, last + 1) if step <= limit
        ]
    xs, ys = m.steps("pretrain", "loss")
    assert (list(zip(xs, ys, strict=True)), m.total("pretrain", "tokens")) == (kept, 7 * len(kept))
    if not replayed_only:  # (where a process replays no step, such a log cannot tell it from the one before)
        assert m.wall_time("pretrain") == wall
