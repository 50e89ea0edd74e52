"""gpu_memory_utilization (course_lib.serving.memory): the KV cache gets what a profiling pass leaves of the card."""
import pytest
import torch

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import load_tiny
from course_lib.device import HAS_GPU
from course_lib.model.config import ModelConfig
from course_lib.serving.engine import LLMEngine
from course_lib.serving.kv_pool import make_kv_pool
from course_lib.serving.memory import kv_bytes_per_block, num_blocks_for_gpu


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_bytes_per_block_equal_the_pools_own(kv_cache_dtype):
    cfg = ModelConfig()
    pool = make_kv_pool(cfg, 3, 16, kv_cache_dtype=kv_cache_dtype, dtype=torch.float32, device="cpu")
    assert kv_bytes_per_block(cfg, 16, kv_cache_dtype, torch.float32) == pool.bytes_per_block


@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), "0.9"])
def test_gpu_memory_utilization_is_validated(value):
    model, _ = load_tiny("draft", dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLMEngine(model, gpu_memory_utilization=value)


@pytest.mark.skipif(not HAS_GPU, reason="sizes the cache from the GPU's memory")
def test_num_blocks_follow_gpu_memory_utilization():
    # the profiling pass itself, not an engine: an engine caps its cache at max_num_seqs full contexts, and a huge
    # max_num_seqs would make the profiled step (max_num_batched_tokens >= max_num_seqs) huge too
    model, _ = load_tiny("target")
    blocks, measured = {}, {}
    for u in (0.3, 0.6):
        blocks[u], measured[u] = num_blocks_for_gpu([model], 16, "auto", 512, u)
    total = measured[0.3]["total_bytes"]
    assert blocks[0.3] > 0
    assert blocks[0.6] > blocks[0.3]
    # 0.3 of the card more memory buys 0.3 x total / bytes per block more blocks (give or take the profile's noise)
    assert abs((blocks[0.6] - blocks[0.3]) * measured[0.3]["bytes_per_block"] - 0.3 * total) < 0.02 * total


@pytest.mark.skipif(not HAS_GPU, reason="sizes the cache from the GPU's memory")
def test_engines_of_one_process_share_the_card():
    model, _ = load_tiny("target")
    engines = [LLMEngine(model) for _ in range(3)]   # a notebook keeps several: none may take the whole card
    cap = engines[0].max_num_seqs * -(-engines[0].max_model_len // engines[0].block_size)
    assert all(e.num_blocks == cap for e in engines)
