"""Fixtures shared by the test modules."""
import pytest
import torch

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import load_tiny


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is as fast as two and steady when other processes share the CPU.
    A module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The shipped target model in float32 on the CPU (exact comparisons on every machine) and its tokenizer."""
    return load_tiny("target", dtype=torch.float32, device="cpu")
