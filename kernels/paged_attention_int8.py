"""Paged decode attention over an 8-bit KV cache, dequantizing on the fly (lesson 07).

The same kernel as lesson 02's ``kernels.paged_attention`` — one program per (sequence, kv head, split), all
``G = Hq / Hkv`` query heads of a kv head at once, tiles of ``BLOCK_N`` tokens gathered through the block table,
online softmax, split-K with a log-sum-exp merge — except that each tile arrives as **one-byte codes** plus one
scale per (token, kv head) (``kernels.store_kv_int8`` wrote them). Decode is memory-bound, so half the bytes
could mean about half the time — if the dequantization costs (almost) nothing. Four tricks keep it cheap:

* **scales are folded into the math, not into the tile.** With k_t ≈ c_t · s_t (c: codes, s: scale of token t)
  the scores are ``q · k_t = s_t · (q · c_t)``: dots on the raw codes, then one multiply per *score* instead of
  one per element. The same for V: ``Σ_t p_t v_t = Σ_t (p_t s_t) c_t``: scale the probabilities.
  A zero point z_t adds ``z_t · Σ_d q_d`` to each score and ``Σ_t p_t z_t`` to each output row.
* **codes read as 32-bit words**, 4 codes per load element, unpacked in registers; for INT8 with fp16 queries
  by 5 PTX instructions per word (``_int8x4_to_fp16_asm``: the fp16 number with bits ``0x6400 | (c + 128)`` is
  exactly ``1024 + c + 128``, so no int-to-float converter is needed).
* **byte planes instead of re-interleaving.** Byte j of word w is channel 4w + j. Putting the 4 unpacked planes
  back into one ``[BLOCK_N, D]`` tile (join + reshape) is a shuffle through shared memory; instead the *dots*
  are split by plane: ``q · c_t = Σ_j q[j::4] · plane_j`` (q loaded as 4 strided planes) and the output channels
  ``4w + j`` are accumulated plane by plane, ``acc_j += p · plane_j``. Same FLOPs, no shuffle.
* **software prefetch**: the words of tile i+1 are loaded before tile i is computed (and the block-table entries
  of tile i+2 before that: the words' addresses depend on them), so every program keeps loads in flight while it
  computes; with 2 warps per program, more programs fit on an SM.

Codes are exact small integers in fp16 / bf16 / fp32 (FP8 codes too), so the only error is the quantization's.

Recorded by ``benchmarks/kv_quant.py`` (B = 32/64, contexts 8k-32k, 2026-11-28): 0.56-0.58x the FP16 kernel's time
on an H100, 0.74-0.76x on an H200, whose faster HBM leaves the per-byte instructions exposed: the 8-bit data moves
at 2.5-2.7 TB/s (H100) and 2.8-3.1 TB/s (H200), where the FP16 kernel reads 2.9-3.0 and 4.2-4.45. What did not help
(``benchmarks/int8_kernel_sweep.py``, results in ``benchmarks/results/int8_*_sweep_*.json``): one ``[BLOCK_N, D]``
int8 tile per load with Triton's pipelining (0.84-1.5x), K through int8 tensor-core dots with a quantized q, fewer
registers for more programs per SM, L2 prefetches further ahead. What did: choosing split-K so that the programs
fill whole waves (``RESIDENT_PER_SM``). Where the instructions go (compiled for sm_90 on a CPU,
``benchmarks/int8_kernel_resources.py``, 2026-12-08): per KB of cache the token loop executes 1.75x the FP16
kernel's warp instructions, about half of them unpacking codes; ``CONFIG``'s switches ``K_INT8_DOT`` and ``BIASED``
(off) are the two cuts tried since, not yet timed on a GPU.
"""
from __future__ import annotations

import math

import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from kernels.device import INTERPRET
from kernels._checks import check_block_tables, check_sm_scale, check_tensors
from kernels.paged_attention import plan_splits, run_split_k
from kernels.store_kv_int8 import fp8_supported, validate_8bit_cache

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Tile and launch parameters. ASM: unpack INT8 words to fp16 with 5 PTX instructions per word (compiled only; the
#: interpreter uses the same math in Triton ops); FAST_I2F: the fp16 bit trick. The fastest of 34 configurations
#: timed on an H200 (B = 8-64, contexts 8k-32k; 2 warps beat 4 and 8, BLOCK_N 64 beat 32 and 128).
#: K_INT8_DOT (INT8 codes only; off: it changes the numbers): the scores through int8 x int8 dots on K's byte planes
#: with q rounded to int8 per head (scale amax / 127), so K's codes are never converted; exact for that rounded q
#: (``kernels.reference.round_query_int8``). Written after the one-tile version of that idea lost
#: (``benchmarks/int8_kernel_sweep.py``); not yet timed on a GPU.
#: BIASED (FAST_I2F only; off until timed): leave the codes as the fp16 numbers 1152 + c (the bit trick without its
#: subtraction: 3 PTX instructions per word instead of 5) and remove the bias from the sums instead, once per
#: score (1152 * sum(q)) and once per output row (1152 * sum_t p_t s_t, kept like l_i).
CONFIG = dict(BLOCK_N=64, num_warps=2, num_stages=1, ASM=True, FAST_I2F=True, K_INT8_DOT=False, BIASED=False)
#: Programs of this kernel that fit on one SM at once: its registers decide (~241 per thread at CONFIG, 2 warps:
#: 4 programs, from Nsight Compute on an H200). Split-K chooses the fewest splits that fill whole waves of
#: 4 x num_sms programs (``choose_num_splits_in_waves``); giving the kernel fewer registers (maxnreg 128/168,
#: 4 warps, no V prefetch) for more programs per SM made it slower (``int8_regs_sweep_nvidia-h200_2026-11-28.json``).
RESIDENT_PER_SM = 4


def _unpack_ptx(subtract: bool) -> str:
    """The PTX of ``_int8x4_to_fp16_asm``: one xor flips the 4 sign bits, two byte-permutes build the halves
    0x64|byte (the fp16 numbers 1152 + c), and with ``subtract`` two packed subtractions remove the 1152."""
    sub = "sub.f16x2 lo, lo, m;\nsub.f16x2 hi, hi, m;\n" if subtract else ""
    return ("{\n.reg .b32 t, lo, hi, m;\nmov.b32 m, 0x64806480;\nxor.b32 t, $4, 0x80808080;\n"
            "prmt.b32 lo, t, 0x64646464, 0x5140;\nprmt.b32 hi, t, 0x64646464, 0x7362;\n" + sub
            + "mov.b32 {$0, $1}, lo;\nmov.b32 {$2, $3}, hi;\n}")


_UNPACK_PTX = tl.constexpr(_unpack_ptx(subtract=True))
_UNPACK_BIASED_PTX = tl.constexpr(_unpack_ptx(subtract=False))


@triton.jit
def _int8x4_to_fp16_asm(w, BIASED: tl.constexpr):
    """4 INT8 codes packed in one int32 -> 4 exact fp16 values, in 5 instructions (the fp16 trick below, done on
    all four bytes at once), or with BIASED the 4 numbers 1152 + c in 3 (the kernel removes the 1152 from its
    sums). Only for compiled kernels: the interpreter cannot run PTX."""
    if BIASED:
        asm: tl.constexpr = _UNPACK_BIASED_PTX
    else:
        asm: tl.constexpr = _UNPACK_PTX
    return tl.inline_asm_elementwise(
        asm=asm, constraints="=h,=h,=h,=h,r", args=[w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
        is_pure=True, pack=1)


@triton.jit
def _byte_of(w, j: tl.constexpr, DOT_TY: tl.constexpr, IS_FP8: tl.constexpr, FAST_I2F: tl.constexpr,
             BIASED: tl.constexpr):
    """Code j (0..3, little-endian) of each int32 word, as an exact value in DOT_TY (BIASED: 1152 + code)."""
    if IS_FP8:
        return ((w >> (8 * j)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(DOT_TY)
    elif FAST_I2F:   # the fp16 trick: bits 0x6400 | (c + 128), and (byte & 0xFF) ^ 0x6480 builds them in one step
        x = (((w >> (8 * j)) & 0xFF) ^ 0x6480).to(tl.int16).to(tl.float16, bitcast=True)   # 1152 + c
        if BIASED:
            return x
        else:
            return x - 1152.0
    else:            # sign-extend byte j: shift it to the top, arithmetic shift back
        return ((w << (24 - 8 * j)) >> 24).to(DOT_TY)


@triton.jit
def _planes(w, DOT_TY: tl.constexpr, IS_FP8: tl.constexpr, FAST_I2F: tl.constexpr, ASM: tl.constexpr,
            BIASED: tl.constexpr):
    """A [BLOCK_N, W] tile of int32 words (4 codes each) -> its 4 byte planes [BLOCK_N, W] in DOT_TY: plane j holds
    channels j, 4 + j, 8 + j, ... (byte j of every word)."""
    if ASM:
        a, b, c, d = _int8x4_to_fp16_asm(w, BIASED)
    else:
        a = _byte_of(w, 0, DOT_TY, IS_FP8, FAST_I2F, BIASED)
        b = _byte_of(w, 1, DOT_TY, IS_FP8, FAST_I2F, BIASED)
        c = _byte_of(w, 2, DOT_TY, IS_FP8, FAST_I2F, BIASED)
        d = _byte_of(w, 3, DOT_TY, IS_FP8, FAST_I2F, BIASED)
    return a, b, c, d


@triton.jit
def _int8_planes(w):
    """A [BLOCK_N, W] tile of int32 words -> its 4 byte planes as int8 (the codes themselves: no conversion, a
    shift and a truncation each), for int8 x int8 dots."""
    return w.to(tl.int8), (w >> 8).to(tl.int8), (w >> 16).to(tl.int8), (w >> 24).to(tl.int8)


@triton.jit
def _round_int8(x, scale):
    """x [G, W] / scale [G] rounded half up to int8 (|x| <= 127 * scale)."""
    return tl.floor(x.to(tl.float32) / scale[:, None] + 0.5).to(tl.int8)


@triton.jit
def _dot(a, b, acc, IEEE_FP32: tl.constexpr):
    if IEEE_FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _rows(block_tables_ptr, seq, stride_bt, t, end, BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, kv_head):
    """Row of [N*P*Hkv, .] of the tokens t of this sequence and kv head, through the block table."""
    block_ids = tl.load(block_tables_ptr + seq * stride_bt + t // BLOCK_SIZE, mask=t < end, other=0)
    return (block_ids.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE) * NUM_KV_HEADS + kv_head


@triton.jit
def _paged_attention_int8_kernel(
    q_ptr,                          # [B, Hq, D]
    k_cache_ptr, v_cache_ptr,       # [N, P, Hkv, D // 4] int32 words: the [N, P, Hkv, D] 8-bit codes, 4 per word
    k_scale_ptr, v_scale_ptr,       # [N, P, Hkv] fp16 / fp32, contiguous
    k_zero_ptr, v_zero_ptr,         # [N, P, Hkv] zero points (HAS_ZERO only)
    block_tables_ptr,               # [B, max_blocks] int32
    context_lens_ptr,               # [B] int32
    out_ptr,                        # [B, Hq, D] (unsplit) or partial results [B, Hq, splits, D] float32 (split)
    lse_ptr,                        # [B, Hq, splits] float32 log2-sum-exp of each split (split only)
    sm_scale_log2e,                 # sm_scale * log2(e): exp2 is what the hardware computes
    tokens_per_split,
    stride_qb, stride_qh, stride_bt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    NUM_KV_HEADS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,   # G = Hq // Hkv
    GROUP_PAD: tl.constexpr,        # G padded to >= 16 (the smallest tl.dot on a GPU)
    HEAD_DIM: tl.constexpr,
    WORDS_PAD: tl.constexpr,        # D / 4 words per row, padded to a power of 2 >= 16 (tl.dot's smallest size)
    BLOCK_SIZE: tl.constexpr,       # P, tokens per KV block
    BLOCK_N: tl.constexpr,          # tokens per tile
    SPLIT: tl.constexpr,            # write partial results + lse (True) or the final output (False)
    HAS_ZERO: tl.constexpr,         # asymmetric codes: x = c * s + z
    IS_FP8: tl.constexpr,           # codes are float8_e4m3fn
    FAST_I2F: tl.constexpr,         # INT8 codes and fp16 queries: the bit-trick conversion
    ASM: tl.constexpr,              # FAST_I2F, compiled: the 5-instruction PTX unpacking
    IEEE_FP32: tl.constexpr,        # fp32 queries: exact fp32 dots instead of TF32
    K_INT8_DOT: tl.constexpr,       # INT8 codes: scores by int8 dots, q rounded to int8 per head (CONFIG)
    BIASED: tl.constexpr,           # FAST_I2F: codes as 1152 + c, the bias removed from the sums (CONFIG)
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(context_len, start + tokens_per_split)
    DOT_TY: tl.constexpr = q_ptr.dtype.element_ty
    W: tl.constexpr = HEAD_DIM // 4                                 # words per row

    g = tl.arange(0, GROUP_PAD)
    w = tl.arange(0, WORDS_PAD)
    n = tl.arange(0, BLOCK_N)
    q_heads = kv_head * QUERIES_PER_KV + g
    g_mask = g < QUERIES_PER_KV
    gw_mask = g_mask[:, None] & (w < W)[None, :]
    # q as 4 byte planes, like the codes: plane j = channels j, 4 + j, ... (q[:, j::4])
    q_row = q_ptr + seq * stride_qb + q_heads[:, None] * stride_qh + 4 * w[None, :]
    q0 = tl.load(q_row + 0, mask=gw_mask, other=0.0)                                   # [G, W] each
    q1 = tl.load(q_row + 1, mask=gw_mask, other=0.0)
    q2 = tl.load(q_row + 2, mask=gw_mask, other=0.0)
    q3 = tl.load(q_row + 3, mask=gw_mask, other=0.0)
    if K_INT8_DOT:   # q rounded to int8 per head: q ~ q_scale * q8 (the scores' dots then run on int8 codes only)
        q_amax = tl.max(tl.maximum(tl.maximum(tl.abs(q0.to(tl.float32)), tl.abs(q1.to(tl.float32))),
                                   tl.maximum(tl.abs(q2.to(tl.float32)), tl.abs(q3.to(tl.float32)))), axis=1)
        q_scale = tl.where(q_amax > 0, q_amax / 127.0, 1.0)                                # [G]
        q0 = _round_int8(q0, q_scale)
        q1 = _round_int8(q1, q_scale)
        q2 = _round_int8(q2, q_scale)
        q3 = _round_int8(q3, q_scale)
    if HAS_ZERO:
        q_sum = tl.sum(q0.to(tl.float32) + q1.to(tl.float32) + q2.to(tl.float32) + q3.to(tl.float32), axis=1)  # [G]
        if K_INT8_DOT:
            q_sum = q_sum * q_scale
    if BIASED and not K_INT8_DOT:   # the keys arrive as 1152 + c: each score carries 1152 * sum(q)
        q_bias = 1152.0 * tl.sum(q0.to(tl.float32) + q1.to(tl.float32) + q2.to(tl.float32) + q3.to(tl.float32), axis=1)

    m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")   # running max of the scores (log2 units)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)                  # running sum of exp2(score - m_i)
    acc0 = tl.zeros([GROUP_PAD, WORDS_PAD], dtype=tl.float32)      # running sum of exp2(score - m_i) * v, by plane
    acc1 = tl.zeros([GROUP_PAD, WORDS_PAD], dtype=tl.float32)
    acc2 = tl.zeros([GROUP_PAD, WORDS_PAD], dtype=tl.float32)
    acc3 = tl.zeros([GROUP_PAD, WORDS_PAD], dtype=tl.float32)
    v_bias = tl.zeros([GROUP_PAD], dtype=tl.float32)               # BIASED: running sum of p_t * s_t (each acc's 1152x)
    # software prefetch: the first tile's words, and the rows of the second
    t = start + n
    row = _rows(block_tables_ptr, seq, stride_bt, t, end, BLOCK_SIZE, NUM_KV_HEADS, kv_head)
    row_next = _rows(block_tables_ptr, seq, stride_bt, t + BLOCK_N, end, BLOCK_SIZE, NUM_KV_HEADS, kv_head)
    tw_mask = (t < end)[:, None] & (w < W)[None, :]
    k_words = tl.load(k_cache_ptr + row[:, None] * W + w[None, :], mask=tw_mask, other=0)          # [BLOCK_N, W]
    v_words = tl.load(v_cache_ptr + row[:, None] * W + w[None, :], mask=tw_mask, other=0)
    k_scale = tl.load(k_scale_ptr + row, mask=t < end, other=0.0)                                  # [BLOCK_N]
    v_scale = tl.load(v_scale_ptr + row, mask=t < end, other=0.0)
    for tile_start in range(start, end, BLOCK_N):
        t = tile_start + n                                          # logical token positions of this tile
        t_mask = t < end
        # ---- issue the loads of the next tile first (rows known since the last iteration), then its successor's rows
        tn = t + BLOCK_N
        tn_mask = (tn < end)[:, None] & (w < W)[None, :]
        k_words_next = tl.load(k_cache_ptr + row_next[:, None] * W + w[None, :], mask=tn_mask, other=0)
        v_words_next = tl.load(v_cache_ptr + row_next[:, None] * W + w[None, :], mask=tn_mask, other=0)
        k_scale_next = tl.load(k_scale_ptr + row_next, mask=tn < end, other=0.0)
        v_scale_next = tl.load(v_scale_ptr + row_next, mask=tn < end, other=0.0)
        row_after = _rows(block_tables_ptr, seq, stride_bt, tn + BLOCK_N, end, BLOCK_SIZE, NUM_KV_HEADS, kv_head)
        # ---- scores: s_t * sum_j (q plane j . c_t plane j) (+ z_t * sum(q))
        if K_INT8_DOT:   # s_t * q_scale * sum_j (q8 plane j . c_t plane j): int8 dots, exact int32 sums
            k0, k1, k2, k3 = _int8_planes(k_words)                                         # [BLOCK_N, W] each
            si = tl.zeros([GROUP_PAD, BLOCK_N], dtype=tl.int32)
            si = tl.dot(q0, tl.trans(k0), si, out_dtype=tl.int32)
            si = tl.dot(q1, tl.trans(k1), si, out_dtype=tl.int32)
            si = tl.dot(q2, tl.trans(k2), si, out_dtype=tl.int32)
            si = tl.dot(q3, tl.trans(k3), si, out_dtype=tl.int32)
            s = si.to(tl.float32) * q_scale[:, None]
        else:
            k0, k1, k2, k3 = _planes(k_words, DOT_TY, IS_FP8, FAST_I2F, ASM, BIASED)      # [BLOCK_N, W] each
            s = tl.zeros([GROUP_PAD, BLOCK_N], dtype=tl.float32)
            s = _dot(q0, tl.trans(k0), s, IEEE_FP32)
            s = _dot(q1, tl.trans(k1), s, IEEE_FP32)
            s = _dot(q2, tl.trans(k2), s, IEEE_FP32)
            s = _dot(q3, tl.trans(k3), s, IEEE_FP32)                                      # [G, BLOCK_N]
            if BIASED:
                s -= q_bias[:, None]
        s = s * (k_scale.to(tl.float32) * sm_scale_log2e)[None, :]     # one multiply per score: both scales
        if HAS_ZERO:
            s += q_sum[:, None] * (tl.load(k_zero_ptr + row, mask=t_mask, other=0.0).to(tl.float32)
                                   * sm_scale_log2e)[None, :]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))   # finite: every tile has >= 1 valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # ---- values: plane j of the output += sum_t (p_t * s_t) c_t plane j (+ sum_t p_t z_t)
        v0, v1, v2, v3 = _planes(v_words, DOT_TY, IS_FP8, FAST_I2F, ASM, BIASED)
        pv = (p * v_scale.to(tl.float32)[None, :]).to(DOT_TY)
        acc0 = _dot(pv, v0, acc0 * alpha[:, None], IEEE_FP32)
        acc1 = _dot(pv, v1, acc1 * alpha[:, None], IEEE_FP32)
        acc2 = _dot(pv, v2, acc2 * alpha[:, None], IEEE_FP32)
        acc3 = _dot(pv, v3, acc3 * alpha[:, None], IEEE_FP32)
        if BIASED:   # the values arrived as 1152 + c: each output row carries 1152 * sum_t (p_t * s_t)
            v_bias = v_bias * alpha + tl.sum(pv.to(tl.float32), axis=1)
        if HAS_ZERO:
            pz = tl.sum(p * tl.load(v_zero_ptr + row, mask=t_mask, other=0.0).to(tl.float32)[None, :], axis=1)[:, None]
            acc0 += pz
            acc1 += pz
            acc2 += pz
            acc3 += pz
        m_i = m_new
        k_words, v_words, k_scale, v_scale = k_words_next, v_words_next, k_scale_next, v_scale_next
        row, row_next = row_next, row_after

    l_safe = tl.where(l_i > 0, l_i, 1.0)   # an empty range (context 0, or a split past the end): output 0
    if BIASED:
        acc0 -= 1152.0 * v_bias[:, None]
        acc1 -= 1152.0 * v_bias[:, None]
        acc2 -= 1152.0 * v_bias[:, None]
        acc3 -= 1152.0 * v_bias[:, None]
    o_row = out_ptr + seq * stride_ob + q_heads[:, None] * stride_oh + split * stride_os + 4 * w[None, :]
    o_ty = out_ptr.dtype.element_ty
    tl.store(o_row + 0, (acc0 / l_safe[:, None]).to(o_ty), mask=gw_mask)               # channels 0, 4, 8, ...
    tl.store(o_row + 1, (acc1 / l_safe[:, None]).to(o_ty), mask=gw_mask)
    tl.store(o_row + 2, (acc2 / l_safe[:, None]).to(o_ty), mask=gw_mask)
    tl.store(o_row + 3, (acc3 / l_safe[:, None]).to(o_ty), mask=gw_mask)
    if SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + seq * stride_lb + q_heads * stride_lh + split, lse, mask=g_mask)


def _check_config(config: dict | None) -> dict:
    """CONFIG with the keys of config overriding it; ValueError naming a key CONFIG does not have or a bad value."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(CONFIG))
    if unknown:
        raise ValueError(f"config has unknown key(s) {unknown}; expected keys of CONFIG: {sorted(CONFIG)}")
    cfg = {**CONFIG, **config}
    if cfg["BLOCK_N"] not in (16, 32, 64, 128, 256):
        raise ValueError(f"config BLOCK_N is {cfg['BLOCK_N']!r}; expected a power of 2 from 16 to 256")
    if cfg["num_warps"] not in (1, 2, 4, 8) or cfg["num_stages"] not in (1, 2, 3, 4):
        raise ValueError(f"config num_warps {cfg['num_warps']!r} / num_stages {cfg['num_stages']!r}: expected "
                         "1, 2, 4 or 8 warps and 1 to 4 stages")
    return cfg


def _validate(q, k_cache, v_cache, k_scale, v_scale, k_zero, v_zero, block_tables, context_lens) -> None:
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_scale", k_scale), ("v_scale", v_scale),
             ("block_tables", block_tables), ("context_lens", context_lens)]
    named += [(n, t) for n, t in (("k_zero", k_zero), ("v_zero", v_zero)) if t is not None]
    check_tensors(named, same_device_as="q")
    if q.dim() != 3:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [B, Hq, D] (one query token per sequence)")
    validate_8bit_cache(k_cache, v_cache, k_scale, v_scale, k_zero, v_zero)
    B, Hq, D = q.shape
    N, P, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"k_cache has head_dim {Dk} (shape {tuple(k_cache.shape)}); expected q's head_dim D={D}")
    if Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a multiple of k_cache's {Hkv} kv heads (GQA needs Hq % Hkv == 0)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; expected one of {', '.join(map(str, SUPPORTED_DTYPES))}")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in its last (head_dim) dimension")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (slot s, head h starts at (s * Hkv + h) * D)")
    if D % 4:
        raise ValueError(f"q has head_dim {D}; the kernel reads codes as 32-bit words of 4, so D must be a multiple "
                         "of 4")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % 4:
            raise ValueError(f"{name} does not start at a 4-byte boundary (the kernel reads codes as 32-bit words): "
                             "pass the whole cache tensor, not a view that starts mid-word")
    if k_cache.dtype == torch.float8_e4m3fn and not INTERPRET and not fp8_supported()[0]:
        raise ValueError(f"k_cache has dtype torch.float8_e4m3fn: {fp8_supported()[1]}")
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


def paged_attention_int8_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                k_scale: torch.Tensor, v_scale: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, *, k_zero: torch.Tensor | None = None,
                                v_zero: torch.Tensor | None = None, sm_scale: float | None = None,
                                num_splits: int | None = None, max_context_len: int | None = None,
                                validate: bool = True, config: dict | None = None) -> torch.Tensor:
    """Decode attention through block tables over 8-bit K/V: ``[B, Hq, D]``, in q's dtype.

    As ``kernels.paged_attention_decode`` (q ``[B, Hq, D]``; block_tables int32 ``[B, max_blocks]``;
    context_lens int32 ``[B]``; sm_scale, num_splits, max_context_len, validate), with k_cache, v_cache
    ``[N, P, Hkv, D]`` torch.int8 or torch.float8_e4m3fn codes and k_scale, v_scale ``[N, P, Hkv]`` (k_zero, v_zero
    for asymmetric INT8) as written by ``kernels.store_kv_int8``: key t of kv head h is
    ``k_cache[..] * k_scale[..] (+ k_zero[..])``. config: keys of ``CONFIG`` to override (benchmarks' sweeps).
    Raises ValueError, naming the argument (and the entry: a block id outside the cache, unless ``validate=False``),
    on wrong inputs.
    """
    cfg = _check_config(config)
    _validate(q, k_cache, v_cache, k_scale, v_scale, k_zero, v_zero, block_tables, context_lens)
    check_sm_scale(sm_scale)
    B, Hq, D = q.shape
    N, P, Hkv, _ = k_cache.shape
    if validate:   # block ids inside [0, N), lengths the tables can address (one device-to-host copy)
        max_context_len = check_block_tables(block_tables, context_lens, N, P, max_context_len)
    max_context_len, num_splits, tokens_per_split = plan_splits(q, block_tables, context_lens, P, Hkv, num_splits,
                                                                max_context_len, cfg["BLOCK_N"],
                                                                resident_per_sm=RESIDENT_PER_SM)
    scale = (1.0 / math.sqrt(D) if sm_scale is None else sm_scale) * math.log2(math.e)
    G = Hq // Hkv
    has_zero = k_zero is not None
    zeros = (k_zero, v_zero) if has_zero else (k_scale, v_scale)   # unused pointers when symmetric
    fast = bool(cfg["FAST_I2F"]) and k_cache.dtype == torch.int8 and q.dtype == torch.float16
    k8 = bool(cfg["K_INT8_DOT"]) and k_cache.dtype == torch.int8
    biased = fast and bool(cfg["BIASED"])
    meta = dict(NUM_KV_HEADS=Hkv, QUERIES_PER_KV=G, GROUP_PAD=max(16, triton.next_power_of_2(G)), HEAD_DIM=D,
                WORDS_PAD=max(16, triton.next_power_of_2(D // 4)), BLOCK_SIZE=P, BLOCK_N=cfg["BLOCK_N"],
                HAS_ZERO=has_zero, IS_FP8=k_cache.dtype == torch.float8_e4m3fn, FAST_I2F=fast,
                ASM=fast and bool(cfg["ASM"]) and not INTERPRET,
                IEEE_FP32=q.dtype == torch.float32, K_INT8_DOT=k8, BIASED=biased,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    words = (k_cache.view(torch.int32), v_cache.view(torch.int32))   # the same bytes: [N, P, Hkv, D // 4]
    return run_split_k(_paged_attention_int8_kernel, q, Hkv, num_splits,
                       (q, *words, k_scale, v_scale, *zeros, block_tables, context_lens),
                       (scale, tokens_per_split, q.stride(0), q.stride(1), block_tables.stride(0)), meta)
