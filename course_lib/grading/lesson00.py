"""Checks of lesson 00 (GPUs and the roofline): arithmetic intensity, the roofline bound, and a first Triton kernel.

Each check runs the learner's function on edge cases first, then on random cases (fixed seed), smallest
first, and stops at the first failure with the case, expected vs got, and a hint aimed at the usual mistake.
"""
from __future__ import annotations

import math
import random

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton

from course_lib.device import DEVICE
from course_lib.grading.core import Checker, CheckResult
from course_lib.analysis.roofline import H100_SXM, attainable_flops, bound, matmul_intensity
from course_lib.grading.kernels import check_is_kernel, launch

# Two machines to test against: the H100 datasheet and a laptop-class CPU (~200 GFLOP/s, ~40 GB/s).
# A third machine has its ridge far above the H100's, so that an answer with the H100's ridge (295) built in fails.
_MACHINES = {"H100 (989 TFLOP/s, 3.35 TB/s)": (H100_SXM.peak_flops, H100_SXM.hbm_bandwidth),
             "CPU (200 GFLOP/s, 40 GB/s)": (200e9, 40e9),
             "a future accelerator (2 PFLOP/s, 2 TB/s: ridge 1000)": (2e15, 2e12)}


def _diagnose(got, candidates: dict[str, float], default: str) -> str:
    """The hint of the first known mistake whose value matches `got`, else `default`."""
    if isinstance(got, (int, float)) and not isinstance(got, bool):
        for hint, value in candidates.items():
            if math.isclose(got, value, rel_tol=1e-6):
                return hint
    return default


def check_matmul_intensity(student_fn) -> CheckResult:
    """matmul_intensity(M, N, K, bytes_per_element) == 2·M·N·K / ((M·K + K·N + M·N) · bytes_per_element)."""
    rng = random.Random(0)
    cases = [(1, 1, 1, 4), (1, 64, 64, 2), (2, 3, 5, 4), (1, 4096, 4096, 2), (16, 4096, 4096, 2),
             (512, 4096, 4096, 2), (4096, 4096, 4096, 1), (1, 4096, 4096, 0.5)]
    cases += [(rng.randint(1, 8192), rng.randint(1, 8192), rng.randint(1, 8192), rng.choice([1, 2, 4]))
              for _ in range(6)]
    with Checker("matmul_intensity", points=2) as c:
        for M, N, K, b in cases:
            got = student_fn(M, N, K, b)
            flops = 2 * M * N * K
            hint = _diagnose(got, {
                "you counted M·N·K FLOPs: each of the K terms of an output is a multiply AND an add, so 2·M·N·K":
                    M * N * K / ((M * K + K * N + M * N) * b),
                "you forgot to count writing the output C [M, N] (M·N elements) in the bytes moved":
                    flops / ((M * K + K * N) * b),
                "you counted elements, not bytes: multiply the element count by bytes_per_element":
                    flops / (M * K + K * N + M * N),
            }, "FLOPs = 2·M·N·K; bytes = (M·K + K·N + M·N) · bytes_per_element (read A and B once, write C once)")
            c.check_close(got, matmul_intensity(M, N, K, b), rtol=1e-6, atol=0, hint=hint,
                          case=f"M={M}, N={N}, K={K}, bytes_per_element={b}")
    return c.result


def check_attainable_flops(student_fn) -> CheckResult:
    """attainable_flops(intensity, peak_flops, peak_bandwidth) == min(peak_flops, intensity · peak_bandwidth)."""
    rng = random.Random(1)
    cases = []
    for name, (peak, bw) in _MACHINES.items():  # below, at and above the ridge of each machine
        cases += [(name, i, peak, bw) for i in (1 / 12, 1.0, peak / bw / 2, peak / bw, 4 * peak / bw, 1e4)]
    cases += [("random", 10 ** rng.uniform(-2, 4), 10 ** rng.uniform(10, 15), 10 ** rng.uniform(10, 13))
              for _ in range(8)]
    with Checker("attainable_flops", points=1) as c:
        for name, i, peak, bw in cases:
            got = student_fn(i, peak, bw)
            hint = _diagnose(got, {
                "the roofline is the MINIMUM of the two roofs: a kernel cannot beat either limit": max(peak, i * bw),
                "left of the ridge point memory limits you: bytes/s × FLOP/byte = intensity · peak_bandwidth": peak,
                "right of the ridge point the compute roof caps you at peak_flops": i * bw,
            }, "attainable FLOP/s = min(peak_flops, intensity · peak_bandwidth)")
            c.check_close(got, attainable_flops(i, peak, bw), rtol=1e-9, atol=0, hint=hint,
                          case=f"{name}: intensity={i:.4g} FLOP/B, peak_flops={peak:.4g} FLOP/s, "
                               f"peak_bandwidth={bw:.4g} B/s")
    return c.result


def check_bound(student_fn) -> CheckResult:
    """bound(intensity, peak_flops, peak_bandwidth) is "memory" left of the ridge point, else "compute"."""
    rng = random.Random(2)
    kernels = [("vector add, fp32", 1 / 12), ("GEMV (decode, B=1), fp16", matmul_intensity(1, 4096, 4096, 2)),
               ("GEMM M=64, fp16", matmul_intensity(64, 4096, 4096, 2)),
               ("GEMM M=4096 (prefill), fp16", matmul_intensity(4096, 4096, 4096, 2))]
    cases = [(f"{k} on {m}", i, *roofs) for m, roofs in _MACHINES.items() for k, i in kernels]
    cases += [(f"exactly at the ridge point of {m}", roofs[0] / roofs[1], *roofs) for m, roofs in _MACHINES.items()]
    cases += [("random", 10 ** rng.uniform(-2, 4), 10 ** rng.uniform(10, 15), 10 ** rng.uniform(10, 13))
              for _ in range(10)]
    with Checker("bound", points=1) as c:
        for name, i, peak, bw in cases:
            got = student_fn(i, peak, bw)
            want = bound(i, peak, bw)
            ridge = peak / bw
            if got not in ("memory", "compute"):
                hint = 'return exactly the string "memory" or "compute" (lower case)'
            elif i == ridge:
                hint = 'at exactly the ridge point both roofs meet; by convention return "compute"'
            else:
                hint = (f"the ridge point is peak_flops / peak_bandwidth = {ridge:.4g} FLOP/B; an intensity "
                        f"{'below' if i < ridge else 'above'} it is limited by {want}")
            c.check_equal(got, want, hint=hint, case=f"{name}: intensity={i:.4g} FLOP/B, "
                          f"peak_flops={peak:.4g} FLOP/s, peak_bandwidth={bw:.4g} B/s (ridge {ridge:.4g})")
    return c.result


# ---------------------------------------------------------------- the Triton exercise
_BLOCK_SIZE = 128


def check_scale_add_kernel(kernel) -> CheckResult:
    """A Triton kernel ``(x_ptr, y_ptr, out_ptr, a, n_elements, BLOCK_SIZE)`` computing out = a·x + y.

    Launched with BLOCK_SIZE=128 on n = 1 ... 4099 elements (several not a multiple of 128), and with
    BLOCK_SIZE=256, in float32 and float16. In the interpreter every load and store is checked before it runs: one past
    ``x[n-1]`` or ``out[n-1]`` (a missing mask) fails the case, naming the tensor and the element. Compiled on a GPU,
    each tensor is followed in memory by a guard region where a store past ``out[n-1]`` is caught instead.
    """
    gen = torch.Generator().manual_seed(3)
    # (n, a, BLOCK_SIZE): n below, at, just above and far above a block; a second BLOCK_SIZE catches a constant 128
    cases = [(1, 2.0, 128), (7, -0.5, 128), (128, 3.0, 128), (129, 1.0, 128), (200, 1.5, 128), (1000, -2.25, 128),
             (4099, 0.75, 128), (300, 1.25, 256), (256, -1.0, 256)]
    with Checker("scale_add_kernel", points=3, timeout_s=120) as c:
        check_is_kernel(c, kernel, "check_scale_add_kernel(_scale_add_kernel)")
        for dtype in (torch.float32, torch.float16):
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
            for n, a, block in cases:
                # x, y and out are the first n elements of longer buffers; the rest is the guard region.
                x_buf = torch.randn(n + block, generator=gen).to(dtype=dtype, device=DEVICE)
                y_buf = torch.randn(n + block, generator=gen).to(dtype=dtype, device=DEVICE)
                out_buf = torch.full((n + block,), float("nan"), dtype=dtype, device=DEVICE)
                x, y, out = x_buf[:n], y_buf[:n], out_buf[:n]
                grid = (triton.cdiv(n, block),)
                c.case = case = f"n={n}, a={a}, dtype={dtype}, BLOCK_SIZE={block}, grid={grid}"
                launch(kernel, grid, x, y, out, a, n, BLOCK_SIZE=block,
                       exercise="Exercise: write the body of _scale_add_kernel",
                       bounds_hint="the last program's block runs past n: build mask = offsets < n_elements and pass "
                                   "mask=mask to every tl.load and tl.store")
                overwritten = int((~torch.isnan(out_buf[n:])).sum())
                c.check(overwritten == 0, case=case, expected="nothing written after out[n-1]",
                        got=f"{overwritten} element(s) past the end of out were overwritten",
                        hint="the last program's block runs past n: build mask = offsets < n_elements and pass "
                             "mask=mask to every tl.load and tl.store")
                want = (a * x.float() + y.float()).to(dtype)  # fp32 math, rounded once, as the kernel should
                bad = ~torch.isclose(out.float(), want.float(), **tol)
                first_bad = int(torch.nonzero(bad)[0]) if bad.any() else -1
                written = int((~torch.isnan(out)).sum())
                if block != _BLOCK_SIZE and written != n:
                    hint = (f"{n - written} element(s) of out were never written with BLOCK_SIZE={block}: use the "
                            "BLOCK_SIZE argument (tl.arange(0, BLOCK_SIZE)), never a constant block size")
                elif first_bad >= block:
                    hint = ("program 0 looks right but later blocks are wrong: program pid must start at "
                            "pid * BLOCK_SIZE (pid = tl.program_id(axis=0))")
                else:
                    hint = "out = a * x + y elementwise: load x and y at the block's offsets, store a * x + y to out"
                c.check_close(out, want, case=case, hint=hint, **tol)
    return c.result
