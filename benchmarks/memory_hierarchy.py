"""Read bandwidth of an L2-resident buffer vs an HBM-sized one, with a Triton kernel (lesson 11, the document's Q4).

A persistent grid of a few programs per SM reads a float32 buffer ``passes`` times (grid-stride loop) and keeps a
running sum per program, so no read can be dropped. A buffer well under the L2 cache (16 MiB; A100 40 MB, H100 and
H200 50 MB of L2) is read from L2 after its first pass; a 2 GiB buffer cannot stay in any cache and comes from HBM.
Bandwidth = bytes read / median time (``triton.testing.do_bench``). The spec-sheet estimates beside which lesson 11
shows the result are in ``course_lib.analysis.memory_hierarchy``; shared memory itself (SRAM) is not measured here.

    python -m benchmarks.memory_hierarchy            # on a GPU: writes benchmarks/results/memory_hierarchy_<gpu>.json
    python -m benchmarks.memory_hierarchy --smoke    # tiny sizes, any machine (the interpreter on a CPU): the machinery
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import course_lib.device  # first: sets TRITON_INTERPRET before triton is imported
import torch
import triton
import triton.language as tl

from course_lib.analysis.memory_hierarchy import GPU_SPECS
from course_lib.device import HAS_GPU

from benchmarks.record import provenance, write

L2_BYTES, HBM_BYTES = 16 * 2**20, 2 * 2**30


@triton.jit
def _read_kernel(x_ptr, partial_ptr, n_elements, PASSES: tl.constexpr, BLOCK: tl.constexpr):
    pid, num_programs = tl.program_id(0), tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(PASSES):                                   # the same bytes again: from L2 when they fit there
        for start in range(pid * BLOCK, n_elements, num_programs * BLOCK):   # grid-stride over the buffer
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n_elements, other=0.0)
    tl.store(partial_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)   # the sum keeps every read alive


def read_sum(x: torch.Tensor, *, passes: int = 1, num_programs: int = 2, block: int = 1024) -> torch.Tensor:
    """Sum of ``passes`` reads of x (float32, contiguous, 1-D) by ``num_programs`` programs: a [num_programs, block]
    tensor of partial sums whose total is ``passes * x.sum()``."""
    if x.dtype != torch.float32 or x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 1-D float32 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    partial = torch.empty(num_programs, block, dtype=torch.float32, device=x.device)
    _read_kernel[(num_programs,)](x, partial, x.numel(), PASSES=passes, BLOCK=block)
    return partial


def measure(size_bytes: int, *, passes: int, num_programs: int, block: int = 1024, reps: int = 20) -> dict:
    """Read bandwidth of a ``size_bytes`` buffer read ``passes`` times (median of ``reps`` runs; CUDA events through
    ``do_bench`` on a GPU, a host clock in the interpreter). Checks the sum against torch's first."""
    x = torch.rand(size_bytes // 4, generator=torch.Generator().manual_seed(0)).to(course_lib.device.DEVICE)
    got, want = read_sum(x, passes=passes, num_programs=num_programs, block=block).sum().item(), passes * x.sum().item()
    assert abs(got - want) <= 1e-3 * abs(want), (got, want)
    fn = lambda: read_sum(x, passes=passes, num_programs=num_programs, block=block)
    if HAS_GPU:
        seconds = triton.testing.do_bench(fn, rep=200, return_mode="median") / 1e3
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
    read = passes * x.numel() * 4
    return dict(size_bytes=x.numel() * 4, passes=passes, bytes_read=read, seconds=seconds, bytes_per_s=read / seconds)


def spec_for(device: str) -> str | None:
    """The ``GPU_SPECS`` entry of a CUDA device name ('NVIDIA H100 80GB HBM3' -> 'H100 SXM5 80GB'), if any."""
    for name in GPU_SPECS:
        model, memory = name.split()[0], name.split()[-1]
        if model in device and memory.removesuffix("GB") in device:
            return name
    return next((name for name in GPU_SPECS if name.split()[0] in device), None)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any machine: checks the machinery")
    parser.add_argument("--out", type=Path, default=None, help="output JSON (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    if not HAS_GPU and not args.smoke:
        print("memory_hierarchy measures GPU caches: run it on a GPU (or --smoke to check the machinery here)")
        return None
    if args.smoke:
        sizes, passes, programs, reps = (64 * 1024, 256 * 1024), (4, 1), 2, 3
    else:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        sizes, passes, programs, reps = (L2_BYTES, HBM_BYTES), (64, 4), 4 * sms, 20
    l2, hbm = (measure(s, passes=p, num_programs=programs, reps=reps) for s, p in zip(sizes, passes))
    result = provenance("memory_hierarchy", "benchmarks.memory_hierarchy", argv, torch.float32, args.smoke,
                        engine=False)
    result.update(smoke=args.smoke, num_programs=programs, l2=l2, hbm=hbm, l2_bytes_per_s=l2["bytes_per_s"],
                  hbm_bytes_per_s=hbm["bytes_per_s"], spec=spec_for(result["device"]))
    if HAS_GPU or args.out:                   # a CPU smoke run is written only where asked
        print("wrote", write(result, "memory_hierarchy", args.out))
    print(f"{result['device']}: L2-resident {l2['bytes_per_s'] / 1e9:,.3g} GB/s, HBM-sized "
          f"{hbm['bytes_per_s'] / 1e9:,.3g} GB/s" + (" (the interpreter: not a bandwidth)" if not HAS_GPU else ""))
    return result


if __name__ == "__main__":
    main()
