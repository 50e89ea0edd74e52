"""The Chinese edition (issue 22): notebooks/zh/, solutions/zh/ and exercises/zh/, generated from the English notebooks
and the translations in i18n/zh/, so that the two editions cannot drift apart.

    python tools/i18n.py                 # (re)write every Chinese notebook whose translation is complete
    python tools/i18n.py --check         # exit 1 if a translation is missing or stale, or a notebook is out of date
    python tools/i18n.py --todo notebooks/03_flash_attention.ipynb
                                         # add the cells still to translate (new, or changed since) to the file

A translation file, ``i18n/zh/<folder>/<notebook stem>.md``, holds one entry per markdown cell of the English
notebook, each under a header line that names the cell and the English text it translates::

    <!-- cell 5029efb6 en 3f2a9c01d4e7 -->
    ## 4. 静态批处理输在哪里：数一数
    ...

``en`` is a hash of the English cell's source (run-time quotes blanked: ``tools/run_times.py`` re-renders them and
that is no change of the prose); when the English cell changes, its hash does, and the entry is stale until a
translator updates the text and the hash. ``--todo`` appends the English text of every missing or stale cell under a
header ending in ``todo``; a translator replaces the text and deletes ``todo``. An entry still marked ``todo`` counts
as missing.

What is generated: code cells are the English ones, byte for byte; markdown cells are the translations, with the
run-time quotes (``<!-- run-time:NN -->...<!-- /run-time -->``) filled in from the English cell; outputs are dropped.
The exercises are made from the Chinese solutions by ``tools/make_exercises.py``, as the English ones are. A
notebook whose translation is not complete is not written (``--check`` lists what it lacks).
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import make_exercises

ROOT = Path(__file__).resolve().parents[1]
LANGS = ("zh",)
#: the English notebooks that have an edition per language: every lesson, and the solutions of the graded lessons
FOLDERS = ("notebooks", "solutions")
HEADER = re.compile(r"^<!-- cell (?P<id>\S+) en (?P<hash>[0-9a-f]{12})(?P<todo> todo)? -->$", re.MULTILINE)
RUN_TIME = re.compile(r"(<!-- run-time(?::[\w-]+)? -->)(?P<value>.*?)(<!-- /run-time -->)", re.DOTALL)


def english_notebooks() -> list[Path]:
    return [p for folder in FOLDERS for p in sorted((ROOT / folder).glob("[0-9][0-9]_*.ipynb"))]


def translation_path(english: Path, lang: str) -> Path:
    return ROOT / "i18n" / lang / english.parent.name / f"{english.stem}.md"


def edition_path(english: Path, lang: str) -> Path:
    return english.parent / lang / english.name


def source_hash(source: str) -> str:
    """The hash a translation records: of the English source with its run-time quotes blanked."""
    blanked = RUN_TIME.sub(lambda m: m.group(1) + m.group(3), source)
    return hashlib.sha256(blanked.encode("utf-8")).hexdigest()[:12]


def parse(text: str) -> dict[str, tuple[str, bool, str]]:
    """cell id -> (English hash, todo?, translated markdown) of a translation file."""
    entries = {}
    heads = list(HEADER.finditer(text))
    for head, nxt in zip(heads, heads[1:] + [None]):
        body = text[head.end():nxt.start() if nxt else len(text)].strip("\n")
        entries[head["id"]] = (head["hash"], bool(head["todo"]), body)
    return entries


def fill_run_times(translated: str, english: str, lang: str = "zh") -> str:
    """The translation's run-time quotes, in order, with the values of the English cell's (they are measured, not
    written). Translated, a quote may read differently ("about 24 s on a 2-core CPU" is English), so the generated
    cell carries the English cell's numbers, in the cell's language (``QUOTE_IN``)."""
    values = iter([m["value"] for m in RUN_TIME.finditer(english)])
    return RUN_TIME.sub(lambda m: m.group(1) + QUOTE_IN[lang](next(values, m["value"])) + m.group(3), translated)


def quote_zh(quote: str) -> str:
    """A run-time quote of tools/run_times.py in Chinese ("about 24 s on a 2-core CPU" -> "在 2 核 CPU 上约 24 秒");
    one it does not know stays English."""
    for pattern, words in [(r"about (\d+) s on a (\d+)-core CPU", r"在 \2 核 CPU 上约 \1 秒"),
                           (r", and grades in about (\d+) s", r"，评分约 \1 秒"),
                           (r" busy with other work", "（测量时 CPU 还忙于其他任务）"),
                           (r"^~(\d+) s", r"约 \1 秒"), (r" \(busy CPU\)", "（CPU 繁忙时测得）")]:
        quote = re.sub(pattern, words, quote)
    return quote


QUOTE_IN = {"zh": quote_zh}


def emphasis_problems(markdown: str) -> list[str]:
    """Bold or italic markers that CommonMark will not read as such: a closing ``**`` right after punctuation and
    right before a letter (``**预填充（prefill）**把``), or an opening one right after a letter and before punctuation.
    Chinese text meets the rule often (full-width punctuation, no spaces); the fix is to move the punctuation out of
    the markers (``**预填充**（prefill）把``). Code spans and math are skipped."""
    import unicodedata

    def punct(ch: str) -> bool:
        return unicodedata.category(ch)[0] in "PS"

    def space(ch: str) -> bool:
        return ch == "" or ch.isspace()

    found = []
    # a code span or math stands for its first and last characters, punctuation both (` and $)
    text = re.sub(r"`[^`]*`|\$\$.*?\$\$|\$[^$\n]*\$", "§", markdown, flags=re.DOTALL)
    for paragraph in re.split(r"\n\s*\n", text):
        for marker in ("**", "*"):
            spots = [m.start() for m in re.finditer(re.escape(marker) if marker == "**" else r"(?<!\*)\*(?!\*)",
                                                      paragraph)]
            if marker == "*":   # a list bullet is no emphasis
                spots = [i for i in spots if paragraph[:i].split("\n")[-1].strip() or not paragraph[i + 1:i + 2] == " "]
            for k, i in enumerate(spots):
                before = paragraph[i - 1] if i else ""
                after = paragraph[i + len(marker):i + len(marker) + 1]
                closing = k % 2 == 1
                where = paragraph[max(0, i - 20):i + 20]
                if closing and punct(before) and not (space(after) or punct(after)):
                    found.append(f"closing {marker} after {before!r}, before {after!r}: {where!r}")
                if not closing and punct(after) and not (space(before) or punct(before)):
                    found.append(f"opening {marker} after {before!r}, before {after!r}: {where!r}")
            if marker == "**":
                paragraph = paragraph.replace("**", "  ")
    return found


def markdown_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "markdown"]


def problems_of(english: Path, lang: str) -> list[str]:
    """What keeps the translation of one notebook from being complete and current."""
    nb = nbformat.read(english, as_version=4)
    path = translation_path(english, lang)
    if not path.exists():
        return [f"{path.relative_to(ROOT)}: no translation file ({len(markdown_cells(nb))} cells to translate)"]
    entries = parse(path.read_text(encoding="utf-8"))
    problems = []
    for cell in markdown_cells(nb):
        entry = entries.get(cell.id)
        if entry is None:
            problems.append(f"cell {cell.id}: not translated")
        elif entry[1]:
            problems.append(f"cell {cell.id}: marked todo")
        elif entry[0] != source_hash(cell.source):
            problems.append(f"cell {cell.id}: the English text changed since it was translated")
        elif not entry[2].strip():
            problems.append(f"cell {cell.id}: empty translation")
        else:
            problems += [f"cell {cell.id}: {p}" for p in emphasis_problems(entry[2])]
    ids = {c.id for c in markdown_cells(nb)}
    problems += [f"cell {cid}: translated, but the English notebook has no such markdown cell" for cid in entries
                 if cid not in ids]
    return [f"{path.relative_to(ROOT)}: {p}" for p in problems]


def edition(english: Path, lang: str) -> str:
    """The text of the translated notebook (its translation must be complete)."""
    nb = nbformat.read(english, as_version=4)
    entries = parse(translation_path(english, lang).read_text(encoding="utf-8"))
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = fill_run_times(entries[cell.id][2], cell.source, lang)
        elif cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in ("tags",)}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["course_lang"] = lang
    return make_exercises.render(nb)


def plan(lang: str) -> tuple[dict[Path, str], list[str]]:
    """Translated notebook path -> its text (complete translations only), and the problems of the others."""
    files, problems = {}, []
    for english in english_notebooks():
        found = problems_of(english, lang)
        if found:
            problems += found
        else:
            files[edition_path(english, lang)] = edition(english, lang)
    solutions = ROOT / "solutions" / lang
    for path, text in list(files.items()):   # the exercises: made from the translated solutions, as in English
        if path.parent == solutions:
            exercise = make_exercises.make_exercise(nbformat.reads(text, as_version=4), path.name)
            files[ROOT / "exercises" / lang / path.name] = make_exercises.render(exercise)
    return files, problems


def todo(english: Path, lang: str) -> int:
    """Append the missing and stale cells of ``english`` to its translation file, in English, marked todo."""
    nb = nbformat.read(english, as_version=4)
    path = translation_path(english, lang)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    entries = parse(text)
    added = 0
    for cell in markdown_cells(nb):
        h = source_hash(cell.source)
        entry = entries.get(cell.id)
        if entry is not None and entry[0] == h and not entry[1]:
            continue
        if entry is not None:     # stale or todo: drop the old entry, keep its text below the English for reference
            old = re.compile(rf"^<!-- cell {re.escape(cell.id)} en [0-9a-f]{{12}}( todo)? -->\n.*?(?=^<!-- cell |\Z)",
                             re.MULTILINE | re.DOTALL)
            text = old.sub("", text)
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + f"<!-- cell {cell.id} en {h} todo -->\n"
        text += cell.source.rstrip("\n") + "\n"
        if entry is not None and entry[2].strip() and not entry[1]:
            text += "\n<!-- the previous translation, for reference (delete it):\n" + entry[2] + "\n-->\n"
        added += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything is missing or stale")
    parser.add_argument("--todo", nargs="+", type=Path, metavar="NOTEBOOK",
                        help="append the cells still to translate of these English notebooks to their files")
    parser.add_argument("--lang", default="zh", choices=LANGS)
    args = parser.parse_args(argv)
    if args.todo:
        for english in args.todo:
            english = english.resolve()
            print(f"{translation_path(english, args.lang).relative_to(ROOT)}: {todo(english, args.lang)} cells to "
                  "translate")
        return 0
    files, problems = plan(args.lang)
    stale = []
    for path, text in files.items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    wanted = set(files)
    extra = [p for folder in ("notebooks", "solutions", "exercises")
             for p in sorted((ROOT / folder / args.lang).glob("*.ipynb")) if p not in wanted]
    for line in problems:
        print(line, file=sys.stderr)
    for path in extra:
        print(f"{path.relative_to(ROOT)}: no complete translation behind it", file=sys.stderr)
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)}: differs from what tools/i18n.py generates", file=sys.stderr)
        return 1 if problems or stale or extra else 0
    for path in stale:
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
