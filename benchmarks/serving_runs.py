"""The pieces of ``python -m benchmarks.serving``: the models, one timed run of each system, the HBM floor of a
schedule, and the median / spread of a row's runs. See ``benchmarks/serving.py`` for what is compared and why."""
from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch

from course_lib import Llama, load_pretrained, save_pretrained
from course_lib.device import DEVICE, HAS_GPU
from course_lib.experiments.workloads import Trace
from course_lib.model.checkpoint import CHECKPOINTS
from course_lib.model.config import PRESETS
from course_lib.serving.engine import LLMEngine, _synchronize
from course_lib.serving.hf_baseline import HFStaticBatchBaseline, load_hf_model
from course_lib.serving.hf_continuous import HFContinuousBatching
from course_lib.serving.static_batching import StaticBatchEngine

MODELS = ("tiny", "qwen3-0.6b", "llama-3.2-1b")
#: what a run reports from its RunMetrics summary (besides the wall time measured here)
SUMMARY_KEYS = ("num_requests", "num_errors", "num_steps", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_mean", "itl_p99",
                "num_prefill_tokens", "num_padding_tokens", "prefix_cache_hit_rate", "max_blocks_used", "num_blocks",
                "preemptions", "num_recomputed_tokens")


def build_models(name: str, max_model_len: int | None, dtype: torch.dtype, tmp: Path, seed: int = 0):
    """(course model, transformers model, info) on the same weights: the shipped tiny target, or a random-init model
    of a ``PRESETS`` shape saved to ``tmp`` first; both systems load that one folder (safetensors)."""
    if name == "tiny":
        path = CHECKPOINTS / "tiny-target"
        desc = "course_lib tiny-target (trained, 5.4M parameters, context 512)"
    elif name in PRESETS:
        cfg = dataclasses.replace(PRESETS[name], max_position_embeddings=max_model_len or 2048)
        torch.manual_seed(seed)
        with torch.device(DEVICE):
            random_model = Llama(cfg).to(dtype)
        path = tmp / name
        save_pretrained(random_model, path, dtype=dtype)
        del random_model
        desc = (f"{name} shape, RANDOM weights (seed {seed}; time does not depend on the values), "
                f"{cfg.num_parameters() / 1e6:.0f}M parameters, context {cfg.max_position_embeddings}")
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    model = load_pretrained(path, dtype=dtype, device=DEVICE)
    hf_model = load_hf_model(path, dtype=dtype, device=DEVICE)
    info = dict(description=desc, random_weights=name != "tiny", num_parameters=model.config.num_parameters(),
                weight_bytes=weight_bytes(model), max_model_len=model.config.max_position_embeddings,
                hf_attn_implementation=getattr(hf_model.config, "_attn_implementation", None),
                hf_class=type(hf_model).__name__, config=model.config.to_hf_dict())
    return model, hf_model, info


def weight_bytes(model) -> int:
    """Bytes of the weights a forward pass reads (a tied embedding counted once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def kv_bytes_per_token(model) -> int:
    c = model.config
    return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * model.dtype.itemsize


def copy_bandwidth() -> tuple[float, str]:
    """(bytes/s, what): a GPU's device-to-device copy (``benchmarks.serving_step``), or on a CPU a host-memory copy
    of 256 MiB (read + write counted), median of 10."""
    if HAS_GPU:
        from benchmarks.serving_step import copy_bandwidth as gpu_copy

        return gpu_copy(), "device-to-device copy (read + write), 2 GiB, median of 20 (CUDA events)"
    src = torch.empty(2**27, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() / statistics.median(times[2:]), "host-memory copy (read + write), 128 MiB, median of 10"


def free_memory() -> None:
    gc.collect()
    if HAS_GPU:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- one timed run of each system
def _timed(runner, trace: Trace) -> tuple[list, float]:
    _synchronize(torch.device(DEVICE))
    t0 = time.perf_counter()
    outputs = runner.generate(trace.prompts, trace.params, arrival_times=trace.arrival_times, use_tqdm=False)
    _synchronize(torch.device(DEVICE))
    return outputs, time.perf_counter() - t0


def _run_record(outputs, wall: float, trace: Trace, summary: dict, setup_s: float) -> dict:
    """Tokens are counted the same way for every system: each request's tokens up to its requested length."""
    tokens = sum(min(len(o.token_ids), p.max_tokens) for o, p in zip(outputs, trace.params) if o.ok)
    errors = sorted({str(o.error) for o in outputs if not o.ok})[:3]
    run = dict(status="ok" if not errors else f"error: {errors[0]}", output_tokens=tokens,
               requested_tokens=int(trace.output_lens.sum()), wall_s=wall, throughput_tok_s=tokens / wall,
               setup_s=setup_s, _token_hashes=[hash(tuple(o.token_ids[:p.max_tokens])) if o.ok else None
                                               for o, p in zip(outputs, trace.params)])
    run.update({k: summary[k] for k in SUMMARY_KEYS if k in summary})
    return run


def run_engine(model, trace: Trace, engine_kwargs: dict, warmup: Trace | None) -> tuple[dict, LLMEngine | None]:
    """Build ``LLMEngine(model, **engine_kwargs)``, warm it up (untimed), serve the trace. The engine is returned
    (the caller reads its schedule for the floor, then drops it: its KV cache must not stay on the card)."""
    t0 = time.perf_counter()
    engine = LLMEngine(model, **engine_kwargs)
    if warmup is not None:
        engine.generate(warmup.prompts, warmup.params, use_tqdm=False)
    engine.reset_prefix_cache()
    setup = time.perf_counter() - t0
    outputs, wall = _timed(engine, trace)
    run = _run_record(outputs, wall, trace, engine.metrics.summary(), setup)
    run.update(num_blocks=engine.num_blocks, block_size=engine.block_size, kv_tokens=engine.num_blocks *
               engine.block_size, max_num_seqs=engine.max_num_seqs,
               max_num_batched_tokens=engine.config.max_num_batched_tokens)
    return run, engine


def run_hf_static(hf_model, trace: Trace, batch_size: int, max_model_len: int, warmup: Trace | None) -> dict:
    runner = HFStaticBatchBaseline(hf_model, batch_size=batch_size, max_model_len=max_model_len)
    t0 = time.perf_counter()
    if warmup is not None:
        runner.generate(warmup.prompts, warmup.params)
    setup = time.perf_counter() - t0
    outputs, wall = _timed(runner, trace)
    run = _run_record(outputs, wall, trace, runner.metrics.summary(), setup)
    run.update(batch_size=batch_size, attn_implementation=getattr(hf_model.config, "_attn_implementation", None))
    return run


def run_static_ours(model, trace: Trace, batch_size: int, warmup: Trace | None) -> dict:
    runner = StaticBatchEngine(model, max_batch_size=batch_size)
    t0 = time.perf_counter()
    if warmup is not None:
        runner.generate(warmup.prompts, warmup.params)
    setup = time.perf_counter() - t0
    outputs, wall = _timed(runner, trace)
    return _run_record(outputs, wall, trace, runner.metrics.summary(), setup) | dict(batch_size=batch_size)


def run_hf_cb(hf_model, trace: Trace, kv_tokens: int | None, max_batch_tokens: int | None,
              warmup: Trace | None, graphs: bool | None = None) -> dict:
    """transformers' continuous batching; its wall time is its own (first add_request to last result), since its
    manager's setup (cache, CUDA graphs) happens inside the call. ``graphs``: None its defaults, True its CUDA
    graphs and async batching forced on."""
    runner = HFContinuousBatching(hf_model, kv_tokens=kv_tokens, max_batch_tokens=max_batch_tokens, graphs=graphs)
    t0 = time.perf_counter()
    if warmup is not None and not runner.warms_itself:
        runner.generate(warmup.prompts, warmup.params)
    setup = time.perf_counter() - t0
    outputs, _ = _timed(runner, trace)
    summary = runner.metrics.summary()
    run = _run_record(outputs, summary["elapsed_s"], trace, summary, setup)
    run.update({f"hf_{k}": v for k, v in runner.info.items()})
    return run


# ---------------------------------------------------------------- the HBM floor of the schedule the engine ran
def hbm_floor(engine: LLMEngine, trace: Trace, bandwidth: float) -> dict:
    """The least time the engine's schedule could take on this memory: every step reads every weight once and the
    K/V of every scheduled chunk's context once (the tokens its request computed before + the chunk), divided by
    the copy bandwidth. A lower bound: prefix-cache hits (K/V read but not computed), activations, logits and the
    K/V writes are left out, and recomputed requests are capped at their full length."""
    model = engine.model
    W, per_token = weight_bytes(model), kv_bytes_per_token(model)
    cap = {i: len(p) + s.max_tokens for i, (p, s) in enumerate(zip(trace.prompts, trace.params))}
    done: dict = {}
    kv = 0
    steps = engine.metrics.steps
    for step in steps:
        for rid, n in step.composition:
            done[rid] = done.get(rid, 0) + n
            kv += min(done[rid], cap.get(rid, done[rid])) * per_token
    total = len(steps) * W + kv
    tokens = int(trace.output_lens.sum())
    return dict(num_steps=len(steps), weight_bytes=W, kv_bytes_per_token=per_token, weight_read_bytes=len(steps) * W,
                kv_read_bytes=kv, total_bytes=total, bandwidth_Bps=bandwidth, floor_s=total / bandwidth,
                floor_tok_s=tokens * bandwidth / total, output_tokens=tokens)


# ---------------------------------------------------------------- a row's runs -> median and spread
def aggregate(row: dict) -> dict:
    """Median, min and max of the ok runs' throughput and TPOT p50 (the row's ``runs`` stay as they are)."""
    ok = [r for r in row["runs"] if r["status"] == "ok"]
    row["num_runs"] = len(ok)
    if not ok:
        row["status"] = row["runs"][-1]["status"] if row["runs"] else row.get("status", "not run")
        return row
    row["status"] = "ok"
    tput = [r["throughput_tok_s"] for r in ok]
    row.update(throughput_tok_s=statistics.median(tput), throughput_min=min(tput), throughput_max=max(tput),
               output_tokens=ok[0]["output_tokens"], requested_tokens=ok[0]["requested_tokens"])
    tpot = [r["tpot_p50"] for r in ok if r.get("tpot_p50") == r.get("tpot_p50") and r.get("tpot_p50") is not None]
    if tpot:
        row.update(tpot_p50=statistics.median(tpot), tpot_p50_min=min(tpot), tpot_p50_max=max(tpot))
    steps = [r["num_steps"] for r in ok if r.get("num_steps")]
    if steps:   # one run's count (an even number of runs would otherwise average two)
        row["num_steps"] = statistics.median_low(steps)
    return row


# ---------------------------------------------------------------- ratios, from the rows' medians
def _ratio(a: dict | None, b: dict | None) -> dict | None:
    """a / b of two ok rows' throughput: the medians' ratio and its range (a's min / b's max ... a's max / b's min)."""
    if not a or not b or a.get("status") != "ok" or b.get("status") != "ok":
        return None
    return dict(median=a["throughput_tok_s"] / b["throughput_tok_s"], low=a["throughput_min"] / b["throughput_max"],
                high=a["throughput_max"] / b["throughput_min"])


def summarize_workload(result: dict, model: str, workload: str) -> dict:
    """The headline of one model and workload: the engine's tok/s against HF's best static batch and HF's continuous
    batching, the HBM floor, and the decomposition of the ratio to static batching: (HF's forward passes / the
    engine's) x (HF's time per pass / the engine's); with ``static-ours``, HF's own overhead at the same batches."""
    rows = {r["system"]: r for r in result["rows"] if r.get("model") == model and r.get("workload") == workload}
    engine, static, cb, ours = (rows.get(k) for k in ("llmengine", "hf-static", "hf-cb", "static-ours"))
    floor = next((f for f in result["floors"] if f["model"] == model and f["workload"] == workload), None)
    tput = lambda r: r["throughput_tok_s"] if r and r.get("status") == "ok" else None
    s = dict(model=model, workload=workload, engine_tok_s=tput(engine), hf_static_best_tok_s=tput(static),
             hf_static_best_batch=static.get("batch_size") if static else None, hf_cb_tok_s=tput(cb),
             hf_cb_status=cb.get("status") if cb else "not run", floor_tok_s=floor["floor_tok_s"] if floor else None,
             engine_x_hf_static=_ratio(engine, static), engine_x_hf_cb=_ratio(engine, cb),
             hf_static_over_ours=_ratio(static, ours))
    if s["engine_tok_s"] and s["floor_tok_s"]:
        s["engine_fraction_of_floor"] = s["engine_tok_s"] / s["floor_tok_s"]
    if s["engine_x_hf_static"] and engine.get("num_steps") and static.get("num_steps"):
        passes = static["num_steps"] / engine["num_steps"]
        s["decomposition_vs_hf_static"] = dict(
            passes_ratio=passes, time_per_pass_ratio=s["engine_x_hf_static"]["median"] / passes,
            hf_passes=static["num_steps"], engine_passes=engine["num_steps"],
            note="ratio = (HF's forward passes / the engine's) x (HF's time per pass / the engine's); HF's passes "
                 "are its decode steps summed over batches (finished rows keep computing)")
    result["summary"] = [x for x in result["summary"] if (x["model"], x["workload"]) != (model, workload)] + [s]
    return s


#: what must agree for result files to be merged
SAME_SETUP = ("benchmark", "device", "git_commit", "python", "torch", "triton", "transformers", "cuda", "dtype",
              "driver", "quick")
#: what must also agree for a (model, workload) measured in several files to pool its runs (the trace and the engine's
#: limits; which systems and how many repeats each call ran may differ)
SAME_TRACE = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_output", "num_requests", "seed",
              "hf_cb_kv")


def _row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("model", "workload", "sweep", "x", "system", "config", "batch_size"))


def _pool(rows: list[dict]) -> list[dict]:
    """Rows of the same measurement (same model, workload or sweep point, system and configuration) from several
    files as one row: their runs together, median and spread recomputed; the others unchanged, in first-seen order."""
    pooled: dict[tuple, dict] = {}
    for row in rows:
        key = _row_key(row)
        if key not in pooled:
            pooled[key] = dict(row, runs=list(row["runs"]))
        else:
            pooled[key]["runs"] += row["runs"]
            pooled[key]["chosen_from"] = sorted(set(pooled[key].get("chosen_from") or [])
                                                | set(row.get("chosen_from") or [])) or None
    for row in pooled.values():
        if row["runs"]:
            aggregate(row)
    return list(pooled.values())


def merge(records: list[dict]) -> dict:
    """One result from several files of the same setup (e.g. one per GPU call): rows, floors, summaries, sweeps and
    models together; ``parts`` keeps each file's command, date and duration. A (model, workload) measured in more than
    one file pools its runs: the repeats of one measurement spread over calls that each fit the device's time limit
    (each run keeps its ``part``, the index of its file). ValueError if the setups differ, or if a (model, workload) in
    several files was not the same trace with the same limits."""
    if not records:
        raise ValueError("nothing to merge")
    first = records[0]
    for r in records[1:]:
        for key in SAME_SETUP:
            if r.get(key) != first.get(key):
                raise ValueError(f"cannot merge: '{key}' differs ({first.get(key)!r} vs {r.get(key)!r})")
    seen: dict[tuple, dict] = {}
    for r in records:
        for sm in r["summary"]:
            pair = (sm["model"], sm["workload"])
            if pair in seen:
                other = seen[pair]
                name = f"{pair[0]}/{pair[1]}"
                if other.get("workloads", {}).get(name) != r.get("workloads", {}).get(name):
                    raise ValueError(f"cannot merge: {name} is not the same trace in every file")
                for key in SAME_TRACE:
                    if (other.get("config") or {}).get(key) != (r.get("config") or {}).get(key):
                        raise ValueError(f"cannot merge: {name} ran with a different '{key}'")
            else:
                seen[pair] = r
    # a file that is itself a merge brings its parts, and its runs keep pointing at theirs
    parts, tagged = [], []
    for r in records:
        own = r.get("parts") or [dict(command=r["command"], date=r["date"], total_seconds=r.get("total_seconds"),
                                      copy_bandwidth_Bps=r.get("copy_bandwidth_Bps"), config=r.get("config"))]
        offset = len(parts)
        tagged.append([dict(row, runs=[dict(run, part=offset + (run.get("part", 0) if r.get("parts") else 0))
                                       for run in row["runs"]]) for row in r.get("rows", [])])
        parts += own
    out = dict(first, date=max(p["date"] for p in parts), command=" ; ".join(p["command"] for p in parts),
               complete=all(r.get("complete") for r in records),
               total_seconds=sum(r.get("total_seconds", 0) for r in records), parts=parts)
    out["rows"] = _pool([row for rows in tagged for row in rows])
    floors = {}
    for f in (f for r in records for f in r.get("floors", [])):   # a pair's floor: its first file's (same schedule)
        floors.setdefault((f["model"], f["workload"]), f)
    out["floors"] = list(floors.values())
    for key in ("models", "workloads"):
        out[key] = {k: v for r in records for k, v in r.get(key, {}).items()}
    out["sweeps"] = {k: _pool([x for r in records for x in r.get("sweeps", {}).get(k, [])])
                     for k in ("concurrency", "context", "kv_budget")}
    out["summary"] = []
    for model, workload in seen:
        summarize_workload(out, model, workload)
    return out
