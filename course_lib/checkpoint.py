"""Load and save Hugging Face-format checkpoints (config.json + safetensors; never pickle)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from course_lib.config import ModelConfig
from course_lib.device import DEVICE, default_dtype
from course_lib.model import Llama
from course_lib.tokenizer import Tokenizer

CHECKPOINTS = Path(__file__).parent / "checkpoints"
TINY_MODELS = ("target", "draft")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():  # sharded checkpoint: a weight map names the file of each tensor
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path} (pickled .bin checkpoints are not loaded, by design)")
    state = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def load_pretrained(path: str | Path, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> Llama:
    """A LLaMA/Qwen2-architecture model from a local Hugging Face folder (config.json + safetensors)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}")
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type", "llama") not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"{path}: model_type {raw['model_type']!r} is not a LLaMA-architecture decoder")
    config = ModelConfig.from_dict(raw)
    with torch.device("meta"):  # build without allocating; the checkpoint supplies every tensor
        model = Llama(config)
    state = {k: v for k, v in _read_safetensors(path).items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device=device or DEVICE, dtype=dtype or default_dtype())
    return model.eval()


def save_pretrained(model: Llama, path: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                    extra_config: dict | None = None) -> None:
    """Write config.json and model.safetensors in the Hugging Face layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")} | (extra_config or {})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tiny(name: str = "target", *, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> tuple[Llama, Tokenizer]:
    """The course's own small trained models: ``"target"`` and its ``"draft"`` (see their MODEL_CARD.md)."""
    if name not in TINY_MODELS:
        raise ValueError(f"load_tiny: name must be one of {TINY_MODELS}, got {name!r}")
    path = CHECKPOINTS / f"tiny-{name}"
    return load_pretrained(path, dtype=dtype, device=device), Tokenizer(path)
