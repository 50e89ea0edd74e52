"""gpu_memory_utilization (course_lib.serving.memory): the KV cache gets what a profiling pass leaves of the card."""
import pytest
import torch

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import load_tiny
from course_lib.device import HAS_GPU
from course_lib.model.config import ModelConfig
from course_lib.serving.engine import LLMEngine
from course_lib.serving.kv_pool import make_kv_pool
from course_lib.serving.memory import kv_bytes_per_block


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
    model, _ = load_tiny("target")
    small, large = (LLMEngine(model, gpu_memory_utilization=u) for u in (0.3, 0.6))
    total = torch.cuda.mem_get_info()[1]
    per_block = small.memory_profile["bytes_per_block"]
    assert large.num_blocks > small.num_blocks
    # 0.3 of the card more memory buys 0.3 x total / bytes per block more blocks (give or take the profile's noise)
    assert abs((large.num_blocks - small.num_blocks) * per_block - 0.3 * total) < 0.02 * total
