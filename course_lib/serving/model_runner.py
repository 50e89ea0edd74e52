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

Before attending, every layer writes the step's new K/V into their slots with ``kernels.store_kv``. The K/V live
in a pool of blocks (``course_lib.serving.kv_pool``): in the model's dtype, or as 8-bit codes plus scales
(``LLMEngine(kv_cache_dtype="int8")``, lesson 07), whose pool quantizes on write and dequantizes as it reads. On a CPU
the Triton kernels run in the (slow) interpreter, so by default the engine uses their plain-torch references
there (``kernels.reference``: same signatures, same results; for decode a batched version of the reference,
``paged_decode_attention_torch``; for prefill the gather path with the plain attention) and the kernels on a GPU;
``use_kernels`` forces either.
"""
from __future__ import annotations

import numpy as np
import torch

from course_lib.paging.block_manager import BlockManager
from course_lib.serving.async_scheduling import patch_input_ids
from course_lib.serving.kv_pool import KVPool
from course_lib.serving.sequence import ScheduledChunk


class StepBatch:
    """The model's cache protocol (``length``, ``attend``, ``advance``) for one engine step: the tokens of all
    scheduled chunks flattened into one row, one-token chunks (decodes) first."""

    def __init__(self, chunks: list[ScheduledChunk], block_manager: BlockManager, pool: KVPool, use_kernels: bool):
        device = pool.k_caches[0].device
        self.pool, self.use_kernels = pool, use_kernels
        self.length = 0                       # unused: the engine passes every token's position explicitly
        token_ids, positions, slots = [], [], []
        self.sample_rows = []                 # rows whose logits the step needs: each sampling chunk's last one
                                              # (a speculative verify chunk: one per draft token + 1)
        decode_tables, decode_lens = [], []
        prefill_tables, prefill_spans = [], []    # per prefill chunk: its blocks; (first row, tokens, length)
        P = block_manager.block_size
        for chunk in chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            row = len(token_ids)
            token_ids += seq.token_ids_slice(start, start + n)
            positions += range(start, start + n)
            table = block_manager.block_tables[seq.seq_id]
            if start + n > block_manager.num_tokens[seq.seq_id]:
                raise ValueError(f"tokens {start}:{start + n} of sequence {seq.seq_id} have no slots (a bug)")
            slots += [table[i // P] * P + i % P for i in range(start, start + n)]   # its slot mapping
            table = table[:-(-(start + n) // P)]                                        # the blocks it attends to
            if n == 1:
                if prefill_spans:   # rows [0, Bd) are the decodes: the scheduler (and spec_decode) sort them first
                    raise RuntimeError("a one-token chunk after a prefill chunk: the step's chunks must come "
                                       "one-token chunks first (a bug)")
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                prefill_tables.append(table)
                prefill_spans.append((row - len(decode_tables), n, start + n))
            self.sample_rows += range(row + n - chunk.num_logits, row + n)
        self.num_decodes = len(decode_tables)
        self.decode_tables = _padded_table(decode_tables, device)                          # [Bd, max_blocks]
        self.decode_lens = _tensor(decode_lens, np.int32, device)                          # [Bd]
        self.max_decode_len = max(decode_lens, default=0)
        # the prefill chunks, rows Bd ... T-1, as kernels.paged_prefill_attention takes them (and on the host)
        self.prefill_spans = prefill_spans                                                 # [(row, n, L)] * Bp
        if prefill_spans:
            self.prefill_tables = _padded_table(prefill_tables, device)                    # [Bp, max_blocks]
            self.cu_seqlens_q = _tensor([0] + [r + n for r, n, _ in prefill_spans], np.int32, device)  # [Bp + 1]
            self.prefill_lens = _tensor([L for _, _, L in prefill_spans], np.int32, device)
        self.input_ids = _tensor(token_ids, np.int64, device)[None]                        # [1, T]
        self.positions = _tensor(positions, np.int64, device)                              # [T]
        self.slot_mapping = _tensor(slots, np.int64, device)                               # [T]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, Hq, T, D], k/v [1, Hkv, T, D] of the flattened step -> attention output [1, Hq, T, D]."""
        pool = self.pool
        pool.store(layer, k[0].transpose(0, 1), v[0].transpose(0, 1), self.slot_mapping, self.use_kernels)  # [T,Hkv,D]
        out = torch.empty_like(q)
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


def _tensor(values: list[int], dtype, device) -> torch.Tensor:
    """A 1-D integer tensor from a list of ints, through numpy: a few times faster than ``torch.tensor(list)``,
    which converts element by element (the host builds several of these per step, one element per token)."""
    return torch.from_numpy(np.array(values, dtype=dtype)).to(device)


def _padded_table(tables: list[list[int]], device) -> torch.Tensor:
    """Block tables of different lengths as one int32 [rows, max_blocks] tensor (padded with block 0, never read)."""
    padded = np.zeros((len(tables), max(map(len, tables), default=1)), dtype=np.int32)
    for row, table in zip(padded, tables):
        row[:len(table)] = table
    return torch.from_numpy(padded).to(device)


class ModelRunner:
    """Executes scheduled chunks: builds the StepBatch, runs the model once, returns the sampling rows' logits.
    With ``graphs`` (``course_lib.serving.cuda_graph.DecodeGraphs``), decode-only steps replay a CUDA graph."""

    def __init__(self, model, block_manager: BlockManager, pool: KVPool, use_kernels: bool | None = None,
                 graphs=None):
        self.model, self.block_manager, self.pool, self.graphs = model, block_manager, pool, graphs
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
        batch = self.prepare(chunks, prev)
        return self.model(batch.input_ids, cache=batch, positions=batch.positions,
                          logits_indices=batch.logits_indices)                                # [rows, V]

    def prepare(self, chunks: list[ScheduledChunk], prev=None) -> StepBatch:
        """The host's share of an eager step: the StepBatch (input ids, positions, slot mapping, block tables,
        context lengths, the sampling rows as ``logits_indices``), the placeholders patched (see ``execute``)."""
        batch = StepBatch(chunks, self.block_manager, self.pool, self.use_kernels)
        if prev is not None and prev.position:
            patch_input_ids(batch.input_ids[0], *prev.input_rows(chunks), prev.tokens)
        batch.logits_indices = _tensor(batch.sample_rows, np.int64, batch.input_ids.device)
        return batch
