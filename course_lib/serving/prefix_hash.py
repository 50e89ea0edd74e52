"""The hash-chain prefix cache (lesson 05), vLLM-style: the same interface as
``course_lib.serving.prefix_cache.PrefixCache``.

Instead of a tree, one flat dictionary. Each full block is keyed by a hash of *its tokens and its parent's
hash*::

    h_0 = ROOT_HASH
    h_i = hash((h_{i-1}, tokens of block i))        (block i holds tokens iP ... (i+1)P-1)

so the key of block i stands for the whole prefix up to it (vLLM's automatic prefix caching; it adds the
LoRA id, multimodal inputs and a cache salt to the hashed tuple, and hashes with SHA-256 or xxHash).
``match`` hashes the prompt block by block and looks each key up until the first miss.

What the chain makes easy: a lookup per block with no pointers to follow (the tree's is one dictionary access per
block too: the cost is the same); a key that means the same thing in every process (with a deterministic hash), so
blocks can be looked up on another worker, offloaded to CPU or disk and found again. What it makes harder: a hash is
a promise (two prefixes with the same hash would return wrong K/V: we store the tokens and parent hash and compare
them, counting ``num_collisions``), and evicting a block in the middle would silently cut off its descendants (they
stay in memory, unreachable), so to evict leaves only we count each entry's children, which is a tree again, kept in
a dictionary.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from course_lib.paging.block_manager import BlockAllocator
from course_lib.serving.prefix_cache import IdleBlockCount, full_blocks

ROOT_HASH = 0


def chain_hash(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """The key of a full block: Python's hash of (parent hash, the block's tokens). Deterministic across
    processes (ints and tuples of ints are not randomized, unlike str), 64 bits."""
    return hash((parent_hash, token_ids))


@dataclass(eq=False)
class Entry:
    """One cached full block."""

    block_id: int
    block_hash: int
    parent_hash: int
    token_ids: tuple[int, ...]
    depth: int                 # blocks from the start of the sequence (1 = the first block)
    last_access: int = 0
    num_children: int = 0      # cached blocks whose parent this is: only childless entries are evicted


class PrefixHashCache(IdleBlockCount):
    """Cached full KV blocks keyed by a hash chain, over ``allocator`` (blocks of ``block_size`` tokens).

    ``hash_fn(parent_hash, token_ids) -> int`` defaults to ``chain_hash``; pass a weak one to watch collisions
    being caught."""

    def __init__(self, allocator: BlockAllocator, block_size: int, hash_fn=chain_hash):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.allocator, self.block_size, self.hash_fn = allocator, block_size, hash_fn
        self.table: dict[int, Entry] = {}           # block hash -> entry
        self.by_block: dict[int, Entry] = {}        # block id -> entry
        self.clock = 0
        self.num_collisions = 0                     # lookups whose key was taken by other tokens
        self._watch_counts(allocator)

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.by_block)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self.by_block

    def cached_block_ids(self):
        """The ids of the cached blocks."""
        return self.by_block.keys()

    def _lookup(self, parent_hash: int, key: tuple[int, ...]) -> tuple[int, Entry | None]:
        h = self.hash_fn(parent_hash, key)
        entry = self.table.get(h)
        if entry is not None and (entry.token_ids != key or entry.parent_hash != parent_hash):
            self.num_collisions += 1                # same hash, other prefix: a miss, never the wrong K/V
            entry = None
        return h, entry

    def match(self, token_ids) -> tuple[list[int], int]:
        """The longest cached prefix of ``token_ids`` in full blocks: (its block ids, its number of tokens)."""
        self.clock += 1
        h, blocks = ROOT_HASH, []
        for key in full_blocks(token_ids, self.block_size):
            h, entry = self._lookup(h, key)
            if entry is None:
                break
            entry.last_access = self.clock
            blocks.append(entry.block_id)
        return blocks, len(blocks) * self.block_size

    # ---------------------------------------------------------------- changes
    def insert(self, token_ids, blocks) -> list[int]:
        """Same contract as ``PrefixCache.insert``: cache the full blocks, return the cached block of each."""
        keys = full_blocks(token_ids, self.block_size)
        if len(blocks) < len(keys):
            raise ValueError(f"{len(keys)} full blocks of tokens but only {len(blocks)} block ids")
        self.clock += 1
        parent, cached = ROOT_HASH, []
        for depth, (key, block_id) in enumerate(zip(keys, blocks), start=1):
            h, entry = self._lookup(parent, key)
            if entry is None:
                if h in self.table:                 # a collision: this block cannot be cached (nor its descendants)
                    cached += list(blocks[depth - 1:len(keys)])
                    break
                if block_id in self.by_block:
                    raise ValueError(f"block {block_id} is already cached for other tokens (a stale block table?)")
                self.allocator.share(block_id)
                entry = Entry(block_id, h, parent, key, depth)
                self.table[h] = self.by_block[block_id] = entry
                self._num_idle += self.allocator.ref_counts[block_id] == 1
                if parent != ROOT_HASH:
                    self.table[parent].num_children += 1
            entry.last_access = self.clock
            cached.append(entry.block_id)
            parent = h
        return cached

    def evict(self, num_blocks: int) -> list[int]:
        """Same policy as ``PrefixCache.evict``: least recently used childless entries used by nobody else."""
        ref_counts = self.allocator.ref_counts
        heap = [(e.last_access, -e.depth, e.block_id) for e in self.by_block.values()
                if e.num_children == 0 and ref_counts[e.block_id] == 1]
        heapq.heapify(heap)
        freed = []
        while heap and len(freed) < num_blocks:
            _, _, block_id = heapq.heappop(heap)
            entry = self.by_block.pop(block_id)
            self._num_idle -= 1                     # it was idle (count 1); the free below is not ours
            del self.table[entry.block_hash]
            self.allocator.free(block_id)
            freed.append(block_id)
            if entry.parent_hash != ROOT_HASH:
                parent = self.table[entry.parent_hash]
                parent.num_children -= 1
                if parent.num_children == 0 and ref_counts[parent.block_id] == 1:
                    heapq.heappush(heap, (parent.last_access, -parent.depth, parent.block_id))
        return freed
