"""Paged decode attention over an 8-bit KV cache, dequantizing on the fly (lesson 07).

The same kernel as lesson 02's ``kernels.paged_attention`` — one program per (sequence, kv head, split), all
``G = Hq / Hkv`` query heads of a kv head at once, tiles of ``BLOCK_N`` tokens gathered through the block table,
online softmax, split-K with a log-sum-exp merge — except that each tile arrives as **one-byte codes** plus one
scale per (token, kv head) (``kernels.store_kv_int8`` wrote them). Decode is memory-bound, so half the bytes
could mean about half the time — if the dequantization costs (almost) nothing. Three tricks keep it cheap:

* **scales are folded into the math, not into the tile.** With k_t ≈ c_t · s_t (c: codes, s: scale of token t)
  the scores are ``q · k_t = s_t · (q · c_t)``: one ``tl.dot`` on the raw codes, then one multiply per *score*
  instead of one per element. The same for V: ``Σ_t p_t v_t = Σ_t (p_t s_t) c_t``: scale the probabilities.
  A zero point z_t adds ``z_t · Σ_d q_d`` to each score and ``Σ_t p_t z_t`` to each output row.
* **INT8 -> fp16 without the int-to-float converter** (``FAST_I2F``): the fp16 number with bits
  ``0x6400 | (c + 128)`` is exactly ``1024 + c + 128``, so ``bitcast(int16(c) + 0x6480) - 1152 == c`` with two
  cheap integer/fp16 ops, instead of the I2F instruction, which runs at a quarter of the fp16 rate on recent GPUs
  and would otherwise compete with the memory system for the time budget.
* **codes read as 32-bit words** (``WORDS``): 4 codes per load element, unpacked in registers (``ASM``: 5 PTX
  instructions per word) and re-assembled with ``tl.join`` / ``tl.reshape``. Read as bytes and converted
  elementwise, the compiler stages the *bytes* in shared memory and fetches every element into the tensor cores'
  operand layout with its own scalar load (no ``ldmatrix`` for 8-bit transposes): that version took 1.1-1.2x the
  FP16 time on an H200. With words, K goes from shared memory to the tensor cores 32 bits at a time, and V is
  converted once and staged as fp16 for ``ldmatrix``.

Codes are exact small integers in fp16 / bf16 / fp32 (FP8 codes too), so the only error is the quantization's.

Measured on an H200 (``benchmarks/results/kv_quant_nvidia-h200.json``, B = 32/64, contexts 1k-32k): 0.82-1.05x the
FP16 time — faster at short contexts, about equal at >= 8k, still far from the byte ratio (0.51). The 8-bit data
moves at ~2.2 TB/s where the FP16 kernel reads 4.4 TB/s: per byte, the unpacking, the second shared-memory pass for
V and the per-tile work (block table, softmax) cost more instructions than the memory system's time. Lesson 07
discusses it.
"""
from __future__ import annotations

import math

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from course_lib.device import INTERPRET
from kernels.paged_attention import _merge_splits_kernel, plan_splits
from kernels.store_kv_int8 import fp8_supported, validate_8bit_cache

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Tile and launch parameters. WORDS: read the codes as 32-bit words, 4 codes each (below); ASM: unpack INT8 words
#: to fp16 with 5 PTX instructions per word (compiled only; the interpreter uses the same math in Triton ops);
#: FAST_I2F: the fp16 bit trick (both paths). The fastest of 7 configurations checked and timed on an H200 at
#: batch 32 x 8k (benchmarks/kv_quant.py): 245 us; BLOCK_N 128: 278 us; bytes instead of words: 296 us.
CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=3, WORDS=True, ASM=True, FAST_I2F=True)


@triton.jit
def _load_codes(ptrs, mask, DOT_TY: tl.constexpr, FAST_I2F: tl.constexpr):
    """A tile of 8-bit codes, as exact integers (INT8) or exact fp8 values, in the dot's dtype."""
    c = tl.load(ptrs, mask=mask, other=0.0)
    if FAST_I2F:   # int8 -> fp16: bits 0x6400 | (c + 128) are the fp16 number 1024 + c + 128
        return (c.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
    else:
        return c.to(DOT_TY)


@triton.jit
def _int8x4_to_fp16_asm(w):
    """4 INT8 codes packed in one int32 -> 4 exact fp16 values, in 5 instructions (the fp16 trick below, done on
    all four bytes at once: one xor flips the 4 sign bits, two byte-permutes build the halves 0x64|byte, two
    packed subtractions remove 1152). Only for compiled kernels: the interpreter cannot run PTX."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, lo, hi, m;
        mov.b32 m, 0x64806480;
        xor.b32 t, $4, 0x80808080;
        prmt.b32 lo, t, 0x64646464, 0x5140;
        prmt.b32 hi, t, 0x64646464, 0x7362;
        sub.f16x2 lo, lo, m;
        sub.f16x2 hi, hi, m;
        mov.b32 {$0, $1}, lo;
        mov.b32 {$2, $3}, hi;
        }""",
        constraints="=h,=h,=h,=h,r", args=[w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
        is_pure=True, pack=1)


@triton.jit
def _byte_of(w, j: tl.constexpr, DOT_TY: tl.constexpr, IS_FP8: tl.constexpr, FAST_I2F: tl.constexpr):
    """Code j (0..3, little-endian) of each int32 word, as an exact value in DOT_TY."""
    if IS_FP8:
        return ((w >> (8 * j)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(DOT_TY)
    elif FAST_I2F:   # the fp16 trick: bits 0x6400 | (c + 128), and (byte & 0xFF) ^ 0x6480 builds them in one step
        return (((w >> (8 * j)) & 0xFF) ^ 0x6480).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0
    else:            # sign-extend byte j: shift it to the top, arithmetic shift back
        return ((w << (24 - 8 * j)) >> 24).to(DOT_TY)


@triton.jit
def _load_code_words(ptrs, mask, DOT_TY: tl.constexpr, IS_FP8: tl.constexpr, FAST_I2F: tl.constexpr,
                     ASM: tl.constexpr):
    """A [BLOCK_N, W] tile of int32 words (4 codes each) -> the [BLOCK_N, 4 W] tile of codes in DOT_TY.

    Why words: tl.dot wants fp16 operands; if the tile is loaded as bytes and converted elementwise, the compiler
    moves the conversion *after* the shared-memory staging (less shared memory), and reading single bytes into the
    tensor cores' layout costs one scalar load per element. The join + reshape below is not elementwise, so the
    conversion happens in registers on whole words and the tensor cores get fp16 tiles (ldmatrix), as in FP16."""
    w = tl.load(ptrs, mask=mask, other=0)
    if ASM:
        a, b, c, d = _int8x4_to_fp16_asm(w)
    else:
        a = _byte_of(w, 0, DOT_TY, IS_FP8, FAST_I2F)
        b = _byte_of(w, 1, DOT_TY, IS_FP8, FAST_I2F)
        c = _byte_of(w, 2, DOT_TY, IS_FP8, FAST_I2F)
        d = _byte_of(w, 3, DOT_TY, IS_FP8, FAST_I2F)
    # tl.join stacks along a new *last* axis: x[n, w, j, i] = (a, c)[j] if i == 0 else (b, d)[j], i.e. code 4w + 2j + i
    x = tl.join(tl.join(a, c), tl.join(b, d))                        # [BLOCK_N, W, 2, 2]
    return tl.reshape(x, [w.shape[0], 4 * w.shape[1]])


@triton.jit
def _paged_attention_int8_kernel(
    q_ptr,                          # [B, Hq, D]
    k_cache_ptr, v_cache_ptr,       # [N, P, Hkv, D] int8 / float8_e4m3fn codes (WORDS: the same bytes as int32, [.., D // 4])
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
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,       # P, tokens per KV block
    BLOCK_N: tl.constexpr,          # tokens per tile
    SPLIT: tl.constexpr,            # write partial results + lse (True) or the final output (False)
    HAS_ZERO: tl.constexpr,         # asymmetric codes: x = c * s + z
    WORDS: tl.constexpr,            # read codes as int32 words (k/v_cache_ptr point to int32; needs D % 4 == 0)
    IS_FP8: tl.constexpr,           # codes are float8_e4m3fn (WORDS: decode each byte as fp8)
    FAST_I2F: tl.constexpr,         # INT8 codes and fp16 queries: the bit-trick conversion
    ASM: tl.constexpr,              # WORDS + FAST_I2F, compiled: the 5-instruction PTX unpacking
    IEEE_FP32: tl.constexpr,        # fp32 queries: exact fp32 dots instead of TF32
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(context_len, start + tokens_per_split)
    DOT_TY: tl.constexpr = q_ptr.dtype.element_ty

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    q_heads = kv_head * QUERIES_PER_KV + g
    g_mask = g < QUERIES_PER_KV
    d_mask = d < HEAD_DIM
    w = tl.arange(0, DIM_PAD // 4)                                  # words of 4 codes (WORDS)
    q = tl.load(q_ptr + seq * stride_qb + q_heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)                     # [G, D]
    if HAS_ZERO:
        q_sum = tl.sum(q.to(tl.float32), axis=1)                                       # [G]: Σ_d q_d

    m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")   # running max of the scores (log2 units)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)                  # running sum of exp2(score - m_i)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)         # running sum of exp2(score - m_i) * v
    for tile_start in range(start, end, BLOCK_N):
        t = tile_start + tl.arange(0, BLOCK_N)                      # logical token positions of this tile
        t_mask = t < end
        block_ids = tl.load(block_tables_ptr + seq * stride_bt + t // BLOCK_SIZE, mask=t_mask, other=0)
        slot = block_ids.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE                    # [BLOCK_N] physical slots
        row = (slot * NUM_KV_HEADS + kv_head)                                          # row of [N*P*Hkv, D]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        word_mask = t_mask[:, None] & (w < HEAD_DIM // 4)[None, :]
        # ---- scores: s_t * (q . c_t) (+ z_t * sum(q))
        if WORDS:
            k = _load_code_words(k_cache_ptr + row[:, None] * (HEAD_DIM // 4) + w[None, :], word_mask,
                                 DOT_TY, IS_FP8, FAST_I2F, ASM)                                    # [BLOCK_N, D]
        else:
            k = _load_codes(k_cache_ptr + row[:, None] * HEAD_DIM + d[None, :], kv_mask, DOT_TY, FAST_I2F)
        k_scale = tl.load(k_scale_ptr + row, mask=t_mask, other=0.0).to(tl.float32)                    # [BLOCK_N]
        if IEEE_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))                                                  # [G, BLOCK_N] fp32
        s = s * k_scale[None, :]
        if HAS_ZERO:
            s += q_sum[:, None] * tl.load(k_zero_ptr + row, mask=t_mask, other=0.0).to(tl.float32)[None, :]
        s = tl.where(t_mask[None, :], s * sm_scale_log2e, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))   # finite: every tile has >= 1 valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # ---- values: sum_t (p_t * s_t) c_t (+ sum_t p_t z_t)
        if WORDS:
            v = _load_code_words(v_cache_ptr + row[:, None] * (HEAD_DIM // 4) + w[None, :], word_mask,
                                 DOT_TY, IS_FP8, FAST_I2F, ASM)
        else:
            v = _load_codes(v_cache_ptr + row[:, None] * HEAD_DIM + d[None, :], kv_mask, DOT_TY, FAST_I2F)
        v_scale = tl.load(v_scale_ptr + row, mask=t_mask, other=0.0).to(tl.float32)
        pv = (p * v_scale[None, :]).to(DOT_TY)
        if IEEE_FP32:
            acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pv, v)
        if HAS_ZERO:
            v_zero = tl.load(v_zero_ptr + row, mask=t_mask, other=0.0).to(tl.float32)
            acc += tl.sum(p * v_zero[None, :], axis=1)[:, None]
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)   # an empty range (context 0, or a split past the end): output 0
    out = acc / l_safe[:, None]
    o_ptrs = out_ptr + seq * stride_ob + q_heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    if SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + seq * stride_lb + q_heads * stride_lh + split, lse, mask=g_mask)


def _validate(q, k_cache, v_cache, k_scale, v_scale, k_zero, v_zero, block_tables, context_lens) -> None:
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_scale", k_scale), ("v_scale", v_scale),
             ("block_tables", block_tables), ("context_lens", context_lens)]
    named += [(n, t) for n, t in (("k_zero", k_zero), ("v_zero", v_zero)) if t is not None]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not INTERPRET and t.device.type != "cuda":
            raise ValueError(f"{name} is on {t.device}, but compiled Triton kernels need CUDA tensors: use {name}.to('cuda')")
        if INTERPRET and t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}, but the Triton interpreter runs on CPU tensors: use {name}.cpu()")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}; expected the device of q, {q.device}")
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
                                num_splits: int | None = None, max_context_len: int | None = None) -> torch.Tensor:
    """Decode attention through block tables over 8-bit K/V: ``[B, Hq, D]``, in q's dtype.

    As ``kernels.paged_attention_decode`` (q ``[B, Hq, D]``; block_tables int32 ``[B, max_blocks]``;
    context_lens int32 ``[B]``; sm_scale, num_splits, max_context_len), with k_cache, v_cache ``[N, P, Hkv, D]``
    torch.int8 or torch.float8_e4m3fn codes and k_scale, v_scale ``[N, P, Hkv]`` (k_zero, v_zero for asymmetric
    INT8) as written by ``kernels.store_kv_int8``: key t of kv head h is ``k_cache[..] * k_scale[..] (+ k_zero[..])``.
    Raises ValueError, naming the argument, on wrong inputs.
    """
    _validate(q, k_cache, v_cache, k_scale, v_scale, k_zero, v_zero, block_tables, context_lens)
    B, Hq, D = q.shape
    N, P, Hkv, _ = k_cache.shape
    max_context_len, num_splits, tokens_per_split = plan_splits(q, block_tables, context_lens, P, Hkv, num_splits,
                                                                max_context_len, CONFIG["BLOCK_N"])
    out = torch.empty_like(q)
    if B == 0:
        return out
    scale = (1.0 / math.sqrt(D) if sm_scale is None else sm_scale) * math.log2(math.e)
    cfg = CONFIG
    G = Hq // Hkv
    has_zero = k_zero is not None
    zeros = (k_zero, v_zero) if has_zero else (k_scale, v_scale)   # unused pointers when symmetric
    fast = bool(cfg["FAST_I2F"]) and k_cache.dtype == torch.int8 and q.dtype == torch.float16
    # Words of 4 codes: each row of D codes must be whole words (D % 4 == 0) starting at a 4-byte boundary.
    words = bool(cfg["WORDS"]) and D % 4 == 0 and all(t.data_ptr() % 4 == 0 for t in (k_cache, v_cache))
    meta = dict(NUM_KV_HEADS=Hkv, QUERIES_PER_KV=G, GROUP_PAD=max(16, triton.next_power_of_2(G)), HEAD_DIM=D,
                DIM_PAD=max(16, triton.next_power_of_2(D)), BLOCK_SIZE=P, BLOCK_N=cfg["BLOCK_N"], HAS_ZERO=has_zero,
                WORDS=words, IS_FP8=k_cache.dtype == torch.float8_e4m3fn, FAST_I2F=fast,
                ASM=words and fast and bool(cfg["ASM"]) and not INTERPRET,
                IEEE_FP32=q.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if words:   # the same bytes, seen as int32 words: [N, P, Hkv, D // 4]
        k_cache, v_cache = k_cache.view(torch.int32), v_cache.view(torch.int32)
    common = (q, k_cache, v_cache, k_scale, v_scale, *zeros, block_tables, context_lens)
    if num_splits == 1:
        _paged_attention_int8_kernel[(B, Hkv, 1)](
            *common, out, out, scale, tokens_per_split, q.stride(0), q.stride(1), block_tables.stride(0),
            out.stride(0), out.stride(1), 0, 0, 0, SPLIT=False, **meta)
        return out
    partial = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    _paged_attention_int8_kernel[(B, Hkv, num_splits)](
        *common, partial, lse, scale, tokens_per_split, q.stride(0), q.stride(1), block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1), SPLIT=True, **meta)
    _merge_splits_kernel[(B, Hq)](
        partial, lse, out, num_splits, partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=D, DIM_PAD=triton.next_power_of_2(D), SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)))
    return out
