"""The block allocator and block manager: unit tests, and hypothesis property tests over random sequences of
allocate / append / fork / free (no block leaked or freed twice, ref counts == owners, copy-on-write)."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from course_lib.paging.block_manager import BlockAllocator, BlockManager, OutOfBlocksError


# ---------------------------------------------------------------- unit tests
def test_allocator_free_list_and_ref_counts():
    a = BlockAllocator(3)
    ids = [a.allocate() for _ in range(3)]
    assert sorted(ids) == [0, 1, 2] and a.num_free_blocks == 0 and a.ref_counts == [1, 1, 1]
    with pytest.raises(OutOfBlocksError, match="all 3 KV blocks are in use"):
        a.allocate()
    a.share(ids[0])
    a.free(ids[0])
    assert a.ref_counts[ids[0]] == 1 and a.num_free_blocks == 0      # still owned once
    a.free(ids[0])
    assert a.num_free_blocks == 1 and a.allocate() == ids[0]          # back on the free list, reused
    a.free(ids[1])
    with pytest.raises(ValueError, match="double free"):
        a.free(ids[1])
    with pytest.raises(ValueError, match="it is free"):
        a.share(ids[1])
    with pytest.raises(ValueError, match="ids are 0 ... 2"):
        a.free(7)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)


def test_block_table_and_slot_mapping():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate(0, 6) == [0, 1]                                # 6 tokens: 2 blocks of 4
    assert bm.slot_mapping(0, 0, 6) == [0, 1, 2, 3, 4, 5]
    bm.allocate(1, 3)                                                 # block 2
    slots, copies = bm.append_slots(0, 3)                             # tokens 6, 7 in block 1; token 8 in block 3
    assert slots == [6, 7, 12] and copies == [] and bm.block_table(0) == [0, 1, 3]
    assert bm.num_tokens[0] == 9 and bm.num_used_blocks == 4
    with pytest.raises(ValueError, match="outside"):
        bm.slot_mapping(0, 0, 10)
    with pytest.raises(KeyError, match="unknown sequence 5"):
        bm.append_slots(5)
    with pytest.raises(ValueError, match="already has a block table"):
        bm.allocate(0, 1)


def test_out_of_blocks_is_signalled_and_leaves_no_trace():
    bm = BlockManager(num_blocks=3, block_size=2)
    bm.allocate(0, 4)
    assert not bm.can_allocate(3) and bm.can_allocate(2)
    with pytest.raises(OutOfBlocksError, match="needs 2 blocks for 3 tokens; 1 of 3 are free"):
        bm.allocate(1, 3)
    assert 1 not in bm.block_tables and bm.num_free_blocks == 1
    assert bm.can_append(0, 2) and not bm.can_append(0, 3)
    with pytest.raises(OutOfBlocksError):
        bm.append_slots(0, 3)
    assert bm.num_tokens[0] == 4 and bm.block_table(0) == [0, 1] and bm.num_free_blocks == 1


def test_fork_shares_and_copy_on_write_copies_only_the_written_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.allocate(0, 6)                                                 # [0, 1], block 1 half full
    assert bm.fork(0, 1) == [0, 1] and bm.allocator.ref_counts[:2] == [2, 2] and bm.num_used_blocks == 2
    slots, copies = bm.append_slots(1)                                # child writes token 6 into shared block 1
    assert copies == [(1, 2)] and bm.block_table(1) == [0, 2] and slots == [2 * 4 + 2]
    assert bm.allocator.ref_counts[:3] == [2, 1, 1]
    slots, copies = bm.append_slots(0)                                # parent now owns block 1 alone: no copy
    assert copies == [] and slots == [6] and bm.block_table(0) == [0, 1]


def test_full_shared_blocks_are_never_copied():
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.allocate(0, 8)                                                 # two full blocks
    bm.fork(0, 1)
    for seq in (0, 1):
        slots, copies = bm.append_slots(seq)
        assert copies == [] and slots[0] // 4 not in (0, 1)          # a fresh block each, prefix still shared
    assert bm.allocator.ref_counts[0] == bm.allocator.ref_counts[1] == 2 and bm.num_used_blocks == 4
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 10 and set(bm.allocator.ref_counts) == {0}


# ---------------------------------------------------------------- property tests
def check_invariants(bm: BlockManager) -> None:
    a = bm.allocator
    owners = Counter(b for table in bm.block_tables.values() for b in table)
    for block_id in range(a.num_blocks):                             # ref counts == number of owners
        assert a.ref_counts[block_id] == owners[block_id], block_id
    free = list(a.free_block_ids)
    assert len(free) == len(set(free)), "a block is on the free list twice"
    assert set(free) == {b for b in range(a.num_blocks) if owners[b] == 0}, "leaked or still-owned free block"
    for seq, table in bm.block_tables.items():                       # tables are exactly as long as needed
        assert len(table) == bm.num_blocks_for(bm.num_tokens[seq])


# (operation, which live sequence, number of tokens); appends and forks are drawn more often than frees
OPS = st.lists(st.tuples(st.sampled_from(["allocate", "append", "append", "fork", "fork", "free"]),
                         st.integers(0, 3), st.integers(0, 6)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@example(ops=[("allocate", 0, 3), ("fork", 0, 0), ("append", 1, 1), ("append", 0, 1)], num_blocks=5, block_size=4)
@given(ops=OPS, num_blocks=st.integers(2, 16), block_size=st.sampled_from([1, 2, 3, 4, 8]))
def test_random_operations_keep_the_books_and_copy_on_write_isolates_sequences(ops, num_blocks, block_size):
    """Simulates a real cache: each token id is written into its slot. Whatever the order of operations,
    every sequence reads back its own tokens through its block table (writes never leak between sequences)."""
    bm = BlockManager(num_blocks, block_size)
    memory: dict[int, int] = {}      # physical slot -> token value written there
    expected: dict[int, list[int]] = {}
    next_id, next_token = 0, 0
    for op, pick, n in ops:
        live = sorted(bm.block_tables)
        seq = live[pick % len(live)] if live else None
        free_before = bm.num_free_blocks
        try:
            if op == "allocate":
                slots = bm.slot_mapping(next_id, 0, n) if bm.allocate(next_id, n) is not None else []
                expected[next_id] = list(range(next_token, next_token + n))
                memory.update(zip(slots, expected[next_id]))
                next_id, next_token = next_id + 1, next_token + n
            elif op == "append" and seq is not None:
                can = bm.can_append(seq, n)
                slots, copies = bm.append_slots(seq, n)
                assert can and len(copies) <= 1
                for src, dst in copies:                               # the cache copies the block's slots
                    for off in range(block_size):
                        if src * block_size + off in memory:
                            memory[dst * block_size + off] = memory[src * block_size + off]
                tokens = list(range(next_token, next_token + n))
                next_token += n
                memory.update(zip(slots, tokens))
                expected[seq] += tokens
            elif op == "fork" and seq is not None:
                assert bm.fork(seq, next_id) == bm.block_table(seq)
                assert bm.num_free_blocks == free_before               # a fork allocates nothing
                expected[next_id] = list(expected[seq])
                next_id += 1
            elif op == "free" and seq is not None:
                bm.free(seq)
                del expected[seq]
        except OutOfBlocksError:
            assert bm.num_free_blocks == free_before                  # a refused request changes nothing
            if op == "append":
                assert not bm.can_append(seq, n)
        check_invariants(bm)
        for s, tokens in expected.items():
            assert [memory.get(x) for x in bm.slot_mapping(s, 0, bm.num_tokens[s])] == tokens, s
    for s in list(bm.block_tables):
        bm.free(s)
    assert bm.num_free_blocks == num_blocks and set(bm.allocator.ref_counts) == {0}


def test_reserved_slots_follow_the_vllm_paper_layouts():
    """Orca (Pow2) keeps the prompt and rounds the output up to a power of two (an output of 25 gets 32 slots)."""
    import numpy as np

    from course_lib.paging.waste import reserved_slots, waste_fraction

    prompt, output = np.array([100, 7]), np.array([25, 1])
    assert reserved_slots(prompt, output, "pow2").tolist() == [132, 8]
    assert reserved_slots(prompt, output, "oracle").tolist() == [125, 8]
    assert reserved_slots(prompt, output, "max", max_len=2048).tolist() == [2048, 2048]
    assert reserved_slots(prompt, output, "paged", block_size=16).tolist() == [128, 16]
    assert waste_fraction(prompt, output, "oracle") == 0.0
    assert abs(waste_fraction(prompt, output, "pow2") - (1 - 133 / 140)) < 1e-12
