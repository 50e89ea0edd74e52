"""Fixtures and helpers shared by the test modules.

The grader tests take each reference solution from its one copy, the solution notebook, and import these helpers
(``from conftest import solution, edited, ...``):

    solution(name) / exercise(name)   what the exercise cells of solutions/<name>.ipynb (exercises/<name>.ipynb)
                                      define, as a module: ``solution("02_paged_attention").append_slot``
    edited(obj, {old: new})           a broken variant: ``obj`` rebuilt from its source with ``old`` replaced by ``new``
    stub                              a function that is "not attempted" (raises the exercises' NotImplementedError)
    assert_caught(result, hint)       a check failed the variant, with 0 points and a hint (or the raised error)
    assert_not_attempted(result)      a check scored a stub "not attempted", with 0 points

Every ``assert_caught`` counts one broken variant for its check (its lesson and ``result.name``):
``python tools/variant_table.py`` runs the lesson tests and writes the count per exercise into tests/README.md
(``COURSE_VARIANT_TABLE``, below).

This must stay the only module named ``conftest``: pytest imports every conftest.py outside a package under that
one name, so a second one (tests/browser/ is a package for this reason) would hide these helpers.
"""
from __future__ import annotations

import ast
import atexit
import functools
import importlib.util
import inspect
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import textwrap
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import load_tiny

ROOT = Path(__file__).resolve().parents[1]
# The fixture notebooks are inputs of the grader's tests, not notebooks to validate: one hangs, one kills its kernel.
collect_ignore_glob = ["fixtures/*.ipynb", "fixtures/*/*.ipynb"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is as fast as two and steady when other processes share the CPU.
    A module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The shipped target model in float32 on the CPU (exact comparisons on every machine) and its tokenizer."""
    return load_tiny("target", dtype=torch.float32, device="cpu")


# ---------------------------------------------------------------- the notebooks' answers, loaded once
# A notebook's cells become a real .py file in this folder: @triton.jit reads a kernel's source with
# inspect.getsourcelines, which needs a file (a string given to exec() has none), and a traceback names the line.
_MODULES = Path(tempfile.mkdtemp(prefix="course-notebook-answers-"))
atexit.register(shutil.rmtree, _MODULES, ignore_errors=True)
_EXERCISE_CELL = {"solutions": "# BEGIN SOLUTION", "exercises": 'raise NotImplementedError("Exercise: '}
_edits = itertools.count()


def _is_import_cell(source: str) -> bool:
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    return bool(body) and all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in body)


def _load(module_name: str, source: str, namespace: dict | None = None) -> types.ModuleType:
    """Write ``source`` to ``<module_name>.py`` and import it (starting from ``namespace``'s names)."""
    path = _MODULES / f"{module_name}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    module.__dict__.update(namespace or {})
    sys.modules[module_name] = module  # inspect.getsource of a class looks its module up here
    spec.loader.exec_module(module)
    return module


@functools.cache
def _notebook(folder: str, name: str) -> types.ModuleType:
    import nbformat

    path = ROOT / folder / f"{name}.ipynb"
    cells = [(i, c.source) for i, c in enumerate(nbformat.read(path, as_version=4).cells) if c.cell_type == "code"]
    # Only the imports and the exercise cells run: no lesson cell, no check call, nothing slow.
    parts = [f"# {folder}/{name}.ipynb, cell {i}\n{source}\n" for i, source in cells
             if _is_import_cell(source) or _EXERCISE_CELL[folder] in source]
    assert any(_EXERCISE_CELL[folder] in p for p in parts), f"{path}: no exercise cell"
    return _load(f"{folder}_{name}", "\n\n".join(parts))


def solution(name: str) -> types.ModuleType:
    """What the exercise cells of ``solutions/<name>.ipynb`` define (its import cells run first), loaded once per
    session: the one copy of each reference solution, e.g. ``solution("02_paged_attention").Allocator``."""
    return _notebook("solutions", name)


def exercise(name: str) -> types.ModuleType:
    """The same for ``exercises/<name>.ipynb``: the stubs a learner starts from."""
    return _notebook("exercises", name)


def edited(obj, replacements: dict[str, str]):
    """``obj`` (a function, class or Triton kernel of a loaded notebook) rebuilt from its source with every
    occurrence of each ``old`` text replaced by ``new``: a broken variant a check must catch, written as the mistake
    itself. It sees the names of ``obj``'s notebook (an edited ``append_slot_cow`` calls the solution's
    ``append_slot``). An ``old`` text missing from the source fails: the solution changed, update the variant."""
    fn = obj.fn if inspect.isfunction(getattr(obj, "fn", None)) else obj   # a Triton kernel: the function it wraps
    source = textwrap.dedent(inspect.getsource(fn))                          # decorators included (@triton.jit)
    for old, new in replacements.items():
        assert old in source, f"{fn.__qualname__} no longer contains {old!r}: update this broken variant"
        source = source.replace(old, new)
    home = sys.modules[fn.__module__]
    names = {k: v for k, v in vars(home).items() if not k.startswith("__")}
    return getattr(_load(f"{home.__name__}_edit{next(_edits)}", source, names), fn.__name__)


# ---------------------------------------------------------------- what the grader tests assert
def stub(*args, **kwargs):
    """An exercise not attempted: it raises the NotImplementedError of the exercises' stubs."""
    raise NotImplementedError("Exercise: write this function")


VARIANTS_WRITTEN: Counter = Counter()   # "NN:check name" -> broken variants submitted to it (assert_caught calls)
VARIANTS_CAUGHT: Counter = Counter()    # "NN:check name" -> of those, failed with 0 points and the expected hint


def _variant_key(result) -> str:
    """``"NN:name"``: the lesson of the check (``course_lib.grading.lessonNN``, which the Checker records) and its
    name, which alone is not unique (lessons share the name ``end_to_end``)."""
    found = re.search(r"\.lesson(\d\d)", getattr(result, "_module", ""))
    return f"{found.group(1) if found else '??'}:{result.name}"


def assert_caught(result, hint_part: str | None = None) -> None:
    """The check failed the variant with 0 points and told why (a hint, or the error the code raised)."""
    VARIANTS_WRITTEN[_variant_key(result)] += 1
    assert (result.status, result.points) == ("failed", 0), result
    assert "hint:" in result.message or "your code raised" in result.message, result.message
    if hint_part:
        assert hint_part in result.message, result.message
    VARIANTS_CAUGHT[_variant_key(result)] += 1


def pytest_sessionfinish(session, exitstatus):
    """With COURSE_VARIANT_TABLE=<file>: write the broken variants counted in this session there (JSON)."""
    path = os.environ.get("COURSE_VARIANT_TABLE")
    if path:
        Path(path).write_text(json.dumps({"written": VARIANTS_WRITTEN, "caught": VARIANTS_CAUGHT}, indent=1))


def assert_not_attempted(result) -> None:
    assert (result.status, result.points) == ("not attempted", 0), result


def hold_in_execute(monkeypatch):
    """Every engine step blocks in ``ModelRunner.execute`` until ``release`` is set (``started`` tells it arrived):
    a second thread can then call into the engine while the first is inside a step."""
    import threading

    from course_lib.serving.model_runner import ModelRunner

    started, release = threading.Event(), threading.Event()
    execute = ModelRunner.execute

    def slow_execute(self, chunks):
        started.set()
        release.wait(30)
        return execute(self, chunks)

    monkeypatch.setattr(ModelRunner, "execute", slow_execute)
    return started, release
