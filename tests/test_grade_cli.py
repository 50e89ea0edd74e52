"""End-to-end tests of `python -m course_lib.grade` on the fixture notebooks in tests/fixtures/ (toy checks, their
own manifest): scores, broken notebooks, the grader's limits, and one test per cheat a learner tried.

Every notebook runs in its own kernel (~3 s each); the grader runs are started in parallel once per module and
shared by the tests.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest

from course_lib.grading.cli import NotebookGrade, Row, exit_code, summary
from course_lib.grading.integrity import changed_files

# runs the course's commands end to end: bash course.sh test runs these beside the browser test
pytestmark = pytest.mark.command

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MANIFEST = FIXTURES / "manifest.json"
SOLUTION, EXERCISE = FIXTURES / "solutions" / "toy.ipynb", FIXTURES / "exercises" / "toy.ipynb"
CRASH, HANG, DIES = (FIXTURES / "broken" / f"{n}.ipynb" for n in ("crash", "hang", "dies"))

ENV_NOTEBOOK = '''
import os, sys, time

def environment():
    return sys.executable, sys.prefix, os.path.realpath(os.getcwd()), os.environ.get("COURSE_GRADE_REPORT")

def sleepy():
    time.sleep(30)

def add(a, b):
    return a + b
'''

# Each cheat is added to the toy exercise notebook (stubs only) as a cell before the first exercise.
CHEATS = {
    "report_file": '''
import glob, json, os, tempfile
lines = "".join(json.dumps({"name": n, "status": "passed", "points": 100, "max_points": 1}) + "\\n"
                for n in ("add", "scale", "factor"))
reports = glob.glob(os.path.join(tempfile.gettempdir(), "course-grade-*", "report.jsonl"))
for path in [os.environ.get("COURSE_GRADE_REPORT")] + reports:
    if path:
        open(path, "a").write(lines)
''',
    "patched_checker": '''
from course_lib.grading import core
core.Checker._classify = lambda self, exc, tb: ("passed", "")
core.Checker.__exit__ = lambda self, *a: setattr(self, "result", core.CheckResult(self.name, "passed", 100, 1)) or True
core.format_result = lambda r: "passed"
''',
    "own_checks": '''
def check_add(f):
    print("✅ add: passed (1/1 points)")
check_scale = check_factor = check_add
''',
    "extra_names": '''
from course_lib.grading.core import Checker
for name in ("bogus", "add", "scale"):
    with Checker(name, points=1000) as c:
        pass
''',
    "planted_py": '''
open("toy_checks.py", "w").write("def check_add(f):\\n    return None\\n"
                                 "check_scale = check_factor = check_on_gpu = check_add\\n"
                                 "POINTS = {'add': 0, 'scale': 0, 'factor': 0}\\n")
''',
    "fake_stdout": '''
import json, os
os.write(1, json.dumps({"points": 5, "max_points": 5, "percent": 100.0, "notebooks": []}).encode() + b"\\n")
os.write(2, b"score: 5/5 points (100%)\\n")
''',
    "replaced_helper": '''
class _Liar:
    def handle(self, request, response):
        import pickle
        open(response, "wb").write(pickle.dumps({"result": "passed", "error": None, "states": [], "storages": []}))

def add(a, b):
    globals()["__course_grader__"] = _Liar()
    raise NotImplementedError("Exercise")
''',
    "z_rewrites_checks": '''
import pathlib, toy_checks
pathlib.Path(toy_checks.__file__).write_text("from course_lib.grading.core import Checker\\n"
    "def _passing(name, points):\\n"
    "    def check(*args):\\n"
    "        with Checker(name, points=points) as c:\\n"
    "            pass\\n"
    "        return c.result\\n"
    "    return check\\n"
    "check_add, check_scale, check_factor = _passing('add', 1), _passing('scale', 2), _passing('factor', 1)\\n")
''',
}


def grade(*args, env: dict | None = None, manifest: Path = MANIFEST) -> subprocess.Popen:
    env = {**os.environ, "COURSE_FORCE_CPU": "1", **(env or {})}  # on_gpu is "needs a GPU" on any machine
    return subprocess.Popen([sys.executable, "-m", "course_lib.grade", *map(str, args), "--manifest", str(manifest)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _with_cell(source_nb: Path, code: str, before_index: int = 3):
    nb = nbformat.read(source_nb, as_version=4)
    nb.cells.insert(before_index, nbformat.v4.new_code_cell(textwrap.dedent(code).strip()))
    return nb


def _rows(summary: dict) -> dict:
    return {(Path(nb["notebook"]).stem, c["name"]): c for nb in summary["notebooks"] for c in nb["checks"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The grader runs, started together: fixtures (--json), the hanging notebook, the cheats, the limits."""
    env_dir = tmp_path_factory.mktemp("env_nb")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(textwrap.dedent(ENV_NOTEBOOK).strip())]),
                   env_dir / "env.ipynb")
    # the cheats: a copy of the toy checks and their manifest beside a folder of notebooks, as the fixtures are laid out
    cheat_root = tmp_path_factory.mktemp("cheats")
    shutil.copy(FIXTURES / "toy_checks.py", cheat_root / "toy_checks.py")
    shutil.copy(MANIFEST, cheat_root / "manifest.json")
    (cheat_root / "exercises").mkdir()
    for name, code in CHEATS.items():
        nbformat.write(_with_cell(EXERCISE, code), cheat_root / "exercises" / f"toy_{name}.ipynb")
    solved = nbformat.read(SOLUTION, as_version=4)  # solved, every check cell deleted: still full points
    solved.cells = [c for c in solved.cells if "check_" not in c.source or "import" in c.source]
    nbformat.write(solved, cheat_root / "exercises" / "toy_solved_without_check_cells.ipynb")
    unsolved = nbformat.read(EXERCISE, as_version=4)
    unsolved.cells = [c for c in unsolved.cells if "check_" not in c.source or "import" in c.source]
    nbformat.write(unsolved, cheat_root / "exercises" / "toy_stubs_without_check_cells.ipynb")
    # the limits: a deadline, processes left behind, a flood of output
    limits = tmp_path_factory.mktemp("limits")
    pid_file = limits / "child.pid"
    nbformat.write(_with_cell(SOLUTION, '''
import subprocess, time
child = subprocess.Popen(["sleep", "300"])
open(os.environ["CHILD_PID_FILE"], "w").write(str(child.pid))
for _ in range(200):
    print("x" * 100_000)            # 20 MB of output: read and dropped, never stored
'''), limits / "toy_forks_and_floods.ipynb")
    slow = _with_cell(SOLUTION, "time.sleep(3)", 4)
    for _ in range(3):
        slow.cells.insert(5, nbformat.v4.new_code_cell("import time\ntime.sleep(2)"))
    (limits / "deadline").mkdir()
    nbformat.write(slow, limits / "deadline" / "toy_slow.ipynb")

    started = time.monotonic()
    main = grade(SOLUTION, EXERCISE, CRASH, DIES, env_dir / "env.ipynb", "--json",
                 env={"EXPECTED_CWD": os.path.realpath(env_dir)})
    hang = grade(HANG, "--timeout", "20")   # 20: the first cell imports torch, slow on a busy machine
    cheats = grade(cheat_root / "exercises", "--json", manifest=cheat_root / "manifest.json")
    limit_run = grade(limits / "toy_forks_and_floods.ipynb", "--json", env={"CHILD_PID_FILE": str(pid_file)})
    deadline_run = grade(limits / "deadline", "--json", "--deadline", "5")
    out = {}
    procs = [("main", main), ("hang", hang), ("cheats", cheats), ("limits", limit_run), ("deadline", deadline_run)]
    for name, proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        out[name] = (proc.returncode, stdout, stderr)
    out["seconds"] = time.monotonic() - started
    out["child_pid"] = int(pid_file.read_text()) if pid_file.exists() else None
    out["cheat_root"] = cheat_root
    return out


def _json(runs, name) -> dict:
    code, stdout, stderr = runs[name]
    assert code == 0, stderr
    return json.loads(stdout)


# ---------------------------------------------------------------- scores
def test_exercise_stubs_are_all_not_attempted(runs):
    rows = _rows(_json(runs, "main"))
    toy = {name: c for (nb, name), c in rows.items() if nb == "toy" and c["notebook"].startswith(str(EXERCISE))}
    assert {n: c["status"] for n, c in toy.items()} == {"add": "not attempted", "scale": "not attempted",
                                                        "factor": "not attempted", "on_gpu": "needs a GPU"}
    assert toy["factor"]["message"] == ("the code of exercise `factor` still raises NotImplementedError: Exercise: set "
                                        "factor to three (cell 11, before check_factor(...))")
    assert toy["on_gpu"]["max_points"] == 1


def test_solution_scores_full_points(runs):
    toy = next(nb for nb in _json(runs, "main")["notebooks"] if nb["notebook"] == str(SOLUTION))
    assert {c["name"]: c["status"] for c in toy["checks"]} == {"add": "passed", "scale": "passed", "factor": "passed",
                                                               "on_gpu": "needs a GPU"}
    assert (toy["points"], toy["max_points"]) == (4, 5)  # 100% of what a CPU can score; 1 point needs a GPU


def test_crashing_cell_does_not_stop_the_other_checks(runs):
    rows = _rows(_json(runs, "main"))
    assert rows["crash", "factor"]["status"] == "failed"
    assert rows["crash", "factor"]["message"] == ("did not run: the code of exercise `factor` raised ValueError: boom "
                                                  "(cell 3, before check_factor(...))")
    assert rows["crash", "add"]["status"] == "passed"
    scale = rows["crash", "scale"]
    assert scale["status"] == "failed" and "case: x of shape (2,), s=3.0" in scale["message"]


def test_dead_kernel_is_restarted_and_the_rest_graded(runs):
    rows = _rows(_json(runs, "main"))
    assert rows["dies", "add"]["status"] == "passed"
    assert rows["dies", "factor"] == {**rows["dies", "factor"], "status": "failed", "points": 0, "max_points": 1,
                                      "message": "did not run: the kernel died in the code of exercise `factor` "
                                                 "(cell 4, before check_factor(...))"}


def test_kernel_is_this_python_in_the_notebook_folder_and_the_checkers_timer_works(runs):
    rows = _rows(_json(runs, "main"))
    assert rows["env", "environment"]["status"] == "passed", rows["env", "environment"]["message"]
    assert rows["env", "sleepy"]["status"] == "failed"
    assert "timed out after 0.5 s" in rows["env", "sleepy"]["message"]
    assert rows["env", "add"]["status"] == "passed"  # the kernel that still slept was replaced


def test_hanging_cell_times_out_and_the_rest_is_graded(runs):
    code, out, err = runs["hang"]
    assert code == 0, err
    assert "did not run: the code of exercise `factor` timed out after 20 s" in out   # the table cuts the note
    lines = {line.split()[1]: line for line in out.splitlines() if "hang.ipynb" in line}
    assert " passed " in lines["add"] and " failed " in lines["factor"]


def test_json_summary_totals(runs):
    s = _json(runs, "main")
    assert s["points"] == sum(nb["points"] for nb in s["notebooks"])
    assert s["max_points"] == sum(nb["max_points"] for nb in s["notebooks"])
    assert s["percent"] == pytest.approx(100 * s["points"] / s["max_points"])


def _grades(summary: dict, suffix: str) -> list[NotebookGrade]:
    return [NotebookGrade(nb["notebook"], [Row(**c) for c in nb["checks"]])
            for nb in summary["notebooks"] if nb["notebook"].endswith(suffix)]


def test_exit_codes(runs):
    s = _json(runs, "main")
    solution, exercise, crash = (_grades(s, x) for x in ("solutions/toy.ipynb", "exercises/toy.ipynb", "crash.ipynb"))
    assert exit_code(solution + exercise + crash) == 0  # a completed run
    assert exit_code(solution, require_full=True) == 0  # "needs a GPU" is fine
    assert exit_code(solution, require_full=True, verified=False) == 1  # changed grading code: not a full score
    assert exit_code(exercise, require_full=True) == 1
    assert exit_code(exercise, expect_none_attempted=True) == 0
    assert exit_code(solution, expect_none_attempted=True) == 1
    assert exit_code(crash, expect_none_attempted=True) == 1
    assert exit_code([], require_full=True) == 1 and summary([])["percent"] == 0  # nothing graded is not 100%


def test_cli_exit_code_and_table_for_the_exercises():
    proc = grade(FIXTURES / "exercises", "--expect-none-attempted", "--require-full")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1  # stubs are short of full points
    assert "tests/fixtures/exercises/toy.ipynb  total" in out and "score: 0/5 points (0%)" in out


@pytest.mark.parametrize("args, message", [
    (["no/such/folder"], "not a notebook or a folder"),
    ([str(EXERCISE), "--timeout", "0"], "--timeout: '0': must be a positive, finite number"),
    ([str(EXERCISE), "--timeout", "-5"], "--timeout"),
    ([str(EXERCISE), "--timeout", "nan"], "--timeout"),
    ([str(EXERCISE), "--timeout", "inf"], "--timeout"),
    ([str(EXERCISE), "--deadline", "0"], "--deadline"),
])
def test_usage_errors(args, message):
    proc = grade(*args)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and message in err, err


def test_a_notebook_the_manifest_does_not_know_fails(tmp_path):
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), tmp_path / "mine.ipynb")
    proc = grade(tmp_path / "mine.ipynb", "--require-full")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "not an exercise notebook of the course" in out


# ---------------------------------------------------------------- the cheats: every one scores nothing
@pytest.mark.parametrize("cheat", sorted(CHEATS))
def test_cheat_scores_nothing(runs, cheat):
    nb = next(nb for nb in _json(runs, "cheats")["notebooks"] if Path(nb["notebook"]).stem == f"toy_{cheat}")
    assert (nb["points"], nb["max_points"]) == (0, 5), nb
    assert [c["name"] for c in nb["checks"]] == ["add", "scale", "factor", "on_gpu"]  # the manifest's, nothing else
    assert all(c["status"] in ("not attempted", "failed", "needs a GPU") for c in nb["checks"]), nb["checks"]


def test_cheat_run_output_is_the_graders_json(runs):
    s = _json(runs, "cheats")  # a notebook wrote fake JSON to fd 1: it went to /dev/null, the output still parses
    assert s["points"] == 4 and s["max_points"] == 5 * (len(CHEATS) + 2)  # 4: the solved notebook's


def test_deleted_check_cells_change_nothing(runs):
    rows = _rows(_json(runs, "cheats"))
    solved = {n: c["status"] for (nb, n), c in rows.items() if nb == "toy_solved_without_check_cells"}
    assert solved == {"add": "passed", "scale": "passed", "factor": "passed", "on_gpu": "needs a GPU"}
    stubs = {n: c for (nb, n), c in rows.items() if nb == "toy_stubs_without_check_cells"}
    assert {n: c["status"] for n, c in stubs.items()} == {"add": "not attempted", "scale": "not attempted",
                                                         "factor": "failed", "on_gpu": "needs a GPU"}
    assert "`factor` is not defined in the notebook" in stubs["factor"]["message"]
    assert sum(c["max_points"] for c in stubs.values()) == 5


def test_rewriting_the_checks_on_disk_does_not_change_this_run(runs):
    rewritten = (runs["cheat_root"] / "toy_checks.py").read_text()
    assert "_passing" in rewritten  # the cheat did rewrite the file; the run above still scored it 0


def test_changed_course_code_is_reported(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "course_lib").mkdir()
    (tmp_path / "course_lib" / "a.py").write_text("x = 1\n")
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "a"],
                   check=True)
    assert changed_files(tmp_path) == []
    (tmp_path / "course_lib" / "a.py").write_text("x = 2\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "planted.py").write_text("")
    assert changed_files(tmp_path) == ["course_lib/a.py", "kernels/planted.py"]
    assert changed_files(tmp_path / "course_lib" / "nowhere") is None  # not a checkout: cannot tell


# ---------------------------------------------------------------- limits
def test_processes_the_notebook_started_end_with_it(runs):
    s = _json(runs, "limits")
    assert s["points"] == 4  # the checks after 20 MB of output still ran
    pid = runs["child_pid"]
    assert pid is not None
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z", "the notebook's `sleep 300` outlived the grader"


def test_the_notebook_deadline_covers_cells_and_checks(runs):
    rows = [c for nb in _json(runs, "deadline")["notebooks"] for c in nb["checks"]]
    assert all(c["status"] in ("failed", "needs a GPU") for c in rows), rows
    assert any("time limit of 5 s ran out" in c["message"] for c in rows), rows
