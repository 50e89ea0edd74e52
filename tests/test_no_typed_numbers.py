"""No typed speed ratios in the lessons' prose (issue 19): a ratio a lesson states ("1.3-1.5x", "18.7x") is printed by a
code cell from a result file in benchmarks/results/, so that it changes when the file does. A markdown cell may
state a ratio only where it quotes a sourced external figure: the ALLOWED list below, each entry with its source.
The README's GPU table is generated from the result files (tools/results_table.py) and must be up to date. No
notebook's markdown types a run time ("runs in about 35 s"): a run time is quoted between run-time markers, rendered
from benchmarks/results/run_times_*.json by tools/run_times.py (issue 23; tests/test_run_times.py checks they agree)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tools.run_times import stray_quotes

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

# a ratio: "18.7x", "1.3-1.5x", "14-24×", "2.2 x" (not "4 x 576", a product, nor "0x1F", a hex literal)
RATIO = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:\s*[-–]\s*\d+(?:\.\d+)?)?\s?[x×](?![\w\d])(?!\s*\d)")
# ... stated about speed: the sentence it is in speaks of time, throughput or a baseline
SPEED = re.compile(r"faster|slower|speed|throughput|tok/s|TFLOP|bandwidth|TTFT|latency|the time|\bvs\b|"
                   r"Hugging Face|\bHF\b|SDPA|cuDNN", re.IGNORECASE)

#: (lesson prefix, text that must appear in the sentence, its source): sourced external figures a lesson may quote
ALLOWED = [
    ("10", "24x", "vLLM launch blog post, Kwon et al., 'vLLM: Easy, Fast, and Cheap LLM Serving with PagedAttention', "
                  "June 2023: up to 24x HF Transformers' throughput (LLaMA-7B on an A10G, LLaMA-13B on an A100-40GB)"),
    ("10", "14-24x", "same vLLM blog post: 14-24x with one completion per request"),
    ("10", "2.2-2.5x", "same vLLM blog post: 2.2-2.5x HF's Text Generation Inference, one completion per request"),
    ("10", "3.5x", "same vLLM blog post: up to 3.5x TGI with three parallel completions per request"),
    ("10", "3.3-3.5x", "same vLLM blog post: 3.3-3.5x TGI with three parallel completions per request"),
    ("10", "8.5-15x", "same vLLM blog post: 8.5-15x HF Transformers with three parallel completions per request"),
    ("10", "10x its continuous batching", "issue 19's targets (a target, not a result): >= 10x HF generate_batch"),
    ("04", "23x", "Anyscale blog post, Daniel et al., 'How continuous batching enables 23x throughput in LLM "
                  "inference while reducing p50 latency', June 2023"),
    ("11", "14-24x", "vLLM launch blog post (June 2023), as above"),
    ("11", "2-4x", "FlashAttention's README (Dao et al., first release, 2022): 2-4x over standard attention"),
    ("11", "5-20x", "FlashAttention's README (first release, 2022): memory 5-20x less than standard attention"),
    ("11", "10x", "FlashAttention paper (Dao et al., 2022, section 2.1): A100 SRAM ~19 TB/s vs HBM 1.5-2.0 TB/s"),
    ("11", "9-12x", "the same paper's figures, 19 / 2.0 to 19 / 1.555"),
]


def typed_ratios(text: str) -> list[tuple[str, str]]:
    """(ratio, sentence) for every speed ratio a piece of markdown states."""
    found = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n\s*\n|\n\s*[*>|-] ", text):
        for m in RATIO.finditer(sentence):
            if SPEED.search(sentence):
                found.append((m.group(0), " ".join(sentence.split())))
    return found


def _allowed(lesson: str, ratio: str, sentence: str) -> bool:
    return any(lesson.startswith(prefix) and needle in sentence and ratio.replace(" ", "").replace("×", "x")
               in needle.replace("×", "x") for prefix, needle, _ in ALLOWED)


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lessons_state_no_typed_speed_ratio(path):
    nb = nbformat.read(path, as_version=4)
    bad = [f"cell {cell.get('id')}: {ratio!r} in \"{sentence[:160]}\""
           for cell in nb.cells if cell.cell_type == "markdown"
           for ratio, sentence in typed_ratios(cell.source)
           if not _allowed(path.name, ratio, sentence)]
    assert not bad, ("a speed ratio typed in prose (print it from a result file in a code cell, or add a sourced "
                     "external figure to ALLOWED):\n  " + "\n  ".join(bad))


def test_the_detector_catches_typed_ratios():
    assert [r for r, _ in typed_ratios("Ours is faster: 1.3-1.5x at D=128.")] == ["1.3-1.5x"]
    assert [r for r, _ in typed_ratios("fastest row vs HF: chat 18.7x")] == ["18.7x"]
    assert typed_ratios("a prompt of 4 x 576 image tokens, faster") == []  # a product, not a ratio
    assert typed_ratios("the step is up to 2x finer") == []  # not about speed
    assert not _allowed("03_flash_attention.ipynb", "1.3-1.5x", "1.3-1.5x faster than SDPA")
    assert _allowed("10_capstone.ipynb", "24x", "vLLM is 24x faster than Hugging Face")


def test_every_allowed_figure_names_its_source():
    for prefix, needle, source in ALLOWED:
        assert RATIO.search(needle) and len(source) > 20, (prefix, needle)


def test_readme_results_table_is_computed_from_the_files():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "results_table.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_notebook_types_a_run_time():
    found = stray_quotes()
    assert not found, ("a run time typed in a notebook's markdown (quote it between <!-- run-time --> markers, which "
                       "tools/run_times.py renders from its file, or drop it):\n  " + "\n  ".join(found))
