"""Counter-based noise for seeded sampling (lesson 04, lesson 10): the random number of token x in the draw of
output token ``position`` of a sequence seeded with ``seed`` is a pure function of (seed, position, x).

**Why counter-based.** A stream generator (``torch.Generator``, Python's ``random``) hands out numbers in order:
a draw depends on how many numbers were taken before it, so a batched sampler that shares one stream makes a
request's tokens depend on its neighbours, and one generator per request means a host loop over the rows. A
*counter-based* generator (Salmon et al., SC 2011: Philox, the generator of cuRAND and of ``torch.rand`` on a
GPU) instead hashes a key and a counter: any number can be computed on its own, in any order, by any thread. Here
the key is (seed, position) and the counter is the token id, so the noise of a whole batch [N, V] is one batched
computation on whatever device the logits live on, with no generator state, no host loop and no host sync, and
the same bits on a CPU and on a GPU. (vLLM gets the same independence from a ``torch.Generator`` per seeded
request, drawn row by row; counter-based noise makes the batched draw as cheap as an argmax plus a hash.)

**The hash.** Everything is int64 torch arithmetic on values below 2**32 (torch has no uint64 arithmetic that works
on every device, and a signed overflow must never happen): ``_mix`` is Chris Wellons's xorshift-multiply round
(``lowbias32``'s shape) with two odd multipliers below 2**31, and after each multiplication the product (< 2**63)
is masked back to 32 bits, which is exactly 32-bit unsigned arithmetic. The 63-bit seed enters as two 32-bit
halves. Per row, two 32-bit words are hashed from (seed, position) by two independent chains; per token,

    h[n, x] = mix(mix(x ^ a[n]) ^ b[n])        a, b = the row's words; mix is a bijection of [0, 2**32)

so within a row no two tokens share their noise, and rows of neighbouring positions or seeds share nothing.
Then U = (h + 0.5) / 2**32, strictly inside (0, 1) (exact in float64), and E = -log(U) ~ Exp(1), never 0 nor inf.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x31848BAB          # odd multipliers < 2**31: a 32-bit value times one stays < 2**63
_KEY_A, _KEY_B = 0x9E3779B9, 0x85EBCA6B    # start the two row chains apart (and never at mix's fixed point 0)
MAX_POSITION = MASK32                      # positions and token ids are 32-bit counters


def _mix(h: torch.Tensor) -> torch.Tensor:
    """One xorshift-multiply round, a bijection of [0, 2**32), on int64 values below 2**32."""
    h = h ^ (h >> 16)
    h = (h * _M1) & MASK32
    h = h ^ (h >> 15)
    h = (h * _M2) & MASK32
    return h ^ (h >> 16)


def _check(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> None:
    for name, t in (("seeds", seeds), ("positions", positions)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D int64 tensor [N], got {got}")
    if seeds.shape != positions.shape or seeds.device != positions.device:
        raise ValueError(f"seeds and positions must have the same shape and device, got {list(seeds.shape)} on "
                         f"{seeds.device} and {list(positions.shape)} on {positions.device}")
    if not isinstance(vocab_size, int) or not 1 <= vocab_size <= MAX_POSITION:
        raise ValueError(f"vocab_size must be an int in [1, 2**32 - 1], got {vocab_size!r}")


def noise_bits(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seeds [N], positions [N] (int64, >= 0; seeds < 2**63, positions < 2**32) -> the hash h [N, V] (int64, each
    in [0, 2**32)) on their device: h[n, x] depends on (seeds[n], positions[n], x) only."""
    _check(seeds, positions, vocab_size)
    lo, hi = seeds & MASK32, seeds >> 32                                               # [N] each, 32-bit halves
    a = _mix(_mix(_mix(positions ^ _KEY_A) ^ lo) ^ hi)                                 # [N]
    b = _mix(_mix(_mix(hi ^ _KEY_B) ^ positions) ^ lo)                                 # [N]
    x = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)               # [V]
    return _mix(_mix(x[None, :] ^ a[:, None]) ^ b[:, None])                            # [N, V]


def uniform_from_bits(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64 in [0, 2**32)) -> U = (h + 0.5) / 2**32 in float64: exact, strictly inside (0, 1)."""
    return (h.double() + 0.5) * 2.0**-32


def exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """E [N, V] float32, E ~ Exp(1) independently per (seed, position, token): -log(U) of ``noise_bits``, computed
    in float64 and rounded once to float32 (from 1.2e-10 to 22.9: never 0, never inf)."""
    return (-torch.log(uniform_from_bits(noise_bits(seeds, positions, vocab_size)))).float()
