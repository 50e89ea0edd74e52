"""Lesson 01: the FLOP/byte counts of course_lib.analysis.flops (cross-checked against torch's FLOP counter on the real
model), and every check of course_lib.grading.lesson01 (passes the reference, "not attempted" for a stub,
fails deliberately broken variants with a hint)."""
from __future__ import annotations

import course_lib  # noqa: F401  (first: torch.utils.flop_counter imports triton)
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from course_lib import PRESETS, ModelConfig
from course_lib.analysis import flops
from course_lib.grading import lesson01
from course_lib.model.kv_cache import KVCache, kv_cache_bytes
from conftest import assert_caught, assert_not_attempted, edited, exercise, solution, stub

TINY = ModelConfig()


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------- course_lib.analysis.flops
def test_linear_params_add_up_to_the_parameter_count():
    for cfg in [TINY, *PRESETS.values()]:
        if cfg.attention_bias:
            continue  # biases are parameters but not matmul weights
        E, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
        norms = 2 * E * L + E + (2 * cfg.head_dim * L if cfg.qk_norm else 0)   # Qwen3: q/k norms of D weights
        embed_and_head = V * E * (1 if cfg.tie_word_embeddings else 2)
        assert L * flops.linear_params_per_layer(cfg) + norms + embed_and_head == cfg.num_parameters()


def test_attention_pairs():
    assert flops.attention_pairs(1) == 1 and flops.attention_pairs(3) == 1 + 2 + 3
    assert flops.attention_pairs(1, 9) == 10  # one decode step after 9 cached tokens sees 10 keys
    assert flops.attention_pairs(2, 5) == 6 + 7 and flops.attention_pairs(2, 5, count_masked=True) == 2 * 7
    assert flops.attention_pairs(0, 5) == 0
    with pytest.raises(ValueError, match="must be >= 0"):
        flops.attention_pairs(-1)


def test_tiny_model_numbers_by_hand():
    # E=256, F=688, L=6, Hq=8, Hkv=4, D=32, V=2048
    per_layer = 256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 688
    assert flops.linear_params_per_layer(TINY) == per_layer == 724_992
    parts = flops.forward_flops_breakdown(TINY, 1, 15, lm_head_tokens=1)
    assert parts == {"linear": 2 * 6 * per_layer, "attention": 4 * 6 * 8 * 32 * 16, "lm_head": 2 * 256 * 2048}
    assert flops.decode_step_flops(TINY, 15) == sum(parts.values()) == 9_846_784


@pytest.mark.parametrize("cfg", [TINY, *PRESETS.values()], ids=["tiny", *PRESETS])
@pytest.mark.parametrize("position", [0, 1, 7, 100, 2047])
def test_decode_step_flops_structure(cfg, position):
    with_cache = flops.decode_step_flops(cfg, position, True)
    without = flops.decode_step_flops(cfg, position, False)
    assert with_cache == flops.forward_flops(cfg, 1, position, lm_head_tokens=1)
    assert without == flops.forward_flops(cfg, position + 1, 0, lm_head_tokens=1)
    assert (without == with_cache) == (position == 0)  # the first step is the same; later ones recompute the prefix
    # Without the cache the layers run position + 1 times; attention sums 1 + 2 + ... + (position + 1) keys.
    lin = flops.forward_flops_breakdown(cfg, 1, position, lm_head_tokens=1)
    assert without == (position + 1) * lin["linear"] + lin["lm_head"] + \
        lin["attention"] // (position + 1) * (position + 1) * (position + 2) // 2
    assert flops.decode_step_flops(cfg, position, True, batch_size=4) == 4 * with_cache


def test_breakdown_options():
    full = flops.forward_flops_breakdown(TINY, 10, 5)
    assert full["lm_head"] == 10 * flops.forward_flops_breakdown(TINY, 10, 5, lm_head_tokens=1)["lm_head"]
    assert flops.forward_flops_breakdown(TINY, 10, 5, lm_head_tokens=0)["lm_head"] == 0
    masked = flops.forward_flops_breakdown(TINY, 10, 5, count_masked=True)
    assert masked["attention"] * (5 * 10 + 55) == full["attention"] * (10 * 15)
    assert flops.forward_flops(TINY, 10, 5, batch_size=3) == 3 * sum(full.values())
    with pytest.raises(ValueError, match="lm_head_tokens"):
        flops.forward_flops(TINY, 2, lm_head_tokens=3)
    with pytest.raises(ValueError, match="position"):
        flops.decode_step_flops(TINY, -1)


# The cross-check: torch's own FLOP counter (it counts every aten.mm/bmm the real model runs) agrees exactly.
# course_lib.model.attention is dense (it computes the masked scores too), hence count_masked=True for S > 1.
# (Not S = 1 alone: with a single key, torch.einsum turns P·V into an elementwise product the counter skips.)
@pytest.mark.parametrize("prompt_len", [2, 9, 40])
def test_flops_match_torch_flop_counter_without_cache(tiny, prompt_len):
    model, _ = tiny
    ids = torch.randint(0, TINY.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        assert counted(lambda: model(ids, last_token_only=True)) == \
            flops.decode_step_flops(model.config, prompt_len - 1, False, count_masked=True)
        assert counted(lambda: model(ids)) == flops.forward_flops(model.config, prompt_len, count_masked=True)


@pytest.mark.parametrize("batch_size, prefix, new", [(1, 9, 1), (1, 100, 1), (2, 30, 1), (3, 17, 5)])
def test_flops_match_torch_flop_counter_with_cache(tiny, batch_size, prefix, new):
    model, _ = tiny
    gen = torch.Generator().manual_seed(prefix)
    ids = torch.randint(0, TINY.vocab_size, (batch_size, prefix + new), generator=gen)
    cache = KVCache(model.config, batch_size, prefix + new, device=model.device)
    with torch.no_grad():
        model(ids[:, :prefix], cache=cache)
        got = counted(lambda: model(ids[:, prefix:], cache=cache, last_token_only=True))
    assert got == flops.forward_flops(model.config, new, prefix, batch_size=batch_size, lm_head_tokens=1,
                                      count_masked=True)
    if new == 1:  # one query row: dense and causal attention do the same work
        assert got == flops.decode_step_flops(model.config, prefix, True, batch_size=batch_size)


def test_decode_step_bytes_and_intensity():
    cfg = PRESETS["llama-2-7b"]
    weights = cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size  # the embedding table is not streamed
    assert flops.weight_bytes(cfg) == 2 * cfg.num_parameters()
    assert flops.decode_step_bytes(cfg, 99) == 2 * weights + kv_cache_bytes(cfg, 100) + kv_cache_bytes(cfg, 1)
    assert flops.decode_step_bytes(cfg, 99, batch_size=8, bytes_per_element=1) == \
        weights + kv_cache_bytes(cfg, 100, 8, 1) + kv_cache_bytes(cfg, 1, 8, 1)
    # Batch-1 decode in 16-bit: ~1 FLOP per byte (2 FLOPs per 2-byte weight).
    assert 0.9 < flops.decode_step_intensity(cfg, 0) < 1.1
    # More sequences share the weight reads, but each brings its own K/V: intensity grows, then saturates at
    # the attention's own intensity, 2·Hq/(Hkv·bytes) plus the linear layers' share.
    by_batch = [flops.decode_step_intensity(cfg, 4095, batch_size=b) for b in (1, 8, 64, 512, 4096)]
    assert by_batch == sorted(by_batch) and by_batch[-1] < 1.1 * by_batch[-2]
    for name in ("llama-2-7b", "llama-3-8b", "llama-2-70b"):
        c = PRESETS[name]
        per_sequence = flops.decode_step_flops(c, 4095) / (kv_cache_bytes(c, 4096) + kv_cache_bytes(c, 1))
        assert flops.decode_step_intensity(c, 4095, batch_size=10**7) == pytest.approx(per_sequence, rel=1e-3)
        attn_only = 2 * c.num_attention_heads / (c.num_key_value_heads * 2)  # Hq/Hkv FLOP/byte in 16-bit
        assert attn_only < per_sequence  # plus the linear layers' FLOPs: they need no extra bytes per sequence
        # At very long contexts attention dominates both FLOPs and bytes: the intensity tends to Hq/Hkv.
        assert flops.decode_step_intensity(c, 10**8, batch_size=10**7) == pytest.approx(attn_only, rel=1e-2)


def test_llama_2_13b_headline_number():
    assert kv_cache_bytes(PRESETS["llama-2-13b"], 2048, 1, 2) == 2 * 40 * 40 * 128 * 2048 * 2 == 1_677_721_600


# ---------------------------------------------------------------- the solution notebook's answers, and broken variants
SOLVED = solution("01_kv_cache")
RETURN_FILLED = "return cache_k[:, :, :end], cache_v[:, :, :end]"
update_writes_at_zero = edited(SOLVED.update, {"[:, :, start:end] = ": "[:, :, :end - start] = "})
update_whole_buffer = edited(SOLVED.update, {RETURN_FILLED: "return cache_k, cache_v"})
update_copy = edited(SOLVED.update, {RETURN_FILLED: "return cache_k[:, :, :end].clone(), cache_v[:, :, :end].clone()"})


def update_not_in_place(cache_k, cache_v, k, v, start):
    return torch.cat([cache_k[:, :, :start], k], dim=2), torch.cat([cache_v[:, :, :start], v], dim=2)


def update_swapped(cache_k, cache_v, k, v, start):
    return SOLVED.update(cache_k, cache_v, v, k, start)


def decode_whole_sequence_with_cache(model, prompt_ids, max_new_tokens):  # double-caching
    cache = KVCache(model.config, 1, 4 * (len(prompt_ids) + max_new_tokens), dtype=model.dtype, device=model.device)
    tokens = list(prompt_ids)
    for _ in range(max_new_tokens):
        tokens.append(int(model(torch.tensor([tokens], device=model.device), cache=cache)[0, -1].argmax()))
    return tokens[len(prompt_ids):]


def decode_without_cache(model, prompt_ids, max_new_tokens):
    tokens = list(prompt_ids)
    for _ in range(max_new_tokens):
        tokens.append(int(model(torch.tensor([tokens], device=model.device))[0, -1].argmax()))
    return tokens[len(prompt_ids):]


# positions off by one per step (a cache twice as long, so that the extra advances fit)
decode_double_advance = edited(SOLVED.cached_greedy_decode, {
    "len(prompt_ids) + max_new_tokens,": "2 * (len(prompt_ids) + max_new_tokens),",
    "        step_input = ": "        cache.advance(1)\n        step_input = "})


def decode_refeeds_last_prompt_token(model, prompt_ids, max_new_tokens):  # off by one: prompt[-1] fed twice
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens + 1, dtype=model.dtype, device=model.device)
    model(torch.tensor([prompt_ids], device=model.device), cache=cache)
    out, last = [], prompt_ids[-1]
    for _ in range(max_new_tokens):
        last = int(model(torch.tensor([[last]], device=model.device), cache=cache)[0, -1].argmax())
        out.append(last)
    return out


def decode_new_cache_each_step(model, prompt_ids, max_new_tokens):  # a fresh cache per call: the whole prefix again
    tokens = list(prompt_ids)
    for _ in range(max_new_tokens):
        cache = KVCache(model.config, 1, len(tokens), dtype=model.dtype, device=model.device)
        tokens.append(int(model(torch.tensor([tokens], device=model.device), cache=cache)[0, -1].argmax()))
    return tokens[len(prompt_ids):]


decode_first_position_logits = edited(SOLVED.cached_greedy_decode, {   # the argmax of the wrong position
    "cache=cache, last_token_only=True)  # prefill": "cache=cache)  # prefill",
    "out = [int(logits[0, -1].argmax())]": "out = [int(logits[0, 0].argmax())]"})


def flops_with(replacements):
    """The solution's decode_step_flops with one of the usual mistakes."""
    return edited(SOLVED.decode_step_flops, replacements)


FLOPS_KV_HEADS_FOR_ATTENTION = flops_with({"2 * 2 * L * Hq * D * pairs": "2 * 2 * L * Hkv * D * pairs"})
FLOPS_SQUARE = flops_with({"(position + 1) * (position + 2) // 2": "(position + 1) ** 2"})   # no causal mask
FLOPS_HEAD_ALL = flops_with({"lm_head = 2 * E * V": "lm_head = 2 * tokens * E * V"})          # lm_head on every row
FLOPS_IMPLIED_HEAD_DIM = flops_with({"config.head_dim": "config.hidden_size // config.num_attention_heads"})
FLOPS_SQUARE_Q_O = flops_with({"E * Hq * D + 2 * E * Hkv * D + Hq * D * E": "E * E + 2 * E * Hkv * D + E * E"})


@pytest.mark.parametrize("check, good, broken", [
    (lesson01.check_kv_cache_bytes, SOLVED.kv_cache_bytes, [
        lambda c, n, b, e: c.num_hidden_layers * c.num_key_value_heads * c.head_dim * n * b * e,  # forgot the 2
        lambda c, n, b, e: 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * n * b * e,  # Hq, not Hkv
        lambda c, n, b, e: 2 * c.num_hidden_layers * c.hidden_size * n * b * e,  # E = Hq·D: the MHA assumption
        lambda c, n, b, e: 2 * c.num_key_value_heads * c.head_dim * n * b * e,  # one layer
        lambda c, n, b, e: 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * n * e,  # no batch
    ]),
    (lesson01.check_kv_cache_update, SOLVED.update, [
        update_writes_at_zero, update_whole_buffer, update_copy, update_not_in_place, update_swapped,
        lambda ck, cv, k, v, start: (k, v),  # returns only the new tokens
    ]),
    (lesson01.check_decode_step_flops, SOLVED.decode_step_flops, [
        FLOPS_KV_HEADS_FOR_ATTENTION,
        flops_with({"2 * E * Hkv * D": "2 * E * Hq * D"}),                       # K/V projections of Hq heads
        FLOPS_SQUARE,
        FLOPS_HEAD_ALL,
        flops_with({"pairs = position + 1 if use_cache else (position + 1) * (position + 2) // 2":
                    "pairs = position if use_cache else position * (position + 1) // 2"}),   # a token misses itself
        flops_with({"return linear + attention + lm_head": "return (linear + attention + lm_head) // 2"}),  # MACs
        lambda c, p, u: SOLVED.decode_step_flops(c, p, True),  # ignores use_cache
    ]),
])
def test_python_checks(check, good, broken):
    assert check(good).status == "passed"
    assert_not_attempted(check(stub))
    for fn in broken:
        assert_caught(check(fn), "hint:")


def test_library_kv_cache_bytes_passes():
    assert lesson01.check_kv_cache_bytes(kv_cache_bytes).status == "passed"


def test_solution_formula_is_the_library_formula():
    for cfg in (TINY, *PRESETS.values()):   # Qwen3 too: its head_dim is set apart (Hq·D = 2E)
        for p in (0, 5, 300):
            for use in (True, False):
                assert SOLVED.decode_step_flops(cfg, p, use) == flops.decode_step_flops(cfg, p, use)


@pytest.mark.parametrize("fn, message", [
    (update_writes_at_zero, "landed at position 0"),
    (update_whole_buffer, "return only the filled positions"),
    (update_copy, "a view of cache_k"),
    (update_not_in_place, "write into the preallocated buffer"),
])
def test_update_check_hints(fn, message):
    assert message in lesson01.check_kv_cache_update(fn).message


@pytest.mark.parametrize("fn, message", [
    (lambda c, n, b, e: kv_cache_bytes(c, n, b, e) // 2, "factor 2"),
    (lambda c, n, b, e: 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * n * b * e,
     "num_key_value_heads"),
    (lambda c, n, b, e: 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
     * n * b * e, "config.head_dim"),                              # right for every preset but Qwen3's
])
def test_kv_cache_bytes_hints(fn, message):
    assert message in lesson01.check_kv_cache_bytes(fn).message


def test_decode_step_flops_hints():
    assert "QUERY head" in lesson01.check_decode_step_flops(FLOPS_KV_HEADS_FOR_ATTENTION).message
    assert "causal" in lesson01.check_decode_step_flops(FLOPS_SQUARE).message
    assert "last position only" in lesson01.check_decode_step_flops(FLOPS_HEAD_ALL).message
    # right for every preset but Qwen3's, whose head_dim is set apart: Hq·D = 2E
    assert "config.head_dim" in lesson01.check_decode_step_flops(FLOPS_IMPLIED_HEAD_DIM).message
    assert "not E -> E" in lesson01.check_decode_step_flops(FLOPS_SQUARE_Q_O).message


def test_cached_greedy_decode_check():
    assert lesson01.check_cached_greedy_decode(SOLVED.cached_greedy_decode).status == "passed"
    assert_not_attempted(lesson01.check_cached_greedy_decode(stub))
    for fn, message in [
        (decode_whole_sequence_with_cache, "only the newest token"),
        (decode_without_cache, "no cache"),
        (decode_double_advance, "don't call cache.advance()"),
        (decode_refeeds_last_prompt_token, "call(s)"),
        (decode_first_position_logits, "LAST position"),
        (decode_new_cache_each_step, "another cache"),
    ]:
        assert_caught(lesson01.check_cached_greedy_decode(fn), message)


def test_exercise_stubs_are_not_attempted():
    stubs = exercise("01_kv_cache")
    for check, name in [(lesson01.check_kv_cache_bytes, "kv_cache_bytes"), (lesson01.check_kv_cache_update, "update"),
                        (lesson01.check_cached_greedy_decode, "cached_greedy_decode"),
                        (lesson01.check_decode_step_flops, "decode_step_flops")]:
        assert_not_attempted(check(getattr(stubs, name)))


# ---------------------------------------------------------------- more mistakes a learner makes (issue 23)
def decode_returns_prompt_too(model, prompt_ids, max_new_tokens):   # prompt + new tokens instead of the new ones
    return list(prompt_ids) + SOLVED.cached_greedy_decode(model, prompt_ids, max_new_tokens)


def decode_returns_a_tensor(model, prompt_ids, max_new_tokens):
    return torch.tensor(SOLVED.cached_greedy_decode(model, prompt_ids, max_new_tokens))


update_one_short = edited(SOLVED.update, {RETURN_FILLED: "return cache_k[:, :, :end - 1], cache_v[:, :, :end - 1]"})


@pytest.mark.parametrize("check, fn, hint", [
    (lesson01.check_kv_cache_bytes,
     lambda c, n, b, e: 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * n * b, "bytes_per_element"),
    (lesson01.check_kv_cache_update, update_one_short, "hint:"),
    (lesson01.check_cached_greedy_decode, decode_returns_prompt_too, "prompt excluded"),
    (lesson01.check_cached_greedy_decode, decode_returns_a_tensor, "list of Python ints"),
    (lesson01.check_decode_step_flops, FLOPS_SQUARE_Q_O, "not E -> E"),
])
def test_checks_catch_more(check, fn, hint):
    assert_caught(check(fn), hint)


# ---------------------------------------------------------------- end to end: the loop with the learner's update
def test_cached_greedy_decode_runs_the_learners_update_in_the_model():
    decode = SOLVED.cached_greedy_decode
    assert lesson01.check_cached_greedy_decode(decode, SOLVED.update).status == "passed"
    result = lesson01.check_cached_greedy_decode(decode, stub)
    assert_not_attempted(result)
    assert "finish exercise 2 first" in result.message
    assert_not_attempted(lesson01.check_cached_greedy_decode(stub, SOLVED.update))
    into_buffer = "write k and v INTO cache_k and cache_v"
    for update, hint in [(update_writes_at_zero, into_buffer), (update_not_in_place, into_buffer),
                         (update_swapped, into_buffer), (update_whole_buffer, "returned [(1, 4, 81, 32)"),
                         (update_one_short, "expected two tensors (1, 4, 21, 32)")]:
        assert_caught(lesson01.check_cached_greedy_decode(decode, update), hint)
