"""Self-speculative decoding with the model's own multi-token-prediction module (V3 §2.2, §5.4.3).

What is notable here:
- The draft costs one transformer block: MTP depth 0 combines the main model's final hidden state h_i
  with the embedding of token i+1 and predicts token i+2. Its attention has its own latent cache, kept
  in the same paged storage as an extra layer (checkpoint index num_hidden_layers).
- Verification is one main-model step over [last token, draft]: the logits at the last token decide
  whether the draft stands; if it does, the logits at the draft give one more token for free. Greedy
  requests accept iff the draft is the argmax, so the output equals plain greedy decoding.
- Sampled requests draw their token from p exactly as plain decoding does (the same uniform from the
  request's own RNG) and the draft stands iff it is that token: accepted with probability p(d), else a
  token of p without d, which is exact speculative sampling for a one-hot draft (Leviathan et al. 2023,
  q = δ(d)). Drawing first, not testing p(d) against a uniform of its own, makes a seeded request's
  tokens those of plain decoding, whatever the drafts (which move with the MTP cache and its neighbours).
"""

from __future__ import annotations

import torch

from nanoseek.engine.sampling import SamplerState, sample


def verify(
    logits: torch.Tensor, drafts: torch.Tensor, states: list[SamplerState]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decide each row's draft given the main model's logits at the preceding token.

    Returns (accepted [B] bool, token [B]): the token to emit, the one plain decoding would pick here
    (greedy argmax, or a draw from the row's RNG), and whether it is the draft.
    """
    choice = sample(logits, states)
    return choice == drafts, choice
