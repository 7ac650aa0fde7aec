"""`nanoseek ablate`: each study's run plan checked without training, budgets, resume, the report."""

import json
import math
import re
import statistics
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek.ablate import (
    STUDIES,
    TOKENS_PER_STEP,
    AblateConfig,
    Budget,
    drop_unfinished,
    finished_runs,
    get_study,
    parse_budget,
    plan,
    run_study,
    settings_diff,
)
from nanoseek.accounting import (
    analytic_parameters,
    count_parameters,
    flops_per_token,
    kv_cache_bytes_per_token,
)

# What each variant changes from its study's first variant: one technique, and only its settings.
EXPECTED_DIFFS = {
    "moe": {
        "dense-active": {"n_routed_experts", "n_shared_experts", "num_experts_per_tok"},
        "dense-total": {"n_routed_experts", "n_shared_experts", "num_experts_per_tok", "intermediate_size"},
        "moe-finer": {"n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size"},
        "no-shared": {"n_shared_experts", "num_experts_per_tok"},
    },
    "mla": {
        "mha": {"model_type", "head_dim", "rope_interleave"},
        "gqa": {"model_type", "head_dim", "rope_interleave", "num_key_value_heads"},
        "mqa": {"model_type", "head_dim", "rope_interleave", "num_key_value_heads"},
    },
    "balance": {"aux-loss": {"bias_update_speed", "balance_alpha"}, "none": {"bias_update_speed"}},
    "mtp": {"no-mtp": {"num_nextn_predict_layers", "mtp_weight"}},
    "fp8": {"fp8": {"precision"}, "fp32": {"precision"}},
}
# Equal active parameters within 1%: MoE layers carry a router (E x hidden per layer) that a dense MLP
# of the same active width has not (0.45% of the tiny model's active parameters).
TOL = 0.01


def _by_variant(study: str) -> dict:
    return {r.variant: r for r in plan(study, seeds=1)}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.mark.parametrize("study", STUDIES)
def test_variants_differ_in_exactly_one_technique(study: str) -> None:
    runs = plan(study, seeds=1)
    base = runs[0]
    s = get_study(study)
    assert {r.variant for r in runs[1:]} == set(EXPECTED_DIFFS[study])
    for r in runs[1:]:
        diff = settings_diff(base.settings(), r.settings())
        assert diff == EXPECTED_DIFFS[study][r.variant], r.variant
        assert diff <= s.fields, f"{r.variant} changes {diff - s.fields}, outside the {study} technique"
    # every variant trains on the same schedule: only the study's own settings differ
    assert len({(r.train.lr, r.train.batch_size, r.train.seq_len, r.train.warmup_steps) for r in runs}) == 1


def test_plan_has_every_variant_times_seeds() -> None:
    runs = plan("moe", seeds=3)
    assert len(runs) == 5 * 3
    assert len({r.key for r in runs}) == 15
    assert {r.seed for r in runs} == {0, 1, 2}


def test_moe_equal_active_and_equal_total_parameters() -> None:
    v = _by_variant("moe")
    counts = {name: analytic_parameters(r.config) for name, r in v.items()}
    moe = counts["moe"]
    # the closed form agrees with the model built on the meta device
    exact = count_parameters(v["moe"].config)
    assert (exact.total, exact.active) == (moe.total, moe.active)
    for name in ("dense-active", "moe-finer", "no-shared"):
        assert _rel(counts[name].active, moe.active) <= TOL, name
    for name in ("dense-total", "moe-finer"):
        assert _rel(counts[name].total, moe.total) <= TOL, name
    # the contrasts are real: dense-active is much smaller in total, dense-total much bigger per token
    assert counts["dense-active"].total < 0.6 * moe.total
    assert counts["dense-total"].active > 2 * moe.active
    assert not v["dense-active"].config.is_moe and v["moe-finer"].config.n_routed_experts == 32


def test_mla_matched_parameters_and_kv_cache() -> None:
    v = _by_variant("mla")
    totals = {name: analytic_parameters(r.config).total for name, r in v.items()}
    for name in ("mha", "gqa", "mqa"):
        assert _rel(totals[name], totals["mla"]) <= TOL, name
        assert v[name].config.attention_variant == "gqa"
    assert v["mla"].config.attention_variant == "mla"
    assert [v[n].config.num_key_value_heads for n in ("mha", "gqa", "mqa")] == [4, 2, 1]
    kv = {name: kv_cache_bytes_per_token(r.config) for name, r in v.items()}
    assert kv["mla"] < kv["mqa"] < kv["gqa"] < kv["mha"]
    assert kv["mla"] == 4 * (64 + 16) * 2  # layers x (kv_lora_rank + rope dims) x bf16


def test_same_model_where_the_technique_is_training_only() -> None:
    for study in ("balance", "fp8"):
        runs = plan(study, seeds=1)
        assert all(r.config == runs[0].config for r in runs), study
    v = _by_variant("mtp")
    # equal main model: the MTP module is outside `total` (accounting's convention, V3's 671B)
    assert analytic_parameters(v["mtp"].config).total == analytic_parameters(v["no-mtp"].config).total
    assert analytic_parameters(v["mtp"].config).mtp > 0


@pytest.mark.parametrize("study", STUDIES)
def test_flop_accounting_per_run(study: str) -> None:
    for r in plan(study, seeds=1):
        mtp = bool(r.config.num_nextn_predict_layers) and r.train.mtp_weight > 0
        expected = flops_per_token(r.config, r.train.seq_len, training=True, include_mtp=mtp)
        assert r.flops_per_token() == expected
        assert r.flops_per_token(main_only=True) == flops_per_token(r.config, r.train.seq_len, training=True)
        steps = r.budget.steps()
        assert steps is not None and steps * TOKENS_PER_STEP >= r.budget.value


def test_flops_differ_where_compute_differs() -> None:
    moe = _by_variant("moe")
    assert moe["dense-total"].flops_per_token() > 2 * moe["moe"].flops_per_token()
    assert _rel(moe["dense-active"].flops_per_token(), moe["moe"].flops_per_token()) <= TOL
    mtp = _by_variant("mtp")
    assert mtp["mtp"].flops_per_token() > mtp["no-mtp"].flops_per_token()
    assert mtp["mtp"].flops_per_token(main_only=True) == mtp["no-mtp"].flops_per_token()


# Seconds per training step (8 x 320 tokens) of each variant, measured on the shared 2-core machine
# these defaults were sized on (docs/ablations.md: under another job's load, so on the slow side).
STEP_SECONDS = {
    "moe": {"moe": 0.74, "dense-active": 0.62, "dense-total": 1.24, "moe-finer": 1.30, "no-shared": 1.27},
    "mla": {"mla": 0.79, "mha": 1.09, "gqa": 0.89, "mqa": 0.85},
    "balance": {"loss-free": 0.95, "aux-loss": 0.95, "none": 0.95},
    "mtp": {"mtp": 1.72, "no-mtp": 1.02},
    "fp8": {"bf16": 0.95, "fp8": 4.21, "fp32": 1.66},
}
EXTRA_SECONDS = {"mtp": 40}  # greedy accuracy with MTP drafts at the end of each run


def test_default_budgets_fit_thirty_minutes() -> None:
    """Each study's default plan (3 seeds) trains within 30 minutes at those step times, + 10% for
    the evaluations."""
    for study in STUDIES:
        runs = plan(study)
        seconds = sum(
            1.1 * STEP_SECONDS[study][r.variant] * r.budget.steps() + EXTRA_SECONDS.get(study, 0)
            for r in runs
        )
        assert seconds <= 30 * 60, (study, seconds)


def test_parse_budget() -> None:
    assert parse_budget("384k") == Budget("tokens", 384_000)
    assert parse_budget("384k").steps() == 150
    assert parse_budget("1M tokens") == Budget("tokens", 1e6)
    assert parse_budget("2e6") == Budget("tokens", 2e6)
    assert parse_budget("5000tok") == Budget("tokens", 5000)
    assert parse_budget("90s") == Budget("seconds", 90)
    assert parse_budget("90 s") == Budget("seconds", 90)
    assert parse_budget("5min") == Budget("seconds", 300)
    assert parse_budget("90s").steps() is None
    for bad in ("", "fast", "10 parsecs", "5ks", "0s", "-3"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    # a refused budget names every form that would have been read, times too, not only counts of tokens
    for bad in ("abc", "0", "2x"):
        with pytest.raises(ValueError, match=r"K/M/B/T.*384k.*1M tokens.*90s.*5min.*1h"):
            parse_budget(bad)
    assert parse_budget("2 hours") == parse_budget("120 minutes") == Budget("seconds", 7200)
    # as the study's first line says it: 384,000 tokens are 150 steps of 8 x 320 tokens
    assert str(parse_budget("384k")) == "384k tokens per run (150 steps of 2560)"
    assert str(parse_budget("5min")) == "300s per run"


def test_budget_in_steps_is_told_the_forms_it_can_use() -> None:
    # the docs quote default budgets in steps; "100 steps" ends in "s" but is no time with a K/M suffix
    for text in ("100 steps", "2 hrs"):
        with pytest.raises(ValueError, match="cannot parse --budget.*384k.*90s"):
            parse_budget(text)
    with pytest.raises(ValueError, match="no K/M suffix"):
        parse_budget("1ks")


def test_bad_study_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown study 'moes'.*moe, mla, balance, mtp, fp8"):
        get_study("moes")
    with pytest.raises(ValueError, match="unknown study"):
        plan("attention")
    with pytest.raises(ValueError, match="unknown study"):
        AblateConfig(study="nope").validate()
    from nanoseek.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ablate", "nope"])
    assert e.value.code == 2


def test_bad_options_are_refused_before_any_training() -> None:
    # --threads -1 was a RuntimeError traceback from torch, --max-new-tokens 0 an error after the mtp
    # study's first run had trained
    for bad, match in (
        ({"threads": -1}, "--threads"),
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"acc_n": -1}, "--acc-n"),
        ({"threads": 0}, "--threads"),  # torch refuses 0 too
        ({"seeds": 0}, "--seeds"),
        ({"val_batches": 0}, "--val-batches"),
        ({"tokenizer_docs": 0}, "--tokenizer-docs"),
    ):
        with pytest.raises(ValueError, match=match):
            AblateConfig(study="mtp", **bad).validate()
    AblateConfig(study="mtp", acc_n=0, threads=1).validate()


def test_studies_refuse_a_preset_without_the_technique(tmp_path) -> None:
    with pytest.raises(ValueError, match="routed experts"):
        plan("moe", preset="tiny-dense")
    with pytest.raises(ValueError, match="MLA"):
        plan("mla", preset="tiny-qwen2")
    with pytest.raises(ValueError, match="MTP module"):
        plan("mtp", preset="tiny-qwen2")
    with pytest.raises(ValueError, match="routed experts"):
        plan("balance", preset="tiny-dense")
    # V2's greedy routers never read the bias: loss-free and none were the same model, "compared"
    with pytest.raises(ValueError, match="noaux_tc.*never reads the balancing bias"):
        plan("balance", preset="deepseek-v2-lite")
    # no-shared would equal moe: the shared-expert contrast needs one
    from nanoseek.config import resolve_config

    resolve_config("tiny").replace(n_shared_experts=0).save(tmp_path)
    with pytest.raises(ValueError, match="has none"):
        plan("moe", preset=str(tmp_path))


def test_mla_study_refuses_a_preset_too_narrow_for_gqa(tmp_path) -> None:
    """Two query heads: the gqa variant was the mqa model again, trained and "compared" twice."""
    from nanoseek.config import resolve_config

    resolve_config("tiny").replace(num_attention_heads=2).save(tmp_path)
    with pytest.raises(ValueError, match="at least 4 attention heads"):
        plan("mla", preset=str(tmp_path))


# ------------------------------------------------------------- resume (no training)
def _summary_rows(report: str) -> list[str]:
    """The claim rows of the report's summary table."""
    lines = report.split("## Summary\n\n", 1)[1].splitlines()
    table = lines[: lines.index("")]
    assert table[0].startswith("| paper's claim")
    return table[2:]


def _fake_training(monkeypatch, calls: list, **done_fields) -> None:
    """train_run replaced by one that logs a tiny curve: the plan, resume and report logic stay real."""
    import nanoseek.ablate as ab

    def fake(run, tok, val_set, log, **kw):
        calls.append(run.key)
        fpt, main_fpt = run.flops_per_token(), run.flops_per_token(main_only=True)
        loss = 3.0 + 0.1 * run.seed + (0.0 if run.variant == run.study else 0.05)
        for step in (0, 1, 2):
            tokens = step * TOKENS_PER_STEP
            log.log(
                step,
                study=run.study,
                variant=run.variant,
                seed=run.seed,
                tokens=tokens,
                flops=tokens * fpt,
                main_flops=tokens * main_fpt,
                train_s=step * 0.5,
                val_loss=loss + 1.0 / (1 + step),
            )
        return log.log(
            2,
            study=run.study,
            variant=run.variant,
            seed=run.seed,
            event="done",
            train_s=1.0,
            s_per_step=0.5,
            **done_fields,
        )

    monkeypatch.setattr(ab, "train_run", fake)
    monkeypatch.setattr(ab, "_tokenizer", lambda out, docs: None)
    monkeypatch.setattr(ab, "validation_batches", lambda tok, n: [])


def test_an_interrupted_study_gives_back_the_threads(tmp_path, monkeypatch) -> None:
    """torch's thread count is the process's: a notebook's session went on at --threads after it."""
    import torch

    import nanoseek.ablate as ab

    calls: list = []
    _fake_training(monkeypatch, calls)
    fake = ab.train_run

    def interrupted(run, *a, **kw):  # the second run: the first drew the bar
        if calls:
            raise KeyboardInterrupt
        return fake(run, *a, **kw)

    monkeypatch.setattr(ab, "train_run", interrupted)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_study(AblateConfig(study="mla", seeds=1, out=str(tmp_path), threads=1), "mla")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_resume_skips_finished_runs_and_drops_an_interrupted_one(tmp_path, monkeypatch) -> None:
    calls: list = []
    _fake_training(monkeypatch, calls)
    cfg = AblateConfig(study="mla", seeds=2, out=str(tmp_path), progress=False)
    run_study(cfg, "mla")
    assert len(calls) == 8
    directory = tmp_path / "ablate" / "mla"
    # interrupt: remove the last run's done row and leave half of its curve
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "done"
    (directory / "metrics.jsonl").write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:20])  # + a torn line
    assert ("mqa", 1) not in finished_runs(directory)
    calls.clear()
    run_study(cfg, "mla")
    assert calls == [("mqa", 1)]  # the seven finished runs are skipped
    rows = [json.loads(x) for x in (directory / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in rows if (r["variant"], r["seed"]) == ("mqa", 1)) == 4  # 3 evals + done, once
    assert drop_unfinished(directory) == 0
    # a run killed while writing its very first row leaves only a torn line: it goes too
    text = (directory / "metrics.jsonl").read_text()
    (directory / "metrics.jsonl").write_text(text + '{"stage": "abl')
    assert drop_unfinished(directory) == 0
    assert (directory / "metrics.jsonl").read_text() == text
    # a third run has nothing to do
    calls.clear()
    run_study(cfg, "mla")
    assert calls == []


def test_a_resumed_studys_bar_counts_every_run_from_the_finished_ones(tmp_path, monkeypatch, capsys) -> None:
    """The bar went over the runs left alone: "0/1" under "8 runs (...); 7 already finished"."""
    calls: list = []
    _fake_training(monkeypatch, calls)
    run_study(AblateConfig(study="mla", seeds=2, out=str(tmp_path), progress=False), "mla")
    directory = tmp_path / "ablate" / "mla"
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    (directory / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # the last run's done row
    capsys.readouterr()
    run_study(AblateConfig(study="mla", seeds=2, out=str(tmp_path)), "mla")
    out, err = capsys.readouterr()
    assert "8 runs" in out and "7 already finished" in out
    assert "7/8" in err and "8/8" in err and "0/1" not in err, err


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch) -> None:
    _fake_training(monkeypatch, [])
    run_study(AblateConfig(study="balance", seeds=1, out=str(tmp_path), progress=False), "balance")
    with pytest.raises(ValueError, match="other settings"):
        run_study(AblateConfig(study="balance", seeds=1, budget="60s", out=str(tmp_path)), "balance")
    # more seeds is the same plan, extended
    run_study(AblateConfig(study="balance", seeds=2, out=str(tmp_path), progress=False), "balance")


def test_all_refuses_a_later_studys_other_settings_before_training_any(tmp_path, monkeypatch) -> None:
    """`ablate all` refused fp8's earlier run with another budget only after four studies had trained."""
    from nanoseek.ablate import ablate

    calls: list = []
    _fake_training(monkeypatch, calls)
    run_study(AblateConfig(study="fp8", seeds=1, budget="60s", out=str(tmp_path), progress=False), "fp8")
    calls.clear()
    with pytest.raises(ValueError, match="other settings"):
        ablate(AblateConfig(study="all", seeds=1, out=str(tmp_path), progress=False))
    assert calls == []
    assert sorted(p.name for p in (tmp_path / "ablate").iterdir()) == ["fp8"]


def test_a_study_rerun_after_all_updates_the_index(tmp_path, monkeypatch) -> None:
    """RUN/ablate/report.md kept the one-seed verdicts of a study since extended to two seeds."""
    from nanoseek.ablate import ablate

    _fake_training(monkeypatch, [])
    ablate(AblateConfig(study="all", seeds=1, out=str(tmp_path), progress=False))
    (report,) = ablate(AblateConfig(study="balance", seeds=2, out=str(tmp_path), progress=False))
    index = (tmp_path / "ablate" / "report.md").read_text()
    balance = index.split("## balance", 1)[1].split("\n## ", 1)[0]
    assert _summary_rows(report.read_text())[0] in balance
    assert "(1 seed)" not in balance and "## mla" in index


def test_resume_where_auto_precision_resolves_otherwise_is_refused(tmp_path, monkeypatch) -> None:
    # "auto" trains in bf16 on a CPU with native bf16 and in fp32 on one without (or under
    # ATEN_CPU_CAPABILITY=avx2): a resume there would pair bf16 runs with fp32 ones in one report
    import torch

    import nanoseek.perf as perf
    import nanoseek.train.pretrain as pretrain

    _fake_training(monkeypatch, [], precision="bf16")
    monkeypatch.setattr(perf, "default_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(pretrain, "cpu_has_bf16", lambda: True)
    cfg = AblateConfig(study="balance", seeds=1, out=str(tmp_path), progress=False)
    report = run_study(cfg, "balance")
    assert "Trained in bf16 on cpu." in report.read_text()
    monkeypatch.setattr(pretrain, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="precision differs"):
        run_study(cfg, "balance")


def test_fp8_unsupported_runs_bf16_vs_fp32_and_says_so(tmp_path, monkeypatch, capsys) -> None:
    import nanoseek.ablate as ab

    calls: list = []
    _fake_training(monkeypatch, calls)
    monkeypatch.setattr(ab, "fp8_training_supported", lambda: "no float8 here")
    report = run_study(AblateConfig(study="fp8", seeds=1, out=str(tmp_path), progress=False), "fp8")
    assert {v for v, _ in calls} == {"bf16", "fp32"}
    assert "GPU only" in capsys.readouterr().out
    text = report.read_text()
    assert "GPU only" in text
    fp8_row = next(line for line in text.splitlines() if line.startswith("| fine-grained FP8"))
    assert "not run" in fp8_row


def test_report_judges_per_flop_and_per_second(tmp_path, monkeypatch) -> None:
    _fake_training(monkeypatch, [])
    report = run_study(AblateConfig(study="moe", seeds=3, out=str(tmp_path), progress=False), "moe")
    text = report.read_text()
    table = _summary_rows(text)
    assert len(table) == len(get_study("moe").claims)
    # the fake makes `moe` better than every other variant on every seed
    dense = next(line for line in table if line.startswith("| MoE beats dense at equal active"))
    assert dense.count("| yes |") == 2
    finer = next(line for line in table if line.startswith("| finer experts"))
    assert finer.count("| no |") == 2
    for name in ("val_loss_tokens.png", "val_loss_flops.png", "val_loss_train_s.png"):
        assert (report.parent / "plots" / name).exists()


def test_mtp_flops_plot_is_over_the_main_model_flops_its_claim_is_judged_on(tmp_path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    _fake_training(monkeypatch, [])
    ends: dict[str, tuple[str, list[float]]] = {}
    savefig = Figure.savefig

    def record(fig, path, **kw):
        ax = fig.axes[0]
        name = Path(path).name.removeprefix(".").removesuffix(".tmp")  # written beside, then renamed
        ends[name] = (ax.get_xlabel(), [max(line.get_xdata()) for line in ax.get_lines()])
        return savefig(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", record)
    report = run_study(AblateConfig(study="mtp", seeds=1, out=str(tmp_path), progress=False), "mtp")
    label, (mtp_end, no_mtp_end) = ends["val_loss_flops.png"]
    # the two variants train the same main model on the same tokens: equal main-model FLOPs, as the
    # summary's per-FLOP column compares them (the MTP module's own FLOPs would put mtp's end further)
    assert label == "main-model training FLOPs" and mtp_end == pytest.approx(no_mtp_end)
    assert "Validation loss over main-model training FLOPs" in report.read_text()


def test_variant_table_gives_the_trained_models_figures(tmp_path, monkeypatch) -> None:
    # the plan sizes models at a nominal vocabulary; a run's tokenizer can have fewer tokens, and the
    # table must describe what was trained (the done records), as the per-FLOP comparison does
    facts = {"total_params": 1_234_567, "active_params": 654_321, "flops_per_token": 7_654_321}
    _fake_training(monkeypatch, [], kv_cache_bytes_per_token=4321, **facts)
    report = run_study(AblateConfig(study="mla", seeds=1, out=str(tmp_path), progress=False), "mla")
    row = next(line for line in report.read_text().splitlines() if line.startswith("| mla |"))
    assert "| 1.23M | 654.32k | 7.65M | 4,321 |" in row


# ------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path) -> None:
    from nanoseek.ablate import ablate

    cfg = AblateConfig(
        study="mla",
        budget="5k",
        seeds=1,
        out=str(tmp_path),
        tokenizer_docs=300,
        val_batches=1,
        progress=False,
    )
    (report,) = ablate(cfg)
    directory = tmp_path / "ablate" / "mla"
    rows = [json.loads(x) for x in (directory / "metrics.jsonl").read_text().splitlines()]
    done = [r for r in rows if r.get("event") == "done"]
    assert {r["variant"] for r in done} == {"mla", "mha", "gqa", "mqa"}
    evals = [r for r in rows if r.get("event") is None]
    assert {"variant", "seed", "step", "tokens", "flops", "train_s", "val_loss"} <= set(evals[-1])
    assert all(r["val_loss"] > 0 for r in evals)
    assert max(r["tokens"] for r in evals) == 2 * TOKENS_PER_STEP
    text = report.read_text()
    table = _summary_rows(text)
    assert len(table) == len(get_study("mla").claims)
    for name in ("val_loss_tokens.png", "val_loss_flops.png", "val_loss_train_s.png"):
        assert (directory / "plots" / name).stat().st_size > 1000


@pytest.mark.slow
def test_tiny_mtp_study_measures_accuracy_and_draft_acceptance(tmp_path) -> None:
    from nanoseek.ablate import ablate

    cfg = AblateConfig(
        study="mtp",
        budget="5k",
        seeds=1,
        out=str(tmp_path),
        tokenizer_docs=300,
        val_batches=1,
        acc_n=1,
        max_new_tokens=16,
        progress=False,
    )
    (report,) = ablate(cfg)
    rows = [json.loads(x) for x in (tmp_path / "ablate" / "mtp" / "metrics.jsonl").read_text().splitlines()]
    last = {r["variant"]: r for r in rows if r.get("event") is None}
    assert 0.0 <= last["mtp"]["acceptance_rate"] <= 1.0  # the MTP head drafted while decoding greedily
    assert "acceptance_rate" not in last["no-mtp"]
    assert 0.0 <= last["no-mtp"]["accuracy"] <= 1.0
    assert last["mtp"]["main_flops"] < last["mtp"]["flops"]  # the MTP module's FLOPs count in `flops` only
    assert len(_summary_rows(report.read_text())) == len(get_study("mtp").claims)


@pytest.mark.parametrize("study", STUDIES)
def test_studies_scale_to_the_small_preset(study: str) -> None:
    """The same command at GPU scale: the plan derives its widths from the preset."""
    runs = plan(study, seeds=1, preset="small")
    assert all(r.config.max_position_embeddings == 4096 for r in runs)
    base = runs[0]
    for r in runs[1:]:
        assert settings_diff(base.settings(), r.settings()) == EXPECTED_DIFFS[study][r.variant]
    if study == "moe":
        v = {r.variant: analytic_parameters(r.config) for r in runs}
        assert _rel(v["dense-active"].active, v["moe"].active) <= TOL
        assert _rel(v["dense-total"].total, v["moe"].total) <= TOL
    if study == "mla":
        totals = [analytic_parameters(r.config).total for r in runs]
        assert max(totals) / min(totals) <= 1 + TOL


def test_ablate_resume_refuses_other_val_batches(tmp_path, monkeypatch) -> None:
    import nanoseek.ablate as a

    monkeypatch.setattr(a, "finished_runs", lambda d: {r.key for r in a.plan("mla", "3k", 1)})
    monkeypatch.setattr(a, "build_study_report", lambda d: d, raising=False)
    import nanoseek.ablate_report as rep

    monkeypatch.setattr(rep, "build_study_report", lambda d: d)
    cfg = a.AblateConfig(study="mla", budget="3k", seeds=1, out=str(tmp_path), val_batches=1, progress=False)
    a.run_study(cfg, "mla")
    cfg.val_batches = 4
    with pytest.raises(ValueError, match="other settings"):
        a.run_study(cfg, "mla")


# ------------------------------------------------------------- judging claims
def _study(directory: Path, curves: dict, variants: dict | None = None, unfinished: tuple = ()) -> Path:
    """A study directory as `nanoseek ablate` leaves it: plan.json and metrics.jsonl with a curve of
    (x, val_loss) per (variant, seed), x on every axis (main-model FLOPs: half of it), and a done row
    per run but those in `unfinished` (interrupted: their rows are no measurement)."""
    names = variants or {v: {} for v, _ in curves}
    plan_ = {"study": "t", "about": "t", "variants": names, "claims": []}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "plan.json").write_text(json.dumps(plan_))
    rows = []
    for (variant, seed), points in curves.items():
        for step, (x, loss) in enumerate(points):
            axes = {"tokens": x, "flops": x, "main_flops": x / 2, "train_s": x}
            rows.append({"variant": variant, "seed": seed, "step": step, **axes, "val_loss": loss})
        if (variant, seed) not in unfinished:
            rows.append({"variant": variant, "seed": seed, "step": step, "event": "done", "train_s": x})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def test_a_curve_claim_pairs_seeds_at_the_largest_point_every_finished_run_reached(tmp_path) -> None:
    """At equal FLOPs: the point is the least of every finished run's last (b stops at 100; b's seed 2
    was interrupted at 50 and counts for nothing); the means and the spread (sample sd of the per-seed
    differences, n - 1) are over the seeds both variants ran (a's seed 3 has no partner)."""
    from nanoseek.ablate_report import StudyMetrics, judge

    curves = {
        ("a", 0): [(0, 4.0), (100, 3.0), (200, 2.0)],
        ("a", 1): [(0, 4.0), (100, 3.2), (200, 2.2)],
        ("a", 3): [(0, 4.0), (100, 1.0), (200, 1.0)],
        ("b", 0): [(0, 4.0), (100, 3.5)],
        ("b", 1): [(0, 4.0), (100, 3.4)],
        ("b", 2): [(0, 4.0), (50, 9.0)],
    }
    m = StudyMetrics(_study(tmp_path, curves, unfinished=(("b", 2),)))
    claim = {"a": "a", "b": "b", "metric": "val_loss", "kind": "lower", "at": "curve"}
    sd = ((0.15**2 + 0.15**2) / 1) ** 0.5  # differences -0.5 and -0.2 about their mean -0.35
    assert judge(m, claim, "flops") == (f"a 3.1000 vs b 3.4500: Δ -0.3500 ± {sd:.4f} at 100 FLOPs", "yes")
    # the MTP study's claims are judged on the main model's FLOPs (here half of all of them)
    assert judge(m, {**claim, "flops_axis": "main_flops"}, "flops")[0].endswith("at 50 main-model FLOPs")
    m.curves["a"][1][1]["val_loss"] = 4.0  # seed 1 now contradicts the claim
    assert judge(m, claim, "flops")[1] == "inconclusive (seeds disagree)"


def test_claim_verdicts_at_their_boundaries(tmp_path) -> None:
    """match: |a - b| / b <= tol, the end included, reported relative to b; not_worse: one-sided (a
    far better is not worse); a tie is no win; fixed: strictly lower."""
    from nanoseek.ablate_report import StudyMetrics, judge

    curves = {
        ("c", 0): [(0, 4.0), (10, 3.0)],
        ("d", 0): [(0, 4.0), (10, 2.0)],
        ("e", 0): [(0, 4.0), (10, 2.0)],
    }
    m = StudyMetrics(_study(tmp_path, curves, variants={"c": {"kv": 10}, "d": {"kv": 10}, "e": {"kv": 20}}))
    final = {"metric": "val_loss", "at": "final"}
    assert judge(m, {**final, "a": "c", "b": "d", "kind": "match", "tol": 0.5}, None) == (
        "c 3.0000 vs d 2.0000: +50.00% (final)",
        "yes (1 seed)",
    )
    assert (
        judge(m, {**final, "a": "d", "b": "c", "kind": "not_worse", "tol": 0.01}, None)[1] == "yes (1 seed)"
    )
    assert judge(m, {**final, "a": "d", "b": "e", "kind": "lower"}, None)[1] == "inconclusive (tie)"
    fixed = {"metric": "kv", "kind": "fixed", "at": "final"}
    assert judge(m, {**fixed, "a": "c", "b": "d"}, None)[1] == "no"
    assert judge(m, {**fixed, "a": "c", "b": "e"}, None) == ("c 10 vs e 20 (50%)", "yes")


def test_seeds_and_token_budgets_are_never_cut_short() -> None:
    # --seeds 0 would run nothing and write an empty report; a token budget is rounded up to whole steps
    with pytest.raises(ValueError, match="--seeds"):
        AblateConfig(study="moe", seeds=0).validate()
    assert Budget("tokens", TOKENS_PER_STEP + 1).steps() == 2
    assert Budget("tokens", 1).steps() == 1


def test_no_shared_widens_the_routed_groups_when_they_cannot_hold_its_top_k(tmp_path) -> None:
    """no-shared routes top-(k + s): where the top `topk_group` groups hold fewer experts than that,
    it may pick from every group (tiny with topk_group 1: 1 group of 4 experts, top-5 needed)."""
    from nanoseek.config import resolve_config

    resolve_config("tiny").replace(topk_group=1).save(tmp_path)
    v = {r.variant: r.config for r in plan("moe", seeds=1, preset=str(tmp_path))}
    assert v["no-shared"].topk_group == v["no-shared"].n_group == 4
    for name, c in v.items():
        if c.is_moe:  # the router can always fill its top-k from the groups it keeps
            assert c.topk_group * (c.n_routed_experts // c.n_group) >= c.num_experts_per_tok, name


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_gqa_head_dim_is_the_even_width_nearest_mla_parameters(preset: str) -> None:
    """Each GQA variant's head_dim is the even width whose q/k/v/o weights come closest to MLA's
    attention weights (tiny: 31.0, 41.3, 49.6 -> 32, 42, 50)."""
    from nanoseek.accounting import _attention_params

    v = {r.variant: r.config for r in plan("mla", seeds=1, preset=preset)}
    mla = _attention_params(v["mla"])[0]
    for name in ("mha", "gqa", "mqa"):
        c = v[name]
        gap = {
            d: abs(_attention_params(c.replace(head_dim=d))[0] - mla)
            for d in (c.head_dim - 2, c.head_dim + 2)
        }
        assert abs(_attention_params(c)[0] - mla) <= min(gap.values()), (name, c.head_dim)
    if preset == "tiny":
        assert [v[n].head_dim for n in ("mha", "gqa", "mqa")] == [32, 42, 50]


def test_fp8_study_trains_each_variant_in_its_named_precision() -> None:
    # "auto" would train the bf16 variant in fp32 on a CPU without native bf16: bf16 vs fp32 then
    # compares fp32 with itself
    assert {r.variant: r.train.precision for r in plan("fp8", seeds=1)} == {
        "bf16": "bf16",
        "fp8": "fp8",
        "fp32": "fp32",
    }


def test_a_preset_with_short_positions_is_stretched_to_the_sequence_length(tmp_path) -> None:
    from nanoseek.ablate import SEQ_LEN
    from nanoseek.config import resolve_config

    resolve_config("tiny").replace(max_position_embeddings=128).save(tmp_path)
    assert {r.config.max_position_embeddings for r in plan("fp8", seeds=1, preset=str(tmp_path))} == {SEQ_LEN}


def test_settings_diff_counts_a_setting_only_one_side_has() -> None:
    assert settings_diff({"a": 1, "b": 2}, {"a": 1}) == {"b"}
    assert settings_diff({}, {"c": None}) == set()  # absent reads as None, as ModelConfig's defaults


def test_report_header_states_budget_seeds_runs_and_training_time(tmp_path, monkeypatch) -> None:
    _fake_training(monkeypatch, [])
    report = run_study(AblateConfig(study="mla", seeds=2, out=str(tmp_path), progress=False), "mla")
    # the fake's done rows: 1.0 s of training each, 4 variants x 2 seeds
    steps = get_study("mla").default_budget.steps()
    header = (
        f"{steps * TOKENS_PER_STEP:,} tokens ({steps} steps) per run, seeds 0, 1; 8 finished runs, 0.1 min"
    )
    assert header in report.read_text()


def test_resume_after_the_preset_config_changed_is_refused(tmp_path, monkeypatch) -> None:
    # --preset names a config directory: the same name can hold another model on the next run
    from nanoseek.config import resolve_config

    _fake_training(monkeypatch, [])
    preset = tmp_path / "model"
    resolve_config("tiny").save(preset)
    cfg = AblateConfig(
        study="balance", seeds=1, out=str(tmp_path / "runs"), preset=str(preset), progress=False
    )
    run_study(cfg, "balance")
    resolve_config("tiny").replace(num_hidden_layers=3).save(preset)
    with pytest.raises(ValueError, match="variants differs"):
        run_study(cfg, "balance")


def test_mtp_resume_refuses_another_accuracy_measure_and_only_mtp_measures_it(tmp_path, monkeypatch) -> None:
    calls: list = []
    import nanoseek.ablate as ab

    _fake_training(monkeypatch, [])
    fake = ab.train_run

    def record(run, *args, **kw):
        calls.append((run.study, kw["acc_n"]))
        return fake(run, *args, **kw)

    monkeypatch.setattr(ab, "train_run", record)
    cfg = AblateConfig(study="mtp", seeds=1, acc_n=3, out=str(tmp_path), progress=False)
    run_study(cfg, "mtp")
    run_study(AblateConfig(study="balance", seeds=1, acc_n=3, out=str(tmp_path), progress=False), "balance")
    # greedy accuracy is the mtp study's measure: the other studies' runs skip it
    assert calls == [("mtp", 3)] * 2 + [("balance", 0)] * 3
    for other in ({"acc_n": 4}, {"max_new_tokens": 64}):
        with pytest.raises(ValueError, match="evaluation differs"):
            run_study(
                AblateConfig(
                    study="mtp", seeds=1, out=str(tmp_path), progress=False, **{"acc_n": 3, **other}
                ),
                "mtp",
            )


def test_value_and_higher_claims(tmp_path) -> None:
    """value: a seed at the paper's lower end or above its range supports the claim; higher: a above b."""
    from nanoseek.ablate_report import StudyMetrics, judge

    curves = {
        ("a", 0): [(0, 0.1), (10, 0.85)],
        ("a", 1): [(0, 0.1), (10, 0.95)],
        ("b", 0): [(0, 0.1), (10, 0.80)],
        ("b", 1): [(0, 0.1), (10, 0.90)],
    }
    m = StudyMetrics(_study(tmp_path, curves))
    value = {"a": "a", "b": None, "metric": "val_loss", "kind": "value", "at": "final", "lo": 0.85, "hi": 0.9}
    sd = (2 * 0.05**2) ** 0.5
    assert judge(m, value, None) == (f"a: 0.900 ± {sd:.3f} (final)", "yes")
    assert judge(m, {**value, "a": "b"}, None)[1] == "inconclusive (seeds disagree)"  # 0.80 below, 0.90 in
    higher = {"a": "a", "b": "b", "metric": "val_loss", "kind": "higher", "at": "final"}
    assert judge(m, higher, None)[1] == "yes"
    assert judge(m, {**higher, "a": "b", "b": "a"}, None)[1] == "no"


def test_report_says_where_a_technique_wins_per_flop_but_not_per_second(tmp_path) -> None:
    from nanoseek.ablate_report import StudyMetrics, _plain_words

    curves = {("a", 0): [(0, 4.0), (100, 2.0)], ("b", 0): [(0, 4.0), (100, 3.0)]}
    m = StudyMetrics(_study(tmp_path, curves))
    m.plan["claims"] = [
        {
            "text": "a wins",
            "source": "s",
            "size": "z",
            "a": "a",
            "b": "b",
            "metric": "val_loss",
            "kind": "lower",
            "at": "curve",
        }
    ]
    m.curves["a"][0][-1]["train_s"] = 200  # a's steps take twice as long: at 100 s both read 3.0
    assert _plain_words(m) == [
        "- **a wins per FLOP but not per wall second on this machine** (a wins): per second the verdict is "
        "'inconclusive (tie)'."
    ]


def test_variant_and_violation_tables_of_an_moe_study(tmp_path) -> None:
    """The max violation column appears where runs measured it; layers are in numeric order (10 after 2)."""
    from nanoseek.ablate_report import StudyMetrics, _precision_note, variant_table, violation_table

    facts = {
        "about": "x",
        "total_params": 1,
        "active_params": 1,
        "flops_per_token": 1,
        "kv_cache_bytes_per_token": 1,
    }
    m = StudyMetrics(_study(tmp_path, {("a", 0): [(0, 4.0), (10, 3.0)]}, variants={"a": facts}))
    m.curves["a"][0][-1].update(max_violation=0.5, max_violation_per_layer={"2": 0.5, "10": 0.1, "1": 0.2})
    m.done["a"][0]["s_per_step"] = 1.0
    assert variant_table(m)[0].endswith("| s/step | max violation |")
    assert variant_table(m)[2].endswith("| 0.500 |")
    assert "| variant | layer 1 | layer 2 | layer 10 |" in violation_table(m)
    # one precision per variant where they differ (the fp8 study), one word where they agree
    m.done = {"bf16": {0: {"precision": "bf16"}}, "fp32": {0: {"precision": "fp32"}}}
    assert _precision_note(m) == " Trained in bf16 bf16, fp32 fp32."


# ------------------------------------------------------------- interrupts
@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    """A micro MLA preset and a tokenizer, for studies that really train in a few seconds."""
    import sys

    from nanoseek.data.corpus import iter_documents
    from nanoseek.tokenizer import train_tokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_loop import micro_model

    d = tmp_path_factory.mktemp("ablate")
    docs = [doc for _, doc in zip(range(400), iter_documents("embedded"), strict=False)]
    tok = train_tokenizer(docs, vocab_size=320)
    tok.save(d / "tok")
    micro_model().config.replace(vocab_size=tok.vocab_size).save(d / "micro")
    return d


def _micro_study(monkeypatch, micro: Path) -> None:
    """Real runs of the micro preset on batches of 2 x 32 tokens: 3 steps for a 192-token budget."""
    import functools

    import nanoseek.ablate as ab
    from nanoseek.tokenizer import load_tokenizer

    monkeypatch.setattr(ab, "SEQ_LEN", 32)
    monkeypatch.setattr(ab, "BATCH", 2)
    monkeypatch.setattr(ab, "TOKENS_PER_STEP", 64)
    monkeypatch.setattr(ab, "TrainSettings", functools.partial(ab.TrainSettings, batch_size=2, seq_len=32))
    monkeypatch.setattr(ab, "_tokenizer", lambda out, docs: load_tokenizer(micro / "tok"))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_study_keeping_finished_runs_and_a_rerun_finishes_it(
    micro, tmp_path, monkeypatch, capsys, sig
) -> None:
    """Ctrl-C raised a KeyboardInterrupt wherever it fell ("interrupted", no word on what was kept or how
    to go on) and a SIGTERM killed the study outright: it now stops at the next step boundary, keeps the
    finished runs, drops the stopped one's rows (it starts over) and says how to continue."""
    import os
    import signal

    import torch

    from nanoseek.cli import main
    from nanoseek.train.loop import Trainer

    signum = getattr(signal, sig)
    before = signal.getsignal(signum), torch.get_num_threads()
    _micro_study(monkeypatch, micro)
    torch.set_num_threads(1)
    runs: list = []
    step = Trainer.step

    def step_then_signal(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        if self.global_step == 1:
            runs.append(self)
            if len(runs) == 2:  # the second run's first step: the first run has finished
                os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(Trainer, "step", step_then_signal)
    out = tmp_path / "runs"
    args = ["ablate", "mtp", "--out", str(out), "--preset", str(micro / "micro"), "--budget", "192"]
    args += ["--seeds", "1", "--val-batches", "1", "--acc-n", "0", "--no-progress"]
    try:
        assert main(args) == 128 + signum
        directory = out / "ablate" / "mtp"
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            f"ablate mtp (no-mtp seed 0) stopped by {sig} at step 1 of 3: 1 of 2 runs finished, kept in "
            f"{directory}; this run starts over; resume with: nanoseek {' '.join(args)}"
        ) in err[-1]
        assert signal.getsignal(signum) is before[0]
        # the results file holds the finished run only, whole
        rows = [json.loads(x) for x in (directory / "metrics.jsonl").read_text().splitlines()]
        assert {r["variant"] for r in rows} == {"mtp"} and rows[-1]["event"] == "done"
        runs.clear()
        assert main(args) == 0
        assert finished_runs(directory) == {("mtp", 0), ("no-mtp", 0)}
        assert "1 already finished" in capsys.readouterr().out
        assert (directory / "report.md").exists()
    finally:
        torch.set_num_threads(before[1])


def test_a_variant_that_diverges_is_recorded_and_the_report_names_it(micro, tmp_path, monkeypatch) -> None:
    """A diverging variant stopped the study with the trainer's advice (an --lr ablate has not, a scratch
    checkpoint already deleted); a rerun diverged again, so the study never had a report. It is now
    recorded as a finished run that diverged, and the claims that need it say so."""
    import torch

    import nanoseek.ablate as ab

    _micro_study(monkeypatch, micro)
    settings = ab.TrainSettings
    # no-mtp (mtp_weight 0) at an absurd learning rate: its steps go non-finite and the guard gives up
    monkeypatch.setattr(
        ab, "TrainSettings", lambda **kw: settings(**kw, lr=1e4 if kw["mtp_weight"] == 0 else 3e-3)
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = AblateConfig(
            study="mtp",
            budget="896",
            seeds=1,
            out=str(tmp_path),
            preset=str(micro / "micro"),
            acc_n=0,
            val_batches=1,
            progress=False,
        )
        report = run_study(cfg, "mtp").read_text()
    finally:
        torch.set_num_threads(threads)
    directory = tmp_path / "ablate" / "mtp"
    assert finished_runs(directory) == {("mtp", 0), ("no-mtp", 0)}  # a rerun does not retry it
    (main,) = [r for r in _summary_rows(report) if r.startswith("| MTP improves the main model")]
    assert main.count("not run: no-mtp seed 0 diverged") == 2
    (row,) = [line for line in report.splitlines() if line.startswith("| no-mtp |")]
    assert "| 1 (1 diverged) |" in row


def test_a_study_whose_every_run_diverged_links_no_empty_plots(tmp_path, monkeypatch) -> None:
    """Every run diverged: the report linked three empty frames (matplotlib warning of a legend with
    nothing in it) as its plots; it says there is no curve to plot instead."""
    _fake_training(monkeypatch, [], diverged="loss nan")
    report = run_study(AblateConfig(study="mla", seeds=1, out=str(tmp_path), progress=False), "mla")
    text = report.read_text()
    assert "![" not in text
    assert "No validation curve to plot: no run of this study finished without diverging." in text
    assert not list((report.parent / "plots").glob("*.png"))


# ------------------------------------------------------------------ properties (hypothesis)
_LOSS = st.integers(0, 4000).map(lambda i: i / 1000)
# a run's curve: evaluated at 0 and at increasing FLOP counts after (as `nanoseek ablate` evaluates)
_CURVE = st.lists(st.tuples(st.integers(1, 50), _LOSS), min_size=1, max_size=5).flatmap(
    lambda steps: _LOSS.map(
        lambda first: (
            [(0, first)] + [(sum(s for s, _ in steps[: i + 1]), y) for i, (_, y) in enumerate(steps)]
        )
    )
)


def _interpolated(x: float, points: list) -> float:
    """A curve's value at x by straight lines between its points (x within them)."""
    (x0, y0), (x1, y1) = next((p, q) for p, q in zip(points, points[1:], strict=False) if q[0] >= x)
    return y1 if x == x1 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    a=st.dictionaries(st.integers(0, 3), _CURVE, min_size=1, max_size=3),
    b=st.dictionaries(st.integers(0, 3), _CURVE, min_size=1, max_size=3),
    kind=st.sampled_from(["lower", "higher"]),
)
def test_a_curve_claim_is_the_seeds_paired_difference_at_the_point_every_run_reached(
    tmp_path_factory, a, b, kind
) -> None:
    """Whatever the curves: the point is the least last FLOP count of every run, each run's value there
    is its curve's straight line (its own measurement where it was evaluated there), the means, the
    mean difference and its sample sd are over the seeds both variants ran, and the verdict is yes where
    every seed agrees with the claim, no where every one contradicts it."""
    from nanoseek.ablate_report import StudyMetrics, judge

    curves = {**{("a", s): c for s, c in a.items()}, **{("b", s): c for s, c in b.items()}}
    m = StudyMetrics(_study(tmp_path_factory.mktemp("study"), curves))
    x = min(c[-1][0] for c in curves.values())
    at = {key: _interpolated(x, c) for key, c in curves.items()}
    for (variant, seed), c in curves.items():
        if x in dict(c):
            assert m.at(variant, "flops", x)[seed] == dict(c)[x]
    measured, verdict = judge(
        m, {"a": "a", "b": "b", "metric": "val_loss", "kind": kind, "at": "curve"}, "flops"
    )
    seeds = sorted(set(a) & set(b))
    if not seeds:
        assert (measured, verdict) == ("–", "not run")
        return
    diffs = [at[("a", s)] - at[("b", s)] for s in seeds]
    said = re.fullmatch(r"a (\S+) vs b (\S+): Δ (\S+)(?: ± (\S+))? at (\S+) FLOPs", measured)
    assert said and float(said[5]) == float(f"{x:.3g}"), measured
    assert (said[4] is None) == (len(seeds) == 1)
    means = [statistics.fmean(at[(v, s)] for s in seeds) for v in "ab"] + [statistics.fmean(diffs)]
    for shown, value in zip(
        said.groups(), means + ([statistics.stdev(diffs)] if len(seeds) > 1 else []), strict=False
    ):
        assert math.isclose(float(shown), value, abs_tol=6e-5), (measured, value)
    if any(0 < abs(d) < 1e-9 for d in diffs):
        return  # two interpolations all but tied: rounding decides it either way
    agree = [0 if d == 0 else (1 if (d < 0) == (kind == "lower") else -1) for d in diffs]
    assert verdict.split(" (")[0] == ("yes" if min(agree) > 0 else "no" if max(agree) < 0 else "inconclusive")


def test_a_run_evaluated_at_the_common_point_is_judged_on_its_own_measurement(tmp_path) -> None:
    """The common point is the shortest run's last evaluation: its value there was interpolated as
    0.009 + 1 x (0.001 - 0.009) = 0.0010000000000000009, so two variants that measured the same 0.001
    there were judged "no" (a worse) instead of a tie."""
    from nanoseek.ablate_report import StudyMetrics, judge

    m = StudyMetrics(_study(tmp_path, {("a", 0): [(0, 0.0), (1, 0.001)], ("b", 0): [(0, 0.009), (1, 0.001)]}))
    assert m.at("b", "flops", 1) == {0: 0.001}
    claim = {"a": "a", "b": "b", "metric": "val_loss", "kind": "lower", "at": "curve"}
    assert judge(m, claim, "flops")[1] == "inconclusive (tie)"
