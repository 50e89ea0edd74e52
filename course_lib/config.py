"""Model configuration: one validated dataclass and the presets the lessons compute with."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class ModelConfig:
    """A LLaMA-architecture decoder (RMSNorm, RoPE, GQA, SwiGLU), named as in Hugging Face's LlamaConfig."""

    vocab_size: int = 2048
    hidden_size: int = 256             # E
    intermediate_size: int = 688       # F (SwiGLU hidden size)
    num_hidden_layers: int = 6         # L
    num_attention_heads: int = 8       # Hq
    num_key_value_heads: int = 4       # Hkv (GQA when < Hq, MQA when 1)
    head_dim: int | None = None        # D; defaults to hidden_size // num_attention_heads
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False       # Qwen2 uses bias on q/k/v projections
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_parameters(self) -> int:
        """Parameter count, computed from the shapes (embeddings and head counted separately unless tied)."""
        E, F, D = self.hidden_size, self.intermediate_size, self.head_dim
        Hq, Hkv = self.num_attention_heads, self.num_key_value_heads
        attn = E * Hq * D + 2 * E * Hkv * D + Hq * D * E + (Hq * D + 2 * Hkv * D if self.attention_bias else 0)
        per_layer = attn + 3 * E * F + 2 * E
        head = 0 if self.tie_word_embeddings else self.vocab_size * E
        return self.vocab_size * E + self.num_hidden_layers * per_layer + E + head

    # --- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if isinstance(kwargs.get("eos_token_id"), list):  # some HF configs list several
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        if kwargs.get("head_dim") is None:
            kwargs.pop("head_dim", None)
        if d.get("model_type") == "qwen2":
            kwargs.setdefault("attention_bias", True)
        # transformers >= 5 keeps RoPE settings in rope_parameters; older configs use rope_theta/rope_scaling.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported by the course model")
        if kwargs.get("rope_theta") is None:
            kwargs.pop("rope_theta", None)
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_hf_dict(self) -> dict:
        d = asdict(self)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", mlp_bias=False,
                 attention_dropout=0.0, rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        return d


# Real configurations (from each model's published config.json), for the memory and FLOP arithmetic
# of the lessons. Only the shapes matter here; no weights of these models are used.
PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama-2-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                               num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    "llama-2-70b": ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                               num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                              rope_theta=500000.0),
    "llama-3-70b": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                               num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                               rope_theta=500000.0),
    "mistral-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                              rope_theta=1000000.0),
    "qwen2-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                            rope_theta=1000000.0, attention_bias=True),
}
