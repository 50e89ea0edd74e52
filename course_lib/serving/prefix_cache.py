"""Prefix caching (lesson 05): a tree of full KV blocks shared across requests.

Requests often start with the same tokens: a system prompt, a few-shot template, the history of a chat.
Their K/V are the same too (K/V of a token depend only on the tokens up to it), so an engine computes them
once and lets later requests *reuse the blocks*. Only **full** blocks are shared: a full block is never
written again (lesson 02), so sharing it needs no copy-on-write.

``PrefixCache`` is a tree (as in KsanaLLM's prefix cache; SGLang's radix tree is its token-level cousin):

* the root stands for the empty prefix; a node is one full block of P tokens, and its children are keyed by
  the **token ids of the next block** (a tuple of P ints). The path from the root to a node spells a prefix,
  so the same block of tokens after two different prefixes gives two different nodes (different K/V);
* ``match(token_ids)`` walks down the tree block by block: the longest cached prefix, as block ids;
* ``insert(token_ids, blocks)`` adds the full blocks of a sequence whose K/V are computed;
* the cache **owns** every block it holds: one reference count each in the ``BlockAllocator`` (lesson 02),
  on top of one per sequence using the block. A cached block nobody else uses has count 1: it stays in
  memory, ready for the next hit, until blocks run out;
* ``evict(num_blocks)`` then frees the **least recently used leaves** whose count is 1. Leaves only: an
  inner node is the prefix of its children, which would become unreachable. Used blocks (count > 1) are
  never evicted.

``course_lib.serving.prefix_hash.PrefixHashCache`` is the vLLM-style variant with the same interface (a hash chain
instead of a tree), and ``PrefixCachingBlockManager`` (below) plugs either into the block tables of lesson 02.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from course_lib.paging.block_manager import BlockAllocator, BlockManager, OutOfBlocksError


def full_blocks(token_ids, block_size: int) -> list[tuple[int, ...]]:
    """The full blocks of a token sequence as tuples (a partly filled last block is left out)."""
    n = len(token_ids) // block_size
    return [tuple(token_ids[i * block_size:(i + 1) * block_size]) for i in range(n)]


class IdleBlockCount:
    """Keeps a cache's number of **idle** blocks (cached, used by nobody else: reference count 1) up to date as
    the allocator's counts change, so that ``num_evictable_blocks`` costs O(1). The engine asks for it for every
    sequence of every step; a scan of every cached block per question made the host's share of a decode step at
    256 sequences longer than the GPU's (H100, qwen3-0.6b shape: ``benchmarks/results/gpu_checks.md``)."""

    def _watch_counts(self, allocator: BlockAllocator) -> None:
        self._num_idle = 0
        allocator.watchers.append(self._count_changed)

    def recount_idle(self) -> int:
        """Count the idle blocks from scratch (after cached blocks were added or removed by hand); returns it."""
        ref_counts = self.allocator.ref_counts
        self._num_idle = sum(1 for b in self.cached_block_ids() if ref_counts[b] == 1)
        return self._num_idle

    def _count_changed(self, block_id: int, old: int, new: int) -> None:
        if block_id in self:                         # a cached block gained or lost an owner
            self._num_idle += (new == 1) - (old == 1)

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks that only the cache uses (reference count 1). With every sequence holding a whole root
        path of cached blocks (as ``PrefixCachingBlockManager`` guarantees), all of them can be evicted, leaves
        first."""
        return self._num_idle


@dataclass(eq=False)
class Node:
    """One cached full block: its physical ``block_id``, its P ``token_ids``, and children keyed by theirs."""

    block_id: int                                  # -1 for the root (the empty prefix holds no block)
    token_ids: tuple[int, ...] = ()
    parent: Node | None = None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    last_access: int = 0                           # logical time of the last match or insert through it
    depth: int = 0                                 # blocks from the root: node at depth d holds tokens (d-1)P ... dP-1

    def __repr__(self) -> str:
        return f"Node(block {self.block_id}, depth {self.depth}, {len(self.children)} children)"


class PrefixCache(IdleBlockCount):
    """A tree of cached full KV blocks over ``allocator`` (blocks of ``block_size`` tokens)."""

    def __init__(self, allocator: BlockAllocator, block_size: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.allocator, self.block_size = allocator, block_size
        self.root = Node(-1)
        self.nodes: dict[int, Node] = {}            # block id -> its node
        self.clock = 0                              # logical time: +1 per match / insert
        self._watch_counts(allocator)

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self.nodes

    def cached_block_ids(self):
        """The ids of the cached blocks."""
        return self.nodes.keys()

    def match(self, token_ids) -> tuple[list[int], int]:
        """The longest cached prefix of ``token_ids`` in full blocks: (its block ids, its number of tokens).
        The matched blocks count as used now (LRU). Takes no reference: the caller shares what it keeps."""
        self.clock += 1
        node, blocks = self.root, []
        for key in full_blocks(token_ids, self.block_size):
            node = node.children.get(key)
            if node is None:
                break
            node.last_access = self.clock
            blocks.append(node.block_id)
        return blocks, len(blocks) * self.block_size

    # ---------------------------------------------------------------- changes
    def insert(self, token_ids, blocks) -> list[int]:
        """Cache the full blocks of a sequence: ``blocks[i]`` holds the K/V of tokens iP ... (i+1)P-1 of
        ``token_ids``. A block not yet in the tree becomes a node and the cache takes a reference to it. Where
        the tree already holds these tokens (in another block: two requests computed the same prefix), the
        tree's block stays. Returns the cached block of every full block: the caller may swap its duplicates
        for them and free its own copies (a merge)."""
        keys = full_blocks(token_ids, self.block_size)
        if len(blocks) < len(keys):
            raise ValueError(f"{len(keys)} full blocks of tokens but only {len(blocks)} block ids")
        self.clock += 1
        node, cached = self.root, []
        for key, block_id in zip(keys, blocks):
            child = node.children.get(key)
            if child is None:
                if block_id in self.nodes:
                    raise ValueError(f"block {block_id} is already cached for other tokens (a stale block table?)")
                self.allocator.share(block_id)              # the cache becomes one more owner of the block
                child = Node(block_id, key, node, depth=node.depth + 1)
                node.children[key] = child
                self.nodes[block_id] = child
                self._num_idle += self.allocator.ref_counts[block_id] == 1
            child.last_access = self.clock
            cached.append(child.block_id)
            node = child
        return cached

    def evict(self, num_blocks: int) -> list[int]:
        """Free up to ``num_blocks`` blocks that only the cache uses, least recently used leaf first (ties: the
        deepest, then the lowest block id). A parent whose last child goes becomes a leaf and a candidate.
        Returns the freed block ids, in eviction order."""
        ref_counts = self.allocator.ref_counts
        heap = [(n.last_access, -n.depth, n.block_id) for n in self.nodes.values()
                if not n.children and ref_counts[n.block_id] == 1]
        heapq.heapify(heap)
        freed = []
        while heap and len(freed) < num_blocks:
            _, _, block_id = heapq.heappop(heap)
            node = self.nodes.pop(block_id)
            self._num_idle -= 1                             # it was idle (count 1); the free below is not ours
            parent = node.parent
            del parent.children[node.token_ids]
            self.allocator.free(block_id)                   # the cache's reference: back on the free list
            freed.append(block_id)
            if parent is not self.root and not parent.children and ref_counts[parent.block_id] == 1:
                heapq.heappush(heap, (parent.last_access, -parent.depth, parent.block_id))
        return freed

    # ---------------------------------------------------------------- pictures
    def edges(self) -> list[tuple[int, int]]:
        """(parent block, child block) pairs, the root as -1: what a tree drawing needs."""
        return [(n.parent.block_id, n.block_id) for n in self.nodes.values()]


class PrefixCachingBlockManager(BlockManager):
    """Lesson 02's block tables with a prefix cache (``cache_cls``: ``PrefixCache`` or ``PrefixHashCache``).

    * ``allocate_with_prefix(seq_id, token_ids, num_tokens)`` starts a sequence on the longest cached prefix of
      ``token_ids`` (the matched blocks are shared, the rest allocated) and returns the number of cached tokens;
    * ``cache_blocks(seq_id, token_ids)`` inserts the sequence's full blocks once their K/V are computed, and
      merges a block that the cache already holds in another block (the duplicate is freed);
    * blocks run out -> the cache evicts; ``num_free_blocks`` counts evictable cached blocks as free.

    Invariant (checked by the property tests): the cached blocks of a sequence are a path from the root, so a
    block in use is never evicted and a cached block is never on the free list.
    """

    def __init__(self, num_blocks: int, block_size: int, cache_cls=PrefixCache):
        super().__init__(num_blocks, block_size)
        self.prefix_cache = cache_cls(self.allocator, block_size)
        self.num_cached_blocks: dict[int, int] = {}    # seq_id -> its leading blocks that are in the cache
        self.num_merged_blocks = 0                     # duplicates replaced by the cache's block
        self.num_evicted_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can get: on the free list, or cached and used by nobody (evicted on demand)."""
        return self.allocator.num_free_blocks + self.prefix_cache.num_evictable_blocks

    def num_blocks_to_allocate(self, token_ids, num_tokens: int) -> tuple[int, int]:
        """(new blocks needed, blocks available for them) to start a sequence of ``num_tokens`` slots on the
        cached prefix of ``token_ids``."""
        _, need, available = self._plan(token_ids, num_tokens)
        return need, available

    def can_allocate_with_prefix(self, token_ids, num_tokens: int) -> bool:
        _, need, available = self._plan(token_ids, num_tokens)
        return need <= available

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        need = self._blocks_to_append(seq_id, num_tokens)
        return need <= 0 or need <= self.num_free_blocks     # most decode steps need no block: no count at all

    def allocate_with_prefix(self, seq_id: int, token_ids, num_tokens: int) -> int:
        """Start sequence ``seq_id`` with ``num_tokens`` slots, its first blocks taken from the cache where
        ``token_ids`` (the tokens whose K/V may be reused) match. Returns the number of cached tokens."""
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        blocks, need, available = self._plan(token_ids, num_tokens)
        if need > available:
            raise OutOfBlocksError(f"sequence {seq_id} needs {need} new blocks for {num_tokens} tokens; "
                                   f"{available} are free or evictable")
        table = [self.allocator.share(b) for b in blocks]       # take the hits first, so that eviction spares them
        self._make_room(need)
        table += [self.allocator.allocate() for _ in range(need)]
        self.block_tables[seq_id], self.num_tokens[seq_id] = table, num_tokens
        self.num_cached_blocks[seq_id] = len(blocks)
        return min(len(blocks) * self.block_size, num_tokens)

    def cache_blocks(self, seq_id: int, token_ids) -> None:
        """Insert the full blocks of ``token_ids`` (the sequence's tokens whose K/V are computed) that are not in
        the cache yet; where the cache holds the same tokens in another block, switch to it (merge)."""
        n_full = min(len(token_ids) // self.block_size, len(self._table(seq_id)))
        done = self.num_cached_blocks.get(seq_id, 0)
        if n_full <= done:
            return
        table = self.block_tables[seq_id]
        cached = self.prefix_cache.insert(token_ids[:n_full * self.block_size], table[:n_full])
        for i in range(done, n_full):
            if cached[i] != table[i]:                   # the same tokens are cached in another block: merge
                self.allocator.share(cached[i])
                self.allocator.free(table[i])
                table[i] = cached[i]
                self.num_merged_blocks += 1
        self.num_cached_blocks[seq_id] = n_full

    def allocate(self, seq_id: int, num_tokens: int = 0) -> list[int]:
        self._make_room(self.num_blocks_for(num_tokens))
        table = super().allocate(seq_id, num_tokens)
        self.num_cached_blocks[seq_id] = 0
        return table

    def fork(self, parent_id: int, child_id: int) -> list[int]:
        table = super().fork(parent_id, child_id)
        self.num_cached_blocks[child_id] = self.num_cached_blocks.get(parent_id, 0)
        return table

    def free(self, seq_id: int) -> None:
        super().free(seq_id)                            # cached blocks keep the cache's reference
        self.num_cached_blocks.pop(seq_id, None)

    def free_tail(self, seq_id: int, num_blocks: int) -> list[int]:
        freed = super().free_tail(seq_id, num_blocks)   # cached blocks keep the cache's reference (evictable now)
        self.num_cached_blocks[seq_id] = min(self.num_cached_blocks.get(seq_id, 0), len(self.block_tables[seq_id]))
        return freed

    def _plan(self, token_ids, num_tokens: int) -> tuple[list[int], int, int]:
        """(cached blocks to reuse, new blocks needed, blocks available for them). A reused block that was
        evictable stops being available: it is not counted twice."""
        total = self.num_blocks_for(num_tokens)
        blocks = self.prefix_cache.match(token_ids)[0][:total]
        ref_counts = self.allocator.ref_counts
        reused_evictable = sum(1 for b in blocks if ref_counts[b] == 1)
        return blocks, total - len(blocks), self.num_free_blocks - reused_evictable

    def _make_room(self, need: int) -> None:
        """Evict idle cached blocks until ``need`` blocks are on the free list (or none is idle any more)."""
        short = need - self.allocator.num_free_blocks
        if short > 0:
            self.num_evicted_blocks += len(self.prefix_cache.evict(short))
