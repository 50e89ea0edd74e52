"""RMSNorm in one kernel (lesson 10: fewer, fuller kernels per decode step).

``out = weight * (x / sqrt(mean(x²) + eps))``, rows of E features. In plain torch that is seven kernels (upcast,
square, mean, add, rsqrt, multiply, downcast, and the weight): each reads and writes the whole row, and at a
decode step of a small model each costs more to launch than to run. One program here owns one row: it reads it
once, reduces in float32 and writes the result once. It rounds exactly where the torch version rounds (the
normalized row to x's dtype, then the product with the weight), so both give the same numbers.
"""
from __future__ import annotations

import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from kernels._checks import check_tensors


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, stride_x, stride_o, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)        # one float per row
    y = (x * rstd).to(out_ptr.dtype.element_ty)                        # rounded as the torch version rounds it
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x ``[..., E]`` (contiguous in it) with ``weight`` ``[E]``; x's dtype."""
    check_tensors([("x", x)])
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected [{x.shape[-1]}] (x's last dimension)")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty_like(x2)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), x2.shape[1], eps,
                                         BLOCK=triton.next_power_of_2(x2.shape[1]))
    return out.view(x.shape)
