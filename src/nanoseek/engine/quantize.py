"""Weight-only quantization for serving: int8 (per output channel) and FP8 e4m3 storage.

What is notable here:
- Symmetric per-output-channel scales: w ≈ q · s with s = max|w_row| / 127 (int8) or / 448 (e4m3).
  Activations stay in the model's dtype; only weights shrink (4x vs fp32, 2x vs bf16).
- int8 matmuls use PyTorch's CPU weight-only kernel (`_weight_int8pack_mm`) when it accepts the
  shapes, else dequantize on the fly. FP8 is storage only: weights are widened per call.
- Every linear of the attention and the MLPs is quantized, and the stacked routed experts too (their
  scales are per expert and output channel). Embeddings, norms, the router and the LM head stay in
  full precision: they are small, and the router and head are the most sensitive to error.
- Applied in place (the point is to free memory). The engine's lean forward reads plain weights, so a
  quantized model runs through the model's own modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import RoutedExperts

FORMATS = ("int8", "fp8")
_QMAX = {"int8": 127.0, "fp8": 448.0}


def quantize_tensor(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim reduced) symmetric quantization. Returns (q, scale) with w ≈ q * scale[..., None]."""
    if w.is_meta:  # placeholders for `load_model(quantize=...)` to stream into; meta reductions would
        # run Python reference kernels, which import torch._dynamo (~2 s)
        q = torch.empty(w.shape, dtype=torch.int8 if fmt == "int8" else torch.float8_e4m3fn, device="meta")
        return q, torch.empty(w.shape[:-1], device="meta")
    wf = w.detach().float()
    scale = wf.abs().amax(dim=-1).clamp(min=1e-12) / _QMAX[fmt]
    x = wf / scale.unsqueeze(-1)
    q = x.round().clamp(-127, 127).to(torch.int8) if fmt == "int8" else x.to(torch.float8_e4m3fn)
    return q, scale


def _int8_kernel_ok(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Does PyTorch's weight-only int8 kernel take these dtypes/shapes and agree with dequantizing?"""
    row = x.reshape(-1, x.shape[-1])[:1].contiguous()
    try:
        got = torch.ops.aten._weight_int8pack_mm(row, q, scale.to(x.dtype))
    except Exception:
        return False
    want = F.linear(row, q.to(x.dtype) * scale.to(x.dtype).unsqueeze(-1))
    return bool(torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2))


class QuantLinear(nn.Module):
    """A bias-free nn.Linear with quantized weight storage."""

    def __init__(self, linear: nn.Linear, fmt: str) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("QuantLinear supports bias-free linears only (all of DeepSeek's are)")
        self.fmt = fmt
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        q, s = quantize_tensor(linear.weight, fmt)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s.to(self.compute_dtype))
        self._kernel: bool | None = None if fmt == "int8" else False

    def dequantized(self) -> torch.Tensor:
        return (self.qweight.to(self.compute_dtype) * self.scale.unsqueeze(-1)).to(self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads it directly (MLA's absorbed path reads kv_b_proj)."""
        return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:
            self._kernel = _int8_kernel_ok(x, self.qweight, self.scale)
        if self._kernel:
            shape = x.shape
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, shape[-1]).contiguous(), self.qweight, self.scale
            )
            return y.view(*shape[:-1], self.out_features)
        return F.linear(x, self.dequantized())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}"


class QuantRoutedExperts(RoutedExperts):
    """RoutedExperts with quantized stacked weights; the same grouped forward, per-expert dequant."""

    def __init__(self, experts: RoutedExperts, fmt: str) -> None:
        nn.Module.__init__(self)
        self.n_experts = experts.n_experts
        self.intermediate_size = experts.intermediate_size
        self.fmt = fmt
        dtype = experts.gate_up_proj.dtype
        self.compute_dtype = dtype
        q1, s1 = quantize_tensor(experts.gate_up_proj, fmt)
        q2, s2 = quantize_tensor(experts.down_proj, fmt)
        self.register_buffer("q_gate_up", q1)
        self.register_buffer("s_gate_up", s1.to(dtype))
        self.register_buffer("q_down", q2)
        self.register_buffer("s_down", s2.to(dtype))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        t, k = indices.shape
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        token_of = order // k
        xs = x[token_of]
        outs = []
        start = 0
        dt = self.compute_dtype
        for e, n in enumerate(counts):
            if n == 0:
                continue
            w1 = self.q_gate_up[e].to(dt) * self.s_gate_up[e].unsqueeze(-1)
            w2 = self.q_down[e].to(dt) * self.s_down[e].unsqueeze(-1)
            gate, up = F.linear(xs[start : start + n], w1).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, w2))
            start += n
        ys = torch.cat(outs) if outs else xs.new_zeros(0, x.shape[-1])
        ys = ys * weights.flatten()[order].unsqueeze(-1).to(ys.dtype)
        return torch.zeros_like(x, dtype=ys.dtype).index_add_(0, token_of, ys)


def quantize_model(model: nn.Module, fmt: str) -> nn.Module:
    """Replace the model's linears (not lm_head, not the router) and routed experts in place."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization {fmt!r}; choose one of {FORMATS}")
    targets: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full == "lm_head":
                continue
            if isinstance(child, nn.Linear):
                targets.append((module, child_name, QuantLinear(child, fmt)))
            elif isinstance(child, RoutedExperts) and not isinstance(child, QuantRoutedExperts):
                targets.append((module, child_name, QuantRoutedExperts(child, fmt)))
    for parent, child_name, new in targets:
        setattr(parent, child_name, new)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantRoutedExperts)) for m in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and persistent buffers (what the weights cost in memory)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
