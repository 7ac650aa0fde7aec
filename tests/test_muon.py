"""Muon on the hidden matrices, AdamW on the rest (nanoseek.train.muon)."""

from __future__ import annotations

import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.model.transformer import DeepSeekV3
from nanoseek.train.loop import OptimConfig, Trainer, language_model_loss, param_groups
from nanoseek.train.muon import Muon, muon_param_groups, orthogonalization_flops, orthogonalize


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 16), (2, 5, 8, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonalize_flattens_the_spectrum(shape, dtype) -> None:
    torch.manual_seed(0)
    # a badly conditioned input: U diag(s) Vᵀ with singular values over two orders of magnitude
    k = min(shape[-2:])
    u, _ = torch.linalg.qr(torch.randn(*shape[:-1], k))
    v, _ = torch.linalg.qr(torch.randn(*shape[:-2], shape[-1], k))
    g = u @ torch.diag_embed(torch.logspace(-2, 0, k).expand(*shape[:-2], k)) @ v.mT
    o = orthogonalize(g, dtype=dtype).float()
    assert o.shape == g.shape
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.3 and s.max() < 1.3, (s.min(), s.max())
    # the same singular directions: o ≈ U Vᵀ of g
    assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ v.mT).flatten(), dim=0) > 0.9


def plain_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The textbook iteration X <- aX + (bG + cG²)X in float64, for reference."""
    a, b, c = 3.4445, -4.7750, 2.0315  # Keller Jordan's quintic
    x = g.double()
    wide = x.shape[-2] <= x.shape[-1]
    x = x if wide else x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonalize_is_the_textbook_iteration_to_rounding(dtype) -> None:
    """fp32 iterates on the Gram matrix, bf16 on the matrix itself: the same polynomial. A spectrum
    down to 1e-6 stays bounded in both (the Gram form in bf16 reached singular values of ~16,000 on
    it); below bf16's resolution its directions are noise, so bf16 is held to the bound only."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(4, 32, 32))
    v, _ = torch.linalg.qr(torch.randn(4, 64, 32))
    g = u @ torch.diag_embed(torch.logspace(0, -6, 32).expand(4, 32)) @ v.mT
    for m in (g, g.mT):  # wide and tall
        o = orthogonalize(m, dtype=dtype).double()
        assert torch.linalg.svdvals(o).max() < 1.3
        if dtype == torch.float32:
            ref = plain_newton_schulz(m)
            assert (o - ref).norm() / ref.norm() < 1e-3


def tiny_model() -> DeepSeekV3:
    cfg = get_preset("tiny").replace(
        vocab_size=64, hidden_size=32, moe_intermediate_size=16, intermediate_size=48, num_hidden_layers=2
    )
    cfg = cfg.replace(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    return DeepSeekV3(cfg).init_weights(0)


def test_param_groups_put_hidden_matrices_on_muon() -> None:
    model = tiny_model()
    groups = muon_param_groups(model, param_groups(model, 0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter exactly once
    muon = {names[id(p)]: g["blocks"] for g in groups if g.get("muon") for p in g["params"]}
    assert muon["model.layers.1.mlp.experts.gate_up_proj"] == 2  # gate and up: two matrices
    assert muon["model.layers.1.mlp.experts.down_proj"] == 1
    assert "model.layers.0.self_attn.o_proj.weight" in muon
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.gate.weight"):
        assert name not in muon
    assert all(p.ndim >= 2 for g in groups if g.get("muon") for p in g["params"])
    no_decay = [g for g in groups if g["weight_decay"] == 0.0][0]
    assert all(p.ndim < 2 or "embed" in names[id(p)] for p in no_decay["params"])


def test_a_muon_step_moves_each_matrix_at_adamws_rms() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 32, 16) * 0.1)
    b = torch.nn.Parameter(torch.zeros(16))
    opt = Muon(
        [{"params": [w], "muon": True, "weight_decay": 0.0}, {"params": [b], "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    before = w.detach().clone()
    w.grad = torch.randn_like(w) * torch.logspace(-3, 0, 16)
    b.grad = torch.ones_like(b)
    opt.step()
    step = (w.detach() - before) / 1e-2
    # Moonlight's scale 0.2·sqrt(max(m, n)) times an orthogonal update's RMS 1/sqrt(max(m, n)) ≈ 0.2
    rms = step.pow(2).mean(dim=(-2, -1)).sqrt()
    assert torch.all((rms > 0.12) & (rms < 0.25)), rms
    assert torch.allclose(b.detach(), torch.full_like(b, -1e-2), atol=1e-4)  # AdamW's first step: -lr·sign
    assert "momentum_buffer" in opt.state[w] and "exp_avg" in opt.state[b]


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_an_expert_without_gradient_is_left_alone(ns_dtype) -> None:
    """An expert no token was routed to has an all-zero slice of the stacked gradient: like a parameter
    without gradient (AdamW, or transformers' per-expert modules) it must not move. Its stale momentum,
    orthogonalized, moved it a full step every step (and weight decay shrank it)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 32, 16) * 0.1)
    opt = Muon([{"params": [w], "muon": True, "weight_decay": 0.1}], lr=1e-2, ns_dtype=ns_dtype)
    w.grad = torch.randn_like(w)
    opt.step()
    before, momentum = w.detach().clone(), opt.state[w]["momentum_buffer"].clone()
    # the others step as they would alone, decay included (a matrix with some zero entries is used)
    alone = torch.nn.Parameter(before[1:].clone())
    ref = Muon([{"params": [alone], "muon": True, "weight_decay": 0.1}], lr=1e-2, ns_dtype=ns_dtype)
    ref.state[alone]["momentum_buffer"] = momentum[1:].clone()
    ref.state[alone]["step"] = torch.tensor(1.0)
    w.grad = torch.randn_like(w)
    w.grad[0] = 0  # expert 0 got no token this step
    w.grad[1, :, 0] = 0  # a column without gradient in expert 1: still a used matrix
    alone.grad = w.grad[1:].clone()
    opt.step()
    ref.step()
    assert torch.equal(w[0], before[0]) and torch.equal(opt.state[w]["momentum_buffer"][0], momentum[0])
    assert not torch.equal(w[1], before[1])
    torch.testing.assert_close(w[1:], alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonalization_flops_are_what_a_muon_step_multiplies(dtype) -> None:
    """bench_speedrun's compute floor counts Newton-Schulz without running it: the count must be the
    real step's (same matrices, same batching by shape, fused gate/up split in two)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_preset("tiny").replace(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2
    )
    torch.manual_seed(0)
    model = DeepSeekV3(cfg).init_weights(0)
    groups = muon_param_groups(model, param_groups(model, 0.1))
    opt = Muon(groups, ns_dtype=dtype, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with FlopCounterMode(display=False) as counter:
        opt.step()  # AdamW's part multiplies no matrices
    assert counter.get_total_flops() > 0
    assert orthogonalization_flops(groups, dtype=dtype) == counter.get_total_flops()
    assert orthogonalization_flops(groups, steps=3, dtype=dtype) < counter.get_total_flops()


def test_trainer_builds_muon_and_refuses_several_ranks(tmp_path) -> None:
    from nanoseek.train.distributed import DistInfo

    model = tiny_model()
    tr = Trainer(model, tmp_path, "pretrain", OptimConfig(optimizer="muon"), total_steps=4, precision="fp32")
    assert isinstance(tr.optimizer, Muon) and tr.optimizer.ns_dtype == torch.float32
    # Newton-Schulz in the precision the step multiplies in
    bf16 = Trainer(tiny_model(), tmp_path / "bf16", "pretrain", OptimConfig(optimizer="muon"), total_steps=4)
    assert bf16.optimizer.ns_dtype == torch.bfloat16
    x = torch.randint(0, 64, (2, 16))
    before = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    tr.step(lambda: language_model_loss(model, x, x.roll(-1, 1)))
    assert not torch.equal(before, model.model.layers[0].self_attn.o_proj.weight)
    assert (
        "momentum_buffer" in tr.optimizer.state[model.model.layers[0].self_attn.o_proj.weight]
    )  # a Muon step
    with pytest.raises(ValueError, match="optimizer 'nadam' not in adamw, muon"):
        OptimConfig(optimizer="nadam")
    with pytest.raises(ValueError, match="one process only"):
        Trainer(
            tiny_model(),
            tmp_path,
            "pretrain",
            OptimConfig(optimizer="muon"),
            total_steps=4,
            precision="fp32",
            dist=DistInfo(world_size=2),
        )


def test_two_muon_steps_by_hand_nesterov_momentum_and_decoupled_decay() -> None:
    """Two steps on one 4x6 matrix against the recipe written out: buf <- mu·buf + (1-mu)·g, the Nesterov
    update g + mu·(buf - g), p <- p·(1 - lr·wd) - lr·0.2·sqrt(6)·NS(update) (Moonlight's decay and RMS)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 6, generator=gen))
    lr, wd, mu = 0.1, 0.5, 0.8
    opt = Muon([{"params": [p], "muon": True, "weight_decay": wd, "momentum": mu}], lr=lr)  # the group's own
    expected, buf = p.detach().clone(), torch.zeros(4, 6)
    for _ in range(2):
        g = torch.randn(4, 6, generator=gen)
        p.grad = g.clone()
        opt.step()
        buf = mu * buf + (1 - mu) * g
        update = g + mu * (buf - g)
        expected = expected * (1 - lr * wd) - lr * 0.2 * 6**0.5 * orthogonalize(update[None])[0]
    torch.testing.assert_close(p.detach(), expected)
    assert opt.state[p]["step"] == 2


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 24), (24, 8)])
def test_three_steps_match_torch_optim_muon(shape, ns_dtype) -> None:
    """The anchor: torch.optim.Muon with Moonlight's RMS matching (Keller Jordan's quintic coefficients,
    Nesterov momentum 0.95, decoupled decay, 0.2·sqrt(max(m, n))), which runs Newton-Schulz in bf16: the
    same run to its rounding, wide and tall. Another coefficient moved the weights ~9% away."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(*shape, generator=gen)
    ours, ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = Muon([{"params": [ours], "muon": True, "weight_decay": 0.1}], lr=0.05, ns_dtype=ns_dtype)
    anchor = torch.optim.Muon([ref], lr=0.05, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(*shape, generator=gen)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        anchor.step()
    assert (ours - ref).norm() / (ref - start).norm() < 0.03


def test_step_with_a_closure_is_a_step_after_backward() -> None:
    """opt.step(closure), as every torch optimizer takes it: the closure's gradients drive the Muon
    matrices too. It ran after the Muon part, so the matrices took AdamW's update instead."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))

    def run(with_closure: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        w, b = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.zeros(16))
        opt = Muon(
            [{"params": [w], "muon": True, "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
            lr=1e-2,
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = ((x + b) @ w.T).pow(2).mean()
            loss.backward()
            return loss

        loss = opt.step(closure) if with_closure else (closure(), opt.step())[0]
        return loss.item(), w.detach(), b.detach()

    (loss, w, b), (closure_loss, closure_w, closure_b) = run(False), run(True)
    assert closure_loss == loss
    assert torch.equal(closure_w, w) and torch.equal(closure_b, b)


@pytest.mark.parametrize("shape", [(3, 32, 64), (3, 64, 32)])
def test_newton_schulz_flops_by_hand(shape) -> None:
    """E matrices m x n, m <= n (a tall one is transposed: the iteration runs on the smaller Gram
    matrix). bf16 iterates on x: 5 x (X·Xᵀ, bG + cG², (..)·X) = 5·(4m²n + 2m³). fp32 iterates on G: X·Xᵀ
    and the final Q·X (4m²n), 5 polynomials bG + cG² (5·2m³), 4 products into Q and 4 updates P·G·P
    (4·6m³): ~16% fewer at n = 2m."""
    e, m, n = 3, 32, 64
    groups = [{"params": [torch.nn.Parameter(torch.empty(shape))], "muon": True, "blocks": 1}]
    assert orthogonalization_flops(groups, dtype=torch.bfloat16) == e * 5 * (4 * m * m * n + 2 * m**3)
    assert orthogonalization_flops(groups, dtype=torch.float32) == e * (
        4 * m * m * n + 5 * 2 * m**3 + 4 * 6 * m**3
    )


def test_a_group_added_later_takes_the_defaults() -> None:
    """add_param_group (unfreezing a layer mid-run) fills a group from the optimizer's defaults: it
    failed with KeyError: 'muon' (or 'blocks', 'momentum') at the next step."""
    w, b = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.zeros(16))
    opt = Muon([{"params": [torch.nn.Parameter(torch.randn(8, 16))], "muon": True}], lr=1e-2, momentum=0.8)
    opt.add_param_group({"params": [w], "muon": True})
    opt.add_param_group({"params": [b]})
    assert opt.param_groups[1]["momentum"] == 0.8 and opt.param_groups[1]["blocks"] == 1
    assert opt.param_groups[2]["muon"] is False
    w.grad, b.grad = torch.randn_like(w), torch.ones_like(b)
    opt.step()
    assert "momentum_buffer" in opt.state[w] and "exp_avg" in opt.state[b]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_newton_schulz_steps_is_the_normalised_input(dtype) -> None:
    """steps=0 raised a TypeError on the fp32 path (None @ x); both paths give g / ||g||_F."""
    g = torch.randn(2, 8, 16)
    want = (g / g.norm(dim=(-2, -1), keepdim=True)).to(dtype)
    torch.testing.assert_close(orthogonalize(g, steps=0, dtype=dtype), want, rtol=1e-2, atol=1e-6)
