"""KV-cache quantization (lesson 07): the torch helpers' error bounds, kernels.store_kv_int8 and
kernels.paged_attention_int8_decode vs their references (interpreter on CPU, compiled on a GPU), their
ValueErrors, and the shipped model decoding through course_lib.quant.kv_quant.QuantizedPagedKVCache."""
from __future__ import annotations

import json
import math

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import pytest
import torch

import kernels
import kernels.reference as ref
from course_lib.device import DEVICE, HAS_GPU, INTERPRET, kernel_dtypes
from course_lib.quant.kv_quant import (QuantizedPagedKVCache, dequantize, fake_quantize, kv_bytes_per_token,
                                 make_paged_kv_cache, num_blocks_for_memory, quantization_error, quantize)
from kernels.store_kv_int8 import fp8_supported

#: Kernel vs reference (both on the same codes), per q dtype: only the kernel's own rounding differs.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
FP8_WRITE, FP8_WHY = fp8_supported()


# ---------------------------------------------------------------- torch helpers: error bounds
@pytest.mark.parametrize("granularity", ["tensor", "token", "head", "channel"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_int8_error_is_at_most_half_a_step(granularity, scale_dtype):
    x = torch.randn(37, 3, 24) * torch.linspace(0.01, 10, 37)[:, None, None]
    x[5] = 0                                                          # an all-zero token
    q = quantize(x, granularity, scale_dtype=scale_dtype)
    assert q.codes.dtype == torch.int8 and q.codes.shape == x.shape and q.scale.dtype == scale_dtype
    assert int(q.codes.abs().max()) == 127                            # the extreme value maps to ±127
    err = (dequantize(q) - x).abs()
    assert bool((err <= q.scale.float() / 2 * (1 + 1e-5) + 1e-12).all())
    assert torch.isfinite(dequantize(q)).all() and bool((dequantize(q)[5] == 0).all())


def test_granularity_shapes_and_finer_is_better():
    x = torch.randn(64, 4, 32)
    x[:, :, 3] *= 20                                                  # an outlier channel, in every token
    shapes = {g: tuple(quantize(x, g).scale.shape) for g in ("tensor", "token", "head", "channel")}
    assert shapes == {"tensor": (1, 1, 1), "token": (64, 1, 1), "head": (64, 4, 1), "channel": (1, 4, 32)}
    err = {g: quantization_error(x, fake_quantize(x, g))["relative"] for g in shapes}
    assert err["channel"] < err["head"] < err["token"] <= err["tensor"]   # the outlier channel: per-channel wins


def test_zero_point_bound_and_skewed_rows():
    x = torch.rand(50, 2, 16) * 3 + 5                                 # all positive: symmetric wastes half the codes
    sym, asym = quantize(x, "head"), quantize(x, "head", zero_point=True)
    assert int(asym.codes.min()) == -128 and int(asym.codes.max()) == 127
    assert bool(((dequantize(asym) - x).abs() <= asym.scale / 2 * (1 + 1e-4) + 1e-6).all())
    assert (quantization_error(x, dequantize(asym))["relative"]
            < 0.5 * quantization_error(x, dequantize(sym))["relative"])


def test_fp8_relative_error():
    x = torch.randn(20, 2, 32)
    q = quantize(x, "head", kv_dtype="fp8")
    assert q.codes.dtype == torch.float8_e4m3fn and float(q.codes.float().abs().max()) == 448
    big = x.abs() >= q.scale * 2 ** -6 * 1.01                          # e4m3's normal range: 3 mantissa bits
    assert bool(((dequantize(q) - x).abs()[big] <= x.abs()[big] * 2 ** -4 * 1.001).all())


def test_error_metrics_and_memory_formula():
    x = torch.tensor([3.0, 4.0])
    m = quantization_error(x, torch.tensor([3.0, 3.0]))
    assert m["max_abs"] == 1 and m["rmse"] == pytest.approx(math.sqrt(0.5)) and m["relative"] == pytest.approx(0.2)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(25))
    from course_lib import PRESETS
    cfg = PRESETS["llama-3-8b"]                                        # L=32, Hkv=8, D=128
    assert kv_bytes_per_token(cfg, torch.float16) == 2 * 32 * 8 * 128 * 2
    assert kv_bytes_per_token(cfg, "int8") == 2 * 32 * 8 * (128 + 2)   # + one fp16 scale per (token, head)
    assert num_blocks_for_memory(cfg, 2**30, 16, kv_dtype="int8") >= 1.9 * num_blocks_for_memory(cfg, 2**30, 16)


@pytest.mark.parametrize("call, match", [
    (lambda: quantize(torch.randn(4, 2, 8), "row"), "granularity must be one of"),
    (lambda: quantize(torch.randn(8), "head"), r"expected \[..., Hkv, D\]"),
    (lambda: quantize(torch.randn(4, 2, 8), kv_dtype="int4"), "kv_dtype must be one of"),
    (lambda: quantize(torch.randn(4, 2, 8), kv_dtype="fp8", zero_point=True), "zero_point=True is for INT8"),
    (lambda: quantize(torch.randn(4, 2, 8), scale_dtype=torch.bfloat16), "scale_dtype must be"),
])
def test_helpers_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- store_kv_int8
def _caches(N, P, Hkv, D, code_dtype=torch.int8, scale_dtype=torch.float16, zero_point=False):
    caches = [torch.zeros(N, P, Hkv, D, device=DEVICE).to(code_dtype) for _ in range(2)]
    scales = [torch.ones(N, P, Hkv, device=DEVICE, dtype=scale_dtype) for _ in range(2)]
    zeros = dict(k_zero=torch.zeros(N, P, Hkv, device=DEVICE, dtype=scale_dtype),
                 v_zero=torch.zeros(N, P, Hkv, device=DEVICE, dtype=scale_dtype)) if zero_point else {}
    return caches + scales, zeros


def _assert_same_codes(got, want):
    """Codes equal (CPU: bit for bit; compiled, a rare tie may round the other way: at most 1 code apart)."""
    diff = (got.float() - want.float()).abs()
    if INTERPRET:
        assert torch.equal(got, want)
    else:
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("Hkv, D", [(1, 16), (2, 32), (3, 24)])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_store_kv_int8_matches_reference(dtype, Hkv, D, zero_point, scale_dtype):
    gen = torch.Generator().manual_seed(Hkv * D)
    N, P, T = 5, 8, 11
    k = (torch.randn(T, Hkv, D, generator=gen) * 3).to(DEVICE, dtype)
    v = torch.randn(T, Hkv, D, generator=gen).to(DEVICE, dtype)
    k[2] = 0                                                         # an all-zero token: a finite scale
    slots = torch.randperm(N * P, generator=gen)[:T].to(DEVICE)
    slots[3] = -1                                                    # a padding token: skipped
    got, gz = _caches(N, P, Hkv, D, scale_dtype=scale_dtype, zero_point=zero_point)
    want, wz = _caches(N, P, Hkv, D, scale_dtype=scale_dtype, zero_point=zero_point)
    kernels.store_kv_int8(k, v, *got, slots, **gz)
    ref.store_kv_int8(k, v, *want, slots, **wz)
    for g, w in zip(got[:2], want[:2]):
        _assert_same_codes(g, w)
    for g, w in zip(got[2:], want[2:]):
        # scales: the same bits on CPU; on a GPU torch's `amax / 127` multiplies by 1/127 (1 ulp off IEEE division)
        torch.testing.assert_close(g, w, **(dict(rtol=0, atol=0) if INTERPRET else dict(rtol=3e-7, atol=0)))
    for (name, g), w, scale in zip(gz.items(), wz.values(), want[2:]):
        # zero = min + 128 * scale: one ulp of the scale becomes up to 128 ulps of it in the zero point
        # (compiled only; seen on an H200 for fp32 scales, 2026-11-27)
        atol = 0.0 if INTERPRET else 2e-5 * float(scale.float().abs().max())
        torch.testing.assert_close(g, w, rtol=0 if INTERPRET else 3e-7, atol=atol, msg=lambda m: f"{name}: {m}")
    zero_token = got[0].view(-1, Hkv, D)[slots[2]].float() * got[2].view(-1, Hkv)[slots[2]].float()[:, None]
    if zero_point:
        zero_token = zero_token + gz["k_zero"].view(-1, Hkv)[slots[2]].float()[:, None]
    assert bool((zero_token == 0).all())                             # the all-zero token dequantizes to exactly 0
    untouched = torch.ones(N * P, dtype=torch.bool, device=DEVICE)
    untouched[slots[slots >= 0]] = False
    assert bool((got[2].view(-1, Hkv)[untouched] == 1).all())        # other slots keep their (initial) scales


def test_store_kv_int8_reads_strided_keys():
    k = torch.randn(4, 6, 2, 16, device=DEVICE)[:, ::2].reshape(12, 2, 16)[::2]   # non-contiguous rows
    v = torch.randn(6, 2, 16, device=DEVICE)
    got, _ = _caches(2, 4, 2, 16)
    want, _ = _caches(2, 4, 2, 16)
    slots = torch.arange(6, device=DEVICE, dtype=torch.int32)
    kernels.store_kv_int8(k, v, *got, slots)
    ref.store_kv_int8(k.contiguous(), v, *want, slots)
    _assert_same_codes(got[0], want[0])


@pytest.mark.skipif(not FP8_WRITE, reason=f"FP8 store: {FP8_WHY}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_store_kv_fp8_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    N, P, Hkv, D, T = 6, 16, 8, 128, 70
    k = (torch.randn(T, Hkv, D, generator=gen) * 5).to(DEVICE, dtype)
    v = torch.randn(T, Hkv, D, generator=gen).to(DEVICE, dtype)
    slots = torch.randperm(N * P, generator=gen)[:T].to(DEVICE)
    got, _ = _caches(N, P, Hkv, D, torch.float8_e4m3fn)
    want, _ = _caches(N, P, Hkv, D, torch.float8_e4m3fn)
    kernels.store_kv_int8(k, v, *got, slots)
    ref.store_kv_int8(k, v, *want, slots)
    for g, w in zip(got[:2], want[:2]):                               # codes: at most a rare tie apart
        assert (g.float() != w.float()).float().mean() < 1e-3
    for g, w in zip(got[2:], want[2:]):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=0)


@pytest.mark.skipif(FP8_WRITE, reason="this machine supports FP8 writes")
def test_fp8_store_is_refused_cleanly_where_unsupported():
    caches, _ = _caches(2, 4, 1, 16, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        kernels.store_kv_int8(torch.randn(3, 1, 16, device=DEVICE), torch.randn(3, 1, 16, device=DEVICE), *caches,
                              torch.arange(3, device=DEVICE))


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "k": a["k"][:, :1]}, r"k has shape \(3, 1, 16\); expected \[T, Hkv=2, D=16\]"),
    (lambda a: {**a, "v": a["v"][:2]}, "v has shape"),
    (lambda a: {**a, "k": a["k"].long(), "v": a["v"].long()}, "k has dtype torch.int64"),
    (lambda a: {**a, "v": a["v"].half()}, "v has dtype torch.float16; expected the dtype of k"),
    (lambda a: {**a, "k_cache": a["k_cache"].float()}, "k_cache has dtype torch.float32; expected torch.int8"),
    (lambda a: {**a, "v_cache": a["v_cache"][:1]}, "v_cache has shape"),
    (lambda a: {**a, "k_scale": a["k_scale"][:, :, :1]},
     r"k_scale has shape \(2, 8, 1\); expected \[num_blocks, block_size, Hkv\]"),
    (lambda a: {**a, "v_scale": a["v_scale"].bfloat16()}, "v_scale has dtype torch.bfloat16"),
    (lambda a: {**a, "v_scale": a["v_scale"].float()}, "expected the dtype of k_scale"),
    (lambda a: {**a, "k_zero": torch.zeros(2, 8, 2, device=DEVICE, dtype=torch.float16)},
     "give both k_zero and v_zero"),
    (lambda a: {**a, "slot_mapping": a["slot_mapping"][:2]}, "slot_mapping has shape"),
    (lambda a: {**a, "slot_mapping": a["slot_mapping"].float()}, "slot_mapping has dtype torch.float32"),
    (lambda a: {**a, "slot_mapping": a["slot_mapping"] + 100}, "the cache has only N\\*P = 16 slots"),
    (lambda a: {**a, "k": a["k"].to("meta")}, "k is on meta"),
    (lambda a: {**a, "k_scale": [1.0]}, "k_scale must be a torch.Tensor"),
])
def test_store_kv_int8_rejects_bad_inputs(change, match):
    (kc, vc, ks, vs), _ = _caches(2, 8, 2, 16)
    args = dict(k=torch.randn(3, 2, 16, device=DEVICE), v=torch.randn(3, 2, 16, device=DEVICE), k_cache=kc, v_cache=vc,
                k_scale=ks, v_scale=vs, slot_mapping=torch.tensor([0, 5, 9], device=DEVICE))
    with pytest.raises(ValueError, match=match):
        kernels.store_kv_int8(**change(args))


# ---------------------------------------------------------------- paged_attention_int8_decode
def make_quantized(B, Hq, Hkv, D, P, lens, dtype, *, seed=0, kv_dtype="int8", zero_point=False,
                   scale_dtype=torch.float16, spare_blocks=3):
    """q, 8-bit caches + scales (quantized from random K/V), block tables (blocks scattered), context lengths;
    also the full-precision K/V caches the codes came from, and the zero points (a dict, maybe empty)."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-L // P) for L in lens) + 1
    N = B * max_blocks + spare_blocks
    k = torch.randn(N, P, Hkv, D, generator=gen)
    v = torch.randn(N, P, Hkv, D, generator=gen)
    qk = quantize(k, "head", kv_dtype=kv_dtype, zero_point=zero_point, scale_dtype=scale_dtype)
    qv = quantize(v, "head", kv_dtype=kv_dtype, zero_point=zero_point, scale_dtype=scale_dtype)
    tables = torch.randperm(N, generator=gen)[: B * max_blocks].view(B, max_blocks).to(DEVICE, torch.int32)
    q = torch.randn(B, Hq, D, generator=gen).to(DEVICE, dtype)
    args = (q, qk.codes.to(DEVICE), qv.codes.to(DEVICE), qk.scale[..., 0].contiguous().to(DEVICE),
            qv.scale[..., 0].contiguous().to(DEVICE), tables, torch.tensor(lens, dtype=torch.int32, device=DEVICE))
    zeros = {}
    if zero_point:
        zeros = dict(k_zero=qk.zero[..., 0].contiguous().to(DEVICE), v_zero=qv.zero[..., 0].contiguous().to(DEVICE))
    return args, zeros, (k.to(DEVICE, dtype), v.to(DEVICE, dtype))


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (8, 2), (6, 1)])   # MHA, GQA (G=4), MQA with G not a power of 2
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_attention_int8_matches_reference(dtype, Hq, Hkv, num_splits):
    lens = [1, 16, 17, 43, 70]                                  # 1 token, one block, one past, ragged
    args, _, _ = make_quantized(len(lens), Hq, Hkv, 32, 16, lens, dtype, seed=Hq)
    got = kernels.paged_attention_int8_decode(*args, num_splits=num_splits)
    want = ref.paged_attention_int8_decode(*args)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("P", [8, 32])
@pytest.mark.parametrize("variant", ["zero_point", "fp8", "fp32_scales"])
def test_paged_attention_int8_variants(P, variant):
    dtype = kernel_dtypes()[0]
    lens = [5, P, 3 * P - 1]
    options = {"zero_point": dict(zero_point=True), "fp8": dict(kv_dtype="fp8"),
               "fp32_scales": dict(scale_dtype=torch.float32)}[variant]
    args, zeros, _ = make_quantized(len(lens), 8, 2, 32, P, lens, dtype, seed=P, **options)
    want = ref.paged_attention_int8_decode(*args, **zeros)
    for splits in (None, 2):
        torch.testing.assert_close(kernels.paged_attention_int8_decode(*args, num_splits=splits, **zeros), want,
                                   **TOL[dtype])


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("Hq, Hkv, D, zero_point", [(8, 2, 32, False), (6, 1, 64, False), (8, 2, 32, True)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_k_int8_dot_is_exact_for_the_query_rounded_to_int8(dtype, Hq, Hkv, D, zero_point, num_splits):
    """CONFIG's K_INT8_DOT: scores through int8 dots on K's codes with q rounded to int8 per head. Exact for that
    rounded q (ref.round_query_int8), and visibly not the unrounded q's result (the switch took effect)."""
    lens = [1, 16, 43, 70]
    args, zeros, _ = make_quantized(len(lens), Hq, Hkv, D, 16, lens, dtype, seed=D + Hq, zero_point=zero_point)
    q = args[0]
    got = kernels.paged_attention_int8_decode(*args, num_splits=num_splits, config=dict(K_INT8_DOT=True), **zeros)
    want = ref.paged_attention_int8_decode(ref.round_query_int8(q), *args[1:], **zeros).to(dtype)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    unrounded = ref.paged_attention_int8_decode(*args, **zeros).float()
    assert (got.float() - unrounded).abs().max() > 1e-4                 # q's rounding shows: the int8 path ran
    assert (got.float() - unrounded).abs().max() < 0.05                  # ... and costs little (7e-3 to 9e-3 here)


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("k_int8_dot", [False, True])
def test_biased_codes_give_the_same_attention(monkeypatch, zero_point, k_int8_dot):
    """CONFIG's BIASED: codes as the fp16 numbers 1152 + c, the bias removed from the sums (fp16 queries, INT8
    codes). Same result as without it, and the switch reaches the kernel (its launches are watched)."""
    import kernels.paged_attention_int8 as pa8
    launches, kernel = [], pa8._paged_attention_int8_kernel

    class Watch:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(kw)
                return kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(pa8, "_paged_attention_int8_kernel", Watch())
    lens = [1, 16, 43, 300]
    args, zeros, _ = make_quantized(len(lens), 8, 2, 32, 16, lens, torch.float16, seed=11, zero_point=zero_point)
    q = ref.round_query_int8(args[0]) if k_int8_dot else args[0]
    want = ref.paged_attention_int8_decode(q, *args[1:], **zeros).half()
    for splits in (1, 3):
        got = kernels.paged_attention_int8_decode(*args, num_splits=splits, **zeros,
                                                  config=dict(BIASED=True, K_INT8_DOT=k_int8_dot))
        torch.testing.assert_close(got, want, **TOL[torch.float16])
    assert [kw["BIASED"] for kw in launches] == [True, True]
    kernels.paged_attention_int8_decode(args[0].float(), *args[1:], **zeros, config=dict(BIASED=True))
    assert launches[-1]["BIASED"] is False                               # fp32 queries: no fp16 bit trick, no bias


def test_k_int8_dot_leaves_fp8_codes_alone_and_bad_configs_are_named():
    dtype = kernel_dtypes()[0]
    args, _, _ = make_quantized(2, 4, 2, 16, 8, [5, 12], dtype, kv_dtype="fp8")
    torch.testing.assert_close(kernels.paged_attention_int8_decode(*args, config=dict(K_INT8_DOT=True)),
                               ref.paged_attention_int8_decode(*args), **TOL[dtype])
    with pytest.raises(ValueError, match=r"config has unknown key\(s\) \['K_INT8'\]"):
        kernels.paged_attention_int8_decode(*args, config=dict(K_INT8=True))
    with pytest.raises(ValueError, match="config BLOCK_N is 48"):
        kernels.paged_attention_int8_decode(*args, config=dict(BLOCK_N=48))
    with pytest.raises(ValueError, match="config num_warps 3 / num_stages 1"):
        kernels.paged_attention_int8_decode(*args, config=dict(num_warps=3))


def test_head_dim_not_a_power_of_two_sm_scale_empty_sequences_and_auto_split():
    args, _, _ = make_quantized(3, 4, 2, 24, 8, [0, 9, 20], torch.float32)
    for splits in (1, 2):
        got = kernels.paged_attention_int8_decode(*args, sm_scale=0.3, num_splits=splits)
        torch.testing.assert_close(got, ref.paged_attention_int8_decode(*args, sm_scale=0.3), **TOL[torch.float32])
        assert torch.equal(got[0], torch.zeros_like(got[0]))         # context length 0: zeros, not NaN
    args, _, _ = make_quantized(1, 4, 1, 16, 16, [1000], torch.float32)   # 1 sequence x 1 kv head: split-K chosen
    torch.testing.assert_close(kernels.paged_attention_int8_decode(*args), ref.paged_attention_int8_decode(*args),
                               **TOL[torch.float32])


@pytest.mark.parametrize("splits", [1, 2])
def test_paged_attention_int8_reads_words_and_refuses_what_is_not_whole_words(splits):
    """Codes are read as int32 words of 4: a cache that does not start at a 4-byte boundary, or a head_dim that is
    not a multiple of 4, gets a ValueError instead of misaligned reads."""
    args, _, _ = make_quantized(3, 8, 2, 24, 8, [5, 8, 23], torch.float16, seed=7)
    want = ref.paged_attention_int8_decode(*args)
    torch.testing.assert_close(kernels.paged_attention_int8_decode(*args, num_splits=splits), want,
                               **TOL[torch.float16])
    shifted = []
    for codes in args[1:3]:                                           # the same codes, 1 byte past a word boundary
        buf = torch.empty(codes.numel() + 1, dtype=codes.dtype, device=codes.device)[1:].view(codes.shape)
        buf.copy_(codes)
        shifted.append(buf)
    assert shifted[0].data_ptr() % 4 != 0
    with pytest.raises(ValueError, match="k_cache does not start at a 4-byte boundary"):
        kernels.paged_attention_int8_decode(args[0], *shifted, *args[3:], num_splits=splits)
    args, _, _ = make_quantized(1, 2, 1, 18, 8, [5], torch.float16, seed=7)
    with pytest.raises(ValueError, match="multiple of 4"):
        kernels.paged_attention_int8_decode(*args)


def test_int8_attention_is_close_to_full_precision_attention():
    """The quantization error itself: INT8 K/V (per token and head) vs the original K/V."""
    args, _, (k, v) = make_quantized(2, 8, 2, 32, 16, [40, 64], torch.float32, seed=4)
    exact = kernels.reference.paged_attention_decode(args[0], k, v, args[5], args[6])
    err = quantization_error(exact, kernels.paged_attention_int8_decode(*args))
    assert err["relative"] < 0.02, err                                 # measured ~0.5%


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "q": a["q"][:, :, None]}, r"q has shape \(2, 4, 1, 16\); expected \[B, Hq, D\]"),
    (lambda a: {**a, "q": a["q"][:, :3]}, "q has 3 heads, not a multiple of k_cache's 2 kv heads"),
    (lambda a: {**a, "q": a["q"][..., :8].contiguous()}, "k_cache has head_dim 16 .* expected q's head_dim D=8"),
    (lambda a: {**a, "q": a["q"].long()}, "q has dtype torch.int64"),
    (lambda a: {**a, "k_cache": a["k_cache"].float()}, "k_cache has dtype torch.float32; expected torch.int8"),
    (lambda a: {**a, "v_cache": a["v_cache"][:, :4]}, "v_cache has shape"),
    (lambda a: {**a, "k_scale": a["k_scale"][:1]}, "k_scale has shape"),
    (lambda a: {**a, "v_scale": a["v_scale"].double()}, "v_scale has dtype torch.float64"),
    (lambda a: {**a, "k_scale": a["k_scale"].transpose(0, 1).contiguous().transpose(0, 1)},
     "k_scale must be contiguous"),
    (lambda a: {**a, "v_zero": a["k_scale"]}, "give both k_zero and v_zero"),
    (lambda a: {**a, "block_tables": a["block_tables"].long()},
     "block_tables has dtype torch.int64; expected torch.int32"),
    (lambda a: {**a, "block_tables": a["block_tables"][:1]}, r"block_tables has shape \(1, 3\); expected \[B=2"),
    (lambda a: {**a, "context_lens": a["context_lens"].long()}, "context_lens has dtype torch.int64"),
    (lambda a: {**a, "context_lens": a["context_lens"] + 40},
     "longer than block_tables can address: 3 blocks x block_size 8 = 24"),
    (lambda a: {**a, "context_lens": a["context_lens"] - 10}, "lengths must be >= 0"),
    (lambda a: {**a, "num_splits": 0}, "num_splits must be None or a positive int"),
    (lambda a: {**a, "q": a["q"].to("meta")}, "q is on meta"),
    (lambda a: {**a, "v_scale": a["v_scale"].tolist()}, "v_scale must be a torch.Tensor"),
])
def test_paged_attention_int8_rejects_bad_inputs(change, match):
    (q, kc, vc, ks, vs, tables, lens), _, _ = make_quantized(2, 4, 2, 16, 8, [5, 12], torch.float32)
    args = dict(q=q, k_cache=kc, v_cache=vc, k_scale=ks, v_scale=vs, block_tables=tables, context_lens=lens)
    with pytest.raises(ValueError, match=match):
        kernels.paged_attention_int8_decode(**change(args))


@pytest.mark.parametrize("bad", [517, -1])
def test_paged_attention_int8_refuses_a_block_id_outside_the_cache(bad):
    """A block id past the cache segfaulted the process (or gave NaN); padding past the used entries is fine."""
    args, _, _ = make_quantized(2, 4, 2, 16, 8, [5, 12], torch.float32)     # N = 9 blocks
    want = ref.paged_attention_int8_decode(*args)
    tables = args[5].clone()
    tables[0, 1:], tables[1, 2] = -1, -1                                  # never read: padding
    torch.testing.assert_close(kernels.paged_attention_int8_decode(*args[:5], tables, args[6]), want,
                               **TOL[torch.float32])
    tables[1, 1] = bad
    with pytest.raises(ValueError, match=rf"block_tables\[1, 1\] = {bad} is outside \[0, num_blocks=9\) "
                                         rf"\(sequence 1 reads block_tables\[1, 0:2\] for context_lens\[1\] = 12\)"):
        kernels.paged_attention_int8_decode(*args[:5], tables, args[6])
    for sm_scale in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="sm_scale must be a positive finite number"):
            kernels.paged_attention_int8_decode(*args, sm_scale=sm_scale)
    # the engine's path: tables it built itself, the longest context known, nothing read back from the device
    torch.testing.assert_close(kernels.paged_attention_int8_decode(*args, max_context_len=12, validate=False), want,
                               **TOL[torch.float32])


@pytest.mark.parametrize("name", ["k", "v"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_store_kv_int8_refuses_values_that_are_not_finite(name, bad):
    """One inf made the row's scale inf (every value of the row then dequantized to NaN); one NaN was stored as
    code 0 (the kernel) or made the scale NaN (the reference): refused, naming the token and the kv head."""
    (kc, vc, ks, vs), _ = _caches(2, 8, 2, 16)
    x = dict(k=torch.randn(3, 2, 16, device=DEVICE), v=torch.randn(3, 2, 16, device=DEVICE))
    x[name][2, 1, 5] = bad
    for store in (kernels.store_kv_int8, ref.store_kv_int8):
        with pytest.raises(ValueError, match=rf"{name}\[2, 1\] holds {bad}"):
            store(**x, k_cache=kc, v_cache=vc, k_scale=ks, v_scale=vs,
                  slot_mapping=torch.tensor([0, 5, 9], device=DEVICE))
    # validate=False: the engine's path (its model's K/V), no check and no host sync
    x[name][2, 1, 5] = 0.0
    kernels.store_kv_int8(**x, k_cache=kc, v_cache=vc, k_scale=ks, v_scale=vs,
                          slot_mapping=torch.tensor([0, 5, 9], device=DEVICE), validate=False)
    assert torch.isfinite(ks).all() and torch.isfinite(vs).all()


# ---------------------------------------------------------------- compiled on a GPU, real shapes
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, L, P, kv_dtype", [(32, 1000, 16, "int8"), (4, 4097, 16, "int8"), (1, 32768, 16, "int8"),
                                               (8, 3000, 8, "int8"), (16, 2000, 16, "fp8")])
def test_real_shapes_on_gpu(dtype, B, L, P, kv_dtype):
    if kv_dtype == "fp8" and not FP8_WRITE:
        pytest.skip(FP8_WHY)
    lens = [L - 7 * b for b in range(B)]
    args, _, (k, v) = make_quantized(B, 32, 8, 128, P, lens, dtype, seed=B, kv_dtype=kv_dtype)
    want = ref.paged_attention_int8_decode(*args)
    for splits in (None, 1, 8):
        torch.testing.assert_close(kernels.paged_attention_int8_decode(*args, num_splits=splits), want, **TOL[dtype])
    # the fused store writes the codes the reference computes, at real shapes
    T = 512
    slots = torch.randperm(k.shape[0] * P, device=DEVICE)[:T]
    kk, vv = k.view(-1, 8, 128)[:T], v.view(-1, 8, 128)[:T]
    got, _ = _caches(k.shape[0], P, 8, 128, args[1].dtype)
    wnt, _ = _caches(k.shape[0], P, 8, 128, args[1].dtype)
    kernels.store_kv_int8(kk, vv, *got, slots)
    ref.store_kv_int8(kk, vv, *wnt, slots)
    for g, w in zip(got[:2], wnt[:2]):
        if kv_dtype == "int8":
            _assert_same_codes(g, w)
        else:
            assert (g.float() != w.float()).float().mean() < 1e-3
    torch.testing.assert_close(got[2], wnt[2], rtol=1e-3, atol=0)       # fp16 scales: 1 ulp


# ---------------------------------------------------------------- the shipped model through the 8-bit cache
@pytest.fixture(scope="module")
def tiny():
    from course_lib import load_tiny

    model, tokenizer = load_tiny("target")
    return model.to(DEVICE, torch.float32).eval(), tokenizer


@torch.no_grad()
def _decode(model, cache, prompt_ids, steps, forced=None):
    """Greedy decode (or teacher-forced along ``forced`` [B, steps]): the argmax token of every step."""
    x, out = torch.tensor(prompt_ids, device=DEVICE), []
    for i in range(steps):
        nxt = model(x, cache=cache, last_token_only=True)[:, -1].argmax(-1)
        out.append(nxt.tolist())
        x = (nxt if forced is None else torch.tensor([f[i] for f in forced], device=DEVICE))[:, None]
    return [list(col) for col in zip(*out)]


def test_model_int8_cache_kernels_equal_references(tiny, one_thread):
    model, tok = tiny
    prompts = [tok.encode("In the beginning God created"), tok.encode("And the LORD spake unto Moses")]
    n = min(len(p) for p in prompts)
    prompts, steps = [p[:n] for p in prompts], 10
    assert n + steps - 1 > 8                                         # the decode crosses a block boundary (P = 8)
    caches = [QuantizedPagedKVCache(model.config, num_blocks=16, block_size=8, batch_size=2, device=DEVICE,
                                    use_kernel=u)
              for u in (True, False)]
    got, want = (_decode(model, c, prompts, steps) for c in caches)
    assert got == want
    for layer in (0, model.config.num_hidden_layers - 1):            # the kernel wrote the reference's codes
        _assert_same_codes(caches[0].k_caches[layer], caches[1].k_caches[layer])


AGREEMENT_TEXTS = ["In the beginning God created", "And the LORD spake unto Moses, saying", "Then Jesus said unto"]
AGREEMENT_STEPS = 100


@pytest.fixture(scope="module")
def fp32_greedy(tiny):
    """The FP32 contiguous cache's greedy continuation of each text: (prompt ids, [tokens])."""
    from course_lib.model.kv_cache import KVCache

    model, tok = tiny
    out = []
    for text in AGREEMENT_TEXTS:
        ids = tok.encode(text)
        out.append((ids, _decode(model, KVCache(model.config, 1, len(ids) + AGREEMENT_STEPS, device=DEVICE), [ids],
                                 AGREEMENT_STEPS)))
    return out


@pytest.mark.parametrize("options", [dict(kv_dtype="int8"), dict(kv_dtype="int8", zero_point=True),
                                     dict(kv_dtype="fp8")])
def test_model_8bit_cache_agrees_with_full_precision(tiny, fp32_greedy, one_thread, options):
    """Teacher-forced along the FP32 cache's greedy output (so one early near-tie cannot derail the rest), the
    8-bit cache picks the same next token at >= 97% of 3 x 100 steps (measured: 100%; plain-torch path)."""
    model, _ = tiny
    agree = total = 0
    for ids, want in fp32_greedy:
        cache = make_paged_kv_cache(model.config, num_blocks=16, block_size=16, device=DEVICE, use_kernel=False,
                                    **options)
        got = _decode(model, cache, [ids], AGREEMENT_STEPS, forced=want)
        agree += sum(a == b for a, b in zip(got[0], want[0]))
        total += AGREEMENT_STEPS
    assert agree / total >= 0.97, agree / total


def test_quantized_cache_memory_fork_and_factory(tiny):
    from course_lib.paging.paged_cache import PagedKVCache

    model, tok = tiny
    cfg = model.config                                               # D = 32: int8 + fp16 scale = 34 of 64 bytes
    fp16 = make_paged_kv_cache(cfg, 8, 16, dtype=torch.float16, device=DEVICE)
    int8 = make_paged_kv_cache(cfg, 8, 16, kv_dtype="int8", device=DEVICE)
    assert type(fp16) is PagedKVCache and isinstance(int8, QuantizedPagedKVCache)
    assert int8.nbytes() / fp16.nbytes() == pytest.approx((32 + 2) / 64)
    assert int8.bytes_per_token() == kv_bytes_per_token(cfg, "int8")
    with pytest.raises(ValueError, match="only apply to a quantized cache"):
        make_paged_kv_cache(cfg, 8, 16, zero_point=True)
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        make_paged_kv_cache(cfg, 8, 16, kv_dtype="int4")
    # copy-on-write copies the scales with the codes
    prompt = tok.encode("In the beginning God created")[:6]        # 6 tokens: block 0 partly filled (P = 8)
    cache = QuantizedPagedKVCache(cfg, num_blocks=8, block_size=8, device=DEVICE, use_kernel=False, zero_point=True)
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=DEVICE), cache=cache, last_token_only=True)
    cache.fork(0)
    first = logits[0, -1].topk(2).indices
    tokens = _decode(model, cache, [[int(first[0])], [int(first[1])]], 2)
    assert cache.num_used_blocks == 2
    alone = QuantizedPagedKVCache(cfg, num_blocks=8, block_size=8, device=DEVICE, use_kernel=False, zero_point=True)
    with torch.no_grad():
        model(torch.tensor([prompt], device=DEVICE), cache=alone)
    assert _decode(model, alone, [[int(first[1])]], 2)[0] == tokens[1]   # the child saw the prompt's real scales


# ---------------------------------------------------------------- the benchmark script runs (CPU smoke mode)
@pytest.mark.command
def test_benchmark_script_quick(tmp_path):
    from benchmarks import kv_quant as bench

    out = tmp_path / "r.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for key in ("device", "date", "git_commit", "cpu_model", "driver", "torch", "triton", "correctness", "decode",
                "memory", "targets"):
        assert key in result
    assert all(c["max_abs_error"] <= c["tolerance"] for c in result["correctness"])
    if not HAS_GPU:   # the Gluon kernel has no interpreter: recorded as not timed, and why
        assert result["gluon"]["timed"] is False and "no CUDA GPU" in result["gluon"]["why_not"]
        assert result["targets"]["int8_gluon_ratio_to_fp16_at_8k_plus_worst"] is None
        assert not any("int8_gluon_seconds" in p for p in result["decode"])


def test_sweep_candidates_match_the_reference():
    """benchmarks/int8_kernel_sweep.py's tile kernels (the candidates the shipped kernel was chosen against) compute
    the same attention, split or not; the PTX conversion is compiled-only, Triton's own conversion runs here."""
    from benchmarks import int8_kernel_sweep as sweep
    from benchmarks.kv_quant import make_caches

    q, _, _, tables, _, quantized = make_caches(2, 70, 4, 2, 16, 8, torch.float16 if HAS_GPU else torch.float32,
                                                {"int8": torch.int8}, seed=3)
    lens = torch.tensor([70, 23], dtype=torch.int32, device=DEVICE)
    want = ref.paged_attention_int8_decode(q, *quantized["int8"], tables, lens).float()
    for k_int8_dot in (False, True):          # K through an int8 dot rounds q: a looser tolerance
        for splits in (None, 3):
            got = sweep.tile_decode(q, *quantized["int8"], tables, lens, max_context_len=70, BLOCK_N=16,
                                    CONV_ASM=HAS_GPU, K_INT8_DOT=k_int8_dot, num_splits=splits).float()
            torch.testing.assert_close(got, want, atol=2e-2 if k_int8_dot else 2e-3, rtol=0)
    rounded = ref.paged_attention_int8_decode(ref.round_query_int8(q), *quantized["int8"], tables, lens).float()
    for c, expect in ((dict(kernel="planes"), want), (dict(kernel="planes", K_INT8_DOT=True), rounded)):
        assert c in list(sweep.candidates())                       # the shipped kernel, with and without the switch
        got = sweep.call_for(c, q, quantized["int8"], tables, lens, 70)().float()
        torch.testing.assert_close(got, expect, atol=2e-3, rtol=0)
