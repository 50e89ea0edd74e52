"""Is the course's code the committed one? The grader imports its checks and references from ``course_lib/`` and
``kernels/``, which an editable install leaves writable: a notebook can rewrite a check on disk for the next run.

``changed_files()`` lists what differs from git's HEAD there (modified, deleted or untracked files, git-ignored
ones aside); the grader prints them and marks the run unverified (``--require-full`` then fails). Outside a git
checkout it cannot tell, and says so. Someone who also commits their change, or edits the installed torch, is
not caught: the threat model in ``course_lib/grade.py`` says what is defended.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WATCHED = ("course_lib", "kernels")


def changed_files(root: Path = ROOT) -> list[str] | None:
    """Paths under course_lib/ and kernels/ that differ from HEAD; None when this is not a git checkout."""
    git = shutil.which("git")
    if git is None or not (Path(root) / ".git").exists():
        return None
    try:
        status = [git, "-C", str(root), "status", "--porcelain=v1", "--untracked-files=all", "--", *WATCHED]
        out = subprocess.run(status, capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return sorted(line[3:] for line in out.splitlines() if line.strip())
