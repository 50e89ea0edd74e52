"""Prefill attention of one engine step on a GPU, three ways in the same run (issue 18): the old gather + one
FlashAttention call per chunk, the paged prefill kernel (one launch over the block tables), and torch SDPA on
K/V gathered beforehand (the floor that ignores the gather).

    python -m benchmarks.paged_prefill              # GPU: < 2 min on an H100
    python -m benchmarks.paged_prefill --tune       # also time the kernel's tile configs on every mix
    python -m benchmarks.paged_prefill --dry-run    # the script's logic on tiny shapes (CPU: the interpreter), seconds

Each mix is one step's prefill chunks, (query tokens, cached prefix) per sequence, e.g. 8 chunks of 512 over
prefixes of 0 ... 7k. The K/V of every sequence sit in 16-token blocks scattered at random over a
``course_lib.serving.kv_pool.KVPool`` (as after hours of serving), and the first two ways run the engine's own code:

* ``gather_flash``: ``KVPool._prefill_gathered`` with kernels, what ``StepBatch.attend`` did before: per chunk, copy
  the sequence's K/V out of its blocks into a contiguous ``[Hkv, L, D]`` (``KVPool.gather``), then
  ``kernels.flash_attention`` (the engine's fixed serving config), one chunk after the other;
* ``paged``: ``KVPool.prefill`` with kernels, i.e. ``kernels.paged_prefill_attention_unchecked``: all chunks in one
  launch, K/V read in place through the block tables;
* ``sdpa_floor``: ``torch.nn.functional.scaled_dot_product_attention`` per chunk on K/V gathered *before* the
  timing (causal aligned bottom-right, GQA without copying the heads where torch can): no gather cost at all,
  but still one call per chunk.

Timing: ``triton.testing.do_bench`` (median of CUDA-event times, L2 flushed between runs), without CUDA graphs,
so the per-chunk launches of the first and third ways count (as they do in an eager engine). Every way is
checked against the paged kernel before it is timed. Writes ``benchmarks/results/paged_prefill_<device>.json``
(device, versions, git commit, date, every number) after each mix, so a run cut short keeps its data.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import torch.nn.functional as F
import triton

from course_lib.model.config import ModelConfig
from course_lib.device import DEVICE, HAS_GPU, INTERPRET
from course_lib.serving.kv_pool import KVPool
from course_lib.analysis.roofline import RESULTS_DIR, time_fn
from kernels.paged_prefill import paged_prefill_attention_unchecked, prefill_config

from benchmarks.record import git_commit
from benchmarks.roofline import device_name, slug  # same device naming as the other benchmarks

#: name -> (query tokens, cached prefix) per sequence of the step.
GPU_MIXES = {
    "1 chunk of 2048 over 0": [(2048, 0)],
    "8 chunks of 512 over 0-7k": [(512, 1024 * i) for i in range(8)],
    "4 chunks of 2048 over 0-6k": [(2048, 2048 * i) for i in range(4)],
    "64 chunks of 16 over 4k": [(16, 4096)] * 64,
    "32 verify chunks of 5 over 2k": [(5, 2048 + 31 * i) for i in range(32)],
}
#: (Hq, Hkv, D): Llama-3-8B and Llama-3.2-1B attention layers.
GPU_HEADS = [(32, 8, 128), (32, 8, 64)]
DRY_MIXES = {"2 chunks of 8 over 0 and 12": [(8, 0), (8, 12)], "3 chunks of 2 over 5": [(2, 5)] * 3}
DRY_HEADS = [(4, 2, 16)]
#: Tile configs the --tune sweep tries: (BLOCK_M, BLOCK_N, num_warps, num_stages).
TUNE_CONFIGS = [(16, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 3), (128, 64, 4, 3),
                (128, 32, 4, 3), (128, 128, 8, 2)]
BLOCK_SIZE = 16


def make_step(chunks, Hq, Hkv, D, dtype, seed=0):
    """A pool with the step's sequences in scattered blocks, the step's q [T, Hq, D] and the engine's step inputs
    (block tables, cu_seqlens_q, seq_lens on the device; spans on the host)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    lens = [n + prefix for n, prefix in chunks]
    max_blocks = max(-(-L // BLOCK_SIZE) for L in lens)
    num_blocks = len(chunks) * max_blocks
    config = ModelConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D,
                         num_hidden_layers=1)
    pool = KVPool(config, num_blocks, BLOCK_SIZE, dtype=dtype, device=DEVICE)
    for cache in (pool.k_caches[0], pool.v_caches[0]):
        cache.copy_(torch.randn(cache.shape, generator=gen, device=DEVICE, dtype=dtype))
    tables = torch.randperm(num_blocks, generator=gen, device=DEVICE).view(len(chunks), max_blocks).to(torch.int32)
    T = sum(n for n, _ in chunks)
    q = torch.randn(T, Hq, D, generator=gen, device=DEVICE, dtype=dtype)
    starts = [sum(n for n, _ in chunks[:s]) for s in range(len(chunks))]
    spans = [(start, n, L) for start, (n, _), L in zip(starts, chunks, lens)]
    cu = torch.tensor(starts + [T], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return pool, q, tables, cu, seq_lens, spans


def sdpa_floor(pool, q, tables, spans, out, expand_heads: bool):
    """The floor: per chunk, SDPA on K/V gathered now, outside the timing (contiguous [1, Hkv, L, D], or with
    ``expand_heads`` [1, Hq, L, D], one copy per query head, for a torch whose SDPA cannot do GQA with this mask).
    Returns the function to time, which writes into ``out``."""
    from torch.nn.attention.bias import causal_lower_right

    inputs = []
    for s, (row, n, L) in enumerate(spans):
        k, v = (x[None].contiguous() for x in pool.gather(0, tables[s, : -(-L // BLOCK_SIZE)], L, q.dtype))
        if expand_heads:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        mask = None if n == L else causal_lower_right(n, L)     # n == L: plain causal (top-left = bottom-right)
        inputs.append((row, n, q[row:row + n].transpose(0, 1)[None], k, v, mask))
    gqa = {} if expand_heads else dict(enable_gqa=True)

    def run():
        for row, n, qc, k, v, mask in inputs:
            out[row:row + n] = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, is_causal=mask is None,
                                                              **gqa)[0].transpose(0, 1)
    return run


def causal_flops(chunks, Hq, D) -> int:
    """4·Hq·D per visible (query, key) pair: query i of a chunk of n over a prefix of p sees p + i + 1 keys."""
    return sum(4 * Hq * D * (n * p + n * (n + 1) // 2) for n, p in chunks)


def bench(fn, dry_run: bool) -> float:
    """Median seconds of fn()."""
    if HAS_GPU and not dry_run:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return time_fn(fn, warmup=0, reps=1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, one timing rep: checks the script (CPU ok)")
    parser.add_argument("--tune", action="store_true", help="also time the kernel with every config of TUNE_CONFIGS")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of q and the cache on a GPU (default bfloat16; the dry run on CPU uses float32)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output JSON (default: benchmarks/results/paged_prefill_<device>.json)")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    dtype = getattr(torch, args.dtype) if HAS_GPU else torch.float32
    mixes, heads = (DRY_MIXES, DRY_HEADS) if args.dry_run or not HAS_GPU else (GPU_MIXES, GPU_HEADS)
    name = device_name()
    out_path = args.out or RESULTS_DIR / f"paged_prefill_{slug(name)}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = dict(
        benchmark="paged_prefill", device=name, device_slug=slug(name), git_commit=git_commit(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), python=platform.python_version(),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda if HAS_GPU else None,
        kernel_mode="interpreter" if INTERPRET else "compiled", dtype=str(dtype).removeprefix("torch."),
        block_size=BLOCK_SIZE, dry_run=args.dry_run,
        command=" ".join(["python -m benchmarks.paged_prefill", *(argv if argv is not None else sys.argv[1:])]),
        timing=dict(tool="triton.testing.do_bench" if HAS_GPU and not args.dry_run else "time.perf_counter",
                    statistic="median", cuda_graphs=False),
        ways=dict(gather_flash="KVPool._prefill_gathered: per chunk gather + kernels.flash_attention (serving config)",
                  paged="KVPool.prefill: kernels.paged_prefill_attention_unchecked, one launch",
                  sdpa_floor="torch SDPA per chunk on K/V gathered before timing (no gather cost)"),
        rows=[], total_seconds=None)

    def save():
        result["total_seconds"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(result, indent=1) + "\n")

    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  {result['dtype']}  "
          f"commit {result['git_commit'][:12]}", flush=True)
    expand_heads = False
    for Hq, Hkv, D in heads:
        for mix, chunks in mixes.items():
            pool, q, tables, cu, seq_lens, spans = make_step(chunks, Hq, Hkv, D, dtype)
            T, flops = q.shape[0], causal_flops(chunks, Hq, D)
            outs = {w: torch.empty_like(q) for w in ("gather_flash", "paged", "sdpa_floor")}
            ways = {
                "paged": lambda: pool.prefill(0, q, tables, cu, seq_lens, spans, True, out=outs["paged"]),
                "gather_flash": lambda: pool._prefill_gathered(0, q, tables, spans, True, outs["gather_flash"]),
            }
            ways["paged"]()
            while True:   # SDPA with GQA, or (if this torch cannot, or gets it wrong) with the kv heads expanded
                ways["sdpa_floor"] = sdpa_floor(pool, q, tables, spans, outs["sdpa_floor"], expand_heads)
                try:
                    ways["sdpa_floor"]()
                    err = (outs["sdpa_floor"].float() - outs["paged"].float()).abs().max().item()
                    if err < 5e-2 or expand_heads:
                        break
                    why = f"max abs diff {err}"
                except RuntimeError as e:
                    if expand_heads:
                        raise
                    why = str(e).splitlines()[0][:120]
                print(f"  SDPA with enable_gqa: {why}; the floor expands the kv heads from now on", flush=True)
                expand_heads = result["sdpa_expanded_kv_heads"] = True
            row = dict(mix=mix, chunks=len(chunks), tokens=T, Hq=Hq, Hkv=Hkv, D=D, flops=flops,
                       kv_tokens=sum(L for *_, L in spans), config=prefill_config(T, len(chunks), Hq // Hkv, D, dtype))
            for way, fn in ways.items():
                if way != "paged":   # never time a wrong result
                    fn()
                    err = (outs[way].float() - outs["paged"].float()).abs().max().item()
                    row[f"{way}_max_abs_diff"] = err
                    assert err < 5e-2, f"{way} and the paged kernel differ by {err} on {mix}"
                seconds = bench(fn, args.dry_run)
                row[f"{way}_ms"] = seconds * 1e3
                row[f"{way}_tflops"] = flops / seconds / 1e12
            row["max_abs_diff"] = max(row["gather_flash_max_abs_diff"], row["sdpa_floor_max_abs_diff"])
            row["speedup_vs_gather_flash"] = row["gather_flash_ms"] / row["paged_ms"]
            row["paged_vs_sdpa_floor"] = row["sdpa_floor_ms"] / row["paged_ms"]       # > 1: faster than the floor
            if args.tune and not INTERPRET:
                row["tune_ms"] = {}
                for bm, bn, w, s in TUNE_CONFIGS:
                    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                    tuned = torch.empty_like(q)
                    fn = lambda: paged_prefill_attention_unchecked(
                        q, pool.k_caches[0], pool.v_caches[0], tables, cu, seq_lens, out=tuned, config=cfg)
                    try:
                        fn()
                        assert (tuned.float() - outs["paged"].float()).abs().max().item() < 5e-2
                        row["tune_ms"][f"{bm}x{bn} w{w} s{s}"] = bench(fn, args.dry_run) * 1e3
                    except Exception as err:   # out of shared memory, registers: record and go on
                        row["tune_ms"][f"{bm}x{bn} w{w} s{s}"] = f"failed: {type(err).__name__}"
                timed = {c: ms for c, ms in row["tune_ms"].items() if isinstance(ms, float)}
                if timed:
                    best = min(timed, key=timed.get)
                    row["tune_best"] = best
                    print(f"  tune: best {best} {timed[best]:.3f} ms vs the default "
                          f"{row['config']['BLOCK_M']}x{row['config']['BLOCK_N']} {row['paged_ms']:.3f} ms", flush=True)
            result["rows"].append(row)
            save()
            print(f"Hq={Hq:2d} Hkv={Hkv} D={D:3d} {mix:32s}: gather+flash {row['gather_flash_ms']:8.3f} ms  "
                  f"paged {row['paged_ms']:8.3f} ms ({row['paged_tflops']:6.1f} TFLOP/s)  sdpa floor "
                  f"{row['sdpa_floor_ms']:8.3f} ms  -> {row['speedup_vs_gather_flash']:.2f}x vs gather+flash, "
                  f"{row['paged_vs_sdpa_floor']:.2f}x vs floor", flush=True)
            pool = q = outs = ways = None  # free this shape's memory (not del: closures above use the names)
    save()
    print(f"wrote {out_path} in {result['total_seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
