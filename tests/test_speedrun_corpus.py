"""The speedrun's pretraining corpus: its families, and those drawn more often (`pretrain_weights`)."""

import contextlib
import dataclasses
import itertools
import re
import time
from pathlib import Path

import pytest

from nanoseek.data.corpus import embedded_tasks
from nanoseek.data.synthetic import iter_documents
from nanoseek.speedrun import DONE, PRESETS, Speedrun


def test_cpu_corpus_draws_sorting_twice_as_often(tmp_path):
    preset = PRESETS["cpu"]
    source = Speedrun(tmp_path, preset, progress=False).pretrain_data()
    names = embedded_tasks(source)
    assert sorted(set(names)) == sorted(preset.tasks)
    assert names.count("sorting") == 2 and all(names.count(t) == 1 for t in preset.tasks if t != "sorting")
    # asked in each family's first sentence, so that a sorting document is told by its question
    docs = list(itertools.islice(iter_documents(seed=0, tasks=[f"{n}?wording=first" for n in names]), 4000))
    share = sum(d.startswith("<｜User｜>Sort") or "小さい順" in d or "从小到大" in d for d in docs) / len(
        docs
    )
    assert abs(share - 2 / 8) < 0.03, share  # 2 of 8 draws, where an unweighted family gets 1 of 8


def test_weights_of_families_outside_the_run_are_ignored_and_bad_weights_named(tmp_path):
    smoke = PRESETS["smoke"]  # addition and comparison only: the sorting weight has nothing to weigh
    assert Speedrun(tmp_path, smoke, progress=False).pretrain_data() == "embedded:addition,comparison"
    with pytest.raises(ValueError, match="pretrain_weights"):  # refused before any stage runs
        dataclasses.replace(smoke, pretrain_weights={"addition": 0})
    with pytest.raises(ValueError, match="grpo_task_sampling"):  # not only when GRPO starts, minutes later
        dataclasses.replace(smoke, grpo_task_sampling="unsolve")
    with pytest.raises(ValueError, match="grpo_loss"):
        dataclasses.replace(smoke, grpo_loss="dr-grpo")
    with pytest.raises(ValueError, match="grpo_sft_mix_tasks"):  # worked solutions of a family not in the run
        dataclasses.replace(smoke, grpo_sft_mix_tasks=("counting",))
    with pytest.raises(ValueError, match="grpo_keep_tasks"):  # a family the run never draws
        dataclasses.replace(smoke, grpo_keep_tasks=("sorting",))
    with pytest.raises(ValueError, match="control_plan_steps"):
        dataclasses.replace(smoke, control_plan_steps=0)


def test_resuming_a_run_whose_data_another_nanoseek_wrote_is_refused(tmp_path, monkeypatch, capsys):
    """A run directory records how its nanoseek writes the data; a nanoseek that writes a family's
    worked solution otherwise (as sorting's changed, crossed out in place) must not add stages to it."""
    import json

    from nanoseek.data import synthetic
    from nanoseek.data.tasks.families import SortingTask

    preset = PRESETS["smoke"]
    Speedrun(tmp_path, preset, progress=False)._claim_directory()
    settings = json.loads((tmp_path / "speedrun.json").read_text())
    assert len(settings["data_formats"]) == 16
    Speedrun(tmp_path, preset, progress=False)._claim_directory()  # the same nanoseek resumes it
    # sorting is not among smoke's tasks: its problems still count (the verifier-only family's, too)
    run = Speedrun(tmp_path, dataclasses.replace(preset, tasks=(*preset.tasks, "sorting")), progress=False)
    digest = run.data_formats()
    monkeypatch.setattr(SortingTask, "steps", lambda self, d, lang: "sorted, no steps")
    assert run.data_formats() != digest
    monkeypatch.undo()
    # how a chat of several questions is composed counts where the corpus has them
    one_question = dataclasses.replace(run.p, pretrain_multi_turn=0.0, student_multi_turn=0.0)
    several = Speedrun(tmp_path, dataclasses.replace(one_question, pretrain_multi_turn=0.05), progress=False)
    digests = Speedrun(tmp_path, one_question, progress=False).data_formats(), several.data_formats()
    monkeypatch.setattr(synthetic, "CHAT_CHARS", 200)  # fewer questions fit a chat
    assert Speedrun(tmp_path, one_question, progress=False).data_formats() == digests[0]
    assert several.data_formats() != digests[1]
    monkeypatch.undo()
    monkeypatch.setattr(
        type(run), "data_formats", lambda self: "0" * 16
    )  # as a nanoseek that writes any of the data otherwise
    with pytest.raises(ValueError, match="writes the corpus, worked solutions or prompts"):
        Speedrun(tmp_path, preset, progress=False)._claim_directory()
    # a directory from before the digest was recorded: resumed, with a warning
    del settings["data_formats"]
    (tmp_path / "speedrun.json").write_text(json.dumps(settings))
    Speedrun(tmp_path, preset, progress=False)._claim_directory()
    assert "did not record how it writes its data" in capsys.readouterr().err  # a warning: on stderr


@pytest.mark.parametrize(
    ("name", "field"), [("smoke", "engine_batch"), ("gpu", "engine_batch"), ("smoke", "eval_unseen_n")]
)
def test_a_setting_added_since_a_run_started_resumes_at_its_default(tmp_path, name, field):
    """A run started before a preset setting existed resumes while the setting keeps its run's preset's
    default (a gpu or smoke run's, not the cpu preset's); a changed value is still refused."""
    import json

    preset = PRESETS[name]
    Speedrun(tmp_path, preset, progress=False)._claim_directory()
    settings = json.loads((tmp_path / "speedrun.json").read_text())
    del settings[field]  # as a nanoseek from before `field` recorded it
    (tmp_path / "speedrun.json").write_text(json.dumps(settings))
    Speedrun(tmp_path, preset, progress=False)._claim_directory()
    other = getattr(preset, field) + 1
    with pytest.raises(ValueError, match=rf"{field} None -> {other}"):
        Speedrun(tmp_path, dataclasses.replace(preset, **{field: other}), progress=False)._claim_directory()


def _pretrain_configs(tmp_path, monkeypatch, preset):
    """The PretrainConfig the speedrun hands the teacher's and the student's pretraining, by model."""
    import nanoseek.train.pretrain

    seen = {}

    class Stop(Exception):
        pass

    def fake_pretrain(cfg, on_step=None):
        seen[cfg.preset] = cfg
        raise Stop

    monkeypatch.setattr(nanoseek.train.pretrain, "pretrain", fake_pretrain)
    run = Speedrun(tmp_path, preset, progress=False)
    for student in (False, True):
        with pytest.raises(Stop):
            run.pretrain(student=student)
    return seen


@pytest.mark.parametrize(("student_lr", "expected"), [(0.0, 3e-3), (5e-3, 5e-3)])
def test_the_student_pretrains_at_its_own_lr_and_the_teacher_at_pretrain_lr(
    tmp_path, monkeypatch, student_lr, expected
):
    """`student_lr` is the student's alone (0: the teacher's): the gpu preset's wider teacher takes a
    lower lr than the dense student shared with the cpu preset."""
    preset = dataclasses.replace(PRESETS["smoke"], pretrain_lr=3e-3, student_lr=student_lr)
    seen = _pretrain_configs(tmp_path, monkeypatch, preset)
    assert {name: cfg.lr for name, cfg in seen.items()} == {preset.model: 3e-3, preset.student: expected}
    steps = {preset.model: preset.pretrain_steps, preset.student: preset.student_steps}
    assert {name: cfg.steps for name, cfg in seen.items()} == steps
    assert PRESETS["gpu"].student_lr == 3e-3 and PRESETS["cpu"].student_lr == 0.0


@pytest.mark.parametrize("name", [name for name, p in PRESETS.items() if p.control])
def test_the_control_plan_finds_enough_distinct_worked_solutions(tmp_path, name):
    """The control beside GRPO builds fresh worked solutions for its whole first plan; a plan larger than
    a family's distinct training problems would stop it at its start (400 steps asked linear equations
    for 1,714 where they had 1,539; 350 steps, 1,500 where they have 1,212)."""
    from nanoseek.train.sft import task_conversations

    preset = PRESETS[name]
    n = Speedrun(tmp_path, preset, progress=False)._control_examples(preset.control_plan_steps)
    assert len(task_conversations(",".join(preset.tasks), n, seed=preset.seed)) >= n - len(preset.tasks)


def test_the_control_alone_gets_grpos_wall_time_over_every_process_that_ran_it(tmp_path, monkeypatch):
    """The control run after GRPO trains for GRPO's wall time: a GRPO killed and resumed ran in two
    processes, and the control got the last one's seconds only (its marker's), where the report shows
    GRPO's over both."""
    from nanoseek.metrics import MetricsLog
    from nanoseek.report import RunMetrics

    run = Speedrun(tmp_path, PRESETS["smoke"], progress=False)
    log = MetricsLog(tmp_path, "grpo")
    log.log(0, event="start")
    for step in (1, 2, 3):  # the first process, killed after step 3 (its checkpoint: step 2)
        log.log(step, loss=0.1, reward=0.5, wall_time_s=100.0 * step)
    log.log(event="resume", from_step=2)
    for step in (3, 4):
        log.log(step, loss=0.1, reward=0.5, wall_time_s=50.0 * (step - 2))
    log.log(event="end", wall_time_s=100.0)
    run._mark_done("grpo", 120.0)
    asked = {}
    monkeypatch.setattr(Speedrun, "sft", lambda self, **kw: asked.update(kw) or {})
    fields = run.control()
    assert asked["max_seconds"] == fields["matched_wall_time_s"] == 300.0 + 120.0
    assert RunMetrics(tmp_path).wall_time("grpo") == 420.0  # what the report shows beside it


def test_chats_of_several_questions_are_one_switch_each_for_sft_and_grpo(tmp_path, monkeypatch):
    """`sft_multi_turn` reaches the cold start (and the control, an SFT run too); `grpo_second_turn`
    adds each family asked second in a chat to GRPO's tasks (off in the cpu and gpu presets)."""
    import nanoseek.train.grpo as grpo_mod
    import nanoseek.train.sft as sft_mod

    seen = {}
    monkeypatch.setattr(
        sft_mod, "sft", lambda cfg, deadline_fn=None: seen.setdefault("sft", cfg) and tmp_path
    )
    monkeypatch.setattr(grpo_mod, "grpo", lambda cfg, on_step=None: seen.setdefault("grpo", cfg))
    assert PRESETS["cpu"].sft_multi_turn == 0.0 and not PRESETS["cpu"].grpo_second_turn
    assert not PRESETS["gpu"].grpo_second_turn and PRESETS["smoke"].grpo_second_turn  # CI runs the path
    preset = dataclasses.replace(PRESETS["smoke"], sft_multi_turn=0.3, grpo_second_turn=True)
    run = Speedrun(tmp_path, preset, progress=False)
    run.sft()
    run.grpo()
    assert seen["sft"].multi_turn == 0.3
    assert seen["grpo"].tasks == [*run.all_tasks, *(f"{t}?turn=2" for t in run.all_tasks)]


@pytest.mark.parametrize("second_turn", [False, True])
def test_grpos_start_is_asked_second_too_where_grpo_drew_those_prompts(tmp_path, monkeypatch, second_turn):
    """The evaluation asks the final model each family second in a chat; with `grpo_second_turn` it
    asks GRPO's start (SFT) too, so the report can give GRPO's gain there."""
    import nanoseek.speedrun as speedrun_mod

    asked = []

    def fake_evaluate(out, preset, stage, tasks, progress):
        for task in tasks:
            asked.append((stage, task))
            log = Path(out) / "eval" / ".logs" / speedrun_mod._job_name(stage, task)
            log.mkdir(parents=True)
            (log / "metrics.jsonl").write_text("")
        return [{"pass@1": 0.5, "pass@1_stderr": 0.0, "format_rate": 1.0} for _ in tasks]

    monkeypatch.setattr(speedrun_mod, "_evaluate_checkpoint", fake_evaluate)
    monkeypatch.setattr(Speedrun, "overlaps", lambda self: False)  # one process: the fake is seen
    preset = dataclasses.replace(PRESETS["smoke"], grpo_second_turn=second_turn)
    run = Speedrun(tmp_path, preset, progress=False)
    for stage in ("sft", "grpo"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.json").write_text("{}")
    run.evaluate()
    stages = ("sft", "grpo") if second_turn else ("grpo",)
    assert [job for job in asked if "?turn=" in job[1]] == [
        (stage, f"{t}?turn=2") for stage in stages for t in run.all_tasks
    ]
    assert [job for job in asked if "?wording=" in job[1]] == [
        ("grpo", f"{t}?wording=unseen") for t in run.all_tasks
    ]
    asked.clear()  # neither asked where the preset asks none
    Speedrun(
        tmp_path, dataclasses.replace(preset, eval_unseen_n=0, eval_second_turn_n=0), progress=False
    ).evaluate()
    assert not [job for job in asked if "?" in job[1]] and len(asked) == 2 * len(run.all_tasks)


def test_an_evaluation_whose_scores_do_not_vary_prints_no_interval(tmp_path, monkeypatch, capsys):
    """Every problem failed (a standard error of 0): the run's line said "0.0% ± 0.0 (95%)", which reads
    as certainty; the report shows no interval there, and neither does the line now."""
    import nanoseek.speedrun as speedrun_mod

    def fake_evaluate(out, preset, stage, tasks, progress):
        for task in tasks:
            log = Path(out) / "eval" / ".logs" / speedrun_mod._job_name(stage, task)
            log.mkdir(parents=True)
            (log / "metrics.jsonl").write_text("")
        return [
            {"pass@1": 0.5 if stage == "grpo" else 0.0, "pass@1_stderr": 0.05 if stage == "grpo" else 0.0}
            | {"format_rate": 1.0}
            for _ in tasks
        ]

    monkeypatch.setattr(speedrun_mod, "_evaluate_checkpoint", fake_evaluate)
    monkeypatch.setattr(Speedrun, "overlaps", lambda self: False)  # one process: the fake is seen
    preset = dataclasses.replace(PRESETS["smoke"], eval_unseen_n=0, eval_second_turn_n=0)
    run = Speedrun(tmp_path, preset, progress=False)
    for stage in ("sft", "grpo"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.json").write_text("{}")
    run.evaluate()
    out = capsys.readouterr().out
    assert f"  eval sft      {run.all_tasks[0]}: pass@1 0.0%, format 100.0%" in out, out
    assert f"  eval grpo     {run.all_tasks[0]}: pass@1 50.0% ± 9.8 (95%), format 100.0%" in out, out
    assert "± 0.0" not in out


def test_chats_of_several_questions_reach_the_teachers_pretraining(tmp_path, monkeypatch):
    """`pretrain_multi_turn` is the share of several-question chats in the teacher's corpus; the dense
    student pretrains on one-question chats (it learns from the teacher's one-question traces)."""
    preset = dataclasses.replace(PRESETS["smoke"], pretrain_multi_turn=0.1)
    seen = _pretrain_configs(tmp_path, monkeypatch, preset)
    assert {name: cfg.multi_turn for name, cfg in seen.items()} == {preset.model: 0.1, preset.student: 0.0}
    preset = dataclasses.replace(preset, student_multi_turn=0.05)  # the student's own share
    seen = _pretrain_configs(tmp_path / "student", monkeypatch, preset)
    assert {name: cfg.multi_turn for name, cfg in seen.items()} == {preset.model: 0.1, preset.student: 0.05}
    assert PRESETS["cpu"].pretrain_multi_turn == 0.05 and PRESETS["gpu"].pretrain_multi_turn == 0.0


def test_the_speedrun_command_sets_the_share_of_several_question_chats(tmp_path, monkeypatch, capsys):
    import nanoseek.speedrun
    from nanoseek.cli import main

    seen = {}
    monkeypatch.setattr(
        nanoseek.speedrun, "run_speedrun", lambda out, preset, progress, **kw: seen.update(kw)
    )
    assert main(["speedrun", "--out", str(tmp_path), "--multi-turn", "0"]) == 0
    assert seen["pretrain_multi_turn"] == 0.0
    seen.clear()
    assert main(["speedrun", "--out", str(tmp_path)]) == 0
    assert "pretrain_multi_turn" not in seen and "grpo_second_turn" not in seen  # the preset's own
    for flag, value in (("--grpo-second-turn", True), ("--no-grpo-second-turn", False)):
        assert main(["speedrun", "--out", str(tmp_path), flag]) == 0
        assert seen["grpo_second_turn"] is value
    with pytest.raises(ValueError, match=r"pretrain_multi_turn must be in \[0, 1\], got 1.5"):
        dataclasses.replace(PRESETS["cpu"], pretrain_multi_turn=1.5)


def test_tasks_runs_the_families_named_with_the_presets_lists_cut_to_them(tmp_path, monkeypatch):
    """`nanoseek speedrun --tasks`: the families named replace the preset's, and every per-family
    setting of the preset keeps only those (it refused any list but the preset's own before)."""
    import nanoseek.train.grpo as grpo_mod
    from nanoseek.cli import main

    ran = []
    monkeypatch.setattr(Speedrun, "__call__", lambda self: ran.append(self.p) or tmp_path)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the gpu preset runs on one only
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda including_emulation=True: True)
    for preset in PRESETS:
        for flag, tasks, zero in (
            ("addition", ("addition",), ()),
            ("addition,sorting", ("addition", "sorting"), ()),
            ("sorting, addition,largest,addition", ("sorting", "addition"), ("largest",)),
        ):
            assert main(["speedrun", "--preset", preset, "--tasks", flag, "--out", str(tmp_path)]) == 0
            p = ran.pop()
            assert (p.tasks, p.verifier_only_tasks) == (tasks, zero)
            assert set(p.grpo_sft_mix_tasks) | set(p.grpo_keep_tasks) <= set(p.tasks)
            assert set(p.pretrain_weights) <= set(p.tasks)
    cpu = PRESETS["cpu"].with_tasks(["addition", "sorting", "modular"])
    assert cpu.pretrain_weights == {"sorting": 2} and cpu.grpo_keep_tasks == ()
    assert cpu.grpo_sft_mix_tasks == cpu.tasks  # the cpu preset mixes every family's, so the run's
    assert PRESETS["gpu"].with_tasks(["counting", "modular"]).grpo_sft_mix_tasks == ("counting",)
    # smoke mixes comparison's worked solutions alone: without it GRPO mixes none, not every task's
    seen = {}
    monkeypatch.setattr(grpo_mod, "grpo", lambda cfg, on_step=None: seen.setdefault("grpo", cfg))
    Speedrun(tmp_path, PRESETS["smoke"].with_tasks(["addition"]), progress=False).grpo()
    assert seen["grpo"].tasks == ["addition", "addition?turn=2"] and seen["grpo"].sft_mix == 0.0


def test_tasks_that_the_speedrun_cannot_run_are_named_one_by_one(tmp_path, capsys):
    from nanoseek.cli import main

    out = tmp_path / "run"
    for flag, named in (
        ("nosuch", "unknown task 'nosuch';"),
        ("comparison,nosuch", "unknown task 'nosuch';"),
        ("nosuch,addition,foo", "unknown tasks 'nosuch', 'foo';"),
        ("largest", "only families learned from their verifier alone (largest)"),
        ("addition?digits=abc", "digits='abc' must be a whole number"),
        ("", "names no family"),
    ):
        assert main(["speedrun", "--preset", "smoke", "--tasks", flag, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert named in err and "grpo_sft_mix_tasks" not in err, err
    assert not out.exists()  # refused before a run directory holds anything
    with pytest.raises(ValueError, match="unknown task 'nosuch'"):  # before any check that would miss it
        dataclasses.replace(PRESETS["smoke"], tasks=("nosuch",), grpo_sft_mix_tasks=())


def test_a_family_run_alone_gives_the_worked_solutions_it_holds(tmp_path):
    """A family alone gives all of a stage's worked solutions: linear equations hold 1,212 distinct
    training problems, fewer than the cpu preset's cold start asks of them (3,000)."""
    alone = Speedrun(tmp_path, PRESETS["cpu"].with_tasks(["linear_equation"]), progress=False)
    assert alone._examples_held(3000) == 1212
    cpu = Speedrun(tmp_path, PRESETS["cpu"], progress=False)
    n = cpu._control_examples(PRESETS["cpu"].control_plan_steps)
    assert cpu._examples_held(n) == n - n % 7  # the preset's own families fill their equal shares
    # equal shares (SFT now spreads a remainder over the first tasks): the cold start keeps the 2,996
    # worked solutions every measured run trained on
    assert cpu._examples_held(3000) == 2996


def test_a_runs_recorded_settings_give_its_preset_back(tmp_path, monkeypatch):
    """`bench_speedrun.py --out RUN` re-reads a run by passing every setting RUN/speedrun.json holds:
    its `tasks` are the field as it is, not `--tasks` (which would drop the verifier-only family)."""
    from nanoseek.speedrun import run_speedrun

    ran = []
    monkeypatch.setattr(Speedrun, "__call__", lambda self: ran.append(self.p) or tmp_path)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the gpu preset runs on one only
    for name, preset in PRESETS.items():
        recorded = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset) if f.name != "name"}
        run_speedrun(tmp_path, name, **recorded)
        assert ran.pop() == preset


def test_a_second_speedrun_into_a_run_in_use_is_refused(tmp_path):
    """Two speedruns in one --out would train the same stage side by side and delete each other's
    scratch files at their saves: the second is refused before it writes anything."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a+") as held:  # what a running speedrun holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242")
        held.flush()
        with pytest.raises(ValueError, match=r"in use by a running speedrun \(pid 4242\)"):
            Speedrun(run, PRESETS["smoke"], progress=False)()
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def _worker_of(pid_file: str) -> None:
    """A speedrun worker (spawned, set up as they are) that would run for a minute."""
    import os

    from nanoseek.speedrun import _set_threads

    _set_threads(1)
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(60)


def _wait_for(path: Path, seconds: float = 60) -> None:
    """Until a process started by the test has written `path` (it is up), or `seconds` have passed."""
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.1)


def _parent_of_a_worker(pid_file: str) -> None:
    import multiprocessing

    multiprocessing.get_context("spawn").Process(target=_worker_of, args=(pid_file,)).start()
    time.sleep(60)


def test_a_worker_ends_with_the_run_that_started_it(tmp_path):
    """The student's, the control's and the evaluation workers' processes do not outlive a run killed
    outright (OOM killer, kill -9): they would go on writing into RUN beside the rerun."""
    import multiprocessing
    import os

    pid_file = tmp_path / "worker.pid"
    parent = multiprocessing.get_context("spawn").Process(target=_parent_of_a_worker, args=(str(pid_file),))
    parent.start()
    _wait_for(pid_file)
    worker = int(pid_file.read_text())
    os.kill(parent.pid, 9)
    parent.join()

    def ended() -> bool:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return True
        status = Path(f"/proc/{worker}/status")  # exited but not yet reaped (a zombie) counts as ended
        return status.exists() and "\nState:\tZ" in status.read_text()

    deadline = time.time() + 10
    while time.time() < deadline:
        if ended():
            break
        time.sleep(0.1)
    else:
        os.kill(worker, 9)
        pytest.fail("the worker outlived its parent")


def _stage_beside(ready: str, threads: int) -> None:
    """A stage beside another (as `Speedrun._beside` starts them) that trains until stopped."""
    Path(ready).write_text("up")
    time.sleep(60)


def test_ctrl_c_ends_a_stage_beside_another_without_its_traceback(tmp_path, capfd):
    """Ctrl-C reaches the run's whole process group: the student's or the control's process printed
    its own KeyboardInterrupt traceback over the run's one-line "interrupted". It ignores the signal,
    and the run's process ends it."""
    import os
    import signal

    ready = tmp_path / "ready"
    run = Speedrun(tmp_path / "run", PRESETS["smoke"], progress=False)
    with (
        pytest.raises(KeyboardInterrupt),
        run._beside("control", "grpo", _stage_beside, (str(ready),)) as child,
    ):
        _wait_for(ready)
        os.kill(child.pid, signal.SIGINT)  # what a Ctrl-C sends it ...
        child.join(1.0)
        raise KeyboardInterrupt  # ... and the run's process
    assert child.exitcode == -signal.SIGTERM
    assert "Traceback" not in capfd.readouterr().err


def test_a_stage_beside_another_prints_nothing_over_the_runs_progress_bar(tmp_path, monkeypatch, capfd):
    """The student's and the control's lines (their headers, validation losses, summaries) landed on the
    end of the teacher's or GRPO's bar line, named as the stage they run as ("pretrain:", "sft:")."""
    import types

    import torch

    import nanoseek.speedrun as speedrun_mod

    def chatty(self, **_: object) -> dict:
        print("pretrain: 10 steps, 10.24K tokens in 7s; checkpoint run/.student/pretrain")
        return {}

    monkeypatch.setattr(Speedrun, "student", chatty)
    monkeypatch.setattr(Speedrun, "control", chatty)
    threads = torch.get_num_threads()
    try:
        speedrun_mod._run_stage(str(tmp_path), PRESETS["smoke"], "student", "pretrain", False, 1)
        speedrun_mod._control_beside_grpo(
            str(tmp_path), PRESETS["smoke"], False, types.SimpleNamespace(value=0.0), 1
        )
    finally:
        torch.set_num_threads(threads)
    assert capfd.readouterr().out == ""
    assert (tmp_path / "student" / DONE).exists() and (tmp_path / "control" / DONE).exists()


def _evaluation_interrupted(out: str, preset, stage: str, tasks: list[str], progress: bool) -> list:
    """An evaluation worker's job: the first one is hit by a Ctrl-C, the others take a while."""
    if (stage, tasks) == ("pretrain", [preset.tasks[0]]):
        raise KeyboardInterrupt
    time.sleep(0.2)
    (Path(out) / f"evaluated_{stage}_{tasks[0]}").write_text("")
    return [{"pass@1": 0.5, "pass@1_stderr": 0.0, "format_rate": 1.0} for _ in tasks]


def _run_evaluating_with(job, tmp_path, monkeypatch) -> Speedrun:
    """A run whose every stage is trained, evaluated on two workers by `job` in place of a checkpoint's
    evaluation."""
    import nanoseek.speedrun as speedrun_mod

    monkeypatch.setattr(speedrun_mod, "_evaluate_checkpoint", job)
    monkeypatch.setattr(Speedrun, "overlaps", lambda self: True)
    monkeypatch.setattr(Speedrun, "_one_queue_per_checkpoint", lambda self: False)
    run = Speedrun(tmp_path, PRESETS["smoke"], progress=False)
    for stage in ("pretrain", "sft", "grpo", "control", "student", "distill"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.json").write_text("{}")
    return run


def test_ctrl_c_in_the_evaluation_does_not_run_the_rest_of_its_queue(tmp_path, monkeypatch):
    """On two evaluation workers a Ctrl-C (or an evaluation's error) waited for every evaluation still
    queued (about a minute on the cpu preset) before the run stopped."""
    run = _run_evaluating_with(_evaluation_interrupted, tmp_path, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run.evaluate()
    evaluated = list(tmp_path.glob("evaluated_*"))
    assert len(evaluated) <= 6, f"{len(evaluated)} evaluations run after the Ctrl-C"


def _evaluation_failing_beside_a_long_one(
    out: str, preset, stage: str, tasks: list[str], progress: bool
) -> list:
    """An evaluation worker's job: the first one fails, the others are still evaluating then."""
    if (stage, tasks) == ("pretrain", [preset.tasks[0]]):
        raise ValueError("a failed evaluation (or a SIGTERM to the run's process alone)")
    time.sleep(8)
    (Path(out) / f"evaluated_{stage}_{tasks[0]}").write_text("")
    return [{"pass@1": 0.5, "pass@1_stderr": 0.0, "format_rate": 1.0} for _ in tasks]


def test_a_stopped_evaluation_does_not_wait_for_the_ones_running(tmp_path, monkeypatch):
    """A SIGTERM to the run's process alone (`kill`, Kubernetes) reaches no evaluation worker, as a
    Ctrl-C does: the stop waited for every evaluation still running (each a family's whole evaluation)."""
    run = _run_evaluating_with(_evaluation_failing_beside_a_long_one, tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="a failed evaluation"):
        run.evaluate()
    assert not list(tmp_path.glob("evaluated_*")), "the stop waited for the evaluations running"


def _evaluation_started_and_long(out: str, preset, stage: str, tasks: list[str], progress: bool) -> list:
    """An evaluation worker's job: it says it started, then takes a while."""
    (Path(out) / f"started_{stage}_{tasks[0]}").write_text("")
    time.sleep(8)
    (Path(out) / f"evaluated_{stage}_{tasks[0]}").write_text("")
    return [{"pass@1": 0.5, "pass@1_stderr": 0.0, "format_rate": 1.0} for _ in tasks]


def test_a_ctrl_c_on_another_thread_stops_the_evaluation_at_once(tmp_path, monkeypatch):
    """The kernel may deliver a Ctrl-C (or SIGTERM) to any thread of the run's (the worker pool's own,
    here the test's): the run waited for the next evaluation to end (a family's whole) before it saw it."""
    import signal
    import threading

    def ctrl_c() -> None:
        for _ in range(1200):  # until an evaluation runs
            if list(tmp_path.glob("started_*")):
                break
            time.sleep(0.05)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # delivered to this thread

    run = _run_evaluating_with(_evaluation_started_and_long, tmp_path, monkeypatch)
    threading.Thread(target=ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run.evaluate()
    assert not list(tmp_path.glob("evaluated_*")), "the stop waited for an evaluation to end"


def _evaluation_of_the_runs_tasks(out: str, preset, stage: str, tasks: list[str], progress: bool) -> list:
    """An evaluation worker's job: it builds its families, as `evaluate_many` does."""
    from nanoseek.data.tasks import get_task

    for task in tasks:
        get_task(task)
    return [{"pass@1": 0.5, "pass@1_stderr": 0.0, "format_rate": 1.0} for _ in tasks]


def _stage_of_a_registered_task(done: str, threads: int) -> None:
    """A stage beside another that builds the family the run's process registered."""
    from nanoseek.data.tasks import get_task

    Path(done).write_text(type(get_task("mine")).__name__)


def test_a_family_registered_in_the_runs_process_reaches_its_spawned_processes(tmp_path, monkeypatch):
    """A family added with `register_task` (in a notebook, or under a script's `__main__` guard) was
    unknown to the evaluation workers and the stages beside another: spawned processes start from the
    built-in families, and every evaluation failed with "unknown task 'mine'"."""
    from nanoseek.data.tasks import TASKS, SortingTask, get_task, register_task

    monkeypatch.setitem(TASKS, "mine", SortingTask)  # (taken out again after the test)
    register_task("mine", SortingTask)
    try:
        run = _run_evaluating_with(_evaluation_of_the_runs_tasks, tmp_path, monkeypatch)
        run.p = PRESETS["smoke"].with_tasks(["mine"])
        assert run.evaluate()["workers"] == 2
        done = tmp_path / "stage_done"
        with run._beside("control", "grpo", _stage_of_a_registered_task, (str(done),)) as child:
            pass
        assert child.exitcode == 0 and done.read_text() == "SortingTask"
    finally:
        get_task.cache_clear()


def test_a_family_registered_unimportably_keeps_every_stage_in_the_runs_process(tmp_path, monkeypatch):
    """A family a spawned process cannot import (a lambda's, a local function's) cannot reach one: the
    run's stages and evaluations then run in its own process, where the family is known."""
    from nanoseek.data.tasks import TASKS, SortingTask, get_task, register_task

    monkeypatch.setitem(TASKS, "mine", SortingTask)
    register_task("mine", lambda spec, **options: SortingTask(spec=spec, **options))
    try:
        monkeypatch.setattr("torch.get_num_threads", lambda: 2)
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
        assert not Speedrun(tmp_path, PRESETS["smoke"], progress=False).overlaps()
    finally:
        get_task.cache_clear()


def test_a_family_defined_under_a_scripts_main_guard_keeps_every_stage_in_the_runs_process(
    tmp_path, monkeypatch
):
    """A spawned process runs the script again without its `__main__` guard: a task class defined under
    it pickled by name here and was not found there, and the evaluation's pool broke ("terminated
    abruptly") after the whole run's training. One defined at the script's top level still goes."""
    import sys
    import types

    from nanoseek.data.tasks import TASKS, SortingTask, get_task, register_task

    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setitem(TASKS, "mine", SortingTask)
    script = tmp_path / "train.py"
    script.write_text(
        "from nanoseek.data.tasks import SortingTask\n\n"
        "class Top(SortingTask):\n    pass\n\n"
        'if __name__ == "__main__":\n\n    class Guarded(SortingTask):\n        pass\n'
    )
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    exec(compile(script.read_text(), str(script), "exec"), main.__dict__)
    monkeypatch.setitem(sys.modules, "__main__", main)
    try:
        for factory, overlaps in ((main.Guarded, False), (main.Top, True)):
            register_task("mine", factory)
            assert Speedrun(tmp_path / "run", PRESETS["smoke"], progress=False).overlaps() is overlaps
    finally:
        get_task.cache_clear()


def test_a_sigterm_between_a_speedruns_training_steps_unwinds_as_ctrl_c_does(tmp_path):
    """`nanoseek speedrun` left SIGTERM as it was outside its training loops: one in its evaluation,
    distillation's sampling or a stage's loading ended the process where it stood, without a word (a
    Ctrl-C there says "interrupted"). Inside a training stage's loop a first SIGTERM still only asks it
    to save and stop."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import contextlib, os, signal, sys, time, types
        from nanoseek.cli import main
        from nanoseek.speedrun import Speedrun
        from nanoseek.train.loop import Trainer, stop_pending

        def run_all(self):
            trainer = types.SimpleNamespace(_signal=0, _signal_at=0.0, dist=types.SimpleNamespace(is_main=False), keep_steps=contextlib.nullcontext)
            with Trainer.stop_on_signals(trainer):  # a training stage's loop: the stop is only asked
                os.kill(os.getpid(), signal.SIGTERM)
                assert stop_pending()
            os.kill(os.getpid(), signal.SIGTERM)  # between stages (the evaluation)
            time.sleep(30)

        Speedrun._run_all = run_all
        sys.exit(main(["speedrun", "--preset", "smoke", "--out", {str(tmp_path / "run")!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (143, "terminated\n")


def test_a_third_sigterm_ends_a_speedrun_whose_stage_was_stopped_now(tmp_path):
    """A second SIGTERM inside a training stage stops it now: the CLI's handler unwinds the run and
    leaves the next SIGTERM to end the process. The stage put that handler back on leaving, so a third
    (while the unwinding waits for the stage beside to save) only unwound the run again."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import contextlib, os, signal, sys, time, types
        import nanoseek.train.loop
        from nanoseek.cli import main
        from nanoseek.speedrun import Speedrun
        from nanoseek.train.loop import Trainer

        nanoseek.train.loop.REPEAT_WINDOW_S = 0.0  # the second is a second request, however soon

        def run_all(self):
            trainer = types.SimpleNamespace(_signal=0, _signal_at=0.0, dist=types.SimpleNamespace(is_main=False), keep_steps=contextlib.nullcontext)
            try:
                with Trainer.stop_on_signals(trainer):
                    os.kill(os.getpid(), signal.SIGTERM)  # the stage is asked to stop
                    os.kill(os.getpid(), signal.SIGTERM)  # and now: the run unwinds
                    time.sleep(30)
            finally:  # the unwinding waits (for the student beside to save)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)

        Speedrun._run_all = run_all
        sys.exit(main(["speedrun", "--preset", "smoke", "--out", {str(tmp_path / "run")!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr  # ended by the signal, not unwound again


@pytest.mark.parametrize("saved_step", [0, 8, 20])  # smoke's 30 steps take the threads back at step 8
def test_a_resumed_run_trains_on_the_threads_the_run_never_stopped_had(tmp_path, monkeypatch, saved_step):
    """On some CPUs a step's last bits depend on the thread count. A run killed in pretraining after
    the student was done, or in GRPO after the control was, gives the figures of one never stopped:
    the teacher's steps before it takes back its threads, and GRPO's, run on half of them again."""
    import json

    import torch

    import nanoseek.report
    from nanoseek.speedrun import TAKE_BACK_AT

    preset = PRESETS["smoke"]
    for stage in ("tokenizer", "student", "control"):  # done before the kill
        (tmp_path / stage).mkdir()
        (tmp_path / stage / ".done").write_text(json.dumps({"wall_time_s": 1.0, "beside": "x"}))
    if saved_step:  # a checkpoint past the take-back
        (tmp_path / "pretrain" / "train_state").mkdir(parents=True)
        (tmp_path / "pretrain" / "train_state" / "trainer.json").write_text(json.dumps({"step": saved_step}))
    seen: dict[str, list[int]] = {"pretrain": [], "grpo": []}

    def fake_pretrain(self, student=False, on_step=None):
        for step in range(saved_step + 1, preset.pretrain_steps + 1):  # resumed from its checkpoint
            seen["pretrain"].append(torch.get_num_threads())
            if on_step is not None:
                on_step(step)

    def fake_grpo(self, on_step=None):
        for step in range(1, preset.grpo_steps + 1):
            seen["grpo"].append(torch.get_num_threads())
            if on_step is not None:
                on_step(step, preset.grpo_steps)

    def fake_stage(self, index, total, stage, fn):
        if stage in seen:
            fn()

    monkeypatch.setattr(Speedrun, "overlaps", lambda self: True)
    monkeypatch.setattr(Speedrun, "pretrain", fake_pretrain)
    monkeypatch.setattr(Speedrun, "grpo", fake_grpo)
    monkeypatch.setattr(Speedrun, "_stage", fake_stage)
    monkeypatch.setattr(Speedrun, "finalize", lambda self: self.run / "final")
    monkeypatch.setattr(Speedrun, "model_facts", lambda self: None)
    monkeypatch.setattr(nanoseek.report, "build_report", lambda run: Path(run) / "report.md")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        Speedrun(tmp_path, preset, progress=False)()
    finally:
        torch.set_num_threads(threads)
    at = int(preset.pretrain_steps * TAKE_BACK_AT + 0.999)
    halves = max(0, at - saved_step)
    assert seen["pretrain"] == [1] * halves + [2] * (preset.pretrain_steps - max(at, saved_step))
    assert seen["grpo"] == [1] * preset.grpo_steps


def test_a_run_sets_its_thread_count_before_its_first_stage(tmp_path, monkeypatch):
    """torch.set_num_threads turns MKL's dynamic threading off too, which changes a GEMM's last bits.
    The stages beside another set it; a run resumed at SFT in a fresh process that never did trained
    another SFT model than the run never stopped. Every run sets it first, side by side or not."""
    import torch

    import nanoseek.report

    events: list[str] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: events.append("threads set"))
    monkeypatch.setattr(Speedrun, "overlaps", lambda self: False)
    monkeypatch.setattr(Speedrun, "_stage", lambda self, index, total, stage, fn: events.append(stage))
    monkeypatch.setattr(Speedrun, "finalize", lambda self: self.run / "final")
    monkeypatch.setattr(Speedrun, "model_facts", lambda self: None)
    monkeypatch.setattr(nanoseek.report, "build_report", lambda run: Path(run) / "report.md")
    Speedrun(tmp_path, PRESETS["smoke"], progress=False)()
    assert events[:2] == ["threads set", "tokenizer"]


def test_a_finished_stage_is_skipped_and_an_interrupted_one_runs_again(tmp_path, capsys):
    """A stage is done when its `.done` marker is there, not its directory: a stage interrupted after
    its first checkpoint runs again (and resumes), a finished one is skipped on a rerun."""
    import json

    run = Speedrun(tmp_path, PRESETS["smoke"], progress=False)
    ran = []
    (tmp_path / "sft").mkdir()  # a checkpoint saved, the stage not finished
    run._stage(4, 8, "sft", lambda: ran.append("sft") or {"examples": 7})
    marker = json.loads((tmp_path / "sft" / ".done").read_text())
    assert ran == ["sft"] and marker["examples"] == 7 and marker["wall_time_s"] >= 0
    run._stage(4, 8, "sft", lambda: ran.append("again"))
    assert ran == ["sft"]
    assert "[4/8] sft: done already, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("overlaps", [False, True])
def test_the_stages_run_in_the_recipes_order_side_by_side_where_the_cpu_allows(
    tmp_path, monkeypatch, overlaps
):
    """tokenizer, pretrain, the student, SFT, GRPO, its control, distillation, evaluation; on a CPU of
    two threads or more the student trains beside pretraining and the control beside GRPO, and a
    preset without a student or a control has no such stage and nothing beside."""
    import nanoseek.report

    stages: list[tuple[str, str]] = []
    monkeypatch.setattr(Speedrun, "overlaps", lambda self: overlaps)
    monkeypatch.setattr(
        Speedrun, "_stage", lambda self, index, total, stage, fn: stages.append((stage, fn.__name__))
    )
    monkeypatch.setattr(Speedrun, "finalize", lambda self: self.run / "final")
    monkeypatch.setattr(Speedrun, "model_facts", lambda self: None)
    monkeypatch.setattr(nanoseek.report, "build_report", lambda run: Path(run) / "report.md")
    Speedrun(tmp_path / "full", PRESETS["smoke"], progress=False)()
    assert stages == [
        ("tokenizer", "tokenizer"),
        ("pretrain", "pretrain_beside_student" if overlaps else "pretrain"),
        ("student", "student"),
        ("sft", "sft"),
        ("grpo", "grpo_beside_control" if overlaps else "grpo"),
        ("control", "control"),
        ("distill", "distill"),
        ("eval", "evaluate"),
    ]
    stages.clear()
    bare = dataclasses.replace(PRESETS["smoke"], student_steps=0, control=False)
    Speedrun(tmp_path / "bare", bare, progress=False)()
    assert stages == [
        ("tokenizer", "tokenizer"),
        ("pretrain", "pretrain"),
        ("sft", "sft"),
        ("grpo", "grpo"),
        ("distill", "distill"),
        ("eval", "evaluate"),
    ]


def test_each_stage_starts_from_the_checkpoint_before_it(tmp_path, monkeypatch):
    """SFT from pretraining, GRPO and its control from SFT, distillation from GRPO into the pretrained
    student (or into the student's preset, random, where it has no pretraining); RUN/final is GRPO's
    model without its training state or stage files."""
    import nanoseek.train.distill as distill_mod
    import nanoseek.train.grpo as grpo_mod
    import nanoseek.train.sft as sft_mod

    seen = {}

    def fake_sft(cfg, deadline_fn=None):
        seen.setdefault("sft", []).append(cfg)
        (Path(cfg.out) / "sft").mkdir(parents=True, exist_ok=True)
        return Path(cfg.out) / "sft"

    monkeypatch.setattr(sft_mod, "sft", fake_sft)
    monkeypatch.setattr(grpo_mod, "grpo", lambda cfg, on_step=None: seen.setdefault("grpo", cfg))
    monkeypatch.setattr(distill_mod, "distill", lambda cfg: seen.setdefault("distill", []).append(cfg))
    preset = PRESETS["smoke"]
    run = Speedrun(tmp_path, preset, progress=False)
    run.sft()
    run.grpo()
    run.control(deadline_fn=lambda: None)
    run.distill()
    Speedrun(tmp_path, dataclasses.replace(preset, student_steps=0), progress=False).distill()
    cold, control = seen["sft"]
    assert cold.init == str(tmp_path / "pretrain") and control.init == str(tmp_path / "sft")
    assert control.steps == preset.control_plan_steps  # beside GRPO: its first plan, refitted later
    assert seen["grpo"].init == str(tmp_path / "sft")
    pretrained, random_init = seen["distill"]
    assert pretrained.teacher == random_init.teacher == str(tmp_path / "grpo")
    assert (pretrained.student, random_init.student) == (str(tmp_path / "student"), preset.student)
    (tmp_path / "grpo").mkdir()
    for name in ("config.json", "model.safetensors", ".done", "eval_addition.json"):
        (tmp_path / "grpo" / name).write_text("grpo")
    (tmp_path / "grpo" / "train_state").mkdir()
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "model.safetensors").write_text("distill")
    final = run.finalize()
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    assert (final / "model.safetensors").read_text() == "grpo"


def test_the_control_alone_gets_grpos_wall_time_at_sfts_pace(tmp_path, monkeypatch):
    """A control run alone (it failed beside GRPO) plans as many steps as GRPO's wall time holds at the
    cold start's median step time, less the cold start's fixed overhead, with fresh worked solutions
    at its rate per step (never fewer than the cold start's), and stops at GRPO's wall time."""
    import json

    import nanoseek.train.sft as sft_mod

    seen = []

    def fake_sft(cfg, deadline_fn=None):
        seen.append(cfg)
        (Path(cfg.out) / "sft").mkdir(parents=True, exist_ok=True)
        return Path(cfg.out) / "sft"

    monkeypatch.setattr(sft_mod, "sft", fake_sft)
    preset = PRESETS["smoke"]  # 10 cold-start steps of 200 worked solutions
    # ten steps a second apart but one, 10 s (a save): median 1 s, mean 2 s; 15 s in all: 5 s overhead
    times = [100.0 + t for t in (0, 1, 2, 3, 4, 5, 6, 7, 8, 18)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, t in enumerate(times, 1):
            f.write(json.dumps({"stage": "sft", "step": step, "time": t}) + "\n")
    for stage, wall in (("sft", 15.0), ("grpo", 25.0)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / ".done").write_text(json.dumps({"wall_time_s": wall}))
    run = Speedrun(tmp_path, preset, progress=False)
    assert run.control()["matched_wall_time_s"] == 25.0
    assert (seen[-1].steps, seen[-1].task_examples, seen[-1].max_seconds) == (20, 400, 25.0)
    (tmp_path / "grpo" / ".done").write_text(json.dumps({"wall_time_s": 8.0}))  # 3 steps' time
    run.control()
    assert (seen[-1].steps, seen[-1].task_examples) == (3, preset.sft_examples)


def test_grpo_tells_the_control_beside_it_when_it_will_end(tmp_path, monkeypatch):
    """After each step GRPO's end is its pace so far times the steps left, counted from where a resumed
    GRPO started; once GRPO is done the control is told to stop now."""
    import contextlib

    import nanoseek.speedrun as speedrun_mod

    clock = [1000.0]
    monkeypatch.setattr(speedrun_mod.time, "time", lambda: clock[0])
    shared = {}

    @contextlib.contextmanager
    def beside(self, stage, during, target, args):
        assert (stage, during, target) == ("control", "grpo", speedrun_mod._control_beside_grpo)
        shared["end"] = args[-1]
        yield None

    ends = []

    def grpo(self, on_step=None):
        for done in (6, 7):  # resumed after step 5 of 10, 2 s a step
            clock[0] += 2.0
            on_step(done, 10)
            ends.append(shared["end"].value)
        clock[0] += 1.0

    monkeypatch.setattr(Speedrun, "_beside", beside)
    monkeypatch.setattr(Speedrun, "grpo", grpo)
    Speedrun(tmp_path, PRESETS["smoke"], progress=False).grpo_beside_control()
    assert ends == [1002.0 + 2.0 * 4, 1004.0 + 2.0 * 3]
    assert shared["end"].value == 1005.0


def test_beside_a_finished_stage_the_body_keeps_its_share_and_starts_nothing(tmp_path):
    """A run resumed after the stage beside was done starts no process for it, and the body trains on
    the threads it had beside it (the rest of half, rounded down), then gets all of them back."""
    import json

    import torch

    (tmp_path / "control").mkdir()
    (tmp_path / "control" / ".done").write_text(json.dumps({"wall_time_s": 1.0}))
    run = Speedrun(tmp_path, PRESETS["smoke"], progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with run._beside("control", "grpo", _stage_beside, (str(tmp_path / "ready"),)) as child:
            assert child is None and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_the_data_digest_sees_the_corpus_the_verifier_only_families_and_the_students_chats(
    tmp_path, monkeypatch
):
    """Each part of how the run's data is written counts: the pretraining documents, a verifier-only
    family's problems (GRPO and the evaluation ask them), and how a chat of several questions is
    composed where only the student's corpus has them."""
    import nanoseek.data.corpus as corpus
    from nanoseek.data import synthetic
    from nanoseek.data.tasks.families import LargestTask

    preset = dataclasses.replace(PRESETS["smoke"], pretrain_multi_turn=0.0, student_multi_turn=0.05)
    run = Speedrun(tmp_path, preset, progress=False)
    digest = run.data_formats()
    documents = corpus.tokenizer_documents
    monkeypatch.setattr(corpus, "tokenizer_documents", lambda *a, **k: (d + "." for d in documents(*a, **k)))
    assert run.data_formats() != digest
    monkeypatch.undo()
    monkeypatch.setattr(LargestTask, "answer", lambda self, d: f"the answer is {max(d['numbers'])}")
    assert run.data_formats() != digest
    monkeypatch.undo()
    monkeypatch.setattr(synthetic, "CHAT_CHARS", 200)
    assert run.data_formats() != digest


def test_the_model_facts_are_measured_once(tmp_path, monkeypatch):
    from nanoseek.metrics import MetricsLog

    MetricsLog(tmp_path, "speedrun").log(event="model", decode_tokens_per_s=1.0)
    monkeypatch.setattr(Speedrun, "_decode_speed", lambda self, tokens=64: pytest.fail("measured again"))
    Speedrun(tmp_path, PRESETS["smoke"], progress=False).model_facts()  # no RUN/grpo needed either


def test_a_run_holds_what_a_benchmark_adds_beside_its_stages(tmp_path):
    """A directory with RUN/speedrun.json is a run, whatever else it holds (bench_speedrun's --rescore
    writes RUN/rescore/); without it, an entry no speedrun writes is refused."""
    (tmp_path / "rescore").mkdir()
    run = Speedrun(tmp_path, PRESETS["smoke"], progress=False)
    with pytest.raises(
        ValueError, match=r"holds no speedrun \(no speedrun.json\) but other files \(rescore\)"
    ):
        run._refuse_foreign()
    run._claim_directory()
    run._refuse_foreign()


def test_the_goals_are_met_at_their_thresholds():
    """bench_speedrun's goals are inclusive, as its docstring states them (>= 95%, <= 0.1 nats, ...)."""
    from tests.benchmark_scripts import load_benchmark

    bench = load_benchmark("bench_speedrun")
    f = {
        "pass@1": {t: {"grpo": goal} for t, goal in bench.PASS_GOALS.items()},
        "final_mean": bench.MEAN_GOAL,
        "grpo_gain_mid_families": ["sorting"],
        "grpo_gain_mid": bench.GRPO_GAIN_GOAL,
        "verifier_only": {"largest": bench.ZERO_GAIN_GOAL},
        "copy_loss": bench.COPY_GOAL,
        "student_ratio": bench.STUDENT_GOAL,
    }
    assert [met for _, _, met in bench.verdicts(f)] == [True] * 8


def test_a_damaged_record_of_the_run_is_named(tmp_path):
    """RUN/speedrun.json or a stage's trainer.json cut short (a copy of the run, a hand edit): a bare
    JSON error named neither file."""
    run = Speedrun(tmp_path, PRESETS["smoke"], progress=False)
    (tmp_path / "speedrun.json").write_text('{"tasks": [')
    with pytest.raises(ValueError, match=r"speedrun\.json is not valid JSON"):
        run._claim_directory()
    (tmp_path / "pretrain" / "train_state").mkdir(parents=True)
    (tmp_path / "pretrain" / "train_state" / "trainer.json").write_bytes(b'{"step": \xff}')
    with pytest.raises(ValueError, match=r"trainer\.json is not valid JSON"):
        run._saved_step("pretrain")


def _stage_saving_on_sigterm(ready: str, threads: int) -> None:
    """A stage beside another that, as a training stage does, saves and stops on a first SIGTERM."""
    import signal

    import nanoseek.speedrun as speedrun_mod
    from nanoseek.train import TrainingInterrupted

    def stop(signum, frame):
        raise TrainingInterrupted("control", signum, 1, 2, "RUN/.control/control")

    signal.signal(signal.SIGTERM, stop)
    with speedrun_mod._exit_when_interrupted():
        Path(ready).write_text("up")
        time.sleep(60)


def test_a_stage_beside_another_stopped_by_a_full_disk_says_so_in_one_line(tmp_path, capsys):
    """A stage's spawned process that met a full disk ended under multiprocessing's traceback, the file
    and where its steps went at its foot: one line, as the run's own process says it."""
    import errno

    import nanoseek.speedrun as speedrun_mod

    full = OSError(errno.ENOSPC, "No space left on device; the weights of step 3 were written to X instead")
    full.filename = str(tmp_path / "metrics.jsonl")
    with pytest.raises(SystemExit) as e, speedrun_mod._exit_when_interrupted():
        raise full
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"MainProcess: error: {full.filename}: {full.strerror}\n"


def test_a_stage_beside_another_saves_and_ends_with_the_signals_code_on_a_ctrl_c(tmp_path, capfd):
    """Ctrl-C saved the run's stage, which then stops the one beside it (that ignores SIGINT): it saves
    too and ends with SIGTERM's exit code, without multiprocessing's traceback of the exception."""
    import signal

    from nanoseek.train import TrainingInterrupted

    ready = tmp_path / "ready"
    run = Speedrun(tmp_path / "run", PRESETS["smoke"], progress=False)
    with (
        pytest.raises(TrainingInterrupted),
        run._beside("control", "grpo", _stage_saving_on_sigterm, (str(ready),)) as child,
    ):
        _wait_for(ready)
        raise TrainingInterrupted("grpo", signal.SIGINT, 3, 10, "RUN/grpo")
    assert child.exitcode == 128 + signal.SIGTERM
    assert "Traceback" not in capfd.readouterr().err


def test_an_interrupted_grpo_does_not_end_the_control_beside_it(tmp_path, monkeypatch):
    """GRPO stopped by a signal (its checkpoint saved) told the control beside it that GRPO was done: the
    control finished and was marked done with a fraction of GRPO's wall time, and the rerun kept it."""
    import contextlib
    import signal

    import nanoseek.speedrun as speedrun_mod
    from nanoseek.train import TrainingInterrupted

    clock = [1000.0]
    monkeypatch.setattr(speedrun_mod.time, "time", lambda: clock[0])
    shared = {}

    @contextlib.contextmanager
    def beside(self, stage, during, target, args):
        shared["end"] = args[-1]
        yield None

    def grpo(self, on_step=None):
        clock[0] += 2.0
        on_step(1, 10)
        raise TrainingInterrupted("grpo", signal.SIGTERM, 2, 10, "RUN/grpo")

    monkeypatch.setattr(Speedrun, "_beside", beside)
    monkeypatch.setattr(Speedrun, "grpo", grpo)
    with pytest.raises(TrainingInterrupted):
        Speedrun(tmp_path, PRESETS["smoke"], progress=False).grpo_beside_control()
    assert shared["end"].value == 1002.0 + 2.0 * 9  # GRPO's pace, not "ended now"


def test_an_interrupted_speedrun_says_its_stage_saved_and_that_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    import signal

    from nanoseek.cli import main
    from nanoseek.train import TrainingInterrupted

    def stopped(self):
        raise TrainingInterrupted("pretrain", signal.SIGTERM, 7, 30, self.run / "pretrain")

    monkeypatch.setattr(Speedrun, "_run_all", stopped)
    args = ["speedrun", "--preset", "smoke", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 143
    err = capsys.readouterr().err
    assert (
        f"pretrain stopped by SIGTERM at step 7 of 30: checkpoint saved in {tmp_path / 'run' / 'pretrain'}"
        in err
    )
    assert err.strip().endswith("resume with: nanoseek " + " ".join(args))  # a rerun resumes: no --resume


def _student_sleeping(run: str, preset, stage: str, during: str, tensorboard: bool, threads: int) -> None:
    """The student's stage beside the teacher's pretraining (as `_run_stage` is started), still running."""
    time.sleep(60)


def _signal_trainer():
    """What `Trainer.stop_on_signals` reads of a Trainer, on a rank that prints nothing."""
    import types

    return types.SimpleNamespace(
        _signal=0,
        _signal_at=0.0,
        dist=types.SimpleNamespace(is_main=False),
        keep_steps=contextlib.nullcontext,
    )


def test_a_signal_while_the_teacher_waits_for_its_student_is_not_held_up(tmp_path, monkeypatch):
    """The teacher takes its threads back at a fixed step, waiting there for the student. A Ctrl-C
    then (the student ignores SIGINT) or a SIGTERM to this process alone waited for the student's whole
    run: the teacher now stops at once, and its stop is passed on to the student."""
    import math
    import os
    import signal

    import torch

    import nanoseek.speedrun as speedrun_mod
    from nanoseek.train import TrainingInterrupted
    from nanoseek.train.loop import Trainer, stop_pending

    monkeypatch.setattr(speedrun_mod, "_run_stage", _student_sleeping)
    trainer = _signal_trainer()
    waited = []

    def pretrain(self, student=False, on_step=None):
        at = math.ceil(self.p.pretrain_steps * speedrun_mod.TAKE_BACK_AT)
        with Trainer.stop_on_signals(trainer):
            os.kill(os.getpid(), signal.SIGINT)  # handled at once: this is the main thread
            assert stop_pending()
            t0 = time.monotonic()
            on_step(at)
            waited.append(time.monotonic() - t0)
        assert not stop_pending()
        raise TrainingInterrupted("pretrain", signal.SIGINT, at, self.p.pretrain_steps, "RUN/pretrain")

    monkeypatch.setattr(Speedrun, "pretrain", pretrain)
    run = Speedrun(tmp_path / "run", PRESETS["smoke"], progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one for each: the teacher has one to take back
    started = time.monotonic()
    try:
        with pytest.raises(TrainingInterrupted):
            run.pretrain_beside_student()
    finally:
        torch.set_num_threads(threads)
    assert waited[0] < 5 and time.monotonic() - started < 30


def test_a_stop_at_the_take_back_step_still_takes_the_threads_back(tmp_path, monkeypatch):
    """A stop asked at the step where the teacher takes its threads back is seen after the next step,
    which the checkpoint then holds: that step ran on half the threads, where a run never stopped runs
    it on all, and the rerun (resumed past the take-back) gave other figures than the run never stopped."""
    import json
    import math
    import os
    import signal

    import torch

    import nanoseek.speedrun as speedrun_mod
    from nanoseek.train.loop import Trainer, stop_pending

    trainer = _signal_trainer()
    threads_after = []

    def pretrain(self, student=False, on_step=None):
        with Trainer.stop_on_signals(trainer):
            os.kill(os.getpid(), signal.SIGINT)  # handled at once: this is the main thread
            assert stop_pending()
            on_step(math.ceil(self.p.pretrain_steps * speedrun_mod.TAKE_BACK_AT))
            threads_after.append(torch.get_num_threads())  # the next step's, which the stop saves

    monkeypatch.setattr(Speedrun, "pretrain", pretrain)
    run = Speedrun(tmp_path / "run", PRESETS["smoke"], progress=False)
    (run.run / "student").mkdir()
    (run.run / "student" / DONE).write_text(json.dumps({"wall_time_s": 1.0}))  # no process to wait for
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run.pretrain_beside_student()
    finally:
        torch.set_num_threads(threads)
    assert threads_after == [2]


def test_a_preset_refuses_no_families_shares_outside_0_1_and_a_mix_of_a_verifier_only_family():
    """Each share of several-question chats is a share: 0 and 1 are taken, anything outside refused by
    its field's name (the cold start's and the student's too, not the teacher's alone). A run needs a
    family with worked solutions, and GRPO can mix worked solutions of those alone."""
    smoke = PRESETS["smoke"]
    with pytest.raises(ValueError, match="tasks must name at least one family with worked solutions"):
        dataclasses.replace(smoke, tasks=())
    for name in ("pretrain_multi_turn", "student_multi_turn", "sft_multi_turn"):
        for share in (0.0, 1.0):
            assert getattr(dataclasses.replace(smoke, **{name: share}), name) == share
        for share in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\]"):
                dataclasses.replace(smoke, **{name: share})
    with pytest.raises(
        ValueError, match=r"grpo_sft_mix_tasks must be families with worked solutions.*'largest'"
    ):
        dataclasses.replace(smoke, grpo_sft_mix_tasks=("comparison", "largest"))


def test_the_pretraining_corpus_is_every_family_or_the_one_named(tmp_path):
    """`pretrain_corpus`: "tasks" (the run's families, weighted), "all" (every embedded family), or a
    corpus of the user's own, passed to pretraining as it is."""
    for corpus, data in (("all", "embedded"), ("/data/my.jsonl", "/data/my.jsonl")):
        preset = dataclasses.replace(PRESETS["smoke"], pretrain_corpus=corpus)
        assert Speedrun(tmp_path, preset, progress=False).pretrain_data() == data


def test_the_cold_starts_step_time_is_the_median_gap_between_distinct_times(tmp_path):
    """Two records of one step logged in the same millisecond are one step, not a step of 0 s: a median
    over such gaps would be 0 s, and the control would plan as if SFT's steps cost nothing."""
    import json

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 4):  # each step at 100 + 2 * step s, twice; a grpo record between
            for _ in range(2):
                f.write(json.dumps({"stage": "sft", "step": step, "time": 100.0 + 2 * step}) + "\n")
            f.write(json.dumps({"stage": "grpo", "step": step, "time": 100.5 + 2 * step}) + "\n")
    # sft's times 102, 102, 104, 104, 106, 106: distinct gaps 2 and 2
    assert Speedrun(tmp_path, PRESETS["smoke"], progress=False)._step_seconds("sft") == 2.0
    assert Speedrun(tmp_path, PRESETS["smoke"], progress=False)._step_seconds("control") is None


@pytest.mark.parametrize("gpu", [False, True])
def test_the_evaluation_runs_one_job_per_family_on_a_cpu_and_per_checkpoint_on_a_gpu(
    tmp_path, monkeypatch, gpu
):
    import nanoseek.speedrun as speedrun_mod

    jobs = []

    def fake_evaluate(out, preset, stage, tasks, progress):
        jobs.append((stage, list(tasks)))
        return [{"pass@1": 0.0, "format_rate": 1.0} for _ in tasks]

    monkeypatch.setattr(speedrun_mod, "_evaluate_checkpoint", fake_evaluate)
    monkeypatch.setattr(Speedrun, "overlaps", lambda self: False)
    monkeypatch.setattr(Speedrun, "_one_queue_per_checkpoint", lambda self: gpu)
    preset = dataclasses.replace(PRESETS["smoke"], eval_unseen_n=0, eval_second_turn_n=0)
    run = Speedrun(tmp_path, preset, progress=False)
    for stage in ("sft", "grpo"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.json").write_text("{}")
    families = ["addition", "comparison", "largest"]  # smoke's two, and largest from its verifier
    out = run.evaluate()
    if gpu:
        assert jobs == [("sft", families), ("grpo", families)]
    else:
        assert jobs == [(stage, [f]) for stage in ("sft", "grpo") for f in families]
    assert list(out["pass@1"]) == [f"{stage}/{f}" for stage in ("sft", "grpo") for f in families]


def test_an_evaluation_asks_each_kind_of_problem_its_own_count_in_the_engine_batch_set(tmp_path, monkeypatch):
    """eval_n problems of a family as trained, eval_unseen_n in unseen wordings, eval_second_turn_n asked
    second in a chat; `engine_batch` reaches the engine (0: the evaluation's own default, None)."""
    import nanoseek.evaluate as evaluate_mod
    from nanoseek.data.tasks import as_second_turn, in_unseen_wordings
    from nanoseek.speedrun import _evaluate_checkpoint

    seen = []
    monkeypatch.setattr(evaluate_mod, "evaluate_many", lambda configs: seen.extend(configs) or [])
    tasks = ["addition", in_unseen_wordings("addition"), as_second_turn("addition")]
    for batch, engine in ((7, 7), (0, None)):
        preset = dataclasses.replace(
            PRESETS["smoke"], eval_n=6, eval_unseen_n=4, eval_second_turn_n=5, engine_batch=batch
        )
        seen.clear()
        _evaluate_checkpoint(str(tmp_path), preset, "grpo", tasks, False)
        assert [(c.task, c.n, c.max_batch_size) for c in seen] == [
            (tasks[0], 6, engine),
            (tasks[1], 4, engine),
            (tasks[2], 5, engine),
        ]
        assert all(c.model == str(tmp_path / "grpo") and c.k == preset.eval_k for c in seen)


@pytest.mark.parametrize(
    ("device", "bf16_native", "forced", "expected"),
    [
        ("cpu", True, "auto", "fp32"),  # the post-training recipe was tuned in fp32 on CPUs
        ("cpu", True, "bf16", "fp32"),  # bf16 names pretraining's precision; post-training stays fp32
        ("cuda", True, "auto", "bf16"),
        ("cuda", True, "fp32", "fp32"),
        ("cuda", False, "auto", "fp32"),  # a T4 or V100 emulates bf16: it was chosen there, and crawled
    ],
)
def test_post_training_precision_follows_the_device(
    tmp_path, monkeypatch, device, bf16_native, forced, expected
):
    import torch

    import nanoseek.perf

    monkeypatch.setattr(nanoseek.perf, "default_device", lambda: torch.device(device))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_native)
    run = Speedrun(tmp_path, dataclasses.replace(PRESETS["smoke"], precision=forced), progress=False)
    assert run._tuning_precision() == expected


def test_an_out_holding_a_hidden_file_is_refused_and_its_files_named_up_to_three(tmp_path):
    """A dotfile a speedrun never writes (a repository's .git) is someone else's too; the error names
    three of the files, and "..." only where there are more."""
    for names, shown in (
        ([".git"], "(.git)"),
        (["a", "b", "c"], "(a, b, c)"),
        (["a", "b", "c", "d"], "(a, b, c, ...)"),
    ):
        out = tmp_path / "-".join(names)
        out.mkdir()
        for name in names:
            (out / name).write_text("mine")
        with pytest.raises(
            ValueError, match=rf"holds no speedrun \(no speedrun.json\) but other files {re.escape(shown)}:"
        ):
            Speedrun(out, PRESETS["smoke"], progress=False)._refuse_foreign()


def test_a_stage_trained_beside_another_says_so_on_a_rerun(tmp_path, capsys):
    import json

    run = Speedrun(tmp_path, PRESETS["smoke"], progress=False)
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / DONE).write_text(json.dumps({"wall_time_s": 12.4, "beside": "pretrain"}))
    run._stage(3, 9, "student", lambda: pytest.fail("a finished stage ran again"))
    assert capsys.readouterr().out == "[3/9] student: trained beside pretrain in 12s\n"


def test_the_speedrun_command_passes_precision_progress_and_a_share_of_1(tmp_path, monkeypatch):
    """--precision and --no-progress reach the run; --multi-turn 1 (every chat of several questions) is
    a share like any other in [0, 1]."""
    import nanoseek.speedrun
    from nanoseek.cli import main

    seen = {}
    monkeypatch.setattr(
        nanoseek.speedrun,
        "run_speedrun",
        lambda out, preset, progress, **kw: seen.update(kw, progress=progress),
    )
    argv = ["speedrun", "--out", str(tmp_path), "--precision", "fp32", "--no-progress", "--multi-turn", "1"]
    assert main(argv) == 0
    assert (seen["precision"], seen["progress"], seen["pretrain_multi_turn"]) == ("fp32", False, 1.0)
    assert main(["speedrun", "--out", str(tmp_path)]) == 0
    assert (seen["precision"], seen["progress"]) == ("auto", True)
