"""Paged attention for decode: one new query per sequence attends to its K/V, read through its block table.

The cache is ``[N, P, Hkv, D]`` (N physical blocks of P token slots). Sequence b's token i is in block
``block_tables[b, i // P]`` at offset ``i % P``. The kernel never needs a sequence's K/V to be contiguous:
it gathers each tile of tokens through the block table, which is the whole point of paging.

Work split (the launch grid):
* one program per (sequence, kv head, split): it serves all ``G = Hq / Hkv`` query heads of its kv head
  (grouped-query attention), so each K/V byte is read from memory once, not G times;
* it walks its tokens in tiles of ``BLOCK_N`` tokens (any block size P: the tile is cut from the block
  table token by token) with an online softmax (running max m, running sum l, rescaled accumulator);
* **split-K / flash-decoding**: with few sequences (B·Hkv programs would leave most SMs idle) the tokens
  are cut into ``num_splits`` ranges processed in parallel; each writes a partial result and its
  log-sum-exp, and a second, tiny kernel merges them. Chosen automatically, or forced with ``num_splits``.

Decode is memory-bound (lesson 00): the figure of merit is K/V bytes read per second.
"""
from __future__ import annotations

import math

import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from kernels.device import INTERPRET
from kernels._checks import check_block_tables, check_sm_scale, check_tensors

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Tile and launch parameters: tokens per tile, warps, software-pipelining stages (tuned on an H100).
CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=3)
#: A split processes at least this many tokens (below it, the merge costs more than the parallelism gains): the
#: INT8 kernel's wave planner (``choose_num_splits_in_waves``).
MIN_TOKENS_PER_SPLIT = 256
#: The FP16 kernel's floor: one tile. On an H100 at batch 1, 1k tokens (8 kv heads), 16 splits of 64 tokens ran at
#: 0.97x SDPA's time where 4 splits of 256 ran at 0.71x: with so few programs, more of them matters more than the
#: merge (``paged_attention --splits``: paged_attention_nvidia-h100-80gb-hbm3.json as of abdf249, 2026-12-06;
#: later files of that card ran without the sweep).
DECODE_MIN_TOKENS_PER_SPLIT = CONFIG["BLOCK_N"]
MAX_SPLITS = 128
#: Below this many programs per SM, split-K adds programs (B=32, context 4k, unsplit: 256 programs, 3.2 TB/s;
#: B=64: 512 programs, 4.2 TB/s on an H200).
PROGRAMS_PER_SM = 3


@triton.jit
def _paged_attention_decode_kernel(
    q_ptr,                      # [B, Hq, D]
    k_cache_ptr, v_cache_ptr,   # [N, P, Hkv, D], last dim contiguous
    block_tables_ptr,           # [B, max_blocks] int32
    context_lens_ptr,           # [B] int32
    out_ptr,                    # [B, Hq, D] (unsplit) or partial results [B, Hq, splits, D] float32 (split)
    lse_ptr,                    # [B, Hq, splits] float32 log2-sum-exp of each split (split only)
    sm_scale_log2e,             # sm_scale * log2(e): we use exp2, which is what the hardware computes
    tokens_per_split,
    stride_qb, stride_qh,
    stride_kn, stride_kp, stride_kh,
    stride_vn, stride_vp, stride_vh,
    stride_bt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    QUERIES_PER_KV: tl.constexpr,   # G = Hq // Hkv
    GROUP_PAD: tl.constexpr,        # G padded to >= 16 (the smallest tl.dot on a GPU)
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,       # P, tokens per KV block
    BLOCK_N: tl.constexpr,          # tokens per tile
    SPLIT: tl.constexpr,            # write partial results + lse (True) or the final output (False)
    IEEE_FP32: tl.constexpr,        # fp32 inputs: exact fp32 dots instead of TF32
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(context_len, start + tokens_per_split)

    # GQA: kv head h serves query heads h*G ... h*G + G-1 (the rows of this program's query tile).
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    q_heads = kv_head * QUERIES_PER_KV + g
    g_mask = g < QUERIES_PER_KV
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qb + q_heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)                     # [G, D]

    m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")   # running max of the scores (log2 units)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)                  # running sum of exp2(score - m_i)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)         # running sum of exp2(score - m_i) * v
    for tile_start in range(start, end, BLOCK_N):
        t = tile_start + tl.arange(0, BLOCK_N)                      # logical token positions of this tile
        t_mask = t < end
        # The paging: which physical block holds token t, then its row in that block.
        block_ids = tl.load(block_tables_ptr + seq * stride_bt + t // BLOCK_SIZE, mask=t_mask, other=0)
        row = block_ids.to(tl.int64) * stride_kn + (t % BLOCK_SIZE) * stride_kp + kv_head * stride_kh
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, D]
        if IEEE_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))                                                  # [G, BLOCK_N] fp32
        s = tl.where(t_mask[None, :], s * sm_scale_log2e, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))   # finite: every tile has >= 1 valid token
        alpha = tl.exp2(m_i - m_new)                 # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vrow = block_ids.to(tl.int64) * stride_vn + (t % BLOCK_SIZE) * stride_vp + kv_head * stride_vh
        v = tl.load(v_cache_ptr + vrow[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, D]
        if IEEE_FP32:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)   # an empty range (context 0, or a split past the end): output 0
    out = acc / l_safe[:, None]
    o_ptrs = out_ptr + seq * stride_ob + q_heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    if SPLIT:  # the merge needs each split's log2-sum-exp: m + log2(l), -inf when the split was empty
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + seq * stride_lb + q_heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    partial_ptr, lse_ptr, out_ptr,   # [B, Hq, S, D] fp32, [B, Hq, S] fp32 -> [B, Hq, D]
    num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, DIM_PAD)
    s_mask = s < num_splits
    lse = tl.load(lse_ptr + seq * stride_lb + head * stride_lh + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)     # every split empty (context 0): all weights 0
    w = tl.exp2(lse - m)                         # split i's share: l_i * 2^(m_i - m)
    o = tl.load(partial_ptr + seq * stride_pb + head * stride_ph + s[:, None] * stride_ps + d[None, :],
                mask=s_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def _num_sms(device: torch.device) -> int:
    # The interpreter has no SMs; pretend a small GPU so that CPU tests exercise both paths.
    return 4 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch_size: int, num_kv_heads: int, max_context_len: int, num_sms: int,
                      programs_per_sm: int = PROGRAMS_PER_SM, min_tokens: int = DECODE_MIN_TOKENS_PER_SPLIT) -> int:
    """Splits per sequence: 1 when B·Hkv programs already keep the GPU busy (>= 3 per SM: enough loads in
    flight to saturate HBM, measured on an H200); otherwise enough splits to get there, rounded up to a power of
    two, each with at least ``min_tokens`` tokens (DECODE_MIN_TOKENS_PER_SPLIT: one tile).

    The power of two: a split covers whole tiles, so an odd count loses splits to rounding (batch 1, 4k tokens,
    8 kv heads on 132 SMs wants 50 splits: 82 tokens each, rounded up to two tiles of 64, so only 32 splits ran,
    0.94x SDPA's time on an H100, where 64 splits of one tile ran at 1.01x; ``paged_attention --splits``)."""
    programs = batch_size * num_kv_heads
    if programs >= programs_per_sm * num_sms or max_context_len < 2 * min_tokens:
        return 1
    wanted = 1 << (math.ceil(programs_per_sm * num_sms / programs) - 1).bit_length()
    return max(1, min(wanted, max_context_len // min_tokens, MAX_SPLITS))


#: A split plan "fills its waves" when its programs keep at least this share of the GPU's slots busy, averaged
#: over the waves they take.
WAVE_FILL = 0.9


def choose_num_splits_in_waves(batch_size: int, num_kv_heads: int, max_context_len: int, num_sms: int,
                               resident_per_sm: int) -> int:
    """Splits per sequence for a kernel of which ``resident_per_sm`` programs fit on one SM at once (its registers
    decide): the fewest splits whose programs fill whole waves of the GPU's ``resident_per_sm * num_sms`` slots.

    Programs of equal length run in waves: 1,024 programs on 528 slots take two waves, the second half empty,
    so 4 splits of a 256-program batch run slower than 2 (measured on an H200 with the INT8 kernel: B = 32, 8k:
    2 splits 0.75x the FP16 time, 3 splits 0.97x, 4 splits 0.77x; ``int8_split_sweep_nvidia-h200_2026-11-28.json``).
    """
    programs = batch_size * num_kv_heads
    slots = resident_per_sm * num_sms
    most = max(1, min(max_context_len // MIN_TOKENS_PER_SPLIT, MAX_SPLITS))
    if programs >= slots:
        return 1

    def fill(splits: int) -> float:   # share of the slots busy, averaged over the waves
        n = programs * splits
        return n / (math.ceil(n / slots) * slots)

    return next((s for s in range(1, most + 1) if fill(s) >= WAVE_FILL), max(range(1, most + 1), key=fill))


def _validate(q, k_cache, v_cache, block_tables, context_lens) -> None:
    check_tensors([("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                   ("context_lens", context_lens)], same_device_as="q")
    if q.dim() != 3:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [B, Hq, D] (one query token per sequence)")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)}; expected [num_blocks, block_size, Hkv, D]")
    B, Hq, D = q.shape
    N, P, Hkv, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}; expected the shape of k_cache, "
                         f"{tuple(k_cache.shape)}")
    if Dk != D:
        raise ValueError(f"k_cache has head_dim {Dk} (shape {tuple(k_cache.shape)}); expected q's head_dim D={D}")
    if Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a multiple of k_cache's {Hkv} kv heads (GQA needs Hq % Hkv == 0)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; expected one of {', '.join(map(str, SUPPORTED_DTYPES))}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}; expected the dtype of q, {q.dtype}")
        if t.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in its last (head_dim) dimension")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables has shape {tuple(block_tables.shape)}; expected [B={B}, max_blocks]")
    if block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables has dtype {block_tables.dtype}; expected torch.int32")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous in its last dimension")
    if context_lens.shape != (B,):
        raise ValueError(f"context_lens has shape {tuple(context_lens.shape)}; expected [B={B}]")
    if context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens has dtype {context_lens.dtype}; expected torch.int32")


def run_split_k(kernel, q: torch.Tensor, num_kv_heads: int, num_splits: int, before: tuple, middle: tuple,
                meta: dict) -> torch.Tensor:
    """Launch a decode kernel over a (sequence, kv head, split) grid and return its ``[B, Hq, D]`` output. Its
    arguments: ``*before, out, lse, *middle``, the output's three strides and the lse's two, ``SPLIT``, ``**meta``.
    One split: the kernel writes the output itself (lse unused). Several: each writes its partial result and its
    log2-sum-exp, which ``_merge_splits_kernel`` combines. Shared by the FP16 and the 8-bit decode kernels."""
    B, Hq, D = q.shape
    out = torch.empty_like(q)
    if B == 0:
        return out
    if num_splits == 1:
        kernel[(B, num_kv_heads, 1)](*before, out, out, *middle, out.stride(0), out.stride(1), 0, 0, 0,
                                     SPLIT=False, **meta)
        return out
    partial = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    kernel[(B, num_kv_heads, num_splits)](*before, partial, lse, *middle, partial.stride(0), partial.stride(1),
                                          partial.stride(2), lse.stride(0), lse.stride(1), SPLIT=True, **meta)
    _merge_splits_kernel[(B, Hq)](
        partial, lse, out, num_splits, partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=D, DIM_PAD=triton.next_power_of_2(D), SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)))
    return out


def plan_splits(q, block_tables, context_lens, P: int, Hkv: int, num_splits: int | None,
                max_context_len: int | None, block_n: int, programs_per_sm: int = PROGRAMS_PER_SM,
                resident_per_sm: int | None = None) -> tuple[int, int, int]:
    """Host-side checks and the split-K plan of a paged decode call: (max_context_len, num_splits,
    tokens_per_split). Shared by the FP16 kernel (``choose_num_splits``: >= programs_per_sm programs per SM) and
    the INT8 kernel (``resident_per_sm`` given: ``choose_num_splits_in_waves``)."""
    B = q.shape[0]
    capacity = block_tables.shape[1] * P
    if max_context_len is None:
        max_context_len = int(context_lens.max()) if B else 0
        if B and int(context_lens.min()) < 0:
            raise ValueError(f"context_lens holds {int(context_lens.min())}; lengths must be >= 0")
    if max_context_len > capacity:
        raise ValueError(f"a context length of {max_context_len} tokens is longer than block_tables can address: "
                         f"{block_tables.shape[1]} blocks x block_size {P} = {capacity} tokens")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or a positive int, got {num_splits!r}")
    if B == 0:
        return max_context_len, 1, block_n
    if num_splits is None:
        if resident_per_sm:
            num_splits = choose_num_splits_in_waves(B, Hkv, max_context_len, _num_sms(q.device), resident_per_sm)
        else:
            num_splits = choose_num_splits(B, Hkv, max_context_len, _num_sms(q.device), programs_per_sm)
    # Every split covers a whole number of tiles; with the rounding there may be fewer splits than asked.
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_context_len, 1), num_splits), block_n) * block_n
    return max_context_len, triton.cdiv(max(max_context_len, 1), tokens_per_split), tokens_per_split


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *, sm_scale: float | None = None,
                           num_splits: int | None = None, max_context_len: int | None = None,
                           validate: bool = True) -> torch.Tensor:
    """Decode attention through block tables: ``[B, Hq, D]``, in q's dtype.

    q ``[B, Hq, D]``; k_cache, v_cache ``[N, P, Hkv, D]``; block_tables int32 ``[B, max_blocks]``;
    context_lens int32 ``[B]`` (sequence b attends to its tokens 0 ... context_lens[b]-1; 0 gives zeros).
    Only the entries of a row that hold the sequence's tokens are read: past them, padding (-1, 0) is fine.
    sm_scale defaults to 1/sqrt(D). ``num_splits``: None chooses (``choose_num_splits``), 1 forces the
    unsplit kernel, k > 1 forces split-K with up to k splits. ``max_context_len``: max(context_lens) if the
    caller knows it (a scheduler does). Raises ValueError, naming the argument (and the entry), on wrong inputs:
    shapes, dtypes and devices always; with ``validate`` (the default) also the values the kernel will read
    (``kernels._checks.check_block_tables``: every block id it reads inside [0, N), the lengths), one
    device-to-host copy. ``validate=False`` with ``max_context_len`` reads nothing back: the engine's hot path,
    for tables it built itself (a block id outside the cache then reads memory that is not the cache).
    """
    _validate(q, k_cache, v_cache, block_tables, context_lens)
    check_sm_scale(sm_scale)
    B, Hq, D = q.shape
    N, P, Hkv, _ = k_cache.shape
    if validate:
        max_context_len = check_block_tables(block_tables, context_lens, N, P, max_context_len)
    max_context_len, num_splits, tokens_per_split = plan_splits(q, block_tables, context_lens, P, Hkv, num_splits,
                                                                max_context_len, CONFIG["BLOCK_N"])
    scale = (1.0 / math.sqrt(D) if sm_scale is None else sm_scale) * math.log2(math.e)
    cfg = CONFIG
    G = Hq // Hkv
    meta = dict(QUERIES_PER_KV=G, GROUP_PAD=max(16, triton.next_power_of_2(G)), HEAD_DIM=D,
                DIM_PAD=max(16, triton.next_power_of_2(D)), BLOCK_SIZE=P, BLOCK_N=cfg["BLOCK_N"],
                IEEE_FP32=q.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    strides = (q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0))
    return run_split_k(_paged_attention_decode_kernel, q, Hkv, num_splits,
                       (q, k_cache, v_cache, block_tables, context_lens), (scale, tokens_per_split, *strides), meta)
