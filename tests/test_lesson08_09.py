"""Lessons 08 and 09: every check passes the solution, reports a stub as not attempted, and catches broken variants."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.grading import lesson08, lesson09
from course_lib.parallel.schedule import bubble_formula, measured_bubble
from course_lib.parallel.tensor import row_parallel_forward
from conftest import assert_caught, assert_not_attempted, solution, stub

TP = solution("08_tensor_parallelism")
PP = solution("09_pipeline_parallelism")


# ---------------------------------------------------------------- lesson 08: row-parallel forward
def _row_no_reduce(x, w, b, all_reduce):
    y = x @ w.T
    return y + b if b is not None else y


def _row_bias_before_reduce(x, w, b, all_reduce):
    y = x @ w.T
    if b is not None:
        y = y + b
    all_reduce(y)
    return y


def _row_returns_none(x, w, b, all_reduce):
    y = x @ w.T
    return all_reduce(y)


def _row_reduce_twice(x, w, b, all_reduce):
    y = x @ w.T
    all_reduce(y)
    all_reduce(torch.zeros(1))
    return y + b if b is not None else y


def _row_wrong_transpose(x, w, b, all_reduce):
    y = x @ w  # [.., in/tp] @ [out, in/tp]: a shape error
    all_reduce(y)
    return y


def _row_reduces_a_copy(x, w, b, all_reduce):   # the reduced copy is thrown away: rank r returns its partial sum
    y = x @ w.T
    all_reduce(y.clone())
    return y + b if b is not None else y


# ---------------------------------------------------------------- lesson 08: column + row MLP
def _mlp_reduce_hidden_too(x, gate, up, down, all_reduce):
    g, u = F.linear(x, gate), F.linear(x, up)
    all_reduce(g)  # sums *different* hidden units of the ranks: wrong, and an extra all-reduce
    all_reduce(u)
    y = F.linear(F.silu(g) * u, down)
    all_reduce(y)
    return y


def _mlp_no_reduce(x, gate, up, down, all_reduce):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _mlp_silu_after_reduce(x, gate, up, down, all_reduce):
    # the nonlinearity applied to partial sums of a (wrongly) row-split gate: the classic mistake
    y = F.linear(F.linear(x, gate) * F.linear(x, up), down)
    all_reduce(y)
    return F.silu(y)


def _mlp_no_silu(x, gate, up, down, all_reduce):   # the gate's activation left out
    y = F.linear(F.linear(x, gate) * F.linear(x, up), down)
    all_reduce(y)
    return y


def _mlp_silu_on_up(x, gate, up, down, all_reduce):   # silu applied to the up projection instead of the gate
    y = F.linear(F.linear(x, gate) * F.silu(F.linear(x, up)), down)
    all_reduce(y)
    return y


def _mlp_reduce_before_down(x, gate, up, down, all_reduce):   # reduces the hidden units, then down_proj's partial
    h = F.silu(F.linear(x, gate)) * F.linear(x, up)
    all_reduce(h)
    return F.linear(h, down)


def _mlp_extra_harmless_reduce(x, gate, up, down, all_reduce):
    y = TP.tp_mlp_forward(x, gate, up, down, all_reduce)
    z = torch.zeros_like(y)
    all_reduce(z)  # right answer, but two all-reduces
    return y + z


# ---------------------------------------------------------------- lesson 09
def _bubble_formula_only(events):
    p, m = len({e["stage"] for e in events}), len({e["mb"] for e in events})
    return bubble_formula(p, m)


def _bubble_counts_comm(events):
    p = len({e["stage"] for e in events})
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    return 1 - sum(e["end"] - e["start"] for e in events) / (p * span)


def _bubble_per_stage_span(events):
    work = [e for e in events if e["kind"] in ("F", "B", "compute")]
    idle = total = 0.0
    for s in {e["stage"] for e in work}:
        mine = [e for e in work if e["stage"] == s]
        span = max(e["end"] for e in mine) - min(e["start"] for e in mine)
        idle += span - sum(e["end"] - e["start"] for e in mine)
        total += span
    return idle / total


def _bubble_span_from_zero(events):     # timestamps taken as if the clock started with the pipeline
    work = [e for e in events if e["kind"] in ("F", "B", "compute")]
    p = len({e["stage"] for e in work})
    return 1 - sum(e["end"] - e["start"] for e in work) / (p * max(e["end"] for e in work))


def _bubble_span_with_comm(events):     # busy time of computes only, but the span stretched by recv/send
    work = [e for e in events if e["kind"] in ("F", "B", "compute")]
    p = len({e["stage"] for e in work})
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    return 1 - sum(e["end"] - e["start"] for e in work) / (p * span)


def _bubble_forward_only(events):   # counts F (and "compute") as work, not the backward passes
    work = [e for e in events if e["kind"] in ("F", "B", "compute")]
    busy = sum(e["end"] - e["start"] for e in work if e["kind"] != "B")
    span = max(e["end"] for e in work) - min(e["start"] for e in work)
    return 1 - busy / (len({e["stage"] for e in work}) * span)


def _microbatches_strict(p, b):   # a bubble exactly at the target rejected
    m = 1
    while (p - 1) / (m + p - 1) >= b:
        m += 1
    return m


def _microbatches_loop(p, b):
    m = 1
    while (p - 1) / (m + p - 1) > b:
        m += 1
    return m


@pytest.mark.parametrize("check, goods, broken", [
    (lesson08.check_row_parallel_forward, [TP.row_parallel_forward, row_parallel_forward],
     [_row_no_reduce, _row_bias_before_reduce, _row_returns_none, _row_reduce_twice, _row_wrong_transpose,
      _row_reduces_a_copy]),
    (lesson08.check_tp_mlp_forward, [TP.tp_mlp_forward],
     [_mlp_reduce_hidden_too, _mlp_no_reduce, _mlp_silu_after_reduce, _mlp_extra_harmless_reduce, _mlp_no_silu,
      _mlp_silu_on_up, _mlp_reduce_before_down]),
    (lesson09.check_bubble_fraction, [PP.bubble_fraction, measured_bubble],
     [_bubble_formula_only, _bubble_counts_comm, _bubble_per_stage_span, _bubble_span_from_zero,
      _bubble_span_with_comm, _bubble_forward_only]),
    (lesson09.check_microbatches_for_bubble, [PP.microbatches_for_bubble], [
        lambda p, b: math.ceil((p - 1) * (1 - b) / b - 1e-9) + 1,             # off by one
        lambda p, b: math.ceil((p - 1) / b),                                  # forgot the m + p - 1
        lambda p, b: math.ceil((p - 1) * (1 - b) / b - 1e-9),                 # 0 micro-batches for p = 1
        lambda p, b: float(_microbatches_loop(p, b)),                         # right value, a float (4.0)
        lambda p, b: max(1, math.ceil((p - 1) * (1 - b) / b)),                # closed form, no care for rounding
        lambda p, b: max(1, int((p - 1) * (1 - b) / b)),                      # truncated instead of rounded up
        _microbatches_strict,                                                 # < instead of <=
    ]),
])
def test_checks_pass_good_stub_and_broken(check, goods, broken):
    for good in goods:   # the solution notebook's answer (and the library's)
        result = check(good)
        assert result.status == "passed", result.message
    assert_not_attempted(check(stub))
    for fn in broken:
        assert_caught(check(fn))


def test_hints_name_the_mistake():
    assert "added before the all-reduce" in lesson08.check_row_parallel_forward(_row_bias_before_reduce).message
    assert "returned None" in lesson08.check_row_parallel_forward(_row_returns_none).message
    assert "no all_reduce call" in lesson08.check_row_parallel_forward(_row_no_reduce).message
    assert "exactly 1 all_reduce" in lesson08.check_tp_mlp_forward(_mlp_extra_harmless_reduce).message
    assert "only the row-parallel" in lesson08.check_tp_mlp_forward(_mlp_reduce_hidden_too).message
    assert "rank 0's partial sum" in lesson08.check_row_parallel_forward(_row_reduces_a_copy).message
    assert "activation was left out" in lesson08.check_tp_mlp_forward(_mlp_no_silu).message
    assert "silu goes on the gate" in lesson08.check_tp_mlp_forward(_mlp_silu_on_up).message
    assert "formula" in lesson09.check_bubble_fraction(_bubble_formula_only).message
    assert "only compute events" in lesson09.check_bubble_fraction(_bubble_counts_comm).message
    assert 'kind "B"' in lesson09.check_bubble_fraction(_bubble_forward_only).message
    assert "not at t = 0" in lesson09.check_bubble_fraction(_bubble_span_from_zero).message
    assert "is not part of the pipeline's span" in lesson09.check_bubble_fraction(_bubble_span_with_comm).message
    floats = lesson09.check_microbatches_for_bubble(lambda p, b: float(_microbatches_loop(p, b)))
    assert "return an int" in floats.message and "float: 1.0" in floats.message
    rounding = lesson09.check_microbatches_for_bubble(lambda p, b: max(1, math.ceil((p - 1) * (1 - b) / b)))
    assert "floating point" in rounding.message


# ---------------------------------------------------------------- lesson 08 end to end: the tiny model on 2 and 4 ranks
def _mlp_wrong_dim(x, gate, up, down, all_reduce):   # down_shard taken as [F/tp, E]: split along the other dim
    y = (F.silu(x @ gate.T) * (x @ up.T)) @ down
    all_reduce(y)
    return y


def test_a_rank_released_by_another_ranks_failure_is_not_blamed():
    """When one rank fails (a stub's NotImplementedError), the others are released from their all-reduce with a
    BrokenBarrierError, a RuntimeError: it must pass through, not be reported as a shape error of that rank's
    function (in CI the released rank's error once won the race and a stub was graded "failed")."""
    import threading
    from types import SimpleNamespace

    from torch import nn

    def released(tensor, *args, **kwargs):
        raise threading.BrokenBarrierError

    row = lesson08._RowParallel(TP.row_parallel_forward, torch.randn(8, 4), None, released)
    with pytest.raises(threading.BrokenBarrierError):
        row(torch.randn(1, 2, 4))
    mlp = SimpleNamespace(gate_proj=nn.Linear(8, 6, bias=False), up_proj=nn.Linear(8, 6, bias=False),
                          down_proj=nn.Linear(6, 8, bias=False))
    with pytest.raises(threading.BrokenBarrierError):
        lesson08._TensorParallelMLP(TP.tp_mlp_forward, mlp, released)(torch.randn(1, 2, 8))


def test_tp_end_to_end_check():
    row, mlp = TP.row_parallel_forward, TP.tp_mlp_forward
    assert lesson08.check_end_to_end(row, mlp).status == "passed"
    assert_not_attempted(lesson08.check_end_to_end(stub, stub))
    assert_not_attempted(lesson08.check_end_to_end(row, stub))
    result = lesson08.check_end_to_end(stub, mlp)
    assert_not_attempted(result)
    assert "exercises 1 and 2" in result.message
    assert_caught(lesson08.check_end_to_end(row, _mlp_reduce_hidden_too), "no all-reduce after them")
    assert_caught(lesson08.check_end_to_end(_row_bias_before_reduce, mlp), "summed 4 times; add it once, after")
    assert_caught(lesson08.check_end_to_end(row, _mlp_wrong_dim), "down_shard [E, F/tp] holds columns")
    assert_caught(lesson08.check_end_to_end(_row_no_reduce, mlp), "no all-reduce in your row_parallel_forward")
    assert_caught(lesson08.check_end_to_end(row, _mlp_no_reduce), "no all-reduce in your tp_mlp_forward")
    assert_caught(lesson08.check_end_to_end(row, _mlp_reduce_before_down), "your tp_mlp_forward alone already")
    assert_caught(lesson08.check_end_to_end(_row_reduces_a_copy, mlp), "your row_parallel_forward alone already")


# ---------------------------------------------------------------- lesson 09 end to end: the tiny model on a pipeline
def test_pp_end_to_end_check():
    bubble, microbatches = PP.bubble_fraction, PP.microbatches_for_bubble
    assert lesson09.check_end_to_end(bubble, microbatches).status == "passed"
    assert lesson09.check_end_to_end(measured_bubble, microbatches).status == "passed"
    for pieces in [(stub, stub), (bubble, stub), (stub, microbatches)]:
        result = lesson09.check_end_to_end(*pieces)
        assert_not_attempted(result)
        assert "exercises 1 and 2" in result.message
    assert_caught(lesson09.check_end_to_end(_bubble_counts_comm, microbatches), "only compute events")
    assert_caught(lesson09.check_end_to_end(_bubble_per_stage_span, microbatches), "(over all stages)")
    assert_caught(lesson09.check_end_to_end(_bubble_span_from_zero, microbatches), "not at t = 0")
    assert_caught(lesson09.check_end_to_end(bubble, lambda p, b: max(1, int((p - 1) * (1 - b) / b))),
                  "too few micro-batches")
    assert_caught(lesson09.check_end_to_end(bubble, _microbatches_strict), "exactly equal to max_bubble is allowed")
    assert_caught(lesson09.check_end_to_end(bubble, lambda p, b: math.ceil((p - 1) / b)),
                  "one micro-batch more than needed")
    assert_caught(lesson09.check_end_to_end(bubble, lambda p, b: float(_microbatches_loop(p, b))), "returns an int")
