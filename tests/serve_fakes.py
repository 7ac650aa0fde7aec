"""Test doubles for the server tests: a tiny real tokenizer and a scripted engine with the Engine API.

`ScriptedEngine` follows nanoseek.engine.Engine's contract (add_request / step / abort / has_unfinished /
num_running / num_waiting / stats, one token per request per step) but emits text chosen by the test, so
the reasoning split and stop strings can be checked against R1-shaped output a random-weight model would
never produce. Protocol tests against the real engine live in test_serve.py.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nanoseek.engine.sampling import SamplingParams, TokenLogprob
from nanoseek.tokenizer import Tokenizer, train_tokenizer

CORPUS = [
    "The answer is 4. Let me think about this problem step by step.",
    "First, 2 + 2 = 4. So the result is four. Hello world!",
    "Les maths sont amusantes. 数学は楽しい。 数学很有趣。",
    "We check the sum again: one plus one is two, two plus two is four.",
]


# A chat template shaped like DeepSeek-R1's (R1-Distill's, DeepSeek-V3's): its generation prompt opens the think
# block, it writes an assistant's calls as `function<｜tool▁sep｜>NAME`, then the arguments fenced as ```json, one
# call a line, and, as theirs, only for a turn whose content is null (other turns are their text alone)
V3_TOOL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' and m['content'] is none %}{{ '<｜Assistant｜><｜tool▁calls▁begin｜>' }}"
    "{% for c in m['tool_calls'] %}{{ '\\n' if not loop.first }}"
    "{{ '<｜tool▁call▁begin｜>' + c['type'] + '<｜tool▁sep｜>' + c['function']['name'] + '\\n```json\\n' + "
    "c['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}{% endfor %}"
    "{{ '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% elif m['role'] == 'tool' %}{{ '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def tiny_tokenizer() -> Tokenizer:
    return train_tokenizer(CORPUS * 20, vocab_size=400)


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    params: SamplingParams
    script: list[int]
    out: list[int] = field(default_factory=list)
    first: bool = True


class ScriptedEngine:
    """Engine double: `reply(prompt_ids, params) -> token ids` decides the output; EOS is appended."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        reply: Callable[[list[int], SamplingParams], list[int]] | None = None,
        max_seq_len: int = 256,
        max_batch_size: int = 32,
        step_delay: float = 0.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.reply = reply or self._default_reply
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.step_delay = step_delay
        self._reqs: dict[str, _Req] = {}
        self._ids = itertools.count()
        self.aborted: list[str] = []
        self.added: list[tuple[list[int], SamplingParams]] = []
        self.tokens_generated = 0
        # tokens a step gives a request after n of its tokens: step_sizes[n % len] (an accepted speculative
        # draft is several tokens in one event); a stop or max_new_tokens ends the event there
        self.step_sizes: Sequence[int] = (1,)

    def _default_reply(self, prompt: list[int], params: SamplingParams) -> list[int]:
        # Deterministic "gibberish" from the prompt (greedy) or the seed (sampling), like a random model.
        salt = 0 if params.temperature == 0 else (params.seed if params.seed is not None else 12345)
        base = sum(prompt) * 31 + salt
        return [(base + 17 * i) % 200 + 100 for i in range(40)]

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) > self.max_seq_len:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens is longer than max_seq_len {self.max_seq_len}"
            )
        rid = request_id or f"fake-{next(self._ids)}"
        self.added.append((list(prompt_ids), params))
        self._reqs[rid] = _Req(rid, list(prompt_ids), params, list(self.reply(list(prompt_ids), params)))
        return rid

    def abort(self, request_id: str) -> None:
        if self._reqs.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._reqs)

    @property
    def num_running(self) -> int:
        return min(len(self._reqs), self.max_batch_size)

    @property
    def num_waiting(self) -> int:
        return max(0, len(self._reqs) - self.max_batch_size)

    def stats(self) -> dict:
        return {
            "tokens_generated": self.tokens_generated,
            "cache_blocks_used": len(self._reqs),
            "cache_blocks_total": 64,
        }

    def step(self) -> list:
        if self.step_delay:
            time.sleep(self.step_delay)
        events = []
        for r in list(self._reqs.values())[: self.max_batch_size]:
            new, lps, finished, reason = [], [], False, None
            for _ in range(self.step_sizes[len(r.out) % len(self.step_sizes)]):
                i = len(r.out)
                tok = r.script[i] if i < len(r.script) else self.tokenizer.eos_token_id
                r.out.append(tok)
                new.append(tok)
                self.tokens_generated += 1
                if r.params.logprobs is not None:
                    top = [(tok, -0.25), *((t, -2.0 - j) for j, t in enumerate((tok + 1, tok + 2, tok + 3)))]
                    lps.append(TokenLogprob(tok, -0.25, top[: r.params.logprobs]))
                if tok in r.params.stop_token_ids:
                    finished, reason = True, "stop"
                elif len(r.out) >= r.params.max_new_tokens:
                    finished, reason = True, "length"
                if finished:
                    break
            events.append(
                _Event(r.rid, new, lps if r.params.logprobs is not None else None, finished, reason, None)
            )
            if finished:
                del self._reqs[r.rid]
        return events


@dataclass
class _Event:
    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    prompt_logprobs: list[float | None] | None


class LiveServer:
    """A real uvicorn server for `app` on a free loopback port, in a background thread."""

    def __init__(self, app) -> None:  # noqa: ANN001
        import socket

        import uvicorn

        # the socket stays bound and is handed to uvicorn: a port only looked up (bound, closed, bound
        # again by uvicorn) could be taken in between by a test running beside this one
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = None

    def __enter__(self) -> LiveServer:
        import threading

        self._thread = threading.Thread(target=self.server.run, args=([self._sock],), daemon=True)
        self._thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.server.should_exit = True
        self._thread.join(10)
        self._sock.close()
