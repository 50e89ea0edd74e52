"""Lessons 04-06's recorded runs as numbers and README rows (course_lib.analysis.feature_lines): every recorded file,
CPU and GPU, gives a summary whose ratio is the product of its factors, and every GPU file's row is in the README."""
from __future__ import annotations

import copy

import pytest

from course_lib.analysis import claims, feature_lines
from course_lib.analysis.roofline import RESULTS_DIR

README = (RESULTS_DIR.parents[1] / "README.md").read_text(encoding="utf-8")
KINDS = {"batching_*.json": (feature_lines.batching_summary, feature_lines.batching_row),
         "prefix_caching_*.json": (feature_lines.prefix_summary, feature_lines.prefix_row),
         "speculative_*.json": (feature_lines.speculative_summary, feature_lines.speculative_row)}


@pytest.mark.parametrize("pattern", list(KINDS))
def test_every_recorded_file_has_a_summary_and_every_gpu_file_its_readme_row(pattern):
    summary, row = KINDS[pattern]
    runs = claims.recorded(pattern, gpu_only=False)
    assert runs, f"no {pattern} recorded"
    for run in runs:
        assert summary(run)
        if run in claims.recorded(pattern):
            lesson, what, text = row(run)
            assert f"| {lesson} | {what} | {text} |" in README, run["file"]
            assert "tiny model" in what and run["file"] in what


def test_batching_ratio_is_fewer_steps_times_cheaper_steps():
    for run in claims.recorded("batching_*.json", gpu_only=False):
        b = feature_lines.batching_summary(run)
        assert b["ratio"] == pytest.approx(run["ratio_continuous_over_static"], rel=1e-9)
        assert b["ratio"] == pytest.approx(b["steps_ratio"] * b["step_time_ratio"], rel=1e-9)
        assert b["steps_ratio"] > 1   # continuous batching never needs more steps on the same trace


def test_batching_row_explains_only_what_the_numbers_show():
    run = claims.recorded("batching_*.json")[0]
    text = feature_lines.batching_row(run)[2]
    assert "rounds differently" in text and "chunking pays" in text   # bf16 and 64%; chunked gap longer there
    fixed = copy.deepcopy(run)
    fixed["identical_outputs_fraction"] = 1.0
    lp = fixed["long_prompt"]
    lp["chunked"]["decode_itl_max_s"] = lp["unchunked"]["decode_itl_max_s"] / 2
    text = feature_lines.batching_row(fixed)[2]
    assert "100% of the outputs identical" in text and "rounds differently" not in text and "chunking pays" not in text


def test_prefix_summary_ratios_and_speculative_best_gamma():
    for run in claims.recorded("prefix_caching_*.json", gpu_only=False):
        for name, p in feature_lines.prefix_summary(run).items():
            assert p["ratio"] == pytest.approx(p["ttft"][0] / p["ttft"][1]) and 0 <= p["hit_rate"] <= 1, name
            assert p["prefill_tokens"][1] <= p["prefill_tokens"][0], name
    for run in claims.recorded("speculative_*.json", gpu_only=False):
        s = feature_lines.speculative_summary(run)
        for r in run["runs"]:
            t = s["temperatures"][r["temperature"]]
            speedups = [p["speedup"] for p in r["points"]]
            assert t["best"] == max(speedups) and t["speedups"] == (min(speedups), max(speedups))
            assert next(p["gamma"] for p in r["points"] if p["speedup"] == t["best"]) == t["best_gamma"]


def test_each_feature_benchmark_prints_its_readme_row_on_a_gpu_only(capsys):
    """benchmarks.record.print_readme_row, called by the three benchmarks after writing their file: a GPU file's row
    is the README's own; a CPU file (not in the README's GPU table) and a quick run print nothing."""
    from benchmarks.record import print_readme_row

    for pattern in KINDS:
        for run in claims.recorded(pattern, gpu_only=False):
            line = print_readme_row(RESULTS_DIR / run["file"])
            out = capsys.readouterr().out
            if run in claims.recorded(pattern):
                assert line and line in README and line in out, run["file"]
            else:
                assert line is None and out == "", run["file"]
    run = claims.recorded("batching_*.json")[0]
    assert feature_lines.summary(dict(run, quick=True), run["file"]) is None
