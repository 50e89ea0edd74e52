"""Speculative decoding on the course's draft/target pair at batch 1 (lesson 06).

    python -m benchmarks.speculative            # full run (GPU: < 2 min on an H100)
    python -m benchmarks.speculative --quick    # fewer prompts and tokens (CPU: < 60 s)

Measures, on prompts cut from the validation text (never trained on): the cost of one target forward pass
over S = 1 ... 9 tokens (verification of γ drafts costs the pass over γ + 1) and of one draft forward pass
(c = t_draft / t_target); plain target decoding (tokens/s, the baseline); speculative decoding for
γ = 1 ... 8 at temperature 0 (greedy) and 1 (sampling): tokens/s, speedup over the baseline of the same
run, acceptance rate α, tokens per target forward pass measured vs the formula (1 − α^(γ+1)) / (1 − α),
and, greedy, whether the tokens equal the target's own greedy tokens. Writes
``benchmarks/results/speculative_<device-slug>.json``; notebooks/06_speculative_decoding.ipynb plots it.
"""
from __future__ import annotations

import time

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch

from course_lib import load_tiny
from course_lib.model.corpus import load_text
from course_lib.device import DEVICE, HAS_GPU
from course_lib.model.generate import generate
from course_lib.model.kv_cache import KVCache
from course_lib.serving.speculative import expected_speedup, expected_tokens_per_step, speculative_generate
from benchmarks import record
from benchmarks.roofline import device_name


def config(quick: bool) -> dict:
    if HAS_GPU:
        return dict(num_prompts=4 if quick else 6, prompt_len=32, new_tokens=64 if quick else 128,
                    gammas=list(range(1, 9)), temperatures=[0.0, 1.0], forward_reps=30, generation_reps=2)
    return dict(num_prompts=2 if quick else 4, prompt_len=32, new_tokens=32 if quick else 96,
                gammas=list(range(1, 9)), temperatures=[0.0] if quick else [0.0, 1.0],
                forward_reps=10 if quick else 30, generation_reps=1 if quick else 3)


def prompts(tokenizer, num_prompts: int, prompt_len: int) -> list[list[int]]:
    """Evenly spaced windows of the validation text."""
    ids = tokenizer.encode(load_text("validation"))
    step = (len(ids) - prompt_len) // num_prompts
    return [ids[i * step:i * step + prompt_len] for i in range(num_prompts)]


def timed(fn) -> tuple[object, float]:
    """fn() and its wall-clock seconds (at batch 1 the host's launch overhead is part of the cost)."""
    if HAS_GPU:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if HAS_GPU:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


@torch.no_grad()
def forward_ms(model, num_tokens: int, context: int, reps: int) -> float:
    """Fastest of ``reps`` cached forward passes over ``num_tokens`` new tokens after ``context`` cached ones (ms)."""
    cache = KVCache(model.config, 1, context + num_tokens, dtype=model.dtype, device=DEVICE)
    model(torch.randint(0, model.config.vocab_size, (1, context), device=DEVICE), cache=cache)
    x = torch.randint(0, model.config.vocab_size, (1, num_tokens), device=DEVICE)
    times = []
    for _ in range(reps + 3):  # the first 3 are warm-up
        times.append(timed(lambda: model(x, cache=cache))[1])
        cache.truncate(context)
    return min(times[3:]) * 1e3


def main(argv: list[str] | None = None) -> dict:
    args = record.parse_args(__doc__, "speculative", "fewer prompts and tokens", argv)
    cfg = config(args.quick)
    t_start = time.perf_counter()
    name = device_name()
    target, tokenizer = load_tiny("target")
    draft, _ = load_tiny("draft")
    print(f"device: {name}  torch {torch.__version__}  dtype {target.dtype}", flush=True)
    batch = prompts(tokenizer, cfg["num_prompts"], cfg["prompt_len"])
    N = cfg["new_tokens"]
    for model in (target, draft):  # warm-up: allocator, cuBLAS handles, first-call overheads
        generate(model, batch[0], 8)
    speculative_generate(target, draft, batch[0], 8, gamma=4)

    # 1. Cost of one forward pass: the target over S tokens (verification), the draft over 1 (c).
    context = cfg["prompt_len"] + N // 2
    t_target = {S: forward_ms(target, S, context, cfg["forward_reps"]) for S in range(1, max(cfg["gammas"]) + 2)}
    t_draft = forward_ms(draft, 1, context, cfg["forward_reps"])
    c = t_draft / t_target[1]
    print(f"forward pass at context {context}: target {t_target[1]:.3f} ms (1 token), "
          f"{t_target[max(t_target)]:.3f} ms ({max(t_target)} tokens); draft {t_draft:.3f} ms; c = {c:.3f}", flush=True)

    runs = []
    R = cfg["generation_reps"]
    for temperature in cfg["temperatures"]:
        # 2. Baseline (the target alone) and speculation for every γ, interleaved prompt by prompt and repeated
        #    R times; each (configuration, prompt) keeps its fastest time: the least disturbed by other processes.
        configs = [0] + cfg["gammas"]  # γ = 0: the baseline
        best = {(g, i): float("inf") for g in configs for i in range(len(batch))}
        tokens, stats = {}, {}
        for _ in range(R):
            for i, p in enumerate(batch):
                for g in configs:
                    if g == 0:
                        out, s = timed(lambda: generate(target, p, N, temperature=temperature, seed=i))
                    else:
                        out, s = timed(lambda: speculative_generate(target, draft, p, N, gamma=g,
                                                                    temperature=temperature, seed=i))
                        stats[g, i] = out.stats
                    tokens[g, i] = out.token_ids
                    best[g, i] = min(best[g, i], s)
        base_s = sum(best[0, i] for i in range(len(batch)))
        points = []
        for gamma in cfg["gammas"]:
            st = [stats[gamma, i] for i in range(len(batch))]
            seconds = sum(best[gamma, i] for i in range(len(batch)))
            accepted, rejected = sum(s.accepted for s in st), sum(s.rejected for s in st)
            forwards = sum(s.target_forwards for s in st)
            alpha = accepted / (accepted + rejected)
            pt = dict(
                gamma=gamma, seconds=seconds, tokens_per_s=len(batch) * N / seconds, speedup=base_s / seconds,
                proposed=sum(s.proposed for s in st), accepted=accepted, rejected_rounds=rejected,
                target_forwards=forwards, draft_forwards=sum(s.draft_forwards for s in st), alpha=alpha,
                alpha_from_distributions=sum(s.accept_prob_sum for s in st) / (accepted + rejected),
                tokens_per_target_forward=(accepted + forwards) / forwards,
                tokens_per_target_forward_formula=expected_tokens_per_step(alpha, gamma),
                speedup_model=expected_speedup(alpha, gamma, c, t_target[gamma + 1] / t_target[1]),
                same_tokens_as_target=(sum(tokens[gamma, i] == tokens[0, i] for i in range(len(batch)))
                                       if temperature == 0 else None))
            points.append(pt)
            print(f"T={temperature} γ={gamma}: α={alpha:.3f}  tokens/forward {pt['tokens_per_target_forward']:.2f} "
                  f"(formula {pt['tokens_per_target_forward_formula']:.2f})  {pt['tokens_per_s']:8.1f} tok/s  "
                  f"speedup {pt['speedup']:.2f}x (model {pt['speedup_model']:.2f}x)"
                  + (f"  same tokens: {pt['same_tokens_as_target']}/{len(batch)}" if temperature == 0 else ""),
                  flush=True)
        runs.append(dict(temperature=temperature, baseline_seconds=base_s,
                         baseline_tokens_per_s=len(batch) * N / base_s, points=points))
        print(f"T={temperature}: target alone {runs[-1]['baseline_tokens_per_s']:.1f} tok/s", flush=True)

    result = dict(
        **record.provenance("speculative", "benchmarks.speculative", argv, target.dtype, args.quick, engine=False),
        models=dict(target="course_lib tiny-target (5.4M parameters)", draft="course_lib tiny-draft (0.9M parameters)"),
        workload=dict(batch_size=1, num_prompts=len(batch), prompt_tokens=cfg["prompt_len"], new_tokens=N,
                      prompts="evenly spaced windows of the validation text"),
        timing=dict(clock="time.perf_counter, CUDA synchronized", statistic="min over repetitions",
                    forward_reps=cfg["forward_reps"], generation_reps=cfg["generation_reps"],
                    generation="baseline and every γ interleaved prompt by prompt; per prompt the fastest "
                               "repetition, summed over prompts"),
        forward_ms=dict(context=context, target={str(k): v for k, v in t_target.items()}, draft=t_draft, c=c,
                        verify_cost={str(g): t_target[g + 1] / t_target[1] for g in cfg["gammas"]}),
        runs=runs, total_seconds=time.perf_counter() - t_start,
    )
    out_path = record.write(result, "speculative", args.out)
    record.print_readme_row(out_path)
    print(f"wrote {out_path} in {result['total_seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
