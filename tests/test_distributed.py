"""Data parallel with FSDP2 on gloo: 2 CPU processes match 1 process on the same global batch.

Tolerance: per-step losses within 1e-4 relative. The two runs differ only in fp32 summation order
(each rank's share of the step's mean over its rows, whose targets are masked unequally as a
pretraining batch's prompts are, then gradients averaged by reduce-scatter), so they agree to
~1e-6 over a few steps; routing is discrete, and a near-tie flipped by rounding could move a loss by
more, which 1e-4 still catches as a real bug (wrong sharding, a missing all-reduce, a bias that drifts
between ranks) while tolerating float noise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gloo import run_ranks  # noqa: E402
from test_train_loop import batch_at, micro_model  # noqa: E402

STEPS = 6
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def _train(run_dir: str, world: int = 1, rank: int = 0, port: int = 0) -> dict:
    from nanoseek.train.distributed import all_reduce_, destroy_distributed, init_distributed, shard_batch
    from nanoseek.train.loop import OptimConfig, StepTargets, Trainer, language_model_loss, target_counts

    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    model = micro_model()
    tr = Trainer(
        model,
        run_dir,
        "pretrain",
        OptimConfig(lr=1e-2, warmup_steps=2),
        total_steps=STEPS,
        precision="fp32",
        bias_update_speed=0.01,
        dist=info,
    )
    losses, lm_losses = [], []
    for step in range(STEPS):
        x, y = batch_at(step)
        y = y.clone()
        y[0, : y.shape[1] // 2] = -100  # prompts masked in one row: the ranks hold unequal numbers of targets
        x, y = (shard_batch(t, info) for t in (x, y))
        counts = target_counts(y, len(model.model.mtp_layers))
        all_reduce_(counts, info, "sum")
        targets = StepTargets(counts, info.world_size)
        m = tr.step(lambda x=x, y=y, t=targets: language_model_loss(tr.model, x, y, mtp_weight=0.3, step=t))
        losses.append(m["loss"])
        lm_losses.append(m["lm_loss"])
    tr.save({"pos": STEPS})
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias.tolist()
    out = {"losses": losses, "lm_losses": lm_losses, "bias": bias, "world": info.world_size}
    destroy_distributed()
    return out


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path) -> None:
    single = _train(str(tmp_path / "one"))
    ranks = run_ranks(_train, 2, str(tmp_path / "two"), str(tmp_path / "result"))
    assert ranks[0]["world"] == 2
    # every rank sees the same all-reduced loss and holds the same balancing bias
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["bias"] == ranks[1]["bias"]
    for a, b in zip(single["losses"], ranks[0]["losses"], strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    # the logged parts too, not rank 0's own
    assert ranks[0]["lm_losses"] == pytest.approx(single["lm_losses"], rel=1e-4)
    assert ranks[0]["bias"] == pytest.approx(single["bias"], abs=1e-6)
    assert single["losses"][-1] < single["losses"][0]

    # rank 0 wrote one full (unsharded) checkpoint that loads as a plain model and matches 1 process
    from nanoseek.checkpoint import load_model

    one = load_model(tmp_path / "one" / "pretrain").state_dict()
    two = load_model(tmp_path / "two" / "pretrain").state_dict()
    for k, v in one.items():
        assert torch.allclose(v, two[k], atol=1e-4), k

    # and a 1-process run resumes from the 2-process checkpoint (optimizer state is keyed by name)
    from nanoseek.train.loop import OptimConfig, Trainer

    model = micro_model(seed=9)
    tr = Trainer(
        model,
        tmp_path / "two",
        "pretrain",
        OptimConfig(lr=1e-2, warmup_steps=2),  # the run's settings: a resume refuses others
        total_steps=STEPS + 2,
        bias_update_speed=0.01,
    )
    assert tr.resume() == {"pos": STEPS} and tr.global_step == STEPS
    assert len(tr.optimizer.state) == sum(1 for p in model.parameters() if p.requires_grad)


def test_shard_batch_gives_each_rank_its_contiguous_rows_and_refuses_a_remainder() -> None:
    from nanoseek.train.distributed import DistInfo, shard_batch

    batch = torch.arange(12).view(6, 2)
    shards = [shard_batch(batch, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert torch.equal(torch.cat(shards), batch) and [s.shape[0] for s in shards] == [2, 2, 2]
    assert shard_batch(batch, DistInfo()) is batch
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by world size 4"):
        shard_batch(batch, DistInfo(rank=3, world_size=4))


def test_all_reduce_ops(monkeypatch) -> None:
    """Two ranks that hold [1, 4] and [3, 2]: "sum", "mean", "max" reduce them as named."""
    import torch.distributed as dist

    from nanoseek.train.distributed import DistInfo, all_reduce_

    other = torch.tensor([3.0, 2.0])

    def fake_all_reduce(t, op, group=None):  # what gloo would return with the other rank's tensor
        t.copy_(t + other if op == dist.ReduceOp.SUM else torch.maximum(t, other))

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    info = DistInfo(rank=0, world_size=2)
    for op, expected in (("sum", [4.0, 6.0]), ("mean", [2.0, 3.0]), ("max", [3.0, 4.0])):
        t = torch.tensor([1.0, 4.0])
        assert all_reduce_(t, info, op) is t and t.tolist() == expected, op
    one = torch.tensor([1.0, 4.0])
    assert all_reduce_(one, DistInfo(), "sum").tolist() == [1.0, 4.0]  # one process: as it was


@pytest.mark.parametrize("local_rank", [4, 5])
def test_more_processes_than_gpus_is_refused_by_name(monkeypatch, local_rank) -> None:
    """`torchrun --nproc-per-node 8` on a machine with 4 GPUs: ranks 4-7 ended in CUDA's "invalid device
    ordinal" traceback. GPUs are numbered 0-3: local rank 4, the first without one, is refused too."""
    from nanoseek.train.distributed import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set"))
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    with pytest.raises(
        ValueError, match=rf"local rank {local_rank} has no GPU .* has 4; .*--nproc-per-node 4\)"
    ):
        init_distributed()


def test_the_nodes_are_torchruns_agents_and_one_process_is_one_node(monkeypatch) -> None:
    """torchrun sets GROUP_WORLD_SIZE to the number of its agents (machines); the report prices a run
    by them. Rank 3 of 4 processes over 2 nodes reads nodes=2; one process is one node whatever the
    environment says."""
    import torch.distributed as dist

    from nanoseek.train.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # the group torchrun's ranks joined
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.local_rank, info.nodes) == (3, 4, 1, 2)
    assert not info.is_main and info.enabled
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # a plain `python` process, GROUP_WORLD_SIZE left over
        monkeypatch.delenv(name)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.nodes) == (0, 1, 1)
