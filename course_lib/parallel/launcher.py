"""Start N ranks of a function with torch.distributed: gloo on CPU, NCCL on GPUs (one GPU per rank).

    results = launch(fn, world_size, *args, **kwargs)    # fn(ctx, *args, **kwargs) runs on every rank

Two ways to get the processes:

* **started here** (a notebook, a test, ``python -m course_lib.parallel``): ``world_size`` fresh Python
  processes on this machine (forkserver, else spawn), rendezvous on a free localhost port. ``fn`` must be
  importable by name (a function of ``course_lib``, not one defined in a notebook: spawned processes cannot see a
  notebook's code).
* **under torchrun** (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by it, on one node or several):
  this process *is* one rank; ``fn`` runs here and the results of every rank are gathered to every rank.

Either way ``launch`` returns ``[result of rank 0, result of rank 1, ...]``. A rank that raises, dies or
outlives ``timeout_s`` ends the whole run with ``RankError`` (its traceback included) or ``TimeoutError``:
no other rank is left waiting forever in a collective.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

# NCCL on the course's GPU machines: no NVLink SHARP multicast (NVLS) and no multicast symmetric memory.
_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


@dataclass
class RankContext:
    """What a rank function gets as its first argument."""

    rank: int
    world_size: int
    backend: str            # "gloo" or "nccl"
    device: torch.device    # cpu, or cuda:<local rank> with NCCL


class RankError(RuntimeError):
    """A rank raised an exception or died; the message holds its traceback."""


def default_backend(world_size: int) -> str:
    """NCCL when every rank can have a GPU of its own (and COURSE_FORCE_CPU is unset), else gloo."""
    from course_lib.device import HAS_GPU
    return "nccl" if HAS_GPU and torch.cuda.device_count() >= world_size else "gloo"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _init(rank: int, world_size: int, backend: str, timeout_s: float) -> RankContext:
    for key, value in _NCCL_ENV.items():
        os.environ.setdefault(key, value)
    device = torch.device("cpu")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 equality checks need true fp32 matmuls
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # don't oversubscribe the cores
    # A collective stuck for longer than this raises in the rank instead of hanging forever.
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return RankContext(rank, world_size, backend, device)


def _child(fn, rank, world_size, backend, port, timeout_s, args, kwargs, results, env) -> None:
    os.environ.update(env)  # the parent's environment now (a forkserver keeps the one it started with)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        ctx = _init(rank, world_size, backend, timeout_s)
        out = fn(ctx, *args, **kwargs)
        # Plain pickle: tensors travel by value (torch's multiprocessing pickler would use shared memory).
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # report everything, then exit non-zero
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context():
    """Fresh processes, never a fork of this one (safe with CUDA, threads and Jupyter kernels).

    A *forkserver* imports torch once and forks each rank from that clean process: a launch costs a
    fraction of a second instead of a torch import per rank. Where there is no forkserver, plain spawn.
    """
    from course_lib.device import HAS_GPU

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Modules that do not initialize CUDA (a fork after that would break it). torch._dynamo is what
        # building a model on the meta device imports (~3 s); with a GPU we play safe and skip it.
        ctx.set_forkserver_preload(["torch"] + ([] if HAS_GPU else ["torch._dynamo"]))
        return ctx
    return mp.get_context("spawn")


def _run_torchrun(fn, world_size, backend, timeout_s, args, kwargs) -> list:
    env_world = int(os.environ["WORLD_SIZE"])
    if world_size != env_world:
        raise ValueError(f"launch(world_size={world_size}) under torchrun with WORLD_SIZE={env_world}: "
                         f"start torchrun with {world_size} processes in total")
    backend = backend or default_backend(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    ctx = _init(int(os.environ["RANK"]), world_size, backend, timeout_s)
    try:
        out = fn(ctx, *args, **kwargs)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, out)   # every rank gets every rank's result, as when spawned
        return gathered
    finally:
        dist.destroy_process_group()


def launch(fn, world_size: int, *args, backend: str | None = None, timeout_s: float = 120, **kwargs) -> list:
    """Run ``fn(ctx, *args, **kwargs)`` on ``world_size`` ranks; return the list of their results.

    ``backend``: "gloo" (CPU) or "nccl" (one GPU per rank); default: NCCL if enough GPUs, else gloo.
    ``timeout_s`` bounds the whole run (and every collective inside it).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for key, value in _NCCL_ENV.items():
        os.environ.setdefault(key, value)  # inherited by the spawned ranks (and by NCCL here under torchrun)
    if under_torchrun():
        return _run_torchrun(fn, world_size, backend, timeout_s, args, kwargs)
    backend = backend or default_backend(world_size)
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"NCCL needs one GPU per rank: {world_size} ranks, {torch.cuda.device_count()} GPU(s)")
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, backend, port, timeout_s, args, kwargs, results, env),
                         daemon=True, name=f"rank{r}") for r in range(world_size)]
    for p in procs:
        p.start()
    outputs, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outputs]
                if dead:
                    time.sleep(0.5)  # its error report may still be in the pipe
                    if results.empty():
                        r = dead[0]
                        raise RankError(f"rank {r} of {world_size} died with exit code {procs[r].exitcode} "
                                        "without reporting (killed? out of memory? a crash in native code?)") from None
                    continue
                if time.monotonic() > deadline:
                    waiting = [r for r in range(world_size) if r not in outputs]
                    raise TimeoutError(f"{fn.__name__} on {world_size} ranks ({backend}) did not finish in "
                                       f"{timeout_s:g} s; ranks still running: {waiting}") from None
                continue
            if status == "error":
                raise RankError(f"rank {rank} of {world_size} ({backend}) failed in {fn.__name__}:\n{payload}")
            outputs[rank] = pickle.loads(payload)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:  # on error: stop the others, which may be blocked in a collective
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [outputs[r] for r in range(world_size)]
