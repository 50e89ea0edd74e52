"""Resolve the compute device once, for the whole course.

Without a CUDA GPU, Triton kernels run in the Triton *interpreter* (``TRITON_INTERPRET=1``), which
executes them with numpy on the CPU: slow, but the same kernel source, the same masks, the same
results. The variable is read when ``triton`` is first imported, so this module must be imported
before ``triton`` (``course_lib`` and ``kernels`` both import it first).

Set ``COURSE_FORCE_CPU=1`` to use the CPU and the interpreter even on a GPU machine.
"""
from __future__ import annotations

import os
import sys

# torch's OpenMP threads otherwise spin-wait between ops and starve the Triton interpreter's numpy work on
# small CPUs (measured on 2 cores: a batch-2 paged decode step took 1.97 s spinning, 0.28 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

_FORCE_CPU = os.environ.get("COURSE_FORCE_CPU", "") not in ("", "0")
HAS_GPU: bool = torch.cuda.is_available() and not _FORCE_CPU

if not HAS_GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported before course_lib on a machine without a GPU, so its kernels cannot run. "
            "Import course_lib (or kernels) first, or start Python with TRITON_INTERPRET=1."
        )
    os.environ["TRITON_INTERPRET"] = "1"

#: The device every tensor of the course lives on: "cuda" with a GPU, else "cpu".
DEVICE: torch.device = torch.device("cuda" if HAS_GPU else "cpu")
#: True when Triton kernels run in the interpreter (on CPU tensors) rather than compiled.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_dtypes() -> list[torch.dtype]:
    """Dtypes the Triton kernels are tested in on this machine.

    The interpreter's ``tl.dot`` on bfloat16 returns garbage (triton issue 11584), so on CPU the
    kernels are exercised in float32 and float16 only; compiled on a GPU, float16 and bfloat16.
    """
    return [torch.float16, torch.bfloat16] if HAS_GPU else [torch.float32, torch.float16]


def default_dtype() -> torch.dtype:
    """The dtype models run in: bfloat16 on a GPU, float32 on CPU (exact, and fast enough for tiny models)."""
    return torch.bfloat16 if HAS_GPU else torch.float32


def describe() -> dict[str, str]:
    """Device, versions and kernel mode, as a dict of strings."""
    import platform

    import triton  # safe: TRITON_INTERPRET is set above

    info = {
        "device": torch.cuda.get_device_name(0) if HAS_GPU else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "kernel mode": "interpreter (TRITON_INTERPRET=1, tiny shapes, CPU)" if INTERPRET else "compiled for the GPU",
    }
    if HAS_GPU:
        props = torch.cuda.get_device_properties(0)
        info["gpu memory"] = f"{props.total_memory / 2**30:.1f} GiB"
        info["streaming multiprocessors"] = str(props.multi_processor_count)
        info["cuda"] = str(torch.version.cuda)
    return info


def setup(seed: int = 0, quiet: bool = False) -> None:
    """First cell of every notebook: seed everything, pick the device, print what we run on (see describe())."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    info = describe()
    if not quiet:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:>{width}} : {value}")
