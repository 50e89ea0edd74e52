"""The encoder budget, the encoder cache and content-hashed image tokens on the engine's scheduler
(course_lib.experiments.multimodal; lesson 04, the Q&A document's Q10)."""
from __future__ import annotations

import pytest

from course_lib.experiments.multimodal import (PLACEHOLDER_ID, EncoderBudgetScheduler, Image, build_prompt,
                                               image_trace, image_token_ids, simulate)
from course_lib.paging.block_manager import BlockManager
from course_lib.serving.sequence import Sequence

A, B = Image(b"cat.png", 64), Image(b"dog.png", 64)
SYSTEM = list(range(1, 33))


def test_image_ids_follow_the_content():
    assert image_token_ids(A) == image_token_ids(Image(b"cat.png", 64)) != image_token_ids(B)
    assert image_token_ids(A, "placeholder") == image_token_ids(B, "placeholder") == [PLACEHOLDER_ID] * 64
    ids, placements = build_prompt([SYSTEM, A, [7, 8]])
    assert len(ids) == 32 + 64 + 2 and placements == [(32, A)]
    with pytest.raises(ValueError, match="mode"):
        image_token_ids(A, "pixels")


@pytest.mark.parametrize("kwargs", [dict(), dict(enable_prefix_caching=False), dict(image_ids="placeholder"),
                                    dict(max_num_encoder_input_tokens=1152, max_num_batched_tokens=2048)])
def test_the_encoder_budget_holds_in_every_step(kwargs):
    r = simulate(image_trace(gap=0), **kwargs)
    assert 0 < r["max_encoder_tokens_per_step"] <= kwargs.get("max_num_encoder_input_tokens", 576)


@pytest.mark.parametrize("prefix", [True, False])
def test_every_image_token_is_computed_shared_or_skipped_once(prefix):
    r = simulate(image_trace(), enable_prefix_caching=prefix)
    assert r["encoder_tokens_computed"] + r["encoder_tokens_cached"] + r["encoder_tokens_skipped"] == r["image_tokens"]
    assert r["encoder_tokens_computed"] == 2 * 576          # two distinct images, each encoded once
    assert (r["encoder_tokens_skipped"] > 0) == prefix and r["false_prefix_hit_tokens"] == 0


def test_same_image_after_same_prefix_skips_the_encoder_a_different_one_does_not():
    same = simulate([(0, [SYSTEM, A, [5]], 2), (10, [SYSTEM, A, [6]], 2)], max_num_encoder_input_tokens=64)
    other = simulate([(0, [SYSTEM, A, [5]], 2), (10, [SYSTEM, B, [6]], 2)], max_num_encoder_input_tokens=64)
    assert (same["encoder_tokens_computed"], same["encoder_tokens_skipped"]) == (64, 64)
    assert (other["encoder_tokens_computed"], other["encoder_tokens_skipped"]) == (128, 0)


def test_placeholder_ids_give_false_prefix_hits():
    r = simulate([(0, [SYSTEM, A, [5]], 2), (10, [SYSTEM, B, [6]], 2)], max_num_encoder_input_tokens=64,
                 image_ids="placeholder")
    assert r["false_prefix_hit_tokens"] == 64 and r["encoder_tokens_computed"] == 64   # B never encoded: wrong K/V


def test_a_spent_budget_cuts_the_chunk_before_the_image():
    r = simulate([(0, [SYSTEM, A, [5]], 2), (0, [SYSTEM, B, [6]], 2)], max_num_encoder_input_tokens=64,
                 enable_prefix_caching=False)
    assert r["max_encoder_tokens_per_step"] == 64 and r["ttft_steps"] == [1, 2]
    wide = simulate([(0, [SYSTEM, A, [5]], 2), (0, [SYSTEM, B, [6]], 2)], max_num_encoder_input_tokens=128,
                    enable_prefix_caching=False)
    assert wide["max_encoder_tokens_per_step"] == 128 and wide["ttft_steps"] == [1, 1]


def test_a_bigger_encoder_budget_lowers_ttft_of_a_burst():
    burst = image_trace(num_images=4, gap=0)
    small = simulate(burst, enable_prefix_caching=False, max_num_batched_tokens=2048)
    big = simulate(burst, enable_prefix_caching=False, max_num_batched_tokens=2048, max_num_encoder_input_tokens=2304)
    assert big["ttft_steps_mean"] < small["ttft_steps_mean"]
    assert big["max_encoder_tokens_per_step"] > small["max_encoder_tokens_per_step"]


def test_validation():
    kw = dict(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=1024)
    with pytest.raises(ValueError, match="encoder_cache_size"):
        EncoderBudgetScheduler(BlockManager(8, 16), **kw, max_num_encoder_input_tokens=128, encoder_cache_size=64)
    sched = EncoderBudgetScheduler(BlockManager(8, 16), **kw, max_num_encoder_input_tokens=32, encoder_cache_size=64)
    with pytest.raises(ValueError, match="never fits"):
        sched.add_request(Sequence(0, 0, [1] * 64), [(0, A)])
