"""Attention in plain torch: the reference every attention kernel of the course is tested against, and the
model's attention on the CPU. It lives with the kernels' references (``kernels.reference.attention``), one
implementation for both."""
from kernels.reference import attention

__all__ = ["attention"]
