"""What every engine benchmark shares: its command line (--quick, --threads, --out), the run's provenance (device,
versions, date, command, CPU model, GPU driver) and writing the result to
``benchmarks/results/<name>_<device-slug>.json``."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton

from course_lib.device import HAS_GPU
from course_lib.analysis.roofline import RESULTS_DIR

from benchmarks.roofline import device_name, slug


def parse_args(doc: str, name: str, quick_help: str, argv: list[str] | None,
               add_arguments=None) -> argparse.Namespace:
    """--quick, --threads (set here on a CPU), --out (default benchmarks/results/<name>_<device>.json), and the
    benchmark's own options (``add_arguments(parser)``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: the models are tiny, and one thread is as fast and far "
                             "steadier when other processes share the cores)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output JSON (default: benchmarks/results/{name}_<device>.json)")
    args = parser.parse_args(argv)
    if not HAS_GPU:
        torch.set_num_threads(args.threads)
    return args


def print_readme_row(path: Path) -> str | None:
    """Print (and return) the README's row of the result file just written: a kernel's (``kernel_lines.summary``:
    the strongest baseline first, the full measured range, the fraction of the roofline) or a serving feature's
    (``feature_lines.summary``: each ratio with its factors). Nothing for a quick, CPU or interpreter run, which the
    README's GPU table does not hold."""
    from course_lib.analysis import feature_lines, kernel_lines

    path = Path(path)
    result = json.loads(path.read_text())
    line = kernel_lines.summary(result, path.name) or feature_lines.summary(result, path.name)
    if line:
        print(f"the README's row of this run: {line}", flush=True)
    return line


def git_commit() -> str:
    """The commit a run measured: $COURSE_GIT_COMMIT when set (a copy of the tree without its .git, as on a lent
    GPU machine), else ``git rev-parse HEAD`` (``-dirty`` with uncommitted changes), else "unknown"."""
    import os
    import subprocess

    if os.environ.get("COURSE_GIT_COMMIT"):
        return os.environ["COURSE_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,
                                        check=True).stdout.strip()
        sha, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(benchmark: str, module: str, argv: list[str] | None, dtype: torch.dtype, quick: bool, *,
               engine: bool = True) -> dict:
    """Device, versions, date, dtype, threads and the command line of this run (``python -m <module> ...``; and, for
    an engine benchmark, which attention kernels the engine ran)."""
    name = device_name()
    info = dict(
        benchmark=benchmark, device=name, device_slug=slug(name),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(), python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda if HAS_GPU else None, dtype=str(dtype).removeprefix("torch."),
        torch_threads=torch.get_num_threads(), quick=quick,
        command=" ".join(["python", "-m", module, *(argv if argv is not None else sys.argv[1:])]))
    info["cpu_model"] = cpu_model()   # an engine's host-bound steps run at the host's speed: name it
    info["driver"] = driver_version()
    if engine:
        info["kernels"] = "Triton (compiled)" if HAS_GPU else "plain-torch references (CPU)"
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def driver_version() -> str | None:
    if not HAS_GPU:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def write(result: dict, name: str, out: Path | str | None) -> Path:
    """Write result as JSON to out, or to benchmarks/results/<name>_<device-slug>.json."""
    path = Path(out) if out else RESULTS_DIR / f"{name}_{result['device_slug']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
