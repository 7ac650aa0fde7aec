"""The one sampler: every caller (engine, server, GRPO rollouts, eval) turns logits into tokens here.

What is notable here:
- Batched over rows with per-row parameters: penalties, temperature, top-k, top-p and min-p are tensor
  ops over the whole batch; only the uniform draw is per row (one float from the request's own RNG).
- Per-request seed: each request owns a `random.Random`; a token is drawn by inverse CDF over the
  processed distribution, so a seeded request gives the same tokens whatever else shares its batch,
  given the same logits: fp32 ones are; bf16 kernels sum in an order that moves with the batch (about
  0.02 in a logit), so a bf16 model's seeded sample can change with its neighbours, as vLLM's does
  unless it runs batch-invariant kernels.
- Penalties follow vLLM / OpenAI: repetition (divide positive logits, multiply negative ones) over
  prompt + output tokens; presence / frequency (subtract) over output tokens only; `logit_bias` (added
  to the chosen tokens' logits, OpenAI's -100..100) after them, greedy rows included.
- Reported log-probabilities are those of the raw model distribution (log_softmax of the logits,
  before penalties and temperature), as vLLM reports them by default.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import random
from collections.abc import Collection
from dataclasses import dataclass

import torch

from nanoseek.options import option

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily


def refuse_identical_samples(temperature: float, samples: int, samples_flag: str, per: str) -> None:
    """Refuse several samples of one prompt at a temperature the engine decodes greedily: they would be
    one answer drawn `samples` times (vLLM refused n > 1 with greedy sampling). `samples_flag` is the
    caller's flag for the count (`-k`, `--num-samples`); `per` what one prompt is called there."""
    if samples > 1 and temperature < GREEDY_BELOW:
        raise ValueError(
            f"--temperature {temperature:g} decodes greedily: the {samples_flag} {samples} samples of {per} "
            f"would all be the same one; pass {samples_flag} 1, or a --temperature of {GREEDY_BELOW:g} or more"
        )


@dataclass
class SamplingParams:
    """How to pick tokens for one request. Defaults are greedy with no stop other than EOS."""

    max_new_tokens: int = option(128, "tokens to generate at most")
    temperature: float = option(0.0, "0 = greedy")
    top_p: float = option(1.0, "nucleus sampling mass")
    top_k: int = option(0, "sample among the k most likely tokens (0 = off)")
    min_p: float = option(0.0, "drop tokens below min_p x the top probability")
    repetition_penalty: float = option(1.0)
    presence_penalty: float = option(0.0)
    frequency_penalty: float = option(0.0)
    seed: int | None = option(None, "sampling seed (same seed, same output)")
    stop_token_ids: list[int] = option(factory=list, cli=False)
    # None = off, 0 = chosen token only, k = also the top-k alternatives
    logprobs: int | None = option(None, cli=False)
    prompt_logprobs: bool = option(False, cli=False)  # log p of each prompt token given its prefix
    ignore_eos: bool = option(False, cli=False)  # keep going past the model's EOS token (benchmarks)
    logit_bias: dict[int, float] = option(factory=dict, cli=False)  # token id -> added to its logit
    # Not sampling, but per request like the rest: prefix-cache isolation (vLLM's `cache_salt`). Cached
    # blocks are shared only between requests of the same salt, so a tenant's prompts cannot be probed
    # by another's (a prefix hit shows in the time to first token).
    cache_salt: str | None = option(None, cli=False)

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid SamplingParams: {msg}")

        # the types first: a string from a form or a config file failed in a comparison below with a bare
        # TypeError, and a float max_new_tokens (2.5) generated its ceiling without a word
        need(
            _is_token_id(self.max_new_tokens),
            f"max_new_tokens must be an int, got {self.max_new_tokens!r:.60}",
        )
        need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in NUMBERS:
            value = getattr(self, name)
            need(_is_real(value), f"{name} must be a number, got {value!r:.60}")
        need(
            self.seed is None or _is_token_id(self.seed),
            f"seed must be None or an int, got {self.seed!r:.60}",
        )
        # finite too: logits / inf are all 0, a uniform draw over the whole vocabulary, not a sampling
        need(
            0.0 <= self.temperature < math.inf, f"temperature must be >= 0 and finite, got {self.temperature}"
        )
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        # an int: a float one (generation_config.json's 20.0, the Python API's) failed every sampled step
        # with "gather(): Expected dtype int32/int64 for index"
        need(
            _is_token_id(self.top_k) and self.top_k >= 0,
            f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}",
        )
        need(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        # the logits are fp32: a penalty that rounds to 0 or inf there divides them into inf, then NaN
        rep = torch.tensor(self.repetition_penalty, dtype=torch.float32)
        need(
            bool(0.0 < rep < math.inf),
            f"repetition_penalty must be > 0 and within float32's range, got {self.repetition_penalty}",
        )
        # OpenAI's and vLLM's range; NaN or inf made every logit NaN (greedy then picked token 0)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(-2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}")
        need(
            self.logprobs is None or (_is_token_id(self.logprobs) and self.logprobs >= 0),
            f"logprobs must be None or an int >= 0, got {self.logprobs!r}",
        )
        stops = self.stop_token_ids
        need(
            isinstance(stops, Collection)
            and not isinstance(stops, str | bytes)
            and all(map(_is_token_id, stops)),
            f"stop_token_ids must be a list of token ids, got {stops!r:.60}",
        )
        keys = [k for k in self.logit_bias if not _is_token_id(k)]
        need(not keys, f"logit_bias keys must be int token ids, got {keys[:1]}")
        # numbers first: a string value failed the comparison below with a bare TypeError
        bad = [v for v in self.logit_bias.values() if not _is_real(v) or not -100.0 <= v <= 100.0]
        need(not bad, f"logit_bias values must be in [-100, 100], got {bad[:1]}")
        salt = self.cache_salt
        need(
            salt is None or (isinstance(salt, str) and salt != ""),
            f"cache_salt must be None or a non-empty string, got {salt!r:.60}",
        )

    @property
    def greedy(self) -> bool:
        # vLLM's _SAMPLING_EPS: below it, logits / T overflows fp32 (softmax NaN) long before the
        # distribution differs from argmax's
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or bool(self.logit_bias)
        )


NUMBERS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _is_real(value: object) -> bool:
    """A real number of any kind (Python's, numpy's, a Fraction), not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_token_id(value: object) -> bool:
    """An integer of any kind (Python's, numpy's, a 0-d tensor's), not a bool, float or string."""
    return hasattr(value, "__index__") and not isinstance(value, bool)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class SamplerState:
    """What the sampler keeps per request: its RNG and, when penalties are on, token statistics."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int) -> None:
        # Python's own numbers, once: of the reals and integers `validate` accepts, a numpy or 0-d tensor
        # seed is none random.Random takes, a numpy float64 penalty made a step's tensors float64 (refused
        # as it wrote them back) and a Fraction made none: the step failed, every row sampled in it
        params = dataclasses.replace(
            params,
            # (mypy checks an unpacked dict's values against every field, not only the ones it names)
            **{name: float(getattr(params, name)) for name in NUMBERS},  # type: ignore[arg-type]
            seed=None if params.seed is None else operator.index(params.seed),
            logit_bias={operator.index(k): float(v) for k, v in params.logit_bias.items()},
        )
        self.params = params
        # a set: the engine looks each generated token up (a request may name every id of the vocabulary)
        self.stop_ids = frozenset(operator.index(t) for t in params.stop_token_ids)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        # Random seeds with |seed|, so -s replayed s's stream (seed -1 with n = 3: choices 0 and 2 alike);
        # a negative seed takes its unsigned 64-bit two's complement, as torch.Generator.manual_seed does
        # within vLLM's int64 seed range, so each int64 seed is its own stream
        self.rng = random.Random(seed % 2**64 if seed < 0 else seed)
        self.output_counts: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        if params.has_penalties:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.float32)
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool)
            self.prompt_mask[torch.tensor(prompt_ids, dtype=torch.long)] = True
            self.bias = torch.zeros(vocab_size, dtype=torch.float32)
            for token_id, value in params.logit_bias.items():
                if not 0 <= token_id < vocab_size:
                    raise ValueError(
                        f"logit_bias names token {token_id}, outside the vocabulary [0, {vocab_size})"
                    )
                self.bias[token_id] = value

    def observe(self, token_id: int) -> None:
        if self.output_counts is not None:
            self.output_counts[token_id] += 1


def apply_penalties(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Repetition / presence / frequency penalties and logit biases for the rows that ask. logits [B,V] fp32."""
    rows = [i for i, s in enumerate(states) if s.output_counts is not None]
    if not rows:
        return logits
    logits = logits.clone()
    idx = torch.tensor(rows, dtype=torch.long)
    counts = torch.stack([states[i].output_counts for i in rows]).to(logits.device)  # type: ignore[misc]
    seen = torch.stack([states[i].prompt_mask for i in rows]).to(logits.device) | (counts > 0)  # type: ignore[misc]
    rep = torch.tensor([states[i].params.repetition_penalty for i in rows], device=logits.device).unsqueeze(1)
    pres = torch.tensor([states[i].params.presence_penalty for i in rows], device=logits.device).unsqueeze(1)
    freq = torch.tensor([states[i].params.frequency_penalty for i in rows], device=logits.device).unsqueeze(1)
    sub = logits[idx]
    penalized = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalized, sub)
    sub = sub - freq * counts - pres * (counts > 0).float()
    sub = sub + torch.stack([states[i].bias for i in rows]).to(logits.device)  # type: ignore[misc]
    logits[idx] = sub
    return logits


# Top-k / top-p rank only the head of each row: with R1's T = 0.6 and top-p 0.95 a trained model's
# kept set is a handful of tokens, and a top-k of this many costs a fraction of sorting the vocabulary.
# Rows whose kept set might reach past it fall back to the full sort.
SORT_HEAD = 32


def _top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, head: int = SORT_HEAD
) -> torch.Tensor:
    """logits [B,V] with the tokens outside each row's top-k and top-p set to -inf."""
    v = logits.shape[-1]
    head = min(v, head)
    within = top_k <= head  # the row's top-k lies in the head: its normalizer too
    if head < v and not bool((within | (top_k >= v)).all()):
        return _top_k_top_p(logits, top_k, top_p, head=v)
    if head == v:
        within = torch.ones_like(within)
    ranked, order = _ranked(logits, head)
    rank = torch.arange(head, device=logits.device).unsqueeze(0)
    # Tokens tied with the k-th stay, as transformers' TopKLogitsWarper and vLLM keep them (they drop
    # logits `< kth`): bf16 logits tie often, and topk alone would keep one by its index
    kth = ranked.gather(1, (top_k.clamp(max=head) - 1).unsqueeze(1))
    # The tie may go on past the head only where the head's last logit ties the k-th: counted over the
    # vocabulary for those rows alone (a pass per step for every row cost the top-p-only rows R1 samples)
    tied = (top_k < v) & (ranked[:, -1:] >= kth).squeeze(1)
    if head < v and bool(tied.any()) and bool((tied & ((logits >= kth).sum(dim=-1) > head)).any()):
        return _top_k_top_p(logits, top_k, top_p, head=v)
    remove = (rank >= top_k.unsqueeze(1)) & (ranked < kth)
    masked = ranked.masked_fill(remove, float("-inf"))
    norm = torch.where(within, masked.logsumexp(dim=-1), logits.logsumexp(dim=-1)).unsqueeze(1)
    probs = (masked - norm).exp()
    # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
    mass = probs.cumsum(dim=-1)
    untouched = (top_k >= v) & (top_p >= 1.0)  # rows batched with others that filter: keep them whole
    # (top_p = 1 keeps every token: the tail's mass can round up to 1 before the vocabulary ends)
    remove |= ((mass - probs) >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    remove[:, 0] = False
    # A top-p cut through tokens tied with the head's last logit keeps the lowest ids of the vocabulary's
    # ties, which the head may not hold: counted over the vocabulary for those rows alone
    last = ranked.gather(1, (~remove).sum(dim=-1, keepdim=True) - 1)
    split = (top_p < 1.0) & (last == ranked[:, -1:]).squeeze(1)
    if head < v:
        # one read of the device for both checks (a read each was one host sync more per sampled step)
        past = ~(within | (mass[:, -1] >= top_p) | untouched)  # a row's kept set may reach past the head
        reaches, cut = torch.stack([past.any(), split.any()]).tolist()
        if reaches or (cut and bool((split & ((logits >= last).sum(dim=-1) > head)).any())):
            return _top_k_top_p(logits, top_k, top_p, head=v)
    kept = torch.full_like(logits, float("-inf")).scatter(1, order, ranked.masked_fill(remove, float("-inf")))
    return torch.where(untouched.unsqueeze(1), logits, kept)


def _ranked(logits: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `head` largest logits of each row and their token ids, descending, tied ones lowest id first.

    A top-p cut through tied tokens keeps the first of them: topk orders ties as its algorithm goes (the
    head's topk and the vocabulary's disagree), so which tied token a seeded request drew changed with a
    batch mate that sent its rows to the full sort, and a top-p near 0 drew another token than greedy's
    first maximum."""
    if head == logits.shape[-1]:
        return logits.sort(dim=-1, descending=True, stable=True)
    ranked, order = logits.topk(head, dim=-1)
    order, by_id = order.sort(dim=-1)
    ranked, by_value = ranked.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    return ranked, order.gather(1, by_value)


def processed_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p for sampled rows (temperature > 0). logits [B,V] -> probs [B,V].
    `params`: the rows' `SamplerState.params` (Python's own numbers)."""
    device = logits.device
    temp = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    # a near-0 repetition penalty (a float32 subnormal passes `validate`) or a small temperature over large
    # logits overflows to +inf, whose softmax is NaN (the last token id drawn at every step): the largest
    # float keeps those tokens the only likely ones, tied
    logits = (logits / temp).clamp(max=torch.finfo(logits.dtype).max)
    v = logits.shape[-1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < v else v for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    need_sort = bool((top_k < v).any()) or bool((top_p < 1.0).any())
    if need_sort:
        logits = _top_k_top_p(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)
    asks = min_p > 0
    if bool(asks.any()):
        keep = probs >= min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        kept = probs * keep
        # renormalised in the rows that ask only: the others' probabilities moved by a rounding with a batch
        # mate's min_p, and a seeded draw with them
        probs = torch.where(asks.unsqueeze(1), kept / kept.sum(dim=-1, keepdim=True), probs)
    return probs


def draw(probs: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """One token per row by inverse CDF with the row's own uniform draw: batch-independent."""
    if probs.device.type == "mps":
        # Apple's GPUs have no float64 (a TypeError at the first sampled token of every `--device mps`
        # generate, chat, serve or eval): those rows are drawn on the CPU, as the same seed draws there
        return draw(probs.cpu(), states).to(probs.device)
    u = torch.tensor([s.rng.random() for s in states], dtype=torch.float64, device=probs.device)
    cdf = probs.double().cumsum(dim=-1)
    u = u * cdf[:, -1]
    idx = torch.searchsorted(cdf, u.unsqueeze(1)).squeeze(1)
    # Never land on a zero-probability token through rounding at the edges.
    idx = idx.clamp_(max=probs.shape[-1] - 1)
    bad = probs.gather(1, idx.unsqueeze(1)).squeeze(1) <= 0
    if bool(bad.any()):
        idx = torch.where(bad, probs.argmax(dim=-1), idx)
    return idx


def sample(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Pick one token per row of logits [B,V] under each row's SamplingParams. Returns [B] long."""
    logits = apply_penalties(logits.float(), states)
    out = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if rows:
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        probs = processed_probs(logits[idx], [states[i].params for i in rows])
        out[idx] = draw(probs, [states[i] for i in rows])
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: list[int]) -> list[TokenLogprob]:
    """Raw-model log-probabilities of the chosen tokens, with top-k alternatives per row."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    k = max(top) if top else 0
    if k > 0:
        vals, ids = logp.topk(k, dim=-1)
        vals_l, ids_l = vals.tolist(), ids.tolist()
    out = []
    for i, t in enumerate(tokens.tolist()):
        alts = (
            list(zip(ids_l[i][: top[i]], vals_l[i][: top[i]], strict=False)) if k > 0 and top[i] > 0 else []
        )
        out.append(TokenLogprob(token_id=t, logprob=chosen[i], top=alts))
    return out


# the sampling fields of a checkpoint's generation_config.json that nanoseek reads (`generation_defaults`)
GENERATION_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# ... and its max_new_tokens, the length of a generation that does not ask for one: vLLM's server reads it
# so (a request's max_tokens), as transformers' generate does. HF's max_length (prompt included) is not
# read, as vLLM does not read it.
GENERATION_DEFAULT_FIELDS = (*GENERATION_SAMPLING_FIELDS, "max_new_tokens")


def generation_defaults(cfg: dict, source: object = "generation_config.json") -> dict[str, float]:
    """Sampling fields and max_new_tokens of the checkpoint's generation_config.json (`source`, read with
    its tokenizer) that requests may leave out; one out of range (a hand edit: top_p 5, temperature -1)
    is refused here, where it failed every request that left the field out as that request's own error."""
    # `do_sample: false` is greedy whatever else the file names, but still as long as it says
    length = {"max_new_tokens": cfg["max_new_tokens"]} if _is_token_id(cfg.get("max_new_tokens")) else {}
    if not cfg.get("do_sample", True):
        defaults: dict[str, float] = {"temperature": 0.0, **length}
    else:
        defaults = {
            k: cfg[k]
            for k in GENERATION_SAMPLING_FIELDS
            if isinstance(cfg.get(k), int | float) and not isinstance(cfg.get(k), bool)
        }
        if isinstance(defaults.get("top_k"), float) and defaults["top_k"].is_integer():
            defaults["top_k"] = int(defaults["top_k"])  # JSON's 20.0 is top_k 20, as vLLM reads it
        defaults.update(length)
    check_sampling_defaults(defaults, source)
    return defaults


def check_sampling_defaults(defaults: dict[str, float], source: object) -> None:
    """Refuse, naming `source`, defaults with a field no request has or a value out of range: checked once
    where they are read or built, not as the 400 of every request that left the field out."""
    unknown = sorted(set(defaults) - set(GENERATION_DEFAULT_FIELDS))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; known: {GENERATION_DEFAULT_FIELDS}")
    try:
        SamplingParams(**defaults).validate()  # type: ignore[arg-type]  # (as in SamplerState)
    except ValueError as e:
        raise ValueError(f"{source}: {e} (a sampling default for requests that leave it out)") from None
