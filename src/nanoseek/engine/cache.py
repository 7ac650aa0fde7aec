"""Paged latent KV cache: MLA's compressed cache in fixed-size blocks, with block tables and prefix reuse.

What is notable here:
- Per token and layer only the normalized latent c_kv (kv_lora_rank) and the RoPE key k_pe
  (qk_rope_head_dim) are stored, side by side in one row of width kv_lora_rank + qk_rope_head_dim:
  bytes per token = layers x (kv_lora_rank + qk_rope_head_dim) x element size, whatever the head count.
- Storage is one tensor [layers, num_blocks * block_size, width]; a sequence owns a block table (list of
  block ids), so sequences grow and leave without moving anyone else's data (vLLM's PagedAttention idea).
- Block 0 is a scratch block: padding tokens write there and padded reads come from there, so batches
  of ragged sequences need no special cases in the model.
- Prefix reuse: a full block is named by a SHA-256 chained over all tokens up to its end (and the
  request's `cache_salt`); a new request whose prompt starts with cached full blocks shares them
  (reference counted) and skips their prefill.
  Freed blocks keep their contents and hash until reallocated (least recently freed first; a
  sequence's blocks are freed tail first, so its prefix outlives its tail).
- Grouped-query attention (the Qwen2 / Llama families) caches K and V of every KV head instead:
  `PagedKVCache` is the same storage and allocator with a row of 2 x num_key_value_heads x head_dim
  ([K heads ; V heads], `GroupedQueryAttention`'s layout); `paged_cache_for` picks one by the
  config's attention variant.
- `StepView` implements the model's `LatentCache` protocol for one forward: it writes the step's latents
  into their slots and returns each row's whole context gathered in logical order, plus the causal mask
  by position (none when every row is one query that sees its whole context). The slot indices are computed once per step and shared by all layers.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nanoseek.config import ModelConfig
from nanoseek.perf import cast


class EngineCapacityError(RuntimeError):
    """A request can never fit in the engine's cache (or batch), whatever else finishes first."""


def block_hash(parent: bytes | None, tokens: Sequence[int], cache_salt: str | None = None) -> bytes:
    """The name of a full block: SHA-256 of its parent block's name and its token ids.

    Not Python's hash(): 64 bits, and for tuples of ints computable offline, so a client of a shared
    server could craft a prompt whose block collides with another user's cached prefix and be served
    their KV rows (vLLM's CVE-2025-25183). The first block's parent is the digest of the request's
    `cache_salt` (vLLM's multi-tenant isolation): requests with different salts share no block."""
    if parent is None:
        salt = b"" if cache_salt is None else b"\x01" + cache_salt.encode("utf-8", "surrogatepass")
        parent = hashlib.sha256(b"nanoseek prefix root" + salt).digest()
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


@dataclass
class BlockInfo:
    ref_count: int = 0
    hash: bytes | None = None


class PagedLatentCache:
    """Latent cache storage plus the block allocator. `num_layers` includes MTP layers when drafting."""

    def __init__(
        self,
        num_layers: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self._init_storage(num_layers, kv_lora_rank + qk_rope_head_dim, num_blocks, block_size, dtype, device)

    def _init_storage(
        self,
        num_layers: int,
        width: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        """Rows of `width` elements per token and layer, in blocks; every block free but scratch."""
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is scratch), got {num_blocks}")
        self.num_layers = num_layers
        self.width = width
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_layers, num_blocks * block_size, self.width)
        if torch.device(device).type == "cpu":
            # calloc'd (numpy's zeros): the kernel's zero pages until a block is first written, so the
            # cache takes memory as it fills. torch.zeros wrote every byte at startup: the whole cache
            # (512 MiB by default) resident before the first request, whatever the requests' lengths.
            # (64-byte aligned, as torch's own allocator gives: numpy's gives 16)
            nbytes = num_layers * num_blocks * block_size * self.width * dtype.itemsize
            raw = np.zeros(nbytes + 64, np.uint8)
            start = -raw.ctypes.data % 64
            self.kv = torch.from_numpy(raw[start : start + nbytes]).view(dtype).view(shape)
        else:
            self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.blocks = [BlockInfo() for _ in range(num_blocks)]
        # Free blocks in the order they were freed; cached ones keep their hash until reused.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.prefix_hits = 0  # blocks reused (by prompts, not by recomputes after a preemption)
        self.prefix_queries = 0  # full prompt blocks looked up

    # ------------------------------------------------------------- accounting
    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.usable_blocks - self.num_free

    def bytes_per_token(self) -> int:
        return self.num_layers * self.width * self.kv.element_size()

    # -------------------------------------------------------------- allocator
    def allocate(self) -> int:
        if not self.free:
            raise EngineCapacityError("KV cache is out of blocks")
        block, _ = self.free.popitem(last=False)
        info = self.blocks[block]
        if info.hash is not None and self.cached.get(info.hash) == block:
            del self.cached[info.hash]
        info.hash = None
        info.ref_count = 1
        return block

    def release(self, block_table: list[int]) -> None:
        # Freed tail first, so a sequence's tail is evicted before its head: a prefix is matched from
        # its first block on, and one evicted head block would leave the whole chain unreachable (vLLM).
        for block in reversed(block_table):
            info = self.blocks[block]
            info.ref_count -= 1
            if info.ref_count == 0:
                self.free[block] = None

    def register_full_block(self, block: int, h: bytes) -> None:
        """A block just became full with the tokens hashed to h: later prompts may share it."""
        info = self.blocks[block]
        if info.hash is None and h not in self.cached:
            info.hash = h
            self.cached[h] = block

    def match_prefix(
        self, tokens: list[int], max_blocks: int, cache_salt: str | None = None
    ) -> tuple[list[int], list[bytes]]:
        """Longest run of cached full blocks at the start of `tokens` (at most max_blocks) that were
        registered under the same `cache_salt`.

        Returns (block ids, their chained hashes); the blocks are taken (ref counted) for the caller.
        """
        bs = self.block_size
        found: list[int] = []
        hashes: list[bytes] = []
        parent: bytes | None = None
        for i in range(min(max_blocks, len(tokens) // bs)):
            h = block_hash(parent, tokens[i * bs : (i + 1) * bs], cache_salt)
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
            hashes.append(h)
            parent = h
        for block in found:
            info = self.blocks[block]
            if info.ref_count == 0:
                del self.free[block]
            info.ref_count += 1
        return found, hashes

    def reset_prefix_cache(self) -> None:
        """Forget all cached prefixes (e.g. after the model's weights changed)."""
        for _h, block in list(self.cached.items()):
            self.blocks[block].hash = None
        self.cached.clear()

    # ---------------------------------------------------------------- slots
    def slot_map(self, block_table: list[int]) -> torch.Tensor:
        """Flat slot index of every logical position a block table covers, [len(block_table) * block_size]."""
        bs = self.block_size
        base = torch.tensor(block_table, dtype=torch.long).mul_(bs).repeat_interleave(bs)
        return base + torch.arange(bs).repeat(len(block_table))


class PagedKVCache(PagedLatentCache):
    """Grouped-query attention's paged cache: per token and layer, K and V of every KV head.

    The blocks, allocator and prefix reuse are the latent cache's; only the row differs:
    [K heads ; V heads], 2 x num_key_value_heads x head_dim elements (MLA's row is kv_lora_rank +
    qk_rope_head_dim whatever the head count)."""

    def __init__(
        self,
        num_layers: int,
        num_key_value_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self._init_storage(
            num_layers, 2 * num_key_value_heads * head_dim, num_blocks, block_size, dtype, device
        )


def cache_row_width(config: ModelConfig) -> int:
    """Elements a cache row holds per token and layer for this model's attention variant."""
    if config.attention_variant == "gqa":
        return 2 * int(config.num_key_value_heads or config.num_attention_heads) * int(config.head_dim or 0)
    return config.kv_lora_rank + config.qk_rope_head_dim


def paged_cache_for(
    config: ModelConfig,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> PagedLatentCache:
    """The paged cache the model's attention variant reads: latent rows (MLA) or K/V heads (GQA)."""
    if config.attention_variant == "gqa":
        kv = int(config.num_key_value_heads or config.num_attention_heads)
        return PagedKVCache(num_layers, kv, int(config.head_dim or 0), num_blocks, block_size, dtype, device)
    return PagedLatentCache(
        num_layers, config.kv_lora_rank, config.qk_rope_head_dim, num_blocks, block_size, dtype, device
    )


class StepView:
    """The model-facing `LatentCache` for one forward over a batch of rows.

    write_slots [B*S]: where each new token's latent goes (scratch slot for padding).
    read_slots [B*T]: the slots of every row's context positions 0..T-1 (scratch past its length).
    positions [B,S]: each new token's position; a query at position p sees context positions <= p.
    """

    def __init__(
        self,
        cache: PagedLatentCache,
        write_slots: torch.Tensor,
        read_slots: torch.Tensor,
        positions: torch.Tensor,
        needs_mask: bool | None = None,
    ) -> None:
        self.cache = cache
        self.write_slots = write_slots
        self.read_slots = read_slots
        self.positions = positions
        self.batch, self.seq = positions.shape
        self.ctx = read_slots.numel() // self.batch
        self._mask: torch.Tensor | None = None
        if needs_mask is None:
            # One query per row that sees the whole context (decode, equal lengths): nothing to mask.
            needs_mask = not (self.seq == 1 and bool(self.mask.all()))
        self.needs_mask = needs_mask

    @property
    def mask(self) -> torch.Tensor:
        """[B,S,T] bool: query s of row b may see context position t (t <= its position)."""
        if self._mask is None:
            t = torch.arange(self.ctx, device=self.positions.device)
            self._mask = t.view(1, 1, -1) <= self.positions.unsqueeze(-1)
        return self._mask

    def update(self, layer_idx: int, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        store = self.cache.kv[layer_idx]
        store.index_copy_(0, self.write_slots, cast(latent.reshape(-1, self.cache.width), store.dtype))
        rows = store.index_select(0, self.read_slots).view(self.batch, self.ctx, self.cache.width)
        return cast(rows, latent.dtype), self.mask if self.needs_mask else None
