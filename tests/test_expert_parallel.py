"""Expert parallelism on 2 gloo processes equals single-process training on the same global batch.

The model is built on the meta device, its experts sharded (EP = 2, 4 of 8 experts per rank), then
materialized and loaded with the single-process model's initial weights; the Trainer adds FSDP2 over
everything else. Tolerance: losses within 1e-5 relative and final weights within 1e-5 absolute
(fp32). The runs differ only in summation order (each rank's matmuls see half the rows; expert
gradients arrive through the all-to-all and are summed in another order), which stays near 1e-7
over a few steps; a wrong split, a missing 1/world gradient scale or a bias drifting between ranks
moves them by far more.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from nanoseek.model.moe import RoutedExperts

sys.path.insert(0, str(Path(__file__).parent))
from gloo import run_ranks  # noqa: E402
from test_train_loop import batch_at, micro_model  # noqa: E402

STEPS = 4
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def test_regroup_index_orders_rows_by_expert() -> None:
    from nanoseek.train.expert_parallel import _regroup_index

    # 2 source ranks x 3 local experts; rows arrive (rank, expert)-major.
    counts = torch.tensor([[1, 0, 2], [2, 1, 0]])
    arrival = [(0, 0), (0, 2), (0, 2), (1, 0), (1, 0), (1, 1)]  # (rank, expert) of each arriving row
    idx = _regroup_index(counts)
    grouped = [arrival[i] for i in idx.tolist()]
    assert [e for _, e in grouped] == [0, 0, 0, 1, 2, 2]
    assert sorted(idx.tolist()) == list(range(6))
    assert [r for r, e in grouped if e == 0] == [0, 1, 1]  # stable within an expert


def _train(run_dir: str, world: int = 1, rank: int = 0, port: int = 0) -> dict:
    from nanoseek.checkpoint import build_model
    from nanoseek.train.distributed import destroy_distributed, init_distributed, shard_batch
    from nanoseek.train.expert_parallel import (
        ExpertParallelExperts,
        load_full_state_dict,
        parallelize_experts,
    )
    from nanoseek.train.loop import OptimConfig, Trainer, language_model_loss

    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    reference = micro_model()
    if world > 1:
        model = build_model(reference.config, device="meta")
        parallelize_experts(model)
        n_ep = sum(isinstance(m, ExpertParallelExperts) for m in model.modules())
        assert n_ep == 2  # decoder layer 1 and the MTP layer
        model.to_empty(device="cpu")
        load_full_state_dict(model, reference.state_dict())
        local = model.model.layers[1].mlp.experts.gate_up_proj.to_local()
        assert local.shape[0] == 4
        assert torch.equal(local, reference.model.layers[1].mlp.experts.gate_up_proj[4 * rank : 4 * rank + 4])
    else:
        model = reference
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
    losses = []
    for step in range(STEPS):
        x, y = (shard_batch(t, info) for t in batch_at(step))
        metrics = tr.step(lambda x=x, y=y: language_model_loss(tr.model, x, y, mtp_weight=0.3))
        losses.append(metrics["loss"])
        assert "skipped" not in metrics
    from nanoseek.train.distributed import full_model_state_dict

    state = {k: v.tolist() for k, v in full_model_state_dict(tr.model, info).items()}
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias.tolist()
    if world > 1:
        # Trainer's gathered HF checkpoint resumes into a fresh expert-parallel model, exactly.
        tr.save({"pos": STEPS})
        fresh = build_model(reference.config, device="meta")
        parallelize_experts(fresh)
        fresh.to_empty(device="cpu")
        load_full_state_dict(fresh, micro_model(seed=5).state_dict())
        tr2 = Trainer(
            fresh,
            run_dir,
            "pretrain",
            tr.optim_config,
            total_steps=STEPS + 1,
            precision="fp32",
            bias_update_speed=0.01,
            dist=info,
        )
        assert tr2.resume() == {"pos": STEPS}
        tr.total_steps = STEPS + 1
        x, y = (shard_batch(t, info) for t in batch_at(STEPS))
        a = tr.step(lambda: language_model_loss(tr.model, x, y, mtp_weight=0.3))["loss"]
        b = tr2.step(lambda: language_model_loss(tr2.model, x, y, mtp_weight=0.3))["loss"]
        assert a == b, (a, b)
    out = {"losses": losses, "bias": bias, "world": info.world_size, "state": state}
    destroy_distributed()
    return out


@pytest.mark.slow
def test_expert_parallel_two_gloo_processes_match_one(tmp_path) -> None:
    single = _train(str(tmp_path / "one"))
    ranks = run_ranks(_train, 2, str(tmp_path / "two"), str(tmp_path / "result"))
    assert ranks[0]["world"] == 2
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["bias"] == ranks[1]["bias"]  # loads all-reduced: the same bias everywhere
    for a, b in zip(single["losses"], ranks[0]["losses"], strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    assert single["losses"][-1] < single["losses"][0]
    assert ranks[0]["bias"] == pytest.approx(single["bias"], abs=1e-6)
    assert any(b != 0 for b in single["bias"])  # the bias did move, so the comparison means something
    assert set(single["state"]) == set(ranks[0]["state"])
    for key, value in single["state"].items():
        torch.testing.assert_close(
            torch.tensor(ranks[0]["state"][key]), torch.tensor(value), rtol=0, atol=1e-5, msg=key
        )


def test_single_process_is_a_no_op_and_errors_are_clear() -> None:
    from nanoseek.train.expert_parallel import expert_mesh, expert_parallel_parameters, parallelize_experts

    model = micro_model()
    assert parallelize_experts(model) is model  # no process group: nothing to shard
    assert expert_parallel_parameters(model) == set()
    with pytest.raises(RuntimeError, match="torchrun"):
        expert_mesh()


def test_layouts_expert_parallelism_cannot_shard_are_refused(monkeypatch) -> None:
    """Checks made before any collective, so one process with a stand-in 2-rank world reaches them."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from nanoseek.train import expert_parallel as ep

    model = micro_model()  # 8 routed experts
    experts = model.model.layers[1].mlp.experts

    def mesh(size: int, ndim: int = 1):
        return SimpleNamespace(ndim=ndim, size=lambda: size, get_group=lambda: None, get_local_rank=lambda: 0)

    with pytest.raises(
        ValueError, match=r"n_routed_experts \(8\) must be divisible by the expert-parallel size \(3\)"
    ):
        ep.ExpertParallelExperts(experts, mesh(3))
    with pytest.raises(ValueError, match="1-D device mesh, got 2-D"):
        ep.ExpertParallelExperts(experts, mesh(2, ndim=2))

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    assert ep.parallelize_experts(model) is model  # torchrun with one process: nothing to shard
    assert isinstance(model.model.layers[1].mlp.experts, RoutedExperts)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="expert-parallel size 1 != world size 2"):
        ep.expert_mesh(ep_size=1)
    with pytest.raises(ValueError, match="mesh of 1 ranks in a world of 2"):
        ep.parallelize_experts(model, mesh(1))
    with pytest.raises(ValueError, match="no MoE layers with routed experts"):
        ep.parallelize_experts(torch.nn.Linear(2, 2), mesh(2))
    assert isinstance(model.model.layers[1].mlp.experts, RoutedExperts)  # untouched by the refusals


def test_load_full_state_dict_refuses_a_state_that_does_not_fill_the_model() -> None:
    """strict=False lets a tied head be absent; any other missing tensor would leave its parameter as
    `to_empty` left it (uninitialized memory), so it is named instead."""
    from nanoseek.train.expert_parallel import load_full_state_dict

    model = micro_model()
    state = micro_model(seed=1).state_dict()
    del state["model.layers.1.mlp.experts.down_proj"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts.down_proj"):
        load_full_state_dict(model, state)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_keeps_its_slice_of_a_real_models_experts(monkeypatch, rank: int) -> None:
    """pretrain parallelizes a model built with its weights (not on meta, where the load decides):
    rank r of 2 keeps experts 4r..4r+3 of the 8, both matrices. One process: the mesh a stand-in, the
    DTensor its local tensor."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from nanoseek.train import expert_parallel as ep

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(ep.DTensor, "from_local", lambda local, *args, **kwargs: local)
    mesh = SimpleNamespace(ndim=1, size=lambda: 2, get_group=lambda: None, get_local_rank=lambda: rank)
    experts = micro_model().model.layers[1].mlp.experts
    sharded = ep.ExpertParallelExperts(experts, mesh)
    assert torch.equal(sharded.gate_up_proj, experts.gate_up_proj[4 * rank : 4 * rank + 4])
    assert torch.equal(sharded.down_proj, experts.down_proj[4 * rank : 4 * rank + 4])
    assert sharded.grad_scale == 0.5


def test_parallelizing_a_parallelized_model_again_changes_nothing(monkeypatch) -> None:
    """A second `parallelize_experts` (a caller that cannot tell whether the model it got is sharded
    already) finds only ExpertParallelExperts: it leaves them as they are instead of refusing the model
    as one without MoE layers. One process: a stand-in 2-rank mesh, the DTensor its local tensor."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from nanoseek.train import expert_parallel as ep

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(ep.DTensor, "from_local", lambda local, *args, **kwargs: local)
    mesh = SimpleNamespace(ndim=1, size=lambda: 2, get_group=lambda: None, get_local_rank=lambda: 0)
    model = micro_model()
    assert ep.parallelize_experts(model, mesh) is model
    sharded = [m for m in model.modules() if isinstance(m, ep.ExpertParallelExperts)]
    assert len(sharded) == 2  # decoder layer 1 and the MTP layer
    assert ep.parallelize_experts(model, mesh) is model
    assert [m for m in model.modules() if isinstance(m, ep.ExpertParallelExperts)] == sharded
    assert all(m.gate_up_proj.shape[0] == 4 for m in sharded)  # 8 experts over 2 ranks, sliced once
