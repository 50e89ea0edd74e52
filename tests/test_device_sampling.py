"""Sampling on the device (issue 18): the counter-based noise (``course_lib.model.noise``) against a pure-Python
reference and for its statistics, the batched draw (``sampling.sample_tokens``) against the one-row API
(``sample_token`` / ``draw``) and against the distribution it must draw from, and that nothing in it waits for the
device. The GPU tests check that the noise has the same bits there and that the engine with asynchronous
scheduling and CUDA graphs gives the seeded tokens of the eager synchronous engine."""
from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib.device import HAS_GPU
from course_lib.model.noise import exponential_noise, noise_bits, uniform_from_bits
from course_lib.model.sampling import (SamplingParams, draw, filter_logits, sample_token, sample_tokens,
                                       sampling_probs, token_generator)
from test_speculative import chi_square_threshold

SIGNIFICANCE = 1e-4


# ---------------------------------------------------------------- the hash, restated in plain Python
def ref_mix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x7FEB352D) % 2**32
    h ^= h >> 15
    h = (h * 0x31848BAB) % 2**32
    return h ^ (h >> 16)


def ref_hash(seed: int, position: int, x: int) -> int:
    lo, hi = seed % 2**32, seed // 2**32
    a = ref_mix(ref_mix(ref_mix(position ^ 0x9E3779B9) ^ lo) ^ hi)
    b = ref_mix(ref_mix(ref_mix(hi ^ 0x85EBCA6B) ^ position) ^ lo)
    return ref_mix(ref_mix(x ^ a) ^ b)


def keys(seeds, positions, device="cpu"):
    return (torch.tensor(seeds, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device))


EDGE_SEEDS = [0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1]
EDGE_POSITIONS = [0, 1, 7, 2**31, 2**32 - 1, 2**32 - 2]


def test_noise_bits_equal_the_pure_python_reference():
    rng = random.Random(0)
    seeds = EDGE_SEEDS + [rng.randrange(2**63) for _ in range(10)]
    positions = EDGE_POSITIONS + [rng.randrange(2**32) for _ in range(10)]
    bits = noise_bits(*keys(seeds, positions), 40)
    want = [[ref_hash(s, p, x) for x in range(40)] for s, p in zip(seeds, positions)]
    assert bits.dtype == torch.int64 and bits.tolist() == want


def test_uniform_is_strictly_inside_0_1_and_the_exponential_finite_and_positive():
    u = uniform_from_bits(torch.tensor([0, 1, 2**31, 2**32 - 1]))
    assert u.dtype == torch.float64 and bool((u > 0).all() and (u < 1).all())
    e = exponential_noise(*keys(EDGE_SEEDS, EDGE_POSITIONS), 1000)
    assert e.dtype == torch.float32 and bool(torch.isfinite(e).all() and (e > 0).all())


def grid(num_seeds: int, num_positions: int, vocab_size: int, seed_offset: int = 0) -> torch.Tensor:
    """h [num_seeds * num_positions, V]: every (seed, position) pair of the grid, seeds outer."""
    s, p = torch.meshgrid(torch.arange(num_seeds) + seed_offset, torch.arange(num_positions), indexing="ij")
    return noise_bits(s.reshape(-1), p.reshape(-1), vocab_size)


def uniform_chi_square(values: torch.Tensor, num_bins: int) -> float:
    counts = torch.bincount(values.reshape(-1), minlength=num_bins).double()
    expected = values.numel() / num_bins
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("bits", ["high", "low"])
def test_noise_is_uniform(bits):
    """65,536 hashes (64 seeds x 64 positions x 16 tokens) in 64 bins of their top / bottom 6 bits."""
    h = grid(64, 64, 16)
    b = h >> 26 if bits == "high" else h & 63
    assert uniform_chi_square(b, 64) < chi_square_threshold(63, SIGNIFICANCE)
    e = exponential_noise(*keys([3] * 4096, list(range(4096))), 16)
    assert abs(float(e.double().mean()) - 1) < 0.02 and abs(float(e.double().var()) - 1) < 0.05   # Exp(1)


@pytest.mark.parametrize("neighbour", ["next position", "next seed", "seed + 2**32", "next token"])
def test_neighbouring_keys_give_independent_noise(neighbour):
    """The pairs (top 3 bits here, top 3 bits at the neighbour) fill the 64 cells evenly, and U is uncorrelated."""
    if neighbour == "next token":
        h = grid(64, 64, 17)
        a, b = h[:, :-1], h[:, 1:]
    elif neighbour == "next position":
        h = grid(64, 65, 16).view(64, 65, 16)
        a, b = h[:, :-1], h[:, 1:]
    else:
        a, b = grid(64, 64, 16), grid(64, 64, 16, seed_offset={"next seed": 1, "seed + 2**32": 2**32}[neighbour])
    pairs = (a >> 29) * 8 + (b >> 29)
    assert uniform_chi_square(pairs, 64) < chi_square_threshold(63, SIGNIFICANCE)
    ua, ub = uniform_from_bits(a).reshape(-1), uniform_from_bits(b).reshape(-1)
    r = float(torch.corrcoef(torch.stack([ua, ub]))[0, 1])
    assert abs(r) < 5 / ua.numel() ** 0.5


def test_the_independence_test_catches_noise_that_ignores_the_position():
    """Power check: the same noise at every position (a key without the position) must fail the pair test."""
    a = grid(64, 1, 16).repeat_interleave(64, dim=0)
    pairs = (a >> 29) * 8 + (a >> 29)
    assert uniform_chi_square(pairs, 64) > chi_square_threshold(63, SIGNIFICANCE)


def test_bad_inputs_name_the_argument():
    s, p = keys([1, 2], [0, 1])
    with pytest.raises(ValueError, match="seeds must be a 1-D int64"):
        noise_bits(s.int(), p, 8)
    with pytest.raises(ValueError, match="seeds and positions"):
        noise_bits(s, p[:1], 8)
    with pytest.raises(ValueError, match="vocab_size"):
        noise_bits(s, p, 0)
    with pytest.raises(ValueError, match="position must be"):
        token_generator(1, -1)
    with pytest.raises(ValueError, match="seed must be"):
        token_generator(2**63, 0)
    logits, hot = torch.zeros(2, 8), SamplingParams(temperature=1.0)
    with pytest.raises(ValueError, match=r"seeds\[1\] is None"):
        sample_tokens(logits, [SamplingParams(), hot], [None, None], [0, 0])
    with pytest.raises(ValueError, match="one entry per row"):
        sample_tokens(logits, [hot], [1], [0])
    with pytest.raises(ValueError, match="logits must be a tensor"):
        sample_tokens(logits[0], [hot], [1], [0])
    assert sample_tokens(logits, [SamplingParams()] * 2, [None, None], [0, 0]).tolist() == [0, 0]   # greedy: no seed


# ---------------------------------------------------------------- the batched draw
PARAMS = [SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=5),
          SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=0.5, top_k=3, top_p=0.9),
          SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=1.0, top_k=100)]


def mixed_batch(num_rows: int = 28, vocab_size: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab_size, generator=g) * 3
    params = [PARAMS[i % len(PARAMS)] for i in range(num_rows)]
    seeds = [None if p.greedy else 1000 + i for i, p in enumerate(params)]
    positions = [i * 37 % 11 for i in range(num_rows)]
    return logits, params, seeds, positions


def test_one_row_draws_give_the_batched_token():
    logits, params, seeds, positions = mixed_batch()
    batched = sample_tokens(logits, params, seeds, positions).tolist()
    for i, (p, s, pos) in enumerate(zip(params, seeds, positions)):
        key = None if s is None else token_generator(s, pos)
        assert sample_token(logits[i], p, key) == batched[i], f"row {i}: {p}"
        if s is not None:
            probs = torch.softmax(filter_logits(logits[i], p.temperature, p.top_k, p.top_p), dim=-1)
            assert draw(probs, key) == batched[i], f"row {i}: {p}"
        else:
            assert batched[i] == int(logits[i].argmax())
    # a row's token does not depend on the batch: reversed, or alone with a greedy neighbour
    order = list(reversed(range(len(params))))
    rev = sample_tokens(logits[order], [params[i] for i in order], [seeds[i] for i in order],
                        [positions[i] for i in order]).tolist()
    assert rev[::-1] == batched
    pair = sample_tokens(logits[[0, 3]], [params[0], params[3]], [seeds[0], seeds[3]], [positions[0], positions[3]])
    assert pair.tolist() == [batched[0], batched[3]]


def test_the_position_and_the_seed_change_the_draw():
    logits = torch.zeros(64, 1000)                       # uniform: every draw is the noise's argmax
    hot = [SamplingParams(temperature=1.0)] * 64
    by_position = sample_tokens(logits, hot, [7] * 64, list(range(64)))
    by_seed = sample_tokens(logits, hot, list(range(64)), [7] * 64)
    assert len(set(by_position.tolist())) > 50 and len(set(by_seed.tolist())) > 50


def old_filter(logits, temperature, top_k, top_p):
    """The one-row filter the course had before the batched one (top-k by torch.topk, top-p on a sort)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def test_batched_filter_keeps_what_the_one_row_filter_keeps():
    logits, params, _, _ = mixed_batch(num_rows=70, seed=1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    probs = sampling_probs(logits[rows], [params[i] for i in rows])
    for j, i in enumerate(rows):
        p = params[i]
        want = torch.softmax(old_filter(logits[i], p.temperature, p.top_k, p.top_p), dim=-1)
        assert torch.equal(probs[j] > 0, want > 0), f"row {i}: {p}"
        torch.testing.assert_close(probs[j], want)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_k=4),
                                    SamplingParams(temperature=1.3, top_p=0.8)], ids=["top_k=4", "top_p=0.8"])
def test_draws_have_the_filtered_distribution(params):
    """6,000 draws of one row of logits (6,000 seeds): frequencies against sampling_probs, nothing filtered out."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    n = 6000
    tokens = sample_tokens(logits.expand(n, -1), [params] * n, list(range(n)), [3] * n)
    want = sampling_probs(logits[None], [params])[0].double()
    counts = torch.bincount(tokens, minlength=6).double()
    assert float(counts[want == 0].sum()) == 0, "a token outside top-k / top-p was drawn"
    kept = want > 0
    stat = float(((counts[kept] - n * want[kept]) ** 2 / (n * want[kept])).sum())
    assert stat < chi_square_threshold(int(kept.sum()) - 1, SIGNIFICANCE)


class _ScalarReads(TorchDispatchMode):
    """Records every op that reads a tensor's value on the host (``.item()``, ``int()``, ``bool()``)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


def test_sample_tokens_reads_nothing_on_the_host(monkeypatch):
    logits, params, seeds, positions = mixed_batch()

    def refuse(self, *args):
        raise AssertionError("a host read inside sample_tokens")

    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    with _ScalarReads() as mode:
        tokens = sample_tokens(logits, params, seeds, positions)
    assert mode.reads == [] and tokens.shape == (len(params),)


# ---------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_noise_and_draws_on_the_gpu_equal_the_cpus():
    rng = random.Random(1)
    seeds = EDGE_SEEDS + [rng.randrange(2**63) for _ in range(58)]
    positions = EDGE_POSITIONS + [rng.randrange(2**32) for _ in range(58)]
    cpu, gpu = keys(seeds, positions), keys(seeds, positions, "cuda")
    assert torch.equal(noise_bits(*gpu, 32000).cpu(), noise_bits(*cpu, 32000))
    e_cpu, e_gpu = exponential_noise(*cpu, 32000), exponential_noise(*gpu, 32000).cpu()
    torch.testing.assert_close(e_gpu, e_cpu, rtol=1.2e-7, atol=0)        # log in float64: at most 1 ulp of float32
    assert float((e_gpu != e_cpu).double().mean()) < 1e-4
    logits, params, seeds, positions = mixed_batch(num_rows=64, vocab_size=32000)
    want = sample_tokens(logits, params, seeds, positions)
    logits = logits.cuda()                             # (a copy from pageable memory waits: before the mode)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")           # any wait for the GPU inside raises
    try:
        got = sample_tokens(logits, params, seeds, positions)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), want)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_async_engine_with_graphs_gives_the_eager_synchronous_engines_seeded_tokens():
    from dataclasses import replace

    from course_lib import load_tiny
    from course_lib.serving.engine import LLMEngine
    from test_engine import corpus_requests

    model, tok = load_tiny("target")
    prompts, params, _ = corpus_requests(model, tok)
    params = [replace(p, temperature=[0.0, 0.8, 1.0][i % 3], top_k=[None, 20][i % 2], seed=i)
              for i, p in enumerate(params)]
    def never_synchronously(chunks, logits):
        raise AssertionError("a step of the asynchronous engine drained and sampled on the host")

    outs = {}
    for overlap, eager in ((False, True), (True, False)):
        engine = LLMEngine(model, max_num_seqs=8, enforce_eager=eager, async_scheduling=overlap,
                           cudagraph_mode="FULL_DECODE_ONLY")   # the eager kernels replayed: equal tokens
        if overlap:
            engine._sample = never_synchronously
        outs[overlap] = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
        if not eager:
            (g,) = engine._graphs.values()
            assert g.num_replays > 0
    assert outs[True] == outs[False]
