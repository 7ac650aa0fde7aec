"""The model's own properties: absorbed == naive MLA, router rules, grouped experts, MTP, balancing."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from model_configs import assert_greedy, mla_configs, small_config
from nanoseek.checkpoint import build_model
from nanoseek.config import ModelConfig
from nanoseek.model.moe import MoE, RoutedExperts, Router, _grouped_mm


def config(**changes) -> ModelConfig:
    return small_config(**{"num_nextn_predict_layers": 2, **changes})


def model_for(cfg: ModelConfig, seed: int = 0):
    model = build_model(cfg).init_weights(seed).eval()
    with torch.no_grad():  # larger weights than the training init so that differences show
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.6 / p.shape[-1] ** 0.5))
    return model


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_rotates_each_pair_as_deepseeks_complex_form(interleave):
    """`apply_rope` over `RotaryEmbedding`'s full-width tables (x·cos + swap(x)·sin) rotates each pair by
    its position's angle: DeepSeek's complex multiply for interleaved pairs (2i, 2i+1), the same on
    pairs (i, i + D/2) for the half-split layout (Qwen2 / Llama); YaRN's attention factor included."""
    from nanoseek.model.attention import RotaryEmbedding, apply_rope, rope_inverse_frequencies

    cfg = config(
        rope_interleave=interleave,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    )
    rope = RotaryEmbedding(cfg)
    positions = torch.tensor([[0, 3, 17, 250]])
    x = torch.randn(1, 4, 2, cfg.qk_rope_head_dim)
    cos, sin = rope(positions)
    got = apply_rope(x, cos, sin, interleave)

    inv_freq, factor = rope_inverse_frequencies(cfg)
    angles = positions[..., None].double() * inv_freq.double()  # [1, S, D/2]
    turn = torch.polar(torch.full_like(angles, factor), angles).unsqueeze(-2)  # per head
    half = cfg.qk_rope_head_dim // 2
    pairs = (
        x.double().unflatten(-1, (-1, 2))
        if interleave
        else torch.stack((x[..., :half], x[..., half:]), -1).double()
    )
    rotated = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * turn)
    want = rotated.flatten(-2) if interleave else torch.cat((rotated[..., 0], rotated[..., 1]), dim=-1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    assert factor != 1.0 and (got - x).abs().max() > 0.1  # scaled and really rotated


class SimpleLatentCache:
    """A LatentCache: per layer, the concatenation of everything seen so far (plain causal mask)."""

    def __init__(self) -> None:
        self.rows: dict[int, torch.Tensor] = {}

    def update(self, layer_idx, latent):
        if layer_idx in self.rows:
            latent = torch.cat((self.rows[layer_idx], latent), dim=1)
        self.rows[layer_idx] = latent
        return latent, None


def ids(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ attention
@pytest.mark.parametrize("q_lora_rank", [48, None])
@pytest.mark.parametrize("fold", [True, False])  # False: W_UK/W_UV applied per head (V2-Lite's widths)
def test_absorbed_equals_naive_prefill(q_lora_rank, fold, monkeypatch):
    from nanoseek.model import attention

    if not fold:
        monkeypatch.setattr(attention, "FOLD_LIMIT", 0)
    model = model_for(config(q_lora_rank=q_lora_rank))
    with torch.no_grad():
        folded = model.model.layers[0].self_attn.absorbed_weights()
    assert (folded.wq is not None, folded.w_uv is None) == (fold, fold)
    x = ids()
    with torch.no_grad():
        naive = model(x, absorb=False)
        absorbed = model(x, absorb=True)
    assert naive.abs().max() > 0.3
    torch.testing.assert_close(absorbed, naive, rtol=0, atol=1e-4)


@pytest.mark.parametrize("q_lora_rank", [48, None])
@pytest.mark.parametrize("fmt", [None, "int8", "fp8", "w8a8"])
def test_absorbed_path_keeps_no_copy_of_a_projection_it_uses_unchanged(q_lora_rank, fmt, monkeypatch):
    """Unfolded (V2-Lite's widths and larger), o_proj and kv_a are used as they are: the absorbed weights
    held a dequantized copy of each (2-4x a quantized layer's bytes, read every decode step in place of
    its kernel) and, in bf16, a second bf16 copy of o_proj. Now they hold the weight itself or nothing
    (the module is called), and absorbed attention matches the naive path, which calls the modules (with
    weight-only storage; w8a8 rounds each layer's input too, and the two paths round different inputs)."""
    from nanoseek.engine.quantize import quantize_model
    from nanoseek.model import attention

    monkeypatch.setattr(attention, "FOLD_LIMIT", 0)
    model = model_for(config(q_lora_rank=q_lora_rank)).to(torch.bfloat16 if fmt is None else torch.float32)
    if fmt is not None:
        quantize_model(model, fmt)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        w = attn.absorbed_weights()
    if fmt is None:
        assert w.wo is attn.o_proj.weight
        assert (w.wa is attn.kv_a_proj_with_mqa.weight) == (q_lora_rank is None)
    else:
        assert w.wo is None and w.wa is None
    if fmt in ("int8", "fp8"):
        # 40 rows: past the int8 kernel's (fp32 rows go in as bf16 up to 32), so the projections of the two paths
        # run in fp32 and their ulps do not round apart into other experts chosen
        x = ids(seq=20)
        with torch.no_grad():
            naive, absorbed = model(x, absorb=False), model(x, absorb=True)
        assert naive.abs().max() > 0.3
        # (int8: a routed expert's few rows take the kernel in bf16, so fp32 ulps of its input can round apart)
        torch.testing.assert_close(absorbed, naive, rtol=0, atol=2e-4 if fmt == "fp8" else 5e-3)


@pytest.mark.parametrize("absorb", [True, False])
def test_prefill_with_cache_in_chunks_equals_full_forward(absorb):
    model = model_for(config())
    x = ids(seq=14)
    with torch.no_grad():
        full = model(x, absorb=False)
        cache = SimpleLatentCache()
        first = model(x[:, :9], positions=model.positions_for(x[:, :9]), cache=cache, absorb=absorb)
        second = model(x[:, 9:], positions=model.positions_for(x[:, 9:], start=9), cache=cache, absorb=absorb)
    torch.testing.assert_close(torch.cat((first, second), dim=1), full, rtol=0, atol=1e-4)
    assert cache.rows[0].shape == (2, 14, 32 + 8)  # c_kv and k_pe: all a cache stores


def test_step_by_step_decode_equals_full_forward():
    model = model_for(config(q_lora_rank=None))
    x = ids(seq=10)
    with torch.no_grad():
        full = model(x, absorb=False)
        cache = SimpleLatentCache()
        steps = []
        for i in range(x.shape[1]):
            tok = x[:, i : i + 1]
            steps.append(model(tok, positions=model.positions_for(tok, start=i), cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)


def test_explicit_mask_is_respected_by_both_paths():
    """A padded batch: row 0 sees only its last 5 of 8 cached tokens; both paths agree on that. With
    YaRN's mscale_all_dim, so the softmax scale is not SDPA's default 1/sqrt(head dim)."""
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale_all_dim": 0.8}
    model = model_for(config(rope_scaling=yarn))
    attn = model.model.layers[0].self_attn
    assert attn.softmax_scale > 1.1 * attn.qk_head_dim**-0.5
    b, t = 2, 8
    x = torch.randn(b, t, 64)
    pos = model.positions_for(ids(seq=t))
    cos, sin = model.model.rotary_emb(pos)
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t).clone()
    mask[0, :, :3] = False
    mask[0, :3, :3] = torch.eye(3, dtype=torch.bool)  # padded queries see themselves only
    with torch.no_grad():
        naive = attn(x, cos, sin, mask=mask, absorb=False)
        absorbed = attn(x, cos, sin, mask=mask, absorb=True)
        causal = attn(x, cos, sin, absorb=False)
    torch.testing.assert_close(absorbed, naive, rtol=0, atol=1e-5)
    torch.testing.assert_close(naive[1], causal[1], rtol=0, atol=1e-5)
    assert (naive[0, 3:] - causal[0, 3:]).abs().max() > 1e-3


# --------------------------------------------------------------------- router
def router_for(cfg: ModelConfig, seed: int = 0) -> Router:
    r = Router(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.randn(r.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return r


def test_bias_changes_choice_but_not_weights():
    cfg = config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    r = router_for(cfg)
    x = torch.randn(64, 64)
    idx0, w0 = r(x)
    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.linspace(0, 0.5, 16))
    idx1, w1 = r(x)
    assert (idx0.sort(-1).values != idx1.sort(-1).values).any(), "bias should change some choices"
    # Weights come from the unbiased scores: recompute them for the biased choice by hand.
    scores = F.linear(x, r.weight).sigmoid()
    chosen = scores.gather(1, idx1)
    expected = chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(w1, expected)
    # Where the choice did not change, the weights did not either.
    same = (idx0.sort(-1).values == idx1.sort(-1).values).all(-1)
    assert same.any()
    order0, order1 = idx0.argsort(-1), idx1.argsort(-1)
    torch.testing.assert_close(w0.gather(1, order0)[same], w1.gather(1, order1)[same])


@pytest.mark.parametrize("scoring,method", [("sigmoid", "noaux_tc"), ("softmax", "group_limited_greedy")])
def test_group_limits_respected(scoring, method):
    cfg = config(
        n_routed_experts=32,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=3,
        scoring_func=scoring,
        topk_method=method,
    )
    r = router_for(cfg)
    x = torch.randn(200, 64)
    idx, _ = r(x)
    groups = idx // 4
    assert max(g.unique().numel() for g in groups) <= 3
    # And the kept groups are the best ones by the method's group score.
    scores = F.linear(x, r.weight)
    scores = scores.sigmoid() if scoring == "sigmoid" else scores.softmax(-1)
    grouped = scores.view(-1, 8, 4)
    gs = grouped.topk(2, -1).values.sum(-1) if method == "noaux_tc" else grouped.amax(-1)
    best = gs.topk(3, -1).indices
    for row in range(200):
        assert set(groups[row].tolist()) <= set(best[row].tolist())
    # Without the limit some tokens would use more than 3 groups: the test can fail.
    free = scores.topk(6, -1).indices // 4
    assert max(g.unique().numel() for g in free) > 3
    if method == "noaux_tc":
        # A negative bias (an overloaded expert's, after the balancing updates) leaves the dropped
        # groups out all the same: they are masked to -inf, not to 0, which such scores fall below.
        with torch.no_grad():
            r.e_score_correction_bias.fill_(-1.0)
        assert max(g.unique().numel() for g in r(x)[0] // 4) <= 3


def test_weights_sum_to_scaling_factor_when_normalized():
    cfg = config(n_routed_experts=16, num_experts_per_tok=4, routed_scaling_factor=2.5)
    _, w = router_for(cfg)(torch.randn(50, 64))
    torch.testing.assert_close(w.sum(-1), torch.full((50,), 2.5))
    _, w = router_for(cfg.replace(norm_topk_prob=False))(torch.randn(50, 64))
    assert (w.sum(-1) < 2.5 * 4).all() and not torch.allclose(w.sum(-1), torch.full((50,), 2.5))


def test_softmax_v2_greedy_path():
    cfg = config(
        model_type="deepseek_v2",
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=False,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.5,
    )
    r = router_for(cfg)
    x = torch.randn(30, 64)
    idx, w = r(x)
    probs = F.linear(x, r.weight).softmax(-1)
    top = probs.topk(2, -1)
    torch.testing.assert_close(idx.sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(w.sort(-1).values, (top.values * 1.5).sort(-1).values)
    # V2 checkpoints carry no balancing bias.
    assert "e_score_correction_bias" not in r.state_dict()
    # DeepSeek's V2 gate normalizes only k > 1 weights: one expert's is scaled, norm_topk_prob or not
    one = router_for(cfg.replace(num_experts_per_tok=1, norm_topk_prob=True))
    idx, w = one(x)
    torch.testing.assert_close(w, probs.gather(1, idx) * 1.5)


# ------------------------------------------------------------------- experts
def dense_reference(experts: RoutedExperts, x, idx, w) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] += w[t, j] * (experts.down_proj[e] @ (F.silu(gate) * up))
    return out


def random_experts(
    n: int, hidden: int, inter: int, tokens: int, k: int, std: float = 0.3, grad: bool = False
):
    """RoutedExperts with N(0, std) weights and `tokens` random inputs (`grad`: requiring gradients), each
    routed to k distinct experts with random weights: (experts, x, idx, w)."""
    experts = RoutedExperts(n, hidden, inter)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, std)
        experts.down_proj.normal_(0, std)
    x = torch.randn(tokens, hidden, requires_grad=grad)
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(tokens)])
    return experts, x, idx, torch.rand(tokens, k)


@pytest.mark.parametrize("hidden,inter", [(16, 12), (10, 5)])  # grouped GEMM, and the aligned-less loop
def test_grouped_experts_equal_dense_per_token_reference(hidden, inter):
    torch.manual_seed(0)
    experts, x, idx, w = random_experts(8, hidden, inter, tokens=20, k=3, grad=True)
    idx[:, 0] = 7  # a crowded expert; some experts may get no token at all
    w.requires_grad_()
    got = experts(x, idx, w)
    ref = dense_reference(experts, x, idx, w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, w, experts.gate_up_proj, experts.down_proj), g)
    ref_grads = torch.autograd.grad(ref, (x, w, experts.gate_up_proj, experts.down_proj), g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_experts_follow_autocast():
    experts, x, idx, w = random_experts(8, 64, 32, tokens=40, k=2, std=0.2, grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = experts(x, idx, w)
    assert got.dtype == torch.bfloat16
    ref = dense_reference(experts, x, idx, w)
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05)
    got.float().sum().backward()
    assert experts.gate_up_proj.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    (g_ref,) = torch.autograd.grad(ref.sum(), experts.gate_up_proj)
    assert (experts.gate_up_proj.grad - g_ref).norm() < 0.02 * g_ref.norm()  # bf16 rounding only


def test_bf16_grouped_gemm_hands_the_cpu_matmul_recurring_row_counts(monkeypatch):
    """Rows per expert change every step and oneDNN (bf16 CPU matmuls) builds a kernel per new shape,
    so each group runs as a multiple of ROW_BUCKET rows plus a remainder: both forms (rows x expert
    weights, and the weight gradient contracting over a group's rows) equal fp32 to bf16 rounding,
    whatever the group sizes (empty, below the bucket, a multiple, a multiple plus a remainder)."""
    from nanoseek.model import moe

    r = moe.ROW_BUCKET
    sizes = [0, 5, r, 3 * r + 7, 2 * r, r - 1]
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    n, k, m = int(offs[-1]), 64, 48
    a, w = torch.randn(n, k), torch.randn(len(sizes), k, m)
    dy, x = torch.randn(n, m), torch.randn(n, k)
    seen: list[int] = []
    real_mm = torch.mm

    def recording_mm(p, q, *args, **kwargs):
        seen.append(p.shape[0] if q.shape[0] == p.shape[1] and p.stride(-1) == 1 else p.shape[1])
        return real_mm(p, q, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    rows = moe._grouped_mm(a.bfloat16(), w.bfloat16(), offs)
    grads = moe._grouped_mm(dy.t().bfloat16(), x.bfloat16(), offs)
    monkeypatch.setattr(torch, "mm", real_mm)
    assert seen and all(c % r == 0 or c < r for c in seen), seen  # only shapes that recur
    bounds = [0, *offs.tolist()]
    for e in range(len(sizes)):
        s0, s1 = bounds[e], bounds[e + 1]
        torch.testing.assert_close(rows[s0:s1].float(), a[s0:s1] @ w[e], rtol=0.02, atol=0.15)
        torch.testing.assert_close(grads[e].float(), dy[s0:s1].t() @ x[s0:s1], rtol=0.02, atol=0.3)
    assert moe._grouped_mm(a, w, offs).dtype == torch.float32  # fp32 (MKL, no per-shape kernels): one call
    torch.testing.assert_close(moe._grouped_mm(a, w, offs)[: sizes[1]], a[: sizes[1]] @ w[1])


def _no_grouped_mm_kernel(*args, **kwargs):
    raise NotImplementedError("no CPU kernel")  # what torch 2.8's `torch._grouped_mm` says on a CPU


@pytest.mark.parametrize("missing", ["absent", "no_cpu_kernel"])  # torch 2.6/2.7, and torch 2.8
def test_grouped_experts_without_torch_grouped_mm_take_the_loop(monkeypatch, missing):
    """pyproject says any torch >= 2.6: where `torch._grouped_mm` is missing or has no kernel for the
    device, aligned expert GEMMs (forward and backward) take the loop and give the kernel's result."""
    from nanoseek.model import moe

    torch.manual_seed(0)
    experts, x, idx, w = random_experts(4, 32, 16, tokens=24, k=2, grad=True)
    params = (x, experts.gate_up_proj, experts.down_proj)
    ref = experts(x, idx, w)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    probe = getattr(moe, "_grouped_mm_works", None)  # probed once per process: again here and after
    if probe is not None:
        probe.cache_clear()
    if missing == "absent":
        monkeypatch.delattr(torch, "_grouped_mm")
    else:
        monkeypatch.setattr(torch, "_grouped_mm", _no_grouped_mm_kernel)
    try:
        got = experts(x, idx, w)
        grads = torch.autograd.grad(got.square().sum(), params)
    finally:
        if probe is not None:
            probe.cache_clear()
    torch.testing.assert_close(got, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tokens", [2, 24])  # the gathered decode path, and the grouped GEMM
def test_inference_expert_stack_in_gemm_layout_gives_the_training_forward(tokens):
    """Under inference mode MoE runs routed + shared experts from one stacked copy, stored as the GEMMs
    read it ([E, K, N], output dim contiguous: torch's CPU mm is slower on transposed views); the
    result is the no-grad forward's, which runs the shared expert apart."""
    cfg = config(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(1, tokens, cfg.hidden_size)
    with torch.no_grad():
        ref = moe(x)
    with torch.inference_mode():
        got = moe(x)
        gate_up, down = moe._with_shared_expert()
    assert gate_up.shape[0] == down.shape[0] == 9  # the shared expert appended as expert 8
    assert gate_up.transpose(1, 2).is_contiguous() and down.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_inference_copies_of_a_layers_weights_follow_each_of_them():
    """The absorbed MLA's folded weights and the MoE's inference stack (shared expert appended) are
    copies of the layer's own weights, rebuilt when one changes in place (an optimizer step, a
    load_state_dict into a model an Engine serves): each weight changed alone moves the inference-mode
    forward as it moves the plain one (naive MLA, the shared expert run apart)."""
    model = model_for(config(n_group=1, topk_group=1))
    layer = model.model.layers[-1]
    assert isinstance(layer.mlp, MoE)
    x = ids(seq=6)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            fast = model(x, absorb=True)
        with torch.no_grad():
            plain = model(x, absorb=False)
        return fast, plain

    fast, before = both()  # builds the copies
    torch.testing.assert_close(fast, before, rtol=0, atol=1e-4)
    names = []
    gen = torch.Generator().manual_seed(7)
    for name, p in layer.named_parameters():
        with torch.no_grad():  # noise, not a scale: a norm right after a projection undoes a scale
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=gen))
        fast, plain = both()
        assert (plain - before).abs().max() > 1e-3, f"{name} changed nothing: the check would be blind"
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        before = plain
        names.append(name)
    assert {"self_attn.o_proj.weight", "mlp.shared_experts.down_proj.weight"} <= set(names)


def test_routed_experts_gradcheck_in_float64():
    """Float64 (a gradcheck's dtype, which `torch._grouped_mm` refuses) runs the grouped path as a loop;
    its backward, the custom one, is the numerical derivative, an expert without tokens included."""
    from nanoseek.model import moe

    idx = torch.tensor([[0, 1], [1, 0], [1, 2], [2, 1], [1, 0]])  # expert 3 gets no token
    order, counts = moe.sort_by_expert(idx, 4)
    offs = counts.cumsum(0).to(torch.int32)

    def routed(x, w, gate_up, down):
        return moe._RoutedExpertsFunction.apply(
            x, w, gate_up, down, order, offs, torch.float64, moe._grouped_mm
        )

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((5, 8), (5, 2))]
    args += [
        torch.randn(4, *s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((8, 8), (8, 4))
    ]
    assert torch.autograd.gradcheck(routed, args)
    model = MoE(config(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3, generator=g)
    x = torch.randn(1, 12, 64, dtype=torch.float64)
    with torch.no_grad():
        assert model(x).dtype == torch.float64


def test_experts_with_no_tokens_and_empty_batch():
    experts = RoutedExperts(4, 8, 6)
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    x = torch.randn(3, 8)
    idx = torch.tensor([[2], [2], [2]])
    torch.testing.assert_close(
        experts(x, idx, torch.ones(3, 1)), dense_reference(experts, x, idx, torch.ones(3, 1))
    )
    empty = experts(torch.randn(0, 8), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert empty.shape == (0, 8)
    with torch.no_grad():  # inference's forward too (not the few-tokens decode path: it has no rows)
        empty = experts(torch.randn(0, 8), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert empty.shape == (0, 8)


def test_experts_one_unit_wide_run_grouped():
    """moe_intermediate_size 1: the activation rows [N,1] have strides (1, 1), which the alignment
    check let through to torch._grouped_mm as if it were aligned; it raised "strides should be
    multiple of 16 bytes" at the first forward of a config `validate` accepts."""
    torch.manual_seed(0)
    experts, x, idx, w = random_experts(4, 8, 1, tokens=8, k=2)
    torch.testing.assert_close(experts(x, idx, w), dense_reference(experts, x, idx, w))


@settings(max_examples=60)
@given(
    st.integers(1, 17),
    st.integers(1, 17),
    st.lists(st.integers(0, 5), min_size=1, max_size=4),
    st.booleans(),
    st.booleans(),
)
def test_grouped_mm_equals_a_loop_of_matmuls(k, m, rows, a_col_major, b_col_major):
    """Any widths, group sizes (empty ones too) and operand layouts, both forms of `_grouped_mm`
    (rows x each group's weight; the weight-gradient form over each group's rows) = a loop of mm."""
    gen = torch.Generator().manual_seed(k * 100 + m)
    n = sum(rows)
    offs = torch.tensor(rows, dtype=torch.int32).cumsum(0).to(torch.int32)
    spans = list(itertools.pairwise([0, *offs.tolist()]))

    def layout(t: torch.Tensor, col_major: bool) -> torch.Tensor:
        return t.transpose(-2, -1).contiguous().transpose(-2, -1) if col_major else t

    a = layout(torch.randn(n, k, generator=gen), a_col_major)
    b = layout(torch.randn(len(rows), k, m, generator=gen), b_col_major)
    want = torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(spans)])
    torch.testing.assert_close(_grouped_mm(a, b, offs), want)
    a2 = layout(torch.randn(k, n, generator=gen), a_col_major)
    b2 = layout(torch.randn(n, m, generator=gen), b_col_major)
    want2 = torch.stack([a2[:, s:e] @ b2[s:e] for s, e in spans])
    torch.testing.assert_close(_grouped_mm(a2, b2, offs), want2)


def moe_reference(cfg: ModelConfig, moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE for tokens x [T,H], one token and one expert at a time, from the papers and DeepSeek's
    gates: scores, the bias only to choose, the best topk_group groups (V3: by the sum of a group's top
    two, V2: by its max), top-k, then V3 normalizes and scales, V2 normalizes *or* scales."""
    e, size, out = cfg.n_routed_experts, cfg.n_routed_experts // cfg.n_group, torch.zeros_like(x)
    v3 = cfg.topk_method == "noaux_tc"
    for t in range(x.shape[0]):
        logits = moe.gate.weight @ x[t]
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        choice = (scores + moe.gate.e_score_correction_bias if v3 else scores).tolist()
        allowed = list(range(e))
        if cfg.n_group > 1 and cfg.topk_method != "greedy":
            rank = {}
            for g in range(cfg.n_group):
                best = sorted(choice[g * size : (g + 1) * size], reverse=True)
                rank[g] = best[0] + best[1] if v3 else best[0]
            keep = sorted(rank, key=lambda g: -rank[g])[: cfg.topk_group]
            allowed = [i for i in allowed if i // size in keep]
        chosen = sorted(allowed, key=lambda i: -choice[i])[: cfg.num_experts_per_tok]
        w = scores[chosen]
        if cfg.norm_topk_prob and (v3 or len(chosen) > 1):
            w = w / w.sum()
            w = w * cfg.routed_scaling_factor if v3 else w
        else:
            w = w * cfg.routed_scaling_factor
        for weight, i in zip(w, chosen, strict=True):
            gate, up = (moe.experts.gate_up_proj[i] @ x[t]).chunk(2)
            out[t] += weight * (moe.experts.down_proj[i] @ (F.silu(gate) * up))
        if moe.shared_experts is not None:
            out[t] += moe.shared_experts(x[t])
    return out


@settings(max_examples=40)
@given(mla_configs(), st.integers(0, 3), st.integers(1, 7))
def test_moe_equals_a_per_token_loop_for_any_routing(cfg, seed, tokens):
    """Training (grouped GEMMs under autograd), validation (no_grad) and serving (inference mode: the
    gathered-weights decode and the shared expert stacked as one more) all equal `moe_reference`."""
    if not cfg.is_moe:
        cfg = cfg.replace(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    moe = MoE(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        moe.gate.weight.mul_(3)  # scores spread over (0, 1): the choice is no coin toss
        moe.gate.e_score_correction_bias.copy_(torch.rand(cfg.n_routed_experts, generator=gen) * 0.2)
    x = torch.randn(1, tokens, cfg.hidden_size, generator=gen)
    with torch.no_grad():
        want = moe_reference(cfg, moe, x[0])
        torch.testing.assert_close(moe(x)[0], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moe(x)[0].detach(), want, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(moe(x)[0], want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ MTP
def test_mtp_shapes_and_shifted_tokens():
    cfg = config(num_nextn_predict_layers=2)
    model = model_for(cfg)
    with torch.no_grad():  # norms apart from 1 and from each other: which one runs where then shows
        gen = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))

    def combine(layer, h, embeds):  # V3 eq. 21, the embedding's half first (DeepSeek's weights, vLLM)
        w = layer.eh_proj.weight
        return F.linear(layer.enorm(embeds), w[:, :64]) + F.linear(layer.hnorm(h), w[:, 64:])

    x = ids(seq=10)
    with torch.no_grad():
        logits, hidden = model(x, return_hidden=True)
        mtp = model.mtp_logits(hidden, x)
    assert logits.shape == (2, 10, 128) and hidden.shape == (2, 10, 64)
    assert [t.shape for t in mtp] == [(2, 9, 128), (2, 8, 128)]
    # Depth 0 at position i combines h_i with Emb(t_{i+1}); depth 1 combines depth 0's state with
    # Emb(t_{i+2}). Recompute both by hand from the layers.
    with torch.no_grad():
        emb = model.model.embed_tokens
        pos = model.positions_for(x)
        cos, sin = model.model.rotary_emb(pos)
        l0, l1 = model.model.mtp_layers
        h0 = l0(combine(l0, hidden[:, :9], emb(x[:, 1:10])), cos[:, :9], sin[:, :9])
        torch.testing.assert_close(mtp[0], model.lm_head(l0.shared_head.norm(h0)))
        h1 = l1(combine(l1, h0[:, :8], emb(x[:, 2:10])), cos[:, :8], sin[:, :8])
        torch.testing.assert_close(mtp[1], model.lm_head(l1.shared_head.norm(h1)))
        # the fused losses: each depth's own norm, then the shared head, against labels shifted k+1 on
        labels = torch.cat((x[:, 1:], torch.full((2, 1), -100)), dim=1)
        losses = model.mtp_losses(hidden, x, labels)
        for k, (logits_k, loss_k) in enumerate(zip(mtp, losses, strict=True)):
            want = F.cross_entropy(logits_k.flatten(0, 1), labels[:, k + 1 :][:, : 9 - k].flatten())
            torch.testing.assert_close(loss_k, want)
        # Changing token t_9 changes depth 0 at its last position only (causality kept).
        y = x.clone()
        y[:, 9] = (y[:, 9] + 1) % 128
        changed = model.mtp_logits(hidden, y)[0]
        assert (changed[:, :8] - mtp[0][:, :8]).abs().max() < 1e-6
        assert (changed[:, 8] - mtp[0][:, 8]).abs().max() > 1e-4


def test_the_mtp_loss_reaches_the_main_models_hidden_states():
    """V3 §2.2: the MTP modules take the main model's output h_i as it is, so their loss trains the main
    model too (the denser signal the paper is after), not only the MTP modules. The gradient it sends
    into the hidden states is the one of the same losses written out by hand from the layers."""
    model = model_for(config(num_nextn_predict_layers=2))
    x = ids(seq=10)
    labels = torch.cat((x[:, 1:], torch.full((2, 1), -100)), dim=1)
    with torch.no_grad():
        hidden = model(x, return_hidden=True)[1]
    h = hidden.clone().requires_grad_()
    sum(model.mtp_losses(h, x, labels)).backward()
    ref_h = hidden.clone().requires_grad_()
    emb, (l0, l1) = model.model.embed_tokens, model.model.mtp_layers
    cos, sin = model.model.rotary_emb(model.positions_for(x))

    def depth(layer, prev, n, shift):  # V3 eq. 21-22, the embedding's half first
        w = layer.eh_proj.weight
        combined = F.linear(layer.enorm(emb(x[:, shift : shift + n])), w[:, :64]) + F.linear(
            layer.hnorm(prev[:, :n]), w[:, 64:]
        )
        return layer(combined, cos[:, :n], sin[:, :n])

    h0 = depth(l0, ref_h, 9, 1)
    h1 = depth(l1, h0, 8, 2)
    want = 0
    for k, (layer, hk) in enumerate(((l0, h0), (l1, h1))):
        logits = model.lm_head(layer.shared_head.norm(hk))
        want = want + F.cross_entropy(logits.flatten(0, 1), labels[:, k + 1 :][:, : 9 - k].flatten())
    want.backward()
    assert h.grad is not None and h.grad.abs().max() > 0
    torch.testing.assert_close(h.grad, ref_h.grad)


# ------------------------------------------------------------------ balancing
def test_router_scores_in_fp32_under_autocast():
    """Training runs under bf16 autocast, inference without: both must route alike, in fp32."""
    cfg = config(n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1)
    r = router_for(cfg).train()
    x = torch.randn(4, 64, 64)
    idx, w = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx_bf, w_bf = r(x)
    assert w_bf.dtype == torch.float32
    assert torch.equal(idx, idx_bf)
    torch.testing.assert_close(w, w_bf)


def test_sequence_balance_loss_matches_hand_computation():
    cfg = config(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    r = router_for(cfg).train()
    r.aux_loss_alpha = 0.01
    x = torch.randn(3, 5, 64)  # 3 sequences of 5 tokens
    idx, _ = r(x)
    scores = F.linear(x.reshape(-1, 64), r.weight).sigmoid().view(3, 5, 8)
    expected = 0.0
    for b in range(3):
        chosen = idx.view(3, 5, 2)[b]
        f = torch.tensor([(chosen == i).sum().item() for i in range(8)], dtype=torch.float32) * 8 / (2 * 5)
        p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        expected += 0.01 * (f * p).sum() / 3
    torch.testing.assert_close(r.aux_loss, expected)
    assert r.aux_loss.requires_grad  # it trains the router weights


def test_seq_aux_false_balances_over_the_whole_batch():
    """config.json's seq_aux false (DeepSeek-V2's MoEGate): f and P over all the batch's tokens at once,
    the batch-wise balance of V3 §4.5.2, not averaged per sequence; it was read by nothing before."""
    cfg = config(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, seq_aux=False)
    r = router_for(cfg).train()
    r.aux_loss_alpha = 0.01
    x = torch.randn(3, 5, 64)
    idx, _ = r(x)
    scores = F.linear(x.reshape(-1, 64), r.weight).sigmoid()
    f = torch.tensor([(idx == i).sum().item() for i in range(8)], dtype=torch.float32) * 8 / (2 * 15)
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    torch.testing.assert_close(r.aux_loss, 0.01 * (f * p).sum())
    per_sequence = router_for(cfg.replace(seq_aux=True)).train()
    per_sequence.aux_loss_alpha = 0.01
    per_sequence(x)
    assert not torch.allclose(per_sequence.aux_loss, r.aux_loss)


def test_a_row_of_padding_alone_is_left_out_of_the_balance_loss_mean():
    """The balance loss averages over the sequences that have tokens (V3 eq. 17-20 per sequence): a row
    that is all padding is no sequence, and must not dilute the mean of the others."""
    cfg = config(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    r = router_for(cfg).train()
    r.aux_loss_alpha = 0.01
    x = torch.randn(3, 5, 64)
    r(x[:2])
    alone = r.aux_loss
    token_mask = torch.ones(3, 5, dtype=torch.bool)
    token_mask[2] = False
    r(x, token_mask)
    torch.testing.assert_close(r.aux_loss, alone)


def test_model_balance_loss_and_expert_load_counters():
    cfg = config()
    model = model_for(cfg).train()
    assert model.balance_loss() is None or model.balance_loss() == 0
    model.set_balance_alpha(0.001)
    x = ids(batch=2, seq=6)
    model(x)
    loss = model.balance_loss()
    assert loss is not None and loss.ndim == 0 and loss > 0
    load = model.take_expert_load()
    moe_layers = [str(i) for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert sorted(load) == sorted(moe_layers + ["mtp0", "mtp1"]), "one enumeration, MTP routers included"
    for name, counts in load.items():  # the main forward does not run the MTP layers
        assert counts.shape == (8,) and counts.sum() == (0 if name.startswith("mtp") else 2 * 6 * 2)
    again = model.take_expert_load()
    assert all(c.sum() == 0 for c in again.values()), "take_expert_load resets the counters"
    model(x)
    model(x)
    load = model.take_expert_load()
    assert all(load[n].sum() == 2 * 2 * 6 * 2 for n in moe_layers), "counts accumulate"
    model.eval()
    model(x)
    assert all(c.sum() == 0 for c in model.take_expert_load().values()), "inference counts no load"
    assert isinstance(model.model.layers[1].mlp, MoE)


def test_mtp_routers_get_the_balance_loss():
    model = model_for(config()).train()
    model.set_balance_alpha(0.001)
    x = ids(batch=2, seq=6)
    hidden = model.hidden_states(x)
    main = model.balance_loss()
    model.mtp_losses(hidden, x, x)
    both = model.balance_loss()
    assert both is not None and main is not None and both > main
    mtp = [r for name, r in model.routers() if name.startswith("mtp")]
    assert mtp and all(r.aux_loss is not None and r.aux_loss.requires_grad for r in mtp)


def test_balance_loss_holds_no_mtp_router_loss_from_an_earlier_forward():
    """`balance_loss` is the last forward's: a main-head-only forward after one that ran the MTP
    modules (mtp_weight 0, a sequence too short for a depth) adds no MTP router's old loss, whose
    graph the earlier backward freed."""
    model = model_for(config()).train()
    model.set_balance_alpha(0.001)
    x = ids(batch=2, seq=6)
    hidden = model.hidden_states(x)
    (sum(model.mtp_losses(hidden, x, x)) + model.balance_loss()).backward()
    model.hidden_states(x)
    main = sum(r.aux_loss for name, r in model.routers() if not name.startswith("mtp"))
    torch.testing.assert_close(model.balance_loss(), main)
    model.balance_loss().backward()  # no stale graph in it
    short = x[:, :2]  # depth 1 has no position to predict from
    model.mtp_losses(model.hidden_states(short), short, short)
    assert [name for name, r in model.routers() if r.aux_loss is None] == ["mtp1"]


def test_padding_counts_in_neither_expert_load_nor_balance_loss():
    """V3 balances the load of the batch's tokens (§2.1.2) and each sequence's loss is over its own T
    tokens (eq. 17-20): the same sequences right-padded (SFT rows, GRPO micro-batches) must give the same
    expert loads and balance loss, MTP routers included, though the pad tokens are routed too."""
    model = model_for(config()).train()
    model.set_balance_alpha(0.01)
    x = ids(batch=2, seq=6).clamp_min(1)
    padded = torch.cat((x, torch.zeros(2, 9, dtype=torch.long)), dim=1)
    token_mask = padded != 0

    def balancing(input_ids, token_mask=None):
        hidden = model.hidden_states(input_ids, token_mask=token_mask)
        model.mtp_losses(hidden, input_ids, input_ids, token_mask=token_mask)
        return model.take_expert_load(), model.balance_loss()

    load, loss = balancing(x)
    load_padded, loss_padded = balancing(padded, token_mask)
    assert load_padded.keys() == load.keys() and load["mtp1"].sum() > 0
    for name in load:
        assert torch.equal(load_padded[name], load[name]), name
    torch.testing.assert_close(loss_padded, loss)
    # without the mask the padding (one token, repeated) is counted: what the mask is for
    unmasked, _ = balancing(padded)
    assert any(not torch.equal(unmasked[name], load[name]) for name in load)


# ------------------------------------------------------------ packed documents
def test_document_mask_makes_packed_documents_independent():
    """A packed row with the document mask gives each document the logits (and MTP logits) it gets
    alone, positions counted from its BOS: nothing leaks from the document before it."""
    from nanoseek.model.attention import document_causal_mask, documents_from_bos

    cfg = config(num_nextn_predict_layers=1, bos_token_id=0)
    model = model_for(cfg)
    a, b = ids(1, 7, seed=1).clamp_min(1), ids(1, 6, seed=2).clamp_min(1)
    a[0, 0] = b[0, 0] = 0  # each document opens with BOS
    row = torch.cat((a, b), dim=1)
    doc_ids, positions = documents_from_bos(row, 0)
    assert doc_ids.tolist() == [[1] * 7 + [2] * 6]
    assert positions.tolist() == [list(range(7)) + list(range(6))]
    mask = document_causal_mask(doc_ids)
    with torch.no_grad():
        packed, hidden = model(row, positions, mask=mask, return_hidden=True)
        alone_b, hidden_b = model(b, return_hidden=True)
        torch.testing.assert_close(packed[:, 7:], alone_b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, :7], model(a), atol=1e-5, rtol=1e-5)
        mtp_packed = model.mtp_logits(hidden, row, positions, mask)[0]
        mtp_b = model.mtp_logits(hidden_b, b)[0]
        # depth 0 at the last position of a sees b's first token (BOS) as "the next token": compare b
        torch.testing.assert_close(mtp_packed[:, 7:], mtp_b, atol=1e-5, rtol=1e-5)
        # without the mask b's logits depend on a
        unmasked = model(row)
        assert (unmasked[:, 7:] - alone_b).abs().max() > 1e-3


def test_window_that_starts_inside_a_document():
    from nanoseek.model.attention import documents_from_bos

    row = torch.tensor([[5, 6, 0, 7, 8, 0, 9]])
    doc_ids, positions = documents_from_bos(row, 0)
    assert doc_ids.tolist() == [[0, 0, 1, 1, 1, 2, 2]]
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0, 1]]


@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_gathered_and_in_place_equal_reference(tokens, monkeypatch):
    """At decode sizes small experts gather the chosen weights (two bmm's); large ones run grouped on
    their stored weights. Both equal the per-token reference."""
    from nanoseek.model import moe

    torch.manual_seed(0)
    experts, x, idx, w = random_experts(8, 16, 12, tokens=tokens, k=3)
    ref = dense_reference(experts, x, idx, w)
    with torch.inference_mode():
        assert experts.decodes(idx)
        gathered = experts(x, idx, w)
        monkeypatch.setattr(moe, "GATHER_LIMIT", 0)
        assert not experts.decodes(idx)
        in_place = experts(x, idx, w)
    torch.testing.assert_close(gathered, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(in_place, ref, rtol=1e-5, atol=1e-5)
    # V2-Lite's experts (8.7 M weights each) are past the limit: a gathered copy would double traffic.
    monkeypatch.undo()
    assert not RoutedExperts(64, 2048, 1408).to("meta").gathers()


def test_registered_attributes_read_what_nn_module_registers():
    """`Registered` class attributes (model/registered.py) must give exactly what nn.Module's own
    lookup gives, through registration, replacement, plain values, dtype moves and absence."""
    from torch import nn

    from nanoseek.model import DeepSeekV3, MultiHeadLatentAttention

    model = DeepSeekV3(small_config(n_shared_experts=0)).init_weights(seed=0)
    block = model.model.layers[-1]
    attn, moe = block.self_attn, block.mlp
    assert isinstance(attn, MultiHeadLatentAttention) and isinstance(moe, MoE)
    for owner in (model, model.model, block, attn, moe, moe.gate, block.input_layernorm):
        for registry in ("_parameters", "_buffers", "_modules"):
            for name, value in getattr(owner, registry).items():
                assert getattr(owner, name) is value, (type(owner).__name__, name)
    assert moe.shared_experts is None  # a plain None, kept in the instance's __dict__
    # a replaced projection (as quantization replaces it) is what the next read returns
    new = nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features, bias=False)
    attn.o_proj = new
    assert attn.o_proj is new and attn._modules["o_proj"] is new
    # a buffer assigned anew, and everything after a dtype move, are read from the module's dicts
    moe.gate.e_score_correction_bias = torch.ones(moe.gate.n_experts)
    assert moe.gate.e_score_correction_bias is moe.gate._buffers["e_score_correction_bias"]
    model.to(torch.bfloat16)
    assert block.input_layernorm.weight.dtype == torch.bfloat16
    assert moe.gate.weight is moe.gate._parameters["weight"]
    # a submodule the configuration leaves out is missing, as nn.Module says
    assert attn.q_lora_rank is not None and not hasattr(attn, "q_proj")
    with pytest.raises(AttributeError, match="q_proj"):
        getattr(attn, "q_proj")  # noqa: B009 (the attribute read is the test)


def test_derived_weights_follow_their_sources_within_and_across_epochs():
    """`DerivedWeights` rebuilds on an in-place change or a replaced tensor; inside an epoch it is
    not checked again, and a new epoch checks once, even for a value not read when the change
    happened (an MTP layer between drafts)."""
    from nanoseek.model.derived import DerivedWeights, weights_epoch

    w = torch.ones(3)
    src = {"w": w}
    builds = []
    derived: DerivedWeights[torch.Tensor] = DerivedWeights()

    def read() -> torch.Tensor:
        return derived.get(lambda: [src["w"]], lambda: builds.append(1) or src["w"] * 2)

    assert read().tolist() == [2, 2, 2] and len(builds) == 1
    w.add_(1)  # in place: the version counter moves
    assert read().tolist() == [4, 4, 4] and len(builds) == 2
    src["w"] = torch.full((3,), 5.0)  # replaced
    assert read().tolist() == [10, 10, 10] and len(builds) == 3
    with weights_epoch(first := object()):
        read()
        assert len(builds) == 3
    src["w"].add_(1)  # changed between epochs, read in neither
    with weights_epoch(first):  # the caller vouched wrongly: the checked value is kept
        assert read().tolist() == [10, 10, 10]
    with weights_epoch(object()):  # a new epoch checks once, then trusts
        assert read().tolist() == [12, 12, 12] and len(builds) == 4
        src["w"].add_(1)
        assert read().tolist() == [12, 12, 12] and len(builds) == 4
    assert read().tolist() == [14, 14, 14] and len(builds) == 5  # outside an epoch: every read checks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_a_model_moved_after_inference_serves_on_its_new_device():
    """The serving MoE keeps the shared expert's [t, 1] columns in a plain attribute, which `.to()` does
    not move: a model run under inference mode on the CPU, then moved to the GPU, mixed devices."""
    from nanoseek.model.transformer import DeepSeekV3

    model = DeepSeekV3(small_config()).init_weights(seed=0).eval()
    x = torch.randint(0, small_config().vocab_size, (1, 3))
    with torch.inference_mode():
        want = model(x)
        got = model.to("cuda")(x.cuda()).cpu()
    assert torch.allclose(got, want, atol=1e-4)


def test_model_cast_with_to_keeps_rope_frequencies_and_balancing_state_fp32():
    """`model.to(torch.bfloat16)` gives the model `build(dtype=torch.bfloat16)` and load_model give:
    RoPE's inverse frequencies stay fp32 (rounded to bf16, this model's were off by up to 0.1%, its
    angles at position 2000 by 0.2 rad), the routers' bias and loads too."""
    cfg = config(num_nextn_predict_layers=0, max_position_embeddings=4096)
    model = model_for(cfg)
    built = build_model(cfg, dtype=torch.bfloat16)
    built.load_state_dict(model.state_dict())
    model.to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, built.model.rotary_emb.inv_freq)
    for _, router in model.routers():
        assert router.e_score_correction_bias.dtype == router.expert_load.dtype == torch.float32
    ids = torch.randint(0, cfg.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), built.eval()(ids))


def test_init_weights_draws_from_initializer_range_with_output_projections_scaled_by_depth() -> None:
    """Normal(0, initializer_range) weights; the residual stream's writers (o_proj, down_proj) at
    std/sqrt(2·layers); unit norms; zero balancing bias."""
    cfg = config(num_hidden_layers=8)
    cfg = cfg.replace(extra={**cfg.extra, "initializer_range": 0.05})
    model = build_model(cfg).init_weights(0)
    layer = model.model.layers[-1]
    out_std = 0.05 / (2 * 8) ** 0.5
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert layer.mlp.experts.down_proj.std().item() == pytest.approx(out_std, rel=0.05)
    assert layer.mlp.experts.gate_up_proj.std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert not layer.mlp.gate.e_score_correction_bias.any()


def test_derived_weights_rebuild_for_a_replaced_source_and_build_without_autograd():
    """DerivedWeights rebuilds when a source is replaced by another tensor at the same version (a
    checkpoint assigned), builds outside autograd, and weights_epoch restores the enclosing epoch."""
    from nanoseek.model import derived
    from nanoseek.model.derived import DerivedWeights, weights_epoch

    w = torch.nn.Parameter(torch.ones(2))
    src = {"w": w}
    dw: DerivedWeights[torch.Tensor] = DerivedWeights()
    first = dw.get(lambda: [src["w"]], lambda: src["w"] * 2)
    assert not first.requires_grad and first.tolist() == [2.0, 2.0]
    src["w"] = torch.nn.Parameter(torch.full((2,), 3.0))  # a new tensor, version 0 as the old one
    assert dw.get(lambda: [src["w"]], lambda: src["w"] * 2).tolist() == [6.0, 6.0]
    outer, inner = object(), object()
    with weights_epoch(outer):
        with weights_epoch(inner):
            assert derived._epoch is inner
        assert derived._epoch is outer
    assert derived._epoch is None


# -------------------------------------------------------------- any config
@settings(max_examples=15)
@given(mla_configs(), st.integers(0, 3), st.booleans())
def test_absorbed_equals_naive_for_any_config(cfg, seed, fold):
    """Folded (W_UK into the query, W_UV into the output) or applied per head (`FOLD_LIMIT`)."""
    from nanoseek.model import attention

    model = model_for(cfg, seed)
    x = ids(seq=10, vocab=cfg.vocab_size, seed=seed)
    limit = attention.FOLD_LIMIT
    try:
        attention.FOLD_LIMIT = limit if fold else 0
        with torch.no_grad():
            naive = model(x, absorb=False)
            torch.testing.assert_close(model(x, absorb=True), naive, rtol=0, atol=1e-4)
    finally:
        attention.FOLD_LIMIT = limit


@settings(max_examples=15)
@given(
    mla_configs(),
    st.integers(0, 3),
    st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=9), min_size=1, max_size=3),
    st.integers(1, 6),
    st.booleans(),
)
def test_engine_greedy_is_the_full_forwards_argmax_for_any_config(cfg, seed, prompts, chunk, speculative):
    """Batched, in prefill chunks, over paged blocks, speculating with the MTP layer where there is one:
    each generated token is the argmax of the full forward over the prompt and the tokens before it."""
    from nanoseek.engine import Engine

    model = model_for(cfg.replace(eos_token_id=None), seed)
    speculative = speculative and cfg.num_nextn_predict_layers > 0
    engine = Engine(model, max_batch_size=2, block_size=4, prefill_chunk=chunk, speculative=speculative)
    outputs = engine.generate(prompts, max_new_tokens=5, ignore_eos=True)
    assert [len(got) for got in outputs] == [5] * len(prompts)
    assert_greedy(model, prompts, outputs)
