"""Generate exercises/NN_x.ipynb from solutions/NN_x.ipynb.

    python tools/make_exercises.py            # (re)write every exercise notebook
    python tools/make_exercises.py --check    # exit 1 if any exercise differs from what would be generated

In code cells, each region from a line ``# BEGIN SOLUTION[ message]`` to a line ``# END SOLUTION``
(any indentation) becomes ``raise NotImplementedError("Exercise: <message>")`` at the BEGIN
marker's indentation; a message too long for one line of ``STUB_WIDTH`` columns is split, at spaces,
into strings on consecutive lines (the learner reads the same message). Markdown cells that start with
``<!-- SOLUTION -->`` are dropped. Outputs, execution counts and all but minimal metadata are removed,
so the result is reproducible byte for byte (and the drift test in tests/test_exercises_in_sync.py can
compare it with the commit).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION\b[ \t:—-]*(?P<message>.*?)\s*$")
END = re.compile(r"^[ \t]*# END SOLUTION\s*$")
SOLUTION_MARKDOWN = "<!-- SOLUTION -->"
DEFAULT_MESSAGE = "write this part"
STUB_WIDTH = 120   # the line length of the course's linter (pyproject.toml, [tool.ruff])


class MarkerError(ValueError):
    """Unbalanced or nested solution markers; the message names the file, cell and line."""


def stub(indent: str, message: str) -> str:
    """``raise NotImplementedError("Exercise: <message>")`` at ``indent``, within STUB_WIDTH columns where the
    message allows: a long one becomes implicitly concatenated strings, one a line, split after spaces."""
    head = f"{indent}raise NotImplementedError("
    text = "Exercise: " + message
    quote = lambda s: json.dumps(s, ensure_ascii=False)
    if len(head) + len(quote(text)) + 1 <= STUB_WIDTH:
        return f"{head}{quote(text)})"
    pieces, piece = [], ""
    for word in re.findall(r"\S*\s*", text)[:-1]:           # each word with the spaces after it
        if piece and len(head) + len(quote(piece + word)) + 1 > STUB_WIDTH:
            pieces.append(piece)
            piece = ""
        piece += word
    pieces.append(piece)
    return head + ("\n" + " " * len(head)).join(quote(p) for p in pieces) + ")"


def strip_solutions(source: str, where: str = "<cell>") -> str:
    """Replace every BEGIN/END SOLUTION region of one code cell's source by a stub."""
    out: list[str] = []
    begin_line = None
    for number, line in enumerate(source.splitlines(), start=1):
        if m := BEGIN.match(line):
            if begin_line is not None:
                raise MarkerError(f"{where}, line {number}: '# BEGIN SOLUTION' inside the region opened at line "
                                  f"{begin_line}")
            begin_line = number
            message = re.sub(r"^Exercise:\s*", "", m["message"]) or DEFAULT_MESSAGE
            out.append(stub(m["indent"], message))
        elif END.match(line):
            if begin_line is None:
                raise MarkerError(f"{where}, line {number}: '# END SOLUTION' without a '# BEGIN SOLUTION' before it")
            begin_line = None
        elif begin_line is None:
            out.append(line)
    if begin_line is not None:
        raise MarkerError(f"{where}, line {begin_line}: '# BEGIN SOLUTION' is never closed by '# END SOLUTION'")
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def make_exercise(solution: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The exercise notebook for one solution notebook (``name`` like "00_roofline.ipynb")."""
    v4 = nbformat.v4
    note = v4.new_markdown_cell(f"> Generated from `solutions/{name}` by `tools/make_exercises.py` — "
                                "edit the solution, not this file.")
    note.id = "generated-note"
    cells = [note]
    for index, cell in enumerate(solution.cells):
        cell_id = cell.get("id") or f"cell-{index}"
        if cell.cell_type == "markdown":
            if cell.source.lstrip().startswith(SOLUTION_MARKDOWN):
                continue
            new = v4.new_markdown_cell(cell.source)
        elif cell.cell_type == "code":
            new = v4.new_code_cell(strip_solutions(cell.source, f"solutions/{name}, cell {index}"))
        else:
            new = v4.new_raw_cell(cell.source)
        new.id = cell_id
        if cell.get("metadata", {}).get("tags"):
            new.metadata["tags"] = list(cell.metadata["tags"])
        cells.append(new)
    nb = v4.new_notebook(cells=cells)
    nb.nbformat, nb.nbformat_minor = 4, 5
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    """The exact text written to disk (nbformat's JSON, one trailing newline)."""
    return nbformat.writes(nb).rstrip("\n") + "\n"


def plan(solutions: Path, exercises: Path) -> dict[Path, str | None]:
    """Exercise path -> generated text (None for an exercise without a solution)."""
    wanted = {exercises / p.name: render(make_exercise(nbformat.read(p, as_version=4), p.name))
              for p in sorted(solutions.glob("*.ipynb"))}
    extra = {p: None for p in sorted(exercises.glob("*.ipynb")) if p not in wanted}
    return {**wanted, **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if exercises/ is out of date")
    parser.add_argument("--solutions", type=Path, default=ROOT / "solutions")
    parser.add_argument("--exercises", type=Path, default=ROOT / "exercises")
    args = parser.parse_args(argv)
    try:
        files = plan(args.solutions, args.exercises)
    except MarkerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems = []
    for path, text in files.items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if text is None:
            problems.append(f"extra (no solution for it): {path}")
        elif current is None:
            problems.append(f"missing: {path}")
        elif current != text:
            problems.append(f"differs from its solution: {path}")
        if not args.check and text is not None and current != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if args.check:
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("run `python tools/make_exercises.py` to regenerate exercises/ from solutions/", file=sys.stderr)
        return 1 if problems else 0
    for line in problems:
        print(line.replace("missing", "wrote").replace("differs from its solution", "updated"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
