"""The Gluon forward's launch parameters, swept: key tile (BLOCK_N), K/V buffers (STAGES), the consumer groups'
register budget and the switches of ``DEFAULT_CONFIG``, each checked against cuDNN's output and timed beside cuDNN and
``tma_wide`` (issue 21).

    python -m benchmarks.flash_attention_gluon_configs            # an sm_90 GPU: D = 128, N = 8k, bf16

``kernels.flash_attention_gluon`` runs one fixed config (``DEFAULT_CONFIG``); this sweep says which one to fix.
Shapes: B = 16384 // N, H = 2048 // D (the Hopper ablation's), causal and not. Writes
``benchmarks/results/flash_attention_gluon_configs_<device>.json`` (or ``--out``) after every config.
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

from benchmarks.flash_attention import bench, device_name, sdpa, slug
from benchmarks.record import git_commit
from course_lib.analysis.roofline import RESULTS_DIR, datasheet
from course_lib.model.online_softmax import attention_flops
from kernels import flash_attention_gluon as fg
from kernels import flash_attention_hopper as tma

#: the configs tried (each a compilation): tile width, buffers, consumer registers (the producer keeps 24), the
#: causal loop split at the diagonal, the heaviest query blocks launched first, the softmax's scale folded into one
#: FMA per score, the two consumer groups' matmuls issued in turns (FA3's ping-pong), one program per SM looping over
#: query tiles (FA3's persistent scheduler). The first sweep (fd08f7e) also timed BLOCK_N 64 with 3 buffers and the
#: rotated loop (ROTATE, removed since): slower.
CONFIGS = [dict(BLOCK_N=128, STAGES=2), dict(BLOCK_N=128, STAGES=3), dict(BLOCK_N=64, STAGES=2),
           dict(BLOCK_N=128, STAGES=2, consumer_regs=240),
           dict(FMA_SOFTMAX=True), dict(SPLIT_MASK=True), dict(HEAVY_FIRST=True),
           dict(SPLIT_MASK=True, HEAVY_FIRST=True),
           dict(SPLIT_MASK=True, HEAVY_FIRST=True, FMA_SOFTMAX=True),
           dict(SPLIT_MASK=True, HEAVY_FIRST=True, FMA_SOFTMAX=True, STAGES=3), dict(PINGPONG=True),
           dict(PINGPONG=True, FMA_SOFTMAX=True), dict(PINGPONG=True, FMA_SOFTMAX=True, STAGES=3),
           dict(PINGPONG=True, FMA_SOFTMAX=True, HEAVY_FIRST=True), dict(PERSISTENT=True),
           dict(PERSISTENT=True, SPLIT_MASK=True, HEAVY_FIRST=True, FMA_SOFTMAX=True),
           dict(PERSISTENT=True, PINGPONG=True, FMA_SOFTMAX=True, HEAVY_FIRST=True)]
#: D = 64 only: two programs per SM (launched with 80 registers a thread, 384 x 80 x 2 <= 65,536; consumers 104, a
#: 64-key tile fits them without spilling), so four consumer groups share an SM's Tensor Cores, as FlashAttention-3's
#: three groups of its 192-row tiles do at this head dim
TWO_PER_SM = dict(BLOCK_N=64, consumer_regs=104, maxnreg=80)
CONFIGS_D64 = [TWO_PER_SM, dict(TWO_PER_SM, SPLIT_MASK=True, HEAVY_FIRST=True, FMA_SOFTMAX=True),
               dict(TWO_PER_SM, PINGPONG=True, FMA_SOFTMAX=True), dict(TWO_PER_SM, STAGES=3)]
#: switches that change only the causal loop (without a mask a config runs without them, once)
CAUSAL_ONLY = ("SPLIT_MASK", "HEAVY_FIRST")


def failed_in_smoke(log_text: str) -> list[dict]:
    """The configs of the smoke run's failed cases (``flash_attention_gluon_smoke``'s JSON lines: status other than
    ok), as overrides of DEFAULT_CONFIG ({} when the default itself failed)."""
    failed = []
    for line in log_text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "case" in entry and entry.get("status") != "ok":
            failed.append(entry["case"][-1])
    return failed


def skipped_by_smoke(config: dict, failed: list[dict]) -> dict | None:
    """The failed smoke case that rules ``config`` out (a config that sets everything a failed case set), or None.
    A config that hung or was wrong in its smoke case is never timed: a hang would take the sweep's whole step."""
    return next((f for f in failed if all(config.get(key) == value for key, value in f.items())), None)


def configs_for(D: int, pick: list[str] | None = None) -> list[dict]:
    """The configs a row at head dim D runs: CONFIGS (+ CONFIGS_D64 at D = 64), or those ``pick`` names (``--pick``:
    a short call's choice), in the order given, each by its ``label`` ('128/2/232/split/heavy') or its index.
    ValueError naming what matches no config."""
    configs = CONFIGS + (CONFIGS_D64 if D == 64 else [])
    if pick is None:
        return configs
    by_label = {label({**fg.DEFAULT_CONFIG, **c}): c for c in configs}
    chosen, bad = [], []
    for name in pick:
        if name in by_label:
            chosen.append(by_label[name])
        elif name.isdigit() and int(name) < len(configs):
            chosen.append(configs[int(name)])
        else:
            bad.append(name)
    if bad:
        raise ValueError(f"--pick: {bad} name no config at D = {D} (labels: {', '.join(by_label)}; or indices "
                         f"0..{len(configs) - 1})")
    return chosen


def row_configs(D: int, causal: bool, pick: list[str] | None = None) -> list[dict]:
    """The configs one row (head dim D, causal or not) runs, as overrides of DEFAULT_CONFIG: ``configs_for``'s, where
    without a mask the causal-only switches are dropped (they change nothing there) and a config left equal to one
    before it runs once."""
    seen, out = [], []
    for cfg in configs_for(D, pick):
        if not causal:
            cfg = {key: value for key, value in cfg.items() if key not in CAUSAL_ONLY}
        if {**fg.DEFAULT_CONFIG, **cfg} not in seen:
            seen.append({**fg.DEFAULT_CONFIG, **cfg})
            out.append(cfg)
    return out


def label(config: dict) -> str:
    """'128/2/232' (BLOCK_N / buffers / consumer registers) plus '/rot', '/split', '/heavy', '/fma', '/pp', '/pers'
    for the switches on."""
    flags = [name for name, key in (("rot", "ROTATE"), ("split", "SPLIT_MASK"), ("heavy", "HEAVY_FIRST"),
                                    ("fma", "FMA_SOFTMAX"), ("pp", "PINGPONG"), ("pers", "PERSISTENT"))
             if config.get(key)]
    return "/".join([str(config["BLOCK_N"]), str(config["STAGES"]), str(config["consumer_regs"]), *flags])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--N", type=int, default=8192, help="sequence length (Sq = Skv)")
    parser.add_argument("--head-dims", default="128", help="e.g. 128,64")
    parser.add_argument("--time-limit", type=float, default=240.0, help="no new row after this many seconds")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--pick", default=None,
                        help="the configs to run, in this order, by label or index (e.g. 128/2/232,128/2/232/fma/pp)")
    parser.add_argument("--causal-first", action="store_true", help="the causal row of each head dim first")
    parser.add_argument("--smoke-log", type=Path, default=None,
                        help="flash_attention_gluon_smoke's output: configs whose smoke case failed are not run")
    args = parser.parse_args(argv)
    pick = args.pick.split(",") if args.pick else None
    for D in (int(d) for d in args.head_dims.split(",")):
        configs_for(D, pick)   # a wrong index fails here, before any GPU work
    why = fg.gluon_status()
    if why is not None:
        print(f"the Gluon kernel cannot run here: {why}")
        return {}
    from torch.nn.attention import SDPBackend

    failed = failed_in_smoke(args.smoke_log.read_text()) if args.smoke_log and args.smoke_log.exists() else []
    if failed:
        print(f"smoke cases failed with {failed}: configs that set the same are skipped", flush=True)
    name, t0 = device_name(), time.time()
    out_path = args.out or RESULTS_DIR / f"flash_attention_gluon_configs_{slug(name)}.json"
    result = dict(benchmark="flash_attention_gluon_configs", device=name, device_slug=slug(name),
                  git_commit=git_commit(), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(["python -m benchmarks.flash_attention_gluon_configs",
                                    *(argv if argv is not None else sys.argv[1:])]),
                  timing="triton.testing.do_bench, median, warmup 25 ms, rep 100 ms", dtype="bf16", N=args.N,
                  default_config=fg.DEFAULT_CONFIG, rows=[])
    for D in (int(d) for d in args.head_dims.split(",")):
        for causal in ((True, False) if args.causal_first else (False, True)):
            if time.time() - t0 > args.time_limit:
                result["stopped"] = "time limit"
                break
            B, H = 16384 // args.N, 2048 // D
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(B, H, args.N, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                       for _ in range(3))
            flops = attention_flops(B, H, args.N, args.N, D, causal)
            want = sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal)
            t_cudnn = bench(lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal))
            t_wide = bench(lambda: tma.flash_attention_hopper(q, k, v, causal=causal, variant="tma_wide"))
            row = dict(D=D, causal=causal, B=B, H=H, cudnn_tflops=flops / t_cudnn / 1e12,
                       tma_wide_vs_cudnn=t_cudnn / t_wide, configs=[])
            result["rows"].append(row)   # written after every config: a step cut short keeps what it timed
            for cfg in row_configs(D, causal, pick):
                entry = dict(config={**fg.DEFAULT_CONFIG, **cfg})
                ruled_out = skipped_by_smoke(entry["config"], failed)
                if ruled_out is not None:
                    entry["error"] = f"skipped: its smoke case failed ({ruled_out})"
                    row["configs"].append(entry)
                    continue
                try:
                    got = fg.flash_attention_gluon(q, k, v, causal=causal, config=cfg)
                    entry["max_abs_diff_vs_cudnn"] = (got.float() - want.float()).abs().max().item()
                    if entry["max_abs_diff_vs_cudnn"] < 5e-2:   # never time a wrong kernel
                        t = bench(lambda cfg=cfg: fg.flash_attention_gluon(q, k, v, causal=causal, config=cfg))
                        entry.update(seconds=t, tflops=flops / t / 1e12, vs_cudnn=t_cudnn / t)
                except Exception as exc:   # a config that fails to compile or run loses its cell, not the run
                    entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                row["configs"].append(entry)
                out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
            print(f"D={D} causal={causal!s:5}: cuDNN {row['cudnn_tflops']:.0f} TFLOP/s, tma_wide "
                  f"{row['tma_wide_vs_cudnn']:.2f}x; gluon " + ", ".join(
                      f"{label(e['config'])} "
                      + (f"{e['vs_cudnn']:.2f}x" if "vs_cudnn" in e else e.get("error", "wrong")[:60])
                      for e in row["configs"]), flush=True)
            best = max((e for e in row["configs"] if "vs_cudnn" in e), key=lambda e: e["vs_cudnn"], default=None)
            spec = datasheet(name)
            if best is not None:   # the strongest baseline first, then the roofline (issue 21)
                print(f"  best: {label(best['config'])} {best['vs_cudnn']:.2f}x cuDNN, {best['tflops']:.0f} TFLOP/s"
                      + (f" = {best['tflops'] * 1e12 / spec.peak_flops:.0%} of the datasheet's "
                         f"{spec.peak_flops / 1e12:.0f} (cuDNN {row['cudnn_tflops'] * 1e12 / spec.peak_flops:.0%})"
                         if spec else ""), flush=True)
            q = k = v = want = None   # free this row's memory (not del: the closures above use the names)
    out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
