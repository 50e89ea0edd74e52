"""Running a learner's Triton kernel inside a check: the same launch on the interpreter and compiled."""
from __future__ import annotations

import contextlib
import inspect

import numpy as np

from course_lib.grading.bounds import (DEFAULT_HINT, _span_bytes, guard_memory, preflight, raw_bytes, spaced,
                                      tensor_regions)
from course_lib.grading.remote import is_remote, run_beside, type_name


def is_kernel(obj) -> bool:
    """True for a Triton kernel (what ``@triton.jit`` makes: launched as ``kernel[grid](...)``), here or in the
    learner's notebook."""
    if is_remote(obj):
        return bool(run_beside(obj, "course_lib.grading.kernels:is_kernel", obj))
    return callable(getattr(obj, "__getitem__", None))


def check_is_kernel(c, kernel, example: str) -> None:
    """The first case of every kernel check: the object passed in is a Triton kernel."""
    c.check(is_kernel(kernel), case="the object passed in", expected="a Triton kernel (a function decorated with "
            "@triton.jit)", got=type_name(kernel), hint=f"pass the kernel itself: {example}")


def is_stub(kernel) -> bool:
    """True while the kernel's source still holds the exercise's ``raise NotImplementedError``."""
    try:
        source = getattr(kernel, "src", None) or inspect.getsource(getattr(kernel, "fn", kernel))
    except (OSError, TypeError):
        return False
    return "raise NotImplementedError" in source


def launch(kernel, grid, *args, exercise: str = "Exercise: write the kernel", bounds_hint: str = DEFAULT_HINT,
           **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` and surface the learner's own error.

    In the interpreter every load and store is checked before it runs (``course_lib.grading.bounds``): one outside
    the tensors passed in raises ``OutOfBounds`` ("your kernel wrote outside `out` (row r, offset o)", then
    ``bounds_hint``), a failed case instead of a write into the process's memory.

    The interpreter wraps an exception raised inside a kernel (the stub's NotImplementedError, a learner's
    IndexError) in its own InterpreterError: unwrap it, so the check reports "not attempted" or the learner's
    line. Compiled on a GPU a stub does not even compile (``raise`` is not Triton): report it as not attempted. On a
    GPU the launch first runs in the interpreter on CPU copies with its accesses checked (``bounds.preflight``), and
    the compiled launch is synchronized, so that a fault the preflight could not run fails this case, not a later
    one (the CUDA context then stays broken until the notebook's kernel restarts; the grader restarts a dead one).
    """
    if is_remote(kernel):  # run the launch, and the unwrapping below, in the learner's kernel
        return run_beside(kernel, "course_lib.grading.kernels:launch", kernel, grid, *args, exercise=exercise,
                          bounds_hint=bounds_hint, **kwargs)
    if not can_trace():
        return _launch(kernel, grid, args, kwargs, exercise, bounds_hint)
    with _spaced_apart(args, kwargs) as (args, kwargs):
        _launch(kernel, grid, args, kwargs, exercise, bounds_hint)


@contextlib.contextmanager
def _spaced_apart(args: tuple, kwargs: dict):
    """The interpreter's launch on copies of the tensors with gaps between them (``bounds.spaced_copies``: an
    access past a tensor's end is then named after that tensor, whatever the allocator put next to it), copied
    back into the caller's tensors afterwards, whatever happened."""
    copies, kw_copies = spaced(args, kwargs)
    pairs = [(a, c) for a, c in zip(args, copies) if c is not a] + \
            [(kwargs[k], kw_copies[k]) for k in kwargs if kw_copies[k] is not kwargs[k]]
    try:
        yield copies, kw_copies
    finally:
        for original, copy in pairs:   # byte for byte: what the kernel wrote between the rows of a slice too
            if original.numel():
                raw_bytes(original).copy_(raw_bytes(copy))


def _launch(kernel, grid, args: tuple, kwargs: dict, exercise: str, bounds_hint: str) -> None:
    traced = can_trace()
    guard = guard_memory(tensor_regions(kernel, args, kwargs), bounds_hint) if traced else contextlib.nullcontext()
    try:
        if not traced and _on_gpu():  # compiled: the same launch in the interpreter first, its accesses checked
            preflight(kernel, grid, args, kwargs, bounds_hint)
        with guard:
            kernel[grid](*args, **kwargs)
            if not traced:  # compiled: a fault (illegal address) surfaces here, as this case's error, not later
                _synchronize()
    except Exception as err:
        cause = err
        while cause is not None and not isinstance(cause, NotImplementedError):
            cause = cause.__cause__
        if cause is not None:                     # interpreter: the stub's own NotImplementedError
            raise cause from None
        if is_stub(kernel):                       # compiled: `raise` does not compile at all
            raise NotImplementedError(exercise) from err
        if err.__cause__ is not None and type(err).__name__ == "InterpreterError":
            raise err.__cause__ from None         # the learner's error, with the line of their kernel
        raise


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------- what a kernel reads, watched in the interpreter
def can_trace() -> bool:
    """True where kernels run in the Triton interpreter, whose loads ``launch_traced`` can watch (not compiled)."""
    from course_lib.device import INTERPRET

    if not INTERPRET:
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "interpreter_builder", None)
    return builder is not None and hasattr(builder, "create_masked_load")


@contextlib.contextmanager
def _watch_loads(records: list):
    """Record every load of the interpreted kernel as (program id, addresses, mask): ``tl.load`` with or without a
    mask ends in the interpreter builder's ``create_masked_load``, one call per load of a block."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = builder.create_masked_load

    def watched(ptrs, mask, *args, **kwargs):
        records.append((tuple(builder.grid_idx), np.asarray(ptrs.data).astype(np.int64).ravel(),
                        np.asarray(mask.data).astype(bool).ravel()))
        return original(ptrs, mask, *args, **kwargs)

    builder.create_masked_load = watched
    try:
        yield records
    finally:
        del builder.create_masked_load   # the class's method again


def launch_traced(kernel, grid, *args, watch: tuple[int, ...] = (), exercise: str = "Exercise: write the kernel",
                  bounds_hint: str = DEFAULT_HINT, **kwargs) -> dict:
    """``launch`` in the interpreter, watching the loads from the tensor arguments at the positions ``watch``.

    Returns ``{position: {program id (x, y, z): (number of loads that touched the tensor, sorted element indices
    read with the mask on)}}``: how many blocks each program loaded from it, and which of its elements. Runs where
    the kernel lives (the grader runs it in the notebook's kernel); without the interpreter (compiled on a GPU) it
    only launches and returns {}."""
    if is_remote(kernel):
        return run_beside(kernel, "course_lib.grading.kernels:launch_traced", kernel, grid, *args, watch=watch,
                          exercise=exercise, bounds_hint=bounds_hint, **kwargs)
    if not can_trace():
        launch(kernel, grid, *args, exercise=exercise, bounds_hint=bounds_hint, **kwargs)
        return {}
    records: list = []
    with _spaced_apart(args, kwargs) as (spaced_args, spaced_kwargs), _watch_loads(records):
        _launch(kernel, grid, spaced_args, spaced_kwargs, exercise, bounds_hint)
    seen: dict = {}
    for position in watch:
        t = spaced_args[position]   # the addresses the kernel read are those of the copies
        start, size = t.data_ptr(), t.element_size()
        end = start + _span_bytes(t)   # its own elements (the copies share one buffer with the other tensors)
        per_program: dict = {}
        for program, addresses, mask in records:
            inside = (addresses >= start) & (addresses < end)
            # a load of this tensor: a lane it reads lies in it, or every lane does (a fully masked load of a block
            # of it). Not one whose masked-off lanes merely point past another tensor's end into this one.
            if not ((inside & mask).any() or inside.all()):
                continue
            count, read = per_program.get(program, (0, set()))
            read.update(((addresses[inside & mask] - start) // size).tolist())
            per_program[program] = (count + 1, read)
        seen[position] = {p: (n, sorted(read)) for p, (n, read) in per_program.items()}
    return seen
