"""The grader tests' helpers (tests/conftest.py): ``solution`` / ``exercise`` load what every graded notebook's
exercise cells define, and ``edited`` builds a broken variant from a solution's own source."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from course_lib.grading import manifest
from conftest import edited, exercise, solution

NOTEBOOKS = sorted(manifest.load().notebooks)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_graded_answer_is_loaded(name):
    """Each argument the grader passes to a check (``manifest.json``) is defined by the loaded cells, in the
    solution (solved) and in the exercise (a stub that raises NotImplementedError)."""
    solved, stubs = solution(name), exercise(name)
    assert solution(name) is solved  # loaded once per session
    for check in manifest.load().notebooks[name]:
        for arg in check.args:
            answer, stub = eval(arg, vars(solved)), eval(arg, vars(stubs))
            assert "# BEGIN SOLUTION" in inspect.getsource(getattr(answer, "fn", answer)), (name, arg)
            assert 'NotImplementedError("Exercise: ' in inspect.getsource(getattr(stub, "fn", stub)), (name, arg)


def test_edited_replaces_text_in_a_copy():
    original = solution("02_paged_attention").append_slot
    broken = edited(original, {"if num_tokens == len(block_table) * block_size:": "if True:"})
    assert "if True:" in inspect.getsource(broken) and "if True:" not in inspect.getsource(original)
    assert broken.__globals__["Allocator"] is solution("02_paged_attention").Allocator  # the notebook's names
    table = [7]
    allocator = solution("02_paged_attention").Allocator(4)
    assert broken(allocator, table, 1, 4) == 7 * 4 + 1 and len(table) == 2   # allocates a block it did not need


def test_edited_kernel_is_a_kernel():
    kernel = solution("00_start_here")._scale_add_kernel
    broken = edited(kernel, {"a * x + y": "x + y"})
    assert type(broken) is type(kernel) and "x + y, mask=mask)" in inspect.getsource(broken.fn)


def test_edited_refuses_text_that_is_not_there():
    with pytest.raises(AssertionError, match="update this broken variant"):
        edited(solution("00_start_here").bound, {"no such text": "x"})


def test_conftest_is_the_only_module_named_conftest():
    """pytest imports a conftest.py outside a package as ``conftest``: a second one would replace this one in
    sys.modules, and ``from conftest import solution`` would fail in every test module collected after it."""
    tests = Path(__file__).resolve().parent
    rootless = [p for p in tests.rglob("conftest.py") if not (p.parent / "__init__.py").exists()]
    assert rootless == [tests / "conftest.py"]
