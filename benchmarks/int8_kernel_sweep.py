"""Experiment behind lesson 07's INT8 decode kernel: candidate kernels, checked and timed against FP16 on a GPU.

    python -m benchmarks.int8_kernel_sweep [--out FILE]      # GPU only: ~1 min on an H100/H200
    python -m benchmarks.int8_kernel_sweep --splits          # the shipped kernel at forced split counts, ~15 s

Not a course benchmark (``benchmarks/kv_quant.py`` records the kernel the course ships); this is the script that
chooses it. Every candidate is first checked against ``kernels.reference.paged_attention_int8_decode`` on the
same codes (a wrong one is reported and skipped), then timed as one call replayed from a CUDA graph, L2 flushed,
median of 20, next to lesson 02's FP16 kernel on the same K/V. Shapes: Hq = 32, Hkv = 8, D = 128, P = 16, fp16.

Candidates (``tile_*``: one ``[BLOCK_N, D]`` tile of one-byte codes per load, as the FP16 kernel loads its tiles):
* ``planes``: the kernel of ``kernels/paged_attention_int8.py`` before this experiment (32-bit words, 4 byte
  planes, software prefetch), for reference; ``planes`` with ``K_INT8_DOT`` (added after it, 2026-12-08): its
  scores through int8 dots on K's byte planes with q rounded to int8 (checked against the reference on that
  rounded q, ``kernels.reference.round_query_int8``; ``err_unrounded`` is its distance from the unrounded q's);
  ``planes`` with ``BIASED`` (the same day): codes left as 1152 + c, the bias removed from the sums.
* ``gluon``: ``kernels/paged_attention_int8_gluon.py`` (the same day): the words loaded straight into the mma
  operand layouts, no shared memory, one warp per program; its ``BLOCK_N``, ``LAZY_RESCALE``, ``V_WIDE``, ``K_WIDE``.
* ``tile_asm``: codes loaded as int8 straight into the dot; converted to fp16 by a 6-instruction PTX routine on 4
  codes at a time (no int-to-float unit: the fp16 bit trick), which Triton may apply after the codes reach the
  dot's register layout, so the shared-memory traffic stays one byte per code.
* ``tile_cvt``: the same with Triton's own int8 -> fp16 conversion (one I2F per code).
* ``tile_k8``: K through an int8 x int8 tensor-core dot with q quantized per head (scale amax / 127), V as
  ``tile_asm``. Changes the numbers (q is rounded); timed to know what it would buy.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton
import triton.language as tl

import kernels
import kernels.reference as ref
from course_lib.device import HAS_GPU
from kernels.paged_attention import _merge_splits_kernel, plan_splits

from benchmarks.kv_quant import make_caches
from benchmarks.paged_attention import graph_time
from benchmarks.roofline import device_name, slug


@triton.jit
def _i8x4_to_f16(x):
    """int8 codes -> exact fp16 values, 4 per 32-bit register: flip the sign bits (c + 128, unsigned), put 0x64
    above each byte (the fp16 number 1024 + c + 128), subtract 1152 from both halves at once."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, m;
        mov.b32 m, 0x64806480;
        xor.b32 t, $2, 0x80808080;
        prmt.b32 $0, t, 0x64646464, 0x4140;
        prmt.b32 $1, t, 0x64646464, 0x4342;
        sub.f16x2 $0, $0, m;
        sub.f16x2 $1, $1, m;
        }""",
        constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _codes_to(x, DOT_TY: tl.constexpr, CONV_ASM: tl.constexpr):
    if CONV_ASM:
        return _i8x4_to_f16(x)
    else:
        return x.to(DOT_TY)


@triton.jit
def _tile_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr, sm_scale_log2e,
                 tokens_per_split, stride_qb, stride_qh, stride_bt, stride_ob, stride_oh, stride_os, stride_lb,
                 stride_lh,
                 NUM_KV_HEADS: tl.constexpr, G: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                 P: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, K_INT8_DOT: tl.constexpr,
                 CONV_ASM: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(context_len, start + tokens_per_split)
    DOT_TY: tl.constexpr = q_ptr.dtype.element_ty
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    q_heads = kv_head * G + g
    g_mask = g < G
    q = tl.load(q_ptr + seq * stride_qb + q_heads[:, None] * stride_qh + d[None, :], mask=g_mask[:, None], other=0.0)
    if K_INT8_DOT:
        qf = q.to(tl.float32)
        q_amax = tl.max(tl.abs(qf), axis=1)
        q_scale = tl.where(q_amax > 0, q_amax / 127.0, 1.0)
        q8 = tl.floor(qf / q_scale[:, None] + 0.5).to(tl.int8)
    m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        t = tile_start + n
        t_mask = t < end
        blk = tl.load(bt_ptr + seq * stride_bt + t // P, mask=t_mask, other=0)
        row = (blk.to(tl.int64) * P + t % P) * NUM_KV_HEADS + kv_head
        k = tl.load(k_ptr + row[:, None] * D + d[None, :], mask=t_mask[:, None], other=0)        # [BLOCK_N, D] codes
        ks = tl.load(ks_ptr + row, mask=t_mask, other=0.0).to(tl.float32)
        if K_INT8_DOT:
            s = tl.dot(q8, tl.trans(k)).to(tl.float32) * q_scale[:, None]
        else:
            s = tl.dot(q, tl.trans(_codes_to(k, DOT_TY, CONV_ASM)))
        s = tl.where(t_mask[None, :], s * ks[None, :] * sm_scale_log2e, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + row[:, None] * D + d[None, :], mask=t_mask[:, None], other=0)
        vs = tl.load(vs_ptr + row, mask=t_mask, other=0.0).to(tl.float32)
        pv = (p * vs[None, :]).to(DOT_TY)
        acc = tl.dot(pv, _codes_to(v, DOT_TY, CONV_ASM), acc * alpha[:, None])
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = out_ptr + seq * stride_ob + q_heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    if SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + seq * stride_lb + q_heads * stride_lh + split, lse, mask=g_mask)


def tile_decode(q, k_cache, v_cache, k_scale, v_scale, tables, lens, *, max_context_len, BLOCK_N=64, num_warps=4,
                num_stages=2, programs_per_sm=6, K_INT8_DOT=False, CONV_ASM=True, num_splits=None, kernel_out=None):
    B, Hq, D = q.shape
    N, P, Hkv, _ = k_cache.shape
    _, splits, per_split = plan_splits(q, tables, lens, P, Hkv, num_splits, max_context_len, BLOCK_N, programs_per_sm)
    out = torch.empty_like(q)
    scale = math.log2(math.e) / math.sqrt(D)
    G = Hq // Hkv
    meta = dict(NUM_KV_HEADS=Hkv, G=G, GROUP_PAD=max(16, triton.next_power_of_2(G)), D=D, P=P, BLOCK_N=BLOCK_N,
                K_INT8_DOT=K_INT8_DOT, CONV_ASM=CONV_ASM and k_cache.dtype == torch.int8 and q.dtype == torch.float16,
                num_warps=num_warps, num_stages=num_stages)
    common = (q, k_cache, v_cache, k_scale, v_scale, tables, lens)
    if splits == 1:
        h = _tile_kernel[(B, Hkv, 1)](*common, out, out, scale, per_split, q.stride(0), q.stride(1), tables.stride(0),
                                      out.stride(0), out.stride(1), 0, 0, 0, SPLIT=False, **meta)
    else:
        partial = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
        h = _tile_kernel[(B, Hkv, splits)](*common, partial, lse, scale, per_split, q.stride(0), q.stride(1),
                                           tables.stride(0), partial.stride(0), partial.stride(1), partial.stride(2),
                                           lse.stride(0), lse.stride(1), SPLIT=True, **meta)
        _merge_splits_kernel[(B, Hq)](partial, lse, out, splits, partial.stride(0), partial.stride(1),
                                      partial.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                                      HEAD_DIM=D, DIM_PAD=triton.next_power_of_2(D),
                                      SPLITS_PAD=max(2, triton.next_power_of_2(splits)))
    if kernel_out is not None:
        kernel_out.append(h)
    return out


def candidates():
    yield dict(kernel="planes")
    yield dict(kernel="planes", K_INT8_DOT=True)
    yield dict(kernel="planes", K_INT8_DOT=True, num_warps=4)
    yield dict(kernel="planes", BIASED=True)
    yield dict(kernel="planes", BIASED=True, K_INT8_DOT=True)
    for n in (16, 32, 64):
        for lazy in (True, False):
            yield dict(kernel="gluon", BLOCK_N=n, LAZY_RESCALE=lazy)
    yield dict(kernel="gluon", BLOCK_N=32, V_WIDE=False, K_WIDE=False)
    yield dict(kernel="gluon", BLOCK_N=32, K_WIDE=False)
    for n in (64, 128):
        for w in (2, 4):
            for st in (1, 2, 3):
                for pps in (3, 6):
                    yield dict(kernel="tile_asm", BLOCK_N=n, num_warps=w, num_stages=st, programs_per_sm=pps)
    for n, w, st in ((64, 4, 2), (128, 4, 2), (64, 2, 2)):
        yield dict(kernel="tile_cvt", BLOCK_N=n, num_warps=w, num_stages=st, programs_per_sm=6, CONV_ASM=False)
    for n in (64, 128):
        for w in (2, 4):
            for st in (2, 3):
                yield dict(kernel="tile_k8", BLOCK_N=n, num_warps=w, num_stages=st, programs_per_sm=6, K_INT8_DOT=True)


def label(c: dict) -> str:
    """kernel[/k8][/biased]/BLOCK_N/num_warps/num_stages/programs_per_sm of a candidate (empty: the kernel's own)."""
    return (f"{c['kernel']}{'/k8' if c.get('K_INT8_DOT') else ''}{'/biased' if c.get('BIASED') else ''}"
            f"{'/eager' if c.get('LAZY_RESCALE') is False else ''}{'/narrow_v' if c.get('V_WIDE') is False else ''}"
            f"{'/narrow_k' if c.get('K_WIDE') is False else ''}/"
            f"{c.get('BLOCK_N', '')}/{c.get('num_warps', '')}/"
            f"{c.get('num_stages', '')}/{c.get('programs_per_sm', '')}")


def call_for(c, q, caches, tables, lens, L, kernel_out=None):
    if c["kernel"] == "planes":
        config = {k: v for k, v in c.items() if k != "kernel"}
        return lambda: kernels.paged_attention_int8_decode(q, *caches, tables, lens, max_context_len=L, validate=False,
                                                           config=config)
    if c["kernel"] == "gluon":
        from kernels.paged_attention_int8_gluon import paged_attention_int8_decode_gluon
        config = {k: v for k, v in c.items() if k != "kernel"}
        return lambda: paged_attention_int8_decode_gluon(q, *caches, tables, lens, max_context_len=L, validate=False,
                                                         config=config)
    kw = {k: v for k, v in c.items() if k != "kernel"}
    return lambda: tile_decode(q, *caches, tables, lens, max_context_len=L, kernel_out=kernel_out, **kw)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--splits", action="store_true",
                        help="instead: the shipped kernel at forced split counts over many shapes, and its registers")
    args = parser.parse_args(argv)
    if not HAS_GPU:
        sys.exit("int8_kernel_sweep.py times compiled kernels: it needs a CUDA GPU")
    Hq, Hkv, D, P = 32, 8, 128, 16
    name = device_name()
    t0 = time.perf_counter()
    print(f"device {name} torch {torch.__version__} triton {triton.__version__}", flush=True)

    def check_and_time(c, q, caches, tables, lens, L, want):
        handles, extra = [], {}
        try:
            call = call_for(c, q, caches, tables, lens, L, handles)
            got = call().float()
            if c["kernel"] == "planes" and c.get("K_INT8_DOT"):   # exact for q rounded to int8
                extra = dict(err_unrounded=(got - want).abs().max().item())
                want = ref.paged_attention_int8_decode(ref.round_query_int8(q), *caches, tables, lens).float()
            err = (got - want).abs().max().item()
            tol = 2e-3 * (1 + want.abs().max().item())
            if not err <= tol:
                return dict(err=err, failed=f"wrong: max abs error {err:.3g} > {tol:.3g}", **extra)
            info = dict(extra)
            if handles:
                h = handles[-1]
                info.update(n_regs=h.n_regs, n_spills=h.n_spills)
            return dict(err=err, us=graph_time(call, 3, 20) * 1e6, **info)
        except Exception as exc:  # a configuration that does not compile or run: recorded, the sweep goes on
            return dict(failed=f"{type(exc).__name__}: {str(exc)[:300]}")

    if args.splits:
        return split_sweep(args, name, t0)
    rows = []
    B, L = 32, 8192
    q, kc, vc, tables, lens, quantized = make_caches(B, L, Hq, Hkv, D, P, torch.float16, {"int8": torch.int8}, seed=1)
    caches = quantized["int8"]
    want = ref.paged_attention_int8_decode(q, *caches, tables, lens).float()
    fp16_call = lambda: kernels.paged_attention_decode(q, kc, vc, tables, lens, max_context_len=L, validate=False)
    t16 = graph_time(fp16_call, 3, 20) * 1e6
    print(f"B={B} L={L}: fp16 {t16:.1f} us", flush=True)
    stage1 = []
    for c in candidates():
        r = check_and_time(c, q, caches, tables, lens, L, want)
        r.update(c, B=B, L=L, fp16_us=t16, ratio=r["us"] / t16 if "us" in r else None)
        stage1.append(r)
        print(json.dumps(r), flush=True)
    q = kc = vc = quantized = caches = None  # free this shape's memory (not del: closures above use the names)
    ok = sorted((r for r in stage1 if r.get("us")), key=lambda r: r["us"])
    keys = ("kernel", "BLOCK_N", "num_warps", "num_stages", "programs_per_sm", "CONV_ASM", "K_INT8_DOT", "BIASED",
            "LAZY_RESCALE", "V_WIDE", "K_WIDE")
    best_planes_switch = next(({k: r[k] for k in keys if k in r} for r in ok if r["kernel"] == "planes"
                               and (r.get("K_INT8_DOT") or r.get("BIASED"))), None)
    top = [{k: r[k] for k in keys if k in r} for r in ok[:args.top]]
    if not any(c["kernel"] == "planes" for c in top):
        top.append(dict(kernel="planes"))
    best_k16 = next(({k: r[k] for k in keys if k in r} for r in ok if r["kernel"] == "tile_asm"), None)
    best_gluon = next(({k: r[k] for k in keys if k in r} for r in ok if r["kernel"] == "gluon"), None)
    for best in (best_k16, best_planes_switch, best_gluon):
        if best and best not in top:
            top.append(best)
    for B, L in ((8, 16384), (32, 1024), (32, 4096), (32, 16384), (32, 32768), (64, 8192), (64, 16384)):
        q, kc, vc, tables, lens, quantized = make_caches(B, L, Hq, Hkv, D, P, torch.float16, {"int8": torch.int8},
                                                         seed=L + B)
        caches = quantized["int8"]
        want = ref.paged_attention_int8_decode(q, *caches, tables, lens).float()
        fp16_call = lambda: kernels.paged_attention_decode(q, kc, vc, tables, lens, max_context_len=L, validate=False)
        t16 = graph_time(fp16_call, 3, 20) * 1e6
        for c in top:
            r = check_and_time(c, q, caches, tables, lens, L, want)
            r.update(c, B=B, L=L, fp16_us=t16, ratio=r["us"] / t16 if "us" in r else None)
            rows.append(r)
        print(f"B={B} L={L} fp16 {t16:.1f} us: " + "  ".join(
            f"{label(r)}={r['ratio']:.3f}" if r.get("ratio") else f"{label(r)}=FAIL" for r in rows[-len(top):]),
            flush=True)
        q = kc = vc = quantized = caches = None  # free this shape's memory (not del: closures above use the names)
    result = dict(note=__doc__, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), device=name,
                  torch=torch.__version__, triton=triton.__version__, shapes=dict(Hq=Hq, Hkv=Hkv, D=D, P=P),
                  timing="CUDA-graph replay, L2 flushed, median of 20", stage1=stage1, top=top, rows=rows,
                  seconds=time.perf_counter() - t0)
    out = args.out or Path("benchmarks/results") / f"int8_kernel_sweep_{slug(name)}_{dt.date.today()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("best at B=32 L=8192:")
    for r in ok[:8]:
        print(f"  {r['us']:7.1f} us ratio {r['ratio']:.3f} regs {r.get('n_regs')} spills {r.get('n_spills')} "
              + " ".join(f"{k}={r[k]}" for k in keys if k in r))
    print(f"wrote {out} in {result['seconds']:.0f} s")


def compiled_resources(jit_fn) -> dict:
    """Registers and spills per thread, shared memory per program, of the kernel jit_fn compiled last (with
    SPLIT=True: the split sweep's last launches), from Triton's cache."""
    compiled = None
    for cache in jit_fn.device_caches.values():
        for k in cache[0].values():
            compiled = k
    if compiled is None:
        return {}
    return dict(n_regs=compiled.n_regs, n_spills=compiled.n_spills, shared=compiled.metadata.shared)


def split_sweep(args, name, t0):
    import kernels.paged_attention_int8 as pa8
    Hq, Hkv, D, P = 32, 8, 128, 16
    rows = []
    for B, L in ((32, 8192), (64, 8192), (16, 8192), (8, 16384), (32, 16384), (64, 16384), (32, 32768), (128, 8192),
                 (32, 4096)):
        q, kc, vc, tables, lens, quantized = make_caches(B, L, Hq, Hkv, D, P, torch.float16, {"int8": torch.int8},
                                                         seed=B + L)
        caches = quantized["int8"]
        want = ref.paged_attention_int8_decode(q, *caches, tables, lens).float()
        fp16_call = lambda: kernels.paged_attention_decode(q, kc, vc, tables, lens, max_context_len=L, validate=False)
        t16 = graph_time(fp16_call, 3, 20) * 1e6
        line = []
        for splits in (None, 1, 2, 3, 4, 5, 6, 8, 12, 16):
            call = lambda: kernels.paged_attention_int8_decode(q, *caches, tables, lens, max_context_len=L,
                                                               validate=False, num_splits=splits)
            err = (call().float() - want).abs().max().item()
            us = graph_time(call, 3, 20) * 1e6
            chosen = pa8.plan_splits(q, tables, lens, P, Hkv, splits, L, pa8.CONFIG["BLOCK_N"],
                                     resident_per_sm=pa8.RESIDENT_PER_SM)[1]
            rows.append(dict(B=B, L=L, splits=splits or "auto", actual_splits=chosen, us=us, fp16_us=t16,
                             ratio=us / t16, err=err))
            line.append(f"{splits or 'auto'}:{chosen}={us / t16:.3f}")
        print(f"B={B} L={L} fp16 {t16:.1f} us ({2 * B * L * Hkv * D * 2 / t16 / 1e6:.2f} TB/s): " + " ".join(line),
              flush=True)
        q = kc = vc = quantized = caches = None  # free this shape's memory (not del: closures above use the names)
    resources = compiled_resources(pa8._paged_attention_int8_kernel)
    print("compiled:", json.dumps(resources), flush=True)
    result = dict(note="Split-count sweep of kernels/paged_attention_int8.py (shipped CONFIG) + its registers per "
                       "thread",
                  date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), device=name,
                  torch=torch.__version__, triton=triton.__version__, config=dict(pa8.CONFIG),
                  resident_per_sm=pa8.RESIDENT_PER_SM, rows=rows, compiled=resources, seconds=time.perf_counter() - t0)
    out = args.out or Path("benchmarks/results") / f"int8_split_sweep_{slug(name)}_{dt.date.today()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
