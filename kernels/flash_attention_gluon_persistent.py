"""The Gluon FlashAttention forward's ``PERSISTENT`` mode (``kernels.flash_attention_gluon``): FlashAttention-3's
persistent scheduler, one program per SM taking query tile after query tile.

A one-tile program pays its start and its end every time: Q's load, the K/V ring filling up, the output's store. A
persistent program keeps one ring and one set of barriers: the ring's counter and the ping-pong turns run on across
its query tiles (``ring``, ``turn``), the next tile's first K/V tile is loaded while the consumers finish the current
one, and so is its Q, once both groups have released theirs (``q_empty``, after their last QKᵀ: the output has its
own shared buffer, where the one-tile kernel reuses Q's). ``_work_coords`` maps a tile number to its rows; causal
with ``HEAVY_FIRST`` the heaviest tiles come first. The protocol was model-checked in plain Python (random
interleavings, with and without ping-pong, 2 and 3 buffers; mutations of it deadlock or fail).
"""
from __future__ import annotations

try:  # Gluon ships with Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
except ImportError:  # pragma: no cover - older Triton
    gluon = gl = None

if gl is not None:
    from kernels.flash_attention_gluon_tiles import _group_tile, _write_tile

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
                                        kv_empty, n_tiles, start, qk_scale, Skv - Sq, CAUSAL, STAGES, SPLIT_MASK,
                                        FMA_SOFTMAX, PINGPONG, WHICH, q_desc.block_type.shape[1], block_n, ring, turn)
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
