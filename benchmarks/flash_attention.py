"""FlashAttention forward: our Triton kernel vs torch SDPA (flash and cuDNN backends) vs naive attention (lesson 03).

    python -m benchmarks.flash_attention            # GPU: fp16/bf16, D = 64/128, N = 1k..16k, causal and not (< 5 min)
    python -m benchmarks.flash_attention --quick    # smoke run: tiny shapes in the interpreter on CPU (seconds),
                                                    # 2 shapes on a GPU

Shapes follow FlashAttention's benchmarks: B·N = 16k tokens, Hq = Hkv = 2048 / D heads (model width 2048).
FLOPs = 4·B·H·N²·D, halved when causal. Every implementation is timed in the same run with
``triton.testing.do_bench`` (median, CUDA events), after checking its output against ours. Peak memory
(``torch.cuda.max_memory_allocated`` beyond the inputs) of naive vs flash attention is measured for
B = 1, H = 16, D = 128 fp16 as N grows. Writes ``benchmarks/results/flash_attention_<device-slug>.json``
(device, versions, date, every number) after each measurement, so a run cut short still leaves its data.
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
import torch.nn.functional as F
import triton

import kernels
from kernels.flash_attention import use_hopper_forward
from course_lib.device import DEVICE, HAS_GPU, INTERPRET
from course_lib.model.online_softmax import attention_flops, naive_attention, peak_memory, score_matrix_bytes
from course_lib.analysis.roofline import RESULTS_DIR, time_fn
from benchmarks.record import cpu_model, driver_version, git_commit, print_readme_row


def device_name() -> str:
    return torch.cuda.get_device_name(0) if HAS_GPU else f"CPU {platform.processor() or platform.machine()}"


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (safe in a file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def config(quick: bool) -> dict:
    if HAS_GPU and quick:
        return dict(dtypes=[torch.float16], head_dims=[64], Ns=[1024, 2048], tokens=16384, width=2048,
                    memory_Ns=[1024, 2048], memory_heads=16)
    if HAS_GPU:
        return dict(dtypes=[torch.float16, torch.bfloat16], head_dims=[64, 128], Ns=[1024, 2048, 4096, 8192, 16384],
                    tokens=16384, width=2048, memory_Ns=[1024, 2048, 4096, 8192, 16384], memory_heads=16)
    return dict(dtypes=[torch.float32], head_dims=[32], Ns=[64, 128] if quick else [64, 128, 256],
                tokens=128, width=64, memory_Ns=[64, 128, 256], memory_heads=2)


def sdpa_backends() -> dict:
    """name -> SDPBackend for the torch SDPA backends we compare with (GPU only)."""
    from torch.nn.attention import SDPBackend

    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}


def probe_backends(try_backend) -> dict:
    """name -> "available" or "unavailable: <why>" for each SDPA backend we compare with; ``try_backend(backend)``
    runs it once on a small input (raises RuntimeError where this machine cannot). Without a GPU: none."""
    if not HAS_GPU:
        return {"sdpa_flash": "unavailable: no CUDA GPU", "sdpa_cudnn": "unavailable: no CUDA GPU"}
    status = {}
    for name, backend in sdpa_backends().items():
        try:
            try_backend(backend)
            status[name] = "available"
        except RuntimeError as err:
            status[name] = f"unavailable: {str(err).splitlines()[0][:200]}"
            print(f"{name} is unavailable on this machine, skipped: {status[name]}", flush=True)
    return status


def sdpa(backend, q, k, v, causal):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def bench(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median seconds of fn(): do_bench on a GPU (CUDA events, L2 cleared between runs); perf_counter on CPU."""
    if HAS_GPU:
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3
    return time_fn(fn, warmup=1, reps=2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny shapes (CPU, interpreter) or two shapes (GPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output JSON (default: benchmarks/results/flash_attention_<device>.json)")
    args = parser.parse_args(argv)
    cfg = config(args.quick)
    t_start = time.perf_counter()
    name = device_name()
    out_path = args.out or RESULTS_DIR / f"flash_attention_{slug(name)}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = dict(
        benchmark="flash_attention", device=name, device_slug=slug(name),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(), cpu_model=cpu_model(), driver=driver_version(), python=platform.python_version(),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda if HAS_GPU else None,
        cudnn=torch.backends.cudnn.version() if HAS_GPU else None,
        kernel_mode="interpreter" if INTERPRET else "compiled", quick=args.quick,
        command=" ".join(["python -m benchmarks.flash_attention", *(argv if argv is not None else sys.argv[1:])]),
        timing=dict(tool="triton.testing.do_bench" if HAS_GPU else "time.perf_counter", statistic="median",
                    warmup_ms=25, rep_ms=100),
        shapes=dict(rule=f"B = {cfg['tokens']} // N, Hq = Hkv = {cfg['width']} // D, Sq = Skv = N",
                    flops="4*B*H*N^2*D, halved when causal"),
        backends={}, speed=[], memory=[], total_seconds=None)

    def save():
        result["total_seconds"] = time.perf_counter() - t_start
        # what the autotuner picked, per (SQ_BUCKET, SKV_BUCKET, HEAD_DIM, CAUSAL, RETURN_LSE, dtypes)
        if not INTERPRET:
            from kernels.flash_attention import _attn_fwd_tuned
            result["autotuned"] = {str(key): str(conf) for key, conf in _attn_fwd_tuned.cache.items()}
        out_path.write_text(json.dumps(result, indent=1) + "\n")

    backends = sdpa_backends() if HAS_GPU else {}
    q = torch.randn(1, 16, 256, 128, device=DEVICE, dtype=torch.float16)
    result["backends"] = probe_backends(lambda backend: sdpa(backend, q, q, q, False))
    usable = {b: backend for b, backend in backends.items() if result["backends"][b] == "available"}
    total_mem = torch.cuda.get_device_properties(0).total_memory if HAS_GPU else 2**31

    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  backends {result['backends']}",
          flush=True)
    for dtype in cfg["dtypes"]:
        for D in cfg["head_dims"]:
            for causal in (False, True):
                for N in cfg["Ns"]:
                    B, H = max(1, cfg["tokens"] // N), cfg["width"] // D
                    gen = torch.Generator(device=DEVICE).manual_seed(0)
                    q, k, v = (torch.randn(B, H, N, D, device=DEVICE, dtype=dtype, generator=gen) for _ in range(3))
                    flops = attention_flops(B, H, N, N, D, causal)
                    ours = kernels.flash_attention(q, k, v, causal=causal)  # the first call autotunes
                    row = dict(dtype=str(dtype).removeprefix("torch."), D=D, causal=causal, N=N, B=B, H=H, flops=flops,
                               # which forward kernels.flash_attention's hopper="auto" ran for "ours"
                               ours_forward="tma" if use_hopper_forward(q, None) else "portable")
                    impls = {"ours": lambda: kernels.flash_attention(q, k, v, causal=causal)}
                    impls.update({b: (lambda backend=backend: sdpa(backend, q, k, v, causal))
                                  for b, backend in usable.items()})
                    # naive materializes 2 [B, H, N, N] matrices (+ the softmax's temporaries): only where it fits
                    if 4 * score_matrix_bytes(B, H, N, N, q.element_size()) < 0.5 * total_mem:
                        impls["naive"] = lambda: naive_attention(q, k, v, causal=causal)
                    for impl, fn in impls.items():
                        if impl != "ours":  # never time a wrong kernel: all must agree
                            err = (fn().float() - ours.float()).abs().max().item()
                            row[f"{impl}_max_abs_diff"] = err
                            assert err < 5e-2, f"{impl} and ours differ by {err} at {row}"
                        seconds = bench(fn)
                        row[f"{impl}_seconds"] = seconds
                        row[f"{impl}_tflops"] = flops / seconds / 1e12
                    for b in usable:
                        row[f"ours_vs_{b}"] = row[f"{b}_seconds"] / row["ours_seconds"]  # > 1: ours is faster
                    result["speed"].append(row)
                    save()
                    print(f"{row['dtype']:>8} D={D:3d} causal={causal!s:5} N={N:5d} B={B:2d} H={H:2d}: " + "  ".join(
                        f"{impl} {row[f'{impl}_tflops']:6.1f}" for impl in impls) + " TFLOP/s", flush=True)
                    q = k = v = ours = None  # free this shape's memory (not del: closures above use the names)

    # Peak memory beyond the inputs: naive attention holds O(N²), flash attention O(N) (its output).
    dtype = cfg["dtypes"][0]
    H, D = cfg["memory_heads"], 128 if HAS_GPU else 32
    for N in cfg["memory_Ns"]:
        q, k, v = (torch.randn(1, H, N, D, device=DEVICE, dtype=dtype) for _ in range(3))
        row = dict(dtype=str(dtype).removeprefix("torch."), B=1, H=H, D=D, N=N,
                   score_matrix_bytes=score_matrix_bytes(1, H, N, N, q.element_size()),
                   inputs_bytes=3 * q.numel() * q.element_size(), output_bytes=q.numel() * q.element_size(),
                   flash_peak_bytes=peak_memory(lambda: kernels.flash_attention(q, k, v), DEVICE))
        if 4 * row["score_matrix_bytes"] < 0.5 * total_mem:
            row["naive_peak_bytes"] = peak_memory(lambda: naive_attention(q, k, v), DEVICE)
        for b, backend in usable.items():
            row[f"{b}_peak_bytes"] = peak_memory(lambda: sdpa(backend, q, k, v, False), DEVICE)
        result["memory"].append(row)
        save()
        print(f"memory N={N:5d}: flash {row['flash_peak_bytes'] / 2**20:9.1f} MiB  naive "
              f"{row.get('naive_peak_bytes', float('nan')) / 2**20:9.1f} MiB  (one score matrix "
              f"{row['score_matrix_bytes'] / 2**20:.1f} MiB)", flush=True)
        q = k = v = None  # free this shape's memory (not del: closures above use the names)
    save()
    print(f"wrote {out_path} in {result['total_seconds']:.1f} s")
    print_readme_row(out_path)
    return result


if __name__ == "__main__":
    main()
