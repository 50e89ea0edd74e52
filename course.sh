#!/usr/bin/env bash
# The course's two commands (see README.md):
#   bash course.sh lab    set up .venv and open the course in JupyterLab at lesson 00
#   bash course.sh test   set up .venv and run every test: unit tests, the lessons in JupyterLab in a headless
#                         Chromium (skipped when /usr/bin/chromium is absent), the grader over solutions/ (must
#                         be 100%) and exercises/ (nothing attempted), and nbval over solutions/ (and over
#                         notebooks/ where the browser test did not run them)
# Arguments after `lab` go to JupyterLab (e.g. `bash course.sh lab --no-browser --port=8890`).
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
    # root_dir: the whole course (notebooks/, exercises/, solutions/) in the file browser, not only notebooks/
    # Jupyter refuses to run as root unless told: containers, Colab-like machines and CI run as root
    root=(); [ "$(id -u)" = 0 ] && root=(--allow-root)
    exec .venv/bin/python -m jupyterlab "${root[@]}" --ServerApp.root_dir=. "${@:2}" notebooks/00_start_here.ipynb ;;
  test)
    setup
    py=.venv/bin/python
    echo "== unit tests, grader tests, exercises-in-sync test"
    $py -m pytest -q tests --ignore=tests/browser
    echo "== the lessons as a learner sees them: JupyterLab in headless Chromium (skipped without /usr/bin/chromium)"
    $py -m pytest -q -rs tests/browser
    # Where that test ran, it executed every lesson top to bottom and failed on any cell's error, as nbval would:
    # nbval then takes solutions/ only, so the lessons run once (COURSE_BROWSER_NOTEBOOKS limits the browser test).
    lessons=notebooks/
    if [ -x "${COURSE_CHROMIUM:-/usr/bin/chromium}" ] && [ -z "${COURSE_BROWSER_NOTEBOOKS:-}" ] \
        && $py -c "import playwright.sync_api" 2>/dev/null; then
      lessons=
    fi
    echo "== the grader over solutions/ (every check must pass)"
    $py -m course_lib.grade solutions/ --require-full
    echo "== the grader over exercises/ (every check must be 'not attempted')"
    $py -m course_lib.grade exercises/ --expect-none-attempted
    echo "== nbval: every ${lessons:+lesson and }solution notebook, top to bottom"
    $py -m pytest -q --nbval-lax --nbval-current-env $lessons solutions/ ;;
  *)
    echo "usage: bash course.sh lab | test" >&2
    exit 2 ;;
esac
