"""Next-token cross-entropy fused with the output head, chunk by chunk.

Why: with a 4k-100k vocabulary the [tokens, vocab] logits are the largest tensor of a training step,
and the plain path writes them, reads them for log-softmax, writes log-probs, and in backward reads
those again and writes a same-size gradient. Here each chunk of rows goes through head matmul →
log-sum-exp → (softmax − one-hot) → both gradient matmuls while it is still in cache, and only the
gradients for the hidden states and the head weight are kept (the Liger-kernel / Apple CCE idea).
The backward pass then only scales them by the incoming gradient. Exact, not an approximation: tests
hold it equal to `F.cross_entropy(hidden @ W.T, targets)` in value and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.perf import compute_dtype

# Rows per chunk: large enough that the matmuls stay efficient, small enough that a chunk of fp32
# logits (rows x vocab) stays near the cache (measured on a 2-core CPU: 256 rows x 4k vocab).
CHUNK_ELEMENTS = 1 << 20


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, want_grads: bool, dtype):
        n, v = hidden.shape[0], weight.shape[0]
        w = weight.to(dtype)
        h_all = hidden.to(dtype)
        valid = targets != ignore_index
        count = valid.sum()
        # 1/count as a tensor: no host sync; a batch with nothing to predict gives NaN, as F.cross_entropy.
        inv = 1.0 / count.to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(h_all) if want_grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads else None
        rows = max(1, CHUNK_ELEMENTS // v)
        for s in range(0, n, rows):
            h = h_all[s : s + rows]
            t = targets[s : s + rows]
            ok = valid[s : s + rows]
            logits = F.linear(h, w).float()
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = t.masked_fill(~ok, 0).unsqueeze(1)  # another negative id fails, as in F.cross_entropy
            picked = logits.gather(1, safe_t).squeeze(1)
            total += torch.where(ok, lse - picked, 0.0).sum()
            if want_grads:
                assert grad_h is not None and grad_w is not None  # allocated above when want_grads
                # d loss / d logits = (softmax - onehot) / count on counted rows, 0 elsewhere (also
                # where nothing is counted, as F.cross_entropy: not 0 * inf, a NaN in every gradient)
                g = logits.sub_(lse.unsqueeze(1)).exp_()
                g.scatter_add_(1, safe_t, torch.full_like(picked, -1.0).unsqueeze(1))
                g.mul_(torch.where(ok, inv, 0.0).unsqueeze(1))
                g = g.to(dtype)
                torch.mm(g, w, out=grad_h[s : s + rows])
                grad_w.addmm_(g.t().float() if dtype != torch.float32 else g.t(), h.float())
        if want_grads:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total * inv

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        dh = (grad_h * grad_out.to(grad_h.dtype)).to(h_dtype)
        dw = (grad_w * grad_out).to(w_dtype)
        return dh, dw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """mean over non-ignored rows of cross_entropy(hidden @ weight.T, targets), never holding all logits.

    hidden [..., H], weight [V, H] (the head, nn.Linear layout), targets [...] of token ids; returns an
    fp32 scalar (NaN when every target is ignored, like `F.cross_entropy`).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    want = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(flat_h, weight, flat_t, ignore_index, want, compute_dtype(hidden))


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each target token, all log-probs): fp32 log-softmax over the vocabulary, gathered.

    logits [..., V], targets [...] of token ids. The full [..., V] log-probs are returned too, for the
    callers that also want the entropy (GRPO) or the top alternatives (the server's prompt logprobs).
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), logp
