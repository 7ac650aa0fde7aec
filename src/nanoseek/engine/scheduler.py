"""Continuous batching: which sequences run this step, and how much of each prompt to prefill.

What is notable here:
- Sequences join and leave at every step: a finished one frees its blocks at once, and the next waiting
  request is admitted as soon as its blocks fit (first come, first served, so nobody starves).
- Blocks are given by need, as vLLM does: admission takes the blocks of the prompt and of the first
  decode step (less those shared through prefix reuse), and before each step every running sequence
  gets the blocks its next positions need. When the cache runs short, the most recently admitted
  sequences are preempted (last in, first out): their blocks are freed and they go back to the front of
  the waiting queue. Re-admitted, a sequence recomputes its tokens so far (prompt and output, a prefill
  that samples nothing) and decodes on, so its output is what it would have been; its full blocks may
  still be in the prefix cache. A request larger than the whole cache is refused up front.
- Chunked prefill: each step decodes every running sequence and prefills at most `prefill_chunk`
  positions in total (prompts, and the tokens a re-admitted sequence recomputes), counting the padding
  of the batched prefill (rows x widest chunk), so a long prompt is spread over several steps instead
  of stalling the others.
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
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of registered full blocks
    shareable: bool = True  # its blocks may be published for prefix reuse (not once the weights changed)
    draft: int | None = None  # MTP's guess for the token after tokens[-1]
    preemptions: int = 0  # times its blocks were taken back (it recomputed them when re-admitted)
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
    def prefill_len(self) -> int:
        """Positions to compute before decoding: the prompt, or after a preemption every token but the
        last (which the next decode step feeds, as it would have)."""
        return max(self.prompt_len, len(self.tokens) - 1)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prefill_len

    @property
    def first_pass(self) -> bool:
        """Nothing generated yet: prompt logprobs are computed in this pass (never again after a preemption)."""
        return len(self.tokens) == self.prompt_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepPlan:
    decode: list[Sequence]
    prefill: list[tuple[Sequence, int]]  # (sequence, number of positions to compute now)


class Scheduler:
    def __init__(
        self, cache: PagedLatentCache, max_batch_size: int, prefill_chunk: int, speculative: bool = False
    ) -> None:
        self.cache = cache
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.speculative = speculative  # MTP rows in the cache: a prefix hit recomputes its last block
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission
        self.preemptions = 0

    def blocks_needed(self, seq: Sequence) -> int:
        """Blocks for every position up to the next decode step's: its prefill, the next token and, when
        speculating, the draft after it (a running sequence has len(tokens) < max_len: none past max_len)."""
        end = seq.prefill_len + 1 + int(self.speculative)
        return math.ceil(min(end, seq.max_len) / self.cache.block_size)

    def check_fits(self, seq: Sequence) -> None:
        need = math.ceil(seq.max_len / self.cache.block_size)
        if need > self.cache.usable_blocks:
            raise EngineCapacityError(
                f"request needs {need} cache blocks ({seq.max_len} tokens incl. max_new_tokens, block size "
                f"{self.cache.block_size}) but the engine has only {self.cache.usable_blocks}; lower "
                "max_new_tokens or the prompt length, or build the Engine with more num_blocks"
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        self.waiting.append(seq)

    def _grow(self) -> bool:
        """Give every running sequence the blocks its next step writes, oldest first, preempting the most
        recently admitted ones (itself last) while the cache is short. Returns whether any was preempted."""
        preempted = False
        covered = self.cache.block_size
        ahead = 1 + int(self.speculative)
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if len(seq.tokens) + ahead <= len(seq.block_table) * covered:  # (most steps: nothing to add)
                i += 1
                continue
            want = self.blocks_needed(seq) - len(seq.block_table)
            while want > self.cache.num_free and i < len(self.running):
                self.preempt_newest()
                preempted = True
            if i < len(self.running):  # it still runs
                seq.block_table += [self.cache.allocate() for _ in range(want)]
            i += 1
        return preempted

    def preempt_newest(self) -> None:
        """Free the most recently admitted sequence's blocks and put it first in line (vLLM's recompute
        preemption): re-admitted, it computes them again."""
        seq = self.running.pop()
        self.cache.release(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed, seq.draft = [], [], 0, None
        seq.shareable = True  # its rows will all be recomputed with the current weights
        if seq.first_pass and seq.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]  # its prompt pass starts over (none were sent)
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            # Share cached full blocks, leaving at least one position to compute so the first output token
            # (or the draft) has its hidden state; prompt logprobs need every prompt position's logits.
            # A recompute after a preemption matches its output tokens too.
            todo = seq.tokens[: seq.prefill_len]
            max_shared = (
                0
                if seq.params.prompt_logprobs and seq.first_pass
                else (len(todo) - 1) // self.cache.block_size
            )
            shared, hashes = self.cache.match_prefix(todo, max_shared, seq.params.cache_salt)
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
            if not seq.preemptions:
                # a prompt's first admission only: a preempted request re-admitted matches its own blocks
                # (output tokens too), which counted as prompt reuse had traffic sharing no prefix show a
                # hit rate under cache pressure (vLLM counts a preempted request's hits apart)
                self.cache.prefix_queries += len(todo) // self.cache.block_size
                self.cache.prefix_hits += len(shared)
            seq.block_table = shared + [self.cache.allocate() for _ in range(fresh)]
            seq.block_hashes = hashes
            seq.num_computed = len(shared) * self.cache.block_size
            self.running.append(seq)

    def plan(self) -> StepPlan:
        if not self._grow():  # no admission in a step that preempted: the cache is short
            self._admit()
            if self.waiting and not self.running:
                # every request fits the whole cache (check_fits), so an empty engine that cannot admit
                # one has lost blocks: fail the callers rather than step forever doing nothing
                raise RuntimeError(
                    f"engine stalled: {len(self.waiting)} request(s) waiting, none running, and only "
                    f"{self.cache.num_free} of {self.cache.usable_blocks} cache blocks free (blocks leaked)"
                )
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
            n = min(room, s.prefill_len - s.num_computed)
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
            h = block_hash(parent, seq.tokens[i * bs : (i + 1) * bs], seq.params.cache_salt)
            self.cache.register_full_block(seq.block_table[i], h)
            seq.block_hashes.append(h)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.cache.release(seq.block_table)
            seq.block_table = []
        elif seq in self.waiting:
            self.waiting.remove(seq)
