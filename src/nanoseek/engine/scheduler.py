"""Continuous batching: which sequences run this step, and how much of each prompt to prefill.

What is notable here:
- Sequences join and leave at every step: a finished one frees its blocks at once, and the next waiting
  request is admitted as soon as its blocks fit (first come, first served, so nobody starves).
- Admission reserves every block a request can ever need (prompt + max_new_tokens, capped by
  max_seq_len), minus the blocks it shares through prefix reuse. A running request therefore never runs
  out of cache, and no preemption is needed; a request larger than the whole cache is refused up front.
- Chunked prefill: each step decodes every running sequence and prefills at most `prefill_chunk`
  prompt positions in total, counting the padding of the batched prefill (rows x widest chunk), so a
  long prompt is spread over several steps instead of stalling the others.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from nanoseek.engine.cache import EngineCapacityError, PagedLatentCache, block_hash
from nanoseek.engine.sampling import SamplerState, SamplingParams, TokenLogprob


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: SamplerState
    max_len: int  # prompt + generated tokens never exceed this
    arrival: int
    tokens: list[int] = field(default_factory=list)  # prompt + output so far
    num_computed: int = 0  # positions 0..num_computed-1 are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of registered full blocks
    shareable: bool = True  # its blocks may be published for prefix reuse (not once the weights changed)
    draft: int | None = None  # MTP's guess for the token after tokens[-1]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    finish_reason: str | None = None
    error: Exception | None = None  # the exception that failed its step (finish_reason "error")
    sent_tokens: int = 0  # output tokens already reported in events
    sent_prompt_logprobs: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepPlan:
    decode: list[Sequence]
    prefill: list[tuple[Sequence, int]]  # (sequence, number of prompt tokens to compute now)


class Scheduler:
    def __init__(
        self, cache: PagedLatentCache, max_batch_size: int, prefill_chunk: int, speculative: bool = False
    ) -> None:
        self.cache = cache
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.speculative = speculative  # MTP rows in the cache: a prefix hit recomputes its last block
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def blocks_needed(self, seq: Sequence) -> int:
        return math.ceil(seq.max_len / self.cache.block_size)

    def check_fits(self, seq: Sequence) -> None:
        need = self.blocks_needed(seq)
        if need > self.cache.usable_blocks:
            raise EngineCapacityError(
                f"request needs {need} cache blocks ({seq.max_len} tokens incl. max_new_tokens, block size "
                f"{self.cache.block_size}) but the engine has only {self.cache.usable_blocks}; lower "
                "max_new_tokens or the prompt length, or build the Engine with more num_blocks"
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        self.waiting.append(seq)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            # Share cached full prompt blocks, leaving at least one prompt token to compute so the
            # first output token has logits; prompt logprobs need every prompt position's logits.
            max_shared = 0 if seq.params.prompt_logprobs else (seq.prompt_len - 1) // self.cache.block_size
            shared, hashes = self.cache.match_prefix(seq.prompt_ids, max_shared)
            if self.speculative and shared:
                # Speculating, the MTP layer's row at a block's last position was computed with the token
                # after the block, which its hash does not cover: recompute the last hit block (its
                # first token matched, so the rows before it hold), as vLLM does for EAGLE drafts. A
                # chain two sequences registered can still hold one such row at their seam: a worse
                # draft there, never a wrong token (every draft is verified).
                self.cache.release([shared.pop()])
                hashes.pop()
            fresh = self.blocks_needed(seq) - len(shared)
            if fresh > self.cache.num_free:
                self.cache.release(shared)
                break  # FCFS: wait for blocks rather than let later requests overtake
            self.waiting.popleft()
            self.cache.prefix_queries += seq.prompt_len // self.cache.block_size
            self.cache.prefix_hits += len(shared)
            seq.block_table = shared + [self.cache.allocate() for _ in range(fresh)]
            seq.block_hashes = hashes
            seq.num_computed = len(shared) * self.cache.block_size
            self.running.append(seq)

    def plan(self) -> StepPlan:
        self._admit()
        decode = [s for s in self.running if not s.prefilling]
        # The prefill forward pads every chunk to the widest, so `prefill_chunk` bounds rows x width
        # (padding included), not just the tokens: a long prompt's last 400 tokens batched with nine short
        # prompts would otherwise compute 10 x 400 positions, a stall ~10x the chunk's.
        prefill: list[tuple[Sequence, int]] = []
        width = 0
        for s in self.running:
            if not s.prefilling:
                continue
            room = self.prefill_chunk // (len(prefill) + 1)  # the widest chunk one more row allows
            if room < max(width, 1):
                break  # FCFS: later prompts wait rather than take a chunk from an earlier one
            n = min(room, s.prompt_len - s.num_computed)
            prefill.append((s, n))
            width = max(width, n)
        return StepPlan(decode, prefill)

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes (the weights changed). A running sequence's later blocks attend to rows
        computed with the old weights, so they are never published either."""
        self.cache.reset_prefix_cache()
        for seq in self.running:
            seq.shareable = False

    def register_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed full blocks for prefix reuse."""
        if not seq.shareable:
            return
        bs = self.cache.block_size
        full = min(seq.num_computed, len(seq.tokens)) // bs
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, tuple(seq.tokens[i * bs : (i + 1) * bs]))
            self.cache.register_full_block(seq.block_table[i], h)
            seq.block_hashes.append(h)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.cache.release(seq.block_table)
            seq.block_table = []
        elif seq in self.waiting:
            self.waiting.remove(seq)
