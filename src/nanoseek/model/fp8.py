"""Fine-grained FP8 (DeepSeek-V3 §3.3): FP8 training GEMMs and FP8 weight storage.

What is notable here:
- Fine-grained scaling (V3 §3.3.2): activations get one scale per 1x128 tile (per token, per 128
  channels), weights one per 128x128 block, so one outlier only coarsens its own tile. E4M3 for every
  tensor, forward and backward (V3 uses no E5M2): the small tiles give it the range it needs.
- Higher-precision accumulation (V3 §3.3.2, "increasing accumulation precision"): a GEMM is cut
  along its contraction dimension into 128-wide chunks; each chunk is one FP8 matmul whose partial
  sums are scaled and added in FP32, the promotion interval N_C = 128 of the report.
- All three GEMMs of a linear layer run on FP8 operands (V3 Figure 6): Fprop y = x·Wᵀ, Dgrad
  dx = dy·W, Wgrad dW = dyᵀ·x. Block-quantized weights are transpose-invariant, so the Fprop
  weight serves Dgrad as is. Wgrad contracts over tokens, so its operands are tiled along tokens
  (128x1 tiles); the activation is cached in FP8 after the forward and re-tiled from 1x128 to 128x1
  in the backward, as the report describes for its cached activations (§3.3.3).
- FP32 master weights and optimizer state: the modules keep their parameters as they were, and
  quantize a copy for each GEMM. `convert_to_fp8_training(model)` swaps the class of nn.Linear layers
  and routed experts in place (same parameters, same state-dict keys): nothing changes at save time,
  and `convert_from_fp8_training` undoes it. The output head, router, embedding, norms and the
  attention core stay in higher precision (V3 §3.3.1).
- One code path for every device: each 128-chunk GEMM is `torch._scaled_mm` with row-wise scales
  (torch 2.13 runs it on CPU, where its 1x128/128x128 block-scaled modes are not implemented).
  Where `_scaled_mm` is unavailable the same GEMM is emulated: the FP8 values dequantized per tile
  into fp32 and multiplied in fp32, equal to the scaled GEMM up to fp32 rounding (exactly, with
  power-of-two scales, but for the summation order).
- Optional power-of-two scales (UE8M0, DeepSeek-V3.1): scales rounded up to 2^k, so scaling is exact.
- FP8 weight storage (`FP8Linear`): float8_e4m3fn `weight` plus `weight_scale_inv` per 128x128
  block, DeepSeek's checkpoint layout; `nanoseek.load_model(dir, fp8=True)` loads DeepSeek's FP8
  checkpoints with those bytes kept as they are.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.registered import Linear, is_plain_linear
from nanoseek.perf import compute_dtype

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
TILE = 128  # V3's tile / block edge and FP32 promotion interval
_MIN_SCALE = 1e-12  # all-zero tiles: any positive scale quantizes them to exact zeros


@dataclass(frozen=True)
class FP8Recipe:
    """How FP8 GEMMs are done. `backend`: "auto" (scaled_mm where it runs, else emulate), "scaled_mm",
    or "emulate"; `pow2_scales`: UE8M0 power-of-two scales as in DeepSeek-V3.1."""

    pow2_scales: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "scaled_mm", "emulate"):
            raise ValueError(f"FP8 backend {self.backend!r} not in auto/scaled_mm/emulate")


# ----------------------------------------------------------- quantization
def _scale_from_amax(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    scale = amax.float().clamp(min=_MIN_SCALE) / FP8_MAX
    if pow2:
        # Round up, so |x| / scale stays <= FP8_MAX.
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    pad = (-x.shape[dim]) % multiple
    if not pad:
        return x
    widths = [0, 0] * (x.dim() - dim - 1) + [0, pad]
    return F.pad(x, widths)


def quantize_tiles(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-1x128-tile quantization along the last dim of x [R, C].

    Returns (q [R, C'] float8_e4m3fn, scale [R, C'/128] fp32) with C' = C rounded up to 128 (zero
    padded) and x ≈ q * scale tile by tile.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_tiles expects [rows, cols], got shape {tuple(x.shape)}")
    xp = _pad_to(x.float(), 1, TILE)
    r, c = xp.shape
    tiles = xp.view(r, c // TILE, TILE)
    scale = _scale_from_amax(tiles.abs().amax(dim=-1), pow2)
    q = (tiles / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(r, c), scale


def quantize_blocks(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-128x128-block quantization of w [N, K] (DeepSeek's `weight_quant`).

    Returns (q [N, K] float8_e4m3fn, scale [ceil(N/128), ceil(K/128)] fp32), w ≈ q * scale per block.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_blocks expects [rows, cols], got shape {tuple(w.shape)}")
    n, k = w.shape
    wp = _pad_to(_pad_to(w.float(), 0, TILE), 1, TILE)
    rb, cb = wp.shape[0] // TILE, wp.shape[1] // TILE
    blocks = wp.view(rb, TILE, cb, TILE)
    scale = _scale_from_amax(blocks.abs().amax(dim=(1, 3)), pow2)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(rb * TILE, cb * TILE)[:n, :k].contiguous(), scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_tiles` (keeps the padded width)."""
    r, c = q.shape
    return (q.float().view(r, c // TILE, TILE) * scale.unsqueeze(-1)).view(r, c)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_blocks`: W = q · s per block (DeepSeek's `weight_dequant`), fp32; also
    how DeepSeek's FP8 checkpoint files are read."""
    n, k = q.shape
    s = scale.float().repeat_interleave(TILE, 0)[:n].repeat_interleave(TILE, 1)[:, :k]
    return q.float() * s


def _block_scale_rows(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """[ceil(N/128), K/128] block scales -> the same scale for every row: [N, K/128]."""
    return scale.repeat_interleave(TILE, dim=0)[:rows]


# ------------------------------------------------------------------- GEMM
@functools.cache
def _scaled_mm_works(device_type: str) -> bool:
    """Whether row-wise `torch._scaled_mm` runs on this device type (probed once)."""
    try:
        a = torch.ones(16, TILE, device=device_type).to(FP8_DTYPE)
        b = torch.ones(16, TILE, device=device_type).to(FP8_DTYPE)
        out = torch._scaled_mm(
            a,
            b.t(),
            scale_a=torch.ones(16, 1, device=device_type),
            scale_b=torch.ones(1, 16, device=device_type),
            out_dtype=torch.float32,
        )
        return bool(torch.allclose(out, torch.full_like(out, TILE)))
    except (RuntimeError, ValueError, NotImplementedError, TypeError):
        return False


def resolve_backend(recipe: FP8Recipe, device: torch.device) -> str:
    if recipe.backend == "auto":
        return "scaled_mm" if _scaled_mm_works(device.type) else "emulate"
    if recipe.backend == "scaled_mm" and not _scaled_mm_works(device.type):
        raise RuntimeError(f"torch._scaled_mm with row-wise scales does not run on {device.type}")
    return recipe.backend


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    backend: str = "scaled_mm",
) -> torch.Tensor:
    """C = A·Bᵀ in fp32 from FP8 operands tiled along the contraction dim K.

    a [M, K] with a_scale [M, K/128] (1x128 tiles); b [N, K] with b_scale either [N, K/128] (1x128
    tiles) or [ceil(N/128), K/128] (128x128 blocks). K must be a multiple of 128 (quantizers pad).
    Each 128-wide chunk of K is one FP8 GEMM; its partial sums are scaled and accumulated in fp32.
    """
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k or k % TILE:
        raise ValueError(
            f"fp8_gemm: shapes {tuple(a.shape)} x {tuple(b.shape)}ᵀ need equal K, a multiple of 128"
        )
    sb = b_scale if b_scale.shape[0] == n else _block_scale_rows(b_scale, n)
    with torch.autocast(a.device.type, enabled=False):  # the accumulation stays fp32 under autocast
        return _fp8_gemm(a, a_scale, b, sb, backend)


def _fp8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, backend: str
) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    if backend == "emulate" or not m:  # no rows (a backward through 0 tokens): _scaled_mm refuses them
        a32 = dequantize_tiles(a, a_scale)
        b32 = dequantize_tiles(b, sb)
        return a32 @ b32.t()
    # cuBLASLt (CUDA's _scaled_mm) takes a row-major A and a column-major Bᵀ only: Wgrad's operands come
    # from transposed views (dyᵀ, xᵀ), so both are laid out row-major once here, not per chunk
    a, b = a.contiguous(), b.contiguous()
    # CUDA's _scaled_mm needs both dims of mat2 (here 128 x N) divisible by 16 (the CPU kernel does not
    # check): N = out_features (Fprop) or in_features (Dgrad, Wgrad). Zero rows, sliced off after.
    pad = (-n) % 16
    if pad:
        b = torch.cat((b, torch.zeros(pad, k, dtype=b.dtype, device=b.device)))
        sb = torch.cat((sb, torch.ones(pad, sb.shape[1], dtype=sb.dtype, device=sb.device)))
    out = torch.zeros(m, n + pad, dtype=torch.float32, device=a.device)
    for j in range(k // TILE):
        chunk = slice(j * TILE, (j + 1) * TILE)
        out += torch._scaled_mm(
            a[:, chunk],
            b[:, chunk].t(),
            scale_a=a_scale[:, j : j + 1].contiguous(),
            scale_b=sb[:, j].reshape(1, n + pad).contiguous(),
            out_dtype=torch.float32,
        )
    return out[:, :n].contiguous() if pad else out


# --------------------------------------------------------------- autograd
class _FP8LinearFunction(torch.autograd.Function):
    """y = x·Wᵀ with Fprop, Dgrad and Wgrad on FP8 operands (V3 Figure 6)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
        shape = x.shape
        n, k = weight.shape
        x2 = x.reshape(-1, k)
        backend = resolve_backend(recipe, x.device)
        xq, xs = quantize_tiles(x2, recipe.pow2_scales)
        wq, ws = quantize_blocks(weight, recipe.pow2_scales)
        wq = _pad_to(wq, 1, TILE)
        y = fp8_gemm(xq, xs, wq, ws, backend)
        # The activation is cached in FP8 (V3 §3.3.3): memory of one byte per element plus scales.
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.meta = (shape, x.dtype, weight.dtype, backend, recipe.pow2_scales, n, k)
        return y.to(compute_dtype(x)).view(*shape[:-1], n)

    @staticmethod
    def backward(  # type: ignore[override]  # torch's stub: (ctx, *grad_outputs); one output here
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        xq, xs, wq, ws = ctx.saved_tensors
        shape, x_dtype, w_dtype, backend, pow2, n, k = ctx.meta
        dy = grad_out.reshape(-1, n)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # Dgrad: dx = dy·W, contraction over N. dy in 1x128 tiles along N; Wᵀ reuses W's blocks.
            dyq, dys = quantize_tiles(dy, pow2)
            wt = _pad_to(wq[:, :k].t(), 1, TILE).contiguous()
            dx = fp8_gemm(dyq, dys, wt, ws.t().contiguous(), backend)
            dx = dx.to(x_dtype).view(shape)
        if ctx.needs_input_grad[1]:
            # Wgrad: dW = dyᵀ·x, contraction over tokens: both operands tiled along tokens (128x1
            # tiles of dy and x); x is re-tiled from its cached 1x128 FP8 form.
            x32 = dequantize_tiles(xq, xs)[:, :k]
            dytq, dyts = quantize_tiles(dy.t(), pow2)
            xtq, xts = quantize_tiles(x32.t(), pow2)
            dw = fp8_gemm(dytq, dyts, xtq, xts, backend).to(w_dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe | None = None) -> torch.Tensor:
    """F.linear(x, weight) (no bias) with all three GEMMs in fine-grained FP8."""
    return _FP8LinearFunction.apply(x, weight, recipe or FP8Recipe())


# ------------------------------------------------------ training conversion
class FP8TrainingLinear(nn.Linear):
    """An nn.Linear whose GEMMs run in FP8; parameters (FP32 masters) and state-dict are unchanged."""

    fp8_recipe: FP8Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.fp8_recipe)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


def _fp8_rounded_tiles(x: torch.Tensor, pow2: bool) -> torch.Tensor:
    """x [R, C] as the FP8 GEMM sees it: quantized per 1x128 tile along C, dequantized to fp32."""
    return dequantize_tiles(*quantize_tiles(x, pow2))[:, : x.shape[1]]


def _fp8_rounded_blocks(w: torch.Tensor, pow2: bool) -> torch.Tensor:
    """Stacked weights w [E, K, M] quantized per 128x128 block of each expert's own slice (as
    DeepSeek's per-expert checkpoint tensors are), dequantized to fp32."""
    e, k, m = w.shape
    wp = _pad_to(_pad_to(w.float(), 1, TILE), 2, TILE)
    blocks = wp.view(e, wp.shape[1] // TILE, TILE, wp.shape[2] // TILE, TILE)
    scale = _scale_from_amax(blocks.abs().amax(dim=(2, 4), keepdim=True), pow2)
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.float() * scale).view_as(wp)[:, :k, :m]


def fp8_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """The routed experts' grouped GEMM (`moe._grouped_mm`'s two forms) on fine-grained FP8 operands.

    a [N,K] @ b [E,K,M] (Fprop, Dgrad): rows in 1x128 tiles along K, each expert's weight in 128x128
    blocks. a [K,N] @ b [N,M] -> [E,K,M] (Wgrad, contraction over tokens): both in tiles along the
    tokens (a tile may span two experts' rows: one scale for both, never a wider range than E4M3).
    The FP8 values are multiplied in fp32 (the "emulate" backend of `fp8_gemm`: equal to the scaled
    GEMM up to fp32 rounding), so all experts stay one grouped GEMM. On a GPU, fp32 is not what
    `torch._grouped_mm`'s fast kernel takes (bf16 on sm90/sm100): it loops over the experts with the
    group ends read on the host, so FP8 experts train slower than bf16 ones there (unmeasured).
    """
    from nanoseek.model.moe import _grouped_mm

    with torch.autocast(a.device.type, enabled=False):
        a8 = _fp8_rounded_tiles(a, pow2)
        b8 = _fp8_rounded_blocks(b, pow2) if b.dim() == 3 else _fp8_rounded_tiles(b.t(), pow2).t()
        return _grouped_mm(a8.contiguous(), b8.contiguous(), offs).to(a.dtype)


def _fp8_routed_experts_class() -> type[nn.Module]:
    from nanoseek.model.moe import RoutedExperts

    class FP8RoutedExperts(RoutedExperts):
        """Routed experts whose grouped GEMMs (forward and backward) run on FP8 operands."""

        fp8_recipe: FP8Recipe

        def grouped_mm(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
            return fp8_grouped_mm(a, b, offs, self.fp8_recipe.pow2_scales)

    return FP8RoutedExperts


_FP8_EXPERTS: type[nn.Module] | None = None


def _experts_class() -> type[nn.Module]:
    global _FP8_EXPERTS
    if _FP8_EXPERTS is None:
        _FP8_EXPERTS = _fp8_routed_experts_class()
    return _FP8_EXPERTS


DEFAULT_SKIP = ("lm_head",)


def convert_to_fp8_training(
    model: nn.Module,
    recipe: FP8Recipe | None = None,
    skip: tuple[str, ...] = DEFAULT_SKIP,
    experts: bool = True,
) -> int:
    """Run the GEMMs of `model`'s linear layers (and routed experts) in fine-grained FP8, in place.

    Modules keep their parameters and names (the optimizer, checkpoints and `state_dict` see no
    difference); only the class changes. Modules whose qualified name ends with an entry of `skip`
    stay as they are (the output head by default, as in V3). Returns the number of modules converted.
    """
    from nanoseek.model.moe import RoutedExperts

    recipe = recipe or FP8Recipe()
    converted = 0
    for name, module in model.named_modules():
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        if is_plain_linear(module) or isinstance(module, FP8TrainingLinear):
            module.__class__ = FP8TrainingLinear
        elif experts and (type(module) is RoutedExperts or isinstance(module, _experts_class())):
            module.__class__ = _experts_class()
        else:
            continue
        module.fp8_recipe = recipe
        converted += 1
    return converted


def convert_from_fp8_training(model: nn.Module) -> int:
    """Undo `convert_to_fp8_training`. Returns the number of modules restored."""
    from nanoseek.model.moe import RoutedExperts

    restored = 0
    for module in model.modules():
        original: type[nn.Module]
        if isinstance(module, FP8TrainingLinear):
            original = Linear
        elif _FP8_EXPERTS is not None and isinstance(module, _FP8_EXPERTS):
            original = RoutedExperts
        else:
            continue
        module.__class__ = original
        del module.fp8_recipe
        restored += 1
    return restored


def is_fp8_training(model: nn.Module) -> bool:
    return any(hasattr(m, "fp8_recipe") for m in model.modules())


# --------------------------------------------------------- weight storage
class FP8Linear(nn.Module):
    """A linear layer whose weight is stored in FP8 (float8_e4m3fn + `weight_scale_inv` per 128x128
    block: DeepSeek's checkpoint layout and key names). For inference; no gradients.

    `act_quant=True` quantizes the input per 1x128 tile and runs the FP8 GEMM (DeepSeek's
    `fp8_gemm`); False dequantizes the weight per call and multiplies in the input's dtype. `pow2`:
    the input's tile scales are powers of two (UE8M0), as DeepSeek-V3.1's `act_quant(x, scale_fmt=
    "ue8m0")` makes them for a checkpoint whose weight scales are.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        act_quant: bool = False,
        device: Any = None,
        pow2: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_quant, self.pow2 = act_quant, pow2
        blocks = (math.ceil(out_features / TILE), math.ceil(in_features / TILE))
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        self.weight_scale_inv = nn.Parameter(
            torch.ones(blocks, dtype=torch.float32, device=device), requires_grad=False
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_quant: bool = False, pow2: bool = False) -> FP8Linear:
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias (DeepSeek's linear layers have none)")
        m = cls(linear.in_features, linear.out_features, act_quant, device=linear.weight.device, pow2=pow2)
        m.load_fp8(*quantize_blocks(linear.weight.detach(), pow2))
        return m

    @torch.no_grad()
    def load_fp8(self, weight: torch.Tensor, scale_inv: torch.Tensor) -> None:
        """Take an FP8 weight and its block scales as they are (e.g. from DeepSeek's checkpoint)."""
        if weight.dtype != FP8_DTYPE:
            raise ValueError(f"FP8Linear expects a float8_e4m3fn weight, got {weight.dtype}")
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"weight shape {tuple(weight.shape)} != {tuple(self.weight.shape)}")
        if tuple(scale_inv.shape) != tuple(self.weight_scale_inv.shape):
            raise ValueError(
                f"weight_scale_inv shape {tuple(scale_inv.shape)} != {tuple(self.weight_scale_inv.shape)} "
                f"(one scale per {TILE}x{TILE} block)"
            )
        self.weight.copy_(weight)
        self.weight_scale_inv.copy_(scale_inv.float())

    def dequantize(self) -> torch.Tensor:
        return dequantize_blocks(self.weight, self.weight_scale_inv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_quant:
            return F.linear(x, self.dequantize().to(x.dtype))
        shape = x.shape
        xq, xs = quantize_tiles(x.reshape(-1, self.in_features), self.pow2)
        wq = _pad_to(self.weight, 1, TILE)
        backend = resolve_backend(FP8Recipe(), x.device)
        y = fp8_gemm(xq, xs, wq, self.weight_scale_inv, backend)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3 128x128 blocks"


def quantize_linears_fp8(
    model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP, act_quant: bool = False, pow2: bool = False
) -> int:
    """Replace bias-free nn.Linear layers (not in `skip`) by FP8Linear storage, in place. Returns count.
    `pow2`: UE8M0 (power-of-two) scales, the weights' and, with `act_quant`, the inputs'.

    On a model built on the meta device this only allocates the FP8 tensors, ready for `load_fp8`.
    """
    targets: list[str] = []
    for name, module in model.named_modules():
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        if isinstance(module, nn.Linear) and module.bias is None:
            targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if linear.weight.device.type == "meta":
            new = FP8Linear(linear.in_features, linear.out_features, act_quant, device="meta", pow2=pow2)
        else:
            new = FP8Linear.from_linear(linear, act_quant, pow2)
        setattr(parent, child, new)
    return len(targets)


# ------------------------------------------------- DeepSeek FP8 checkpoints
_HIGH_PRECISION_KEYS = ("embed_tokens.", "lm_head.", "shared_head.head.", ".mlp.gate.weight")
# config.json's entry for this layout, as DeepSeek-V3 ships it (transformers reads it as FineGrainedFP8Config)
QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [TILE, TILE],
}


def ue8m0_scales(quantization_config: dict[str, Any] | None) -> bool:
    """Whether a checkpoint's quantization_config asks for power-of-two block scales (UE8M0,
    `"scale_fmt": "ue8m0"`, as DeepSeek-V3.1 ships it): what `quantize_blocks(pow2=True)` writes."""
    return (quantization_config or {}).get("scale_fmt") == "ue8m0"


def quantize_state_dict_fp8(tensors: dict[str, torch.Tensor], pow2: bool = False) -> dict[str, torch.Tensor]:
    """HF-layout tensors -> DeepSeek's FP8 layout: every 2-D linear weight (attention projections,
    MLPs, experts, eh_proj) becomes float8_e4m3fn plus `*.weight_scale_inv` per 128x128 block; the
    embedding, head, router and norms are left as they are, as in DeepSeek-V3's published checkpoint.
    Weights already in FP8 (with their scales beside them) are kept as they are."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        kept = any(part in key for part in _HIGH_PRECISION_KEYS) or value.dtype == FP8_DTYPE
        if key.endswith(".weight") and value.dim() == 2 and value.is_floating_point() and not kept:
            q, s = quantize_blocks(value, pow2)
            out[key] = q
            out[key.removesuffix(".weight") + ".weight_scale_inv"] = s
        else:
            out[key] = value
    return out
