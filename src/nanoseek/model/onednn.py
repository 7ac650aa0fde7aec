"""Weights in oneDNN's blocked layout: how a matrix is packed and multiplied by (CPU inference).

The serving engine packs a model's large weights (engine/packed.py says why and which); MLA packs the
folded matrices of its absorbed path the same way (`MultiHeadLatentAttention.pack_folded`). A packed
weight is an opaque tensor (`is_mkldnn`): `linear` multiplies by either form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The rows oneDNN is told to expect: 16 packed a layout that ran 1-4 rows as fast as a layout for 1
# row did, and 2-4 rows up to 1.6x faster on one thread (decode: 1 to ~16 rows per matrix)
PACK_ROWS = 16


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] (bf16 or fp32, CPU) in oneDNN's blocked layout: an opaque tensor `linear` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), PACK_ROWS)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ wᵀ (+ bias), w plain [out, in] or packed by `pack_weight`."""
    if not w.is_mkldnn:
        return F.linear(x, w, bias)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])
