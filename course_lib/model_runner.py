"""Run the model on one step of the scheduler (lesson 04): the paged KV pool and the flattened ("varlen") batch.

A step mixes sequences at different points: some decode one token, some prefill a chunk of their prompt, each
with a different number of tokens already cached. Padding them into a rectangle ``[B, S]`` would waste work on
the padding (the very waste continuous batching removes), so the engine **flattens** the step's tokens into one
row ``[1, T]`` (T = tokens scheduled in the step) and gives each token its own position. Everything except
attention (embeddings, projections, MLP, norms, lm_head: most of the FLOPs) then runs as one big matrix
multiply over the T tokens. Attention is the only per-sequence part; ``StepBatch.attend`` does it in two kinds:

* all one-token chunks (decodes) in **one** batched call of ``kernels.paged_attention_decode`` (lesson 02),
  reading each sequence's K/V through its block table;
* each prefill chunk on its own: its queries attend causally to the sequence's K/V gathered from its blocks
  (cached prefix + the chunk itself), with ``kernels.flash_attention`` (lesson 03), whose causal mask is
  aligned bottom-right for exactly this case: queries that are the last Sq of Skv positions. With a fixed
  launch config (``serving_config``): lesson 03's autotuning would compile and time configs for every new
  length bucket in the middle of serving.

Before attending, every layer writes the step's new K/V into their slots with ``kernels.store_kv``. The K/V live
in a pool of blocks (``course_lib.kv_pool``): in the model's dtype, or as 8-bit codes plus scales
(``LLMEngine(kv_cache_dtype="int8")``, lesson 07), whose pool quantizes on write and dequantizes as it reads. On a CPU
the Triton kernels run in the (slow) interpreter, so by default the engine uses their plain-torch references
there (``kernels.reference``: same signatures, same results; for decode a batched version of the reference,
``paged_decode_attention_torch``) and the kernels on a GPU; ``use_kernels`` forces either.
"""
from __future__ import annotations

import torch

from course_lib.attention import attention
from course_lib.block_manager import BlockManager
from course_lib.device import INTERPRET
from course_lib.kv_pool import KVPool, paged_decode_attention_torch  # noqa: F401  (the engine's pools live there)
from course_lib.sequence import ScheduledChunk
from kernels.flash_attention import GPU_DTYPES, HEAD_DIMS, INTERPRETER_DTYPES, _flash_attention, serving_config


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
        self.prefills = []                    # (first row, tokens, context length, block ids) per prefill chunk
        decode_tables, decode_lens = [], []
        for chunk in chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            row = len(token_ids)
            token_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += block_manager.slot_mapping(seq.seq_id, start, start + n)
            table = block_manager.block_tables[seq.seq_id][:block_manager.num_blocks_for(start + n)]
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                self.prefills.append((row, n, start + n, torch.tensor(table, device=device)))
            self.sample_rows += range(row + n - chunk.num_logits, row + n)
        self.num_decodes = len(decode_tables)
        width = max((len(t) for t in decode_tables), default=1)
        self.decode_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.int32,
                                          device=device).view(-1, width)                     # [Bd, max_blocks]
        self.decode_lens = torch.tensor(decode_lens, dtype=torch.int32, device=device)     # [Bd]
        self.max_decode_len = max(decode_lens, default=0)
        self.input_ids = torch.tensor([token_ids], device=device)                          # [1, T]
        self.positions = torch.tensor(positions, device=device)                            # [T]
        self.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)          # [T]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, Hq, T, D], k/v [1, Hkv, T, D] of the flattened step -> attention output [1, Hq, T, D]."""
        pool = self.pool
        pool.store(layer, k[0].transpose(0, 1), v[0].transpose(0, 1), self.slot_mapping, self.use_kernels)  # [T, Hkv, D]
        out = torch.empty_like(q)
        Bd = self.num_decodes
        if Bd:   # all decodes at once, through the block tables
            q_dec = q[0, :, :Bd].transpose(0, 1)                                               # [Bd, Hq, D]
            o = pool.decode(layer, q_dec, self.decode_tables, self.decode_lens, self.max_decode_len, self.use_kernels)
            out[0, :, :Bd] = o.transpose(0, 1)
        for row, n, context_len, blocks in self.prefills:   # each prefill chunk over its sequence's cached K/V
            k_seq, v_seq = pool.gather(layer, blocks, context_len, q.dtype)                    # [Hkv, L, D] each
            out[:, :, row:row + n] = self._prefill_attention(q[:, :, row:row + n], k_seq[None], v_seq[None])
        return out

    def _prefill_attention(self, q, k, v):
        dtypes = INTERPRETER_DTYPES if INTERPRET else GPU_DTYPES
        if self.use_kernels and q.shape[-1] in HEAD_DIMS and q.dtype in dtypes:   # else: the plain attention
            return _flash_attention(q, k, v, causal=True, config=serving_config(q.shape[2]))   # no autotuning
        return attention(q, k, v, causal=True)

    def advance(self, num_tokens: int) -> None:
        pass   # the scheduler counts computed tokens (Scheduler.update)


class ModelRunner:
    """Executes scheduled chunks: builds the StepBatch, runs the model once, returns the sampling rows' logits."""

    def __init__(self, model, block_manager: BlockManager, pool: KVPool, use_kernels: bool | None = None):
        self.model, self.block_manager, self.pool = model, block_manager, pool
        # default: the Triton kernels for a model on a GPU, their plain-torch references for a model on the CPU
        self.use_kernels = model.device.type == "cuda" if use_kernels is None else use_kernels

    @torch.no_grad()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """logits [rows, V] (float32): ``chunk.num_logits`` rows per chunk (1 per chunk that samples, the last
        k + 1 positions of a speculative verify chunk), in the order of the chunks."""
        batch = StepBatch(chunks, self.block_manager, self.pool, self.use_kernels)
        logits = self.model(batch.input_ids, cache=batch, positions=batch.positions)      # [1, T, V]
        return logits[0, batch.sample_rows]
