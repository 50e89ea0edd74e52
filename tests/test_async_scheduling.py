"""Asynchronous scheduling (issue 18; ``course_lib.serving.async_scheduling``): the host plans step k + 1 before it
reads step k's tokens. On the CPU nothing overlaps, but ``async_scheduling=True`` runs the same logic (placeholders,
input ids taken from the previous step's sampled ids, stop tokens found one step late, outputs one step late), so
every output must equal the synchronous engine's on any trace, and no block may be lost. Seeded sampling requests
launch without draining too (their draws run on the device, ``sampling.sample_tokens``)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib.model.sampling import SamplingParams
from course_lib.serving.async_scheduling import PLACEHOLDER, InflightStep
from course_lib.serving.engine import LLMEngine
from course_lib.serving.model_runner import ModelRunner
from course_lib.serving.sequence import ScheduledChunk, Sequence
from test_engine import MICRO, assert_all_blocks_free

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def all_blocks_free(engine) -> None:
    engine.reset_prefix_cache()           # cached blocks stay cached after a run: count them back first
    assert_all_blocks_free(engine)


def outputs_of(engine, prompts, params, **kwargs):
    outs = engine.generate(prompts, params, use_tqdm=False, **kwargs)
    return [(o.token_ids if o.error is None else str(o.error),
             [c.finish_reason for c in o.outputs], o.num_cached_tokens) for o in outs]


def frequent_token(prompts, max_tokens=12) -> int:
    """A token the micro model generates often: as a stop token it stops requests mid-way."""
    outs = LLMEngine(MICRO, max_num_seqs=8).generate(prompts, SamplingParams(max_tokens=max_tokens), use_tqdm=False)
    tokens = [t for o in outs for t in o.token_ids[1:]]
    return max(set(tokens), key=tokens.count) if tokens else 0


def test_the_default_is_on_for_a_gpu_model_only():
    assert LLMEngine(MICRO).config.async_scheduling is False
    assert LLMEngine(MICRO, async_scheduling=True).config.async_scheduling is True
    with pytest.raises(ValueError, match="async_scheduling"):
        LLMEngine(MICRO, async_scheduling="yes")


def never_synchronously(chunks, logits):
    raise AssertionError("a step of the asynchronous engine drained and sampled on the host")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_outputs_equal_the_synchronous_engine_on_any_trace(data):
    n = data.draw(st.integers(1, 7), label="requests")
    block_size = data.draw(st.sampled_from([1, 2, 4, 8]), label="block_size")
    max_num_seqs = data.draw(st.integers(1, 6), label="max_num_seqs")
    chunked = data.draw(st.booleans(), label="chunked")
    mode = data.draw(st.sampled_from(["recompute", "swap"]), label="preemption_mode")
    caching = data.draw(st.booleans(), label="enable_prefix_caching")
    shared = data.draw(st.lists(st.integers(0, 63), max_size=9), label="shared prefix")
    prompts = [shared + data.draw(st.lists(st.integers(0, 63), min_size=1, max_size=12), label=f"prompt {i}")
               for i in range(n)]
    max_tokens = [data.draw(st.integers(1, 12), label=f"max_tokens {i}") for i in range(n)]
    stop = data.draw(st.sampled_from(["none", "frequent"]), label="stop")
    stop_ids = (frequent_token(prompts),) if stop == "frequent" else ()
    sampled = data.draw(st.sets(st.integers(0, n - 1)), label="requests that sample")
    top_k = data.draw(st.sampled_from([None, 5]), label="top_k of the requests that sample")
    top_p = data.draw(st.sampled_from([1.0, 0.9]), label="top_p of the requests that sample")
    params = [SamplingParams(max_tokens=m, stop_token_ids=stop_ids, temperature=0.8 if i in sampled else 0.0,
                             top_k=top_k if i in sampled else None, top_p=top_p if i in sampled else 1.0,
                             seed=i if i in sampled else None) for i, m in enumerate(max_tokens)]
    arrivals = [data.draw(st.sampled_from([0.0, 0.001, 0.01]), label=f"arrival {i}") for i in range(n)]
    need = max(-(-(len(p) + m) // block_size) for p, m in zip(prompts, max_tokens))
    num_blocks = data.draw(st.integers(need, need * 3), label="num_blocks")
    budget = data.draw(st.integers(max_num_seqs, 32), label="budget") if chunked else 64
    config = dict(block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=budget, enable_chunked_prefill=chunked, preemption_mode=mode,
                  enable_prefix_caching=caching)
    sync, overlap = LLMEngine(MICRO, **config), LLMEngine(MICRO, async_scheduling=True, **config)
    overlap._sample = never_synchronously       # seeded draws launch like greedy steps: no step drains
    if caching:   # each engine's cache lives as long as the engine: the second run of a trace starts warm
        sync.reset_prefix_cache()
    # arrival times are read on each engine's own clock (measured step times): only a trace that arrives at once
    # is scheduled identically; later arrivals still must give the same tokens
    # A stop token is read one step late: the stopped sequence runs one step more (a thrown-away token, a slot of
    # its own), so under memory pressure other free cached blocks may be evicted in another order. The tokens and
    # finish reasons stay the same; the prefix-cache hits are the same only when no stop token can fire (found by
    # hypothesis: 5 requests, block size 1, 9 blocks, 2 running at most: request 4 hit 2 cached tokens, then 1).
    want = outputs_of(sync, prompts, params)
    got = outputs_of(overlap, prompts, params)
    assert got == want if not stop_ids else [g[:2] for g in got] == [w[:2] for w in want]
    all_blocks_free(overlap)
    got = outputs_of(overlap, prompts, params, arrival_times=arrivals)
    assert [g[:2] for g in got] == [w[:2] for w in want]          # cached-token counts depend on the arrival order
    all_blocks_free(overlap)


def test_tokens_arrive_one_step_late_and_a_stop_costs_one_wasted_token():
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    stop = frequent_token(prompts, max_tokens=10)
    params = SamplingParams(max_tokens=10, stop_token_ids=(stop,))
    sync, overlap = LLMEngine(MICRO, max_num_seqs=4), LLMEngine(MICRO, max_num_seqs=4, async_scheduling=True)
    want = sync.generate(prompts, params, use_tqdm=False)
    logs = []
    for engine in (sync, overlap):
        for i, p in enumerate(prompts):
            engine.add_request(i, p, params)
        log = []
        while engine.has_unfinished_requests():
            log.append({o.request_id: (list(o.token_ids), o.finished) for o in engine.step()})
            assert all(PLACEHOLDER not in tokens for tokens, _ in log[-1].values())
        logs.append(log)
        all_blocks_free(engine)
    sync_log, async_log = logs
    assert async_log[0] == {}                         # the first step launched, nothing read back yet
    assert async_log[1:] == sync_log                  # then the same outputs, one step later
    stopped = [o for o in want if o.outputs[0].finish_reason == "stop"]
    assert stopped, "the trace must stop a request early"
    computed = sum(s.num_prefill_tokens + s.num_decode_tokens for s in sync.metrics.steps)
    overlap.generate(prompts, params, use_tqdm=False)
    extra = sum(s.num_decode_tokens + s.num_prefill_tokens for s in overlap.metrics.steps) - computed
    # a stop is seen one step late: the step already launched computes one token more for each request that stopped
    # before its length (one that stops on its last allowed token had finished by length: nothing more launched)
    early = sum(len(o.token_ids) < params.max_tokens for o in stopped)
    assert early and extra == early


def test_an_abort_while_a_step_is_in_flight_returns_real_tokens_and_frees_every_block():
    engine = LLMEngine(MICRO, max_num_seqs=4, block_size=2, num_blocks=32, async_scheduling=True,
                       enable_prefix_caching=True)
    engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=20))
    engine.add_request("b", [1, 2, 3, 9], SamplingParams(max_tokens=6))
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None
    aborted = engine.abort_request("a")
    assert aborted.finished and PLACEHOLDER not in aborted.token_ids and len(aborted.token_ids) == 4
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(final) == ["b"] and len(final["b"].token_ids) == 6
    alone = LLMEngine(MICRO, max_num_seqs=4).generate([[1, 2, 3, 9]], SamplingParams(max_tokens=6), use_tqdm=False)
    assert final["b"].token_ids == alone[0].token_ids
    all_blocks_free(engine)


def test_the_next_step_reads_placeholders_from_the_device_not_the_host(monkeypatch):
    """Every launched step after the first gets the previous step's tokens through ``prev``, and the host's
    copy of them is still a placeholder when that step's input ids are built."""
    seen = []
    execute = ModelRunner.execute

    def spy(self, chunks, prev=None):
        if prev is not None:
            rows = prev.input_rows(chunks)
            seen.append((len(rows[0]), sum(c.seq.token_ids[c.start + c.num_tokens - 1] == PLACEHOLDER
                                           for c in chunks)))
        return execute(self, chunks, prev)

    monkeypatch.setattr(ModelRunner, "execute", spy)
    engine = LLMEngine(MICRO, max_num_seqs=4, async_scheduling=True)
    outs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=6), use_tqdm=False)
    assert len(seen) == 5 and all(patched == held == 2 for patched, held in seen)     # 6 tokens: 5 decode steps
    sync = LLMEngine(MICRO, max_num_seqs=4).generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=6),
                                                     use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in sync]


def test_input_rows_map_each_placeholder_to_its_sampled_row():
    a, b, c = (Sequence(i, i, [1, 2, 3]) for i in range(3))
    logits = torch.zeros(2, 8)
    logits[0, 5] = logits[1, 6] = 1.0
    step = InflightStep([ScheduledChunk(a, 0, 3), ScheduledChunk(b, 0, 3)], logits)
    assert step.placeholders() == {0: PLACEHOLDER, 1: PLACEHOLDER}
    for seq in (a, b):
        seq.output_token_ids.append(PLACEHOLDER)
    step.mark_placeholders()
    # next step: c prefills (no placeholder), b decodes its placeholder, a is recomputed from position 0
    chunks = [ScheduledChunk(c, 0, 3), ScheduledChunk(b, 3, 1), ScheduledChunk(a, 0, 4)]
    assert step.input_rows(chunks) == ([3, 7], [1, 0])
    assert [(s.seq_id, t) for s, t in step.read()] == [(0, 5), (1, 6)]


def test_a_step_of_seeded_draws_launches_without_draining(monkeypatch):
    """Only seeded sampling rows: every step launches (the step before it is still in flight when it does), none
    samples on the host, and the tokens are the synchronous engine's; the draws are keyed by the output position,
    placeholders included."""
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=s) for s in (3, 4, 5)]
    want = [o.token_ids for o in LLMEngine(MICRO, max_num_seqs=4).generate(prompts, params, use_tqdm=False)]
    engine = LLMEngine(MICRO, max_num_seqs=4, async_scheduling=True)
    engine._sample = never_synchronously
    launched_over = []
    init = InflightStep.__init__

    def spy(self, chunks, logits):
        launched_over.append(engine._inflight is not None)   # a step in flight that was not drained before
        init(self, chunks, logits)

    monkeypatch.setattr(InflightStep, "__init__", spy)
    got = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    assert got == want and len({tuple(t) for t in got}) == 3
    assert len(launched_over) == 8 and launched_over == [False] + [True] * 7   # 1 prefill step + 7 decode steps
    all_blocks_free(engine)


def test_a_stop_token_read_one_step_late_changes_no_token_under_memory_pressure():
    """The case hypothesis found: the async engine's stopped request runs one step more, its cached-block hits can
    differ from the synchronous engine's, its tokens and finish reasons cannot."""
    prompts = [[0, 0, 0, 1], [0], [0, 0, 0, 0, 0, 0, 0], [0, 12], [0, 12, 0]]
    stop = (frequent_token(prompts),)
    params = [SamplingParams(max_tokens=m, stop_token_ids=stop) for m in (2, 1, 1, 1, 1)]
    config = dict(block_size=1, num_blocks=9, max_num_seqs=2, enable_prefix_caching=True)
    want = outputs_of(LLMEngine(MICRO, **config), prompts, params)
    overlap = LLMEngine(MICRO, async_scheduling=True, **config)
    overlap._sample = never_synchronously
    got = outputs_of(overlap, prompts, params)
    assert [g[:2] for g in got] == [w[:2] for w in want] and "stop" in want[0][1]
    all_blocks_free(overlap)
