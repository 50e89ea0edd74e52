"""Asynchronous scheduling (vLLM's ``async_scheduling``, SGLang's overlap scheduler; lesson 10): the host plans
step k + 1 while the GPU runs step k.

A synchronous engine step is host work, then GPU work, then host work again: schedule, launch the forward pass,
*wait* for the sampled tokens (``.tolist()``), append them, and only then plan the next step. While the host plans,
the GPU idles; while the GPU runs, the host waits. At batch 256 on an H100 the course's engine spent ~4 ms of host
time per decode step beside ~10 ms of GPU time: the GPU was idle a quarter of the time.

Nothing in planning step k + 1 needs the *values* of step k's tokens, only their *number*: every sequence that
sampled gains one token, so its length, its slots and its blocks are known before the token is. So the engine:

1. launches step k (the forward pass and the sampling on the device: ``sampling.sample_tokens``, greedy argmax
   and seeded draws) and starts an asynchronous copy of the sampled ids to pinned host memory, followed by an
   event; it does not wait;
2. reads step k - 1's tokens: that copy finished long ago (the GPU runs step k meanwhile), and puts them in place of
   the placeholders (``PLACEHOLDER``) that step k - 1 appended; a stop token finishes its sequence one step late
   (the step already launched computes one more token for it, which is thrown away);
3. appends a placeholder for each token of step k, so that the scheduler plans step k + 1 with the right lengths;
4. step k + 1's input ids for those sequences are taken on the device from step k's sampled ids (``patch_input_ids``),
   never from the host.

The outputs of a step (its ``RequestOutput``s) come one step late: ``step()`` returns the tokens it has read back.
**Seeded requests overlap too.** A draw needs, besides the logits, only the sequence's seed and the position of the
token it draws, and both are on the host when the step is planned: the position is the sequence's output length,
placeholders of the step in flight included. The noise is a hash of (seed, position, token)
(``course_lib.model.noise``), computed on the device in the same batch as the argmax, so a step with sampling rows
launches like a greedy one. Only speculative decoding (its verification reads the tokens on the host) still drains
the step in flight and runs synchronously. The tokens, greedy and seeded, are the same as a synchronous engine's,
bit for bit: the same forward passes over the same token ids and the same draws, only launched earlier.
"""
from __future__ import annotations

import torch

from course_lib.model.sampling import sample_tokens
from course_lib.serving.sequence import ScheduledChunk, Sequence, draw_keys

#: The token id a sequence carries for a token sampled on the device but not read back yet.
PLACEHOLDER = -1


class InflightStep:
    """The sampled tokens of one launched step, on their way to the host: ``tokens`` on the device (one per
    sampling chunk, in the order of the chunks: the argmax of a greedy row, the seeded draw of the others), their
    pinned host copy, and the event that marks it done."""

    def __init__(self, chunks: list[ScheduledChunk], logits: torch.Tensor):
        self.seqs: list[Sequence] = [c.seq for c in chunks if c.samples]
        self.tokens = sample_tokens(logits, *draw_keys(self.seqs))                       # [rows] int64, device
        self.row = {seq.seq_id: i for i, seq in enumerate(self.seqs)}
        self.position: dict[int, int] = {}     # seq_id -> the position of its placeholder (set by mark_placeholders)
        pin = self.tokens.device.type == "cuda"
        self._host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=pin)
        self._host.copy_(self.tokens, non_blocking=pin)
        self._event = None
        if pin:
            self._event = torch.cuda.Event()
            self._event.record()

    def placeholders(self) -> dict[int, int]:
        """What ``Scheduler.update`` appends for this step: a placeholder per sampling sequence."""
        return {seq.seq_id: PLACEHOLDER for seq in self.seqs}

    def mark_placeholders(self) -> None:
        """After ``Scheduler.update``: where each sequence's placeholder is (a sequence that finished in this step
        by its length still gets its token read back)."""
        for seq in self.seqs:
            if seq.output_token_ids and seq.output_token_ids[-1] == PLACEHOLDER:
                self.position[seq.seq_id] = seq.num_tokens - 1

    def read(self) -> list[tuple[Sequence, int]]:
        """Wait for the copy (only for it, not for later steps) and return (sequence, token) per sampling sequence."""
        if self._event is not None:
            self._event.synchronize()
        return list(zip(self.seqs, self._host.tolist()))

    def input_rows(self, chunks: list[ScheduledChunk]) -> tuple[list[int], list[int]]:
        """For the flattened input ids of the next step (its chunks, in order): the rows that hold one of this step's
        placeholders, and for each the row of this step's ``tokens`` that has its value."""
        dst, src, row = [], [], 0
        for chunk in chunks:
            pos = self.position.get(chunk.seq.seq_id)
            if pos is not None and chunk.start <= pos < chunk.start + chunk.num_tokens:
                dst.append(row + pos - chunk.start)
                src.append(self.row[chunk.seq.seq_id])
            row += chunk.num_tokens
        return dst, src


def patch_input_ids(input_ids: torch.Tensor, dst, src, tokens: torch.Tensor) -> None:
    """input_ids[dst] = tokens[src] on the device (``input_ids`` 1-D, a view of the step's token ids). ``dst`` and
    ``src``: lists, or int64 tensors already on the device (the model runner's: a list is copied to the device
    from pageable memory, and that copy waits for every kernel queued before it)."""
    if len(dst):
        device = input_ids.device
        input_ids[torch.as_tensor(dst, device=device)] = tokens[torch.as_tensor(src, device=device)]
