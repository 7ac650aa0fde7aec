"""Expert parallelism (EP) on PyTorch's own runtime: routed experts sharded across ranks, tokens moved
by all-to-all. Applied from outside the model, to a model built on the meta device or a real one.

What is notable here:
- `parallelize_experts(model, mesh)` swaps every `MoE.experts` (`RoutedExperts`, decoder and MTP
  layers) for `ExpertParallelExperts`: same parameter names and global shapes, but each rank stores
  only its contiguous slice of n_routed_experts / ep_size experts, as a DTensor sharded on dim 0
  (`Shard(0)`). Router, shared experts, attention and everything else stay replicated; FSDP2
  (`nanoseek.train.distributed.shard_model`) then shards those over the same ranks and leaves the
  experts alone (`expert_parallel_parameters` is its ignore list). The model file has no
  distributed code.
- Dispatch (GShard / DeepSeek-V3 §3.2): tokens sorted by global expert id are already grouped by
  destination rank; the per-expert counts are exchanged first (one small all-to-all), then the
  hidden states move with `all_to_all_single` and variable splits. The received rows (ordered by
  source rank, then expert) are regrouped by local expert, run through the SwiGLU experts, put back
  in arrival order and returned by a second all-to-all (combine). Gating weights and the sum over
  the top-k are applied on the token's home rank, exactly as the single-process `RoutedExperts`.
- Autograd: the backward of an all-to-all is the all-to-all with the splits swapped (`_AllToAll`).
  Each rank's loss is the mean over its own rows, so the gradient an expert receives is the sum of
  every rank's contribution; `_ScaleGrad` divides it by the data-parallel size, which makes it the
  gradient of the global mean loss, matching what FSDP2's averaging reduce-scatter does for the
  replicated parameters.
- Because experts are DTensors on the same mesh as FSDP2's shards, `clip_grad_norm_` sees one global
  norm, `get_model_state_dict` gathers full tensors for HF export, and torch.distributed.checkpoint
  (`nanoseek.train.dcp`) saves and reloads them at any world size.
- Balancing: each rank's routers count only its own tokens; `Trainer` all-reduces the loads before
  the bias update, so `e_score_correction_bias` stays identical on every rank.
- Scope: EP spans all ranks of the mesh and the mesh is the data-parallel world (EP = DP, as
  torchtitan's default). Hybrid layouts (experts replicated over several EP groups) and pipeline
  parallelism are not implemented.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from nanoseek.model.moe import MoE, RoutedExperts, combine_rows, grouped_swiglu, sort_by_expert
from nanoseek.perf import compute_dtype


# ------------------------------------------------------------- autograd ops
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward sends gradients back the way rows came."""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        out = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return out, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` (1 / data-parallel size for experts)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None
) -> torch.Tensor:
    """Differentiable variable-split all-to-all over dim 0 (works on gloo and NCCL)."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def _regroup_index(recv_counts: torch.Tensor) -> torch.Tensor:
    """Rows arrive ordered (source rank, local expert); the index that orders them (local expert,
    source rank), so each local expert's rows are contiguous. recv_counts: [ep, n_local]."""
    flat = recv_counts.flatten()
    starts = (flat.cumsum(0) - flat).view_as(recv_counts)  # where segment (r, j) starts on arrival
    seg_starts = starts.t().flatten()
    seg_lens = recv_counts.t().flatten()
    total = int(flat.sum())
    # Position within the regrouped buffer minus the segment's start there, plus its arrival start.
    offset = seg_starts - (seg_lens.cumsum(0) - seg_lens)
    return torch.repeat_interleave(offset, seg_lens, output_size=total) + torch.arange(
        total, device=recv_counts.device
    )


# --------------------------------------------------------------- the module
class ExpertParallelExperts(nn.Module):
    """Drop-in for `RoutedExperts` holding this rank's experts; forward = dispatch, compute, combine.

    `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] keep their names and global shapes as
    DTensors sharded on the expert dim, so state dicts look the same as the unparallelized model's.
    """

    def __init__(self, experts: RoutedExperts, mesh: DeviceMesh) -> None:
        super().__init__()
        if mesh.ndim != 1:
            raise ValueError(f"expert parallelism needs a 1-D device mesh, got {mesh.ndim}-D")
        self.mesh = mesh
        self.group = mesh.get_group()
        self.ep_size = mesh.size()
        self.ep_rank = mesh.get_local_rank()
        self.n_experts = experts.n_experts
        self.intermediate_size = experts.intermediate_size
        check_expert_parallel(self.n_experts, self.ep_size)
        self.n_local = self.n_experts // self.ep_size
        lo = self.ep_rank * self.n_local
        rows = slice(lo, lo + self.n_local)

        def shard(p: torch.Tensor) -> nn.Parameter:
            # Every rank holds the same full tensor (or a meta one): keep our slice, no communication.
            local = p.detach()[rows].clone()
            return nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False))

        self.gate_up_proj = shard(experts.gate_up_proj)
        self.down_proj = shard(experts.down_proj)
        # Expert grads gather every rank's tokens; /world makes them the global mean loss's gradient.
        self.grad_scale = 1.0 / dist.get_world_size()

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, local={self.n_local}, ep_rank={self.ep_rank}/{self.ep_size}"

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T,H], indices/weights [T,k] (global expert ids) -> [T,H] = Σ_k weight · expert_k(x)."""
        ep, n_local = self.ep_size, self.n_local
        # grouped by expert, hence by destination rank
        order, send_counts = sort_by_expert(indices, self.n_experts)
        token_of = order // indices.shape[1]
        # 1. counts: recv_counts[r, j] = rows rank r sends to our local expert j.
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        recv_counts = recv_counts.view(ep, n_local)
        input_splits = send_counts.view(ep, n_local).sum(1).tolist()
        output_splits = recv_counts.sum(1).tolist()
        # 2. dispatch, already in the experts' compute dtype (bf16 under autocast halves the bytes)
        dtype = compute_dtype(x)
        received = all_to_all(x[token_of].to(dtype), output_splits, input_splits, self.group)
        # 3. local experts on rows grouped by expert
        regroup = _regroup_index(recv_counts)
        ys = self._compute(received[regroup], recv_counts.sum(0).tolist(), dtype)
        ys = torch.empty_like(ys).index_copy(0, regroup, ys)  # back to arrival order
        # 4. combine, then weight and sum on the token's home rank (as RoutedExperts does)
        ys = all_to_all(ys, input_splits, output_splits, self.group)
        ys = ys * weights.flatten()[order].unsqueeze(-1).to(ys.dtype)
        return combine_rows(x, ys, token_of)

    def _compute(self, xs: torch.Tensor, counts: list[int], dtype: torch.dtype) -> torch.Tensor:
        gate_up_proj, down_proj = self.gate_up_proj, self.down_proj
        assert isinstance(gate_up_proj, DTensor) and isinstance(down_proj, DTensor)  # Parameters of DTensors
        gate_up = _ScaleGrad.apply(gate_up_proj.to_local(), self.grad_scale)
        down = _ScaleGrad.apply(down_proj.to_local(), self.grad_scale)
        # The same grouped kernel as the single-process RoutedExperts: one call per layer, so every rank
        # takes the same path through the collectives, and experts that received no rows still get a
        # (zero) gradient.
        offs = torch.tensor(counts, device=xs.device).cumsum(0).to(torch.int32)
        return grouped_swiglu(xs, gate_up, down, offs, dtype)


# ------------------------------------------------------------- public API
def check_expert_parallel(n_experts: int | None, ep_size: int) -> None:
    """Refuse a model whose routed experts cannot be split evenly over `ep_size` ranks (or has none)."""
    if not n_experts:
        raise ValueError("expert parallelism shards routed experts: the model has none (a dense model)")
    if n_experts % ep_size:
        raise ValueError(
            f"n_routed_experts ({n_experts}) must be divisible by the expert-parallel size ({ep_size})"
        )


def expert_mesh(ep_size: int | None = None, device_type: str | None = None) -> DeviceMesh:
    """A 1-D mesh over all ranks for expert parallelism (ep_size must equal the world size)."""
    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed initialized (run under torchrun)")
    world = dist.get_world_size()
    ep_size = ep_size or world
    if ep_size != world:
        raise ValueError(
            f"expert-parallel size {ep_size} != world size {world}: nanoseek shards experts over all "
            "ranks (EP = DP); hybrid EP x replicated-expert layouts are not implemented"
        )
    if device_type is None:
        from nanoseek.perf import default_device

        device_type = default_device().type
    # Unnamed, like FSDP2's mesh in `shard_model`: DTensors on equal meshes combine (one gradient norm).
    return init_device_mesh(device_type, (ep_size,))


def parallelize_experts(model: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard every MoE layer's routed experts over `mesh` (default: all ranks); returns `model`.

    Works on a meta-device model (then materialize with `to_empty` and load weights, e.g.
    `nanoseek.train.dcp.load_dcp` or `load_full_state_dict`) and on a real one whose weights are the
    same on every rank (each rank keeps its slice). In one process it returns the model unchanged.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    mesh = mesh if mesh is not None else expert_mesh()
    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"expert-parallel mesh of {mesh.size()} ranks in a world of {dist.get_world_size()}: "
            "EP must span all ranks (EP = DP)"
        )
    found = 0
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, RoutedExperts):
            module.experts = ExpertParallelExperts(module.experts, mesh)
            found += 1
    if not found and not any(isinstance(m, ExpertParallelExperts) for m in model.modules()):
        raise ValueError("parallelize_experts: the model has no MoE layers with routed experts")
    return model


def expert_parallel_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters expert parallelism already shards (FSDP2 must ignore them)."""
    return {p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors into `model`, each rank keeping its slice of sharded ones.

    For a model materialized from the meta device (`model.to_empty(device=...)`); buffers that are
    not in `state` (RoPE tables, expert-load counters) are rebuilt.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from nanoseek.checkpoint import check_keys

    model.reset_buffers()  # type: ignore[operator]
    check_keys(model, state, "state dict")
    # strict=False: a tied head is the embedding, absent from `state`.
    set_model_state_dict(
        model,
        state,  # type: ignore[arg-type]  # torch asks for dict[str, ValueType]: invariant, so not ours
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
