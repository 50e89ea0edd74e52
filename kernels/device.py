"""Where the kernels run: compiled on a CUDA GPU, or in the Triton interpreter on the CPU.

Without a CUDA GPU, Triton kernels run in the Triton *interpreter* (``TRITON_INTERPRET=1``), which
executes them with numpy on the CPU: slow, but the same kernel source, the same masks, the same
results. The variable is read when ``triton`` is first imported, so this module must be imported
before ``triton``: every kernel module imports it first, and ``course_lib.device`` re-exports it.

Set ``COURSE_FORCE_CPU=1`` to use the CPU and the interpreter even on a GPU machine.
"""
from __future__ import annotations

import os
import sys

# torch's OpenMP threads otherwise spin-wait between ops and starve the Triton interpreter's numpy work on
# small CPUs (measured on 2 cores: a batch-2 paged decode step took 1.97 s spinning, 0.28 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # after the OpenMP setting

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
