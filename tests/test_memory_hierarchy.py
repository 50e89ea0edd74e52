"""Spec-sheet estimates of GPU memory bandwidths (course_lib.analysis.memory_hierarchy)."""
from __future__ import annotations

import pytest

from course_lib.analysis.memory_hierarchy import (GPU_SPECS, bandwidth_table, implied_peak_flops, l2_bandwidth,
                                                  smem_bandwidth)


def test_a100_sram_is_the_flashattention_papers_19_tb_s():
    a100 = GPU_SPECS["A100 SXM4 40GB"]
    assert smem_bandwidth(a100) == pytest.approx(108 * 128 * 1.41e9)
    assert 19e12 < smem_bandwidth(a100) < 20e12


@pytest.mark.parametrize("name", list(GPU_SPECS))
def test_clock_matches_the_datasheet_peak(name):
    spec = GPU_SPECS[name]
    assert implied_peak_flops(spec) == pytest.approx(spec.peak_flops, rel=0.01)


def test_a100_l2_is_2_3x_v100():
    """A100 whitepaper: 2.3x V100's L2 read bandwidth; V100: 2,048 B/clock at 1.53 GHz."""
    assert l2_bandwidth(GPU_SPECS["A100 SXM4 80GB"]) / (2048 * 1.53e9) == pytest.approx(2.3, abs=0.05)
    assert l2_bandwidth(GPU_SPECS["H100 SXM5 80GB"]) is None       # not published: measured instead


def test_table_orders_sram_above_l2_above_hbm():
    for row in bandwidth_table():
        assert row["smem"] > row["hbm"] and (row["l2"] is None or row["smem"] > row["l2"] > row["hbm"])
        assert 5 < row["smem_over_hbm"] < 13


def test_benchmark_machinery_runs_in_the_interpreter(tmp_path):
    """--smoke: the Triton read kernel's sum checked against torch, bytes counted, the JSON written."""
    import json

    from benchmarks.memory_hierarchy import main, read_sum, spec_for
    import torch

    x = torch.arange(5000, dtype=torch.float32)
    assert read_sum(x, passes=3, num_programs=2, block=256).sum().item() == 3 * x.sum().item()
    with pytest.raises(ValueError, match="float32"):
        read_sum(x.half())
    result = main(["--smoke", "--out", str(tmp_path / "m.json")])
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["l2"]["bytes_read"] == saved["l2"]["passes"] * saved["l2"]["size_bytes"] and saved["smoke"]
    assert result["l2_bytes_per_s"] > 0 and result["hbm_bytes_per_s"] > 0
    assert spec_for("NVIDIA H100 80GB HBM3") == "H100 SXM5 80GB" and spec_for("NVIDIA L4") is None
