"""A LLaMA-architecture decoder: RMSNorm, rotary position embeddings (RoPE, ``course_lib.model.rope``), grouped-query
attention (GQA) and a SwiGLU MLP. Parameter names follow Hugging Face's LlamaForCausalLM, and its relatives'
(Qwen2 adds q/k/v biases, Qwen3 an RMSNorm on each query and key head), so real checkpoints load with
``course_lib.load_pretrained``.

Shapes use the legend of ``course_lib/__init__.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.model import fused as fused_path
from course_lib.model.attention import attention
from course_lib.model.config import ModelConfig
from course_lib.model.rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    fused = False   # True: one Triton kernel (course_lib.model.fused, the serving engine's GPU path)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused_path.rms_norm(x, self.weight, self.eps)
        # Normalize in float32 (as LLaMA does): squares of bf16 activations lose precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    fused = False   # True: one q/k/v GEMM, norm + RoPE in one kernel (course_lib.model.fused)

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        bias = config.attention_bias
        self.q_proj = nn.Linear(E, self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(E, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(E, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, E, bias=False)
        # Qwen3: an RMSNorm over each head's D features of q and k (one weight vector shared by all heads)
        self.q_norm = RMSNorm(D, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(D, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x, cos, sin, layer: int, cache=None) -> torch.Tensor:
        B, S, _ = x.shape
        if self.fused:
            q, k, v = fused_path.qkv_rope(self, x, cos, sin)                                  # [B, H, S, D]
        else:
            q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)                  # [B, S, Hq, D]
            k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)               # [B, S, Hkv, D]
            v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)   # [B, Hkv, S, D]
            if self.q_norm is not None:   # before RoPE: q·k keeps its scale whatever the projections learn
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)                                  # [B, H, S, D]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attention(q, k, v, causal=True)                                        # [B, Hq, S, D]
        else:  # the cache stores the new k, v and attends over everything it holds (contiguous, paged, ...)
            out = cache.attend(layer, q, k, v)                                           # [B, Hq, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class MLP(nn.Module):
    fused = False   # True: one gate/up GEMM, silu(gate) * up in one kernel (course_lib.model.fused)

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, Fh = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(E, Fh, bias=False)
        self.up_proj = nn.Linear(E, Fh, bias=False)
        self.down_proj = nn.Linear(Fh, E, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused_path.mlp(self, x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))   # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, layer: int, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """LLaMA-style causal language model. ``state_dict()`` keys match Hugging Face's LlamaForCausalLM."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, input_ids: torch.Tensor, *, cache=None, last_token_only: bool = False,
                positions: torch.Tensor | None = None, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, V] (float32), or [B, 1, V] with ``last_token_only``.

        Without ``cache`` every token attends to the tokens before it in ``input_ids`` (the no-cache path).
        With a cache the new tokens sit at positions ``cache.length ...``, attend to everything cached, and
        their K/V are appended to it. A cache is any object with ``length``, ``attend(layer, q, k, v)`` and
        ``advance(num_tokens)``: ``course_lib.model.kv_cache.KVCache`` (contiguous) is the first of them.
        ``positions`` ([S], or [B, S] per row) overrides ``cache.length + arange(S)``: a serving engine that
        flattens the tokens of many sequences into one row passes each token's own position (lesson 04).
        ``logits_indices`` (rows of the flattened [B * S] tokens) returns only those rows' logits, [rows, V]: a
        prefill chunk of 2,000 tokens samples one, and 2,000 x a vocabulary of 150k floats is 1.2 GB.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            if start + S > self.config.max_position_embeddings:
                raise ValueError(f"{start} cached + {S} new tokens exceed the model's context of "
                                 f"{self.config.max_position_embeddings} positions")
            positions = torch.arange(start, start + S, device=input_ids.device)
        elif positions.shape not in ((S,), (B, S)):
            raise ValueError(f"positions has shape {tuple(positions.shape)}; expected [S={S}] or [B={B}, S={S}]")
        x = self.model.embed_tokens(input_ids)                                    # [B, S, E]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype,
                                self.config.rope_scaling)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, i, cache)
        if cache is not None:
            cache.advance(S)
        if logits_indices is not None:   # a serving step: only its sampling rows need the vocabulary projection
            x = x.reshape(B * S, -1)[logits_indices]                               # [rows, E]
        elif last_token_only:
            x = x[:, -1:]      # generation needs only the last position's logits: skip the rest of lm_head
        return self.lm_head(self.model.norm(x)).float()
