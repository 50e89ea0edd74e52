"""Mixed steps replayed as **one full CUDA graph** each, attention included (vLLM V1's ``cudagraph_mode="FULL"``
with an attention backend that supports it; lesson 10).

``course_lib.serving.piecewise_graph`` leaves the attention out of its graphs because its launches depend on how
the step's tokens split into chunks. They need not: ``kernels.paged_prefill_attention`` already takes that split
as *device* data (``cu_seqlens_q``, ``seq_lens``, block tables) and sizes its grid from two host ints only, the
number of query rows T and the number of sequences (``T // BLOCK_Q + num_seqs`` tiles per kv head; a tile whose
sequence has no query there exits at once). Fix both ints and every step of up to T tokens launches the very same
grid. That is what this module does, the way vLLM's unified Triton attention and FlashAttention 3 backends let
vLLM capture mixed batches whole:

* **one kernel for every chunk**: a decode is a chunk of one query token over its L cached keys (causal, bottom
  right: it sees all of them), so the step's decodes and prompt chunks go through ``paged_prefill_attention``
  together, chunk after chunk in the step's order (decodes first), instead of the decode kernel plus the prefill
  kernel; in two launches per layer, short chunks in small tiles and long ones in large tiles (``_passes``);
* **padded to fixed shapes**: T to the next capture size (16, 24, 32, 48, ... ``max_num_batched_tokens``, as for
  the piecewise graphs), the chunks to ``max_num_seqs`` (padding chunks have no query rows: ``cu_seqlens_q`` stays
  at the real T, their length is 0; padding rows belong to no chunk, so the kernel never writes them, and their
  slot is -1, so ``store_kv`` never stores them);
* **persistent device buffers** for everything a step reads: input ids, positions, slots, the sampling rows, the
  chunks' block tables ``[max_num_seqs, max_blocks]``, ``cu_seqlens_q`` ``[max_num_seqs + 1]``, ``seq_lens``
  ``[max_num_seqs]``, and the attention's output ``[T, Hq, D]`` (its padding rows zeroed once per step; the real
  rows are rewritten by every layer before the layer reads them);
* **one graph per capture size**, captured largest first into one memory pool (``DecodeGraphs``' recipe).

A mixed step is then: the host plans it and uploads its inputs (``StepBatch``, one pinned copy), a few
device-to-device copies into the persistent buffers, one graph launch. Measured on an H100
(``benchmarks.serving_step``, the 0.37B trace, before the two launches per layer;
``serving_step_nvidia-h100-80gb-hbm3_e.json``): the prefill phase 94% GPU busy, where the piecewise graphs left it
at 49% (eager steps: 25% in ``..._d.json``). Decode-only steps keep their own graphs
(``course_lib.serving.cuda_graph``: the split-K decode kernel, better for long contexts at small batch).

**What runs where.** Steps with speculative verify chunks (several logits rows per chunk) stay eager, and so does
the 8-bit KV pool (no paged prefill kernel reads 8-bit codes) and any dtype or head dim the kernel does not
compile for. ``eager=True`` runs the very same padded forward pass without a graph (on a CPU, with the kernels'
plain-torch references when ``use_kernels`` is False): the CPU tests drive it.

**Numerics.** Decodes here go through the prefill kernel, not the split-K decode kernel: the same attention summed
in another order, equal to rounding (bf16: ~1e-2 in the logits of a random-weight model), so greedy tokens can
differ from an eager step's where two logits tie within that.
"""
from __future__ import annotations

import torch

import kernels
from course_lib.serving.kv_pool import KVPool
from course_lib.serving.piecewise_graph import capture_sizes, copy_padded
from course_lib.serving.sequence import ScheduledChunk
from kernels.paged_prefill import is_supported, paged_prefill_attention_unchecked, prefill_config


def _passes(size: int, group: int, head_dim: int, dtype: torch.dtype) -> list[tuple[dict, tuple[int, int] | None]]:
    """The paged prefill launches of a step of ``size`` rows: (config, chunk lengths it attends). One tile size for
    every chunk would be wasteful either way: a decode in a 128-row tile computes 128 rows for its G real ones (at
    batch 200, contexts of 1k and head dim 128, ~3 TFLOP per step of 28 layers, milliseconds), a 512-token chunk in
    16-row tiles reads its K/V 32 times more often. So chunks of up to one smallest tile of tokens (decodes,
    speculative verify chunks) go through a launch with the smallest tiles, the longer ones through a second launch
    with the tiles ``prefill_config`` picks for one chunk of ``size`` tokens; each launch skips the other's chunks."""
    short, long = prefill_config(1, 1, group, head_dim, dtype), prefill_config(size, 1, group, head_dim, dtype)
    if long["BLOCK_M"] <= short["BLOCK_M"]:
        return [(long, None)]
    short_max = short["BLOCK_M"] // group                       # query tokens in one smallest tile
    return [(short, (1, short_max)), (long, (short_max + 1, size))]


class _UnifiedAttention:
    """The model's cache protocol inside a full mixed step of ``size`` rows: stores the step's K/V at their slots
    and attends every chunk, decodes included, with ``paged_prefill_attention`` over fixed shapes (``_passes``)."""

    length = 0   # unused: the positions come from the persistent buffer

    def __init__(self, graphs: FullMixedGraphs, size: int):
        self.g, self.size = graphs, size

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, Hq, size, D], k/v [1, Hkv, size, D] -> [1, Hq, size, D] (a view of the persistent output)."""
        g, n = self.g, self.size
        pool = g.pool
        pool.store(layer, k[0].transpose(0, 1), v[0].transpose(0, 1), g.slot_mapping[:n], g.use_kernels)
        out = g.out[:n]                                                                    # [size, Hq, D]
        args = (q[0].transpose(0, 1), pool.k_caches[layer], pool.v_caches[layer], g.block_tables, g.cu_seqlens_q,
                g.seq_lens)
        if g.use_kernels:
            for config, chunk_lens in g.passes[n]:
                paged_prefill_attention_unchecked(*args, out=out, config=config, chunk_lens=chunk_lens)
        else:   # the plain-torch reference (reads the lengths on the host: CPU only); padding rows stay zero
            real = kernels.reference.paged_prefill_attention(*args)
            out.copy_(real)
        return out.transpose(0, 1)[None]

    def advance(self, num_tokens: int) -> None:
        pass


class FullMixedGraphs:
    """Steps with prompt chunks (and decodes beside them) as one CUDA graph per capture size, attention included:
    ``run(batch)`` fills the persistent buffers from a ``StepBatch`` and replays. ``eager=True``: no graph, the same
    padded forward pass run eagerly (the CPU's way of testing everything but the capture)."""

    def __init__(self, model, pool: KVPool, *, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                 use_kernels: bool = True, eager: bool = False):
        self.model, self.pool, self.use_kernels, self.eager = model, pool, use_kernels, eager
        self.sizes = capture_sizes(max_num_batched_tokens)
        self.max_seqs = self.unified_chunks = max_num_seqs   # StepBatch(unified=...) pads its chunks to this
        cfg, device, dtype = model.config, model.device, model.dtype
        T, S, Hq, D = self.sizes[-1], max_num_seqs, cfg.num_attention_heads, cfg.head_dim
        width = -(-max_model_len // pool.block_size)                 # blocks of the longest allowed sequence
        self.input_ids = torch.zeros(T, dtype=torch.long, device=device)
        self.positions = torch.zeros(T, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((T,), -1, dtype=torch.long, device=device)
        self.logits_indices = torch.zeros(S, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(S, width, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.zeros(S + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(S, dtype=torch.int32, device=device)
        self.out = torch.zeros(T, Hq, D, dtype=dtype, device=device)
        self.logits = torch.zeros(S, cfg.vocab_size, dtype=torch.float32, device=device)
        # the kernel's launches per capture size, fixed so that every replay has the same grids: the short chunks
        # (decodes, up to one small tile of tokens) in the smallest tiles, the others in tiles for one long chunk
        G = Hq // cfg.num_key_value_heads
        self.passes = {n: _passes(n, G, D, dtype) for n in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_steps = 0

    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        """At most ``max_num_seqs`` chunks of at most one logits row each (no speculative verify chunk), at most
        the largest capture size in tokens, over a pool the paged prefill kernel reads (not 8-bit, its dtype and
        head dim compiled)."""
        pool = self.pool
        return (0 < len(chunks) <= self.max_seqs and all(c.num_logits <= 1 for c in chunks)
                and sum(c.num_tokens for c in chunks) <= self.sizes[-1]
                and type(pool) is KVPool and pool.use_paged_prefill
                and (not self.use_kernels or is_supported(self.model.dtype, self.model.config.head_dim)))

    def _forward(self, size: int) -> None:
        logits = self.model(self.input_ids[:size][None], cache=_UnifiedAttention(self, size),
                            positions=self.positions[:size], logits_indices=self.logits_indices)   # [S, V]
        self.logits.copy_(logits)

    @torch.no_grad()
    def capture(self) -> None:
        """One graph per capture size, largest first, into one shared memory pool, each after a warm-up run (which
        compiles the kernels). The buffers hold a valid empty step meanwhile: no chunk, every slot -1."""
        self.cu_seqlens_q.zero_()
        self.seq_lens.zero_()
        self.slot_mapping.fill_(-1)
        pool, graphs = None, {}
        for size in reversed(self.sizes):
            self._forward(size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size)
            pool = graph.pool() if pool is None else pool
            graphs[size] = graph
        torch.cuda.synchronize()
        self.graphs = graphs

    @torch.no_grad()
    def run(self, batch) -> torch.Tensor:
        """The logits [rows, V] (float32) of the step ``batch`` (a ``StepBatch`` built with
        ``unified=max_num_seqs`` from chunks ``can_run`` accepts, its placeholders already patched): device-to-device
        copies into the persistent buffers, padded, then the capture size's graph replayed (eager mode: run)."""
        if not self.eager and not self.graphs:
            self.capture()
        T, rows = batch.input_ids.shape[1], batch.logits_indices.shape[0]
        C, width = batch.unified_tables.shape
        size = next(s for s in self.sizes if s >= T)
        # queued after the step's upload (and its placeholder patch) on the same stream: nothing waits
        copy_padded(self.input_ids, batch.input_ids[0], size)
        copy_padded(self.positions, batch.positions, size)
        copy_padded(self.slot_mapping, batch.slot_mapping, size, fill=-1)   # padding rows: never stored
        copy_padded(self.logits_indices, batch.logits_indices, len(self.logits_indices))
        self.block_tables[:C, :width].copy_(batch.unified_tables)
        self.cu_seqlens_q.copy_(batch.unified_cu_seqlens_q)            # padded on the host: [S + 1], T repeated
        self.seq_lens.copy_(batch.unified_seq_lens)                    # [S], 0 for the padding chunks
        self.out[T:size].zero_()
        if self.eager:
            self._forward(size)
        else:
            self.graphs[size].replay()
        self.num_steps += 1
        return self.logits[:rows]
