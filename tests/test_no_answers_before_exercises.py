"""No lesson prints an exercise's answer before the exercise asks for it (issue 23, part 5).

For each exercise, the library functions whose code is (nearly) its answer are listed below. Before the
exercise's prompt (the whole lesson notebook, then the exercise notebook up to its "## Exercise N" heading) no cell
may ``show_source`` them; a lesson shows their interface instead (``show_interface``: signature and docstring).
After the exercise, the exercise notebook has a "show the library's code" cell that shows them whole.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from kernels.flash_attention import _attn_fwd, _attn_fwd_inner
from kernels.paged_attention import _paged_attention_decode_kernel
from kernels.paged_attention_int8 import _paged_attention_int8_kernel
from course_lib.model.kv_cache import KVCache
from course_lib.model.online_softmax import online_softmax, online_softmax_stats, tiled_attention
from course_lib.notebook.source import get_source
from course_lib.paging.block_manager import BlockAllocator, BlockManager
from course_lib.parallel.schedule import measured_bubble
from course_lib.parallel.tensor import row_parallel_forward
from course_lib.quant.kv_quant import quantize
from course_lib.serving.prefix_cache import PrefixCache
from course_lib.serving.speculative import (count_accepted, expected_tokens_per_step, residual_distribution,
                                            rollback_caches)

ROOT = Path(__file__).resolve().parents[1]

# exercise (manifest name) -> the library's code that answers it; shown whole only after the exercise
ANSWERS = {
    "kv_cache_update": [KVCache.update],
    "allocator": [BlockAllocator],
    "slot_mapping": [BlockManager.slot_mapping],
    "append_slot": [BlockManager.append_slots],
    "fork_cow": [BlockManager.fork, BlockManager.append_slots],
    "paged_attention_kernel": [_paged_attention_decode_kernel],
    "online_softmax": [online_softmax, online_softmax_stats],
    "tiled_attention": [tiled_attention],
    "flash_kernel": [_attn_fwd, _attn_fwd_inner],
    "causal_kernel": [_attn_fwd, _attn_fwd_inner],
    "match": [PrefixCache.match],
    "insert": [PrefixCache.insert],
    "evict": [PrefixCache.evict],
    "count_accepted": [count_accepted],
    "residual_distribution": [residual_distribution],
    "rollback_caches": [rollback_caches],
    "expected_tokens": [expected_tokens_per_step],
    "quantize_per_token": [quantize],
    "int8_attention_kernel": [_paged_attention_int8_kernel],
    "row_parallel_forward": [row_parallel_forward],
    "bubble_fraction": [measured_bubble],
}
MANIFEST = json.loads((ROOT / "course_lib" / "grading" / "manifest.json").read_text())["notebooks"]
EXERCISES = [(lesson, check["name"], check["check"].split(":")[1]) for lesson, checks in MANIFEST.items()
             for check in checks if check["name"] in ANSWERS]


def _cells(path: Path) -> list[tuple[str, str]]:
    return [(c["cell_type"], "".join(c["source"])) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]]


def _shown(source: str) -> list[str]:
    """The arguments of every show_source(...) call of a code cell, as written (``BlockManager.fork``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:   # a cell with IPython magics: none of ours shows source there
        return []
    return [ast.unparse(node.args[0]) for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name) and node.func.id == "show_source" and node.args]


def _is(argument: str, obj) -> bool:
    name = get_source(obj).name                  # its qualified name: "BlockManager.fork", "_attn_fwd"
    return argument == name or argument.endswith("." + name)   # "library.online_softmax" is online_softmax too


def _prompt_index(cells, check_function: str) -> int:
    """The index of the "## Exercise N" heading above the cell that calls the exercise's check."""
    call = next(i for i, (kind, src) in enumerate(cells) if kind == "code" and src.strip().startswith(check_function))
    return max(i for i, (kind, src) in enumerate(cells[:call]) if kind == "markdown" and src.startswith("## Exercise"))


@pytest.mark.parametrize("lesson, name, check_function", EXERCISES, ids=[e[1] for e in EXERCISES])
def test_no_cell_before_the_prompt_shows_the_answer(lesson, name, check_function):
    before = [(f"notebooks/{lesson}.ipynb", src) for kind, src in _cells(ROOT / "notebooks" / f"{lesson}.ipynb")
              if kind == "code"]
    for folder in ("solutions", "exercises"):
        cells = _cells(ROOT / folder / f"{lesson}.ipynb")
        before += [(f"{folder}/{lesson}.ipynb", src) for kind, src in cells[:_prompt_index(cells, check_function)]
                   if kind == "code"]
    for where, source in before:
        for argument in _shown(source):
            for obj in ANSWERS[name]:
                assert not _is(argument, obj), (
                    f"{where} shows show_source({argument}) before exercise {name!r} asks for it: that is its "
                    "answer. Show its interface there (show_interface), and the code after the exercise")


@pytest.mark.parametrize("lesson, name, check_function", EXERCISES, ids=[e[1] for e in EXERCISES])
def test_the_answer_shown_in_the_lesson_is_shown_after_the_exercise(lesson, name, check_function):
    """Whatever the lesson shows of an answer (its interface), the exercise notebook shows whole after it."""
    interfaces = _interfaces(lesson)
    wanted = [obj for obj in ANSWERS[name] if any(_is(arg, obj) for arg in interfaces)]
    cells = _cells(ROOT / "solutions" / f"{lesson}.ipynb")
    after = [arg for kind, src in cells[_prompt_index(cells, check_function):] if kind == "code" for arg in _shown(src)]
    for obj in wanted:
        assert any(_is(arg, obj) for arg in after), (
            f"notebooks/{lesson}.ipynb shows only the interface of {get_source(obj).name}: show its code in "
            f"solutions/{lesson}.ipynb after exercise {name!r} (a 'show the library's code' cell)")


def _interfaces(lesson: str) -> list[str]:
    out = []
    for kind, src in _cells(ROOT / "notebooks" / f"{lesson}.ipynb"):
        if kind != "code":
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        out += [ast.unparse(node.args[0]) for node in ast.walk(tree) if isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name) and node.func.id == "show_interface" and node.args]
    return out


@pytest.mark.parametrize("lesson", sorted({lesson for lesson, _, _ in EXERCISES}))
def test_a_show_the_library_cell_rebinds_no_name_the_grader_reads(lesson):
    """The grader reads the learner's answers by name (the manifest's args) after the notebook ran: a cell after
    the exercise that imports the library's ``online_softmax`` would grade the library instead of the learner."""
    graded = {arg for check in MANIFEST[lesson] for arg in check["args"]}
    for folder in ("solutions", "exercises"):
        for kind, source in _cells(ROOT / folder / f"{lesson}.ipynb"):
            if kind != "code" or not _shown(source):
                continue
            bound = {alias.asname or alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                     if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
            assert not bound & graded, (f"{folder}/{lesson}.ipynb: a cell that shows the library's code rebinds "
                                        f"{sorted(bound & graded)}, which the grader reads as the learner's answer: "
                                        "import the module under another name (from ... import x as library)")
