"""Registers and spills of compiled Triton kernels: what a launch config costs each thread (lesson 03).

Once a benchmark has run a ``@triton.jit`` kernel (and its autotuner has tried every config), Triton keeps each
compiled specialization in the function's per-device cache, and each loaded one knows its registers per thread
(``n_regs``) and the bytes it spilled to local memory (``n_spills``), as the assembler reported them. This reads them
out, with the constexprs that name the variant and the tile and the launch's warps and stages, so that a reading such
as "the rotated loop lost its 4-warp config to registers" rests on a number in the result file. Empty in the
interpreter (nothing is compiled) and for kernels never launched.
"""
from __future__ import annotations


def compiled_resources(fn, keep: tuple[str, ...]) -> list[dict]:
    """One dict per compiled, loaded specialization of ``fn`` (a ``triton.jit`` function or an autotuner around one):
    the type of its first argument (which names the dtype), the constexprs named in ``keep``, ``num_warps``,
    ``num_stages``, ``n_regs`` (per thread) and ``n_spills`` (bytes), sorted by those fields."""
    while not hasattr(fn, "device_caches") and hasattr(fn, "fn"):   # an Autotuner wraps the JITFunction; a bare
        fn = fn.fn                                                     # JITFunction's .fn is its Python function
    names = list(getattr(fn, "arg_names", []))
    out = []
    for cache in getattr(fn, "device_caches", {}).values():
        kernels = cache[0] if isinstance(cache, tuple) and cache and isinstance(cache[0], dict) else {}
        for kernel in kernels.values():
            if getattr(kernel, "n_regs", None) is None:   # compiled but never loaded: no counts
                continue
            meta = getattr(kernel, "metadata", None)
            src = getattr(kernel, "src", None)
            signature = list((getattr(src, "signature", None) or {}).values())
            row = dict(first_arg=str(signature[0])) if signature else {}   # its type names the dtype: "*bf16", ...
            for key, value in (getattr(src, "constants", None) or {}).items():
                index = key[0] if isinstance(key, tuple) and len(key) == 1 else key
                name = names[index] if isinstance(index, int) and 0 <= index < len(names) else str(key)
                if name in keep:
                    row[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
            row.update(num_warps=getattr(meta, "num_warps", None), num_stages=getattr(meta, "num_stages", None),
                       n_regs=int(kernel.n_regs), n_spills=int(getattr(kernel, "n_spills", 0) or 0))
            out.append(row)
    return sorted(out, key=lambda r: [str(r.get(k)) for k in ("first_arg", *keep, "num_warps", "num_stages")])
