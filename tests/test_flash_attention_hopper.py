"""kernels.flash_attention_hopper (TMA tensor descriptors) vs its plain-torch reference: in the interpreter on CPU
(Triton's interpreter emulates host and device descriptors, zero padding included) at small odd shapes; compiled on
an sm_90+ GPU at real shapes against the reference and torch SDPA, every variant, both 16-bit dtypes."""
from __future__ import annotations

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import pytest
import torch
import triton
import triton.language as tl

import kernels
import kernels.reference
from course_lib.device import DEVICE, HAS_GPU, INTERPRET, kernel_dtypes
from kernels.flash_attention_hopper import VARIANTS, _exp2_poly, flash_attention_hopper, hopper_status

from tests.test_flash_attention import CASES, TOL, _qkv

pytestmark = pytest.mark.skipif(hopper_status() is not None and not INTERPRET,
                                reason=f"the TMA path cannot run here: {hopper_status()}")
ON_HOPPER = HAS_GPU and hopper_status() is None
#: one fixed config per test on a GPU (each config is a compilation); the interpreter's small blocks on CPU
FIXED = None if INTERPRET else dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
#: the interpreter runs every case for one variant, three cases for the others (same code, other flags)
FEW = [CASES[1], CASES[2], CASES[3]]


#: float32 bound of tma_poly: its exponentials carry a relative error <= 1.1e-4 (test_exp2_poly_relative_error), so
#: numerator and denominator of the softmax each <= 1.1e-4: outputs within ~2.2e-4 of max|v| (~4 here)
POLY_TOL_FP32 = dict(rtol=3e-4, atol=1e-3)


def _check(variant, B, Hq, Hkv, Sq, Skv, D, causal, dtype, config=FIXED, **kw):
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, D, dtype, **kw)
    out, lse = flash_attention_hopper(q, k, v, causal=causal, return_lse=True, variant=variant, config=config)
    want, want_lse = kernels.reference.flash_attention_lse(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:3]
    tol = POLY_TOL_FP32 if VARIANTS[variant].poly_exp and dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(out, want, **tol)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-3)
    return out


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal", CASES)
def test_tma_matches_reference(B, Hq, Hkv, Sq, Skv, D, causal, dtype):
    """Odd Sq/Skv (partial blocks read the next head's rows; the last head's read TMA's zero padding), GQA, MQA,
    decode (Sq = 1), causal with a bottom-right offset."""
    _check("tma", B, Hq, Hkv, Sq, Skv, D, causal, dtype)


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the real-shape tests below cover every variant (fewer compilations)")
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal", FEW)
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "tma"])
def test_variants_match_reference(variant, B, Hq, Hkv, Sq, Skv, D, causal, dtype):
    """Device descriptors, warp specialization (a no-op in the interpreter), the persistent loop (4 programs on
    CPU, so each walks several tiles)."""
    _check(variant, B, Hq, Hkv, Sq, Skv, D, causal, dtype)


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the real-shape tests cover tma_rot with long key loops")
@pytest.mark.parametrize("Skv", [15, 16, 33, 64, 100])
def test_rotated_loop_over_no_one_and_many_key_tiles(Skv):
    """tma_rot's stage 1 issues tile j+1's scores before tile j's softmax: no unmasked tile (Skv < BLOCK_N), one
    (nothing issued ahead), several (the loop, then the last tile on its own), with a partial tile after them."""
    _check("tma_rot", 1, 2, 1, 20, Skv, 32, False, kernel_dtypes()[0])


def test_public_wrapper_selects_it_and_keeps_the_backward():
    """``kernels.flash_attention(..., hopper=True)``: the TMA forward, the portable backward (through its lse)."""
    dtype = kernel_dtypes()[0]
    q, k, v = _qkv(1, 2, 1, 19, 33, 32, dtype, seed=4)
    got = kernels.flash_attention(q, k, v, causal=True, sm_scale=0.7, hopper="tma_persistent")
    torch.testing.assert_close(got, kernels.reference.attention(q, k, v, causal=True, sm_scale=0.7), **TOL[dtype])
    if INTERPRET:  # the backward on CPU: float32 so that the gradients compare tightly
        q, k, v = (t.float().requires_grad_() for t in (q, k, v))
        kernels.flash_attention(q, k, v, causal=True, hopper=True).square().sum().backward()
        grads = [t.grad for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        kernels.reference.attention(q, k, v, causal=True).square().sum().backward()
        for got_g, t in zip(grads, (q, k, v)):
            torch.testing.assert_close(got_g, t.grad, rtol=1e-3, atol=1e-4)


def test_non_contiguous_inputs_and_large_logits():
    """k, v as [B, S, H, D] memory (copied to rows first); scores up to ~±1000 stay finite."""
    dtype = kernel_dtypes()[0]
    q, k, v = _qkv(1, 4, 2, 24, 40, 32, dtype, seed=2, scale=6.0)
    k_t, v_t = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    got = flash_attention_hopper(q, k_t, v_t, causal=True, variant="tma", config=FIXED)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, kernels.reference.attention(q, k, v, causal=True), **TOL[dtype])


def test_bad_inputs_name_the_argument():
    q, k, v = _qkv(1, 4, 2, 8, 8, 32, kernel_dtypes()[0])
    with pytest.raises(ValueError, match="variant='nope'; expected one of tma"):
        flash_attention_hopper(q, k, v, variant="nope")
    with pytest.raises(ValueError, match="k has 3 kv heads"):
        flash_attention_hopper(q, k[:, :1].expand(1, 3, 8, 32), v[:, :1].expand(1, 3, 8, 32))
    if HAS_GPU:
        with pytest.raises(ValueError, match="q has dtype torch.float32"):
            flash_attention_hopper(q.float(), k.float(), v.float())


def test_float32_on_a_gpu_falls_back_to_the_portable_kernel():
    """hopper=True never makes a call fail: float32 (and GPUs without TMA) run the portable kernel."""
    q, k, v = _qkv(1, 2, 2, 20, 20, 32, torch.float32)
    got = kernels.flash_attention(q, k, v, hopper=True)
    torch.testing.assert_close(got, kernels.reference.attention(q, k, v), **TOL[torch.float32])


@pytest.mark.command
def test_benchmark_script_quick(tmp_path):
    """``python -m benchmarks.flash_attention_hopper --quick``: on CPU two tiny rows in the interpreter, every
    variant checked against the reference before it is timed; the JSON records provenance and every cell."""
    import json

    from benchmarks import flash_attention_hopper as bench

    out = tmp_path / "fa_hopper.json"
    result = bench.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] and saved["git_commit"] and saved["device"] == result["device"]
    for row in saved["rows"]:
        assert not row["errors"], row["errors"]
        for impl in ["portable", *bench.DEFAULT_VARIANTS]:
            assert row[f"{impl}_max_abs_diff"] < 5e-2 and row[f"{impl}_seconds"] > 0


def test_benchmark_portable_column_runs_the_portable_kernel(monkeypatch):
    """The ablation's "portable" column is kernels.flash_attention with hopper=False: with the default
    (hopper="auto") a GPU runs tma_wide at D = 128, and the column timed tma_wide twice (7ee05a3 to 90d3b45)."""
    from benchmarks import flash_attention_hopper as bench

    calls = []
    monkeypatch.setattr(bench, "_flash_attention", lambda *a, **kw: calls.append(kw))
    bench.run_impl("portable", None, None, None, True)
    assert calls == [dict(causal=True, hopper=False)]


def test_benchmark_gluon_column_runs_the_sweeps_fastest_config_per_shape(monkeypatch):
    """``--gluon-configs``: per (D, causal) the fastest correct config of a Gluon sweep (hand-made record: a wrong
    or failed config is never chosen, nor one with a switch since removed), DEFAULT_CONFIG where the sweep has none."""
    from benchmarks import flash_attention_hopper as bench
    from kernels import flash_attention_gluon as fg

    full = lambda **kw: {**fg.DEFAULT_CONFIG, **kw}   # the sweep records full configs
    sweep = dict(rows=[
        dict(D=128, causal=False, configs=[dict(config=full(), vs_cudnn=0.90),
                                           dict(config=full(PINGPONG=True), vs_cudnn=0.95),
                                           dict(config=full(STAGES=3), max_abs_diff_vs_cudnn=1.0),
                                           dict(config=full(BLOCK_N=64), error="OutOfResources: ...")]),
        dict(D=128, causal=True, configs=[dict(config=full(ROTATE=True), vs_cudnn=0.99),
                                          dict(config=full(ROTATE=False, SPLIT_MASK=True), vs_cudnn=0.85),
                                          dict(config=full(), vs_cudnn=0.80)]),
        dict(D=64, causal=False, configs=[dict(config=full(), error="skipped: its smoke case failed")])])
    chosen = bench.gluon_configs_from(sweep)
    assert chosen == {(128, False): full(PINGPONG=True), (128, True): full(SPLIT_MASK=True)}
    calls = []
    monkeypatch.setattr(fg, "flash_attention_gluon", lambda q, k, v, **kw: calls.append(kw))
    monkeypatch.setattr(bench, "GLUON_CONFIGS", chosen)
    q = torch.empty(1, 1, 1, 128)
    bench.run_impl(bench.GLUON, q, q, q, True)
    bench.run_impl(bench.GLUON, q[..., :64], q, q, False)
    assert calls == [dict(causal=True, config=full(SPLIT_MASK=True)), dict(causal=False, config=None)]


def test_benchmark_without_the_sweeps_file_runs_the_default_gluon_config(tmp_path, capsys):
    """``--gluon-configs`` naming a file the sweep before it never wrote (its step failed): the ablation still runs,
    says so, and records no per-shape configs."""
    import json

    from benchmarks import flash_attention_hopper as bench

    out = tmp_path / "fa_hopper.json"
    bench.main(["--quick", "--variants", f"tma_wide,{bench.GLUON}", "--gluon-configs", str(tmp_path / "none.json"),
                "--out", str(out)])
    assert "no such file; gluon_ws runs DEFAULT_CONFIG" in capsys.readouterr().out
    gluon = json.loads(out.read_text())["variants"][bench.GLUON]
    assert gluon["per_shape"] == {} and gluon["per_shape_from"] is None and not bench.GLUON_CONFIGS


@pytest.mark.command
@pytest.mark.parametrize("kernel", ["forward", "dkdv", "dq", "dkdv_dq"])
def test_config_sweep_script_quick(tmp_path, kernel):
    """``python -m benchmarks.flash_attention_configs --quick``: on CPU two fixed configs per kernel in the
    interpreter (the forward's two kernels, or one of the backward's), each checked against the reference before
    it is timed, causal and not."""
    import json

    from benchmarks import flash_attention_configs as sweep

    out = tmp_path / "fa_configs.json"
    sweep.main(["--quick", "--kernel", kernel, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["git_commit"] and saved["kernel"] == kernel
    assert [row["causal"] for row in saved["rows"]] == [False, True]
    for row in saved["rows"]:
        assert {c["impl"] for c in row["configs"]} == set(saved["impls"])
        for cell in row["configs"]:
            assert "error" not in cell and cell["max_abs_diff"] < 5e-2 and cell["seconds"] > 0, cell


# ---------------------------------------------------------------- compiled on an sm_90+ GPU only
GPU_CASES = [(2, 16, 16, 1024, 1024, 128, False), (2, 16, 16, 1000, 1000, 128, True),
             (1, 16, 4, 777, 2048, 64, True)]  # block multiples; odd lengths; GQA with a causal offset


@pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90+ GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal", GPU_CASES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_real_shapes_match_reference_and_sdpa(variant, B, Hq, Hkv, Sq, Skv, D, causal, dtype):
    out = _check(variant, B, Hq, Hkv, Sq, Skv, D, causal, dtype, config=dict(zip(
        ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), VARIANTS[variant].configs[0])))
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, D, dtype)
    if Sq == Skv and Hq == Hkv:  # SDPA's is_causal is top-left aligned: compare only where the two agree
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(out, want, **TOL[dtype])


@pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90+ GPU")
def test_gpu_autotuned_wrapper():
    """The autotuned path (pre-hook sets the host descriptors' tile shapes per config) at an odd length."""
    q, k, v = _qkv(1, 16, 16, 1500, 1500, 128, torch.bfloat16, seed=5)
    got = kernels.flash_attention(q, k, v, causal=True, hopper="tma")
    torch.testing.assert_close(got, kernels.reference.attention(q, k, v, causal=True), **TOL[torch.bfloat16])
    assert DEVICE.type == "cuda"


def test_auto_never_takes_the_tma_forward_in_the_interpreter_or_off_its_measured_shapes():
    """``hopper="auto"`` (the default): the TMA forward only at D = 128, fp16/bf16, autotuned, compiled on an sm_90+
    GPU (the rule on plain facts, each condition flipped alone); never in the interpreter (CPU paths unchanged)."""
    from kernels.flash_attention import HOPPER_AUTO_HEAD_DIMS, hopper_forward_rule, use_hopper_forward

    assert HOPPER_AUTO_HEAD_DIMS == (128,)
    fixed = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    for dtype in (torch.float16, torch.bfloat16):
        assert hopper_forward_rule(128, dtype, None, True)
        assert not hopper_forward_rule(128, dtype, None, False)     # not compiled on Hopper
        assert not hopper_forward_rule(128, dtype, fixed, True)     # a fixed (portable) config
        assert not hopper_forward_rule(64, dtype, None, True)       # measured slower at D = 64
    assert not hopper_forward_rule(128, torch.float32, None, True)  # float32: the portable kernel
    q, _, _ = _qkv(1, 2, 2, 8, 8, 128, kernel_dtypes()[0])
    assert use_hopper_forward(q, None) == ON_HOPPER   # the interpreter: never


@pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90+ GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_default_takes_the_tma_forward_at_head_dim_128_and_stays_differentiable(causal):
    """On an sm_90+ GPU at D = 128 the default call runs the TMA forward (the same output as hopper="tma_wide", bit
    for bit) and its gradients, through the portable backward, match the reference's; at D = 64 the portable one."""
    q, k, v = _qkv(1, 8, 4, 700, 900, 128, torch.bfloat16, seed=6)
    torch.testing.assert_close(kernels.flash_attention(q, k, v, causal=causal),
                               kernels.flash_attention(q, k, v, causal=causal, hopper="tma_wide"), rtol=0, atol=0)
    q64, k64, v64 = (t[..., :64].contiguous() for t in (q, k, v))
    torch.testing.assert_close(kernels.flash_attention(q64, k64, v64, causal=causal),
                               kernels.flash_attention(q64, k64, v64, causal=causal, hopper=False), rtol=0, atol=0)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    kernels.reference.attention(*leaves, causal=causal).square().sum().backward()
    want = [t.grad for t in leaves]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kernels.flash_attention(*leaves, causal=causal).float().square().sum().backward()
    for got, w in zip((t.grad for t in leaves), want):
        scale = w.abs().max().item()
        assert (got.float() - w).abs().max().item() <= 3e-2 * scale


@triton.jit
def _apply_exp2_poly(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _exp2_poly(tl.load(X + offs)))


def test_exp2_poly_relative_error():
    """tma_poly's exponential on the FMA units: 2**x for x in [-126, 0] within a relative 1.1e-4 of torch's
    (the bound the docstring states and POLY_TOL_FP32 assumes), exact at the integers; -inf and below -126 read as
    2**-126 (nothing next to the row's largest p, which is 1)."""
    apply = _apply_exp2_poly
    x = torch.cat([torch.linspace(-30, 0, 4093, dtype=torch.float64), torch.tensor([-126.0, -100.0, -1.0])])
    x = x.to(torch.float32).to(DEVICE)
    x = torch.cat([x, torch.full((4096 - x.numel(),), -0.5, device=DEVICE)])
    y = torch.empty_like(x)
    apply[(1,)](x, y, N=4096)
    want = torch.exp2(x.double())
    assert ((y.double() - want).abs() / want).max().item() <= 1.1e-4
    ints = torch.tensor([-20.0, -3.0, -1.0, 0.0] + [0.0] * 4092, device=DEVICE)
    apply[(1,)](ints, y, N=4096)
    assert torch.equal(y[:4].double(), torch.exp2(ints[:4].double()))
    low = torch.tensor([float("-inf"), -1000.0] + [0.0] * 4094, device=DEVICE)
    apply[(1,)](low, y, N=4096)
    assert y[0].item() == y[1].item() == 2.0 ** -126


def test_compiled_resources_reads_registers_and_spills_of_loaded_kernels():
    """benchmarks.kernel_resources reads each compiled specialization's registers and spills with the constexprs that
    name it; kernels compiled but never loaded (no counts) and other caches' entries are left out."""
    from types import SimpleNamespace as NS

    from benchmarks.kernel_resources import compiled_resources

    def kernel(block_n, rotate, warps, regs, spills):
        return NS(n_regs=regs, n_spills=spills, metadata=NS(num_warps=warps, num_stages=2),
                  src=NS(constants={(1,): block_n, (2,): rotate, (3,): 128},
                         signature={"q": "*bf16", "BLOCK_N": "constexpr"}))

    jit = NS(arg_names=["q", "BLOCK_N", "ROTATE", "HEAD_DIM"], device_caches={0: (
        {"a": kernel(64, False, 4, 232, 0), "b": kernel(128, True, 8, 255, 96), "c": NS(n_regs=None)}, {}, None)})
    jit.fn = lambda q: None   # a JITFunction's own .fn is its Python function, which has no caches
    got = compiled_resources(NS(fn=jit), keep=("BLOCK_N", "ROTATE"))   # an autotuner around it
    launch = dict(first_arg="*bf16", num_stages=2)
    assert got == [dict(launch, BLOCK_N=128, ROTATE=True, num_warps=8, n_regs=255, n_spills=96),
                   dict(launch, BLOCK_N=64, ROTATE=False, num_warps=4, n_regs=232, n_spills=0)]
    assert compiled_resources(jit, keep=("BLOCK_N", "ROTATE")) == got   # the bare kernel (it read nothing in 90d3b45)
    assert compiled_resources(NS(arg_names=[], device_caches={}), keep=("BLOCK_N",)) == []
