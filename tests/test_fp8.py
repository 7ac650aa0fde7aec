"""Fine-grained FP8: quantization bounds per tile/block, GEMMs against float64, gradients, training."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nanoseek.config import get_preset
from nanoseek.model import fp8
from nanoseek.model.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    TILE,
    FP8Linear,
    FP8Recipe,
    FP8TrainingLinear,
    convert_from_fp8_training,
    convert_to_fp8_training,
    dequantize_blocks,
    dequantize_tiles,
    fp8_gemm,
    fp8_linear,
    is_fp8_training,
    quantize_blocks,
    quantize_linears_fp8,
    quantize_state_dict_fp8,
    quantize_tiles,
    resolve_backend,
)
from nanoseek.model.transformer import DeepSeekV3, cross_entropy


# E4M3: 3 mantissa bits -> round-to-nearest relative error <= 2^-4 for normal numbers; below the
# smallest normal (2^-6) the spacing is 2^-9, so the absolute error is <= 2^-10 in scaled units.
@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny ops: one thread avoids OpenMP spin-waits on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REL = 2.0**-4
SUBNORMAL_ABS = 2.0**-10
BACKENDS = (
    ["emulate", "scaled_mm"]
    if resolve_backend(FP8Recipe(), torch.device("cpu")) == "scaled_mm"
    else ["emulate"]
)


def _element_bound(x: torch.Tensor, scale_per_element: torch.Tensor) -> torch.Tensor:
    return torch.maximum(REL * x.abs(), SUBNORMAL_ABS * scale_per_element) * 1.0001 + 1e-30


def _spiky(rows: int, cols: int) -> torch.Tensor:
    """Gaussian values over six orders of magnitude per row, plus outliers: what per-tensor scaling fails."""
    x = torch.randn(rows, cols) * torch.logspace(-3, 3, rows).unsqueeze(1)
    x[torch.rand(rows, cols) < 0.01] *= 100.0
    return x


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("cols", [128, 300])
def test_tile_quantization_error_bound(pow2: bool, cols: int) -> None:
    x = _spiky(64, cols)
    q, s = quantize_tiles(x, pow2=pow2)
    assert q.dtype == FP8_DTYPE and q.shape == (64, (cols + TILE - 1) // TILE * TILE)
    assert s.shape == (64, q.shape[1] // TILE)
    y = dequantize_tiles(q, s)[:, :cols]
    s_el = s.repeat_interleave(TILE, 1)[:, :cols]
    assert ((y - x).abs() <= _element_bound(x, s_el)).all()
    # Every tile uses the E4M3 range: its largest element lands at (or, rounded up to 2^k, near) 448.
    amax_q = q.float().abs().view(64, -1, TILE).amax(-1)[:, : cols // TILE]
    assert (amax_q <= FP8_MAX).all()
    assert (amax_q >= (FP8_MAX / 2 if pow2 else FP8_MAX * 0.999)).all()
    if pow2:
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))
    # Fine-grained beats per-tensor scaling on such data: the small rows fall into subnormals there.
    per_tensor = x.abs().max() / FP8_MAX
    coarse = (x / per_tensor).to(FP8_DTYPE).float() * per_tensor
    small = slice(0, 8)
    assert (y - x)[small].abs().mean() < 0.1 * (coarse - x)[small].abs().mean()


@pytest.mark.parametrize("pow2", [False, True])
def test_block_quantization_error_bound(pow2: bool) -> None:
    w = _spiky(300, 200).t().contiguous()  # [200, 300]: partial blocks on both edges
    q, s = quantize_blocks(w, pow2=pow2)
    assert q.shape == w.shape and s.shape == (2, 3)
    y = dequantize_blocks(q, s)
    s_el = s.repeat_interleave(TILE, 0)[:200].repeat_interleave(TILE, 1)[:, :300]
    assert ((y - w).abs() <= _element_bound(w, s_el)).all()
    # Blocks are transpose-invariant: quantizing Wᵀ gives the same FP8 values and transposed scales.
    qt, st = quantize_blocks(w.t(), pow2=pow2)
    assert torch.equal(qt.float(), q.float().t()) and torch.equal(st, s.t())


def test_zero_tiles_stay_zero() -> None:
    x = torch.zeros(4, 256)
    x[0, 200] = 3.0
    q, s = quantize_tiles(x)
    y = dequantize_tiles(q, s)
    assert torch.equal(y, x) and torch.isfinite(s).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_blocks", [True, False])
def test_fp8_gemm_against_float64(backend: str, weight_blocks: bool) -> None:
    m, k, n = 96, 384, 160
    a = torch.randn(m, k) * torch.logspace(-2, 2, m).unsqueeze(1)
    b = torch.randn(n, k) * 0.05
    aq, sa = quantize_tiles(a)
    bq, sb = quantize_blocks(b) if weight_blocks else quantize_tiles(b)
    out = fp8_gemm(aq, sa, bq, sb, backend)
    ref = a.double() @ b.double().t()
    # Rigorous elementwise bound: |Σ a·b − Σ â·b̂| <= Σ |a|eb + ea|b| + ea·eb (+ fp32 summation).
    sa_el = sa.repeat_interleave(TILE, 1).double()
    sb_el = (sb.repeat_interleave(TILE, 0)[:n] if weight_blocks else sb).repeat_interleave(TILE, 1).double()
    ea = torch.maximum(REL * a.double().abs(), SUBNORMAL_ABS * sa_el)
    eb = torch.maximum(REL * b.double().abs(), SUBNORMAL_ABS * sb_el)
    bound = a.double().abs() @ eb.t() + ea @ b.double().abs().t() + ea @ eb.t()
    bound += k * 2.0**-23 * ((a.double().abs() + ea) @ (b.double().abs() + eb).t())
    assert ((out.double() - ref).abs() <= bound).all()
    # Typical error: a few percent relative (the bound is the worst case, errors mostly cancel).
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_backends_agree() -> None:
    if len(BACKENDS) < 2:
        pytest.skip("torch._scaled_mm does not run on this CPU build")
    a, b = torch.randn(40, 256), torch.randn(70, 256)
    aq, sa = quantize_tiles(a)
    bq, sb = quantize_blocks(b)
    e = fp8_gemm(aq, sa, bq, sb, "emulate")
    s = fp8_gemm(aq, sa, bq, sb, "scaled_mm")
    # Same exact products; only the fp32 summation order differs.
    torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def test_fp8_gemm_takes_transposed_views() -> None:
    # Wgrad quantizes dyᵀ and xᵀ, transposed views; CUDA's _scaled_mm (cuBLASLt) refuses a column-major
    # A ("Only multiplication of row-major and column-major matrices"), seen on an H200
    a, b = torch.randn(256, 40), torch.randn(256, 70)
    aq, sa = quantize_tiles(a.t())
    bq, sb = quantize_tiles(b.t())
    for backend in BACKENDS:
        out = fp8_gemm(aq, sa, bq, sb, backend)
        ref = fp8_gemm(aq.contiguous(), sa, bq.contiguous(), sb, backend)
        assert torch.equal(out, ref), backend


# Hopper's FP8 GEMMs where a GPU is present: the layouts cuBLASLt accepts differ from the CPU kernel's
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_linear_gradients_close_to_bf16(pow2: bool, device: str) -> None:
    x = torch.randn(
        2, 100, 320, device=device
    )  # 200 tokens (a partial 128-token tile for Wgrad), 320 = 2.5 tiles
    w = torch.randn(192, 320, device=device) * 0.05
    g = torch.randn(2, 100, 192, device=device)

    def grads(fn):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww)
        dx, dw = torch.autograd.grad(y, (xx, ww), g.to(y.dtype))
        return y.float(), dx.float(), dw.float()

    ref = grads(lambda a, b: a.double() @ b.double().t())
    bf16 = grads(lambda a, b: a.bfloat16() @ b.bfloat16().t())
    fp8 = grads(lambda a, b: fp8_linear(a, b, FP8Recipe(pow2_scales=pow2)))
    for name, r, b16, f8 in zip(("y", "dx", "dW"), ref, bf16, fp8, strict=True):
        assert f8.shape == r.shape and f8.dtype == torch.float32, name
        assert _rel(b16, r) < 0.01, name
        assert _rel(f8, r) < 0.06, name  # E4M3 rounding of both operands: ~2^-4 / sqrt(3) each
        assert _cos(f8, b16) > 0.995, name


def test_fp8_linear_under_autocast_returns_autocast_dtype() -> None:
    x = torch.randn(4, 256, requires_grad=True)
    w = (torch.randn(128, 256) * 0.05).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def _mini_config():
    # tiny's shape (MLA, shared + routed experts, dense first layer, MTP) at a fraction of its cost.
    cfg = get_preset("tiny").replace(vocab_size=512, num_hidden_layers=2, n_routed_experts=8)
    # transformers' 0.02 init, which these tolerances were set at: at tiny's wider init a random
    # network's blocks outweigh its embedding, and its logits amplify the FP8 rounding of every GEMM
    cfg.extra["initializer_range"] = 0.02
    return cfg


def test_convert_is_in_place_and_reversible(tmp_path) -> None:
    model = DeepSeekV3(_mini_config()).init_weights(0)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref = model(ids)
    n = convert_to_fp8_training(model)
    assert is_fp8_training(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert n == len(linears) - 1 + 2  # all linears but lm_head, plus the routed experts of 2 MoE layers
    assert not isinstance(model.lm_head, FP8TrainingLinear)
    assert type(model.model.layers[1].mlp.experts).__name__ == "FP8RoutedExperts"
    assert [id(p) for p in model.parameters()] == params  # the optimizer's parameters are untouched
    assert model.state_dict().keys() == keys.keys()
    with torch.no_grad():
        out = model(ids)
    assert _rel(out, ref) < 0.1 and not torch.equal(out, ref)
    from nanoseek.checkpoint import load_model, save_model

    save_model(model, tmp_path)  # saving an FP8-training model writes the plain checkpoint
    reloaded = load_model(tmp_path)
    assert not is_fp8_training(reloaded)
    assert convert_from_fp8_training(model) == n and not is_fp8_training(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref)
        torch.testing.assert_close(reloaded(ids), ref)


def test_fp8_training_lowers_the_loss_like_fp32() -> None:
    cfg = _mini_config()
    base = DeepSeekV3(cfg).init_weights(0)
    # A learnable stream: each token has 2 likely successors.
    gen = torch.Generator().manual_seed(0)
    succ = torch.randint(0, cfg.vocab_size, (cfg.vocab_size, 2), generator=gen)
    seq = torch.empty(2, 25, dtype=torch.long)
    seq[:, 0] = torch.randint(0, cfg.vocab_size, (2,), generator=gen)
    for t in range(24):
        seq[:, t + 1] = succ[seq[:, t], torch.randint(0, 2, (2,), generator=gen)]

    def train(model: DeepSeekV3, steps: int = 4) -> list[float]:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(steps):
            logits, hidden = model(seq[:, :-1], return_hidden=True)
            loss = cross_entropy(logits, seq[:, 1:])
            mtp = model.mtp_logits(hidden, seq[:, :-1])
            loss = loss + 0.3 * cross_entropy(mtp[0], seq[:, 2 : 2 + mtp[0].shape[1]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ref = train(copy.deepcopy(base))
    fp8_model = copy.deepcopy(base)
    convert_to_fp8_training(fp8_model)
    fp8 = train(fp8_model)
    assert all(p.dtype == torch.float32 for p in fp8_model.parameters())  # FP32 master weights
    assert fp8[-1] < fp8[0] - 1.0
    assert abs(fp8[-1] - ref[-1]) / ref[-1] < 0.1


def test_fp8_linear_storage() -> None:
    lin = nn.Linear(300, 200, bias=False)
    fp8 = FP8Linear.from_linear(lin)
    assert fp8.weight.dtype == FP8_DTYPE and fp8.weight_scale_inv.shape == (2, 3)
    assert set(fp8.state_dict()) == {"weight", "weight_scale_inv"}  # DeepSeek's checkpoint keys
    x = torch.randn(5, 300)
    with torch.no_grad():
        ref = lin(x)
        assert _rel(fp8(x), ref) < 0.05
        fp8.act_quant = True
        assert _rel(fp8(x), ref) < 0.06
    with pytest.raises(ValueError, match="weight_scale_inv shape"):
        fp8.load_fp8(fp8.weight.data, torch.ones(1, 1))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.load_fp8(torch.zeros(200, 300), fp8.weight_scale_inv.data)


def test_quantize_model_weights_for_inference() -> None:
    model = DeepSeekV3(_mini_config()).init_weights(0).eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = model(ids)
        n = quantize_linears_fp8(model)
        out = model(ids)
    assert n > 0 and isinstance(model.model.layers[0].self_attn.o_proj, FP8Linear)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, FP8Linear)
    assert _rel(out, ref) < 0.1


def test_deepseek_fp8_checkpoint_loads_kept_fp8(tmp_path) -> None:
    from safetensors.torch import save_file

    from nanoseek.checkpoint import load_model, to_hf_state_dict

    cfg = _mini_config()
    model = DeepSeekV3(cfg).init_weights(0)
    cfg.save(tmp_path)
    # A checkpoint in DeepSeek-V3's FP8 layout: linear weights float8_e4m3fn + weight_scale_inv.
    tensors = quantize_state_dict_fp8(to_hf_state_dict(model))
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == FP8_DTYPE
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == FP8_DTYPE
    assert tensors["lm_head.weight"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))

    kept = load_model(tmp_path, fp8=True)
    dequantized = load_model(tmp_path)  # the checkpoint module's dequantize-on-load path
    q_a = kept.model.layers[0].self_attn.q_a_proj
    assert isinstance(q_a, FP8Linear) and q_a.weight.dtype == FP8_DTYPE
    # The file's FP8 bytes are kept as they are: no dequantize/requantize round trip.
    assert torch.equal(
        q_a.weight.view(torch.uint8), tensors["model.layers.0.self_attn.q_a_proj.weight"].view(torch.uint8)
    )
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(kept(ids), dequantized(ids), rtol=1e-5, atol=1e-5)
        # Original (pre-quantization) weights: FP8 storage costs only the rounding of the weights.
        assert _rel(kept(ids), model(ids)) < 0.1


def _fp8_checkpoint(directory, pow2: bool = False, **config_extra) -> dict[str, torch.Tensor]:
    """A checkpoint in DeepSeek-V3's FP8 layout in `directory` (its tensors returned)."""
    from safetensors.torch import save_file

    from nanoseek.checkpoint import to_hf_state_dict

    cfg = _mini_config()
    cfg.extra.update(config_extra)
    cfg.save(directory)
    tensors = quantize_state_dict_fp8(to_hf_state_dict(DeepSeekV3(cfg).init_weights(0)), pow2=pow2)
    save_file({k: v.clone() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return tensors


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saving_a_ue8m0_fp8_checkpoint_keeps_its_weights(tmp_path, dtype: str) -> None:
    """DeepSeek-V3.1's FP8 checkpoints have power-of-two block scales ("scale_fmt": "ue8m0"). Loaded
    with fp8=True and saved, the routed experts (dequantized on load) were requantized with amax/448
    scales: most of their FP8 values rounded again, under a config.json still saying ue8m0."""
    from nanoseek.checkpoint import load_model, read_safetensors, save_model

    quantization = {**fp8.QUANTIZATION_CONFIG, "scale_fmt": "ue8m0"}
    tensors = _fp8_checkpoint(tmp_path / "in", pow2=True, quantization_config=quantization)
    save_model(load_model(tmp_path / "in", fp8=True, dtype=dtype), tmp_path / "out")
    saved = read_safetensors(tmp_path / "out")
    for key, value in tensors.items():
        if value.dtype == FP8_DTYPE:  # the same bytes and scales, the experts' included
            assert torch.equal(saved[key].view(torch.uint8), value.view(torch.uint8)), key
            assert torch.equal(saved[key + "_scale_inv"], tensors[key + "_scale_inv"]), key
    assert load_model(tmp_path / "out").config.extra["quantization_config"] == quantization


def test_ue8m0_checkpoint_quantizes_activations_with_power_of_two_scales(tmp_path) -> None:
    """DeepSeek-V3.1's inference quantizes a layer's input with the checkpoint's scale format
    (`act_quant(x, block_size, scale_fmt)`): a UE8M0 checkpoint loaded with act_quant=True gave its
    activations amax/448 scales while its weights had power-of-two ones."""
    from nanoseek.checkpoint import load_model

    quantization = {**fp8.QUANTIZATION_CONFIG, "scale_fmt": "ue8m0"}
    _fp8_checkpoint(tmp_path, pow2=True, quantization_config=quantization)
    layer = load_model(tmp_path, fp8=True, act_quant=True).model.layers[1].self_attn.o_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)) * 3

    def expected(pow2: bool) -> torch.Tensor:
        return dequantize_tiles(*quantize_tiles(x, pow2))[:, : x.shape[1]] @ layer.dequantize().t()

    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, expected(True), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, expected(False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kept", [False, True])
def test_fp8_checkpoint_without_block_scales_is_named(tmp_path, kept: bool) -> None:
    """Per-tensor scales are not DeepSeek's format: with fp8=True the error said the files were
    "written for another config.json" instead."""
    from safetensors.torch import save_file

    from nanoseek.checkpoint import load_model

    tensors = _fp8_checkpoint(tmp_path)
    tensors["model.layers.0.self_attn.q_a_proj.weight_scale_inv"] = torch.ones(())
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"q_a_proj.weight_scale_inv: shape \(\) is not one scale per 128x128"
    ):
        load_model(tmp_path, fp8=kept)


def _cuda_rules(real):  # torch._scaled_mm with the CUDA kernel's checks
    def mm(a, b, scale_a, scale_b, out_dtype=None, **kw):
        (m, k), (k2, n) = a.shape, b.shape
        assert k % 16 == 0 and k2 % 16 == 0 and n % 16 == 0, f"mat1 {a.shape} mat2 {b.shape} not /16"
        assert a.stride(1) == 1 and b.stride(0) == 1, "row-major A, column-major B only (sm90)"
        assert scale_a.shape == (m, 1) and scale_b.shape == (1, n)
        assert scale_a.is_contiguous() and scale_b.is_contiguous()
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, **kw)

    return mm


@pytest.mark.skipif(
    fp8.resolve_backend(fp8.FP8Recipe(), torch.device("cpu")) != "scaled_mm",
    reason="torch._scaled_mm does not run on this CPU build",
)
@pytest.mark.parametrize("n_in,n_out", [(128, 24), (200, 96), (192, 80)])
def test_fp8_linear_obeys_cuda_scaled_mm_shape_rules(monkeypatch, n_in, n_out):
    """What CUDA's _scaled_mm takes (ScaledBlas.cpp): both dims of mat2 divisible by 16, row-major A,
    column-major B. The CPU kernel is laxer, so its rules are applied by a wrapper here: widths not a
    multiple of 16 (Linear(128 -> 24)) failed on a GPU only."""
    torch.manual_seed(0)
    w = torch.randn(n_out, n_in, requires_grad=True)
    x = torch.randn(3, 5, n_in, requires_grad=True)
    recipe = fp8.FP8Recipe(backend="scaled_mm")
    want = fp8.fp8_linear(x, w, fp8.FP8Recipe(backend="emulate"))
    want.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    monkeypatch.setattr(torch, "_scaled_mm", _cuda_rules(torch._scaled_mm))
    got = fp8.fp8_linear(x, w, recipe)
    got.sum().backward()
    assert got.shape == (3, 5, n_out)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, gx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, gw, rtol=1e-4, atol=1e-4)


def test_e4m3_range_is_used_whole() -> None:
    """A tile's largest element maps to E4M3's largest finite value, 448 (scale = amax / 448), as
    DeepSeek-V3's act_quant and weight_quant compute it."""
    assert FP8_MAX == torch.finfo(FP8_DTYPE).max == 448.0
    x = torch.tensor([[0.5, -3.5, 1.75] + [0.0] * 125])
    q, s = quantize_tiles(x)
    assert s.item() == 3.5 / 448 and q.float()[0, 1].item() == -448.0
    w = torch.zeros(128, 128)
    w[5, 7] = 7.0
    q, s = quantize_blocks(w)
    assert s.item() == 7.0 / 448 and q.float()[5, 7].item() == 448.0


@pytest.mark.parametrize("magnitude", [1e-4, 1e-8])
def test_a_tile_of_tiny_values_still_spans_e4m3(magnitude: float) -> None:
    """Gradients of 1e-8 are ordinary: their tile's scale is its own amax / 448 however small (a floor
    on the scale near them would put them in E4M3's subnormals, a few bits or zero); the floor
    (`_MIN_SCALE`, amax 1e-12) is for all-zero tiles."""
    x = torch.tensor([[0.5, -3.5, 1.75] + [0.0] * 125]) * magnitude
    q, s = quantize_tiles(x)
    assert s.item() == (torch.tensor(3.5 * magnitude) / 448).item()
    assert q.float()[0, :3].tolist() == [64.0, -448.0, 224.0]  # 0.5/3.5·448, -448, 1.75/3.5·448
    w = torch.zeros(128, 128)
    w[5, 7] = 7.0 * magnitude
    qw, sw = quantize_blocks(w)
    assert sw.item() == (torch.tensor(7.0 * magnitude) / 448).item() and qw.float()[5, 7].item() == 448.0


def test_block_dequantization_by_hand() -> None:
    """dequantize_blocks is DeepSeek's weight_dequant: scale[i, j] multiplies rows i*128.., cols j*128..
    (a square grid of blocks, where a transposed scale would go unnoticed on rectangular ones)."""
    q = torch.ones(256, 200).to(FP8_DTYPE)
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w = dequantize_blocks(q, s)
    assert w[0, 0] == 1 and w[0, 199] == 2 and w[255, 0] == 3 and w[255, 199] == 4
    assert w[127, 127] == 1 and w[127, 128] == 2 and w[128, 127] == 3


def test_auto_backend_and_unavailable_scaled_mm(monkeypatch) -> None:
    """backend="auto" runs torch._scaled_mm where it runs (the tests of the scaled_mm backend skip
    otherwise); "scaled_mm" asked for where it does not run is an error, not a silent emulation."""
    cpu = torch.device("cpu")
    works = fp8._scaled_mm_works("cpu")
    assert resolve_backend(FP8Recipe(), cpu) == ("scaled_mm" if works else "emulate")
    monkeypatch.setattr(fp8, "_scaled_mm_works", lambda device_type: False)
    assert resolve_backend(FP8Recipe(), cpu) == "emulate"
    with pytest.raises(RuntimeError, match="does not run on cpu"):
        resolve_backend(FP8Recipe(backend="scaled_mm"), cpu)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_linear_gemms_by_hand(backend: str, pow2: bool) -> None:
    """Fprop, Dgrad and Wgrad against their definition (V3 Figure 6): each operand rounded to FP8 in
    its own tiles, with the recipe's kind of scale, then multiplied exactly; the GEMM only adds fp32
    rounding. Dgrad: dy in 1x128 tiles, W in its 128x128 blocks. Wgrad: dy and the FP8-cached x re-tiled
    along tokens. 200 tokens, 320 inputs, 192 outputs: partial tiles everywhere."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 320, generator=gen) * torch.logspace(-2, 2, 320)
    w = torch.randn(192, 320, generator=gen) * torch.logspace(1, -3, 192).unsqueeze(1)
    g = torch.randn(200, 192, generator=gen) * torch.logspace(-3, 1, 200).unsqueeze(1)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xx, ww, FP8Recipe(pow2_scales=pow2, backend=backend))
    dx, dw = torch.autograd.grad(y, (xx, ww), g)

    def rounded(t: torch.Tensor) -> torch.Tensor:  # 1x128 tiles along the last dim
        return dequantize_tiles(*quantize_tiles(t, pow2))[:, : t.shape[1]].double()

    w8 = dequantize_blocks(*quantize_blocks(w, pow2)).double()
    x8 = rounded(x)
    want = (rounded(x) @ w8.t(), rounded(g) @ w8, rounded(g.t()) @ rounded(x8.float().t()).t())
    for name, got, ref in zip(("y", "dx", "dW"), (y, dx, dw), want, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=name)


def test_fp8_linear_gradient_of_one_input_only() -> None:
    """A frozen weight (or an input that needs no gradient) still gets the other gradient, the same
    one as when both are asked for."""
    x, w, g = torch.randn(6, 256), torch.randn(128, 256) * 0.05, torch.randn(6, 128)
    both = torch.autograd.grad(fp8_linear(x.requires_grad_(), w.requires_grad_()), (x, w), g)
    only_x = x.detach().requires_grad_()
    fp8_linear(only_x, w.detach()).backward(g)
    only_w = w.detach().requires_grad_()
    fp8_linear(x.detach(), only_w).backward(g)
    assert torch.equal(only_x.grad, both[0]) and torch.equal(only_w.grad, both[1])


def test_fp8_training_linear_bias() -> None:
    """A converted nn.Linear with a bias adds it after the FP8 GEMM, in the GEMM's output dtype."""
    lin = nn.Linear(256, 128)
    nn.init.normal_(lin.bias)
    x = torch.randn(4, 256)
    want = fp8_linear(x, lin.weight) + lin.bias
    assert convert_to_fp8_training(lin, skip=()) == 1
    torch.testing.assert_close(lin(x), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_grouped_mm_by_hand(pow2: bool) -> None:
    """The routed experts' grouped GEMM on FP8 operands: rows in 1x128 tiles and each expert's own
    weight in 128x128 blocks (Fprop/Dgrad); both operands in tiles along the tokens (Wgrad)."""
    from nanoseek.model.moe import RoutedExperts

    gen = torch.Generator().manual_seed(0)
    offs = torch.tensor([50, 50, 180], dtype=torch.int32)  # an empty expert; a tile spans two
    a = torch.randn(180, 200, generator=gen) * torch.logspace(-2, 2, 200)
    b = torch.randn(3, 200, 136, generator=gen) * torch.tensor([1e-3, 1.0, 1e2]).view(3, 1, 1)
    b[:, 150:] *= 1e-3  # per-block scales differ within an expert
    g = torch.randn(180, 136, generator=gen) * torch.logspace(1, -1, 180).unsqueeze(1)

    def tiles(t: torch.Tensor) -> torch.Tensor:
        return dequantize_tiles(*quantize_tiles(t, pow2))[:, : t.shape[1]]

    blocks = [dequantize_blocks(*quantize_blocks(b[e].t(), pow2)).t() for e in range(3)]
    rows = [slice(0, 50), slice(50, 50), slice(50, 180)]
    want = torch.cat([tiles(a)[r] @ blocks[e] for e, r in enumerate(rows)])
    torch.testing.assert_close(fp8.fp8_grouped_mm(a, b, offs, pow2), want, rtol=1e-5, atol=1e-5)
    at, gt = tiles(a.t()), tiles(g.t()).t()  # Wgrad: a [K, N] @ g [N, M] -> [E, K, M]
    want = torch.stack([at[:, r] @ gt[r] for r in rows])
    torch.testing.assert_close(fp8.fp8_grouped_mm(a.t(), g, offs, pow2), want, rtol=1e-5, atol=1e-5)
    experts = RoutedExperts(3, 200, 68)
    convert_to_fp8_training(experts, FP8Recipe(pow2_scales=pow2))
    assert torch.equal(experts.grouped_mm(a, b, offs), fp8.fp8_grouped_mm(a, b, offs, pow2))
    assert not torch.equal(experts.grouped_mm(a, b, offs), fp8.fp8_grouped_mm(a, b, offs, not pow2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_linear_on_no_tokens(backend: str) -> None:
    """Zero tokens go through forward and backward as through nn.Linear: an empty output, zero weight
    gradient (the scaled_mm backward raised "expected scale_a.stride(1) to be 1, but got 0")."""
    x, w = torch.randn(0, 256, requires_grad=True), torch.randn(128, 256, requires_grad=True)
    y = fp8_linear(x, w, FP8Recipe(backend=backend))
    y.sum().backward()
    assert y.shape == (0, 128) and x.grad.shape == (0, 256) and torch.equal(w.grad, torch.zeros(128, 256))


def test_skip_and_experts_choose_what_is_converted() -> None:
    """`skip` names a module by the end of its qualified name (a wrapped model's head stays as is);
    experts=False leaves the routed experts in higher precision."""
    from nanoseek.model.moe import RoutedExperts

    outer = nn.Module()
    outer.model = nn.Module()
    outer.model.lm_head, outer.model.proj = nn.Linear(128, 128, bias=False), nn.Linear(128, 128, bias=False)
    outer.model.not_lm_head = nn.Linear(128, 128, bias=False)
    outer.model.experts = RoutedExperts(2, 128, 64)
    outer.model.biased = nn.Linear(128, 128)  # FP8Linear has no bias: storage leaves it as it is
    training = copy.deepcopy(outer)
    assert convert_to_fp8_training(training, experts=False) == 3  # proj, not_lm_head, biased
    assert type(training.model.lm_head) is nn.Linear and isinstance(
        training.model.not_lm_head, FP8TrainingLinear
    )
    assert type(training.model.experts) is RoutedExperts
    assert convert_to_fp8_training(training) == 4 and type(training.model.experts) is not RoutedExperts
    assert quantize_linears_fp8(outer) == 2
    assert type(outer.model.lm_head) is nn.Linear and isinstance(outer.model.not_lm_head, FP8Linear)
    assert type(outer.model.biased) is nn.Linear


def test_fp8_linear_storage_contract() -> None:
    """pow2 storage has power-of-two block scales; act_quant returns the input's dtype, as the
    dequantizing path does; a weight of another shape is refused, not broadcast into the layer."""
    lin = nn.Linear(300, 200, bias=False)
    fp8 = FP8Linear.from_linear(lin, act_quant=True, pow2=True)
    s = fp8.weight_scale_inv
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))
    torch.testing.assert_close(
        fp8.dequantize(), dequantize_blocks(*quantize_blocks(lin.weight.detach(), True))
    )
    with torch.no_grad():
        for act_quant in (True, False):
            fp8.act_quant = act_quant
            assert fp8(torch.randn(3, 300, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="weight shape"):
        fp8.load_fp8(fp8.weight.data[:1], fp8.weight_scale_inv.data)


def test_fp8_state_dict_keeps_deepseek_high_precision_tensors() -> None:
    """As in DeepSeek-V3's published checkpoint: the embeddings, the heads (the MTP module's copy
    too), the router and the norms stay in higher precision; every other linear weight is FP8."""
    from nanoseek.checkpoint import to_hf_state_dict

    model = DeepSeekV3(_mini_config()).init_weights(0)
    tensors = quantize_state_dict_fp8(to_hf_state_dict(model))
    mtp = model.config.num_hidden_layers
    for key in (
        "model.embed_tokens.weight",
        f"model.layers.{mtp}.shared_head.head.weight",
        f"model.layers.{mtp}.embed_tokens.weight",
        "model.layers.1.mlp.gate.weight",
    ):
        assert tensors[key].dtype == torch.float32, key
    assert tensors[f"model.layers.{mtp}.eh_proj.weight"].dtype == FP8_DTYPE
    for key, value in tensors.items():
        if value.dtype == FP8_DTYPE:
            assert tensors[key + "_scale_inv"].shape == tuple(-(-d // TILE) for d in value.shape), key


def test_fp8_weights_with_their_own_scales_are_kept_as_they_are() -> None:
    """An FP8 weight already in DeepSeek's layout (here scales with headroom: each block's largest value
    224, not 448, as another quantizer may leave it) passes through `quantize_state_dict_fp8` byte for
    byte, its scales too: quantized again, its values were doubled and rounded once more."""
    gen = torch.Generator().manual_seed(0)
    values = (torch.rand(256, 200, generator=gen) * 2 - 1) * 224.0
    values[0, 0], values[128, 199] = 224.0, -224.0  # every block's amax 224 (of 448)
    q = values.to(FP8_DTYPE)
    scale = torch.tensor([[0.5, 0.25], [2.0, 1.0]])
    tensors = {
        "model.layers.0.mlp.down_proj.weight": q,
        "model.layers.0.mlp.down_proj.weight_scale_inv": scale,
    }
    for pow2 in (False, True):
        out = quantize_state_dict_fp8(dict(tensors), pow2=pow2)
        assert set(out) == set(tensors)
        assert torch.equal(out["model.layers.0.mlp.down_proj.weight"].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(out["model.layers.0.mlp.down_proj.weight_scale_inv"], scale)


def test_a_scaled_mm_that_runs_but_computes_wrong_is_not_used(monkeypatch) -> None:
    """`_scaled_mm_works` checks the probe's result (ones · ones over 128 = 128 each), not only that
    the call returns: a kernel that returns garbage (zeros, or half the sum: a scale applied twice)
    leaves `auto` on the emulated GEMM; one that raises too."""

    def refuses(*args, **kwargs):
        raise RuntimeError("no kernel for Float8_e4m3fn on this device")

    try:
        for wrong in (
            lambda *a, **kw: torch.zeros(16, 16),
            lambda *a, **kw: torch.full((16, 16), 64.0),
            refuses,
        ):
            with monkeypatch.context() as m:
                m.setattr(torch, "_scaled_mm", wrong)
                fp8._scaled_mm_works.cache_clear()
                assert not fp8._scaled_mm_works("cpu")
                assert resolve_backend(FP8Recipe(), torch.device("cpu")) == "emulate"
    finally:
        fp8._scaled_mm_works.cache_clear()  # the real kernel probed again by the next caller


# ------------------------------------------------------------------ properties (hypothesis)
@st.composite
def _weights(draw, max_side: int = 300) -> torch.Tensor:
    """A weight of any shape (partial blocks on either edge): Gaussian at a magnitude from zero to 1e30,
    with a few values put anywhere (zeros, fp32 subnormals, E4M3's edge, huge ones)."""
    rows, cols = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    w = torch.randn(rows, cols, generator=g) * draw(
        st.sampled_from([0.0, 1e-30, 1e-12, 1e-6, 1.0, 1e6, 1e30])
    )
    special = st.sampled_from([0.0, -0.0, 1e-45, -1e-40, 1e-12, 1.0, -448.0, 65504.0, -1e38])
    for _ in range(draw(st.integers(0, 4))):
        w[draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))] = draw(
            special | st.floats(-(2.0**126), 2.0**126, width=32)
        )
    return w


@settings(max_examples=150)
@given(w=_weights(), pow2=st.booleans())
def test_block_quantization_of_any_weight_is_within_e4m3s_bound_and_dequantizes_block_by_block(
    w: torch.Tensor, pow2: bool
) -> None:
    """Any finite weight (|w| <= 1e38: nearer fp32's largest, E4M3's rounding up can pass it) quantizes
    to finite positive block scales and FP8 values within E4M3's bound of it; `dequantize_blocks` is a
    loop over the 128x128 blocks (DeepSeek's weight_dequant), and quantizing Wᵀ transposes both."""
    q, s = quantize_blocks(w, pow2=pow2)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.shape == (-(-w.shape[0] // TILE), -(-w.shape[1] // TILE))
    assert torch.isfinite(s).all() and (s > 0).all()
    y = dequantize_blocks(q, s)
    by_block = torch.empty(w.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = (slice(i * TILE, (i + 1) * TILE), slice(j * TILE, (j + 1) * TILE))
            by_block[block] = q[block].float() * s[i, j]
    assert torch.equal(y, by_block)
    s_el = s.repeat_interleave(TILE, 0)[: w.shape[0]].repeat_interleave(TILE, 1)[:, : w.shape[1]]
    assert torch.isfinite(y).all() and ((y - w).abs() <= _element_bound(w, s_el)).all()
    qt, st_ = quantize_blocks(w.t(), pow2=pow2)
    assert torch.equal(qt.float(), q.float().t()) and torch.equal(st_, s.t())


@settings(max_examples=150)
@given(w=_weights(), fmt=st.sampled_from(["int8", "fp8", "w8a8"]))
def test_the_engines_per_channel_quantization_of_any_weight_is_within_its_bound(
    w: torch.Tensor, fmt: str
) -> None:
    """`quantize_tensor` (the engine's int8/fp8/w8a8 storage): finite positive scales, one per row, and
    w = q · s to half an int8 step (|q| <= 127, symmetric) or within E4M3's bound, for any finite weight."""
    from nanoseek.engine.quantize import quantize_tensor

    q, s = quantize_tensor(w, fmt)
    assert q.shape == w.shape and s.shape == w.shape[:-1]
    assert torch.isfinite(s).all() and (s > 0).all()
    y = q.float() * s.unsqueeze(-1)
    assert torch.isfinite(y).all()
    if fmt == "fp8":
        bound = _element_bound(w, s.unsqueeze(-1).expand_as(w))
    else:
        assert q.abs().max() <= 127
        bound = s.unsqueeze(-1) * 0.5 * 1.0001 + 1e-30
    assert ((y - w).abs() <= bound).all()
