"""Run the shipped model sharded across processes and compare it with the single-process model.

    python -m course_lib.parallel --tp 2                      # tensor parallel, 2 processes
    python -m course_lib.parallel --pp 2 --microbatches 4     # pipeline parallel, 2 stages, 4 micro-batches
    torchrun --nproc-per-node 2 -m course_lib.parallel --tp 2 # the same ranks started by torchrun

gloo on CPU, NCCL when there is a GPU per rank. Prints the largest logit difference and whether the
greedy tokens are identical; exits 1 if they differ (0 if equal, 2 on a usage error).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from course_lib.model.checkpoint import CHECKPOINTS
from course_lib.model.config import ModelConfig
from course_lib.parallel.check import run_pp, run_tp, sample_batch
from course_lib.parallel.launcher import under_torchrun
from course_lib.parallel.schedule import bubble_formula, measured_bubble
from course_lib.parallel.tensor import check_tp_size


def tp_sizes(config: ModelConfig) -> list[int]:
    """The tensor-parallel sizes the model splits into (every rank owns whole heads, kv heads, MLP units)."""
    sizes = []
    for tp in range(1, config.num_key_value_heads + 1):
        try:
            check_tp_size(config, tp)
            sizes.append(tp)
        except ValueError:
            pass
    return sizes


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.Tensor:
    """Every option against its range and the shipped model; a usage error (exit 2) before any rank starts.

    Returns the input token ids [batch, seq].
    """
    config = ModelConfig.from_json(CHECKPOINTS / "tiny-target" / "config.json")
    L, context = config.num_hidden_layers, config.max_position_embeddings
    if args.tp is not None:
        if args.tp < 1:
            parser.error(f"--tp {args.tp}: the tensor-parallel size must be >= 1")
        try:
            check_tp_size(config, args.tp)   # heads, kv heads and MLP width must divide by tp
        except ValueError as err:
            parser.error(f"--tp {args.tp}: {err} (valid here: {', '.join(map(str, tp_sizes(config)))})")
        for option in ("microbatches", "schedule"):
            if getattr(args, option) is not None:
                parser.error(f"--{option} applies to --pp only (tensor parallelism has no micro-batches)")
    elif not 1 <= args.pp <= L:
        parser.error(f"--pp {args.pp}: the model has {L} layers: 1 <= --pp <= {L} (each stage needs a layer)")
    if args.batch < 1:
        parser.error(f"--batch {args.batch}: must be >= 1")
    if args.pp is not None:
        args.microbatches = 4 if args.microbatches is None else args.microbatches
        args.schedule = args.schedule or "gpipe"
        if not 1 <= args.microbatches <= args.batch:
            parser.error(f"--microbatches {args.microbatches}: must be in 1..--batch ({args.batch})")
    if not 1 <= args.seq <= context:
        parser.error(f"--seq {args.seq}: must be in 1..{context} (the model's context)")
    if not 0 <= args.steps <= context - args.seq:
        parser.error(f"--steps {args.steps}: must be in 0..{context - args.seq}: --seq + --steps "
                     f"tokens must fit the model's context of {context}")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= 86400):
        parser.error(f"--timeout {args.timeout}: must be a number of seconds in (0, 86400]")
    if args.tol is not None and not (math.isfinite(args.tol) and args.tol >= 0):
        parser.error(f"--tol {args.tol}: must be a finite number >= 0")
    size = args.tp or args.pp
    if under_torchrun() and int(os.environ["WORLD_SIZE"]) != size:
        parser.error(f"--{'tp' if args.tp else 'pp'} {size} under torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']}: "
                     f"start torchrun with {size} processes in total")
    if args.backend == "nccl" and not under_torchrun() and torch.cuda.device_count() < size:
        parser.error(f"--backend nccl needs one GPU per rank: {size} ranks, {torch.cuda.device_count()} GPU(s)")
    try:
        return sample_batch(args.batch, args.seq)
    except ValueError as err:   # the validation text has ~46k tokens
        parser.error(f"--batch {args.batch} x --seq {args.seq}: {err}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.parallel", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tp", type=int,
                      help="tensor-parallel size (processes); must divide the heads, kv heads, MLP width")
    mode.add_argument("--pp", type=int, help="pipeline-parallel size (stages = processes), at most the layers")
    parser.add_argument("--microbatches", type=int, default=None, help="micro-batches per forward (--pp; default 4)")
    parser.add_argument("--schedule", choices=["gpipe", "1f1b"], default=None,
                        help="pipeline schedule (--pp; default gpipe)")
    parser.add_argument("--batch", type=int, default=8, help="sequences in the batch")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=8, help="greedy tokens to generate")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with GPUs, else gloo")
    parser.add_argument("--tol", type=float, default=None,
                        help="logits must agree within tol + tol·|logit| (default 1e-5 with gloo/CPU, 1e-4 with NCCL)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before a stuck run is stopped")
    args = parser.parse_args(argv)
    ids = check_args(parser, args)
    try:
        if args.tp:
            result = run_tp(args.tp, ids, steps=args.steps, backend=args.backend, tol=args.tol, timeout_s=args.timeout)
        else:
            result = run_pp(args.pp, ids, args.microbatches, schedule=args.schedule, steps=args.steps,
                            backend=args.backend, tol=args.tol, timeout_s=args.timeout)
    except ValueError as err:   # a check of the library that the CLI's own checks did not anticipate
        print(f"error: {err}", file=sys.stderr)
        return 2
    quiet = under_torchrun() and int(os.environ["RANK"]) != 0
    if not quiet:
        r0 = result.ranks[0]
        print(f"input: {args.batch} sequences x {args.seq} tokens, {args.steps} greedy steps")
        if args.tp:
            print(f"all-reduces per forward: {r0['all_reduces']} ({r0['all_reduces'] / r0['num_layers']:g} per layer), "
                  f"{r0['bytes']:,} bytes per rank; forward {r0['forward_s'] * 1e3:.2f} ms")
        else:
            events = [e for r in result.ranks for e in r["events"]]
            print("stages: " + ", ".join(f"rank {r['rank']}: layers {r['layers'][0]}-{r['layers'][-1]}"
                                         for r in result.ranks))
            print(f"forward {result.ranks[0]['forward_s'] * 1e3:.2f} ms; "
                  f"bubble measured {measured_bubble(events):.1%}, "
                  f"(p-1)/(m+p-1) = {bubble_formula(args.pp, args.microbatches):.1%}")
        print("greedy tokens of sequence 0:", result.tokens[0].tolist())
        print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
