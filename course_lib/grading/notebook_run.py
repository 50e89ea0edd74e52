"""A notebook run for the grader: its cells in a kernel, restarts around broken cells, and the remote session.

A cell that runs past its time is interrupted (and, if the kernel does not answer, killed); a cell that kills the
kernel is skipped after a restart, and the cells before it run again, so that the checks after it still find what
the notebook defined. At most ``MAX_RESTARTS`` restarts and ``deadline`` seconds per notebook, cells and checks
together. Cells that only call checks are not run: the grader runs every check itself (``course_lib.grade``).
"""
from __future__ import annotations

import ast
import os
import time
from pathlib import Path

from course_lib.grading.core import FAILED, NOT_ATTEMPTED
from course_lib.grading.manifest import check_calls
from course_lib.grading.remote import Session
from course_lib.grading.runner import ExecuteTimeout, Kernel, KernelDied

MAX_RESTARTS = 3
_START_SERVER = ("import course_lib.grading.remote as _course_remote\n"
                 "__course_grader__ = _course_remote.KernelServer(globals())\ndel _course_remote")


def is_check_only(source: str) -> bool:
    """True for a cell whose every statement is a ``check_*(...)`` call."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    return bool(body) and all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
                              and isinstance(s.value.func, ast.Name) and s.value.func.id.startswith("check_")
                              for s in body)


def defined_names(source: str) -> set[str]:
    """Names a cell binds at top level (def, class, assignment, import)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


class NotebookRun:
    def __init__(self, nb, path: Path, workdir: Path, *, timeout: float, deadline: float):
        self.cells = [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        self.timeout, self.deadline, self.workdir = timeout, deadline, workdir
        self.cwd = Path(path).parent.resolve()
        self.outcome: dict[int, tuple[str, str]] = {}  # cell index -> ("error" | "timeout" | "died", text)
        self.skip: set[int] = set()                       # cells not run again after a restart
        self.started = time.monotonic()
        self.kernel: Kernel | None = None
        self.session: Session | None = None
        self.restarts, self.stopped = 0, ""

    def time_left(self) -> float:
        return self.deadline - (time.monotonic() - self.started)

    # ------------------------------------------------------------ cells
    def execute(self) -> None:
        """Start the kernel, run the cells (restarting around broken ones), then start the grader's helper."""
        while not self.stopped:
            self._start()
            if self._run_cells() and self._start_server():
                return

    def _start(self) -> None:
        if self.kernel is not None:
            self.kernel.kill()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.kernel = Kernel(self.cwd, env, self.workdir)
        try:
            self.kernel.start()
        except Exception as err:
            self.stopped = f"the kernel did not start ({type(err).__name__}: {err})"

    def _run_cells(self) -> bool:
        """Run every cell not skipped; False when the kernel died (the caller restarts) or time ran out."""
        for i, source in self.cells:
            if self.stopped:
                return False
            if i in self.skip or is_check_only(source):
                continue
            left = self.time_left()
            if left <= 0:
                exercise, where = self.cell_name(i)
                self.stopped = f"the notebook's time limit of {self.deadline:g} s ran out before {exercise} ({where})"
                return False
            limit = min(self.timeout, left)
            try:
                reply = self.kernel.execute(source, limit)
            except ExecuteTimeout:
                self.outcome.setdefault(i, ("timeout", f"timed out after {limit:g} s"))
                self.skip.add(i)
                if not self.kernel.interrupt():
                    return self._died()
                continue
            except KernelDied:
                self.outcome.setdefault(i, ("died", "the kernel died"))
                self.skip.add(i)
                return self._died()
            if reply.status != "ok":
                self.outcome.setdefault(i, ("error", f"{reply.ename}: {reply.evalue}"))
        return True

    def _died(self) -> bool:
        self.restarts += 1
        if self.restarts > MAX_RESTARTS:
            self.stopped = f"the kernel died {self.restarts} times"
        return False

    def _start_server(self) -> bool:
        try:
            reply = self.kernel.execute(_START_SERVER, min(60, max(self.time_left(), 1)))
        except (ExecuteTimeout, KernelDied):
            return self._died()
        if reply.status != "ok":   # e.g. an interrupted cell left a half-imported module: once more, fresh
            if self._died() or self.stopped:
                self.stopped = f"the grader's helper did not start in the kernel ({reply.ename}: {reply.evalue})"
            return False
        self.session = Session(self._call, self.workdir, lambda: min(self.timeout, self.time_left()))
        return True

    def _call(self, code: str, limit: float) -> None:
        try:
            self.kernel.execute(code, limit)
        except ExecuteTimeout:
            left = self.time_left()
            why = " (the notebook's time limit ran out)" if left <= 0 else " per call (--timeout)"
            raise ExecuteTimeout(f"your code ran past the grader's limit of {limit:g} s" + why) from None
        except KernelDied:
            raise KernelDied("the kernel died while running your code (a crash: an out-of-bounds access in a "
                             "kernel? os._exit()?); the grader restarts it for the next check") from None

    # ------------------------------------------------------------ checks
    def unavailable(self) -> str:
        """Why no check can run any more ('' while one can)."""
        if not self.stopped and self.time_left() <= 0:
            self.stopped = f"the notebook's time limit of {self.deadline:g} s ran out"
        return self.stopped

    def after_check(self) -> None:
        """A check that crashed or outran the kernel leaves it busy or dead: start a fresh one and replay."""
        if self.session is not None and (self.session.broken or not self.kernel.alive()):
            self.session = None
            if not self._died():
                self.execute()

    def why_undefined(self, expression: str, check_function: str, err: Exception) -> tuple[str, str]:
        """Status and reason when an exercise's object cannot be found, from the cells' outcomes."""
        try:
            names = {n.id for n in ast.walk(ast.parse(expression, mode="eval")) if isinstance(n, ast.Name)}
        except SyntaxError:
            names = set()
        for i, source in reversed(self.cells):  # the cell that defines it broke
            if i in self.outcome and names & defined_names(source):
                return self._status_of(i)
        calls = [i for i, source in self.cells if any(fn == check_function for fn, _ in check_calls(source))]
        if calls:  # as the notebook is laid out: the cells between the previous check and this one
            previous = max((i for i, source in self.cells if i < calls[0] and check_calls(source)), default=-1)
            broken = [i for i in sorted(self.outcome) if i < calls[0]]
            recent = [i for i in broken if i > previous]
            if broken:
                return self._status_of(recent[0] if recent else broken[-1])
        return FAILED, (f"`{expression}` is not defined in the notebook ({type(err).__name__}: {err}): run the "
                        "exercise's cell, and keep its name")

    def _status_of(self, i: int) -> tuple[str, str]:
        kind, text = self.outcome[i]
        exercise, where = self.cell_name(i)
        if kind == "error" and text.startswith("NotImplementedError"):
            return NOT_ATTEMPTED, f"{exercise} still raises {text} ({where})"
        if kind == "error":
            return FAILED, f"did not run: {exercise} raised {text} ({where})"
        if kind == "timeout":
            return FAILED, f"did not run: {exercise} {text} ({where})"
        return FAILED, f"did not run: the kernel died in {exercise} ({where})"

    def cell_name(self, i: int) -> tuple[str, str]:
        """Cell ``i`` as the learner finds it: by the exercise whose check follows it ("the code of exercise
        `factor`"), and where ("cell 11, before check_factor(...)"); a cell after the last check is named by
        its number only."""
        for j, source in self.cells:
            calls = check_calls(source) if j >= i else []
            if calls:
                function = calls[0][0]
                return (f"the code of exercise `{function.removeprefix('check_')}`",
                        f"cell {i + 1}, before {function}(...)")
        return f"cell {i + 1}", "after the last check"

    def close(self) -> None:
        if self.kernel is not None:
            self.kernel.kill()
            self.kernel = None
