"""benchmarks.host_prefill: the host's share of the prefill steps, with stub forward passes (its machinery, not its
times)."""
import json

import pytest

from benchmarks import host_prefill


@pytest.mark.command
def test_quick_run_times_every_step_with_prompt_tokens(tmp_path):
    out = tmp_path / "host_prefill.json"
    result = host_prefill.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert [r["prefix_caching"] for r in result["rows"]] == [False, True]
    for row in result["rows"]:
        # 32 prompts of 64-512 tokens through 512-token steps: several steps, each full of prompt tokens but the last
        assert row["prefill_steps"] >= row["prompt_tokens"] // row["max_num_batched_tokens"] > 1
        assert row["prompt_tokens"] + row["decode_tokens"] <= row["prefill_steps"] * row["max_num_batched_tokens"]
        assert row["sched_step_mean_s"] > 0 and row["prep_step_mean_s"] > 0
        assert abs(row["host_step_mean_s"] - row["sched_step_mean_s"] - row["prep_step_mean_s"]) < 1e-9
    # both rows serve the same trace: the same steps and tokens, with or without the prefix cache
    a, b = result["rows"]
    assert (a["prefill_steps"], a["prompt_tokens"]) == (b["prefill_steps"], b["prompt_tokens"])
