"""Paged INT8 decode attention in Gluon: the codes loaded straight into the tensor cores' operand registers (issue 21).

``kernels.paged_attention_int8`` (Triton) runs at 0.74-0.76x the FP16 kernel's time on an H200, where its bytes
allow about 0.5x. Compiled for sm_90 (``benchmarks/int8_kernel_resources.py``), its token loop executes 1.75x the
FP16 kernel's instructions per KB of cache: about half unpack codes, and the unpacked tiles then travel through
shared memory into the layout the tensor cores read (``mma``'s operand registers), because ``tl`` chooses the
layouts of loads itself. Gluon (``triton.experimental.gluon``) lets the kernel choose them, and this kernel chooses
the ``mma`` operand layouts for the loads themselves (``mma_v2``: the warp-level ``mma.sync`` of Ampere, also on
Hopper), so nothing moves through shared memory:

* **K**, as the B operand of S = q Kᵀ per byte plane j (plane j of word w is channel 4w + j, as in the Triton
  kernel): ``[W words (k), BLOCK_N tokens (n)]`` with ``k_width`` 2, so each thread holds words w and w + 1 of one
  token, 8 contiguous bytes. The order of k is free as long as q's planes follow it: with ``K_WIDE`` a thread's
  words of one token are all adjacent (k = r0 + 2 l + 8 (r >> 1) for word (W / 4) l + r), loaded 16 bytes at a time
  into a 3-D view that, split into bits and permuted, is the B layout.
* **V**, as the B operand of O += P V per plane: ``[BLOCK_N tokens (k), W words (n)]``, each thread holding the same
  word of tokens t and t + 1. Those are 4-byte loads; with ``V_WIDE`` the output's columns are permuted (column n
  holds word (W / 8)(n % 8) + n / 8, undone by the store) so that a thread's words of one token are adjacent: the
  words load 16 bytes at a time into a 3-D view whose permute and reshape is exactly the B layout.
* **Unpacking** (``_pair_planes``): the two words a thread holds as a pair become, per plane, one register with the
  two fp16 values the ``mma`` wants side by side: one ``prmt`` gathers byte j of both words, one ``lop3`` flips
  their sign bits and sets the fp16 exponent bits around them, so each holds the fp16 number 1152 + c (the bit
  trick of the Triton kernel, without its subtraction: ``BIASED`` there). 2 instructions per plane and pair of
  words, 4 per word, where the Triton kernel spends 7; the bias comes out of the sums, 1152 · Σq from each score
  and 1152 · Σₜ pₜ sₜ from each output row (kept like the softmax's l).
* **P**: the accumulator layout of S *is* the A-operand layout of a 16-bit ``mma`` (checked:
  ``convert_layout(..., assert_trivial=True)``), so the probabilities stay in their registers.

* **Rescaling** (``LAZY_RESCALE``, FlashAttention-4's): the four accumulators are rescaled only when some row's
  running max grew by more than 8 (log2 units), not after every tile.

One warp per program (a program is one sequence x kv head x split, as in the other decode kernels), so no warp
waits for another at a barrier; occupancy comes from programs, and the split-K plan assumes ``RESIDENT_PER_SM`` of
them per SM. Compiled for sm_90 (``benchmarks/int8_kernel_resources.py``): no shared memory, no spills, and a token
loop about a tenth shorter per KB than the Triton kernel's (its instructions counted statically, the rescale that
``LAZY_RESCALE`` mostly skips included): the unpacking's saving is partly spent on addresses, since the block table
and the scales are read per token in three layouts.

Scope: INT8 codes without zero points, fp16 queries, head_dim D in {64, 128} (256 spills), G = Hq / Hkv <= 16, a
GPU of compute capability 8.0 or newer; anything else raises ValueError naming the argument (the Triton kernel
covers it).
There is no interpreter for Gluon: on a GPU the tests compare it with ``kernels.reference``; on a CPU it is
compiled for sm_90 (``benchmarks.cross_compile``) and the unpacking routine's bit logic is checked in Python
(``pair_planes_reference``, from the same constants as the PTX). Not the library's default: an experiment until a
GPU has timed it (``benchmarks/int8_kernel_sweep.py``).
"""
from __future__ import annotations

import math

import kernels.device  # first: sets TRITON_INTERPRET before triton is imported
import torch
import triton

from kernels.paged_attention import plan_splits, run_split_k
from kernels.paged_attention_int8 import _validate as _validate_int8

try:  # Gluon ships with Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # pragma: no cover - older Triton
    gluon = gl = None

#: the unpacking's constants, shared by the PTX and its Python model: per plane j a byte permutation that puts byte j
#: of word a in byte 0 and byte j of word b in byte 2; then lop3 with LUT 0x9C computes "c2 ? c1 : x ^ c1" bitwise:
#: where C2 is set (bytes 1 and 3) the bits of C1 (0x64: the fp16 exponent of 1024), elsewhere x with its sign bit
#: flipped (0x80: c + 128)
PRMT_SELECTORS = (0x4400, 0x5511, 0x6622, 0x7733)
C1, C2, LUT = 0x64806480, 0xFF00FF00, 0x9C
BIAS = 1152.0   # the fp16 number with bits 0x6400 | (c + 128) is 1024 + 128 + c
#: tokens per tile (64 spills: the K and V words of a tile live in registers, 2 x 64 per thread); programs of one
#: warp an SM holds at once, which its registers decide (65,536 per SM; 192 a thread at BLOCK_N = 32 when compiled
#: for sm_90 by Triton 3.6 and 3.7: 10 programs)
#: LAZY_RESCALE: FlashAttention-4's conditional rescaling (the running max moves only when a row's grows by more than
#: 8 in log2 units), which skips most tiles' rescale of the four accumulators
#: V_WIDE: V's words loaded 16 bytes at a time through a 3-D view whose permutation is the B layout (a column
#: permutation of the output, undone by the store), instead of one 4-byte word per load; K_WIDE: K's likewise (a
#: permutation of the dots' k, which q's planes follow), instead of 8 bytes per load
CONFIG = dict(BLOCK_N=32, LAZY_RESCALE=True, V_WIDE=True, K_WIDE=True)
RESIDENT_PER_SM = 10


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result is byte (selector >> 4i) & 7 of the 8 bytes b:a."""
    pool = (b << 32) | a
    return sum(((pool >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def _lop3(x: int, y: int, z: int, lut: int) -> int:
    """PTX lop3.b32: bit i of the result is bit (x_i * 4 + y_i * 2 + z_i) of lut (a = 0xF0, b = 0xCC, c = 0xAA)."""
    return sum(((lut >> ((((x >> i) & 1) << 2) | (((y >> i) & 1) << 1) | ((z >> i) & 1))) & 1) << i for i in range(32))


def pair_planes_reference(a: int, b: int) -> list[tuple[float, float]]:
    """What ``_pair_planes`` computes for one pair of 32-bit words (4 INT8 codes each, little-endian), modelled
    bit by bit from the same constants: per plane j, the two fp16 values (1152 + byte j of a, 1152 + byte j of b)."""
    out = []
    for sel in PRMT_SELECTORS:
        bits = _lop3(_prmt(a & 0xFFFFFFFF, b & 0xFFFFFFFF, sel), C1, C2, LUT)
        halves = torch.tensor([bits & 0xFFFF, bits >> 16], dtype=torch.int32).to(torch.int16).view(torch.float16)
        out.append((float(halves[0]), float(halves[1])))
    return out


def gluon_int8_status() -> str | None:
    """None when the kernel can run here, else why not (a sentence)."""
    if gl is None:
        return f"triton {triton.__version__} has no Gluon (needs >= 3.5)"
    if not torch.cuda.is_available() or kernels.device.INTERPRET:
        return "no CUDA GPU (Gluon has no interpreter)"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"mma_v2 needs compute capability 8.0 or newer; this GPU is {major}.x"
    return None


if gl is not None:

    #: the unpacking routine's PTX, written from the constants above (a constexpr: the kernel reads it at compile time)
    _PAIR_PLANES_PTX = gl.constexpr("{\n.reg .b32 x, c1, c2;\n" + f"mov.b32 c1, {C1:#x};\nmov.b32 c2, {C2:#x};\n"
                                    + "".join(f"prmt.b32 x, $4, $5, {sel:#x};\nlop3.b32 ${j}, x, c1, c2, {LUT:#x};\n"
                                              for j, sel in enumerate(PRMT_SELECTORS)) + "}")

    @gluon.jit
    def _pair_planes(words):
        """A tensor of int32 words in a k_width-2 operand layout (consecutive elements of a thread: a pair along k)
        -> its 4 byte planes as fp16 tensors of the same layout, each value 1152 + code: per plane, one prmt and
        one lop3 for the pair (``_PAIR_PLANES_PTX``)."""
        return gl.inline_asm_elementwise(
            asm=_PAIR_PLANES_PTX, constraints="=r,=r,=r,=r,r,r", args=[words],
            dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=2)

    @gluon.jit
    def _rows(bt_ptr, seq, stride_bt, t, end, P: gl.constexpr, NUM_KV_HEADS: gl.constexpr, kv_head):
        """Row of [N*P*Hkv, .] of the tokens t of this sequence and kv head, through the block table."""
        block_ids = gl.load(bt_ptr + seq * stride_bt + t // P, mask=t < end, other=0)
        return (block_ids.to(gl.int64) * P + t % P) * NUM_KV_HEADS + kv_head

    @gluon.jit
    def _paged_int8_mma_kernel(
        q_ptr,                      # [B, Hq, D] fp16
        k_ptr, v_ptr,               # [N, P, Hkv, D // 4] int32 words: the INT8 codes, 4 per word
        ks_ptr, vs_ptr,             # [N, P, Hkv] scales
        bt_ptr, lens_ptr,           # [B, max_blocks] int32, [B] int32
        out_ptr, lse_ptr,           # [B, Hq, D] (unsplit) or [B, Hq, splits, D] fp32 + [B, Hq, splits] (split)
        sm_scale_log2e, tokens_per_split,
        stride_qb, stride_qh, stride_bt, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
        NUM_KV_HEADS: gl.constexpr, G: gl.constexpr, D: gl.constexpr, P: gl.constexpr, BLOCK_N: gl.constexpr,
        SPLIT: gl.constexpr, LAZY_RESCALE: gl.constexpr, V_WIDE: gl.constexpr, V_LAYOUT: gl.constexpr,
        K_WIDE: gl.constexpr, K_LAYOUT: gl.constexpr,
    ):
        W: gl.constexpr = D // 4
        CODE_BIAS: gl.constexpr = 1152.0    # BIAS: what each unpacked code carries
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
        A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)   # q planes, P
        B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)   # K^T planes, V planes
        ROW: gl.constexpr = gl.SliceLayout(1, MMA)     # one value per query head
        COL: gl.constexpr = gl.SliceLayout(0, MMA)     # one value per token (scores) or word (outputs)
        FLAT: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [1, 1], [1, 0])
        seq = gl.program_id(0)
        kv_head = gl.program_id(1)
        split = gl.program_id(2)
        context_len = gl.load(lens_ptr + seq)
        start = split * tokens_per_split
        end = gl.minimum(context_len, start + tokens_per_split)

        # q as 4 byte planes in the A layout (plane j = channels j, 4 + j, ...), and each head's sum for the bias
        gq = gl.arange(0, 16, layout=gl.SliceLayout(1, A))
        wq = gl.arange(0, W, layout=gl.SliceLayout(0, A))
        if K_WIDE:   # the dots' k runs over K's words in the order K_WIDE loads them (_k_word): q's planes follow
            wq = (W // 4) * ((wq >> 1) & 3) + ((wq & 1) | ((wq >> 3) << 1))
        q_at = q_ptr + seq * stride_qb + gl.expand_dims((kv_head * G + gq) * stride_qh, 1) + gl.expand_dims(4 * wq, 0)
        q_mask = gl.expand_dims(gq < G, 1) & gl.expand_dims(wq < W, 0)
        q0 = gl.load(q_at + 0, mask=q_mask, other=0.0)
        q1 = gl.load(q_at + 1, mask=q_mask, other=0.0)
        q2 = gl.load(q_at + 2, mask=q_mask, other=0.0)
        q3 = gl.load(q_at + 3, mask=q_mask, other=0.0)
        gf = gl.arange(0, 16, layout=gl.SliceLayout(1, FLAT))
        df = gl.arange(0, D, layout=gl.SliceLayout(0, FLAT))
        q_flat = gl.load(q_ptr + seq * stride_qb + gl.expand_dims((kv_head * G + gf) * stride_qh, 1)
                         + gl.expand_dims(df, 0), mask=gl.expand_dims(gf < G, 1) & gl.expand_dims(df < D, 0),
                         other=0.0)
        q_bias = gl.convert_layout(CODE_BIAS * gl.sum(q_flat.to(gl.float32), axis=1), ROW)   # 1152 * sum(q) per head

        m_i = gl.full([16], float("-inf"), gl.float32, ROW)
        l_i = gl.zeros([16], gl.float32, ROW)
        v_bias = gl.zeros([16], gl.float32, ROW)        # sum_t p_t s_t: each output row carries 1152 x this
        acc0 = gl.zeros([16, W], gl.float32, MMA)
        acc1 = gl.zeros([16, W], gl.float32, MMA)
        acc2 = gl.zeros([16, W], gl.float32, MMA)
        acc3 = gl.zeros([16, W], gl.float32, MMA)
        nk = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, B))    # K^T's columns: tokens
        wk = gl.arange(0, W, layout=gl.SliceLayout(1, B))          # K^T's rows: words
        nv = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, B))    # V's rows: tokens
        wv = gl.arange(0, W, layout=gl.SliceLayout(0, B))          # V's columns: words
        # V_WIDE: V's words as X[t, c, i] = word (W / 8) c + i of token t in V_LAYOUT (a thread's i contiguous:
        # 16-byte loads), which permuted and reshaped is the B layout with column n = 8 i + c (``_v_wide_layout``)
        t3 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, V_LAYOUT)))
        c3 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, V_LAYOUT)))
        i3 = gl.arange(0, W // 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, V_LAYOUT)))
        ci3 = gl.expand_dims(gl.expand_dims((W // 8) * c3, 0), 2) + gl.expand_dims(gl.expand_dims(i3, 0), 1)
        # K_WIDE: K's words as Y[l, r, t] = word (W / 4) l + r of token t in K_LAYOUT (a thread's r contiguous);
        # split into bits and permuted, it is the B layout with k = r0 + 2 l + 8 (r >> 1) (``_k_wide_layout``)
        l3 = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, K_LAYOUT)))
        r3 = gl.arange(0, W // 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, K_LAYOUT)))
        t3k = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, gl.SliceLayout(1, K_LAYOUT)))
        lr3 = gl.expand_dims(gl.expand_dims((W // 4) * l3, 1), 2) + gl.expand_dims(gl.expand_dims(r3, 0), 2)
        ns = gl.arange(0, BLOCK_N, layout=COL)                     # the scores' columns: tokens
        for tile_start in range(start, end, BLOCK_N):
            # ---- S = q K^T, plane by plane: K's words land in the B layout, two words of a token per thread
            tk = tile_start + nk
            rk = _rows(bt_ptr, seq, stride_bt, tk, end, P, NUM_KV_HEADS, kv_head)
            if K_WIDE:
                tk3 = tile_start + t3k
                rk3 = _rows(bt_ptr, seq, stride_bt, tk3, end, P, NUM_KV_HEADS, kv_head)
                y = gl.load(k_ptr + gl.expand_dims(gl.expand_dims(rk3 * W, 0), 1) + lr3,
                            mask=gl.expand_dims(gl.expand_dims(tk3 < end, 0), 1), other=0)     # [4, W / 4, BLOCK_N]
                if W == 32:   # bits (l1, l0, r2, r1, r0) -> k = (r2, r1, l1, l0, r0)
                    y = gl.permute(gl.reshape(y, [2, 2, 2, 2, 2, BLOCK_N]), [2, 3, 0, 1, 4, 5])
                else:         # W = 16: (l1, l0, r1, r0) -> k = (r1, l1, l0, r0)
                    y = gl.permute(gl.reshape(y, [2, 2, 2, 2, BLOCK_N]), [2, 0, 1, 3, 4])
                k_words = gl.convert_layout(gl.reshape(y, [W, BLOCK_N]), B)
            else:
                k_words = gl.load(k_ptr + gl.expand_dims(rk * W, 0) + gl.expand_dims(wk, 1),
                                  mask=gl.expand_dims(tk < end, 0), other=0)                     # [W, BLOCK_N]
            k0, k1, k2, k3 = _pair_planes(k_words)
            s = gl.zeros([16, BLOCK_N], gl.float32, MMA)
            s = mma_v2(q0, k0, s)
            s = mma_v2(q1, k1, s)
            s = mma_v2(q2, k2, s)
            s = mma_v2(q3, k3, s)                                  # sum_d q_d (1152 + c_td)
            ts = tile_start + ns
            rs = _rows(bt_ptr, seq, stride_bt, ts, end, P, NUM_KV_HEADS, kv_head)
            k_scale = gl.load(ks_ptr + rs, mask=ts < end, other=0.0).to(gl.float32)
            v_scale = gl.load(vs_ptr + rs, mask=ts < end, other=0.0).to(gl.float32)
            s = (s - gl.expand_dims(q_bias, 1)) * gl.expand_dims(k_scale * sm_scale_log2e, 0)
            s = gl.where(gl.expand_dims(ts < end, 0), s, float("-inf"))
            # ---- online softmax, in the accumulator's registers
            m_new = gl.maximum(m_i, gl.max(s, axis=1))   # finite: every tile has >= 1 valid token
            rescale = True
            if LAZY_RESCALE:   # FA4's: keep the old max until some row's grew by > 8 (p <= 2^8), then rescale all
                rescale = gl.max(m_new - m_i, axis=0) > 8.0
            if rescale:
                alpha = gl.exp2(m_i - m_new)
                l_i = l_i * alpha
                v_bias = v_bias * alpha
                acc0 = acc0 * gl.expand_dims(alpha, 1)
                acc1 = acc1 * gl.expand_dims(alpha, 1)
                acc2 = acc2 * gl.expand_dims(alpha, 1)
                acc3 = acc3 * gl.expand_dims(alpha, 1)
                m_i = m_new
            p = gl.exp2(s - gl.expand_dims(m_i, 1))
            l_i = l_i + gl.sum(p, axis=1)
            pv = (p * gl.expand_dims(v_scale, 0)).to(gl.float16)
            v_bias = v_bias + gl.sum(pv.to(gl.float32), axis=1)
            pa = gl.convert_layout(pv, A, assert_trivial=True)    # the accumulator layout is the A layout
            # ---- O += P V, plane by plane: V's words land in the B layout, one word of two tokens per thread
            if V_WIDE:
                tv3 = tile_start + t3   # a thread's tokens here are its score columns': reuse their rows
                rv3 = gl.convert_layout(rs, gl.SliceLayout(1, gl.SliceLayout(2, V_LAYOUT)))
                x = gl.load(v_ptr + gl.expand_dims(gl.expand_dims(rv3 * W, 1), 2) + ci3,
                            mask=gl.expand_dims(gl.expand_dims(tv3 < end, 1), 2), other=0)    # [BLOCK_N, 8, W / 8]
                v_words = gl.convert_layout(gl.reshape(gl.permute(x, [0, 2, 1]), [BLOCK_N, W]), B)
            else:
                tv = tile_start + nv
                rv = _rows(bt_ptr, seq, stride_bt, tv, end, P, NUM_KV_HEADS, kv_head)
                v_words = gl.load(v_ptr + gl.expand_dims(rv * W, 1) + gl.expand_dims(wv, 0),
                                  mask=gl.expand_dims(tv < end, 1), other=0)                     # [BLOCK_N, W]
            v0, v1, v2, v3 = _pair_planes(v_words)
            acc0 = mma_v2(pa, v0, acc0)
            acc1 = mma_v2(pa, v1, acc1)
            acc2 = mma_v2(pa, v2, acc2)
            acc3 = mma_v2(pa, v3, acc3)

        l_safe = gl.where(l_i > 0, l_i, 1.0)   # an empty range (context 0, or a split past the end): output 0
        bias = gl.expand_dims(CODE_BIAS * v_bias, 1)
        inv = gl.expand_dims(1.0 / l_safe, 1)
        go = gl.arange(0, 16, layout=ROW)
        wo = gl.arange(0, W, layout=COL)
        if V_WIDE:   # output column n holds word (W / 8) (n % 8) + n // 8
            wo = (W // 8) * (wo % 8) + wo // 8
        o_at = (out_ptr + seq * stride_ob + gl.expand_dims((kv_head * G + go) * stride_oh, 1) + split * stride_os
                + gl.expand_dims(4 * wo, 0))
        o_mask = gl.expand_dims(go < G, 1) & gl.expand_dims(wo < W, 0)
        o_ty: gl.constexpr = out_ptr.dtype.element_ty
        gl.store(o_at + 0, ((acc0 - bias) * inv).to(o_ty), mask=o_mask)   # channels 0, 4, 8, ...
        gl.store(o_at + 1, ((acc1 - bias) * inv).to(o_ty), mask=o_mask)
        gl.store(o_at + 2, ((acc2 - bias) * inv).to(o_ty), mask=o_mask)
        gl.store(o_at + 3, ((acc3 - bias) * inv).to(o_ty), mask=o_mask)
        if SPLIT:
            lse = gl.where(l_i > 0, m_i + gl.log2(l_safe), float("-inf"))
            gl.store(lse_ptr + seq * stride_lb + (kv_head * G + go) * stride_lh + split, lse, mask=go < G)


def _v_wide_layout(block_n: int, words: int):
    """The layout of X[t, c, i] = word (words / 8) c + i of token t (V_WIDE): registers first along i (contiguous
    words: one wide load), then the tokens the B operand gives a thread (t + 1, t + 8, t + 16, ...); lanes as the B
    operand's (t + 2, t + 4, then columns c + 1, c + 2, c + 4). Permuted to [t, i, c] and reshaped to
    [block_n, words] it is the B layout with column n = 8 i + c."""
    reg_i = [[0, 0, 1 << b] for b in range(int(math.log2(words // 8)))]
    reg_t = [[1, 0, 0]] + [[8 << b, 0, 0] for b in range(int(math.log2(block_n // 8)))]
    lanes = [[2, 0, 0], [4, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
    return gl.DistributedLinearLayout(reg_bases=reg_i + reg_t, lane_bases=lanes, warp_bases=[], block_bases=[],
                                      shape=[block_n, 8, words // 8])


def _k_wide_layout(block_n: int, words: int):
    """The layout of Y[l, r, t] = word (words / 4) l + r of token t (K_WIDE): registers first along r (contiguous
    words), then the tokens the B operand gives a thread (t + 8, t + 16, ...); lanes: l (what the B operand's k + 2,
    k + 4 become), then t + 1, t + 2, t + 4. A thread's k = r0 + 2 l + 8 (r >> 1): its registers hold k + 1, k + 8,
    k + 16, as the B operand's do."""
    reg_r = [[0, 1 << b, 0] for b in range(int(math.log2(words // 4)))]
    reg_t = [[0, 0, 8 << b] for b in range(int(math.log2(block_n // 8)))]
    lanes = [[1, 0, 0], [2, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]]
    return gl.DistributedLinearLayout(reg_bases=reg_r + reg_t, lane_bases=lanes, warp_bases=[], block_bases=[],
                                      shape=[4, words // 4, block_n])


def _check_scope(q: torch.Tensor, k_cache: torch.Tensor, k_zero) -> None:
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if q.dtype != torch.float16:
        raise ValueError(f"q has dtype {q.dtype}; the Gluon INT8 kernel takes torch.float16 (the Triton kernel "
                         "kernels.paged_attention_int8_decode takes the others)")
    if k_cache.dtype != torch.int8:
        raise ValueError(f"k_cache has dtype {k_cache.dtype}; the Gluon INT8 kernel takes torch.int8 codes")
    if k_zero is not None:
        raise ValueError("k_zero given: the Gluon INT8 kernel takes symmetric codes (no zero points)")
    if D not in (64, 128):   # 256 compiles, but its four fp32 accumulators alone take 128 registers: it spills
        raise ValueError(f"q has head_dim {D}; the Gluon INT8 kernel takes 64 or 128")
    if Hq // Hkv > 16:
        raise ValueError(f"q has {Hq // Hkv} query heads per kv head; the Gluon INT8 kernel takes at most 16")


def paged_attention_int8_decode_gluon(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      k_scale: torch.Tensor, v_scale: torch.Tensor, block_tables: torch.Tensor,
                                      context_lens: torch.Tensor, *, k_zero: torch.Tensor | None = None,
                                      v_zero: torch.Tensor | None = None, sm_scale: float | None = None,
                                      num_splits: int | None = None, max_context_len: int | None = None,
                                      validate: bool = True, config: dict | None = None) -> torch.Tensor:
    """As ``kernels.paged_attention_int8_decode`` (same arguments, same result up to fp16 rounding), within this
    module's scope; config: keys of ``CONFIG``. ValueError naming the argument outside it, RuntimeError where the
    kernel cannot run (``gluon_int8_status``)."""
    from kernels._checks import check_block_tables, check_sm_scale
    _validate_int8(q, k_cache, v_cache, k_scale, v_scale, k_zero, v_zero, block_tables, context_lens)
    check_sm_scale(sm_scale)
    _check_scope(q, k_cache, k_zero)
    unknown = sorted(set(config or {}) - set(CONFIG))
    if unknown:
        raise ValueError(f"config has unknown key(s) {unknown}; expected keys of CONFIG: {sorted(CONFIG)}")
    cfg = {**CONFIG, **(config or {})}
    why = gluon_int8_status()
    if why is not None:
        raise RuntimeError(f"the Gluon INT8 decode kernel cannot run here: {why}")
    B, Hq, D = q.shape
    N, P, Hkv, _ = k_cache.shape
    if validate:
        max_context_len = check_block_tables(block_tables, context_lens, N, P, max_context_len)
    max_context_len, num_splits, tokens_per_split = plan_splits(q, block_tables, context_lens, P, Hkv, num_splits,
                                                                max_context_len, cfg["BLOCK_N"],
                                                                resident_per_sm=RESIDENT_PER_SM)
    return _launch(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, sm_scale, num_splits,
                   tokens_per_split, cfg)


def _launch(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, sm_scale, num_splits,
            tokens_per_split, cfg) -> torch.Tensor:
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    scale = (1.0 / math.sqrt(D) if sm_scale is None else sm_scale) * math.log2(math.e)
    meta = dict(NUM_KV_HEADS=Hkv, G=Hq // Hkv, D=D, P=k_cache.shape[1], BLOCK_N=cfg["BLOCK_N"],
                LAZY_RESCALE=bool(cfg["LAZY_RESCALE"]), V_WIDE=bool(cfg["V_WIDE"]),
                V_LAYOUT=_v_wide_layout(cfg["BLOCK_N"], D // 4), K_WIDE=bool(cfg["K_WIDE"]),
                K_LAYOUT=_k_wide_layout(cfg["BLOCK_N"], D // 4), num_warps=1)
    words = (k_cache.view(torch.int32), v_cache.view(torch.int32))   # the same bytes: [N, P, Hkv, D // 4]
    return run_split_k(_paged_int8_mma_kernel, q, Hkv, num_splits,
                       (q, *words, k_scale, v_scale, block_tables, context_lens),
                       (scale, tokens_per_split, q.stride(0), q.stride(1), block_tables.stride(0)), meta)
