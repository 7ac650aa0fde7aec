"""Shared test setup: deterministic, one intra-op thread.

Test models are tiny: a second thread buys little, and with several processes (the 2-rank distributed
tests, the server in its own process) spinning OpenMP threads on 2 cores it costs 10-50x.
"""

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning on the shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
