"""Autoregressive generation for one sequence, with and without the KV cache (lesson 01)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from course_lib.model.kv_cache import KVCache
from course_lib.model.sampling import SAMPLING_EPS


@dataclass
class GenerationResult:
    token_ids: list[int]                                        # generated tokens (prompt excluded)
    step_times_s: list[float] = field(default_factory=list)     # wall time of each step; step 0 is the prefill


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> int:
    """One token from logits [V]: argmax at temperature 0 (below 1e-5, where logits / T would overflow), else a
    sample from softmax(logits / T) (top-k)."""
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature < SAMPLING_EPS:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, *, use_cache: bool = True,
             temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
             stop_token_ids: tuple[int, ...] = ()) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids``.

    With ``use_cache`` the prompt is processed once (prefill) and each later step feeds only the newest
    token, reading every earlier key and value from the cache. Without it every step runs the model over
    the whole sequence so far: same tokens, quadratically more work.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: generation needs at least one token to condition on")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = len(prompt_ids) + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {model.config.max_position_embeddings} tokens")
    device = model.device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache(model.config, 1, total, dtype=model.dtype, device=device) if use_cache else None
    tokens = list(prompt_ids)
    out = GenerationResult(token_ids=[])
    step_input = torch.tensor([tokens], device=device)
    for _ in range(max_new_tokens):
        _synchronize(device)
        t0 = time.perf_counter()
        logits = model(step_input, cache=cache, last_token_only=True)[0, -1]
        next_id = sample_next(logits, temperature, top_k, generator)
        _synchronize(device)
        out.step_times_s.append(time.perf_counter() - t0)
        tokens.append(next_id)
        out.token_ids.append(next_id)
        if next_id in stop_token_ids:
            break
        # With a cache only the new token goes in; without one, the whole sequence again.
        step_input = torch.tensor([[next_id]] if use_cache else [tokens], device=device)
    return out


def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, *, use_cache: bool = True) -> list[int]:
    return generate(model, prompt_ids, max_new_tokens, use_cache=use_cache).token_ids
