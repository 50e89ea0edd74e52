"""Paged prefill attention: FlashAttention over the variable-length query chunks of one engine step, reading
each sequence's K/V straight through its block table (what vLLM's FlashAttention backend does with
``flash_attn_varlen_func(..., block_table=...)``).

A step of a serving engine holds prefill chunks of several sequences: sequence s contributes the ``n_s`` query
tokens ``q[cu_seqlens_q[s] : cu_seqlens_q[s+1]]`` and has ``seq_lens[s] = L_s`` tokens of K/V in the paged
cache, its cached prefix and the chunk itself (``store_kv`` wrote the chunk's K/V before attention). Query i of
the chunk sits at position ``L_s - n_s + i`` and sees keys ``j <= L_s - n_s + i`` (causal, aligned bottom-right
as in ``kernels.flash_attention``). Without this kernel the engine first copies every sequence's K/V out of its
blocks into a contiguous tensor, in every layer, and then runs one FlashAttention call per chunk.

Work split (one launch for the whole step):
* a program owns one **query tile** of one sequence and one **kv head**: ``BLOCK_Q`` consecutive query tokens
  times the ``G = Hq / Hkv`` query heads that share the kv head, packed into ``BLOCK_M = BLOCK_Q * G`` rows of
  one ``tl.dot`` (row r is token ``r // G``, head ``r % G``: the G heads of a token are adjacent in memory).
  Each K/V byte is then read once per tile, not G times, and short chunks (a speculative verify chunk of
  3-5 tokens, G = 4) still fill a 16-row tile;
* **how a program finds its sequence**: sequence s's tiles are numbered from ``cu_seqlens_q[s] // BLOCK_Q + s``
  on, so that ``T // BLOCK_Q + num_seqs`` numbers are enough for every tile of every sequence (a chunk of n
  tokens needs ceil(n / BLOCK_Q) of them, and each sequence gets at least one more than its floor-share).
  A program binary-searches ``cu_seqlens_q`` for its sequence (log2(num_seqs) scalar loads) and exits at once
  if its number is one of its sequence's spare ones. Why not a host-made table of (sequence, tile) per
  program: the grid then depends only on shapes (T, num_seqs), never on values in device memory, so the
  launch needs no device-to-host copy and no per-step table upload, and the same grid replays in a CUDA graph.
  The price, at most num_seqs idle programs per kv head, is a few microseconds;
* programs are numbered kv head fastest and **late tiles first**: the last tiles of a chunk see the most keys,
  so they start first and short ones fill the tail of the schedule; the Hkv programs of a tile that run side
  by side read the same blocks, and neighbouring tiles share their prefix in L2;
* the key loop is FlashAttention's (lesson 03): online softmax in fp32 (running max ``m_i``, sum ``l_i``,
  accumulator ``acc``), ``exp2`` with the scale folded into ``qk_scale = sm_scale * log2(e)``, and the causal
  two stages: keys every row of the tile may see run without a mask, the diagonal keys with one, keys above the
  diagonal of the whole tile are never loaded. A K/V tile of ``BLOCK_N`` tokens is gathered token by token
  through the block table (block ``block_tables[s, j // P]``, row ``j % P``), so any block size P works.

Shapes: q ``[T, Hq, D]``, caches ``[N, P, Hkv, D]`` (``course_lib.serving.kv_pool``), block_tables int32
``[num_seqs, max_blocks]``, cu_seqlens_q int32 ``[num_seqs + 1]``, seq_lens int32 ``[num_seqs]``; out ``[T, Hq, D]``.
"""
from __future__ import annotations

import math

import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from kernels.device import INTERPRET
from kernels._checks import check_tensors

#: Dtypes compiled on a GPU (fp32 with exact fp32 dots); the interpreter runs float32/float16 (its bfloat16 tl.dot
#: is broken, triton #11584).
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_DTYPES = (torch.float32, torch.float16)
#: Head dims up to this one (padded to a power of two >= 16 inside the kernel); larger ones would spill registers.
MAX_HEAD_DIM = 256
#: The interpreter's launch config: small tiles keep CPU runs short (BLOCK_N < BLOCK_M on purpose, so that the
#: stage bounds are exercised with unequal tiles).
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=16)
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))


@triton.jit
def _find_seq(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence s whose tile numbers include ``tile``: the last s with cu_seqlens_q[s] // BLOCK_Q + s <= tile."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:                                   # find the first s whose first tile number is > tile
        mid = (lo + hi) // 2
        first = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _load_kv(k_cache_ptr, v_cache_ptr, table_ptr, t, hi, d, k_off, v_off,
             stride_kn, stride_kp, stride_vn, stride_vp,
             MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """K and V of tokens t [BLOCK_N] of one sequence and kv head, through its block table: [BLOCK_N, DIM_PAD] each.
    Tokens >= hi (MASKED only) and padded head dims read zeros."""
    if MASKED or DIM_PAD != HEAD_DIM:
        blocks = tl.load(table_ptr + t // BLOCK_SIZE, mask=t < hi, other=0)     # physical block of each token
        mask = (t < hi)[:, None] & (d < HEAD_DIM)[None, :]
        k_rows = blocks.to(tl.int64) * stride_kn + (t % BLOCK_SIZE) * stride_kp + k_off
        v_rows = blocks.to(tl.int64) * stride_vn + (t % BLOCK_SIZE) * stride_vp + v_off
        k = tl.load(k_cache_ptr + k_rows[:, None] + d[None, :], mask=mask, other=0.0)
        v = tl.load(v_cache_ptr + v_rows[:, None] + d[None, :], mask=mask, other=0.0)
    else:   # stage 1 with a power-of-two head dim: every load in bounds, no mask (vectorized loads)
        blocks = tl.load(table_ptr + t // BLOCK_SIZE)
        k_rows = blocks.to(tl.int64) * stride_kn + (t % BLOCK_SIZE) * stride_kp + k_off
        v_rows = blocks.to(tl.int64) * stride_vn + (t % BLOCK_SIZE) * stride_vp + v_off
        k = tl.load(k_cache_ptr + k_rows[:, None] + d[None, :])
        v = tl.load(v_cache_ptr + v_rows[:, None] + d[None, :])
    return k, v


@triton.jit
def _prefill_inner(acc, l_i, m_i, q, pos,        # running state of the tile's BLOCK_M rows, their queries, positions
                   k_cache_ptr, v_cache_ptr, table_ptr, k_off, v_off,
                   stride_kn, stride_kp, stride_vn, stride_vp,
                   lo, hi, qk_scale,               # the keys [lo, hi) of this stage; sm_scale * log2(e)
                   MASKED: tl.constexpr,           # False: every key of [lo, hi) is visible to every row
                   HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, IEEE_FP32: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, DIM_PAD)
    for start in range(lo, hi, BLOCK_N):
        t = start + offs_n                                                         # key positions [BLOCK_N]
        k, v = _load_kv(k_cache_ptr, v_cache_ptr, table_ptr, t, hi, d, k_off, v_off,
                        stride_kn, stride_kp, stride_vn, stride_vp, MASKED, HEAD_DIM, DIM_PAD, BLOCK_SIZE)
        if IEEE_FP32:                                                              # fp32 inputs: no TF32 rounding
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))                                            # [BLOCK_M, BLOCK_N] fp32
        if MASKED:   # row r sees keys t <= pos[r] (pos < hi, so keys past the stage are hidden too)
            qk = tl.where(t[None, :] <= pos[:, None], qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))                                  # finite: see the kernel
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]                                     # one fused multiply-add
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)             # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE_FP32:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)     # P rounded to V's dtype for the tensor cores, sum in fp32
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["num_seqs", "num_tiles", "min_q", "max_q"])   # one compilation for every batch
def _paged_prefill_kernel(
    q_ptr,                      # [T, Hq, D]: the query tokens of all chunks, chunk after chunk
    k_cache_ptr, v_cache_ptr,   # [N, P, Hkv, D], last dim contiguous
    out_ptr,                    # [T, Hq, D]
    block_tables_ptr,           # [num_seqs, max_blocks] int32
    cu_seqlens_q_ptr,           # [num_seqs + 1] int32: chunk s is rows cu_seqlens_q[s] ... cu_seqlens_q[s+1]-1 of q
    seq_lens_ptr,               # [num_seqs] int32: tokens of K/V of sequence s, its chunk included
    num_seqs, num_tiles, num_kv_heads,   # num_tiles: tile numbers per kv head, T // BLOCK_Q + num_seqs
    min_q, max_q,               # this launch attends the chunks of min_q ... max_q query tokens only (the others exit)
    qk_scale,                   # sm_scale * log2(e)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kn, stride_kp, stride_kh, stride_vn, stride_vp, stride_vh,
    stride_bt,
    GROUP: tl.constexpr,        # G = Hq // Hkv query heads per kv head
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,   # D, and D padded to a power of two >= 16
    BLOCK_SIZE: tl.constexpr,   # P, tokens per KV block
    BLOCK_M: tl.constexpr,      # rows of the query tile: BLOCK_Q tokens x G heads (+ padding when G ∤ BLOCK_M)
    BLOCK_Q: tl.constexpr,      # query tokens per tile, BLOCK_M // G
    BLOCK_N: tl.constexpr,      # keys per step of the loop
    IEEE_FP32: tl.constexpr,    # fp32 inputs: exact fp32 dots instead of TF32
):
    pid = tl.program_id(0)
    tile = num_tiles - 1 - pid // num_kv_heads      # late tiles first (they have the most keys to visit)
    kv_head = pid % num_kv_heads
    seq = _find_seq(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    n = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start                  # query tokens of the chunk
    i0 = (tile - q_start // BLOCK_Q - seq) * BLOCK_Q                    # its first query of this tile
    if i0 >= n or n < min_q or n > max_q:        # a spare tile number, or a chunk left to another launch
        return
    prefix = tl.load(seq_lens_ptr + seq) - n                            # tokens cached before the chunk

    # Rows of the tile: row r is query token i0 + r // G of the chunk, query head kv_head * G + r % G.
    r = tl.arange(0, BLOCK_M)
    i = i0 + r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_mask = (r < BLOCK_Q * GROUP) & (i < n)
    i_last = tl.minimum(i0 + BLOCK_Q, n) - 1                            # the tile's last real query
    pos = prefix + tl.minimum(i, i_last)                                # each row's position (padding: the last)
    d = tl.arange(0, DIM_PAD)
    io_mask = row_mask[:, None] & (d < HEAD_DIM)[None, :]
    q_rows = (q_start + i).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=io_mask, other=0.0)    # [BLOCK_M, DIM_PAD], stays put

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)         # running max of scaled scores (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                        # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)               # running sum of exp2(score - m_i) * v

    # Stage 1, keys [0, full_end): visible to every row (the first, at position prefix + i0, sees them all).
    # Stage 2, keys [full_end, diag_end): the diagonal, masked. Keys from diag_end on: hidden from all rows.
    # Every row has a visible key in stage 1 or in the first tile of stage 2 (key 0 when stage 1 is empty), so
    # m_i is finite from then on and no exp2(-inf - -inf) = NaN can happen.
    full_end = (prefix + i0 + 1) // BLOCK_N * BLOCK_N
    diag_end = prefix + i_last + 1
    table_ptr = block_tables_ptr + seq * stride_bt
    k_off, v_off = kv_head * stride_kh, kv_head * stride_vh
    acc, l_i, m_i = _prefill_inner(acc, l_i, m_i, q, pos, k_cache_ptr, v_cache_ptr, table_ptr, k_off, v_off,
                                   stride_kn, stride_kp, stride_vn, stride_vp, 0, full_end, qk_scale,
                                   False, HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N, IEEE_FP32)
    acc, l_i, m_i = _prefill_inner(acc, l_i, m_i, q, pos, k_cache_ptr, v_cache_ptr, table_ptr, k_off, v_off,
                                   stride_kn, stride_kp, stride_vn, stride_vp, full_end, diag_end, qk_scale,
                                   True, HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N, IEEE_FP32)

    acc = acc / l_i[:, None]                                           # normalize once, at the end
    o_rows = (q_start + i).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_rows[:, None] + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=io_mask)


# ---------------------------------------------------------------- host side
def prefill_config(num_tokens: int, num_seqs: int, group: int, head_dim: int,
                   dtype: torch.dtype = torch.bfloat16) -> dict:
    """The launch config for a step of ``num_tokens`` query tokens in ``num_seqs`` chunks (host ints: no sync).
    Tiles of 128 rows (tokens x G heads) for long chunks, down to 16 for short ones (speculative verify chunks,
    small tails), where a big tile would be mostly padding; smaller tiles where registers and shared memory run
    short (D > 128, fp32). Fixed, not autotuned: in a serving loop every new shape would compile and time configs
    while requests wait (see ``flash_attention.serving_config``)."""
    if INTERPRET:
        cfg = dict(INTERPRETER_CONFIG)
    else:
        rows = triton.cdiv(num_tokens, max(num_seqs, 1)) * group     # query rows of an average chunk
        block_m = 128 if rows > 64 else 64 if rows > 32 else 32 if rows > 16 else 16
        big = head_dim > 128 or dtype == torch.float32               # 4-byte elements take twice the room
        if big:
            block_m = min(block_m, 32 if head_dim > 128 and dtype == torch.float32 else 64)
        cfg = dict(BLOCK_M=block_m, BLOCK_N=32 if big else 64, num_warps=8 if block_m == 128 else 4,
                   num_stages=2 if big else 3)
    cfg["BLOCK_M"] = max(cfg["BLOCK_M"], triton.next_power_of_2(group))   # at least one query token per tile
    return cfg


def is_supported(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel runs for this dtype and head dim on this machine (compiled, or in the interpreter)."""
    return dtype in (INTERPRETER_DTYPES if INTERPRET else GPU_DTYPES) and 1 <= head_dim <= MAX_HEAD_DIM


def paged_prefill_attention_unchecked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                      seq_lens: torch.Tensor, *, sm_scale: float | None = None,
                                      out: torch.Tensor | None = None, config: dict | None = None,
                                      chunk_lens: tuple[int, int] | None = None) -> torch.Tensor:
    """``paged_prefill_attention`` without any check: the engine's hot path, which builds its inputs itself.
    Reads only shapes and strides on the host, never a value in device memory: no device-to-host sync.
    ``out`` ``[T, Hq, D]`` (any strides, last dim contiguous): written in place, e.g. a slice of the step's
    output; ``config``: ``dict(BLOCK_M=..., BLOCK_N=..., num_warps=..., num_stages=...)`` instead of
    ``prefill_config``'s. ``chunk_lens=(lo, hi)``: attend only the chunks of lo ... hi query tokens (their rows of
    ``out`` written, the others' left as they are), so that two launches with their own tile sizes can share a
    step: decodes in 16-row tiles, long chunks in 128-row ones (``course_lib.serving.full_graph``)."""
    T, Hq, D = q.shape
    Hkv, P = k_cache.shape[2], k_cache.shape[1]
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if T == 0 or num_seqs == 0:
        return out
    G = Hq // Hkv
    cfg = dict(config or prefill_config(T, num_seqs, G, D, q.dtype))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    if INTERPRET:   # the interpreter runs programs one by one: warps and stages mean nothing there
        cfg.pop("num_warps", None)
        cfg.pop("num_stages", None)
    block_q = block_m // G
    num_tiles = T // block_q + num_seqs
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    _paged_prefill_kernel[(num_tiles * Hkv,)](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens, num_seqs, num_tiles, Hkv,
        *(chunk_lens or (0, T)), scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0),
        GROUP=G, HEAD_DIM=D, DIM_PAD=max(16, triton.next_power_of_2(D)), BLOCK_SIZE=P, BLOCK_M=block_m,
        BLOCK_Q=block_q, BLOCK_N=block_n, IEEE_FP32=q.dtype == torch.float32, **cfg)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *,
                            sm_scale: float | None = None) -> torch.Tensor:
    """Causal attention of every prefill chunk of a step over its sequence's paged K/V, in one launch: ``[T, Hq, D]``.

    q ``[T, Hq, D]``: the chunks' query tokens, chunk after chunk; k_cache, v_cache ``[N, P, Hkv, D]`` with
    Hq % Hkv == 0 (the chunks' own K/V already stored); block_tables int32 ``[num_seqs, max_blocks]``;
    cu_seqlens_q int32 ``[num_seqs + 1]``: chunk s is ``q[cu_seqlens_q[s] : cu_seqlens_q[s+1]]`` (0 at the start,
    T at the end, non-decreasing); seq_lens int32 ``[num_seqs]``: K/V tokens of sequence s including its chunk
    (query i of a chunk of n sits at position seq_lens[s] - n + i and sees the keys up to there).
    sm_scale defaults to 1/sqrt(D). dtypes: float16/bfloat16/float32 compiled on a GPU, float32/float16 in the
    interpreter; any D up to 256. Raises ValueError, naming the argument, on wrong inputs; these checks read the
    lengths and block ids on the host (a sync): ``paged_prefill_attention_unchecked`` skips them.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, sm_scale)
    _check_values(q, k_cache, block_tables, cu_seqlens_q, seq_lens)
    return paged_prefill_attention_unchecked(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                             sm_scale=sm_scale)


def _check_inputs(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, sm_scale) -> None:
    """Types, devices, shapes, dtypes and strides: no value is read."""
    check_tensors([("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                   ("cu_seqlens_q", cu_seqlens_q), ("seq_lens", seq_lens)], same_device_as="q")
    if q.dim() != 3:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [T, Hq, D] (the chunks' tokens, flattened)")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)}; expected [num_blocks, block_size, Hkv, D]")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}; expected the shape of k_cache, "
                         f"{tuple(k_cache.shape)}")
    T, Hq, D = q.shape
    N, P, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"k_cache has head_dim {Dk} (shape {tuple(k_cache.shape)}); expected q's head_dim D={D}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim D={D}; expected 1 ... {MAX_HEAD_DIM}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a multiple of k_cache's {Hkv} kv heads (GQA needs Hq % Hkv == 0)")
    allowed = INTERPRETER_DTYPES if INTERPRET else GPU_DTYPES
    if q.dtype not in allowed:
        why = (" (the Triton interpreter's bfloat16 tl.dot returns garbage, triton issue 11584: on CPU use float16 "
               "or float32)" if INTERPRET and q.dtype == torch.bfloat16 else "")
        raise ValueError(f"q has dtype {q.dtype}; expected one of {', '.join(map(str, allowed))}{why}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}; expected the dtype of q, {q.dtype}")
        if t.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in its last (head_dim) dimension")
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables has shape {tuple(block_tables.shape)}; expected [num_seqs, max_blocks]")
    num_seqs = block_tables.shape[0]
    for name, t, shape in (("block_tables", block_tables, None), ("cu_seqlens_q", cu_seqlens_q, (num_seqs + 1,)),
                           ("seq_lens", seq_lens, (num_seqs,))):
        if shape is not None and tuple(t.shape) != shape:
            what = "num_seqs + 1" if name == "cu_seqlens_q" else "num_seqs"
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{what} = {shape[0]}] (num_seqs = "
                             f"{num_seqs}: the rows of block_tables)")
        if t.dtype != torch.int32:
            raise ValueError(f"{name} has dtype {t.dtype}; expected torch.int32")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a positive finite number or None, got {sm_scale!r}")


def _check_values(q, k_cache, block_tables, cu_seqlens_q, seq_lens) -> None:
    """The lengths and the block ids the kernel will read (copied to the host: a sync)."""
    T = q.shape[0]
    N, P = k_cache.shape[:2]
    num_seqs, max_blocks = block_tables.shape
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    if cu[0] != 0 or cu[-1] != T:
        raise ValueError(f"cu_seqlens_q runs from {cu[0]} to {cu[-1]}; expected from 0 to T = {T} (q's tokens)")
    for s in range(num_seqs):
        n, L = cu[s + 1] - cu[s], lens[s]
        if n < 0:
            raise ValueError(f"cu_seqlens_q must be non-decreasing; it goes from {cu[s]} down to {cu[s + 1]} "
                             f"at index {s + 1}")
        if L < n:
            raise ValueError(f"seq_lens[{s}] = {L} is shorter than sequence {s}'s chunk of {n} query tokens; seq_lens "
                             "counts the cached prefix plus the chunk")
        if L > max_blocks * P:
            raise ValueError(f"seq_lens[{s}] = {L} tokens is longer than block_tables can address: "
                             f"{max_blocks} blocks x block_size {P} = {max_blocks * P} tokens")
    used = torch.arange(max_blocks, device=seq_lens.device)[None, :] * P < seq_lens[:, None]   # [num_seqs, max_blocks]
    bad = used & ((block_tables < 0) | (block_tables >= N))
    if bad.any():
        s, j = bad.nonzero()[0].tolist()
        raise ValueError(f"block_tables[{s}, {j}] = {int(block_tables[s, j])} is not a block of the cache: expected "
                         f"0 <= id < num_blocks = {N} (k_cache's first dimension) for the blocks of seq_lens[{s}] "
                         "tokens")
