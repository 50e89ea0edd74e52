"""The input checks every kernel wrapper starts with: each argument is a tensor, on the device the kernels run on
(CUDA when compiled, the CPU in the Triton interpreter), and all of them on one device; and the checks of *values*
that must hold before a kernel touches memory (block ids inside the cache, lengths the tables can address, slots
inside the cache, a usable softmax scale, finite values for an 8-bit cache). Each raises a ValueError that names
the argument (and the entry) and says what to do.

The value checks read tensors back to the host (one copy each), so the wrappers run them unless ``validate=False``:
the engine passes that for block tables and slots it built itself, so that its hot path never waits on the GPU."""
from __future__ import annotations

import math
import numbers

import torch

from kernels.device import INTERPRET


def check_device(name: str, t: torch.Tensor) -> None:
    """Compiled kernels read GPU memory; the interpreter reads CPU memory."""
    if not INTERPRET and t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}, but compiled Triton kernels need CUDA tensors: "
                         f"use {name}.to('cuda')")
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


def check_sm_scale(sm_scale) -> None:
    """None (the default, 1/sqrt(D)) or a finite number > 0: NaN or inf makes every score NaN, 0 makes attention
    uniform, a negative scale favours the least similar keys."""
    number = isinstance(sm_scale, numbers.Real) and not isinstance(sm_scale, bool)
    if sm_scale is not None and not (number and math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a positive finite number or None, got {sm_scale!r}")


def check_block_tables(block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int, block_size: int,
                       max_context_len: int | None = None) -> int:
    """Check what a paged decode kernel will read, before it reads it (a block id past the cache reads or faults
    on memory that is not the cache): every length in [0, max_blocks * block_size]; every block id that holds one
    of a sequence's tokens (entries 0 ... ceil(L / P) - 1 of its row) in [0, num_blocks), while the entries past
    them are never read and may hold padding (-1, 0, ...); a given ``max_context_len`` not shorter than a length.
    One device-to-host copy. Returns max_context_len (max(context_lens) unless given)."""
    B, max_blocks = block_tables.shape
    if B == 0:
        return max_context_len or 0
    lens = context_lens.long()                                                          # [B]
    needed = (lens.clamp(min=0) + block_size - 1) // block_size                         # [B] blocks each one reads
    read = torch.arange(max_blocks, device=lens.device)[None, :] < needed[:, None]      # [B, max_blocks]
    bad = (read & ((block_tables < 0) | (block_tables >= num_blocks))).flatten()
    summary = torch.stack([lens.min(), lens.max(), bad.any().long(), bad.long().argmax()])
    shortest, longest, any_bad, first_bad = summary.tolist()
    if shortest < 0:
        b = int(lens.argmin())
        raise ValueError(f"context_lens[{b}] = {shortest}; lengths must be >= 0")
    if longest > max_blocks * block_size:
        b = int(lens.argmax())
        raise ValueError(f"a context length of {longest} tokens (context_lens[{b}]) is longer than block_tables can "
                         f"address: {max_blocks} blocks x block_size {block_size} = {max_blocks * block_size} tokens")
    if any_bad:
        b, j = divmod(first_bad, max_blocks)
        raise ValueError(f"block_tables[{b}, {j}] = {int(block_tables[b, j])} is outside [0, num_blocks={num_blocks}) "
                         f"(sequence {b} reads block_tables[{b}, 0:{int(needed[b])}] "
                         f"for context_lens[{b}] = {int(lens[b])})")
    if max_context_len is not None and max_context_len < longest:
        b = int(lens.argmax())
        raise ValueError(f"max_context_len = {max_context_len} is shorter than context_lens[{b}] = {longest}: the "
                         "kernel would skip the tokens past it")
    return longest if max_context_len is None else max_context_len


def check_slot_mapping(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Every slot a store writes is in the cache (a negative slot skips its token): a slot past the cache would
    write someone else's memory. One device-to-host copy."""
    if slot_mapping.numel() and int(slot_mapping.max()) >= num_slots:
        raise ValueError(f"slot_mapping holds slot {int(slot_mapping.max())}; "
                         f"the cache has only N*P = {num_slots} slots")


def check_finite(name: str, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Keys / values [T, Hkv, D] for an 8-bit cache are finite in every row that is stored: a row's scale is
    max|x| / 127, so one inf would make it inf (the whole row then dequantizes to NaN) and one NaN would be stored
    as a wrong but finite code. One device-to-host copy."""
    bad = ~torch.isfinite(x) & (slot_mapping >= 0)[:, None, None]
    if bad.any():
        t, h, d = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}[{t}, {h}] holds {x[t, h, d].item()} (at head_dim index {d}): an 8-bit cache stores "
                         "one scale per (token, kv head), max|x| / 127, which inf or NaN would ruin for the whole row")
