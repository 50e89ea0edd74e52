"""Measuring what a lossy KV cache does to a model (lesson 07): decode with logits, teacher forcing,
per-position KL divergence, perplexity on held-out text, and the residual stream after every layer.

Every function takes a cache *factory* or a cache, so the same measurement runs with the contiguous FP32
``KVCache``, an FP16 ``PagedKVCache`` or an 8-bit ``QuantizedPagedKVCache`` — only the cache differs.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def decode_logits(model, cache, prompt_ids: list[int], steps: int,
                  forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """Decode ``steps`` tokens of one sequence: the argmax token of each step and its logits ``[steps, V]``.

    Greedy, or **teacher-forced** along ``forced`` (the next input is forced[i], whatever the argmax was): then
    two caches see the same inputs at every step and their logits can be compared position by position.
    """
    x, tokens, logits = torch.tensor([prompt_ids], device=model.device), [], []
    for i in range(steps):
        out = model(x, cache=cache, last_token_only=True)[0, -1]
        tokens.append(int(out.argmax()))
        logits.append(out.float().cpu())
        x = torch.tensor([[tokens[-1] if forced is None else forced[i]]], device=model.device)
    return tokens, torch.stack(logits)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats for each row of logits ``[..., V]``: how much q's next-token distribution
    departs from p's (0 when equal)."""
    logp, logq = F.log_softmax(logits_p.double(), -1), F.log_softmax(logits_q.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def perplexity(model, token_ids: list[int], make_cache: Callable[[], object], window: int = 512) -> float:
    """exp(mean next-token loss) over ``token_ids``, cut into windows of ``window`` tokens that each start
    from an empty cache from ``make_cache()`` (every token's attention reads K/V from that cache)."""
    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = torch.tensor([token_ids[start:start + window]], device=model.device)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk, cache=make_cache())
        nll += F.cross_entropy(logits[0, :-1].float(), chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def residual_stream(model, token_ids: list[int], cache) -> list[torch.Tensor]:
    """The hidden state ``[S, E]`` after each decoder layer, for one prefill of ``token_ids`` through ``cache``."""
    states, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.register_forward_hook(lambda mod, inp, out: states.append(out[0].float().cpu())))
    try:
        model(torch.tensor([token_ids], device=model.device), cache=cache)
    finally:
        for h in hooks:
            h.remove()
    return states
