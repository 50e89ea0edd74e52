"""Whole-sequence swap vs partial, tail-first swap under memory pressure (lesson 04; KsanaLLM's swap, the Q&A's Q3).

    python -m benchmarks.partial_swap            # full run (CPU: about a minute)
    python -m benchmarks.partial_swap --quick    # fewer requests (CPU: < 20 s)

The course's tiny target model serves the ShareGPT-like trace of ``benchmarks/engine_batching.py`` (offline: every
request at t = 0) with too few KV blocks for its peak, so that sequences are preempted by swap, at several memory
budgets (fractions of the peak). Each budget runs twice: ``preemption_mode="swap"`` (every block of a victim moves
to the CPU pool and back) and ``enable_partial_swap=True`` (only the blocks a step needs move, tail first; the
prefix stays on the device: course_lib.serving.partial_swap). The counters are the result: preemptions, blocks and
bytes copied each way, the number of copies, the steps from a preemption to the resumption, recomputed tokens.
They are the same on any machine for the same trace and settings; the elapsed time is recorded as an observation.
Writes ``benchmarks/results/partial_swap_<device-slug>.json``.
"""
from __future__ import annotations

import time

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)

from course_lib import load_tiny
from course_lib.serving.engine import LLMEngine
from course_lib.experiments.swap import compare_swap_policies, swap_table
from course_lib.experiments.workloads import sharegpt_trace
from benchmarks import record


def config(quick: bool) -> dict:
    return dict(num_requests=16 if quick else 48, scale=0.2 if quick else 0.25, max_num_seqs=8 if quick else 16,
                fractions=(0.5,) if quick else (0.25, 0.33, 0.5, 0.75), block_size=16)


def main(argv: list[str] | None = None) -> dict:
    args = record.parse_args(__doc__, "partial_swap", "fewer requests, one memory budget", argv)
    cfg = config(args.quick)
    t_start = time.perf_counter()
    model, tokenizer = load_tiny("target")
    trace = sharegpt_trace(cfg["num_requests"], scale=cfg["scale"], tokenizer=tokenizer, seed=0)
    print(trace.description, flush=True)
    B, P = cfg["max_num_seqs"], cfg["block_size"]
    ample = LLMEngine(model, max_num_seqs=B, block_size=P)
    ample.generate(trace.prompts, trace.params, use_tqdm=False)
    peak = ample.metrics.summary()["max_blocks_used"]
    longest = max(-(-(len(p) + sp.max_tokens) // P) for p, sp in zip(trace.prompts, trace.params))
    runs = []
    for fraction in cfg["fractions"]:
        num_blocks = max(int(peak * fraction), longest + 1)
        res = compare_swap_policies(model, trace.prompts, trace.params, max_num_seqs=B, block_size=P,
                                    num_blocks=num_blocks)
        assert res["identical_outputs"], "partial swap changed a greedy output"
        runs.append(dict(fraction_of_peak=fraction, num_blocks=num_blocks, **res))
        print(f"\n{num_blocks} blocks ({fraction:.0%} of the peak {peak}):\n{swap_table(res)}", flush=True)
    result = dict(
        **record.provenance("partial_swap", "benchmarks.partial_swap", argv, model.dtype, args.quick),
        model="course_lib tiny-target (5.4M parameters, context 512)",
        trace=dict(description=trace.description, num_requests=len(trace), scale=cfg["scale"], max_num_seqs=B,
                   block_size=P, peak_blocks=peak),
        counters="per policy: blocks and bytes copied each way, copies, steps from preemption to resumption; "
                 "elapsed_s is the engine clock (an observation, not a result)",
        runs=runs, total_seconds=time.perf_counter() - t_start)
    out_path = record.write(result, "partial_swap", args.out)
    print(f"wrote {out_path} ({result['total_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
