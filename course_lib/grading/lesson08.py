"""Checks of lesson 08 (tensor parallelism): the row-parallel forward, and a column+row MLP with one all-reduce.

The learner's function runs on every rank as a thread of this process (``course_lib.parallel.simulate``),
each with its own shards and an ``all_reduce(tensor)`` that sums in place over the ranks, exactly like
``dist.all_reduce`` (spawned processes could not import a function defined in a notebook). Cases go from
small to large; the first failure reports the case, expected vs got, and a hint aimed at the usual mistake.
"""
from __future__ import annotations

import copy
import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

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


# ---------------------------------------------------------------- end to end: your pieces run the shipped model
# tp=2 on the shipped model as it is, tp=4 with a bias on o_proj (GPT-2 and OPT have one on their row-parallel
# layers; LLaMA has none), so a bias added on every rank shows in the tokens
_E2E_PROMPT, _E2E_STEPS = "And God said, Let there be light", 4
_E2E_CASES = [(2, False), (4, True)]
_SITES = ("o_proj", "mlp")


class _SiteError(Exception):
    """The learner's function raised a RuntimeError (a shape error) where the model calls it."""

    def __init__(self, site: str, err: RuntimeError):
        super().__init__(f"{type(err).__name__}: {err}")
        self.site = site


class _RowParallel(nn.Module):
    """o_proj on one rank: ``row_fn(x_shard, weight_shard, bias, all_reduce)``, ``weight_shard`` [E, Hq·D/tp]."""

    def __init__(self, row_fn, weight, bias, all_reduce):
        super().__init__()
        self.row_fn, self.weight, self.bias, self.all_reduce = row_fn, weight, bias, all_reduce

    def forward(self, x_shard):   # [B, S, Hq·D/tp]: this rank's heads -> [B, S, E]
        try:
            return self.row_fn(x_shard, self.weight, self.bias, self.all_reduce)
        except (NotImplementedError, threading.BrokenBarrierError):   # RuntimeErrors too: the stub; another rank
            raise                                                       # failed and released this one's all-reduce
        except RuntimeError as err:
            raise _SiteError("o_proj", err) from err


class _TensorParallelMLP(nn.Module):
    """The MLP on one rank: ``mlp_fn(x, gate_shard, up_shard, down_shard, all_reduce)``."""

    def __init__(self, mlp_fn, mlp, all_reduce):
        super().__init__()
        self.mlp_fn, self.all_reduce = mlp_fn, all_reduce
        self.gate, self.up, self.down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight

    def forward(self, x):   # [B, S, E], the same on every rank
        try:
            return self.mlp_fn(x, self.gate, self.up, self.down, self.all_reduce)
        except (NotImplementedError, threading.BrokenBarrierError):   # as in _RowParallel
            raise
        except RuntimeError as err:
            raise _SiteError("mlp", err) from err


def _library_mlp(x, gate_shard, up_shard, down_shard, all_reduce):
    y = F.linear(F.silu(F.linear(x, gate_shard)) * F.linear(x, up_shard), down_shard)
    all_reduce(y)
    return y


@functools.lru_cache(maxsize=2)
def _e2e_model(o_proj_bias: bool):
    """The shipped tiny model in float32; with ``o_proj_bias``, every o_proj gets a fixed random bias."""
    from course_lib.grading.lesson01 import _float32_target

    model = _float32_target()[0]
    if not o_proj_bias:
        return model
    model, gen = copy.deepcopy(model), torch.Generator().manual_seed(80)
    for layer in model.model.layers:
        old = layer.self_attn.o_proj
        layer.self_attn.o_proj = nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            layer.self_attn.o_proj.weight.copy_(old.weight)
            layer.self_attn.o_proj.bias.copy_(0.1 * torch.randn(old.out_features, generator=gen))
    return model


def tp_decode(row_fn, mlp_fn, world_size: int, prompt: list[int], steps: int, o_proj_bias: bool):
    """Greedy decode (no cache) of ``prompt`` on the tiny model split over ``world_size`` simulated ranks: the
    library's Megatron sharding (``shard_model``: column-parallel q/k/v, gate and up, the heads divided), with
    every o_proj run by ``row_fn`` and every MLP by ``mlp_fn`` (None: the library's). Returns per rank the tokens
    and the all-reduce calls made from o_proj and from the MLPs; or ``{"error", "site"}`` for a shape error. Runs
    where the learner's code lives (the grader runs it in the notebook's kernel)."""
    from course_lib.parallel.tensor import greedy_no_cache, row_parallel_forward, shard_model

    row_fn, mlp_fn = row_fn or row_parallel_forward, mlp_fn or _library_mlp
    model = _e2e_model(o_proj_bias)

    def rank_fn(rank, all_reduce):
        calls = dict.fromkeys(_SITES, 0)

        def counted(site):
            def site_all_reduce(tensor, *args, **kwargs):
                calls[site] += 1
                return all_reduce(tensor, *args, **kwargs)
            return site_all_reduce

        tp, _ = shard_model(model, rank, world_size)
        for layer in tp.model.layers:
            o_proj = layer.self_attn.o_proj
            layer.self_attn.o_proj = _RowParallel(row_fn, o_proj.weight, o_proj.bias, counted("o_proj"))
            layer.mlp = _TensorParallelMLP(mlp_fn, layer.mlp, counted("mlp"))
        _, tokens = greedy_no_cache(tp, torch.tensor([prompt]), steps)
        return dict(tokens=[int(t) for t in tokens[0]], calls=calls)

    try:
        with torch.no_grad():
            results, _ = run_ranks(rank_fn, [(r,) for r in range(world_size)], timeout_s=60)
    except _SiteError as err:
        return dict(error=str(err), site=err.site)
    return results


_SHAPE_HINTS = {
    "o_proj": "o_proj is row-parallel: x_shard [B, S, Hq·D/tp] holds this rank's heads and weight_shard [E, Hq·D/tp] "
              "the matching columns of W (split along its input dim), so the partial sum is x_shard @ weight_shard.T",
    "mlp": "gate_shard and up_shard [F/tp, E] are rows of their weights (column-parallel: split along the output "
           "dim), down_shard [E, F/tp] holds columns of down_proj (row-parallel: split along its input dim): "
           "h = silu(x @ gate_shard.T) * (x @ up_shard.T) is [..., F/tp], y = h @ down_shard.T is [..., E]",
}


_TOKEN_HINTS = {
    "row_parallel_forward": "row_parallel_forward returns the tensor it all-reduced (the sum of the ranks' partial "
                            "sums x_shard @ weight_shard.T), plus the bias once",
    "tp_mlp_forward": "in tp_mlp_forward, silu(x @ gate_shard.T) * (x @ up_shard.T) is this rank's own F/tp hidden "
                      "units (summing them over the ranks mixes different units): only y = h @ down_shard.T is a "
                      "partial sum to all-reduce, and no nonlinearity comes after the reduce",
}


def check_end_to_end(row_fn, mlp_fn) -> CheckResult:
    """Your row_parallel_forward (every o_proj) and tp_mlp_forward (every MLP) run the shipped tiny model split
    over 2 and 4 simulated ranks, with the library's column-parallel q/k/v: the greedy tokens of every rank must
    equal those of the unsplit model exactly (float32), with one all-reduce per o_proj and one per MLP, so two per
    layer. The tp=4 case gives o_proj a bias (as GPT-2 has). When the tokens differ, each of your functions runs
    alone with the library's other: the hint names the one that breaks them."""
    from course_lib.grading.lesson01 import _float32_target
    from course_lib.parallel.tensor import greedy_no_cache

    model, tok = _float32_target()
    prompt, L = tok.encode(_E2E_PROMPT), model.config.num_hidden_layers

    def decode(row, mlp, tp, bias):
        try:
            return run_beside(row_fn, "course_lib.grading.lesson08:tp_decode", row, mlp, tp, prompt, _E2E_STEPS,
                              bias)
        except NotImplementedError as err:
            raise NotImplementedError(f"Exercise: this check runs exercises 1 and 2 together in the model: finish "
                                      f"both first ({err})") from None

    with Checker("end_to_end", points=2, timeout_s=180) as c:
        for tp, bias in _E2E_CASES:
            want = greedy_no_cache(_e2e_model(bias), torch.tensor([prompt]), _E2E_STEPS)[1][0].tolist()
            c.case = (f"tp={tp}, prompt {_E2E_PROMPT!r} ({len(prompt)} tokens), {_E2E_STEPS} greedy tokens, "
                      f"{L} layers" + (", o_proj with a bias" if bias else ", the shipped model (no biases)"))
            got = decode(row_fn, mlp_fn, tp, bias)
            if isinstance(got, dict):
                fn = "row_parallel_forward" if got["site"] == "o_proj" else "tp_mlp_forward"
                c.check(False, expected=f"your {fn} runs on this rank's shards", got=got["error"],
                        hint=_SHAPE_HINTS[got["site"]])
            per_layer = {site: [r["calls"][site] / (L * _E2E_STEPS) for r in got] for site in _SITES}
            for site, fn, wrong in [
                ("o_proj", "row_parallel_forward", "one all-reduce of the [..., E] partial sums, then the bias"),
                ("mlp", "tp_mlp_forward", "the column-parallel gate/up outputs are this rank's own F/tp hidden "
                 "units: no all-reduce after them; only down_proj's partial sums are all-reduced"),
            ]:
                n = per_layer[site][0]
                hint = (f"no all-reduce in your {fn}: each rank kept its partial sum" if n == 0 else
                        f"{fn}: {wrong}")
                c.check(per_layer[site] == [1] * tp, expected=f"1 all-reduce per {site} per forward on every rank "
                        "(2 per layer: o_proj and the MLP)", got=f"{per_layer[site]} per layer and forward (rank 0 "
                        f"... {tp - 1})", hint=hint)
            tokens = [r["tokens"] for r in got]
            if all(t == want for t in tokens):
                c.cases_passed += 1
                continue
            guilty = [fn for fn, pieces in [("row_parallel_forward", (row_fn, None)), ("tp_mlp_forward",
                                                                                        (None, mlp_fn))]
                      if any(r["tokens"] != want for r in decode(*pieces, tp, bias))]
            if guilty == ["row_parallel_forward"] and bias:
                hint = (f"your row_parallel_forward is right without a bias (tp=2) but not with o_proj's: a bias added "
                        f"before the all-reduce is summed {tp} times; add it once, after")
            elif guilty:
                hint = (f"with the library's other function, your {' and your '.join(guilty)} alone already "
                        f"change{'s' * (len(guilty) == 1)} the tokens: " + "; ".join(_TOKEN_HINTS[fn] for fn in guilty))
            else:
                hint = "each of your functions decodes correctly with the library's other, but not together"
            rank = next(r for r, t in enumerate(tokens) if t != want)
            c.check_equal(tokens[rank], want, case=f"{c.case}: rank {rank}'s tokens vs the unsplit model", hint=hint)
    return c.result

