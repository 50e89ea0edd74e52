"""course_lib.serving.speculative: rejection sampling keeps the target's distribution (a chi-square test on small
Markov-chain "models" whose exact probabilities are known), greedy speculative decoding reproduces the
target's greedy tokens on the shipped models, and both KV caches are rolled back correctly."""
from __future__ import annotations

import json
import math
from statistics import NormalDist

import pytest
import torch

from course_lib import load_tiny
from course_lib.serving import speculative as spec
from course_lib.model.corpus import load_text
from course_lib.model.generate import generate
from course_lib.model.kv_cache import KVCache


# ---------------------------------------------------------------- the chi-square test
def chi_square_threshold(dof: int, significance: float) -> float:
    """The (1 − significance) quantile of χ²(dof), by the Wilson–Hilferty approximation (good to ~1% for
    dof >= 3). With significance = 1e-4 a correct sampler fails a given seed's test with probability 1e-4."""
    z = NormalDist().inv_cdf(1 - significance)
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


SIGNIFICANCE = 1e-4
V = 5
LENGTH = 2                # the joint distribution of the first 2 generated tokens: V² = 25 cells
NUM_SAMPLES = 8000


def _chain(seed: int, temperature: float, zeros: list[tuple[int, int]]) -> torch.Tensor:
    """A bigram 'model' [V, V]: row a = the next-token distribution after token a, softmax(logits / T)."""
    logits = torch.randn(V, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5
    for a, b in zeros:  # impossible transitions: exercises p = 0 (always reject) and q = 0 (residual mass)
        logits[a, b] = -math.inf
    return torch.softmax(logits / temperature, dim=-1)


def speculative_samples(P, Q, gamma: int, n: int, seed: int) -> list[tuple[int, ...]]:
    """n sequences of LENGTH tokens after token 0, drafted from chain Q and verified against chain P."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        seq = [0]
        while len(seq) <= LENGTH:
            drafts, q = [], []
            for _ in range(gamma):
                row = Q[drafts[-1] if drafts else seq[-1]]
                drafts.append(int(torch.multinomial(row, 1, generator=gen)))
                q.append(row)
            contexts = torch.tensor([seq[-1]] + drafts)  # the target's distribution after each of them
            seq += spec.rejection_sample(drafts, torch.stack(q), P[contexts], gen)
        samples.append(tuple(seq[1:LENGTH + 1]))
    return samples


def chi_square(samples, P) -> tuple[float, int, int]:
    """(statistic, degrees of freedom, samples in cells of probability 0) against the exact joint P(a|0)·P(b|a)."""
    exact = {(a, b): float(P[0, a] * P[a, b]) for a in range(V) for b in range(V)}
    counts = {cell: 0 for cell in exact}
    for s in samples:
        counts[s] += 1
    n = len(samples)
    impossible = sum(counts[c] for c, p in exact.items() if p == 0)
    cells = [c for c, p in exact.items() if p > 0]
    stat = sum((counts[c] - n * exact[c]) ** 2 / (n * exact[c]) for c in cells)
    return stat, len(cells) - 1, impossible


ZEROS_P, ZEROS_Q = [(0, 1), (2, 3), (4, 0)], [(0, 2), (1, 1), (3, 4)]


@pytest.mark.parametrize("temperature, gamma", [(0.5, 1), (0.5, 3), (1.0, 2), (1.0, 4), (2.0, 1), (2.0, 3)])
def test_rejection_sampling_keeps_the_target_distribution(temperature, gamma):
    P, Q = _chain(1, temperature, ZEROS_P), _chain(2, temperature, ZEROS_Q)
    stat, dof, impossible = chi_square(speculative_samples(P, Q, gamma, NUM_SAMPLES, seed=gamma), P)
    assert impossible == 0, "a sequence the target gives probability 0 was generated"
    assert stat < chi_square_threshold(dof, SIGNIFICANCE), f"χ² = {stat:.1f} with {dof} dof"


def test_the_chi_square_test_catches_a_wrong_correction(monkeypatch):
    """Power check: drawing the correction from p instead of norm(max(0, p − q)) over-weights the tokens the
    draft likes; the same test at the same size must reject it."""
    P, Q = _chain(1, 1.0, ZEROS_P), _chain(2, 1.0, ZEROS_Q)
    monkeypatch.setattr(spec, "residual_distribution", lambda p, q: p)
    stat, dof, _ = chi_square(speculative_samples(P, Q, 2, NUM_SAMPLES, seed=2), P)
    assert stat > chi_square_threshold(dof, SIGNIFICANCE)


def test_chi_square_threshold():
    # Tabulated quantiles of χ²: 0.999 with 10 dof is 29.588, 0.999 with 24 dof is 51.179, 0.99 with 4 is 13.277.
    assert chi_square_threshold(10, 1e-3) == pytest.approx(29.588, rel=0.01)
    assert chi_square_threshold(24, 1e-3) == pytest.approx(51.179, rel=0.01)
    assert chi_square_threshold(4, 1e-2) == pytest.approx(13.277, rel=0.01)


# ---------------------------------------------------------------- rejection_sample and friends
def test_identical_distributions_accept_everything_then_a_bonus_token():
    p = torch.softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(0)), -1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        drafts = [int(torch.multinomial(p[i], 1, generator=gen)) for i in range(3)]
        out = spec.rejection_sample(drafts, p[:3], p, gen)
        assert out[:3] == drafts and len(out) == 4


def test_disjoint_supports_reject_the_first_token_and_correct_from_the_target():
    q = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    p = torch.tensor([[0, 0.5, 0.5, 0], [0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]])
    for seed in range(20):
        out = spec.rejection_sample([0, 0], q, p, torch.Generator().manual_seed(seed))
        assert len(out) == 1 and out[0] in (1, 2)


def test_residual_distribution():
    p, q = torch.tensor([0.5, 0.3, 0.2, 0.0]), torch.tensor([0.1, 0.5, 0.2, 0.2])
    torch.testing.assert_close(spec.residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    p2 = torch.tensor([0.4, 0.4, 0.2, 0.0])
    torch.testing.assert_close(spec.residual_distribution(p2, q), torch.tensor([0.3, 0.0, 0.0, 0.0]) / 0.3)
    torch.testing.assert_close(spec.residual_distribution(p, p), p)  # never sampled; defined anyway


def test_count_accepted_boundaries():
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    p = torch.tensor([[0.25, 0.75], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    # token 0 at position 0: ratio 0.5; token 1 at 1: ratio 2 (always); token 0 at 1: ratio 0 (never)
    assert spec.count_accepted([0, 1, 0], q, p, torch.tensor([0.49, 0.99, 0.0])) == 3
    assert spec.count_accepted([0, 1, 0], q, p, torch.tensor([0.5, 0.0, 0.0])) == 0   # u == ratio rejects
    assert spec.count_accepted([0, 0, 0], q, p, torch.tensor([0.0, 0.0, 0.0])) == 1   # p = 0 rejects even u = 0
    assert spec.count_accepted([], q[:0], p[:1], torch.tensor([])) == 0


@pytest.mark.parametrize("seed", range(5))
def test_greedy_verify_is_rejection_sampling_with_one_hot_distributions(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 6, generator=gen)
    drafts = logits[:4].argmax(-1).tolist()
    drafts[seed % 4] = (drafts[seed % 4] + 1) % 6 if seed < 4 else drafts[seed % 4]  # a mismatch (seed 4: none)
    q = spec.probabilities(torch.nn.functional.one_hot(torch.tensor(drafts), 6).float(), 0.0)
    p = spec.probabilities(logits, 0.0)
    assert spec.greedy_verify(drafts, logits) == spec.rejection_sample(drafts, q, p, gen)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="draft_probs must be"):
        spec.rejection_sample([1, 2], torch.rand(3, 4), torch.rand(3, 4))
    with pytest.raises(ValueError, match="target_probs must be"):
        spec.rejection_sample([1, 2], torch.rand(2, 4), torch.rand(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        spec.probabilities(torch.rand(4), -1.0)


def test_expected_tokens_and_speedup():
    assert spec.expected_tokens_per_step(0.0, 4) == 1.0
    assert spec.expected_tokens_per_step(1.0, 4) == 5.0
    assert spec.expected_tokens_per_step(0.5, 2) == pytest.approx(1.75)
    assert spec.expected_tokens_per_step(0.999999, 3) == pytest.approx(4.0, rel=1e-5)
    assert spec.expected_speedup(0.5, 2, c=0.25) == pytest.approx(1.75 / 1.5)
    assert spec.expected_speedup(0.8, 4, c=0.0) == pytest.approx(spec.expected_tokens_per_step(0.8, 4))


# ---------------------------------------------------------------- the shipped models
@pytest.fixture(scope="module")
def pair():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and steady when other processes share the CPU
    target, tok = load_tiny("target", dtype=torch.float32, device="cpu")
    draft, _ = load_tiny("draft", dtype=torch.float32, device="cpu")
    ids = tok.encode(load_text("validation"))
    yield target, draft, [ids[:24], ids[20_000:20_001], ids[40_000:40_040]]
    torch.set_num_threads(threads)


@pytest.mark.parametrize("gamma", [1, 3, 8])
def test_greedy_speculative_equals_target_greedy(pair, gamma):
    target, draft, prompts = pair
    for prompt in prompts:
        want = generate(target, prompt, 40).token_ids
        got = spec.speculative_generate(target, draft, prompt, 40, gamma=gamma)
        assert got.token_ids == want
        s = got.stats
        assert s.draft_forwards == s.proposed and s.accepted + s.target_forwards >= 40
        assert s.expected_acceptance_rate == pytest.approx(s.acceptance_rate)  # greedy: the same count


def test_stop_tokens_and_reproducible_sampling(pair):
    target, draft, prompts = pair
    want = generate(target, prompts[0], 30).token_ids
    stop = want[9]
    got = spec.speculative_generate(target, draft, prompts[0], 30, gamma=4, stop_token_ids=(stop,)).token_ids
    assert got == want[:want.index(stop) + 1]
    a = spec.speculative_generate(target, draft, prompts[0], 30, gamma=4, temperature=1.0, seed=3)
    b = spec.speculative_generate(target, draft, prompts[0], 30, gamma=4, temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 30 and 0 <= a.stats.acceptance_rate <= 1


def test_bad_arguments(pair):
    target, draft, prompts = pair
    with pytest.raises(ValueError, match="empty"):
        spec.speculative_generate(target, draft, [], 4)
    with pytest.raises(ValueError, match="gamma"):
        spec.speculative_generate(target, draft, prompts[0], 4, gamma=0)
    with pytest.raises(ValueError, match="context"):
        spec.speculative_generate(target, draft, prompts[0], 1000)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_rollback_keeps_exactly_the_accepted_tokens(pair, temperature):
    """After every round each cache holds the K/V of every token but the newest, equal to a fresh prefill."""
    target, draft, prompts = pair
    tokens = list(prompts[0])
    caches = {m: KVCache(m.config, 1, 128, dtype=m.dtype, device=m.device) for m in (target, draft)}
    stats, gen = spec.SpeculativeStats(), torch.Generator().manual_seed(0)
    while len(tokens) < 24 + 48:
        tokens += spec.speculative_step(target, draft, tokens, caches[target], caches[draft], 4, temperature, gen,
                                        stats)
        assert caches[target].length == len(tokens) - 1
        assert len(tokens) - 3 <= caches[draft].length <= len(tokens) - 1
    assert stats.rejected > 0 and stats.rejected < stats.target_forwards  # both kinds of round happened
    for model, cache in caches.items():
        fresh = KVCache(model.config, 1, 128, dtype=model.dtype, device=model.device)
        model(torch.tensor([tokens[:cache.length]]), cache=fresh)
        for layer in range(model.config.num_hidden_layers):
            torch.testing.assert_close(cache.k[layer][:, :, :cache.length], fresh.k[layer][:, :, :cache.length],
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache.v[layer][:, :, :cache.length], fresh.v[layer][:, :, :cache.length],
                                       rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the benchmark script
@pytest.mark.command
def test_benchmark_script_quick(tmp_path):
    from benchmarks import speculative as bench

    out = tmp_path / "s.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for key in ("device", "date", "torch", "triton", "dtype", "forward_ms", "runs", "workload"):
        assert key in result
    greedy = result["runs"][0]
    assert greedy["temperature"] == 0 and [p["gamma"] for p in greedy["points"]] == list(range(1, 9))
    for p in greedy["points"]:
        assert 0 < p["alpha"] < 1 and p["tokens_per_s"] > 0
        assert p["same_tokens_as_target"] == result["workload"]["num_prompts"]
