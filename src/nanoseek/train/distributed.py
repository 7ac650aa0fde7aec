"""Data-parallel training on PyTorch's own runtime: torchrun + FSDP2 (`fully_shard`).

What is notable here:
- `init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, NCCL on
  GPU. Without torchrun it returns a one-process `DistInfo` and nothing else changes.
- `shard_model()` applies FSDP2 per decoder block, then to the root. The root group holds the embedding,
  final norm, head and the MTP modules: MTP runs outside `forward` (`model.mtp_logits`), and FSDP2 keeps
  the root's parameters gathered from forward through backward, so those calls see full weights.
- Data sharding is by slicing the *global* batch: every rank reads the same stream and keeps its
  rows, so N processes see exactly the batch one process would, the data position is the same on
  every rank, and resuming needs nothing rank-specific.
- Checkpoints gather the full (unsharded) state dict; only rank 0 writes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

M = TypeVar("M", bound=nn.Module)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    nodes: int = 1  # the machines torchrun's agents run on (the report's cost counts them)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join torchrun's process group if there is one (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:  # (torch's own error: "CUDA error: invalid device ordinal", a traceback)
            raise ValueError(
                f"local rank {local_rank} has no GPU of its own: this machine has {gpus}; start at most "
                f"{gpus} processes on it (torchrun --nproc-per-node {gpus})"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1")) if world > 1 else 1  # torchrun's agents
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, nodes=nodes)


def destroy_distributed(failed: bool = False) -> None:
    """Leave the process group. `failed`: this rank is leaving on an error, so the other ranks may be
    inside a collective it will never join: no barrier, which would wait for them until the timeout
    (10 minutes) before the error was even shown; torchrun stops the others once this one exits."""
    if dist.is_initialized():
        if not failed:
            # every rank past its last collective first: a rank that tears gloo down while another is
            # still writing its files (rank 0's save) aborted the other one now and then (SIGABRT)
            dist.barrier()
        dist.destroy_process_group()


def shard_model(model: M, info: DistInfo) -> M:
    """FSDP2 over the data-parallel ranks: one unit per decoder block, the rest in the root unit."""
    if not info.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from nanoseek.train.expert_parallel import expert_parallel_parameters

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    # Routed experts already sharded by expert parallelism stay out of FSDP.
    ignored = expert_parallel_parameters(model) or None
    for block in model.model.layers:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    # The root is never resharded between forward and backward, so MTP (called after forward) and the
    # shared head see gathered weights.
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model


def shard_batch(batch: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's rows of a global batch (dim 0 must divide by the world size)."""
    if not info.enabled:
        return batch
    n = batch.shape[0]
    if n % info.world_size:
        raise ValueError(f"global batch size {n} is not divisible by world size {info.world_size}")
    per = n // info.world_size
    return batch[info.rank * per : (info.rank + 1) * per]


def all_reduce_(tensor: torch.Tensor, info: DistInfo, op: str = "sum", group: Any = None) -> torch.Tensor:
    """In-place all-reduce ("sum" | "mean" | "max"); a no-op in one process. `group`: one of
    `patient_group`'s (gloo: the tensor stays on the CPU)."""
    if not info.enabled:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    moved = tensor if group is not None else tensor.to(info.device)
    dist.all_reduce(moved, op=reduce_op, group=group)
    if op == "mean":
        moved /= info.world_size
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


# How long `patient_group`'s collectives wait: the process group's timeout (10 minutes) is for
# collectives every rank enters together, not for the others waiting while rank 0 works alone (trains a
# tokenizer on a large --tokenizer-docs). A rank 0 that fails says so through the collective, and one
# that dies closes its connections (and torchrun stops the job), so the long wait is only ever for work.
PATIENT_TIMEOUT_S = 7 * 24 * 3600.0


def patient_group(info: DistInfo) -> Any:
    """A gloo group over every rank whose collectives wait `PATIENT_TIMEOUT_S` (None in one process):
    every rank creates it, before rank 0 starts the work the others will wait for."""
    if not info.enabled:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=PATIENT_TIMEOUT_S))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def full_model_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (gathered across ranks when sharded; every rank must call)."""
    if not info.enabled:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # full_state_dict: plain tensors only (torch's type also allows DTensor, ShardedTensor, nesting)
    return cast(
        dict[str, torch.Tensor],
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
    )


def load_full_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor], info: DistInfo) -> None:
    """Copy full tensors into `model` (each rank keeping its shard); `nanoseek.checkpoint.check_keys`
    first, as strict=False lets a tied head be absent."""
    if not info.enabled:
        model.load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(
        model,
        state,  # type: ignore[arg-type]  # torch asks for dict[str, ValueType]: invariant, so not ours
        options=StateDictOptions(full_state_dict=True, strict=False),
    )


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    """Optimizer state keyed by parameter name (not position), unsharded, on CPU: the same format
    whatever the world size, so a run can resume on a different number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: parameters that never received a gradient (e.g. MTP with λ = 0) have no state.
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False)
    )
