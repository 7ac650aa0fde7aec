"""Muon for the hidden matrices, AdamW for everything else: one optimizer the Trainer can hold.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") replaces each matrix's momentum
update by its nearest semi-orthogonal matrix, computed with a few Newton-Schulz iterations: every
direction of the update moves at the same rate, where Adam's update is dominated by a few. Moonlight
(Liu et al. 2025, "Muon is Scalable for LLM Training") trained a DeepSeek-V3-style MoE with it at
about half the compute of AdamW, by adding decoupled weight decay and scaling each update to AdamW's
RMS (0.2·sqrt(max(rows, cols))), so the same learning rate, schedule and decay serve both halves.

Here, on a model of a few million parameters, it is what makes in-context copying appear within the
CPU budget (benchmarks/bench_learning.py, variant `lean2-muon`): the attention matrices learn to
look back at the prompt several times sooner than under AdamW.

Which parameters: the matrices of the blocks (attention projections, dense and expert MLPs, the MTP
projection). The token embedding and the output head are lookups and a classifier, not hidden
transforms (Muon's authors keep them on AdamW); router gates stay on AdamW too, their rows are
affinities compared through a sigmoid, not a transform. Norms and biases are vectors. Stacked expert
weights are a batch of matrices (one orthogonalization each); a fused gate/up weight is two.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Quintic Newton-Schulz coefficients chosen (Jordan et al.) to push singular values into ~[0.7, 1.2]
# in 5 steps; exact orthogonality is not needed.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Parameter-name suffixes of weights that hold several matrices side by side along the output dim.
FUSED_BLOCKS = {"gate_up_proj": 2}


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """≈ U Vᵀ of each matrix in g [..., m, n] (its SVD's orthogonal factor), by Newton-Schulz."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    batch = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])
    if dtype == torch.float32:
        # Every step multiplies x by P = a·I + b·G + c·G², a polynomial in the Gram matrix G, and the
        # next G is P·G·P: in fp32 the iteration can stay in the small m x m space and touch the
        # [m, n] matrix only at the ends (~15% fewer FLOPs at n = 2m; figures in benchmarks/README.md).
        # In bf16 G's rounding compounds over the steps (singular values far above 1 where the form
        # below keeps 0.7-1.2), so bf16 iterates on x itself.
        gram = x @ x.mT
        q: torch.Tensor | None = None
        for i in range(steps):
            p = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            p.diagonal(dim1=-2, dim2=-1).add_(a)
            q = p if q is None else p @ q
            if i < steps - 1:
                gram = p @ gram @ p
        x = x if q is None else q @ x  # (no steps: the normalised input, as in bf16)
    else:
        for _ in range(steps):
            gram = x @ x.mT
            # x <- a·x + (b·G + c·G²)·x, each sum folded into its product (baddbmm): no separate
            # elementwise passes over the stacked expert matrices
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(*batch, *x.shape[-2:])
    return x if wide else x.mT


def muon_param_groups(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """AdamW's param groups (`train.loop.param_groups`) with the hidden matrices of its decayed group
    moved to groups flagged `muon`, one per number of fused blocks."""
    names = {id(p): n for n, p in model.named_parameters()}
    decay, *rest = groups
    muon: dict[int, list[nn.Parameter]] = {}
    adamw = []
    for p in decay["params"]:
        name = names[id(p)]
        if name.startswith("lm_head") or name.endswith("mlp.gate.weight"):
            adamw.append(p)
            continue
        blocks = next((k for s, k in FUSED_BLOCKS.items() if name.endswith(s)), 1)
        muon.setdefault(blocks, []).append(p)
    moved = [{**decay, "params": ps, "muon": True, "blocks": k} for k, ps in sorted(muon.items())]
    return [*moved, {**decay, "params": adamw}, *rest]


def orthogonalization_flops(
    groups: list[dict[str, Any]], steps: int = 5, dtype: torch.dtype = torch.float32
) -> float:
    """Matmul FLOPs of one step of a `Muon` over these param groups (`muon_param_groups`): its
    Newton-Schulz iterations, batched by shape as `Muon.step` batches them, counted by torch's
    FlopCounterMode on meta tensors. With few tokens per expert they rival the forward and backward
    (benchmarks/README.md, bench_speedrun)."""
    from torch.utils.flop_counter import FlopCounterMode

    shapes: dict[tuple[int, int], int] = {}
    for group in groups:
        if group.get("muon"):
            for p in group["params"]:
                rows, cols = p.shape[-2] // group["blocks"], p.shape[-1]
                shapes[rows, cols] = shapes.get((rows, cols), 0) + p.numel() // (rows * cols)
    with FlopCounterMode(display=False) as counter:
        for (rows, cols), n in shapes.items():
            orthogonalize(torch.empty(n, rows, cols, device="meta"), steps, dtype)
    return float(counter.get_total_flops())


class Muon(torch.optim.AdamW):
    """AdamW whose groups flagged `muon` take Muon steps instead (see the module docstring).

    Being an AdamW, it keeps AdamW's fused kernel, state layout and schedule handling for the other
    groups; a Muon parameter's state is its momentum buffer. `ns_dtype`: the Newton-Schulz
    arithmetic (bf16 where the CPU multiplies it natively: the iteration is robust to its rounding).
    """

    def __init__(
        self,
        params: Any,
        *,
        momentum: float = 0.95,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
        **adamw: Any,
    ) -> None:
        super().__init__(params, **adamw)
        # in `defaults` too: a group added later (`add_param_group`) is filled from them
        self.defaults.update(muon=False, blocks=1, momentum=momentum)
        for g in self.param_groups:
            for k in ("muon", "blocks", "momentum"):
                g.setdefault(k, self.defaults[k])
        self.ns_steps, self.ns_dtype = ns_steps, ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:  # first, as every torch optimizer: its gradients are the step's
            with torch.enable_grad():
                loss = closure()
        # Momentum first, then one batched Newton-Schulz per matrix shape: the attention and MLP
        # matrices of every layer share a handful of shapes, and a batch of them costs one op chain.
        todo: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]] = {}
        mats = []  # (p, its gradient and momentum as [matrices, rows, cols], which matrices have gradient, group)
        for group in self.param_groups:
            if not group["muon"]:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    state["step"] = torch.tensor(0.0)  # AdamW's state loader expects every entry to count
                state["step"] += 1
                shape = (p.shape[-2] // group["blocks"], p.shape[-1])
                grad, buf = p.grad.reshape(-1, *shape), state["momentum_buffer"].view(-1, *shape)
                mats.append((p, grad, buf, grad.flatten(1).any(dim=1)[:, None, None], group))
        # one sync for the step: which parameters have a matrix without gradient (an expert no token was
        # routed to), left alone as a parameter without one is (its stale momentum, orthogonalized, would
        # move it a full step); the others take the plain in-place path
        whole = torch.stack([used.all() for *_, used, _ in mats]).tolist() if mats else []
        for (p, grad, buf, used, group), every in zip(mats, whole, strict=True):
            mu, decay = group["momentum"], 1 - group["lr"] * group["weight_decay"]
            if every:
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu)  # Nesterov
                p.mul_(decay)
            else:
                buf.copy_(torch.where(used, buf.lerp(grad, 1 - mu), buf))
                update = torch.where(used, grad.lerp(buf, mu), 0.0)  # 0 orthogonalizes to 0
                p.view(grad.shape).mul_(torch.where(used, decay, 1.0))
            todo.setdefault(tuple(grad.shape[1:]), []).append((p, update, group))
            p.grad = None  # consumed: AdamW's step below skips parameters without gradients
        for (rows, cols), items in todo.items():
            stacked = orthogonalize(torch.cat([u for _, u, _ in items]), self.ns_steps, self.ns_dtype)
            scale = 0.2 * max(rows, cols) ** 0.5
            for (p, _, group), o in zip(items, stacked.split([u.shape[0] for _, u, _ in items]), strict=True):
                p.add_(o.reshape(p.shape).to(p.dtype), alpha=-group["lr"] * scale)
        super().step()
        return loss
