"""Which launch config makes a FlashAttention kernel fastest at D = 128 (issues 20, 21): every (BLOCK_M, BLOCK_N,
num_warps, num_stages) of a list, fixed (no autotuning), against cuDNN: the forward (our portable kernel and the
TMA kernel), or one of the backward's two kernels (``--kernel dkdv``: dK and dV; ``--kernel dq``), or the
backward's fused dK/dV kernel that adds dQ with fp32 atomics (``--kernel dkdv_dq``: ``dq_mode="atomic"``, a whole
backward, so its timed region includes zeroing the fp32 dQ buffer and casting it). Every backward row's time
includes the Δ preprocessing pass too (one ``flash_attention_backward`` call).

    python -m benchmarks.flash_attention_configs --time-limit 150   # GPU: bf16, D = 128, N = 8k, causal and not
    python -m benchmarks.flash_attention_configs --kernel dkdv      # the backward's dK/dV kernel, its configs
    python -m benchmarks.flash_attention_configs --kernel dkdv_dq   # dK/dV with atomic dQ: vs cuDNN's backward
    python -m benchmarks.flash_attention_configs --quick            # smoke run: two configs in the interpreter (CPU)

The Hopper ablation (``benchmarks.flash_attention_hopper``, H100, 2026-12-06) found the TMA loads themselves buy
nothing, while the variant tuned over more configs was the fastest at D = 128: this run separates the config from
the loads. Shapes as the other FlashAttention benchmarks (B = 16k // N, H = 2048 // D). Every config is compiled
first in its own subprocess, 12 at a time (a config that needs more shared memory than the card has fails alone),
checked against SDPA's output, then timed (``triton.testing.do_bench``, median). cuDNN is timed first in each row.
For a backward kernel the baseline is cuDNN's whole backward (``out.backward``, minus nothing: an upper bound on
the share one kernel may take) and each config's gradients are checked against SDPA's before it is timed. Writes
``benchmarks/results/flash_attention_configs_<device>.json`` (``..._<kernel>_<device>.json`` for a backward kernel,
or ``--out``) after every row.
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
from kernels.flash_attention_bwd import flash_attention_backward

#: (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on a GPU
CONFIGS = [(128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 4, 2),
           (128, 128, 8, 2), (128, 128, 8, 3), (256, 64, 8, 2), (256, 64, 8, 3), (256, 128, 8, 2)]
IMPLS = ("portable", "tma")
#: the backward's kernels: dK/dV programs own BLOCK_N keys and stream BLOCK_M queries, dQ programs the other way round
BWD_CONFIGS = {
    "dkdv": [(32, 128, 4, 2), (32, 128, 4, 3), (32, 128, 4, 4), (32, 128, 4, 5), (32, 128, 8, 3), (64, 128, 4, 2),
             (64, 128, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 3), (32, 64, 4, 5), (64, 64, 4, 3),
             (16, 128, 4, 3), (16, 128, 4, 5)],
    "dq": [(128, 32, 4, 2), (128, 32, 4, 3), (128, 32, 4, 5), (128, 32, 8, 3), (128, 64, 4, 2), (128, 64, 4, 3),
           (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3), (64, 32, 4, 5), (64, 64, 4, 3), (128, 16, 4, 3),
           (128, 16, 4, 5)],
    # DKDV_CONFIGS' and the tuned dkdv's neighbours, fewer stages (the fp32 dQ tile adds registers), 128 x 128
    "dkdv_dq": [(64, 128, 8, 3), (64, 128, 8, 2), (64, 128, 4, 3), (32, 128, 8, 3), (32, 128, 4, 3),
                (32, 128, 4, 2), (32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3), (128, 128, 8, 3)],
}
#: what each backward entry computes: flash_attention_backward's ``needs`` and ``dq_mode``
BWD_NEEDS = {"dkdv": ((False, True, True), "separate"), "dq": ((True, False, False), "separate"),
             "dkdv_dq": ((True, True, True), "atomic")}


def run(impl: str, cfg: tuple, q, k, v, causal: bool, saved=None):
    """One launch of ``impl`` with a fixed config: the forward's output, or a backward kernel's gradients (``saved``:
    out, lse and dO of the forward, from ``forward_state``)."""
    m, n, w, s = cfg
    config = dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
    if impl in BWD_CONFIGS:
        out, lse, do = saved
        needs, dq_mode = BWD_NEEDS[impl]
        grads = flash_attention_backward(do, q, k, v, out, lse, causal=causal, sm_scale=q.shape[-1] ** -0.5,
                                         needs=needs, config=config, dq_mode=dq_mode)
        return torch.cat([g.flatten() for g in grads if g is not None])
    if impl == "portable":
        return _flash_attention(q, k, v, causal=causal, config=config)
    return tma.flash_attention_hopper(q, k, v, causal=causal, variant=impl, config=config)


def forward_state(q, k, v, causal: bool):
    """(out, lse, dO) for the backward kernels: our forward's output and log-sum-exp, a random upstream gradient."""
    out, lse = _flash_attention(q, k, v, causal=causal, return_lse=True)
    do = torch.randn(q.shape, device=q.device, dtype=q.dtype, generator=torch.Generator(q.device).manual_seed(1))
    return out, lse, do


def reference(impl: str, q, k, v, causal: bool, saved, backend):
    """What ``run`` must give: the forward's output, or the gradients one backward kernel computes (SDPA's, where
    a backend runs, else plain torch's)."""
    if impl not in BWD_CONFIGS:
        return sdpa(backend, q, k, v, causal) if backend else kernels.reference.attention(q, k, v, causal=causal)
    x = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with torch.enable_grad():
        o = sdpa(backend, *x, causal) if backend else kernels.reference.attention(*x, causal=causal)
        o.backward(saved[2])
    grads = [t.grad for t, need in zip(x, BWD_NEEDS[impl][0]) if need]   # in run's order: dq, dk, dv
    return torch.cat([g.flatten() for g in grads])


def cudnn_seconds(kernel: str, q, k, v, causal: bool, saved, backend) -> float | None:
    """cuDNN's time for what ``kernel`` computes: its forward, or its whole backward (for a backward kernel)."""
    if not backend:
        return None
    if kernel == "forward":
        return bench(lambda: sdpa(backend, q, k, v, causal))
    x = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with torch.enable_grad():
        o = sdpa(backend, *x, causal)
    return bench(lambda: torch.autograd.grad(o, x, saved[2], retain_graph=True))


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
    p.add_argument("--kernel", choices=["forward", *BWD_CONFIGS], default="forward")
    p.add_argument("--probe", nargs=8, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.probe:   # impl m n w s causal D dtype: compile one config (at N = 1024) into Triton's cache
        impl, *nums, dtype = args.probe
        m, n, w, s, causal, D = map(int, nums)
        q, k, v = inputs(D, 1024, getattr(torch, dtype))
        saved = forward_state(q, k, v, bool(causal)) if impl in BWD_CONFIGS else None
        run(impl, (m, n, w, s), q, k, v, bool(causal), saved)
        torch.cuda.synchronize()
        return {}
    t0, deadline = time.perf_counter(), time.time() + args.time_limit
    dtype = torch.bfloat16 if HAS_GPU else torch.float16
    D, N = (args.D, args.N) if HAS_GPU else (32, 64)
    backward = args.kernel != "forward"
    configs = (BWD_CONFIGS[args.kernel] if backward else CONFIGS) if HAS_GPU and not args.quick else \
        [(32, 16, 4, 1), (16, 32, 4, 1)]
    impls = (args.kernel,) if backward else IMPLS if tma.hopper_status() is None else ("portable",)
    # FLOPs of what the kernel computes, in units of 2·B·H·N²·D (one matmul over all scores): the forward 2 matmuls;
    # dK/dV 4 (S recomputed, dV, dP, dK); dQ 3 (S recomputed, dP, dQ); dK/dV with atomic dQ 5
    matmuls = {"forward": 2, "dkdv": 4, "dq": 3, "dkdv_dq": 5}[args.kernel]
    name = device_name()
    stem = "flash_attention_configs" + (f"_{args.kernel}" if backward else "")
    out = args.out or RESULTS_DIR / f"{stem}_{slug(name)}.json"
    result = dict(benchmark="flash_attention_configs", kernel=args.kernel, device=name, device_slug=slug(name),
                  git_commit=git_commit(),
                  date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                  dtype=str(dtype).removeprefix("torch."), D=D, N=N, impls=list(impls), configs=configs,
                  baseline="cuDNN's " + ("forward" if not backward else "whole backward (vs_cudnn: its time / this "
                                         "kernel's; " + ("a whole backward too" if args.kernel == "dkdv_dq" else
                                                         "the backward needs both kernels") + ")"),
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
        flops = attention_flops(q.shape[0], q.shape[1], N, N, D, causal) * matmuls / 2
        saved = forward_state(q, k, v, causal) if backward else None
        want = reference(impls[0], q, k, v, causal, saved, cudnn)
        base = cudnn_seconds(args.kernel, q, k, v, causal, saved, cudnn)
        # outputs are O(1); gradients grow with N: 2% of the largest one (bf16 rounding of SDPA's and ours)
        tolerance = 2e-2 * want.abs().max().item() if backward else 5e-2
        row = dict(causal=causal, flops=flops, cudnn_seconds=base, configs=[])
        for impl, cfg, c in jobs:
            if c != causal or time.time() > deadline:
                continue
            cell = dict(impl=impl, config=cfg)
            status = result["probe"].get(f"{impl} {cfg} {c}", "ok")
            if status != "ok":
                cell["error"] = status
            else:
                err = (run(impl, cfg, q, k, v, causal, saved).float() - want.float()).abs().max().item()
                cell["max_abs_diff"] = err
                if err < tolerance:
                    cell["seconds"] = bench(lambda: run(impl, cfg, q, k, v, causal, saved))
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
