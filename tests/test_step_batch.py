"""The eager step's inputs (``model_runner.StepBatch``): built per token in numpy, they must equal the per-token
definition, and reach the device in one copy that never waits for it (``_upload``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib.paging.block_manager import BlockManager
from course_lib.serving.kv_pool import KVPool
from course_lib.serving.model_runner import StepBatch, _upload
from course_lib.serving.sequence import ScheduledChunk, Sequence
from test_engine import MICRO


def _mixed_step(P: int = 4):
    """Two decodes, then two prefill chunks (one a later chunk of a prompt that has blocks cached before it)."""
    bm = BlockManager(64, P)
    seqs = [Sequence(i, i, list(range(10 * i + 1, 10 * i + n + 1))) for i, n in enumerate((7, 9, 13, 6))]
    lengths = (8, 10, 13, 6)                      # the decodes hold a slot for their next token
    for seq, n in zip(seqs, lengths):
        bm.allocate(seq.seq_id, n)
    seqs[0].output_token_ids.append(99)
    seqs[1].output_token_ids.append(98)
    chunks = [ScheduledChunk(seqs[0], 7, 1), ScheduledChunk(seqs[1], 9, 1), ScheduledChunk(seqs[2], 5, 8),
              ScheduledChunk(seqs[3], 0, 6)]
    return chunks, bm


def test_inputs_equal_their_per_token_definition():
    chunks, bm = _mixed_step()
    P = bm.block_size
    pool = KVPool(MICRO.config, 64, P, device="cpu")
    batch = StepBatch(chunks, bm, pool, use_kernels=False, placeholder_rows=([1], [0]))
    tokens = [t for c in chunks for t in c.seq.token_ids[c.start:c.start + c.num_tokens]]
    positions = [p for c in chunks for p in range(c.start, c.start + c.num_tokens)]
    slots = [bm.block_tables[c.seq.seq_id][p // P] * P + p % P for c in chunks
             for p in range(c.start, c.start + c.num_tokens)]
    assert batch.input_ids.tolist() == [tokens] and batch.input_ids.dtype == torch.int64
    assert batch.positions.tolist() == positions and batch.slot_mapping.tolist() == slots
    assert batch.num_decodes == 2 and batch.max_decode_len == 10
    assert batch.decode_lens.tolist() == [8, 10] and batch.decode_lens.dtype == torch.int32
    assert batch.decode_tables.tolist() == [bm.block_tables[0][:2] + [0], bm.block_tables[1][:3]]   # padded: block 0
    assert batch.prefill_spans == [(0, 8, 13), (8, 6, 6)]
    assert batch.cu_seqlens_q.tolist() == [0, 8, 14] and batch.prefill_lens.tolist() == [13, 6]
    assert batch.prefill_tables.tolist() == [bm.block_tables[2][:4], bm.block_tables[3][:2] + [0, 0]]
    assert batch.logits_indices.tolist() == [0, 1, 9, 15]          # each chunk ends its sequence's tokens
    assert batch.placeholder_rows.tolist() == [[1], [0]]


def test_unified_inputs_list_every_chunk_padded_to_the_asked_count():
    """``unified=S`` (the full mixed graphs): every chunk, decodes included, as one kernel sees them, padded to S."""
    chunks, bm = _mixed_step()
    pool = KVPool(MICRO.config, 64, bm.block_size, device="cpu")
    batch = StepBatch(chunks, bm, pool, use_kernels=False, unified=6)
    assert batch.unified_cu_seqlens_q.tolist() == [0, 1, 2, 10, 16, 16, 16]    # T = 16 repeated: empty chunks
    assert batch.unified_seq_lens.tolist() == [8, 10, 13, 6, 0, 0]
    assert batch.unified_cu_seqlens_q.dtype == batch.unified_seq_lens.dtype == torch.int32
    assert batch.unified_tables.tolist() == torch.cat([                         # decode rows, then prefill rows
        torch.nn.functional.pad(batch.decode_tables, (0, 1)), batch.prefill_tables]).tolist()
    assert not hasattr(StepBatch(chunks, bm, pool, use_kernels=False), "unified_tables")


def test_a_one_token_chunk_after_a_prefill_chunk_is_refused():
    chunks, bm = _mixed_step()
    pool = KVPool(MICRO.config, 64, bm.block_size, device="cpu")
    with pytest.raises(RuntimeError, match="one-token chunks first"):
        StepBatch(chunks[1:] + chunks[:1], bm, pool, use_kernels=False)


def test_the_packed_upload_gives_the_same_tensors_as_the_arrays():
    """What a GPU step does (one buffer, one copy, views of their own dtype), run on the CPU."""
    arrays = dict(a=np.arange(3, dtype=np.int64)[None], b=np.arange(5, dtype=np.int32),   # 20 bytes: padded to 24
                  c=np.zeros((0, 1), dtype=np.int32), d=np.arange(12, dtype=np.int32).reshape(3, 4)[:, :2],
                  e=np.array([7, -1], dtype=np.int64))
    packed, plain = _upload(arrays, torch.device("cpu"), pack=True), _upload(arrays, torch.device("cpu"))
    for name, a in arrays.items():
        for t in (packed[name], plain[name]):
            assert t.dtype == torch.from_numpy(a).dtype and t.shape == a.shape and t.is_contiguous()
            assert t.tolist() == a.tolist()
