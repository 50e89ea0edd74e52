"""kernels.flash_attention vs its plain-torch reference: in the interpreter at tiny shapes on CPU; compiled, and
also at real shapes (bf16, D=128, every autotune config; float32 with exact dots), on a GPU."""
from __future__ import annotations

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import pytest
import torch

import kernels
import kernels.reference
from course_lib.device import DEVICE, HAS_GPU, INTERPRET, kernel_dtypes
from kernels.flash_attention import GPU_CONFIGS, _flash_attention, serving_config, stage_bounds

# Per-dtype tolerances on the output (values ~N(0, 1/Skv)-averaged, so |out| <~ 1): the kernel rounds P to the
# input dtype before P @ V, the reference keeps it in fp32.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=1.5e-2)}
# On a GPU the small cases run with one fixed config (each config is a compilation); the autotuned wrapper
# is tested at real shapes below.
SMALL_CONFIG = None if INTERPRET else dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def _qkv(B, Hq, Hkv, Sq, Skv, D, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Sq, D, generator=gen) * scale).to(DEVICE, dtype)
    k = (torch.randn(B, Hkv, Skv, D, generator=gen) * scale).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=gen).to(DEVICE, dtype)
    return q, k, v


# (B, Hq, Hkv, Sq, Skv, D, causal): block multiples and not, GQA and MQA, decode (Sq = 1), prefill after a
# cached prefix (causal, Skv > Sq), D = 32 and 64.
CASES = [
    (1, 2, 2, 32, 32, 32, False),
    (1, 2, 2, 37, 37, 32, True),
    (2, 4, 2, 20, 75, 64, True),  # GQA, causal with an offset of 55
    (1, 4, 1, 1, 50, 32, True),  # MQA decode: one query sees every key
    (1, 2, 1, 1, 17, 64, False),
    (1, 2, 2, 45, 100, 32, False),
    (1, 3, 1, 64, 64, 32, True),
    (1, 2, 2, 17, 33, 64, True),
]


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal", CASES)
def test_matches_reference(B, Hq, Hkv, Sq, Skv, D, causal, dtype):
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, D, dtype)
    out, lse = _flash_attention(q, k, v, causal=causal, return_lse=True, config=SMALL_CONFIG)
    want, want_lse = kernels.reference.flash_attention_lse(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    torch.testing.assert_close(out, want, **TOL[dtype])
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-3)


def test_public_wrapper_sm_scale_and_large_logits():
    """Scores up to ~±1000: a softmax that forgot to subtract the max would overflow to inf/nan."""
    dtype = kernel_dtypes()[0] if HAS_GPU else torch.float32
    q, k, v = _qkv(1, 2, 1, 40, 70, 32, dtype, seed=1, scale=6.0)
    for causal, sm_scale in [(False, None), (True, 0.7)]:
        got = kernels.flash_attention(q, k, v, causal=causal, sm_scale=sm_scale)
        want = kernels.reference.flash_attention(q, k, v, causal=causal, sm_scale=sm_scale)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **TOL[dtype])
    out = kernels.flash_attention(q, k, v, return_lse=True)
    assert isinstance(out, tuple) and len(out) == 2


def test_non_contiguous_inputs_use_their_strides():
    """k and v as [B, S, H, D] memory viewed as [B, H, S, D] (how many models store them)."""
    dtype = kernel_dtypes()[0]
    q, k, v = _qkv(1, 4, 2, 24, 40, 32, dtype, seed=2)
    k_t, v_t = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not k_t.is_contiguous()
    got = _flash_attention(q, k_t, v_t, causal=True, config=SMALL_CONFIG)
    torch.testing.assert_close(got, kernels.reference.flash_attention(q, k, v, causal=True), **TOL[dtype])


def test_hidden_keys_never_leak():
    """Keys after a query's position (causal) and past Skv must not matter, even if they hold huge values."""
    dtype = kernel_dtypes()[0]
    q, k, v = _qkv(1, 2, 2, 10, 30, 32, dtype, seed=3)
    out = _flash_attention(q, k, v, causal=True, config=SMALL_CONFIG)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] = 1e4  # visible only to the last query
    v2[:, :, -1] = 1e4
    out2 = _flash_attention(q, k2, v2, causal=True, config=SMALL_CONFIG)
    torch.testing.assert_close(out2[:, :, :-1], out[:, :, :-1], rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_stage_bounds_cover_exactly_the_visible_keys(causal):
    """Stage 1 keys are visible to every (real) row of the block, stage 2 holds the rest of the visible keys."""
    for Sq, Skv, block_m, block_n in [(1, 1, 16, 16), (37, 37, 32, 16), (20, 75, 16, 64), (1, 50, 16, 32),
                                      (64, 64, 64, 32)]:
        for start_m in range(-(-Sq // block_m)):
            full_end, diag_end = stage_bounds(start_m, block_m, block_n, Sq, Skv, causal)
            assert full_end % block_n == 0 and 0 <= full_end <= diag_end <= Skv
            rows = torch.arange(start_m * block_m, min((start_m + 1) * block_m, Sq))
            last_visible = rows + (Skv - Sq) if causal else torch.full_like(rows, Skv - 1)
            assert full_end <= int(last_visible.min()) + 1 and diag_end == int(last_visible.max()) + 1


def test_empty_queries():
    q, k, v = _qkv(1, 2, 2, 0, 5, 32, kernel_dtypes()[0])
    out, lse = kernels.flash_attention(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)


def _bad(**changes):
    dtype = kernel_dtypes()[0]
    q, k, v = _qkv(1, 4, 2, 8, 8, 32, dtype)
    args = dict(q=q, k=k, v=v)
    for name, fn in changes.items():
        args[name] = fn(args[name])
    return args


@pytest.mark.parametrize("args, kwargs, match", [
    (_bad(q=lambda t: t[0]), {}, r"q has shape \(4, 8, 32\); expected 4 dims, \[B, Hq, Sq, D\]"),
    (_bad(k=lambda t: t.tolist()), {}, "k must be a torch.Tensor"),
    (_bad(q=lambda t: t.double()), {}, "q has dtype torch.float64"),
    (_bad(v=lambda t: t.to(kernel_dtypes()[1])), {}, "v has dtype .*expected the dtype of q"),
    (_bad(k=lambda t: t.repeat(1, 1, 1, 2), v=lambda t: t.repeat(1, 1, 1, 2)), {},
     r"k has shape \(1, 2, 8, 64\); expected \[B=1, Hkv, Skv, D=32\]"),
    (_bad(v=lambda t: t[:, :, :5]), {}, r"v has shape \(1, 2, 5, 32\); expected the shape of k"),
    (_bad(k=lambda t: t.repeat(1, 3, 1, 1)[:, :3], v=lambda t: t.repeat(1, 3, 1, 1)[:, :3]), {},
     "k has 3 kv heads .* divisor of q's 4 heads"),
    (_bad(q=lambda t: t[..., :24], k=lambda t: t[..., :24], v=lambda t: t[..., :24]), {}, "head dim D=24"),
    (_bad(k=lambda t: t[:, :, :0], v=lambda t: t[:, :, :0]), {}, "no keys"),
    (_bad(k=lambda t: t[:, :, :4], v=lambda t: t[:, :, :4]), {"causal": True}, "causal attention needs Sq <= Skv"),
    (_bad(), {"sm_scale": -1.0}, "sm_scale must be a positive"),
    (_bad(v=lambda t: t.to("meta")), {}, "v is on meta"),
])
def test_rejects_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernels.flash_attention(**args, **kwargs)


@pytest.mark.skipif(HAS_GPU, reason="the interpreter's bfloat16 limitation")
def test_interpreter_rejects_bfloat16_with_the_reason():
    q, k, v = _qkv(1, 2, 2, 8, 8, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="q has dtype torch.bfloat16.*interpreter.*float16 or float32"):
        kernels.flash_attention(q, k, v)


# ---------------------------------------------------------------- GPU only: real shapes, autotuned
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal, dtype", [
    (2, 16, 4, 1000, 1000, 128, True, torch.float16),
    (1, 8, 8, 2048, 2048, 64, False, torch.bfloat16),
    (1, 32, 8, 300, 4097, 128, True, torch.bfloat16),  # prefill after a 3797-token cached prefix
    (4, 32, 8, 1, 4097, 128, True, torch.bfloat16),  # decode
])
def test_gpu_real_shapes_autotuned(B, Hq, Hkv, Sq, Skv, D, causal, dtype):
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, D, dtype, seed=4)
    out, lse = kernels.flash_attention(q, k, v, causal=causal, return_lse=True)
    want, want_lse = kernels.reference.flash_attention_lse(q, k, v, causal=causal)
    torch.testing.assert_close(out, want, **TOL[dtype])
    torch.testing.assert_close(lse, want_lse, rtol=1e-3, atol=1e-2)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("block_m, block_n, num_warps, num_stages", GPU_CONFIGS)
def test_gpu_every_autotune_config_is_correct(block_m, block_n, num_warps, num_stages):
    """The autotuner may pick any of them: each must be right, causal with an offset and ragged lengths."""
    q, k, v = _qkv(2, 8, 2, 333, 701, 128, torch.bfloat16, seed=5)
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    got = _flash_attention(q, k, v, causal=True, config=config)
    torch.testing.assert_close(got, kernels.reference.flash_attention(q, k, v, causal=True), **TOL[torch.bfloat16])


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [None, "serving"])
def test_gpu_float32_exact_dots(config):
    """float32 on a GPU runs exact fp32 dots (no TF32 rounding): within fp32 tolerances of the reference, autotuned
    and with the engine's fixed serving config."""
    q, k, v = _qkv(1, 8, 2, 300, 1100, 128, torch.float32, seed=6)
    got = kernels.flash_attention(q, k, v, causal=True, config=serving_config(300, torch.float32) if config else None)
    torch.testing.assert_close(got, kernels.reference.flash_attention(q, k, v, causal=True), rtol=1e-4, atol=1e-4)
