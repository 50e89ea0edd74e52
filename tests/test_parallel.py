"""course_lib.parallel: real 2-process gloo runs (TP=2, PP=2) equal the single-process model; schedules; CLI.

The multi-process tests spawn two CPU processes each (a few seconds apiece): kept to a handful.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from course_lib import load_tiny
from course_lib.parallel import __main__ as cli
from course_lib.parallel.check import Comparison, run_pp, run_tp, sample_batch
from course_lib.parallel.launcher import RankError, launch
from course_lib.parallel.lockstep import lockstep_greedy
from course_lib.parallel.pipeline import Stage, split_layers
from course_lib.parallel.schedule import bubble_formula, max_in_flight, measured_bubble, simulate, stage_ops
from course_lib.parallel.simulate import run_ranks
from course_lib.parallel.tensor import greedy_no_cache, shard_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return load_tiny("target", dtype=torch.float32, device="cpu")[0]


@pytest.fixture(scope="module")
def ids():
    return sample_batch(4, 16)


# ---------------------------------------------------------------- real processes (gloo)
def test_tp2_equals_single_process_and_counts_all_reduces(ids, model):
    result = run_tp(2, ids, steps=3, backend="gloo")
    assert result.ok, result.summary()
    assert result.max_abs_diff < 1e-4 and result.tokens.shape == (4, 3)
    L, E = model.config.num_hidden_layers, model.config.hidden_size
    for r in result.ranks:
        assert r["all_reduces"] == 2 * L                      # o_proj and down_proj of every layer
        assert r["bytes"] == 2 * L * ids.numel() * E * 4       # each one carries [B, S, E] fp32
        assert torch.equal(r["logits"], result.ranks[0]["logits"])  # every rank ends with the same logits


@pytest.mark.parametrize("schedule, m", [("gpipe", 2), ("1f1b", 4)])
def test_pp2_equals_single_process(ids, schedule, m):
    result = run_pp(2, ids, m, schedule=schedule, steps=3, backend="gloo", reps=1)
    assert result.ok, result.summary()
    assert [r["layers"] for r in result.ranks] == [[0, 1, 2], [3, 4, 5]]
    events = [e for r in result.ranks for e in r["events"]]
    computes = [e for e in events if e["kind"] == "compute"]
    assert sorted((e["stage"], e["mb"]) for e in computes) == [(s, j) for s in range(2) for j in range(m)]
    for j in range(m):  # stage 1 starts micro-batch j only after stage 0 has finished it
        end0 = next(e["end"] for e in computes if (e["stage"], e["mb"]) == (0, j))
        start1 = next(e["start"] for e in computes if (e["stage"], e["mb"]) == (1, j))
        assert start1 >= end0 - 1e-3
    assert 0 < measured_bubble(events) < 1
    assert max_in_flight(events) <= (2 if schedule == "1f1b" else m)


def _raise_on_rank1(ctx):
    if ctx.rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 would wait here forever: the launcher must stop it


def _sleep(ctx, seconds):
    time.sleep(seconds)


def test_launcher_propagates_errors_and_timeouts():
    t0 = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 of 2 \(gloo\) failed(.|\n)*ValueError: boom on rank 1"):
        launch(_raise_on_rank1, 2, backend="gloo", timeout_s=60)
    with pytest.raises(TimeoutError, match="did not finish in 2 s"):
        launch(_sleep, 2, 60, backend="gloo", timeout_s=2)
    assert time.monotonic() - t0 < 40


def test_cli_exit_code_zero_when_equal():
    proc = subprocess.run([sys.executable, "-m", "course_lib.parallel", "--pp", "2", "--microbatches", "2",
                           "--batch", "2", "--seq", "8", "--steps", "2"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "COURSE_FORCE_CPU": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "EQUAL" in proc.stdout and "bubble measured" in proc.stdout


# ---------------------------------------------------------------- the CLI's logic, without processes
def test_cli_exit_code_one_when_different(monkeypatch, capsys):
    fake = Comparison("tp=2", "gloo", 0.5, False, True, 1e-5,
                      [dict(rank=0, all_reduces=12, num_layers=6, bytes=1, forward_s=0.1)],
                      torch.zeros(1, 2, dtype=torch.long))
    monkeypatch.setattr(cli, "run_tp", lambda *a, **k: fake)
    assert cli.main(["--tp", "2", "--batch", "1", "--seq", "4"]) == 1
    assert "DIFFERENT" in capsys.readouterr().out


def test_cli_rejects_tp_that_does_not_divide_kv_heads(capsys):
    with pytest.raises(SystemExit) as exit_:   # a usage error (parser.error), before any rank starts
        cli.main(["--tp", "3"])
    assert exit_.value.code == 2
    assert "num_key_value_heads % tp == 0, got Hkv=4" in capsys.readouterr().err


# ---------------------------------------------------------------- TP in one process (threads stand for ranks)
@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_model_in_threads_equals_model(model, ids, tp):
    def rank_fn(rank, all_reduce):
        sharded, stats = shard_model(model, rank, tp, all_reduce=all_reduce)
        return sharded(ids), stats.all_reduces

    out, group = run_ranks(rank_fn, [(r,) for r in range(tp)], timeout_s=60)
    want = model(ids)
    for logits, count in out:
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        assert count == 2 * model.config.num_hidden_layers
    assert group.calls == [12] * tp
    sharded, _ = shard_model(model, 0, tp)
    attn = sharded.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (8 // tp, 4 // tp)
    assert attn.k_proj.weight.shape == (4 // tp * 32, 256) and attn.o_proj.weight.shape == (256, 8 // tp * 32)


def test_tp_size_must_divide_kv_heads(model):
    with pytest.raises(ValueError, match="num_key_value_heads % tp == 0"):
        shard_model(model, 0, 8)


# ---------------------------------------------------------------- PP and schedules in one process
def test_stages_chained_equal_model(model, ids):
    x = ids
    for s in range(3):
        x = Stage(model, s, 3)(x)
    torch.testing.assert_close(x, model(ids), rtol=0, atol=0)
    assert split_layers(6, 4) == [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]
    with pytest.raises(ValueError):
        split_layers(6, 7)


@pytest.mark.parametrize("p, m", [(1, 1), (2, 1), (2, 4), (4, 4), (4, 16), (8, 3)])
def test_ideal_bubble_matches_formula(p, m):
    assert measured_bubble(simulate("gpipe", p, m)) == pytest.approx(bubble_formula(p, m))
    # Training: GPipe and 1F1B have the same bubble (F and B of equal cost here), 1F1B holds <= p in flight.
    for schedule in ("gpipe", "1f1b"):
        events = simulate(schedule, p, m, backward=True, t_backward=1.0)
        assert measured_bubble(events) == pytest.approx(bubble_formula(p, m))
    assert max_in_flight(simulate("gpipe", p, m, backward=True)) == m
    assert max_in_flight(simulate("1f1b", p, m, backward=True)) == min(p, m)


@pytest.mark.parametrize("p, m", [(1, 2), (2, 4), (3, 2), (4, 4)])
def test_lockstep_pipeline_is_the_model_and_the_ideal_schedule(model, ids, p, m):
    stages = [Stage(model, s, p) for s in range(p)]
    tokens, events = lockstep_greedy(stages, ids, 2, m, clock=5)
    assert torch.equal(tokens, greedy_no_cache(model, ids, 2)[1])
    compute = [e for e in events if e["kind"] == "F"]
    assert len(compute) == 2 * p * m and min(e["start"] for e in events) == 5
    assert measured_bubble(events) == pytest.approx(bubble_formula(p, m))   # one forward after the other
    # a stage waits ("recv") exactly until its first micro-batch of each forward arrives
    assert sorted((e["stage"], e["end"] - e["start"]) for e in events if e["kind"] == "recv") == \
        sorted((s, s) for s in range(1, p) for _ in range(2))


def test_1f1b_op_order():
    assert stage_ops("1f1b", 0, 4, 6, backward=True)[:5] == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0)]
    assert stage_ops("1f1b", 3, 4, 3, backward=True) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert stage_ops("gpipe", 1, 4, 2, backward=False) == stage_ops("1f1b", 1, 4, 2, backward=False)


def test_greedy_no_cache_matches_generate(model, ids):
    from course_lib.model.generate import greedy_generate

    _, tokens = greedy_no_cache(model, ids[:1], 4)
    assert tokens[0].tolist() == greedy_generate(model, ids[0].tolist(), 4)
