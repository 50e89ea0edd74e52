"""Ranks as threads of one process, with a simulated all-reduce: for code written in a notebook.

Spawned processes cannot run a function defined in a Jupyter notebook (they re-import it by name and a
notebook has no module to import). So exercises that need several ranks run the learner's function
in ``world_size`` threads, each with its own shards, and hand each thread an ``all_reduce(tensor)``
that behaves like ``dist.all_reduce``: it waits for every rank, then overwrites ``tensor`` in place with
the sum over the ranks. The code is the same you would run under ``launch`` with ``dist.all_reduce``.
"""
from __future__ import annotations

import threading

import torch


class ThreadGroup:
    """``world_size`` ranks sharing a sum-all-reduce; counts each rank's calls and bytes."""

    def __init__(self, world_size: int, timeout_s: float = 20):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)
        self._slots: list[torch.Tensor | None] = [None] * world_size
        self.calls = [0] * world_size
        self.bytes = [0] * world_size

    def all_reduce_for(self, rank: int):
        """The ``all_reduce(tensor)`` of one rank: in-place sum over all ranks, like ``dist.all_reduce``."""
        def all_reduce(tensor, op=None, group=None, async_op=False):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"all_reduce expects a torch.Tensor, got {type(tensor).__name__}")
            self.calls[rank] += 1
            self.bytes[rank] += tensor.numel() * tensor.element_size()
            self._slots[rank] = tensor.detach().clone()
            self._barrier.wait()                       # every rank has deposited its partial result
            shapes = {tuple(t.shape) for t in self._slots}
            if len(shapes) > 1:
                raise ValueError(f"all_reduce called with different shapes on different ranks: {sorted(shapes)}")
            total = torch.stack(self._slots).sum(0)    # rank order: the same sum on every rank
            self._barrier.wait()                       # everyone has read the slots before they are reused
            tensor.copy_(total)
        return all_reduce

    def abort(self) -> None:
        self._barrier.abort()


def run_ranks(fn, args_per_rank: list[tuple], *, timeout_s: float = 20) -> tuple[list, ThreadGroup]:
    """Call ``fn(*args_per_rank[r], all_reduce=<rank r's all_reduce>)`` for every rank r in its own thread.

    Returns (results in rank order, the group with its counters). The first exception of any rank is
    re-raised here (the others are released from their barrier), so a mistake surfaces as in one process.
    """
    world_size = len(args_per_rank)
    group = ThreadGroup(world_size, timeout_s)
    results, errors = [None] * world_size, [None] * world_size

    def body(rank):
        try:
            results[rank] = fn(*args_per_rank[rank], all_reduce=group.all_reduce_for(rank))
        except threading.BrokenBarrierError as err:
            errors[rank] = err
        except BaseException as err:  # handed to the caller
            errors[rank] = err
            group.abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True, name=f"rank{r}") for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if any(t.is_alive() for t in threads):
        group.abort()
        raise TimeoutError(f"the ranks did not finish in {timeout_s:g} s (does every rank call all_reduce "
                           "the same number of times?)")
    real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    if any(errors):
        raise RuntimeError("the ranks called all_reduce a different number of times, so some waited forever for the "
                           "others")
    return results, group
