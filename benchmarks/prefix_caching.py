"""Time to first token with and without prefix caching, on the engine of lesson 04 (lesson 05).

    python -m benchmarks.prefix_caching            # full run (GPU: about a minute on an H100)
    python -m benchmarks.prefix_caching --quick    # fewer requests (CPU: under a minute)

Two workloads, served by ``LLMEngine`` with ``enable_prefix_caching`` off and on (same model, same requests,
same arrival times; greedy, so the outputs must be identical, and that is checked):

1. **shared system prompt**: every request = one long system prompt (``system_len`` tokens of the corpus'
   validation text) + its own question, ``max_tokens`` new tokens; (a) offline (all requests at t = 0) and
   (b) Poisson arrivals at ``load`` x the request rate the engine *without* the cache sustained offline;
2. **multi-turn chat**: ``conversations`` chats of ``turns`` turns; turn t sends the system prompt, every earlier
   message and *generated* reply, and a new message. One ``generate`` call per turn (all conversations' turn t
   at t = 0); the cache persists across calls, as in a server.

Reported per run: hit rate (prompt tokens served from the cache / prompt tokens), prefill tokens computed, TTFT
(mean, p50, p99), TPOT, throughput; and the TTFT ratio (no cache / cache). Timing is the engines' own clock:
the measured wall time of every step (CUDA synchronized), idle time skipped. On a GPU each engine first serves
the workload once untimed (Triton compilation, autotuning, allocator), then its prefix cache is emptied
(``reset_prefix_cache``), so every timed run starts cold. Writes
``benchmarks/results/prefix_caching_<device-slug>.json`` with device, versions, date and every number.
"""
from __future__ import annotations

import time

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch

from course_lib import load_tiny
from course_lib.device import HAS_GPU
from course_lib.serving.engine import LLMEngine
from course_lib.experiments.prefix_workloads import chat_conversations, shared_prompt_requests
from course_lib.model.sampling import SamplingParams
from course_lib.experiments.workloads import poisson_arrivals
from benchmarks import record
from benchmarks.roofline import device_name

KEYS = ("num_prompt_tokens", "num_cached_tokens", "prefix_cache_hit_rate", "num_prefill_tokens", "num_output_tokens",
        "elapsed_s", "throughput_tok_s", "num_steps", "ttft_mean", "ttft_p50", "ttft_p99", "tpot_mean", "tpot_p50",
        "max_blocks_used")


def config(quick: bool) -> dict:
    """Sizes: the model's context is 512 tokens, so prompts stay below ~450."""
    if HAS_GPU:
        return dict(num_requests=128 if quick else 512, system_len=384, question_len=32, max_tokens=32,
                    max_num_seqs=64, load=0.8, conversations=16 if quick else 64, turns=6, chat_system_len=96,
                    user_len=24, reply_len=32)
    return dict(num_requests=12 if quick else 32, system_len=384, question_len=32, max_tokens=8, max_num_seqs=8,
                load=0.8, conversations=4 if quick else 8, turns=4, chat_system_len=96, user_len=24, reply_len=16)


def serve(engine, prompts, params, arrivals=None) -> tuple[dict, list]:
    outputs = engine.generate(prompts, params, arrival_times=arrivals, use_tqdm=False)
    summary = engine.metrics.summary()
    return {k: summary[k] for k in KEYS}, [o.token_ids for o in outputs]


def shared_prompt(engines: dict, cfg: dict, tokenizer, warm_up: bool) -> dict:
    prompts = shared_prompt_requests(cfg["num_requests"], system_len=cfg["system_len"],
                                     question_len=cfg["question_len"], tokenizer=tokenizer, seed=0)
    params = SamplingParams(max_tokens=cfg["max_tokens"])
    result, tokens = {"offline": {}, "poisson": {}}, {}
    for label, engine in engines.items():
        if warm_up:
            serve(engine, prompts, params)
        engine.reset_prefix_cache()
        result["offline"][label], tokens[label] = serve(engine, prompts, params)
    # Poisson arrivals at `load` x what the engine without the cache sustains offline: it is busy, not swamped
    rate = cfg["load"] * len(prompts) / result["offline"]["no_cache"]["elapsed_s"]
    arrivals = poisson_arrivals(len(prompts), rate, seed=1).tolist()
    for label, engine in engines.items():
        engine.reset_prefix_cache()
        result["poisson"][label], _ = serve(engine, prompts, params, arrivals)
    # greedy: identical in float32; in bf16 on a GPU a different batch composition may flip a near-tie
    same = sum(a == b for a, b in zip(tokens["no_cache"], tokens["prefix_cache"])) / len(prompts)
    for run in ("offline", "poisson"):
        r = result[run]
        r["ttft_ratio_no_cache_over_cache"] = r["no_cache"]["ttft_mean"] / r["prefix_cache"]["ttft_mean"]
    result.update(rate_req_s=rate, outputs_identical=same == 1.0, identical_outputs_fraction=same,
                  num_requests=len(prompts), prompt_tokens=len(prompts[0]))
    return result


def chat(engines: dict, cfg: dict, tokenizer, warm_up: bool) -> dict:
    params = SamplingParams(max_tokens=cfg["reply_len"])
    result, replies = {}, {}
    for label, engine in engines.items():
        for _ in range(2 if warm_up else 1):   # a warm-up pass first, if asked: the last pass is the one kept
            engine.reset_prefix_cache()
            convs = chat_conversations(cfg["conversations"], cfg["turns"], system_len=cfg["chat_system_len"],
                                       user_len=cfg["user_len"], reply_len=None, tokenizer=tokenizer, seed=2)
            turns = []
            for t in range(cfg["turns"]):
                summary, outs = serve(engine, [c.prompt(t) for c in convs], params)
                for c, o in zip(convs, outs):
                    c.replies.append(o)
                turns.append(summary)
        replies[label] = [c.replies for c in convs]
        total = lambda key: sum(s[key] for s in turns)
        n = len(convs) * len(turns)
        result[label] = dict(
            per_turn=turns, num_prompt_tokens=total("num_prompt_tokens"), num_cached_tokens=total("num_cached_tokens"),
            prefix_cache_hit_rate=total("num_cached_tokens") / total("num_prompt_tokens"),
            num_prefill_tokens=total("num_prefill_tokens"), elapsed_s=total("elapsed_s"),
            ttft_mean=sum(s["ttft_mean"] * len(convs) for s in turns) / n)
    result["ttft_ratio_no_cache_over_cache"] = result["no_cache"]["ttft_mean"] / result["prefix_cache"]["ttft_mean"]
    pairs = [(a, b) for ca, cb in zip(replies["no_cache"], replies["prefix_cache"]) for a, b in zip(ca, cb)]
    result["identical_outputs_fraction"] = sum(a == b for a, b in pairs) / len(pairs)
    result["outputs_identical"] = result["identical_outputs_fraction"] == 1.0
    result["last_turn_prompt_tokens"] = result["no_cache"]["per_turn"][-1]["num_prompt_tokens"] // cfg["conversations"]
    return result


def main(argv: list[str] | None = None) -> dict:
    args = record.parse_args(__doc__, "prefix_caching", "fewer requests and conversations", argv)
    cfg = config(args.quick)
    t_start = time.perf_counter()
    name = device_name()
    # --quick (the tests' smoke run) in float32 everywhere: the outputs with and without the cache must then be
    # identical token for token, which bf16 on a GPU does not promise (a near-tie may flip with the batch)
    model, tokenizer = load_tiny("target", dtype=torch.float32 if args.quick else None)
    print(f"device: {name}  torch {torch.__version__}  dtype {model.dtype}", flush=True)
    engines = {label: LLMEngine(model, max_num_seqs=cfg["max_num_seqs"], enable_prefix_caching=caching)
               for label, caching in (("no_cache", False), ("prefix_cache", True))}

    shared = shared_prompt(engines, cfg, tokenizer, warm_up=HAS_GPU)
    for run in ("offline", "poisson"):
        for label in engines:
            r = shared[run][label]
            print(f"shared prompt, {run:>7}, {label:>12}: hit rate {r['prefix_cache_hit_rate']:6.1%}  prefill "
                  f"{r['num_prefill_tokens']:6d} tokens  TTFT mean {1e3 * r['ttft_mean']:8.1f} ms  p99 "
                  f"{1e3 * r['ttft_p99']:8.1f} ms  {r['throughput_tok_s']:8.1f} tok/s", flush=True)
        print(f"shared prompt, {run}: TTFT no cache / cache = {shared[run]['ttft_ratio_no_cache_over_cache']:.2f}x",
              flush=True)
    multi = chat(engines, cfg, tokenizer, warm_up=HAS_GPU)
    for label in engines:
        r = multi[label]
        print(f"chat, {label:>12}: hit rate {r['prefix_cache_hit_rate']:6.1%}  prefill {r['num_prefill_tokens']:6d} "
              f"tokens  TTFT mean {1e3 * r['ttft_mean']:8.1f} ms  per turn "
              + " ".join(f"{1e3 * t['ttft_mean']:.0f}" for t in r["per_turn"]) + " ms", flush=True)
    print(f"chat: TTFT no cache / cache = {multi['ttft_ratio_no_cache_over_cache']:.2f}x; identical outputs: "
          f"shared {shared['outputs_identical']}, chat {multi['outputs_identical']}", flush=True)

    result = dict(
        **record.provenance("prefix_caching", "benchmarks.prefix_caching", argv, model.dtype, args.quick),
        model="course_lib tiny-target (5.4M parameters, context 512)", config=cfg,
        block_size=engines["prefix_cache"].block_size, num_blocks=engines["prefix_cache"].num_blocks,
        timing="engine clock: measured wall time of every step (CUDA synchronized), idle time skipped; "
               + ("one untimed warm-up pass per engine, then the prefix cache emptied" if HAS_GPU else "no warm-up"),
        shared_prompt=shared, chat=multi, total_seconds=time.perf_counter() - t_start)
    out_path = record.write(result, "prefix_caching", args.out)
    record.print_readme_row(out_path)
    print(f"wrote {out_path} ({result['total_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
