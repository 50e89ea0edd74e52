"""The model's fused path, what a serving engine runs on a GPU (lesson 10): the same math in fewer, fuller kernels.

A decode step of a small model is bound by the number of kernels, not by their work: the plain model launches
about 59 per layer (RMSNorm alone is seven), each a pass over a few kilobytes. ``fuse(model)`` switches a model to:

* one GEMM for q, k and v, one for the MLP's gate and up (vLLM's QKVParallelLinear and MergedColumnParallelLinear).
  The weights are concatenated once and the original parameters become views of the concatenation, so the
  checkpoint's names and the memory stay as they were;
* ``kernels.rms_norm``: RMSNorm in one kernel;
* ``kernels.rope_``: Qwen3's per-head q/k norm and RoPE in one kernel each for q and k, in place;
* ``kernels.silu_and_mul``: SwiGLU's silu(gate) * up in one kernel.

Each kernel rounds where the plain path rounds, so the logits agree to the dtype's last bit in almost every
position (``tests/test_fused.py``). The plain path stays what the lessons read; ``unfuse(model)`` switches back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.rms_norm import rms_norm  # noqa: F401  (re-exported: RMSNorm's fused forward)
from kernels.rope import rope_
from kernels.silu_and_mul import silu_and_mul


def _concatenate(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears over the same input; their parameters become views of it."""
    weight = torch.cat([m.weight.data for m in linears])
    bias = torch.cat([m.bias.data for m in linears]) if linears[0].bias is not None else None
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[start:start + n]
        if bias is not None:
            m.bias.data = bias[start:start + n]
        start += n
    return weight, bias


def fuse(model) -> None:
    """Switch ``model`` (a ``course_lib.model.llama.Llama``) to the fused kernels; idempotent."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "qkv", None) is None:
            attn.qkv = _concatenate([attn.q_proj, attn.k_proj, attn.v_proj])
            mlp.gate_up = _concatenate([mlp.gate_proj, mlp.up_proj])
        for module in (attn, mlp, layer.input_layernorm, layer.post_attention_layernorm):
            module.fused = True
    model.model.norm.fused = True


def unfuse(model) -> None:
    """Back to the plain path (the concatenated weights stay: the parameters are views of them)."""
    for module in model.modules():
        if getattr(module, "fused", False):
            module.fused = False


def qkv_rope(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k, v ``[B, H, S, D]`` of x ``[B, S, E]``: one GEMM, then the q/k norm and RoPE in place."""
    B, S, _ = x.shape
    Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = F.linear(x, *attn.qkv).view(B * S, Hq + 2 * Hkv, D)                       # [T, Hq + 2 Hkv, D]
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]                  # views of one buffer
    cos, sin = (t.expand(B, 1, S, D) if t.dim() == 4 else t[None, None].expand(B, 1, S, D) for t in (cos, sin))
    cos, sin = cos.reshape(B * S, D), sin.reshape(B * S, D)                         # [T, D] (a copy only if B > 1)
    eps = attn.q_norm.eps if attn.q_norm is not None else 0.0
    rope_(q, cos, sin, None if attn.q_norm is None else attn.q_norm.weight, eps)
    rope_(k, cos, sin, None if attn.k_norm is None else attn.k_norm.weight, eps)
    return tuple(t.view(B, S, -1, D).transpose(1, 2) for t in (q, k, v))            # [B, H, S, D] views


def mlp(module, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU with one GEMM for gate and up and one kernel for silu(gate) * up."""
    return module.down_proj(silu_and_mul(F.linear(x, module.gate_up[0])))
