"""FlashAttention forward + backward (training): our Triton kernels vs torch SDPA's flash and cuDNN backends (lesson 3).

    python -m benchmarks.flash_attention_bwd            # GPU: bf16, D = 64/128, N = 1k..16k, causal and not (< 4 min)
    python -m benchmarks.flash_attention_bwd --quick    # smoke run: tiny shapes in the interpreter on CPU (seconds),
                                                        # 2 shapes on a GPU
    python -m benchmarks.flash_attention_bwd --atomic-dq --head-dims 128   # also ours with atomic dQ, D = 128 only
    python -m benchmarks.flash_attention_bwd --hopper-forward tma_wide --head-dims 128   # also the TMA forward

Shapes as in ``benchmarks/flash_attention.py`` (FlashAttention's benchmarks): B·N = 16k tokens, Hq = Hkv = 2048 / D
heads. For each shape and implementation, in the same run: the forward with inputs that require grad (ours then
also writes the log-sum-exp) and forward + backward (``out.backward(dO)``), timed with ``triton.testing.do_bench``
(median, CUDA events, gradients reset to None between runs); the backward's time is their difference.
FLOPs: forward 4·B·H·N²·D, backward 10·B·H·N²·D (5 matmuls, P recomputed: FlashAttention's convention, so the
TFLOP/s of every implementation count the same work; ours does 7 matmuls, see kernels/flash_attention_bwd.py);
causal halves both. Before timing, every implementation's dq, dk, dv are compared with SDPA-flash's (max abs
error, and relative to max |grad|); a row where ours disagrees is recorded with its errors and not timed.
``--atomic-dq`` adds ``ours_atomic``: ours with ``dq_mode="atomic"`` (kernels/flash_attention_bwd.py: dQ added by the
dK/dV programs with fp32 atomics, 5 matmuls), timed in the same rows, with its own ``ours_atomic_vs_*`` ratios.
``ours`` runs the library's default forward (``hopper="auto"``: the TMA kernel at D = 128 on an sm_90+ GPU, the
portable one elsewhere; each row's ``ours_forward`` says which; rows without it ran the portable one).
``--hopper-forward tma_wide`` adds ``ours_tma``: the forward through that TMA variant
(``kernels.flash_attention_hopper``), the same backward, with its own ``ours_tma_vs_*`` ratios;
``--hopper-forward portable`` adds ``ours_portable``, the portable forward; ``--hopper-forward gluon`` adds
``ours_gluon``, the warp-specialized Gluon forward (``kernels.flash_attention_gluon``, where its scope allows).
Writes ``benchmarks/results/flash_attention_bwd_<device-slug>.json`` after every row (a run cut short keeps its data).
"""
from __future__ import annotations

import time

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import torch.nn.functional as F
import triton

import kernels
import kernels.flash_attention_bwd as bwd
from kernels.flash_attention import use_hopper_forward
from course_lib.device import DEVICE, HAS_GPU, INTERPRET
from course_lib.model.online_softmax import attention_backward_flops, attention_flops

from course_lib.analysis.roofline import time_fn

from benchmarks.flash_attention import probe_backends, sdpa, sdpa_backends
from benchmarks.record import parse_args, print_readme_row, provenance, write

#: Agreement required before ours is timed: max |ours - SDPA-flash| <= GRAD_RTOL · max |SDPA-flash| for each gradient
#: (bf16 rounds P and dS to 8 bits of mantissa; two correct bf16 kernels differ by ~1% of the largest gradient).
GRAD_RTOL = 5e-2


def config(quick: bool) -> dict:
    if HAS_GPU and quick:
        return dict(dtype=torch.bfloat16, head_dims=[64], Ns=[1024, 4096], tokens=16384, width=2048)
    if HAS_GPU:
        return dict(dtype=torch.bfloat16, head_dims=[64, 128], Ns=[1024, 4096, 8192, 16384], tokens=16384, width=2048)
    return dict(dtype=torch.float32, head_dims=[16], Ns=[16] if quick else [32, 64, 128], tokens=64, width=32)


def ours(dq_mode: str, hopper: bool | str = "auto"):
    """Our attention whose backward computes dQ in ``dq_mode``: the autograd function reads the module's DQ_MODE at
    the forward, so it is set for the forward only and restored (the other implementations are unaffected).
    ``hopper``: the forward (``kernels.flash_attention(hopper=...)``: "auto", the library's default, a TMA variant, or
    False for the portable kernel), the backward unchanged."""
    def attention(q, k, v, causal):
        previous, bwd.DQ_MODE = bwd.DQ_MODE, dq_mode
        try:
            return kernels.flash_attention(q, k, v, causal=causal, hopper=hopper)
        finally:
            bwd.DQ_MODE = previous
    return attention


def extra_name(hopper_forward: str) -> str:
    """The column of ``--hopper-forward``: ours_portable, ours_gluon, or ours_tma for a TMA variant."""
    return {"portable": "ours_portable", "gluon": "ours_gluon"}.get(hopper_forward, "ours_tma")


def implementations(usable: dict, atomic_dq: bool = False, hopper_forward: str | None = None) -> dict:
    """name -> attention(q, k, v, causal): ours (and with ``atomic_dq`` ours_atomic, with ``hopper_forward`` ours_tma),
    and SDPA restricted to each usable backend (on CPU: SDPA's default, the math backend, as the reference the errors
    are measured against)."""
    impls = {"ours": ours("separate")}
    if atomic_dq:
        impls["ours_atomic"] = ours("atomic")
    if hopper_forward:   # "portable": ours_portable, "gluon": ours_gluon; a TMA variant's name: ours_tma
        impls[extra_name(hopper_forward)] = ours("separate", False if hopper_forward == "portable" else hopper_forward)
    impls.update({name: (lambda q, k, v, causal, b=backend: sdpa(b, q, k, v, causal))
                  for name, backend in usable.items()})
    if not HAS_GPU:
        impls["sdpa_math"] = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return impls


def grads(fn, q, k, v, do, causal) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)


def bench(fn, leaves: tuple[torch.Tensor, ...]) -> float:
    """Median seconds of fn(), the leaves' .grad reset to None before each run (no accumulation timed): do_bench
    on a GPU (CUDA events, L2 cleared between runs), perf_counter on CPU (the interpreter is slow: few reps)."""
    if HAS_GPU:
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(leaves), return_mode="median") / 1e3

    def run():
        for t in leaves:
            t.grad = None
        fn()
    return time_fn(run, warmup=1, reps=2)


def main(argv: list[str] | None = None) -> dict:
    def add_arguments(parser):
        parser.add_argument("--atomic-dq", action="store_true",
                            help='also time ours with dq_mode="atomic" (ours_atomic) in every row')
        parser.add_argument("--hopper-forward", default=None, metavar="VARIANT",
                            help="also time ours with this forward: a TMA variant (ours_tma, e.g. tma_wide), "
                                 "portable (ours_portable) or gluon (ours_gluon)")
        parser.add_argument("--head-dims", type=lambda text: [int(d) for d in text.split(",")], default=None,
                            help="comma-separated head dims to run, of the configured ones (default: all)")

    args = parse_args(__doc__, "flash_attention_bwd", "smoke run: tiny shapes (CPU, interpreter) or two shapes (GPU)",
                      argv, add_arguments)
    cfg = config(args.quick)
    if args.head_dims is not None:
        if not set(args.head_dims) <= set(cfg["head_dims"]):
            raise SystemExit(f"--head-dims {args.head_dims}: this run's head dims are {cfg['head_dims']}")
        cfg["head_dims"] = [D for D in cfg["head_dims"] if D in args.head_dims]
    t_start = time.perf_counter()
    result = provenance("flash_attention_bwd", "benchmarks.flash_attention_bwd", argv, cfg["dtype"], args.quick,
                        engine=False)
    result.update(
        cudnn=torch.backends.cudnn.version() if HAS_GPU else None,
        kernel_mode="interpreter" if INTERPRET else "compiled",
        timing=dict(tool="triton.testing.do_bench" if HAS_GPU else "time.perf_counter", statistic="median",
                    warmup_ms=25, rep_ms=100, backward="fwd_bwd_seconds - fwd_seconds"),
        shapes=dict(rule=f"B = {cfg['tokens']} // N, Hq = Hkv = {cfg['width']} // D, Sq = Skv = N",
                    flops="forward 4*B*H*N^2*D, backward 10*B*H*N^2*D (5 matmuls); causal halves both"),
        grad_reference=None, grad_rtol=GRAD_RTOL, backends={}, speed=[])

    def save():
        result["total_seconds"] = time.perf_counter() - t_start
        if not INTERPRET:  # what the autotuners picked, per key
            from kernels.flash_attention import _attn_fwd_tuned
            tuned = dict(fwd=_attn_fwd_tuned, dkdv=bwd._attn_bwd_dkdv_tuned, dq=bwd._attn_bwd_dq_tuned,
                         dkdv_dq=bwd._attn_bwd_dkdv_dq_tuned)
            result["autotuned"] = {name: {str(key): str(conf) for key, conf in kernel.cache.items()}
                                   for name, kernel in tuned.items()}
        return write(result, "flash_attention_bwd", args.out)

    backends = sdpa_backends() if HAS_GPU else {}
    q, k, v = (torch.randn(1, 16, 256, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))   # the probe runs forward and backward: a backend may lack either
    result["backends"] = probe_backends(lambda backend: grads(lambda *a: sdpa(backend, *a), q, k, v,
                                                              torch.ones_like(q), True))
    impls = implementations({b: backend for b, backend in backends.items() if result["backends"][b] == "available"},
                            args.atomic_dq, args.hopper_forward)
    extra = extra_name(args.hopper_forward) if args.hopper_forward else None
    result["dq_modes"] = dict(ours="separate", **({"ours_atomic": "atomic"} if args.atomic_dq else {}),
                              **({extra: "separate"} if args.hopper_forward else {}))
    # ours: the library's default forward (hopper="auto": each row's ours_forward says which kernel it ran)
    result["forward_variants"] = dict(ours="auto", **({extra: args.hopper_forward} if args.hopper_forward else {}))
    reference = next((name for name in ("sdpa_flash", "sdpa_cudnn", "sdpa_math") if name in impls), None)
    result["grad_reference"] = reference
    print(f"device: {result['device']}  torch {torch.__version__}  triton {triton.__version__}  "
          f"backends {result['backends']}", flush=True)

    dtype = cfg["dtype"]
    for D in cfg["head_dims"]:
        for causal in (False, True):
            for N in cfg["Ns"]:
                B, H = max(1, cfg["tokens"] // N), cfg["width"] // D
                gen = torch.Generator(device=DEVICE).manual_seed(0)
                q, k, v, do = (torch.randn(B, H, N, D, device=DEVICE, dtype=dtype, generator=gen) for _ in range(4))
                q, k, v = (t.requires_grad_() for t in (q, k, v))
                row = dict(dtype=str(dtype).removeprefix("torch."), D=D, causal=causal, N=N, B=B, H=H,
                           ours_forward="tma" if use_hopper_forward(q, None) else "portable",
                           fwd_flops=attention_flops(B, H, N, N, D, causal),
                           bwd_flops=attention_backward_flops(B, H, N, N, D, causal))
                want = grads(impls[reference], q, k, v, do, causal) if reference else None
                for name, fn in impls.items():
                    got = grads(fn, q, k, v, do, causal)  # ours: the first call autotunes forward and backward
                    if want is not None and name != reference:
                        for g_name, g, w in zip(("dq", "dk", "dv"), got, want):
                            err, scale = (g.float() - w.float()).abs().max().item(), w.float().abs().max().item()
                            row[f"{name}_{g_name}_max_abs_err"], row[f"{name}_{g_name}_rel_err"] = err, err / scale
                        if max(row[f"{name}_{g}_rel_err"] for g in ("dq", "dk", "dv")) > GRAD_RTOL:
                            row[f"{name}_error"] = f"gradients differ from {reference}'s by more than {GRAD_RTOL:g}"
                            print(f"WARNING: {name} at {row}: {row[f'{name}_error']}; not timed", flush=True)
                            continue
                    got = None

                    def fwd(fn=fn):
                        return fn(q, k, v, causal)

                    def fwd_bwd(fn=fn):
                        fn(q, k, v, causal).backward(do)

                    t_fwd, t_all = bench(fwd, (q, k, v)), bench(fwd_bwd, (q, k, v))
                    row.update({f"{name}_fwd_seconds": t_fwd, f"{name}_fwd_bwd_seconds": t_all,
                                f"{name}_bwd_seconds": t_all - t_fwd,
                                f"{name}_fwd_bwd_tflops": (row["fwd_flops"] + row["bwd_flops"]) / t_all / 1e12,
                                f"{name}_bwd_tflops": row["bwd_flops"] / max(t_all - t_fwd, 1e-12) / 1e12})
                for mine in result["dq_modes"]:
                    for name in impls:
                        if name not in result["dq_modes"] and f"{mine}_fwd_bwd_seconds" in row \
                                and f"{name}_fwd_bwd_seconds" in row:   # > 1: ours is faster
                            row[f"{mine}_vs_{name}"] = row[f"{name}_fwd_bwd_seconds"] / row[f"{mine}_fwd_bwd_seconds"]
                            row[f"{mine}_vs_{name}_bwd"] = row[f"{name}_bwd_seconds"] / row[f"{mine}_bwd_seconds"]
                result["speed"].append(row)
                save()
                speed = "  ".join(f"{name} {row[f'{name}_fwd_bwd_tflops']:6.1f}" for name in impls
                                  if f"{name}_fwd_bwd_tflops" in row)
                errors = "".join(f"  {name} grad err {max(row[f'{name}_{g}_rel_err'] for g in ('dq', 'dk', 'dv')):.1e}"
                                 for name in impls if f"{name}_dq_rel_err" in row)
                print(f"{row['dtype']:>8} D={D:3d} causal={causal!s:5} N={N:5d} B={B:2d} H={H:2d} fwd+bwd: {speed} "
                      f"TFLOP/s{errors}", flush=True)
                q = k = v = do = want = None  # free this shape's memory (not del: closures above use the names)
    path = save()
    print(f"wrote {path} in {result['total_seconds']:.1f} s")
    print_readme_row(path)
    return result


if __name__ == "__main__":
    main()
