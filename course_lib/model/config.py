"""Model configuration: one validated dataclass and the presets the lessons compute with."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from course_lib.model.rope import RopeScaling, rope_settings_from_hf

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")   # the Hugging Face families from_dict reads
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "max_position_embeddings")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float)


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
    rope_scaling: RopeScaling | None = None   # None: plain RoPE; Llama-3.1/3.2 use "llama3" (a dict is converted)
    tie_word_embeddings: bool = False
    attention_bias: bool = False       # Qwen2 uses bias on q/k/v projections
    qk_norm: bool = False              # Qwen3: RMSNorm over each query and key head (D features) before RoPE
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        # Types first: a JSON "1024", 2.0 or true must not slip through as a size (bool is an int in Python).
        for name in _SIZES + (() if self.head_dim is None else ("head_dim",)):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):   # NaN fails every comparison: "<= 0" alone lets it in
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
            setattr(self, name, float(value))
        if isinstance(self.rope_scaling, dict):
            names = {f.name for f in fields(RopeScaling)}
            if not {"rope_type", "factor"} <= self.rope_scaling.keys() <= names:
                raise ValueError(f"rope_scaling must have rope_type, factor and at most the other fields of "
                                 f"RopeScaling {sorted(names)}, got {self.rope_scaling!r}")
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        elif not isinstance(self.rope_scaling, (RopeScaling, type(None))):
            raise ValueError(f"rope_scaling must be null, a RopeScaling or a dict of its fields, "
                             f"got {self.rope_scaling!r}")
        for name in ("tie_word_embeddings", "attention_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value < self.vocab_size):
                raise ValueError(f"{name} must be null or a token id in 0..{self.vocab_size - 1} "
                                 f"(vocab_size={self.vocab_size}), got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                                 f"({self.num_attention_heads}) when head_dim is not given (D = E / Hq)")
            self.head_dim = self.hidden_size // self.num_attention_heads
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
        per_layer = attn + 3 * E * F + 2 * E + (2 * D if self.qk_norm else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * E
        return self.vocab_size * E + self.num_hidden_layers * per_layer + E + head

    # --- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """From a Hugging Face config dict: LlamaConfig (Llama-2, Llama-3.x), Qwen2Config (Qwen2/2.5),
        Qwen3Config, MistralConfig.

        The family (``model_type``) decides what the config leaves implicit, as transformers does: Qwen2 has q/k/v
        biases, Qwen3 has q/k norms (and head_dim 128 unless given), Mistral has no biases. Refuses with a
        ValueError naming the field what the course model would compute differently from transformers: another
        activation than silu, MLP biases, an o_proj bias, RoPE other than default / linear / llama3, partial
        rotary embeddings, a sliding window in use.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a LLaMA-architecture decoder {MODEL_TYPES}")
        missing = [k for k in _SIZES if k not in d and k != "num_key_value_heads"]
        if missing:  # the course's defaults (E=256, ...) are no stand-in for a checkpoint's sizes
            raise ValueError(f"missing {', '.join(missing)}")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported: the course model's MLP is SwiGLU "
                             "(silu)")
        if d.get("mlp_bias", False) is not False:
            raise ValueError(f"mlp_bias {d['mlp_bias']!r} is not supported: the course model's MLP has no biases")
        known = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling", "qk_norm"}   # those: below
        kwargs = {k: v for k, v in d.items() if k in known}
        if kwargs.get("num_key_value_heads") is None:  # Hugging Face's rule for configs older than GQA
            kwargs["num_key_value_heads"] = d["num_attention_heads"]
        if isinstance(kwargs.get("eos_token_id"), list):  # some HF configs list several
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0] if kwargs["eos_token_id"] else None
        if kwargs.get("head_dim") is None:
            kwargs.pop("head_dim", None)
            if model_type == "qwen3":          # Qwen3Config's default, whatever hidden_size / heads is
                kwargs["head_dim"] = 128
        if model_type in ("llama", "qwen3") and d.get("attention_bias", False) is True:
            raise ValueError(f"attention_bias true is not supported for {model_type}: it puts biases on q, k, v "
                             "*and* o_proj; the course model has q/k/v biases only (Qwen2's)")
        if model_type == "qwen2":              # Qwen2's projections always have biases (Qwen2Config has no switch)
            kwargs["attention_bias"] = True
        elif model_type == "mistral":          # and Mistral's never do
            kwargs["attention_bias"] = False
        kwargs["qk_norm"] = model_type == "qwen3"
        kwargs.update(rope_settings_from_hf(d))
        config = cls(**kwargs)
        _check_sliding_window(d, config)
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """From a Hugging Face config.json; a ValueError names the file and the field."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as err:  # json's and UTF-8's decoding errors are ValueErrors too
            raise ValueError(f"{path}: {err}") from err

    def to_hf_dict(self) -> dict:
        """A Hugging Face config.json that transformers' ``AutoModelForCausalLM`` builds as this model: Qwen3 with
        q/k norms, Qwen2 with q/k/v biases, else LLaMA. RoPE both ways: ``rope_parameters`` (transformers >= 5)
        and ``rope_theta`` + ``rope_scaling`` (older)."""
        if self.qk_norm and self.attention_bias:
            raise ValueError("no Hugging Face family has q/k norms and biases on q/k/v only (Qwen3's attention_bias "
                             "adds an o_proj bias too): this config has no config.json")
        model_type, arch = ("qwen3", "Qwen3ForCausalLM") if self.qk_norm else (
            ("qwen2", "Qwen2ForCausalLM") if self.attention_bias else ("llama", "LlamaForCausalLM"))
        d = {k: v for k, v in asdict(self).items() if k not in ("qk_norm", "rope_scaling")}
        scaling = self.rope_scaling.to_hf_dict() if self.rope_scaling else {"rope_type": "default"}
        d.update(model_type=model_type, architectures=[arch], hidden_act="silu", mlp_bias=False, attention_dropout=0.0,
                 rope_parameters=scaling | {"rope_theta": self.rope_theta})
        if self.rope_scaling:
            d["rope_scaling"] = scaling
        return d


def _check_sliding_window(d: dict, config: ModelConfig) -> None:
    """Refuse a sliding window that transformers would apply within the model's context.

    "In use" as transformers decides it: LLaMA ignores ``sliding_window``; Mistral applies it to every
    layer; Qwen2 and Qwen3 only with ``use_sliding_window: true``, to the layers ``layer_types`` marks
    "sliding_attention" (without ``layer_types``: layers >= ``max_window_layers``). A window of at least
    ``max_position_embeddings`` tokens never hides a token, so it is harmless.
    """
    window, model_type, L = d.get("sliding_window"), d.get("model_type", "llama"), config.num_hidden_layers
    if window is None or model_type == "llama":
        return
    if not _is_int(window) or window < 1:
        raise ValueError(f"sliding_window must be null or an int >= 1, got {window!r}")
    layers = list(range(L))
    if model_type in ("qwen2", "qwen3"):
        use, first, types = d.get("use_sliding_window", False), d.get("max_window_layers", 28), d.get("layer_types")
        if not isinstance(use, bool) or not _is_int(first) or not isinstance(types, (list, type(None))):
            raise ValueError(f"use_sliding_window must be true/false, max_window_layers an int and layer_types a list, "
                             f"got {use!r}, {first!r}, {types!r}")
        if not use:
            return
        layers = [i for i, t in enumerate(types) if t == "sliding_attention"] if types else list(range(first, L))
    if layers and window < config.max_position_embeddings:
        raise ValueError(
            f"sliding_window={window} is in use ({model_type}: {len(layers)} of {L} layers, from layer {layers[0]}, "
            f"attend to the last {window} tokens only) and is shorter than max_position_embeddings="
            f"{config.max_position_embeddings}; the course model implements full causal attention only, so past "
            f"{window} tokens its outputs would differ")


# Real configurations (from each model's published config.json), for the memory and FLOP arithmetic
# of the lessons. Shapes only: no weights of these models are used, and ``Llama(PRESETS[name])`` has random
# weights (build it on the "meta" device to inspect it without allocating them).
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
    # small models of the families load_pretrained reads; parameters (a tied head counted once): 0.49 B, 0.60 B
    # (0.44 B without the embedding), 1.24 B, as their model cards say (tests/test_model_families.py)
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                                attention_bias=True),
    "qwen3-0.6b": ModelConfig(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=128,   # not E / Hq = 64
                              max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              tie_word_embeddings=True, qk_norm=True),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                rope_theta=500000.0, tie_word_embeddings=True,
                                rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_position_embeddings=8192)),
}
