"""Run a training function on N gloo ranks (spawned processes) and collect each rank's JSON result."""

from __future__ import annotations

import json
import os
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
    # what torchrun sets, so that `init_distributed` finds this rank's place
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    Path(f"{result}.{rank}").write_text(json.dumps(fn(run_dir, world, rank, port)))


def run_ranks(
    fn: Callable[..., dict], world: int, run_dir: str, result: str, check: bool = True
) -> list[dict | None]:
    """`fn(run_dir, world, rank, port) -> dict` on `world` processes, each with torchrun's environment
    (RANK, WORLD_SIZE, MASTER_ADDR/PORT); returns the dicts by rank. `check=False`: a rank may die (gloo
    aborts a process whose peer vanished mid-collective); every rank is waited for (2 minutes at most)
    and a rank that wrote no result gives None."""
    ranks = mp.spawn(_rank_worker, args=(fn, world, free_port(), run_dir, result), nprocs=world, join=check)
    if not check:
        for process in ranks.processes:
            process.join(timeout=120)
            assert not process.is_alive(), "a rank still runs after 2 minutes"
    files = [Path(f"{result}.{r}") for r in range(world)]
    return [json.loads(f.read_text()) if check or f.exists() else None for f in files]
