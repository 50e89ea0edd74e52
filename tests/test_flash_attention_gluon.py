"""kernels.flash_attention_gluon (warp-specialized Gluon forward, two consumer warp groups): on a CPU, its input
checks and a compilation for sm_90 (Gluon has no interpreter: the compiled PTX must hold the warp groups' register
reallocation, the wgmma and the TMA loads); on an sm_90 GPU, its output against the plain-torch reference and SDPA."""
from __future__ import annotations

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import pytest
import torch

import kernels
import kernels.reference
from kernels import flash_attention_gluon as fg

from tests.test_flash_attention import TOL, _qkv

ON_SM90 = fg.gluon_status() is None
needs_gluon = pytest.mark.skipif(fg.gl is None, reason="this Triton has no Gluon")


@pytest.mark.parametrize("change, field", [
    (dict(dtype=torch.float32), "dtype"), (dict(D=96), "head_dim"), (dict(Sq=200, Skv=256), "Sq=200"),
    (dict(Skv=200), "Skv=200"), (dict(Sq=256, Skv=128, causal=True), "causal"), (dict(Hq=3, Hkv=2), "heads"),
    (dict(Sq=0), "Sq=0"), (dict(Skv=0), "Skv=0"),
])
def test_inputs_outside_the_scope_raise_naming_the_field(change, field):
    """What the kernel does not handle (float32, other head dims, lengths off its tiles, causal rows that see no key,
    heads that do not group) is a ValueError naming it, before anything is launched."""
    shape = dict(B=1, Hq=2, Hkv=1, Sq=128, Skv=256, D=64, dtype=torch.float16, causal=False) | change
    q, k, v = _qkv(shape["B"], shape["Hq"], shape["Hkv"], shape["Sq"], shape["Skv"], shape["D"], shape["dtype"])
    with pytest.raises(ValueError, match=field):
        fg.flash_attention_gluon(q, k, v, causal=shape["causal"])


@pytest.mark.skipif(ON_SM90, reason="runs on an sm_90 GPU here")
def test_without_an_sm90_gpu_it_says_why():
    q, k, v = _qkv(1, 2, 1, 128, 128, 64, torch.float16)
    with pytest.raises(RuntimeError, match="cannot run here"):
        fg.flash_attention_gluon(q, k, v)


@needs_gluon
@pytest.mark.parametrize("D, causal, dtype, config", [(128, True, "bfloat16", {}), (64, False, "float16", {}),
                                                     (64, True, "bfloat16",
                                                      dict(SPLIT_MASK=True, FMA_SOFTMAX=True, HEAVY_FIRST=True)),
                                                     (128, False, "bfloat16", dict(PINGPONG=True)),
                                                     (128, True, "bfloat16",
                                                      dict(PERSISTENT=True, SPLIT_MASK=True, HEAVY_FIRST=True)),
                                                     (64, True, "bfloat16",
                                                      dict(BLOCK_N=64, consumer_regs=104, maxnreg=80))])
def test_compiles_for_sm90_with_warp_groups_wgmma_and_tma(D, causal, dtype, config):
    """Cross-compiled for sm_90 on any machine: 12 warps (two consumer groups of 4, the producer's group), the
    producer's registers given back (setmaxnreg.dec to its budget) and the consumers' raised to theirs, wgmma
    instructions and TMA tile loads in the PTX, no register spilled (ptxas -v), shared memory within an H100's
    227 KB per block. The kernel's three modules compile together without kernels.device (the interpreter off)."""
    got = fg.cross_compile(D=D, causal=causal, dtype=dtype, config=config)
    budget = {**fg.DEFAULT_CONFIG, **config}
    assert got["num_warps"] == 12 and got["wgmma"] > 0 and got["tma_loads"] > 0
    assert ["dec", str(budget["producer_regs"])] in got["setmaxnreg"]
    assert ["inc", str(budget["consumer_regs"])] in got["setmaxnreg"]
    assert got["spill_store_bytes"] == 0 and got["ptxas_registers"] == budget["maxnreg"]
    assert got["shared_bytes"] < 227 * 1024


def test_outside_scope_names_the_reason_and_accepts_what_it_covers():
    """``outside_scope``: the reason ``flash_attention_gluon`` would raise, as a string (``hopper="gluon"`` falls
    back on it), or None for a call inside the kernel's scope (shapes and dtypes; the GPU is ``gluon_status``)."""
    q, k, v = _qkv(1, 4, 2, 256, 384, 64, torch.float16)
    assert fg.outside_scope(q, k, v, causal=True) is None
    assert "dtype" in fg.outside_scope(q.float(), k.float(), v.float(), causal=False)
    assert "Sq=" in fg.outside_scope(q[:, :, :200], k, v, causal=False)
    k320, v320 = k[:, :, :320], v[:, :, :320]
    assert "Skv=320" in fg.outside_scope(q, k320, v320, causal=False)            # the default BLOCK_N, 128
    assert fg.outside_scope(q, k320, v320, causal=False, config=dict(BLOCK_N=64)) is None


def test_unknown_config_keys_are_refused_naming_them():
    """A config key the kernel does not have (a typo, or ROTATE, removed after it was measured slower) is a
    ValueError naming it, not a silent run of the default."""
    q, k, v = _qkv(1, 2, 1, 128, 128, 64, torch.float16)
    with pytest.raises(ValueError, match="ROTATE"):
        fg.flash_attention_gluon(q, k, v, config=dict(ROTATE=True))
    assert "PINGPNG" in fg.outside_scope(q, k, v, causal=False, config=dict(PINGPNG=True))


def test_hopper_gluon_elsewhere_runs_what_auto_runs():
    """``kernels.flash_attention(..., hopper="gluon")`` never fails for want of Gluon: without an sm_90 GPU (here: the
    interpreter) and for calls outside the Gluon kernel's scope it runs what the default runs, the same numbers."""
    from kernels.flash_attention import use_gluon_forward

    q, k, v = _qkv(1, 2, 1, 40, 72, 32, torch.float32, seed=2)   # no tile multiple, float32: outside the scope
    assert not use_gluon_forward(q, k, v, True, None)
    got = kernels.flash_attention(q, k, v, causal=True, hopper="gluon")
    torch.testing.assert_close(got, kernels.flash_attention(q, k, v, causal=True), atol=0, rtol=0)
    torch.testing.assert_close(got, kernels.reference.attention(q, k, v, causal=True), **TOL[torch.float32])


# ---------------------------------------------------------------- on an sm_90 GPU
GPU_CASES = [(2, 8, 8, 1024, 1024, 128, False), (2, 8, 8, 1024, 1024, 128, True),
             (1, 16, 4, 384, 1024, 64, True), (1, 4, 2, 256, 512, 64, False)]   # GQA, a causal offset (Skv > Sq)


@pytest.mark.skipif(not ON_SM90, reason=f"needs an sm_90 GPU: {fg.gluon_status()}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal", GPU_CASES)
def test_gpu_matches_reference_and_sdpa(B, Hq, Hkv, Sq, Skv, D, causal, dtype):
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, D, dtype)
    out = fg.flash_attention_gluon(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, kernels.reference.attention(q, k, v, causal=causal), **TOL[dtype])
    if Sq == Skv and Hq == Hkv:   # SDPA's is_causal is top-left aligned: compare where the two agree
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(out, want, **TOL[dtype])


@pytest.mark.skipif(not ON_SM90, reason=f"needs an sm_90 GPU: {fg.gluon_status()}")
@pytest.mark.parametrize("config", [dict(BLOCK_N=64), dict(BLOCK_N=64, STAGES=3), dict(STAGES=3)])
def test_gpu_other_configs_match_reference(config):
    q, k, v = _qkv(1, 8, 8, 512, 512, 128, torch.bfloat16, seed=3)
    out = fg.flash_attention_gluon(q, k, v, causal=True, config=config)
    torch.testing.assert_close(out, kernels.reference.attention(q, k, v, causal=True), **TOL[torch.bfloat16])


@pytest.mark.skipif(not ON_SM90, reason=f"needs an sm_90 GPU: {fg.gluon_status()}")
@pytest.mark.parametrize("extra", [{}, dict(PINGPONG=True, FMA_SOFTMAX=True), dict(SPLIT_MASK=True, STAGES=3)])
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal", [c for c in GPU_CASES if c[5] == 64])
def test_gpu_two_programs_per_sm_at_d64_match_reference(B, Hq, Hkv, Sq, Skv, D, causal, extra):
    """D = 64 launched with 80 registers a thread and 104 per consumer, so that two programs share an SM: the same
    output (the registers are a budget, not a change of the math; the sweep times it)."""
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, D, torch.bfloat16, seed=17)
    config = dict(BLOCK_N=64, consumer_regs=104, maxnreg=80, **extra)
    out = fg.flash_attention_gluon(q, k, v, causal=causal, config=config)
    torch.testing.assert_close(out, kernels.reference.attention(q, k, v, causal=causal), **TOL[torch.bfloat16])


@pytest.mark.skipif(not ON_SM90, reason=f"needs an sm_90 GPU: {fg.gluon_status()}")
@pytest.mark.parametrize("config", [dict(SPLIT_MASK=True), dict(FMA_SOFTMAX=True), dict(HEAVY_FIRST=True),
                                    dict(SPLIT_MASK=True, FMA_SOFTMAX=True, HEAVY_FIRST=True, BLOCK_N=64, STAGES=3)])
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal",
                         [c for c in GPU_CASES if c[-1]] + [(1, 2, 1, 512, 640, 64, True)])
def test_gpu_split_mask_and_fma_softmax_match_reference(B, Hq, Hkv, Sq, Skv, D, causal, config):
    """The causal loop split at each warp group's diagonal (tiles below it unmasked), the softmax's scale folded
    into the exponent's FMA and the query blocks launched heaviest first: the same output, with causal offsets that
    put the diagonal inside a tile (640 - 512 = 128 keys ahead; 1024 - 384 with BLOCK_N = 64)."""
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, D, torch.bfloat16, seed=5)
    out = fg.flash_attention_gluon(q, k, v, causal=causal, config=config)
    torch.testing.assert_close(out, kernels.reference.attention(q, k, v, causal=causal), **TOL[torch.bfloat16])


@pytest.mark.skipif(not ON_SM90, reason=f"needs an sm_90 GPU: {fg.gluon_status()}")
@pytest.mark.parametrize("config", [dict(PINGPONG=True), dict(PINGPONG=True, FMA_SOFTMAX=True, STAGES=3, BLOCK_N=64,
                                                                     HEAVY_FIRST=True)])
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal", GPU_CASES + [(1, 1, 1, 128, 128, 64, False)])
def test_gpu_pingpong_matches_reference(B, Hq, Hkv, Sq, Skv, D, causal, config):
    """The two consumer groups taking turns to issue their matmuls (FA3's ping-pong, turns on mbarriers): the same
    output, including one key tile only (the loop never runs: the prologue's QKᵀ and the epilogue's P·V)."""
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, D, torch.bfloat16, seed=7)
    out = fg.flash_attention_gluon(q, k, v, causal=causal, config=config)
    torch.testing.assert_close(out, kernels.reference.attention(q, k, v, causal=causal), **TOL[torch.bfloat16])


@pytest.mark.skipif(not ON_SM90, reason=f"needs an sm_90 GPU: {fg.gluon_status()}")
@pytest.mark.parametrize("config", [dict(PERSISTENT=True), dict(PERSISTENT=True, SPLIT_MASK=True, HEAVY_FIRST=True,
                                                                FMA_SOFTMAX=True),
                                    dict(PERSISTENT=True, PINGPONG=True, FMA_SOFTMAX=True, HEAVY_FIRST=True),
                                    dict(PERSISTENT=True, STAGES=3, BLOCK_N=64)])
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal", GPU_CASES + [(4, 16, 4, 1024, 1024, 64, True),
                                                                      (2, 16, 16, 1024, 1280, 64, False)])
def test_gpu_persistent_matches_reference(B, Hq, Hkv, Sq, Skv, D, causal, config):
    """One program per SM looping over query tiles, the ring's and the turns' counters running on across them: the
    same output and log-sum-exp, with fewer query tiles than SMs (the first cases) and more (512 and 256 tiles:
    every program takes several, of different lengths when causal)."""
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, D, torch.bfloat16, seed=13)
    out, lse = fg.flash_attention_gluon(q, k, v, causal=causal, return_lse=True, config=config)
    want_out, want_lse = kernels.reference.flash_attention_lse(q, k, v, causal=causal)
    torch.testing.assert_close(out, want_out, **TOL[torch.bfloat16])
    torch.testing.assert_close(lse, want_lse, rtol=1e-3, atol=1e-2)


@pytest.mark.skipif(not ON_SM90, reason=f"needs an sm_90 GPU: {fg.gluon_status()}")
@pytest.mark.parametrize("config", [{}, dict(SPLIT_MASK=True, HEAVY_FIRST=True, FMA_SOFTMAX=True),
                                    dict(PINGPONG=True, FMA_SOFTMAX=True)])
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal", GPU_CASES[1:3])
def test_gpu_return_lse_matches_reference(B, Hq, Hkv, Sq, Skv, D, causal, config):
    """return_lse: each row's log-sum-exp of the scaled scores (natural log, what the backward pass and split merges
    read), from each group's running max and sum, whichever loop ran; the output is the one without it."""
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, D, torch.bfloat16, seed=9)
    out, lse = fg.flash_attention_gluon(q, k, v, causal=causal, return_lse=True, config=config)
    want_out, want_lse = kernels.reference.flash_attention_lse(q, k, v, causal=causal)
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, want_lse, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(out, want_out, **TOL[torch.bfloat16])
    torch.testing.assert_close(out, fg.flash_attention_gluon(q, k, v, causal=causal, config=config), atol=0, rtol=0)


@pytest.mark.skipif(not ON_SM90, reason=f"needs an sm_90 GPU: {fg.gluon_status()}")
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D, causal", GPU_CASES[1:3])
def test_gpu_hopper_gluon_forward_with_the_portable_backward(B, Hq, Hkv, Sq, Skv, D, causal):
    """``kernels.flash_attention(..., hopper="gluon")``: the Gluon forward (the same output as calling it), its
    log-sum-exp saved for the portable backward; gradients as the reference's. Outside its scope (Sq = 200) the
    default forward runs."""
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, D, torch.bfloat16, seed=11)
    got = kernels.flash_attention(q, k, v, causal=causal, hopper="gluon")
    torch.testing.assert_close(got, fg.flash_attention_gluon(q, k, v, causal=causal), atol=0, rtol=0)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    qr, kr, vr = (t.float().clone().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    kernels.flash_attention(qg, kg, vg, causal=causal, hopper="gluon").backward(dout)
    kernels.reference.attention(qr, kr, vr, causal=causal).backward(dout.float())
    for name, mine, ref in (("dq", qg.grad, qr.grad), ("dk", kg.grad, kr.grad), ("dv", vg.grad, vr.grad)):
        torch.testing.assert_close(mine.float(), ref, rtol=5e-2, atol=5e-2, msg=lambda m, name=name: f"{name}: {m}")
    q200 = q[:, :, :200].contiguous()
    torch.testing.assert_close(kernels.flash_attention(q200, k, v, causal=causal, hopper="gluon"),
                               kernels.flash_attention(q200, k, v, causal=causal), atol=0, rtol=0)


def test_sweep_skips_the_configs_whose_smoke_case_failed():
    """The sweep reads the smoke run's lines: a config that sets everything a failed (hung, wrong, crashed) case set is
    not run, a hang would take the step; a failed default (an empty override) rules out every config."""
    import json

    from benchmarks.flash_attention_gluon_configs import failed_in_smoke, skipped_by_smoke

    lines = [json.dumps(dict(case=[1, 1, 1, 128, 128, 64, False, {}], status="ok", max_diff=0.01)),
             json.dumps(dict(case=[4, 16, 4, 1024, 1024, 64, True, dict(PERSISTENT=True)], status="hung")),
             json.dumps(dict(case=[1, 2, 2, 512, 512, 128, False, dict(PINGPONG=True, STAGES=3)], status="wrong")),
             "the Gluon kernel cannot run here: no CUDA GPU"]
    failed = failed_in_smoke("\n".join(lines))
    assert failed == [dict(PERSISTENT=True), dict(PINGPONG=True, STAGES=3)]
    full = lambda **kw: {**fg.DEFAULT_CONFIG, **kw}
    assert skipped_by_smoke(full(PERSISTENT=True, FMA_SOFTMAX=True), failed) == dict(PERSISTENT=True)
    assert skipped_by_smoke(full(PINGPONG=True, STAGES=3), failed) == dict(PINGPONG=True, STAGES=3)
    assert skipped_by_smoke(full(PINGPONG=True), failed) is None and skipped_by_smoke(full(), failed) is None
    default_failed = failed_in_smoke(json.dumps(dict(case=[1, {}], status="error")))
    assert skipped_by_smoke(full(SPLIT_MASK=True), default_failed) == {}


def test_sweep_pick_runs_the_chosen_configs_in_order_and_rejects_what_names_none():
    """``--pick`` (a short call's choice): the configs it names by label or index, in the order given, CONFIGS_D64's
    after CONFIGS' at D = 64; a label or index that names none is a ValueError naming it, raised before any GPU work
    (here: on a CPU). gpu_call.sh's fa_gluon_mini names its configs by label: each must still exist."""
    import re
    from pathlib import Path

    from benchmarks import flash_attention_gluon_configs as sweep

    assert sweep.configs_for(128) == sweep.CONFIGS
    assert sweep.configs_for(64) == sweep.CONFIGS + sweep.CONFIGS_D64
    assert sweep.configs_for(128, ["128/2/232/fma/pp", "0"]) == [dict(PINGPONG=True, FMA_SOFTMAX=True),
                                                                 sweep.CONFIGS[0]]
    assert sweep.configs_for(64, [str(len(sweep.CONFIGS))]) == [sweep.CONFIGS_D64[0]]
    assert sweep.configs_for(64, ["64/2/104"]) == [sweep.TWO_PER_SM]
    for wrong in (str(len(sweep.CONFIGS)), "128/2/232/pp/fma", "-1"):   # past the end, flags out of order, negative
        with pytest.raises(ValueError, match=re.escape(f"--pick: [{wrong!r}]")):
            sweep.configs_for(128, ["0", wrong])
    with pytest.raises(ValueError, match="--pick"):
        sweep.main(["--pick", "0,99"])
    script = (Path(__file__).parents[1] / "benchmarks" / "gpu_call.sh").read_text()
    mini = ",".join(re.findall(r"^MINI_PICK=(?:\$MINI_PICK,)?(\S+)$", script, re.M)).split(",")
    assert '--pick "$MINI_PICK"' in script and len(mini) >= 5
    assert len(sweep.configs_for(128, mini)) == len(mini)


@pytest.mark.skipif(ON_SM90, reason="runs the sweep on an sm_90 GPU")
def test_config_sweep_says_why_it_cannot_run_here(capsys):
    from benchmarks import flash_attention_gluon_configs

    assert flash_attention_gluon_configs.main([]) == {}
    assert "cannot run here" in capsys.readouterr().out


@pytest.mark.skipif(ON_SM90, reason="runs the smoke cases on an sm_90 GPU")
def test_smoke_run_says_why_it_cannot_run_here(capsys):
    """Without an sm_90 GPU the smoke run starts no process: it says why and counts every case as failed (so
    gpu_call.sh's fa_gluon step skips the benchmarks)."""
    from benchmarks import flash_attention_gluon_smoke as smoke

    assert smoke.main(quick=True) == len(smoke.QUICK) and smoke.main() == len(smoke.CASES)
    assert "cannot run here" in capsys.readouterr().out


def test_resources_record_every_config_the_sweep_runs_and_a_compile_error_by_name(monkeypatch, tmp_path):
    """``benchmarks.flash_attention_gluon_resources``: one row per config the sweep would time (each head dim, causal
    and not, the causal-only switches dropped without a mask), a compiler error recorded in its row (not a lost run),
    ``fits`` against one block's 227 KB. The recorded file (Triton 3.6, the GPU image's) still covers every config of
    the sweep: a config added to CONFIGS needs the CPU run again (the docstring's command)."""
    import json
    from pathlib import Path

    from benchmarks import flash_attention_gluon_configs as sweep
    from benchmarks import flash_attention_gluon_resources as res

    def fake(D, causal, dtype, config):
        if config.get("PERSISTENT"):
            raise RuntimeError("cross-compiling for sm_90 failed:\nerror: out of shared memory")
        return dict(shared_bytes=200_000 + 40_000 * config.get("STAGES", 2) - 80_000, num_warps=12, wgmma=1,
                    tma_loads=1, setmaxnreg=[], ptxas_registers=168, spill_store_bytes=0)

    monkeypatch.setattr(fg, "gl", fg.gl or object())   # a Triton without Gluon would stop main before any work
    monkeypatch.setattr(fg, "cross_compile", fake)
    got = res.main(["--head-dims", "64", "--jobs", "1", "--out", str(tmp_path / "r.json")])
    want = [(64, c, sweep.label({**fg.DEFAULT_CONFIG, **cfg}))
            for c in (False, True) for cfg in sweep.row_configs(64, c)]
    assert [(r["D"], r["causal"], r["label"]) for r in got["rows"]] == want
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == got["rows"]
    persistent = [r for r in got["rows"] if r["config"]["PERSISTENT"]]
    assert persistent and all(r["error"] == "error: out of shared memory" and "fits" not in r for r in persistent)
    assert {r["fits"] for r in got["rows"] if "error" not in r} == {True, False}   # STAGES=3: 240,000 B > 227 KB
    assert not any(r["causal"] is False and r["config"]["SPLIT_MASK"] for r in got["rows"])

    recorded = sorted(Path(res.RESULTS_DIR).glob("flash_attention_gluon_resources_sm90_triton-3.6*.json"))
    assert recorded, "no recorded file: python -m benchmarks.flash_attention_gluon_resources with Triton 3.6"
    rows = json.loads(recorded[-1].read_text())["rows"]
    have = {(r["D"], r["causal"], r["label"]) for r in rows}
    for D in (128, 64):
        for c in (False, True):
            for cfg in sweep.row_configs(D, c):
                assert (D, c, sweep.label({**fg.DEFAULT_CONFIG, **cfg})) in have, (D, c, cfg)
