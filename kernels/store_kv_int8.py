"""Write new keys and values into an 8-bit paged KV cache, quantizing them on the way (lesson 07).

Like ``kernels.store_kv`` (lesson 02) every token t goes to its slot ``s = slot_mapping[t]``, but each row of
D values ``x = k[t, h, :]`` (one token, one kv head) is stored as D one-byte **codes** plus one **scale**
(and, optionally, one **zero point**) in ``k_scale[s // P, s % P, h]``:

* symmetric INT8 (the default):   scale = max|x| / 127,       code = round(x / scale) in [-127, 127],
                                   x ≈ code · scale;
* asymmetric INT8 (``k_zero`` given): scale = (max x - min x) / 255,  zero = min x + 128 · scale,
                                   code = round((x - zero) / scale) in [-128, 127],  x ≈ code · scale + zero;
* FP8 e4m3 (``torch.float8_e4m3fn`` caches, GPUs of compute capability >= 8.9): scale = max|x| / 448
  (e4m3's largest finite value), code = fp8(x / scale), x ≈ code · scale.

Quantization is **fused into the cache write**: one program per token reads its ``[Hkv, D]`` keys and values
once, finds each row's range, and writes codes and scales — no full-precision copy of the cache ever exists.
Scales are rounded to the scale tensor's dtype *before* the codes are computed, so the stored (scale, code)
pair is what the error bound |x - code·scale| <= scale / 2 is about. Rounding is half away from zero, done
with ``div_rn`` (IEEE division: Triton's default fp32 ``/`` on a GPU is approximate): the plain-torch twin
``kernels.reference.store_kv_int8`` gives the same codes bit for bit.
"""
from __future__ import annotations

import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from kernels.device import HAS_GPU, INTERPRET
from kernels._checks import check_finite, check_slot_mapping, check_tensors

#: Dtypes of the new keys / values the kernel accepts (the model's compute dtype).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Dtypes of the scales (and zero points): fp16 halves their overhead (2 bytes per row of D codes).
SCALE_DTYPES = (torch.float16, torch.float32)
#: The cache's code dtypes and the largest code magnitude of each (symmetric).
CODE_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
MODE_SYMMETRIC, MODE_ASYMMETRIC, MODE_FP8 = 0, 1, 2


def fp8_supported() -> tuple[bool, str]:
    """(supported, why not): FP8 e4m3 caches need a GPU of compute capability >= 8.9 (Ada, Hopper, ...).

    In the Triton interpreter (CPU) the fp32 -> fp8e4nv conversion is wrong for values that round up to the
    next power of two (triton 3.7.1 rounds 127.8 to 64, not 128), so the FP8 *write* is GPU-only; reading FP8
    caches (``kernels.paged_attention_int8_decode``) works in the interpreter too."""
    if INTERPRET or not HAS_GPU:
        return False, ("FP8 writes are not supported in the Triton interpreter (its fp32->fp8e4nv conversion "
                       "mis-rounds values at power-of-two boundaries); run on a GPU with compute capability >= 8.9")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return False, f"FP8 e4m3 needs compute capability >= 8.9; this GPU has {major}.{minor}"
    return True, ""


@triton.jit
def _quantize_rows(x, mask, h_ok, min_scale, MODE: tl.constexpr, CODE_MAX: tl.constexpr,
                   SCALE_TY: tl.constexpr, CODE_TY: tl.constexpr):
    """x [HEADS, DIM] fp32 -> (codes [HEADS, DIM], scale [HEADS], zero [HEADS]), one scale per row."""
    if MODE == 1:   # asymmetric: the row's [min, max] onto the 256 codes -128 ... 127
        mx = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        mn = tl.min(tl.where(mask, x, float("inf")), axis=1)
        mx = tl.where(h_ok, mx, 0.0)      # padding rows (h >= Hkv): keep them finite
        mn = tl.where(h_ok, mn, 0.0)
        scale = tl.maximum(tl.math.div_rn(mx - mn, 255.0), min_scale).to(SCALE_TY).to(tl.float32)
        zero = (mn + 128.0 * scale).to(SCALE_TY).to(tl.float32)
        y = tl.math.div_rn(x - zero[:, None], scale[:, None])
        y = tl.minimum(tl.maximum(y, -128.0), 127.0)
    else:           # symmetric: [-max|x|, max|x|] onto -CODE_MAX ... CODE_MAX, zero stays 0
        amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
        # the floor on the scale: an all-zero row would otherwise divide 0 by 0
        scale = tl.maximum(tl.math.div_rn(amax, CODE_MAX), min_scale).to(SCALE_TY).to(tl.float32)
        zero = tl.zeros_like(scale)
        y = tl.math.div_rn(x, scale[:, None])
        y = tl.minimum(tl.maximum(y, -CODE_MAX), CODE_MAX)   # the scale was rounded: y may pass CODE_MAX by an ulp
    if MODE == 2:
        codes = y.to(CODE_TY)                                  # fp8 e4m3: round to nearest even, in hardware
    else:
        # round half away from zero: truncation toward zero of y +- 0.5
        codes = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int32).to(tl.int8)
    return codes, scale, zero


@triton.jit
def _store_kv_int8_kernel(
    k_ptr, v_ptr,                       # new keys / values [T, Hkv, D], fp16 / bf16 / fp32
    k_cache_ptr, v_cache_ptr,           # 8-bit caches [N, P, Hkv, D], contiguous: slot s starts at s * Hkv * D
    k_scale_ptr, v_scale_ptr,           # scales [N, P, Hkv], contiguous: slot s, head h at s * Hkv + h
    k_zero_ptr, v_zero_ptr,             # zero points [N, P, Hkv] (asymmetric only; else unused)
    slot_mapping_ptr,                   # [T] int: the physical slot of each token (< 0: skip)
    min_scale,                          # the smallest scale stored (the scale dtype's smallest normal number)
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,     # powers of two >= NUM_KV_HEADS, HEAD_DIM
    MODE: tl.constexpr,                 # 0 symmetric INT8, 1 asymmetric INT8, 2 FP8 e4m3
    CODE_MAX: tl.constexpr,             # 127 (INT8) or 448 (FP8 e4m3)
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)   # int64: slot * Hkv * D can pass 2**31
    if slot >= 0:
        h = tl.arange(0, HEADS_PAD)
        d = tl.arange(0, DIM_PAD)
        h_ok = h < NUM_KV_HEADS
        mask = h_ok[:, None] & (d[None, :] < HEAD_DIM)
        SCALE_TY: tl.constexpr = k_scale_ptr.dtype.element_ty
        CODE_TY: tl.constexpr = k_cache_ptr.dtype.element_ty
        dst = slot * (NUM_KV_HEADS * HEAD_DIM) + h[:, None] * HEAD_DIM + d[None, :]
        dst_scale = slot * NUM_KV_HEADS + h

        k = tl.load(k_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask, other=0.0)
        codes, scale, zero = _quantize_rows(k.to(tl.float32), mask, h_ok, min_scale, MODE, CODE_MAX, SCALE_TY, CODE_TY)
        tl.store(k_cache_ptr + dst, codes, mask=mask)
        tl.store(k_scale_ptr + dst_scale, scale.to(SCALE_TY), mask=h_ok)
        if MODE == 1:
            tl.store(k_zero_ptr + dst_scale, zero.to(SCALE_TY), mask=h_ok)

        v = tl.load(v_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
        codes, scale, zero = _quantize_rows(v.to(tl.float32), mask, h_ok, min_scale, MODE, CODE_MAX, SCALE_TY, CODE_TY)
        tl.store(v_cache_ptr + dst, codes, mask=mask)
        tl.store(v_scale_ptr + dst_scale, scale.to(SCALE_TY), mask=h_ok)
        if MODE == 1:
            tl.store(v_zero_ptr + dst_scale, zero.to(SCALE_TY), mask=h_ok)


def validate_8bit_cache(k_cache, v_cache, k_scale, v_scale, k_zero, v_zero) -> None:
    """Shape / dtype / layout checks shared by the store and the attention kernel (ValueError naming the argument)."""
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)}; expected [num_blocks, block_size, Hkv, D]")
    N, P, Hkv, D = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}; expected the shape of k_cache, "
                         f"{tuple(k_cache.shape)}")
    if k_cache.dtype not in CODE_MAX:
        raise ValueError(f"k_cache has dtype {k_cache.dtype}; expected torch.int8 or torch.float8_e4m3fn "
                         "(a full-precision cache goes through kernels.store_kv / kernels.paged_attention_decode)")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache has dtype {v_cache.dtype}; expected the dtype of k_cache, {k_cache.dtype}")
    if (k_zero is None) != (v_zero is None):
        raise ValueError("give both k_zero and v_zero (asymmetric quantization) or neither (symmetric)")
    if k_zero is not None and k_cache.dtype != torch.int8:
        raise ValueError(f"zero points are for INT8 caches; k_cache has dtype {k_cache.dtype} (FP8 is symmetric)")
    named = [("k_scale", k_scale), ("v_scale", v_scale)]
    if k_zero is not None:
        named += [("k_zero", k_zero), ("v_zero", v_zero)]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != (N, P, Hkv):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [num_blocks, block_size, Hkv] = "
                             f"{(N, P, Hkv)}, one per (slot, kv head)")
        if t.dtype not in SCALE_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; expected torch.float16 or torch.float32")
        if t.dtype != k_scale.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}; expected the dtype of k_scale, {k_scale.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (slot s, head h is at s * Hkv + h)")
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device}; expected the device of k_cache, {k_cache.device}")


def store_kv_int8(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  k_scale: torch.Tensor, v_scale: torch.Tensor, slot_mapping: torch.Tensor, *,
                  k_zero: torch.Tensor | None = None, v_zero: torch.Tensor | None = None,
                  validate: bool = True) -> None:
    """Quantize k, v ``[T, Hkv, D]`` per (token, kv head) and write them at ``slot_mapping`` ``[T]`` (in place).

    k_cache, v_cache: ``[N, P, Hkv, D]`` torch.int8 (or torch.float8_e4m3fn on a GPU that has it);
    k_scale, v_scale: ``[N, P, Hkv]`` float16 / float32; k_zero, v_zero (INT8 only, optional): the same, for
    asymmetric quantization. A negative slot skips its token. Raises ValueError, naming the argument, on a wrong
    shape, dtype, device, layout and, with ``validate`` (device-to-host copies), on an out-of-range slot or a
    value that is not finite: one inf in a row would make its scale inf (every value of the row would then
    dequantize to NaN), one NaN would be stored as a finite code (a silent wrong value). ``validate=False``: the
    engine's path, for slots its block manager computed; a non-finite row is then stored as just said.
    """
    tensors = [("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("k_scale", k_scale),
               ("v_scale", v_scale), ("slot_mapping", slot_mapping)]
    tensors += [(n, t) for n, t in (("k_zero", k_zero), ("v_zero", v_zero)) if t is not None]
    check_tensors(tensors)
    validate_8bit_cache(k_cache, v_cache, k_scale, v_scale, k_zero, v_zero)
    N, P, Hkv, D = k_cache.shape
    if k.dim() != 3 or k.shape[1:] != (Hkv, D):
        raise ValueError(f"k has shape {tuple(k.shape)}; expected [T, Hkv={Hkv}, D={D}] (the cache's heads and "
                         "head_dim)")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected the shape of k, {tuple(k.shape)}")
    if k.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"k has dtype {k.dtype}; expected one of {', '.join(map(str, SUPPORTED_DTYPES))}")
    if v.dtype != k.dtype:
        raise ValueError(f"v has dtype {v.dtype}; expected the dtype of k, {k.dtype}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping has shape {tuple(slot_mapping.shape)}; expected [T={k.shape[0]}], one slot "
                         "per token")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping has dtype {slot_mapping.dtype}; expected torch.int32 or torch.int64")
    for name, t in (("k", k), ("v", v), ("slot_mapping", slot_mapping)):
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device}; expected the device of k_cache, {k_cache.device}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (the kernel addresses slot s at s * Hkv * D)")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("k and v must be contiguous in their last (head_dim) dimension")
    if k_cache.dtype == torch.float8_e4m3fn:
        ok, why = fp8_supported()
        if not ok:
            raise ValueError(f"k_cache has dtype torch.float8_e4m3fn: {why}")
    T = k.shape[0]
    if T == 0:
        return
    if validate:
        check_slot_mapping(slot_mapping, N * P)   # a slot past the cache would write someone else's memory
        check_finite("k", k, slot_mapping)
        check_finite("v", v, slot_mapping)
    if k_cache.dtype == torch.float8_e4m3fn:
        mode = MODE_FP8
    else:
        mode = MODE_ASYMMETRIC if k_zero is not None else MODE_SYMMETRIC
    zeros = (k_zero, v_zero) if k_zero is not None else (k_scale, v_scale)   # unused pointers when symmetric
    _store_kv_int8_kernel[(T,)](
        k, v, k_cache, v_cache, k_scale, v_scale, *zeros, slot_mapping, torch.finfo(k_scale.dtype).tiny,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=Hkv, HEAD_DIM=D, HEADS_PAD=triton.next_power_of_2(Hkv), DIM_PAD=triton.next_power_of_2(D),
        MODE=mode, CODE_MAX=CODE_MAX[k_cache.dtype],
    )
