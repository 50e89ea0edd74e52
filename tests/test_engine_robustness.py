"""One bad request never sinks the batch (issue 16, part 4): bad sampling values, unknown keys and token ids that
are not integers get a ``ValueError`` on their own output while the others are served; a second ``generate`` on a
busy engine is refused; a failed ``generate`` gives every block back; a seeded request draws the same tokens alone,
in any batch, under any budget, with or without speculative decoding."""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib.serving.engine import LLMEngine
from course_lib.model.generate import greedy_generate
from course_lib.serving.model_runner import ModelRunner
from course_lib.model.sampling import SamplingParams
from course_lib.serving.static_batching import StaticBatchEngine
from conftest import hold_in_execute
from test_engine import MICRO, assert_all_blocks_free
from test_engine_speculative import MICRO as SPEC_TARGET, MICRO_DRAFT, assert_all_blocks_back

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

GOOD = SamplingParams(max_tokens=3)


# ---------------------------------------------------------------- bad values in SamplingParams
@pytest.mark.parametrize("field, kwargs", [
    ("temperature", dict(temperature=float("nan"))), ("temperature", dict(temperature=float("inf"))),
    ("temperature", dict(temperature=float("-inf"))), ("seed", dict(seed=-1)), ("seed", dict(seed=2**63)),
    ("seed", dict(seed=2**64)), ("seed", dict(seed=True)),
])
def test_non_finite_temperature_and_seed_out_of_range_are_refused(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_a_tiny_positive_temperature_is_greedy():
    """logits / 1e-310 overflows to inf (softmax NaN, the whole batch crashed): below vLLM's 1e-5 it is greedy."""
    assert SamplingParams(temperature=1e-310).greedy and SamplingParams(temperature=9e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy and SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    engine = LLMEngine(MICRO, block_size=4, num_blocks=16, max_num_seqs=4)
    outs = engine.generate([[1, 2], [3, 4]], [GOOD, SamplingParams(temperature=1e-310, max_tokens=3, seed=1)],
                           use_tqdm=False)
    assert [o.token_ids for o in outs] == [greedy_generate(MICRO, p, 3, use_cache=False) for p in ([1, 2], [3, 4])]


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_the_lessons_samplers_refuse_a_temperature_that_is_not_finite(temperature):
    """generate.sample_next (lesson 01) and speculative.probabilities (lesson 06) let NaN through to
    torch.multinomial ("probability tensor contains either inf, nan or element < 0"); a tiny temperature is greedy."""
    from course_lib.model.generate import sample_next
    from course_lib.serving.speculative import probabilities

    logits = torch.tensor([0.5, 2.0, -1.0])
    for f in (sample_next, probabilities):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            f(logits, temperature)
    assert sample_next(logits, 1e-310) == 1 and probabilities(logits, 1e-310).tolist() == [0.0, 1.0, 0.0]


# ---------------------------------------------------------------- one bad request among good ones
BAD_REQUESTS = [   # (prompt, params, words its error must name)
    ([3, 4], dict(max_tokens=3, temperature=float("nan")), ["temperature"]),
    ([3, 4], dict(max_tokens=3, temperature=float("inf")), ["temperature"]),
    ([3, 4], dict(max_tokens=3, temperature=1.0, seed=-1), ["seed"]),
    ([3, 4], dict(max_tokens=3, temperature=1.0, seed=2**64), ["seed"]),
    ([3, 4], dict(max_tokens=3, temprature=1.0), ["temprature", "temperature"]),    # a typo: unknown key
    ([1.7, 2], GOOD, ["prompt[0]", "1.7", "integer"]),                               # ran as token 1
    ([3, -0.5], GOOD, ["prompt[1]", "-0.5", "integer"]),                             # ran as token 0
    ([3, True], GOOD, ["prompt[1]", "True", "integer"]),
    ([3, None], GOOD, ["prompt[1]", "None"]),
    ([3, 64], GOOD, ["prompt[1]", "64", "vocabulary"]),
    (torch.tensor([1.7, 2.0]), GOOD, ["prompt", "float32", "integer"]),
    (torch.tensor([[1, 2]]), GOOD, ["prompt", "1-D", "(1, 2)"]),
    (np.array([3.0, 4.0]), GOOD, ["prompt[0]", "integer"]),
    (5, GOOD, ["prompt", "int"]),
]


def test_one_bad_request_never_sinks_the_batch():
    """Each bad request gets a ValueError naming the request, the field (and the position in the prompt) on its
    own output; the good requests around it are served, every block comes back."""
    good = [[1, 2, 3], [4, 5]]
    prompts = [good[0]] + [r[0] for r in BAD_REQUESTS] + [good[1]]
    params = [GOOD] + [r[1] for r in BAD_REQUESTS] + [GOOD]
    engine = LLMEngine(MICRO, block_size=4, num_blocks=16, max_num_seqs=4)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    for i, ((_, _, words), out) in enumerate(zip(BAD_REQUESTS, outputs[1:-1]), start=1):
        assert isinstance(out.error, ValueError), (i, out)
        assert f"request {i}:" in str(out.error) and all(w in str(out.error) for w in words), str(out.error)
        assert out.outputs == []
    for out, p in zip((outputs[0], outputs[-1]), good):
        assert out.ok and out.token_ids == greedy_generate(MICRO, p, 3, use_cache=False)
    assert_all_blocks_free(engine)


def test_integer_prompts_of_every_kind_are_accepted():
    want = greedy_generate(MICRO, [1, 2, 3], 3, use_cache=False)
    engine = LLMEngine(MICRO, block_size=4, num_blocks=16, max_num_seqs=4)
    prompts = [[1, 2, 3], (1, 2, 3), torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3], dtype=torch.int32),
               np.array([1, 2, 3]), [np.int64(1), np.int32(2), 3]]
    outs = engine.generate(prompts, GOOD, use_tqdm=False)
    assert all(o.ok and o.token_ids == want and o.prompt_token_ids == [1, 2, 3] for o in outs)
    assert all(type(t) is int for o in outs for t in o.prompt_token_ids)


def test_the_static_baseline_validates_the_same_way():
    outs = StaticBatchEngine(MICRO, max_batch_size=4).generate(
        [[1, 2], [1.7, 2], [3, 4]], [GOOD, GOOD, dict(max_tokens=3, temprature=1.0)])
    assert outs[0].ok and "prompt[0]" in str(outs[1].error) and "temprature" in str(outs[2].error)


# ---------------------------------------------------------------- one engine, one call at a time
def test_a_second_generate_while_one_runs_is_refused(monkeypatch):
    """Two threads on one engine shared its block manager and pool (5 of 6 results were wrong): the second call
    raises a RuntimeError at once, the first one completes correctly."""
    started, release = hold_in_execute(monkeypatch)
    engine = LLMEngine(MICRO, block_size=4, num_blocks=16, max_num_seqs=4)
    result = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("out", engine.generate([[1, 2, 3]], GOOD, use_tqdm=False)))
    worker.start()
    assert started.wait(30)
    with pytest.raises(RuntimeError, match="already running"):
        engine.generate([[4, 5]], GOOD, use_tqdm=False)
    release.set()
    worker.join(30)
    assert result["out"][0].token_ids == greedy_generate(MICRO, [1, 2, 3], 3, use_cache=False)
    monkeypatch.undo()                                  # the real execute again: the engine serves on
    got = engine.generate([[4, 5]], GOOD, use_tqdm=False)[0].token_ids
    assert got == greedy_generate(MICRO, [4, 5], 3, use_cache=False)


# ---------------------------------------------------------------- a failed generate frees what it held
FAILING_SETUPS = {
    "recompute": dict(block_size=4, num_blocks=16, max_num_seqs=4),
    "swap": dict(block_size=4, num_blocks=12, max_num_seqs=4, max_num_batched_tokens=8, preemption_mode="swap"),
    "prefix caching": dict(block_size=4, num_blocks=16, max_num_seqs=4, enable_prefix_caching=True),
    "speculative": dict(block_size=4, num_blocks=24, max_num_seqs=4, speculative_model=MICRO_DRAFT,
                        num_speculative_tokens=2),
}


@pytest.mark.parametrize("setup", FAILING_SETUPS)
def test_a_failed_generate_frees_its_blocks_and_the_engine_serves_again(monkeypatch, setup):
    model = SPEC_TARGET if setup == "speculative" else MICRO
    engine = LLMEngine(model, **FAILING_SETUPS[setup])
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [1, 2, 3, 4, 5, 6, 7], [10, 11]]
    params = SamplingParams(max_tokens=10)
    execute, calls = ModelRunner.execute, []

    def failing_execute(self, chunks):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return execute(self, chunks)

    monkeypatch.setattr(ModelRunner, "execute", failing_execute)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.generate(prompts, params, use_tqdm=False)
    (assert_all_blocks_back if setup in ("prefix caching", "speculative") else assert_all_blocks_free)(engine)
    monkeypatch.setattr(ModelRunner, "execute", execute)
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [greedy_generate(model, p, 10, use_cache=False) for p in prompts]
    (assert_all_blocks_back if setup in ("prefix caching", "speculative") else assert_all_blocks_free)(engine)


# ---------------------------------------------------------------- seeded sampling: the batch never matters
def seeded_requests(num: int = 20, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(64) for _ in range(rng.randint(1, 12))] for _ in range(num)]
    params = [SamplingParams(temperature=rng.choice([0.7, 1.0, 1.3]), top_p=rng.choice([1.0, 0.9]),
                             top_k=rng.choice([None, 20]), max_tokens=rng.randint(4, 16), seed=1000 + i)
              for i in range(num)]
    return prompts, params


SPEC = dict(speculative_model=MICRO_DRAFT, num_speculative_tokens=3)
BATCH_SETUPS = {   # each changes what a sequence shares a step with, and with speculation how many drafts it gets
    "ample": dict(),
    "tight budget": dict(num_blocks=30, max_num_batched_tokens=40),
    "preemption": dict(num_blocks=14, max_num_batched_tokens=32),
    "speculative, ample": dict(**SPEC),
    "speculative, tight budget": dict(num_blocks=30, max_num_batched_tokens=40, **SPEC),
    "speculative, preemption": dict(num_blocks=14, max_num_batched_tokens=32, **SPEC),
    "speculative, off in big batches": dict(speculative_disable_by_batch_size=3, **SPEC),
}


@pytest.fixture(scope="module")
def seeded_alone():
    """Each request alone, without speculation: the tokens every other setup must reproduce."""
    prompts, params = seeded_requests()
    engine = LLMEngine(SPEC_TARGET, block_size=4, max_num_seqs=8)
    return [engine.generate([p], sp, use_tqdm=False)[0].token_ids for p, sp in zip(prompts, params)]


@pytest.mark.parametrize("setup", BATCH_SETUPS)
def test_a_seeded_request_draws_the_same_tokens_alone_and_in_any_batch(seeded_alone, setup):
    """The draw of output token t uses noise keyed by (seed, t) only, and a speculative step accepts a draft
    exactly when it equals that draw: neither the batch, the budget, preemption, nor the number of drafts changes
    a token (before, 5 of these 20 requests differed with speculation under a tight budget)."""
    prompts, params = seeded_requests()
    engine = LLMEngine(SPEC_TARGET, block_size=4, max_num_seqs=8, **BATCH_SETUPS[setup])
    batch = engine.generate(prompts, params, use_tqdm=False)
    differ = [i for i, (o, a) in enumerate(zip(batch, seeded_alone)) if o.token_ids != a]
    assert not differ, f"{len(differ)} of {len(prompts)} requests differ from their run alone: {differ}"
    if "preemption" in setup:
        assert sum(engine.metrics.preemptions.values()) > 0
    if setup.startswith("speculative"):
        assert engine.metrics.speculative.accepted > 0
        assert_all_blocks_back(engine)
