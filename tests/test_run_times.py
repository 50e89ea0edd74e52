"""The run times the README and the notebooks' intros quote come from one file, written by tools/run_times.py
(issue 23): the committed texts agree with it (the --check logic, no measuring), and the rendering does what it says
on a small fake file."""
from __future__ import annotations

import json

import nbformat
import pytest

from tools import run_times
from tools.run_times import intro, problems, quoted_times, readme_cell

RECORD = json.loads(run_times.REFERENCE.read_text()) if run_times.REFERENCE.exists() else None


def fake_record() -> dict:
    return dict(cores=2, runs={
        "carried": dict(measured_by_script=False, source="README column, 2026-12-06, unloaded", loaded=False),
        "2026-12-07T10:00:00+00:00": dict(measured_by_script=True, date="2026-12-07T10:00:00+00:00", loaded=True)},
        lessons={"00": dict(seconds=14.0, run="carried"), "01": dict(seconds=26.6, run="carried"),
                 "03": dict(seconds=9.4, run="2026-12-07T10:00:00+00:00", loaded=True)},
        exercises={"00": dict(seconds=7.4, grade_seconds=10.04, run="2026-12-07T10:00:00+00:00")})


def fake_course(root, record):
    (root / "README.md").write_text("(<!-- run-time:source -->x<!-- /run-time -->)\n| 00 | <!-- run-time:00 -->~1 s"
                                    "<!-- /run-time --> |\n| 01 | <!-- run-time:01 --><!-- /run-time --> |\n"
                                    "| 03 | <!-- run-time:03 --><!-- /run-time --> |\n")
    for folder, text in (("notebooks", "Runs in <!-- run-time -->about 99 s<!-- /run-time --> (no GPU)."),
                         ("solutions", "Solved, it runs in <!-- run-time -->?<!-- /run-time -->."),
                         ("exercises", "Solved, it runs in <!-- run-time -->?<!-- /run-time -->.")):
        (root / folder).mkdir()
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# 00 · a lesson\n\n{text}"),
                                             nbformat.v4.new_code_cell("x = 1")])
        nbformat.write(nb, root / folder / "00_a.ipynb")


@pytest.mark.skipif(RECORD is None, reason="no run-time file committed")
def test_the_texts_agree_with_the_file():
    assert problems(RECORD) == [], "run python tools/run_times.py --render"
    assert run_times.main(["--check"]) == 0


@pytest.mark.skipif(RECORD is None, reason="no run-time file committed")
def test_every_entry_names_a_run_that_says_where_it_comes_from():
    for kind in ("lessons", "exercises"):
        for number, entry in RECORD[kind].items():
            run = RECORD["runs"][entry["run"]]
            if run["measured_by_script"]:
                assert {"date", "git_commit", "python", "torch", "load_1min_before", "load_1min_after"} <= set(run)
                assert {"load_1min_before", "load_1min_after"} <= set(entry), (kind, number)
            else:
                assert run["source"], (kind, number)
    assert set(RECORD["lessons"]) == {p.name[:2] for p in (run_times.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}


def test_the_phrases():
    record = fake_record()
    assert intro(record, "lessons", "00") == "about 14 s on a 2-core CPU"
    assert intro(record, "lessons", "01") == "about 27 s on a 2-core CPU"
    assert intro(record, "lessons", "03") == "about 9 s on a 2-core CPU busy with other work"
    assert intro(record, "exercises", "00") == "about 7 s on a 2-core CPU, and grades in about 10 s"
    assert "not measured yet" in intro(record, "lessons", "02") and "--only 02" in intro(record, "lessons", "02")
    assert readme_cell(record, "00") == "~14 s" and readme_cell(record, "03") == "~9 s (busy CPU)"
    source = readme_cell(record, "source")
    assert "lessons 00-01: carried over from the README column, 2026-12-06, unloaded" in source
    assert "03: measured by the script, 2026-12-07, loaded" in source


def test_render_then_check_on_a_fake_course(tmp_path):
    record = fake_record()
    fake_course(tmp_path, record)
    assert len(problems(record, tmp_path)) == 4          # README and the three notebooks quote other times
    for path, text in run_times.changes(record, tmp_path).items():
        path.write_text(text, encoding="utf-8")
    assert problems(record, tmp_path) == []
    readme = (tmp_path / "README.md").read_text()
    assert "| 00 | <!-- run-time:00 -->~14 s<!-- /run-time --> |" in readme
    assert "<!-- run-time:03 -->~9 s (busy CPU)<!-- /run-time -->" in readme
    lesson = nbformat.read(tmp_path / "notebooks" / "00_a.ipynb", as_version=4).cells[0].source
    assert lesson.endswith("Runs in <!-- run-time -->about 14 s on a 2-core CPU<!-- /run-time --> (no GPU).")
    for folder in ("solutions", "exercises"):
        nb = nbformat.read(tmp_path / folder / "00_a.ipynb", as_version=4)
        phrase = "about 7 s on a 2-core CPU, and grades in about 10 s"
        assert f"it runs in <!-- run-time -->{phrase}<!-- /run-time -->." in nb.cells[0].source
    record["lessons"]["00"]["seconds"] = 15.0             # the file changes: the texts no longer agree
    assert problems(record, tmp_path) == ["README.md: a quoted run time differs from the file",
                                          "notebooks/00_a.ipynb: a quoted run time differs from the file"]
    del record["lessons"]["00"]
    record["lessons"]["05"] = dict(seconds=3.0, run="carried")
    assert "README.md: no <!-- run-time:05 --> marker in the syllabus" in problems(record, tmp_path)


def test_a_time_typed_outside_the_markers_is_a_problem(tmp_path):
    record = fake_record()
    fake_course(tmp_path, record)
    nb = nbformat.read(tmp_path / "notebooks" / "00_a.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("The ablation (about 20 s on a CPU):"))
    nbformat.write(nb, tmp_path / "notebooks" / "00_a.ipynb")
    assert [p for p in problems(record, tmp_path) if "about 20 s" in p]


def test_the_detector_finds_quoted_run_times():
    assert quoted_times("Runs in about 35 s on a 2-core CPU.") == ["about 35 s"]
    assert quoted_times("each row (about 20 s on a CPU)") == ["about 20 s"]
    assert quoted_times("~14 s; it takes 3 minutes; `--quick` (under two minutes); about a minute") == [
        "~14 s", "takes 3 minutes", "under two minutes", "about a minute"]
    assert quoted_times("Runs in <!-- run-time -->about 14 s on a 2-core CPU<!-- /run-time -->.") == []
    assert quoted_times("about as fast; arriving one every 0.3 s; a step of 12 ms; 4 s of audio") == []


def test_others_are_the_processes_running_before_the_command():
    """What a measurement shared the machine with: the CPU time of processes alive at both snapshots (not the
    measuring process itself); processes the command started (a kernel, distributed workers) are new pids."""
    import os

    tck = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    before = {1: 0, 50: 10, me: 0}
    after = {1: 0, 50: 10 + 3 * tck, me: 5 * tck, 900: 40 * tck}   # 50 busy for 3 s; 900 is the command's child
    assert run_times._others_cpu_seconds(before, after) == 3.0
    ticks = run_times._process_ticks()
    assert ticks is None or (me in ticks and all(t >= 0 for t in ticks.values()))


def test_a_run_is_called_loaded_only_for_the_entries_still_taken_from_it():
    """A run flagged loaded for one lesson, whose entry was re-measured since by another run: the lessons it still
    supplies were measured unloaded, and the README says so."""
    record = fake_record()
    record["lessons"]["02"] = dict(seconds=12.0, run="2026-12-07T10:00:00+00:00", loaded=False)
    record["lessons"]["03"] = dict(seconds=9.0, run="later", loaded=False)          # re-measured
    record["runs"]["later"] = dict(measured_by_script=True, date="2026-12-08T10:00:00+00:00", loaded=False)
    source = readme_cell(record, "source")
    assert "02: measured by the script, 2026-12-07, unloaded" in source
    assert "03: measured by the script, 2026-12-08, unloaded" in source
