"""Predictive swap-in (prefetch), simulated on the engine's scheduler (lesson 04; the Q&A document's question to the
interviewer: "有没有考虑预测性的预加载?").

In our engine a swap-in is a copy at the start of the step that resumes the sequence, on the step's critical path.
Engines that copy **asynchronously** overlap it with compute instead: KsanaLLM issues ``SwapinRequestAsync`` in
one step and the request joins the batch only once ``MergePendingSwapinRequests`` finds its copy done, in a later
step. Then a resumed sequence waits for its copy: one step. **Prefetch** starts that copy one step earlier.

``AsyncSwapScheduler`` is the engine's ``Scheduler`` (with partial swap, ``course_lib.serving.partial_swap``) with two
changes, and ``simulate`` drives it without a model (stand-in tokens; lengths set by ``max_tokens``):

* **asynchronous swap-in**: a sequence whose blocks are still in the CPU pool when the scheduler would resume it
  gets its copy issued in that step and runs from the next one: one **copy-wait step** per such resumption;
* **prefetch** (``prefetch=True``): after scheduling step t, the scheduler *predicts* whether the oldest swapped
  sequence will be able to resume in step t + 1: the blocks free now, plus the blocks of the running sequences
  that finish in step t (they reach ``max_tokens``: known in advance), must hold what it needs, and a seat must be
  free. If so, its copy is issued as soon as step t's forward pass is done, into those blocks, and in step t + 1 it
  runs without waiting. A wrong prediction (someone else took the blocks) costs nothing but the plan; the counts
  say how many predictions held.

What this assumes and simplifies: one step is the unit of time; a prefetched copy, issued when step t ends, is done
when step t + 1's forward pass reads it (true when it fits in the host time between two steps, or when a layer's
K/V arrive before that layer runs; a long context over PCIe may need longer); no stop tokens (a sequence's
remaining length is known; with stop tokens the prediction is only a bound); no prefix caching.
"""
from __future__ import annotations

from course_lib.paging.block_manager import BlockManager
from course_lib.serving import partial_swap as tail
from course_lib.serving.scheduler import Scheduler
from course_lib.serving.sequence import SchedulerOutput, Sequence
from course_lib.model.sampling import SamplingParams


class AsyncSwapScheduler(Scheduler):
    """The engine's scheduler with partial swap, asynchronous swap-in (a copy issued in step t is usable from step
    t + 1) and, with ``prefetch``, the next sequence to resume predicted one step ahead and its copy started then."""

    def __init__(self, *args, prefetch: bool = False, **kwargs):
        super().__init__(*args, preemption_mode="swap", partial_swap=True, **kwargs)
        if not isinstance(prefetch, bool):
            raise ValueError(f"prefetch must be True or False, got {prefetch!r}")
        self.prefetch = prefetch
        self.copy_wait_steps = 0          # steps a sequence that could resume waited for its copy
        self.num_predictions = 0          # prefetches planned (predicted resumptions)
        self.num_predictions_held = 0     # ... that resumed in the predicted step, without waiting
        self._ready_at: dict[int, int] = {}   # seq_id -> first step its copied blocks may be used
        self._planned: int | None = None      # seq_id predicted to resume in the next step

    def schedule(self) -> SchedulerOutput:
        out = super().schedule()
        self._planned = None
        if self.prefetch and self.swapped and not out.preempted:
            self._plan_prefetch(out)
        return out

    def _plan_prefetch(self, out: SchedulerOutput) -> None:
        """Predict whether the oldest swapped sequence can resume next step: free blocks now + blocks of the running
        sequences that finish in this step (their last token is sampled now), and a seat."""
        seq, bm = self.swapped[0], self.block_manager
        if seq.seq_id not in self.cpu_block_manager.block_tables:
            return                                        # nothing to copy: no wait to hide
        finishing = [c.seq for c in out.chunks                 # their last token is sampled in this step
                     if c.samples and len(c.seq.output_token_ids) + 1 >= c.seq.params.max_tokens]
        freed = sum(1 for s in finishing for b in bm.block_tables[s.seq_id] if bm.allocator.ref_counts[b] == 1)
        resident, held = tail.held(self, seq)
        need = bm.num_blocks_for(max(held, seq.num_computed_tokens + 1)) - resident
        if need <= bm.num_free_blocks + freed and len(self.running) - len(finishing) < self.max_num_seqs:
            self._planned = seq.seq_id
            self.num_predictions += 1

    def _copy_in(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Issue the copy of seq's CPU blocks into new device blocks; seq stays swapped until the copy is done."""
        gpu, cpu, sid = self.block_manager, self.cpu_block_manager, seq.seq_id
        cpu_table, tokens = cpu.block_table(sid), cpu.num_tokens[sid]
        if sid in gpu.block_tables:
            resident = len(gpu.block_tables[sid])
            gpu.append_slots(sid, tokens)
            new = gpu.block_table(sid)[resident:]
        else:
            new = gpu.allocate(sid, tokens)
        out.swap_in += list(zip(cpu_table, new))
        cpu.free(sid)
        self.num_swap_ops["in"] += 1
        self._ready_at[sid] = self.num_steps + 1

    def _schedule_swapped(self, out: SchedulerOutput, budget: int) -> int:
        """The base phase, except that a sequence whose blocks are still in the CPU pool cannot run in this step
        (its copy is issued now) unless its copy was started when the previous step ended (a prefetch)."""
        planned, self._planned = self._planned, None
        while self.swapped and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            n = self._num_new_tokens(seq, budget)
            resident, held = tail.held(self, seq)
            need = self.block_manager.num_blocks_for(max(held, seq.num_computed_tokens + n)) - resident
            if n == 0:
                break
            if need > self.block_manager.num_free_blocks and not (
                    not out.swap_in and tail.reclaim(self, need - self.block_manager.num_free_blocks, out, keep=seq,
                                                     all_or_none=True)):
                break
            copying = seq.seq_id in self.cpu_block_manager.block_tables
            if copying and seq.seq_id != planned:             # the copy starts now: it runs next step
                self._copy_in(seq, out)
                self.copy_wait_steps += 1
                break
            if not copying and self._ready_at.get(seq.seq_id, 0) > self.num_steps:   # copied this very step
                self.copy_wait_steps += 1
                break
            self.num_predictions_held += copying              # prefetched: its copy ran when the last step ended
            self._ready_at.pop(seq.seq_id, None)
            self.swapped.pop(0)
            self._swap_in(seq, out)
            budget -= self._schedule_chunk(seq, n, budget, out)
        return budget


def simulate(lengths: list[tuple[int, int]], *, num_blocks: int, block_size: int = 16, max_num_seqs: int = 8,
             max_num_batched_tokens: int = 256, num_cpu_blocks: int | None = None, prefetch: bool = False,
             max_steps: int = 100_000) -> dict:
    """Serve requests of (prompt tokens, output tokens), all arriving at step 0, on ``AsyncSwapScheduler``; returns
    its counters. The token ids are stand-ins (the scheduler only counts them)."""
    sched = AsyncSwapScheduler(BlockManager(num_blocks, block_size), max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=max_num_batched_tokens, max_model_len=1 << 20,
                               cpu_block_manager=BlockManager(num_cpu_blocks or num_blocks, block_size),
                               prefetch=prefetch)
    for i, (prompt, output) in enumerate(lengths):
        sched.add(Sequence(i, i, [1] * prompt, SamplingParams(max_tokens=output), arrival_time=float(i)))
    steps = blocks_out = blocks_in = 0
    while sched.has_unfinished():
        if steps == max_steps:
            raise RuntimeError(f"not done after {max_steps} steps")
        out = sched.schedule()
        blocks_out, blocks_in = blocks_out + len(out.swap_out), blocks_in + len(out.swap_in)
        sched.update(out, {c.seq.seq_id: 1 for c in out.chunks if c.samples}, float(steps))
        steps += 1
    for bm in (sched.block_manager, sched.cpu_block_manager):   # every block came back
        assert not bm.block_tables and bm.num_free_blocks == bm.allocator.num_blocks
    return dict(prefetch=prefetch, steps=steps, copy_wait_steps=sched.copy_wait_steps,
                preemptions=dict(sched.num_preemptions), resumes=len(sched.resume_steps),
                resume_steps_mean=sum(sched.resume_steps) / max(len(sched.resume_steps), 1),
                blocks_out=blocks_out, blocks_in=blocks_in, predictions=sched.num_predictions,
                predictions_held=sched.num_predictions_held)
