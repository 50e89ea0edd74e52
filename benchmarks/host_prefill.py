"""The host's share of an engine's prefill steps (lesson 10, issue 18): ``benchmarks.host_step``'s stubs (no forward
pass, no sampling), on the steps that schedule prompt tokens.

    python -m benchmarks.host_prefill         # CPU, ~10 s; writes benchmarks/results/host_prefill_<cpu>.json
    python -m benchmarks.host_prefill --baseline ../other-worktree --rounds 5 --out results/host_prefill_ab.json
                                              # the same runs by another checkout's engine, interleaved with this one's

The trace is ``benchmarks.serving_step``'s: 128 requests at once, prompts of 64-512 tokens, 256 greedy output tokens
each, ``max_num_batched_tokens=2048``, ``max_num_seqs=128``. Its **prefill phase** (as ``serving_step.run_phases``
splits it) is the first ~20 steps: each schedules ~2,000 prompt tokens (chunked prefill) beside the decodes of the
sequences admitted before. On a GPU these steps run eagerly (no CUDA graph): the host builds the step's inputs token
by token, then launches every kernel of the forward pass. This benchmark times the first part, on the CPU, per
prefill step (every step with prompt tokens) and per scheduled token:

* **scheduling and bookkeeping**: the scheduler, the block manager (and, in the rows with prefix caching, the
  hashing of the blocks just filled), appending the tokens, the step API's outputs;
* **input preparation**: ``ModelRunner.prepare``, the eager ``StepBatch`` (input ids, positions, slot mapping,
  block tables, sequence lengths, the sampling rows) and its copy to the device (here: the CPU, so no copy).

The launches of the forward pass are not here (the stub hides them): see lesson 10 for their count.
"""
from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import course_lib.device  # noqa: F401  (first: the interpreter switch)
import torch

from benchmarks import record
from course_lib.model.config import ModelConfig
from course_lib.model.llama import Llama
from course_lib.model.sampling import SamplingParams
from course_lib.serving.engine import LLMEngine
from course_lib.serving.model_runner import ModelRunner


def prefill_phase_host_seconds(num_requests: int = 128, output_tokens: int = 256, prefix_caching: bool = False,
                               max_num_batched_tokens: int = 2048, block_size: int = 16, seed: int = 0) -> dict:
    """Serves the trace through the step API with a stub forward pass and stub sampling (a warm-up run first), until
    the first step without prompt tokens; times each step's host work and, inside it, ``ModelRunner.prepare``
    (``time.thread_time``: this thread's CPU time, which other processes on the machine do not inflate)."""
    config = ModelConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    torch.manual_seed(0)
    engine = LLMEngine(Llama(config).eval(), max_num_seqs=num_requests, max_num_batched_tokens=max_num_batched_tokens,
                       num_blocks=num_requests * (1024 // block_size), block_size=block_size,
                       enable_prefix_caching=prefix_caching)
    rng = random.Random(seed)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(rng.randint(64, 512))] for _ in range(num_requests)]
    params = SamplingParams(max_tokens=output_tokens)
    prep = []                                   # seconds of ModelRunner.prepare in the current step

    def stub_execute(runner, chunks, prev=None):                          # no forward pass: the inputs only
        t0 = time.thread_time()
        runner.prepare(chunks, prev)
        prep.append(time.thread_time() - t0)
        return None

    def prefill_phase() -> list[tuple[float, float, int, int]]:
        """(step seconds, prepare seconds, prompt tokens, decode tokens) per step with prompt tokens."""
        engine.reset_prefix_cache()             # every run computes its prompts (none is cached from the last run)
        for i, prompt in enumerate(prompts):
            engine.add_request(i, prompt, params)
        steps = []
        while engine.has_unfinished_requests():
            prep.clear()
            t0 = time.thread_time()
            engine.step()
            dt = time.thread_time() - t0
            last = engine.last_step
            if last.num_prefill_tokens == 0:
                break
            steps.append((dt, sum(prep), last.num_prefill_tokens, last.num_decode_tokens))
        for request_id in list(engine._requests):                         # the rest of the trace is not timed
            engine.abort_request(request_id)
        return steps

    execute, sample = ModelRunner.execute, LLMEngine._sample
    ModelRunner.execute = stub_execute
    # distinct tokens per sequence and position, as host_step: the prefix cache holds as many blocks as in a real run
    LLMEngine._sample = lambda self, chunks, logits: {c.seq.seq_id: (31 * c.seq.seq_id + c.seq.num_tokens) % 32000
                                                      for c in chunks if c.samples}
    try:
        prefill_phase()                                                   # warm-up
        steps = prefill_phase()
    finally:
        ModelRunner.execute, LLMEngine._sample = execute, sample
    total = sum(s[0] for s in steps)
    prepare = sum(s[1] for s in steps)
    tokens = sum(s[2] + s[3] for s in steps)
    return dict(num_requests=num_requests, prefix_caching=prefix_caching,
                max_num_batched_tokens=max_num_batched_tokens, prefill_steps=len(steps),
                prompt_tokens=sum(s[2] for s in steps), decode_tokens=sum(s[3] for s in steps),
                host_phase_s=total, host_step_mean_s=total / len(steps),
                host_step_median_s=statistics.median(s[0] for s in steps), host_per_token_s=total / tokens,
                sched_step_mean_s=(total - prepare) / len(steps), sched_per_token_s=(total - prepare) / tokens,
                prep_step_mean_s=prepare / len(steps), prep_per_token_s=prepare / tokens)


def run_in(root: Path, **kwargs) -> dict:
    """``prefill_phase_host_seconds`` of this file over the engine of the checkout at ``root`` (which need not have
    this file), in a fresh interpreter, with the commit it measured (``git_commit``)."""
    from benchmarks.host_step import run_json_in   # here: a baseline checkout runs this file with its own host_step

    return run_json_in(root, "import importlib.util; spec = importlib.util.spec_from_file_location('host_prefill_', "
                             f"{str(Path(__file__).resolve())!r}); m = importlib.util.module_from_spec(spec); "
                             f"spec.loader.exec_module(m); result = m.prefill_phase_host_seconds(**{kwargs!r})")


def _options(parser) -> None:
    from benchmarks.host_step import ab_options   # here, not at the top: see run_in

    ab_options(parser, "row", 3)


def _describe(r: dict) -> str:
    return (f"prefix caching {'on ' if r['prefix_caching'] else 'off'}: {r['prefill_steps']:3d} prefill steps, "
            f"host {r['host_step_mean_s'] * 1e3:6.3f} ms/step = scheduling+bookkeeping "
            f"{r['sched_step_mean_s'] * 1e3:6.3f} + input prep {r['prep_step_mean_s'] * 1e3:6.3f} | per token "
            f"{r['host_per_token_s'] * 1e6:5.2f} us = {r['sched_per_token_s'] * 1e6:5.2f} + "
            f"{r['prep_per_token_s'] * 1e6:5.2f}")


def main(argv: list[str] | None = None) -> dict:
    from benchmarks import host_step   # here, not at the top: see run_in
    args = record.parse_args(__doc__, "host_prefill", "32 requests, 512 tokens a step, one round", argv, _options)
    trace = (dict(num_requests=32, max_num_batched_tokens=512) if args.quick else
             dict(num_requests=128, max_num_batched_tokens=2048))
    rounds = 1 if args.quick else args.rounds
    result = record.provenance("host_prefill", "benchmarks.host_prefill", argv, torch.float32, args.quick,
                               engine=False)
    result.update(what="host time of the prefill phase's steps (those with prompt tokens): forward pass and sampling "
                       "replaced by stubs; per step (mean over the phase) and per scheduled token (prompt + decode), "
                       "scheduling + bookkeeping (sched_*) and ModelRunner.prepare (prep_*); host_* = their sum; "
                       f"best of {rounds} run(s) per row",
                  trace=f"{trace['num_requests']} requests at once, prompts 64-512 tokens, 256 output tokens each, "
                        f"max_num_batched_tokens={trace['max_num_batched_tokens']}, steps until the first one "
                        "without prompt tokens", rows=[])
    if args.baseline:
        result["baseline_rows"] = []
    for prefix_caching in (False, True):
        kwargs = dict(trace, prefix_caching=prefix_caching)
        if args.baseline:   # alternate which goes first, so that neither always runs in the other's wake
            this, base = [], []
            for i in range(rounds):
                for runs, root in ((this, Path(__file__).parents[1]), (base, args.baseline))[::1 if i % 2 else -1]:
                    runs.append(run_in(root, **kwargs))
            r, b = host_step.best_of(this), host_step.best_of(base)
            result["baseline_rows"].append(b)
            print(f"baseline ({b['git_commit'][:12]}) {_describe(b)}")
        else:
            r = host_step.best_of([prefill_phase_host_seconds(**kwargs) for _ in range(rounds)])
        result["rows"].append(r)
        print(f"this     ({record.git_commit()[:12]}) {_describe(r)}", flush=True)
    print(f"wrote {record.write(result, 'host_prefill', args.out)}")
    return result


if __name__ == "__main__":
    main()
