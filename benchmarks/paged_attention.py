"""Paged-attention decode on a GPU: correctness at real shapes, and K/V bytes read per second vs torch SDPA (lesson 02).

    python -m benchmarks.paged_attention            # GPU: < 4 min on an H100/H200
    python -m benchmarks.paged_attention --tune     # also sweep tile/warp/stage configs at three key shapes
    python -m benchmarks.paged_attention --splits   # also sweep num_splits x BLOCK_N at batch 1 and 4 (issue 21)
    python -m benchmarks.paged_attention --quick    # CPU smoke test (interpreter, tiny shapes): seconds

Shapes: a LLaMA-3-8B-like attention layer, Hq = 32, Hkv = 8, D = 128, block size P = 16, batch up to 256,
context up to 32k, fp16 and bf16. For each (batch, context) the *same* K/V is stored twice: paged, in blocks
scattered at random over the cache (as after hours of serving), and contiguous ``[B, Hkv, L, D]`` for
``torch.nn.functional.scaled_dot_product_attention`` (enable_gqa, its fastest backend that runs). Bandwidth =
K/V bytes read / time (q and the output are < 0.1% of the traffic). Targets: batch 64, context 4k: paged
>= 0.85x SDPA's bandwidth; batch 1, context 32k: split-K >= 3x the unsplit kernel. Writes
``benchmarks/results/paged_attention_<device-slug>.json`` with device, versions, date and every number.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import torch.nn.functional as F
import triton

import kernels
import kernels.paged_attention as pa
import kernels.reference as ref
from course_lib.device import DEVICE, HAS_GPU, INTERPRET
from course_lib.analysis.roofline import RESULTS_DIR, human, measure_copy_bandwidth, time_fn

from benchmarks.roofline import device_name, slug  # same device naming as the roofline benchmark
from benchmarks.record import cpu_model, driver_version, git_commit, print_readme_row

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def make_inputs(B, lens, Hq, Hkv, D, P, dtype, seed=0):
    """q, paged caches (blocks in random order), block tables, context lengths."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    max_blocks = max(-(-L // P) for L in lens)
    N = B * max_blocks
    k_cache = torch.randn(N, P, Hkv, D, generator=gen, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(N, P, Hkv, D, generator=gen, device=DEVICE, dtype=dtype)
    tables = torch.randperm(N, generator=gen, device=DEVICE).view(B, max_blocks).to(torch.int32)
    q = torch.randn(B, Hq, D, generator=gen, device=DEVICE, dtype=dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def contiguous_kv(k_cache, v_cache, tables, L):
    """The same K/V as [B, Hkv, L, D] contiguous tensors (what a max-length preallocated cache holds)."""
    B = tables.shape[0]
    N, P, Hkv, D = k_cache.shape
    k = k_cache[tables.long()].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2).contiguous()
    v = v_cache[tables.long()].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2).contiguous()
    return k, v


def sdpa_backends():
    """(name, context manager factory) of the SDPA backends to try; the fastest that runs is the baseline."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # very old torch: only the default dispatch
        return [("default", None)]
    return [("default", None), ("flash", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)),
            ("efficient", lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)),
            ("cudnn", lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION))]


def capture(fn, *, report: bool = False):
    """fn's work as a CUDA graph's replay; None on CPU or where the capture fails (said so with ``report``)."""
    if not HAS_GPU:
        return None
    try:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as err:
        if report:
            print(f"(CUDA graph capture failed: {type(err).__name__}: {str(err)[:200]}; eager timing only)",
                  flush=True)
        torch.cuda.synchronize()
        return None


def graph_time(fn, warmup, reps):
    """Median GPU time of fn replayed from a CUDA graph: no Python or launch overhead, as serving engines run
    decode steps (vLLM, SGLang capture them in CUDA graphs). None on CPU or if the capture fails."""
    replay = capture(fn, report=True)
    return None if replay is None else time_fn(replay, warmup=warmup, reps=reps, flush=True)


def replay_or_call(fn):
    """A CUDA graph's replay of fn, or fn itself (CPU, failed capture)."""
    return capture(fn) or fn


def interleaved_times(replays: dict, warmup: int, reps: int, rounds: int) -> dict:
    """{name: [median seconds of each round]}: every call (a ``replay_or_call``), ``rounds`` times in turn, the
    order rotated each round. Two calls timed minutes apart differ by up to ~10% at tens of microseconds (the same
    plan timed twice in one H100 run: 64 and 71 us); taken in turn, both see the same clocks."""
    names = list(replays)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_fn(replays[name], warmup=warmup, reps=reps, flush=True))
    return times


def best_time(fn, warmup, reps):
    """(seconds, eager seconds, mode): CUDA-graph time when it can be measured, else the eager per-call time."""
    eager = time_fn(fn, warmup=warmup, reps=reps, flush=True)
    graph = graph_time(fn, warmup, reps)
    return (graph, eager, "cuda_graph") if graph is not None else (eager, eager, "eager")


def time_sdpa(q4, k, v, warmup, reps):
    """Best time over the SDPA backends that run: (seconds, eager seconds, backend, {backend: seconds}, best call)."""
    results, eager, calls = {}, {}, {}
    for name, ctx in sdpa_backends() if HAS_GPU else [("default", None)]:
        def call(ctx=ctx):
            if ctx is None:
                return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
            with ctx():
                return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
        try:
            call()
        except Exception:  # this backend does not support the shape / GQA / dtype
            continue
        results[name], eager[name], _ = best_time(call, warmup, reps)
        calls[name] = call
    best = min(results, key=results.get)
    return results[best], eager[best], best, results, calls[best]


def config(quick: bool) -> dict:
    if quick or not HAS_GPU:   # the interpreter: tiny shapes, just to prove the script runs
        return dict(Hq=4, Hkv=2, D=16, P=8, dtypes=[torch.float16], warmup=1, reps=2, rounds=2, sweep_rounds=2,
                    correctness=[(2, 40, 8, torch.float32), (1, 100, 16, torch.float16)],
                    sweep=[(1, 64), (2, 64)], split=(1, 512), key=(2, 64), tune=[(2, 64)])
    return dict(Hq=32, Hkv=8, D=128, P=16, dtypes=[torch.float16, torch.bfloat16], warmup=3, reps=20,
                rounds=7, sweep_rounds=3,
                correctness=[(256, 1024, 16, torch.float16), (64, 4096, 16, torch.bfloat16),
                             (1, 32768, 16, torch.float16), (1, 32768, 16, torch.bfloat16),
                             (8, 8192, 8, torch.bfloat16), (16, 2048, 32, torch.float16), (3, 1000, 8, torch.float16)],
                sweep=[(1, 1024), (1, 4096), (1, 32768), (4, 8192), (16, 4096), (32, 4096), (64, 1024), (64, 4096),
                       (128, 4096), (256, 1024), (256, 4096)],
                split=(1, 32768), key=(64, 4096),
                # --tune: the key shapes and the one below 90% of the copy bandwidth at batch >= 64 (issue 21)
                tune=[(64, 4096), (1, 32768), (64, 1024)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--tune", action="store_true",
                        help="sweep BLOCK_N / num_warps / num_stages at three key shapes")
    parser.add_argument("--splits", action="store_true",
                        help="sweep num_splits (and BLOCK_N) at the small-batch shapes, against SDPA (issue 21)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output JSON (default: benchmarks/results/paged_attention_<device>.json)")
    args = parser.parse_args(argv)
    cfg = config(args.quick)
    Hq, Hkv, D, P, warmup, reps = cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["P"], cfg["warmup"], cfg["reps"]
    t_start = time.perf_counter()
    name = device_name()
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  "
          f"kernels: {'interpreter' if INTERPRET else 'compiled'}  Hq={Hq} Hkv={Hkv} D={D}", flush=True)

    # 1. Correctness at real shapes: ragged lengths (not multiples of the block), auto / unsplit / forced split.
    correctness = []
    for B, L, bs, dtype in cfg["correctness"]:
        lens = [max(1, L - 13 * b) for b in range(B)]
        inputs = make_inputs(B, lens, Hq, Hkv, D, bs, dtype, seed=B + L)
        want = ref.paged_attention_decode(*inputs).float()
        for splits in (None, 1, 8):
            got = kernels.paged_attention_decode(*inputs, num_splits=splits).float()
            err = (got - want).abs().max().item()
            tol = TOL[dtype] * (1 + want.abs().max().item())
            correctness.append(dict(B=B, max_context=L, block_size=bs, dtype=str(dtype)[6:],
                                    num_splits=splits or "auto", max_abs_error=err, tolerance=tol))
            assert err <= tol, f"paged attention is wrong at B={B}, L={L}, P={bs}, {dtype}, splits={splits}: {err}"
        print(f"correct: B={B:3d} L<={L:5d} P={bs:2d} {str(dtype)[6:]:>8} (auto, unsplit, 8 splits)", flush=True)
        del inputs

    # 2. Bandwidth: paged kernel vs SDPA on the same K/V, contiguous.
    copy_bw = measure_copy_bandwidth(2**30 if HAS_GPU else 2**24, warmup=2, reps=5)
    print(f"copy bandwidth (read + write): {human(copy_bw, 'B/s')}", flush=True)
    points = []
    for dtype in cfg["dtypes"]:
        for B, L in cfg["sweep"]:
            if dtype != cfg["dtypes"][0] and (B, L) not in (cfg["key"], cfg["split"], (256, 4096), (1, 4096)):
                continue   # the second dtype at a few points only (time budget)
            q, kc, vc, tables, lens = make_inputs(B, [L] * B, Hq, Hkv, D, P, dtype, seed=L)
            k, v = contiguous_kv(kc, vc, tables, L)
            kv_bytes = 2 * B * L * Hkv * D * kc.element_size()
            splits = pa.choose_num_splits(B, Hkv, L, pa._num_sms(q.device))
            t_paged_first, t_paged_eager, mode = best_time(
                lambda: kernels.paged_attention_decode(q, kc, vc, tables, lens, max_context_len=L, validate=False),
                warmup, reps)
            t_sdpa, t_sdpa_eager, backend, all_sdpa, sdpa_call = time_sdpa(q[:, :, None], k, v, warmup, reps)
            out_sdpa = sdpa_call()[:, :, 0]
            out_paged = kernels.paged_attention_decode(q, kc, vc, tables, lens)
            err = (out_paged.float() - out_sdpa.float()).abs().max().item()
            # The ratio: the two (the paged kernel, SDPA's fastest backend) timed in turn, cfg["rounds"] rounds;
            # the median of the rounds' ratios, and their range
            paged_call = lambda: kernels.paged_attention_decode(q, kc, vc, tables, lens, max_context_len=L,
                                                                validate=False)
            turns = interleaved_times(dict(paged=replay_or_call(paged_call), sdpa=replay_or_call(sdpa_call)), warmup,
                                      reps, cfg["rounds"])
            ratios = [s / p for s, p in zip(turns["sdpa"], turns["paged"])]
            t_paged, t_sdpa = statistics.median(turns["paged"]), statistics.median(turns["sdpa"])
            points.append(dict(B=B, context=L, dtype=str(dtype)[6:], kv_bytes=kv_bytes, num_splits=splits,
                               timing_mode=mode, paged_seconds=t_paged, paged_bytes_per_s=kv_bytes / t_paged,
                               sdpa_seconds=t_sdpa, sdpa_bytes_per_s=kv_bytes / t_sdpa, sdpa_backend=backend,
                               paged_eager_seconds=t_paged_eager, sdpa_eager_seconds=t_sdpa_eager,
                               eager_ratio_to_sdpa=t_sdpa_eager / t_paged_eager,
                               sdpa_all_seconds=all_sdpa, ratio_to_sdpa=statistics.median(ratios),
                               round_ratios=ratios, paged_round_seconds=turns["paged"],
                               sdpa_round_seconds=turns["sdpa"], first_pass_paged_seconds=t_paged_first,
                               max_abs_diff_vs_sdpa=err))
            if B >= 64:   # the target's denominator (>= 90% of the copy bandwidth), also at this transfer's size:
                # a copy moving the same bytes (read + write = kv_bytes); a ~100 us transfer pays its ramp too
                points[-1]["copy_bandwidth_same_bytes"] = measure_copy_bandwidth(kv_bytes // 2, warmup=3, reps=reps)
            print(f"B={B:3d} L={L:5d} {str(dtype)[6:]:>8} splits={splits:3d}: "
                  f"paged {human(kv_bytes / t_paged, 'B/s'):>11} ({t_paged * 1e6:8.1f} us)  "
                  f"SDPA[{backend}] {human(kv_bytes / t_sdpa, 'B/s'):>11} ({t_sdpa * 1e6:8.1f} us)  "
                  f"ratio {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f} over "
                  f"{len(ratios)} rounds) [{mode}]; "
                  f"eager: {t_paged_eager * 1e6:.1f} vs {t_sdpa_eager * 1e6:.1f} us"
                  + (f"; a copy of the same bytes {human(points[-1]['copy_bandwidth_same_bytes'], 'B/s')}"
                     if B >= 64 else ""), flush=True)
            del q, kc, vc, k, v

    # 3. Split-K: one long sequence, split vs unsplit.
    B, L = cfg["split"]
    q, kc, vc, tables, lens = make_inputs(B, [L], Hq, Hkv, D, P, torch.float16, seed=7)
    kv_bytes = 2 * B * L * Hkv * D * 2
    splits = pa.choose_num_splits(B, Hkv, L, pa._num_sms(q.device))
    t_split, t_split_eager, mode = best_time(
        lambda: kernels.paged_attention_decode(q, kc, vc, tables, lens, max_context_len=L, validate=False),
        warmup, reps)
    t_unsplit, t_unsplit_eager, _ = best_time(
        lambda: kernels.paged_attention_decode(q, kc, vc, tables, lens, max_context_len=L, validate=False,
                                               num_splits=1),
        warmup, reps)
    split_k = dict(B=B, context=L, dtype="float16", num_splits=splits, timing_mode=mode, split_seconds=t_split,
                   unsplit_seconds=t_unsplit, split_eager_seconds=t_split_eager, unsplit_eager_seconds=t_unsplit_eager,
                   split_bytes_per_s=kv_bytes / t_split, unsplit_bytes_per_s=kv_bytes / t_unsplit,
                   speedup=t_unsplit / t_split)
    print(f"split-K B={B} L={L}: {splits} splits {t_split * 1e6:.1f} us vs unsplit {t_unsplit * 1e6:.1f} us: "
          f"{t_unsplit / t_split:.1f}x", flush=True)
    # the default call (validate=True): the wrapper reads the lengths and the block ids it uses back (a sync) to check
    # them
    t_sync = time_fn(lambda: kernels.paged_attention_decode(q, kc, vc, tables, lens), warmup=warmup, reps=reps,
                     flush=True)
    t_no_sync = t_split_eager
    del q, kc, vc

    # 4. Optional tuning sweep of the tile configuration at the two key shapes.
    tuning = []
    if args.tune:
        default = dict(pa.CONFIG)
        for (B, L) in cfg["tune"]:
            q, kc, vc, tables, lens = make_inputs(B, [L] * B, Hq, Hkv, D, P, torch.float16, seed=3)
            call = lambda: kernels.paged_attention_decode(q, kc, vc, tables, lens, max_context_len=L, validate=False)
            for block_n in (32, 64, 128):
                for warps in (2, 4, 8):
                    for stages in (2, 3, 4):
                        pa.CONFIG.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                        try:
                            t = best_time(call, 2, 10)[0]
                        except Exception as err:  # e.g. out of shared memory
                            t = None
                            print(f"config {pa.CONFIG} failed: {type(err).__name__}", flush=True)
                        tuning.append(dict(B=B, context=L, **pa.CONFIG, seconds=t,
                                           bytes_per_s=None if t is None else 2 * B * L * Hkv * D * 2 / t))
            best = min((r for r in tuning if r["B"] == B and r["seconds"]), key=lambda r: r["seconds"])
            print(f"tuning B={B} L={L}: best {best}", flush=True)
            pa.CONFIG.clear()
            pa.CONFIG.update(default)
            del q, kc, vc

    # 5. Optional: the split-K plan at small batches, where the kernel trails SDPA most (batch 1, short contexts):
    # every num_splits (and BLOCK_N 16/32/64) replayed from a CUDA graph, against SDPA's best backend
    split_sweep = []
    if args.splits:
        shapes = [(1, 64), (2, 64)] if not HAS_GPU else [(1, 1024), (1, 4096), (1, 32768), (4, 8192), (64, 1024)]
        default = dict(pa.CONFIG)
        for (B, L) in shapes:
            q, kc, vc, tables, lens = make_inputs(B, [L] * B, Hq, Hkv, D, P, torch.float16, seed=4)
            k, v = contiguous_kv(kc, vc, tables, L)
            _, _, _, _, sdpa_call = time_sdpa(q[:, :, None], k, v, warmup, reps)
            want = sdpa_call()[:, :, 0].float()
            replays, errors = dict(sdpa=replay_or_call(sdpa_call)), {}
            for block_n in (16, 32, 64):
                pa.CONFIG.update(BLOCK_N=block_n)   # read when the call is captured; the graph keeps it
                for splits in (1, 2, 4, 8, 16, 32, 64):
                    if splits * block_n > max(L, block_n):   # every split at least one tile
                        continue
                    call = functools.partial(kernels.paged_attention_decode, q, kc, vc, tables, lens,
                                             max_context_len=L, num_splits=splits, validate=False)
                    errors[block_n, splits] = (call().float() - want).abs().max().item()  # checked before timing
                    if errors[block_n, splits] < 1e-2:
                        replays[block_n, splits] = replay_or_call(call)
            pa.CONFIG.clear()
            pa.CONFIG.update(default)
            # every plan and SDPA in turn (cfg["sweep_rounds"] rounds): the plans are compared under the same clocks
            turns = interleaved_times(replays, warmup, reps, cfg["sweep_rounds"])
            t_sdpa = statistics.median(turns["sdpa"])
            for (block_n, splits), err in errors.items():
                t = statistics.median(turns[block_n, splits]) if (block_n, splits) in turns else None
                split_sweep.append(dict(B=B, context=L, BLOCK_N=block_n, num_splits=splits, max_abs_error=err,
                                        seconds=t, sdpa_seconds=t_sdpa, ratio_to_sdpa=t_sdpa / t if t else None))
            auto = pa.choose_num_splits(B, Hkv, L, pa._num_sms(q.device), pa.PROGRAMS_PER_SM)
            rows = [r for r in split_sweep if (r["B"], r["context"]) == (B, L) and r["seconds"]]
            best = min(rows, key=lambda r: r["seconds"])
            print(f"splits B={B} L={L}: best BLOCK_N={best['BLOCK_N']} num_splits={best['num_splits']} "
                  f"{best['ratio_to_sdpa']:.2f}x SDPA (the automatic plan: {auto} splits of BLOCK_N="
                  f"{default['BLOCK_N']})", flush=True)
            del q, kc, vc, k, v

    key = next(p for p in points if (p["B"], p["context"]) == cfg["key"] and p["dtype"] == "float16")
    result = dict(
        benchmark="paged_attention", device=name, device_slug=slug(name),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(), cpu_model=cpu_model(), driver=driver_version(), python=platform.python_version(),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda if HAS_GPU else None,
        kernel_mode="interpreter" if INTERPRET else "compiled", quick=args.quick,
        command=" ".join(["python -m benchmarks.paged_attention", *(argv if argv is not None else sys.argv[1:])]),
        shapes=dict(Hq=Hq, Hkv=Hkv, head_dim=D, block_size=P), kernel_config=dict(pa.CONFIG),
        timing=dict(warmup=warmup, reps=reps, rounds=cfg["rounds"], statistic="median",
                    clock="CUDA events" if HAS_GPU else "time.perf_counter",
                    mode="seconds: one call replayed from a CUDA graph (GPU time, as serving engines run decode); "
                         "eager_seconds: one call from Python, launch overhead included",
                    cache="L2 flushed before each repetition",
                    ratio_to_sdpa="the paged kernel and SDPA's fastest backend (chosen in a first pass) replayed in "
                                  "turn, `rounds` rounds of `reps`, order rotated: the median of the rounds' ratios "
                                  "(round_ratios); paged_seconds, sdpa_seconds: the median of the rounds",
                    paged_call="max_context_len given, validate=False (no host sync)",
                    bytes="K and V bytes of all B x context tokens, read once"),
        copy_bandwidth=copy_bw, correctness=correctness, bandwidth=points, split_k=split_k,
        host_sync=dict(B=B, context=L, eager_seconds_with_max_context_len=t_no_sync, eager_seconds_without=t_sync),
        tuning=tuning, split_sweep=split_sweep,
        targets=dict(batch64_ctx4k_ratio_to_sdpa=key["ratio_to_sdpa"], batch64_ctx4k_target=0.85,
                     batch1_ctx32k_split_speedup=split_k["speedup"], batch1_ctx32k_target=3.0,
                     met=bool(key["ratio_to_sdpa"] >= 0.85 and split_k["speedup"] >= 3.0)),
        total_seconds=time.perf_counter() - t_start,
    )
    out_path = args.out or RESULTS_DIR / f"paged_attention_{slug(name)}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"B={key['B']} L={key['context']}: {key['ratio_to_sdpa']:.2f}x SDPA's bandwidth (target 0.85); split-K "
          f"{split_k['speedup']:.1f}x unsplit (target 3); wrote {out_path} in {result['total_seconds']:.0f} s")
    print_readme_row(out_path)
    return result


if __name__ == "__main__":
    main()
