"""Which launch config makes the FlashAttention forward fastest at D = 128 (issue 21): every (BLOCK_M, BLOCK_N,
num_warps, num_stages) of a list, fixed (no autotuning), for the portable kernel and the TMA kernel, against cuDNN.

    python -m benchmarks.flash_attention_configs --time-limit 150   # GPU: bf16, D = 128, N = 8k, causal and not
    python -m benchmarks.flash_attention_configs --quick            # smoke run: two configs in the interpreter (CPU)

The Hopper ablation (``benchmarks.flash_attention_hopper``, H100, 2026-12-06) found the TMA loads themselves buy
nothing, while the variant tuned over more configs was the fastest at D = 128: this run separates the config from
the loads. Shapes as the other FlashAttention benchmarks (B = 16k // N, H = 2048 // D). Every config is compiled
first in its own subprocess, 12 at a time (a config that needs more shared memory than the card has fails alone),
checked against SDPA's output, then timed (``triton.testing.do_bench``, median). cuDNN is timed first in each row.
Writes ``benchmarks/results/flash_attention_configs_<device>.json`` (or ``--out``) after every row.
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
from benchmarks.flash_attention import bench, device_name, sdpa, sdpa_backends, slug
from benchmarks.record import git_commit
from course_lib.analysis.roofline import RESULTS_DIR
from course_lib.device import DEVICE, HAS_GPU
from course_lib.model.online_softmax import attention_flops
from kernels import flash_attention_hopper as tma
from kernels.flash_attention import _flash_attention

#: (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on a GPU
CONFIGS = [(128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 4, 2),
           (128, 128, 8, 2), (128, 128, 8, 3), (256, 64, 8, 2), (256, 64, 8, 3), (256, 128, 8, 2)]
IMPLS = ("portable", "tma")


def run(impl: str, cfg: tuple, q, k, v, causal: bool):
    m, n, w, s = cfg
    config = dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
    if impl == "portable":
        return _flash_attention(q, k, v, causal=causal, config=config)
    return tma.flash_attention_hopper(q, k, v, causal=causal, variant=impl, config=config)


def inputs(D: int, N: int, dtype):
    B, H = (max(1, 16384 // N), 2048 // D) if HAS_GPU else (1, 2)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randn(B, H, N, D, device=DEVICE, dtype=dtype, generator=gen) for _ in range(3)]


def probe_all(jobs, D: int, dtype, deadline: float) -> dict:
    """Compile every (impl, config, causal) in its own subprocess, 12 at a time: "ok" or why it failed."""
    def one(job):
        impl, cfg, causal = job
        cmd = [sys.executable, "-m", "benchmarks.flash_attention_configs", "--probe", impl, *map(str, cfg),
               str(int(causal)), str(D), str(dtype).removeprefix("torch.")]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            return job, "failed: timed out"
        tail = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
        return job, "ok" if done.returncode == 0 else f"failed: {tail}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(12, os.cpu_count() or 1)) as pool:
        return dict(pool.map(one, jobs))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--time-limit", type=float, default=150.0, help="seconds after which no new row starts")
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--probe", nargs=8, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.probe:   # impl m n w s causal D dtype: compile one config (at N = 1024) into Triton's cache
        impl, *nums, dtype = args.probe
        m, n, w, s, causal, D = map(int, nums)
        q, k, v = inputs(D, 1024, getattr(torch, dtype))
        run(impl, (m, n, w, s), q, k, v, bool(causal))
        torch.cuda.synchronize()
        return {}
    t0, deadline = time.perf_counter(), time.time() + args.time_limit
    dtype = torch.bfloat16 if HAS_GPU else torch.float16
    D, N = (args.D, args.N) if HAS_GPU else (32, 64)
    configs = CONFIGS if HAS_GPU and not args.quick else [(32, 16, 4, 1), (16, 32, 4, 1)]
    impls = IMPLS if tma.hopper_status() is None else ("portable",)
    name = device_name()
    out = args.out or RESULTS_DIR / f"flash_attention_configs_{slug(name)}.json"
    result = dict(benchmark="flash_attention_configs", device=name, device_slug=slug(name), git_commit=git_commit(),
                  date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                  dtype=str(dtype).removeprefix("torch."), D=D, N=N, impls=list(impls), configs=configs,
                  command=" ".join(["python -m benchmarks.flash_attention_configs", *(argv or sys.argv[1:])]),
                  timing="triton.testing.do_bench median" if HAS_GPU else "time.perf_counter", probe={}, rows=[])
    jobs = [(impl, cfg, causal) for causal in (False, True) for impl in impls for cfg in configs]
    if HAS_GPU:
        result["probe"] = {f"{i} {c} {k}": s for (i, c, k), s in probe_all(jobs, D, dtype, deadline).items()}
    q, k, v = inputs(D, N, dtype)
    cudnn = sdpa_backends().get("sdpa_cudnn") if HAS_GPU else None
    for causal in (False, True):
        if time.time() > deadline:
            break
        flops = attention_flops(q.shape[0], q.shape[1], N, N, D, causal)
        want = sdpa(cudnn, q, k, v, causal) if cudnn else kernels.reference.attention(q, k, v, causal=causal)
        base = bench(lambda: sdpa(cudnn, q, k, v, causal)) if cudnn else None
        row = dict(causal=causal, flops=flops, cudnn_seconds=base, configs=[])
        for impl, cfg, c in jobs:
            if c != causal or time.time() > deadline:
                continue
            cell = dict(impl=impl, config=cfg)
            status = result["probe"].get(f"{impl} {cfg} {c}", "ok")
            if status != "ok":
                cell["error"] = status
            else:
                err = (run(impl, cfg, q, k, v, causal).float() - want.float()).abs().max().item()
                cell["max_abs_diff"] = err
                if err < 5e-2:
                    cell["seconds"] = bench(lambda: run(impl, cfg, q, k, v, causal))
                    cell["tflops"] = flops / cell["seconds"] / 1e12
                    if base:
                        cell["vs_cudnn"] = base / cell["seconds"]
                else:
                    cell["error"] = f"wrong: max |diff| {err:.3g}"
            row["configs"].append(cell)
            print(f"causal={causal!s:5} {impl:8} {cfg}: " + (f"{cell['tflops']:.0f} TFLOP/s"
                  + (f" ({cell['vs_cudnn']:.2f}x cuDNN)" if "vs_cudnn" in cell else "") if "tflops" in cell
                  else cell["error"]), flush=True)
        result["rows"].append(row)
        result["total_seconds"] = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")
    return result


if __name__ == "__main__":
    main()
