"""One consumer warp group's work in the Gluon FlashAttention forward (``kernels.flash_attention_gluon``): its 64
query rows of one 128-row query tile against every key tile of the K/V ring, then its output.

``_group_tile`` is the whole of it: the online softmax's state in the registers of ``warpgroup_mma``'s accumulator
layout, then one of three loops over the key tiles:

* ``_attend_tiles``, the plain loop: wait for tile j, S = Q Kᵀ, the softmax (``_softmax_tile``), O += P V, release the
  buffer. Causal with ``SPLIT_MASK``, it runs twice: the tiles below every row's diagonal without the comparison,
  then the ones that cross it.
* ``_pingpong_tiles``, FlashAttention-3's schedule: the two groups take turns, on two more mbarriers, to issue QKᵀ of
  tile j with P·V of tile j-1; a group's softmax then runs while the other group's matmuls do.

``_write_tile`` divides by the softmax's sum and stores the rows through shared memory and a TMA store, with their
log-sum-exp. ``ring`` and ``turn`` carry a persistent program's counters across its query tiles
(``kernels.flash_attention_gluon_persistent``). Like the kernel's module, this one never imports ``kernels.device``:
Gluon has no interpreter, and on a CPU it is only compiled for sm_90.
"""
from __future__ import annotations

try:  # Gluon ships with Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
except ImportError:  # pragma: no cover - older Triton
    gluon = gl = None


if gl is not None:

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
                    causal_offset, CAUSAL: gl.constexpr, STAGES: gl.constexpr, SPLIT_MASK: gl.constexpr,
                    FMA_SOFTMAX: gl.constexpr, PINGPONG: gl.constexpr, WHICH: gl.constexpr, head_dim: gl.constexpr,
                    block_n: gl.constexpr, ring=0, turn=0):
        """One warp group's 64 query rows of one query tile (its first row q_lo within the head): once its Q half has
        arrived (``q_bar`` completing phase ``q_phase``), the online softmax over every key tile -> the running max,
        sum and output accumulator. SPLIT_MASK (the plain loop, causal): the tiles below every row's diagonal first,
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
