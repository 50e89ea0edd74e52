"""Resolve the compute device once, for the whole course: ``DEVICE``, ``HAS_GPU``, ``INTERPRET`` (from
``kernels.device``, which sets ``TRITON_INTERPRET=1`` without a GPU and must be imported before ``triton``),
the dtype models run in, and ``setup()``, the first cell of every notebook.

Set ``COURSE_FORCE_CPU=1`` to use the CPU and the interpreter even on a GPU machine.
"""
from __future__ import annotations

# First: kernels.device sets OpenMP's wait policy and TRITON_INTERPRET before torch and triton are imported.
from kernels.device import DEVICE, HAS_GPU, INTERPRET, kernel_dtypes  # noqa: F401  (re-exported)

import torch


def default_dtype() -> torch.dtype:
    """The dtype models run in: bfloat16 on a GPU, float32 on CPU (exact, and fast enough for tiny models)."""
    return torch.bfloat16 if HAS_GPU else torch.float32


def describe() -> dict[str, str]:
    """Device, versions and kernel mode, as a dict of strings."""
    import platform

    import triton  # safe: TRITON_INTERPRET is set above

    info = {
        "device": (torch.cuda.get_device_name(0) if HAS_GPU
                   else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
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
