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
from course_lib.grading.remote import run_beside
from kernels.reference import paged_attention_decode as _reference_attention


# ---------------------------------------------------------------- 1. the allocator
def check_allocator(allocator_cls) -> CheckResult:
    """``allocator_cls(num_blocks)`` with ``allocate()``, ``share(block_id)``, ``free(block_id)`` and a list
    ``ref_counts``: unique blocks, OutOfBlocksError when empty, ref counts == owners, reuse after the last free,
    ValueError on a double free. Then 300 random operations compared with a model of the books."""
    with Checker("allocator", points=2) as c:
        c.case = "Allocator(4), then allocate() four times"
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
        c.case = f"share({b}) after allocate"
        shared = a.share(b)
        c.check_equal(a.ref_counts[b], 2, case=f"share({b}) after allocate",
                      hint="share() adds one owner: ref_counts[b] += 1")
        c.check_equal(shared, b, case=f"the value returned by share({b})",
                      hint="share(block_id) returns the id it shared (fork builds the child's table from it: "
                           "[allocator.share(b) for b in block_table])")
        c.case = f"allocate() -> {b}, share({b}), then free({b})"
        a.free(b)
        c.check_equal(a.ref_counts[b], 1, case=f"share({b}) then free({b})",
                      hint="free() removes one owner: ref_counts[b] -= 1")
        c.case = f"free({b}) a second time (its last owner), then allocate()"
        a.free(b)
        again = a.allocate()
        c.check_equal(again, b, case=f"free({b}) twice (2 owners gone), then allocate() with only block {b} free",
                      hint="when the last owner frees a block (count reaches 0), put it back on the free list")
        c.case = f"free({got[1]}) (its only owner)"
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
        # random operations against a model of the books; a failure shows the operations that led to it
        rng = random.Random(0)
        for num_blocks in (1, 3, 8):
            a, owners, history = allocator_cls(num_blocks), Counter(), []
            for _ in range(100):
                op = rng.choice(["allocate", "allocate", "share", "free", "free"])
                held = sorted(b for b in owners if owners[b])
                if op == "allocate" and len(held) < num_blocks:
                    c.case = _history_case(num_blocks, history, "allocate()")
                    b = a.allocate()
                    history.append(f"allocate() -> {b}")
                    if owners[b]:   # the block went back to the free list while it still had owners
                        released = _last_free_of(history[:-1], b)
                        c.check(False, case=_history_case(num_blocks, history),
                                expected="a free block id", got=f"block {b}, which has {owners[b]} owner(s)",
                                hint=(f"free({b}) ({released}) put block {b} back on the free list while it still "
                                      "had owners: free() must decrement the count and release the block only when "
                                      "it reaches 0") if released else
                                "allocate() must only hand out blocks from the free list (ref count 0)")
                    c.check(0 <= b < num_blocks, case=_history_case(num_blocks, history), expected="a free block id",
                            got=f"block {b}", hint="allocate() must only hand out ids 0 ... num_blocks - 1")
                    owners[b] = 1
                elif op == "share" and held:
                    b = rng.choice(held)
                    c.case = _history_case(num_blocks, history, f"share({b})")
                    a.share(b)
                    history.append(f"share({b})")
                    owners[b] += 1
                elif op == "free" and held:
                    b = rng.choice(held)
                    c.case = _history_case(num_blocks, history, f"free({b})")
                    a.free(b)
                    history.append(f"free({b})")
                    owners[b] -= 1
                else:
                    continue
                want = [owners[b] for b in range(num_blocks)]
                if list(a.ref_counts) != want:
                    culprit = history[-1].split("(")[0]
                    c.check_equal(list(a.ref_counts), want, case=_history_case(num_blocks, history),
                                  hint=f"{culprit}() left ref_counts wrong: " + {
                                      "allocate": "a freshly allocated block has exactly one owner (count 1)",
                                      "share": "share() adds one owner (count + 1)",
                                      "free": "free() removes one owner (count - 1), never resets the count"}[culprit]
                                  + "; ref_counts[b] must always equal the number of owners of block b")
                c.cases_passed += 1
    return c.result


def _history_case(num_blocks: int, history: list[str], next_op: str = "") -> str:
    """The case of a random operation: the allocator and the last operations before it, oldest first."""
    first = max(len(history) - 12, 0)
    shown = [f"{i + 1}. {op}" for i, op in enumerate(history) if i >= first]
    ops = "; ".join(shown + ([f"now {next_op}"] if next_op else []))
    return f"Allocator({num_blocks}), the last operations: {'... ' if first else ''}{ops or 'none'}"


def _last_free_of(history: list[str], block: int) -> str:
    """Where the last free(block) of the history was ("operation 7"), or "" if there was none."""
    return next((f"operation {i + 1}" for i in range(len(history) - 1, -1, -1) if history[i] == f"free({block})"), "")


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
            c.case = f"block_table={table}, start={start}, end={end}, block_size={P}"
            got = student_fn(list(table), start, end, P)
            want = [table[i // P] * P + i % P for i in range(start, end)]
            block_ids_as_slots = [table[i // P] + i % P for i in range(start, end)]
            if isinstance(got, list) and len(got) == len(want) and got == block_ids_as_slots:
                hint = "a block id counts blocks, not slots: multiply it by block_size"
            elif isinstance(got, list) and got == list(range(start, end)):
                hint = "the tokens are not where their logical position says: look the block up in block_table"
            elif start and isinstance(got, list) and got == [table[i // P] * P + i % P for i in range(end - start)]:
                hint = "the tokens are start ... end - 1, not 0 ... end - start - 1: range(start, end)"
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
                c.case = case = (f"block_size={P}: appending token {n} (the sequence holds {n} tokens, "
                                 f"block_table={table})")
                free_before = a.num_free_blocks
                slot = student_fn(a, table, n, P)
                want_blocks = n // P + 1
                taken = free_before - a.num_free_blocks
                if taken and len(table) < want_blocks:
                    c.check(False, case=case + ": the caller's block_table", expected=f"{want_blocks} block(s)",
                            got=f"{len(table)} block(s), though your code took {taken} block(s) from the allocator",
                            hint="append the new block to block_table itself, in place (block_table.append(b)): "
                                 "the caller's list must grow, a new list you build is lost")
                c.check_equal(len(table), want_blocks, case=case + ": the number of blocks in block_table",
                              hint=("a new block is needed exactly when the last one is full (or there is none): "
                                    "when num_tokens % block_size == 0, i.e. num_tokens == len(block_table) * "
                                    "block_size")
                              if len(table) < want_blocks else
                              "allocate only when the token does not fit: the last block still had room")
                c.check_equal(taken, int(n % P == 0), case=case + ": blocks taken from the allocator",
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
            c.case = case = f"block_size={P}, a {prompt}-token parent {parent} forked"
            child = fork_fn(a, parent)
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
                c.case = case = (f"block_size={P}, prompt {prompt}: append {step} to the {who} (it holds {n} tokens, "
                                 f"table {list(table)}, ref counts of its blocks {[a.ref_counts[b] for b in table]})")
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


def _paged_inputs(B, Hq, Hkv, D, P, lens, dtype, seed, kind="random"):
    """``kind``: "random" scores of about ±1; "large": about ±100 (exp overflows without the max subtracted);
    "very negative": all about -150 (exp underflows to 0 unless the running max starts at -inf)."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-L // P) for L in lens) + 1
    N = B * max_blocks + 2
    k_cache = torch.randn(N, P, Hkv, D, generator=gen)
    v_cache = torch.randn(N, P, Hkv, D, generator=gen).to(DEVICE, dtype)
    tables = torch.randperm(N, generator=gen)[: B * max_blocks].view(B, max_blocks).to(DEVICE, torch.int32)
    q = torch.randn(B, Hq, D, generator=gen)
    if kind == "large":
        q = q * 100
    elif kind == "very negative":   # q along +u, every key along -u: q·k / sqrt(D) is about -24·24 / sqrt(D)
        u = torch.ones(D) / D ** 0.5
        q, k_cache = q + 24 * u, k_cache - 24 * u
    return (q.to(DEVICE, dtype), k_cache.to(DEVICE, dtype), v_cache, tables,
            torch.tensor(lens, dtype=torch.int32, device=DEVICE))


PAGED_BOUNDS_HINT = ("read the block table only for blocks 0 ... cdiv(context_len, BLOCK_SIZE) - 1 (entries past "
                     "them are not blocks of this sequence); element (block, offset, kv_head, d) of a cache is at "
                     "((block*BLOCK_SIZE + offset)*NUM_KV_HEADS + kv_head)*HEAD_DIM + d; q and out of program (b, h) "
                     "start at (b*Hq + h)*HEAD_DIM with Hq = NUM_KV_HEADS*QUERIES_PER_KV; mask positions >= "
                     "context_len in the loads")


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
    cases += [(2, 2, 1, 16, 4, [1, 9], torch.float32, "large"),
              (2, 2, 2, 16, 4, [3, 10], torch.float32, "very negative")]
    with Checker("paged_attention_kernel", points=4, timeout_s=180) as c:
        check_is_kernel(c, kernel, "check_paged_attention_kernel(_paged_attention_kernel)")
        for i, (B, Hq, Hkv, D, P, lens, dtype, *kind) in enumerate(cases):
            kind = kind[0] if kind else "random"
            q, k_cache, v_cache, tables, context_lens = _paged_inputs(B, Hq, Hkv, D, P, lens, dtype, seed=i, kind=kind)
            out = torch.full_like(q, float("nan"))
            scale = 1 / math.sqrt(D)
            c.case = (f"B={B}, Hq={Hq}, Hkv={Hkv}, D={D}, block_size={P}, context_lens={lens}, {dtype}"
                      + ("" if kind == "random" else f", {kind} scores"))
            launch(kernel, (B, Hq), q, k_cache, v_cache, tables, context_lens, out, scale, tables.shape[1],
                    NUM_KV_HEADS=Hkv, QUERIES_PER_KV=Hq // Hkv, BLOCK_SIZE=P, HEAD_DIM=D,
                   exercise="Exercise: write the body of _paged_attention_kernel", bounds_hint=PAGED_BOUNDS_HINT)
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
            elif kind == "large" and not close(want):
                hint = ("scores of about ±100 here: exp(100) overflows float32 to inf. Subtract the running max "
                        "before exp: p = exp(s - m_new), and rescale l and acc by exp(m_old - m_new)")
            elif kind == "very negative" and not close(want):
                hint = ("every score is far below 0 here: start the running max m at -inf, not 0, or exp(s - m) "
                        "underflows to 0 for every key and l = 0")
            elif bool(torch.isnan(out).any()):
                hint = ("some outputs were never written (still NaN) or are NaN: store one [HEAD_DIM] row per program, "
                        "and mask scores of positions >= context_len with -inf before the max (not after the exp)")
            else:
                hint = ("token i of a sequence is at block_tables[seq, i // BLOCK_SIZE], offset i % BLOCK_SIZE; "
                        "element (block, offset, kv_head, d) of a cache is at ((block*BLOCK_SIZE + offset)"
                        "*NUM_KV_HEADS + kv_head)*HEAD_DIM + d; online softmax: rescale l and acc by "
                        "exp(m_old - m_new)")
            c.check_close(out, want, hint=hint, **tol)
    return c.result


def _wrong_gqa(q, k_cache, v_cache, tables, context_lens, Hkv):
    """The output of the classic mistake kv_head = head % Hkv (instead of head // G)."""
    Hq = q.shape[1]
    G = Hq // Hkv
    # Head h reads kv head h % Hkv, the reference's head j reads kv head j // G: put q[h] at j = (h % Hkv)*G + h // Hkv.
    order = torch.tensor([(h % Hkv) * G + h // Hkv for h in range(Hq)])
    out = _reference_attention(q[:, torch.argsort(order)], k_cache, v_cache, tables, context_lens)
    return out[:, order]


# ---------------------------------------------------------------- end to end: the pieces decode the shipped model
# 7, 8 and 15 tokens: with blocks of 8, a block that fills up during the decode, a full one (the first new token
# opens a block), and a prefill over two blocks whose decode opens a third
_E2E_PROMPTS = [("And God said, Let there", 3), ("And God said, Let there be", 3),
                ("1 In the beginning God created the heaven and the earth.", 3)]
_E2E_BLOCK_SIZE = 8
_PIECES = ("Allocator", "slot_mapping", "append_slot", "_paged_attention_kernel")


class _PieceError(Exception):
    """A piece returned something the decode cannot use: the message names it."""


def _library_slot_mapping(block_table, start, end, block_size):
    return [block_table[i // block_size] * block_size + i % block_size for i in range(start, end)]


def _library_append_slot(allocator, block_table, num_tokens, block_size):
    if num_tokens == len(block_table) * block_size:
        block_table.append(allocator.allocate())
    return block_table[num_tokens // block_size] * block_size + num_tokens % block_size


class _BlockTableCache:
    """The model's cache protocol over one pool of blocks ``[N, P, Hkv, D]`` per layer, for one forward pass whose
    slots and block tables the caller prepared: a prefill (one row, S tokens) attends by gathering its blocks, a
    decode (one token per row) through ``kernel`` (None: the reference, ``kernels.reference``)."""

    def __init__(self, k_pool, v_pool, slots, tables, context_lens, kernel):
        self.k_pool, self.v_pool, self.kernel, self.length = k_pool, v_pool, kernel, 0
        self.slots = torch.tensor(slots, dtype=torch.int64)
        width = max(len(t) for t in tables)
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32)

    def attend(self, layer, q, k, v):
        B, Hq, S, D = q.shape
        k_cache, v_cache = self.k_pool[layer], self.v_pool[layer]
        N, P, Hkv, _ = k_cache.shape
        k_cache.view(N * P, Hkv, D)[self.slots] = k.transpose(1, 2).reshape(B * S, Hkv, D)
        v_cache.view(N * P, Hkv, D)[self.slots] = v.transpose(1, 2).reshape(B * S, Hkv, D)
        if S > 1:   # a prefill: gather the row's blocks, attend causally (the kernel is a decode kernel)
            from course_lib.model.attention import attention

            L = int(self.context_lens[0])
            k_all = k_cache[self.tables[0].long()].reshape(-1, Hkv, D)[:L].transpose(0, 1)[None]
            v_all = v_cache[self.tables[0].long()].reshape(-1, Hkv, D)[:L].transpose(0, 1)[None]
            return attention(q, k_all, v_all, causal=True)
        q = q[:, :, 0].contiguous()
        if self.kernel is None:
            out = _reference_attention(q, k_cache, v_cache, self.tables, self.context_lens)
        else:
            out = torch.full_like(q, float("nan"))
            launch(self.kernel, (B, Hq), q, k_cache, v_cache, self.tables, self.context_lens, out, 1 / math.sqrt(D),
                   self.tables.shape[1], NUM_KV_HEADS=Hkv, QUERIES_PER_KV=Hq // Hkv, BLOCK_SIZE=P, HEAD_DIM=D,
                   exercise="Exercise: write the body of _paged_attention_kernel", bounds_hint=PAGED_BOUNDS_HINT)
        return out[:, :, None]

    def advance(self, num_tokens):
        pass


def _checked_slots(slots, count, num_slots, where):
    if not isinstance(slots, (list, tuple)) or len(slots) != count or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < num_slots for s in slots):
        raise _PieceError(f"{where} returned {str(slots)[:80]}: expected {count} slot(s), ints in 0 ... "
                          f"{num_slots - 1}")
    return list(slots)


def _append(append_fn, allocator, tables, row, num_tokens, block_size, num_slots):
    """append_slot for token ``num_tokens`` of sequence ``row``; the block table must grow by exactly the block the
    token needs, a block no other sequence holds."""
    table = tables[row]
    before = list(table)
    slot = append_fn(allocator, table, num_tokens, block_size)
    where = f"append_slot(allocator, block_table={before}, num_tokens={num_tokens}, block_size={block_size})"
    if len(table) != num_tokens // block_size + 1 or table[:len(before)] != before:
        raise _PieceError(f"{where} left the block table {list(table)}: a sequence of {num_tokens + 1} tokens needs "
                          f"{num_tokens // block_size + 1} block(s); append a new block exactly when the last one is "
                          "full")
    for new in table[len(before):]:
        holders = [i for i, t in enumerate(tables) if i != row and new in t] + ([row] if new in before else [])
        if holders:
            raise _PieceError(f"Allocator.allocate() handed out block {new}, which sequence {holders[0]} still holds "
                              "(its K/V would be overwritten): allocate() must take a block off the free list")
    return _checked_slots([slot], 1, num_slots, where)[0]


def paged_decode(allocator_cls, slot_mapping_fn, append_fn, kernel, prompts, block_size: int = _E2E_BLOCK_SIZE):
    """Greedy decode of ``prompts`` [(token ids, max_new_tokens)] on the shipped tiny model (float32), the sequences
    sharing one pool of blocks and one allocator: each prompt is prefilled alone (its blocks taken with append_slot,
    its K/V written through slot_mapping), then all decode together, one token per sequence per step (append_slot
    gives each new token its slot, the kernel attends through the block tables). A piece given as None is the
    library's. Returns the new tokens of each prompt, or ``{"error": message}`` when a piece returned something
    unusable. Runs where the learner's code lives (the grader runs it in the notebook's kernel)."""
    from course_lib.grading.lesson01 import _float32_target

    allocator_cls = allocator_cls or BlockAllocator
    slot_mapping_fn = slot_mapping_fn or _library_slot_mapping
    append_fn = append_fn or _library_append_slot
    model = _float32_target()[0]
    cfg = model.config
    num_blocks = sum(-(-(len(p) + n) // block_size) for p, n in prompts) + 2
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    k_pool = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    v_pool = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    allocator, tables, lens, outs = allocator_cls(num_blocks), [], [], []
    try:
        with torch.no_grad():
            for row, (prompt, _) in enumerate(prompts):   # prefill, one prompt at a time
                tables.append([])
                for n in range(len(prompt)):
                    _append(append_fn, allocator, tables, row, n, block_size, num_blocks * block_size)
                slots = _checked_slots(slot_mapping_fn(list(tables[row]), 0, len(prompt), block_size), len(prompt),
                                       num_blocks * block_size, f"slot_mapping(block_table={tables[row]}, start=0, "
                                       f"end={len(prompt)}, block_size={block_size})")
                cache = _BlockTableCache(k_pool, v_pool, slots, [tables[row]], [len(prompt)], kernel)
                logits = model(torch.tensor([prompt]), cache=cache, last_token_only=True)
                outs.append([int(logits[0, -1].argmax())])
                lens.append(len(prompt))
            for _ in range(max(n for _, n in prompts) - 1):   # decode: one token for every unfinished sequence
                rows = [r for r, (_, n) in enumerate(prompts) if len(outs[r]) < n]
                slots = [_append(append_fn, allocator, tables, r, lens[r], block_size, num_blocks * block_size)
                         for r in rows]
                cache = _BlockTableCache(k_pool, v_pool, slots, [tables[r] for r in rows],
                                         [lens[r] + 1 for r in rows], kernel)
                logits = model(torch.tensor([[outs[r][-1]] for r in rows]), cache=cache,
                               positions=torch.tensor([[lens[r]] for r in rows]), last_token_only=True)
                for i, r in enumerate(rows):
                    outs[r].append(int(logits[i, -1].argmax()))
                    lens[r] += 1
    except _PieceError as err:
        return {"error": str(err)}
    return outs


def check_end_to_end(allocator_cls, slot_mapping_fn, append_fn, kernel) -> CheckResult:
    """Your four pieces together decode the shipped tiny model: prompts of different lengths share one pool and
    your allocator, decode together (block size 8: they cross block boundaries in prefill and decode), append_slot
    and slot_mapping place every token's K/V, your kernel attends at every decode step. The greedy tokens must
    equal ``greedy_generate(..., use_cache=False)`` exactly. Your bookkeeping runs first with the library's kernel
    (each bookkeeping piece alone, with the library's others, when the tokens differ: the hint names the one that
    breaks them), then with your kernel."""
    from course_lib.grading.lesson01 import _float32_target
    from course_lib.model.generate import greedy_generate

    model, tok = _float32_target()
    prompts = [(tok.encode(text), n) for text, n in _E2E_PROMPTS]
    want = [greedy_generate(model, p, n, use_cache=False) for p, n in prompts]
    book = (allocator_cls, slot_mapping_fn, append_fn)

    def decode(*pieces):
        return run_beside(allocator_cls, "course_lib.grading.lesson02:paged_decode", *pieces, prompts)

    with Checker("end_to_end", points=2, timeout_s=240) as c:
        check_is_kernel(c, kernel, "check_end_to_end(Allocator, slot_mapping, append_slot, _paged_attention_kernel)")
        if run_beside(kernel, "course_lib.grading.kernels:is_stub", kernel):
            raise NotImplementedError("Exercise: this check runs exercises 1, 2, 3 and 5 together: finish them first "
                                      "(_paged_attention_kernel is still the stub)")
        case = (f"{len(prompts)} prompts of {', '.join(str(len(p)) for p, _ in prompts)} tokens, {prompts[0][1]} new "
                f"tokens each, block size {_E2E_BLOCK_SIZE}, decoded together")
        for pieces, used in [(book + (None,), "your Allocator, slot_mapping and append_slot with the library's kernel"),
                             (book + (kernel,), "all four of your pieces")]:
            c.case = f"{case}; {used}"
            got = decode(*pieces)
            if isinstance(got, dict):
                c.check(False, expected="a decode the pieces can serve", got=got["error"],
                        hint="the unit check of that piece above shows the rule; here it broke the decode")
            if got == want:
                c.cases_passed += 1
                continue
            if pieces[3] is None:   # each bookkeeping piece alone, with the library's others
                guilty = [name for i, name in enumerate(_PIECES[:3])
                          if decode(*[p if j == i else None for j, p in enumerate(book)], None) != want]
                hint = (f"with the library's other pieces, your {' and your '.join(guilty)} alone already "
                        f"change{'s' * (len(guilty) == 1)} the tokens: look at the tokens that cross a block boundary"
                        if guilty else "each of your pieces decodes correctly with the library's others, but not "
                        "together: append_slot and slot_mapping must agree on where token i lives, "
                        "block_table[i // block_size] * block_size + i % block_size")
            else:
                hint = ("your bookkeeping decodes correctly with the library's kernel, with your "
                        "_paged_attention_kernel the tokens change: it must attend over all context_lens[seq] tokens "
                        "(the partly filled last block included) through the block table")
            row = next(r for r in range(len(want)) if got[r] != want[r])
            c.check_equal(got[row], want[row], case=f"{c.case}: the new tokens of prompt {row} "
                          f"({len(prompts[row][0])} tokens) vs greedy_generate(use_cache=False)", hint=hint)
    return c.result
