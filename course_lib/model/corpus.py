"""The course's text: the King James Version of the Bible (1611, public domain), one chapter per block.

It is the training text of the shipped tiny models (``tools/train_tiny.py``); a fixed 4% of the chapters
is held out for validation (perplexity in later lessons). Extracted from Debian's ``bible-kjv-text``
package with ``bible -l0 Gen1:1-Rev22:21`` and reformatted as "Book N" headings followed by
"verse-number text" lines.
"""
from __future__ import annotations

import gzip
from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "assets" / "kjv.txt.gz"
VALIDATION_EVERY = 25  # chapter i is held out when i % 25 == 12: 48 of 1,189 chapters, spread over the books


def chapters() -> list[str]:
    """Every chapter as one string: its heading line, then its verses."""
    text = gzip.decompress(PATH.read_bytes()).decode("utf-8")
    return [c.strip() + "\n" for c in text.split("\n\n") if c.strip()]


def load_text(split: str = "train") -> str:
    """Training or validation text: the chapters of that split joined by blank lines."""
    if split not in ("train", "validation", "all"):
        raise ValueError(f"split must be 'train', 'validation' or 'all', got {split!r}")
    keep = {
        "train": lambda i: i % VALIDATION_EVERY != 12,
        "validation": lambda i: i % VALIDATION_EVERY == 12,
        "all": lambda i: True,
    }[split]
    return "\n".join(c for i, c in enumerate(chapters()) if keep(i))
