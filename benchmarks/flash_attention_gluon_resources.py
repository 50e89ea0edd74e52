"""What each config of the Gluon forward's sweep compiles to on sm_90, without a GPU (issue 21, lesson 03).

    python -m benchmarks.flash_attention_gluon_resources          # any machine with Triton >= 3.5: ~7 s a config

Every config the sweep (``benchmarks.flash_attention_gluon_configs``) would time, per head dim and causal or not, is
cross-compiled for sm_90 (``kernels.flash_attention_gluon.cross_compile``: Triton's compiler and ``ptxas -v``, no GPU
touched) and recorded: shared memory per program against the 227 KB an H100 or H200 gives one block, registers per
thread at launch, bytes spilled, the ``setmaxnreg`` budgets of the warp groups, ``wgmma`` and TMA-load instruction
counts. So which configs fail to compile, spill or do not fit is known before a GPU call is spent timing them, and
what each switch costs in the code. Speed is the sweep's, on a GPU.

Writes ``benchmarks/results/flash_attention_gluon_resources_sm90_triton-<version>.json`` (or ``--out``); the Triton
version matters (the GPU runs used 3.6: compile with that one to read them).
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import triton

from benchmarks.cross_compile import compiled_record
from benchmarks.flash_attention_gluon_configs import label, row_configs
from course_lib.analysis.roofline import RESULTS_DIR
from kernels import flash_attention_gluon as fg

#: shared memory one block may use on sm_90 (H100, H200): 227 KB of the SM's 228
SHARED_LIMIT = 227 * 1024


def compile_row(D: int, causal: bool, config: dict, dtype: str = "bfloat16") -> dict:
    """One config's compiled resources (or the compiler's error), with ``fits`` (shared memory within one block's)
    and ``label``."""
    entry = dict(D=D, causal=causal, dtype=dtype, label=label({**fg.DEFAULT_CONFIG, **config}),
                 config={**fg.DEFAULT_CONFIG, **config})
    try:
        got = fg.cross_compile(D=D, causal=causal, dtype=dtype, config=config)
    except (RuntimeError, ValueError) as exc:
        entry["error"] = str(exc).strip().splitlines()[-1][:300]
        return entry
    keep = ("shared_bytes", "num_warps", "wgmma", "tma_loads", "setmaxnreg", "ptxas_registers", "spill_store_bytes")
    entry.update({key: got[key] for key in keep}, fits=got["shared_bytes"] <= SHARED_LIMIT)
    return entry


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", default="128,64", help="e.g. 128,64")
    parser.add_argument("--jobs", type=int, default=2, help="compilations at once (each a process)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if fg.gl is None:
        print(f"triton {triton.__version__} has no Gluon (needs >= 3.5): nothing to compile")
        return {}
    work = [(D, causal, cfg) for D in (int(d) for d in args.head_dims.split(","))
            for causal in (False, True) for cfg in row_configs(D, causal)]
    with ThreadPoolExecutor(args.jobs) as pool:   # each compilation runs in its own Python (cross_compile)
        rows = list(pool.map(lambda w: compile_row(*w), work))
    result = compiled_record("flash_attention_gluon_resources", argv, shared_limit_bytes=SHARED_LIMIT,
                             default_config=fg.DEFAULT_CONFIG, rows=rows)
    for r in rows:
        print(f"D={r['D']:3d} causal={r['causal']!s:5} {r['label']:28s} " + (
            f"error: {r['error']}" if "error" in r else
            f"{r['shared_bytes'] / 1024:6.1f} KB shared{'' if r['fits'] else ' (does not fit)'}, "
            f"{r['ptxas_registers']} registers at launch, {r['spill_store_bytes']} B spilled, "
            f"{r['wgmma']} wgmma, {r['tma_loads']} TMA loads"), flush=True)
    out = args.out or RESULTS_DIR / f"flash_attention_gluon_resources_sm90_triton-{triton.__version__}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
