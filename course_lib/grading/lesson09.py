"""Checks of lesson 09 (pipeline parallelism): the bubble of a measured timeline, and how many micro-batches.

Timelines are lists of events ``{"stage", "mb", "kind", "start", "end"}`` (see
``course_lib.parallel.schedule``): ideal GPipe and 1F1B schedules first, then unbalanced stages and
measured-looking timelines with "recv"/"send" events that are not compute.
"""
from __future__ import annotations

import math
import numbers
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


def _compute_span(compute) -> float:
    """From the first compute start to the last compute end."""
    return max(e["end"] for e in compute) - min(e["start"] for e in compute)


def _bubble_hint(got, events) -> str:
    """The hint for a wrong ``bubble_fraction(events)``: the known mistake whose value ``got`` matches."""
    want = measured_bubble(events)
    p = len({e["stage"] for e in events})
    m = len({e["mb"] for e in events})
    compute = [e for e in events if e["kind"] in ("F", "B", "compute")]
    span_all = max(e["end"] for e in events) - min(e["start"] for e in events)
    with_comm = 1 - sum(e["end"] - e["start"] for e in events) / (p * span_all)  # the "count comm" mistake
    busy = sum(e["end"] - e["start"] for e in compute)
    from_zero = 1 - busy / (p * max(e["end"] for e in compute))                  # span measured from t = 0
    comm_span = 1 - busy / (p * span_all)                          # the span stretched by recv/send events
    forward_only = [e for e in compute if e["kind"] != "B"]
    no_backward = (1 - sum(e["end"] - e["start"] for e in forward_only) / (p * _compute_span(compute))
                   if len(forward_only) < len(compute) else None)          # backward passes not counted
    is_number = isinstance(got, (int, float))
    if is_number and abs(got - bubble_formula(p, m)) < 1e-9 and abs(want - bubble_formula(p, m)) > 1e-6:
        return "that is the formula (p-1)/(m+p-1); measure the timeline instead: it differs when stages differ"
    if is_number and abs(got - with_comm) < 1e-9:
        return 'count only compute events (kind "F", "B" or "compute"); "recv"/"send" are not work'
    if is_number and no_backward is not None and abs(got - no_backward) < 1e-9:
        return 'a backward pass is work too: count events of kind "B" (and "F", "compute") as busy time'
    if is_number and abs(got - from_zero) < 1e-9 and abs(from_zero - want) > 1e-6:
        return ("the span starts at the first compute's start, not at t = 0: measured timestamps are absolute "
                "(time.perf_counter() started long before the pipeline)")
    if is_number and abs(got - comm_span) < 1e-9 and abs(comm_span - want) > 1e-6:
        return ("the span runs from the first to the last compute event: a recv before the first forward or a "
                "send after the last one is not part of the pipeline's span")
    return ("span = last compute end - first compute start (over all stages); bubble = "
            "1 - sum(compute durations) / (number of stages * span)")


def check_bubble_fraction(student_fn) -> CheckResult:
    """``bubble_fraction(events)``: 1 - (compute time of all stages) / (stages x span of the compute)."""
    rng = random.Random(9)
    cases = []
    for p, m in [(2, 1), (2, 4), (4, 4), (3, 8), (4, 2)]:   # m < p too: most of the pipeline idles
        cases.append((f"ideal GPipe forward, p={p}, m={m}", simulate("gpipe", p, m)))
    cases.append(("ideal 1F1B training (backward = 2 forwards), p=4, m=8", simulate("1f1b", 4, 8, backward=True)))
    cases.append(("GPipe p=2, m=4 with recv/send events (not compute) and jitter",
                  _noisy(simulate("gpipe", 2, 4), rng)))
    cases.append(("GPipe p=4, m=6, measured-looking, times in seconds", _noisy(simulate("gpipe", 4, 6), rng)))
    cases.append(("GPipe p=3, m=4, measured with time.perf_counter() (the clock starts long before: 1000 s)",
                  [dict(e, start=e["start"] + 1000.0, end=e["end"] + 1000.0)
                   for e in _noisy(simulate("gpipe", 3, 4), rng)]))
    unbalanced = _noisy(simulate("gpipe", 3, 5, t_forward=1.0), rng, with_comm=False)
    for e in unbalanced:  # the last stage takes 3x longer: busy stages elsewhere idle more than the formula says
        if e["stage"] == 2:
            e["end"] = e["start"] + 3 * (e["end"] - e["start"])
    cases.append(("unbalanced: stage 2 three times slower, p=3, m=5", unbalanced))
    with Checker("bubble_fraction", points=2) as c:
        for name, events in cases:
            got = student_fn([dict(e) for e in events])
            compute = [e for e in events if e["kind"] in ("F", "B", "compute")]
            c.check_close(got, measured_bubble(events), case=f"{name} ({len(compute)} compute events)", rtol=1e-6,
                          atol=1e-9, hint=_bubble_hint(got, events))
    return c.result


def check_microbatches_for_bubble(student_fn) -> CheckResult:
    """``microbatches_for_bubble(num_stages, max_bubble)``: the smallest m with (p-1)/(m+p-1) <= max_bubble, an int.
    Cases include bubbles met exactly (where a closed form rounds up one too many in floating point) and m < p."""
    cases = [(1, 0.5), (2, 0.5), (2, 0.2), (4, 0.25), (4, 0.1), (8, 0.1), (8, 0.05), (16, 0.2), (3, 0.4),
             (4, 0.6), (7, 0.2), (8, 0.7)]
    with Checker("microbatches_for_bubble", points=1) as c:
        for p, target in cases:
            want = next(m for m in range(1, 100_000) if bubble_formula(p, m) <= target + 1e-12)
            got = student_fn(p, target)
            case = f"p={p} stages, max_bubble={target}"
            c.check(isinstance(got, numbers.Integral) and not isinstance(got, bool), case=case,
                    expected=f"an int (a number of micro-batches), {want}", got=f"{type(got).__name__}: {got!r}",
                    hint="return an int: math.ceil(...) already is one; a float such as 4.0 is not a count "
                         "(int(...) it after any float arithmetic)")
            if got == want + 1 and bubble_formula(p, want) == target:
                hint = (f"one too many: here the bubble of m = {want} is exactly max_bubble, which is allowed (<=); a "
                        "closed form (p-1)(1-b)/b can land a hair above the integer in floating point "
                        "(ceil(2.0000000000000004) = 3): test the inequality for your m")
            elif got == want + 1:
                hint = "one too many: a bubble exactly equal to max_bubble is allowed (<=)"
            elif got == want - 1:
                hint = "one too few: check that (p-1)/(m+p-1) <= max_bubble for your m"
            elif p == 1:
                hint = "one stage has no bubble at all: a single micro-batch is enough"
            elif got == math.ceil((p - 1) / target - 1e-9):
                hint = ("the bubble is (p-1)/(m+p-1), not (p-1)/m: the ramp-up and ramp-down take p-1 slots of the "
                        "m+p-1 in all")
            else:
                hint = "solve (p-1)/(m+p-1) <= b for m: m >= (p-1)(1-b)/b, rounded up, and at least 1"
            c.check_equal(got, want, case=case, hint=hint)
    return c.result


# ---------------------------------------------------------------- end to end: the tiny model on a pipeline
# (stages, max bubble): 6 layers split evenly; the first target is met exactly by m = 6, the second with room by m = 3
_E2E_TARGETS = [(3, 0.25), (2, 0.3)]
_E2E_SEQ, _E2E_STEPS = 8, 3


def _both(fn, *args):
    try:
        return fn(*args)
    except NotImplementedError as err:
        raise NotImplementedError(f"Exercise: this check runs exercises 1 and 2 together on the model: finish both "
                                  f"first ({err})") from None


def check_end_to_end(bubble_fn, microbatches_fn) -> CheckResult:
    """The shipped tiny model split into p stages runs on the course's pipeline clock (``parallel.lockstep``: one
    step = one stage forward of one micro-batch) with as many micro-batches as your microbatches_for_bubble picks
    for the target bubble, one sequence each, and generates greedy tokens (no KV cache: each new token is one more
    forward). The tokens must equal the unsplit model's; your bubble_fraction must measure the run's timeline (in
    steps) as the library does, for the whole generation and for its last forward alone; the measured bubble must
    meet the target, and one micro-batch fewer must not."""
    from course_lib.grading.lesson01 import _float32_target
    from course_lib.parallel.check import sample_batch
    from course_lib.parallel.lockstep import lockstep_greedy, run_lockstep
    from course_lib.parallel.pipeline import Stage
    from course_lib.parallel.tensor import greedy_no_cache

    model = _float32_target()[0]
    L = model.config.num_hidden_layers
    with Checker("end_to_end", points=1, timeout_s=120) as c:
        for p, target in _E2E_TARGETS:
            c.case = f"p={p} stages of {L // p} layers each, max_bubble={target}"
            m = _both(microbatches_fn, p, target)
            c.check(isinstance(m, numbers.Integral) and not isinstance(m, bool) and 1 <= m <= 64,
                    expected="an int from 1 to 64 (a number of micro-batches)", got=f"{type(m).__name__}: {m!r}",
                    hint="microbatches_for_bubble returns an int, at least 1")
            ids = sample_batch(m, _E2E_SEQ)                          # one sequence of real text per micro-batch
            stages = [Stage(model, s, p) for s in range(p)]
            tokens, events = lockstep_greedy(stages, ids, _E2E_STEPS, m)
            case = f"{c.case}: your microbatches_for_bubble picked m={m}, {m} sequences of {_E2E_SEQ} tokens"
            c.check_equal(tokens.tolist(), greedy_no_cache(model, ids, _E2E_STEPS)[1].tolist(),
                          case=f"{case}, {_E2E_STEPS} greedy tokens each vs the unsplit model",
                          hint="the stages together compute the whole model: a mismatch here is the library's fault, "
                               "not your code's (please report it)")
            t_last = max(e["start"] for e in events if e["stage"] == 0 and e["mb"] == 0 and e["kind"] == "F")
            for name, timeline in [(f"the whole generation, steps 0 to {max(e['end'] for e in events)}", events),
                                   (f"its last forward alone (the clock runs on: it starts at step {t_last})",
                                    [e for e in events if e["start"] >= t_last])]:
                got = _both(bubble_fn, [dict(e) for e in timeline])
                c.check_close(got, measured_bubble(timeline), rtol=1e-9, atol=1e-12, hint=_bubble_hint(got, timeline),
                              case=f"{case}; bubble_fraction of {name} ({len(timeline)} events, recv included)")
            measured = measured_bubble(events)
            c.check(measured <= target + 1e-12, case=case, expected=f"a measured bubble <= max_bubble = {target}",
                    got=f"{measured:.4f}", hint="too few micro-batches: the bubble is (p-1)/(m+p-1), so m must be "
                    "at least (p-1)(1-b)/b, rounded UP")
            if m > 1:
                fewer: list[dict] = []
                run_lockstep(stages, ids[:m - 1], m - 1, fewer)
                bubble = measured_bubble(fewer)
                c.check(bubble > target + 1e-12, case=case, expected=f"m - 1 = {m - 1} micro-batches miss the target",
                        got=f"with {m - 1} the measured bubble is already {bubble:.4f} <= {target}",
                        hint="a bubble exactly equal to max_bubble is allowed (<=)" if abs(bubble - target) < 1e-12
                        else "one micro-batch more than needed: pick the smallest m that meets the target")
    return c.result
