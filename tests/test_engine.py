"""The engine of lesson 04: greedy outputs equal decoding each request alone without any cache (with preemption by
swap and by recompute, with and without chunked prefill), property tests of the scheduler's bookkeeping over
random arrivals and lengths, bad input, sampling, the static baseline and the workloads."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
import kernels.reference
from course_lib import ModelConfig, Llama
from course_lib.device import DEVICE
from course_lib.serving.engine import LLMEngine
from course_lib.model.generate import greedy_generate
from course_lib.serving.kv_pool import paged_decode_attention_torch
from course_lib.model.sampling import SamplingParams, filter_logits
from course_lib.serving.static_batching import StaticBatchEngine, padded_attention
from course_lib.model.attention import attention
from course_lib.experiments.workloads import (long_prompt_trace, multimodal_prompt, poisson_arrivals, sharegpt_trace,
                                              uniform_trace)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def micro_model(max_len: int = 64, seed: int = 0) -> Llama:
    """A random 1-layer model with head_dim 16 (the smallest the flash kernel takes) and peaked logits (no ties)."""
    torch.manual_seed(seed)
    model = Llama(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_len)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5 * (4 if "lm_head" in name else 1))
    return model


def corpus_requests(model, tokenizer):
    """12 requests: prompts of 1 ... 40 tokens cut from the validation text, 1 ... 24 new tokens each, and the
    model's greedy tokens for each, decoded alone without any cache."""
    from course_lib.model.corpus import load_text

    ids = tokenizer.encode(load_text("validation")[:20000])
    rng = random.Random(0)
    prompts, params = [[ids[5]]], [SamplingParams(max_tokens=6)]          # a one-token prompt
    for _ in range(11):
        n, start = rng.randint(2, 40), rng.randint(0, len(ids) - 50)
        prompts.append(ids[start:start + n])
        params.append(SamplingParams(max_tokens=rng.randint(1, 24)))
    reference = [greedy_generate(model, p, sp.max_tokens, use_cache=False) for p, sp in zip(prompts, params)]
    return prompts, params, reference


@pytest.fixture(scope="module")
def workload(tiny):
    return corpus_requests(*tiny)


def assert_all_blocks_free(engine: LLMEngine) -> None:
    s = engine.scheduler
    assert not (s.waiting or s.running or s.swapped)
    bm = s.block_manager
    assert bm.num_free_blocks == engine.num_blocks
    assert sorted(bm.allocator.free_block_ids) == list(range(engine.num_blocks))
    assert not bm.block_tables and all(c == 0 for c in bm.allocator.ref_counts)
    if s.cpu_block_manager is not None:
        assert s.cpu_block_manager.num_free_blocks == engine.num_cpu_blocks and not s.cpu_block_manager.block_tables


def assert_same_outputs(outputs, reference, prompts, max_tokens, stop) -> None:
    """A run's outputs against a reference run of the same requests: every request answered in order, with the
    reference's tokens, ended by its max_tokens or a stop token, and its times in order."""
    assert [o.request_id for o in outputs] == list(range(len(prompts)))
    for o, a, p, m in zip(outputs, reference, prompts, max_tokens):
        assert o.ok and o.prompt_token_ids == p and len(o.outputs) == 1
        toks = o.token_ids
        assert toks == a.token_ids, (toks, a.token_ids)
        assert len(toks) == m or (toks and toks[-1] in stop and len(toks) < m)
        t = o.metrics
        assert t.arrival_time <= t.first_scheduled_time <= t.first_token_time <= t.finished_time


def assert_preemptions(engine: LLMEngine, expected: str | None) -> None:
    """The run's preemptions: only by `expected` ("recompute" or "swap"), by both ("both"), or none (None)."""
    counts = engine.metrics.preemptions
    if expected in ("recompute", "swap"):
        assert counts[expected] > 0 and sum(counts.values()) == counts[expected], counts
    elif expected == "both":
        assert counts["recompute"] > 0 and counts["swap"] > 0, counts
    else:
        assert sum(counts.values()) == 0, counts


# ---------------------------------------------------------------- greedy == alone, without a cache
ENGINE_SETUPS = {
    "ample memory, chunked prefill": (dict(max_num_seqs=8), None),
    "no chunked prefill": (dict(max_num_seqs=4, enable_chunked_prefill=False), None),
    "tiny token budget (chunks of 8)": (dict(max_num_seqs=8, max_num_batched_tokens=8), None),
    "preempted by recompute": (dict(num_blocks=20, block_size=4, max_num_seqs=8, max_num_batched_tokens=16),
                               "recompute"),
    "preempted by swap": (dict(num_blocks=20, block_size=4, max_num_seqs=8, max_num_batched_tokens=16,
                               preemption_mode="swap"), "swap"),
    "swap with a full CPU pool (falls back to recompute)": (dict(num_blocks=20, block_size=4, max_num_seqs=8,
                                                                 max_num_batched_tokens=8, preemption_mode="swap",
                                                                 num_cpu_blocks=6), "both"),
    "no chunked prefill, preempted by recompute": (dict(num_blocks=20, block_size=4, max_num_seqs=8,
                                                        enable_chunked_prefill=False), "recompute"),
}


@pytest.mark.parametrize("setup", list(ENGINE_SETUPS))
def test_greedy_equals_decoding_alone_without_cache(tiny, workload, setup):
    model, _ = tiny
    prompts, params, reference = workload
    kwargs, preempts = ENGINE_SETUPS[setup]
    engine = LLMEngine(model, **kwargs)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == reference
    assert all(o.ok and o.outputs[0].finish_reason == "length" for o in outputs)
    assert_preemptions(engine, preempts)
    assert_all_blocks_free(engine)
    # every step respects the token budget and the batch size
    assert all(s.num_prefill_tokens + s.num_decode_tokens <= engine.max_num_batched_tokens
               for s in engine.metrics.steps)
    assert all(s.num_running <= engine.max_num_seqs for s in engine.metrics.steps)


def test_chunked_prefill_shares_steps_with_decodes(tiny):
    model, tokenizer = tiny
    trace = long_prompt_trace(4, 12, list(range(1, 301)), tokenizer=tokenizer)
    steps = {}
    for chunked in (False, True):
        engine = LLMEngine(model, max_num_seqs=8, enable_chunked_prefill=chunked,
                           max_num_batched_tokens=64 if chunked else None)
        outputs = engine.generate(trace.prompts, trace.params, arrival_times=trace.arrival_times, use_tqdm=False)
        steps[chunked] = engine.metrics.steps
        assert [len(o.token_ids) for o in outputs] == [12] * 4 + [8]
        assert_all_blocks_free(engine)
    # without chunks the 300-token prompt runs in one step; with them, in chunks of 64 - 4 decodes
    long_chunks = {c: [n for s in steps[c] for rid, n in s.composition if rid == 4 and n > 1] for c in steps}
    assert long_chunks[False] == [300] and long_chunks[True] == [60] * 5
    mixed = [s for s in steps[True] if any(rid == 4 and n > 1 for rid, n in s.composition)]
    assert len(mixed) == 5 and all(s.num_decode_tokens == 4 for s in mixed)


def test_kernel_path_on_cpu_matches_reference_path():
    """The Triton kernels (interpreter) in the engine: store_kv, paged decode and flash attention for chunks."""
    model = micro_model().to(DEVICE)      # on a GPU: compiled kernels (fp32: flash falls back to the plain attention)
    prompts = [[3, 9, 4, 1, 7], [5] * 11, [2, 8]]
    params = [SamplingParams(max_tokens=n) for n in (4, 3, 5)]
    reference = [greedy_generate(model, p, sp.max_tokens, use_cache=False) for p, sp in zip(prompts, params)]
    engine = LLMEngine(model, block_size=4, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=8, use_kernels=True)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == reference
    assert max(s.num_prefill_tokens for s in engine.metrics.steps) > 1     # a prefill chunk went through flash
    assert_all_blocks_free(engine)


def test_batched_torch_decode_equals_reference():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 16, generator=gen)
    k_cache, v_cache = torch.randn(12, 4, 2, 16, generator=gen), torch.randn(12, 4, 2, 16, generator=gen)
    tables = torch.tensor([[3, 7, 0], [1, 0, 0], [11, 2, 5]], dtype=torch.int32)
    lens = torch.tensor([6, 1, 12], dtype=torch.int32)
    want = kernels.reference.paged_attention_decode(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(paged_decode_attention_torch(q, k_cache, v_cache, tables, lens), want)


# ---------------------------------------------------------------- properties over random traces
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_request_lost_or_duplicated_and_all_blocks_freed(data):
    model = MICRO
    n = data.draw(st.integers(1, 8), label="requests")
    block_size = data.draw(st.sampled_from([1, 2, 4, 8]), label="block_size")
    max_num_seqs = data.draw(st.integers(1, 6), label="max_num_seqs")
    chunked = data.draw(st.booleans(), label="chunked")
    mode = data.draw(st.sampled_from(["recompute", "swap"]), label="preemption_mode")
    prompts = [data.draw(st.lists(st.integers(0, 63), min_size=1, max_size=20), label=f"prompt {i}") for i in range(n)]
    max_tokens = [data.draw(st.integers(1, 12), label=f"max_tokens {i}") for i in range(n)]
    arrivals = [data.draw(st.sampled_from([0.0, 0.001, 0.003, 0.01]), label=f"arrival {i}") for i in range(n)]
    stop = data.draw(st.sampled_from([(), (7,)]), label="stop_token_ids")
    need = max(-(-(len(p) + m) // block_size) for p, m in zip(prompts, max_tokens))
    num_blocks = data.draw(st.integers(need, need * 3), label="num_blocks")
    budget = data.draw(st.integers(max(max_num_seqs, 1), 32), label="budget") if chunked else 64
    params = [SamplingParams(max_tokens=m, stop_token_ids=stop) for m in max_tokens]
    engine = LLMEngine(model, block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget, enable_chunked_prefill=chunked, preemption_mode=mode,
                       num_cpu_blocks=data.draw(st.integers(1, num_blocks), label="num_cpu_blocks"))
    outputs = engine.generate(prompts, params, arrival_times=arrivals, use_tqdm=False)
    ample = LLMEngine(model, max_num_seqs=8).generate(prompts, params, use_tqdm=False)
    assert_same_outputs(outputs, ample, prompts, max_tokens, stop)    # the same tokens, whatever the memory
    assert_all_blocks_free(engine)
    # every token computed exactly once, plus the recomputed ones
    computed = sum(s.num_prefill_tokens + s.num_decode_tokens for s in engine.metrics.steps)
    produced = sum(len(p) + len(o.token_ids) - 1 for p, o in zip(prompts, outputs))
    assert computed == produced + engine.metrics.num_recomputed_tokens


MICRO = micro_model()


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("field, kwargs", [
    ("max_tokens", dict(max_tokens=0)), ("temperature", dict(temperature=-0.5)), ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)), ("top_k", dict(top_k=0)), ("n", dict(n=0)), ("seed", dict(seed=1.5)),
    ("stop_token_ids", dict(stop_token_ids=[-1])), ("max_tokens", dict(max_tokens=2.5)),
])
def test_sampling_params_name_the_bad_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_get_errors_naming_the_field_and_the_rest_is_served():
    model = MICRO
    good = [[1, 2, 3], [4, 5]]
    prompts = [good[0], [], list(range(1, 64)) + [1], [1, 99], good[1], "text", [1, 2], [1, 2], [3, 4]]
    params = [SamplingParams(max_tokens=3)] * 6 + [dict(max_tokens=0), dict(temperature=-1), dict(top_p=2.0)]
    engine = LLMEngine(model, block_size=4, num_blocks=12, max_num_seqs=4)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    fields = [None, "prompt", "prompt", "prompt", None, "prompt", "max_tokens", "temperature", "top_p"]
    for i, (o, field) in enumerate(zip(outputs, fields)):
        if field is None:
            assert o.ok and o.token_ids == greedy_generate(model, prompts[i], 3, use_cache=False)
        else:
            assert isinstance(o.error, ValueError) and field in str(o.error) and f"request {i}" in str(o.error)
            assert o.outputs == [] and o.token_ids == []
    assert "context" in str(outputs[2].error) and "vocabulary" in str(outputs[3].error)
    assert "tokenizer" in str(outputs[5].error)
    # a request that could never fit the cache, even alone
    out = engine.generate([[1, 2]], SamplingParams(max_tokens=60), use_tqdm=False)[0]
    assert isinstance(out.error, ValueError) and "max_tokens" in str(out.error) and "KV blocks" in str(out.error)
    assert_all_blocks_free(engine)


def test_whole_call_misuse_raises_before_running():
    engine = LLMEngine(MICRO, block_size=4, num_blocks=8, max_num_seqs=2)
    with pytest.raises(TypeError, match="prompts"):
        engine.generate("a string, not a list")
    with pytest.raises(ValueError, match="params"):
        engine.generate([[1], [2]], [SamplingParams()])
    with pytest.raises(ValueError, match="arrival_times"):
        engine.generate([[1], [2]], arrival_times=[0.0])
    with pytest.raises(ValueError, match="arrival_times"):
        engine.generate([[1]], arrival_times=[-1.0])
    for bad in (0, -0.1, float("inf"), "1 ms", True):
        for e in (engine, StaticBatchEngine(MICRO, max_batch_size=2)):
            with pytest.raises(ValueError, match="step_time must be None or a positive number of seconds per step"):
                e.generate([[1], [2]], step_time=bad)
    assert engine.generate([]) == []


def test_a_modeled_step_time_makes_the_replay_exact(tiny):
    """generate(step_time=...): each step costs step_time on the replay clock, so the steps, the arrivals they meet
    and every latency are the same in every run, and a multiple of step_time after each arrival."""
    model, tokenizer = tiny
    trace = sharegpt_trace(10, rate=200.0, scale=0.1, tokenizer=tokenizer, seed=1)
    runs = []
    for _ in range(2):
        for e in (LLMEngine(model, max_num_seqs=4), StaticBatchEngine(model, max_batch_size=4)):
            e.generate(trace.prompts, trace.params, arrival_times=trace.arrival_times, step_time=0.01, use_tqdm=False)
            runs.append(e.metrics)
    for first, again in ((runs[0], runs[2]), (runs[1], runs[3])):
        assert [s.composition for s in first.steps] == [s.composition for s in again.steps]
        assert first.ttft == again.ttft and first.elapsed_s == again.elapsed_s
        assert all(s.duration == 0.01 for s in first.steps)


@pytest.mark.parametrize("field, kwargs", [
    ("block_size", dict(block_size=0)), ("num_blocks", dict(num_blocks=0)), ("max_num_seqs", dict(max_num_seqs=0)),
    ("max_num_batched_tokens", dict(max_num_seqs=8, max_num_batched_tokens=4)),
    ("max_num_batched_tokens", dict(enable_chunked_prefill=False, max_num_batched_tokens=16)),
    ("preemption_mode", dict(preemption_mode="drop")),
    ("num_cpu_blocks", dict(preemption_mode="swap", num_cpu_blocks=0)),
])
def test_engine_arguments_are_validated(field, kwargs):
    with pytest.raises(ValueError, match=field):
        LLMEngine(MICRO, **kwargs)


# ---------------------------------------------------------------- sampling
def test_seeded_sampling_does_not_depend_on_the_batch():
    engine = LLMEngine(MICRO, block_size=4, max_num_seqs=4)
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_tokens=8, seed=11)
    alone = engine.generate([[1, 2, 3]], p, use_tqdm=False)[0].token_ids
    crowd = engine.generate([[5, 6], [1, 2, 3], [9] * 7], [SamplingParams(max_tokens=5), p, p], use_tqdm=False)
    assert crowd[1].token_ids == alone
    static = StaticBatchEngine(MICRO, max_batch_size=3).generate([[9, 9], [1, 2, 3]], [SamplingParams(max_tokens=4), p])
    assert static[1].token_ids == alone
    n3 = engine.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_tokens=6, seed=11, n=3), use_tqdm=False)[0]
    assert [c.index for c in n3.outputs] == [0, 1, 2] and len({tuple(c.token_ids) for c in n3.outputs}) > 1
    top1 = engine.generate([[1, 2, 3]], SamplingParams(temperature=2.0, top_k=1, max_tokens=6, seed=3), use_tqdm=False)
    assert top1[0].token_ids == greedy_generate(MICRO, [1, 2, 3], 6)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda x: torch.isfinite(x).tolist()
    assert kept(filter_logits(logits, 1.0, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, 1.0, top_p=0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits[[3, 1, 0, 2]], 1.0, top_p=0.8)) == [False, True, True, False]


def test_stop_tokens_and_the_context_limit_end_sequences():
    model = micro_model(max_len=16)
    want = greedy_generate(model, [1, 2, 3], 12, use_cache=False)
    stop = want[4]
    engine = LLMEngine(model, block_size=4, max_num_seqs=2)
    out = engine.generate([[1, 2, 3], [1] * 10], [SamplingParams(max_tokens=12, stop_token_ids=(stop,)),
                                                  SamplingParams(max_tokens=50)], use_tqdm=False)
    assert out[0].token_ids == want[: want.index(stop) + 1] and out[0].outputs[0].finish_reason == "stop"
    assert len(out[1].token_ids) == 6 and out[1].outputs[0].finish_reason == "length"   # 10 + 6 = the context, 16


# ---------------------------------------------------------------- static baseline, metrics, workloads
def test_static_batching_equals_decoding_alone(tiny, workload):
    model, _ = tiny
    prompts, params, reference = workload
    engine = StaticBatchEngine(model, max_batch_size=5)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == reference
    m = engine.metrics
    assert m.num_output_tokens == sum(len(r) for r in reference)
    assert sum(s.num_padding_tokens for s in m.steps) > 0             # padding and finished rows were computed


def test_padded_attention_without_padding_is_attention():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=gen)
    k, v = torch.randn(2, 2, 5, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen)
    torch.testing.assert_close(padded_attention(q, k, v, torch.tensor([0, 0])), attention(q, k, v, causal=True))
    # padding = those keys do not exist
    got = padded_attention(q, k, v, torch.tensor([2, 0]))
    torch.testing.assert_close(got[0], attention(q[:1], k[:1, :, 2:], v[:1, :, 2:], causal=True)[0])


def test_metrics_of_a_trace(tiny):
    model, tokenizer = tiny
    trace = sharegpt_trace(10, rate=200.0, scale=0.1, tokenizer=tokenizer, seed=1)
    engine = LLMEngine(model, max_num_seqs=4)
    outputs = engine.generate(trace.prompts, trace.params, arrival_times=trace.arrival_times, use_tqdm=True)
    m = engine.metrics
    assert m.num_output_tokens == int(trace.output_lens.sum()) == sum(len(o.token_ids) for o in outputs)
    assert m.throughput > 0 and m.elapsed_s > 0 and len(m.ttft) == 10 and all(t > 0 for t in m.ttft)
    assert all(o.metrics.first_scheduled_time >= o.metrics.arrival_time for o in outputs)
    starts = [s.start for s in m.steps]
    assert starts == sorted(starts) and max(m.blocks_used) <= engine.num_blocks
    summary = m.summary()
    assert summary["throughput_tok_s"] == m.throughput and summary["num_steps"] == len(m.steps)


def test_workloads():
    a = poisson_arrivals(4000, rate=50.0, seed=0)
    assert a[0] == 0 and np.all(np.diff(a) >= 0) and abs(np.diff(a).mean() - 1 / 50) < 0.002
    assert poisson_arrivals(3, float("inf")).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(3, 0)
    t = sharegpt_trace(200, scale=0.25, max_len=128, vocab_size=100)
    assert len(t) == 200 and all(len(p) + sp.max_tokens <= 128 for p, sp in zip(t.prompts, t.params))
    assert all(0 < x < 100 for p in t.prompts for x in p)
    u = uniform_trace(3, 5, 7, vocab_size=50)
    assert u.prompt_lens.tolist() == [5] * 3 and u.output_lens.tolist() == [7] * 3
    mm = multimodal_prompt(576, [1, 2], vocab_size=50)
    assert len(mm) == 578 and mm[-2:] == [1, 2]


def test_model_positions_argument_is_backward_compatible():
    """Llama.forward(positions=...): [S] equals the default, and [B, S] gives each row its own positions."""
    model = micro_model()
    ids = torch.tensor([[3, 9, 4, 1], [5, 6, 7, 8]])
    with torch.no_grad():
        default = model(ids)
        torch.testing.assert_close(model(ids, positions=torch.arange(4)), default)
        # row 1 at positions 2 ... 5: the same as running it alone at those positions
        per_row = model(ids, positions=torch.tensor([[0, 1, 2, 3], [2, 3, 4, 5]]))
        torch.testing.assert_close(per_row[0], default[0])
        torch.testing.assert_close(per_row[1], model(ids[1:], positions=torch.arange(2, 6))[0])
        with pytest.raises(ValueError, match="positions"):
            model(ids, positions=torch.arange(3))
