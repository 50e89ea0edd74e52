"""A paged KV cache the model can decode through (lesson 02).

``PagedKVCache`` implements the model's cache protocol (``length``, ``attend(layer, q, k, v)``,
``advance(num_tokens)``, see ``course_lib.model.llama.Llama.forward``) for a batch of sequences that advance in
lockstep, like ``course_lib.model.kv_cache.KVCache``, but stores K/V in blocks:

* per layer, ``k_caches[layer]`` and ``v_caches[layer]`` are ``[N, P, Hkv, D]`` (N blocks of P slots);
* a ``BlockManager`` gives each sequence a block table; at the first layer of every forward the cache
  reserves slots for the new tokens (allocating blocks, copying shared ones: copy-on-write);
* each layer writes its new K/V with ``kernels.store_kv`` and attends with ``kernels.paged_attention_decode``
  when it decodes one token per sequence (S == 1); a prefill (S > 1) gathers the K/V through the block
  tables and uses the plain ``course_lib.model.attention.attention`` (a paged *prefill* kernel is not our topic).
  ``use_kernel=False`` uses the plain-torch references for both (same results; fast on CPU).

``fork`` and ``reorder`` give parallel sampling and beam search their memory sharing.
"""
from __future__ import annotations

import torch

import kernels
import kernels.reference
from course_lib.model.attention import attention
from course_lib.paging.block_manager import BlockManager
from course_lib.model.config import ModelConfig
from course_lib.device import DEVICE


class PagedKVCache:
    """Paged K/V for the sequences ``seq_ids`` (batch row i of the model's input is sequence seq_ids[i])."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16, batch_size: int = 1, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, use_kernel: bool = True):
        device = DEVICE if device is None else device   # the course's device by default
        self.block_manager = BlockManager(num_blocks, block_size)
        self.block_size = block_size
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)      # [N, P, Hkv, D]
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.use_kernel = use_kernel
        self.seq_ids: list[int] = []
        self._next_seq_id = 0
        for _ in range(batch_size):
            self._new_seq_id()
            self.block_manager.allocate(self.seq_ids[-1], 0)
        self.length = 0
        self._step = None   # (slot_mapping, block_tables, context_lens) of the forward pass in progress

    # ---------------------------------------------------------------- the model's cache protocol
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v ``[B, Hkv, S, D]`` in the blocks; causal attention of q ``[B, Hq, S, D]`` over all of
        each sequence's tokens: ``[B, Hq, S, D]``."""
        B, Hq, S, D = q.shape
        if B != len(self.seq_ids):
            raise ValueError(f"the batch has {B} rows but the cache holds {len(self.seq_ids)} sequences")
        if self._step is None:   # the first layer of this forward: reserve the slots of the new tokens
            self._step = self._prepare(S)
        slot_mapping, block_tables, context_lens = self._step
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        # [B, Hkv, S, D] -> [B*S, Hkv, D]: token-major, in the order of slot_mapping
        store_kv = kernels.store_kv if self.use_kernel else kernels.reference.store_kv
        store_kv(k.transpose(1, 2).reshape(B * S, -1, D), v.transpose(1, 2).reshape(B * S, -1, D),
                 k_cache, v_cache, slot_mapping)
        L = self.length + S
        if S == 1 and self.use_kernel:   # decode: the paged-attention kernel reads K/V through the tables
            out = kernels.paged_attention_decode(q[:, :, 0], k_cache, v_cache, block_tables, context_lens,
                                                 max_context_len=L, validate=False)   # tables of our own
            return out[:, :, None]                                                       # [B, Hq, 1, D]
        # prefill: gather each sequence's blocks into a contiguous [B, Hkv, L, D] and attend causally
        Hkv = k_cache.shape[2]
        k_all = k_cache[block_tables.long()].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2)
        v_all = v_cache[block_tables.long()].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2)
        return attention(q, k_all, v_all, causal=True)

    def advance(self, num_tokens: int) -> None:
        if self._step is None and num_tokens:
            raise RuntimeError("advance() without a forward pass: no slots were reserved for these tokens")
        self.length += num_tokens
        self._step = None

    # ---------------------------------------------------------------- sharing: parallel sampling, beam search
    def fork(self, index: int) -> int:
        """Append a new sequence (a new batch row) that shares all blocks of batch row ``index``."""
        self._idle("fork")
        child = self._new_seq_id()
        self.block_manager.fork(self.seq_ids[index], child)
        return child

    def reorder(self, parents: list[int]) -> None:
        """Beam search: new batch row i continues old row parents[i]. Rows are forked (blocks shared, no
        copy) and rows nobody continues are freed."""
        self._idle("reorder")
        old = self.seq_ids
        self.seq_ids = []
        for p in parents:
            child = self._new_seq_id()
            self.block_manager.fork(old[p], child)
        for seq_id in old:
            self.block_manager.free(seq_id)

    def free(self) -> None:
        """Release every sequence's blocks."""
        for seq_id in self.seq_ids:
            self.block_manager.free(seq_id)
        self.seq_ids = []

    @property
    def num_used_blocks(self) -> int:
        return self.block_manager.num_used_blocks

    def nbytes(self) -> int:
        """Bytes of the whole preallocated pool (all N blocks, used or not)."""
        return sum(t.numel() * t.element_size() for t in self.k_caches + self.v_caches)

    # ---------------------------------------------------------------- internals
    def _new_seq_id(self) -> int:
        self.seq_ids.append(self._next_seq_id)
        self._next_seq_id += 1
        return self.seq_ids[-1]

    def _idle(self, what: str) -> None:
        if self._step is not None:
            raise RuntimeError(f"cannot {what} in the middle of a forward pass")

    def _block_tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed by block id, [N, ...]: what a copy-on-write copies."""
        return self.k_caches + self.v_caches

    def _prepare(self, num_new: int):
        """Slots for num_new tokens of every sequence (copy-on-write copies done first), and the tensors
        the kernels read: slot_mapping [B*S], block_tables int32 [B, max_blocks], context_lens int32 [B]."""
        bm, device = self.block_manager, self.k_caches[0].device
        slots = []
        for seq_id in self.seq_ids:
            new_slots, copies = bm.append_slots(seq_id, num_new)
            for src, dst in copies:     # copy-on-write: this sequence gets its own copy of a shared block
                for cache in self._block_tensors():
                    cache[dst] = cache[src]
            slots += new_slots
        tables = [bm.block_tables[s] for s in self.seq_ids]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
        context_lens = torch.tensor([bm.num_tokens[s] for s in self.seq_ids], dtype=torch.int32, device=device)
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
        return slot_mapping, block_tables, context_lens
