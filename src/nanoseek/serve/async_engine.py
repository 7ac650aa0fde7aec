"""One engine, many HTTP requests: the engine runs in a single background thread; asyncio talks to it
through thread-safe queues.

The engine is single-threaded by design (nanoseek.engine), so every call into it happens on the
engine thread: requests are added and aborted by posting commands that the thread drains between
`step()`s. Step events go back to the event loop with `call_soon_threadsafe`, one asyncio queue per
HTTP request (which may hold several engine requests: `n` choices, a list of prompts). While there is
no work the thread blocks on its command queue, so an idle server burns no CPU.

Also on the engine thread: prompt scoring (log-probabilities of every prompt token and its top-k
alternatives, for `/v1/completions` with `echo` + `logprobs`), batched forward passes of the model, one
between two engine steps (streams go on). The engine's own `prompt_logprobs` gives only the chosen
token's value, and lm-evaluation-harness's greedy check needs the top alternatives at every prompt
position too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from nanoseek.serve.metrics import ServerMetrics

log = logging.getLogger("nanoseek.serve")


class QueueFullError(RuntimeError):
    """More requests are in flight than the server accepts; the client should retry later."""


class EngineDeadError(RuntimeError):
    """The engine thread died (a bug or an out-of-memory); the app answers 503 (`nanoseek serve` stops, status 1)."""


@dataclass
class _Entry:
    index: int
    group: RequestGroup
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    done: bool = False


@dataclass
class RequestGroup:
    """The engine requests behind one HTTP request; events arrive on `queue` as (index, StepEvent)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    request_ids: list[str] = field(default_factory=list)


@dataclass
class PromptScore:
    """log p(token_i | tokens_<i) for each prompt token (None for the first) and the top-k there."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


class AsyncEngine:
    def __init__(
        self,
        engine: Any,
        model: Any = None,
        metrics: ServerMetrics | None = None,
        max_pending: int = 256,
        stats_interval: float = 0.25,
    ) -> None:
        self.engine = engine
        self.model = model if model is not None else getattr(engine, "model", None)
        self.metrics = metrics
        self.max_pending = max_pending
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._entries: dict[str, _Entry] = {}
        self._pending = 0  # engine requests submitted and not yet finished (event-loop side count)
        self._ids = itertools.count()
        self._stats: dict = {"num_running": 0, "num_waiting": 0}
        self._stats_at = 0.0
        self._stats_interval = stats_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._error: BaseException | None = None
        # called on the engine thread once it has failed every open request (`nanoseek serve` stops
        # there and exits non-zero, as vLLM's server does, so a service manager restarts it)
        self.on_death: Callable[[BaseException], None] | None = None
        self._dying = threading.Lock()  # held to record the thread's failure and to queue commands
        # prompt scoring under way, oldest first
        self._scoring: list[tuple[Generator[None, None, list[PromptScore]], asyncio.Future]] = []

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        # An app's lifespan may run again (a TestClient per test, `uvicorn.run(app)` once more in a
        # notebook): a thread starts only once, so each start gets a new one, after the last has stopped.
        if self._thread.ident is not None:
            self._thread.join()
            self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._stop.clear()
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    @property
    def error(self) -> BaseException | None:
        """What stopped the engine thread, if it failed."""
        return self._error

    @property
    def pending(self) -> int:
        return self._pending

    def stats(self) -> dict:
        return dict(self._stats)

    # ------------------------------------------------------- event-loop API
    def submit(self, jobs: list[tuple[list[int], Any]]) -> RequestGroup:
        """Queue engine requests (prompt ids, SamplingParams); raises QueueFullError when over capacity."""
        self._check_alive()
        if self._pending + len(jobs) > self.max_pending:
            if self.metrics:
                self.metrics.rejected.inc()
            raise QueueFullError(
                f"the server is at capacity ({self._pending} requests in flight, limit {self.max_pending})"
            )
        loop = asyncio.get_running_loop()
        group = RequestGroup(loop=loop, queue=asyncio.Queue())
        now = time.perf_counter()
        adds = []
        for i, (prompt_ids, params) in enumerate(jobs):
            rid = f"req-{next(self._ids)}"
            group.request_ids.append(rid)
            adds.append(("add", rid, prompt_ids, params, _Entry(i, group, now)))
        self._enqueue(adds)
        self._pending += len(jobs)
        return group

    def _check_alive(self) -> None:
        if not self.alive:
            raise EngineDeadError(f"the engine thread has stopped: {self._error!r}")

    def _enqueue(self, commands: list[tuple]) -> None:
        """Queue commands that need an answer, or raise EngineDeadError. Under the lock the dying thread
        records its failure with: a command is refused here, or queued before the failure and failed by
        the thread as it stops (`_fail_queued`), never left waiting for an engine that is gone."""
        with self._dying:
            self._check_alive()
            # one queue item: the thread takes a request's choices (n > 1) in the same step, never the
            # first alone while the rest are still being put (they were prefilled apart, at random)
            self._commands.put(("group", commands))

    def abort(self, group: RequestGroup) -> None:
        """Free every unfinished request of the group (a client went away)."""
        for rid in group.request_ids:
            self._commands.put(("abort", rid))

    def abort_ids(self, request_ids: list[str]) -> None:
        """Free these requests (a stop string ended them)."""
        for rid in request_ids:
            self._commands.put(("abort", rid))

    def _release(self, n: int) -> None:
        self._pending -= n

    async def score_prompts(self, prompts: list[list[int]], top_k: int) -> list[PromptScore]:
        """Log-probabilities of every prompt token (and the top-k there), computed on the engine thread."""
        fut = asyncio.get_running_loop().create_future()
        self._enqueue([("score", prompts, top_k, fut)])
        return await fut

    # --------------------------------------------------------- engine thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished() or bool(self._scoring)
                try:
                    cmd = self._commands.get(block=not busy)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    self._handle(cmd)
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                if self._stop.is_set():
                    break
                if self._scoring:
                    self._score_batch()
                if self.engine.has_unfinished():
                    events = self.engine.step()
                    self._dispatch(events)
                self._refresh_stats()
        except BaseException as e:  # the engine broke: fail every open request instead of hanging them
            with self._dying:
                self._error = e
            for rid, entry in list(self._entries.items()):
                self._post(entry.group, (entry.index, e))
                self._entries.pop(rid, None)
            for _, fut in self._scoring:
                fut.get_loop().call_soon_threadsafe(_resolve, fut, e)
            self._fail_queued(e)
            if self.on_death is not None:
                self.on_death(e)

    def _fail_queued(self, error: BaseException) -> None:
        """Answer the commands still queued (requests that arrived during the failing step) with `error`."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            for one in cmd[1] if cmd[0] == "group" else [cmd]:
                if one[0] == "add":
                    entry = one[4]
                    self._post(entry.group, (entry.index, error), release=1)
                elif one[0] == "score":
                    fut = one[3]
                    fut.get_loop().call_soon_threadsafe(_resolve, fut, error)

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "group":
            for one in cmd[1]:
                self._handle(one)
        elif kind == "add":
            _, rid, prompt_ids, params, entry = cmd
            try:
                self.engine.add_request(prompt_ids, params, request_id=rid)
            except Exception as e:  # ValueError / EngineCapacityError: report to that request only
                self._post(entry.group, (entry.index, e), release=1)
                return
            self._entries[rid] = entry
        elif kind == "abort":
            rid = cmd[1]
            entry = self._entries.pop(rid, None)
            if entry is not None:
                self.engine.abort(rid)
                self._finish_metrics(entry)
                self._post(entry.group, None, release=1)
        elif kind == "score":
            _, prompts, top_k, fut = cmd
            self._scoring.append((self._score(prompts, top_k), fut))

    def _score_batch(self) -> None:
        """One forward of the oldest scoring request: a long one (lm-eval's loglikelihood batches) goes on
        between engine steps instead of stalling every stream until it is done."""
        scoring, fut = self._scoring[0]
        if fut.cancelled():  # its client hung up (`Server.until_disconnected`): nobody reads the scores
            self._scoring.pop(0)
            scoring.close()
            return
        try:
            next(scoring)
            return
        except StopIteration as done:
            result: Any = done.value
        except Exception as e:
            result = e
        self._scoring.pop(0)
        fut.get_loop().call_soon_threadsafe(_resolve, fut, result)

    def _dispatch(self, events: list) -> None:
        now = time.perf_counter()
        failed: dict[int, tuple[BaseException, list[str]]] = {}  # one failed forward fails all its rows
        for ev in events:
            entry = self._entries.get(ev.request_id)
            if entry is None:
                continue  # aborted meanwhile
            n = len(ev.new_token_ids)
            if n and self.metrics:
                if entry.first_token is None:
                    self.metrics.ttft.observe(now - entry.arrival)
                elif entry.last_token is not None:
                    for _ in range(n):
                        self.metrics.tpot.observe((now - entry.last_token) / n)
            if n:
                entry.first_token = entry.first_token or now
                entry.last_token = now
            release = 0
            if ev.finished:
                self._entries.pop(ev.request_id, None)
                self._finish_metrics(entry)
                release = 1
            # a request whose step failed gets its error; the engine serves on (Engine.step)
            error = getattr(ev, "error", None)
            if error is not None:  # the client gets its message; the operator, the traceback (once)
                failed.setdefault(id(error), (error, []))[1].append(ev.request_id)
            self._post(entry.group, (entry.index, ev if error is None else error), release=release)
        for error, ids in failed.values():
            log.error(
                "%s %s failed in the engine",
                "request" if len(ids) == 1 else "requests",
                ", ".join(ids),
                exc_info=error,
            )

    def _finish_metrics(self, entry: _Entry) -> None:
        """Latency only: tokens and finish reasons are counted as the client got them (`Server.release`)."""
        if self.metrics:
            self.metrics.e2e.observe(time.perf_counter() - entry.arrival)

    def _post(self, group: RequestGroup, item: Any, release: int = 0) -> None:
        def put() -> None:
            if release:
                self._release(release)
            if item is not None:
                group.queue.put_nowait(item)

        with contextlib.suppress(RuntimeError):  # event loop closed (server shutting down)
            group.loop.call_soon_threadsafe(put)

    def _refresh_stats(self) -> None:
        now = time.perf_counter()
        if now - self._stats_at < self._stats_interval and self.engine.has_unfinished():
            return
        self._stats_at = now
        stats: dict = {}
        with contextlib.suppress(Exception):  # stats are best-effort; never kill the engine thread
            stats.update(self.engine.stats())
        stats["num_running"] = getattr(self.engine, "num_running", 0)
        stats["num_waiting"] = getattr(self.engine, "num_waiting", 0)
        self._stats = stats

    def _score(
        self, prompts: list[list[int]], top_k: int, max_batch_tokens: int = 8192
    ) -> Generator[None, None, list[PromptScore]]:
        """One forward per batch of prompts, right-padded: under the causal mask padding after a prompt
        cannot change its logits, so batching gives each prompt the scores it would get alone. Yields after
        each batch; returns the scores."""
        import torch

        from nanoseek.model.loss import target_logprobs

        if self.model is None:
            raise RuntimeError("prompt scoring needs the model")
        device = next(self.model.parameters()).device
        # Eval mode: routers count expert load only in training, so scoring is not routing traffic.
        was_training = self.model.training
        self.model.eval()
        scores: list[PromptScore | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
        try:
            while order:
                batch = [order.pop(0)]
                while order and len(prompts[order[0]]) * (len(batch) + 1) <= max_batch_tokens:
                    batch.append(order.pop(0))
                width = max(len(prompts[i]) for i in batch)
                ids = torch.tensor(
                    [prompts[i] + [0] * (width - len(prompts[i])) for i in batch],
                    dtype=torch.long,
                    device=device,
                )
                with torch.inference_mode():
                    chosen, logp = target_logprobs(self.model(ids)[:, :-1], ids[:, 1:])  # t predicts t+1
                if top_k > 0:
                    vals, idx = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
                for row, i in enumerate(batch):
                    n = len(prompts[i])
                    top: list[list[tuple[int, float]] | None] = [None]
                    if top_k > 0:
                        top += [
                            list(zip(a, b, strict=True))
                            for a, b in zip(
                                idx[row, : n - 1].tolist(), vals[row, : n - 1].tolist(), strict=True
                            )
                        ]
                    else:
                        top += [[] for _ in range(n - 1)]
                    scores[i] = PromptScore(logprobs=[None, *chosen[row, : n - 1].tolist()], top=top)
                if order:
                    yield
        finally:
            self.model.train(was_training)
        return scores  # type: ignore[return-value]


def _resolve(fut: asyncio.Future, result: Any) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)
