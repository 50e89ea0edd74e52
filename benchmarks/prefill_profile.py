"""Where a prefill step's host time goes on a GPU (issue 18): the prefill phase of ``serving_step``'s trace, profiled.

    python -m benchmarks.prefill_profile [--mode FULL_AND_PIECEWISE]   # on a GPU, ~1 min

``benchmarks.serving_step`` measured the prefill phase (the 0.37B LLaMA shape, 128 requests, prompts 64-512, the
first ~21 steps, each with ~2,048 prompt tokens) at ~16-20 ms per step for ~5 ms of kernels, with and without
piecewise CUDA graphs; ``benchmarks.host_prefill`` puts the scheduler's and the input builder's share at ~1 ms on a
CPU. This script says where the rest goes, three ways over the same phase (same engine, same schedule: greedy,
all requests added at once):

1. per step: the host's time in the engine's step (``step_s``; ``run_phases`` steps as generate() does);
2. ``torch.profiler`` with CPU and CUDA activities: the CUDA runtime calls by self time (``cudaStreamSynchronize``
   and ``cudaMemcpyAsync`` to a pageable buffer are the host *waiting* for the GPU; ``cudaLaunchKernel``,
   ``cudaGraphLaunch`` and Triton's launcher are the cost of starting work) and the step's kernels;
3. ``cProfile``: the Python functions by own time and by cumulative time.

Writes ``benchmarks/results/prefill_profile_<device>.json`` (the top rows of each) and prints them.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import course_lib.device  # noqa: F401  (first: the interpreter switch)
import torch

from benchmarks import record
from benchmarks.serving_step import LLAMA_037B, random_model, run_phases, trace
from course_lib.device import HAS_GPU
from course_lib.model.fused import fuse
from course_lib.model.sampling import SamplingParams
from course_lib.serving.engine import LLMEngine


def per_step(engine: LLMEngine, prompts, params) -> dict:
    """Each phase's steps one by one: host seconds inside the step (``perf_counter``, no sync)."""
    def timed(name, run):
        times, step = [], engine._step

        def timed_step(**kwargs):
            t0 = time.perf_counter()
            out = step(**kwargs)
            times.append(time.perf_counter() - t0)
            return out
        engine._step = timed_step
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            run()
        finally:
            del engine._step
        torch.cuda.synchronize()
        return dict(wall_s=time.perf_counter() - t0, step_s=times)
    return run_phases(engine, prompts, params, timed)


def profiled(engine: LLMEngine, prompts, params, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    def phase(name, run):
        if name != "prefill":
            return run()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        rows = [dict(name=e.key, calls=e.count, self_cpu_s=e.self_cpu_time_total / 1e6,
                     cpu_s=e.cpu_time_total / 1e6, device_s=e.self_device_time_total / 1e6)
                for e in prof.key_averages()]
        return dict(by_self_cpu=sorted(rows, key=lambda r: -r["self_cpu_s"])[:top],
                    by_device=sorted(rows, key=lambda r: -r["device_s"])[:top])
    return run_phases(engine, prompts, params, phase)["prefill"]


def python_profile(engine: LLMEngine, prompts, params, top: int) -> dict:
    def phase(name, run):
        if name != "prefill":
            return run()
        prof = cProfile.Profile()
        prof.enable()
        run()
        torch.cuda.synchronize()
        prof.disable()
        stats = pstats.Stats(prof).stats   # (file, line, func) -> (calls, prim calls, tottime, cumtime, callers)
        rows = [dict(func=f"{'/'.join(f.rsplit('/', 2)[-2:])}:{line}({fn})", calls=c[1],
                     own_s=c[2], cumulative_s=c[3]) for (f, line, fn), c in stats.items()]
        return dict(by_own=sorted(rows, key=lambda r: -r["own_s"])[:top],
                    by_cumulative=sorted(rows, key=lambda r: -r["cumulative_s"])[:top])
    return run_phases(engine, prompts, params, phase)["prefill"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="FULL_AND_PIECEWISE", help="LLMEngine's cudagraph_mode")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not HAS_GPU:
        raise SystemExit("this benchmark needs a CUDA GPU")
    result = record.provenance("prefill_profile", "benchmarks.prefill_profile", argv, torch.bfloat16, False)
    model = random_model(LLAMA_037B)
    fuse(model)
    prompts, params = trace(128, 256, model.config.vocab_size)
    engine = LLMEngine(model, max_num_seqs=128, max_num_batched_tokens=2048, cudagraph_mode=args.mode)
    engine.generate(prompts[:8], SamplingParams(max_tokens=8), use_tqdm=False)   # warm-up: compile, capture
    engine.generate(prompts, params, use_tqdm=False)                             # and every capture size
    result.update(mode=args.mode, serving_model="LLaMA 0.37B shape, random weights, bf16, fused kernels",
                  serving_trace="128 requests, prompts uniform in 64-512 tokens, 256 output tokens each, greedy")
    for repeat in range(2):   # the second: nothing left to compile or capture
        result["steps"] = per_step(engine, prompts, params)
        for name, s in result["steps"].items():
            slow = sorted(range(len(s["step_s"])), key=lambda i: -s["step_s"][i])[:5]
            print(f"run {repeat}, {name} phase: {len(s['step_s'])} steps, {s['wall_s'] * 1e3:.1f} ms wall, host in "
                  f"steps {sum(s['step_s']) * 1e3:.1f} ms; slowest steps (index: ms) "
                  + ", ".join(f"{i}: {s['step_s'][i] * 1e3:.1f}" for i in slow), flush=True)
        print("prefill steps' host ms: " + " ".join(f"{t * 1e3:.1f}" for t in result["steps"]["prefill"]["step_s"]))
    result["torch_profiler"] = profiled(engine, prompts, params, args.top)
    print("torch.profiler, by self CPU time (s, calls):")
    for r in result["torch_profiler"]["by_self_cpu"]:
        print(f"  {r['self_cpu_s']:8.4f} {r['calls']:7d}  {r['name'][:90]}")
    print("torch.profiler, by device time:")
    for r in result["torch_profiler"]["by_device"][:15]:
        print(f"  {r['device_s']:8.4f} {r['calls']:7d}  {r['name'][:90]}")
    result["cprofile"] = python_profile(engine, prompts, params, args.top)
    for key in ("by_own", "by_cumulative"):
        print(f"cProfile, {key} (own s, cumulative s, calls):")
        for r in result["cprofile"][key]:
            print(f"  {r['own_s']:8.4f} {r['cumulative_s']:8.4f} {r['calls']:7d}  {r['func'][:90]}")
    path = record.write(result, "prefill_profile", args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
