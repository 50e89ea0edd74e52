"""Partial, tail-first swap (``enable_partial_swap``, lesson 04; course_lib/serving/partial_swap.py): greedy outputs
equal the run without preemption (chunked prefill on and off, a full CPU pool, prefix caching, speculative
decoding), every block comes back, a constructed case moves strictly fewer bytes than whole-sequence swap, the
bookkeeping holds over random traces, aborting a sequence that keeps a prefix frees it, and bad settings raise."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib.paging.block_manager import BlockManager, OutOfBlocksError
from course_lib.serving.config import EngineConfig
from course_lib.serving.engine import LLMEngine
from course_lib.serving.scheduler import Scheduler
from course_lib.model.sampling import SamplingParams
from test_engine import MICRO, assert_all_blocks_free, assert_same_outputs, corpus_requests

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def workload(tiny):
    return corpus_requests(*tiny)


SETUPS = {
    "chunked": dict(num_blocks=20, block_size=4, max_num_seqs=8, max_num_batched_tokens=16),
    "not chunked": dict(num_blocks=20, block_size=4, max_num_seqs=8, enable_chunked_prefill=False),
    "small CPU pool (falls back to recompute)": dict(num_blocks=20, block_size=4, max_num_seqs=8,
                                                     max_num_batched_tokens=8, num_cpu_blocks=6),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_greedy_outputs_equal_and_fewer_blocks_move(tiny, workload, setup):
    model, _ = tiny
    prompts, params, reference = workload
    runs = {}
    for partial in (False, True):
        engine = LLMEngine(model, preemption_mode="swap", enable_partial_swap=partial, **SETUPS[setup])
        outputs = engine.generate(prompts, params, use_tqdm=False)
        assert [o.token_ids for o in outputs] == reference
        assert_all_blocks_free(engine)
        runs[partial] = engine.metrics
    whole, part = runs[False], runs[True]
    assert part.preemptions["swap"] > 0
    assert part.num_swapped_in_blocks <= part.num_swapped_blocks            # never more back than out
    if setup == "chunked":                                                   # the lesson's numbers, in small
        assert part.num_swapped_blocks < whole.num_swapped_blocks
        assert part.swap_bytes + part.swap_in_bytes < whole.swap_bytes + whole.swap_in_bytes
    if setup.startswith("small CPU pool"):   # whole swap runs out of CPU blocks and recomputes; partial needs fewer
        assert whole.preemptions["recompute"] > 0
        assert part.num_recomputed_tokens < whole.num_recomputed_tokens


def test_constructed_case_moves_one_block_instead_of_the_whole_sequence(tiny):
    """Two requests of 20-token prompts in 12 blocks of 4: the younger one is preempted when the older one needs a
    block (at its 25th token). Whole swap moves all 6 blocks of the younger one out and back; partial swap moves its
    last block then, and the one before it 4 tokens later, when the older one needs its 8th block: 2 out, 2 back."""
    model, tokenizer = tiny
    ids = tokenizer.encode("In the beginning God created the heaven and the earth. And the earth was without form")
    prompts = [ids[:20], ids[1:21]]
    params = SamplingParams(max_tokens=12)
    alone = [LLMEngine(model, block_size=4).generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]
    m = {}
    for partial in (False, True):
        engine = LLMEngine(model, block_size=4, num_blocks=12, max_num_seqs=2, preemption_mode="swap",
                           enable_partial_swap=partial)
        outputs = engine.generate(prompts, params, use_tqdm=False)
        assert [o.token_ids for o in outputs] == alone
        assert_all_blocks_free(engine)
        m[partial] = engine.metrics
    assert m[False].preemptions == m[True].preemptions == {"recompute": 0, "swap": 1}
    assert (m[False].num_swapped_blocks, m[False].num_swapped_in_blocks) == (6, 6)
    assert (m[True].num_swapped_blocks, m[True].num_swapped_in_blocks) == (2, 2)
    assert m[True].swap_bytes * 3 == m[False].swap_bytes and m[True].swap_in_bytes * 3 == m[False].swap_in_bytes
    assert m[False].swap_ops == {"out": 1, "in": 1} and m[True].swap_ops == {"out": 2, "in": 1}   # more, smaller copies


def test_with_prefix_caching_and_with_speculative_decoding(tiny, workload):
    model, _ = tiny
    prompts, params, reference = workload
    kw = dict(num_blocks=20, block_size=4, max_num_seqs=8, max_num_batched_tokens=16, preemption_mode="swap",
              enable_partial_swap=True)
    engine = LLMEngine(model, enable_prefix_caching=True, **kw)
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == reference
    assert engine.metrics.preemptions["swap"] > 0
    bm = engine.scheduler.block_manager
    assert not bm.block_tables and bm.allocator.num_free_blocks + len(bm.prefix_cache) == bm.allocator.num_blocks
    engine = LLMEngine(model, speculative_model=model, num_speculative_tokens=2,
                       **{**kw, "max_num_batched_tokens": 24})
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == reference
    assert engine.metrics.preemptions["swap"] > 0
    assert_all_blocks_free(engine)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bookkeeping_over_random_traces(data):
    n = data.draw(st.integers(1, 8), label="requests")
    block_size = data.draw(st.sampled_from([1, 2, 4]), label="block_size")
    max_num_seqs = data.draw(st.integers(1, 6), label="max_num_seqs")
    chunked = data.draw(st.booleans(), label="chunked")
    prompts = [data.draw(st.lists(st.integers(0, 63), min_size=1, max_size=20), label=f"prompt {i}") for i in range(n)]
    max_tokens = [data.draw(st.integers(1, 12), label=f"max_tokens {i}") for i in range(n)]
    arrivals = [data.draw(st.sampled_from([0.0, 0.001, 0.01]), label=f"arrival {i}") for i in range(n)]
    need = max(-(-(len(p) + m) // block_size) for p, m in zip(prompts, max_tokens))
    num_blocks = data.draw(st.integers(need, need * 2), label="num_blocks")
    budget = data.draw(st.integers(max_num_seqs, 32), label="budget") if chunked else 64
    params = [SamplingParams(max_tokens=m, stop_token_ids=(7,)) for m in max_tokens]
    engine = LLMEngine(MICRO, block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget, enable_chunked_prefill=chunked, preemption_mode="swap",
                       enable_partial_swap=True, enable_prefix_caching=data.draw(st.booleans(), label="caching"),
                       num_cpu_blocks=data.draw(st.integers(1, num_blocks), label="num_cpu_blocks"))
    outputs = engine.generate(prompts, params, arrival_times=arrivals, use_tqdm=False)
    ample = LLMEngine(MICRO, max_num_seqs=8).generate(prompts, params, use_tqdm=False)
    assert_same_outputs(outputs, ample, prompts, max_tokens, (7,))
    s = engine.scheduler
    assert not (s.waiting or s.running or s.swapped or s.block_manager.block_tables or s.cpu_block_manager.block_tables)
    assert s.cpu_block_manager.num_free_blocks == engine.num_cpu_blocks
    m = engine.metrics
    assert m.num_swapped_in_blocks <= m.num_swapped_blocks


def test_abort_of_a_sequence_that_kept_its_prefix():
    engine = LLMEngine(MICRO, block_size=4, num_blocks=12, max_num_seqs=2, preemption_mode="swap",
                       enable_partial_swap=True)
    engine.add_request("old", list(range(1, 21)), SamplingParams(max_tokens=12))
    engine.add_request("young", list(range(2, 22)), SamplingParams(max_tokens=12))
    while not engine.scheduler.swapped:
        engine.step()
    young = engine.scheduler.swapped[0]
    assert young.request_id == "young" and young.seq_id in engine.scheduler.block_manager.block_tables
    engine.abort_request("young")
    assert young.seq_id not in engine.scheduler._preempted_at
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_blocks_free(engine)


def test_block_manager_free_tail_and_prepend_blocks():
    bm = BlockManager(8, 4)
    bm.allocate(0, 10)                                   # 3 blocks, the last holds 2 tokens
    table = bm.block_table(0)
    assert bm.free_tail(0, 2) == table[1:] and bm.block_table(0) == table[:1] and bm.num_tokens[0] == 4
    assert bm.num_free_blocks == 7
    new = bm.prepend_blocks(0, 2)
    assert bm.block_table(0) == new + table[:1] and bm.num_tokens[0] == 12
    with pytest.raises(ValueError, match="num_blocks"):
        bm.free_tail(0, 4)
    with pytest.raises(ValueError, match="num_blocks"):
        bm.prepend_blocks(0, -1)
    with pytest.raises(OutOfBlocksError):
        bm.prepend_blocks(0, 6)
    bm.free(0)
    assert bm.num_free_blocks == 8


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="enable_partial_swap"):
        EngineConfig(enable_partial_swap=True)                      # preemption_mode="recompute"
    with pytest.raises(ValueError, match="enable_partial_swap"):
        EngineConfig(preemption_mode="swap", enable_partial_swap=1)
    with pytest.raises(ValueError, match="partial_swap"):
        Scheduler(BlockManager(4, 4), max_num_seqs=1, max_num_batched_tokens=8, max_model_len=16, partial_swap=True)


# ---------------------------------------------------------------- prefetch (simulated on the scheduler)
def test_prefetch_simulation_hides_copy_waits_and_frees_everything():
    from course_lib.experiments.prefetch import AsyncSwapScheduler, simulate

    lengths = [(20 + 7 * (i % 5), 30 + 11 * (i % 7)) for i in range(24)]
    kw = dict(num_blocks=30, block_size=8, max_num_seqs=8, max_num_batched_tokens=32)
    plain, ahead = simulate(lengths, **kw), simulate(lengths, prefetch=True, **kw)   # simulate checks no leak
    assert plain["resumes"] > 0 and plain["predictions"] == 0 and plain["copy_wait_steps"] > 0
    assert ahead["predictions"] > 0 and ahead["predictions_held"] > 0
    assert ahead["copy_wait_steps"] < plain["copy_wait_steps"]
    with pytest.raises(ValueError, match="prefetch"):
        AsyncSwapScheduler(BlockManager(4, 4), max_num_seqs=1, max_num_batched_tokens=8, max_model_len=16,
                           cpu_block_manager=BlockManager(4, 4), prefetch="yes")


def test_swap_in_dedup_counts_the_blocks_shared_from_the_cache(tiny):
    """Lesson 05's cell in small: with prefix caching, every block swapped out comes back either copied or shared
    from the cache (Scheduler.num_swap_in_cached_blocks), and some are shared."""
    from course_lib.experiments.prefix_workloads import shared_prompt_requests

    model, tokenizer = tiny
    prompts = shared_prompt_requests(6, system_len=48, question_len=4, tokenizer=tokenizer, seed=3)
    engine = LLMEngine(model, block_size=8, max_num_seqs=6, num_blocks=24, max_num_batched_tokens=64,
                       preemption_mode="swap", enable_prefix_caching=True)
    engine.generate(prompts, SamplingParams(max_tokens=24), use_tqdm=False)
    m, shared = engine.metrics, engine.scheduler.num_swap_in_cached_blocks
    assert m.preemptions == {"recompute": 0, "swap": m.preemptions["swap"]} and m.preemptions["swap"] > 0
    assert shared > 0 and m.num_swapped_blocks == m.num_swapped_in_blocks + shared


def test_swap_counters_survive_a_json_round_trip():
    import json

    engine = LLMEngine(MICRO, block_size=4, num_blocks=32, max_num_seqs=2, preemption_mode="swap",
                       enable_partial_swap=True)
    engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4), use_tqdm=False)   # room for both: no swap
    summary = engine.metrics.summary()
    assert summary["resume_steps_mean"] is None and summary["swap_ops"] == {"out": 0, "in": 0}
    assert json.loads(json.dumps(summary)) == summary
