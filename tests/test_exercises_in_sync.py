"""exercises/ is generated from solutions/ by tools/make_exercises.py, and must never drift from it."""
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from tools import make_exercises
from tools.make_exercises import MarkerError, make_exercise, render, strip_solutions

ROOT = Path(__file__).resolve().parents[1]

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "make_exercises.py"), "--check", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_committed_exercises_match_their_solutions():
    proc = run_check()
    assert proc.returncode == 0, f"exercises/ is out of date:\n{proc.stderr}"


def test_fixture_exercises_match_their_solutions():
    proc = run_check("--solutions", str(FIXTURES / "solutions"), "--exercises", str(FIXTURES / "exercises"))
    assert proc.returncode == 0, proc.stderr


def test_check_reports_missing_extra_and_different_files(tmp_path):
    sols, exs = tmp_path / "solutions", tmp_path / "exercises"
    sols.mkdir()
    exs.mkdir()
    for name in ("00_a.ipynb", "01_b.ipynb"):
        (sols / name).write_text((FIXTURES / "solutions" / "toy.ipynb").read_text())
    (exs / "01_b.ipynb").write_text("{}\n")
    (exs / "02_orphan.ipynb").write_text("{}\n")
    proc = run_check("--solutions", str(sols), "--exercises", str(exs))
    assert proc.returncode == 1
    assert "missing: " in proc.stderr and "00_a.ipynb" in proc.stderr
    assert "differs from its solution: " in proc.stderr and "01_b.ipynb" in proc.stderr
    assert "extra (no solution for it): " in proc.stderr and "02_orphan.ipynb" in proc.stderr
    assert (exs / "01_b.ipynb").read_text() == "{}\n"  # --check writes nothing
    assert make_exercises.main(["--solutions", str(sols), "--exercises", str(exs)]) == 0
    assert run_check("--solutions", str(sols), "--exercises", str(exs)).stderr.count("\n") == 2  # only the orphan left


def test_stub_keeps_indentation_and_message():
    source = textwrap.dedent("""\
        def f(x):
            y = x + 1
            if y > 0:
                # BEGIN SOLUTION clamp y at 10
                y = min(y, 10)
                # END SOLUTION
            # BEGIN SOLUTION
            return y
            # END SOLUTION""")
    assert strip_solutions(source) == textwrap.dedent("""\
        def f(x):
            y = x + 1
            if y > 0:
                raise NotImplementedError("Exercise: clamp y at 10")
            raise NotImplementedError("Exercise: write this part")""")


def test_whole_cell_region_and_quotes_in_message():
    source = '# BEGIN SOLUTION: set "factor" to three\nfactor = 3\n# END SOLUTION\n'
    assert strip_solutions(source) == 'raise NotImplementedError("Exercise: set \\"factor\\" to three")\n'
    assert strip_solutions("# BEGIN SOLUTION Exercise: do it\nx = 1\n# END SOLUTION") == \
        'raise NotImplementedError("Exercise: do it")'


def test_a_long_message_is_split_over_lines_and_reads_the_same():
    message = ("load the K and V blocks (masked), scores in log2 units, mask columns >= Skv, then the online-softmax "
               "update")
    source = f"def f():\n    if True:\n        # BEGIN SOLUTION {message}\n        pass\n        # END SOLUTION\n"
    stubbed = strip_solutions(source)
    assert max(len(line) for line in stubbed.splitlines()) <= make_exercises.STUB_WIDTH
    assert len(stubbed.splitlines()) > 3                          # the stub takes more than one line
    namespace = {}
    exec(stubbed, namespace)
    with pytest.raises(NotImplementedError) as err:
        namespace["f"]()
    assert str(err.value) == "Exercise: " + message


def test_code_without_markers_is_unchanged():
    source = "x = 1  # BEGIN SOLUTION is only a marker on its own line\nprint(x)\n"
    assert strip_solutions(source) == source


@pytest.mark.parametrize("source, line, problem", [
    ("a = 1\n# BEGIN SOLUTION\nb = 2", 2, "never closed"),
    ("a = 1\n# END SOLUTION", 2, "without a '# BEGIN SOLUTION'"),
    ("# BEGIN SOLUTION\n    # BEGIN SOLUTION\n# END SOLUTION", 2, "inside the region opened at line 1"),
])
def test_unbalanced_markers_name_file_cell_and_line(source, line, problem):
    with pytest.raises(MarkerError, match=f"solutions/x.ipynb, cell 3, line {line}: .*{problem}"):
        strip_solutions(source, "solutions/x.ipynb, cell 3")


def test_unbalanced_markers_fail_the_cli(tmp_path):
    (tmp_path / "solutions").mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("# BEGIN SOLUTION\ny = 2")])
    nbformat.write(nb, tmp_path / "solutions" / "05_bad.ipynb")
    proc = run_check("--solutions", str(tmp_path / "solutions"), "--exercises", str(tmp_path / "exercises"))
    assert proc.returncode == 2
    assert "05_bad.ipynb, cell 1, line 1: '# BEGIN SOLUTION' is never closed" in proc.stderr


def test_notebook_transformation():
    solution = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Title"),
        nbformat.v4.new_code_cell("def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION", execution_count=3,
                                  outputs=[nbformat.v4.new_output("stream", text="hi")], metadata={"scrolled": True}),
        nbformat.v4.new_markdown_cell("<!-- SOLUTION -->\nWhy the answer is 1."),
        nbformat.v4.new_code_cell("check_f(f)", metadata={"tags": ["graded"]}),
    ])
    solution.metadata["widgets"] = {"state": "noise"}
    ex = make_exercise(solution, "03_x.ipynb")
    assert [c.cell_type for c in ex.cells] == ["markdown", "markdown", "code", "code"]
    assert ex.cells[0].source.startswith("> Generated from `solutions/03_x.ipynb` by `tools/make_exercises.py`")
    assert ex.cells[2].source == 'def f():\n    raise NotImplementedError("Exercise: write this part")'
    assert ex.cells[2].outputs == [] and ex.cells[2].execution_count is None and ex.cells[2].metadata == {}
    assert ex.cells[3].metadata == {"tags": ["graded"]}
    assert set(ex.metadata) == {"kernelspec", "language_info"}
    nbformat.validate(ex)
    assert render(ex) == render(make_exercise(solution, "03_x.ipynb"))  # byte-for-byte reproducible
    assert render(ex).endswith("}\n") and not render(ex).endswith("\n\n")
