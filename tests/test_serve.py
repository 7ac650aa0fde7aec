"""`nanoseek serve` end to end: a real uvicorn server on a loopback port, driven by the official `openai`
client (and raw httpx where the wire format itself is the point).

The protocol tests run the REAL engine over a tiny random-weight model and a real (tiny) BPE tokenizer:
its output is gibberish, which is fine for checking the protocol. The reasoning split, stop strings,
back-pressure and disconnects use `ScriptedEngine` (tests/serve_fakes.py), which emits the R1-shaped
text chosen by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.config import get_preset
from nanoseek.engine import Engine
from nanoseek.model.transformer import DeepSeekV3
from nanoseek.serve import ServeConfig, create_app, protocol
from nanoseek.serve.textstream import ReasoningSplitter
from nanoseek.tokenizer import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_END,
    TOOL_SEP,
    parse_tool_calls,
)
from serve_fakes import V3_TOOL_TEMPLATE, LiveServer, ScriptedEngine, tiny_tokenizer

MODEL = "nanoseek-test"
REASONING = "I add 2 and 2.\nThat makes 4."
ANSWER = "The answer is **4**."


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    cfg = get_preset("tiny").replace(
        vocab_size=tok.vocab_size,
        num_hidden_layers=2,
        hidden_size=128,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return DeepSeekV3(cfg).init_weights(0).eval()


@pytest.fixture(scope="module")
def real(tok, model):
    engine = Engine(model, max_batch_size=32, max_seq_len=256)
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL), model=model)) as srv:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        yield srv


@pytest.fixture(scope="module")
def scripted(tok):
    filler = tok.encode(" and so on") * 100

    def reply(prompt, params):
        text = tok.encode(f"{REASONING}\n</think>\n\n{ANSWER}")
        # "LONG" prompts keep going for ~300 tokens (3 s): time for a stop string's abort to land mid-way.
        return text + filler if "LONG" in tok.decode(prompt) else text

    engine = ScriptedEngine(tok, reply, step_delay=0.01)
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL))) as srv:
        srv.engine = engine
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        yield srv


USER = [{"role": "user", "content": "What is 2 + 2?"}]


# ------------------------------------------------------------------- real engine
def test_models_health_metrics(real):
    models = real.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(real.url + "/health").json() == {"status": "ok"}
    real.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)
    text = httpx.get(real.url + "/metrics").text
    for name in (
        "nanoseek:num_requests_running",
        "nanoseek:num_requests_waiting",
        "nanoseek:prompt_tokens_total",
        "nanoseek:generation_tokens_total",
        "nanoseek:time_to_first_token_seconds_bucket",
        "nanoseek:time_per_output_token_seconds_count",
        "nanoseek:kv_cache_usage_perc",
        "nanoseek:prefix_cache_hits_total",
    ):
        assert name in text, name
    gen = next(line for line in text.splitlines() if line.startswith("nanoseek:generation_tokens_total"))
    assert float(gen.split()[-1]) >= 2


def test_the_engines_counts_are_counters_under_vllms_names_and_count_tokens(tok, model):
    """Preemptions and prefix-cache hits only go up: they were gauges (`nanoseek:num_preemptions`,
    `nanoseek:prefix_cache_hit_blocks`), not vLLM's `num_preemptions_total`, and the cache was counted in
    blocks where vLLM's `prefix_cache_queries_total` / `prefix_cache_hits_total` count prompt tokens."""
    from prometheus_client.parser import text_string_to_metric_families

    engine = Engine(model, max_batch_size=4, max_seq_len=128, block_size=16, num_blocks=6)
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL), model=model)) as srv:
        prompt = "The answer is 4. Let me think about this problem step by step." * 2  # 2 whole blocks
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "ignore_eos": True, "temperature": 0}
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post("/v1/completions", json=body).status_code == 200
            # the same prompt again, 4 at once: its blocks are reused, and 5 blocks cannot hold 4 replies
            jobs = [
                threading.Thread(target=c.post, args=("/v1/completions",), kwargs={"json": body})
                for _ in range(4)
            ]
            for t in jobs:
                t.start()
            for t in jobs:
                t.join()
            stats, deadline = engine.stats(), time.time() + 5
            while True:  # /metrics reads the engine's snapshot, refreshed just after its last step
                text = c.get("/metrics").text
                families = {f.name: f for f in text_string_to_metric_families(text)}
                counted = {}
                for name in ("num_preemptions", "prefix_cache_queries", "prefix_cache_hits"):
                    family = families["nanoseek:" + name]
                    assert family.type == "counter", name
                    assert family.samples[0].name == f"nanoseek:{name}_total"
                    counted[name] = family.samples[0].value
                if counted["num_preemptions"] == stats["preemptions"] or time.time() > deadline:
                    break
                time.sleep(0.05)
    assert counted["num_preemptions"] == stats["preemptions"] > 0
    assert counted["prefix_cache_queries"] == 16 * stats["prefix_cache_queries"]
    assert counted["prefix_cache_hits"] == 16 * stats["prefix_cache_hit_blocks"] > 0
    assert "nanoseek:num_preemptions " not in text and "prefix_cache_hit_blocks" not in text


def test_chat_greedy_stream_equals_non_stream(real):
    kw = dict(model=MODEL, messages=USER, max_tokens=8, temperature=0)
    full = real.client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert full.usage.completion_tokens == 8 or choice.finish_reason == "stop"
    text = (getattr(choice.message, "reasoning_content", None) or "") + (choice.message.content or "")
    assert text, "the model produced no text"

    chunks = list(
        real.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    streamed = "".join(
        (getattr(c.choices[0].delta, "reasoning_content", None) or "") + (c.choices[0].delta.content or "")
        for c in chunks
        if c.choices
    )
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason
    ]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_sampling_n_seed_and_max_completion_tokens(real):
    kw = dict(model=MODEL, messages=USER, temperature=1.0, top_p=0.9, seed=7, n=2, max_completion_tokens=5)
    a = real.client.chat.completions.create(**kw, presence_penalty=0.5, frequency_penalty=0.5)
    b = real.client.chat.completions.create(**kw, presence_penalty=0.5, frequency_penalty=0.5)
    assert [c.index for c in a.choices] == [0, 1]
    assert a.usage.completion_tokens <= 10 and a.usage.prompt_tokens == b.usage.prompt_tokens
    one = real.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert a.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once, whatever n is
    texts = [(c.message.reasoning_content or "") + (c.message.content or "") for c in a.choices]
    assert texts == [(c.message.reasoning_content or "") + (c.message.content or "") for c in b.choices]


def test_chat_logprobs(real):
    r = real.client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob <= 0.0
        # greedy: the chosen token is the most likely one
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs), abs=1e-5)


def test_concurrent_clients_all_answered(real):
    async def main():
        client = openai.AsyncOpenAI(base_url=real.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        tasks = [
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"question {i}"}],
                max_tokens=3,
                temperature=0.7,
                seed=i,
                stream=i % 2 == 0,
            )
            for i in range(32)
        ]
        results = await asyncio.gather(*tasks)
        done = 0
        for i, res in enumerate(results):
            if i % 2 == 0:
                chunks = [c async for c in res]
                assert any(c.choices and c.choices[0].finish_reason for c in chunks)
            else:
                assert res.choices[0].finish_reason in ("length", "stop")
            done += 1
        await client.close()
        return done

    assert asyncio.run(main()) == 32


def test_a_request_whose_forward_fails_fails_alone(tok, model, monkeypatch, caplog):
    """One request that makes the forward raise (here: its prompt holds a poisoned token) gets a 500; the
    request streaming beside it finishes, /health stays ok and later requests are served (the engine
    thread used to die on it: every open request failed and the server answered 503 until restarted)."""
    poison = 7
    engine = Engine(model, max_batch_size=8, max_seq_len=256)
    hidden = engine._hidden

    def tripping(ids, positions, view):
        if bool((ids == poison).any()):
            raise RuntimeError("CUDA out of memory")
        return hidden(ids, positions, view)

    monkeypatch.setattr(engine, "_hidden", tripping)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL), model=model)
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            lines = (line for line in s.iter_lines() if line.startswith("data:"))
            chunks = [next(lines)]
            bad = c.post("/v1/completions", json={**body, "prompt": [4, poison, 5]})
            assert "out of memory" in _err(bad, 500)["message"]
            chunks += list(lines)
        assert chunks[-1] == "data: [DONE]" and not any("error" in x for x in chunks)
        assert json.loads(chunks[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        assert c.get("/health").json() == {"status": "ok"}
        again = c.post("/v1/completions", json=body)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 40
        assert app.state.server.engine.pending == 0 and engine.stats()["cache_blocks_used"] == 0
    # the operator sees what failed, with its traceback (the client only gets the message)
    failed = [r for r in caplog.records if r.name == "nanoseek.serve" and r.levelname == "ERROR"]
    assert len(failed) == 1 and "out of memory" in str(failed[0].exc_info[1])


def test_a_request_aborted_mid_stream_frees_its_slot_and_the_engine_serves_on(tok, model):
    """The real engine reports an aborted request in a later step (finish_reason "abort"), when the server
    has already forgotten it: that event is dropped, and the next request is served."""
    engine = Engine(model, max_batch_size=8, max_seq_len=256)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL), model=model)
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            assert next(line for line in s.iter_lines() if line.startswith("data:"))
        deadline = time.time() + 10
        while engine.has_unfinished() and time.time() < deadline:
            time.sleep(0.02)
        again = c.post("/v1/completions", json={**body, "max_tokens": 4})
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
        assert app.state.server.engine.pending == 0 and engine.stats()["cache_blocks_used"] == 0


def test_a_failed_forward_is_logged_once_for_all_its_requests(tok, model, monkeypatch, caplog):
    """A forward that raises fails every request it computed with the one exception: the operator gets
    its traceback once, naming them all (n=4 logged it 4 times; an OOM in a 32-row decode batch, 32)."""
    engine = Engine(model, max_batch_size=8, max_seq_len=256)
    hidden = engine._hidden

    def tripping(ids, positions, view):
        if ids.shape[0] > 1:  # the four choices' batch
            raise RuntimeError("CUDA out of memory")
        return hidden(ids, positions, view)

    monkeypatch.setattr(engine, "_hidden", tripping)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL), model=model)

    # a slow queue between the server and its engine thread: the four choices were put one by one, and the
    # thread could take the first alone (prefilled alone, at random under load: 3 requests logged)
    class SlowQueue:
        def __init__(self, q):
            self.q = q

        def put(self, item):
            self.q.put(item)
            time.sleep(0.05)

        def __getattr__(self, name):
            return getattr(self.q, name)

    server = app.state.server
    monkeypatch.setattr(server.engine, "_commands", SlowQueue(server.engine._commands))
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4, "n": 4, "temperature": 0}
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert "out of memory" in _err(c.post("/v1/completions", json=body), 500)["message"]
    failed = [r for r in caplog.records if r.name == "nanoseek.serve" and r.levelname == "ERROR"]
    assert len(failed) == 1 and "out of memory" in str(failed[0].exc_info[1])
    assert failed[0].getMessage().startswith("requests ") and failed[0].getMessage().count(",") == 3


def test_requests_queued_while_the_engine_thread_dies_are_answered(tok):
    """A request that arrives while the engine's step breaks (outside a forward: the thread dies) gets its
    500 instead of hanging: its add was queued and never drained. Prompt scoring after that is a 503."""

    class Crashing(ScriptedEngine):
        crash, inside = threading.Event(), threading.Event()

        def step(self):
            if not self.crash.is_set():
                return super().step()
            self.inside.set()
            deadline = time.time() + 10  # the late request is queued during this (long) step
            while server.engine.pending < 2 and time.time() < deadline:
                time.sleep(0.01)
            raise RuntimeError("scheduler bug")

    engine = Crashing(tok, lambda prompt, params: [100 + i % 50 for i in range(200)], step_delay=0.02)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL))
    server = app.state.server
    deaths = []
    server.engine.on_death = deaths.append  # what `nanoseek serve` stops on (exit status 1)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 100}
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        first = {}
        t = threading.Thread(target=lambda: first.update(r=c.post("/v1/completions", json=body)))
        t.start()
        while not engine.has_unfinished():
            time.sleep(0.01)
        engine.crash.set()
        assert engine.inside.wait(5)
        late = c.post("/v1/completions", json=body)  # timed out (no answer ever came)
        t.join()
        assert "scheduler bug" in _err(first["r"], 500)["message"]
        assert "scheduler bug" in _err(late, 500)["message"]
        assert c.get("/health").status_code == 503
        score = c.post("/v1/completions", json={**body, "max_tokens": 0, "echo": True, "logprobs": 1})
        assert _err(score, 503)["code"] == "engine_unavailable"  # timed out too
        assert "scheduler bug" in _err(score, 503)["message"]  # what stopped it, not "None"
    assert [str(e) for e in deaths] == ["scheduler bug"]


def test_a_client_that_leaves_while_its_prompts_are_scored_stops_the_scoring(tok, monkeypatch):
    """echo + logprobs scoring runs on the engine thread and writes nothing until it ends: a client that
    gives up (an lm-eval timeout, then a retry) had it run on to the end, slowing every stream."""
    from nanoseek.serve.async_engine import AsyncEngine

    def endless(self, prompts, top_k):  # a scoring that outlasts any client's patience
        while True:
            time.sleep(0.01)
            yield

    monkeypatch.setattr(AsyncEngine, "_score", endless)
    app = create_app(ScriptedEngine(tok), tok, ServeConfig(model_name=MODEL))
    engine = app.state.server.engine
    with LiveServer(app) as srv:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 1}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json=body, timeout=0.5)
        deadline = time.time() + 5
        while engine._scoring and time.time() < deadline:
            time.sleep(0.05)
        assert not engine._scoring
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200


def test_an_app_serves_again_after_its_server_stopped(tok):
    """One app served twice (a TestClient per test, `uvicorn.run(app)` again in a notebook): its second
    start was a RuntimeError (a thread starts only once), and no engine thread is left behind."""
    engine = ScriptedEngine(tok, lambda prompt, params: tok.encode(ANSWER))
    app = create_app(engine, tok, ServeConfig(model_name=MODEL))
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 50}
    before = set(threading.enumerate())  # (the module's other servers run their own)
    for _ in range(2):
        with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
            assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == ANSWER
    assert not app.state.server.engine.alive
    assert [t for t in set(threading.enumerate()) - before if t.name == "nanoseek-engine"] == []


def test_prompt_scoring_is_interleaved_with_generation(tok, model, monkeypatch):
    """A long prompt-scoring request (lm-eval's loglikelihood batches) runs a batch at a time between
    engine steps: a stream beside it goes on (it ran whole between two steps; every stream stalled)."""
    log = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (log.append("score"), forward(*a, **k))[1])

    class Logging(ScriptedEngine):
        def step(self):
            log.append("step")
            return super().step()

    engine = Logging(tok, lambda prompt, params: [100 + i % 50 for i in range(250)], step_delay=0.02)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL), model=model)
    prompts = [[1] + [5 + (i + j) % 300 for j in range(100)] for i in range(200)]  # 3 batches of 8192 tokens
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 250, "stream": True}
    scoring = {"model": MODEL, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1}
    with (
        LiveServer(app) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
        c.stream("POST", "/v1/completions", json=body) as s,
    ):
        lines = s.iter_lines()  # held: a closed iterator closes the stream
        assert next(line for line in lines if line.startswith("data:"))  # generating
        scored = c.post("/v1/completions", json=scoring)
    assert scored.status_code == 200 and len(scored.json()["choices"]) == 200
    batches = [i for i, what in enumerate(log) if what == "score"]
    assert len(batches) == 3 and "step" in log[batches[0] : batches[-1]]


def test_completions_non_finite_logprob_is_an_error_not_invalid_json(tok, model):
    """A completion's body is encoded as every other answer: a NaN logprob (a broken model) is a 500, as in
    chat completions, never a body with a bare NaN, which is no JSON (a browser's JSON.parse refuses it)."""
    broken = DeepSeekV3(model.config).init_weights(0).eval()
    with torch.no_grad():
        broken.lm_head.weight[5].fill_(float("nan"))
    app = create_app(Engine(broken, max_batch_size=4, max_seq_len=256), tok, ServeConfig(model_name=MODEL))
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 1, "logprobs": 2, "echo": True}
    with LiveServer(app) as srv:
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
    assert "NaN" not in r.text
    assert "not JSON compliant" in _err(r, 500)["message"]


def test_a_streamed_non_finite_logprob_is_an_in_band_error_not_invalid_json(tok, model):
    """Streamed as answered whole: a NaN logprob (a broken model) ends the stream with a server_error event,
    never a chunk with a bare NaN, which no JSON parser (the openai client's included) reads."""
    broken = DeepSeekV3(model.config).init_weights(0).eval()
    with torch.no_grad():
        broken.lm_head.weight[5].fill_(float("nan"))
    app = create_app(Engine(broken, max_batch_size=4, max_seq_len=256), tok, ServeConfig(model_name=MODEL))
    with LiveServer(app) as srv:
        for error in _streamed_errors(srv.url, max_tokens=2):
            assert error["type"] == "server_error" and "not JSON compliant" in error["message"]


def _streamed_errors(url: str, max_tokens: int) -> list[dict]:
    """The last event's error of a streamed chat and a streamed completion asking for logprobs, after
    checking the stream ends with [DONE] and every event is JSON (no bare NaN)."""
    chat = {"model": MODEL, "messages": USER, "max_tokens": max_tokens, "logprobs": True, "stream": True}
    completion = {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "logprobs": 2, "stream": True}
    errors = []
    for path, body in [("/v1/chat/completions", chat), ("/v1/completions", completion)]:
        r = httpx.post(url + path, json=body, timeout=60)
        events = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        errors.append([json.loads(e, parse_constant=pytest.fail) for e in events[:-1]][-1]["error"])
    return errors


def test_a_failure_of_the_servers_own_mid_stream_is_an_in_band_error_not_a_cut_connection(tok, monkeypatch):
    """Any exception after a stream's 200, not only an APIError, is sent as vLLM sends it: a server_error event
    then [DONE]. Raised out of the body it cut the connection (the openai client: "incomplete chunked read"),
    and the request's engine work is freed all the same."""
    engine = ScriptedEngine(tok, lambda prompt, params: [100 + i % 50 for i in range(200)])
    app = create_app(engine, tok, ServeConfig(model_name=MODEL))
    server = app.state.server

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server, "chat_logprobs", boom)
    monkeypatch.setattr(server, "legacy_logprobs", boom)
    with LiveServer(app) as srv:
        for error in _streamed_errors(srv.url, max_tokens=200):
            assert error["type"] == "server_error" and "RuntimeError: a bug" in error["message"]
        deadline = time.time() + 5
        while (server.engine.pending or engine.has_unfinished()) and time.time() < deadline:
            time.sleep(0.02)
        assert server.engine.pending == 0 and not engine.has_unfinished()


def test_completions_lm_eval_loglikelihood(real, tok, model):
    """Exactly the body lm-evaluation-harness local-completions sends for loglikelihood."""
    ctx = tok.encode("First, 2 + 2", add_bos=True)
    cont = tok.encode(" = 4")
    body = {
        "model": MODEL,
        "prompt": [ctx + cont],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "echo": True,
        "seed": 1234,
    }
    out = httpx.post(real.url + "/v1/completions", json=body, timeout=60).json()
    choice = out["choices"][0]
    lp = choice["logprobs"]
    n = len(ctx) + len(cont)
    assert len(lp["token_logprobs"]) == n + 1 and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None and len(lp["tokens"]) == n + 1
    # Reference: the model's own log-softmax over the same ids.
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        ref = torch.log_softmax(model(ids)[0].float(), -1)
    for i in range(1, n):
        assert lp["token_logprobs"][i] == pytest.approx(ref[i - 1, ids[0, i]].item(), abs=1e-4)
    # lm-eval's parse: sum over the continuation, greedy check against the top alternatives.
    ctxlen = len(ctx)
    cont_lps = lp["token_logprobs"][ctxlen:-1]
    assert sum(cont_lps) == pytest.approx(
        ref[ctxlen - 1 : n - 1].gather(1, ids[0, ctxlen:, None]).sum().item(), abs=1e-3
    )
    for i, (tok_lp, top) in enumerate(zip(cont_lps, lp["top_logprobs"][ctxlen:-1], strict=True)):
        is_greedy = ref[ctxlen - 1 + i].argmax().item() == ids[0, ctxlen + i].item()
        assert (tok_lp == max(top.values())) == is_greedy
    assert choice["text"].startswith(tok.decode(ctx + cont))
    assert out["usage"]["completion_tokens"] == 1
    # a batch of prompts of different lengths (scored together, right-padded) gives the same numbers
    other = tok.encode("We check the sum again: one plus one is two", add_bos=True)
    batch = httpx.post(
        real.url + "/v1/completions", json={**body, "prompt": [other, ctx + cont]}, timeout=60
    ).json()
    again = batch["choices"][1]["logprobs"]["token_logprobs"][:n]
    assert again == pytest.approx(lp["token_logprobs"][:n], abs=1e-4)
    assert len(batch["choices"][0]["logprobs"]["token_logprobs"]) == len(other) + 1


def test_completions_top_logprobs_keep_the_best_of_tokens_that_print_alike(real, tok, model):
    """Byte pieces of a multi-byte character all print as U+FFFD: the top_logprobs dict (keyed by text)
    keeps the best one's value, so its max is the position's best log-prob (lm-eval's is_greedy)."""
    ids = tok.encode("First, 2 + 2 = 4", add_bos=True)
    body = {"model": MODEL, "prompt": [ids], "max_tokens": 0, "echo": True, "logprobs": 5}
    lp = httpx.post(real.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    alike = 0
    for i in range(1, len(ids)):
        best = ref[i - 1].topk(5).indices.tolist()
        alike += len(best) - len({tok.decode([t]) for t in best})
        assert max(lp["top_logprobs"][i].values()) == pytest.approx(ref[i - 1].max().item(), abs=1e-4)
    assert alike > 0  # the case is exercised


def test_completions_logprobs_are_built_off_the_event_loop(real, monkeypatch):
    """lm-eval's loglikelihood batches score hundreds of thousands of tokens: decoding them into
    logprobs and encoding the body takes seconds, which on the event loop stalled every other client."""
    import asyncio

    from nanoseek.serve.app import Server

    on_loop = []
    built = Server.legacy_logprobs

    def legacy_logprobs(self, *a, **kw):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return built(self, *a, **kw)

    monkeypatch.setattr(Server, "legacy_logprobs", legacy_logprobs)
    body = {"model": MODEL, "prompt": ["Hello world", "2 + 2"], "max_tokens": 2, "echo": True, "logprobs": 2}
    r = httpx.post(real.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    assert on_loop == [False, False]


def test_completions_text_offset_indexes_the_choice_text(real, tok):
    """text_offset is where each token starts in the choice's text: the BOS added to a text prompt holds
    none of it, a byte piece of a character starts at that character, and a stream's offsets run over the
    whole text as the non-streamed ones do."""
    text = "数学は楽しい。 Hello"
    ids = tok.encode(text, add_bos=True)
    table = tok.token_bytes()
    assert any(
        len(table[t].decode("utf-8", "replace")) != len(table[t].decode("utf-8", "ignore")) for t in ids
    )
    body = {"model": MODEL, "prompt": text, "max_tokens": 3, "echo": True, "logprobs": 1, "temperature": 0}
    choice = httpx.post(real.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    offsets = choice["logprobs"]["text_offset"]
    prompt_offsets = [0] + [
        len(b"".join(table[t] for t in ids[1:i]).decode("utf-8", "ignore")) for i in range(1, len(ids))
    ]
    assert offsets[: len(ids)] == prompt_offsets
    assert offsets[len(ids)] == len(text) and choice["text"].startswith(text)
    assert offsets == sorted(offsets) and offsets[-1] < len(choice["text"])
    # token ids echo their decoded text (BOS included): offsets index that text
    by_ids = httpx.post(real.url + "/v1/completions", json={**body, "prompt": ids}, timeout=60).json()
    lp = by_ids["choices"][0]["logprobs"]
    assert (
        lp["text_offset"][1] == len(tok.decode(ids[:1]))
        and lp["tokens"][-4:] == choice["logprobs"]["tokens"][-4:]
    )
    streamed = []
    with httpx.stream("POST", real.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    streamed += (c["logprobs"] or {}).get("text_offset", [])
    assert streamed == offsets


def test_a_text_prompt_that_starts_with_the_bos_gets_no_second_one(real, tok):
    """A prompt rendered with its BOS (a chat template's text, lm-eval's `add_bos_token=True` requests sent
    as text) is scored as its own tokens: the server added another BOS before it, and every log-prob
    changed."""
    ids = tok.encode("First, 2 + 2 = 4", add_bos=True)
    text = tok.decode(ids)
    assert text.startswith(tok.bos_token)
    body = {"model": MODEL, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1}
    lp = httpx.post(real.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    by_ids = httpx.post(real.url + "/v1/completions", json={**body, "prompt": [ids]}, timeout=60).json()
    assert lp == by_ids["choices"][0]["logprobs"]  # tokens, log-probs and text offsets alike
    counted = httpx.post(real.url + "/tokenize", json={"model": MODEL, "prompt": text}, timeout=60).json()
    assert counted["tokens"] == ids


def test_completions_prompt_forms_echo_and_max_tokens(real, tok):
    c = real.client
    one = c.completions.create(model=MODEL, prompt="Hello world", max_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"
    batch = c.completions.create(
        model=MODEL, prompt=["Hello", "The answer"], max_tokens=2, temperature=0, n=2
    )
    assert [ch.index for ch in batch.choices] == [0, 1, 2, 3]
    ids = tok.encode("Hello world", add_bos=True)
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0)
    assert by_ids.choices[0].text == one.choices[0].text
    zero = c.completions.create(model=MODEL, prompt="Hello world", max_tokens=0, echo=True, logprobs=2)
    assert zero.choices[0].text == "Hello world" and zero.usage.completion_tokens == 0
    assert len(zero.choices[0].logprobs.token_logprobs) == len(ids)
    sampled = [
        c.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=1.0, seed=3) for _ in "ab"
    ]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text  # a seed makes sampling reproducible
    plain = c.completions.create(model=MODEL, prompt="Hello world", max_tokens=0)
    assert plain.choices[0].text == ""
    # stream == non-stream (greedy), echo included
    full = c.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, temperature=0, echo=True)
    chunks = list(
        c.completions.create(
            model=MODEL, prompt="Hello world", max_tokens=5, temperature=0, echo=True, stream=True
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text


def test_echoed_prompt_text_offsets_follow_the_decoder(tok):
    # The echoed prompt's text offsets read the decoder's length after every token; the decoder keeps its
    # text in pieces with a running count (growing one string by copying it made a 320k-token prompt
    # take over a minute), and the count must stay the text's length.
    from nanoseek.serve.async_engine import PromptScore

    server = create_app(ScriptedEngine(tok), tok, ServeConfig(model_name=MODEL)).state.server
    ids = tok.encode("The answer is 4. Let me think step by step. 数学は楽しい。 " * 200)
    score = PromptScore(logprobs=[None] + [-1.0] * (len(ids) - 1), top=[None] * len(ids))
    lp = server.legacy_logprobs(ids, score, [], 0)
    assert lp["text_offset"][-1] == len(tok.decode(ids[:-1]))
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_completions_streamed_text_offset_goes_on_across_chunks(real):
    """Each streamed chunk's text_offset continues the last one's, as vLLM's do: together they are the
    whole response's (they restarted at 0 in every chunk)."""
    kw = dict(model=MODEL, prompt="Hello world", max_tokens=5, temperature=0, logprobs=1, echo=True)
    full = real.client.completions.create(**kw).choices[0].logprobs
    chunks = list(real.client.completions.create(**kw, stream=True))
    lps = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert len(lps) > 2
    assert [o for lp in lps for o in lp.text_offset] == full.text_offset
    assert [t for lp in lps for t in lp.tokens] == full.tokens


def test_tokenize_adds_no_bos_a_vocabulary_lacks(tok):
    """A vocabulary without BOS (Qwen2.5-Instruct's "bos_token": null) puts nothing before a text prompt
    in /v1/completions; /tokenize with add_special_tokens put the guessed <|endoftext|> there anyway,
    so its count was one over what the prompt used (transformers adds nothing either)."""
    import copy

    bare = copy.copy(tok)
    bare.add_bos_token = False
    seen: list[list[int]] = []
    engine = ScriptedEngine(bare, lambda prompt, params: (seen.append(list(prompt)), bare.encode(" ok"))[1])
    with LiveServer(create_app(engine, bare, ServeConfig(model_name=MODEL))) as srv:
        body = {"prompt": "Hello world", "add_special_tokens": True}
        counted = httpx.post(srv.url + "/tokenize", json=body).json()
        used = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hello world", "max_tokens": 2}).json()
    assert counted["tokens"] == seen[0] == bare.encode("Hello world")
    assert counted["count"] == used["usage"]["prompt_tokens"]


def test_tokenize_counts_a_text_prompt_as_completions_uses_it(scripted, tok):
    """/tokenize's add_special_tokens defaults to true for a prompt, as vLLM's does: the count is the
    prompt_tokens /v1/completions reports for the same text (it was one short: no BOS)."""
    counted = httpx.post(scripted.url + "/tokenize", json={"prompt": "Hello world"}).json()
    used = httpx.post(
        scripted.url + "/v1/completions", json={"prompt": "Hello world", "max_tokens": 1}
    ).json()
    assert counted["tokens"] == [tok.bos_token_id, *tok.encode("Hello world")]
    assert counted["count"] == used["usage"]["prompt_tokens"]


def test_tokenizer_routes(real, tok):
    info = httpx.get(real.url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token and info["chat_template"]
    r = httpx.post(real.url + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert (
        r["tokens"] == tok.encode("Hello world")
        and r["count"] == len(r["tokens"])
        and r["max_model_len"] == 256
    )
    back = httpx.post(real.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == "Hello world"
    chat = httpx.post(real.url + "/tokenize", json={"messages": USER}).json()
    assert chat["tokens"] == tok.apply_chat_template(USER, tokenize=True)
    # counted as the chat request renders them: thinking off, tools
    off = {"messages": USER, "chat_template_kwargs": {"thinking": False}}
    counted = httpx.post(real.url + "/tokenize", json=off).json()["count"]
    used = real.client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=1, extra_body={"chat_template_kwargs": {"thinking": False}}
    )
    assert counted == used.usage.prompt_tokens != chat["count"]


# ----------------------------------------------------------------------- errors
def _err(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_errors_400(real):
    url = real.url + "/v1/chat/completions"
    err = _err(
        httpx.post(
            url, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}
        ),
        400,
    )
    assert "JSON" in err["message"]
    assert (
        _err(httpx.post(url, json={"model": MODEL, "messages": USER, "temperature": 3}), 400)["param"]
        == "temperature"
    )
    assert _err(httpx.post(url, json={"model": MODEL}), 400)["param"] == "messages"
    assert (
        _err(httpx.post(url, json={"messages": [{"role": "robot", "content": "x"}]}), 400)["param"]
        == "messages.0.role"
    )
    assert _err(httpx.post(url, json={"messages": USER, "n": 0}), 400)["param"] == "n"
    assert _err(httpx.post(url, json={"messages": USER, "stop": 5}), 400)["param"] == "stop"
    tool = {"type": "function", "function": {"parameters": {}}}  # no name
    assert _err(httpx.post(url, json={"messages": USER, "tools": [tool]}), 400)["param"] == (
        "tools.0.function.name"
    )
    curl = real.url + "/v1/completions"
    assert _err(httpx.post(curl, json={"prompt": [[999999]]}), 400)["param"] == "prompt"
    assert _err(httpx.post(curl, json={"prompt": "x", "max_tokens": -1}), 400)["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        real.client.chat.completions.create(model=MODEL, messages=USER, top_p=0)
    assert e.value.body["param"] == "top_p"
    # half of a UTF-16 pair, as a truncated emoji from a JavaScript client sends it: 400, not 500
    for route, body in [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x \\ud83d"}]}'),
        ("/tokenize", b'{"prompt": "\\ud800"}'),
    ]:
        r = httpx.post(real.url + route, content=body, headers={"content-type": "application/json"})
        assert "surrogate" in _err(r, 400)["message"]
    assert (
        _err(httpx.post(url, json={"messages": USER, "logit_bias": {"x": 1}}), 400)["param"] == "logit_bias"
    )
    for token in ("99999", "-1"):  # outside the vocabulary either side (-1 is no "last token")
        bias = {"messages": USER, "logit_bias": {token: 1}}
        assert _err(httpx.post(url, json=bias), 400)["param"] == "logit_bias", token
    assert (
        "[-100, 100]"
        in _err(httpx.post(url, json={"messages": USER, "logit_bias": {"5": 101}}), 400)["message"]
    )


def test_a_malformed_content_part_is_named_and_a_text_part_needs_its_text(scripted):
    """A content part whose text is missing (a typo of its key) was read as "" and answered as an empty message;
    one whose text is no string was reported as `content` having to be a string, which parts need not be."""
    url = scripted.url + "/v1/chat/completions"

    def part(p: dict) -> dict:
        return {"messages": [{"role": "user", "content": [p]}], "max_tokens": 1}

    for p in ({"type": "text", "content": "hi"}, {"type": "text", "text": None}):
        err = _err(httpx.post(url, json=part(p)), 400)
        assert err["param"] == "messages.0.content.0" and "'text'" in err["message"], p
    err = _err(httpx.post(url, json=part({"type": "text", "text": 5})), 400)
    assert err["param"] == "messages.0.content.0.text"
    # a string, and a part with its text, are as before
    assert _err(httpx.post(url, json={"messages": [{"role": "user", "content": 5}]}), 400)["param"] == (
        "messages.0.content"
    )
    assert httpx.post(url, json=part({"type": "text", "text": "hi"})).status_code == 200


def test_sampling_values_the_engine_refuses_name_their_parameter(scripted):
    """Values the request's own bounds let through and the engine's check refuses (a logit_bias beyond
    [-100, 100], a repetition_penalty beyond float32) are 400s naming their parameter, not param null."""
    url = scripted.url + "/v1/chat/completions"
    for extra, param in [
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"repetition_penalty": 1e39}, "repetition_penalty"),
    ]:
        assert _err(httpx.post(url, json={"messages": USER, **extra}), 400)["param"] == param, extra
    curl = scripted.url + "/v1/completions"
    body = {"prompt": "x", "logit_bias": {"5": -101}}
    assert _err(httpx.post(curl, json=body), 400)["param"] == "logit_bias"


def test_a_number_too_long_for_python_is_a_400_not_a_500(scripted):
    """Python reads and prints integers of at most 4300 digits: a longer one anywhere in the body, or a
    max_tokens of 4300 digits (the context-length message printed it plus the prompt), was a 500."""
    chat = b'{"messages": [{"role": "user", "content": "hi"}], '
    for route, body, param in [
        ("/v1/chat/completions", chat + b'"seed": ' + b"1" * 5000 + b"}", None),
        ("/detokenize", b'{"tokens": [' + b"9" * 4400 + b"]}", None),
        ("/v1/chat/completions", chat + b'"max_tokens": ' + b"9" * 4300 + b"}", "max_tokens"),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": ' + b"9" * 4300 + b"}", "max_tokens"),
    ]:
        r = httpx.post(scripted.url + route, content=body, headers={"content-type": "application/json"})
        assert _err(r, 400)["param"] == param, (route, param)
    ok = {"messages": USER, "max_tokens": 2}
    assert httpx.post(scripted.url + "/v1/chat/completions", json=ok).status_code == 200


def test_null_means_the_default(scripted):
    """OpenAI's spec makes n, stream, logprobs, echo and include_usage nullable, and the openai client sends
    `null` for an argument given as None: they take their defaults (each was a 400)."""
    c = scripted.client
    r = c.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=2, n=None, logprobs=None, stream=None
    )
    assert len(r.choices) == 1 and r.choices[0].logprobs is None and r.usage.completion_tokens == 2
    chunks = list(
        c.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=2, stream=True, stream_options={"include_usage": None}
        )
    )
    assert chunks[-1].choices and all(ch.usage is None for ch in chunks)
    done = c.completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=None, echo=None, stream=None)
    assert done.choices[0].text and not done.choices[0].text.startswith("Hi")
    # a required field sent as null is still missing
    err = _err(httpx.post(scripted.url + "/v1/chat/completions", json={"messages": None}), 400)
    assert err["param"] == "messages" and err["code"] == "missing_required_parameter"


def test_request_bounds_are_openais(scripted):
    """The validators' bounds, each side: OpenAI's top_logprobs 0..20 (and only with logprobs), at most 16
    stop strings (none empty: "" would stop everything or nothing), a chat's max_tokens of at least 1, the
    penalties in [-2, 2], a completions prompt that is not an empty list (nothing to generate or not), and
    what the server does not do (best_of other than n, suffix) refused, each naming its parameter."""
    url = scripted.url + "/v1/chat/completions"
    base = {"messages": USER, "max_tokens": 1}
    for extra, param in [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": ["x", ""]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ]:
        assert _err(httpx.post(url, json={**base, **extra}), 400)["param"] == param, extra
    ok = {**base, "logprobs": True, "top_logprobs": 20, "stop": [f"s{i}" for i in range(16)]}
    assert httpx.post(url, json=ok).status_code == 200
    curl = scripted.url + "/v1/completions"
    for body, param in [
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [[]], "max_tokens": 0}, "prompt"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
    ]:
        assert _err(httpx.post(curl, json=body), 400)["param"] == param, body
    assert httpx.post(curl, json={"prompt": "x", "max_tokens": 1, "n": 2, "best_of": 2}).status_code == 200


def test_sampling_bounds_each_side_and_tool_names(scripted):
    """Every sampling bound at its edge is accepted and one step past it is a 400 naming the field:
    OpenAI's temperature [0, 2], top_p (0, 1], penalties [-2, 2], n up to 64, logprobs up to 20;
    vLLM's top_k -1 (off), min_p [0, 1], repetition_penalty > 0. A function name is OpenAI's: 1 to 64
    of [A-Za-z0-9_.-]; a tool call the client sends back needs a name; messages and token-id prompts
    are never empty."""
    url = scripted.url + "/v1/chat/completions"
    base = {"messages": USER, "max_tokens": 1}
    edges = [
        ("temperature", 2.0, 2.01),
        ("top_p", 1.0, 1.01),
        ("top_k", -1, -2),
        ("min_p", 1.0, 1.01),
        ("repetition_penalty", 0.01, 0.0),
        ("presence_penalty", 2.0, 2.01),
        ("presence_penalty", -2.0, -2.01),
        ("frequency_penalty", 2.0, 2.01),
        ("frequency_penalty", -2.0, -2.01),
        ("n", 64, 65),
        ("max_completion_tokens", 1, 0),
    ]
    for field, ok, bad in edges:
        assert httpx.post(url, json={**base, field: ok}).status_code == 200, (field, ok)
        assert _err(httpx.post(url, json={**base, field: bad}), 400)["param"] == field, (field, bad)
    curl = scripted.url + "/v1/completions"
    assert httpx.post(curl, json={"prompt": "x", "max_tokens": 1, "logprobs": 20}).status_code == 200
    # no max_tokens: OpenAI's 16
    r = httpx.post(curl, json={"prompt": "LONG"}).json()
    assert r["usage"]["completion_tokens"] == 16 and r["choices"][0]["finish_reason"] == "length"
    # max_tokens null: vLLM's "up to the context", here the whole scripted reply
    r = httpx.post(curl, json={"prompt": "x", "max_tokens": None}).json()
    assert r["usage"]["completion_tokens"] > 16 and r["choices"][0]["finish_reason"] == "stop"
    for body, param in [
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": [[5], []]}, "prompt"),  # one empty token-id prompt among others
    ]:
        assert _err(httpx.post(curl, json=body), 400)["param"] == param, body
    assert _err(httpx.post(url, json={**base, "messages": []}), 400)["param"] == "messages"

    def tool(name: str) -> dict:
        return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}

    tokenize = scripted.url + "/tokenize"  # validates tools as chat does, without the context limit
    longest = "a." + "b_-" * 20 + "cd"  # 64 characters
    assert httpx.post(tokenize, json={"messages": USER, "tools": [tool(longest)]}).status_code == 200
    for name in (longest + "d", "get weather", ""):
        err = _err(httpx.post(tokenize, json={"messages": USER, "tools": [tool(name)]}), 400)
        assert err["param"] == "tools.0.function.name", name
    call = {"type": "function", "function": {"name": "", "arguments": "{}"}}
    history = [*USER, {"role": "assistant", "tool_calls": [call]}, {"role": "user", "content": "and?"}]
    err = _err(httpx.post(url, json={**base, "messages": history}), 400)
    assert err["param"] == "messages.1.tool_calls.0.function.name"


def test_logit_bias(real):
    kw = {"model": MODEL, "messages": USER, "max_tokens": 6, "temperature": 0}
    plain = real.client.chat.completions.create(**kw, logprobs=True)
    first = plain.choices[0].logprobs.content[0]
    bare = {"add_special_tokens": False}  # the text's own ids, no BOS
    ids = httpx.post(real.url + "/tokenize", json={"prompt": first.token, **bare}).json()["tokens"]
    # -100 on the greedy first token moves the choice; +100 on another token makes it the only one
    banned = real.client.chat.completions.create(**kw, logprobs=True, logit_bias={str(ids[0]): -100})
    assert banned.choices[0].logprobs.content[0].token != first.token
    forced = real.client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=4, temperature=1.0, seed=1, logit_bias={"7": 100}
    )
    assert (
        httpx.post(real.url + "/tokenize", json={"prompt": forced.choices[0].text, **bare}).json()["tokens"]
        == [7] * 4
    )


def test_errors_context_length_and_404(real):
    with pytest.raises(openai.BadRequestError) as e:
        real.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello " * 400}]
        )
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        real.client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=300)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        real.client.completions.create(model=MODEL, prompt="Hello", max_tokens=1000)
    assert e.value.code == "context_length_exceeded"
    # a prompt that fills the context can still be scored (lm-evaluation-harness's rolling windows)...
    full = [1] + [5] * 255
    r = real.client.completions.create(model=MODEL, prompt=full, max_tokens=0, echo=True, logprobs=0)
    assert len(r.choices[0].logprobs.token_logprobs) == 256
    # ...but not continued: the message says what it needs
    with pytest.raises(openai.BadRequestError) as e:
        real.client.completions.create(model=MODEL, prompt=full, max_tokens=None)
    assert e.value.code == "context_length_exceeded" and "at least 1 to generate" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        real.client.chat.completions.create(model="gpt-9", messages=USER)
    assert e.value.code == "model_not_found"
    assert _err(httpx.get(real.url + "/v1/nothing"), 404)["type"] == "invalid_request_error"
    r = httpx.delete(real.url + "/v1/models")  # a 405 says which methods the route takes
    assert _err(r, 405)["type"] == "invalid_request_error"
    assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    # ... and the server is still up and answering
    assert real.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1).choices


def test_a_request_the_cache_can_never_hold_is_refused_and_not_counted(tok, model):
    # 7 usable blocks of 16 tokens: 100 prompt + 50 completion tokens can never fit (a 400, not a wait)
    engine = Engine(model, max_seq_len=256, num_blocks=8)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL), model=model)
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=[5] * 100, max_tokens=50)
        assert e.value.code == "context_length_exceeded"
        assert app.state.server.engine.pending == 0  # its slot is free again (else, in time, 429 for all)
        r = client.completions.create(model=MODEL, prompt=[5] * 10, max_tokens=2)  # the queue goes on
        metrics = httpx.get(srv.url + "/metrics").text
    # the Prometheus counters agree with the usage the clients got back
    assert f"nanoseek:prompt_tokens_total {float(r.usage.prompt_tokens)}" in metrics
    assert f"nanoseek:generation_tokens_total {float(r.usage.completion_tokens)}" in metrics


def test_the_context_advertised_is_what_the_engines_cache_holds(tok, model):
    # an Engine built with 7 blocks of 16 holds 112 tokens of one request, less than its max_seq_len of 256:
    # the server says so, refuses a longer request with a 400 before a stream's 200, and gives a request
    # without max_tokens the room the cache has (it was refused, whatever its length)
    engine = Engine(model, num_blocks=8)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL), model=model)
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        assert client.models.list().data[0].max_model_len == 112
        r = httpx.post(
            srv.url + "/v1/completions",
            json={"model": MODEL, "prompt": [5] * 100, "max_tokens": 50, "stream": True},
        )
        assert _err(r, 400)["code"] == "context_length_exceeded" and "112 tokens" in r.text
        r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0)
        assert 0 < r.usage.total_tokens <= 112


def test_api_key(tok):
    engine = ScriptedEngine(tok)
    defaults = {"temperature": 0.6, "top_p": 0.95}  # as nanoseek serve reads them from generation_config.json
    app = create_app(engine, tok, ServeConfig(model_name=MODEL, api_key="s3cret", sampling_defaults=defaults))
    with LiveServer(app) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        assert _err(httpx.get(srv.url + "/v1/models"), 401)["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert (
            good.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).choices[0].finish_reason
            == "length"
        )
        # the page itself is static (its scripts too: the browser loads them without the key); its calls carry it
        for path in ("/", "/static/chat.js", "/static/markdown.js"):
            assert httpx.get(srv.url + path).status_code == 200, path
        params = engine.added[-1][1]
        assert (params.temperature, params.top_p) == (0.6, 0.95)  # defaults fill what the request left out
        good.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)
        assert engine.added[-1][1].temperature == 0.0


def test_a_request_without_max_tokens_generates_the_checkpoints_max_new_tokens(tok):
    """generation_config.json's max_new_tokens is max_tokens for a request that leaves it out, as vLLM's
    server reads it (it was ignored: every such request could run to the end of the context), within the
    room the context leaves; a request's own max_tokens wins, above it too."""
    engine = ScriptedEngine(tok, max_seq_len=64)
    defaults = {"temperature": 0.0, "max_new_tokens": 5}  # as nanoseek serve reads them from the file
    app = create_app(engine, tok, ServeConfig(model_name=MODEL, sampling_defaults=defaults))
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=USER)
        assert engine.added[-1][1].max_new_tokens == 5 and r.usage.completion_tokens == 5
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=9)
        assert engine.added[-1][1].max_new_tokens == 9
        # /v1/completions: its max_tokens null (left out it is OpenAI's 16, as in vLLM)
        client.completions.create(model=MODEL, prompt=[5] * 10, max_tokens=None)
        assert engine.added[-1][1].max_new_tokens == 5
        client.completions.create(model=MODEL, prompt=[5] * 61, max_tokens=None)  # 3 tokens of room left
        assert engine.added[-1][1].max_new_tokens == 3


def test_queue_full_429_and_disconnect_aborts(tok):
    # 10 s of tokens per request unless aborted: the test's clients hang up long before that.
    engine = ScriptedEngine(tok, lambda prompt, params: [100 + i % 50 for i in range(200)], step_delay=0.05)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL, max_pending=2, retry_after=3))
    with LiveServer(app) as srv:
        server = app.state.server
        body = {"model": MODEL, "messages": USER, "max_tokens": 200, "stream": True}
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with (
                c.stream("POST", "/v1/chat/completions", json=body) as s1,
                c.stream("POST", "/v1/chat/completions", json=body) as s2,
            ):
                lines = s1.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                assert s2.status_code == 200
                r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False})
                assert _err(r, 429)["code"] == "rate_limit_exceeded"
                assert r.headers["retry-after"] == "3"
                metrics = c.get("/metrics").text  # the refusal is counted, as a 429 of its route
                assert "nanoseek:requests_rejected_total 1.0" in metrics
                assert 'nanoseek:requests_total{route="/v1/chat/completions",status="429"} 1.0' in metrics
                # more than the server ever holds: no retry can succeed, so 400 naming n, not 429
                r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False, "n": 3})
                assert _err(r, 400)["param"] == "n"
            # both clients hung up mid-stream: their requests must be aborted at once
            deadline = time.time() + 5
            while (server.engine.pending or engine.has_unfinished()) and time.time() < deadline:
                time.sleep(0.02)
            assert server.engine.pending == 0 and not engine.has_unfinished()
            assert len(engine.aborted) == 2
            ok = c.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
            assert ok.status_code == 200
            # a non-streaming client that gives up (timeout) is noticed too
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
            deadline = time.time() + 5
            while engine.has_unfinished() and time.time() < deadline:
                time.sleep(0.02)
            assert not engine.has_unfinished() and len(engine.aborted) == 3


def test_a_stream_of_n_choices_that_disconnects_frees_them_all(tok):
    engine = ScriptedEngine(tok, lambda prompt, params: [100 + i % 50 for i in range(200)], step_delay=0.05)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL))
    server = app.state.server
    body = {"model": MODEL, "messages": USER, "max_tokens": 200, "n": 3, "stream": True}
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as s:
            lines = s.iter_lines()  # held: a dropped iterator closes the connection
            assert next(line for line in lines if line.startswith("data:"))
            assert _running(c, 3)  # /metrics follows the engine
        assert _running(c, 0)  # ...also once it is idle: the 3 were freed at once, not left running
        assert server.engine.pending == 0 and not engine.has_unfinished() and len(engine.aborted) == 3
        # counted as vLLM counts a request its client left: finished_reason "abort", one per choice
        assert 'nanoseek:request_success_total{finished_reason="abort"} 3.0' in c.get("/metrics").text


def _running(c: httpx.Client, n: int) -> bool:
    """Whether /metrics comes to show n requests running within 5 s (its snapshot is refreshed as the
    engine steps)."""
    deadline = time.time() + 5
    while time.time() < deadline:
        if f"nanoseek:num_requests_running {float(n)}" in c.get("/metrics").text:
            return True
        time.sleep(0.05)
    return False


def test_a_choice_that_hits_a_stop_string_is_freed_while_the_others_go_on(tok):
    # choice 1 (seed 1) says the stop string at once, then would go on for 150 tokens; choice 0 runs 150
    filler = tok.encode(" and so on") * 50
    text = tok.encode("The end.")

    def reply(prompt, params):
        return (text if params.seed == 1 else []) + filler[:150]

    engine = ScriptedEngine(tok, reply, step_delay=0.005)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 150, "n": 2, "seed": 0, "stop": ["end"]}
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/completions", json=body).json()
    assert [(ch["text"], ch["finish_reason"]) for ch in r["choices"]][1] == ("The ", "stop")
    assert r["choices"][0]["finish_reason"] == "length"
    # choice 1's engine request was aborted as its stop string showed, not when choice 0 ended
    assert engine.tokens_generated < 150 + 50


# ------------------------------------------------------------ reasoning + stop
def test_reasoning_split_non_stream_and_stream(scripted):
    r = scripted.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=100)
    msg = r.choices[0].message
    assert msg.reasoning_content == REASONING + "\n"
    assert msg.content == ANSWER
    chunks = list(
        scripted.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=100, stream=True)
    )
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (reasoning, content) == (msg.reasoning_content, msg.content)
    assert all("think>" not in (c.choices[0].delta.content or "") for c in chunks)
    # the generation prompt opened <think>: the model never emitted it, the split still works
    prompt_ids, _ = scripted.engine.added[-1]
    assert scripted.client and prompt_ids[-2:] == scripted.engine.tokenizer.encode("<think>\n")[-2:]


def test_usage_counts_the_think_blocks_tokens_as_reasoning_tokens(scripted, tok):
    """DeepSeek's API reports a reasoner's think tokens in usage.completion_tokens_details."""
    thought = len(tok.encode(f"{REASONING}\n</think>"))
    r = scripted.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=100)
    assert r.usage.completion_tokens_details.reasoning_tokens == thought < r.usage.completion_tokens
    last = list(
        scripted.client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=100, stream=True, stream_options={"include_usage": True}
        )
    )[-1]
    assert last.usage.model_dump() == r.usage.model_dump()
    # n choices: summed, as completion_tokens are
    two = scripted.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=100, n=2)
    assert two.usage.completion_tokens_details.reasoning_tokens == 2 * thought
    # cut inside the think block: every token is reasoning
    cut = scripted.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    assert cut.usage.completion_tokens_details.reasoning_tokens == 3
    # the completions endpoint has no think split and no details
    plain = httpx.post(scripted.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).json()
    assert "completion_tokens_details" not in plain["usage"]


def test_a_think_block_the_model_never_closes_is_all_reasoning_tokens(tok):
    # a model that ends (EOS) inside its think block: the EOS, which prints nothing, is a think token too,
    # as every token is when the answer ended inside the block (it was left out: 1 short of completion)
    engine = ScriptedEngine(tok, lambda prompt, params: tok.encode(REASONING))
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=100)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
    assert r.usage.completion_tokens == len(tok.encode(REASONING)) + 1
    assert r.usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens


def test_usage_total_is_prompt_plus_completion(scripted):
    r = scripted.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, n=2)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    c = scripted.client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    assert (
        c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens == c.usage.prompt_tokens + 3
    )
    # a batch of prompts: every prompt's tokens count (OpenAI's and vLLM's usage), not the first's alone
    batch = scripted.client.completions.create(model=MODEL, prompt=[[5, 6, 7], [5, 6, 7, 8, 9]], max_tokens=3)
    assert (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (3 + 5, 2 * 3)


def test_a_stream_ends_with_a_whole_done_event(scripted):
    """Each server-sent event ends with a blank line; an event the stream ends inside of is never dispatched
    (the SSE spec; a browser's EventSource), so the last bytes are exactly OpenAI's terminator."""
    for route, body in [
        ("/v1/chat/completions", {"messages": USER, "max_tokens": 3}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 3}),
    ]:
        r = httpx.post(scripted.url + route, json={**body, "stream": True}, timeout=60)
        assert r.text.endswith("}\n\ndata: [DONE]\n\n"), route


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(scripted):
    """vLLM's `stream_options.continuous_usage_stats` was ignored: every chunk's usage was null."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    for route, extra in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "Hi"})):
        body = {"model": MODEL, "max_tokens": 6, "n": 2, "stream": True, "stream_options": options, **extra}
        chunks = _sse_chunks(scripted.url + route, body)
        final = chunks[-1]["usage"]
        assert final["completion_tokens"] == 12 and not chunks[-1]["choices"]
        so_far = [c["usage"] for c in chunks[:-1]]
        assert all(u["prompt_tokens"] == final["prompt_tokens"] for u in so_far), route
        assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in so_far), route
        counts = [u["completion_tokens"] for u in so_far]
        assert counts == sorted(counts) and counts[-1] == 12, (route, counts)
    # without it, the chunks before the last carry null, as OpenAI's
    body = {
        "model": MODEL,
        "prompt": "Hi",
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = _sse_chunks(scripted.url + "/v1/completions", body)
    assert [c["usage"] is None for c in chunks] == [True] * (len(chunks) - 1) + [False]


def test_sampling_fields_reach_the_engine(scripted):
    """Each sampling field a request sets is its engine request's; n choices with a seed are seeded seed,
    seed + 1, ... (vLLM seeds its n children so): distinct samples, reproducible, not n copies of one."""
    body = {
        "max_tokens": 2,
        "n": 2,
        "seed": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
    }
    fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    fields += ("presence_penalty", "frequency_penalty")
    for route, extra, seeds in (
        ("chat/completions", {"messages": USER}, [7, 8]),
        ("completions", {"prompt": ["a", "b"]}, [7, 8, 7, 8]),
    ):
        assert httpx.post(f"{scripted.url}/v1/{route}", json={**body, **extra}).status_code == 200
        params = [p for _, p in scripted.engine.added[-len(seeds) :]]
        assert [p.seed for p in params] == seeds, route
        assert all({f: getattr(p, f) for f in fields} == {f: body[f] for f in fields} for p in params)


def test_cache_salt_reaches_the_engine_and_an_empty_one_is_refused(scripted):
    """vLLM's `cache_salt` (prefix-cache isolation between tenants) was taken as an unknown field and
    ignored: a tenant relying on it shared its cached prefixes with everyone."""
    for route, extra in (("chat/completions", {"messages": USER}), ("completions", {"prompt": "a"})):
        url = f"{scripted.url}/v1/{route}"
        assert httpx.post(url, json={"max_tokens": 2, "cache_salt": "tenant-a", **extra}).status_code == 200
        assert scripted.engine.added[-1][1].cache_salt == "tenant-a", route
        assert _err(httpx.post(url, json={"cache_salt": "", **extra}), 400)["param"] == "cache_salt"


def test_nothing_generated_finishes_by_length_streamed_too(scripted):
    # max_tokens 0 (lm-eval's prompt scoring): the choice ends by "length" whether streamed or not
    url = scripted.url + "/v1/completions"
    body = {"prompt": "Hi", "max_tokens": 0}
    full = httpx.post(url, json=body).json()["choices"][0]
    assert full["finish_reason"] == "length" and full["text"] == ""
    assert [c["choices"][0]["finish_reason"] for c in _sse_chunks(url, body)] == ["length"]


def test_echoed_text_offsets_of_a_vocabulary_without_bos(tok, model):
    # No BOS goes before a text prompt of a vocabulary that has none (Qwen's): its first token is text,
    # and the echoed prompt's offsets count it
    import copy

    bare = copy.copy(tok)
    bare.add_bos_token = False
    engine = Engine(model, max_seq_len=256)
    with LiveServer(create_app(engine, bare, ServeConfig(model_name=MODEL), model=model)) as srv:
        body = {"prompt": "Hello world", "max_tokens": 0, "echo": True, "logprobs": 0}
        lp = httpx.post(srv.url + "/v1/completions", json=body).json()["choices"][0]["logprobs"]
    ids = bare.encode("Hello world", add_bos=False)
    assert lp["text_offset"] == [len(bare.decode(ids[:i])) for i in range(len(ids))]
    assert lp["text_offset"][1] > 0


def test_an_empty_think_block_is_null_reasoning_content(tok):
    # as vLLM's reasoning parsers and DeepSeek's API: no reasoning is null, not ""
    engine = ScriptedEngine(tok, lambda prompt, params: tok.encode("</think>\n\nHi"))
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL))) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 10}).json()
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "Hi", "reasoning_content": None}


def test_stream_options_without_stream_is_refused_naming_it(scripted):
    body = {"messages": USER, "max_tokens": 2, "stream_options": {"include_usage": True}}
    for path in ("/v1/chat/completions", "/v1/completions"):
        payload = body if "chat" in path else {"prompt": "Hi", **body, "messages": None}
        r = httpx.post(scripted.url + path, json=payload)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
        assert "stream" in r.json()["error"]["message"]
    ok = httpx.post(scripted.url + "/v1/chat/completions", json={**body, "stream_options": None})
    assert ok.status_code == 200


def test_audio_output_and_web_search_are_refused_naming_them(scripted):
    """A text-only model without a search tool cannot answer with audio or search the web: OpenAI refuses
    these for such a model, and ignored (they were) the client waits for `message.audio` or citations that
    never come. Their no-op values, as clients that send every field send them, pass."""
    kw = dict(model=MODEL, messages=USER, max_tokens=2)
    for extra in (
        {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
        {"audio": {"voice": "alloy", "format": "wav"}},
        {"web_search_options": {}},
    ):
        with pytest.raises(openai.BadRequestError) as e:
            scripted.client.chat.completions.create(**kw, **extra)
        assert e.value.body["param"] == next(iter(extra)), extra
    r = scripted.client.chat.completions.create(**kw, modalities=["text"], audio=None)
    assert r.choices[0].finish_reason == "length"
    ok = httpx.post(scripted.url + "/v1/chat/completions", json={**kw, "web_search_options": None})
    assert ok.status_code == 200


def test_a_response_format_or_functions_of_a_wrong_type_is_refused_naming_it(scripted):
    """`response_format` and the deprecated `functions` were checked by truthiness: `{}`, `[]` or `0` passed as
    if the field were not sent. Only their no-op values (null, {"type": "text"}, no functions) pass."""
    url = scripted.url + "/v1/chat/completions"
    base = {"messages": USER, "max_tokens": 1}
    for name, value in [
        ("response_format", {}),
        ("response_format", []),
        ("response_format", 0),
        ("functions", {}),
        ("functions", 0),
        ("function_call", {}),
    ]:
        assert _err(httpx.post(url, json={**base, name: value}), 400)["param"] == name, (name, value)
    for name, value in [
        ("response_format", {"type": "text"}),
        ("functions", []),
        ("function_call", "auto"),
        ("response_format", None),
    ]:
        assert httpx.post(url, json={**base, name: value}).status_code == 200, (name, value)


def test_a_misspelt_reasoning_effort_or_template_option_is_a_400_and_null_is_the_default(scripted, tok):
    """A `reasoning_effort` OpenAI does not take ("hihg") and a template option this template does not take
    (`thinkng`) did nothing, silently: the reply thought as if neither were sent. Both are 400s naming them
    (in /tokenize too); `enable_thinking: null` (the default, as null is for every field) was a 400."""
    url = scripted.url + "/v1/chat/completions"
    base = {"messages": USER, "max_tokens": 1}
    for route in ("/v1/chat/completions", "/tokenize"):
        r = httpx.post(scripted.url + route, json={**base, "reasoning_effort": "hihg"})
        assert _err(r, 400)["param"] == "reasoning_effort", route
        r = httpx.post(scripted.url + route, json={**base, "chat_template_kwargs": {"thinkng": False}})
        err = _err(r, 400)
        assert err["param"] == "chat_template_kwargs.thinkng" and "'thinking'" in err["message"], route
    for effort in ("minimal", "high"):
        assert httpx.post(url, json={**base, "reasoning_effort": effort}).status_code == 200, effort
    for key in ("thinking", "enable_thinking"):
        r = httpx.post(url, json={**base, "chat_template_kwargs": {key: None}})
        assert r.status_code == 200, r.text
        assert tok.decode(scripted.engine.added[-1][0]).endswith("<｜Assistant｜><think>\n"), key


def test_tokenize_refuses_empty_messages_as_the_chat_does(scripted):
    """`/tokenize` counted `messages: []` (the BOS and a generation prompt) where the chat refuses it."""
    err = _err(httpx.post(scripted.url + "/tokenize", json={"messages": []}), 400)
    assert err["param"] == "messages"
    assert _err(httpx.post(scripted.url + "/v1/chat/completions", json={"messages": []}), 400)["param"] == (
        "messages"
    )


def test_a_content_of_another_type_names_the_forms_content_takes(scripted):
    """`content: 5` was "should be a valid string", as if a list of parts were not taken too."""
    url = scripted.url + "/v1/chat/completions"
    for content in (5, {"type": "text", "text": "hi"}, True):
        err = _err(httpx.post(url, json={"messages": [{"role": "user", "content": content}]}), 400)
        assert err["param"] == "messages.0.content", content
        assert "a string, a list of content parts or null" in err["message"], err


def test_a_tool_result_without_its_call_id_is_refused(scripted):
    """OpenAI and DeepSeek's API refuse a `tool` message without the `tool_call_id` of the call it answers; it
    was accepted here, so a client worked with nanoseek and broke against them (and with parallel calls nothing
    says which result answers which call)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history = [*USER, {"role": "assistant", "content": "", "tool_calls": [call]}]
    for route in ("/v1/chat/completions", "/tokenize"):
        body = {"messages": [*history, {"role": "tool", "content": "21"}], "max_tokens": 1}
        err = _err(httpx.post(scripted.url + route, json=body), 400)
        assert err["param"] == "messages.2.tool_call_id" and err["code"] == "missing_required_parameter"
        ok = {**body, "messages": [*history, {"role": "tool", "tool_call_id": "call_1", "content": "21"}]}
        assert httpx.post(scripted.url + route, json=ok).status_code == 200, route


def test_a_message_without_content_is_refused_but_an_assistants_turn_of_calls(scripted):
    """A user message with `content` missing or null (a client's bug: `text` for `content`) was answered as an
    empty message; OpenAI requires content of every role but the assistant's."""
    for route in ("/v1/chat/completions", "/tokenize"):
        for role in ("user", "system", "developer"):
            for message in ({"role": role}, {"role": role, "content": None}, {"role": role, "text": "hi"}):
                body = {"messages": [*USER, message], "max_tokens": 1}
                err = _err(httpx.post(scripted.url + route, json=body), 400)
                assert err["param"] == "messages.1.content", (route, message)
        call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ok = {
            "messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [call]}],
            "max_tokens": 1,
        }
        assert httpx.post(scripted.url + route, json=ok).status_code == 200, route


def test_an_assistant_refusal_part_sent_back_is_its_text(scripted, tok):
    """OpenAI's assistant content may hold `refusal` parts; a history replayed with one was a 400 ("content
    part type 'refusal' is not supported"): it is the turn's text, as vLLM reads it. A part a text-only
    model cannot read is refused naming its message (the 400 named `messages.content`, not which one)."""
    refused = [{"type": "refusal", "refusal": "I cannot help with that."}]
    history = [
        {"role": "user", "content": "Tell me a secret."},
        {"role": "assistant", "content": refused},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    scripted.client.chat.completions.create(model=MODEL, messages=history, max_tokens=1)
    prompt_ids, _ = scripted.engine.added[-1]
    as_text = [history[0], {"role": "assistant", "content": "I cannot help with that."}, history[2]]
    assert prompt_ids == tok.apply_chat_template(as_text, tokenize=True)
    # other parts are still refused (a text-only model), naming the message that holds one
    for part in (
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    ):
        with pytest.raises(openai.BadRequestError) as e:
            scripted.client.chat.completions.create(
                model=MODEL, messages=[*history, {"role": "user", "content": [part]}], max_tokens=1
            )
        assert part["type"] in e.value.body["message"] and e.value.body["param"] == "messages.3.content"


def test_reasoning_content_in_request_is_dropped(scripted, tok):
    history = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "SECRET REASONING"},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    scripted.client.chat.completions.create(model=MODEL, messages=history, max_tokens=1)
    prompt_ids, _ = scripted.engine.added[-1]
    assert "SECRET" not in tok.decode(prompt_ids)
    expected = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in history]
    assert prompt_ids == tok.apply_chat_template(expected, tokenize=True)


def test_stop_strings(scripted):
    r = scripted.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=100, stop=["is **"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "The answer "
    chunks = list(
        scripted.client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=100, stop="is **", stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == "The answer "  # nothing of the stop string ever reached the client
    stopped = scripted.client.completions.create(model=MODEL, prompt="x", max_tokens=100, stop=["\n"])
    assert stopped.choices[0].text == REASONING.split("\n")[0]
    # generation past the stop string is cut off in the engine, not run to max_tokens
    deadline = time.monotonic() + 10  # the aborts above may land after their replies (see below)
    while scripted.engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    before = len(scripted.engine.aborted)
    long = scripted.client.completions.create(model=MODEL, prompt="LONG", max_tokens=240, stop=["That"])
    assert long.choices[0].text == "I add 2 and 2.\n" and long.choices[0].finish_reason == "stop"
    # the abort is a command the engine thread drains between steps: it may land just after the reply
    deadline = time.monotonic() + 10
    while len(scripted.engine.aborted) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(scripted.engine.aborted) == before + 1 and long.usage.completion_tokens < 100
    # ...and counted in /metrics as the stop it was, not as an abort
    metrics = httpx.get(scripted.url + "/metrics").text
    assert 'nanoseek:request_success_total{finished_reason="abort"}' not in metrics


def test_metrics_latency_histograms_count_each_request_and_token_once(tok):
    """As vLLM's: one first-token time and one end-to-end time per request, one time per output token
    after the first (5 tokens: 4)."""
    engine = ScriptedEngine(tok, lambda prompt, params: [100 + i for i in range(40)])
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        for _ in range(2):
            assert (
                client.completions.create(model=MODEL, prompt="x", max_tokens=5).usage.completion_tokens == 5
            )
        lines = set(httpx.get(srv.url + "/metrics").text.splitlines())
    for name, count in (("time_to_first_token", 2), ("time_per_output_token", 8), ("e2e_request_latency", 2)):
        assert f"nanoseek:{name}_seconds_count {float(count)}" in lines, name


def test_latency_histograms_reach_the_latencies_of_long_replies_on_a_cpu():
    """A 20-minute R1 reply, a first token after minutes in the queue, 4 s a token: past the last bucket
    (300 s, 60 s, 2.5 s), where `histogram_quantile` reads the last bound whatever the latency."""
    from prometheus_client.parser import text_string_to_metric_families

    from nanoseek.serve.metrics import ServerMetrics

    metrics = ServerMetrics(dict)
    for histogram, seconds in ((metrics.e2e, 1200.0), (metrics.ttft, 240.0), (metrics.tpot, 4.0)):
        histogram.observe(seconds)
    for family in text_string_to_metric_families(metrics.render()):
        if family.type == "histogram":
            bounds = [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket") and s.value]
            assert min(bounds) < float("inf"), family.name


def test_metrics_count_stop_string_replies_as_their_clients_got_them(tok):
    # The engine runs on between the token that completes a stop string and the abort that follows it:
    # it finished by length there (the string ends on the last token allowed) or generated past it.
    # /metrics counted those steps, not the replies: "length" for a reply whose finish_reason was "stop",
    # more generation tokens than any usage held.
    reply = tok.encode(f"{REASONING}\n</think>\n\n{ANSWER}") + tok.encode(" and so on") * 60
    engine = ScriptedEngine(tok, lambda prompt, params: reply)
    upto = next(i + 1 for i in range(len(reply)) if "That" in tok.decode(reply[: i + 1]))
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        used = 0
        for max_tokens in (upto, 200):  # the stop string on the last token allowed, then mid-way
            r = client.completions.create(model=MODEL, prompt="x", max_tokens=max_tokens, stop=["That"])
            assert r.choices[0].finish_reason == "stop"
            used += r.usage.completion_tokens
            chunks = list(
                client.chat.completions.create(
                    model=MODEL,
                    messages=USER,
                    max_tokens=max_tokens,
                    stop=["That"],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
            used += chunks[-1].usage.completion_tokens
        deadline = time.monotonic() + 10
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        metrics = httpx.get(srv.url + "/metrics").text
    assert 'nanoseek:request_success_total{finished_reason="stop"} 4.0' in metrics
    assert 'finished_reason="length"' not in metrics
    assert f"nanoseek:generation_tokens_total {float(used)}" in metrics


def test_stop_string_inside_a_multi_token_event_ends_usage_and_logprobs_there(tok):
    # A speculative engine emits an accepted draft and its bonus token in one event: the tokens after
    # the one that completes the stop string are not output, so neither counted nor given logprobs.
    from nanoseek.engine.sampling import TokenLogprob
    from nanoseek.serve.app import _Choice
    from nanoseek.serve.textstream import StopStringMatcher
    from serve_fakes import _Event

    ids = tok.encode("The answer is 4. Hello world!")
    lps = [TokenLogprob(t, -1.0, []) for t in ids]
    stop_at = next(i for i in range(len(ids)) if "4" in tok.decode(ids[: i + 1]))
    choice = _Choice(tok.incremental_decoder(skip_special_tokens=True), StopStringMatcher(["4"]), None)
    text = ""
    for i in range(0, len(ids), 2):
        text += choice.feed(_Event("r", ids[i : i + 2], lps[i : i + 2], False, None, None))[2]
        if choice.done:
            break
    assert text == "The answer is " and choice.finish_reason == "stop"
    assert choice.token_ids == ids[: stop_at + 1] and len(choice.logprobs) == stop_at + 1


def test_a_stop_string_in_the_text_a_decoder_held_to_the_end_still_ends_with_stop(tok):
    # A non-byte-level decoder (SentencePiece) holds a delta that ends inside a character until the
    # character is complete; a reply cut there by max_tokens releases it at flush. A stop string in that
    # text cuts it and the finish_reason is "stop", not the engine's "length" (as vLLM reports it).
    from nanoseek.serve.app import _Choice
    from nanoseek.serve.textstream import StopStringMatcher
    from serve_fakes import _Event

    class HoldingDecoder:  # everything is held until flush, as for a reply ending mid-character
        chars, text = 0, ""

        def push(self, ids):
            self.text += "".join(f"w{i} " for i in ids)
            return ""

        def flush(self, drop_partial=False):
            return self.text

    choice = _Choice(HoldingDecoder(), StopStringMatcher(["w2"]), None)
    assert choice.feed(_Event("r", [1, 2, 3], None, True, "length", None))[0] == "w1 "
    assert choice.finish_reason == "stop"


def _sse_chunks(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
        return [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]


def test_every_tokens_logprobs_stream_in_its_own_steps_chunk(tok):
    """A token with no text yet (a skipped special token, the first bytes of a character, text held for a
    possible stop string or `</think>`) still sends its logprobs in that step's chunk, with an empty text
    delta, as vLLM does; the joined stream stays the non-streamed response, stop strings still cut."""
    skipped, first_bytes = tok.bos_token_id, [tok.token_bytes().index(bytes([b])) for b in b"\xe6\x95"]
    script = [
        *tok.encode("Hi"),
        skipped,
        *first_bytes,
        tok.token_bytes().index(b"\xb0"),  # ...completes 数
        *tok.encode(" ok\n</think>\n\nThe answer is **4**. Hello world!"),
    ]
    engine = ScriptedEngine(tok, lambda prompt, params: script)
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL))) as srv:
        for stop in (None, ["Hello"]):
            body = {"prompt": "x", "max_tokens": 100, "logprobs": 1, "stop": stop}
            full = httpx.post(srv.url + "/v1/completions", json=body).json()
            lps = [c["choices"][0]["logprobs"] for c in _sse_chunks(srv.url + "/v1/completions", body)]
            lps = [lp for lp in lps if lp]
            assert all(len(lp["tokens"]) == 1 for lp in lps)  # one step, one token: no bursts
            assert len(lps) == full["usage"]["completion_tokens"]
            joined = {key: [v for lp in lps for v in lp[key]] for key in lps[0]}
            assert joined == full["choices"][0]["logprobs"]

            body = {"messages": USER, "max_tokens": 100, "logprobs": True, "top_logprobs": 1, "stop": stop}
            full = httpx.post(srv.url + "/v1/chat/completions", json=body).json()
            chunks = [c["choices"][0] for c in _sse_chunks(srv.url + "/v1/chat/completions", body)]
            lps = [c["logprobs"]["content"] for c in chunks if c["logprobs"]]
            assert all(len(lp) == 1 for lp in lps) and len(lps) == full["usage"]["completion_tokens"]
            assert [e for lp in lps for e in lp] == full["choices"][0]["logprobs"]["content"]
            # a token with no text yet still has a text delta (content ""), never an empty one
            assert all(c["delta"] for c in chunks if c["logprobs"])
            msg = full["choices"][0]["message"]
            for key in ("reasoning_content", "content"):
                assert "".join(c["delta"].get(key) or "" for c in chunks) == msg[key]
        assert msg["content"] == "The answer is **4**. "  # the stop string cut it


def test_generation_config_stop_ids_end_a_reply(tok):
    # the checkpoint's other end ids (generation_config.json, Tokenizer.stop_token_ids) stop a request
    from nanoseek.tokenizer import USER, Tokenizer

    stop = tok.token_to_id(USER)
    t = Tokenizer(tok.backend, generation_config={"eos_token_id": [stop]})
    engine = ScriptedEngine(t, lambda prompt, params: [*tok.encode("Hello"), stop, *tok.encode(" world")])
    with LiveServer(create_app(engine, t, ServeConfig(model_name=MODEL))) as srv:
        body = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 20}).json()
        streamed = _sse_chunks(srv.url + "/v1/completions", {"prompt": "x", "max_tokens": 20})
        hi = [{"role": "user", "content": "Hi"}]
        chat = {"messages": hi, "max_tokens": 20, "chat_template_kwargs": {"thinking": False}}
        answer = httpx.post(srv.url + "/v1/chat/completions", json=chat).json()["choices"][0]
    # the stop id is counted but not shown, though it is no special token (as vLLM and `nanoseek chat`)
    choice = body["choices"][0]
    assert choice["text"] == "Hello" and choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(tok.encode("Hello")) + 1
    assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"]) == "Hello"
    assert answer["message"]["content"] == "Hello" and answer["finish_reason"] == "stop"


def test_metrics_count_each_prompt_once_and_scored_prompts(tok, model):
    # n choices share one prompt: /metrics counted it n times, usage once; a prompt scored with echo +
    # logprobs and max_tokens 0 (lm-eval's loglikelihood) was in no counter at all
    engine = Engine(model, max_seq_len=256)
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL), model=model)) as srv:
        url = srv.url + "/v1/completions"
        # ignore_eos: the random model samples at T = 1, and a sampled EOS finishes a choice by "stop"
        a = httpx.post(url, json={"prompt": "Hello world", "max_tokens": 2, "n": 3, "ignore_eos": True})
        a = a.json()["usage"]
        b = httpx.post(url, json={"prompt": "x y", "max_tokens": 0, "echo": True, "logprobs": 0}).json()
        streamed = _sse_chunks(url, {"prompt": "z", "max_tokens": 0, "echo": True, "logprobs": 0})
        metrics = httpx.get(srv.url + "/metrics").text
    prompts = (
        a["prompt_tokens"]
        + b["usage"]["prompt_tokens"]
        + len(streamed[0]["choices"][0]["logprobs"]["tokens"])
    )
    assert f"nanoseek:prompt_tokens_total {float(prompts)}" in metrics
    assert f"nanoseek:generation_tokens_total {float(a['completion_tokens'])}" in metrics
    assert 'nanoseek:request_success_total{finished_reason="length"} 5.0' in metrics


def test_a_reply_cut_inside_a_character_ends_before_it(tok):
    # max_tokens ends the reply on the first byte of a 3-byte character: no U+FFFD (as vLLM), streamed or not
    table = tok.token_bytes()
    lead = next(i for i, b in enumerate(table) if b == "数".encode()[:1])
    engine = ScriptedEngine(tok, lambda prompt, params: [*tok.encode("Hi "), lead, *tok.encode("!")])
    n = len(tok.encode("Hi ")) + 1
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL))) as srv:
        body = {"prompt": "x", "max_tokens": n}
        r = httpx.post(srv.url + "/v1/completions", json=body).json()
        streamed = _sse_chunks(srv.url + "/v1/completions", body)
        hi = [{"role": "user", "content": "Hi"}]
        chat = {"messages": hi, "max_tokens": n, "chat_template_kwargs": {"thinking": False}}
        answer = httpx.post(srv.url + "/v1/chat/completions", json=chat).json()["choices"][0]
    assert r["choices"][0]["text"] == "Hi " and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == n  # the cut token is still generated and counted
    assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"]) == "Hi "
    assert answer["message"]["content"] == "Hi "


def test_vllm_sampling_extensions_are_honoured_or_refused(tok):
    # stop_token_ids (vLLM's) ends the reply; extensions that would change the output and are not
    # implemented were accepted and silently ignored: now a 400 naming them (their no-op values pass)
    world = tok.encode(" world")
    engine = ScriptedEngine(tok, lambda prompt, params: [*tok.encode("Hello"), *world])
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL))) as srv:
        url = srv.url + "/v1/completions"
        r = httpx.post(url, json={"prompt": "x", "max_tokens": 20, "stop_token_ids": world[:1]}).json()
        assert r["choices"][0]["text"] == "Hello" and r["choices"][0]["finish_reason"] == "stop"
        r = httpx.post(
            url, json={"prompt": "x", "max_tokens": 20, "ignore_eos": True, "stop_token_ids": world[:1]}
        )
        assert r.json()["choices"][0]["text"] == "Hello"
        assert (
            _err(httpx.post(url, json={"prompt": "x", "stop_token_ids": [10**6]}), 400)["param"]
            == "stop_token_ids"
        )
        for extra in (
            {"min_tokens": 5},
            {"use_beam_search": True},
            {"guided_choice": ["yes", "no"]},
            {"include_stop_str_in_output": True},
            {"skip_special_tokens": False},
            {"prompt_logprobs": 1},
            {"return_tokens_as_token_ids": True},
            {"response_format": {"type": "json_object"}},
        ):
            (name,) = extra
            assert _err(httpx.post(url, json={"prompt": "x", **extra}), 400)["param"] == name
            chat = {"messages": USER, **extra}
            assert _err(httpx.post(srv.url + "/v1/chat/completions", json=chat), 400)["param"] == name
        noops = {
            "min_tokens": 0,
            "use_beam_search": False,
            "skip_special_tokens": True,
            "guided_json": None,
            "bad_words": [],  # vLLM's own default
        }
        assert httpx.post(url, json={"prompt": "x", "max_tokens": 2, **noops}).status_code == 200


def test_vllm_chat_template_extensions_are_refused_not_ignored(scripted):
    """vLLM's prefill (`continue_final_message`, or `add_generation_prompt: false`), a request's own
    `chat_template`, RAG `documents` and chat `echo` were accepted and ignored: an assistant prefill was
    closed and answered as a new turn. Each is a 400 naming it; their no-op values (what clients that send
    every field send) pass."""
    url = scripted.url + "/v1/chat/completions"
    prefill = [*USER, {"role": "assistant", "content": "The answer is"}]
    for extra in (
        {"continue_final_message": True},
        {"add_generation_prompt": False},
        {"chat_template": "{{ messages[0].content }}"},
        {"documents": [{"title": "t", "text": "x"}]},
        {"echo": True},
    ):
        (name,) = extra
        assert _err(httpx.post(url, json={"messages": prefill, **extra}), 400)["param"] == name
    noops = {
        "add_generation_prompt": True,
        "continue_final_message": False,
        "chat_template": None,
        "echo": False,
    }
    assert httpx.post(url, json={"messages": USER, "max_tokens": 1, **noops}).status_code == 200
    # /v1/completions' own echo is unchanged
    echoed = httpx.post(
        scripted.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "echo": True}
    )
    assert echoed.json()["choices"][0]["text"].startswith("Hi")


def test_a_sentencepiece_vocabulary_keeps_the_first_generated_words_space(tmp_path):
    # Llama-2 style: the decoder strips a text's leading space, so the reply decoded alone would lose the
    # space of its first word ("isParis"); decoded after the prompt, as vLLM does, it keeps it.
    from model_configs import sentencepiece_tokenizer

    t = sentencepiece_tokenizer(tmp_path)
    prompt = [t.token_to_id(p) for p in ("▁The", "▁capital", "▁is")]
    reply = [t.token_to_id("▁Paris"), t.token_to_id(".")]
    assert t.decode(prompt + reply) == "The capital is Paris."
    engine = ScriptedEngine(t, lambda prompt, params: reply)
    with LiveServer(create_app(engine, t, ServeConfig(model_name=MODEL))) as srv:
        for echo in (False, True):
            body = {"prompt": prompt, "max_tokens": 10, "echo": echo}
            full = httpx.post(srv.url + "/v1/completions", json=body).json()["choices"][0]["text"]
            chunks = _sse_chunks(srv.url + "/v1/completions", body)
            assert full == "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            assert full == ("The capital is" if echo else "") + " Paris."


def test_web_page_served(scripted):
    page = httpx.get(scripted.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/chat.js", "/static/markdown.js"):
        assert httpx.get(scripted.url + asset).status_code == 200
    # the page's files are one metric label, not one per file name (a bounded label set)
    metrics = httpx.get(scripted.url + "/metrics").text
    assert 'route="/static",status="200"} 2.0' in metrics and "chat.js" not in metrics
    # revalidated on each load: a browser's guessed freshness ran an upgraded (or edited) page stale
    for path in ("/", "/static/chat.js", "/static/markdown.js"):
        r = httpx.get(scripted.url + path)
        assert r.headers["cache-control"] == "no-cache" and r.headers["etag"], path
    again = httpx.get(scripted.url + path, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304  # ...which costs a 304, not the file


def test_the_pages_scripts_use_no_regex_lookbehind() -> None:
    """Safari before 16.4 (an iPhone on iOS 15, which the page's 100vh fallback still serves) refuses a
    whole script over one lookbehind, "(?<!" or "(?<=": the table cells' split used one in markdown.js,
    and there no answer rendered ("renderMarkdown is not a function")."""
    import re

    from nanoseek.serve.app import STATIC_DIR

    for page in [*STATIC_DIR.glob("*.js"), *STATIC_DIR.glob("*.html")]:
        assert not re.search(r"\(\?<[=!]", page.read_text(encoding="utf-8")), page.name


def test_sse_wire_format(scripted):
    with httpx.stream(
        "POST",
        scripted.url + "/v1/chat/completions",
        json={"messages": USER, "stream": True, "max_tokens": 4},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    # the first chunk opens the message as OpenAI and vLLM do: role and an empty content
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


# ------------------------------------------------------------ thinking off, tool calls
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_REASONING = "I should look the weather up."


def _call(name: str, args: str) -> str:
    return f"{TOOL_CALL_BEGIN}{name}{TOOL_SEP}{args}{TOOL_CALL_END}"


@pytest.fixture(scope="module")
def tooling(tok):
    """A scripted model that calls get_weather (twice), answers after the tool results, and writes bad JSON
    when the user says BAD; it reasons first whenever the prompt opened <think>."""

    def reply(prompt, params):
        text = tok.decode(prompt)
        if text.endswith(TOOL_OUTPUT_END):
            out = "It is 21 degrees in Paris."
        elif text.endswith(TOOL_SEP):  # tool_choice named the function: only the arguments are left
            out = ('{"city": Lyon}' if "BAD" in text else '{"city": "Lyon"}') + TOOL_CALL_END + TOOL_CALLS_END
        elif text.endswith(TOOL_CALL_BEGIN):  # tool_choice "required"
            out = "get_weather" + TOOL_SEP + '{"city": "Nice"}' + TOOL_CALL_END + TOOL_CALLS_END
        elif "BAD" in text:
            out = (
                "Let me check." + TOOL_CALLS_BEGIN + _call("get_weather", '{"city": Paris}') + TOOL_CALLS_END
            )
        else:
            calls = _call("get_weather", '{"city": "Paris"}') + _call("get_weather", '{"city": "東京"}')
            out = "Checking." + TOOL_CALLS_BEGIN + calls + TOOL_CALLS_END
        if text.endswith("<think>\n"):
            out = f"{TOOL_REASONING}\n</think>\n\n{out}"
        return tok.encode(out)

    engine = ScriptedEngine(tok, reply, max_seq_len=4096)
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL))) as srv:
        srv.engine = engine
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        yield srv


def test_thinking_off(scripted, tok):
    kw = dict(model=MODEL, messages=USER, max_tokens=100)
    for key in ("thinking", "enable_thinking"):
        r = scripted.client.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {key: False}})
        prompt_ids, _ = scripted.engine.added[-1]
        assert tok.decode(prompt_ids).endswith("<｜Assistant｜></think>")
        msg = r.choices[0].message
        # everything generated is the answer, whatever it looks like; no reasoning_content at all
        assert msg.content == f"{REASONING}\n</think>\n\n{ANSWER}"
        assert "reasoning_content" not in (msg.model_extra or {}) and r.choices[0].finish_reason == "stop"
    chunks = list(
        scripted.client.chat.completions.create(
            **kw, stream=True, extra_body={"chat_template_kwargs": {"thinking": False}}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert not any(getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks)
    on = scripted.client.chat.completions.create(
        **kw, extra_body={"chat_template_kwargs": {"thinking": True}}
    )
    assert on.choices[0].message.reasoning_content == REASONING + "\n"  # the default, said explicitly
    url = scripted.url + "/v1/chat/completions"
    bad = {"messages": USER, "chat_template_kwargs": {"thinking": "no"}}
    assert _err(httpx.post(url, json=bad), 400)["param"] == "chat_template_kwargs.thinking"


def test_reasoning_effort_none_is_thinking_off(scripted, tok):
    """OpenAI's `reasoning_effort: "none"` asks for no reasoning (gpt-5.1's default); it was ignored and the
    reply thought anyway. It is the non-thinking mode; other efforts think as usual, an explicit
    `chat_template_kwargs.thinking` wins, and /tokenize counts the prompt the chat renders."""
    kw = dict(model=MODEL, messages=USER, max_tokens=100)
    r = scripted.client.chat.completions.create(**kw, reasoning_effort="none")
    assert tok.decode(scripted.engine.added[-1][0]).endswith("<｜Assistant｜></think>")
    assert r.choices[0].message.content == f"{REASONING}\n</think>\n\n{ANSWER}"
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})
    body = {"messages": USER, "reasoning_effort": "none"}
    assert httpx.post(scripted.url + "/tokenize", json=body).json()["count"] == r.usage.prompt_tokens
    for effort, extra in (("low", {}), ("none", {"chat_template_kwargs": {"thinking": True}})):
        r = scripted.client.chat.completions.create(**kw, reasoning_effort=effort, extra_body=extra)
        assert tok.decode(scripted.engine.added[-1][0]).endswith("<｜Assistant｜><think>\n"), effort
        assert r.choices[0].message.reasoning_content == REASONING + "\n"


def test_thinking_off_is_refused_where_the_chat_template_has_no_non_thinking_mode(v3_tooling):
    """R1-Distill's template (R1's, V3's) opens the think block whatever `thinking` says: the model reasoned
    anyway, and its reasoning came back as the answer (`content` "...</think>\\n\\nIt is 4."), with no
    reasoning_content. A 400 naming the field that asked for it, as `nanoseek chat --no-think` refuses it;
    thinking on is answered as ever."""
    url = v3_tooling.url + "/v1/chat/completions"
    for extra, param in (
        ({"chat_template_kwargs": {"thinking": False}}, "chat_template_kwargs.thinking"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs.enable_thinking"),
        ({"reasoning_effort": "none"}, "reasoning_effort"),
    ):
        for route in ("/v1/chat/completions", "/tokenize"):
            r = httpx.post(v3_tooling.url + route, json={"messages": USER, **extra})
            assert _err(r, 400)["param"] == param, (route, extra)
    r = httpx.post(
        url, json={"messages": USER, "reasoning_effort": "none", "chat_template_kwargs": {"thinking": True}}
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["reasoning_content"] == "not a call"
    named = {"type": "function", "function": {"name": "get_weather"}}  # the call, not reasoning, comes first
    r = httpx.post(
        url, json={"messages": USER, "tools": [WEATHER], "tool_choice": named, "reasoning_effort": "none"}
    )
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["tool_calls"]  # named: OpenAI's "stop"


def test_tool_call_then_result_then_answer(tooling, tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Tokyo?"},
    ]
    r = tooling.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    prompt = tok.decode(tooling.engine.added[-1][0])
    assert prompt.startswith("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools\n") and "### get_weather" in prompt
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == TOOL_REASONING + "\n" and choice.message.content == "Checking."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}),
        ("function", "get_weather", {"city": "東京"}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)

    # the client sends the calls back with their results; the model answers from them
    messages.append(choice.message.model_dump(exclude_none=True))
    messages += [
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": calls[1].id, "content": '{"temp": 25}'},
    ]
    final = tooling.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    assert final.choices[0].message.content == "It is 21 degrees in Paris."
    prompt_ids, _ = tooling.engine.added[-1]
    expected = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]
    assert prompt_ids == tok.apply_chat_template(expected, tokenize=True, tools=[WEATHER])
    assert tok.decode(prompt_ids).endswith(
        f"Checking.{TOOL_CALLS_BEGIN}{_call('get_weather', calls[0].function.arguments)}"
        f"{_call('get_weather', calls[1].function.arguments)}{TOOL_CALLS_END}<｜end▁of▁sentence｜>"
        '<｜tool▁output▁begin｜>{"temp": 21}<｜tool▁output▁end｜><｜tool▁output▁begin｜>{"temp": 25}<｜tool▁output▁end｜>'
    )


def test_tool_calls_streamed(tooling):
    messages = [{"role": "user", "content": "Weather?"}]
    chunks = list(
        tooling.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], stream=True)
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "東京"}),
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert "".join(d.content or "" for d in deltas) == "Checking."  # no tool markup leaks into content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]
    # the held call block's tokens still send their logprobs step by step, none of its text
    kw = dict(model=MODEL, messages=messages, tools=[WEATHER], logprobs=True)
    full = tooling.client.chat.completions.create(**kw)
    chunks = [c.choices[0] for c in tooling.client.chat.completions.create(**kw, stream=True) if c.choices]
    lps = [c.logprobs.content for c in chunks if c.logprobs]
    assert all(len(lp) == 1 for lp in lps) and len(lps) == full.usage.completion_tokens
    assert [e for lp in lps for e in lp] == full.choices[0].logprobs.content
    assert "".join(c.delta.content or "" for c in chunks) == full.choices[0].message.content == "Checking."
    off = tooling.client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER],
        extra_body={"chat_template_kwargs": {"thinking": False}},
    )
    assert off.choices[0].message.content == "Checking." and len(off.choices[0].message.tool_calls) == 2
    # parallel_tool_calls false: only the model's first call comes back (vLLM's behaviour), streamed too
    single = tooling.client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], parallel_tool_calls=False
    )
    calls = single.choices[0].message.tool_calls
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}]
    assert single.choices[0].finish_reason == "tool_calls"
    chunks = tooling.client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], parallel_tool_calls=False, stream=True
    )
    assert [tc.index for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []] == [0]


def test_bad_tool_json_is_text(tooling):
    messages = [{"role": "user", "content": "BAD request"}]
    raw = "Let me check." + TOOL_CALLS_BEGIN + _call("get_weather", '{"city": Paris}') + TOOL_CALLS_END
    r = tooling.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == raw
    chunks = list(
        tooling.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == raw
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    # a forced call that does not parse: the model's own text, not the call's start the prompt held
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = tooling.client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice=named
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == '{"city": Lyon}' + TOOL_CALL_END + TOOL_CALLS_END
    # /tokenize counts the prompt as the chat request renders it, tools included
    body = {"messages": messages, "tools": [WEATHER], "tool_choice": named}
    assert httpx.post(tooling.url + "/tokenize", json=body).json()["count"] == r.usage.prompt_tokens


def test_tool_choice(tooling, tok):
    messages = [{"role": "user", "content": "Weather?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = tooling.client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice=named
    )
    assert tok.decode(tooling.engine.added[-1][0]).endswith(
        f"<｜Assistant｜></think>{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}get_weather{TOOL_SEP}"
    )  # the call is started in the prompt, after a closed think block
    assert r.choices[0].message.content is None  # only a call: null content, as OpenAI's and vLLM's
    call = r.choices[0].message.tool_calls[0].function
    # a call the request named ends with "stop", as OpenAI's (vLLM's since its PR 25054); a required one
    # with "tool_calls"
    assert (call.name, json.loads(call.arguments), r.choices[0].finish_reason) == (
        "get_weather",
        {"city": "Lyon"},
        "stop",
    )
    chunks = list(
        tooling.client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], tool_choice=named, stream=True
        )
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    assert any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    r = tooling.client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required"
    )
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Nice"}
    assert r.choices[0].finish_reason == "tool_calls"
    # "none": the tools are not shown to the model and its output is not parsed
    r = tooling.client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none"
    )
    assert "## Tools" not in tok.decode(tooling.engine.added[-1][0])
    assert not r.choices[0].message.tool_calls and TOOL_CALLS_BEGIN in r.choices[0].message.content
    url = tooling.url + "/v1/chat/completions"
    for body in (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required"},
        {"tools": [WEATHER], "tool_choice": "sometimes"},
    ):
        assert _err(httpx.post(url, json={"messages": messages, **body}), 400)["param"] == "tool_choice"
    for tool, param in (
        ({"type": "retrieval", "function": WEATHER["function"]}, "tools.0.type"),
        ({"type": "function", "function": {"name": "bad name!"}}, "tools.0.function.name"),
        ({"type": "function"}, "tools.0.function"),
    ):
        assert _err(httpx.post(url, json={"messages": messages, "tools": [tool]}), 400)["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        tooling.client.chat.completions.create(model=MODEL, messages=messages, tools=[{"type": "function"}])
    assert e.value.body["param"] == "tools.0.function"


@pytest.fixture(scope="module")
def v3_tooling(tok):
    """A scripted model whose chat template writes calls as DeepSeek-V3's and R1's do (`V3_TOOL_TEMPLATE`):
    it finishes a forced call begun in that markup, and answers after a tool result."""
    import copy

    v3 = copy.copy(tok)
    v3.chat_template = V3_TOOL_TEMPLATE

    def reply(prompt, params):
        text = v3.decode(prompt)
        if text.endswith(f"{TOOL_CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n"):
            out = '{"city": "Lyon"}\n```'
        elif text.endswith(f"{TOOL_CALL_BEGIN}function{TOOL_SEP}"):
            out = 'get_weather\n```json\n{"city": "Nice"}\n```'
        else:
            return v3.encode("not a call")
        return v3.encode(out + TOOL_CALL_END + TOOL_CALLS_END)

    engine = ScriptedEngine(v3, reply, max_seq_len=4096)
    with LiveServer(create_app(engine, v3, ServeConfig(model_name=MODEL))) as srv:
        srv.engine, srv.tok = engine, v3
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        yield srv


def test_forced_call_in_deepseek_v3s_markup(v3_tooling):
    """A model whose template writes calls as DeepSeek-V3's and R1's do was handed V3.1's `NAME<sep>` for a
    named `tool_choice` (and a bare call begin for "required"): markup it never saw, and what it wrote came
    back as text. The forced call starts in the template's own markup, and parses back as a call."""
    messages = [{"role": "user", "content": "Weather?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, city in ((named, "Lyon"), ("required", "Nice")):
        r = v3_tooling.client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], tool_choice=choice
        )
        # OpenAI ends a call the request named with "stop", one it merely required with "tool_calls"
        assert r.choices[0].finish_reason == ("stop" if choice is named else "tool_calls"), choice
        call = r.choices[0].message.tool_calls[0].function
        assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": city})


def test_a_turn_of_calls_sent_back_with_null_content_keeps_its_calls(v3_tooling):
    """OpenAI's assistant turn of calls alone has `content: null`, which DeepSeek's own templates (R1's,
    R1-Distill's, V3's) test for to write the calls: sent to them as "", the calls left the prompt, and the
    model read tool results that answered nothing. The prompt holds them as the template writes them."""
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}
    ]
    for sent in ({"content": None}, {}):  # null, or left out as the openai client's model_dump leaves it
        messages = [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": calls, **sent},
            {"role": "tool", "tool_call_id": "c1", "content": "21"},
        ]
        v3_tooling.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
        prompt = v3_tooling.tok.decode(v3_tooling.engine.added[-1][0])
        assert f'{TOOL_CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{"city": "Lyon"}}\n```' in prompt
        assert prompt == v3_tooling.tok.apply_chat_template(
            [{**m, "content": m.get("content")} for m in messages]
        )


@pytest.mark.slow
def test_cli_serve(tmp_path, tok, model):
    """`nanoseek serve DIR` prints where it listens and what it serves, then answers over HTTP."""
    import os
    import subprocess
    import sys

    from nanoseek.checkpoint import save_model

    ckpt = tmp_path / "tiny-ckpt"
    save_model(model, ckpt)
    tok.save(ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95}))
    env = {**os.environ, "NANOSEEK_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    # port 0: a free port looked up here could be taken by a test beside this one before serve binds it
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoseek", "serve", str(ckpt), "--port", "0", "--max-seq-len", "128"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        lines = []
        deadline = time.time() + 90
        while not any("listening on" in line for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            assert time.time() < deadline, "".join(lines)
        out = "".join(lines)
        port = int(out.split("listening on http://127.0.0.1:")[1].split()[0].rstrip("/"))
        assert port != 0 and "'tiny-ckpt'" in out and "auth on" in out
        assert "temperature=0.6, top_p=0.95" in out
        for _ in range(100):  # an answer other than 200 waits too (it ran the 100 tries at once)
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        r = client.chat.completions.create(model="tiny-ckpt", messages=USER, max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1
        assert client.models.list().data[0].max_model_len == 128
    finally:
        proc.terminate()
        proc.wait(20)
        proc.stdout.close()


@pytest.mark.slow
def test_serve_ctrl_c_says_what_it_waits_for_and_a_second_one_stops_quietly(tmp_path):
    """Ctrl-C while a reply streams: the server says that it finishes the request first (uvicorn's own
    line is below the level `serve` logs at, so the signal seemed ignored for as long as the reply ran);
    a second Ctrl-C stops it at once, in one line: uvicorn logged the dropped request's cancellation and
    the app's shutdown as two error tracebacks."""
    import signal
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = tmp_path / "serve.py"
    script.write_text(
        textwrap.dedent(f"""
            import socket, sys, uvicorn
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from serve_fakes import ScriptedEngine, tiny_tokenizer
            from nanoseek.commands.serve import _server
            from nanoseek.serve import ServeConfig, create_app, protocol
            tok = tiny_tokenizer()
            engine = ScriptedEngine(tok, lambda p, params: tok.encode(" and so on") * 50, step_delay=0.05)
            app = create_app(engine, tok, ServeConfig(model_name="m"))
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            print(sock.getsockname()[1], flush=True)
            try:
                _server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
            except KeyboardInterrupt:  # as `nanoseek.cli.main` reports it
                sys.exit("interrupted")
        """)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        port = int(proc.stdout.readline())
        body = {"model": "m", "prompt": "hi", "max_tokens": 150, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)  # the reply is streaming
            proc.send_signal(signal.SIGINT)
            said = proc.stdout.readline()
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(httpx.HTTPError):
                for _ in lines:  # the stream just ends
                    pass
        assert proc.wait(20) == 1
        rest = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait(20)
        proc.stdout.close()
    assert said == "nanoseek serve: stopping once 1 request(s) in flight finish (Ctrl-C again to stop now)\n"
    assert rest == "interrupted\n"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_serve_says_it_stopped_when_a_signal_stops_it(micro_checkpoint, sig):
    """A stop by SIGTERM (systemd, a container) or Ctrl-C ended without its `stopped` line: uvicorn raises
    the signal again once it has stopped, which ended the process (SIGTERM) or printed `interrupted`
    (Ctrl-C) before it. Now the line, then SIGTERM's end by the signal (clean, to systemd) or exit 130."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoseek", "serve", micro_checkpoint, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        while "listening on" not in (line := proc.stdout.readline()):
            assert line, proc.stderr.read()
        url = line.split("listening on ")[1].split()[0]
        for _ in range(100):  # the server answers once uvicorn runs (and has taken the signals)
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"{url}/v1/models", timeout=5)
                break
            time.sleep(0.05)
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert out == "nanoseek serve: stopped\n"  # (the probe above may still count as a request in flight)
    assert "interrupted" not in err and "Traceback" not in err
    assert proc.returncode == (-signal.SIGTERM if sig == "SIGTERM" else 130)


def test_cli_serve_quantizes_as_it_loads(tmp_path, tok, model, monkeypatch, capsys):
    """`nanoseek serve DIR --quantize int8` serves int8 weights (quantized while the checkpoint streams)."""
    import uvicorn

    from nanoseek.checkpoint import save_model
    from nanoseek.cli import main
    from nanoseek.engine.quantize import QuantLinear

    ckpt = tmp_path / "ck"
    save_model(model, ckpt)
    tok.save(ckpt)
    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.update(app=self.config.app))

    def served_int8(*flags: str) -> bool:
        assert main(["serve", str(ckpt), "--port", "0", *flags]) == 0
        return any(
            isinstance(m, QuantLinear) for m in served["app"].state.server.engine.engine.model.modules()
        )

    assert served_int8("--quantize", "int8") and not served_int8()
    # the banner says what was loaded and how long loading, quantizing and packing took
    banner = [line for line in capsys.readouterr().out.splitlines() if "MTP module, context" in line]
    assert len(banner) == 2 and "float32, int8; ready in " in banner[0] and "float32; ready in " in banner[1]
    # open to the network without a key: warned on stderr, where stdout (the banner) may go to a log
    assert main(["serve", str(ckpt), "--port", "0", "--host", "0.0.0.0"]) == 0
    assert "warning: reachable beyond this machine and no --api-key set" in capsys.readouterr().err
    # a port another server holds is said before the weights load, in one line
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        assert main(["serve", str(ckpt), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in (err := capsys.readouterr().err) and "another server" in err
    # an address this machine does not have is said as such, not blamed on another server
    assert main(["serve", str(ckpt), "--host", "192.0.2.1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 192.0.2.1:0" in err and "another server" not in err
    # limits that would leave a healthy-looking server refusing every request are refused at start
    for flag, value in (("--max-queue", "0"), ("--max-batch-size", "0"), ("--max-seq-len", "1"), ("--max-seq-len", "-5")):  # fmt: skip
        served.clear()
        assert main(["serve", str(ckpt), "--port", "0", flag, value]) == 2 and not served
        assert f"{flag} must be >= " in capsys.readouterr().err
    # a context the KV cache cannot hold for one request is refused at start, naming the way out
    served.clear()
    assert main(["serve", str(ckpt), "--port", "0", "--max-seq-len", "64", "--kv-cache-mib", "0.01"]) == 2
    assert "--kv-cache-mib" in capsys.readouterr().err and not served
    assert (
        main(["serve", str(ckpt), "--port", "0", "--max-seq-len", "64", "--kv-cache-mib", "1"]) == 0
        and served
    )
    # sizes that are not positive finite numbers: one line at start (inf was an OverflowError traceback)
    for flag, value in (("--kv-cache-mib", "0"), ("--kv-cache-mib", "inf"), ("--max-body-mb", "inf")):
        served.clear()
        assert main(["serve", str(ckpt), "--port", "0", flag, value]) == 2 and not served
        assert f"{flag} must be a positive finite number" in capsys.readouterr().err


def test_cli_serve_names_the_model_by_the_directory_given(tmp_path, tok, model, monkeypatch):
    """DIR's name, as the README's requests spell it. A save cut short between its renames leaves
    RUN/.grpo.tmp-old, which serve loads for RUN/grpo: the model was served as the whole path typed
    ("/.../run/grpo"), and a client's "grpo" was a 404."""
    import uvicorn

    from nanoseek.checkpoint import save_model
    from nanoseek.cli import main

    save_model(model, tmp_path / "run" / ".grpo.tmp-old")
    tok.save(tmp_path / "run" / ".grpo.tmp-old")
    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.update(app=self.config.app))
    assert main(["serve", str(tmp_path / "run" / "grpo"), "--port", "0"]) == 0
    assert served["app"].state.server.config.model_name == "grpo"
    # a link by its own name: `current`, re-pointed at each release, was served as its target's
    (tmp_path / "run" / ".grpo.tmp-old").rename(tmp_path / "run" / "grpo-v2")
    (tmp_path / "current").symlink_to(tmp_path / "run" / "grpo-v2")
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "current/", "--port", "0"]) == 0
    assert served["app"].state.server.config.model_name == "current"


def test_cli_serve_closes_its_socket_when_loading_fails(tmp_path, tok, model, monkeypatch, capsys):
    """The port is bound before the weights load; a load that fails (a damaged file, a KV cache too
    small for the context) closes it then, not when the socket is collected (a ResourceWarning, and the
    port held for a retry in the meantime)."""
    from nanoseek.checkpoint import save_model
    from nanoseek.cli import main
    from nanoseek.commands import serve as serve_command

    listen, socks = serve_command._listen, []
    monkeypatch.setattr(serve_command, "_listen", lambda *a: socks.append(listen(*a)) or socks[-1])
    ckpt = tmp_path / "ck"
    save_model(model, ckpt)
    tok.save(ckpt)
    assert main(["serve", str(ckpt), "--port", "0", "--max-seq-len", "64", "--kv-cache-mib", "0.01"]) == 2
    (ckpt / "model.safetensors").write_bytes(b"\0" * 100)
    assert main(["serve", str(ckpt), "--port", "0"]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert len(socks) == 2 and all(s.fileno() == -1 for s in socks)  # -1: closed


def test_cli_serve_refuses_a_tokenizer_larger_than_the_models_vocabulary(
    tmp_path, tok, model, monkeypatch, capsys
):
    """A tokenizer.json from another model, with ids the model has no embedding for, was served: only a
    prompt that used one was refused, per request. Said at start, before the weights load."""
    from nanoseek.checkpoint import save_model
    from nanoseek.cli import main
    from nanoseek.commands import serve as serve_command

    def served(_config):
        raise AssertionError("the checkpoint was served")

    monkeypatch.setattr(serve_command, "_server", served)

    ckpt = tmp_path / "ck"
    save_model(DeepSeekV3(model.config.replace(vocab_size=tok.vocab_size - 1)).init_weights(0), ckpt)
    tok.save(ckpt)
    assert main(["serve", str(ckpt), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt / 'tokenizer.json'} has {tok.vocab_size} tokens but the model's vocab_size" in err


def test_cli_serve_checks_its_flags_before_a_hub_download(monkeypatch, capsys):
    """`serve owner/name --port 70000` downloaded the model's weights before saying the port was no
    port (offline: the Hub's error instead of the flag's); a busy port too."""
    import huggingface_hub

    from nanoseek.cli import main

    def fetch(repo_id, **kw):
        raise AssertionError(f"fetched {repo_id} before checking the flags")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    for flag, value in (
        ("--port", "70000"),
        ("--max-queue", "0"),
        ("--kv-cache-mib", "inf"),
        ("--max-body-mb", "0"),
    ):
        assert main(["serve", "someone/model", flag, value]) == 2
        assert flag in capsys.readouterr().err


def test_cli_serve_refuses_w8a8_where_it_cannot_run_before_a_hub_download(monkeypatch, capsys):
    """`serve --quantize w8a8` on a GPU (the default device where there is one), or with a PyTorch
    without its quantized CPU backend, downloaded a Hub model's weights, all of them, before it was
    refused."""
    import huggingface_hub

    from nanoseek.cli import main

    def fetch(repo_id, **kw):
        raise AssertionError(f"fetched {repo_id} before checking the flags")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["serve", "someone/model", "--port", "0", "--quantize", "w8a8", "--device", "cuda"]) == 2
    assert "quantize='w8a8' runs on CPUs" in capsys.readouterr().err
    from nanoseek.engine import quantize

    monkeypatch.setattr(quantize, "w8a8_available", lambda: False)  # PyTorch dropped quantized tensors
    assert main(["serve", "someone/model", "--port", "0", "--quantize", "w8a8", "--device", "cpu"]) == 2
    assert "quantize='w8a8' needs a PyTorch built with a quantized CPU backend" in capsys.readouterr().err


def test_cli_serve_refuses_a_device_this_machine_lacks_before_a_hub_download(monkeypatch, capsys):
    """`serve --device cuda` on a machine without a GPU was said only by the weights' load, after a Hub
    model's whole download."""
    import huggingface_hub

    from nanoseek.cli import main

    def fetch(repo_id, **kw):
        raise AssertionError(f"fetched {repo_id} before checking the flags")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["serve", "someone/model", "--port", "0", "--device", "cuda"]) == 2
    assert "device 'cuda' is not available" in capsys.readouterr().err


def test_cli_serve_defaults_and_flags_reach_the_server(tmp_path, tok, model, monkeypatch, capsys):
    """The defaults --help states, the key from $NANOSEEK_API_KEY, --model-name, --max-queue and
    --max-body-mb reach the server, and the banner names the port the system picked for --port 0."""
    import uvicorn

    from nanoseek.checkpoint import save_model
    from nanoseek.cli import build_parser, main

    monkeypatch.setenv("NANOSEEK_API_KEY", "envkey")
    args = build_parser().parse_args(["serve", "ck"])
    assert (args.host, args.port, args.api_key, args.model_name) == ("127.0.0.1", 8000, "envkey", None)
    assert (args.max_batch_size, args.kv_cache_mib, args.max_queue, args.max_body_mb) == (32, 512, 256, 16)
    ckpt = tmp_path / "ck"
    save_model(model, ckpt)
    tok.save(ckpt)
    served = {}
    monkeypatch.setattr(
        uvicorn.Server,
        "run",
        lambda self, sockets: served.update(app=self.config.app, port=sockets[0].getsockname()[1]),
    )
    import nanoseek.engine

    built, real_engine = {}, nanoseek.engine.Engine
    monkeypatch.setattr(nanoseek.engine, "Engine", lambda *a, **kw: built.update(kw) or real_engine(*a, **kw))
    flags = ["--port", "0", "--model-name", "mine", "--max-queue", "3", "--max-body-mb", "0.5"]
    assert main(["serve", str(ckpt), *flags]) == 0
    assert built["cache_bytes"] == 512 * 1024 * 1024  # --kv-cache-mib's 512 MiB
    port = served["port"]  # (the socket is closed once serving ended)
    config = served["app"].state.server.config
    assert (config.model_name, config.api_key, config.max_pending, config.max_body_bytes) == (
        "mine",
        "envkey",
        3,
        2**19,
    )
    out = capsys.readouterr().out
    assert "model 'mine'" in out and f"listening on http://127.0.0.1:{port}  " in out and "auth on" in out
    for port in ("-1", "65536"):  # refused in a line, not bind()'s OverflowError
        assert main(["serve", str(ckpt), "--port", port]) == 2
        assert f"--port {port} is not a TCP port" in capsys.readouterr().err
    monkeypatch.setenv("NANOSEEK_API_KEY", "")  # set but empty: no key
    assert main(["serve", str(ckpt), "--port", "0"]) == 0
    assert served["app"].state.server.config.api_key is None
    out, err = capsys.readouterr()
    assert "model 'ck'" in out and "auth off" in out and "warning" not in out + err


def test_cli_serve_speculative_on_a_checkpoint_without_mtp_serves_it_plainly(
    tmp_path, tok, model, monkeypatch, capsys
):
    """`serve --speculative` on a checkpoint without an MTP module (a GQA family's; one transformers saved,
    which loads with a warning that speculative decoding is off for it) exited with an error once the
    weights had loaded, where generate and chat decode it plainly. The server now does as they do, and
    says so."""
    import uvicorn

    from nanoseek.checkpoint import save_model
    from nanoseek.cli import main

    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.update(app=self.config.app))
    for mtp, ckpt in ((0, tmp_path / "plain"), (1, tmp_path / "mtp")):
        save_model(DeepSeekV3(model.config.replace(num_nextn_predict_layers=mtp)).init_weights(0), ckpt)
        tok.save(ckpt)
        assert main(["serve", str(ckpt), "--port", "0", "--speculative"]) == 0
        assert served["app"].state.server.engine.engine.speculative is bool(mtp)
        said = "has no MTP module; decoding without speculation" in capsys.readouterr().err
        assert said is not bool(mtp)


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_cli_serve_logs_without_colour_where_the_environment_refuses_it(
    tmp_path, tok, model, monkeypatch, env
):
    """uvicorn coloured its warnings on any terminal ("\\x1b[33mWARNING\\x1b[0m:" printed as text on a
    dumb one): NO_COLOR and TERM=dumb turn its colours off, as they turn off `nanoseek chat`'s."""
    import uvicorn

    from nanoseek.checkpoint import save_model
    from nanoseek.cli import main

    ckpt = tmp_path / "ck"
    save_model(model, ckpt)
    tok.save(ckpt)
    served = {}
    monkeypatch.setattr(
        uvicorn.Server, "run", lambda self, sockets: served.update(config=self.config, sock=sockets[0])
    )
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert main(["serve", str(ckpt), "--port", "0"]) == 0
    assert served["sock"].fileno() == -1  # closed once serving ended, not left to the collector
    assert served["config"].use_colors is None  # uvicorn's own choice: colours on a terminal
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", str(ckpt), "--port", "0"]) == 0
    assert served["config"].use_colors is False


@pytest.mark.parametrize("key", ["clé-s3cret", "s3cret\r", " s3cret"])
def test_cli_serve_refuses_a_key_no_client_can_send(tmp_path, monkeypatch, capsys, key):
    """A non-ASCII key (the OpenAI SDK refuses to send it; curl's UTF-8 was read back as Latin-1) or one
    with a CR or space at an end (a Windows .env file; the server strips what clients send) started a
    server that answered every request 401: it is refused at startup, without showing the key."""
    import uvicorn

    from nanoseek.cli import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: pytest.fail("served"))
    monkeypatch.setenv("NANOSEEK_API_KEY", key)
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "tokenizer.json").write_text("{}")
    assert main(["serve", str(ckpt), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "must be printable ASCII" in err and key.strip() not in err


def test_serve_sampling_defaults_from_generation_config():
    """generation_config.json's sampling fields and max_new_tokens become the defaults (vLLM's
    `--generation-config auto` reads the same six); do_sample false is greedy (its max_new_tokens still
    holds); booleans and other fields (HF's max_length) are not sampling values."""
    from nanoseek.engine.sampling import generation_defaults

    cfg = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05}
    cfg |= {"repetition_penalty": 1.1, "max_new_tokens": 100, "max_length": 50, "bos_token_id": 0}
    assert generation_defaults(cfg) == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "max_new_tokens": 100,
    }
    assert generation_defaults({"temperature": 0.7}) == {"temperature": 0.7}  # no do_sample: sampling
    assert generation_defaults({"do_sample": False, "temperature": 0.7}) == {"temperature": 0.0}
    assert generation_defaults({"do_sample": False, "max_new_tokens": 9}) == {
        "temperature": 0.0,
        "max_new_tokens": 9,
    }
    assert generation_defaults({"temperature": True, "top_p": "0.9", "max_new_tokens": 1.5}) == {}
    assert generation_defaults({"top_k": 20.0}) == {"top_k": 20}  # JSON's float spelling, as vLLM reads it
    # out of range: refused at start, naming the file, not as every request's 400 that left it out
    for bad in (
        {"temperature": -1},
        {"top_p": 5},
        {"top_k": -3},
        {"top_k": 2.5},
        {"min_p": float("nan")},
        {"max_new_tokens": 0},
    ):
        with pytest.raises(ValueError, match=r"ckpt/generation_config\.json: invalid SamplingParams"):
            generation_defaults(bad, "ckpt/generation_config.json")


def test_a_hand_built_serve_config_with_a_bad_sampling_default_is_refused_when_built():
    # a float max_new_tokens (the CLI writes only ints there) made every request that left max_tokens out a 400
    for bad, says in (
        ({"max_new_tokens": 64.0}, "max_new_tokens must be an int"),
        ({"top_p": 5}, "top_p must be in"),
        ({"temperture": 0.6}, "unknown field"),
    ):
        with pytest.raises(ValueError, match=f"sampling_defaults: .*{says}"):
            ServeConfig(model_name=MODEL, sampling_defaults=bad)
    assert ServeConfig(
        model_name=MODEL, sampling_defaults={"max_new_tokens": 64, "top_k": 20}
    ).sampling_defaults


def test_serve_never_takes_a_port_another_server_listens_on_windows(monkeypatch):
    """On Windows SO_REUSEADDR lets a bind take a port another socket listens on: a second
    `nanoseek serve` on a busy port started (sharing it) where the one-line refusal was promised."""
    import socket
    import sys

    from nanoseek.commands.serve import _listen

    for platform in ("linux", "win32"):
        monkeypatch.setattr(sys, "platform", platform)
        with _listen("127.0.0.1", 0) as sock:
            reuse = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert bool(reuse) == (platform != "win32")
    # an IPv6 address gets an IPv6 socket (where this machine has IPv6 loopback)
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with _listen("::1", 0) as sock:
        assert sock.family == socket.AF_INET6


def test_cli_serve_takes_an_ipv6_host_in_brackets(tmp_path, tok, model, monkeypatch, capsys):
    """`--host [::1]`, the address as a URL writes it (and as printed by this server), binds ::1; it
    was a "Name or service not known" refusal."""
    import socket

    import uvicorn

    from nanoseek.checkpoint import save_model
    from nanoseek.cli import main

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    ckpt = tmp_path / "ck"
    save_model(model, ckpt)
    tok.save(ckpt)
    bound = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: bound.append(sockets[0].getsockname()))
    assert main(["serve", str(ckpt), "--host", "[::1]", "--port", "0"]) == 0
    assert bound[0][0] == "::1"
    out, err = capsys.readouterr()  # loopback: no warning that it is reachable beyond this machine
    assert f"listening on http://[::1]:{bound[0][1]}" in out and "warning" not in out + err


def test_cli_serve_reports_a_forced_stop_as_interrupted_and_a_graceful_one_as_130(
    tmp_path, tok, model, monkeypatch, capsys
):
    """uvicorn raises Ctrl-C again once it stopped: after a graceful stop (the requests finished) serve
    exits 130 quietly; after a second Ctrl-C forced it (requests dropped) the interrupt goes on up and the
    CLI says "interrupted"."""
    import uvicorn

    from nanoseek.checkpoint import save_model
    from nanoseek.cli import main

    ckpt = tmp_path / "ck"
    save_model(model, ckpt)
    tok.save(ckpt)
    for forced in (False, True):

        def run(self, sockets, forced=forced):
            sockets[0].close()
            self.should_exit, self.force_exit = True, forced
            raise KeyboardInterrupt

        monkeypatch.setattr(uvicorn.Server, "run", run)
        assert main(["serve", str(ckpt), "--port", "0"]) == 130
        assert ("interrupted" in capsys.readouterr().err) == forced


def test_cli_serve_exits_non_zero_when_the_engine_dies(tmp_path, tok, model, monkeypatch, capsys):
    """A dead engine stops `nanoseek serve` with exit status 1, as vLLM's server stops, so a service
    manager's restart-on-failure brings it back (it went on answering 503 and exited 0)."""
    import threading

    import uvicorn

    from nanoseek.checkpoint import save_model
    from nanoseek.cli import main
    from nanoseek.engine.engine import Engine

    ckpt = tmp_path / "ck"
    save_model(model, ckpt)
    tok.save(ckpt)

    def broken(self):
        raise RuntimeError("device lost")

    monkeypatch.setattr(Engine, "has_unfinished", broken)
    run, timed_out = uvicorn.Server.run, []

    def run_with_watchdog(self, sockets):  # a server that never stops fails the test instead of hanging it
        watchdog = threading.Timer(60, lambda: (timed_out.append(1), setattr(self, "should_exit", True)))
        watchdog.start()
        try:
            return run(self, sockets=sockets)
        finally:
            watchdog.cancel()

    monkeypatch.setattr(uvicorn.Server, "run", run_with_watchdog)
    assert main(["serve", str(ckpt), "--port", "0"]) == 1 and not timed_out
    assert "the engine failed: RuntimeError('device lost')" in capsys.readouterr().err


# ------------------------------------------------------------ hostile clients
def test_oversized_and_deeply_nested_bodies_are_400s(tok):
    """A body over the limit is a 413 before it is read whole; nesting past Python's recursion limit is a 400,
    not an unhandled RecursionError (500 and a dropped connection)."""
    app = create_app(ScriptedEngine(tok), tok, ServeConfig(model_name=MODEL, max_body_bytes=100_000))
    with LiveServer(app) as srv:
        big = {"model": MODEL, "prompt": "hello " * 50_000, "max_tokens": 1}
        assert _err(httpx.post(srv.url + "/v1/completions", json=big), 413)["code"] == "request_too_large"

        def chunked():  # no Content-Length: the limit holds while streaming too
            for _ in range(100):
                yield b" " * 10_000

        r = httpx.post(srv.url + "/v1/completions", content=chunked())
        assert _err(r, 413)["code"] == "request_too_large"
        deep = b'{"messages":' + b"[" * 20_000 + b"]" * 20_000 + b"}"
        assert _err(httpx.post(srv.url + "/v1/chat/completions", content=deep), 400)["code"] == "invalid_json"
        r = httpx.post(
            srv.url + "/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2}
        )
        assert r.status_code == 200


def test_a_compressed_body_is_a_415_naming_its_encoding(scripted):
    """A gzip-encoded body was parsed as it came and refused as JSON that "is not valid UTF-8"."""
    import gzip

    url = scripted.url + "/v1/chat/completions"
    body = json.dumps({"messages": USER, "max_tokens": 1}).encode()
    r = httpx.post(
        url,
        content=gzip.compress(body),
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    err = _err(r, 415)
    assert err["code"] == "unsupported_media_type" and "gzip" in err["message"]
    assert r.headers["accept-encoding"] == "identity"
    plain = {"content-type": "application/json", "content-encoding": "identity"}
    assert httpx.post(url, content=body, headers=plain).status_code == 200


def test_work_per_request_is_bounded_before_it_is_done(tok, monkeypatch):
    """A short list of prompts x n is refused before a choice is built for each (300 x 64 from a few kB took
    minutes of event loop and gigabytes); logit_bias (up to the body limit's million entries) is read once
    per request, not once per choice."""
    engine = ScriptedEngine(tok)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL))
    server = app.state.server
    calls = {"new_choice": 0, "logit_bias": 0}
    for name in calls:

        def counted(*args, _real=getattr(server, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(server, name, counted)
    with LiveServer(app) as srv:
        many = {"model": MODEL, "prompt": [[5]] * (server.engine.max_pending + 1), "max_tokens": 1}
        assert _err(httpx.post(srv.url + "/v1/completions", json=many), 400)["param"] == "n"
        assert calls["new_choice"] == 0
        fits = {**many, "prompt": [[5]] * server.engine.max_pending}  # as many as it holds: served
        assert httpx.post(srv.url + "/v1/completions", json=fits).status_code == 200
        bias = {"model": MODEL, "max_tokens": 1, "n": 8, "logit_bias": {"5": 1.0}}
        for route, body in (
            ("completions", {"prompt": ["hi", "ho"]}),
            ("chat/completions", {"messages": USER}),
        ):
            calls["logit_bias"] = 0
            assert httpx.post(f"{srv.url}/v1/{route}", json={**bias, **body}).status_code == 200
            assert calls["logit_bias"] == 1, route


def test_a_browsers_non_json_post_is_refused(tok):
    """A key-less server (the default: loopback, no --api-key) must not run requests a web page of another
    site sends: text/plain, form and multipart POSTs need no CORS preflight, so the browser sends them as
    they are. JSON from a browser (the chat page, behind a proxy too) and curl's form default still pass."""
    engine = ScriptedEngine(tok)
    with LiveServer(create_app(engine, tok, ServeConfig(model_name=MODEL))) as srv:
        body = json.dumps({"model": MODEL, "messages": USER, "max_tokens": 2})
        url = srv.url + "/v1/chat/completions"
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = httpx.post(
                url, content=body, headers={"Content-Type": kind, "Origin": "https://evil.example"}
            )
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        assert not engine.added
        page = {"Content-Type": "application/json", "Origin": "https://proxy.example"}  # any origin's JSON
        assert httpx.post(url, content=body, headers=page).status_code == 200
        curl = {"Content-Type": "application/x-www-form-urlencoded"}  # `curl -d` without -H: no Origin
        assert httpx.post(url, content=body, headers=curl).status_code == 200


def test_get_routes_answer_head(tok):
    """HEAD is GET without the body (RFC 9110 9.1): uptime monitors, load balancers and `curl -I` probe
    /health with it, and got 405."""
    with LiveServer(create_app(ScriptedEngine(tok), tok, ServeConfig(model_name=MODEL))) as srv:
        for path in ("/health", "/v1/models", f"/v1/models/{MODEL}", "/tokenizer_info", "/metrics", "/"):
            r = httpx.head(srv.url + path)
            assert r.status_code == 200 and r.content == b"", path
        assert httpx.head(srv.url + "/v1/models/gpt-9").status_code == 404
        assert httpx.head(srv.url + "/v1/chat/completions").status_code == 405  # POST routes as before


def test_a_client_that_hangs_up_mid_upload_is_a_499_not_a_500(tok):
    """A client gone before its body is all sent was an unhandled ClientDisconnect: a traceback in the log
    and a 500 in /metrics' requests_total (a server-error alert for a client's hang-up)."""
    import socket

    with LiveServer(create_app(ScriptedEngine(tok), tok, ServeConfig(model_name=MODEL))) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"messages": ['
            )
        deadline, counted = time.time() + 5, []
        while not counted and time.time() < deadline:
            metrics = httpx.get(srv.url + "/metrics").text
            counted = [line for line in metrics.splitlines() if 'route="/v1/chat/completions"' in line]
            time.sleep(0.05)
        assert counted and all('status="499"' in line for line in counted), counted
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
        assert r.status_code == 200


# ------------------------------------------------------------------- properties
# In process (FastAPI's TestClient over a ScriptedEngine whose reply each example sets): hundreds of requests a
# second, so the properties can state what holds for any body, any reply, any sequence of requests.
@pytest.fixture(scope="module")
def inproc(tok):
    from fastapi.testclient import TestClient

    reply = {"ids": tok.encode(f"{REASONING}\n</think>\n\n{ANSWER}")}
    engine = ScriptedEngine(tok, lambda prompt, params: list(reply["ids"]), max_seq_len=4096)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL))
    with TestClient(app, raise_server_exceptions=False) as client:  # a 500 is an answer to look at
        client.reply, client.engine, client.server = reply, engine, app.state.server
        yield client


def _sse_events(text: str) -> list[dict]:
    """A stream's JSON events; it ends with [DONE] and carries no error."""
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]", text[-300:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not [c for c in chunks if "error" in c], text[-1000:]
    return chunks


def _of(chunks: list[dict], index: int) -> list[dict]:
    """The stream's choice deltas of choice `index`."""
    return [c for chunk in chunks for c in chunk["choices"] if c["index"] == index]


_SCHEMAS = {
    "/v1/chat/completions": protocol.ChatCompletionRequest,
    "/v1/completions": protocol.CompletionRequest,
    "/tokenize": protocol.TokenizeRequest,
    "/detokenize": protocol.DetokenizeRequest,
}
_VALID = {
    "/v1/chat/completions": {"model": MODEL, "messages": USER, "max_tokens": 3},
    "/v1/completions": {"model": MODEL, "prompt": "Hi", "max_tokens": 3},
    "/tokenize": {"model": MODEL, "prompt": "Hi"},
    "/detokenize": {"model": MODEL, "tokens": [5, 6]},
}


def _well_formed(route: str, body: Any, r: httpx.Response) -> None:
    """200 with an OpenAI body, or a 4xx with OpenAI's error object naming the problem: never a 500."""
    assert r.status_code < 500 and "Traceback" not in r.text, r.text[:2000]
    if r.status_code >= 400:
        err = _err(r, r.status_code)
        assert isinstance(err["message"], str) and err["message"] and "'None'" not in err["message"], err
        if err["param"] is not None:  # a field the request sent, or one of its schema's (a missing one)
            sent = body if isinstance(body, dict) else {}
            assert err["param"].split(".")[0] in {*sent, *_SCHEMAS[route].model_fields}, err
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        _sse_events(r.text)
        return
    d = r.json()
    if route == "/tokenize":
        assert d["count"] == len(d["tokens"])
    elif route == "/detokenize":
        assert isinstance(d["prompt"], str)
    else:
        assert d["object"] in ("chat.completion", "text_completion") and d["choices"], d
        usage = d["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert all(c["finish_reason"] in ("stop", "length", "tool_calls") for c in d["choices"])


# Any JSON value, NaN and ±Infinity included (Python's JSON writes and reads them), ints past int64, a long string
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["", "auto", "none", "required", "function", "text", "user", "tool", "5", "x" * 5000]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["type", "function", "name", "text", "role", "content", "parameters", "5"])
            | st.text(max_size=3),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)
# What a mutation replaces: each request field (the four routes' together), unknown ones, nested ones
_PATHS = [
    *sorted({name for schema in _SCHEMAS.values() for name in schema.model_fields}),
    *["response_format", "functions", "function_call", "modalities", "guided_json", "unknown_field"],
    *["messages.0", "messages.0.role", "messages.0.content", "messages.0.content.0", "messages.1"],
    *["messages.0.tool_calls", "messages.0.tool_call_id", "tools.0", "tools.0.function"],
    *["tools.0.function.name", "tools.0.function.parameters", "chat_template_kwargs.thinking"],
    *["stream_options.include_usage", "stream_options.continuous_usage_stats", "logit_bias.5"],
    *["prompt.0", "tokens.0"],
]
_DELETE = object()


def _mutate(body: dict, path: str, value: Any) -> None:
    """Set `path` (dotted, list items by index) in `body` to `value` (`_DELETE`: remove it), building the
    objects missing on the way."""
    *parents, last = path.split(".")
    node: Any = body
    for key in parents:
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                return
            key = int(key)
        if not isinstance(node.get(key) if isinstance(node, dict) else node[key], dict | list):
            node[key] = {}
        node = node[key]
    if isinstance(node, list):
        if last.isdigit() and value is not _DELETE:
            node[int(last) :] = [value]
    elif value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value


@settings(max_examples=70)
@given(
    route=st.sampled_from(sorted(_VALID)),
    stream=st.booleans(),
    mutations=st.lists(st.tuples(st.sampled_from(_PATHS), st.just(_DELETE) | _JSON), min_size=1, max_size=3),
)
def test_any_mutation_of_a_request_is_an_answer_or_an_openai_error_never_a_500(
    inproc, route, stream, mutations
):
    """A valid request with up to three fields replaced by any JSON (wrong types, NaN, huge ints, null where an
    object goes, unknown fields, tools of any schema, logit_bias of any key) or removed is a 200 with OpenAI's
    body, a stream ending in [DONE], or a 4xx whose OpenAI error object names a field of the request."""
    inproc.reply["ids"] = inproc.server.tokenizer.encode(ANSWER)
    body = json.loads(json.dumps(_VALID[route]))
    if stream and route.startswith("/v1/"):
        body["stream"] = True
    for path, value in mutations:
        _mutate(body, path, value)
    r = inproc.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
    _well_formed(route, body, r)


@settings(max_examples=60)
@given(route=st.sampled_from(sorted(_VALID)), body=_JSON)
def test_any_json_body_is_an_answer_or_an_openai_error_never_a_500(inproc, route, body):
    _well_formed(route, body, inproc.post(route, content=json.dumps(body)))


# Replies as a model writes them (R1's think block, DeepSeek's tool-call markup whole or broken, stop strings'
# text, multi-byte characters), or any token ids (a character cut between tokens, a lone byte)
_PIECES = [" The", " answer", " is", " 4", ".", "\n", "\n\n", "<think>", "</think>", "é", "数学", "🙂"]
_PIECES += [TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, "get_weather", "other", TOOL_SEP, '{"city": "Paris"}', "{"]
_PIECES += [
    TOOL_CALL_END,
    TOOL_CALLS_END,
    "<｜User｜>",
    "<｜end▁of▁sentence｜>",
    "</th",
    "Hello world",
    "END",
]
_PIECES += [_call("get_weather", '{"city": "Paris"}'), _call("get_weather", "{x}")]
_REPLIES = st.one_of(
    st.lists(st.sampled_from(_PIECES), max_size=14).map("".join),
    st.lists(st.integers(0, 399), max_size=10),
    # calls that parse, after some reasoning and an answer
    st.tuples(st.sampled_from(["", "hmm</think>\n\n", "hmm\n</think>Sure."]), st.integers(1, 2)).map(
        lambda t: t[0] + TOOL_CALLS_BEGIN + _call("get_weather", '{"city": "東京"}') * t[1] + TOOL_CALLS_END
    ),
)
_STOPS = [
    "4",
    "is",
    " answer",
    "</think>",
    "\n",
    "🙂",
    "数",
    "Paris",
    "e",
    "answer is 4",
    ".\n",
    "Hello world",
]
_STOPS += ["world", "END", "</thi"]
# tokens an engine step gives (one, or an accepted speculative draft of several): ScriptedEngine.step_sizes
_STEP_SIZES = st.lists(st.integers(1, 4), min_size=1, max_size=5)
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def _script(client: Any, tok: Any, reply: str | list[int], sizes: list[int] | None = None) -> list[int]:
    """Make `reply` (text, or ids taken modulo the vocabulary) the scripted engine's next replies, given `sizes`
    tokens a step; its ids (an EOS among them left out)."""
    ids = tok.encode(reply) if isinstance(reply, str) else [i % tok.vocab_size for i in reply]
    client.reply["ids"] = [i for i in ids if i != tok.eos_token_id]
    client.engine.step_sizes = sizes or (1,)
    return client.reply["ids"]


@settings(max_examples=80)
@given(
    reply=_REPLIES,
    stop=st.none() | st.lists(st.sampled_from(_STOPS), min_size=1, max_size=3),
    max_tokens=st.none() | st.integers(1, 20),
    tool_choice=st.sampled_from(
        [
            None,
            "no tools",
            "auto",
            "none",
            "required",
            {"type": "function", "function": {"name": "get_weather"}},
        ]
    ),
    thinking=st.sampled_from([None, {"thinking": False}, {"enable_thinking": True}]),
    n=st.integers(1, 2),
    parallel=st.none() | st.booleans(),
    sizes=_STEP_SIZES,
)
def test_a_streamed_chat_answer_is_the_whole_answer_and_its_usage_counts_the_tokens(
    inproc, tok, reply, stop, max_tokens, tool_choice, thinking, n, parallel, sizes
):
    """For any reply, stop strings, tools and tool_choice, thinking on or off, n, and tokens given one or
    several a step: the stream's deltas join into the non-streamed message (content, reasoning_content, tool
    calls, finish_reason, each token's logprobs), which is the reply's text as a token loop reads it (below)
    split at `</think>` and parsed for calls as a whole; the usage is the same, prompt_tokens is /tokenize's
    count of the same messages, and completion_tokens is one logprob entry per token."""
    ids = _script(inproc, tok, reply, sizes)
    body = {
        "messages": USER,
        "max_tokens": max_tokens,
        "stop": stop,
        "n": n,
        "chat_template_kwargs": thinking,
    }
    if tool_choice != "no tools":
        body.update(tools=[WEATHER_TOOL], tool_choice=tool_choice, parallel_tool_calls=parallel)
    body.update(logprobs=True, top_logprobs=2)
    r = inproc.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    whole = r.json()
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = _sse_events(inproc.post("/v1/chat/completions", json=stream).text)
    assert chunks[-1]["usage"] == whole["usage"]
    for choice in whole["choices"]:
        mine, message = _of(chunks, choice["index"]), choice["message"]
        assert "".join(c["delta"].get("content") or "" for c in mine) == (message["content"] or "")
        reasoning = "".join(c["delta"].get("reasoning_content") or "" for c in mine)
        assert reasoning == (message.get("reasoning_content") or "")
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [choice["finish_reason"]]
        calls = [t["function"] for c in mine for t in c["delta"].get("tool_calls") or []]
        assert calls == [t["function"] for t in message.get("tool_calls") or []]
        if calls:  # a call the request named ends with "stop", as OpenAI's
            assert choice["finish_reason"] == ("stop" if isinstance(tool_choice, dict) else "tool_calls")
        else:
            assert choice["finish_reason"] != "tool_calls"
        assert all(isinstance(json.loads(call["arguments"]), dict) for call in calls)
        assert [e for c in mine if c["logprobs"] for e in c["logprobs"]["content"]] == choice["logprobs"][
            "content"
        ]
        if tool_choice in ("no tools", "auto", None) and parallel is not False:
            # the whole text at once: cut at its first stop string, split at </think> (R1's template opened
            # <think> unless thinking is off), its calls parsed
            text, finish, _ = _brute_force_completion(tok, ids, stop or [], max_tokens)
            reasoning, content = "", text
            if thinking != {"thinking": False}:
                splitter = ReasoningSplitter(started_in_think=True)
                (r1, c1), (r2, c2) = splitter.push(text), splitter.flush()
                reasoning, content = r1 + r2, c1 + c2
            parsed = parse_tool_calls(content, ["get_weather"]) if tool_choice != "no tools" else None
            content, whole_calls = parsed if parsed else (content, [])
            assert (message.get("reasoning_content") or "", message["content"] or "") == (reasoning, content)
            assert calls == [c["function"] for c in whole_calls]
            assert choice["finish_reason"] == ("tool_calls" if whole_calls else finish)
    usage = whole["usage"]
    assert sum(len(c["logprobs"]["content"]) for c in whole["choices"]) == usage["completion_tokens"]
    counted = {k: body[k] for k in ("messages", "tools", "tool_choice", "chat_template_kwargs") if k in body}
    assert inproc.post("/tokenize", json=counted).json()["count"] == usage["prompt_tokens"]


def _brute_force_completion(tok: Any, ids: list[int], stops: list[str], max_tokens: int | None) -> tuple:
    """(text, finish_reason, completion_tokens) by a loop over the reply's tokens and EOS: the text is the bytes
    so far, special tokens left out and an unfinished character held; the first token whose text holds a stop
    string ends it there."""
    import codecs

    table, out, text = tok.token_bytes(), [], ""
    for token in [*ids, tok.eos_token_id][: max_tokens or None]:
        out.append(token)
        ended = token in tok.stop_token_ids
        data = b"".join(table[t] for t in out[: len(out) - ended] if t not in tok.special_token_ids)
        text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data)
        # the stop string that completes first (the longest of those ending together) cuts the text at its start
        hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
        if hits or ended:
            return text[: min(hits, default=(0, len(text)))[1]], "stop", len(out)
    return text, "length", len(out)


@settings(max_examples=100)
@given(
    reply=_REPLIES,
    stop=st.lists(st.sampled_from(_STOPS), max_size=3),
    max_tokens=st.none() | st.integers(1, 20),
    echo=st.booleans(),
    logprobs=st.none() | st.integers(0, 3),
    sizes=_STEP_SIZES,
)
def test_a_completion_is_what_a_token_loop_gives_streamed_or_not(
    inproc, tok, reply, stop, max_tokens, echo, logprobs, sizes
):
    """For any reply and stop strings, and tokens given one or several a step: the text, finish_reason and
    completion_tokens are a brute-force loop's over the reply's tokens; the stream's text, logprobs and usage
    join into the non-streamed answer's, and text_offset indexes the text in order."""
    ids = _script(inproc, tok, reply, sizes)
    echo = echo and logprobs is None  # an echoed prompt's logprobs need the model (prompt scoring)
    body = {
        "prompt": "Hi",
        "max_tokens": max_tokens,
        "stop": stop or None,
        "echo": echo,
        "logprobs": logprobs,
    }
    whole = inproc.post("/v1/completions", json=body).json()
    choice = whole["choices"][0]
    text, finish, count = _brute_force_completion(tok, ids, stop, max_tokens)
    assert choice["text"] == ("Hi" if echo else "") + text
    assert (choice["finish_reason"], whole["usage"]["completion_tokens"]) == (finish, count)
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = _sse_events(inproc.post("/v1/completions", json=stream).text)
    assert "".join(c["text"] for c in _of(chunks, 0)) == choice["text"]
    assert chunks[-1]["usage"] == whole["usage"]
    if logprobs is not None:
        lp = choice["logprobs"]
        parts = [c["logprobs"] for c in _of(chunks, 0) if c["logprobs"]]
        assert {k: [v for p in parts for v in p[k]] for k in lp} == lp
        assert len(lp["tokens"]) == count
        # in order, within the text and the stop string it was cut at (whose tokens are counted, as vLLM's)
        assert lp["text_offset"] == sorted(lp["text_offset"])
        cut = max(map(len, stop), default=0) if finish == "stop" else 0
        assert all(0 <= o <= len(choice["text"]) + cut for o in lp["text_offset"])


def _scrape(client: Any) -> dict:
    """/metrics' samples: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for s in family.samples
    }


def _completion(route: str, body: dict, stream: bool) -> tuple:
    return (
        "POST",
        route,
        {**body, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})},
    )


_REQUESTS = st.one_of(
    st.builds(
        lambda mt, n, stream, stop: _completion(
            "/v1/chat/completions", {"messages": USER, "max_tokens": mt, "n": n, "stop": stop}, stream
        ),
        st.integers(-1, 30),
        st.integers(0, 3),
        st.booleans(),
        st.sampled_from([None, "4", "is", ""]),
    ),
    st.builds(
        lambda mt, n, stream, prompt, echo: _completion(
            "/v1/completions", {"prompt": prompt, "max_tokens": mt, "n": n, "echo": echo}, stream
        ),
        st.integers(-1, 30),
        st.integers(1, 3),
        st.booleans(),
        st.sampled_from(["Hi", ["a", "b"], [[5, 6]], [], [[]]]),
        st.booleans(),
    ),
    st.sampled_from(
        [
            ("POST", "/tokenize", {"prompt": "x"}),
            ("POST", "/detokenize", {"tokens": [-1]}),
            ("POST", "/v1/chat/completions", "{not json"),
            ("GET", "/v1/models", None),
            ("GET", "/v1/models/gpt-9", None),
            ("HEAD", "/health", None),
            ("DELETE", "/v1/models", None),
            ("GET", "/nowhere", None),
        ]
    ),
)


@settings(max_examples=50)
@given(batch=st.lists(_REQUESTS, min_size=1, max_size=4))
def test_metrics_counters_only_go_up_and_count_the_requests_made(inproc, tok, batch):
    """After any sequence of requests (served, refused, streamed, unknown routes, wrong methods): no counter went
    down, requests_total went up by one per request under its route and status, and the token and
    finish_reason counters by what the clients' answers hold (usage, finish_reason)."""
    from collections import Counter

    from nanoseek.serve.app import _route

    _script(inproc, tok, f"{REASONING}\n</think>\n\n{ANSWER}")
    before = _scrape(inproc)
    requests, finished, tokens = Counter(), Counter(), Counter()
    for method, path, body in batch:
        content = body if isinstance(body, str | None) else json.dumps(body)
        r = inproc.request(method, path, content=content, follow_redirects=False)
        requests[(_route(path), str(r.status_code))] += 1
        if r.status_code != 200 or "completions" not in path:
            continue
        if r.headers["content-type"].startswith("text/event-stream"):
            chunks = _sse_events(r.text)
            usage, choices = chunks[-1]["usage"], [c for chunk in chunks for c in chunk["choices"]]
        else:
            usage, choices = r.json()["usage"], r.json()["choices"]
        tokens.update(prompt_tokens=usage["prompt_tokens"], generation_tokens=usage["completion_tokens"])
        finished.update((c["finish_reason"],) for c in choices if c["finish_reason"])
    after = _scrape(inproc)
    assert all(v >= before.get(k, 0) for k, v in after.items() if not k[0].startswith("nanoseek:num_"))

    def grown(name: str) -> Counter:
        """How much each of the counter's label sets went up."""
        return +Counter(
            {
                tuple(v for _, v in labels): after[(n, labels)] - before.get((n, labels), 0)
                for n, labels in after
                if n == name
            }
        )

    assert grown("nanoseek:requests_total") == requests  # labels (route, status)
    assert grown("nanoseek:request_success_total") == finished
    for name in ("prompt_tokens", "generation_tokens"):
        assert grown(f"nanoseek:{name}_total")[()] == tokens[name], name


def test_the_work_of_a_request_is_bounded_whatever_its_n(tok, monkeypatch):
    """For any prompts, n, max_tokens, stop strings and stop ids: no more choices are built than the server holds
    (or one per prompt: a scoring pass), each stop string's tables are built once per request, and the engine
    gets each stop id once: n multiplied each of these, without bound, on the event loop (and the ids at every
    token on the engine thread)."""
    from fastapi.testclient import TestClient

    from nanoseek.serve import textstream

    engine = ScriptedEngine(tok)
    app = create_app(engine, tok, ServeConfig(model_name=MODEL, max_pending=6))
    server, built, tables = app.state.server, [], []
    new_choice, failure = server.new_choice, textstream._failure
    monkeypatch.setattr(server, "new_choice", lambda *a, **k: built.append(1) or new_choice(*a, **k))
    monkeypatch.setattr(textstream, "_failure", lambda s: tables.append(s) or failure(s))

    @settings(max_examples=60)
    @given(
        prompts=st.integers(1, 9),
        n=st.integers(1, 8),
        max_tokens=st.sampled_from([0, 1, 2]),
        stop=st.lists(st.sampled_from(["4", "is", "answer", "。"]), max_size=4),
        stop_ids=st.lists(st.integers(0, 20), max_size=40),
        chat=st.booleans(),
    )
    def check(prompts, n, max_tokens, stop, stop_ids, chat):
        built.clear(), tables.clear(), engine.added.clear()
        body = {"n": n, "stop": stop or None, "stop_token_ids": stop_ids}
        if chat:
            body.update(messages=USER, max_tokens=max_tokens or 1)
        else:
            body.update(prompt=[[5, 6]] * prompts, max_tokens=max_tokens)
        r = client.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
        # a chat's n (at most 64) may be built before it is refused; a list of prompts x n never is
        assert len(built) <= max(server.engine.max_pending, n if chat else prompts)
        if r.status_code != 200:
            assert _err(r, 400)["param"] == "n" and (chat or not built)
            return
        assert sorted(tables) == sorted(stop)
        for _, params in engine.added:
            assert params.stop_token_ids == [*tok.stop_token_ids, *dict.fromkeys(stop_ids)]

    with TestClient(app) as client:
        check()


def test_n_copies_of_prompts_that_generate_nothing_are_bounded_as_generations_are(inproc, monkeypatch):
    """max_tokens 0 skipped the prompts x n check: 3,000 token-id prompts x 64 (15 kB) built 192,000 choices,
    held the event loop 9 s and answered 13 MB, and the body limit allowed a thousand times that. n copies are
    refused as a generating request's are; one scoring pass of many prompts is served as before."""
    built = []
    new_choice = inproc.server.new_choice
    monkeypatch.setattr(inproc.server, "new_choice", lambda *a, **k: built.append(1) or new_choice(*a, **k))
    held = inproc.server.engine.max_pending
    many = {"prompt": [[5]] * (held // 2 + 1), "max_tokens": 0, "n": 2}  # 2 choices more than it holds
    for stream in (False, True):
        assert _err(inproc.post("/v1/completions", json={**many, "stream": stream}), 400)["param"] == "n"
    assert not built
    scored = {"prompt": [[5]] * (held + 1), "max_tokens": 0, "echo": True}
    once = inproc.post("/v1/completions", json=scored).json()
    assert [c["finish_reason"] for c in once["choices"]] == ["length"] * (held + 1)


def test_a_stop_id_sent_again_and_again_reaches_the_engine_once(inproc, tok):
    """Each repeat of a stop id was range-checked and copied for every choice on the event loop, and looked up
    by the engine at every token: a million (a 3 MB body) at n = 64 held the event loop 45 s."""
    inproc.reply["ids"] = tok.encode(ANSWER)
    body = {"messages": USER, "max_tokens": 2, "n": 2, "stop_token_ids": [7] * 1000 + [9, 7]}
    assert inproc.post("/v1/chat/completions", json=body).status_code == 200
    for _, params in inproc.engine.added[-2:]:
        assert params.stop_token_ids == [*tok.stop_token_ids, 7, 9]


def test_stop_strings_are_prepared_once_per_request_not_once_per_choice(inproc, tok, monkeypatch):
    """Each of n choices built its own KMP tables of every stop string: 16 stops of 100k characters (1.6 MB)
    at n = 64 held the event loop 56 s. Built once, each choice still stops on its own."""
    from nanoseek.serve import textstream

    tables, failure = [], textstream._failure
    monkeypatch.setattr(textstream, "_failure", lambda s: tables.append(s) or failure(s))
    inproc.reply["ids"] = tok.encode(ANSWER)
    body = {"prompt": "Hi", "max_tokens": 20, "n": 8, "stop": ["**", "answer is"]}
    r = inproc.post("/v1/completions", json=body).json()
    assert sorted(tables) == ["**", "answer is"]
    assert [(c["text"], c["finish_reason"]) for c in r["choices"]] == [("The ", "stop")] * 8
    tables.clear()
    chunks = _sse_events(inproc.post("/v1/completions", json={**body, "stream": True}).text)
    assert sorted(tables) == ["**", "answer is"]
    assert ["".join(c["text"] for c in _of(chunks, i)) for i in range(8)] == ["The "] * 8
