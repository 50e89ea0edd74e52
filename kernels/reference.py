"""Plain-torch references of the course's Triton kernels: same signatures, obviously correct, slow is fine.

Every kernel in ``kernels/`` is tested against the function of the same name here.
"""
from __future__ import annotations

import torch


def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise ``x + y`` (reference for ``kernels.add``); x, y: same shape, dtype and device."""
    return x + y


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    sm_scale: float | None = None) -> torch.Tensor:
    """Reference for ``kernels.flash_attention``: q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], GQA, causal aligned
    bottom-right. The course model's own attention (``course_lib.attention.attention``): one implementation."""
    from course_lib.attention import attention

    return attention(q, k, v, causal=causal, sm_scale=sm_scale)


def flash_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``kernels.flash_attention(..., return_lse=True)``: (out, lse) with lse [B, Hq, Sq] float32,
    the natural-log log-sum-exp of each row of scaled (and causally masked) scores."""
    import math

    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    kk = k.float().repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, Skv, D]: query head h reads kv head h // G
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), kk) * scale
    if causal:
        rows = torch.arange(Sq, device=q.device)[:, None] + (Skv - Sq)
        scores = scores.masked_fill(torch.arange(Skv, device=q.device)[None, :] > rows, float("-inf"))
    return flash_attention(q, k, v, causal=causal, sm_scale=sm_scale), torch.logsumexp(scores, dim=-1)
