"""The lessons as a learner meets them: `bash course.sh lab`, JupyterLab in a real (headless) Chromium, Run All.

Covers, automatically as lessons land:
- every lesson notebook in notebooks/ (all of it): Run > Run All Cells, then every code cell ran and no cell shows
  an error; every image output renders as a loaded <img> (and a lesson that plots shows at least one); every
  `explorer(...)` / `interact(...)` / `interactive(...)` explorer renders as controls, and dragging its first slider
  (no slider: picking another option of its first dropdown) re-runs it: its output changes, without an error;
- one exercise notebook, the first of exercises/ (all of it): Run All, then every check cell (`check_x(x)`)
  shows the grader's feedback, "not attempted" for a stub.
Lesson 00 is opened at exactly the URL that `bash course.sh lab` opens; the others in a workspace of their own.
Autosave is off, and the test fails if the page asks the server to write a file. It fails within 30 s, saying why,
when cells wait while the kernel sits idle (a kernel that stopped reading requests: ipykernel 7.0-7.3,
ipython/ipykernel#1554; 7.4.0 fixes it).
Runtime: JupyterLab's start (~5 s), then for each notebook its Run All time (about its nbval time) plus ~10 s
(kernel start, the explorers, screenshots): 4.5 min for 10 lessons and 1 exercise notebook on a 2-core CPU, of
which 2.6 min is the lessons' own Run All. So that the lessons run once, `bash course.sh test` leaves notebooks/ out
of nbval where this test runs. COURSE_BROWSER_NOTEBOOKS="00_start_here 01_kv_cache" limits the lessons to those.
Skipped, with the reason, when Chromium ($COURSE_CHROMIUM, default /usr/bin/chromium) or playwright is absent.
Screenshots (a plot per cell with images, each explorer before/after its slider moved, each check cell, each
failing cell) and the JupyterLab log go to tests/browser/artifacts/ (printed at the end of the run).
"""
import os
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("COURSE_CHROMIUM", "/usr/bin/chromium")  # the same default as conftest.py
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"browser test skipped: no Chromium at {CHROMIUM} (install Debian's package: "
                f"apt-get install chromium; or point COURSE_CHROMIUM at one)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="browser test skipped: playwright is not installed in .venv "
                    "(pip install -r requirements.txt)")

NOTEBOOK_TIMEOUT_S = int(os.environ.get("COURSE_BROWSER_NOTEBOOK_TIMEOUT_S", "300"))
KERNEL_TIMEOUT_S = 120      # opening a notebook starts its kernel: ~5-20 s on a busy 2-core CPU
WIDGET_TIMEOUT_S = 60       # one explorer update: the kernel re-runs the function and redraws
STALL_S = 30                # cells waiting ([*]) while the kernel is idle this long: the kernel is not reading
only = os.environ.get("COURSE_BROWSER_NOTEBOOKS", "").split()
LESSONS = [p.relative_to(REPO).as_posix() for p in sorted((REPO / "notebooks").glob("*.ipynb"))
           if not only or p.stem in only]
EXERCISE = ([p.relative_to(REPO).as_posix() for p in sorted((REPO / "exercises").glob("*.ipynb"))] or [None])[0]

# The notebook's model, read through window.jupyterapp (exposed by --LabApp.expose_app_in_browser). Each cell's
# DOM node gets data-course-cell=<index> so that the test can look at (and screenshot) what the learner sees.
STATE_JS = """(path) => {
  const app = window.jupyterapp;
  if (!app || !app.shell) return {ready: false, why: 'JupyterLab is still loading'};
  let panel = null;
  for (const w of app.shell.widgets('main')) if (w.context && w.context.path === path) panel = w;
  if (!panel || !panel.context.isReady) return {ready: false, why: 'the notebook is not loaded yet'};
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = [], list = panel.content.model.cells;
  for (let i = 0; i < list.length; i++) {
    const c = list.get(i), cell = {type: c.type, source: c.sharedModel.getSource(), outputs: []};
    const widget = panel.content.widgets[i];
    if (widget) { widget.node.setAttribute('data-course-cell', String(i));
                  cell.prompt = widget.promptNode ? widget.promptNode.textContent : ''; }
    if (c.type === 'code') {
      cell.count = c.executionCount;
      for (let j = 0; j < c.outputs.length; j++) {
        const o = c.outputs.get(j).toJSON();
        cell.outputs.push({type: o.output_type, name: o.name || null, ename: o.ename || null,
                           evalue: o.evalue || null, text: o.text ? [].concat(o.text).join('') : null,
                           mimes: o.data ? Object.keys(o.data) : []});
      }
    }
    cells.push(cell);
  }
  return {ready: true, kernel: kernel ? kernel.status : 'no kernel',
          connection: kernel ? kernel.connectionStatus : 'none', cells};
}"""
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml")
# explorer(f, ...) (course_lib.notebook.explorer, what the lessons use), interact(f, ...), interactive(f, ...)
EXPLORER_CALL = re.compile(r"\b(explorer|interact(ive)?(\.options\([^)]*\))?)\(")
ERROR_OUTPUT = '.jp-OutputArea-child:has([data-mime-type="application/vnd.jupyter.stderr"])'  # tracebacks too


def _wait(what, timeout_s, poll, interval_s=0.5):
    """Poll `poll()` until it returns a truthy value; fail naming `what` (a str or a callable giving the reason)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = poll()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what() if callable(what) else what}")
        time.sleep(interval_s)


def _code_cells(state):
    return [(i, c) for i, c in enumerate(state["cells"]) if c["type"] == "code"]


def _snap(page, shots, name, locator):
    path = shots / name
    try:
        if locator is None:
            page.screenshot(path=str(path), timeout=20_000)
        else:
            locator.scroll_into_view_if_needed(timeout=10_000)
            locator.screenshot(path=str(path), timeout=20_000)
    except Exception as err:  # a screenshot is evidence, not a check: never hide the real failure behind it
        return f"(no screenshot {name}: {type(err).__name__})"
    return str(path)


class Notebook:
    """One notebook open in its own browser page."""

    def __init__(self, browser, lab, path, url, shots):
        self.lab, self.path, self.shots = lab, path, shots
        self.stem = path.removesuffix(".ipynb").replace("/", "-")  # notebooks-00_start_here
        self.page = browser.new_page(viewport={"width": 1400, "height": 1200})
        self.js_errors = []
        self.page.on("pageerror", lambda err: self.js_errors.append(str(err)))
        # Autosave is off: the test must leave the repository's notebooks as they are. (Opening a notebook the
        # first time copies it to .ipynb_checkpoints/, git-ignored: POST .../checkpoints is not a save.)
        self.saves = []
        self.page.on("request", lambda r: r.method in ("PUT", "PATCH", "POST", "DELETE") and "/api/contents/" in r.url
                     and not r.url.split("?")[0].endswith("/checkpoints")
                     and self.saves.append(f"{r.method} {r.url.split('?')[0]}"))
        self.page.goto(url, wait_until="domcontentloaded", timeout=60_000)

    def state(self):
        return self.page.evaluate(STATE_JS, self.path)

    def cell(self, i):
        return self.page.locator(f'.jp-Notebook [data-course-cell="{i}"]')

    def shot(self, name, locator=None):
        return _snap(self.page, self.shots, f"{self.stem}__{name}.png", locator)

    def wait_kernel_idle(self):
        def why():
            s = self.state()
            return (f"the kernel of {self.path} to be idle ({s.get('why') or s['kernel']}, connection "
                    f"{s.get('connection')}); screenshot {self.shot('kernel_timeout')}")
        _wait(why, KERNEL_TIMEOUT_S, lambda: (s := self.state())["ready"] and s["kernel"] == "idle"
              and s["connection"] == "connected")

    def run_all(self):
        """Run > Run All Cells from the menu bar; wait until every cell ran, or one failed, and the kernel is idle.

        Fails fast when cells wait ([*]) while the kernel stays idle for STALL_S: the kernel stopped reading its
        requests. ipykernel 7.0-7.3 do that now and then right after a websocket connects (ipython/ipykernel#1554,
        fixed in 7.4.0): the learner's cell never runs until the page is reloaded.
        """
        time.sleep(1.0)  # a learner reads for a moment before running: the kernel has just become idle
        self.page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        self.page.locator(".lm-Menu-item", has=self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(
            r"^Run All Cells$"))).click(timeout=10_000)
        started, last, progress = time.monotonic(), {}, (None, time.monotonic())

        def running():
            return [i for i, c in _code_cells(last["state"]) if "*" in c.get("prompt", "")]

        def finished():
            s = last["state"] = self.state()
            if s["kernel"] in ("dead", "restarting", "autorestarting"):
                pytest.fail(f"the kernel of {self.path} died ({s['kernel']}) during Run All, running cell "
                            f"{running()[:1]}; screenshot {self.shot('kernel_died')}")
            code = _code_cells(s)
            ran_all = all(c["count"] is not None for _, c in code)
            failed = any(o["type"] == "error" for _, c in code for o in c["outputs"])
            return s["kernel"] == "idle" and (ran_all or failed)

        while not (finished() and (time.sleep(1.0) or finished())):
            state, now = last["state"], time.monotonic()
            done = (sum(c["count"] is not None for _, c in _code_cells(state)), state["kernel"])
            if done != progress[0] or state["kernel"] != "idle" or not running():
                progress = (done, now)
            elif now - progress[1] > STALL_S:
                pytest.fail(f"Run All of {self.path} stalled: cell {running()[0]} shows [*] while the kernel has been "
                            f"idle for {STALL_S} s, so the kernel never read the request (ipykernel 7.0-7.3, "
                            f"ipython/ipykernel#1554: pin ipykernel>=7.4.0); screenshot "
                            f"{self.shot('run_all_stalled', self.cell(running()[0]))}")
            if now - started > NOTEBOOK_TIMEOUT_S:
                where = f"cell {running()[0]} is still running" if running() else "no cell shows [*]"
                pytest.fail(f"timed out after {NOTEBOOK_TIMEOUT_S} s waiting for Run All of {self.path} to finish "
                            f"({where}, kernel {state['kernel']}); screenshot "
                            f"{self.shot('run_all_timeout', self.cell(running()[0]) if running() else None)}")
            time.sleep(1.0)
        return time.monotonic() - started, last["state"]

    def close(self):
        self.page.close()
        self.lab.shutdown_kernels()  # one kernel at a time on a 2-core CPU
        assert not self.saves, f"JupyterLab wrote to the repository while the test ran {self.path}: {self.saves}"


def _check_ran_without_errors(nb, state):
    problems = []
    for i, c in _code_cells(state):
        for o in c["outputs"]:
            if o["type"] == "error":
                problems.append(f"cell {i} shows {o['ename']}: {o['evalue']}\n  source: {c['source'][:200]!r}\n"
                                f"  screenshot: {nb.shot(f'cell{i:02d}_error', nb.cell(i).locator(ERROR_OUTPUT).last)}")
    not_run = [i for i, c in _code_cells(state) if c["count"] is None]
    if not_run and not problems:
        problems.append(f"cells {not_run} did not run after Run All Cells")
    assert not problems, f"{nb.path} in JupyterLab:\n" + "\n".join(problems)


def _stderr_notes(nb, state):
    return [f"{nb.path} cell {i} writes to stderr (the learner sees a red box): {o['text'].strip()[:160]!r}"
            for i, c in _code_cells(state) for o in c["outputs"] if o["type"] == "stream" and o["name"] == "stderr"]


def _check_images(nb, state):
    shown, problems = 0, []
    for i, c in _code_cells(state):
        want = sum(any(m in IMAGE_MIMES for m in o["mimes"]) for o in c["outputs"])
        if not want:
            continue
        imgs = nb.cell(i).locator(".jp-OutputArea-output img")
        imgs.first.scroll_into_view_if_needed(timeout=10_000)
        loaded = imgs.evaluate_all("els => els.map(e => e.complete && e.naturalWidth > 0)")
        shot = nb.shot(f"cell{i:02d}_plot", nb.cell(i).locator(".jp-Cell-outputWrapper"))
        if len(loaded) < want or not all(loaded):
            problems.append(f"cell {i}: {want} image outputs, {len(loaded)} <img> shown, loaded: {loaded} ({shot})")
        shown += sum(loaded)
    plots = any("plt." in c["source"] for _, c in _code_cells(state))
    assert not problems, f"{nb.path}: plots do not render as images:\n" + "\n".join(problems)
    assert shown or not plots, f"{nb.path} calls matplotlib but shows no image; screenshot {nb.shot('no_images')}"
    return shown


def _output_snapshot(output):
    """The explorer's output: its text (textContent: innerText is empty while a cell is off screen) and a hash of
    each image."""
    return output.evaluate("""el => el.textContent + '|' + [...el.querySelectorAll('img')].map(img => {
        let h = 0; for (let k = 0; k < img.src.length; k++) h = (h * 31 + img.src.charCodeAt(k)) | 0;
        return img.src.length + ':' + h; }).join(',')""")


def _move_first_control(nb, box, where):
    """Drag the explorer's first slider to 70% of its track (or, without a slider, pick another option of its first
    dropdown) as a learner would; return a function that reads the control's value."""
    slider, select = box.locator(".widget-slider").first, box.locator("select").first
    if slider.count():
        readout = slider.locator(".widget-readout")
        value_before = readout.text_content()
        handle, track = slider.locator(".noUi-handle"), slider.locator(".noUi-base")
        handle.scroll_into_view_if_needed()
        h, t = handle.bounding_box(), track.bounding_box()
        y = h["y"] + h["height"] / 2
        nb.page.mouse.move(h["x"] + h["width"] / 2, y)
        nb.page.mouse.down()
        nb.page.mouse.move(t["x"] + 0.7 * t["width"], y, steps=8)
        nb.page.mouse.up()
        _wait(f"the slider of {where} to move (its readout still shows {value_before!r})",
              10, lambda: readout.text_content() != value_before)
        return readout.text_content
    assert select.count(), f"{where}: the explorer has no slider or dropdown ({nb.shot('explorer_controls', box)})"
    options = select.locator("option").all_text_contents()
    current = select.evaluate("el => el.selectedIndex")
    select.select_option(index=(current + 1) % len(options))
    return lambda: select.evaluate("el => el.options[el.selectedIndex].text")


def _check_explorers(nb, state):
    """Each interact(...) cell shows controls; moving its first slider changes the explorer's output."""
    cells = [i for i, c in _code_cells(state) if EXPLORER_CALL.search(c["source"])]
    for i in cells:
        where, box = f"the explorer of cell {i} of {nb.path}", nb.cell(i).locator(".widget-interact")
        _wait(lambda: f"{where} to render as controls (ipywidgets); screenshot "
                      f"{nb.shot(f'cell{i:02d}_explorer_missing', nb.cell(i))}",
              WIDGET_TIMEOUT_S, lambda: box.count() > 0)
        output = box.locator(".widget-output").first
        box.scroll_into_view_if_needed()
        before = _output_snapshot(output)
        nb.shot(f"cell{i:02d}_explorer_before", box)
        value = _move_first_control(nb, box, where)

        def settled():
            snap = _output_snapshot(output)
            if snap == before or nb.state()["kernel"] != "idle":
                return False
            time.sleep(1.0)
            return _output_snapshot(output) == snap and nb.state()["kernel"] == "idle"
        _wait(lambda: f"{where} to change its output after its control moved to {value()} (kernel "
                      f"{nb.state()['kernel']}; idle means it never read the update: ipython/ipykernel#1554, fixed "
                      f"in 7.4.0); screenshot {nb.shot(f'cell{i:02d}_explorer_after', box)}", WIDGET_TIMEOUT_S, settled)
        shot = nb.shot(f"cell{i:02d}_explorer_after", box)
        errors = output.locator('[data-mime-type="application/vnd.jupyter.stderr"]')
        assert not errors.count(), (f"{where} shows an error (or stderr) after its control moved to {value()}: "
                                    f"{errors.first.text_content()[-500:]} ({shot})")
        loaded = output.locator("img").evaluate_all("els => els.map(e => e.complete && e.naturalWidth > 0)")
        assert all(loaded), f"{where}: its plot did not load after its control moved ({shot})"
    return len(cells)


def test_lab_command_opens_lesson_00(lab):
    assert lab.open_url.startswith(lab.base_url + "/lab/tree/notebooks/00_start_here.ipynb?"), (
        f"`bash course.sh lab` should open lesson 00 at the root of the course; it opens {lab.open_url}")


@pytest.mark.parametrize("path", LESSONS, ids=[Path(p).stem for p in LESSONS])
def test_lesson_runs_in_jupyterlab(path, lab, browser, artifacts_dir, report):
    url = lab.open_url if path == "notebooks/00_start_here.ipynb" else lab.url(path, Path(path).stem)
    t0 = time.monotonic()
    nb = Notebook(browser, lab, path, url, artifacts_dir)
    try:
        nb.wait_kernel_idle()
        t_open = time.monotonic() - t0
        seconds, state = nb.run_all()
        nb.shot("after_run_all")
        t1 = time.monotonic()
        _check_ran_without_errors(nb, state)
        images = _check_images(nb, state)
        explorers = _check_explorers(nb, state)
        report.append(f"{path}: Run All {seconds:.0f} s, {len(_code_cells(state))} code cells, no errors, "
                      f"{images} images, {explorers} explorers react to their slider (open {t_open:.0f} s, "
                      f"checks {time.monotonic() - t1:.0f} s)")
        report.extend(_stderr_notes(nb, state))
        if nb.js_errors:
            report.append(f"{path}: {len(nb.js_errors)} JavaScript errors in the page, first: {nb.js_errors[0][:200]}")
    finally:
        nb.close()


@pytest.mark.skipif(EXERCISE is None, reason="no exercise notebook in exercises/")
def test_exercise_check_cells_show_feedback(lab, browser, artifacts_dir, report):
    nb = Notebook(browser, lab, EXERCISE, lab.url(EXERCISE, "exercise"), artifacts_dir)
    try:
        nb.wait_kernel_idle()
        seconds, state = nb.run_all()
        _check_ran_without_errors(nb, state)
        checks = [i for i, c in _code_cells(state) if re.fullmatch(r"check_\w+\(.*\)\s*", c["source"].strip())]
        assert checks, f"{EXERCISE} has no check cell (`check_x(x)`)"
        for i in checks:
            shot = nb.shot(f"cell{i:02d}_check", nb.cell(i))
            shown = nb.cell(i).locator(".jp-Cell-outputWrapper").text_content()
            assert "not attempted" in shown, (f"{EXERCISE} cell {i} ({state['cells'][i]['source'].strip()}) should "
                                              f"show 'not attempted' for the stub; it shows {shown!r} ({shot})")
        report.append(f"{EXERCISE}: Run All {seconds:.0f} s, {len(checks)} check cells show 'not attempted'")
        report.extend(_stderr_notes(nb, state))
    finally:
        nb.close()
