"""The library's layers (course_lib/__init__.py's module map): an import never climbs a layer, packages of the same
layer do not import each other, no private name (``_x``) is imported from another package, and ``kernels/`` stands
alone: it imports nothing of course_lib, and importing it loads no model, tokenizer or plotting library."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bottom to top; kernels sits below everything
LAYERS = {"kernels": 0, "device": 1, "notebook": 2, "model": 2, "analysis": 3, "paging": 3, "quant": 4,
          "serving": 5, "experiments": 6, "parallel": 6, "review": 7, "grading": 8, "grade": 9}


def _package(module: str) -> str | None:
    """'course_lib.serving.engine' -> 'serving'; 'kernels.paged_attention' -> 'kernels'; others -> None."""
    parts = module.split(".")
    if parts[0] == "kernels":
        return "kernels"
    if parts[0] == "course_lib" and len(parts) > 1:
        return parts[1]
    return None


def _imports(path: Path):
    """(line, imported module, names) of every import in a file, at any depth (imports inside functions count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module, [a.name for a in node.names]


def _library_files():
    for top in ("course_lib", "kernels"):
        for path in sorted((ROOT / top).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            yield path, module.removesuffix(".__init__")


def test_every_package_has_a_layer():
    packages = {_package(m) for _, m in _library_files()} - {None, "__init__"}
    assert packages <= set(LAYERS), f"add {packages - set(LAYERS)} to LAYERS (and to course_lib/__init__.py's map)"


def test_no_import_climbs_a_layer_or_crosses_a_layer_sideways():
    bad = []
    for path, module in _library_files():
        here = _package(module)
        if here in (None, "__init__") or module == "course_lib":
            continue
        for line, target, names in _imports(path):
            there = _package(target)
            if there is None or there == here:
                if there == "__init__" or target == "course_lib":  # `from course_lib import X`: X is above all
                    there = "course_lib"
                else:
                    continue
            if there == "course_lib":
                resolved = {_package(f"course_lib.{n}") for n in names} - {None}
                there = max(resolved, key=LAYERS.get) if resolved and resolved <= set(LAYERS) else "model"
                if there == here:
                    continue
            if LAYERS[there] >= LAYERS[here]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} ({here}, layer {LAYERS[here]}) imports "
                           f"{target} ({there}, layer {LAYERS[there]})")
    assert not bad, "imports that climb (or cross) a layer:\n" + "\n".join(bad)


def test_no_private_name_is_imported_from_another_package():
    bad = []
    for path, module in _library_files():
        here = _package(module)
        for line, target, names in _imports(path):
            there = _package(target)
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if there is not None and there != here and private:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {', '.join(private)} from {target}")
    assert not bad, "private names used across packages (make them public, or move the code):\n" + "\n".join(bad)


def test_kernels_import_nothing_of_course_lib():
    bad = [f"{path.relative_to(ROOT)}:{line}: {target}"
           for path, module in _library_files() if module.startswith("kernels")
           for line, target, _ in _imports(path) if target.split(".")[0] == "course_lib"]
    assert not bad, "kernels/ must stand alone:\n" + "\n".join(bad)


@pytest.mark.parametrize("statement", ["import kernels", "import course_lib"])
def test_importing_stays_light(statement):
    heavy = ["transformers", "safetensors", "tokenizers", "matplotlib", "course_lib.model.llama", "ipywidgets"]
    code = f"import sys; {statement}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "", f"`{statement}` loaded {out.strip()}"
