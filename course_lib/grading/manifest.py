"""What the grader grades: every exercise notebook's checks, their arguments and their points (``manifest.json``).

The manifest, not the notebook, says which checks a notebook has and what each is worth, so deleting a check
cell, calling a check of one's own or planting a file that redefines points changes nothing. An entry::

    "02_paged_attention": [{"name": "fork_cow", "check": "course_lib.grading.lesson02:check_fork_cow",
                            "args": ["fork", "append_slot_cow"], "points": 3}, ...]

``args`` are the expressions the grader evaluates in the notebook's namespace (the names the exercise defines).
``build(solutions)`` reads them from the solution notebooks' check calls and the points from each check's
``Checker(name, points=...)``; ``tools/make_manifest.py`` writes the file and ``tests/test_grading_manifest.py``
fails when it is stale.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

PATH = Path(__file__).resolve().parent / "manifest.json"
_KEY = re.compile(r"^\d\d_[a-z0-9_]+$|^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Check:
    name: str          # the exercise's name, as the Checker reports it
    check: str         # "module:function" of the check
    args: tuple[str, ...]  # expressions evaluated in the notebook's namespace
    points: float


@dataclass(frozen=True)
class Manifest:
    notebooks: dict[str, tuple[Check, ...]]
    folder: Path       # where a check module that is not a course module is looked for (tests' toy checks)

    def lesson_of(self, notebook: Path) -> str | None:
        """The manifest key of a notebook: its file name, or the longest key it starts with ("01_kv_cache-Copy1")."""
        stem = Path(notebook).stem
        keys = [k for k in self.notebooks if stem == k or stem.startswith(k)]
        return max(keys, key=len) if keys else None


def load(path: Path = PATH) -> Manifest:
    """Read and validate a manifest; a ValueError names the entry that is wrong."""
    path = Path(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not isinstance(raw.get("notebooks"), dict):
        raise ValueError(f"{path}: expected {{'notebooks': {{name: [checks]}}}}")
    notebooks = {}
    for key, entries in raw["notebooks"].items():
        if not _KEY.match(key) or not isinstance(entries, list):
            raise ValueError(f"{path}: notebook {key!r}: expected a name like '00_start_here' and a list of checks")
        checks, names = [], set()
        for e in entries:
            ok = (isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("check"), str)
                  and ":" in e["check"]
                  and isinstance(e.get("args"), list) and all(isinstance(a, str) for a in e["args"])
                  and isinstance(e.get("points"), (int, float)) and not isinstance(e["points"], bool)
                  and e["points"] > 0)
            if not ok or e["name"] in names:
                raise ValueError(f"{path}: notebook {key!r}: bad or repeated check entry {e!r}")
            names.add(e["name"])
            checks.append(Check(e["name"], e["check"], tuple(e["args"]), float(e["points"])))
        notebooks[key] = tuple(checks)
    return Manifest(notebooks, path.parent)


def dump(manifest: Manifest) -> str:
    """The file's text: one line per check."""
    def entry(c: Check) -> str:
        return json.dumps({**asdict(c), "args": list(c.args), "points": c.points if c.points % 1 else int(c.points)})

    blocks = [f' "{k}": [\n  ' + ",\n  ".join(entry(c) for c in v) + "\n ]"
              for k, v in sorted(manifest.notebooks.items())]
    return '{"notebooks": {\n' + ",\n".join(blocks) + "\n}}\n"


# ---------------------------------------------------------------- building it from the solutions
def check_calls(source: str) -> list[tuple[str, list[str]]]:
    """(function name, argument expressions) of every top-level ``check_*(...)`` call in a code cell."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    calls = []
    for stmt in tree.body:
        value = stmt.value if isinstance(stmt, (ast.Expr, ast.Assign)) else None
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id.startswith("check_"):
            calls.append((value.func.id, [ast.unparse(a) for a in value.args]))
    return calls


def _imported_from(nb) -> dict[str, str]:
    """function name -> module, from the notebook's ``from <module> import check_...`` statements."""
    found = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.update({a.asname or a.name: node.module for a in node.names if a.name.startswith("check_")})
    return found


def declared_checks(module_file: Path) -> dict[str, tuple[str, float]]:
    """check function -> (exercise name, points), from the ``Checker("name", points=N)`` inside each function."""
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    found = {}
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("check_")):
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Checker" and node.args:
                points = next((k.value.value for k in node.keywords if k.arg == "points"), 1)
                found[fn.name] = (node.args[0].value, float(points))
                break
    return found


def build(solutions: Path, module_root: Path) -> Manifest:
    """The manifest of every solution notebook in ``solutions`` (modules resolved under ``module_root``)."""
    import nbformat  # only here: reading a manifest (load) needs nothing beyond the standard library

    notebooks = {}
    for path in sorted(Path(solutions).glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        modules, checks = _imported_from(nb), []
        for cell in nb.cells:
            for fn, args in check_calls(cell.source) if cell.cell_type == "code" else []:
                module = modules[fn]
                name, points = declared_checks(module_root / (module.replace(".", "/") + ".py"))[fn]
                checks.append(Check(name, f"{module}:{fn}", tuple(args), points))
        if checks:
            notebooks[path.stem] = tuple(checks)
    return Manifest(notebooks, PATH.parent)
