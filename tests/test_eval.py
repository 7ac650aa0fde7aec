"""Evaluation: pass@1 over k samples, cons@k, format and length, from a stub sampler and a stub endpoint."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from nanoseek.data.tasks import get_task, split_task_list
from nanoseek.evaluate import (
    EvalConfig,
    Sample,
    endpoint_sampler,
    eval_problems,
    evaluate,
    problems_digest,
)
from nanoseek.metrics import read_metrics


def _problems(n: int = 3):
    return get_task("arithmetic").problems("test", n, seed=0, language="en")


def test_metrics_from_stub_sampler(tmp_path) -> None:
    probs = _problems(3)

    def sampler(problems):
        assert [p.id for p in problems] == [p.id for p in probs]
        out = []
        for i, p in enumerate(problems):
            right = f"\nwork\n</think>\n{p.answer}"
            wrong = f"\nwork\n</think>\n{int(p.answer) + 1}"
            if i == 0:  # 3 of 4 right: pass@1 .75, majority right; the wrong one reasons in Chinese
                s = [right, right, right, f"\n计算\n</think>\n{int(p.answer) + 1}"]
            elif i == 1:  # 1 of 4 right, wrong answer wins the vote
                s = [right, wrong, wrong, "no think block " + p.answer]
            else:  # never right, never well-formed
                s = ["just text", "just text", "</think></think>1", "x"]
            stops = ["stop", "stop", "length", "length"] if i == 2 else ["stop"] * 4  # the last cut off
            out.append(
                [
                    Sample(text=t, num_tokens=10 * (i + 1), finish_reason=r)
                    for t, r in zip(s, stops, strict=True)
                ]
            )
        return out

    ck = tmp_path / "run" / "grpo"
    ck.mkdir(parents=True)
    cfg = EvalConfig(model=str(ck), task="arithmetic", k=4, n=3, language="en", progress=False)
    m = evaluate(cfg, sampler=sampler)
    assert m["pass@1"] == pytest.approx((0.75 + 0.25 + 0.0) / 3)
    assert m["cons@4"] == pytest.approx(1 / 3)
    assert m["format_rate"] == pytest.approx((1.0 + 0.75 + 0.0) / 3)
    assert m["mean_response_tokens"] == pytest.approx(20.0)
    assert m["problems"] == 3 and m["k"] == 4
    # English reasoning: 3 of 4 at problem 0 (one in Chinese), 2 of 4 at 2 ("x" holds no word, nor do the
    # tags of "</think></think>1"), all at 1
    assert m["language_consistency"] == pytest.approx((0.75 + 1.0 + 0.5) / 3)
    assert m["truncated_rate"] == pytest.approx((0 + 0 + 0.5) / 3)
    # the standard error of the mean over problems: sample sd of (.75, .25, 0) / sqrt(3)
    assert m["pass@1_stderr"] == pytest.approx(statistics.stdev([0.75, 0.25, 0.0]) / 3**0.5)
    report = json.loads((ck / "eval_arithmetic.json").read_text())
    assert report["metrics"]["pass@1"] == m["pass@1"] and len(report["problems"]) == 3
    (rec,) = list(read_metrics(tmp_path / "run", stage="eval"))
    assert rec["evaluated_stage"] == "grpo" and rec["pass@1"] == pytest.approx(m["pass@1"])
    # per-problem scores and which problems they are, for the report's paired intervals
    assert rec["pass@1_per_problem"] == [0.75, 0.25, 0.0]
    assert rec["problems_digest"] == problems_digest([p.id for p in probs])


def test_cons_counts_every_sample_scored_at_least_half_right_as_one_vote() -> None:
    """A partial-credit task (`?partial=true`) scores a sample between 0 and 1: those scored at least
    half right vote together for the right answer, whatever their texts, as the all-right ones do.
    Two programs passing 3 of 4 tests, written differently, outvote one wrong answer; by their own
    texts the three would tie and the earliest, not a right one, would win."""
    from types import SimpleNamespace

    from nanoseek.evaluate import score_samples

    (p,) = _problems(1)
    scores = {"t</think>A": 0.75, "t</think>B": 0.75, "t</think>C": 0.0}
    samples = [
        [
            Sample(text=t, num_tokens=3, finish_reason="stop")
            for t in ("t</think>A", "t</think>B", "t</think>C")
        ]
    ]
    reward = lambda prob, text: (scores[text], {"accuracy": scores[text]})  # noqa: E731
    metrics, (rec,) = score_samples(SimpleNamespace(), reward, [p], samples)
    assert metrics["cons@3"] == 1.0 and rec["cons"] is True
    assert metrics["pass@1"] == pytest.approx(0.5)


def test_the_passes_whose_reasoning_concludes_their_answer_are_counted_apart() -> None:
    """`pass@1_concluded`: where the task reads a trace's conclusion, only the passes whose last line of
    reasoning concludes the answer given. A right answer after "So 85 is smaller." is a pass the
    verifier (the answer after </think> alone) cannot tell from reasoning."""
    from nanoseek.data.rewards import build_reward
    from nanoseek.data.tasks import get_task
    from nanoseek.evaluate import score_samples

    task = get_task("largest")
    p = task.problems("test", 1, seed=0, language="en")[0]
    a, b, c = sorted(p.meta["numbers"])
    texts = (
        f"Compare {b} and {c}.\nSo {c} is the largest.\n</think>\n{c}",  # right, concluded
        f"Compare the tens\nSo {c} is smaller.\n</think>\n{c}",  # right, concluded otherwise
        f"So {c} is larger.\n</think>\n{c}",  # right, concluded (a direction word of comparison's)
        f"So {a} is larger.\n</think>\n{a}",  # wrong: concludes its answer, but no pass
    )
    samples = [[Sample(text=t, num_tokens=5, finish_reason="stop") for t in texts]]
    metrics, (rec,) = score_samples(task, build_reward("accuracy:1"), [p], samples)
    assert metrics["pass@1"] == 0.75 and metrics["pass@1_concluded"] == rec["pass@1_concluded"] == 0.5
    # a task that reads no conclusions has no such figure
    add = get_task("addition")
    q = add.problems("test", 1, seed=0)[0]
    metrics, (rec,) = score_samples(
        add,
        build_reward("accuracy:1"),
        [q],
        [[Sample(text=f"x</think>\n{q.answer}", num_tokens=3, finish_reason="stop")]],
    )
    assert "pass@1_concluded" not in metrics and "pass@1_concluded" not in rec


@pytest.mark.parametrize(
    ("n", "t"),
    [(1, 0.0), (2, 12.7062), (3, 4.3027), (5, 2.7764), (10, 2.2622), (48, 2.0117), (10_001, 1.9602)],
)
def test_a_95_percent_interval_takes_students_t_for_the_values_it_has(n, t) -> None:
    """The standard errors each side of a 95% interval on a mean of n values (97.5th percentile of
    Student's t, n - 1 degrees of freedom, as printed in any table): 1.96 for every n made the report's
    "± 95%" an 88% interval over 5 problems. One value has no interval (0, as its standard error)."""
    from nanoseek.evaluate import t_95

    assert t_95(n) == pytest.approx(t, abs=1e-4)


def test_endpoint_rebuilds_reasoning_and_scores_it(tmp_path) -> None:
    probs = {p.prompt: p for p in _problems(2)}
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "stub", "object": "model"}]})
        body = json.loads(request.content)
        seen.append(body)
        p = probs[body["messages"][0]["content"]]
        choices = [
            {
                "index": i,
                "finish_reason": "stop",
                "message": {
                    "role": "assistant",
                    "content": f"\n{p.answer}",
                    "reasoning_content": "add the digits",
                },
            }
            for i in range(body["n"])
        ]
        return httpx.Response(
            200,
            json={
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "stub",
                "choices": choices,
                "usage": {"prompt_tokens": 5, "completion_tokens": 8 * body["n"], "total_tokens": 0},
            },
        )

    cfg = EvalConfig(model="http://stub:8000", task="arithmetic", k=2, n=2, language="en", temperature=0.6)
    sampler, source = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    assert "stub" in source
    cfg.out = str(tmp_path / "e.json")
    cfg.run_dir = str(tmp_path)
    m = evaluate(cfg, sampler=sampler)
    assert m["pass@1"] == 1.0 and m["format_rate"] == 1.0 and m["mean_response_tokens"] == 8
    assert all(b["temperature"] == 0.6 and b["n"] == 2 for b in seen)
    assert next(read_metrics(tmp_path, "eval"))["evaluated_stage"] == "http://stub:8000"


def test_concurrency_sets_the_requests_in_flight_and_is_refused_for_a_checkpoint(monkeypatch) -> None:
    """Eight requests were in flight whatever the endpoint (a rate-limited API answered 429s, a batching
    server was left idle); --concurrency sets it, as lm-evaluation-harness's num_concurrent."""
    from multiprocessing.pool import ThreadPool

    import nanoseek.evaluate as ev

    widths = []

    class Recording(ThreadPool):
        def __init__(self, processes=None, *args, **kw):
            widths.append(processes)
            super().__init__(processes, *args, **kw)

    monkeypatch.setattr(ev, "ThreadPool", Recording)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "stub", "object": "model"}]})
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "1"}}
        return httpx.Response(
            200,
            json={"id": "x", "object": "chat.completion", "created": 0, "model": "stub", "choices": [choice]},
        )

    client = httpx.Client(transport=httpx.MockTransport(handler))
    for given, used in ((None, 8), (2, 2)):
        cfg = EvalConfig(
            model="http://stub:8000", task="arithmetic", k=1, n=2, concurrency=given, progress=False
        )
        sampler, _ = endpoint_sampler(cfg, http_client=client)
        sampler(_problems(2))
        assert widths[-1] == used
    with pytest.raises(ValueError, match="--concurrency applies only to an http"):
        eval_problems(EvalConfig(model="some/dir", task="arithmetic", concurrency=4))
    with pytest.raises(ValueError, match="--concurrency must be >= 1"):
        eval_problems(EvalConfig(model="http://stub:8000", task="arithmetic", concurrency=0))


def test_cons_votes_by_what_an_answer_says_not_how_it_is_written(tmp_path) -> None:
    """3 of 5 samples give the right answer, each written its own way, 2 the same wrong one: the
    majority is right (R1's cons@k votes over answers, not spellings); and a wrong answer written
    two ways still outvotes a right one given once."""
    (p,) = _problems(1)
    right, wrong = int(p.answer), int(p.answer) + 1
    votes = {
        "right": [f"{right}", f"{right}.", f"$\\boxed{{{right}}}$", f"{wrong}", f"{wrong}"],
        "wrong": [f"{right}", f"{wrong}", f"\\boxed{{{wrong}}}", "x", "y"],
    }
    for majority, answers in votes.items():
        samples = [[Sample(f"add\n</think>\n{a}", 3, "stop") for a in answers]]
        cfg = EvalConfig(model=str(tmp_path / "ck"), task="arithmetic", k=5, n=1, language="en")
        m = evaluate(cfg, sampler=lambda problems, s=samples: s)
        assert m["cons@5"] == (1.0 if majority == "right" else 0.0), majority
    # a tie (2 right, 2 wrong) goes to the answer the earliest of the tied samples gave
    for answers, first_right in (
        ([right, "x", wrong, wrong, right], True),
        ([wrong, right, right, wrong], False),
    ):
        samples = [[Sample(f"add\n</think>\n{a}", 3, "stop") for a in answers]]
        cfg = EvalConfig(model=str(tmp_path / "ck"), task="arithmetic", k=len(answers), n=1, language="en")
        m = evaluate(cfg, sampler=lambda problems, s=samples: s)
        assert m[f"cons@{len(answers)}"] == float(first_right), answers


def test_wrong_answers_vote_by_the_value_the_family_reads_not_its_spelling(tmp_path) -> None:
    """A linear equation's wrong answer given as `x = 7` and as `7`, or a sorting list with and without its
    brackets, is one answer given twice: it outvotes a right one given once (they were two votes, and the
    tie went to the right answer given first)."""
    for task, make in (
        ("linear_equation", lambda right: [f"x = {right + 1}", f"{right + 1}", f"{right + 2}"]),
        ("sorting", lambda right: [f"[{right[1]}, {right[0]}]", f"{right[1]}, {right[0]}", "1"]),
    ):
        (p,) = get_task(task).problems("test", 1, seed=0, language="en")
        gold = int(p.answer) if task == "linear_equation" else [int(x) for x in p.answer.split(",")]
        answers = [p.answer, *make(gold)]
        samples = [[Sample(f"work\n</think>\n{a}", 3, "stop") for a in answers]]
        cfg = EvalConfig(model=str(tmp_path / "ck"), task=task, k=4, n=1, language="en")
        assert evaluate(cfg, sampler=lambda problems, s=samples: s)["cons@4"] == 0.0, task


def test_endpoint_samples_score_as_the_checkpoints_own() -> None:
    """What nanoseek serve sends for a completion is scored as the completion itself: a think block
    closed with nothing in it (reasoning_content null) still has its answer, a <think> the model
    repeated is the one R1's format allows; and problem i's choice j samples with seed + i*k + j, as
    a checkpoint's sample i*k + j does in-process."""
    from nanoseek.data.rewards import build_reward
    from nanoseek.evaluate import EVAL_PARTS

    probs = _problems(4)
    answer = {p.prompt: p.answer for p in probs}

    def served(
        a: str,
    ) -> dict:  # the model's text -> (reasoning_content, content) as nanoseek serve splits it
        return {
            f"</think>\n{a}": (None, a),
            f"<think>\nadd\n</think>\n{a}": ("<think>\nadd\n", a),
            f"add {a}": (f"add {a}", ""),  # never closed: no answer
        }

    seeds = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seeds.append(body["seed"])
        choices = [
            {
                "index": i,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content, "reasoning_content": reasoning},
            }
            for i, (reasoning, content) in enumerate(served(answer[body["messages"][0]["content"]]).values())
        ]
        return httpx.Response(
            200, json={"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": choices}
        )

    cfg = EvalConfig(model="http://stub:8000", task="arithmetic", k=3, n=4, seed=5, endpoint_model="m")
    sampler, _ = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    reward = build_reward(EVAL_PARTS, task=get_task("arithmetic"))
    for p, samples in zip(probs, sampler(probs), strict=True):
        for text, sample in zip(served(p.answer), samples, strict=True):
            assert reward(p, sample.text) == reward(p, text), text
    assert sorted(seeds) == [5, 8, 11, 14]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k and n"):
        evaluate(EvalConfig(model="x", task="arithmetic", k=0), sampler=lambda ps: [])
    # no problems is said before any is drawn, not as "all 0 problems have unparseable gold answers"
    with pytest.raises(ValueError, match=r"k and n must be >= 1 \(got k=4, n=0\)"):
        evaluate(EvalConfig(model="x", task="arithmetic", n=0), sampler=lambda ps: pytest.fail("sampled"))
    with pytest.raises(ValueError, match="unknown task 'nope'; built-in"):
        evaluate(EvalConfig(model="x", task="nope"), sampler=lambda ps: [])
    with pytest.raises(
        ValueError, match=r"unknown task 'arithmatic' \(did you mean 'arithmetic'\?\); built-in"
    ):
        evaluate(EvalConfig(model="x", task="arithmatic"), sampler=lambda ps: [])


@pytest.mark.parametrize(
    ("model", "flags", "said"),
    [
        ("http://stub:8000", {"dtype": "bfloat16"}, "--dtype applies only to a checkpoint"),
        ("http://stub:8000", {"max_batch_size": 8}, "--max-batch-size applies only to a checkpoint"),
        ("http://stub:8000", {"threads": 2}, "--threads applies only to a checkpoint"),  # the engine's
        ("http://stub:8000", {"device": "cpu"}, "--device applies only to a checkpoint"),
        ("http://stub:8000", {"quantize": "int8"}, "--quantize applies only to a checkpoint"),
        ("ck", {"endpoint_model": "m"}, "--model-name applies only to an http"),
        ("ck", {"api_key": "k", "endpoint_model": "m"}, "--model-name and --api-key apply only"),
        ("ck", {"timeout": 60.0, "retries": 1}, "--timeout and --retries apply only to an http"),
    ],
)
def test_a_flag_for_the_other_kind_of_model_is_refused_not_ignored(model, flags, said) -> None:
    """`eval URL --dtype bfloat16` or `eval DIR --api-key K` ran as if the flag were not there."""
    drawn = []
    cfg = EvalConfig(model=model, task="arithmetic", k=1, n=1, progress=False, **flags)
    with pytest.raises(ValueError, match=said):
        evaluate(cfg, sampler=lambda ps: drawn.append(ps) or [])
    assert drawn == []


def test_an_out_that_is_a_directory_is_refused_before_sampling(tmp_path) -> None:
    """It failed writing the report (IsADirectoryError), after every sample had been drawn."""
    drawn = []
    cfg = EvalConfig(model="ck", task="arithmetic", k=1, n=2, out=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"is a directory: .*eval_arithmetic.json"):
        evaluate(cfg, sampler=lambda ps: drawn.append(ps) or [])
    assert drawn == []


def test_a_place_the_report_cannot_be_written_is_refused_before_sampling(tmp_path) -> None:
    """A report under a file (or on a read-only disk: a shared checkpoint evaluated with the default
    --out) failed its write after every sample had been drawn, and no score was printed."""
    (tmp_path / "file").write_text("")
    drawn = []
    for flags, said in (
        ({"out": str(tmp_path / "file" / "r.json")}, r"the report .*r\.json in .*file: Not a directory"),
        ({"run_dir": str(tmp_path / "file" / "run")}, r"metrics\.jsonl in .*file: Not a directory"),
    ):
        cfg = EvalConfig(model=str(tmp_path / "ck"), task="arithmetic", k=1, n=2, progress=False, **flags)
        with pytest.raises(ValueError, match=said):
            evaluate(cfg, sampler=lambda ps: drawn.append(ps) or [])
    assert drawn == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the check wrote nothing


def test_a_checkpoint_on_a_read_only_disk_names_both_places_to_give_at_once(tmp_path, monkeypatch) -> None:
    """On a read-only disk the report's default (in the checkpoint) and metrics.jsonl's (beside it) are
    both refused: the error named --out alone, and once given, a second run named --run-dir."""
    import errno
    import os
    import tempfile

    ck = tmp_path / "ro" / "ck"
    ck.mkdir(parents=True)
    unnamed = tempfile.TemporaryFile

    def read_only(*args, **kwargs):  # what a read-only mount answers (root, too)
        if str(kwargs.get("dir")).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return unnamed(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    cfg = EvalConfig(model=str(ck), task="arithmetic", k=1, n=2, progress=False)
    with pytest.raises(ValueError) as e:
        evaluate(cfg, sampler=lambda ps: pytest.fail("sampled"))
    assert str(e.value) == (
        f"cannot write the report {ck / 'eval_arithmetic.json'} in {ck}: Read-only file system (name "
        f"another place with --out FILE), nor metrics.jsonl in {ck.parent}: Read-only file system (name "
        "another place with --run-dir DIR)"
    )


def test_a_gguf_file_for_the_model_is_named_as_one(tmp_path) -> None:
    """`nanoseek eval model.gguf`: the GGUF file named as every command names it, not a report that cannot
    be written "in model.gguf: Not a directory" (its default place, beside the checkpoint)."""
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(FileNotFoundError, match="is a GGUF file"):
        eval_problems(EvalConfig(model=str(gguf_file), task="arithmetic", k=1, n=2, progress=False))


def test_pass_at_1_per_language(tmp_path) -> None:
    """Problems in several languages: pass@1 is also reported per language (the report's table)."""
    probs = get_task("comparison").problems("test", 30, seed=0)
    assert {p.language for p in probs} == {"en", "ja", "zh"}

    def sampler(problems):
        # right in English only
        return [
            [Sample(f"x\n</think>\n{p.answer if p.language == 'en' else 0}", 5, "stop")] * 2 for p in problems
        ]

    cfg = EvalConfig(model=str(tmp_path / "ck"), task="comparison", k=2, n=30, progress=False)
    m = evaluate(cfg, sampler=sampler)
    assert m["pass@1_by_language"] == {"en": 1.0, "ja": 0.0, "zh": 0.0}
    share = sum(p.language == "en" for p in probs) / len(probs)
    assert m["pass@1"] == pytest.approx(share)


def test_task_aliases_name_a_setting_of_a_family() -> None:
    add = get_task("addition")
    assert add.name == "addition" and add.ops == ("add",)
    assert get_task("multiplication").digits == 3 and get_task("multiplication?digits=2").digits == 2
    p = add.problems("test", 1, seed=0)[0]
    assert p.task == "addition" and "+" in p.prompt
    assert split_task_list("addition,multiplication?digits=2,comparison") == [
        "addition",
        "multiplication?digits=2",
        "comparison",
    ]


def test_no_thinking_prompts_and_scoring(tmp_path) -> None:
    """--no-thinking: the prompt closes the think block (V3.1), an endpoint is asked for its non-thinking
    mode, and a plain answer counts as right (no think block required)."""
    from nanoseek.evaluate import chat_prompt_ids
    from serve_fakes import tiny_tokenizer

    tok = tiny_tokenizer()
    assert tok.decode(chat_prompt_ids(tok, "q", thinking=False)).endswith("<｜Assistant｜></think>")
    assert tok.decode(chat_prompt_ids(tok, "q")).endswith("<｜Assistant｜><think>\n")
    # a problem asked later in a chat: the earlier turn and its answer, then the question
    chat = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "q"},
    ]
    assert tok.decode(chat_prompt_ids(tok, chat)).endswith(
        "<｜User｜>a<｜Assistant｜>1<｜end▁of▁sentence｜><｜User｜>q<｜Assistant｜><think>\n"
    )

    seen: list[dict] = []

    cfg = EvalConfig(
        model="http://stub:8000",
        task="arithmetic",
        k=2,
        n=2,
        language="en",
        thinking=False,
        endpoint_model="stub",
    )
    client = _stub_endpoint(2, lambda n: 4 * n, reasoning=None, seen=seen)
    sampler, _ = endpoint_sampler(cfg, http_client=client)
    cfg.out, cfg.run_dir = str(tmp_path / "e.json"), str(tmp_path)
    m = evaluate(cfg, sampler=sampler)
    assert m["pass@1"] == 1.0 and m["thinking"] is False
    assert all(b["chat_template_kwargs"] == {"thinking": False} for b in seen)


def test_endpoint_failures_are_one_clear_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "bad key", "type": "invalid_request_error"}})

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    cfg = EvalConfig(model="http://stub:8000", task="arithmetic", k=1, n=1)
    for handler, said in ((refuse, "refused the API key"), (down, "cannot reach http://stub:8000/v1")):
        with pytest.raises(ValueError, match=said):
            endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))


@pytest.fixture
def engine_widths(monkeypatch) -> list:
    """The max_batch_size of every Engine the test builds, in order."""
    import nanoseek.engine as engine_module

    widths = []
    real = engine_module.Engine

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, model, *args, **kwargs) -> None:
            widths.append(kwargs.get("max_batch_size"))
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(engine_module, "Engine", Recording)
    return widths


def test_a_checkpoint_decodes_every_sample_of_a_task_in_one_batch(
    micro_checkpoint, tmp_path, engine_widths
) -> None:
    from nanoseek.evaluate import DEFAULT_MAX_BATCH

    widths = engine_widths
    common = dict(model=micro_checkpoint, task="arithmetic", max_new_tokens=4, progress=False)
    evaluate(EvalConfig(n=6, k=3, out=str(tmp_path / "a.json"), **common))
    evaluate(EvalConfig(n=100, k=4, out=str(tmp_path / "b.json"), **common))
    evaluate(EvalConfig(n=2, k=2, max_batch_size=3, out=str(tmp_path / "c.json"), **common))
    assert widths == [18, DEFAULT_MAX_BATCH, 3]


def test_a_checkpoint_left_aside_mid_save_gets_its_report_where_it_lies(
    micro_checkpoint, tmp_path, monkeypatch
) -> None:
    """A crash between a save's two renames leaves RUN/.pretrain.tmp-old and no RUN/pretrain; eval reads
    the copy (as load_model does). Its report went to RUN/pretrain/, a new directory of that file alone:
    the checkpoint no longer loaded by its name, and the next save or --resume removed the copy as the
    leftover of a finished swap. The report goes into the copy, which a resume then moves back. And
    `~/x` is read as the home's x: its report went to a new directory named `~` in the working one."""
    import shutil

    from nanoseek.atomic import restore_directory

    run = tmp_path / "runs"
    shutil.copytree(micro_checkpoint, run / ".pretrain.tmp-old")
    cfg = EvalConfig(
        model=str(run / "pretrain"), task="arithmetic", n=2, k=1, max_new_tokens=2, progress=False
    )
    evaluate(cfg)
    assert not (run / "pretrain").exists()
    restore_directory(run / "pretrain")  # what the next save or resume does first
    assert (run / "pretrain" / "config.json").exists() and (
        run / "pretrain" / "eval_arithmetic.json"
    ).exists()
    assert list(read_metrics(run / "metrics.jsonl"))[-1]["evaluated"] == "pretrain"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(run)
    evaluate(dataclasses.replace(cfg, model="~/runs/pretrain", task="sorting"))
    assert (run / "pretrain" / "eval_sorting.json").exists() and not (run / "~").exists()


def test_a_checkpoint_named_as_dot_is_named_and_logged_as_its_directory(tmp_path, monkeypatch) -> None:
    """`nanoseek eval .` in RUN/pretrain was named "" (the report's row and the summary's "eval
    arithmetic ()") and wrote metrics.jsonl into the checkpoint, where the report of RUN never read it."""
    import nanoseek.evaluate as ev

    ck = tmp_path / "run" / "pretrain"
    (ck / "train_state").mkdir(parents=True)
    monkeypatch.chdir(ck)
    evaluated, run_dir, out = ev._outputs(EvalConfig(model=".", task="arithmetic"))
    assert (evaluated, run_dir) == ("pretrain", str(tmp_path / "run"))
    assert out.resolve() == ck / "eval_arithmetic.json"
    monkeypatch.chdir(ck / "train_state")
    assert ev._outputs(EvalConfig(model="..", task="arithmetic"))[:2] == ("pretrain", str(tmp_path / "run"))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_a_16_bit_checkpoint_is_evaluated_in_bf16_only_where_the_cpu_runs_it(
    micro_checkpoint, tmp_path, monkeypatch, native_bf16
) -> None:
    """`dtype="auto"` (the default): as `generate` and `serve` load it; an fp32 checkpoint (every
    checkpoint nanoseek trains) stays fp32, so the speedrun's figures do not move."""
    import torch

    import nanoseek.engine as engine_module
    from model_configs import bf16_copy

    bf16 = bf16_copy(micro_checkpoint, tmp_path / "bf16")
    dtypes = []
    real = engine_module.Engine

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, model, *args, **kwargs) -> None:
            dtypes.append(model.dtype)
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(engine_module, "Engine", Recording)
    monkeypatch.setattr("nanoseek.perf.cpu_has_bf16", lambda: native_bf16)
    common = dict(task="arithmetic", n=2, k=1, max_new_tokens=2, progress=False)
    a = evaluate(EvalConfig(model=str(bf16), out=str(tmp_path / "a.json"), **common))
    evaluate(EvalConfig(model=str(micro_checkpoint), out=str(tmp_path / "b.json"), **common))
    evaluate(EvalConfig(model=str(bf16), dtype="float32", out=str(tmp_path / "c.json"), **common))
    assert dtypes == [torch.bfloat16 if native_bf16 else torch.float32, torch.float32, torch.float32]
    # the report says which precision ran, not the "auto" that picked it
    ran = "bfloat16" if native_bf16 else "float32"
    assert a["dtype"] == json.loads((tmp_path / "a.json").read_text())["metrics"]["dtype"] == ran


def test_tasks_of_one_checkpoint_sampled_in_one_queue_draw_what_each_draws_alone(
    micro_checkpoint, tmp_path, engine_widths
) -> None:
    """`evaluate_many`: one model load and one engine queue for several tasks (the speedrun's
    evaluation on a GPU), every sample the one its task's own evaluation draws."""
    from nanoseek.evaluate import evaluate_many

    engines = engine_widths
    common = dict(model=micro_checkpoint, k=3, max_new_tokens=12, temperature=1.0, seed=5, progress=False)
    tasks = [("arithmetic", 4), ("comparison", 6), ("arithmetic?wording=unseen", 2)]

    def cfg(task: str, n: int, where: str) -> EvalConfig:
        return EvalConfig(task=task, n=n, out=str(tmp_path / where / f"{n}.json"), **common)

    together = evaluate_many([cfg(t, n, "many") for t, n in tasks])
    assert engines == [(4 + 6 + 2) * 3]  # one engine, every sample in one batch
    alone = [evaluate(cfg(t, n, "alone")) for t, n in tasks]
    for m, a in zip(together, alone, strict=True):
        assert m["pass@1"] == a["pass@1"] and m["sampled_with"] == [t for t, _ in tasks]
        assert m["dtype"] == a["dtype"] == "float32"

        def texts(path: str) -> list:
            return json.loads(Path(path).read_text())["problems"]  # a sample, scores and tokens per problem

        assert texts(m["json"]) == texts(a["json"])
    with pytest.raises(ValueError, match="differs from arithmetic in k"):
        evaluate_many([cfg("arithmetic", 2, "x"), dataclasses.replace(cfg("comparison", 2, "x"), k=1)])


def test_a_checkpoint_samples_with_its_generation_configs_settings_as_its_server_does(
    micro_checkpoint, tmp_path
) -> None:
    """The sampling settings of generation_config.json that eval has no flag for (a Qwen fine-tune's
    top_k, repetition_penalty) are the ones `nanoseek serve` samples with for requests that leave them
    out, as `nanoseek eval URL` does: ignored here, the same model scored differently through its
    server. --temperature, --top-p and --max-new-tokens stay eval's own; the report says what else was
    used."""
    import shutil

    from nanoseek.evaluate import CheckpointSampler, evaluate_many

    ck = tmp_path / "ck"
    shutil.copytree(micro_checkpoint, ck)
    (ck / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 1, "max_new_tokens": 2})
    )
    common = dict(model=str(ck), task="arithmetic", n=2, max_new_tokens=8, progress=False, seed=3)
    problems = _problems(2)
    greedy = CheckpointSampler(EvalConfig(**common, k=1, temperature=0.0))(problems)
    sampled = CheckpointSampler(EvalConfig(**common, k=3, temperature=1.0))(problems)
    for one, three in zip(greedy, sampled, strict=True):
        assert [s.text for s in three] == [one[0].text] * 3  # top_k 1: every sample the greedy one
    (m,) = evaluate_many([EvalConfig(**common, k=2, out=str(tmp_path / "r.json"))])
    assert m["sampling_defaults"] == {"top_k": 1} and m["temperature"] == 0.6


def test_eval_refuses_a_tokenizer_larger_than_the_models_vocabulary(narrow_checkpoint) -> None:
    """A tokenizer.json from another model was evaluated with: its ids past the model's rows refused
    only in the prompts that held one, and never sampled. Said before the weights load."""
    from nanoseek.evaluate import CheckpointSampler

    cfg = EvalConfig(model=narrow_checkpoint, task="arithmetic", k=1, max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="tokens but the model's vocab_size .* use the tokenizer"):
        CheckpointSampler(cfg)


def test_a_jsonl_tasks_warning_is_said_once(micro_checkpoint, tmp_path) -> None:
    """`nanoseek eval CK --task jsonl:FILE` under the default --n: the file holds fewer test problems,
    said once (`evaluate_many` drew them, then `evaluate` drew them again and said it again)."""
    from nanoseek.evaluate import evaluate_many

    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{i}+1?", "answer": i + 1, "split": "test"}) + "\n" for i in range(2))
    )
    cfg = EvalConfig(
        model=micro_checkpoint,
        task=f"jsonl:{path}",
        k=1,
        max_new_tokens=2,
        progress=False,
        out=str(tmp_path / "r.json"),
    )
    with pytest.warns(UserWarning) as caught:
        (m,) = evaluate_many([cfg])
    assert m["problems"] == 2
    assert sum("asked for 64 test problems, only 2 exist" in str(w.message) for w in caught) == 1


def test_another_familys_answers_are_scored_as_its_template_prompts_them(
    micro_checkpoint, tmp_path, monkeypatch
) -> None:
    """Qwen2.5's ChatML prompt opens no think block: the model's plain answer "61" is its answer (it was
    scored wrong for lacking a `</think>` the template never asked for), and a think block it opens itself
    is read as R1's; the same through `evaluate_many`. R1's own template is scored as before."""
    import nanoseek.evaluate as ev
    from model_configs import chatml_checkpoint
    from nanoseek.tokenizer import load_tokenizer

    ck = chatml_checkpoint(tmp_path)
    tok = load_tokenizer(ck)
    assert not ev.prompt_opens_think(tok) and not ev.prompt_opens_think(tok, thinking=False)
    by_prompt = {tuple(ev.chat_prompt_ids(tok, p.messages)): p for p in _problems(2)}
    assert all(tok.decode(list(ids)).endswith("<|im_start|>assistant\n") for ids in by_prompt)

    def answering(template):
        def fake_generate(engine, prompts, **kw):
            assert kw["stop_token_ids"] == list(tok.stop_token_ids)
            ids = [
                tok.encode(template.format(by_prompt[tuple(p)].answer)) + [tok.eos_token_id] for p in prompts
            ]
            return [dataclasses.make_dataclass("C", ["token_ids", "finish_reason"])(i, "stop") for i in ids]

        return fake_generate

    common = dict(model=str(ck), task="arithmetic", k=2, n=2, language="en", progress=False)
    for template, fmt in (("{}", 0.0), ("<think>\nwork\n</think>\n{}", 1.0)):
        monkeypatch.setattr(ev, "engine_generate", answering(template))
        m = evaluate(EvalConfig(**common, out=str(tmp_path / "a.json")))
        assert (m["pass@1"], m["cons@2"], m["format_rate"]) == (1.0, 1.0, fmt)
        (many,) = ev.evaluate_many([EvalConfig(**common, out=str(tmp_path / "b.json"))])
        assert many["pass@1"] == 1.0
    r1 = load_tokenizer(micro_checkpoint)
    assert ev.prompt_opens_think(r1) and not ev.prompt_opens_think(r1, thinking=False)


def test_wall_time_counts_samples_drawn_in_a_shared_queue(tmp_path) -> None:
    """`nanoseek eval` draws every task's samples in one queue first (`evaluate_many`): its reports'
    wall_time_s was the scoring alone, a fraction of a second beside minutes of generation_time_s."""
    probs = _problems(2)
    right = [[Sample(f"x\n</think>\n{p.answer}", 3, "stop")] for p in probs]
    cfg = EvalConfig(model=str(tmp_path / "ck"), task="arithmetic", k=1, n=2, language="en")
    m = evaluate(
        cfg, sampler=lambda ps: right, shared={"generation_time_s": 60.0, "sampled_with": ["arithmetic"]}
    )
    assert m["generation_time_s"] == 60.0 and 60.0 <= m["wall_time_s"] < 70.0


def test_greedy_decoding_asks_for_one_sample_per_problem(tmp_path) -> None:
    """At temperature 0 every one of k samples is the same: k > 1 is refused with a way out (vLLM
    refused n > 1 with greedy sampling), not decoded k times over."""
    with pytest.raises(ValueError, match="--temperature 0 decodes greedily.*-k 1"):
        evaluate(EvalConfig(model="x", task="arithmetic", k=4, temperature=0.0), sampler=lambda ps: [])
    probs = _problems(2)
    right = [[Sample(f"x\n</think>\n{p.answer}", 3, "stop")] for p in probs]
    m = evaluate(
        EvalConfig(model=str(tmp_path / "ck"), task="arithmetic", k=1, n=2, language="en", temperature=0.0),
        sampler=lambda ps: right,
    )
    assert m["pass@1"] == 1.0 and m["k"] == 1


def test_a_temperature_the_engine_decodes_greedily_asks_for_one_sample_too() -> None:
    """The engine (as vLLM) decodes greedily below GREEDY_BELOW, not only at 0: `-k 4 --temperature
    1e-6` drew 4 copies of one greedy answer and reported them as pass@1 and cons@4 over 4 samples."""
    from nanoseek.engine.sampling import GREEDY_BELOW, SamplingParams

    assert SamplingParams(temperature=GREEDY_BELOW / 10).greedy
    cfg = EvalConfig(model="x", task="arithmetic", k=2, temperature=GREEDY_BELOW / 10)  # 2: two copies
    with pytest.raises(ValueError, match="decodes greedily: the -k 2 samples.*-k 1"):
        evaluate(cfg, sampler=lambda ps: [])
    with pytest.raises(ValueError, match="--temperature must be >= 0"):
        evaluate(dataclasses.replace(cfg, k=1, temperature=-0.5), sampler=lambda ps: [])
    # inf passed, and every sample was a uniform draw over the vocabulary
    with pytest.raises(ValueError, match="--temperature must be >= 0 and finite, got inf"):
        evaluate(dataclasses.replace(cfg, k=1, temperature=float("inf")), sampler=lambda ps: [])


def test_an_endpoints_reasoning_is_kept_when_its_content_holds_a_think_end_too() -> None:
    """Only a server that left the reasoning in the content (no reasoning_content) sends the completion
    whole: reasoning given beside a content with its own </think> is put back before it, not dropped."""
    from openai.types.chat import ChatCompletionMessage

    from nanoseek.evaluate import completion_text

    def message(content, reasoning):
        return ChatCompletionMessage.model_validate(
            {"role": "assistant", "content": content, "reasoning_content": reasoning}
        )

    assert completion_text(message("x</think>42", "r")) == "r</think>x</think>42"
    assert completion_text(message("r</think>42", None)) == "r</think>42"


def test_an_unclosed_think_block_an_endpoint_left_in_the_content_is_thinking_not_an_answer(tmp_path) -> None:
    """A server that leaves a think block the model opened and never closed in the content (vLLM's qwen3
    parser; one without a reasoning parser), reasoning_content null: scored as the checkpoint's same
    completion is. A </think> put before it made the think text the answer: language 0, and its numbers
    cons@k votes that outvoted the right answer."""
    from openai.types.chat import ChatCompletionMessage

    from nanoseek.evaluate import completion_text

    (p,) = _problems(1)
    cut = f"<think>\nones: so {p.answer}7\n\n{p.answer}7"  # stopped at max_tokens inside the block
    message = {"role": "assistant", "content": cut, "reasoning_content": None}
    sent = completion_text(ChatCompletionMessage.model_validate(message))
    right = Sample(f"x\n</think>\n{p.answer}", 3, "stop")
    figures = []
    for text in (cut, sent):  # the checkpoint's completion, the endpoint's rebuilt from its message
        cfg = EvalConfig(
            model=str(tmp_path / "ck"), task="arithmetic", k=3, n=1, language="en", progress=False
        )
        cfg.out = str(tmp_path / f"{len(figures)}.json")
        samples = [[right, Sample(text, 9, "length"), Sample(text, 9, "length")]]
        figures.append(evaluate(cfg, sampler=lambda ps, s=samples: s))
    keys = ("pass@1", "cons@3", "format_rate", "language_consistency", "truncated_rate")
    assert [figures[1][k] for k in keys] == [figures[0][k] for k in keys]
    assert figures[1]["cons@3"] == 1.0  # the one answer given wins; the cut-off thinking does not vote


def _stub_endpoint(
    problems: int,
    tokens: Callable[[int], int],
    reasoning: str | None = "work",
    seen: list | None = None,
    field: str = "reasoning_content",
) -> httpx.Client:
    """An endpoint that answers each of the first `problems` problems right, `tokens(n)` completion
    tokens in usage for its n choices, its reasoning in `field`; the request bodies go to `seen`."""
    probs = {p.prompt: p for p in _problems(problems)}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if seen is not None:
            seen.append(body)
        p = probs[body["messages"][0]["content"]]
        message = {"role": "assistant", "content": f"\n{p.answer}", field: reasoning}
        choices = [{"index": i, "finish_reason": "stop", "message": message} for i in range(body["n"])]
        usage = {"prompt_tokens": 5, "completion_tokens": tokens(body["n"]), "total_tokens": 0}
        chat = {"id": "x", "object": "chat.completion", "created": 0, "model": "stub"}
        return httpx.Response(200, json={**chat, "choices": choices, "usage": usage})

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_an_endpoint_evaluation_shows_its_progress_and_exact_lengths(tmp_path, capsys) -> None:
    """An endpoint's samples count on the progress bar as a checkpoint's do (--no-progress: none), and
    its mean response length is usage's tokens over the choices, not rounded per sample (a checkpoint's
    of the same samples: 3 tokens over 2 choices is 1.5)."""
    common = dict(model="http://stub:8000", task="arithmetic", k=2, n=3, language="en", endpoint_model="stub")
    for progress in (True, False):
        cfg = EvalConfig(**common, progress=progress, out=str(tmp_path / "e.json"))
        sampler, _ = endpoint_sampler(cfg, http_client=_stub_endpoint(3, lambda n: 3))
        m = evaluate(cfg, sampler=sampler)
        assert m["pass@1"] == 1.0 and m["mean_response_tokens"] == 1.5
        assert ("eval samples" in capsys.readouterr().err) is progress


def test_a_hub_models_report_goes_where_a_urls_does(tmp_path, monkeypatch) -> None:
    """A Hub name (owner/name) is no directory of the user's: its report is ./eval_<task>.json and no
    metrics.jsonl is written unless --run-dir says where (not ./owner/name/... and ./owner/metrics.jsonl)."""
    monkeypatch.chdir(tmp_path)
    probs = _problems(2)
    right = [[Sample(f"x\n</think>\n{p.answer}", 3, "stop")] for p in probs]
    cfg = EvalConfig(model="acme/tiny", task="arithmetic", k=1, n=2, language="en", progress=False)
    m = evaluate(cfg, sampler=lambda ps: right)
    assert m["json"] == "eval_arithmetic.json" and m["evaluated"] == "acme/tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_arithmetic.json"]


def test_several_tasks_write_their_reports_beside_the_one_named(tmp_path, monkeypatch) -> None:
    """`--out DIR/r.json` with several tasks: DIR/r_<task slug>.json each, in DIR whatever its name
    holds (a ".json" in a folder's name moved them to another folder), named as the default names them."""
    import nanoseek.evaluate as ev
    from nanoseek.cli import main as cli

    written = []

    def fake_evaluate(cfg):
        written.append(cfg.out)
        m = {"k": 1, "cons@1": 0.0, "pass@1_stderr": 0.0, "format_rate": 0.0, "language_consistency": 0.0}
        return {
            **m,
            "evaluated": "ck",
            "pass@1": 0.0,
            "mean_response_tokens": 1.0,
            "problems": 1,
            "json": cfg.out,
        }

    monkeypatch.setattr(ev, "evaluate_many", lambda cfgs: [fake_evaluate(c) for c in cfgs])
    out = tmp_path / "runs.json.d" / "r.json"
    assert cli(["eval", "ck", "--task", "arithmetic?ops=add,sub,comparison", "--out", str(out)]) == 0
    assert written == [
        str(out.parent / "r_arithmetic_ops_add_sub.json"),
        str(out.parent / "r_comparison.json"),
    ]


def _outs_written(monkeypatch) -> list:
    """`evaluate_many` stubbed: the report paths it was asked to write, in order."""
    import nanoseek.evaluate as ev

    written = []
    m = {"k": 1, "cons@1": 0.0, "pass@1": 0.0, "pass@1_stderr": 0.0, "format_rate": 0.0}
    m |= {"language_consistency": 1.0, "mean_response_tokens": 4.0, "problems": 2, "evaluated": "ck"}

    def many(cfgs):
        written.extend(c.out for c in cfgs)
        return [{**m, "json": c.out} for c in cfgs]

    monkeypatch.setattr(ev, "evaluate_many", many)
    return written


def test_one_task_writes_its_report_where_named_and_several_add_json_to_a_bare_name(
    tmp_path, monkeypatch
) -> None:
    """`--out r.json` with one task is r.json itself; with several and a name without a suffix, each is
    r_<task>.json, as the default names them."""
    from nanoseek.cli import main as cli

    written = _outs_written(monkeypatch)
    assert cli(["eval", "ck", "--task", "arithmetic", "--out", str(tmp_path / "r.json")]) == 0
    assert cli(["eval", "ck", "--task", "arithmetic,comparison", "--out", str(tmp_path / "r")]) == 0
    assert written == [
        str(tmp_path / "r.json"),
        str(tmp_path / "r_arithmetic.json"),
        str(tmp_path / "r_comparison.json"),
    ]


def test_a_task_by_a_long_path_gets_a_report_name_the_file_system_takes(tmp_path) -> None:
    """`--task jsonl:<a path of 300 bytes>`: its report's default name passed the 255 bytes a name may
    have, and the evaluation ended "File name too long" once every sample was drawn."""
    import nanoseek.evaluate as ev

    deep = "/".join(["数据集" * 8 + f"_{i}" for i in range(5)])
    outs = [
        ev._outputs(EvalConfig(model=str(tmp_path / "ck"), task=f"jsonl:{tmp_path}/{deep}/{name}"))[2]
        for name in ("a.jsonl", "b.jsonl")
    ]
    assert all(len(out.name.encode()) <= 255 for out in outs) and outs[0] != outs[1]
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("{}")  # the file system takes it
    assert ev.slug("arithmetic?ops=add") == "arithmetic_ops_add"  # a short one as it was


def test_tasks_named_in_japanese_or_chinese_get_reports_of_their_own(tmp_path, monkeypatch) -> None:
    """`jsonl:算数.jsonl` and `jsonl:理科.jsonl` were both slugged to `jsonl_.jsonl`: the second task's
    report overwrote the first's, beside the checkpoint and beside `--out`."""
    import nanoseek.evaluate as ev
    from nanoseek.cli import main as cli

    tasks = ["jsonl:データ/算数.jsonl", "jsonl:数据/科学.jsonl", "jsonl:データ/理科.jsonl"]
    defaults = [ev._outputs(EvalConfig(model=str(tmp_path / "ck"), task=t))[2] for t in tasks]
    assert len(set(defaults)) == 3 and defaults[0].name == "eval_jsonl_データ_算数.jsonl.json"
    written = _outs_written(monkeypatch)
    assert cli(["eval", "ck", "--task", ",".join(tasks), "--out", str(tmp_path / "r.json")]) == 0
    assert len(set(written)) == 3


def test_an_evaluation_of_training_problems_keeps_the_held_out_report_beside_it(tmp_path) -> None:
    """`eval CK --split train` wrote its report under the held-out one's default name, replacing it."""
    import nanoseek.evaluate as ev

    ck = str(tmp_path / "ck")
    held_out = ev._outputs(EvalConfig(model=ck, task="addition"))[2]
    train = ev._outputs(EvalConfig(model=ck, task="addition", split="train"))[2]
    assert held_out.name == "eval_addition.json" and train.name == "eval_addition_train.json"
    assert ev._outputs(EvalConfig(model="http://h/v1", task="addition", split="train"))[2].name == train.name


def test_the_cli_warns_of_truncated_samples_on_stderr(monkeypatch, capsys) -> None:
    """The scores are stdout's one line per task; the warning that samples ran out of --max-new-tokens
    is a message, on stderr with the others (it was a second line on stdout)."""
    import nanoseek.evaluate as ev
    from nanoseek.cli import main as cli

    m = {"k": 1, "cons@1": 0.0, "pass@1": 0.0, "pass@1_stderr": 0.0, "format_rate": 0.0}
    m |= {"language_consistency": 1.0, "mean_response_tokens": 4.0, "problems": 2, "truncated_rate": 0.5}
    monkeypatch.setattr(ev, "evaluate_many", lambda cfgs: [{**m, "evaluated": "ck", "json": "r.json"}])
    assert cli(["eval", "ck", "--task", "arithmetic"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and out.startswith("eval arithmetic (ck): pass@1 0.000")
    assert "50% of the samples stopped at --max-new-tokens 320" in err


@pytest.mark.parametrize(
    ("stderr", "shown"), [(0.0, "pass@1 0.000, cons@1"), (0.05, "pass@1 0.000 ± 0.050, cons@1")]
)
def test_the_cli_prints_no_interval_where_the_scores_do_not_vary(monkeypatch, capsys, stderr, shown) -> None:
    """Every problem scored alike (or one problem): a standard error of 0 printed "± 0.000", which reads
    as certainty; the report shows none there (`report.plus_minus`), and neither does the line now."""
    import nanoseek.evaluate as ev
    from nanoseek.cli import main as cli

    m = {"k": 1, "cons@1": 0.0, "pass@1": 0.0, "pass@1_stderr": stderr, "format_rate": 0.0}
    m |= {"language_consistency": 1.0, "mean_response_tokens": 4.0, "problems": 2}
    monkeypatch.setattr(ev, "evaluate_many", lambda cfgs: [{**m, "evaluated": "ck", "json": "r.json"}])
    assert cli(["eval", "ck", "--task", "arithmetic"]) == 0
    assert shown in capsys.readouterr().out


def test_the_cli_refuses_to_evaluate_in_each_of_torchruns_processes(monkeypatch, capsys) -> None:
    """`torchrun --nproc-per-node 2 -m nanoseek eval` ran the whole evaluation in each process, and
    metrics.jsonl got its line twice (the report then listed the evaluation twice)."""
    import nanoseek.evaluate as ev
    from nanoseek.cli import main as cli

    evaluated = []
    monkeypatch.setattr(ev, "evaluate_many", lambda cfgs: evaluated.append(cfgs) or [])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli(["eval", "ck", "--task", "arithmetic"]) == 2
    assert not evaluated
    assert "nanoseek eval: error: eval runs in one process, but torchrun started 2" in (
        capsys.readouterr().err
    )
    # said by rank 0 only: the other ranks exit with the same code quietly, once rank 0 had time to say it
    import nanoseek.cli

    waited = []
    monkeypatch.setattr(nanoseek.cli.time, "sleep", waited.append)
    monkeypatch.setenv("RANK", "1")
    assert cli(["eval", "ck", "--task", "arithmetic"]) == 2
    assert capsys.readouterr().err == "" and waited == [nanoseek.cli.RANK_0_SAYS_S]


def test_the_cli_evaluates_several_tasks_of_a_checkpoint_with_one_engine(
    micro_checkpoint, tmp_path, engine_widths, capsys
) -> None:
    """`nanoseek eval CK --task a,b` loads the model once and draws every task's samples in one queue,
    as the speedrun does (`evaluate_many`), where it loaded the checkpoint once per task."""
    from nanoseek.cli import main as cli

    out = tmp_path / "r.json"
    args = ["eval", str(micro_checkpoint), "--task", "arithmetic,comparison", "--n", "2", "-k", "1"]
    assert cli([*args, "--max-new-tokens", "4", "--no-progress", "--out", str(out)]) == 0
    assert len(engine_widths) == 1
    printed = capsys.readouterr().out
    assert "eval arithmetic (" in printed and "eval comparison (" in printed
    assert (tmp_path / "r_arithmetic.json").exists() and (tmp_path / "r_comparison.json").exists()


def test_the_cli_scores_a_checkpoint_on_the_device_and_weights_serve_would_load(
    micro_checkpoint, tmp_path, monkeypatch
) -> None:
    """`eval DIR --device cpu --quantize int8`, as `serve`, `generate` and `chat` take them: eval had
    neither flag, so a model served in int8 could only be scored in full precision."""
    import nanoseek.engine as engine_module
    from nanoseek.cli import main as cli
    from nanoseek.engine.quantize import QuantLinear

    loaded = []
    real = engine_module.Engine

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, model, *args, **kwargs) -> None:
            loaded.append((model.device, any(isinstance(m, QuantLinear) for m in model.modules())))
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(engine_module, "Engine", Recording)
    out = tmp_path / "r.json"
    args = ["eval", str(micro_checkpoint), "--task", "arithmetic", "--n", "2", "-k", "1", "--no-progress"]
    assert (
        cli([*args, "--max-new-tokens", "2", "--device", "cpu", "--quantize", "int8", "--out", str(out)]) == 0
    )
    assert [(d.type, q) for d, q in loaded] == [("cpu", True)]
    assert json.loads(out.read_text())["metrics"]["quantize"] == "int8"  # the report says what was scored


def test_eval_refuses_a_device_or_w8a8_it_cannot_run_before_a_hub_download(monkeypatch, capsys) -> None:
    """`eval --quantize w8a8` on a GPU, or a `--device` this machine lacks, downloaded a Hub model's
    weights, all of them, before either was refused, as generate, chat and serve refuse them first."""
    import huggingface_hub
    import torch

    from nanoseek.cli import main as cli

    def fetch(repo_id, **kw):
        raise AssertionError(f"fetched {repo_id} before checking the flags")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    args = ["eval", "someone/model", "--task", "arithmetic", "--n", "2", "-k", "1", "--no-progress"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli([*args, "--device", "cuda"]) == 2
    assert "device 'cuda' is not available" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli([*args, "--quantize", "w8a8", "--device", "cuda"]) == 2
    assert "quantize='w8a8' runs on CPUs" in capsys.readouterr().err


def test_a_problem_whose_gold_answer_is_unparseable_is_left_out_of_every_figure(tmp_path) -> None:
    """Of 3 problems, one has a gold answer that is no number: it is counted as skipped and left out of
    pass@1, cons@k and the per-problem scores the report pairs (and of which problems they are)."""
    path = tmp_path / "t.jsonl"
    items = [("1+1", "2"), ("?", "unknown"), ("2+2", "4")]
    path.write_text(
        "".join(
            json.dumps({"prompt": q, "answer": a, "verifier": "numeric", "split": "test"}) + "\n"
            for q, a in items
        )
    )
    task = f"jsonl:{path}"
    probs = get_task(task).problems("test", 3, seed=0)
    assert sorted(p.answer for p in probs) == ["2", "4", "unknown"]

    def sampler(problems):  # every sample right where the answer is 2, every one wrong where it is 4
        # (with no finish reason, as some endpoints send none: not counted as cut off)
        return [[Sample(f"x\n</think>\n{2 if p.answer == '2' else 5}", 3)] * 2 for p in problems]

    ck = tmp_path / "run" / "grpo"
    m = evaluate(EvalConfig(model=str(ck), task=task, k=2, n=3, progress=False), sampler=sampler)
    assert m["problems"] == 2 and m["skipped_problems"] == 1
    assert m["pass@1"] == pytest.approx(0.5) and m["cons@2"] == pytest.approx(0.5)
    assert "pass@1_by_language" not in m  # one language: no breakdown to give
    assert m["truncated_rate"] == 0.0
    (rec,) = list(read_metrics(tmp_path / "run", stage="eval"))
    scored = [p for p in probs if p.answer != "unknown"]
    assert rec["pass@1_per_problem"] == [1.0 if p.answer == "2" else 0.0 for p in scored]
    assert rec["problems_digest"] == problems_digest([p.id for p in scored])


def test_samples_without_an_answer_do_not_vote_and_the_majority_is_its_earliest_spelling(tmp_path) -> None:
    """cons@k: 2 of 3 samples give no answer (none after </think>, no think block): they cast no vote,
    and the right answer given once wins. The majority answer reported is the spelling of the earliest
    sample that gave it."""
    (p,) = _problems(1)
    right = int(p.answer)
    cases = (
        (["add\n</think>\n", f"add\n</think>\n{right}", "no think block"], 1.0, str(right)),
        ([f"add\n</think>\n{right}.", f"add\n</think>\n{right}", "add\n</think>\nx"], 1.0, f"{right}."),
    )
    for texts, cons, majority in cases:
        samples = [[Sample(t, 3, "stop") for t in texts]]
        out = tmp_path / "eval.json"
        cfg = EvalConfig(model=str(tmp_path / "ck"), task="arithmetic", k=3, n=1, language="en", out=str(out))
        assert evaluate(cfg, sampler=lambda problems, s=samples: s)["cons@3"] == cons, texts
        assert json.loads(out.read_text())["problems"][0]["majority_answer"] == majority


def test_an_endpoints_reasoning_named_reasoning_is_scored_as_reasoning_content(tmp_path) -> None:
    """vLLM >= 0.10, OpenRouter and Ollama send the reasoning as `reasoning`, not DeepSeek's
    `reasoning_content`: their answers after it are scored the same, not as a think block never closed."""
    common = dict(model="http://stub:8000", task="arithmetic", k=2, n=3, language="en", endpoint_model="stub")
    for field in ("reasoning_content", "reasoning"):
        cfg = EvalConfig(**common, progress=False, out=str(tmp_path / f"{field}.json"))
        sampler, _ = endpoint_sampler(cfg, http_client=_stub_endpoint(3, lambda n: 3, field=field))
        m = evaluate(cfg, sampler=sampler)
        assert m["pass@1"] == 1.0 and m["format_rate"] == 1.0, field


def test_the_api_key_is_not_written_into_the_report(tmp_path) -> None:
    """--api-key is a secret: the JSON report (a file people share) says one was given, not which."""
    cfg = EvalConfig(
        model="http://stub:8000", task="arithmetic", k=1, n=2, language="en", endpoint_model="stub",
        api_key="sk-secret-123", progress=False, out=str(tmp_path / "e.json"),
    )  # fmt: skip
    sampler, _ = endpoint_sampler(cfg, http_client=_stub_endpoint(2, lambda n: 3))
    evaluate(cfg, sampler=sampler)
    report = (tmp_path / "e.json").read_text()
    assert "sk-secret-123" not in report
    assert json.loads(report)["config"]["api_key"] is not None


def test_a_python_callers_path_settings_are_written_into_the_report(tmp_path) -> None:
    """`out=Path(...)` (a notebook's) ended the evaluation in a TypeError once every sample was drawn
    and scored, with no report written, as the training stages' Path settings once did."""
    out = tmp_path / "e.json"  # a Path, not its text
    cfg = EvalConfig(
        model="http://stub:8000",
        task="arithmetic",
        k=1,
        n=2,
        language="en",
        endpoint_model="stub",
        progress=False,
        out=out,
    )
    sampler, _ = endpoint_sampler(cfg, http_client=_stub_endpoint(2, lambda n: 3))
    evaluate(cfg, sampler=sampler)
    assert json.loads(out.read_text())["config"]["out"] == str(out)


def test_an_endpoint_that_lists_no_model_asks_for_its_name() -> None:
    """A server whose GET /models lists nothing, or has no such route, is asked for --model-name in
    one line, not an IndexError's traceback or a bare 404."""

    def handler(models: httpx.Response) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(lambda request: models))

    cfg = EvalConfig(model="http://stub:8000", task="arithmetic", k=1, n=1)
    for models, said in (
        (httpx.Response(200, json={"object": "list", "data": []}), "lists no model: name the one"),
        (httpx.Response(404, json={"error": {"message": "not found", "type": "x"}}), "404: is .* base URL"),
    ):
        with pytest.raises(ValueError, match=said) as e:
            endpoint_sampler(cfg, http_client=handler(models))
        assert "--model-name" in str(e.value)


def test_an_endpoint_url_with_a_path_of_its_own_is_its_base_url(tmp_path) -> None:
    """A bare host:port gets /v1; a URL with a path (Gemini's .../v1beta/openai, OpenRouter's
    .../api/v1) is the base URL as the OpenAI SDK takes it, not one with /v1 added after it."""
    for url, path in (
        ("http://stub:8000", "/v1/chat/completions"),
        ("http://stub:8000/", "/v1/chat/completions"),
        ("http://stub:8000/v1/", "/v1/chat/completions"),
        ("http://stub/v1beta/openai/", "/v1beta/openai/chat/completions"),
    ):
        seen = []
        answered = _stub_endpoint(1, lambda n: 3)

        def handler(request: httpx.Request, seen=seen, answered=answered) -> httpx.Response:
            seen.append(request.url.path)
            return answered.send(request)

        cfg = EvalConfig(model=url, task="arithmetic", k=1, n=1, language="en", endpoint_model="m")
        sampler, _ = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
        sampler(_problems(1))
        assert seen == [path], url


def test_an_endpoint_that_says_retry_later_is_waited_for_not_given_up_on(tmp_path) -> None:
    """A server at its rate limit or queue's end (429, nanoseek serve's --max-queue) answers 429 with
    Retry-After a few times in a row: the request is tried again as told, and the evaluation goes on;
    the client's 2 retries ended it, every sample drawn lost."""
    refusals = []
    answered = _stub_endpoint(1, lambda n: 3)

    def handler(request: httpx.Request) -> httpx.Response:
        if len(refusals) < 5:
            refusals.append(request)
            headers = {"retry-after-ms": "1"}  # as OpenAI's API says it, in milliseconds
            return httpx.Response(
                429, headers=headers, json={"error": {"message": "at capacity", "type": "x"}}
            )
        return answered.send(request)

    cfg = EvalConfig(
        model="http://stub:8000", task="arithmetic", k=2, n=1, language="en", endpoint_model="stub"
    )
    cfg.progress, cfg.out = False, str(tmp_path / "e.json")
    sampler, _ = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    assert evaluate(cfg, sampler=sampler)["pass@1"] == 1.0
    assert len(refusals) == 5


def test_an_endpoint_that_ignores_n_is_asked_again_for_the_samples_it_left_out(tmp_path) -> None:
    """llama.cpp's llama-server answers one choice whatever n asks: each further sample of a problem
    is asked for with the seed it has among the k (seed + i*k + j), and the problem is scored on k."""
    seeds = []
    answered = _stub_endpoint(2, lambda n: 4 * n)

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seeds.append(body["seed"])
        reply = answered.send(request)
        data = reply.json()
        data["choices"] = data["choices"][:1]
        data["usage"]["completion_tokens"] = 4
        return httpx.Response(200, json=data)

    cfg = EvalConfig(model="http://stub:8000", task="arithmetic", k=3, n=2, language="en")
    cfg.endpoint_model, cfg.progress, cfg.out = "stub", False, str(tmp_path / "e.json")
    sampler, _ = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    m = evaluate(cfg, sampler=sampler)
    assert m["k"] == 3 and m["pass@1"] == 1.0 and m["mean_response_tokens"] == 4
    assert sorted(seeds) == list(range(6))


def test_a_problem_the_context_cannot_hold_is_named_before_any_sample_is_drawn(
    micro_checkpoint, tmp_path, monkeypatch
) -> None:
    """A JSONL problem longer than the model's context ended the whole evaluation with the engine's
    "prompt has N tokens; max_seq_len is M", naming no problem; one whose prompt leaves less than
    --max-new-tokens gets answers cut at the context, which the truncation warning blamed on the flag."""
    import nanoseek.evaluate as ev

    path = tmp_path / "qa.jsonl"
    rows = [
        {"prompt": "1+1?", "answer": 2},
        {"prompt": "long question: " + "1+1 " * 800, "answer": 2},
        {"prompt": "near the end: " + "1+1 " * 240, "answer": 2},
    ]
    path.write_text("".join(json.dumps({**r, "split": "test"}) + "\n" for r in rows))
    cfg = EvalConfig(model=micro_checkpoint, task=f"jsonl:{path}", n=3, k=1, max_new_tokens=8, progress=False)
    drawn: list = []
    monkeypatch.setattr(ev, "engine_generate", lambda *a, **kw: drawn.append(a) or [])
    with pytest.raises(ValueError, match=r"1 problem leaves no room to answer in the model's context of 1024 "
                       r"tokens: \S+ 'long question: 1\+1 1\+1 1\+1 1\+1' \(\d{4} tokens\)"):  # fmt: skip
        evaluate(dataclasses.replace(cfg, out=str(tmp_path / "a.json")))
    assert not drawn
    near = tmp_path / "near.jsonl"
    near.write_text("".join(json.dumps({**r, "split": "test"}) + "\n" for r in rows[::2]))
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="1 of 2 problems leave fewer than --max-new-tokens 60 tokens to answer "
                      "in the model's context of 1024: their answers stop at the context"):  # fmt: skip
        m = evaluate(
            dataclasses.replace(
                cfg,
                task=f"jsonl:{near}",
                n=2,
                max_new_tokens=60,
                temperature=0,
                out=str(tmp_path / "b.json"),
            )
        )
    assert m["problems"] == 2


def test_an_endpoint_answers_a_prompt_near_its_context_as_a_checkpoint_does(tmp_path) -> None:
    """A prompt within --max-new-tokens of the context: the server (OpenAI's rule, vLLM's, nanoseek
    serve's) refuses max_tokens past it with 400 context_length_exceeded, which ended the whole
    evaluation; a checkpoint's answer stops at the context. Asked again without max_tokens, the server
    answers up to its context; a prompt over the context is still a clear error."""
    asked = []
    answered = _stub_endpoint(2, lambda n: 3 * n)
    refusal = {
        "message": "This model's maximum context length is 64 tokens.",
        "type": "invalid_request_error",
    }

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        asked.append(body.get("max_tokens"))
        if body.get("max_tokens") is not None or "always" in request.url.host:
            return httpx.Response(400, json={"error": {**refusal, "code": "context_length_exceeded"}})
        return answered.send(request)

    cfg = EvalConfig(
        model="http://stub:8000", task="arithmetic", k=2, n=2, language="en", endpoint_model="stub"
    )
    cfg.progress, cfg.out = False, str(tmp_path / "e.json")
    sampler, _ = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    assert evaluate(cfg, sampler=sampler)["pass@1"] == 1.0
    assert sorted(asked, key=str) == [320, 320, None, None]  # each problem asked once with, once without
    cfg.model = "http://always:8000"
    sampler, _ = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    with pytest.raises(ValueError, match="answered 400: .*maximum context length is 64 tokens"):
        evaluate(cfg, sampler=sampler)


def test_ctrl_c_during_an_endpoint_evaluation_leaves_the_requests_in_flight(tmp_path) -> None:
    """Ctrl-C while requests are in flight stops the evaluation at once: the requests are abandoned on
    daemon threads, where a thread pool's workers were waited for (and joined again at exit) for as long
    as the longest generation ran."""
    import signal
    import threading

    release, answered, daemon = threading.Event(), [], []
    stub = _stub_endpoint(4, lambda n: 3)

    def handler(request: httpx.Request) -> httpx.Response:
        daemon.append(threading.current_thread().daemon)
        if len(daemon) == 1:
            # the user's Ctrl-C, while this request is generated, delivered (as the kernel may) to this
            # thread: the main thread's wait for the next answer must still see it
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        release.wait(20)  # a long generation (released at the end: the wait costs nothing)
        answered.append(request)
        return stub.send(request)

    cfg = EvalConfig(model="http://stub:8000", task="arithmetic", k=1, n=4, language="en")
    cfg.endpoint_model, cfg.concurrency, cfg.progress = "stub", 2, False
    sampler, _ = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    try:
        with pytest.raises(KeyboardInterrupt):
            sampler(_problems(4))
        assert not answered and daemon and all(daemon)
    finally:
        release.set()


def test_an_answer_cut_inside_the_think_block_a_server_without_reasoning_parser_sent_is_no_answer(
    tmp_path,
) -> None:
    """vLLM without --reasoning-parser sends `reasoning_content: null` beside the whole completion, which
    for R1's template begins inside the think block the prompt opened: one cut by max_tokens before its
    </think> was read as an answer, its numbers cons@k votes that outvoted the one right answer."""
    (p,) = _problems(1)
    wrong = f"{p.answer}7"

    def handler(request: httpx.Request) -> httpx.Response:
        done = {"content": f"add\n</think>\n{p.answer}", "finish_reason": "stop"}
        cut = {"content": f"ones: so {wrong}\n\n{wrong}", "finish_reason": "length"}
        choices = [
            {
                "index": i,
                "finish_reason": c["finish_reason"],
                "message": {"role": "assistant", "content": c["content"], "reasoning_content": None},
            }
            for i, c in enumerate((done, cut, cut))
        ]
        usage = {"prompt_tokens": 5, "completion_tokens": 27, "total_tokens": 0}
        chat = {"id": "x", "object": "chat.completion", "created": 0, "model": "stub"}
        return httpx.Response(200, json={**chat, "choices": choices, "usage": usage})

    cfg = EvalConfig(model="http://stub:8000", task="arithmetic", k=3, n=1, language="en")
    cfg.endpoint_model, cfg.progress, cfg.out = "stub", False, str(tmp_path / "e.json")
    sampler, _ = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    m = evaluate(cfg, sampler=sampler)
    assert m["pass@1"] == pytest.approx(1 / 3) and m["truncated_rate"] == pytest.approx(2 / 3)
    assert m["cons@3"] == 1.0  # the cut-off thinking does not vote, as a checkpoint's does not


def test_an_endpoints_choices_are_taken_in_index_order(tmp_path) -> None:
    """Choice j is the sample drawn with seed + j: a server that lists its choices out of order had its
    samples taken in the order listed, and cons@k's tie went to another sample than a checkpoint's."""
    (p,) = _problems(1)

    def handler(request: httpx.Request) -> httpx.Response:
        texts = {0: f"\n{p.answer}", 1: f"\n{p.answer}7"}
        choices = [
            {
                "index": i,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": texts[i], "reasoning_content": "work"},
            }
            for i in (1, 0)
        ]
        chat = {"id": "x", "object": "chat.completion", "created": 0, "model": "stub"}
        return httpx.Response(200, json={**chat, "choices": choices})

    cfg = EvalConfig(model="http://stub:8000", task="arithmetic", k=2, n=1, language="en")
    cfg.endpoint_model, cfg.progress, cfg.out = "stub", False, str(tmp_path / "e.json")
    sampler, _ = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    m = evaluate(cfg, sampler=sampler)
    assert m["pass@1"] == 0.5 and m["cons@2"] == 1.0  # the tie goes to choice 0, the right answer


def test_an_endpoint_that_sends_no_usage_has_its_length_unknown_not_zero(
    tmp_path, monkeypatch, capsys
) -> None:
    """Some servers and proxies leave `usage` out: their answers were reported as 0 tokens long."""
    import nanoseek.evaluate as ev
    from nanoseek.cli import main as cli

    stub = _stub_endpoint(2, lambda n: 3)

    def handler(request: httpx.Request) -> httpx.Response:
        data = stub.send(request).json()
        del data["usage"]
        return httpx.Response(200, json=data)

    cfg = EvalConfig(model="http://stub:8000", task="arithmetic", k=2, n=2, language="en")
    cfg.endpoint_model, cfg.progress, cfg.out = "stub", False, str(tmp_path / "e.json")
    sampler, _ = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    m = evaluate(cfg, sampler=sampler)
    assert m["pass@1"] == 1.0 and m["mean_response_tokens"] is None
    assert json.loads((tmp_path / "e.json").read_text())["problems"][0]["mean_tokens"] is None
    monkeypatch.setattr(ev, "evaluate_many", lambda cfgs: [m])
    assert cli(["eval", "http://stub:8000", "--task", "arithmetic"]) == 0
    assert "length unknown (no usage sent) over 2 problems" in capsys.readouterr().out


def test_an_endpoint_that_answers_no_json_or_an_error_or_not_in_time_is_one_clear_error(monkeypatch) -> None:
    """A web page where the API was looked for (a chat UI's port) ended the evaluation with the client's
    AttributeError; an error sent with status 200 was "no choices" without its message; a server that
    timed out was asked whether it was running, after it had listed its models."""
    import openai

    page = "<!doctype html><title>Chat</title>"
    models = {"object": "list", "data": [{"id": "m:latest", "object": "model"}]}

    def serve(chat: Callable[[], httpx.Response], listing: httpx.Response | None = None) -> httpx.Client:
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/models"):
                return listing or httpx.Response(200, json=models)
            return chat()

        return httpx.Client(transport=httpx.MockTransport(handler))

    def timeout() -> httpx.Response:
        raise httpx.ReadTimeout("timed out")

    monkeypatch.setattr(openai.OpenAI, "_calculate_retry_timeout", lambda *a, **k: 0.0)
    html = httpx.Response(200, text=page, headers={"content-type": "text/html"})
    cfg = EvalConfig(model="http://stub:8000", task="arithmetic", k=1, n=1, language="en", progress=False)
    with pytest.raises(ValueError, match="http://stub:8000/v1 answered with a body that is not JSON"):
        endpoint_sampler(cfg, http_client=serve(lambda: html, listing=html))
    for chat, said in (
        (lambda: html, "answered with a body that is not JSON .*<!doctype"),
        (
            lambda: httpx.Response(200, json={"error": {"message": "model overloaded"}}),
            "no choices: model overloaded",
        ),
        (timeout, "did not answer within 300 s, 9 times"),
        (lambda: httpx.Response(503, json={"error": {"message": "busy"}}), "answered 503, 9 times: .*busy"),
    ):
        sampler, source = endpoint_sampler(cfg, http_client=serve(chat))
        assert source == "http://stub:8000/v1 (m:latest)"  # ollama's tagged name, as listed
        with pytest.raises(ValueError, match=said):
            sampler(_problems(1))


def test_an_endpoint_that_never_answers_is_given_up_on_in_bounded_time(monkeypatch) -> None:
    """A server that takes the connection and never answers (hung, or still loading its model) held an
    evaluation for the OpenAI client's 600 s a try: half an hour at the model list, an hour and a half a
    sample with --model-name. The list, which a live server answers at once, is given seconds; a sample
    --timeout a try, --retries times again; each failure names the URL."""
    import socket
    import time

    import openai

    import nanoseek.evaluate as ev

    monkeypatch.setattr(openai.OpenAI, "_calculate_retry_timeout", lambda *a, **k: 0.0)
    monkeypatch.setattr(ev, "LISTING_TIMEOUT", 0.5)  # (of 10 s) whatever --timeout gives the samples
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connections queue, none is ever answered
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        cfg = EvalConfig(model=url, task="arithmetic", k=1, n=1, language="en", progress=False)
        started = time.monotonic()
        with pytest.raises(ValueError, match=f"{url}/v1/models did not answer within 0.5 s, 3 times: .*hung"):
            endpoint_sampler(cfg)
        cfg.endpoint_model, cfg.timeout, cfg.retries = "m", 0.5, 1
        sampler, _ = endpoint_sampler(cfg)
        with pytest.raises(ValueError, match=f"{url}/v1 did not answer within 0.5 s, 2 times: .*--timeout"):
            sampler(_problems(1))
        assert time.monotonic() - started < 20  # 5 tries of 0.5 s
    for flags, said in (({"timeout": 0}, "--timeout must be"), ({"retries": -1}, "--retries must be")):
        with pytest.raises(ValueError, match=said):
            evaluate(dataclasses.replace(cfg, **flags), sampler=lambda ps: [])


@pytest.mark.parametrize("status", [400, 500])
def test_an_endpoint_that_refuses_n_above_1_is_asked_for_each_sample_alone(
    tmp_path, monkeypatch, status
) -> None:
    """llama.cpp's llama-server refuses n > 1 ("Only one completion choice is allowed", a 400 or a 500
    by version): every evaluation at k > 1 ended there. Each sample is asked for alone, with its seed."""
    import openai

    monkeypatch.setattr(openai.OpenAI, "_calculate_retry_timeout", lambda *a, **k: 0.0)
    seeds, refused = [], []
    answered = _stub_endpoint(2, lambda n: 4 * n)

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["n"] != 1:
            refused.append(body["n"])
            error = {
                "code": status,
                "message": "Only one completion choice is allowed",
                "type": "server_error",
            }
            return httpx.Response(status, json={"error": error})
        seeds.append(body["seed"])
        return answered.send(request)

    cfg = EvalConfig(model="http://stub:8000", task="arithmetic", k=3, n=2, language="en", concurrency=1)
    cfg.endpoint_model, cfg.progress, cfg.out = "stub", False, str(tmp_path / "e.json")
    sampler, _ = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    m = evaluate(cfg, sampler=sampler)
    assert m["k"] == 3 and m["pass@1"] == 1.0 and m["mean_response_tokens"] == 4
    assert seeds == list(range(6))
    assert refused[-1] == 3 and len(set(refused)) == 1  # found out once, then n = 1 only


def test_a_sample_scored_exactly_half_right_votes_for_the_right_answer() -> None:
    """ "At least half right" includes exactly half: two programs passing 2 of 4 tests each, written
    differently, vote together for the right answer and outvote one wrong answer (each by its own text
    the three would tie, and the earliest, not the right answer, would win)."""
    from types import SimpleNamespace

    from nanoseek.evaluate import score_samples

    (p,) = _problems(1)
    texts = ("t</think>A", "t</think>B", "t</think>C")
    scores = dict(zip(texts, (0.5, 0.5, 0.0), strict=True))
    samples = [[Sample(text=t, num_tokens=3, finish_reason="stop") for t in texts]]
    reward = lambda prob, text: (scores[text], {"accuracy": scores[text]})  # noqa: E731
    metrics, (rec,) = score_samples(SimpleNamespace(), reward, [p], samples)
    assert metrics["cons@3"] == 1.0 and rec["cons"] is True
    assert metrics["pass@1"] == pytest.approx(1 / 3)


def test_pass_at_1_per_language_is_given_for_two_languages() -> None:
    """Problems in two languages (English and Japanese, none in Chinese) are broken down by language
    too: the breakdown is left out only where there is one language."""
    from types import SimpleNamespace

    from nanoseek.evaluate import score_samples

    probs = [p for p in get_task("comparison").problems("test", 30, seed=0) if p.language in ("en", "ja")]
    assert {p.language for p in probs} == {"en", "ja"}
    samples = [[Sample(text=f"t</think>{p.language}", num_tokens=3, finish_reason="stop")] * 2 for p in probs]
    # right in English only
    reward = lambda prob, text: (1.0, {"accuracy": float(text.endswith("en"))})  # noqa: E731
    metrics, _ = score_samples(SimpleNamespace(), reward, probs, samples)
    assert metrics["pass@1_by_language"] == {"en": 1.0, "ja": 0.0}
    share = sum(p.language == "en" for p in probs) / len(probs)
    assert metrics["pass@1"] == pytest.approx(share)


def test_a_mean_length_is_unknown_where_any_problems_samples_have_no_token_count() -> None:
    """An endpoint that sent usage for one problem's request and none for another's (a proxy's
    dropped field): the mean response length is unknown, not the known one averaged with a 0."""
    from types import SimpleNamespace

    from nanoseek.evaluate import score_samples

    probs = _problems(2)
    samples = [
        [Sample(text="t</think>1", num_tokens=10, finish_reason="stop")] * 2,
        [Sample(text="t</think>1", num_tokens=None, finish_reason="stop")] * 2,
    ]
    reward = lambda prob, text: (0.0, {"accuracy": 0.0})  # noqa: E731
    metrics, recs = score_samples(SimpleNamespace(), reward, probs, samples)
    assert [r["mean_tokens"] for r in recs] == [10.0, None]
    assert metrics["mean_response_tokens"] is None
    both = [[Sample(text="t</think>1", num_tokens=n, finish_reason="stop")] * 2 for n in (10, 30)]
    assert score_samples(SimpleNamespace(), reward, probs, both)[0]["mean_response_tokens"] == 20.0


def test_a_skipped_problem_is_left_out_of_the_format_and_language_rates() -> None:
    """Of 3 problems one has an unparseable gold answer (the reward says `skipped`): format rate and
    language consistency are means over the 2 scored, as pass@1 is, not over all 3."""
    from types import SimpleNamespace

    from nanoseek.data.rewards import RewardResult
    from nanoseek.evaluate import score_samples

    probs = _problems(3)
    skipped_id = probs[1].id

    def reward(prob, text):
        if prob.id == skipped_id:
            return RewardResult(0.0, {}, skipped=True)
        return RewardResult(1.0, {"accuracy": 1.0, "format": 1.0, "language": 1.0})

    samples = [[Sample(text="t</think>1", num_tokens=2, finish_reason="stop")] * 2 for _ in probs]
    metrics, _ = score_samples(SimpleNamespace(), reward, probs, samples)
    assert metrics["problems"] == 2 and metrics["skipped_problems"] == 1
    assert metrics["pass@1"] == 1.0
    assert metrics["format_rate"] == 1.0 and metrics["language_consistency"] == 1.0


def test_strip_stop_drops_only_a_final_stop_id() -> None:
    """The stop token a completion ended on is not part of its text (a stop id that is no special token,
    which decoding would keep, named by a checkpoint's generation_config.json); one inside is kept."""
    from nanoseek.evaluate import strip_stop

    assert strip_stop([5, 9, 7], [7, 8]) == [5, 9]
    assert strip_stop([5, 7, 9], [7, 8]) == [5, 7, 9]
    assert strip_stop([], [7]) == []


def test_an_endpoint_that_answers_more_choices_than_asked_is_scored_on_k(tmp_path) -> None:
    """A server that sends more choices than n asks for (one that ignores n, with its own number): the
    first k in index order are scored, and pass@1 and cons@k are over k samples, as the report says."""
    answered = _stub_endpoint(2, lambda n: 4 * n)

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        data = answered.send(request).json()
        extra = [{**data["choices"][0], "index": body["n"] + i} for i in range(2)]
        data["choices"] = data["choices"] + extra
        return httpx.Response(200, json=data)

    cfg = EvalConfig(model="http://stub:8000", task="arithmetic", k=3, n=2, language="en")
    cfg.endpoint_model, cfg.progress, cfg.out = "stub", False, str(tmp_path / "e.json")
    sampler, _ = endpoint_sampler(cfg, http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    samples = sampler(_problems(2))
    assert [len(s) for s in samples] == [3, 3]
    m = evaluate(cfg, sampler=sampler)
    assert m["k"] == 3 and "cons@3" in m and m["pass@1"] == 1.0
