"""`nanoseek pretrain` end to end on the embedded corpus with a micro model: checkpoint layout with a
trained tokenizer, metrics, validation, exact resume through PackedDataset's data position, CLI errors."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from nanoseek.cli import main  # noqa: E402
from nanoseek.metrics import read_metrics  # noqa: E402
from nanoseek.train.pretrain import PretrainConfig, pretrain, resolve_precision  # noqa: E402
from test_train_loop import micro_model  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A micro model config and a tokenizer trained once for the module."""
    from nanoseek.data.corpus import iter_documents
    from nanoseek.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("pretrain")
    cfg = micro_model().config.replace(max_position_embeddings=64)
    docs = [doc for _, doc in zip(range(400), iter_documents("embedded"), strict=False)]
    tok = train_tokenizer(docs, vocab_size=320)
    tok.save(d / "tok")
    cfg.replace(vocab_size=tok.vocab_size).save(d / "micro")
    return d


def config(workdir: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(
        out=str(out),
        preset=str(workdir / "micro"),
        tokenizer=str(workdir / "tok"),
        steps=6,
        batch_size=4,
        seq_len=32,
        lr=1e-2,
        warmup_steps=2,
        val_every=3,
        val_batches=2,
        checkpoint_every=0,
        precision="fp32",
        progress=False,
    )
    base.update(kw)
    return PretrainConfig(**base)


def test_threads_asked_of_a_stage_are_given_back_after_it(workdir, tmp_path) -> None:
    """torch's thread count is the process's: a notebook went on at the stage's --threads for the rest
    of its session, after a finished stage and after an interrupted one."""

    def interrupt(step: int) -> None:
        raise KeyboardInterrupt

    pretrain(config(workdir, tmp_path / "a", steps=1, val_every=0, threads=2))
    assert torch.get_num_threads() == 1  # the autouse fixture's
    with pytest.raises(KeyboardInterrupt):
        pretrain(config(workdir, tmp_path / "b", steps=2, val_every=0, threads=2), on_step=interrupt)
    assert torch.get_num_threads() == 1


def test_pretrain_writes_checkpoint_metrics_and_summary(workdir, tmp_path, capsys) -> None:
    path = pretrain(config(workdir, tmp_path / "run"))
    assert path == tmp_path / "run" / "pretrain"
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "train_state",
    } <= names
    cfg = json.loads((path / "config.json").read_text())
    tok = json.loads((path / "tokenizer.json").read_text())
    assert cfg["model_type"] == "deepseek_v3"
    assert cfg["vocab_size"] == len(tok["model"]["vocab"]) + len(
        [t for t in tok["added_tokens"] if t["content"] not in tok["model"]["vocab"]]
    )
    records = list(read_metrics(tmp_path / "run", stage="pretrain"))
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r and "event" not in r] == [3, 6]
    assert all("mtp_loss" in r and "expert_imbalance_max" in r for r in steps)
    out = capsys.readouterr().out
    from nanoseek.accounting import count_parameters, human
    from nanoseek.config import ModelConfig

    # the model's count as `nanoseek inspect`, the report, chat and serve give it: the MTP module apart
    assert f"({count_parameters(ModelConfig.load(path)).described}, vocab" in out
    assert "pretrain: 6 steps" in out and "train loss" in out and "val loss" in out and str(path) in out
    # a short run's tokens are counted as `inspect` counts: "0.00M tokens" said nothing
    tokens = steps[-1]["tokens"]
    assert f"6 steps, {human(tokens)} tokens in" in out and "0.00M" not in out
    if not torch.cuda.is_available():  # what a CPU run's speed depends on (the fixture's 1 thread)
        assert "1 process x 1 CPU thread\n" in out

    from nanoseek.checkpoint import load_model

    model = load_model(path)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, cfg["vocab_size"])


def test_the_summary_gives_the_loss_of_the_last_step_kept(workdir, tmp_path, capsys, monkeypatch) -> None:
    """A last step skipped for a NaN loss made the summary say "train loss nan" of weights it left as
    the step before's (the report gives that step's loss), and "1 steps skipped"."""
    import math

    from nanoseek.train import loop

    lm_loss, calls = loop.language_model_loss, []

    def nan_at_the_last_step(*args, **kwargs):
        loss, m = lm_loss(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan, m) if len(calls) == 6 else (loss, m)

    monkeypatch.setattr(loop, "language_model_loss", nan_at_the_last_step)
    pretrain(config(workdir, tmp_path / "run", val_every=0, val_batches=0))
    out = capsys.readouterr().out
    kept = [r for r in read_metrics(tmp_path / "run", stage="pretrain") if "loss" in r and "skipped" not in r]
    assert len(kept) == 5
    assert f"train loss {kept[-1]['lm_loss']:.3f}" in out and ", 1 step skipped;" in out, out


def test_the_step_that_ends_a_diverged_run_is_in_metrics_jsonl(workdir, tmp_path, monkeypatch) -> None:
    """The divergence error names the steps skipped up to the last one, but metrics.jsonl held those
    before it: a plot of the run's metrics ended a step short of its blow-up."""
    import math

    from nanoseek.train import TrainingDiverged, loop

    lm_loss = loop.language_model_loss

    def nan_loss(*args, **kwargs):
        loss, m = lm_loss(*args, **kwargs)
        return loss * math.nan, m

    monkeypatch.setattr(loop, "language_model_loss", nan_loss)
    with pytest.raises(TrainingDiverged, match=r"optimizer steps 1-10, last: non-finite loss"):
        pretrain(config(workdir, tmp_path / "run", steps=12, val_every=0, val_batches=0))
    steps = [r for r in read_metrics(tmp_path / "run", stage="pretrain") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert all(r["skipped"] == "non-finite loss" for r in steps)


def test_a_standalone_pretrain_gives_the_report_its_model_table(workdir, tmp_path) -> None:
    """`nanoseek pretrain --out RUN` then `nanoseek report RUN`: the parameters and KV-cache bytes of
    `nanoseek inspect`, not "–" (only a speedrun logged them)."""
    from nanoseek.accounting import account
    from nanoseek.report import _human, build_report

    run = tmp_path / "run"
    pretrain(config(workdir, run, steps=2, val_every=0))
    acc = account(run / "pretrain")
    text = build_report(run).read_text()
    assert f"| parameters, total | {_human(acc.total_params)} |" in text
    assert f"| parameters, active per token | {_human(acc.active_params)} |" in text
    assert f"| KV-cache bytes per token (MLA, BF16) | {acc.kv_cache_bytes_per_token:,} (" in text


def test_the_report_names_a_gqa_models_cache_as_gqa(workdir, tmp_path) -> None:
    """A Qwen2-shaped model pretrained by hand caches K and V heads: its report said "(MLA, BF16)"."""
    from nanoseek.accounting import account
    from nanoseek.config import get_preset
    from nanoseek.report import build_report

    vocab = json.loads((workdir / "micro" / "config.json").read_text())["vocab_size"]
    get_preset("tiny-qwen2").replace(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        max_position_embeddings=64,
    ).save(tmp_path / "qwen2")
    run = tmp_path / "run"
    pretrain(config(workdir, run, preset=str(tmp_path / "qwen2"), steps=1, val_every=0))
    kv = account(run / "pretrain").kv_cache_bytes_per_token
    assert f"| KV-cache bytes per token (GQA, BF16) | {kv:,} (" in build_report(run).read_text()


def test_pretrain_resume_matches_uninterrupted(workdir, tmp_path) -> None:
    kw = dict(schedule="constant", warmup_steps=0, val_every=0)
    pretrain(config(workdir, tmp_path / "a", steps=6, **kw))
    pretrain(config(workdir, tmp_path / "b", steps=3, **kw))
    pretrain(config(workdir, tmp_path / "b", steps=6, resume=True, **kw))

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(run, stage="pretrain") if "loss" in r]

    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # bitwise, through the data position


def test_a_python_caller_may_give_paths(workdir, tmp_path) -> None:
    """`out`, `preset`, `tokenizer` as `Path`s from Python (a notebook): the run trained to its end and
    then failed to write its train state (a Path is no JSON), losing the run; its resume likewise."""
    paths = dict(out=tmp_path, preset=workdir / "micro", tokenizer=workdir / "tok")
    cfg = dataclasses.replace(config(workdir, tmp_path, steps=2, val_every=0), **paths)
    pretrain(cfg)
    pretrain(dataclasses.replace(cfg, steps=3, resume=True))
    assert [r["step"] for r in read_metrics(tmp_path, stage="pretrain") if "loss" in r] == [1, 2, 3]


def test_a_run_named_after_its_preset_trains(workdir, tmp_path, monkeypatch) -> None:
    """`nanoseek pretrain --out tiny` (the default --preset tiny): the run directory, made before the
    preset is read, was taken for a model directory and refused, "no config.json at tiny/config.json"."""
    monkeypatch.chdir(tmp_path)
    cfg = config(workdir, "tiny", preset="tiny", steps=1, batch_size=1, seq_len=16, val_every=0)
    assert pretrain(cfg) == Path("tiny") / "pretrain"


def test_resuming_a_finished_run_trains_validates_and_writes_nothing(workdir, tmp_path, capsys) -> None:
    """`--resume` of a run already at --steps validated and saved it again (the time of a validation and
    a checkpoint, added to the stage's wall time in the report)."""
    from nanoseek.report import RunMetrics

    run = tmp_path / "run"
    path = pretrain(config(workdir, run))
    written = (path / "model.safetensors").stat().st_mtime_ns
    records, wall = len(list(read_metrics(run))), RunMetrics(run).wall_time("pretrain")
    capsys.readouterr()
    assert pretrain(config(workdir, run, resume=True)) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written
    new = list(read_metrics(run))[records:]
    assert [r.get("event") for r in new] == ["resume", "end"] and RunMetrics(run).wall_time(
        "pretrain"
    ) == wall
    assert "pretrain: nothing to train (--steps 6)" in capsys.readouterr().out


def test_a_killed_and_resumed_run_reports_as_one(workdir, tmp_path) -> None:
    """Killed at step 5 with a checkpoint at 3, then resumed to 6: the report's steps, tokens and wall
    time are those of one run of 6 steps; a fresh run into the same directory then replaces it."""
    from nanoseek.report import RunMetrics

    run = tmp_path / "run"

    def kill_at_5(step: int) -> None:
        if step == 5:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        pretrain(config(workdir, run, checkpoint_every=3, val_every=0), on_step=kill_at_5)
    pretrain(config(workdir, run, checkpoint_every=3, val_every=0, resume=True))
    m = RunMetrics(run)
    assert m.steps("pretrain", "loss")[0] == [1, 2, 3, 4, 5, 6]
    assert m.total("pretrain", "tokens") == 6 * 4 * 32
    assert m.wall_time("pretrain") > m.last_event("pretrain", "end")["wall_time_s"] > 0
    pretrain(config(workdir, run, steps=2, val_every=0))  # afresh, without --resume
    m = RunMetrics(run)
    assert m.steps("pretrain", "loss")[0] == [1, 2] and m.total("pretrain", "tokens") == 2 * 4 * 32


def test_resume_with_other_training_settings_is_refused(workdir, tmp_path) -> None:
    """An exact resume continues the same run: another batch size or optimizer is refused before
    anything is loaded or written; a longer run is allowed."""
    run = tmp_path / "run"
    pretrain(config(workdir, run, steps=3, val_every=0))
    state = run / "pretrain" / "train_state"
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    with pytest.raises(ValueError, match=r"--batch-size: 4 -> 2"):
        pretrain(config(workdir, run, steps=3, batch_size=2, val_every=0, resume=True))
    with pytest.raises(ValueError, match=r"--optimizer: 'adamw' -> 'muon'"):
        pretrain(config(workdir, run, steps=3, optimizer="muon", val_every=0, resume=True))
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    pretrain(config(workdir, run, steps=5, val_every=0, resume=True))
    assert json.loads((state / "trainer.json").read_text())["step"] == 5


def test_resume_with_another_tokenizer_of_the_same_size_is_refused(workdir, tmp_path) -> None:
    """The weights learned the checkpoint's token ids: a resume given another tokenizer of the same size
    (another --tokenizer, or none, which trains one) went on training them on ids that mean other tokens."""
    from nanoseek.data.corpus import iter_documents
    from nanoseek.tokenizer import train_tokenizer

    docs = [doc for _, doc in zip(range(300), iter_documents("embedded"), strict=False)][100:]
    other = train_tokenizer(docs, vocab_size=320)
    other.save(tmp_path / "other")
    run = tmp_path / "run"
    pretrain(config(workdir, run, steps=2, val_every=0))
    before = (run / "pretrain" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="the tokenizer: .* not at the same ids"):
        pretrain(config(workdir, run, steps=3, val_every=0, resume=True, tokenizer=str(tmp_path / "other")))
    assert (run / "pretrain" / "model.safetensors").read_bytes() == before


def test_validation_leaves_training_bitwise_unchanged(workdir, tmp_path) -> None:
    """How often validation runs is a cost dial only: it must not move weights, data or the balancing bias."""
    pretrain(config(workdir, tmp_path / "often", val_every=1))
    pretrain(config(workdir, tmp_path / "never", val_every=0))

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(run, stage="pretrain") if "loss" in r]

    assert losses(tmp_path / "often") == losses(tmp_path / "never")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "often" / "pretrain" / "model.safetensors")
    b = load_file(tmp_path / "never" / "pretrain" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_trains_its_own_tokenizer(workdir, tmp_path) -> None:
    run = tmp_path / "run"
    pretrain(config(workdir, run, tokenizer=None, vocab_size=300, tokenizer_docs=300, steps=2, val_every=0))
    tok = json.loads((run / "tokenizer" / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE"
    assert json.loads((run / "pretrain" / "config.json").read_text())["vocab_size"] <= 300
    # with its time: the report's tokenizer row was blank, and the run's time and cost left it out
    (record,) = read_metrics(run, "tokenizer")
    assert record["event"] == "end" and record["wall_time_s"] > 0 and record["documents"] == 300
    from nanoseek.report import build_report

    assert "| tokenizer | – |" not in build_report(run).read_text()


def test_the_tokenizer_bar_ends_at_100_percent_on_a_corpus_of_fewer_documents(
    workdir, tmp_path, capsys
) -> None:
    """--tokenizer-docs is at most: a corpus of 40 documents left the bar at 40/20000 (0%)."""
    from nanoseek.train.distributed import DistInfo
    from nanoseek.train.pretrain import _tokenizer

    data = tmp_path / "docs.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"story {i}: the cat sat on the mat."}) + "\n" for i in range(40))
    )
    cfg = config(
        workdir, tmp_path / "run", tokenizer=None, data=[str(data)], tokenizer_docs=20000, progress=True
    )
    _tokenizer(cfg, tmp_path / "run", 300, True, DistInfo())
    out, err = capsys.readouterr()
    assert "from 40 documents" in out
    assert "100%" in err and "40/40" in err and "40/20000" not in err, err


def test_a_fresh_run_trains_its_own_tokenizer_over_an_earlier_runs(workdir, tmp_path) -> None:
    """RUN/tokenizer/ is reused when resuming; a fresh run into the same --out (another --vocab-size,
    other data) trained the model on the earlier run's tokenizer, its own settings silently ignored."""
    run = tmp_path / "run"
    kw = dict(tokenizer=None, tokenizer_docs=300, steps=1, val_every=0)
    pretrain(config(workdir, run, vocab_size=320, **kw))
    pretrain(config(workdir, run, vocab_size=280, **kw))
    assert json.loads((run / "pretrain" / "config.json").read_text())["vocab_size"] <= 280
    trained = json.loads((run / "tokenizer" / "tokenizer.json").read_text())
    pretrain(config(workdir, run, vocab_size=320, resume=True, **{**kw, "steps": 2}))  # reused, not retrained
    assert json.loads((run / "tokenizer" / "tokenizer.json").read_text()) == trained


def test_a_second_run_into_an_out_in_training_is_refused(workdir, tmp_path) -> None:
    """Two `pretrain --out RUN` at once (two terminals) interleaved their steps in metrics.jsonl, and at
    their saves each deleted the other's scratch checkpoint: the second one crashed on a missing
    tokenizer.json, leaving a stray temporary file in RUN/pretrain/. It is refused before it writes."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".pretrain.lock", "a+") as held:  # what a running pretrain holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242")
        held.flush()
        with pytest.raises(ValueError, match=r"run/pretrain is in use by a running pretrain \(pid 4242\)"):
            pretrain(config(workdir, run, steps=1, val_every=0))
    assert sorted(p.name for p in run.iterdir()) == [".pretrain.lock"]
    pretrain(config(workdir, run, steps=1, val_every=0))  # once it is released
    assert (run / "pretrain" / "model.safetensors").exists()


def test_an_out_on_a_file_system_without_locks_trains(workdir, tmp_path, monkeypatch) -> None:
    """A file system that does not lock (ENOLCK: some NFS and FUSE mounts) was read as a lock held: every
    run was refused as "in use by a running pretrain (another process)", with none running."""
    import errno
    import fcntl

    def no_locks(*args) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    pretrain(config(workdir, tmp_path / "run", steps=1, val_every=0))
    assert (tmp_path / "run" / "pretrain" / "model.safetensors").exists()


def test_a_fresh_run_over_an_earlier_ones_checkpoint_says_it_replaces_it(workdir, tmp_path, capsys) -> None:
    """A rerun without --resume (after a crash, by mistake) replaced the earlier run's checkpoint at its
    first save without a word: it says so at its start, while there is time to stop it."""
    run = tmp_path / "run"
    pretrain(config(workdir, run, steps=2, val_every=0))
    assert "warning" not in capsys.readouterr().err
    pretrain(config(workdir, run, steps=1, val_every=0))
    # on stderr, beside the progress bar: seen where stdout goes to a log file
    assert (
        f"warning: {run / 'pretrain'} holds an earlier run's checkpoint (step 2)" in capsys.readouterr().err
    )


def test_a_resume_after_a_fresh_run_killed_before_its_first_save_is_refused(workdir, tmp_path) -> None:
    """A run trained afresh into RUN and killed before its first save leaves the earlier run's checkpoint:
    --resume went on with that one, under the later run's records (the report's curve: both runs)."""

    def killed(step: int) -> None:
        raise KeyboardInterrupt  # a kill: no save on the way out

    run = tmp_path / "run"
    pretrain(config(workdir, run, steps=2, val_every=0))
    with pytest.raises(KeyboardInterrupt):
        pretrain(config(workdir, run, steps=4, val_every=0), on_step=killed)
    with pytest.raises(ValueError, match=r"holds an earlier run's checkpoint \(step 2\)"):
        pretrain(config(workdir, run, steps=4, val_every=0, resume=True))


def test_a_fresh_run_stopped_before_its_first_step_leaves_the_earlier_run_to_resume(
    workdir, tmp_path
) -> None:
    """The warning of a fresh run over an earlier checkpoint says: stop now and rerun with --resume.
    Its start record was already written, so that resume was refused as a later run's, and the report
    began the run at that start, dropping the earlier one's steps from its curve."""
    import time

    from nanoseek.metrics import MetricsLog
    from nanoseek.report import current_records, latest_run

    run = tmp_path / "run"
    pretrain(config(workdir, run, steps=2, val_every=0))
    time.sleep(0.01)
    MetricsLog(run, "pretrain").log(0, event="start")  # a fresh run, stopped (Ctrl-C twice) before a step
    pretrain(config(workdir, run, steps=3, val_every=0, resume=True))
    records = current_records(latest_run(list(read_metrics(run, stage="pretrain"))))
    assert [r["step"] for r in records if r.get("event") is None and "loss" in r] == [1, 2, 3]


def test_the_run_resumed_after_fresh_starts_that_trained_nothing_resumes_again(workdir, tmp_path) -> None:
    """Two fresh runs stopped before their first step, then the earlier run resumed and killed before
    its next save: its next --resume was refused as a later run's (the resumed run's steps were counted
    as the void start's), and the report lost the earlier run's curve (the second void start set aside
    the first one's empty run)."""
    import time

    from nanoseek.metrics import MetricsLog
    from nanoseek.report import current_records, latest_run

    def killed(step: int) -> None:
        raise KeyboardInterrupt  # a kill: no save on the way out

    run = tmp_path / "run"
    pretrain(config(workdir, run, steps=2, val_every=0))
    time.sleep(0.01)
    for _ in range(2):  # fresh runs, stopped (Ctrl-C twice) before a step
        MetricsLog(run, "pretrain").log(0, event="start")
    with pytest.raises(KeyboardInterrupt):
        pretrain(config(workdir, run, steps=4, val_every=0, resume=True), on_step=killed)
    pretrain(config(workdir, run, steps=4, val_every=0, resume=True))
    records = current_records(latest_run(list(read_metrics(run, stage="pretrain"))))
    assert [r["step"] for r in records if r.get("event") is None and "loss" in r] == [1, 2, 3, 4]


def test_val_fraction_0_on_a_file_corpus_trains_without_validation(workdir, tmp_path, capsys) -> None:
    # the hint of an empty train split ("or pass --val-fraction 0") must not lead to a crash
    text = tmp_path / "book.txt"
    text.write_text("\n<|endoftext|>\n".join(f"story {i}: the cat sat on the mat." for i in range(40)))
    run = tmp_path / "run"
    pretrain(config(workdir, run, data=[str(text)], val_fraction=0.0, steps=2, val_every=1))
    out = capsys.readouterr().out
    assert "no validation (--val-fraction 0" in out
    assert f") on {text}, 2 steps" in out  # --data named as given, not as a Python list
    assert not [r for r in read_metrics(run, stage="pretrain") if r.get("val_loss") is not None]
    with pytest.raises(ValueError, match="--val-fraction"):  # before a tokenizer is trained
        pretrain(config(workdir, tmp_path / "bad", data=[str(text)], tokenizer=None, val_fraction=1.0))
    assert not (tmp_path / "bad" / "tokenizer").exists()


def test_no_validation_is_said_once_under_torchrun_not_by_every_rank(workdir, tmp_path, capsys) -> None:
    """Every rank finds the same held-out set: `torchrun --nproc-per-node 2 ... --val-fraction 0` said
    "no validation" twice."""
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.pretrain import _validation_batches

    cfg = config(workdir, tmp_path / "run", data=[str(tmp_path / "book.txt")], val_fraction=0.0)
    tok = load_tokenizer(workdir / "tok")
    said = []
    for rank in range(2):
        assert _validation_batches(cfg, tok, dict(rank=rank, world_size=2), per_rank=2) == []
        said.append(capsys.readouterr().out)
    assert said == ["pretrain: no validation (--val-fraction 0 holds no document out)\n", ""]


def test_a_parallelism_the_run_cannot_take_is_refused_before_a_tokenizer_is_trained(
    tmp_path, monkeypatch
) -> None:
    """`--ep` with experts that do not divide by the ranks (16 over 3), or with a dense preset, and
    Muon on several ranks were refused once rank 0 had trained a tokenizer on the data; in one process
    a dense model's --ep was ignored without a word."""
    import nanoseek.train.distributed
    import nanoseek.train.pretrain
    from nanoseek.train.distributed import DistInfo

    monkeypatch.setattr(nanoseek.train.pretrain, "_tokenizer", lambda *a, **k: pytest.fail("trained"))
    ep = dict(expert_parallel=True, progress=False, batch_size=3)
    with pytest.raises(ValueError, match="the model has none"):
        pretrain(PretrainConfig(out=str(tmp_path / "dense"), preset="tiny-dense", **ep))
    # three ranks (the settings check is theirs to agree on; here there is one process)
    monkeypatch.setattr(nanoseek.train.distributed, "init_distributed", lambda: DistInfo(world_size=3))
    monkeypatch.setattr(nanoseek.train.pretrain, "_check_same_settings", lambda cfg, dist: None)
    with pytest.raises(ValueError, match=r"n_routed_experts \(16\) must be divisible .* \(3\)"):
        pretrain(PretrainConfig(out=str(tmp_path / "three"), preset="tiny", **ep))
    with pytest.raises(ValueError, match="optimizer 'muon' runs in one process only"):
        pretrain(PretrainConfig(out=str(tmp_path / "muon"), optimizer="muon", progress=False, batch_size=3))


def test_the_tokenizer_is_trained_on_streamed_documents_with_a_progress_bar(
    workdir, tmp_path, capsys, monkeypatch
) -> None:
    # --tokenizer-docs documents of a user's corpus (books, up to 1M characters each) may not fit in
    # memory: the trainer reads them as they come, and a long training shows its progress
    import nanoseek.tokenizer

    given = []
    train = nanoseek.tokenizer.train_tokenizer

    def spy(texts, *args, **kw):
        given.append(texts)
        return train(texts, *args, **kw)

    monkeypatch.setattr(nanoseek.tokenizer, "train_tokenizer", spy)
    run = tmp_path / "run"
    pretrain(
        config(
            workdir,
            run,
            tokenizer=None,
            vocab_size=300,
            tokenizer_docs=50,
            steps=1,
            val_every=0,
            progress=True,
        )
    )
    assert len(given) == 1 and not isinstance(given[0], list | tuple)
    assert "tokenizer: 100%" in capsys.readouterr().err
    assert [r["documents"] for r in read_metrics(run) if r.get("stage") == "tokenizer"] == [50]


def test_cli_rejects_bad_arguments(workdir, tmp_path, capsys) -> None:
    code = main(
        ["pretrain", "--out", str(tmp_path), "--preset", str(workdir / "micro"), "--tokenizer",
         str(workdir / "tok"), "--seq-len", "4096", "--no-progress"]
    )  # fmt: skip
    assert code == 2
    assert "max_position_embeddings" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps"):
        pretrain(config(workdir, tmp_path, steps=0))


def test_no_progress_keeps_the_validation_log_lines(workdir, tmp_path, capsys) -> None:
    """--no-progress drops the bars, not the log: the validation lines went with them."""
    code = main(
        ["pretrain", "--out", str(tmp_path / "run"), "--preset", str(workdir / "micro"), "--tokenizer",
         str(workdir / "tok"), "--seq-len", "32", "--steps", "2", "--val-every", "1", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert "step 1: val_loss " in capsys.readouterr().out


def test_cli_says_in_one_line_which_path_the_file_system_refused(workdir, tmp_path, capsys) -> None:
    """--out under a file (or on a read-only or full disk): one line naming the path, no traceback."""
    (tmp_path / "a-file").write_text("")
    code = main(
        ["pretrain", "--out", str(tmp_path / "a-file" / "run"), "--preset", str(workdir / "micro"),
         "--tokenizer", str(workdir / "tok"), "--seq-len", "32", "--steps", "2", "--no-progress"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek pretrain: error: ") and str(tmp_path / "a-file") in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"balance_alpha": -0.5}, "--balance-alpha must be >= 0"),  # was trained toward imbalance
        ({"probe_problems": -1}, "--probe-problems must be >= 0"),  # was "n must be >= 0" after the model
        ({"multi_turn": 1.5}, "--multi-turn must be in"),
        ({"lr": 0.0}, "lr must be"),  # these three after a tokenizer was trained
        ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
        ({"grad_clip": float("nan")}, "grad_clip"),
        ({"threads": 0}, "--threads must be >= 1"),  # 0 was ignored, -1 torch's traceback after the tokenizer
        # an infinite λ or α: every step's loss was inf and skipped, and the run ended as if trained
        ({"mtp_weight": float("inf")}, "--mtp-weight must be >= 0 and finite"),
        ({"balance_alpha": float("inf")}, "--balance-alpha must be >= 0 and finite"),
        ({"log_every": 0}, "--log-every must be >= 1"),  # taken as 1 without a word
        ({"expert_load_every": -1}, "--expert-load-every must be >= 0"),  # taken as every step
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(workdir, tmp_path, setting, message) -> None:
    with pytest.raises(ValueError, match=message):
        pretrain(
            config(workdir, tmp_path / "run", tokenizer=None, vocab_size=300, tokenizer_docs=50, **setting)
        )
    assert not (tmp_path / "run").exists()


def test_a_vocab_size_of_zero_is_refused(workdir, tmp_path) -> None:
    """`--vocab-size 0` trained a tokenizer of the preset's vocabulary without a word (0 read as unset),
    where -5 was refused."""
    with pytest.raises(ValueError, match="--vocab-size must be >= 1"):
        pretrain(config(workdir, tmp_path / "run", tokenizer=None, vocab_size=0, tokenizer_docs=50))
    assert not (tmp_path / "run").exists()


def test_vocab_size_with_a_given_tokenizer_is_refused(workdir, tmp_path) -> None:
    """--vocab-size sizes the tokenizer pretrain trains; with --tokenizer the model took that one's
    vocabulary (320 here) and trained with --vocab-size ignored without a word."""
    with pytest.raises(ValueError, match="vocab_size sizes a tokenizer trained here"):
        pretrain(config(workdir, tmp_path / "run", vocab_size=1000, steps=1, val_every=0))
    assert not (tmp_path / "run").exists()


def test_the_balance_alpha_is_the_presets_unless_given(workdir, tmp_path) -> None:
    """A config.json's (or preset's) aux_loss_alpha was replaced by the flag's default 0.0001 without a
    word (deepseek-v2-lite's 0.001 too); left out, --balance-alpha is the preset's, as --vocab-size is."""
    from nanoseek.config import ModelConfig

    ModelConfig.load(workdir / "micro").replace(aux_loss_alpha=0.01).save(tmp_path / "preset")
    kw = dict(preset=str(tmp_path / "preset"), steps=1, val_every=0)
    own = pretrain(config(workdir, tmp_path / "own", **kw))
    assert json.loads((own / "config.json").read_text())["aux_loss_alpha"] == 0.01
    given = pretrain(config(workdir, tmp_path / "given", balance_alpha=0.002, **kw))
    assert json.loads((given / "config.json").read_text())["aux_loss_alpha"] == 0.002


def test_a_bias_update_speed_the_routers_never_read_is_said(workdir, tmp_path, recwarn) -> None:
    """--bias-update-speed for V2-style routers (greedy, group_limited_greedy: deepseek-v2-lite) did nothing
    without a word: only V3's noaux_tc adds the bias. Given, it is said once; the default stays quiet."""
    from nanoseek.config import ModelConfig

    ModelConfig.load(workdir / "micro").replace(topk_method="greedy").save(tmp_path / "v2")
    kw = dict(preset=str(tmp_path / "v2"), steps=1, val_every=0)
    pretrain(config(workdir, tmp_path / "default", **kw))
    assert not [w for w in recwarn if "bias-update-speed" in str(w.message)]
    pretrain(config(workdir, tmp_path / "given", bias_update_speed=0.01, **kw))
    said = [str(w.message) for w in recwarn if "bias-update-speed" in str(w.message)]
    assert len(said) == 1 and "topk_method greedy" in said[0] and "does nothing" in said[0]


def test_a_bias_update_speed_given_to_a_dense_model_is_quiet(recwarn) -> None:
    """No router to mislead: the speedrun gives its dense student the MoE model's γ, and said it on every
    run."""
    from nanoseek.config import get_preset
    from nanoseek.train.loop import warn_unused_bias_speed
    from nanoseek.train.pretrain import PretrainConfig

    warn_unused_bias_speed(get_preset("tiny-dense"), PretrainConfig(bias_update_speed=0.01))
    assert not [w for w in recwarn if "bias-update-speed" in str(w.message)]


def test_auto_precision_is_fp32_on_cpus_without_bf16(monkeypatch) -> None:
    import nanoseek.train.pretrain as pt

    monkeypatch.setattr(pt, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(pt, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_post_training_auto_precision_is_bf16_on_a_gpu_only(monkeypatch) -> None:
    """SFT, GRPO and distillation were tuned in fp32 on CPUs (bf16 there moved their outcomes with the
    CPU): their auto takes bf16 on a GPU that multiplies it natively, fp32 on any CPU."""
    import nanoseek.train.pretrain as pt

    monkeypatch.setattr(pt, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu"), bf16_on_cpu=False) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu"), bf16_on_cpu=False) == "bf16"  # as named
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", torch.device("cuda"), bf16_on_cpu=False) == "bf16"
    # a T4 or V100 emulates bf16: fp32 there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", torch.device("cuda"), bf16_on_cpu=False) == "fp32"


def test_native_bf16_needs_the_flag_and_kernels_that_use_it(monkeypatch) -> None:
    """A CPU counts as bf16-native when /proc/cpuinfo has avx512_bf16 (or AMX) *and* PyTorch's
    kernels are not held to AVX2: a process run with ATEN_CPU_CAPABILITY=avx2 or
    ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2-only CPU reproduced on a newer one) gets fp32."""
    import nanoseek.perf as perf

    cpuinfo = {"text": "flags: fpu avx2 avx512f avx512_bf16"}
    monkeypatch.setattr(perf.Path, "read_text", lambda self, **kw: cpuinfo["text"])
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert perf.cpu_has_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert not perf.cpu_has_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert perf.cpu_has_bf16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not perf.cpu_has_bf16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    cpuinfo["text"] = "flags: fpu avx2 avx512f"
    assert not perf.cpu_has_bf16()


def _pretrain_rank(dirs: str, world: int, rank: int, port: int) -> dict:

    workdir, out = dirs.split("|")
    torch.set_num_threads(1)
    from nanoseek.train.distributed import init_distributed

    init_distributed(device="cpu", timeout_s=30)  # a collective mismatch fails in 30 s, not 10 min
    # validation (with the embedded corpus's copy probe) every step, under expert parallelism + FSDP2
    cfg = config(
        Path(workdir), Path(out), steps=2, val_every=1, val_batches=1, probe_problems=2, expert_parallel=True
    )
    pretrain(cfg)
    return {"rank": rank}


@pytest.mark.slow
def test_pretrain_validates_on_two_gloo_ranks(workdir, tmp_path) -> None:
    """The probe's forward passes are collectives (FSDP2 all-gathers, EP all-to-alls): a probe on
    rank 0 alone made the ranks' collectives mismatch (gloo aborted; NCCL would hang)."""
    from gloo import run_ranks

    run = tmp_path / "run"
    run_ranks(_pretrain_rank, 2, f"{workdir}|{run}", str(tmp_path / "result"))
    records = list(read_metrics(run / "metrics.jsonl"))
    assert any("val_loss" in r for r in records)
    assert any(any(k.startswith("probe_") for k in r) for r in records)

    # the validation loss is the mean over the global batch's targets, as one process reports it, not
    # the mean of the ranks' own means (their rows hold unequal numbers of targets: prompts masked)
    pretrain(config(workdir, tmp_path / "one", steps=2, val_every=1, val_batches=1, probe_problems=2))

    def val_losses(path: Path) -> list[float]:
        return [r["val_loss"] for r in read_metrics(path / "metrics.jsonl") if r.get("val_loss") is not None]

    assert val_losses(run) == pytest.approx(val_losses(tmp_path / "one"), rel=1e-5)


def _failing_rank(dirs: str, world: int, rank: int, port: int) -> dict:
    import time

    workdir, out = dirs.split("|")
    torch.set_num_threads(1)
    from nanoseek.train.distributed import init_distributed

    init_distributed(device="cpu", timeout_s=60)
    failed_at = []

    def on_step(step: int) -> None:
        if rank == 1:
            failed_at.append(time.perf_counter())
            raise RuntimeError("rank 1 fails")

    try:
        pretrain(config(Path(workdir), Path(out), steps=3, val_every=0), on_step=on_step)
    except RuntimeError as e:
        return {"error": str(e), "teardown_s": time.perf_counter() - failed_at[0] if failed_at else None}
    return {"error": None}


@pytest.mark.slow
def test_a_failing_rank_exits_at_once(workdir, tmp_path) -> None:
    """A rank that fails leaves without waiting for the others: its teardown barrier waited for ranks
    inside a collective it never joined, so the job hung for the whole timeout (10 minutes under
    torchrun) before showing any error."""
    from gloo import run_ranks

    ranks = run_ranks(
        _failing_rank, 2, f"{workdir}|{tmp_path / 'run'}", str(tmp_path / "result"), check=False
    )
    assert ranks[1]["error"] == "rank 1 fails"
    assert ranks[1]["teardown_s"] < 30  # not the 60 s timeout
    # the other rank ends too: its collective fails when the peer is gone (or gloo aborts the process)
    assert ranks[0] is None or ranks[0]["error"]


def _rank_without_data(dirs: str, world: int, rank: int, port: int) -> dict:
    workdir, out = dirs.split("|")
    torch.set_num_threads(1)
    from nanoseek.train.distributed import init_distributed

    init_distributed(device="cpu", timeout_s=30)
    missing = str(Path(out).parent / "missing.txt")
    try:
        pretrain(config(Path(workdir), Path(out), data=[missing], tokenizer=None, val_every=0))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


@pytest.mark.slow
def test_the_other_ranks_leave_with_a_clear_error_when_rank_0_cannot_train_the_tokenizer(
    workdir, tmp_path
) -> None:
    """Rank 0 trains the tokenizer while the others wait: its error (a --data not found) left them in a
    barrier that ended in gloo's "Connection closed by peer" traceback, printed under rank 0's line."""
    from gloo import run_ranks

    ranks = run_ranks(
        _rank_without_data, 2, f"{workdir}|{tmp_path / 'run'}", str(tmp_path / "result"), check=False
    )
    assert ranks[0] == {"error": f"FileNotFoundError: data source not found: {tmp_path / 'missing.txt'}"}
    assert ranks[1] == {"error": "ValueError: rank 0 could not train the tokenizer (its error says why)"}


def _rank_waiting_for_a_slow_tokenizer(dirs: str, world: int, rank: int, port: int) -> dict:
    import datetime
    import time

    import torch.distributed.distributed_c10d as c10d

    import nanoseek.train.pretrain as pretrain_module

    workdir, out = dirs.split("|")
    torch.set_num_threads(1)
    from nanoseek.train.distributed import all_reduce_, destroy_distributed, init_distributed

    dist = init_distributed(device="cpu", timeout_s=30)
    c10d._set_pg_timeout(datetime.timedelta(seconds=2), None)  # the process group's 10 minutes, shrunk
    real = pretrain_module._train_tokenizer

    def slow(*args):  # a tokenizer that takes rank 0 longer than that
        time.sleep(5)
        real(*args)

    pretrain_module._train_tokenizer = slow
    cfg = config(Path(workdir), Path(out), tokenizer=None, tokenizer_docs=50)
    try:
        tok = pretrain_module._tokenizer(cfg, Path(out), 300, dist.is_main, dist)
        ranks = all_reduce_(torch.ones(1), dist).item()  # the process group still works
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    destroy_distributed()
    return {"vocab": tok.vocab_size, "ranks": ranks}


@pytest.mark.slow
def test_the_other_ranks_wait_past_the_process_groups_timeout_for_the_tokenizer(workdir, tmp_path) -> None:
    """Rank 0 trains the tokenizer alone: the others waited in a collective under the process group's
    timeout (10 minutes), so a tokenizer trained for longer (a large --tokenizer-docs) ended them in
    gloo's timeout error."""
    from gloo import run_ranks

    ranks = run_ranks(
        _rank_waiting_for_a_slow_tokenizer,
        2,
        f"{workdir}|{tmp_path / 'run'}",
        str(tmp_path / "result"),
        check=False,
    )
    assert ranks[0] is not None and ranks[0] == ranks[1]
    assert ranks[0]["ranks"] == 2 and ranks[0]["vocab"] > 256


def test_a_batch_that_the_ranks_cannot_share_is_refused_by_its_flag_and_said_once(
    workdir, tmp_path, monkeypatch
) -> None:
    """`torchrun --nproc-per-node 2 ... --batch-size 3`: every rank printed "batch_size 3 is not
    divisible by 2 ranks", a name no flag has."""
    import nanoseek.train.distributed as distributed
    import nanoseek.train.pretrain as pretrain_module

    monkeypatch.setattr(distributed, "init_distributed", lambda: distributed.DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(pretrain_module, "_check_same_settings", lambda cfg, dist: None)
    refusals = {
        "batch_size": "^--batch-size 3 is not divisible by the 2 ranks$",
        "seq_len": "^--seq-len 99 exceeds the model's max_position_embeddings",
        "steps": "^--steps must be >= 1",
    }
    for flag, message in refusals.items():
        kw = {"batch_size": 3, "seq_len": 99, "steps": 0}
        with pytest.raises(ValueError, match=message) as e:
            pretrain(config(workdir, tmp_path / "run", **{flag: kw[flag]}))
        assert e.value.every_rank  # the CLI says it on rank 0 only (`alike_on_every_rank`)


def _rank_with_other_steps(dirs: str, world: int, rank: int, port: int) -> dict:
    workdir, out = dirs.split("|")
    torch.set_num_threads(1)
    from nanoseek.train.distributed import init_distributed

    init_distributed(device="cpu", timeout_s=30)
    try:
        pretrain(config(Path(workdir), Path(out), steps=3 + rank, val_every=0))
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


@pytest.mark.slow
def test_ranks_started_with_other_settings_are_refused(workdir, tmp_path) -> None:
    """A rank with another --steps hung in mismatched collectives until the timeout (another --seq-len
    trained silently); every rank now names the setting that differs."""
    from gloo import run_ranks

    ranks = run_ranks(_rank_with_other_steps, 2, f"{workdir}|{tmp_path / 'run'}", str(tmp_path / "result"))
    for r in ranks:
        assert "different settings (by rank: steps: 3, 4)" in r["error"]


def _resuming_rank(dirs: str, world: int, rank: int, port: int) -> dict:
    import os
    import time

    workdir, out = dirs.split("|")
    torch.set_num_threads(1)
    real = os.replace

    def slow_replace(src, dst, *args, **kw):
        if str(src).endswith(".tmp-old"):  # widen the window between restore_directory's check and rename
            time.sleep(1.0)
        return real(src, dst, *args, **kw)

    os.replace = slow_replace
    from nanoseek.train.distributed import init_distributed

    init_distributed(device="cpu", timeout_s=30)
    try:
        pretrain(config(Path(workdir), Path(out), steps=3, val_every=0, resume=True))
    except OSError as e:
        return {"error": str(e)}
    return {"error": None}


@pytest.mark.slow
def test_two_ranks_resume_a_checkpoint_left_aside_mid_save(workdir, tmp_path) -> None:
    """A save killed between its two renames left RUN/.pretrain.tmp-old: every rank put it back at
    once, and the one whose rename found it already moved failed (FileNotFoundError)."""
    from gloo import run_ranks

    run = tmp_path / "run"
    pretrain(config(workdir, run, steps=2, val_every=0))
    (run / "pretrain").rename(run / ".pretrain.tmp-old")
    ranks = run_ranks(_resuming_rank, 2, f"{workdir}|{run}", str(tmp_path / "result"), check=False)
    assert ranks == [{"error": None}, {"error": None}]  # (a rank that died gives None)
    assert json.loads((run / "pretrain" / "train_state" / "trainer.json").read_text())["step"] == 3
    assert not (run / ".pretrain.tmp-old").exists()


def _rank_in_its_own_directory(dirs: str, world: int, rank: int, port: int) -> dict:
    import os

    workdir, base = dirs.split("|")
    torch.set_num_threads(1)
    os.chdir(Path(base) / f"node{rank}")  # the same --out, relative: another directory on each node
    from nanoseek.train.distributed import init_distributed

    init_distributed(device="cpu", timeout_s=30)
    try:
        pretrain(config(Path(workdir), Path("run"), steps=3, val_every=0, resume=True))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


@pytest.mark.slow
def test_ranks_that_find_different_checkpoints_refuse_to_resume(workdir, tmp_path) -> None:
    """A node that does not see rank 0's checkpoint (a node-local --out, another working directory)
    resumed from nothing beside ranks at step 2: their collectives mismatched and the job hung until
    the timeout (10 minutes under torchrun) before any error."""
    from gloo import run_ranks

    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    pretrain(config(workdir, tmp_path / "node0" / "run", steps=2, val_every=0))
    ranks = run_ranks(
        _rank_in_its_own_directory, 2, f"{workdir}|{tmp_path}", str(tmp_path / "result"), check=False
    )
    for r in ranks:
        assert r is not None and "ranks found different checkpoints" in r["error"]
    assert json.loads((tmp_path / "node0/run/pretrain/train_state/trainer.json").read_text())["step"] == 2


def test_tensorboard_without_its_package_is_refused_before_the_run_starts(monkeypatch) -> None:
    # the flags' check, not the first step's: a missing package must not cost the tokenizer's training
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"pip install 'nanoseek\[tensorboard\]'"):  # the extra, named
        PretrainConfig(tensorboard=True).validate()
    PretrainConfig().validate()


def _tensorboard_events(run: Path):
    """RUN/tensorboard/pretrain/ as TensorBoard's event reader reads it."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(run / "tensorboard" / "pretrain"))
    events.Reload()
    return events


def test_tensorboard_after_a_resume_draws_each_step_once(workdir, tmp_path) -> None:
    """Killed at step 5 with its checkpoint at 3, the resumed run logs steps 4 and 5 again: without a
    purge the curve ran back from 5 to 4 (both runs' values drawn, a zig-zag)."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"

    def kill_at_5(step: int) -> None:
        if step == 5:
            raise RuntimeError("killed")

    kw = dict(checkpoint_every=3, val_every=0, tensorboard=True)
    with pytest.raises(RuntimeError, match="killed"):
        pretrain(config(workdir, run, **kw), on_step=kill_at_5)
    assert [e.step for e in _tensorboard_events(run).Scalars("pretrain/loss")] == [1, 2, 3, 4, 5]
    pretrain(config(workdir, run, resume=True, **kw))
    drawn = _tensorboard_events(run).Scalars("pretrain/loss")
    assert [e.step for e in drawn] == [1, 2, 3, 4, 5, 6]
    logged = [r["loss"] for r in read_metrics(run, "pretrain") if "loss" in r]
    assert [e.value for e in drawn][-3:] == pytest.approx(logged[-3:])  # steps 4-6 as resumed


def test_tensorboard_of_a_fresh_run_is_not_drawn_over_an_earlier_one(workdir, tmp_path) -> None:
    """A run trained afresh into the same --out replaces the earlier one (its checkpoint, its report):
    its TensorBoard curves were drawn from both runs' event files, steps 1-4 then 1-2 again."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    pretrain(config(workdir, run, steps=4, val_every=3, tensorboard=True))
    pretrain(config(workdir, run, steps=2, val_every=0, tensorboard=True))
    events = _tensorboard_events(run)
    assert [e.step for e in events.Scalars("pretrain/loss")] == [1, 2]
    assert "pretrain/val_loss" not in events.Tags()["scalars"]  # the earlier run's alone


def test_tensorboard_of_a_fresh_run_stopped_before_its_first_step_keeps_the_earlier_run(
    workdir, tmp_path
) -> None:
    """A fresh run's warning says: stop it now and rerun with --resume to continue the earlier run. Its
    TensorBoard log had deleted that run's event files already: the resumed run drew its new steps only."""
    pytest.importorskip("tensorboard")
    from nanoseek.train.loop import StepLog

    run = tmp_path / "run"
    pretrain(config(workdir, run, steps=3, val_every=0, tensorboard=True))
    StepLog(run, "pretrain", 5, tensorboard=True, progress=False).close()  # stopped before a step
    pretrain(config(workdir, run, steps=4, val_every=0, tensorboard=True, resume=True))
    assert [e.step for e in _tensorboard_events(run).Scalars("pretrain/loss")] == [1, 2, 3, 4]


def test_validation_loss_is_the_mean_over_every_target_of_the_set(workdir, tmp_path, monkeypatch) -> None:
    # batches with unequal numbers of targets (prompts masked, documents padded): each weighed by its
    # targets, as the training loss is; a batch with a single target counted once, not as a whole batch
    import nanoseek.train.pretrain as pt
    from nanoseek.checkpoint import load_model
    from nanoseek.train.loop import language_model_loss

    real = pt._validation_batches
    held: list = []

    def two_batches(*args, **kw):
        x, y = real(*args, **kw)[0]
        sparse = torch.full_like(y, -100)
        first = (y != -100).nonzero()[0]
        sparse[first[0], first[1]] = y[first[0], first[1]]  # one target in the whole batch
        held.extend([(x, y), (x, sparse)])
        return list(held)

    monkeypatch.setattr(pt, "_validation_batches", two_batches)
    pretrain(config(workdir, tmp_path / "run", steps=1, val_every=1, precision="fp32", mtp_weight=0.0))
    logged = [r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r][-1]
    model = load_model(tmp_path / "run" / "pretrain").eval()
    with torch.no_grad():
        sums = [
            language_model_loss(model, x, y, document_mask=True)[1]["lm_loss"] * (y != -100).sum()
            for x, y in held
        ]
    expected = float(sum(sums) / sum(int((y != -100).sum()) for _, y in held))
    assert logged == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("mtp_weight", [0.0, 0.3])
def test_mfu_counts_the_mtp_flops_only_when_the_loss_runs_it(
    workdir, tmp_path, monkeypatch, mtp_weight
) -> None:
    from nanoseek import perf
    from nanoseek.accounting import flops_per_token
    from nanoseek.config import ModelConfig

    peak = 1e30
    fake = lambda *a, **k: peak  # noqa: E731
    fake.cache_clear = lambda: None
    monkeypatch.setattr(perf, "matmul_peak_flops", fake)
    pretrain(config(workdir, tmp_path / "run", steps=1, val_every=0, mtp_weight=mtp_weight))
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "mfu" in r]
    model_config = ModelConfig.load(workdir / "micro")
    assert model_config.num_nextn_predict_layers > 0
    expected = flops_per_token(model_config, 32, training=True, include_mtp=mtp_weight > 0)
    assert record["mfu"] * peak / record["tok_per_s"] == pytest.approx(expected, rel=1e-6)


def test_a_list_of_one_embedded_source_trains_as_the_command_line_gives_it(workdir, tmp_path) -> None:
    """`PretrainConfig(data=["embedded"])` (the field takes a list, and `--data` parses one) was refused
    as "the embedded corpus cannot be mixed with files", with no file given."""
    path = pretrain(config(workdir, tmp_path / "run", steps=1, val_every=0, data=["embedded"]))
    assert (path / "config.json").exists()


def test_mtp_weight_0_saves_no_untrained_mtp_module(workdir, tmp_path, capsys) -> None:
    """--mtp-weight 0 never trains the preset's MTP module: the checkpoint held its random init, which
    `--speculative` then drafted with as a trained one. Built without it, the run says so, and
    speculation on the checkpoint is refused with "no MTP module"."""
    from safetensors.torch import load_file

    from nanoseek.checkpoint import load_model
    from nanoseek.commands.generate import speculation

    assert json.loads((workdir / "micro" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    path = pretrain(config(workdir, tmp_path / "run", steps=1, val_every=0, mtp_weight=0.0))
    assert "without the preset's 1 MTP module(s): --mtp-weight 0" in capsys.readouterr().out
    saved = json.loads((path / "config.json").read_text())
    assert saved["num_nextn_predict_layers"] == 0
    n = saved["num_hidden_layers"]
    assert not [k for k in load_file(str(path / "model.safetensors")) if k.startswith(f"model.layers.{n}.")]
    assert not speculation(load_model(path), asked=True)
    assert "no MTP module" in capsys.readouterr().err


def test_the_copy_probe_scores_a_weighted_family_once(workdir):
    """`embedded:sorting,sorting,...` draws sorting twice as often; its probe problems count once."""
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.pretrain import _probe

    tok = load_tokenizer(workdir / "tok")
    weighted = _probe(PretrainConfig(data="embedded:sorting,sorting,comparison", probe_problems=3), tok)
    plain = _probe(PretrainConfig(data="embedded:sorting,comparison", probe_problems=3), tok)
    assert [d.ids for d in weighted] == [d.ids for d in plain] and len(plain) == 6


@pytest.mark.parametrize("whole_documents", [True, False])
def test_pretrain_wires_its_settings_into_every_micro_batch(
    workdir, tmp_path, monkeypatch, whole_documents
) -> None:
    """What each micro-batch's loss is given: the document mask (validation's too), the routers' padding
    mask (whole documents only), the step's micro-batch count and its targets counted within documents
    (summed over the step's micro-batches); and the routers' α and the Trainer's γ, as set."""
    import nanoseek.train.loop as loop
    from nanoseek.data.corpus import window_tokens

    calls = []
    real = loop.language_model_loss

    def spy(model, x, y, **kw):
        calls.append((model, x, y, kw))
        return real(model, x, y, **kw)

    monkeypatch.setattr(loop, "language_model_loss", spy)
    cfg = config(workdir, tmp_path / "run", steps=1, val_every=1, val_batches=1, accumulation=2)
    cfg.whole_documents = whole_documents
    cfg.balance_alpha, cfg.bias_update_speed = 0.01, 0.05
    pretrain(cfg)
    assert len(calls) == 4 and all(
        kw["document_mask"] is True for *_, kw in calls
    )  # 2 micro-batches, 1 validation batch of a step's rows (2 micro-batches)
    calls = calls[:2]
    model = calls[0][0]
    depths = len(model.model.mtp_layers)
    doc_ids = [loop.packed_documents(model, x)[0] for _, x, _, _ in calls]
    if not whole_documents:  # a row holds two documents: MTP predicts nothing across the boundary
        assert any((d[:, 1:] != d[:, :-1]).any() for d in doc_ids)
    counts = sum(
        loop.target_counts(y, depths, doc_ids=d) for (_, _, y, _), d in zip(calls, doc_ids, strict=True)
    )
    for _, x, _, kw in calls:
        assert kw["mtp_weight"] == 0.3
        if whole_documents:
            assert torch.equal(kw["token_mask"], window_tokens(x, model.config.pad_token_id))
        else:
            assert kw["token_mask"] is None
        assert kw["step"].micro_batches == 2 and torch.equal(kw["step"].counts, counts)
    assert all(r.aux_loss_alpha == 0.01 for _, r in model.routers())
    biases = torch.cat(
        [r.e_score_correction_bias for _, r in model.routers()]
    )  # one step: each moved ±γ or 0
    assert biases.any() and all(b in (0.0, pytest.approx(0.05)) for b in biases.abs().tolist())


def test_a_step_split_into_micro_batches_trains_and_validates_as_one_batch(workdir, tmp_path) -> None:
    """--batch-size 2 --accumulation 2 is --batch-size 4 on the same rows: the same loss, gradient norm and
    weights, and the same validation loss (its held-out set was --val-batches micro-batches, half the
    rows, so the same weights reported another validation loss)."""
    from nanoseek.checkpoint import read_safetensors

    def run(name: str, batch_size: int, accumulation: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
        cfg = config(workdir, tmp_path / name, steps=1, val_every=1, val_batches=2, probe_problems=0)
        cfg.batch_size, cfg.accumulation, cfg.balance_alpha = batch_size, accumulation, 0.01
        path = pretrain(cfg)
        return list(read_metrics(tmp_path / name / "metrics.jsonl")), read_safetensors(path)

    (one, w_one), (split, w_split) = run("one", 4, 1), run("split", 2, 2)
    step = [next(r for r in records if r.get("step") == 1 and "grad_norm" in r) for records in (one, split)]
    for key in ("loss", "grad_norm", "lm_loss", "mtp_loss", "balance_loss"):
        assert step[1][key] == pytest.approx(step[0][key], rel=1e-5), key
    assert step[1]["tokens"] == step[0]["tokens"]
    # Adam's first step moves each weight by ~lr (1e-3 here) whatever its gradient's size
    for name, w in w_one.items():
        assert torch.allclose(w_split[name], w, atol=3e-4), name
    val = [[r["val_loss"] for r in records if r.get("val_loss") is not None] for records in (one, split)]
    assert val[1] == pytest.approx(val[0], rel=1e-5)


def test_the_warmup_is_cut_to_half_of_a_short_run() -> None:
    # 4 steps with the default 20 of warmup would end on the ramp, never annealed
    assert PretrainConfig(steps=4, warmup_steps=20).optim_config().warmup_steps == 2
    assert PretrainConfig(steps=100, warmup_steps=20).optim_config().warmup_steps == 20


def _signal_at(step: int, *signals: int):
    """An `on_step` that sends this process `signals` after step `step`, as Ctrl-C or a job runner would."""
    import os

    def send(done: int) -> None:
        if done == step:
            for sig in signals:
                os.kill(os.getpid(), sig)

    return send


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_next_step_and_the_resume_ends_as_an_uninterrupted_run(
    workdir, tmp_path, sig
) -> None:
    """SIGINT or SIGTERM (what Slurm, Kubernetes and `timeout` send before a kill) lost every step since
    the last checkpoint: the run now stops at the next step, saves it, and a --resume continues to the
    weights of a run never stopped; the previous handlers are back afterwards (notebooks)."""
    import signal

    from safetensors.torch import load_file

    from nanoseek.train import TrainingInterrupted

    signum = getattr(signal, sig)
    before = signal.getsignal(signum)
    kw = dict(schedule="constant", warmup_steps=0, val_every=0, checkpoint_every=0)
    pretrain(config(workdir, tmp_path / "a", **kw))
    with pytest.raises(TrainingInterrupted) as e:
        pretrain(config(workdir, tmp_path / "b", **kw), on_step=_signal_at(2, signum))
    assert (e.value.step, e.value.exit_code) == (3, 128 + signum)
    assert json.loads((tmp_path / "b" / "pretrain" / "train_state" / "trainer.json").read_text())["step"] == 3
    assert signal.getsignal(signum) is before
    pretrain(config(workdir, tmp_path / "b", resume=True, **kw))
    a = load_file(tmp_path / "a" / "pretrain" / "model.safetensors")
    b = load_file(tmp_path / "b" / "pretrain" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_at_a_validation_step_validates_it_at_the_resume(workdir, tmp_path) -> None:
    """A signal stops at the next step without validating it: a step due a validation (--val-every,
    the last step) had none, before or after the --resume, so the curve missed its points and the
    report's final val loss was an earlier step's."""
    import signal

    from nanoseek.train import TrainingInterrupted

    kw = dict(steps=4, schedule="constant", warmup_steps=0, val_every=2, val_batches=1, probe_problems=2)
    pretrain(config(workdir, tmp_path / "a", **kw))
    for at in (1, 3):  # stopped at step 2 (a validation's), then at step 4 (the last)
        with pytest.raises(TrainingInterrupted):
            pretrain(
                config(workdir, tmp_path / "b", resume=True, **kw), on_step=_signal_at(at, signal.SIGTERM)
            )
    pretrain(config(workdir, tmp_path / "b", resume=True, **kw))

    def validations(run: Path) -> list[tuple[int, float]]:
        records = read_metrics(run, stage="pretrain")
        return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and "event" not in r]

    assert validations(tmp_path / "b") == validations(tmp_path / "a") != []
    assert [s for s, _ in validations(tmp_path / "a")] == [2, 4]
    ends = [r for r in read_metrics(tmp_path / "b", stage="pretrain") if r.get("event") == "end"]
    assert ends[-1]["val_loss"] == validations(tmp_path / "a")[-1][1]


def test_a_signal_after_the_last_step_still_stops_what_runs_the_stage(workdir, tmp_path) -> None:
    """A SIGTERM that came as the last step was saved was taken and forgotten: the stage returned, and
    a speedrun went on to its next stage as if nobody had asked it to stop."""
    import signal

    from nanoseek.train import TrainingInterrupted

    with pytest.raises(TrainingInterrupted) as e:
        pretrain(
            config(workdir, tmp_path / "run", steps=3, val_every=0), on_step=_signal_at(3, signal.SIGTERM)
        )
    assert e.value.step == 3


def test_a_notebook_sees_that_its_interrupt_was_received(workdir, tmp_path, monkeypatch) -> None:
    """In a notebook the "stopping after this step" line went to the terminal the kernel was started
    from: ipykernel's stderr gives that terminal's descriptor as its fileno, not the cell's."""
    import io
    import os
    import signal
    import sys

    from nanoseek.train import TrainingInterrupted

    read_end, terminal = os.pipe()  # the kernel's terminal, which the cell never shows

    class CellStream(io.StringIO):  # as ipykernel.iostream.OutStream with its fd capture on
        def fileno(self) -> int:
            return terminal

    CellStream.__module__ = "ipykernel.iostream"
    cell = CellStream()
    monkeypatch.setattr(sys, "stderr", cell)
    try:
        with pytest.raises(TrainingInterrupted):
            pretrain(config(workdir, tmp_path / "run", val_every=0), on_step=_signal_at(2, signal.SIGINT))
    finally:
        os.close(read_end)
        os.close(terminal)
    assert "pretrain: SIGINT received: stopping after this step" in cell.getvalue()


def test_a_second_signal_stops_at_once_without_saving(workdir, tmp_path, monkeypatch) -> None:
    """A second Ctrl-C is "stop now": a KeyboardInterrupt, no checkpoint; one delivered twice at once (a
    terminal's Ctrl-C reaches every process of the group, and torchrun forwards it again) is one."""
    import signal

    from nanoseek.train import TrainingInterrupted

    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        pretrain(config(workdir, run, val_every=0), on_step=_signal_at(2, signal.SIGINT, signal.SIGINT))
    monkeypatch.setattr("nanoseek.train.loop.REPEAT_WINDOW_S", 0.0)
    with pytest.raises(KeyboardInterrupt) as e:
        pretrain(
            config(workdir, tmp_path / "now", val_every=0),
            on_step=_signal_at(2, signal.SIGINT, signal.SIGINT),
        )
    assert type(e.value) is KeyboardInterrupt and not (tmp_path / "now" / "pretrain").exists()


def test_the_cli_says_where_an_interrupted_run_saved_and_how_to_resume(
    workdir, tmp_path, capsys, monkeypatch
) -> None:
    import os
    import signal

    from nanoseek.train.loop import Trainer

    step = Trainer.step

    def step_then_sigterm(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        if self.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "step", step_then_sigterm)
    run = tmp_path / "my run"
    args = [
        "pretrain",
        "--out",
        str(run),
        "--preset",
        str(workdir / "micro"),
        "--tokenizer",
        str(workdir / "tok"),
    ]
    args += ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--val-every", "0", "--no-progress"]
    assert main(args) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert f"pretrain stopped by SIGTERM at step 2 of 6: checkpoint saved in {run / 'pretrain'}" in err[-1]
    assert err[-1].endswith(
        f"resume with: nanoseek pretrain --out '{run}' " + " ".join(args[3:]) + " --resume"
    )


def _rank_signalled_alone(dirs: str, world: int, rank: int, port: int) -> dict:
    import signal

    from nanoseek.train import TrainingInterrupted
    from nanoseek.train.distributed import init_distributed

    workdir, out = dirs.split("|")
    torch.set_num_threads(1)
    init_distributed(device="cpu", timeout_s=30)
    try:
        # rank 1 alone is signalled (a node's own SIGTERM): rank 0 must stop at the same step, not wait
        # in the next step's collective for a rank that left
        pretrain(
            config(Path(workdir), Path(out), val_every=0),
            on_step=_signal_at(2, signal.SIGTERM) if rank else None,
        )
    except TrainingInterrupted as e:
        return {"step": e.step, "code": e.exit_code}
    return {"step": None}


@pytest.mark.slow
def test_ranks_stop_together_when_one_is_signalled(workdir, tmp_path) -> None:
    from gloo import run_ranks

    run = tmp_path / "run"
    ranks = run_ranks(_rank_signalled_alone, 2, f"{workdir}|{run}", str(tmp_path / "result"), check=False)
    assert ranks == [{"step": 3, "code": 143}, {"step": 3, "code": 143}]
    assert json.loads((run / "pretrain" / "train_state" / "trainer.json").read_text())["step"] == 3


def test_an_out_it_cannot_write_is_refused_before_a_tokenizer_is_trained(tmp_path, monkeypatch) -> None:
    """`pretrain --out` on a read-only disk (or under a file) was found once a tokenizer had been
    trained on the data (--tokenizer-docs documents) and could not be saved there."""
    import nanoseek.train.pretrain

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(nanoseek.train.pretrain, "_tokenizer", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(
        ValueError, match=r"cannot write --out .*run \(.*file: Not a directory\); choose another"
    ):
        pretrain(PretrainConfig(out=str(tmp_path / "file" / "run"), progress=False))
    # a run to resume is not resumed by another --out: it starts afresh there
    with pytest.raises(
        ValueError, match=r"--resume writes there too: copy .*run to a disk that takes writes"
    ):
        pretrain(PretrainConfig(out=str(tmp_path / "file" / "run"), resume=True, progress=False))
