"""Lesson 11's check of the Q&A document's 14 numbers to remember (course_lib.review.doc_numbers)."""
from __future__ import annotations

import pytest

from course_lib.review.doc_numbers import DOCUMENT_NUMBERS, KINDS, DocNumber, document_numbers
from course_lib.review.review import latest


def _recorded():
    from course_lib.analysis.claims import real_size_serving_runs, strongest_hf_per_trace

    return dict(flash=latest("flash_attention", gpu=True), batching=latest("batching"),
                engine=latest("engine", gpu=True), roofline=latest("roofline", gpu=True),
                serving=strongest_hf_per_trace(real_size_serving_runs()))


@pytest.mark.parametrize("records", [{}, "recorded"], ids=["nothing recorded", "recorded files"])
def test_fourteen_rows_each_with_a_value_and_a_kind(records):
    rows = document_numbers(**(_recorded() if records == "recorded" else records))
    assert len(rows) == len(DOCUMENT_NUMBERS) == 14
    assert [(r.number, r.use) for r in rows] == list(DOCUMENT_NUMBERS)          # the document's order
    for r in rows:
        assert r.kind in KINDS and r.value.strip() and r.source.strip() and r.course.strip(), r


def test_nothing_recorded_means_no_measured_row_and_the_command_named():
    rows = document_numbers()
    assert "measured" not in {r.kind for r in rows}
    assert sum("not recorded yet: run `python -m benchmarks." in r.course for r in rows) >= 4


def test_recorded_files_make_rows_measured():
    rec = _recorded()
    rows = {r.number: r for r in document_numbers(**rec)}
    if rec["flash"]:
        assert rows["FlashAttention加速: 2-4x"].kind == "measured"
        assert rows["FlashAttention显存: 5-20x减少"].kind == "measured"
    if rec["batching"]:
        row = rows["Continuous Batching: 2-3x吞吐"]
        assert row.kind == "measured" and "fewer steps" in row.value   # the ratio with its factors
    if rec["serving"]:   # the real-size serving result leads; the tiny model's is labelled host-bound
        course = rows[DOCUMENT_NUMBERS[0][0]].course                  # the document's first row: 14-24x
        assert course.startswith("LLMEngine vs transformers' strongest system") and "host-bound" in course


def test_recomputed_values():
    rows = {r.number: r for r in document_numbers()}
    assert "1.68 GB = 1.56 GiB" in rows["LLaMA-13B单序列KV: ~1.7GB"].value
    assert "19.5 TB/s" in rows["A100 SRAM: 19 TB/s"].value          # 108 x 128 B x 1.41 GHz
    assert rows["PagedAttention浪费: <4%"].value.startswith("2.3% at P = 16")
    assert sum(r.kind == "recomputed" for r in rows.values()) >= 5


def test_a_row_needs_a_known_kind_and_a_value():
    with pytest.raises(ValueError, match="kind"):
        DocNumber("x", "y", "1", "guessed", "src", "course")
    with pytest.raises(ValueError, match="value"):
        DocNumber("x", "y", "", "sourced", "src", "course")
