"""Lesson 03: course_lib.model.online_softmax vs torch, the formulas, and the checks (solution passes, stub is not
attempted, broken variants fail: no rescale of the running sum, mask off by the Skv - Sq offset, wrong GQA mapping)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from course_lib.model import online_softmax as osm
from course_lib.model.attention import attention
from course_lib.grading import lesson03
from conftest import assert_caught, assert_not_attempted, edited, exercise, solution, stub

ROOT = Path(__file__).resolve().parents[1]
SOLVED = solution("03_flash_attention")
STUBS = exercise("03_flash_attention")


# ---------------------------------------------------------------- course_lib.model.online_softmax
@pytest.mark.parametrize("block_size", [1, 3, 16, 100])
def test_online_softmax_equals_softmax(block_size):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 50, generator=gen) * 40 + 800  # large logits: the naive formula overflows
    x[0, 0, :20] = float("-inf")
    torch.testing.assert_close(osm.online_softmax(x, block_size), torch.softmax(x, -1))
    m, l = osm.online_softmax_stats(x, block_size)
    torch.testing.assert_close(m + torch.log(l), torch.logsumexp(x, -1))
    assert torch.isnan(osm.softmax_naive(x)).any() and torch.allclose(osm.softmax_safe(x), torch.softmax(x, -1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq, Skv, block_n", [(1, 1, 4), (5, 5, 2), (7, 30, 8), (30, 30, 64)])
def test_tiled_and_naive_attention_match_reference(Sq, Skv, block_n, causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, s, 16, generator=gen) for s in (Sq, Skv, Skv))
    want = attention(q, k, v, causal=causal)
    torch.testing.assert_close(osm.tiled_attention(q, k, v, causal=causal, block_n=block_n), want)
    kg, vg = k[:, :1], v[:, :1]  # GQA for the naive one: 3 query heads on 1 kv head
    torch.testing.assert_close(osm.naive_attention(q, kg, vg, causal=causal), attention(q, kg, vg, causal=causal))


def test_formulas():
    assert (osm.attention_flops(1, 1, 10, 20, 8) == 4 * 10 * 20 * 8
            == 2 * osm.attention_flops(1, 1, 10, 20, 8, causal=True))
    assert osm.score_matrix_bytes(2, 3, 4, 5, 2) == 240
    # naive: Q, K, V, O plus S and P each written and read; flash: no S·S term, K/V once per query block
    assert osm.hbm_bytes_naive(1, 1, 4, 4, 2, 1) == 2 * 8 + 2 * 8 + 4 * 16
    assert osm.hbm_bytes_flash(1, 1, 256, 256, 64, 2, block_m=128) == (2 * 256 * 64 + 2 * 256 * 64 * 2) * 2
    n = 16384
    assert osm.hbm_bytes_flash(1, 1, 256, 256, 64, 2, block_m=None) == 4 * 256 * 64 * 2
    naive = osm.hbm_bytes_naive(1, 16, n, n, 128, 2)
    assert naive / osm.hbm_bytes_flash(1, 16, n, n, 128, 2, block_m=None) > 100  # O(S²) vs O(S·D)
    assert naive / osm.hbm_bytes_flash(1, 16, n, n, 128, 2) > 1.9  # even with K/V re-read per query block


def test_peak_memory_on_cpu_grows_quadratically_for_naive_only():
    def peaks(n):
        q = torch.randn(1, 2, n, 16)
        return (osm.peak_memory(lambda: osm.naive_attention(q, q, q)),
                osm.peak_memory(lambda: osm.tiled_attention(q, q, q, block_n=32)))
    (naive1, tiled1), (naive2, tiled2) = peaks(128), peaks(256)
    assert naive1 >= osm.score_matrix_bytes(1, 2, 128, 128, 4) and naive2 / naive1 > 3.5
    assert tiled2 / tiled1 < 2.5 and tiled2 < naive2


@pytest.mark.command
def test_benchmark_script_quick(tmp_path):
    from benchmarks import flash_attention as bench

    out = tmp_path / "fa.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for key in ("device", "date", "git_commit", "cpu_model", "driver", "torch", "triton", "backends", "speed",
                "memory"):
        assert key in result
    assert result["speed"] and all(row["ours_tflops"] > 0 for row in result["speed"])
    mem = result["memory"]
    assert mem[-1]["naive_peak_bytes"] / mem[0]["naive_peak_bytes"] > mem[-1]["N"] / mem[0]["N"]


def test_recorded_gpu_results_are_complete():
    for path in sorted((ROOT / "benchmarks" / "results").glob("flash_attention_*.json")):
        r = json.loads(path.read_text())
        if r["benchmark"] != "flash_attention":  # the backward's (checked below), the Hopper ablation's, the configs'
            continue
        assert r["device"] and r["date"] and r["torch"] and r["triton"] and r["speed"] and r["memory"]
        assert {row["dtype"] for row in r["speed"]} == {"float16", "bfloat16"}
        assert {row["D"] for row in r["speed"]} == {64, 128} and {row["causal"] for row in r["speed"]} == {False, True}


def test_recorded_backward_results_are_complete():
    """What the lesson's backward section plots: bf16, D = 64 and 128, causal and not, N up to 16k, ours and SDPA in
    the same run, gradients checked before timing."""
    for path in sorted((ROOT / "benchmarks" / "results").glob("flash_attention_bwd_*.json")):
        r = json.loads(path.read_text())
        assert r["benchmark"] == "flash_attention_bwd" and r["device"] and r["date"] and r["torch"] and r["triton"]
        if r["quick"] or r["kernel_mode"] != "compiled":
            continue
        rows = r["speed"]
        dims = {row["D"] for row in rows}   # both head dims, unless the run was restricted to some (--head-dims)
        assert dims == {64, 128} or (dims and dims < {64, 128} and "--head-dims" in r["command"])
        assert {row["causal"] for row in rows} == {False, True}
        assert {row["N"] for row in rows} >= {4096, 8192, 16384} and {row["dtype"] for row in rows} == {"bfloat16"}
        assert all("ours_fwd_bwd_seconds" in row and "ours_dq_rel_err" in row for row in rows)


# ---------------------------------------------------------------- the torch checks
RESCALE_L = {"l = l * alpha + p.sum(dim=-1)": "l = l + p.sum(dim=-1)"}   # the old running sum not rescaled
_softmax_no_rescale = edited(SOLVED.online_softmax, RESCALE_L)
_tiled_no_rescale = edited(SOLVED.tiled_attention,
                           {**RESCALE_L, "acc = acc * alpha[..., None] + p @ vb": "acc = acc + p @ vb"})


def _softmax_no_max(x, block_size):
    e = torch.exp(x)
    return e / e.sum(-1, keepdim=True)


def _softmax_drops_last_block(x, block_size):
    if x.shape[-1] < block_size:
        return osm.online_softmax(x, block_size)
    return osm.online_softmax(x[..., : (x.shape[-1] // block_size) * block_size], block_size)


def _tiled_top_left_causal(q, k, v, *, causal=False, block_n=16):
    # bug: forgets the Skv - Sq offset (a top-left causal mask): right only when Sq == Skv
    if not causal or q.shape[-2] == k.shape[-2]:
        return osm.tiled_attention(q, k, v, causal=causal, block_n=block_n)
    return osm.tiled_attention(q, k[..., : q.shape[-2], :], v[..., : q.shape[-2], :], causal=True, block_n=block_n)


def _tiled_materializes(q, k, v, *, causal=False, block_n=16):
    return osm.tiled_attention(q, k, v, causal=causal, block_n=k.shape[-2])  # one block = the whole matrix


def _tiled_uses_softmax(q, k, v, *, causal=False, block_n=16):
    return torch.softmax(torch.zeros(1), -1) * 0 + osm.tiled_attention(q, k, v, causal=causal, block_n=block_n)


@pytest.mark.parametrize("check, goods, broken", [
    (lesson03.check_online_softmax, [SOLVED.online_softmax, osm.online_softmax],
     [_softmax_no_rescale, _softmax_no_max, _softmax_drops_last_block, lambda x, b: torch.softmax(x, -1)]),
    (lesson03.check_tiled_attention, [SOLVED.tiled_attention, osm.tiled_attention],
     [_tiled_no_rescale, _tiled_top_left_causal, _tiled_materializes, _tiled_uses_softmax]),
])
def test_torch_checks(check, goods, broken):
    for good in goods:   # the solution notebook's answer and the library's
        assert check(good).status == "passed"
    assert_not_attempted(check(stub))
    for fn in broken:
        assert_caught(check(fn), "hint:")


def test_no_rescale_hint_names_the_rescale():
    assert "exp(m - m_new)" in lesson03.check_online_softmax(_softmax_no_rescale).message
    assert "Skv - Sq" in lesson03.check_tiled_attention(_tiled_top_left_causal).message


# ---------------------------------------------------------------- the Triton checks
# The solution kernels of exercises 3 and 4, and each with one of the bugs the checks must catch.
GQA_INTERLEAVED = {"h_kv = h // (Hq // Hkv)": "h_kv = h % Hkv"}   # interleaves heads instead of grouping them
NO_RESCALE = {"l_i = l_i * alpha + tl.sum(p, 1)": "l_i = l_i + tl.sum(p, 1)"}


def test_flash_kernel_check():
    kernel = SOLVED._flash_fwd_kernel
    assert lesson03.check_flash_kernel(kernel).status == "passed"
    assert_not_attempted(lesson03.check_flash_kernel(STUBS._flash_fwd_kernel))
    assert_caught(lesson03.check_flash_kernel(edited(kernel, GQA_INTERLEAVED)), "h // (Hq // Hkv)")
    assert_caught(lesson03.check_flash_kernel(edited(kernel, NO_RESCALE)), "alpha")
    no_mask = lesson03.check_flash_kernel(
        edited(kernel, {'\n        qk = tl.where(cols[None, :] < Skv, qk, float("-inf"))': ""}))
    assert_caught(no_mask, "-inf")
    assert_caught(lesson03.check_flash_kernel(lambda *a: None), "@triton.jit")


def test_causal_kernel_check():
    kernel = SOLVED._causal_flash_fwd_kernel
    assert lesson03.check_causal_kernel(kernel).status == "passed"
    assert_not_attempted(lesson03.check_causal_kernel(STUBS._causal_flash_fwd_kernel))
    assert_caught(lesson03.check_causal_kernel(edited(kernel, {"causal_offset = Skv - Sq": "causal_offset = 0"})),
                  "Skv - Sq")
    assert_caught(lesson03.check_causal_kernel(edited(kernel, NO_RESCALE)), "hint:")   # in both stages
    assert_caught(lesson03.check_causal_kernel(edited(kernel, GQA_INTERLEAVED)), "hint:")
    assert_caught(lesson03.check_causal_kernel(SOLVED._flash_fwd_kernel), "hint:")  # not causal at all


# ---------------------------------------------------------------- more mistakes a learner makes (issue 23)
def _softmax_two_pass(x, block_size):   # the max of the whole row first: right numbers, but not streaming
    m = x.amax(dim=-1)
    l = torch.zeros(x.shape[:-1])
    for start in range(0, x.shape[-1], block_size):
        block = x[..., start:start + block_size]
        l = l + torch.where(block == float("-inf"), 0.0, torch.exp(block - m[..., None])).sum(-1)
    return torch.exp(x - m[..., None]) / l[..., None]


_softmax_m_starts_at_zero = edited(SOLVED.online_softmax, {
    'm = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype)': "m = torch.zeros(x.shape[:-1], dtype=x.dtype)"})
_softmax_nan_on_masked = edited(SOLVED.online_softmax, {   # exp(-inf - (-inf)) = nan for a masked first block
    'p = torch.where(block == float("-inf"), 0.0, torch.exp(block - m_new[..., None]))':
    "p = torch.exp(block - m_new[..., None])",
    "alpha = torch.where(m == m_new, 1.0, torch.exp(m - m_new))": "alpha = torch.exp(m - m_new)"})
_tiled_m_starts_at_zero = edited(SOLVED.tiled_attention, {
    'm = torch.full(q.shape[:-1], float("-inf"))': "m = torch.zeros(q.shape[:-1])"})
_tiled_float32_out = edited(SOLVED.tiled_attention, {"return (acc / l[..., None]).to(q.dtype)":
                                                     "return acc / l[..., None]"})
_tiled_masks_the_diagonal = edited(SOLVED.tiled_attention, {"cols[None, :] > rows[:, None] + (Skv - Sq)":
                                                            "cols[None, :] >= rows[:, None] + (Skv - Sq)"})


@pytest.mark.parametrize("fn, hint", [
    (_softmax_two_pass, "not streaming"),
    (_softmax_m_starts_at_zero, "start the running max at -inf"),
    (_softmax_nan_on_masked, "treat exp(-inf) as 0"),
])
def test_online_softmax_check_catches(fn, hint):
    assert_caught(lesson03.check_online_softmax(fn), hint)


@pytest.mark.parametrize("fn, hint", [
    (_tiled_m_starts_at_zero, "start the running max m at -inf"),
    (_tiled_float32_out, "return q's dtype"),
    (_tiled_masks_the_diagonal, "hint:"),
])
def test_tiled_attention_check_catches(fn, hint):
    assert_caught(lesson03.check_tiled_attention(fn), hint)


def test_flash_kernel_check_catches():
    kernel = SOLVED._flash_fwd_kernel
    for broken, hint in [
        ({"h_kv = h // (Hq // Hkv)": "h_kv = h // Hkv"}, "h // (Hq // Hkv)"),   # right only when Hq = Hkv²
        ({'m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)': "m_i = tl.zeros([BLOCK_M], dtype=tl.float32)"},
         "start m_i at -inf"),
        ({"kv_off = (b * Hkv + h_kv) * Skv * HEAD_DIM": "kv_off = h_kv * Skv * HEAD_DIM"}, "GQA"),   # batch forgotten
        ({"             mask=offs_m[:, None] < Sq)": "             )"}, "wrote outside `out`"),
        ({"q_off = off_bh * Sq * HEAD_DIM": "q_off = off_bh * Skv * HEAD_DIM"}, "read outside `q`"),  # Sq/Skv swapped
        ({"offs_d[None, :], mask=offs_m[:, None] < Sq, other=0.0)": "offs_d[None, :])"},
         "read outside `q`"),                                                    # the partial query block unmasked
        ({"k = tl.load(k_ptr + kv_ptrs, mask=cols[:, None] < Skv, other=0.0)": "k = tl.load(k_ptr + kv_ptrs)"},
         "read outside `k`"),                                                    # the partial key block unmasked
        ({"for start_n in range(0, Skv, BLOCK_N):": "for start_n in range(0, Skv // BLOCK_N * BLOCK_N, BLOCK_N):"},
         "hint:"),                                                               # drops the partial last block
        ({"p = tl.math.exp2(qk - m_new[:, None])": "p = tl.math.exp2(qk)",
          "alpha = tl.math.exp2(m_i - m_new)": "alpha = 1.0"}, "hint:"),        # no max subtracted at all
    ]:
        assert_caught(lesson03.check_flash_kernel(edited(kernel, broken)), hint)


def test_causal_kernel_check_catches():
    kernel = SOLVED._causal_flash_fwd_kernel
    for broken, where in [   # stage 1 ending mid-block; out-of-bounds accesses, stopped and named before they happen
        ({"full_end = tl.minimum(start_m * BLOCK_M + causal_offset + 1, Skv) // BLOCK_N * BLOCK_N":
          "full_end = tl.minimum(start_m * BLOCK_M + causal_offset + 1, Skv)"}, "ends on a block boundary"),
        ({"k = tl.load(k_ptr + kv_ptrs, mask=cols[:, None] < Skv, other=0.0)": "k = tl.load(k_ptr + kv_ptrs)"},
         "read outside `k`"),                                                    # stage 2's last block unmasked
        ({"q_off = off_bh * Sq * HEAD_DIM": "q_off = off_bh * Skv * HEAD_DIM"}, "read outside `q`"),   # Sq/Skv swapped
    ]:
        assert_caught(lesson03.check_causal_kernel(edited(kernel, broken)), where)
    visits_hidden_blocks = edited(kernel, {   # stage 2 runs to Skv: the mask hides the extra keys, nothing is skipped
        "diag_end = tl.minimum((start_m + 1) * BLOCK_M + causal_offset, Skv)": "diag_end = Skv"})
    assert_caught(lesson03.check_causal_kernel(visits_hidden_blocks), "never load them")
    for broken, hint in [
        ({"(cols[None, :] <= offs_m[:, None] + causal_offset)": "(cols[None, :] < offs_m[:, None] + causal_offset)"},
         "hint:"),                                                               # the diagonal itself masked
        ({'m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)': "m_i = tl.zeros([BLOCK_M], dtype=tl.float32)"},
         "hint:"),
    ]:
        assert_caught(lesson03.check_causal_kernel(edited(kernel, broken)), hint)


# ---------------------------------------------------------------- the backward check (exercise 5)
# Each a mistake of the blocked backward, written into the solution, and a word the check's hint must contain.
BACKWARD_MISTAKES = {
    "forgot the delta term": ({"ds = p * (dp - delta)": "ds = p * dp"}, "Δ = rowsum(dO ∘ O)"),
    "used S instead of P": ({"ds = p * (dp - delta)": "ds = s * (dp - delta)"}, "use P, not the scores S"),
    "no sm_scale in dq and dk": ({"dq += (ds @ kb) * scale": "dq += ds @ kb",
                                 "(ds.transpose(-1, -2) @ qg).sum(2) * scale": "(ds.transpose(-1, -2) @ qg).sum(2)"},
                                "sqrt(D)"),
    "no sm_scale in the recomputed scores": (
        {"s = (qg @ kb.transpose(-1, -2)) * scale": "s = qg @ kb.transpose(-1, -2)"}, "P = exp(q kᵀ / sqrt(D) - lse)"),
    "forgot the causal mask in the recompute": ({"p = p.masked_fill(cols[None, :] > pos, 0.0)": "pass"},
                                                "key j > i + Skv - Sq"),
    "dK summed over the wrong axis (GQA)": (
        {"(ds.transpose(-1, -2) @ qg).sum(2)": "(ds.transpose(-1, -2) @ qg).sum(1)"}, "the sum over its G = "),
    "dV averaged over the group (GQA)": (
        {"(p.transpose(-1, -2) @ dog).sum(2)": "(p.transpose(-1, -2) @ dog).mean(2)"}, "the sum over its G = 2"),
}


def _backward_by_autograd(q, k, v, out, lse, do, *, causal=False, block_n=16):
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(attention(qq, kk, vv, causal=causal), (qq, kk, vv), do)


def _backward_whole_matrix(q, k, v, out, lse, do, *, causal=False, block_n=16):
    return SOLVED.attention_backward(q, k, v, out, lse, do, causal=causal, block_n=k.shape[2])


def test_backward_check_passes_the_solution_and_the_reference():
    assert lesson03.check_attention_backward(SOLVED.attention_backward).status == "passed"
    from kernels.reference import flash_attention_backward as ref   # the whole-matrix formulas: P is [.., Sq, Skv]

    result = lesson03.check_attention_backward(lambda q, k, v, out, lse, do, causal, block_n: (
        ref(do, q, k, v, out, lse, causal=causal)))
    assert_caught(result, "recompute P for one block")
    assert_not_attempted(lesson03.check_attention_backward(stub))
    assert_not_attempted(lesson03.check_attention_backward(STUBS.attention_backward))


@pytest.mark.parametrize("mistake", list(BACKWARD_MISTAKES))
def test_backward_check_catches(mistake):
    edits, hint = BACKWARD_MISTAKES[mistake]
    assert_caught(lesson03.check_attention_backward(edited(SOLVED.attention_backward, edits)), hint)


def test_backward_check_forbids_autograd_and_the_whole_matrix():
    assert_caught(lesson03.check_attention_backward(_backward_by_autograd), "write the gradients out yourself")
    assert_caught(lesson03.check_attention_backward(_backward_whole_matrix), "O(S²) memory")


# ---------------------------------------------------------------- end to end: the pieces run the tiny model
def test_end_to_end_check():
    pieces = (SOLVED.tiled_attention, SOLVED._flash_fwd_kernel, SOLVED._causal_flash_fwd_kernel)
    assert lesson03.check_end_to_end(*pieces).status == "passed"
    assert_not_attempted(lesson03.check_end_to_end(STUBS.tiled_attention, STUBS._flash_fwd_kernel,
                                                   STUBS._causal_flash_fwd_kernel))
    assert_not_attempted(lesson03.check_end_to_end(stub, *pieces[1:]))
    assert_not_attempted(lesson03.check_end_to_end(*pieces[:2], STUBS._causal_flash_fwd_kernel))


def _end_to_end_mistakes():
    """(name, (tiled, flash, causal) with one piece broken, the words the feedback must contain)."""
    tiled, flash, causal = SOLVED.tiled_attention, SOLVED._flash_fwd_kernel, SOLVED._causal_flash_fwd_kernel
    top_left = edited(tiled, {"cols[None, :] > rows[:, None] + (Skv - Sq)": "cols[None, :] > rows[:, None]"})
    drops_last_block = edited(flash, {"for start_n in range(0, Skv, BLOCK_N):":
                                      "for start_n in range(0, Skv // BLOCK_N * BLOCK_N, BLOCK_N):"})
    no_batch = edited(flash, {"kv_off = (b * Hkv + h_kv) * Skv * HEAD_DIM": "kv_off = h_kv * Skv * HEAD_DIM"})
    top_left_kernel = edited(causal, {"causal_offset = Skv - Sq": "causal_offset = 0"})
    return {
        "tiled_top_left_mask": ((top_left, flash, causal), "bottom-right alignment"),
        "tiled_no_rescale": ((_tiled_no_rescale, flash, causal), "multiply BOTH l and acc"),
        "flash_gqa_interleaved": ((tiled, edited(flash, GQA_INTERLEAVED), causal), "not with GQA"),
        "flash_drops_last_block": ((tiled, drops_last_block, causal), "visit every block"),
        "flash_ignores_batch": ((tiled, no_batch, causal), "each prompt correctly alone"),
        "causal_top_left": ((tiled, flash, top_left_kernel), "bottom-right alignment"),
        "causal_gqa_interleaved": ((tiled, flash, edited(causal, GQA_INTERLEAVED)), "not with GQA"),
    }


# one test per mistake (about 10 s each in the interpreter): pytest-xdist spreads them over its workers
@pytest.mark.parametrize("mistake", list(_end_to_end_mistakes()))
def test_end_to_end_check_names_the_mistake(mistake):
    pieces, words = _end_to_end_mistakes()[mistake]
    assert_caught(lesson03.check_end_to_end(*pieces), words)
