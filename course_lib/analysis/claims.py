"""The course's headline claims, computed from the recorded result files in ``benchmarks/results/`` (issue 19).

Every ratio the README and the lessons state is returned here with what it is made of: the strongest baseline of
the same file first, then the full measured range over every shape the file holds, then the point a target names.
No number is typed: a claim whose file does not exist comes back as ``None``, and the reader says what to run.
Kernel claims also give their distance to the roofline (issue 21): TFLOP/s as a fraction of the datasheet's Tensor
Core peak, bytes/s as a fraction of the copy bandwidth measured in the same run and of the datasheet's HBM bandwidth
(``roof_*`` keys; None for a device whose datasheet the course does not hold).

* :func:`engine_claims` - ``python -m benchmarks.engine``: the tiny model's engine rows against ``transformers``'
  ``generate()``, each ratio decomposed as the baseline's own overhead x fewer forward passes x the cost of a pass;
* :func:`flash_attention_claims` - lesson 03's kernel against cuDNN's and FlashAttention-2's SDPA backends;
* :func:`flash_attention_hopper_claims` - lesson 03's Hopper (TMA) variants against cuDNN, and their TFLOP/s;
* :func:`paged_decode_claims` - lesson 02's paged decode against the fastest SDPA backend on a contiguous cache;
* :func:`int8_decode_claims` - lesson 07's INT8 K/V as the decode attention kernel's time over FP16's;
* :func:`real_size_serving_runs` - the GPU runs of ``python -m benchmarks.serving`` (real model shapes).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from course_lib.analysis.roofline import RESULTS_DIR, datasheet

#: the engine benchmark's strongest row of ``transformers``: a static batch over the KV budget
HF_BUDGET_PREFIX, HF_LARGE_MARK, STATIC_OURS_PREFIX = "HF generate (B=", "over budget", "static, ours"


def _load(pattern: str, results_dir: Path | None) -> list[dict]:
    runs = []
    for path in sorted(Path(results_dir or RESULTS_DIR).glob(pattern)):
        run = json.loads(path.read_text())
        run["file"] = path.name
        runs.append(run)
    return runs


def _gpu(runs: list[dict]) -> list[dict]:
    return [r for r in runs if not str(r.get("device", "CPU")).upper().startswith("CPU")]


def _span(values) -> tuple[float, float]:
    values = list(values)
    return min(values), max(values)


def _span_or_none(values) -> tuple[float, float] | None:
    values = list(values)
    return (min(values), max(values)) if values else None


def _of(span: tuple[float, float] | None, roof: float | None) -> tuple[float, float] | None:
    """A measured range as fractions of a roof (None where the range or the roof is unknown)."""
    return None if span is None or not roof else (span[0] / roof, span[1] / roof)


def peak_tflops(run: dict) -> float | None:
    """The datasheet's dense bf16 Tensor Core peak of the run's device in TFLOP/s (989 on H100 SXM and H200), else
    None (a CPU, another GPU, a hand-made record without a device)."""
    spec = datasheet(run.get("device", ""))
    return spec.peak_flops / 1e12 if spec else None


def hbm_datasheet(run: dict) -> float | None:
    """The datasheet's HBM bandwidth of the run's device in bytes/s (3.35e12 H100 SXM, 4.8e12 H200), else None."""
    spec = datasheet(run.get("device", ""))
    return spec.hbm_bandwidth if spec else None


def engine_claims(run: dict) -> dict:
    """Per workload of an ``engine_*.json``: the fastest engine row against the HF row at the KV budget's batch and
    against the strongest HF row (over the budget), and the decomposition of the first ratio,

        best / HF(B)  =  [static, ours / HF(B)]          the baseline's own overhead: same schedule, same passes
                       x [passes of static / of best]     fewer forward passes (continuous batching, paging)
                       x [time per pass static / best]    the cost of a pass (> 1: cheaper, < 1: dearer)

    exact when both systems produce the same useful tokens (checked: ``product`` equals ``best_x_hf``)."""
    out = {}
    for workload in dict.fromkeys(r["workload"] for r in run["rows"]):
        rows = {r["config"]: r for r in run["rows"] if r["workload"] == workload and r["status"] == "ok"}
        hf = next(r for name, r in rows.items() if name.startswith(HF_BUDGET_PREFIX) and HF_LARGE_MARK not in name)
        hf_large = [r for name, r in rows.items() if name.startswith(HF_BUDGET_PREFIX) and HF_LARGE_MARK in name]
        ours = next(r for name, r in rows.items() if name.startswith(STATIC_OURS_PREFIX))
        engines = [r for r in rows.values() if r["kind"] == "engine"]
        best = max(engines, key=lambda r: r["throughput_tok_s"])
        strongest_hf = max([hf, *hf_large], key=lambda r: r["throughput_tok_s"])
        overhead = ours["throughput_tok_s"] / hf["throughput_tok_s"]
        passes = ours["num_steps"] / best["num_steps"]
        step_cost = (ours["elapsed_s"] / ours["num_steps"]) / (best["elapsed_s"] / best["num_steps"])
        out[workload] = {
            "best": best["config"], "hf": hf["config"], "strongest_hf": strongest_hf["config"],
            "best_x_hf": best["throughput_tok_s"] / hf["throughput_tok_s"],
            "best_x_strongest_hf": best["throughput_tok_s"] / strongest_hf["throughput_tok_s"],
            "strongest_hf_x_hf": strongest_hf["throughput_tok_s"] / hf["throughput_tok_s"],
            "overhead": overhead, "passes": passes, "step_cost": step_cost,
            "product": overhead * passes * step_cost,
            "same_tokens": best["num_output_tokens"] == hf["num_output_tokens"] == ours["num_output_tokens"],
        }
    return out


def engine_summary(run: dict) -> dict:
    """The ranges over the workloads of :func:`engine_claims` (min, max) and the model the run used."""
    claims = engine_claims(run)
    keys = ("best_x_strongest_hf", "best_x_hf", "strongest_hf_x_hf", "overhead", "passes", "step_cost")
    summary = {k: _span(c[k] for c in claims.values()) for k in keys}
    summary["num_parameters"] = run["model"].get("num_parameters")
    summary["model"] = run["model"].get("description", "")
    summary["workloads"] = claims
    return summary


def flash_attention_claims(run: dict, head_dim: int = 128, min_n: int = 4096) -> dict:
    """Lesson 03's forward kernel: ratios of its time to cuDNN's SDPA (the strongest baseline on Hopper) and to
    SDPA's FlashAttention-2 backend, over every recorded shape and over ``D = head_dim, N >= min_n``; TFLOP/s."""
    rows = run["speed"]
    sel = [s for s in rows if s["D"] == head_dim and s["N"] >= min_n]
    return {
        "cudnn_all": _span(s["ours_vs_sdpa_cudnn"] for s in rows),
        "flash_all": _span(s["ours_vs_sdpa_flash"] for s in rows),
        "cudnn_sel": _span(s["ours_vs_sdpa_cudnn"] for s in sel),
        "flash_sel": _span(s["ours_vs_sdpa_flash"] for s in sel),
        "tflops_sel": _span(s["ours_tflops"] for s in sel),
        "cudnn_tflops_sel": _span(s["sdpa_cudnn_tflops"] for s in sel),
        # the same TFLOP/s as fractions of the datasheet's Tensor Core peak (None off an H100 SXM / H200)
        "peak_tflops": peak_tflops(run),
        "roof_sel": _of(_span(s["ours_tflops"] for s in sel), peak_tflops(run)),
        "cudnn_roof_sel": _of(_span(s["sdpa_cudnn_tflops"] for s in sel), peak_tflops(run)),
        "head_dim": head_dim, "min_n": min_n, "num_shapes": len(rows), "num_sel": len(sel),
    }


def flash_attention_hopper_claims(run: dict, head_dim: int = 128) -> dict:
    """Lesson 03's Hopper ablation (``benchmarks.flash_attention_hopper``): per head dim, each implementation's speed
    vs cuDNN (cuDNN's time over its own) over the file's shapes; at ``head_dim``, each one's TFLOP/s and those as
    fractions of the datasheet's peak, cuDNN's included (the strongest baseline's distance to the roof too)."""
    impls = ["portable", *run["variants"]]
    heads = sorted({row["D"] for row in run["rows"]})
    vs_cudnn = {D: {i: _span(row[f"{i}_vs_cudnn"] for row in run["rows"] if row["D"] == D)
                    for i in impls if any(f"{i}_vs_cudnn" in row and row["D"] == D for row in run["rows"])}
                for D in heads}
    sel = [row for row in run["rows"] if row["D"] == head_dim]
    tflops = {i: _span(row[f"{i}_tflops"] for row in sel) for i in [*impls, "sdpa_cudnn"]
              if sel and all(f"{i}_tflops" in row for row in sel)}
    return {"vs_cudnn": vs_cudnn, "head_dim": head_dim, "tflops": tflops, "peak_tflops": peak_tflops(run),
            "roof": {i: _of(span, peak_tflops(run)) for i, span in tflops.items()},
            "num_shapes": len(run["rows"]), "Ns": sorted({row["N"] for row in run["rows"]})}


def default_row(serving: list[dict]) -> dict:
    """Of a ``benchmarks.serving_step`` run's engine rows, the one run with the engine's defaults (its name ends in
    "(the default)"): the engine as it ships (as of that run's commit). Files without
    the mark: their last row."""
    return next((r for r in serving if r["row"].endswith("(the default)")), serving[-1])


def decode_graphs_row(serving: list[dict]) -> dict:
    """Of a ``benchmarks.serving_step`` run's engine rows, the engine with CUDA graphs for its decode-only steps and
    asynchronous scheduling, its mixed steps eager (the row "+ async scheduling", the default before the full graphs
    became it): the engine whose idle GPU lesson 10 dissects. Files without that row: their default row."""
    return next((r for r in serving if r["row"].removesuffix(" (the default)") == "+ async scheduling"),
                default_row(serving))


def serving_step_runs(results_dir: Path | None = None) -> tuple[dict, dict]:
    """The ``benchmarks.serving_step`` GPU runs that split the trace into phases, per card (``device_slug``): the
    latest **complete** run (every row; ``--rows`` runs a subset, and a run cut short by a time limit saved its rows
    with ``complete`` false) and the latest run with a row that replays the
    mixed steps as graphs (``cudagraph_mode`` "FULL_AND_PIECEWISE" or "FULL"; None where there is none)."""
    runs = sorted((r for r in recorded("serving_step_*.json", results_dir) if "phases" in r["serving"][0]),
                  key=lambda r: r["date"])
    complete, mixed = {}, {}
    for run in runs:
        if "--rows" not in run.get("command", "") and run.get("complete", True):   # cut short: complete=False
            complete[run["device_slug"]] = run
        if mixed_graph_rows(run):
            mixed[run["device_slug"]] = run
    return complete, mixed


def serving_step_tok_s(row: dict) -> float:
    """A serving_step engine row's throughput: output tokens over the median of its timed runs of the whole trace
    where it has several (``wall_s_runs``: the fast rows since session 11), else over the faster of its two runs
    (the timed one, ``wall_s``, and the profiled one, ``busy.wall_s``). Before 2026-12-06's f71c25a the warm-up
    served 8 short prompts only, and a row's timed run could include compiling its Triton kernels (the old engine's
    on the H200: 13.3 s timed, 9.8 s profiled); the profiler's own overhead only slows a run down."""
    runs = row.get("wall_s_runs", [])
    if len(runs) > 1:
        return row["output_tokens"] / statistics.median(runs)
    return row["output_tokens"] / min(row["wall_s"], row["busy"]["wall_s"])


def mixed_graph_rows(run: dict) -> list[dict]:
    """A serving_step run's rows that replay mixed steps as graphs too (piecewise, full), with their phases."""
    return [r for r in run["serving"] if r.get("cudagraph_mode") in ("FULL_AND_PIECEWISE", "FULL")
            and "prefill" in r.get("phases", {})]


def flash_attention_bwd_claims(run: dict, min_n: int = 4096, flash_target: float = 1.0,
                               cudnn_target: float = 0.7) -> dict:
    """Lesson 03's training pass (``benchmarks.flash_attention_bwd``): forward + backward time of ours over SDPA's
    FlashAttention-2 backend and over cuDNN, over every recorded shape and at ``N >= min_n``, against issue 20's
    targets (>= 1.0x SDPA-flash, >= 0.7x cuDNN at N >= 4k); the shapes that miss a target; the gradients' largest
    error relative to SDPA-flash's."""
    rows = [s for s in run["speed"] if "ours_vs_sdpa_flash" in s]
    sel = [s for s in rows if s["N"] >= min_n]

    def misses(key, target):
        return [(s["D"], s["N"], s["causal"], s[key]) for s in sel if s[key] < target]

    return {
        "flash_all": _span(s["ours_vs_sdpa_flash"] for s in rows),
        "cudnn_all": _span(s["ours_vs_sdpa_cudnn"] for s in rows if "ours_vs_sdpa_cudnn" in s),
        "flash_sel": _span(s["ours_vs_sdpa_flash"] for s in sel),
        "cudnn_sel": _span(s["ours_vs_sdpa_cudnn"] for s in sel if "ours_vs_sdpa_cudnn" in s),
        "bwd_flash_sel": _span(s["ours_vs_sdpa_flash_bwd"] for s in sel),
        "bwd_cudnn_sel": _span(s["ours_vs_sdpa_cudnn_bwd"] for s in sel if "ours_vs_sdpa_cudnn_bwd" in s),
        "tflops_sel": _span(s["ours_fwd_bwd_tflops"] for s in sel),
        "peak_tflops": peak_tflops(run),
        "roof_sel": _of(_span(s["ours_fwd_bwd_tflops"] for s in sel), peak_tflops(run)),
        "cudnn_roof_sel": _of(_span_or_none(s["sdpa_cudnn_fwd_bwd_tflops"] for s in sel
                                            if "sdpa_cudnn_fwd_bwd_tflops" in s), peak_tflops(run)),
        "flash_misses": misses("ours_vs_sdpa_flash", flash_target),
        "cudnn_misses": misses("ours_vs_sdpa_cudnn", cudnn_target),
        "flash_target": flash_target, "cudnn_target": cudnn_target, "min_n": min_n,
        "num_shapes": len(rows), "num_sel": len(sel), "dtype": run["dtype"],
        "max_grad_rel_err": max(s[f"ours_{g}_rel_err"] for s in rows for g in ("dq", "dk", "dv")),
        # a run with --atomic-dq also timed dq_mode="atomic" (dQ added with fp32 atomics): its fwd+bwd vs cuDNN
        # and its time over the default mode's, shape by shape (> 1: the atomic mode is slower)
        "atomic_cudnn_all": _span_or_none(s["ours_atomic_vs_sdpa_cudnn"] for s in rows
                                          if "ours_atomic_vs_sdpa_cudnn" in s),
        "atomic_over_separate": _span_or_none(s["ours_atomic_fwd_bwd_seconds"] / s["ours_fwd_bwd_seconds"]
                                              for s in rows if "ours_atomic_fwd_bwd_seconds" in s),
        # a run with --hopper-forward also timed ours with the forward through that TMA variant (the same backward)
        "tma_variant": run.get("forward_variants", {}).get("ours_tma"),
        "tma_cudnn_sel": _span_or_none(s["ours_tma_vs_sdpa_cudnn"] for s in sel if "ours_tma_vs_sdpa_cudnn" in s),
        "tma_flash_sel": _span_or_none(s["ours_tma_vs_sdpa_flash"] for s in sel if "ours_tma_vs_sdpa_flash" in s),
        "tma_cudnn_misses": misses("ours_tma_vs_sdpa_cudnn", cudnn_target) if any(
            "ours_tma_vs_sdpa_cudnn" in s for s in sel) else [],
        # a run whose "ours" is the library's default (TMA at D = 128 on sm_90+) with --hopper-forward portable also
        # timed the portable forward, the same backward
        "portable_cudnn_sel": _span_or_none(s["ours_portable_vs_sdpa_cudnn"] for s in sel
                                            if "ours_portable_vs_sdpa_cudnn" in s),
        "portable_flash_sel": _span_or_none(s["ours_portable_vs_sdpa_flash"] for s in sel
                                            if "ours_portable_vs_sdpa_flash" in s),
        # --hopper-forward gluon: the Gluon forward (kernels.flash_attention_gluon where its scope allows), the same
        # backward
        "gluon_cudnn_sel": _span_or_none(s["ours_gluon_vs_sdpa_cudnn"] for s in sel if "ours_gluon_vs_sdpa_cudnn" in s),
        "gluon_flash_sel": _span_or_none(s["ours_gluon_vs_sdpa_flash"] for s in sel if "ours_gluon_vs_sdpa_flash" in s),
        "gluon_cudnn_misses": misses("ours_gluon_vs_sdpa_cudnn", cudnn_target) if any(
            "ours_gluon_vs_sdpa_cudnn" in s for s in sel) else [],
    }


def paged_decode_claims(run: dict, big_batch: int = 64) -> dict:
    """Lesson 02's paged decode: SDPA's time on a contiguous cache (its fastest backend for each shape) over the
    paged kernel's, both replayed from a CUDA graph, over every recorded shape; and the split-K speed-up. Files with
    ``round_ratios`` timed the two in turn, several rounds: the ratio is the median of the rounds, ``rounds`` the
    lowest and highest round over all shapes (None in older files, which timed each once)."""
    rows = run["bandwidth"]
    ratios = {(b["B"], b["context"], b["dtype"]): b["ratio_to_sdpa"] for b in rows}
    worst = min(ratios, key=ratios.get)
    # issue 21: at batch >= 64 (enough work to fill the card) the K/V bytes read per second as fractions of the
    # card's copy bandwidth measured in the same run and of the datasheet's; the shape furthest from the copy
    big, copy = [b for b in rows if b["B"] >= big_batch and "paged_bytes_per_s" in b], run.get("copy_bandwidth")
    of_copy = {(b["B"], b["context"], b["dtype"]): b["paged_bytes_per_s"] / copy for b in big} if copy else {}
    return {"all": _span(ratios.values()), "worst_shape": worst, "num_shapes": len(ratios),
            "big_batch": big_batch, "copy_bandwidth": copy,
            "copy_big": _span_or_none(of_copy.values()),
            "copy_big_worst": min(of_copy, key=of_copy.get) if of_copy else None,
            "sdpa_copy_big": _span_or_none(b["sdpa_bytes_per_s"] / copy for b in big) if copy else None,
            "hbm_datasheet": hbm_datasheet(run),
            "roof_big": _of(_span_or_none(b["paged_bytes_per_s"] for b in big), hbm_datasheet(run)),
            "rounds": _span_or_none(x for b in rows for x in b.get("round_ratios", ())),
            "batch64_ctx4k": ratios.get((64, 4096, "float16")),
            "split_k": run["split_k"]["speedup"], "split_k_shape": (run["split_k"]["B"], run["split_k"]["context"])}


def int8_decode_claims(run: dict, min_context: int = 8192) -> dict:
    """Lesson 07: the paged decode attention kernel's time with INT8 K/V over FP16 K/V (attention-kernel time, not a
    model step), over every recorded shape and at ``context >= min_context``; the target the file records."""
    rows = run["decode"]
    long = [d for d in rows if d["context"] >= min_context]
    return {"all": _span(d["int8_ratio_to_fp16"] for d in rows),
            "long": _span(d["int8_ratio_to_fp16"] for d in long),
            # bytes each kernel reads per second at long contexts, as fractions of the datasheet's HBM bandwidth:
            # where INT8 reads its half of the bytes more slowly than FP16 reads its own, it is not bandwidth-bound
            "hbm_datasheet": hbm_datasheet(run),
            "int8_roof_long": _of(_span(d["int8_bytes_per_s"] for d in long), hbm_datasheet(run)),
            "fp16_roof_long": _of(_span(d["fp16_bytes_per_s"] for d in long), hbm_datasheet(run)),
            "min_context": min_context, "target": run["targets"]["target"], "met": run["targets"]["met"],
            "memory": run["memory"]["ratio_int8_to_fp16"]}


def real_size_serving_runs(results_dir: Path | None = None) -> list[dict]:
    """The GPU runs of ``python -m benchmarks.serving`` (``serving_*.json``, not ``serving_step_*``): the only files
    that can judge a claim about serving at real model size. Empty: not measured at real size yet."""
    runs = [r for r in _load("serving_*.json", results_dir) if r.get("benchmark") == "serving"]
    # a file whose engine was measured before a fix that a later file records (``engine_superseded_by``) judges nothing
    return [r for r in runs if r.get("gpu") and not r.get("engine_superseded_by")]


def recorded(pattern: str, results_dir: Path | None = None, gpu_only: bool = True) -> list[dict]:
    """The result files matching ``pattern`` (GPU ones only by default), each with its ``file`` name."""
    runs = _load(pattern, results_dir)
    return _gpu(runs) if gpu_only else runs


def serving_vs_strongest_hf(run: dict) -> list[dict]:
    """Per model and workload of a ``benchmarks.serving`` run: the engine's throughput over the strongest
    ``transformers`` system measured on the same trace and card (its best static batch or its continuous
    batching, whichever is faster), with the range over the repeats of the one it is compared with."""
    out = []
    for s in run["summary"]:
        hf_cb = s["hf_cb_tok_s"] if s.get("hf_cb_status") == "ok" and s.get("hf_cb_tok_s") else 0.0
        hf_static = s.get("hf_static_best_tok_s") or 0.0
        if not s.get("engine_tok_s") or not max(hf_cb, hf_static):
            continue
        which = "engine_x_hf_cb" if hf_cb > hf_static else "engine_x_hf_static"
        d = s.get("decomposition_vs_hf_static") if which == "engine_x_hf_static" else None
        cb_row = next((r for r in run.get("rows", []) if r.get("system") == "hf-cb" and r.get("model") == s["model"]
                       and r.get("workload") == s["workload"] and r.get("status") == "ok"), None)
        out.append({"model": s["model"], "workload": s["workload"], "strongest_hf": which.removeprefix("engine_x_"),
                    "hf_setup": hf_cb_setup(cb_row) if cb_row and which == "engine_x_hf_cb" else None,
                    "ratio": s["engine_tok_s"] / max(hf_cb, hf_static), "range": s.get(which),
                    "hf_tok_s": max(hf_cb, hf_static),
                    "decomposition": (f"{d['passes_ratio']:.2f} (HF's forward passes / the engine's) x "
                                      f"{d['time_per_pass_ratio']:.2f} (HF's time per pass / the engine's)")
                    if d else None})
    return out


def strongest_hf_per_trace(runs: list[dict]) -> list[tuple[dict, dict]]:
    """Per card, model and workload, the comparison of :func:`serving_vs_strongest_hf` whose ``transformers`` system
    served the most tok/s over all the files (each ratio still from one file: the engine and the baseline of the same
    run): a file that measured only a weaker baseline does not make the claim."""
    best: dict[tuple, tuple[dict, dict]] = {}
    for run in runs:
        for x in serving_vs_strongest_hf(run):
            key = (run["device"], x["model"], x["workload"])
            if key not in best or x["hf_tok_s"] > best[key][1]["hf_tok_s"]:
                best[key] = (run, x)
    return list(best.values())


def _batch_size(row: dict):
    """A static-batch row's batch size: on the row (newer files) or on its first run."""
    return row.get("batch_size") or (row.get("runs") or [{}])[0].get("batch_size")


def _failure(status: str) -> str:
    """A row's error in a few words: 'out of memory' for a CUDA OOM, else the exception's name."""
    if "OutOfMemoryError" in status:
        return "out of memory"
    return status.split(":")[1].strip() if ":" in status else status


def serving_line(run: dict) -> str:
    """One README cell for a ``benchmarks.serving`` file: per model and workload, what each system served (median
    tok/s over its runs, the number of runs), the engine's share of the HBM floor of its own schedule, and the
    engine over the strongest ``transformers`` system measured on the whole trace. A static-batch sweep point (one
    batch of the trace) is labelled as such, never compared; a file cut short by its time limit says so."""
    parts = []
    for s in run["summary"]:
        rows = {r["system"]: r for r in run["rows"] if r.get("model") == s["model"]
                and r.get("workload") == s["workload"] and r.get("status") == "ok"}
        text = [f"{s['model']}, {s['workload']}:"]
        if "llmengine" in rows:
            r = rows["llmengine"]
            text.append(f"LLMEngine {r['throughput_tok_s']:,.0f} tok/s ({r['num_runs']} run"
                        f"{'s' if r['num_runs'] > 1 else ''}) = {s['engine_fraction_of_floor']:.0%} of the HBM floor "
                        f"of its schedule ({s['floor_tok_s']:,.0f} tok/s)")
        off = next((r for r in run["rows"] if r.get("config") == "LLMEngine - async scheduling"
                    and r.get("model") == s["model"] and r.get("workload") == s["workload"]
                    and r.get("status") == "ok"), None)
        if "llmengine" in rows and off is not None:
            on = rows["llmengine"]
            text.append(f"without async scheduling {off['throughput_tok_s']:,.0f} tok/s ({off['num_runs']} runs; "
                        f"with it {on['throughput_tok_s'] / off['throughput_tok_s']:.2f}x, median over median, runs "
                        f"{on['throughput_min']:,.0f}-{on['throughput_max']:,.0f} vs "
                        f"{off['throughput_min']:,.0f}-{off['throughput_max']:,.0f})")
        if "hf-cb" in rows:
            setup = hf_cb_setup(rows["hf-cb"])
            text.append(f"HF continuous batching {rows['hf-cb']['throughput_tok_s']:,.0f}"
                        + (f" ({setup})" if setup else ""))
        if "hf-static" in rows:
            r = rows["hf-static"]
            text.append(f"HF generate, best static B = {r['batch_size']}, {r['throughput_tok_s']:,.0f}")
        sweep = [r for r in run["rows"] if r.get("system") == "hf-static-sweep" and r.get("model") == s["model"]
                 and r.get("workload") == s["workload"] and r.get("runs")]
        if sweep and "hf-static" not in rows:
            text.append("HF generate on one batch of the trace (a sweep point, not the whole trace): " + ", ".join(
                f"B = {_batch_size(r)} " + (f"{r['runs'][0]['throughput_tok_s']:,.0f}" if r.get("status") == "ok"
                                            else _failure(r["status"])) for r in sweep))
        best = [(r["throughput_tok_s"], name) for name, r in rows.items() if name in ("hf-cb", "hf-static")]
        if "llmengine" in rows and best:
            hf, name = max(best)
            text.append(f"LLMEngine / {'HF continuous batching' if name == 'hf-cb' else 'HF best static'} "
                        f"{rows['llmengine']['throughput_tok_s'] / hf:.1f}x")
        parts.append(" ".join(text[:1]) + " " + "; ".join(text[1:]))
    parts += sweep_lines(run)
    failed = any(r.get("status", "").startswith("error") for r in run["rows"])
    note = ("" if run.get("complete", True) else " (a row failed: see it)" if failed
            else " (cut short by its time limit: rows missing)")
    return " / ".join(parts) + note + (f". Note: {run['annotation']}" if run.get("annotation") else "")


_SWEEPS = {"concurrency": "concurrent requests", "context": "prompt length", "kv_budget": "KV budget (full contexts)"}
_SYSTEM_NAMES = {"llmengine": "LLMEngine", "hf-cb": "HF continuous batching", "hf-static": "HF generate"}


def sweep_lines(run: dict) -> list[str]:
    """Per sweep of a ``benchmarks.serving`` file (``sweeps``), per model and system: throughput and TPOT p50 at the
    smallest and the largest point measured, e.g. "sweep of concurrent requests 8 -> 256, qwen3-0.6b: LLMEngine
    4,249 -> 25,812 tok/s (TPOT p50 1.8 -> 9.6 ms)". Points that did not run are left out."""
    lines = []
    for sweep, label in _SWEEPS.items():
        rows = [r for r in run.get("sweeps", {}).get(sweep, []) if r.get("status") == "ok"]
        for model in dict.fromkeys(r["model"] for r in rows):
            text = []
            for system in dict.fromkeys(r["system"] for r in rows if r["model"] == model):
                pts = sorted((r for r in rows if (r["model"], r["system"]) == (model, system)), key=lambda r: r["x"])
                a, b = pts[0], pts[-1]
                text.append(f"{_SYSTEM_NAMES.get(system, system)} {a['throughput_tok_s']:,.0f} -> "
                            f"{b['throughput_tok_s']:,.0f} tok/s (TPOT p50 {a['tpot_p50'] * 1e3:.1f} -> "
                            f"{b['tpot_p50'] * 1e3:.1f} ms" + (f", {len(pts)} points" if len(pts) > 2 else "") + ")")
            xs = sorted({r["x"] for r in rows if r["model"] == model})
            lines.append(f"sweep of {label} {xs[0]} -> {xs[-1]}, {model}: " + "; ".join(text))
    return lines


#: issue 19's targets: LLMEngine over transformers' continuous batching and over its best static batch, on the
#: qwen3-0.6b shape and nano-vllm's workload, each recorded with at least this many repeats
SERVING_TARGETS = {"hf_cb": 10.0, "hf_static": 5.0}
SERVING_TARGET_REPEATS = 3


def serving_targets(runs: list[dict], model: str = "qwen3-0.6b", workload: str = "nano-vllm") -> list[dict]:
    """Issue 19's targets judged per card from the real-size runs: for each baseline, the latest file that measured
    it and the engine on the same trace (both on the whole trace), its ratio (median over median, range from the
    runs' extremes), whether the ratio meets the target, and whether both sides ran the required repeats."""
    out = []
    for device in dict.fromkeys(r["device"] for r in runs):
        for key, target in SERVING_TARGETS.items():
            found = None
            for run in sorted((r for r in runs if r["device"] == device), key=lambda r: r["date"]):
                s = next((s for s in run["summary"] if s["model"] == model and s["workload"] == workload), None)
                if s and s.get(f"engine_x_{key}"):
                    found = (run, s)
            if found is None:
                out.append(dict(device=device, baseline=key, target=target, file=None))
                continue
            run, s = found
            system = key.replace("_", "-")
            rows = {r["system"]: r for r in run["rows"] if r.get("model") == model and r.get("workload") == workload
                    and r.get("status") == "ok"}
            repeats = min(rows["llmengine"]["num_runs"], rows[system]["num_runs"])
            ratio = s[f"engine_x_{key}"]
            out.append(dict(device=device, baseline=key, target=target, file=run["file"], ratio=ratio,
                            met=ratio["median"] >= target, repeats=repeats,
                            repeats_met=repeats >= SERVING_TARGET_REPEATS, batch_size=rows[system].get("batch_size"),
                            engine_tok_s=rows["llmengine"]["throughput_tok_s"],
                            baseline_tok_s=rows[system]["throughput_tok_s"], setup=hf_cb_setup(rows[system])))
    return out


def hf_cb_setup(row: dict) -> str | None:
    """How transformers' continuous batching ran, from its first run's record (attention, its CUDA graphs and async
    batching, and where recorded whether a FlashAttention package it would have switched to was installed); None for
    another system or a file that did not record it."""
    run = (row.get("runs") or [{}])[0]
    if row.get("system") != "hf-cb" or "hf_use_cuda_graph" not in run:
        return None
    graphs = "True" in str(run["hf_use_cuda_graph"])
    asynchronous = str(run.get("hf_use_async_batching")) == "True"
    attention = str(run.get("hf_attn_implementation")).replace("|", " ")   # "paged|sdpa": no pipe in a table
    flash = [v for v in (3, 2) if run.get(f"hf_flash_attn_{v}_installed")]
    installed = ("" if "hf_flash_attn_2_installed" not in run   # files before 2026-12-07 did not record it
                 else f", flash-attn {flash[0]} installed" if flash else ", no flash-attn installed")
    return (f"attention {attention}, CUDA graphs {'on' if graphs else 'off'}, async batching "
            f"{'on' if asynchronous else 'off'}{installed}")


#: the setting of the vLLM launch post's 14-24x (vLLM blog, June 2023), to say what a course run differs in
VLLM_CLAIM_SETTING = ("LLaMA-7B on an NVIDIA A10G and LLaMA-13B on an A100-40GB, requests sampled from ShareGPT, "
                      "one completion per request, HF Transformers' generate() as the baseline")
