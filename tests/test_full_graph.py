"""Mixed steps as one full CUDA graph each (course_lib.serving.full_graph): every chunk, decodes included, through
the paged prefill kernel over fixed shapes, padded buffers, and the engine's ``cudagraph_mode="FULL"``.

On a CPU ``FullMixedGraphs(eager=True)`` runs the same padded forward pass without capturing it: with the kernels'
plain-torch references, and once with the Triton kernels in the interpreter (the padding chunks, the fixed grid).
The GPU tests capture and replay, against the eager step."""
from __future__ import annotations

import pytest
import torch

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import load_tiny
from course_lib.device import HAS_GPU
from course_lib.serving.engine import LLMEngine
from course_lib.serving.full_graph import FullMixedGraphs
from course_lib.serving.kv_pool import QuantizedKVPool
from course_lib.serving.model_runner import ModelRunner
from test_cuda_graph import RecordedGraphs
from test_engine import assert_all_blocks_free, corpus_requests
from test_piecewise_graph import (_mixed_step, _model, check_the_steps_refused, mixed_step_matches_eager,
                                  replayed_step_matches_eager, serve_and_check)

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _graphs(model, pool, **kw) -> FullMixedGraphs:
    return FullMixedGraphs(model, pool, max_num_batched_tokens=kw.pop("tokens", 64), max_num_seqs=kw.pop("seqs", 8),
                           max_model_len=256, **kw)


@pytest.mark.parametrize("use_kernels", [False, True])       # True: the Triton kernels in the interpreter
@pytest.mark.parametrize("placeholders", [False, True])
@pytest.mark.parametrize("prompt_len, size", [(12, 32), (13, 48)])   # T = 32: a capture size; T = 33: one above
def test_full_mixed_step_gives_the_eager_steps_logits_and_kv(prompt_len, size, placeholders, use_kernels):
    if use_kernels and (placeholders or prompt_len == 13 or HAS_GPU):
        pytest.skip("the interpreter is slow: one case is enough for the kernel path (on a GPU: the tests below)")
    model = _model()
    chunks, bm, pool, prev = _mixed_step(model, prompt_len, placeholders=placeholders, use_kernels=use_kernels)
    T = sum(c.num_tokens for c in chunks)
    g = _graphs(model, pool, use_kernels=use_kernels, eager=True)
    g.block_tables.fill_(5)                                        # stale tables: only the real chunks' are read
    if use_kernels:   # two launches per layer as on a GPU: decodes (G = 2) in 8-row tiles, the rest in 32-row ones
        small, large = (dict(BLOCK_M=m, BLOCK_N=16) for m in (8, 32))
        g.passes = {n: [(small, (1, 4)), (large, (5, n))] for n in g.sizes}
    mixed_step_matches_eager(g, chunks, bm, pool, prev, use_kernels=use_kernels, tol=1e-4)
    # the chunks as one kernel sees them: decodes A and B (one query each), C's chunk, D's prompt, then padding
    assert g.cu_seqlens_q.tolist() == [0, 1, 2, 20, T] + [T] * 4
    assert g.seq_lens.tolist() == [11, 8, 30, prompt_len] + [0] * 4
    assert g.slot_mapping[T:size].eq(-1).all() and g.input_ids[T:size].eq(0).all()
    assert g.out[T:size].eq(0).all() and g.out[size:].eq(1.0).all()   # rows past the size: not this step's
    assert g.logits_indices.tolist() == [0, 1, 19, T - 1] + [0] * 4


def test_the_steps_full_mixed_graphs_refuse():
    model = _model()
    chunks, bm, pool, _ = _mixed_step(model, 12, placeholders=False)
    check_the_steps_refused(lambda tokens, seqs: _graphs(model, pool, tokens=tokens, seqs=seqs, use_kernels=False,
                                                         eager=True), chunks, bm, pool)
    g = _graphs(model, pool, use_kernels=False, eager=True)
    int8 = QuantizedKVPool(model.config, 16, 4, kv_cache_dtype="int8", device="cpu")   # no kernel reads its codes
    assert not _graphs(model, int8, use_kernels=False, eager=True).can_run(chunks)
    assert g.can_run(chunks)
    pool.use_paged_prefill = False                                 # the gather path asked for: stays eager
    assert not g.can_run(chunks)


def test_short_chunks_get_the_small_tiles_long_ones_the_large(monkeypatch):
    """The launches per capture size (``_passes``) with the GPU's configs: decodes and short verify chunks in
    16-row tiles, the rest in the tiles of one long chunk; one launch where both are the same."""
    import kernels.paged_prefill as pp
    from course_lib.serving.full_graph import _passes

    monkeypatch.setattr(pp, "INTERPRET", False)                     # the GPU's configs
    (short, lens_a), (long, lens_b) = _passes(2048, 2, 64, torch.bfloat16)
    assert short["BLOCK_M"] == 16 and lens_a == (1, 8) and long["BLOCK_M"] == 128 and lens_b == (9, 2048)
    assert [lens for _, lens in _passes(16, 4, 128, torch.bfloat16)] == [(1, 4), (5, 16)]
    assert _passes(16, 1, 64, torch.bfloat16) == [(pp.prefill_config(16, 1, 1, 64, torch.bfloat16), None)]   # MHA


def _full_engine(model, **kwargs) -> LLMEngine:
    """An engine whose mixed steps run ``FullMixedGraphs(eager=True)`` and whose decode steps run test_cuda_graph's
    CPU stand-in of the decode graphs: the GPU's path minus the graphs."""
    engine = LLMEngine(model, cudagraph_mode="FULL", **kwargs)
    c = engine.config
    engine._mixed = FullMixedGraphs(model, engine.pool, max_num_batched_tokens=c.max_num_batched_tokens,
                                    max_num_seqs=c.max_num_seqs, max_model_len=engine.max_model_len,
                                    use_kernels=False, eager=True)
    engine._mixed_graphs = lambda m, pool: engine._mixed
    graphs = RecordedGraphs(model, engine.pool, max_num_seqs=c.max_num_seqs, max_model_len=engine.max_model_len,
                            block_size=c.block_size, use_kernels=False)
    engine._decode_graphs = lambda m, pool: graphs
    return engine


@pytest.mark.parametrize("async_scheduling, prefix_caching", [(False, False), (True, False), (True, True)])
def test_engine_with_full_mixed_steps_gives_the_greedy_tokens(async_scheduling, prefix_caching):
    """Prompts of up to 40 tokens through a budget of 24 tokens per step: chunked prompts beside decodes."""
    model, tok = load_tiny("draft", dtype=torch.float32, device="cpu")   # 2 layers: fast on a CPU
    prompts, params, reference = corpus_requests(model, tok)
    engine = _full_engine(model, max_num_seqs=5, max_num_batched_tokens=24, num_blocks=256, block_size=4,
                          async_scheduling=async_scheduling, enable_prefix_caching=prefix_caching)
    serve_and_check(engine, prompts, params, reference, prefix_caching)   # (on a CPU, "FULL" captures nothing:
                                                                          # test_piecewise_graph, every mode)


# ---------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("placeholders", [False, True])
@pytest.mark.parametrize("prompt_len", [12, 13])
def test_replayed_full_mixed_step_gives_the_eager_steps_logits_without_a_sync(prompt_len, placeholders):
    """bf16, the Triton kernels, one graph per size captured and replayed: the eager step's logits (decodes through
    the prefill kernel: equal to rounding) and K/V; a replay waits for nothing."""
    g = replayed_step_matches_eager(_graphs, prompt_len, placeholders)
    assert sorted(g.graphs) == g.sizes


@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
def test_a_full_mixed_step_is_one_graph_launch_and_a_few_copies():
    from torch.profiler import ProfilerActivity, profile

    from course_lib.model.fused import fuse

    model = _model("cuda", torch.bfloat16)
    fuse(model)
    chunks, bm, pool, _ = _mixed_step(model, 12, placeholders=False, use_kernels=True)
    runner = ModelRunner(model, bm, pool, use_kernels=True, mixed=_graphs(model, pool))
    runner.execute(chunks)                                         # capture
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.execute(chunks)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert sum("GraphLaunch" in n for n in names) == 1
    assert sum("LaunchKernel" in n for n in names) <= 12, names    # the buffers' copies and fills only


@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_with_full_mixed_graphs_gives_the_eager_engines_greedy_tokens(async_scheduling):
    """float32 (exact fp32 dots): the decodes' other summation order cannot flip a greedy token here."""
    model, tok = load_tiny("target", dtype=torch.float32)
    prompts, params, _ = corpus_requests(model, tok)
    outs = {}
    for mode in ("NONE", "FULL"):
        engine = LLMEngine(model, max_num_seqs=8, max_num_batched_tokens=64, cudagraph_mode=mode,
                           async_scheduling=async_scheduling)
        outs[mode] = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
        assert_all_blocks_free(engine)
        if mode == "FULL":
            assert engine._mixed.num_steps > 0 and engine._mixed.graphs
    assert outs["NONE"] == outs["FULL"]
