"""``course_lib.notebook.source.show_source``: lessons show whole functions of the library (issue 17, part 4), and no
lesson, exercise or solution slices source text or calls ``inspect.getsource`` itself."""
from __future__ import annotations

import ast
import json
import re
import sys
import types
from pathlib import Path

import pytest

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
import kernels
from course_lib.notebook.source import get_source, show_source
from course_lib.serving.engine import LLMEngine
from course_lib.serving.scheduler import Scheduler

ROOT = Path(__file__).resolve().parents[1]
GETSOURCE = re.compile(r"\bgetsource(lines)?\b")    # inspect.getsource(...), from inspect import getsource, ...
NOTEBOOKS = sorted(p for folder in ("notebooks", "solutions", "exercises") for p in (ROOT / folder).glob("*.ipynb"))


@pytest.mark.parametrize("obj, name, kind, path", [
    (Scheduler._schedule_running, "Scheduler._schedule_running", ast.FunctionDef, "course_lib/serving/scheduler.py"),
    (LLMEngine.generate, "LLMEngine.generate", ast.FunctionDef, "course_lib/serving/engine.py"),
    (Scheduler, "Scheduler", ast.ClassDef, "course_lib/serving/scheduler.py"),
    (kernels.vector_add._add_kernel, "_add_kernel", ast.FunctionDef, "kernels/vector_add.py"),   # a Triton kernel
    (kernels.add, "add", ast.FunctionDef, "kernels/vector_add.py"),
])
def test_a_listing_is_the_whole_definition_with_its_file_and_lines(obj, name, kind, path):
    listing = get_source(obj)
    assert (listing.name, listing.path) == (name, path)
    tree = ast.parse(listing.code)                        # whole: it parses on its own, dedented
    assert len(tree.body) == 1 and isinstance(tree.body[0], kind) and tree.body[0].name == name.split(".")[-1]
    file_lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    shown = file_lines[listing.first_line - 1:listing.last_line]
    assert [line.strip() for line in shown] == [line.strip() for line in listing.code.splitlines()]
    assert f"{path}, lines {listing.first_line}-{listing.last_line}" in listing.caption


def test_a_bound_method_and_a_property_show_their_function():
    assert get_source(LLMEngine.step).code.startswith("def step(self)")
    from course_lib.serving.sequence import ScheduledChunk
    assert get_source(ScheduledChunk.samples).code.startswith("@property\ndef samples")


@pytest.mark.parametrize("obj", [42, "LLMEngine.step", None, types.ModuleType("m")])
def test_anything_else_is_a_type_error_that_says_what_to_pass(obj):
    with pytest.raises(TypeError, match="function, method, class or Triton kernel"):
        get_source(obj)


def test_html_is_highlighted_with_a_caption_and_escaped_code():
    listing = get_source(Scheduler.abort)
    page = listing.html()
    assert "Scheduler.abort" in page and f"lines {listing.first_line}-{listing.last_line}" in page
    assert "<span" in page and "style=" in page            # Pygments' inline styles: no stylesheet needed
    assert f"{listing.first_line}</span>" in page and f"{listing.last_line}</span>" in page   # the file's lines
    assert "-> None" not in page and "&gt;" in page         # `->` of the code is escaped, never raw HTML


def test_outside_ipython_it_prints_plain_text(monkeypatch, capsys):
    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    assert show_source(Scheduler.abort) is None
    out = capsys.readouterr().out
    assert out.startswith("# Scheduler.abort  (course_lib/serving/scheduler.py, lines ")
    assert "def abort(self, seq: Sequence) -> None:" in out


def test_in_ipython_it_displays_html_and_plain_text(monkeypatch):
    import IPython
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append((obj, raw)))
    show_source(kernels.vector_add._add_kernel)
    (bundle, raw), = shown
    assert raw and set(bundle) == {"text/plain", "text/html"}
    assert "@triton.jit" in bundle["text/plain"] and "kernels/vector_add.py" in bundle["text/html"]


def test_without_pygments_the_html_is_plain_pre(monkeypatch):
    monkeypatch.setitem(sys.modules, "pygments", None)
    page = get_source(Scheduler.abort).html()
    assert "<pre>def abort(self, seq: Sequence) -&gt; None:" in page


# ---------------------------------------------------------------- the lessons use it
def _code_cells(path: Path):
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "code":
            yield cell.get("id"), "".join(cell["source"])


def test_the_notebooks_are_found():
    assert len(NOTEBOOKS) >= 30 and any("04_continuous_batching" in p.name for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_lessons_never_slice_source_text_nor_call_getsource(path):
    """A lesson shows library code with show_source(obj): whole functions, never ``getsource(f)[a:b]``,
    ``.split(...)[i]`` or lines cut from it (they show the wrong lines after the next rename)."""
    bad = [(cell_id, line.strip()) for cell_id, code in _code_cells(path) for line in code.splitlines()
           if GETSOURCE.search(line)]
    assert not bad, f"{path.relative_to(ROOT)}: use course_lib.notebook.source.show_source(obj) instead: {bad}"


def test_the_check_catches_every_way_to_cut_source_text():
    for line in ['src = inspect.getsource(Scheduler.schedule); print(src[src.index("# 1."):])',
                 'print(getsource(f).split("new = out")[0])', "lines, start = inspect.getsourcelines(f)",
                 "print(inspect.getsource(KVCache.update))"]:
        assert GETSOURCE.search(line), line
    assert not GETSOURCE.search("show_source(Scheduler._schedule_running)")
