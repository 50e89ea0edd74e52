"""The engine's K/V memory (lessons 04 and 07): a pool of blocks per layer, in the model's dtype or in 8 bits.

``KVPool`` holds per layer ``[N, P, Hkv, D]`` blocks on the device (what the kernels read) and, for swapping,
``[N_cpu, P, Hkv, D]`` blocks in CPU memory. ``QuantizedKVPool`` (``kv_cache_dtype="int8"`` or ``"fp8"``) holds
8-bit codes plus one scale per (slot, kv head) instead — about half the bytes per token, so the same memory
holds about twice the tokens (lesson 07). Both offer the three operations a step needs, so the model runner
does not care which it has:

    store(layer, k, v, slot_mapping)                 write the step's new K/V [T, Hkv, D] into their slots
    decode(layer, q, block_tables, context_lens)     decode attention [B, Hq, D] through the block tables
    prefill(layer, q, block_tables, cu_seqlens_q,    causal attention of the step's prefill chunks [T, Hq, D], each
            seq_lens, spans, out=out)                over its sequence's cached K/V and its own
    gather(layer, blocks, length, dtype)             one sequence's first ``length`` K/V, [Hkv, length, D] each

with ``use_kernels`` choosing the Triton kernels (a GPU) or their plain-torch references (a CPU).
"""
from __future__ import annotations

import torch

import kernels
import kernels.reference
from course_lib.model.attention import attention
from course_lib.model.config import ModelConfig
from course_lib.device import DEVICE, INTERPRET
from course_lib.quant.kv_quant import KV_DTYPES
from kernels.flash_attention import GPU_DTYPES, HEAD_DIMS, INTERPRETER_DTYPES, flash_attention, serving_config
from kernels.paged_prefill import is_supported as paged_prefill_supports, paged_prefill_attention_unchecked

KV_CACHE_DTYPES = ("auto", *KV_DTYPES)   # "auto": the model's dtype


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor, **_) -> torch.Tensor:
    """What ``kernels.paged_attention_decode`` computes, vectorized over the batch: the engine's CPU path (the
    reference loops over sequences in Python, which dominates a CPU step at batch 16). Gathers every
    sequence's blocks into a padded ``[B, Hkv, max_blocks * P, D]`` and masks the positions >= its length (and
    falls back to the loop when the padding would more than double the work).
    q [B, Hq, D]; caches [N, P, Hkv, D]; block_tables int32 [B, max_blocks]; context_lens int32 [B] (all >= 1)."""
    B, Hq, D = q.shape
    N, P, Hkv, _ = k_cache.shape
    if B * block_tables.shape[1] * P > 2 * int(context_lens.sum()) + B * P:
        # very uneven lengths (one long context among short ones): padding would more than double the work
        return kernels.reference.paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens,
                                                        validate=False)
    k = k_cache[block_tables.long()].reshape(B, -1, Hkv, D).transpose(1, 2).float()      # [B, Hkv, Lmax, D]
    v = v_cache[block_tables.long()].reshape(B, -1, Hkv, D).transpose(1, 2).float()
    qg = q.float().reshape(B, Hkv, Hq // Hkv, D)                                          # [B, Hkv, G, D]
    scores = torch.einsum("bhgd,bhkd->bhgk", qg, k) / D ** 0.5                            # [B, Hkv, G, Lmax]
    beyond = torch.arange(k.shape[2], device=q.device)[None, :] >= context_lens[:, None]  # [B, Lmax]
    scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgk,bhkd->bhgd", torch.softmax(scores, dim=-1), v)               # [B, Hkv, G, D]
    return out.reshape(B, Hq, D).to(q.dtype)


class KVPool:
    """K/V blocks in the model's dtype: per layer ``[N, P, Hkv, D]`` on the device and, for swapping,
    ``[N_cpu, P, Hkv, D]`` in CPU memory (pinned on a GPU machine, so that the copies are asynchronous DMA)."""

    #: prefill chunks through ``kernels.paged_prefill_attention`` (False: the older gather path, for comparisons)
    use_paged_prefill = True

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *, num_cpu_blocks: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.device = torch.device(DEVICE if device is None else device)   # the course's device by default
        self.block_size, self.num_layers = block_size, config.num_hidden_layers
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.k_caches, self.v_caches = self._blocks(num_blocks, dtype, self.device)
        self.cpu_k_caches, self.cpu_v_caches = self._blocks(num_cpu_blocks, dtype, "cpu")
        self.bytes_per_block = self._bytes_per_block(num_blocks)

    def _blocks(self, n: int, dtype: torch.dtype, device, per_slot: tuple = None) -> tuple[list, list]:
        shape = (n, self.block_size, self.num_kv_heads) + ((self.head_dim,) if per_slot is None else per_slot)
        pin = device == "cpu" and self.device.type == "cuda"
        return tuple([torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin) for _ in range(self.num_layers)]
                     for _ in "kv")

    def _device_tensors(self) -> list[list[torch.Tensor]]:
        return [self.k_caches, self.v_caches]

    def _bytes_per_block(self, num_blocks: int) -> int:
        """Bytes of one block in every layer: K and V (codes and scales), measured from the tensors."""
        return sum(t.nbytes for layers in self._device_tensors() for t in layers) // max(num_blocks, 1)

    def _cpu_tensors(self) -> list[list[torch.Tensor]]:
        return [self.cpu_k_caches, self.cpu_v_caches]

    # ---------------------------------------------------------------- swapping (lesson 04)
    def swap_out(self, mapping: list[tuple[int, int]]) -> None:
        """Copy device blocks to CPU blocks: mapping = [(device block, CPU block), ...]."""
        self._copy(mapping, self._device_tensors(), self._cpu_tensors())

    def swap_in(self, mapping: list[tuple[int, int]]) -> None:
        """Copy CPU blocks back to device blocks: mapping = [(CPU block, device block), ...]."""
        self._copy(mapping, self._cpu_tensors(), self._device_tensors())

    @staticmethod
    def _copy(mapping, sources, destinations) -> None:
        # non_blocking: the host only enqueues the copies and goes on. That is safe without any sync because
        # every later use of these blocks (the forward pass writing into freed device blocks, or reading
        # swapped-in ones) is queued on the same CUDA stream, after the copy. Pinned CPU memory makes the
        # device-to-host copy truly asynchronous (pageable memory would be staged through a bounce buffer).
        for src_layers, dst_layers in zip(sources, destinations):
            for src, dst in zip(src_layers, dst_layers):
                for s, d in mapping:
                    dst[d].copy_(src[s], non_blocking=True)

    # ---------------------------------------------------------------- what a step does with the blocks
    # The block manager made every slot and block table of a step, so the kernels run with validate=False: they
    # read nothing back from the device to check them (a step must never wait on the GPU).
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, use_kernels: bool):
        """Write k, v ``[T, Hkv, D]`` at ``slot_mapping`` ``[T]``."""
        store_kv = kernels.store_kv if use_kernels else kernels.reference.store_kv
        store_kv(k, v, self.k_caches[layer], self.v_caches[layer], slot_mapping, validate=False)

    def decode(self, layer: int, q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
               max_context_len: int, use_kernels: bool) -> torch.Tensor:
        """Decode attention of q ``[B, Hq, D]`` over each sequence's K/V: ``[B, Hq, D]``."""
        decode = kernels.paged_attention_decode if use_kernels else paged_decode_attention_torch
        return decode(q, self.k_caches[layer], self.v_caches[layer], block_tables, context_lens,
                      max_context_len=max_context_len, validate=False)

    def prefill(self, layer: int, q: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                seq_lens: torch.Tensor, spans: list[tuple[int, int, int]], use_kernels: bool, *, out: torch.Tensor):
        """Causal attention of the prefill chunks q ``[T, Hq, D]`` (chunk s: rows cu_seqlens_q[s] ...
        cu_seqlens_q[s+1]-1) over the first seq_lens[s] K/V of their sequences, written into ``out`` ``[T, Hq, D]``;
        ``spans`` holds the same on the host, (first row, tokens, length) per chunk. With kernels: one launch of
        ``kernels.paged_prefill_attention`` reading the blocks in place; else the gathering path (the CPU default)."""
        if use_kernels and self.use_paged_prefill and paged_prefill_supports(q.dtype, self.head_dim):
            paged_prefill_attention_unchecked(q, self.k_caches[layer], self.v_caches[layer], block_tables,
                                              cu_seqlens_q, seq_lens, out=out)   # one launch, no host sync
        else:
            self._prefill_gathered(layer, q, block_tables, spans, use_kernels, out)

    def _prefill_gathered(self, layer, q, block_tables, spans, use_kernels, out) -> None:
        """Chunk by chunk: copy the sequence's K/V out of its blocks (``gather``), then FlashAttention (kernels)
        or the plain attention over the contiguous copy."""
        P = self.block_size
        for s, (row, n, length) in enumerate(spans):
            k, v = self.gather(layer, block_tables[s, :-(-length // P)], length, q.dtype)        # [Hkv, L, D] each
            o = chunk_attention(q[row:row + n].transpose(0, 1)[None], k[None], v[None], use_kernels)   # [1, Hq, n, D]
            out[row:row + n] = o[0].transpose(0, 1)

    def gather(self, layer: int, blocks: torch.Tensor, length: int, dtype: torch.dtype):
        """The first ``length`` K and V of the sequence whose blocks are ``blocks`` [n]: ``[Hkv, length, D]`` each."""
        Hkv, D = self.num_kv_heads, self.head_dim
        return tuple(c[layer][blocks].reshape(-1, Hkv, D)[:length].transpose(0, 1).to(dtype)
                     for c in (self.k_caches, self.v_caches))


class QuantizedKVPool(KVPool):
    """K/V blocks as 8-bit codes (``torch.int8``, or ``torch.float8_e4m3fn`` with ``kv_cache_dtype="fp8"``) plus a
    float16 scale per (slot, kv head), written by ``kernels.store_kv_int8`` and read by
    ``kernels.paged_attention_int8_decode`` (symmetric: x ≈ code · scale). Prefill chunks attend to the
    dequantized K/V, so every token sees the cache as it is stored. Swapping moves codes and scales together."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *, num_cpu_blocks: int = 0,
                 kv_cache_dtype: str = "int8", device: torch.device | str | None = None, **_):
        if kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        self.kv_cache_dtype = kv_cache_dtype
        self.device = torch.device(DEVICE if device is None else device)
        self.block_size, self.num_layers = block_size, config.num_hidden_layers
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        code = KV_DTYPES[kv_cache_dtype][0]
        self.k_caches, self.v_caches = self._blocks(num_blocks, code, self.device)
        self.k_scales, self.v_scales = self._blocks(num_blocks, torch.float16, self.device, per_slot=())
        self.cpu_k_caches, self.cpu_v_caches = self._blocks(num_cpu_blocks, code, "cpu")
        self.cpu_k_scales, self.cpu_v_scales = self._blocks(num_cpu_blocks, torch.float16, "cpu", per_slot=())
        self.bytes_per_block = self._bytes_per_block(num_blocks)

    def _device_tensors(self):
        return [self.k_caches, self.v_caches, self.k_scales, self.v_scales]

    def _cpu_tensors(self):
        return [self.cpu_k_caches, self.cpu_v_caches, self.cpu_k_scales, self.cpu_v_scales]

    def _layer(self, layer: int) -> tuple[torch.Tensor, ...]:
        return self.k_caches[layer], self.v_caches[layer], self.k_scales[layer], self.v_scales[layer]

    def store(self, layer, k, v, slot_mapping, use_kernels):
        store = kernels.store_kv_int8 if use_kernels else kernels.reference.store_kv_int8
        store(k, v, *self._layer(layer), slot_mapping, validate=False)

    def decode(self, layer, q, block_tables, context_lens, max_context_len, use_kernels):
        if use_kernels:
            return kernels.paged_attention_int8_decode(q, *self._layer(layer), block_tables, context_lens,
                                                       max_context_len=max_context_len, validate=False)
        # CPU: dequantize only the blocks of this batch, then the batched torch decode over them
        B, width = block_tables.shape
        idx = block_tables.long().flatten()                                                   # [B * width]
        k, v = (codes[layer][idx].float() * scales[layer][idx].float()[..., None]                 # [B*width, P, Hkv, D]
                for codes, scales in ((self.k_caches, self.k_scales), (self.v_caches, self.v_scales)))
        own_tables = torch.arange(B * width, dtype=torch.int32, device=q.device).view(B, width)
        return paged_decode_attention_torch(q, k, v, own_tables, context_lens)

    def prefill(self, layer, q, block_tables, cu_seqlens_q, seq_lens, spans, use_kernels, *, out):
        # No paged prefill kernel reads 8-bit codes yet: every chunk attends to its sequence's K/V dequantized
        # into a contiguous copy (with use_kernels through kernels.flash_attention).
        self._prefill_gathered(layer, q, block_tables, spans, use_kernels, out)

    def gather(self, layer, blocks, length, dtype):
        Hkv, D = self.num_kv_heads, self.head_dim
        return tuple((codes[layer][blocks].to(dtype) * scales[layer][blocks].to(dtype)[..., None])
                     .reshape(-1, Hkv, D)[:length].transpose(0, 1)
                     for codes, scales in ((self.k_caches, self.k_scales), (self.v_caches, self.v_scales)))


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, use_kernels: bool) -> torch.Tensor:
    """Causal attention of one chunk q ``[1, Hq, n, D]`` over its sequence's contiguous k, v ``[1, Hkv, L, D]``
    (the chunk is the last n of L positions): ``kernels.flash_attention`` with the serving config, or the plain
    attention without kernels or where the kernel does not run (its dtypes, head dims)."""
    dtypes = INTERPRETER_DTYPES if INTERPRET else GPU_DTYPES
    if use_kernels and q.shape[-1] in HEAD_DIMS and q.dtype in dtypes:
        return flash_attention(q, k, v, causal=True, config=serving_config(q.shape[2], q.dtype))   # no autotuning
    return attention(q, k, v, causal=True)


def make_kv_pool(config: ModelConfig, num_blocks: int, block_size: int, *, kv_cache_dtype: str = "auto",
                 num_cpu_blocks: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> KVPool:
    """``kv_cache_dtype="auto"``: K/V in the model's ``dtype``; ``"int8"`` / ``"fp8"``: 8-bit codes + scales."""
    if kv_cache_dtype == "auto":
        return KVPool(config, num_blocks, block_size, num_cpu_blocks=num_cpu_blocks, dtype=dtype, device=device)
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    return QuantizedKVPool(config, num_blocks, block_size, num_cpu_blocks=num_cpu_blocks,
                           kv_cache_dtype=kv_cache_dtype, device=device)
