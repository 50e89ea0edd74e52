"""The engine's 8-bit KV cache (``LLMEngine(kv_cache_dtype="int8")``, lessons 04 + 07): greedy outputs equal
decoding each request alone on lesson 07's quantized paged cache (with chunked prefill and with preemption by
swap, which must move scales with codes), the pool's bytes, the kernel path, bad input."""
from __future__ import annotations

import random

import pytest
import torch

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import load_tiny
from course_lib.model.corpus import load_text
from course_lib.device import DEVICE
from course_lib.serving.engine import LLMEngine
from course_lib.serving.kv_pool import KVPool, QuantizedKVPool, make_kv_pool
from course_lib.quant.kv_quality import decode_logits
from course_lib.quant.kv_quant import QuantizedPagedKVCache, kv_bytes_per_token
from course_lib.model.sampling import SamplingParams
from test_engine import assert_all_blocks_free, micro_model


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def alone_int8(model, prompt: list[int], max_tokens: int, kv_dtype: str = "int8") -> list[int]:
    """Greedy tokens of one request decoded by itself on lesson 07's 8-bit paged cache (plain-torch path)."""
    cache = QuantizedPagedKVCache(model.config, num_blocks=64, block_size=16, kv_dtype=kv_dtype, device=model.device,
                                  use_kernel=False)
    tokens, _ = decode_logits(model, cache, prompt, max_tokens)
    return tokens


@pytest.fixture(scope="module")
def workload(tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode(load_text("validation")[:20000])
    rng = random.Random(1)
    prompts, params = [], []
    for _ in range(8):
        n, start = rng.randint(2, 60), rng.randint(0, len(ids) - 80)
        prompts.append(ids[start:start + n])
        params.append(SamplingParams(max_tokens=rng.randint(4, 24)))
    return prompts, params, [alone_int8(model, p, sp.max_tokens) for p, sp in zip(prompts, params)]


SETUPS = {
    "chunked prefill": dict(max_num_seqs=8, max_num_batched_tokens=24),
    "preempted by swap": dict(num_blocks=28, block_size=4, max_num_seqs=8, max_num_batched_tokens=16,
                              preemption_mode="swap"),
    "preempted by recompute": dict(num_blocks=28, block_size=4, max_num_seqs=8, max_num_batched_tokens=16),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_int8_engine_equals_decoding_alone_on_the_int8_cache(tiny, workload, setup):
    model, _ = tiny
    prompts, params, reference = workload
    engine = LLMEngine(model, kv_cache_dtype="int8", **SETUPS[setup])
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert all(o.ok for o in outputs), [o.error for o in outputs if not o.ok]
    assert [o.token_ids for o in outputs] == reference
    if "preempted" in setup:
        mode = setup.split()[-1]
        assert engine.metrics.preemptions[mode] > 0, engine.metrics.preemptions
    assert_all_blocks_free(engine)


def test_int8_outputs_differ_from_full_precision_only_slightly(tiny, workload):
    """The 8-bit cache is lossy, but on the shipped model it keeps (almost) every greedy token (lesson 07)."""
    model, _ = tiny
    prompts, params, _ = workload
    runs = {}
    for dtype in ("auto", "int8"):
        runs[dtype] = [o.token_ids for o in LLMEngine(model, kv_cache_dtype=dtype).generate(prompts, params)]
    same = sum(a == b for x, y in zip(runs["auto"], runs["int8"]) for a, b in zip(x, y))
    total = sum(len(x) for x in runs["auto"])
    assert same / total >= 0.9, f"only {same}/{total} greedy tokens agree between the FP32 and the INT8 cache"


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_pool_bytes_and_swap_moves_scales(kv_cache_dtype, tiny):
    model, _ = tiny
    cfg = model.config
    full = KVPool(cfg, 4, 16, dtype=torch.float16, device="cpu")
    pool = make_kv_pool(cfg, 4, 16, kv_cache_dtype=kv_cache_dtype, num_cpu_blocks=2, device="cpu")
    assert isinstance(pool, QuantizedKVPool)
    assert full.bytes_per_block == kv_bytes_per_token(cfg, torch.float16) * 16
    assert pool.bytes_per_block == kv_bytes_per_token(cfg, kv_cache_dtype) * 16      # codes + fp16 scales
    assert pool.bytes_per_block / full.bytes_per_block == pytest.approx((cfg.head_dim + 2) / (2 * cfg.head_dim))
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(16, cfg.num_key_value_heads, cfg.head_dim, generator=gen), torch.randn(16, 4, 32, generator=gen)
    pool.store(0, k, v, torch.arange(16, 32), use_kernels=False)                       # block 1
    want = pool.gather(0, torch.tensor([1]), 16, torch.float32)
    pool.swap_out([(1, 0)])
    for t in (pool.k_caches[0], pool.v_caches[0], pool.k_scales[0], pool.v_scales[0]):
        t[1].zero_()                                                                    # the device block is reused
    pool.swap_in([(0, 3)])
    got = pool.gather(0, torch.tensor([3]), 16, torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(want[0], k.transpose(0, 1), rtol=0.1, atol=0.05)        # dequantized ≈ original


def test_int8_kernel_path_matches_reference_path():
    """store_kv_int8 and paged_attention_int8_decode (interpreter on a CPU, compiled on a GPU) in the engine."""
    model = micro_model().to(DEVICE)
    prompts = [[3, 9, 4, 1, 7], [5] * 11, [2, 8]]
    params = [SamplingParams(max_tokens=n) for n in (4, 3, 5)]
    kw = dict(block_size=4, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=8, kv_cache_dtype="int8")
    want = [o.token_ids for o in LLMEngine(model, use_kernels=False, **kw).generate(prompts, params)]
    engine = LLMEngine(model, use_kernels=True, **kw)
    assert [o.token_ids for o in engine.generate(prompts, params)] == want
    assert_all_blocks_free(engine)


def test_bad_kv_cache_dtype_is_named(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLMEngine(model, kv_cache_dtype="int4")


def test_int8_with_speculative_decoding_keeps_the_int8_greedy_tokens(tiny, workload):
    """Both pools (target and draft) in INT8: speculation must not change the target's greedy tokens, also when
    sequences are swapped out and back (codes and scales of both pools move)."""
    model, _ = tiny
    draft, _ = load_tiny("draft", dtype=torch.float32, device="cpu")
    prompts, params, reference = workload
    engine = LLMEngine(model, kv_cache_dtype="int8", speculative_model=draft, num_speculative_tokens=3,
                       **{**SETUPS["preempted by swap"], "max_num_seqs": 4})
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == reference
    assert engine.metrics.preemptions["swap"] > 0
    assert engine.metrics.speculative.accepted > 0
    assert_all_blocks_free(engine)
