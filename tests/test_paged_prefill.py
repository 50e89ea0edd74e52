"""kernels.paged_prefill_attention vs its plain-torch reference (interpreter at tiny shapes on CPU; compiled, also
at real shapes, on a GPU), its ValueErrors, the engine running it (use_kernels=True on the CPU too), and a smoke
run of benchmarks/paged_prefill.py."""
from __future__ import annotations

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import pytest
import torch

import kernels
import kernels.reference as ref
from course_lib.device import DEVICE, HAS_GPU, INTERPRET, kernel_dtypes
from kernels.paged_prefill import paged_prefill_attention_unchecked, prefill_config

#: Tolerances of the kernel vs the fp32 reference (rounded to the dtype): the kernel rounds P to the input dtype
#: before P @ V, the reference keeps it in fp32.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=1.5e-2)}
POISON = 1e4   # what the cache holds wherever the kernel must not read: slots past a sequence's length, spare blocks


def make_prefill(chunks, Hq, Hkv, D, P, dtype, *, seed=0, scale=1.0, device=DEVICE):
    """Inputs of one step: ``chunks`` = [(query tokens n, cached prefix), ...]. Each sequence's blocks are
    scattered at random over the cache, tables are wider than needed, and every slot the kernel must not read
    (past a sequence's length, in a block no table uses) holds POISON. Made on ``device`` (fast at GPU sizes)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lens = [n + prefix for n, prefix in chunks]
    max_blocks = max(-(-L // P) for L in lens) + 1                     # one unused column: padding the kernel skips
    N = len(chunks) * max_blocks + 2
    k_cache = torch.full((N, P, Hkv, D), POISON, device=device)
    v_cache = torch.full((N, P, Hkv, D), POISON, device=device)
    tables = torch.randperm(N, generator=gen, device=device)[: len(chunks) * max_blocks].view(len(chunks), max_blocks)
    for s, L in enumerate(lens):
        slots = (tables[s, : -(-L // P), None] * P + torch.arange(P, device=device)).flatten()[:L]   # tokens 0 ... L-1
        k_cache.view(-1, Hkv, D)[slots] = torch.randn(L, Hkv, D, generator=gen, device=device) * scale
        v_cache.view(-1, Hkv, D)[slots] = torch.randn(L, Hkv, D, generator=gen, device=device)
    q = torch.randn(sum(n for n, _ in chunks), Hq, D, generator=gen, device=device) * scale
    cu = torch.tensor([0] + [n for n, _ in chunks], device=device).cumsum(0).to(torch.int32)
    return (q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), tables.to(torch.int32), cu,
            torch.tensor(lens, dtype=torch.int32, device=device))


# (query tokens, cached prefix) per sequence, all in one launch: a 1-token chunk, a whole prompt, chunks over
# prefixes that are and are not block multiples, chunks longer than a tile.
MIX = [(1, 0), (40, 0), (7, 50), (17, 13), (1, 33), (33, 7), (2, 16)]


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("P, Hq, Hkv, D", [(4, 4, 2, 16), (8, 4, 1, 32), (16, 4, 2, 32), (16, 4, 1, 16),
                                            (8, 2, 2, 32)])   # G = 2, 4, 2, 4, 1 (MHA)
def test_matches_reference(dtype, P, Hq, Hkv, D):
    args = make_prefill(MIX, Hq, Hkv, D, P, dtype, seed=P + Hq * Hkv + D)
    got = kernels.paged_prefill_attention(*args)
    assert got.shape == args[0].shape and got.dtype == dtype
    torch.testing.assert_close(got, ref.paged_prefill_attention(*args), **TOL[dtype])


@pytest.mark.parametrize("chunks", [[(1, 0)], [(5, 0)], [(3, 60)], [(40, 1), (1, 1)], [(16, 16), (16, 0)]])
def test_single_and_few_sequences(chunks):
    args = make_prefill(chunks, 4, 2, 32, 8, torch.float32, seed=len(chunks))
    torch.testing.assert_close(kernels.paged_prefill_attention(*args), ref.paged_prefill_attention(*args),
                               **TOL[torch.float32])


def test_group_not_a_power_of_two_head_dim_24_and_sm_scale_with_large_logits():
    """G = 3 (tile rows that no token fills), D = 24 (padded to 32), scores up to ~±1000 (a softmax without its
    running max would overflow), and an explicit sm_scale."""
    dtype = kernel_dtypes()[0]
    args = make_prefill([(9, 4), (20, 30), (1, 0)], 6, 2, 24, 8, dtype, seed=3, scale=6.0)
    got = kernels.paged_prefill_attention(*args, sm_scale=0.7)
    assert torch.isfinite(got).all()
    # scores of ~500 carry an fp32 rounding error of ~3e-5 each (relative, after exp): 10x the usual fp32 tolerance
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(got, ref.paged_prefill_attention(*args, sm_scale=0.7), **tol)


# Tile shapes beyond the default: BLOCK_N > BLOCK_M, one-token tiles (BLOCK_M = G), tiles of 64 rows.
OTHER_CONFIGS = [dict(BLOCK_M=16, BLOCK_N=32), dict(BLOCK_M=4, BLOCK_N=16), dict(BLOCK_M=64, BLOCK_N=16)]


@pytest.mark.parametrize("config", OTHER_CONFIGS)
def test_other_tile_shapes(config):
    if not INTERPRET:
        config = dict(config, BLOCK_M=max(16, config["BLOCK_M"]), num_warps=4, num_stages=2)
    dtype = kernel_dtypes()[0]
    args = make_prefill([(1, 0), (19, 0), (7, 50), (12, 13)], 4, 1, 16, 8, dtype, seed=4)
    got = paged_prefill_attention_unchecked(*args, config=config)
    torch.testing.assert_close(got, ref.paged_prefill_attention(*args), **TOL[dtype])


def test_one_launch_equals_one_launch_per_chunk():
    """A chunk's tiles start at its own first token wherever it sits in q: the same arithmetic, the same bits."""
    chunks = [(9, 3), (21, 0), (4, 17)]
    q, k_cache, v_cache, tables, cu, lens = make_prefill(chunks, 4, 2, 16, 4, kernel_dtypes()[0], seed=5)
    config = prefill_config(q.shape[0], len(chunks), 2, 16, q.dtype)                 # one tile shape for every call
    together = paged_prefill_attention_unchecked(q, k_cache, v_cache, tables, cu, lens, config=config)
    for s in range(len(chunks)):
        a, b = int(cu[s]), int(cu[s + 1])
        alone = paged_prefill_attention_unchecked(q[a:b], k_cache, v_cache, tables[s:s + 1], _i32([0, b - a]),
                                                  lens[s:s + 1], config=config)
        assert torch.equal(alone, together[a:b])


def test_two_launches_split_by_chunk_length_make_the_one_launch():
    """``chunk_lens``: the short chunks in one launch with small tiles, the long ones in another with large tiles
    (the full mixed graphs' two passes) give the reference; each launch leaves the other's rows as they were, and
    padding chunks (no query) and padding rows (in no chunk) are never written."""
    dtype = kernel_dtypes()[0]
    q, k_cache, v_cache, tables, cu, lens = make_prefill([(1, 9), (1, 30), (3, 4), (21, 0), (9, 17)], 4, 2, 16, 4,
                                                         dtype, seed=9)
    T = q.shape[0]
    q = torch.cat([q, torch.randn(5, 4, 16, device=DEVICE).to(dtype)])           # 5 padding rows
    cu, lens = torch.cat([cu, _i32([T] * 3)]), torch.cat([lens, _i32([0] * 3)])     # 3 padding chunks
    tables = torch.cat([tables, tables[:3]])
    small, large = (dict(BLOCK_M=m, BLOCK_N=16 if INTERPRET else 64, num_warps=4, num_stages=2)
                    for m in ((8, 32) if INTERPRET else (16, 64)))
    short_max = small["BLOCK_M"] // 2                                             # G = 2: tokens per small tile
    out = torch.full_like(q, 7.0)
    paged_prefill_attention_unchecked(q, k_cache, v_cache, tables, cu, lens, out=out, config=small,
                                      chunk_lens=(1, short_max))
    assert torch.equal(out[5:], torch.full_like(out[5:], 7.0))                     # long chunks: not this launch's
    paged_prefill_attention_unchecked(q, k_cache, v_cache, tables, cu, lens, out=out, config=large,
                                      chunk_lens=(short_max + 1, q.shape[0]))
    want = ref.paged_prefill_attention(q[:T], k_cache, v_cache, tables[:5], cu[:6], lens[:5])
    torch.testing.assert_close(out[:T], want, **TOL[dtype])
    assert torch.equal(out[T:], torch.full_like(out[T:], 7.0))                     # padding rows: never written


def test_a_key_is_seen_only_by_the_queries_after_it():
    """Changing the last key of a sequence changes only its chunk's last query (causal), nothing of the others."""
    dtype = kernel_dtypes()[0]
    q, k_cache, v_cache, tables, cu, lens = make_prefill([(6, 10), (12, 3)], 4, 2, 16, 4, dtype, seed=6)
    out = kernels.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens)
    L = int(lens[1])
    block, row = int(tables[1, (L - 1) // 4]), (L - 1) % 4
    k2, v2 = k_cache.clone(), v_cache.clone()
    k2[block, row], v2[block, row] = 3.0, 100.0
    out2 = kernels.paged_prefill_attention(q, k2, v2, tables, cu, lens)
    assert torch.equal(out2[:-1], out[:-1]) and not torch.allclose(out2[-1], out[-1])


def test_strided_q_and_out_in_place_as_the_engine_passes_them():
    """The engine passes q as a [1, Hq, T, D] view transposed to [Tp, Hq, D] and writes into a view of its output."""
    dtype = kernel_dtypes()[0]
    q, k_cache, v_cache, tables, cu, lens = make_prefill([(5, 2), (9, 0)], 4, 2, 16, 4, dtype, seed=7)
    T = q.shape[0]
    q_step = torch.randn(1, 4, T + 3, 16, device=DEVICE).to(dtype)      # 3 decode rows first, then the chunks
    q_step[0, :, 3:] = q.transpose(0, 1)
    out_step = torch.zeros_like(q_step)
    got = paged_prefill_attention_unchecked(q_step[0, :, 3:].transpose(0, 1), k_cache, v_cache, tables, cu, lens,
                                            out=out_step[0, :, 3:].transpose(0, 1))
    assert got.data_ptr() == out_step[0, :, 3:].data_ptr()
    assert torch.equal(out_step[0, :, :3], torch.zeros_like(out_step[0, :, :3]))     # the decode rows: untouched
    want = ref.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens)
    torch.testing.assert_close(out_step[0, :, 3:].transpose(0, 1), want, **TOL[dtype])


def test_empty_step_and_empty_chunks():
    q, k_cache, v_cache, tables, cu, lens = make_prefill([(3, 5)], 4, 2, 16, 4, torch.float32)
    empty = kernels.paged_prefill_attention(q[:0], k_cache, v_cache, tables[:0], cu[:1], lens[:0])
    assert empty.shape == (0, 4, 16)
    # a sequence with no query tokens in the step (cu_seqlens_q repeats a value) reads nothing
    cu3 = torch.tensor([0, 0, 3, 3], dtype=torch.int32, device=DEVICE)
    tables3, lens3 = tables.repeat(3, 1), torch.tensor([2, 8, 0], dtype=torch.int32, device=DEVICE)
    got = kernels.paged_prefill_attention(q, k_cache, v_cache, tables3, cu3, lens3)
    torch.testing.assert_close(got, ref.paged_prefill_attention(q, k_cache, v_cache, tables3, cu3, lens3),
                               **TOL[torch.float32])


def test_prefill_config_fits_the_chunks():
    if INTERPRET:
        assert prefill_config(100, 2, 4, 32)["BLOCK_M"] == 32 and prefill_config(10, 1, 64, 32)["BLOCK_M"] == 64
        return
    assert prefill_config(2048, 1, 4, 128)["BLOCK_M"] == 128          # a long prompt: big tiles
    assert prefill_config(64 * 4, 64, 4, 128)["BLOCK_M"] == 16        # speculative verify chunks of 4 tokens, G = 4
    assert prefill_config(4096, 8, 4, 256)["BLOCK_M"] == 64           # D = 256: smaller tiles
    assert prefill_config(4096, 8, 4, 256, torch.float32)["BLOCK_M"] == 32


# ---------------------------------------------------------------- validation
def _args(**changes):
    q, k_cache, v_cache, tables, cu, lens = make_prefill([(3, 5), (4, 0)], 4, 2, 16, 4, torch.float32)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, cu_seqlens_q=cu, seq_lens=lens)
    for name, fn in changes.items():
        args[name] = fn(args[name]) if callable(fn) else fn
    return args


def _i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("args, kwargs, match", [
    (_args(q=lambda t: t[None]), {}, r"q has shape \(1, 7, 4, 16\); expected \[T, Hq, D\]"),
    (_args(k_cache=lambda t: t[0]), {}, r"k_cache has shape \(4, 2, 16\); expected \[num_blocks, block_size, Hkv, D\]"),
    (_args(v_cache=lambda t: t[:, :2]), {}, "v_cache has shape .* expected the shape of k_cache"),
    (_args(q=lambda t: t[..., :8].contiguous()), {}, "k_cache has head_dim 16 .* expected q's head_dim D=8"),
    (_args(q=lambda t: t[:, :3]), {}, "q has 3 heads, not a multiple of k_cache's 2 kv heads"),
    (_args(q=lambda t: t.double(), k_cache=lambda t: t.double(), v_cache=lambda t: t.double()), {},
     "q has dtype torch.float64"),
    (_args(v_cache=lambda t: t.half()), {}, "v_cache has dtype torch.float16; expected the dtype of q"),
    (_args(q=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)), {}, "q must be contiguous in its last"),
    (_args(block_tables=lambda t: t.long()), {}, "block_tables has dtype torch.int64; expected torch.int32"),
    (_args(block_tables=lambda t: t[0]), {}, r"block_tables has shape \(3,\); expected \[num_seqs, max_blocks\]"),
    (_args(cu_seqlens_q=lambda t: t[1:]), {}, r"cu_seqlens_q has shape \(2,\); expected \[num_seqs \+ 1 = 3\]"),
    (_args(cu_seqlens_q=lambda t: t.long()), {}, "cu_seqlens_q has dtype torch.int64"),
    (_args(seq_lens=lambda t: t.float()), {}, "seq_lens has dtype torch.float32; expected torch.int32"),
    (_args(seq_lens=lambda t: t[:1]), {}, r"seq_lens has shape \(1,\); expected \[num_seqs = 2\]"),
    (_args(cu_seqlens_q=_i32([0, 3, 6])), {}, "cu_seqlens_q runs from 0 to 6; expected from 0 to T = 7"),
    (_args(cu_seqlens_q=_i32([1, 3, 7])), {}, "cu_seqlens_q runs from 1 to 7; expected from 0"),
    (_args(cu_seqlens_q=_i32([0, 8, 7]), seq_lens=_i32([9, 4])), {}, "cu_seqlens_q must be non-decreasing"),
    (_args(seq_lens=_i32([8, 3])), {}, r"seq_lens\[1\] = 3 is shorter than sequence 1's chunk of 4 query tokens"),
    (_args(seq_lens=_i32([8, 13])), {}, r"seq_lens\[1\] = 13 tokens is longer than block_tables can address: "
                                        r"3 blocks x block_size 4 = 12 tokens"),
    (_args(block_tables=lambda t: torch.where(torch.arange(3, device=t.device) == 1, 99, t).int()), {},
     r"block_tables\[0, 1\] = 99 is not a block of the cache: expected 0 <= id < num_blocks = 8"),
    (_args(block_tables=lambda t: torch.where(torch.arange(3, device=t.device) == 0, -1, t).int()), {},
     r"block_tables\[0, 0\] = -1 is not a block"),
    (_args(), {"sm_scale": 0.0}, "sm_scale must be a positive finite number"),
    (_args(seq_lens=lambda t: t.to("meta")), {}, "seq_lens is on meta"),
    (_args(block_tables=lambda t: t.tolist()), {}, "block_tables must be a torch.Tensor"),
])
def test_rejects_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernels.paged_prefill_attention(**args, **kwargs)


def test_unused_table_entries_are_not_checked():
    """Only the blocks that hold a sequence's seq_lens tokens must be valid: the padding of a table may be anything."""
    args = _args()
    args["block_tables"][:, -1] = -7                       # 3 columns, the sequences use at most 2
    kernels.paged_prefill_attention(**args)


@pytest.mark.skipif(HAS_GPU, reason="the interpreter's bfloat16 limitation")
def test_interpreter_rejects_bfloat16_with_the_reason():
    args = _args(q=lambda t: t.bfloat16(), k_cache=lambda t: t.bfloat16(), v_cache=lambda t: t.bfloat16())
    with pytest.raises(ValueError, match="q has dtype torch.bfloat16.*interpreter.*float16 or float32"):
        kernels.paged_prefill_attention(**args)


# ---------------------------------------------------------------- the engine runs it
def test_engine_with_kernels_equals_engine_without(monkeypatch):
    """The shipped draft model (2 layers, D = 32, Hq/Hkv = 4/2) in the engine with use_kernels=True (the
    interpreter on a CPU) and without: the same greedy tokens, with chunked prefill (several prefill chunks in one
    step, one launch per layer) and prefix caching (chunks over a cached prefix)."""
    from course_lib import load_tiny
    from course_lib.serving.engine import LLMEngine
    from course_lib.model.sampling import SamplingParams
    import course_lib.serving.kv_pool as kv_pool

    model, tok = load_tiny("draft", dtype=torch.float32, device=DEVICE)
    shared = tok.encode("And God said, Let there be light: and there was light.")[:11]
    prompts = [shared + tok.encode(" And God saw")[:3], tok.encode("In the beginning")[:4], shared, [7, 8]]
    params = SamplingParams(max_tokens=3)
    kw = dict(block_size=4, num_blocks=40, max_num_seqs=4, max_num_batched_tokens=16, enable_prefix_caching=True,
              cudagraph_mode="FULL_DECODE_ONLY")   # on a GPU: eager mixed steps, whose launches the spy counts
    want = [o.token_ids for o in LLMEngine(model, use_kernels=False, **kw).generate(prompts, params, use_tqdm=False)]
    launches = []

    def spy(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, **kwargs):
        launches.append((q.shape[0], block_tables.shape[0], (seq_lens - cu_seqlens_q.diff()).tolist()))
        return paged_prefill_attention_unchecked(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, **kwargs)

    monkeypatch.setattr(kv_pool, "paged_prefill_attention_unchecked", spy)
    engine = LLMEngine(model, use_kernels=True, **kw)
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == want
    assert any(num_seqs > 1 for _, num_seqs, _ in launches)                    # several chunks in one launch
    assert any(p > 0 for *_, prefixes in launches for p in prefixes)           # a chunk over a cached prefix


# ---------------------------------------------------------------- the benchmark script runs
def test_benchmark_dry_run(tmp_path):
    from benchmarks import paged_prefill as bench

    result = bench.main(["--dry-run", "--out", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").exists() and result["rows"]
    assert all(row["max_abs_diff"] < 1e-3 for row in result["rows"])


# ---------------------------------------------------------------- compiled on a GPU, real shapes
GPU_MIXES = {
    "1 chunk of 2048 over 0": [(2048, 0)],
    "8 chunks of 512 over 0-7k": [(512, 1024 * i) for i in range(8)],
    "64 chunks of 16 over 4k": [(16, 4096 + 3 * i) for i in range(64)],
    "ragged: 1 ... 2000 over 0 ... 8k": [(1, 0), (2, 8190), (15, 17), (100, 3000), (333, 4097), (2000, 6000), (7, 0)],
    "verify chunks of 5 over 1-2k": [(5, 1000 + 37 * i) for i in range(32)],
}


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Hq, Hkv, D", [(32, 8, 128), (16, 8, 64), (32, 8, 64), (16, 8, 128)])
@pytest.mark.parametrize("mix", list(GPU_MIXES))
def test_gpu_real_shapes(mix, Hq, Hkv, D, dtype):
    args = make_prefill(GPU_MIXES[mix], Hq, Hkv, D, 16, dtype, seed=Hq + D)
    got = kernels.paged_prefill_attention(*args)
    torch.testing.assert_close(got, ref.paged_prefill_attention(*args), **TOL[dtype])


#: Configs the GPU heuristic may pick (and a few more): each must be right.
GPU_CONFIGS = [(16, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 2), (64, 128, 4, 2)]


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("block_m, block_n, num_warps, num_stages", GPU_CONFIGS)
def test_gpu_every_config_is_correct(block_m, block_n, num_warps, num_stages):
    chunks = [(1, 0), (37, 1000), (300, 0), (129, 77), (5, 4095)]
    args = make_prefill(chunks, 32, 8, 128, 16, torch.bfloat16, seed=8)
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    got = paged_prefill_attention_unchecked(*args, config=config)
    torch.testing.assert_close(got, ref.paged_prefill_attention(*args), **TOL[torch.bfloat16])


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("P, Hq, Hkv, D", [(16, 8, 8, 256), (32, 12, 4, 96), (8, 28, 4, 128), (1, 8, 8, 64)])
def test_gpu_other_block_sizes_head_dims_groups_and_fp32(P, Hq, Hkv, D):
    """Block sizes 1/8/32, D = 96 and 256 (padded), G = 3 and 7, and fp32 (exact fp32 dots)."""
    chunks = [(1, 5), (200, 300), (64, 0), (17, 1111)]
    for dtype in (torch.bfloat16, torch.float32):
        args = make_prefill(chunks, Hq, Hkv, D, P, dtype, seed=P + D)
        torch.testing.assert_close(kernels.paged_prefill_attention(*args), ref.paged_prefill_attention(*args),
                                   **TOL[dtype])


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_gpu_matches_the_gather_and_flash_path():
    """What the engine computed before: gather each sequence's K/V, then kernels.flash_attention per chunk."""
    from course_lib.serving.kv_pool import chunk_attention

    chunks = [(512, 1024 * i) for i in range(4)] + [(16, 4096)]
    q, k_cache, v_cache, tables, cu, lens = make_prefill(chunks, 32, 8, 128, 16, torch.bfloat16, seed=9)
    got = kernels.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens)
    for s, (n, prefix) in enumerate(chunks):
        L, a = n + prefix, int(cu[s])
        blocks = tables[s, : -(-L // 16)].long()
        k = k_cache[blocks].reshape(-1, 8, 128)[:L].transpose(0, 1)[None]
        v = v_cache[blocks].reshape(-1, 8, 128)[:L].transpose(0, 1)[None]
        old = chunk_attention(q[a:a + n].transpose(0, 1)[None], k, v, use_kernels=True)[0].transpose(0, 1)
        torch.testing.assert_close(got[a:a + n], old, **TOL[torch.bfloat16])
