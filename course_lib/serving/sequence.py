"""What the scheduler (lesson 04) works with: a ``Sequence`` being generated, the ``ScheduledChunk`` of its tokens
that runs in a step, and the ``SchedulerOutput`` of a step (chunks, block copies, preemptions). Bookkeeping only:
token ids, counts and times; the K/V live in the engine's pool, addressed through the block manager."""
from __future__ import annotations

from dataclasses import dataclass, field

from course_lib.model.sampling import SamplingParams, TokenNoise, token_generator

WAITING, RUNNING, SWAPPED, FINISHED = "waiting", "running", "swapped", "finished"


@dataclass(eq=False)
class Sequence:
    """One sequence of tokens being generated (a request with ``n`` samples has n of them)."""

    seq_id: int
    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = 0.0
    sample_index: int = 0                     # which of the request's n samples
    seed: int | None = None                   # seed of its draws (sampling.token_generator); None when greedy
    output_token_ids: list[int] = field(default_factory=list)
    status: str = WAITING
    num_computed_tokens: int = 0              # tokens whose K/V are in the cache
    finish_reason: str | None = None          # "stop" (a stop token) or "length" (max_tokens or the context)
    num_preemptions: int = 0
    num_cached_tokens: int = 0                # prompt tokens taken from the prefix cache at the first admission
    first_scheduled_time: float | None = None
    token_times: list[float] = field(default_factory=list)   # when each output token was produced

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        """The input of a decode step (vLLM's ``get_last_token_id``), without building ``token_ids``."""
        return (self.output_token_ids or self.prompt_token_ids)[-1]

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """``token_ids[start:end]`` without building ``token_ids`` (a copy of every token) when the slice lies in
        the prompt or in the output: the model runner reads a chunk's tokens for every sequence of every step."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.token_ids[start:end]

    def generator(self, offset: int = 0) -> TokenNoise | None:
        """The noise of the draw of output token ``len(output_token_ids) + offset`` (a speculative step draws
        the tokens after the next one too): keyed by the seed and the position, never by the batch. None when
        greedy (no seed, no noise)."""
        return None if self.seed is None else token_generator(self.seed, len(self.output_token_ids) + offset)

    @property
    def priority(self) -> tuple[float, int]:
        """Smaller is served first: first come, first served (arrival time, then id)."""
        return (self.arrival_time, self.seq_id)


def draw_keys(seqs: list[Sequence], offsets: list[int] | None = None
              ) -> tuple[list[SamplingParams], list[int | None], list[int]]:
    """What ``sampling.sample_tokens`` needs per row: its params, and the seed and position of its noise
    (``Sequence.generator``), for output token ``len(output_token_ids) + offset`` of each sequence (placeholders of
    a step in flight count: they are tokens whose values are on their way)."""
    noise = [s.generator(o) for s, o in zip(seqs, offsets or [0] * len(seqs))]
    return ([s.params for s in seqs], [None if n is None else n.seed for n in noise],
            [0 if n is None else n.position for n in noise])


@dataclass
class ScheduledChunk:
    """Tokens ``start ... start + num_tokens - 1`` of ``seq`` run in this step. A chunk that reaches the end of
    the sequence's tokens yields logits for the next token (``samples``); an early prompt chunk does not."""

    seq: Sequence
    start: int
    num_tokens: int
    num_lookahead: int = 0      # speculative decoding: slots reserved for draft tokens after the chunk's tokens

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens == self.seq.num_tokens

    @property
    def num_logits(self) -> int:
        """Rows of logits the step needs from this chunk: its last one if it samples (a verify chunk of
        speculative decoding needs more: ``course_lib.serving.spec_decode.VerifyChunk``)."""
        return int(self.samples)

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.start >= len(self.seq.prompt_token_ids)


@dataclass
class SchedulerOutput:
    """What one step runs: chunks (decodes first), block copies to do before the forward pass, preemptions."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)   # (GPU block, CPU block) copies
    swap_in: list[tuple[int, int]] = field(default_factory=list)    # (CPU block, GPU block) copies
    preempted: list[tuple[int, str]] = field(default_factory=list)  # (seq_id, "recompute" | "swap")

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens + c.num_lookahead for c in self.chunks)

    @property
    def num_lookahead_tokens(self) -> int:
        return sum(c.num_lookahead for c in self.chunks)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks if not c.is_decode)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for c in self.chunks if c.is_decode)
