"""course_lib/grading/manifest.json: in step with the solutions' check calls and the checks' points, and strict."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from course_lib.grading.cli import import_checks
from course_lib.grading import manifest

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_is_up_to_date():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_manifest.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_exercise_notebook_has_its_checks_and_every_check_imports():
    m = manifest.load()
    exercises = sorted(p.stem for p in (ROOT / "exercises").glob("*.ipynb"))
    assert sorted(m.notebooks) == exercises
    assert sum(len(v) for v in m.notebooks.values()) == 49
    assert sum(c.points for v in m.notebooks.values() for c in v) == 101
    functions = import_checks(m)
    assert all(callable(functions[c.check]) for v in m.notebooks.values() for c in v)


def test_lookup_by_file_name_and_copies():
    m = manifest.load()
    assert m.lesson_of(Path("exercises/01_kv_cache.ipynb")) == "01_kv_cache"
    assert m.lesson_of(Path("somewhere/01_kv_cache-Copy1.ipynb")) == "01_kv_cache"  # Jupyter's "Duplicate"
    assert m.lesson_of(Path("notes.ipynb")) is None


@pytest.mark.parametrize("entry", [
    {"name": "a", "check": "m:f", "args": ["f"], "points": 0},          # 0 points would make a check free
    {"name": "a", "check": "m:f", "args": ["f"], "points": True},
    {"name": "a", "check": "m_f", "args": ["f"], "points": 1},          # no module:function
    {"name": "a", "check": "m:f", "args": "f", "points": 1},
])
def test_bad_entries_are_refused(tmp_path, entry):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"notebooks": {"00_x": [entry]}}))
    with pytest.raises(ValueError, match="00_x"):
        manifest.load(path)


def test_repeated_check_names_are_refused(tmp_path):
    entry = {"name": "a", "check": "m:f", "args": ["f"], "points": 1}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"notebooks": {"00_x": [entry, entry]}}))
    with pytest.raises(ValueError, match="repeated"):
        manifest.load(path)
