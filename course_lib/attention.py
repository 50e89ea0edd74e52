"""Attention in plain torch: the reference every attention kernel of the course is tested against."""
from __future__ import annotations

import math

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · sm_scale) v, materializing the full score matrix.

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D] with Hq % Hkv == 0 (query head h reads kv head h // (Hq/Hkv)).
    With ``causal`` the queries are the *last* Sq positions of the Skv keys (bottom-right alignment, as in
    decoding or in prefill after a cached prefix): query i may see keys j <= Skv - Sq + i.
    Scores and softmax are computed in float32; the result has q's dtype.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if Skv < Sq and causal:
        raise ValueError(f"causal attention needs Skv >= Sq, got Sq={Sq}, Skv={Skv}")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    group = Hq // Hkv
    # GQA: view the Hq query heads as [Hkv, group] so each kv head serves its group without copying K/V.
    qg = q.float().reshape(B, Hkv, group, Sq, D)                       # [B, Hkv, G, Sq, D]
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.float()) * scale  # [B, Hkv, G, Sq, Skv]
    if causal:
        rows = torch.arange(Sq, device=q.device)[:, None] + (Skv - Sq)
        cols = torch.arange(Skv, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, v.float())          # [B, Hkv, G, Sq, D]
    return out.reshape(B, Hq, Sq, D).to(q.dtype)
