"""Plain-torch references of the course's Triton kernels: same signatures, obviously correct, slow is fine.

Every kernel in ``kernels/`` is tested against the function of the same name here.
"""
from __future__ import annotations

import math

import torch

from kernels._checks import check_block_tables, check_finite, check_slot_mapping, check_sm_scale


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


def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise ``x + y`` (reference for ``kernels.add``); x, y: same shape, dtype and device."""
    return x + y


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    sm_scale: float | None = None) -> torch.Tensor:
    """Reference for ``kernels.flash_attention``: q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], GQA, causal aligned
    bottom-right. The course model's own attention (``attention`` above, which the model imports): one
    implementation."""
    return attention(q, k, v, causal=causal, sm_scale=sm_scale)


def flash_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, *, causal: bool = False, sm_scale: float | None = None,
                             dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for ``kernels.flash_attention_bwd.flash_attention_backward``: (dq, dk, dv) of
    ``out = flash_attention(q, k, v, causal, sm_scale)`` from dO = ``do``, by the formulas the kernel uses, written
    out on whole matrices (P recomputed from the saved lse [B, Hq, Sq], as the kernel does):

        P = exp(s·q kᵀ - lse) (0 where masked)    dV = Σ_group Pᵀ dO     dP = dO Vᵀ
        Δ = rowsum(dO ∘ O) - dlse                 dS = P ∘ (dP - Δ)     dQ = s·dS K     dK = s·Σ_group dSᵀ Q

    GQA: dk, dv sum over the Hq / Hkv query heads that share a kv head. Computed in float32 (float64 for float64
    inputs, so that it can be checked by finite differences); returned in the inputs' dtypes.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg, og, dog = (t.to(acc).reshape(B, Hkv, G, Sq, D) for t in (q, out, do))  # [B, Hkv, G, Sq, D]
    kf, vf = k.to(acc), v.to(acc)                                              # [B, Hkv, Skv, D]
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, kf) * scale                      # [B, Hkv, G, Sq, Skv]
    p = torch.exp(s - lse.to(acc).reshape(B, Hkv, G, Sq, 1))
    if causal:
        rows = torch.arange(Sq, device=q.device)[:, None] + (Skv - Sq)
        p = p.masked_fill(torch.arange(Skv, device=q.device)[None, :] > rows, 0.0)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, dog)                             # Pᵀ dO, summed over the group
    dp = torch.einsum("bhgqd,bhkd->bhgqk", dog, vf)                            # dO Vᵀ
    delta = (dog * og).sum(-1, keepdim=True)                                   # [B, Hkv, G, Sq, 1]
    if dlse is not None:
        delta = delta - dlse.to(acc).reshape(B, Hkv, G, Sq, 1)
    ds = p * (dp - delta)
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, kf) * scale
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, qg) * scale
    return dq.reshape(B, Hq, Sq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, validate: bool = True) -> None:
    """Reference for ``kernels.store_kv``: k, v [T, Hkv, D] written in place into k_cache, v_cache
    [N, P, Hkv, D] at slots ``slot_mapping`` [T] (slot = block * P + offset; a negative slot is skipped)."""
    N, P, Hkv, D = k_cache.shape
    if validate:
        check_slot_mapping(slot_mapping, N * P)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(N * P, Hkv, D)[slots] = k[keep]
    v_cache.view(N * P, Hkv, D)[slots] = v[keep]


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                           sm_scale: float | None = None, validate: bool = True, **_) -> torch.Tensor:
    """Reference for ``kernels.paged_attention_decode``: q [B, Hq, D]; caches [N, P, Hkv, D]; block_tables
    int32 [B, max_blocks]; context_lens int32 [B]. Gathers each sequence's K/V through its block table into
    a contiguous [1, Hkv, L, D] and calls the plain attention. Returns [B, Hq, D] (zeros where L = 0).
    Refuses what the kernel refuses (with ``validate``: a block id outside the cache, which torch would read
    from the end of the cache if negative). Extra keyword arguments of the kernel (num_splits, max_context_len)
    are accepted and ignored."""
    N, P, Hkv, D = k_cache.shape
    check_sm_scale(sm_scale)
    if validate:
        check_block_tables(block_tables, context_lens, N, P)
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        L = int(context_lens[b])
        if L == 0:
            continue
        blocks = block_tables[b, : -(-L // P)].long()                          # the blocks holding tokens 0 ... L-1
        k = k_cache[blocks].reshape(-1, Hkv, D)[:L].transpose(0, 1)[None]      # [1, Hkv, L, D]
        v = v_cache[blocks].reshape(-1, Hkv, D)[:L].transpose(0, 1)[None]
        out[b] = attention(q[b, :, None][None], k, v, sm_scale=sm_scale)[0, :, 0]
    return out


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


def store_kv_int8(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  k_scale: torch.Tensor, v_scale: torch.Tensor, slot_mapping: torch.Tensor, *,
                  k_zero: torch.Tensor | None = None, v_zero: torch.Tensor | None = None,
                  validate: bool = True) -> None:
    """Reference for ``kernels.store_kv_int8``: quantize k, v [T, Hkv, D] per (token, kv head) with
    ``course_lib.quant.kv_quant.quantize(x, "head")`` and write codes into k_cache, v_cache [N, P, Hkv, D] (int8 or
    float8_e4m3fn) and scales (zero points) into k_scale, v_scale (k_zero, v_zero) [N, P, Hkv] at slot_mapping.
    With ``validate``, refuses what the kernel refuses: a slot past the cache, a value that is not finite."""
    from kernels.quant import quantize

    N, P, Hkv, D = k_cache.shape
    if validate:
        check_slot_mapping(slot_mapping, N * P)
        check_finite("k", k, slot_mapping)
        check_finite("v", v, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kv_dtype = "fp8" if k_cache.dtype == torch.float8_e4m3fn else "int8"
    for x, cache, scale, zero in ((k, k_cache, k_scale, k_zero), (v, v_cache, v_scale, v_zero)):
        q = quantize(x[keep], "head", kv_dtype=kv_dtype, zero_point=zero is not None, scale_dtype=scale.dtype)
        cache.view(N * P, Hkv, D)[slots] = q.codes
        scale.view(N * P, Hkv)[slots] = q.scale[..., 0]
        if zero is not None:
            zero.view(N * P, Hkv)[slots] = q.zero[..., 0]


def paged_attention_int8_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                k_scale: torch.Tensor, v_scale: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, *, k_zero: torch.Tensor | None = None,
                                v_zero: torch.Tensor | None = None, sm_scale: float | None = None,
                                validate: bool = True, **_) -> torch.Tensor:
    """Reference for ``kernels.paged_attention_int8_decode``: dequantize the whole 8-bit cache in float32
    (codes · scale + zero) and run ``paged_attention_decode`` on it. Returns [B, Hq, D] in q's dtype."""
    k = k_cache.float() * k_scale.float()[..., None] + (0 if k_zero is None else k_zero.float()[..., None])
    v = v_cache.float() * v_scale.float()[..., None] + (0 if v_zero is None else v_zero.float()[..., None])
    return paged_attention_decode(q.float(), k, v, block_tables, context_lens, sm_scale=sm_scale,
                                  validate=validate).to(q.dtype)


def round_query_int8(q: torch.Tensor) -> torch.Tensor:
    """q as ``kernels.paged_attention_int8_decode`` sees it with ``K_INT8_DOT``: each head's vector (last dim)
    rounded half up to int8 codes of scale amax / 127, then dequantized (float32, q's shape). The kernel is exact
    (int32 sums) for this q, so ``paged_attention_int8_decode(round_query_int8(q), ...)`` is its reference."""
    qf = q.float()
    amax = qf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.floor(qf / scale + 0.5) * scale


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *,
                            sm_scale: float | None = None, **_) -> torch.Tensor:
    """Reference for ``kernels.paged_prefill_attention``: q [T, Hq, D] (chunk s is q[cu_seqlens_q[s] :
    cu_seqlens_q[s+1]]); caches [N, P, Hkv, D]; block_tables int32 [num_seqs, max_blocks]; seq_lens int32
    [num_seqs] (K/V tokens of sequence s, its chunk included). Gathers each sequence's K/V through its block table
    into a contiguous [1, Hkv, L, D] and calls the plain attention, causal bottom-right (query i of a chunk of n
    sits at position L - n + i). Returns [T, Hq, D]."""
    N, P, Hkv, D = k_cache.shape
    out = torch.zeros_like(q)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for s, L in enumerate(lens):
        a, b = cu[s], cu[s + 1]
        if a == b:
            continue
        blocks = block_tables[s, : -(-L // P)].long()                          # the blocks holding tokens 0 ... L-1
        k = k_cache[blocks].reshape(-1, Hkv, D)[:L].transpose(0, 1)[None]      # [1, Hkv, L, D]
        v = v_cache[blocks].reshape(-1, Hkv, D)[:L].transpose(0, 1)[None]
        o = attention(q[a:b].transpose(0, 1)[None], k, v, causal=True, sm_scale=sm_scale)   # [1, Hq, n, D]
        out[a:b] = o[0].transpose(0, 1)
    return out
