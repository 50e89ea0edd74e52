"""Counting the work of a forward pass: matmul FLOPs, and the bytes a decode step must read (lesson 01).

Only matrix multiplications are counted: they are nearly all of an LLM's FLOPs. Norms, RoPE, softmax,
SwiGLU's elementwise product, biases and the embedding lookup are left out. A matmul ``[M, K] @ [K, N]``
costs 2·M·N·K FLOPs (a multiply and an add per term), the convention of ``torch.utils.flop_counter``;
tests/test_lesson01.py checks every formula below against it on the real model.

For S new tokens of each of B sequences, after a cached prefix of C tokens (legend in course_lib/__init__.py)::

    linear layers   2 · B·S · L · (E·Hq·D + 2·E·Hkv·D + Hq·D·E + 3·E·F)    q, k, v, o; gate, up, down
    lm_head         2 · B·T · E · V             T = positions whose logits are computed (1 when generating)
    attention       2 · 2 · B · L · Hq · D · pairs                        Q·Kᵀ and P·V, for every query head
    pairs           Σ_{i<S} (C + i + 1) = S·C + S·(S+1)/2                  causal: new token i sees C + i + 1 keys

A kernel that computes the masked scores too (``course_lib.model.attention`` does; FlashAttention skips them)
does S·(C + S) pairs: pass ``count_masked=True`` to count that instead.
"""
from __future__ import annotations

from course_lib.model.config import ModelConfig
from course_lib.model.kv_cache import kv_cache_bytes


def linear_params_per_layer(config: ModelConfig) -> int:
    """Weights in the matmuls of one decoder layer: E·Hq·D + 2·E·Hkv·D + Hq·D·E (attention) + 3·E·F (SwiGLU MLP)."""
    E, F, D = config.hidden_size, config.intermediate_size, config.head_dim
    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    return E * Hq * D + 2 * E * Hkv * D + Hq * D * E + 3 * E * F


def attention_pairs(num_new_tokens: int, context_len: int = 0, *, count_masked: bool = False) -> int:
    """(query, key) pairs scored by S new tokens after C cached ones: S·C + S·(S+1)/2 (causal, bottom-right
    aligned: new token i sees the C cached keys and the new keys 0..i), or S·(C + S) with ``count_masked``."""
    S, C = num_new_tokens, context_len
    if S < 0 or C < 0:
        raise ValueError(f"num_new_tokens and context_len must be >= 0, got {S} and {C}")
    return S * (C + S) if count_masked else S * C + S * (S + 1) // 2


def forward_flops_breakdown(config: ModelConfig, num_new_tokens: int, context_len: int = 0, *,
                            batch_size: int = 1, lm_head_tokens: int | None = None,
                            count_masked: bool = False) -> dict[str, int]:
    """Matmul FLOPs of one forward pass of ``num_new_tokens`` tokens (per sequence) after ``context_len`` cached
    ones, by part: {"linear": ..., "attention": ..., "lm_head": ...} (formulas in the module docstring).

    ``lm_head_tokens``: positions per sequence whose logits are computed; default all ``num_new_tokens``
    (``model(ids)``); 1 for ``model(ids, last_token_only=True)``, as generation does.
    """
    S, B = num_new_tokens, batch_size
    T = S if lm_head_tokens is None else lm_head_tokens
    if not 0 <= T <= S:
        raise ValueError(f"lm_head_tokens must be between 0 and num_new_tokens={S}, got {T}")
    L, Hq, D = config.num_hidden_layers, config.num_attention_heads, config.head_dim
    pairs = attention_pairs(S, context_len, count_masked=count_masked)
    return {
        "linear": 2 * B * S * L * linear_params_per_layer(config),
        "attention": 2 * 2 * B * L * Hq * D * pairs,   # Q·Kᵀ: 2·D per pair and query head; P·V: the same again
        "lm_head": 2 * B * T * config.hidden_size * config.vocab_size,
    }


def forward_flops(config: ModelConfig, num_new_tokens: int, context_len: int = 0, *, batch_size: int = 1,
                  lm_head_tokens: int | None = None, count_masked: bool = False) -> int:
    """Total matmul FLOPs of one forward pass: the sum of ``forward_flops_breakdown`` (same arguments)."""
    return sum(forward_flops_breakdown(config, num_new_tokens, context_len, batch_size=batch_size,
                                       lm_head_tokens=lm_head_tokens, count_masked=count_masked).values())


def decode_step_flops(config: ModelConfig, position: int, use_cache: bool = True, *, batch_size: int = 1,
                      count_masked: bool = False) -> int:
    """Matmul FLOPs of the decode step that feeds the token at ``position`` (0-based: ``position`` tokens come
    before it) and computes the logits of the next token only (``last_token_only=True``).

    With the cache: 1 new token after ``position`` cached ones, attending to position + 1 keys::

        2·L·P_layer + 2·E·V + 4·L·Hq·D·(position + 1)                       (P_layer = linear_params_per_layer)

    Without: the whole sequence, position + 1 tokens, recomputed from scratch::

        (position + 1)·2·L·P_layer + 2·E·V + 4·L·Hq·D·(position + 1)(position + 2)/2

    (times ``batch_size``). Per step: ~constant with the cache (plus attention, linear in the position);
    linear in the position without it, so a whole generation is quadratic.
    """
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    if use_cache:
        return forward_flops(config, 1, position, batch_size=batch_size, lm_head_tokens=1, count_masked=count_masked)
    return forward_flops(config, position + 1, 0, batch_size=batch_size, lm_head_tokens=1, count_masked=count_masked)


def weight_bytes(config: ModelConfig, bytes_per_element: float = 2) -> float:
    """Bytes of all the weights: ``num_parameters() · bytes_per_element`` (what must sit in GPU memory)."""
    return config.num_parameters() * bytes_per_element


def decode_step_bytes(config: ModelConfig, position: int, *, batch_size: int = 1,
                      bytes_per_element: float = 2) -> float:
    """Least bytes a cached decode step must move from main memory (HBM), for a batch decoding in lockstep::

        weights read once (shared by the batch; the embedding table excluded, a lookup reads B rows only)
        + K/V of position + 1 tokens read by attention, per sequence (the cache grows with the context)
        + K/V of the new token written, per sequence

    Activations ([B, E] vectors) are ignored: they are tiny next to the weights and the cache.
    """
    weights = config.num_parameters() - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    kv_read = kv_cache_bytes(config, position + 1, batch_size, bytes_per_element)
    kv_written = kv_cache_bytes(config, 1, batch_size, bytes_per_element)
    return weights * bytes_per_element + kv_read + kv_written


def decode_step_intensity(config: ModelConfig, position: int, *, batch_size: int = 1,
                          bytes_per_element: float = 2) -> float:
    """Arithmetic intensity (FLOP/byte) of a cached decode step: ``decode_step_flops / decode_step_bytes``.

    Grows with the batch (the weights are read once for B tokens) but saturates: the K/V reads grow with B
    too, and attention does only 2·Hq / (Hkv·bytes_per_element) FLOPs per byte of cache it reads, whatever the
    batch: 1 FLOP/byte for multi-head attention in 16-bit, Hq/Hkv = 4 for Llama-3-8B's GQA.
    """
    flops = decode_step_flops(config, position, True, batch_size=batch_size)
    return flops / decode_step_bytes(config, position, batch_size=batch_size, bytes_per_element=bytes_per_element)
