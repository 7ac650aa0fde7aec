"""Quantization for serving: int8 (per output channel) and FP8 e4m3 weight storage, and w8a8.

What is notable here:
- Symmetric per-output-channel scales: w ≈ q · s with s = max|w_row| / 127 (int8) or / 448 (e4m3).
  Activations stay in the model's dtype; only weights shrink (4x vs fp32, 2x vs bf16).
- int8 matmuls of a few rows (decode) use PyTorch's CPU weight-only kernel (`_weight_int8pack_mm`)
  when it accepts the shapes and is vectorized for the dtype (on x86: bf16 only); its cost grows with the rows (it widens the weight again for each), so
  past `INT8PACK_ROWS` rows (`INT8PACK_ROWS_FP32` for fp32 rows; prefill, wide batches) the weight is
  widened once and the model dtype's GEMM runs. FP8 is storage only: weights are widened per call.
- w8a8 stores the same int8 weights and also quantizes the activations, to 8 bits per row, for
  PyTorch's quantized CPU GEMM (fbgemm on x86: int8 dot products, `torch.ops.quantized.linear_dynamic`),
  the scheme of llama.cpp's Q8_0 dot products (theirs scale every 32 activations, this one each
  row). It streams weights ~3.5x faster than the weight-only int8 kernel at decode. The
  backend packs its own copy of each weight when the engine is built (`pack_w8a8`; a model run
  without an engine packs each at its first call) and the int8 buffers are then freed
  (`moe.shape_only`: their shapes stay, the dense reference reads the backend's copy). PyTorch has
  deprecated its quantized tensors (torchao succeeds them): where they are gone, w8a8 is refused.
- Every linear of the attention and the MLPs is quantized, and the stacked routed experts too (their
  scales are per expert and output channel). With int8 the LM head too (per vocabulary row, as
  llama.cpp's Q8_0 does): at V2-Lite's width it is 40% of the bytes a bf16 decode step reads. It
  stays in full precision with FP8 storage (widened per call) and when tied to the embedding.
  Embeddings, norms and the router stay in full precision: small, and the router is the most
  sensitive to error.
- Applied in place (the point is to free memory). The model's modules run as they are: MLA's
  absorbed path from the weights it folds once (`MultiHeadLatentAttention.absorbed_weights`); routed
  experts through their one grouped path, which hands this storage (`grouped_weights`) to
  `QuantRoutedExperts.grouped_mm`: each expert a step uses runs on its own stored rows, so a step
  reads only the experts it uses, once, and no bf16 copy of all experts is ever made.
"""

from __future__ import annotations

import platform
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.engine.packed import PackedLinear, PackedRoutedExperts
from nanoseek.model.fp8 import FP8Linear
from nanoseek.model.moe import RoutedExperts, each_expert, shape_only
from nanoseek.perf import QUANTIZE_FORMATS

FORMATS = QUANTIZE_FORMATS  # (listed in nanoseek.perf for the CLI, which lists them before torch loads)
_QMAX = {"int8": 127.0, "fp8": 448.0, "w8a8": 127.0}


QUANT_CHUNK = 1 << 22  # weights quantized at a time (fp32 temporaries of ~16 MB each)


def quantize_tensor(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim reduced) symmetric quantization. Returns (q, scale) with w ≈ q * scale[..., None]."""
    if w.is_meta:  # placeholders for `load_model(quantize=...)` to stream into; meta reductions would
        # run Python reference kernels, which import torch._dynamo (slow to start)
        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn if fmt == "fp8" else torch.int8, device="meta")
        return q, torch.empty(w.shape[:-1], device="meta")
    rows = w.detach().reshape(-1, w.shape[-1])
    q = torch.empty(rows.shape, dtype=torch.float8_e4m3fn if fmt == "fp8" else torch.int8, device=w.device)
    scale = torch.empty(rows.shape[0], device=w.device)
    # Rows are independent: a few at a time, so the fp32 temporaries stay small beside a multi-GB
    # weight (a 102400 x 2048 head whole would take ~3 GB of them while it loads).
    step = max(1, QUANT_CHUNK // max(1, rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        wf = rows[i : i + step].float()
        s = wf.abs().amax(dim=-1).clamp(min=1e-12) / _QMAX[fmt]
        x = wf / s.unsqueeze(-1)
        q[i : i + step] = (
            x.round().clamp(-127, 127).to(torch.int8) if fmt != "fp8" else x.to(torch.float8_e4m3fn)
        )
        scale[i : i + step] = s
    return q.view(w.shape), scale.view(w.shape[:-1])


INT8PACK_ROWS = 8  # rows up to which `_weight_int8pack_mm` beats widening the weight once
# fp32 rows (rounded to bf16 for the kernel on x86, `_int8pack_dtype`): the widened weight then runs
# fp32's GEMM, which at a few dozen rows is far from its peak; the kernel beat it up to ~48 rows on an
# AVX2 CPU (16 concurrent decodes: 1.5-2.9x per matrix; benchmarks/README.md, "An AVX2-only host")
INT8PACK_ROWS_FP32 = 32
# Its x86 bf16 (and ARM) loops step through K 16 (8) values at a time with aligned loads and no tail:
# another width reads past each row, and a row off a 32-byte boundary faults (a segfault, which no
# `try` catches), so it runs only where K is a multiple of 16, on rows where it can load them.
INT8PACK_K = 16
X86 = ("x86_64", "amd64", "i686", "x86")
ON_X86 = platform.machine().lower() in X86  # once: `_int8pack_dtype` runs for every int8 kernel call


def _int8pack_dtype(x: torch.Tensor) -> torch.dtype:
    """The activation dtype `_weight_int8pack_mm` runs in for x: x86 builds vectorize it for bf16 only
    (fp32 and fp16 run a scalar loop), so fp32 rows go in rounded to bf16, one rounding of the order
    of the int8 weight's own (llama.cpp's Q8_0 rounds them to 8 bits); elsewhere x's own dtype."""
    if ON_X86 and x.dtype == torch.float32 and x.device.type == "cpu":
        return torch.bfloat16
    return x.dtype


def _quant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kernel: bool) -> torch.Tensor:
    """x [N,in] @ (q·scale)ᵀ [in,out] for one stored weight: the int8 kernel for a few rows, else the
    weight widened to x's dtype (exactly: int8 and e4m3 values are bf16 values), x's own GEMM, and
    the per-channel scale applied to the output columns (N·out multiplies, not out·in); fp16 could
    overflow on the unscaled sums, so it scales the weight."""
    kdtype = _int8pack_dtype(x)
    rows = INT8PACK_ROWS if kdtype == x.dtype else INT8PACK_ROWS_FP32
    if kernel and x.shape[0] <= rows and q.shape[1] % INT8PACK_K == 0:
        kx = x.to(kdtype).contiguous()
        if kx.data_ptr() % 64:  # a view off the allocator's alignment: these few rows copied are on it
            kx = kx.clone()
        return torch.ops.aten._weight_int8pack_mm(kx, q, scale.to(kx.dtype)).to(x.dtype)
    if q.numel() > QUANT_CHUNK:
        # A few output rows at a time: a 102400 x 2048 head widened whole is 0.8 GB of fp32 allocated
        # and faulted in on every call, far slower than the GEMM that reads it
        step = max(1, QUANT_CHUNK // q.shape[1])
        parts = [
            _quant_linear(x, q[i : i + step], scale[i : i + step], False) for i in range(0, q.shape[0], step)
        ]
        return torch.cat(parts, dim=-1)
    scale = scale.to(x.dtype)
    if x.dtype == torch.float16:
        return F.linear(x, q.to(x.dtype) * scale.unsqueeze(-1))
    return F.linear(x, q.to(x.dtype)) * scale


def _w8a8_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One stored int8 weight and its per-channel scales, prepacked for PyTorch's quantized CPU
    backend (fbgemm on x86): its own copy, in its own layout."""
    if q.device.type != "cpu":
        raise ValueError(
            f"quantize='w8a8' runs on CPUs (PyTorch's quantized CPU backend); the model is on {q.device}"
        )
    zeros = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # PyTorch deprecates quantized tensors (torchao succeeds them)
        # that one deprecation only: any other warning of these calls still reaches the user
        warnings.filterwarnings("ignore", r".*quantized tensor creation functions.*deprecated", UserWarning)
        # two zero input columns, for the two range-pinning columns `_w8a8_linear` appends to x
        q = torch.nn.functional.pad(q, (0, 2))
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
    return torch.ops.quantized.linear_prepack(qw, None)


def _w8a8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N,in] -> (rows scaled to max|x| = 1 with two range-pinning columns appended [N,in+2] fp32,
    the rows' scales [N,1]), what `_w8a8_linear` feeds the backend."""
    # Per-token dynamic quantization, as vLLM's w8a8: a row's result must not depend on the other rows
    # of the call (batch-mates, a prefill's other tokens, a speculative draft). The backend takes one
    # [min, max] range per call, so each row is scaled to max|x| = 1 and two appended columns (+1, -1,
    # against zero weight columns) pin that range to [-1, 1] for every call.
    n, k = x.shape
    with torch.no_grad():  # the quantized backend has no gradient (weights to train are not int8)
        amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-12)
        xn = torch.empty(n, k + 2)
        torch.div(x, amax, out=xn[:, :k])
        xn[:, k] = 1.0
        xn[:, k + 1] = -1.0
    return xn, amax


def _w8a8_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [N,in] @ (q·scale)ᵀ with each row of x quantized to 8 bits on its own (7 bits of range, which
    keeps AVX2's 16-bit pair sums from saturating), int8 dot products, fp32 out."""
    xn, amax = _w8a8_rows(x)
    return torch.ops.quantized.linear_dynamic(xn, packed, True).mul_(amax).to(x.dtype)


def _w8a8_dequantized(packed: torch.Tensor) -> torch.Tensor:
    """The fp32 weight a `_w8a8_weight` holds (its int8 values times their scales)."""
    return torch.ops.quantized.linear_unpack(packed)[0].dequantize()[:, :-2]


def w8a8_available() -> bool:
    """Whether this PyTorch still has the quantized CPU linear w8a8 runs on (deprecated upstream)."""
    try:
        q, s = quantize_tensor(torch.randn(8, 16), "w8a8")
        _w8a8_linear(torch.randn(2, 16), _w8a8_weight(q, s))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def _int8_kernel_ok(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Does PyTorch's weight-only int8 kernel take this dtype and agree with dequantizing (where
    `_quant_linear` runs it: the widths it can load), and does it pay here?"""
    if ON_X86 and x.dtype == torch.float16 and x.device.type == "cpu":
        # x86 builds vectorize it for bf16 only (fp32 rows go in as bf16, `_int8pack_dtype`): fp16's
        # scalar loop is slower than widening the weight for fp16's GEMM (figures: benchmarks/README.md)
        return False
    row = x.reshape(-1, x.shape[-1])[:1]
    q, scale = (
        q[:64],
        scale[:64],
    )  # a few output channels tell: the whole head widened was 1.7 GB of temporaries
    try:
        got = _quant_linear(row, q, scale, kernel=True)
    except Exception:
        return False
    want = F.linear(row, q.to(x.dtype) * scale.to(x.dtype).unsqueeze(-1))
    return bool(torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2))


class QuantLinear(nn.Module):
    """An nn.Linear with quantized weight storage; a bias (Qwen2's q/k/v) stays in the model's dtype."""

    qweight: torch.Tensor  # buffers, registered in __init__
    scale: torch.Tensor

    def __init__(self, linear: nn.Linear, fmt: str) -> None:
        super().__init__()
        self.bias = linear.bias  # None for all of DeepSeek's linears
        self.fmt = fmt
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        q, s = quantize_tensor(linear.weight, fmt)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s.to(self.compute_dtype))
        self._kernel: bool | None = None if fmt == "int8" else False
        self._w8a8: torch.Tensor | None = None  # `_w8a8_weight`, made by `pack_w8a8`

    def dequantize(self) -> torch.Tensor:
        if self._w8a8 is not None:
            return _w8a8_dequantized(self._w8a8).to(self.compute_dtype)
        return (self.qweight.to(self.compute_dtype) * self.scale.unsqueeze(-1)).to(self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads it directly (MLA's absorbed path reads kv_b_proj)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:
            self._kernel = _int8_kernel_ok(x, self.qweight, self.scale)
        if x.dtype != self.compute_dtype:
            return F.linear(x, self.dequantize().to(x.dtype), self.bias)
        shape = x.shape
        if self.fmt == "w8a8":
            y = _w8a8_linear(x.reshape(-1, shape[-1]), self.pack_w8a8())
        else:
            y = _quant_linear(x.reshape(-1, shape[-1]), self.qweight, self.scale, self._kernel)
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def pack_w8a8(self) -> torch.Tensor:
        """The backend's packed copy of this w8a8 weight, made once; the int8 buffer is then freed."""
        if self._w8a8 is None:
            self._w8a8 = _w8a8_weight(self.qweight, self.scale)
            self.qweight = shape_only(self.qweight.shape, torch.int8)  # the backend's copy is the weight now
        return self._w8a8

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}"


class QuantRoutedExperts(RoutedExperts):
    """RoutedExperts with quantized stacked weights: the same dispatch and grouped SwiGLU, its grouped
    GEMM running each used expert on that expert's stored rows (`_quant_linear`)."""

    trainable = False
    q_gate_up: torch.Tensor  # buffers, registered in __init__
    s_gate_up: torch.Tensor
    q_down: torch.Tensor
    s_down: torch.Tensor

    def __init__(self, experts: RoutedExperts, fmt: str) -> None:
        nn.Module.__init__(self)
        self.n_experts = experts.n_experts
        self.hidden_size = experts.hidden_size
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
        self._kernel: bool | None = None if fmt == "int8" else False
        # w8a8: (gate_up, down), each a `_w8a8_weight` per expert, made by `pack_w8a8`
        self._w8a8: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def expert_weights(self, sel: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized (gate_up, down) of all experts, or of those in `sel`: the dense reference (the
        serving path never calls it, see `grouped_mm`)."""
        if self._w8a8 is not None:  # the int8 stacks live in the backend's copies now
            chosen = range(self.n_experts) if sel is None else sel.tolist()
            dt = self.compute_dtype
            return tuple(  # type: ignore[return-value]
                torch.stack([_w8a8_dequantized(stack[e]) for e in chosen]).to(dt) for stack in self._w8a8
            )
        q1, s1, q2, s2 = self.q_gate_up, self.s_gate_up, self.q_down, self.s_down
        if sel is not None:
            q1, s1, q2, s2 = (t.index_select(0, sel) for t in (q1, s1, q2, s2))
        dt = self.compute_dtype
        return q1.to(dt) * s1.unsqueeze(-1), q2.to(dt) * s2.unsqueeze(-1)

    def grouped_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored int8/FP8 stacks themselves: `grouped_mm` widens what it uses."""
        return self.q_gate_up, self.q_down

    def grouped_mm(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Rows grouped by expert [N,K] @ stored weights, b = q_gate_up or q_down transposed [E,K,M]:
        a loop over the experts that have rows (host-side group ends: CPU serving), each one
        `_quant_linear` on that expert's own int8/FP8 rows and scales."""
        q, s = (
            (self.q_gate_up, self.s_gate_up)
            if b.data_ptr() == self.q_gate_up.data_ptr()
            else (self.q_down, self.s_down)
        )
        assert b.shape == q.transpose(-2, -1).shape, "grouped_mm takes this module's own storage"
        if self.fmt == "w8a8":
            which = 0 if q is self.q_gate_up else 1  # told apart before the stacks are replaced
            packed = self.pack_w8a8()[which]
            # the rows scaled once for every expert (each row is quantized on its own anyway)
            xn, amax = _w8a8_rows(a)
            out = each_expert(
                xn, offs, q.shape[1], lambda e, r: torch.ops.quantized.linear_dynamic(r, packed[e], True)
            )
            return out.mul_(amax).to(a.dtype)
        if self._kernel is None:
            self._kernel = _int8_kernel_ok(a, q[0], s[0])
        kernel = self._kernel
        return each_expert(a, offs, q.shape[1], lambda e, rows: _quant_linear(rows, q[e], s[e], kernel))

    def pack_w8a8(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The backend's packed copies of every expert's (gate_up, down), made once; the int8 stacks
        are then freed."""
        if self._w8a8 is None:
            self._w8a8 = tuple(  # type: ignore[assignment]
                [_w8a8_weight(qs[e], ss[e]) for e in range(qs.shape[0])]
                for qs, ss in ((self.q_gate_up, self.s_gate_up), (self.q_down, self.s_down))
            )
            self.q_gate_up, self.q_down = (
                shape_only(t.shape, torch.int8) for t in (self.q_gate_up, self.q_down)
            )
        return self._w8a8  # type: ignore[return-value]


def pack_w8a8(model: nn.Module) -> None:
    """Pack every w8a8 weight for the quantized backend now, one module at a time (each frees its
    int8 copy as it goes), rather than at its first call, where a server's first request would wait
    for all of them. The engine calls this when it is built."""
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantRoutedExperts)) and m.fmt == "w8a8":
            m.pack_w8a8()


def check_quantize_device(fmt: str, device: str | torch.device) -> None:
    """Refuse w8a8 off a CPU, or where this PyTorch lacks its backend, before any weight is quantized
    (`pack_w8a8` would refuse it only after every linear was replaced, or after a whole checkpoint
    streamed onto the GPU) and before a Hub name's download (the commands check their flags with it)."""
    if fmt == "w8a8" and torch.device(device).type != "cpu":
        raise ValueError(
            f"quantize='w8a8' runs on CPUs (PyTorch's quantized CPU backend), not on {device}: "
            "use quantize='int8' or 'fp8' there"
        )
    if fmt == "w8a8" and not w8a8_available():
        raise ValueError(
            "quantize='w8a8' needs a PyTorch built with a quantized CPU backend (fbgemm or qnnpack)"
        )
    if fmt == "fp8" and torch.device(device).type == "mps" and not _holds_fp8(device):
        # (a TypeError at the first weight quantized, "Trying to convert Float8_e4m3fn to the MPS backend")
        raise ValueError(f"quantize='fp8': this PyTorch has no float8 on {device}: use quantize='int8' there")


def _holds_fp8(device: str | torch.device) -> bool:
    """Whether `device` takes float8 tensors (not every PyTorch has them on Apple's GPUs)."""
    try:
        torch.ones(1, device=device).to(torch.float8_e4m3fn).float()
    except (TypeError, RuntimeError):
        return False
    return True


def quantize_model(model: nn.Module, fmt: str, device: str | torch.device | None = None) -> nn.Module:
    """Replace the model's linears (lm_head only for int8 and untied) and routed experts in place.
    `device`: where the weights will run, when the model holds meta placeholders for them (what
    `load_model(quantize=...)` streams into); by default the device of its parameters."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization {fmt!r}; choose one of {FORMATS}")
    # Layers already in 8 bits are not linears any more: quantizing would leave them as they are, and
    # the rest in `fmt`, a mix that `load_model(fp8=True, quantize=...)` refuses.
    held = held_storage(model)
    if held - {fmt}:
        raise ValueError(
            f"quantize={fmt!r}: the model's weights are already stored in {', '.join(sorted(held))}; "
            "two weight storages: load it without quantization and quantize once"
        )
    if device is None:
        first = next(model.parameters(), None)
        device = "cpu" if first is None else first.device
    check_quantize_device(fmt, device)
    config = getattr(model, "config", None)
    quantize_head = fmt != "fp8" and not getattr(config, "tie_word_embeddings", False)
    targets: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full == "lm_head" and not quantize_head:
                continue
            if isinstance(child, (PackedLinear, PackedRoutedExperts)):
                # not an nn.Linear any more: it stayed in full precision, packed experts had no stacks
                raise ValueError(
                    f"quantize={fmt!r}: the model's weights are already packed for serving "
                    "(pack_weights=True, engine/packed.py); quantize it before packing: "
                    f"Engine(model, quantize={fmt!r}, pack_weights=True) does both, in that order"
                )
            if isinstance(child, nn.Linear):
                targets.append((module, child_name, QuantLinear(child, fmt)))
            elif isinstance(child, RoutedExperts) and not isinstance(child, QuantRoutedExperts):
                targets.append((module, child_name, QuantRoutedExperts(child, fmt)))
    for parent, child_name, new in targets:
        setattr(parent, child_name, new)
    return model


def held_storage(model: nn.Module) -> set[str]:
    """The 8-bit weight storages the model's layers are in: the engine's formats (`FORMATS`), and
    "fp8=True" for DeepSeek's 128x128-block FP8 (`FP8Linear`); empty for a model in full precision."""
    return {
        getattr(m, "fmt", "fp8=True")  # FP8Linear: DeepSeek's 128x128-block FP8
        for m in model.modules()
        if isinstance(m, (QuantLinear, QuantRoutedExperts, FP8Linear))
    }


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
