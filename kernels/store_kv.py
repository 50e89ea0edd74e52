"""Write new keys and values into a paged KV cache, each token to its slot (lesson 02).

``k_cache[slot // P, slot % P] = k[t]`` (and the same for v) for every token t, with
``slot = slot_mapping[t]`` computed by the block manager (``block_table[i // P] * P + i % P``). A negative
slot means "skip this token" (vLLM's convention for padding). One program per token copies its
``[Hkv, D]`` keys and values: a pure memory-movement kernel.
"""
from __future__ import annotations

import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from kernels._checks import check_slot_mapping, check_tensors

#: Dtypes of keys, values and caches the kernel accepts.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr,                      # new keys / values [T, Hkv, D]
    k_cache_ptr, v_cache_ptr,          # caches [N, P, Hkv, D], contiguous: slot s starts at s * Hkv * D
    slot_mapping_ptr,                  # [T] int: the physical slot of each token (< 0: skip)
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,   # powers of two >= NUM_KV_HEADS, HEAD_DIM (tl.arange needs them)
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)   # int64: slot * Hkv * D can pass 2**31
    if slot >= 0:
        h = tl.arange(0, HEADS_PAD)[:, None]
        d = tl.arange(0, DIM_PAD)[None, :]
        mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
        k = tl.load(k_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
        dst = slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, validate: bool = True) -> None:
    """Write k, v ``[T, Hkv, D]`` into k_cache, v_cache ``[N, P, Hkv, D]`` at ``slot_mapping`` ``[T]`` (in place).

    Slots are ``block * P + offset``; a negative slot skips its token. Raises ValueError, naming the
    argument, on a wrong shape, dtype, device, layout or (with ``validate``, one device-to-host copy) an
    out-of-range slot. ``validate=False``: the engine's path, for slots its block manager computed.
    """
    check_tensors([("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)])
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)}; expected [num_blocks, block_size, Hkv, D]")
    N, P, Hkv, D = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}; expected the shape of k_cache, "
                         f"{tuple(k_cache.shape)}")
    if k.dim() != 3 or k.shape[1:] != (Hkv, D):
        raise ValueError(f"k has shape {tuple(k.shape)}; expected [T, Hkv={Hkv}, D={D}] (the cache's heads and "
                         "head_dim)")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected the shape of k, {tuple(k.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping has shape {tuple(slot_mapping.shape)}; expected [T={k.shape[0]}], one slot "
                         "per token")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping has dtype {slot_mapping.dtype}; expected torch.int32 or torch.int64")
    if k_cache.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"k_cache has dtype {k_cache.dtype}; expected one of {', '.join(map(str, SUPPORTED_DTYPES))}")
    for name, t in (("k", k), ("v", v), ("v_cache", v_cache)):
        if t.dtype != k_cache.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}; expected the dtype of k_cache, {k_cache.dtype}")
    for name, t in (("k", k), ("v", v), ("slot_mapping", slot_mapping)):
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device}; expected the device of k_cache, {k_cache.device}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (the kernel addresses slot s at s * Hkv * D)")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("k and v must be contiguous in their last (head_dim) dimension")
    T = k.shape[0]
    if T == 0:
        return
    if validate:   # a slot past the cache would write someone else's memory
        check_slot_mapping(slot_mapping, N * P)
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=Hkv, HEAD_DIM=D, HEADS_PAD=triton.next_power_of_2(Hkv), DIM_PAD=triton.next_power_of_2(D),
    )
