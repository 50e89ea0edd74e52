"""Checks of lesson 09 (pipeline parallelism): the bubble of a measured timeline, and how many micro-batches.

Timelines are lists of events ``{"stage", "mb", "kind", "start", "end"}`` (see
``course_lib.parallel.schedule``): ideal GPipe and 1F1B schedules first, then unbalanced stages and
measured-looking timelines with "recv"/"send" events that are not compute.
"""
from __future__ import annotations

import random

from course_lib.grading.core import Checker, CheckResult
from course_lib.parallel.schedule import bubble_formula, measured_bubble, simulate


def _noisy(events, rng, with_comm=True):
    """A timeline that looks measured: jittered op times, gaps, and recv/send events between computes."""
    out, shift = [], {}
    for e in sorted(events, key=lambda e: e["start"]):
        k = (e["stage"], e["mb"])
        d = (e["end"] - e["start"]) * rng.uniform(0.8, 1.2)
        start = e["start"] * 1e-3 + shift.get(e["stage"], 0.0)
        out.append(dict(e, kind="compute" if e["kind"] == "F" else e["kind"], start=start, end=start + d * 1e-3))
        shift[e["stage"]] = shift.get(e["stage"], 0.0) + rng.uniform(0, 2e-4)
        if with_comm and e["stage"] > 0 and e["kind"] == "F":
            out.append(dict(stage=e["stage"], mb=k[1], kind="recv", start=start - 3e-4, end=start))
        if with_comm and e["kind"] == "F":
            out.append(dict(stage=e["stage"], mb=k[1], kind="send", start=start + d * 1e-3,
                            end=start + d * 1e-3 + 5e-5))
    return out


def check_bubble_fraction(student_fn) -> CheckResult:
    """``bubble_fraction(events)``: 1 - (compute time of all stages) / (stages x span of the compute)."""
    rng = random.Random(9)
    cases = []
    for p, m in [(2, 1), (2, 4), (4, 4), (3, 8)]:
        cases.append((f"ideal GPipe forward, p={p}, m={m}", simulate("gpipe", p, m)))
    cases.append(("ideal 1F1B training (backward = 2 forwards), p=4, m=8", simulate("1f1b", 4, 8, backward=True)))
    cases.append(("GPipe p=2, m=4 with recv/send events (not compute) and jitter",
                  _noisy(simulate("gpipe", 2, 4), rng)))
    cases.append(("GPipe p=4, m=6, measured-looking, times in seconds", _noisy(simulate("gpipe", 4, 6), rng)))
    unbalanced = _noisy(simulate("gpipe", 3, 5, t_forward=1.0), rng, with_comm=False)
    for e in unbalanced:  # the last stage takes 3x longer: busy stages elsewhere idle more than the formula says
        if e["stage"] == 2:
            e["end"] = e["start"] + 3 * (e["end"] - e["start"])
    cases.append(("unbalanced: stage 2 three times slower, p=3, m=5", unbalanced))
    with Checker("bubble_fraction", points=2) as c:
        for name, events in cases:
            want = measured_bubble(events)
            got = student_fn([dict(e) for e in events])
            p = len({e["stage"] for e in events})
            m = len({e["mb"] for e in events})
            compute = [e for e in events if e["kind"] in ("F", "B", "compute")]
            span_all = max(e["end"] for e in events) - min(e["start"] for e in events)
            with_comm = 1 - sum(e["end"] - e["start"] for e in events) / (p * span_all)  # the "count comm" mistake
            is_number = isinstance(got, (int, float))
            if is_number and abs(got - bubble_formula(p, m)) < 1e-9 and abs(want - bubble_formula(p, m)) > 1e-6:
                hint = "that is the formula (p-1)/(m+p-1); measure the timeline instead: it differs when stages differ"
            elif is_number and abs(got - with_comm) < 1e-9:
                hint = 'count only compute events (kind "F", "B" or "compute"); "recv"/"send" are not work'
            else:
                hint = ("span = last compute end - first compute start (over all stages); bubble = "
                        "1 - sum(compute durations) / (number of stages * span)")
            c.check_close(got, want, case=f"{name} ({len(compute)} compute events)", rtol=1e-6, atol=1e-9, hint=hint)
    return c.result


def check_microbatches_for_bubble(student_fn) -> CheckResult:
    """``microbatches_for_bubble(num_stages, max_bubble)``: the smallest m with (p-1)/(m+p-1) <= max_bubble."""
    cases = [(1, 0.5), (2, 0.5), (2, 0.2), (4, 0.25), (4, 0.1), (8, 0.1), (8, 0.05), (16, 0.2), (3, 0.4)]
    with Checker("microbatches_for_bubble", points=1) as c:
        for p, target in cases:
            want = next(m for m in range(1, 100_000) if bubble_formula(p, m) <= target + 1e-12)
            got = student_fn(p, target)
            if isinstance(got, (int, float)) and got == want + 1:
                hint = "one too many: a bubble exactly equal to max_bubble is allowed (<=)"
            elif isinstance(got, (int, float)) and got == want - 1:
                hint = "one too few: check that (p-1)/(m+p-1) <= max_bubble for your m"
            elif p == 1:
                hint = "one stage has no bubble at all: a single micro-batch is enough"
            else:
                hint = "solve (p-1)/(m+p-1) <= b for m: m >= (p-1)(1-b)/b, rounded up, and at least 1"
            c.check_equal(got, want, case=f"p={p} stages, max_bubble={target}", hint=hint)
    return c.result
