"""Shared test setup: deterministic, one intra-op thread.

Test models are tiny: a second thread buys little, and with several processes (the 2-rank distributed
tests, the server in its own process) spinning OpenMP threads on 2 cores it costs 10-50x.
"""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
