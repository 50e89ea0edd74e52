"""Lesson 04, exercise 4 (paged_prefill): the check passes the solution and the Triton kernel's reference, scores a
stub "not attempted", and catches the mistakes a learner makes, each with the hint that names it."""
from __future__ import annotations


import kernels.reference
from course_lib.grading import lesson04
from conftest import assert_caught, assert_not_attempted, edited, solution, stub

SOLVED = solution("04_continuous_batching")
fn = SOLVED.paged_prefill

top_left = edited(fn, {"pos = torch.arange(n) + (L - n)": "pos = torch.arange(n)"})   # the prefix hidden
no_mask = edited(fn, {"scores = scores.masked_fill(torch.arange(L)[None, :] > pos[:, None], float(\"-inf\"))": ""})
every_block = edited(fn, {"blocks = block_tables[s, : math.ceil(L / P)].long()": "blocks = block_tables[s].long()",
                         "[:L]                  # [L, Hkv, D]": "                  # [L, Hkv, D]",
                         "v_cache[blocks].reshape(-1, Hkv, D)[:L]": "v_cache[blocks].reshape(-1, Hkv, D)",
                         "torch.arange(L)[None, :]": "torch.arange(k.shape[0])[None, :]",
                         "(L - n)": "(k.shape[0] - n)"})                           # every slot taken for a token
floor_blocks = edited(fn, {"math.ceil(L / P)": "L // P"})                            # the last, partial block lost
gqa_modulo = edited(fn, {"k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)":
                         "k, v = k.repeat(1, G, 1), v.repeat(1, G, 1)"})               # head h -> kv head h % Hkv
no_scale = edited(fn, {" / math.sqrt(D)": ""})
contiguous = edited(fn, {"blocks = block_tables[s, : math.ceil(L / P)].long()":        # blocks assumed in order
                         "blocks = torch.arange(math.ceil(L / P)) + block_tables[s, 0].long()"})
first_row_offset = edited(fn, {"a, b = cu_seqlens_q[s].item(), cu_seqlens_q[s + 1].item()":   # chunk s at s * n
                               "b = cu_seqlens_q[s + 1].item(); a = b - (b - cu_seqlens_q[s].item())"})


def half_dtype(q, *args):
    return fn(q, *args).double()                                                        # the dtype contract


def padded_rows(q, *args):
    return fn(q, *args)[:-1]                                                            # one row short


def test_the_solution_and_the_kernels_reference_pass():
    assert lesson04.check_paged_prefill(fn).status == "passed"
    assert lesson04.check_paged_prefill(kernels.reference.paged_prefill_attention).status == "passed"


def test_a_stub_is_not_attempted():
    assert_not_attempted(lesson04.check_paged_prefill(stub))


def test_each_mistake_is_caught_with_its_hint():
    assert_caught(lesson04.check_paged_prefill(top_left), "aligned bottom-right")
    assert_caught(lesson04.check_paged_prefill(no_mask), "prefill is causal")
    assert_caught(lesson04.check_paged_prefill(every_block), "its first L tokens only")
    assert_caught(lesson04.check_paged_prefill(gqa_modulo), "h // G")
    assert_caught(lesson04.check_paged_prefill(no_scale), "1 / sqrt(D)")
    assert_caught(lesson04.check_paged_prefill(half_dtype), "q's dtype")
    assert_caught(lesson04.check_paged_prefill(padded_rows), "[T, Hq, D]")
    assert_caught(lesson04.check_paged_prefill(floor_blocks))
    assert_caught(lesson04.check_paged_prefill(contiguous), "block_tables[s, j // P]")


def test_the_edits_are_no_ops_where_they_should_be():
    # first_row_offset rewrites the same arithmetic: a variant that is not a mistake must pass (the check does not
    # depend on how the rows are found)
    assert lesson04.check_paged_prefill(first_row_offset).status == "passed"
