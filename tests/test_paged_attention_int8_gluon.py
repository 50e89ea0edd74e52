"""kernels.paged_attention_int8_gluon: the INT8 decode kernel whose loads land in the mma operand layouts.

Gluon has no interpreter: on a CPU the unpacking routine's bit logic is checked through its Python model (built from
the same constants as the PTX), the kernel is compiled for sm_90 (no shared memory, no spills, registers that fit
RESIDENT_PER_SM programs), and inputs outside its scope are refused by name; on a GPU it is compared with the
reference on the same codes."""
from __future__ import annotations

import random
import struct

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import pytest
import torch

import kernels.paged_attention_int8_gluon as g8
import kernels.reference as ref
from benchmarks import int8_kernel_resources as res
from benchmarks.cross_compile import cross_compile
from course_lib.device import DEVICE, HAS_GPU
from test_kv_quant import make_quantized

GPU_OK = g8.gluon_int8_status() is None


def test_the_unpacking_gives_1152_plus_each_code_of_both_words_per_plane():
    rng = random.Random(0)
    for _ in range(500):
        a_codes = [rng.randint(-128, 127) for _ in range(4)]
        b_codes = [rng.randint(-128, 127) for _ in range(4)]
        a, b = (struct.unpack("<I", struct.pack("<4b", *c))[0] for c in (a_codes, b_codes))
        assert g8.pair_planes_reference(a, b) == [(1152 + x, 1152 + y) for x, y in zip(a_codes, b_codes)]
    for c in range(-128, 128):                     # every code, in every byte of both words
        a = struct.unpack("<I", struct.pack("<4b", *[c] * 4))[0]
        b = struct.unpack("<I", struct.pack("<4b", *[-1 - c] * 4))[0]
        assert g8.pair_planes_reference(a, b) == [(1152 + c, 1152 - 1 - c)] * 4
    extremes = struct.unpack("<I", struct.pack("<4b", -128, 127, 0, -1))[0]
    assert g8.pair_planes_reference(extremes, extremes) == [(1024.0,) * 2, (1279.0,) * 2, (1152.0,) * 2,
                                                            (1151.0,) * 2]


def test_the_ptx_is_written_from_the_modelled_constants():
    ptx = g8._PAIR_PLANES_PTX.value if hasattr(g8._PAIR_PLANES_PTX, "value") else str(g8._PAIR_PLANES_PTX)
    assert f"mov.b32 c1, {g8.C1:#x};" in ptx and f"mov.b32 c2, {g8.C2:#x};" in ptx
    for j, sel in enumerate(g8.PRMT_SELECTORS):
        assert f"prmt.b32 x, $4, $5, {sel:#x};\nlop3.b32 ${j}, x, c1, c2, {g8.LUT:#x};" in ptx


def test_compiles_for_sm90_without_shared_memory_or_spills(tmp_path):
    got = cross_compile("kernels.paged_attention_int8_gluon", "_paged_int8_mma_kernel",
                        "benchmarks.int8_kernel_resources:launch_gluon", dict(config={}, **res.SHAPE),
                        sass_path=str(tmp_path / "k.sass"))
    assert got["num_warps"] == 1 and got["shared_bytes"] == 0 and got["spill_store_bytes"] == 0
    per_warp = -(-got["registers"] * 32 // 256) * 256
    assert 65536 // per_warp >= g8.RESIDENT_PER_SM                     # the split plan's programs per SM fit
    ops = got["loop"]["opcodes"]
    assert ops["HMMA"] > 0 and not any(op in ops for op in ("STS", "LDS", "LDSM", "BAR"))
    sass = (tmp_path / "k.sass").read_text()
    assert sass.count("LDG.E.128") >= 16                                 # K and V: 4 words of a token per load


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "q": a["q"].float()}, "q has dtype torch.float32; the Gluon INT8 kernel takes torch.float16"),
    (lambda a: {**a, "k_zero": a["k_scale"], "v_zero": a["v_scale"]}, "k_zero given"),
    (lambda a: {**a, "config": {"BLOCK": 32}}, r"config has unknown key\(s\) \['BLOCK'\]"),
])
def test_inputs_outside_the_scope_are_refused_by_name(change, match):
    args, _, _ = make_quantized(2, 8, 2, 64, 16, [5, 40], torch.float16)
    names = ("q", "k_cache", "v_cache", "k_scale", "v_scale", "block_tables", "context_lens")
    with pytest.raises(ValueError, match=match):
        g8.paged_attention_int8_decode_gluon(**change(dict(zip(names, args))))


def test_head_dim_and_group_size_outside_the_scope_are_refused():
    args, _, _ = make_quantized(2, 8, 2, 32, 16, [5, 40], torch.float16)
    with pytest.raises(ValueError, match="head_dim 32; the Gluon INT8 kernel takes 64 or 128"):
        g8.paged_attention_int8_decode_gluon(*args)
    args, _, _ = make_quantized(2, 32, 1, 64, 16, [5, 40], torch.float16)
    with pytest.raises(ValueError, match="32 query heads per kv head; the Gluon INT8 kernel takes at most 16"):
        g8.paged_attention_int8_decode_gluon(*args)


@pytest.mark.skipif(GPU_OK, reason="a GPU that runs it")
def test_without_a_gpu_it_says_why():
    args, _, _ = make_quantized(2, 8, 2, 64, 16, [5, 40], torch.float16)
    with pytest.raises(RuntimeError, match="cannot run here: no CUDA GPU"):
        g8.paged_attention_int8_decode_gluon(*args)


@pytest.mark.skipif(not GPU_OK, reason=f"needs a GPU that runs it: {g8.gluon_int8_status()}")
@pytest.mark.parametrize("Hq, Hkv, D", [(32, 8, 128), (8, 8, 64), (16, 1, 128), (12, 4, 64)])
@pytest.mark.parametrize("config", [{}, {"LAZY_RESCALE": False}, {"V_WIDE": False, "K_WIDE": False},
                                    {"K_WIDE": False}, {"BLOCK_N": 16}, {"BLOCK_N": 64}])
def test_gpu_matches_the_reference_on_the_same_codes(Hq, Hkv, D, config):
    lens = [1, 31, 32, 33, 300, 2000, 0]
    args, _, _ = make_quantized(len(lens), Hq, Hkv, D, 16, lens, torch.float16, seed=Hq + D)
    want = ref.paged_attention_int8_decode(*args).float()
    for splits in (1, 3, None):
        got = g8.paged_attention_int8_decode_gluon(*args, num_splits=splits, config=config).float()
        assert got.device.type == DEVICE.type
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
        assert torch.equal(got[-1], torch.zeros_like(got[-1]))          # context 0: zeros


@pytest.mark.skipif(not GPU_OK, reason=f"needs a GPU that runs it: {g8.gluon_int8_status()}")
def test_gpu_a_late_large_score_is_rescaled_correctly():
    """LAZY_RESCALE keeps the old max until a row's grows by more than 8 (log2 units): a key that suddenly scores
    high late in the context must still dominate the output."""
    args, _, _ = make_quantized(2, 8, 2, 128, 16, [700, 700], torch.float16, seed=5)
    q, k_codes, tables = args[0], args[1].clone(), args[5]
    slot = int(tables[0, 600 // 16]) * 16 + 600 % 16                      # token 600 of sequence 0, kv head 0
    k_codes.view(-1, 2, 128)[slot, 0] = (q[0, 0].sign() * 127).to(torch.int8)   # aligned with query head 0
    plain = ref.paged_attention_int8_decode(*args).float()
    args = (q, k_codes, *args[2:])
    want = ref.paged_attention_int8_decode(*args).float()
    assert (want[0, 0] - plain[0, 0]).abs().max() > 0.5                  # the planted key dominates head 0
    for config in ({}, {"LAZY_RESCALE": False}):
        got = g8.paged_attention_int8_decode_gluon(*args, config=config).float()
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    assert HAS_GPU
