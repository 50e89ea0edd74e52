"""Run the shipped model sharded over processes and compare it with the single-process model.

``run_tp`` and ``run_pp`` are what ``python -m course_lib.parallel``, the tests, the lessons and the
benchmark call: launch the ranks, gather logits and greedy tokens, and set them next to the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from course_lib.parallel.launcher import default_backend, launch
from course_lib.parallel.pipeline import pp_rank
from course_lib.parallel.tensor import check_tp_size, greedy_no_cache, tp_rank


def sample_batch(batch: int = 4, seq: int = 32, offset: int = 0) -> torch.Tensor:
    """Token ids [batch, seq]: consecutive windows of the validation text (real text, fixed)."""
    from course_lib.model.checkpoint import CHECKPOINTS
    from course_lib.model.corpus import load_text
    from course_lib.model.tokenizer import Tokenizer

    if batch < 1 or seq < 1:
        raise ValueError(f"sample_batch: batch and seq must be >= 1, got {batch} and {seq}")
    tokenizer = Tokenizer(CHECKPOINTS / "tiny-target")  # the tokenizer alone: no need to load the model
    ids = tokenizer.encode(load_text("validation")[offset: offset + 40 * batch * seq])
    if len(ids) < batch * seq:
        raise ValueError(f"not enough validation text for {batch} x {seq} = {batch * seq:,} tokens: "
                         f"{len(ids):,} from offset {offset}")
    return torch.tensor(ids[: batch * seq]).view(batch, seq)


def reference(input_ids: torch.Tensor, steps: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process float32 logits [B, S, V] and greedy tokens [B, steps] of the shipped model."""
    from course_lib.model.checkpoint import load_tiny

    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    model, _ = load_tiny("target", dtype=torch.float32, device=device)
    logits, tokens = greedy_no_cache(model, input_ids.to(device), steps)
    return logits.cpu(), tokens.cpu()


@dataclass
class Comparison:
    """The sharded run next to the single-process model."""

    mode: str                        # "tp=2", "pp=2 gpipe m=4", ...
    backend: str
    max_abs_diff: float              # max |logits - reference logits|
    logits_close: bool               # |diff| <= tol + tol * |reference| everywhere
    tokens_equal: bool               # the greedy tokens, exactly
    tol: float
    ranks: list = field(repr=False, default_factory=list)   # what each rank returned
    tokens: torch.Tensor | None = field(repr=False, default=None)
    ref_tokens: torch.Tensor | None = field(repr=False, default=None)

    @property
    def ok(self) -> bool:
        return self.logits_close and self.tokens_equal

    def summary(self) -> str:
        verdict = "EQUAL" if self.ok else "DIFFERENT"
        return (f"{self.mode} ({self.backend}): max |logits - single-process logits| = {self.max_abs_diff:.3g} "
                f"({'within' if self.logits_close else 'NOT within'} {self.tol:g} + {self.tol:g}·|logit|); "
                f"greedy tokens {'identical' if self.tokens_equal else 'DIFFER'} -> {verdict}")


def default_tol(backend: str) -> float:
    """fp32 sums in another order differ in the last bits: ~1e-6 relative on CPU; cuBLAS picks other
    reduction orders for other shapes, so allow 1e-4 on GPUs."""
    return 1e-5 if backend == "gloo" else 1e-4


def _compare(mode, backend, logits, tokens, input_ids, steps, tol, ranks) -> Comparison:
    ref_logits, ref_tokens = reference(input_ids, steps, "cuda" if backend == "nccl" else "cpu")
    diff = (logits.float() - ref_logits).abs().max().item()
    close = torch.allclose(logits.float(), ref_logits, rtol=tol, atol=tol)
    return Comparison(mode, backend, diff, close, torch.equal(tokens, ref_tokens), tol, ranks, tokens, ref_tokens)


def run_tp(tp: int, input_ids: torch.Tensor, *, steps: int = 4, backend: str | None = None,
           tol: float | None = None, time_comm: bool = False, reps: int = 1, timeout_s: float = 120) -> Comparison:
    """Tensor-parallel over ``tp`` processes vs the single-process model."""
    from course_lib.model.checkpoint import CHECKPOINTS
    from course_lib.model.config import ModelConfig

    # A clear error here, before any process starts, if the heads don't divide by tp.
    check_tp_size(ModelConfig.from_json(CHECKPOINTS / "tiny-target" / "config.json"), tp)
    backend = backend or default_backend(tp)
    ranks = launch(tp_rank, tp, input_ids, steps=steps, time_comm=time_comm, reps=reps, backend=backend,
                   timeout_s=timeout_s)
    for r in ranks[1:]:  # every rank ends with the same full logits (the last all-reduce made them equal)
        if not torch.equal(r["tokens"], ranks[0]["tokens"]):
            raise AssertionError(f"rank {r['rank']} produced other tokens than rank 0")
    return _compare(f"tp={tp}", backend, ranks[0]["logits"], ranks[0]["tokens"], input_ids, steps,
                    default_tol(backend) if tol is None else tol, ranks)


def run_pp(pp: int, input_ids: torch.Tensor, microbatches: int, *, schedule: str = "gpipe", steps: int = 4,
           backend: str | None = None, tol: float | None = None, reps: int = 3, timeout_s: float = 120) -> Comparison:
    """Pipeline-parallel over ``pp`` processes (stages) with ``microbatches`` micro-batches vs the single model."""
    backend = backend or default_backend(pp)
    ranks = launch(pp_rank, pp, input_ids, microbatches, schedule=schedule, steps=steps, reps=reps,
                   backend=backend, timeout_s=timeout_s)
    return _compare(f"pp={pp} {schedule} m={microbatches}", backend, ranks[-1]["logits"], ranks[-1]["tokens"],
                    input_ids, steps, default_tol(backend) if tol is None else tol, ranks)


def timeline(comparison: Comparison) -> list[dict]:
    """Every rank's events of a pipeline run, in one list."""
    return [e for r in comparison.ranks for e in r["events"]]
