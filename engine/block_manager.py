"""Fixed-size KV-cache blocks: reference counts, per-sequence block tables, and automatic prefix caching.

A block whose tokens are all computed is registered under a hash of its tokens and of every token before
it. A new sequence whose leading full blocks match registered ones shares them (reference count + 1)
instead of recomputing them. Freed blocks keep their contents until reused, oldest first, so a prefix
stays reusable for as long as memory allows.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from engine.sequence import Sequence


class BlockManager:
    """Hands out block ids so each sequence has room for its tokens in the paged KV cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}  # prefix digest -> block holding those tokens
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest freed first
        # Running totals, in tokens, of prompts looked up in the prefix cache at admission and of what was found.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.extra_blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table with fresh blocks to hold num_new_tokens more tokens."""
        self._grow(seq, seq.num_computed_tokens + num_new_tokens)

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        """Fresh blocks until seq's block table holds num_tokens tokens."""
        needed = max(0, self.blocks_for(num_tokens) - len(seq.block_table))
        if needed > len(self._free):
            raise RuntimeError(f"{needed} KV blocks needed for {seq.request_id}, {len(self._free)} free")
        for _ in range(needed):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._ref_counts[block] = 1
            seq.block_table.append(block)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Registered blocks matching seq's leading full blocks; the last prompt token is always computed."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return []
        blocks: list[int] = []
        for prefix_hash in self._prefix_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._block_of.get(prefix_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_admit(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        """Whether seq fits when it reuses `cached` and computes num_new_tokens after them."""
        revived = sum(1 for block in cached if self._ref_counts[block] == 0)
        fresh = self.blocks_for(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return revived + fresh <= len(self._free)

    def admit(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> int:
        """Share `cached` with seq, then allocate room for num_new_tokens after them; returns the tokens the
        cached blocks hold (the sequence's computed tokens, which the scheduler records)."""
        for block in cached:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
        seq.block_table = list(cached)
        seq.num_registered_blocks = len(cached)
        hit = len(cached) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += hit
        self._grow(seq, hit + num_new_tokens)
        return hit

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make seq's fully computed blocks reusable by later sequences with the same prefix."""
        if not self.enable_prefix_caching or not seq.shares_prefixes:
            return
        full = seq.num_computed_tokens // self.block_size
        hashes = self._prefix_hashes(seq, full)
        for index in range(seq.num_registered_blocks, full):
            block, prefix_hash = seq.block_table[index], hashes[index]
            if self._hash_of[block] is None and prefix_hash not in self._block_of:
                self._hash_of[block] = prefix_hash
                self._block_of[prefix_hash] = block
        seq.num_registered_blocks = full

    def reset_prefix_cache(self) -> None:
        """Forget every registered prefix (the model changed: cached keys and values are stale)."""
        self._block_of.clear()
        self._hash_of = [None] * self.num_blocks

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # a sequence's tail is the least likely to be shared
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None
        seq.block_table = []
        seq.num_registered_blocks = 0

    def _prefix_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Digests of seq's first num_blocks full blocks, each covering every token up to its end.

        A cryptographic digest, not hash(): crafted prompts must not collide with another user's prefix.
        """
        hashes = seq.block_hashes
        for index in range(len(hashes), num_blocks):
            tokens = seq.token_ids[index * self.block_size : (index + 1) * self.block_size]
            digest = hashlib.blake2b(hashes[-1] if hashes else seq.cache_salt, digest_size=16)
            digest.update(array("q", tokens).tobytes())
            hashes.append(digest.digest())
        return hashes[:num_blocks]

    def _forget(self, block: int) -> None:
        prefix_hash = self._hash_of[block]
        if prefix_hash is not None and self._block_of.get(prefix_hash) == block:
            del self._block_of[prefix_hash]
        self._hash_of[block] = None
