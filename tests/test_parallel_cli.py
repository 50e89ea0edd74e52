"""python -m course_lib.parallel: a bad option is a usage error (exit status 2, the option named) before any
rank process starts. The CLI runs in this process with the launcher replaced by a tripwire."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from course_lib.parallel import __main__ as cli
from course_lib.parallel import check

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_ranks(monkeypatch):
    """Starting a rank (or the sharded run that would) fails the test."""
    def tripwire(*args, **kwargs):
        raise AssertionError("a rank process was about to start")
    for name in ("run_tp", "run_pp"):
        monkeypatch.setattr(cli, name, tripwire)
    monkeypatch.setattr(check, "launch", tripwire)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


def usage_error(argv, capsys) -> str:
    """Run the CLI on ``argv``; assert it stops with exit status 2; return the message after "error: "
    (not the usage line above it, which names every option)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    return err.split(" error: ", 1)[1]


@pytest.mark.parametrize("argv, option", [
    (["--tp", "0"], "--tp"),
    (["--tp", "-2"], "--tp"),
    (["--tp", "3"], "--tp"),                                   # 4 kv heads don't divide by 3
    (["--tp", "8"], "--tp"),                                   # nor by 8 (each rank needs whole kv heads)
    (["--pp", "0"], "--pp"),
    (["--pp", "7"], "--pp"),                                   # the model has 6 layers
    (["--pp", "2", "--microbatches", "0"], "--microbatches"),
    (["--pp", "2", "--microbatches", "9"], "--microbatches"),  # more than --batch (8)
    (["--pp", "2", "--microbatches", "4", "--batch", "2"], "--microbatches"),
    (["--tp", "2", "--microbatches", "4"], "--microbatches"),  # a --pp option with --tp
    (["--tp", "2", "--schedule", "1f1b"], "--schedule"),
    (["--tp", "2", "--batch", "0"], "--batch"),
    (["--pp", "2", "--batch", "-1"], "--batch"),
    (["--tp", "2", "--seq", "0"], "--seq"),
    (["--tp", "2", "--seq", "513"], "--seq"),                  # beyond the model's 512 positions
    (["--tp", "2", "--seq", "510", "--steps", "3"], "--steps"),  # the greedy tokens run past the context
    (["--tp", "2", "--steps", "-1"], "--steps"),
    (["--tp", "2", "--timeout", "0"], "--timeout"),
    (["--tp", "2", "--timeout", "-5"], "--timeout"),
    (["--tp", "2", "--timeout", "nan"], "--timeout"),          # NaN never compares: a run that never times out
    (["--tp", "2", "--timeout", "inf"], "--timeout"),
    (["--tp", "2", "--tol=-1e-5"], "--tol"),
    (["--tp", "2", "--tol", "nan"], "--tol"),                  # NaN: every comparison "DIFFERENT"
    (["--tp", "2", "--batch", "100", "--seq", "500", "--steps", "0"], "--batch"),  # 50,000 tokens: the text has 46,487
])
def test_bad_option_is_a_usage_error_before_any_rank_starts(no_ranks, capsys, argv, option):
    err = usage_error(argv, capsys)
    assert f"argument {option}" in err or f"{option} " in err or f"{option}=" in err, err


def test_tp_error_says_what_tp_must_divide(no_ranks, capsys):
    err = usage_error(["--tp", "3"], capsys)
    assert "num_key_value_heads % tp == 0, got Hkv=4" in err


def test_pp_error_names_the_layer_count(no_ranks, capsys):
    assert "6 layers" in usage_error(["--pp", "7"], capsys)


def test_nccl_without_a_gpu_per_rank_is_a_usage_error(no_ranks, capsys, monkeypatch):
    monkeypatch.setattr(cli.torch.cuda, "device_count", lambda: 1)
    assert "--backend nccl" in usage_error(["--tp", "2", "--backend", "nccl"], capsys)


def test_size_other_than_torchrun_world_size_is_a_usage_error(no_ranks, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    err = usage_error(["--tp", "2"], capsys)
    assert "--tp 2" in err and "WORLD_SIZE=4" in err


def test_valid_options_reach_the_run(monkeypatch, capsys):
    """The checks refuse nothing valid: the edges of every range get through to run_tp / run_pp."""
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        raise SystemExit(0)   # stop here: this test is about parsing only
    monkeypatch.setattr(cli, "run_tp", record)
    monkeypatch.setattr(cli, "run_pp", record)
    monkeypatch.setattr(cli, "sample_batch", lambda batch, seq: None)
    for argv in (["--tp", "1"], ["--tp", "4", "--seq", "504", "--steps", "8"], ["--pp", "6", "--microbatches", "8"],
                 ["--pp", "1", "--batch", "1", "--microbatches", "1", "--schedule", "1f1b", "--steps", "0"],
                 ["--tp", "2", "--tol", "0", "--timeout", "0.5"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0, (argv, capsys.readouterr().err)
    assert len(calls) == 5


def test_usage_error_exit_status_as_a_process():
    """The real command: exit status 2, the option named, and no time spent starting ranks."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "course_lib.parallel", "--pp", "7"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "COURSE_FORCE_CPU": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--pp" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60
