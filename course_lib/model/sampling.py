"""Sampling parameters of a request, and how one next token is drawn from its logits (lesson 04).

``SamplingParams`` is a validated dataclass (the names are vLLM's): a bad value raises a ``ValueError`` that
names the field when the object is built, so a wrong request never reaches the engine's batch.

**Seeded draws that no batch can change.** A draw is an *exponential race* (the Gumbel-max trick in another
guise): every token x gets a random time E_x ~ Exp(1), and the token with the largest p_x / E_x wins, which
happens with probability exactly p_x. The noise E of output token t of a sequence comes from a generator seeded
by (the sequence's seed, t) alone (``token_generator``), never from a stream that other draws advance. So a
request's tokens depend on its seed and its logits only: not on which requests share its steps, how a prompt
was chunked, whether it was preempted, nor (``course_lib.serving.spec_decode``) on how many draft tokens a step
verified.
"""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass

import torch

#: Temperatures below this count as greedy (vLLM's ``_SAMPLING_EPS``): logits / 1e-310 overflow to inf, and the
#: softmax of that is NaN.
SAMPLING_EPS = 1e-5
#: Seeds are non-negative 63-bit ints, the range of ``random.Random.getrandbits(63)`` and of a torch seed.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to generate the completion(s) of one request.

    temperature      0 = greedy (argmax); > 0 samples from softmax(logits / temperature). A finite number >= 0;
                     below SAMPLING_EPS = 1e-5 it is greedy too (vLLM's rule: the division would overflow)
    top_p            nucleus sampling: keep the smallest set of tokens whose probabilities sum to >= top_p (1 = all)
    top_k            keep the top_k most likely tokens (None = all)
    max_tokens       generate at most this many tokens (fewer at a stop token or at the model's context length)
    stop_token_ids   stop after generating one of these (it is kept in the output); () = never stop early
    seed             an int in [0, 2**63 - 1]: the request's tokens depend on it and on the logits only, never on
                     the batch (see the module docstring); None: the engine draws one
    n                number of completions of the prompt (each sampled independently; sample i uses seed + i)

    Passed to the engine as a dict, the keys must be these names: an unknown key (a typo such as ``temprature``)
    is refused, not ignored.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1

    def __post_init__(self):
        def is_int(x):
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        t = self.temperature
        if not isinstance(t, numbers.Real) or isinstance(t, bool) or not (math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(self.top_p, numbers.Real) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be None or an int in [0, 2**63 - 1], got {self.seed!r}")
        try:
            stops = tuple(self.stop_token_ids)
        except TypeError:
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}") from None
        if not all(is_int(t) and t >= 0 for t in stops):
            raise ValueError(f"stop_token_ids must hold ints >= 0, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stops))

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float = 1.0) -> torch.Tensor:
    """logits [V] -> float32 logits divided by the temperature, with the tokens outside top-k / top-p at -inf."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (so the most likely one always stays)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def token_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the draw of output token ``position`` of a sequence seeded with ``seed``: a seed for the
    pair, hashed (sha512) so that neighbouring pairs give unrelated noise."""
    return torch.Generator().manual_seed(random.Random(f"{seed}/{position}").getrandbits(63))


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token from probs [V] by an exponential race: argmax_x p_x / E_x with E_x ~ Exp(1) from ``generator``
    (x wins with probability p_x; None: torch's global generator). ``torch.multinomial(probs, 1)`` races the
    same way, with noise from whatever stream it is given."""
    probs = probs.float().cpu()
    e = torch.empty_like(probs).exponential_(generator=generator)           # [V]
    return int(torch.where(probs > 0, probs / e, -1.0).argmax())          # a token of probability 0 never wins


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]: argmax when greedy, else a draw from the filtered softmax with ``generator``
    (a sequence's ``token_generator(seed, position)``)."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(filter_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1)
    return draw(probs, generator)
