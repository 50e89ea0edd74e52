"""Fixtures of the browser test: JupyterLab started by `bash course.sh lab`, and a headless Chromium.

The server runs with its own settings, workspaces and runtime folders (in a temporary folder), autosave off
(running the lessons must not write outputs into the repository's notebooks), and no network calls (no news
feed, no update check). Screenshots go to tests/browser/artifacts/ (or $COURSE_BROWSER_ARTIFACTS).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("COURSE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("COURSE_BROWSER_ARTIFACTS", Path(__file__).parent / "artifacts")).resolve()
CHROMIUM_FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-sandbox", "--disable-dev-shm-usage"]
SERVER_START_TIMEOUT_S = 120  # `course.sh lab` imports jupyterlab and its extensions: 5-20 s on a busy 2-core CPU

# User settings a learner could set themselves in Settings > Settings Editor.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


class Lab:
    """A running JupyterLab server: its URLs, its log, and its REST API (authenticated by the token)."""

    def __init__(self, proc, base_url, token, open_url, log_path):
        self.proc, self.base_url, self.token, self.open_url, self.log_path = proc, base_url, token, open_url, log_path

    def url(self, path, workspace=None):
        """The URL that opens `path` (relative to the repository) in a fresh workspace."""
        ws = f"/workspaces/{workspace}" if workspace else ""
        return f"{self.base_url}/lab{ws}/tree/{path}?token={self.token}"

    def api(self, method, route):
        req = urllib.request.Request(f"{self.base_url}/api/{route}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self):
        for kernel in self.api("GET", "kernels"):
            self.api("DELETE", f"kernels/{kernel['id']}")

    def log_tail(self, n=40):
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def artifacts_dir():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    return ARTIFACTS


@pytest.fixture(scope="session")
def lab(tmp_path_factory, artifacts_dir):
    """`bash course.sh lab` (the README's first command) with a free port, a token and no browser of its own."""
    tmp = tmp_path_factory.mktemp("jupyterlab")
    for name, value in LAB_SETTINGS.items():
        (tmp / "settings" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "settings" / name).write_text(json.dumps(value))
    # A developer's own ~/.jupyter config (a password, disabled extensions) must not change what is tested.
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               PYTHONUNBUFFERED="1")
    port, token = _free_port(), "course-browser-test"
    args = ["--no-browser", "--ServerApp.ip=127.0.0.1", f"--port={port}", "--port-retries=0",
            f"--IdentityProvider.token={token}", "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.expose_app_in_browser=True"]           # window.jupyterapp: read cell outputs from the model
    log_path = artifacts_dir / "jupyterlab.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(["bash", "course.sh", "lab", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    lab = Lab(proc, f"http://127.0.0.1:{port}", token, None, log_path)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            # The server writes the page it would open in the learner's browser (lesson 00) into this file.
            opened = list((tmp / "runtime").glob("jpserver-file-to-run-*-open.html"))
            if opened:
                try:
                    lab.api("GET", "status")
                    text = opened[0].read_text()
                    lab.open_url = text.split('content="1;url=', 1)[1].split('"', 1)[0]
                    break
                except (OSError, IndexError):
                    pass
            if proc.poll() is not None:
                pytest.fail(f"`bash course.sh lab` exited with code {proc.returncode} before serving; "
                            f"its log ({log_path}):\n{lab.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {SERVER_START_TIMEOUT_S} s; "
                            f"its log ({log_path}):\n{lab.log_tail()}")
            time.sleep(0.5)
        yield lab
    finally:
        try:
            lab.api("POST", "shutdown")                      # stops the kernels too
            proc.wait(timeout=30)
        except Exception:
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def report(request):
    """Lines for the terminal summary: timings, warnings (stderr output) found, where the screenshots are."""
    return request.config.course_browser_report


def pytest_configure(config):
    config.course_browser_report = []


def pytest_terminal_summary(terminalreporter, config):
    lines = config.course_browser_report
    if lines:
        terminalreporter.section("JupyterLab in Chromium")
        for line in lines:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"screenshots and the JupyterLab log: {ARTIFACTS}")
