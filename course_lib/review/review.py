"""The interview review (lesson 11): where each recorded number lives, links to the lessons, claims and tables.

Every answer of the review is either computed live with ``course_lib`` or read from ``benchmarks/results/*.json``.
A result file that is not there is never replaced by a number typed in: ``not_recorded(name)`` says which
command records it, e.g. ``not recorded yet: run `python -m benchmarks.speculative` on a GPU``.
"""
from __future__ import annotations

import fnmatch
import html
import json
from dataclasses import dataclass
from pathlib import Path

from course_lib.analysis.roofline import RESULTS_DIR

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"


@dataclass(frozen=True)
class Benchmark:
    pattern: str      # file name pattern in benchmarks/results/
    command: str      # what records it
    lesson: str       # the lesson that plots it


#: The recorded results the review reads, and the command that (re)records each one.
BENCHMARKS = {
    "roofline": Benchmark("roofline_*.json", "python -m benchmarks.roofline", "00"),
    "paged_attention": Benchmark("paged_attention_*.json", "python -m benchmarks.paged_attention", "02"),
    "flash_attention": Benchmark("flash_attention_*.json", "python -m benchmarks.flash_attention", "03"),
    "flash_attention_bwd": Benchmark("flash_attention_bwd_*.json", "python -m benchmarks.flash_attention_bwd", "03"),
    "flash_attention_hopper": Benchmark("flash_attention_hopper_*.json", "python -m benchmarks.flash_attention_hopper",
                                        "03"),
    "flash_attention_configs": Benchmark("flash_attention_configs_*.json",
                                         "python -m benchmarks.flash_attention_configs", "03"),
    "flash_attention_gluon_configs": Benchmark("flash_attention_gluon_configs_*.json",
                                               "python -m benchmarks.flash_attention_gluon_configs", "03"),
    "flash_attention_gluon_resources": Benchmark("flash_attention_gluon_resources_*.json",
                                                 "python -m benchmarks.flash_attention_gluon_resources", "03"),
    "batching": Benchmark("batching_*.json", "python -m benchmarks.engine_batching", "04"),
    "prefix_caching": Benchmark("prefix_caching_*.json", "python -m benchmarks.prefix_caching", "05"),
    "speculative": Benchmark("speculative_*.json", "python -m benchmarks.speculative", "06"),
    "kv_quant": Benchmark("kv_quant_*.json", "python -m benchmarks.kv_quant", "07"),
    "int8_kernel_resources": Benchmark("int8_kernel_resources_*.json", "python -m benchmarks.int8_kernel_resources",
                                       "07"),
    "parallel": Benchmark("parallel_*.json", "python -m benchmarks.parallel", "08"),
    "engine": Benchmark("engine_*.json", "python -m benchmarks.engine", "10"),   # the capstone's (--quick on a CPU)
    "memory_hierarchy": Benchmark("memory_hierarchy_*.json", "python -m benchmarks.memory_hierarchy", "11"),
}


def is_gpu(record: dict) -> bool:
    """Whether a result file was recorded on a GPU (its ``cuda`` field, or a device name not starting with CPU)."""
    return record.get("cuda") is not None or not str(record.get("device", "CPU")).upper().startswith("CPU")


def recorded(name: str, *, gpu: bool | None = None, results_dir: Path | None = None) -> list[dict]:
    """Every result file of benchmark ``name`` (a key of ``BENCHMARKS``); only GPU (``gpu=True``) or only CPU
    (``gpu=False``) ones if asked; [] when none is recorded. A file that another benchmark's longer pattern
    matches is that one's (``flash_attention_bwd_x.json`` is not a ``flash_attention_*.json`` result)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    folder, pattern = Path(results_dir or RESULTS_DIR), BENCHMARKS[name].pattern
    longer = [b.pattern for b in BENCHMARKS.values() if len(b.pattern) > len(pattern)]
    records = [json.loads(path.read_text()) for path in sorted(folder.glob(pattern))
               if not any(fnmatch.fnmatch(path.name, other) for other in longer)]
    return [r for r in records if gpu is None or is_gpu(r) == gpu]


def latest(name: str, *, gpu: bool | None = None, results_dir: Path | None = None) -> dict | None:
    """The most recent result of benchmark ``name`` (by its ``date``), or None when none is recorded."""
    records = recorded(name, gpu=gpu, results_dir=results_dir)
    return max(records, key=lambda r: str(r.get("date", ""))) if records else None


def not_recorded(name: str, *, gpu: bool | None = None) -> str:
    """What to say instead of a number: ``not recorded yet: run `python -m benchmarks.x` [on a GPU]``."""
    where = " on a GPU" if gpu else " on a CPU" if gpu is False else ""
    return f"not recorded yet: run `{BENCHMARKS[name].command}`{where}"


def source(record: dict) -> str:
    """``NVIDIA H200, 2026-11-27``: the device and date of a recorded result."""
    return f"{record.get('device', '?')}, {str(record.get('date', '?'))[:10]}"


def availability(results_dir: Path | None = None) -> list[list[str]]:
    """One row per benchmark: name, lesson, what is recorded on GPU and on CPU (device, date) or the command."""
    rows = []
    for name, bench in BENCHMARKS.items():
        cells = []
        for gpu in (True, False):
            records = recorded(name, gpu=gpu, results_dir=results_dir)
            cells.append("; ".join(source(r) for r in records) or f"— (`{bench.command}`)")
        rows.append([name, bench.lesson, *cells])
    return rows


def find_values(record: dict, *words: str) -> dict[str, float]:
    """Every number in a (nested) result whose dotted path contains one of ``words``:
    ``find_values(r, "ratio")`` -> ``{"offline.ratio_continuous_over_static": 1.89, ...}``. For results whose
    layout the review does not assume (e.g. the capstone's)."""
    found = {}

    def walk(x, path):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, (int, float)) and not isinstance(x, bool) and any(w in path for w in words):
            found[path] = float(x)

    walk(record, "")
    return found


# ---------------------------------------------------------------- the capstone's result (benchmarks/engine.py)
def engine_rows(record: dict, workload: str) -> list[dict]:
    """The rows of one workload ("chat", "multi-turn", "long-cot", "multimodal") that ran (status "ok")."""
    return [r for r in record.get("rows", []) if r.get("workload") == workload and r.get("status") == "ok"]


def engine_vs_hf(record: dict) -> dict[str, tuple[str, float]]:
    """Per workload: (the fastest engine row, its throughput / transformers' ``generate()``), from ``ratios_to_hf``."""
    out = {}
    for workload, by_config in record.get("ratios_to_hf", {}).items():
        kinds = {r["config"]: r.get("kind") for r in engine_rows(record, workload)}
        engine = {c: x for c, x in by_config.items() if kinds.get(c) == "engine"}
        if engine:
            best = max(engine, key=engine.get)
            out[workload] = (best, engine[best])
    return out


def engine_summary(record: dict, workload: str) -> str | None:
    """One sentence on a workload of the capstone's result: the HF baseline vs the fastest engine row (throughput,
    TTFT p50, inter-token latency p99, preemptions), or None if the workload has no HF and engine rows."""
    rows = engine_rows(record, workload)
    hf = next((r for r in rows if r.get("kind") == "hf"), None)
    engine = [r for r in rows if r.get("kind") == "engine"]
    if not hf or not engine:
        return None
    best = max(engine, key=lambda r: r["throughput_tok_s"])
    preempted = sum((best.get("preemptions") or {}).values())
    return (f"{workload}: transformers generate() {hf['throughput_tok_s']:.0f} tok/s; engine '{best['config']}' "
            f"{best['throughput_tok_s']:.0f} tok/s ({best['throughput_tok_s'] / hf['throughput_tok_s']:.1f}x), "
            f"TTFT p50 {hf['ttft_p50']:.3g} -> {best['ttft_p50']:.3g} s, "
            f"inter-token p99 {hf['itl_p99'] * 1e3:.3g} -> {best['itl_p99'] * 1e3:.3g} ms"
            + (f", {preempted} preemptions" if preempted else ""))


# ---------------------------------------------------------------- links and tables
def lesson_notebook(lesson: str | int) -> str | None:
    """The file name of lesson ``NN``'s notebook (``"01" -> "01_kv_cache.ipynb"``), or None if it is not there."""
    matches = sorted(NOTEBOOKS_DIR.glob(f"{int(lesson):02d}_*.ipynb"))
    return matches[0].name if matches else None


def lesson_link(lesson: str | int) -> str:
    """An HTML link to lesson ``NN`` (relative to notebooks/), or plain text if its notebook does not exist yet."""
    name = lesson_notebook(lesson)
    text = f"lesson {int(lesson):02d}"
    return f'<a href="{name}">{text}</a>' if name else text


def html_table(headers: list[str], rows: list[list], *, raw_columns: tuple[int, ...] = ()) -> str:
    """A plain HTML table; cells are escaped except in ``raw_columns`` (already HTML, e.g. links)."""
    def cell(i, v):
        return str(v) if i in raw_columns else html.escape(str(v))

    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{cell(i, v)}</td>" for i, v in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------- myth vs measurement
VERDICTS = {"holds": "✅ holds", "partly": "⚠️ partly", "does not hold": "❌ does not hold",
            "not recorded yet": "⏳ not recorded yet"}


@dataclass(frozen=True)
class Claim:
    """A popular claim, what the course measured or computed, and the verdict those numbers give."""

    claim: str
    said_by: str
    measured: str
    verdict: str      # a key of VERDICTS, decided by the numbers in the cell that builds the Claim
    lesson: str

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {list(VERDICTS)}, got {self.verdict!r}")


def claims_html(claims: list[Claim]) -> str:
    """The myth-vs-measurement table."""
    rows = [[c.claim, c.said_by, c.measured, VERDICTS[c.verdict], lesson_link(c.lesson)] for c in claims]
    return html_table(["claim", "heard from", "the course's numbers", "verdict", "lesson"], rows, raw_columns=(4,))
