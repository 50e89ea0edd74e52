"""SwiGLU's ``silu(gate) * up`` in one kernel, from the output of one fused gate/up projection (vLLM's
``SiluAndMul``): x ``[..., 2F]`` holds gate in its first F features and up in the last F; the result is
``[..., F]``. Torch needs two kernels (silu, then the product) and a pass over memory each. Rounding follows
``F.silu(gate) * up`` in x's dtype: the silu rounded first, then the product."""
from __future__ import annotations

import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from kernels._checks import check_tensors


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(dt), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :F]) * x[..., F:]`` for x ``[..., 2F]``: ``[..., F]`` in x's dtype."""
    check_tensors([("x", x)])
    if x.shape[-1] % 2:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension; expected 2F (gate, then up)")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    F = x2.shape[1] // 2
    out = torch.empty(x2.shape[0], F, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(F))
    if x2.shape[0] and F:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(F, block))](x2, out, x2.stride(0), out.stride(0), F, BLOCK=block)
    return out.view(*x.shape[:-1], F)
