#!/usr/bin/env bash
# The course's two commands (see README.md):
#   bash course.sh lab    set up .venv and open the course in JupyterLab at lesson 00
#   bash course.sh test   set up .venv and run every test: unit tests, the grader over solutions/ (must be
#                         100%) and exercises/ (nothing attempted), and nbval over notebooks/ and solutions/
# Setup creates .venv with $PYTHON (default python3, 3.10 or newer) and installs requirements.txt into it;
# it runs again only when requirements.txt or pyproject.toml change.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

setup() {
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  local want stamp=.venv/.installed-requirements
  want=$(cat requirements.txt pyproject.toml | sha256sum)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -r requirements.txt
    echo "$want" > "$stamp"
  fi
}

case "${1:-}" in
  lab)
    setup
    # Jupyter refuses to run as root unless told: containers, Colab-like machines and CI run as root
    root=(); [ "$(id -u)" = 0 ] && root=(--allow-root)
    # root_dir: the whole course (notebooks/, exercises/, solutions/) in the file browser, not only notebooks/
    exec .venv/bin/python -m jupyterlab "${root[@]}" --ServerApp.root_dir=. notebooks/00_start_here.ipynb ;;
  test)
    setup
    py=.venv/bin/python
    echo "== unit tests, grader tests, exercises-in-sync test"
    $py -m pytest -q tests
    echo "== the grader over solutions/ (every check must pass)"
    $py -m course_lib.grade solutions/ --require-full
    echo "== the grader over exercises/ (every check must be 'not attempted')"
    $py -m course_lib.grade exercises/ --expect-none-attempted
    echo "== nbval: every lesson and solution notebook, top to bottom"
    $py -m pytest -q --nbval-lax --nbval-current-env notebooks/ solutions/ ;;
  *)
    echo "usage: bash course.sh lab | test" >&2
    exit 2 ;;
esac
