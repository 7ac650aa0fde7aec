"""Text-level streaming above the engine's token ids: detokenizing, stop strings, the reasoning split.

Each piece is a small pure state machine fed one delta at a time, so streaming and non-streaming
responses share one code path and a test can drive them without a model.

(Token ids -> text deltas is the tokenizer's `IncrementalDecoder`, which never splits a UTF-8 character.)
- `StopStringMatcher`: OpenAI `stop` strings work on text, not tokens. Text that could still be the start
  of a stop string is withheld until the next delta settles it, so a client never sees a partial stop.
- `ReasoningSplitter`: DeepSeek's API split of R1 output into `reasoning_content` (inside
  `<think>`…`</think>`) and `content`. The R1 template ends the prompt with "<think>\n", so the model
  usually never emits the opening tag: the splitter can start inside the think block.
- `ToolCallSplitter`: the answer's text passes through until DeepSeek's `<｜tool▁calls▁begin｜>`; the call
  block is held and parsed whole when the answer ends (`nanoseek.tokenizer.parse_tool_calls`). A block
  that does not parse is handed back as plain text, so bad JSON from the model is an answer, not an error.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from nanoseek.tokenizer import THINK_END, THINK_START, TOOL_CALLS_BEGIN, parse_tool_calls


def _partial_suffix_len(text: str, needles: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `needles`: O(len(needle)^2)
    per call, for the few-character tags; a client's stop strings use `StopStringMatcher`'s states."""
    best = 0
    for needle in needles:
        for k in range(min(len(needle) - 1, len(text)), best, -1):
            if text.endswith(needle[:k]):
                best = k
                break
    return best


def _failure(needle: str) -> list[int]:
    """KMP's failure function: fail[i] is the longest proper border of needle[: i + 1]."""
    fail, k = [0] * len(needle), 0
    for i in range(1, len(needle)):
        while k and needle[i] != needle[k]:
            k = fail[k - 1]
        if needle[i] == needle[k]:
            k += 1
        fail[i] = k
    return fail


class StopStringMatcher:
    """Find the first stop string in streamed text; emit only text that cannot be part of one.

    What to hold back (the longest suffix that begins a stop string) is tracked as each stop's KMP state,
    advanced over each delta only: searched afresh over the held text, the work per token grew as the stops'
    length squared (16 stops of 1,000 characters), for every choice, on the event loop all requests share."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # per stop: how much of it the text so far ends with
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None

    def fresh(self) -> StopStringMatcher:
        """A matcher of the same stops that has seen no text, sharing the failure tables: built for each of a
        request's n choices, 16 stops of 100k characters held the event loop 64 times as long at n = 64."""
        new = copy.copy(self)
        new._state, new._pending, new.stopped, new.matched = [0] * len(self.stops), "", False, None
        return new

    def _advance(self, delta: str) -> int:
        """Feed `delta` to each stop's state; the longest suffix of all text so far that is a proper prefix of
        a stop. (`push` finds a whole stop first, so no state reaches a stop's length.)"""
        hold = 0
        for j, (stop, fail) in enumerate(zip(self.stops, self._fail, strict=True)):
            k = self._state[j]
            for ch in delta:
                while k and ch != stop[k]:
                    k = fail[k - 1]
                if ch == stop[k]:
                    k += 1
            self._state[j] = k
            hold = max(hold, k)
        return hold

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        self._pending += delta
        # The stop that completes first ends the text (the longest, where several end together): it is where
        # generation stops, however the text was cut into deltas. The earliest start instead stopped "aabb"
        # (stops "b", "abb") at "aa" when "aab" came first and at "a" when "aabb" did.
        hits = [(i + len(s), i, s) for s in self.stops if (i := self._pending.find(s)) >= 0]
        if hits:
            _, i, s = min(hits)
            self.stopped, self.matched = True, s
            out, self._pending = self._pending[:i], ""
            return out
        hold = self._advance(delta)
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


class ReasoningSplitter:
    """Split streamed text into (reasoning, content) deltas at `<think>` / `</think>`.

    `started_in_think=True` when the prompt already opened the block (the R1 generation prompt); a model
    that opens it again all the same (trained on R1's older template, which left `<think>` to the model)
    has that leading tag dropped, as vLLM's R1 parser does. One think block per answer, as R1 emits: after
    `</think>` everything is content, tags included. The newline after `<think>` and the blank line after
    `</think>` are layout, not text, and are dropped.
    """

    def __init__(self, started_in_think: bool, think_start: str = THINK_START, think_end: str = THINK_END):
        self.start_tag, self.end_tag = think_start, think_end
        self.started_in_think = started_in_think
        self.state = "before"  # before -> think -> answer
        self._pending = ""
        self._strip_newlines = started_in_think

    def push(self, delta: str) -> tuple[str, str]:
        self._pending += delta
        reasoning: list[str] = []
        content: list[str] = []
        while self._pending:
            if self.state == "answer":
                content.append(self._take_all())
                break
            if self.state == "before":
                # Only a leading <think> opens a reasoning block; anything else is a plain answer (or,
                # when the prompt opened the block, reasoning).
                head = self._pending.lstrip()
                if head.startswith(self.start_tag):
                    self._pending = head[len(self.start_tag) :]
                    self.state, self._strip_newlines = "think", True
                    continue
                if self.start_tag.startswith(head):
                    break  # only whitespace or a prefix of "<think>" so far: wait
                self.state = self._untagged_state
                continue
            i = self._pending.find(self.end_tag)
            if i >= 0:
                before, self._pending = self._pending[:i], self._pending[i + len(self.end_tag) :]
                self._emit(before, reasoning)
                self.state, self._strip_newlines = "answer", True
                continue
            hold = _partial_suffix_len(self._pending, [self.end_tag])
            text = self._pending[: len(self._pending) - hold]
            self._pending = self._pending[len(text) :]
            self._emit(text, reasoning)
            break
        return "".join(reasoning), "".join(content)

    def _take_all(self) -> str:
        text, self._pending = self._pending, ""
        if self._strip_newlines:
            stripped = text.lstrip("\n")
            if stripped:
                self._strip_newlines = False
            return stripped
        return text

    def _emit(self, text: str, into: list[str]) -> None:
        if self._strip_newlines:
            text = text.lstrip("\n")
            if text:
                self._strip_newlines = False
        if text:
            into.append(text)

    @property
    def _untagged_state(self) -> str:
        """Where output that does not open with `<think>` belongs."""
        return "think" if self.started_in_think else "answer"

    def flush(self) -> tuple[str, str]:
        text, self._pending = self._pending, ""
        if not text:
            return "", ""
        if self.state == "before":
            self.state = self._untagged_state
        if self.state == "think":
            reasoning: list[str] = []
            self._emit(text, reasoning)
            return "".join(reasoning), ""
        return "", text.lstrip("\n") if self._strip_newlines else text


class ToolCallSplitter:
    """Split an answer's streamed text into content deltas and, at the end, the parsed tool calls.

    `prefix` is tool-call text the prompt already holds (a forced `tool_choice`): the block starts there.
    `names` are the tools offered; a call of any other name makes the block plain text.
    """

    def __init__(self, names: Sequence[str], prefix: str = "", begin: str = TOOL_CALLS_BEGIN) -> None:
        self.names, self.begin, self.prefix = list(names), begin, prefix
        self._pending = ""  # content that could still be the start of `begin`
        self._block: str | None = prefix or None  # the held call block, once it has begun

    def push(self, delta: str) -> str:
        if self._block is not None:
            self._block += delta
            return ""
        self._pending += delta
        i = self._pending.find(self.begin)
        if i >= 0:
            out, self._block, self._pending = self._pending[:i], self._pending[i:], ""
            return out
        hold = _partial_suffix_len(self._pending, [self.begin])
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> tuple[str, list[dict] | None]:
        """The content still held and the calls ([{"type": "function", "function": {...}}]) or None."""
        block, self._block = self._block, None
        pending, self._pending = self._pending, ""
        if block is None:
            return pending, None
        parsed = parse_tool_calls(block, self.names)
        if (
            parsed is None
        ):  # not a well-formed call: the model's text as it wrote it (not the prompt's prefix)
            return block.removeprefix(self.prefix), None
        return parsed[0], parsed[1]
