"""Paged KV-cache memory (lesson 02): a block allocator, per-sequence block tables, fork with copy-on-write.

The vocabulary is vLLM's and nano-vllm's. The KV cache is cut into N physical **blocks** of P token slots
(P = ``block_size``). A sequence's **block table** lists its blocks in order, so its token at position i
lives in the physical slot

    slot = block_table[i // P] * P + i % P          (the **slot mapping** the kernels write K/V through)

and only the last block of a sequence can be partly empty. Blocks are shared between sequences by
reference counting: ``fork`` (parallel sampling, beam search) makes a child that points at its parent's
blocks; a shared block is copied only when one of its owners writes into it (**copy-on-write**). Full
shared blocks are never written again, so they are never copied.

This module only does the bookkeeping (plain Python ints). The tensors live in ``course_lib.paging.paged_cache``,
which performs the block copies that ``append_slots`` asks for.
"""
from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """No free block is left. A scheduler avoids it by asking ``can_allocate`` / ``can_append`` first
    (and then waits, preempts or swaps a sequence: lesson 04)."""


class BlockAllocator:
    """A free list of physical block ids plus a reference count per block.

    ``ref_counts[b]`` is the number of owners (block-table entries) of block b; a block is on the free
    list exactly when its count is 0. ``watchers`` are called as ``watcher(block_id, old, new)`` whenever
    ``share`` or ``free`` changes a count: a prefix cache keeps its count of idle blocks that way (lesson 05).
    """

    def __init__(self, num_blocks: int):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.ref_counts: list[int] = [0] * num_blocks
        self.watchers: list = []

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def allocate(self) -> int:
        """Take a free block (reference count 1); raise OutOfBlocksError when none is left."""
        if not self.free_block_ids:
            raise OutOfBlocksError(f"all {self.num_blocks} KV blocks are in use")
        block_id = self.free_block_ids.popleft()
        self.ref_counts[block_id] = 1
        return block_id

    def share(self, block_id: int) -> int:
        """One more owner of an allocated block (fork): increment its reference count."""
        self._check_allocated(block_id, "share")
        self.ref_counts[block_id] += 1
        for watcher in self.watchers:
            watcher(block_id, self.ref_counts[block_id] - 1, self.ref_counts[block_id])
        return block_id

    def free(self, block_id: int) -> None:
        """One owner fewer; the block returns to the free list when nobody owns it any more."""
        self._check_allocated(block_id, "free")
        self.ref_counts[block_id] -= 1
        for watcher in self.watchers:
            watcher(block_id, self.ref_counts[block_id] + 1, self.ref_counts[block_id])
        if self.ref_counts[block_id] == 0:
            self.free_block_ids.append(block_id)

    def _check_allocated(self, block_id: int, action: str) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"cannot {action} block {block_id}: ids are 0 ... {self.num_blocks - 1}")
        if self.ref_counts[block_id] == 0:
            raise ValueError(f"cannot {action} block {block_id}: it is free (a double free, or a stale block table)")


class BlockManager:
    """Block tables of many sequences over one ``BlockAllocator`` (vLLM's BlockSpaceManager, in small).

    Every method that needs blocks checks first that enough are free and raises ``OutOfBlocksError``
    *before* changing anything, so a failed call leaves the manager as it was.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.block_tables: dict[int, list[int]] = {}   # seq_id -> physical block ids, in token order
        self.num_tokens: dict[int, int] = {}           # seq_id -> tokens held (slots reserved)

    # ---------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_blocks - self.allocator.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens: ceil(num_tokens / P)."""
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._table(seq_id))

    def slot_mapping(self, seq_id: int, start: int, end: int) -> list[int]:
        """Physical slots of the sequence's tokens start ... end-1."""
        table, P = self._table(seq_id), self.block_size
        if not 0 <= start <= end <= self.num_tokens[seq_id]:
            raise ValueError(f"tokens {start}:{end} are outside sequence {seq_id}'s {self.num_tokens[seq_id]} tokens")
        return [table[i // P] * P + i % P for i in range(start, end)]

    def can_allocate(self, num_tokens: int) -> bool:
        return self.num_blocks_for(num_tokens) <= self.num_free_blocks

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        return self._blocks_to_append(seq_id, num_tokens) <= self.num_free_blocks

    # ---------------------------------------------------------------- changes
    def allocate(self, seq_id: int, num_tokens: int = 0) -> list[int]:
        """A new sequence with room for its first num_tokens tokens (the prompt); returns its block table."""
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        need = self.num_blocks_for(num_tokens)
        if need > self.num_free_blocks:
            raise OutOfBlocksError(f"sequence {seq_id} needs {need} blocks for {num_tokens} tokens; "
                                   f"{self.num_free_blocks} of {self.allocator.num_blocks} are free")
        self.block_tables[seq_id] = [self.allocator.allocate() for _ in range(need)]
        self.num_tokens[seq_id] = num_tokens
        return self.block_table(seq_id)

    def append_slots(self, seq_id: int, num_tokens: int = 1) -> tuple[list[int], list[tuple[int, int]]]:
        """Reserve slots for num_tokens more tokens of a sequence (a decode step: 1).

        Returns ``(slots, copies)``: the new tokens' slots, and the block copies ``(src, dst)`` the cache
        must perform *before* writing them. A copy happens only when the sequence writes into a partly
        filled last block that it shares with another sequence (copy-on-write).
        """
        need = self._blocks_to_append(seq_id, num_tokens)
        table, start, P = self.block_tables[seq_id], self.num_tokens[seq_id], self.block_size
        copies = []
        if need > 0:   # most decode steps write into the last block, which the sequence owns alone: nothing to do
            self._make_room(need)
            if need > self.num_free_blocks:
                raise OutOfBlocksError(f"sequence {seq_id} needs {need} more blocks for {num_tokens} tokens; "
                                       f"{self.num_free_blocks} of {self.allocator.num_blocks} are free")
            if self._writes_into_shared_block(seq_id, num_tokens):
                shared = table[-1]
                table[-1] = self.allocator.allocate()      # our own copy of the block ...
                copies.append((shared, table[-1]))
                self.allocator.free(shared)                # ... and one owner fewer for the shared one
            while len(table) * P < start + num_tokens:     # new blocks for tokens past the last block
                table.append(self.allocator.allocate())
        self.num_tokens[seq_id] = start + num_tokens
        return [table[i // P] * P + i % P for i in range(start, start + num_tokens)], copies

    def fork(self, parent_id: int, child_id: int) -> list[int]:
        """A child sequence sharing all of its parent's blocks (no copy: ref counts + 1). Returns its table."""
        if child_id in self.block_tables:
            raise ValueError(f"sequence {child_id} already has a block table")
        parent = self._table(parent_id)
        self.block_tables[child_id] = [self.allocator.share(b) for b in parent]
        self.num_tokens[child_id] = self.num_tokens[parent_id]
        return self.block_table(child_id)

    def free(self, seq_id: int) -> None:
        """Release a finished (or preempted) sequence: one owner fewer for each of its blocks."""
        for block_id in self._table(seq_id):
            self.allocator.free(block_id)
        del self.block_tables[seq_id], self.num_tokens[seq_id]

    # ---------------------------------------------------------------- partial swap (lesson 04)
    def free_tail(self, seq_id: int, num_blocks: int) -> list[int]:
        """Give back the last ``num_blocks`` blocks of a sequence, keeping the ones before them (a partial swap moves
        a preempted sequence's tail to the CPU pool and keeps its prefix here). Its tokens end with its last kept
        block. Returns the blocks given back, in token order."""
        table = self._table(seq_id)
        if not isinstance(num_blocks, int) or not 0 <= num_blocks <= len(table):
            raise ValueError(f"num_blocks must be an int in 0 ... {len(table)} (sequence {seq_id}'s blocks), "
                             f"got {num_blocks!r}")
        kept = len(table) - num_blocks
        freed = table[kept:]
        del table[kept:]
        for block_id in freed:
            self.allocator.free(block_id)
        self.num_tokens[seq_id] = min(self.num_tokens[seq_id], kept * self.block_size)
        return freed

    def prepend_blocks(self, seq_id: int, num_blocks: int) -> list[int]:
        """``num_blocks`` new full blocks placed before a sequence's first block (the CPU pool of a partial swap: the
        tail goes first, and each later piece of the sequence comes from before it). Returns the new blocks."""
        table = self._table(seq_id)
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
        if num_blocks > self.num_free_blocks:
            raise OutOfBlocksError(f"sequence {seq_id} needs {num_blocks} blocks; {self.num_free_blocks} of "
                                   f"{self.allocator.num_blocks} are free")
        new = [self.allocator.allocate() for _ in range(num_blocks)]
        table[:0] = new
        self.num_tokens[seq_id] += num_blocks * self.block_size
        return new

    # ---------------------------------------------------------------- internals
    def _table(self, seq_id: int) -> list[int]:
        if seq_id not in self.block_tables:
            raise KeyError(f"unknown sequence {seq_id} (allocate or fork it first)")
        return self.block_tables[seq_id]

    def _make_room(self, need: int) -> None:
        """Before ``need`` blocks are taken from the free list: nothing to do here; a prefix cache evicts."""

    def _writes_into_shared_block(self, seq_id: int, num_tokens: int) -> bool:
        table, n = self._table(seq_id), self.num_tokens[seq_id]
        # n % P != 0: the last block has free slots, and the next token goes there.
        return num_tokens > 0 and n % self.block_size != 0 and self.allocator.ref_counts[table[-1]] > 1

    def _blocks_to_append(self, seq_id: int, num_tokens: int) -> int:
        """New blocks that num_tokens more tokens take: past the last block, plus a copy of a shared last block
        written into (``_writes_into_shared_block``, inlined: the scheduler asks for every sequence every step)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        table = self.block_tables.get(seq_id) or self._table(seq_id)   # (_table: the error of an unknown id)
        n, P = self.num_tokens[seq_id], self.block_size
        shared = num_tokens > 0 and n % P != 0 and self.allocator.ref_counts[table[-1]] > 1
        return -(-(n + num_tokens) // P) - len(table) + shared
