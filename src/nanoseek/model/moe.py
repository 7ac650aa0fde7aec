"""DeepSeekMoE (DeepSeek-V2 §2.2, V3 §2.1.2).

What is notable here:
- Shared experts (always on) plus many fine-grained routed experts, of which each token uses top-k.
- Scores: sigmoid (V3) or softmax (V2). Group-limited routing: only the best `topk_group` of `n_group`
  expert groups are eligible (V3 ranks a group by the sum of its top-2 scores, V2 by its max).
- Auxiliary-loss-free balancing (V3 §2.1.2): `e_score_correction_bias` is added to the scores only to
  *choose* experts; the gating weights come from the unbiased scores. Training nudges the bias by
  γ·sign(mean load − load) after each step, from the load statistics recorded here.
- The small complementary sequence-wise balance loss (V3 eq. 17-20) is computed when α > 0.
- Experts run on tokens grouped by expert (argsort, then grouped GEMMs in one custom autograd
  function), so compute follows the active parameters, not the total: 64 experts cost what 8 do at
  the same top-k.
- One expert path for every caller: int8/FP8 weight storage (engine/quantize.py) and FP8 training
  GEMMs (model/fp8.py) plug into `RoutedExperts.grouped_weights` / `grouped_mm`; expert parallelism
  wraps the same grouped SwiGLU in its all-to-all. At decode sizes, when experts are small (the
  speedrun's), the chosen experts' weights are gathered instead (two bmm's: fewer ops per step), with
  the shared expert riding along as one more expert; large experts always run grouped, each chosen
  expert's matmul reading its stored weights directly (a gathered copy would double the traffic).
- V2 gates (softmax, greedy / group_limited_greedy) follow DeepSeek's code: with norm_topk_prob
  the top-k weights (k > 1) are normalized instead of scaled by routed_scaling_factor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.derived import DerivedWeights
from nanoseek.model.registered import Linear, Registered, apply_keeping_fp32, is_plain_linear
from nanoseek.perf import cast, compute_dtype


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used dense and as the shared experts."""

    # what the decode step reads: see nanoseek.model.registered
    gate_proj = Registered()
    up_proj = Registered()
    down_proj = Registered()

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Chooses top-k experts per token and their gating weights."""

    weight = Registered()  # read per call: see nanoseek.model.registered
    e_score_correction_bias = Registered()
    expert_load: torch.Tensor  # a buffer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.n_routed_experts and config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        # Selection-only bias (aux-loss-free balancing); a buffer, not a parameter: no gradient moves it.
        # Only V3's noaux_tc uses it, so only V3 checkpoints carry it.
        self.register_buffer(
            "e_score_correction_bias",
            torch.zeros(self.n_experts),
            persistent=self.topk_method == "noaux_tc",
        )
        self.aux_loss_alpha = 0.0  # balance loss weight; set by training
        # seq_aux False: the balance loss over the whole batch, as DeepSeek-V2's MoEGate computes it
        # (the batch-wise balance of V3 §4.5.2); True: per sequence (V3 eq. 17-20)
        self.seq_aux = config.seq_aux
        self.aux_loss: torch.Tensor | None = None
        # Tokens routed to each expert by training forwards; the trainer reads and resets it for the bias
        # update. Inference (eval mode) leaves it alone, so serving and rollouts never disturb it.
        self.register_buffer("expert_load", torch.zeros(self.n_experts), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        # the balancing state stays fp32 through `.to(torch.bfloat16)`: bias steps vanish in bf16
        return apply_keeping_fp32(self, ("e_score_correction_bias", "expert_load"), fn, recurse)

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,S,H] -> (indices [B*S,k], weights [B*S,k] in fp32).

        token_mask [B,S] (bool): the tokens that count in the expert load and the balance loss, False
        at padding (routed all the same); None: every token. V3 balances the load of the batch's
        tokens (§2.1.2); padding, one token repeated, would pile onto a few experts and move the bias."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        fp32 = torch.float32
        w = self.weight if self.weight.dtype == fp32 else self.weight.float()
        x32 = flat if flat.dtype == fp32 else flat.float()
        if torch.is_autocast_enabled(x32.device.type):
            # autocast would run this matmul in bf16 whatever its operands: the routing (and the
            # gating weights, the balance loss) would differ between training and inference
            with torch.autocast(x32.device.type, enabled=False):
                logits = F.linear(x32, w)
        else:
            logits = F.linear(x32, w)
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() if scores.requires_grad else scores
        if self.topk_method == "noaux_tc":
            choice = choice + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_method in ("noaux_tc", "group_limited_greedy"):
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        v3 = self.topk_method == "noaux_tc"
        # V3 normalizes (one expert's weight too, as transformers and DeepSeek's inference code do),
        # then scales; DeepSeek's V2 gate normalizes *instead of* scaling, and only k > 1 weights.
        if self.norm_topk_prob and (v3 or self.top_k > 1):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            if v3:
                weights = weights * self.routed_scaling_factor
        else:
            weights = weights * self.routed_scaling_factor
        if self.training:
            with torch.no_grad():
                rows = indices if token_mask is None else indices.masked_fill(~token_mask.reshape(-1, 1), -1)
                # tokens left out fall in one more bin, dropped (no host sync, as a boolean index would be)
                counts = torch.bincount(rows.flatten() + 1, minlength=self.n_experts + 1)
                self.expert_load += counts[1:].to(self.expert_load)
        if self.training and self.aux_loss_alpha > 0:
            # batch-wise: the batch's tokens as one sequence
            sequences = shape[0] if self.seq_aux else 1
            self.aux_loss = self._sequence_balance_loss(scores, indices, sequences, token_mask)
        elif self.aux_loss is not None:  # (nn.Module's attribute writes are slow: skip the no-op one)
            self.aux_loss = None
        return indices, weights

    def _sequence_balance_loss(
        self, scores: torch.Tensor, indices: torch.Tensor, batch: int, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """V3 eq. 17-20: α Σ_i f_i P_i per sequence over its T tokens (those `token_mask` keeps),
        averaged over the batch's sequences that have any (batch = 1: the batch-wise loss)."""
        e, k = self.n_experts, self.top_k
        s = scores.view(batch, -1, e)
        t = s.shape[1]
        m = s.new_ones(batch, t) if token_mask is None else token_mask.reshape(batch, t).to(s.dtype)
        real = m.sum(dim=1)  # T of each sequence
        normalized = s / s.sum(dim=-1, keepdim=True)
        chosen = torch.zeros(batch, t * k, e, device=s.device).scatter_(2, indices.view(batch, t * k, 1), 1.0)
        chosen = chosen * m.repeat_interleave(k, dim=1).unsqueeze(-1)  # the counted tokens' choices
        f = chosen.sum(dim=1) * e / (k * real.clamp(min=1).unsqueeze(1))  # [B, E]
        p = (normalized * m.unsqueeze(-1)).sum(dim=1) / real.clamp(min=1).unsqueeze(1)  # [B, E]
        has = (real > 0).to(s.dtype)
        return self.aux_loss_alpha * ((f * p).sum(dim=-1) * has).sum() / has.sum().clamp(min=1)


# Row counts per expert change every step; oneDNN, which runs PyTorch's bf16/fp16 CPU matmuls, builds a
# kernel for every new shape (about as long as a ~640-row expert GEMM takes), so a CPU loop splits each
# group into a multiple of this many rows and a remainder: shapes that recur, found in its cache.
ROW_BUCKET = 32


@functools.cache
def _grouped_mm_works(device: torch.device, dtype: torch.dtype, b_dim: int) -> bool:
    """Whether `torch._grouped_mm` takes this device, dtype and form (probed once, on aligned shapes).
    torch 2.6/2.7 have no `torch._grouped_mm`; 2.8 runs it on CUDA sm90 in bf16 only (no CPU kernel)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.no_grad():
            a = torch.ones(16, 16, dtype=dtype, device=device)
            b = torch.ones(2, 16, 16, dtype=dtype, device=device) if b_dim == 3 else a
            out = torch._grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
            # rows x each group's weight sum 16 ones; the weight-gradient form sums a group's 8 rows
            return bool(torch.all(out.float() == (16 if b_dim == 3 else 8)))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def _grouped_mm_layout_ok(t: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes this operand's layout: 16-byte aligned, one of its last two
    dims contiguous (the one torch's own check picks) and every other stride a multiple of 16 bytes.
    A stride of 1 counts too unless it is the contiguous dim's: a width-1 matrix ([N,1], as rows of
    moe_intermediate_size 1 are) has strides (1, 1), which torch refused ("strides should be multiple
    of 16 bytes") where skipping every stride of 1 had passed it to the kernel."""
    (rows, cols), (s_rows, s_cols) = t.shape[-2:], t.stride()[-2:]
    if s_rows == 1 and s_cols >= max(1, rows):  # column-major: torch checks this order first
        lead = -1
    elif s_cols == 1 and s_rows >= max(1, cols):
        lead = -2
    else:
        return False
    strides = [t.stride(lead), *t.stride()[:-2]]
    return t.data_ptr() % 16 == 0 and all((st * t.element_size()) % 16 == 0 for st in strides)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-group matmul over row groups ending at `offs` (cumulative, int32).

    a [N,K] @ b [E,K,M] -> [N,M] (rows of group e use b[e]); or a [K,N] @ b [N,M] -> [E,K,M] (the
    weight-gradient form: group e contracts over its own rows). `torch._grouped_mm` does either in
    one call on CPU and GPU; its kernel needs 16-byte aligned strides, so odd sizes take a loop. So
    do CPU calls with fewer rows than groups (decode): the loop skips the empty groups, where the
    CPU kernel runs a select, a slice and an empty mm for each of them. And CPU bf16/fp16, whose
    per-group shapes the loop keeps few (`ROW_BUCKET`); the CPU kernel is itself a loop of matmuls.
    And float64 (a gradcheck's dtype), which `torch._grouped_mm` does not take. And any call where
    this torch has no `torch._grouped_mm`, or no kernel for the device and dtype (`_grouped_mm_works`).
    """
    cpu = a.device.type == "cpu"
    few_rows = cpu and b.dim() == 3 and a.shape[0] < b.shape[0]
    bucketed = cpu and a.dtype in (torch.bfloat16, torch.float16)
    if (
        a.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not few_rows
        and not bucketed
        and all(_grouped_mm_layout_ok(t) for t in (a, b))
        and _grouped_mm_works(a.device, a.dtype, b.dim())  # older torch, or a device it has no kernel for
    ):
        return torch._grouped_mm(a, b, offs=offs)
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    if b.dim() == 3:
        out = a.new_empty(a.shape[0], b.shape[-1])
        for e, (s0, s1) in enumerate(zip(starts, ends, strict=True)):
            for r0, r1 in _row_pieces(s0, s1, bucketed):
                torch.mm(a[r0:r1], b[e], out=out[r0:r1])
        return out
    out = a.new_zeros(len(ends), a.shape[0], b.shape[-1])
    for e, (s0, s1) in enumerate(zip(starts, ends, strict=True)):
        for i, (r0, r1) in enumerate(_row_pieces(s0, s1, bucketed)):
            if i == 0:
                torch.mm(a[:, r0:r1], b[r0:r1], out=out[e])
            else:
                out[e].addmm_(a[:, r0:r1], b[r0:r1])
    return out


def _row_pieces(s0: int, s1: int, bucketed: bool) -> list[tuple[int, int]]:
    """Rows [s0, s1) as one piece, or (bucketed) a multiple of `ROW_BUCKET` rows and the remainder."""
    if s1 <= s0:
        return []
    split = s1 - (s1 - s0) % ROW_BUCKET if bucketed else s1
    return [(s0, split), (split, s1)] if s0 < split < s1 else [(s0, s1)]


GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def shape_only(
    shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A tensor of `shape` over one element (zero strides): what a storage that keeps its expert
    weights elsewhere (packed, or in a quantized backend) hands the grouped path, whose shapes name
    the weights. A plain tensor even under inference mode (MLA keys its folded weights on versions)."""
    with torch.inference_mode(False):
        return torch.zeros((), dtype=dtype, device=device).expand(shape)


def each_expert(
    a: torch.Tensor, offs: torch.Tensor, width: int, mm: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Rows grouped by expert [N,K] -> [N,width], `mm(e, rows)` for each expert that has rows: the
    grouped GEMM of a weight storage that runs expert by expert (int8, w8a8, packed; CPU serving,
    host-side group ends)."""
    out = a.new_empty(a.shape[0], width)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = mm(e, a[start:end])
        start = end
    return out


# Decode gathers the chosen experts' weights (and appends the shared expert to the stack) only while
# one expert holds at most this many weights (3·hidden·moe_intermediate). Below it a step is bound by
# the number of ops, and the copy is cheap; above it (V2-Lite: 8.7 M) the copy is pure extra traffic.
GATHER_LIMIT = 1 << 18


def _swiglu_rows(
    xs: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    offs: torch.Tensor,
    row_w: torch.Tensor | None,
    mm: GroupedMM = _grouped_mm,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by expert -> (down_e(silu(gate_e x) * up_e x) [* row weight], pre-activation h).

    The row weight (the token's gate weight for this expert) scales the activation before the down
    projection: the same result as scaling the output, on rows 1/4 as wide or narrower."""
    inter = down.shape[-1]
    h = mm(xs, gate_up.transpose(-2, -1), offs)  # [N, 2I]
    act = F.silu(h[:, :inter]) * h[:, inter:]
    if row_w is not None:
        act.mul_(row_w.unsqueeze(-1))  # act is this function's own temporary
    return mm(act, down.transpose(-2, -1), offs), h  # [N, H]


def _swiglu_rows_backward(
    dy: torch.Tensor,
    xs: torch.Tensor,
    h: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    offs: torch.Tensor,
    row_w: torch.Tensor | None,
    mm: GroupedMM = _grouped_mm,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of `_swiglu_rows` for rows, gate_up, down and the row weights: four grouped GEMMs."""
    inter = down.shape[-1]
    gate, up = h[:, :inter], h[:, inter:]
    # Elementwise work here is memory-bound (rows x I per pass), so it is written as few passes:
    # silu's own backward kernel, and both halves of dh written in place instead of concatenated.
    silu = F.silu(gate)
    act = silu * up
    d_scaled = mm(dy, down, offs)  # [N, I]
    if row_w is None:
        d_down = mm(dy.t(), act, offs)  # [E, H, I]
        d_act, d_row_w = d_scaled, None
    else:
        w = row_w.unsqueeze(-1)
        d_down = mm(dy.t(), act * w, offs)
        d_row_w = torch.linalg.vecdot(d_scaled, act)
        d_act = d_scaled * w
    dh = torch.empty_like(h)
    torch.mul(d_act, silu, out=dh[:, inter:])
    dh[:, :inter] = torch.ops.aten.silu_backward(d_act * up, gate)
    dxs = mm(dh, gate_up, offs)  # [N, H]
    d_gate_up = mm(dh.t(), xs, offs)  # [E, 2I, H]
    return dxs, d_gate_up, d_down, d_row_w


class _GroupedSwiGLU(torch.autograd.Function):
    """The expert FFN over rows already sorted by expert (the expert-parallel path, after dispatch).

    Why a custom Function: indexing `weight[e]` in a Python loop makes autograd build a full-size
    zero gradient per expert and add them all up (O(E²) memory traffic), and hundreds of small
    matmuls per layer. Here each of the six matmuls (2 forward, 4 backward) is one grouped GEMM
    whose work follows the tokens each expert received, weight gradients land directly in their
    [E, ...] buffers, the elementwise work runs once over all rows, and only x and the
    pre-activation projections are saved.
    """

    @staticmethod
    def forward(ctx, x, gate_up, down, offs, dtype: torch.dtype, mm: GroupedMM):
        x_c, gu_c, d_c = x.to(dtype), gate_up.to(dtype), down.to(dtype)
        y, h = _swiglu_rows(x_c, gu_c, d_c, offs, None, mm)
        ctx.save_for_backward(x_c, h, gu_c, d_c, offs)
        ctx.dtypes = (x.dtype, gate_up.dtype, down.dtype)
        ctx.mm = mm
        return y

    @staticmethod
    def backward(ctx, dy):
        x_c, h, gu_c, d_c, offs = ctx.saved_tensors
        x_dtype, gu_dtype, d_dtype = ctx.dtypes
        dx, d_gu, d_down, _ = _swiglu_rows_backward(
            dy.to(h.dtype).contiguous(), x_c, h, gu_c, d_c, offs, None, ctx.mm
        )
        return dx.to(x_dtype), d_gu.to(gu_dtype), d_down.to(d_dtype), None, None, None


def grouped_swiglu(
    xs: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    offs: torch.Tensor,
    dtype: torch.dtype,
    mm: GroupedMM = _grouped_mm,
) -> torch.Tensor:
    """The routed experts' FFN over rows sorted by expert (group e ends at offs[e]), unweighted; the
    expert-parallel wrapper runs each rank's local experts through it."""
    return _GroupedSwiGLU.apply(xs, gate_up, down, offs, dtype, mm)


def _gemm_layout(w: torch.Tensor) -> torch.Tensor:
    """The same [E,N,K] weights, stored as the expert GEMMs read them ([E,K,N], output dim contiguous):
    torch's CPU matmuls are slower on the transposed view (engine decode, A/B in benchmarks/README.md).
    A copy, so only for the inference stacks."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


def _chosen_gemm_weights(w: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """w[sel] transposed to [k,K,N], as a rows-times-weights bmm reads it; from a `_gemm_layout` stack
    that is a gather of whole contiguous experts (across the [E,N,K] layout, a strided copy)."""
    return w.transpose(1, 2).index_select(0, sel)


def sort_by_expert(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: the (token, choice) rows of `indices` [T,k] in expert order (stable; row r comes from
    token r // k), and how many rows each expert gets. Tensors only, no host sync; training, the
    engine and expert parallelism (whose rows go to ranks in this order) all sort this way."""
    flat = indices.flatten()
    return flat.argsort(stable=True), torch.bincount(flat, minlength=n_experts)


def combine_rows(x: torch.Tensor, ys: torch.Tensor, token_of: torch.Tensor) -> torch.Tensor:
    """Combine: expert output rows (already weighted) added back onto their tokens, shaped like `x`
    (index_add: no [T, k, H] intermediate, no zero-filled scatter target per layer)."""
    return torch.zeros_like(x, dtype=ys.dtype).index_add_(0, token_of, ys)


def _routed_rows(
    x: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    order: torch.Tensor,
    offs: torch.Tensor,
    mm: GroupedMM,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch, grouped SwiGLU, combine: (Σ_k weight_k · expert_k(x) [T,H], pre-activations, row
    weights), rows gathered in expert `order` (`sort_by_expert`), each row's gate weight folded into
    its activation."""
    token_of = order // weights.shape[1]
    row_w = weights.reshape(-1).index_select(0, order).to(x.dtype)
    ys, h = _swiglu_rows(x.index_select(0, token_of), gate_up, down, offs, row_w, mm)
    return combine_rows(x, ys, token_of), h, row_w


class _RoutedExpertsFunction(torch.autograd.Function):
    """Σ_k weight_k · expert_k(x) for every token, as one autograd node.

    Forward: gather token rows into expert order, the grouped SwiGLU with each row's gate weight
    folded into its activation, then add each row back onto its token (index_add: no [T, k, H]
    intermediate, no zero-filled scatter target per layer). Backward is gathers and grouped GEMMs
    only; the gathered rows are recomputed from x instead of saved.
    """

    @staticmethod
    def forward(ctx, x, weights, gate_up, down, order, offs, dtype: torch.dtype, mm: GroupedMM):
        x_c, gu_c, d_c = x.to(dtype), gate_up.to(dtype), down.to(dtype)
        y, h, row_w = _routed_rows(x_c, weights, gu_c, d_c, order, offs, mm)
        ctx.save_for_backward(x_c, h, gu_c, d_c, offs, order, row_w)
        k = weights.shape[1]
        ctx.meta = (k, x.dtype, weights.dtype, gate_up.dtype, down.dtype)
        ctx.mm = mm
        return y

    @staticmethod
    def backward(ctx, dy):
        x_c, h, gu_c, d_c, offs, order, row_w = ctx.saved_tensors
        k, x_dtype, w_dtype, gu_dtype, d_dtype = ctx.meta
        token_of = order // k
        dys = dy.to(h.dtype).index_select(0, token_of)
        dxs, d_gu, d_down, d_row_w = _swiglu_rows_backward(
            dys, x_c.index_select(0, token_of), h, gu_c, d_c, offs, row_w, ctx.mm
        )
        dx = torch.zeros_like(x_c).index_add_(0, token_of, dxs)
        assert d_row_w is not None
        d_weights = torch.empty(order.numel(), dtype=w_dtype, device=dy.device)
        d_weights[order] = d_row_w.to(w_dtype)
        return (
            dx.to(x_dtype),
            d_weights.view(-1, k),
            d_gu.to(gu_dtype),
            d_down.to(d_dtype),
            None,
            None,
            None,
            None,
        )


class RoutedExperts(nn.Module):
    """All routed experts' SwiGLU weights stacked, so tokens can be processed grouped by expert.

    The one expert path of the package: dispatch (sort rows by expert), the grouped SwiGLU, combine
    (weight and sum back onto tokens). Seams let other storage and arithmetic reuse it:
    `expert_weights` (dense weights, as training and the gathered decode read them),
    `grouped_weights` + `grouped_mm` (int8/FP8 storage runs each used expert on its stored rows,
    engine/quantize.py; FP8 training GEMMs, model/fp8.py). Expert parallelism runs its all-to-all around
    the same grouped SwiGLU (train/expert_parallel.py).
    """

    gate_up_proj = Registered()  # read per call: see nanoseek.model.registered
    down_proj = Registered()
    # Whether the stored weights take gradients; quantized storage (engine/quantize.py) does not, so
    # its forward is the inference one whether or not autograd is recording.
    trainable = True

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        # gate and up fused along the output dim: [E, 2I, H]; down: [E, H, I] (nn.Linear layout).
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))

    def expert_weights(self, sel: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E,2I,H], down [E,H,I]) of all experts, or of the experts listed in `sel`."""
        if sel is None:
            return self.gate_up_proj, self.down_proj
        return self.gate_up_proj.index_select(0, sel), self.down_proj.index_select(0, sel)

    def grouped_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) as the inference forward hands them to `grouped_mm`: here the stacked
        weights in the compute dtype; quantized storage hands over its own int8/FP8 stacks, which its
        `grouped_mm` widens one used expert at a time (never all of them)."""
        return tuple(w.to(dtype) for w in self.expert_weights())  # type: ignore[return-value]

    def grouped_mm(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """The GEMM over row groups (see `_grouped_mm`) every expert matmul, forward and backward, runs."""
        return _grouped_mm(a, b, offs)

    def gathers(self) -> bool:
        """Whether this module's experts are small enough to copy per decode step (`GATHER_LIMIT`)."""
        return 3 * self.hidden_size * self.intermediate_size <= GATHER_LIMIT

    def decodes(self, indices: torch.Tensor) -> bool:
        """Whether `forward` takes the gathered-weights decode path for these routing choices."""
        return (
            0 < indices.shape[0] <= 4  # (no tokens: the grouped path, which any row count takes)
            and type(self).grouped_mm is RoutedExperts.grouped_mm
            and not torch.is_grad_enabled()
            and self.gathers()
        )

    def forward(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        stacked: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [T,H], indices/weights [T,k] -> [T,H] = Σ_k weight · expert_k(x). `stacked`: (gate_up,
        down) to use instead of this module's own, without gradients (MoE's, shared expert appended)."""
        if self.decodes(indices):
            return self.decode(x, indices, weights, stacked)
        # Group ends as a tensor: no host sync, empty experts cost nothing.
        n = self.n_experts if stacked is None else stacked[0].shape[0]
        order, counts = sort_by_expert(indices, n)
        offs = counts.cumsum(0).to(torch.int32)
        dtype = compute_dtype(x)
        if not (torch.is_grad_enabled() and self.trainable):  # the autograd node's forward, without the node
            gate_up, down = self.grouped_weights(dtype) if stacked is None else (w.to(dtype) for w in stacked)
            return _routed_rows(x.to(dtype), weights, gate_up, down, order, offs, self.grouped_mm)[0]
        gate_up, down = self.expert_weights() if stacked is None else stacked
        return _RoutedExpertsFunction.apply(x, weights, gate_up, down, order, offs, dtype, self.grouped_mm)

    def decode(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        stacked: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """A few tokens (decode): gather the chosen experts' weights and run the t·k (token, expert)
        pairs as two batched matmuls and one weighted-sum bmm; copying k experts' weights costs less
        than sorting rows into groups that are nearly all empty. `stacked`: (gate_up, down) to gather
        from instead of this module's own (MoE's, with the shared expert appended)."""
        t, k = indices.shape
        dtype = compute_dtype(x)
        sel = indices.flatten()
        # Rows times transposed weights: BLAS runs [1,H]·[H,2I] far faster than [2I,H]·[H,1] here.
        if stacked is None:
            gate_up, down = self.expert_weights(sel)
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        else:
            gate_up, down = _chosen_gemm_weights(stacked[0], sel), _chosen_gemm_weights(stacked[1], sel)
        gate_up, down, x = cast(gate_up, dtype), cast(down, dtype), cast(x, dtype)
        xs = (x.expand(k, -1) if t == 1 else x.repeat_interleave(k, dim=0)).unsqueeze(1)  # [t·k, 1, H]
        h = torch.bmm(xs, gate_up)
        act = F.silu(h[..., : self.intermediate_size]) * h[..., self.intermediate_size :]
        ys = torch.bmm(act, down).view(t, k, -1)
        return torch.bmm(cast(weights.view(t, 1, k), dtype), ys).view(t, -1)


class MoE(nn.Module):
    # what the decode step reads: see nanoseek.model.registered
    gate = Registered()
    experts = Registered()
    shared_experts = Registered()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.n_routed_experts
        self.gate = Router(config)
        self.experts = RoutedExperts(
            config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self._stacked: DerivedWeights[tuple[torch.Tensor, torch.Tensor] | None] = DerivedWeights()
        self._shared_cols: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,S,H] -> [B,S,H]; token_mask [B,S]: the tokens the router's balancing counts (`Router`)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        indices, weights = self.gate(x, token_mask)
        stacked = self._with_shared_expert()
        if stacked is not None:
            # Serving: the shared expert is expert E, which every token also picks, with weight 1
            # (the shared and routed experts' modules are not called: no hook dispatch per layer).
            shared_index, shared_weight = self._shared_columns(indices.shape[0], weights.dtype)
            indices = torch.cat((indices, shared_index), dim=1)
            weights = torch.cat((weights, shared_weight), dim=1)
            return cast(self.experts.forward(flat, indices, weights, stacked).view(shape), x.dtype)
        y = cast(self.experts(flat, indices, weights).view(shape), x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    def _shared_columns(self, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[t,1] columns (the shared expert's index E, weight 1), sliced from ones kept across decode
        steps: two fewer allocations per layer and step than building them."""
        cols = self._shared_cols
        device = self.gate.weight.device  # (a plain attribute: `model.to(...)` does not move it)
        if cols is None or cols[0].shape[0] < t or cols[1].dtype != dtype or cols[0].device != device:
            n = max(t, 64)
            cols = (
                torch.full((n, 1), self.experts.n_experts, dtype=torch.long, device=device),
                torch.ones(n, 1, dtype=dtype, device=device),
            )
            self._shared_cols = cols
        return cols[0][:t], cols[1][:t]

    def _with_shared_expert(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Under inference mode (the engine), the routed experts' stacked weights with the shared
        expert appended (when it has their width and experts are small enough to gather: a copy of
        every expert is not worth it for large ones), so the routed path runs both. Built once, rebuilt
        when a weight changes (`nanoseek.model.derived`); None otherwise, and for quantized or
        expert-parallel experts. Training and validation (no_grad) never build this copy."""
        if not torch.is_inference_mode_enabled():
            return None
        return self._stacked.get(self._stack_sources, self._stack)

    def _stack_sources(self) -> list[torch.Tensor]:
        mods = [self.experts]
        if self.shared_experts is not None:
            sh = self.shared_experts
            mods += [sh.gate_proj, sh.up_proj, sh.down_proj]
        return [t for m in mods for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        ex, sh = self.experts, self.shared_experts
        if sh is None or type(ex) is not RoutedExperts or not is_plain_linear(sh.gate_proj):
            return None
        if sh.gate_proj.out_features != ex.intermediate_size or not ex.gathers():
            return None
        shared_gate_up = torch.cat((sh.gate_proj.weight, sh.up_proj.weight)).unsqueeze(0)
        return (
            _gemm_layout(torch.cat((ex.gate_up_proj.detach(), shared_gate_up.detach()))),
            _gemm_layout(torch.cat((ex.down_proj.detach(), sh.down_proj.weight.detach().unsqueeze(0)))),
        )
