"""The grading framework: one ``Checker`` per exercise, one ``CheckResult`` out.

A check module (``course_lib/grading/lessonNN.py``) writes each check like this::

    def check_arithmetic_intensity(student_fn) -> CheckResult:
        \"\"\"Checks FLOPs / bytes of a matmul for decode- and prefill-sized M.\"\"\"
        with Checker("arithmetic_intensity", points=2) as c:     # timeout_s=60 by default
            for M, N, K in [(1, 64, 64), (512, 4096, 4096)]:      # small cases first
                got = student_fn(M, N, K, 2)                       # student code runs INSIDE the block
                c.check_close(got, want, case=f"M={M}, N={N}, K={K}", rtol=1e-6, hint="FLOPs = 2*M*N*K")
        return c.result

``check_close`` / ``check_equal`` / ``check`` stop the block at the first failing case. Setting ``c.case = "..."``
before calling the learner's code names the case for an exception that code raises (and for a check without
``case=``): "your code raised IndexError ..." then shows the case that made it raise. The Checker
then suppresses the exception (the notebook keeps running) and prints a short report. In a notebook
that report is the learner's feedback and nothing more: ``python -m course_lib.grade`` runs every
check again in its own process, on references to the learner's objects (``course_lib.grading.remote``),
and trusts only what it computes there.

GPU-only checks pass ``needs_gpu=True`` and call ``c.require_gpu()`` first; without a GPU it ends
the block there and the result is "needs a GPU" (0 points, not a failure)::

    with Checker("flash_attention_speed", points=2, needs_gpu=True) as c:
        c.require_gpu()                    # on CPU: nothing below runs
        ...
    return c.result

(``if c.skipped: return c.result`` as the block's first line is equivalent.)
"""
from __future__ import annotations

import contextlib
import math
import numbers
import signal
import sys
import sysconfig
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from course_lib.device import HAS_GPU

PASSED, FAILED, NOT_ATTEMPTED, NEEDS_GPU = "passed", "failed", "not attempted", "needs a GPU"
ICONS = {PASSED: "✅", FAILED: "❌", NOT_ATTEMPTED: "⏭", NEEDS_GPU: "🖥"}

_GRADING_DIR = str(Path(__file__).resolve().parent)
_LIBRARY_DIRS = tuple({str(Path(__file__).resolve().parents[2] / "kernels"), str(Path(__file__).resolve().parents[1]),
                       *(sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib"))})


@dataclass
class CheckResult:
    """The outcome of one check. ``status`` is "passed", "failed", "not attempted" or "needs a GPU"."""

    name: str
    status: str
    points: float
    max_points: float
    message: str = ""

    def _ipython_display_(self) -> None:
        # The Checker already printed this result; a cell ending in `check_x(x)` must not print it twice.
        if not getattr(self, "_printed", False):
            print(format_result(self))


class CheckFailed(Exception):
    """Raised by the ``check_*`` methods at the first failing case; caught by the Checker."""


class OutOfBounds(CheckFailed):
    """A learner's kernel loaded or stored outside the tensors passed to it (found in the interpreter, before the
    access: ``course_lib.grading.bounds``). A failed case, reported with the case that ran it."""


class _Skip(Exception):
    """Raised by ``require_gpu`` on a machine without a GPU."""


class _Timeout(BaseException):
    """Raised by SIGALRM; a BaseException so that a learner's ``except Exception`` cannot swallow it."""


def format_result(r: CheckResult) -> str:
    """The text a learner sees: one status line, then the indented details."""
    head = f"{ICONS.get(r.status, '?')} {r.name}: {r.status} ({r.points:g}/{r.max_points:g} points)"
    if r.status == NOT_ATTEMPTED:
        head += ": the stub still raises NotImplementedError"
    lines = [line for line in r.message.splitlines() if r.status != PASSED or line.startswith("note: ")]
    return "\n".join([head] + ["   " + line for line in lines])


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compare_tensors(got, want, rtol: float, atol: float, exact: bool) -> str | None:
    """None when equal (or close); otherwise a summary of the difference."""
    if not isinstance(got, torch.Tensor):
        return f"expected a torch.Tensor {tuple(want.shape)} {want.dtype}, got {type(got).__name__}: {_short(got)}"
    if got.shape != want.shape:
        return f"shape mismatch: expected {tuple(want.shape)}, got {tuple(got.shape)}"
    if got.dtype != want.dtype:
        return f"dtype mismatch: expected {want.dtype}, got {got.dtype}"
    g, w = got.detach().cpu(), want.detach().cpu()
    if g.is_floating_point() or g.is_complex():
        g, w = g.double(), w.double()
    if exact:
        bad = (g != w) & ~(torch.isnan(g) & torch.isnan(w)) if g.is_floating_point() else g != w
    else:
        bad = ~torch.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
    if not bad.any():
        return None
    idx = tuple(int(i) for i in torch.nonzero(bad)[0]) if g.dim() else ()
    text = (f"{int(bad.sum())} of {bad.numel()} elements differ; first at index {list(idx)}: "
            f"expected {w[idx].item():.6g}, got {g[idx].item():.6g}")
    if g.is_floating_point():
        err, nonzero = (g - w).abs().nan_to_num(nan=math.inf), w != 0
        rel = f", max rel error {(err[nonzero] / w[nonzero].abs()).max().item():.3g}" if nonzero.any() else ""
        text += f"\nmax abs error {err.max().item():.3g}{rel} (rtol={rtol:g}, atol={atol:g})"
    return text


def _compare(got, want, rtol: float, atol: float, exact: bool, path: str = "") -> str | None:
    """Recursive comparison of tensors, numbers and (nested) lists/tuples/dicts."""
    where = f"at {path}: " if path else ""
    if isinstance(want, torch.Tensor):
        diff = _compare_tensors(got, want, rtol, atol, exact)
        return diff and where + diff
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple, torch.Tensor)):
        got = got.tolist() if isinstance(got, torch.Tensor) else got
        if len(got) != len(want):
            return f"{where}length mismatch: expected {len(want)} items, got {len(got)}"
        for i, (g, w) in enumerate(zip(got, want)):
            diff = _compare(g, w, rtol, atol, exact, f"{path}[{i}]")
            if diff:
                return diff
        return None
    if isinstance(want, dict) and isinstance(got, dict) and not exact:
        if got.keys() != want.keys():
            return f"{where}keys differ: expected {sorted(want, key=str)}, got {sorted(got, key=str)}"
        return next((d for k in want if (d := _compare(got[k], want[k], rtol, atol, exact, f"{path}[{k!r}]"))), None)
    if not exact and isinstance(want, numbers.Real) and not isinstance(want, bool):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, numbers.Real) or isinstance(got, bool):
            return f"{where}expected a number, got {type(got).__name__}: {_short(got)}"
        if math.isnan(want) and math.isnan(got) or abs(got - want) <= atol + rtol * abs(want):
            return None
        return f"{where}abs error {abs(got - want):.3g} > atol + rtol*|expected| (rtol={rtol:g}, atol={atol:g})"
    try:
        equal = bool(got == want)
    except Exception:  # e.g. comparing arrays of different shapes
        equal = False
    return None if equal else (f"{where}expected {_short(want)}, got {_short(got)}" if path else "")


_quiet = False  # the grader's process: results are returned, not printed


@contextlib.contextmanager
def quiet():
    """Checks inside this block print nothing (the grader collects their results itself)."""
    global _quiet
    old, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = old


def _frames(exc: BaseException | None, tb) -> list[traceback.FrameSummary]:
    """The traceback of an exception; for one raised in the learner's kernel, the frames it had there."""
    remote = getattr(exc, "remote_frames", None)
    return list(remote) if remote is not None else traceback.extract_tb(tb)


def _student_frame(exc: BaseException | None, tb) -> traceback.FrameSummary | None:
    """The innermost frame of the learner's own code: outside the grader, course_lib, kernels and libraries."""
    frames = [f for f in _frames(exc, tb) if not f.filename.startswith(_GRADING_DIR)]
    own = [f for f in frames if not f.filename.startswith(_LIBRARY_DIRS)]
    return (own or frames or [None])[-1]


def _where(frame: traceback.FrameSummary | None) -> str:
    if frame is None:
        return ""
    in_a_cell = "ipykernel_" in frame.filename or frame.filename.startswith("<")
    cell = "your cell" if in_a_cell else Path(frame.filename).name
    source = (frame.line or "").strip()
    return f"in {frame.name}(), {cell} line {frame.lineno}" + (f": {source}" if source else "")


class Checker:
    """Context manager that turns the outcome of one exercise's checks into a ``CheckResult``."""

    def __init__(self, name: str, points: float = 1, *, needs_gpu: bool = False, timeout_s: float | None = 60):
        self.name, self.points, self.needs_gpu, self.timeout_s = name, points, needs_gpu, timeout_s
        self.skipped = needs_gpu and not HAS_GPU  # True: the body must not run (see require_gpu)
        self.cases_passed = 0  # comparisons (check_* calls) passed so far; a case may make several
        self.case = ""  # the case being run: shown when the learner's code raises during it
        self.note = ""  # information the check measured beside its verdict: shown under a passed result
        caller = sys._getframe(1)   # the check function: "module:function", as the manifest names it
        self.check_function = f"{caller.f_globals.get('__name__')}:{caller.f_code.co_name}"
        self.result: CheckResult | None = None
        self._old_handler = None

    # --- assertions (call these inside the with-block) -------------------------------------------
    def check_close(self, got, expected, *, case: str = "", rtol: float = 1e-5, atol: float = 1e-8,
                    hint: str = "") -> None:
        """Tensors, numbers or lists of them agree within ``|got - expected| <= atol + rtol*|expected|``."""
        self._verdict(_compare(got, expected, rtol, atol, exact=False), got, expected, case, hint)

    def check_equal(self, got, expected, *, case: str = "", hint: str = "") -> None:
        """Exact equality (ints, lists, token ids, tensors of the same shape and dtype)."""
        self._verdict(_compare(got, expected, 0.0, 0.0, exact=True), got, expected, case, hint)

    def check(self, condition: bool, *, case: str = "", expected: str = "", got: str = "", hint: str = "") -> None:
        """A free-form condition; ``expected`` and ``got`` are the texts shown when it is false."""
        if not condition:
            self._fail(case, [f"expected: {expected}" if expected else "", f"got: {got}" if got else ""], hint)
        self.cases_passed += 1

    def run_together(self, serve, pieces, *, exercises: str, expected: str):
        """``serve(*pieces)``: the learner's functions run together inside the engine. A stub among them makes the
        check not attempted; an error the engine reported (``{"error": ...}``) fails it, pointing at the unit checks."""
        try:
            got = serve(*pieces)
        except NotImplementedError:
            raise NotImplementedError(f"Exercise: this check runs exercises {exercises} together inside the engine: "
                                      "finish them first") from None
        if "error" in got:
            self.check(False, expected=expected, got=got["error"],
                       hint="the unit check of that function above shows the rule; here it broke the engine")
        return got

    def require_gpu(self) -> None:
        """First line of a ``needs_gpu=True`` block: on a machine without a GPU, end the block here."""
        if self.skipped:
            raise _Skip

    def _verdict(self, diff: str | None, got, expected, case: str, hint: str) -> None:
        if diff is None:
            self.cases_passed += 1
            return
        plain = not diff or not isinstance(expected, torch.Tensor) and not isinstance(got, torch.Tensor)
        self._fail(case, [f"expected: {_short(expected)}", f"got: {_short(got)}"] if plain else [], hint, diff)

    def _fail(self, case: str, lines: list[str], hint: str, diff: str = "") -> None:
        case = case or self.case
        body = [f"case: {case}" if case else ""] + lines + diff.splitlines() + [f"hint: {hint}" if hint else ""]
        raise CheckFailed("\n".join(line for line in body if line))

    # --- context manager -------------------------------------------------------------------------
    def __enter__(self) -> Checker:
        if self.skipped:  # so that `if c.skipped: return c.result` works inside the block
            self.result = CheckResult(self.name, NEEDS_GPU, 0, self.points,
                                      "this check runs only on a CUDA GPU; on CPU it is skipped, not failed")
        elif self.timeout_s and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGALRM, self._on_alarm)
            self._old_timer = signal.setitimer(signal.ITIMER_REAL, self.timeout_s)[0], time.monotonic()
        return self

    def _on_alarm(self, signum, frame):
        raise _Timeout

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._old_handler is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old_handler)
            self._old_handler = None
            delay, start = self._old_timer  # re-arm an outer timer (e.g. pytest-timeout) with its time left
            if delay:
                signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - start), 1e-3))
        if exc_type is not None and not issubclass(exc_type, (Exception, _Timeout)):
            return False  # KeyboardInterrupt, SystemExit: the learner's interrupt wins
        if not self.skipped:  # a skipped check keeps the result made in __enter__ (it may already be returned)
            status, message = self._classify(exc, tb)
            self.result = CheckResult(self.name, status, self.points if status == PASSED else 0, self.points, message)
        self.result.check = self.check_function   # which check made it (names repeat across lessons: end_to_end)
        if not _quiet:
            print(format_result(self.result), flush=True)
            self.result._printed = True
        return True

    def _classify(self, exc: BaseException | None, tb) -> tuple[str, str]:
        if exc is None:
            return PASSED, f"{self.cases_passed} comparison(s) passed" + (f"\nnote: {self.note}" if self.note else "")
        if isinstance(exc, OutOfBounds) and self.case:
            return FAILED, f"case: {self.case}\n{exc}"
        if isinstance(exc, CheckFailed):
            return FAILED, str(exc)
        if isinstance(exc, _Timeout):
            return FAILED, f"timed out after {self.timeout_s:g} s (an infinite loop? a shape far too large for CPU?)"
        last = (_frames(exc, tb) or [None])[-1]  # a stub raises it in the learner's own code
        stub = last is not None and not last.filename.startswith(_LIBRARY_DIRS + (_GRADING_DIR,)) and \
            (last.line or "").strip().startswith("raise NotImplementedError")
        if isinstance(exc, NotImplementedError) and (stub or str(exc).startswith("Exercise")):
            return NOT_ATTEMPTED, str(exc)
        after = f" (after {self.cases_passed} passing comparison(s))" if self.cases_passed else ""
        lines = [f"case: {self.case}" if self.case else "",
                 f"your code raised {type(exc).__name__}: {exc}{after}", _where(_student_frame(exc, tb))]
        return FAILED, "\n".join(line for line in lines if line)
