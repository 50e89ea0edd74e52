"""Tensor and pipeline parallelism on real processes with torch.distributed (lessons 08 and 09).

    launcher.py   start N ranks (gloo on CPU, NCCL on GPUs; or under torchrun), errors and timeouts
    comm.py       all-reduce counting and timing, ring-all-reduce cost model, interconnect specs
    tensor.py     column/row-parallel linears, Megatron sharding of the course model (2 all-reduces/layer)
    pipeline.py   stages, micro-batches with send/recv, GPipe and 1F1B forward schedules, stage timelines
    schedule.py   schedules on paper: op orders, ideal simulation, bubble, timeline plot
    simulate.py   ranks as threads of one process (for exercises graded inside a notebook)
    lockstep.py   a pipeline's stages in one process on one clock: the timeline in steps, the model's tokens
    check.py      run the sharded model and compare it with the single-process one
    __main__.py   python -m course_lib.parallel --tp 2 | --pp 2 --microbatches 4
"""
from course_lib.parallel.comm import LINKS, CommStats, all_reduce_seconds, ring_bytes_per_rank
from course_lib.parallel.launcher import RankContext, RankError, launch
from course_lib.parallel.schedule import bubble_formula, measured_bubble, simulate

__all__ = ["LINKS", "CommStats", "all_reduce_seconds", "ring_bytes_per_rank", "RankContext", "RankError", "launch",
           "bubble_formula", "measured_bubble", "simulate"]
