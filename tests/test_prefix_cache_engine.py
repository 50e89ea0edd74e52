"""Prefix caching inside the engine (lesson 05): greedy outputs are identical with and without the cache (with
chunked prefill on and off, under preemption by recompute and by swap, with seeded sampling), the hits are where
they should be (shared prompts, a later turn, a preempted request resuming, an entirely cached prompt that still
computes its last token), swapped-in blocks are merged with the cached ones, and no block leaks."""
from __future__ import annotations

import pytest

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib.serving.engine import LLMEngine
from course_lib.serving.prefix_cache import PrefixCachingBlockManager
from course_lib.serving.prefix_hash import PrefixHashCache
from course_lib.experiments.prefix_workloads import chat_conversations, shared_prompt_requests
from course_lib.model.sampling import SamplingParams


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def shared(tiny):
    """10 prompts: one of 2 system prompts (40 tokens) + a question of 3 ... 12 tokens, 6 ... 15 new tokens each."""
    _, tokenizer = tiny
    prompts = shared_prompt_requests(10, system_len=40, question_len=12, num_systems=2, tokenizer=tokenizer, seed=1)
    prompts = [p[:40 + 3 + i % 10] for i, p in enumerate(prompts)]
    params = [SamplingParams(max_tokens=6 + i) for i in range(len(prompts))]
    return prompts, params


def run(model, prompts, params, **kwargs):
    engine = LLMEngine(model, block_size=8, use_kernels=False, **kwargs)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert all(o.ok for o in outputs), [o.error for o in outputs if not o.ok]
    return engine, outputs


def assert_no_leak(engine):
    """After a run: no block table left; every block is free or cached (and then used by nobody)."""
    bm = engine.scheduler.block_manager
    assert isinstance(bm, PrefixCachingBlockManager) and not bm.block_tables
    a, cache = bm.allocator, bm.prefix_cache
    assert a.num_free_blocks + len(cache) == a.num_blocks
    assert all(a.ref_counts[b] == (1 if b in cache else 0) for b in range(a.num_blocks))
    assert cache.num_evictable_blocks == len(cache)


@pytest.mark.parametrize("chunked", [False, True])
def test_outputs_identical_with_and_without_the_cache(tiny, shared, chunked):
    model, _ = tiny
    prompts, params = shared
    kw = dict(max_num_seqs=4, enable_chunked_prefill=chunked, max_num_batched_tokens=16 if chunked else None)
    _, plain = run(model, prompts, params, **kw)
    engine, cached = run(model, prompts, params, enable_prefix_caching=True, **kw)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    m = engine.metrics
    assert m.num_cached_tokens > 0 and m.num_cached_tokens == sum(o.num_cached_tokens for o in cached)
    assert all(o.num_cached_tokens % 8 == 0 and o.num_cached_tokens < len(o.prompt_token_ids) for o in cached)
    assert m.summary()["num_prefill_tokens"] == sum(map(len, prompts)) - m.num_cached_tokens   # prefill saved
    assert_no_leak(engine)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_identical_under_preemption_and_resumed_with_hits(tiny, shared, mode, monkeypatch):
    model, _ = tiny
    prompts, params = shared
    kw = dict(max_num_seqs=6, num_blocks=16, preemption_mode=mode, max_num_batched_tokens=32)
    _, plain = run(model, prompts, params, **kw)
    calls = []                                          # (seq_id, cached tokens) of every admission / swap-in
    original = PrefixCachingBlockManager.allocate_with_prefix
    def spy(self, seq_id, token_ids, num_tokens):
        cached = original(self, seq_id, token_ids, num_tokens)
        calls.append((seq_id, cached))
        return cached
    monkeypatch.setattr(PrefixCachingBlockManager, "allocate_with_prefix", spy)
    engine, cached = run(model, prompts, params, enable_prefix_caching=True, **kw)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    assert sum(engine.metrics.preemptions.values()) > 0
    admitted = {}
    resumed_hits = 0
    for seq_id, n in calls:                            # a second admission of a sequence: it was preempted
        resumed_hits += n if seq_id in admitted else 0
        admitted[seq_id] = n
    assert resumed_hits > 0, calls
    assert_no_leak(engine)


def test_swapped_in_blocks_merge_with_cached_ones(tiny):
    """Requests sharing a long prompt, too many for the memory: swapped-out sequences come back onto the cached
    prompt blocks instead of copying their own: fewer blocks are copied in than out, no duplicate in the tree."""
    model, tokenizer = tiny
    prompts = shared_prompt_requests(6, system_len=48, question_len=4, tokenizer=tokenizer, seed=3)
    params = SamplingParams(max_tokens=24)
    kw = dict(max_num_seqs=6, num_blocks=24, preemption_mode="swap", max_num_batched_tokens=64)
    _, plain = run(model, prompts, params, **kw)
    engine, cached = run(model, prompts, params, enable_prefix_caching=True, **kw)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    steps = engine.metrics.steps
    out_blocks, in_blocks = sum(s.swapped_out_blocks for s in steps), sum(s.swapped_in_blocks for s in steps)
    assert engine.metrics.preemptions["swap"] > 0 and in_blocks < out_blocks
    assert_no_leak(engine)


def test_entirely_cached_prompt_computes_its_last_token(tiny):
    model, tokenizer = tiny
    prompt = shared_prompt_requests(1, system_len=32, question_len=0, tokenizer=tokenizer, seed=4)[0]   # 4 full blocks
    engine = LLMEngine(model, block_size=8, use_kernels=False, enable_prefix_caching=True)
    first = engine.generate([prompt], SamplingParams(max_tokens=5), use_tqdm=False)[0]
    again = engine.generate([prompt], SamplingParams(max_tokens=5), use_tqdm=False)[0]   # the cache persists
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 24         # not 32: the last block is recomputed
    assert again.token_ids == first.token_ids
    assert engine.scheduler.block_manager.num_merged_blocks >= 1                    # ... and merged with the cached one
    assert_no_leak(engine)
    engine.reset_prefix_cache()
    assert len(engine.scheduler.block_manager.prefix_cache) == 0
    assert engine.generate([prompt], SamplingParams(max_tokens=5), use_tqdm=False)[0].num_cached_tokens == 0


def test_multi_turn_chat_hits_its_history_and_matches_the_plain_engine(tiny):
    model, tokenizer = tiny
    params = SamplingParams(max_tokens=10)
    results = {}
    for caching in (False, True):
        convs = chat_conversations(3, 3, system_len=24, user_len=8, reply_len=None, tokenizer=tokenizer, seed=5)
        engine = LLMEngine(model, block_size=8, use_kernels=False, enable_prefix_caching=caching)
        hits = []
        for turn in range(3):
            outs = engine.generate([c.prompt(turn) for c in convs], params, use_tqdm=False)
            for c, o in zip(convs, outs):
                c.replies.append(o.token_ids)
            hits.append(engine.metrics.num_cached_tokens)
        results[caching] = ([c.replies for c in convs], hits)
    assert results[True][0] == results[False][0]
    hits = results[True][1]
    # turn 0: the 3 requests are admitted in the same step, before anyone computed the system prompt: no hit;
    # later turns find their whole history (the replies included) in the cache
    assert hits[0] == 0 and hits[1] > 0 and hits[2] > hits[1]


def test_the_hash_chain_variant_in_the_engine(tiny, shared):
    model, _ = tiny
    prompts, params = shared
    _, plain = run(model, prompts, params, max_num_seqs=4)
    engine = LLMEngine(model, block_size=8, use_kernels=False, max_num_seqs=4, enable_prefix_caching=True)
    engine.block_manager = PrefixCachingBlockManager(engine.num_blocks, 8, cache_cls=PrefixHashCache)
    cached = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    assert isinstance(engine.scheduler.block_manager.prefix_cache, PrefixHashCache)
    assert engine.metrics.num_cached_tokens > 0
    assert_no_leak(engine)


def test_seeded_sampling_is_unchanged_by_the_cache(tiny, shared):
    model, _ = tiny
    prompts, _ = shared
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=7, n=2)
    _, plain = run(model, prompts[:4], params, max_num_seqs=4)
    _, cached = run(model, prompts[:4], params, max_num_seqs=4, enable_prefix_caching=True)
    assert [[c.token_ids for c in o.outputs] for o in cached] == [[c.token_ids for c in o.outputs] for o in plain]


# ---------------------------------------------------------------- the benchmark script runs (CPU smoke mode)
@pytest.mark.command
def test_benchmark_script_quick(tmp_path):
    import json

    from benchmarks import prefix_caching as bench

    out = tmp_path / "r.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for key in ("device", "date", "torch", "triton", "shared_prompt", "chat"):
        assert key in result
    assert result["shared_prompt"]["outputs_identical"] and result["chat"]["outputs_identical"]
    assert result["shared_prompt"]["poisson"]["prefix_cache"]["prefix_cache_hit_rate"] > 0.5
