"""Load and save Hugging Face-format checkpoints (config.json + safetensors; never pickle)."""
from __future__ import annotations

import json
from pathlib import Path, PurePath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from course_lib.model.config import ModelConfig
from course_lib.device import DEVICE, default_dtype
from course_lib.model.llama import Llama
from course_lib.model.tokenizer import Tokenizer

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
TINY_MODELS = ("target", "draft")


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files of the checkpoint in ``path``: those its index names, else every *.safetensors.

    Each must lie inside the folder, symlinks followed (a Hugging Face hub cache snapshot may point into its
    repository's ``blobs/``): an index naming ``../x`` or ``/x`` must not make us read files from elsewhere.
    """
    index = path / "model.safetensors.index.json"
    if index.exists():  # sharded checkpoint: a weight map names the file of each tensor
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({err!r})") from err
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: weight_map must map tensor names to file names, got {weight_map!r:.200}")
        names, source = sorted(set(weight_map.values())), f"{index}: shard"
    else:
        names, source = sorted(p.name for p in path.glob("*.safetensors")), "checkpoint file"
    if not names:
        raise FileNotFoundError(f"no *.safetensors in {path} (pickled .bin checkpoints are not loaded, by design)")
    root = path.resolve()
    root = root.parent.parent if root.parent.name == "snapshots" else root
    files = []
    for name in names:
        file = path / name
        if PurePath(name).is_absolute() or ".." in PurePath(name).parts or not file.resolve().is_relative_to(root):
            raise ValueError(f"{source} {name!r} is outside the checkpoint folder {path} "
                             f"(resolves to {file.resolve()})")
        if not file.is_file():
            raise ValueError(f"{source} {name!r} is missing from {path}")
        files.append(file)
    return files


def _read_safetensors(path: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """Every tensor of the checkpoint in ``path``, with the name of the file it came from."""
    state = {}
    for file in _shard_files(path):
        try:
            tensors = load_file(str(file))
        except SafetensorError as err:  # a corrupt header, truncated data
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
        for name, tensor in tensors.items():
            if name in state:  # which copy wins would depend on the order of the files: refuse
                raise ValueError(f"tensor {name} is in both {state[name][1]} and {file.name}")
            state[name] = (tensor, file.name)
    return state


def load_pretrained(path: str | Path, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> Llama:
    """A model from a local Hugging Face folder (config.json + safetensors) of the LLaMA architecture's families:
    Llama-2 and Llama-3.x (RoPE scaling "llama3"), Qwen2/2.5 (q/k/v biases), Qwen3 (q/k norms), Mistral.

    A config or checkpoint that does not describe exactly the course model raises a ValueError naming the
    file and the field or tensor (see ``ModelConfig.from_dict`` for what is refused).
    """
    path = Path(path)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"load_pretrained: dtype must be a floating-point torch.dtype, got {dtype!r}")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}")
    config = ModelConfig.from_json(path / "config.json")
    with torch.device("meta"):  # build without allocating; the checkpoint supplies every tensor
        model = Llama(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    loaded = {k: v for k, v in _read_safetensors(path).items() if not k.endswith("rotary_emb.inv_freq")}
    for name, (tensor, file) in loaded.items():
        if name in expected and tensor.shape != expected[name]:
            raise ValueError(f"{file}: tensor {name} has shape {list(tensor.shape)}, config.json implies "
                             f"{list(expected[name])}")
        if not tensor.is_floating_point():
            raise ValueError(f"{file}: tensor {name} has dtype {tensor.dtype}; expected a floating-point weight")
    state = {k: t for k, (t, _) in loaded.items()}
    if config.tie_word_embeddings and "lm_head.weight" in state:
        # An identical copy is harmless; a different one leaves two candidate heads: refuse to pick.
        embed = state.get("model.embed_tokens.weight")
        if embed is not None and not torch.equal(state["lm_head.weight"], embed):
            raise ValueError(f"{path}: config.json ties the LM head to the embeddings (tie_word_embeddings: true) "
                             "but the checkpoint carries its own, different lm_head.weight: ambiguous")
        del state["lm_head.weight"]
    missing = sorted(expected.keys() - state.keys() - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
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
