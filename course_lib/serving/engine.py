"""``LLMEngine``: continuous batching on a paged KV cache (lesson 04).

The loop of a serving engine, one iteration per forward pass ("iteration-level scheduling", Orca, OSDI 2022):

    while requests are unfinished:
        admit the requests that have arrived           (they wait in the scheduler's queue)
        out = scheduler.schedule()                     (which tokens of which sequences: decodes + prompt chunks)
        copy swapped blocks out / in                   (preemption by swap)
        logits = model(all scheduled tokens, flattened)   (course_lib.serving.model_runner: paged K/V, the course kernels)
        sample one token for every sequence that reached the end of its tokens
        scheduler.update(...)                          (append tokens, finish sequences, free their blocks)

A finished sequence leaves the batch at once and a waiting one takes its place in the very next step; static
batching (``course_lib.serving.static_batching``) instead waits until the whole batch is done.

**Speculative decoding** (lesson 06): with ``speculative_model`` and ``num_speculative_tokens`` = k the forward
pass and the sampling of a step become ``course_lib.serving.spec_decode.SpecDecodeWorker.step``: k batched passes of the
draft model, one pass of the target over every sequence's tokens + its drafts, verification; a sequence gains
1 ... k + 1 tokens per step, with the target's greedy tokens / the target's distribution.

**Time.** ``generate`` replays requests that arrive at ``arrival_times`` (seconds; default all at 0) on a clock
that advances by the measured wall time of each step (scheduling, copies, forward pass and sampling included)
and, when the engine is idle, jumps to the next arrival instead of sleeping. Latencies (TTFT, TPOT) are read
on that clock.

**Bad input: one bad request never sinks the batch.** Every request is checked before anything runs. A request
with an empty prompt, a prompt that fills the model's context, a token id that is not an integer (``1.7`` is not
token 1) or lies outside the vocabulary (the error names its position, ``prompt[3]``), invalid sampling parameters
(a NaN temperature, a seed outside [0, 2**63 - 1], an unknown key in a params dict) or more tokens than the whole
KV cache holds gets a ``RequestOutput`` whose ``error`` is a ``ValueError`` naming the request and the field;
the other requests are served. Misusing the call itself (prompts not a list, a params list of the wrong length,
...) raises ``TypeError`` / ``ValueError`` before anything runs.

**One call at a time.** An engine owns one KV pool and one block manager: ``generate`` on an engine whose
``generate`` is still running (another thread) raises a ``RuntimeError`` instead of sharing them. A call that
fails midway (an exception from the model, a KeyboardInterrupt) gives every block back before the exception
leaves it, so the engine serves the next call with its whole cache.
"""
from __future__ import annotations

import difflib
import numbers
import random
import threading
import time
from dataclasses import fields

import torch
from tqdm.auto import tqdm

from course_lib.paging.block_manager import BlockManager
from course_lib.serving.metrics import CompletionOutput, RequestMetrics, RequestOutput, RunMetrics, StepRecord, summarize
from course_lib.serving.kv_pool import make_kv_pool
from course_lib.model.fused import fuse
from course_lib.serving.cuda_graph import DecodeGraphs
from course_lib.serving.memory import num_blocks_for_gpu
from course_lib.serving.model_runner import ModelRunner
from course_lib.serving.prefix_cache import PrefixCachingBlockManager
from course_lib.model.sampling import MAX_SEED, SamplingParams, sample_token
from course_lib.serving.scheduler import PREEMPTION_MODES, Scheduler
from course_lib.serving.sequence import Sequence
from course_lib.serving.spec_decode import SpecDecodeWorker, check_speculative_config


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class LLMEngine:
    """Continuous batching over a paged KV cache of ``num_blocks`` blocks of ``block_size`` tokens.

    max_num_seqs            sequences in the running batch at most
    max_num_batched_tokens  tokens per step (the token budget); default 512 with chunked prefill, else the
                            model's context length (a whole prompt must fit one step)
    num_blocks              KV blocks on the device; default: enough for max_num_seqs full-context sequences
    preemption_mode         "recompute" or "swap" (to ``num_cpu_blocks`` CPU blocks, default num_blocks)
    enable_chunked_prefill  split long prompts into chunks that share steps with decodes (default True)
    enable_prefix_caching   reuse the K/V blocks of prompt prefixes computed before (lesson 05); the cache lives
                            as long as the engine, across generate calls (``reset_prefix_cache`` empties it)
    kv_cache_dtype          "auto" (K/V in the model's dtype) or "int8" / "fp8" (8-bit codes + a float16 scale per
                            token and kv head, lesson 07: ~half the bytes, so a memory budget holds ~twice the blocks;
                            size ``num_blocks`` with ``course_lib.quant.kv_quant.num_blocks_for_memory``)
    use_kernels             Triton kernels (default for a model on a GPU) or their plain-torch references (default
                            for a model on the CPU)
    gpu_memory_utilization  share of the GPU's memory the engine may use (vLLM's name, default 0.9): without
                            ``num_blocks``, on a GPU the KV cache gets what a profiling pass of the largest step
                            leaves of it (``course_lib.serving.memory``); on a CPU, max_num_seqs full contexts
    enforce_eager           never replay CUDA graphs (vLLM's name). By default, with the kernels on a GPU, decode-only
                            steps replay one CUDA graph per batch-size bucket (``course_lib.serving.cuda_graph``)
    speculative_model       a draft model (same vocabulary) for speculative decoding (``course_lib.serving.spec_decode``):
                            its K/V get a pool of their own with the same blocks
    num_speculative_tokens  draft tokens per sequence and step (k; 0 = off, the default). The token budget must
                            then hold 1 + k tokens per running sequence (the default does)
    speculative_disable_by_batch_size
                            no drafts in a step that starts with this many running sequences or more (vLLM's name;
                            default None: always speculate). A big batch already fills a step: a verify pass of
                            1 + k tokens per sequence then costs more than the drafts it accepts save. The draft
                            model still runs once over such a step's tokens, so that its K/V stay complete
    tokenizer               lets prompts be strings and fills ``.text`` of the outputs
    seed                    draws the seeds of requests without a seed of their own (course_lib.model.sampling)
    """

    def __init__(self, model, *, block_size: int = 16, num_blocks: int | None = None, max_num_seqs: int = 32,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = False,
                 preemption_mode: str = "recompute", enable_chunked_prefill: bool = True,
                 num_cpu_blocks: int | None = None, kv_cache_dtype: str = "auto", tokenizer=None,
                 use_kernels: bool | None = None, seed: int = 0, speculative_model=None,
                 num_speculative_tokens: int = 0, speculative_disable_by_batch_size: int | None = None,
                 enforce_eager: bool = False, gpu_memory_utilization: float = 0.9):
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {preemption_mode!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = model.config.max_position_embeddings
        self.block_size = _positive_int("block_size", block_size)
        self.max_num_seqs = _positive_int("max_num_seqs", max_num_seqs)
        blocks_per_seq = -(-self.max_model_len // block_size)
        if not (isinstance(gpu_memory_utilization, (int, float)) and 0 < gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        self.gpu_memory_utilization, self.memory_profile = float(gpu_memory_utilization), None
        self.num_blocks = _positive_int("num_blocks", max_num_seqs * blocks_per_seq if num_blocks is None else num_blocks)
        self.enable_chunked_prefill = bool(enable_chunked_prefill)
        k = self.num_speculative_tokens = check_speculative_config(model, speculative_model, num_speculative_tokens)
        self.speculative_model = speculative_model
        if speculative_disable_by_batch_size is not None:
            _positive_int("speculative_disable_by_batch_size", speculative_disable_by_batch_size)
            if not k:
                raise ValueError("speculative_disable_by_batch_size needs speculative decoding on "
                                 "(speculative_model and num_speculative_tokens)")
        self.speculative_disable_by_batch_size = speculative_disable_by_batch_size
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(512 if enable_chunked_prefill else self.max_model_len, max_num_seqs * (1 + k))
        self.max_num_batched_tokens = _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        if self.max_num_batched_tokens < max_num_seqs * (1 + k):
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({max_num_seqs})" + (f" x (1 + num_speculative_tokens ({k}))" if k else "") +
                             ": every running sequence must be able to decode in every step")
        if not enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= the model's context "
                             f"({self.max_model_len}) without chunked prefill: a whole prompt must fit one step")
        self.preemption_mode = preemption_mode
        swap = preemption_mode == "swap"
        self.num_cpu_blocks = (self.num_blocks if num_cpu_blocks is None else num_cpu_blocks) if swap else 0
        if swap:
            _positive_int("num_cpu_blocks", self.num_cpu_blocks)
        self.kv_cache_dtype = kv_cache_dtype
        if num_blocks is None and model.device.type == "cuda":   # what a profiling pass leaves of the card
            for m in (model, speculative_model):
                if m is not None and use_kernels is not False:
                    fuse(m)                            # profile the path the engine runs
            models = [m for m in (model, speculative_model) if m is not None]
            self.num_blocks, self.memory_profile = num_blocks_for_gpu(
                models, block_size, kv_cache_dtype, self.max_num_batched_tokens, self.gpu_memory_utilization)
            if self.num_blocks < blocks_per_seq:
                raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization}: the KV cache gets "
                                 f"{self.memory_profile['kv_bytes'] / 2**30:.2f} GiB, {self.num_blocks} blocks, fewer than "
                                 f"one sequence of max_model_len={self.max_model_len} needs ({blocks_per_seq})")
        self.pool = make_kv_pool(model.config, self.num_blocks, block_size, kv_cache_dtype=kv_cache_dtype,
                                 num_cpu_blocks=self.num_cpu_blocks, dtype=model.dtype, device=model.device)
        # speculative decoding: the draft's K/V in blocks of their own, at the same block ids as the target's
        self.draft_pool = None if speculative_model is None else make_kv_pool(
            speculative_model.config, self.num_blocks, block_size, kv_cache_dtype=kv_cache_dtype,
            num_cpu_blocks=self.num_cpu_blocks, dtype=speculative_model.dtype, device=speculative_model.device)
        self.use_kernels = use_kernels
        self.enforce_eager = bool(enforce_eager)
        for m in (model, speculative_model):   # the GPU kernel path: the model's fused kernels (course_lib.model.fused)
            if m is not None and m.device.type == "cuda" and use_kernels is not False:
                fuse(m)
        self._graphs: dict[int, DecodeGraphs] = {}   # per model (target, draft): captured on the first decode step
        # lesson 05: one block manager for the engine's lifetime, so that its prefix cache outlives a generate
        # call (the K/V it points to stay in self.pool); without caching, a fresh one per call
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.block_manager = PrefixCachingBlockManager(self.num_blocks, block_size) if enable_prefix_caching else None
        self._rng = random.Random(seed)
        self._busy = threading.Lock()               # held by the generate call that runs
        self.metrics: RunMetrics | None = None      # of the last generate call
        self.scheduler: Scheduler | None = None     # of the last generate call (its queues are empty at the end)

    # ---------------------------------------------------------------- the public call
    def generate(self, prompts, params=None, *, arrival_times=None, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Generate completions for ``prompts`` (token-id lists or 1-D integer tensors, or strings with a tokenizer).
        ``params``: one SamplingParams (or dict) for all, or a list with one per prompt. Returns one RequestOutput per
        prompt, in order (a bad request's carries its ``error``); the run's metrics are in ``self.metrics``. The
        progress bar shows by default from 64 requests on. One call at a time per engine (``RuntimeError``)."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("LLMEngine.generate is already running on this engine (called from another thread?): "
                               "an engine serves one call at a time; wait for it, or give each thread its own engine")
        try:
            return self._generate(prompts, params, arrival_times, use_tqdm)
        finally:
            self._free_unfinished()   # no-op after a clean run; after an exception, every block comes back
            self._busy.release()

    def _generate(self, prompts, params, arrival_times, use_tqdm) -> list[RequestOutput]:
        prompts, params_list, arrivals = check_call(prompts, params, arrival_times)
        bm = self.block_manager or BlockManager(self.num_blocks, self.block_size)
        cpu_bm = BlockManager(self.num_cpu_blocks, self.block_size) if self.num_cpu_blocks else None
        self.scheduler = scheduler = Scheduler(
            bm, max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_chunked_prefill=self.enable_chunked_prefill,
            preemption_mode=self.preemption_mode, cpu_block_manager=cpu_bm,
            num_lookahead_slots=self.num_speculative_tokens,
            lookahead_disable_by_batch_size=self.speculative_disable_by_batch_size)
        runner = ModelRunner(self.model, bm, self.pool, self.use_kernels, self._decode_graphs(self.model, self.pool))
        spec = None if self.speculative_model is None else SpecDecodeWorker(
            runner, ModelRunner(self.speculative_model, bm, self.draft_pool, self.use_kernels,
                                self._decode_graphs(self.speculative_model, self.draft_pool)))
        pools = [self.pool] + ([self.draft_pool] if spec else [])   # swapping moves the blocks of both models
        outputs, pending, next_seq_id = [], [], 0
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            prompt_ids, p, error = check_request(i, prompt, p, vocab_size=self.model.config.vocab_size,
                                                 max_model_len=self.max_model_len, tokenizer=self.tokenizer)
            if error is None:
                error = self._check_blocks(i, prompt_ids, p, scheduler)
            outputs.append(RequestOutput(i, prompt_ids, error=error))
            if error is None:
                seqs = [Sequence(next_seq_id + j, i, list(prompt_ids), p, arrivals[i], j, self._seed(p, j))
                        for j in range(p.n)]
                next_seq_id += p.n
                pending.append((arrivals[i], i, seqs))
        pending.sort(key=lambda r: (r[0], r[1]))
        sequences = {i: seqs for _, i, seqs in pending}
        bar = tqdm(total=len(pending), desc="requests", unit="req",
                   disable=not (len(prompts) >= 64 if use_tqdm is None else use_tqdm))
        clock, steps, device = 0.0, [], self.model.device
        while pending or scheduler.has_unfinished():
            while pending and pending[0][0] <= clock:             # requests that have arrived join the queue
                for seq in pending.pop(0)[2]:
                    scheduler.add(seq)
            if not scheduler.has_unfinished():                    # idle: jump to the next arrival
                clock = pending[0][0]
                continue
            _synchronize(device)
            t0 = time.perf_counter()
            out = scheduler.schedule()
            if not out.chunks:
                raise RuntimeError("the scheduler scheduled nothing although requests are unfinished (a bug)")
            for pool in pools:
                pool.swap_out(out.swap_out)
                pool.swap_in(out.swap_in)
            next_tokens = spec.step(out.chunks) if spec else self._sample(out.chunks, runner.execute(out.chunks))
            for chunk in out.chunks:
                if chunk.seq.first_scheduled_time is None:
                    chunk.seq.first_scheduled_time = clock
            _synchronize(device)
            duration = time.perf_counter() - t0
            finished = scheduler.update(out, next_tokens, clock + duration)
            steps.append(StepRecord(
                start=clock, duration=duration, num_prefill_tokens=out.num_prefill_tokens,
                num_decode_tokens=out.num_decode_tokens, num_running=len(out.chunks),
                num_waiting=len(scheduler.waiting), num_swapped=len(scheduler.swapped),
                blocks_used=bm.num_used_blocks, preempted=out.preempted, swapped_out_blocks=len(out.swap_out),
                swapped_in_blocks=len(out.swap_in), num_draft_tokens=out.num_lookahead_tokens,
                composition=[(c.seq.request_id, c.num_tokens) for c in out.chunks]))
            clock += duration
            done = {seq.request_id for seq in finished if all(s.finish_reason for s in sequences[seq.request_id])}
            bar.update(len(done))
        bar.close()
        for i, seqs in sequences.items():
            outputs[i] = self._request_output(outputs[i], seqs)
        swapped = sum(s.swapped_out_blocks for s in steps)
        bytes_per_block = sum(pool.bytes_per_block for pool in pools)   # with a draft: its K/V in the block too
        self.metrics = summarize(
            "continuous", outputs, steps, clock - min(arrivals, default=0.0), num_blocks=self.num_blocks,
            preemptions={m: scheduler.num_preemptions[m] for m in PREEMPTION_MODES},
            num_recomputed_tokens=scheduler.num_recomputed_tokens, num_swapped_blocks=swapped,
            swap_bytes=swapped * bytes_per_block, bytes_per_block=bytes_per_block,
            speculative=spec.stats if spec else None)
        return outputs

    # ---------------------------------------------------------------- helpers
    def _decode_graphs(self, model, pool) -> DecodeGraphs | None:
        """The CUDA graphs of ``model``'s decode steps (kept for the engine's life), or None where they cannot
        run: ``enforce_eager``, a model on the CPU, or the plain-torch path (``use_kernels=False``)."""
        if self.enforce_eager or model.device.type != "cuda" or self.use_kernels is False:
            return None
        if id(model) not in self._graphs:
            self._graphs[id(model)] = DecodeGraphs(model, pool, max_num_seqs=self.max_num_seqs,
                                                   max_model_len=self.max_model_len, block_size=self.block_size)
        return self._graphs[id(model)]

    def _sample(self, chunks, logits: torch.Tensor) -> dict[int, int]:
        """The next token of every chunk that samples: one argmax over all greedy rows (one device-to-host
        copy), a draw for each sampling row with the generator of its sequence and position."""
        seqs = [c.seq for c in chunks if c.samples]
        greedy = logits.argmax(dim=-1).tolist()
        return {seq.seq_id: (greedy[i] if seq.params.greedy else sample_token(logits[i], seq.params, seq.generator()))
                for i, seq in enumerate(seqs)}

    def _seed(self, params: SamplingParams, index: int) -> int | None:
        """The seed of sample ``index`` of a request (None when greedy): its own seed + index, else one drawn from
        the engine's generator."""
        if params.greedy:
            return None
        return params.seed + index if params.seed is not None else self._rng.randrange(MAX_SEED + 1)

    def _free_unfinished(self) -> None:
        """Free the blocks of every sequence the last call left behind (it raised midway) and empty its queues."""
        scheduler = self.scheduler
        if scheduler is None:
            return
        for bm in filter(None, (scheduler.block_manager, scheduler.cpu_block_manager)):
            for seq_id in list(bm.block_tables):
                bm.free(seq_id)     # blocks the prefix cache holds stay cached (their K/V were complete)
        for queue in (scheduler.waiting, scheduler.running, scheduler.swapped):
            queue.clear()

    def _check_blocks(self, i: int, prompt: list[int], params: SamplingParams, scheduler: Scheduler):
        """A ValueError if the sequence could not fit the KV cache even alone (it would never finish)."""
        total = min(len(prompt) + params.max_tokens, self.max_model_len)
        need, most = -(-total // self.block_size), scheduler.max_blocks_per_seq()
        if need > most:
            return ValueError(f"request {i}: max_tokens: prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) "
                              f"need {need} KV blocks, more than the {most} one sequence may use "
                              f"(num_blocks={self.num_blocks}): lower max_tokens or add blocks")
        return None

    def _request_output(self, out: RequestOutput, seqs: list[Sequence]) -> RequestOutput:
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        out.outputs = [CompletionOutput(s.sample_index, list(s.output_token_ids),
                                        decode(s.output_token_ids) if decode else None, s.finish_reason,
                                        list(s.token_times)) for s in seqs]
        out.metrics = RequestMetrics(
            arrival_time=seqs[0].arrival_time, first_scheduled_time=min(s.first_scheduled_time for s in seqs),
            first_token_time=min(s.token_times[0] for s in seqs), finished_time=max(s.token_times[-1] for s in seqs),
            num_output_tokens=sum(len(s.output_token_ids) for s in seqs),
            num_preemptions=sum(s.num_preemptions for s in seqs))
        out.num_cached_tokens = seqs[0].num_cached_tokens
        return out

    def reset_prefix_cache(self) -> None:
        """Empty the prefix cache (every cached block back to the free list); no-op without prefix caching."""
        if self.block_manager is not None:
            cache = self.block_manager.prefix_cache
            cache.evict(len(cache))


# ---------------------------------------------------------------- validation (shared with the static baseline)
def check_call(prompts, params, arrival_times) -> tuple[list, list, list[float]]:
    """Whole-call misuse raises before anything runs: (prompts, one params entry per prompt, arrival times)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of prompts (token-id lists or strings), got {type(prompts).__name__}")
    if params is None or isinstance(params, (SamplingParams, dict)):
        params = [params] * len(prompts)
    elif not isinstance(params, (list, tuple)) or len(params) != len(prompts):
        raise ValueError(f"params must be one SamplingParams or a list of one per prompt ({len(prompts)}), got "
                         f"{type(params).__name__}" + (f" of length {len(params)}" if hasattr(params, "__len__") else ""))
    if arrival_times is None:
        arrival_times = [0.0] * len(prompts)
    arrival_times = [float(a) for a in arrival_times]
    if len(arrival_times) != len(prompts) or any(not a >= 0 for a in arrival_times):
        raise ValueError(f"arrival_times must hold one time >= 0 (s) per prompt ({len(prompts)} prompts)")
    return list(prompts), list(params), arrival_times


PARAM_NAMES = tuple(f.name for f in fields(SamplingParams))


def check_params(params) -> SamplingParams:
    """SamplingParams from None (the defaults), a SamplingParams or a dict of its fields; a ValueError names an
    unknown key (``SamplingParams(**params)`` would raise a TypeError, which sank the whole call)."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if not isinstance(params, dict):
        raise ValueError(f"params: expected SamplingParams or a dict, got {type(params).__name__}")
    for key in params:
        if key not in PARAM_NAMES:
            near = difflib.get_close_matches(str(key), PARAM_NAMES, n=1)
            raise ValueError(f"params: unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                             + f"; SamplingParams has {', '.join(PARAM_NAMES)}")
    return SamplingParams(**params)                  # raises ValueError naming the bad field


def check_prompt(prompt, vocab_size: int, tokenizer=None) -> list[int]:
    """The token ids of a prompt: a string (encoded by the tokenizer), a list / tuple / array of ints, or a 1-D
    integer tensor. Each id must be an integer in [0, vocab_size): ``1.7`` is refused, never truncated to 1."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompt: a string prompt needs a tokenizer (LLMEngine(..., tokenizer=...))")
        prompt = tokenizer.encode(prompt)
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise ValueError(f"prompt: a tensor of token ids must be 1-D with an integer dtype, got shape "
                             f"{tuple(prompt.shape)} and dtype {prompt.dtype}")
        prompt = prompt.tolist()
    try:
        ids = list(prompt)
    except TypeError:
        raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}") from None
    if not ids:
        raise ValueError("prompt: it is empty; generation needs at least one token to condition on")
    for pos, t in enumerate(ids):
        if not isinstance(t, numbers.Integral) or isinstance(t, bool):
            raise ValueError(f"prompt[{pos}] = {t!r} is not an integer token id ({type(t).__name__})")
        if not 0 <= t < vocab_size:
            raise ValueError(f"prompt[{pos}] = {t} is outside the vocabulary [0, {vocab_size})")
    return [int(t) for t in ids]


def check_request(i: int, prompt, params, *, vocab_size: int, max_model_len: int, tokenizer=None):
    """(prompt token ids, SamplingParams, None) for a valid request, else (..., a ValueError naming the request
    and the field: the request's output carries it, the other requests are served)."""
    prompt_ids = []
    try:
        params = check_params(params)
        prompt_ids = check_prompt(prompt, vocab_size, tokenizer)
        if len(prompt_ids) >= max_model_len:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens, but the model's context is {max_model_len} tokens: "
                             "no room to generate")
    except ValueError as err:
        err.args = (f"request {i}: {err.args[0]}",)
        return prompt_ids, params, err
    return prompt_ids, params, None
