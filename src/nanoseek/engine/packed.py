"""Weights in oneDNN's own blocked layout, for serving on a CPU: the same values, read faster.

A decode step on a CPU is bound by reading weights: batch 1 multiplies one row per matrix, and with 16
concurrent sequences each of V2-Lite's 64 routed experts sees about two rows. Handed a plain [out, in]
weight, oneDNN's GEMM streamed it at 12-26 GB/s in bf16 and 9-22 GB/s in fp32 for 1-16 rows on our
2-core test machine; handed the weight once reordered into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's weight freezing does), at 18-38 and
28-43 GB/s (benchmarks/README.md, "Packed bf16 and fp32 weights"). bf16 outputs are the plain GEMM's
bit for bit; fp32 ones are summed in another order (relative error ~1e-6, as any fp32 GEMM). So an engine
that serves a model on a CPU packs its large linears and routed experts once, in place, like
weight-only quantization (engine/quantize.py), and never keeps the plain copy. Not for a model that is
still being trained (GRPO's rollouts): the packed copy would not follow its updates.

Kept plain: matrices under a million weights (`PACK_MIN_ELEMENTS`), MLA's projections
(`MultiHeadLatentAttention.absorbed_weights` reads them as weights to fold, and decode multiplies by the
folded products or by the plain weight itself; packing them measured no faster in bf16), a head tied to the embedding, norms, routers, and quantized or expert-parallel
layers. Routed experts small enough that decode gathers them per step (`RoutedExperts.gathers`, the
speedrun's) keep that path, and their shared expert with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.attention import MultiHeadLatentAttention
from nanoseek.model.moe import MoE, RoutedExperts, each_expert, shape_only
from nanoseek.model.registered import is_plain_linear

PACKED_DTYPES = (torch.bfloat16, torch.float32)
# Weights smaller than this stay plain: they stay in cache between steps, a step over them is bound by
# the number of ops, not bytes, and the packed call cost more there (the speedrun's `tiny`, 256 wide)
PACK_MIN_ELEMENTS = 1 << 20
# The rows oneDNN is told to expect: 16 packed a layout that ran 1-4 rows as fast as a layout for 1
# row did, and 2-4 rows up to 1.6x faster on one thread (decode: 1 to ~16 rows per matrix)
PACK_ROWS = 16


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] (bf16 or fp32, CPU) in oneDNN's blocked layout: an opaque tensor `packed_linear` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), PACK_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ wᵀ (+ bias) for a weight packed by `pack_weight`."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


def packable(model: nn.Module) -> bool:
    """Whether packing applies: a bf16 or fp32 model on a CPU, with a PyTorch whose oneDNN packs that
    dtype and multiplies by the packed weight as by the plain one (checked on a small weight)."""
    try:
        param = next(model.parameters())
    except StopIteration:
        return False
    dtype = param.dtype
    if param.device.type != "cpu" or dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g).to(dtype)
    x = torch.randn(3, 64, generator=g).to(dtype)
    try:
        got, want = packed_linear(x, pack_weight(w)), F.linear(x, w)
    except (RuntimeError, AttributeError):
        return False
    return (
        torch.equal(got, want) if dtype == torch.bfloat16 else torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    )


class PackedLinear(nn.Module):
    """An nn.Linear whose weight lives only in oneDNN's blocked layout (CPU, inference)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias  # Qwen2's q/k/v; None for DeepSeek's linears
        self.dtype = linear.weight.dtype
        self.packed = pack_weight(linear.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The plain weight, unpacked (a copy), for code that reads weights (not the forward)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, packed {self.dtype}"


class PackedRoutedExperts(RoutedExperts):
    """RoutedExperts with each expert's two matrices packed: the same dispatch and grouped SwiGLU,
    its grouped GEMM running each expert that has rows on that expert's packed weights."""

    def __init__(self, experts: RoutedExperts) -> None:
        nn.Module.__init__(self)
        self.n_experts = experts.n_experts
        self.hidden_size = experts.hidden_size
        self.intermediate_size = experts.intermediate_size
        self.packed_gate_up = [pack_weight(w) for w in experts.gate_up_proj]
        self.packed_down = [pack_weight(w) for w in experts.down_proj]
        # What `grouped_weights` hands the grouped SwiGLU: the stacks' shapes, no storage;
        # `grouped_mm` tells the two apart by their one element.
        dtype = experts.down_proj.dtype
        self._gate_up_shape = shape_only(experts.gate_up_proj.shape, dtype)
        self._down_shape = shape_only(experts.down_proj.shape, dtype)

    def expert_weights(self, sel: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpacked (gate_up, down) of all experts or of those in `sel`: the dense reference (the
        serving path never calls it, see `grouped_mm`)."""
        chosen = range(self.n_experts) if sel is None else sel.tolist()
        return (
            torch.stack([self.packed_gate_up[e].to_dense() for e in chosen]),
            torch.stack([self.packed_down[e].to_dense() for e in chosen]),
        )

    def grouped_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self._gate_up_shape, self._down_shape

    def grouped_mm(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Rows grouped by expert [N,K] @ this module's packed matrices (b: one of `grouped_weights`,
        transposed): a loop over the experts that have rows (host-side group ends: CPU serving)."""
        packed = self.packed_gate_up if b.data_ptr() == self._gate_up_shape.data_ptr() else self.packed_down
        return each_expert(a, offs, b.shape[-1], lambda e, rows: packed_linear(rows, packed[e]))


def pack_model(model: nn.Module) -> int:
    """Pack the model's linears and routed experts in place (see the module docstring); returns how
    many modules were packed (0 where `packable` says no)."""
    if not packable(model):
        return 0
    config = getattr(model, "config", None)
    tied = getattr(config, "tie_word_embeddings", False)
    keep: set[int] = set()  # modules whose linears stay plain
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            keep.add(id(module))
        elif isinstance(module, MoE) and module.shared_experts is not None and module.experts.gathers():
            keep.add(id(module.shared_experts))  # decode appends it to the gathered routed stack
    # (parent, name) only, each packed and swapped in before the next: one matrix's plain and packed
    # copies at a time, never a second copy of the model
    targets: list[tuple[nn.Module, str]] = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if is_plain_linear(child):
                assert isinstance(child, nn.Linear)  # torch's or the model's subclass of it
                small = not big_enough(child.weight)
                if small or id(module) in keep or (full == "lm_head" and tied):
                    continue
                targets.append((module, child_name))
            elif type(child) is RoutedExperts and not child.gathers() and big_enough(child.down_proj[0]):
                targets.append((module, child_name))
    for parent, child_name in targets:
        plain: nn.Linear | RoutedExperts = getattr(parent, child_name)
        setattr(
            parent,
            child_name,
            PackedRoutedExperts(plain) if isinstance(plain, RoutedExperts) else PackedLinear(plain),
        )
        del plain
    return len(targets)


def big_enough(w: torch.Tensor) -> bool:
    return w.numel() >= PACK_MIN_ELEMENTS


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, (PackedLinear, PackedRoutedExperts)) for m in model.modules())
