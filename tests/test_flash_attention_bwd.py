"""The FlashAttention backward: kernels.flash_attention's gradients (Triton kernels of kernels.flash_attention_bwd)
vs torch.autograd through the plain-torch reference forward, in the interpreter at tiny shapes on CPU and compiled on
a GPU; the reference backward's formulas vs autograd and vs finite differences (gradcheck, float64)."""
from __future__ import annotations

import math

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import pytest
import torch
import triton

import kernels
import kernels.flash_attention_bwd as bwd
import kernels.reference
from course_lib.device import DEVICE, HAS_GPU, INTERPRET
from kernels.flash_attention import _flash_attention
from kernels.flash_attention_bwd import DKDV_CONFIGS, DKDV_DQ_CONFIGS, DQ_CONFIGS

# Per-dtype tolerances on dq, dk, dv: |got - want| <= atol * max(1, max|want|) + rtol * |want|. float32 runs exact
# fp32 dots (input_precision="ieee") on a GPU and numpy fp32 in the interpreter; fp16/bf16 round P and dS to the
# input dtype before their matmuls (as FlashAttention does), the reference keeps them in fp32.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=5e-3),
       torch.bfloat16: dict(rtol=5e-2, atol=3e-2)}
DTYPES = [torch.float32] if INTERPRET else [torch.float16, torch.bfloat16, torch.float32]
# On a GPU the small cases use one fixed config (each config is a compilation); autotuning is tested at real shapes.
SMALL_CONFIG = None if INTERPRET else dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed=0):
    """q, k, v (leaf tensors that require grad) and an upstream gradient dO, on the kernels' device."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, s, D, generator=gen).to(DEVICE, dtype).requires_grad_()
               for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))
    return q, k, v, torch.randn(B, Hq, Sq, D, generator=gen).to(DEVICE, dtype)


def _grads(fn, q, k, v, do, **kwargs):
    """(dq, dk, dv) of sum(fn(q, k, v) * do)."""
    return torch.autograd.grad(fn(q, k, v, **kwargs), (q, k, v), do)


def assert_grads_close(got, want, dtype):
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        tol = TOL[dtype]
        atol = tol["atol"] * max(1.0, w.float().abs().max().item())
        torch.testing.assert_close(g.float(), w.float(), rtol=tol["rtol"], atol=atol, msg=lambda m: f"{name}: {m}")


# (B, Hq, Hkv, Sq, Skv, D, causal): lengths that are not multiples of the blocks, Sq != Skv both ways, GQA groups
# 1, 2 and 4, causal with and without an offset, one query, every head dim.
CASES = [
    (1, 2, 2, 32, 32, 32, False),
    (1, 2, 2, 37, 37, 16, True),
    (2, 4, 2, 20, 75, 64, True),  # GQA 2, causal with an offset of 55
    (1, 4, 1, 1, 50, 32, True),  # MQA (group 4), one query that sees every key
    (1, 4, 1, 23, 40, 32, False),
    (1, 2, 2, 45, 30, 32, False),  # more queries than keys
    (1, 2, 1, 17, 33, 128, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal", CASES)
def test_grads_match_autograd_of_the_reference(B, Hq, Hkv, Sq, Skv, D, causal, dtype):
    q, k, v, do = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype)
    out = kernels.flash_attention(q, k, v, causal=causal, config=SMALL_CONFIG)
    assert type(out.grad_fn).__name__ == "FlashAttentionFunctionBackward"
    got = torch.autograd.grad(out, (q, k, v), do)
    assert_grads_close(got, _grads(kernels.reference.flash_attention, q, k, v, do, causal=causal), dtype)


@pytest.mark.skipif(not INTERPRET, reason="interpreter block sizes (the GPU configs are tested below)")
@pytest.mark.parametrize("config", [dict(BLOCK_M=32, BLOCK_N=16), dict(BLOCK_M=16, BLOCK_N=16)])
def test_other_block_shapes(config):
    """The stage bounds of both kernels with BLOCK_M > BLOCK_N and equal blocks (the default has BLOCK_N > BLOCK_M),
    and fp16 (P and dS rounded before their matmuls)."""
    for dtype, case in [(torch.float32, (1, 4, 2, 29, 61, 32, True)), (torch.float16, (1, 2, 1, 40, 40, 16, True))]:
        q, k, v, do = _inputs(*case[:6], dtype, seed=1)
        got = _grads(kernels.flash_attention, q, k, v, do, causal=True, config=config)
        assert_grads_close(got, _grads(kernels.reference.flash_attention, q, k, v, do, causal=True), dtype)


def test_lse_is_differentiable_and_sm_scale():
    """A loss of out and lse (as a merge of partial attentions uses): d lse_i / d s_ij = P_ij enters as Δ - dlse."""
    dtype = DTYPES[0]
    q, k, v, do = _inputs(1, 4, 2, 19, 45, 32, dtype, seed=2)
    dlse = torch.randn(1, 4, 19, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    loss = lambda out, lse: (out.float() * do.float()).sum() + (lse * dlse).sum()
    out, lse = kernels.flash_attention(q, k, v, causal=True, sm_scale=0.3, return_lse=True, config=SMALL_CONFIG)
    got = torch.autograd.grad(loss(out, lse), (q, k, v))
    want = torch.autograd.grad(loss(*kernels.reference.flash_attention_lse(q, k, v, causal=True, sm_scale=0.3)),
                               (q, k, v))
    assert_grads_close(got, want, dtype)


def test_only_the_grads_asked_for():
    dtype = DTYPES[0]
    q, k, v, do = _inputs(1, 2, 1, 12, 20, 16, dtype, seed=4)
    want = _grads(kernels.reference.flash_attention, q, k, v, do)
    k_, v_ = k.detach(), v.detach()
    (dq,) = torch.autograd.grad(kernels.flash_attention(q, k_, v_, config=SMALL_CONFIG), (q,), do)
    torch.testing.assert_close(dq.float(), want[0].float(), **TOL[dtype])
    (dv,) = torch.autograd.grad(kernels.flash_attention(q.detach(), k_, v, config=SMALL_CONFIG), (v,), do)
    torch.testing.assert_close(dv.float(), want[2].float(), **TOL[dtype])


def test_without_grad_nothing_changes():
    """No tensor requires grad, or grad is disabled: the plain forward, no autograd node, the same numbers."""
    dtype = DTYPES[0]
    q, k, v, _ = _inputs(1, 2, 2, 24, 24, 32, dtype, seed=5)
    plain = _flash_attention(q.detach(), k.detach(), v.detach(), causal=True, config=SMALL_CONFIG)
    out = kernels.flash_attention(q.detach(), k.detach(), v.detach(), causal=True, config=SMALL_CONFIG)
    with torch.no_grad():
        out_no_grad = kernels.flash_attention(q, k, v, causal=True, config=SMALL_CONFIG)
    out_grad = kernels.flash_attention(q, k, v, causal=True, config=SMALL_CONFIG)
    assert out.grad_fn is None and out_no_grad.grad_fn is None and out_grad.grad_fn is not None
    assert torch.equal(out, plain) and torch.equal(out_no_grad, plain) and torch.equal(out_grad.detach(), plain)


def test_masked_keys_get_no_gradient():
    """Causal, Sq = Skv: the last key is visible to the last query only. With that query's dO = 0, the key's dk and
    dv are exactly 0: a recompute that forgot the causal mask would give it weight from every other query."""
    dtype = DTYPES[0]
    q, k, v, do = _inputs(1, 2, 1, 40, 40, 32, dtype, seed=6)
    do[:, :, -1] = 0
    dq, dk, dv = _grads(kernels.flash_attention, q, k, v, do, causal=True, config=SMALL_CONFIG)
    assert torch.all(dk[:, :, -1] == 0) and torch.all(dv[:, :, -1] == 0)
    assert dk[:, :, :-1].abs().amax(-1).min() > 0 and dv[:, :, :-1].abs().amax(-1).min() > 0


def test_strided_inputs_and_a_broadcast_gradient():
    """k, v as [B, S, H, D] memory viewed as [B, H, S, D]; out.sum() sends back dO = ones with all strides 0."""
    dtype = DTYPES[0]
    q, k, v, _ = _inputs(1, 4, 2, 21, 37, 32, dtype, seed=7)
    k_t, v_t = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (k, v))
    assert not k_t.is_contiguous()
    out = kernels.flash_attention(q, k_t, v_t, causal=True, config=SMALL_CONFIG)
    got = torch.autograd.grad(out.sum(), (q, k_t, v_t))
    want = torch.autograd.grad(kernels.reference.flash_attention(q, k, v, causal=True).sum(), (q, k, v))
    assert_grads_close(got, want, dtype)


def test_deterministic():
    """No atomics: two backward passes give bit-identical gradients."""
    q, k, v, do = _inputs(1, 4, 2, 30, 30, 16, DTYPES[0], seed=8)
    first, second = (_grads(kernels.flash_attention, q, k, v, do, causal=True, config=SMALL_CONFIG) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_empty_queries():
    q, k, v, do = _inputs(1, 2, 2, 0, 5, 32, DTYPES[0])
    dq, dk, dv = _grads(kernels.flash_attention, q, k, v, do)
    assert dq.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)


def test_bad_inputs_with_grad_keep_the_clear_error():
    q, k, v, _ = _inputs(1, 4, 2, 8, 8, 32, DTYPES[0])
    with pytest.raises(ValueError, match="k has 3 kv heads"):
        kernels.flash_attention(q, k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3])
    with pytest.raises(ValueError, match="causal attention needs Sq <= Skv"):
        kernels.flash_attention(q, k[:, :, :4], v[:, :, :4], causal=True)


# ---------------------------------------------------------------- dq_mode="atomic": dQ added by the dK/dV programs
# Sq != Skv both ways, GQA 4:2 and 4:1 (every query head of a group adds its own dQ rows), causal with an offset,
# a query block that sees no key of some key blocks, one query, D = 128.
ATOMIC_CASES = [
    (1, 4, 2, 29, 61, 32, True),
    (2, 4, 2, 20, 75, 64, True),
    (1, 4, 1, 1, 50, 32, True),
    (1, 4, 1, 45, 30, 16, False),
    (1, 4, 2, 37, 37, 32, False),
    (1, 2, 1, 17, 33, 128, True),
]


def _grads_in_mode(mode, q, k, v, do, monkeypatch, **kwargs):
    """(dq, dk, dv) through ``kernels.flash_attention`` with the module-level DQ_MODE the autograd function reads."""
    monkeypatch.setattr(bwd, "DQ_MODE", mode)
    return _grads(kernels.flash_attention, q, k, v, do, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal", ATOMIC_CASES)
def test_atomic_dq_matches_the_reference_and_the_separate_mode(B, Hq, Hkv, Sq, Skv, D, causal, dtype, monkeypatch):
    q, k, v, do = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed=13)
    atomic = _grads_in_mode("atomic", q, k, v, do, monkeypatch, causal=causal, config=SMALL_CONFIG)
    assert_grads_close(atomic, _grads(kernels.reference.flash_attention, q, k, v, do, causal=causal), dtype)
    separate = _grads_in_mode("separate", q, k, v, do, monkeypatch, causal=causal, config=SMALL_CONFIG)
    assert_grads_close(atomic, separate, dtype)
    # dK, dV: the same code and config in both modes (only dQ's summation differs)
    assert torch.equal(atomic[1], separate[1]) and torch.equal(atomic[2], separate[2])


@pytest.mark.skipif(not INTERPRET, reason="interpreter block sizes; fp16 (fp32 on the GPU is tested autotuned below)")
@pytest.mark.parametrize("config", [dict(BLOCK_M=32, BLOCK_N=16), dict(BLOCK_M=16, BLOCK_N=16)])
def test_atomic_dq_other_block_shapes_and_fp16(config, monkeypatch):
    """BLOCK_M > BLOCK_N and equal blocks, and fp16 (dS rounded to fp16 before dQ's matmul, dQ summed in fp32)."""
    for dtype, case in [(torch.float32, (1, 4, 2, 29, 61, 32, True)), (torch.float16, (1, 4, 1, 40, 40, 16, True))]:
        q, k, v, do = _inputs(*case[:6], dtype, seed=14)
        got = _grads_in_mode("atomic", q, k, v, do, monkeypatch, causal=True, config=config)
        assert got[0].dtype == dtype
        assert_grads_close(got, _grads(kernels.reference.flash_attention, q, k, v, do, causal=True), dtype)


def test_atomic_dq_launches_no_dq_kernel_unless_dq_alone(monkeypatch):
    """With dk or dv needed, dq comes from the dK/dV programs (the dq kernel must not run); with dq alone the dq
    kernel runs (3 matmuls instead of the fused kernel's 5). The lse gradient (Δ - dlse) enters the fused dS too."""
    dtype = DTYPES[0]
    q, k, v, do = _inputs(1, 4, 2, 19, 45, 32, dtype, seed=15)
    dlse = torch.randn(1, 4, 19, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    loss = lambda out, lse: (out.float() * do.float()).sum() + (lse * dlse).sum()
    want = torch.autograd.grad(loss(*kernels.reference.flash_attention_lse(q, k, v, causal=True, sm_scale=0.3)),
                               (q, k, v))

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the dq kernel was launched in atomic mode")

    monkeypatch.setattr(bwd, "DQ_MODE", "atomic")
    with monkeypatch.context() as patch:
        patch.setattr(bwd, "_attn_bwd_dq", NoLaunch())
        patch.setattr(bwd, "_attn_bwd_dq_tuned", NoLaunch())
        out, lse = kernels.flash_attention(q, k, v, causal=True, sm_scale=0.3, return_lse=True, config=SMALL_CONFIG)
        assert_grads_close(torch.autograd.grad(loss(out, lse), (q, k, v)), want, dtype)
        out = kernels.flash_attention(q, k.detach(), v, causal=True, sm_scale=0.3, config=SMALL_CONFIG)  # dq, dv
        dq, dv = torch.autograd.grad(out, (q, v), do)
    want_plain = _grads(kernels.reference.flash_attention, q, k, v, do, causal=True, sm_scale=0.3)
    assert_grads_close((dq, dv), (want_plain[0], want_plain[2]), dtype)
    out = kernels.flash_attention(q, k.detach(), v.detach(), causal=True, sm_scale=0.3, config=SMALL_CONFIG)
    (dq,) = torch.autograd.grad(out, (q,), do)   # dq alone: the dq kernel
    torch.testing.assert_close(dq.float(), want_plain[0].float(), **TOL[dtype])


def test_bad_dq_mode_names_the_setting(monkeypatch):
    from kernels.flash_attention_bwd import flash_attention_backward

    q, k, v, do = _inputs(1, 2, 2, 8, 8, 16, DTYPES[0])
    out, lse = _flash_attention(q.detach(), k.detach(), v.detach(), return_lse=True, config=SMALL_CONFIG)
    with pytest.raises(ValueError, match="dq_mode must be one of"):
        flash_attention_backward(do, q, k, v, out, lse, causal=False, sm_scale=0.25, dq_mode="fused")
    monkeypatch.setattr(bwd, "DQ_MODE", "atomics")
    with pytest.raises(ValueError, match="kernels.flash_attention_bwd.DQ_MODE must be one of"):
        kernels.flash_attention(q, k, v)


# ---------------------------------------------------------------- the reference backward (plain torch, any device)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq, Hkv, Sq, Skv", [(2, 2, 7, 7), (4, 2, 5, 13), (4, 1, 1, 9), (2, 1, 11, 6)])
def test_reference_backward_matches_autograd(Hq, Hkv, Sq, Skv, causal):
    if causal and Sq > Skv:
        pytest.skip("causal needs Sq <= Skv")
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, h, s, 16, generator=gen, requires_grad=True)
               for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))
    do, dlse = torch.randn(2, Hq, Sq, 16, generator=gen), torch.randn(2, Hq, Sq, generator=gen)
    out, lse = kernels.reference.flash_attention_lse(q, k, v, causal=causal, sm_scale=0.4)
    want = torch.autograd.grad((out * do).sum() + (lse * dlse).sum(), (q, k, v))
    got = kernels.reference.flash_attention_backward(do, q, k, v, out, lse, causal=causal, sm_scale=0.4, dlse=dlse)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


class _ReferenceAttention64(torch.autograd.Function):
    """Attention in float64 whose backward is ``kernels.reference.flash_attention_backward``: gradcheck compares those
    formulas with finite differences of the forward."""

    @staticmethod
    def forward(ctx, q, k, v, causal):
        B, Hq, Sq, D = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        kk, vv = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))  # query head h reads kv head h // G
        s = q @ kk.transpose(-1, -2) / math.sqrt(D)
        if causal:
            s = s.masked_fill(torch.ones(Sq, Skv, dtype=torch.bool).triu(Skv - Sq + 1), float("-inf"))
        lse = torch.logsumexp(s, -1)
        out = torch.exp(s - lse[..., None]) @ vv
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        return *kernels.reference.flash_attention_backward(do, q, k, v, out, lse, causal=ctx.causal), None


@pytest.mark.parametrize("causal", [False, True])
def test_reference_backward_gradcheck(causal):
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, h, s, 4, generator=gen, dtype=torch.float64, requires_grad=True)
               for h, s in ((4, 3), (2, 5), (2, 5)))
    assert torch.autograd.gradcheck(lambda q, k, v: _ReferenceAttention64.apply(q, k, v, causal), (q, k, v))


# ---------------------------------------------------------------- GPU only: real shapes, autotuned, every config
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal, dtype", [
    (2, 16, 4, 1000, 1000, 128, True, torch.bfloat16),
    (1, 8, 8, 2048, 2048, 64, False, torch.float16),
    (1, 8, 2, 300, 1100, 128, True, torch.float32),  # after a cached prefix of 800 tokens
    (4, 16, 16, 513, 513, 64, True, torch.bfloat16),
])
def test_gpu_real_shapes_autotuned(B, Hq, Hkv, Sq, Skv, D, causal, dtype):
    q, k, v, do = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed=11)
    got = _grads(kernels.flash_attention, q, k, v, do, causal=causal)
    assert_grads_close(got, _grads(kernels.reference.flash_attention, q, k, v, do, causal=causal), dtype)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dkdv, dq", list(zip(DKDV_CONFIGS, DQ_CONFIGS)))
def test_gpu_every_autotune_config_is_correct(dkdv, dq):
    """The autotuner may pick any of them: each must be right, causal with an offset, ragged lengths, GQA."""
    from kernels.flash_attention_bwd import flash_attention_backward

    q, k, v, do = _inputs(2, 8, 2, 333, 701, 128, torch.bfloat16, seed=12)
    out, lse = _flash_attention(q.detach(), k.detach(), v.detach(), causal=True, return_lse=True)
    want = _grads(kernels.reference.flash_attention, q, k, v, do, causal=True)
    for m, n, w, s in (dkdv, dq):
        config = dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
        try:
            got = flash_attention_backward(do, q.detach(), k.detach(), v.detach(), out, lse, causal=True,
                                           sm_scale=1 / math.sqrt(128), config=config)
        except triton.runtime.errors.OutOfResources:
            # at D = 128 a deep pipeline of big tiles may not fit shared memory (dq's 128 x 32, 5 stages: 280 KB on
            # an H100); the autotuner skips such a config, so it must then be right at D = 64, where it fits
            q64, k64, v64, do64 = _inputs(2, 8, 2, 333, 701, 64, torch.bfloat16, seed=12)
            out64, lse64 = _flash_attention(q64.detach(), k64.detach(), v64.detach(), causal=True, return_lse=True)
            got = flash_attention_backward(do64, q64.detach(), k64.detach(), v64.detach(), out64, lse64, causal=True,
                                           sm_scale=1 / math.sqrt(64), config=config)
            assert_grads_close(got, _grads(kernels.reference.flash_attention, q64, k64, v64, do64, causal=True),
                               torch.bfloat16)
            continue
        assert_grads_close(got, want, torch.bfloat16)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal, dtype", [
    (2, 16, 4, 1000, 1000, 128, True, torch.bfloat16),
    (1, 16, 16, 2048, 2048, 128, False, torch.bfloat16),
    (1, 8, 8, 777, 1500, 64, False, torch.float16),
    (1, 8, 2, 300, 1100, 128, True, torch.float32),  # "ieee" dots, FP32_MAX_TILE pruning
])
def test_gpu_atomic_dq_autotuned(B, Hq, Hkv, Sq, Skv, D, causal, dtype, monkeypatch):
    """Both modes compiled and autotuned (each shape a new autotuner key). The atomic autotuner times every config on
    the same fp32 dQ buffer: a wrong answer here is what a missing reset_to_zero gives (the trials' sums)."""
    q, k, v, do = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed=17)
    atomic = _grads_in_mode("atomic", q, k, v, do, monkeypatch, causal=causal)
    separate = _grads_in_mode("separate", q, k, v, do, monkeypatch, causal=causal)
    assert_grads_close(atomic, _grads(kernels.reference.flash_attention, q, k, v, do, causal=causal), dtype)
    assert_grads_close(atomic, separate, dtype)
    again = _grads_in_mode("atomic", q, k, v, do, monkeypatch, causal=causal)  # tuned: the buffer zeroed by us
    assert_grads_close(again, atomic, dtype)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg", DKDV_DQ_CONFIGS)
def test_gpu_atomic_dq_every_autotune_config_is_correct(cfg):
    """The atomic autotuner may pick any of its configs: each must be right (causal with an offset, ragged, GQA)."""
    from kernels.flash_attention_bwd import flash_attention_backward

    m, n, w, s = cfg
    config = dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
    for D in (128, 64):   # a config out of shared memory at D = 128 is skipped by the autotuner: then D = 64
        q, k, v, do = _inputs(2, 8, 2, 333, 701, D, torch.bfloat16, seed=18)
        out, lse = _flash_attention(q.detach(), k.detach(), v.detach(), causal=True, return_lse=True)
        try:
            got = flash_attention_backward(do, q.detach(), k.detach(), v.detach(), out, lse, causal=True,
                                           sm_scale=1 / math.sqrt(D), config=config, dq_mode="atomic")
        except triton.runtime.errors.OutOfResources:
            assert D == 128, f"{cfg} does not fit at D = 64 either"
            continue
        assert_grads_close(got, _grads(kernels.reference.flash_attention, q, k, v, do, causal=True), torch.bfloat16)
        break


# ---------------------------------------------------------------- the benchmark's smoke run
@pytest.mark.command
@pytest.mark.parametrize("atomic", [False, True])
def test_benchmark_script_quick(tmp_path, atomic):
    """``python -m benchmarks.flash_attention_bwd --quick``: on CPU tiny shapes in the interpreter, checked against
    SDPA's math backend; every row has its errors and timings, and the file is what main() returned. With
    ``--atomic-dq`` every row has ours_atomic too, with its ratios to the same baselines as ours."""
    import json

    from benchmarks import flash_attention_bwd as bench

    out = tmp_path / "fa_bwd.json"
    result = bench.main(["--quick", "--out", str(out), *(["--atomic-dq"] if atomic else [])])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["device"] and result["date"] and result["torch"] and result["triton"] and result["speed"]
    assert {row["causal"] for row in result["speed"]} == {False, True}
    mine = ["ours", "ours_atomic"] if atomic else ["ours"]
    assert list(result["dq_modes"]) == mine and bwd.DQ_MODE == "separate"  # the benchmark restored the default
    for row in result["speed"]:
        assert row["bwd_flops"] == 2.5 * row["fwd_flops"]
        baselines = {key.removeprefix("ours_vs_") for key in row if key.startswith("ours_vs_")}
        assert baselines and ("ours_atomic_fwd_bwd_seconds" in row) == atomic
        for name in mine:
            assert row[f"{name}_fwd_bwd_seconds"] > 0
            assert all(f"{name}_vs_{b}" in row for b in baselines)
            if not HAS_GPU:
                assert max(row[f"{name}_{g}_rel_err"] for g in ("dq", "dk", "dv")) < 1e-4


@pytest.mark.parametrize("forward, column", [("gluon", "ours_gluon"), ("portable", "ours_portable"),
                                             ("tma_wide", "ours_tma")])
def test_benchmark_hopper_forward_column(forward, column):
    """``--hopper-forward``: one more column, named after the forward it runs (ours_gluon for the Gluon kernel, not
    ours_tma); without the GPU that forward needs, its gradients are ours'."""
    from benchmarks import flash_attention_bwd as bench

    impls = bench.implementations({}, hopper_forward=forward)
    assert column in impls and not {"ours_gluon", "ours_portable", "ours_tma"} - {column} & set(impls)
    if HAS_GPU:
        return
    q, k, v, do = _inputs(1, 2, 1, 24, 40, 16, torch.float32, seed=1)
    for mine, want in zip(bench.grads(impls[column], q, k, v, do, True), bench.grads(impls["ours"], q, k, v, do, True)):
        torch.testing.assert_close(mine, want, atol=0, rtol=0)


def test_benchmark_script_rejects_unknown_head_dims():
    from benchmarks import flash_attention_bwd as bench

    with pytest.raises(SystemExit, match="--head-dims"):
        bench.main(["--quick", "--head-dims", "96"])


# ---------------------------------------------------------------- which configs float32 may autotune (any machine)
@pytest.mark.parametrize("which", ["forward", "dkdv", "dq"])
def test_float32_autotunes_small_tiles_only(which):
    """Exact fp32 dots compile slowly at large tiles (an H100 did not finish one float32 shape in 150 s over the
    bf16 list): float32 tries tiles of at most FP32_MAX_TILE scores; the other dtypes keep every config."""
    import importlib

    fwd = importlib.import_module("kernels.flash_attention")   # the module (kernels.flash_attention is the function)
    bwd = importlib.import_module("kernels.flash_attention_bwd")

    table, prune = {"forward": (fwd.GPU_CONFIGS, fwd._prune_configs),
                    "dkdv": (bwd.DKDV_CONFIGS, bwd._prune("BLOCK_N", "SKV_BUCKET")),
                    "dq": (bwd.DQ_CONFIGS, bwd._prune("BLOCK_M", "SQ_BUCKET"))}[which]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]
    for bucket in (16, 64, 1024, 16384):
        args = dict(SQ_BUCKET=bucket, SKV_BUCKET=bucket)
        small = prune(configs, dict(args, DOT_PRECISION="ieee"))
        assert small and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= bwd.FP32_MAX_TILE for c in small)
        assert prune(configs, dict(args, DOT_PRECISION="tf32"))   # bf16/fp16: the full list's choice, never empty
    big = prune(configs, dict(SQ_BUCKET=16384, SKV_BUCKET=16384, DOT_PRECISION="tf32"))
    assert any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > bwd.FP32_MAX_TILE for c in big)
