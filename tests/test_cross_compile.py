"""benchmarks.cross_compile (a kernel compiled for sm_90 without a GPU, read from ptxas and its SASS) and the INT8
kernel's recorded resources (benchmarks/int8_kernel_resources.py)."""
from __future__ import annotations

import json

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import pytest

from benchmarks import int8_kernel_resources as res
from benchmarks.cross_compile import cross_compile, loop_opcodes
from course_lib.analysis.roofline import RESULTS_DIR

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0040*/              @!P0 STS.U16 [R3], R9 ;
        /*0050*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0060*/               @P1 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
"""


def test_loop_opcodes_counts_the_largest_loop_by_opcode():
    got = loop_opcodes(SASS)
    assert got == dict(instructions=4, opcodes={"HMMA": 2, "BRA": 1, "STS": 1})   # predicates and widths dropped
    assert loop_opcodes("        /*0000*/                   EXIT ;") == dict(instructions=0, opcodes={})


def _int8(config: dict, tmp_path, name: str) -> tuple[dict, str]:
    sass = tmp_path / f"{name}.sass"
    got = cross_compile("kernels.paged_attention_int8", "_paged_attention_int8_kernel",
                        "benchmarks.int8_kernel_resources:launch", dict(config=config, **res.SHAPE),
                        sass_path=str(sass))
    return got, sass.read_text()


def test_the_int8_kernel_compiles_for_sm90_as_a_launch_would(tmp_path):
    """Specialized like a GPU launch: the words load 16 bytes at a time (compiled without the launch's alignment
    facts they loaded 4); the FP16 kernel keeps its asynchronous copies."""
    got, sass = _int8({}, tmp_path, "shipped")
    assert got["arch"] == 90 and got["num_warps"] == 2 and got["constexprs"]["HEAD_DIM"] == 128
    assert 128 <= got["registers"] <= 255 and got["spill_store_bytes"] == 0
    assert "LDG.E.128" in sass and got["loop"]["opcodes"]["HMMA"] > 0
    fp16 = cross_compile("kernels.paged_attention", "_paged_attention_decode_kernel",
                         "benchmarks.int8_kernel_resources:launch_fp16", dict(res.SHAPE))
    assert fp16["loop"]["opcodes"].get("LDGSTS", 0) > 0


def test_the_switches_change_what_the_loop_executes(tmp_path):
    shipped, _ = _int8({}, tmp_path, "shipped")
    biased, _ = _int8(dict(BIASED=True), tmp_path, "biased")
    k8, _ = _int8(dict(K_INT8_DOT=True), tmp_path, "k8")
    ops = {name: r["loop"]["opcodes"] for name, r in (("shipped", shipped), ("biased", biased), ("k8", k8))}
    assert ops["biased"]["HADD2"] < ops["shipped"]["HADD2"] / 2        # no per-code subtraction
    assert ops["k8"].get("IMMA", 0) > 0 and ops["k8"]["HMMA"] < ops["shipped"]["HMMA"]   # K through int8 dots
    assert "IMMA" not in ops["shipped"]


def test_resources_record_each_variant_and_a_compile_error_by_name(monkeypatch, tmp_path):
    def fake(module, kernel, launch, kwargs, **_):
        if kwargs.get("config", {}).get("BLOCK_N") == 128:
            raise RuntimeError("cross-compiling failed:\nout of resources: shared memory")
        return dict(num_warps=2, num_stages=1, shared_bytes=1024, registers=232, spill_store_bytes=0,
                    loop=dict(instructions=1000, opcodes={"STS": 10, "HMMA": 64}))
    monkeypatch.setattr(res, "cross_compile", fake)
    got = res.main(["--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == got
    rows = {r["name"]: r for r in got["rows"]}
    assert list(rows) == [name for name, _ in res.VARIANTS]
    assert rows["block_n_128"]["error"] == "out of resources: shared memory"
    shipped = rows["shipped"]
    assert shipped["programs_per_sm_by_registers"] == 65536 // (232 * 32 * 2)   # 7,424 registers a warp: 4
    assert shipped["warp_instructions_per_kb"] == pytest.approx(1000 * 2 / 16)  # 64 tokens x 128 B x K and V
    assert rows["fp16"]["kb_per_iteration"] == 32.0                             # 2-byte values


def test_the_recorded_files_cover_every_variant():
    files = sorted(RESULTS_DIR.glob("int8_kernel_resources_sm90_triton-*.json"))
    assert files, "run python -m benchmarks.int8_kernel_resources"
    for path in files:
        got = json.loads(path.read_text())
        assert [r["name"] for r in got["rows"]] == [name for name, _ in res.VARIANTS], path.name
        assert got["device"] == "CPU (compiled for sm_90, no GPU)" and "-dirty" not in got["git_commit"]


def test_instruction_mix_groups_every_opcode_once_and_scales_per_kb():
    from course_lib.analysis.instruction_mix import GROUPS, OTHER, instruction_mix, per_kb
    ops = {"PRMT": 10, "HADD2": 4, "STS": 3, "HMMA": 2, "LDG": 1, "FMUL": 5, "IMAD": 7, "WEIRD": 1}
    mix = instruction_mix(ops)
    assert list(mix) == [*GROUPS, OTHER] and sum(mix.values()) == sum(ops.values())
    assert mix["unpacking codes"] == 14 and mix[OTHER] == 8 and mix["tensor cores"] == 2
    kb = per_kb(dict(num_warps=2, kb_per_iteration=16.0, loop_opcodes=ops))
    assert kb["unpacking codes"] == 14 * 2 / 16
