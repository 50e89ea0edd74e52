"""No lesson or solution asserts a wall-clock time measured as it runs (issue 16): a busy laptop or a slower CPU
would fail it. An `assert` whose expression names a time (``*_ms``, ``*_s``, ``elapsed``, ``latency``,
``throughput``, ``speedup``, ...; a time counted in steps, ``*_steps*``, is a count) must be about a recorded file
or a formula, and say so in a comment on its line or on one of the three lines above it ("recorded", "formula").
CI therefore runs the lessons once, unloaded, and ``bash course.sh test --loaded`` / ``bash course.sh lessons
--loaded`` check the lessons under load on demand."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "solutions").glob("*.ipynb"))
TIMING = re.compile(r"(_(ms|s|us|sec|secs)$)|(^|_)(seconds|time|times|elapsed|wall|latency|latencies|throughput|"
                    r"tok_s|ttft|tpot|itl|speedup)(_|$)", re.IGNORECASE)
EXCUSED = re.compile(r"#.*\b(recorded|formula)", re.IGNORECASE)


def _names(node):
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            yield n.id
        elif isinstance(n, ast.Attribute):
            yield n.attr
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            yield n.value


def timing_asserts(source: str) -> list[str]:
    """The asserts of a code cell that name a time and carry no "recorded"/"formula" comment nearby."""
    lines = [line if not line.lstrip().startswith(("%", "!")) else "" for line in source.splitlines()]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert) and any(TIMING.search(n) and "_steps" not in n for n in _names(node.test)):
            window = lines[max(0, node.lineno - 4):node.lineno]
            if not any(EXCUSED.search(line) for line in window):
                found.append(f"line {node.lineno}: assert {ast.unparse(node.test)[:100]}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_lesson_asserts_a_time_it_measured(path):
    nb = nbformat.read(path, as_version=4)
    found = [f"cell {c.get('id')} {a}" for c in nb.cells if c.cell_type == "code" for a in timing_asserts(c.source)]
    assert not found, (f"{path.name} asserts a time (print it as an observation, or assert a count; if it is a fact "
                       f"of a recorded file or a formula, say so in a comment): {found}")


def test_the_scan_finds_a_timing_assert_and_accepts_an_excused_one():
    assert timing_asserts("step_ms = {}\nassert step_ms[64] > 3 * step_ms[1]")          # lesson 10's old assert
    assert timing_asserts("assert t.elapsed < 1.0")
    assert not timing_asserts("# facts of the recorded file\nassert r['graph_s'] < r['eager_s']")
    assert not timing_asserts("assert c['num_steps'] < s['num_steps']")                  # counts, not times
    assert not timing_asserts("assert a['ttft_steps_mean'] < b['ttft_steps_mean']")      # a time counted in steps
