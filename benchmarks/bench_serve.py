"""Load benchmark of `nanoseek serve` over loopback: requests/s, tokens/s, p50/p99 time to first token.

    python benchmarks/bench_serve.py                          # tiny random model, 1 / 8 / 32 clients
    python benchmarks/bench_serve.py --model RUN/sft --max-tokens 64 --concurrency 1 8 32

The server is a separate process (`nanoseek serve`), so client and engine do not share a GIL. Without
--model a throwaway checkpoint is written first: the `tiny` preset with random weights and a small
tokenizer trained on the built-in synthetic corpus. Each level runs `concurrency` clients that stream
chat completions (`ignore_eos`, so every request makes exactly --max-tokens tokens) until
--requests-per-level are done or --seconds-per-level has passed (bounded in count and in time).
TTFT = time from sending the request to the first generated text arriving (the role-only first chunk
does not count); tokens/s counts completion tokens from `usage` over the level's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm


def make_checkpoint(directory: Path, preset: str) -> Path:
    import itertools

    from nanoseek.checkpoint import load_model, save_model
    from nanoseek.data.synthetic import iter_documents
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(itertools.islice(iter_documents(seed=0), 2000), vocab_size=2048)
    model = load_model(preset)
    # The engine stops at the config's EOS; make it the tokenizer's (ids < tokenizer vocab <= model vocab).
    model.config = model.config.replace(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    save_model(model, directory)
    tok.save(directory)
    return directory


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                d = c.get("delta", {})
                if ttft is None and (d.get("content") or d.get("reasoning_content")):
                    ttft = time.perf_counter() - start
    end = time.perf_counter() - start
    return (ttft if ttft is not None else end), end, tokens


async def run_level(
    url: str, model: str, concurrency: int, n_requests: int, seconds: float, max_tokens: int
) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    results: list[tuple[float, float, int]] = []
    errors: list[str] = []
    counter = iter(range(n_requests))
    bar = tqdm(total=n_requests, desc=f"{concurrency:>3} clients", leave=False)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def worker(w: int) -> None:
            for i in counter:
                if time.perf_counter() - start > seconds:
                    return
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Client {w}, request {i}: what is {i} + {w}?"}],
                    "max_tokens": max_tokens,
                    "temperature": 0.7,
                    "seed": i,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                try:
                    results.append(await one_request(client, body))
                except Exception as e:  # keep measuring; report the failures
                    errors.append(str(e))
                bar.update(1)

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - start
    bar.close()
    ttfts = [r[0] for r in results]
    tokens = sum(r[2] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_ms": round(1000 * percentile(ttfts, 0.5), 1),
        "ttft_p99_ms": round(1000 * percentile(ttfts, 0.99), 1),
        "e2e_p50_ms": round(1000 * percentile([r[1] for r in results], 0.5), 1),
        "first_error": errors[0] if errors else None,
    }


def main() -> None:
    from nanoseek.options import thread_count

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: a throwaway random `--preset` model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-level", type=int, default=64, help="at most this many requests per level")
    ap.add_argument("--seconds-per-level", type=float, default=60.0, help="stop starting requests after this")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--threads", type=thread_count, default=2, help="torch threads in the server (OMP_NUM_THREADS)"
    )
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = (
            Path(args.model)
            if args.model
            else make_checkpoint(Path(tmp) / f"bench-{args.preset}", args.preset)
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        env.pop("NANOSEEK_API_KEY", None)
        cmd = [
            sys.executable,
            "-m",
            "nanoseek",
            "serve",
            str(ckpt),
            "--port",
            str(port),
            "--model-name",
            "bench",
        ]
        cmd += ["--max-batch-size", str(max(args.concurrency)), "--max-queue", str(4 * max(args.concurrency))]
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 180
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(
                        f"server did not start:\n{server.stdout.read() if server.stdout else ''}"
                    )
                time.sleep(0.2)
            # the server's banner (printed before it listens) names the device, dtype and quantization
            banner = next((ln.strip() for ln in server.stdout if ln.startswith("nanoseek serve: model")), "")
            # Warm-up (first forward passes allocate and compile kernels).
            asyncio.run(run_level(url, "bench", 1, 2, 60, 4))
            rows = [
                asyncio.run(
                    run_level(
                        url, "bench", c, args.requests_per_level, args.seconds_per_level, args.max_tokens
                    )
                )
                for c in args.concurrency
            ]
            metrics = httpx.get(url + "/metrics").text
        finally:
            server.terminate()
            server.wait(30)
    from nanoseek.perf import cpu_description

    cpu = cpu_description()
    if args.json:
        print(
            json.dumps(
                {"cpu": cpu, "server": banner, "max_tokens": args.max_tokens, "levels": rows}, indent=2
            )
        )
    else:
        print(f"cpu: {cpu}; {args.threads} server threads\n{banner}")
        print(
            f"{'clients':>7} {'reqs':>5} {'err':>4} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>10} {'TTFT p99':>10}"
        )
        for r in rows:
            print(
                f"{r['concurrency']:>7} {r['requests']:>5} {r['errors']:>4} {r['requests_per_s']:>7.2f} "
                f"{r['tokens_per_s']:>8.1f} {r['ttft_p50_ms']:>8.0f}ms {r['ttft_p99_ms']:>8.0f}ms"
            )
    hits = [line for line in metrics.splitlines() if line.startswith("nanoseek:prefix_cache_hits_total ")]
    best = max(rows, key=lambda r: r["tokens_per_s"])
    print(  # beside --json's object, stdout stays that one object
        f"bench_serve: best {best['tokens_per_s']:.1f} tok/s at {best['concurrency']} clients "
        f"({args.max_tokens} tokens/request); {hits[0] if hits else ''}",
        file=sys.stderr if args.json else sys.stdout,
    )
    if any(r["errors"] for r in rows):
        print("errors: " + "; ".join(str(r["first_error"]) for r in rows if r["errors"]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
