"""Decode steps replayed as CUDA graphs (course_lib.serving.cuda_graph): the buckets, the persistent buffers and
their padding, and the engine's outputs with graphs equal to its outputs without.

On a CPU there are no CUDA graphs; the CPU tests replace "capture" by recording the very function the graph would
record (same buffers, same padding, same cache protocol) and "replay" by calling it, so that everything but the
driver's recording is exercised. On a GPU the real graphs run against ``enforce_eager=True``."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import load_tiny
from course_lib.device import HAS_GPU
from course_lib.model.sampling import SamplingParams
from course_lib.serving.cuda_graph import DecodeGraphs, batch_size_buckets
from course_lib.serving.engine import LLMEngine
from test_engine import assert_all_blocks_free, corpus_requests

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_buckets():
    assert batch_size_buckets(1) == [1]
    assert batch_size_buckets(5) == [1, 2, 4, 5]
    assert batch_size_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_size_buckets(100) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]


class _Replay:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


class RecordedGraphs(DecodeGraphs):
    """DecodeGraphs whose "graphs" call the recorded forward again: the CPU stand-in for CUDA graphs."""

    def capture(self) -> None:
        for b in self.buckets:
            self.graphs[b] = _Replay(lambda b=b: self._forward(b))


@pytest.mark.parametrize("max_num_seqs, async_scheduling", [(3, False), (5, False), (5, True)])
def test_engine_with_replayed_decode_steps_equals_the_engine_without(max_num_seqs, async_scheduling):
    """With async scheduling, each replay takes the previous step's tokens from its sampled ids on the device."""
    model, tok = load_tiny("draft", dtype=torch.float32, device="cpu")   # 2 layers: fast on a CPU
    prompts, params, reference = corpus_requests(model, tok)
    engine = LLMEngine(model, max_num_seqs=max_num_seqs, num_blocks=64, block_size=4,
                       async_scheduling=async_scheduling)
    graphs = {}

    def recorded(m, pool):
        if id(m) not in graphs:
            graphs[id(m)] = RecordedGraphs(m, pool, max_num_seqs=max_num_seqs, max_model_len=engine.max_model_len,
                                           block_size=engine.block_size, use_kernels=False)
        return graphs[id(m)]

    engine._decode_graphs = recorded
    outputs = engine.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    (g,) = graphs.values()
    assert g.num_replays > 0 and set(g.graphs) == set(batch_size_buckets(max_num_seqs))
    assert_all_blocks_free(engine)


def test_padding_rows_write_nothing_and_read_nothing():
    model, _ = load_tiny("draft", dtype=torch.float32, device="cpu")
    engine = LLMEngine(model, max_num_seqs=4, num_blocks=16, block_size=4)
    g = RecordedGraphs(model, engine.pool, max_num_seqs=4, max_model_len=engine.max_model_len, block_size=4,
                       use_kernels=False)
    before = [t.clone() for t in engine.pool.k_caches]
    g.capture()
    g.graphs[4].replay()   # every row is padding: slot -1, context 0
    assert all(torch.equal(a, b) for a, b in zip(before, engine.pool.k_caches))


@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_cuda_graphs_give_the_eager_engines_greedy_tokens(kv_cache_dtype):
    model, tok = load_tiny("target")
    prompts, params, _ = corpus_requests(model, tok)
    outs = {}
    for eager in (True, False):
        # decode graphs replay the eager step's very kernels: equal tokens (cudagraph_mode="FULL" sums the decodes
        # of mixed steps in another order: test_full_graph compares it in float32)
        engine = LLMEngine(model, max_num_seqs=8, enforce_eager=eager, kv_cache_dtype=kv_cache_dtype,
                           cudagraph_mode="FULL_DECODE_ONLY")
        outs[eager] = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
        if not eager:
            (g,) = engine._graphs.values()
            assert g.num_replays > 0
    assert outs[True] == outs[False]


@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graphs_with_speculative_decoding():
    target, tok = load_tiny("target")
    draft, _ = load_tiny("draft")
    prompts, params, _ = corpus_requests(target, tok)
    outs = {}
    for eager in (True, False):
        engine = LLMEngine(target, max_num_seqs=8, enforce_eager=eager, speculative_model=draft,
                           num_speculative_tokens=3)
        outs[eager] = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    assert outs[True] == outs[False]


@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
def test_seeded_sampling_is_the_same_with_graphs():
    model, tok = load_tiny("target")
    prompts, _, _ = corpus_requests(model, tok)
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=12)
    outs = [[o.outputs[0].token_ids
             for o in LLMEngine(model, max_num_seqs=8, enforce_eager=e,
                                cudagraph_mode="FULL_DECODE_ONLY").generate(prompts, params)]
            for e in (True, False)]
    assert outs[0] == outs[1]


@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_async_scheduling_gives_the_synchronous_engines_tokens_on_a_gpu(enforce_eager):
    """The launched steps overlap the host for real here: replayed graphs (and eager steps) read their input ids
    from the previous step's sampled ids, a stop token is found one step late."""
    model, tok = load_tiny("target")
    prompts, params, _ = corpus_requests(model, tok)
    stop = [replace(p, stop_token_ids=(tok.encode(" ")[0],)) for p in params]
    for trace in (params, stop):
        outs = {}
        for overlap in (False, True):
            engine = LLMEngine(model, max_num_seqs=8, enforce_eager=enforce_eager, async_scheduling=overlap)
            outs[overlap] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason)
                             for o in engine.generate(prompts, trace)]
            assert_all_blocks_free(engine)
            if not enforce_eager:
                (g,) = engine._graphs.values()
                assert g.num_replays > 0
        assert outs[True] == outs[False]
