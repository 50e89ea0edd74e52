"""kernels.store_kv and kernels.paged_attention_decode vs their references (interpreter on CPU, compiled on a
GPU), their ValueErrors, and the shipped model decoding through course_lib.paging.paged_cache.PagedKVCache."""
from __future__ import annotations

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import pytest
import torch

import kernels
import kernels.reference as ref
from course_lib.device import DEVICE, HAS_GPU, kernel_dtypes
from kernels.paged_attention import (DECODE_MIN_TOKENS_PER_SPLIT, MIN_TOKENS_PER_SPLIT, WAVE_FILL, choose_num_splits,
                                     choose_num_splits_in_waves)

#: Tolerances of the kernel vs the fp32 reference (rounded to the dtype), per dtype.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def make_paged(B, Hq, Hkv, D, P, lens, dtype, *, seed=0, spare_blocks=3):
    """Random q and caches, with each sequence's blocks scattered at random over the cache."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-L // P) for L in lens) + 1           # one unused column: tables are wider than needed
    N = B * max_blocks + spare_blocks
    k_cache = torch.randn(N, P, Hkv, D, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(N, P, Hkv, D, generator=gen).to(DEVICE, dtype)
    block_tables = torch.randperm(N, generator=gen)[: B * max_blocks].view(B, max_blocks).to(DEVICE, torch.int32)
    q = torch.randn(B, Hq, D, generator=gen).to(DEVICE, dtype)
    return q, k_cache, v_cache, block_tables, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


# ---------------------------------------------------------------- store_kv
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("Hkv, D", [(1, 16), (2, 32), (3, 24)])
def test_store_kv_matches_reference(dtype, Hkv, D):
    gen = torch.Generator().manual_seed(1)
    N, P, T = 5, 8, 11
    k = torch.randn(T, Hkv, D, generator=gen).to(DEVICE, dtype)
    v = torch.randn(T, Hkv, D, generator=gen).to(DEVICE, dtype)
    slots = torch.randperm(N * P, generator=gen)[:T].to(DEVICE)
    slots[3] = -1                                                  # a padding token: skipped
    caches = [torch.zeros(N, P, Hkv, D, device=DEVICE, dtype=dtype) for _ in range(4)]
    kernels.store_kv(k, v, caches[0], caches[1], slots)
    ref.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])  # a copy is exact
    assert caches[0].view(-1, Hkv, D)[slots[4]].equal(k[4])


def test_store_kv_reads_strided_keys():
    # the model's k is [B, Hkv, S, D]; PagedKVCache passes k.transpose(1, 2).reshape(...), and slices may be strided
    k = torch.randn(4, 6, 2, 16, device=DEVICE)[:, ::2].reshape(12, 2, 16)[::2]   # non-contiguous rows
    v = torch.randn(6, 2, 16, device=DEVICE)
    kc, vc = torch.zeros(2, 4, 2, 16, device=DEVICE), torch.zeros(2, 4, 2, 16, device=DEVICE)
    kernels.store_kv(k, v, kc, vc, torch.arange(6, device=DEVICE, dtype=torch.int32))
    assert torch.equal(kc.view(-1, 2, 16)[:6], k) and torch.equal(vc.view(-1, 2, 16)[:6], v)


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "k": a["k"][:, :1]}, r"k has shape \(3, 1, 16\); expected \[T, Hkv=2, D=16\]"),
    (lambda a: {**a, "v": a["v"][:2]}, "v has shape"),
    (lambda a: {**a, "slot_mapping": a["slot_mapping"][:2]}, "slot_mapping has shape"),
    (lambda a: {**a, "slot_mapping": a["slot_mapping"].float()}, "slot_mapping has dtype torch.float32"),
    (lambda a: {**a, "k": a["k"].half()}, "k has dtype torch.float16; expected the dtype of k_cache"),
    (lambda a: {**a, "k_cache": a["k_cache"][0]}, "k_cache has shape"),
    (lambda a: {**a, "v_cache": a["v_cache"][:1]}, "v_cache has shape"),
    (lambda a: {**a, "slot_mapping": a["slot_mapping"] + 100}, "the cache has only N\\*P = 16 slots"),
    (lambda a: {**a, "k": a["k"].to("meta")}, "k is on meta"),
    (lambda a: {**a, "k": [1.0]}, "k must be a torch.Tensor"),
])
def test_store_kv_rejects_bad_inputs(change, match):
    args = dict(k=torch.randn(3, 2, 16, device=DEVICE), v=torch.randn(3, 2, 16, device=DEVICE),
                k_cache=torch.zeros(2, 8, 2, 16, device=DEVICE), v_cache=torch.zeros(2, 8, 2, 16, device=DEVICE),
                slot_mapping=torch.tensor([0, 5, 9], device=DEVICE))
    with pytest.raises(ValueError, match=match):
        kernels.store_kv(**change(args))


# ---------------------------------------------------------------- paged_attention_decode (small shapes)
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("P", [8, 16, 32])
@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (8, 2), (6, 1)])   # MHA, GQA (G=4), MQA with G not a power of 2
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_paged_attention_matches_reference(dtype, P, Hq, Hkv, num_splits):
    # lengths: 1 token, exactly one block, one past a block, and lengths that are not multiples of P
    lens = [1, P, P + 1, 3 * P - 5, 70]
    args = make_paged(len(lens), Hq, Hkv, 32, P, lens, dtype, seed=P + Hq)
    got = kernels.paged_attention_decode(*args, num_splits=num_splits)
    want = ref.paged_attention_decode(*args)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_head_dim_not_a_power_of_two_and_sm_scale_and_empty_sequences():
    args = make_paged(3, 4, 2, 24, 8, [0, 9, 20], torch.float32)
    for splits in (1, 2):
        got = kernels.paged_attention_decode(*args, sm_scale=0.3, num_splits=splits)
        torch.testing.assert_close(got, ref.paged_attention_decode(*args, sm_scale=0.3), **TOL[torch.float32])
        assert torch.equal(got[0], torch.zeros_like(got[0]))         # context length 0: zeros, not NaN


def test_split_k_is_chosen_for_few_long_sequences():
    assert choose_num_splits(64, 8, 4096, num_sms=132) == 1           # 512 programs: >= 3 per SM already
    assert choose_num_splits(32, 8, 4096, num_sms=132) == 2           # 256 programs: too few loads in flight
    assert choose_num_splits(1, 8, 32768, num_sms=132) == 64          # 8 programs: ~3 per SM with 50, a power of 2
    assert choose_num_splits(1, 8, 1024, num_sms=132) == 16           # the H100 sweep's best at 1k: 16 x 64 tokens
    assert choose_num_splits(1, 8, DECODE_MIN_TOKENS_PER_SPLIT, num_sms=132) == 1
    assert choose_num_splits(1, 8, 4 * DECODE_MIN_TOKENS_PER_SPLIT, num_sms=132) == 4   # splits stay >= one tile
    assert choose_num_splits(1, 8, 1024, num_sms=132, min_tokens=256) == 4


def test_wave_filling_splits_match_the_h200_sweep():
    # 4 resident programs per SM x 132 SMs = 528 slots; the best split counts measured for the INT8 kernel on an
    # H200 (int8_split_sweep_nvidia-h200_2026-11-28.json): B=32 8k -> 2, B=64 -> 1, B=16 -> 4, B=8 16k -> 8
    waves = lambda B, L: choose_num_splits_in_waves(B, 8, L, num_sms=132, resident_per_sm=4)
    assert [waves(32, 8192), waves(64, 8192), waves(16, 8192), waves(8, 16384), waves(128, 8192)] == [2, 1, 4, 8, 1]
    assert waves(1, MIN_TOKENS_PER_SPLIT) == 1                        # too short to split
    assert waves(1, 4 * MIN_TOKENS_PER_SPLIT) == 4                    # splits stay >= 256 tokens: as many as allowed
    for B in range(1, 66):                                            # whenever some split count fills the waves,
        s = waves(B, 32768)                                           # the chosen one does, and no smaller one
        fill = lambda k: B * 8 * k / (-(-B * 8 * k // 528) * 528)
        assert fill(s) >= WAVE_FILL or B * 8 >= 528, (B, s)
        assert all(fill(k) < WAVE_FILL for k in range(1, s)), (B, s)


def test_splits_agree_with_each_other_on_a_long_context():
    args = make_paged(1, 4, 1, 16, 16, [1000], torch.float32)        # auto: 1 sequence x 1 kv head -> split
    assert choose_num_splits(1, 1, 1000, num_sms=4) > 1
    auto, unsplit = kernels.paged_attention_decode(*args), kernels.paged_attention_decode(*args, num_splits=1)
    torch.testing.assert_close(auto, unsplit, **TOL[torch.float32])
    torch.testing.assert_close(auto, ref.paged_attention_decode(*args), **TOL[torch.float32])


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "q": a["q"][:, :, None]}, r"q has shape \(2, 4, 1, 16\); expected \[B, Hq, D\]"),
    (lambda a: {**a, "q": a["q"][:, :3]}, "q has 3 heads, not a multiple of k_cache's 2 kv heads"),
    (lambda a: {**a, "q": a["q"][..., :8].contiguous()}, "k_cache has head_dim 16 .* expected q's head_dim D=8"),
    (lambda a: {**a, "q": a["q"].half()}, "k_cache has dtype torch.float32; expected the dtype of q"),
    (lambda a: {**a, "q": a["q"].long(), "k_cache": a["k_cache"].long(), "v_cache": a["v_cache"].long()},
     "q has dtype torch.int64"),
    (lambda a: {**a, "v_cache": a["v_cache"][:, :4]}, "v_cache has shape"),
    (lambda a: {**a, "k_cache": a["k_cache"][0]}, "k_cache has shape"),
    (lambda a: {**a, "block_tables": a["block_tables"].long()},
     "block_tables has dtype torch.int64; expected torch.int32"),
    (lambda a: {**a, "block_tables": a["block_tables"][:1]}, r"block_tables has shape \(1, 3\); expected \[B=2"),
    (lambda a: {**a, "context_lens": a["context_lens"].long()}, "context_lens has dtype torch.int64"),
    (lambda a: {**a, "context_lens": a["context_lens"][:1]}, "context_lens has shape"),
    (lambda a: {**a, "context_lens": a["context_lens"] + 40},
     "longer than block_tables can address: 3 blocks x block_size 8 = 24"),
    (lambda a: {**a, "context_lens": a["context_lens"] - 10}, "lengths must be >= 0"),
    (lambda a: {**a, "max_context_len": 25}, "a context length of 25 tokens is longer"),
    (lambda a: {**a, "num_splits": 0}, "num_splits must be None or a positive int"),
    (lambda a: {**a, "q": a["q"].to("meta")}, "q is on meta"),
    (lambda a: {**a, "block_tables": a["block_tables"].tolist()}, "block_tables must be a torch.Tensor"),
])
def test_paged_attention_rejects_bad_inputs(change, match):
    q, k_cache, v_cache, block_tables, context_lens = make_paged(2, 4, 2, 16, 8, [5, 12], torch.float32)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)
    with pytest.raises(ValueError, match=match):
        kernels.paged_attention_decode(**change(args))


# ---------------------------------------------------------------- checked before the kernel reads memory
DECODES = {"kernel": kernels.paged_attention_decode, "reference": ref.paged_attention_decode}


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("bad", [517, 26, -1, 2**31 - 1])
def test_a_block_id_outside_the_cache_is_refused_naming_the_sequence_and_the_block(decode, bad):
    """A block id past the cache segfaulted the process (or gave NaN); a negative one read another block."""
    q, k_cache, v_cache, block_tables, context_lens = make_paged(2, 4, 2, 16, 8, [5, 12], torch.float32)  # N = 9
    block_tables[1, 1] = bad                               # sequence 1 reads entries 0, 1 (12 tokens, 8 per block)
    with pytest.raises(ValueError, match=rf"block_tables\[1, 1\] = {bad} is outside \[0, num_blocks=9\) "
                                         rf"\(sequence 1 reads block_tables\[1, 0:2\] for context_lens\[1\] = 12\)"):
        DECODES[decode](q, k_cache, v_cache, block_tables, context_lens)


@pytest.mark.parametrize("decode", DECODES)
def test_entries_past_a_sequence_s_blocks_may_hold_padding(decode):
    """Only the entries covering context_lens are read: padding (-1 here; the engine pads with 0) is fine."""
    args = make_paged(3, 4, 2, 16, 8, [5, 12, 0], torch.float32)
    want = ref.paged_attention_decode(*args)
    tables = args[3].clone()
    tables[0, 1:], tables[1, 2:], tables[2, :] = -1, -1, 2**31 - 1     # never read
    torch.testing.assert_close(DECODES[decode](*args[:3], tables, args[4]), want, **TOL[torch.float32])


@pytest.mark.parametrize("sm_scale", [float("nan"), float("inf"), 0.0, -0.5, "0.1"])
def test_a_scale_that_is_not_a_positive_finite_number_is_refused(sm_scale):
    args = make_paged(2, 4, 2, 16, 8, [5, 12], torch.float32)
    for decode in DECODES.values():
        with pytest.raises(ValueError, match="sm_scale must be a positive finite number"):
            decode(*args, sm_scale=sm_scale)


def test_a_max_context_len_shorter_than_a_context_is_refused_and_validate_false_trusts_the_caller():
    args = make_paged(2, 4, 2, 16, 8, [5, 12], torch.float32)
    with pytest.raises(ValueError, match=r"max_context_len = 10 is shorter than context_lens\[1\] = 12"):
        kernels.paged_attention_decode(*args, max_context_len=10)      # would silently skip tokens 10 and 11
    # the engine's path: it built the tables and knows the longest context, so nothing is read back from the device
    torch.testing.assert_close(kernels.paged_attention_decode(*args, max_context_len=12, validate=False),
                               ref.paged_attention_decode(*args), **TOL[torch.float32])


# ---------------------------------------------------------------- compiled on a GPU, real shapes
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, L, P", [(64, 1000, 16), (4, 4097, 16), (1, 32768, 16), (8, 3000, 8), (2, 5000, 32)])
def test_real_shapes_on_gpu(dtype, B, L, P):
    lens = [L - 7 * b for b in range(B)]
    args = make_paged(B, 32, 8, 128, P, lens, dtype, seed=B)
    want = ref.paged_attention_decode(*args)
    for splits in (None, 1, 8):
        torch.testing.assert_close(kernels.paged_attention_decode(*args, num_splits=splits), want, **TOL[dtype])


# ---------------------------------------------------------------- the shipped model through the paged cache
@pytest.fixture(scope="module")
def tiny():
    from course_lib import load_tiny

    model, tokenizer = load_tiny("target")
    return model.to(DEVICE, torch.float32).eval(), tokenizer


@torch.no_grad()
def _greedy(model, cache, prompt_ids, n):
    x, out = torch.tensor(prompt_ids, device=DEVICE), []
    for _ in range(n):
        logits = model(x, cache=cache, last_token_only=True)[:, -1]
        nxt = logits.argmax(-1)
        out.append(nxt.tolist())
        x = nxt[:, None]
    return [list(col) for col in zip(*out)]


@pytest.mark.parametrize("block_size, batch_size, steps", [(8, 2, 6), (16, 1, 12)])
def test_model_greedy_tokens_paged_equal_contiguous(tiny, one_thread, block_size, batch_size, steps):
    from course_lib.model.kv_cache import KVCache
    from course_lib.paging.paged_cache import PagedKVCache

    model, tok = tiny
    prompts = [tok.encode("In the beginning God created"), tok.encode("And the LORD spake unto Moses")][:batch_size]
    n = min(len(p) for p in prompts)
    assert n + steps - 1 > block_size                 # the decode crosses a block boundary
    prompts = [p[:n] for p in prompts]
    want = _greedy(model, KVCache(model.config, batch_size, n + steps, device=DEVICE), prompts, steps)
    cache = PagedKVCache(model.config, num_blocks=16, block_size=block_size, batch_size=batch_size, device=DEVICE)
    assert _greedy(model, cache, prompts, steps) == want
    # the K/V of every token fed to the model is stored (the last generated token is never fed)
    assert cache.num_used_blocks == batch_size * -(-(n + steps - 1) // block_size)


def test_fork_shares_the_prompt_and_copies_on_write(tiny, one_thread):
    from course_lib.paging.paged_cache import PagedKVCache

    model, tok = tiny
    prompt = tok.encode("In the beginning God created")[:6]          # 6 tokens: block 0 partly filled (P = 8)
    # plain-torch store/attention (use_kernel=False): this test is about the block bookkeeping and the copies
    cache = PagedKVCache(model.config, num_blocks=8, block_size=8, device=DEVICE, use_kernel=False)
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=DEVICE), cache=cache, last_token_only=True)
    cache.fork(0)                                                     # 2 sequences, 1 shared block
    assert cache.num_used_blocks == 1 and cache.block_manager.allocator.ref_counts[0] == 2
    first = logits[0, -1].topk(2).indices                             # two different continuations
    tokens = _greedy(model, cache, [[int(first[0])], [int(first[1])]], 2)   # 6 + 2 tokens: still 1 block each
    assert cache.num_used_blocks == 2                                 # the shared block was copied once
    alone = PagedKVCache(model.config, num_blocks=8, block_size=8, device=DEVICE, use_kernel=False)
    with torch.no_grad():
        model(torch.tensor([prompt], device=DEVICE), cache=alone)
    assert _greedy(model, alone, [[int(first[1])]], 2)[0] == tokens[1]  # the child is unaffected by its sibling
    cache.reorder([1, 1])                                             # beam search: keep only the second beam
    bm = cache.block_manager
    assert cache.num_used_blocks == 1 and bm.allocator.ref_counts[bm.block_tables[cache.seq_ids[0]][0]] == 2
    cache.free()
    assert cache.num_used_blocks == 0
