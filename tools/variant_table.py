"""The broken variants of each exercise's check, counted by running the checks' tests: writes the table of
tests/README.md.

Every ``assert_caught(check(variant), ...)`` in tests/ (``tests/conftest.py``) counts one variant for the check it
ran: *written* is how many were submitted, *caught* how many the check failed with 0 points and the expected hint.
A variant that scores points fails its test, so after a green run the two agree; the table is regenerated, never
typed:

    python tools/variant_table.py           # runs tests/test_lesson0*.py (a few minutes on 2 cores), rewrites the table
    python tools/variant_table.py --check   # the same, and fails if tests/README.md's table differs
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "tests" / "README.md"
BEGIN, END = "<!-- BEGIN VARIANT TABLE (tools/variant_table.py) -->", "<!-- END VARIANT TABLE -->"


def count_variants(test_files: list[str]) -> dict[str, dict[str, int]]:
    """Run the tests with COURSE_VARIANT_TABLE set; what tests/conftest.py counted: {"written": ..., "caught": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "variants.json"
        env = {**os.environ, "COURSE_VARIANT_TABLE": str(out), "PYTHONPATH": str(ROOT)}
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *test_files],
                             cwd=ROOT, env=env)
        if run.returncode != 0:
            raise SystemExit(f"the tests failed (exit {run.returncode}): fix them before counting their variants")
        return json.loads(out.read_text())


def table(counts: dict[str, dict[str, int]]) -> str:
    manifest = json.loads((ROOT / "course_lib" / "grading" / "manifest.json").read_text())["notebooks"]
    rows = ["| notebook | exercise | check | broken variants written | caught |", "|---|---|---|---|---|"]
    total_written = total_caught = 0
    for notebook, checks in manifest.items():
        for check in checks:
            key = f"{notebook[:2]}:{check['name']}"        # tests/conftest.py counts by lesson and check name
            written = counts["written"].get(key, 0)
            caught = counts["caught"].get(key, 0)
            total_written, total_caught = total_written + written, total_caught + caught
            rows.append(f"| {notebook} | {check['name']} | `{check['check'].split(':')[1]}` | {written} | {caught} |")
    rows.append(f"| **all** | | | **{total_written}** | **{total_caught}** |")
    return "\n".join(rows)


def replace_table(text: str, new_table: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{new_table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if tests/README.md's table is out of date")
    parser.add_argument("tests", nargs="*", help="test files (default: tests/test_lesson0*.py)")
    args = parser.parse_args(argv)
    files = args.tests or sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_lesson0*.py"))
    text = README.read_text(encoding="utf-8")
    new = replace_table(text, table(count_variants(files)))
    if args.check:
        if new != text:
            print("tests/README.md: the variant table is out of date; run python tools/variant_table.py")
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    print(f"wrote the variant table of {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
