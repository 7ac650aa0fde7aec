"""Prometheus metrics for the server, through `prometheus_client` (one registry per server).

Counters and histograms are updated from the event loop and the engine thread (the client library is
thread-safe); gauges (running / waiting requests, cache usage, preemptions, prefix-cache hits, speculative
acceptance) read the engine's snapshot at scrape time.
Names follow vLLM's where one exists (`nanoseek:time_to_first_token_seconds`, ...), so existing
dashboards need only a prefix change.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


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
            # vLLM's num_preemptions: a cache too small for the load shows here (usage alone sits near 1
            # either way), as requests sent back to wait whose tokens are computed again
            (
                "num_preemptions",
                "Running requests preempted since start for want of KV-cache blocks (their tokens recomputed).",
                stat("preemptions"),
            ),
            (
                "prefix_cache_hit_blocks",
                "Cache blocks reused from the prefix cache since start (prompt prefixes computed once).",
                stat("prefix_cache_hit_blocks"),
            ),
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
