"""The serving features' recorded runs (lessons 04, 05, 06) as numbers and as the README's rows: continuous vs static
batching (``benchmarks.engine_batching``), prefix caching (``benchmarks.prefix_caching``) and speculative decoding
(``benchmarks.speculative``). All three run the course's tiny models (5.4M and 0.9M parameters), whose steps are
host-bound on a GPU, so every ratio here comes with what it is made of; the lessons print the same summaries.
"""
from __future__ import annotations

from course_lib.analysis import claims
from course_lib.analysis.kernel_lines import _where, _x


def _ms(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 1 else f"{1e3 * seconds:.1f} ms"


def _identical(fraction: float | None, dtype: str, at_least: bool = False) -> str:
    """How many outputs matched token for token (``at_least``: the lowest of several workloads), and why fewer than
    all can in 16-bit floats."""
    if fraction is None:
        return ""
    why = (" (in 16-bit floats a different batch or chunk shape rounds differently, and a greedy choice between "
           "near-tied logits can flip)" if fraction < 1 and dtype in ("bfloat16", "float16") else "")
    return f"; {'at least ' if at_least else ''}{fraction:.0%} of the outputs identical token for token{why}"


def batching_summary(run: dict) -> dict:
    """Continuous over static throughput on the same offline trace, split into its two factors: fewer steps (the
    scheduling: no padding, no finished rows kept, no waiting for a batch to end) and a cheaper step (the engine's
    implementation against the static loop's: on a GPU, CUDA graphs and Triton kernels against eager padded
    attention). ``ratio == steps_ratio * step_time_ratio`` (same output tokens on both sides)."""
    s, c = run["offline"]["static"], run["offline"]["continuous"]
    static_step, cont_step = s["elapsed_s"] / s["num_steps"], c["elapsed_s"] / c["num_steps"]
    po, pr, lp = run["poisson"], run["pressure"], run["long_prompt"]
    return dict(
        ratio=c["throughput_tok_s"] / s["throughput_tok_s"],
        steps_ratio=s["num_steps"] / c["num_steps"], static_steps=s["num_steps"], continuous_steps=c["num_steps"],
        step_time_ratio=static_step / cont_step, static_step_s=static_step, continuous_step_s=cont_step,
        padding_tokens=s.get("num_padding_tokens", 0), prompt_tokens=s["num_prompt_tokens"],
        identical=run.get("identical_outputs_fraction"),
        poisson_rate=po["rate_req_s"], poisson_ttft_p50=(po["static"]["ttft_p50"], po["continuous"]["ttft_p50"]),
        pressure_blocks=pr["num_blocks"],
        pressure_tok_s=(pr["recompute"]["throughput_tok_s"], pr["swap"]["throughput_tok_s"]),
        long_prompt_tokens=lp["prompt_tokens"],
        long_gap_s=(lp["unchunked"]["decode_itl_max_s"], lp["chunked"]["decode_itl_max_s"]),
    )


def batching_ratio_text(run: dict) -> str:
    """'21.75x = 2.75x fewer steps (the scheduling) x 7.90x the time per step (the implementation)': the ratio
    never without its factors (a factor below 1 is a dearer step)."""
    b = batching_summary(run)
    return (f"{b['ratio']:.2f}x = {b['steps_ratio']:.2f}x fewer steps (the scheduling) x {b['step_time_ratio']:.2f}x "
            f"static's time per step over continuous's (the implementation, not batching)")


def batching_row(run: dict) -> tuple[str, str, str]:
    b = batching_summary(run)
    return ("04", f"continuous vs static batching, same trace, the **tiny model** (`engine_batching.py`; "
                  f"{_where(run)})",
            f"{run['trace']['description'].split(' (')[0]}, batch {run['trace']['max_num_seqs']}, {run['dtype']}: "
            f"continuous {b['ratio']:.1f}x static's throughput = {b['steps_ratio']:.2f}x fewer steps "
            f"({b['static_steps']:,} / {b['continuous_steps']:,}: the scheduling) x {b['step_time_ratio']:.2f}x "
            f"cheaper steps ({_ms(b['static_step_s'])} / {_ms(b['continuous_step_s'])}: the engine's CUDA graphs "
            f"and kernels against the static loop's eager padded attention, on host-bound steps, not batching)"
            f"{_identical(b['identical'], run['dtype'])}. Poisson arrivals at {b['poisson_rate']:.0f} req/s: TTFT p50 "
            f"{_ms(b['poisson_ttft_p50'][0])} static, {_ms(b['poisson_ttft_p50'][1])} continuous. "
            f"{b['pressure_blocks']} KV blocks: recompute {b['pressure_tok_s'][0]:,.0f} tok/s, swap "
            f"{b['pressure_tok_s'][1]:,.0f}. A {b['long_prompt_tokens']:,}-token prompt among decodes: longest decode "
            f"gap {_ms(b['long_gap_s'][0])} in one step, {_ms(b['long_gap_s'][1])} chunked"
            + (" (chunking pays where one prefill step is long against a decode step; the tiny model's is not)"
               if b["long_gap_s"][1] > b["long_gap_s"][0] else ""))


def prefix_summary(run: dict) -> dict:
    """Time to first token without and with the prefix cache, per workload: (no cache, cache, ratio, hit rate)."""
    out = {}
    for name, part in (("shared prompt, offline", run["shared_prompt"]["offline"]),
                       ("shared prompt, Poisson", run["shared_prompt"]["poisson"]), ("chat", run["chat"])):
        n, c = part["no_cache"], part["prefix_cache"]
        out[name] = dict(ttft=(n["ttft_mean"], c["ttft_mean"]), ratio=n["ttft_mean"] / c["ttft_mean"],
                         hit_rate=c["prefix_cache_hit_rate"],
                         prefill_tokens=(n["num_prefill_tokens"], c["num_prefill_tokens"]))
    return out


def prefix_row(run: dict) -> tuple[str, str, str]:
    parts = [f"{name}: TTFT mean {_ms(p['ttft'][0])} -> {_ms(p['ttft'][1])} = {p['ratio']:.2f}x (hit rate "
             f"{p['hit_rate']:.0%}, prefill tokens {p['prefill_tokens'][0]:,} -> {p['prefill_tokens'][1]:,})"
             for name, p in prefix_summary(run).items()]
    return ("05", f"prefix caching, hit rate and time to first token, the **tiny model** (`prefix_caching.py`; "
                  f"{_where(run)})",
            f"{run['dtype']}: " + "; ".join(parts)
            + _identical(min(run["shared_prompt"].get("identical_outputs_fraction", 1.0),
                             run["chat"].get("identical_outputs_fraction", 1.0)), run["dtype"], at_least=True)
            + ". The ratio follows the prefill time the cache removes: large "
            "where prefills queue behind each other (all requests at once), small where each arrives to an idle "
            "engine and a tiny model's prefill is short")


def speculative_summary(run: dict) -> dict:
    """Per temperature: the target alone, the best γ and the full range of speedups; the forward-time ratio c."""
    out = dict(c=run["forward_ms"]["c"], draft_ms=run["forward_ms"]["draft"],
               target_ms=run["forward_ms"]["target"]["1"], temperatures={})
    for r in run["runs"]:
        pts = r["points"]
        best = max(pts, key=lambda p: p["speedup"])
        out["temperatures"][r["temperature"]] = dict(
            baseline_tok_s=r["baseline_tokens_per_s"], best_gamma=best["gamma"], best=best["speedup"],
            best_model=best["speedup_model"], speedups=(min(p["speedup"] for p in pts), max(p["speedup"] for p in pts)),
            gammas=(pts[0]["gamma"], pts[-1]["gamma"]), alpha=(min(p["alpha"] for p in pts),
                                                                max(p["alpha"] for p in pts)))
    return out


def speculative_row(run: dict) -> tuple[str, str, str]:
    s = speculative_summary(run)
    parts = [f"T = {t}: best {p['best']:.2f}x the target alone at γ = {p['best_gamma']} (the formula "
             f"{p['best_model']:.2f}x), {_x(p['speedups'])} over γ = {p['gammas'][0]}-{p['gammas'][1]}, acceptance "
             f"α {p['alpha'][0]:.2f}-{p['alpha'][1]:.2f}" for t, p in s["temperatures"].items()]
    return ("06", f"speculative decoding, batch 1, the **tiny models** (`speculative.py`; {_where(run)})",
            f"{run['models']['target']}, draft {run['models']['draft']}, {run['dtype']}: " + "; ".join(parts)
            + f". A draft pass costs c = {s['c']:.2f} of a target pass ({s['draft_ms']:.1f} ms / "
            f"{s['target_ms']:.1f} ms): host-bound passes, where a model several times smaller is not several "
            "times cheaper; with a real model pair c is typically smaller and the same α buys more")


ROWS = {"engine_batching": batching_row, "prefix_caching": prefix_row, "speculative": speculative_row}


def summary(result: dict, file: str) -> str | None:
    """The README row of a GPU run of one of these benchmarks, for the end of its output; None for a quick or a CPU
    run (the README's table holds GPU files only) and for another benchmark."""
    row = ROWS.get(result.get("benchmark"))
    if row is None or result.get("quick") or not claims._gpu([result]):
        return None
    return row(dict(result, file=file))[2]
