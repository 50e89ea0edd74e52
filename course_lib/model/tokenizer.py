"""A thin wrapper over a Hugging Face ``tokenizer.json`` (byte-level BPE), the format real checkpoints ship."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

EOS = "<|endoftext|>"


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self._tok = _HFTokenizer.from_file(str(path))
        self.eos_id: int | None = self._tok.token_to_id(EOS)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(map(int, ids)))

    def token_strings(self, ids) -> list[str]:
        """Each id decoded on its own: shows where the tokenizer cut the text."""
        return [self._tok.decode([int(i)]) for i in ids]
