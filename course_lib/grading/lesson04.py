"""Checks of lesson 04 (continuous batching): admitting requests under a block budget, choosing and executing a
preemption, and splitting a step's token budget between decodes and prefill chunks.

Every check runs small edge cases first, then random ones (fixed seeds) against a model solution, and stops at
the first failure with the case, expected vs got, and a hint aimed at the usual mistake.
"""
from __future__ import annotations

import functools
import random

from course_lib.paging.block_manager import BlockManager, OutOfBlocksError
from course_lib.grading.core import Checker, CheckResult
from course_lib.serving.scheduler import RUNNING, SWAPPED, WAITING, Sequence


# ---------------------------------------------------------------- 1. admission
def _admit(waiting, num_free_blocks, block_size, num_running, max_num_seqs, token_budget, watermark=0,
           subtract_blocks=True, subtract_tokens=True):
    """The model answer; ``subtract_blocks`` / ``subtract_tokens`` False: two mistakes it can make, for the hints."""
    admitted = []
    for seq_id, num_tokens in waiting:
        need = -(-num_tokens // block_size)
        if (num_running + len(admitted) >= max_num_seqs or num_tokens > token_budget
                or num_free_blocks - need < watermark):
            break
        admitted.append(seq_id)
        num_free_blocks -= need if subtract_blocks else 0
        token_budget -= num_tokens if subtract_tokens else 0
    return admitted


def _admission_hint(got, case_args) -> str:
    """The hint of the most specific mistake that explains ``got`` (checked in that order)."""
    waiting, free, P, running, max_seqs, budget, watermark = case_args
    if got == _admit(*case_args, subtract_blocks=False):
        return ("you did not subtract the blocks of the requests you admitted: each admitted request takes its "
                "ceil(n / block_size) blocks out of num_free_blocks before the next one is considered")
    if got == _admit(*case_args, subtract_tokens=False):
        return ("you did not subtract the tokens of the requests you admitted: each admitted prompt uses its "
                "tokens of token_budget before the next one is considered")
    floor = _admit([(s, n // P * P) for s, n in waiting], free, P, running, max_seqs, budget, watermark)
    if got == floor:
        return "a sequence of n tokens needs ceil(n / block_size) blocks: its last block may be partly filled"
    skipping = []
    f, b = free, budget
    for s, n in waiting:
        need = -(-n // P)
        if running + len(skipping) < max_seqs and n <= b and f - need >= watermark:
            skipping.append(s)
            f, b = f - need, b - n
    if got == skipping:
        return ("first come, first served: stop at the first request that does not fit; admitting a later, smaller "
                "one would let short requests overtake a long one forever (starvation)")
    if got == _admit(waiting, free, P, running, max_seqs, budget, 0) and watermark:
        return "keep `watermark` blocks free: admit only while num_free_blocks - need >= watermark"
    if got == _admit(waiting, free, P, running, max_seqs, 10**9, watermark):
        return "each admitted prompt is prefilled in this step: its tokens must fit in what is left of token_budget"
    if got == _admit(waiting, free, P, 0, max_seqs, budget, watermark):
        return "the running batch already holds num_running sequences: at most max_num_seqs - num_running can join"
    if got == _admit(waiting, free, P, running, max_seqs + 1, budget, watermark):
        return ("one sequence too many: the batch is full when num_running + len(admitted) == max_num_seqs "
                "(admit while it is < max_num_seqs)")
    if got == _admit(waiting, free, P, running, max_seqs, budget, watermark + 1):
        return "exactly `watermark` free blocks left is allowed: admit while num_free_blocks - need >= watermark"
    return ("walk the queue in order; admit while (1) the batch has room, (2) the prompt fits the token budget, "
            "(3) its blocks fit above the watermark; subtract each admitted request's blocks and tokens")


def check_admit(student_fn) -> CheckResult:
    """``admit(waiting, num_free_blocks, block_size, num_running, max_num_seqs, token_budget, watermark)``:
    ``waiting`` is a list of ``(seq_id, num_prompt_tokens)`` in arrival order; return the ids admitted into this
    step, in order (first come first served, stopping at the first that does not fit)."""
    cases = [([], 10, 4, 0, 4, 64, 0), ([(0, 8)], 2, 4, 0, 4, 64, 0), ([(0, 9)], 2, 4, 0, 4, 64, 0),
             ([(0, 5), (1, 3)], 2, 4, 0, 4, 64, 0), ([(0, 12), (1, 1)], 2, 4, 0, 4, 64, 0),
             ([(0, 4), (1, 4), (2, 4)], 10, 4, 0, 2, 64, 0),
             ([(0, 4), (1, 4), (2, 4)], 10, 4, 2, 4, 64, 0), ([(0, 4), (1, 4)], 3, 4, 0, 4, 64, 2),
             ([(0, 30), (1, 30), (2, 5)], 100, 16, 0, 8, 64, 0), ([(0, 70)], 100, 16, 0, 8, 64, 0)]
    rng = random.Random(4)
    for _ in range(40):
        waiting = [(i, rng.randint(1, 60)) for i in range(rng.randint(0, 8))]
        cases.append((waiting, rng.randint(0, 30), rng.choice([1, 4, 16]), rng.randint(0, 4), rng.randint(1, 8),
                      rng.randint(1, 128), rng.choice([0, 0, 1, 3])))
    with Checker("admit", points=2) as c:
        for args in cases:
            waiting, free, P, running, max_seqs, budget, watermark = args
            c.case = (f"waiting={waiting}, num_free_blocks={free}, block_size={P}, num_running={running}, "
                      f"max_num_seqs={max_seqs}, token_budget={budget}, watermark={watermark}")
            got = student_fn(list(waiting), free, P, running, max_seqs, budget, watermark)
            want = _admit(*args)
            c.check_equal(list(got) if isinstance(got, (list, tuple)) else got, want,
                          hint=_admission_hint(list(got) if isinstance(got, (list, tuple)) else got, args))
    return c.result


# ---------------------------------------------------------------- 2. preemption
def _scene(rng: random.Random, mode: str, cpu_blocks: int):
    """A running batch over a small block pool; returns what preempt() gets."""
    P = rng.choice([2, 4])
    bm, cpu = BlockManager(64, P), BlockManager(max(cpu_blocks, 1), P)
    running = []
    for i in rng.sample(range(20), rng.randint(1, 5)):
        n = rng.randint(1, 12)
        seq = Sequence(i, i, list(range(1, n + 1)), arrival_time=rng.choice([0.0, 0.5, 1.0, 2.0]), status=RUNNING)
        seq.num_computed_tokens = n
        bm.allocate(i, n)
        running.append(seq)
    rng.shuffle(running)
    waiting = [Sequence(100 + j, 100 + j, [1, 2], arrival_time=5.0) for j in range(rng.randint(0, 2))]
    swapped = []
    return bm, cpu, running, waiting, swapped


def check_preempt(student_fn) -> CheckResult:
    """``preempt(running, block_manager, cpu_block_manager, waiting, swapped, mode) -> (victim, mapping)``:
    choose the running sequence with the lowest priority (the largest ``seq.priority``: the latest arrival), take
    it out of ``running`` and free its device blocks; by ``"swap"`` (when the CPU pool has room) first copy the
    block table to CPU blocks (mapping = [(device block, CPU block), ...]) and append it to ``swapped``; by
    ``"recompute"`` (or swap with a full CPU pool) forget its K/V (num_computed_tokens = 0) and put it at the
    FRONT of ``waiting`` (mapping = [])."""
    rng = random.Random(7)
    scenes = [("recompute", 8), ("swap", 64), ("swap", 1)] + [(rng.choice(["recompute", "swap"]), rng.choice([1, 64]))
                                                               for _ in range(12)]
    with Checker("preempt", points=3) as c:
        for mode, cpu_blocks in scenes:
            bm, cpu, running, waiting, swapped = _scene(rng, mode, cpu_blocks)
            want = max(running, key=lambda s: s.priority)
            table, held = bm.block_table(want.seq_id), bm.num_tokens[want.seq_id]
            fits = cpu.can_allocate(held)
            free_before, waiting_before = bm.num_free_blocks, list(waiting)
            desc = ", ".join(f"seq {s.seq_id} (arrived {s.arrival_time}, {len(bm.block_table(s.seq_id))} blocks)"
                             for s in running)
            c.case = case = f"mode={mode!r}, CPU pool of {cpu.allocator.num_blocks} blocks, running: {desc}"
            try:
                result = student_fn(running, bm, cpu, waiting, swapped, mode)
            except OutOfBlocksError:
                c.check(False, case=case, expected="a fall back to recompute (the CPU pool is too small)",
                        got="OutOfBlocksError raised",
                        hint="before swapping, ask cpu_block_manager.can_allocate(tokens); when the CPU pool is "
                        "full, preempt by recompute instead")
            c.check(isinstance(result, tuple) and len(result) == 2, case=case, expected="a tuple (victim, mapping)",
                    got=repr(result)[:80], hint="return the preempted Sequence and the list of block copies")
            victim, mapping = result
            c.check(victim is want, case=case, expected=f"seq {want.seq_id} (priority {want.priority})",
                    got=f"seq {getattr(victim, 'seq_id', victim)}",
                    hint="preempt the lowest-priority sequence: the one with the LARGEST seq.priority (latest arrival, "
                         "then largest id), so that the oldest requests keep making progress")
            c.check(want not in running, case=case, expected="the victim removed from running", got="still in running",
                    hint="running.remove(victim)")
            c.check(want.seq_id not in bm.block_tables and bm.num_free_blocks == free_before + len(table), case=case,
                    expected=f"its {len(table)} device blocks freed", got=f"{bm.num_free_blocks - free_before} freed",
                    hint="block_manager.free(victim.seq_id) gives its blocks back (after copying them, for a swap)")
            if mode == "swap" and fits:
                c.check(want.seq_id in cpu.block_tables, case=case, expected="CPU blocks allocated for the victim",
                        got="none", hint="cpu_block_manager.allocate(seq_id, block_manager.num_tokens[seq_id])")
                c.check_equal(list(mapping), list(zip(table, cpu.block_table(want.seq_id))), case=case + ": mapping",
                              hint="pair the victim's device blocks with its new CPU blocks, in order: "
                                   "list(zip(device_table, cpu_table)); read the device table BEFORE freeing it")
                c.check(swapped and swapped[-1] is want and want.status == SWAPPED, case=case,
                        expected="the victim at the end of swapped, status 'swapped'",
                        got=f"swapped={[s.seq_id for s in swapped]}, status {want.status!r}",
                        hint="swapped.append(victim); victim.status = SWAPPED")
                c.check(want.num_computed_tokens == held, case=case, expected="num_computed_tokens unchanged",
                        got=str(want.num_computed_tokens), hint="a swap keeps the K/V: nothing must be recomputed")
            else:
                why = " (the CPU pool is too small: fall back to recompute)" if mode == "swap" else ""
                c.check_equal(list(mapping), [], case=case + ": mapping" + why,
                              hint="recompute copies nothing: return an empty mapping" + why)
                c.check(want.seq_id not in cpu.block_tables, case=case + why, expected="no CPU blocks used",
                        got="CPU blocks allocated", hint="check cpu_block_manager.can_allocate(tokens) before swapping")
                c.check(want.num_computed_tokens == 0, case=case + why, expected="num_computed_tokens = 0",
                        got=str(want.num_computed_tokens),
                        hint="its K/V is gone: set num_computed_tokens = 0 so that prompt + generated tokens are "
                             "prefilled again when it is readmitted")
                c.check(waiting == [want] + waiting_before and want.status == WAITING, case=case + why,
                        expected="the victim first in waiting, status 'waiting'",
                        got=f"waiting={[s.seq_id for s in waiting]}, status {want.status!r}",
                        hint="waiting.insert(0, victim): it arrived before everyone waiting, so it goes first")
    return c.result


# ---------------------------------------------------------------- 3. the token budget
def _split(decodes, prefills, budget, chunked=True):
    out = []
    for seq_id in decodes:
        if budget == 0:
            break
        out.append((seq_id, 1))
        budget -= 1
    for seq_id, remaining in prefills:
        n = min(remaining, budget) if chunked else (remaining if remaining <= budget else 0)
        if n == 0:
            break
        out.append((seq_id, n))
        budget -= n
    return out


def _split_hint(got, decodes, prefills, budget, chunked) -> str:
    """The hint of the most specific mistake that explains a wrong split (checked in that order)."""
    if isinstance(got, list) and any(n == 0 for _, n in got):
        return "leave out sequences that get 0 tokens: an empty chunk would still cost a row of the batch"
    if isinstance(got, list) and got and decodes and got[0][0] != decodes[0] and prefills:
        return ("decodes first: each needs only 1 token, and a running request must not wait a whole step behind a "
                "prompt (that stall is what chunked prefill removes)")
    if isinstance(got, list) and sum(n for _, n in got) > budget:
        return "the step's tokens must not exceed the budget: a chunk is min(remaining, what is left)"
    if not chunked:
        return ("without chunking a prompt runs whole or not at all, and the queue stops at the first that does not "
                "fit (first come, first served)")
    return ("chunked: decodes take 1 token each while the budget lasts, then each prefill gets a chunk of "
            "min(remaining, left) tokens, even when its whole prompt does not fit")


def check_split_budget(student_fn) -> CheckResult:
    """``split_budget(decodes, prefills, budget, chunked) -> [(seq_id, num_tokens), ...]``: decodes (ids) first,
    one token each; then prefills ``(seq_id, remaining prompt tokens)`` in order, each taking what it needs of what
    is left (``chunked``: a chunk of min(remaining, left); not chunked: the whole prompt or nothing, stopping at the
    first that does not fit). No entry with 0 tokens; the total never exceeds ``budget``."""
    cases = [([], [], 8, True), ([1, 2], [], 8, True), ([1, 2, 3], [], 2, True), ([], [(5, 20)], 8, True),
             ([1, 2], [(5, 20)], 8, True), ([1], [(5, 3), (6, 10)], 8, True), ([1, 2], [(5, 6)], 8, True),
             ([1, 2], [(5, 7), (6, 1)], 8, False), ([1], [(5, 4), (6, 2)], 8, False), ([1, 2, 3, 4], [(9, 4)], 4, True)]
    rng = random.Random(11)
    for _ in range(40):
        ids = rng.sample(range(100), 12)
        decodes = ids[:rng.randint(0, 6)]
        prefills = [(i, rng.randint(1, 40)) for i in ids[6:6 + rng.randint(0, 4)]]
        cases.append((decodes, prefills, rng.randint(1, 48), rng.random() < 0.6))
    with Checker("split_budget", points=2) as c:
        for decodes, prefills, budget, chunked in cases:
            c.case = f"decodes={decodes}, prefills={prefills}, budget={budget}, chunked={chunked}"
            got = student_fn(list(decodes), list(prefills), budget, chunked)
            got = [tuple(x) for x in got] if isinstance(got, (list, tuple)) else got
            want = _split(decodes, prefills, budget, chunked)
            hint = _split_hint(got, decodes, prefills, budget, chunked)
            c.check_equal(got, want, case=f"decodes={decodes}, prefills={prefills}, budget={budget}, chunked={chunked}",
                          hint=hint)
    return c.result


# ---------------------------------------------------------------- 4. prefill chunks through the block table
def _paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, *, mask="bottom_right",
                   read_all_blocks=False, kv_head=lambda h, G, Hkv: h // G, scale=True):
    """The model answer, and (through its keywords) the usual mistakes: the mask aligned top-left or left out, every
    block of the table read and taken for the sequence's tokens, query head h read from kv head h % Hkv, no scale."""
    import torch

    T, Hq, D = q.shape
    _, P, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    out = torch.zeros_like(q)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for s, L in enumerate(lens):
        a, b = cu[s], cu[s + 1]
        n = b - a
        num_blocks = block_tables.shape[1] if read_all_blocks else -(-L // P)
        blocks = block_tables[s, :num_blocks].long()
        k = k_cache[blocks].reshape(-1, Hkv, D)                              # [num_blocks * P, Hkv, D]
        v = v_cache[blocks].reshape(-1, Hkv, D)
        if not read_all_blocks:
            k, v = k[:L], v[:L]                                              # tokens 0 ... L-1
        # query i sits at position L - n + i (the mistake: every slot read taken for a token, L = len(k))
        pos_q = torch.arange(n) + (k.shape[0] - n if mask == "bottom_right" else 0)
        visible = torch.arange(k.shape[0])[None, :] <= pos_q[:, None]        # [n, keys]
        for h in range(Hq):
            kh, vh = k[:, kv_head(h, G, Hkv)].float(), v[:, kv_head(h, G, Hkv)].float()
            scores = q[a:b, h].float() @ kh.T * (D ** -0.5 if scale else 1.0)     # [n, keys]
            if mask != "none":
                scores = scores.masked_fill(~visible, float("-inf"))
            out[a:b, h] = (torch.softmax(scores, dim=-1) @ vh).to(q.dtype)
    return out


def _prefill_case(seq_lens, chunk_lens, Hq, Hkv, D, P, seed):
    """A paged cache with the sequences' blocks scattered (a physical order unlike the logical one), block tables
    padded with a block full of large values (read past L, and the answer is far off), varlen queries."""
    import torch

    g = torch.Generator().manual_seed(seed)
    need = [-(-L // P) for L in seq_lens]
    width = max(need) + 1
    N = sum(need) + 1
    perm = torch.randperm(N - 1, generator=g) + 1                            # block 0: the padding block
    k_cache = torch.randn(N, P, Hkv, D, generator=g)
    v_cache = torch.randn(N, P, Hkv, D, generator=g)
    k_cache[0], v_cache[0] = 30.0, 30.0                                      # what a read past L would see
    tables, i = torch.zeros(len(seq_lens), width, dtype=torch.int32), 0
    for s, m in enumerate(need):
        tables[s, :m] = perm[i:i + m].to(torch.int32)
        i += m
    cu = torch.tensor([0] + list(torch.tensor(chunk_lens).cumsum(0).tolist()), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), Hq, D, generator=g)
    return q, k_cache, v_cache, tables, cu, torch.tensor(seq_lens, dtype=torch.int32)


# the usual mistakes of paged_prefill (keywords of _paged_prefill) and their hints
_PREFILL_MISTAKES = [
    (dict(mask="top_left"), "the causal mask is aligned bottom-right: the chunk's n queries are the LAST n of "
                            "the sequence's L tokens, so query i sits at position L - n + i and sees keys "
                            "0 ... L-n+i, its cached prefix included (top-left alignment hides the prefix)"),
    (dict(mask="none"), "prefill is causal: query i must not see the keys after its own position L - n + i"),
    (dict(read_all_blocks=True), "the sequence is its first L tokens only: blocks past ceil(L / P) in the "
                                 "table, and the slots past L in the last block, hold no token of it (and "
                                 "counting them moves every query's position L - n + i)"),
    (dict(kv_head=lambda h, G, Hkv: h % Hkv), "grouped-query attention: query heads h*G ... h*G+G-1 share kv "
                                              "head h, so query head h reads kv head h // G (not h % Hkv)"),
    (dict(scale=False), "scale the scores by 1 / sqrt(D) before the softmax"),
]


def check_paged_prefill(student_fn) -> CheckResult:
    """``paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens) -> out``: q [T, Hq, D] holds the
    prefill chunks of one step (chunk s is rows cu_seqlens_q[s] ... cu_seqlens_q[s+1]-1); sequence s has seq_lens[s]
    = L tokens of K/V in the paged caches [N, P, Hkv, D] (its cached prefix, then the chunk), in the blocks
    block_tables[s, :ceil(L / P)]. Query i of a chunk of n sits at position L - n + i and attends keys 0 ... L-n+i,
    softmax(q k^T / sqrt(D)) v; query head h reads kv head h // (Hq / Hkv). Returns out [T, Hq, D], q's dtype."""
    import torch

    # (seq_lens, chunk_lens, Hq, Hkv, D, P): a whole prompt first (no prefix: top-left and bottom-right agree), then
    # chunks after a cached prefix, one-token chunks, L a multiple of P and not, P = 1, GQA groups 1, 2 and 4
    cases = [([5], [5], 1, 1, 4, 4), ([9], [3], 1, 1, 4, 4), ([8], [4], 2, 1, 8, 4), ([7, 3], [2, 3], 2, 2, 4, 2),
             ([6], [1], 4, 1, 4, 4), ([12, 5, 9], [4, 5, 1], 4, 2, 8, 4), ([5], [2], 2, 2, 4, 1)]
    rng = random.Random(4)
    for _ in range(12):
        num_seqs = rng.randint(1, 4)
        lens = [rng.randint(1, 40) for _ in range(num_seqs)]
        Hkv, G = rng.choice([(1, 1), (2, 1), (1, 4), (2, 2)])
        cases.append((lens, [rng.randint(1, L) for L in lens], Hkv * G, Hkv, rng.choice([4, 8]),
                      rng.choice([1, 4, 16])))
    with Checker("paged_prefill", points=2) as c:
        for i, (lens, chunks, Hq, Hkv, D, P) in enumerate(cases):
            args = _prefill_case(lens, chunks, Hq, Hkv, D, P, seed=100 + i)
            case = (f"seq_lens={lens}, chunk lengths={chunks}, Hq={Hq}, Hkv={Hkv}, D={D}, block_size P={P} "
                    f"(block_tables {list(args[3].shape)}, padded with block 0)")
            got = student_fn(*(a.clone() for a in args))
            want = _paged_prefill(*args)
            if not (isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype):
                c.check(False, case=case, expected=f"a tensor of shape {list(want.shape)} and dtype {want.dtype}",
                        got=(f"shape {list(got.shape)}, dtype {got.dtype}" if isinstance(got, torch.Tensor)
                             else type(got).__name__),
                        hint="out holds one row per query token of the step, [T, Hq, D], in q's dtype")
            hint = next((h for kw, h in _PREFILL_MISTAKES
                         if torch.allclose(got, _paged_prefill(*args, **kw), atol=1e-4)),
                        "compare one chunk by hand: its keys are the first L tokens of its sequence, read block by "
                        "block through block_tables[s] (slot j is block block_tables[s, j // P], row j % P)")
            c.check_close(got, want, case=case, rtol=1e-4, atol=1e-4, hint=hint)
    return c.result


# ---------------------------------------------------------------- end to end: the decisions inside LLMEngine
_PIECES = ("admit", "preempt", "split_budget", "paged_prefill")
_E2E_ENGINE = dict(block_size=4, num_blocks=16, max_num_seqs=6, max_num_batched_tokens=24, preemption_mode="swap",
                   num_cpu_blocks=4, use_kernels=False)
_E2E_WATERMARK = 1          # blocks admission keeps free (the library's 1% of 16 blocks is 0)
_E2E_MAX_STEPS = 400


class _PieceError(Exception):
    """A decision the engine cannot use, or one that breaks a scheduling rule: the message names it."""


def _library_preempt(running, block_manager, cpu_block_manager, waiting, swapped, mode):
    victim = max(running, key=lambda s: s.priority)
    running.remove(victim)
    held = block_manager.num_tokens[victim.seq_id]
    if mode == "swap" and cpu_block_manager.can_allocate(held):
        cpu_table = cpu_block_manager.allocate(victim.seq_id, held)
        mapping = list(zip(block_manager.block_table(victim.seq_id), cpu_table))
        block_manager.free(victim.seq_id)
        victim.status = SWAPPED
        swapped.append(victim)
        return victim, mapping
    block_manager.free(victim.seq_id)
    victim.num_computed_tokens = 0
    victim.status = WAITING
    waiting.insert(0, victim)
    return victim, []


def _scheduler_class():
    from course_lib.serving.scheduler import Scheduler
    from course_lib.serving.sequence import ScheduledChunk, SchedulerOutput

    class LearnerScheduler(Scheduler):
        """The engine's scheduler with its three decisions made by ``pieces`` (admit, preempt, split_budget), each
        checked where it is made. A step: (1) the running sequences' tokens (split_budget over their decodes and
        prompt chunks); a sequence short of a block preempts the lowest-priority one not yet scheduled (preempt),
        itself if it is that one; (2) swapped sequences come back, as the library's scheduler does; (3) waiting
        requests are admitted (admit, under the token budget of a whole step: no more prompt tokens than one step
        prefills) and get chunks of what is left of this step's budget (split_budget)."""

        pieces = (None, None, None)

        def schedule(self):
            out = SchedulerOutput()
            self.num_steps += 1
            if self.num_steps > _E2E_MAX_STEPS:
                raise _PieceError(f"the requests did not finish in {_E2E_MAX_STEPS} steps (each wave needs about 25)")
            budget, scheduled = self.max_num_batched_tokens, []
            queue = sorted(self.running, key=lambda s: s.priority)
            budget = self._run_plan(out, queue, queue, budget, scheduled)
            budget = self._schedule_swapped(out, budget)
            if self.waiting and not self.swapped and not out.preempted:
                newcomers = self._admit(budget)
                self._run_plan(out, newcomers, [], budget, scheduled)
            out.chunks.sort(key=lambda c: c.num_tokens > 1)
            if not out.chunks:
                raise _PieceError(f"step {self.num_steps} scheduled no token although {len(self.running)} running, "
                                  f"{len(self.waiting)} waiting and {len(self.swapped)} swapped sequence(s) are "
                                  "unfinished")
            return out

        def _split(self, seqs, budget):
            decodes = [s.seq_id for s in seqs if s.num_tokens - s.num_computed_tokens == 1]
            prefills = [(s.seq_id, s.num_tokens - s.num_computed_tokens) for s in seqs
                        if s.num_tokens - s.num_computed_tokens > 1]
            fn = self.pieces[2] or _split
            got = fn(list(decodes), list(prefills), budget, True)
            if isinstance(got, (list, tuple)) and all(isinstance(x, (list, tuple)) for x in got):
                got = [tuple(x) for x in got]
            want = _split(decodes, prefills, budget, True)
            if got != want:
                raise _PieceError(f"split_budget(decodes={decodes}, prefills={prefills}, budget={budget}, "
                                  f"chunked=True) returned {str(got)[:100]} in step {self.num_steps}, expected {want}: "
                                  + _split_hint(got, decodes, prefills, budget, True))
            return got

        def _run_plan(self, out, seqs, candidates, budget, scheduled):
            """Schedule split_budget's tokens of ``seqs``; a sequence short of blocks preempts from ``candidates``."""
            by_id = {s.seq_id: s for s in seqs}
            for seq_id, n in self._split(seqs, budget):
                seq = by_id[seq_id]
                if seq not in self.running:               # preempted by a sequence scheduled before it
                    continue
                while not self._can_reserve(seq, n):
                    victim = self._preempt_one([s for s in candidates if s in self.running and s not in scheduled],
                                               out)
                    if victim is seq:
                        break
                else:
                    self._reserve(seq, n)
                    out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
                    scheduled.append(seq)
                    budget -= n
            return budget

        def _preempt_one(self, candidates, out):
            fn = self.pieces[1] or _library_preempt
            want = max(candidates, key=lambda s: s.priority)
            where = (f"preempt(running=seqs {[s.seq_id for s in candidates]}, ..., mode={self.preemption_mode!r}) in "
                     f"step {self.num_steps}")
            table = self.block_manager.block_table(want.seq_id)
            got = fn(list(candidates), self.block_manager, self.cpu_block_manager, self.waiting, self.swapped,
                     self.preemption_mode)
            if not (isinstance(got, tuple) and len(got) == 2 and got[0] is want):
                raise _PieceError(f"{where} returned {str(got)[:80]}: expected (seq {want.seq_id}, mapping), the "
                                  "sequence with the LARGEST seq.priority (the latest arrival)")
            victim, mapping = got
            self.running.remove(victim)
            places = [q for q in (self.waiting, self.swapped, self.running) if victim in q]
            if len(places) != 1 or places[0] is self.running:
                raise _PieceError(f"{where}: seq {victim.seq_id} is now in {len(places)} of waiting / swapped: a "
                                  "preempted sequence goes to exactly one of them, or its request is lost")
            if places[0] is self.waiting and self.waiting[0] is not victim:
                raise _PieceError(f"{where} put seq {victim.seq_id} at position {self.waiting.index(victim)} of "
                                  "waiting: waiting.insert(0, victim), it arrived before everyone waiting")
            if victim.seq_id in self.block_manager.block_tables:
                raise _PieceError(f"{where} kept seq {victim.seq_id}'s device blocks: block_manager.free(seq_id)")
            swapped = places[0] is self.swapped
            if swapped and list(mapping) != list(zip(table, self.cpu_block_manager.block_table(victim.seq_id))):
                raise _PieceError(f"{where} returned the mapping {list(mapping)} for device blocks {table}: pair "
                                  "each device block with its CPU block, in order (read the table BEFORE freeing)")
            mode = "swap" if swapped else "recompute"
            if swapped:
                self._preempted_at[victim.seq_id] = self.num_steps
                self.num_swap_ops["out"] += 1
                out.swap_out += list(mapping)
            self.num_preemptions[mode] += 1
            out.preempted.append((victim.seq_id, mode))
            return victim

        def _admit(self, budget):
            fn = self.pieces[0] or _admit
            bm, P = self.block_manager, self.block_manager.block_size
            args = ([(s.seq_id, s.num_tokens) for s in self.waiting], bm.num_free_blocks, P, len(self.running),
                    self.max_num_seqs, self.max_num_batched_tokens, self.watermark_blocks)
            got = fn(*args)
            got = list(got) if isinstance(got, (list, tuple)) else got
            want = _admit(*args)
            if got != want:
                raise _PieceError(f"admit(waiting={args[0]}, num_free_blocks={args[1]}, block_size={P}, "
                                  f"num_running={args[3]}, max_num_seqs={args[4]}, token_budget={args[5]}, "
                                  f"watermark={args[6]}) returned {str(got)[:80]} in step {self.num_steps}, expected "
                                  f"{want}: " + _admission_hint(got, args))
            newcomers = []
            for seq in list(self.waiting[:len(got)]):
                self.waiting.remove(seq)
                self.allocate(seq)
                seq.status = RUNNING
                self.running.append(seq)
                newcomers.append(seq)
            return newcomers

    return LearnerScheduler


def continuous_batching_generate(admit_fn, preempt_fn, split_fn, prefill_fn, waves, plain=False):
    """Serve ``waves`` [[(token ids, max_tokens), ...], ...] with one ``LLMEngine`` on the shipped tiny model
    (float32), one ``generate`` call per wave: 16 blocks of 4 tokens, 6 sequences, 24 tokens a step, preemption
    by swap to 4 CPU blocks (by recompute when they are full), its scheduler's decisions and its prefill attention
    the given functions (None: the library's); ``plain``: the library's engine as it is. Returns {"tokens": [...]
    per request, "steps": [tokens of each step], "preemptions": {mode: count}, "chunks": prompt chunks after a
    prefix}, or {"error": message} when a decision broke a rule. Runs where the learner's code lives (the grader
    runs it in the notebook's kernel)."""
    import torch

    from course_lib.grading.lesson01 import _float32_target
    from course_lib.model.sampling import SamplingParams
    from course_lib.serving.engine import LLMEngine

    model = _float32_target()[0]
    engine = LLMEngine(model, **_E2E_ENGINE)
    if not plain:
        cls, new_run = _scheduler_class(), engine._new_run

        def learner_run():
            new_run()
            engine.scheduler.__class__ = cls       # the same scheduler, its decisions made by the pieces
            engine.scheduler.pieces = (admit_fn, preempt_fn, split_fn)
            engine.scheduler.watermark_blocks = _E2E_WATERMARK
        engine._new_run = learner_run
        if prefill_fn is not None:
            engine.pool.prefill = _prefill_with(engine.pool, prefill_fn)
    result = {"tokens": [], "steps": [], "preemptions": {"swap": 0, "recompute": 0}, "chunks": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # a tiny model: one thread is as fast, and steady when other processes run
    try:
        with torch.no_grad():
            for wave in waves:
                outs = engine.generate([p for p, _ in wave], [SamplingParams(max_tokens=n) for _, n in wave],
                                       use_tqdm=False)
                m = engine.metrics
                result["tokens"] += [o.token_ids for o in outs]
                result["steps"] += [s.num_prefill_tokens + s.num_decode_tokens for s in m.steps]
                for mode, n in m.preemptions.items():
                    result["preemptions"][mode] += n
                result["chunks"] += sum(1 for s in m.steps for rid, n in s.composition if n > 1) - len(wave)
    except _PieceError as err:
        return {"error": str(err)}
    finally:
        torch.set_num_threads(threads)
    return result


def _prefill_with(pool, prefill_fn):
    """``KVPool.prefill`` computed by the learner's ``paged_prefill`` over the pool's blocks of the layer; a result
    unlike the library's is reported with the hint of the mistake that explains it."""
    import torch

    def prefill(layer, q, block_tables, cu_seqlens_q, seq_lens, spans, use_kernels, *, out):
        args = (q, pool.k_caches[layer], pool.v_caches[layer], block_tables, cu_seqlens_q, seq_lens)
        got = prefill_fn(*(a.clone() for a in args))
        where = (f"paged_prefill for the chunks of {[n for _, n, _ in spans]} tokens of sequences of "
                 f"{seq_lens.tolist()} tokens (layer {layer})")
        if not (isinstance(got, torch.Tensor) and got.shape == out.shape and got.dtype == out.dtype):
            raise _PieceError(f"{where} returned {type(got).__name__} {list(getattr(got, 'shape', []))}: expected "
                              f"a tensor of q's shape {list(q.shape)} and dtype")
        want = _paged_prefill(*args)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise _PieceError(f"{where} differs from the library's by up to {(got - want).abs().max():.3g}: " + next(
                (h for kw, h in _PREFILL_MISTAKES if torch.allclose(got, _paged_prefill(*args, **kw), atol=1e-4)),
                "every chunk attends to the first L tokens of its sequence through its block table"))
        out.copy_(got)
    return prefill


def _e2e_waves(tok) -> list[list[tuple[list[int], int]]]:
    """Two waves of ten requests (6 ... 16 prompt tokens, 4 ... 8 new ones), one ``generate`` call each: too many
    for 16 blocks at once. In the first, a prompt is cut into chunks (its second chunk attends to the first) and
    sequences are swapped out; in the second, the CPU pool is full and a sequence is preempted by recompute."""
    from course_lib.model.corpus import load_text

    text = tok.encode(load_text("validation"))
    waves = [[(12, 7), (6, 6), (14, 7), (12, 6), (13, 6), (15, 5), (14, 5), (10, 5), (7, 8), (10, 8)],
             [(6, 4), (7, 6), (8, 6), (10, 8), (9, 8), (6, 8), (16, 5), (12, 7), (14, 6), (14, 7)]]
    return [[(text[i * 64: i * 64 + n], m) for i, (n, m) in enumerate(wave)] for wave in waves]


def check_end_to_end(admit_fn, preempt_fn, split_fn, prefill_fn) -> CheckResult:
    """Your four functions run ``LLMEngine``: twenty requests in two ``generate`` calls on 16 blocks of 4 tokens,
    24 tokens a step, so that sequences are preempted (by swap, and by recompute when the CPU pool is full) and
    prompts are cut into chunks. Each decision is checked where the engine makes it, against the rules of its
    exercise (paged_prefill against the library's attention); every request must finish with the tokens of the
    library's engine, and no step may exceed the token budget. When the tokens differ, each function runs alone
    with the library's others to name the one that changes them."""
    from course_lib.grading.lesson01 import _float32_target
    from course_lib.grading.remote import run_beside

    waves = _e2e_waves(_float32_target()[1])
    prompts = [p for wave in waves for p in wave]
    mine = (admit_fn, preempt_fn, split_fn, prefill_fn)

    def serve(*pieces):
        return run_beside(admit_fn, "course_lib.grading.lesson04:continuous_batching_generate", *pieces, waves)

    with Checker("end_to_end", points=2, timeout_s=120) as c:
        want = _e2e_want()
        c.case = (f"{len(prompts)} requests ({', '.join(str(len(p)) for p, _ in prompts)} prompt tokens) in "
                  f"{len(waves)} generate calls, block size "
                  f"{_E2E_ENGINE['block_size']}, {_E2E_ENGINE['num_blocks']} blocks, max_num_seqs "
                  f"{_E2E_ENGINE['max_num_seqs']}, token budget {_E2E_ENGINE['max_num_batched_tokens']}")
        got = c.run_together(serve, mine, exercises="1, 2, 3 and 4", expected="decisions the engine can use")
        budget = _E2E_ENGINE["max_num_batched_tokens"]
        c.check(max(got["steps"]) <= budget, expected=f"at most {budget} tokens in every step",
                got=f"{max(got['steps'])} tokens in a step", hint="the step's tokens must not exceed the budget")
        c.check_equal(len(got["tokens"]), len(prompts), case=c.case + ": requests finished",
                      hint="a preempted request must come back (waiting or swapped), never be lost")
        if got["tokens"] != want:
            guilty = [name for k, name in enumerate(_PIECES)
                      if serve(*[p if j == k else None for j, p in enumerate(mine)]).get("tokens") != want]
            hint = (f"with the library's other functions, your {' and your '.join(guilty)} alone already "
                    f"change{'s' * (len(guilty) == 1)} the tokens" if guilty else
                    "each of your functions works with the library's others, but not together")
            hint += _E2E_HINTS.get(guilty[0] if guilty else None, "")
            i = next(r for r in range(len(want)) if got["tokens"][r] != want[r])
            c.check_equal(got["tokens"][i], want[i], case=f"{c.case}: request {i}'s tokens vs the library's engine",
                          hint=hint)
        c.cases_passed += 1
    return c.result


_E2E_HINTS = {
    "preempt": ": a sequence preempted by recompute has lost its K/V (num_computed_tokens = 0); one swapped out must "
               "have its blocks copied to the CPU blocks of its mapping",
    None: "",
}


@functools.lru_cache(maxsize=1)
def _e2e_want():
    from course_lib.grading.lesson01 import _float32_target

    return continuous_batching_generate(None, None, None, None, _e2e_waves(_float32_target()[1]),
                                        plain=True)["tokens"]
