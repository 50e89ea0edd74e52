"""Measure this machine's roofline and put real kernels on it (lesson 00).

    python -m benchmarks.roofline            # full run (GPU: < 2 min on an H100)
    python -m benchmarks.roofline --quick    # smaller shapes (CPU: < 60 s)

Measures: peak matmul FLOP/s per dtype (large square GEMMs), copy bandwidth (a copy far larger than the
last-level cache), a GEMM sweep ``[M, K] @ [K, N]`` for one LLaMA-ish projection (K = N = E) from M = 1
(decode: one token per sequence, a GEMV) to M = 4096 (prefill), and the Triton ``kernels.add`` vs
``torch.add`` bandwidth at several sizes. Writes ``benchmarks/results/roofline_<device-slug>.json`` with the
device, versions, date, dtypes, shapes and every number measured; notebooks/00_start_here.ipynb plots it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import time
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton

import kernels
from course_lib.device import DEVICE, HAS_GPU, INTERPRET
from course_lib.analysis.roofline import (RESULTS_DIR, human, matmul_bytes, matmul_flops, matmul_intensity,
                                 measure_copy_bandwidth, measure_matmul_flops, ridge_point, time_fn)


def device_name() -> str:
    if HAS_GPU:
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:  # Linux: the marketing name of the CPU is more telling than "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (safe in a file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def config(quick: bool) -> dict:
    """Shapes and dtypes: real sizes on a GPU, sizes a 2-core CPU finishes in seconds otherwise."""
    if HAS_GPU:
        return dict(
            peak_dtypes=[torch.float32, torch.float16, torch.bfloat16], peak_size=4096 if quick else 8192,
            copy_bytes=2**30, sweep_dtype=torch.bfloat16, E=4096,
            sweep_M=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
            add_sizes=[2**12, 2**16, 2**20, 2**24, 2**27], warmup=5, reps=20 if quick else 50,
        )
    # CPU: fp16 GEMMs have no fast kernel on most CPUs (hence the small size), bf16 often does.
    return dict(
        peak_dtypes=[torch.float32, torch.bfloat16, torch.float16], peak_size=1024 if quick else 2048,
        copy_bytes=256 * 2**20, sweep_dtype=torch.float32, E=2048 if quick else 4096,
        sweep_M=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] + ([] if quick else [2048, 4096]),
        # the interpreter runs each program in Python/numpy: keep the add small
        add_sizes=[2**10, 2**14, 2**17], warmup=1, reps=3 if quick else 5,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    parser.add_argument("--out", type=Path, default=None,
                        help="output JSON (default: benchmarks/results/roofline_<device>.json)")
    args = parser.parse_args(argv)
    cfg = config(args.quick)
    warmup, reps = cfg["warmup"], cfg["reps"]
    t_start = time.perf_counter()
    name = device_name()
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  "
          f"kernels: {'interpreter' if INTERPRET else 'compiled'}", flush=True)

    # 1. Peak matmul FLOP/s: a large square GEMM is as compute-bound as it gets.
    peak = []
    for dtype in cfg["peak_dtypes"]:
        n = cfg["peak_size"] if not (dtype == torch.float16 and not HAS_GPU) else 256
        flops = measure_matmul_flops(n, n, n, dtype, DEVICE, warmup=warmup, reps=reps, flush=False)
        peak.append(dict(dtype=str(dtype).removeprefix("torch."), M=n, N=n, K=n,
                         seconds=matmul_flops(n, n, n) / flops, flops_per_s=flops))
        print(f"peak matmul {dtype} {n}^3: {human(flops, 'FLOP/s')}", flush=True)

    # 2. Copy bandwidth: read + write of a buffer far larger than L2 (GPU) / L3 (CPU).
    bw = measure_copy_bandwidth(cfg["copy_bytes"], DEVICE, warmup=warmup, reps=reps)
    copy = dict(nbytes=cfg["copy_bytes"], bytes_moved=2 * cfg["copy_bytes"],
                seconds=2 * cfg["copy_bytes"] / bw, bytes_per_s=bw)
    print(f"copy bandwidth ({cfg['copy_bytes'] / 2**20:.0f} MiB): {human(bw, 'B/s')}", flush=True)

    # 3. GEMM sweep: decode (small M) to prefill (large M); caches flushed so weights come from DRAM/HBM.
    E, dtype = cfg["E"], cfg["sweep_dtype"]
    bpe = torch.finfo(dtype).bits // 8
    sweep = []
    for M in cfg["sweep_M"]:
        flops = measure_matmul_flops(M, E, E, dtype, DEVICE, warmup=warmup, reps=reps, flush=True)
        seconds = matmul_flops(M, E, E) / flops
        sweep.append(dict(M=M, seconds=seconds, flops_per_s=flops, intensity=matmul_intensity(M, E, E, bpe),
                          bytes_per_s=matmul_bytes(M, E, E, bpe) / seconds))
        print(f"GEMM M={M:5d} K=N={E}: {seconds * 1e6:10.1f} us  {human(flops, 'FLOP/s'):>14}  "
              f"I={sweep[-1]['intensity']:.3g} FLOP/B", flush=True)

    # 4. Our Triton add vs torch's add: 2 loads + 1 store of fp32 per element.
    add = []
    for n in cfg["add_sizes"]:
        x, y = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
        torch.testing.assert_close(kernels.add(x, y), x + y)  # never time a wrong kernel
        t_triton = time_fn(lambda: kernels.add(x, y), warmup=warmup, reps=reps)
        t_torch = time_fn(lambda: torch.add(x, y),  # both allocate their output
                           warmup=warmup, reps=reps)
        moved = 3 * n * x.element_size()
        add.append(dict(n=n, bytes_moved=moved, triton_seconds=t_triton, triton_bytes_per_s=moved / t_triton,
                        torch_seconds=t_torch, torch_bytes_per_s=moved / t_torch))
        print(f"add n={n:>10}: triton {human(moved / t_triton, 'B/s'):>12}  torch {human(moved / t_torch, 'B/s'):>12}",
              flush=True)

    # The roof for the sweep's dtype: the best matmul rate we measured in it (peak GEMM or sweep), and copy bandwidth.
    sweep_name = str(dtype).removeprefix("torch.")
    roof_flops = max([p["flops_per_s"] for p in peak if p["dtype"] == sweep_name] + [p["flops_per_s"] for p in sweep])
    from benchmarks.record import cpu_model, driver_version, git_commit  # record imports this module
    result = dict(
        benchmark="roofline", device=name, device_slug=slug(name),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(), cpu_model=cpu_model(), driver=driver_version(),
        python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda if HAS_GPU else None, kernel_mode="interpreter" if INTERPRET else "compiled",
        quick=args.quick,
        command=" ".join(["python -m benchmarks.roofline", *(argv if argv is not None else sys.argv[1:])]),
        # fp32 matmuls on a GPU run in true fp32 unless TF32 is allowed (torch's default: not allowed)
        allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32) if HAS_GPU else None,
        timing=dict(warmup=warmup, reps=reps, statistic="median",
                    clock="CUDA events" if HAS_GPU else "time.perf_counter",
                    cache="last-level cache flushed before each GEMM-sweep repetition"),
        peak_matmul=peak, copy_bandwidth=copy,
        gemm_sweep=dict(dtype=sweep_name, bytes_per_element=bpe, N=E, K=E, points=sweep),
        vector_add=dict(dtype="float32", block_size=1024, points=add),
        roofline=dict(dtype=sweep_name, peak_flops=roof_flops, peak_bandwidth=bw,
                      ridge_point=ridge_point(roof_flops, bw)),
        total_seconds=time.perf_counter() - t_start,
    )
    out_path = args.out or RESULTS_DIR / f"roofline_{slug(name)}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"ridge point ({sweep_name}): {result['roofline']['ridge_point']:.3g} FLOP/byte; "
          f"wrote {out_path} in {result['total_seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
