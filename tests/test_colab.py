"""Open in Colab: every notebook starts with the same Colab cell, it does nothing off Colab, and the README's
badges point at notebooks that exist (tools/colab.py)."""
import subprocess
import sys
from pathlib import Path
from unittest import mock

import nbformat

from tools import colab

ROOT = Path(__file__).resolve().parents[1]


def test_cells_and_badges_are_in_sync():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "colab.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    badges = colab.BADGE.findall((ROOT / "README.md").read_text())
    lessons = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(target for _, target in badges) == lessons, "one badge per lesson notebook"


def test_the_colab_cell_does_nothing_off_colab():
    nb = nbformat.read(ROOT / "notebooks" / "00_start_here.ipynb", as_version=4)
    source = next(c.source for c in nb.cells if c.cell_type == "code")
    assert source.startswith(colab.MARKER)
    assert "google.colab" not in sys.modules
    with mock.patch("subprocess.run") as run:
        exec(compile(source, "<colab cell>", "exec"), {})
    run.assert_not_called()


def test_a_repo_that_is_not_a_github_url_is_refused():
    import pytest
    with pytest.raises(ValueError, match="--repo"):
        colab.slug("git@github.com:you/fork.git")
    assert colab.slug("https://github.com/you/fork.git") == "you/fork"
