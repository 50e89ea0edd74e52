"""INT8 (and FP8) KV cache vs FP16 on a GPU: decode-attention time at contexts 1k-32k, same run (lesson 07).

    python -m benchmarks.kv_quant            # GPU: < 3 min on an H100/H200
    python -m benchmarks.kv_quant --quick    # CPU smoke test (interpreter, tiny shapes): seconds

Shapes: a LLaMA-3-8B-like attention layer, Hq = 32, Hkv = 8, D = 128, block size P = 16, batch 32 (and 64),
context 1k ... 32k. For each point the *same* random K/V is stored twice: in fp16, and quantized to INT8 by the
fused ``kernels.store_kv_int8`` (one fp16 scale per token and kv head). ``kernels.paged_attention_decode``
(lesson 02) reads the first, ``kernels.paged_attention_int8_decode`` the second; both timed as one call replayed
from a CUDA graph, L2 flushed. FP8 e4m3 too where the GPU has it. Before the sweep, a few configurations of the
INT8 kernel (tile sizes, warps, PTX or Triton unpacking) are checked against the reference and timed at
batch 32 x 8k, and the fastest correct one is used (all recorded). Target: INT8 time <= 0.6x the
FP16 time at contexts >= 8k. Where the GPU runs it, the Gluon INT8 kernel (``kernels.paged_attention_int8_gluon``,
an experiment: not the library's route) is checked against the reference and timed beside them on the same codes
(``int8_gluon_*`` fields). Writes ``benchmarks/results/kv_quant_<device-slug>.json`` with device, versions, date and
every number.
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
import triton

import kernels
import kernels.paged_attention_int8 as pa8
import kernels.paged_attention_int8_gluon as g8
import kernels.reference as ref
from course_lib.device import DEVICE, HAS_GPU, INTERPRET
from course_lib.quant.kv_quant import quantization_error
from course_lib.analysis.roofline import RESULTS_DIR
from kernels.store_kv_int8 import fp8_supported

from benchmarks.paged_attention import best_time  # CUDA-graph timing, as lesson 02's benchmark
from benchmarks.roofline import device_name, slug
from benchmarks.record import cpu_model, driver_version, git_commit, print_readme_row

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def make_caches(B, L, Hq, Hkv, D, P, dtype, kv_dtypes, seed=0):
    """q, the fp16 paged caches (blocks in random order), block tables, lengths, and {kv_dtype: (codes, scales)}
    quantized from the same K/V by kernels.store_kv_int8."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    max_blocks = -(-L // P)
    N = B * max_blocks
    k_cache = torch.randn(N, P, Hkv, D, generator=gen, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(N, P, Hkv, D, generator=gen, device=DEVICE, dtype=dtype)
    tables = torch.randperm(N, generator=gen, device=DEVICE).view(B, max_blocks).to(torch.int32)
    q = torch.randn(B, Hq, D, generator=gen, device=DEVICE, dtype=dtype)
    lens = torch.full((B,), L, dtype=torch.int32, device=DEVICE)
    quantized = {}
    slots = torch.arange(N * P, device=DEVICE)
    for name, code_dtype in kv_dtypes.items():
        codes = [torch.empty(N, P, Hkv, D, device=DEVICE, dtype=code_dtype) for _ in range(2)]
        scales = [torch.empty(N, P, Hkv, device=DEVICE, dtype=torch.float16) for _ in range(2)]
        kernels.store_kv_int8(k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D), *codes, *scales, slots)
        quantized[name] = (*codes, *scales)
    return q, k_cache, v_cache, tables, lens, quantized


def config(quick: bool) -> dict:
    if quick or not HAS_GPU:   # the interpreter: tiny shapes, just to prove the script runs
        return dict(Hq=4, Hkv=2, D=16, P=8, warmup=1, reps=2, correctness=[(2, 40)],
                    sweep=[(2, 64)], tune_at=(2, 64),
                    tune=[dict(BLOCK_N=64, num_warps=2), dict(BLOCK_N=32, num_warps=4)])
    return dict(Hq=32, Hkv=8, D=128, P=16, warmup=3, reps=20,
                correctness=[(32, 1000), (4, 8192), (1, 32768), (64, 4096)],
                sweep=[(32, L) for L in (1024, 2048, 4096, 8192, 16384, 32768)]
                + [(64, L) for L in (1024, 4096, 8192, 16384)],
                tune_at=(32, 8192), tune=[
                    # byte planes + software prefetch (the kernel's loop); tiles, warps, Triton's pipelining on top
                    *(dict(BLOCK_N=n, num_warps=w, num_stages=1) for n in (32, 64, 128) for w in (2, 4)),
                    dict(BLOCK_N=64, num_warps=2, num_stages=2),
                    # the INT8 codes unpacked by Triton integer ops instead of the PTX (ASM) routine
                    dict(BLOCK_N=64, num_warps=2, num_stages=1, ASM=False)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output JSON (default: benchmarks/results/kv_quant_<device>.json)")
    args = parser.parse_args(argv)
    cfg = config(args.quick)
    Hq, Hkv, D, P, warmup, reps = cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["P"], cfg["warmup"], cfg["reps"]
    dtype = torch.float16
    t_start = time.perf_counter()
    name = device_name()
    fp8_ok, fp8_why = fp8_supported()
    kv_dtypes = {"int8": torch.int8, **({"fp8": torch.float8_e4m3fn} if fp8_ok else {})}
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  "
          f"kernels: {'interpreter' if INTERPRET else 'compiled'}  Hq={Hq} Hkv={Hkv} D={D} P={P}  "
          f"FP8: {'yes' if fp8_ok else 'no (' + fp8_why + ')'}", flush=True)

    # 1. A small tile-configuration sweep of the INT8 kernel at one point; each configuration is first checked
    #    against the reference (a wrong or failing one is skipped); the fastest correct one is used below.
    B, L = cfg["tune_at"]
    q, kc, vc, tables, lens, quantized = make_caches(B, L, Hq, Hkv, D, P, dtype, {"int8": torch.int8}, seed=1)
    want = ref.paged_attention_int8_decode(q, *quantized["int8"], tables, lens).float()
    default, tuning = dict(pa8.CONFIG), []
    for variant in cfg["tune"]:
        pa8.CONFIG.clear()
        pa8.CONFIG.update({**default, **variant})
        call = lambda: kernels.paged_attention_int8_decode(q, *quantized["int8"], tables, lens, max_context_len=L,
                                                           validate=False)
        try:
            err = (call().float() - want).abs().max().item()
            ok = err <= TOL[dtype] * (1 + want.abs().max().item())
            t = best_time(call, warmup, reps)[0] if ok else None
            why = None if ok else f"wrong result: max abs error {err:.3g}"
        except Exception as exc:  # e.g. out of shared memory, a PTX the compiler rejects
            t, why = None, f"{type(exc).__name__}: {str(exc)[:200]}"
        tuning.append(dict(B=B, context=L, **pa8.CONFIG, seconds=t, failed=why))
        print(f"tune B={B} L={L} {pa8.CONFIG}: " + (f"{t * 1e6:.1f} us" if t else f"skipped ({why})"), flush=True)
    best = min((r for r in tuning if r["seconds"]), key=lambda r: r["seconds"])
    pa8.CONFIG.clear()
    pa8.CONFIG.update({k: best[k] for k in default})
    print(f"using {pa8.CONFIG} (default was {default})", flush=True)
    q = kc = vc = quantized = None  # free this shape's memory (not del: closures above use the names)

    # 2. Correctness at real shapes (with the configuration chosen above): the 8-bit kernels vs the reference on the
    #    same codes, and the quantization error itself (INT8 attention vs FP16 attention on the original K/V). The
    #    Gluon kernel too where it runs; a wrong result there is recorded and it is not timed.
    gluon_why = g8.gluon_int8_status()
    correctness = []
    for B, L in cfg["correctness"]:
        q, kc, vc, tables, lens, quantized = make_caches(B, L, Hq, Hkv, D, P, dtype, kv_dtypes, seed=B + L)
        exact = kernels.paged_attention_decode(q, kc, vc, tables, lens).float()
        for kv, caches in quantized.items():
            want = ref.paged_attention_int8_decode(q, *caches, tables, lens).float()
            for splits in (None, 1, 8):
                got = kernels.paged_attention_int8_decode(q, *caches, tables, lens, num_splits=splits).float()
                err = (got - want).abs().max().item()
                tol = TOL[dtype] * (1 + want.abs().max().item())
                correctness.append(dict(B=B, context=L, kv_dtype=kv, num_splits=splits or "auto", max_abs_error=err,
                                        tolerance=tol, vs_fp16=quantization_error(exact, got)))
                assert err <= tol, f"{kv} paged attention is wrong at B={B}, L={L}, splits={splits}: {err}"
                if kv == "int8" and gluon_why is None:
                    got = g8.paged_attention_int8_decode_gluon(q, *caches, tables, lens, num_splits=splits).float()
                    err = (got - want).abs().max().item()
                    correctness.append(dict(B=B, context=L, kv_dtype=kv, kernel="gluon", num_splits=splits or "auto",
                                            max_abs_error=err, tolerance=tol))
                    if not err <= tol:
                        gluon_why = f"wrong result at B={B}, L={L}, splits={splits}: max abs error {err:.3g}"
                        print(f"Gluon INT8 kernel: {gluon_why}; not timed", flush=True)
            print(f"correct: {kv} B={B:3d} L={L:5d} (auto, unsplit, 8 splits); vs FP16 attention: relative error "
                  f"{correctness[-1]['vs_fp16']['relative']:.2e}", flush=True)
        q = kc = vc = quantized = None  # free this shape's memory (not del: closures above use the names)

    # 3. Memory, measured from the tensors of one point: bytes per token (all K/V of this layer, scales included).
    B, L = cfg["sweep"][0]
    q, kc, vc, tables, lens, quantized = make_caches(B, L, Hq, Hkv, D, P, dtype, kv_dtypes)
    tokens = kc.shape[0] * P
    memory = {"float16": 2 * kc.numel() * kc.element_size() / tokens}
    for kv, caches in quantized.items():
        memory[kv] = sum(t.numel() * t.element_size() for t in caches) / tokens
    memory = dict(bytes_per_token_per_layer=memory, ratio_int8_to_fp16=memory["int8"] / memory["float16"])
    print(f"bytes per token and layer: {memory['bytes_per_token_per_layer']}", flush=True)
    q = kc = vc = quantized = None  # free this shape's memory (not del: closures above use the names)

    # 4. The sweep: FP16 vs INT8 (vs FP8) on the same K/V.
    points = []
    for B, L in cfg["sweep"]:
        q, kc, vc, tables, lens, quantized = make_caches(B, L, Hq, Hkv, D, P, dtype, kv_dtypes, seed=L)
        fp16_bytes = 2 * B * L * Hkv * D * 2
        t16, e16, mode = best_time(
            lambda: kernels.paged_attention_decode(q, kc, vc, tables, lens, max_context_len=L, validate=False),
            warmup, reps)
        point = dict(B=B, context=L, timing_mode=mode, fp16_seconds=t16, fp16_eager_seconds=e16,
                     fp16_bytes_per_s=fp16_bytes / t16)
        for kv, caches in quantized.items():
            t8, e8, _ = best_time(
                lambda: kernels.paged_attention_int8_decode(q, *caches, tables, lens, max_context_len=L,
                                                            validate=False),
                warmup, reps)
            kv_bytes = 2 * B * L * Hkv * (D + 2)
            point.update({f"{kv}_seconds": t8, f"{kv}_eager_seconds": e8, f"{kv}_bytes_per_s": kv_bytes / t8,
                          f"{kv}_ratio_to_fp16": t8 / t16})
        if gluon_why is None:
            tg, eg, _ = best_time(
                lambda: g8.paged_attention_int8_decode_gluon(q, *quantized["int8"], tables, lens, max_context_len=L,
                                                             validate=False),
                warmup, reps)
            kv_bytes = 2 * B * L * Hkv * (D + 2)
            point.update(int8_gluon_seconds=tg, int8_gluon_eager_seconds=eg, int8_gluon_bytes_per_s=kv_bytes / tg,
                         int8_gluon_ratio_to_fp16=tg / t16)
        points.append(point)
        print(f"B={B:3d} L={L:5d}: fp16 {t16 * 1e6:8.1f} us ({fp16_bytes / t16 / 1e12:.2f} TB/s)  " + "  ".join(
            f"{kv} {point[kv + '_seconds'] * 1e6:8.1f} us ({point[kv + '_bytes_per_s'] / 1e12:.2f} TB/s, "
            f"{point[kv + '_ratio_to_fp16']:.2f}x)" for kv in quantized)
            + (f"  int8 gluon {point['int8_gluon_seconds'] * 1e6:8.1f} us ({point['int8_gluon_ratio_to_fp16']:.2f}x)"
               if "int8_gluon_seconds" in point else "") + f" [{mode}]", flush=True)
        q = kc = vc = quantized = None  # free this shape's memory (not del: closures above use the names)

    long = [p for p in points if p["context"] >= 8192] or points
    worst = max(p["int8_ratio_to_fp16"] for p in long)
    result = dict(
        benchmark="kv_quant", device=name, device_slug=slug(name),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(), cpu_model=cpu_model(), driver=driver_version(), python=platform.python_version(),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda if HAS_GPU else None,
        kernel_mode="interpreter" if INTERPRET else "compiled", quick=args.quick,
        command=" ".join(["python -m benchmarks.kv_quant", *(argv if argv is not None else sys.argv[1:])]),
        shapes=dict(Hq=Hq, Hkv=Hkv, head_dim=D, block_size=P, q_dtype="float16", scale_dtype="float16"),
        fp8=dict(supported=fp8_ok, why_not=fp8_why or None), kernel_config=dict(pa8.CONFIG), tuning=tuning,
        timing=dict(warmup=warmup, reps=reps, statistic="median",
                    clock="CUDA events" if HAS_GPU else "time.perf_counter",
                    mode="seconds: one call replayed from a CUDA graph; eager_seconds: one call from Python",
                    cache="L2 flushed before each repetition",
                    bytes="fp16: 2*B*L*Hkv*D*2; 8-bit: 2*B*L*Hkv*(D + 2) (codes + fp16 scales)"),
        correctness=correctness, memory=memory, decode=points,
        targets=dict(int8_ratio_to_fp16_at_8k_plus_worst=worst, target=0.6, met=bool(worst <= 0.6),
                     int8_gluon_ratio_to_fp16_at_8k_plus_worst=max(
                         (p["int8_gluon_ratio_to_fp16"] for p in long if "int8_gluon_ratio_to_fp16" in p),
                         default=None)),
        gluon=dict(kernel="kernels.paged_attention_int8_gluon", config=dict(g8.CONFIG), timed=gluon_why is None,
                   why_not=gluon_why),
        total_seconds=time.perf_counter() - t_start,
    )
    out_path = args.out or RESULTS_DIR / f"kv_quant_{slug(name)}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"INT8 / FP16 decode time at contexts >= 8k: worst {worst:.2f}x (target <= 0.6); "
          f"wrote {out_path} in {result['total_seconds']:.0f} s")
    print_readme_row(out_path)
    return result


if __name__ == "__main__":
    main()
