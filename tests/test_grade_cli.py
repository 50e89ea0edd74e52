"""End-to-end tests of `python -m course_lib.grade` on the fixture notebooks in tests/fixtures/.

Every notebook runs in its own kernel (~2-3 s each); the two slow runs are started in parallel once
per module and shared by the tests.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from course_lib.grade import NotebookGrade, Row, exit_code, expected_checks

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SOLUTION, EXERCISE = FIXTURES / "solutions" / "toy.ipynb", FIXTURES / "exercises" / "toy.ipynb"
CRASH, HANG, DIES = (FIXTURES / "broken" / f"{n}.ipynb" for n in ("crash", "hang", "dies"))

ENV_NOTEBOOK = '''
import os, sys, time
from course_lib.grading.core import Checker

def check_environment():
    with Checker("environment", points=1) as c:
        c.check_equal(sys.executable, os.environ["EXPECTED_PYTHON"], case="the kernel runs the grader's python")
        c.check_equal(sys.prefix, os.environ["EXPECTED_PREFIX"], case="the kernel runs in the grader's environment")
        c.check_equal(os.path.realpath(os.getcwd()), os.environ["EXPECTED_CWD"], case="cwd is the notebook's folder")
    return c.result

def check_kernel_timeout():
    with Checker("kernel_timeout", points=1, timeout_s=0.5) as c:  # SIGALRM works in the kernel's main thread
        time.sleep(30)
    return c.result

check_environment()
check_kernel_timeout()
'''


def grade(*args: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "COURSE_FORCE_CPU": "1", **(env or {})}  # on_gpu is "needs a GPU" on any machine
    return subprocess.Popen([sys.executable, "-m", "course_lib.grade", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One --json run over five notebooks and, in parallel, the hanging notebook with --timeout 5."""
    folder = tmp_path_factory.mktemp("env_nb")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(textwrap.dedent(ENV_NOTEBOOK).strip())])
    nbformat.write(nb, folder / "env.ipynb")
    expected = {"EXPECTED_PYTHON": sys.executable, "EXPECTED_PREFIX": sys.prefix, "EXPECTED_CWD": os.path.realpath(folder)}
    main = grade(SOLUTION, EXERCISE, CRASH, DIES, folder / "env.ipynb", "--json", env=expected)
    hang = grade(HANG, "--timeout", "5")
    out, err = main.communicate(timeout=120)
    assert main.returncode == 0, err
    hang_out, hang_err = hang.communicate(timeout=120)
    summary = json.loads(out)
    rows = {(Path(c["notebook"]).stem if "broken" in c["notebook"] or "env" in c["notebook"] else
             Path(c["notebook"]).parent.name, c["name"]): c
            for nb in summary["notebooks"] for c in nb["checks"]}
    return {"summary": summary, "rows": rows, "hang": (hang.returncode, hang_out, hang_err)}


def test_exercise_stubs_are_all_not_attempted(runs):
    rows = runs["rows"]
    assert {name: rows["exercises", name]["status"] for name in ("add", "scale", "factor", "on_gpu")} == dict.fromkeys(
        ("add", "scale", "factor", "on_gpu"), "not attempted")
    assert "cell 11 still raises NotImplementedError: Exercise: set factor to three" in rows["exercises", "factor"]["message"]
    assert rows["exercises", "on_gpu"]["max_points"] == 1  # known from toy_checks.py though it never ran


def test_solution_scores_full_points(runs):
    toy = next(nb for nb in runs["summary"]["notebooks"] if nb["notebook"].endswith("solutions/toy.ipynb"))
    statuses = {c["name"]: c["status"] for c in toy["checks"]}
    assert statuses == {"add": "passed", "scale": "passed", "factor": "passed", "on_gpu": "needs a GPU"}
    assert (toy["points"], toy["max_points"]) == (4, 5)  # 100% of what a CPU can score; 1 point needs a GPU


def test_crashing_cell_does_not_stop_the_other_checks(runs):
    rows = runs["rows"]
    assert rows["crash", "factor"]["status"] == "failed"
    assert rows["crash", "factor"]["message"] == "did not run: cell 3 raised ValueError: boom"
    assert rows["crash", "add"]["status"] == "passed"
    scale = rows["crash", "scale"]
    assert scale["status"] == "failed" and "case: x of shape (2,), s=3.0" in scale["message"]


def test_dead_kernel_is_handled(runs):
    rows = runs["rows"]
    assert rows["dies", "add"]["status"] == "passed"
    assert rows["dies", "factor"] == {**rows["dies", "factor"], "status": "failed", "points": 0, "max_points": 1,
                                      "message": "did not run: the kernel died in cell 4"}


def test_kernel_is_this_python_in_the_notebook_folder_and_checker_timeouts_work(runs):
    rows = runs["rows"]
    assert rows["env", "environment"]["status"] == "passed", rows["env", "environment"]["message"]
    assert rows["env", "kernel_timeout"]["status"] == "failed"
    assert "timed out after 0.5 s" in rows["env", "kernel_timeout"]["message"]


def test_hanging_cell_times_out_and_marks_the_rest(runs):
    code, out, err = runs["hang"]
    assert code == 0, err
    assert "did not run: cell 4 timed out after 5 s" in out
    lines = {line.split()[1]: line for line in out.splitlines() if "hang.ipynb" in line}
    assert " passed " in lines["add"] and " failed " in lines["factor"]
    assert "score: 1/2 points (50%)" in out


def test_json_summary_totals(runs):
    s = runs["summary"]
    assert s["points"] == sum(nb["points"] for nb in s["notebooks"])
    assert s["max_points"] == sum(nb["max_points"] for nb in s["notebooks"])
    assert s["gpu_points"] == 1 and s["percent"] == pytest.approx(100 * s["points"] / s["max_points"])


def _grades(summary: dict, suffix: str) -> list[NotebookGrade]:
    return [NotebookGrade(nb["notebook"], [Row(**c) for c in nb["checks"]])
            for nb in summary["notebooks"] if nb["notebook"].endswith(suffix)]


def test_exit_codes(runs):
    solution, exercise = _grades(runs["summary"], "solutions/toy.ipynb"), _grades(runs["summary"], "exercises/toy.ipynb")
    crash = _grades(runs["summary"], "crash.ipynb")
    assert exit_code(solution + exercise + crash) == 0  # a completed run
    assert exit_code(solution, require_full=True) == 0  # "needs a GPU" is fine
    assert exit_code(exercise, require_full=True) == 1
    assert exit_code(exercise, expect_none_attempted=True) == 0
    assert exit_code(solution, expect_none_attempted=True) == 1
    assert exit_code(crash, expect_none_attempted=True) == 1


def test_cli_exit_code_and_table_for_the_exercises():
    proc = grade(FIXTURES / "exercises", "--expect-none-attempted", "--require-full")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1  # stubs are short of full points
    assert "tests/fixtures/exercises/toy.ipynb  total" in out and "score: 0/5 points (0%)" in out


def test_missing_path_is_an_error():
    proc = grade("no/such/folder")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "not a notebook or a folder" in err


def test_expected_checks_scan():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("from m import check_a, check_b\n# check_commented(x)\ndef check_local(x):\n    pass"),
        nbformat.v4.new_markdown_cell("check_markdown(x)"),
        nbformat.v4.new_code_cell("check_a(f)\nc.check_close(1, 1)\nr = check_b (g)  # check_c(h)"),
        nbformat.v4.new_code_cell("check_a(f)"),
    ])
    assert expected_checks(nb) == [("a", 2), ("b", 2)]
