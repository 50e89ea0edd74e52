"""Vector addition, the "hello world" of Triton (after Triton's tutorial 01-vector-add.py).

``out = x + y`` elementwise. It does one FLOP per element while moving three elements (two loads, one
store), so its arithmetic intensity is tiny (1/12 FLOP/byte in fp32, 1/6 in fp16): on any machine it is
limited by memory bandwidth, which makes it the simplest way to *measure* bandwidth with our own kernel.

The same source runs two ways: compiled to GPU machine code (a CUDA device), or executed by the Triton
interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by ``course_lib.device`` when there is no GPU).
"""
from __future__ import annotations

import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from kernels._checks import check_device

#: Dtypes the kernel accepts (its loads, add and store work the same in each).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _add_kernel(
    x_ptr,  # *Pointer* to the first element of the first input vector.
    y_ptr,  # *Pointer* to the first element of the second input vector.
    out_ptr,  # *Pointer* to the first element of the output vector.
    n_elements,  # Number of elements of each vector.
    BLOCK_SIZE: tl.constexpr,  # Elements each program handles. `constexpr`: a compile-time constant,
    # so it can be used as a shape (tl.arange needs a constant, power-of-two length).
):
    # Many "programs" (instances of this function) run in parallel, each on its own block of the data.
    # The launch grid is 1-D, so the program's id along axis 0 tells us which block is ours.
    pid = tl.program_id(axis=0)
    # Program `pid` handles elements [pid * BLOCK_SIZE, (pid + 1) * BLOCK_SIZE). For a vector of 256
    # elements and BLOCK_SIZE=64, programs 0..3 handle [0:64], [64:128], [128:192], [192:256].
    block_start = pid * BLOCK_SIZE
    # `offsets` is a block (a small tensor) of BLOCK_SIZE indices, not a single number: every Triton
    # operation below works on the whole block at once.
    offsets = block_start + tl.arange(0, BLOCK_SIZE)
    # The last block may run past the end when n_elements is not a multiple of BLOCK_SIZE. The mask is
    # False there, so those lanes neither read nor write memory that is not ours.
    mask = offsets < n_elements
    # Load one block of x and one of y from global memory (HBM on a GPU) into registers.
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    # The only arithmetic: one add per element, done in registers.
    output = x + y
    # Write the block back to global memory, with the same mask.
    tl.store(out_ptr + offsets, output, mask=mask)


def _check_tensor(name: str, t: object) -> None:
    """Raise a ValueError naming the argument if `t` is not a tensor this kernel can read."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {', '.join(map(str, SUPPORTED_DTYPES))}")
    # The kernel indexes flat memory (element i lives at ptr + i), which is only right for contiguous data.
    if not t.is_contiguous():
        raise ValueError(f"{name} with shape {tuple(t.shape)} is not contiguous; pass {name}.contiguous()")
    check_device(name, t)   # compiled kernels read GPU memory; the interpreter reads CPU memory


def add(x: torch.Tensor, y: torch.Tensor, *, block_size: int = 1024) -> torch.Tensor:
    """Return ``x + y`` computed by the Triton kernel ``_add_kernel``.

    x, y: tensors of the same shape, dtype (float16, bfloat16 or float32) and device, contiguous.
    block_size: elements per program, a power of two (the kernel's ``BLOCK_SIZE``).
    Raises ValueError, naming the argument, on a mismatch.
    """
    _check_tensor("x", x)
    _check_tensor("y", y)
    if y.shape != x.shape:
        raise ValueError(f"y has shape {tuple(y.shape)}; expected the shape of x, {tuple(x.shape)} (no broadcasting)")
    if y.dtype != x.dtype:
        raise ValueError(f"y has dtype {y.dtype}; expected the dtype of x, {x.dtype}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device}; expected the device of x, {x.device}")
    if not isinstance(block_size, int) or block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a positive power of two, got {block_size!r}")

    out = torch.empty_like(x)
    n_elements = out.numel()
    if n_elements == 0:  # nothing to do; a grid of 0 programs is not a valid launch
        return out
    # One program per block: ceil(n / BLOCK_SIZE) programs, the last one partly masked.
    grid = (triton.cdiv(n_elements, block_size),)
    # Indexing a jitted function with the grid launches it. Tensors are passed as pointers to their first
    # element; on a GPU the call returns at once (asynchronously), on CPU when the interpreter is done.
    _add_kernel[grid](x, y, out, n_elements, BLOCK_SIZE=block_size)
    return out
