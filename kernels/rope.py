"""Rotary position embeddings (and Qwen3's per-head RMSNorm before them) in one kernel, in place.

The torch version (``course_lib.model.rope.apply_rope``) splits each head in halves, negates, concatenates, and
multiplies and adds with the position's cos and sin: about ten kernels for q and ten for k per layer, each a
full pass over the heads. Here one program owns one (token, head) row of D features: it loads it once,
optionally normalizes it (``norm_weight``: an RMSNorm over the D features, Qwen3's q_norm / k_norm), rotates
each pair (x[i], x[i + D/2]) by its angle and writes the row back in place. Rounding follows the torch version
(the normalized row, then the rotation, each rounded to x's dtype).
"""
from __future__ import annotations

import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from kernels._checks import check_tensors


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, norm_ptr, stride_xt, stride_xh, stride_ct, eps,
                 HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, HALF)
    base = x_ptr + token * stride_xt + head * stride_xh
    x1 = tl.load(base + d).to(tl.float32)               # first half of the row
    x2 = tl.load(base + HALF + d).to(tl.float32)        # second half
    if HAS_NORM:   # RMSNorm over the D features of this head, rounded as the torch version rounds it
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HEAD_DIM + eps)
        w1 = tl.load(norm_ptr + d).to(tl.float32)
        w2 = tl.load(norm_ptr + HALF + d).to(tl.float32)
        x1 = (w1 * (x1 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
    c1 = tl.load(cos_ptr + token * stride_ct + d).to(tl.float32)         # cos/sin rows are [c, c] and [s, s]
    s1 = tl.load(sin_ptr + token * stride_ct + d).to(tl.float32)
    c2 = tl.load(cos_ptr + token * stride_ct + HALF + d).to(tl.float32)
    s2 = tl.load(sin_ptr + token * stride_ct + HALF + d).to(tl.float32)
    # x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]; each product rounded as torch rounds it
    dt = x_ptr.dtype.element_ty
    y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(base + d, y1.to(dt))
    tl.store(base + HALF + d, y2.to(dt))


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm_weight: torch.Tensor | None = None,
          eps: float = 1e-6) -> torch.Tensor:
    """Rotate x ``[T, H, D]`` in place by the angles of its T tokens (cos, sin ``[T, D]``, in x's dtype, the layout
    of ``course_lib.model.rope.rope_cos_sin``), after an RMSNorm of each head with ``norm_weight`` ``[D]`` if given.
    D must be a power of two (the course's head dims are). Returns x."""
    check_tensors([("x", x)])
    T, H, D = x.shape
    if D & (D - 1) or D < 2:
        raise ValueError(f"x has head_dim {D}; this kernel needs a power of two")
    if (x.stride(2) != 1 or cos.shape != (T, D) or sin.shape != (T, D) or cos.stride(1) != 1
            or sin.stride() != cos.stride()):
        raise ValueError(f"x must be [T, H, D] contiguous in D and cos/sin [T={T}, D={D}] contiguous rows; got "
                         f"{tuple(x.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    if norm_weight is not None and norm_weight.shape != (D,):
        raise ValueError(f"norm_weight has shape {tuple(norm_weight.shape)}; expected [{D}]")
    if T and H:
        _rope_kernel[(T, H)](x, cos, sin, x if norm_weight is None else norm_weight, x.stride(0), x.stride(1),
                             cos.stride(0), eps, HEAD_DIM=D, HALF=D // 2, HAS_NORM=norm_weight is not None)
    return x
