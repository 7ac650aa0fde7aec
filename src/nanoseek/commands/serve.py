"""`nanoseek serve DIR`: the OpenAI-compatible server (and web chat page) for a checkpoint directory.

One engine behind all requests (continuous batching), bound to loopback unless `--host` says otherwise.
With `--api-key` (or NANOSEEK_API_KEY) every route but /health and the page needs `Authorization: Bearer`.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import path
    from nanoseek.perf import AUTO_DTYPE_HELP, DEVICE_HELP, DTYPE_CHOICES, QUANTIZE_FORMATS, QUANTIZE_HELP

    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat with reasoning_content, completions) and a web chat page",
        description=(
            "Serve a checkpoint directory (config.json, safetensors, tokenizer files) over the OpenAI API: "
            "/v1/chat/completions, /v1/completions, /v1/models, /tokenize, /health, /metrics, and a chat "
            "page at /."
        ),
    )
    p.add_argument(
        "model",
        metavar="DIR",
        type=path,
        help="checkpoint directory with tokenizer files, or a Hugging Face Hub name (owner/name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("NANOSEEK_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $NANOSEEK_API_KEY; none = open)",
    )
    p.add_argument("--model-name", default=None, help="name clients use in 'model' (default: DIR's name)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="context length (default: the model's, or what the KV cache holds for one request if less; "
        "more than either is refused at startup)",
    )
    p.add_argument(
        "--kv-cache-mib",
        type=float,
        default=512,
        help="memory for the KV cache, in MiB (default 512): the requests decoded at once and the longest "
        "context it holds",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests in flight before 429 Too Many Requests (default 256)",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=16,
        help="largest request body accepted, in MiB (413 above it; default 16)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help=AUTO_DTYPE_HELP,
    )
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--quantize", choices=QUANTIZE_FORMATS, default=None, help=QUANTIZE_HELP)
    p.set_defaults(func=run)


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening (uvicorn serves on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # A restart may rebind a port its last run left in TIME_WAIT; on Windows the same flag lets the bind
    # take a port another server listens on (asyncio sets it on POSIX only, too).
    if sys.platform != "win32":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        # the hint only where it is the cause: not for a host this machine lacks or a port it may not bind
        hint = " (is another server there?)" if e.errno == errno.EADDRINUSE else ""
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    from nanoseek.perf import torch_threads

    with torch_threads(args.threads):  # (said first, with the other flags, before the weights load)
        return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import uvicorn

    from nanoseek import load_model
    from nanoseek.accounting import count_parameters
    from nanoseek.checkpoint import is_hub_name, resolve_checkpoint, resolve_device
    from nanoseek.commands.generate import colors_refused, speculation
    from nanoseek.engine import Engine
    from nanoseek.engine.quantize import check_quantize_device
    from nanoseek.engine.sampling import generation_defaults
    from nanoseek.perf import default_device
    from nanoseek.serve import ServeConfig, create_app
    from nanoseek.tokenizer import checkpoint_tokenizer

    # the flags first: a Hub name's resolve is its whole download (offline, the Hub's error for them)
    if args.host.startswith("[") and args.host.endswith("]"):  # an IPv6 address as URLs write it
        args.host = args.host[1:-1]
    if args.port < 0 or args.port > 65535:
        raise ValueError(f"--port {args.port} is not a TCP port")
    if not 0 < args.max_body_mb < math.inf:  # NaN fails too
        raise ValueError(f"--max-body-mb must be a positive finite number, got {args.max_body_mb}")
    if args.max_queue < 1:  # else the server starts healthy and refuses every request
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.max_batch_size < 1:  # said now, not by the engine after the weights load
        raise ValueError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.max_seq_len is not None and args.max_seq_len < 2:  # a prompt token and one to generate
        raise ValueError(f"--max-seq-len must be >= 2, got {args.max_seq_len}")
    if not 0 < args.kv_cache_mib < math.inf:
        raise ValueError(f"--kv-cache-mib must be a positive finite number, got {args.kv_cache_mib}")
    key = args.api_key
    if key and not (key.isascii() and key.isprintable() and key == key.strip()):
        # The key travels in a header: clients send it as ASCII (the OpenAI SDK's httpx refuses any other
        # character, curl's UTF-8 bytes were read back as Latin-1) and the server strips its spaces, so
        # such a key (a non-ASCII one, or one with a CR from a Windows .env file) never matched.
        raise ValueError(
            "--api-key (or $NANOSEEK_API_KEY) must be printable ASCII with no space or control character "
            "at either end: HTTP clients send it in a header"
        )
    # a device this machine lacks, w8a8 off a CPU (a GPU is the default device where there is one):
    # said now, not after a Hub name's download
    device = resolve_device(args.device or default_device())
    if args.quantize:
        check_quantize_device(args.quantize, device)
    sock = _listen(args.host, args.port)  # a busy port is said now, not after loading the weights
    port = sock.getsockname()[1]  # --port 0: the one the system picked
    try:
        directory = resolve_checkpoint(args.model, tokenizer=True)
        t0 = time.perf_counter()
        tokenizer = checkpoint_tokenizer(directory)  # one from another model: said before the weights load
        model = load_model(directory, dtype=args.dtype, device=device, quantize=args.quantize).eval()
        # from the config: int8 and packed weights are buffers or opaque tensors, not parameters
        params = count_parameters(model.config).described
        engine = Engine(
            model,
            max_batch_size=args.max_batch_size,
            max_seq_len=args.max_seq_len,
            # as generate and chat: a checkpoint without MTP weights (which load_model just warned
            # "speculative decoding is off for") is served plainly, not refused after its load
            speculative=speculation(model, args.speculative),
            cache_bytes=int(args.kv_cache_mib * 2**20),
            pack_weights=True,  # bf16/fp32 on a CPU: oneDNN's layout (engine/packed.py); else a no-op
        )
        # loading, quantizing and packing weights (w8a8 packs them all here) before the first request
        ready_s = time.perf_counter() - t0
        # A Hub name names the model better than its snapshot directory (a commit hash) would. A local one
        # by DIR's name as given (`.` the working directory's): a link's own (`models/current`, re-pointed
        # at each release, was served by its target's name, which changed under the clients), and where a
        # save cut short left it aside (`.grpo.tmp-old`; served as the whole path typed: "grpo" was a 404).
        local = Path(os.path.abspath(args.model)).name
        name = args.model_name or (args.model if is_hub_name(args.model) else local)
        defaults = generation_defaults(tokenizer.generation_config, directory / "generation_config.json")
        app = create_app(
            engine,
            tokenizer,
            ServeConfig(
                model_name=name,
                api_key=args.api_key or None,
                max_pending=args.max_queue,
                sampling_defaults=defaults,
                max_body_bytes=int(args.max_body_mb * 2**20),
            ),
            model=model,
        )
    except BaseException:
        # closed now, not when collected: a failed load (a damaged checkpoint, a cache too small)
        # must not hold the port for a retry on it (uvicorn closes it once serving)
        sock.close()
        raise
    server = app.state.server
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"nanoseek serve: model {name!r} ({directory}, {params}, context {server.max_context}, {device}/{str(model.dtype).removeprefix('torch.')}"
        f"{'' if args.quantize is None else ', ' + args.quantize}; ready in {ready_s:.1f} s)"
    )
    if defaults:
        print(
            "nanoseek serve: sampling defaults from generation_config.json: "
            + ", ".join(f"{k}={v}" for k, v in defaults.items())
        )
    print(
        f"nanoseek serve: listening on http://{shown_host}:{port}  (OpenAI base_url "
        f"http://{shown_host}:{port}/v1, chat page at /, auth {'on' if args.api_key else 'off'})",
        flush=True,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        # on stderr, as every warning: seen where stdout (the banner) goes to a log file
        print("nanoseek serve: warning: reachable beyond this machine and no --api-key set", file=sys.stderr)
    # uvicorn colours its log lines on any terminal: not where the environment refuses colour, as chat
    http = _server(uvicorn.Config(app, log_level="warning", use_colors=False if colors_refused() else None))
    server.engine.on_death = lambda e: setattr(http, "should_exit", True)
    try:
        http.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it stopped
        if http.force_exit:  # a second one dropped the requests in flight: `interrupted`
            raise
        return 130  # the requests finished, and `stopped` said so
    finally:  # uvicorn closes it once it served; not where its startup failed before (a no-op twice)
        sock.close()
    if server.engine.error is not None:
        print(f"nanoseek serve: stopped: the engine failed: {server.engine.error!r}", file=sys.stderr)
        return 1
    if not http.stopped_by_signal:
        print("nanoseek serve: stopped")
    return 0


def _server(config: Any) -> Any:
    """uvicorn's server, saying what a stop waits for. On Ctrl-C or SIGTERM it finishes the requests in
    flight first (its own line saying so is below log level warning: the server seemed to ignore the
    signal for as long as the longest generation ran); a second Ctrl-C drops them, which uvicorn logs
    as one error traceback per dropped request and one for the app's shutdown."""
    import contextlib
    import logging
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        stopped_by_signal = False

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            # uvicorn raises a signal it stopped on again as it leaves this, which ends the process by a
            # SIGTERM (clean, to systemd) before the line after `run` that says the server stopped
            with super().capture_signals():
                yield
                if getattr(self, "_captured_signals", None) and not self.force_exit:
                    self.stopped_by_signal = True
                    print("nanoseek serve: stopped", flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)  # first: a second signal may land while this one prints
            if self.force_exit:
                logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)  # dropped on request
            elif first and self.server_state.tasks:
                again = " (Ctrl-C again to stop now)" if sig == signal.SIGINT else ""
                n = len(self.server_state.tasks)
                print(
                    f"nanoseek serve: stopping once {n} request(s) in flight finish{again}",
                    file=sys.stderr,
                    flush=True,
                )

    return Server(config)
