"""Checks of lesson 08 (tensor parallelism): the row-parallel forward, and a column+row MLP with one all-reduce.

The learner's function runs on every rank as a thread of this process (``course_lib.parallel.simulate``),
each with its own shards and an ``all_reduce(tensor)`` that sums in place over the ranks, exactly like
``dist.all_reduce`` (spawned processes could not import a function defined in a notebook). Cases go from
small to large; the first failure reports the case, expected vs got, and a hint aimed at the usual mistake.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.grading.core import Checker, CheckResult
from course_lib.grading.remote import run_beside
from course_lib.parallel.simulate import run_ranks
from course_lib.parallel.tensor import shard


def run_ranks_counted(student_fn, args_per_rank: list[tuple]) -> tuple[list, list[int]]:
    """``run_ranks`` where the learner's function lives (the grader runs it in the notebook's kernel): the
    results of the ranks and how many times each called all_reduce."""
    results, group = run_ranks(student_fn, args_per_rank)
    return results, list(group.calls)


def _ranks(student_fn, args_per_rank):
    return run_beside(student_fn, "course_lib.grading.lesson08:run_ranks_counted", student_fn, args_per_rank)


def _close(a, b) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def check_row_parallel_forward(student_fn) -> CheckResult:
    """``row_parallel_forward(x_shard, weight_shard, bias, all_reduce)`` on tp = 2 and 4 simulated ranks.

    Rank r gets x[..., r-th slice of in] and W[:, r-th slice of in]; every rank must return the full
    ``x @ W.T + bias`` after exactly one all-reduce.
    """
    gen = torch.Generator().manual_seed(8)
    cases = [(2, (1, 4), 3, False), (2, (2, 8), 5, True), (4, (3, 8), 6, True), (2, (2, 3, 16), 12, True),
             (4, (2, 5, 64), 32, False), (4, (4, 7, 256), 128, True)]
    with Checker("row_parallel_forward", points=2) as c:
        for tp, x_shape, out, has_bias in cases:
            x = torch.randn(*x_shape, generator=gen)
            w = torch.randn(out, x_shape[-1], generator=gen)
            b = torch.randn(out, generator=gen) if has_bias else None
            want = x @ w.T + (b if has_bias else 0)
            partials = [shard(x, -1, r, tp) @ shard(w, 1, r, tp).T for r in range(tp)]
            args = [(shard(x, -1, r, tp), shard(w, 1, r, tp), b) for r in range(tp)]
            got, calls = _ranks(student_fn, args)
            case = (f"tp={tp}, x {tuple(x_shape)} split into x_shard {tuple(args[0][0].shape)} per rank, "
                    f"W [{out}, {x_shape[-1]}] into weight_shard {tuple(args[0][1].shape)}, "
                    f"bias={'yes' if has_bias else 'None'}")
            g = got[0]
            if g is None:
                hint = ("you returned None: all_reduce works in place and returns None (like dist.all_reduce); "
                        "return the tensor you passed to it")
            elif calls[0] == 0:
                hint = "no all_reduce call: each rank holds only a partial sum over its slice of the inputs"
            elif has_bias and _close(g, want + (tp - 1) * b):
                hint = f"the bias was added before the all-reduce, so it was summed {tp} times: add it after"
            elif _close(g, partials[0] + (b if has_bias else 0)):
                hint = "that is rank 0's partial sum: the all-reduce's result is in the tensor you passed to it"
            else:
                hint = "y_partial = x_shard @ weight_shard.T ([..., out]); all_reduce(y_partial); then + bias"
            c.check_close(g, want, case=case + ", rank 0's output", rtol=1e-4, atol=1e-4, hint=hint)
            for r in range(1, tp):
                c.check_close(got[r], want, case=case + f", rank {r}'s output", rtol=1e-4, atol=1e-4,
                              hint="every rank must return the full result (that is what all-reduce gives)")
            c.check(calls == [1] * tp, case=case, expected="exactly 1 all_reduce per rank",
                    got=f"all_reduce calls per rank: {calls}",
                    hint="one all-reduce of the [..., out] partial sums is all a row-parallel layer needs")
    return c.result


def _mlp(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def check_tp_mlp_forward(student_fn) -> CheckResult:
    """``tp_mlp_forward(x, gate_shard, up_shard, down_shard, all_reduce)``: SwiGLU MLP with one all-reduce.

    Rank r holds rows r of gate_proj and up_proj ([F/tp, E], column-parallel) and columns r of down_proj
    ([E, F/tp], row-parallel); x [..., E] is replicated. Output: the full MLP on every rank.
    """
    gen = torch.Generator().manual_seed(9)
    cases = [(2, (1, 4), 4), (2, (2, 8), 6), (4, (3, 8), 8), (2, (2, 3, 16), 24), (4, (2, 5, 32), 88)]
    with Checker("tp_mlp_forward", points=2) as c:
        for tp, x_shape, Fh in cases:
            E = x_shape[-1]
            x = torch.randn(*x_shape, generator=gen)
            gate, up = torch.randn(Fh, E, generator=gen) / E**0.5, torch.randn(Fh, E, generator=gen) / E**0.5
            down = torch.randn(E, Fh, generator=gen) / Fh**0.5
            want = _mlp(x, gate, up, down)
            args = [(x, shard(gate, 0, r, tp), shard(up, 0, r, tp), shard(down, 1, r, tp)) for r in range(tp)]
            got, all_calls = _ranks(student_fn, args)
            case = (f"tp={tp}, x {tuple(x_shape)} (E={E}), F={Fh}: gate_shard/up_shard {tuple(args[0][1].shape)}, "
                    f"down_shard {tuple(args[0][3].shape)}")
            calls = all_calls[0]
            if got[0] is None:
                hint = "you returned None: all_reduce works in place and returns None; return the reduced tensor"
            elif _close(got[0], F.linear(F.linear(x, gate) * F.linear(x, up), down)):
                hint = "SwiGLU: silu(x @ gate.T) * (x @ up.T): the activation was left out"
            elif _close(got[0], F.linear(F.linear(x, gate) * F.silu(F.linear(x, up)), down)):
                hint = "silu goes on the gate projection: silu(x @ gate_shard.T) * (x @ up_shard.T), not on up"
            elif calls == 0:
                hint = "down_proj is row-parallel: each rank's output is a partial sum, all-reduce it"
            elif calls > 1:
                hint = ("only the row-parallel down_proj output needs an all-reduce: the column-parallel gate/up "
                        "outputs are this rank's own F/tp hidden units, and silu(gate) * up is elementwise on them")
            else:
                hint = ("h = silu(x @ gate_shard.T) * (x @ up_shard.T) is [..., F/tp]; y = h @ down_shard.T; "
                        "all_reduce(y); return y (nonlinearities go before the reduce, never after it)")
            c.check_close(got[0], want, case=case + ", rank 0's output", rtol=1e-4, atol=1e-4, hint=hint)
            for r in range(1, tp):
                c.check_close(got[r], want, case=case + f", rank {r}'s output", rtol=1e-4, atol=1e-4,
                              hint="every rank must return the full MLP output")
            c.check(all_calls == [1] * tp, case=case, expected="exactly 1 all_reduce per rank",
                    got=f"all_reduce calls per rank: {all_calls}",
                    hint="pairing a column-parallel layer with a row-parallel one needs one all-reduce, at the end")
    return c.result
