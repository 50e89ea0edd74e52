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
"empty" barrier (count 2). Each consumer: S = Q Kᵀ (``warpgroup_mma``, A and B from shared memory), the online softmax
in the accumulator's registers, P converted to the A-operand register layout, O += P V. Causal masking is bottom-right
aligned, as in ``kernels.flash_attention``. ``ROTATE`` adds FA3's other overlap, inside one group: tile j+1's QK^T is
issued before tile j's softmax (what ``tma_rot`` does in ``tl``; here 64-row groups leave registers for two score
tiles: ``cross_compile`` reports no spill). More switches, off by default until a GPU has measured them (with all
off the kernel is the first measured version, fd08f7e, plus the epilogue's masked LSE store): ``SPLIT_MASK`` runs
a causal group's tiles below its diagonal without the comparison and masks only the ones that cross it, as the
``tl`` kernels do; ``FMA_SOFTMAX`` keeps the running max in scaled units, so each score costs one FMA before its exp2
instead of a multiply (for the max) and an FMA; ``PINGPONG`` is FA3's inter-warpgroup schedule: the two consumer
groups take turns (two more mbarriers) to issue their matmuls, QKᵀ of tile j with P·V of tile j-1, so that one
group's softmax runs while the other's matmuls do by construction rather than by the warp scheduler's choice;
``HEAVY_FIRST`` launches a causal head's last query blocks (the ones that see the most keys) first, so that the short
ones fill the end of the GPU's schedule, as the ``tl`` kernels have always done (this kernel's first version did not);
``PERSISTENT`` is FA3's persistent scheduler: one program per SM takes query tile after query tile, the K/V ring and
the turns running on across them, the next tile's first K/V load and its Q in flight while the current tile ends
(the output gets its own shared buffer so that Q's can be refilled early). Its barrier protocol was model-checked in
plain Python (random interleavings, with and without ping-pong, 2 and 3 buffers; mutations of it deadlock or fail).

Scope (an experiment measured against the ``tl`` kernels, not the library's default): forward only (each row's
log-sum-exp on request, ``return_lse``, what a backward pass needs), float16 /
bfloat16, D in {64, 128}, Sq a multiple of 128 and Skv a multiple of BLOCK_N, Skv >= Sq when causal, on an sm_90
GPU. Anything else raises a ValueError naming the argument. There is no interpreter for Gluon: its tests run on a
GPU, and on a CPU the kernel is only compiled for sm_90 (``cross_compile``, in a subprocess where the interpreter
is off), which checks that it lowers. For that reason this module does not import ``kernels.device`` itself (the
package's ``__init__`` does, for every other kernel).
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
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    gluon = gl = None

LOG2E = 1.4426950408889634
BLOCK_M = 128            # query rows per program: two consumer warp groups of 64 rows
HALF_M = BLOCK_M // 2
#: launch parameters (measured choices go here; ``config`` overrides them per call)
DEFAULT_CONFIG = dict(BLOCK_N=128, STAGES=2, ROTATE=False, SPLIT_MASK=False, FMA_SOFTMAX=False, PINGPONG=False,
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
                  CAUSAL: gl.constexpr, STAGES: gl.constexpr, ROTATE: gl.constexpr, SPLIT_MASK: gl.constexpr,
                  FMA_SOFTMAX: gl.constexpr, PINGPONG: gl.constexpr, WHICH: gl.constexpr):
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
    def _softmax_tile(s, j, m_i, l_i, acc, rows, qk_scale, causal_offset, MASK: gl.constexpr,
                      FMA_SOFTMAX: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                      p_layout: gl.constexpr, dtype: gl.constexpr, RESCALE: gl.constexpr = True):
        """One key tile's online-softmax update: scores s [rows, BLOCK_N] (unscaled) -> the new running max and
        sum, the output accumulator rescaled (unless RESCALE is off: a P·V matmul may still be adding into it, and
        the caller rescales it later by the returned alpha), p in the register layout of the P·V matmul's A operand,
        and alpha in the accumulator's row layout. MASK: the causal comparison (bottom-right aligned). FMA_SOFTMAX:
        the max is kept in scaled log2 units, so each score costs one fused multiply-add before its exp2 instead of
        a multiply and a subtract."""
        block_n: gl.constexpr = s.shape[1]
        if not FMA_SOFTMAX:
            s = s * qk_scale
        if MASK:   # bottom-right: query row i sees keys <= i + Skv - Sq
            cols = j * block_n + gl.arange(0, block_n, layout=gl.SliceLayout(0, s_layout))
            visible = gl.expand_dims(rows + causal_offset, 1) >= gl.expand_dims(cols, 0)
            s = gl.where(visible, s, float("-inf"))
        if FMA_SOFTMAX:
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(gl.fma(s, qk_scale, -gl.expand_dims(m_new, 1)))
        else:
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
        if RESCALE:
            acc = acc * gl.expand_dims(alpha_o, 1)
        p16 = gl.convert_layout(p.to(dtype), p_layout)
        return m_new, l_i, acc, p16, alpha_o

    @gluon.jit
    def _attend_tiles(q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, lo, hi, m_i, l_i, acc, s_zero, rows, qk_scale,
                      causal_offset, MASK: gl.constexpr, FMA_SOFTMAX: gl.constexpr, STAGES: gl.constexpr,
                      s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr, dtype: gl.constexpr,
                      ring=0):
        """Key tiles lo ... hi - 1 for one warp group: wait for the tile, S = Q Kᵀ, softmax, O += P V, release.
        ring: how many tiles went through the ring before this query tile's first (PERSISTENT; else 0)."""
        for j in range(lo, hi):
            stage = (ring + j) % STAGES
            phase = ((ring + j) // STAGES) & 1
            mbarrier.wait(k_ready.index(stage), phase)
            s = warpgroup_mma(q, k_bufs.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            m_i, l_i, acc, p, _ = _softmax_tile(s, j, m_i, l_i, acc, rows, qk_scale, causal_offset, MASK, FMA_SOFTMAX,
                                             s_layout, o_layout, p_layout, dtype)
            mbarrier.wait(v_ready.index(stage), phase)
            acc = warpgroup_mma(p, v_bufs.index(stage), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(kv_empty.index(stage), count=1)   # this group is done with the buffer
        return m_i, l_i, acc

    @gluon.jit
    def _pingpong_tiles(q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, n_tiles, m_i, l_i, acc, s_zero, rows,
                        qk_scale, causal_offset, WHICH: gl.constexpr, CAUSAL: gl.constexpr,
                        FMA_SOFTMAX: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
                        o_layout: gl.constexpr, p_layout: gl.constexpr, dtype: gl.constexpr, ring=0, turn=0):
        """FlashAttention-3's ping-pong: the two consumer groups take turns to *issue* their matmuls, so that one
        group's softmax runs while the other's matmuls do, instead of leaving it to the warp scheduler. A turn is an
        mbarrier per group (``kv_empty[STAGES + WHICH]``, one arrival completes it), passed to the other group as
        soon as this one's matmuls are issued. In turn j a group issues S = Q K_jᵀ and O += P_(j-1) V_(j-1) (the
        previous tile's, rotated as in FA3), passes the turn, waits for S only, runs tile j's softmax, then waits
        for O. Causal, every tile is masked. Turn t of group 0 waits on phase (t & 1) ^ 1 (a fresh barrier counts
        as having completed phase 1, so its first turn passes), of group 1 on phase t & 1: strict alternation.
        ring, turn (PERSISTENT): the tiles and turns of this program's earlier query tiles (n_tiles + 1 turns each),
        so that ring phases and turns continue across them; else 0."""
        my_turn = kv_empty.index(STAGES + WHICH)
        their_turn = kv_empty.index(STAGES + 1 - WHICH)
        mbarrier.wait(k_ready.index(ring % STAGES), (ring // STAGES) & 1)
        mbarrier.wait(my_turn, (turn & 1) ^ (WHICH ^ 1))                    # turn 0
        s = warpgroup_mma(q, k_bufs.index(ring % STAGES).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.arrive(their_turn, count=1)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        m_i, l_i, acc, p, alpha = _softmax_tile(s, 0, m_i, l_i, acc, rows, qk_scale, causal_offset, CAUSAL,
                                                FMA_SOFTMAX, s_layout, o_layout, p_layout, dtype, RESCALE=False)
        for j in range(1, n_tiles):                                         # turn j
            prev = (ring + j - 1) % STAGES
            stage = (ring + j) % STAGES
            mbarrier.wait(k_ready.index(stage), ((ring + j) // STAGES) & 1)
            mbarrier.wait(v_ready.index(prev), ((ring + j - 1) // STAGES) & 1)
            mbarrier.wait(my_turn, ((turn + j) & 1) ^ (WHICH ^ 1))
            s = warpgroup_mma(q, k_bufs.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            acc = acc * gl.expand_dims(alpha, 1)
            acc = warpgroup_mma(p, v_bufs.index(prev), acc, is_async=True)
            mbarrier.arrive(their_turn, count=1)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))            # S_j done; P_(j-1) V may still run
            m_i, l_i, acc, p, alpha = _softmax_tile(s, j, m_i, l_i, acc, rows, qk_scale, causal_offset, CAUSAL,
                                                    FMA_SOFTMAX, s_layout, o_layout, p_layout, dtype, RESCALE=False)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(kv_empty.index(prev), count=1)                  # this group is done with tile j-1
        last = ring + n_tiles - 1
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        mbarrier.wait(my_turn, ((turn + n_tiles) & 1) ^ (WHICH ^ 1))        # turn n_tiles: the last P V
        acc = acc * gl.expand_dims(alpha, 1)
        acc = warpgroup_mma(p, v_bufs.index(last % STAGES), acc, is_async=True)
        mbarrier.arrive(their_turn, count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(last % STAGES), count=1)
        return m_i, l_i, acc

    @gluon.jit
    def _group_tile(q, k_bufs, v_bufs, q_bar, q_phase, k_ready, v_ready, kv_empty, n_tiles, q_lo, qk_scale,
                    causal_offset, CAUSAL: gl.constexpr, STAGES: gl.constexpr, ROTATE: gl.constexpr,
                    SPLIT_MASK: gl.constexpr, FMA_SOFTMAX: gl.constexpr, PINGPONG: gl.constexpr, WHICH: gl.constexpr,
                    head_dim: gl.constexpr, block_n: gl.constexpr, ring=0, turn=0):
        """One warp group's 64 query rows of one query tile (its first row q_lo within the head): once its Q half has
        arrived (``q_bar`` completing phase ``q_phase``), the online softmax over every key tile -> the running max,
        sum and output accumulator. ROTATE: tile j+1's QK^T is issued before tile j's softmax and runs on the Tensor
        Cores while it does (FA3's intra-warpgroup overlap; two score tiles live in registers; causal, it masks every
        tile; not with ``ring``). SPLIT_MASK (the plain loop, causal): the tiles below every row's diagonal first,
        without the comparison, then the ones that cross it, as the ``tl`` kernels do. ring, turn: PERSISTENT's
        counters of the program's earlier query tiles."""
        half: gl.constexpr = q.shape[0]
        dtype: gl.constexpr = q.dtype
        # wgmma accumulators: 4 warps along M (16 rows each), instruction N = the tile's width
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, block_n, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, head_dim, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)

        m_i = gl.full([half], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([half], gl.float32, layout=row_s)
        acc = gl.zeros([half, head_dim], gl.float32, layout=o_layout)
        s_zero = gl.zeros([half, block_n], gl.float32, layout=s_layout)
        rows = q_lo + WHICH * half + gl.arange(0, half, layout=row_s)   # this group's query rows within the head
        mbarrier.wait(q_bar, q_phase)
        if PINGPONG:
            m_i, l_i, acc = _pingpong_tiles(q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, n_tiles, m_i, l_i, acc,
                                            s_zero, rows, qk_scale, causal_offset, WHICH, CAUSAL, FMA_SOFTMAX, STAGES,
                                            s_layout, o_layout, p_layout, dtype, ring, turn)
        elif ROTATE:
            mbarrier.wait(k_ready.index(0), 0)
            s = warpgroup_mma(q, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            for j in range(n_tiles - 1):
                stage = j % STAGES
                nxt = (j + 1) % STAGES
                mbarrier.wait(k_ready.index(nxt), ((j + 1) // STAGES) & 1)
                s_next = warpgroup_mma(q, k_bufs.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                m_i, l_i, acc, p, _ = _softmax_tile(s, j, m_i, l_i, acc, rows, qk_scale, causal_offset, CAUSAL,
                                                 FMA_SOFTMAX, s_layout, o_layout, p_layout, dtype)
                mbarrier.wait(v_ready.index(stage), (j // STAGES) & 1)
                acc = warpgroup_mma(p, v_bufs.index(stage), acc, is_async=True)
                acc, s = warpgroup_mma_wait(num_outstanding=0, deps=(acc, s_next))
                mbarrier.arrive(kv_empty.index(stage), count=1)   # this group is done with the buffer
            last = n_tiles - 1
            m_i, l_i, acc, p, _ = _softmax_tile(s, last, m_i, l_i, acc, rows, qk_scale, causal_offset, CAUSAL,
                                             FMA_SOFTMAX, s_layout, o_layout, p_layout, dtype)
            mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
            acc = warpgroup_mma(p, v_bufs.index(last % STAGES), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(kv_empty.index(last % STAGES), count=1)
        elif SPLIT_MASK and CAUSAL:   # tiles below every row of this group's diagonal, then the ones crossing it
            n_full = gl.minimum((q_lo + WHICH * half + causal_offset + 1) // block_n, n_tiles)
            m_i, l_i, acc = _attend_tiles(q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, 0, n_full, m_i, l_i, acc,
                                          s_zero, rows, qk_scale, causal_offset, False, FMA_SOFTMAX, STAGES, s_layout,
                                          o_layout, p_layout, dtype, ring)
            m_i, l_i, acc = _attend_tiles(q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, n_full, n_tiles, m_i, l_i,
                                          acc, s_zero, rows, qk_scale, causal_offset, True, FMA_SOFTMAX, STAGES,
                                          s_layout, o_layout, p_layout, dtype, ring)
        else:
            m_i, l_i, acc = _attend_tiles(q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, 0, n_tiles, m_i, l_i, acc,
                                          s_zero, rows, qk_scale, causal_offset, CAUSAL, FMA_SOFTMAX, STAGES,
                                          s_layout, o_layout, p_layout, dtype, ring)
        return m_i, l_i, acc

    @gluon.jit
    def _write_tile(m_i, l_i, acc, o_smem, o_desc, lse_ptr, lse_size, q_row, WHICH: gl.constexpr,
                    WAIT_FIRST: gl.constexpr):
        """A group's output rows (acc / l) through its shared buffer and a TMA store, and their log-sum-exp of the
        scaled scores (natural log, the portable kernel's; m and l are in log2 units) where lse_size > 0. A masked
        store rather than `if RETURN_LSE`: with the store only in the worker partition (the default one folds a
        false constexpr away), Triton 3.6's lowering to LLVM fails. WAIT_FIRST (PERSISTENT): the buffer's previous
        tile must have left it first."""
        half: gl.constexpr = acc.shape[0]
        offs = (q_row + WHICH * half).to(gl.int64) + gl.arange(0, half, layout=m_i.type.layout)
        gl.store(lse_ptr + offs, (m_i + gl.log2(l_i)) * 0.6931471805599453, mask=offs < lse_size)
        out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, acc.type.layout)), 1)
        if WAIT_FIRST:
            tma.store_wait(pendings=0)
        o_smem.index(WHICH).store(out.to(o_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [q_row + WHICH * half, 0], o_smem.index(WHICH))

    @gluon.jit
    def _consumer(q_desc, k_desc, v_desc, o_desc, q_smem, k_bufs, v_bufs, o_smem, q_bar, k_ready, v_ready, kv_empty,
                  q_row, kv_row, n_tiles, qk_scale, q_lo, causal_offset, lse_ptr, lse_size,
                  CAUSAL: gl.constexpr, STAGES: gl.constexpr, ROTATE: gl.constexpr, SPLIT_MASK: gl.constexpr,
                  FMA_SOFTMAX: gl.constexpr, PINGPONG: gl.constexpr, WHICH: gl.constexpr):
        """One warp group: its 64 query rows of the program's query tile (``_group_tile``), then their output."""
        m_i, l_i, acc = _group_tile(q_smem.index(WHICH), k_bufs, v_bufs, q_bar, 0, k_ready, v_ready, kv_empty,
                                    n_tiles, q_lo, qk_scale, causal_offset, CAUSAL, STAGES, ROTATE, SPLIT_MASK,
                                    FMA_SOFTMAX, PINGPONG, WHICH, q_desc.block_type.shape[1],
                                    k_desc.block_type.shape[0])
        _write_tile(m_i, l_i, acc, o_smem, o_desc, lse_ptr, lse_size, q_row, WHICH, False)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _work_coords(work, n_bh, Hq, GROUP, Sq, Skv, CAUSAL: gl.constexpr, HEAVY_FIRST: gl.constexpr,
                     half: gl.constexpr, block_n: gl.constexpr):
        """PERSISTENT: query tile ``work`` of the n_bh · Sq/128 -> (its first row in q's [B·Hq·Sq, D] view, its kv
        head's first row in k's view, its key tiles, its first query row within the head). The query tiles of one
        head are neighbours (its K/V stays in L2); causal with HEAVY_FIRST, the last query block of every head comes
        first, then the one before, ..., so that every program's next tile is no heavier than its last."""
        n_m = Sq // (2 * half)
        if CAUSAL and HEAVY_FIRST:
            bh = work % n_bh
            start = (n_m - 1 - work // n_bh) * 2 * half
        else:
            bh = work // n_m
            start = (work % n_m) * 2 * half
        kv_bh = (bh // Hq) * (Hq // GROUP) + (bh % Hq) // GROUP
        if CAUSAL:   # keys up to the last row's diagonal, bottom-right aligned
            n_tiles = gl.cdiv(gl.minimum(Skv, start + 2 * half + Skv - Sq), block_n)
        else:
            n_tiles = Skv // block_n
        return bh * Sq + start, kv_bh * Skv, n_tiles, start

    @gluon.jit
    def _producer_persistent(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty,
                             n_bh, Hq, GROUP, Sq, Skv, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
                             PINGPONG: gl.constexpr, HEAVY_FIRST: gl.constexpr):
        """PERSISTENT's producer: for each query tile of this program, its K/V tiles into the ring (whose counter runs
        on across query tiles) and, after the first of them, its Q halves, once both consumer groups have released
        the last tile's (``q_empty``, the barrier after the ring's and the turns'). The next tile's first K/V tile
        is thus in flight while the consumers finish the current one."""
        half: gl.constexpr = q_desc.block_type.shape[0]
        block_n: gl.constexpr = k_desc.block_type.shape[0]
        q_empty = kv_empty.index(STAGES + 2 * PINGPONG)
        ring = 0
        it = 0
        for work in range(gl.program_id(0), n_bh * (Sq // (2 * half)), gl.num_programs(0)):
            q_row, kv_row, n_tiles, start = _work_coords(work, n_bh, Hq, GROUP, Sq, Skv, CAUSAL, HEAVY_FIRST, half,
                                                         block_n)
            for j in range(n_tiles):
                c = ring + j
                stage = c % STAGES
                mbarrier.wait(kv_empty.index(stage), ((c // STAGES) & 1) ^ 1)
                mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [kv_row + j * block_n, 0], k_ready.index(stage),
                                                k_bufs.index(stage))
                mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(v_desc, [kv_row + j * block_n, 0], v_ready.index(stage),
                                                v_bufs.index(stage))
                if j == 0:   # a fresh q_empty counts as having completed phase 1: the first tile's wait passes
                    mbarrier.wait(q_empty, (it & 1) ^ 1)
                    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem.index(0))
                    tma.async_copy_global_to_shared(q_desc, [q_row + half, 0], q_bar, q_smem.index(1))
            ring += n_tiles
            it += 1

    @gluon.jit
    def _consumer_persistent(q_desc, k_desc, v_desc, o_desc, q_smem, k_bufs, v_bufs, o_smem, q_bar, k_ready,
                             v_ready, kv_empty, n_bh, Hq, GROUP, Sq, Skv, qk_scale, lse_ptr, lse_size,
                             CAUSAL: gl.constexpr, STAGES: gl.constexpr, SPLIT_MASK: gl.constexpr,
                             FMA_SOFTMAX: gl.constexpr, PINGPONG: gl.constexpr, HEAVY_FIRST: gl.constexpr,
                             WHICH: gl.constexpr):
        """PERSISTENT's consumer group: ``_consumer``'s work for each query tile of this program, the ring's and the
        turns' counters running on across tiles. Q is released (``q_empty``) as soon as the tile's last QKᵀ is done,
        and the output leaves through its own buffer (not Q's), so the next Q can arrive during the epilogue."""
        half: gl.constexpr = q_desc.block_type.shape[0]
        block_n: gl.constexpr = k_desc.block_type.shape[0]
        q_empty = kv_empty.index(STAGES + 2 * PINGPONG)
        ring = 0
        turn = 0
        it = 0
        for work in range(gl.program_id(0), n_bh * (Sq // (2 * half)), gl.num_programs(0)):
            q_row, kv_row, n_tiles, start = _work_coords(work, n_bh, Hq, GROUP, Sq, Skv, CAUSAL, HEAVY_FIRST, half,
                                                         block_n)
            m_i, l_i, acc = _group_tile(q_smem.index(WHICH), k_bufs, v_bufs, q_bar, it & 1, k_ready, v_ready,
                                        kv_empty, n_tiles, start, qk_scale, Skv - Sq, CAUSAL, STAGES, False,
                                        SPLIT_MASK, FMA_SOFTMAX, PINGPONG, WHICH, q_desc.block_type.shape[1],
                                        block_n, ring, turn)
            mbarrier.arrive(q_empty, count=1)   # this group's QKᵀ are done: the producer may load the next Q
            ring += n_tiles
            turn += n_tiles + 1
            it += 1
            _write_tile(m_i, l_i, acc, o_smem, o_desc, lse_ptr, lse_size, q_row, WHICH, True)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _attn_fwd_persistent(q_desc, k_desc, v_desc, o_desc, Hq, GROUP, Sq, Skv, qk_scale, lse_ptr, lse_size, n_bh,
                             CAUSAL: gl.constexpr, STAGES: gl.constexpr, SPLIT_MASK: gl.constexpr,
                             FMA_SOFTMAX: gl.constexpr, PINGPONG: gl.constexpr, HEAVY_FIRST: gl.constexpr,
                             CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        """PERSISTENT: one program per SM (the grid: ``min(query tiles, SMs)``) takes query tiles pid, pid + grid,
        ... (``_work_coords``). Its shared memory: the Q halves, the output halves in their own buffers, the K/V
        ring; its barriers: the ring's, the turns' (PINGPONG) and ``q_empty`` (both groups done with a Q)."""
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        o_smem = gl.allocate_shared_memory(o_desc.dtype, [2] + o_desc.block_type.shape, o_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES + 2 * PINGPONG + 1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)
        if PINGPONG:
            mbarrier.init(kv_empty.index(STAGES), count=1)
            mbarrier.init(kv_empty.index(STAGES + 1), count=1)
        mbarrier.init(kv_empty.index(STAGES + 2 * PINGPONG), count=2)   # q_empty: both groups release their Q
        consumer0 = (q_desc, k_desc, v_desc, o_desc, q_smem, k_bufs, v_bufs, o_smem, q_bar, k_ready, v_ready,
                     kv_empty, n_bh, Hq, GROUP, Sq, Skv, qk_scale, lse_ptr, lse_size, CAUSAL, STAGES, SPLIT_MASK,
                     FMA_SOFTMAX, PINGPONG, HEAVY_FIRST, 0)
        consumer1 = (q_desc, k_desc, v_desc, o_desc, q_smem, k_bufs, v_bufs, o_smem, q_bar, k_ready, v_ready,
                     kv_empty, n_bh, Hq, GROUP, Sq, Skv, qk_scale, lse_ptr, lse_size, CAUSAL, STAGES, SPLIT_MASK,
                     FMA_SOFTMAX, PINGPONG, HEAVY_FIRST, 1)
        producer = (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, n_bh, Hq,
                    GROUP, Sq, Skv, CAUSAL, STAGES, PINGPONG, HEAVY_FIRST)
        gl.warp_specialize([(_consumer_persistent, consumer0), (_consumer_persistent, consumer1),
                            (_producer_persistent, producer)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

    @gluon.jit
    def _attn_fwd_ws(q_desc, k_desc, v_desc, o_desc, Hq, GROUP, Sq, Skv, qk_scale, lse_ptr, lse_size, n_bh,
                     CAUSAL: gl.constexpr, STAGES: gl.constexpr, ROTATE: gl.constexpr, SPLIT_MASK: gl.constexpr,
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
                 ROTATE, SPLIT_MASK, FMA_SOFTMAX, PINGPONG, 0)
        args1 = (q_desc, k_desc, v_desc, o_desc, q_smem, k_bufs, v_bufs, o_smem, q_bar, k_ready, v_ready, kv_empty,
                 q_row, kv_row, n_tiles, qk_scale, start, causal_offset, lse_ptr, lse_size, CAUSAL, STAGES,
                 ROTATE, SPLIT_MASK, FMA_SOFTMAX, PINGPONG, 1)
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
    if Sq % BLOCK_M or k.shape[2] % block_n:
        raise ValueError(f"Sq={Sq} must be a multiple of {BLOCK_M} and Skv={k.shape[2]} of BLOCK_N={block_n}")
    if causal and k.shape[2] < Sq:
        raise ValueError(f"causal with Skv={k.shape[2]} < Sq={Sq}: rows that see no key are not handled here")


def _check_config(config: dict) -> None:
    """ValueError for switches this kernel does not combine."""
    if config["PERSISTENT"] and config["ROTATE"]:
        raise ValueError("config: PERSISTENT is written for the plain, split and ping-pong loops, not ROTATE")


def outside_scope(q, k, v, causal: bool, config: dict | None = None) -> str | None:
    """None when this kernel's scope covers the call (module docstring; the GPU aside: ``gluon_status``), else why
    not: the ValueError's message that ``flash_attention_gluon`` would raise."""
    try:
        _check(q, k, v, causal, {**DEFAULT_CONFIG, **(config or {})}["BLOCK_N"])
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
    kwargs = dict(CAUSAL=bool(causal), STAGES=config["STAGES"], ROTATE=bool(config["ROTATE"]),
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
    config = {**DEFAULT_CONFIG, **(config or {})}
    _check(q, k, v, causal, config["BLOCK_N"])
    _check_config(config)
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

    config = {**DEFAULT_CONFIG, **config}
    q = torch.empty(1, 2, 256, D, dtype=getattr(torch, dtype))
    k = v = torch.empty(1, 1, 256, D, dtype=getattr(torch, dtype))
    _check(q, k, v, causal, config["BLOCK_N"])
    _check_config(config)
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
    code = ("import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('flash_attention_gluon_xc', {__file__!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"print(json.dumps(m._compile_for({D}, {bool(causal)}, {dtype!r}, {config or {}!r}, {arch})))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode:
        raise RuntimeError(f"cross-compiling for sm_{arch} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
