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
  aligned bottom-right for exactly this case: queries that are the last Sq of Skv positions.

Before attending, every layer writes the step's new K/V into their slots with ``kernels.store_kv``. On a CPU
the Triton kernels run in the (slow) interpreter, so by default the engine uses their plain-torch references
there (``kernels.reference``: same signatures, same results; for decode a batched version of the reference,
``paged_decode_attention_torch``) and the kernels on a GPU; ``use_kernels`` forces either.
"""
from __future__ import annotations

import torch

import kernels
import kernels.reference
from course_lib.attention import attention
from course_lib.block_manager import BlockManager
from course_lib.config import ModelConfig
from course_lib.device import DEVICE, INTERPRET
from course_lib.scheduler import ScheduledChunk
from kernels.flash_attention import GPU_DTYPES, HEAD_DIMS, INTERPRETER_DTYPES


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor, **_) -> torch.Tensor:
    """What ``kernels.reference.paged_attention_decode`` computes, vectorized over the batch: the engine's CPU
    path (the reference loops over sequences in Python, which dominates a CPU step at batch 16). Gathers every
    sequence's blocks into a padded ``[B, Hkv, max_blocks * P, D]`` and masks the positions >= its length (and
    falls back to the loop when the padding would more than double the work).
    q [B, Hq, D]; caches [N, P, Hkv, D]; block_tables int32 [B, max_blocks]; context_lens int32 [B] (all >= 1)."""
    B, Hq, D = q.shape
    N, P, Hkv, _ = k_cache.shape
    if B * block_tables.shape[1] * P > 2 * int(context_lens.sum()) + B * P:
        # very uneven lengths (one long context among short ones): padding would more than double the work
        return kernels.reference.paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens)
    k = k_cache[block_tables.long()].reshape(B, -1, Hkv, D).transpose(1, 2).float()      # [B, Hkv, Lmax, D]
    v = v_cache[block_tables.long()].reshape(B, -1, Hkv, D).transpose(1, 2).float()
    qg = q.float().reshape(B, Hkv, Hq // Hkv, D)                                          # [B, Hkv, G, D]
    scores = torch.einsum("bhgd,bhkd->bhgk", qg, k) / D ** 0.5                            # [B, Hkv, G, Lmax]
    beyond = torch.arange(k.shape[2], device=q.device)[None, :] >= context_lens[:, None]  # [B, Lmax]
    scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgk,bhkd->bhgd", torch.softmax(scores, dim=-1), v)               # [B, Hkv, G, D]
    return out.reshape(B, Hq, D).to(q.dtype)


class KVPool:
    """The K/V memory of the engine: per layer ``[N, P, Hkv, D]`` blocks on the device (what the kernels read)
    and, for swapping, ``[N_cpu, P, Hkv, D]`` blocks in CPU memory (pinned on a GPU machine, so that the
    copies are asynchronous DMA transfers)."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *, num_cpu_blocks: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        device = DEVICE if device is None else device   # the course's device by default
        shape = (block_size, config.num_key_value_heads, config.head_dim)
        L, device = config.num_hidden_layers, torch.device(device)
        self.k_caches = [torch.zeros((num_blocks, *shape), dtype=dtype, device=device) for _ in range(L)]
        self.v_caches = [torch.zeros((num_blocks, *shape), dtype=dtype, device=device) for _ in range(L)]
        pin = device.type == "cuda"
        self.cpu_k_caches = [torch.zeros((num_cpu_blocks, *shape), dtype=dtype, pin_memory=pin) for _ in range(L)]
        self.cpu_v_caches = [torch.zeros((num_cpu_blocks, *shape), dtype=dtype, pin_memory=pin) for _ in range(L)]
        self.bytes_per_block = 2 * L * block_size * config.num_key_value_heads * config.head_dim * self.k_caches[0].element_size()

    def swap_out(self, mapping: list[tuple[int, int]]) -> None:
        """Copy device blocks to CPU blocks: mapping = [(device block, CPU block), ...]."""
        self._copy(mapping, self.k_caches + self.v_caches, self.cpu_k_caches + self.cpu_v_caches)

    def swap_in(self, mapping: list[tuple[int, int]]) -> None:
        """Copy CPU blocks back to device blocks: mapping = [(CPU block, device block), ...]."""
        self._copy(mapping, self.cpu_k_caches + self.cpu_v_caches, self.k_caches + self.v_caches)

    @staticmethod
    def _copy(mapping, sources, destinations) -> None:
        # non_blocking: the host only enqueues the copies and goes on. That is safe without any sync because
        # every later use of these blocks (the forward pass writing into freed device blocks, or reading
        # swapped-in ones) is queued on the same CUDA stream, after the copy. Pinned CPU memory makes the
        # device-to-host copy truly asynchronous (pageable memory would be staged through a bounce buffer).
        for src, dst in zip(sources, destinations):
            for s, d in mapping:
                dst[d].copy_(src[s], non_blocking=True)


class StepBatch:
    """The model's cache protocol (``length``, ``attend``, ``advance``) for one engine step: the tokens of all
    scheduled chunks flattened into one row, one-token chunks (decodes) first."""

    def __init__(self, chunks: list[ScheduledChunk], block_manager: BlockManager, pool: KVPool, use_kernels: bool):
        device = pool.k_caches[0].device
        self.pool, self.use_kernels = pool, use_kernels
        self.length = 0                       # unused: the engine passes every token's position explicitly
        token_ids, positions, slots = [], [], []
        self.sample_rows = []                 # row of each sampling chunk's last token (its next-token logits)
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
            if chunk.samples:
                self.sample_rows.append(row + n - 1)
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
        k_cache, v_cache = self.pool.k_caches[layer], self.pool.v_caches[layer]
        store_kv = kernels.store_kv if self.use_kernels else kernels.reference.store_kv
        store_kv(k[0].transpose(0, 1), v[0].transpose(0, 1), k_cache, v_cache, self.slot_mapping)   # [T, Hkv, D]
        out = torch.empty_like(q)
        Bd = self.num_decodes
        if Bd:   # all decodes at once, through the block tables
            decode = kernels.paged_attention_decode if self.use_kernels else paged_decode_attention_torch
            q_dec = q[0, :, :Bd].transpose(0, 1)                                               # [Bd, Hq, D]
            o = decode(q_dec, k_cache, v_cache, self.decode_tables, self.decode_lens, max_context_len=self.max_decode_len)
            out[0, :, :Bd] = o.transpose(0, 1)
        _, Hkv, _, D = k.shape
        for row, n, context_len, blocks in self.prefills:   # each prefill chunk over its sequence's cached K/V
            k_seq = k_cache[blocks].reshape(-1, Hkv, D)[:context_len].transpose(0, 1)[None]   # [1, Hkv, L, D]
            v_seq = v_cache[blocks].reshape(-1, Hkv, D)[:context_len].transpose(0, 1)[None]
            out[:, :, row:row + n] = self._prefill_attention(q[:, :, row:row + n], k_seq, v_seq)
        return out

    def _prefill_attention(self, q, k, v):
        dtypes = INTERPRETER_DTYPES if INTERPRET else GPU_DTYPES
        if self.use_kernels and q.shape[-1] in HEAD_DIMS and q.dtype in dtypes:   # else: the plain attention
            return kernels.flash_attention(q, k, v, causal=True)
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
        """logits [number of chunks that sample, V] (float32), in the order of those chunks."""
        batch = StepBatch(chunks, self.block_manager, self.pool, self.use_kernels)
        logits = self.model(batch.input_ids, cache=batch, positions=batch.positions)      # [1, T, V]
        return logits[0, batch.sample_rows]
