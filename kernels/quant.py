"""8-bit quantization of K/V, the math the INT8/FP8 cache kernels and their references share (lesson 07).

x ≈ code · scale (+ zero), one scale (and zero point) per group of values, the group being the
**granularity** ("tensor", "token", "head": per (token, kv head), what the cache kernels store, or "channel").
Rounding is half away from zero, computed exactly as the Triton kernels do, so ``kernels.reference`` built on
these helpers matches the kernels code for code. ``course_lib.quant.kv_quant`` teaches it and re-exports it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

#: The 8-bit cache formats: name -> (code dtype, largest code magnitude used by symmetric quantization).
KV_DTYPES = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
GRANULARITIES = ("tensor", "token", "head", "channel")


class Quantized(NamedTuple):
    """codes (int8 / float8_e4m3fn, the shape of x); scale and zero broadcast against codes (zero None: symmetric)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def round_half_away(y: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero: trunc(y ± 0.5) in float32, as the kernels do."""
    return torch.trunc(y + torch.where(y >= 0, 0.5, -0.5))


def _reduce_dims(x: torch.Tensor, granularity: str) -> tuple[int, ...]:
    """Dims of x [..., Hkv, D] that share one scale (leading dims are tokens)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if x.dim() < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected [..., Hkv, D] (tokens first, then kv heads, "
                         "head_dim)")
    n = x.dim()
    return {"tensor": tuple(range(n)), "token": (n - 2, n - 1), "head": (n - 1,),
            "channel": tuple(range(n - 2))}[granularity]


def quantize(x: torch.Tensor, granularity: str = "head", *, kv_dtype: str = "int8", zero_point: bool = False,
             scale_dtype: torch.dtype = torch.float32) -> Quantized:
    """8-bit codes of x ``[..., Hkv, D]`` with one scale (and zero point) per group of ``granularity``.

    Symmetric: scale = max|x| / 127 (FP8: / 448), code = round(x / scale). Asymmetric (``zero_point``, INT8
    only): scale = (max - min) / 255, zero = min + 128 · scale, code = round((x - zero) / scale) in [-128, 127].
    The scale (and zero) are rounded to ``scale_dtype`` first and the codes computed with the rounded values,
    so |x - dequantize(q)| <= scale / 2 (INT8) holds for what is stored. Computed in float32.
    """
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {tuple(KV_DTYPES)}, got {kv_dtype!r}")
    code_dtype, code_max = KV_DTYPES[kv_dtype]
    if zero_point and kv_dtype != "int8":
        raise ValueError("zero_point=True is for INT8; FP8 quantization here is symmetric")
    if scale_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}")
    dims = _reduce_dims(x, granularity)
    xf, tiny = x.float(), torch.finfo(scale_dtype).tiny
    if zero_point:
        mx, mn = xf.amax(dim=dims, keepdim=True), xf.amin(dim=dims, keepdim=True)
        scale = ((mx - mn) / 255.0).clamp_min(tiny).to(scale_dtype).float()
        zero = (mn + 128.0 * scale).to(scale_dtype).float()
        y = ((xf - zero) / scale).clamp(-128.0, 127.0)
    else:
        amax = xf.abs().amax(dim=dims, keepdim=True)
        scale = (amax / code_max).clamp_min(tiny).to(scale_dtype).float()   # an all-zero group: no 0 / 0
        zero = None
        y = (xf / scale).clamp(-code_max, code_max)
    codes = y.to(code_dtype) if kv_dtype == "fp8" else round_half_away(y).to(torch.int8)
    return Quantized(codes, scale.to(scale_dtype), None if zero is None else zero.to(scale_dtype))


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes · scale (+ zero), in ``dtype``."""
    x = q.codes.float() * q.scale.float()
    if q.zero is not None:
        x = x + q.zero.float()
    return x.to(dtype)


def fake_quantize(x: torch.Tensor, granularity: str = "head", **kwargs) -> torch.Tensor:
    """dequantize(quantize(x)): x with exactly the error an 8-bit cache adds, in x's dtype."""
    return dequantize(quantize(x, granularity, **kwargs), x.dtype)
