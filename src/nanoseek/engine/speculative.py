"""Self-speculative decoding with the model's own multi-token-prediction module (V3 §2.2, §5.4.3).

What is notable here:
- The draft costs one transformer block: MTP depth 0 combines the main model's final hidden state h_i
  with the embedding of token i+1 and predicts token i+2. Its attention has its own latent cache, kept
  in the same paged storage as an extra layer (checkpoint index num_hidden_layers).
- Verification is one main-model step over [last token, draft]: the logits at the last token decide
  whether the draft stands; if it does, the logits at the draft give one more token for free. Greedy
  requests accept iff the draft is the argmax, so the output equals plain greedy decoding.
- Sampled requests use exact speculative sampling for a deterministic draft q = δ(d): accept d with
  probability p(d), otherwise draw from p with d removed (Leviathan et al. 2023 with q one-hot), so
  the output distribution is the model's own.
"""

from __future__ import annotations

import torch

from nanoseek.engine.sampling import SamplerState, apply_penalties, draw, processed_probs


def verify(
    logits: torch.Tensor, drafts: torch.Tensor, states: list[SamplerState]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decide each row's draft given the main model's logits at the preceding token.

    Returns (accepted [B] bool, token [B]): the token to emit, i.e. the draft when accepted, else the
    model's own choice (greedy argmax, or a draw from the residual distribution).
    """
    logits = apply_penalties(logits.float(), states)
    choice = logits.argmax(dim=-1)
    accepted = choice == drafts
    rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if rows:
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        probs = processed_probs(logits[idx], [states[i].params for i in rows])
        for j, i in enumerate(rows):
            d = int(drafts[i])
            p = probs[j]
            if states[i].rng.random() < float(p[d]):
                accepted[i], choice[i] = True, d
                continue
            accepted[i] = False
            residual = p.clone()
            residual[d] = 0.0
            if float(residual.sum()) <= 0.0:  # p was all on d: the draft is the only possible token
                accepted[i], choice[i] = True, d
                continue
            choice[i] = draw(residual.unsqueeze(0), [states[i]])[0]
    return accepted, choice
