"""course_lib.notebook.timing: repeats, their median and spread, and observations that warn instead of failing."""
import os

import pytest

from course_lib.notebook import timing
from course_lib.notebook.timing import NOISY_SPREAD, Timing, machine_busy, observe, time_repeats


def test_median_min_and_spread():
    t = Timing((1.0, 2.0, 3.0, 4.0, 5.0))
    assert t.median_s == 3.0 and t.min_s == 1.0
    assert t.spread == pytest.approx((4.0 - 2.0) / 3.0)      # interquartile range / median
    assert t.noisy
    steady = Timing((1.00, 1.01, 0.99, 1.02, 1.00))
    assert steady.spread < NOISY_SPREAD and not steady.noisy
    assert Timing((0.5,)).spread == 0 and not Timing((0.5,)).noisy


def test_one_outlier_does_not_make_a_timing_noisy():
    """A single preempted repeat out of five is what the median is for: the interquartile range ignores it."""
    t = Timing((1.0, 1.01, 0.99, 1.0, 9.0))
    assert t.median_s == 1.0 and not t.noisy


@pytest.mark.parametrize("times", [(), (1.0, -0.1), (float("nan"),)])
def test_rejects_empty_or_negative_times(times):
    with pytest.raises(ValueError, match="times_s"):
        Timing(times)


def test_time_repeats_calls_warmup_then_reps():
    calls = []
    t = time_repeats(lambda: calls.append(1), reps=4, warmup=2, device="cpu")
    assert len(calls) == 6 and len(t.times_s) == 4 and all(x >= 0 for x in t.times_s)
    with pytest.raises(ValueError, match="reps"):
        time_repeats(lambda: None, reps=0, device="cpu")


def test_machine_busy(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    assert "load average 3.5 on 2 cores" in machine_busy()
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert machine_busy() is None
    monkeypatch.delattr(os, "getloadavg")                  # Windows
    assert machine_busy() is None


def test_observe_prints_and_never_raises(monkeypatch, capsys):
    monkeypatch.setattr(timing, "machine_busy", lambda: None)
    assert observe("B=16 costs under 10x B=1", True, Timing((1.0, 1.0, 1.0)), measured="2.1x") is True
    out = capsys.readouterr().out
    assert out.startswith("observed: B=16 costs under 10x B=1 (2.1x)") and "warning" not in out

    assert observe("B=16 costs under 10x B=1", False, Timing((1.0, 2.0, 3.0, 4.0, 5.0))) is False
    out = capsys.readouterr().out
    assert out.startswith("NOT observed this run: B=16") and "too noisy to trust" in out and "asserted above" in out

    monkeypatch.setattr(timing, "machine_busy", lambda: "this CPU is busy: load average 3.0 on 2 cores")
    observe("x", True)
    assert "warning: this CPU is busy" in capsys.readouterr().out
