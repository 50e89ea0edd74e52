"""The host's share of an engine step (lesson 10, issue 18): the scheduler, the block tables, the bookkeeping and
the outputs, timed with the model's forward pass and the sampling replaced by stubs that cost nothing.

    python -m benchmarks.host_step            # CPU, ~1 min; writes benchmarks/results/host_step_<cpu>.json
    python -m benchmarks.host_step --baseline ../other-worktree --rounds 3 --out benchmarks/results/host_step_ab.json
                                              # the same runs by another checkout's code, interleaved with this one's

On a GPU a replayed decode step costs the host one launch, so what is left between two steps is this: the Python
that decides what runs next and records what ran. It runs on the CPU whatever the card, so it is measured here on
the CPU, per step and per running sequence, for batches of decoding sequences. The trace: ``batch`` requests,
prompts of 64-128 tokens, ``--output-tokens`` greedy tokens each, admitted at once, no early stop.

A step's host time has two parts, timed apart in every decode step of the step API:

* **scheduling and bookkeeping**: the scheduler, the block manager and its prefix cache, appending the tokens, the
  outputs (the step minus the input preparation below);
* **input preparation**: what the model runner builds before the forward pass (input ids, positions, slot mapping,
  block tables, context lengths). On a GPU a decode step fills the CUDA graphs' pinned staging buffers
  (``DecodeGraphs.prepare``, timed here on CPU buffers of the same shapes); an eager step builds a ``StepBatch``
  (``ModelRunner.prepare``: the CPU's path, and a GPU's prefill steps). ``host_step_median_s`` is the GPU engine's
  decode step: scheduling and bookkeeping + the graph's preparation.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import course_lib.device  # noqa: F401  (first: the interpreter switch)
import torch

from benchmarks import record
from course_lib.model.config import ModelConfig
from course_lib.model.llama import Llama
from course_lib.model.sampling import SamplingParams
from course_lib.serving.cuda_graph import DecodeGraphs
from course_lib.serving.engine import LLMEngine
from course_lib.serving.model_runner import ModelRunner


def host_seconds_per_step(batch: int, output_tokens: int, block_size: int = 16) -> dict:
    """Runs the trace with a stub forward pass and stub sampling, through generate() (best of 3) and then through
    the step API; times are the CPU time of this thread (``time.thread_time``): what the host spends, which other
    processes on the machine do not inflate as they do wall time. The stub forward pass prepares the inputs as a GPU
    decode step does (the graphs' staging buffers); in the step API it also builds the eager StepBatch, and times
    both (subtracted from the step's time)."""
    config = ModelConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = Llama(config).eval()
    engine = LLMEngine(model, max_num_seqs=batch, max_num_batched_tokens=max(512, batch) * 128,
                       num_blocks=batch * (1024 // block_size), block_size=block_size,
                       enable_prefix_caching=True)   # as benchmarks.serving runs it: the cache's books count too
    # the staging buffers of a GPU engine's decode graphs, on the CPU (nothing is captured: only prepare runs)
    graphs = DecodeGraphs(model, engine.pool, max_num_seqs=batch, max_model_len=engine.max_model_len,
                          block_size=block_size)
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(64, 128))] for _ in range(batch)]
    params = SamplingParams(max_tokens=output_tokens)
    prep = {"graph": [], "eager": []}       # per execute of the step API: seconds of each preparation
    timed = False

    def stub_execute(runner, chunks, prev=None):                          # no forward pass: the inputs only
        decode = graphs.can_run(chunks)
        if not timed:
            graphs.prepare(chunks, runner.block_manager) if decode else runner.prepare(chunks)
            return None
        t0 = time.thread_time()
        if decode:
            graphs.prepare(chunks, runner.block_manager)
        t1 = time.thread_time()
        runner.prepare(chunks)
        t2 = time.thread_time()
        prep["graph"].append(t1 - t0 if decode else t2 - t1)             # a prefill step runs eagerly on a GPU too
        prep["eager"].append(t2 - t1)
        return None

    execute, sample = ModelRunner.execute, LLMEngine._sample
    ModelRunner.execute = stub_execute
    # distinct tokens per sequence and position, so that the prefix cache fills with as many distinct blocks as in
    # a real run (a constant token kept it nearly empty and hid a host cost that grew with the cache's size)
    LLMEngine._sample = lambda self, chunks, logits: {c.seq.seq_id: (31 * c.seq.seq_id + c.seq.num_tokens) % 256
                                                      for c in chunks if c.samples}
    try:
        engine.generate(prompts, params, use_tqdm=False)                  # warm-up
        generate_s = float("inf")
        for _ in range(3):                                                # generate(): outputs once, at the end
            start = time.thread_time()
            engine.generate(prompts, params, use_tqdm=False)
            generate_s = min(generate_s, time.thread_time() - start)
        steps = len(engine.metrics.steps)
        for i, prompt in enumerate(prompts):                              # the step API: outputs every step
            engine.add_request(i, prompt, params)
        times, running, timed = [], [], True
        while engine.has_unfinished_requests():
            start = time.thread_time()
            engine.step()
            times.append(time.thread_time() - start)
            running.append(engine.last_step.num_running if engine.last_step.num_prefill_tokens == 0 else 0)
    finally:
        ModelRunner.execute, LLMEngine._sample = execute, sample
    # decode-only steps: (scheduling and bookkeeping, graph preparation, eager preparation, running sequences)
    decode = [(t - g - e, g, e, n) for t, g, e, n in zip(times, prep["graph"], prep["eager"], running) if n]
    med = lambda i: statistics.median(d[i] for d in decode)
    per_seq = lambda i: statistics.median(d[i] / d[3] for d in decode)
    return dict(batch=batch, output_tokens=output_tokens, steps=steps, generate_s=generate_s,
                generate_per_step_s=generate_s / steps, step_api_decode_steps=len(decode),
                host_step_median_s=statistics.median(d[0] + d[1] for d in decode),
                host_per_seq_median_s=statistics.median((d[0] + d[1]) / d[3] for d in decode),
                sched_step_median_s=med(0), sched_per_seq_median_s=per_seq(0),
                prep_graph_step_median_s=med(1), prep_graph_per_seq_median_s=per_seq(1),
                prep_eager_step_median_s=med(2), prep_eager_per_seq_median_s=per_seq(2))


def best_of(rows: list[dict]) -> dict:
    """Several runs of one batch as one row: each time its minimum over the runs (the run least disturbed by the
    other processes of the machine), the counts from the first run (they are the same in every run)."""
    return {k: min(r[k] for r in rows) if k.endswith("_s") else v for k, v in rows[0].items()}


def run_in(root: Path, batch: int, output_tokens: int) -> dict:
    """host_seconds_per_step as the code of the checkout at ``root`` has it, in a fresh interpreter, with the commit
    it measured (``git_commit``)."""
    return run_json_in(root, "from benchmarks.host_step import host_seconds_per_step as h; "
                             f"result = h({batch}, {output_tokens})")


def run_json_in(root: Path, code: str) -> dict:
    """Run ``code`` (which sets ``result``, a dict) in a fresh single-threaded interpreter in the checkout at
    ``root``, its engine on the path; ``result`` with the commit it measured (``git_commit``)."""
    script = ("import json, torch; torch.set_num_threads(1); from benchmarks import record; " + code +
              "; print(json.dumps(dict(result, git_commit=record.git_commit())))")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def ab_options(parser, unit: str, rounds: int) -> None:
    """--rounds and --baseline: each ``unit`` (a batch, a row) timed ``rounds`` times, by this checkout's code and by
    another's, alternating."""
    parser.add_argument("--rounds", type=int, default=rounds, help=f"runs per {unit}; each time its best "
                                                                    f"(default {rounds})")
    parser.add_argument("--baseline", type=Path, default=None,
                        help=f"another checkout of the course (a git worktree of the commit to compare with): each "
                             f"{unit} runs by its code and by this one's, alternating, in fresh interpreters, --rounds "
                             "times; its rows go to baseline_rows")


def _options(parser) -> None:
    ab_options(parser, "batch", 1)


def _describe(r: dict) -> str:
    return (f"batch {r['batch']:4d}: generate() {r['generate_per_step_s'] * 1e3:7.3f} ms/step | decode step (step "
            f"API): scheduling+bookkeeping {r['sched_step_median_s'] * 1e3:7.3f} ms, input prep graph "
            f"{r['prep_graph_step_median_s'] * 1e3:6.3f} / eager {r['prep_eager_step_median_s'] * 1e3:6.3f} ms | "
            f"per running sequence {r['sched_per_seq_median_s'] * 1e6:5.1f} + "
            f"{r['prep_graph_per_seq_median_s'] * 1e6:4.1f} (graph) / {r['prep_eager_per_seq_median_s'] * 1e6:4.1f} "
            "(eager) us")


def main(argv: list[str] | None = None) -> dict:
    args = record.parse_args(__doc__, "host_step", "batches 1 and 64, 32 output tokens", argv, _options)
    batches, output_tokens = ([1, 64], 32) if args.quick else ([1, 16, 64, 128, 256], 128)
    result = record.provenance("host_step", "benchmarks.host_step", argv, torch.float32, args.quick, engine=False)
    result.update(what="host time of an engine step: forward pass and sampling replaced by stubs (distinct tokens: "
                       "the prefix cache holds as many blocks as in a real run); per decode step of the step API, "
                       "scheduling + bookkeeping (sched_*) and the input preparation of a CUDA-graph replay "
                       "(prep_graph_*) and of an eager step (prep_eager_*); host_* = sched + prep_graph; "
                       f"best of {args.rounds} run(s) per batch",
                  trace=f"B requests at once, prompts 64-128 tokens, {output_tokens} output tokens each", rows=[])
    if args.baseline:
        result["baseline_rows"] = []
    for batch in batches:
        if args.baseline:   # alternate which goes first, so that neither always runs in the other's wake
            this, base = [], []
            for i in range(args.rounds):
                for runs, root in ((this, Path(__file__).parents[1]), (base, args.baseline))[::1 if i % 2 else -1]:
                    runs.append(run_in(root, batch, output_tokens))
            r, b = best_of(this), best_of(base)
            result["baseline_rows"].append(b)
            print(f"baseline ({b['git_commit'][:12]}) {_describe(b)}")
        else:
            r = best_of([host_seconds_per_step(batch, output_tokens) for _ in range(args.rounds)])
        result["rows"].append(r)
        print(_describe(r), flush=True)
    print(f"wrote {record.write(result, 'host_step', args.out)}")
    return result


if __name__ == "__main__":
    main()
