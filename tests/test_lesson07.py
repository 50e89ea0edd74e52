"""Lesson 07 checks: each passes the solution, scores a stub "not attempted", and catches broken variants
(per-tensor scales, dividing by 128, truncating instead of rounding, max instead of max|x|; a kernel that
forgets the scales, uses K's scale for V, or indexes the scales without the kv head)."""
from __future__ import annotations

from course_lib.grading import lesson07
from course_lib.grading.core import format_result
from conftest import assert_caught, assert_not_attempted, edited, exercise, solution, stub

SOLVED = solution("07_kv_cache_quantization")


# ---------------------------------------------------------------- 1. quantize / dequantize per token
quantize_128 = edited(SOLVED.quantize_per_token, {"/ 127)": "/ 128)"})   # the grid -128 ... 128: +128 wraps in an int8
quantize_per_tensor = edited(SOLVED.quantize_per_token, {                     # one scale for everything
    "xf.abs().amax(dim=-1)": "xf.abs().amax()", "xf / scale[..., None]": "xf / scale"})
quantize_truncating = edited(SOLVED.quantize_per_token, {                     # .to(int8) alone rounds toward zero
    "torch.round(xf / scale[..., None])": "(xf / scale[..., None])"})
quantize_max_not_abs = edited(SOLVED.quantize_per_token, {   # max of the row, not of its magnitude: a negative extreme
    "xf.abs().amax(dim=-1)": "xf.amax(dim=-1)", ".to(torch.int8)": ".clamp(-127, 127).to(torch.int8)"})   # overflows


quantize_no_clamp = edited(SOLVED.quantize_per_token, {".clamp_min(1e-8)": ""})   # a zero row: scale 0, 0/0
quantize_per_token_all_heads = edited(SOLVED.quantize_per_token, {   # one scale per token over all its heads
    "xf.abs().amax(dim=-1)": "xf.abs().amax(dim=(-2, -1)) if xf.dim() > 2 else xf.abs().amax(dim=-1)",
    "xf / scale[..., None]": "xf / (scale[..., None, None] if xf.dim() > 2 else scale[..., None])"})
quantize_half_scale = edited(SOLVED.quantize_per_token, {"xf = x.float()": "xf = x"})   # x's dtype kept (float16)


def test_quantize_per_token_check():
    quantize, dequantize = SOLVED.quantize_per_token, SOLVED.dequantize_per_token
    assert lesson07.check_quantize_per_token(quantize, dequantize).status == "passed"
    assert_not_attempted(lesson07.check_quantize_per_token(stub, dequantize))
    assert_not_attempted(lesson07.check_quantize_per_token(quantize, stub))
    assert_caught(lesson07.check_quantize_per_token(quantize_128, dequantize), "127, not 128")
    assert_caught(lesson07.check_quantize_per_token(quantize_per_tensor, dequantize), "LAST dimension")
    assert_caught(lesson07.check_quantize_per_token(quantize_truncating, dequantize), "NEAREST")
    assert_caught(lesson07.check_quantize_per_token(quantize_max_not_abs, dequantize), "max|row|")
    assert_caught(lesson07.check_quantize_per_token(quantize, lambda c, s: c.float() * s.mean()), "dequantize")
    assert_caught(lesson07.check_quantize_per_token(quantize_no_clamp, dequantize), "clamp_min(1e-8)")
    assert_caught(lesson07.check_quantize_per_token(quantize_per_token_all_heads, dequantize), "LAST dimension")
    assert_caught(lesson07.check_quantize_per_token(quantize_half_scale, dequantize), "float32")
    assert_caught(lesson07.check_quantize_per_token(quantize, lambda c, s: c.float() * s))   # no [..., None]


# ---------------------------------------------------------------- 2. the dequantizing load in the kernel
def test_int8_attention_kernel_check():
    kernel = SOLVED._int8_attention_kernel
    assert lesson07.check_int8_attention_kernel(kernel).status == "passed"
    assert_not_attempted(lesson07.check_int8_attention_kernel(exercise("07_kv_cache_quantization")._int8_attention_kernel))
    no_scale = edited(kernel, {"k = k_codes.to(tl.float32) * k_scale[:, None]": "k = k_codes.to(tl.float32)",
                               "v = v_codes.to(tl.float32) * v_scale[:, None]": "v = v_codes.to(tl.float32)"})
    assert_caught(lesson07.check_int8_attention_kernel(no_scale), "a cache holds codes, not values")
    k_scale_for_v = edited(kernel, {"v_scale = tl.load(v_scale_ptr + rows": "v_scale = tl.load(k_scale_ptr + rows"})
    assert_caught(lesson07.check_int8_attention_kernel(k_scale_for_v), "their own scales")
    scale_no_head = edited(kernel, {   # the scale of the slot (block * P + offset), forgetting the kv head
        "k_scale = tl.load(k_scale_ptr + rows,": "k_scale = tl.load(k_scale_ptr + block_id * BLOCK_SIZE + offs_p,"})
    assert_caught(lesson07.check_int8_attention_kernel(scale_no_head), "NUM_KV_HEADS + h")
    scale_like_codes = edited(kernel, {   # a scale indexed like a row of codes: rows * HEAD_DIM
        "k_scale = tl.load(k_scale_ptr + rows,": "k_scale = tl.load(k_scale_ptr + rows * HEAD_DIM,"})
    assert_caught(lesson07.check_int8_attention_kernel(scale_like_codes), "read outside `k_scale`")
    gqa_modulo = edited(kernel, {"kv_head = head // QUERIES_PER_KV": "kv_head = head % NUM_KV_HEADS"})
    assert_caught(lesson07.check_int8_attention_kernel(gqa_modulo), "head // QUERIES_PER_KV")
    assert_caught(lesson07.check_int8_attention_kernel(lambda *a: None), "@triton.jit")


# ---------------------------------------------------------------- end to end: the pieces decode the tiny model
def test_end_to_end_check():
    quantize, dequantize, kernel = SOLVED.quantize_per_token, SOLVED.dequantize_per_token, SOLVED._int8_attention_kernel
    result = lesson07.check_end_to_end(quantize, dequantize, kernel)
    assert result.status == "passed" and result.check == "course_lib.grading.lesson07:check_end_to_end"
    assert "\n   note: for information: the INT8 decode agrees with the float32 decode" in format_result(result)
    stubs = exercise("07_kv_cache_quantization")
    assert_not_attempted(lesson07.check_end_to_end(stubs.quantize_per_token, stubs.dequantize_per_token,
                                                   stubs._int8_attention_kernel))
    assert_not_attempted(lesson07.check_end_to_end(quantize, dequantize, stubs._int8_attention_kernel))
    assert_not_attempted(lesson07.check_end_to_end(quantize, stub, kernel))


def test_end_to_end_check_names_the_broken_piece():
    quantize, dequantize, kernel = SOLVED.quantize_per_token, SOLVED.dequantize_per_token, SOLVED._int8_attention_kernel
    assert_caught(lesson07.check_end_to_end(quantize_128, dequantize, kernel),
                  "your quantize_per_token alone already changes the tokens")
    assert_caught(lesson07.check_end_to_end(quantize_per_tensor, dequantize, kernel),
                  "a torch.float32 tensor of shape []")
    assert_caught(lesson07.check_end_to_end(quantize_per_token_all_heads, dequantize, kernel),
                  "one scale per (token, kv head)")
    no_scale = edited(dequantize, {"codes.float() * scale[..., None]": "codes.float()"})
    assert_caught(lesson07.check_end_to_end(quantize, no_scale, kernel),
                  "your dequantize_per_token alone already changes the tokens")
    kernel_no_scale = edited(kernel, {"k = k_codes.to(tl.float32) * k_scale[:, None]": "k = k_codes.to(tl.float32)",
                                      "v = v_codes.to(tl.float32) * v_scale[:, None]": "v = v_codes.to(tl.float32)"})
    assert_caught(lesson07.check_end_to_end(quantize, dequantize, kernel_no_scale), "with your _int8_attention_kernel")
    k_scale_for_v = edited(kernel, {"v_scale = tl.load(v_scale_ptr + rows": "v_scale = tl.load(k_scale_ptr + rows"})
    assert_caught(lesson07.check_end_to_end(quantize, dequantize, k_scale_for_v), "with your _int8_attention_kernel")
