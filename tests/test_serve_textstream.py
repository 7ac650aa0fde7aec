"""The server's text state machines, without a server: stop strings and the reasoning split must give
the same result however the text is chunked (streaming vs one piece), and never leak a partial tag or
a partial stop string."""

from __future__ import annotations

import random
import sys

import pytest

from nanoseek.serve.metrics import ServerMetrics
from nanoseek.serve.textstream import ReasoningSplitter, StopStringMatcher, ToolCallSplitter
from nanoseek.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP


def _chunked(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        k = rng.randint(1, 5)
        out.append(text[i : i + k])
        i += k
    return out


def _split(
    text: str, started: bool, chunks: list[str] | None = None
) -> tuple[str, str, list[tuple[str, str]]]:
    s = ReasoningSplitter(started)
    deltas = [s.push(c) for c in (chunks or [text])]
    deltas.append(s.flush())
    return "".join(r for r, _ in deltas), "".join(c for _, c in deltas), deltas


CASES = [
    # (generated text, prompt opened <think>?, expected reasoning, expected content)
    ("\nLet me think.\n</think>\n\nThe answer is 4.", True, "Let me think.\n", "The answer is 4."),
    ("<think>\nhmm\n</think>\n\n42", False, "hmm\n", "42"),
    ("  <think>a</think>b", False, "a", "b"),
    ("plain answer, no thinking", False, "", "plain answer, no thinking"),
    ("still thinking when max_tokens hit", True, "still thinking when max_tokens hit", ""),
    ("a</think>b</think>c<think>d", True, "a", "b</think>c<think>d"),  # one block per answer, as R1
    ("x < y and </thin is not a tag</think>ok", True, "x < y and </thin is not a tag", "ok"),
    ("<thinking is not a tag>", False, "", "<thinking is not a tag>"),
    # the prompt opened <think> and the model opens it again (R1's older template): no tag in reasoning
    ("<think>\nhmm\n</think>\n\n42", True, "hmm\n", "42"),
    ("\n<think>hmm", True, "hmm", ""),
    ("<thinking aloud", True, "<thinking aloud", ""),
    ("<thi", True, "<thi", ""),
    # only the newlines right after the tags are layout: the answer's own blank lines are kept
    ("hmm</think>\n\nline one\n\nline two\n", True, "hmm", "line one\n\nline two\n"),
]


@pytest.mark.parametrize(("text", "started", "reasoning", "content"), CASES)
def test_reasoning_split_any_chunking(text, started, reasoning, content):
    r, c, _ = _split(text, started)
    assert (r, c) == (reasoning, content)
    rng = random.Random(0)
    for _ in range(30):
        r2, c2, deltas = _split(text, started, _chunked(text, rng))
        assert (r2, c2) == (reasoning, content)
        assert not any("</think>" in d for _, d in deltas if "</think>" not in content)


def test_reasoning_split_holds_partial_tag():
    s = ReasoningSplitter(True)
    assert s.push("abc</th") == ("abc", "")  # "</th" might be the end tag: held back
    assert s.push("ink>\n\nok") == ("", "ok")


STOP_CASES = [
    ("Hello world. STOP here", ["STOP"], "Hello world. ", "STOP"),
    ("no stop at all", ["zzz"], "no stop at all", None),
    ("abcSTxSTOP", ["STOP", "xS"], "abcST", "xS"),  # the earliest match wins
    ("ends with a partial ST", ["STOP"], "ends with a partial ST", None),  # flushed at the end
    # a held prefix of one stop is not cut short by a shorter prefix of another ("wor" of both)
    ("Say: Hello world!", ["Hello world", "world"], "Say: ", "Hello world"),
    ("an empty stop string stops nothing", ["", "zzz"], "an empty stop string stops nothing", None),
    # a mismatch after "aabaaa" falls back to the border "aa", not to nothing: "aab" is held, then completes
    ("aabaaabaaaa", ["aabaaaa"], "aaba", "aabaaaa"),
]


@pytest.mark.parametrize(("text", "stops", "expected", "matched"), STOP_CASES)
def test_stop_strings_any_chunking(text, stops, expected, matched):
    rng = random.Random(1)
    for chunks in [[text], list(text)] + [_chunked(text, rng) for _ in range(30)]:
        m = StopStringMatcher(stops)
        out = [m.push(c) for c in chunks]
        out.append(m.flush())
        assert "".join(out) == expected
        assert m.matched == matched
        # no emitted prefix ever contains a stop string or goes past the final text
        assert expected.startswith("".join(out[:-1]))


def test_stop_matcher_withholds_possible_prefix():
    m = StopStringMatcher(["</answer>"])
    assert m.push("42</ans") == "42"
    assert m.push("wer>") == "" and m.stopped


def test_prometheus_exposition():
    m = ServerMetrics(lambda: {"num_running": 3, "cache_blocks_used": 5, "cache_blocks_total": 20})
    for v in (0.003, 0.5, 100.0):
        m.ttft.observe(v)
    m.requests.labels(route="/v1/models", status="200").inc()
    text = m.render()
    h = "nanoseek:time_to_first_token_seconds"
    assert f'{h}_bucket{{le="0.005"}} 1' in text and f'{h}_bucket{{le="+Inf"}} 3' in text
    assert f"{h}_count 3" in text
    assert 'nanoseek:requests_total{route="/v1/models",status="200"} 1' in text
    assert "nanoseek:num_requests_running 3" in text and "nanoseek:kv_cache_usage_perc 0.25" in text


def test_prometheus_gauges_read_their_own_engine_stats_and_zero_without_them():
    """Each gauge and engine counter shows its own engine statistic (vLLM's names), and 0 where the engine
    has none yet:
    no cache blocks, no drafts (acceptance None), an engine that reports nothing."""
    stats = {
        "num_running": 2,
        "num_waiting": 7,
        "cache_blocks_used": 3,
        "cache_blocks_total": 12,
        "cache_block_size": 4,
        "prefix_cache_queries": 40,
        "prompt_tokens_reused": 20,
        "prefix_cache_hit_rate": 0.125,
        "spec_acceptance_rate": 0.75,
        "preemptions": 4,
    }
    m = ServerMetrics(lambda: stats)
    lines = set(m.render().splitlines())
    for line in (
        "nanoseek:num_requests_running 2.0",
        "nanoseek:num_requests_waiting 7.0",
        "nanoseek:kv_cache_usage_perc 0.25",
        "nanoseek:prefix_cache_queries_total 160.0",
        "nanoseek:prefix_cache_hits_total 20.0",
        "nanoseek:prefix_cache_hit_rate 0.125",
        "nanoseek:spec_decode_acceptance_rate 0.75",
        "nanoseek:num_preemptions_total 4.0",
    ):
        assert line in lines, line
    for empty in ({}, {"cache_blocks_used": 0, "cache_blocks_total": 0, "spec_acceptance_rate": None}):
        lines = set(ServerMetrics(lambda e=empty: e).render().splitlines())
        for name in (
            "num_requests_waiting",
            "kv_cache_usage_perc",
            "spec_decode_acceptance_rate",
            "num_preemptions_total",
            "prefix_cache_hits_total",
        ):
            assert f"nanoseek:{name} 0.0" in lines, (empty, name)


def _tool_split(text: str, chunks: list[str], prefix: str = "") -> tuple[str, list[dict] | None, list[str]]:
    s = ToolCallSplitter(["get_weather"], prefix)
    deltas = [s.push(c) for c in chunks]
    rest, calls = s.flush()
    return "".join(deltas) + rest, calls, deltas


CALL = f'{TOOL_CALL_BEGIN}get_weather{TOOL_SEP}{{"city": "Paris"}}{TOOL_CALL_END}'


@pytest.mark.parametrize(
    "text, content, n_calls",
    [
        ("Sure." + TOOL_CALLS_BEGIN + CALL + CALL + TOOL_CALLS_END, "Sure.", 2),
        ("Sure." + TOOL_CALLS_BEGIN + "\n" + CALL + "\n" + CALL + "\n" + TOOL_CALLS_END, "Sure.", 2),
        ("no tools here, < and <｜ too", "no tools here, < and <｜ too", 0),
        # bad JSON, an unknown tool, an unclosed block: the text as the model wrote it
        ("x" + TOOL_CALLS_BEGIN + CALL.replace('"Paris"', "Paris") + TOOL_CALLS_END, None, 0),
        ("x" + TOOL_CALLS_BEGIN + CALL.replace("get_weather", "rm_rf") + TOOL_CALLS_END, None, 0),
        ("x" + TOOL_CALLS_BEGIN + CALL, None, 0),
    ],
)
def test_tool_call_split_any_chunking(text, content, n_calls):
    rng = random.Random(0)
    whole = _tool_split(text, [text])
    for _ in range(20):
        assert _tool_split(text, _chunked(text, rng))[:2] == whole[:2]
    got, calls, deltas = whole
    assert got == (text if content is None else content)
    assert len(calls or []) == n_calls
    if n_calls:  # nothing of the call markup was ever streamed as content
        chunked = _tool_split(text, _chunked(text, rng))[2]
        assert TOOL_CALLS_BEGIN[:2] not in "".join(chunked)


def test_a_call_whose_arguments_hold_nan_is_text():
    """Python's json reads NaN and Infinity, JSON has neither: such arguments came back as a call that a
    client's JSON.parse (or any strict parser) then failed on; they are the model's text, as bad JSON is."""
    for value in ("NaN", "Infinity", "-Infinity"):
        text = "x" + TOOL_CALLS_BEGIN + CALL.replace('"Paris"', value) + TOOL_CALLS_END
        assert _tool_split(text, [text])[:2] == (text, None), value


def test_a_call_whose_arguments_nest_past_the_json_decoders_depth_is_text():
    """A model looping on "[" inside a call's arguments nests deeper than Python's JSON decoder goes: its
    RecursionError was a 500 for the whole reply (and a stream cut off mid-way), not the model's text."""
    text = "x" + TOOL_CALLS_BEGIN + CALL.replace('"Paris"', "[" * 5000 + "]" * 5000) + TOOL_CALLS_END
    assert _tool_split(text, [text])[:2] == (text, None)


def test_a_prefilled_call_that_does_not_parse_is_the_model_text_alone():
    # the forced call's opening is the prompt's text, not the answer's: never handed back as content
    prefix = TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "get_weather" + TOOL_SEP
    text, calls, _ = _tool_split("", ["{city: Lyon}", TOOL_CALL_END + TOOL_CALLS_END], prefix)
    assert (text, calls) == ("{city: Lyon}" + TOOL_CALL_END + TOOL_CALLS_END, None)


def test_tool_call_split_with_prefilled_call():
    prefix = TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "get_weather" + TOOL_SEP
    text, calls, deltas = _tool_split("", ['{"city": ', '"Lyon"}', TOOL_CALL_END + TOOL_CALLS_END], prefix)
    assert (text, deltas) == ("", ["", "", ""])
    assert calls == [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}
    ]


def test_deepseek_v3_and_r1_calls_split_any_chunking():
    """DeepSeek-V3's and R1's templates (R1-Distill's too) write a call as `function<sep>NAME` and its
    arguments fenced as ```json, one call a line: read as V3.1's markup, every call such a checkpoint made
    came back as text, finish_reason "stop"."""

    def v3(city: str) -> str:
        return f'{TOOL_CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{"city": "{city}"}}\n```{TOOL_CALL_END}'

    text = "Sure." + TOOL_CALLS_BEGIN + v3("Paris") + "\n" + v3("東京") + TOOL_CALLS_END
    rng = random.Random(0)
    for chunks in [[text]] + [_chunked(text, rng) for _ in range(10)]:
        content, calls, _ = _tool_split(text, chunks)
        assert content == "Sure."
        assert calls == [
            {"type": "function", "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}
            for city in ("Paris", "東京")
        ]
    # its bad JSON or an unknown name is still the model's text
    for bad in (v3("Paris").replace('"Paris"', "Paris"), v3("Paris").replace("get_weather", "rm_rf")):
        bad = "x" + TOOL_CALLS_BEGIN + bad + TOOL_CALLS_END
        assert _tool_split(bad, [bad])[:2] == (bad, None)


def _calls_per_push(stop_len: int, pushes: int = 20) -> int:
    """Function calls (Python and builtin) the matcher makes over `pushes` tokens, while it holds back almost a
    whole stop string: 15 stops that share a long run with the text and one that the text begins."""
    stops = [("a" * (5 + j) + "c" + "a" * stop_len)[: stop_len - 1] + "c" for j in range(15)]
    stops.append("a" * (stop_len - 1) + "Z")
    m = StopStringMatcher(stops)
    assert m.push("a" * (stop_len - 2)) == ""  # a prefix of the last stop: all held
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        for _ in range(pushes):
            m.push("a")
    finally:
        sys.setprofile(None)
    assert not m.stopped
    return calls


def test_stop_strings_cost_per_token_does_not_grow_with_their_length():
    """16 stop strings of 1,000 characters (what a request may send) were searched afresh for a held prefix on
    every token: work that grows with their length, milliseconds a token for each choice, on the event loop
    every request shares. Counted, not timed: the calls per token are the same for stops 10 times longer."""
    assert _calls_per_push(1000) <= 2 * _calls_per_push(100)
