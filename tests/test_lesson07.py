"""Lesson 07 checks: each passes the solution, scores a stub "not attempted", and catches broken variants
(per-tensor scales, dividing by 128, truncating instead of rounding, max instead of max|x|; a kernel that
forgets the scales, uses K's scale for V, or indexes the scales without the kv head)."""
from __future__ import annotations

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

from course_lib.grading import lesson07


def _stub(*args):
    raise NotImplementedError("Exercise: write this function")


def _assert_caught(result, hint_part=None):
    assert (result.status, result.points) == ("failed", 0), result
    assert "hint:" in result.message or "your code raised" in result.message
    if hint_part:
        assert hint_part in result.message, result.message


# ---------------------------------------------------------------- 1. quantize / dequantize per token
def quantize(x):
    scale = (x.float().abs().amax(dim=-1) / 127).clamp_min(1e-8)
    return torch.round(x.float() / scale[..., None]).to(torch.int8), scale


def dequantize(codes, scale):
    return codes.float() * scale[..., None]


def quantize_128(x):                      # the grid -128 ... 128: +128 wraps around in an int8
    scale = (x.float().abs().amax(dim=-1) / 128).clamp_min(1e-8)
    return torch.round(x.float() / scale[..., None]).to(torch.int8), scale


def quantize_per_tensor(x):               # one scale for everything
    scale = (x.float().abs().amax() / 127).clamp_min(1e-8)
    return torch.round(x.float() / scale).to(torch.int8), scale


def quantize_truncating(x):               # .to(int8) alone rounds toward zero
    scale = (x.float().abs().amax(dim=-1) / 127).clamp_min(1e-8)
    return (x.float() / scale[..., None]).to(torch.int8), scale


def quantize_max_not_abs(x):             # max of the row, not of its magnitude: a negative extreme overflows
    scale = (x.float().amax(dim=-1) / 127).clamp_min(1e-8)
    return torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


def test_quantize_per_token_check():
    assert lesson07.check_quantize_per_token(quantize, dequantize).status == "passed"
    assert lesson07.check_quantize_per_token(_stub, dequantize).status == "not attempted"
    assert lesson07.check_quantize_per_token(quantize, _stub).status == "not attempted"
    _assert_caught(lesson07.check_quantize_per_token(quantize_128, dequantize), "127, not 128")
    _assert_caught(lesson07.check_quantize_per_token(quantize_per_tensor, dequantize), "LAST dimension")
    _assert_caught(lesson07.check_quantize_per_token(quantize_truncating, dequantize), "NEAREST")
    _assert_caught(lesson07.check_quantize_per_token(quantize_max_not_abs, dequantize), "max|row|")
    _assert_caught(lesson07.check_quantize_per_token(quantize, lambda c, s: c.float() * s.mean()), "dequantize")


# ---------------------------------------------------------------- 2. the dequantizing load in the kernel
@triton.jit
def _int8_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr,
                           context_lens_ptr, out_ptr, sm_scale, max_blocks_per_seq,
                           NUM_KV_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                           # the classic mistakes, off by default (the solution); _Variant switches one on
                           NO_SCALE: tl.constexpr = False, K_SCALE_FOR_V: tl.constexpr = False,
                           SCALE_NO_HEAD: tl.constexpr = False):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // QUERIES_PER_KV                     # GQA: consecutive query heads share a kv head
    num_heads = NUM_KV_HEADS * QUERIES_PER_KV
    context_len = tl.load(context_lens_ptr + seq)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_p = tl.arange(0, BLOCK_SIZE)
    q = tl.load(q_ptr + (seq * num_heads + head) * HEAD_DIM + offs_d).to(tl.float32)
    m_i = tl.zeros([1], dtype=tl.float32) - float("inf")   # running max of the scores
    l_i = tl.zeros([1], dtype=tl.float32)                  # running sum of exp(score - m_i)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)           # running sum of exp(score - m_i) * v
    for j in range(0, tl.cdiv(context_len, BLOCK_SIZE)):
        block_id = tl.load(block_tables_ptr + seq * max_blocks_per_seq + j)
        mask = j * BLOCK_SIZE + offs_p < context_len
        rows = (block_id * BLOCK_SIZE + offs_p) * NUM_KV_HEADS + kv_head     # [P]: row of [N*P*Hkv, D] and of the scales
        k_codes = tl.load(k_cache_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0)
        if SCALE_NO_HEAD:   # the scale of the slot, forgetting the kv head: (block * P + offset)
            k_scale = tl.load(k_scale_ptr + block_id * BLOCK_SIZE + offs_p, mask=mask, other=0.0).to(tl.float32)
        else:
            k_scale = tl.load(k_scale_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        if NO_SCALE:
            k = k_codes.to(tl.float32)
        else:
            k = k_codes.to(tl.float32) * k_scale[:, None]
        s = tl.sum(k * q[None, :], axis=1) * sm_scale                        # [P] scores
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v_codes = tl.load(v_cache_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0)
        if K_SCALE_FOR_V:
            v_scale = tl.load(k_scale_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        else:
            v_scale = tl.load(v_scale_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        if NO_SCALE:
            v = v_codes.to(tl.float32)
        else:
            v = v_codes.to(tl.float32) * v_scale[:, None]
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    tl.store(out_ptr + (seq * num_heads + head) * HEAD_DIM + offs_d, acc / l_i)

class _Variant:
    """_int8_attention_kernel with one of the classic mistakes switched on (launched like any kernel:
    variant[grid](...))."""

    def __init__(self, **mistakes):
        self.mistakes = mistakes

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _int8_attention_kernel[grid](*args, **kwargs, **self.mistakes)


@triton.jit
def _stub_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, context_lens_ptr,
                 out_ptr, sm_scale, max_blocks_per_seq, NUM_KV_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    raise NotImplementedError("Exercise: write the dequantizing loads")


def test_int8_attention_kernel_check():
    assert lesson07.check_int8_attention_kernel(_int8_attention_kernel).status == "passed"
    assert lesson07.check_int8_attention_kernel(_stub_kernel).status == "not attempted"
    _assert_caught(lesson07.check_int8_attention_kernel(_Variant(NO_SCALE=True)), "a cache holds codes, not values")
    _assert_caught(lesson07.check_int8_attention_kernel(_Variant(K_SCALE_FOR_V=True)), "their own scales")
    _assert_caught(lesson07.check_int8_attention_kernel(_Variant(SCALE_NO_HEAD=True)), "NUM_KV_HEADS + h")
    _assert_caught(lesson07.check_int8_attention_kernel(lambda *a: None), "@triton.jit")
