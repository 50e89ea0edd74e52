"""FlashAttention forward in Triton (after Triton's tutorial 06-fused-attention.py): softmax(q kᵀ·scale) v
without ever writing the [Sq, Skv] score matrix to memory; differentiable through ``FlashAttentionFunction``, whose
backward is in ``kernels.flash_attention_bwd``.

Each program owns BLOCK_M query rows of one (batch, query head). It keeps them in registers and streams the
keys and values of their kv head through on-chip memory, BLOCK_N rows at a time, with the *online softmax*:
a running row maximum ``m_i``, a running sum of exponentials ``l_i`` and an unnormalized output ``acc``; when a
new block raises the maximum, the old ``l_i`` and ``acc`` are rescaled by ``exp(m_old - m_new)``. HBM traffic
is one read of Q, K, V and one write of O (plus K/V re-reads per query block), O(S·D) instead of O(S²).

Details that make it fast, as in the tutorial:
- ``exp2`` instead of ``exp``: the softmax scale is folded into ``qk_scale = sm_scale · log2(e)``, so
  ``exp(s·x) = exp2(qk_scale·x)`` costs one multiply per score (exp2 is the native instruction).
- The causal two-stage loop: key blocks that every row of the query block may see are processed without a
  mask (stage 1); only the few blocks on the diagonal, and the last partial block, pay for one (stage 2).
- Autotuned block sizes, warps and pipeline stages on a GPU (one small fixed config in the interpreter).

Shapes: q [B, Hq, Sq, D], k and v [B, Hkv, Skv, D], GQA with Hq % Hkv == 0 (query head h reads kv head
h // (Hq / Hkv)). With ``causal`` the queries are the last Sq of the Skv positions (bottom-right alignment:
query i sees keys j <= i + Skv - Sq), as in prefill after a cached prefix or in decoding.
"""
from __future__ import annotations

import math

import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from kernels.device import INTERPRET
from kernels._checks import check_device, check_sm_scale
import kernels.flash_attention_bwd as _bwd  # its DQ_MODE, read at each forward
from kernels.flash_attention_bwd import dot_precision, flash_attention_backward, fp32_tiles

#: Head dimensions the kernel is built for (tl.dot needs >= 16; larger ones need smaller blocks than tuned here).
HEAD_DIMS = (16, 32, 64, 128)
#: Dtypes compiled on a GPU (float32 with exact fp32 dots, no TF32); the interpreter runs float32/float16 (its
#: bfloat16 tl.dot is broken, triton #11584).
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_DTYPES = (torch.float32, torch.float16)
#: The launch config used in the interpreter: small blocks keep CPU runs fast (BLOCK_N < BLOCK_M on purpose,
#: so the stage bounds are exercised with unequal blocks).
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=16)
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q,  # running state of BLOCK_M query rows, and the rows themselves
                    k_ptrs, v_ptrs,  # pointers to K/V rows 0..BLOCK_N-1 of this kv head: [BLOCK_N, HEAD_DIM]
                    stride_kn, stride_vn,  # elements between consecutive K (V) rows
                    offs_m, offs_n,  # query rows of this block [BLOCK_M], 0..BLOCK_N-1 [BLOCK_N]
                    lo, hi,  # the key rows [lo, hi) this stage streams, lo a multiple of BLOCK_N
                    Skv, causal_offset, qk_scale,  # keys in all; Skv - Sq; sm_scale * log2(e)
                    STAGE: tl.constexpr,  # 1: every key of [lo, hi) is visible to every row, no mask;
                    # 2: mask keys >= Skv and, when CAUSAL, keys after a row's position
                    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)  # a hint for the compiler: aligned loads
        cols = start_n + offs_n  # key positions of this block [BLOCK_N]
        # -- scores of BLOCK_M queries against BLOCK_N keys, in fp32 on the tensor cores --
        if STAGE == 1:
            k = tl.load(k_ptrs + start_n * stride_kn)  # [BLOCK_N, HEAD_DIM], in bounds: no mask needed
        else:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=cols[:, None] < Skv, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if STAGE == 2:
            visible = cols[None, :] < Skv
            if CAUSAL:  # query row i sits at position i + Skv - Sq and sees keys up to there
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))  # new running max (log2 units, scale folded in)
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]  # one fused multiply-add per score
        p = tl.math.exp2(qk)  # unnormalized probabilities, <= 1
        # -- online softmax: rescale what was accumulated under the old max --
        alpha = tl.math.exp2(m_i - m_ij)  # exp(m_old - m_new) <= 1; 0 on the first block (m_old = -inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # -- accumulate P @ V (P rounded to V's dtype for the tensor cores, the sum stays fp32) --
        if STAGE == 1:
            v = tl.load(v_ptrs + start_n * stride_vn)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=cols[:, None] < Skv, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Sq", "Skv", "SQ_BUCKET", "SKV_BUCKET"])   # one compilation for every length
def _attn_fwd(Q, K, V, Out, LSE,  # pointers; LSE [B, Hq, Sq] fp32, written only when RETURN_LSE
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              Hq, GROUP,  # query heads; query heads per kv head (Hq // Hkv)
              Sq, Skv, qk_scale,
              SQ_BUCKET, SKV_BUCKET,  # next powers of two of Sq, Skv: only the autotuner's cache key reads them
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, RETURN_LSE: tl.constexpr,
              DOT_PRECISION: tl.constexpr):  # "ieee" for float32 inputs (exact fp32 products), else "tf32"
    # Grid: (query blocks, B * Hq). Causal programs of late query blocks have the most keys to visit:
    # launch those first so that the short ones fill the tail of the GPU's schedule.
    if CAUSAL:
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // Hq).to(tl.int64)  # int64: batch offsets of large tensors overflow int32
    off_h = off_bh % Hq
    off_hkv = off_h // GROUP  # GQA: GROUP consecutive query heads share one kv head

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this program
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + off_b * stride_kb + off_hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    # The query block stays in registers for the whole loop; rows past Sq read zeros and are never stored.
    q = tl.load(q_ptrs, mask=offs_m[:, None] < Sq, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the scaled scores (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running sum of exp2(score - m_i) * v

    causal_offset = Skv - Sq
    if CAUSAL:
        # Keys [0, full_end) are visible to every row of the block (the first row, at position
        # start_m*BLOCK_M + Skv - Sq, sees them all): stage 1. Keys [full_end, diag_end) are visible to some
        # rows only (the diagonal): stage 2, masked. Keys from diag_end on are hidden from all rows: skipped.
        full_end = tl.minimum(start_m * BLOCK_M + causal_offset + 1, Skv) // BLOCK_N * BLOCK_N
        diag_end = tl.minimum((start_m + 1) * BLOCK_M + causal_offset, Skv)
    else:
        full_end = Skv // BLOCK_N * BLOCK_N  # whole blocks: no mask; the last partial block: masked
        diag_end = Skv
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                                    0, full_end, Skv, causal_offset, qk_scale, 1, CAUSAL, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                                    full_end, diag_end, Skv, causal_offset, qk_scale, 2, CAUSAL, BLOCK_N,
                                    DOT_PRECISION)

    # Epilogue: normalize once at the end (not per block), store.
    acc = acc / l_i[:, None]
    if RETURN_LSE:  # log-sum-exp of the scaled scores, natural log: what a backward pass or a merge of
        # partial attentions (split-KV decoding) needs
        lse_ptrs = LSE + off_bh.to(tl.int64) * Sq + offs_m
        tl.store(lse_ptrs, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=offs_m < Sq)  # · ln(2)
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=offs_m[:, None] < Sq)


def stage_bounds(start_m: int, block_m: int, block_n: int, Sq: int, Skv: int, causal: bool) -> tuple[int, int]:
    """The key ranges of query block ``start_m``, as the kernel computes them (a host-side mirror, for plots):
    keys [0, full_end) are stage 1 (no mask), [full_end, diag_end) stage 2 (masked), [diag_end, Skv) skipped."""
    if causal:
        offset = Skv - Sq
        return min(start_m * block_m + offset + 1, Skv) // block_n * block_n, min((start_m + 1) * block_m + offset, Skv)
    return Skv // block_n * block_n, Skv


# ---------------------------------------------------------------- autotuning (GPU only)
#: (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on a GPU. Few on purpose: each one is a compilation. 128 x 128
#: with 8 warps and 3 stages: the fastest fixed config of this kernel at D = 128, N = 8k on an H100 (0.81x cuDNN,
#: against 0.77x for the 128 x 64 one the autotuner picked before it was listed;
#: benchmarks/results/flash_attention_configs_nvidia-h100-80gb-hbm3.json).
GPU_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
               (64, 128, 4, 3), (16, 64, 4, 3), (16, 128, 4, 2)]


def _prune_configs(configs, named_args, **kwargs):
    """Keep block heights that suit the number of queries: 16 rows for decoding, 64-128 for prefill."""
    args = {**named_args, **kwargs}
    configs = fp32_tiles(configs, args["DOT_PRECISION"])     # float32: small tiles only (see FP32_MAX_TILE)
    sq_bucket = args["SQ_BUCKET"]
    keep = [c for c in configs if min(sq_bucket, 64) <= c.kwargs["BLOCK_M"] <= max(sq_bucket, 16)]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


_attn_fwd_tuned = None if INTERPRET else triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in GPU_CONFIGS],
    key=["SQ_BUCKET", "SKV_BUCKET", "HEAD_DIM", "CAUSAL", "RETURN_LSE", "DOT_PRECISION"],  # (+ the tensors' dtypes)
    prune_configs_by={"early_config_prune": _prune_configs},
)(_attn_fwd)


# ---------------------------------------------------------------- the public wrapper
def _check_inputs(q, k, v, causal, sm_scale) -> None:
    """Raise a ValueError naming the argument for anything the kernel cannot compute."""
    allowed = INTERPRETER_DTYPES if INTERPRET else GPU_DTYPES
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4 dims, "
                             f"{'[B, Hq, Sq, D]' if name == 'q' else '[B, Hkv, Skv, D]'}")
        if t.dtype not in allowed:
            why = (" (the Triton interpreter's bfloat16 tl.dot returns garbage, triton issue 11584: on CPU use "
                   "float16 or float32)" if INTERPRET and t.dtype == torch.bfloat16 else "")
            raise ValueError(f"{name} has dtype {t.dtype}; expected one of {', '.join(map(str, allowed))}{why}")
        check_device(name, t)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}; expected the dtype of q, {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}; expected the device of q, {q.device}")
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected [B={B}, Hkv, Skv, D={D}] to match q {tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected the shape of k, {tuple(k.shape)}")
    Hkv, Skv = k.shape[1], k.shape[2]
    if D not in HEAD_DIMS:
        raise ValueError(f"q has head dim D={D} (shape {tuple(q.shape)}); expected one of {HEAD_DIMS}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k has {Hkv} kv heads (shape {tuple(k.shape)}); expected a divisor of q's {Hq} heads (GQA)")
    if Skv == 0:
        raise ValueError(f"k has shape {tuple(k.shape)}: no keys to attend to (Skv = 0)")
    if causal and Sq > Skv:
        raise ValueError(f"causal attention needs Sq <= Skv (queries are the last Sq of the Skv positions); "
                         f"got q with Sq={Sq} and k with Skv={Skv}")
    check_sm_scale(sm_scale)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    sm_scale: float | None = None, return_lse: bool = False, config: dict | None = None,
                    hopper: bool | str = "auto"):
    """softmax(q kᵀ · sm_scale) v with the Triton FlashAttention forward kernel ``_attn_fwd``; differentiable.

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D] with Hq % Hkv == 0; D in 16/32/64/128; any Sq, Skv >= 1.
    dtypes: float16/bfloat16/float32 compiled on a GPU, float32/float16 in the interpreter (CPU tensors). float32
    inputs use exact fp32 dots (``input_precision="ieee"``, no TF32 rounding), forward and backward.
    causal: queries are the last Sq of the Skv positions (query i sees keys j <= i + Skv - Sq).
    sm_scale: default 1/sqrt(D).
    Returns out [B, Hq, Sq, D] in q's dtype, and with ``return_lse`` also the log-sum-exp of each row of
    scaled scores, lse [B, Hq, Sq] float32 (natural log), so that softmax = exp(scores·sm_scale - lse).
    Gradients: when autograd records (grad enabled and q, k or v requires grad) the call goes through
    ``FlashAttentionFunction``, whose forward saves q, k, v, out and lse, and whose backward runs the Triton
    kernels of ``kernels.flash_attention_bwd`` (lse is differentiable too), with that module's ``DQ_MODE`` as it was
    at the forward ("separate", the default, or "atomic" dQ). Otherwise nothing is saved.
    config: a fixed launch config ``dict(BLOCK_M=..., BLOCK_N=..., num_warps=..., num_stages=...)`` instead of
    autotuning (a serving engine's ``serving_config``, tests); with gradients the backward's kernels use it too.
    hopper: True (or a variant name of ``kernels.flash_attention_hopper.VARIANTS``) runs the forward with TMA
    tensor descriptors (``kernels.flash_attention_hopper``) where it can: float16/bfloat16 on an sm_90+ GPU with a
    Triton that has descriptors, or the interpreter; elsewhere, and for float32, the portable kernel runs. False:
    the portable kernel always. "auto" (the default): the TMA forward only where it was measured faster
    (``use_hopper_forward``: D = 128, float16/bfloat16, autotuned, on an sm_90+ GPU), else the portable kernel; the
    interpreter always runs the portable one. "gluon": the warp-specialized Gluon forward
    (``kernels.flash_attention_gluon``) where its scope covers the call (an sm_90 GPU, float16/bfloat16, D 64 or
    128, Sq a multiple of 128, autotuned), else what "auto" would run. The backward is the same either way.
    Raises ValueError, naming the argument, for shapes, dtypes or devices it cannot handle.
    """
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v)):
        out, lse = FlashAttentionFunction.apply(q, k, v, causal, sm_scale, config, hopper)
        return (out, lse) if return_lse else out
    return _flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, return_lse=return_lse, config=config,
                            hopper=hopper)


class FlashAttentionFunction(torch.autograd.Function):
    """FlashAttention-2 for autograd: the forward keeps O and the log-sum-exp (O(S) floats per head) instead of the
    [Sq, Skv] probabilities; the backward recomputes them block by block (``kernels.flash_attention_bwd``)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, config, hopper="auto"):
        if _bwd.DQ_MODE not in _bwd.DQ_MODES:  # here, not in the backward: the error comes with the bad setting
            raise ValueError(f"kernels.flash_attention_bwd.DQ_MODE must be one of {_bwd.DQ_MODES}, "
                             f"got {_bwd.DQ_MODE!r}")
        out, lse = _flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, return_lse=True, config=config,
                                    hopper=hopper)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.config = bool(causal), config
        ctx.dq_mode = _bwd.DQ_MODE  # at the forward: a benchmark may switch modes between two training steps
        ctx.sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        ctx.set_materialize_grads(False)  # a None gradient (lse unused) stays None: no zero tensors to read
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None, None, None, None
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, causal=ctx.causal, sm_scale=ctx.sm_scale,
                                              dlse=dlse, needs=ctx.needs_input_grad[:3], config=ctx.config,
                                              dq_mode=ctx.dq_mode)
        return dq, dk, dv, None, None, None, None


def serving_config(num_queries: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A fixed launch config for a serving engine's prefill chunks (``course_lib.serving.kv_pool.chunk_attention``: the
    8-bit pool's prefill, which attends over dequantized contiguous copies): no autotuning
    inside the engine's loop, where every new (Sq, Skv) bucket would compile and time up to 7 configs while the
    requests wait (seen on an H200: the first capstone run with chunked prefill at 0.13-0.5x the speed of the second).
    16 query rows per program for short chunks (speculative verify, small tails), 64 above; float32 tiles take twice
    the shared memory, so half as many keys per block and 2 pipeline stages (as ``paged_prefill.prefill_config``)."""
    if INTERPRET:
        return dict(INTERPRETER_CONFIG)
    wide = dtype == torch.float32
    return dict(BLOCK_M=16 if num_queries <= 16 else 64, BLOCK_N=32 if wide else 64, num_warps=4,
                num_stages=2 if wide else 3)


#: The head dims at which ``hopper="auto"`` takes the TMA forward. Measured on an H100 (torch 2.11, triton 3.6):
#: forward alone at D = 128, N = 4k-16k, its variant "tma_wide" 0.80-0.91x cuDNN's time where the portable kernel
#: is 0.80-0.85x, faster in 7 of 8 bf16/fp16 shapes (flash_attention_hopper_nvidia-h100-80gb-hbm3.json); forward +
#: backward 0.72-0.74x cuDNN vs 0.66-0.73x, faster in all 8 shapes (flash_attention_bwd_nvidia-h100-80gb-hbm3_tma.json).
#: At D = 64 the portable kernel was as fast or faster (0.93-0.96x vs 0.89-0.93x): not taken there.
HOPPER_AUTO_HEAD_DIMS = (128,)


def hopper_forward_rule(head_dim: int, dtype: torch.dtype, config: dict | None, compiled_on_hopper: bool) -> bool:
    """``hopper="auto"``'s rule, on plain facts (tested on a CPU): a head dim of ``HOPPER_AUTO_HEAD_DIMS``,
    float16/bfloat16, autotuned (a fixed ``config`` is a portable kernel's config: kept), compiled on an sm_90+ GPU."""
    return (compiled_on_hopper and config is None and dtype in (torch.float16, torch.bfloat16)
            and head_dim in HOPPER_AUTO_HEAD_DIMS)


def use_hopper_forward(q: torch.Tensor, config: dict | None) -> bool:
    """``hopper="auto"``: True where the TMA forward was measured faster (``hopper_forward_rule``) for this call."""
    if INTERPRET or not q.is_cuda:
        return False
    from kernels import flash_attention_hopper as tma  # here: it imports this module

    return hopper_forward_rule(q.shape[-1], q.dtype, config, tma.hopper_status() is None)


def use_gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, config: dict | None) -> bool:
    """``hopper="gluon"``: True where the Gluon forward can run this call (autotuned, i.e. no fixed portable
    ``config``; inside its scope, ``flash_attention_gluon.outside_scope``; on an sm_90 GPU, ``gluon_status``)."""
    if INTERPRET or not q.is_cuda or config is not None:
        return False
    from kernels import flash_attention_gluon as fg

    return fg.outside_scope(q, k, v, causal) is None and fg.gluon_status() is None


def _flash_attention(q, k, v, *, causal=False, sm_scale=None, return_lse=False, config: dict | None = None,
                     hopper: bool | str = "auto"):
    """The forward launch, outside autograd: ``flash_attention`` with an optional fixed launch config
    ``dict(BLOCK_M=..., BLOCK_N=..., num_warps=..., num_stages=...)`` instead of autotuning (tests use it)."""
    _check_inputs(q, k, v, causal, sm_scale)
    if hopper == "gluon":
        if use_gluon_forward(q, k, v, causal, config):
            from kernels import flash_attention_gluon as fg  # here: Gluon needs no interpreter setup, only a GPU

            return fg.flash_attention_gluon(q, k, v, causal=causal, sm_scale=sm_scale, return_lse=return_lse)
        hopper = "auto"   # outside its scope: what the default runs
    if hopper == "auto":
        hopper = use_hopper_forward(q, config)
    if hopper and (INTERPRET or q.dtype != torch.float32):
        from kernels import flash_attention_hopper as tma  # here: it imports this module

        if tma.hopper_status() is None:
            variant = hopper if isinstance(hopper, str) else tma.DEFAULT_VARIANT
            return tma.flash_attention_hopper(q, k, v, causal=causal, sm_scale=sm_scale, return_lse=return_lse,
                                              variant=variant, config=config)
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:  # Sq = 0 or B = 0 or Hq = 0: nothing to compute, and a 0-sized grid is not a launch
        return (out, lse) if return_lse else out
    args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            Hq, Hq // Hkv, Sq, Skv, scale * LOG2E, triton.next_power_of_2(Sq), triton.next_power_of_2(Skv))
    flags = dict(HEAD_DIM=D, CAUSAL=bool(causal), RETURN_LSE=bool(return_lse), DOT_PRECISION=dot_precision(q.dtype))
    if config is None and not INTERPRET:
        grid = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * Hq)  # BLOCK_M: the tuned one
        _attn_fwd_tuned[grid](*args, **flags)
    else:
        config = dict(config or INTERPRETER_CONFIG)
        if INTERPRET:  # the interpreter runs programs one by one; warps and stages mean nothing there
            config.pop("num_warps", None)
            config.pop("num_stages", None)
        _attn_fwd[(triton.cdiv(Sq, config["BLOCK_M"]), B * Hq)](*args, **flags, **config)
    return (out, lse) if return_lse else out
