"""Where an engine step's time goes (lesson 10): a decode step against its HBM floor, eager and as a CUDA graph,
and the engine on a decode-heavy trace, old path against new, with the GPU's busy fraction.

    python -m benchmarks.serving_step   # on a GPU: ~3 min; writes benchmarks/results/serving_step_<device>.json

Part 1, one decode step of the ``qwen3-0.6b`` shape (random weights: the time does not depend on their values) at
batch B over contexts of L tokens, timed three ways in the same run: the eager step (every kernel launched from
Python), the step replayed as a CUDA graph, and the **HBM floor**: the bytes a step must read (every weight once,
the K/V of every sequence once) divided by this card's measured copy bandwidth.

Part 2, a serving trace (the 0.37B LLaMA shape of issue 18: 128 requests, prompts 64-512 tokens, 256 output tokens
each, greedy, no early stop) through ``LLMEngine`` seven ways, each adding one thing: the old engine (eager, prefill
through the gather path), + the paged prefill kernel, + fused kernels, + CUDA graphs of the decode-only steps,
+ asynchronous scheduling, then two ways of replaying the mixed steps too: piecewise CUDA graphs (``cudagraph_mode=
"FULL_AND_PIECEWISE"``, ``course_lib.serving.piecewise_graph``) and one full graph per step, attention included
(``cudagraph_mode="FULL"``, ``course_lib.serving.full_graph``). The row with ``EngineConfig``'s default graph mode is
marked "(the default)". ``--rows 4,6`` runs a subset (row 0 always).
Throughput, steps, and the GPU's busy fraction
(kernel time / wall time, from torch.profiler over a second run of the whole trace, ``busy.requests``; files without
that field profiled the trace's first 64 requests only, a run at half the batch, whose shorter GPU steps leave the
host a larger share). No progress bar: its updates are host time too. Per row also the busy fraction of two
phases (``run_phases``): the prefill phase (up to the first step without prompt tokens) and steady decoding.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import course_lib.device  # noqa: F401  (first: the interpreter switch)
import torch

from benchmarks import record
from course_lib.device import HAS_GPU
from course_lib.model.config import PRESETS, ModelConfig
from course_lib.model.fused import fuse, unfuse
from course_lib.model.llama import Llama
from course_lib.model.sampling import SamplingParams
from course_lib.paging.block_manager import BlockManager
from course_lib.serving.config import EngineConfig
from course_lib.serving.cuda_graph import DecodeGraphs
from course_lib.serving.engine import LLMEngine
from course_lib.serving.kv_pool import KVPool
from course_lib.serving.model_runner import ModelRunner
from course_lib.serving.sequence import ScheduledChunk, Sequence

#: the 0.37B LLaMA of issue 18's measurements (hidden 1024, 24 layers, 16 heads, 8 KV heads, head dim 64)
LLAMA_037B = ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=1024)


def random_model(config: ModelConfig, dtype=torch.bfloat16) -> Llama:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Llama(config).to(dtype).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model


def copy_bandwidth(nbytes: int = 2 * 2**30, reps: int = 20) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), median of ``reps``."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times[3:])


def time_cuda(fn, reps: int = 30) -> float:
    """Median seconds of fn() by CUDA events (after 3 warm-ups)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def gpu_busy(fn) -> dict:
    """The GPU's busy fraction while fn() runs: the kernel time torch.profiler records in one run of fn, over the
    wall time of another run of fn without the profiler (whose own overhead would stretch the wall time)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start]
    kernel_time = sum(e.time_range.end - e.time_range.start for e in kernels) / 1e6
    return dict(wall_s=wall, kernels=len(kernels), kernel_time_s=kernel_time,
                busy_fraction=min(kernel_time / wall, 1.0))


# ---------------------------------------------------------------- part 1: one decode step vs its floor
def decode_step(model: Llama, batch: int, context: int, bandwidth: float, block_size: int = 16) -> dict:
    cfg = model.config
    blocks = -(-(context + 1) // block_size)
    pool = KVPool(cfg, batch * blocks + 1, block_size, dtype=model.dtype, device="cuda")
    for t in pool.k_caches + pool.v_caches:
        t.normal_()
    bm = BlockManager(batch * blocks + 1, block_size)
    rng = random.Random(0)
    chunks = []
    for i in range(batch):
        seq = Sequence(i, i, [rng.randrange(cfg.vocab_size) for _ in range(context + 1)])
        bm.allocate(i, context + 1)
        chunks.append(ScheduledChunk(seq, context, 1))   # decode the last token over `context` cached ones
    eager = ModelRunner(model, bm, pool, use_kernels=True)
    graphs = DecodeGraphs(model, pool, max_num_seqs=batch, max_model_len=context + 1, block_size=block_size)
    graphs.buckets = [batch]                               # one graph: this batch
    graphed = ModelRunner(model, bm, pool, use_kernels=True, graphs=graphs)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())   # tied embeddings counted once
    kv = batch * context * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    row = dict(batch=batch, context=context, weight_bytes=weights, kv_bytes=kv, floor_s=(weights + kv) / bandwidth)
    tokens = {}
    for name, runner, fused in (("eager", eager, False), ("eager_fused", eager, True), ("graph_fused", graphed, True)):
        (fuse if fused else unfuse)(model)
        tokens[name] = runner.execute(chunks).argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):                                # host + GPU, back to back: what a step costs the engine
            runner.execute(chunks)
        torch.cuda.synchronize()
        row[f"{name}_s"] = (time.perf_counter() - t0) / 20
        row[f"{name}_over_floor"] = row[f"{name}_s"] / row["floor_s"]
        busy = gpu_busy(lambda r=runner: [r.execute(chunks) for _ in range(10)])
        row[f"{name}_kernels_per_step"] = busy["kernels"] / 10
        row[f"{name}_gpu_s"] = busy["kernel_time_s"] / 10
        row[f"{name}_busy_fraction"] = busy["busy_fraction"]
    row["same_next_tokens_fused_vs_plain"] = float((tokens["graph_fused"] == tokens["eager"]).float().mean())
    return row


# ---------------------------------------------------------------- part 2: the engine on a trace
def trace(num_requests: int, output_len: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(64, 512))] for _ in range(num_requests)]
    return prompts, SamplingParams(max_tokens=output_len)


def run_phases(engine: LLMEngine, prompts, params, phase_fn) -> dict:
    """Serve ``prompts`` through the step API in two phases: **prefill**, the steps up to the first one that schedules
    no prompt token (every prompt admitted and prefilled, decodes beside them), then **decode**, the rest (the batch
    only shrinks as requests finish). ``phase_fn(name, run)`` runs each phase (``run()`` returns its step count)
    and returns what it measured: a timer, a profiler. Returns {phase: that}."""
    for i, prompt in enumerate(prompts):
        engine.add_request(i, prompt, params)

    # Each step as generate() takes it (``_step(finished_only=True)``): ``step()`` also builds the output of every
    # request that gained a token, host work generate() does not do (files before 2026-12-06's f71c25a measured with it)
    def prefill() -> int:
        steps = 0
        while engine.has_unfinished_requests():
            engine._step(finished_only=True)
            steps += 1
            if engine.last_step is not None and engine.last_step.num_prefill_tokens == 0:
                break
        return steps

    def decode() -> int:
        steps = 0
        while engine.has_unfinished_requests():
            engine._step(finished_only=True)
            steps += 1
        return steps

    return {name: phase_fn(name, run) for name, run in (("prefill", prefill), ("decode", decode))}


def phase_busy(engine: LLMEngine, prompts, params) -> dict:
    """The GPU's busy fraction in each phase of ``run_phases``: wall time from one unprofiled run, kernel time from
    a second, profiled one (the schedule is the same: greedy, all requests at once)."""
    from torch.profiler import ProfilerActivity, profile

    def timed(name, run):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        steps = run()
        torch.cuda.synchronize()
        return dict(steps=steps, wall_s=time.perf_counter() - t0)

    def profiled(name, run):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        return sum(e.time_range.end - e.time_range.start for e in prof.events()
                   if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start) / 1e6

    walls = run_phases(engine, prompts, params, timed)
    kernels = run_phases(engine, prompts, params, profiled)
    return {name: walls[name] | dict(kernel_time_s=kernels[name],
                                     busy_fraction=min(kernels[name] / walls[name]["wall_s"], 1.0))
            for name in walls}


#: Rows whose first timed run of the trace took less than REPEAT_BELOW_S seconds (the graph rows: ~1-2 s on an
#: H100) run it REPEATS times, wall_s their median: single runs of the same row differed by 0.1-0.3 s between
#: files (serving_step_nvidia-h100-80gb-hbm3_e.json and _f.json). The eager rows (10-18 s) run once: the step's
#: time limit.
REPEATS, REPEAT_BELOW_S = 3, 5.0


def serve(model: Llama, rows: list[tuple[str, dict]], num_requests: int, output_len: int, max_num_seqs: int,
          on_row=lambda results: None) -> list:
    """Each row's engine on the trace; ``on_row(results so far)`` after every row (the caller saves them)."""
    prompts, params = trace(num_requests, output_len, model.config.vocab_size)
    results = []
    for name, opts in rows:
        engine = LLMEngine(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048,
                           enforce_eager=opts["enforce_eager"], async_scheduling=opts["async_scheduling"],
                           cudagraph_mode=opts.get("cudagraph_mode", EngineConfig.cudagraph_mode))
        engine.pool.use_paged_prefill = opts["paged_prefill"]
        (fuse if opts["fused_kernels"] else unfuse)(model)
        # warm-up: the whole trace with 2 output tokens, so that every step shape of the timed run (its prefill
        # steps, decodes at every batch size) has compiled its Triton kernels and captured its graphs before it
        engine.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
        engine.generate(prompts[:8], SamplingParams(max_tokens=8), use_tqdm=False)
        walls = []
        while len(walls) < (1 if walls and walls[0] > REPEAT_BELOW_S else REPEATS):   # fast rows: REPEATS runs
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = engine.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            steps = len(engine.metrics.steps)
        wall = statistics.median(walls)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        busy = gpu_busy(lambda: engine.generate(prompts, params, use_tqdm=False))   # the same trace, profiled
        try:   # where the GPU waits: the prefill phase (eager steps) or steady decoding (replayed graphs)
            phases = phase_busy(engine, prompts, params)
        except Exception as err:   # a diagnosis: never at the cost of the row
            phases = dict(error=f"{type(err).__name__}: {err}"[:300])
        results.append(dict(row=name, **opts, output_tokens=tokens, wall_s=wall, wall_s_runs=walls,
                            tokens_per_s=tokens / wall,
                            steps=steps, busy=busy | dict(requests=len(prompts)), phases=phases))
        print(f"  {name:40s} {tokens / wall:9,.0f} tok/s  GPU busy {busy['busy_fraction']:.0%} "
              f"({busy['kernels']} kernels in {busy['wall_s']:.2f} s)" + "".join(
                  f"; {k} phase {v['steps']} steps, {v['wall_s']:.2f} s, busy {v['busy_fraction']:.0%}"
                  for k, v in phases.items() if isinstance(v, dict)), flush=True)
        on_row(results)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and batches")
    parser.add_argument("--rows", default=None, help="serving rows to run, by index (e.g. 4,5,6); default all")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not HAS_GPU:
        raise SystemExit("this benchmark needs a CUDA GPU (it measures CUDA graphs and the GPU's busy time)")
    result = record.provenance("serving_step", "benchmarks.serving_step", argv, torch.bfloat16, args.quick)
    bandwidth = copy_bandwidth()
    result["copy_bandwidth_Bps"] = bandwidth
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    qwen = dataclasses.replace(PRESETS["qwen3-0.6b"], max_position_embeddings=4096)
    model = random_model(qwen)
    result["decode_model"] = "qwen3-0.6b shape, random weights, bf16"
    result["decode"] = []
    for batch in ((1, 64) if args.quick else (1, 16, 64, 128)):
        row = decode_step(model, batch, 1024, bandwidth)
        result["decode"].append(row)
        print(f"  decode B={batch:3d} L=1024: floor {row['floor_s'] * 1e3:.2f} ms | " + " | ".join(
              f"{n} {row[n + '_s'] * 1e3:.2f} ms ({row[n + '_over_floor']:.2f}x, "
              f"{row[n + '_kernels_per_step']:.0f} kernels, "
              f"busy {row[n + '_busy_fraction']:.0%})" for n in ("eager", "eager_fused", "graph_fused"))
              + f" | same next token {row['same_next_tokens_fused_vs_plain']:.0%}", flush=True)
    del model
    torch.cuda.empty_cache()
    model = random_model(LLAMA_037B)
    result["serving_model"] = ("LLaMA 0.37B shape (hidden 1024, 24 layers, 16/8 heads, head dim 64), random weights, "
                               "bf16")
    n = 32 if args.quick else 128
    result["serving_trace"] = f"{n} requests, prompts uniform in 64-512 tokens, 256 output tokens each, greedy, no stop"
    sync = dict(async_scheduling=False)
    rows = [("old: eager, prefill by gather",
             dict(enforce_eager=True, paged_prefill=False, fused_kernels=False, **sync)),
            ("+ paged prefill kernel", dict(enforce_eager=True, paged_prefill=True, fused_kernels=False, **sync)),
            ("+ fused norm/RoPE/SwiGLU, merged GEMMs",
             dict(enforce_eager=True, paged_prefill=True, fused_kernels=True, **sync)),
            ("+ CUDA graphs", dict(enforce_eager=False, paged_prefill=True, fused_kernels=True,
                                   cudagraph_mode="FULL_DECODE_ONLY", **sync)),
            ("+ async scheduling",
             dict(enforce_eager=False, paged_prefill=True, fused_kernels=True, async_scheduling=True,
                  cudagraph_mode="FULL_DECODE_ONLY")),
            ("+ piecewise graphs for mixed steps",
             dict(enforce_eager=False, paged_prefill=True, fused_kernels=True, async_scheduling=True,
                  cudagraph_mode="FULL_AND_PIECEWISE")),
            ("+ full graphs for mixed steps",
             dict(enforce_eager=False, paged_prefill=True, fused_kernels=True, async_scheduling=True,
                  cudagraph_mode="FULL"))]
    # the engine as it ships: the row with EngineConfig's default graph mode (async scheduling is on by default on a
    # GPU); claims.default_row reads the mark
    rows = [(name + " (the default)" if kw.get("cudagraph_mode") == EngineConfig.cudagraph_mode
             and kw.get("async_scheduling") else name, kw) for name, kw in rows]
    if args.rows:   # a subset (the first row, the old engine, always: the speedups are over it)
        keep = {0, *map(int, args.rows.split(","))}
        rows = [r for i, r in enumerate(rows) if i in keep]
    # saved after every row with complete=False (a run cut short by a time limit keeps its rows; readers of complete
    # runs skip it), then once more, complete
    result["complete"] = False
    result["serving"] = serve(model, rows, n, 256, max_num_seqs=128,
                              on_row=lambda done: record.write(result | dict(serving=done), "serving_step", args.out))
    base = result["serving"][0]["tokens_per_s"]
    for r in result["serving"]:
        r["speedup_over_old"] = r["tokens_per_s"] / base
    result["complete"] = True
    path = record.write(result, "serving_step", args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
