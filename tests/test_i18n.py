"""The Chinese edition (issue 22, ``tools/i18n.py``): generated from the English notebooks and i18n/zh/, never edited by
hand. A translation that is missing or stale (its English cell changed since), a Chinese notebook that differs from
what the tool generates, or one without a complete translation behind it fails here."""
from __future__ import annotations

import nbformat
import pytest

from tools import i18n

EDITIONS = sorted(p for folder in ("notebooks", "solutions", "exercises")
                  for p in (i18n.ROOT / folder / "zh").glob("*.ipynb"))
TRANSLATED = [p for p in i18n.english_notebooks() if i18n.translation_path(p, "zh").exists()]


@pytest.fixture(scope="module")
def plan():
    return i18n.plan("zh")


@pytest.mark.parametrize("english", TRANSLATED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_translation_is_complete_and_current(english):
    assert i18n.problems_of(english, "zh") == [], (
        "translate the cells listed (python tools/i18n.py --todo " f"{english.relative_to(i18n.ROOT)} adds them to "
        "the file, in English, marked todo), then run python tools/i18n.py")


def test_every_english_notebook_has_a_translation():
    missing = [str(p.relative_to(i18n.ROOT)) for p in i18n.english_notebooks() if p not in TRANSLATED]
    assert not missing, f"no Chinese translation yet: {missing}"


def test_committed_chinese_notebooks_are_what_the_tool_generates(plan):
    files, _ = plan
    assert set(EDITIONS) == set(files), "run python tools/i18n.py (a Chinese notebook is missing, or has no "\
                                        "complete translation behind it)"
    stale = [str(p.relative_to(i18n.ROOT)) for p, text in files.items() if p.read_text(encoding="utf-8") != text]
    assert not stale, f"differ from what tools/i18n.py generates (edit i18n/zh/, not the notebooks): {stale}"


@pytest.mark.parametrize("edition", [p for p in EDITIONS if p.parent.parent.name != "exercises"],
                         ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_code_cells_are_the_english_ones(edition):
    english = nbformat.read(edition.parent.parent / edition.name, as_version=4)
    zh = nbformat.read(edition, as_version=4)
    assert [(c.cell_type, c.id) for c in zh.cells] == [(c.cell_type, c.id) for c in english.cells]
    assert [c.source for c in zh.cells if c.cell_type == "code"] == \
           [c.source for c in english.cells if c.cell_type == "code"]
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in c.source) for c in zh.cells if c.cell_type == "markdown")


def test_a_changed_english_cell_makes_its_translation_stale():
    text = "<!-- cell a1 en {} -->\n# 标题\n\n<!-- cell b2 en {} todo -->\nSome English\n"
    h = i18n.source_hash("# Title")
    entries = i18n.parse(text.format(h, h))
    assert entries == {"a1": (h, False, "# 标题"), "b2": (h, True, "Some English")}
    assert i18n.source_hash("# Title!") != h
    # re-rendered run times are no change of the prose
    assert i18n.source_hash("in <!-- run-time -->about 9 s on a 2-core CPU<!-- /run-time -->") == \
           i18n.source_hash("in <!-- run-time -->about 31 s on a 2-core CPU<!-- /run-time -->")


def test_run_time_quotes_come_from_the_english_cell_in_chinese():
    english = ("Runs in <!-- run-time -->about 16 s on a 2-core CPU, and grades in about 24 s<!-- /run-time --> and "
               "<!-- run-time -->about 9 s on a 2-core CPU busy with other work<!-- /run-time -->.")
    translated = "运行时间<!-- run-time -->旧<!-- /run-time -->；另一个<!-- run-time -->旧<!-- /run-time -->。"
    assert i18n.fill_run_times(translated, english, "zh") == (
        "运行时间<!-- run-time -->在 2 核 CPU 上约 16 秒，评分约 24 秒<!-- /run-time -->；另一个"
        "<!-- run-time -->在 2 核 CPU 上约 9 秒（测量时 CPU 还忙于其他任务）<!-- /run-time -->。")


def test_emphasis_that_commonmark_would_not_render_is_caught():
    """Full-width punctuation next to a closing ** keeps it from closing: "**预填充（prefill）**把" shows its stars."""
    assert i18n.emphasis_problems("借助**在线 softmax（online softmax）**边算")
    assert i18n.emphasis_problems("*提示：*第 i 个 token")
    assert not i18n.emphasis_problems("借助**在线 softmax**（online softmax）边算；*提示*：第 i 个")
    assert not i18n.emphasis_problems("*提示：*`x`，以及 **粗体**。\n\n* 列表项\n* a * b")


def test_readme_zh_links_every_chinese_lesson_and_exercise():
    import re

    text = (i18n.ROOT / "README.zh.md").read_text(encoding="utf-8")
    targets = {t for t in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if not t.startswith("http")}
    assert all((i18n.ROOT / t).exists() for t in targets), [t for t in targets if not (i18n.ROOT / t).exists()]
    wanted = {str(p.relative_to(i18n.ROOT)) for p in EDITIONS if p.parent.parent.name in ("notebooks", "exercises")}
    assert wanted <= targets, sorted(wanted - targets)
