"""What a generate run returns and measures (lesson 04): per-request outputs and latencies, per-step records,
and the run's summary. Shared by the engine (``course_lib.serving.engine``) and the static baseline
(``course_lib.serving.static_batching``), so that both are measured the same way.

Latency vocabulary (as in vLLM's benchmarks):

* **TTFT**, time to first token: from a request's arrival to its first output token (queueing + prefill);
* **TPOT**, time per output token: (finish - first token) / (output tokens - 1), the pace of its decoding;
* **ITL**, inter-token latencies: the gaps between consecutive tokens of one request (TPOT is their mean);
* **throughput**: output tokens of all requests / the run's duration (first arrival to last finish).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from course_lib.serving.sequence import Sequence
    from course_lib.serving.speculative import SpeculativeStats


@dataclass
class CompletionOutput:
    """One generated sequence (a request with SamplingParams.n = k has k of them)."""

    index: int
    token_ids: list[int]
    text: str | None = None
    finish_reason: str | None = None           # "stop", "length" or "abort" (LLMEngine.abort_request); None: running
    token_times: list[float] = field(default_factory=list, repr=False)   # when each token was produced (s)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_output_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        if self.finished_time is None or self.num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """The result of one request: its completions, or the ValueError that rejected it (the others still run).
    ``LLMEngine.step`` returns one for every request that gained tokens in the step: its tokens so far, and
    ``finished`` once every completion has ended (then its ``text`` is decoded too)."""

    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    metrics: RequestMetrics | None = None
    error: Exception | None = None
    num_cached_tokens: int = 0                 # prompt tokens served from the prefix cache (lesson 05)
    finished: bool = False                     # nothing more will come (done, aborted or rejected)

    @classmethod
    def from_seqs(cls, request_id, seqs: list[Sequence], tokenizer=None) -> RequestOutput:
        """The output of a request now (vLLM's ``from_seq_group``), from its n sequences: their tokens so far;
        ``finished`` and the text too once every sequence has finished."""
        # one pass over the request's sequences, no generator per field: this runs for every request of every step
        finished, scheduled, first_token, last_token, num_output_tokens, num_preemptions = True, [], [], [], 0, 0
        for s in seqs:
            if not s.finish_reason:
                finished = False
            if s.first_scheduled_time is not None:
                scheduled.append(s.first_scheduled_time)
            if s.token_times:
                first_token.append(s.token_times[0])
                last_token.append(s.token_times[-1])
            num_output_tokens += len(s.output_token_ids)
            num_preemptions += s.num_preemptions
        decode = tokenizer.decode if finished and tokenizer is not None else None
        metrics = RequestMetrics(seqs[0].arrival_time, min(scheduled) if scheduled else None,
                                 min(first_token) if first_token else None,
                                 max(last_token) if finished and last_token else None,
                                 num_output_tokens, num_preemptions)
        completions = [CompletionOutput(s.sample_index, s.output_token_ids[:],
                                        decode(s.output_token_ids) if decode else None, s.finish_reason,
                                        s.token_times[:]) for s in seqs]
        return cls(request_id, seqs[0].prompt_token_ids, completions, metrics,
                   num_cached_tokens=seqs[0].num_cached_tokens, finished=finished)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def token_ids(self) -> list[int]:
        """The first completion's tokens ([] for a rejected request)."""
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def text(self) -> str | None:
        return self.outputs[0].text if self.outputs else None


@dataclass
class StepRecord:
    """One step (one forward pass) of a run."""

    start: float                       # clock at the start of the step (s)
    duration: float                    # its wall time, scheduling and copies included (s)
    num_prefill_tokens: int            # prompt tokens computed (recomputed ones included); padding excluded
    num_decode_tokens: int             # one per decoding sequence
    num_running: int                   # sequences in the batch
    num_waiting: int = 0
    num_swapped: int = 0
    blocks_used: int = 0               # KV blocks held after the step (static: token slots / block_size)
    num_padding_tokens: int = 0        # static batching: computed slots that are padding or finished rows
    preempted: list[tuple[int, str]] = field(default_factory=list)   # (seq id, "recompute" | "swap")
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    composition: list[tuple[int, int]] = field(default_factory=list, repr=False)   # (request id, tokens) per chunk
    num_draft_tokens: int = 0          # speculative decoding: draft tokens the target verified (lookahead slots)


def _stats(values: list[float], prefix: str) -> dict[str, float]:
    if not values:
        return {f"{prefix}_mean": float("nan"), f"{prefix}_p50": float("nan"), f"{prefix}_p99": float("nan")}
    a = np.asarray(values, dtype=float)
    return {f"{prefix}_mean": float(a.mean()), f"{prefix}_p50": float(np.percentile(a, 50)),
            f"{prefix}_p99": float(np.percentile(a, 99))}


@dataclass
class RunMetrics:
    """Summary of one generate run (``LLMEngine.metrics`` / ``StaticBatchEngine.metrics`` after the call)."""

    name: str
    num_requests: int
    num_errors: int
    num_prompt_tokens: int
    num_output_tokens: int
    elapsed_s: float
    ttft: list[float]
    tpot: list[float]
    latency: list[float]
    itl: list[float]                               # every inter-token gap of every request
    steps: list[StepRecord] = field(repr=False, default_factory=list)
    num_blocks: int = 0
    preemptions: dict[str, int] = field(default_factory=dict)
    num_recomputed_tokens: int = 0
    num_swapped_blocks: int = 0                    # blocks copied out to the CPU
    swap_bytes: int = 0                            # their bytes
    num_swapped_in_blocks: int = 0                 # blocks copied back (fewer: prefix-cache hits, lesson 05)
    swap_in_bytes: int = 0
    swap_ops: dict = field(default_factory=dict)   # "out" / "in": copies of one sequence's blocks in one step
    resume_steps: list = field(default_factory=list)   # per swap-in: steps from the preemption to the resumption
    num_cached_tokens: int = 0                     # prompt tokens served from the prefix cache (lesson 05)
    bytes_per_block: int = 0                       # K/V bytes of one block in all layers (halved by INT8, lesson 07)
    speculative: SpeculativeStats | None = None    # speculative decoding's counters (None when it is off)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Fraction of the prompt tokens whose K/V came from the prefix cache (prefill work saved)."""
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0

    @property
    def throughput(self) -> float:
        """Output tokens per second."""
        return self.num_output_tokens / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    @property
    def blocks_used(self) -> list[int]:
        return [s.blocks_used for s in self.steps]

    def summary(self) -> dict:
        """Every number as a flat dict (JSON-ready)."""
        out = dict(name=self.name, num_requests=self.num_requests, num_errors=self.num_errors,
                   num_prompt_tokens=self.num_prompt_tokens, num_output_tokens=self.num_output_tokens,
                   elapsed_s=self.elapsed_s, throughput_tok_s=self.throughput, num_steps=len(self.steps),
                   max_blocks_used=max(self.blocks_used, default=0), num_blocks=self.num_blocks,
                   bytes_per_block=self.bytes_per_block,
                   max_kv_bytes_used=max(self.blocks_used, default=0) * self.bytes_per_block,
                   preemptions=dict(self.preemptions), num_recomputed_tokens=self.num_recomputed_tokens,
                   num_swapped_blocks=self.num_swapped_blocks, swap_bytes=self.swap_bytes,
                   num_swapped_in_blocks=self.num_swapped_in_blocks, swap_in_bytes=self.swap_in_bytes,
                   swap_ops=dict(self.swap_ops),     # None without resumptions (NaN would not survive a JSON trip)
                   resume_steps_mean=float(np.mean(self.resume_steps)) if self.resume_steps else None,
                   num_padding_tokens=sum(s.num_padding_tokens for s in self.steps),
                   num_prefill_tokens=sum(s.num_prefill_tokens for s in self.steps),
                   num_cached_tokens=self.num_cached_tokens, prefix_cache_hit_rate=self.prefix_cache_hit_rate)
        if self.speculative is not None:   # LLMEngine(speculative_model=...): lesson 06's counters over the run
            s = self.speculative
            out.update(spec_num_draft_tokens=s.proposed, spec_num_accepted_tokens=s.accepted,
                       spec_acceptance_rate=s.acceptance_rate,             # α: accepted / tested drafts
                       spec_draft_acceptance_rate=s.accepted / s.proposed if s.proposed else float("nan"),  # vLLM's
                       spec_tokens_per_target_forward=s.tokens_per_target_forward,   # per sequence and step
                       spec_num_draft_forwards=s.draft_forwards)
        for name in ("ttft", "tpot", "latency", "itl"):
            out.update(_stats(getattr(self, name), name))
        out["itl_max"] = max(self.itl, default=float("nan"))
        return out


def summarize(name: str, outputs: list[RequestOutput], steps: list[StepRecord], elapsed_s: float,
              **extra) -> RunMetrics:
    """RunMetrics of a run from its outputs and steps."""
    ok = [o for o in outputs if o.ok]
    itl = [b - a for o in ok for c in o.outputs for a, b in zip(c.token_times, c.token_times[1:])]
    return RunMetrics(
        name=name, num_requests=len(outputs), num_errors=len(outputs) - len(ok),
        num_prompt_tokens=sum(len(o.prompt_token_ids) for o in ok),
        num_output_tokens=sum(len(c.token_ids) for o in ok for c in o.outputs), elapsed_s=elapsed_s,
        ttft=[o.metrics.ttft for o in ok], tpot=[o.metrics.tpot for o in ok if o.metrics.tpot is not None],
        latency=[o.metrics.latency for o in ok], itl=itl, steps=steps,
        num_cached_tokens=sum(o.num_cached_tokens for o in ok), **extra)
