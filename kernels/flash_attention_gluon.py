"""FlashAttention forward for Hopper written in Gluon: warp specialization with two consumer warp groups (FA3's idea).

``kernels.flash_attention_hopper`` reaches 0.84-0.97x cuDNN's speed at D = 128 on an H100 with ``tl``: the softmax of
each key tile sits between its two matmuls, and ``tl`` in Triton 3.6 does not split a kernel's warps into groups with
different jobs on sm_90. FlashAttention-3 does: one *producer* warp only issues TMA loads of K and V into a ring of
shared-memory buffers, and two *consumer* warp groups (4 warps each) each own half of a 128-row query tile. While one
group runs its exponentials on the special-function units, the other's ``wgmma`` keeps the Tensor Cores busy; the
warp scheduler interleaves them. The producer needs almost no registers, so they go to the consumers
(``worker_num_regs``: the ``setmaxnreg`` of FA3). Gluon (``triton.experimental.gluon``), Triton's lower-level
dialect, writes exactly that: explicit layouts, shared-memory buffers, mbarriers, ``warpgroup_mma`` and
``gl.warp_specialize``.

Per program: query rows [start, start + 128) of one (batch, head); consumer c of {0, 1} owns rows start + 64c ...
start + 64c + 63 (and writes its output through the shared buffer its Q came in). The producer loads both Q halves
once, then K and V tiles of BLOCK_N keys into STAGES buffers; a buffer is reused after both consumers arrived on its
"empty" barrier (count 2). Each consumer (``kernels.flash_attention_gluon_tiles``): S = Q Kᵀ (``warpgroup_mma``, A
and B from shared memory), the online softmax in the accumulator's registers, P converted to the A-operand register
layout, O += P V. Causal masking is bottom-right aligned, as in ``kernels.flash_attention``.

Switches (``config``), off by default until a GPU has measured them (with all off the kernel is the first measured
version, fd08f7e, plus the epilogue's masked LSE store): ``SPLIT_MASK`` runs a causal group's tiles below its
diagonal without the comparison and masks only the ones that cross it, as the ``tl`` kernels do; ``FMA_SOFTMAX``
keeps the running max in scaled units, so each score costs one FMA before its exp2 instead of a multiply (for the
max) and an FMA; ``PINGPONG`` is FA3's inter-warpgroup schedule: the two consumer groups take turns (two more
mbarriers) to issue their matmuls, QKᵀ of tile j with P·V of tile j-1, so that one group's softmax runs while the
other's matmuls do by construction rather than by the warp scheduler's choice; ``HEAVY_FIRST`` launches a causal
head's last query blocks (the ones that see the most keys) first, so that the short ones fill the end of the GPU's
schedule, as the ``tl`` kernels have always done; ``PERSISTENT`` is FA3's persistent scheduler
(``kernels.flash_attention_gluon_persistent``). The first version's ``ROTATE`` (tile j+1's QKᵀ issued before tile
j's softmax inside one group) was measured slower at fd08f7e (0.77x cuDNN where the plain loop made 0.91x:
``benchmarks/results/flash_attention_gluon_configs_nvidia-h100-80gb-hbm3.json``) and is gone: ``PINGPONG`` issues
QKᵀ of one tile with P·V of the previous one, the same overlap.

Scope (an experiment measured against the ``tl`` kernels, not the library's default): forward only (each row's
log-sum-exp on request, ``return_lse``, what a backward pass needs), float16 /
bfloat16, D in {64, 128}, Sq a multiple of 128 and Skv a multiple of BLOCK_N, Skv >= Sq when causal, on an sm_90
GPU. Anything else raises a ValueError naming the argument. There is no interpreter for Gluon: its tests run on a
GPU, and on a CPU the kernel is only compiled for sm_90 (``cross_compile``, in a subprocess where the interpreter
is off), which checks that it lowers. For that reason this module and its two siblings never import
``kernels.device`` (the package's ``__init__`` does, for every other kernel).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

try:  # Gluon ships with Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    gluon = gl = None

if gl is not None:   # not through kernels.device (see above): the sibling modules are Gluon only
    from kernels.flash_attention_gluon_persistent import _attn_fwd_persistent
    from kernels.flash_attention_gluon_tiles import _group_tile, _write_tile

LOG2E = 1.4426950408889634
BLOCK_M = 128            # query rows per program: two consumer warp groups of 64 rows
HALF_M = BLOCK_M // 2
#: launch parameters (measured choices go here; ``config`` overrides them per call)
DEFAULT_CONFIG = dict(BLOCK_N=128, STAGES=2, SPLIT_MASK=False, FMA_SOFTMAX=False, PINGPONG=False,
                      HEAVY_FIRST=False, PERSISTENT=False, consumer_regs=232, producer_regs=24, maxnreg=168)


def gluon_status() -> str | None:
    """None when the Gluon kernel can run here, else why not (a sentence)."""
    if gl is None:
        return f"triton {triton.__version__} has no Gluon (needs >= 3.5)"
    if not torch.cuda.is_available():
        return "no CUDA GPU (Gluon has no interpreter)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"this kernel uses Hopper's wgmma (sm_90); this GPU is sm_{major}{minor}"
    return None


if gl is not None:

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, o_desc, q_smem, k_bufs, v_bufs, o_smem, q_bar, k_ready, v_ready, kv_empty,
                  q_row, kv_row, n_tiles, qk_scale, q_lo, causal_offset, lse_ptr, lse_size,
                  CAUSAL: gl.constexpr, STAGES: gl.constexpr, SPLIT_MASK: gl.constexpr, FMA_SOFTMAX: gl.constexpr,
                  PINGPONG: gl.constexpr, WHICH: gl.constexpr):
        """One warp: Q's two halves once, then every K and V tile into the ring, as soon as its buffer is free."""
        half: gl.constexpr = q_desc.block_type.shape[0]
        block_n: gl.constexpr = k_desc.block_type.shape[0]
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem.index(0))
        tma.async_copy_global_to_shared(q_desc, [q_row + half, 0], q_bar, q_smem.index(1))
        for j in range(n_tiles):
            stage = j % STAGES
            phase = (j // STAGES) & 1
            # a fresh barrier counts as having completed the phase before phase 0: the first STAGES waits pass
            mbarrier.wait(kv_empty.index(stage), phase ^ 1)
            mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
            row = kv_row + j * block_n
            tma.async_copy_global_to_shared(k_desc, [row, 0], k_ready.index(stage), k_bufs.index(stage))
            mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [row, 0], v_ready.index(stage), v_bufs.index(stage))

    @gluon.jit
    def _consumer(q_desc, k_desc, v_desc, o_desc, q_smem, k_bufs, v_bufs, o_smem, q_bar, k_ready, v_ready, kv_empty,
                  q_row, kv_row, n_tiles, qk_scale, q_lo, causal_offset, lse_ptr, lse_size,
                  CAUSAL: gl.constexpr, STAGES: gl.constexpr, SPLIT_MASK: gl.constexpr, FMA_SOFTMAX: gl.constexpr,
                  PINGPONG: gl.constexpr, WHICH: gl.constexpr):
        """One warp group: its 64 query rows of the program's query tile (``_group_tile``), then their output."""
        m_i, l_i, acc = _group_tile(q_smem.index(WHICH), k_bufs, v_bufs, q_bar, 0, k_ready, v_ready, kv_empty,
                                    n_tiles, q_lo, qk_scale, causal_offset, CAUSAL, STAGES, SPLIT_MASK,
                                    FMA_SOFTMAX, PINGPONG, WHICH, q_desc.block_type.shape[1],
                                    k_desc.block_type.shape[0])
        _write_tile(m_i, l_i, acc, o_smem, o_desc, lse_ptr, lse_size, q_row, WHICH, False)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _attn_fwd_ws(q_desc, k_desc, v_desc, o_desc, Hq, GROUP, Sq, Skv, qk_scale, lse_ptr, lse_size, n_bh,
                     CAUSAL: gl.constexpr, STAGES: gl.constexpr, SPLIT_MASK: gl.constexpr,
                     FMA_SOFTMAX: gl.constexpr, PINGPONG: gl.constexpr, HEAVY_FIRST: gl.constexpr,
                     PERSISTENT: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        half: gl.constexpr = q_desc.block_type.shape[0]
        block_n: gl.constexpr = k_desc.block_type.shape[0]
        if PERSISTENT:
            _attn_fwd_persistent(q_desc, k_desc, v_desc, o_desc, Hq, GROUP, Sq, Skv, qk_scale, lse_ptr, lse_size,
                                 n_bh, CAUSAL, STAGES, SPLIT_MASK, FMA_SOFTMAX, PINGPONG, HEAVY_FIRST, CONSUMER_REGS,
                                 PRODUCER_REGS)
            return
        if CAUSAL and HEAVY_FIRST:   # late query blocks see the most keys: launch them first (as the tl kernels do)
            start = (gl.num_programs(0) - 1 - gl.program_id(0)) * 2 * half
        else:
            start = gl.program_id(0) * 2 * half      # the program's first query row within its head
        off_bh = gl.program_id(1)                    # b * Hq + h
        kv_bh = (off_bh // Hq) * (Hq // GROUP) + (off_bh % Hq) // GROUP
        q_row = off_bh * Sq + start
        kv_row = kv_bh * Skv
        causal_offset = Skv - Sq
        if CAUSAL:   # keys up to the last row's diagonal, bottom-right aligned
            n_tiles = gl.cdiv(gl.minimum(Skv, start + 2 * half + causal_offset), block_n)
        else:
            n_tiles = Skv // block_n

        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        o_smem = q_smem   # each group's output goes where its Q was (same shape and layout; Q is dead by then)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        # PINGPONG: two more barriers after the ring's, the consumer groups' turns
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES + 2 * PINGPONG, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)   # both consumer groups release a buffer
        if PINGPONG:
            mbarrier.init(kv_empty.index(STAGES), count=1)
            mbarrier.init(kv_empty.index(STAGES + 1), count=1)

        args0 = (q_desc, k_desc, v_desc, o_desc, q_smem, k_bufs, v_bufs, o_smem, q_bar, k_ready, v_ready, kv_empty,
                 q_row, kv_row, n_tiles, qk_scale, start, causal_offset, lse_ptr, lse_size, CAUSAL, STAGES,
                 SPLIT_MASK, FMA_SOFTMAX, PINGPONG, 0)
        args1 = (q_desc, k_desc, v_desc, o_desc, q_smem, k_bufs, v_bufs, o_smem, q_bar, k_ready, v_ready, kv_empty,
                 q_row, kv_row, n_tiles, qk_scale, start, causal_offset, lse_ptr, lse_size, CAUSAL, STAGES,
                 SPLIT_MASK, FMA_SOFTMAX, PINGPONG, 1)
        # the default partition (this program's 4 warps) is consumer 0; the workers: consumer 1 and the producer
        gl.warp_specialize([(_consumer, args0), (_consumer, args1), (_producer, args0)],
                           [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _check(q, k, v, causal: bool, block_n: int) -> None:
    """ValueError naming the argument for inputs outside this kernel's scope (module docstring)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S, D]")
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name} has dtype {t.dtype}; the Gluon kernel takes float16 or bfloat16")
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B={B}, Hkv, Skv, D={D}]")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if Hq % k.shape[1]:
        raise ValueError(f"q has {Hq} heads, not a multiple of k's {k.shape[1]}")
    if D not in (64, 128):
        raise ValueError(f"head_dim D={D}; the Gluon kernel is written for D in (64, 128)")
    if Sq % BLOCK_M or k.shape[2] % block_n or not Sq or not k.shape[2]:
        raise ValueError(f"Sq={Sq} must be a positive multiple of {BLOCK_M} and Skv={k.shape[2]} of BLOCK_N={block_n}")
    if causal and k.shape[2] < Sq:
        raise ValueError(f"causal with Skv={k.shape[2]} < Sq={Sq}: rows that see no key are not handled here")


def _check_config(config: dict | None) -> dict:
    """DEFAULT_CONFIG with ``config``'s overrides; ValueError naming a key it does not have."""
    unknown = sorted(set(config or {}) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; the Gluon kernel's are {sorted(DEFAULT_CONFIG)}")
    return {**DEFAULT_CONFIG, **(config or {})}


def outside_scope(q, k, v, causal: bool, config: dict | None = None) -> str | None:
    """None when this kernel's scope covers the call (module docstring; the GPU aside: ``gluon_status``), else why
    not: the ValueError's message that ``flash_attention_gluon`` would raise."""
    try:
        _check(q, k, v, causal, _check_config(config)["BLOCK_N"])
    except ValueError as exc:
        return str(exc)
    return None


def _launch_args(q, k, v, causal: bool, sm_scale: float | None, config: dict, return_lse: bool = False):
    """(grid, args, kwargs, out, lse) of one launch; lse [B, Hq, Sq] float32 when return_lse, else a placeholder
    the kernel never writes."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    block_n, dt = config["BLOCK_N"], gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    q2, k2, v2 = (t.contiguous().view(-1, D) for t in (q, k, v))
    out = torch.empty((B * Hq * Sq, D), device=q.device, dtype=q.dtype)
    q_layout = gl.NVMMASharedLayout.get_default_for([HALF_M, D], dt)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, D], dt)
    descs = (TensorDescriptor.from_tensor(q2, [HALF_M, D], q_layout),
             TensorDescriptor.from_tensor(k2, [block_n, D], kv_layout),
             TensorDescriptor.from_tensor(v2, [block_n, D], kv_layout),
             TensorDescriptor.from_tensor(out, [HALF_M, D], q_layout))
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    lse = torch.empty((B, Hq, Sq) if return_lse else (1,), device=q.device, dtype=torch.float32)
    args = (*descs, Hq, Hq // Hkv, Sq, Skv, scale * LOG2E, lse, lse.numel() if return_lse else 0, B * Hq)
    kwargs = dict(CAUSAL=bool(causal), STAGES=config["STAGES"],
                  SPLIT_MASK=bool(config["SPLIT_MASK"]), FMA_SOFTMAX=bool(config["FMA_SOFTMAX"]),
                  PINGPONG=bool(config["PINGPONG"]), HEAVY_FIRST=bool(config["HEAVY_FIRST"]),
                  PERSISTENT=bool(config["PERSISTENT"]),
                  CONSUMER_REGS=config["consumer_regs"],
                  PRODUCER_REGS=config["producer_regs"], num_warps=4, maxnreg=config["maxnreg"])
    if config["PERSISTENT"]:   # one program per SM, each looping over query tiles
        return (min(Sq // BLOCK_M * B * Hq, _num_sms(q.device)), 1), args, kwargs, out, lse
    return (Sq // BLOCK_M, B * Hq), args, kwargs, out, lse


def _num_sms(device: torch.device) -> int:
    """SMs of the GPU (132 on an H100 SXM); a stand-in for CPU tensors (cross-compiling: the grid is not compiled)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def flash_attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                          sm_scale: float | None = None, return_lse: bool = False,
                          config: dict | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · sm_scale) v, forward only. q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D] (Hq % Hkv == 0).
    return_lse: also the log-sum-exp of each row of scaled scores, [B, Hq, Sq] float32, natural log (as
    ``kernels.flash_attention`` returns it). config: keys of ``DEFAULT_CONFIG`` to override. ValueError for inputs
    outside the scope in the module docstring, RuntimeError where the kernel cannot run (``gluon_status``)."""
    config = _check_config(config)
    _check(q, k, v, causal, config["BLOCK_N"])
    why = gluon_status()
    if why is not None:
        raise RuntimeError(f"the Gluon FlashAttention kernel cannot run here: {why}")
    grid, args, kwargs, out, lse = _launch_args(q, k, v, causal, sm_scale, config, return_lse)
    _attn_fwd_ws[grid](*args, **kwargs)
    return (out.view(q.shape), lse) if return_lse else out.view(q.shape)


def _compile_for(D: int, causal: bool, dtype: str, config: dict, arch: int) -> dict:
    """Compile for sm_``arch`` in this process (the interpreter must be off): what the compiled kernel says of
    itself. CPU tensors stand in for the shapes; no GPU is touched."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    config = _check_config(config)
    q = torch.empty(1, 2, 256, D, dtype=getattr(torch, dtype))
    k = v = torch.empty(1, 1, 256, D, dtype=getattr(torch, dtype))
    _check(q, k, v, causal, config["BLOCK_N"])
    _, args, kwargs, _, _ = _launch_args(q, k, v, causal, None, config)
    names = _attn_fwd_ws.arg_names
    constexprs = {name: kwargs[name] for name in names[len(args):]}
    signature = {name: mangle_type(arg) for name, arg in zip(names, args)} | {n: "constexpr" for n in constexprs}
    src = GluonASTSource(_attn_fwd_ws, signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=kwargs["num_warps"], maxnreg=kwargs["maxnreg"]))
    ptx = compiled.asm["ptx"]
    # ptxas -v on the PTX: the registers a thread starts with and the bytes spilled to local memory
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        info = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", path, "-o", os.devnull],
                              capture_output=True, text=True)
    report = info.stdout + info.stderr
    spills = re.search(r"(\d+) bytes spill stores", report)
    regs = re.search(r"Used (\d+) registers", report)
    return dict(triton=triton.__version__, arch=arch, D=D, causal=causal, dtype=dtype, config=config,
                shared_bytes=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                wgmma=ptx.count("wgmma.mma_async"), tma_loads=ptx.count("cp.async.bulk.tensor"),
                setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+);", ptx))),
                ptxas_registers=int(regs.group(1)) if regs else None,
                spill_store_bytes=int(spills.group(1)) if spills else None)


def cross_compile(D: int = 128, causal: bool = False, dtype: str = "float16", config: dict | None = None,
                  arch: int = 90, timeout: float = 600.0) -> dict:
    """Compile the kernel for sm_``arch`` without a GPU, in a fresh Python whose Triton is not in interpreter mode
    (this process's may be: ``kernels.device``): a dict with Triton's version, the shared memory and warps of the
    compiled kernel, counts read from its PTX (``wgmma.mma_async`` instructions, TMA loads, the ``setmaxnreg``
    register reallocations of the warp-specialized partitions as (inc/dec, count) pairs) and what ``ptxas -v`` says
    of it (registers per thread at launch, bytes spilled). RuntimeError with the compiler's message if it fails."""
    # a bare ``kernels`` package: its __init__ would import kernels.device, which turns the interpreter on (no GPU)
    code = ("import importlib, json, sys, types\n"
            f"pkg = types.ModuleType('kernels'); pkg.__path__ = [{os.path.dirname(__file__)!r}]\n"
            "sys.modules['kernels'] = pkg\n"
            "m = importlib.import_module('kernels.flash_attention_gluon')\n"
            f"print(json.dumps(m._compile_for({D}, {bool(causal)}, {dtype!r}, {config or {}!r}, {arch})))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode:
        raise RuntimeError(f"cross-compiling for sm_{arch} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
