"""Speculative decoding inside the continuous-batching engine (lessons 04 + 06):
``LLMEngine(model, speculative_model=draft, num_speculative_tokens=k)`` (vLLM's names).

Lesson 06 ran one sequence through ``speculative_step``; here every sequence of the running batch speculates
in the same steps, on the paged K/V of lesson 04. One engine step:

    scheduler       every chunk that samples (a decode, or the last chunk of a prompt) gets up to k
                    **lookahead slots** in its block table, counted against the token budget (a decode costs 1 + k)
    draft pass 1    the step's chunks as scheduled, prompt chunks too (the draft needs the prompt's K/V)
                    -> d_1 for every speculating sequence
    draft pass i    one token per speculating sequence: d_(i-1) -> d_i              (i = 2 ... k: k - 1 passes)
    target pass     ONE pass in which each speculating sequence is a chunk of its tokens + its drafts (a
                    ``VerifyChunk``: "prefill-like", it attends over the paged cache), logits at its last k + 1 rows
    verify          per sequence lesson 06's ``greedy_verify``, or when sampling its twin on coupled draws (see
                    "Same output"): j accepted drafts + one token of the target's (the correction, or the bonus
                    when all k pass)
    update          the scheduler appends the 1 ... k + 1 tokens, stopping at a stop token or the length limit

The k draft passes and the verify pass each serve all sequences at once. Whether a step of k + 1 tokens per
sequence pays depends on what the verify pass costs next to a decode pass: about the same while decoding is
memory-bound (a GPU, lesson 00), clearly more where the extra tokens cost compute (a CPU).

**Two pools, one block table.** The draft's K/V live in a pool of its own with the same number of blocks
(``engine.draft_pool``; only the per-layer shapes differ). A token sits in the same slot in both pools, so the
one block manager serves both models: preemption by swap copies the draft's blocks with the same mapping,
preemption by recompute frees both at once, and a block of the prefix cache holds both models' K/V.

**What counts as computed.** ``num_computed_tokens`` counts the tokens whose K/V are valid in *both* pools. The
target ran the chunk and d_1 ... d_k; the draft the chunk and d_1 ... d_(k-1) (it never runs its own last
proposal). So of the accepted drafts only those both models ran count; after a full acceptance d_k is
computed once more, by both models, in the next step (one token more, instead of a second counter per
sequence), and a block that the prefix cache keeps is valid for both models. The K/V written for rejected
drafts are stale: nothing counts them, and the next steps overwrite those slots.

**Same output.** Greedy: a draft token is kept only if it is the target's argmax, so the tokens are the
target's greedy tokens, one for one (up to float round-off: a verify chunk runs through the prefill attention
path, a plain decode through the decode path). Sampling: the same, with the target's *draw* in place of its
argmax. Output token t of a sequence is drawn by an exponential race with noise keyed by (its seed, t)
(``course_lib.model.sampling``): the draft proposes the winner of the race under its distribution q, the target
computes the winner under its distribution p with the *same* noise, and a draft token is kept exactly when the
two agree (Daliri et al. 2024, "drafter-invariant speculative decoding"). Every output token is the target's own
draw, so a seeded request gets the tokens the engine draws without speculation, whatever k, the batch or the
budget (which decide how many drafts each step verifies). The price: the two races agree a little less often
than lesson 06's rejection rule accepts (Σ min(p, q), which keeps the distribution but not the tokens when k
changes): on the shipped tiny pair at T = 1, 0.60 vs 0.65 of the draft tokens (256 positions of validation text).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from course_lib.serving.model_runner import ModelRunner
from course_lib.model.sampling import sample_tokens, sampling_probs
from course_lib.serving.sequence import ScheduledChunk, Sequence, draw_keys
from course_lib.serving.speculative import SpeculativeStats


def check_speculative_config(model, speculative_model, num_speculative_tokens) -> int:
    """num_speculative_tokens (0 = off), or a ValueError naming the field that is wrong."""
    k = num_speculative_tokens
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"num_speculative_tokens must be an int >= 0 (0 = no speculation), got {k!r}")
    if speculative_model is None:
        if k:
            raise ValueError(f"num_speculative_tokens={k} needs a speculative_model (the draft model)")
        return 0
    if k == 0:
        raise ValueError("num_speculative_tokens must be >= 1 with a speculative_model (draft tokens per step); "
                         "pass no speculative_model to turn speculation off")
    config, target = getattr(speculative_model, "config", None), model.config
    if config is None or not hasattr(speculative_model, "device"):
        raise ValueError("speculative_model must be a model like course_lib.Llama, got "
                         f"{type(speculative_model).__name__}")
    if config.vocab_size != target.vocab_size:
        raise ValueError(f"speculative_model: its vocab_size ({config.vocab_size}) differs from the target's "
                         f"({target.vocab_size}); draft and target must share the tokenizer")
    if config.max_position_embeddings < target.max_position_embeddings:
        raise ValueError(f"speculative_model: its context (max_position_embeddings={config.max_position_embeddings}) "
                         f"is shorter than the target's ({target.max_position_embeddings})")
    if speculative_model.device != model.device:
        raise ValueError(f"speculative_model is on {speculative_model.device}, the target on {model.device}")
    if k >= target.max_position_embeddings:
        raise ValueError(f"num_speculative_tokens ({k}) must be smaller than the context "
                         f"({target.max_position_embeddings})")
    return k


@dataclass(eq=False)
class Drafted:
    """A sequence with draft tokens appended: what the models read during a step (``seq_id`` for its block
    table, ``token_ids`` for the inputs)."""

    seq_id: int
    token_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def last_token_id(self) -> int:          # what the model runner reads of a Sequence, read here
        return self.token_ids[-1]

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        return self.token_ids[start:end]


@dataclass
class VerifyChunk(ScheduledChunk):
    """A scheduled chunk followed by its ``num_drafts`` draft tokens (``seq`` is a ``Drafted``): the target
    needs logits at the chunk's last token and at every draft, k + 1 rows."""

    num_drafts: int = 0

    @property
    def num_logits(self) -> int:
        return self.num_drafts + 1


class SpecDecodeWorker:
    """One speculative step over the engine's chunks: k batched draft passes, one target pass, verification.
    ``stats`` (lesson 06's ``SpeculativeStats``) counts over the worker's life, with a *round* being one
    sampling chunk of one step: ``target_forwards`` = rounds (each is a slice of a step's one target pass),
    ``draft_forwards`` = batched draft passes; ``tokens_per_target_forward`` = tokens a sequence gains per round;
    ``expected_acceptance_rate`` = Σ min(p, q), lesson 06's rule, which the coupled draws approach from below."""

    def __init__(self, target: ModelRunner, draft: ModelRunner):
        self.target, self.draft = target, draft
        self.stats = SpeculativeStats()

    @torch.no_grad()
    def step(self, chunks: list[ScheduledChunk]) -> dict[int, list[int]]:
        """The new tokens (1 ... k + 1) of every chunk that samples, keyed by seq_id."""
        seqs = {c.seq.seq_id: c.seq for c in chunks}
        ahead = {c.seq.seq_id: c.num_lookahead for c in chunks if c.num_lookahead}   # seq_id -> k of this step
        drafts = {sid: [] for sid in ahead}
        draft_probs = {sid: [] for sid in ahead}                                      # q rows, when sampling
        # draft pass 1: the chunks as scheduled (every chunk: the draft must keep the K/V of every computed token)
        logits = self.draft.execute(chunks)                                           # [chunks that sample, V]
        rows = [(i, c.seq.seq_id) for i, c in enumerate([c for c in chunks if c.samples]) if c.seq.seq_id in ahead]
        self._propose([sid for _, sid in rows], logits[[i for i, _ in rows]], seqs, drafts, draft_probs)
        # draft passes 2 ... k: the newest draft token of every sequence that wants more, one token each
        num_passes = max(ahead.values(), default=1)
        for i in range(1, num_passes):
            active = [sid for sid in ahead if ahead[sid] > i]
            batch = [ScheduledChunk(Drafted(sid, seqs[sid].token_ids + drafts[sid]), seqs[sid].num_tokens + i - 1, 1)
                     for sid in active]      # d_i at position num_tokens + i - 1
            self._propose(active, self.draft.execute(batch), seqs, drafts, draft_probs)
        self.stats.draft_forwards += num_passes
        # the target: one pass, each speculating chunk extended by its drafts; one-token chunks first (StepBatch)
        verify = [c if not c.num_lookahead else
                  VerifyChunk(Drafted(c.seq.seq_id, c.seq.token_ids + drafts[c.seq.seq_id]), c.start,
                              c.num_tokens + c.num_lookahead, num_drafts=c.num_lookahead) for c in chunks]
        verify.sort(key=lambda c: c.num_tokens > 1)
        logits = self.target.execute(verify)                                          # [rows, V]
        # the target's token at every row: its argmax, or its draw with the noise of that output position (the
        # draft's noise there): one batched sample_tokens, one device-to-host copy
        owners = [(seqs[c.seq.seq_id], i) for c in verify if c.samples for i in range(c.num_logits)]   # per row
        target_tokens = sample_tokens(logits, *draw_keys([s for s, _ in owners], [i for _, i in owners])).tolist()
        new_tokens, row = {}, 0
        for c in verify:
            if not c.samples:
                continue
            sid, m = c.seq.seq_id, c.num_logits
            new_tokens[sid] = self._verify(seqs[sid], drafts.get(sid, []), draft_probs.get(sid, []),
                                           logits[row:row + m], target_tokens[row:row + m])
            row += m
        return new_tokens

    # ---------------------------------------------------------------- helpers
    def _propose(self, seq_ids, logits, seqs, drafts, draft_probs) -> None:
        """The next draft token of each sequence: the draft's argmax (greedy), or the winner of the race under its
        filtered distribution q with the noise of that output position (one batched ``sample_tokens``; q kept
        for the statistics)."""
        batch = [seqs[sid] for sid in seq_ids]
        tokens = sample_tokens(logits, *draw_keys(batch, [len(drafts[sid]) for sid in seq_ids])).tolist()
        sampling = [i for i, seq in enumerate(batch) if not seq.params.greedy]
        q = sampling_probs(logits[sampling], [batch[i].params for i in sampling]).cpu() if sampling else []
        for sid, token in zip(seq_ids, tokens):
            drafts[sid].append(token)
        for i, row in zip(sampling, q):
            draft_probs[seq_ids[i]].append(row)

    def _verify(self, seq: Sequence, drafted: list[int], q_rows: list, logits: torch.Tensor,
                target_tokens: list[int]) -> list[int]:
        """The accepted drafts and one token of the target's: ``target_tokens`` [k + 1] are its argmaxes
        (greedy_verify) or its draws with the drafts' noise (the sampling twin); ``logits`` [k + 1, V] and the
        drafts' q rows only feed the statistics."""
        k, stats = len(drafted), self.stats
        n = next((i for i, (d, t) in enumerate(zip(drafted, target_tokens)) if d != t), k)
        out = drafted[:n] + [target_tokens[n]]          # the target's tokens up to the first disagreement
        tested = min(len(out), k)                                                     # accepted + the rejected one
        if seq.params.greedy:
            accept_prob = n
        elif tested:
            p = sampling_probs(logits[:tested], [seq.params] * tested).cpu()          # [tested, V]
            accept_prob = float(torch.minimum(p, torch.stack(q_rows[:tested])).sum())
        else:
            accept_prob = 0.0
        stats.record_round(k, len(out) - 1, accept_prob)
        return out
