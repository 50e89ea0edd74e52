"""Running a learner's Triton kernel inside a check: the same launch on the interpreter and compiled."""
from __future__ import annotations

import inspect

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


def launch(kernel, grid, *args, exercise: str = "Exercise: write the kernel", **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` and surface the learner's own error.

    The interpreter wraps an exception raised inside a kernel (the stub's NotImplementedError, a learner's
    IndexError) in its own InterpreterError: unwrap it, so the check reports "not attempted" or the learner's
    line. Compiled on a GPU a stub does not even compile (``raise`` is not Triton): report it as not attempted.
    """
    if is_remote(kernel):  # run the launch, and the unwrapping below, in the learner's kernel
        return run_beside(kernel, "course_lib.grading.kernels:launch", kernel, grid, *args, exercise=exercise, **kwargs)
    try:
        kernel[grid](*args, **kwargs)
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
