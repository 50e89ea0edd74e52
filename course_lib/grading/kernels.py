"""Running a learner's Triton kernel inside a check: the same launch on the interpreter and compiled."""
from __future__ import annotations

import inspect


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
