"""Where a kernel's instructions go, from the SASS of its main loop (lesson 07; ``benchmarks.cross_compile``).

A memory-bound kernel's loop should spend its instructions on loads and the math the bytes need. Grouping the loop's
opcodes by what they do shows what else it pays for: unpacking 8-bit codes, moving tiles through shared memory into
the tensor cores' operand layout, the softmax, addresses. The groups are by opcode, so approximate: an ``IMAD`` may
compute an address or multiply data, a ``PRMT`` unpack a code or pack two fp16 values for a store.
"""
from __future__ import annotations

#: group -> SASS opcodes (prefix before the first dot); anything else is "addresses and control"
GROUPS = {
    "global loads": ("LDG", "LDGSTS", "LDGDEPBAR", "DEPBAR"),
    "unpacking codes": ("PRMT", "LOP3", "HADD2", "SHF", "SGXT", "I2FP", "I2F"),
    "shared-memory layout moves": ("STS", "LDS", "LDSM", "STSM", "BAR"),
    "tensor cores": ("HMMA", "IMMA"),
    "softmax and scaling": ("FMUL", "FADD", "FFMA", "FMNMX", "MUFU", "FSEL", "F2FP", "SHFL", "FSETP"),
}
OTHER = "addresses and control"


def instruction_mix(opcodes: dict[str, int]) -> dict[str, int]:
    """Counts of ``opcodes`` ({opcode: count}, as ``loop_opcodes`` records them) per group of ``GROUPS`` and
    ``OTHER``, in that order; the counts add up to the loop's instructions."""
    group_of = {op: group for group, ops in GROUPS.items() for op in ops}
    mix = dict.fromkeys([*GROUPS, OTHER], 0)
    for op, count in opcodes.items():
        mix[group_of.get(op, OTHER)] += count
    return mix


def per_kb(row: dict) -> dict[str, float]:
    """A recorded ``int8_kernel_resources`` row's loop mix in warp instructions per KB the loop reads: the loop's
    instructions per warp x the program's warps / the KB one iteration reads."""
    scale = row["num_warps"] / row["kb_per_iteration"]
    return {group: count * scale for group, count in instruction_mix(row["loop_opcodes"]).items()}
