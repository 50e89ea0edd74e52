"""The input checks every kernel wrapper starts with: each argument is a tensor, on the device the kernels run on
(CUDA when compiled, the CPU in the Triton interpreter), and all of them on one device. Each raises a ValueError
that names the argument and says what to do."""
from __future__ import annotations

import torch

from course_lib.device import INTERPRET


def check_device(name: str, t: torch.Tensor) -> None:
    """Compiled kernels read GPU memory; the interpreter reads CPU memory."""
    if not INTERPRET and t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}, but compiled Triton kernels need CUDA tensors: use {name}.to('cuda')")
    if INTERPRET and t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}, but the Triton interpreter runs on CPU tensors: use {name}.cpu()")


def check_tensors(named: list[tuple[str, object]], *, same_device_as: str | None = None) -> None:
    """Every (name, value) is a torch.Tensor on the kernels' device; with ``same_device_as`` (one of the names),
    all on that one's device."""
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_device(name, t)
    if same_device_as is not None:
        ref = dict(named)[same_device_as]
        for name, t in named:
            if t.device != ref.device:
                raise ValueError(f"{name} is on {t.device}; expected the device of {same_device_as}, {ref.device}")
