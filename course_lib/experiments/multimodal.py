"""Multimodal scheduling, simulated on the engine's scheduler (lesson 04; the Q&A document's Q10).

A vision-language model runs a **vision encoder** on each image before the language model can prefill the image's
tokens. That encoder work is a budget item of its own, next to the token budget of a step. vLLM's scheduler
(v1) keeps two:

* ``max_num_encoder_input_tokens``: the encoder tokens (image embeddings) that may be computed in one step. A
  prompt chunk that reaches an image whose embeddings are not ready is cut just before the image when the encoder
  budget is spent, and goes on in a later step;
* ``encoder_cache_size``: embeddings computed and not yet consumed by the prefill (a chunked prefill may take an
  image over several steps) are kept in an **encoder cache**, keyed by the image's content hash and shared by the
  requests that carry the same image; entries no request still needs are evicted, oldest first, when room is
  needed (vLLM's ``EncoderCacheManager``).

And **prefix caching** must see images: their placeholder token ids are the same for every image, so vLLM adds
each image's content hash to the hash of the KV blocks that hold its tokens ("extra keys", vLLM's automatic prefix
caching design). Here the same effect comes from deriving the placeholder ids from the content hash
(``image_token_ids``): the same image after the same prefix hits the cache and needs **no encoder run at all**; a
different image misses. With ``image_ids="placeholder"`` every image gets the same ids, and the counts show the
false hits that would serve one picture's K/V for another (``false_prefix_hit_tokens``).

``EncoderBudgetScheduler`` is the engine's ``Scheduler`` with those two budgets; ``simulate`` drives it without a
model (stand-in tokens, output lengths set by ``max_tokens``) and counts: steps, encoder tokens computed, taken
from the encoder cache or skipped thanks to the prefix cache, the encoder tokens of the busiest step, and each
request's time to first token in steps. Simplifications: one step is the unit of time (an encoder-heavy step is
longer in reality: hence the budget); the encoder check at admission runs before the prefix cache is consulted.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from course_lib.model.sampling import SamplingParams
from course_lib.paging.block_manager import BlockManager
from course_lib.serving.prefix_cache import PrefixCachingBlockManager
from course_lib.serving.scheduler import Scheduler
from course_lib.serving.sequence import RUNNING, ScheduledChunk, SchedulerOutput, Sequence

IMAGE_TOKEN_BASE = 1 << 24          # stand-in ids of image tokens, far from any text vocabulary
PLACEHOLDER_ID = IMAGE_TOKEN_BASE   # one id for every image token (what a processor emits before hashing)


@dataclass(frozen=True)
class Image:
    content: bytes         # the image file (any bytes: only its hash matters here)
    num_tokens: int        # tokens the encoder turns it into (LLaVA-1.5: 576)

    @property
    def mm_hash(self) -> str:
        return hashlib.sha256(self.content).hexdigest()[:16]


def image_token_ids(image: Image, mode: str = "content_hash") -> list[int]:
    """The prompt ids of an image: derived from its content hash (``"content_hash"``), or one placeholder id for
    all images (``"placeholder"``)."""
    if mode == "placeholder":
        return [PLACEHOLDER_ID] * image.num_tokens
    if mode != "content_hash":
        raise ValueError(f"mode must be 'content_hash' or 'placeholder', got {mode!r}")
    rng = np.random.default_rng(int(image.mm_hash, 16))
    return (IMAGE_TOKEN_BASE + 1 + rng.integers(0, 1 << 20, image.num_tokens)).tolist()


def build_prompt(parts: list, mode: str = "content_hash") -> tuple[list[int], list[tuple[int, Image]]]:
    """Prompt ids of text parts (lists of ids) and images, and where each image starts."""
    ids, placements = [], []
    for part in parts:
        if isinstance(part, Image):
            placements.append((len(ids), part))
            ids += image_token_ids(part, mode)
        else:
            ids += list(part)
    return ids, placements


class EncoderBudgetScheduler(Scheduler):
    """The engine's scheduler with an encoder budget per step and an encoder cache shared by content hash."""

    def __init__(self, *args, max_num_encoder_input_tokens: int, encoder_cache_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 < max_num_encoder_input_tokens <= encoder_cache_size:
            raise ValueError("need 0 < max_num_encoder_input_tokens <= encoder_cache_size, got "
                             f"{max_num_encoder_input_tokens} and {encoder_cache_size}")
        self.max_num_encoder_input_tokens, self.encoder_cache_size = max_num_encoder_input_tokens, encoder_cache_size
        self.images: dict[int, list[tuple[int, Image]]] = {}      # seq_id -> (start, image), in prompt order
        self.seqs: dict[int, Sequence] = {}
        self.encoder_cache: OrderedDict[str, int] = OrderedDict()  # mm_hash -> tokens, oldest first
        self.users: dict[str, set[int]] = {}                       # mm_hash -> seq_ids still to consume it
        self.encoder_tokens_computed = self.encoder_tokens_cached = self.encoder_tokens_skipped = 0
        self.false_prefix_hit_tokens = 0
        self.encoder_tokens_per_step: list[int] = []
        self._owner: dict[tuple[int, ...], str] = {}               # prompt prefix through an image -> its hash
        self._budget = 0

    def add_request(self, seq: Sequence, placements: list[tuple[int, Image]]) -> None:
        for _, image in placements:
            if image.num_tokens > self.max_num_encoder_input_tokens:
                raise ValueError(f"an image of {image.num_tokens} tokens never fits max_num_encoder_input_tokens="
                                 f"{self.max_num_encoder_input_tokens}")
        self.images[seq.seq_id], self.seqs[seq.seq_id] = sorted(placements, key=lambda p: p[0]), seq
        self.add(seq)

    def schedule(self) -> SchedulerOutput:
        self._budget = self.max_num_encoder_input_tokens
        out = super().schedule()
        self.encoder_tokens_per_step.append(self.max_num_encoder_input_tokens - self._budget)
        return out

    # ---------------------------------------------------------------- the encoder budget
    def _room(self) -> int:
        """Encoder-cache tokens free, counting entries that no request still needs as free (evictable)."""
        held = sum(n for h, n in self.encoder_cache.items() if self.users.get(h))
        return self.encoder_cache_size - held

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        """The base count, cut before the first image of the chunk whose embeddings are neither cached nor
        computable within this step's encoder budget and cache room (0 when the chunk would start inside it)."""
        n = super()._num_new_tokens(seq, budget)
        start, left, room = seq.num_computed_tokens, self._budget, self._room()
        for pos, image in self.images.get(seq.seq_id, []):
            if pos + image.num_tokens <= start or pos >= start + n or image.mm_hash in self.encoder_cache:
                continue
            if image.num_tokens <= min(left, room):
                left, room = left - image.num_tokens, room - image.num_tokens
                continue
            cut = max(0, pos - start)
            return cut if self.enable_chunked_prefill else 0
        return n

    def _schedule_chunk(self, seq: Sequence, n: int, budget: int, out: SchedulerOutput) -> int:
        start = seq.num_computed_tokens
        for pos, image in self.images.get(seq.seq_id, []):
            if pos + image.num_tokens <= start or pos >= start + n:
                continue
            users = self.users.setdefault(image.mm_hash, set())
            if image.mm_hash in self.encoder_cache:
                if seq.seq_id not in users and pos >= start:     # first use by this request: shared, not computed
                    self.encoder_tokens_cached += image.num_tokens
                self.encoder_cache.move_to_end(image.mm_hash)
            else:
                self._evict(image.num_tokens)
                self.encoder_cache[image.mm_hash] = image.num_tokens
                self.encoder_tokens_computed += image.num_tokens
                self._budget -= image.num_tokens
                self._owner.setdefault(tuple(seq.prompt_token_ids[:pos + image.num_tokens]), image.mm_hash)
            users.add(seq.seq_id)
        return super()._schedule_chunk(seq, n, budget, out)

    def _evict(self, need: int) -> None:
        for h in [h for h in self.encoder_cache if not self.users.get(h)]:        # oldest first
            if self.encoder_cache_size - sum(self.encoder_cache.values()) >= need:
                return
            del self.encoder_cache[h]

    # ---------------------------------------------------------------- prefix caching and bookkeeping
    def allocate(self, seq: Sequence) -> None:
        super().allocate(seq)
        if seq.num_preemptions:
            return
        for pos, image in self.images.get(seq.seq_id, []):
            end = pos + image.num_tokens
            if end <= seq.num_computed_tokens:                   # the image's K/V came from the prefix cache
                self.encoder_tokens_skipped += image.num_tokens
                owner = self._owner.get(tuple(seq.prompt_token_ids[:end]))
                if owner is not None and owner != image.mm_hash:
                    self.false_prefix_hit_tokens += image.num_tokens

    def update(self, out: SchedulerOutput, next_tokens: dict, now: float) -> list[Sequence]:
        finished = super().update(out, next_tokens, now)
        for h, users in self.users.items():                     # a request that consumed an image lets go of it
            self.users[h] = {sid for sid in users if self.seqs[sid].status == RUNNING and any(
                img.mm_hash == h and pos + img.num_tokens > self.seqs[sid].num_computed_tokens
                for pos, img in self.images[sid])}
        return finished


def simulate(requests: list[tuple[int, list, int]], *, num_blocks: int = 1024, block_size: int = 16,
             max_num_seqs: int = 8, max_num_batched_tokens: int = 512, max_num_encoder_input_tokens: int = 576,
             encoder_cache_size: int | None = None, enable_prefix_caching: bool = True,
             image_ids: str = "content_hash", max_steps: int = 10_000) -> dict:
    """Serve requests of (arrival step, prompt parts, output tokens) on ``EncoderBudgetScheduler``; return its
    counts (no model: stand-in tokens)."""
    bm = PrefixCachingBlockManager(num_blocks, block_size) if enable_prefix_caching else \
        BlockManager(num_blocks, block_size)
    sched = EncoderBudgetScheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   max_model_len=1 << 20, max_num_encoder_input_tokens=max_num_encoder_input_tokens,
                                   encoder_cache_size=encoder_cache_size or 4 * max_num_encoder_input_tokens)
    pending = sorted(enumerate(requests), key=lambda r: (r[1][0], r[0]))
    arrival, first_token = {}, {}
    step = 0
    while pending or sched.has_unfinished():
        if step == max_steps:
            raise RuntimeError(f"not done after {max_steps} steps")
        while pending and pending[0][1][0] <= step:
            i, (t, parts, output) = pending.pop(0)
            ids, placements = build_prompt(parts, image_ids)
            sched.add_request(Sequence(i, i, ids, SamplingParams(max_tokens=output), arrival_time=float(t)),
                              placements)
            arrival[i] = t
        out = sched.schedule()
        chunks: list[ScheduledChunk] = out.chunks
        for c in chunks:
            if c.samples and c.seq.seq_id not in first_token:
                first_token[c.seq.seq_id] = step
        sched.update(out, {c.seq.seq_id: 1 for c in chunks if c.samples}, float(step))
        step += 1
    ttft = [first_token[i] - arrival[i] + 1 for i in sorted(arrival)]
    return dict(steps=step, encoder_tokens_computed=sched.encoder_tokens_computed,
                encoder_tokens_cached=sched.encoder_tokens_cached,
                encoder_tokens_skipped=sched.encoder_tokens_skipped,
                false_prefix_hit_tokens=sched.false_prefix_hit_tokens,
                max_encoder_tokens_per_step=max(sched.encoder_tokens_per_step),
                image_tokens=sum(img.num_tokens for _, parts, _ in requests for img in parts
                                 if isinstance(img, Image)),
                ttft_steps=ttft, ttft_steps_mean=float(np.mean(ttft)), ttft_steps_max=max(ttft))


def image_trace(num_requests: int = 8, *, num_images: int = 2, image_tokens: int = 576, system_tokens: int = 32,
                question_tokens: int = 16, output_tokens: int = 16, gap: int = 2, seed: int = 0) -> list:
    """Requests of one system prompt, one of ``num_images`` images (so images repeat) and their own question,
    arriving every ``gap`` steps: (arrival step, parts, output tokens)."""
    rng = np.random.default_rng(seed)
    images = [Image(f"image-{k}".encode(), image_tokens) for k in range(num_images)]
    system = list(range(1, system_tokens + 1))
    return [(i * gap, [system, images[int(rng.integers(num_images))],
                       rng.integers(1000, 30_000, question_tokens).tolist()], output_tokens)
            for i in range(num_requests)]
