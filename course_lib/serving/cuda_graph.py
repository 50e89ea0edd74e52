"""Decode steps replayed as CUDA graphs (vLLM's and nano-vllm's technique; lesson 10).

A decode step of a small model is hundreds of tiny kernels: per layer two norms, four projections, RoPE, the
K/V store, the paged attention, the MLP. Launched one by one from Python, each costs the host ~5-20 µs, and the
GPU waits for the host: at batch 64 on an H100 the course's engine spent ~23 ms per step where reading the
weights and the K/V takes ~1 ms. A **CUDA graph** records the whole sequence of launches once and replays it
with a single call: the host cost of a step becomes one launch, whatever the number of kernels.

A graph replays exactly what it recorded: the same kernels, the same grid sizes, the same memory addresses. So:

* the step's inputs live in **persistent buffers** (token ids, positions, slot mapping, block tables, context
  lengths) that each step overwrites in place, with one host-to-device copy from a pinned staging buffer;
* shapes are fixed per graph: one graph per **batch-size bucket** (1, 2, 4, 8, 16, 32, ... up to
  ``max_num_seqs``); a batch of 5 runs the graph of 8, its 3 padding rows with slot -1 (the store skips them)
  and context length 0 (the attention writes zeros for them, reads nothing);
* the block tables are as wide as the longest sequence the engine allows, and the paged attention is planned
  (its split-K) for that length, once, at capture;
* nothing in the step may wait for the host (no ``.item()``, no ``.tolist()``): the kernels run with
  ``validate=False``, trusting the block manager that made the tables.

Only decode-only steps (every chunk one token) replay a graph; steps with prompt chunks or speculative verify
chunks run eagerly (their shapes change every step), or, with ``LLMEngine(cudagraph_mode="FULL_AND_PIECEWISE")``,
the steps with prompt chunks replay graphs of the pieces between the attentions
(``course_lib.serving.piecewise_graph``), or, with ``cudagraph_mode="FULL"``, one whole graph per step, attention
included (``course_lib.serving.full_graph``). Graphs are captured largest first into one memory pool (only one graph
runs at a time, so they can share their intermediate buffers). ``LLMEngine(enforce_eager=True)`` (vLLM's name) or
``cudagraph_mode="NONE"`` turns them off, and on a CPU there are none.
"""
from __future__ import annotations

import torch

from course_lib.serving.kv_pool import KVPool
from course_lib.serving.sequence import ScheduledChunk


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (the last bucket is max_num_seqs itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class _GraphDecodeBatch:
    """The model's cache protocol for a captured decode step: one token per row, everything in fixed buffers."""

    length = 0   # unused: the positions come from the persistent buffer

    def __init__(self, pool: KVPool, slot_mapping, block_tables, context_lens, max_context_len: int,
                 use_kernels: bool = True):
        self.pool, self.slot_mapping, self.block_tables = pool, slot_mapping, block_tables
        self.context_lens, self.max_context_len, self.use_kernels = context_lens, max_context_len, use_kernels

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, Hq, B, D], k/v [1, Hkv, B, D] -> [1, Hq, B, D]."""
        self.pool.store(layer, k[0].transpose(0, 1), v[0].transpose(0, 1), self.slot_mapping, self.use_kernels)
        out = self.pool.decode(layer, q[0].transpose(0, 1), self.block_tables, self.context_lens,
                               self.max_context_len, self.use_kernels)                      # [B, Hq, D]
        return out.transpose(0, 1)[None]

    def advance(self, num_tokens: int) -> None:
        pass


class DecodeGraphs:
    """One CUDA graph per batch-size bucket of a decode step of ``model`` over ``pool``; ``run(chunks)`` replays."""

    def __init__(self, model, pool: KVPool, *, max_num_seqs: int, max_model_len: int, block_size: int,
                 use_kernels: bool = True):
        self.model, self.pool, self.block_size, self.use_kernels = model, pool, block_size, use_kernels
        self.buckets = batch_size_buckets(max_num_seqs)
        n, device = self.buckets[-1], model.device
        self.width = -(-max_model_len // block_size)                  # blocks of the longest allowed sequence
        self.max_context_len = self.width * block_size
        # persistent device buffers: every graph reads its first B rows
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.width, dtype=torch.int32, device=device)
        self.logits = torch.empty(n, model.config.vocab_size, dtype=torch.float32, device=device)
        self.prev_rows = torch.full((n,), -1, dtype=torch.long, device=device)   # async scheduling (see run)
        # pinned staging on the host, one per buffer, twice: each step fills one set and copies it over
        # asynchronously; the next step fills the other set, so that a step never overwrites what the copies of the
        # step before it may not have read yet (with async scheduling, nothing waits for them in between)
        pin = device.type == "cuda"
        self._staging = [{name: torch.zeros_like(t, device="cpu", pin_memory=pin)
                          for name, t in self._buffers().items()} for _ in range(2)]
        self._hosts = [{name: t.numpy() for name, t in staging.items()} for staging in self._staging]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "positions": self.positions, "slot_mapping": self.slot_mapping,
                "context_lens": self.context_lens, "block_tables": self.block_tables, "prev_rows": self.prev_rows}

    @torch.no_grad()
    def capture(self) -> None:
        """Record one graph per bucket, largest first, into one shared memory pool."""
        memory_pool = None
        for b in reversed(self.buckets):
            self._forward(b)                     # warm-up outside the graph: compiles kernels, creates handles
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                self._forward(b)
            memory_pool = graph.pool() if memory_pool is None else memory_pool
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def _forward(self, b: int) -> None:
        batch = _GraphDecodeBatch(self.pool, self.slot_mapping[:b], self.block_tables[:b], self.context_lens[:b],
                                  self.max_context_len, self.use_kernels)
        logits = self.model(self.input_ids[:b][None], cache=batch, positions=self.positions[:b])   # [1, B, V]
        self.logits[:b].copy_(logits[0])

    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        """A decode-only step (every chunk one token, one logit row) that fits the largest bucket."""
        return 0 < len(chunks) <= self.buckets[-1] and all(c.num_tokens == 1 and c.num_logits == 1 for c in chunks)

    def run(self, chunks: list[ScheduledChunk], block_manager, prev=None) -> torch.Tensor:
        """Fill the buffers for this step, replay the bucket's graph: logits [len(chunks), V] (float32). With
        ``prev`` (``course_lib.serving.async_scheduling.InflightStep``), the input ids of the sequences whose last
        token is still a placeholder come from the previous step's sampled ids, on the device."""
        if not self.graphs:
            self.capture()
        B = len(chunks)
        bucket, staging, patch = self.prepare(chunks, block_manager, prev)
        # Asynchronous copies from pinned memory; the graph's kernels are queued after them on the same stream.
        for name, buffer in self._buffers().items():
            buffer[:bucket].copy_(staging[name][:bucket], non_blocking=True)
        if patch:   # the placeholders' values, from the previous step's sampled ids (both on the device)
            rows = self.prev_rows[:bucket]
            self.input_ids[:bucket] = torch.where(rows >= 0, prev.tokens[rows.clamp(min=0)], self.input_ids[:bucket])
        self.graphs[bucket].replay()
        self.num_replays += 1
        return self.logits[:B]

    def prepare(self, chunks: list[ScheduledChunk], block_manager, prev=None) -> tuple[int, dict, bool]:
        """The host's share of a replay: this step's inputs written into the pinned staging buffers (the set this
        replay uses). Returns (the bucket, the staging tensors, whether placeholders must be patched)."""
        B = len(chunks)
        bucket = next(b for b in self.buckets if b >= B)
        staging, h = self._staging[self.num_replays % 2], self._hosts[self.num_replays % 2]
        h["slot_mapping"][:bucket] = -1                               # padding rows: slot -1, skipped by the store,
        h["context_lens"][:bucket] = 0                                # context 0: the attention reads nothing
        h["block_tables"][:bucket] = 0
        h["prev_rows"][:bucket] = -1
        h["input_ids"][:bucket] = 0                                   # (a placeholder left there is no token id)
        # each field built as a list over the batch and written once (one numpy call per field, not per row)
        P, tables = self.block_size, block_manager.block_tables
        positions = [c.start for c in chunks]                           # a decode chunk's one token: the last one
        rows = [tables[c.seq.seq_id] for c in chunks]
        h["input_ids"][:B] = [c.seq.last_token_id for c in chunks]
        h["positions"][:B] = positions
        h["slot_mapping"][:B] = [t[pos // P] * P + pos % P for t, pos in zip(rows, positions)]
        h["context_lens"][:B] = [pos + 1 for pos in positions]
        for i, table in enumerate(rows):
            h["block_tables"][i, :len(table)] = table
        patch = prev is not None and bool(prev.position)
        if patch:
            for i, src in zip(*prev.input_rows(chunks)):
                h["prev_rows"][i] = src
        return bucket, staging, patch
