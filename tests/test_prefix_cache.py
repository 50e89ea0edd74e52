"""The prefix caches (tree and hash chain) and the prefix-caching block manager: unit tests, and hypothesis
property tests over random sequences of start / decode / fork / free / evict (reference counts conserved, no
block both free and cached, eviction never takes a block in use, every sequence reads back its own K/V, and
the tree and the hash chain agree block for block)."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from course_lib.paging.block_manager import BlockAllocator, OutOfBlocksError
from course_lib.serving.prefix_cache import PrefixCache, PrefixCachingBlockManager, full_blocks
from course_lib.serving.prefix_hash import PrefixHashCache

CACHES = [PrefixCache, PrefixHashCache]


# ---------------------------------------------------------------- unit tests
@pytest.mark.parametrize("cache_cls", CACHES)
def test_match_insert_and_ownership(cache_cls):
    a = BlockAllocator(8)
    cache = cache_cls(a, 2)
    seq = [a.allocate() for _ in range(3)]                            # a sequence's blocks 0, 1, 2
    assert cache.match([1, 2, 3, 4, 5]) == ([], 0)
    assert cache.insert([1, 2, 3, 4, 5], seq) == seq[:2]              # 2 full blocks; the partial one is not cached
    assert len(cache) == 2 and a.ref_counts[:3] == [2, 2, 1]          # the cache owns a reference to each
    assert cache.match([1, 2, 3, 4, 5, 6]) == (seq[:2], 4)
    assert cache.match([1, 2, 3, 9]) == (seq[:1], 2)                  # diverges in the second block
    assert cache.match([3, 4]) == ([], 0)                             # same tokens at another position: a miss
    assert cache.match([1]) == ([], 0)                                # no full block
    other = a.allocate()
    assert cache.insert([1, 2, 3, 4], [other, a.allocate()]) == seq[:2]   # already cached: the cache's blocks win
    assert a.ref_counts[other] == 1                                   # and it took no reference to the duplicates
    with pytest.raises(ValueError, match="only 1 block ids"):
        cache.insert([1, 2, 3, 4], [0])
    with pytest.raises(ValueError, match="already cached for other tokens"):
        cache.insert([7, 7], [seq[0]])
    for b in seq:
        a.free(b)
    assert cache.num_evictable_blocks == 2 and a.num_free_blocks == 8 - 2 - 2   # 2 cached, 2 duplicates still held


@pytest.mark.parametrize("cache_cls", CACHES)
def test_lru_eviction_takes_unused_leaves_only(cache_cls):
    a = BlockAllocator(10)
    cache = cache_cls(a, 1)
    def add(tokens):
        blocks = [a.allocate() for _ in tokens]
        cache.insert(tokens, blocks)
        return blocks
    b_abc, b_abd = add([1, 2, 3]), add([1, 2, 4])                     # shares blocks [1], [1, 2]
    assert len(cache) == 4
    for b in b_abc + b_abd:
        a.free(b)
    held = add([5, 6])                                                # in use by a running sequence
    cache.match([1, 2, 3])                                            # [1, 2, 3] is now more recent than [1, 2, 4]
    assert cache.evict(1) == [b_abd[2]]                               # the LRU leaf
    assert cache.evict(1) == [b_abc[2]]                               # next: the other leaf, never the inner node first
    assert cache.evict(10) == [b_abc[1], b_abc[0]]                    # then the path, leaf by leaf; held blocks stay
    assert len(cache) == 2 and all(b in cache for b in held) and cache.evict(5) == []
    assert a.num_free_blocks == 8


def test_the_hash_chain_catches_collisions():
    a = BlockAllocator(6)
    weak = PrefixHashCache(a, 2, hash_fn=lambda parent, tokens: sum(tokens) % 7)   # collides on purpose
    blocks = [a.allocate(), a.allocate()]
    assert weak.insert([1, 2, 3, 4], blocks) == blocks
    assert weak.match([2, 1]) == ([], 0) and weak.num_collisions >= 1   # same hash, other tokens: a miss
    assert weak.match([1, 2, 3, 4]) == (blocks, 4)
    mine = [a.allocate(), a.allocate()]
    assert weak.insert([2, 1, 9, 9], mine) == mine and len(weak) == 2    # cannot be cached: kept private


def test_full_blocks():
    assert full_blocks([1, 2, 3, 4, 5], 2) == [(1, 2), (3, 4)] and full_blocks([1], 2) == []


@pytest.mark.parametrize("cache_cls", CACHES)
def test_block_manager_reuses_merges_and_evicts(cache_cls):
    bm = PrefixCachingBlockManager(num_blocks=6, block_size=2, cache_cls=cache_cls)
    prompt = [1, 2, 3, 4, 5]
    assert bm.allocate_with_prefix(0, prompt[:-1], len(prompt)) == 0     # cold: nothing cached
    bm.cache_blocks(0, prompt)                                           # computed: blocks 0, 1 cached
    assert bm.allocate_with_prefix(1, prompt[:-1], len(prompt)) == 4     # warm: 4 tokens reused, 1 to compute
    assert bm.block_table(1)[:2] == bm.block_table(0)[:2] and bm.num_used_blocks == 4
    # an entirely cached prompt still computes its last token: the last full block is not reused ...
    assert bm.allocate_with_prefix(2, [1, 2, 3], 4) == 2
    own = bm.block_table(2)[1]
    bm.cache_blocks(2, [1, 2, 3, 4])                                     # ... and is merged when it is cached
    assert bm.block_table(2) == bm.block_table(0)[:2] and bm.num_merged_blocks == 1
    assert bm.allocator.ref_counts[own] == 0                             # the duplicate went back to the free list
    for seq in (0, 1, 2):
        bm.free(seq)
    assert len(bm.prefix_cache) == 2 and bm.num_free_blocks == 6         # cached but evictable: counted as free
    bm.allocate(3, 12)                                                   # needs every block: the cache is evicted
    assert len(bm.prefix_cache) == 0 and bm.num_free_blocks == 0
    with pytest.raises(OutOfBlocksError):
        bm.allocate_with_prefix(4, [1, 2], 3)


# ---------------------------------------------------------------- property tests
def check_invariants(bm: PrefixCachingBlockManager) -> None:
    a, cache = bm.allocator, bm.prefix_cache
    owners = Counter(b for table in bm.block_tables.values() for b in table)
    cached = {b for b in range(a.num_blocks) if b in cache}
    for b in range(a.num_blocks):                                    # ref counts == sequences + the cache
        assert a.ref_counts[b] == owners[b] + (b in cached), b
    free = list(a.free_block_ids)
    assert len(free) == len(set(free)), "a block is on the free list twice"
    assert not set(free) & cached, "a block is both free and cached"
    assert set(free) == {b for b in range(a.num_blocks) if a.ref_counts[b] == 0}
    assert cache.num_evictable_blocks == sum(1 for b in cached if owners[b] == 0)
    assert bm.num_free_blocks == len(free) + cache.num_evictable_blocks


# (operation, which live sequence, a length, a token choice)
OPS = st.lists(st.tuples(st.sampled_from(["start", "start", "decode", "decode", "fork", "free", "evict"]),
                         st.integers(0, 3), st.integers(0, 9), st.integers(0, 3)), min_size=1, max_size=30)
PREFIXES = [[], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9], [5, 5, 5, 5, 5, 5]]   # shared starts -> many hits


def run(ops, num_blocks, block_size, cache_cls):
    """Replays ops on a block manager, simulating the K/V writes: slot -> the prefix whose last token it holds.
    Returns the trace of (block tables, match lengths) for comparing the two caches."""
    bm = PrefixCachingBlockManager(num_blocks, block_size, cache_cls=cache_cls)
    memory: dict[int, tuple[int, ...]] = {}
    tokens: dict[int, list[int]] = {}            # seq -> its tokens (all computed)
    trace, next_id = [], 0

    def write(seq, start, end):
        for i, slot in zip(range(start, end), bm.slot_mapping(seq, start, end)):
            assert slot // block_size not in bm.prefix_cache, "a write into a cached (shared, full) block"
            memory[slot] = tuple(tokens[seq][:i + 1])

    for op, pick, n, choice in ops:
        live = sorted(bm.block_tables)
        seq = live[pick % len(live)] if live else None
        free_before, tables_before = bm.num_free_blocks, {s: bm.block_table(s) for s in live}
        try:
            if op == "start":
                prompt = PREFIXES[choice] + [choice + 10] * (n + 1)
                tokens[next_id] = prompt
                num_cached = bm.allocate_with_prefix(next_id, prompt[:-1], len(prompt))
                assert num_cached % block_size == 0 and num_cached < len(prompt)   # the last token is computed
                write(next_id, num_cached, len(prompt))
                bm.cache_blocks(next_id, prompt)
                next_id += 1
            elif op == "decode" and seq is not None:
                start = len(tokens[seq])
                slots, copies = bm.append_slots(seq, n)
                for src, dst in copies:                               # copy-on-write of a shared partial block
                    for off in range(block_size):
                        if src * block_size + off in memory:
                            memory[dst * block_size + off] = memory[src * block_size + off]
                tokens[seq] += [choice + 20] * n
                write(seq, start, start + n)
                bm.cache_blocks(seq, tokens[seq])
            elif op == "fork" and seq is not None:
                bm.fork(seq, next_id)
                tokens[next_id] = list(tokens[seq])
                next_id += 1
            elif op == "free" and seq is not None:
                bm.free(seq)
                del tokens[seq]
            elif op == "evict":
                freed = bm.prefix_cache.evict(n)
                assert not set(freed) & {b for t in bm.block_tables.values() for b in t}, "evicted a block in use"
        except OutOfBlocksError:
            assert bm.num_free_blocks == free_before and {s: bm.block_table(s) for s in tables_before} == tables_before
            tokens.pop(next_id, None)
        check_invariants(bm)
        for s, toks in tokens.items():                               # every sequence reads back its own K/V
            want = [tuple(toks[:i + 1]) for i in range(len(toks))]
            assert [memory.get(x) for x in bm.slot_mapping(s, 0, len(toks))] == want
            blocks, _ = bm.prefix_cache.match(toks)                  # its cached blocks are a path from the root
            assert blocks[:bm.num_cached_blocks[s]] == bm.block_table(s)[:bm.num_cached_blocks[s]]
        trace.append(({s: bm.block_table(s) for s in bm.block_tables},
                      [bm.prefix_cache.match(p + [0])[1] for p in PREFIXES]))
    for s in list(bm.block_tables):
        bm.free(s)
    evictable = bm.prefix_cache.num_evictable_blocks
    assert len(bm.prefix_cache.evict(num_blocks)) == evictable and bm.allocator.num_free_blocks == num_blocks
    return trace


@settings(max_examples=150, deadline=None)
@example(ops=[("start", 0, 3, 1), ("start", 0, 3, 1), ("free", 0, 0, 0), ("start", 0, 1, 1)],
         num_blocks=8, block_size=2)
@example(ops=[("start", 0, 0, 1), ("fork", 0, 0, 0), ("decode", 1, 3, 0), ("decode", 0, 3, 0)],
         num_blocks=12, block_size=4)
@given(ops=OPS, num_blocks=st.integers(2, 16), block_size=st.sampled_from([1, 2, 4]))
def test_random_operations_keep_the_books_and_the_variants_agree(ops, num_blocks, block_size):
    tree = run(ops, num_blocks, block_size, PrefixCache)
    chain = run(ops, num_blocks, block_size, PrefixHashCache)
    assert tree == chain          # same policy: same block tables and same match lengths at every step


class _CountingList(list):
    """A list that counts its item reads (to see whether a question scans the blocks)."""
    reads = 0

    def __getitem__(self, i):
        type(self).reads += 1
        return super().__getitem__(i)


@pytest.mark.parametrize("cache_cls", [PrefixCache, PrefixHashCache])
def test_counting_free_blocks_does_not_scan_the_cache(cache_cls):
    """The engine asks num_free_blocks for every sequence of every step: the answer must not read every cached
    block (a scan over ~17k cached blocks made an H100's decode steps host-bound, benchmarks/results/gpu_checks.md)."""
    bm = PrefixCachingBlockManager(4096, 2, cache_cls)
    for s in range(200):                                   # 200 sequences of 10 distinct full blocks each, cached
        tokens = [s * 1000 + i for i in range(20)]
        bm.allocate_with_prefix(s, tokens, 20)
        bm.cache_blocks(s, tokens)
    for s in range(0, 200, 2):                             # half of them finish: their blocks become idle
        bm.free(s)
    assert len(bm.prefix_cache) == 2000
    bm.allocator.ref_counts = _CountingList(bm.allocator.ref_counts)
    _CountingList.reads = 0
    free = bm.num_free_blocks
    assert _CountingList.reads <= 2, f"num_free_blocks read {_CountingList.reads} reference counts"
    assert free == bm.allocator.num_free_blocks + 1000 == bm.allocator.num_free_blocks + bm.prefix_cache.recount_idle()
