"""The model's fused path (course_lib.model.fused): each kernel against the plain torch it replaces, and the fused
model against the plain model (interpreter on CPU; compiled on a GPU)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib.device import DEVICE, HAS_GPU
from course_lib.model.config import ModelConfig
from course_lib.model.fused import fuse, unfuse
from course_lib.model.llama import Llama, RMSNorm
from course_lib.model.rope import apply_rope, rope_cos_sin
from kernels.rms_norm import rms_norm
from kernels.rope import rope_
from kernels.silu_and_mul import silu_and_mul

DTYPES = [torch.float16, torch.bfloat16] if HAS_GPU else [torch.float32, torch.float16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, dim", [(1, 32), (5, 48), (3, 256)])
def test_rms_norm_equals_the_plain_module(dtype, rows, dim):
    torch.manual_seed(0)
    x = (torch.randn(rows, dim) * 3).to(DEVICE, dtype)
    norm = RMSNorm(dim, 1e-6).to(DEVICE, dtype)
    norm.weight.data.normal_()
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-6), norm(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
def test_rope_equals_apply_rope(dtype, with_norm):
    torch.manual_seed(1)
    T, H, D = 7, 3, 32
    x = torch.randn(T, H, D).to(DEVICE, dtype)
    cos, sin = rope_cos_sin(torch.arange(5, 5 + T, device=DEVICE), D, 10000.0, dtype)
    want = x.clone()
    weight = torch.randn(D).to(DEVICE, dtype) if with_norm else None
    if with_norm:
        norm = RMSNorm(D, 1e-6).to(DEVICE, dtype)
        norm.weight.data.copy_(weight)
        want = norm(want)
    want = apply_rope(want.transpose(0, 1), cos, sin).transpose(0, 1)    # [H, T, D] layout of the model
    got = rope_(x, cos, sin, weight, 1e-6)
    assert got.data_ptr() == x.data_ptr()   # in place
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_equals_torch(dtype):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 2 * 40).to(DEVICE, dtype)
    torch.testing.assert_close(silu_and_mul(x), F.silu(x[..., :40]) * x[..., 40:], **TOL[dtype])


def _micro(qk_norm: bool, bias: bool) -> Llama:
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=64, qk_norm=qk_norm,
                      attention_bias=bias)
    model = Llama(cfg).to(DEVICE).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("qk_norm, bias", [(False, False), (True, False), (False, True)])
def test_fused_model_equals_the_plain_model(qk_norm, bias):
    model = _micro(qk_norm, bias)
    ids = torch.randint(0, 96, (2, 11), device=DEVICE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(ids)
        fuse(model)
        fused = model(ids)
        fuse(model)                               # idempotent
        again = model(ids)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, fused)
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    attn = model.model.layers[0].self_attn
    qkv = attn.qkv[0]
    assert attn.q_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()   # views: no copy
    unfuse(model)
    with torch.no_grad():
        assert torch.equal(model(ids), plain)


@pytest.mark.skipif(not HAS_GPU, reason="bfloat16 compiled kernels need a GPU")
def test_fused_bf16_model_keeps_the_greedy_tokens():
    from course_lib import load_tiny
    from course_lib.model.generate import greedy_generate

    model, tok = load_tiny("target")
    prompt = tok.encode("In the beginning God created the heaven")
    plain = greedy_generate(model, prompt, 40)
    fuse(model)
    try:
        assert greedy_generate(model, prompt, 40) == plain
    finally:
        unfuse(model)


def test_config_fields_used_above_exist():
    assert {"qk_norm", "attention_bias", "head_dim"} <= {f.name for f in dataclasses.fields(ModelConfig)}
