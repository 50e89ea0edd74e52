"""Lesson 06's checks: each passes the library's solution, reports a stub as not attempted, and fails broken variants
with a hint."""
from __future__ import annotations

import pytest
import torch

from course_lib.serving import speculative as spec
from course_lib.grading import lesson06
from conftest import assert_caught, assert_not_attempted, solution, stub

SOLVED = solution("06_speculative_decoding")


def _leading(flags):
    n = 0
    while n < len(flags) and flags[n]:
        n += 1
    return n


def _count_all_passes(d, q, p, u):  # forgets to stop at the first rejection
    return sum(float(u[i]) * float(q[i, x]) < float(p[i, x]) for i, x in enumerate(d))


def _count_inverted_ratio(d, q, p, u):  # q/p instead of p/q
    return _leading([float(u[i]) * float(p[i, x]) < float(q[i, x]) for i, x in enumerate(d)])


def _count_non_strict(d, q, p, u):  # u <= p/q: accepts a token the target gives probability 0 when u = 0
    return _leading([float(u[i]) * float(q[i, x]) <= float(p[i, x]) for i, x in enumerate(d)])


def _count_min_ratio_against_q(d, q, p, u):  # compares u with p(x) alone
    return _leading([float(u[i]) < float(p[i, x]) for i, x in enumerate(d)])


def _count_with_bonus(d, q, p, u):  # adds the target's bonus token when every draft passes
    n = _leading([float(u[i]) * float(q[i, x]) < float(p[i, x]) for i, x in enumerate(d)])
    return n + 1 if n == len(d) else n


def _count_as_float(d, q, p, u):  # right value, a float: cannot slice the drafts
    return float(_leading([float(u[i]) * float(q[i, x]) < float(p[i, x]) for i, x in enumerate(d)]))


def _count_next_target_row(d, q, p, u):  # target_probs read one row late
    return _leading([float(u[i]) * float(q[i, x]) < float(p[i + 1, x]) for i, x in enumerate(d)])


def _count_reversed_comparison(d, q, p, u):  # accepts when u > p/q
    return _leading([float(u[i]) * float(q[i, x]) > float(p[i, x]) for i, x in enumerate(d)])


def _residual_unclamped(p, q):
    return (p - q) / (p - q).sum() if (p - q).sum() != 0 else p


def _residual_unnormalized(p, q):
    return torch.clamp(p - q, min=0)


def _residual_reversed(p, q):
    r = torch.clamp(q - p, min=0)
    return r / r.sum() if r.sum() > 0 else p


def _residual_nan_when_equal(p, q):
    r = torch.clamp(p - q, min=0)
    return r / r.sum()


def _residual_signed_sum(p, q):  # clamps, then normalizes by the signed sum Σ (p − q) = 0
    return torch.clamp(p - q, min=0) / (p - q).sum()


def _residual_abs(p, q):  # |p − q| instead of max(0, p − q)
    r = (p - q).abs()
    return r / r.sum() if r.sum() > 0 else p


def _tokens_infinite_gamma(alpha, gamma):  # the γ → ∞ limit
    return 1 / (1 - alpha) if alpha < 1 else gamma + 1.0


def _tokens_no_bonus(alpha, gamma):
    return gamma + 0.0 if alpha == 1 else (1 - alpha ** gamma) / (1 - alpha)


def _tokens_zero_division(alpha, gamma):
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def _tokens_linear(alpha, gamma):
    return 1 + alpha * gamma


@pytest.mark.parametrize("check, goods, broken", [
    (lesson06.check_count_accepted, [SOLVED.count_accepted, spec.count_accepted],
     [_count_all_passes, _count_inverted_ratio, _count_non_strict, _count_min_ratio_against_q, _count_with_bonus,
      _count_next_target_row, _count_reversed_comparison, _count_as_float]),
    (lesson06.check_residual_distribution, [SOLVED.residual_distribution, spec.residual_distribution],
     [_residual_unclamped, _residual_unnormalized, _residual_reversed, _residual_nan_when_equal, _residual_signed_sum,
      _residual_abs]),
    (lesson06.check_expected_tokens, [SOLVED.expected_tokens, spec.expected_tokens_per_step],
     [_tokens_no_bonus, _tokens_zero_division, _tokens_linear, _tokens_infinite_gamma]),
])
def test_python_checks(check, goods, broken):
    for good in goods:   # the solution notebook's answer and the library's
        assert check(good).status == "passed"
    assert_not_attempted(check(stub))
    for fn in broken:
        assert_caught(check(fn))   # a hint, or "your code raised ZeroDivisionError" (the 0/0 at α = 1)


def test_hints_name_the_mistake():
    assert "FIRST rejection" in lesson06.check_count_accepted(_count_all_passes).message
    assert "p/q (target over draft)" in lesson06.check_count_accepted(_count_inverted_ratio).message
    assert "strictly" in lesson06.check_count_accepted(_count_non_strict).message
    assert "clamp at zero" in lesson06.check_residual_distribution(_residual_unclamped).message
    assert "normalize" in lesson06.check_residual_distribution(_residual_unnormalized).message
    assert "not the other way round" in lesson06.check_residual_distribution(_residual_reversed).message
    assert "0/0 is NaN" in lesson06.check_residual_distribution(_residual_nan_when_equal).message
    assert "α^(γ+1)" in lesson06.check_expected_tokens(_tokens_no_bonus).message
    assert "bonus token" in lesson06.check_count_accepted(_count_with_bonus).message
    assert "return an int" in lesson06.check_count_accepted(_count_as_float).message
    assert "not row i + 1" in lesson06.check_count_accepted(_count_next_target_row).message
    assert "not by Σ (p − q)" in lesson06.check_residual_distribution(_residual_signed_sum).message
    assert "not |p − q|" in lesson06.check_residual_distribution(_residual_abs).message
    assert "limit for γ → ∞" in lesson06.check_expected_tokens(_tokens_infinite_gamma).message


# ---------------------------------------------------------------- the rollback check
def _rollback_target_only(target_cache, draft_cache, num_tokens):  # the draft keeps rejected tokens
    target_cache.truncate(num_tokens - 1)


def _rollback_off_by_one(target_cache, draft_cache, num_tokens):  # keeps a rejected draft's K/V in the target
    target_cache.truncate(min(target_cache.length, num_tokens))
    draft_cache.truncate(min(draft_cache.length, num_tokens - 1))


def _rollback_no_min(target_cache, draft_cache, num_tokens):  # fails when all drafts are accepted
    target_cache.truncate(num_tokens - 1)
    draft_cache.truncate(num_tokens - 1)


def _rollback_target_one_short(target_cache, draft_cache, num_tokens):  # drops the last accepted token's K/V
    target_cache.truncate(num_tokens - 2)
    draft_cache.truncate(min(draft_cache.length, num_tokens - 1))


def _rollback_draft_first_to_target(target_cache, draft_cache, num_tokens):  # the draft cut to the target's old length
    draft_cache.truncate(min(draft_cache.length, target_cache.length))
    target_cache.truncate(num_tokens - 1)


def _rollback_nothing(target_cache, draft_cache, num_tokens):
    pass


def test_rollback_check():
    assert lesson06.check_rollback_caches(SOLVED.rollback_caches).status == "passed"
    assert lesson06.check_rollback_caches(spec.rollback_caches).status == "passed"
    assert_not_attempted(lesson06.check_rollback_caches(stub))
    assert_caught(lesson06.check_rollback_caches(_rollback_target_only), "draft cache length")
    assert_caught(lesson06.check_rollback_caches(_rollback_off_by_one), "target cache length")
    assert_caught(lesson06.check_rollback_caches(_rollback_no_min), "ValueError")
    assert_caught(lesson06.check_rollback_caches(_rollback_nothing), "target cache length")
    assert_caught(lesson06.check_rollback_caches(_rollback_target_one_short), "target cache length")
    assert_caught(lesson06.check_rollback_caches(_rollback_draft_first_to_target), "draft cache length")


# ---------------------------------------------------------------- end to end: a greedy speculative decode
def test_end_to_end_references_agree():
    """The check's loop with the library's functions is speculative_generate (same tokens, same accepted counts),
    and the engine's speculative tokens are its tokens without a draft."""
    greedy, library, engine_tokens, engine_library = lesson06._e2e_want()
    target, draft, prompts = lesson06._pair_and_prompts()
    for (index, gamma, n), lib, want in zip(lesson06._E2E_DECODES, library, greedy):
        ref = spec.speculative_generate(target, draft, prompts[index], n, gamma=gamma)
        assert lib["tokens"] == ref.token_ids == want and lib["accepted"] == ref.stats.accepted_per_round
        assert min(lib["accepted"]) < gamma == max(lib["accepted"])      # rounds with rejections and with none
    assert engine_library["tokens"] == engine_tokens and sum(engine_library["accepted"]) > 0


def test_end_to_end_check():
    assert lesson06.check_end_to_end(SOLVED.count_accepted, SOLVED.rollback_caches).status == "passed"
    assert lesson06.check_end_to_end(spec.count_accepted, spec.rollback_caches).status == "passed"
    assert_not_attempted(lesson06.check_end_to_end(stub, stub))
    assert_not_attempted(lesson06.check_end_to_end(SOLVED.count_accepted, stub))
    assert_not_attempted(lesson06.check_end_to_end(stub, SOLVED.rollback_caches))


@pytest.mark.parametrize("count, rollback, hint", [
    (_count_all_passes, None, "your count_accepted alone already changes the decode"),
    (_count_inverted_ratio, None, "your count_accepted alone already changes the decode"),
    (_count_reversed_comparison, None, "your count_accepted alone already changes the decode"),
    (_count_next_target_row, None, "your count_accepted alone already changes the decode"),
    (_count_with_bonus, None, "the bonus token is not one of them"),
    (_count_as_float, None, "expected an int"),
    (None, _rollback_target_only, "roll the draft back too"),
    (None, _rollback_draft_first_to_target, "roll the draft back too"),
    (None, _rollback_off_by_one, "target_cache.truncate(num_tokens - 1)"),
    (None, _rollback_nothing, "target_cache.truncate(num_tokens - 1)"),
    (None, _rollback_no_min, "cannot truncate"),
])
def test_end_to_end_check_catches(count, rollback, hint):
    result = lesson06.check_end_to_end(count or SOLVED.count_accepted, rollback or SOLVED.rollback_caches)
    assert_caught(result, hint)
