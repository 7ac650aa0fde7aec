"""Prometheus metrics for the server, through `prometheus_client` (one registry per server).

Counters and histograms are updated from the event loop and the engine thread (the client library is
thread-safe); gauges (running / waiting requests, cache usage, prefix-cache hit rate, speculative
acceptance) and the engine's own counters (preemptions, prefix-cache queries and hits) read the engine's
snapshot at scrape time.
Names follow vLLM's where one exists (`nanoseek:time_to_first_token_seconds`, ...), so existing
dashboards need only a prefix change.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

# Up to what a CPU serving R1 sees: replies of thousands of tokens at a few a second run for tens of
# minutes, and a prompt queued behind others waits minutes for its first token. Past the last bound
# `histogram_quantile` answers that bound, whatever the latency: a 20-minute reply read as 300 s.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10, 30, 60, 120, 300, 600)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10, 30, 60, 120, 300, 600, 1200, 2400, 7200)


class ServerMetrics:
    """Everything /metrics exposes. `engine_stats` returns the engine thread's latest snapshot."""

    def __init__(self, engine_stats: Callable[[], dict]) -> None:
        p = "nanoseek:"
        self.engine_stats = engine_stats
        # A registry of its own: several servers (tests, one process) must not share counters.
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            p + "requests", "HTTP API requests by route and status code.", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens",
            "Prompt tokens, as the clients' usage counts them (each prompt once, whatever n; scored ones too).",
            registry=r,
        )
        self.generation_tokens = Counter(
            p + "generation_tokens",
            "Tokens generated, as the clients' usage counts them (completion_tokens).",
            registry=r,
        )
        self.finished = Counter(
            p + "request_success",
            "Choices finished, by the finish_reason their client got (abort: the client left first).",
            ["finished_reason"],
            registry=r,
        )
        self.rejected = Counter(
            p + "requests_rejected", "Requests refused with 429 because the queue was full.", registry=r
        )

        def stat(*keys: str) -> Callable[[], float]:
            def read() -> float:
                s = self.engine_stats()
                for k in keys:
                    if k in s and s[k] is not None:
                        return float(s[k])
                return 0.0

            return read

        def cache_usage() -> float:
            s = self.engine_stats()
            used, total = s.get("cache_blocks_used"), s.get("cache_blocks_total")
            return float(used) / float(total) if used is not None and total else 0.0

        for name, help, read in [
            ("num_requests_running", "Requests in the running batch.", stat("num_running")),
            ("num_requests_waiting", "Requests waiting for a batch slot.", stat("num_waiting")),
            ("kv_cache_usage_perc", "Fraction of latent KV-cache blocks in use (0..1).", cache_usage),
            (
                "prefix_cache_hit_rate",
                "Prefix-cache hits per block looked up.",
                stat("prefix_cache_hit_rate"),
            ),
            (
                "spec_decode_acceptance_rate",
                "Fraction of MTP draft tokens accepted (speculative decoding).",
                stat("spec_acceptance_rate"),
            ),
        ]:
            Gauge(p + name, help, registry=r).set_function(read)
        r.register(_EngineCounters(p, self.engine_stats))
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time from arrival to first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            p + "time_per_output_token_seconds",
            "Latency between output tokens.",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds",
            "Time from arrival to last token.",
            buckets=E2E_BUCKETS,
            registry=r,
        )

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class _EngineCounters:
    """Counts the engine keeps since it started, exposed as counters under vLLM's names (`_total`): as
    gauges (`nanoseek:num_preemptions`, `nanoseek:prefix_cache_hit_blocks`) a vLLM dashboard's
    `rate(vllm:num_preemptions_total[5m])` found nothing, and the prefix cache was counted in blocks where
    vLLM's `prefix_cache_queries` / `prefix_cache_hits` count prompt tokens."""

    def __init__(self, prefix: str, engine_stats: Callable[[], dict]) -> None:
        self.prefix, self.engine_stats = prefix, engine_stats

    def collect(self) -> list[CounterMetricFamily]:
        s = self.engine_stats()
        block = s.get("cache_block_size") or 0
        return [
            # a cache too small for the load shows here (usage alone sits near 1 either way), as requests
            # sent back to wait whose tokens are computed again
            CounterMetricFamily(
                self.prefix + "num_preemptions",
                "Running requests preempted for want of KV-cache blocks (their tokens recomputed).",
                value=s.get("preemptions") or 0,
            ),
            CounterMetricFamily(
                self.prefix + "prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache (whole blocks only).",
                value=(s.get("prefix_cache_queries") or 0) * block,
            ),
            CounterMetricFamily(
                self.prefix + "prefix_cache_hits",
                "Prompt tokens found in the prefix cache (computed once, reused).",
                value=s.get("prompt_tokens_reused") or 0,
            ),
        ]
