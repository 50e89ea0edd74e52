"""FlashAttention forward for Hopper (sm_90+): the algorithm of ``kernels.flash_attention`` with TMA loads and stores.

The portable kernel computes a pointer per element and loads with ``tl.load``: on an H100 the compiler turns that
into ``cp.async`` copies, and every thread spends registers and instructions on addresses. Hopper's *Tensor
Memory Accelerator* (TMA) copies a whole [rows, D] tile between global and shared memory from one instruction,
given a *tensor descriptor* (base, shape, strides, tile shape); one thread issues it, the other warps keep computing,
and rows outside the tensor's shape read as zeros (stores to them are dropped). Triton exposes it as
``desc.load([row, col])`` / ``desc.store([row, col], tile)`` on a descriptor made either on the host
(``triton.tools.tensor_descriptor.TensorDescriptor``, passed to the kernel as an argument) or in the kernel
(``tl.make_tensor_descriptor``, which writes it to a scratch buffer from ``triton.set_allocator``).

Variants, selected by name (``VARIANTS``), measured against each other by ``benchmarks.flash_attention_hopper``:
- ``tma``: host descriptors, the portable kernel's few launch configs; ``tma_wide``: the same kernel, more configs;
- ``tma_device``: descriptors made in the kernel (what warp specialization on Hopper needs);
- ``tma_ws``: ``tl.range(..., warp_specialize=True)``: the compiler splits the warps into a producer (TMA loads)
  and consumers (dots, softmax) that hand tiles over through shared-memory barriers. Triton 3.6 leaves this kernel
  unchanged on sm_90 (cross-compiled: the same code as ``tma_device``); its Blackwell pass is where the flag acts;
- ``tma_persistent``: one program per SM that loops over the (query block, head) tiles instead of one per tile;
- ``tma_exp16``: ``tma_wide`` with the softmax's exponentials in half precision, two per PTX instruction
  (``ex2.approx.f16x2``, for bf16 inputs too) - but not two per SFU operation: on sm_90 ptxas compiles it to two
  ``MUFU.EX2.F16`` (``cuobjdump -sass``), so it does not unload the SFUs; what it saves is p's conversion to fp16. Per
  [BLOCK_M, BLOCK_N] tile the loop does BLOCK_M·BLOCK_N exponentials on the SM's special-function units (16 per clock)
  beside 2·BLOCK_M·BLOCK_N·D multiply-adds on the Tensor Cores (~2048 per clock in bf16): at D = 128 the exponentials
  take half as long as the dots, and unless the two overlap perfectly they cap the loop (FlashAttention-3's and -4's
  observation). p is rounded to 16 bits for the P·V dot anyway; here two more errors come in: the argument is rounded
  to fp16 first (its effect on p is at most ~2^-11/e, absolute, since p = 2^x <= 1 for x <= 0), and the approximate
  instruction has its own relative error, which the PTX manual bounds and which may exceed fp16's rounding of p. The
  GPU tests hold this variant to the same tolerances as every other (reference and SDPA, both 16-bit dtypes); with
  ``ex2.approx.bf16x2`` for bf16 inputs (commit 7ee05a3) the bf16 cases missed the LSE tolerance, hence fp16 for both.
  Measured on an H100: as fast as ``tma_wide`` within a few percent, ahead at some shapes and behind at most
  (``flash_attention_hopper_nvidia-h100-80gb-hbm3_exp.json``): as expected from its machine code, which keeps the
  SFUs' work; it says nothing about whether the SFUs hold this loop back (``tma_poly`` speaks to that). Compiled only:
  the interpreter computes them in fp32.
- ``tma_poly``: the other way to unload the special-function units (FlashAttention-4's): each loop step takes two
  key tiles of BLOCK_N; the first tile's exponentials go to the SFUs (``exp2``), the second's to the FMA units as a
  polynomial (``_exp2_poly``: 2^floor(x) written into the float's exponent bits, 2^frac(x) by a cubic, relative
  error <= 1.1e-4, under fp16's rounding of p). Runs in the interpreter too. Measured on an H100: slower
  than ``tma_wide`` at every shape (same file; the profile that would say where the time goes is not taken).
- ``tma_rot``: ``tma_wide``'s unmasked loop rotated by half a step (``_attn_fwd_tma_inner_rotated``): the next key
  tile's QK^T is issued before this tile's softmax, so that the Tensor Cores can work while the softmax runs (the
  intra-warpgroup half of FlashAttention-3's overlap; the ping-pong of two warp groups is out of ``tl``'s reach:
  ``kernels.flash_attention_gluon`` tries it in Gluon).
  Costs registers: two score tiles are live at once. Runs in the interpreter too. Measured on an H100
  (``flash_attention_hopper_nvidia-h100-80gb-hbm3_rot.json``): slower than ``tma_wide`` at every D = 128 shape, about
  even at D = 64; at D = 128 its autotuner picks 8 warps where ``tma_wide`` wins with 4 (registers, most likely;
  the register counts are not recorded).

Layout: the descriptors see q, k, v, out as 2-D [B·H·S, D] row matrices (the tensors are made contiguous first), so
head (b, h) owns rows (b·H + h)·S ... (b·H + h + 1)·S - 1. A query block that runs past Sq therefore reads the next
head's rows (harmless: those rows are never stored) and its output goes through a masked ``tl.store`` instead of
the TMA store; a key block that runs past Skv reads the next head's keys, which the stage-2 mask hides (p = 0, so
finite values there contribute nothing). Causal masking, GQA and the stage bounds are those of the portable kernel.
Forward only (``kernels.flash_attention(..., hopper=True)`` uses it and keeps the portable backward).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from kernels.device import INTERPRET
from kernels.flash_attention import INTERPRETER_CONFIG, LOG2E, _check_inputs
from kernels.flash_attention_bwd import dot_precision

try:  # host-side descriptors: triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: hopper_status() says why the path is off
    TensorDescriptor = None


@dataclass(frozen=True)
class HopperVariant:
    """One point of the ablation: how descriptors are made, which loop options, which launch configs to tune over."""
    device_desc: bool = False  # descriptors made in the kernel (tl.make_tensor_descriptor) instead of on the host
    warp_specialize: bool = False  # producer/consumer warp groups for the key loop
    persistent: bool = False  # one program per SM looping over tiles
    half_exp: bool = False  # the softmax's exp2 in packed fp16 (two per PTX instruction, one per SFU op; compiled only)
    poly_exp: bool = False  # key tiles in pairs: one tile's exp2 on the SFUs, the other's as a polynomial on the FMAs
    rotate: bool = False  # the unmasked loop rotated: tile j+1's QK^T issued before tile j's softmax
    #: (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the autotuner; few on purpose, each one is a compilation
    configs: tuple = ((128, 64, 4, 3), (128, 128, 8, 2))


_WIDE = ((128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 4, 2), (128, 64, 4, 4), (128, 128, 8, 3), (128, 128, 4, 2))
VARIANTS = {
    "tma": HopperVariant(),
    "tma_wide": HopperVariant(configs=_WIDE),
    "tma_device": HopperVariant(device_desc=True),
    "tma_ws": HopperVariant(device_desc=True, warp_specialize=True,
                            configs=((128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 8, 2))),
    "tma_persistent": HopperVariant(persistent=True, configs=((128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 3))),
    "tma_exp16": HopperVariant(half_exp=True, configs=_WIDE),
    # BLOCK_N here is one tile of a pair: 64 means 128 keys per loop step
    "tma_poly": HopperVariant(poly_exp=True, configs=((128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3),
                                                      (128, 64, 4, 3), (128, 32, 4, 3))),
    # two score tiles live at once: 8 warps keep them in registers at BLOCK_N = 64 and 128
    "tma_rot": HopperVariant(rotate=True, configs=((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                                                   (128, 128, 8, 3), (128, 64, 4, 3))),
}
DEFAULT_VARIANT = "tma_wide"


def hopper_status() -> str | None:
    """None when the TMA path can run here, else why not (a sentence). The interpreter emulates descriptors."""
    if TensorDescriptor is None or not hasattr(tl, "make_tensor_descriptor"):
        return f"triton {triton.__version__} has no tensor descriptors (needs >= 3.4)"
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (9, 0):
        return f"TMA needs compute capability >= 9.0 (Hopper); this GPU is sm_{major}{minor}"
    return None


@triton.jit
def _as_descriptor(desc_or_ptr, rows, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """A host descriptor passes through; a pointer becomes a device descriptor over [rows, HEAD_DIM] (compile time)."""
    if isinstance(desc_or_ptr, tl.tensor_descriptor):
        return desc_or_ptr
    else:
        return tl.make_tensor_descriptor(desc_or_ptr, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                         block_shape=[BLOCK, HEAD_DIM])


@triton.jit
def _exp2_half(x):
    """2**x for fp32 x <= 0, as fp16: the packed exponential, two values per PTX instruction (on sm_90 still one
    MUFU.EX2.F16 per value in the machine code). fp16 for bf16 inputs too: p lies in [0, 1], where fp16 has 3 more
    mantissa bits than bf16, and bf16's packed instruction (its argument rounded to 8 bits) missed the tests' LSE
    tolerance on an H100 (off by 3.4e-3 where 1e-3 is allowed)."""
    return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                     dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _exp2_poly(x):
    """2**x (x <= 0, fp32) without the special-function units: 2**floor(x) goes into the exponent bits, 2**frac(x)
    comes from a cubic fitted here to a relative error of 1.1e-4 on [0, 1) with p(0) = 1 and p(1) = 2."""
    x = tl.maximum(x, -126.0)  # below that 2**x is a denormal: read as 2**-126, which weighs nothing next to 1
    xi = tl.floor(x)
    f = x - xi
    p = 1.0 + f * (0.6954227 + f * (0.22630849 + f * 0.07826881))
    bits = p.to(tl.int32, bitcast=True) + (xi.to(tl.int32) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _attn_fwd_tma_inner_pairs(acc, l_i, m_i, q, desc_k, desc_v, kv_row0, lo, hi, qk_scale,
                              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Stage 1 (no mask) over pairs of key tiles, [lo, hi) a multiple of 2·BLOCK_N: tile 0's exponentials by exp2
    (SFUs), tile 1's by ``_exp2_poly`` (FMA units), so that both kinds of unit share the softmax's work."""
    for start_n in tl.range(lo, hi, 2 * BLOCK_N):
        start_n = tl.multiple_of(start_n, 2 * BLOCK_N)
        k0 = desc_k.load([kv_row0 + start_n, 0])
        k1 = desc_k.load([kv_row0 + start_n + BLOCK_N, 0])
        qk0 = tl.dot(q, k0.T, input_precision=DOT_PRECISION)
        qk1 = tl.dot(q, k1.T, input_precision=DOT_PRECISION)
        m_ij = tl.maximum(m_i, tl.maximum(tl.max(qk0, 1), tl.max(qk1, 1)) * qk_scale)
        p0 = tl.math.exp2(qk0 * qk_scale - m_ij[:, None])
        p1 = _exp2_poly(qk1 * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_ij = tl.sum(p0, 1) + tl.sum(p1, 1)
        acc = acc * alpha[:, None]
        v0 = desc_v.load([kv_row0 + start_n, 0])
        v1 = desc_v.load([kv_row0 + start_n + BLOCK_N, 0])
        acc = tl.dot(p0.to(v0.dtype), v0, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(p1.to(v1.dtype), v1, acc, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + l_ij
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _softmax_pv_unmasked(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION: tl.constexpr):
    """One key tile of stage 1 (no mask) after its scores: the online softmax's update and the P·V dot."""
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, l_i, m_ij


@triton.jit
def _attn_fwd_tma_inner_rotated(acc, l_i, m_i, q, desc_k, desc_v, kv_row0, lo, hi, qk_scale,
                                BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Stage 1 (no mask) over [lo, hi), a multiple of BLOCK_N, with the loop rotated by half a step: tile j+1's
    QK^T is issued before tile j's softmax and P·V. FlashAttention-3's intra-warpgroup overlap as far as Triton can
    be told: on Hopper a dot is an asynchronous wgmma that the compiler waits for where its result is first used,
    here one iteration later, so the Tensor Cores may run it while the softmax runs. Whether they do is the GPU's
    answer (two score tiles are live at once, which costs registers)."""
    if lo < hi:
        k = desc_k.load([kv_row0 + lo, 0])
        qk = tl.dot(q, k.T, input_precision=DOT_PRECISION)
        for start_n in tl.range(lo, hi - BLOCK_N, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            k_next = desc_k.load([kv_row0 + start_n + BLOCK_N, 0])
            qk_next = tl.dot(q, k_next.T, input_precision=DOT_PRECISION)   # tile j+1's scores, in flight
            v = desc_v.load([kv_row0 + start_n, 0])
            acc, l_i, m_i = _softmax_pv_unmasked(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION)   # tile j
            qk = qk_next
        v = desc_v.load([kv_row0 + hi - BLOCK_N, 0])   # the last tile: nothing left to issue ahead of it
        acc, l_i, m_i = _softmax_pv_unmasked(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v,
                        kv_row0,  # the row of key 0 of this kv head in the [B·Hkv·Skv, D] matrices
                        offs_m, offs_n, lo, hi, Skv, causal_offset, qk_scale,
                        STAGE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, HALF_EXP: tl.constexpr):
    # The loop of the portable kernel's _attn_fwd_inner; only the loads changed (one TMA copy per tile).
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([kv_row0 + start_n, 0])  # [BLOCK_N, HEAD_DIM]; rows past Skv: the next head's (masked below)
        qk = tl.dot(q, k.T, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if STAGE == 2:
            cols = start_n + offs_n
            visible = cols[None, :] < Skv
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        if HALF_EXP:  # p in fp16 straight from the packed exponential; its row sums in fp32
            p = _exp2_half(qk)
            l_ij = tl.sum(p.to(tl.float32), 1)
        else:
            p = tl.math.exp2(qk)
            l_ij = tl.sum(p, 1)
        alpha = tl.math.exp2(m_i - m_ij)
        acc = acc * alpha[:, None]
        v = desc_v.load([kv_row0 + start_n, 0])  # [BLOCK_N, HEAD_DIM]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + l_ij  # updated last: fewer values live across the dots (Triton's tutorial does the same)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_tile(tile, desc_q, desc_k, desc_v, desc_o, Out, LSE, Hq, GROUP, Hkv, Sq, Skv, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
               HALF_EXP: tl.constexpr, POLY_EXP: tl.constexpr, ROTATE: tl.constexpr):
    """One query block of one (batch, query head): ``tile`` counts query blocks fastest, so that neighbouring
    programs share a head and its K/V stays in L2."""
    n_m = tl.cdiv(Sq, BLOCK_M)
    off_bh = tile // n_m  # b * Hq + h
    start_m = tile % n_m
    if CAUSAL:  # late query blocks see the most keys: start them first
        start_m = n_m - 1 - start_m
    off_h = off_bh % Hq
    kv_row0 = ((off_bh // Hq) * Hkv + off_h // GROUP) * Skv  # GQA: GROUP query heads share one kv head
    q_row = off_bh * Sq + start_m * BLOCK_M

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = desc_q.load([q_row, 0])  # [BLOCK_M, HEAD_DIM], stays on chip for the whole loop
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    causal_offset = Skv - Sq
    if CAUSAL:  # the stage bounds of the portable kernel (see kernels.flash_attention.stage_bounds)
        full_end = tl.minimum(start_m * BLOCK_M + causal_offset + 1, Skv) // BLOCK_N * BLOCK_N
        diag_end = tl.minimum((start_m + 1) * BLOCK_M + causal_offset, Skv)
    else:
        full_end = Skv // BLOCK_N * BLOCK_N
        diag_end = Skv
    pairs_end = 0
    if POLY_EXP:  # whole pairs of key tiles first; an odd last tile of stage 1 goes through the plain loop
        pairs_end = full_end // (2 * BLOCK_N) * (2 * BLOCK_N)
        acc, l_i, m_i = _attn_fwd_tma_inner_pairs(acc, l_i, m_i, q, desc_k, desc_v, kv_row0, 0, pairs_end, qk_scale,
                                                  BLOCK_N, DOT_PRECISION)
    if ROTATE:
        acc, l_i, m_i = _attn_fwd_tma_inner_rotated(acc, l_i, m_i, q, desc_k, desc_v, kv_row0, pairs_end, full_end,
                                                    qk_scale, BLOCK_N, DOT_PRECISION)
    else:
        acc, l_i, m_i = _attn_fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, kv_row0, offs_m, offs_n, pairs_end,
                                            full_end, Skv, causal_offset, qk_scale, 1, CAUSAL, BLOCK_N,
                                            DOT_PRECISION, WARP_SPECIALIZE, HALF_EXP)
    acc, l_i, m_i = _attn_fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, kv_row0, offs_m, offs_n, full_end,
                                        diag_end, Skv, causal_offset, qk_scale, 2, CAUSAL, BLOCK_N, DOT_PRECISION,
                                        WARP_SPECIALIZE, HALF_EXP)

    acc = acc / l_i[:, None]
    if RETURN_LSE:
        tl.store(LSE + off_bh.to(tl.int64) * Sq + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453,
                 mask=offs_m < Sq)
    o = acc.to(Out.dtype.element_ty)
    if (start_m + 1) * BLOCK_M <= Sq:  # a whole block: one TMA store
        desc_o.store([q_row, 0], o)
    else:  # the last, partial block: its tail rows belong to the next head, so a masked store
        offs_d = tl.arange(0, HEAD_DIM)
        rows = (off_bh * Sq + offs_m).to(tl.int64)
        tl.store(Out + rows[:, None] * HEAD_DIM + offs_d[None, :], o, mask=offs_m[:, None] < Sq)


# B too: a batch of 1 would otherwise compile apart from larger ones
@triton.jit(do_not_specialize=["B", "Sq", "Skv", "SQ_BUCKET", "SKV_BUCKET"])
def _attn_fwd_tma(desc_q, desc_k, desc_v, desc_o,  # host descriptors, or the base pointers of q, k, v, out
                  Out, LSE,  # out's base pointer (partial blocks); LSE [B, Hq, Sq] fp32, written when RETURN_LSE
                  B, Hq, GROUP, Sq, Skv, qk_scale,
                  SQ_BUCKET, SKV_BUCKET,  # powers of two of Sq, Skv: only the autotuner's cache key reads them
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  WARP_SPECIALIZE: tl.constexpr, PERSISTENT: tl.constexpr, HALF_EXP: tl.constexpr,
                  POLY_EXP: tl.constexpr, ROTATE: tl.constexpr):
    Hkv = Hq // GROUP
    desc_q = _as_descriptor(desc_q, B * Hq * Sq, HEAD_DIM, BLOCK_M)
    desc_o = _as_descriptor(desc_o, B * Hq * Sq, HEAD_DIM, BLOCK_M)
    desc_k = _as_descriptor(desc_k, B * Hkv * Skv, HEAD_DIM, BLOCK_N)
    desc_v = _as_descriptor(desc_v, B * Hkv * Skv, HEAD_DIM, BLOCK_N)
    if PERSISTENT:  # grid = #SMs: each program walks tiles pid, pid + #programs, ...
        n_tiles = tl.cdiv(Sq, BLOCK_M) * B * Hq
        for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _attn_tile(tile, desc_q, desc_k, desc_v, desc_o, Out, LSE, Hq, GROUP, Hkv, Sq, Skv, qk_scale,
                       HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, DOT_PRECISION, WARP_SPECIALIZE, HALF_EXP,
                       POLY_EXP, ROTATE)
    else:  # grid = #tiles
        _attn_tile(tl.program_id(0), desc_q, desc_k, desc_v, desc_o, Out, LSE, Hq, GROUP, Hkv, Sq, Skv, qk_scale,
                   HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, DOT_PRECISION, WARP_SPECIALIZE, HALF_EXP,
                   POLY_EXP, ROTATE)


def _set_block_shapes(nargs):
    """Autotuner pre-hook: a host descriptor's tile shape is part of it, so each config sets its own."""
    if TensorDescriptor is not None and isinstance(nargs["desc_q"], TensorDescriptor):
        m, n, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
        nargs["desc_q"].block_shape = nargs["desc_o"].block_shape = [m, d]
        nargs["desc_k"].block_shape = nargs["desc_v"].block_shape = [n, d]


@functools.cache
def _tuned(name: str):
    """The autotuned kernel of one variant (built on first use; GPU only)."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes)
               for m, n, w, s in VARIANTS[name].configs]
    return triton.autotune(configs=configs,
                           key=["SQ_BUCKET", "SKV_BUCKET", "HEAD_DIM", "CAUSAL", "RETURN_LSE", "DOT_PRECISION",
                                "WARP_SPECIALIZE", "PERSISTENT", "HALF_EXP",
                                "POLY_EXP", "ROTATE"])(_attn_fwd_tma)


@functools.cache
def _num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 4


def _alloc_scratch(size: int, alignment: int, stream):
    """Scratch for descriptors made in the kernel (tl.make_tensor_descriptor writes 128 bytes per descriptor)."""
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> its [B·H·S, D] rows, copied when not contiguous or not 16-byte aligned (TMA needs both)."""
    t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t.view(-1, t.shape[-1])


def flash_attention_hopper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                           sm_scale: float | None = None, return_lse: bool = False, variant: str = DEFAULT_VARIANT,
                           config: dict | None = None):
    """softmax(q kᵀ · sm_scale) v with TMA tensor descriptors (forward only; no autograd).

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D] with Hq % Hkv == 0; causal with bottom-right alignment, as
    ``kernels.flash_attention``. dtypes: float16/bfloat16 compiled (sm_90+), float32/float16 in the interpreter.
    variant: a key of ``VARIANTS``. config: ``dict(BLOCK_M=..., BLOCK_N=..., num_warps=..., num_stages=...)``
    instead of autotuning over the variant's configs. Returns out (and lse [B, Hq, Sq] fp32 with ``return_lse``).
    Raises ValueError naming the argument for inputs it cannot handle, RuntimeError where TMA is unavailable.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; expected one of {', '.join(VARIANTS)}")
    _check_inputs(q, k, v, causal, sm_scale)
    if not INTERPRET and q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"q has dtype {q.dtype}; the TMA path is compiled for float16/bfloat16 "
                         "(use kernels.flash_attention for float32)")
    why = hopper_status()
    if why is not None:
        raise RuntimeError(f"the Hopper FlashAttention path cannot run here: {why}")
    spec = VARIANTS[variant]
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if max(B * Hq * Sq, B * Hkv * Skv) >= 2**31:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)}: more than 2^31 rows for a TMA coordinate")
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    # [B, H, S, D] -> [B·H·S, D] rows (a copy only for non-contiguous inputs); out is made contiguous
    q2, k2, v2 = (_rows(t) for t in (q, k, v))
    out = torch.empty((B, Hq, Sq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return (out, lse) if return_lse else out
    o2 = out.view(-1, D)
    if spec.device_desc:
        triton.set_allocator(_alloc_scratch)
        descs = (q2, k2, v2, o2)
    else:  # the tile shapes are placeholders until the config is known (_set_block_shapes)
        descs = tuple(TensorDescriptor.from_tensor(t, [16, D]) for t in (q2, k2, v2, o2))
    args = (*descs, o2, lse, B, Hq, Hq // Hkv, Sq, Skv, scale * LOG2E,
            triton.next_power_of_2(Sq), triton.next_power_of_2(Skv))
    flags = dict(HEAD_DIM=D, CAUSAL=bool(causal), RETURN_LSE=bool(return_lse), DOT_PRECISION=dot_precision(q.dtype),
                 WARP_SPECIALIZE=spec.warp_specialize and not INTERPRET, PERSISTENT=spec.persistent,
                 HALF_EXP=spec.half_exp and not INTERPRET, POLY_EXP=spec.poly_exp, ROTATE=spec.rotate)

    def grid(meta):
        tiles = triton.cdiv(Sq, meta["BLOCK_M"]) * B * Hq
        return (min(tiles, _num_sms()) if spec.persistent else tiles,)

    if config is None and not INTERPRET:
        _tuned(variant)[grid](*args, **flags)
    else:
        config = dict(config or INTERPRETER_CONFIG)
        if INTERPRET:  # the interpreter runs programs one by one; warps and stages mean nothing there
            config.pop("num_warps", None)
            config.pop("num_stages", None)
        _set_block_shapes({"desc_q": descs[0], "desc_k": descs[1], "desc_v": descs[2], "desc_o": descs[3],
                           "HEAD_DIM": D, **config})
        _attn_fwd_tma[grid(config)](*args, **flags, **config)
    return (out, lse) if return_lse else out


def best_configs(variant: str) -> dict:
    """What the autotuner picked for ``variant``, per cache key (for the benchmark's record)."""
    if INTERPRET or variant not in VARIANTS:
        return {}
    return {str(key): str(conf) for key, conf in _tuned(variant).cache.items()}
