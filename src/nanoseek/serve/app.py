"""The OpenAI-compatible HTTP server: FastAPI routes over one shared engine (continuous batching).

Notable:
- `/v1/chat/completions` renders messages with the checkpoint's R1 chat template and returns DeepSeek's
  split: `reasoning_content` (inside <think>…</think>) apart from `content`, also when the prompt already
  opened <think>. `reasoning_content` sent back in messages is dropped, as R1's template requires.
  `chat_template_kwargs: {"thinking": false}` (or vLLM's `enable_thinking`) is DeepSeek-V3.1's
  non-thinking mode: the prompt closes the think block and everything generated is `content`; so is
  OpenAI's `reasoning_effort: "none"`.
- Function calling: `tools` go into the prompt in DeepSeek-V3.1's format; generated calls (V3.1's, or V3's
  and R1's `function<｜tool▁sep｜>NAME` with ```json-fenced arguments) come back as
  OpenAI `tool_calls` (streamed as `delta.tool_calls`), finish_reason "tool_calls" ("stop" for a call the
  request named in `tool_choice`, as OpenAI's). A call block that
  does not parse is returned as plain content with finish_reason "stop". `tool_choice` "required" or a
  named function is enforced by writing the start of the call into the prompt (prefill).
  `parallel_tool_calls: false` returns only the first call the model wrote, as vLLM does.
- `/v1/completions` takes strings or token ids (single or batched), with `echo` and prompt log-probs:
  what lm-evaluation-harness's `local-completions` sends for loglikelihood works unchanged.
- Stop strings are matched on text here, above the token layer; text that might begin a stop string is
  held back until disambiguated, then the engine request is aborted.
- A client that disconnects (stream or not) has its engine requests aborted at once, and its prompt scoring
  (echo + logprobs) dropped.
- `/tokenize` with `messages` renders them as the chat request would (`tools`, `chat_template_kwargs`),
  so its count is the chat's `prompt_tokens`.
- Errors are OpenAI's shape and statuses: 400 naming the parameter (also for malformed JSON),
  400 `context_length_exceeded`, 401, 404 `model_not_found`, 413 (--max-body-mb), 415 for a compressed
  body, 429 with Retry-After (a request larger than the server ever holds is a 400 naming `n`: no retry
  could succeed); a client that hung up is logged as 499. Every GET route answers HEAD.
- Auth (`api_key`) and request metrics are plain ASGI middleware, so streaming and disconnect
  detection are untouched.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nanoseek.serve.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestGroup
from nanoseek.serve.metrics import ServerMetrics
from nanoseek.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    validation_error,
)
from nanoseek.serve.textstream import ReasoningSplitter, StopStringMatcher, ToolCallSplitter
from nanoseek.tokenizer import (
    THINK_END,
    THINK_START,
    TOOL_CALL_BEGIN,
    TOOL_CALLS_BEGIN,
    TOOL_SEP,
    openai_message,
    writes_fenced_tool_calls,
)

STATIC_DIR = Path(__file__).parent / "static"
OPEN_PATHS = ("/health", "/", "/favicon.ico")  # the page's static files hold no model data
# The page and its scripts are revalidated on each load (the scripts: an ETag, a 304): without Cache-Control a
# browser caches them by a guess from Last-Modified (RFC 9111 4.2.2), so an upgraded or edited page ran
# stale, or as a new index.html over an old chat.js.
# The page's Content-Security-Policy (sent with its scripts too, so /static/index.html has it): it runs only its
# own scripts and talks to this server alone, so markup that ever got past the markdown renderer (which escapes
# model output first) could still neither run script (an inline handler, <script>) nor send what the page
# holds (the API key, the conversation) elsewhere by an image or a fetch. Inline styles stay: the page's
# <style> and the renderer's table alignment are inline.
PAGE_CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; form-action 'self'"
PAGE_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP}
# A GET route answers HEAD too, as HTTP requires of it (RFC 9110 9.1) and the page's static files already do:
# uptime monitors, load balancers and `curl -I` probe /health with HEAD, and FastAPI's GET route alone
# answered them 405.
GET = ["GET", "HEAD"]
# How often a request whose answer is not being written (non-streaming, prompt scoring) asks whether its
# client is still there: a hang-up frees its engine work within this long.
HANGUP_POLL_S = 0.5
THINKING_KWARGS = ("thinking", "enable_thinking")  # the chat template's options (Server.thinking)
log = logging.getLogger("nanoseek.serve")


class _PageFiles(StaticFiles):
    """The page's scripts and styles, with `PAGE_HEADERS`."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    "/health",
    "/metrics",
    "/",
)


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_pending: int = 256  # engine requests in flight before 429
    max_context: int | None = None  # default: engine.max_seq_len or the model's max_position_embeddings
    retry_after: int = 1  # seconds, sent with 429
    # Sampling defaults for fields a request leaves out (from the checkpoint's generation_config.json,
    # e.g. R1's temperature 0.6 / top_p 0.95); otherwise OpenAI's defaults (temperature 1, top_p 1).
    # Its max_new_tokens is max_tokens where a request leaves that out (otherwise the context's room).
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    # Largest request body read (413 above it): the body is parsed and tokenized whole, so without a bound one
    # request holds gigabytes and minutes of CPU.
    max_body_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        # a hand-built bad default (a float max_new_tokens) failed every request that left the field out
        from nanoseek.engine.sampling import check_sampling_defaults

        check_sampling_defaults(self.sampling_defaults, "ServeConfig.sampling_defaults")


# ------------------------------------------------------------------ helpers
async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 (before it is all read) once it is longer than `limit` bytes."""
    too_big = APIError(
        f"The request body is larger than this server accepts ({limit} bytes).",
        status=413,
        code="request_too_large",
    )
    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding not in ("", "identity"):  # read as JSON, gzip's bytes were "not valid UTF-8" (RFC 9110 15.5.16)
        raise APIError(
            f"Content-Encoding {coding!r} is not supported: send the body uncompressed.",
            status=415,
            code="unsupported_media_type",
            headers={"Accept-Encoding": "identity"},
        )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:  # hung up mid-upload: a 499 like any hang-up, not a 500 and a traceback
        raise ClientDisconnected from None
    return b"".join(chunks)


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    raw = await _read_body(request, request.app.state.server.config.max_body_bytes)
    try:
        data = json.loads(raw or b"")
    # ValueError besides the decode errors (both are ValueErrors): an integer of over 4300 digits, past
    # Python's int-from-text limit, was a 500
    except ValueError as e:
        raise APIError(
            f"We could not parse the JSON body of your request ({e}). The body must be valid JSON.",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise APIError("The JSON body of your request is nested too deeply.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.", code="invalid_json")
    try:  # JSON lets a string escape half of a UTF-16 pair ("\ud83d"); no text can hold it
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise APIError(
            "The request body holds an unpaired UTF-16 surrogate escape (such as \\ud83d without its pair): "
            "send each character whole.",
            code="invalid_json",
        ) from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    except RecursionError:
        raise APIError("The JSON body of your request is nested too deeply.", code="invalid_json") from None


def _token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The exact bytes of one token: a byte-level token can hold part of a UTF-8 character."""
    if getattr(tokenizer, "is_byte_level", False):
        table = tokenizer.token_bytes()
        if 0 <= token_id < len(table):
            return table[token_id]
    return tokenizer.decode([token_id]).encode()


def _token_str(tokenizer: Any, token_id: int) -> str:
    return _token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


@dataclass
class _Choice:
    """Text state of one generated sequence: detokenizer -> stop strings -> (chat) reasoning split ->
    (chat with tools) tool-call split."""

    detok: Any  # nanoseek.tokenizer.IncrementalDecoder: push(ids) -> str, flush() -> str
    stops: StopStringMatcher
    splitter: ReasoningSplitter | None  # None: no reasoning split, all text is content
    tools: ToolCallSplitter | None = None
    tool_calls: list[dict] | None = None  # OpenAI's shape, with ids, once parsed
    parallel_calls: bool = True  # False (`parallel_tool_calls: false`): only the first call is returned
    # OpenAI ends a call the request named (`tool_choice: {"type": "function", ...}`) with "stop", one the
    # model chose ("auto", "required") with "tool_calls"; clients that check it expect that split
    call_finish: str = "tool_calls"
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    # where each token starts in the decoded text (text_offset of its logprobs, the think block's end)
    starts: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    refused: bool = False  # the engine refused its request (the client got a 400): nothing to count
    text: str = ""
    reasoning: str = ""
    content: str = ""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, ev: Any) -> tuple[str, str, str]:
        """One engine event -> (text, reasoning, content) deltas; sets finish_reason when done.

        Token by token: an event may carry several (an accepted speculative draft), and the tokens after
        the one that completes a stop string are neither counted in usage nor given logprobs. The token that
        ended the request (EOS, a stop id: the engine's "stop") is counted but not shown, as vLLM and
        `nanoseek chat` leave it out: a stop id that is no special token (`<｜User｜>`) would print."""
        text = ""
        ended_by = len(ev.new_token_ids) - 1 if ev.finished and ev.finish_reason == "stop" else -1
        for i, token in enumerate(ev.new_token_ids):
            self.token_ids.append(token)
            self.starts.append(self.detok.chars)
            if ev.logprobs:
                self.logprobs.append(ev.logprobs[i])
            text += self.stops.push(self.detok.push([] if i == ended_by else [token]))
            if self.stops.stopped:
                self.finish_reason = "stop"
                return self._split(text)
        if ev.finished:  # a reply cut inside a character ends before it (as vLLM's), not with U+FFFD
            text += self.stops.push(self.detok.flush(drop_partial=True))
            text += self.stops.flush()
            self.finish_reason = "stop" if self.stops.stopped else (ev.finish_reason or "stop")
        return self._split(text)

    @property
    def reasoning_tokens(self) -> int:
        """Tokens of the think block, its tags included (DeepSeek's `completion_tokens_details`); all of
        them when the answer ended inside it."""
        if self.splitter is None:
            return 0
        raw, tag = self.detok.text, self.splitter.start_tag
        if self.splitter.started_in_think:
            opened = 0
        else:
            opened = raw.find(tag) if raw.lstrip().startswith(tag) else -1
            if opened < 0:
                return 0
        close = raw.find(self.splitter.end_tag, opened)
        if close < 0:  # also those that print nothing: the EOS, a character the cut left unfinished
            return len(self.token_ids)
        end = close + len(self.splitter.end_tag)
        return sum(1 for s in self.starts if s < end)

    def _split(self, text: str) -> tuple[str, str, str]:
        self.text += text
        if self.splitter is None:
            r, c = "", text
        else:
            r, c = self.splitter.push(text)
            if self.done:
                r2, c2 = self.splitter.flush()
                r, c = r + r2, c + c2
        if self.tools is not None:
            c = self.tools.push(c)
            if self.done:
                c2, calls = self.tools.flush()
                c += c2
                if calls:
                    calls = calls if self.parallel_calls else calls[:1]
                    self.tool_calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", **call} for call in calls]
                    self.finish_reason = self.call_finish
        self.reasoning += r
        self.content += c
        return text, r, c


class ClientDisconnected(Exception):
    """The client hung up before its (non-streaming) answer was ready, or while sending its body; its
    requests are aborted."""


class Server:
    """Routes and state; `create_app` wires it into FastAPI."""

    def __init__(self, engine: Any, tokenizer: Any, config: ServeConfig, model: Any = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = ServerMetrics(lambda: self.engine.stats())
        self.engine = AsyncEngine(engine, model=model, metrics=self.metrics, max_pending=config.max_pending)
        mcfg = getattr(model if model is not None else getattr(engine, "model", None), "config", None)
        self.max_context = (
            config.max_context
            or getattr(engine, "max_seq_len", None)
            or getattr(mcfg, "max_position_embeddings", None)
            or 4096
        )
        cache = getattr(engine, "cache", None)
        if cache is not None:
            # an Engine built with num_blocks may hold less than its max_seq_len for one request: its
            # refusal came after a stream's 200, and a request leaving out max_tokens (the context's
            # room) was refused whatever its length
            self.max_context = min(self.max_context, cache.usable_blocks * cache.block_size)
        self.created = int(time.time())
        self.vocab_size = int(getattr(tokenizer, "vocab_size", 0) or 0)
        self.add_bos = bool(getattr(tokenizer, "add_bos_token", True))  # a Qwen vocabulary has no BOS
        self.fingerprint = "fp_nanoseek"
        self.think_start = getattr(tokenizer, "think_start", THINK_START)
        self.think_end = getattr(tokenizer, "think_end", THINK_END)

    # ---------------------------------------------------------- validation
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(
                f"The model `{name}` does not exist. This server serves `{self.config.model_name}`.",
                status=404,
                param="model",
                code="model_not_found",
            )

    def budget(self, prompt_len: int, max_tokens: int | None, param: str, prompt_param: str) -> int:
        """Tokens this request may generate; 400 context_length_exceeded if it cannot fit. A prompt may
        fill the whole context when nothing is generated (max_tokens 0: scoring with echo + logprobs)."""
        ctx = self.max_context
        wanted = max(max_tokens if max_tokens is not None else 1, 0)  # no max_tokens: at least one
        if prompt_len + wanted > ctx:
            completion = (
                f"{max_tokens} in the completion" if max_tokens is not None else "at least 1 to generate"
            )
            raise APIError(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_len + wanted} tokens ({prompt_len} in the prompt, {completion}). "
                "Please reduce the length of the prompt or the completion.",
                param=param if prompt_len < ctx else prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is not None:
            return max_tokens
        # left out: the checkpoint's generation_config.json max_new_tokens where it names one, within the
        # room the context leaves (vLLM also caps a given max_tokens by it: a value asked for wins here)
        # (an int: `generation_defaults` keeps a max_new_tokens only where it is one)
        default = cast(int, self.config.sampling_defaults.get("max_new_tokens", ctx))
        return min(default, ctx - prompt_len)

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        out = {}
        for key, value in (bias or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise APIError(
                    f"logit_bias keys must be token ids, got {key!r}.", param="logit_bias"
                ) from None
            if not 0 <= token_id < (self.vocab_size or token_id + 1):
                raise APIError(
                    f"logit_bias names token {token_id}, outside the vocabulary [0, {self.vocab_size}).",
                    param="logit_bias",
                )
            out[token_id] = value
        return out

    def sampling_params(
        self, req: Any, max_new: int, logprobs: int | None, choice: int, logit_bias: dict[int, float]
    ) -> Any:
        """`logit_bias` is `self.logit_bias(req.logit_bias)`, converted once per request, not per choice."""
        from nanoseek.engine import SamplingParams

        seed = None if req.seed is None else req.seed + choice  # n choices: distinct, reproducible
        stop_ids = req.stop_token_ids or []  # vLLM's: ends the reply as EOS does, also with ignore_eos
        bad = [t for t in stop_ids if not 0 <= t < (self.vocab_size or t + 1)]
        if bad:
            raise APIError(
                f"stop_token_ids holds {bad[0]}, outside the vocabulary [0, {self.vocab_size}).",
                param="stop_token_ids",
            )
        defaults = self.config.sampling_defaults

        def pick(name: str, openai_default: float) -> Any:
            value = getattr(req, name)
            return value if value is not None else defaults.get(name, openai_default)

        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=max(0, int(pick("top_k", 0))),
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=seed,
            stop_token_ids=[*([] if req.ignore_eos else self.tokenizer.stop_token_ids), *stop_ids],
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
            logit_bias=logit_bias,
            cache_salt=req.cache_salt,
        )
        try:
            params.validate()
        except ValueError as e:
            # what the request's own bounds let through (logit_bias 101, repetition_penalty 1e39): the message
            # names the field first ("invalid SamplingParams: logit_bias values must ..."), so the 400 names the
            # request's parameter of that name, as every other 400 does, not param null
            name = str(e).split(": ", 1)[-1].split(" ", 1)[0]
            raise APIError(str(e), param=name if name in type(req).model_fields else None) from None
        return params

    def new_choice(
        self,
        prompt_ids: list[int],
        stops: StopStringMatcher,
        started_in_think: bool | None,
        tools: list[dict] | None = None,
        prefill: str = "",
        parallel_calls: bool = True,
        named_call: bool = False,
    ) -> _Choice:
        """`stops`: the request's stop strings, of which each choice gets a matcher of its own (`fresh`)."""
        splitter = (
            None
            if started_in_think is None
            else ReasoningSplitter(started_in_think, self.think_start, self.think_end)
        )
        names = [t["function"]["name"] for t in tools or []]
        return _Choice(
            self.tokenizer.incremental_decoder(skip_special_tokens=True, context=prompt_ids),
            stops.fresh(),
            splitter,
            ToolCallSplitter(names, prefill) if tools else None,
            parallel_calls=parallel_calls,
            call_finish="stop" if named_call else "tool_calls",
        )

    def check_fits(self, count: int) -> None:
        """400 for a request of more generations than the server holds, before anything is built for them."""
        if count > self.engine.max_pending:  # 429 would ask the client to retry what can never fit
            raise APIError(
                f"This request asks for {count} generations (prompts x n), more than this server "
                f"holds at once ({self.engine.max_pending}). Ask for fewer.",
                param="n",
            )

    def submit(self, jobs: list[tuple[list[int], Any]]) -> RequestGroup:
        self.check_fits(len(jobs))
        try:
            return self.engine.submit(jobs)
        except QueueFullError as e:
            raise APIError(
                f"{e}. Retry after {self.config.retry_after} s.",
                status=429,
                type="rate_limit_exceeded",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.config.retry_after)},
            ) from None

    async def events(
        self, group: RequestGroup, choices: list[_Choice], request: Request | None
    ) -> AsyncIterator[tuple[int, Any]]:
        """(index, event) until every choice is done; a choice that hit a stop string is aborted."""
        checked = time.monotonic()
        while not all(c.done for c in choices):
            try:
                index, ev = await asyncio.wait_for(group.queue.get(), timeout=HANGUP_POLL_S)
            except TimeoutError:
                index, ev = -1, None
            # Non-streaming clients: nothing is written until the end, so poll for a hang-up (streams are
            # cancelled by Starlette itself when the client goes away).
            if request is not None and time.monotonic() - checked > HANGUP_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise ClientDisconnected
            if ev is None:
                continue
            if isinstance(ev, BaseException):
                error = _engine_error(ev)
                if error.status >= 500:  # its forward failed: counted as the engine's "error"
                    choices[index].finish_reason = "error"
                else:  # refused (it never fits): no choice reached the client
                    for c in choices:
                        c.refused = True
                raise error
            if choices[index].done:
                continue
            yield index, ev
            if choices[index].done and not ev.finished:  # a stop string ended it
                self.engine.abort_ids([group.request_ids[index]])

    @staticmethod
    async def until_disconnected(work: Awaitable[Any], request: Request) -> Any:
        """`work`'s result; ClientDisconnected, and `work` cancelled, once the client hangs up. Scoring an
        lm-eval batch runs for minutes and nothing is written until it ends: a client that gave up (timed out,
        to retry) had its scoring run on, between every stream's steps, as its retries queued more."""
        task = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait({task}, timeout=HANGUP_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientDisconnected

    def release(self, group: RequestGroup | None, choices: list[_Choice], prompt_tokens: int) -> None:
        """The HTTP request is over: free its engine requests (None: it made none, prompt scoring only), and
        count it in /metrics as its client got it: the prompt and completion tokens of its usage (each
        prompt once, whatever `n`, as vLLM's usage and OpenAI's bill count it; a scored prompt too) and
        each choice's finish_reason ("abort": the client left first). Not as the engine steps: a stop
        string is matched here, and the engine may generate past it, or finish by length, before its
        abort lands. A request the engine refused (the client got a 400) counts nothing."""
        if group is not None:
            self.engine.abort(group)
        if any(c.refused for c in choices):
            return
        self.metrics.prompt_tokens.inc(prompt_tokens)
        for c in choices:
            self.metrics.generation_tokens.inc(len(c.token_ids))
            self.metrics.finished.labels(finished_reason=c.finish_reason or "abort").inc()

    # ------------------------------------------------------------------ chat
    @staticmethod
    def chat_messages(messages: list[Any]) -> list[dict]:
        """Request messages as the template's dicts. reasoning_content is deliberately not passed: R1's
        template drops reasoning from history."""
        out = []
        for i, m in enumerate(messages):
            if m.role == "tool" and m.tool_call_id is None:  # as OpenAI and DeepSeek's API refuse it
                raise APIError(
                    f"Missing required parameter: 'messages.{i}.tool_call_id'.",
                    param=f"messages.{i}.tool_call_id",
                    code="missing_required_parameter",
                )
            if m.role != "assistant" and m.content is None:
                # OpenAI requires it of every role but the assistant's (whose turn may be calls alone); read
                # as "", a client's bug (a field misnamed, `text` for `content`) was answered as an empty message
                raise APIError(
                    f"Missing required parameter: 'messages.{i}.content'.",
                    param=f"messages.{i}.content",
                    code="missing_required_parameter",
                )
            # a turn of calls alone keeps its null content: DeepSeek's own templates (R1's, R1-Distill's, V3's)
            # write an assistant's calls only where content `is none`, and "" left them out of the prompt
            calls_alone = m.role == "assistant" and m.tool_calls and m.content is None
            d = openai_message({"role": m.role, "content": None if calls_alone else m.text(i)})
            if m.tool_calls:
                d["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out

    @staticmethod
    def thinking(req: ChatCompletionRequest | TokenizeRequest) -> bool:
        """`chat_template_kwargs.thinking` (DeepSeek-V3.1's name) or `.enable_thinking`; else off for OpenAI's
        `reasoning_effort: "none"` (no reasoning, gpt-5.1's default); on by default. Other efforts think as
        usual: one think block has no length dial (vLLM ignores them for DeepSeek's templates too).

        `null` is the default, as for every field; any other option is refused: the template takes none, and a
        misspelt one (`thinkng`) did nothing, silently."""
        kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if v is not None}
        for key in kwargs:
            if key not in THINKING_KWARGS:
                raise APIError(
                    f"'{key}' is not an option of this server's chat template: it takes 'thinking' (or "
                    "'enable_thinking').",
                    param=f"chat_template_kwargs.{key}",
                )
        for key in THINKING_KWARGS:
            if key in kwargs:
                if not isinstance(kwargs[key], bool):
                    raise APIError(f"'{key}' must be true or false.", param=f"chat_template_kwargs.{key}")
                return kwargs[key]
        return req.reasoning_effort != "none"

    def tool_setup(self, req: ChatCompletionRequest | TokenizeRequest) -> tuple[list[dict] | None, str]:
        """(the tools to render and parse, or None; text that forces a call, written after the prompt).

        Generation cannot be constrained to a schema here, but a forced call can be started: the prompt
        ends with `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>` ("required") plus `NAME<｜tool▁sep｜>` (a named one),
        or, where the chat template writes calls as DeepSeek-V3's and R1's do, `function<｜tool▁sep｜>`
        plus `NAME` and the opening of its ```json fence.
        """
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice
        if choice is None or choice == "auto":
            return tools, ""
        if choice == "none":
            return None, ""
        names = [t["function"]["name"] for t in tools or []]
        # a model whose template writes `function<sep>NAME` and fenced arguments (DeepSeek-V3's, R1's) was
        # handed V3.1's `NAME<sep>` for a named call: markup it never saw, its arguments came back as text
        fenced = writes_fenced_tool_calls(getattr(self.tokenizer, "chat_template", None))
        if choice == "required" or isinstance(choice, dict):
            if not tools:
                raise APIError("tool_choice requires 'tools' to be given.", param="tool_choice")
            if isinstance(choice, str):  # "required"
                return tools, TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + ("function" + TOOL_SEP if fenced else "")
            f = choice.get("function") if choice.get("type") == "function" else None
            name = f.get("name") if isinstance(f, dict) else None
            if isinstance(name, str) and name in names:
                call = f"function{TOOL_SEP}{name}\n```json\n" if fenced else name + TOOL_SEP
                return tools, TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + call
            if name is not None:
                raise APIError(
                    f"tool_choice names '{name}', which is not one of the tools.", param="tool_choice"
                )
        raise APIError(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}.",
            param="tool_choice",
        )

    def chat_prompt(
        self, req: ChatCompletionRequest | TokenizeRequest, add_generation_prompt: bool = True
    ) -> tuple[str, list[dict] | None, str, bool]:
        """(prompt text, tools to parse or None, forced-call prefill, whether reasoning is split off)."""
        tools, prefill = self.tool_setup(req)
        if tools:  # calls are parsed (and forced) in DeepSeek's markup: its tokens must be there
            try:
                self.tokenizer.require_tool_tokens()
            except ValueError as e:
                raise APIError(str(e), param="tools") from None
        thinking = self.thinking(req)
        split = thinking and not prefill  # a forced call skips the reasoning, as V3.1 calls tools
        assert req.messages is not None  # (a TokenizeRequest's: `tokenize` asks only where it has them)
        try:
            prompt_text = self.tokenizer.apply_chat_template(
                self.chat_messages(req.messages),
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                thinking=split,
                tools=tools,
            )
        except ValueError as e:  # a malformed message, or tool use with a tokenizer that has no tool tokens
            raise APIError(str(e), param="tools" if tools else "messages") from None
        opened = add_generation_prompt and prompt_text.rstrip().endswith(self.think_start)
        if not thinking and not prefill and opened:
            # R1-Distill's template (R1's, V3's) has no non-thinking mode: its prompt opens the think block
            # whatever the flag, the model reasoned anyway, and its reasoning came back as the answer. Refused
            # as `nanoseek chat --no-think` refuses it, naming the field that asked (`thinking`'s order). (A
            # forced call is written after the block's opening: no reasoning, as asked.)
            kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if v is not None}
            param = next(
                (f"chat_template_kwargs.{k}" for k in THINKING_KWARGS if k in kwargs), "reasoning_effort"
            )
            raise APIError(
                f"This model's chat template has no non-thinking mode (its prompt opens {self.think_start} "
                "either way): leave thinking on to get the reasoning apart, as reasoning_content.",
                param=param,
            )
        return prompt_text + (prefill if add_generation_prompt else ""), tools, prefill, split

    async def chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        self.check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError("top_logprobs requires logprobs to be true.", param="top_logprobs")
        # OpenAI's deprecated function calling; `[]` and "none"/"auto" ask for nothing. Not by truthiness: `{}`
        # or `0` passed as if the field were not sent
        extra = req.model_extra or {}
        for name, noop in (("functions", ([],)), ("function_call", ("none", "auto"))):
            if extra.get(name) is not None and extra[name] not in noop:
                raise APIError(f"'{name}' is deprecated and not supported: use 'tools'.", param=name)
        prompt_text, tools, prefill, split = self.chat_prompt(req)
        prompt_ids = await asyncio.to_thread(self.tokenizer.encode, prompt_text)  # off the event loop
        started_in_think = prompt_text.rstrip().endswith(self.think_start) if split else None
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_new = self.budget(len(prompt_ids), asked, param, "messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        bias = self.logit_bias(req.logit_bias)
        jobs = [(prompt_ids, self.sampling_params(req, max_new, k, j, bias)) for j in range(req.n)]
        parallel = req.parallel_tool_calls is not False
        stops = StopStringMatcher(req.stop or [])  # its tables once per request, not once per choice
        choices = [
            self.new_choice(
                prompt_ids,
                stops,
                started_in_think,
                tools,
                prefill,
                parallel,
                isinstance(req.tool_choice, dict),
            )
            for _ in range(req.n)
        ]
        group = self.submit(jobs)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(
                self._chat_stream(req, group, choices, cid, len(prompt_ids), include_usage),
                self,
                group,
                choices,
                len(prompt_ids),
            )
        try:
            async for index, ev in self.events(group, choices, request):
                choices[index].feed(ev)
        finally:
            self.release(group, choices, len(prompt_ids))
        out = []
        for i, c in enumerate(choices):
            message: dict[str, Any] = {"role": "assistant", "content": c.content}
            if split:  # non-thinking mode has no reasoning to report
                message["reasoning_content"] = c.reasoning or None
            if c.tool_calls:
                message["content"], message["tool_calls"] = c.content or None, c.tool_calls
            out.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": {"content": self.chat_logprobs(c.logprobs, k)} if k is not None else None,
                    "finish_reason": c.finish_reason,
                }
            )
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.config.model_name,
                "system_fingerprint": self.fingerprint,
                "choices": out,
                "usage": _usage(len(prompt_ids), choices, chat=True),
            }
        )

    async def _chat_stream(
        self,
        req: ChatCompletionRequest,
        group: RequestGroup,
        choices: list[_Choice],
        cid: str,
        prompt_len: int,
        include_usage: bool,
    ) -> AsyncIterator[dict]:
        created = int(time.time())
        k = (req.top_logprobs or 0) if req.logprobs else None
        continuous = (
            include_usage and req.stream_options is not None and req.stream_options.continuous_usage_stats
        )

        def chunk(choice_list: list[dict], usage: dict | None = None) -> dict:
            out = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.config.model_name,
                "system_fingerprint": self.fingerprint,
                "choices": choice_list,
            }
            if include_usage:
                out["usage"] = usage or (_usage(prompt_len, choices) if continuous else None)
            return out

        for i in range(len(choices)):
            yield chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        sent_lp = [0] * len(choices)
        async for index, ev in self.events(group, choices, None):
            c = choices[index]
            _, r, t = c.feed(ev)
            delta: dict = {}
            if r:
                delta["reasoning_content"] = r
            if t:
                delta["content"] = t
            lp = None  # each token's logprobs go out in its own step's chunk, text or not (as vLLM)
            if k is not None and len(c.logprobs) > sent_lp[index]:
                lp = {"content": self.chat_logprobs(c.logprobs[sent_lp[index] :], k)}
                sent_lp[index] = len(c.logprobs)
                delta = delta or {"content": ""}  # a token with no text yet (held, skipped, part of a char)
            if delta or lp is not None:
                yield chunk([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": None}])
            for j, call in enumerate(c.tool_calls or []):  # set only once the choice is done
                tool_delta = {"tool_calls": [{"index": j, **call}]}
                yield chunk([{"index": index, "delta": tool_delta, "logprobs": None, "finish_reason": None}])
            if c.done:
                yield chunk(
                    [{"index": index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}]
                )
        if include_usage:
            yield chunk([], _usage(prompt_len, choices, chat=True))

    def chat_logprobs(self, entries: list[Any], k: int | None) -> list[dict]:
        out = []
        for e in entries:
            top = [
                {
                    "token": _token_str(self.tokenizer, tid),
                    "logprob": lp,
                    "bytes": list(_token_bytes(self.tokenizer, tid)),
                }
                for tid, lp in (e.top or [])[: k or 0]
            ]
            out.append(
                {
                    "token": _token_str(self.tokenizer, e.token_id),
                    "logprob": e.logprob,
                    "bytes": list(_token_bytes(self.tokenizer, e.token_id)),
                    "top_logprobs": top,
                }
            )
        return out

    # ----------------------------------------------------------- completions
    def prompts(self, prompt: Any) -> list[tuple[list[int], str]]:
        """Normalize OpenAI's four prompt forms to (token ids, echo text) pairs."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                if not p:
                    raise APIError("prompt must not be empty.", param="prompt")
                out.append((self.tokenizer.encode(p, add_bos=self.adds_bos(p)), p))
            else:
                bad = [t for t in p if not 0 <= t < self.vocab_size] if self.vocab_size else []
                if bad:
                    raise APIError(
                        f"Token id {bad[0]} in prompt {i} is out of range [0, {self.vocab_size}).",
                        param="prompt",
                    )
                out.append((list(p), self.tokenizer.decode(p)))
        return out

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = await _parse(request, CompletionRequest)
        self.check_model(req.model)
        if req.suffix:
            raise APIError("suffix is not supported by this model.", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError("best_of must equal n (no server-side ranking).", param="best_of")
        prompts = await asyncio.to_thread(self.prompts, req.prompt)  # tokenizing: off the event loop
        n = req.n
        generate = req.max_tokens is None or req.max_tokens > 0
        # before a choice per prompt x n is built: a 25 kB list of prompts asks for millions. Nothing generated
        # (max_tokens 0) builds them all the same: n copies of 3,000 scored prompts (15 kB) held the event loop
        # for a 13 MB answer, and the body limit allowed a thousand times that
        if generate or n > 1:
            self.check_fits(len(prompts) * n)
        budgets = [self.budget(len(ids), req.max_tokens, "max_tokens", "prompt") for ids, _ in prompts]
        scores: list[Any] = [None] * len(prompts)
        if req.echo and req.logprobs is not None:
            scoring = self.engine.score_prompts([ids for ids, _ in prompts], req.logprobs)
            scores = await self.until_disconnected(scoring, request)
        stops = StopStringMatcher(req.stop or [])
        choices = [self.new_choice(prompts[i // n][0], stops, None) for i in range(len(prompts) * n)]
        group = None
        if generate:
            bias = self.logit_bias(req.logit_bias)
            jobs = [
                (ids, self.sampling_params(req, budgets[p], req.logprobs, j, bias))
                for p, (ids, _) in enumerate(prompts)
                for j in range(n)
            ]
            group = self.submit(jobs)
        else:
            for c in choices:
                c.finish_reason = "length"
        cid = f"cmpl-{uuid.uuid4().hex}"
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        if req.stream:
            gen = self._completion_stream(req, group, choices, prompts, scores, cid, prompt_tokens)
            return _sse(gen, self, group, choices, prompt_tokens)
        try:
            if group is not None:
                async for index, ev in self.events(group, choices, request):
                    choices[index].feed(ev)
        finally:
            self.release(group, choices, prompt_tokens)

        def render() -> JSONResponse:
            out = []
            for i, c in enumerate(choices):
                ids, text = prompts[i // n]
                lp = None
                if req.logprobs is not None:
                    lp = self.legacy_logprobs(
                        ids if req.echo else [],
                        scores[i // n],
                        c.logprobs,
                        req.logprobs,
                        hidden=self.hidden_prefix(req.prompt, text),
                        offsets=[(len(text) if req.echo else 0) + o for o in c.starts],
                    )
                out.append(
                    {
                        "index": i,
                        "text": (text if req.echo else "") + c.text,
                        "logprobs": lp,
                        "finish_reason": c.finish_reason,
                    }
                )
            body = {
                "id": cid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.config.model_name,
                "system_fingerprint": self.fingerprint,
                "choices": out,
                "usage": _usage(prompt_tokens, choices),
            }
            return JSONResponse(body)  # encoded here, as every other answer (NaN refused, not sent)

        # lm-eval's loglikelihood batches: hundreds of thousands of scored tokens to decode and encode,
        # seconds of work that on the event loop would stall every other client (/health included)
        return await asyncio.to_thread(render)

    async def _completion_stream(
        self,
        req: CompletionRequest,
        group: RequestGroup | None,
        choices: list[_Choice],
        prompts: list[tuple[list[int], str]],
        scores: list[Any],
        cid: str,
        prompt_tokens: int,
    ) -> AsyncIterator[dict]:
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = (
            include_usage and req.stream_options is not None and req.stream_options.continuous_usage_stats
        )
        n = req.n

        def chunk(index: int, text: str, lp: dict | None, finish: str | None) -> dict:
            out = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": self.config.model_name,
                "system_fingerprint": self.fingerprint,
                "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}],
            }
            if include_usage:
                out["usage"] = _usage(prompt_tokens, choices) if continuous else None
            return out

        if req.echo:
            for i in range(len(choices)):
                ids, text = prompts[i // n]
                lp = None
                if req.logprobs is not None:
                    lp = self.legacy_logprobs(
                        ids, scores[i // n], [], req.logprobs, hidden=self.hidden_prefix(req.prompt, text)
                    )
                yield chunk(i, text, lp, None)
        sent_lp = [0] * len(choices)
        if group is not None:
            async for index, ev in self.events(group, choices, None):
                c = choices[index]
                text, _, _ = c.feed(ev)
                lp = None  # each token's logprobs go out in its own step's chunk, text or not (as vLLM)
                if req.logprobs is not None and len(c.logprobs) > sent_lp[index]:
                    start = len(prompts[index // n][1]) if req.echo else 0  # offsets run over the whole text
                    lp = self.legacy_logprobs(
                        [],
                        None,
                        c.logprobs[sent_lp[index] :],
                        req.logprobs,
                        offsets=[start + o for o in c.starts[sent_lp[index] :]],
                    )
                    sent_lp[index] = len(c.logprobs)
                if text or lp is not None:
                    yield chunk(index, text, lp, None)
                if c.done:
                    yield chunk(index, "", None, c.finish_reason)
        else:
            for i, c in enumerate(choices):
                yield chunk(i, "", None, c.finish_reason)
        if include_usage:
            final = chunk(0, "", None, None)
            final["choices"], final["usage"] = [], _usage(prompt_tokens, choices)
            yield final

    def adds_bos(self, text: str) -> bool:
        """Whether a text prompt gets the BOS: not one that starts with it (a chat template's rendering,
        lm-eval's `add_bos_token=True` prompts sent as text), which a second BOS would put out of the
        distribution the model was trained on (lm-eval's hf backend keeps one too)."""
        bos = getattr(self.tokenizer, "bos_token", None)
        return self.add_bos and not (bos and text.startswith(bos))

    def hidden_prefix(self, prompt: Any, text: str) -> int:
        """Tokens at the start of a prompt that its echoed `text` does not hold: the BOS the server adds to
        a text prompt (a token-id prompt is echoed as its decoded ids, BOS included)."""
        texts = isinstance(prompt, str) or isinstance(prompt[0], str)
        return int(texts and self.adds_bos(text))

    def legacy_logprobs(
        self,
        prompt_ids: list[int],
        score: Any,
        generated: list[Any],
        k: int,
        hidden: int = 0,
        offsets: list[int] | None = None,
    ) -> dict:
        """OpenAI's legacy completions logprobs: parallel lists tokens / token_logprobs / top_logprobs /
        text_offset.

        text_offset is where each token starts in the choice's text: the prompt's `hidden` first tokens hold
        none of the echoed text, a token that begins inside a character (a byte-level piece) is placed at
        that character, and `offsets` give the generated tokens' (from `_Choice.starts`)."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []

        def add(tid: int, lp: float | None, top: list[tuple[int, float]] | None, offset: int) -> None:
            s = _token_str(self.tokenizer, tid)
            tokens.append(s)
            token_logprobs.append(lp)
            text_offset.append(offset)
            if lp is None:
                top_logprobs.append(None)
                return
            # Best first: tokens that print the same (byte pieces all show as U+FFFD) keep the best one's value.
            # The chosen token is always listed (as OpenAI and vLLM do), so a reader can compare it with the
            # best alternative: lm-evaluation-harness's is_greedy check relies on that.
            d: dict[str, float] = {}
            for t, v in [*(top or [])[:k], (tid, lp)]:
                d.setdefault(_token_str(self.tokenizer, t), v)
            top_logprobs.append(d)

        detok = self.tokenizer.incremental_decoder()  # the echoed prompt's text, special tokens included
        for i, tid in enumerate(prompt_ids):
            add(tid, score.logprobs[i] if score else None, score.top[i] if score else None, detok.chars)
            if i >= hidden:
                detok.push([tid])
        for e, offset in zip(generated, offsets or [0] * len(generated), strict=True):
            add(e.token_id, e.logprob, e.top, offset)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }

    # ------------------------------------------------------------ tokenizer
    async def tokenize(self, request: Request) -> Response:
        req: TokenizeRequest = await _parse(request, TokenizeRequest)
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("Give exactly one of 'prompt' or 'messages'.", param="prompt")
        if req.messages is not None:  # counted as /v1/chat/completions would render it: tools, thinking
            text = self.chat_prompt(req, req.add_generation_prompt)[0]
            ids = await asyncio.to_thread(self.tokenizer.encode, text)
        else:
            # special tokens as a text prompt gets them: no BOS for a vocabulary without one (Qwen's)
            assert req.prompt is not None  # exactly one of the two, checked above
            bos = req.add_special_tokens and self.adds_bos(req.prompt)
            ids = await asyncio.to_thread(self.tokenizer.encode, req.prompt, add_bos=bos)
        return JSONResponse({"count": len(ids), "max_model_len": self.max_context, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        req: DetokenizeRequest = await _parse(request, DetokenizeRequest)
        self.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < self.vocab_size] if self.vocab_size else []
        if bad:
            raise APIError(f"Token id {bad[0]} is out of range [0, {self.vocab_size}).", param="tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(req.tokens)})

    def tokenizer_info(self) -> dict:
        t = self.tokenizer
        return {
            "tokenizer_class": type(t).__name__,
            "vocab_size": self.vocab_size,
            "model_max_length": self.max_context,
            "bos_token": getattr(t, "bos_token", None),
            "eos_token": getattr(t, "eos_token", None),
            "pad_token": getattr(t, "pad_token", None) or getattr(t, "eos_token", None),
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": t.pad_token_id,
            "think_start": self.think_start,
            "think_end": self.think_end,
            "chat_template": getattr(t, "chat_template", None),
        }

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.config.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "nanoseek",
                    "max_model_len": self.max_context,
                }
            ],
        }


def _usage(prompt_tokens: int, choices: list[_Choice], chat: bool = False) -> dict:
    """As OpenAI counts: each prompt once (however many choices `n` makes), completion tokens summed;
    a chat's think-block tokens apart, as DeepSeek's API reports them."""
    completion = sum(len(c.token_ids) for c in choices)
    usage: dict[str, int | dict[str, int]] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    if chat:
        usage["completion_tokens_details"] = {"reasoning_tokens": sum(c.reasoning_tokens for c in choices)}
    return usage


def _engine_error(e: BaseException) -> APIError:
    if isinstance(e, ValueError):
        return APIError(str(e), param="prompt")
    if type(e).__name__ == "EngineCapacityError":
        return APIError(str(e), param="max_tokens", code="context_length_exceeded")
    return APIError(f"engine failure: {e}", status=500, type="server_error")


def _server_error(e: Exception) -> APIError:
    """A failure of the server's own (a bug, a broken model's NaN): 500, naming the exception."""
    return APIError(
        f"The server had an error while processing your request: {type(e).__name__}: {e}", 500, "server_error"
    )


def _sse(
    chunks: AsyncIterator[dict],
    server: Server,
    group: RequestGroup | None,
    choices: list[_Choice],
    prompt_tokens: int,
) -> StreamingResponse:
    """Server-sent events ending with [DONE]; on disconnect Starlette cancels us and we release the group."""

    async def body() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                try:  # as JSONResponse encodes the non-stream answer: a NaN (a broken model's logprob) is no JSON
                    data = json.dumps(c, ensure_ascii=False, allow_nan=False)
                except ValueError as e:
                    raise _server_error(e) from None
                yield f"data: {data}\n\n"
        except APIError as e:  # after the 200 status line: report in-band, as OpenAI does
            yield f"data: {json.dumps(e.body())}\n\n"
        # any other failure too (a bug of ours), as vLLM sends it: raised out of the body after the 200, it cut
        # the connection, and a client saw a broken chunked read instead of the error and the [DONE]
        except Exception as e:
            log.exception("a stream failed after its response began")
            yield f"data: {json.dumps(_server_error(e).body())}\n\n"
        finally:
            server.release(group, choices, prompt_tokens)
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _route(path: str) -> str:
    """Metric label for a path: known routes by name, everything else pooled (bounded label set)."""
    if path in ROUTES:
        return path
    return (
        "/v1/models/{id}"
        if path.startswith("/v1/models/")
        else "/static"
        if path.startswith("/static/")
        else "other"
    )


def _simple_browser_post(scope: dict) -> bool:
    """A browser POST whose body is not JSON: text/plain, form and multipart posts are the ones a page
    of any other site may send without a CORS preflight (which this server never grants), so without this
    check any web page could make a key-less server generate (FastAPI refuses them too: CVE-2021-32677).
    Clients that are not browsers send no Origin and are not affected."""
    headers = dict(scope.get("headers") or [])
    if scope.get("method") != "POST" or b"origin" not in headers:
        return False
    media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    return not (media == b"application/json" or media.endswith(b"+json"))


class _AuthAndMetrics:
    """ASGI middleware: bearer-key check (all routes but /health and the page) and a request counter."""

    def __init__(self, app: Any, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        key = self.server.config.api_key
        if _simple_browser_post(scope):
            err = APIError(
                "A browser's request must send its JSON body with Content-Type: application/json.",
                status=415,
                code="unsupported_media_type",
            )
            self.server.metrics.requests.labels(route=_route(path), status="415").inc()
            return await JSONResponse(err.body(), status_code=415)(scope, receive, send)
        if key and path not in OPEN_PATHS and not path.startswith("/static/"):
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                err = APIError(
                    "Incorrect API key provided."
                    if given
                    else "Missing API key: send 'Authorization: Bearer <key>'.",
                    status=401,
                    code="invalid_api_key",
                )
                self.server.metrics.requests.labels(route=_route(path), status="401").inc()
                return await JSONResponse(err.body(), status_code=401)(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if path != "/metrics":
                self.server.metrics.requests.labels(route=_route(path), status=str(status["code"])).inc()


def create_app(engine: Any, tokenizer: Any, config: ServeConfig, model: Any = None) -> FastAPI:
    """The FastAPI app for one engine + tokenizer. The engine thread starts with the app's lifespan."""
    server = Server(engine, tokenizer, config, model=model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        try:
            yield
        finally:
            server.engine.shutdown()

    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # OpenAI answers an unknown URL with invalid_request_error too ("Invalid URL (GET /v1/...)")
        msg = f"Invalid URL ({request.method} {request.url.path})." if e.status_code == 404 else str(e.detail)
        # e.headers: a 405's Allow (the methods the route takes), which HTTP requires
        return JSONResponse(
            APIError(msg, status=e.status_code).body(), status_code=e.status_code, headers=e.headers
        )

    @app.exception_handler(EngineDeadError)  # a request (or prompt scoring) after the engine thread died
    async def _engine_dead(request: Request, e: EngineDeadError) -> JSONResponse:
        err = APIError(str(e), status=503, type="server_error", code="engine_unavailable")
        return JSONResponse(err.body(), status_code=503)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody is listening

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(_server_error(e).body(), status_code=500)

    app.post("/v1/chat/completions")(server.chat)
    app.post("/v1/completions")(server.completions)
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)

    @app.api_route("/tokenizer_info", methods=GET)
    async def tokenizer_info() -> JSONResponse:
        return JSONResponse(server.tokenizer_info())

    @app.api_route("/v1/models", methods=GET)
    async def models() -> JSONResponse:
        return JSONResponse(server.models())

    @app.api_route("/v1/models/{model_id:path}", methods=GET)
    async def model_by_id(model_id: str) -> JSONResponse:  # (`model` is create_app's argument)
        server.check_model(model_id)
        return JSONResponse(server.models()["data"][0])

    @app.api_route("/health", methods=GET)
    async def health() -> JSONResponse:
        ok = server.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.api_route("/metrics", methods=GET)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/", methods=GET)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/static", _PageFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(_AuthAndMetrics, server=server)
    return app
