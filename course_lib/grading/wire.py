"""How values cross between the grader and the learner's kernel: pickles, with a strict reader on the grader's side.

The grader (``python -m course_lib.grade``) never runs the learner's code: it calls it in the learner's Jupyter
kernel, and reads back only *values* (numbers, strings, lists, dicts, tensors, arrays, and instances of the few
library classes that checks hand to exercises, such as ``Sequence`` or ``BlockAllocator``). Everything else the
learner's code returns stays in the kernel and reaches the grader as a reference (``("ref", id, type name)``),
which the grader can only call, index or ask for attributes, again through the kernel.

The reader (``SafeUnpickler``) admits only the globals in ``ALLOWED``: a pickle written by the learner's process
cannot name any other function or class, so reading it cannot run code in the grader. Tensors travel as raw
bytes plus (dtype, shape, stride, offset), checked against their storage's size before any view is made.
The writer side (``KernelPickler`` / ``GraderPickler``) is ordinary ``pickle`` with hooks; the kernel may read
whatever the grader sends (the grader trusts its own data).
"""
from __future__ import annotations

import collections
import io
import math
import pickle

import numpy as np
import torch

MAX_MESSAGE_BYTES = 512 * 2**20   # a response larger than this is refused (a learner returning gigabytes)


# ---------------------------------------------------------------- tensors and arrays as bytes
class _Storage:
    """A tensor storage as bytes, pickled once however many tensors view it."""

    def __init__(self, storage: torch.UntypedStorage):
        self.storage = storage

    def __reduce__(self):
        s = self.storage
        flat = torch.empty(0, dtype=torch.uint8, device=s.device).set_(s)
        return rebuild_storage, (flat.cpu().numpy().tobytes(), str(s.device))


def rebuild_storage(data: bytes, device: str) -> torch.UntypedStorage:
    if not isinstance(data, bytes) or not isinstance(device, str):
        raise pickle.UnpicklingError("a storage must be bytes and a device name")
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.to(torch.device(device)).untyped_storage()


def rebuild_tensor(storage, dtype: str, shape, stride, offset: int, requires_grad: bool = False) -> torch.Tensor:
    """A view of ``storage``, refused unless every element it can address lies inside the storage."""
    dt = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(storage, torch.UntypedStorage) or not isinstance(dt, torch.dtype):
        raise pickle.UnpicklingError("a tensor needs a storage and a torch dtype")
    ints = lambda xs: isinstance(xs, tuple) and all(type(x) is int for x in xs)
    if not (ints(shape) and ints(stride) and len(shape) == len(stride) and type(offset) is int):
        raise pickle.UnpicklingError("a tensor's shape, stride and offset must be integers")
    if any(n < 0 for n in shape) or any(s < 0 for s in stride) or offset < 0:
        raise pickle.UnpicklingError("negative shape, stride or offset")
    item = torch.empty(0, dtype=dt).element_size()
    if math.prod(shape) and (offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1) * item > storage.nbytes():
        raise pickle.UnpicklingError(f"a tensor of shape {shape} reaches past the end of its storage")
    t = torch.empty(0, dtype=dt, device=storage.device).set_(storage, offset, shape, stride)
    return t.requires_grad_(bool(requires_grad)) if dt.is_floating_point or dt.is_complex else t


def rebuild_ndarray(data: bytes, dtype: str, shape) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind not in "biufc" or not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise pickle.UnpicklingError(f"an array of dtype {dtype} is not a plain number array")
    if len(data) != math.prod(shape) * dt.itemsize:
        raise pickle.UnpicklingError("an array's bytes do not match its shape")
    return np.frombuffer(data, dtype=dt).reshape(shape).copy()


def _reduce_tensor(t: torch.Tensor, storages: dict, storage_ref) -> tuple:
    """(rebuild_tensor, args): the storage once per pickle (``storages`` memo), or as a persistent reference."""
    if t.is_sparse or t.layout != torch.strided or t.is_quantized:
        t = t.to_dense() if t.layout != torch.strided else t.dequantize()
    t = t.detach()
    s = t.untyped_storage()
    key = (str(s.device), s.data_ptr(), s.nbytes())
    ref = storage_ref(key)
    if ref is None:
        ref = storages.setdefault(key, _Storage(s))
    dtype = str(t.dtype).removeprefix("torch.")
    return rebuild_tensor, (ref, dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.requires_grad)


# ---------------------------------------------------------------- what the grader may read
def _allowed() -> dict[tuple[str, str], object]:
    from course_lib.paging.block_manager import BlockAllocator, BlockManager, OutOfBlocksError
    from course_lib.model.config import ModelConfig
    from course_lib.model.kv_cache import KVCache
    from course_lib.serving.prefix_cache import Node, PrefixCache
    from course_lib.serving.sequence import Sequence

    allowed: dict[tuple[str, str], object] = {}
    for obj in (rebuild_storage, rebuild_tensor, rebuild_ndarray, BlockAllocator, BlockManager, OutOfBlocksError,
                ModelConfig, KVCache, Node, PrefixCache, Sequence, collections.OrderedDict, collections.deque,
                collections.Counter, collections.defaultdict, torch.Size, torch.device, set, frozenset, complex,
                bytearray, slice, range, int, float, bool, list, dict, tuple):
        allowed[(obj.__module__, obj.__qualname__)] = obj
    for name in dir(torch):  # dtypes pickle as module attributes: torch.float32, ...
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


ALLOWED: dict[tuple[str, str], object] = {}


class SafeUnpickler(pickle.Unpickler):
    """Reads a pickle written by the learner's process: only ``ALLOWED`` globals; persistent ids via a callback."""

    def __init__(self, file, persistent_load):
        super().__init__(file)
        self._persistent = persistent_load
        if not ALLOWED:
            ALLOWED.update(_allowed())

    def find_class(self, module, name):
        obj = ALLOWED.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not a value the grader reads")
        return obj

    def persistent_load(self, pid):
        return self._persistent(pid)


def safe_loads(data: bytes, persistent_load) -> object:
    if len(data) > MAX_MESSAGE_BYTES:
        raise pickle.UnpicklingError(f"{len(data)} bytes is more than the grader reads ({MAX_MESSAGE_BYTES})")
    return SafeUnpickler(io.BytesIO(data), persistent_load).load()


def is_plain(obj) -> bool:
    """True for values that travel by value (the kernel's side decides with this; the grader re-checks on read),
    and for the allowed globals themselves (a pickle names them, e.g. ``rebuild_tensor`` or the ``Sequence`` class)."""
    if not ALLOWED:
        ALLOWED.update(_allowed())
    if any(obj is v for v in ALLOWED.values()):
        return True
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set,
                                       frozenset, slice, range, torch.Tensor, torch.dtype, torch.device, torch.Size,
                                       np.ndarray, np.generic, collections.deque, _Storage)):
        return True
    cls = type(obj)
    return ALLOWED.get((cls.__module__, cls.__qualname__)) is cls


class WirePickler(pickle.Pickler):
    """Pickles tensors as raw bytes and numpy values as plain ones; subclasses add persistent ids."""

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._storages: dict = {}

    def storage_ref(self, key):
        return None

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            return _reduce_tensor(obj, self._storages, self.storage_ref)
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in "biufc":
                return NotImplemented
            return rebuild_ndarray, (np.ascontiguousarray(obj).tobytes(), obj.dtype.str, tuple(obj.shape))
        if isinstance(obj, np.generic) and obj.dtype.kind in "biufc":  # np.float64(1.5) -> 1.5
            return type(obj.item()), (obj.item(),)
        return NotImplemented
