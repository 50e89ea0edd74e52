"""Lesson 02 checks: each passes the solution, scores a stub "not attempted", and catches broken variants
(wrong GQA head mapping, off-by-one in the last block, missing ref-count increment, ...)."""
from __future__ import annotations

import json

import pytest

from course_lib.grading import lesson02
from conftest import assert_caught, assert_not_attempted, edited, exercise, solution, stub

SOLVED = solution("02_paged_attention")
STUBS = exercise("02_paged_attention")


# ---------------------------------------------------------------- 1. allocator
class NoIncrement(SOLVED.Allocator):
    def share(self, b):       # missing ref-count increment
        return b


class FreesAtOnce(SOLVED.Allocator):
    def free(self, b):        # back on the free list at the first free, whatever the count
        if self.ref_counts[b] == 0:
            raise ValueError("double free")
        self.ref_counts[b] = 0
        self.free_block_ids.append(b)


class NoDoubleFreeCheck(SOLVED.Allocator):
    def free(self, b):
        self.ref_counts[b] -= 1
        if self.ref_counts[b] <= 0:
            self.free_block_ids.append(b)


class IndexErrorWhenFull(SOLVED.Allocator):
    def allocate(self):
        b = self.free_block_ids.popleft()
        self.ref_counts[b] = 1
        return b


def test_allocator_check():
    assert lesson02.check_allocator(SOLVED.Allocator).status == "passed"
    assert_not_attempted(lesson02.check_allocator(STUBS.Allocator))
    assert_caught(lesson02.check_allocator(NoIncrement), "share() adds one owner")
    assert_caught(lesson02.check_allocator(FreesAtOnce), "free() removes one owner")
    assert_caught(lesson02.check_allocator(NoDoubleFreeCheck), "double free")
    assert_caught(lesson02.check_allocator(IndexErrorWhenFull), "OutOfBlocksError")


# ---------------------------------------------------------------- 2. slot mapping
def test_slot_mapping_check():
    assert lesson02.check_slot_mapping(SOLVED.slot_mapping).status == "passed"
    assert_not_attempted(lesson02.check_slot_mapping(stub))
    assert_caught(lesson02.check_slot_mapping(lambda t, s, e, P: [t[i // P] + i % P for i in range(s, e)]),
                  "multiply it by block_size")
    assert_caught(lesson02.check_slot_mapping(lambda t, s, e, P: list(range(s, e))), "look the block up")
    assert_caught(lesson02.check_slot_mapping(lambda t, s, e, P: [t[i // P] * P + i % P for i in range(s, e + 1)]))


# ---------------------------------------------------------------- 3. append_slot
FULL = "if num_tokens == len(block_table) * block_size:"
append_slot_off_by_one = edited(SOLVED.append_slot, {          # grows one token late
    FULL: "if num_tokens > len(block_table) * block_size or not block_table:",
    "return block_table[num_tokens // block_size]":
    "return block_table[min(num_tokens // block_size, len(block_table) - 1)]"})
append_slot_always = edited(SOLVED.append_slot, {FULL: "if True:"})


def test_append_slot_check():
    assert lesson02.check_append_slot(SOLVED.append_slot).status == "passed"
    assert_not_attempted(lesson02.check_append_slot(stub))
    assert_caught(lesson02.check_append_slot(append_slot_off_by_one), "exactly when the last one is full")
    assert_caught(lesson02.check_append_slot(append_slot_always), "allocate only when the token does not fit")


# ---------------------------------------------------------------- 4. fork + copy-on-write
def fork_no_incref(allocator, block_table):     # the missing ref-count increment
    return list(block_table)


def cow_never(allocator, block_table, num_tokens, block_size):
    return SOLVED.append_slot(allocator, block_table, num_tokens, block_size), None


cow_also_full_blocks = edited(SOLVED.append_slot_cow, {     # copies full shared blocks too
    "if num_tokens % block_size != 0 and allocator": "if block_table and allocator"})
cow_no_decref = edited(SOLVED.append_slot_cow, {"        allocator.free(shared)\n": ""})


def test_fork_cow_check():
    fork, append_slot_cow = SOLVED.fork, SOLVED.append_slot_cow
    assert lesson02.check_fork_cow(fork, append_slot_cow).status == "passed"
    assert_not_attempted(lesson02.check_fork_cow(stub, append_slot_cow))
    assert_not_attempted(lesson02.check_fork_cow(fork, stub))
    assert_caught(lesson02.check_fork_cow(fork_no_incref, append_slot_cow), "must call allocator.share(b)")
    assert_caught(lesson02.check_fork_cow(lambda a, t: t, append_slot_cow), "return a new list")
    assert_caught(lesson02.check_fork_cow(fork, cow_never), "allocate a new block")
    assert_caught(lesson02.check_fork_cow(fork, cow_also_full_blocks), "a full shared block is never written")
    assert_caught(lesson02.check_fork_cow(fork, cow_no_decref), "ref count")


# ---------------------------------------------------------------- 5. the kernel
def test_paged_attention_kernel_check():
    kernel = SOLVED._paged_attention_kernel
    assert lesson02.check_paged_attention_kernel(kernel).status == "passed"
    assert_not_attempted(lesson02.check_paged_attention_kernel(STUBS._paged_attention_kernel))
    wrong_gqa = edited(kernel, {"kv_head = head // QUERIES_PER_KV": "kv_head = head % NUM_KV_HEADS"})
    assert_caught(lesson02.check_paged_attention_kernel(wrong_gqa), "kv_head = head // QUERIES_PER_KV")
    truncate = edited(kernel, {"tl.cdiv(context_len, BLOCK_SIZE)": "context_len // BLOCK_SIZE"})  # drops the last block
    assert_caught(lesson02.check_paged_attention_kernel(truncate), "the last, partly filled block")
    assert_caught(lesson02.check_paged_attention_kernel(lambda *a: None), "@triton.jit")


# ---------------------------------------------------------------- the benchmark script runs (CPU smoke mode)
@pytest.mark.command
def test_benchmark_script_quick(tmp_path):
    from benchmarks import paged_attention as bench

    out = tmp_path / "r.json"
    result = bench.main(["--quick", "--splits", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for key in ("device", "date", "git_commit", "cpu_model", "driver", "torch", "triton", "correctness", "bandwidth",
                "split_k"):
        assert key in result
    assert all(c["max_abs_error"] <= c["tolerance"] for c in result["correctness"])
    # the split sweep: every (BLOCK_N, num_splits) with at least one tile per split, timed against SDPA
    sweep = result["split_sweep"]
    assert {(r["BLOCK_N"], r["num_splits"]) for r in sweep if r["B"] == 1} == {(16, 1), (16, 2), (16, 4), (32, 1),
                                                                                (32, 2), (64, 1)}
    assert all(r["max_abs_error"] < 1e-2 and r["seconds"] > 0 and r["sdpa_seconds"] > 0 for r in sweep)


# ---------------------------------------------------------------- more mistakes a learner makes (issue 23)
class ReleasesAtEveryFree(SOLVED.Allocator):
    def free(self, b):        # decrements, but puts the block back on the free list at every free
        if self.ref_counts[b] == 0:
            raise ValueError("double free")
        self.ref_counts[b] -= 1
        self.free_block_ids.append(b)


class ShareReturnsNothing(SOLVED.Allocator):
    def share(self, b):       # counts the owner but returns None: fork's [allocator.share(b) ...] breaks
        self.ref_counts[b] += 1


class FreeResetsCount(SOLVED.Allocator):
    def free(self, b):        # count set to 0 whatever the owners, block released only when it was 1
        if self.ref_counts[b] == 0:
            raise ValueError("double free")
        if self.ref_counts[b] == 1:
            self.free_block_ids.append(b)
        self.ref_counts[b] = max(0, self.ref_counts[b] - 2)


class AllocateCountsTwo(SOLVED.Allocator):
    def allocate(self):
        b = super().allocate()
        self.ref_counts[b] += 1
        return b


def test_allocator_check_catches_and_blames_the_operation():
    released = lesson02.check_allocator(ReleasesAtEveryFree)
    assert_caught(released, "free() must decrement the count and release the block only when it reaches 0")
    assert "the last operations" in released.message and "free(" in released.message   # the history that led there
    assert_caught(lesson02.check_allocator(ShareReturnsNothing), "returns the id")
    assert_caught(lesson02.check_allocator(FreeResetsCount), "free()")
    assert_caught(lesson02.check_allocator(AllocateCountsTwo), "exactly one owner")


def test_slot_mapping_check_catches():
    assert_caught(lesson02.check_slot_mapping(lambda t, s, e, P: [t[i // P] * P + i % P for i in range(e - s)]),
                  "range(start, end)")
    assert_caught(lesson02.check_slot_mapping(lambda t, s, e, P: [t[i % P] * P + i // P for i in range(s, e)]))
    assert_caught(lesson02.check_slot_mapping(lambda t, s, e, P: [t[i // P] * P + i % P for i in range(s + 1, e)]))


def append_slot_new_list(allocator, block_table, num_tokens, block_size):   # builds a new list: the caller's is lost
    if num_tokens == len(block_table) * block_size:
        block_table = block_table + [allocator.allocate()]
    return block_table[num_tokens // block_size] * block_size + num_tokens % block_size


append_slot_early = edited(SOLVED.append_slot, {FULL: "if num_tokens + 1 >= len(block_table) * block_size:"})
append_slot_returns_block = edited(SOLVED.append_slot, {
    "return block_table[num_tokens // block_size] * block_size + num_tokens % block_size":
    "return block_table[num_tokens // block_size]"})


def test_append_slot_check_catches():
    assert_caught(lesson02.check_append_slot(append_slot_new_list), "in place")
    assert_caught(lesson02.check_append_slot(append_slot_early), "allocate only when the token does not fit")
    assert_caught(lesson02.check_append_slot(append_slot_returns_block), "the slot of the new token")


cow_swapped_copy = edited(SOLVED.append_slot_cow, {"copy = (shared, block_table[-1])":
                                                   "copy = (block_table[-1], shared)"})
cow_frees_new = edited(SOLVED.append_slot_cow, {"allocator.free(shared)": "allocator.free(block_table[-1])"})
cow_when_owned = edited(SOLVED.append_slot_cow, {"allocator.ref_counts[block_table[-1]] > 1":
                                                 "allocator.ref_counts[block_table[-1]] > 0"})


def test_fork_cow_check_catches():
    fork = SOLVED.fork
    assert_caught(lesson02.check_fork_cow(fork, cow_swapped_copy), "(old, new)")
    assert_caught(lesson02.check_fork_cow(fork, cow_frees_new), "hint:")
    assert_caught(lesson02.check_fork_cow(fork, cow_when_owned), "a block you own alone")
    assert_caught(lesson02.check_fork_cow(lambda a, t: [a.allocate() for _ in t], SOLVED.append_slot_cow),
                  "hint:")                                     # new blocks instead of shared ones


def test_paged_attention_kernel_check_catches():
    kernel = SOLVED._paged_attention_kernel
    no_max = edited(kernel, {"p = tl.exp(s - m_new)": "p = tl.exp(s)", "alpha = tl.exp(m_i - m_new)": "alpha = 1.0"})
    assert_caught(lesson02.check_paged_attention_kernel(no_max), "Subtract the running max")
    m_zero = edited(kernel, {'m_i = tl.zeros([1], dtype=tl.float32) - float("inf")':
                             "m_i = tl.zeros([1], dtype=tl.float32)"})
    assert_caught(lesson02.check_paged_attention_kernel(m_zero), "start the running max m at -inf")
    no_score_mask = edited(kernel, {'        s = tl.where(mask, s, float("-inf"))\n': ""})   # padding keys weigh exp(0)
    assert_caught(lesson02.check_paged_attention_kernel(no_score_mask), "hint:")
    no_acc_rescale = edited(kernel, {"acc = acc * alpha + ": "acc = acc + "})
    assert_caught(lesson02.check_paged_attention_kernel(no_acc_rescale), "hint:")
    no_scale = edited(kernel, {" * sm_scale          # [P] scores": "          # [P] scores"})
    assert_caught(lesson02.check_paged_attention_kernel(no_scale), "hint:")
    query_head_for_kv = edited(kernel, {   # GQA forgotten in the cache rows: kv head = query head
        "* NUM_KV_HEADS + kv_head     # [P]": "* NUM_KV_HEADS + head     # [P]"})
    assert_caught(lesson02.check_paged_attention_kernel(query_head_for_kv), "hint:")
    out_unscaled_row = edited(kernel, {"tl.store(out_ptr + (seq * num_heads + head) * HEAD_DIM":
                                       "tl.store(out_ptr + (seq * num_heads + head) * HEAD_DIM * NUM_KV_HEADS"})
    assert_caught(lesson02.check_paged_attention_kernel(out_unscaled_row), "wrote outside `out` (row 4, offset 0)")


# ---------------------------------------------------------------- end to end: the pieces decode the tiny model
class HandsOutAUsedBlock(SOLVED.Allocator):
    def allocate(self):       # reads the free list without taking the block off it
        b = self.free_block_ids[0]
        self.ref_counts[b] = 1
        return b


def slot_mapping_boundary(t, s, e, P):      # the first token of every block but the first lands in the block before
    return [t[max(i - 1, 0) // P] * P + i % P for i in range(s, e)]


def test_end_to_end_check():
    pieces = (SOLVED.Allocator, SOLVED.slot_mapping, SOLVED.append_slot, SOLVED._paged_attention_kernel)
    assert lesson02.check_end_to_end(*pieces).status == "passed"
    assert_not_attempted(lesson02.check_end_to_end(STUBS.Allocator, stub, stub, STUBS._paged_attention_kernel))
    assert_not_attempted(lesson02.check_end_to_end(*pieces[:3], STUBS._paged_attention_kernel))
    assert_not_attempted(lesson02.check_end_to_end(pieces[0], stub, *pieces[2:]))


def test_end_to_end_check_names_the_broken_piece():
    allocator, slots, append, kernel = SOLVED.Allocator, SOLVED.slot_mapping, SOLVED.append_slot, \
        SOLVED._paged_attention_kernel
    assert_caught(lesson02.check_end_to_end(HandsOutAUsedBlock, slots, append, kernel),
                  "Allocator.allocate() handed out block")
    assert_caught(lesson02.check_end_to_end(allocator, slot_mapping_boundary, append, kernel),
                  "your slot_mapping alone already changes the tokens")
    assert_caught(lesson02.check_end_to_end(allocator, slots, append_slot_off_by_one, kernel),
                  "append a new block exactly when the last one is full")
    assert_caught(lesson02.check_end_to_end(allocator, slots, append_slot_returns_block, kernel),
                  "your append_slot alone already changes the tokens")
    truncate = edited(kernel, {"tl.cdiv(context_len, BLOCK_SIZE)": "context_len // BLOCK_SIZE"})  # drops the last block
    assert_caught(lesson02.check_end_to_end(allocator, slots, append, truncate), "with your _paged_attention_kernel")
    wrong_gqa = edited(kernel, {"kv_head = head // QUERIES_PER_KV": "kv_head = head % NUM_KV_HEADS"})
    assert_caught(lesson02.check_end_to_end(allocator, slots, append, wrong_gqa), "with your _paged_attention_kernel")
