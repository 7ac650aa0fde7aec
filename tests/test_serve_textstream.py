"""The server's text state machines, without a server: stop strings and the reasoning split must give
the same result however the text is chunked (streaming vs one piece), and never leak a partial tag or
a partial stop string."""

from __future__ import annotations

import json
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.serve.metrics import ServerMetrics
from nanoseek.serve.textstream import ReasoningSplitter, StopStringMatcher, ToolCallSplitter
from nanoseek.tokenizer import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
    parse_tool_calls,
    render_tool_calls,
)


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
    # the stop that completes first ends the text, in one delta too: "b" (ends at 3), not "abb" (starts at 1),
    # which a token "aab" never lets complete
    ("aabb", ["b", "abb"], "aa", "b"),
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


# ------------------------------------------------------------------ properties: any text, any chunking
@st.composite
def _cut(draw, text_strategy):
    """(text, its chunks): cut anywhere, empty chunks included."""
    text = draw(text_strategy)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _words(*pieces: str, max_size: int = 16) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(pieces), max_size=max_size).map("".join)


def _first_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Brute force: the text ends where a stop first completes (the longest of those ending there)."""
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return text, None
    _, start, stop = min(hits)
    return text[:start], stop


def _slice(text: str) -> st.SearchStrategy[str]:
    return st.tuples(st.integers(0, len(text)), st.integers(1, 5)).map(lambda ik: text[ik[0] : ik[0] + ik[1]])


@given(st.data())
@settings(max_examples=60)
def test_stop_matcher_cuts_any_chunking_where_a_stop_first_completes(data):
    """Stops that are prefixes, suffixes or inner parts of one another (and empty ones), multi-byte text: the
    joined output is the text up to where the first stop completes, and before that each push emits all
    but the longest tail that could still begin a stop; after it, nothing."""
    # a stop in the text (most stops would never occur), a piece of it, others
    stop = data.draw(_words("a", "b", "é", max_size=5))
    stops = [
        stop,
        data.draw(_slice(stop)),
        *data.draw(st.lists(_words("a", "b", "東", max_size=4), max_size=2)),
    ]
    text, chunks = data.draw(_cut(st.tuples(_words("a", "b", "東"), _words("a", "b", "é")).map(stop.join)))
    expected, matched = _first_stop(text, stops)
    m, out, seen = StopStringMatcher(stops), "", ""
    for chunk in chunks:
        out += m.push(chunk)
        seen += chunk
        assert expected.startswith(out)
        if not m.stopped:
            held = max((k for s in stops for k in range(len(s)) if seen.endswith(s[:k])), default=0)
            assert out == seen[: len(seen) - held]
    out += m.flush()
    assert (out, m.matched, m.stopped) == (expected, matched, matched is not None)
    if m.stopped:
        assert m.push(text) == "" and m.flush() == ""  # nothing after a stop


def _reasoning_reference(text: str, started: bool) -> tuple[str, str]:
    """The whole text's (reasoning, content): a leading `<think>` (after whitespace) opens the block, or the
    prompt did; the first `</think>` closes it; the newlines right after either tag are layout."""
    head = text.lstrip()
    if head.startswith("<think>"):
        body = head[len("<think>") :]
    elif started:
        body = text
    else:
        return "", text
    reasoning, end, content = body.partition("</think>")
    return reasoning.lstrip("\n"), content.lstrip("\n") if end else ""


@given(
    _cut(_words("a", " ", "\n", "\n\n", "<", "/", "東", "<think>", "</think>", "<thi", "</th")), st.booleans()
)
@settings(max_examples=200)
def test_reasoning_split_of_any_chunking_is_the_whole_texts(cut, started):
    text, chunks = cut
    s = ReasoningSplitter(started)
    deltas = [s.push(c) for c in chunks] + [s.flush()]
    joined = ("".join(r for r, _ in deltas), "".join(c for _, c in deltas))
    assert joined == _reasoning_reference(text, started)
    assert s.flush() == ("", "")  # nothing held back past the end


_NAMES = ["get_weather", "other"]


def _call(name: str, args: str, fenced: bool = False) -> str:
    if fenced:  # DeepSeek-V3's and R1's layout
        return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{args}\n```{TOOL_CALL_END}"
    return f"{TOOL_CALL_BEGIN}{name}{TOOL_SEP}{args}{TOOL_CALL_END}"


# DeepSeek's call markup has no escape: arguments that spell a marker (only with ensure_ascii=False) cannot be
# told from the markup, in DeepSeek's own parsers too; a model writes those markers as their own tokens
_ARG_TEXT = st.text(st.characters(blacklist_characters="｜"), max_size=5)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _ARG_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_ARG_TEXT, inner, max_size=3),
    max_leaves=8,
)


_MARKUP = [TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP]
_TOOL_TEXT = st.one_of(
    # markup, halves of it, names, good and bad arguments, in any order
    _words(
        *_MARKUP,
        *(m[:k] for m in _MARKUP for k in (1, 5)),
        *_NAMES,
        "function",
        "```json\n",
        "\n```",
        '{"city": "Paris"}',
        '{"a": NaN}',
        # the rest of a forced call
        '{"city": "Paris"}' + TOOL_CALL_END + TOOL_CALLS_END,
        'get_weather\n```json\n{"city": "Paris"}\n```' + TOOL_CALL_END + TOOL_CALLS_END,
        "[1]",
        "{",
        "\n",
        "x",
        "東",
        max_size=14,
    ),
    # a block of calls, well-formed or not, after some answer text
    st.builds(
        lambda head, calls, sep, tail: (
            head + TOOL_CALLS_BEGIN + sep.join(_call(*c) for c in calls) + TOOL_CALLS_END + tail
        ),
        st.text(max_size=4),
        st.lists(
            st.tuples(
                st.sampled_from([*_NAMES, *_NAMES, "rm_rf"]),
                st.one_of(
                    st.just('{"city": "東京"}'),
                    st.dictionaries(st.text(max_size=3), st.integers() | st.floats(), max_size=2).map(
                        json.dumps
                    ),
                    st.text(max_size=6),
                ),
                st.booleans(),
            ),
            min_size=1,
            max_size=3,
        ),
        st.sampled_from(["", "\n"]),
        st.sampled_from(["", "", "\n", "x"]),
    ),
    # what `render_tool_calls` writes for an assistant's calls, in V3.1's or V3's fenced layout, any JSON in
    # their arguments (that render_tool_calls and parse_tool_calls read each other is tests/test_tokenizer.py's)
    st.builds(
        lambda head, calls, fenced: head + render_tool_calls(calls, fenced=fenced),
        st.text(max_size=4).filter(lambda t: TOOL_CALLS_BEGIN not in t),
        st.lists(
            st.builds(
                lambda name, args, ascii_only: {
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=ascii_only)},
                },
                st.sampled_from(_NAMES),
                st.dictionaries(_ARG_TEXT, _JSON, max_size=3),
                st.booleans(),
            ),
            min_size=1,
            max_size=3,
        ),
        st.booleans(),
    ),
)
# a forced call's opening (`tool_choice`) written after the prompt: "required" or named, in V3.1's and V3's layouts
_PREFILLS = [
    "",
    TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN,
    TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "get_weather" + TOOL_SEP,
    TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP,
    TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "get_weather\n```json\n",
]


@given(_cut(_TOOL_TEXT), st.just("") | st.sampled_from(_PREFILLS))
@settings(max_examples=80)
def test_tool_call_split_of_any_chunking_is_parse_tool_calls_of_the_whole(cut, prefix):
    """Streamed, the calls are what `parse_tool_calls` reads in the whole text (after a forced call's prefill),
    the content is the text before the block; a block that does not parse (bad JSON, NaN, an unknown name,
    text after it) is the model's text as written, never an error."""
    text, chunks = cut
    s = ToolCallSplitter(_NAMES, prefix)
    deltas = [s.push(c) for c in chunks]
    rest, calls = s.flush()
    parsed = parse_tool_calls(prefix + text, _NAMES)
    if parsed is None:
        assert ("".join(deltas) + rest, calls) == (text, None)
    else:
        assert ("".join(deltas) + rest, calls) == (parsed[0].removeprefix(prefix), parsed[1])
        assert all(c["function"]["name"] in _NAMES for c in calls)
        for c in calls:  # strict JSON objects: what a client's JSON.parse reads
            assert isinstance(json.loads(c["function"]["arguments"], parse_constant=_refuse), dict)


def _refuse(constant: str) -> None:
    raise AssertionError(f"{constant} in a call's arguments")
