"""Run the model on one step of the scheduler (lesson 04): the paged KV pool and the flattened ("varlen") batch.

A step mixes sequences at different points: some decode one token, some prefill a chunk of their prompt, each
with a different number of tokens already cached. Padding them into a rectangle ``[B, S]`` would waste work on
the padding (the very waste continuous batching removes), so the engine **flattens** the step's tokens into one
row ``[1, T]`` (T = tokens scheduled in the step) and gives each token its own position. Everything except
attention (embeddings, projections, MLP, norms, lm_head: most of the FLOPs) then runs as one big matrix
multiply over the T tokens. Attention is the only per-sequence part; ``StepBatch.attend`` does it in two kinds:

* all one-token chunks (decodes) in **one** batched call of ``kernels.paged_attention_decode`` (lesson 02),
  reading each sequence's K/V through its block table;
* all prefill chunks (two tokens or more: prompt chunks, speculative verify chunks) in **one** call of
  ``kernels.paged_prefill_attention``: FlashAttention (lesson 03) over variable-length query chunks, each causal
  over its sequence's cached prefix + the chunk (queries that are the last n of L positions), reading the K/V
  through the block tables like the decode kernel. The 8-bit pool, and the CPU's plain-torch path, instead
  gather each sequence's K/V into a contiguous tensor and attend chunk by chunk (``KVPool.prefill``).

The host builds the step's inputs (token ids, positions, slot mapping, block tables, lengths) per chunk in Python
and per token in numpy, and sends them in one asynchronous copy that never waits for the GPU (``_upload``): an
eager step (every prefill step) is planned while the GPU still runs the step before it.

Before attending, every layer writes the step's new K/V into their slots with ``kernels.store_kv``. The K/V live
in a pool of blocks (``course_lib.serving.kv_pool``): in the model's dtype, or as 8-bit codes plus scales
(``LLMEngine(kv_cache_dtype="int8")``, lesson 07), whose pool quantizes on write and dequantizes as it reads. On a CPU
the Triton kernels run in the (slow) interpreter, so by default the engine uses their plain-torch references
there (``kernels.reference``: same signatures, same results; for decode a batched version of the reference,
``paged_decode_attention_torch``; for prefill the gather path with the plain attention) and the kernels on a GPU;
``use_kernels`` forces either.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from course_lib.paging.block_manager import BlockManager
from course_lib.serving.async_scheduling import patch_input_ids
from course_lib.serving.kv_pool import KVPool
from course_lib.serving.sequence import ScheduledChunk


class StepBatch:
    """The model's cache protocol (``length``, ``attend``, ``advance``) for one engine step: the tokens of all
    scheduled chunks flattened into one row, one-token chunks (decodes) first. ``placeholder_rows`` (asynchronous
    scheduling: ``InflightStep.input_rows``) travel with the step's inputs, as ``placeholder_rows`` ``[2, n]``.
    ``unified`` (an int S): also every chunk's block table, ``cu_seqlens_q`` and length as one list of chunks,
    padded to S chunks (``unified_tables`` ``[C, max_blocks]``, ``unified_cu_seqlens_q`` ``[S + 1]``,
    ``unified_seq_lens`` ``[S]``): the full mixed graphs' inputs (``course_lib.serving.full_graph``)."""

    def __init__(self, chunks: list[ScheduledChunk], block_manager: BlockManager, pool: KVPool, use_kernels: bool,
                 placeholder_rows: tuple[list[int], list[int]] = ((), ()), unified: int | None = None):
        device = pool.k_caches[0].device
        self.pool, self.use_kernels = pool, use_kernels
        self.length = 0                       # unused: the engine passes every token's position explicitly
        P = block_manager.block_size
        # Per chunk in Python (at most max_num_seqs of them), per token in numpy: a prefill step has ~2,000 tokens.
        token_ids, starts, sizes, tables = [], [], [], []
        self.sample_rows = []                 # rows whose logits the step needs: each sampling chunk's last one
                                              # (a speculative verify chunk: one per draft token + 1)
        num_decodes = 0
        for i, chunk in enumerate(chunks):
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            row, end = len(token_ids), start + n
            if end > block_manager.num_tokens[seq.seq_id]:
                raise ValueError(f"tokens {start}:{end} of sequence {seq.seq_id} have no slots (a bug)")
            if n == 1:
                if num_decodes < i:   # rows [0, Bd) are the decodes: the scheduler (and spec_decode) sort them first
                    raise RuntimeError("a one-token chunk after a prefill chunk: the step's chunks must come "
                                       "one-token chunks first (a bug)")
                num_decodes += 1
            token_ids += seq.token_ids_slice(start, end)
            starts.append(start)
            sizes.append(n)
            tables.append(block_manager.block_tables[seq.seq_id][:-(-end // P)])   # the blocks it attends to
            self.sample_rows += range(row + n - chunk.num_logits, row + n)
        Bd = self.num_decodes = num_decodes
        starts, sizes = np.array(starts, dtype=np.int64), np.array(sizes, dtype=np.int64)
        ends = starts + sizes
        # every token's position and slot (its block's id * P + its offset in the block), from its chunk's table
        first_rows = np.cumsum(sizes) - sizes                                              # [C]
        positions = np.arange(len(token_ids), dtype=np.int64) + np.repeat(starts - first_rows, sizes)   # [T]
        table = _padded_table(tables)                                                      # [C, max_blocks]
        slots = table[np.repeat(np.arange(len(chunks)), sizes), positions // P].astype(np.int64) * P + positions % P
        widths = np.array([len(t) for t in tables], dtype=np.int64)
        self.max_decode_len = int(ends[:Bd].max()) if Bd else 0
        # the prefill chunks, rows Bd ... T-1, as kernels.paged_prefill_attention takes them (and on the host)
        rows = first_rows[Bd:] - (first_rows[Bd] if Bd < len(chunks) else 0)
        self.prefill_spans = list(zip(rows.tolist(), sizes[Bd:].tolist(), ends[Bd:].tolist()))  # [(row, n, L)] * Bp
        host = dict(input_ids=np.array(token_ids, dtype=np.int64)[None],                    # [1, T]
                    positions=positions, slot_mapping=slots,                                # [T]
                    logits_indices=np.array(self.sample_rows, dtype=np.int64),              # [rows]
                    decode_tables=table[:Bd, :widths[:Bd].max(initial=1)],                  # [Bd, max_blocks]
                    decode_lens=ends[:Bd].astype(np.int32))                                 # [Bd]
        if self.prefill_spans:
            host.update(prefill_tables=table[Bd:, :widths[Bd:].max()],                      # [Bp, max_blocks]
                        cu_seqlens_q=np.append(rows, rows[-1] + sizes[-1]).astype(np.int32),  # [Bp + 1]
                        prefill_lens=ends[Bd:].astype(np.int32))                            # [Bp]
        if unified:   # every chunk as one kernel sees them (course_lib.serving.full_graph), padded to `unified` chunks
            T, C = len(token_ids), len(chunks)
            host.update(unified_tables=table,                                               # [C, max_blocks]
                        unified_cu_seqlens_q=np.append(first_rows, np.full(unified + 1 - C, T)).astype(np.int32),
                        unified_seq_lens=np.append(ends, np.zeros(unified - C, np.int64)).astype(np.int32))
        if len(placeholder_rows[0]):
            host["placeholder_rows"] = np.array(placeholder_rows, dtype=np.int64)           # [2, n]
        for name, tensor in _upload(host, device).items():
            setattr(self, name, tensor)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """q [1, Hq, T, D], k/v [1, Hkv, T, D] of the flattened step -> attention output [1, Hq, T, D] (written into
        ``out`` if given: the piecewise graphs' static buffer, ``course_lib.serving.piecewise_graph``)."""
        pool = self.pool
        pool.store(layer, k[0].transpose(0, 1), v[0].transpose(0, 1), self.slot_mapping, self.use_kernels)  # [T,Hkv,D]
        out = torch.empty_like(q) if out is None else out
        Bd = self.num_decodes
        if Bd:   # all decodes at once, through the block tables
            q_dec = q[0, :, :Bd].transpose(0, 1)                                               # [Bd, Hq, D]
            o = pool.decode(layer, q_dec, self.decode_tables, self.decode_lens, self.max_decode_len, self.use_kernels)
            out[0, :, :Bd] = o.transpose(0, 1)
        if self.prefill_spans:   # all prefill chunks at once, each over its sequence's cached K/V + its own
            pool.prefill(layer, q[0, :, Bd:].transpose(0, 1), self.prefill_tables, self.cu_seqlens_q,  # [Tp, Hq, D]
                         self.prefill_lens, self.prefill_spans, self.use_kernels,
                         out=out[0, :, Bd:].transpose(0, 1))                                   # written in place
        return out

    def advance(self, num_tokens: int) -> None:
        pass   # the scheduler counts computed tokens (Scheduler.update)


def _upload(arrays: dict[str, np.ndarray], device: torch.device, pack: bool | None = None) -> dict[str, torch.Tensor]:
    """The host arrays of a step as tensors on ``device`` (same names, shapes and dtypes), without waiting for it.

    ``torch.from_numpy(a).to("cuda")`` copies from pageable memory, and PyTorch then synchronizes the stream: the
    host waits until the GPU has run every kernel queued before the copy (the previous step's forward pass, under
    asynchronous scheduling), so that it plans nothing while the GPU works. Instead (``pack``: by default on a GPU)
    the arrays are packed into one pinned buffer, copied by one asynchronous copy, and viewed in place on the device
    (PyTorch's pinned-memory cache does not hand the buffer out again before the copy has read it). On the CPU the
    arrays are used as they are."""
    if not (device.type == "cuda" if pack is None else pack):
        return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    offsets, total = {}, 0
    for name, a in arrays.items():
        offsets[name] = total
        total += -(-a.nbytes // 8) * 8        # 8-byte aligned: each part is viewed as its own dtype on the device
    buffer = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    host = buffer.numpy()
    for name, a in arrays.items():
        host[offsets[name]:offsets[name] + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    buffer = buffer.to(device, non_blocking=True)
    return {name: buffer[offsets[name]:offsets[name] + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape)
            for name, a in arrays.items()}


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


def _padded_table(tables: list[list[int]]) -> np.ndarray:
    """Block tables of different lengths as one int32 [rows, max_blocks] array (padded with block 0, never read)."""
    lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    padded = np.zeros((len(tables), lengths.max(initial=1)), dtype=np.int32)
    padded[np.arange(padded.shape[1]) < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum()))   # row by row, in order
    return padded


class ModelRunner:
    """Executes scheduled chunks: builds the StepBatch, runs the model once, returns the sampling rows' logits.
    With ``graphs`` (``course_lib.serving.cuda_graph.DecodeGraphs``), decode-only steps replay a CUDA graph; with
    ``mixed``, the other steps it accepts replay its graphs: ``course_lib.serving.piecewise_graph.PiecewiseGraphs``
    (the attention eager between the pieces) or ``course_lib.serving.full_graph.FullMixedGraphs`` (one graph, the
    attention in it); the rest runs eagerly."""

    def __init__(self, model, block_manager: BlockManager, pool: KVPool, use_kernels: bool | None = None,
                 graphs=None, mixed=None):
        self.model, self.block_manager, self.pool, self.graphs = model, block_manager, pool, graphs
        self.mixed = mixed
        # default: the Triton kernels for a model on a GPU, their plain-torch references for a model on the CPU
        self.use_kernels = model.device.type == "cuda" if use_kernels is None else use_kernels

    @torch.no_grad()
    def execute(self, chunks: list[ScheduledChunk], prev=None) -> torch.Tensor:
        """logits [rows, V] (float32): ``chunk.num_logits`` rows per chunk (1 per chunk that samples, the last
        k + 1 positions of a speculative verify chunk), in the order of the chunks. With ``prev`` (asynchronous
        scheduling: ``course_lib.serving.async_scheduling.InflightStep``), the tokens that are still placeholders
        on the host are read from the previous step's sampled ids on the device."""
        if self.graphs is not None and self.graphs.can_run(chunks):
            return self.graphs.run(chunks, self.block_manager, prev)
        mixed = self.mixed if self.mixed is not None and self.mixed.can_run(chunks) else None
        batch = self.prepare(chunks, prev, unified=getattr(mixed, "unified_chunks", None))
        if mixed is not None:
            return mixed.run(batch)
        return self.model(batch.input_ids, cache=batch, positions=batch.positions,
                          logits_indices=batch.logits_indices)                                # [rows, V]

    def prepare(self, chunks: list[ScheduledChunk], prev=None, unified: int | None = None) -> StepBatch:
        """The host's share of an eager step: the StepBatch (input ids, positions, slot mapping, block tables,
        context lengths, the sampling rows as ``logits_indices``), the placeholders patched (see ``execute``)."""
        placeholders = prev.input_rows(chunks) if prev is not None and prev.position else ((), ())
        batch = StepBatch(chunks, self.block_manager, self.pool, self.use_kernels, placeholders, unified)
        if len(placeholders[0]):
            patch_input_ids(batch.input_ids[0], *batch.placeholder_rows, prev.tokens)
        return batch
