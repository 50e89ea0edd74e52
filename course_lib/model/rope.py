"""Rotary position embeddings (RoPE): the frequencies (plain, or scaled for long contexts as Llama-3.1/3.2 do),
their cos/sin at given positions, the rotation of q and k, and the RoPE settings of a Hugging Face config.

Each pair of dimensions (i, i + D/2) of a head is rotated by the angle ``position · inv_freq[i]``, with
``inv_freq[i] = theta^(-2i/D)``: fast-turning pairs (short wavelengths 2π/inv_freq) tell nearby positions apart,
slow ones far-apart positions. Shapes use the legend of ``course_lib/__init__.py``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float)


ROPE_SCALING_TYPES = ("linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are stretched for a context longer than the one of pretraining (the non-default
    ``rope_type`` of Hugging Face's ``rope_parameters``, ``rope_scaling`` before transformers 5).

    ``"linear"``: every frequency divided by ``factor`` (positions squeezed into the trained range).
    ``"llama3"`` (Llama-3.1/3.2): frequencies whose wavelength is longer than ``original_max_position_embeddings
    / low_freq_factor`` tokens are divided by ``factor``, those shorter than ``original_max_position_embeddings /
    high_freq_factor`` are kept, and those between blend smoothly (``rope_inv_freq``).
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None                   # llama3 only
    high_freq_factor: float | None = None                  # llama3 only
    original_max_position_embeddings: int | None = None    # llama3 only: the context of pretraining

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported: the course model computes RoPE as "
                             f"'default' or scaled by one of {ROPE_SCALING_TYPES}")
        llama3 = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        for name in ("factor",) + (llama3 if self.rope_type == "llama3" else ()):
            value = getattr(self, name)
            if name == "original_max_position_embeddings":
                if not _is_int(value) or value < 1:
                    raise ValueError(f"rope scaling {name} must be an int >= 1, got {value!r}")
            elif not _is_number(value) or not math.isfinite(value) or value <= 0 or (name == "factor" and value < 1):
                raise ValueError(f"rope scaling {name} must be a finite number "
                                 f"{'>= 1' if name == 'factor' else '> 0'}, got {value!r}")
            else:
                object.__setattr__(self, name, float(value))
        if self.rope_type == "linear" and any(getattr(self, name) is not None for name in llama3):
            raise ValueError(f"rope scaling 'linear' takes only a factor, got {self!r}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope scaling high_freq_factor ({self.high_freq_factor}) must be greater than "
                             f"low_freq_factor ({self.low_freq_factor}): the blend between them divides by their "
                             "difference")

    def to_hf_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _scaling_fields(rope: dict) -> dict:
    """What decides RoPE's frequencies besides theta, with "type" (the older key) read as "rope_type"."""
    return {k: v for k, v in rope.items() if k not in ("rope_theta", "type")} | {
        "rope_type": rope.get("rope_type", rope.get("type", "default"))}


def rope_settings_from_hf(d: dict) -> dict:
    """``rope_theta`` and ``rope_scaling`` for ModelConfig from a Hugging Face config dict (only those it gives).

    transformers >= 5 writes one ``rope_parameters`` dict (``rope_type``, ``rope_theta``, the scaling fields);
    older configs (Llama-3.2's own) write ``rope_theta`` beside a ``rope_scaling`` dict or null. Either is read;
    where both are given they must agree (transformers 5 would silently prefer ``rope_scaling`` and the
    dict's theta).
    """
    dicts = {k: d[k] for k in ("rope_scaling", "rope_parameters") if d.get(k) is not None}
    for key, value in dicts.items():
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a JSON object or null, got {value!r}")
        if any(isinstance(v, dict) for v in value.values()):
            raise ValueError(f"{key} per layer type ({sorted(value)}) is not supported: the course model uses one "
                             "RoPE in every layer")
    parts = {k: _scaling_fields(v) for k, v in dicts.items()}
    if len(parts) == 2 and parts["rope_scaling"] != parts["rope_parameters"]:
        raise ValueError(f"rope_scaling {d['rope_scaling']!r} and rope_parameters {d['rope_parameters']!r} disagree")
    rope = next(iter(parts.values()), {"rope_type": "default"})

    out = {}
    thetas = {"rope_theta": d.get("rope_theta")} | {f"{k}.rope_theta": v.get("rope_theta") for k, v in dicts.items()}
    thetas = {k: v for k, v in thetas.items() if v is not None}
    if len({float(v) if _is_number(v) else repr(v) for v in thetas.values()}) > 1:
        raise ValueError(f"rope_theta is given more than once, with different values: {thetas}")
    if thetas:
        out["rope_theta"] = next(iter(thetas.values()))     # its type and range: ModelConfig checks them

    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        raise ValueError(f"partial_rotary_factor {partial!r} is not supported: the course model rotates every "
                         "dimension of each head")
    rope_type = rope["rope_type"]
    if rope_type == "default":
        return out
    if rope_type not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope_type {rope_type!r} (in {' / '.join(dicts)}) is not supported: the course model "
                         f"computes RoPE as 'default' or scaled by one of {ROPE_SCALING_TYPES}; {rope_type!r} would "
                         "give other frequencies than transformers")
    fields_ = dict(factor=rope.get("factor"))
    if rope_type == "llama3":
        # transformers: a top-level original_max_position_embeddings wins, else the dict's, else the context
        original = next((v for v in (d.get("original_max_position_embeddings"),
                                     rope.get("original_max_position_embeddings"), d.get("max_position_embeddings"))
                         if v is not None), None)
        fields_.update(low_freq_factor=rope.get("low_freq_factor"), high_freq_factor=rope.get("high_freq_factor"),
                       original_max_position_embeddings=original)
    out["rope_scaling"] = RopeScaling(rope_type, **fields_)
    return out


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """inv_freq [D/2] (float32): the angle per position of each rotated pair, as transformers computes it."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":        # every angle slowed down: position p turns like p / factor did
        return inv_freq / scaling.factor
    # llama3: slow down only the pairs that turn too slowly to have gone round within the pretraining context
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    context = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq                                        # tokens per full turn of each pair
    slowed = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)   # long wavelengths: / factor
    smooth = (context / wavelen - low) / (high - low)                       # 0 at context / low, 1 at context / high
    blended = (1 - smooth) * slowed / factor + smooth * slowed              # in between: a mix of the two
    is_medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(is_medium, blended, slowed)                          # short wavelengths: unchanged


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 scaling: RopeScaling | None = None):
    """cos, sin: [S, D] for integer positions [S], or [B, 1, S, D] for [B, S] (the 'rotate half' layout of
    Hugging Face LLaMA)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)   # [D/2]
    freqs = positions.float()[..., None] * inv_freq                   # [S, D/2] or [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)                           # [S, D] or [B, S, D]
    if emb.dim() == 3:
        emb = emb[:, None]                                            # [B, 1, S, D]: broadcasts over heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + D/2]) of x [B, H, S, D] by the angle of its position."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
