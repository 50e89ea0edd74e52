"""Continuous vs static batching on the same model and the same trace (lesson 04).

    python -m benchmarks.engine_batching            # full run (GPU: < 2 min on an H100)
    python -m benchmarks.engine_batching --quick    # fewer requests (CPU: < 30 s)

The course's tiny target model serves a ShareGPT-like trace (course_lib.experiments.workloads.sharegpt_trace: the vLLM
paper's mean lengths times ``scale``, log-normal, exactly that many output tokens per request) with

1. **offline** arrivals (all at t = 0: throughput at saturation, the headline ratio continuous / static);
2. **Poisson** arrivals at ``load`` x the request rate the continuous engine sustained offline (latency: TTFT,
   TPOT, end to end);
3. **memory pressure**: the continuous engine with a quarter of the KV blocks it used at its peak, preempting by
   recompute and by swap (what each costs in time, recomputed tokens and bytes copied);
4. **a long multimodal-style prompt** (2,880 stand-in image tokens, LLaVA-NeXT's count for one image) arriving
   while 8 requests decode: the longest gap between two tokens of a decoding request, without and with chunked
   prefill (the model's context limit is lifted to 4,096 positions for this timing-only run).

Both engines take ``max_num_seqs`` sequences at most; the static one pads to the longest prompt and runs each
batch until its longest request is done (course_lib.serving.static_batching). Everything is timed on the engines' own
clock: the measured wall time of every step (CUDA synchronized), idle time skipped. On a GPU the first full pass
of each engine over the trace is a warm-up (Triton compilation and autotuning, allocator), not timed. Writes
``benchmarks/results/batching_<device-slug>.json`` with device, versions, date and every number.
"""
from __future__ import annotations

import time

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch

from course_lib import load_tiny
from course_lib.device import HAS_GPU
from course_lib.serving.engine import LLMEngine
from course_lib.serving.static_batching import StaticBatchEngine
from course_lib.experiments.workloads import (long_prompt_trace, multimodal_prompt, sharegpt_trace,
                                  with_context_length)
from benchmarks import record
from benchmarks.roofline import device_name


def config(quick: bool) -> dict:
    if HAS_GPU:
        return dict(num_requests=128 if quick else 512, scale=0.5, max_num_seqs=32 if quick else 64, load=0.8,
                    long_prompt=2880, decoders=8, decode_len=64)
    return dict(num_requests=16 if quick else 64, scale=0.2 if quick else 0.25, max_num_seqs=4 if quick else 16,
                load=0.8, long_prompt=384 if quick else 2880, decoders=4 if quick else 8,
                decode_len=12 if quick else 40)


def run(engine, trace) -> tuple[dict, list]:
    outputs = engine.generate(trace.prompts, trace.params, arrival_times=trace.arrival_times, use_tqdm=False)
    return engine.metrics.summary(), outputs


def main(argv: list[str] | None = None) -> dict:
    args = record.parse_args(__doc__, "batching", "fewer requests", argv)
    cfg = config(args.quick)
    t_start = time.perf_counter()
    name = device_name()
    model, tokenizer = load_tiny("target")
    print(f"device: {name}  torch {torch.__version__}  dtype {model.dtype}", flush=True)
    B = cfg["max_num_seqs"]
    offline = sharegpt_trace(cfg["num_requests"], scale=cfg["scale"], tokenizer=tokenizer, seed=0)
    print(offline.description, flush=True)
    continuous, static = LLMEngine(model, max_num_seqs=B), StaticBatchEngine(model, max_batch_size=B)
    if HAS_GPU:
        for engine in (continuous, static):     # warm-up pass: compilation, autotuning, allocator
            run(engine, offline)

    # 1. offline: throughput at saturation
    res_offline, outs = {}, {}
    for label, engine in (("static", static), ("continuous", continuous)):
        res_offline[label], outs[label] = run(engine, offline)
        print(f"offline {label:>10}: {res_offline[label]['throughput_tok_s']:9.1f} tok/s  "
              f"{res_offline[label]['num_steps']} steps  {res_offline[label]['elapsed_s']:.2f} s", flush=True)
    same = sum(a.token_ids == b.token_ids for a, b in zip(outs["static"], outs["continuous"])) / len(offline)
    ratio = res_offline["continuous"]["throughput_tok_s"] / res_offline["static"]["throughput_tok_s"]
    print(f"continuous / static throughput: {ratio:.2f}x; identical outputs: {same:.0%}", flush=True)

    # 2. Poisson arrivals at load x the sustained request rate
    rate = cfg["load"] * len(offline) / res_offline["continuous"]["elapsed_s"]
    poisson = sharegpt_trace(cfg["num_requests"], rate=rate, scale=cfg["scale"], tokenizer=tokenizer, seed=0)
    res_poisson = {label: run(engine, poisson)[0] for label, engine in (("static", static), ("continuous", continuous))}
    for label, r in res_poisson.items():
        print(f"poisson {rate:.1f} req/s {label:>10}: {r['throughput_tok_s']:9.1f} tok/s  "
              f"TTFT p50 {r['ttft_p50']:.3f} s "
              f"p99 {r['ttft_p99']:.3f} s  TPOT p50 {1e3 * r['tpot_p50']:.2f} ms  latency p50 {r['latency_p50']:.2f} s",
              flush=True)

    # 3. memory pressure: a quarter of the peak blocks (at least what the longest request needs), recompute vs swap
    longest = max(-(-(len(p) + sp.max_tokens) // continuous.block_size)
                  for p, sp in zip(offline.prompts, offline.params))
    num_blocks = max(res_offline["continuous"]["max_blocks_used"] // 4, longest + 1)
    res_pressure = {}
    for mode in ("recompute", "swap"):
        engine = LLMEngine(model, max_num_seqs=B, num_blocks=num_blocks, preemption_mode=mode)
        res_pressure[mode], o = run(engine, offline)
        res_pressure[mode]["identical_outputs_to_ample_memory"] = sum(
            a.token_ids == b.token_ids for a, b in zip(o, outs["continuous"])) / len(offline)
        r = res_pressure[mode]
        print(f"pressure ({num_blocks} blocks) {mode:>9}: {r['throughput_tok_s']:9.1f} tok/s  preemptions "
              f"{r['preemptions']}  recomputed {r['num_recomputed_tokens']} tokens  "
              f"swapped {r['swap_bytes'] / 2**20:.1f} MiB",
              flush=True)

    # 4. a long prompt among decodes, without and with chunked prefill
    long_model = with_context_length(model, max(4096, cfg["long_prompt"] + 64))
    prompt = multimodal_prompt(cfg["long_prompt"], tokenizer.encode(" What is in this picture?"),
                               vocab_size=model.config.vocab_size)
    trace = long_prompt_trace(cfg["decoders"], cfg["decode_len"], prompt, tokenizer=tokenizer)
    res_long = {}
    for chunked in (False, True):
        engine = LLMEngine(long_model, max_num_seqs=B, enable_chunked_prefill=chunked,
                           max_num_batched_tokens=256 if chunked else None)
        if HAS_GPU:
            run(engine, trace)               # warm-up (new attention shapes)
        summary, outputs = run(engine, trace)
        decoders = [o for o in outputs[:-1]]
        gaps = [b - a for o in decoders for a, b in zip(o.outputs[0].token_times, o.outputs[0].token_times[1:])]
        res_long["chunked" if chunked else "unchunked"] = dict(
            max_num_batched_tokens=engine.max_num_batched_tokens, decode_itl_max_s=max(gaps),
            decode_itl_p50_s=sorted(gaps)[len(gaps) // 2], long_request_ttft_s=outputs[-1].metrics.ttft,
            elapsed_s=summary["elapsed_s"], num_steps=summary["num_steps"])
        print(f"long prompt ({len(prompt)} tokens), chunked={chunked}: longest decode gap "
              f"{1e3 * max(gaps):.1f} ms, its TTFT {1e3 * outputs[-1].metrics.ttft:.1f} ms", flush=True)

    result = dict(
        **record.provenance("engine_batching", "benchmarks.engine_batching", argv, model.dtype, args.quick),
        model="course_lib tiny-target (5.4M parameters, context 512)",
        trace=dict(description=offline.description, num_requests=len(offline), scale=cfg["scale"],
                   mean_prompt=float(offline.prompt_lens.mean()), mean_output=float(offline.output_lens.mean()),
                   max_output=int(offline.output_lens.max()), max_num_seqs=B, block_size=continuous.block_size),
        timing="engine clock: measured wall time of every step (CUDA synchronized), idle time skipped; "
               "one untimed warm-up pass per engine on a GPU",
        offline=res_offline, ratio_continuous_over_static=ratio, outputs_identical=same == 1.0,
        identical_outputs_fraction=same,
        poisson=dict(rate_req_s=rate, load=cfg["load"], continuous=res_poisson["continuous"],
                     static=res_poisson["static"],
                     ratio_continuous_over_static=res_poisson["continuous"]["throughput_tok_s"]
                     / res_poisson["static"]["throughput_tok_s"]),
        pressure=dict(num_blocks=num_blocks, **res_pressure),
        long_prompt=dict(prompt_tokens=len(prompt), decoders=cfg["decoders"], decode_len=cfg["decode_len"], **res_long),
        total_seconds=time.perf_counter() - t_start,
    )
    out_path = record.write(result, "batching", args.out)
    record.print_readme_row(out_path)
    print(f"wrote {out_path} ({result['total_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
