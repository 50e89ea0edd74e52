"""Triton kernels of the course, each with a plain-torch twin in ``kernels.reference``.

``kernels.device`` is imported first: without a GPU it sets ``TRITON_INTERPRET=1``, which Triton reads
when it is first imported, so the same kernels run in the interpreter on CPU tensors.
"""
import kernels.device  # noqa: F401  (first: sets TRITON_INTERPRET before any import of triton)

from kernels.vector_add import add
from kernels.store_kv import store_kv
from kernels.paged_attention import paged_attention_decode
from kernels.flash_attention import flash_attention
from kernels.store_kv_int8 import store_kv_int8
from kernels.paged_attention_int8 import paged_attention_int8_decode
from kernels.paged_prefill import paged_prefill_attention

__all__ = ["add", "store_kv", "paged_attention_decode", "flash_attention", "store_kv_int8",
           "paged_attention_int8_decode", "paged_prefill_attention"]
