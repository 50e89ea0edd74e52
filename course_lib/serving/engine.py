"""``LLMEngine``: continuous batching on a paged KV cache (lesson 04), driven one step at a time as vLLM's is.

vLLM's engine API. An API server calls ``step`` in its loop and streams each step's new tokens to the clients at
once; ``generate`` (vLLM's offline ``LLM.generate``) is the same loop, until every request is done:

    engine.add_request(request_id, prompt, params)   the request joins the queue (a bad one: ValueError)
    while engine.has_unfinished_requests():
        for out in engine.step():                    one forward pass; a RequestOutput per request that gained
            ...                                      tokens in it: out.request_id, out.token_ids, out.finished
    engine.abort_request(request_id)                 a client went away: its KV blocks come back at once

One step is one iteration of a serving engine's loop ("iteration-level scheduling", Orca, OSDI 2022):

    out = scheduler.schedule()                     (which tokens of which sequences: decodes + prompt chunks)
    copy swapped blocks out / in                   (preemption by swap)
    logits = model(all scheduled tokens, flattened)   (course_lib.serving.model_runner: paged K/V, the course kernels)
    sample one token for every sequence that reached the end of its tokens
    scheduler.update(...)                          (append tokens, finish sequences, free their blocks)

A finished sequence leaves the batch at once and a waiting one takes its place in the very next step; static
batching (``course_lib.serving.static_batching``) instead waits until the whole batch is done.

**Asynchronous scheduling** (``async_scheduling``, on by default on a GPU; ``course_lib.serving.async_scheduling``):
a step launches its forward pass and its sampling (the greedy argmax and the seeded draws, both on the device:
``course_lib.model.sampling.sample_tokens``) without waiting for the tokens; the host reads back the step before it
and plans the next one while the GPU runs. ``step()`` then returns the tokens read back in it, one step late, and a
stop token costs one wasted token. Only speculative decoding's steps still drain and run synchronously.

**Speculative decoding** (lesson 06): with ``speculative_model`` and ``num_speculative_tokens`` = k the forward
pass and the sampling of a step become ``course_lib.serving.spec_decode.SpecDecodeWorker.step``: k batched passes of the
draft model, one pass of the target over every sequence's tokens + its drafts, verification; a sequence gains
1 ... k + 1 tokens per step, with the target's greedy tokens / the target's distribution.

**Time.** The engine's clock (``engine.clock``, seconds) advances by the measured wall time of each step
(scheduling, copies, forward pass and sampling included). A request arrives at its ``arrival_time`` on that clock
(default: now); until then it waits outside the scheduler, and a step with nothing else to do jumps the clock to
the next arrival instead of sleeping. ``generate`` replays ``arrival_times`` (default all 0) that way, on a clock
that starts at 0. Latencies (TTFT, TPOT) are read on that clock.

**Bad input** (``course_lib.serving.validation`` lists the checks): ``add_request`` raises a ``ValueError`` naming
the request and the field; ``generate`` puts it on that request's output (``error``) and serves the others: one
bad request never sinks the batch. Misusing the call itself (prompts not a list, ...) raises before anything runs.

**One caller at a time.** An engine owns one KV pool and one block manager: a call (``generate``, ``step``,
``add_request``, ``abort_request``) while another thread is inside one raises a ``RuntimeError`` instead of
sharing them. A step that fails midway (an exception from the model, a KeyboardInterrupt) drops every unfinished
request and gives back every block before the exception leaves it, so the engine serves the next requests with
its whole cache.
"""
from __future__ import annotations

import bisect
import numbers
import random
import threading
import time
from dataclasses import replace
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from course_lib.model.sampling import MAX_SEED, SamplingParams, sample_tokens
from course_lib.paging.block_manager import BlockManager
from course_lib.serving.config import CONFIG_FIELDS, EngineConfig, make_engine_config
from course_lib.serving.kv_pool import make_kv_pool
from course_lib.serving.metrics import RequestOutput, RunMetrics, StepRecord, summarize
from course_lib.model.fused import fuse
from course_lib.serving.async_scheduling import InflightStep
from course_lib.serving.cuda_graph import DecodeGraphs
from course_lib.serving.memory import num_blocks_for_gpu
from course_lib.serving.model_runner import ModelRunner
from course_lib.serving.full_graph import FullMixedGraphs
from course_lib.serving.piecewise_graph import PiecewiseGraphs
from course_lib.serving.prefix_cache import PrefixCachingBlockManager
from course_lib.serving.scheduler import PREEMPTION_MODES, Scheduler
from course_lib.serving.sequence import FINISHED, Sequence, draw_keys
from course_lib.serving.spec_decode import SpecDecodeWorker
from course_lib.serving.validation import check_call, check_fits_cache, check_request, check_step_time


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LLMEngine:
    """Continuous batching over a paged KV cache, driven by ``step`` (vLLM's engine API) or by ``generate``.

    model               the model to serve (``course_lib.Llama``)
    config, **kwargs    an ``EngineConfig`` and / or its fields by name (``course_lib.serving.config``: block_size,
                        num_blocks, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, ...); a keyword
                        overrides the config's field. ``engine.config`` is the config resolved for the model, and
                        each of its fields reads as an attribute too (``engine.num_blocks``)
    tokenizer           lets prompts be strings and fills ``.text`` of the finished outputs
    speculative_model   a draft model (same vocabulary) for speculative decoding with ``num_speculative_tokens`` = k
                        (``course_lib.serving.spec_decode``): its K/V get a pool of their own with the same blocks
    """

    def __init__(self, model, *, config: EngineConfig | None = None, tokenizer=None, speculative_model=None, **kwargs):
        self.model, self.tokenizer, self.speculative_model = model, tokenizer, speculative_model
        self.max_model_len = model.config.max_position_embeddings
        c = make_engine_config(config, **kwargs)
        models = [m for m in (model, speculative_model) if m is not None]
        on_gpu = model.device.type == "cuda" and c.use_kernels is not False
        for m in models if on_gpu else []:   # the GPU kernel path runs the model's fused kernels
            fuse(m)                         # (course_lib.model.fused), what the profile below must measure too
        self.memory_profile = None          # on a GPU without num_blocks: what the profiling pass measured
        if c.num_blocks is None and model.device.type == "cuda":
            budget = c.resolve(model, speculative_model).max_num_batched_tokens
            num_blocks, self.memory_profile = num_blocks_for_gpu(models, c.block_size, c.kv_cache_dtype, budget,
                                                                 c.gpu_memory_utilization)
            need = -(-self.max_model_len // c.block_size)
            # never more than the running batch can hold at once (every sequence at the whole context): an engine
            # does not take the card from the other engines of the same process (a notebook makes many)
            num_blocks = min(num_blocks, c.max_num_seqs * need)
            if num_blocks < need:
                raise ValueError(f"gpu_memory_utilization={c.gpu_memory_utilization}: the KV cache gets "
                                 f"{self.memory_profile['kv_bytes'] / 2**30:.2f} GiB, {num_blocks} blocks, fewer "
                                 f"than one sequence of the model's context ({self.max_model_len} tokens) needs "
                                 f"({need})")
            c = replace(c, num_blocks=num_blocks)
        self.config = c = c.resolve(model, speculative_model)
        self._graphs: dict[int, DecodeGraphs] = {}   # per model (target, draft): captured at its first decode step
        self._mixed = None   # the target's graphs for mixed steps, captured at its first mixed step
        self.pool = make_kv_pool(model.config, c.num_blocks, c.block_size, kv_cache_dtype=c.kv_cache_dtype,
                                 num_cpu_blocks=c.num_cpu_blocks, dtype=model.dtype, device=model.device)
        # speculative decoding: the draft's K/V in blocks of their own, at the same block ids as the target's
        self.draft_pool = None if speculative_model is None else make_kv_pool(
            speculative_model.config, c.num_blocks, c.block_size, kv_cache_dtype=c.kv_cache_dtype,
            num_cpu_blocks=c.num_cpu_blocks, dtype=speculative_model.dtype, device=speculative_model.device)
        # lesson 05: one block manager for the engine's lifetime, so that its prefix cache outlives a generate
        # call (the K/V it points to stay in self.pool); without caching, a fresh one per generate call
        self.block_manager = PrefixCachingBlockManager(c.num_blocks, c.block_size) if c.enable_prefix_caching else None
        self._rng = random.Random(c.seed)
        self._lock, self._holder = threading.RLock(), None   # the call that holds the engine (one thread at a time)
        self.metrics: RunMetrics | None = None      # of the last generate call
        self.scheduler: Scheduler | None = None     # built by the first add_request, anew by each generate call
        self._requests: dict[object, list[Sequence]] = {}   # unfinished requests: request_id -> its n sequences
        self._pending: list[tuple[float, int, object]] = []  # (arrival time, first seq id, request_id): not arrived
        self.clock, self.last_step, self._next_seq_id = 0.0, None, 0
        self._step_time: float | None = None   # generate(step_time=...): the modeled replay clock, during that call
        self._inflight, self._progressed = None, {}   # asynchronous scheduling: the step launched, not read back

    def __getattr__(self, name: str):
        """``engine.block_size``, ``engine.num_blocks``, ...: the fields of the resolved ``engine.config``."""
        config = self.__dict__.get("config")
        if config is not None and name in CONFIG_FIELDS:
            return getattr(config, name)
        raise AttributeError(f"'LLMEngine' object has no attribute {name!r}")

    # ---------------------------------------------------------------- vLLM's engine API
    def add_request(self, request_id, prompt, params=None, *, arrival_time: float | None = None) -> None:
        """Queue a request: ``prompt`` (token ids, a 1-D integer tensor, or a string with a tokenizer), ``params``
        (a SamplingParams, a dict of its fields, or None: the defaults), arriving at ``arrival_time`` on the
        engine's clock (default: now). A bad request raises a ValueError that names the request and the field, and
        so does a ``request_id`` that the engine holds already."""
        with self._exclusive("add_request"):
            if request_id in self._requests:
                raise ValueError(f"request {request_id}: request_id is taken by an unfinished request")
            arrival = self.clock if arrival_time is None else arrival_time
            if isinstance(arrival, bool) or not isinstance(arrival, numbers.Real) or not arrival >= 0:
                raise ValueError(f"request {request_id}: arrival_time must be a time >= 0 (s), got {arrival_time!r}")
            if self.scheduler is None:
                self._new_run()
            prompt_ids, params, error = check_request(request_id, prompt, params, tokenizer=self.tokenizer,
                                                      vocab_size=self.model.config.vocab_size,
                                                      max_model_len=self.max_model_len)
            if error is None:
                error = check_fits_cache(request_id, len(prompt_ids), params, block_size=self.block_size,
                                         max_model_len=self.max_model_len, num_blocks=self.num_blocks,
                                         max_blocks=self.scheduler.max_blocks_per_seq())
            if error is not None:
                raise error
            seqs = [Sequence(self._next_seq_id + j, request_id, list(prompt_ids), params, float(arrival), j,
                             self._seed(params, j)) for j in range(params.n)]
            self._next_seq_id += params.n
            self._requests[request_id] = seqs
            bisect.insort(self._pending, (float(arrival), seqs[0].seq_id, request_id))

    def step(self) -> list[RequestOutput]:
        """One step: schedule, one forward pass over the scheduled tokens, sample. Returns a RequestOutput for every
        request that gained tokens in it (its tokens so far; ``finished`` when it is done: it then leaves the
        engine), [] with nothing to do; with asynchronous scheduling, for the tokens read back in it (those of the
        step before: the first step returns []). When every unfinished request arrives later, the clock jumps to the
        first arrival. A step that raises drops every unfinished request (their blocks come back) before it leaves."""
        with self._exclusive("step"):
            try:
                return self._step()
            except BaseException:
                self._drop_unfinished()
                raise

    def has_unfinished_requests(self) -> bool:
        """Whether a request added is not finished yet (waiting, running, swapped, or not arrived yet)."""
        return bool(self._requests)

    def abort_request(self, request_id) -> RequestOutput | None:
        """Stop a request now (vLLM: its client went away): its sequences leave their queues and give back their KV
        blocks. Returns its last RequestOutput (``finished``; finish_reason "abort" on each completion that had not
        ended), or None when the engine does not hold it (an unknown id, or a request that finished already)."""
        with self._exclusive("abort_request"):
            if self._inflight is not None:            # its last tokens may still be placeholders: read them
                self._read_inflight(self.clock)
            seqs = self._requests.pop(request_id, None)
            if seqs is None:
                return None
            arrived = all(p[2] != request_id for p in self._pending)
            self._pending = [p for p in self._pending if p[2] != request_id]
            for seq in seqs:
                if not seq.finish_reason:
                    if arrived:
                        self.scheduler.abort(seq)
                    seq.finish_reason, seq.status = "abort", FINISHED
            return RequestOutput.from_seqs(request_id, seqs, self.tokenizer)

    def generate(self, prompts, params=None, *, arrival_times=None, step_time: float | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Generate completions for ``prompts`` (token-id lists or 1-D integer tensors, or strings with a tokenizer).
        ``params``: one SamplingParams (or dict) for all, or a list with one per prompt. Returns one RequestOutput per
        prompt, in order (a bad request's carries its ``error``); the run's metrics are in ``self.metrics``.
        ``step_time``: seconds each step costs on the replay clock instead of its measured time (a modeled clock:
        which requests have arrived at each step, and the metrics read on that clock, are then the same on any
        machine, busy or not). The progress bar shows by default from 64 requests on. Needs an idle engine; one call
        at a time per engine."""
        with self._exclusive("generate"):
            prompts, params_list, arrivals = check_call(prompts, params, arrival_times)
            step_time = check_step_time(step_time)
            if self._requests:
                raise RuntimeError(f"LLMEngine.generate needs an idle engine: {len(self._requests)} request(s) added "
                                   "with add_request are unfinished (step() until has_unfinished_requests() is False, "
                                   "or abort_request them)")
            self._new_run()                     # a fresh clock, queues and counters: self.metrics are this call's
            self._step_time = step_time
            try:
                outputs = [None] * len(prompts)
                for i, (prompt, p) in enumerate(zip(prompts, params_list)):
                    try:
                        self.add_request(i, prompt, p, arrival_time=arrivals[i])
                    except ValueError as err:   # one bad request: its output says why, the others are served
                        outputs[i] = RequestOutput(i, [], error=err, finished=True)
                bar = tqdm(total=len(self._requests), desc="requests", unit="req",
                           disable=not (len(prompts) >= 64 if use_tqdm is None else use_tqdm))
                steps = []
                while self.has_unfinished_requests():
                    for out in self._step(finished_only=True):   # step()'s work, without the unfinished outputs
                        outputs[out.request_id] = out
                        bar.update()
                    if self.last_step is not None:       # None: a step that only read back the last tokens
                        steps.append(self.last_step)
                bar.close()
                self.metrics = self._run_metrics(outputs, steps, start=min(arrivals, default=0.0))
                return outputs
            finally:
                self._step_time = None
                self._drop_unfinished()         # no-op after a clean run; after an exception, every block comes back

    # ---------------------------------------------------------------- one step
    def _step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Admit the requests that have arrived, schedule, copy swapped blocks, run the model once over every
        scheduled token, sample, update the sequences; the outputs of the requests that gained tokens (with
        ``finished_only``, of those that finished: generate() needs no others, and building an output copies the
        request's tokens, a quarter of the host's time in a decode step of 128 sequences).

        With asynchronous scheduling (``course_lib.serving.async_scheduling``) the step launches its forward pass
        and its sampling without waiting, then reads back the tokens of the step before it: the outputs are those
        of the previous step, and a step with nothing left to schedule only reads back the last one."""
        self.last_step = None
        if not self._requests:
            return []
        scheduler, device = self.scheduler, self.model.device
        self._admit_arrived()
        if not scheduler.has_unfinished():
            if self._inflight is not None:            # only the last launched step is left: read its tokens
                t0 = time.perf_counter()
                self._read_inflight(self.clock)
                self.clock += self._elapsed(t0, 0.0)
                return self._outputs(finished_only)
            self.clock = self._pending[0][0]          # idle until the next arrival: jump to it
            self._admit_arrived()
        clock = self.clock
        overlap = self.config.async_scheduling
        if not overlap:
            _synchronize(device)
        t0 = time.perf_counter()
        out = scheduler.schedule()                    # which tokens of which sequences (course_lib.serving.scheduler)
        if not out.chunks:
            raise RuntimeError("the scheduler scheduled nothing although requests are unfinished (a bug)")
        for pool in self._pools:
            pool.swap_out(out.swap_out)
            pool.swap_in(out.swap_in)
        # a step launches without waiting unless its tokens must be read on the host (speculative decoding's
        # verification): greedy rows and seeded draws (every sampling sequence has a seed, and the position of its
        # draw is its length, placeholders included) are sampled on the device (sampling.sample_tokens)
        launch = overlap and not self._spec
        if not launch and self._inflight is not None:   # drain: this step reads every token id on the host
            self._read_inflight(clock + self._elapsed(t0, 0.0))
            out.chunks = [c for c in out.chunks if c.seq.status != FINISHED]   # stopped: nothing left to run
        inflight = None
        if not out.chunks:
            next_tokens = {}
        elif self._spec:                                # speculative decoding: drafts, one verify pass (lesson 06)
            next_tokens = self._spec.step(out.chunks)
        elif launch:                                  # launched, not waited for: the last step's tokens are read now
            inflight = InflightStep(out.chunks, self._runner.execute(out.chunks, self._inflight))
            if self._inflight is not None:
                self._read_inflight(clock + self._elapsed(t0, 0.0))
            next_tokens = inflight.placeholders()
        else:
            next_tokens = self._sample(out.chunks, self._runner.execute(out.chunks))
        for chunk in out.chunks:
            if chunk.seq.first_scheduled_time is None:
                chunk.seq.first_scheduled_time = clock
        if not overlap:
            _synchronize(device)
        duration = self._elapsed(t0, self._step_time)
        outputs = None
        if inflight is None:                          # its tokens are known: their requests progressed now
            self._progressed |= dict.fromkeys(c.seq.request_id for c in out.chunks if c.samples)
        else:                                         # the outputs of the steps read back, before placeholders
            outputs = self._outputs(finished_only)
        scheduler.update(out, next_tokens, clock + duration)
        if inflight is not None:
            inflight.mark_placeholders()
            self._inflight = inflight
        self.last_step = StepRecord(
            start=clock, duration=duration, num_prefill_tokens=out.num_prefill_tokens,
            num_decode_tokens=out.num_decode_tokens, num_running=len(out.chunks),
            num_waiting=len(scheduler.waiting), num_swapped=len(scheduler.swapped),
            blocks_used=scheduler.block_manager.num_used_blocks, preempted=out.preempted,
            swapped_out_blocks=len(out.swap_out), swapped_in_blocks=len(out.swap_in),
            num_draft_tokens=out.num_lookahead_tokens,
            composition=[(c.seq.request_id, c.num_tokens) for c in out.chunks])
        self.clock += duration
        return self._outputs(finished_only) if outputs is None else outputs

    def _elapsed(self, t0: float, modeled: float | None) -> float:
        """Seconds since ``t0`` on the replay clock: measured, or ``modeled`` under generate's ``step_time`` (a step
        costs step_time; reading back an asynchronous step's tokens, nothing)."""
        return time.perf_counter() - t0 if self._step_time is None else modeled

    def _read_inflight(self, now: float) -> None:
        """Asynchronous scheduling: the launched step's tokens replace their placeholders (timed ``now``, when the
        host has them); a stop token finishes its sequence (the step launched since computed one token more for
        it, thrown away). Their requests progressed."""
        inflight, self._inflight = self._inflight, None
        for seq, token in inflight.read():
            pos = inflight.position.get(seq.seq_id)
            if pos is None or seq.finish_reason == "abort":
                continue
            i = pos - len(seq.prompt_token_ids)
            seq.output_token_ids[i], seq.token_times[i] = token, now
            if token in seq.params.stop_token_ids:
                if not seq.finish_reason:
                    self.scheduler.abort(seq)     # out of its queue, its blocks back (status FINISHED)
                seq.finish_reason, seq.status = "stop", FINISHED
            self._progressed[seq.request_id] = None

    def _outputs(self, finished_only: bool) -> list[RequestOutput]:
        """The outputs of the requests that progressed since the last ones (each once, in order); a finished
        request leaves the engine."""
        progressed, self._progressed, outputs = self._progressed, {}, []
        for request_id in progressed:
            seqs = self._requests.get(request_id)
            if seqs is None:                          # aborted since
                continue
            if finished_only and not all(s.finish_reason for s in seqs):
                continue
            outputs.append(RequestOutput.from_seqs(request_id, seqs, self.tokenizer))
            if outputs[-1].finished:
                del self._requests[request_id]
        return outputs

    def _admit_arrived(self) -> None:
        """Requests whose arrival time has come join the scheduler's waiting queue."""
        while self._pending and self._pending[0][0] <= self.clock:
            for seq in self._requests[self._pending.pop(0)[2]]:
                self.scheduler.add(seq)

    def _sample(self, chunks, logits: torch.Tensor) -> dict[int, int]:
        """The next token of every chunk that samples: ``sample_tokens`` over all rows at once on the device
        (greedy argmax, seeded races), then one device-to-host copy of the ids."""
        seqs = [c.seq for c in chunks if c.samples]
        tokens = sample_tokens(logits, *draw_keys(seqs)).tolist()
        return {seq.seq_id: token for seq, token in zip(seqs, tokens)}

    # ---------------------------------------------------------------- bookkeeping
    def _new_run(self) -> None:
        """A fresh scheduler (queues, counters) over the engine's blocks, its model runners, the clock at 0."""
        c = self.config
        bm = self.block_manager or BlockManager(c.num_blocks, c.block_size)
        cpu_bm = BlockManager(c.num_cpu_blocks, c.block_size) if c.num_cpu_blocks else None
        self.scheduler = Scheduler(
            bm, max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_chunked_prefill=c.enable_chunked_prefill,
            preemption_mode=c.preemption_mode, cpu_block_manager=cpu_bm, num_lookahead_slots=c.num_speculative_tokens,
            lookahead_disable_by_batch_size=c.speculative_disable_by_batch_size, partial_swap=c.enable_partial_swap)
        self._runner = ModelRunner(self.model, bm, self.pool, c.use_kernels, self._decode_graphs(self.model, self.pool),
                                   mixed=self._mixed_graphs(self.model, self.pool))
        self._spec = None if self.speculative_model is None else SpecDecodeWorker(
            self._runner, ModelRunner(self.speculative_model, bm, self.draft_pool, c.use_kernels,
                                      self._decode_graphs(self.speculative_model, self.draft_pool)))
        self._pools = [self.pool] + ([self.draft_pool] if self._spec else [])   # a swap moves both models' blocks
        self._requests, self._pending, self._next_seq_id = {}, [], 0
        self._inflight, self._progressed = None, {}   # asynchronous scheduling: the step launched, not read back
        self.clock, self.last_step = 0.0, None

    def _decode_graphs(self, model, pool) -> DecodeGraphs | None:
        """The CUDA graphs of ``model``'s decode steps (kept for the engine's life, captured at the first decode
        step), or None where they cannot run: ``enforce_eager``, a model on the CPU, ``use_kernels=False``."""
        c = self.config
        if c.enforce_eager or c.cudagraph_mode == "NONE" or model.device.type != "cuda" or c.use_kernels is False:
            return None
        if id(model) not in self._graphs:
            self._graphs[id(model)] = DecodeGraphs(model, pool, max_num_seqs=c.max_num_seqs,
                                                   max_model_len=self.max_model_len, block_size=c.block_size)
        return self._graphs[id(model)]

    def _mixed_graphs(self, model, pool):
        """The CUDA graphs of ``model``'s mixed steps (kept for the engine's life, captured at its first mixed
        step): ``cudagraph_mode="FULL_AND_PIECEWISE"`` piecewise graphs (``course_lib.serving.piecewise_graph``),
        ``"FULL"`` one graph per step, attention included (``course_lib.serving.full_graph``). None: another mode,
        ``enforce_eager``, a model on the CPU, ``use_kernels=False``, or speculative decoding (its steps with drafts
        are verify steps, which stay eager; kept simple: no mixed graphs at all with a draft model)."""
        c = self.config
        if (c.cudagraph_mode not in ("FULL_AND_PIECEWISE", "FULL") or c.enforce_eager or model.device.type != "cuda"
                or c.use_kernels is False or self.speculative_model is not None):
            return None
        if self._mixed is None:
            if c.cudagraph_mode == "FULL":
                self._mixed = FullMixedGraphs(model, pool, max_num_batched_tokens=c.max_num_batched_tokens,
                                              max_num_seqs=c.max_num_seqs, max_model_len=self.max_model_len)
            else:
                self._mixed = PiecewiseGraphs(model, pool, max_num_batched_tokens=c.max_num_batched_tokens,
                                              max_num_seqs=c.max_num_seqs)
        return self._mixed

    def _seed(self, params: SamplingParams, index: int) -> int | None:
        """The seed of sample ``index`` of a request (None when greedy): its own seed + index, else one drawn from
        the engine's generator."""
        if params.greedy:
            return None
        return params.seed + index if params.seed is not None else self._rng.randrange(MAX_SEED + 1)

    def _drop_unfinished(self) -> None:
        """Forget every unfinished request, give back every block the scheduler holds, empty its queues."""
        if self.scheduler is not None:
            self.scheduler.free_all()
        self._requests.clear()
        self._pending.clear()
        self._inflight, self._progressed = None, {}

    def _run_metrics(self, outputs: list[RequestOutput], steps: list[StepRecord], start: float) -> RunMetrics:
        swapped = sum(s.swapped_out_blocks for s in steps)
        swapped_in = sum(s.swapped_in_blocks for s in steps)
        bytes_per_block = sum(pool.bytes_per_block for pool in self._pools)   # with a draft: its K/V in the block too
        return summarize(
            "continuous", outputs, steps, self.clock - start, num_blocks=self.num_blocks,
            preemptions={m: self.scheduler.num_preemptions[m] for m in PREEMPTION_MODES},
            num_recomputed_tokens=self.scheduler.num_recomputed_tokens, num_swapped_blocks=swapped,
            swap_bytes=swapped * bytes_per_block, bytes_per_block=bytes_per_block,
            num_swapped_in_blocks=swapped_in, swap_in_bytes=swapped_in * bytes_per_block,
            swap_ops={d: self.scheduler.num_swap_ops[d] for d in ("out", "in")},
            resume_steps=list(self.scheduler.resume_steps),
            speculative=self._spec.stats if self._spec else None)

    @contextmanager
    def _exclusive(self, call: str):
        """Hold the engine for one call (reentrant: generate calls add_request and step); a call from another
        thread meanwhile raises instead of sharing the queues, the blocks and the pool."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"LLMEngine.{call}: LLMEngine.{self._holder or 'a call'} is already running on this "
                               "engine (called from another thread?): an engine serves one caller at a time; drive "
                               "it from one thread (an API server's engine loop), or give each thread its own engine")
        outer, self._holder = self._holder is None, self._holder or call
        try:
            yield
        finally:
            if outer:
                self._holder = None
            self._lock.release()

    def reset_prefix_cache(self) -> None:
        """Empty the prefix cache (every cached block back to the free list); no-op without prefix caching."""
        if self.block_manager is not None:
            cache = self.block_manager.prefix_cache
            cache.evict(len(cache))
