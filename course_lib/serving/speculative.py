"""Speculative decoding (lesson 06): a small draft model proposes γ tokens, the target model checks them all
in ONE forward pass, and a rejection-sampling rule keeps exactly the target's output distribution.

One round, with the sequence ``tokens`` so far (both caches hold every token but the newest):

    draft:   γ forward passes of 1 token   -> d_1 ... d_γ and their distributions q_1 ... q_γ   [γ, V]
    target:  1 forward pass of γ + 1 tokens (the newest token, d_1 ... d_γ)  -> p_1 ... p_{γ+1}  [γ+1, V]
    verify:  accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), left to right; at the first rejection
             draw a correction from norm(max(0, p_i − q_i)); if all γ pass, draw a bonus token from p_{γ+1}
    rollback: both caches forget the rejected positions (``KVCache.truncate``)

Temperature 0 is the greedy case: p and q are one-hot at the argmax, so a draft token is accepted exactly
when it is the target's argmax, and the correction is the target's argmax (``greedy_verify``).
Shapes use the legend of ``course_lib/__init__.py``; γ (``gamma``) is the number of draft tokens per round.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from course_lib.model.kv_cache import KVCache
from course_lib.model.sampling import SAMPLING_EPS


# ---------------------------------------------------------------- distributions and the acceptance rule
def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [..., V] -> float32 probabilities [..., V]: softmax(logits / T), or one-hot argmax at T = 0 (below
    1e-5, where logits / T would overflow)."""
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature < SAMPLING_EPS:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, dim=-1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p − q)) for p, q [V]: where a rejected position's correction token is drawn from.

    If p == q nothing is ever rejected there; we return p so the function is total."""
    r = torch.clamp(p - q, min=0)
    total = r.sum()
    return r / total if total > 0 else p


def count_accepted(draft_tokens: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
                   uniforms: torch.Tensor) -> int:
    """How many leading draft tokens pass the test u_i < p_i(d_i) / q_i(d_i) (u_i uniform in [0, 1))."""
    for i, x in enumerate(draft_tokens):
        # u < p/q written as u·q < p: no division, and p = 0 always rejects, p >= q always accepts.
        if not float(uniforms[i]) * float(draft_probs[i, x]) < float(target_probs[i, x]):
            return i
    return len(draft_tokens)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def rejection_sample(draft_tokens: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
                     generator: torch.Generator | None = None) -> list[int]:
    """Verify γ draft tokens: returns the accepted ones followed by one token from the target.

    draft_tokens: γ ids sampled from draft_probs [γ, V]; target_probs [γ+1, V] are the target's distributions
    at the same positions plus one more. Each returned token is distributed exactly as if it had been sampled
    from the target one at a time (Leviathan et al. 2023; Chen et al. 2023)."""
    gamma = len(draft_tokens)
    if draft_probs.shape[0] != gamma or draft_probs.dim() != 2:
        raise ValueError(f"draft_probs must be [γ={gamma}, V], got {tuple(draft_probs.shape)}")
    if target_probs.shape != (gamma + 1, draft_probs.shape[1]):
        raise ValueError(f"target_probs must be [γ+1={gamma + 1}, V={draft_probs.shape[1]}], "
                         f"got {tuple(target_probs.shape)}")
    draft_probs, target_probs = draft_probs.cpu(), target_probs.cpu()  # a few scalars per token: keep them on the host
    n = count_accepted(draft_tokens, draft_probs, target_probs, torch.rand(gamma, generator=generator))
    last = target_probs[n] if n == gamma else residual_distribution(target_probs[n], draft_probs[n])
    return list(draft_tokens[:n]) + [_sample(last, generator)]


def greedy_verify(draft_tokens: list[int], target_logits: torch.Tensor) -> list[int]:
    """Temperature 0: keep draft tokens while they equal the target's argmax, then add the target's argmax.
    target_logits [γ+1, V] (logits or probabilities: only the argmax matters)."""
    best = target_logits.argmax(-1).tolist()
    n = 0
    while n < len(draft_tokens) and draft_tokens[n] == best[n]:
        n += 1
    return list(draft_tokens[:n]) + [best[n]]


# ---------------------------------------------------------------- the analytic model
def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """E[tokens per target forward] = 1 + α + ... + α^γ = (1 − α^(γ+1)) / (1 − α), if each draft token is
    accepted independently with probability α."""
    return float(gamma + 1) if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_speedup(alpha: float, gamma: int, c: float, verify_cost: float = 1.0) -> float:
    """Tokens per unit of time vs plain decoding: E[tokens] / (γ·c + verify_cost), where c = t_draft / t_target
    per token and verify_cost = t_target(γ+1 tokens) / t_target(1 token) (≈ 1 while decode is memory-bound)."""
    return expected_tokens_per_step(alpha, gamma) / (gamma * c + verify_cost)


# ---------------------------------------------------------------- the generation loop
@dataclass
class SpeculativeStats:
    proposed: int = 0            # draft tokens proposed
    accepted: int = 0            # draft tokens accepted
    rejected: int = 0            # rounds that ended in a rejection (the others ended with a bonus token)
    target_forwards: int = 0     # one per round (the first one also prefills the prompt)
    draft_forwards: int = 0
    accept_prob_sum: float = 0.0  # Σ_x min(p(x), q(x)) over every tested position: the exact acceptance odds
    accepted_per_round: list[int] = field(default_factory=list)

    def record_round(self, num_proposed: int, num_accepted: int, accept_prob: float) -> None:
        """One verification: num_proposed drafts, num_accepted of them kept (the round ended in a rejection if
        fewer than all), accept_prob = Σ min(p, q) over the tested positions; one target forward pass."""
        self.target_forwards += 1
        self.proposed += num_proposed
        self.accepted += num_accepted
        self.rejected += int(num_accepted < num_proposed)
        self.accept_prob_sum += accept_prob
        self.accepted_per_round.append(num_accepted)

    @property
    def acceptance_rate(self) -> float:
        """α: accepted / tested draft tokens (the tokens after a rejection are never tested)."""
        tested = self.accepted + self.rejected
        return self.accepted / tested if tested else float("nan")

    @property
    def expected_acceptance_rate(self) -> float:
        """α from the distributions themselves: mean of Σ_x min(p(x), q(x)) = 1 − total variation(p, q)."""
        tested = self.accepted + self.rejected
        return self.accept_prob_sum / tested if tested else float("nan")

    @property
    def tokens_per_target_forward(self) -> float:
        return (self.accepted + self.target_forwards) / self.target_forwards if self.target_forwards else float("nan")


@dataclass
class SpeculativeResult:
    token_ids: list[int]          # generated tokens (prompt excluded)
    stats: SpeculativeStats


def rollback_caches(target_cache: KVCache, draft_cache: KVCache, num_tokens: int) -> None:
    """After a round the sequence has ``num_tokens`` tokens; its newest one has not been fed to either model.

    The target saw the newest token of the last round and all γ drafts, the draft all but its last proposal:
    both keep the K/V of the first num_tokens − 1 tokens; the draft may hold fewer (all γ accepted)."""
    target_cache.truncate(num_tokens - 1)
    draft_cache.truncate(min(draft_cache.length, num_tokens - 1))


@torch.no_grad()
def speculative_step(target, draft, tokens: list[int], target_cache: KVCache, draft_cache: KVCache, gamma: int,
                     temperature: float, generator: torch.Generator | None, stats: SpeculativeStats,
                     rollback: Callable[[KVCache, KVCache, int], None] = rollback_caches) -> list[int]:
    """One round: draft γ tokens, verify them with one target pass, roll back. Returns the 1 ... γ+1 new tokens."""
    device = target.device
    drafted, draft_probs = [], []
    for _ in range(gamma):  # the draft catches up on tokens it has not seen (1, or 2 after a full acceptance)
        new = (tokens + drafted)[draft_cache.length:]
        logits = draft(torch.tensor([new], device=device), cache=draft_cache, last_token_only=True)[0, -1]
        if temperature == 0:
            drafted.append(int(logits.argmax()))
        else:
            q = probabilities(logits, temperature).cpu()
            drafted.append(_sample(q, generator))
            draft_probs.append(q)
    stats.draft_forwards += gamma

    # One target pass over the newest token and the γ drafts (plus the prompt, in the first round).
    new = (tokens + drafted)[target_cache.length:]
    logits = target(torch.tensor([new], device=device), cache=target_cache)[0, -(gamma + 1):]   # [γ+1, V]
    if temperature == 0:
        out = greedy_verify(drafted, logits)
        accept_prob = len(out) - 1  # one-hot p and q: min(p, q) sums to 1 where they agree, 0 where not
    else:
        p = probabilities(logits, temperature).cpu()
        q = torch.stack(draft_probs) if gamma else p[:0]
        out = rejection_sample(drafted, q, p, generator)
        tested = min(len(out), gamma)  # the accepted positions and the rejected one
        accept_prob = float(torch.minimum(p[:tested], q[:tested]).sum())

    stats.record_round(gamma, len(out) - 1, accept_prob)
    rollback(target_cache, draft_cache, len(tokens) + len(out))
    return out


@torch.no_grad()
def speculative_generate(target, draft, prompt_ids: list[int], max_new_tokens: int, *, gamma: int = 4,
                         temperature: float = 0.0, seed: int | None = None,
                         stop_token_ids: tuple[int, ...] = ()) -> SpeculativeResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` with ``draft`` proposing ``gamma`` tokens per round.

    The output has the target's distribution (at temperature 0: exactly the target's greedy tokens); the draft
    only changes how many target forward passes it takes. The last round proposes fewer tokens if fewer remain.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: generation needs at least one token to condition on")
    if max_new_tokens < 1 or gamma < 1:
        raise ValueError(f"max_new_tokens and gamma must be >= 1, got {max_new_tokens} and {gamma}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"target and draft vocabularies differ: {target.config.vocab_size} vs "
                         f"{draft.config.vocab_size}")
    total = len(prompt_ids) + max_new_tokens
    context = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    if total > context:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                         f"{context}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    target_cache = KVCache(target.config, 1, total, dtype=target.dtype, device=target.device)
    draft_cache = KVCache(draft.config, 1, total, dtype=draft.dtype, device=draft.device)
    tokens, stats = list(prompt_ids), SpeculativeStats()
    while len(tokens) < total:
        g = min(gamma, total - len(tokens) - 1)  # never propose past max_new_tokens
        out = speculative_step(target, draft, tokens, target_cache, draft_cache, g, temperature, generator, stats)
        stop = next((i for i, t in enumerate(out) if t in stop_token_ids), None)
        tokens += out if stop is None else out[:stop + 1]
        if stop is not None:
            break
    return SpeculativeResult(token_ids=tokens[len(prompt_ids):], stats=stats)
