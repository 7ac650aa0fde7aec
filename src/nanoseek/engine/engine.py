"""The inference engine: token ids in, token ids out, many requests at once over a paged latent cache.

What is notable here:
- Each `step()` runs at most two batched forwards: one decode forward over every running sequence
  (one token each, or [token, MTP draft] when speculating) and one prefill forward over this step's
  prompt chunks (padded into one batch). New requests join and finished ones leave between steps.
- Attention reads the paged MLA cache through the model's `LatentCache` protocol, so the model's
  absorbed path (W_UK folded into the query, W_UV into the output) runs directly on the latents.
- Only the positions whose logits are needed go through the LM head (the last prompt token, unless
  prompt log-probabilities are asked for).
- Decode steps are cheap to set up: each request's slot map (its block table expanded to cache slots)
  is built once when the batch changes, a step only slices it; rows at equal length need no mask;
  the whole step runs under `torch.inference_mode()` (no autograd or version-counter bookkeeping).
- A bf16 decode of one sequence on a CPU runs its one-row matmuls on PyTorch's own GEMV, not oneDNN
  (`_gemv_kernels`): weight streaming is what bounds it.
- The model is left as found: it runs in eval mode (where routers count no expert load) and its
  training mode is restored after each step, so GRPO can roll out with the model it trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import operator
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from nanoseek.engine.cache import EngineCapacityError, StepView, cache_row_width, paged_cache_for
from nanoseek.engine.sampling import SamplerState, SamplingParams, TokenLogprob, sample, token_logprobs
from nanoseek.engine.scheduler import Scheduler, Sequence
from nanoseek.engine.speculative import verify
from nanoseek.model.derived import weights_epoch
from nanoseek.model.transformer import DeepSeekV3, check_model
from nanoseek.perf import tune_malloc

DEFAULT_CACHE_BYTES = 512 * 1024**2


@dataclass
class StepEvent:
    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    prompt_logprobs: list[float | None] | None = None  # first event of a request only
    error: Exception | None = None  # what failed this request's step (finish_reason "error")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    prompt_logprobs: list[float | None] | None


class Engine:
    """Continuous-batching generation over a DeepSeekV3 model. Single-threaded: call from one thread.

    max_seq_len: prompt + completion cap (default: the model's max_position_embeddings, or what the
    default cache holds for one sequence if that is less).
    num_blocks: cache blocks of `block_size` tokens (default: enough for max_batch_size full-length
    sequences, capped at `cache_bytes` of cache, 512 MiB by default). quantize: None | "int8" | "fp8" (weight-only) | "w8a8"
    (int8 weights and activations, CPU; packed for its backend here), applied to the model in place.
    pack_weights: a bf16 or fp32 model on a CPU keeps its large linears and routed experts in oneDNN's
    blocked layout (in place, engine/packed.py: the same weights, read faster); only for a model the
    engine serves, never one still being trained. speculative: draft one token per step with the model's MTP module.
    prefill_chunk: prompt tokens computed per step at most, the padding of the batched prefill included
    (chunked prefill).
    """

    def __init__(
        self,
        model: DeepSeekV3,
        *,
        max_batch_size: int = 32,
        max_seq_len: int | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        quantize: str | None = None,
        pack_weights: bool = False,
        speculative: bool = False,
        prefill_chunk: int = 512,
        cache_bytes: int | None = None,
    ) -> None:
        check_model(model, "Engine")
        cfg = model.config
        if speculative and cfg.num_nextn_predict_layers < 1:
            family = (
                f" ({cfg.model_type} models have none: speculative decoding is not available for them)"
                if cfg.attention_variant == "gqa"
                else ""
            )
            raise ValueError(
                f"speculative=True needs a model with an MTP module (num_nextn_predict_layers >= 1){family}"
            )
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("block_size", block_size),
            ("prefill_chunk", prefill_chunk),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_seq_len is not None and max_seq_len < 2:  # one prompt token and one generated
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        cache_bytes = DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
        if cache_bytes <= 0:
            raise ValueError(f"cache_bytes must be > 0, got {cache_bytes}")
        self.model = model
        self.config = cfg
        self.dtype = model.dtype
        self.device = model.device
        if self.device.type == "cpu":
            # as the CLI and the Trainer do: a library user's engine otherwise page-faults its multi-MB
            # step buffers (int8 weights widened for a batch's GEMM) in again at every step
            tune_malloc()
        self.speculative = speculative
        if max_seq_len is not None and max_seq_len > cfg.max_position_embeddings:
            # as vLLM refuses it: past its context the model's outputs degrade without any error
            raise ValueError(
                f"max_seq_len {max_seq_len} is beyond the model's context ({cfg.max_position_embeddings} "
                "positions, max_position_embeddings in config.json)"
            )
        self.max_seq_len = max_seq_len or cfg.max_position_embeddings
        num_layers = cfg.num_hidden_layers + (1 if speculative else 0)
        width = cache_row_width(cfg)  # MLA's latent row, or GQA's K/V heads (`paged_cache_for`)
        if num_blocks is None:
            per_block = num_layers * width * block_size * torch.empty(0, dtype=self.dtype).element_size()
            budget = max(2, cache_bytes // per_block)
            holds = (budget - 1) * block_size  # one sequence's tokens in that cache
            if max_seq_len is None:  # a long context the capped cache cannot hold for even one request:
                # shorten it to what the cache holds (else every request asking for it is refused)
                self.max_seq_len = min(self.max_seq_len, holds)
            elif max_seq_len > holds:  # refused here, as vLLM does, not request by request
                raise ValueError(
                    f"max_seq_len {max_seq_len} needs more KV cache than {cache_bytes / 2**20:.0f} MiB "
                    f"holds for one sequence ({holds} tokens): use a max_seq_len of {holds} or less, or "
                    "a larger cache (cache_bytes; `serve --kv-cache-mib`)"
                )
            want = max_batch_size * math.ceil((self.max_seq_len + 1) / block_size) + 1
            num_blocks = min(want, budget)
        # The model is changed in place only now, past every check above: a refused Engine leaves it as given.
        from nanoseek.engine.quantize import FORMATS, held_storage, pack_w8a8, quantize_model

        if quantize is not None:
            quantize_model(model, quantize)
        pack_w8a8(model)  # now, not in the first request (a no-op without w8a8 weights)
        # what the weights are stored in, quantized here or as they loaded (`load_model(quantize=...)`,
        # what `serve` does): quantize=None said a model that `serve` loaded in int8 was in full precision
        self.quantize = quantize or next((f for f in FORMATS if f in held_storage(model)), None)
        if pack_weights:
            from nanoseek.engine.packed import pack_model

            pack_model(model)
        self.cache = paged_cache_for(cfg, num_layers, num_blocks, block_size, self.dtype, self.device)
        # A verify step's draft lies at position len(tokens) < max_len: no slot past max_len is needed.
        self.scheduler = Scheduler(self.cache, max_batch_size, prefill_chunk, speculative)
        eos = cfg.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._track_weights()
        self._epoch = object()  # see _check_weights
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._requests: dict[str, Sequence] = {}
        self._batch_key: tuple[tuple[int, int], ...] = ()  # the decode batch whose slot maps are cached
        self._batch_blocks: list[int] = []  # how many blocks of each row's table they cover
        self._batch_slots = torch.zeros(0, 0, dtype=torch.long)
        self._aborted: list[StepEvent] = []
        self._stats = {
            "steps": 0,
            "prompt_tokens": 0,  # positions prefilled, a preempted request's recompute included
            "generated_tokens": 0,
            "decode_forwards": 0,
            "prefill_forwards": 0,
            "spec_drafted": 0,
            "spec_accepted": 0,
            "forward_seconds": 0.0,
        }

    def __repr__(self) -> str:
        # what a notebook shows for an engine left as a cell's value (object.__repr__ said nothing)
        return (
            f"Engine({self.config.model_type}, {str(self.dtype).removeprefix('torch.')} on {self.device}, "
            f"max_batch_size={self.scheduler.max_batch_size}, max_seq_len={self.max_seq_len}, "
            f"cache {self.cache.usable_blocks} blocks x {self.cache.block_size} tokens ({self.cache.num_used} "
            f"used), speculative={self.speculative}, quantize={self.quantize!r}, "
            f"running={self.num_running}, waiting={self.num_waiting})"
        )

    # ------------------------------------------------------------- requests
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        params = params or SamplingParams()
        params.validate()
        prompt = _token_ids(prompt_ids)
        if not prompt:
            raise ValueError("prompt is empty: give at least one token id (e.g. BOS)")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(
                f"prompt has {len(prompt)} tokens; max_seq_len is {self.max_seq_len}, which must leave room "
                "for at least one generated token"
            )
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt has token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}"
            )
        if params.logprobs is not None and params.logprobs > self.config.vocab_size:
            raise ValueError(
                f"logprobs={params.logprobs} asks for more alternatives than the vocabulary has "
                f"({self.config.vocab_size})"
            )
        rid = request_id
        if rid is None:  # the next "req-N" not in flight: one the caller named so was taken as a duplicate
            rid = next(r for r in (f"req-{i}" for i in self._ids) if r not in self._requests)
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = Sequence(
            request_id=rid,
            prompt_ids=prompt,
            params=params,
            sampler=SamplerState(params, prompt, self.config.vocab_size),
            max_len=min(len(prompt) + params.max_new_tokens, self.max_seq_len),
            arrival=next(self._arrivals),
            tokens=list(prompt),
            prompt_logprobs=[None] if params.prompt_logprobs else None,
        )
        self.scheduler.add(seq)  # raises EngineCapacityError if it can never fit
        self._requests[rid] = seq
        return rid

    def abort(self, request_id: str) -> None:
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        self._aborted.append(self._event(seq))

    def has_unfinished(self) -> bool:
        # an abort's event is still to come from step(): a `while has_unfinished(): step()` loop that
        # aborted its last request ended without it, and a later batch's first step handed it over
        return bool(self.scheduler.running or self.scheduler.waiting or self._aborted)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ----------------------------------------------------------------- step
    def step(self) -> list[StepEvent]:
        """Advance every running request by one token (or more, speculating); returns what changed.

        A forward that raises fails only the requests it computed (finish_reason "error", the exception
        in the event's `error`, their blocks freed): the decode batch and the prefill batch fail apart,
        and everyone else goes on."""
        events, self._aborted = self._aborted, []
        self._check_weights()  # before admission: a stale prefix must not be matched
        plan = self.scheduler.plan()
        if not plan.decode and not plan.prefill:
            return events
        touched: list[Sequence] = []
        t0 = time.perf_counter()
        with torch.inference_mode(), self._eval_mode(), weights_epoch(self._epoch):
            if plan.decode:
                decode = self._decode_speculative if self.speculative else self._decode
                self._isolated(decode, plan.decode, plan.decode)
                touched += plan.decode
            if plan.prefill:
                rows = [s for s, _ in plan.prefill]
                self._isolated(self._prefill, plan.prefill, rows)
                touched += rows
        self._stats["forward_seconds"] += time.perf_counter() - t0
        self._stats["steps"] += 1
        for seq in touched:
            if seq.error is None:  # a failed forward may have left its blocks half written
                self.scheduler.register_blocks(seq)
            if seq.finished:
                self.scheduler.finish(seq)
                self._requests.pop(seq.request_id, None)
            if seq.finished or len(seq.tokens) - seq.prompt_len > seq.sent_tokens:
                events.append(self._event(seq))
        return events

    @staticmethod
    def _isolated(forward: Callable[[Any], None], batch: Any, rows: list[Sequence]) -> None:
        """Run one forward over `batch`; if it raises, its rows (and only they) finish with the error."""
        try:
            forward(batch)
        except Exception as e:
            for r in rows:
                r.finish_reason, r.error = "error", e

    # -------------------------------------------------------- batch helpers
    def _view(
        self, rows: list[Sequence], starts: list[int], lengths: list[int], width: int
    ) -> tuple[StepView, torch.Tensor]:
        """Slots, context and mask for a batch whose row b computes positions starts[b]..+lengths[b]."""
        bs = self.cache.block_size
        end = max(s + n for s, n in zip(starts, lengths, strict=False))
        nb = math.ceil(end / bs)
        table = torch.tensor([(r.block_table + [0] * nb)[:nb] for r in rows], dtype=torch.long)
        start_t = torch.tensor(starts, dtype=torch.long).unsqueeze(1)
        len_t = torch.tensor(lengths, dtype=torch.long).unsqueeze(1)
        s_idx = torch.arange(width).unsqueeze(0)
        real = s_idx < len_t
        positions = torch.where(real, start_t + s_idx, 0)
        write = table.gather(1, positions // bs) * bs + positions % bs
        write = torch.where(real, write, 0)  # padding writes land in the scratch block
        t = torch.arange(end).unsqueeze(0)
        read = table[:, t[0] // bs] * bs + t % bs
        read = torch.where(t < start_t + len_t, read, 0)
        view = StepView(
            self.cache,
            write.flatten().to(self.device),
            read.flatten().to(self.device),
            positions.to(self.device),
        )
        return view, positions.to(self.device)

    def _decode_view(self, rows: list[Sequence]) -> tuple[StepView, torch.Tensor]:
        """`_view` for one new token per row, from slot maps cached across steps.

        The batch's padded slot maps [B, L] are rebuilt only when its membership changes (sequences
        join or leave, or one was preempted and re-admitted); a block a running row gains (tables only
        grow while it runs) is appended to its row, so a steady decode step costs a handful of small
        tensor ops however often some row crosses into a new block."""
        starts = [r.num_computed for r in rows]
        end = max(starts) + 1
        # arrival is unique per request, unlike id() or request ids
        key = tuple((r.arrival, r.preemptions) for r in rows)
        blocks = [len(r.block_table) for r in rows]
        if key != self._batch_key:
            self._batch_key, self._batch_blocks = key, [0] * len(rows)
            self._batch_slots = torch.zeros(len(rows), 0, dtype=torch.long, device=self.device)
        if blocks != self._batch_blocks:
            bs = self.cache.block_size
            width = max(blocks) * bs
            table = self._batch_slots
            if width > table.shape[1]:
                table = torch.nn.functional.pad(table, (0, width - table.shape[1]))
            for b, (had, has) in enumerate(zip(self._batch_blocks, blocks, strict=True)):
                if has != had:
                    table[b, had * bs : has * bs] = self.cache.slot_map(rows[b].block_table[had:has])
            self._batch_blocks, self._batch_slots = blocks, table
        table = self._batch_slots
        if len(rows) == 1:
            s = starts[0]
            read, write = table[0, :end], table[0, s : s + 1]
            positions = torch.tensor([[s]], dtype=torch.long, device=self.device)
            return StepView(self.cache, write, read, positions, needs_mask=False), positions
        positions = torch.tensor(starts, dtype=torch.long, device=self.device).unsqueeze(1)
        write = table.gather(1, positions).flatten()
        read = table[:, :end]
        ragged = min(starts) + 1 != end
        if ragged:  # positions past a row's own length read the scratch slot
            read = torch.where(torch.arange(end, device=self.device) <= positions, read, 0)
        view = StepView(self.cache, write, read.flatten(), positions, needs_mask=ragged)
        return view, positions

    def _ids_tensor(self, rows: list[list[int]], width: int) -> torch.Tensor:
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=self.device)

    def _emit(self, seq: Sequence, token: int, lp: TokenLogprob | None = None) -> None:
        """Append one generated token and decide whether the sequence is done."""
        if seq.finished:
            return
        seq.tokens.append(token)
        seq.sampler.observe(token)
        if lp is not None:
            seq.logprobs.append(lp)
        n_out = len(seq.tokens) - seq.prompt_len
        self._stats["generated_tokens"] += 1
        if token in seq.sampler.stop_ids or (not seq.params.ignore_eos and token in self.eos_ids):
            seq.finish_reason = "stop"
        elif n_out >= seq.params.max_new_tokens or len(seq.tokens) >= seq.max_len:
            seq.finish_reason = "length"

    def _logprobs(
        self, rows: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor
    ) -> list[TokenLogprob | None]:
        want = [r.params.logprobs for r in rows]
        if all(w is None for w in want):
            return [None] * len(rows)
        lps = token_logprobs(logits, tokens, [w or 0 for w in want])
        return [lp if w is not None else None for lp, w in zip(lps, want, strict=False)]

    # --------------------------------------------------------------- decode
    def _decode(self, rows: list[Sequence]) -> None:
        view, positions = self._decode_view(rows)
        ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=self.device)
        with self._gemv_kernels(len(rows) == 1):
            hidden = self._hidden(ids, positions, view)
            logits = self.model.lm_head(hidden[:, 0])
        tokens = sample(logits, [r.sampler for r in rows])
        lps = self._logprobs(rows, logits, tokens)
        self._stats["decode_forwards"] += 1
        for r, tok, lp in zip(rows, tokens.tolist(), lps, strict=False):
            r.num_computed += 1
            self._emit(r, tok, lp=lp)

    def _decode_speculative(self, rows: list[Sequence]) -> None:
        """Verify each row's MTP draft in one main-model step over [last token, draft], then redraft."""
        starts = [r.num_computed for r in rows]
        view, positions = self._view(rows, starts, [2] * len(rows), 2)
        drafts = torch.tensor([r.draft for r in rows], dtype=torch.long, device=self.device)
        ids = torch.stack((torch.tensor([r.tokens[-1] for r in rows], device=self.device), drafts), dim=1)
        # one sequence: the kernels plain decoding runs it with (`_decode`), so a bf16 model's logits,
        # and with them its tokens, are plain decoding's (oneDNN's GEMM rounds otherwise than the GEMV)
        with self._gemv_kernels(len(rows) == 1):
            hidden = self._hidden(ids, positions, view)
            logits = self.model.lm_head(hidden)  # [B,2,V]
        states = [r.sampler for r in rows]
        accepted, first = verify(logits[:, 0], drafts, states)
        lps_first = self._logprobs(rows, logits[:, 0], first)
        acc = accepted.tolist()
        self._stats["decode_forwards"] += 1
        self._stats["spec_drafted"] += len(rows)
        self._stats["spec_accepted"] += sum(acc)
        for r, tok, lp, a in zip(rows, first.tolist(), lps_first, acc, strict=False):
            r.num_computed += 2 if a else 1
            self._emit(r, tok, lp=lp)
        # Accepted rows get a bonus token from the logits at the draft position.
        bonus_rows = [i for i, a in enumerate(acc) if a and not rows[i].finished]
        if bonus_rows:
            idx = torch.tensor(bonus_rows, dtype=torch.long, device=self.device)
            sub = [rows[i] for i in bonus_rows]
            bl = logits[idx, 1]
            bonus = sample(bl, [r.sampler for r in sub])
            for r, tok, lp in zip(sub, bonus.tolist(), self._logprobs(sub, bl, bonus), strict=False):
                self._emit(r, tok, lp=lp)
        # Redraft: MTP at positions p+1 (and p+2 when accepted) with the tokens that now follow them.
        live = [i for i, r in enumerate(rows) if not r.finished]
        if not live:
            return
        nxt = []
        for r, a in zip(rows, acc, strict=False):
            t = r.tokens
            nxt.append([t[-2], t[-1]] if a and not r.finished else [t[-1], t[-1]])
        mh = self._mtp_hidden(
            hidden, torch.tensor(nxt, dtype=torch.long, device=self.device), positions, view
        )
        pick = torch.tensor([1 if acc[i] else 0 for i in live], dtype=torch.long, device=self.device)
        live_t = torch.tensor(live, dtype=torch.long, device=self.device)
        new = self._drafts(mh[live_t, pick])
        for i, d in zip(live, new, strict=False):
            rows[i].draft = d

    # -------------------------------------------------------------- prefill
    def _prefill(self, chunks: list[tuple[Sequence, int]]) -> None:
        rows = [s for s, _ in chunks]
        starts = [s.num_computed for s in rows]
        lengths = [n for _, n in chunks]
        width = max(lengths)
        view, positions = self._view(rows, starts, lengths, width)
        ids = self._ids_tensor(
            [s.tokens[a : a + n] for s, a, n in zip(rows, starts, lengths, strict=False)], width
        )
        hidden = self._hidden(ids, positions, view)
        self._stats["prefill_forwards"] += 1
        self._stats["prompt_tokens"] += sum(lengths)
        for b, (s, a, n) in enumerate(zip(rows, starts, lengths, strict=False)):
            if s.params.prompt_logprobs and s.first_pass:
                logp = self.model.lm_head(hidden[b, :n]).float().log_softmax(dim=-1)
                targets = s.prompt_ids[a + 1 : a + n + 1]
                got = logp[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)]
                s.prompt_logprobs.extend(got.tolist())  # type: ignore[union-attr]
            s.num_computed = a + n
        done = [b for b, s in enumerate(rows) if not s.prefilling]
        # A prompt's last chunk gives its first token; a recompute after a preemption samples nothing
        # (its last token is fed by the next decode step, which draws what it would have drawn).
        first = [b for b in done if rows[b].first_pass]
        if first:
            idx = torch.tensor(first, dtype=torch.long, device=self.device)
            last = torch.tensor([lengths[b] - 1 for b in first], dtype=torch.long, device=self.device)
            sub = [rows[b] for b in first]
            logits = self.model.lm_head(hidden[idx, last])
            tokens = sample(logits, [r.sampler for r in sub])
            for r, tok, lp in zip(sub, tokens.tolist(), self._logprobs(sub, logits, tokens), strict=False):
                self._emit(r, tok, lp=lp)
        if self.speculative:
            # Fill the MTP layer's cache over the chunk; finished prefills also get their draft (a
            # recompute's: the one its last decode step had made, from the same position and tokens).
            nxt = [s.tokens[a + 1 : a + n + 1] for s, a, n in zip(rows, starts, lengths, strict=False)]
            nxt = [x + [0] * (n - len(x)) for x, n in zip(nxt, lengths, strict=False)]
            mh = self._mtp_hidden(hidden, self._ids_tensor(nxt, width), positions, view)
            want = [b for b in done if not rows[b].finished]
            if want:
                idx = torch.tensor(want, dtype=torch.long, device=self.device)
                last = torch.tensor([lengths[b] - 1 for b in want], dtype=torch.long, device=self.device)
                for b, d in zip(want, self._drafts(mh[idx, last]), strict=False):
                    rows[b].draft = d

    # ---------------------------------------------------------------- model
    def _track_weights(self) -> None:
        """Watch the model's weights as they are now; the next step starts a new epoch."""
        # buffers too: the routing bias moves in training, a quantized model's weights are buffers
        self._weights = [*self.model.parameters(), *self.model.buffers()]
        self._versions: list[int] = []

    def _check_weights(self) -> None:
        """New weights or buffers (e.g. a GRPO optimizer step) make cached prefixes stale, and start a new epoch
        for the weights the model derives from its own (`nanoseek.model.derived`): within one, the
        model's folded and stacked weights are not checked again."""
        versions = [p._version for p in self._weights]
        if versions != self._versions:
            if self._versions:
                self.scheduler.reset_prefix_cache()
            self._versions = versions
            self._epoch = object()

    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor, view: StepView) -> torch.Tensor:
        return self.model.hidden_states(ids, positions, cache=view)

    def _mtp_hidden(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, view: StepView
    ) -> torch.Tensor:
        """MTP depth 0 over a whole step (it fills its own cache layer); the pre-norm hidden [B,S,H]."""
        return self.model.mtp_block(0, hidden, next_ids, positions, cache=view)

    def _drafts(self, mtp_h: torch.Tensor) -> list[int]:
        """Greedy drafts from selected MTP hidden rows [N,H]."""
        return self.model.mtp_head(0, mtp_h).argmax(dim=-1).tolist()

    @contextlib.contextmanager
    def _gemv_kernels(self, one_row: bool) -> Iterator[None]:
        """bf16 matmuls of one sequence on a CPU (batch-1 decode, and its speculative verify step) run
        PyTorch's own GEMV instead of oneDNN's GEMM, which streams the weights ~1.7x slower there and
        wins from a few rows on (figures in benchmarks/README.md, bench_llamacpp.py). A process-wide
        switch, restored after the forward. Packed weights (`pack_weights`) run oneDNN's GEMM on its own
        layout either way; the switch serves the matmuls left plain (MLA's)."""
        if not (one_row and self.device.type == "cpu" and self.dtype == torch.bfloat16):
            yield
            return
        was = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # (a ContextProp in torch's stubs)
        try:
            yield
        finally:
            torch.backends.mkldnn.enabled = was

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            yield
        finally:
            if was_training:
                self.model.train()

    # --------------------------------------------------------------- events
    def _event(self, seq: Sequence) -> StepEvent:
        out = seq.tokens[seq.prompt_len :]
        new = out[seq.sent_tokens :]
        lps = seq.logprobs[seq.sent_tokens :] if seq.params.logprobs is not None else None
        seq.sent_tokens = len(out)
        plp = None
        if not seq.sent_prompt_logprobs:
            plp = seq.prompt_logprobs
            seq.sent_prompt_logprobs = True
        return StepEvent(seq.request_id, new, lps, seq.finished, seq.finish_reason, plp, seq.error)

    # ----------------------------------------------------------- front ends
    def _params(
        self, params: SamplingParams | list[SamplingParams] | None, overrides: dict
    ) -> SamplingParams | list[SamplingParams]:
        if isinstance(params, list):
            if overrides:
                raise ValueError("sampling overrides apply to one SamplingParams, not to a list of them")
            return params
        params = params or SamplingParams()
        return dataclasses.replace(params, **overrides) if overrides else params

    def _submit(self, prompts: list[list[int]], p: SamplingParams | list[SamplingParams]) -> list[str]:
        if hasattr(prompts, "tolist"):  # a [batch, seq] tensor or array
            prompts = prompts.tolist()
        elif isinstance(prompts, str | bytes):  # refused whole by add_request, not character by character
            prompts = [prompts]
        if prompts and isinstance(prompts[0], int):
            raise ValueError("prompts must be a list of token-id lists (got a flat list of ints)")
        if isinstance(p, list) and len(p) != len(prompts):
            raise ValueError(
                f"{len(p)} sampling params for {len(prompts)} prompts: give one each, or one for all"
            )
        ids: list[str] = []
        try:
            for i, prompt in enumerate(prompts):
                if isinstance(p, list):
                    pi = p[i]  # each prompt's own, as given
                else:
                    pi = dataclasses.replace(p, seed=p.seed + i) if p.seed is not None else p
                ids.append(self.add_request(prompt, pi))
        except Exception:
            self._abort_quietly(ids)
            raise
        return ids

    def _abort_quietly(self, ids: list[str] | set[str]) -> None:
        """Abort requests their caller has given up on (a refused batch, a stream closed early): no
        "abort" event of theirs is left for a later step(), whose caller never knew them."""
        for rid in ids:
            self.abort(rid)
        self._aborted = [e for e in self._aborted if e.request_id not in ids]

    def _drive(self, ids: list[str], should_stop: Callable[[], bool] | None = None) -> Iterator[StepEvent]:
        mine = set(ids)
        pending = set(ids)
        try:
            while pending:
                if should_stop is not None and should_stop():  # between steps: a long prefill yields no event
                    return
                for ev in self.step():
                    if ev.request_id in mine:
                        if ev.error is not None:
                            raise ev.error
                        if ev.finished:
                            pending.discard(ev.request_id)
                        yield ev
        finally:
            self._abort_quietly(pending)

    def stream(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        should_stop: Callable[[], bool] | None = None,
        **overrides,
    ) -> Iterator[StepEvent]:
        """Add the prompts and yield their events until all finish. Drives the engine itself: do not
        mix with another caller's requests (their events would be consumed here).

        `params` as for `generate_detailed`: with a seed, prompt i gets seed + i, so repeated prompts in
        one call still differ. `should_stop()`, asked before each engine step, ends the stream (and aborts what
        is unfinished) where it returns true: a Ctrl-C during a prefill of several steps."""
        return self._drive(self._submit(prompts, self._params(params, overrides)), should_stop)

    def generate_detailed(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        on_finish: Callable[[int], None] | None = None,
        **overrides,
    ) -> list[Completion]:
        """Completion ids, finish reasons and (if asked) logprobs per prompt, in prompt order.
        `params`: one SamplingParams for all (with a seed, prompt i samples with seed + i), or one per
        prompt. `on_finish(i)` is called as prompt i's completion finishes (a progress bar counts them)."""
        p = self._params(params, overrides)
        ids = self._submit(prompts, p)
        index = {rid: i for i, rid in enumerate(ids)}
        each = p if isinstance(p, list) else [p] * len(prompts)
        results = [Completion([], [] if q.logprobs is not None else None, None, None) for q in each]
        # Eval mode once for the whole call: a model left training (GRPO's policy) would otherwise be
        # flipped to eval and back around every step (~100 modules each way).
        with self._eval_mode():
            for ev in self._drive(ids):
                c = results[index[ev.request_id]]
                c.token_ids.extend(ev.new_token_ids)
                if ev.logprobs is not None and c.logprobs is not None:
                    c.logprobs.extend(ev.logprobs)
                if ev.prompt_logprobs is not None:
                    c.prompt_logprobs = ev.prompt_logprobs
                if ev.finished:
                    c.finish_reason = ev.finish_reason
                    if on_finish is not None:
                        on_finish(index[ev.request_id])
        return results

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | None = None, **overrides
    ) -> list[list[int]]:
        """Completion token ids per prompt (greedy unless temperature > 0)."""
        return [c.token_ids for c in self.generate_detailed(prompts, params, **overrides)]

    # ---------------------------------------------------------------- stats
    def reset_prefix_cache(self) -> None:
        """Call after changing the model's weights (e.g. between GRPO steps): cached prefixes are stale.
        In-place changes are noticed anyway; weights replaced (`load_state_dict(..., assign=True)`)
        move no version counter the engine watches, so only this call makes it serve them (and the
        weights derived from them) and let the old ones go."""
        self.scheduler.reset_prefix_cache()
        self._track_weights()

    def stats(self) -> dict:
        s: dict[str, float | None] = dict(self._stats)
        s["cache_blocks_used"] = self.cache.num_used
        s["cache_blocks_total"] = self.cache.usable_blocks
        s["cache_block_size"] = self.cache.block_size
        s["cache_bytes_per_token"] = self.cache.bytes_per_token()
        s["prefix_cache_hit_blocks"] = self.cache.prefix_hits
        s["prefix_cache_queries"] = self.cache.prefix_queries
        s["prefix_cache_hit_rate"] = (
            self.cache.prefix_hits / self.cache.prefix_queries if self.cache.prefix_queries else 0.0
        )
        drafted, accepted = self._stats["spec_drafted"], self._stats["spec_accepted"]
        s["spec_acceptance_rate"] = accepted / drafted if drafted else None
        s["preemptions"] = self.scheduler.preemptions  # running requests sent back to wait (recompute)
        s["prompt_tokens_reused"] = self.cache.prefix_hits * self.cache.block_size
        s["running"] = self.num_running
        s["waiting"] = self.num_waiting
        return s


def _token_ids(prompt: Any) -> list[int]:
    """A prompt's ids as ints: integers of any kind (numpy's, a tensor's), never text or fractions."""
    items = prompt.tolist() if hasattr(prompt, "tolist") else prompt
    items = [items] if isinstance(items, str | bytes) else list(items)
    if any(isinstance(t, str | bytes) for t in items):
        raise ValueError(
            f"prompt {prompt!r:.40} is text, not token ids: encode it first "
            "(tokenizer.encode(text, add_bos=True) or tokenizer.apply_chat_template(messages, tokenize=True))"
        )
    bad = [t for t in items if not hasattr(t, "__index__")]
    if bad:
        raise ValueError(f"prompt must hold integer token ids, got {bad[0]!r}")
    return [operator.index(t) for t in items]


__all__ = ["Completion", "Engine", "EngineCapacityError", "StepEvent"]
