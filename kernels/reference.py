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
