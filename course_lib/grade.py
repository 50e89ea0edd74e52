"""Grade exercise notebooks: ``python -m course_lib.grade [PATH ...] [--json] [--timeout SECONDS]``.

PATH is a notebook or a folder of notebooks (default: ``exercises/``). Each notebook runs top to
bottom in its own Jupyter kernel (the current Python), with its folder as working directory, so a
crash or a hang in a learner's cell cannot take the grader down. The checks the notebook calls
(``check_<name>(...)`` in its code cells) report their results to a temporary file through
``$COURSE_GRADE_REPORT``; a check that never reports (an earlier cell raised, a cell timed out,
the kernel died) counts as failed, with the reason.

Exit status: 0 for a completed run, unless
  --require-full           anything short of full points (a check that "needs a GPU" is fine), or
  --expect-none-attempted  anything other than "not attempted" / "needs a GPU" (i.e. stubs that pass),
then 1. CI runs ``python -m course_lib.grade solutions/ --require-full`` and
``python -m course_lib.grade exercises/ --expect-none-attempted``.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

FAILED, PASSED, NOT_ATTEMPTED, NEEDS_GPU = "failed", "passed", "not attempted", "needs a GPU"
_CHECK_CALL = re.compile(r"(?<![\w.])check_(\w+)\s*\(")
_GRADING_DIR = Path(__file__).resolve().parent / "grading"
_REPO_EXERCISES = Path(__file__).resolve().parents[1] / "exercises"


@dataclass
class Row:
    """One check of one notebook, as shown in the score table."""

    notebook: str
    name: str
    status: str
    points: float
    max_points: float | None  # None: the check never reported and its Checker was not found
    message: str = ""


@dataclass
class NotebookGrade:
    notebook: str
    rows: list[Row] = field(default_factory=list)

    @property
    def points(self) -> float:
        return sum(r.points for r in self.rows)

    @property
    def max_points(self) -> float:
        return sum(r.max_points or 0 for r in self.rows)


def expected_checks(nb) -> list[tuple[str, int]]:
    """(check name, cell index) of every ``check_<name>(`` call in the notebook's code cells, in order."""
    found: dict[str, int] = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            code = line.split("#", 1)[0]
            if re.match(r"\s*(def|class|import|from)\s", code):
                continue
            for name in _CHECK_CALL.findall(code):
                found.setdefault(name, index)
    return list(found.items())


def declared_points(folders: list[Path]) -> dict[str, float]:
    """Points of every ``Checker("name", points=N)`` in the .py files of the given folders.

    Used only for checks that never reported (their notebook stopped before them), so that the
    total still counts their points.
    """
    points: dict[str, float] = {}
    for path in (p for folder in folders for p in sorted(folder.glob("*.py"))):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            func = getattr(node, "func", None)
            if not isinstance(node, ast.Call) or getattr(func, "id", getattr(func, "attr", None)) != "Checker":
                continue
            args = [a.value for a in node.args if isinstance(a, ast.Constant)]
            kw = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
            if args and isinstance(args[0], str):
                points[args[0]] = kw.get("points", args[1] if len(args) > 1 else 1)
    return points


def _kernel_config(tmp: Path):
    """A traitlets config whose only kernel, "python3", is this very interpreter (sys.executable)."""
    from traitlets.config import Config

    spec_dir = tmp / "kernels" / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (course grader)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return Config({"KernelSpecManager": {"kernel_dirs": [str(tmp / "kernels")], "ensure_native_kernel": False}})


def _cell_error(cell) -> str | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename')}: {out.get('evalue')}"
    return None


def grade_notebook(path: Path, timeout: float = 120, label: str | None = None) -> NotebookGrade:
    """Run one notebook in a fresh kernel and return its graded checks."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    label = label or str(path)
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as err:  # not JSON, not a notebook
        return NotebookGrade(label, [Row(label, "(notebook)", FAILED, 0, None, f"could not read the notebook: {err}")])
    expected = expected_checks(nb)
    current = {"index": 0}
    stopped: str | None = None  # why the run stopped early, if it did
    with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
        report = Path(tmp) / "report.jsonl"
        env = {**os.environ, "COURSE_GRADE_REPORT": str(report), "COURSE_GRADE_NOTEBOOK": label, "PYTHONUNBUFFERED": "1"}
        client = NotebookClient(
            nb, timeout=timeout, allow_errors=True, interrupt_on_timeout=False, kernel_name="python3",
            shutdown_kernel="immediate", config=_kernel_config(Path(tmp)),
            resources={"metadata": {"path": str(path.parent.resolve())}},
            on_cell_start=lambda cell, cell_index: current.update(index=cell_index),
        )
        try:
            try:
                client.execute(env=env)
            except RuntimeError as err:
                if "before replying" not in str(err):
                    raise
                # the kernel died while starting (two kernels launched at once can race for the same ports):
                # no cell ran yet, so start it once more
                client.execute(env=env)
        except CellTimeoutError:
            stopped = f"cell {current['index'] + 1} timed out after {timeout:g} s"
        except DeadKernelError:
            stopped = f"the kernel died in cell {current['index'] + 1}"
        except Exception as err:  # the kernel did not start, the notebook is malformed, ...
            stopped = f"the notebook could not run ({type(err).__name__}: {err})"
        reports = []
        for line in report.read_text(encoding="utf-8").splitlines() if report.exists() else []:
            try:
                reports.append(json.loads(line))
            except json.JSONDecodeError:  # a learner's code wrote to the report file: ignore the garbage
                pass

    by_name = {r["name"]: r for r in reports}  # a check called twice: its last result counts
    points = declared_points([_GRADING_DIR, path.parent, path.parent.parent]) if len(by_name) < len(expected) else {}
    grade = NotebookGrade(label)
    for name, index in expected:
        if name in by_name:
            r = by_name.pop(name)
            grade.rows.append(Row(label, name, r["status"], r["points"], r["max_points"], r.get("message", "")))
        else:
            previous = max((i for _, i in expected if i < index), default=-1)  # the check cell before this one
            status, why = _why_not_run(nb, index, previous, stopped, current["index"])
            grade.rows.append(Row(label, name, status, 0, points.get(name), why))
    for r in by_name.values():  # reported but not found by the scan (e.g. called through a helper)
        grade.rows.append(Row(label, r["name"], r["status"], r["points"], r["max_points"], r.get("message", "")))
    return grade


def _why_not_run(nb, index: int, previous_index: int, stopped: str | None, stop_index: int) -> tuple[str, str]:
    """Status and reason for a check (called in cell ``index``) that never reported."""
    if stopped and index >= stop_index:
        return FAILED, f"did not run: {stopped}"
    errors = [(i, e) for i, cell in enumerate(nb.cells[: index + 1]) if (e := _cell_error(cell))]
    recent = [(i, e) for i, e in errors if i > previous_index]
    if recent and recent[0][1].startswith("NotImplementedError"):  # a top-level stub right before its check
        return NOT_ATTEMPTED, f"cell {recent[0][0] + 1} still raises {recent[0][1]}"
    if errors:
        i, e = recent[0] if recent else errors[-1]
        return FAILED, f"did not run: cell {i + 1} raised {e}"
    return FAILED, "did not run: the check never reported a result"


def find_notebooks(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.glob("*.ipynb") if not q.name.startswith("."))
        elif p.suffix == ".ipynb" and p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: not a notebook or a folder")
    return found


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:g}"


def score_table(grades: list[NotebookGrade]) -> str:
    """The human-readable table: one row per check, a total per notebook, then the overall score."""
    header = ("notebook", "exercise", "status", "points", "note")
    rows: list[tuple[str, ...]] = []
    for g in grades:
        for r in g.rows:
            note = "" if r.status == PASSED else r.message.splitlines()[0] if r.message else ""
            rows.append((r.notebook, r.name, r.status, f"{_fmt(r.points)}/{_fmt(r.max_points)}", note[:70]))
        rows.append((g.notebook, "total", "", f"{_fmt(g.points)}/{_fmt(g.max_points)}", ""))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    out = [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    s = summary(grades)
    out.append(f"\nscore: {s['points']:g}/{s['max_points']:g} points ({s['percent']:.0f}%)")
    if s["gpu_points"]:
        rest = s["max_points"] - s["gpu_points"]
        out.append(f"{s['gpu_points']:g} point(s) need a GPU; without them: {s['points']:g}/{rest:g} "
                   f"({100 * s['points'] / rest if rest else 100:.0f}%). Run those checks on a GPU machine for their points.")
    return "\n".join(out)


def summary(grades: list[NotebookGrade]) -> dict:
    got, total = sum(g.points for g in grades), sum(g.max_points for g in grades)
    gpu = sum(r.max_points or 0 for g in grades for r in g.rows if r.status == NEEDS_GPU)
    return {"points": got, "max_points": total, "percent": 100 * got / total if total else 100.0, "gpu_points": gpu,
            "notebooks": [{"notebook": g.notebook, "points": g.points, "max_points": g.max_points,
                           "checks": [asdict(r) for r in g.rows]} for g in grades]}


def exit_code(grades: list[NotebookGrade], require_full: bool = False, expect_none_attempted: bool = False) -> int:
    statuses = [r.status for g in grades for r in g.rows]
    if require_full and any(s not in (PASSED, NEEDS_GPU) for s in statuses):
        return 1
    if expect_none_attempted and any(s not in (NOT_ATTEMPTED, NEEDS_GPU) for s in statuses):
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", metavar="PATH", help="notebooks or folders (default: exercises/)")
    parser.add_argument("--json", action="store_true", help="print a machine-readable summary instead of the table")
    parser.add_argument("--timeout", type=float, default=120, metavar="SECONDS", help="per-cell time limit (default 120)")
    parser.add_argument("--require-full", action="store_true", help="exit 1 unless every check passed (or needs a GPU)")
    parser.add_argument("--expect-none-attempted", action="store_true", help="exit 1 unless every check is a stub (or needs a GPU)")
    args = parser.parse_args(argv)
    if not args.paths:  # exercises/ of the current folder, else of the course this module belongs to
        args.paths = [next((str(p) for p in (Path("exercises"), _REPO_EXERCISES) if p.is_dir()), "exercises")]
    try:
        notebooks = find_notebooks(args.paths)
    except FileNotFoundError as err:
        parser.error(str(err))
    if not notebooks:
        print(f"no notebooks found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    grades = []
    for nb in notebooks:
        if not args.json:
            print(f"grading {nb} ...", file=sys.stderr, flush=True)
        grades.append(grade_notebook(nb, timeout=args.timeout))
    print(json.dumps(summary(grades), indent=2) if args.json else score_table(grades))
    return exit_code(grades, args.require_full, args.expect_none_attempted)


if __name__ == "__main__":
    sys.exit(main())
