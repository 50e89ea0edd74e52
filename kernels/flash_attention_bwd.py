"""FlashAttention-2 backward in Triton (after Triton's tutorial 06-fused-attention.py and Dao's FlashAttention-2
paper, algorithm 2): the gradients dq, dk, dv of ``kernels.flash_attention`` without storing the [Sq, Skv]
probabilities of the forward pass.

The forward saved only O and the log-sum-exp ``lse`` of each row of scaled scores (O(S) floats). The backward
**recomputes** P = exp(s·q kᵀ - lse) block by block in on-chip memory, and with dO (the gradient of O):

    dV = Pᵀ dO                      dP = dO Vᵀ
    dS = P ∘ (dP - Δ),  Δ = rowsum(dO ∘ O)   (= rowsum(P ∘ dP): the softmax's Jacobian, in O(S·D) work)
    dQ = s · dS K                   dK = s · dSᵀ Q                  (s = sm_scale)

Three launches:
1. ``_attn_bwd_preprocess``: Δ [B, Hq, Sq] fp32, one program per block of query rows.
2. ``_attn_bwd_dkdv``: one program per (block of BLOCK_N keys, batch, **kv head**). It keeps its K, V block and
   the dK, dV accumulators in registers and streams the query blocks of every query head of its GQA group, so dK
   and dV are summed over the group in registers and written once: no atomics, no fp32 scratch buffer.
3. ``_attn_bwd_dq``: one program per (block of BLOCK_M queries, batch, query head), streaming the key blocks it
   sees, as the forward does. It recomputes P and dP a second time (2 of its 3 matmuls), the price of writing
   each dQ row from one program. FlashAttention-2's CUDA code instead adds dQ from the dK/dV programs with fp32
   atomics (5 matmuls in all instead of 7): fewer FLOPs, but an fp32 dQ buffer, a nondeterministic summation
   order, and an autotuner that must zero it before every trial.

``dq_mode="atomic"`` (or the module's ``DQ_MODE``) is that variant, to be measured: launch 2 becomes the dK/dV
kernel with the constexpr ``ATOMIC_DQ``, which also computes each tile's dQ = s · dS K from the dS it already has
and adds it with ``tl.atomic_add`` (fp32, relaxed) into a zeroed fp32 [B, Hq, Sq, D] buffer, cast to the input
dtype afterwards; launch 3 goes away. 5 matmuls per tile instead of 4 + 3, for atomics on BLOCK_M x D floats per
tile and the buffer's zeroing, traffic and cast. Why: on an H100 (bf16, D = 128, N = 8k, non-causal) the dK/dV
kernel alone took ~5.0 ms, about cuDNN's whole backward, and the dq kernel another ~2.8 ms; fwd+bwd was 0.68x cuDNN
(0.69x at 16k) where issue 20 asks for 0.7x. The atomic sum's order changes from run to run, so its dQ is not
bit-reproducible (its rounding differs by an ulp or so of fp32 between runs); "separate" stays the default until a
GPU run (``benchmarks.flash_attention_bwd --atomic-dq``) says which is faster.

Causal masks are bottom-right aligned as in the forward (query i sits at position i + Skv - Sq). Each loop runs in
two stages like the forward: the blocks every pair of which is visible without a mask, and the diagonal blocks
with one. Rows past Sq need no score mask: their dO and Δ are loaded as 0, so they add nothing to dV or dK (and
their lse, loaded as +inf, makes their P 0 too). Keys past Skv are loaded as 0: they add nothing to dQ, and their
own dK, dV rows are never stored.

Dots: fp16/bf16 inputs on the tensor cores with fp32 accumulation (P and dS rounded to the input dtype before
their matmuls, as in the forward); float32 inputs with ``input_precision="ieee"`` (exact fp32 products, no TF32).
"""
from __future__ import annotations

import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from kernels.device import INTERPRET

LOG2E = 1.4426950408889634  # log2(e): the kernels work in log2 units, as the forward does
#: Interpreter launch config: BLOCK_M query rows, BLOCK_N keys (unequal on purpose, so the stage bounds are
#: exercised with unequal blocks).
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32)


@triton.jit
def _attn_bwd_preprocess(Out, DO, Delta,  # out, dO [B, Hq, Sq, D]; Delta [B, Hq, Sq] fp32
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         Hq, Sq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    off_bh = tl.program_id(1)
    off_b, off_h = (off_bh // Hq).to(tl.int64), off_bh % Hq
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < Sq
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=row_ok, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # Δ_i = Σ_d dO_id O_id
    tl.store(Delta + off_bh.to(tl.int64) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v,  # accumulators and the key block [BLOCK_N, HEAD_DIM]
                         q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr,  # query row 0 of this query head
                         stride_qm, stride_dom, stride_dqm, offs_n,  # key positions of the block [BLOCK_N]
                         lo, hi, Sq, causal_offset, qk_scale, sm_scale,  # the query rows [lo, hi) of this stage
                         MASKED: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         ATOMIC_DQ: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        row_ok = offs_m < Sq
        q = tl.load(q_ptrs + start_m * stride_qm, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
        # lse in log2 units; +inf for rows past Sq makes their P exactly 0 (no score mask needed for them)
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        # -- recompute Pᵀ of this (key block, query block) tile from the saved lse: no running max needed --
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASKED:  # the diagonal: key j is visible to query row i iff j <= i + Skv - Sq
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, pT, 0.0)
        do = tl.load(do_ptrs + start_m * stride_dom, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)  # dV += Pᵀ dO
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (dO Vᵀ)ᵀ [BLOCK_N, BLOCK_M]
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)  # dSᵀ = Pᵀ ∘ (dPᵀ - Δ), rounded for its matmuls
        dk += tl.dot(dsT, q, input_precision=DOT_PRECISION)  # dK += dSᵀ Q (sm_scale applied at the end)
        if ATOMIC_DQ:  # this tile's share of dQ = s · dS K, added to the fp32 buffer the other key blocks add to
            dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PRECISION) * sm_scale  # [BLOCK_M, HEAD_DIM]
            tl.atomic_add(dq_ptrs + start_m * stride_dqm, dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["Sq", "Skv", "SQ_BUCKET", "SKV_BUCKET"])
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, Delta,  # LSE (natural log) and Delta: [B, Hq, Sq] fp32
                   DQ32,  # ATOMIC_DQ: the zeroed fp32 dQ [B, Hq, Sq, D] every program adds into; else unused
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                   Hq, Hkv, GROUP, Sq, Skv, qk_scale, sm_scale,
                   SQ_BUCKET, SKV_BUCKET,  # next powers of two of Sq, Skv: only the autotuner's cache key reads them
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    # Grid: (key blocks, B * Hkv). Causal: the first key blocks are seen by the most queries; they start first.
    start_n = tl.program_id(0) * BLOCK_N
    off_bkv = tl.program_id(1)
    off_b, off_hkv = (off_bkv // Hkv).to(tl.int64), off_bkv % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[:, None] < Skv
    k = tl.load(K + off_b * stride_kb + off_hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=col_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    causal_offset = Skv - Sq
    if CAUSAL:
        # Query rows below lo see no key of the block (row i sees keys <= i + Skv - Sq); rows from mid on see
        # every key of it (the last real key included): [lo, mid) is the masked diagonal, [mid, Sq) needs no mask.
        last_key = tl.minimum(start_n + BLOCK_N, Skv) - 1
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
        mid = (tl.maximum(last_key - causal_offset, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        lo = 0
        mid = 0
    for g in range(GROUP):  # GQA: every query head of this kv head adds into the same dK, dV registers
        off_h = off_hkv * GROUP + g
        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd
        do_ptrs = (DO + off_b * stride_dob + off_h * stride_doh + offs_m0[:, None] * stride_dom
                   + offs_d[None, :] * stride_dod)
        dq_ptrs = (DQ32 + off_b * stride_dqb + off_h * stride_dqh + offs_m0[:, None] * stride_dqm
                   + offs_d[None, :] * stride_dqd)  # each query head of the group adds to its own dQ rows
        row0 = (off_b * Hq + off_h) * Sq  # the rows of this head in LSE and Delta
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, LSE + row0, Delta + row0, stride_qm,
                                      stride_dom, stride_dqm, offs_n, lo, mid, Sq, causal_offset, qk_scale,
                                      sm_scale, True, BLOCK_M, DOT_PRECISION, ATOMIC_DQ)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, LSE + row0, Delta + row0, stride_qm,
                                      stride_dom, stride_dqm, offs_n, mid, Sq, Sq, causal_offset, qk_scale,
                                      sm_scale, False, BLOCK_M, DOT_PRECISION, ATOMIC_DQ)
    dk = dk * sm_scale  # S = sm_scale · Q Kᵀ, so dK = sm_scale · dSᵀ Q
    tl.store(DK + off_b * stride_dkb + off_hkv * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + off_b * stride_dvb + off_hkv * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta,  # accumulator and this query block's rows [BLOCK_M, ...]
                       k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m,
                       lo, hi, Skv, causal_offset, qk_scale,  # the keys [lo, hi) of this stage
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=offs_n[:, None] < Skv, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=offs_n[:, None] < Skv, other=0.0)
        else:  # stage 1 keys are whole blocks inside [0, Skv): no mask
            k = tl.load(k_ptrs + start_n * stride_kn)
            v = tl.load(v_ptrs + start_n * stride_vn)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            visible = offs_n[None, :] < Skv
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # dP = dO Vᵀ
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)  # dQ += dS K (sm_scale applied at the end)
    return dq


@triton.jit(do_not_specialize=["Sq", "Skv", "SQ_BUCKET", "SKV_BUCKET"])
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, Delta,
                 stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 Hq, GROUP, Sq, Skv, qk_scale, sm_scale, SQ_BUCKET, SKV_BUCKET,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Grid: (query blocks, B * Hq), late query blocks first when causal (they see the most keys), as the forward.
    if CAUSAL:
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b, off_h = (off_bh // Hq).to(tl.int64), off_bh % Hq
    off_hkv = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Sq
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
    row0 = off_bh.to(tl.int64) * Sq
    lse = tl.load(LSE + row0 + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634  # P = 0 past Sq
    delta = tl.load(Delta + row0 + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + off_b * stride_kb + off_hkv * stride_kh + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hkv * stride_vh + offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    causal_offset = Skv - Sq
    if CAUSAL:  # the forward's stage bounds (kernels.flash_attention.stage_bounds)
        full_end = tl.minimum(start_m * BLOCK_M + causal_offset + 1, Skv) // BLOCK_N * BLOCK_N
        diag_end = tl.minimum((start_m + 1) * BLOCK_M + causal_offset, Skv)
    else:
        full_end = Skv // BLOCK_N * BLOCK_N
        diag_end = Skv
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, 0, full_end, Skv,
                            causal_offset, qk_scale, False, CAUSAL, BLOCK_N, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, full_end,
                            diag_end, Skv, causal_offset, qk_scale, True, CAUSAL, BLOCK_N, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------- autotuning (GPU only)
#: (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on a GPU. dK/dV programs own BLOCK_N keys and stream BLOCK_M
#: queries (Triton's tutorial: 32 x 128, 5 stages); dQ programs the other way round (128 x 32). The last one of each
#: list serves short sequences. Configs that run out of shared memory (fp32, D = 128) fail to compile and the
#: autotuner drops them.
DKDV_CONFIGS = [(32, 128, 4, 5), (32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (16, 32, 4, 2)]
DQ_CONFIGS = [(128, 32, 4, 5), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (32, 16, 4, 2)]
#: The dK/dV kernel with ATOMIC_DQ: a fifth matmul, a [BLOCK_M, HEAD_DIM] fp32 dQ tile and its atomics per step
#: raise register pressure, so fewer stages; untimed yet (``benchmarks.flash_attention_configs --kernel dkdv_dq``).
DKDV_DQ_CONFIGS = [(64, 128, 8, 3), (32, 128, 4, 3), (32, 128, 8, 3), (64, 64, 4, 3), (16, 32, 4, 2)]


def _prune(dim: str, bucket: str):
    """Keep the configs whose ``dim`` block suits the sequence it tiles: >= 64 rows for long ones, at most the
    sequence's next power of two for short ones (or the smallest config)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        configs = fp32_tiles(configs, args["DOT_PRECISION"])
        size = args[bucket]
        keep = [c for c in configs if min(size, 64) <= c.kwargs[dim] <= max(size, 16)]
        return keep or [min(configs, key=lambda c: c.kwargs[dim])]
    return prune


#: The largest tile (BLOCK_M x BLOCK_N scores) autotuned for float32 inputs. Exact fp32 dots ("ieee") run on the
#: CUDA cores as unrolled FMAs, and their compilation grows with the tile: on an H100 (triton 3.6) the fixed
#: 64 x 32 config compiled in seconds for every test case, while autotuning float32 over the bf16 list below did
#: not finish one shape in 150 s (benchmarks/results/gpu_checks.md, 2026-12-06).
FP32_MAX_TILE = 64 * 32


def fp32_tiles(configs, precision: str):
    """The configs a dot precision may try: all of them, or for "ieee" (float32) those of at most FP32_MAX_TILE
    scores (or the smallest one)."""
    if precision != "ieee":
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= FP32_MAX_TILE]
    return small or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _tuned(kernel, configs, dim, bucket, reset_to_zero=None):
    return None if INTERPRET else triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in configs],
        key=["SQ_BUCKET", "SKV_BUCKET", "HEAD_DIM", "CAUSAL", "DOT_PRECISION"],  # (+ the dtypes of the tensors)
        prune_configs_by={"early_config_prune": _prune(dim, bucket)}, reset_to_zero=reset_to_zero)(kernel)


_attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv, DKDV_CONFIGS, "BLOCK_N", "SKV_BUCKET")
_attn_bwd_dq_tuned = _tuned(_attn_bwd_dq, DQ_CONFIGS, "BLOCK_M", "SQ_BUCKET")
# The same kernel with ATOMIC_DQ, its own autotuner: every timed trial adds into DQ32, which must start from zero
# for each (the autotuner zeroes it before every trial and again before the launch it returns from).
_attn_bwd_dkdv_dq_tuned = _tuned(_attn_bwd_dkdv, DKDV_DQ_CONFIGS, "BLOCK_N", "SKV_BUCKET", reset_to_zero=["DQ32"])


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: "ieee" (exact fp32 products) for float32, "tf32" (Triton's default, which
    fp16/bf16 inputs ignore) otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch(kernel, tuned, grid_dim, args, flags, config):
    """A fixed config (interpreter, tests) or the autotuned kernel; ``grid_dim(BLOCK_M, BLOCK_N)`` gives the grid."""
    if config is None and not INTERPRET:
        tuned[lambda meta: grid_dim(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **flags)
        return
    config = dict(config or INTERPRETER_CONFIG)
    if INTERPRET:  # the interpreter runs programs one by one; warps and stages mean nothing there
        config.pop("num_warps", None)
        config.pop("num_stages", None)
    kernel[grid_dim(config["BLOCK_M"], config["BLOCK_N"])](*args, **flags, **config)


#: How dQ is computed when dK or dV are computed too: "separate" (the dq kernel, deterministic) or "atomic" (added by
#: the dK/dV programs with fp32 atomics). ``kernels.flash_attention``'s autograd function reads it at each forward.
DQ_MODE = "separate"
DQ_MODES = ("separate", "atomic")


def flash_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, *, causal: bool, sm_scale: float, dlse: torch.Tensor | None = None,
                             needs: tuple[bool, bool, bool] = (True, True, True),
                             config: dict | None = None, dq_mode: str | None = None) -> tuple[torch.Tensor | None, ...]:
    """(dq, dk, dv) of ``out = flash_attention(q, k, v, causal, sm_scale)`` given dO = ``do``.

    q, out, do: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D]; lse: [B, Hq, Sq] float32 (natural log, contiguous), as the
    forward returns it. ``dlse``: the gradient of lse when the caller used it too (d lse_i / d s_ij = P_ij, so it
    enters as Δ - dlse). ``needs``: which of dq, (dk, dv) to compute (None for the others). ``config``: a fixed
    ``dict(BLOCK_M=..., BLOCK_N=..., num_warps=..., num_stages=...)`` for both kernels instead of autotuning.
    ``dq_mode``: "separate" or "atomic" (default: the module's ``DQ_MODE``); "atomic" only changes anything when dq
    and dk or dv are all needed (dq alone: the dq kernel's 3 matmuls beat the fused kernel's 5).
    Inputs are trusted (the autograd function's forward checked them); any strides.
    """
    dq_mode = DQ_MODE if dq_mode is None else dq_mode
    if dq_mode not in DQ_MODES:
        raise ValueError(f"dq_mode must be one of {DQ_MODES}, got {dq_mode!r}")
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if q.numel() == 0:  # no queries (or no batch): nothing flows back, and a 0-sized grid is not a launch
        return tuple(torch.zeros_like(t) if need else None for t, need in zip((q, k, v), needs))
    delta = torch.empty_like(lse)  # [B, Hq, Sq] fp32
    _attn_bwd_preprocess[(triton.cdiv(Sq, 64), B * Hq)](out, do, delta, *out.stride(), *do.stride(), Hq, Sq,
                                                         HEAD_DIM=D, BLOCK_M=64)
    if dlse is not None:
        delta -= dlse
    flags = dict(HEAD_DIM=D, CAUSAL=bool(causal), DOT_PRECISION=dot_precision(q.dtype))
    buckets = (triton.next_power_of_2(Sq), triton.next_power_of_2(Skv))
    common = (Sq, Skv, sm_scale * LOG2E, sm_scale, *buckets)
    dq = dk = dv = None
    atomic = dq_mode == "atomic" and needs[0] and (needs[1] or needs[2])
    if needs[1] or needs[2]:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        # atomic: the programs add into a zeroed fp32 dQ (the zeroing and the cast below are part of its cost);
        # separate: DQ32 is never touched (ATOMIC_DQ is a constexpr), dk stands in for the pointer
        dq32 = torch.zeros_like(q, dtype=torch.float32) if atomic else dk
        dq32_strides = dq32.stride() if atomic else (0, 0, 0, 0)
        args = (q, k, v, do, dk, dv, lse, delta, dq32, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                *dk.stride(), *dv.stride(), *dq32_strides, Hq, Hkv, Hq // Hkv, *common)
        _launch(_attn_bwd_dkdv, _attn_bwd_dkdv_dq_tuned if atomic else _attn_bwd_dkdv_tuned,
                lambda bm, bn: (triton.cdiv(Skv, bn), B * Hkv), args, dict(flags, ATOMIC_DQ=atomic), config)
        if atomic:
            dq = dq32.to(q.dtype)  # float32 inputs: the buffer itself
    if needs[0] and not atomic:
        dq = torch.empty_like(q)
        args = (q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                Hq, Hq // Hkv, *common)
        _launch(_attn_bwd_dq, _attn_bwd_dq_tuned, lambda bm, bn: (triton.cdiv(Sq, bm), B * Hq), args, flags, config)
    return dq, (dk if needs[1] else None), (dv if needs[2] else None)
