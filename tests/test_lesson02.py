"""Lesson 02 checks: each passes the solution, scores a stub "not attempted", and catches broken variants
(wrong GQA head mapping, off-by-one in the last block, missing ref-count increment, ...)."""
from __future__ import annotations

import importlib.util
import json
from collections import deque
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import triton
import triton.language as tl

from course_lib.paging.block_manager import OutOfBlocksError
from course_lib.grading import lesson02

ROOT = Path(__file__).resolve().parents[1]


def _stub(*args):
    raise NotImplementedError("Exercise: write this function")


def _assert_caught(result, hint_part=None):
    assert (result.status, result.points) == ("failed", 0), result
    assert "hint:" in result.message or "your code raised" in result.message
    if hint_part:
        assert hint_part in result.message, result.message


# ---------------------------------------------------------------- 1. allocator
class Allocator:
    def __init__(self, num_blocks):
        self.free_block_ids = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    def allocate(self):
        if not self.free_block_ids:
            raise OutOfBlocksError("no free block")
        b = self.free_block_ids.popleft()
        self.ref_counts[b] = 1
        return b

    def share(self, b):
        self.ref_counts[b] += 1
        return b

    def free(self, b):
        if self.ref_counts[b] == 0:
            raise ValueError("double free")
        self.ref_counts[b] -= 1
        if self.ref_counts[b] == 0:
            self.free_block_ids.append(b)


class NoIncrement(Allocator):
    def share(self, b):       # missing ref-count increment
        return b


class FreesAtOnce(Allocator):
    def free(self, b):        # back on the free list at the first free, whatever the count
        if self.ref_counts[b] == 0:
            raise ValueError("double free")
        self.ref_counts[b] = 0
        self.free_block_ids.append(b)


class NoDoubleFreeCheck(Allocator):
    def free(self, b):
        self.ref_counts[b] -= 1
        if self.ref_counts[b] <= 0:
            self.free_block_ids.append(b)


class IndexErrorWhenFull(Allocator):
    def allocate(self):
        b = self.free_block_ids.popleft()
        self.ref_counts[b] = 1
        return b


class StubAllocator:
    def __init__(self, num_blocks):
        raise NotImplementedError("Exercise: write the allocator")


def test_allocator_check():
    assert lesson02.check_allocator(Allocator).status == "passed"
    assert lesson02.check_allocator(StubAllocator).status == "not attempted"
    _assert_caught(lesson02.check_allocator(NoIncrement), "share() adds one owner")
    _assert_caught(lesson02.check_allocator(FreesAtOnce), "free() removes one owner")
    _assert_caught(lesson02.check_allocator(NoDoubleFreeCheck), "double free")
    _assert_caught(lesson02.check_allocator(IndexErrorWhenFull), "OutOfBlocksError")


# ---------------------------------------------------------------- 2. slot mapping
def slot_mapping(block_table, start, end, block_size):
    return [block_table[i // block_size] * block_size + i % block_size for i in range(start, end)]


def test_slot_mapping_check():
    assert lesson02.check_slot_mapping(slot_mapping).status == "passed"
    assert lesson02.check_slot_mapping(_stub).status == "not attempted"
    _assert_caught(lesson02.check_slot_mapping(lambda t, s, e, P: [t[i // P] + i % P for i in range(s, e)]),
                   "multiply it by block_size")
    _assert_caught(lesson02.check_slot_mapping(lambda t, s, e, P: list(range(s, e))), "look the block up")
    _assert_caught(lesson02.check_slot_mapping(lambda t, s, e, P: [t[i // P] * P + i % P for i in range(s, e + 1)]))


# ---------------------------------------------------------------- 3. append_slot
def append_slot(allocator, block_table, num_tokens, block_size):
    if num_tokens == len(block_table) * block_size:
        block_table.append(allocator.allocate())
    return block_table[num_tokens // block_size] * block_size + num_tokens % block_size


def append_slot_off_by_one(allocator, block_table, num_tokens, block_size):
    if num_tokens > len(block_table) * block_size or not block_table:   # grows one token late
        block_table.append(allocator.allocate())
    i = min(num_tokens // block_size, len(block_table) - 1)
    return block_table[i] * block_size + num_tokens % block_size


def append_slot_always(allocator, block_table, num_tokens, block_size):
    block_table.append(allocator.allocate())
    return block_table[num_tokens // block_size] * block_size + num_tokens % block_size


def test_append_slot_check():
    assert lesson02.check_append_slot(append_slot).status == "passed"
    assert lesson02.check_append_slot(_stub).status == "not attempted"
    _assert_caught(lesson02.check_append_slot(append_slot_off_by_one), "exactly when the last one is full")
    _assert_caught(lesson02.check_append_slot(append_slot_always), "allocate only when the token does not fit")


# ---------------------------------------------------------------- 4. fork + copy-on-write
def fork(allocator, block_table):
    return [allocator.share(b) for b in block_table]


def append_slot_cow(allocator, block_table, num_tokens, block_size):
    copy = None
    if num_tokens % block_size != 0 and allocator.ref_counts[block_table[-1]] > 1:
        old = block_table[-1]
        block_table[-1] = allocator.allocate()
        allocator.free(old)
        copy = (old, block_table[-1])
    return append_slot(allocator, block_table, num_tokens, block_size), copy


def fork_no_incref(allocator, block_table):     # the missing ref-count increment
    return list(block_table)


def cow_never(allocator, block_table, num_tokens, block_size):
    return append_slot(allocator, block_table, num_tokens, block_size), None


def cow_also_full_blocks(allocator, block_table, num_tokens, block_size):
    copy = None
    if block_table and allocator.ref_counts[block_table[-1]] > 1:       # copies full blocks too
        old = block_table[-1]
        block_table[-1] = allocator.allocate()
        allocator.free(old)
        copy = (old, block_table[-1])
    return append_slot(allocator, block_table, num_tokens, block_size), copy


def cow_no_decref(allocator, block_table, num_tokens, block_size):
    copy = None
    if num_tokens % block_size != 0 and allocator.ref_counts[block_table[-1]] > 1:
        old = block_table[-1]
        block_table[-1] = allocator.allocate()
        copy = (old, block_table[-1])
    return append_slot(allocator, block_table, num_tokens, block_size), copy


def test_fork_cow_check():
    assert lesson02.check_fork_cow(fork, append_slot_cow).status == "passed"
    assert lesson02.check_fork_cow(_stub, append_slot_cow).status == "not attempted"
    assert lesson02.check_fork_cow(fork, _stub).status == "not attempted"
    _assert_caught(lesson02.check_fork_cow(fork_no_incref, append_slot_cow), "must call allocator.share(b)")
    _assert_caught(lesson02.check_fork_cow(lambda a, t: t, append_slot_cow), "return a new list")
    _assert_caught(lesson02.check_fork_cow(fork, cow_never), "allocate a new block")
    _assert_caught(lesson02.check_fork_cow(fork, cow_also_full_blocks), "a full shared block is never written")
    _assert_caught(lesson02.check_fork_cow(fork, cow_no_decref), "ref count")


# ---------------------------------------------------------------- 5. the kernel
@triton.jit
def _good(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, sm_scale, max_blocks_per_seq,
          NUM_KV_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // QUERIES_PER_KV
    num_heads = NUM_KV_HEADS * QUERIES_PER_KV
    context_len = tl.load(context_lens_ptr + seq)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_p = tl.arange(0, BLOCK_SIZE)
    q = tl.load(q_ptr + (seq * num_heads + head) * HEAD_DIM + offs_d).to(tl.float32)
    m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for j in range(0, tl.cdiv(context_len, BLOCK_SIZE)):
        block_id = tl.load(block_tables_ptr + seq * max_blocks_per_seq + j)
        mask = j * BLOCK_SIZE + offs_p < context_len
        rows = (block_id * BLOCK_SIZE + offs_p) * NUM_KV_HEADS + kv_head
        k = tl.load(k_cache_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0.0)
        s = tl.where(mask, tl.sum(k.to(tl.float32) * q[None, :], axis=1) * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(v_cache_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    tl.store(out_ptr + (seq * num_heads + head) * HEAD_DIM + offs_d, acc / l_i)


@triton.jit
def _broken(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, sm_scale, max_blocks_per_seq,
            NUM_KV_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
            WRONG_GQA: tl.constexpr, TRUNCATE: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    if WRONG_GQA:
        kv_head = head % NUM_KV_HEADS
    else:
        kv_head = head // QUERIES_PER_KV
    num_heads = NUM_KV_HEADS * QUERIES_PER_KV
    context_len = tl.load(context_lens_ptr + seq)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_p = tl.arange(0, BLOCK_SIZE)
    q = tl.load(q_ptr + (seq * num_heads + head) * HEAD_DIM + offs_d).to(tl.float32)
    m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    if TRUNCATE:
        num_blocks = context_len // BLOCK_SIZE      # off by one: drops the partly filled last block
    else:
        num_blocks = tl.cdiv(context_len, BLOCK_SIZE)
    for j in range(0, num_blocks):
        block_id = tl.load(block_tables_ptr + seq * max_blocks_per_seq + j)
        mask = j * BLOCK_SIZE + offs_p < context_len
        rows = (block_id * BLOCK_SIZE + offs_p) * NUM_KV_HEADS + kv_head
        k = tl.load(k_cache_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0.0)
        s = tl.where(mask, tl.sum(k.to(tl.float32) * q[None, :], axis=1) * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(v_cache_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    tl.store(out_ptr + (seq * num_heads + head) * HEAD_DIM + offs_d, acc / l_i)


class _Variant:
    """_broken with one of the classic mistakes switched on (launched like any kernel: variant[grid](...))."""

    def __init__(self, **mistakes):
        self.mistakes = {"WRONG_GQA": False, "TRUNCATE": False, **mistakes}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _broken[grid](*args, **kwargs, **self.mistakes)


@triton.jit
def _stub_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, sm_scale, max_blocks_per_seq,
                 NUM_KV_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    raise NotImplementedError("Exercise: write the body of _paged_attention_kernel")


def test_paged_attention_kernel_check():
    assert lesson02.check_paged_attention_kernel(_good).status == "passed"
    assert lesson02.check_paged_attention_kernel(_stub_kernel).status == "not attempted"
    _assert_caught(lesson02.check_paged_attention_kernel(_Variant(WRONG_GQA=True)), "kv_head = head // QUERIES_PER_KV")
    _assert_caught(lesson02.check_paged_attention_kernel(_Variant(TRUNCATE=True)), "the last, partly filled block")
    _assert_caught(lesson02.check_paged_attention_kernel(lambda *a: None), "@triton.jit")


# ---------------------------------------------------------------- the benchmark script runs (CPU smoke mode)
def test_benchmark_script_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_paged", ROOT / "benchmarks" / "paged_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for key in ("device", "date", "torch", "triton", "correctness", "bandwidth", "split_k"):
        assert key in result
    assert all(c["max_abs_error"] <= c["tolerance"] for c in result["correctness"])
