"""Mixed steps replayed as **piecewise** CUDA graphs (vLLM V1's ``cudagraph_mode="FULL_AND_PIECEWISE"``; lesson 10).

``course_lib.serving.cuda_graph`` replays decode-only steps as whole CUDA graphs. A step with prompt chunks cannot
be one: its attention depends on how the step's T tokens split into chunks (how many, how long, over how much
cached K/V), which changes every step, and a graph replays fixed grids over fixed addresses. Such a step then runs
eagerly, and on an H100 the course's engine spent ~20 ms per prefill step of 2,048 tokens (0.37B LLaMA shape, 24
layers) where its kernels take ~5 ms: the host launched ~400 kernels from Python, ~220 of them Triton kernels whose
launcher alone costs 15-30 µs. Everything *but* the attention is per token (embeddings, norms, projections, RoPE,
the MLP, lm_head): its kernels depend only on T. So vLLM cuts the forward pass at the attention:

    segment 0: embed, layer 0 up to q, k, v  | attention 0 (eager) |  segment 1: o_proj, MLP, layer 1 up to q, k, v
    | attention 1 (eager) | ... | segment L: the last o_proj and MLP, final norm, lm_head on the sampling rows

and captures every segment as a graph of its own, for a fixed token count: a step of T tokens is padded to the
next **capture size** (vLLM's ``cudagraph_capture_sizes``; here powers of two and their midpoints, 16, 24, 32,
48, ... up to ``max_num_batched_tokens``, the last one: at most a third of the rows are padding). A step is then
L + 1 graph launches plus the attention's few eager kernels per layer (store the K/V, decode attention, paged
prefill attention: ~3 Triton launches, ~70-100 per step of 24 layers) instead of ~400 launches.

**The cut.** The model calls ``cache.attend(layer, q, k, v)`` in every layer (``Attention.forward``). While
capturing, the cache object given to the model copies q, k, v into static buffers (inside the graph), ends the
current segment (``CUDAGraph.capture_end``), begins the next one (``capture_begin``: the ``torch.cuda.graph``
context manager cannot be split) and returns a static ``out`` buffer, which the next segment reads. The
attention itself is never captured. At replay, between segment i and segment i + 1, the step's ``StepBatch``
(``course_lib.serving.model_runner``: built for the real chunks, exactly as for an eager step) attends on the first T
rows of the static q, k, v and writes the first T rows of ``out``: the K/V of the T real tokens are stored at their
slots; the padding rows are never stored (the StepBatch only sees the real rows) and their ``out`` rows are zeros
(set once per step). Padding rows go through the per-token kernels like any row, with token id 0 at position 0;
no row reads another row outside the attention, so they change nothing in the real rows, and ``logits_indices``
picks only real rows.

**Memory.** q, k, v and out are *one* set of buffers sized for the largest capture size, shared by every layer and
every size (each segment copies its q, k, v into the first rows; the attention of layer i is done before segment
i + 1 runs): ``T_max x (2 Hq + 2 Hkv) x D`` elements. Kept per layer and per size instead (each graph's own
outputs), they would cost L x (the sum of the sizes: 7,128 rows for the 15 sizes up to 2,048) rows. For
T_max = 2,048 in bf16:

    0.37B LLaMA shape (24 layers, 16 / 8 heads, head dim 64):  shared 12 MiB; per layer and size 0.98 GiB
    qwen3-0.6b (28 layers, 16 / 8 heads, head dim 128):        shared 24 MiB; per layer and size 2.3 GiB

The price of sharing: a copy of q, k, v per layer inside the graph, 8 MiB read and written per layer at 2,048 tokens
of the 0.37B shape (16 MiB for qwen3-0.6b), ~5 µs on an H100's ~3 TB/s: ~0.1 ms of a ~5 ms step, a few percent.
Besides: the logits of ``max_num_seqs`` rows (float32, also one buffer; 16 MiB for the 0.37B shape's vocabulary
of 32,000 at 128 rows, 74 MiB for qwen3-0.6b's 151,936) and one graph memory pool shared by every segment of every
size, captured largest first as ``DecodeGraphs`` does: it holds the largest segment's temporaries (the MLP's
[T, 2 x intermediate] activation: 32 MiB for the 0.37B shape, 24 MiB for qwen3-0.6b; the residual stream and RoPE
tables, which live from one segment to the next) and the last segment's logits before their copy (bf16 + float32:
2 + 4 bytes per row and vocabulary entry). Sharing is safe because only one step's segments run at a time, in the
order they were captured.

**Asynchronous scheduling.** The input ids of sequences whose last token is still a placeholder are patched on the
device from the previous step's sampled ids, as in an eager step (``ModelRunner.prepare`` and
``async_scheduling.patch_input_ids``), before they are copied into the static buffer.

**What runs where.** Steps with speculative verify chunks (several logits rows per chunk) stay eager, and so do
steps over ``max_num_batched_tokens`` (never scheduled). ``eager=True`` runs the very same forward pass over the
same padded buffers with the attention between the pieces, without any graph: the CPU tests drive it, so that on
a GPU only the capture and the replay of the segments are new (their GPU tests passed on an H200, 2026-12-06).
``LLMEngine(cudagraph_mode="FULL_AND_PIECEWISE")`` turns it on; the default is "FULL". Measured
(``benchmarks.serving_step``): the prefill phase of its trace went from 21% to 33% GPU busy on an H200
(``serving_step_nvidia-h200.json``), since the
attention's own launches (~3-5 Triton launches per layer) stay on the host; ``course_lib.serving.full_graph``
(``cudagraph_mode="FULL"``) captures them too.
"""
from __future__ import annotations

import torch

from course_lib.serving.kv_pool import KVPool
from course_lib.serving.sequence import ScheduledChunk


def capture_sizes(max_num_batched_tokens: int, smallest: int = 16) -> list[int]:
    """Token counts to capture (vLLM's ``cudagraph_capture_sizes``): 16, 24, 32, 48, 64, 96, ... (powers of two
    and the midpoints between them) below ``max_num_batched_tokens``, then ``max_num_batched_tokens`` itself."""
    if isinstance(max_num_batched_tokens, bool) or not isinstance(max_num_batched_tokens, int) \
            or max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be a positive int, got {max_num_batched_tokens!r}")
    sizes, p = [], smallest
    while p < max_num_batched_tokens:
        sizes += [s for s in (p, p * 3 // 2) if s < max_num_batched_tokens]
        p *= 2
    return sizes + [max_num_batched_tokens]


def copy_padded(buffer: torch.Tensor, values: torch.Tensor, end: int, fill: int = 0) -> None:
    """A persistent buffer's rows for one step: ``values`` in its first rows, ``fill`` from there to row ``end``
    (the padding up to the capture size; rows past it belong to no graph of this size). On the device: no wait."""
    n = values.shape[0]
    buffer[:n].copy_(values)
    buffer[n:end].fill_(fill)


class _Pieces:
    """The model's cache protocol inside a piecewise step: ``attend`` hands q, k, v over in the static buffers,
    calls ``between(layer)`` (capture: end the segment, begin the next; eager mode: the attention itself) and
    returns the static ``out`` buffer, which the rest of the layer reads."""

    length = 0   # unused: the positions come from the persistent buffer

    def __init__(self, graphs: PiecewiseGraphs, size: int, between):
        self.graphs, self.size, self.between = graphs, size, between

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, Hq, size, D], k/v [1, Hkv, size, D] -> the static out [1, Hq, size, D]."""
        for static, t in zip(self.graphs.views(self.size), (q, k, v)):
            static.copy_(t)
        self.between(layer)
        return self.graphs.views(self.size, out=True)

    def advance(self, num_tokens: int) -> None:
        pass


class PiecewiseGraphs:
    """The forward pass of ``model`` over ``pool`` cut at every attention, one graph per segment and capture size;
    ``run(batch)`` fills the static buffers from a ``StepBatch``, replays the segments and attends between them.
    ``eager=True``: no graph, the same pieces run eagerly (the CPU's way of testing everything but the replay)."""

    def __init__(self, model, pool: KVPool, *, max_num_batched_tokens: int, max_num_seqs: int, eager: bool = False):
        self.model, self.pool, self.eager = model, pool, eager
        self.sizes = capture_sizes(max_num_batched_tokens)
        self.max_rows = max_num_seqs                 # logits rows: one per sampling chunk at most
        cfg, device, dtype = model.config, model.device, model.dtype
        T, Hq, Hkv, D = self.sizes[-1], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads = (Hq, Hkv)
        # persistent inputs: every graph reads the first `size` rows (logits_indices: all of its rows)
        self.input_ids = torch.zeros(T, dtype=torch.long, device=device)
        self.positions = torch.zeros(T, dtype=torch.long, device=device)
        self.logits_indices = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        # the attention's inputs and output, token-major as the fused q/k/v GEMM makes them ([T, Hq + 2 Hkv, D]),
        # shared by every layer and every size (see the module's docstring)
        self.qkv = torch.zeros(T, Hq + 2 * Hkv, D, dtype=dtype, device=device)
        self.out = torch.zeros(T, Hq, D, dtype=dtype, device=device)
        self.logits = torch.zeros(max_num_seqs, cfg.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}   # size -> its L + 1 segments, in order
        self.num_steps = 0

    def views(self, size: int, out: bool = False):
        """The static q, k, v (or out) of ``size`` rows as the model's attention sees them: [1, H, size, D]."""
        if out:
            return self.out[:size].transpose(0, 1)[None]
        Hq, Hkv = self.num_heads
        qkv = self.qkv[:size]
        return tuple(t.transpose(0, 1)[None] for t in (qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]))

    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        """A step of at most the largest capture size, at most one logits row per chunk (no speculative verify
        chunk), at most ``max_num_seqs`` chunks."""
        return (0 < len(chunks) <= self.max_rows and all(c.num_logits <= 1 for c in chunks)
                and sum(c.num_tokens for c in chunks) <= self.sizes[-1])

    def _forward(self, size: int, between) -> None:
        """The model over the first ``size`` rows of the static buffers, ``between(layer)`` at each attention; the
        sampling rows' logits into ``self.logits`` (all ``max_num_seqs`` rows: the graph's shape is fixed)."""
        logits = self.model(self.input_ids[:size][None], cache=_Pieces(self, size, between),
                            positions=self.positions[:size], logits_indices=self.logits_indices)   # [rows, V]
        self.logits.copy_(logits)

    @torch.no_grad()
    def capture(self) -> None:
        """Record the L + 1 segments of every capture size, largest first, all into one memory pool, on one side
        stream (a capture needs a stream other than the default one, and a shared pool is best used from one)."""
        stream, mempool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
        graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        segments: list[torch.cuda.CUDAGraph] = []

        def cut(layer: int) -> None:   # the attention of `layer` stays outside: end this segment, begin the next
            segments[-1].capture_end()
            segments.append(torch.cuda.CUDAGraph())
            segments[-1].capture_begin(pool=mempool)

        for size in reversed(self.sizes):
            torch.cuda.synchronize()
            with torch.cuda.stream(stream):
                # warm-up, uncaptured, on the capture stream (torch's recipe for capturing): compiles the Triton
                # kernels and lets cuBLAS set up its per-stream workspace before a capture, not inside one
                self._forward(size, lambda layer: None)
                torch.cuda.synchronize()
                segments = [torch.cuda.CUDAGraph()]
                segments[0].capture_begin(pool=mempool)
                try:
                    self._forward(size, cut)
                finally:   # also after an error: a stream left capturing would fail every later CUDA call
                    segments[-1].capture_end()
            graphs[size] = segments
        torch.cuda.synchronize()
        self.graphs = graphs             # only once every size is captured (run captures while this is empty)

    @torch.no_grad()
    def run(self, batch) -> torch.Tensor:
        """The logits [rows, V] (float32) of the step ``batch`` (a ``StepBatch`` of chunks ``can_run`` accepts, its
        placeholders already patched): its inputs copied into the static buffers, padded to the next capture size,
        then the segments replayed with the attention of the real rows between them (eager mode: run)."""
        if not self.eager and not self.graphs:
            self.capture()
        T, rows = batch.input_ids.shape[1], batch.logits_indices.shape[0]
        size = next(s for s in self.sizes if s >= T)
        # device-to-device copies, queued after the step's upload (and its placeholder patch): nothing waits
        copy_padded(self.input_ids, batch.input_ids[0], size)
        copy_padded(self.positions, batch.positions, size)
        copy_padded(self.logits_indices, batch.logits_indices, len(self.logits_indices))
        self.out[T:size].zero_()                     # the padding rows' attention output (no layer writes them)
        q, k, v = (t[:, :, :T] for t in self.views(size))
        out = self.views(size, out=True)[:, :, :T]

        def attend(layer: int) -> None:              # the real rows only: their K/V stored, their output written
            batch.attend(layer, q, k, v, out=out)

        if self.eager:
            self._forward(size, attend)
        else:
            segments = self.graphs[size]
            for layer, segment in enumerate(segments[:-1]):
                segment.replay()
                attend(layer)
            segments[-1].replay()
        self.num_steps += 1
        return self.logits[:rows]
