"""Run a training function on N gloo ranks (spawned processes) and collect each rank's JSON result."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(
    rank: int, fn: Callable[..., dict], world: int, port: int, run_dir: str, result: str
) -> None:
    Path(f"{result}.{rank}").write_text(json.dumps(fn(run_dir, world, rank, port)))


def run_ranks(fn: Callable[..., dict], world: int, run_dir: str, result: str) -> list[dict]:
    """`fn(run_dir, world, rank, port) -> dict` on `world` processes; returns the dicts by rank."""
    mp.spawn(_rank_worker, args=(fn, world, free_port(), run_dir, result), nprocs=world, join=True)
    return [json.loads(Path(f"{result}.{r}").read_text()) for r in range(world)]
