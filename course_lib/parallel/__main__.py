"""Run the shipped model sharded across processes and compare it with the single-process model.

    python -m course_lib.parallel --tp 2                      # tensor parallel, 2 processes
    python -m course_lib.parallel --pp 2 --microbatches 4     # pipeline parallel, 2 stages, 4 micro-batches
    torchrun --nproc-per-node 2 -m course_lib.parallel --tp 2 # the same ranks started by torchrun

gloo on CPU, NCCL when there is a GPU per rank. Prints the largest logit difference and whether the
greedy tokens are identical; exits 1 if they differ (0 if equal, 2 on a usage error).
"""
from __future__ import annotations

import argparse
import sys

from course_lib.parallel.check import run_pp, run_tp, sample_batch
from course_lib.parallel.launcher import under_torchrun
from course_lib.parallel.schedule import bubble_formula, measured_bubble


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.parallel", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tp", type=int, help="tensor-parallel size (processes)")
    mode.add_argument("--pp", type=int, help="pipeline-parallel size (stages = processes)")
    parser.add_argument("--microbatches", type=int, default=4, help="micro-batches per forward (--pp)")
    parser.add_argument("--schedule", choices=["gpipe", "1f1b"], default="gpipe", help="pipeline schedule (--pp)")
    parser.add_argument("--batch", type=int, default=8, help="sequences in the batch")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=8, help="greedy tokens to generate")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with GPUs, else gloo")
    parser.add_argument("--tol", type=float, default=None,
                        help="logits must agree within tol + tol·|logit| (default 1e-5 with gloo/CPU, 1e-4 with NCCL)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before a stuck run is stopped")
    args = parser.parse_args(argv)
    size = args.tp or args.pp
    if size < 1 or args.pp and not 1 <= args.microbatches <= args.batch:
        parser.error("sizes must be >= 1 and --microbatches in 1..--batch")
        return 2
    ids = sample_batch(args.batch, args.seq)
    try:
        if args.tp:
            result = run_tp(args.tp, ids, steps=args.steps, backend=args.backend, tol=args.tol, timeout_s=args.timeout)
        else:
            result = run_pp(args.pp, ids, args.microbatches, schedule=args.schedule, steps=args.steps,
                            backend=args.backend, tol=args.tol, timeout_s=args.timeout)
    except ValueError as err:   # e.g. a TP size the heads don't divide by
        print(f"error: {err}", file=sys.stderr)
        return 2
    quiet = under_torchrun() and int(__import__("os").environ["RANK"]) != 0
    if not quiet:
        r0 = result.ranks[0]
        print(f"input: {args.batch} sequences x {args.seq} tokens, {args.steps} greedy steps")
        if args.tp:
            print(f"all-reduces per forward: {r0['all_reduces']} ({r0['all_reduces'] / r0['num_layers']:g} per layer), "
                  f"{r0['bytes']:,} bytes per rank; forward {r0['forward_s'] * 1e3:.2f} ms")
        else:
            events = [e for r in result.ranks for e in r["events"]]
            print("stages: " + ", ".join(f"rank {r['rank']}: layers {r['layers'][0]}-{r['layers'][-1]}" for r in result.ranks))
            print(f"forward {result.ranks[0]['forward_s'] * 1e3:.2f} ms; bubble measured {measured_bubble(events):.1%}, "
                  f"(p-1)/(m+p-1) = {bubble_formula(args.pp, args.microbatches):.1%}")
        print("greedy tokens of sequence 0:", result.tokens[0].tolist())
        print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
