"""Write course_lib/grading/manifest.json from the solution notebooks' check calls and the checks' points.

    python tools/make_manifest.py           # write it
    python tools/make_manifest.py --check   # exit 1 if the committed file is stale (tests do this too)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script: the course's root on the path

from course_lib.grading import manifest

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    text = manifest.dump(manifest.build(ROOT / "solutions", ROOT))
    if "--check" in argv:
        stale = manifest.PATH.read_text(encoding="utf-8") != text
        state = "stale: run python tools/make_manifest.py" if stale else "up to date"
        print(f"{manifest.PATH.relative_to(ROOT)} is {state}")
        return int(stale)
    manifest.PATH.write_text(text, encoding="utf-8")
    print(f"wrote {manifest.PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
