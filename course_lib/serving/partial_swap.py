"""Partial, tail-first swap (lesson 04): a preempted sequence moves only the blocks a step needs, from its tail, and
keeps its prefix on the device (``LLMEngine(..., preemption_mode="swap", enable_partial_swap=True)``).

Whole-sequence swap (vLLM's ``preemption_mode="swap"``, the scheduler's default) copies every block of a victim to
the CPU pool and, when it resumes, every block back: a victim that was preempted because one other sequence
needed one more block still moves its whole context twice. Partial swap moves what is needed, when it is needed:

* **preempt**: the victim gives back blocks from its end (its newest tokens) until the sequence that needed room
  has it; its earlier blocks stay on the device, in its block table. A sequence that preempts itself (no one
  younger is left to preempt) moves nothing yet: it is paused, holding its blocks;
* **reclaim**: whoever needs blocks later (a running sequence, or the oldest swapped one resuming) first takes
  them from the blocks that swapped sequences still hold, youngest sequence first, again tail first. A swapped
  sequence's device blocks are never lost: at worst they go to the CPU pool, as whole swap would have sent them
  at once (or, with the CPU pool full, the sequence falls back to recompute, as whole swap does);
* **swap in**: a resuming sequence copies back only the blocks it moved (``BlockManager.append_slots`` gives them
  new device blocks after the ones it kept); a sequence that moved nothing resumes without any copy.

The CPU pool holds each swapped sequence's moved blocks in token order: its last piece moved first, and each later
piece goes in front of it (``BlockManager.prepend_blocks``).

**What this follows and what it simplifies.** The Q&A document (its Q3) says KsanaLLM swaps "from tail to head,
keeping prefix blocks". Its source (``src/ksana_llm/cache_manager/prefix_cache_manager.cpp``,
``PrefixCacheManager::SwapoutRequestAsync``, read 2026-12) walks a request's blocks from tail to head and skips the
blocks that another running request still references, which are prefix blocks; every other block of the request
is swapped out, asynchronously on a thread pool, and merged back into the prefix tree at swap-in
(``MergeSwapinRequest``). Moving only the blocks one step needs, and taking a swapped sequence's remaining blocks
later on demand, is this course's own variant, not KsanaLLM's. Our copies are synchronous at the start of the
step (``KVPool.swap_out`` / ``swap_in``, queued on one CUDA stream on a GPU). A swapped-in tail is not matched
against the prefix cache (the whole-sequence path of ``Scheduler._swap_in`` is, lesson 05); the blocks it brings
back are merged with cached copies once they are full again (``PrefixCachingBlockManager.cache_blocks``).
"""
from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from course_lib.serving.sequence import RUNNING, SWAPPED, WAITING, SchedulerOutput, Sequence

if TYPE_CHECKING:
    from course_lib.serving.scheduler import Scheduler


def held(sched: Scheduler, seq: Sequence) -> tuple[int, int]:
    """(blocks seq still holds on the device, tokens it holds in all: on the device + in the CPU pool)."""
    gpu, cpu, sid = sched.block_manager, sched.cpu_block_manager, seq.seq_id
    resident = len(gpu.block_tables[sid]) if sid in gpu.block_tables else 0
    return resident, gpu.num_tokens.get(sid, 0) + (cpu.num_tokens.get(sid, 0) if cpu is not None else 0)


def _blocks_to_move(sched: Scheduler, seq_id: int, deficit: float) -> tuple[int, int]:
    """(k, freed): moving seq's last k device blocks frees ``freed`` >= deficit blocks (or as many as it can). A
    block frees memory when seq is its only user, or its only user besides the prefix cache (it becomes evictable);
    a block another sequence shares frees nothing, so k stops at the last block that does."""
    gpu = sched.block_manager
    ref_counts = gpu.allocator.ref_counts
    cache = gpu.prefix_cache if sched.prefix_caching else None
    k = freed = 0
    for i, b in enumerate(reversed(gpu.block_tables[seq_id]), 1):
        if freed >= deficit:
            break
        if ref_counts[b] == 1 or (cache is not None and ref_counts[b] == 2 and b in cache):
            freed, k = freed + 1, i
    return k, freed


def _move_tail(sched: Scheduler, seq: Sequence, k: int, out: SchedulerOutput) -> bool:
    """Copy seq's last k device blocks to the CPU pool and free them; False (nothing done) when the pool is full."""
    if k == 0:
        return True
    gpu, cpu, sid = sched.block_manager, sched.cpu_block_manager, seq.seq_id
    if cpu.num_free_blocks < k:
        return False
    before = gpu.num_tokens[sid]
    blocks = gpu.free_tail(sid, k)
    if sid in cpu.block_tables:                 # a later piece: it goes before the pieces moved earlier
        cpu_blocks = cpu.prepend_blocks(sid, k)
    else:                                       # the first piece ends with the sequence's (partly filled) last block
        cpu_blocks = cpu.allocate(sid, before - gpu.num_tokens[sid])
    if not gpu.block_tables[sid]:               # all of it moved: no device blocks left (resumes as a whole swap)
        gpu.free(sid)
    out.swap_out += list(zip(blocks, cpu_blocks))
    sched.num_swap_ops["out"] += 1
    return True


def _recompute(sched: Scheduler, seq: Sequence, out: SchedulerOutput) -> None:
    """The fallback when the CPU pool is full: seq gives back every block (device and CPU) and recomputes later."""
    for bm in (sched.block_manager, sched.cpu_block_manager):
        if seq.seq_id in bm.block_tables:
            bm.free(seq.seq_id)
    if seq.status == SWAPPED:
        sched.swapped.remove(seq)
    sched._preempted_at.pop(seq.seq_id, None)
    sched.num_recomputed_tokens += seq.num_computed_tokens
    seq.num_computed_tokens = 0
    seq.status = WAITING
    bisect.insort(sched.waiting, seq, key=lambda s: s.priority)
    sched.num_preemptions["recompute"] += 1
    out.preempted.append((seq.seq_id, "recompute"))


def preempt(sched: Scheduler, seq: Sequence, deficit: int, out: SchedulerOutput) -> None:
    """Preempt running seq by partial swap: move the fewest tail blocks that free ``deficit`` blocks (0: none)."""
    k, _ = _blocks_to_move(sched, seq.seq_id, deficit)
    if not _move_tail(sched, seq, k, out):
        _recompute(sched, seq, out)
        return
    seq.status = SWAPPED
    bisect.insort(sched.swapped, seq, key=lambda s: s.priority)
    sched.num_preemptions["swap"] += 1
    out.preempted.append((seq.seq_id, "swap"))


def reclaim(sched: Scheduler, deficit: int, out: SchedulerOutput, *, keep: Sequence | None = None,
            all_or_none: bool = False) -> bool:
    """Free ``deficit`` blocks from the device blocks that swapped sequences (all but ``keep``) still hold, youngest
    sequence first, tail first. With ``all_or_none`` nothing moves unless the whole deficit can be freed.
    Returns whether anything was freed."""
    gpu = sched.block_manager
    donors = [s for s in reversed(sched.swapped) if s is not keep and s.seq_id in gpu.block_tables]
    if all_or_none and sum(_blocks_to_move(sched, s.seq_id, float("inf"))[1] for s in donors) < deficit:
        return False
    released = False
    for s in donors:
        if deficit <= 0:
            break
        k, freed = _blocks_to_move(sched, s.seq_id, deficit)
        if freed == 0:
            continue
        before = gpu.num_free_blocks
        if not _move_tail(sched, s, k, out):
            _recompute(sched, s, out)
        deficit -= gpu.num_free_blocks - before
        released = True
    return released


def swap_in(sched: Scheduler, seq: Sequence, out: SchedulerOutput) -> None:
    """Resume a swapped seq that kept blocks on the device: new device blocks after them for the blocks it moved
    (if any), and copies of only those."""
    gpu, cpu, sid = sched.block_manager, sched.cpu_block_manager, seq.seq_id
    if sid in cpu.block_tables:
        resident = len(gpu.block_tables[sid])
        cpu_table = cpu.block_table(sid)
        _, copies = gpu.append_slots(sid, cpu.num_tokens[sid])
        assert not copies, "the blocks kept on the device are full: nothing shared is written"
        out.swap_in += list(zip(cpu_table, gpu.block_table(sid)[resident:]))
        cpu.free(sid)
        sched.num_swap_ops["in"] += 1
    seq.status = RUNNING
    sched.running.append(seq)
