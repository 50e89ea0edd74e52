"""Tensor and pipeline parallelism over 2 processes: equality with one process, and what it costs (lessons 08, 09).

    python -m benchmarks.parallel            # gloo on CPU, or NCCL with 2 GPUs
    python -m benchmarks.parallel --quick    # fewer shapes and repetitions (CPU: < 1 min)

Measures, for the shipped model (float32, so equality is strict): TP=2 forward latency and the time
inside its 2·L all-reduces next to one process; ``dist.all_reduce`` time for the message sizes of one
layer (the course model's, and real models' [tokens, E] activations); PP=2 GPipe and 1F1B timelines for
several micro-batch counts with the measured bubble vs (p-1)/(m+p-1). Writes
``benchmarks/results/parallel_<device-slug>.json`` with the device, backend, versions, date and every number.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch

from course_lib import load_tiny
from course_lib.parallel.check import run_pp, run_tp, sample_batch
from course_lib.parallel.comm import time_all_reduce
from course_lib.parallel.launcher import default_backend, launch
from course_lib.parallel.schedule import bubble_formula, max_in_flight, measured_bubble

from benchmarks.roofline import device_name, slug  # same device naming as the other results

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def single_process_forward_s(ids: torch.Tensor, device: torch.device, reps: int) -> float:
    """Median forward time of the unsharded model; on CPU with one thread, like each rank of the gloo runs."""
    model, _ = load_tiny("target", dtype=torch.float32, device=device)
    ids = ids.to(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    with torch.no_grad():
        model(ids)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                        help="default: nccl with 2 GPUs, else gloo")
    parser.add_argument("--out", type=Path, default=None,
                        help="output JSON (default: benchmarks/results/parallel_<device>.json)")
    args = parser.parse_args(argv)
    backend = args.backend or default_backend(2)
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    reps = 5 if args.quick else 20
    t_start = time.perf_counter()
    name = device_name()
    if backend != "nccl":
        name = name.replace(f"({torch.get_num_threads()} threads)", "").strip()
    print(f"device: {name}  backend: {backend}  torch {torch.__version__}")
    on_cpu = backend != "nccl"
    result = dict(device=name, backend=backend, world_size=2, dtype="float32",
                  threads_per_rank=max(1, (os.cpu_count() or 1) // 2) if on_cpu else None,
                  single_process_threads=1 if on_cpu else None, torch=torch.__version__,
                  python=platform.python_version(), cuda=torch.version.cuda, nccl=None, cpu_count=os.cpu_count(),
                  date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), quick=args.quick)
    if backend == "nccl":
        result["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        result["gpus"] = [torch.cuda.get_device_name(i) for i in range(2)]

    # ---- TP=2: equality, forward latency vs one process, time inside the all-reduces
    shapes = [(1, 1), (8, 1), (4, 64)] if args.quick else [(1, 1), (8, 1), (64, 1), (4, 64), (8, 256)]
    result["tp"] = []
    for B, S in shapes:
        ids = sample_batch(B, S)
        cmp = run_tp(2, ids, steps=2, backend=backend, time_comm=True, reps=reps)
        r0 = cmp.ranks[0]
        row = dict(batch=B, seq=S, tokens=B * S, equal=cmp.ok, max_abs_diff=cmp.max_abs_diff,
                   tokens_equal=cmp.tokens_equal,
                   all_reduces=r0["all_reduces"], all_reduces_per_layer=r0["all_reduces"] / r0["num_layers"],
                   bytes_per_all_reduce=r0["sizes"][0], bytes_per_rank=r0["bytes"],
                   tp2_forward_s=max(r["forward_s"] for r in cmp.ranks),
                   tp2_all_reduce_s=max(r["all_reduce_s"] for r in cmp.ranks),
                   single_forward_s=single_process_forward_s(ids, device, reps))
        result["tp"].append(row)
        print(f"TP=2 B={B:3d} S={S:4d}: {cmp.summary().split(': ', 1)[1]}")
        print(f"   forward {row['tp2_forward_s'] * 1e3:8.3f} ms (1 process {row['single_forward_s'] * 1e3:8.3f} ms); "
              f"{row['all_reduces']} all-reduces of {row['bytes_per_all_reduce']:,} B take "
              f"{row['tp2_all_reduce_s'] * 1e3:.3f} ms")

    # ---- all-reduce time for per-layer message sizes
    E_course, E_70b = 256, 8192
    sizes = sorted({t * E_course * 4 for t in (1, 64, 1024)} | {t * E_70b * 2 for t in (1, 16, 256)} |
                   (set() if args.quick else {4096 * E_70b * 2}))
    timings = launch(time_all_reduce, 2, sizes, reps=reps, backend=backend, timeout_s=300)
    result["all_reduce"] = [dict(t, seconds=max(r[i]["seconds"] for r in timings)) for i, t in enumerate(timings[0])]
    for t in result["all_reduce"]:
        print(f"all-reduce {t['bytes']:>12,} B: {t['seconds'] * 1e6:10.1f} us   "
              f"bus bandwidth {t['busbw'] / 1e9:7.2f} GB/s")

    # ---- PP=2: GPipe and 1F1B timelines, bubble vs formula
    B, S = 8, 64
    ids = sample_batch(B, S)
    result["pp"] = []
    for schedule in ("gpipe", "1f1b"):
        for m in ([1, 2, 4, 8]):
            cmp = run_pp(2, ids, m, schedule=schedule, steps=2, backend=backend, reps=3 if args.quick else 10)
            events = [e for r in cmp.ranks for e in r["events"]]
            row = dict(schedule=schedule, microbatches=m, batch=B, seq=S, equal=cmp.ok, max_abs_diff=cmp.max_abs_diff,
                       tokens_equal=cmp.tokens_equal, forward_s=cmp.ranks[0]["forward_s"],
                       bubble_measured=measured_bubble(events), bubble_formula=bubble_formula(2, m),
                       max_in_flight=max_in_flight(events), events=events)
            result["pp"].append(row)
            print(f"PP=2 {schedule:5s} m={m}: {'equal' if cmp.ok else 'DIFFERENT'}, "
                  f"forward {row['forward_s'] * 1e3:7.2f} ms, "
                  f"bubble {row['bubble_measured']:.1%} (formula {row['bubble_formula']:.1%}), "
                  f"in flight <= {row['max_in_flight']}")
    result["pp_single_forward_s"] = single_process_forward_s(ids, device, reps)
    result["all_equal"] = all(r["equal"] for r in result["tp"] + result["pp"])
    result["seconds"] = time.perf_counter() - t_start
    out = args.out or RESULTS_DIR / f"parallel_{slug(name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"all equal: {result['all_equal']}; wrote {out} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["all_equal"] else 1)
