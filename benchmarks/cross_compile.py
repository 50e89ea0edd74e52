"""Compile a course kernel for a GPU this machine does not have, and read what the compiler made of it.

A kernel's registers per thread, its spills and the instructions of its main loop decide much of its speed, and
none of them needs a GPU to know: Triton compiles for any target (``triton.compile(..., target=GPUTarget("cuda",
90, 32))``) and ships ``ptxas`` and ``nvdisasm``. ``cross_compile`` runs a kernel's Python wrapper on CPU tensors in
a fresh Python, catches the launch instead of running it, compiles that launch for sm_``arch`` and returns:

* ``registers`` / ``spill_store_bytes``: what ``ptxas -v`` reports (registers per thread decide how many programs
  fit on an SM: 65,536 registers per SM);
* ``shared_bytes``, ``num_warps``;
* ``loop``: the SASS instructions of the kernel's largest loop, by opcode (``STS``/``LDS``/``LDSM``: shared memory,
  ``LDG``: global loads, ``HMMA``/``IMMA``: tensor-core instructions, ``PRMT``/``LOP3``/``HADD2``: byte shuffles,
  logic, packed fp16), per warp and iteration.

This process may run Triton in interpreter mode (``kernels.device`` turns it on without a GPU); the child does
not: it stands in a ``kernels.device`` whose checks accept CPU tensors, and the wrapper's own module is told it is
compiled (``INTERPRET = False``), so the launch carries the compiled path's constexprs. The launch is specialized
as ``JITFunction.run`` does on a GPU (pointers and ints divisible by 16, ints equal to 1): compiled without that,
the same kernels came out with 4-byte loads where a launch gets 16-byte ones, and the FP16 decode kernel without
its asynchronous copies (``LDGSTS``).
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cross_compile(module: str, kernel: str, launch: str, kwargs: dict | None = None, arch: int = 90,
                  timeout: float = 600.0, sass_path: str | None = None) -> dict:
    """Compile the launch of ``module.kernel`` (a ``triton.jit`` function) that ``launch`` makes, for sm_``arch``.
    launch: ``"package.module:function"``, called as ``function(m, **kwargs)`` with ``m`` the imported module; it
    calls the kernel's wrapper on CPU tensors. sass_path: also write the whole SASS there. RuntimeError with the
    child's error if anything fails."""
    code = ("import json, sys\n"
            f"sys.path.insert(0, {ROOT!r})\n"
            "from benchmarks.cross_compile import _child\n"
            f"print(json.dumps(_child({module!r}, {kernel!r}, {launch!r}, {kwargs or {}!r}, {arch}, {sass_path!r})))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"cross-compiling {module}.{kernel} for sm_{arch} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compiled_record(benchmark: str, argv: list[str] | None, arch: int = 90, **fields) -> dict:
    """The head of a result file of kernels compiled here without a GPU: benchmark, device ("CPU (compiled for
    sm_<arch>, no GPU)"), arch, git commit, date, Python and Triton versions, the command; then ``fields``."""
    import datetime as dt
    import platform

    import triton

    from benchmarks.record import git_commit
    return dict(benchmark=benchmark, device=f"CPU (compiled for sm_{arch}, no GPU)", arch=arch, git_commit=git_commit(),
                date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                python=platform.python_version(), triton=triton.__version__,
                command=" ".join([f"python -m benchmarks.{benchmark}", *(argv if argv is not None else sys.argv[1:])]),
                **fields)


def loop_opcodes(sass: str) -> dict:
    """Opcode counts of the largest loop (a backward branch to a label) of disassembled SASS: {"instructions": n,
    "opcodes": {op: count}}; empty counts when the code has no loop."""
    labels, ops = {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        ins = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);", line)
        if ins:
            ops.append((ins.group(1).split(".")[0], ins.group(2)))
    best = []
    for i, (op, rest) in enumerate(ops):
        target = re.search(r"`\(\.(L_x_\d+)\)", rest) if op == "BRA" else None
        if target and labels.get(target.group(1), len(ops)) <= i and i + 1 - labels[target.group(1)] > len(best):
            best = ops[labels[target.group(1)]: i + 1]
    counts = collections.Counter(op for op, _ in best)
    return dict(instructions=len(best), opcodes=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))


def _child(module: str, kernel: str, launch: str, kwargs: dict, arch: int, sass_path: str | None = None) -> dict:
    """In the fresh Python: stand in kernels.device, catch the launch, compile it, read ptxas and the SASS."""
    import importlib
    import types

    import torch
    device = types.ModuleType("kernels.device")   # checks accept CPU tensors; triton itself stays compiled
    device.INTERPRET, device.HAS_GPU, device.DEVICE = True, False, torch.device("cpu")
    device.kernel_dtypes = lambda: [torch.float16, torch.bfloat16]
    sys.modules["kernels.device"] = device
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    m = importlib.import_module(module)
    m.INTERPRET = False
    fn = getattr(m, kernel)
    launches = collections.defaultdict(list)

    class Catch:   # kernel[grid](*args, **kw) records the launch instead of running it (there is no GPU)
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launches[self.name].append((args, kw))

    jitted = [(mod, name, value) for mod_name, mod in list(sys.modules.items())
              if mod_name == module or mod_name.startswith("kernels.")
              for name, value in list(vars(mod).items()) if isinstance(value, triton.runtime.jit.JITFunction)]
    for mod, name, _ in jitted:   # every kernel the wrapper may launch (split-K's merge, ...), for the call only
        setattr(mod, name, Catch(name))
    launch_module, launch_fn = launch.split(":")
    try:
        getattr(importlib.import_module(launch_module), launch_fn)(m, **kwargs)
    finally:
        for mod, name, value in jitted:   # a kernel reads its helpers from its module's globals
            setattr(mod, name, value)
    if not launches[kernel]:
        raise RuntimeError(f"{launch} did not launch {module}.{kernel}")
    args, kw = launches[kernel][-1]
    # what JITFunction.run does on a GPU: bind the arguments, specialize them (pointers and ints divisible by 16,
    # ints equal to 1: what lets loads vectorize), then compile; CPU tensors are as aligned as CUDA ones
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
    source = ASTSource
    try:   # a Gluon kernel compiles from its own source class
        from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
        source = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
    except ImportError:   # pragma: no cover - Triton without Gluon
        pass
    compiled = triton.compile(source(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    names = fn.arg_names
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        report = subprocess.run([os.path.join(tools, "ptxas"), f"-arch=sm_{arch}a", "-v", ptx, "-o", os.devnull],
                                capture_output=True, text=True)
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    if sass_path:
        with open(sass_path, "w") as f:
            f.write(sass)
    text = report.stdout + report.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return dict(triton=triton.__version__, arch=arch, kernel=f"{module}.{kernel}",
                constexprs={n: kw[n] if isinstance(kw[n], (bool, int, float, str)) else str(kw[n])
                            for n in names[len(args):]}, num_warps=options.num_warps,
                num_stages=options.num_stages, shared_bytes=compiled.metadata.shared,
                registers=int(regs.group(1)) if regs else None,
                spill_store_bytes=int(spills.group(1)) if spills else None, loop=loop_opcodes(sass))
