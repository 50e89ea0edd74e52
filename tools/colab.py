"""Open in Colab: the notebooks' first code cell and the README's badges, for one repository URL.

    python tools/colab.py                                   # (re)write both for the URL in REPO below
    python tools/colab.py --repo https://github.com/you/fork  # a fork: point both at it
    python tools/colab.py --check                           # exit 1 if anything differs (a test runs this)

A notebook opened from a Colab badge arrives alone, without course_lib. Its first code cell (the same in every
notebook of notebooks/, solutions/ and exercises/) clones the repository and installs it when it runs on Colab,
and does nothing anywhere else (a laptop, CI, nbval, the grader). The README's badges link
``https://colab.research.google.com/github/<owner>/<name>/blob/main/<notebook>``.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
#: Where the course is published (the badges and the Colab cell clone it).
REPO = "https://github.com/llm-inference-course/llm-inference-course"
MARKER = "# Colab: fetch and install the course"
CELL = MARKER + ''' (a notebook opened from a badge arrives alone). Does nothing elsewhere.
import sys
if "google.colab" in sys.modules and "course_lib" not in sys.modules:
    import os
    import subprocess
    if not os.path.isdir("/content/course"):
        url = "{repo}"
        subprocess.run(["git", "clone", "-q", "--depth", "1", url, "/content/course"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/course"], check=True)
    sys.path.insert(0, "/content/course")
    os.chdir("/content/course")'''
BADGE = re.compile(r"https://colab\.research\.google\.com/github/([^/\s]+/[^/\s]+)/blob/main/([^)\s]+\.ipynb)")


def slug(repo: str) -> str:
    m = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)(\.git)?/?", repo)
    if not m:
        raise ValueError(f"--repo must look like https://github.com/<owner>/<name>, got {repo!r}")
    return m.group(1)


def notebook_paths() -> list[Path]:
    return sorted(p for d in ("notebooks", "solutions", "exercises") for p in (ROOT / d).glob("*.ipynb"))


def with_cell(nb, repo: str) -> bool:
    """Put the Colab cell first among the code cells (replacing an older one); True if nb changed."""
    source = CELL.format(repo=repo)
    codes = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    first = codes[0] if codes else len(nb.cells)
    if codes and nb.cells[first].source.startswith(MARKER):
        if nb.cells[first].source == source:
            return False
        nb.cells[first].source = source
        return True
    cell = nbformat.v4.new_code_cell(source)
    cell["id"] = "colab-setup"   # deterministic: regenerated notebooks stay byte for byte the same
    nb.cells.insert(first, cell)
    return True


def readme_badges(text: str, repo: str) -> str:
    return BADGE.sub(lambda m: f"https://colab.research.google.com/github/{slug(repo)}/blob/main/{m.group(2)}", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=REPO)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    problems = []
    for path in notebook_paths():
        nb = nbformat.read(path, as_version=4)
        if with_cell(nb, args.repo):
            problems.append(f"{path.relative_to(ROOT)}: its Colab cell is missing or differs")
            if not args.check:
                nbformat.write(nb, path)
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = readme_badges(text, args.repo)
    for _, target in BADGE.findall(new):
        if not (ROOT / target).exists():
            problems.append(f"README.md: a Colab badge links {target}, which does not exist")
    if new != text:
        problems.append("README.md: a Colab badge points at another repository")
        if not args.check:
            readme.write_text(new)
    if args.check:
        print("\n".join(problems) or "Colab cells and badges are in sync")
        return 1 if problems else 0
    print(f"Colab cells and badges point at {args.repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
