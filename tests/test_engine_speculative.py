"""Speculative decoding in the engine (``LLMEngine(speculative_model=..., num_speculative_tokens=k)``): greedy outputs
equal the target's greedy tokens (with chunked prefill on and off, a tiny token budget, preemption by recompute and
by swap, prefix caching), the blocks of the prefix cache hold valid K/V of both models, stop tokens and the context
limit end sequences inside an accepted run, sampled outputs have the target's distribution (χ² through the engine,
with a power check), a property test over random traces (no request lost or duplicated, every block back), the
speculative metrics, and bad arguments."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import ModelConfig, Llama, load_tiny
from course_lib.serving.engine import LLMEngine
from course_lib.model.generate import greedy_generate
from course_lib.model.kv_cache import KVCache
from course_lib.serving.prefix_cache import PrefixCachingBlockManager
from course_lib.experiments.prefix_workloads import shared_prompt_requests
from course_lib.model.sampling import SamplingParams, filter_logits, token_generator
from course_lib.serving.sequence import Sequence
from test_engine import assert_preemptions, assert_same_outputs, corpus_requests
from test_speculative import chi_square_threshold   # the χ² quantile of lesson 06's test (Wilson–Hilferty)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def pair():
    target, tokenizer = load_tiny("target", dtype=torch.float32, device="cpu")
    draft, _ = load_tiny("draft", dtype=torch.float32, device="cpu")
    return target, draft, tokenizer


def micro_model(seed: int, vocab_size: int = 64, max_len: int = 64, lm_head_scale: float = 4.0,
                like: Llama | None = None) -> Llama:
    """A random 1-layer model (head_dim 16) with peaked logits; ``like``: a noisy copy of that model instead, a
    draft that agrees with it often but not always."""
    torch.manual_seed(seed)
    model = Llama(ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_len)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if like is not None:
                p.copy_(dict(like.named_parameters())[name] + 0.05 * p.std() * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5 * (lm_head_scale if "lm_head" in name else 1))
    return model


MICRO = micro_model(0)
MICRO_DRAFT = micro_model(1, like=MICRO)


def assert_all_blocks_back(engine: LLMEngine) -> None:
    """Queues empty; every block free, or (prefix caching) held by the cache alone."""
    s = engine.scheduler
    assert not (s.waiting or s.running or s.swapped)
    bm = s.block_manager
    assert not bm.block_tables
    a = bm.allocator
    cached = bm.prefix_cache.nodes if isinstance(bm, PrefixCachingBlockManager) else {}
    assert a.num_free_blocks + len(cached) == a.num_blocks
    assert all(a.ref_counts[b] == (1 if b in cached else 0) for b in range(a.num_blocks))
    if s.cpu_block_manager is not None:
        assert s.cpu_block_manager.num_free_blocks == engine.num_cpu_blocks and not s.cpu_block_manager.block_tables


def assert_budget_and_stats(engine: LLMEngine) -> None:
    m, k = engine.metrics, engine.num_speculative_tokens
    assert all(s.num_prefill_tokens + s.num_decode_tokens + s.num_draft_tokens <= engine.max_num_batched_tokens
               for s in m.steps)
    assert all(s.num_running <= engine.max_num_seqs for s in m.steps)
    stats = m.speculative
    assert stats.proposed == sum(s.num_draft_tokens for s in m.steps)      # every lookahead slot held a draft
    assert 0 <= stats.accepted <= stats.proposed
    assert 1 <= stats.tokens_per_target_forward <= k + 1
    assert stats.draft_forwards <= k * len(m.steps)


# ---------------------------------------------------------------- greedy == the target's greedy tokens
@pytest.fixture(scope="module")
def workload(pair):
    """test_engine's 12 requests, with the target's greedy tokens."""
    target, _, tokenizer = pair
    return corpus_requests(target, tokenizer)


SETUPS = {   # (engine kwargs, k, preemptions expected)
    "k=2, ample memory": (dict(max_num_seqs=8), 2, None),
    "k=4, ample memory": (dict(max_num_seqs=8), 4, None),
    "k=3, no chunked prefill": (dict(max_num_seqs=4, enable_chunked_prefill=False), 3, None),
    "k=3, tiny token budget (chunks)": (dict(max_num_seqs=4, max_num_batched_tokens=16), 3, None),
    "k=4, preempted by recompute": (dict(num_blocks=20, block_size=4, max_num_seqs=8, max_num_batched_tokens=40), 4,
                                    "recompute"),
    "k=4, preempted by swap": (dict(num_blocks=20, block_size=4, max_num_seqs=8, max_num_batched_tokens=40,
                                    preemption_mode="swap"), 4, "swap"),
    "k=2, swap with a full CPU pool": (dict(num_blocks=16, block_size=4, max_num_seqs=8, max_num_batched_tokens=24,
                                            preemption_mode="swap", num_cpu_blocks=6), 2, "both"),
    "k=2, no chunked prefill, recompute": (dict(num_blocks=20, block_size=4, max_num_seqs=8,
                                                enable_chunked_prefill=False), 2, "recompute"),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_greedy_equals_the_targets_greedy_tokens(pair, workload, setup):
    target, draft, _ = pair
    prompts, params, reference = workload
    kwargs, k, preempts = SETUPS[setup]
    engine = LLMEngine(target, speculative_model=draft, num_speculative_tokens=k, **kwargs)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == reference
    assert all(o.ok and o.outputs[0].finish_reason == "length" for o in outputs)
    assert_preemptions(engine, preempts)
    assert_all_blocks_back(engine)
    assert_budget_and_stats(engine)
    stats = engine.metrics.speculative
    assert stats.accepted > 0 and stats.rejected > 0                    # both kinds of round happened
    assert max(stats.accepted_per_round) == k                           # some round accepted every draft


def test_speculation_takes_fewer_steps(pair, workload):
    target, draft, _ = pair
    prompts, params, _ = workload
    plain = LLMEngine(target, max_num_seqs=8)
    plain.generate(prompts, params, use_tqdm=False)
    fast = LLMEngine(target, max_num_seqs=8, speculative_model=draft, num_speculative_tokens=4)
    fast.generate(prompts, params, use_tqdm=False)
    assert len(fast.metrics.steps) < len(plain.metrics.steps)
    assert fast.metrics.speculative.tokens_per_target_forward > 1.5


def test_speculation_pauses_while_the_batch_is_big(pair, workload):
    """speculative_disable_by_batch_size = 4: steps that start with >= 4 running sequences verify no drafts,
    the others do; the tokens stay the target's greedy tokens."""
    target, draft, _ = pair
    prompts, params, reference = workload
    engine = LLMEngine(target, max_num_seqs=8, speculative_model=draft, num_speculative_tokens=3,
                       speculative_disable_by_batch_size=4)
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == reference
    steps = engine.metrics.steps
    running_before = [0] + [s.num_running for s in steps[:-1]]         # the batch a step starts with (approximately:
    big = [s for s, n in zip(steps, running_before) if n >= 8]        # the previous step's, before finishes/admissions)
    small = [s for s, n in zip(steps, running_before) if n <= 2]
    assert big and all(s.num_draft_tokens == 0 for s in big)
    assert small and any(s.num_draft_tokens > 0 for s in small)
    assert_all_blocks_back(engine)


# ---------------------------------------------------------------- prefix caching: both models' K/V in a cached block
def assert_cached_blocks_hold_both_models_kv(engine: LLMEngine) -> None:
    """Every block of the prefix cache holds, in the target's pool and in the draft's, the K/V that a fresh run
    of that model over the block's prefix computes (a draft K/V missing there would only lower the acceptance
    rate, silently: this checks it directly)."""
    cache = engine.block_manager.prefix_cache
    assert len(cache) > 0
    P = engine.block_size
    for block_id, node in list(cache.nodes.items())[:12]:
        tokens, n = [], node
        while n.parent is not None:
            tokens[:0] = n.token_ids
            n = n.parent
        for model, pool in ((engine.model, engine.pool), (engine.speculative_model, engine.draft_pool)):
            fresh = KVCache(model.config, 1, len(tokens), dtype=model.dtype, device=model.device)
            with torch.no_grad():
                model(torch.tensor([tokens]), cache=fresh)
            for layer in range(model.config.num_hidden_layers):
                for fresh_kv, pool_kv in ((fresh.k, pool.k_caches), (fresh.v, pool.v_caches)):
                    want = fresh_kv[layer][0, :, -P:].transpose(0, 1)                    # [P, Hkv, D]
                    torch.testing.assert_close(pool_kv[layer][block_id], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(max_num_seqs=4, max_num_batched_tokens=16),
                                dict(max_num_seqs=4, enable_chunked_prefill=False),
                                dict(max_num_seqs=6, num_blocks=16, max_num_batched_tokens=32),
                                dict(max_num_seqs=6, num_blocks=16, max_num_batched_tokens=32, preemption_mode="swap")],
                         ids=["chunked", "not chunked", "recompute", "swap"])
def test_prefix_caching_same_tokens_and_valid_draft_kv(pair, kw):
    target, draft, tokenizer = pair
    prompts = shared_prompt_requests(10, system_len=40, question_len=12, num_systems=2, tokenizer=tokenizer, seed=1)
    prompts = [p[:40 + 3 + i % 10] for i, p in enumerate(prompts)]
    params = [SamplingParams(max_tokens=6 + i) for i in range(len(prompts))]
    plain = LLMEngine(target, block_size=8, **kw).generate(prompts, params, use_tqdm=False)
    engine = LLMEngine(target, block_size=8, enable_prefix_caching=True, speculative_model=draft,
                       num_speculative_tokens=3, **kw)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in plain]
    assert engine.metrics.num_cached_tokens > 0
    if "num_blocks" in kw:
        assert sum(engine.metrics.preemptions.values()) > 0
    assert_all_blocks_back(engine)
    assert_budget_and_stats(engine)
    assert_cached_blocks_hold_both_models_kv(engine)
    # a second call on the warm cache: still the same tokens
    again = engine.generate(prompts[:3], params[:3], use_tqdm=False)
    assert [o.token_ids for o in again] == [o.token_ids for o in plain[:3]]
    assert_all_blocks_back(engine)


# ---------------------------------------------------------------- the invariant behind it all
def fresh_kv(model: Llama, tokens: list[int]) -> KVCache:
    cache = KVCache(model.config, 1, len(tokens), dtype=model.dtype, device=model.device)
    with torch.no_grad():
        model(torch.tensor([tokens]), cache=cache)
    return cache


@pytest.mark.parametrize("kw", [dict(preemption_mode="swap", num_blocks=14),
                                dict(preemption_mode="recompute", num_blocks=14, enable_prefix_caching=True)],
                         ids=["swap", "recompute + prefix caching"])
def test_after_every_step_computed_tokens_have_valid_kv_in_both_pools(monkeypatch, kw):
    """``num_computed_tokens`` counts exactly the tokens whose K/V are valid in both pools, after every step:
    through prefill chunks, partial and full acceptances, swaps and recomputes. (Greedy equality cannot see a
    wrong draft K/V: it only lowers the acceptance rate.)"""
    from course_lib.serving.scheduler import Scheduler

    engine = LLMEngine(MICRO, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, speculative_model=MICRO_DRAFT,
                       num_speculative_tokens=3, **kw)
    checked, update = [], Scheduler.update

    def checked_update(self, out, next_tokens, now):
        finished = update(self, out, next_tokens, now)
        for seq in self.running:
            n, table = seq.num_computed_tokens, self.block_manager.block_table(seq.seq_id)
            for model, pool in ((engine.model, engine.pool), (engine.speculative_model, engine.draft_pool)):
                want = fresh_kv(model, seq.token_ids[:n])
                for layer in range(model.config.num_hidden_layers):
                    k, v = pool.gather(layer, torch.tensor(table), n, model.dtype)            # [Hkv, n, D] each
                    torch.testing.assert_close(k, want.k[layer][0, :, :n], rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(v, want.v[layer][0, :, :n], rtol=1e-4, atol=1e-5)
            checked.append(n)
        return finished

    monkeypatch.setattr(Scheduler, "update", checked_update)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9] * 13, [1, 2, 3, 4, 5, 6, 7, 8, 9], [4, 4, 2]]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=14), use_tqdm=False)
    monkeypatch.undo()
    assert [o.token_ids for o in outputs] == [greedy_generate(MICRO, p, 14, use_cache=False) for p in prompts]
    m = engine.metrics
    assert sum(m.preemptions.values()) > 0 and len(checked) > 20
    stats = m.speculative
    assert stats.rejected > 0 and 3 in stats.accepted_per_round        # partial and full acceptances both happened


# ---------------------------------------------------------------- stop tokens, the context, kernels
def test_stop_token_inside_an_accepted_run_and_the_context_limit():
    """A draft identical to the target: every draft is accepted (α = 1), so a step appends k + 1 tokens and a stop
    token can sit in the middle of them. Near the context the lookahead shrinks to what is left."""
    model = micro_model(2, max_len=16)
    want = greedy_generate(model, [1, 2, 3], 12, use_cache=False)
    stop = want[2]
    assert stop not in want[:2]
    engine = LLMEngine(model, block_size=4, max_num_seqs=2, speculative_model=model, num_speculative_tokens=4)
    out = engine.generate([[1, 2, 3], [1] * 10], [SamplingParams(max_tokens=12, stop_token_ids=(stop,)),
                                                  SamplingParams(max_tokens=50)], use_tqdm=False)
    assert out[0].token_ids == want[:3] and out[0].outputs[0].finish_reason == "stop"
    assert len(out[1].token_ids) == 6 and out[1].outputs[0].finish_reason == "length"   # 10 + 6 = the context, 16
    assert out[1].token_ids == greedy_generate(model, [1] * 10, 6, use_cache=False)
    stats = engine.metrics.speculative
    assert stats.acceptance_rate == 1.0 and stats.rejected == 0
    assert_all_blocks_back(engine)
    # the first step: request 0 prefills and verifies 4 drafts; request 1 only 16 - 10 - 1 = 5 -> 4 too
    assert engine.metrics.steps[0].num_draft_tokens == 8
    # 3 tokens to go: 2 drafts + the bonus, no draft whose bonus could not be kept
    e = LLMEngine(model, block_size=4, max_num_seqs=1, speculative_model=model, num_speculative_tokens=4)
    assert len(e.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)[0].token_ids) == 3
    assert [s.num_draft_tokens for s in e.metrics.steps] == [2]
    # the lookahead never asks for a slot past min(prompt + max_tokens, context): one block per 4 tokens suffices
    e = LLMEngine(model, block_size=4, num_blocks=4, max_num_seqs=1, speculative_model=model, num_speculative_tokens=4)
    assert e.generate([[1] * 10], SamplingParams(max_tokens=50), use_tqdm=False)[0].ok
    assert sum(e.metrics.preemptions.values()) == 0


def test_kernel_path_on_cpu():
    """The Triton kernels (interpreter) in both models' passes: store_kv, paged decode, attention of verify chunks."""
    from course_lib.device import DEVICE
    target, draft = MICRO.to(DEVICE), MICRO_DRAFT.to(DEVICE)
    prompts = [[3, 9, 4, 1, 7], [5] * 11, [2, 8]]
    params = [SamplingParams(max_tokens=n) for n in (6, 3, 5)]
    reference = [greedy_generate(target, p, sp.max_tokens, use_cache=False) for p, sp in zip(prompts, params)]
    engine = LLMEngine(target, block_size=4, num_blocks=16, max_num_seqs=3, max_num_batched_tokens=9, use_kernels=True,
                       speculative_model=draft, num_speculative_tokens=2)
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == reference
    assert engine.metrics.speculative.proposed > 0
    assert_all_blocks_back(engine)


# ---------------------------------------------------------------- sampling keeps the target's distribution
V, LENGTH, NUM_SAMPLES, SIGNIFICANCE = 4, 4, 3000, 1e-4
PROMPT = [1, 2, 3]


def exact_joint(model: Llama, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(t1 ... t4 | PROMPT) of every continuation, from the model's filtered distributions (what the engine
    samples without speculation)."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=LENGTH)))                      # [V^4, 4]
    ids = torch.cat([torch.tensor(PROMPT).expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        logits = model(ids)[:, len(PROMPT) - 1:-1]                                                # [V^4, 4, V]
    probs = torch.softmax(torch.stack([filter_logits(row, params.temperature, params.top_k, params.top_p)
                                       for row in logits.reshape(-1, V)]), -1).view(len(seqs), LENGTH, V)
    joint = probs.double().gather(2, seqs[..., None]).squeeze(-1).prod(-1)                      # [V^4]
    return {tuple(s): float(p) for s, p in zip(seqs.tolist(), joint)}


def chi_square(samples, joint, positions) -> tuple[float, int, int]:
    """(statistic, degrees of freedom, samples in impossible cells) of the tokens at ``positions``."""
    exact = {}
    for s, p in joint.items():
        cell = tuple(s[i] for i in positions)
        exact[cell] = exact.get(cell, 0.0) + p
    counts = dict.fromkeys(exact, 0)
    for s in samples:
        counts[tuple(s[i] for i in positions)] += 1
    n, cells = len(samples), [c for c, p in exact.items() if p > 0]
    stat = sum((counts[c] - n * exact[c]) ** 2 / (n * exact[c]) for c in cells)
    return stat, len(cells) - 1, sum(counts[c] for c, p in exact.items() if p == 0)


SMALL_TARGET = micro_model(0, vocab_size=V, max_len=32, lm_head_scale=3.0)
SMALL_DRAFT = micro_model(1, vocab_size=V, max_len=32, lm_head_scale=3.0)   # disagrees often: many rejections


def sample_through_engine(params: SamplingParams, k: int) -> tuple[list[tuple[int, ...]], LLMEngine]:
    engine = LLMEngine(SMALL_TARGET, block_size=4, max_num_seqs=256, speculative_model=SMALL_DRAFT,
                       num_speculative_tokens=k)
    out = engine.generate([PROMPT], params, use_tqdm=False)[0]
    samples = [tuple(c.token_ids) for c in out.outputs]
    assert len(samples) == NUM_SAMPLES and all(len(s) == LENGTH for s in samples)
    return samples, engine


SAMPLING_CASES = [(SamplingParams(temperature=1.0, max_tokens=LENGTH, n=NUM_SAMPLES, seed=5), 2),
                  (SamplingParams(temperature=0.7, top_k=3, max_tokens=LENGTH, n=NUM_SAMPLES, seed=6), 3)]


@pytest.mark.parametrize("params, k", SAMPLING_CASES, ids=["T=1, k=2", "T=0.7, top_k=3, k=3"])
def test_sampled_tokens_have_the_targets_distribution(params, k):
    """Tokens 1-2 (mostly from rounds that start at the prompt) and 3-4 (rounds that start in decoding, after
    rejections and after full acceptances) each against the exact target marginals."""
    samples, engine = sample_through_engine(params, k)
    joint = exact_joint(SMALL_TARGET, params)
    for positions in ((0, 1), (2, 3)):
        stat, dof, impossible = chi_square(samples, joint, positions)
        assert impossible == 0, "a token the target's filtered distribution excludes was generated"
        assert stat < chi_square_threshold(dof, SIGNIFICANCE), f"tokens {positions}: χ² = {stat:.1f} with {dof} dof"
    stats = engine.metrics.speculative
    assert stats.rejected > 0 and k in stats.accepted_per_round      # rejections and full acceptances both happened
    assert_all_blocks_back(engine)


def test_the_test_catches_noise_reused_across_positions(monkeypatch):
    """Power check: each output token must race with noise of its own position. One noise for all positions (keyed
    by the seed alone) keeps every token's own distribution but couples the tokens: the same test must fail."""
    params, k = SAMPLING_CASES[0]
    monkeypatch.setattr(Sequence, "generator", lambda self, offset=0: token_generator(self.seed, 0))
    samples, _ = sample_through_engine(params, k)
    stat, dof, _ = chi_square(samples, exact_joint(SMALL_TARGET, params), (0, 1))
    assert stat > chi_square_threshold(dof, SIGNIFICANCE)


def test_seeded_sampling_is_reproducible():
    engine = LLMEngine(MICRO, block_size=4, max_num_seqs=4, speculative_model=MICRO_DRAFT, num_speculative_tokens=3)
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=11)
    alone = engine.generate([[1, 2, 3]], p, use_tqdm=False)[0].token_ids
    crowd = engine.generate([[5, 6], [1, 2, 3]], [SamplingParams(max_tokens=5), p], use_tqdm=False)
    assert crowd[1].token_ids == alone and len(alone) == 10
    n3 = engine.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_tokens=6, seed=11, n=3), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in n3.outputs}) > 1
    assert_all_blocks_back(engine)


# ---------------------------------------------------------------- properties over random traces
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_request_lost_or_duplicated_and_all_blocks_back(data):
    n = data.draw(st.integers(1, 6), label="requests")
    k = data.draw(st.integers(1, 4), label="num_speculative_tokens")
    block_size = data.draw(st.sampled_from([1, 2, 4, 8]), label="block_size")
    max_num_seqs = data.draw(st.integers(1, 4), label="max_num_seqs")
    chunked = data.draw(st.booleans(), label="chunked")
    caching = data.draw(st.booleans(), label="prefix caching")
    mode = data.draw(st.sampled_from(["recompute", "swap"]), label="preemption_mode")
    prompts = [data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=20), label=f"prompt {i}") for i in range(n)]
    max_tokens = [data.draw(st.integers(1, 12), label=f"max_tokens {i}") for i in range(n)]
    arrivals = [data.draw(st.sampled_from([0.0, 0.001, 0.01]), label=f"arrival {i}") for i in range(n)]
    stop = data.draw(st.sampled_from([(), (7,)]), label="stop_token_ids")
    need = max(-(-(len(p) + m) // block_size) for p, m in zip(prompts, max_tokens))
    num_blocks = data.draw(st.integers(need, need * 3), label="num_blocks")
    least = max_num_seqs * (1 + k)
    budget = data.draw(st.integers(least, least + 24), label="budget") if chunked else 64
    params = [SamplingParams(max_tokens=m, stop_token_ids=stop) for m in max_tokens]
    engine = LLMEngine(MICRO, block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget, enable_chunked_prefill=chunked, preemption_mode=mode,
                       enable_prefix_caching=caching, speculative_model=MICRO_DRAFT, num_speculative_tokens=k,
                       num_cpu_blocks=data.draw(st.integers(1, num_blocks), label="num_cpu_blocks"))
    outputs = engine.generate(prompts, params, arrival_times=arrivals, use_tqdm=False)
    plain = LLMEngine(MICRO, max_num_seqs=8).generate(prompts, params, use_tqdm=False)
    assert_same_outputs(outputs, plain, prompts, max_tokens, stop)    # the target's greedy tokens, whatever happened
    assert_all_blocks_back(engine)
    assert_budget_and_stats(engine)


# ---------------------------------------------------------------- metrics and bad arguments
def test_metrics_only_when_speculating(pair, workload):
    target, draft, _ = pair
    prompts, params, _ = workload
    plain = LLMEngine(target, max_num_seqs=8)
    plain.generate(prompts[:4], params[:4], use_tqdm=False)
    assert plain.metrics.speculative is None and not any(key.startswith("spec_") for key in plain.metrics.summary())
    engine = LLMEngine(target, max_num_seqs=8, speculative_model=draft, num_speculative_tokens=2)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    summary, stats = engine.metrics.summary(), engine.metrics.speculative
    assert summary["spec_num_draft_tokens"] == stats.proposed > 0
    assert summary["spec_num_accepted_tokens"] == stats.accepted
    assert summary["spec_acceptance_rate"] == stats.accepted / (stats.accepted + stats.rejected)
    assert summary["spec_draft_acceptance_rate"] == stats.accepted / stats.proposed
    # every round yields its accepted drafts + 1 token, of which those past a stop or max_tokens are dropped
    produced = sum(len(o.token_ids) for o in outputs)
    assert summary["num_output_tokens"] == produced <= stats.accepted + stats.target_forwards
    assert summary["spec_tokens_per_target_forward"] == pytest.approx(1 + stats.accepted / stats.target_forwards)
    assert engine.metrics.bytes_per_block == engine.pool.bytes_per_block + engine.draft_pool.bytes_per_block


def _with_config(model: Llama, **changes) -> Llama:
    return Llama(dataclasses.replace(model.config, **changes)).eval()


@pytest.mark.parametrize("field, kwargs", [
    ("num_speculative_tokens", dict(speculative_model=MICRO_DRAFT, num_speculative_tokens=-1)),
    ("num_speculative_tokens", dict(speculative_model=MICRO_DRAFT, num_speculative_tokens=1.5)),
    ("num_speculative_tokens", dict(speculative_model=MICRO_DRAFT, num_speculative_tokens=0)),
    ("num_speculative_tokens", dict(speculative_model=MICRO_DRAFT, num_speculative_tokens=64)),
    ("speculative_model", dict(num_speculative_tokens=2)),
    ("speculative_model", dict(speculative_model="draft.safetensors", num_speculative_tokens=2)),
    ("vocab_size", dict(speculative_model=_with_config(MICRO_DRAFT, vocab_size=65), num_speculative_tokens=2)),
    ("max_position_embeddings", dict(speculative_model=_with_config(MICRO_DRAFT, max_position_embeddings=32),
                                     num_speculative_tokens=2)),
    ("max_num_batched_tokens", dict(speculative_model=MICRO_DRAFT, num_speculative_tokens=4, max_num_seqs=8,
                                    max_num_batched_tokens=16)),
    ("speculative_disable_by_batch_size", dict(speculative_model=MICRO_DRAFT, num_speculative_tokens=2,
                                               speculative_disable_by_batch_size=0)),
    ("speculative_disable_by_batch_size", dict(speculative_disable_by_batch_size=4)),
])
def test_bad_arguments_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        LLMEngine(MICRO, **kwargs)


def test_default_budget_holds_every_decode_with_its_drafts():
    engine = LLMEngine(MICRO, max_num_seqs=200, speculative_model=MICRO_DRAFT, num_speculative_tokens=4)
    assert engine.max_num_batched_tokens == 1000
