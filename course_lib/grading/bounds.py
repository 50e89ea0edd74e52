"""Addresses checked in the Triton interpreter: a learner's kernel may only load from and store to the tensors
passed to it.

On a GPU a store past the end of ``out`` is silent garbage or an illegal-address fault; in the interpreter it is a
write into the host process's memory (someone else's data, or a dead Jupyter kernel). ``guard_memory`` checks every
load and store of an interpreted launch *before* it happens: each one's active lanes (mask on) must lie inside one
tensor argument. The first that does not raises ``OutOfBounds``, which names the tensor and the element ("your
kernel wrote outside `out` (row 33, offset 0)"), and the check reports it as a failed case.
"""
from __future__ import annotations

import contextlib
import inspect

import numpy as np
import torch

from course_lib.grading.core import OutOfBounds

__all__ = ["OutOfBounds", "guard_memory", "tensor_regions"]

DEFAULT_HINT = ("every offset must stay inside its tensor: check which length each offset uses (Sq for rows of q "
                "and out, Skv for rows of k and v) and mask the last, partial block (mask=offs < n) in every "
                "tl.load and tl.store")


def tensor_regions(kernel, args: tuple, kwargs: dict) -> list[tuple[str, int, int, torch.Tensor]]:
    """(name, first byte, end byte, tensor) of every tensor argument of a launch; the name is the kernel's parameter
    name without its ``_ptr`` suffix. The region is what the tensor's elements span (a view of a longer buffer
    ends at its own last element, not at the buffer's)."""
    fn = getattr(kernel, "fn", kernel)
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = []
    named = [(names[i] if i < len(names) else f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    regions = []
    for name, value in named:
        if isinstance(value, torch.Tensor) and value.numel():
            start = value.data_ptr()
            span = sum((size - 1) * stride for size, stride in zip(value.shape, value.stride())) + 1
            regions.append((name.removesuffix("_ptr"), start, start + span * value.element_size(), value))
    return regions


def _element(tensor: torch.Tensor, index: int) -> str:
    """Where element ``index`` (counted from the tensor's first element, may be outside it) lies: row and offset."""
    if tensor.dim() < 2:
        return f"element {index}"
    row_length = tensor.shape[-1]
    if tensor.dim() == 2 and tensor.stride(1) == 1 and tensor.stride(0) > row_length:
        row_length = tensor.stride(0)   # a slice of a wider matrix: its rows are stride(0) elements apart
    row, offset = divmod(index, row_length)
    return f"row {row}, offset {offset}"


def _describe(tensor: torch.Tensor) -> str:
    shape = list(tensor.shape)
    if tensor.dim() < 2:
        return f"`{{name}}` has {_count(tensor.numel(), 'element')} (shape {shape})"
    return f"`{{name}}` has {_count(tensor.numel() // tensor.shape[-1], 'row')} of {tensor.shape[-1]} (shape {shape})"


def _count(n: int, noun: str, plural: str = "") -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def check_access(regions, ptrs, mask, *, store: bool, program, hint: str = DEFAULT_HINT) -> None:
    """Raise ``OutOfBounds`` when an active lane of one load or store (pointers ``ptrs``, lanes on where ``mask``)
    lies outside the tensor that the access belongs to: the tensor that holds most of its active lanes, or, when no
    tensor holds any, the tensor of the pointer's dtype nearest to the first address."""
    addresses = np.asarray(ptrs.data).astype(np.int64)
    on = np.broadcast_to(np.asarray(mask.data).astype(bool), addresses.shape).ravel()
    active = addresses.ravel()[on]
    if active.size == 0 or not regions:
        return
    itemsize = np.dtype(_np_dtype(ptrs)).itemsize
    inside = np.stack([(active >= lo) & (active + itemsize <= hi) for _, lo, hi, _ in regions])
    counts = inside.sum(axis=1)
    owner = int(np.argmax(counts))
    if counts[owner] == active.size:
        return
    first_bad = int(active[~inside[owner]][0])
    if counts[owner] == 0:  # every lane outside every tensor: the nearest tensor (of the pointer's dtype if any)
        elem_bits = itemsize * 8
        same = [i for i, r in enumerate(regions) if r[3].element_size() * 8 == elem_bits] or range(len(regions))
        owner = min(same, key=lambda i: min(abs(first_bad - regions[i][1]), abs(first_bad - regions[i][2])))
    name, lo, _, tensor = regions[owner]
    index = (first_bad - lo) // tensor.element_size()
    n_bad = int((~inside[owner]).sum())
    verb, where = ("wrote", "stored to") if store else ("read", "loaded from")
    raise OutOfBounds(
        f"your kernel {verb} outside `{name}` ({_element(tensor, index)})\n"
        f"got: program {tuple(program)} {where} {_count(n_bad, 'address', 'addresses')} outside `{name}`; "
        + _describe(tensor).format(name=name) + " (stopped before the access)\n"
        f"hint: {hint}")


def _np_dtype(ptrs):
    from triton.runtime.interpreter import _get_np_dtype

    return _get_np_dtype(ptrs.get_element_ty())


@contextlib.contextmanager
def guard_memory(regions, hint: str = DEFAULT_HINT):
    """Within the block, every load and store of an interpreted kernel is checked against ``regions`` (from
    ``tensor_regions``) before it runs. Wraps whatever the interpreter's builder has now (``launch_traced``'s
    watcher included) and restores it after."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    saved = {name: builder.__dict__.get(name) for name in ("create_masked_load", "create_masked_store")}
    load, store = builder.create_masked_load, builder.create_masked_store

    def guarded_load(ptrs, mask, *args, **kwargs):
        check_access(regions, ptrs, mask, store=False, program=builder.grid_idx, hint=hint)
        return load(ptrs, mask, *args, **kwargs)

    def guarded_store(ptrs, value, mask, *args, **kwargs):
        check_access(regions, ptrs, mask, store=True, program=builder.grid_idx, hint=hint)
        return store(ptrs, value, mask, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = guarded_load, guarded_store
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                builder.__dict__.pop(name, None)   # the class's method again
            else:
                setattr(builder, name, value)


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to the end of its last (a view of a longer buffer ends at its own)."""
    return (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes a tensor's elements span in its storage (the elements between its rows included), as a uint8
    tensor sharing that storage."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(
        t.untyped_storage(), t.storage_offset() * t.element_size(), (_span_bytes(t),), (1,))


def spaced_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of ``tensors`` (same shapes and strides, and the same bytes between their elements: a slice of a
    wider matrix keeps its neighbours' values), placed in one buffer with a gap after each at least as large as the
    largest of them.

    The bounds check names the tensor an access belongs to by where its addresses fall. Where the allocator put
    two arguments side by side (``k`` right before ``v``), the tail of a load past ``k``'s end lies inside ``v``:
    reported as a read outside `v`, or not at all when the whole tile lands in ``v``. With the gaps, an access that
    runs past a tensor by less than the largest tensor's size lands in no tensor, and is named after its own."""
    spans = [_span_bytes(t) if t.numel() else 0 for t in tensors]
    gap = max([4096, *spans])
    offsets, end = [], gap
    for span in spans:
        end = -(-end // 256) * 256   # aligned for every dtype
        offsets.append(end)
        end += span + gap
    arena = torch.empty(end, dtype=torch.uint8)
    copies = []
    for t, off, span in zip(tensors, offsets, spans):
        if not t.numel():
            copies.append(t.detach().cpu().clone())
            continue
        arena[off:off + span].copy_(raw_bytes(t.detach()))
        size = t.element_size()
        typed = arena[off:off + -(-span // size) * size].view(t.dtype)
        copies.append(torch.as_strided(typed, t.shape, t.stride()))
    return copies


def spaced(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with every tensor replaced by its copy from ``spaced_copies``."""
    keys = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    copies = spaced_copies([args[i] for i in keys] + [kwargs[k] for k in names])
    new_args, new_kwargs = list(args), dict(kwargs)
    for i, c in zip(keys, copies):
        new_args[i] = c
    for k, c in zip(names, copies[len(keys):]):
        new_kwargs[k] = c
    return tuple(new_args), new_kwargs


def preflight(kernel, grid, args: tuple, kwargs: dict, hint: str = DEFAULT_HINT) -> None:
    """Where kernels are compiled (a GPU): run the learner's kernel once in the interpreter, on CPU copies of its
    tensors, with every access checked, before the compiled launch. An out-of-bounds access raises
    ``OutOfBounds`` here, a failed case, instead of an illegal address on the GPU (which leaves the CUDA context
    unusable until the notebook's kernel restarts). Anything else the interpreter cannot run (a helper it does not
    know, a stub) is left to the compiled launch, which reports it as before."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return
    fn = getattr(kernel, "fn", None)
    if not callable(fn):
        return
    copies, kw_copies = spaced(args, kwargs)
    try:
        with guard_memory(tensor_regions(kernel, copies, kw_copies), hint):
            InterpretedFunction(fn)[grid](*copies, **kw_copies)
    except Exception as err:
        cause = err
        while cause is not None and not isinstance(cause, OutOfBounds):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
