"""Checks of lesson 02 (PagedAttention): the block allocator, slot mapping, appending to a block table, fork
with copy-on-write, and a paged-attention decode kernel in Triton.

Every check runs small edge cases first, then random ones (fixed seeds), and stops at the first failure
with the case, expected vs got, and a hint aimed at the usual mistake.
"""
from __future__ import annotations

import math
import random
from collections import Counter

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch

from course_lib.paging.block_manager import BlockAllocator, OutOfBlocksError
from course_lib.device import DEVICE
from course_lib.grading.core import Checker, CheckResult
from course_lib.grading.kernels import check_is_kernel, launch
from kernels.reference import paged_attention_decode as _reference_attention


# ---------------------------------------------------------------- 1. the allocator
def check_allocator(allocator_cls) -> CheckResult:
    """``allocator_cls(num_blocks)`` with ``allocate()``, ``share(block_id)``, ``free(block_id)`` and a list
    ``ref_counts``: unique blocks, OutOfBlocksError when empty, ref counts == owners, reuse after the last free,
    ValueError on a double free. Then 300 random operations compared with a model of the books."""
    with Checker("allocator", points=2) as c:
        a = allocator_cls(4)
        got = [a.allocate() for _ in range(4)]
        c.check_equal(sorted(got), [0, 1, 2, 3], case="Allocator(4): allocate() four times",
                      hint="hand out each of the ids 0 ... num_blocks-1 once: pop them from a free list")
        c.check_equal(list(a.ref_counts), [1, 1, 1, 1], case="after four allocate()",
                      hint="a freshly allocated block has exactly one owner: ref_counts[block] = 1")
        try:
            extra = a.allocate()
            raised = None
        except OutOfBlocksError:
            raised = "OutOfBlocksError"
        except Exception as err:  # any other exception is the learner's mistake
            raised = type(err).__name__
        c.check(raised == "OutOfBlocksError", case="Allocator(4): a fifth allocate()", expected="OutOfBlocksError",
                got=f"{raised} raised" if raised else f"returned {extra!r}",
                hint="when the free list is empty, raise OutOfBlocksError (from course_lib.paging.block_manager)")
        b = got[0]
        a.share(b)
        c.check_equal(a.ref_counts[b], 2, case=f"share({b}) after allocate",
                      hint="share() adds one owner: ref_counts[b] += 1")
        a.free(b)
        c.check_equal(a.ref_counts[b], 1, case=f"share({b}) then free({b})",
                      hint="free() removes one owner: ref_counts[b] -= 1")
        a.free(b)
        again = a.allocate()
        c.check_equal(again, b, case=f"free({b}) twice (2 owners gone), then allocate() with only block {b} free",
                      hint="when the last owner frees a block (count reaches 0), put it back on the free list")
        a.free(got[1])
        try:
            a.free(got[1])
            raised = None
        except ValueError:
            raised = "ValueError"
        except Exception as err:  # the wrong exception: the check below names it
            raised = type(err).__name__
        c.check(raised == "ValueError", case=f"free({got[1]}) twice", expected="ValueError (a double free)",
                got=f"{raised} raised" if raised else "nothing raised",
                hint="free() of a block whose ref count is already 0 must raise ValueError, never go negative "
                     "or put the block on the free list twice")
        # random operations against a model of the books
        rng = random.Random(0)
        for num_blocks in (1, 3, 8):
            a, owners = allocator_cls(num_blocks), Counter()
            for step in range(100):
                op = rng.choice(["allocate", "allocate", "share", "free", "free"])
                held = sorted(b for b in owners if owners[b])
                case = f"Allocator({num_blocks}), random operation {step}: {op}"
                if op == "allocate" and len(held) < num_blocks:
                    b = a.allocate()
                    c.check(0 <= b < num_blocks and owners[b] == 0, case=case, expected="a free block id",
                            got=f"block {b}, which has {owners[b]} owner(s)",
                            hint="allocate() must only hand out blocks from the free list (ref count 0)")
                    owners[b] = 1
                elif op == "share" and held:
                    b = rng.choice(held)
                    a.share(b)
                    owners[b] += 1
                elif op == "free" and held:
                    b = rng.choice(held)
                    a.free(b)
                    owners[b] -= 1
                c.check_equal(list(a.ref_counts), [owners[b] for b in range(num_blocks)], case=case,
                              hint="ref_counts[b] must always equal the number of owners of block b")
    return c.result


# ---------------------------------------------------------------- 2. slot mapping
def check_slot_mapping(student_fn) -> CheckResult:
    """``slot_mapping(block_table, start, end, block_size)`` == [block_table[i // P] * P + i % P for i in start:end]."""
    rng = random.Random(1)
    cases = [([0], 0, 1, 1), ([5], 0, 3, 4), ([3, 1], 0, 8, 4), ([3, 1], 5, 7, 4), ([7, 2, 9], 10, 11, 4),
             ([2, 0, 1], 0, 40, 16)]
    for _ in range(8):
        P = rng.choice([1, 2, 8, 16, 32])
        table = rng.sample(range(64), rng.randint(1, 6))
        end = rng.randint(1, len(table) * P)
        cases.append((table, rng.randint(0, end - 1), end, P))
    with Checker("slot_mapping", points=1) as c:
        for table, start, end, P in cases:
            got = student_fn(list(table), start, end, P)
            want = [table[i // P] * P + i % P for i in range(start, end)]
            block_ids_as_slots = [table[i // P] + i % P for i in range(start, end)]
            if isinstance(got, list) and len(got) == len(want) and got == block_ids_as_slots:
                hint = "a block id counts blocks, not slots: multiply it by block_size"
            elif isinstance(got, list) and got == list(range(start, end)):
                hint = "the tokens are not where their logical position says: look the block up in block_table"
            else:
                hint = "token i is in block block_table[i // P], at offset i % P; slot = block * P + offset"
            c.check_equal(got, want, case=f"block_table={table}, start={start}, end={end}, block_size={P}", hint=hint)
    return c.result


# ---------------------------------------------------------------- 3. append a token
def _scattered_allocator(num_blocks: int, seed: int) -> BlockAllocator:
    """An allocator whose free list is shuffled, so that block ids do not follow the token order."""
    a = BlockAllocator(num_blocks)
    random.Random(seed).shuffle(a.free_block_ids)
    return a


def check_append_slot(student_fn) -> CheckResult:
    """``append_slot(allocator, block_table, num_tokens, block_size)``: a sequence holding num_tokens tokens gets
    one more; grow block_table (in place) with a new block exactly when the last one is full; return its slot."""
    with Checker("append_slot", points=2) as c:
        for P, total in [(1, 3), (4, 13), (16, 40), (3, 10)]:
            a, table = _scattered_allocator(32, P), []
            for n in range(total):
                case = f"block_size={P}: appending token {n} (the sequence holds {n} tokens, block_table={table})"
                free_before = a.num_free_blocks
                slot = student_fn(a, table, n, P)
                want_blocks = n // P + 1
                c.check_equal(len(table), want_blocks, case=case,
                              hint=("a new block is needed exactly when the last one is full (or there is none): "
                                    "when num_tokens % block_size == 0, i.e. num_tokens == len(block_table) * "
                                    "block_size")
                              if len(table) < want_blocks else
                              "allocate only when the token does not fit: the last block still had room")
                c.check_equal(free_before - a.num_free_blocks, int(n % P == 0), case=case + ": blocks allocated",
                              hint="take new blocks from the allocator (allocator.allocate()), one at a time")
                c.check_equal(slot, table[n // P] * P + n % P, case=case + ": the returned slot",
                              hint="return the slot of the new token: block_table[n // P] * block_size + n % "
                              "block_size")
    return c.result


# ---------------------------------------------------------------- 4. fork and copy-on-write
def check_fork_cow(fork_fn, append_fn) -> CheckResult:
    """``fork(allocator, block_table)`` shares every block (ref counts + 1, nothing allocated) and
    ``append_slot_cow(allocator, block_table, num_tokens, block_size) -> (slot, copy)`` copies a shared last
    block (copy = (src, dst)) only when the new token is written into it; ref counts == owners throughout."""

    def books(a, tables, case):
        owners = Counter(b for t in tables for b in t)
        c.check_equal(list(a.ref_counts), [owners[b] for b in range(a.num_blocks)], case=case,
                      hint="every block's ref count must equal the number of block tables holding it: fork must "
                           "call allocator.share(b) for each block, copy-on-write must free (decref) the block it "
                           "leaves")

    with Checker("fork_cow", points=3) as c:
        for P, prompt in [(4, 6), (4, 8), (1, 3), (16, 21)]:
            a = _scattered_allocator(40, P)
            parent = [a.allocate() for _ in range(-(-prompt // P))]
            free_before = a.num_free_blocks
            child = fork_fn(a, parent)
            case = f"block_size={P}, a {prompt}-token parent {parent} forked"
            c.check_equal(list(child), parent, case=case,
                          hint="the child's block table lists the parent's blocks, in order")
            c.check(child is not parent, case=case, expected="a new list", got="the parent's own list object",
                    hint="return a new list: appending to the child must not change the parent's table")
            c.check_equal(a.num_free_blocks, free_before, case=case + ": blocks allocated by fork",
                          hint="a fork copies no K/V: it must not allocate, only share")
            books(a, [parent, child], case)
            tables, sizes = {"parent": parent, "child": child}, {"parent": prompt, "child": prompt}
            for step, who in enumerate(["child", "parent", "child", "child", "parent"] * 4):
                table, n = tables[who], sizes[who]
                last = table[-1] if table else None
                shared = last is not None and n % P != 0 and a.ref_counts[last] > 1
                case = (f"block_size={P}, prompt {prompt}: append {step} to the {who} (it holds {n} tokens, table "
                        f"{list(table)}, ref counts of its blocks {[a.ref_counts[b] for b in table]})")
                result = append_fn(a, table, n, P)
                c.check(isinstance(result, tuple) and len(result) == 2, case=case, expected="a tuple (slot, copy)",
                        got=repr(result), hint="return (slot, None) or (slot, (src_block, dst_block))")
                slot, copy = result
                if shared:
                    c.check(copy is not None and tuple(copy) == (last, table[-1]) and table[-1] != last, case=case,
                            expected=f"a copy ({last}, <a new block>), the table's last entry replaced by the new "
                            "block",
                            got=f"copy={copy}, table now {list(table)}",
                            hint="the token goes into a partly filled block that another sequence also owns: "
                                 "allocate a new block, put it at block_table[-1], free (decref) the old one, return "
                                 "(old, new)")
                else:
                    c.check(copy is None, case=case, expected="copy None", got=f"copy={copy}",
                            hint="copy only when the token is written into a SHARED, partly filled last block: a full "
                                 "shared block is never written again, and a block you own alone is yours to write")
                sizes[who] = n + 1
                c.check_equal(slot, table[n // P] * P + n % P, case=case + ": the returned slot",
                              hint="slot = block_table[n // P] * block_size + n % block_size, after any copy")
                books(a, list(tables.values()), case)
    return c.result


# ---------------------------------------------------------------- 5. the Triton kernel


def _paged_inputs(B, Hq, Hkv, D, P, lens, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-L // P) for L in lens) + 1
    N = B * max_blocks + 2
    k_cache = torch.randn(N, P, Hkv, D, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(N, P, Hkv, D, generator=gen).to(DEVICE, dtype)
    tables = torch.randperm(N, generator=gen)[: B * max_blocks].view(B, max_blocks).to(DEVICE, torch.int32)
    q = torch.randn(B, Hq, D, generator=gen).to(DEVICE, dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def check_paged_attention_kernel(kernel) -> CheckResult:
    """A Triton kernel, launched on the grid (B, Hq), computing one decode step of attention through block tables:
    ``kernel[(B, Hq)](q, k_cache, v_cache, block_tables, context_lens, out, sm_scale, max_blocks_per_seq,
    NUM_KV_HEADS=Hkv, QUERIES_PER_KV=Hq // Hkv, BLOCK_SIZE=P, HEAD_DIM=D)``, all tensors contiguous.
    Compared with ``kernels.reference.paged_attention_decode`` on MHA and GQA, context lengths that are and
    are not multiples of the block size, float32 and float16."""
    cases = [(1, 1, 1, 16, 4, [4], torch.float32), (1, 1, 1, 16, 4, [5], torch.float32),
             (2, 2, 2, 16, 4, [3, 7], torch.float32), (2, 4, 2, 16, 8, [9, 16], torch.float32),
             (3, 8, 2, 32, 16, [1, 33, 40], torch.float32), (2, 4, 1, 16, 8, [8, 13], torch.float16)]
    rng = random.Random(5)
    for _ in range(3):
        Hkv, G, P = rng.choice([1, 2]), rng.choice([1, 2, 4]), rng.choice([4, 8, 16])
        cases.append((2, Hkv * G, Hkv, 16, P, [rng.randint(1, 3 * P) for _ in range(2)], torch.float32))
    with Checker("paged_attention_kernel", points=4, timeout_s=180) as c:
        check_is_kernel(c, kernel, "check_paged_attention_kernel(_paged_attention_kernel)")
        for i, (B, Hq, Hkv, D, P, lens, dtype) in enumerate(cases):
            q, k_cache, v_cache, tables, context_lens = _paged_inputs(B, Hq, Hkv, D, P, lens, dtype, seed=i)
            out = torch.full_like(q, float("nan"))
            scale = 1 / math.sqrt(D)
            launch(kernel, (B, Hq), q, k_cache, v_cache, tables, context_lens, out, scale, tables.shape[1],
                    NUM_KV_HEADS=Hkv, QUERIES_PER_KV=Hq // Hkv, BLOCK_SIZE=P, HEAD_DIM=D,
                   exercise="Exercise: write the body of _paged_attention_kernel")
            want = _reference_attention(q, k_cache, v_cache, tables, context_lens)
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-3, atol=3e-3)

            def close(other):
                return bool(torch.isclose(out.float(), other.float(), **tol).all())

            if Hq != Hkv and not close(want) and close(_wrong_gqa(q, k_cache, v_cache, tables, context_lens, Hkv)):
                hint = ("query heads are grouped: heads h*G ... h*G+G-1 (G = QUERIES_PER_KV) share kv head h, so "
                        "kv_head = head // QUERIES_PER_KV (not head % NUM_KV_HEADS)")
            elif close(_reference_attention(q, k_cache, v_cache, tables, context_lens // P * P)):
                hint = ("the last, partly filled block is missing: loop over cdiv(context_len, BLOCK_SIZE) blocks and "
                        "mask the positions >= context_len")
            elif bool(torch.isnan(out).any()):
                hint = ("some outputs were never written (still NaN) or are NaN: store one [HEAD_DIM] row per program, "
                        "and mask scores of positions >= context_len with -inf before the max (not after the exp)")
            else:
                hint = ("token i of a sequence is at block_tables[seq, i // BLOCK_SIZE], offset i % BLOCK_SIZE; "
                        "element (block, offset, kv_head, d) of a cache is at ((block*BLOCK_SIZE + offset)"
                        "*NUM_KV_HEADS + kv_head)*HEAD_DIM + d; online softmax: rescale l and acc by "
                        "exp(m_old - m_new)")
            c.check_close(out, want, case=f"B={B}, Hq={Hq}, Hkv={Hkv}, D={D}, block_size={P}, context_lens={lens}, "
                          f"{dtype}", hint=hint, **tol)
    return c.result


def _wrong_gqa(q, k_cache, v_cache, tables, context_lens, Hkv):
    """The output of the classic mistake kv_head = head % Hkv (instead of head // G)."""
    Hq = q.shape[1]
    G = Hq // Hkv
    # Head h reads kv head h % Hkv, the reference's head j reads kv head j // G: put q[h] at j = (h % Hkv)*G + h // Hkv.
    order = torch.tensor([(h % Hkv) * G + h // Hkv for h in range(Hq)])
    out = _reference_attention(q[:, torch.argsort(order)], k_cache, v_cache, tables, context_lens)
    return out[:, order]
