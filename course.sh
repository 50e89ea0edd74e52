#!/usr/bin/env bash
# The course's commands (see README.md):
#   bash course.sh lab    set up .venv and open the course in JupyterLab at lesson 00
#   bash course.sh test   set up .venv, lint the code and the notebooks (ruff), and run every test: unit tests,
#                         the lessons in JupyterLab in a headless Chromium (skipped when /usr/bin/chromium is
#                         absent), the grader over solutions/ (must be 100%) and exercises/ (nothing attempted),
#                         and nbval over solutions/ (and over notebooks/ where the browser test did not run them);
#                         of the Chinese edition (README.zh.md), nbval over one lesson: its code cells are the English
#                         ones (tests/test_i18n.py), so grading solutions/zh/ would run the same code a second time
#   bash course.sh lessons   set up .venv and run nbval over notebooks/ only: every lesson, top to bottom
# `--loaded` after `test` or `lessons` runs the lessons on a busy CPU: COURSE_LOAD busy-looping processes (default 2)
# run beside everything after the unit tests (browser test, command tests, graders, nbval) and are stopped at exit,
# however it ends. A lesson asserts counts (FLOPs, bytes, steps, tokens), never a wall-clock time, so it must pass that
# way too. COURSE_LOAD=N without `--loaded` does the same with N processes. CI runs `test` unloaded (.ci/run says
# why); the loaded runs are made on demand.
# Arguments after `lab` go to JupyterLab (e.g. `bash course.sh lab --no-browser --port=8890`); `lab --zh` opens the
# Chinese edition's lesson 00 (README.zh.md).
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

# The lessons on a busy CPU: start_load N starts N busy-looping processes (pure shell: no I/O, one core each) and
# stops them when this script exits, on success, failure or Ctrl-C. Should the script be killed outright (kill -9,
# a CI timeout), each loop sees its parent gone within a fraction of a second and ends by itself.
load_pids=()
stop_load() {
  if [ "${#load_pids[@]}" -gt 0 ]; then
    kill "${load_pids[@]}" 2>/dev/null || true
    wait "${load_pids[@]}" 2>/dev/null || true
    echo "== load stopped (${#load_pids[@]} busy processes)"
    load_pids=()
  fi
}
start_load() {
  local n=$1 i
  [ "$n" -gt 0 ] || return 0
  trap stop_load EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  for ((i = 0; i < n; i++)); do
    ( while kill -0 $$ 2>/dev/null; do for ((j = 0; j < 100000; j++)); do :; done; done ) &
    load_pids+=($!)
  done
  echo "== load: $n busy processes (pids ${load_pids[*]}) share the CPU with the lessons until this command ends"
}

# COURSE_LOAD (default 0; `--loaded` makes the default 2): how many busy processes run beside the lessons.
load=${COURSE_LOAD:-0}
for arg in "${@:2}"; do
  case "$arg" in
    --loaded) load=${COURSE_LOAD:-2} ;;
    *) [ "${1:-}" = lab ] || { echo "unknown argument: $arg (usage: bash course.sh test|lessons [--loaded])" >&2; exit 2; } ;;
  esac
done
if ! [[ "$load" =~ ^[0-9]+$ ]]; then
  echo "COURSE_LOAD must be a number of busy processes, got '$load'" >&2
  exit 2
fi

# nbval runs each notebook in a fresh kernel; its 60 s default for the kernel to start is too short on a busy CPU
# (seen: a kernel that did not answer within 60 s at load average 8 on 2 cores)
nbval=(--nbval-lax --nbval-current-env --nbval-kernel-startup-timeout=300)
# pytest recurses into folders: the Chinese edition (notebooks/zh/, solutions/zh/) has the same code, run once below
english=(--ignore=notebooks/zh --ignore=solutions/zh --ignore=exercises/zh)

case "${1:-}" in
  lab)
    setup
    # root_dir: the whole course (notebooks/, exercises/, solutions/) in the file browser, not only notebooks/
    # Jupyter refuses to run as root unless told: containers, Colab-like machines and CI run as root
    root=(); [ "$(id -u)" = 0 ] && root=(--allow-root)
    # `lab --zh`: the Chinese edition (notebooks/zh/, generated from the English ones by tools/i18n.py)
    first=notebooks/00_start_here.ipynb args=()
    for arg in "${@:2}"; do
      if [ "$arg" = --zh ]; then first=notebooks/zh/00_start_here.ipynb; else args+=("$arg"); fi
    done
    exec .venv/bin/python -m jupyterlab "${root[@]}" --ServerApp.root_dir=. "${args[@]}" "$first" ;;
  test)
    setup
    py=.venv/bin/python
    # pyproject.toml's [tool.ruff] says what is checked; `ruff check --fix .` repairs the simple findings
    echo "== lint: ruff check . (code and notebooks)"
    $py -m ruff check .
    echo "== unit tests, grader tests, exercises-in-sync test (two processes: pytest-xdist)"
    # two workers halve the time on a 2-core CPU (each test is single-threaded: the one_thread fixture); more would
    # only share the same cores, and each starts its own Jupyter kernels for the grader's tests. The tests marked
    # `command` (a benchmark's --quick, the grader's command line) run later, beside the browser test.
    $py -m pytest -q -n 2 tests --ignore=tests/browser -m "not command"
    start_load "$load"
    # Where the browser test runs, it executes every lesson top to bottom and fails on any cell's error, as nbval
    # would: nbval then takes solutions/ only, so the lessons run once (COURSE_BROWSER_NOTEBOOKS limits the browser
    # test).
    lessons=notebooks/
    if [ -x "${COURSE_CHROMIUM:-/usr/bin/chromium}" ] && [ -z "${COURSE_BROWSER_NOTEBOOKS:-}" ] \
        && $py -c "import playwright.sync_api" 2>/dev/null; then
      lessons=
    fi
    # The command tests, the graders and nbval run beside the browser test, which mostly waits on the browser: on
    # two cores the two chains take about the time of the longer one. Their output is printed when both are done.
    checks_log=$(mktemp)
    (
      set -e
      echo "== the tests that run the course's commands end to end (pytest -m command)"
      $py -m pytest -q tests --ignore=tests/browser -m command
      echo "== the grader over solutions/ (every check must pass)"
      $py -m course_lib.grade solutions/ --require-full
      echo "== the grader over exercises/ (every check must be 'not attempted')"
      $py -m course_lib.grade exercises/ --expect-none-attempted
      echo "== nbval: every ${lessons:+lesson and }solution notebook, and one Chinese lesson, top to bottom"
      $py -m pytest -q "${nbval[@]}" "${english[@]}" $lessons solutions/
      $py -m pytest -q "${nbval[@]}" notebooks/zh/09_pipeline_parallelism.ipynb
    ) > "$checks_log" 2>&1 &
    checks=$!
    echo "== the lessons as a learner sees them: JupyterLab in headless Chromium (skipped without /usr/bin/chromium)"
    echo "   (beside it: the command tests, the graders and nbval, printed below when both are done)"
    browser_rc=0
    $py -m pytest -q -rs tests/browser || browser_rc=$?
    checks_rc=0
    wait "$checks" || checks_rc=$?
    cat "$checks_log"
    rm -f "$checks_log"
    if [ "$browser_rc" != 0 ] || [ "$checks_rc" != 0 ]; then
      echo "FAILED: browser test exit $browser_rc, command tests, graders and nbval exit $checks_rc" >&2
      exit 1
    fi ;;
  lessons)
    setup
    start_load "$load"
    echo "== nbval: every lesson, top to bottom"
    .venv/bin/python -m pytest -q "${nbval[@]}" "${english[@]}" notebooks/ ;;
  *)
    echo "usage: bash course.sh lab | test [--loaded] | lessons [--loaded]" >&2
    exit 2 ;;
esac
