"""Lesson 00's Triton warm-ups (exercises 5-8): each check passes the solution notebook's kernel, scores the exercise
notebook's stub "not attempted", and fails the mistakes a learner makes, each written as a broken variant of the
solution, with the hint that names the mistake."""
from __future__ import annotations

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import pytest

from course_lib.device import HAS_GPU

from course_lib.grading import lesson00_warmups as warmups
from conftest import assert_caught, assert_not_attempted, edited, exercise, solution

# (check, kernel name, [(what the variant replaces, the text its feedback must contain)])
VARIANTS = {
    "copy_tile_kernel": (warmups.check_copy_tile_kernel, "_copy_tile_kernel", [
        # no column mask: the tile of the last column block runs past column N - 1
        ({"mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)": "mask = offs_m[:, None] < M"},
         "N = 37 is not a multiple of BLOCK_N = 16: mask offs_n[None, :] < N"),
        # no row mask
        ({"mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)": "mask = offs_n[None, :] < N"},
         "M = 37 is not a multiple of BLOCK_M = 16: mask offs_m[:, None] < M"),
        # src taken as contiguous: its rows are N + 3 apart, not N
        ({"offs_m[:, None] * src_row_stride": "offs_m[:, None] * N"}, "src's rows are src_row_stride elements apart"),
        # dst written with src's row stride: rows land in dst's padding
        ({"offs_m[:, None] * dst_row_stride": "offs_m[:, None] * src_row_stride"},
         "nothing needs a mask: an offset is wrong"),
        # the program ids swapped: on a grid that is not square, tiles are never written
        ({"pid_m = tl.program_id(axis=0)": "pid_m = tl.program_id(axis=1)",
          "pid_n = tl.program_id(axis=1)": "pid_n = tl.program_id(axis=0)"}, "tl.program_id(0) the row"),
        # every program copies the first column block
        ({"offs_n = pid_n * BLOCK_N + tl.arange": "offs_n = tl.arange"}, "never written"),
        # loads masked, the store not
        ({"tile, mask=mask)": "tile)"}, "wrote outside `dst`"),
    ]),
    "softmax_kernel": (warmups.check_softmax_kernel, "_softmax_kernel", [
        # no max subtraction: exp(1000) = inf, exp(-1000) = 0
        ({"e = tl.exp(x - tl.max(x, axis=0))": "e = tl.exp(x)"}, "subtract the row max before tl.exp"),
        # padding lanes load 0: they add exp(0 - max) to the sum, and become the max of a negative row
        ({'other=float("-inf")': "other=0.0"}, "must load as -inf"),
        # padding lanes without `other` (0 in the interpreter, undefined on a GPU)
        ({', other=float("-inf")': ""}, "must load as -inf"),
        # the load not masked
        ({', mask=mask, other=float("-inf"))': ")"}, "read outside `x`"),
        # the store not masked
        ({"e / tl.sum(e, axis=0), mask=mask)": "e / tl.sum(e, axis=0))"}, "wrote outside `out`"),
        # not normalized
        ({"e / tl.sum(e, axis=0)": "e"}, "divide by the row sum"),
        # x taken as contiguous
        ({"row * x_row_stride": "row * n_cols"}, "x's rows are x_row_stride elements apart"),
        # every program on row 0
        ({"row = tl.program_id(axis=0)": "row = tl.program_id(axis=1)"}, "never written"),
    ]),
    "row_max_sumexp_kernel": (warmups.check_row_max_sumexp_kernel, "_row_max_sumexp_kernel", [
        # the partial last block dropped (an off-by-one block count)
        ({"num_blocks = tl.cdiv(n_cols, BLOCK_N)": "num_blocks = n_cols // BLOCK_N"}, "not n_cols // BLOCK_N"),
        # the running max starts at 0: a row of negative scores gets max 0
        ({'m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)': "m = tl.zeros([BLOCK_N], dtype=tl.float32)"},
         "m must start at -inf"),
        # padding lanes load 0 in both passes
        ({'other=float("-inf")': "other=0.0"}, "as -inf"),
        # exp(x) without the max: overflows for large scores
        ({"sum_exp += tl.exp(x - row_max)": "sum_exp += tl.exp(x)"}, "subtract m before tl.exp"),
        # the max of the last block only
        ({"m = tl.maximum(m, x)": "m = x"}, "keep the running max across blocks"),
        # the sum of the last block only
        ({"sum_exp += tl.exp(x - row_max)": "sum_exp = tl.exp(x - row_max)"}, "add every block to l"),
        # the loads not masked
        ({', mask=cols < n_cols, other=float("-inf"))': ")"}, "read outside `x`"),
        # x taken as contiguous
        ({"row * x_row_stride": "row * n_cols"}, "x's rows are x_row_stride elements apart"),
    ]),
    "matmul_kernel": (warmups.check_matmul_kernel, "_matmul_kernel", [
        # a float16 accumulator
        ({"BLOCK_N], dtype=tl.float32)": "BLOCK_N], dtype=tl.float16)",
          "acc += tl.dot(a, b)": "acc += tl.dot(a, b).to(tl.float16)"}, "off by float16 rounding"),
        # the partial last K block dropped
        ({"range(0, tl.cdiv(K, BLOCK_K))": "range(0, K // BLOCK_K)"}, "not K // BLOCK_K"),
        # the K tail not masked
        ({" & (offs_k[None, :] < K)": "", "(offs_k[:, None] < K) & ": ""},
         "K = 40 is not a multiple of BLOCK_K = 16: mask offs_k"),
        # the store not masked
        ({", mask=mask_c)": ")"}, "wrote outside `c`"),
        # b taken as contiguous: wrong for a transposed b
        ({"offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn": "offs_k[:, None] * N + offs_n[None, :]"},
         "use the strides passed in"),
        # a taken as contiguous: wrong for a slice of a wider a
        ({"offs_m[:, None] * stride_am": "offs_m[:, None] * K"}, "use the strides passed in"),
        # the accumulator overwritten
        ({"acc += tl.dot(a, b)": "acc = tl.dot(a, b)"}, "acc += tl.dot(a, b)"),
        # always the first K block
        ({"offs_k = k * BLOCK_K + tl.arange": "offs_k = tl.arange"}, "load the next K block"),
        # the program ids swapped: on a grid that is not square, tiles are never written
        ({"pid_m = tl.program_id(axis=0)": "pid_m = tl.program_id(axis=1)",
          "pid_n = tl.program_id(axis=1)": "pid_n = tl.program_id(axis=0)"}, "tl.program_id(0) the row"),
    ]),
}


#: hints that come from the interpreter's bounds check (course_lib.grading.bounds), which a compiled kernel skips
INTERPRETER_ONLY_HINTS = ("read outside", "wrote outside", "is not a multiple of")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_solution_passes_and_stub_is_not_attempted(name):
    check, kernel, _ = VARIANTS[name]
    result = check(getattr(solution("00_start_here"), kernel))
    assert (result.status, result.points, result.name) == ("passed", result.max_points, name), result
    assert_not_attempted(check(getattr(exercise("00_start_here"), kernel)))
    assert_caught(check(lambda *args: None), "@triton.jit")


@pytest.mark.parametrize("name, index", [(name, i) for name, (_, _, v) in VARIANTS.items() for i in range(len(v))])
def test_broken_variant_is_caught(name, index):
    check, kernel, variants = VARIANTS[name]
    replacements, hint = variants[index]
    if HAS_GPU and any(words in hint for words in INTERPRETER_ONLY_HINTS):
        hint = None   # compiled, an access past the edge is not trapped: the values it reads or writes fail the case
    assert_caught(check(edited(getattr(solution("00_start_here"), kernel), replacements)), hint)


# ---------------------------------------------------------------- end to end: the softmax and matmul run the model
def test_end_to_end_check():
    solved, stubs = solution("00_start_here"), exercise("00_start_here")
    softmax, matmul = solved._softmax_kernel, solved._matmul_kernel
    assert warmups.check_end_to_end(softmax, matmul).status == "passed"
    assert_not_attempted(warmups.check_end_to_end(stubs._softmax_kernel, stubs._matmul_kernel))
    assert_not_attempted(warmups.check_end_to_end(softmax, stubs._matmul_kernel))
    assert_caught(warmups.check_end_to_end(softmax, lambda *args: None), "@triton.jit")


@pytest.mark.parametrize("kernel, replacements, hint", [
    # not normalized: the attention weights do not sum to 1
    ("_softmax_kernel", {"e / tl.sum(e, axis=0)": "e"}, "your _softmax_kernel for the attention probabilities"),
    # the accumulator overwritten: only the last K block counts
    ("_matmul_kernel", {"acc += tl.dot(a, b)": "acc = tl.dot(a, b)"}, "acc += tl.dot(a, b) over every K block"),
    # always the first K block
    ("_matmul_kernel", {"offs_k = k * BLOCK_K + tl.arange": "offs_k = tl.arange"},
     "your _matmul_kernel for the logits"),
    # b taken as contiguous: the lm_head weight is read through its strides
    ("_matmul_kernel", {"offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn":
                        "offs_k[:, None] * N + offs_n[None, :]"}, "use the strides passed in"),
    # no row mask: one row of hidden states, BLOCK_M = 16
    ("_matmul_kernel", {"mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)":
                        "mask=offs_k[None, :] < K, other=0.0)"}, "mask offs_m < M"),
])
def test_end_to_end_check_catches(kernel, replacements, hint):
    if HAS_GPU and hint == "mask offs_m < M":
        pytest.skip("compiled, the rows read past the last one are garbage that the store's mask never writes: the "
                    "tokens stay right, only the interpreter's bounds check sees the read")
    solved = solution("00_start_here")
    kernels = {"_softmax_kernel": solved._softmax_kernel, "_matmul_kernel": solved._matmul_kernel}
    kernels[kernel] = edited(kernels[kernel], replacements)
    assert_caught(warmups.check_end_to_end(kernels["_softmax_kernel"], kernels["_matmul_kernel"]), hint)
