"""Grade exercise notebooks: ``python -m course_lib.grade [PATH ...] [--json] [--timeout S] [--deadline S]`` (this
module; ``course_lib/grade.py`` starts it).

PATH is a notebook or a folder of notebooks (default: ``exercises/``). For each notebook the grader

1. looks its checks up in the manifest (``course_lib/grading/manifest.json``: names, arguments, points), by the
   notebook's file name (``01_kv_cache.ipynb``, also ``01_kv_cache-Copy1.ipynb``);
2. runs the notebook's cells in a fresh Jupyter kernel (this Python, the notebook's folder as working
   directory), except the cells that only call checks; a cell that runs past ``--timeout`` is interrupted, a
   cell that kills the kernel is skipped after a restart (the cells before it run again), so one broken cell
   costs only what depends on it;
3. runs every check of the manifest **in the grader's own process**, handing it references to the objects the
   notebook defined (``course_lib.grading.remote``): the learner's code runs in the kernel, only the values it
   returns come back, and the verdict is computed here.

Threat model. Defended: accidents (a crash, a hang, an endless print, a fork left running, a kernel that dies) and
the cheats a learner tried on the earlier grader: printing or appending "passed" to a report, replacing the
``Checker`` or its methods in the notebook, defining one's own ``check_*``, deleting check cells (a missing check
fails at full points), reporting extra checks or points (only the manifest's count), planting a ``.py`` beside the
notebook, writing fake JSON to the grader's output (the kernel's stdout and stderr go to /dev/null), rewriting the
course's grading code on disk (the grader imports its checks before any notebook runs, and reports files that
differ from git's HEAD: the run is then "unverified" and ``--require-full`` fails). Not defended: a determined
attacker running as the same OS user, who can edit the installed libraries and commit the change, patch this
process's memory, or write an exercise that calls the course's own reference implementation; a function written
to forge the instruments a check hands it (the recorded decode loop of lesson 01, say) fools only those
instruments. Only a container that runs the notebook as another user stops such an attacker.

Limits: ``--timeout`` per cell and per remote call (default 120 s), ``--deadline`` for the whole notebook (cells
and checks, default 1200 s); both must be positive and finite. The kernel's process group is killed at the end.

Exit status: 0 for a completed run, unless
  --require-full           anything short of full points (a check that "needs a GPU" is fine) or an unverified run,
  --expect-none-attempted  anything other than "not attempted" / "needs a GPU" (i.e. stubs that pass),
then 1; 2 for a usage error. CI runs ``python -m course_lib.grade solutions/ --require-full`` and
``python -m course_lib.grade exercises/ --expect-none-attempted``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from course_lib.grading.manifest import Check, Manifest
from course_lib.grading.manifest import PATH as MANIFEST_PATH
from course_lib.grading.manifest import load as load_manifest
from course_lib.grading.notebook_run import NotebookRun

FAILED, PASSED, NOT_ATTEMPTED, NEEDS_GPU = "failed", "passed", "not attempted", "needs a GPU"
_REPO_EXERCISES = Path(__file__).resolve().parents[2] / "exercises"


@dataclass
class Row:
    """One check of one notebook, as shown in the score table."""

    notebook: str
    name: str
    status: str
    points: float
    max_points: float | None
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


def import_checks(manifest: Manifest) -> dict[str, object]:
    """Every check function of the manifest, imported now: before any notebook runs and could change them."""
    if str(manifest.folder) not in sys.path:
        sys.path.append(str(manifest.folder))  # a manifest's own check modules (the tests' toy checks)
    functions = {}
    for check in (c for checks in manifest.notebooks.values() for c in checks):
        module, _, name = check.check.partition(":")
        functions[check.check] = getattr(importlib.import_module(module), name)
    return functions


def grade_notebook(path: Path, manifest: Manifest, functions: dict, timeout: float = 120, deadline: float = 1200,
                   label: str | None = None) -> NotebookGrade:
    """Run one notebook in a fresh kernel, then grade each of its manifest's checks from this process."""
    import nbformat

    label = label or str(path)
    key = manifest.lesson_of(path)
    if key is None:
        known = ", ".join(sorted(manifest.notebooks))
        return NotebookGrade(label, [Row(label, "(notebook)", FAILED, 0, 0, f"not an exercise notebook of the course "
                                         f"(its name should start with one of: {known})")])
    checks = manifest.notebooks[key]
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as err:  # not JSON, not a notebook
        return NotebookGrade(label, [Row(label, c.name, FAILED, 0, c.points, f"could not read the notebook: {err}")
                                     for c in checks])
    grade = NotebookGrade(label)
    with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
        run = NotebookRun(nb, path, Path(tmp), timeout=timeout, deadline=deadline)
        try:
            run.execute()
            for check in checks:
                grade.rows.append(_grade_check(run, check, functions[check.check], label))
        finally:
            run.close()
    return grade


def _grade_check(run: NotebookRun, check: Check, function, label: str) -> Row:
    from course_lib.grading.core import quiet

    def row(status, message=""):
        return Row(label, check.name, status, check.points if status == PASSED else 0, check.points, message)

    problem = run.unavailable()
    if problem:
        return row(FAILED, f"did not run: {problem}")
    args = []
    for expression in check.args:
        try:
            args.append(run.session.eval(expression))
        except Exception as err:  # the name is missing: say why, from the cells' outcomes
            return row(*run.why_undefined(expression, check.check.partition(":")[2], err))
    try:
        with quiet():
            result = function(*args)
    except Exception as err:  # a check must never take the grader down
        result = None
        message = f"the check could not run: {type(err).__name__}: {err}"
    finally:
        run.after_check()
    if result is None or getattr(result, "status", None) not in (PASSED, FAILED, NOT_ATTEMPTED, NEEDS_GPU):
        return row(FAILED, message if result is None else "the check returned no result")
    if result.name != check.name:
        return row(FAILED, f"the check reported {result.name!r}, the manifest expects {check.name!r}")
    return row(result.status, result.message)


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


def score_table(grades: list[NotebookGrade], changed: list[str] | None = None) -> str:
    """The human-readable table: one row per check, a total per notebook, then the overall score."""
    header = ("notebook", "exercise", "status", "points", "note")
    rows: list[tuple[str, ...]] = []
    for g in grades:
        for r in g.rows:
            note = "" if r.status == PASSED else r.message.splitlines()[0] if r.message else ""
            rows.append((r.notebook, r.name, r.status, f"{_fmt(r.points)}/{_fmt(r.max_points)}", note[:70]))
        rows.append((g.notebook, "total", "", f"{_fmt(g.points)}/{_fmt(g.max_points)}", ""))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    out = [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    s = summary(grades, changed)
    out.append(f"\nscore: {s['points']:g}/{s['max_points']:g} points ({s['percent']:.0f}%)")
    if s["gpu_points"]:
        rest = s["max_points"] - s["gpu_points"]
        out.append(f"{s['gpu_points']:g} point(s) need a GPU; without them: {s['points']:g}/{rest:g} "
                   f"({100 * s['points'] / rest if rest else 0:.0f}%). "
                   "Run those checks on a GPU machine for their points.")
    if changed:
        out.append(f"\nUNVERIFIED: the course's code differs from the committed version ({', '.join(changed[:5])}"
                   f"{' ...' if len(changed) > 5 else ''}); restore it with `git checkout -- course_lib kernels` "
                   "(and remove files you added there) for a score that counts.")
    return "\n".join(out)


def summary(grades: list[NotebookGrade], changed: list[str] | None = None) -> dict:
    got, total = sum(g.points for g in grades), sum(g.max_points for g in grades)
    gpu = sum(r.max_points or 0 for g in grades for r in g.rows if r.status == NEEDS_GPU)
    return {"points": got, "max_points": total, "percent": 100 * got / total if total else 0.0, "gpu_points": gpu,
            "verified": not changed, "changed_files": changed or [],
            "notebooks": [{"notebook": g.notebook, "points": g.points, "max_points": g.max_points,
                           "checks": [asdict(r) for r in g.rows]} for g in grades]}


def exit_code(grades: list[NotebookGrade], require_full: bool = False, expect_none_attempted: bool = False,
              verified: bool = True) -> int:
    statuses = [r.status for g in grades for r in g.rows]
    if require_full and (not verified or not statuses or any(s not in (PASSED, NEEDS_GPU) for s in statuses)):
        return 1
    if expect_none_attempted and (not statuses or any(s not in (NOT_ATTEMPTED, NEEDS_GPU) for s in statuses)):
        return 1
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive, finite number of seconds")
    return value


def main(argv: list[str] | None = None) -> int:
    from course_lib.grading.integrity import changed_files

    parser = argparse.ArgumentParser(prog="python -m course_lib.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", metavar="PATH", help="notebooks or folders (default: exercises/)")
    parser.add_argument("--json", action="store_true", help="print a machine-readable summary instead of the table")
    parser.add_argument("--timeout", type=_seconds, default=120, metavar="SECONDS",
                        help="time limit per cell and per call of your code (default 120)")
    parser.add_argument("--deadline", type=_seconds, default=1200, metavar="SECONDS",
                        help="time limit per notebook, cells and checks together (default 1200)")
    parser.add_argument("--manifest", type=Path, default=MANIFEST_PATH, help=argparse.SUPPRESS)  # the tests' toy lesson
    parser.add_argument("--require-full", action="store_true", help="exit 1 unless every check passed (or needs a GPU)")
    parser.add_argument("--expect-none-attempted", action="store_true",
                        help="exit 1 unless every check is a stub (or needs a GPU)")
    args = parser.parse_args(argv)
    if not args.paths:  # exercises/ of the current folder, else of the course this module belongs to
        args.paths = [next((str(p) for p in (Path("exercises"), _REPO_EXERCISES) if p.is_dir()), "exercises")]
    try:
        notebooks = find_notebooks(args.paths)
        manifest = load_manifest(args.manifest)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if not notebooks:
        print(f"no notebooks found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    functions = import_checks(manifest)
    changed = changed_files()
    if changed is None and not args.json:
        print("note: not a git checkout, so the grader cannot verify that the course's code is unchanged",
              file=sys.stderr)
    grades = []
    for nb in notebooks:
        if not args.json:
            print(f"grading {nb} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        grades.append(grade_notebook(nb, manifest, functions, timeout=args.timeout, deadline=args.deadline))
        if not args.json:
            print(f"  {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps(summary(grades, changed), indent=2) if args.json else score_table(grades, changed))
    return exit_code(grades, args.require_full, args.expect_none_attempted, verified=not changed)


if __name__ == "__main__":
    sys.exit(main())
