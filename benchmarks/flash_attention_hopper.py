"""FlashAttention forward on Hopper: an ablation of the TMA variants (``kernels.flash_attention_hopper``) against
cuDNN, FlashAttention (both through torch SDPA) and our portable kernel, in one run of about 5 minutes on an H100.

    python -m benchmarks.flash_attention_hopper --time-limit 300   # GPU: D = 64/128, N = 4k/8k/16k, causal and not,
                                                                    # bf16 (fp16 at N = 8k)
    python -m benchmarks.flash_attention_hopper --quick            # smoke run: tiny shapes in the interpreter (CPU)

Shapes as ``benchmarks.flash_attention``: B = 16k // N, Hq = Hkv = 2048 // D; FLOPs = 4·B·H·N²·D, halved when
causal. Rows, in the order they run (the most telling first, so that ``--time-limit`` cuts the least): every
(D, causal) at N = 8k in bf16, then N = 4k and 16k, then fp16 at 8k. In every row cuDNN is measured first (the
strongest baseline; ``*_vs_cudnn`` > 1 means faster than cuDNN), then each implementation is checked against
SDPA's output before it is timed (``triton.testing.do_bench``, median). The autotuner's pick of every variant is
recorded per row. Compilation: before the rows, every (variant, dtype, D, causal) is compiled in its own
subprocess, up to 12 at a time (``--probe``): a compiler crash then costs one variant its rows, not the run, and
the rows load the kernels from Triton's cache. The JSON (device, versions, git commit, date, every row) is written
after each row to ``benchmarks/results/flash_attention_hopper_<device>.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton

import kernels.reference
from benchmarks.flash_attention import bench, device_name, probe_backends, sdpa, sdpa_backends, slug
from benchmarks.kernel_resources import compiled_resources
from benchmarks.record import git_commit, print_readme_row
from course_lib.analysis.roofline import RESULTS_DIR
from course_lib.device import DEVICE, HAS_GPU, INTERPRET
from course_lib.model.online_softmax import attention_flops
from kernels import flash_attention_gluon as gluon_fa
from kernels import flash_attention_hopper as tma
from kernels.flash_attention import _flash_attention

#: The variants a run measures by default: all but tma_ws, which Triton 3.6 compiles for sm_90 to the very code of
#: tma_device (cross-compiled without a GPU: no ttg.warp_specialize in its TTGIR at 4 or 8 warps); --variants adds it.
DEFAULT_VARIANTS = [v for v in tma.VARIANTS if v != "tma_ws"]
#: kernels.flash_attention_gluon (warp-specialized, two consumer warp groups; GPU only, so not a default variant)
GLUON = "gluon_ws"
ALL_VARIANTS = [*tma.VARIANTS, GLUON]
#: (D, causal) -> the Gluon config to run there (``--gluon-configs``: the fastest of a sweep); else DEFAULT_CONFIG
GLUON_CONFIGS: dict[tuple[int, bool], dict] = {}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENS, WIDTH = 16384, 2048  # B·N and Hq·D of every row on a GPU


#: the constexprs that name a compiled specialization of either forward kernel in the file's "compiled" record
RESOURCE_KEYS = ("HEAD_DIM", "CAUSAL", "BLOCK_M", "BLOCK_N", "ROTATE", "HALF_EXP", "POLY_EXP", "PERSISTENT",
                 "WARP_SPECIALIZE")

def plan(quick: bool) -> list[tuple[str, int, bool, int]]:
    """(dtype, D, causal, N) rows in the order they run."""
    if not HAS_GPU:  # the interpreter: tiny shapes, odd N included
        return [("fp16", 32, False, 64), ("fp32", 32, True, 80)]
    if quick:
        return [("bf16", 128, False, 4096), ("bf16", 128, True, 4096)]
    combos = [(D, causal) for D in (128, 64) for causal in (False, True)]
    rows = [("bf16", D, c, 8192) for D, c in combos]
    rows += [("bf16", D, c, N) for N in (4096, 16384) for D, c in combos]
    return rows + [("fp16", D, c, 8192) for D, c in combos]


def shape(D: int, N: int) -> tuple[int, int]:
    """(B, H) of a row."""
    if not HAS_GPU:
        return 1, 2
    return max(1, TOKENS // N), WIDTH // D


def run_impl(impl: str, q, k, v, causal: bool):
    """One forward of ``impl``: "portable" (kernels.flash_attention's kernel) or a Hopper variant name."""
    if impl == "portable":   # hopper=False: by default (hopper="auto") D = 128 would run tma_wide here
        return _flash_attention(q, k, v, causal=causal, hopper=False)
    if impl == GLUON:
        return gluon_fa.flash_attention_gluon(q, k, v, causal=causal, config=GLUON_CONFIGS.get((q.shape[-1], causal)))
    return tma.flash_attention_hopper(q, k, v, causal=causal, variant=impl)


def gluon_configs_from(sweep: dict) -> dict[tuple[int, bool], dict]:
    """(D, causal) -> the fastest config of a ``flash_attention_gluon_configs`` result (its rows' correct, timed
    configs, by their ratio to cuDNN), for the (D, causal) it timed any at."""
    best = {}
    for row in sweep["rows"]:   # a switch since removed (an older file's ROTATE) can be read only where it was off
        timed = [dict(c, config={key: value for key, value in c["config"].items() if key in gluon_fa.DEFAULT_CONFIG})
                 for c in row["configs"] if "vs_cudnn" in c
                 and not any(value for key, value in c["config"].items() if key not in gluon_fa.DEFAULT_CONFIG)]
        if timed:
            best[(row["D"], row["causal"])] = max(timed, key=lambda c: c["vs_cudnn"])["config"]
    return best


def best_config(impl: str, D: int | None = None, causal: bool | None = None) -> str | None:
    """The config the autotuner chose last for ``impl`` (None in the interpreter); the Gluon kernel's (no autotuner)
    for (D, causal)."""
    if INTERPRET:
        return None
    if impl == GLUON:   # one fixed launch config per (D, causal), no autotuner
        return str(gluon_fa._check_config(GLUON_CONFIGS.get((D, causal))))
    if impl == "portable":
        from kernels.flash_attention import _attn_fwd_tuned
        tuner = _attn_fwd_tuned
    else:
        tuner = tma._tuned(impl)
    return str(getattr(tuner, "best_config", None))


# ---------------------------------------------------------------- compilation in subprocesses
def probe(impl: str, dtype: str, D: int, causal: bool) -> None:
    """Compile (and autotune at N = 1024) one implementation for one (dtype, D, causal), with the batch and head
    counts of the rows, so that their kernels are in Triton's cache; raises what the compiler raises."""
    B, H = shape(D, 8192)
    q, k, v = (torch.randn(B, H, 1024, D, device=DEVICE, dtype=DTYPES[dtype]) for _ in range(3))
    run_impl(impl, q, k, v, causal)
    torch.cuda.synchronize()


def probe_all(impls, rows, deadline: float, gluon_configs_path: Path | None = None) -> dict:
    """"impl dtype D causal" -> "ok (N s)" or "failed: why", each from its own subprocess, 12 at a time."""
    jobs = sorted({(impl, dt_, D, c) for impl in impls for dt_, D, c, _ in rows})

    def one(job):
        impl, dt_, D, c = job
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks.flash_attention_hopper", "--probe", impl, dt_, str(D), str(int(c))]
        if gluon_configs_path is not None:
            cmd += ["--gluon-configs", str(gluon_configs_path)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            return job, "failed: timed out"
        if done.returncode:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1][:300]
            return job, f"failed: rc={done.returncode}: {tail}"
        return job, f"ok ({time.perf_counter() - t0:.1f} s)"

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(12, os.cpu_count() or 1)) as pool:
        return {" ".join(map(str, job)): status for job, status in pool.map(one, jobs)}


# ---------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes (CPU) or two rows (GPU)")
    parser.add_argument("--time-limit", type=float, default=330.0,
                        help="seconds after which no new row starts (the JSON is written all the same)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated Hopper variants of {','.join(ALL_VARIANTS)} "
                             f"(default: {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--no-probe", action="store_true", help="compile in this process, no subprocesses")
    parser.add_argument("--gluon-configs", type=Path, default=None,
                        help="a flash_attention_gluon_configs result: gluon_ws runs its fastest config per (D, causal)")
    parser.add_argument("--probe", nargs=4, metavar=("IMPL", "DTYPE", "D", "CAUSAL"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None,
                        help="output JSON (default: benchmarks/results/flash_attention_hopper_<device>.json)")
    args = parser.parse_args(argv)
    GLUON_CONFIGS.clear()
    if args.gluon_configs is not None and not args.gluon_configs.exists():   # the sweep before it wrote nothing
        print(f"--gluon-configs {args.gluon_configs}: no such file; gluon_ws runs DEFAULT_CONFIG", flush=True)
        args.gluon_configs = None
    if args.gluon_configs is not None:
        GLUON_CONFIGS.update(gluon_configs_from(json.loads(args.gluon_configs.read_text())))
    if args.probe:
        impl, dt_, D, c = args.probe
        probe(impl, dt_, int(D), bool(int(c)))
        return {}
    t_start, deadline = time.perf_counter(), time.time() + args.time_limit
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in ALL_VARIANTS:
            raise ValueError(f"--variants names {v!r}; expected some of {', '.join(ALL_VARIANTS)}")
    name = device_name()
    out_path = args.out or RESULTS_DIR / f"flash_attention_hopper_{slug(name)}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = plan(args.quick)
    result = dict(
        benchmark="flash_attention_hopper", device=name, device_slug=slug(name), git_commit=git_commit(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), python=platform.python_version(),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda if HAS_GPU else None,
        cudnn=torch.backends.cudnn.version() if HAS_GPU else None,
        kernel_mode="interpreter" if INTERPRET else "compiled", quick=args.quick, time_limit_s=args.time_limit,
        command=" ".join(["python -m benchmarks.flash_attention_hopper",
                          *(argv if argv is not None else sys.argv[1:])]),
        timing=dict(tool="triton.testing.do_bench" if HAS_GPU else "time.perf_counter", statistic="median",
                    warmup_ms=25, rep_ms=100),
        shapes=dict(rule=f"B = {TOKENS} // N, Hq = Hkv = {WIDTH} // D, Sq = Skv = N" if HAS_GPU else "B = 1, H = 2",
                    flops="4*B*H*N^2*D, halved when causal"),
        hopper_status=tma.hopper_status() or "available",
        variants={v: dict(vars(tma.VARIANTS[v])) if v in tma.VARIANTS
                  else dict(kernel="kernels.flash_attention_gluon", **gluon_fa.DEFAULT_CONFIG,
                            per_shape={f"D={D} causal={c}": cfg for (D, c), cfg in sorted(GLUON_CONFIGS.items())},
                            per_shape_from=str(args.gluon_configs) if args.gluon_configs else None)
                  for v in variants},
        portable_forward="kernels.flash_attention(hopper=False)",   # before this field: hopper="auto" (D = 128: TMA)
        backends={}, probe={}, rows=[], skipped_rows=[], total_seconds=None)

    def save():
        result["total_seconds"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    if result["hopper_status"] != "available":
        print(f"the Hopper path is unavailable here ({result['hopper_status']}): only the baselines run", flush=True)
        variants = []
    impls = ["portable", *variants]
    backends = sdpa_backends() if HAS_GPU else {}
    q0 = torch.randn(1, 16, 256, 128, device=DEVICE, dtype=torch.float16)
    result["backends"] = probe_backends(lambda backend: sdpa(backend, q0, q0, q0, False))
    usable = {b: backend for b, backend in backends.items() if result["backends"][b] == "available"}
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  commit {result['git_commit']}  "
          f"backends {result['backends']}", flush=True)
    if HAS_GPU and not args.no_probe:
        result["probe"] = probe_all(impls, [(d, D, c, N) for d, D, c, N in rows], deadline, args.gluon_configs)
        save()
        print(f"compiled in subprocesses in {time.perf_counter() - t_start:.0f} s: " + "; ".join(
            f"{k}: {s}" for k, s in result["probe"].items() if not s.startswith("ok")), flush=True)

    last_row_s = 0.0
    for i, (dt_, D, causal, N) in enumerate(rows):
        if time.time() + last_row_s > deadline:
            result["skipped_rows"] = [dict(dtype=d, D=h, causal=c, N=n) for d, h, c, n in rows[i:]]
            print(f"--time-limit {args.time_limit:.0f} s: {len(rows) - i} rows not started", flush=True)
            break
        t_row = time.perf_counter()
        B, H = shape(D, N)
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=DEVICE, dtype=DTYPES[dt_], generator=gen) for _ in range(3))
        flops = attention_flops(B, H, N, N, D, causal)
        row = dict(dtype=dt_, D=D, causal=causal, N=N, B=B, H=H, flops=flops, errors={}, best_config={})
        fns = {b: (lambda backend=backend: sdpa(backend, q, k, v, causal)) for b, backend in usable.items()}
        fns.update({impl: (lambda impl=impl: run_impl(impl, q, k, v, causal)) for impl in impls})
        # the reference output: SDPA where it runs (cuDNN first), else plain torch
        want = next((fns[b]() for b in ("sdpa_cudnn", "sdpa_flash") if b in usable), None)
        if want is None:
            want = kernels.reference.attention(q, k, v, causal=causal)
        for impl, fn in fns.items():
            probe_status = result["probe"].get(f"{impl} {dt_} {D} {causal}", "ok")
            if not probe_status.startswith("ok"):
                row["errors"][impl] = f"not run: {probe_status}"
                continue
            try:
                err = (fn().float() - want.float()).abs().max().item()  # the first call autotunes
            except Exception as exc:  # a variant that fails to compile or run loses its cell, not the run
                row["errors"][impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                continue
            row[f"{impl}_max_abs_diff"] = err
            if impl in ALL_VARIANTS or impl == "portable":
                row["best_config"][impl] = best_config(impl, D, causal)
            if not err < 5e-2:  # never time a wrong kernel
                row["errors"][impl] = f"wrong: max |diff| {err:.3g} against SDPA"
                continue
            seconds = bench(fn)
            row[f"{impl}_seconds"], row[f"{impl}_tflops"] = seconds, flops / seconds / 1e12
        if "sdpa_cudnn_seconds" in row:
            for impl in fns:
                if f"{impl}_seconds" in row and impl != "sdpa_cudnn":
                    row[f"{impl}_vs_cudnn"] = row["sdpa_cudnn_seconds"] / row[f"{impl}_seconds"]  # > 1: faster
        last_row_s = time.perf_counter() - t_row
        row["row_seconds"] = last_row_s
        result["rows"].append(row)
        save()
        print(f"{dt_} D={D:3d} causal={causal!s:5} N={N:5d}: " + "  ".join(
            f"{impl} {row[f'{impl}_tflops']:.4g}" + (f" ({row[f'{impl}_vs_cudnn']:.2f}x)" if f"{impl}_vs_cudnn" in row
                                                    else "")
            for impl in fns if f"{impl}_tflops" in row) + f" TFLOP/s  [{last_row_s:.0f} s]"
              + (f"  errors: {row['errors']}" if row["errors"] else ""), flush=True)
        q = k = v = want = None  # free this row's memory (not del: the closures above use the names)
    # registers and spills of every config the autotuners compiled (the readings of lesson 03 name them)
    from kernels.flash_attention import _attn_fwd_tuned
    result["compiled"] = {"tma": compiled_resources(tma._attn_fwd_tma, RESOURCE_KEYS),
                          "portable": compiled_resources(_attn_fwd_tuned, RESOURCE_KEYS) if _attn_fwd_tuned else []}
    if GLUON in variants:   # registers of a warp-specialized kernel: the budget before setmaxnreg moves them
        result["compiled"]["gluon"] = compiled_resources(gluon_fa._attn_fwd_ws, ("CAUSAL", "STAGES"))
    for kernel_name, entries in result["compiled"].items():
        for e in entries:
            if kernel_name == "gluon":   # its tiles are in the descriptor; STAGES is its K/V ring
                print(f"  gluon {e['first_arg'].split(',')[0]}> causal={e.get('CAUSAL')}, {e.get('STAGES')} K/V "
                      f"buffers, {e['num_warps']} warps: {e['n_regs']} registers per thread at launch (before "
                      f"setmaxnreg), {e['n_spills']} bytes spilled")
                continue
            flags = ",".join(k for k in ("ROTATE", "HALF_EXP", "POLY_EXP", "PERSISTENT", "WARP_SPECIALIZE") if e.get(k))
            print(f"  {kernel_name}{'[' + flags + ']' if flags else ''} {e['first_arg']} D={e.get('HEAD_DIM')} "
                  f"causal={e.get('CAUSAL')} {e.get('BLOCK_M')}x{e.get('BLOCK_N')}, {e['num_warps']} warps, "
                  f"{e['num_stages']} stages: {e['n_regs']} registers per thread, {e['n_spills']} bytes spilled")
    save()
    print(f"wrote {out_path} in {result['total_seconds']:.1f} s")
    print_readme_row(out_path)
    return result


if __name__ == "__main__":
    main()
