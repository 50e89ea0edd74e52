"""The course as a package: pyproject.toml declares what it needs and requirements.txt pins exactly that, and a wheel
built from this clone, installed somewhere else, carries what the course reads at run time (the shipped models and
their tokenizer, the corpus, the grader's manifest) and runs on the core dependencies alone.

The wheel test takes ~15 s; COURSE_SKIP_PACKAGE_TEST=1 skips it (CI runs it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
# Installed as dependencies of the extras, never needed by the core: the wheel test makes importing them fail.
NOT_CORE = ["matplotlib", "ipywidgets", "IPython", "ipykernel", "jupyterlab", "jupyter_client", "nbformat", "nbclient",
            "nbval", "transformers", "pytest", "hypothesis", "playwright"]


def _pins() -> dict[str, str]:
    """requirements.txt: canonical name -> pinned version."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-e"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"requirements.txt: {line!r} is not an exact pin"
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def _project() -> dict:
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs Python 3.11 (tomllib)")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_requirements_pin_exactly_what_pyproject_declares():
    project = _project()
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = _pins()
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"pyproject.toml needs {req}: pin it in requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.txt pins {name}=={pins[name]}: {req}")
    assert set(pins) == {canonicalize_name(r.name) for r in declared}, (
        "requirements.txt pins a package pyproject.toml lacks")
    assert "-e ." in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()  # and the course itself


def test_tokenizer_is_a_core_dependency():
    """load_tiny returns the model's tokenizer, a Hugging Face tokenizers.Tokenizer underneath."""
    assert "tokenizers" in {canonicalize_name(Requirement(r).name) for r in _project()["dependencies"]}
    assert "from tokenizers import" in (ROOT / "course_lib" / "model" / "tokenizer.py").read_text(encoding="utf-8")


# What runs in the installed copy: every path it reads must be the wheel's, not this clone's.
_USE_THE_WHEEL = r'''
import sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
for name in sys.argv[2].split(","):   # as if the extras were not installed: the core dependencies alone must do
    sys.modules[name] = None          # import fails (ModuleNotFoundError), importlib.util.find_spec says None

import course_lib, kernels
from course_lib import load_tiny
from course_lib.grading import manifest
from course_lib.model import checkpoint, corpus
from course_lib.model.generate import greedy_generate
import course_lib.serving.engine  # noqa: F401  (the engine's imports)

for path in (course_lib.__file__, kernels.__file__, checkpoint.CHECKPOINTS, corpus.PATH, manifest.PATH):
    assert Path(path).resolve().is_relative_to(site), f"{path} is not in the installed wheel ({site})"
target, tokenizer = load_tiny("target")
draft, _ = load_tiny("draft")
text = corpus.load_text("validation")
ids = tokenizer.encode(text[:300])
assert tokenizer.decode(ids) == text[:300] and tokenizer.eos_id is not None
for model in (target, draft):
    assert len(greedy_generate(model, ids[:20], 4)) == 4
graded = manifest.load().notebooks
assert "02_paged_attention" in graded and all(graded.values())
print("wheel ok:", len(text), "characters of text,", len(graded), "graded notebooks")
'''


@pytest.mark.skipif(os.environ.get("COURSE_SKIP_PACKAGE_TEST") == "1", reason="COURSE_SKIP_PACKAGE_TEST=1")
def test_wheel_outside_the_clone_loads_the_models_corpus_tokenizer_and_manifest(tmp_path):
    # Build from a copy: building in place would leave build/ and *.egg-info in the clone.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for package in ("course_lib", "kernels"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run = dict(capture_output=True, text=True, timeout=300, check=True)
    # No network: the venv's setuptools builds it, nothing else is fetched.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp_path / "dist",
                    src], cwd=tmp_path, **run)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", site, wheel], cwd=tmp_path, **run)

    # -S: no site module, so no .pth file runs (the editable install's finder would map course_lib to a clone);
    # the interpreter's own site-packages give torch, triton, ...; cwd outside the clone.
    paths = [str(site), *dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": os.pathsep.join(paths)}
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-S", "-c", _USE_THE_WHEEL, str(site), ",".join(NOT_CORE)], cwd=work,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, textwrap.shorten(proc.stdout, 2000) + "\n" + proc.stderr[-4000:]
    assert "wheel ok" in proc.stdout
