"""Lesson 11's helpers: reading recorded results (and saying what is missing), links, tables, claims, and the
English / 中文 glossary."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from course_lib.review import review
from course_lib.review.glossary import GLOSSARY, glossary_html, lookup
from course_lib.review.review import (BENCHMARKS, Claim, availability, claims_html, engine_summary, engine_vs_hf,
                                      find_values, html_table, is_gpu, latest, lesson_link, lesson_notebook,
                                      not_recorded, recorded)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def results_dir(tmp_path):
    def write(name, **fields):
        (tmp_path / name).write_text(json.dumps(fields))
    write("speculative_cpu-x.json", device="CPU AMD EPYC", cuda=None, date="2026-11-27T21:00:00", speedup=1.2)
    write("speculative_nvidia-h200.json", device="NVIDIA H200", cuda="13.0", date="2026-11-28T10:00:00", speedup=1.3)
    write("speculative_nvidia-h100.json", device="NVIDIA H100", cuda="12.8", date="2026-11-29T10:00:00", speedup=1.4)
    write("roofline_nvidia-h200.json", device="NVIDIA H200", cuda="13.0", date="2026-11-27T10:00:00")
    return tmp_path


def test_recorded_filters_gpu_and_cpu(results_dir):
    assert len(recorded("speculative", results_dir=results_dir)) == 3
    assert [r["device"] for r in recorded("speculative", gpu=False, results_dir=results_dir)] == ["CPU AMD EPYC"]
    gpus = {r["device"] for r in recorded("speculative", gpu=True, results_dir=results_dir)}
    assert gpus == {"NVIDIA H200", "NVIDIA H100"}
    assert latest("speculative", gpu=True, results_dir=results_dir)["device"] == "NVIDIA H100"       # the newest
    assert latest("kv_quant", results_dir=results_dir) is None and recorded("engine", results_dir=results_dir) == []
    assert is_gpu({"device": "NVIDIA H200", "cuda": None}) and not is_gpu({"device": "CPU AMD EPYC (1 threads)"})
    with pytest.raises(ValueError, match="unknown benchmark"):
        recorded("speculativ", results_dir=results_dir)


def test_a_longer_pattern_owns_its_files(results_dir):
    """flash_attention_bwd_<device>.json matches flash_attention_*.json too: it is the backward's result only."""
    for name, device in [("flash_attention_nvidia-h200", "NVIDIA H200"),
                         ("flash_attention_bwd_nvidia-h100", "NVIDIA H100")]:
        (results_dir / f"{name}.json").write_text(json.dumps(dict(device=device, cuda="13.0")))
    assert [r["device"] for r in recorded("flash_attention", results_dir=results_dir)] == ["NVIDIA H200"]
    assert [r["device"] for r in recorded("flash_attention_bwd", results_dir=results_dir)] == ["NVIDIA H100"]


def test_not_recorded_names_the_command():
    assert not_recorded("speculative", gpu=True) == "not recorded yet: run `python -m benchmarks.speculative` on a GPU"
    assert not_recorded("engine").startswith("not recorded yet: run `python -m benchmarks.engine")


def test_availability_lists_every_benchmark(results_dir, tmp_path_factory):
    rows = availability(results_dir)
    assert [r[0] for r in rows] == list(BENCHMARKS)
    spec = rows[list(BENCHMARKS).index("speculative")]
    assert "NVIDIA H200, 2026-11-28" in spec[2] and "CPU AMD EPYC, 2026-11-27" in spec[3]
    empty = availability(tmp_path_factory.mktemp("empty"))
    assert all("—" in r[2] and "—" in r[3] for r in empty)


def test_benchmark_scripts_exist():
    for name, bench in BENCHMARKS.items():
        words = bench.command.split()
        script = ROOT / (words[2].replace(".", "/") + ".py" if words[1] == "-m" else words[1])
        assert script.exists() or name == "engine", f"{name}: {bench.command} names a script that is not there"
        assert lesson_notebook(bench.lesson) or name == "engine", f"{name}: no notebook for lesson {bench.lesson}"


def test_find_values_walks_nested_results():
    record = {"offline": {"ratio_continuous_over_static": 1.9, "static": {"ttft_p50": 5.0}}, "ratio": 2,
              "flag_ratio": True, "name": "ratio", "runs": [{"ratio": 3}]}
    assert find_values(record, "ratio") == {"offline.ratio_continuous_over_static": 1.9, "ratio": 2.0}
    assert find_values(record, "ttft") == {"offline.static.ttft_p50": 5.0}


def test_engine_result_helpers():
    def row(workload, config, kind, tput, status="ok", **kw):
        return dict(workload=workload, config=config, kind=kind, status=status, throughput_tok_s=tput, ttft_p50=1.0,
                    itl_p99=0.02, **kw)
    record = {"rows": [row("chat", "HF generate", "hf", 10), row("chat", "paged + continuous", "engine", 40),
                       row("chat", "+ INT8 KV", "engine", 55, preemptions={"recompute": 3}),
                       row("chat", "+ speculative", "engine", 0, status="not available in this engine"),
                       row("long-cot", "paged + continuous", "engine", 30)],
              "ratios_to_hf": {"chat": {"HF generate": 1.0, "paged + continuous": 4.0, "+ INT8 KV": 5.5}}}
    assert engine_vs_hf(record) == {"chat": ("+ INT8 KV", 5.5)}
    text = engine_summary(record, "chat")
    assert "10 tok/s" in text and "'+ INT8 KV' 55 tok/s (5.5x)" in text and "3 preemptions" in text
    assert engine_summary(record, "long-cot") is None and engine_summary({}, "chat") is None and engine_vs_hf({}) == {}


def test_links_and_tables():
    assert lesson_notebook("1") == "01_kv_cache.ipynb" and lesson_notebook(99) is None
    assert lesson_link("01") == '<a href="01_kv_cache.ipynb">lesson 01</a>' and lesson_link(99) == "lesson 99"
    table = html_table(["a", "b"], [["<x>", "<b>y</b>"]], raw_columns=(1,))
    assert "&lt;x&gt;" in table and "<b>y</b>" in table and table.count("<tr>") == 2


def test_claims():
    c = Claim("decode is memory-bound", "everyone", "1 FLOP/B vs ridge 189", "holds", "00")
    out = claims_html([c, Claim("x", "y", "z", "not recorded yet", "10")])
    assert "✅ holds" in out and "⏳ not recorded yet" in out and '<a href="00_start_here.ipynb">lesson 00</a>' in out
    with pytest.raises(ValueError, match="verdict"):
        Claim("x", "y", "z", "true", "00")


# ---------------------------------------------------------------- glossary
REQUIRED = ["KV cache", "prefill", "decode", "PagedAttention", "block table", "slot mapping", "copy-on-write",
            "continuous batching", "preemption", "swap", "chunked prefill", "prefix caching", "speculative decoding",
            "draft model", "acceptance rate", "tensor parallelism", "pipeline parallelism", "all-reduce",
            "pipeline bubble", "roofline model", "arithmetic intensity", "memory-bound", "quantization", "scale",
            "zero point", "TTFT", "TPOT", "throughput", "GQA", "RoPE", "online softmax", "tiling"]


def test_glossary_has_the_course_vocabulary():
    assert len(GLOSSARY) >= 40
    english = [t.english for t in GLOSSARY]
    assert len(set(english)) == len(english), "duplicate terms"
    for term in REQUIRED:
        assert any(e == term or e.startswith(term + " ") for e in english), f"missing {term!r}"
    cjk = re.compile(r"[\u4e00-\u9fff]")
    for t in GLOSSARY:
        assert cjk.search(t.chinese) and cjk.search(t.definition_zh), t.english
        assert t.definition.strip() and all(lesson_notebook(n) or n.strip() == "10" for n in t.lessons.split(",")), t


def test_glossary_standard_chinese_terms():
    chinese = {t.english: t.chinese for t in GLOSSARY}
    for english, zh in [("prefill", "预填充"), ("decode", "解码"), ("continuous batching", "连续批处理"),
                        ("PagedAttention", "分页注意力"), ("prefix caching", "前缀缓存"),
                        ("speculative decoding", "推测解码"), ("tensor parallelism", "张量并行"),
                        ("pipeline parallelism", "流水线并行"), ("KV cache", "KV 缓存")]:
        assert zh in chinese[english], (english, chinese[english])


def test_lookup_and_html():
    assert [t.english for t in lookup("kv cache")] == ["KV cache"]
    assert any(t.english == "prefix caching" for t in lookup("前缀"))
    with pytest.raises(ValueError):
        lookup("  ")
    out = glossary_html()
    assert out.count("<tr>") == len(GLOSSARY) + 1 and '<a href="02_paged_attention.ipynb">lesson 02</a>' in out


def test_review_reads_the_results_directory_of_the_repository():
    assert review.RESULTS_DIR == ROOT / "benchmarks" / "results" and review.NOTEBOOKS_DIR == ROOT / "notebooks"


#: The Q&A document's own words (shared/seed), as it writes them, and the issue's list (列切分/行切分, the three
#: queues, Split-fuse, beam search, prefix tree, hash chain, GEMM/GEMV, GPipe/1F1B, PD 分离, cross-node
#: communication): each must find a glossary term.
DOCUMENT_WORDS = ["列切分", "行切分", "Waiting", "Running", "Swapped", "Split-fuse", "Chunked Prefill", "Beam Search",
                  "并行采样", "逻辑块", "物理块", "页表", "Block Table", "Copy-on-Write", "引用计数", "Static Batching",
                  "Continuous Batching", "token 级调度", "去重合并", "预测性预加载", "Tiling", "SRAM", "HBM",
                  "Online Softmax", "前缀缓存", "树状结构", "prefix tree", "hash chain", "哈希链", "PP multi-batch",
                  "跨机通讯", "cross-node communication", "NVLink", "micro-batch", "pipeline bubble", "GPipe", "1F1B",
                  "计算密集型", "访存密集型", "GEMM", "GEMV", "权重复用", "计算强度", "Speculative Decoding",
                  "Draft Model", "CoT", "多模态", "量化", "PD 分离", "prefill/decode disaggregation",
                  "图像 encoder", "encoder cache"]


@pytest.mark.parametrize("word", DOCUMENT_WORDS)
def test_glossary_knows_the_documents_words(word):
    assert lookup(word), f"the glossary has no term for the document's {word!r}"


def test_column_and_row_split_in_chinese():
    chinese = {t.english: t.chinese for t in GLOSSARY}
    assert "列切分" in chinese["column-parallel linear"] and "行切分" in chinese["row-parallel linear"]
    assert [t.english for t in lookup("queue")] == ["waiting queue", "running queue", "swapped queue"]


def test_every_recorded_file_belongs_to_the_benchmark_that_reads_it():
    """A new result file whose name also matches a shorter pattern (flash_attention_gluon_configs_x.json is a
    flash_attention_*.json too) must not reach the reader of that pattern: its ``benchmark`` field says whose it is
    (lesson 11 read the Gluon sweep as the forward's result until the review listed it)."""
    own = {"batching": "engine_batching"}   # the benchmark field where it differs from the review's name
    for name in BENCHMARKS:
        fields = {r.get("benchmark") for r in recorded(name)} - {None}
        assert fields <= {own.get(name, name)}, (name, fields)
