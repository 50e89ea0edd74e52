"""Serving benchmark at real model shapes (lesson 10, issue 19): ``LLMEngine`` against transformers' best.

    python -m benchmarks.serving --quick                 # CPU: the tiny model, a few short requests (~1 min)
    python -m benchmarks.serving --models qwen3-0.6b --workloads nano-vllm --time-limit 540   # one GPU call

On one trace and one card, the same weights for every system (a random-init model of a real shape is saved to a
temp folder first, and both ``course_lib`` and ``transformers`` load that folder), it compares:

* ``LLMEngine`` with every switch on (paged KV, continuous batching, chunked prefill, prefix caching, and on a GPU the
  Triton kernels, CUDA graphs and async scheduling); ``--ablation`` adds one row per switch turned off (and one
  with INT8 K/V);
* ``transformers`` ``generate()`` in static batches (``course_lib.serving.hf_baseline``), its batch size swept
  (``--hf-batch-sizes``, 8 ... 256 on a GPU; each sweep point one run, on one batch of the trace or on the whole trace,
  ``--hf-sweep-sample``), then the best batch size measured on the whole trace with repeats, ``attn_implementation``
  recorded;
* ``transformers``' own continuous batching (``generate_batch``'s manager, ``course_lib.serving.hf_continuous``), with
  the engine's KV capacity in tokens (``--hf-cb-kv same``) or its own sizing from free memory (``auto``); a version
  without it gets a row that says so. Its defaults turn its CUDA graphs and async batching on only where the attention
  needs no mask (off for ``paged|sdpa``); ``--hf-cb-graphs on`` forces both on (the row's config says which);
* optionally ``static-ours`` (``StaticBatchEngine``, the course model in the same static batches as HF's best): how much
  of the gap is HF's own per-step overhead;
* the **HBM floor** of the trace: the bytes of the schedule the engine actually ran (every weight once per step, the
  K/V of every scheduled sequence's context once) over this device's measured copy bandwidth
  (``benchmarks.serving_runs.hbm_floor``).

Workloads: ``nano-vllm`` (its ``bench.py``: 256 requests, prompts and outputs uniform in 100-1024 tokens, EOS ignored,
seed 0: 133,966 output tokens) and the course's four (``course_lib.experiments.capstone_workloads``: chat,
multi-turn, long-cot, multimodal; lengths stated for a 2,048-token context). Models: ``qwen3-0.6b`` and
``llama-3.2-1b`` shapes with RANDOM weights (context cut to ``--max-model-len``, 2,048), and the shipped tiny model
(trained; context 512, so every workload is scaled to a quarter; on any device its steps are host-bound).

Measurement: every system serves an untimed warm-up first (on a GPU: every prompt of the trace, 2 output tokens);
``--repeats`` (3) timed runs of each row, the rows interleaved (repeat r runs the rows in an order rotated by r),
median and min-max reported; tokens are counted the same way for every system (each request's tokens up to its
requested length, nothing past it, no padding); wall time of serving the trace, setup (engine / manager
construction, KV allocation, graph capture) excluded for every system. Throughput = output tokens / wall time; TPOT
p50 from each system's per-token times. Ratios in ``summary`` are medians over medians, with the decomposition vs
static batching: ratio = (HF's forward passes / the engine's) x (HF's time per pass / the engine's), both measured.

Sweeps (each a flag, each a list of rows in ``sweeps``): ``--sweep-concurrency`` N requests at once (engine
``max_num_seqs`` = HF batch = N), ``--sweep-context`` prompt length L at a fixed concurrency, ``--sweep-kv-budget``
K full contexts of K/V (engine blocks = K x context, HF static batch = K reservations, HF continuous batching the same
tokens) on the nano-vllm trace. Throughput and TPOT p50 per point and system.

Writes ``benchmarks/results/serving_<device-slug>.json`` (or ``--out``) after every run, with provenance (git commit,
torch / triton / transformers / CUDA driver versions, GPU, CPU model, date, command); ``--time-limit`` stops starting
runs after that many seconds and still writes the file (``complete`` false). ``--merge A.json B.json`` joins files of
the same commit, device and versions (one per GPU call); a workload measured in several of them pools its runs, so
the repeats of a row that takes minutes (HF's continuous batching) can come from separate calls.

GPU run plan (one H100, calls of at most 10 minutes). Durations measured on an H100 on 2026-12-06 (gpu_checks.md), on
the nano-vllm trace with qwen3-0.6b: setup (random-init model saved and loaded by both systems, warm-up) ~60 s;
LLMEngine ~13 s a run (after b830606; 94 s before; ~9 s with async scheduling, cd2882f, session 7; the async
ablation alone, 3 repeats of 2 rows, took 98 s); HF continuous batching 307 s a run; HF generate at B = 128 on one
batch of 128 requests 132 s, at B = 8 on one batch of 8 93 s (so the default sweep 8..256 on one batch each is ~10 min
alone). --time-limit stops starting runs after that many seconds and still writes the file; each call below fits:
    # 1. the headline vs HF's continuous batching: the engine 3x, HF CB once (~8 min)
    python -m benchmarks.serving --models qwen3-0.6b --workloads nano-vllm --systems llmengine,hf-cb --repeats 1 \
        --time-limit 400 --out benchmarks/results/serving_part1.json
    # 2. the headline vs HF's best static batch, measured on the whole trace (the sweep point is the run): ~8 min
    python -m benchmarks.serving --models qwen3-0.6b --workloads nano-vllm --systems llmengine,hf-static \
        --hf-batch-sizes 128 --hf-sweep-sample full --repeats 1 --time-limit 400 \
        --out benchmarks/results/serving_part2.json
    # 3. the same with B = 256 (the best static batch on an 80 GB card is 128 or 256; the KV of 256 x 2,048 tokens
    #    is ~30 GB in bf16 beside the engine's freed pool): ~9 min
    python -m benchmarks.serving --models qwen3-0.6b --workloads nano-vllm --systems llmengine,hf-static \
        --hf-batch-sizes 256 --hf-sweep-sample full --repeats 1 --time-limit 400 \
        --out benchmarks/results/serving_part3.json
    # 4. llama-3.2-1b on nano-vllm, the engine and HF CB: ~9 min
    python -m benchmarks.serving --models llama-3.2-1b --workloads nano-vllm --systems llmengine,hf-cb --repeats 1 \
        --time-limit 420 --out benchmarks/results/serving_part4.json
    # 5. qwen3-0.6b on the course's four workloads (64 requests each): ~8 min
    python -m benchmarks.serving --models qwen3-0.6b --workloads chat,multi-turn,long-cot,multimodal \
        --num-requests 64 --repeats 1 --hf-batch-sizes 64 --hf-sweep-sample full --time-limit 420 \
        --out benchmarks/results/serving_part5.json
    # 6. sweeps on qwen3-0.6b, engine and HF continuous batching, 1 repeat: ~8 min
    python -m benchmarks.serving --models qwen3-0.6b --workloads none --systems llmengine,hf-cb --sweep-repeats 1 \
        --sweep-concurrency 8,32,128,256 --sweep-context 256,1024,1792 --sweep-kv-budget 8,32,128 \
        --time-limit 420 --out benchmarks/results/serving_part6.json
    # 7. the tiny model (host-bound on any device), all five workloads, the ablation rows: ~5 min
    python -m benchmarks.serving --models tiny --ablation --time-limit 420 --out benchmarks/results/serving_part7.json
    # the lesson and the README read every serving_*.json; rename the parts serving_<device>_<date><letter>.json
    # (benchmarks/gpu_call.sh runs each of these as a step: STEPS=serving1 ... serving7)
On a 4- or 8-GPU host the calls can run side by side, one per GPU (CUDA_VISIBLE_DEVICES=k ... &; wait), in one call:
each comparison stays on one card. Set COURSE_GIT_COMMIT where the tree has no .git (record.git_commit).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch

from benchmarks import record
from benchmarks.serving_runs import (MODELS, aggregate, build_models, copy_bandwidth, free_memory, hbm_floor, merge,
                                     run_engine, run_hf_cb, run_hf_static, run_static_ours, summarize_workload)
from course_lib.analysis.roofline import RESULTS_DIR
from course_lib.device import HAS_GPU, default_dtype
from course_lib.experiments.capstone_workloads import WORKLOADS as COURSE_WORKLOADS, capstone_workloads
from course_lib.experiments.workloads import Trace, nanovllm_trace, uniform_trace
from course_lib.model.tokenizer import Tokenizer
from course_lib.serving.hf_continuous import available as hf_cb_available

WORKLOADS = ("nano-vllm",) + COURSE_WORKLOADS
SYSTEMS = ("llmengine", "hf-static", "hf-cb", "static-ours")
DEFAULT_SYSTEMS = ("llmengine", "hf-static", "hf-cb")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: every switch off in turn (the engine row has them all on), and INT8 K/V on top
#: (``--ablation`` all of them, or ``--ablation async,graphs``: the keys)
ABLATION = {"graphs": ("LLMEngine - CUDA graphs", dict(enforce_eager=True)),
            "async": ("LLMEngine - async scheduling", dict(async_scheduling=False)),
            "prefix": ("LLMEngine - prefix caching", dict(enable_prefix_caching=False)),
            "chunked": ("LLMEngine - chunked prefill", dict(enable_chunked_prefill=False)),
            "int8": ("LLMEngine + INT8 KV", dict(kv_cache_dtype="int8"))}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str, allowed, what: str) -> list[str]:
    names = [] if text.strip() in ("", "none") else [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return names


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU check: the tiny model, 8 short requests, small sweeps")
    p.add_argument("--models", default=None,
                   help=f"comma-separated from {','.join(MODELS)} (default: all; --quick tiny)")
    p.add_argument("--workloads", default=None,
                   help=f"comma-separated from {','.join(WORKLOADS)}, or none (default: all; --quick nano-vllm,chat)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma-separated from {','.join(SYSTEMS)}")
    p.add_argument("--ablation", nargs="?", const=",".join(ABLATION), default="",
                   help=f"add the engine's rows with one switch off (+ INT8 KV): all, or some of {','.join(ABLATION)}")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per workload (default: nano-vllm 256, the course's 64; --quick 8)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context of the random-init shapes")
    p.add_argument("--max-output", type=int, default=None, help="cap every output length (default: --quick 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep-repeats", type=int, default=None,
                   help="repeats of the sweeps (default --repeats; --quick 1)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="an untimed warm-up run of every system first (default: on a GPU)")
    p.add_argument("--hf-batch-sizes", default=None, help="HF static batch sizes swept (default 8,16,32,64,128,256; "
                                                          "--quick 2,4,8)")
    p.add_argument("--hf-sweep-sample", choices=("batch", "full"), default=None,
                   help="each sweep point on one batch (the first B requests) or the whole trace (default: batch on a "
                        "GPU, full on a CPU)")
    p.add_argument("--hf-cb-kv", choices=("same", "auto"), default="same",
                   help="KV of transformers' continuous batching: the engine's token capacity, or its own sizing "
                        "from free GPU memory (a GPU only)")
    p.add_argument("--hf-cb-graphs", choices=("default", "on"), default="default",
                   help="transformers' continuous batching with its own defaults (CUDA graphs and async batching "
                        "only where the attention needs no mask: off for paged sdpa), or with both forced on")
    p.add_argument("--max-num-seqs", type=int, default=None, help="the engine's batch (default 256; --quick 8)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="the engine's token budget per step (default 8192 on a GPU, 512 on a CPU)")
    p.add_argument("--sweep-concurrency", default=None, help="e.g. 8,32,128,256 (--quick 2,4)")
    p.add_argument("--sweep-context", default=None, help="prompt lengths, e.g. 256,1024,1792 (--quick 64,192)")
    p.add_argument("--sweep-kv-budget", default=None, help="full contexts of K/V, e.g. 8,32,128 (--quick 2,4)")
    p.add_argument("--sweep-batch", type=int, default=None, help="concurrency of the context sweep (default 64; "
                                                                 "--quick 4)")
    p.add_argument("--sweep-output", type=int, default=None, help="output tokens in the concurrency and context sweeps "
                                                                  "(default 256; --quick 16)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: no run starts after this; the file is still written (default 420 on a GPU: the "
                        "run under way finishes after it)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1: steadier on shared cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="output JSON (default benchmarks/results/serving_<device>.json)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="instead of running: join result files of the same commit, device and versions")
    args = p.parse_args(argv)
    q = args.quick
    args.models = _names(args.models or ("tiny" if q else ",".join(MODELS)), MODELS, "model")
    args.workloads = _names(args.workloads or ("nano-vllm,chat" if q else ",".join(WORKLOADS)), WORKLOADS, "workload")
    args.systems = _names(args.systems, SYSTEMS, "system")
    args.ablation = _names(args.ablation, ABLATION, "ablation row")
    args.hf_batch_sizes = _ints(args.hf_batch_sizes or ("2,4,8" if q else "8,16,32,64,128,256"))
    args.hf_sweep_sample = args.hf_sweep_sample or ("batch" if HAS_GPU else "full")
    args.max_output = args.max_output or (32 if q else None)
    args.max_num_seqs = args.max_num_seqs or (8 if q else 256)
    args.max_num_batched_tokens = args.max_num_batched_tokens or (8192 if HAS_GPU else 512)
    for name, quick in (("sweep_concurrency", "2,4"), ("sweep_context", "64,192"), ("sweep_kv_budget", "2,4")):
        value = getattr(args, name)
        setattr(args, name, _ints(value) if value else (_ints(quick) if q else []))
    args.sweep_batch = args.sweep_batch or (4 if q else 64)
    args.sweep_output = args.sweep_output or (16 if q else 256)
    if args.time_limit is None and HAS_GPU:
        args.time_limit = 420.0
    args.sweep_repeats = args.sweep_repeats or (1 if q else args.repeats)
    args.warmup = HAS_GPU if args.warmup is None else args.warmup
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.hf_cb_kv == "auto" and not HAS_GPU:
        raise SystemExit("--hf-cb-kv auto sizes transformers' cache from free memory: on a CPU that is the host's RAM")
    return args


# ---------------------------------------------------------------- provenance
def provenance(argv, dtype) -> dict:
    import transformers

    info = record.provenance("serving", "benchmarks.serving", argv, dtype, False)
    info["transformers"] = transformers.__version__
    info["gpu"] = torch.cuda.get_device_name(0) if HAS_GPU else None
    info["host_bound_note"] = (None if HAS_GPU else "a CPU run: every system's steps are host-bound (Python and "
                               "per-op overhead); its ratios say nothing about a GPU")
    return info


# ---------------------------------------------------------------- traces
def cap_outputs(trace: Trace, cap: int | None) -> Trace:
    if cap is None:
        return trace
    from course_lib.model.sampling import SamplingParams

    params = [SamplingParams(max_tokens=min(p.max_tokens, cap)) for p in trace.params]
    return Trace(trace.prompts, params, trace.arrival_times, trace.description + f" (outputs capped at {cap})")


def make_trace(workload: str, model, tokenizer, args) -> Trace:
    C, V = model.config.max_position_embeddings, model.config.vocab_size
    if workload == "nano-vllm":
        return nanovllm_trace(args.num_requests or (8 if args.quick else 256), C, vocab_size=V, seed=args.seed,
                              max_output=args.max_output)
    n = args.num_requests or (8 if args.quick else 64)
    trace = capstone_workloads(n, C, names=[workload], tokenizer=tokenizer, vocab_size=V, seed=args.seed)[workload]
    return cap_outputs(trace, args.max_output)


def warmup_trace(trace: Trace, max_tokens: int = 2) -> Trace:
    """Every prompt of the trace, all at once, outputs cut to ``max_tokens``: the timed run's prompt lengths, prefill
    chunks and batch sizes run once before the clock starts, so that kernels compiled (or autotuned, or captured) on
    first use are ready. A warm-up of the two longest requests left some shapes to the timed run: at commits that ran
    mixed steps eagerly, the engine's runs on nano-vllm's trace then started seconds late (TTFT p50 2.5-3.0 s against
    0.2-0.3 s, the same TPOT: lesson 10)."""
    from course_lib.model.sampling import SamplingParams

    return Trace([list(p) for p in trace.prompts], [SamplingParams(max_tokens=max_tokens) for _ in trace.prompts],
                 [0.0] * len(trace), "warm-up")


# ---------------------------------------------------------------- the run: rows, interleaved repeats, saved each time
class Bench:
    """The result file and the clock: ``measure`` runs one timed run of a row (never raising: a failing run records
    its error), recomputes the row's median and spread and writes the file."""

    def __init__(self, args, argv, dtype):
        self.args, self.t_start = args, time.perf_counter()
        self.result = provenance(argv, dtype)
        self.out = args.out or RESULTS_DIR / f"serving_{self.result['device_slug']}.json"
        self.result.update(
            quick=args.quick, config=dict(
                models=args.models, workloads=args.workloads, systems=args.systems, ablation=args.ablation,
                repeats=args.repeats, hf_batch_sizes=args.hf_batch_sizes, hf_sweep_sample=args.hf_sweep_sample,
                hf_cb_kv=args.hf_cb_kv, hf_cb_graphs=args.hf_cb_graphs, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                max_output=args.max_output, num_requests=args.num_requests, seed=args.seed,
                time_limit_s=args.time_limit, warmup=args.warmup,
                sweep_repeats=args.sweep_repeats,
                engine_switches="paged KV, continuous batching, chunked prefill, prefix caching (emptied before "
                                "every run)" + (", Triton kernels, CUDA graphs" if HAS_GPU else
                                                " (CPU: plain-torch references, no CUDA graphs)"),
                int8_row="the same number of blocks as the engine row (same tokens, about half the bytes)"),
            timing="wall time of serving the trace (CUDA synchronized), setup excluded for every system; throughput "
                   "= requested output tokens / wall time (each request's tokens up to its requested length, no "
                   "padding, nothing past it); rows interleaved, repeat r in an order rotated by r; median and "
                   "min-max over the repeats",
            models={}, workloads={}, rows=[], floors=[], summary=[],
            sweeps=dict(concurrency=[], context=[], kv_budget=[]), complete=False)
        self.result["copy_bandwidth_Bps"], self.result["copy_bandwidth_method"] = copy_bandwidth()
        self.ref_tokens: dict = {}

    def time_left(self) -> bool:
        limit = self.args.time_limit
        return limit is None or time.perf_counter() - self.t_start < limit

    def save(self) -> None:
        self.result["total_seconds"] = time.perf_counter() - self.t_start
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.result, indent=1, default=str) + "\n")

    def measure(self, row: dict, fn) -> dict | None:
        """One run of ``row`` by ``fn()`` -> run dict; the row updated and the file written."""
        if not self.time_left():
            row.setdefault("skipped_runs", 0)
            row["skipped_runs"] += 1
            if not row["runs"]:
                row["status"] = "skipped: --time-limit reached"
            self.save()
            return None
        t0 = time.perf_counter()
        try:
            run = fn()
        except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError) as err:  # OOM included
            run = dict(status=f"error: {type(err).__name__}: {str(err)[:300]}")
        free_memory()
        run["seconds"] = time.perf_counter() - t0
        self._compare_tokens(row, run)
        row["runs"].append(run)
        aggregate(row)
        tput = f"{run['throughput_tok_s']:10,.1f} tok/s" if run["status"] == "ok" else run["status"][:90]
        where = row.get("workload") or f"{row.get('sweep')}={row.get('x')}"
        print(f"  {row['model']:>12} | {where:>18} | {row['config']:<34} {tput}  ({run['seconds']:.1f} s)", flush=True)
        self.save()
        return run


    def _compare_tokens(self, row: dict, run: dict) -> None:
        """``same_tokens_as_engine``: the fraction of requests whose tokens equal the engine's first run's (greedy on
        the same weights; bf16 on a GPU may break near-ties differently). Without an engine row, the first run's."""
        hashes = run.pop("_token_hashes", None)
        if hashes is None:
            return
        key = (row["model"], row.get("workload"), row.get("sweep"), row.get("x"))
        ref = self.ref_tokens.get(key)
        if ref is None or (row["system"] == "llmengine" and ref[0] != "llmengine"):
            self.ref_tokens[key] = ref = (row["system"], hashes)
        pairs = list(zip(hashes, ref[1]))
        run["same_tokens_as_" + ("engine" if ref[0] == "llmengine" else "first_run")] = (
            sum(a == b and a is not None for a, b in pairs) / len(pairs))


def new_row(rows: list, **fields) -> dict:
    row = dict(fields, runs=[], status="not run")
    rows.append(row)
    return row


def interleave(bench: Bench, todo: list[tuple[dict, object]], repeats: int) -> None:
    """Repeat r runs every row that has fewer than r + 1 runs, in an order rotated by r."""
    for r in range(repeats):
        k = r % len(todo) if todo else 0
        for row, fn in todo[k:] + todo[:k]:
            if len(row["runs"]) <= r and row["status"] not in ("not available",):
                bench.measure(row, fn)


def hf_cb_graphs(args) -> bool | None:
    """transformers' continuous batching: None for its own defaults, True for its CUDA graphs and async batching."""
    return True if args.hf_cb_graphs == "on" else None


def hf_cb_config(args) -> str:
    return "HF continuous batching" + (", CUDA graphs + async batching" if args.hf_cb_graphs == "on" else "")


def engine_kwargs(args, **extra) -> dict:
    return dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                enable_chunked_prefill=True, enable_prefix_caching=True) | extra


def bench_workload(bench: Bench, model, hf_model, mname: str, workload: str, trace: Trace) -> None:
    args, rows, C = bench.args, bench.result["rows"], model.config.max_position_embeddings
    warm = warmup_trace(trace) if args.warmup else None
    bench.result["workloads"][f"{mname}/{workload}"] = dict(
        model=mname, workload=workload, description=trace.description, num_requests=len(trace),
        prompt_tokens=int(trace.prompt_lens.sum()), output_tokens=int(trace.output_lens.sum()),
        mean_prompt=float(trace.prompt_lens.mean()), mean_output=float(trace.output_lens.mean()))
    key = dict(model=mname, workload=workload)
    state = dict(num_blocks=None, floor=None)

    def engine_fn(extra: dict, floor: bool):
        def fn():
            kw = engine_kwargs(args, **extra)
            if state["num_blocks"] is not None:            # the first run's KV capacity for every later engine
                kw.setdefault("num_blocks", state["num_blocks"])
            run, engine = run_engine(model, trace, kw, warm)
            if state["num_blocks"] is None:
                state["num_blocks"] = engine.num_blocks
            if floor and run["status"] == "ok" and state["floor"] is None:
                state["floor"] = hbm_floor(engine, trace, bench.result["copy_bandwidth_Bps"]) | key
                bench.result["floors"].append(state["floor"])
            del engine
            return run
        return fn

    todo = []
    if "llmengine" in args.systems:
        engine_row = new_row(rows, **key, system="llmengine", config="LLMEngine (all switches)")
        bench.measure(engine_row, engine_fn({}, True))                 # first: its KV capacity sizes HF's
        todo.append((engine_row, engine_fn({}, True)))
        for name, extra in (ABLATION[a] for a in args.ablation):
            todo.append((new_row(rows, **key, system="llmengine-ablation", config=name), engine_fn(extra, False)))
    # the engine's KV capacity, or the trace's own tokens if fewer (more could never be used; a smaller cache is
    # also less likely to run the card out of memory beside the models)
    kv_tokens = min((state["num_blocks"] or args.max_num_seqs * -(-C // 16)) * 16,
                    int(trace.prompt_lens.sum() + trace.output_lens.sum()) + 256 * len(trace))
    if "hf-cb" in args.systems:
        reason = hf_cb_available(hf_model)
        cb_row = new_row(rows, **key, system="hf-cb", config=hf_cb_config(args),
                         kv_tokens=kv_tokens if args.hf_cb_kv == "same" else "auto")
        if reason:
            cb_row["status"] = "not available"
            cb_row["note"] = reason
        else:
            kv = kv_tokens if args.hf_cb_kv == "same" else None
            mbt = None if HAS_GPU else args.max_num_batched_tokens
            cb_fn = lambda kv=kv, mbt=mbt: run_hf_cb(hf_model, trace, kv, mbt, warm, hf_cb_graphs(args))
            bench.measure(cb_row, cb_fn)                   # second: a run cut short still has the three systems
            todo.append((cb_row, cb_fn))
    best = None
    if "hf-static" in args.systems or "static-ours" in args.systems:
        sweep = []
        for B in args.hf_batch_sizes:
            sample = trace if args.hf_sweep_sample == "full" else Trace(
                trace.prompts[:B], trace.params[:B], trace.arrival_times[:B], trace.description + f" (first {B})")
            row = new_row(rows, **key, system="hf-static-sweep", config=f"HF generate B={B}", batch_size=B,
                          sample_requests=len(sample))
            bench.measure(row, lambda B=B, s=sample: run_hf_static(hf_model, s, B, C, warm))
            sweep.append(row)
        ok = [r for r in sweep if r["status"] == "ok"]
        best = max(ok, key=lambda r: r["throughput_tok_s"])["batch_size"] if ok else None
    if best is not None and "hf-static" in args.systems:
        row = new_row(rows, **key, system="hf-static", config=f"HF generate, best B={best}", batch_size=best,
                      chosen_from=args.hf_batch_sizes)
        if args.hf_sweep_sample == "full":                 # the sweep's run of the best B was on this very trace
            run = next(r for r in rows if r.get("system") == "hf-static-sweep" and r["model"] == mname
                       and r["workload"] == workload and r["batch_size"] == best)["runs"][0]
            row["runs"].append(dict(run, from_sweep=True))
            aggregate(row)
        todo.append((row, lambda: run_hf_static(hf_model, trace, best, C, warm)))
    if best is not None and "static-ours" in args.systems:
        row = new_row(rows, **key, system="static-ours", config=f"static, ours B={best}", batch_size=best)
        todo.append((row, lambda: run_static_ours(model, trace, best, warm)))
    interleave(bench, todo, args.repeats)
    summarize_workload(bench.result, mname, workload)
    bench.save()


# ---------------------------------------------------------------- sweeps: how cost grows
def bench_sweeps(bench: Bench, model, hf_model, mname: str) -> None:
    """Throughput and TPOT p50 vs concurrency, context length and KV budget (``--sweep-*``); every point's rows of
    every system interleaved over the repeats. Each system gets the same KV token capacity at a point."""
    args, C = bench.args, model.config.max_position_embeddings
    blocks = lambda contexts: contexts * -(-C // 16)                     # engine blocks of 16 tokens
    out_len = lambda prompt: max(1, min(args.sweep_output, C - prompt - 1))
    prompt0 = max(1, round(512 * C / 2048))                              # the concurrency sweep's prompt length
    V = model.config.vocab_size
    points = []                                                          # (sweep, x, trace, concurrency, contexts)
    for n in args.sweep_concurrency:
        points.append(("concurrency", n, uniform_trace(n, prompt0, out_len(prompt0), vocab_size=V, seed=args.seed),
                       n, n))
    for L in args.sweep_context:
        if L + 1 >= C:
            print(f"  sweep-context: {L} does not fit the context {C}: skipped", flush=True)
            continue
        points.append(("context", L, uniform_trace(args.sweep_batch, L, out_len(L), vocab_size=V, seed=args.seed),
                       args.sweep_batch, args.sweep_batch))
    nano = nanovllm_trace(args.num_requests or (8 if args.quick else 256), C, vocab_size=V, seed=args.seed,
                          max_output=args.max_output)
    for k in args.sweep_kv_budget:
        points.append(("kv_budget", k, nano, args.max_num_seqs, k))
    todo = []
    for sweep, x, trace, conc, contexts in points:
        warm = warmup_trace(trace) if args.warmup else None
        rows = bench.result["sweeps"][sweep]
        key = dict(model=mname, sweep=sweep, x=x, trace=trace.description, concurrency=conc, kv_contexts=contexts,
                   kv_tokens=blocks(contexts) * 16)
        if "llmengine" in args.systems:
            kw = engine_kwargs(args, max_num_seqs=conc, num_blocks=blocks(contexts),
                               max_num_batched_tokens=max(args.max_num_batched_tokens, conc))
            todo.append((new_row(rows, **key, system="llmengine", config="LLMEngine (all switches)"),
                         lambda kw=kw, t=trace, w=warm: run_engine(model, t, kw, w)[0]))
        if "hf-static" in args.systems:
            todo.append((new_row(rows, **key, system="hf-static", config=f"HF generate B={contexts}",
                                 batch_size=contexts),
                         lambda B=contexts, t=trace, w=warm: run_hf_static(hf_model, t, B, C, w)))
        if "hf-cb" in args.systems and hf_cb_available(hf_model) is None:
            mbt, kv = (None if HAS_GPU else args.max_num_batched_tokens), blocks(contexts) * 16
            todo.append((new_row(rows, **key, system="hf-cb", config=hf_cb_config(args)),
                         lambda kv=kv, t=trace, w=warm, m=mbt: run_hf_cb(hf_model, t, kv, m, w, hf_cb_graphs(args))))
    interleave(bench, todo, args.sweep_repeats)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        result = merge([json.loads(p.read_text()) for p in args.merge])
        out = args.out or RESULTS_DIR / f"serving_{result['device_slug']}.json"
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"merged {len(args.merge)} files into {out}")
        report(result)
        return result
    if not HAS_GPU:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype()
    bench = Bench(args, argv, dtype)
    print(f"{bench.result['device']}  torch {torch.__version__}  transformers {bench.result['transformers']}  "
          f"dtype {bench.result['dtype']}  copy bandwidth {bench.result['copy_bandwidth_Bps'] / 1e9:.1f} GB/s  "
          f"commit {bench.result['git_commit'][:12]}", flush=True)
    for mname in args.models:
        if not bench.time_left():
            break
        with tempfile.TemporaryDirectory() as tmp:
            model, hf_model, info = build_models(mname, args.max_model_len, dtype, Path(tmp), args.seed)
            tokenizer = _tokenizer(mname)
        bench.result["models"][mname] = info
        print(f"model {mname}: {info['description']}; transformers {info['hf_class']} attn "
              f"{info['hf_attn_implementation']}", flush=True)
        for w in args.workloads:
            trace = make_trace(w, model, tokenizer, args)
            print(f" {trace.description}", flush=True)
            bench_workload(bench, model, hf_model, mname, w, trace)
        if args.sweep_concurrency or args.sweep_context or args.sweep_kv_budget:
            bench_sweeps(bench, model, hf_model, mname)
        del model, hf_model
        free_memory()
    bench.result["complete"] = bench.time_left() and all(
        r["status"] == "ok" or r["status"] == "not available"
        for r in bench.result["rows"] + [x for v in bench.result["sweeps"].values() for x in v])
    bench.save()
    report(bench.result)
    print(f"wrote {bench.out} ({bench.result['total_seconds']:.0f} s)")
    return bench.result


def _tokenizer(mname: str):
    """The tiny model's tokenizer (the course's workloads then prompt with corpus text); random ids otherwise."""
    from course_lib.model.checkpoint import CHECKPOINTS

    path = CHECKPOINTS / "tiny-target"
    return Tokenizer(path) if mname == "tiny" and (path / "tokenizer.json").exists() else None


def _fmt(r: dict | None) -> str:
    return "-" if not r else f"{r['median']:.2f}x ({r['low']:.2f}-{r['high']:.2f})"


def report(result: dict) -> None:
    """The summary as text: per model and workload, tok/s of each system and the ratios with their ranges."""
    print()
    print(f"{'model':>12} {'workload':>11} {'LLMEngine':>10} {'HF static':>10} {'best B':>6} {'HF CB':>10} "
          f"{'floor':>10}  {'x HF static (range)':>22} {'x HF CB (range)':>22}  HF/engine: passes x time per pass")
    num = lambda v: "-" if v is None else f"{v:10,.1f}"
    for s in result["summary"]:
        d = s.get("decomposition_vs_hf_static")
        dec = f"{d['passes_ratio']:.2f} x {d['time_per_pass_ratio']:.2f}" if d else "-"
        print(f"{s['model']:>12} {s['workload']:>11} {num(s['engine_tok_s'])} {num(s['hf_static_best_tok_s'])} "
              f"{str(s['hf_static_best_batch'] or '-'):>6} {num(s['hf_cb_tok_s'])} {num(s['floor_tok_s'])}  "
              f"{_fmt(s['engine_x_hf_static']):>22} {_fmt(s['engine_x_hf_cb']):>22}  {dec}")
    for sweep, rows in result.get("sweeps", {}).items():
        for r in rows:
            if r["status"] == "ok":
                print(f"  sweep {sweep:>11} x={r['x']:<6} {r['model']:>12} {r['config']:<26} "
                      f"{r['throughput_tok_s']:10,.1f} tok/s  TPOT p50 {1e3 * r.get('tpot_p50', float('nan')):.2f} ms")
    if result.get("host_bound_note"):
        print(result["host_bound_note"])


if __name__ == "__main__":
    main()
