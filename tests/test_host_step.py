"""benchmarks.host_step: the host's share of a step, with stub forward passes (its machinery, not its times)."""
import json

import pytest

from benchmarks import host_step


@pytest.mark.command
def test_quick_run_counts_the_steps_of_its_trace(tmp_path):
    out = tmp_path / "host.json"
    result = host_step.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    for row in result["rows"]:
        # every prompt fits one step's budget: one prefill step gives each request its first token, then one decode
        # step per further token
        assert row["steps"] == row["output_tokens"]
        assert row["step_api_decode_steps"] == row["output_tokens"] - 1
        assert row["generate_per_step_s"] > 0 and row["sched_per_seq_median_s"] > 0
        # both input preparations ran in every decode step: the graphs' staging and the eager StepBatch
        assert row["prep_graph_per_seq_median_s"] > 0 and row["prep_eager_per_seq_median_s"] > 0
        assert row["host_step_median_s"] >= row["sched_step_median_s"]


def test_best_of_takes_each_time_at_its_minimum_and_the_counts_as_they_are():
    rows = [dict(batch=8, steps=5, sched_step_median_s=2.0, host_step_median_s=1.0),
            dict(batch=8, steps=5, sched_step_median_s=1.0, host_step_median_s=3.0)]
    assert host_step.best_of(rows) == dict(batch=8, steps=5, sched_step_median_s=1.0, host_step_median_s=1.0)
