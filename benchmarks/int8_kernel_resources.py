"""What the INT8 decode kernel's variants compile to on sm_90, without a GPU (issue 21, lesson 07).

    python -m benchmarks.int8_kernel_resources          # any machine: ~10 s a variant

The INT8 kernel (``kernels/paged_attention_int8.py``) runs at 0.74-0.76x the FP16 kernel's time on an H200, not the
0.5x its bytes allow: per byte it executes more instructions than the FP16 kernel, and with ~240 registers a thread
only a few warps per SM hide their latency. Each variant of its ``CONFIG`` is cross-compiled for sm_90
(``benchmarks.cross_compile``: Triton's compiler, ``ptxas -v``, ``nvdisasm``; no GPU touched) at the shapes of
``benchmarks/kv_quant.py`` (Hq = 32, Hkv = 8, D = 128, fp16 queries) and recorded: registers per thread, spills,
and the SASS of its token loop by opcode, per warp and iteration, and per KB of codes the loop reads. Speed is the
GPU's (``benchmarks/int8_kernel_sweep.py``); this says what each variant costs in instructions, and where (the
shared-memory stores of ``STS`` are layout changes: the loaded words reshuffled for the tensor cores).

Writes ``benchmarks/results/int8_kernel_resources_sm90_triton-<version>.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import triton

from benchmarks.cross_compile import compiled_record, cross_compile
from course_lib.analysis.roofline import RESULTS_DIR

SHAPE = dict(B=32, L=8192, Hq=32, Hkv=8, D=128, P=16)
#: (name, CONFIG overrides): the shipped config first; "fp16": lesson 02's FP16 kernel at its own CONFIG; "gluon...":
#: kernels/paged_attention_int8_gluon.py (overrides of its own CONFIG)
VARIANTS = [("shipped", {}), ("k_int8_dot", dict(K_INT8_DOT=True)), ("biased", dict(BIASED=True)),
            ("biased_k_int8_dot", dict(BIASED=True, K_INT8_DOT=True)), ("4_warps", dict(num_warps=4)),
            ("k_int8_dot_4_warps", dict(K_INT8_DOT=True, num_warps=4)), ("no_asm", dict(ASM=False)),
            ("block_n_32", dict(BLOCK_N=32)), ("block_n_128", dict(BLOCK_N=128)), ("fp16", {}),
            ("gluon", {}), ("gluon_narrow_loads", dict(V_WIDE=False, K_WIDE=False)),
            ("gluon_block_n_16", dict(BLOCK_N=16)), ("gluon_block_n_64", dict(BLOCK_N=64))]
REGISTERS_PER_SM = 65536


def _inputs(B: int, L: int, Hq: int, Hkv: int, D: int, P: int, cache_dtype):
    import torch
    blocks = L // P
    q = torch.zeros(B, Hq, D, dtype=torch.float16)
    cache = torch.zeros(B * blocks, P, Hkv, D, dtype=cache_dtype)
    tables = torch.arange(B * blocks, dtype=torch.int32).view(B, blocks)
    return q, cache, tables, torch.full((B,), L, dtype=torch.int32)


def launch(m, config: dict, B: int, L: int, Hq: int, Hkv: int, D: int, P: int) -> None:
    """Call the INT8 kernel's wrapper on CPU tensors of this shape (2 splits: the split-K launch)."""
    import torch
    q, codes, tables, lens = _inputs(B, L, Hq, Hkv, D, P, torch.int8)
    scales = torch.ones(codes.shape[:3], dtype=torch.float16)
    m.paged_attention_int8_decode(q, codes, codes, scales, scales, tables, lens, max_context_len=L, num_splits=2,
                                  validate=False, config=config)


def launch_fp16(m, B: int, L: int, Hq: int, Hkv: int, D: int, P: int) -> None:
    """The same for lesson 02's FP16 kernel, the baseline (its own CONFIG)."""
    import torch
    q, cache, tables, lens = _inputs(B, L, Hq, Hkv, D, P, torch.float16)
    m.paged_attention_decode(q, cache, cache, tables, lens, max_context_len=L, num_splits=2, validate=False)


def launch_gluon(m, config: dict, B: int, L: int, Hq: int, Hkv: int, D: int, P: int) -> None:
    """The same for the Gluon kernel (``kernels.paged_attention_int8_gluon``), past its GPU check."""
    import torch
    q, codes, tables, lens = _inputs(B, L, Hq, Hkv, D, P, torch.int8)
    scales = torch.ones(codes.shape[:3], dtype=torch.float16)
    m._launch(q, codes, codes, scales, scales, tables, lens, None, 2, L // 2, {**m.CONFIG, **config})


def compile_variant(name: str, config: dict) -> dict:
    """One variant's compiled resources (or the compiler's error); name "fp16": the FP16 kernel."""
    import kernels.paged_attention as pa
    import kernels.paged_attention_int8 as pa8
    import kernels.paged_attention_int8_gluon as g8
    fp16, gluon = name == "fp16", name.startswith("gluon")
    cfg = dict(pa.CONFIG) if fp16 else {**(g8.CONFIG if gluon else pa8.CONFIG), **config}
    row = dict(name=name, config=cfg)
    try:
        if fp16:
            got = cross_compile("kernels.paged_attention", "_paged_attention_decode_kernel",
                                "benchmarks.int8_kernel_resources:launch_fp16", dict(SHAPE))
        elif gluon:
            got = cross_compile("kernels.paged_attention_int8_gluon", "_paged_int8_mma_kernel",
                                "benchmarks.int8_kernel_resources:launch_gluon", dict(config=config, **SHAPE))
        else:
            got = cross_compile("kernels.paged_attention_int8", "_paged_attention_int8_kernel",
                                "benchmarks.int8_kernel_resources:launch", dict(config=config, **SHAPE))
    except RuntimeError as exc:
        row["error"] = str(exc).strip().splitlines()[-1][:300]
        return row
    warps = got["num_warps"]
    kb = cfg["BLOCK_N"] * SHAPE["D"] * 2 * (2 if fp16 else 1) / 1024   # K and V bytes one iteration reads
    per_thread = -(-got["registers"] * 32 // 256) * 256    # registers are allocated per warp in units of 256
    row.update({k: got[k] for k in ("num_warps", "num_stages", "shared_bytes", "registers", "spill_store_bytes")},
               programs_per_sm_by_registers=REGISTERS_PER_SM // (per_thread * warps),
               loop_instructions_per_warp=got["loop"]["instructions"], loop_opcodes=got["loop"]["opcodes"],
               kb_per_iteration=kb,
               warp_instructions_per_kb=got["loop"]["instructions"] * warps / kb)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = [compile_variant(name, config) for name, config in VARIANTS]
    for r in rows:
        ops = r.get("loop_opcodes", {})
        print(f"{r['name']:20s} " + (f"error: {r['error']}" if "error" in r else
              f"{r['registers']} registers ({r['programs_per_sm_by_registers']} programs/SM), "
              f"{r['spill_store_bytes']} B spilled; loop {r['loop_instructions_per_warp']} instructions/warp "
              f"({r['warp_instructions_per_kb']:.0f} per KB read): STS {ops.get('STS', 0)}, "
              f"LDS {ops.get('LDS', 0) + ops.get('LDSM', 0)}, LDG {ops.get('LDG', 0) + ops.get('LDGSTS', 0)}, "
              f"HMMA {ops.get('HMMA', 0)}, IMMA {ops.get('IMMA', 0)}, PRMT {ops.get('PRMT', 0)}"), flush=True)
    result = compiled_record("int8_kernel_resources", argv, shape=SHAPE, q_dtype="float16",
                             registers_per_sm=REGISTERS_PER_SM, rows=rows)
    out = args.out or RESULTS_DIR / f"int8_kernel_resources_sm90_triton-{triton.__version__}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
