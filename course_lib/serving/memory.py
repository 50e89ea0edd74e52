"""How many KV blocks fit on the GPU (vLLM's ``gpu_memory_utilization``; lesson 10).

The KV cache takes whatever memory the model and a step's activations leave. vLLM measures rather than guesses:
it runs one forward pass of the largest step the engine will schedule (``max_num_batched_tokens`` tokens),
reads the peak memory PyTorch allocated, and gives the KV cache the rest of ``gpu_memory_utilization`` x the
card's memory, minus what other processes and the CUDA context hold. The same here.
"""
from __future__ import annotations

import torch

from course_lib.quant.kv_quant import KV_DTYPES


def kv_bytes_per_block(config, block_size: int, kv_cache_dtype: str, dtype: torch.dtype) -> int:
    """Bytes of one block of K and V in every layer (8-bit codes plus a float16 scale per slot and kv head)."""
    slots = 2 * config.num_hidden_layers * block_size * config.num_key_value_heads
    if kv_cache_dtype == "auto":
        return slots * config.head_dim * dtype.itemsize
    return slots * (config.head_dim * KV_DTYPES[kv_cache_dtype][0].itemsize + 2)


@torch.no_grad()
def num_blocks_for_gpu(models: list, block_size: int, kv_cache_dtype: str, max_num_batched_tokens: int,
                       gpu_memory_utilization: float) -> tuple[int, dict]:
    """(num_blocks, what was measured): blocks of every model's K/V (a draft's too: they share block ids) that fit
    in ``gpu_memory_utilization`` of the card after a profiling pass of ``max_num_batched_tokens`` tokens."""
    device = models[0].device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)   # the CUDA context, other processes
    rows = -(-max_num_batched_tokens // 512)                       # the step as rows of <= 512 tokens (attention
    width = min(max_num_batched_tokens, 512)                       # without a cache is quadratic in the row)
    for model in models:
        ids = torch.zeros(rows, width, dtype=torch.long, device=device)
        model(ids, logits_indices=torch.arange(min(rows * width, 1024), device=device))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    per_block = sum(kv_bytes_per_block(m.config, block_size, kv_cache_dtype, m.dtype) for m in models)
    available = gpu_memory_utilization * total - others - peak
    measured = dict(total_bytes=total, other_bytes=others, peak_torch_bytes=peak, bytes_per_block=per_block,
                    kv_bytes=max(available, 0))
    return max(int(available // per_block), 0), measured
