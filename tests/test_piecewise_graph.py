"""Mixed steps through piecewise CUDA graphs (course_lib.serving.piecewise_graph): the capture sizes, the padded
static buffers, the logits rows, the placeholder patching and the attention between the pieces, and the engine's
``cudagraph_mode``.

On a CPU there are no CUDA graphs: ``PiecewiseGraphs(eager=True)`` runs the same forward pass over the same padded
buffers with the same attention between the pieces, without capturing them; only the capture and the replay of the
segments are left to the GPU tests (skipped here), which compare the replayed steps against the eager ones."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import load_tiny
from course_lib.device import HAS_GPU
from course_lib.model.config import ModelConfig
from course_lib.model.llama import Llama
from course_lib.paging.block_manager import BlockManager
from course_lib.serving.async_scheduling import PLACEHOLDER, InflightStep
from course_lib.serving.config import EngineConfig
from course_lib.serving.engine import LLMEngine
from course_lib.serving.kv_pool import KVPool
from course_lib.serving.model_runner import ModelRunner
from course_lib.serving.piecewise_graph import PiecewiseGraphs, capture_sizes
from course_lib.serving.sequence import ScheduledChunk, Sequence
from course_lib.serving.spec_decode import VerifyChunk
from test_cuda_graph import RecordedGraphs
from test_engine import assert_all_blocks_free, corpus_requests

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_capture_sizes():
    assert capture_sizes(2048) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert capture_sizes(64) == [16, 24, 32, 48, 64]
    assert capture_sizes(100) == [16, 24, 32, 48, 64, 96, 100]     # the budget itself is the last size
    assert capture_sizes(20) == [16, 20] and capture_sizes(8) == [8]
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        capture_sizes(0)


def _model(device="cpu", dtype=torch.float32) -> Llama:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Llama(config).to(device=device, dtype=dtype).eval()


def _mixed_step(model, prompt_len: int, *, placeholders: bool, use_kernels: bool = False, P: int = 4):
    """A first (eager) step fills the pool: two whole prompts (A, B) and the first 12 tokens of a 30-token prompt
    (C). Then a mixed step: A and B decode, C's second chunk (over its 12 cached tokens), a new prompt D of
    ``prompt_len`` tokens: T = 20 + prompt_len. With ``placeholders``, A's and B's sampled tokens are still on the
    device (asynchronous scheduling): returns the InflightStep the mixed step patches them from."""
    V, device = model.config.vocab_size, model.device
    bm = BlockManager(64, P)
    pool = KVPool(model.config, 64, P, dtype=model.dtype, device=device)
    lengths = (10, 7, 30, prompt_len)
    seqs = [Sequence(i, i, [(5 * i + 3 * j + 1) % V for j in range(n)]) for i, n in enumerate(lengths)]
    first = [ScheduledChunk(seqs[0], 0, 10), ScheduledChunk(seqs[1], 0, 7), ScheduledChunk(seqs[2], 0, 12)]
    for c in first:
        bm.allocate(c.seq.seq_id, c.num_tokens)
    logits = ModelRunner(model, bm, pool, use_kernels).execute(first)
    prev = None
    if placeholders:
        prev = InflightStep(first, logits)            # A's and B's tokens: sampled on the device, not read back
        for seq in seqs[:2]:
            seq.output_token_ids.append(PLACEHOLDER)
        prev.mark_placeholders()
    else:
        for seq, token in zip(seqs[:2], logits.argmax(-1).tolist()):
            seq.output_token_ids.append(token)
    bm.append_slots(0)
    bm.append_slots(1)
    bm.append_slots(2, 18)
    bm.allocate(3, prompt_len)
    chunks = [ScheduledChunk(seqs[0], 10, 1), ScheduledChunk(seqs[1], 7, 1), ScheduledChunk(seqs[2], 12, 18),
              ScheduledChunk(seqs[3], 0, prompt_len)]
    return chunks, bm, pool, prev


@pytest.mark.parametrize("placeholders", [False, True])
@pytest.mark.parametrize("prompt_len, size", [(12, 32), (13, 48)])   # T = 32: a capture size; T = 33: one above
def test_piecewise_step_gives_the_eager_steps_logits_and_kv(prompt_len, size, placeholders):
    model = _model()
    chunks, bm, pool, prev = _mixed_step(model, prompt_len, placeholders=placeholders)
    T = sum(c.num_tokens for c in chunks)
    g = PiecewiseGraphs(model, pool, max_num_batched_tokens=64, max_num_seqs=8, eager=True)
    mixed_step_matches_eager(g, chunks, bm, pool, prev, use_kernels=False, tol=1e-5)
    # the padding: token 0 at position 0 from row T to the capture size, zero attention output there
    assert g.input_ids[T:size].eq(0).all() and g.positions[T:size].eq(0).all()
    assert g.out[T:size].eq(0).all() and g.out[size:].eq(1.0).all()   # rows past the size: not this step's
    expected_ids = [t for c in chunks for t in c.seq.token_ids[c.start:c.start + c.num_tokens]]
    if placeholders:                                               # patched on the device from the sampled ids
        expected_ids[:2] = prev.tokens.tolist()
    assert g.input_ids[:T].tolist() == expected_ids
    assert g.logits_indices.tolist() == [0, 1, 19, T - 1] + [0] * 4


def mixed_step_matches_eager(g, chunks, bm, pool, prev, *, use_kernels: bool, tol: float) -> None:
    """The step run eagerly, the cache restored, the step again through ``g`` (eager mode, its buffers stale from an
    earlier, longer step): the same logits, the same K/V stored (the real tokens' and nothing else)."""
    model = g.model
    before = [t.clone() for t in pool.k_caches + pool.v_caches]
    eager = ModelRunner(model, bm, pool, use_kernels=use_kernels).execute(chunks, prev)
    after_eager = [t.clone() for t in pool.k_caches + pool.v_caches]
    for t, b in zip(pool.k_caches + pool.v_caches, before):        # the same step again, from the same cache
        t.copy_(b)
    g.input_ids.fill_(7)
    g.out.fill_(1.0)                                               # stale rows of an earlier, longer step
    assert g.can_run(chunks) and g.sizes == [16, 24, 32, 48, 64]
    got = ModelRunner(model, bm, pool, use_kernels=use_kernels, mixed=g).execute(chunks, prev)
    assert got.shape == eager.shape == (4, model.config.vocab_size) and g.num_steps == 1
    torch.testing.assert_close(got, eager, rtol=tol, atol=tol)
    for a, b in zip(pool.k_caches + pool.v_caches, after_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_step_without_sampling_rows_and_the_steps_it_refuses():
    model = _model()
    chunks, bm, pool, _ = _mixed_step(model, 12, placeholders=False)
    make = lambda tokens, seqs: PiecewiseGraphs(model, pool, max_num_batched_tokens=tokens, max_num_seqs=seqs,
                                                eager=True)
    check_the_steps_refused(make, chunks, bm, pool)


def check_the_steps_refused(make_graphs, chunks, bm, pool) -> None:
    """What mixed graphs (``make_graphs(tokens, seqs)``, in eager mode) run and refuse: a step without logits rows
    runs; more tokens than the largest size, a speculative verify chunk, more chunks than ``max_num_seqs`` do not."""
    g = make_graphs(40, 8)
    mid_prompt = [ScheduledChunk(chunks[2].seq, 12, 10)]           # C's tokens 12-21 of 30: no logits row
    assert g.can_run(mid_prompt)
    assert ModelRunner(g.model, bm, pool, use_kernels=False, mixed=g).execute(mid_prompt).shape == (0, 96)
    assert g.can_run(chunks) and not g.can_run(chunks + [ScheduledChunk(chunks[3].seq, 0, 12)])   # 44 > 40 tokens
    verify = VerifyChunk(chunks[0].seq, 10, 1, num_lookahead=3, num_drafts=3)   # 4 logits rows: stays eager
    assert not g.can_run([verify] + chunks[1:])
    assert not make_graphs(64, 3).can_run(chunks)                  # 4 chunks, 3 logits rows at most


def _piecewise_engine(model, recorded_decode_graphs: bool, **kwargs) -> LLMEngine:
    """An engine whose mixed steps run ``PiecewiseGraphs(eager=True)`` (and, with ``recorded_decode_graphs``, whose
    decode steps run test_cuda_graph's CPU stand-in of the decode graphs): the GPU's path minus the graphs."""
    engine = LLMEngine(model, cudagraph_mode="FULL_AND_PIECEWISE", **kwargs)
    c = engine.config
    engine._mixed = PiecewiseGraphs(model, engine.pool, max_num_batched_tokens=c.max_num_batched_tokens,
                                        max_num_seqs=c.max_num_seqs, eager=True)
    engine._mixed_graphs = lambda m, pool: engine._mixed
    if recorded_decode_graphs:
        graphs = RecordedGraphs(model, engine.pool, max_num_seqs=c.max_num_seqs, max_model_len=engine.max_model_len,
                                block_size=c.block_size, use_kernels=False)
        engine._decode_graphs = lambda m, pool: graphs
    return engine


@pytest.mark.parametrize("async_scheduling, prefix_caching, decode_graphs",
                         [(False, False, False), (True, False, True), (True, True, True), (False, True, False)])
def test_engine_with_piecewise_steps_gives_the_greedy_tokens(async_scheduling, prefix_caching, decode_graphs):
    """Prompts of up to 40 tokens through a budget of 24 tokens per step: chunked prompts beside decodes. With
    prefix caching the second generate call finds every prompt's full blocks cached."""
    model, tok = load_tiny("draft", dtype=torch.float32, device="cpu")   # 2 layers: fast on a CPU
    prompts, params, reference = corpus_requests(model, tok)
    engine = _piecewise_engine(model, decode_graphs, max_num_seqs=5, max_num_batched_tokens=24, num_blocks=256,
                               block_size=4, async_scheduling=async_scheduling, enable_prefix_caching=prefix_caching)
    serve_and_check(engine, prompts, params, reference, prefix_caching)


def serve_and_check(engine, prompts, params, reference, prefix_caching: bool) -> None:
    """The trace served (twice with prefix caching): the reference's greedy tokens, mixed steps through the engine's
    mixed graphs, and either cached prefixes found or every block given back."""
    for _ in range(2 if prefix_caching else 1):
        outputs = engine.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in outputs] == reference
    assert engine._mixed.num_steps > 0
    if prefix_caching:   # the second call's prompt chunks start after their cached blocks
        assert engine.metrics.num_cached_tokens > 0
    else:
        assert_all_blocks_free(engine)


def test_cudagraph_mode_on_a_cpu_captures_nothing_and_changes_no_token():
    model, tok = load_tiny("draft", dtype=torch.float32, device="cpu")
    prompts, params, reference = corpus_requests(model, tok)
    for mode in ("NONE", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE", "FULL"):
        engine = LLMEngine(model, cudagraph_mode=mode, max_num_seqs=5, max_num_batched_tokens=24, num_blocks=64,
                           block_size=4)
        assert [o.outputs[0].token_ids for o in engine.generate(prompts, params)] == reference
        assert engine._runner.graphs is None and engine._runner.mixed is None and engine.cudagraph_mode == mode
    assert EngineConfig().cudagraph_mode == "FULL"


@pytest.mark.parametrize("mode", ["PIECEWISE", "full_and_piecewise", None, 2])
def test_a_bad_cudagraph_mode_is_refused_naming_the_field(mode):
    model = _model()
    with pytest.raises(ValueError, match="cudagraph_mode must be one of"):
        LLMEngine(model, cudagraph_mode=mode)


# ---------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("placeholders", [False, True])
@pytest.mark.parametrize("prompt_len, size", [(12, 32), (13, 48)])
def test_replayed_piecewise_step_gives_the_eager_steps_logits_without_a_sync(prompt_len, size, placeholders):
    """bf16, the Triton kernels, the segments captured and replayed: the eager step's logits and K/V; a replay
    waits for nothing (the capture, at the first run, synchronizes: it is outside the check)."""
    g = replayed_step_matches_eager(lambda model, pool: PiecewiseGraphs(model, pool, max_num_batched_tokens=64,
                                                                        max_num_seqs=8), prompt_len, placeholders)
    layers = g.model.config.num_hidden_layers
    assert sorted(g.graphs) == g.sizes and all(len(s) == layers + 1 for s in g.graphs.values())


def replayed_step_matches_eager(make_graphs, prompt_len: int, placeholders: bool):
    """bf16 on a GPU: the mixed step through ``make_graphs(model, pool)`` (captured at its first run, replayed at its
    second) gives the eager step's logits and K/V, and its replay waits for nothing. Returns the graphs."""
    from course_lib.model.fused import fuse

    model = _model("cuda", torch.bfloat16)
    fuse(model)
    chunks, bm, pool, prev = _mixed_step(model, prompt_len, placeholders=placeholders, use_kernels=True)
    before = [t.clone() for t in pool.k_caches + pool.v_caches]
    eager = ModelRunner(model, bm, pool, use_kernels=True).execute(chunks, prev)
    after_eager = [t.clone() for t in pool.k_caches + pool.v_caches]
    g = make_graphs(model, pool)
    runner = ModelRunner(model, bm, pool, use_kernels=True, mixed=g)
    runner.execute(chunks, prev)                                   # captures every size
    for t, b in zip(pool.k_caches + pool.v_caches, before):
        t.copy_(b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")                        # any wait for the GPU inside raises
    try:
        got = runner.execute(chunks, prev)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got, eager, rtol=2e-2, atol=2e-2)   # bf16: padded GEMMs may sum in another order
    for a, b in zip(pool.k_caches + pool.v_caches, after_eager):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    return g


@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
def test_a_piecewise_step_launches_far_fewer_kernels_than_the_eager_step():
    """Launches counted on the host (the CUDA runtime's kernel and graph launch calls): the kernels inside a
    replayed graph are not launched one by one (a profiler still lists them as kernels on the device)."""
    from torch.profiler import ProfilerActivity, profile

    from course_lib.model.fused import fuse

    model = _model("cuda", torch.bfloat16)
    fuse(model)
    chunks, bm, pool, _ = _mixed_step(model, 12, placeholders=False, use_kernels=True)
    g = PiecewiseGraphs(model, pool, max_num_batched_tokens=64, max_num_seqs=8)
    runners = {"eager": ModelRunner(model, bm, pool, use_kernels=True),
               "piecewise": ModelRunner(model, bm, pool, use_kernels=True, mixed=g)}
    launches = {}
    for name, runner in runners.items():
        runner.execute(chunks)                                     # warm-up (and capture)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner.execute(chunks)
            torch.cuda.synchronize()
        launches[name] = sum(1 for e in prof.events() if "LaunchKernel" in e.name or "GraphLaunch" in e.name)
    assert 0 < launches["piecewise"] < launches["eager"] / 2, launches


@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_with_piecewise_graphs_gives_the_eager_engines_greedy_tokens(async_scheduling):
    model, tok = load_tiny("target")
    prompts, params, _ = corpus_requests(model, tok)
    stop = [replace(p, stop_token_ids=(tok.encode(" ")[0],)) for p in params]
    for trace in (params, stop):
        outs = {}
        for mode in ("NONE", "FULL_AND_PIECEWISE"):
            engine = LLMEngine(model, max_num_seqs=8, max_num_batched_tokens=64, cudagraph_mode=mode,
                               async_scheduling=async_scheduling)
            outs[mode] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason)
                          for o in engine.generate(prompts, trace)]
            assert_all_blocks_free(engine)
            if mode != "NONE":
                assert engine._mixed.num_steps > 0 and engine._mixed.graphs
                (g,) = engine._graphs.values()
                assert g.num_replays > 0
        assert outs["NONE"] == outs["FULL_AND_PIECEWISE"]
