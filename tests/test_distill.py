"""Distillation: rejection sampling keeps only finished, correct, distinct traces; a preset student takes
the teacher's tokenizer; the whole command runs end to end with a scripted teacher engine."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.engine import Completion
from nanoseek.train.distill import DistillConfig, build_student, distill, sample_correct_traces


@pytest.fixture
def teacher_dir(micro_checkpoint) -> str:
    return micro_checkpoint


class ScriptedEngine:
    """Answers problem i's k samples as: right, right (duplicate), wrong, right but truncated."""

    def __init__(self, tok, problems) -> None:
        self.tok, self.problems = tok, problems

    def generate_detailed(self, prompts, params, on_finish=None):
        k = len(prompts) // len(self.problems)
        out = []
        for j in range(len(prompts)):
            p = self.problems[j // k]
            kind = ["right", "right", "wrong", "cut"][j % k]
            ans = p.answer if kind != "wrong" else str(int(p.answer) + 1)
            ids = self.tok.encode(f"add\n</think>\n{ans}")
            if kind != "cut":
                ids.append(self.tok.eos_token_id)
            out.append(Completion(ids, None, "length" if kind == "cut" else "stop", None))
            if on_finish is not None:
                on_finish(j)
        return out


def test_rejection_sampling_keeps_correct_distinct_finished(teacher_dir) -> None:
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(teacher_dir)
    task = get_task("arithmetic")
    probs = task.problems("train", 3, seed=0)
    cfg = DistillConfig(teacher=teacher_dir, student="tiny", tasks=["arithmetic"], k=4, keep_per_prompt=2)
    kept, stats = sample_correct_traces(ScriptedEngine(tok, probs), tok, [task] * 3, probs, cfg)
    # per prompt: 2 right (identical -> 1 kept), 1 wrong, 1 truncated
    assert len(kept) == 3
    assert stats["teacher_accuracy"] == pytest.approx(2 / 4)
    assert stats["prompts_with_correct"] == 1.0
    for prob, prompt_ids, comp in kept:
        assert comp[-1] == tok.eos_token_id
        assert tok.decode(comp, skip_special_tokens=True).endswith(prob.answer)
        assert tok.decode(prompt_ids).endswith("<think>\n")


def test_the_teachers_sampling_shows_its_progress(teacher_dir, capsys) -> None:
    """Minutes of sampling at the defaults (256 prompts x k = 4 per task) showed nothing at all: a bar
    counts the samples on stderr, and --no-progress hides it."""
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(teacher_dir)
    task = get_task("arithmetic")
    probs = task.problems("train", 3, seed=0)
    cfg = DistillConfig(teacher=teacher_dir, student="tiny", tasks=["arithmetic"], k=4)
    sample_correct_traces(ScriptedEngine(tok, probs), tok, [task] * 3, probs, cfg)
    out, err = capsys.readouterr()
    assert "teacher samples" in err and "/12" in err and out == "", err
    cfg.sft.progress = False
    sample_correct_traces(ScriptedEngine(tok, probs), tok, [task] * 3, probs, cfg)
    assert "teacher samples" not in capsys.readouterr().err


def test_keep_per_prompt_keeps_the_first_distinct_correct_traces_that_reason(teacher_dir) -> None:
    """--keep-per-prompt N keeps the first N distinct correct traces (not one, not N + 1); a right answer
    without a think block is no R1 trace: neither kept nor counted as the teacher's success."""
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(teacher_dir)
    task = get_task("arithmetic")
    probs = task.problems("train", 2, seed=0)
    texts = ["a\n</think>\n{}", "a\n</think>\n{}", "b\n</think>\n{}", "c\n</think>\n{}", "{}"]

    class Teacher:
        def generate_detailed(self, prompts, params, on_finish=None):
            k = len(texts)
            return [
                Completion(
                    tok.encode(texts[j % k].format(probs[j // k].answer)) + [tok.eos_token_id],
                    None,
                    "stop",
                    None,
                )
                for j in range(len(prompts))
            ]

    cfg = DistillConfig(teacher=teacher_dir, student="tiny", tasks=["arithmetic"], k=5, keep_per_prompt=2)
    kept, stats = sample_correct_traces(Teacher(), tok, [task] * 2, probs, cfg)
    got = [tok.decode(comp, skip_special_tokens=True) for _, _, comp in kept]
    assert got == [texts[i].format(p.answer) for p in probs for i in (0, 2)]
    assert stats["teacher_accuracy"] == pytest.approx(4 / 5)
    assert stats["kept_traces"] == 4


def test_preset_student_takes_teacher_vocab(teacher_dir) -> None:
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(teacher_dir)
    student = build_student("tiny", tok)
    assert student.config.vocab_size == tok.vocab_size
    assert student.config.eos_token_id == tok.eos_token_id
    with pytest.raises(KeyError):
        build_student("no-such-preset", tok)


def test_a_preset_student_has_no_untrained_mtp_module(teacher_dir) -> None:
    """Distillation trains the main head alone: `--student tiny` kept tiny's MTP module at its random
    init, saved it, and `--speculative` drafted with it as a trained one."""
    from nanoseek.config import get_preset
    from nanoseek.tokenizer import load_tokenizer

    assert get_preset("tiny").num_nextn_predict_layers == 1
    student = build_student("tiny", load_tokenizer(teacher_dir))
    assert student.config.num_nextn_predict_layers == 0 and len(student.model.mtp_layers) == 0


def test_a_preset_student_is_built_beside_a_directory_of_its_name(teacher_dir, tmp_path, monkeypatch) -> None:
    """`--student tiny-dense --out tiny-dense`: the run directory, made once the student was checked,
    was taken for the student, refused as "a path without config.json" after the teacher's sampling."""
    import nanoseek.train.distill as d
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(teacher_dir)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-dense" / "distill").mkdir(parents=True)
    d._check_student("tiny-dense", tok)
    assert build_student("tiny-dense", tok).config.vocab_size == tok.vocab_size
    (tmp_path / "elsewhere").mkdir()  # a directory of no preset's name is still named as one
    with pytest.raises(FileNotFoundError, match="elsewhere is a path without config.json"):
        d._check_student("elsewhere", tok)


def test_distill_end_to_end(teacher_dir, tmp_path, monkeypatch) -> None:
    import nanoseek.engine
    from nanoseek.checkpoint import load_model
    from nanoseek.data.tasks import get_task
    from nanoseek.metrics import read_metrics
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.sft import SFTConfig

    tok = load_tokenizer(teacher_dir)
    probs = get_task("arithmetic").problems("train", 4, seed=0)
    monkeypatch.setattr(nanoseek.engine, "Engine", lambda model, **kw: ScriptedEngine(tok, probs))
    cfg = DistillConfig(
        teacher=teacher_dir,
        student=teacher_dir,  # a checkpoint student (same tokenizer)
        tasks=["arithmetic"],
        k=4,
        prompts=4,
        out=str(tmp_path),
        sft=SFTConfig(init="", steps=2, batch_size=2, seq_len=64, lr=1e-3, progress=False),
    )
    out = distill(cfg)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    lines = (tmp_path / "distill_data.jsonl").read_text().splitlines()
    assert len(lines) == 4
    msgs = json.loads(lines[0])["messages"]
    assert msgs[0]["role"] == "user" and msgs[1]["content"].startswith("<think>\n")
    assert [r["step"] for r in read_metrics(tmp_path, "distill") if "loss" in r][-1] == 2
    (start,) = [r for r in read_metrics(tmp_path, "distill") if r.get("event") == "start"]
    assert start["teacher_accuracy"] == pytest.approx(0.5) and start["kept_traces"] > 0
    before, after = load_model(teacher_dir), load_model(out)
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True))


def test_distill_resume_trains_on_the_traces_sampled_before(teacher_dir, tmp_path, monkeypatch) -> None:
    """--resume must not sample the teacher again (minutes to hours for a real teacher) and must train
    on the same traces; a changed sampling setting is refused, not silently mixed with the old run."""
    import nanoseek.engine
    from nanoseek.data.tasks import get_task
    from nanoseek.metrics import read_metrics
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.sft import SFTConfig

    tok = load_tokenizer(teacher_dir)
    probs = get_task("arithmetic").problems("train", 4, seed=0)
    monkeypatch.setattr(nanoseek.engine, "Engine", lambda model, **kw: ScriptedEngine(tok, probs))

    def cfg(steps: int, k: int = 4) -> DistillConfig:
        sft = SFTConfig(init="", steps=steps, batch_size=2, seq_len=64, lr=1e-3, progress=False, resume=True)
        return DistillConfig(
            teacher=teacher_dir,
            student=teacher_dir,
            tasks=["arithmetic"],
            k=k,
            prompts=4,
            out=str(tmp_path),
            sft=sft,
        )

    distill(cfg(2))
    first = json.loads((tmp_path / "distill_traces.json").read_text())
    assert len(first["traces"]) == 4 and first["settings"]["k"] == 4

    def boom(*a, **k):
        raise AssertionError("sampled the teacher again on --resume")

    monkeypatch.setattr(nanoseek.engine, "Engine", boom)
    distill(cfg(3))
    assert json.loads((tmp_path / "distill_traces.json").read_text()) == first
    assert [r["step"] for r in read_metrics(tmp_path, "distill") if "loss" in r][-1] == 3
    with pytest.raises(ValueError, match="k: 4 -> 2"):
        distill(cfg(3, k=2))
    other = shutil.copytree(teacher_dir, tmp_path / "other-teacher")  # its traces are not these
    with pytest.raises(ValueError, match="teacher: .* -> .*other-teacher"):
        distill(dataclasses.replace(cfg(3), teacher=str(other)))


def test_the_teacher_samples_with_its_generation_config_where_a_flag_is_left_out(
    teacher_dir, tmp_path, monkeypatch
) -> None:
    """The teacher's sampling settings come from its generation_config.json (a Qwen2.5 teacher's top_k
    20 and repetition penalty, R1-Distill's temperature 0.6) where a flag leaves them out, as `generate`,
    `chat` and `serve` read them, and a flag given wins; they were dropped, the teacher sampled at
    distill's own 0.7 / 0.95 with nothing else. Its `do_sample: false` is not taken (k samples are
    needed); the traces record what they were sampled with."""
    import nanoseek.engine
    import nanoseek.train.distill as d
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.sft import SFTConfig

    tok = load_tokenizer(teacher_dir)
    probs = get_task("arithmetic").problems("train", 2, seed=0)
    asked = []

    class Recording(ScriptedEngine):
        def generate_detailed(self, prompts, params, on_finish=None):
            asked.append(params)
            return super().generate_detailed(prompts, params, on_finish)

    monkeypatch.setattr(nanoseek.engine, "Engine", lambda model, **kw: Recording(tok, probs))
    monkeypatch.setattr(d, "train_on_examples", lambda *a, **k: tmp_path)  # the sampling is what is tested
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}

    def run(out: str, **flags) -> dict:
        common = dict(teacher=str(teacher), student="tiny", tasks=["arithmetic"], k=4, prompts=2)
        d.distill(DistillConfig(**common, out=str(tmp_path / out), sft=SFTConfig(init=""), **flags))
        p = asked[-1]
        return {k: getattr(p, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}

    (teacher / "generation_config.json").write_text(json.dumps(gen))
    assert run("a") == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.0,
        "repetition_penalty": 1.05,
    }
    settings = json.loads((tmp_path / "a" / "distill_traces.json").read_text())["settings"]
    assert (settings["temperature"], settings["top_k"], settings["repetition_penalty"]) == (0.6, 20, 1.05)
    given = run("b", temperature=1.0, top_k=0, repetition_penalty=1.0)
    assert given == {"temperature": 1.0, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
    # a bad value in the file is refused naming it, unless the flag that replaces it is given
    (teacher / "generation_config.json").write_text(json.dumps({**gen, "top_p": 5}))
    with pytest.raises(ValueError, match=r"generation_config\.json: invalid SamplingParams: top_p"):
        run("c")
    assert run("c", top_p=0.5)["top_p"] == 0.5
    # nanoseek's own checkpoints say do_sample false: distill's own sampling, not greedy k times
    (teacher / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert run("d") == {
        "temperature": 0.7,
        "top_p": 0.95,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }


def test_the_time_budget_covers_the_teachers_sampling(teacher_dir, tmp_path, monkeypatch) -> None:
    """--max-seconds is the whole run's, "data building included" (its help): a teacher that samples past
    it leaves no time to train, not a fresh budget after it."""
    import time

    import nanoseek.engine
    from nanoseek.data.tasks import get_task
    from nanoseek.metrics import read_metrics
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.sft import SFTConfig

    tok = load_tokenizer(teacher_dir)
    probs = get_task("arithmetic").problems("train", 2, seed=0)
    clock, skew = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + skew[0])

    class SlowTeacher(ScriptedEngine):
        def generate_detailed(self, prompts, params, on_finish=None):
            skew[0] += 1000.0  # the sampling took 1000 s
            return super().generate_detailed(prompts, params, on_finish)

    monkeypatch.setattr(nanoseek.engine, "Engine", lambda model, **kw: SlowTeacher(tok, probs))
    sft = SFTConfig(init="", steps=2, batch_size=2, seq_len=64, progress=False, max_seconds=500.0)
    cfg = DistillConfig(
        teacher=teacher_dir, student="tiny", tasks=["arithmetic"], k=4, prompts=2, out=str(tmp_path), sft=sft
    )
    distill(cfg)
    assert not [r for r in read_metrics(tmp_path, "distill") if "loss" in r]


def test_distill_help_names_its_own_checkpoint_to_resume(capsys) -> None:
    """--resume is SFTConfig's flag, shared: distill's student resumes from RUN/distill/."""
    from nanoseek.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--resume continue from RUN/sft/ (distill: RUN/distill/)" in help_text


def _refused_before_sampling(monkeypatch, match: str, **settings) -> None:
    """`distill` with these settings fails with `match` before the teacher is sampled."""
    import nanoseek.train.distill as d
    from nanoseek.train.sft import SFTConfig

    def boom(*a, **k):
        raise AssertionError("sampled the teacher before checking the settings")

    monkeypatch.setattr(d, "sample_correct_traces", boom)
    with pytest.raises((KeyError, ValueError), match=match):
        d.distill(d.DistillConfig(tasks=["arithmetic"], sft=SFTConfig(init=""), **settings))


def test_greedy_sampling_of_several_traces_is_refused_before_sampling(
    micro_checkpoint, tmp_path, monkeypatch
):
    """-k samples per prompt at a temperature the engine decodes greedily are one trace k times (and
    --keep-per-prompt 2 can never be met): refused as eval -k and generate --num-samples refuse it,
    before the teacher samples, instead of k times the sampling for nothing."""
    for t in (0.0, 1e-6):
        _refused_before_sampling(
            monkeypatch,
            "decodes greedily",
            teacher=micro_checkpoint,
            student="tiny",
            k=4,
            temperature=t,
            out=str(tmp_path),
        )
    _refused_before_sampling(
        monkeypatch,
        "temperature must be >= 0",
        teacher=micro_checkpoint,
        student="tiny",
        k=1,
        temperature=-0.5,
        out=str(tmp_path),
    )
    _refused_before_sampling(  # inf passed: the teacher's samples uniform draws over the vocabulary
        monkeypatch,
        "temperature must be >= 0 and finite",
        teacher=micro_checkpoint,
        student="tiny",
        k=1,
        temperature=float("inf"),
        out=str(tmp_path),
    )


def test_a_max_batch_size_below_one_is_refused_before_sampling(micro_checkpoint, tmp_path, monkeypatch):
    """`--max-batch-size 0` was refused by the engine only once the teacher had loaded; serve and eval
    say it before anything loads."""
    _refused_before_sampling(
        monkeypatch,
        "--max-batch-size must be >= 1, got 0",
        teacher=micro_checkpoint,
        student="tiny",
        max_batch_size=0,
        out=str(tmp_path),
    )


def test_a_hub_teacher_is_not_fetched_before_the_flags_are_checked(tmp_path, monkeypatch) -> None:
    """A teacher named on the Hub (R1 distils from Hub models) was downloaded, all its weights, before
    -k at a greedy temperature or --max-batch-size 0 was refused; offline, the Hub's error hid the flag's."""
    import huggingface_hub

    def fetch(repo_id, **kw):
        raise AssertionError(f"fetched {repo_id} before checking the flags")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    for bad in ({"k": 4, "temperature": 0.0}, {"max_batch_size": 0}):
        _refused_before_sampling(
            monkeypatch,
            "greedily|max-batch-size",
            teacher="someone/teacher",
            student="tiny",
            out=str(tmp_path),
            **bad,
        )


def test_distill_checks_the_student_before_sampling(micro_checkpoint, tmp_path, monkeypatch) -> None:
    _refused_before_sampling(
        monkeypatch, "preset", teacher=micro_checkpoint, student="no-such-preset", out=str(tmp_path)
    )


def test_a_student_with_another_tokenizer_is_refused_before_sampling(micro_checkpoint, tmp_path, monkeypatch):
    """A Qwen2.5-style student (its own ChatML tokenizer, embeddings larger than the teacher's vocabulary)
    was trained on the teacher's ids, which mean other tokens to it, and saved with the teacher's tokenizer
    over its own; it is refused, before the teacher is sampled, with what to do instead."""
    import nanoseek.train.distill as d
    from model_configs import chatml_checkpoint
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.sft import SFTConfig

    def boom(*a, **k):
        raise AssertionError("sampled the teacher before checking --student")

    monkeypatch.setattr(d, "sample_correct_traces", boom)
    tok = load_tokenizer(micro_checkpoint)
    student = chatml_checkpoint(tmp_path / "qwen", vocab_size=tok.vocab_size + 64)
    cfg = d.DistillConfig(
        teacher=micro_checkpoint,
        student=str(student),
        tasks=["arithmetic"],
        out=str(tmp_path / "run"),
        sft=SFTConfig(init=""),
    )
    with pytest.raises(ValueError, match="another tokenizer.*nanoseek sft --init"):
        d.distill(cfg)
    with pytest.raises(ValueError, match="another tokenizer"):
        d.build_student(str(student), tok)
    # a student of the teacher's own tokenizer is taken as it is
    assert d.build_student(micro_checkpoint, tok).config.vocab_size == tok.vocab_size


def test_the_sft_command_suggested_for_another_tokenizer_quotes_its_path(micro_checkpoint, tmp_path) -> None:
    """The `nanoseek sft --init PATH` the refusal prints for pasting quotes PATH for the shell, as the
    speedrun's and export's commands do: a student in a directory with a space was two arguments."""
    import shlex

    import nanoseek.train.distill as d
    from model_configs import chatml_checkpoint
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_checkpoint)
    student = chatml_checkpoint(tmp_path / "my models" / "qwen", vocab_size=tok.vocab_size + 64)
    with pytest.raises(ValueError, match="another tokenizer") as e:
        d.build_student(str(student), tok)
    command = str(e.value).split("traces' text: ")[1]
    assert shlex.split(command)[:4] == ["nanoseek", "sft", "--init", str(student)]


def test_a_student_by_hub_name_resolves_as_the_teacher_does(micro_checkpoint, tmp_path, monkeypatch) -> None:
    """--student owner/name is a Hub name (R1 distils into Hub models), not an unknown preset; offline and
    not cached it is the teacher's one error."""
    import huggingface_hub
    from huggingface_hub import constants

    import nanoseek.train.distill as d
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_checkpoint)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: micro_checkpoint)
    d._check_student("someone/student", tok)
    assert d.build_student("someone/student", tok).config.vocab_size == tok.vocab_size
    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="--student someone/absent is not a local directory"):
        d._check_student("someone/absent", tok)


@pytest.mark.parametrize("template", ["r1", "chatml"])
@pytest.mark.parametrize(
    "task, teacher_solves", [("arithmetic", True), ("arithmetic", False), ("arithmetic?turn=2", True)]
)
def test_distill_data_renders_as_the_student_was_trained(
    template, task, teacher_solves, micro_checkpoint, tmp_path, monkeypatch, capsys
) -> None:
    """RUN/distill_data.jsonl, read back by `nanoseek sft --data`, is the traces the student trained on,
    token for token and nothing else, for a teacher whose template opens the think block (R1's) and one
    whose completion opens it itself (ChatML's): the file held a doubled <think>, the reference
    solutions of --fallback-reference were trained without their opening <think>, after a ChatML
    prompt, and a chat's earlier answer (`?turn=2`) was one more example, a reply without reasoning."""
    import nanoseek.engine
    from model_configs import chatml_checkpoint
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.sft import SFTConfig, completion_example, tokenize_conversation

    teacher = micro_checkpoint if template == "r1" else str(chatml_checkpoint(tmp_path / "teacher"))
    tok = load_tokenizer(teacher)
    probs = get_task(task).problems("train", 2, seed=0)
    opening = "" if template == "r1" else "<think>\n"  # what the completion writes itself

    class Teacher:
        def generate_detailed(self, prompts, params, on_finish=None):
            k = len(prompts) // len(probs)
            answers = [p.answer if teacher_solves else str(int(p.answer) + 1) for p in probs]
            return [
                Completion(
                    tok.encode(f"{opening}add\n</think>\n{answers[j // k]}") + [tok.eos_token_id],
                    None,
                    "stop",
                    None,
                )
                for j in range(len(prompts))
            ]

    monkeypatch.setattr(nanoseek.engine, "Engine", lambda model, **kw: Teacher())
    cfg = DistillConfig(
        teacher=teacher,
        student=teacher,
        tasks=[task],
        k=1,
        prompts=2,
        fallback_reference=True,
        out=str(tmp_path / "run"),
        sft=SFTConfig(init="", steps=1, batch_size=1, seq_len=128, progress=False),
    )
    distill(cfg)
    # the fallback's warning on stderr, seen where stdout goes to a log file
    assert ("teacher solved nothing" in capsys.readouterr().err) == (not teacher_solves)
    saved = json.loads((tmp_path / "run" / "distill_traces.json").read_text())
    traces = saved["traces"]
    assert saved["stats"]["kept_traces"] == len(traces)  # the reference solutions, when they stand in
    lines = (tmp_path / "run" / "distill_data.jsonl").read_text().splitlines()
    assert len(traces) == len(lines) == 2
    for trace, line in zip(traces, lines, strict=True):
        trained = completion_example(trace["prompt"], trace["completion"], tok.stop_token_ids)
        assert tokenize_conversation(tok, json.loads(line)["messages"]) == [trained]
        assert tok.decode(trained[0]).count("<think>") == 1


def test_distill_help_offers_no_flag_it_ignores(capsys) -> None:
    """--multi-turn shapes `sft --task` chats; the student's data here is the teacher's traces."""
    from nanoseek.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    assert "--multi-turn" not in capsys.readouterr().out


def test_an_out_it_cannot_write_is_refused_before_sampling(micro_checkpoint, tmp_path, monkeypatch) -> None:
    """An --out that is a file (or on a read-only disk) failed the first write, the traces', after the
    whole sampling of the teacher."""
    (tmp_path / "file").write_text("")
    _refused_before_sampling(
        monkeypatch,
        "cannot write --out .*file: Not a directory",
        teacher=micro_checkpoint,
        student="tiny",
        out=str(tmp_path / "file"),
    )


def test_keep_per_prompt_zero_is_refused_before_sampling(micro_checkpoint, tmp_path, monkeypatch) -> None:
    """--keep-per-prompt 0 kept nothing the teacher solved: it failed as "the teacher produced no correct
    trace" after the sampling, or, with --fallback-reference, trained on the reference solutions."""
    _refused_before_sampling(
        monkeypatch,
        "--keep-per-prompt must be >= 1",
        teacher=micro_checkpoint,
        student="tiny",
        keep_per_prompt=0,
        out=str(tmp_path),
    )


def _teacher_solving_nothing(monkeypatch, checkpoint) -> list:
    """The engine stubbed by a teacher whose every trace is wrong; returns the prompts it was asked."""
    import nanoseek.engine
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    asked = []

    class Teacher:
        def generate_detailed(self, prompts, params, on_finish=None):
            asked.extend(prompts)
            wrong = tok.encode("add\n</think>\nnot a number") + [tok.eos_token_id]
            return [Completion(wrong, None, "stop", None) for _ in prompts]

    monkeypatch.setattr(nanoseek.engine, "Engine", lambda model, **kw: Teacher())
    return asked


def test_a_teacher_that_solves_nothing_names_the_fallback(micro_checkpoint, tmp_path, monkeypatch) -> None:
    """No correct trace is a clear error that names the way on: --fallback-reference."""
    from nanoseek.train.sft import SFTConfig

    _teacher_solving_nothing(monkeypatch, micro_checkpoint)
    cfg = DistillConfig(
        teacher=micro_checkpoint,
        student=micro_checkpoint,
        tasks=["arithmetic"],
        k=1,
        prompts=2,
        out=str(tmp_path / "run"),
        sft=SFTConfig(init="", steps=1, batch_size=1, seq_len=128, progress=False),
    )
    with pytest.raises(ValueError, match="no correct trace.*--fallback-reference"):
        distill(cfg)


def _jsonl_distill(checkpoint, path, tmp_path) -> DistillConfig:
    """Distillation of `checkpoint` into itself on the jsonl: task at `path`, one sample a problem."""
    from nanoseek.train.sft import SFTConfig

    return DistillConfig(
        teacher=checkpoint,
        student=checkpoint,
        tasks=[f"jsonl:{path}"],
        k=1,
        out=str(tmp_path / "run"),
        sft=SFTConfig(init="", steps=1, batch_size=1, seq_len=128, progress=False),
    )


def test_a_small_jsonl_task_under_the_default_prompts_is_no_warning(micro_checkpoint, tmp_path, monkeypatch):
    """`distill --task jsonl:FILE` under the default --prompts (256) samples every training line of a
    smaller file, without a warning about 256 problems the user never asked for."""

    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{i}+1?", "answer": i + 1, "split": "train"}) + "\n" for i in range(3))
    )
    asked = _teacher_solving_nothing(monkeypatch, micro_checkpoint)
    cfg = _jsonl_distill(micro_checkpoint, path, tmp_path)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError, match="no correct trace"):
        warnings.simplefilter("always")
        distill(cfg)
    assert not [w for w in caught if "asked for" in str(w.message)] and len(asked) == 3


def test_a_bad_line_of_a_jsonl_task_is_named_before_the_teacher_loads(
    micro_checkpoint, tmp_path, monkeypatch
):
    """A jsonl: task's bad line was found once the teacher had loaded (minutes for a large one)."""
    import nanoseek.checkpoint
    from nanoseek.train.sft import SFTConfig

    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps({"prompt": "1+1?", "answer": 2}) + "\n" + json.dumps({"question": "2+2?"}) + "\n"
    )
    monkeypatch.setattr(nanoseek.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the teacher"))
    cfg = DistillConfig(
        teacher=micro_checkpoint,
        student="tiny",
        tasks=[f"jsonl:{path}"],
        out=str(tmp_path / "run"),
        sft=SFTConfig(init="", steps=1, batch_size=1, seq_len=128, progress=False),
    )
    with pytest.raises(ValueError, match=r"qa.jsonl:2: each line needs a non-empty string \"prompt\""):
        distill(cfg)


def test_a_problem_the_teachers_context_cannot_hold_is_named_before_sampling(
    micro_checkpoint, tmp_path, monkeypatch
):
    """A JSONL problem longer than the teacher's context ended the sampling with the engine's "prompt has
    N tokens", naming no problem (`eval` and `grpo` name it)."""

    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": "1+1?", "answer": 2}, {"prompt": "long question: " + "1+1 " * 800, "answer": 2}]
    path.write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    asked = _teacher_solving_nothing(monkeypatch, micro_checkpoint)
    cfg = _jsonl_distill(micro_checkpoint, path, tmp_path)
    with pytest.raises(ValueError, match=r"1 problem leaves no room to answer in the model's context of 1024 "
                       r"tokens: \S+ 'long question: 1\+1 1\+1 1\+1 1\+1'"):  # fmt: skip
        distill(cfg)
    assert not asked


@pytest.mark.parametrize(
    ("text", "message"), [('{"settings": {"k"', "not valid JSON"), ("{}", "no sampling")]
)
def test_distill_resume_names_a_damaged_traces_file(tmp_path, text, message) -> None:
    """A truncated or hand-edited distill_traces.json: a bare JSON error (or a KeyError) named no file."""
    from nanoseek.train.distill import _traces_to_reuse

    (tmp_path / "distill_traces.json").write_text(text)
    with pytest.raises(ValueError, match=rf"distill_traces\.json.*{message}"):
        _traces_to_reuse(tmp_path / "distill_traces.json", {"k": 4})


def test_traces_saved_before_distill_read_top_k_resume_and_a_change_of_it_is_refused(tmp_path) -> None:
    """A run's traces saved before distill read the teacher's top_k, min_p and repetition_penalty were
    sampled with them off: they resume with those off, and are refused with a teacher's top_k 20."""
    from nanoseek.train.distill import _traces_to_reuse

    old = {"k": 4, "temperature": 0.7, "top_p": 0.95}
    (tmp_path / "distill_traces.json").write_text(json.dumps({"settings": old, "stats": {}, "traces": []}))
    now = {**old, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
    assert _traces_to_reuse(tmp_path / "distill_traces.json", now) is not None
    with pytest.raises(ValueError, match="top_k: 0 -> 20"):
        _traces_to_reuse(tmp_path / "distill_traces.json", {**now, "top_k": 20})


def test_a_student_whose_config_json_is_no_object_is_named(teacher_dir, tmp_path) -> None:
    """Its vocabulary check read config.json raw: a list there was an AttributeError traceback."""
    from nanoseek.tokenizer import load_tokenizer

    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"config\.json is not a JSON object"):
        build_student(str(tmp_path), load_tokenizer(teacher_dir))


def test_a_student_with_its_own_smaller_vocabulary_is_told_of_its_tokenizer(
    micro_checkpoint, tmp_path
) -> None:
    """A student with its own tokenizer and fewer rows than the teacher's vocabulary (Llama 3's 128,256 under
    R1's 129,280) was told only that its vocab_size is too small, not that it speaks other tokens and how to
    train it on the traces' text instead."""
    import nanoseek.train.distill as d
    from model_configs import chatml_checkpoint
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_checkpoint)
    student = chatml_checkpoint(tmp_path / "llama-like")
    assert load_tokenizer(student).vocab_size < tok.vocab_size
    with pytest.raises(ValueError, match="another tokenizer.*nanoseek sft --init"):
        d._check_student(str(student), tok)


def test_the_refusal_of_another_tokenizer_says_where_the_traces_text_comes_from(micro_checkpoint, tmp_path):
    """The refusal pointed at RUN/distill_data.jsonl, which a run refused before sampling never writes: it
    names the run that does (a distill into a preset)."""
    import nanoseek.train.distill as d
    from model_configs import chatml_checkpoint
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_checkpoint)
    student = chatml_checkpoint(tmp_path / "qwen", vocab_size=tok.vocab_size + 64)
    with pytest.raises(
        ValueError, match=r"distil into a preset \(--student tiny-qwen2\), which also writes RUN/"
    ):
        d._check_student(str(student), tok)


def test_a_student_with_only_a_slow_tokenizer_is_refused(micro_checkpoint, tmp_path) -> None:
    """A student whose tokenizer is in a slow format only (Llama 2's tokenizer.model, GPT-2's vocab.json)
    was taken as one without a tokenizer: trained on the teacher's ids, which mean other tokens to it."""
    import nanoseek.train.distill as d
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_checkpoint)
    student = tmp_path / "llama2"
    shutil.copytree(micro_checkpoint, student)
    (student / "tokenizer.json").unlink()
    (student / "tokenizer.model").write_bytes(b"\n\x0b\n\x05<unk>")  # sentencepiece's protobuf
    with pytest.raises(ValueError, match=r"its own tokenizer \(tokenizer\.model\) but no tokenizer\.json"):
        d._check_student(str(student), tok)
    (student / "tokenizer.model").unlink()  # no tokenizer at all: it takes the teacher's
    d._check_student(str(student), tok)


def test_fallback_reference_without_reference_solutions_says_so(
    micro_checkpoint, tmp_path, monkeypatch
) -> None:
    """--fallback-reference on a task without worked solutions (a JSONL file without "reasoning") printed
    "training the student on 0 reference solutions", then told the user to pass --fallback-reference."""
    from nanoseek.train.sft import SFTConfig

    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{i}+1?", "answer": i + 1, "split": "train"}) + "\n" for i in range(2))
    )
    _teacher_solving_nothing(monkeypatch, micro_checkpoint)
    cfg = DistillConfig(
        teacher=micro_checkpoint,
        student=micro_checkpoint,
        tasks=[f"jsonl:{path}"],
        k=1,
        fallback_reference=True,
        out=str(tmp_path / "run"),
        sft=SFTConfig(init="", steps=1, batch_size=1, seq_len=128, progress=False),
    )
    with pytest.raises(ValueError, match='no reference solutions.*add "reasoning"') as e:
        distill(cfg)
    assert "pass --fallback-reference" not in str(e.value)


def test_max_new_tokens_below_one_is_refused_before_sampling(micro_checkpoint, tmp_path, monkeypatch) -> None:
    """--max-new-tokens 0 was refused by the engine only once the teacher had loaded (minutes for a real one)."""
    _refused_before_sampling(
        monkeypatch,
        "max_new_tokens must be >= 1, got 0",
        teacher=micro_checkpoint,
        student="tiny",
        max_new_tokens=0,
        out=str(tmp_path),
    )


def test_a_task_named_twice_is_refused_before_sampling(micro_checkpoint, tmp_path, monkeypatch) -> None:
    """`--task arithmetic,arithmetic` sampled every problem twice and kept up to twice --keep-per-prompt
    traces of it (the same trace twice among them); refused as grpo refuses it."""
    import nanoseek.train.distill as d
    from nanoseek.train.sft import SFTConfig

    def boom(*a, **k):
        raise AssertionError("sampled the teacher before checking --task")

    monkeypatch.setattr(d, "sample_correct_traces", boom)
    cfg = d.DistillConfig(
        teacher=micro_checkpoint,
        student="tiny",
        tasks=d.split_task_list("arithmetic,countdown,arithmetic"),
        out=str(tmp_path),
        sft=SFTConfig(init=""),
    )
    with pytest.raises(ValueError, match="--task names arithmetic more than once"):
        d.distill(cfg)


@pytest.mark.parametrize("preset", [True, False])
def test_a_seq_len_past_the_students_context_is_refused_before_sampling(
    preset, micro_checkpoint, tmp_path, monkeypatch
) -> None:
    """--seq-len past the student's max_position_embeddings was refused by its fine-tuning, once the
    teacher's whole sampling was done."""
    import nanoseek.train.distill as d
    from nanoseek.config import ModelConfig, get_preset
    from nanoseek.train.sft import SFTConfig

    def boom(*a, **k):
        raise AssertionError("sampled the teacher before checking --seq-len")

    monkeypatch.setattr(d, "sample_correct_traces", boom)
    student = "tiny-qwen2" if preset else micro_checkpoint
    context = (get_preset(student) if preset else ModelConfig.load(micro_checkpoint)).max_position_embeddings
    cfg = d.DistillConfig(
        teacher=micro_checkpoint,
        student=student,
        tasks=["arithmetic"],
        out=str(tmp_path),
        sft=SFTConfig(init="", seq_len=2 * context),
    )
    with pytest.raises(
        ValueError, match=f"--seq-len {2 * context} exceeds the model's max_position_embeddings"
    ):
        d.distill(cfg)


def test_a_student_path_is_read_as_the_teachers(micro_checkpoint, tmp_path, monkeypatch) -> None:
    """`--student=~/models/x` (left unexpanded by the shell) and a mistyped path were "unknown preset"
    errors, where --teacher expands `~` and names a missing directory."""
    import nanoseek.train.distill as d
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_checkpoint)
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(micro_checkpoint, tmp_path / "student")
    d._check_student("~/student", tok)
    assert d.build_student("~/student", tok).config.vocab_size == tok.vocab_size
    with pytest.raises(FileNotFoundError, match="--student .*missing is not a checkpoint directory"):
        d._check_student(str(tmp_path / "missing"), tok)


def test_a_tasks_string_from_python_is_refused_by_its_type(micro_checkpoint, tmp_path) -> None:
    """`DistillConfig(tasks="arithmetic")` (a str, not the list `--task` parses) was refused as
    "--task names i, t more than once": its letters read as task names. Said by its type, as the other
    stages' configs say it."""
    import nanoseek.train.distill as d
    from nanoseek.train.sft import SFTConfig

    cfg = d.DistillConfig(
        teacher=micro_checkpoint,
        student="tiny",
        tasks="arithmetic",
        out=str(tmp_path),
        sft=SFTConfig(init=""),
    )
    with pytest.raises(ValueError, match=r"--task must be of type list\[str\], got 'arithmetic' \(str\)"):
        d.distill(cfg)


_SAMPLE = st.tuples(st.sampled_from(["right", "wrong", "cut", "no think"]), st.sampled_from(["a", "b", "c"]))


@settings(max_examples=60)
@given(
    k=st.integers(1, 5),
    keep_per_prompt=st.integers(1, 3),
    data=st.data(),
)
def test_rejection_sampling_keeps_the_first_distinct_correct_finished_traces_token_for_token(
    micro_checkpoint, k, keep_per_prompt, data
) -> None:
    """Whatever the teacher writes (right, wrong, cut at its token limit, right without reasoning, the
    same trace twice), each prompt keeps its first `keep_per_prompt` distinct right and finished traces,
    in order, as the very token ids the teacher sampled after that prompt's ids; the student's example is
    those ids with labels on the completion alone; the statistics count what was kept and solved."""
    from nanoseek.data.tasks import get_task
    from nanoseek.evaluate import chat_prompt_ids
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.sft import IGNORE, completion_example

    teacher_dir = micro_checkpoint  # (the session's: a property test's fixtures outlive its examples)
    tok = load_tokenizer(teacher_dir)
    task = get_task("arithmetic")
    probs = task.problems("train", data.draw(st.integers(1, 3)), seed=0)
    plan = data.draw(st.lists(_SAMPLE, min_size=len(probs) * k, max_size=len(probs) * k))

    def completion(j: int) -> Completion:
        kind, why = plan[j]
        p = probs[j // k]
        answer = p.answer if kind != "wrong" else str(int(p.answer) + 1)
        text = answer if kind == "no think" else f"{why}\n</think>\n{answer}"
        ids = tok.encode(text) + ([] if kind == "cut" else [tok.eos_token_id])
        return Completion(ids, None, "length" if kind == "cut" else "stop", None)

    class Teacher:
        def generate_detailed(self, prompts, params, on_finish=None):
            assert prompts == [chat_prompt_ids(tok, p.messages) for p in probs for _ in range(k)]
            return [completion(j) for j in range(len(prompts))]

    cfg = DistillConfig(
        teacher=teacher_dir, student="tiny", tasks=["arithmetic"], k=k, keep_per_prompt=keep_per_prompt
    )
    cfg.sft.progress = False
    kept, stats = sample_correct_traces(Teacher(), tok, [task] * len(probs), probs, cfg)
    want, solved = [], 0
    for i, p in enumerate(probs):
        mine: list[list[int]] = []
        for j in range(i * k, (i + 1) * k):
            if plan[j][0] != "right":
                continue
            solved += 1
            ids = completion(j).token_ids
            if ids not in mine and len(mine) < keep_per_prompt:
                mine.append(ids)
        want += [(p, chat_prompt_ids(tok, p.messages), ids) for ids in mine]
    assert kept == want
    assert stats["teacher_accuracy"] == pytest.approx(solved / (len(probs) * k))
    assert stats["prompts_with_correct"] == pytest.approx(len({id(p) for p, *_ in want}) / len(probs))
    assert stats["kept_traces"] == len(want)
    for _, prompt_ids, comp in kept:
        ids, labels = completion_example(prompt_ids, comp, tok.stop_token_ids)
        assert ids == prompt_ids + comp and labels == [IGNORE] * len(prompt_ids) + comp


@settings(max_examples=100)
@given(
    prompt=st.lists(st.integers(0, 20), max_size=5),
    completion=st.lists(st.integers(0, 20), max_size=5),
    stops=st.lists(st.integers(0, 20), min_size=1, max_size=3, unique=True),
)
def test_a_trace_is_trained_on_its_own_ids_then_one_stop(prompt, completion, stops) -> None:
    """A completion (a kept trace, a reference solution) is trained on exactly its ids, then the first
    stop id where it ended without one; the prompt is never trained."""
    from nanoseek.train.sft import IGNORE, completion_example

    ids, labels = completion_example(prompt, completion, stops)
    ended = bool(completion) and completion[-1] in stops
    target = completion if ended else [*completion, stops[0]]
    assert ids == prompt + target and labels == [IGNORE] * len(prompt) + target


_FIELDS = {
    "temperature": st.sampled_from([0.3, 0.6, 1.0]),
    "top_p": st.sampled_from([0.5, 0.95, 1.0]),
    "top_k": st.sampled_from([0, 20, 50]),
    "min_p": st.sampled_from([0.0, 0.05]),
    "repetition_penalty": st.sampled_from([1.0, 1.1]),
}


@settings(max_examples=100)
@given(
    flags=st.fixed_dictionaries({}, optional=_FIELDS),
    file=st.fixed_dictionaries(
        {}, optional={**_FIELDS, "do_sample": st.booleans(), "max_new_tokens": st.just(7)}
    ),
)
def test_each_sampling_setting_of_the_teacher_is_its_flag_else_its_files_else_the_default(
    flags, file
) -> None:
    """Every sampling setting, independently: the flag where given, else the teacher's
    generation_config.json value, else TEACHER_SAMPLING's; the file's do_sample (greedy) is never taken,
    since rejection sampling draws k samples."""
    import contextlib
    import io

    from nanoseek.train.distill import TEACHER_SAMPLING, teacher_sampling

    cfg = DistillConfig(teacher="t", student="tiny", tasks=["arithmetic"], **flags)
    with contextlib.redirect_stdout(io.StringIO()):
        got = teacher_sampling(cfg, dict(file), "generation_config.json")
    for k, default in TEACHER_SAMPLING.items():
        assert getattr(got, k) == flags.get(k, file.get(k, default)), k
    assert got.max_new_tokens == cfg.max_new_tokens
