"""One Jupyter kernel for one notebook, as the grader needs it: bounded in time, in output, and in what it leaves.

The kernel is this very Python (``sys.executable``) in the notebook's folder, started in a process group of its
own with its stdin, stdout and stderr on /dev/null: nothing the notebook writes reaches the grader's own output
(a notebook once printed fake JSON there). ``execute`` runs code and returns the reply's status and error name
and message (the message cut at ``MAX_ERROR_CHARS``); the cells' printed output is read and dropped as it
arrives, never stored. ``kill`` ends the kernel's whole process group, so processes the notebook started
(``subprocess``, ``multiprocessing``, a fork) end with it. A process that leaves the group on purpose
(``setsid``) outlives it: only a container stops that.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MAX_ERROR_CHARS = 1000


class KernelDied(Exception):
    """The kernel process ended during a request."""


class ExecuteTimeout(Exception):
    """A request ran past its time."""


@dataclass
class Reply:
    status: str            # "ok" or "error"
    ename: str = ""
    evalue: str = ""


class Kernel:
    """A kernel started on ``start()`` and ended, with its process group, on ``kill()``."""

    def __init__(self, cwd: Path, env: dict, workdir: Path, startup_timeout: float = 180):
        # 180 s: on a busy 2-core machine a kernel took over 60 s to start (nbval's default failed there)
        self.cwd, self.env, self.workdir, self.startup_timeout = Path(cwd), dict(env), Path(workdir), startup_timeout
        self.km = self.kc = None
        self._unanswered: str | None = None   # the request that ran past its time (interrupt() waits for its reply)

    def start(self) -> None:
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpecManager

        spec_dir = self.workdir / "kernels" / "python3"
        spec_dir.mkdir(parents=True, exist_ok=True)
        spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (course grader)", "language": "python"}
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        ksm = KernelSpecManager(kernel_dirs=[str(self.workdir / "kernels")], ensure_native_kernel=False)
        for attempt in range(2):  # two kernels started at once can race for the same ports: try once more
            connection_file = self.workdir / f"kernel-{os.getpid()}-{time.monotonic_ns()}.json"
            self.km = KernelManager(kernel_name="python3", kernel_spec_manager=ksm,
                                    connection_file=str(connection_file))
            self.km.start_kernel(cwd=str(self.cwd), env=self.env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.kc = self.km.client()
            self.kc.start_channels()
            try:
                self.kc.wait_for_ready(timeout=self.startup_timeout)
                return
            except RuntimeError:
                self.kill()
                if attempt:
                    raise

    @property
    def pid(self) -> int | None:
        process = getattr(getattr(self.km, "provisioner", None), "process", None)
        return getattr(process, "pid", None)

    def alive(self) -> bool:
        return self.km is not None and self.km.is_alive()

    def execute(self, code: str, timeout: float) -> Reply:
        """Run ``code``; raise ``ExecuteTimeout`` after ``timeout`` seconds, ``KernelDied`` if the kernel ends."""
        msg_id = self.kc.execute(code, store_history=False, allow_stdin=False, stop_on_error=False)
        return self._reply(msg_id, timeout)

    def _reply(self, msg_id: str, timeout: float) -> Reply:
        deadline = time.monotonic() + max(timeout, 0)
        while True:
            self._drain_output()
            left = deadline - time.monotonic()
            if left <= 0:
                self._unanswered = msg_id
                raise ExecuteTimeout(f"no reply in {timeout:g} s")
            try:
                msg = self.kc.get_shell_msg(timeout=min(left, 0.25))
            except queue.Empty:
                if not self.alive():
                    raise KernelDied("the kernel process ended") from None
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            self._drain_output()
            content = msg.get("content", {})
            return Reply(str(content.get("status", "error")), str(content.get("ename", ""))[:200],
                         str(content.get("evalue", ""))[:MAX_ERROR_CHARS])

    def _drain_output(self) -> None:
        """Read and drop what the kernel published (printed text, plots): the grader keeps none of it."""
        while True:
            try:
                self.kc.get_iopub_msg(timeout=0)
            except queue.Empty:
                return

    def interrupt(self, wait: float = 30) -> bool:
        """SIGINT to the kernel; True when the request that ran too long has answered (with its
        KeyboardInterrupt) within ``wait`` seconds. Waiting for that very reply, not for a later request's,
        makes sure the interrupt cannot land in the next request (an import half done)."""
        pending, self._unanswered = self._unanswered, None
        try:
            self.km.interrupt_kernel()
            if pending is not None:
                self._reply(pending, wait)
            return True
        except Exception:  # a kernel that does not answer is killed by the caller
            return False

    def kill(self) -> None:
        """End the kernel and every process of its group, then free the connection's files and sockets."""
        pid = self.pid
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)  # the kernel leads its own group (start_new_session)
            except (ProcessLookupError, PermissionError):
                pass
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            try:
                self.km.shutdown_kernel(now=True)
            except Exception:  # already dead: only its files are left to clean
                pass
            self.km.cleanup_resources()
        self.km = self.kc = None
