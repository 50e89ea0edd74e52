"""Lesson 03: course_lib.model.online_softmax vs torch, the formulas, and the checks (solution passes, stub is not
attempted, broken variants fail: no rescale of the running sum, mask off by the Skv - Sq offset, wrong GQA mapping)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import pytest
import torch
import triton
import triton.language as tl

from course_lib.model import online_softmax as osm
from course_lib.model.attention import attention
from course_lib.grading import lesson03

ROOT = Path(__file__).resolve().parents[1]


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
    assert osm.attention_flops(1, 1, 10, 20, 8) == 4 * 10 * 20 * 8 == 2 * osm.attention_flops(1, 1, 10, 20, 8, causal=True)
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


def test_benchmark_script_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_flash", ROOT / "benchmarks" / "flash_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "fa.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for key in ("device", "date", "torch", "triton", "backends", "speed", "memory"):
        assert key in result
    assert result["speed"] and all(row["ours_tflops"] > 0 for row in result["speed"])
    mem = result["memory"]
    assert mem[-1]["naive_peak_bytes"] / mem[0]["naive_peak_bytes"] > mem[-1]["N"] / mem[0]["N"]


def test_recorded_gpu_results_are_complete():
    for path in sorted((ROOT / "benchmarks" / "results").glob("flash_attention_*.json")):
        r = json.loads(path.read_text())
        assert r["device"] and r["date"] and r["torch"] and r["triton"] and r["speed"] and r["memory"]
        assert {row["dtype"] for row in r["speed"]} == {"float16", "bfloat16"}
        assert {row["D"] for row in r["speed"]} == {64, 128} and {row["causal"] for row in r["speed"]} == {False, True}


# ---------------------------------------------------------------- the torch checks
def _stub(*args, **kwargs):
    raise NotImplementedError("Exercise: write this function")


def _softmax_no_rescale(x, block_size):
    m = torch.full(x.shape[:-1], float("-inf"))
    l = torch.zeros(x.shape[:-1])
    for s in range(0, x.shape[-1], block_size):
        b = x[..., s:s + block_size]
        m = torch.maximum(m, b.amax(-1))
        l = l + torch.where(b == float("-inf"), 0.0, torch.exp(b - m[..., None])).sum(-1)  # bug: old l not rescaled
    return torch.exp(x - m[..., None]) / l[..., None]


def _softmax_no_max(x, block_size):
    e = torch.exp(x)
    return e / e.sum(-1, keepdim=True)


def _softmax_drops_last_block(x, block_size):
    return osm.online_softmax(x[..., : (x.shape[-1] // block_size) * block_size], block_size) if x.shape[-1] >= block_size \
        else osm.online_softmax(x, block_size)


def _tiled_no_rescale(q, k, v, *, causal=False, block_n=16):
    Sq, Skv = q.shape[-2], k.shape[-2]
    qf = q / math.sqrt(q.shape[-1])
    m = torch.full(q.shape[:-1], float("-inf"))
    l, acc = torch.zeros(q.shape[:-1]), torch.zeros(q.shape)
    for s in range(0, Skv, block_n):
        sc = qf @ k[..., s:s + block_n, :].transpose(-1, -2)
        if causal:
            cols = torch.arange(s, s + sc.shape[-1])
            sc = sc.masked_fill(cols[None, :] > torch.arange(Sq)[:, None] + Skv - Sq, float("-inf"))
        m_new = torch.maximum(m, sc.amax(-1))
        p = torch.where(sc == float("-inf"), 0.0, torch.exp(sc - m_new[..., None]))
        l, acc, m = l + p.sum(-1), acc + p @ v[..., s:s + block_n, :], m_new  # bug: l and acc not rescaled
    return acc / l[..., None]


def _tiled_top_left_causal(q, k, v, *, causal=False, block_n=16):
    # bug: forgets the Skv - Sq offset (a top-left causal mask): right only when Sq == Skv
    if not causal or q.shape[-2] == k.shape[-2]:
        return osm.tiled_attention(q, k, v, causal=causal, block_n=block_n)
    return osm.tiled_attention(q, k[..., : q.shape[-2], :], v[..., : q.shape[-2], :], causal=True, block_n=block_n)


def _tiled_materializes(q, k, v, *, causal=False, block_n=16):
    return osm.tiled_attention(q, k, v, causal=causal, block_n=k.shape[-2])  # one block = the whole matrix


def _tiled_uses_softmax(q, k, v, *, causal=False, block_n=16):
    return torch.softmax(torch.zeros(1), -1) * 0 + osm.tiled_attention(q, k, v, causal=causal, block_n=block_n)


@pytest.mark.parametrize("check, good, broken", [
    (lesson03.check_online_softmax, osm.online_softmax,
     [_softmax_no_rescale, _softmax_no_max, _softmax_drops_last_block, lambda x, b: torch.softmax(x, -1)]),
    (lesson03.check_tiled_attention, osm.tiled_attention,
     [_tiled_no_rescale, _tiled_top_left_causal, _tiled_materializes, _tiled_uses_softmax]),
])
def test_torch_checks(check, good, broken):
    assert check(good).status == "passed"
    stub = check(_stub)
    assert (stub.status, stub.points) == ("not attempted", 0)
    for fn in broken:
        result = check(fn)
        assert (result.status, result.points) == ("failed", 0) and "hint:" in result.message, fn.__name__


def test_no_rescale_hint_names_the_rescale():
    assert "exp(m - m_new)" in lesson03.check_online_softmax(_softmax_no_rescale).message
    assert "Skv - Sq" in lesson03.check_tiled_attention(_tiled_top_left_causal).message


# ---------------------------------------------------------------- the Triton checks
# The solution kernels of exercises 3 and 4, with switches that plant the bugs the checks must catch.
@triton.jit
def _flash(q_ptr, k_ptr, v_ptr, out_ptr, Hq, Hkv, Sq, Skv, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr = False, BUG_GQA: tl.constexpr = False,
           BUG_RESCALE: tl.constexpr = False, BUG_OFFSET: tl.constexpr = False, BUG_NO_COL_MASK: tl.constexpr = False):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b = off_bh // Hq
    h = off_bh % Hq
    if BUG_GQA:
        h_kv = h % Hkv  # wrong: interleaves heads instead of grouping consecutive ones
    else:
        h_kv = h // (Hq // Hkv)
    q_off = off_bh * Sq * HEAD_DIM
    kv_off = (b * Hkv + h_kv) * Skv * HEAD_DIM
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_off + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < Sq, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    offset = Skv - Sq
    if BUG_OFFSET:
        offset = 0
    if CAUSAL:
        full_end = tl.minimum(start_m * BLOCK_M + offset + 1, Skv) // BLOCK_N * BLOCK_N
        diag_end = tl.minimum((start_m + 1) * BLOCK_M + offset, Skv)
    else:
        full_end = 0
        diag_end = Skv
    for start_n in range(0, full_end, BLOCK_N):  # stage 1 (causal only): no mask
        cols = start_n + offs_n
        k = tl.load(k_ptr + kv_off + cols[:, None] * HEAD_DIM + offs_d[None, :])
        v = tl.load(v_ptr + kv_off + cols[:, None] * HEAD_DIM + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        if BUG_RESCALE:
            l_i = l_i + tl.sum(p, 1)
        else:
            l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    for start_n in range(full_end, diag_end, BLOCK_N):  # stage 2: masked
        cols = start_n + offs_n
        k = tl.load(k_ptr + kv_off + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=cols[:, None] < Skv, other=0.0)
        v = tl.load(v_ptr + kv_off + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=cols[:, None] < Skv, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if BUG_NO_COL_MASK:
            visible = cols[None, :] >= 0
        else:
            visible = cols[None, :] < Skv
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        if BUG_RESCALE:
            l_i = l_i + tl.sum(p, 1)
        else:
            l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_off + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=offs_m[:, None] < Sq)


@triton.jit
def _stub_kernel(q_ptr, k_ptr, v_ptr, out_ptr, Hq, Hkv, Sq, Skv, qk_scale, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    raise NotImplementedError("Exercise: write the kernel")


class _Variant:
    """``kernel`` launched with extra constexpr switches, looking like a kernel to the check."""

    def __init__(self, kernel, **switches):
        self.kernel, self.switches, self.fn = kernel, switches, kernel.fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel[grid](*args, **kwargs, **self.switches)


def test_flash_kernel_check():
    assert lesson03.check_flash_kernel(_flash).status == "passed"
    stub = lesson03.check_flash_kernel(_stub_kernel)
    assert (stub.status, stub.points) == ("not attempted", 0)
    gqa = lesson03.check_flash_kernel(_Variant(_flash, BUG_GQA=True))
    assert gqa.status == "failed" and "h // (Hq // Hkv)" in gqa.message
    no_rescale = lesson03.check_flash_kernel(_Variant(_flash, BUG_RESCALE=True))
    assert no_rescale.status == "failed" and "alpha" in no_rescale.message
    no_mask = lesson03.check_flash_kernel(_Variant(_flash, BUG_NO_COL_MASK=True))
    assert no_mask.status == "failed" and "-inf" in no_mask.message
    assert lesson03.check_flash_kernel(lambda *a: None).status == "failed"


def test_causal_kernel_check():
    assert lesson03.check_causal_kernel(_Variant(_flash, CAUSAL=True)).status == "passed"
    stub = lesson03.check_causal_kernel(_stub_kernel)
    assert (stub.status, stub.points) == ("not attempted", 0)
    offset = lesson03.check_causal_kernel(_Variant(_flash, CAUSAL=True, BUG_OFFSET=True))
    assert offset.status == "failed" and "Skv - Sq" in offset.message
    assert lesson03.check_causal_kernel(_Variant(_flash, CAUSAL=True, BUG_RESCALE=True)).status == "failed"
    assert lesson03.check_causal_kernel(_Variant(_flash, CAUSAL=True, BUG_GQA=True)).status == "failed"
    assert lesson03.check_causal_kernel(_flash).status == "failed"  # not causal at all
