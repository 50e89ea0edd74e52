"""The scheduler of a continuous-batching engine (lesson 04): which tokens of which sequences run in the next step.

Every step (one forward pass of the model) the scheduler picks, under three limits,

* ``max_num_seqs``            sequences in the running batch,
* ``max_num_batched_tokens``  tokens in one step (the **token budget**: a decode costs 1, a prefill its prompt),
* the free KV blocks of the ``BlockManager`` (lesson 02),

from three queues, in this order (vLLM's policy, first come first served), one method each:

1. **running** (``_schedule_running``): every running sequence decodes one token (decodes go first), or
   prefills its next chunk of prompt with what is left of the budget. When a sequence needs a new block and none
   is free, the *most recently arrived* running sequence is **preempted**: by **recompute** (its blocks are
   freed; it goes back to the waiting queue and its K/V is recomputed later, as a prefill of prompt + generated
   tokens) or by **swap** (its blocks are copied to a pool of CPU blocks and copied back later). A sequence with
   no room even after everyone else is preempted preempts itself.
2. **swapped** (``_schedule_swapped``): swapped-out sequences come back first (they are older than anything
   waiting), if no one was preempted in this step and their blocks fit.
3. **waiting** (``_schedule_waiting``): new requests are admitted while all three limits allow, with blocks for
   their whole prompt.

**Partial swap** (``partial_swap``, with ``preemption_mode="swap"``; ``course_lib.serving.partial_swap`` explains it):
a victim moves only as many of its blocks as the step needs, tail first, and keeps its prefix on the device; the
blocks a swapped sequence keeps are taken back (again tail first) when someone needs them, and a resuming sequence
copies in only what it moved.

**Chunked prefill** (Sarathi-Serve's chunked prefills with stall-free batching; DeepSpeed-FastGen's Dynamic
SplitFuse): with ``enable_chunked_prefill`` a prompt larger than what is left of the token budget is cut into chunks
that share steps with the running decodes, so a long prompt never stalls them for more than one budget's worth of
work. Without it a prompt is prefilled whole, in one step.

**Lookahead slots** (speculative decoding, ``course_lib.serving.spec_decode``): with ``num_lookahead_slots`` = k > 0 a
chunk that samples also gets up to k slots past the sequence's tokens, where the step writes the K/V of the
draft tokens it verifies; they count against the token budget (a decode then costs 1 + k). A step may then
append up to k + 1 tokens to a sequence (``update``). With ``lookahead_disable_by_batch_size`` = b, a step that
starts with b or more running sequences gets no lookahead slots (plain decodes).

The scheduler only does bookkeeping (block ids, token counts; the sequences and a step's plan are the dataclasses
of ``course_lib.serving.sequence``, imported here too). The engine (``course_lib.serving.engine``) runs the
model on the chunks it returns, copies the swapped blocks, and reports the sampled tokens with ``update``.
"""
from __future__ import annotations

import bisect
from collections import Counter

from course_lib.paging.block_manager import BlockManager
from course_lib.serving import partial_swap as tail
from course_lib.serving.prefix_cache import PrefixCachingBlockManager
from course_lib.serving.sequence import (FINISHED, RUNNING, SWAPPED, WAITING, ScheduledChunk, SchedulerOutput,
                                 Sequence)

PREEMPTION_MODES = ("recompute", "swap")


class Scheduler:
    """Waiting / running / swapped queues over a GPU ``BlockManager`` (and a CPU one for swapping)."""

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True, preemption_mode: str = "recompute",
                 cpu_block_manager: BlockManager | None = None, watermark: float = 0.01,
                 num_lookahead_slots: int = 0, lookahead_disable_by_batch_size: int | None = None,
                 partial_swap: bool = False):
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {preemption_mode!r}")
        if preemption_mode == "swap" and cpu_block_manager is None:
            raise ValueError("preemption_mode='swap' needs a cpu_block_manager (the CPU block pool)")
        if not isinstance(partial_swap, bool) or (partial_swap and preemption_mode != "swap"):
            raise ValueError(f"partial_swap must be True or False, and True only with preemption_mode='swap', got "
                             f"{partial_swap!r} with preemption_mode={preemption_mode!r}")
        self.partial_swap = partial_swap
        self.block_manager, self.cpu_block_manager = block_manager, cpu_block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len, self.enable_chunked_prefill = max_model_len, enable_chunked_prefill
        self.preemption_mode = preemption_mode
        if not isinstance(num_lookahead_slots, int) or num_lookahead_slots < 0:
            raise ValueError(f"num_lookahead_slots must be an int >= 0, got {num_lookahead_slots!r}")
        self.num_lookahead_slots = num_lookahead_slots     # speculative decoding: draft tokens per step and sequence
        self.lookahead_disable_by_batch_size = lookahead_disable_by_batch_size   # no drafts from this batch size on
        self._lookahead_on = True                          # this step's decision (schedule)
        # lesson 05: with a prefix-caching block manager, admissions start on the cached prefix of their tokens
        self.prefix_caching = isinstance(block_manager, PrefixCachingBlockManager)
        # Admission keeps a few blocks free, so that the sequences just admitted can grow a little before
        # anyone must be preempted (vLLM keeps 1% of the blocks).
        self.watermark_blocks = int(watermark * block_manager.allocator.num_blocks)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.num_preemptions: Counter = Counter()     # by mode
        self.num_recomputed_tokens = 0                # K/V thrown away by recompute preemptions
        self.num_swap_ops: Counter = Counter()        # "out" / "in": copies of one sequence's blocks in one step
        self.num_swap_in_cached_blocks = 0            # blocks a swap-in shared from the prefix cache instead of copying
        self.num_steps = 0                            # schedule() calls
        self._preempted_at: dict[int, int] = {}       # seq_id -> the step it was swapped out in
        self.resume_steps: list[int] = []             # per swap-in: steps from its preemption to its resumption

    # ---------------------------------------------------------------- queues
    def add(self, seq: Sequence) -> None:
        seq.status = WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.priority)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def max_blocks_per_seq(self) -> int:
        """Blocks that one sequence may need when it has the cache to itself (validation uses it)."""
        return self.block_manager.allocator.num_blocks - self.watermark_blocks

    def abort(self, seq: Sequence) -> None:
        """Take seq out of its queue and give back its blocks (on the device, or on the CPU when swapped)."""
        if seq.status == RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq.seq_id)
        elif seq.status == SWAPPED:
            self.swapped.remove(seq)
            for bm in (self.cpu_block_manager, self.block_manager):   # a partial swap keeps a prefix on the device
                if seq.seq_id in bm.block_tables:
                    bm.free(seq.seq_id)
        elif seq.status == WAITING:
            self.waiting.remove(seq)          # a waiting sequence holds no blocks (preemption freed them)
        self._preempted_at.pop(seq.seq_id, None)
        seq.status = FINISHED

    def free_all(self) -> None:
        """Give back every block (blocks the prefix cache holds stay cached: their K/V were complete) and empty
        every queue: what an engine does after a step failed midway."""
        for bm in filter(None, (self.block_manager, self.cpu_block_manager)):
            for seq_id in list(bm.block_tables):
                bm.free(seq_id)
        for queue in (self.waiting, self.running, self.swapped):
            queue.clear()
        self._preempted_at.clear()

    # ---------------------------------------------------------------- the step
    def schedule(self) -> SchedulerOutput:
        """The plan of the next step: the running sequences first, then the swapped ones, then the waiting ones,
        each phase spending what the phases before it left of the token budget."""
        out = SchedulerOutput()
        self.num_steps += 1
        limit = self.lookahead_disable_by_batch_size       # speculative decoding off for a step of a big batch
        self._lookahead_on = limit is None or len(self.running) < limit
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        budget = self._schedule_swapped(out, budget)
        self._schedule_waiting(out, budget)
        out.chunks.sort(key=lambda c: c.num_tokens > 1)   # one-token chunks (decodes) first: one batched kernel call
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """1. Running sequences: decodes first (one token each, so that no prompt chunk can stall them), then the
        chunks of prompts being prefilled; oldest first in each group. A sequence that needs a block when none is
        free preempts the most recently arrived of those not yet scheduled in this step (or itself, when it is the
        newest). Returns the budget left."""
        queue = sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed_tokens > 1, s.priority))
        kept = []
        while queue:
            seq = queue.pop(0)
            n = self._num_new_tokens(seq, budget)
            if n == 0:                              # no budget left in this step: it keeps its blocks and waits
                kept.append(seq)
                continue
            while not self._can_reserve(seq, n):
                # partial swap: first the blocks that swapped sequences still keep here, then a running victim
                if self.partial_swap and tail.reclaim(self, self._deficit(seq, n), out):
                    continue
                victim = max(queue, key=lambda s: s.priority) if queue else seq
                if victim is not seq:
                    queue.remove(victim)
                self._preempt(victim, out, deficit=0 if victim is seq else self._deficit(seq, n))
                if victim is seq:
                    break
            else:
                budget -= self._schedule_chunk(seq, n, budget, out)
                kept.append(seq)
        self.running = kept
        return budget

    def _schedule_swapped(self, out: SchedulerOutput, budget: int) -> int:
        """2. Swapped sequences come back, oldest first, while their blocks fit (not in a step that just preempted
        someone: that would thrash). Returns the budget left."""
        while self.swapped and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            n = self._num_new_tokens(seq, budget)
            resident, held = tail.held(self, seq)      # blocks still on the device (partial swap), tokens held
            need = self.block_manager.num_blocks_for(max(held, seq.num_computed_tokens + n)) - resident
            if n == 0:
                break
            if need > self.block_manager.num_free_blocks and not (   # partial swap: take back younger ones' blocks
                    self.partial_swap and not out.swap_in and     # (not after a swap-in: CPU blocks it freed would
                    tail.reclaim(self, need - self.block_manager.num_free_blocks, out, keep=seq, all_or_none=True)):
                break                                             # be overwritten before they are read)
            self.swapped.pop(0)
            self._swap_in(seq, out)
            budget -= self._schedule_chunk(seq, n, budget, out)
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> int:
        """3. Waiting sequences are admitted, first come first served, while all three limits allow: never past the
        first that does not fit, and not while anyone is swapped out or was preempted in this step (they are older).
        Returns the budget left."""
        while self.waiting and not self.swapped and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = self._num_new_tokens(seq, budget)
            if n == 0 or not self.can_allocate(seq):
                break
            self.waiting.pop(0)
            self.allocate(seq)
            n = self._num_new_tokens(seq, budget)   # fewer tokens to compute when a prefix came from the cache
            seq.status = RUNNING
            self.running.append(seq)
            budget -= self._schedule_chunk(seq, n, budget, out)
        return budget

    def _schedule_chunk(self, seq: Sequence, n: int, budget: int, out: SchedulerOutput) -> int:
        """Schedule n tokens of seq (and its lookahead slots) in this step; returns the tokens of budget they take."""
        ahead = self._lookahead(seq, n, budget) if self.num_lookahead_slots else 0
        self._reserve(seq, n + ahead)
        out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n, ahead))
        return n + ahead

    def update(self, out: SchedulerOutput, next_tokens: dict[int, int | list[int]], now: float) -> list[Sequence]:
        """After the forward pass: append the new tokens of the chunks that sample (``next_tokens[seq_id]``: one
        token, or with speculative decoding a list: the accepted draft tokens and one token of the target's,
        appended up to the first stop token or the length limit), advance every chunk's computed tokens,
        finish sequences, free their blocks. Returns the sequences that finished in this step."""
        finished = []
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.status == FINISHED:           # asynchronous scheduling: stopped after this step was planned
                continue
            new = next_tokens[seq.seq_id] if chunk.samples else []
            appended = self._append_tokens(seq, [new] if isinstance(new, int) else new, now)
            # K/V now valid (in every model's pool): the chunk's tokens and, with speculative decoding, the accepted
            # draft tokens that both models ran: all appended tokens but the last, and at most num_lookahead - 1
            # (the draft model never runs its own last proposal; see course_lib.serving.spec_decode)
            seq.num_computed_tokens += chunk.num_tokens
            if chunk.num_lookahead:
                seq.num_computed_tokens += max(0, min(appended - 1, chunk.num_lookahead - 1))
            if self.prefix_caching:              # the full blocks just computed join the cache (before any free)
                self._cache_computed_blocks(seq)
            if seq.finish_reason:
                seq.status = FINISHED
                self.block_manager.free(seq.seq_id)
                self.running.remove(seq)
                finished.append(seq)
        return finished

    def _append_tokens(self, seq: Sequence, tokens: list[int], now: float) -> int:
        """Append tokens to seq until one finishes it (a stop token, max_tokens, the context); returns how many."""
        for i, token in enumerate(tokens):
            seq.output_token_ids.append(token)
            seq.token_times.append(now)
            if token in seq.params.stop_token_ids:
                seq.finish_reason = "stop"
            elif len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
            if seq.finish_reason:
                return i + 1
        return len(tokens)

    # ---------------------------------------------------------------- blocks (the hook points)
    def can_allocate(self, seq: Sequence) -> bool:
        """Blocks for every token of a sequence being admitted fit, above the watermark."""
        if self.prefix_caching:              # blocks found in the cache need not be allocated
            need, free = self.block_manager.num_blocks_to_allocate(seq.token_ids[:-1], seq.num_tokens)
        else:
            need, free = self.block_manager.num_blocks_for(seq.num_tokens), self.block_manager.num_free_blocks
        return free - need >= self.watermark_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give an admitted sequence its blocks: room for all of its tokens (the prompt, plus the tokens it had
        generated before a recompute preemption). The one place a sequence gets blocks: a prefix cache
        (lesson 05) reuses cached blocks and starts ``num_computed_tokens`` past the shared prefix: every token
        but the last may come from the cache (the last one must run through the model to give the next token's
        logits), so a preempted sequence resumes on the blocks it cached before."""
        if not self.prefix_caching:
            self.block_manager.allocate(seq.seq_id, seq.num_tokens)
            return
        seq.num_computed_tokens = self.block_manager.allocate_with_prefix(seq.seq_id, seq.token_ids[:-1],
                                                                          seq.num_tokens)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens

    def _cache_computed_blocks(self, seq: Sequence) -> None:
        bm = self.block_manager
        if seq.num_computed_tokens // bm.block_size > bm.num_cached_blocks[seq.seq_id]:   # a block was filled
            bm.cache_blocks(seq.seq_id, seq.token_ids[:seq.num_computed_tokens])

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        """Tokens of seq to run now: all it has not computed yet (1 when decoding), or a chunk of its prompt that
        fits the budget (chunked prefill); 0 when it does not fit."""
        remaining = seq.num_tokens - seq.num_computed_tokens
        if self.enable_chunked_prefill:
            return min(remaining, budget)
        return remaining if remaining <= budget else 0

    def _lookahead(self, seq: Sequence, n: int, budget: int) -> int:
        """Speculative decoding: lookahead slots for a chunk of n tokens of seq (0 when off). Only a chunk that
        samples gets them; never more than the budget left, nor more than the tokens seq may still generate minus
        one (a step appends up to lookahead + 1 tokens, so its slots stay within min(prompt + max_tokens, context),
        which the engine checked fits the cache); and only from free blocks: speculation never preempts anyone,
        without room the sequence just decodes one token."""
        if not (self.num_lookahead_slots and self._lookahead_on) or seq.num_computed_tokens + n < seq.num_tokens:
            return 0
        limit = min(len(seq.prompt_token_ids) + seq.params.max_tokens, self.max_model_len)
        ahead = max(0, min(self.num_lookahead_slots, budget - n, limit - seq.num_tokens - 1))
        while ahead and not self._can_reserve(seq, n + ahead):
            ahead -= 1
        return ahead

    def _slots_needed(self, seq: Sequence, n: int) -> int:
        need = seq.num_computed_tokens + n - self.block_manager.num_tokens[seq.seq_id]
        return need if need > 0 else 0

    def _can_reserve(self, seq: Sequence, n: int) -> bool:
        return self.block_manager.can_append(seq.seq_id, self._slots_needed(seq, n))

    def _reserve(self, seq: Sequence, n: int) -> None:
        """Make sure seq has slots for its tokens up to num_computed_tokens + n (a decode may open a block)."""
        need = self._slots_needed(seq, n)
        if need:
            self.block_manager.append_slots(seq.seq_id, need)

    # ---------------------------------------------------------------- preemption
    def _deficit(self, seq: Sequence, n: int) -> int:
        """Blocks missing for seq to reserve its slots for n more tokens (<= 0: none)."""
        bm = self.block_manager
        return bm._blocks_to_append(seq.seq_id, self._slots_needed(seq, n)) - bm.num_free_blocks

    def _preempt(self, seq: Sequence, out: SchedulerOutput, deficit: int = 0) -> None:
        """Take a running sequence's blocks away: swap them to the CPU pool, or free them (recompute later).
        Swap falls back to recompute when the CPU pool is full. With partial swap only ``deficit`` blocks' worth of
        its tail moves (none when it preempts itself: its blocks move when someone needs them)."""
        if self.partial_swap:
            seq.num_preemptions += 1
            self._preempted_at[seq.seq_id] = self.num_steps
            tail.preempt(self, seq, deficit, out)
            return
        seq.num_preemptions += 1
        held = self.block_manager.num_tokens[seq.seq_id]
        cpu = self.cpu_block_manager
        if self.preemption_mode == "swap" and cpu.can_allocate(held):
            cpu_table = cpu.allocate(seq.seq_id, held)
            out.swap_out += list(zip(self.block_manager.block_table(seq.seq_id), cpu_table))
            self.num_swap_ops["out"] += 1
            self._preempted_at[seq.seq_id] = self.num_steps
            self.block_manager.free(seq.seq_id)
            seq.status = SWAPPED
            bisect.insort(self.swapped, seq, key=lambda s: s.priority)
            mode = "swap"
        else:
            self.block_manager.free(seq.seq_id)
            self.num_recomputed_tokens += seq.num_computed_tokens
            seq.num_computed_tokens = 0          # its K/V is gone: prompt + generated tokens are prefilled again
            seq.status = WAITING
            bisect.insort(self.waiting, seq, key=lambda s: s.priority)
            mode = "recompute"
        self.num_preemptions[mode] += 1
        out.preempted.append((seq.seq_id, mode))

    def _swap_in(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.resume_steps.append(self.num_steps - self._preempted_at.pop(seq.seq_id))
        if seq.seq_id in self.block_manager.block_tables:   # partial swap: its prefix stayed on the device
            tail.swap_in(self, seq, out)
            return
        held = self.cpu_block_manager.num_tokens[seq.seq_id]
        cpu_table = self.cpu_block_manager.block_table(seq.seq_id)
        reused = 0
        if self.prefix_caching:     # blocks still cached on the device are shared again, not copied in twice
            computed = seq.token_ids[:seq.num_computed_tokens]
            num_reused_tokens = self.block_manager.allocate_with_prefix(seq.seq_id, computed, held)
            reused = num_reused_tokens // self.block_manager.block_size
            gpu_table = self.block_manager.block_table(seq.seq_id)
        else:
            gpu_table = self.block_manager.allocate(seq.seq_id, held)
        out.swap_in += list(zip(cpu_table[reused:], gpu_table[reused:]))
        self.num_swap_in_cached_blocks += reused
        self.num_swap_ops["in"] += len(cpu_table) > reused
        self.cpu_block_manager.free(seq.seq_id)
        seq.status = RUNNING
        self.running.append(seq)
